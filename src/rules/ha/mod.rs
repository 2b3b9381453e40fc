//! High availability of istiod revisions and mesh gateways: replicas (through the HPA when
//! one owns the count), exactly one PodDisruptionBudget that never blocks node drains,
//! spreading over nodes and zones, and container resources.

mod budget;
mod fight;
mod plan;
pub mod source;
pub mod values;

use std::collections::HashMap;
use std::time::Instant;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::Value;

use crate::api::{
    DisruptionBudgetSpec, Enforcement, MeshPolicy, ReplicasSpec, ResourcesSpec, SpreadSpec,
    Violation,
};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::rules::RuleReport;
use crate::selector;
use crate::status::conditions::{Observed, Status};
use crate::status::messages::{self, Contested};
use crate::status::reasons::{self, ViolationAction};
use crate::write::fight::{TakeoverKey, TakeoverPart};
use crate::write::{self, FightKey, MANAGED_BY, POLICY_LABEL};

pub use budget::allowed_disruptions;
pub use plan::{plan, resource_deviations};

pub(crate) const HOSTNAME: &str = "kubernetes.io/hostname";
pub(crate) const ZONE: &str = "topology.kubernetes.io/zone";

/// The rules of one section (control plane or one gateway entry), resolved.
#[derive(Clone, Debug, Default)]
pub struct HaRules {
    pub replicas: Option<ReplicasSpec>,
    pub budget: Option<DisruptionBudgetSpec>,
    pub spread: Option<SpreadSpec>,
    pub resources: Option<ResourcesSpec>,
    /// Container whose resources are held (`discovery` or `istio-proxy`).
    pub container: &'static str,
}

/// What was read about one target Deployment.
#[derive(Clone, Debug)]
pub struct Observation {
    pub deployment: Deployment,
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// Names of further HPAs targeting the same Deployment (there must be at most one).
    pub other_hpas: Vec<String>,
    /// Every PodDisruptionBudget in the namespace whose selector matches the pods.
    pub pdbs: Vec<PodDisruptionBudget>,
}

/// A deviation found on a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Kind/namespace/name of the object that deviates.
    pub object: String,
    /// The field (for fight tracking and messages), e.g. `spec.minReplicas`.
    pub field: String,
    pub message: String,
    /// Whether meshwarden can correct it (false: report only, e.g. somebody else's PDB).
    pub fixable: bool,
    /// A budget that forbids every disruption.
    pub blocks_drain: bool,
    /// Managers other than meshwarden that own the deviating field now (from `managedFields`):
    /// when meshwarden set the field before, they reverted it.
    pub changed_by: Vec<String>,
    /// Where the field lives in `managedFields` (e.g. `["f:spec", "f:minReplicas"]`): whose
    /// writes own it is read there before and after a correction (see [`write::foreign_writes`]).
    pub owned: Vec<Vec<String>>,
}

/// What to do to a PodDisruptionBudget.
#[derive(Clone, Debug, PartialEq)]
pub enum PdbAction {
    Apply { name: String, patch: Value },
    Delete { name: String },
}

/// Everything the plan for one Deployment wants written.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub findings: Vec<Finding>,
    pub deployment_patch: Option<Value>,
    pub hpa_patch: Option<(String, Value)>,
    pub pdb: Option<PdbAction>,
    /// The Deployment patch changes the pod template: its pods roll.
    pub rolls_pods: bool,
    /// (field, manager) pairs meshwarden takes over by writing.
    pub takeovers: Vec<(String, String)>,
    /// Messages that are not deviations but worth a line (HPA handling).
    pub notes: Vec<String>,
}

pub(crate) fn object_id(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind}/{ns}/{name}")
}

/// Which section a report is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    ControlPlane,
    Gateways,
}

impl Section {
    pub fn condition_type(self) -> &'static str {
        match self {
            Section::ControlPlane => crate::status::conditions::types::CONTROL_PLANE_HA,
            Section::Gateways => crate::status::conditions::types::GATEWAY_HA,
        }
    }
}

