//! State shared by every reconcile. Nothing here knows a rule: rule sections keep their watch
//! caches in [`Context::caches`], keyed by the cache's type.
use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use kube::Client;
use kube::runtime::events::Reporter;

use crate::telemetry::Metrics;
use crate::write::{Memory, Writes};

/// Shared by every reconcile of every policy.
/// The default of [`Context::availability_grace`].
pub const AVAILABILITY_GRACE: std::time::Duration = std::time::Duration::from_secs(120);

pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    /// How writes are made (real, or dry runs for `meshwarden plan`), and how many so far.
    pub writes: Writes,
    pub metrics: Arc<Metrics>,
    /// Fight and takeover memory of the writes.
    pub memory: Memory,
    failures: Mutex<HashMap<String, u32>>,
    /// The rule sections' watch caches while the controller runs, one per type.
    caches: RwLock<HashMap<TypeId, Box<dyn Any + Send + Sync>>>,
    /// Namespace of istiod, where its mesh config lives (`--istio-namespace`).
    pub istio_namespace: String,
    /// How long an HA target may fall short of what runs before it is reported
    /// (`--availability-grace`): a normal rollout or rescheduling fits in it.
    pub availability_grace: std::time::Duration,
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
            writes: Writes::new(metrics.writes.clone()),
            metrics,
            memory: Memory::default(),
            failures: Mutex::new(HashMap::new()),
            caches: RwLock::new(HashMap::new()),
            istio_namespace: crate::istio::DEFAULT_ISTIO_NAMESPACE.to_string(),
            availability_grace: AVAILABILITY_GRACE,
        }
    }

    /// The live revisions and tags: from the controller's cache (waiting up to 10 s for its
    /// first list), or, without a controller, every revision label taken as live.
    pub async fn revisions(&self) -> crate::error::Result<crate::istio::Revisions> {
        match self.cache::<crate::istio::IstioCache>() {
            Some(c) => c.revisions(std::time::Duration::from_secs(10)).await,
            None => Ok(crate::istio::Revisions::any()),
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

    /// A memory of type `M` this process keeps across reconciles (shared handles inside
    /// `M`): the one kept, or a new one, kept from now on. Two callers racing for the first
    /// one get the same: the check and the insertion happen under one lock.
    pub fn kept<M: Clone + Default + Send + Sync + 'static>(&self) -> M {
        let Ok(mut caches) = self.caches.write() else {
            return M::default();
        };
        caches
            .entry(TypeId::of::<M>())
            .or_insert_with(|| Box::new(M::default()))
            .downcast_ref::<M>()
            .cloned()
            .unwrap_or_default()
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
}
