//! Upgrade posture (`spec.upgrades`), mesh-wide: every istiod revision (Deployments labelled
//! `app=istiod`) with its version, every revision tag, and the revision and version of every
//! running injected proxy, read from pod metadata and the `istio-proxy` image tag only.
//!
//! Reported: namespaces and pods whose `istio.io/rev` names nothing, namespaces with both
//! injection labels, tags pointing at a revision that no longer runs, proxies more than
//! `maxMinorSkew` minor versions behind their istiod (or of a revision that no longer runs),
//! and revisions kept in use only by pods that are not running.
//!
//! It reads the caches the controller keeps anyway: the revisions and tags (`istio.rs`) and
//! the namespaces and running pods of the sidecars section (whose pod facts carry the proxy's
//! revision and version), so it adds no watch. Pods that are not running are listed (metadata,
//! from the API server's watch cache) only when a live revision has no other use.
//!
//! observe -> [`plan`] (pure) -> report.

mod memo;
mod plan;
mod restart;

pub use memo::*;
pub use plan::*;
pub use restart::*;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use crate::api::{Enforcement, MeshPolicy, UpgradesSpec, Violation};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::istio::{self, Revisions};
use crate::rules::RuleReport;
use crate::rules::sidecars::{self, Cache, Gate, Kind, PodFacts};
use crate::selector;
use crate::status::conditions::{Observed, Status, types};
use crate::status::messages::list;
use crate::status::reasons::{self, ViolationAction};

/// The watches whose caches the section reads (their names in `watch::Health`).
pub const WATCHES: [&str; 8] = [
    "Namespaces",
    "RunningPods",
    istio::REVISIONS_WATCH,
    istio::TAGS_WATCH,
    // The workloads whose generations and rollouts the restarts are planned from, and the
    // budgets the rollout gate reads.
    "Deployments",
    "StatefulSets",
    "DaemonSets",
    crate::rules::stores::PDBS,
];

/// A namespace's name and labels (shared with the sidecars section's cache of them).
type Labelled = (String, Arc<BTreeMap<String, String>>);

/// Namespaces (name, labels) and running pods (namespace, facts).
/// What the section observed: the namespaces, and the running pods (from the sidecars
/// section's index, or listed).
type Seen = (Vec<Labelled>, RunningPods);

/// The running pods.
enum RunningPods {
    /// In the sidecars section's index, by namespace.
    Cached(Cache),
    Listed(Vec<(String, Arc<PodFacts>)>),
}

/// The revisions and tags: the controller's cache, or listed without one.
async fn revisions(ctx: &Context) -> Result<Revisions> {
    if ctx.cache::<istio::IstioCache>().is_some() {
        ctx.revisions().await
    } else {
        istio::list_revisions(&ctx.client).await
    }
}

/// Namespaces and running pods: from the sidecars section's caches, or listed without them.
async fn observe(ctx: &Context) -> Result<Seen> {
    if let Some(c) = ctx.cache::<Cache>()
        && c.ready(Duration::from_secs(30)).await
    {
        return Ok((sidecars::namespace_labels(&c), RunningPods::Cached(c)));
    }
    let lp = ListParams::default().match_any();
    let namespaces = Api::<Namespace>::all(ctx.client.clone())
        .list_metadata(&lp)
        .await
        .map_err(|e| Error::kube("list Namespaces", e))?
        .items
        .into_iter()
        .map(|n| {
            (
                n.name_any(),
                Arc::new(n.metadata.labels.unwrap_or_default()),
            )
        })
        .collect();
    let pods = Api::<Pod>::all(ctx.client.clone())
        .list(&lp.fields("status.phase=Running"))
        .await
        .map_err(|e| Error::kube("list running Pods", e))?
        .items
        .iter()
        .map(|p| {
            (
                p.namespace().unwrap_or_default(),
                Arc::new(PodFacts::from(p)),
            )
        })
        .collect();
    Ok((namespaces, RunningPods::Listed(pods)))
}