/// One group of targets with its rules (the control plane, or one gateway entry).
pub struct Group {
    pub label: String,
    pub namespace: String,
    pub selector: String,
    pub rules: HaRules,
    pub enforcement: Enforcement,
}

/// Reads the targets of a group: Deployments by label, the HPA targeting each, and the
/// PodDisruptionBudgets selecting each one's pods. PodDisruptionBudgets the ClusterRole does
/// not let meshwarden read (403) are returned as that error, so the other rules still hold.
pub async fn observe(ctx: &Context, group: &Group) -> Result<(Vec<Observation>, Option<Error>)> {
    let ns = &group.namespace;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    // Served from the API server's watch cache (resourceVersion 0): it already holds the change
    // that triggered this reconcile, and a consistent read would first wait for the cache to
    // catch up with etcd, which costs tens of milliseconds per list.
    let lp = ListParams::default().match_any().labels(&group.selector);
    let (deps, hpas, pdbs) = tokio::try_join!(
        async {
            deployments
                .list(&lp)
                .await
                .map_err(|e| Error::kube(format!("list Deployments in {ns}"), e))
        },
        async {
            hpas.list(&ListParams::default().match_any())
                .await
                .map_err(|e| Error::kube(format!("list HorizontalPodAutoscalers in {ns}"), e))
        },
        async {
            match pdbs.list(&ListParams::default().match_any()).await {
                Ok(list) => Ok((list.items, None)),
                Err(e) => {
                    let e = Error::kube(format!("list PodDisruptionBudgets in {ns}"), e);
                    match e.status_code() {
                        Some(403) => Ok((Vec::new(), Some(e))),
                        _ => Err(e),
                    }
                }
            }
        },
    )?;
    let (pdbs, pdbs_refused) = pdbs;
    let mut out = Vec::new();
    for d in deps.items {
        let name = d.name_any();
        let mut targeting = hpas.items.iter().filter(|h| {
            h.spec.as_ref().is_some_and(|s| {
                s.scale_target_ref.kind == "Deployment" && s.scale_target_ref.name == name
            })
        });
        let hpa = targeting.next().cloned();
        let other_hpas = targeting.map(|h| h.name_any()).collect();
        let labels = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let matching = pdbs
            .iter()
            .filter(|b| {
                b.spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .is_some_and(|sel| {
                        // An empty selector in policy/v1 selects every pod of the namespace.
                        selector::matches(sel, &labels)
                    })
            })
            .cloned()
            .collect();
        out.push(Observation {
            deployment: d,
            hpa,
            other_hpas,
            pdbs: matching,
        });
    }
    Ok((out, pdbs_refused))
}

/// PodDisruptionBudgets meshwarden created for this policy in the group's namespace
/// (`<deployment>-meshwarden`) whose Deployment no longer exists.
async fn left_behind(ctx: &Context, group: &Group, policy: &MeshPolicy) -> Result<Vec<String>> {
    let ns = &group.namespace;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let lp = ListParams::default().match_any().labels(&format!(
        "{}={},{POLICY_LABEL}={}",
        MANAGED_BY.0,
        MANAGED_BY.1,
        policy.name_any()
    ));
    let ours = pdbs
        .list_metadata(&lp)
        .await
        .map_err(|e| Error::kube(format!("list PodDisruptionBudgets in {ns}"), e))?;
    let mut out = Vec::new();
    for b in ours.items {
        let name = b.name_any();
        let Some(deployment) = name.strip_suffix("-meshwarden") else {
            continue;
        };
        let exists = deployments
            .get_metadata_opt(deployment)
            .await
            .map_err(|e| Error::kube(format!("read Deployment {ns}/{deployment}"), e))?
            .is_some();
        if !exists {
            out.push(name);
        }
    }
    Ok(out)
}

