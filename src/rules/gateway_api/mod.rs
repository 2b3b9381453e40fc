//! High availability of the gateways and waypoints istiod deploys for Gateway API Gateways.
//!
//! istiod renders and force-applies their Deployment, Service, HPA and PDB on every change,
//! so meshwarden never patches those. Since Istio 1.26 istiod takes overlays from a ConfigMap
//! labelled `gateway.istio.io/defaults-for-class: <class>` in its own namespace; meshwarden
//! keeps one per declared class (Enforce), owned by the policy, and only where nobody else
//! keeps the class's defaults (istiod reads only the oldest). What istiod renders from it is
//! then judged by what runs, as for the other HA targets. Gateways selected by name get a
//! ConfigMap of their own that their `parametersRef` names (module `gateways`). Removing the
//! section, switching to Audit or deleting the policy removes the ConfigMaps (and the
//! references), and afterwards the HPA and PDB istiod rendered from them, which istiod itself
//! leaves behind.

pub mod cache;
mod gateways;
pub(crate) mod observe;
pub mod plan;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::api::Api;

use crate::api::{
    Enforcement, GatewayApiSpec, GatewayPosture, MeshPolicy, ReplicasSpec, Violation,
};
use crate::context::Context;
use crate::error::Result;
use crate::rules::RuleReport;
use crate::rules::ha::{self, HaRules, outcome};
use crate::status::conditions::{Observed, Status, types};
use crate::status::messages;
use crate::status::reasons::{self, ViolationAction};
use crate::telemetry::ha::TargetOutcome;
use crate::write;
use plan::{ClassPlan, GatewayPlan, Support};

/// The finalizer that lets meshwarden remove what istiod rendered from its ConfigMaps before
/// the policy goes (the garbage collector would remove the ConfigMap only).
pub const FINALIZER: &str = "meshwarden.io/gateway-api";

/// How soon a pass that removed something looks again (istiod re-renders within a second).
const AGAIN: std::time::Duration = std::time::Duration::from_secs(2);
/// How soon a pass looks again at a Gateway selected by name that is missing or references
/// somebody else's parameters: Gateways are not watched (a change of one that istiod renders
/// shows in its Deployment, which is; these two may change nothing istiod renders).
const UNWATCHED: std::time::Duration = std::time::Duration::from_secs(15);

fn ctype() -> &'static str {
    types::GATEWAY_API_HA
}

fn has_finalizer(policy: &MeshPolicy) -> bool {
    policy.finalizers().iter().any(|f| f == FINALIZER)
}

/// The annotation meshwarden keeps on a policy that may hold Gateways selected by name (their
/// `parametersRef` set to its ConfigMaps): only such a policy reads the Gateways (a list), to
/// find those it must let go; the others never do.
pub const HOLDS_GATEWAYS: &str = "meshwarden.io/gateway-parameters";

/// Whether the policy carries [`HOLDS_GATEWAYS`].
pub(crate) fn holds_gateways(policy: &MeshPolicy) -> bool {
    policy.annotations().contains_key(HOLDS_GATEWAYS)
}

/// Sets [`FINALIZER`] and [`HOLDS_GATEWAYS`] as `(finalizer, gateways)` say, by server-side
/// apply: meshwarden owns that finalizer entry and that annotation only, and an apply without
/// one removes it. Not in a plan's dry runs.
async fn set_marks(ctx: &Context, policy: &MeshPolicy, marks: (bool, bool)) -> Result<()> {
    let (finalizer, gateways) = marks;
    if ctx.writes.dry_runs().is_some() || (has_finalizer(policy), holds_gateways(policy)) == marks {
        return Ok(());
    }
    let api: Api<MeshPolicy> = Api::all(ctx.client.clone());
    let mut meta = serde_json::json!({"name": policy.name_any()});
    if finalizer {
        meta["finalizers"] = serde_json::json!([FINALIZER]);
    }
    if gateways {
        meta["annotations"] = serde_json::json!({HOLDS_GATEWAYS: "true"});
    }
    let patch = serde_json::json!({
        "apiVersion": "meshwarden.io/v1alpha1", "kind": "MeshPolicy", "metadata": meta
    });
    write::apply(&api, &policy.name_any(), &patch, &ctx.writes)
        .await
        .map(|_| ())
}

