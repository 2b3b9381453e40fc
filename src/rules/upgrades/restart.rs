//! Restarts of workloads whose proxies are outdated (`restartOutdated`, Enforce only), paced
//! with the sidecars section's rollout slots and stall detection.
//!
//! A restart is what `kubectl rollout restart` does: the pod-template annotation
//! `kubectl.kubernetes.io/restartedAt`, here written with server-side apply (field manager
//! `meshwarden`) together with `meshwarden.io/restart-generation` on the workload's metadata
//! (the generation the restart produced: its rollout is meshwarden's while the workload is at
//! that generation). The apply goes through [`write::apply_keeping`]: fields meshwarden's apply
//! owned before (the sidecars section's annotations) are handed to meshwarden's `Update` entry
//! first, so they stay. meshwarden keeps owning `restartedAt` and never stops sending it in a
//! way that removes it: the upgrades section only ever re-applies it with a new time, and the
//! sidecars section, whose apply drops it, changes the template (and so rolls the pods) anyway.
//! A later `kubectl rollout restart` simply takes the field over.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::api::Api;
use serde_json::{Value, json};

use super::plan::{Outdated, Owner};
use crate::compact::KeyValues;
use crate::context::Context;
use crate::error::Result;
use crate::istio::{INJECTION_LABEL, Revisions};
use crate::rules::sidecars::{
    Budget, Gate, Kind, NamespaceInjection, PROXY_IMAGE, RESTART_GENERATION_ANNOTATION,
    RESTART_TARGET_ANNOTATION, RESTARTED_AT, Rollout, WorkloadFacts, availability, paced_rollout,
};
use crate::write;

/// How long a restart this process wrote is remembered while the watch has not delivered it.
const PENDING_TTL: Duration = Duration::from_secs(300);

/// How long a revision must have been gone before the proxies it injected are restarted into
/// another: a reinstall of istiod (`helm uninstall` then `install`, an Argo CD `Replace`) is no
/// removal.
pub const REVISION_GONE_AFTER: Duration = Duration::from_secs(300);

/// When this process first saw each revision that running proxies name gone (per revision;
/// forgotten once it runs again or no proxy names it).
#[derive(Clone, Default)]
pub struct GoneSince(Arc<Mutex<HashMap<String, Instant>>>);

impl GoneSince {
    /// The process's memory (kept in the context's caches).
    pub fn of(ctx: &Context) -> GoneSince {
        ctx.kept()
    }

    /// Records that `gone` are the revisions running proxies name that do not run now, and
    /// returns how long each has been gone.
    pub fn update(&self, gone: &BTreeSet<String>) -> HashMap<String, Duration> {
        let Ok(mut m) = self.0.lock() else {
            return HashMap::new();
        };
        m.retain(|rev, _| gone.contains(rev));
        let now = Instant::now();
        gone.iter()
            .map(|rev| (rev.clone(), now - *m.entry(rev.clone()).or_insert(now)))
            .collect()
    }
}

/// Why a restart of a workload whose proxies' revision is gone waits (pure): `None` once the
/// revision has been gone [`REVISION_GONE_AFTER`].
pub fn debounce(revision: &str, gone_for: Duration) -> Option<String> {
    (gone_for < REVISION_GONE_AFTER).then(|| {
        format!(
            "revision {revision} has been gone for {}s: its proxies are restarted once it has been gone {}s (a reinstall of istiod is not a removal)",
            gone_for.as_secs(),
            REVISION_GONE_AFTER.as_secs()
        )
    })
}

/// Restarts written by this process: (kind, namespace, name) -> (generation produced, when).
/// A reconcile that runs before the watch delivers the new generation reads the workload as
/// restarting, so it neither restarts it twice nor gives its slot to another.
#[derive(Clone, Default)]
pub struct Pending(Arc<Mutex<HashMap<WorkloadKey, (i64, Instant)>>>);

/// (kind, namespace, name) of a workload.
type WorkloadKey = (Kind, String, String);

impl Pending {
    /// The process's memory (kept in the context's caches).
    pub fn of(ctx: &Context) -> Pending {
        if let Some(p) = ctx.cache::<Pending>() {
            return p;
        }
        let p = Pending::default();
        ctx.set_cache(Some(p.clone()));
        p
    }

    pub(super) fn record(&self, key: WorkloadKey, generation: i64) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(key, (generation, Instant::now()));
        }
    }

    /// Whether a restart of `w` this process wrote is not in the cached facts yet.
    fn ahead_of(&self, key: &WorkloadKey, cached_generation: i64) -> bool {
        let Ok(mut m) = self.0.lock() else {
            return false;
        };
        match m.get(key) {
            Some((g, at)) if *g > cached_generation && at.elapsed() < PENDING_TTL => true,
            Some(_) => {
                m.remove(key);
                false
            }
            None => false,
        }
    }
}

