//! Leaving contested fields alone: when another writer keeps reverting one field, only the
//! writes of that field are dropped from a plan; everything else (a missing PDB above all) is
//! still written.

use serde_json::Value;

use super::{Finding, Plan};

/// Where a finding's field lives in the Deployment patch (`spec` ... key), if it is there.
fn deployment_path(field: &str) -> Option<&'static [&'static str]> {
    match field {
        "spec.replicas" => Some(&["spec", "replicas"]),
        "spec.template.spec.affinity.podAntiAffinity" => {
            Some(&["spec", "template", "spec", "affinity"])
        }
        "spec.template.spec.topologySpreadConstraints" => {
            Some(&["spec", "template", "spec", "topologySpreadConstraints"])
        }
        f if f.starts_with("spec.template.spec.containers[") => {
            Some(&["spec", "template", "spec", "containers"])
        }
        _ => None,
    }
}

fn remove(v: &mut Value, path: &[&str]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for k in parents {
        match cur.get_mut(*k) {
            Some(next) => cur = next,
            None => return,
        }
    }
    if let Some(m) = cur.as_object_mut() {
        m.remove(*last);
    }
}

/// Drops the writes of the `held` findings from `plan`.
pub fn hold(plan: &mut Plan, held: &[Finding]) {
    let open = |f: &&Finding| f.fixable && !held.contains(f);
    let deployment_open = plan
        .findings
        .iter()
        .filter(open)
        .any(|f| deployment_path(&f.field).is_some());
    let template_open = plan
        .findings
        .iter()
        .filter(open)
        .any(|f| f.field.starts_with("spec.template"));
    for f in held {
        if f.object.starts_with("HorizontalPodAutoscaler/") {
            plan.hpa_patch = None;
        } else if f.object.starts_with("PodDisruptionBudget/") {
            plan.pdb = None;
        } else if let (Some(path), Some(patch)) =
            (deployment_path(&f.field), plan.deployment_patch.as_mut())
        {
            remove(patch, path);
        }
    }
    if !deployment_open {
        plan.deployment_patch = None;
    }
    plan.rolls_pods &= template_open;
    plan.takeovers
        .retain(|(field, _)| !held.iter().any(|f| about(f, field)));
}

/// Whether a takeover (`Kind/namespace/name field`) is about the finding's field.
fn about(f: &Finding, takeover: &str) -> bool {
    let Some((object, what)) = takeover.split_once(' ') else {
        return false;
    };
    object == f.object
        && match f.field.as_str() {
            "spec" => true,
            field if field.starts_with("spec.template.spec.containers[") => {
                what.starts_with("container ")
            }
            field => what == field,
        }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::rules::ha::PdbAction;
    use serde_json::json;

    /// A fixable finding of `field` in `object`.
    pub(in crate::rules::ha) fn finding(object: &str, field: &str) -> Finding {
        Finding {
            object: object.into(),
            field: field.into(),
            message: String::new(),
            fixable: true,
            blocks_drain: false,
            changed_by: vec!["kubectl-edit".into()],
            owned: Vec::new(),
        }
    }

    fn plan() -> Plan {
        Plan {
            findings: vec![
                finding("HorizontalPodAutoscaler/ns/istiod", "spec.minReplicas"),
                finding("Deployment/ns/istiod", "PodDisruptionBudget"),
                finding(
                    "Deployment/ns/istiod",
                    "spec.template.spec.containers[discovery].resources",
                ),
            ],
            hpa_patch: Some(("istiod".into(), json!({"spec": {"minReplicas": 3}}))),
            deployment_patch: Some(json!({"spec": {"template": {"spec": {"containers": []}}}})),
            pdb: Some(PdbAction::Apply {
                name: "istiod-meshwarden".into(),
                patch: json!({}),
            }),
            rolls_pods: true,
            takeovers: vec![(
                "HorizontalPodAutoscaler/ns/istiod spec.minReplicas".into(),
                "kubectl-edit".into(),
            )],
            notes: vec![],
        }
    }

    #[test]
    fn a_held_hpa_minimum_still_creates_the_budget_and_fixes_resources() {
        let mut p = plan();
        let held = vec![p.findings[0].clone()];
        hold(&mut p, &held);
        assert!(p.hpa_patch.is_none());
        assert!(p.pdb.is_some(), "a missing PDB is still created");
        assert!(p.deployment_patch.is_some());
        assert!(p.rolls_pods);
        assert!(p.takeovers.is_empty());
    }

    #[test]
    fn held_resources_drop_the_deployment_write_and_the_rollout() {
        let mut p = plan();
        let held = vec![p.findings[2].clone()];
        hold(&mut p, &held);
        assert!(p.deployment_patch.is_none());
        assert!(!p.rolls_pods);
        assert!(p.hpa_patch.is_some() && p.pdb.is_some());
    }
}
