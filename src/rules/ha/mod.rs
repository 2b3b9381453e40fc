//! High availability of istiod revisions and mesh gateways: replicas (through the HPA when
//! one owns the count), exactly one PodDisruptionBudget that never blocks node drains,
//! spreading over nodes and zones, and container resources.

mod budget;
mod fight;
pub mod nodes;
mod observe;
pub mod outcome;
mod plan;
mod rebalance;
pub mod source;
pub mod values;
mod wait;
mod writes;

use std::collections::HashMap;
use std::sync::Mutex;

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
use crate::rules::sidecars;
use crate::rules::stores::{self, Stores};
use crate::selector;
use crate::status::conditions::{Observed, Status};
use crate::status::messages::{self, Contested};
use crate::status::reasons::{self, ViolationAction};
use crate::telemetry::ha::TargetOutcome;
use crate::write::driver::{self, Outcome, Planned};
use crate::write::fight::{TakeoverKey, TakeoverPart};
use crate::write::{self, FightKey};

pub use budget::allowed_disruptions;
use observe::left_behind;
pub use observe::{control_plane_groups, gateway_groups, nodes as observe_nodes, observe};
pub(crate) use plan::{int_or_string_json, resources_json};
pub use plan::{plan, resource_deviations};
use writes::{HaWrite, Target, WriteFailure, write_kind};

/// How soon a section with template writes waiting for a rollout looks again.
const WAIT_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// Its pods that have not finished (running and pending), from its ReplicaSets.
    pub pods: Vec<std::sync::Arc<sidecars::PodFacts>>,
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

/// Why a PodDisruptionBudget meshwarden created (`<deployment>-meshwarden`) is left behind.
fn gone_message(name: &str) -> String {
    let deployment = name.trim_end_matches("-meshwarden");
    format!("meshwarden created it for Deployment {deployment}, which is gone")
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
    pub selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    pub rules: HaRules,
    pub enforcement: Enforcement,
}

