//! Injected incidents: each scenario writes its records into the ordinary traffic and
//! returns them with the principal, for `truth.json`.

use crate::json::J;
use crate::time::{hour_of_day, iso, with_hour};
use crate::traffic::Call;
use crate::world::{key_policy, Admin, ACCT_EXT, ACCT_PROD, REGIONS};
use crate::{arr, obj, Gen};

pub const SCENARIOS: [&str; 20] = [
    "key_deletion_scheduled",
    "key_disabled",
    "rotation_disabled",
    "policy_public",
    "policy_cross_account",
    "grant_external",
    "denied_decrypt_burst",
    "decrypt_spike",
    "new_key_for_principal",
    "new_source_ip",
    "new_region",
    "root_kms_usage",
    "import_key_material_deleted",
    "mrk_primary_moved",
    "mrk_replicated_to_new_region",
    "cloudtrail_stopped",
    "kms_events_excluded",
    "custom_key_store_changed",
    "off_hours_admin",
    "reencrypt_to_external_key",
];

type Incident = (Vec<J>, String);

impl Gen {
    pub(crate) fn inject(&mut self, names: &[String]) {
        let span = self.end - self.start;
        let lo = self.start + (span as f64 * self.opts.warmup) as i64;
        for name in names {
            let room = (span as f64 * (1.0 - self.opts.warmup) * 0.8) as u64;
            let mut t = lo + self.rng.below(room.max(1)) as i64;
            if name == "off_hours_admin" {
                t = with_hour(t, 3);
                if t < lo {
                    t += 86_400;
                }
            } else if hour_of_day(t) < 9 && with_hour(t, 9) < self.end - 1200 {
                t = with_hour(t, 9);
            }
            if t >= self.end - 1200 {
                eprintln!("skipped {name}: no room for it after the warm-up; use more --hours");
                continue;
            }
            let (recs, principal) = self.scenario(name, t);
            let mut keys: Vec<String> = recs
                .iter()
                .filter_map(|r| match r.get("resources") {
                    Some(J::Arr(rs)) => Some(rs),
                    _ => None,
                })
                .flatten()
                .filter(|x| x.get("type").and_then(J::as_str) == Some("AWS::KMS::Key"))
                .filter_map(|x| x.get("ARN").and_then(J::as_str).map(str::to_string))
                .collect();
            keys.sort();
            keys.dedup();
            let ids: Vec<J> = recs
                .iter()
                .filter_map(|r| r.get("eventID").cloned())
                .collect();
            let first = recs
                .iter()
                .filter_map(|r| r.get("eventTime").and_then(J::as_str))
                .min()
                .unwrap_or_default()
                .to_string();
            self.truth.push(obj! {
                "scenario" => name.as_str(),
                "eventIDs" => ids,
                "principal" => principal,
                "keyArns" => keys.into_iter().map(J::from).collect::<Vec<J>>(),
                "first_event_time" => first,
            });
        }
    }

