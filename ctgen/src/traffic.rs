//! Ordinary traffic: applications decrypting and generating data keys (directly or
//! through AWS services on their behalf), the rest of a trail (EC2, STS, S3, IAM ...),
//! admins' chores in working hours and a CI role tearing down dev keys.

use crate::json::J;
use crate::time::{hour_of_day, iso};
use crate::world::{assumed, App, Via, ACCT_DEV, ACCT_PROD, REGIONS};
use crate::{arr, obj, Gen};

impl Gen {
    pub(crate) fn normal(&mut self) {
        let weights: Vec<u64> = self.w.apps.iter().map(|a| a.rate).collect();
        let mut t = self.start;
        while t < self.end {
            let hour = hour_of_day(t);
            let diurnal = 0.35 + 0.65 * (1.0 - (hour as f64 - 14.0).abs() / 10.0).max(0.0);
            let total = self.opts.events_per_hour as f64 / 12.0 * diurnal;
            let n_kms = (total * self.opts.kms_share) as usize;
            for _ in 0..n_kms {
                let at = t + self.rng.below(300) as i64;
                let app = self.w.apps[self.rng.weighted(&weights)].clone();
                if self.rng.chance(0.7) {
                    self.decrypt(at, &app, None, None, None);
                } else {
                    self.data_key(at, &app);
                }
                if self.rng.chance(0.0005) {
                    let error = (
                        "AccessDenied",
                        "User is not authorized to perform kms:Decrypt because no identity-based policy allows the kms:Decrypt action".to_string(),
                    );
                    self.decrypt(at, &app, None, None, Some(error));
                }
            }
            for _ in 0..(total as usize).saturating_sub(n_kms) {
                let at = t + self.rng.below(300) as i64;
                let account = if self.rng.chance(0.8) {
                    ACCT_PROD
                } else {
                    ACCT_DEV
                };
                let region = *self.rng.pick(&REGIONS[..2]);
                self.other(at, account, region);
            }
            if (8..18).contains(&hour) && self.rng.chance(0.25) {
                let at = t + self.rng.below(300) as i64;
                self.admin_chore(at);
            }
            if self.rng.chance(0.02) {
                let at = t + self.rng.below(300) as i64;
                self.ci_chore(at);
            }
            t += 300;
        }
    }

