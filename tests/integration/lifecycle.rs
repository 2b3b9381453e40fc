//! The controller reports observedGeneration and conditions, follows updates, and a deleted
//! policy leaves the mesh as it was.
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use meshwarden::api::MeshPolicy;

use crate::common::{self, condition};

const KINDS: &[&str] = &[
    "Deployment",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
];

#[tokio::test]
async fn status_follows_generation_and_delete_is_clean() {
    let env = common::env("life").await;
    let ns = env.namespace("istio", &[]).await;
    env.load_fixture("istiod-fixed-replicas.yaml", &ns, KINDS)
        .await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!("controlPlane: {{namespace: {ns}, replicas: {{min: 2}}}}"),
    )
    .await;

    let first = env
        .wait_policy("p", 30, |p| {
            let s = p.status.as_ref()?;
            (s.observed_generation == Some(1) && condition(p, "Ready").is_some()).then(|| p.clone())
        })
        .await;
    let cp = condition(&first, "ControlPlaneHA").unwrap();
    assert_eq!(
        cp.status, "False",
        "Audit by default: the deviation is reported"
    );
    assert_eq!(cp.reason, "NonCompliant");
    assert!(
        cp.message
            .contains("replicas is 1, below the declared minimum 2"),
        "{}",
        cp.message
    );
    assert_eq!(cp.observed_generation, Some(1));
    assert_eq!(first.status.as_ref().unwrap().violation_count, 1);
    let sidecars = condition(&first, "SidecarResources").unwrap();
    assert_eq!(sidecars.reason, "NotConfigured");

    // An update bumps the generation; status follows with new conditions.
    let api: Api<MeshPolicy> = Api::all(env.client.clone());
    let name = env.policy_name("p");
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"enforcement": "Enforce"}})),
    )
    .await
    .unwrap();
    let second = env
        .wait_policy("p", 30, |p| {
            let c = condition(p, "ControlPlaneHA")?;
            (p.status.as_ref()?.observed_generation == Some(2) && c.status == "True")
                .then(|| p.clone())
        })
        .await;
    assert_eq!(condition(&second, "Ready").unwrap().status, "True");
    assert_eq!(
        condition(&second, "Ready").unwrap().observed_generation,
        Some(2)
    );
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let d = deployments.get("istiod").await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));

    // Deleting the policy changes nothing on the mesh, now or later.
    let before = common::operator_writes(Some(&ns), &[]).len();
    api.delete(&name, &Default::default()).await.unwrap();
    common::eventually(10, "policy deleted", || async {
        api.get_opt(&name).await.unwrap().is_none().then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let d2 = deployments.get("istiod").await.unwrap();
    assert_eq!(
        d2.spec.as_ref().unwrap().replicas,
        Some(2),
        "values stay as they were"
    );
    assert_eq!(d2.metadata.generation, d.metadata.generation, "no rollout");
    assert_eq!(
        common::operator_writes(Some(&ns), &[]).len(),
        before,
        "no write after delete"
    );
    op.stop().await;
}

/// A shutdown also ends an operator whose policies could never be listed (here: an identity
/// without RBAC), which kube's controller alone would wait on forever.
#[tokio::test]
async fn shutdown_ends_an_operator_that_cannot_list_policies() {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    use meshwarden::context::Context;
    use meshwarden::controller::{self, State};
    use std::sync::Arc;
    let kc = Kubeconfig::read_from(&testplane::shared().kubeconfig).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some("meshwarden-test-nobody".into());
    let client = kube::Client::try_from(config).unwrap();
    let state = Arc::new(State::new(Context::new(client, None), None));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(controller::run(state, async move {
        let _ = rx.await;
    }));
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    tx.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), handle)
        .await
        .expect("the controller returns within 5 s of the shutdown signal")
        .unwrap();
}