    fn scenario(&mut self, name: &str, t: i64) -> Incident {
        match name {
            "key_deletion_scheduled" => {
                let k = self.prod_key(false);
                let (id, arn) = self.id_arn(k);
                let response = obj! {"keyId" => arn, "deletionDate" => iso(t + 7 * 86_400), "keyState" => "PendingDeletion", "pendingWindowInDays" => 7i64};
                self.human(t, "ScheduleKeyDeletion", k, obj! {"keyId" => id, "pendingWindowInDays" => 7i64}, response)
            }
            "key_disabled" => {
                let k = self.prod_key(false);
                let id = self.w.keys[k].id.clone();
                self.human(t, "DisableKey", k, obj! {"keyId" => id}, J::Null)
            }
            "rotation_disabled" => {
                let k = self.prod_key(false);
                let arn = self.w.keys[k].arn.clone();
                self.human(t, "DisableKeyRotation", k, obj! {"keyId" => arn}, J::Null)
            }
            "policy_public" => self.put_policy(t, "*".to_string()),
            "policy_cross_account" => self.put_policy(t, format!("arn:aws:iam::{ACCT_EXT}:root")),
            "off_hours_admin" => {
                self.put_policy(t, format!("arn:aws:iam::{ACCT_PROD}:role/svc-orders-0"))
            }
            "grant_external" => {
                let k = self.prod_key(false);
                let arn = self.w.keys[k].arn.clone();
                let params = obj! {"keyId" => arn.as_str(), "granteePrincipal" => format!("arn:aws:iam::{ACCT_EXT}:role/partner"), "operations" => arr!["Decrypt", "ReEncryptFrom"]};
                let grant = self.rng.uuid(true).replace('-', "").repeat(2);
                self.human(t, "CreateGrant", k, params, obj! {"grantId" => grant, "keyId" => arn})
            }
            "denied_decrypt_burst" => {
                let app = self.rng.pick(&self.w.apps).clone();
                let mut recs = Vec::new();
                for i in 0..35 {
                    let k = self.rng.index(self.w.keys.len());
                    let message = format!("User: {} is not authorized to perform: kms:Decrypt on resource: {} because no resource-based policy allows the kms:Decrypt action", app.arn(), self.w.keys[k].arn);
                    recs.push(self.decrypt(t + i * 7, &app, Some(k), None, Some(("AccessDeniedException", message))));
                }
                (recs, app.arn())
            }
            "decrypt_spike" => {
                let app = self.direct_app(|_| true);
                let per_min = (app.rate / 3).max(60) as i64;
                let n = per_min * 15;
                let recs = (0..n)
                    .map(|i| self.decrypt(t + i * 900 / (per_min * 15), &app, None, None, None))
                    .collect();
                (recs, app.arn())
            }
            "new_key_for_principal" => {
                let app = self.direct_app(|_| true);
                let k = (0..self.w.keys.len())
                    .find(|&i| {
                        let k = &self.w.keys[i];
                        k.high && k.account == ACCT_PROD && !app.keys.contains(&i)
                    })
                    .expect("the world has a sensitive production key");
                let recs = (0..5)
                    .map(|i| self.decrypt(t + i * 20, &app, Some(k), None, None))
                    .collect();
                (recs, app.arn())
            }
            "new_source_ip" => {
                let app = self.direct_app(|_| true);
                let ip = format!("185.220.{}.{}", 100 + self.rng.below(2), 1 + self.rng.below(254));
                let recs = (0..4)
                    .map(|i| self.decrypt(t + i * 30, &app, None, Some(&ip), None))
                    .collect();
                (recs, app.arn())
            }
            "new_region" => {
                let app = self.direct_app(|a| a.region == REGIONS[0]);
                let k = (0..self.w.keys.len())
                    .find(|&i| self.w.keys[i].region == "ap-southeast-2" && self.w.keys[i].account == ACCT_PROD)
                    .expect("the world has a production key in ap-southeast-2");
                let recs = (0..3)
                    .map(|i| self.decrypt(t + i * 30, &app, Some(k), None, None))
                    .collect();
                (recs, app.arn())
            }
            "root_kms_usage" => {
                let k = self.prod_key(false);
                let arn = format!("arn:aws:iam::{ACCT_PROD}:root");
                let ident = obj! {
                    "type" => "Root", "principalId" => ACCT_PROD, "arn" => arn.as_str(), "accountId" => ACCT_PROD,
                    "accessKeyId" => "ASIAROOTEXAMPLE00001",
                    "sessionContext" => obj!{"attributes" => obj!{"creationDate" => iso(t), "mfaAuthenticated" => "false"}},
                };
                let params = obj! {"encryptionAlgorithm" => "SYMMETRIC_DEFAULT", "keyId" => self.w.keys[k].arn.as_str()};
                let r = self.kms(t, ident, Call::new("Decrypt", k, "198.18.44.2", "aws-cli/2.17.0", params));
                (vec![r], arn)
            }
            "import_key_material_deleted" => {
                let k = self.prod_key(false);
                let id = self.w.keys[k].id.clone();
                self.human(t, "DeleteImportedKeyMaterial", k, obj! {"keyId" => id}, J::Null)
            }
            "mrk_primary_moved" => {
                let k = self.mrk();
                let arn = self.w.keys[k].arn.clone();
                self.human(t, "UpdatePrimaryRegion", k, obj! {"keyId" => arn, "primaryRegion" => "ap-southeast-2"}, J::Null)
            }
            "mrk_replicated_to_new_region" => {
                let k = self.mrk();
                let key = self.w.keys[k].clone();
                let params = obj! {"keyId" => key.id.as_str(), "replicaRegion" => "sa-east-1", "bypassPolicyLockoutSafetyCheck" => false};
                let response = obj! {"replicaKeyMetadata" => obj!{"keyId" => key.id.as_str(), "arn" => key.arn.replace(key.region, "sa-east-1"), "keyState" => "Creating", "multiRegion" => true}};
                self.human(t, "ReplicateKey", k, params, response)
            }
            "cloudtrail_stopped" => self.trail(
                t,
                "StopLogging",
                obj! {"name" => format!("arn:aws:cloudtrail:us-east-1:{ACCT_PROD}:trail/org-trail")},
            ),
            "kms_events_excluded" => self.trail(
                t,
                "PutEventSelectors",
                obj! {"trailName" => "org-trail", "eventSelectors" => arr![obj!{"readWriteType" => "All", "includeManagementEvents" => true, "dataResources" => arr![], "excludeManagementEventSources" => arr!["kms.amazonaws.com"]}]},
            ),
            "custom_key_store_changed" => {
                let k = self.prod_key(false);
                let adm = self.rng.pick(&self.w.admins).clone();
                let call = Call::new("DisconnectCustomKeyStore", k, &adm.ip, &adm.ua, obj! {"customKeyStoreId" => "cks-1234567890abcdef0"});
                let mut r = self.kms_record(t, adm.ident(ACCT_PROD), call.write());
                r.remove("resources");
                self.file(t, r.clone());
                (vec![r], admin_arn(&adm))
            }
            "reencrypt_to_external_key" => {
                let app = self.direct_app(|_| true);
                let src = app.keys[0];
                let ext = self.w.ext_key.clone();
                let mut recs = Vec::new();
                for i in 0..10 {
                    let params = obj! {"sourceEncryptionContext" => obj!{"service" => app.name.as_str()}, "destinationKeyId" => ext.arn.as_str(), "destinationEncryptionAlgorithm" => "SYMMETRIC_DEFAULT", "sourceEncryptionAlgorithm" => "SYMMETRIC_DEFAULT"};
                    let call = Call::new("ReEncrypt", src, &app.ips[0], &app.ua, params);
                    let mut r = self.kms_record(t + i, app.ident(), call);
                    if let Some(rs) = r.get_mut("resources") {
                        rs.push(obj! {"accountId" => ACCT_EXT, "type" => "AWS::KMS::Key", "ARN" => ext.arn.as_str()});
                    }
                    self.file(t + i, r.clone());
                    recs.push(r);
                }
                (recs, app.arn())
            }
            other => unreachable!("unknown scenario {other} passed validation"),
        }
    }

