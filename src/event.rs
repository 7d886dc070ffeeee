//! The CloudTrail record as the analyzer sees it: a borrowed view over one parsed record
//! with typed accessors for the fields every finding needs, and dotted-path lookup for
//! everything else. This is the contract between decode and analyze; rules never see
//! simd-json types directly, and nothing in a record is trusted (every accessor copes
//! with a missing field or a field of the wrong type).

pub use crate::json::{Kind, Value};

/// A parsed CloudTrail record.
#[derive(Clone, Copy)]
pub struct Event<'v> {
    root: Value<'v>,
    /// The top-level fields every accessor needs, found in one pass over the record
    /// (each lookup in the tape is a linear scan).
    top: [Option<Value<'v>>; TOP.len()],
    /// Bit i set: `TOP[i]` occurs more than once in the record.
    dups: u16,
    /// Repeated keys resolve to their last value (see `last_wins`).
    last: bool,
}

/// Top-level fields cached by `Event::new`.
const TOP: [&str; 15] = [
    "eventSource",
    "eventName",
    "eventID",
    "eventTime",
    "awsRegion",
    "errorCode",
    "sourceIPAddress",
    "userAgent",
    "userIdentity",
    "vpcEndpointId",
    "recipientAccountId",
    "resources",
    "requestParameters",
    "responseElements",
    "readOnly",
];

/// The event sources kmsguard parses fully; everything else is skipped unparsed.
pub const KMS_SOURCE: &str = "kms.amazonaws.com";
pub const CLOUDTRAIL_SOURCE: &str = "cloudtrail.amazonaws.com";

impl<'v> Event<'v> {
    /// The record with the first value of a repeated key winning, as in `Value::get`.
    pub fn new(root: Value<'v>) -> Self {
        Self::build(root, false)
    }

    /// The same record read as other parsers read it when a key repeats: the last value
    /// wins. Analyzing both readings means the ambiguity cannot hide an event.
    pub fn last_wins(root: Value<'v>) -> Self {
        Self::build(root, true)
    }

    fn build(root: Value<'v>, last: bool) -> Self {
        let mut top = [None; TOP.len()];
        let mut dups = 0u16;
        for (k, v) in root.fields() {
            if let Some(i) = TOP.iter().position(|t| *t == k) {
                if top[i].is_none() {
                    top[i] = Some(v);
                } else {
                    dups |= 1 << i;
                    if last {
                        top[i] = Some(v);
                    }
                }
            }
        }
        Event {
            root,
            top,
            dups,
            last,
        }
    }

