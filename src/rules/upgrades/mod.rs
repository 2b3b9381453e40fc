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

mod plan;

pub use plan::*;

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
use crate::rules::sidecars::{Cache, PodFacts};
use crate::selector;
use crate::status::conditions::{Observed, Status, types};
use crate::status::messages::list;
use crate::status::reasons::{self, ViolationAction};

/// The watches whose caches the section reads (their names in `watch::Health`).
pub const WATCHES: [&str; 4] = [
    "Namespaces",
    "RunningPods",
    istio::REVISIONS_WATCH,
    istio::TAGS_WATCH,
];

/// Namespaces (name, labels) and running pods (namespace, facts).
type Seen = (
    Vec<(String, BTreeMap<String, String>)>,
    Vec<(String, Arc<PodFacts>)>,
);

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
        let namespaces = c
            .namespaces
            .state()
            .iter()
            .map(|n| (n.name_any(), n.metadata.labels.clone().unwrap_or_default()))
            .collect();
        let pods = c
            .pods
            .state()
            .iter()
            .map(|p| {
                (
                    p.metadata.namespace.clone().unwrap_or_default(),
                    p.facts.clone(),
                )
            })
            .collect();
        return Ok((namespaces, pods));
    }
    let lp = ListParams::default().match_any();
    let namespaces = Api::<Namespace>::all(ctx.client.clone())
        .list_metadata(&lp)
        .await
        .map_err(|e| Error::kube("list Namespaces", e))?
        .items
        .into_iter()
        .map(|n| (n.name_any(), n.metadata.labels.unwrap_or_default()))
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
    Ok((namespaces, pods))
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
    let namespaces: Vec<(String, BTreeMap<String, String>)> = namespaces
        .into_iter()
        .filter(|(_, labels)| {
            spec.namespace_selector
                .as_ref()
                .is_none_or(|sel| selector::matches(sel, labels))
        })
        .collect();
    let selected: BTreeSet<&str> = namespaces.iter().map(|(n, _)| n.as_str()).collect();
    let pod_refs: Vec<(&str, &PodFacts)> = pods
        .iter()
        .filter(|(ns, _)| selected.contains(ns.as_str()))
        .map(|(ns, p)| (ns.as_str(), p.as_ref()))
        .collect();
    let mut plan = plan(spec.max_minor_skew, &revisions, &namespaces, &pod_refs);
    if !plan.unused.is_empty() {
        match idle_pods(ctx, &selected).await {
            Ok(idle) => plan.findings.extend(idle_revisions(&plan.unused, &idle)),
            Err(e) => return RuleReport::failed(ctype, &e),
        }
    }
    ctx.metrics.set_proxies(&policy.name_any(), &plan.proxies);
    report(spec, enforcement, &revisions, plan)
}

/// The section's report from its plan (pure).
pub fn report(
    spec: &UpgradesSpec,
    enforcement: Enforcement,
    revisions: &Revisions,
    plan: Plan,
) -> RuleReport {
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
            action: ViolationAction::Reported.into(),
        });
    }
    for reason in PRECEDENCE {
        if let Some(objects) = by_reason.get(reason) {
            msg.push(format!("{reason}: {}", list(objects, 5)));
        }
    }
    if spec.restart_outdated && !plan.outdated.is_empty() {
        msg.push(format!(
            "restartOutdated is not implemented in this version ({enforcement:?}): nothing was restarted"
        ));
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
