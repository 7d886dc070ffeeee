//! The population a corpus is made of: accounts, keys (some multi-Region, some tagged
//! highly sensitive), application roles with stable keys, IPs and user agents (a share of
//! them reaching KMS through AWS services on their behalf), human admins and a CI role.

use crate::json::J;
use crate::rng::{fnv, uuid_text, Rng};
use crate::{arr, obj};

pub const ACCT_PROD: &str = "111122223333";
pub const ACCT_DEV: &str = "444455556666";
pub const ACCT_EXT: &str = "999988887777";
pub const ORG_ID: &str = "o-a1b2c3d4e5";
pub const REGIONS: [&str; 3] = ["us-east-1", "eu-west-1", "ap-southeast-2"];
const ROLE_ID_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

#[derive(Clone, Debug)]
pub struct Key {
    pub id: String,
    pub arn: String,
    pub account: &'static str,
    pub region: &'static str,
    pub mrk: bool,
    pub high: bool,
}

/// How an application reaches KMS when an AWS service calls on its behalf.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Via {
    /// Calls KMS itself.
    Direct,
    /// Objects under SSE-KMS: S3 calls Decrypt/GenerateDataKey with `invokedBy`.
    S3,
    /// Secrets Manager decrypts the app's secrets.
    SecretsManager,
    /// EBS volumes of its instances: EC2 decrypts data keys (`AWS Internal`).
    Ebs,
}

#[derive(Clone, Debug)]
pub struct App {
    pub name: String,
    pub account: &'static str,
    pub region: &'static str,
    pub role_id: String,
    pub keys: Vec<usize>,
    pub ips: Vec<String>,
    pub vpce: Option<String>,
    pub ua: String,
    pub rate: u64,
    pub via: Via,
}

#[derive(Clone, Debug)]
pub struct Admin {
    pub name: &'static str,
    pub role: &'static str,
    pub role_id: String,
    pub ip: String,
    pub ua: String,
}

pub struct Ci {
    pub name: &'static str,
    pub role_id: &'static str,
    pub ip: &'static str,
    pub ua: &'static str,
}

pub struct World {
    pub keys: Vec<Key>,
    pub ext_key: Key,
    pub apps: Vec<App>,
    pub admins: Vec<Admin>,
    pub ci: Ci,
}

impl World {
    pub fn new(rng: &mut Rng, service_traffic: bool) -> World {
        let mut keys = Vec::new();
        for i in 0..50 {
            let account = if i % 5 == 4 { ACCT_DEV } else { ACCT_PROD };
            let region = if i % 3 != 0 {
                REGIONS[0]
            } else {
                REGIONS[i % 2 + 1]
            };
            let mrk = i % 10 == 0;
            let id = if mrk {
                format!("mrk-{:032x}", rng.u128())
            } else {
                uuid_text(rng.u128())
            };
            keys.push(Key {
                arn: format!("arn:aws:kms:{region}:{account}:key/{id}"),
                id,
                account,
                region,
                mrk,
                high: i % 7 == 0,
            });
        }
        let ext_id = uuid_text(rng.u128());
        let ext_key = Key {
            arn: format!("arn:aws:kms:us-east-1:{ACCT_EXT}:key/{ext_id}"),
            id: ext_id,
            account: ACCT_EXT,
            region: REGIONS[0],
            mrk: false,
            high: false,
        };
        let prod: Vec<usize> = (0..keys.len())
            .filter(|&i| keys[i].account == ACCT_PROD)
            .collect();
        let mut apps = Vec::new();
        let names = ["orders", "billing", "ledger", "search", "media", "auth"];
        for i in 0..30 {
            let region = if i % 4 != 0 { REGIONS[0] } else { REGIONS[1] };
            let mut local: Vec<usize> = prod
                .iter()
                .copied()
                .filter(|&k| keys[k].region == region && !keys[k].high)
                .collect();
            if local.is_empty() {
                local = prod.clone();
            }
            let n = 1 + rng.index(3);
            let keys_of_app: Vec<usize> = rng
                .sample(local.len(), n.min(local.len()))
                .into_iter()
                .map(|j| local[j])
                .collect();
            let ips = (0..1 + rng.index(3))
                .map(|_| {
                    format!(
                        "10.{}.{}.{}",
                        rng.below(256),
                        rng.below(256),
                        1 + rng.below(254)
                    )
                })
                .collect();
            let vpce =
                (i % 3 == 0).then(|| format!("vpce-{:017x}", rng.u64() & 0x0FFF_FFFF_FFFF_FFFF));
            let ua_templates = [
                "aws-sdk-java/2.25.{} Linux/5.10.217 OpenJDK_64-Bit_Server_VM/17.0.11 vendor/Amazon.com_Inc. io/sync http/Apache cfg/retry-mode/standard",
                "Boto3/1.34.{} md/Botocore#1.34.{} ua/2.0 os/linux#5.10 md/arch#x86_64 lang/python#3.11.8 cfg/retry-mode#legacy Botocore/1.34.{}",
                "aws-sdk-go-v2/1.30.{} os/linux lang/go#1.22.5 md/GOOS#linux md/GOARCH#amd64 api/kms#1.35.{}",
            ];
            let ua = rng
                .pick(&ua_templates)
                .replace("{}", &(1 + rng.below(89)).to_string());
            let rate = *rng.pick(&[20, 60, 120, 300, 600]);
            let via = if i % 5 == 0 {
                Via::S3
            } else if service_traffic && i % 7 == 3 {
                Via::SecretsManager
            } else if service_traffic && i % 7 == 5 {
                Via::Ebs
            } else {
                Via::Direct
            };
            apps.push(App {
                name: format!("svc-{}-{i}", names[i % 6]),
                account: ACCT_PROD,
                region,
                role_id: format!("AROA{}", rng.string(ROLE_ID_CHARS, 17)),
                keys: keys_of_app,
                ips,
                vpce,
                ua,
                rate,
                via,
            });
        }
        let mut admins = Vec::new();
        for (i, name) in ["alice", "bob", "chen", "dana", "eve-ops"]
            .into_iter()
            .enumerate()
        {
            admins.push(Admin {
                name,
                role: "AWSReservedSSO_AdministratorAccess_0123456789abcdef",
                role_id: format!("AROA{}", rng.string(ROLE_ID_CHARS, 17)),
                ip: format!("203.0.113.{}", 10 + i),
                ua: if i % 2 == 1 {
                    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36".into()
                } else {
                    format!("aws-cli/2.17.{} Python/3.11.9 Darwin/23.5.0 exe/x86_64 prompt/off command/kms.describe-key", 10 + i)
                },
            });
        }
        World {
            keys,
            ext_key,
            apps,
            admins,
            ci: Ci {
                name: "ci-deployer",
                role_id: "AROACIDEPLOYER0000001",
                ip: "198.51.100.7",
                ua: "aws-sdk-go-v2/1.30.3 os/linux lang/go#1.22.5 md/GOOS#linux md/GOARCH#amd64 exec-env/terraform",
            },
        }
    }