/// Pods that are not running (pending, failed, finished) in `namespaces`, by the revision of
/// their injected proxy (`sidecar.istio.io/status`): metadata only.
async fn idle_pods(ctx: &Context, namespaces: &BTreeSet<&str>) -> Result<IdlePods> {
    let list = Api::<Pod>::all(ctx.client.clone())
        .list_metadata(
            &ListParams::default()
                .match_any()
                .fields("status.phase!=Running"),
        )
        .await
        .map_err(|e| Error::kube("list Pods that are not running", e))?;
    let mut out = IdlePods::new();
    for p in list.items {
        let ns = p.namespace().unwrap_or_default();
        if !namespaces.contains(ns.as_str()) {
            continue;
        }
        let injected = p
            .annotations()
            .get(istio::SIDECAR_STATUS)
            .and_then(|s| istio::injected_revision(s));
        if let Some(rev) = injected {
            out.entry(rev).or_default().push(format!(
                "{}/{}",
                p.namespace().unwrap_or_default(),
                p.name_any()
            ));
        }
    }
    for pods in out.values_mut() {
        pods.sort();
    }
    Ok(out)
}

/// The reasons of findings, most urgent first: the condition names the first one found.
const PRECEDENCE: [&str; 6] = [
    reasons::UNKNOWN_REVISION,
    reasons::TAG_WITHOUT_REVISION,
    reasons::REVISION_NOT_RUNNING,
    reasons::PROXY_VERSION_SKEW,
    reasons::INJECTION_LABELS_CONFLICT,
    reasons::REVISION_KEPT_BY_IDLE_PODS,
];

/// How the violation of a workload restarted in this pass ends (`meshwarden plan` lists the
/// restart itself, not as a deviation left alone).
pub const RESTARTED_NOW: &str = "restarted now";

/// Observes and plans the section; reports the result and sets the `proxies` metric.
pub async fn reconcile(
    ctx: &Context,
    policy: &MeshPolicy,
    spec: &UpgradesSpec,
    enforcement: Enforcement,
) -> RuleReport {
    let ctype = types::UPGRADES;
    if let Some(stale) = crate::rules::stale_caches(ctx, ctype, "upgrades", &WATCHES) {
        return stale;
    }
    let revisions = match revisions(ctx).await {
        Ok(r) => r,
        Err(e) => return RuleReport::failed(ctype, &e),
    };
    let (namespaces, pods) = match observe(ctx).await {
        Ok(o) => o,
        Err(e) => return RuleReport::failed(ctype, &e),
    };
    // The selected namespaces, and their running pods.
    let namespaces: Vec<Labelled> = namespaces
        .into_iter()
        .filter(|(_, labels)| {
            spec.namespace_selector
                .as_ref()
                .is_none_or(|sel| selector::matches(sel, labels))
        })
        .collect();
    let selected: BTreeSet<&str> = namespaces.iter().map(|(n, _)| n.as_str()).collect();
    let skew = spec.max_minor_skew;
    let mut plan = match &pods {
        // Each namespace's pods counted anew only when they changed since the policy's last
        // evaluation.
        RunningPods::Cached(c) => {
            let parts = match ctx.cache::<PodMemos>() {
                Some(m) => m.with(&policy.name_any(), |memo| {
                    memo.parts(skew, &revisions, &selected, &c.by_namespace.pods.read())
                }),
                None => PodMemo::default().parts(
                    skew,
                    &revisions,
                    &selected,
                    &c.by_namespace.pods.read(),
                ),
            };
            plan_parts(skew, &revisions, &namespaces, parts.iter().map(Arc::as_ref))
        }
        RunningPods::Listed(pods) => {
            let pod_refs: Vec<(&str, &PodFacts)> = pods
                .iter()
                .filter(|(ns, _)| selected.contains(ns.as_str()))
                .map(|(ns, p)| (ns.as_str(), p.as_ref()))
                .collect();
            plan(skew, &revisions, &namespaces, &pod_refs)
        }
    };
    if !plan.unused.is_empty() {
        match idle_pods(ctx, &selected).await {
            Ok(idle) => plan.findings.extend(idle_revisions(&plan.unused, &idle)),
            Err(e) => return RuleReport::failed(ctype, &e),
        }
    }
    ctx.metrics.set_proxies(&policy.name_any(), &plan.proxies);
    let restarts = match spec.restart_outdated {
        true => Some(
            restarts(
                ctx,
                &policy.name_any(),
                spec,
                enforcement,
                (&namespaces, &revisions),
                (&plan.outdated, &plan.orphaned),
            )
            .await,
        ),
        false => None,
    };
    let mut report = report(spec, &revisions, plan);
    if let Some(r) = restarts {
        r.apply_to(&mut report, spec);
        report.recheck_in = [report.recheck_in, r.recheck_in]
            .into_iter()
            .flatten()
            .min();
    }
    report
}