    /// A record's common fields.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn base(
        &mut self,
        t: i64,
        ident: J,
        source: &str,
        name: &str,
        region: &str,
        ip: &str,
        ua: &str,
        account: &str,
        read_only: bool,
    ) -> J {
        let mut r = obj! {
            "eventVersion" => if source == "kms.amazonaws.com" { "1.09" } else { "1.08" },
            "userIdentity" => ident,
            "eventTime" => iso(t),
            "eventSource" => source,
            "eventName" => name,
            "awsRegion" => region,
            "sourceIPAddress" => ip,
            "userAgent" => ua,
            "requestParameters" => J::Null,
            "responseElements" => J::Null,
            "requestID" => self.rng.uuid(true),
            "eventID" => self.rng.uuid(true),
            "readOnly" => read_only,
            "eventType" => "AwsApiCall",
            "managementEvent" => true,
            "recipientAccountId" => account,
            "eventCategory" => "Management",
        };
        if !ip.ends_with("amazonaws.com") && ip != "AWS Internal" {
            let host = format!(
                "{}.{region}.amazonaws.com",
                source.split('.').next().unwrap_or(source)
            );
            r.set(
                "tlsDetails",
                obj! {
                    "tlsVersion" => "TLSv1.3",
                    "cipherSuite" => "TLS_AES_128_GCM_SHA256",
                    "clientProvidedHostHeader" => host,
                },
            );
        }
        r
    }

    /// A KMS record of `call` by `ident` (not filed yet: see `Gen::file`).
    pub(crate) fn kms_record(&mut self, t: i64, ident: J, call: Call) -> J {
        let k = self.w.keys[call.key].clone();
        let region = call.region.unwrap_or(k.region);
        let mut r = self.base(
            t,
            ident,
            "kms.amazonaws.com",
            call.name,
            region,
            call.ip,
            call.ua,
            k.account,
            call.read_only,
        );
        r.set("requestParameters", call.params);
        r.set("responseElements", call.response);
        if let Some((code, message)) = call.error {
            r.set("errorCode", code.into());
            r.set("errorMessage", message.into());
        }
        r.set(
            "resources",
            arr![obj! {"accountId" => k.account, "type" => "AWS::KMS::Key", "ARN" => k.arn}],
        );
        r
    }

    /// A KMS record, filed, and returned for the truth file.
    pub(crate) fn kms(&mut self, t: i64, ident: J, call: Call) -> J {
        let r = self.kms_record(t, ident, call);
        self.file(t, r.clone());
        r
    }

    pub(crate) fn decrypt(
        &mut self,
        t: i64,
        app: &App,
        key: Option<usize>,
        ip: Option<&str>,
        error: Option<(&str, String)>,
    ) -> J {
        let key = key.unwrap_or_else(|| *self.rng.pick(&app.keys));
        let ctx = match app.via {
            Via::S3 => {
                obj! {"aws:s3:arn" => format!("arn:aws:s3:::{}-data/objects/{}", app.name, self.rng.below(1_000_000))}
            }
            Via::SecretsManager => obj! {
                "SecretARN" => format!("arn:aws:secretsmanager:{}:{}:secret:{}/db-credentials", app.region, app.account, app.name),
                "SecretVersionId" => self.rng.uuid(true),
            },
            Via::Ebs => {
                obj! {"aws:ebs:id" => format!("vol-{:017x}", crate::rng::fnv(&app.name) & 0xFFF_FFFF_FFFF_FFFF)}
            }
            Via::Direct => obj! {"service" => app.name.as_str(), "purpose" => "record"},
        };
        let mut params =
            obj! {"encryptionContext" => ctx, "encryptionAlgorithm" => "SYMMETRIC_DEFAULT"};
        if self.rng.chance(0.5) || error.is_some() {
            params.set("keyId", self.w.keys[key].arn.clone().into());
        }
        let mut ident = app.ident();
        let on_behalf = match app.via {
            Via::S3 => Some(("s3.amazonaws.com", "s3.amazonaws.com")),
            Via::SecretsManager => Some((
                "secretsmanager.amazonaws.com",
                "secretsmanager.amazonaws.com",
            )),
            Via::Ebs => Some(("ec2.amazonaws.com", "AWS Internal")),
            Via::Direct => None,
        };
        if let (Some((service, ip)), None) = (on_behalf, &error) {
            ident.set("invokedBy", service.into());
            return self.kms(t, ident, Call::new("Decrypt", key, ip, service, params));
        }
        let ip = ip
            .map(str::to_string)
            .unwrap_or_else(|| self.rng.pick(&app.ips).clone());
        let mut call = Call::new("Decrypt", key, &ip, &app.ua, params);
        call.error = error;
        let mut r = self.kms_record(t, ident, call);
        if let Some(v) = &app.vpce {
            r.set("vpcEndpointId", v.into());
        }
        self.file(t, r.clone());
        r
    }

    pub(crate) fn data_key(&mut self, t: i64, app: &App) {
        let key = *self.rng.pick(&app.keys);
        let id = if self.rng.chance(0.5) {
            self.w.keys[key].arn.clone()
        } else {
            self.w.keys[key].id.clone()
        };
        let params = obj! {"keyId" => id, "keySpec" => "AES_256", "encryptionContext" => obj!{"service" => app.name.as_str()}};
        let ip = self.rng.pick(&app.ips).clone();
        let call = Call::new("GenerateDataKey", key, &ip, &app.ua, params);
        self.kms(t, app.ident(), call);
    }

    /// A non-KMS management event: most of a real trail.
    pub(crate) fn other(&mut self, t: i64, account: &str, region: &str) {
        let app = self.rng.pick(&self.w.apps).clone();
        let n = &app.name;
        let choice = self.rng.below(11);
        let (src, name, params) = match choice {
            0 => (
                "ec2.amazonaws.com",
                "DescribeInstances",
                obj! {"instancesSet" => obj!{}, "filterSet" => obj!{"items" => arr![obj!{"name" => "tag:app", "valueSet" => obj!{"items" => arr![obj!{"value" => n.as_str()}]}}]}},
            ),
            1 => (
                "ec2.amazonaws.com",
                "DescribeVolumes",
                obj! {"volumeSet" => obj!{}, "filterSet" => obj!{}},
            ),
            2 => (
                "sts.amazonaws.com",
                "AssumeRole",
                obj! {"roleArn" => format!("arn:aws:iam::{account}:role/{n}"), "roleSessionName" => format!("sess-{}", self.rng.below(1_000_000)), "durationSeconds" => 3600i64},
            ),
            3 => (
                "s3.amazonaws.com",
                "GetBucketAcl",
                obj! {"bucketName" => format!("{n}-data"), "Host" => format!("{n}-data.s3.amazonaws.com"), "acl" => ""},
            ),
            4 => (
                "s3.amazonaws.com",
                "GetBucketEncryption",
                obj! {"bucketName" => format!("{n}-data"), "Host" => format!("{n}-data.s3.amazonaws.com"), "encryption" => ""},
            ),
            5 => (
                "iam.amazonaws.com",
                "GetRole",
                obj! {"roleName" => n.as_str()},
            ),
            6 => (
                "lambda.amazonaws.com",
                "ListFunctions20150331",
                obj! {"maxItems" => 50i64},
            ),
            7 => (
                "ssm.amazonaws.com",
                "GetParameter",
                obj! {"name" => format!("/{n}/config/db-url"), "withDecryption" => true},
            ),
            8 => (
                "monitoring.amazonaws.com",
                "GetMetricData",
                obj! {"startTime" => iso(t - 3600), "endTime" => iso(t), "maxDatapoints" => 1440i64},
            ),
            9 => (
                "logs.amazonaws.com",
                "DescribeLogStreams",
                obj! {"logGroupName" => format!("/aws/ecs/{n}"), "descending" => true, "orderBy" => "LastEventTime"},
            ),
            _ => (
                "secretsmanager.amazonaws.com",
                "GetSecretValue",
                obj! {"secretId" => format!("arn:aws:secretsmanager:{region}:{account}:secret:{n}/db-{:05}", self.rng.below(99_999))},
            ),
        };
        let ip = self.rng.pick(&app.ips).clone();
        let mut r = self.base(
            t,
            app.ident(),
            src,
            name,
            region,
            &ip,
            &app.ua,
            account,
            true,
        );
        if name == "AssumeRole" {
            let session = params
                .get("roleSessionName")
                .and_then(J::as_str)
                .unwrap_or_default()
                .to_string();
            let role_arn = format!("arn:aws:iam::{account}:role/{n}");
            let access = format!(
                "ASIA{}",
                self.rng.uuid(true)[..16].to_uppercase().replace('-', "X")
            );
            let token = format!(
                "IQoJb3JpZ2luX2VjE{}",
                self.rng.uuid(true).replace('-', "").repeat(4)
            );
            r.set(
                "responseElements",
                obj! {
                    "credentials" => obj!{"accessKeyId" => access, "sessionToken" => token, "expiration" => iso(t + 3600)},
                    "assumedRoleUser" => obj!{"assumedRoleId" => format!("AROAXXX:{session}"), "arn" => format!("arn:aws:sts::{account}:assumed-role/{n}/{session}")},
                },
            );
            r.set(
                "resources",
                arr![obj! {"accountId" => account, "type" => "AWS::IAM::Role", "ARN" => role_arn}],
            );
        }
        r.set("requestParameters", params);
        self.file(t, r);
    }

    fn admin_chore(&mut self, t: i64) {
        let adm = self.rng.pick(&self.w.admins).clone();
        let prod = self.w.key_indexes(|k| k.account == ACCT_PROD);
        let key = *self.rng.pick(&prod);
        let kid = self.w.keys[key].id.clone();
        let name = *self.rng.pick(&[
            "DescribeKey",
            "DescribeKey",
            "ListAliases",
            "GetKeyRotationStatus",
            "ListResourceTags",
            "GetKeyPolicy",
            "EnableKeyRotation",
            "TagResource",
            "ListGrants",
        ]);
        let params = match name {
            "ListAliases" => obj! {"limit" => 100i64},
            "TagResource" => {
                obj! {"keyId" => kid, "tags" => arr![obj!{"tagKey" => "owner", "tagValue" => adm.name}]}
            }
            "GetKeyPolicy" => obj! {"keyId" => kid, "policyName" => "default"},
            "EnableKeyRotation" => obj! {"keyId" => kid, "rotationPeriodInDays" => 365i64},
            _ => obj! {"keyId" => kid},
        };
        let read_only = ["Describe", "List", "Get"]
            .iter()
            .any(|p| name.starts_with(p));
        let mut call = Call::new(name, key, &adm.ip, &adm.ua, params);
        call.read_only = read_only;
        self.kms(t, adm.ident(ACCT_PROD), call);
    }

    /// Benign look-alikes: dev keys scheduled for deletion and granted by CI.
    fn ci_chore(&mut self, t: i64) {
        let dev = self.w.key_indexes(|k| k.account == ACCT_DEV);
        let key = *self.rng.pick(&dev);
        let session = format!("terraform-run-{}", self.rng.below(100_000));
        let ident = assumed(ACCT_DEV, self.w.ci.name, self.w.ci.role_id, &session, false);
        let (ip, ua) = (self.w.ci.ip, self.w.ci.ua);
        let k = self.w.keys[key].clone();
        if self.rng.chance(0.5) {
            let params = obj! {"keyId" => k.id, "pendingWindowInDays" => 7i64};
            let response = obj! {"keyId" => k.arn, "deletionDate" => iso(t + 7 * 86_400), "keyState" => "PendingDeletion", "pendingWindowInDays" => 7i64};
            let call = Call::new("ScheduleKeyDeletion", key, ip, ua, params);
            self.kms(t, ident, call.write().response(response));
        } else {
            let grant = format!("{:032x}", self.rng.u128()).repeat(2);
            let params = obj! {"keyId" => k.arn.as_str(), "granteePrincipal" => format!("arn:aws:iam::{ACCT_DEV}:role/ebs-csi"), "operations" => arr!["Decrypt", "GenerateDataKeyWithoutPlaintext", "CreateGrant"]};
            let response = obj! {"grantId" => grant, "keyId" => k.arn.as_str()};
            let call = Call::new("CreateGrant", key, ip, ua, params);
            self.kms(t, ident, call.write().response(response));
        }
    }
}

/// One KMS call as a record describes it.
pub(crate) struct Call<'a> {
    pub name: &'a str,
    pub key: usize,
    pub ip: &'a str,
    pub ua: &'a str,
    pub params: J,
    pub response: J,
    pub error: Option<(&'a str, String)>,
    pub read_only: bool,
    pub region: Option<&'a str>,
}

impl<'a> Call<'a> {
    /// A read-only call without a response or error.
    pub fn new(name: &'a str, key: usize, ip: &'a str, ua: &'a str, params: J) -> Call<'a> {
        Call {
            name,
            key,
            ip,
            ua,
            params,
            response: J::Null,
            error: None,
            read_only: true,
            region: None,
        }
    }

    pub fn write(mut self) -> Self {
        self.read_only = false;
        self
    }

    pub fn response(mut self, response: J) -> Self {
        self.response = response;
        self
    }
}