/// What one pass over meshwarden's class-defaults and per-Gateway ConfigMaps did.
#[derive(Default)]
struct Synced {
    per_class: BTreeMap<String, ClassPlan>,
    /// The Gateways selected by name.
    selected: Vec<gateways::Selected>,
    corrections: Vec<String>,
    failures: Vec<String>,
    /// Something was removed: look again soon for what istiod leaves behind.
    pending: bool,
    /// Nothing of meshwarden's was there at the start of the pass.
    clean: bool,
    /// No Gateway referenced one of meshwarden's ConfigMaps, and none of those was there, at
    /// the start of the pass.
    gateways_clean: bool,
}

/// Holds meshwarden's class-defaults ConfigMaps at `wants` (class -> overlays) and the
/// Gateways `selected` by name, writing only when `write`; removes the others and what istiod
/// rendered from removed overlays.
async fn sync(
    ctx: &Context,
    policy: &MeshPolicy,
    (wants, selected): (
        &BTreeMap<String, BTreeMap<String, String>>,
        Option<&GatewayApiSpec>,
    ),
    write: bool,
) -> Result<Synced> {
    let name = policy.name_any();
    let ns = ctx.istio_namespace.clone();
    let found = observe::class_defaults(ctx).await?;
    let mut live: BTreeMap<String, (String, BTreeMap<String, String>)> = BTreeMap::new();
    for f in found
        .iter()
        .filter(|f| f.policy.as_deref() == Some(name.as_str()))
    {
        if let Some(data) = observe::own_data(ctx, &ns, &f.name).await? {
            live.insert(f.class.clone(), (f.name.clone(), data));
        }
    }
    let rendered = observe::rendered(ctx, &name).await?;
    let mut out = Synced {
        clean: live.is_empty() && rendered.is_empty(),
        ..Default::default()
    };
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let mut kept = BTreeSet::new();
    for (class, want) in wants {
        let of_class: Vec<plan::Found> = found
            .iter()
            .filter(|f| &f.class == class)
            .cloned()
            .collect();
        let decided = plan::decide(want, live.get(class).map(|(_, d)| d), &of_class);
        let wanted = !want.is_empty() && !matches!(decided, ClassPlan::Foreign(_));
        if write && wanted {
            kept.insert(class.clone());
            if decided == ClassPlan::Write {
                let cm = plan::config_map_name(&name, class);
                let patch =
                    plan::config_map(&name, class, &ns, want, write::owner_reference(policy));
                match write::apply(&cms, &cm, &patch, &ctx.writes).await {
                    Ok(_) => out.corrections.push(format!(
                        "ConfigMap/{ns}/{cm}: the defaults of GatewayClass {class} ({}), which istiod renders into each of its gateways",
                        want.keys().cloned().collect::<Vec<_>>().join(", ")
                    )),
                    Err(e) => out.failures.push(format!("ConfigMap/{ns}/{cm}: {e}")),
                }
            }
        }
        out.per_class.insert(class.clone(), decided);
    }
    for (class, (cm, _)) in live.iter().filter(|(c, _)| !kept.contains(*c)) {
        out.pending = true;
        match write::delete(&cms, cm, &ctx.writes).await {
            Ok(()) => out.corrections.push(format!(
                "ConfigMap/{ns}/{cm}: removed (GatewayClass {class} is no longer held by this policy in Enforce)"
            )),
            Err(e) => out.failures.push(format!("ConfigMap/{ns}/{cm}: {e}")),
        }
    }
    let entries = selected.map_or((&[][..], &[][..]), |s| (&s.gateways[..], &s.classes[..]));
    let live_keys = plan::LiveKeys {
        classes: live
            .iter()
            .map(|(c, (_, d))| (c.clone(), d.keys().cloned().collect()))
            .collect(),
        gateways: gateways::sync(ctx, policy, entries, write, &mut out).await?,
    };
    for r in plan::left_behind(&rendered, &live_keys) {
        out.pending = true;
        let removed = if r.kind == "HorizontalPodAutoscaler" {
            let api: Api<HorizontalPodAutoscaler> =
                Api::namespaced(ctx.client.clone(), &r.namespace);
            write::delete(&api, &r.name, &ctx.writes).await
        } else {
            let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), &r.namespace);
            write::delete(&api, &r.name, &ctx.writes).await
        };
        let id = ha::object_id(r.kind, &r.namespace, &r.name);
        match removed {
            Ok(()) => out.corrections.push(format!(
                "{id}: removed (istiod rendered it from meshwarden's defaults of GatewayClass {}, which are gone, and leaves it behind)",
                r.class
            )),
            Err(e) => out.failures.push(format!("{id}: {e}")),
        }
    }
    Ok(out)
}

