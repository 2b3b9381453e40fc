//! `spread.rebalance: Evict`: one pod of a target crowded onto one node or zone is evicted
//! through the Eviction API (so its PodDisruptionBudgets decide), and the scheduler places
//! its replacement where the spread allows. One pod per target at a time, only while every
//! replica serves, at most once per grace period.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;

use super::outcome::Achieved;
use super::{HaRules, Observation};
use crate::api::Rebalance;
use crate::context::Context;

/// The pod to evict from a target whose spread is not achieved (pure): a serving, scheduled
/// pod (all of them share the crowded node or zone), when rebalancing is asked for, every
/// replica serves and no budget is known to forbid a disruption now.
pub fn pick(rules: &HaRules, obs: &Observation, achieved: &Achieved) -> Option<String> {
    let asked = rules
        .spread
        .as_ref()
        .is_some_and(|s| s.rebalance == Rebalance::Evict);
    let budget_open = achieved.disruptions_allowed.is_none_or(|n| n > 0);
    if !asked || achieved.available < achieved.wanted || !budget_open {
        return None;
    }
    obs.pods
        .iter()
        .filter(|p| {
            let pl = &p.placement;
            pl.ready && !pl.terminating && pl.node.is_some()
        })
        .map(|p| p.name.clone())
        .max()
}

/// When this process last evicted a pod of each target (`Deployment/<ns>/<name>`).
#[derive(Clone, Default)]
pub struct Evicted(Arc<Mutex<HashMap<String, Instant>>>);

impl Evicted {
    /// The process's memory (kept in the context's caches).
    pub fn of(ctx: &Context) -> Evicted {
        ctx.kept()
    }

    /// Whether `target` may lose a pod now (none evicted within `pace`); if so, records it.
    pub fn claim(&self, target: &str, pace: Duration) -> bool {
        let Ok(mut m) = self.0.lock() else {
            return false;
        };
        let now = Instant::now();
        m.retain(|_, at| now.duration_since(*at) < pace);
        if m.contains_key(target) {
            return false;
        }
        m.insert(target.to_string(), now);
        true
    }
}

/// Evicts `pod` in `namespace` (a dry run under `meshwarden plan`); the API server's refusal
/// (a budget at zero: 429) is the error.
pub async fn evict(ctx: &Context, namespace: &str, pod: &str) -> Result<(), String> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    crate::write::evict(&api, pod, &ctx.writes)
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_target_loses_one_pod_per_pace() {
        let e = Evicted::default();
        assert!(e.claim("Deployment/a/b", Duration::from_secs(60)));
        assert!(!e.claim("Deployment/a/b", Duration::from_secs(60)));
        assert!(e.claim("Deployment/a/c", Duration::from_secs(60)));
        // Once the pace has passed, the target may lose another.
        assert!(e.claim("Deployment/a/b", Duration::ZERO));
    }
}
