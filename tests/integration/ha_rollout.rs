//! A pod-template change waits for the rollout in progress (an installer's upgrade, a
//! previous write) to finish; the HPA and the budget do not wait.
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

use crate::common::{self, condition, container_resources, quantity};

const KINDS: &[&str] = common::HA_KINDS;

#[tokio::test]
async fn template_writes_wait_for_the_rollout_in_progress() {
    let env = common::env("harollout").await;
    let ns = env.namespace("istio", &[]).await;
    env.load_fixture("istiod-default.yaml", &ns, KINDS).await;
    let deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), &ns);

    // Play the Deployment controller in the middle of a rollout: the generation observed, a
    // surge pod of the new template created, none of it available yet.
    let d = deploys.get("istiod").await.unwrap();
    deploys
        .patch_status(
            "istiod",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
                "observedGeneration": d.metadata.generation,
                "replicas": 2, "updatedReplicas": 0, "readyReplicas": 1, "availableReplicas": 1,
                "conditions": [{"type": "Progressing", "status": "True",
                    "reason": "ReplicaSetUpdated", "message": "rolling"}],
            }})),
        )
        .await
        .unwrap();
    let cpu = |d: &Deployment| quantity(&container_resources(d, "discovery").requests, "cpu");
    let installed = cpu(&d);
    assert_ne!(installed.as_deref(), Some("700m"));

    let _op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, replicas: {{min: 3}}, disruptionBudget: {{maxUnavailable: 1}}, resources: {{requests: {{cpu: 700m}}}}}}"
        ),
    )
    .await;
    let p = env
        .wait_policy("p", 30, |p| {
            let c = condition(p, "ControlPlaneHA")?;
            (c.reason == "Progressing"
                && p.status.as_ref()?.observed_generation == p.metadata.generation)
                .then(|| p.clone())
        })
        .await;
    let c = condition(&p, "ControlPlaneHA").unwrap();
    assert_eq!(c.status, "False");
    assert!(
        c.message.contains(&format!(
            "the pod template of Deployment/{ns}/istiod (0 of 1 replicas updated) is changed once its rollout in progress finishes"
        )),
        "{}",
        c.message
    );
    let violations = p.status.as_ref().unwrap().violations.clone();
    assert!(
        violations.iter().any(|v| v.message.contains("resources")
            && v.message.ends_with("(written once the rollout finishes)")),
        "{violations:?}"
    );
    // The HPA minimum is raised now; the template is not touched while the rollout runs.
    let min = hpas.get("istiod").await.unwrap().spec.unwrap().min_replicas;
    assert_eq!(min, Some(3), "the HPA does not wait");
    let d = deploys.get("istiod").await.unwrap();
    assert_eq!(cpu(&d), installed, "the template waits");
    assert!(
        !d.managed_fields()
            .iter()
            .any(|m| m.manager.as_deref() == Some("meshwarden")),
        "no Deployment write at all while its rollout is in progress"
    );

    // The rollout finishes: the template is written (and its own rollout starts).
    common::complete_rollout(&env.client, &ns, "istiod").await;
    common::eventually(30, "the CPU request written after the rollout", || async {
        let d = deploys.get("istiod").await.ok()?;
        (cpu(&d).as_deref() == Some("700m")).then_some(())
    })
    .await;
}