/// The section is not in the policy: what meshwarden added for it is removed (while the
/// policy carries [`FINALIZER`], the mark that it may have added something).
pub async fn release(ctx: &Context, policy: &MeshPolicy) -> RuleReport {
    let mut report = RuleReport::not_configured(ctype(), "gatewayApi");
    if !has_finalizer(policy) {
        return report;
    }
    match sync(ctx, policy, (&BTreeMap::new(), None), false).await {
        Ok(s) => {
            if s.clean
                && let Err(e) = set_marks(ctx, policy, (false, false)).await
            {
                return RuleReport::failed(ctype(), &e);
            }
            report.corrected = i32::from(!s.corrections.is_empty());
            report.corrections = s.corrections;
            report.recheck_in = s.pending.then_some(AGAIN);
            report
        }
        Err(e) => RuleReport::failed(ctype(), &e),
    }
}

/// A policy being deleted: removes what meshwarden added; true once nothing is left and the
/// finalizer is gone.
pub async fn finalize(ctx: &Context, policy: &MeshPolicy) -> Result<bool> {
    if !has_finalizer(policy) {
        return Ok(true);
    }
    let s = sync(ctx, policy, (&BTreeMap::new(), None), false).await?;
    if s.clean {
        set_marks(ctx, policy, (false, false)).await?;
    }
    Ok(s.clean)
}

/// The HA rules of a class or Gateway, as the outcome judge reads them.
fn rules_of(class: &GatewayPosture) -> HaRules {
    HaRules {
        replicas: class.replicas.as_ref().map(|r| ReplicasSpec { min: r.min }),
        budget: class.disruption_budget.clone(),
        spread: class.spread.as_ref().map(Into::into),
        resources: class.resources.clone(),
        container: "istio-proxy",
    }
}

/// Evaluates the section: istiod's version, the class defaults (written in Enforce), and what
/// runs for every Gateway of the declared classes.
pub async fn reconcile(
    ctx: &Context,
    policy: &MeshPolicy,
    spec: &GatewayApiSpec,
    enforcement: Enforcement,
) -> RuleReport {
    match evaluate(ctx, policy, spec, enforcement).await {
        Ok(r) => r,
        Err(e) => RuleReport::failed(ctype(), &e),
    }
}

