//! The disruption-budget part of a plan: exactly one PodDisruptionBudget per target, never
//! one that blocks node drains.

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde_json::{Value, json};

use super::plan::{int_or_string_json, ios_string};
use super::{Finding, HaRules, Observation, PdbAction, Plan, object_id};
use crate::api::MeshPolicy;
use crate::write;

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
    bounds: (i32, i32),
) {
    let effective_min = bounds.0;
    let d = &obs.deployment;
    let ns = d.namespace().unwrap_or_default();
    let dep_id = object_id("Deployment", &ns, &d.name_any());
    let ours = |pdb: &PodDisruptionBudget| write::created_by_meshwarden(&pdb.metadata);

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
            owned: Vec::new(),
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
                    owned: Vec::new(),
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
            owned: Vec::new(),
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
                owned: Vec::new(),
            });
            let patch = own_patch(
                policy,
                &name,
                &ns,
                budget_json.clone(),
                pod_selector.clone(),
            );
            p.pdb = Some(PdbAction::Apply { name, patch });
        }
        Some(b) => {
            let s = b.spec.clone().unwrap_or_default();
            let pdb_id = object_id("PodDisruptionBudget", &ns, &b.name_any());
            let min_owners = write::foreign_managers(&b.metadata, &["f:spec", "f:minAvailable"]);
            let max_owners = write::foreign_managers(&b.metadata, &["f:spec", "f:maxUnavailable"]);
            // The form (minAvailable or maxUnavailable) another manager owns is kept: Helm's
            // three-way merge and Istio's charts fail on a budget whose form was switched.
            let kept_form = if ours(b) {
                None
            } else if s.min_available.is_some() && !min_owners.is_empty() {
                Some(Form::MinAvailable)
            } else if s.max_unavailable.is_some() && !max_owners.is_empty() {
                Some(Form::MaxUnavailable)
            } else {
                None
            };
            let declared_form = if want.min_available.is_some() {
                Form::MinAvailable
            } else {
                Form::MaxUnavailable
            };
            let target = match kept_form {
                Some(form) if form != declared_form => {
                    equivalent(want, form, bounds).map(|v| form.budget(v))
                }
                _ => Some((want.min_available.clone(), want.max_unavailable.clone())),
            };
            let allows = allowed_disruptions(
                s.min_available.as_ref(),
                s.max_unavailable.as_ref(),
                effective_min,
            );
            let current = format!(
                "minAvailable {:?} / maxUnavailable {:?}",
                s.min_available.as_ref().map(ios_string),
                s.max_unavailable.as_ref().map(ios_string)
            );
            let owners: Vec<String> =
                min_owners
                    .iter()
                    .chain(max_owners.iter())
                    .fold(Vec::new(), |mut acc, m| {
                        if !acc.contains(m) {
                            acc.push(m.clone());
                        }
                        acc
                    });
            let owned = vec![
                vec!["f:spec".to_string(), "f:minAvailable".to_string()],
                vec!["f:spec".to_string(), "f:maxUnavailable".to_string()],
            ];
            let Some((min, max)) = target else {
                // Not expressible in the kept form: report, leave the PDB alone.
                let form = kept_form.unwrap_or(declared_form);
                p.findings.push(Finding {
                    object: pdb_id,
                    field: "spec".into(),
                    message: format!(
                        "budget is {current}, declared {}; {} owns its {} and the declared budget has no equivalent {} at {}..{} replica(s), so meshwarden leaves it alone{}",
                        Value::Object(budget_json.clone()),
                        owners.join(", "),
                        form.name(),
                        form.name(),
                        bounds.0,
                        bounds.1,
                        super::source::budget_hint(rules.container, b, want)
                    ),
                    fixable: false,
                    blocks_drain: allows < 1,
                    changed_by: owners,
                    owned: owned.clone(),
                });
                return;
            };
            // A budget meshwarden created lets pods that are not ready be evicted: they serve
            // nothing, and must not block a drain.
            let eviction_policy_missing =
                ours(b) && s.unhealthy_pod_eviction_policy.as_deref() != Some(ALWAYS_ALLOW);
            if s.min_available == min && s.max_unavailable == max {
                if eviction_policy_missing {
                    p.findings.push(Finding {
                        object: pdb_id,
                        field: "spec".into(),
                        message: format!(
                            "{UNHEALTHY_POLICY} is not {ALWAYS_ALLOW}: a pod that is not ready blocks every drain of its node"
                        ),
                        fixable: true,
                        blocks_drain: false,
                        changed_by: Vec::new(),
                        owned: Vec::new(),
                    });
                    let mut budget = serde_json::Map::new();
                    for (k, v) in [
                        ("minAvailable", &s.min_available),
                        ("maxUnavailable", &s.max_unavailable),
                    ] {
                        if let Some(v) = v {
                            budget.insert(k.into(), int_or_string_json(v));
                        }
                    }
                    let selector = json!(s.selector.clone().unwrap_or_default());
                    let patch = own_patch(policy, &b.name_any(), &ns, budget, selector);
                    p.pdb = Some(PdbAction::Apply {
                        name: b.name_any(),
                        patch,
                    });
                }
                return;
            }
            let mut spec = serde_json::Map::new();
            if let Some(m) = &min {
                spec.insert("minAvailable".into(), int_or_string_json(m));
            }
            if let Some(m) = &max {
                spec.insert("maxUnavailable".into(), int_or_string_json(m));
            }
            let wanted = Value::Object(spec.clone());
            p.findings.push(Finding {
                object: pdb_id.clone(),
                field: "spec".into(),
                message: if allows < 1 {
                    format!(
                        "allows no disruption at {effective_min} replica(s) ({current}): node drains block"
                    )
                } else if kept_form.is_some() && wanted != Value::Object(budget_json.clone()) {
                    format!(
                        "budget is {current}, declared {} (held as {wanted}, the same at {}..{} replica(s), in the form its owner uses)",
                        Value::Object(budget_json.clone()),
                        bounds.0,
                        bounds.1
                    )
                } else {
                    format!(
                        "budget is {current}, declared {}",
                        Value::Object(budget_json.clone())
                    )
                },
                fixable: true,
                blocks_drain: allows < 1,
                changed_by: owners,
                owned,
            });
            for (f, owners) in [
                ("minAvailable", &min_owners),
                ("maxUnavailable", &max_owners),
            ] {
                for m in owners {
                    p.takeovers.push((format!("{pdb_id} spec.{f}"), m.clone()));
                }
            }
            // When the form changes (a budget meshwarden owns), the other form is cleared
            // explicitly: a budget may not carry both.
            if min.is_some() && s.max_unavailable.is_some() {
                spec.insert("maxUnavailable".into(), Value::Null);
            }
            if max.is_some() && s.min_available.is_some() {
                spec.insert("minAvailable".into(), Value::Null);
            }
            let patch = if ours(b) {
                // Everything meshwarden's apply owns on a budget it created, every time: an
                // apply without its selector, labels or owner reference would remove them.
                let selector = json!(s.selector.clone().unwrap_or_default());
                own_patch(policy, &b.name_any(), &ns, spec, selector)
            } else {
                json!({
                    "apiVersion": "policy/v1",
                    "kind": "PodDisruptionBudget",
                    "metadata": {"name": b.name_any(), "namespace": ns},
                    "spec": Value::Object(spec),
                })
            };
            p.pdb = Some(PdbAction::Apply {
                name: b.name_any(),
                patch,
            });
        }
    }
}

