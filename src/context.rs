//! State shared by every reconcile.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use kube::Client;
use kube::runtime::events::Reporter;

use crate::apply::{FightTracker, WriteCounter};
use crate::telemetry::Metrics;

/// Shared by every reconcile of every policy.
pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    /// Writes made so far (benchmarks and metrics).
    pub writes: WriteCounter,
    pub metrics: Arc<Metrics>,
    fights: Mutex<FightTracker>,
    failures: Mutex<HashMap<String, u32>>,
    takeovers: Mutex<HashMap<String, Vec<String>>>,
    /// Watched objects of the sidecars section, while the controller runs.
    sidecar_cache: RwLock<Option<crate::rules::sidecars::Cache>>,
    /// Watched pods of the mTLS section, while the controller runs.
    mtls_pods: RwLock<Option<crate::rules::mtls::PodCache>>,
}

impl Context {
    pub fn new(client: Client, instance: Option<String>) -> Self {
        Self::with_metrics(client, instance, Arc::new(Metrics::default()))
    }

    /// A context that records into `metrics` (shared with the HTTP endpoint).
    pub fn with_metrics(client: Client, instance: Option<String>, metrics: Arc<Metrics>) -> Self {
        Context {
            client,
            reporter: Reporter {
                controller: "meshwarden".into(),
                instance,
            },
            writes: WriteCounter::new(metrics.writes.clone()),
            metrics,
            fights: Mutex::new(FightTracker::default()),
            failures: Mutex::new(HashMap::new()),
            takeovers: Mutex::new(HashMap::new()),
            sidecar_cache: RwLock::new(None),
            mtls_pods: RwLock::new(None),
        }
    }

    /// The sidecars section's cache, if the controller keeps one.
    pub fn sidecar_cache(&self) -> Option<crate::rules::sidecars::Cache> {
        self.sidecar_cache.read().ok().and_then(|c| c.clone())
    }

    /// Sets (or with `None` drops) the sidecars section's cache.
    pub fn set_sidecar_cache(&self, cache: Option<crate::rules::sidecars::Cache>) {
        if let Ok(mut c) = self.sidecar_cache.write() {
            *c = cache;
        }
    }

    /// The mTLS section's pod cache, if the controller keeps one.
    pub fn mtls_pods(&self) -> Option<crate::rules::mtls::PodCache> {
        self.mtls_pods.read().ok().and_then(|c| c.clone())
    }

    /// Sets (or with `None` drops) the mTLS section's pod cache.
    pub fn set_mtls_pods(&self, cache: Option<crate::rules::mtls::PodCache>) {
        if let Ok(mut c) = self.mtls_pods.write() {
            *c = cache;
        }
    }

    /// Replaces the fight detection: `limit` corrections within `window` (0 turns it off).
    pub fn set_fight_limit(&self, window: std::time::Duration, limit: usize) {
        if let Ok(mut f) = self.fights.lock() {
            *f = FightTracker::new(window, if limit == 0 { usize::MAX } else { limit });
        }
    }

    /// True when `key` is in a fight (see [`FightTracker`]).
    pub fn fight_check(&self, key: &str, now: Instant) -> bool {
        self.fights
            .lock()
            .map(|mut f| f.is_fight(key, now))
            .unwrap_or(false)
    }

    /// Records a correction of `key`.
    pub fn fight_record(&self, key: &str, now: Instant) {
        if let Ok(mut f) = self.fights.lock() {
            f.record(key, now);
        }
    }

    /// Records that meshwarden set the field `key` (see [`FightTracker::correct`]).
    pub fn fight_correct(
        &self,
        key: &str,
        now: Instant,
        seen: &crate::apply::ForeignWrites,
        after: &crate::apply::ForeignWrites,
    ) {
        if let Ok(mut f) = self.fights.lock() {
            f.correct(key, now, seen, after);
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

    /// Adds fields taken over from other managers under `key` (policy, generation and
    /// section) and returns all taken over under that key so far, so that the condition keeps
    /// naming them after the other manager has lost ownership, until the spec changes.
    pub fn remember_takeovers(&self, key: &str, new: &[String]) -> Vec<String> {
        let Ok(mut t) = self.takeovers.lock() else {
            return new.to_vec();
        };
        // Entries of older generations of the same policy are dropped.
        let policy_gen = |k: &str| {
            let mut parts = k.splitn(3, '/');
            (
                parts.next().map(str::to_string),
                parts.next().map(str::to_string),
            )
        };
        let (policy, generation) = policy_gen(key);
        t.retain(|k, _| {
            let (p, g) = policy_gen(k);
            p != policy || g == generation
        });
        let all = t.entry(key.to_string()).or_default();
        for n in new {
            if !all.contains(n) {
                all.push(n.clone());
            }
        }
        all.clone()
    }

    /// Clears the failure count of `policy` after a good reconcile.
    pub fn succeeded(&self, policy: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(policy);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        // A client is never used by these tests; any valid config will do.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        Context::new(Client::try_from(config).unwrap(), None)
    }

    #[tokio::test]
    async fn takeovers_accumulate_per_generation_and_section() {
        let c = ctx();
        assert_eq!(
            c.remember_takeovers("p/1/ControlPlaneHA", &["a".into()]),
            vec!["a"]
        );
        assert_eq!(
            c.remember_takeovers("p/1/GatewayHA", &["g".into()]),
            vec!["g"]
        );
        assert_eq!(
            c.remember_takeovers("p/1/ControlPlaneHA", &[]),
            vec!["a"],
            "kept across reconciles and sections"
        );
        assert!(
            c.remember_takeovers("p/2/ControlPlaneHA", &[]).is_empty(),
            "a new generation starts afresh"
        );
        assert!(
            c.remember_takeovers("p/1/GatewayHA", &[]).is_empty(),
            "older generations are dropped"
        );
        assert_eq!(
            c.remember_takeovers("q/1/GatewayHA", &["x".into()]),
            vec!["x"]
        );
    }
}