async fn evaluate(
    ctx: &Context,
    policy: &MeshPolicy,
    spec: &GatewayApiSpec,
    enforcement: Enforcement,
) -> Result<RuleReport> {
    let name = policy.name_any();
    let enforce = enforcement == Enforcement::Enforce;
    let support = plan::support(&observe::istiod_versions(ctx).await?);
    let wants: BTreeMap<String, BTreeMap<String, String>> = spec
        .classes
        .iter()
        .map(|c| (c.class_name.clone(), plan::overlays(&c.posture, &name)))
        .collect();
    let write = enforce && support == Support::Yes;
    // Marked before anything is written: a pass that stops half-way still knows to look.
    let marked = holds_gateways(policy) || !spec.gateways.is_empty();
    if write {
        set_marks(ctx, policy, (true, marked)).await?;
    }
    let synced = sync(ctx, policy, (&wants, Some(spec)), write).await?;
    if write && marked && spec.gateways.is_empty() && synced.gateways_clean {
        set_marks(ctx, policy, (true, false)).await?;
    }
    let mut report = RuleReport::new(Observed::new(ctype(), Status::True, reasons::COMPLIANT, ""));
    let mut msg: Vec<String> = Vec::new();
    let mut reason: Option<&'static str> = None;
    let ns = &ctx.istio_namespace;
    let violation = |object: String, message: String| Violation {
        rule: ctype().to_string(),
        object,
        message,
        action: ViolationAction::Reported,
    };
    // The class defaults.
    for (class, want) in &wants {
        let cm = plan::config_map_name(&name, class);
        let cm_id = ha::object_id("ConfigMap", ns, &cm);
        let found = match (unsupported(&support), synced.per_class.get(class)) {
            (Some(r), _) => Some((r.0, cm_id, r.1)),
            (None, Some(ClassPlan::Foreign(holders))) => {
                let holder =
                    ha::object_id("ConfigMap", ns, holders.first().map_or("", |h| h.as_str()));
                let advice = plan::advice(class, want, holders);
                Some((reasons::CLASS_DEFAULTS_EXIST, holder, advice))
            }
            (None, Some(ClassPlan::Write)) if !enforce && !want.is_empty() => Some((
                reasons::NON_COMPLIANT,
                cm_id,
                format!(
                    "the defaults of GatewayClass {class} ({}) are not in place; Enforce writes them",
                    keys(want)
                ),
            )),
            _ => None,
        };
        if let Some((r, object, message)) = found {
            reason.get_or_insert(r);
            report.violations.push(violation(object, message));
        }
    }
    // The Gateways selected by name.
    for s in &synced.selected {
        let gw = &s.gateway;
        let gw_id = ha::object_id("Gateway", &gw.namespace, &gw.name);
        let found = match (unsupported(&support), &s.plan) {
            (_, GatewayPlan::Missing) => Some((
                reasons::GATEWAY_NOT_FOUND,
                format!("Gateway {gw} selected by name does not exist"),
            )),
            (Some(r), _) => Some(r),
            (None, GatewayPlan::Foreign(holder)) => Some((
                reasons::GATEWAY_PARAMETERS_EXIST,
                plan::gateway_advice(gw, holder, &s.want),
            )),
            (None, GatewayPlan::Write { .. }) if !enforce && !s.want.is_empty() => Some((
                reasons::NON_COMPLIANT,
                format!(
                    "the parameters of Gateway {gw} ({}) are not in place; Enforce writes them",
                    keys(&s.want)
                ),
            )),
            _ => None,
        };
        if let Some((r, message)) = found {
            reason.get_or_insert(r);
            report.violations.push(violation(gw_id, message));
        }
    }
    // What runs: the gateways of the classes, but those selected by name, and those.
    let nodes = ha::observe_nodes(ctx).await;
    let mut judged = Judged::default();
    let named: BTreeSet<(&str, &str)> = synced
        .selected
        .iter()
        .map(|s| (s.gateway.namespace.as_str(), s.gateway.name.as_str()))
        .collect();
    for class in &spec.classes {
        for namespace in observe::namespaces_of_class(ctx, &class.class_name).await? {
            let group = group(
                format!("GatewayClass {}", class.class_name),
                (&namespace, (plan::CLASS_LABEL, &class.class_name)),
                &class.posture,
                enforcement,
            );
            let skip: BTreeSet<&str> = named
                .iter()
                .filter(|(n, _)| *n == namespace)
                .map(|(_, g)| *g)
                .collect();
            judged.add(ctx, &group, nodes.as_ref().ok(), &skip).await?;
        }
    }
    for s in synced.selected.iter().filter(|s| s.class.is_some()) {
        let gw = &s.gateway;
        let group = group(
            format!("Gateway {gw}"),
            (&gw.namespace, (plan::GATEWAY_NAME_LABEL, &gw.name)),
            &s.posture,
            enforcement,
        );
        judged
            .add(ctx, &group, nodes.as_ref().ok(), &BTreeSet::new())
            .await?;
    }
    let Judged {
        shortfalls,
        achieved,
        gateways,
    } = judged;
    ctx.metrics.ha.set(&name, ctype(), &achieved);
    let graded = outcome::grade(
        &outcome::Since::of(ctx),
        &format!("{name}/{}", ctype()),
        shortfalls,
        ctx.availability_grace,
    );
    report.recheck_in = graded.recheck;
    let short: BTreeSet<&str> = graded
        .counted
        .iter()
        .chain(graded.waiting.iter().map(|(s, _)| s))
        .map(|s| s.target.as_str())
        .collect();
    report.targets = i32::try_from(gateways.len()).unwrap_or(i32::MAX);
    let class_ok = report.violations.is_empty();
    report.compliant = match class_ok {
        true => i32::try_from(
            gateways
                .iter()
                .filter(|g| !short.contains(g.as_str()))
                .count(),
        )
        .unwrap_or(0),
        false => 0,
    };
    for s in &graded.counted {
        report.violations.push(violation(
            s.object.clone(),
            format!("{}: {}", s.reason, s.message),
        ));
    }
    let held: Vec<String> = spec
        .classes
        .iter()
        .map(|c| format!("GatewayClass {}", c.class_name))
        .chain(
            synced
                .selected
                .iter()
                .map(|s| format!("Gateway {}", s.gateway)),
        )
        .collect();
    msg.push(format!(
        "{} of {} gateway(s) of {} compliant",
        report.compliant,
        report.targets,
        held.join(", ")
    ));
    if !synced.corrections.is_empty() {
        report.corrected = 1;
        msg.push(format!("corrected: {}", synced.corrections.join("; ")));
    }
    report.corrections = synced.corrections;
    if !synced.failures.is_empty() {
        msg.push(format!(
            "could not write {}; meshwarden retries with backoff",
            synced.failures.join("; ")
        ));
    }
    if let Some(s) = messages::deviations_sentence(&report.violations, 3) {
        msg.push(s);
        if !enforce {
            msg.push("Audit mode: nothing was changed".into());
        }
    }
    msg.extend(outcome::waiting_sentence(
        &graded.waiting,
        ctx.availability_grace,
    ));
    let mut again = synced.pending.then_some(AGAIN);
    if synced
        .selected
        .iter()
        .any(|s| matches!(s.plan, GatewayPlan::Foreign(_) | GatewayPlan::Missing))
    {
        again = again.or(Some(UNWATCHED));
    }
    if let Some(again) = again {
        report.recheck_in = Some(report.recheck_in.map_or(again, |r| r.min(again)));
    }
    let (status, reason) = if !synced.failures.is_empty() {
        (Status::False, reasons::WRITE_FAILED)
    } else if let Some(r) = reason {
        (Status::False, r)
    } else if let Some(r) = outcome::worst(&graded.counted) {
        (Status::False, r)
    } else if !report.violations.is_empty() {
        (Status::False, reasons::NON_COMPLIANT)
    } else if !graded.waiting.is_empty() {
        (Status::False, reasons::PROGRESSING)
    } else if report.corrected > 0 {
        (Status::True, reasons::CORRECTED)
    } else {
        (Status::True, reasons::COMPLIANT)
    };
    report.condition = Observed::new(ctype(), status, reason, msg.join(". "));
    if !write && synced.clean {
        set_marks(ctx, policy, (false, false)).await?;
    }
    Ok(report)
}