/// Observes, plans and (in Enforce) applies every group of a section; reports the result.
pub async fn reconcile(
    ctx: &Context,
    policy: &MeshPolicy,
    section: Section,
    groups: &[Group],
) -> RuleReport {
    let ctype = section.condition_type();
    let mut report = RuleReport {
        condition: Observed::new(ctype, Status::True, reasons::COMPLIANT, ""),
        violations: Vec::new(),
        targets: 0,
        compliant: 0,
        corrected: 0,
        corrections: Vec::new(),
    };
    let mut empty_groups = Vec::new();
    let mut takeovers: Vec<String> = Vec::new();
    let mut fights: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut rolled: Vec<String> = Vec::new();
    let mut blocking = false;
    let mut audit = false;
    let mut unfixable = false;
    let mut write_failures: Vec<String> = Vec::new();
    let mut retry_forbidden = false;
    let mut failed_writes = 0;
    let mut istiod_managed = false;
    let mut at_source: Vec<String> = Vec::new();
    let mut refused: Vec<Error> = Vec::new();

    for group in groups {
        let (observations, pdbs_refused) = match observe(ctx, group).await {
            Ok(o) => o,
            Err(e) => return RuleReport::failed(ctype, &e),
        };
        // PodDisruptionBudgets unreadable: the budget is left out, the other rules still hold.
        let rules = match &pdbs_refused {
            Some(_) => HaRules {
                budget: None,
                ..group.rules.clone()
            },
            None => group.rules.clone(),
        };
        let budgets_readable = pdbs_refused.is_none();
        refused.extend(pdbs_refused);
        let enforce = group.enforcement == Enforcement::Enforce;
        let gone = match budgets_readable {
            true => left_behind(ctx, group, policy).await,
            false => Ok(Vec::new()),
        };
        match gone {
            Ok(names) => {
                for name in names {
                    let id = object_id("PodDisruptionBudget", &group.namespace, &name);
                    let deployment = name.trim_end_matches("-meshwarden");
                    let message =
                        format!("meshwarden created it for Deployment {deployment}, which is gone");
                    let api: Api<PodDisruptionBudget> =
                        Api::namespaced(ctx.client.clone(), &group.namespace);
                    if !enforce {
                        report.violations.push(Violation {
                            rule: ctype.to_string(),
                            object: id,
                            message: format!("PodDisruptionBudget: {message}"),
                            action: ViolationAction::Reported.into(),
                        });
                    } else if let Err(e) = write::delete(&api, &name, &ctx.writes).await {
                        write_failures.push(format!("{id}: {e}"));
                        failed_writes += 1;
                    } else {
                        report.corrections.push(format!("{id}: removed, {message}"));
                    }
                }
            }
            Err(e) => return RuleReport::failed(ctype, &e),
        }
        if observations.is_empty() {
            empty_groups.push(format!(
                "{} (namespace {}, selector {})",
                group.label, group.namespace, group.selector
            ));
            continue;
        }
        audit |= !enforce;
        for obs in &observations {
            report.targets += 1;
            let deployed_by_istiod = source::istiod_gateway(&obs.deployment.metadata);
            let plan = match &deployed_by_istiod {
                Some(gateway) => source::report_only(plan(&rules, obs, policy, false), gateway),
                None => plan(&rules, obs, policy, enforce),
            };
            istiod_managed |= deployed_by_istiod.is_some() && !plan.findings.is_empty();
            notes.extend(plan.notes.iter().cloned());
            if plan.findings.is_empty() {
                report.compliant += 1;
                continue;
            }
            let dep_id = object_id("Deployment", &group.namespace, &obs.deployment.name_any());
            let now = Instant::now();
            let fight_key = |f: &Finding| FightKey {
                policy: policy.name_any(),
                section: ctype,
                object: f.object.clone(),
                field: Some(f.field.clone()),
            };
            // Fields another writer keeps reverting are left alone; the rest is still written.
            let held: Vec<Finding> = plan
                .findings
                .iter()
                .filter(|f| enforce && f.fixable && ctx.memory.fighting(&fight_key(f), now))
                .cloned()
                .collect();
            let mut plan = plan;
            if !held.is_empty() {
                fight::hold(&mut plan, &held);
                for f in &held {
                    fights.push(format!(
                        "{} {} (changed by {})",
                        f.object,
                        f.field,
                        f.changed_by.join(", ")
                    ));
                }
            }
            let fighting = |f: &Finding| held.contains(f);
            let outstanding: Vec<Finding> = if !enforce {
                plan.findings.clone()
            } else {
                tracing::debug!(target = %dep_id, "correcting");
                let (failed, applied) = execute(ctx, group, &plan).await;
                tracing::debug!(target = %dep_id, "corrected");
                let failure_of = |f: &Finding| failed.iter().find(|w| w.kind == write_kind(f));
                let fixed: Vec<&Finding> = plan
                    .findings
                    .iter()
                    .filter(|f| f.fixable && !fighting(f) && failure_of(f).is_none())
                    .collect();
                for f in &fixed {
                    let Some(read) = observed_meta(obs, f) else {
                        continue;
                    };
                    let seen = write::foreign_writes(read, &f.owned);
                    // Without the object the write returned (a deleted PDB), the next correction
                    // compares with what was read.
                    let after = applied
                        .get(write_kind(f))
                        .map_or_else(|| seen.clone(), |m| write::foreign_writes(m, &f.owned));
                    ctx.memory.corrected(&fight_key(f), now, &seen, &after);
                }
                if !fixed.is_empty() {
                    report.corrected += 1;
                    for f in &fixed {
                        report
                            .corrections
                            .push(format!("{}: {}", f.object, f.message));
                    }
                }
                let wrote = |kind: &str| !failed.iter().any(|w| w.kind == kind);
                if plan.rolls_pods && wrote("Deployment") {
                    rolled.push(dep_id.clone());
                }
                let mut took_over = false;
                for (field, manager) in &plan.takeovers {
                    if wrote(field.split('/').next().unwrap_or_default()) {
                        takeovers.push(format!("{field} (was managed by {manager})"));
                        took_over = true;
                    }
                }
                if took_over
                    && let Some(s) = values::source_sentence(&group.rules, obs, &policy.name_any())
                    && !at_source.contains(&s)
                {
                    at_source.push(s);
                }
                for w in &failed {
                    write_failures.push(format!("{}: {}", w.object, w.message));
                    retry_forbidden |= w.forbidden;
                }
                plan.findings
                    .iter()
                    .filter(|f| !f.fixable || fighting(f) || failure_of(f).is_some())
                    .map(|f| match failure_of(f) {
                        Some(w) => Finding {
                            message: format!("{} (not corrected: {})", f.message, w.message),
                            ..f.clone()
                        },
                        None => f.clone(),
                    })
                    .collect()
            };
            if outstanding.is_empty() {
                report.compliant += 1;
            }
            for f in outstanding {
                blocking |= f.blocks_drain;
                unfixable |= !f.fixable && enforce;
                let action = if enforce && fighting(&f) {
                    ViolationAction::Skipped
                } else if enforce && f.fixable {
                    failed_writes += 1;
                    ViolationAction::Failed
                } else {
                    ViolationAction::Reported
                };
                report.violations.push(Violation {
                    rule: ctype.to_string(),
                    object: f.object.clone(),
                    message: format!("{}: {}", f.field, f.message),
                    action: action.into(),
                });
            }
        }
    }

    let key = TakeoverKey {
        policy: policy.name_any(),
        generation: policy.metadata.generation.unwrap_or_default(),
        section: ctype,
        part: TakeoverPart::Fields,
    };
    let takeovers = ctx.memory.takeovers(key.clone(), &takeovers);
    let mut msg = Vec::new();
    msg.push(format!(
        "{} of {} target(s) compliant",
        report.compliant, report.targets
    ));
    if report.corrected > 0 {
        msg.push(format!("{} corrected", report.corrected));
    }
    if !rolled.is_empty() {
        msg.push(format!(
            "the pod template of {} changed, so its pods roll",
            rolled.join(", ")
        ));
    }
    msg.extend(messages::takeover_sentence(&takeovers));
    msg.extend(ctx.memory.takeovers(
        TakeoverKey {
            part: TakeoverPart::AtSource,
            ..key
        },
        &at_source,
    ));
    if !write_failures.is_empty() {
        msg.push(format!(
            "could not write {}; meshwarden retries with backoff{}",
            write_failures.join("; "),
            if retry_forbidden {
                " (meshwarden's ClusterRole lacks a permission: compare it with the chart's, charts/meshwarden/templates/clusterrole.yaml)"
            } else {
                ""
            }
        ));
    }
    msg.extend(messages::fight_sentence(&fights, Contested::Fields));
    if !empty_groups.is_empty() {
        msg.push(format!(
            "no Deployment found for {}",
            empty_groups.join(", ")
        ));
    }
    if !report.violations.is_empty() {
        let shown: Vec<String> = report
            .violations
            .iter()
            .take(5)
            .map(|v| format!("{} {}", v.object, v.message))
            .collect();
        msg.push(format!("deviations: {}", shown.join("; ")));
        if audit {
            msg.push("Audit mode: nothing was changed".to_string());
        }
    }
    msg.extend(notes.into_iter().take(3));

    let (status, reason) = if failed_writes > 0 {
        (Status::False, reasons::WRITE_FAILED)
    } else if !fights.is_empty() {
        (Status::False, reasons::FIGHT_DETECTED)
    } else if blocking {
        (Status::False, reasons::BUDGET_BLOCKS_DRAIN)
    } else if istiod_managed {
        (Status::False, reasons::MANAGED_BY_ISTIOD)
    } else if !report.violations.is_empty() && unfixable {
        (Status::False, reasons::CANNOT_CORRECT)
    } else if !report.violations.is_empty() {
        (Status::False, reasons::NON_COMPLIANT)
    } else if report.targets == 0 || !empty_groups.is_empty() {
        (Status::False, reasons::NO_TARGETS)
    } else if !takeovers.is_empty() {
        (Status::True, reasons::FIELD_OWNED_BY_OTHER)
    } else if report.corrected > 0 {
        (Status::True, reasons::CORRECTED)
    } else {
        (Status::True, reasons::COMPLIANT)
    };
    report.condition = Observed::new(ctype, status, reason, msg.join(". "));
    if let Some(e) = refused.first() {
        let unknown = RuleReport::failed(ctype, e).condition;
        report.condition = Observed::new(
            ctype,
            Status::Unknown,
            unknown.reason,
            format!(
                "{} The disruption budget is not checked; the other rules are held: {}",
                unknown.message, report.condition.message
            ),
        );
    }
    report
}

