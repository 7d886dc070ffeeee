//! The alert channels as one outbox sink (`outbox::Sink::Alerts`): takes findings from
//! the outbox, runs them through each channel's `Router` (filters, grouping, digest,
//! rate limit), and answers with state writes that the outbox commits in the same
//! transaction that removes the consumed findings: the routers' new state and one
//! `queue` entry per alert made. So a crash either happened before (the findings are
//! offered again to the state that had not seen them) or after (they are gone and their
//! alerts are queued): nothing is lost or counted twice. Timed outputs (a group's wait,
//! a closing window, a digest, a rate-limit notice) come from `deliver` with an empty
//! batch, which the outbox calls when `tick_due` says so.
//!
//! The routers live in memory between batches, with a version number that is committed
//! with their state; a batch whose commit failed leaves the stored version behind, and
//! the next batch reloads the routers from the store instead of building on state that
//! was never written.

use super::config::ChannelConfig;
use super::dispatch::Descriptions;
use super::queue::{self, QueuedAlert, QUEUE_TREE};
use super::route::{Router, RouterState};
use super::Alert;
use crate::analyze::finding::Finding;
use crate::outbox::{Delivery, DeliveryError};
use crate::store::{decode, encode, StateWrite, Store, StoreError};
use crate::telemetry::Metrics;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Router state per channel name, and `VERSION_KEY`.
pub const ROUTERS_TREE: &str = "alert-routers";
/// Cannot be a channel name (those are letters, digits, `-` and `_`).
const VERSION_KEY: &str = "#version";
/// Commit times remembered for the latency figure.
const MAX_COMMIT_TIMES: usize = 50_000;

/// The routing half of the alert channels (delivery is `queue::run_channel`).
pub struct AlertsSink {
    store: Store,
    channels: Vec<ChannelConfig>,
    descriptions: Descriptions,
    metrics: Arc<Metrics>,
    routing: Mutex<Routing>,
    /// Finding id -> unix ms of its commit (this process only), for latency.
    committed: Mutex<HashMap<String, u64>>,
}

struct Routing {
    routers: Vec<Router>,
    /// The version this memory state builds on (as last committed, or loaded).
    version: u64,
    /// The serialized state last written per channel, to skip unchanged writes.
    written: Vec<Vec<u8>>,
}

impl AlertsSink {
    /// Loads the routers' saved state (a channel new in the config starts empty; state
    /// of a channel no longer configured is left alone).
    pub fn open(
        store: Store,
        channels: Vec<ChannelConfig>,
        descriptions: Descriptions,
        metrics: Arc<Metrics>,
    ) -> Result<AlertsSink, StoreError> {
        let routing = Self::load(&store, &channels)?;
        Ok(AlertsSink {
            store,
            channels,
            descriptions,
            metrics,
            routing: Mutex::new(routing),
            committed: Mutex::new(HashMap::new()),
        })
    }

    fn load(store: &Store, channels: &[ChannelConfig]) -> Result<Routing, StoreError> {
        let tree = store.tree(ROUTERS_TREE)?;
        let mut routers = Vec::new();
        let mut written = Vec::new();
        for c in channels {
            let (state, bytes) = match tree.get(c.name().as_bytes())? {
                Some(v) => (
                    decode::<RouterState>(ROUTERS_TREE, c.name(), &v)?,
                    v.to_vec(),
                ),
                None => (RouterState::default(), Vec::new()),
            };
            routers.push(Router::with_state(c.name(), c.route().clone(), state));
            written.push(bytes);
        }
        Ok(Routing {
            routers,
            version: stored_version(store)?,
            written,
        })
    }

    pub fn channel_names(&self) -> Vec<String> {
        self.channels.iter().map(|c| c.name().to_string()).collect()
    }

    /// Whether some channel wants the finding (decided when it is committed).
    pub fn accepts(&self, f: &Finding) -> bool {
        self.channels
            .iter()
            .any(|c| wanted(c.name(), f) && c.route().accepts(f))
    }

    /// Remembers when findings were committed (for the latency of their alerts).
    pub fn note_committed(&self, findings: &[Finding]) {
        let now = queue::unix_ms(SystemTime::now());
        let mut m = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() + findings.len() > MAX_COMMIT_TIMES {
            m.clear();
        }
        for f in findings {
            m.entry(f.id.clone()).or_insert(now);
        }
    }

    /// Whether a router has something due at `now` (a wait over, a window closed...).
    pub fn tick_due(&self, now: SystemTime) -> bool {
        let r = self.routing.lock().unwrap_or_else(|e| e.into_inner());
        r.routers
            .iter()
            .any(|r| r.next_deadline().is_some_and(|d| d <= now))
    }

