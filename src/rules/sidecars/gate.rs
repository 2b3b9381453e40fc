//! The rollout gate: whether a rollout meshwarden would start (a sidecars template write, an
//! upgrades restart) can cost the workload its availability, decided from cached facts.
//!
//! Controllers replace pods by deleting them, never by evicting them, so no
//! PodDisruptionBudget ever holds a rollout back: the questions `kubectl rollout restart`
//! never asks are asked here, before the write.
//!
//! - The strategy: `Recreate` deletes every pod before the first new one starts; a rolling
//!   update whose resolved `maxUnavailable` is the whole replica count (and no surge) may do
//!   the same; a StatefulSet of one replica deletes its only pod before the replacement
//!   exists. `OnDelete` (and a partition that keeps every ordinal) makes the write change no
//!   pod at all.
//! - The budgets: every PodDisruptionBudget selecting the workload's pods must allow at least
//!   one disruption now (`status.disruptionsAllowed`), as computed by the disruption
//!   controller for the budget's current generation.
//!
//! A workload can accept the downtime explicitly: [`ROLLOUT_ANNOTATION`] set to
//! [`ALLOW_DISRUPTION`] on its metadata. `OnDelete` is never overridden: the write would
//! change nothing that runs.

use super::*;

use k8s_openapi::api::apps::v1::{
    DaemonSetUpdateStrategy, DeploymentStrategy, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Workload annotation (metadata) that opts a workload in to rollouts that may take it below
/// its availability (strategy, replica count, budgets).
pub const ROLLOUT_ANNOTATION: &str = "meshwarden.io/rollout";
/// The value of [`ROLLOUT_ANNOTATION`] that allows the disruption.
pub const ALLOW_DISRUPTION: &str = "AllowDisruption";

/// How a workload's controller replaces its pods when the template changes, resolved against
/// its replica count as the controller resolves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// A rolling update: at most `max_unavailable` pods below the replica count and at most
    /// `max_surge` above it at any time.
    Rolling {
        max_unavailable: i32,
        max_surge: i32,
    },
    /// A Deployment's `Recreate`: every old pod is deleted before a new one is created.
    Recreate,
    /// `OnDelete`: a template change replaces no pod.
    OnDelete,
    /// A StatefulSet whose `partition` keeps every ordinal on the old template.
    Partitioned(i32),
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy::Rolling {
            max_unavailable: 1,
            max_surge: 0,
        }
    }
}

/// An `IntOrString` amount against `total`, as the workload controllers resolve it: a
/// percentage rounded up (`up`) or down; a malformed value counts as `default`.
pub fn scaled(value: Option<&IntOrString>, total: i32, up: bool, default: i32) -> i32 {
    match value {
        None => default,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(s)) => {
            let Some(pct) = s
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<i64>().ok())
            else {
                return default;
            };
            let product = i64::from(total.max(0)) * pct;
            let v = if up {
                (product + 99) / 100
            } else {
                product / 100
            };
            i32::try_from(v).unwrap_or(i32::MAX)
        }
    }
}

/// A rolling update of resolved amounts: both zero means one unavailable, as the Deployment
/// and DaemonSet controllers resolve them (a rollout must be able to progress).
fn rolling(max_unavailable: i32, max_surge: i32) -> Strategy {
    Strategy::Rolling {
        max_unavailable: if max_surge == 0 && max_unavailable == 0 {
            1
        } else {
            max_unavailable
        },
        max_surge,
    }
}

/// A Deployment's strategy (defaults: `RollingUpdate`, 25% / 25%). Like the Deployment
/// controller, surge rounds up, unavailability down, and both zero means one unavailable.
pub fn deployment_strategy(s: Option<&DeploymentStrategy>, replicas: i32) -> Strategy {
    if s.and_then(|s| s.type_.as_deref()) == Some("Recreate") {
        return Strategy::Recreate;
    }
    let ru = s.and_then(|s| s.rolling_update.as_ref());
    let pct = IntOrString::String("25%".into());
    let surge = scaled(
        Some(ru.and_then(|r| r.max_surge.as_ref()).unwrap_or(&pct)),
        replicas,
        true,
        0,
    );
    let unavailable = scaled(
        Some(ru.and_then(|r| r.max_unavailable.as_ref()).unwrap_or(&pct)),
        replicas,
        false,
        0,
    );
    rolling(unavailable, surge)
}

/// A StatefulSet's strategy (default `RollingUpdate`, one pod at a time from the highest
/// ordinal, none above the replica count).
pub fn statefulset_strategy(s: Option<&StatefulSetUpdateStrategy>, replicas: i32) -> Strategy {
    if s.and_then(|s| s.type_.as_deref()) == Some("OnDelete") {
        return Strategy::OnDelete;
    }
    let ru = s.and_then(|s| s.rolling_update.as_ref());
    let partition = ru.and_then(|r| r.partition).unwrap_or(0);
    if partition > 0 && partition >= replicas {
        return Strategy::Partitioned(partition);
    }
    let unavailable = scaled(
        ru.and_then(|r| r.max_unavailable.as_ref()),
        replicas,
        false,
        1,
    )
    .max(1);
    Strategy::Rolling {
        max_unavailable: unavailable,
        max_surge: 0,
    }
}