    /// Top-level fields kmsguard reads that occur more than once in the record (an
    /// ambiguity other parsers resolve by keeping the last value).
    pub fn duplicate_fields(&self) -> Vec<&'static str> {
        (0..TOP.len())
            .filter(|i| self.dups & (1 << i) != 0)
            .map(|i| TOP[i])
            .collect()
    }

    /// A top-level field, from the cache when it is one of `TOP`.
    fn top_get(&self, key: &str) -> Option<Value<'v>> {
        match TOP.iter().position(|t| *t == key) {
            Some(i) => self.top[i],
            None if self.last => self.root.get_last(key),
            None => self.root.get(key),
        }
    }

    pub fn root(&self) -> Value<'v> {
        self.root
    }

    /// A top-level field or a nested one by its path segments (no array traversal).
    pub fn get(&self, path: &[&str]) -> Option<Value<'v>> {
        let (first, rest) = path.split_first()?;
        let mut v = self.top_get(first)?;
        for seg in rest {
            v = v.get(seg)?;
        }
        Some(v)
    }

    /// A string field; None when missing or not a string.
    pub fn str(&self, path: &[&str]) -> Option<&'v str> {
        self.get(path).and_then(Value::as_str)
    }

    /// Calls `f` on every value at `path`, descending into arrays at any step (so
    /// `resources.ARN` visits the ARN of every resource); stops early when `f` is true.
    pub fn any_at(&self, path: &[String], f: &mut dyn FnMut(Value<'v>) -> bool) -> bool {
        match path.split_first() {
            None => any_at(self.root, path, f),
            Some((first, rest)) => self.top_get(first).is_some_and(|v| any_at(v, rest, f)),
        }
    }

    pub fn event_source(&self) -> Option<&'v str> {
        self.str(&["eventSource"])
    }
    pub fn event_name(&self) -> Option<&'v str> {
        self.str(&["eventName"])
    }
    pub fn event_id(&self) -> Option<&'v str> {
        self.str(&["eventID"])
    }
    pub fn event_time(&self) -> Option<&'v str> {
        self.str(&["eventTime"])
    }
    pub fn region(&self) -> Option<&'v str> {
        self.str(&["awsRegion"])
    }
    pub fn error_code(&self) -> Option<&'v str> {
        self.str(&["errorCode"])
    }
    pub fn source_ip(&self) -> Option<&'v str> {
        self.str(&["sourceIPAddress"])
    }
    pub fn user_agent(&self) -> Option<&'v str> {
        self.str(&["userAgent"])
    }
    pub fn identity_type(&self) -> Option<&'v str> {
        self.str(&["userIdentity", "type"])
    }
    /// The AWS service that called on the principal's behalf, if any.
    pub fn invoked_by(&self) -> Option<&'v str> {
        self.str(&["userIdentity", "invokedBy"])
    }
    pub fn vpc_endpoint(&self) -> Option<&'v str> {
        self.str(&["vpcEndpointId"])
    }

    /// The account whose trail recorded the event (the resource owner's view).
    pub fn account(&self) -> Option<&'v str> {
        self.str(&["recipientAccountId"])
            .or_else(|| self.str(&["userIdentity", "accountId"]))
    }

    /// The caller: its ARN, or for AWS service events the service name.
    pub fn principal(&self) -> Option<&'v str> {
        self.str(&["userIdentity", "arn"])
            .or_else(|| self.invoked_by())
            .or_else(|| self.str(&["userIdentity", "principalId"]))
    }

    /// The role behind an assumed-role session: the stable identity.
    pub fn principal_role(&self) -> Option<&'v str> {
        if self.identity_type() == Some("AssumedRole") {
            self.str(&["userIdentity", "sessionContext", "sessionIssuer", "arn"])
        } else {
            None
        }
    }

    /// KMS key ARNs the event involves: `resources` entries of type `AWS::KMS::Key` (or
    /// untyped `arn:aws:kms` ARNs, as older event versions write them), plus key ids in the
    /// request, made into ARNs with the event's region and account when they are bare.
    pub fn key_arns(&self) -> Vec<String> {
        let mut keys: Vec<String> = Vec::new();
        if let Some(Kind::Array(res)) = self.get(&["resources"]).map(Value::kind) {
            for r in res {
                let arn = r.get("ARN").and_then(Value::as_str);
                let ty = r.get("type").and_then(Value::as_str);
                if let Some(arn) = arn {
                    let is_key = match ty {
                        Some(t) => t == "AWS::KMS::Key",
                        None => arn.starts_with("arn:aws:kms:") && arn.contains(":key/"),
                    };
                    if is_key {
                        keys.push(arn.to_string());
                    }
                }
            }
        }
        for path in [
            &["requestParameters", "keyId"][..],
            &["requestParameters", "destinationKeyId"][..],
            &["requestParameters", "sourceKeyId"][..],
            &["responseElements", "keyId"][..],
            &["responseElements", "keyMetadata", "arn"][..],
        ] {
            if let Some(id) = self.str(path) {
                if let Some(arn) = self.key_arn_for(id) {
                    keys.push(arn);
                }
            }
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// Turns a key reference from a request into an ARN when that is unambiguous.
    pub fn key_arn_for(&self, id: &str) -> Option<String> {
        if id.starts_with("arn:") {
            return (id.contains(":key/")).then(|| id.to_string());
        }
        if id.starts_with("alias/") || id.is_empty() || id.len() > 128 {
            return None;
        }
        let region = self.region()?;
        let account = self.account()?;
        Some(format!("arn:aws:kms:{region}:{account}:key/{id}"))
    }
}

/// A number, or a string holding one (CloudTrail writes some numbers as text).
pub fn as_f64(v: Value<'_>) -> Option<f64> {
    match v.kind() {
        Kind::Num(n) => Some(n),
        Kind::Str(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn any_at<'v>(v: Value<'v>, path: &[String], f: &mut dyn FnMut(Value<'v>) -> bool) -> bool {
    match v.kind() {
        Kind::Array(items) => items.into_iter().any(|item| any_at(item, path, f)),
        _ => match path.split_first() {
            None => f(v),
            Some((seg, rest)) => match v.get(seg) {
                Some(child) => any_at(child, rest, f),
                None => false,
            },
        },
    }
}
