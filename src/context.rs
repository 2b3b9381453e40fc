//! State shared by every reconcile.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use kube::Client;
use kube::runtime::events::Reporter;

use crate::apply::{FightTracker, WriteCounter};

/// Shared by every reconcile of every policy.
pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    /// Writes made so far (benchmarks and metrics).
    pub writes: WriteCounter,
    fights: Mutex<FightTracker>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, instance: Option<String>) -> Self {
        Context {
            client,
            reporter: Reporter {
                controller: "meshwarden".into(),
                instance,
            },
            writes: WriteCounter::default(),
            fights: Mutex::new(FightTracker::default()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// True when `key` is in a fight (see [`FightTracker`]).
    pub fn fight_check(&self, key: &str, now: Instant) -> bool {
        self.fights.lock().map(|mut f| f.is_fight(key, now)).unwrap_or(false)
    }

    /// Records a correction of `key`.
    pub fn fight_record(&self, key: &str, now: Instant) {
        if let Ok(mut f) = self.fights.lock() {
            f.record(key, now);
        }
    }

    /// Counts a failed reconcile of `policy`; returns failures in a row so far.
    pub fn failed(&self, policy: &str) -> u32 {
        let Ok(mut f) = self.failures.lock() else {
            return 0;
        };
        let n = f.entry(policy.to_string()).or_insert(0);
        *n += 1;
        *n - 1
    }

    /// Clears the failure count of `policy` after a good reconcile.
    pub fn succeeded(&self, policy: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(policy);
        }
    }
}