    /// Routes a batch (or, when empty, just the clock) and answers with the writes to
    /// commit together with the removal of the batch: router states and queued alerts.
    pub fn deliver(&self, batch: &[Finding], now: SystemTime) -> Result<Delivery, DeliveryError> {
        let store_err = |e: StoreError| DeliveryError::Transient(format!("alert routing: {e}"));
        let mut r = self.routing.lock().unwrap_or_else(|e| e.into_inner());
        let stored = stored_version(&self.store).map_err(store_err)?;
        if stored != r.version {
            // The last batch's commit did not happen: start again from what is stored.
            *r = Self::load(&self.store, &self.channels).map_err(store_err)?;
        }
        let mut alerts: Vec<(usize, Alert)> = Vec::new();
        let suppressed_before: Vec<u64> = r.routers.iter().map(Router::suppressed_total).collect();
        for (i, router) in r.routers.iter_mut().enumerate() {
            if batch.is_empty() {
                alerts.extend(router.tick(now).into_iter().map(|a| (i, a)));
            }
            for f in batch {
                if wanted(router.channel(), f) {
                    alerts.extend(router.offer(f, now).into_iter().map(|a| (i, a)));
                } else {
                    alerts.extend(router.tick(now).into_iter().map(|a| (i, a)));
                }
            }
        }
        let mut state = Vec::new();
        let committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        let now_ms = queue::unix_ms(now);
        for (i, mut alert) in alerts {
            if alert.description.is_none() {
                alert.description = self.descriptions.get(&alert.finding.rule).cloned();
            }
            let name = self.channels[i].name();
            let key = queue::queue_key(&self.store, name).map_err(store_err)?;
            let q = QueuedAlert {
                committed_ms: committed.get(&alert.finding.id).copied(),
                alert,
                queued_ms: now_ms,
                attempts: 0,
                next_attempt_ms: 0,
                last_error: None,
                parked_ms: None,
            };
            state.push(StateWrite::put(QUEUE_TREE, key, encode(&q)));
        }
        drop(committed);
        let Routing {
            routers, written, ..
        } = &mut *r;
        for (i, router) in routers.iter().enumerate() {
            let bytes = encode(&router.state());
            if bytes != written[i] {
                state.push(StateWrite::put(
                    ROUTERS_TREE,
                    router.channel(),
                    bytes.clone(),
                ));
                written[i] = bytes;
            }
            let suppressed = router.suppressed_total() - suppressed_before[i];
            if suppressed > 0 {
                self.metrics
                    .alert(router.channel(), |s| s.suppressed += suppressed);
            }
        }
        if !state.is_empty() {
            r.version += 1;
            state.push(StateWrite::put(
                ROUTERS_TREE,
                VERSION_KEY,
                r.version.to_be_bytes().to_vec(),
            ));
        }
        Ok(Delivery {
            accepted: batch.len(),
            follow_ups: Vec::new(),
            state,
        })
    }
}

/// Whether `f` may go to `channel`: not a report about that very channel's parked
/// alerts (it could not deliver it, and parking it would report it again, forever).
fn wanted(channel: &str, f: &Finding) -> bool {
    !(f.rule == queue::PARKED_RULE && f.file == queue::parked_subject(channel))
}

fn stored_version(store: &Store) -> Result<u64, StoreError> {
    Ok(store
        .tree(ROUTERS_TREE)?
        .get(VERSION_KEY)?
        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::act::config::AlertsFile;
    use crate::outbox;
    use std::time::Duration;

    fn channels() -> Vec<ChannelConfig> {
        let text = "[[sinks.webhook]]\nname = \"hook\"\nurl = \"http://127.0.0.1:9/h\"\nsecret_env = \"S\"\ngroup_by = [\"rule\"]\ngroup_wait = \"1m\"\n";
        let f: AlertsFile = toml::from_str(text).unwrap();
        f.sinks.validate().unwrap()
    }

    fn finding(id: &str) -> Finding {
        let mut f = queue::parked_finding("x", id, 0);
        f.id = id.to_string();
        f.rule = "r".into();
        f.file = String::new();
        f
    }

    fn open(store: &Store) -> AlertsSink {
        AlertsSink::open(
            store.clone(),
            channels(),
            Descriptions::new(),
            Arc::new(Metrics::default()),
        )
        .unwrap()
    }

    fn commit(store: &Store, d: Delivery) {
        outbox::delivered(store, &[], Vec::new(), &[], d.state).unwrap();
    }

    fn queued(store: &Store) -> Vec<QueuedAlert> {
        queue::pending(store)
            .unwrap()
            .into_iter()
            .map(|p| {
                let v = store
                    .tree(QUEUE_TREE)
                    .unwrap()
                    .get(&p.key)
                    .unwrap()
                    .unwrap();
                decode(QUEUE_TREE, &p.key, &v).unwrap()
            })
            .collect()
    }

    #[test]
    fn group_state_survives_a_restart_and_a_lost_commit_is_not_counted() {
        let store = Store::temporary().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
        let sink = open(&store);
        let d = sink.deliver(&[finding("a"), finding("b")], t0).unwrap();
        assert_eq!(d.accepted, 2);
        assert!(!d.state.is_empty(), "the router state changed");
        commit(&store, d);
        // A batch whose commit never happens (a crash, a store error)...
        let lost = sink.deliver(&[finding("c")], t0).unwrap();
        drop(lost);
        // ...is not built upon: the next call reloads the committed state.
        commit(&store, sink.deliver(&[finding("d")], t0).unwrap());
        drop(sink);
        // A restart: the group (3 committed findings) is still waiting for its alert.
        let sink = open(&store);
        assert!(queued(&store).is_empty());
        assert!(!sink.tick_due(t0 + Duration::from_secs(59)));
        assert!(sink.tick_due(t0 + Duration::from_secs(60)));
        commit(
            &store,
            sink.deliver(&[], t0 + Duration::from_secs(60)).unwrap(),
        );
        let q = queued(&store);
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].alert.group.count, 3, "a, b and d; not the lost c");
        assert_eq!(q[0].alert.channel, "hook");
        // Nothing more is due, and an idle tick writes nothing.
        let d = sink.deliver(&[], t0 + Duration::from_secs(61)).unwrap();
        assert!(d.state.is_empty());
    }

    #[test]
    fn a_channels_own_parking_notice_does_not_go_back_to_it() {
        let store = Store::temporary().unwrap();
        let sink = open(&store);
        let mut f = queue::parked_finding("hook", "s", 0);
        f.severity = crate::analyze::finding::Severity::Critical;
        assert!(!sink.accepts(&f));
        assert!(sink.accepts(&queue::parked_finding("mail", "s", 0)));
    }
}