/// `spec.unhealthyPodEvictionPolicy` and the value meshwarden's budgets carry.
const UNHEALTHY_POLICY: &str = "unhealthyPodEvictionPolicy";
const ALWAYS_ALLOW: &str = "AlwaysAllow";

/// The apply of a budget meshwarden creates for `policy`, whole: its labels and owner
/// reference, the budget (`minAvailable` or `maxUnavailable`, a `null` clearing the other
/// form), the pod selector, and [`ALWAYS_ALLOW`] (pods that are not ready serve nothing and
/// must not block a drain).
fn own_patch(
    policy: &MeshPolicy,
    name: &str,
    ns: &str,
    mut spec: serde_json::Map<String, Value>,
    selector: Value,
) -> Value {
    spec.insert("selector".into(), selector);
    spec.insert(UNHEALTHY_POLICY.into(), json!(ALWAYS_ALLOW));
    let owner = write::owner_reference(policy);
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": write::labels(&policy.name_any()),
            "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
        },
        "spec": Value::Object(spec),
    })
}

/// The two forms of a disruption budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    MinAvailable,
    MaxUnavailable,
}

impl Form {
    pub fn name(self) -> &'static str {
        match self {
            Form::MinAvailable => "minAvailable",
            Form::MaxUnavailable => "maxUnavailable",
        }
    }

    /// (minAvailable, maxUnavailable) holding `v` in this form.
    fn budget(self, v: IntOrString) -> (Option<IntOrString>, Option<IntOrString>) {
        match self {
            Form::MinAvailable => (Some(v), None),
            Form::MaxUnavailable => (None, Some(v)),
        }
    }
}