/// A write of a plan that the API server refused (or that could not be sent).
struct WriteFailure {
    /// Kind of the object (`Deployment`, `HorizontalPodAutoscaler`, `PodDisruptionBudget`).
    kind: &'static str,
    /// `Kind/namespace/name`.
    object: String,
    /// The API server's message.
    message: String,
    forbidden: bool,
}

/// Which write of a plan corrects a finding.
fn write_kind(f: &Finding) -> &'static str {
    if f.object.starts_with("HorizontalPodAutoscaler/") {
        "HorizontalPodAutoscaler"
    } else if f.object.starts_with("PodDisruptionBudget/") || f.field == "PodDisruptionBudget" {
        "PodDisruptionBudget"
    } else {
        "Deployment"
    }
}

/// The object a finding is about, as read.
fn observed_meta<'a>(obs: &'a Observation, f: &Finding) -> Option<&'a ObjectMeta> {
    match write_kind(f) {
        "HorizontalPodAutoscaler" => obs.hpa.as_ref().map(|h| &h.metadata),
        "PodDisruptionBudget" => obs
            .pdbs
            .iter()
            .find(|b| {
                f.object
                    == object_id(
                        "PodDisruptionBudget",
                        &b.namespace().unwrap_or_default(),
                        &b.name_any(),
                    )
            })
            .map(|b| &b.metadata)
            .or(Some(&obs.deployment.metadata)),
        _ => Some(&obs.deployment.metadata),
    }
}

