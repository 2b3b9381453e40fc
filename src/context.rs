//! State shared by every reconcile. Nothing here knows a rule: rule sections keep their watch
//! caches in [`Context::caches`], keyed by the cache's type.
use std::any::{Any, TypeId};
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
    /// The rule sections' watch caches while the controller runs, one per type.
    caches: RwLock<HashMap<TypeId, Box<dyn Any + Send + Sync>>>,
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
            caches: RwLock::new(HashMap::new()),
        }
    }

    /// The cache of type `C` a rule section reads, if the controller keeps one (a reconcile
    /// run without the controller lists instead).
    pub fn cache<C: Clone + Send + Sync + 'static>(&self) -> Option<C> {
        let caches = self.caches.read().ok()?;
        caches.get(&TypeId::of::<C>())?.downcast_ref::<C>().cloned()
    }

    /// Sets (or with `None` drops) the cache of type `C`.
    pub fn set_cache<C: Clone + Send + Sync + 'static>(&self, cache: Option<C>) {
        if let Ok(mut caches) = self.caches.write() {
            match cache {
                Some(c) => caches.insert(TypeId::of::<C>(), Box::new(c)),
                None => caches.remove(&TypeId::of::<C>()),
            };
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
    async fn caches_are_kept_by_type() {
        let c = ctx();
        assert_eq!(c.cache::<u32>(), None);
        c.set_cache(Some(7u32));
        c.set_cache(Some("other".to_string()));
        assert_eq!(c.cache::<u32>(), Some(7));
        assert_eq!(c.cache::<String>().as_deref(), Some("other"));
        c.set_cache::<u32>(None);
        assert_eq!(c.cache::<u32>(), None);
        assert!(c.cache::<String>().is_some());
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