/// A workload of the selected namespaces, with the rollout of meshwarden's restart.
pub type Workloads =
    std::collections::BTreeMap<(String, Kind, String), (Arc<WorkloadFacts>, Rollout)>;

/// The rollout of meshwarden's last restart of `w` (pure but for the pending memory).
pub fn restart_rollout(
    w: &WorkloadFacts,
    namespace: &str,
    pending: &Pending,
    now: jiff::Timestamp,
) -> Rollout {
    if pending.ahead_of(
        &(w.kind, namespace.to_string(), w.name.clone()),
        w.generation,
    ) {
        return Rollout::InProgress(format!(
            "the {} controller has not observed the restart yet",
            w.kind.as_str()
        ));
    }
    paced_rollout(w, w.restart_generation, false, now)
}

/// Seconds after a Deployment's controller declared a rollout complete during which its pods'
/// proxies do not decide a restart. The rollout's old pods are being deleted by then, but the
/// running-pod watch, a stream of its own, can deliver their deletion after the Deployment's
/// completion: counted meanwhile, they would restart a workload its rollout just brought up to
/// date (a second rollout for one change).
pub const SETTLE_SECS: i64 = 15;

/// Why a restart of `w` waits at `now` (its rollout completed less than [`SETTLE_SECS`] ago),
/// and how long it still waits. Not after a Deployment's first rollout (generation 1): it
/// replaced no pod, and a new workload keeps its place in the restart order.
pub fn just_rolled_out(
    w: &WorkloadFacts,
    now: jiff::Timestamp,
) -> Option<(String, std::time::Duration)> {
    if w.generation <= 1 {
        return None;
    }
    let since = now.as_second() - w.rolled_out_at?.as_second();
    (since < SETTLE_SECS).then(|| {
        let left = u64::try_from(SETTLE_SECS - since.max(0)).unwrap_or(0);
        (
            format!(
                "its rollout completed {}s ago: the pods it replaced may not all be seen stopping yet; restarted after {SETTLE_SECS}s if its pods still run the outdated proxy",
                since.max(0)
            ),
            std::time::Duration::from_secs(left),
        )
    })
}

/// What happens to one outdated workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Restart {
    /// Restart it now (a slot is free).
    Now,
    /// meshwarden's restart of it is rolling (or stalled).
    Rolling,
    /// Waits for a slot, for a stalled restart, or for the Deployment to be resumed.
    Held(String),
    /// Never restarted by this section: why.
    Skipped(String),
}

/// The restart plan: a decision per outdated workload (in order), the workloads whose
/// restart rolls now, and those whose restart stalled (id, why).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RestartPlan {
    pub decisions: Vec<(Owner, Restart)>,
    pub rolling: Vec<String>,
    pub stalled: Vec<(String, String)>,
}

/// `Kind/namespace/name`.
pub fn workload_id((ns, kind, name): &(String, Kind, String)) -> String {
    format!("{}/{ns}/{name}", kind.as_str())
}

/// The rollout gate of a restart: what the new pods would get and what the workload can
/// lose ([`crate::rules::sidecars::availability`]), for a workload in a namespace.
pub type RestartGate<'a> = &'a dyn Fn(&str, &WorkloadFacts) -> Gate;

/// What a restart of a workload in a namespace would aim for ([`restart_target`]).
pub type TargetFn<'a> = &'a dyn Fn(&str, &WorkloadFacts) -> Option<String>;

/// What a restart of `w` in a namespace with these labels aims for (pure): the revision whose
/// injector serves its new pods and the version its istiod serves, as `revision@version`.
/// `None` when not known (no injector, or its istiod rolls out).
pub fn restart_target(
    labels: &BTreeMap<String, String>,
    w: &WorkloadFacts,
    revisions: &Revisions,
) -> Option<String> {
    let label = match labels.get(INJECTION_LABEL).map(String::as_str) {
        Some("enabled") => "default",
        Some(_) => return None,
        None => labels
            .get(crate::istio::REVISION_LABEL)
            .map(String::as_str)
            .or(w.template_labels.value(crate::istio::REVISION_LABEL))
            .unwrap_or("default"),
    };
    let rev = revisions.resolve(label)?;
    if revisions.settling.contains(rev) {
        return None;
    }
    let (_, version) = super::plan::istiod_version(revisions, rev)?;
    Some(format!("{rev}@{version}"))
}

/// Whether meshwarden's sidecar write of `w` is rolling (the write produced its current
/// generation, not rolled out yet).
fn sidecar_write_rolling(w: &WorkloadFacts) -> bool {
    w.written_generation == Some(w.generation)
        && matches!(w.rollout, Rollout::InProgress(_) | Rollout::Settling(_))
}