/// Sends every write of a plan; one refused write does not stop the others. Returns those
/// that failed, and the metadata of each object written, by kind, as the API server returned it.
async fn execute(
    ctx: &Context,
    group: &Group,
    plan: &Plan,
) -> (Vec<WriteFailure>, HashMap<&'static str, ObjectMeta>) {
    let ns = &group.namespace;
    let mut failed = Vec::new();
    let mut applied = HashMap::new();
    let mut record = |kind: &'static str, name: &str, result: Result<Option<ObjectMeta>>| {
        if let Ok(Some(meta)) = &result {
            applied.insert(kind, meta.clone());
        }
        if let Err(e) = result {
            let (message, forbidden) = match &e {
                Error::Kube {
                    source: kube::Error::Api(s),
                    ..
                } => (s.message.clone(), s.code == 403),
                other => (other.to_string(), false),
            };
            tracing::warn!(kind, name, namespace = %ns, error = %e, "write failed");
            failed.push(WriteFailure {
                kind,
                object: object_id(kind, ns, name),
                message,
                forbidden,
            });
        }
    };
    if let Some((name, patch)) = &plan.hpa_patch {
        let api: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
        let r = write::apply_keeping(&api, name, patch, &ctx.writes).await;
        record(
            "HorizontalPodAutoscaler",
            name,
            r.map(|(h, _)| Some(h.metadata)),
        );
    }
    if let Some(patch) = &plan.deployment_patch {
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
        let name = patch["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let r = write::apply_keeping(&api, &name, patch, &ctx.writes).await;
        if let Ok((_, released)) = &r
            && !released.is_empty()
        {
            tracing::info!(deployment = %name, namespace = %ns, fields = ?released, "released fields the policy no longer declares; their values stay");
        }
        record("Deployment", &name, r.map(|(d, _)| Some(d.metadata)));
    }
    let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    match &plan.pdb {
        Some(PdbAction::Apply { name, patch }) => {
            let r = write::apply(&api, name, patch, &ctx.writes).await;
            record("PodDisruptionBudget", name, r.map(|b| Some(b.metadata)));
        }
        Some(PdbAction::Delete { name }) => {
            let r = write::delete(&api, name, &ctx.writes).await;
            record("PodDisruptionBudget", name, r.map(|()| None));
        }
        None => {}
    }
    (failed, applied)
}