/// Why nothing is written for any class or Gateway when istiod does not read its
/// customization ConfigMaps: (reason, message).
fn unsupported(support: &Support) -> Option<(&'static str, String)> {
    match support {
        Support::Yes => None,
        Support::TooOld(v) => Some((
            reasons::ISTIO_TOO_OLD,
            format!(
                "istiod {v} does not read class-defaults or per-Gateway ConfigMaps (Istio 1.26 and later do), so meshwarden writes none: create a HorizontalPodAutoscaler and a PodDisruptionBudget named after each gateway's Deployment, as Istio's documentation for earlier releases describes (after an upgrade to 1.26 istiod renders objects of the same names and skips those without the label gateway.istio.io/managed, so remove them then), or upgrade istiod"
            ),
        )),
        Support::Unknown(why) => Some((
            reasons::ISTIO_VERSION_UNKNOWN,
            format!(
                "{why}: meshwarden writes class defaults and per-Gateway parameters only for an istiod known to read them (Istio 1.26 and later)"
            ),
        )),
    }
}

fn keys(want: &BTreeMap<String, String>) -> String {
    want.keys().cloned().collect::<Vec<_>>().join(", ")
}

/// The Deployments istiod rendered in `namespace` that carry label `(key, value)`, held at
/// `posture`.
fn group(
    label: String,
    (namespace, (key, value)): (&str, (&str, &str)),
    posture: &GatewayPosture,
    enforcement: Enforcement,
) -> ha::Group {
    ha::Group {
        label,
        namespace: namespace.to_string(),
        selector: LabelSelector {
            match_labels: Some([(key.to_string(), value.to_string())].into()),
            ..Default::default()
        },
        rules: rules_of(posture),
        enforcement,
    }
}

/// What runs, judged gateway by gateway.
#[derive(Default)]
struct Judged {
    shortfalls: Vec<outcome::Shortfall>,
    achieved: Vec<TargetOutcome>,
    /// The gateways' Deployments, as object ids.
    gateways: Vec<String>,
}

impl Judged {
    /// Judges the Deployments of `group`, but those rendered for the Gateways named `skip`.
    async fn add(
        &mut self,
        ctx: &Context,
        group: &ha::Group,
        nodes: Option<&ha::nodes::Nodes>,
        skip: &BTreeSet<&str>,
    ) -> Result<()> {
        let (observations, _) = ha::observe(ctx, group).await?;
        for obs in &observations {
            let gateway = obs
                .deployment
                .labels()
                .get(plan::GATEWAY_NAME_LABEL)
                .map(String::as_str);
            if gateway.is_some_and(|g| skip.contains(g)) {
                continue;
            }
            let judged = outcome::judge(&group.rules, obs, nodes);
            let deployment = obs.deployment.name_any();
            self.achieved.push(TargetOutcome {
                namespace: group.namespace.clone(),
                deployment: deployment.clone(),
                available: judged.available,
                wanted: judged.wanted,
                zones: judged.zones,
                disruptions_allowed: judged.disruptions_allowed,
            });
            self.gateways
                .push(ha::object_id("Deployment", &group.namespace, &deployment));
            self.shortfalls.extend(judged.shortfalls);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
