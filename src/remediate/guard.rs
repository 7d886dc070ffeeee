//! The brakes on remediation: the per-account hourly rate limit and the circuit breaker
//! (consecutive failed actions stop remediation for a cooldown). Both are kept in the
//! store tree `remediation` (`rate/<account>`: the action times of the last hour;
//! `breaker`: the failure count and when it opened), so a restart or a crash loop
//! neither resets the budget nor closes an open breaker. Times are Unix seconds, passed
//! in, so the logic is tested without a clock.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

/// Actions taken per account in the last hour.
#[derive(Debug, Default)]
pub(super) struct RateLimiter {
    taken: HashMap<String, VecDeque<i64>>,
}

impl RateLimiter {
    /// Takes a slot for `account` at `now` if fewer than `max` were taken in the hour.
    pub(super) fn take(&mut self, account: &str, now: i64, max: u32) -> bool {
        let q = self.taken.entry(account.to_string()).or_default();
        while q.front().is_some_and(|t| *t <= now - 3600) {
            q.pop_front();
        }
        if q.len() >= max as usize {
            return false;
        }
        q.push_back(now);
        true
    }
}

/// Stops acting after `limit` consecutive failed actions, for a cooldown.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Breaker {
    consecutive: u32,
    /// When it opened (Unix seconds); the cooldown is counted from here, with the
    /// configured length, so changing it takes effect at the next start.
    opened_at: Option<i64>,
}

impl Breaker {
    /// Whether it is open at `now`; closes it (and resets the count) when the cooldown
    /// is over.
    pub(super) fn is_open(&mut self, now: i64, cooldown: Duration) -> bool {
        match self.opened_at {
            Some(t) if now < t + cooldown.as_secs() as i64 => true,
            Some(_) => {
                *self = Breaker::default();
                false
            }
            None => false,
        }
    }

    /// Until when it stays open (Unix seconds), if it is open.
    pub(super) fn open_until(&self, cooldown: Duration) -> Option<i64> {
        self.opened_at.map(|t| t + cooldown.as_secs() as i64)
    }

    /// Records an outcome; true when this failure opened the breaker.
    pub(super) fn record(&mut self, failed: bool, limit: u32, now: i64) -> bool {
        if !failed {
            self.consecutive = 0;
            return false;
        }
        self.consecutive += 1;
        if self.consecutive >= limit && self.opened_at.is_none() {
            self.opened_at = Some(now);
            return true;
        }
        false
    }
}

/// The rate limiter and the breaker, with their store tree.
pub(super) struct Guards {
    limiter: Mutex<RateLimiter>,
    breaker: Mutex<Breaker>,
    tree: Option<sled::Tree>,
}

const BREAKER_KEY: &str = "breaker";

impl Guards {
    /// Loads what the store holds (nothing without a store).
    pub(super) fn load(tree: Option<sled::Tree>) -> Guards {
        let mut limiter = RateLimiter::default();
        let mut breaker = Breaker::default();
        if let Some(tree) = &tree {
            for (k, v) in tree.scan_prefix("rate/").flatten() {
                let key = String::from_utf8_lossy(&k);
                let account = key.trim_start_matches("rate/").to_string();
                if let Ok(times) = serde_json::from_slice::<VecDeque<i64>>(&v) {
                    limiter.taken.insert(account, times);
                }
            }
            if let Some(b) = tree
                .get(BREAKER_KEY)
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_slice(&v).ok())
            {
                breaker = b;
            }
        }
        Guards {
            limiter: Mutex::new(limiter),
            breaker: Mutex::new(breaker),
            tree,
        }
    }

    fn save(&self, key: &str, value: Vec<u8>) {
        if let Some(tree) = &self.tree {
            if let Err(e) = tree.insert(key, value).and_then(|_| tree.flush().map(drop)) {
                tracing::warn!(error = %e, key, "cannot record remediation state in the store; it holds until a restart");
            }
        }
    }

    /// Takes a rate-limit slot for `account` (and records it in the store).
    pub(super) fn take_slot(&self, account: &str, now: i64, max: u32) -> bool {
        let mut l = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
        if !l.take(account, now, max) {
            return false;
        }
        if let Some(times) = l.taken.get(account) {
            self.save(&format!("rate/{account}"), crate::store::encode(times));
        }
        true
    }

    /// Whether the breaker is open at `now`; a close after the cooldown is recorded.
    pub(super) fn breaker_open(&self, now: i64, cooldown: Duration) -> bool {
        let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        let was = b.clone();
        let open = b.is_open(now, cooldown);
        if *b != was {
            self.save(BREAKER_KEY, crate::store::encode(&*b));
        }
        open
    }

    /// Until when the breaker is open (Unix seconds), if it is.
    pub(super) fn breaker_until(&self, cooldown: Duration) -> Option<i64> {
        self.breaker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .open_until(cooldown)
    }

    /// Records an enforce-mode outcome; true when this failure opened the breaker.
    pub(super) fn record(&self, failed: bool, limit: u32, now: i64) -> bool {
        let mut b = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        let was = b.clone();
        let opened = b.record(failed, limit, now);
        if *b != was {
            self.save(BREAKER_KEY, crate::store::encode(&*b));
        }
        opened
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_is_per_account_per_rolling_hour() {
        let mut l = RateLimiter::default();
        assert!(l.take("a", 1000, 2));
        assert!(l.take("a", 1001, 2));
        assert!(!l.take("a", 1002, 2));
        assert!(l.take("b", 1002, 2), "another account has its own budget");
        assert!(l.take("a", 1000 + 3600, 2), "the oldest slot expired");
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_closes_after_cooldown() {
        let mut b = Breaker::default();
        let cd = Duration::from_secs(10);
        assert!(!b.record(true, 2, 100));
        assert!(!b.record(false, 2, 100), "a success resets the count");
        assert!(!b.record(true, 2, 100));
        assert!(
            b.record(true, 2, 100),
            "second consecutive failure opens it"
        );
        assert!(b.is_open(101, cd));
        assert_eq!(b.open_until(cd), Some(110));
        assert!(!b.is_open(111, cd));
        assert_eq!(b, Breaker::default(), "closed and counting from zero");
    }

    #[test]
    fn guards_survive_a_reopen_of_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let cd = Duration::from_secs(900);
        {
            let store = crate::store::Store::open(dir.path()).unwrap();
            let g = Guards::load(Some(store.tree(super::super::TREE).unwrap()));
            assert!(g.take_slot("a", 1000, 1));
            assert!(g.record(true, 1, 1000));
        }
        let store = crate::store::Store::open(dir.path()).unwrap();
        let g = Guards::load(Some(store.tree(super::super::TREE).unwrap()));
        assert!(!g.take_slot("a", 1001, 1), "the hour's budget is spent");
        assert!(g.breaker_open(1001, cd), "still open after the restart");
        assert!(!g.breaker_open(1000 + 900, cd), "closed after the cooldown");
        drop(g);
        drop(store);
        let store = crate::store::Store::open(dir.path()).unwrap();
        let g = Guards::load(Some(store.tree(super::super::TREE).unwrap()));
        assert!(!g.breaker_open(1001, cd), "the close was recorded too");
    }
}
