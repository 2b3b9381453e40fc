//! The disruption-budget part of a plan: exactly one PodDisruptionBudget per target, never
//! one that blocks node drains.

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use super::plan::{int_or_string_json, ios_string};
use super::{Finding, HaRules, MANAGED_BY, Observation, POLICY_LABEL, PdbAction, Plan, object_id};
use crate::api::MeshPolicy;
use crate::apply;

/// Pods allowed to be disrupted under `budget` when `replicas` pods run.
pub fn allowed_disruptions(
    min_available: Option<&IntOrString>,
    max_unavailable: Option<&IntOrString>,
    replicas: i32,
) -> i32 {
    let pct = |s: &str, round_up: bool| -> i32 {
        let p: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
        let n = i64::from(replicas) * p;
        let v = if round_up { (n + 99) / 100 } else { n / 100 };
        i32::try_from(v).unwrap_or(i32::MAX)
    };
    match (min_available, max_unavailable) {
        (_, Some(IntOrString::Int(m))) => (*m).min(replicas),
        (_, Some(IntOrString::String(s))) => pct(s, true).min(replicas),
        (Some(IntOrString::Int(m)), None) => (replicas - m).max(0),
        (Some(IntOrString::String(s)), None) => (replicas - pct(s, true)).max(0),
        // A budget with neither field never blocks an eviction.
        (None, None) => replicas,
    }
}