/// What the restarts did in one reconcile.
#[derive(Clone, Debug, Default)]
pub struct Restarts {
    pub plan: RestartPlan,
    /// Restarted now, and the restarts the API server refused (id, error).
    pub started: Vec<String>,
    pub failed: Vec<(String, String)>,
    /// Why nothing could be planned (no watch cache).
    pub unavailable: Option<String>,
    pub enforce: bool,
    /// When a restart held for a rollout that just completed may go.
    pub recheck_in: Option<std::time::Duration>,
}

/// Plans the restarts of the outdated workloads and, in Enforce, makes them.
async fn restarts(
    ctx: &Context,
    policy: &str,
    spec: &UpgradesSpec,
    enforcement: Enforcement,
    (namespaces, revisions): (&[Labelled], &Revisions),
    (outdated, orphaned): (&Outdated, &BTreeMap<Owner, String>),
) -> Restarts {
    let mut out = Restarts {
        enforce: enforcement == Enforcement::Enforce,
        ..Restarts::default()
    };
    let Some(cache) = ctx.cache::<Cache>() else {
        out.unavailable = Some("restarts need the controller's workload caches".into());
        return out;
    };
    let selected: BTreeMap<&str, &BTreeMap<String, String>> = namespaces
        .iter()
        .map(|(n, l)| (n.as_str(), l.as_ref()))
        .collect();
    let (pending, now) = (Pending::of(ctx), jiff::Timestamp::now());
    let mut workloads = Workloads::new();
    let mut add = |ns: Option<&String>, w: &Arc<crate::rules::sidecars::WorkloadFacts>| {
        let ns = ns.cloned().unwrap_or_default();
        if selected.contains_key(ns.as_str()) {
            // A sidecar write of this process the watch has not delivered is read as written.
            let w = cache.as_written(&ns, w);
            let rollout = restart_rollout(&w, &ns, &pending, now);
            workloads.insert((ns, w.kind, w.name.clone()), (w, rollout));
        }
    };
    for o in cache.deployments.state() {
        add(o.metadata.namespace.as_ref(), &o.facts);
    }
    for o in cache.statefulsets.state() {
        add(o.metadata.namespace.as_ref(), &o.facts);
    }
    for o in cache.daemonsets.state() {
        add(o.metadata.namespace.as_ref(), &o.facts);
    }
    let budgets = match out.enforce {
        true => Some(crate::rules::sidecars::budgets(ctx).await),
        false => None,
    };
    let gone_for = GoneSince::of(ctx).update(&orphaned.values().cloned().collect());
    let gate = |ns: &str, w: &crate::rules::sidecars::WorkloadFacts| {
        let labels = selected.get(ns).copied();
        let verdict = restart_gate(ns, labels, w, revisions, budgets.as_ref());
        if verdict != Gate::Go {
            return verdict;
        }
        // Proxies of a revision that is gone: only once it has been gone a while.
        let waits = orphaned
            .get(&(ns.to_string(), Some(w.kind), w.name.clone()))
            .and_then(|rev| debounce(rev, gone_for.get(rev).copied().unwrap_or_default()));
        if let Some(why) = waits {
            return Gate::Held(why);
        }
        // One rollout carries both changes: the sidecars section's.
        if cache.sidecars_will_roll(policy, &(w.kind, ns.to_string(), w.name.clone())) {
            return Gate::Held(
                "the sidecars section of this policy will roll it (its proxy resources change): its new pods get the current proxy then, so it is not restarted as well".into(),
            );
        }
        if let Some((why, _)) = restart::just_rolled_out(w, now) {
            return Gate::Held(why);
        }
        Gate::Go
    };
    let target = |ns: &str, w: &crate::rules::sidecars::WorkloadFacts| {
        selected
            .get(ns)
            .and_then(|labels| restart_target(labels, w, revisions))
    };
    out.plan = plan_restarts(
        outdated,
        &workloads,
        spec.max_concurrent_restarts,
        &gate,
        &target,
    );
    // A restart held for a rollout that just completed is looked at again once it may go.
    out.recheck_in = outdated
        .keys()
        .filter_map(|(ns, kind, name)| workloads.get(&(ns.clone(), (*kind)?, name.clone())))
        .filter_map(|(w, _)| restart::just_rolled_out(w, now).map(|(_, left)| left))
        .min();
    if !out.enforce {
        return out;
    }
    for ((ns, kind, name), decision) in &out.plan.decisions {
        let Some(kind) = kind.filter(|_| *decision == Restart::Now) else {
            continue;
        };
        let key = (ns.clone(), kind, name.clone());
        let Some((w, _)) = workloads.get(&key) else {
            continue;
        };
        match restart(ctx, w, ns, target(ns, w).as_deref()).await {
            Ok(()) => out.started.push(workload_id(&key)),
            Err(e) => out.failed.push((workload_id(&key), e.to_string())),
        }
    }
    out
}