    fn prod_key(&mut self, high: bool) -> usize {
        let ks = self
            .w
            .key_indexes(|k| k.account == ACCT_PROD && (!high || k.high));
        *self.rng.pick(&ks)
    }

    fn mrk(&self) -> usize {
        self.w
            .key_indexes(|k| k.mrk)
            .first()
            .copied()
            .expect("the world has a multi-Region key")
    }

    fn id_arn(&self, k: usize) -> (String, String) {
        (self.w.keys[k].id.clone(), self.w.keys[k].arn.clone())
    }

    /// An application that calls KMS itself (not through a service), matching `pred`,
    /// and busy enough to have a baseline by the time incidents start (the detectors
    /// judge nothing new before a principal has history: 50 events over 24 hours).
    fn direct_app(&mut self, pred: impl Fn(&crate::world::App) -> bool) -> crate::world::App {
        let direct = |a: &&crate::world::App| a.via == crate::world::Via::Direct && pred(a);
        let mut apps: Vec<_> = self
            .w
            .apps
            .iter()
            .filter(direct)
            .filter(|a| a.rate >= 120)
            .cloned()
            .collect();
        if apps.is_empty() {
            apps = self.w.apps.iter().filter(direct).cloned().collect();
        }
        self.rng.pick(&apps).clone()
    }

    fn human(&mut self, t: i64, name: &str, key: usize, params: J, response: J) -> Incident {
        let adm = self.rng.pick(&self.w.admins).clone();
        let call = Call::new(name, key, &adm.ip, &adm.ua, params)
            .write()
            .response(response);
        let r = self.kms(t, adm.ident(ACCT_PROD), call);
        (vec![r], admin_arn(&adm))
    }

    fn put_policy(&mut self, t: i64, principal: String) -> Incident {
        let k = self.prod_key(false);
        let id = self.w.keys[k].id.clone();
        let params = obj! {"keyId" => id, "policyName" => "default", "policy" => key_policy(&principal, None).indented(), "bypassPolicyLockoutSafetyCheck" => false};
        self.human(t, "PutKeyPolicy", k, params, J::Null)
    }

    fn trail(&mut self, t: i64, name: &str, params: J) -> Incident {
        let adm = self.rng.pick(&self.w.admins).clone();
        let mut r = self.base(
            t,
            adm.ident(ACCT_PROD),
            "cloudtrail.amazonaws.com",
            name,
            REGIONS[0],
            &adm.ip,
            &adm.ua,
            ACCT_PROD,
            false,
        );
        r.set("requestParameters", params);
        r.set(
            "resources",
            arr![obj! {"accountId" => ACCT_PROD, "type" => "AWS::CloudTrail::Trail", "ARN" => format!("arn:aws:cloudtrail:us-east-1:{ACCT_PROD}:trail/org-trail")}],
        );
        self.file(t, r.clone());
        (vec![r], admin_arn(&adm))
    }
}

fn admin_arn(adm: &Admin) -> String {
    format!(
        "arn:aws:sts::{ACCT_PROD}:assumed-role/{}/{}@example.com",
        adm.role, adm.name
    )
}