pub(super) fn plan_budget(
    p: &mut Plan,
    rules: &HaRules,
    obs: &Observation,
    policy: &MeshPolicy,
    pod_selector: &Value,
    effective_min: i32,
) {
    let d = &obs.deployment;
    let ns = d.namespace().unwrap_or_default();
    let dep_id = object_id("Deployment", &ns, &d.name_any());
    let ours = |pdb: &PodDisruptionBudget| {
        pdb.labels().get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1)
    };

    if obs.pdbs.len() > 1 {
        let names: Vec<String> = obs.pdbs.iter().map(|b| b.name_any()).collect();
        let own: Vec<&PodDisruptionBudget> = obs.pdbs.iter().filter(|b| ours(b)).collect();
        let fixable = !own.is_empty() && own.len() < obs.pdbs.len();
        p.findings.push(Finding {
            object: dep_id.clone(),
            field: "PodDisruptionBudget".into(),
            message: format!(
                "{} PodDisruptionBudgets select its pods ({}); evictions fail while more than one does",
                obs.pdbs.len(),
                names.join(", ")
            ),
            fixable,
            blocks_drain: true,
            changed_by: Vec::new(),
        });
        if fixable && let Some(b) = own.first() {
            p.pdb = Some(PdbAction::Delete { name: b.name_any() });
        }
        return;
    }

    let existing = obs.pdbs.first();
    let Some(want) = &rules.budget else {
        // Not configured: still report a budget that blocks every drain.
        if let Some(b) = existing {
            let s = b.spec.clone().unwrap_or_default();
            if allowed_disruptions(
                s.min_available.as_ref(),
                s.max_unavailable.as_ref(),
                effective_min,
            ) < 1
            {
                p.findings.push(Finding {
                    object: object_id("PodDisruptionBudget", &ns, &b.name_any()),
                    field: "spec".into(),
                    message: format!(
                        "allows no disruption at {effective_min} replica(s): node drains block; set controlPlane/gateways disruptionBudget to let meshwarden fix it"
                    ),
                    fixable: false,
                    blocks_drain: true,
                    changed_by: Vec::new(),
                });
            }
        }
        return;
    };

    let mut budget_json = serde_json::Map::new();
    match (&want.min_available, &want.max_unavailable) {
        (Some(m), _) => {
            budget_json.insert("minAvailable".into(), int_or_string_json(m));
        }
        (None, Some(m)) => {
            budget_json.insert("maxUnavailable".into(), int_or_string_json(m));
        }
        (None, None) => {}
    }
    let declared_allows = allowed_disruptions(
        want.min_available.as_ref(),
        want.max_unavailable.as_ref(),
        effective_min,
    );
    if declared_allows < 1 {
        p.findings.push(Finding {
            object: dep_id.clone(),
            field: "disruptionBudget".into(),
            message: format!(
                "the declared budget allows no disruption at {effective_min} replica(s); raise replicas.min or loosen the budget"
            ),
            fixable: false,
            blocks_drain: true,
            changed_by: Vec::new(),
        });
        return;
    }

    match existing {
        None => {
            let name = format!("{}-meshwarden", d.name_any());
            p.findings.push(Finding {
                object: dep_id.clone(),
                field: "PodDisruptionBudget".into(),
                message: "no PodDisruptionBudget covers its pods".into(),
                fixable: true,
                blocks_drain: false,
                changed_by: Vec::new(),
            });
            let owner = policy.controller_owner_ref(&()).map(|mut o| {
                o.controller = Some(false);
                o.block_owner_deletion = Some(false);
                o
            });
            let mut spec = budget_json.clone();
            spec.insert("selector".into(), pod_selector.clone());
            p.pdb = Some(PdbAction::Apply {
                name: name.clone(),
                patch: json!({
                    "apiVersion": "policy/v1",
                    "kind": "PodDisruptionBudget",
                    "metadata": {
                        "name": name,
                        "namespace": ns,
                        "labels": {MANAGED_BY.0: MANAGED_BY.1, POLICY_LABEL: policy.name_any()},
                        "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
                    },
                    "spec": Value::Object(spec),
                }),
            });
        }
        Some(b) => {
            let s = b.spec.clone().unwrap_or_default();
            let pdb_id = object_id("PodDisruptionBudget", &ns, &b.name_any());
            let same =
                s.min_available == want.min_available && s.max_unavailable == want.max_unavailable;
            if same {
                return;
            }
            let allows = allowed_disruptions(
                s.min_available.as_ref(),
                s.max_unavailable.as_ref(),
                effective_min,
            );
            p.findings.push(Finding {
                object: pdb_id.clone(),
                field: "spec".into(),
                message: if allows < 1 {
                    format!(
                        "allows no disruption at {effective_min} replica(s) (minAvailable {:?}, maxUnavailable {:?}): node drains block",
                        s.min_available.as_ref().map(ios_string),
                        s.max_unavailable.as_ref().map(ios_string)
                    )
                } else {
                    format!(
                        "budget is minAvailable {:?} / maxUnavailable {:?}, declared {}",
                        s.min_available.as_ref().map(ios_string),
                        s.max_unavailable.as_ref().map(ios_string),
                        Value::Object(budget_json.clone())
                    )
                },
                fixable: true,
                blocks_drain: allows < 1,
                changed_by: Vec::new(),
            });
            for f in ["f:minAvailable", "f:maxUnavailable"] {
                let owners = apply::foreign_managers(&b.metadata, &["f:spec", f]);
                if let Some(finding) = p.findings.last_mut() {
                    for m in &owners {
                        if !finding.changed_by.contains(m) {
                            finding.changed_by.push(m.clone());
                        }
                    }
                }
                for m in owners {
                    let field = format!("{pdb_id} spec.{}", &f[2..]);
                    if !p.takeovers.iter().any(|(x, y)| x == &field && y == &m) {
                        p.takeovers.push((field, m));
                    }
                }
            }
            // The other form is cleared explicitly: a budget may not carry both.
            let mut spec = budget_json.clone();
            if want.min_available.is_some() && s.max_unavailable.is_some() {
                spec.insert("maxUnavailable".into(), Value::Null);
            }
            if want.max_unavailable.is_some() && s.min_available.is_some() {
                spec.insert("minAvailable".into(), Value::Null);
            }
            p.pdb = Some(PdbAction::Apply {
                name: b.name_any(),
                patch: json!({
                    "apiVersion": "policy/v1",
                    "kind": "PodDisruptionBudget",
                    "metadata": {"name": b.name_any(), "namespace": ns},
                    "spec": Value::Object(spec),
                }),
            });
        }
    }
}
