//! Waiting for a rollout in progress before changing a pod template again.
//!
//! A template written while the Deployment controller still rolls the previous one (an
//! installer's upgrade that changed a value meshwarden holds, meshwarden's own last write)
//! starts a rollover: the controller scales the old ReplicaSets down by the availability their
//! statuses report, and a status that lags the pods it counts lets it take down more pods than
//! `maxUnavailable` allows. So the template writes of a target whose rollout is in progress
//! wait for it to finish; its HPA and PodDisruptionBudget are still written. A stalled rollout
//! (`ProgressDeadlineExceeded`) is not waited for: a new template is how it gets unstuck.

use k8s_openapi::api::apps::v1::Deployment;

use super::{Finding, Plan, fight};
use crate::rules::sidecars::{Rollout, deployment_rollout};

/// Why a template write to `d` must wait: the rollout of its current generation the
/// Deployment controller reports in progress. A generation the controller has not observed
/// yet (another writer's template a moment ago, or no status at all) has started no rollout:
/// a write now replaces that template before it rolls, so it does not wait.
pub fn rollout_in_progress(d: &Deployment) -> Option<String> {
    let observed = d.status.as_ref()?.observed_generation?;
    if observed < d.metadata.generation.unwrap_or(0) {
        return None;
    }
    match deployment_rollout(d) {
        Rollout::InProgress(why) => Some(why),
        _ => None,
    }
}

/// Cuts the pod-template writes out of `plan` and returns their findings, which it no longer
/// carries; the HPA, the replica count and the PodDisruptionBudget stay planned.
pub fn defer_template(plan: &mut Plan) -> Vec<Finding> {
    let deferred: Vec<Finding> = plan
        .findings
        .iter()
        .filter(|f| f.fixable && f.field.starts_with("spec.template"))
        .cloned()
        .collect();
    fight::hold(plan, &deferred);
    plan.findings.retain(|f| !deferred.contains(f));
    plan.rolls_pods = false;
    deferred
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::ha::PdbAction;
    use crate::rules::ha::fight::tests::finding;
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use serde_json::json;

    fn deployment(generation: i64, status: Option<DeploymentStatus>) -> Deployment {
        let mut d = Deployment::default();
        d.metadata.generation = Some(generation);
        d.spec = Some(serde_json::from_value(json!({"replicas": 3, "selector": {}})).unwrap());
        d.status = status;
        d
    }

    fn status(observed: i64, updated: i32, total: i32, reason: &str) -> DeploymentStatus {
        serde_json::from_value(json!({
            "observedGeneration": observed,
            "replicas": total, "updatedReplicas": updated, "availableReplicas": 3,
            "conditions": [{"type": "Progressing", "status": "True", "reason": reason}],
        }))
        .unwrap()
    }

    #[test]
    fn only_a_rollout_the_controller_reports_in_progress_is_waited_for() {
        let rolling = deployment(4, Some(status(4, 1, 4, "ReplicaSetUpdated")));
        assert_eq!(
            rollout_in_progress(&rolling).as_deref(),
            Some("1 of 3 replicas updated")
        );
        let unseen = deployment(5, Some(status(4, 3, 3, "NewReplicaSetAvailable")));
        assert_eq!(
            rollout_in_progress(&unseen),
            None,
            "a generation not observed yet has started no rollout"
        );
        let done = deployment(4, Some(status(4, 3, 3, "NewReplicaSetAvailable")));
        assert_eq!(rollout_in_progress(&done), None);
        let stalled = deployment(4, Some(status(4, 1, 4, "ProgressDeadlineExceeded")));
        assert_eq!(
            rollout_in_progress(&stalled),
            None,
            "a new template may unstick it"
        );
        assert_eq!(
            rollout_in_progress(&deployment(1, None)),
            None,
            "never reported on"
        );
    }

    #[test]
    fn the_template_waits_the_budget_and_the_replicas_do_not() {
        let mut plan = Plan {
            findings: vec![
                finding("Deployment/ns/istiod", "spec.replicas"),
                finding(
                    "Deployment/ns/istiod",
                    "spec.template.spec.containers[discovery].resources",
                ),
                finding(
                    "Deployment/ns/istiod",
                    "spec.template.spec.affinity.podAntiAffinity",
                ),
                finding("Deployment/ns/istiod", "PodDisruptionBudget"),
            ],
            deployment_patch: Some(json!({"spec": {"replicas": 3, "template": {"spec": {
                "containers": [{"name": "discovery"}], "affinity": {}}}}})),
            pdb: Some(PdbAction::Apply {
                name: "istiod-meshwarden".into(),
                patch: json!({}),
            }),
            rolls_pods: true,
            takeovers: vec![(
                "Deployment/ns/istiod container discovery".into(),
                "helm".into(),
            )],
            ..Plan::default()
        };
        let deferred = defer_template(&mut plan);
        assert_eq!(deferred.len(), 2);
        assert_eq!(
            plan.findings
                .iter()
                .map(|f| f.field.as_str())
                .collect::<Vec<_>>(),
            ["spec.replicas", "PodDisruptionBudget"]
        );
        assert_eq!(
            plan.deployment_patch,
            Some(json!({"spec": {"replicas": 3, "template": {"spec": {}}}}))
        );
        assert!(!plan.rolls_pods && plan.pdb.is_some() && plan.takeovers.is_empty());

        // Only template findings: no Deployment write at all.
        let mut only = Plan {
            findings: vec![finding(
                "Deployment/ns/istiod",
                "spec.template.spec.containers[discovery].resources",
            )],
            deployment_patch: Some(json!({"spec": {"template": {"spec": {"containers": []}}}})),
            rolls_pods: true,
            ..Plan::default()
        };
        assert_eq!(defer_template(&mut only).len(), 1);
        assert_eq!(only.deployment_patch, None);
        assert!(only.findings.is_empty());
    }
}