impl Restarts {
    /// Adds the restarts to the section's report: actions on the outdated workloads'
    /// violations, corrections, the condition's reason and message.
    fn apply_to(&self, report: &mut RuleReport, spec: &UpgradesSpec) {
        let mut msg = vec![report.condition.message.clone()];
        if let Some(why) = &self.unavailable {
            msg.push(format!("nothing was restarted: {why}"));
        }
        for ((ns, kind, name), decision) in &self.plan.decisions {
            let id = format!("{}/{ns}/{name}", kind.map_or("Pod", Kind::as_str));
            let failed = self.failed.iter().find(|(f, _)| *f == id);
            let Some(v) = report.violations.iter_mut().find(|v| v.object == id) else {
                continue;
            };
            let (action, note) = match (decision, failed) {
                _ if !self.enforce => (ViolationAction::Reported, String::new()),
                (_, Some((_, e))) => (ViolationAction::Failed, format!("the restart failed: {e}")),
                (Restart::Now, None) => (ViolationAction::Reported, RESTARTED_NOW.into()),
                (Restart::Rolling, None) => (
                    ViolationAction::Reported,
                    "restarting (meshwarden restarted it)".into(),
                ),
                (Restart::Held(why), None) => (ViolationAction::Held, why.clone()),
                (Restart::Skipped(why), None) => (ViolationAction::Skipped, why.clone()),
            };
            v.action = action;
            if !note.is_empty() {
                v.message = format!("{}; {note}", v.message);
            }
        }
        report.corrected += i32::try_from(self.started.len()).unwrap_or(i32::MAX);
        for id in self.started.iter().take(5) {
            report
                .corrections
                .push(format!("{id}: restarted, its proxies are outdated"));
        }
        if !self.started.is_empty() {
            msg.push(format!("restarted {}", list(&self.started, 5)));
        }
        if !self.plan.rolling.is_empty() {
            msg.push(format!(
                "restarting because of meshwarden: {}",
                list(&self.plan.rolling, 5)
            ));
        }
        let held: Vec<(String, &String)> = self
            .plan
            .decisions
            .iter()
            .filter_map(|((ns, kind, name), d)| match d {
                Restart::Held(why) => Some((
                    format!("{}/{ns}/{name}", kind.map_or("Pod", Kind::as_str)),
                    why,
                )),
                _ => None,
            })
            .collect();
        if let Some((first, why)) = held.first().filter(|_| self.enforce) {
            msg.push(format!(
                "{} workload(s) wait to be restarted (maxConcurrentRestarts {}; first: {first}: {why})",
                held.len(),
                spec.max_concurrent_restarts
            ));
        }
        if !self.enforce && !self.plan.decisions.is_empty() {
            msg.push("Audit mode: nothing was restarted".into());
        }
        let stalled: Vec<String> = self.plan.stalled.iter().map(|(id, _)| id.clone()).collect();
        if let Some((_, why)) = self.plan.stalled.first() {
            msg.push(format!(
                "the restart of {} stalled ({why}); no other restart starts until it completes or is rolled back (kubectl rollout status)",
                list(&stalled, 5)
            ));
        }
        if let Some((id, e)) = self.failed.first() {
            msg.push(format!(
                "{} restart(s) failed (first: {id}: {e}); retried at the next reconcile",
                self.failed.len()
            ));
        }
        let reason = if !self.plan.stalled.is_empty() {
            Some(reasons::ROLLOUT_STALLED)
        } else if !self.failed.is_empty() {
            Some(reasons::WRITE_FAILED)
        } else {
            None
        };
        if let Some(reason) = reason {
            report.condition.status = Status::False;
            report.condition.reason = reason.into();
        }
        report.condition.message = msg.join(". ");
    }
}