/// A DaemonSet's strategy against the nodes it runs on (defaults: one unavailable, no surge).
pub fn daemonset_strategy(s: Option<&DaemonSetUpdateStrategy>, nodes: i32) -> Strategy {
    if s.and_then(|s| s.type_.as_deref()) == Some("OnDelete") {
        return Strategy::OnDelete;
    }
    let ru = s.and_then(|s| s.rolling_update.as_ref());
    let surge = scaled(ru.and_then(|r| r.max_surge.as_ref()), nodes, true, 0);
    let unavailable = scaled(ru.and_then(|r| r.max_unavailable.as_ref()), nodes, false, 1);
    rolling(unavailable, surge)
}

/// What the gate reads of a PodDisruptionBudget.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub name: String,
    pub selector: Option<LabelSelector>,
    /// `status.disruptionsAllowed`, `None` while the disruption controller has not computed
    /// it for the budget's current generation.
    pub allowed: Option<i32>,
    /// `status.currentHealthy` and `status.desiredHealthy`.
    pub healthy: i32,
    pub desired: i32,
}

impl From<&PodDisruptionBudget> for Budget {
    fn from(b: &PodDisruptionBudget) -> Self {
        let st = b.status.clone().unwrap_or_default();
        let current = st.observed_generation.unwrap_or(-1) >= b.metadata.generation.unwrap_or(0);
        Budget {
            name: b.metadata.name.clone().unwrap_or_default(),
            selector: b.spec.as_ref().and_then(|s| s.selector.clone()),
            allowed: current.then_some(st.disruptions_allowed),
            healthy: st.current_healthy,
            desired: st.desired_healthy,
        }
    }
}

impl Budget {
    /// Whether the budget selects pods with these labels (policy/v1: an empty selector
    /// selects every pod of its namespace; no selector selects none).
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .as_ref()
            .is_some_and(|s| selector::matches(s, labels))
    }
}

/// The gate's verdict on starting a rollout of one workload now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gate {
    /// The rollout keeps the availability the workload promises.
    Go,
    /// Not now: rolling it would take it below its availability (why, and how to allow it).
    Held(String),
    /// Never: the write would roll no pod (why).
    Skipped(String),
}

/// Whether a rollout of `w` (in a namespace whose budgets are `budgets`) keeps it available
/// (pure).
pub fn availability(w: &WorkloadFacts, budgets: &[Budget]) -> Gate {
    match w.strategy {
        Strategy::OnDelete => {
            return Gate::Skipped(format!(
                "its {} uses updateStrategy OnDelete: a template change replaces no pod; delete its pods to roll them",
                w.kind.as_str()
            ));
        }
        Strategy::Partitioned(p) => {
            return Gate::Skipped(format!(
                "its rollingUpdate.partition {p} keeps all {} replica(s) on the old template: lower the partition to roll them",
                w.replicas
            ));
        }
        _ => {}
    }
    if w.replicas <= 0 || w.allow_disruption {
        return Gate::Go;
    }
    let allow = format!("annotate it {ROLLOUT_ANNOTATION}={ALLOW_DISRUPTION} to accept that");
    match w.strategy {
        Strategy::Recreate => {
            return Gate::Held(format!(
                "strategy Recreate deletes all {} pod(s) before new ones start; {allow}, or switch it to RollingUpdate",
                w.replicas
            ));
        }
        _ if w.kind == Kind::StatefulSet && w.replicas < 2 => {
            return Gate::Held(format!(
                "a StatefulSet of 1 replica: its only pod is deleted before its replacement exists; {allow}, or scale it to 2"
            ));
        }
        Strategy::Rolling {
            max_unavailable,
            max_surge,
        } if max_surge <= 0 && max_unavailable >= w.replicas => {
            return Gate::Held(format!(
                "its rolling update may take all {} pod(s) down at once (maxUnavailable {max_unavailable}, maxSurge 0); {allow}, or lower maxUnavailable",
                w.replicas
            ));
        }
        _ => {}
    }
    if budgets.is_empty() {
        return Gate::Go;
    }
    let labels: BTreeMap<String, String> = w
        .pod_labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for b in budgets.iter().filter(|b| b.selects(&labels)) {
        match b.allowed {
            None => {
                return Gate::Held(format!(
                    "PodDisruptionBudget {} selects its pods and the disruption controller has not computed its status yet",
                    b.name
                ));
            }
            Some(n) if n < 1 => {
                return Gate::Held(format!(
                    "PodDisruptionBudget {} allows no disruption now ({} of {} required pods healthy); {allow}",
                    b.name, b.healthy, b.desired
                ));
            }
            Some(_) => {}
        }
    }
    Gate::Go
}

#[cfg(test)]
mod tests;