/// Plans the restarts (pure): at most `max` rollouts of meshwarden (its restarts and its
/// sidecar writes together) roll at once when a restart starts, none starts while one
/// stalled, and a workload meshwarden restarted whose pods are still outdated is not
/// restarted again (the injector gives it the same proxy: a restart would not help). A
/// workload already rolling, for any reason, is not restarted on top of that rollout: its new
/// pods get the current proxy anyway. `gate` says whether the restart would give the pods the
/// intended proxy and keep the workload available.
pub fn plan_restarts(
    outdated: &Outdated,
    workloads: &Workloads,
    max: i32,
    gate: RestartGate<'_>,
    target: TargetFn<'_>,
) -> RestartPlan {
    let mut out = RestartPlan::default();
    let mut sidecar_rollouts = 0;
    for (key, (w, rollout)) in workloads {
        match rollout {
            Rollout::InProgress(_) | Rollout::Settling(_) => out.rolling.push(workload_id(key)),
            Rollout::Stalled(why) => out.stalled.push((workload_id(key), why.clone())),
            Rollout::Complete | Rollout::Paused if sidecar_write_rolling(w) => {
                sidecar_rollouts += 1
            }
            Rollout::Complete | Rollout::Paused => {}
        }
    }
    let max = usize::try_from(max.max(1)).unwrap_or(1);
    let mut in_flight = out.rolling.len() + out.stalled.len() + sidecar_rollouts;
    for owner in outdated.keys() {
        let (ns, kind, name) = owner;
        let decision = match kind {
            None => Restart::Skipped(
                "a pod of no Deployment, StatefulSet or DaemonSet: delete it to get a current proxy"
                    .into(),
            ),
            Some(kind) => match workloads.get(&(ns.clone(), *kind, name.clone())) {
                None => Restart::Skipped("its workload is not in the watch cache yet".into()),
                Some((w, rollout)) => {
                    let checks = (gate, target);
                    decide(w, rollout, ns, checks, &out, &mut in_flight, max)
                }
            },
        };
        out.decisions.push((owner.clone(), decision));
    }
    out
}

/// The decision for one outdated workload of the cache (see [`plan_restarts`]).
fn decide(
    w: &WorkloadFacts,
    rollout: &Rollout,
    namespace: &str,
    (gate, target): (RestartGate<'_>, TargetFn<'_>),
    plan: &RestartPlan,
    in_flight: &mut usize,
    max: usize,
) -> Restart {
    if w.restart_opted_out {
        return Restart::Skipped("opted out (meshwarden.io/ignore: upgrades)".into());
    }
    if w.other_rule {
        return Restart::Skipped(
            "written by meshwarden's HA rules: restart it with its control plane or gateway".into(),
        );
    }
    if let Rollout::InProgress(_) | Rollout::Settling(_) | Rollout::Stalled(_) = rollout {
        return Restart::Rolling;
    }
    if w.restart_generation == Some(w.generation) {
        // Restarted at this generation: again only for another target (istiod upgraded
        // since); for the same one the injector would give the same proxy.
        match (&w.restart_target, target(namespace, w)) {
            (Some(done), Some(now)) if *done != now => {}
            (done, _) => {
                let aimed = done
                    .as_ref()
                    .map(|t| format!(" (for {t})"))
                    .unwrap_or_default();
                return Restart::Skipped(format!(
                    "meshwarden restarted it{aimed} and its pods still run the outdated proxy: the injector gives them the same one; check the namespace's istio.io/rev label and the pod template"
                ));
            }
        }
    }
    if *rollout == Rollout::Paused {
        return Restart::Held(
            "the Deployment is paused (spec.paused): restarted once it is resumed".into(),
        );
    }
    let verdict = gate(namespace, w);
    if let Gate::Skipped(why) = verdict {
        return Restart::Skipped(why);
    }
    if sidecar_write_rolling(w) {
        return Restart::Held(
            "meshwarden's sidecar write is rolling it: its new pods get the current proxy, so it is not restarted on top of that rollout".into(),
        );
    }
    if let Rollout::InProgress(why) | Rollout::Stalled(why) = &w.rollout {
        return Restart::Held(format!(
            "its own rollout is in progress ({why}): not restarted on top of it; its new pods get the current proxy"
        ));
    }
    if !plan.stalled.is_empty() {
        return Restart::Held("a restart stalled; no other starts until it completes".into());
    }
    if let Gate::Held(why) = verdict {
        return Restart::Held(why);
    }
    if *in_flight < max {
        *in_flight += 1;
        return Restart::Now;
    }
    Restart::Held(format!(
        "{WAITS_FOR_RESTART_SLOT} (maxConcurrentRestarts {max}, counting meshwarden's sidecar rollouts)"
    ))
}