/// The value in `form` that allows exactly as many disruptions as the declared budget at every
/// replica count from `bounds.0` to `bounds.1`, if there is one.
pub fn equivalent(
    want: &crate::api::DisruptionBudgetSpec,
    form: Form,
    bounds: (i32, i32),
) -> Option<IntOrString> {
    let (lo, hi) = bounds;
    let declared = |n| {
        allowed_disruptions(
            want.min_available.as_ref(),
            want.max_unavailable.as_ref(),
            n,
        )
    };
    let candidate = IntOrString::Int(match form {
        Form::MinAvailable => lo - declared(lo),
        Form::MaxUnavailable => declared(lo),
    });
    let (min, max) = form.budget(candidate.clone());
    (lo..=hi.max(lo))
        .all(|n| allowed_disruptions(min.as_ref(), max.as_ref(), n) == declared(n))
        .then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::DisruptionBudgetSpec;

    fn max(n: i32) -> DisruptionBudgetSpec {
        DisruptionBudgetSpec {
            min_available: None,
            max_unavailable: Some(IntOrString::Int(n)),
        }
    }

    #[test]
    fn allowed_disruptions_per_form() {
        let i = IntOrString::Int;
        assert_eq!(allowed_disruptions(Some(&i(1)), None, 3), 2);
        assert_eq!(allowed_disruptions(None, Some(&i(1)), 3), 1);
        assert_eq!(allowed_disruptions(Some(&i(3)), None, 3), 0);
        let pct = IntOrString::String("50%".into());
        assert_eq!(allowed_disruptions(None, Some(&pct), 3), 2, "rounded up");
        assert_eq!(allowed_disruptions(None, None, 3), 3);
    }

    #[test]
    fn a_budget_is_expressed_in_the_other_form_only_when_equivalent() {
        // Fixed at 3 replicas: maxUnavailable 1 is minAvailable 2.
        assert_eq!(
            equivalent(&max(1), Form::MinAvailable, (3, 3)),
            Some(IntOrString::Int(2))
        );
        // Over an HPA's range 3..5 no minAvailable allows exactly one disruption everywhere.
        assert_eq!(equivalent(&max(1), Form::MinAvailable, (3, 5)), None);
        // minAvailable 2 at 4 replicas is maxUnavailable 2; over 4..6 it is not.
        let min2 = DisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(2)),
            max_unavailable: None,
        };
        assert_eq!(
            equivalent(&min2, Form::MaxUnavailable, (4, 4)),
            Some(IntOrString::Int(2))
        );
        assert_eq!(equivalent(&min2, Form::MaxUnavailable, (4, 6)), None);
    }
}
