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
mod report;
mod rollout;

pub use cache::*;
pub use desired::*;
pub use evaluate::*;
pub use facts::*;
pub use fit::*;
pub use gate::*;
pub use index::*;
pub use injection::*;
pub use plan::*;
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

/// Observes, plans and (in Enforce) applies the sidecars section; reports the result.
pub async fn reconcile(
    ctx: &Context,
    policy: &MeshPolicy,
    spec: &SidecarSpec,
    enforcement: Enforcement,
) -> RuleReport {
    reconcile_with_stats(ctx, policy, spec, enforcement).await.0
}

/// [`reconcile`], with the numbers behind the report.
pub async fn reconcile_with_stats(
    ctx: &Context,
    policy: &MeshPolicy,
    spec: &SidecarSpec,
    enforcement: Enforcement,
) -> (RuleReport, SidecarStats) {
    let ctype = types::SIDECAR_RESOURCES;
    let mut stats = SidecarStats::default();
    let mut report = RuleReport::new(Observed::new(ctype, Status::True, reasons::COMPLIANT, ""));
    let desired = match desired(&spec.resources) {
        Ok(d) => d,
        Err(msg) => {
            report.condition =
                Observed::new(ctype, Status::False, reasons::INCOMPLETE_RESOURCES, msg);
            return (report, stats);
        }
    };
    // Revision labels are resolved against the live revisions and tags; when those cannot be
    // read, every label is taken as live, and the section is Unknown only if a namespace it
    // would cover depends on one.
    let (revisions, revisions_error) = match ctx.revisions().await {
        Ok(r) => (r, None),
        Err(e) => (Revisions::any(), Some(e)),
    };
    let cache = ctx.cache::<Cache>();
    let cached = match &cache {
        Some(c) if c.ready(Duration::from_secs(30)).await => {
            Some(observe_cached(c, spec, &desired, &revisions))
        }
        _ => None,
    };
    // Only an observation from the cache shares its entries between reconciles, so only it
    // can reuse the namespace parts of the last evaluation.
    let from_cache = cached.is_some();
    let Covered {
        namespaces,
        ambient,
        unknown_revision,
    } = match cached {
        Some(o) => o,
        None => match observe(ctx, spec, &revisions).await {
            Ok(o) => o,
            Err(e) => return (RuleReport::failed(ctype, &e), stats),
        },
    };
    if let Some(e) = revisions_error
        && namespaces.iter().any(|n| {
            n.labels.contains_key(crate::istio::REVISION_LABEL)
                && !n.labels.contains_key(crate::istio::INJECTION_LABEL)
        })
    {
        let mut failed = RuleReport::failed(ctype, &e);
        failed.condition.message = format!(
            "{}: revision labels (istio.io/rev) of the covered namespaces cannot be resolved. {}",
            failed.condition.message,
            "meshwarden reads istiod Deployments (label app=istiod) and MutatingWebhookConfigurations (label istio.io/rev): compare its ClusterRole with the chart's"
        );
        return (failed, stats);
    }
    let enforce = enforcement == Enforcement::Enforce;
    let failed = cache
        .as_ref()
        .filter(|c| c.any_failed())
        .map(|c| move |w: &Workload| c.failed_recently(w));
    // The budgets the rollout gate reads (only a pass that may start rollouts asks it).
    let budgets = match enforce {
        true => Some(budgets(ctx).await),
        false => None,
    };
    let gate = |w: &Workload| match &budgets {
        Some(Ok(b)) => availability(w, b.get(&*w.namespace).map_or(&[], Vec::as_slice)),
        Some(Err(e)) => Gate::Held(format!(
            "the PodDisruptionBudgets that may select its pods cannot be read ({e}), so meshwarden cannot tell whether it can lose a pod"
        )),
        None => Gate::Go,
    };
    let Evaluation {
        classified,
        unfit,
        decisions,
        pod_drift,
    } = {
        let failed = failed.as_ref().map(|f| f as &dyn Fn(&Workload) -> bool);
        let now = jiff::Timestamp::now();
        let run = |memo: &mut Memo| {
            evaluate_with(
                memo,
                &namespaces,
                &desired,
                spec,
                enforce,
                &revisions,
                now,
                failed,
                Some(&gate),
            )
        };
        match &cache {
            Some(c) if from_cache => c.with_memo(&policy.name_any(), run),
            _ => run(&mut Memo::default()),
        }
    };
    let targets = &classified.targets;
    if let Some(c) = cache.as_ref().filter(|_| from_cache) {
        c.record_wanted(&policy.name_any(), wanted(targets, &decisions));
    }

    let mut tally = report::Tally::default();
    // The deviations are joined into a message only for the writes that need one (a
    // converging cluster plans thousands).
    let mut to_write: Vec<Planned<(&Workload, &Decision)>> = Vec::new();
    report.targets = i32::try_from(targets.len()).unwrap_or(i32::MAX);
    for (w, d) in targets.iter().zip(&decisions) {
        // Most targets: nothing to say about them (no name built).
        if d.action == Action::Compliant && d.stalled.is_none() && !d.rolling {
            report.compliant += 1;
            continue;
        }
        let id = w.id();
        if let Some(why) = &d.stalled {
            tally.stalled.push(id.clone());
            report.violations.push(Violation {
                rule: ctype.into(),
                object: id.clone(),
                message: format!("rollout stalled: {why}"),
                action: ViolationAction::Reported,
            });
        } else if d.rolling {
            tally.rolling.push(id.clone());
        }
        let devs = || d.deviations.join("; ");
        let violation = |action: ViolationAction, message: String| Violation {
            rule: ctype.into(),
            object: id.clone(),
            message,
            action,
        };
        match &d.action {
            Action::Compliant => report.compliant += 1,
            Action::Reported => report
                .violations
                .push(violation(ViolationAction::Reported, devs())),
            // A target whose last write failed and that now waits for a slot stays reported
            // with that failure: waiting hides nothing the user has to fix.
            Action::Held(why) => {
                match cache.as_ref().and_then(|c| c.last_failure(w)) {
                    Some(e) => {
                        tally.earlier_failures += 1;
                        tally.first_failure.get_or_insert(e.clone());
                        report.violations.push(violation(
                        ViolationAction::Skipped,
                        format!("{}; the write failed: {e}; retried after the other targets ({why})", devs()),
                    ));
                    }
                    None => {
                        tally.held.push(id.clone());
                        report.violations.push(violation(
                            ViolationAction::Held,
                            format!("{}; {why}", devs()),
                        ));
                    }
                }
            }
            Action::Skipped(why) | Action::Gated(Gate::Skipped(why)) => {
                if matches!(d.action, Action::Gated(_)) {
                    tally.gated.push(id.clone());
                }
                report.violations.push(violation(
                    ViolationAction::Skipped,
                    format!("{}; not written: {why}", devs()),
                ))
            }
            Action::Gated(Gate::Held(why)) => {
                tally.gated.push(id.clone());
                report.violations.push(violation(
                    ViolationAction::Held,
                    format!("{}; held: {why}", devs()),
                ))
            }
            Action::Gated(Gate::Go) => {}
            Action::Apply => to_write.push(Planned::one(
                FightKey {
                    policy: policy.name_any(),
                    section: ctype,
                    object: id.clone(),
                    field: None,
                },
                Some(w.foreign_writes.clone()),
                (w, d),
            )),
        }
    }
    // Fight check → write (a bounded number in flight, each patch built only when it starts)
    // → record, in target order.
    let generations: std::sync::Mutex<HashMap<String, Option<i64>>> = Default::default();
    let (generations_ref, desired_ref) = (&generations, &desired);
    let outcomes = driver::drive(&ctx.memory, to_write, WRITE_CONCURRENCY, |&(w, _)| {
        let (generations, desired) = (generations_ref, desired_ref);
        async move {
            let (generation, after) = write_recording(ctx, w, desired).await?;
            if let Ok(mut g) = generations.lock() {
                g.insert(w.id(), generation);
            }
            Ok(Some(after))
        }
    })
    .await;
    let generations = generations.into_inner().unwrap_or_default();
    let written = outcomes
        .iter()
        .filter(|o| !matches!(o, Outcome::Fighting(_)))
        .count();
    let mut first_error = None;
    for outcome in outcomes {
        let (w, d) = match outcome {
            Outcome::Fighting((w, d)) => {
                tally.fights.push(w.id());
                report.violations.push(Violation {
                    rule: ctype.into(),
                    object: w.id(),
                    message: format!(
                        "{}; another writer keeps changing these annotations back",
                        d.deviations.join("; ")
                    ),
                    action: ViolationAction::Skipped,
                });
                continue;
            }
            Outcome::Failed((w, d), e) => {
                if let Some(c) = &cache {
                    c.record_write_result(w, Some(e.to_string()));
                }
                // Reported on its own; the others' writes and slots are not held up by it.
                tally.failed_writes += 1;
                report.violations.push(Violation {
                    rule: ctype.into(),
                    object: w.id(),
                    message: format!(
                        "{}; the write failed: {e}; retried at the next reconcile, after the other targets",
                        d.deviations.join("; ")
                    ),
                    action: ViolationAction::Skipped,
                });
                first_error.get_or_insert(e);
                continue;
            }
            Outcome::Written(item) => item,
        };
        let id = w.id();
        if let Some(c) = &cache {
            c.record_write_result(w, None);
            c.record_written(w, generations.get(&id).copied().flatten());
        }
        report.corrected += 1;
        report.compliant += 1;
        // The first few are published as Events; the rest are counted in `corrected`.
        if report.corrections.len() < CORRECTIONS_LISTED {
            report.corrections.push(format!(
                "{id}: sidecar resources set to {} ({}); its pods roll",
                desired.summary(),
                d.deviations.join("; ")
            ));
        }
        for m in &w.foreign_owners {
            tally.takeovers.push(format!("{id} (was managed by {m})"));
        }
        if !d.rolling {
            tally.started.push(id.clone());
        }
    }
    // Every write failed: most likely not about one workload (permissions, the API server).
    if let Some(e) = first_error
        .as_ref()
        .filter(|_| tally.failed_writes == written)
    {
        let mut failed = RuleReport::failed(ctype, e);
        failed.targets = report.targets;
        return (failed, stats);
    }
    stats.pod_drift = pod_drift;
    stats.targets = targets.len();
    stats.compliant = usize::try_from(report.compliant).unwrap_or(0);
    stats.opted_out = classified.opted_out.len();
    tally.first_error = first_error.as_ref().map(|e| e.to_string());
    stats.rolling = tally.rolling.len() + tally.started.len() + tally.stalled.len();
    stats.held = tally.held.len() + tally.gated.len();
    stats.stalled = tally.stalled.len();
    stats.skipped_namespaces = unfit.keys().cloned().collect();

    report::condition(
        &mut report,
        &tally,
        &report::Seen {
            spec,
            desired: &desired,
            revisions: &revisions,
            classified: &classified,
            decisions: &decisions,
            unfit: &unfit,
            ambient: &ambient,
            unknown_revision: &unknown_revision,
            enforce,
        },
        &stats,
    );
    (report, stats)
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