    pub fn key_indexes(&self, pred: impl Fn(&Key) -> bool) -> Vec<usize> {
        (0..self.keys.len())
            .filter(|&i| pred(&self.keys[i]))
            .collect()
    }
}

/// An assumed-role `userIdentity`.
pub fn assumed(account: &str, role: &str, role_id: &str, session: &str, mfa: bool) -> J {
    obj! {
        "type" => "AssumedRole",
        "principalId" => format!("{role_id}:{session}"),
        "arn" => format!("arn:aws:sts::{account}:assumed-role/{role}/{session}"),
        "accountId" => account,
        "accessKeyId" => format!("ASIA{:016X}", fnv(&format!("{role}{session}"))),
        "sessionContext" => obj! {
            "sessionIssuer" => obj! {
                "type" => "Role",
                "principalId" => role_id,
                "arn" => format!("arn:aws:iam::{account}:role/{role}"),
                "accountId" => account,
                "userName" => role,
            },
            "webIdFederationData" => obj! {},
            "attributes" => obj! {
                "creationDate" => "2026-01-01T00:00:00Z",
                "mfaAuthenticated" => if mfa { "true" } else { "false" },
            },
        },
    }
}

impl App {
    /// The instance session an app's role runs as (stable per app).
    pub fn session(&self) -> String {
        format!("i-{:012x}", fnv(&self.name) % 1_000_000_000_000)[..14].to_string()
    }

    pub fn ident(&self) -> J {
        assumed(
            self.account,
            &self.name,
            &self.role_id,
            &self.session(),
            false,
        )
    }

    pub fn arn(&self) -> String {
        format!(
            "arn:aws:sts::{}:assumed-role/{}/{}",
            self.account,
            self.name,
            self.session()
        )
    }
}

impl Admin {
    pub fn ident(&self, account: &str) -> J {
        assumed(
            account,
            self.role,
            &self.role_id,
            &format!("{}@example.com", self.name),
            true,
        )
    }
}

/// A policy document with the account's root as admin and one more principal allowed to
/// use the key (optionally under conditions).
pub fn key_policy(principal: &str, conditions: Option<J>) -> J {
    let mut use_stmt = obj! {
        "Sid" => "Allow use",
        "Effect" => "Allow",
        "Principal" => obj! {"AWS" => principal},
        "Action" => arr!["kms:Decrypt", "kms:DescribeKey"],
        "Resource" => "*",
    };
    if let Some(c) = conditions {
        use_stmt.set("Condition", c);
    }
    obj! {
        "Version" => "2012-10-17",
        "Id" => "key-policy",
        "Statement" => arr![
            obj! {
                "Sid" => "Enable IAM User Permissions",
                "Effect" => "Allow",
                "Principal" => obj! {"AWS" => format!("arn:aws:iam::{ACCT_PROD}:root")},
                "Action" => "kms:*",
                "Resource" => "*",
            },
            use_stmt,
        ],
    }
}
