//! Resources of injected `istio-proxy` sidecars (`spec.sidecars`).
//!
//! Istio sizes a sidecar from four pod annotations (`sidecar.istio.io/proxyCPU`,
//! `proxyCPULimit`, `proxyMemory`, `proxyMemoryLimit`). Its injection template uses them as
//! soon as any one is present and then ignores the mesh defaults for the others, so meshwarden
//! always writes all four together, on the pod template of every Deployment, StatefulSet and
//! DaemonSet whose pods get a sidecar, plus `meshwarden.io/sidecar-resources: <hash>` so that
//! the templates it changed are recognisable after a restart.
//!
//! Changing a pod template rolls the workload, so rollouts are paced: at most
//! `maxConcurrentRollouts` workloads carrying meshwarden's hash are rolling at once, and a
//! stalled rollout stops the pacing. The pacing state is read from the cluster (hash annotation
//! and rollout status), never kept only in memory.
//!
//! observe (reads) -> [`classify`] and [`plan`] (pure) -> apply (Enforce) -> report.

mod cache;
mod desired;
mod evaluate;
mod facts;
mod fit;
mod gate;
mod index;
mod injection;
mod plan;
mod reconcile;
mod report;
mod rollout;
mod snapshot;

pub use cache::*;
pub use desired::*;
pub use evaluate::*;
pub use facts::*;
pub use fit::*;
pub use gate::*;
pub use index::*;
pub use injection::*;
pub use plan::*;
pub use reconcile::{reconcile, reconcile_with_stats};
pub use rollout::*;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    Container, LimitRange, Namespace, Pod, PodTemplateSpec, ResourceQuota,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;
use serde_json::{Value, json};

use crate::api::{Enforcement, MeshPolicy, Pacing, ResourcesSpec, SidecarSpec, Violation};
use crate::compact::{Compact, KeyValues, SmallMap, small_map};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::quantity;
use crate::rules::RuleReport;
use crate::selector;
use crate::status::conditions::{Observed, Status, types};
use crate::status::messages::{self, Contested, list};
use crate::status::reasons::{self, ViolationAction};
use crate::write::driver::{self, Outcome, Planned};
use crate::write::{self, FightKey, ForeignWrites};

/// The watches whose caches the section reads (their names in `watch::Health`).
pub const WATCHES: [&str; 7] = [
    "Namespaces",
    "Deployments",
    "StatefulSets",
    "DaemonSets",
    "LimitRanges",
    "ResourceQuotas",
    "RunningPods",
];

/// CPU request of the proxy.
pub const PROXY_CPU: &str = "sidecar.istio.io/proxyCPU";

/// CPU limit of the proxy.
pub const PROXY_CPU_LIMIT: &str = "sidecar.istio.io/proxyCPULimit";

/// Memory request of the proxy.
pub const PROXY_MEMORY: &str = "sidecar.istio.io/proxyMemory";

/// Memory limit of the proxy.
pub const PROXY_MEMORY_LIMIT: &str = "sidecar.istio.io/proxyMemoryLimit";

/// Hash of the four values meshwarden wrote on a pod template.
pub const HASH_ANNOTATION: &str = "meshwarden.io/sidecar-resources";

/// The pod-template annotations the section writes: the four proxy resources and their hash
/// (a write that changes one of them is a sidecar rollout).
pub const TEMPLATE_ANNOTATIONS: [&str; 5] = [
    PROXY_CPU,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY,
    PROXY_MEMORY_LIMIT,
    HASH_ANNOTATION,
];

/// Workload annotation (on its metadata, not the template, so writing it starts no rollout):
/// the `metadata.generation` meshwarden's last write of the template produced. A rollout is
/// meshwarden's only while the workload is still at that generation.
pub const GENERATION_ANNOTATION: &str = "meshwarden.io/sidecar-generation";

/// Pod-template annotation `kubectl rollout restart` sets; the upgrades section restarts a
/// workload by setting it too.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";

