//! Per HA target, what runs: replicas available and wanted, zones used, disruptions allowed,
//! so that an alert can fire on the outcome rather than on the objects.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub policy: String,
    pub section: String,
    pub namespace: String,
    pub deployment: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub policy: String,
    pub section: String,
    pub namespace: String,
    pub deployment: String,
    /// `available` or `wanted`.
    pub state: String,
}

/// One target's outcome as the metrics show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetOutcome {
    pub namespace: String,
    pub deployment: String,
    pub available: usize,
    pub wanted: usize,
    pub zones: usize,
    pub disruptions_allowed: Option<i32>,
}

/// (policy, section) -> the (namespace, deployment) pairs with series.
type Known = Mutex<BTreeMap<(String, String), BTreeSet<(String, String)>>>;

#[derive(Default)]
pub struct HaMetrics {
    replicas: Family<ReplicaLabels, Gauge>,
    zones: Family<TargetLabels, Gauge>,
    disruptions: Family<TargetLabels, Gauge>,
    known: Known,
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl HaMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ha_replicas",
            "Pods of an HA target that serve (state=available: Ready, on a Ready node) and that it must serve (state=wanted: its own or its HPA's count, at least replicas.min)",
            self.replicas.clone(),
        );
        registry.register(
            "ha_zones",
            "Zones the scheduled pods of an HA target run in",
            self.zones.clone(),
        );
        registry.register(
            "ha_disruptions_allowed",
            "The least status.disruptionsAllowed of the PodDisruptionBudgets covering an HA target (0: its nodes cannot be drained)",
            self.disruptions.clone(),
        );
    }

    /// Sets the series of one section of a policy to `targets`; targets it no longer has lose
    /// theirs.
    pub fn set(&self, policy: &str, section: &str, targets: &[TargetOutcome]) {
        let key = (policy.to_string(), section.to_string());
        let now: BTreeSet<(String, String)> = targets
            .iter()
            .map(|t| (t.namespace.clone(), t.deployment.clone()))
            .collect();
        let before = match self.known.lock() {
            Ok(mut m) => match now.is_empty() {
                true => m.remove(&key).unwrap_or_default(),
                false => m.insert(key, now.clone()).unwrap_or_default(),
            },
            Err(_) => BTreeSet::new(),
        };
        let labels = |(ns, dep): &(String, String)| TargetLabels {
            policy: policy.to_string(),
            section: section.to_string(),
            namespace: ns.clone(),
            deployment: dep.clone(),
        };
        let replica = |t: &TargetLabels, state: &str| ReplicaLabels {
            policy: t.policy.clone(),
            section: t.section.clone(),
            namespace: t.namespace.clone(),
            deployment: t.deployment.clone(),
            state: state.to_string(),
        };
        for gone in before.difference(&now) {
            let l = labels(gone);
            self.replicas.remove(&replica(&l, "available"));
            self.replicas.remove(&replica(&l, "wanted"));
            self.zones.remove(&l);
            self.disruptions.remove(&l);
        }
        for t in targets {
            let l = labels(&(t.namespace.clone(), t.deployment.clone()));
            self.replicas
                .get_or_create(&replica(&l, "available"))
                .set(gauge(t.available));
            self.replicas
                .get_or_create(&replica(&l, "wanted"))
                .set(gauge(t.wanted));
            self.zones.get_or_create(&l).set(gauge(t.zones));
            match t.disruptions_allowed {
                Some(n) => {
                    self.disruptions.get_or_create(&l).set(i64::from(n));
                }
                None => {
                    self.disruptions.remove(&l);
                }
            }
        }
    }

    /// Removes every series of a deleted policy.
    pub fn forget(&self, policy: &str, sections: &[&str]) {
        for s in sections {
            self.set(policy, s, &[]);
        }
    }
}
