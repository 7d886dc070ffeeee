//! SQS message bodies that announce new CloudTrail files, in every form AWS sends them:
//! S3 event notifications (several records; keys form-URL-encoded, `+` is a space),
//! CloudTrail's own SNS notification (`s3Bucket` + `s3ObjectKey` list), either raw or in
//! an SNS envelope, SNS-wrapped S3 events, EventBridge "Object Created" events (keys not
//! encoded), and `s3:TestEvent`. Pure parsing: no I/O.

use serde_json::Value;

/// One S3 object a message announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub bucket: String,
    pub key: String,
    pub etag: Option<String>,
    pub size: Option<u64>,
    /// When S3 (or EventBridge) says the object was created.
    pub event_time: Option<String>,
}

impl ObjectRef {
    /// The ledger key: bucket, key and ETag (a rewritten object is a new file).
    pub fn ledger_key(&self) -> String {
        self.ledger_key_with(self.etag.as_deref())
    }

    /// The ledger key for a given ETag, without quotes (S3 events omit them, GetObject
    /// adds them).
    pub fn ledger_key_with(&self, etag: Option<&str>) -> String {
        let etag = etag
            .map(|e| e.trim_matches('"'))
            .filter(|e| !e.is_empty())
            .unwrap_or("-");
        format!("s3:{}/{}:{}", self.bucket, self.key, etag)
    }

    /// The ledger entry of the object whatever its ETag: CloudTrail never rewrites a log
    /// file, so a notification without an ETag (CloudTrail's SNS form) is matched by it.
    pub fn key_entry(&self) -> String {
        format!("s3key:{}/{}", self.bucket, self.key)
    }

    pub fn is_digest(&self) -> bool {
        crate::source::files::is_digest(&self.key)
    }

    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// What a message body says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Objects to read (digest files already dropped; may be empty).
    Objects(Vec<ObjectRef>),
    /// `s3:TestEvent`, sent when notifications are configured: acknowledge and ignore.
    Test,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoticeError {
    #[error("message body is not JSON ({0})")]
    NotJson(String),
    #[error("message body is JSON but not an S3, SNS, CloudTrail or EventBridge notification (top-level keys: {0})")]
    Unknown(String),
    #[error("notification lacks {0}")]
    Missing(&'static str),
}

/// Parses an SQS message body.
pub fn parse_body(body: &str) -> Result<Notice, NoticeError> {
    let v: Value = serde_json::from_str(body).map_err(|e| NoticeError::NotJson(e.to_string()))?;
    parse_value(&v, 0)
}

fn parse_value(v: &Value, depth: u8) -> Result<Notice, NoticeError> {
    let obj = v
        .as_object()
        .ok_or_else(|| NoticeError::Unknown("(not an object)".into()))?;
    // SNS envelope: the payload is a JSON string in `Message`.
    if obj.get("Type").and_then(Value::as_str) == Some("Notification") && depth < 2 {
        let msg = obj
            .get("Message")
            .and_then(Value::as_str)
            .ok_or(NoticeError::Missing("SNS `Message`"))?;
        let inner: Value = serde_json::from_str(msg)
            .map_err(|e| NoticeError::NotJson(format!("SNS Message: {e}")))?;
        return parse_value(&inner, depth + 1);
    }
    if obj.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        return Ok(Notice::Test);
    }
    // S3 event notification.
    if let Some(records) = obj.get("Records").and_then(Value::as_array) {
        let mut out = Vec::new();
        for r in records {
            let Some(name) = r.get("eventName").and_then(Value::as_str) else {
                continue;
            };
            if !name.starts_with("ObjectCreated") {
                continue;
            }
            let s3 = r
                .get("s3")
                .ok_or(NoticeError::Missing("`s3` in an S3 event record"))?;
            let bucket = s3
                .pointer("/bucket/name")
                .and_then(Value::as_str)
                .ok_or(NoticeError::Missing("`s3.bucket.name`"))?;
            let raw_key = s3
                .pointer("/object/key")
                .and_then(Value::as_str)
                .ok_or(NoticeError::Missing("`s3.object.key`"))?;
            out.push(ObjectRef {
                bucket: bucket.to_string(),
                key: form_urldecode(raw_key),
                etag: s3
                    .pointer("/object/eTag")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                size: s3.pointer("/object/size").and_then(Value::as_u64),
                event_time: r
                    .get("eventTime")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            });
        }
        return Ok(objects(out));
    }
    // CloudTrail's own SNS notification.
    if let Some(keys) = obj.get("s3ObjectKey") {
        let bucket = obj
            .get("s3Bucket")
            .and_then(Value::as_str)
            .ok_or(NoticeError::Missing("`s3Bucket`"))?;
        let keys: Vec<&str> = match keys {
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            Value::String(s) => vec![s.as_str()],
            _ => return Err(NoticeError::Missing("`s3ObjectKey` as a list of keys")),
        };
        return Ok(objects(
            keys.into_iter()
                .map(|k| ObjectRef {
                    bucket: bucket.to_string(),
                    key: k.to_string(),
                    etag: None,
                    size: None,
                    event_time: None,
                })
                .collect(),
        ));
    }
    // EventBridge.
    if obj.get("source").and_then(Value::as_str) == Some("aws.s3") {
        if obj.get("detail-type").and_then(Value::as_str) != Some("Object Created") {
            return Ok(Notice::Objects(Vec::new()));
        }
        let d = obj
            .get("detail")
            .ok_or(NoticeError::Missing("EventBridge `detail`"))?;
        let bucket = d
            .pointer("/bucket/name")
            .and_then(Value::as_str)
            .ok_or(NoticeError::Missing("`detail.bucket.name`"))?;
        let key = d
            .pointer("/object/key")
            .and_then(Value::as_str)
            .ok_or(NoticeError::Missing("`detail.object.key`"))?;
        return Ok(objects(vec![ObjectRef {
            bucket: bucket.to_string(),
            key: key.to_string(),
            etag: d
                .pointer("/object/etag")
                .and_then(Value::as_str)
                .map(str::to_string),
            size: d.pointer("/object/size").and_then(Value::as_u64),
            event_time: obj.get("time").and_then(Value::as_str).map(str::to_string),
        }]));
    }
    let keys: Vec<&str> = obj.keys().map(String::as_str).take(8).collect();
    Err(NoticeError::Unknown(keys.join(", ")))
}

fn objects(all: Vec<ObjectRef>) -> Notice {
    Notice::Objects(all.into_iter().filter(|o| !o.is_digest()).collect())
}

/// Decodes `application/x-www-form-urlencoded` text: `+` is a space, `%XX` a byte.
pub fn form_urldecode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_decoding() {
        assert_eq!(form_urldecode("a%2Fb+c%C3%BC"), "a/b cü");
        assert_eq!(form_urldecode("100%"), "100%");
        assert_eq!(form_urldecode("%zz"), "%zz");
    }