/// Workload annotation (metadata): the `metadata.generation` the upgrades section's last
/// restart produced, so that its rollout takes a restart slot and can stall.
pub const RESTART_GENERATION_ANNOTATION: &str = "meshwarden.io/restart-generation";

/// Workload annotation (metadata): what the upgrades section's last restart aimed for, the
/// revision and the version of its istiod (`canary@1.35.0`). A restart whose pods are still
/// outdated is repeated only once that target has changed.
pub const RESTART_TARGET_ANNOTATION: &str = "meshwarden.io/restart-target";

/// The rule name that opts a workload out of the upgrades section's restarts.
pub const IGNORE_UPGRADES: &str = "upgrades";

/// Workload annotation that opts out of meshwarden rules (comma-separated rule names).
pub const IGNORE_ANNOTATION: &str = "meshwarden.io/ignore";

/// The rule name that opts a workload out of this section.
pub const IGNORE_VALUE: &str = "sidecar-resources";

pub use crate::istio::{INJECT, INJECT_TEMPLATES};

/// Pod annotation that makes the injector use this proxy image instead of its revision's.
pub const PROXY_IMAGE: &str = "sidecar.istio.io/proxyImage";

const PROXY_CONTAINER: &str = "istio-proxy";

/// Server-side applies of one reconcile in flight at once.
pub const WRITE_CONCURRENCY: usize = 16;

/// Corrections of one reconcile described one by one (Events); `corrected` counts them all.
const CORRECTIONS_LISTED: usize = 5;

/// The workload kinds whose pod templates are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deployment => "Deployment",
            Kind::StatefulSet => "StatefulSet",
            Kind::DaemonSet => "DaemonSet",
        }
    }
}

/// Applies the five annotations and records the generation the write produced on the workload
/// ([`GENERATION_ANNOTATION`]). The generation is predicted from the read one; when another
/// write came in between, a second apply (metadata only: no new generation) corrects it.
async fn write_recording(
    ctx: &Context,
    w: &Workload,
    desired: &Desired,
) -> Result<(Option<i64>, ForeignWrites)> {
    let predicted = w.generation + 1;
    if let Some(c) = ctx.cache::<Cache>() {
        c.expect_echo(w, predicted);
    }
    let produced = write(ctx, w, &patch(w, desired, predicted)).await?;
    match produced.0 {
        Some(g) if g != predicted => write(ctx, w, &patch(w, desired, g)).await,
        _ => Ok(produced),
    }
}

/// Writes the annotations; returns the generation the write produced and the other managers'
/// writes of the annotations as it left them.
async fn write(ctx: &Context, w: &Workload, patch: &Value) -> Result<(Option<i64>, ForeignWrites)> {
    let c = ctx.client.clone();
    let ns = &w.namespace;
    let w_ = &ctx.writes;
    let meta = match w.kind {
        Kind::Deployment => {
            write::apply(&Api::<Deployment>::namespaced(c, ns), &w.name, patch, w_)
                .await?
                .metadata
        }
        Kind::StatefulSet => {
            write::apply(&Api::<StatefulSet>::namespaced(c, ns), &w.name, patch, w_)
                .await?
                .metadata
        }
        Kind::DaemonSet => {
            write::apply(&Api::<DaemonSet>::namespaced(c, ns), &w.name, patch, w_)
                .await?
                .metadata
        }
    };
    let after = write::foreign_writes(&meta, &annotation_paths());
    Ok((meta.generation, after))
}

/// The targets a pass will roll: written now, or waiting for a slot, a stalled rollout, a
/// restart or the rollout gate; not the ones it never writes (Audit, a namespace the values do
/// not fit, `OnDelete`).
pub fn wanted(targets: &[Workload], decisions: &[Decision]) -> Wanted {
    targets
        .iter()
        .zip(decisions)
        .filter(|(_, d)| {
            matches!(
                d.action,
                Action::Apply | Action::Held(_) | Action::Gated(Gate::Held(_))
            )
        })
        .map(|(w, _)| (w.kind, w.namespace.to_string(), w.name.clone()))
        .collect()
}

#[cfg(test)]
mod tests;