/// The section's report from its plan (pure).
pub fn report(spec: &UpgradesSpec, revisions: &Revisions, plan: Plan) -> RuleReport {
    let ctype = types::UPGRADES;
    let mut report = RuleReport::new(Observed::new(ctype, Status::True, reasons::COMPLIANT, ""));
    report.targets = i32::try_from(plan.pods).unwrap_or(i32::MAX);
    report.compliant = i32::try_from(plan.pods - plan.outdated_pods).unwrap_or(i32::MAX);
    let revs: Vec<String> = plan
        .status
        .revisions
        .iter()
        .map(|r| format!("{} ({})", r.name, r.version))
        .collect();
    let mut msg = vec![if revs.is_empty() {
        "no istiod revision runs (no Deployment labelled app=istiod)".to_string()
    } else {
        format!("istiod revisions: {}", revs.join(", "))
    }];
    if !revisions.settling.is_empty() {
        let settling: Vec<String> = revisions.settling.iter().cloned().collect();
        msg.push(format!(
            "istiod {} rolls out (or its new pods are not ready): its proxies are judged once its new version serves on every replica",
            list(&settling, 5)
        ));
    }
    if !plan.status.tags.is_empty() {
        let tags: Vec<String> = plan
            .status
            .tags
            .iter()
            .map(|t| format!("{} -> {}", t.name, t.revision))
            .collect();
        msg.push(format!("tags: {}", tags.join(", ")));
    }
    let counts: Vec<String> = plan
        .proxies
        .iter()
        .map(|((r, v), n)| format!("{r}/{v}: {n}"))
        .collect();
    msg.push(format!(
        "{} running proxies ({}), {} of them outdated (maxMinorSkew {})",
        plan.pods,
        if counts.is_empty() {
            "none".to_string()
        } else {
            counts.join(", ")
        },
        plan.outdated_pods,
        spec.max_minor_skew
    ));
    let mut by_reason: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for f in &plan.findings {
        by_reason
            .entry(f.reason)
            .or_default()
            .push(f.object.clone());
        report.violations.push(Violation {
            rule: ctype.into(),
            object: f.object.clone(),
            message: f.message.clone(),
            action: ViolationAction::Reported,
        });
    }
    for reason in PRECEDENCE {
        if let Some(objects) = by_reason.get(reason) {
            msg.push(format!("{reason}: {}", list(objects, 5)));
        }
    }
    let first = PRECEDENCE.iter().find(|r| by_reason.contains_key(**r));
    let (status, reason) = match first {
        Some(r) => (Status::False, *r),
        None if revisions.live.is_empty() && !revisions.any => (Status::False, reasons::NO_TARGETS),
        None => (Status::True, reasons::COMPLIANT),
    };
    report.condition = Observed::new(ctype, status, reason, msg.join(". "));
    report.upgrades = Some(plan.status);
    report
}

#[cfg(test)]
mod tests;