/// Observes, plans and (in Enforce) applies every group of a section; reports the result.
pub async fn reconcile(
    ctx: &Context,
    policy: &MeshPolicy,
    section: Section,
    groups: &[Group],
) -> RuleReport {
    let ctype = section.condition_type();
    let mut report = RuleReport::new(Observed::new(ctype, Status::True, reasons::COMPLIANT, ""));
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
    // What runs: judged per target, reported once a shortfall outlasts the grace period.
    let nodes = match groups.is_empty() {
        true => Err(String::new()),
        false => observe::nodes(ctx).await,
    };
    let mut shortfalls: Vec<outcome::Shortfall> = Vec::new();
    let mut achieved: Vec<TargetOutcome> = Vec::new();
    let mut compliant_ids: Vec<String> = Vec::new();
    // Targets whose crowded pods meshwarden may move (Enforce, `spread.rebalance: Evict`):
    // target -> (namespace, the pod to evict).
    let mut movable: HashMap<String, (String, String)> = HashMap::new();
    // Targets whose template writes wait for the rollout in progress: (target, why).
    let mut waiting: Vec<(String, String)> = Vec::new();
    let mut deferred_count = 0;

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
        let gone = match gone {
            Ok(names) => names,
            Err(e) => return RuleReport::failed(ctype, &e),
        };
        let mut planned: Vec<Planned<HaWrite>> = Vec::new();
        for name in gone {
            if enforce {
                planned.push(Planned {
                    checks: Vec::new(),
                    item: HaWrite::LeftBehind { name },
                });
            } else {
                report.violations.push(Violation {
                    rule: ctype.to_string(),
                    object: object_id("PodDisruptionBudget", &group.namespace, &name),
                    message: format!("PodDisruptionBudget: {}", gone_message(&name)),
                    action: ViolationAction::Reported,
                });
            }
        }
        if observations.is_empty() {
            empty_groups.push(format!(
                "{} (namespace {}, selector {})",
                group.label,
                group.namespace,
                selector::to_query(&group.selector)
            ));
        } else {
            audit |= !enforce;
        }
        for obs in &observations {
            report.targets += 1;
            let judged = outcome::judge(&rules, obs, nodes.as_ref().ok());
            achieved.push(TargetOutcome {
                namespace: group.namespace.clone(),
                deployment: obs.deployment.name_any(),
                available: judged.available,
                wanted: judged.wanted,
                zones: judged.zones,
                disruptions_allowed: judged.disruptions_allowed,
            });
            let target_id = object_id("Deployment", &group.namespace, &obs.deployment.name_any());
            if enforce && let Some(pod) = rebalance::pick(&rules, obs, &judged) {
                movable.insert(target_id.clone(), (group.namespace.clone(), pod));
            }
            shortfalls.extend(judged.shortfalls);
            let deployed_by_istiod = source::istiod_gateway(&obs.deployment.metadata);
            let mut plan = match &deployed_by_istiod {
                Some(gateway) => source::report_only(plan(&rules, obs, policy, false), gateway),
                None => plan(&rules, obs, policy, enforce),
            };
            istiod_managed |= deployed_by_istiod.is_some() && !plan.findings.is_empty();
            notes.extend(plan.notes.iter().cloned());
            if enforce
                && plan.rolls_pods
                && let Some(why) = wait::rollout_in_progress(&obs.deployment)
            {
                for f in wait::defer_template(&mut plan) {
                    deferred_count += 1;
                    report.violations.push(Violation {
                        rule: ctype.to_string(),
                        object: f.object.clone(),
                        message: format!(
                            "{}: {} (written once the rollout finishes)",
                            f.field, f.message
                        ),
                        action: ViolationAction::Reported,
                    });
                }
                waiting.push((target_id.clone(), why));
            }
            let waits = waiting.iter().any(|(id, _)| *id == target_id);
            if plan.findings.is_empty() {
                if !waits {
                    report.compliant += 1;
                    compliant_ids.push(target_id);
                }
                continue;
            }
            planned.push(writes::planned(
                &policy.name_any(),
                ctype,
                obs,
                plan,
                enforce,
            ));
        }
        // Fight check → writes → record, one target after the other (each in the order HPA,
        // Deployment, PodDisruptionBudget); fields another writer keeps reverting are left
        // alone, the rest is still written. In Audit nothing is written.
        let failures = Mutex::new(HashMap::new());
        let done: Vec<(HaWrite, Option<Result<()>>)> = if enforce {
            let outcomes = driver::drive_checks(&ctx.memory, planned, 1, writes::hold, |w| {
                writes::send(ctx, group, w.clone(), &failures)
            })
            .await;
            outcomes
                .into_iter()
                .map(|o| match o {
                    Outcome::Fighting(w) | Outcome::Written(w) => (w, Some(Ok(()))),
                    Outcome::Failed(w, e) => (w, Some(Err(e))),
                })
                .collect()
        } else {
            planned.into_iter().map(|p| (p.item, None)).collect()
        };
        let mut failures = failures.into_inner().unwrap_or_default();
        for (w, sent) in done {
            let (obs, plan, held) = match w {
                HaWrite::LeftBehind { name } => {
                    let id = object_id("PodDisruptionBudget", &group.namespace, &name);
                    match sent {
                        Some(Err(e)) => {
                            write_failures.push(format!("{id}: {e}"));
                            failed_writes += 1;
                        }
                        _ => report
                            .corrections
                            .push(format!("{id}: removed, {}", gone_message(&name))),
                    }
                    continue;
                }
                HaWrite::Target(t) => {
                    let Target {
                        obs, plan, held, ..
                    } = *t;
                    (obs, plan, held)
                }
            };
            let dep_id = object_id("Deployment", &group.namespace, &obs.deployment.name_any());
            for f in &held {
                fights.push(format!(
                    "{} {} (changed by {})",
                    f.object,
                    f.field,
                    f.changed_by.join(", ")
                ));
            }
            let fighting = |f: &Finding| held.contains(f);
            let outstanding: Vec<Finding> = match sent {
                None => plan.findings.clone(),
                Some(sent) => {
                    let failed = match sent {
                        Ok(()) => failures
                            .remove(&obs.deployment.name_any())
                            .unwrap_or_default(),
                        Err(e) => [
                            "HorizontalPodAutoscaler",
                            "Deployment",
                            "PodDisruptionBudget",
                        ]
                        .into_iter()
                        .map(|kind| WriteFailure::of(kind, dep_id.clone(), &e))
                        .collect(),
                    };
                    let failure_of = |f: &Finding| failed.iter().find(|w| w.kind == write_kind(f));
                    let fixed: Vec<&Finding> = plan
                        .findings
                        .iter()
                        .filter(|f| f.fixable && !fighting(f) && failure_of(f).is_none())
                        .collect();
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
                        && let Some(s) =
                            values::source_sentence(&group.rules, obs, &policy.name_any())
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
                }
            };
            let waits = waiting.iter().any(|(id, _)| *id == dep_id);
            if outstanding.is_empty() && !waits {
                report.compliant += 1;
                compliant_ids.push(dep_id.clone());
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
                    action,
                });
            }
        }
    }

    // A target short of what runs is not compliant, within the grace period too.
    let short: std::collections::BTreeSet<&str> =
        shortfalls.iter().map(|s| s.target.as_str()).collect();
    let short_compliant = compliant_ids
        .iter()
        .filter(|id| short.contains(id.as_str()))
        .count();
    report.compliant -= i32::try_from(short_compliant).unwrap_or(0);
    ctx.metrics.ha.set(&policy.name_any(), ctype, &achieved);
    let graded = outcome::grade(
        &outcome::Since::of(ctx),
        &format!("{}/{ctype}", policy.name_any()),
        shortfalls,
        ctx.availability_grace,
    );
    report.recheck_in = graded.recheck;
    if !waiting.is_empty() {
        // The rollout's end is a Deployment status change; look again soon in any case.
        report.recheck_in = Some(
            report
                .recheck_in
                .map_or(WAIT_RECHECK, |r| r.min(WAIT_RECHECK)),
        );
    }
    let evicted = rebalance::Evicted::of(ctx);
    for s in &graded.counted {
        let crowded = s.reason == reasons::SPREAD_NOT_ACHIEVED;
        if let (true, Some((ns, pod))) = (crowded, movable.remove(&s.target))
            && evicted.claim(&s.target, ctx.availability_grace)
        {
            let pod_id = object_id("Pod", &ns, &pod);
            match rebalance::evict(ctx, &ns, &pod).await {
                Ok(()) => report.corrections.push(format!(
                    "{pod_id}: evicted so that the scheduler places it elsewhere ({}: {})",
                    s.target, s.message
                )),
                Err(e) => write_failures.push(format!("{pod_id}: eviction refused: {e}")),
            }
        }
        report.violations.push(Violation {
            rule: ctype.to_string(),
            object: s.object.clone(),
            message: format!("{}: {}", s.reason, s.message),
            action: ViolationAction::Reported,
        });
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
    if !waiting.is_empty() {
        msg.push(format!(
            "the pod template of {} is changed once its rollout in progress finishes (a template written during a rollout makes the Deployment controller roll over)",
            waiting
                .iter()
                .map(|(id, why)| format!("{id} ({why})"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    msg.extend(messages::fight_sentence(&fights, Contested::Fields));
    if !empty_groups.is_empty() {
        msg.push(format!(
            "no Deployment found for {}",
            empty_groups.join(", ")
        ));
    }
    if let Some(s) = messages::deviations_sentence(&report.violations, 5) {
        msg.push(s);
        if audit {
            msg.push("Audit mode: nothing was changed".to_string());
        }
    }
    msg.extend(outcome::waiting_sentence(
        &graded.waiting,
        ctx.availability_grace,
    ));
    if let Err(why) = &nodes
        && !groups.is_empty()
    {
        msg.push(format!(
            "the nodes cannot be read ({why}): spread over zones and pods on NotReady nodes are not judged"
        ));
    }
    msg.extend(notes.into_iter().take(3));

    let (status, reason) = if failed_writes > 0 {
        (Status::False, reasons::WRITE_FAILED)
    } else if !fights.is_empty() {
        (Status::False, reasons::FIGHT_DETECTED)
    } else if blocking {
        (Status::False, reasons::BUDGET_BLOCKS_DRAIN)
    } else if let Some(reason) = outcome::worst(&graded.counted) {
        (Status::False, reason)
    } else if istiod_managed {
        (Status::False, reasons::MANAGED_BY_ISTIOD)
    } else if !report.violations.is_empty() && report.violations.len() == deferred_count {
        (Status::False, reasons::PROGRESSING)
    } else if !report.violations.is_empty() && unfixable {
        (Status::False, reasons::CANNOT_CORRECT)
    } else if !report.violations.is_empty() {
        (Status::False, reasons::NON_COMPLIANT)
    } else if !graded.waiting.is_empty() {
        (Status::False, reasons::PROGRESSING)
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

#[cfg(test)]
mod tests;