    #[test]
    fn forms() {
        let s3 = r#"{"Records":[{"eventName":"ObjectCreated:Put","eventTime":"t","s3":{"bucket":{"name":"b"},"object":{"key":"AWSLogs/odd+name%2Bplus+%C3%BC.json.gz","eTag":"e","size":3}}},
                   {"eventName":"ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"AWSLogs/1/CloudTrail-Digest/x.json.gz"}}}]}"#;
        match parse_body(s3).unwrap() {
            Notice::Objects(o) => {
                assert_eq!(o.len(), 1, "digest dropped");
                assert_eq!(o[0].key, "AWSLogs/odd name+plus ü.json.gz");
                assert_eq!(o[0].ledger_key(), "s3:b/AWSLogs/odd name+plus ü.json.gz:e");
            }
            t => panic!("{t:?}"),
        }
        let ct = r#"{"s3Bucket":"b","s3ObjectKey":["k1","k2"]}"#;
        let sns = serde_json::json!({"Type":"Notification","Message": ct}).to_string();
        for body in [ct, sns.as_str()] {
            assert!(
                matches!(parse_body(body).unwrap(), Notice::Objects(o) if o.len() == 2 && o[1].key == "k2")
            );
        }
        let sns_s3 = serde_json::json!({"Type":"Notification","Message": s3}).to_string();
        assert!(matches!(parse_body(&sns_s3).unwrap(), Notice::Objects(o) if o.len() == 1));
        let eb = r#"{"source":"aws.s3","detail-type":"Object Created","time":"t","detail":{"bucket":{"name":"b"},"object":{"key":"a b+c.json.gz","etag":"x"}}}"#;
        assert!(
            matches!(parse_body(eb).unwrap(), Notice::Objects(o) if o[0].key == "a b+c.json.gz")
        );
        assert_eq!(
            parse_body(r#"{"Service":"Amazon S3","Event":"s3:TestEvent"}"#).unwrap(),
            Notice::Test
        );
        assert!(matches!(parse_body("nope"), Err(NoticeError::NotJson(_))));
        assert!(
            matches!(parse_body(r#"{"hello":1}"#), Err(NoticeError::Unknown(k)) if k == "hello")
        );
        assert_eq!(
            parse_body(r#"{"Records":[]}"#).unwrap(),
            Notice::Objects(vec![])
        );
    }
}