/// How the violation of a restart held for a slot begins (`meshwarden plan` counts them).
pub const WAITS_FOR_RESTART_SLOT: &str = "waits for a restart slot";

/// PodDisruptionBudgets by namespace, as [`crate::rules::sidecars::budgets`] read them.
pub type Budgets = HashMap<String, Vec<Budget>>;

/// Whether a restart of `w` (in namespace `ns` with these labels) gives its pods the intended
/// proxy and keeps the workload available (pure). `budgets`: `None` in Audit (nothing is
/// restarted), else the budgets or why they cannot be read.
pub fn restart_gate(
    ns: &str,
    labels: Option<&BTreeMap<String, String>>,
    w: &WorkloadFacts,
    revisions: &Revisions,
    budgets: Option<&Result<Budgets>>,
) -> Gate {
    if let Some(image) = w.template_annotations.value(PROXY_IMAGE) {
        return Gate::Skipped(format!(
            "its pod template pins {PROXY_IMAGE}={image}: a restart gives its pods the same proxy; change that annotation to upgrade them"
        ));
    }
    let Some(labels) = labels else {
        return Gate::Skipped("its namespace is not in the watch cache yet".into());
    };
    if let Some(why) = NamespaceInjection::of(labels, revisions).no_sidecar_reason(
        &w.template_labels,
        &w.template_annotations,
        revisions,
    ) {
        return Gate::Skipped(format!(
            "a restart would give its pods no sidecar ({why}): label the namespace (or the pod template) with a live revision or tag first"
        ));
    }
    if labels.get(INJECTION_LABEL).map(String::as_str) == Some("enabled")
        && !revisions.any
        && !revisions.default_injector()
    {
        return Gate::Skipped(
            "its namespace has istio-injection=enabled, but no default revision and no default tag exist (a revision-only install): a restart would give its pods no sidecar; label the namespace istio.io/rev=<revision> instead".into(),
        );
    }
    match budgets {
        None => Gate::Go,
        Some(Ok(b)) => availability(w, b.get(ns).map_or(&[], Vec::as_slice)),
        Some(Err(e)) => Gate::Held(format!(
            "the PodDisruptionBudgets that may select its pods cannot be read ({e}), so meshwarden cannot tell whether it can lose a pod"
        )),
    }
}

/// The apply of a restart: `restartedAt` on the template, the generation it will produce and
/// what it aims for (`target`, when known) on the workload.
pub fn patch(
    kind: Kind,
    namespace: &str,
    name: &str,
    at: &str,
    generation: i64,
    target: Option<&str>,
) -> Value {
    let mut annotations = serde_json::Map::new();
    annotations.insert(
        RESTART_GENERATION_ANNOTATION.into(),
        json!(generation.to_string()),
    );
    if let Some(t) = target {
        annotations.insert(RESTART_TARGET_ANNOTATION.into(), json!(t));
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": kind.as_str(),
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: at}}}},
    })
}

async fn apply(ctx: &Context, kind: Kind, ns: &str, name: &str, patch: &Value) -> Result<i64> {
    let (c, w) = (ctx.client.clone(), &ctx.writes);
    let meta = match kind {
        Kind::Deployment => {
            write::apply_keeping(&Api::<Deployment>::namespaced(c, ns), name, patch, w)
                .await?
                .0
                .metadata
        }
        Kind::StatefulSet => {
            write::apply_keeping(&Api::<StatefulSet>::namespaced(c, ns), name, patch, w)
                .await?
                .0
                .metadata
        }
        Kind::DaemonSet => {
            write::apply_keeping(&Api::<DaemonSet>::namespaced(c, ns), name, patch, w)
                .await?
                .0
                .metadata
        }
    };
    Ok(meta.generation.unwrap_or_default())
}

/// Restarts one workload and records the generation the restart produced (predicted from the
/// cached one; corrected by a second apply of the same values when another write came between).
pub async fn restart(
    ctx: &Context,
    w: &WorkloadFacts,
    namespace: &str,
    target: Option<&str>,
) -> Result<()> {
    let at = jiff::Timestamp::now().to_string();
    let predicted = w.generation + 1;
    let patch_with = |g| patch(w.kind, namespace, &w.name, &at, g, target);
    let mut produced = apply(ctx, w.kind, namespace, &w.name, &patch_with(predicted)).await?;
    if produced != predicted {
        produced = apply(ctx, w.kind, namespace, &w.name, &patch_with(produced)).await?;
    }
    Pending::of(ctx).record((w.kind, namespace.to_string(), w.name.clone()), produced);
    Ok(())
}