/// The groups of the control-plane section: every istiod revision in the namespace.
pub fn control_plane_groups(spec: &crate::api::MeshPolicySpec) -> Vec<Group> {
    let Some(cp) = &spec.control_plane else {
        return Vec::new();
    };
    vec![Group {
        label: "istiod".into(),
        namespace: cp.namespace.clone(),
        selector: "app=istiod".into(),
        rules: HaRules {
            replicas: cp.replicas.clone(),
            budget: cp.disruption_budget.clone(),
            spread: cp.spread.clone(),
            resources: cp.resources.clone(),
            container: "discovery",
        },
        enforcement: crate::policy::effective(spec, cp.enforcement),
    }]
}

/// The groups of the gateways section: one per entry.
pub fn gateway_groups(spec: &crate::api::MeshPolicySpec) -> Vec<Group> {
    spec.gateways
        .iter()
        .map(|g| Group {
            label: format!("gateway {}", g.name),
            namespace: g.namespace.clone(),
            selector: selector::to_query(&g.selector),
            rules: HaRules {
                replicas: g.replicas.clone(),
                budget: g.disruption_budget.clone(),
                spread: g.spread.clone(),
                resources: g.resources.clone(),
                container: "istio-proxy",
            },
            enforcement: crate::policy::effective(spec, g.enforcement),
        })
        .collect()
}

#[cfg(test)]
mod tests;
