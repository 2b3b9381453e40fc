//! Faults on a plane of this test's own: kube-apiserver killed (`kill -9`) and started again.
//! The operator runs as its binary, as in production.
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use meshwarden::api::MeshPolicy;
use serde_json::json;

#[path = "support/operator.rs"]
mod operator;
use operator::{Replica, eventually, http_get};

const NS: &str = "shop";
const CPU: &str = "sidecar.istio.io/proxyCPU";

async fn cpu_annotation(deployments: &Api<Deployment>) -> Option<String> {
    let d = deployments.get("web").await.ok()?;
    d.spec?.template.metadata?.annotations?.get(CPU).cloned()
}

/// A plane of this test's own (its API server may be killed), with the MeshPolicy CRD.
async fn own_plane(tag: &str) -> (std::path::PathBuf, testplane::Plane, kube::Client) {
    let dir = testplane::scratch_dir(tag);
    let plane = testplane::Plane::start(&dir, testplane::Lifetime::Attached)
        .await
        .expect("start kube-apiserver (run hack/build-k8s-bins.sh first)");
    let admin = plane.client().await.unwrap();
    testplane::apply_yaml(&admin, &meshwarden::api::crd_yaml().unwrap(), &[])
        .await
        .unwrap();
    (dir, plane, admin)
}

#[tokio::test]
async fn drift_is_corrected_within_5s_of_the_api_server_returning() {
    let (dir, mut plane, admin) = own_plane("faults").await;
    testplane::apply_yaml(
        &admin,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}, labels: {{istio-injection: enabled}}}}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: {NS}}}\n\
             spec:\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    \
             spec: {{containers: [{{name: web, image: web}}]}}\n"
        ),
        &[],
    )
    .await
    .unwrap();
    // `pacing: "Off"`: this plane runs no controller manager, so no rollout ever completes.
    let policy: MeshPolicy = serde_yaml::from_str(
        "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: faults}\n\
         spec:\n  enforcement: Enforce\n  sidecars: {resources: {requests: {cpu: 100m, memory: 128Mi}}, pacing: \"Off\"}\n",
    )
    .unwrap();
    Api::<MeshPolicy>::all(admin.clone())
        .create(&Default::default(), &policy)
        .await
        .unwrap();

    let operator = Replica::start(&plane.operator_kubeconfig, "operator", &dir, &[]);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    eventually(30, "the sidecar annotation set", || async {
        (cpu_annotation(&deployments).await? == "100m").then_some(())
    })
    .await;
    eventually(10, "ready", || http_get(operator.port, "/readyz")).await;

    plane.kill_apiserver().unwrap();
    let killed = Instant::now();
    eventually(10, "/readyz 503 while the API server is gone", || async {
        http_get(operator.port, "/readyz")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    eprintln!("unready {:?} after the kill", killed.elapsed());
    tokio::time::sleep(Duration::from_secs(15)).await;

    plane.restart_apiserver().await.unwrap();
    let ready = Instant::now();
    eprintln!("API server ready again after {:?}", killed.elapsed());
    let admin = plane.client().await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"template": {"metadata": {"annotations": {CPU: null}}}}}),
            ),
        )
        .await
        .unwrap();
    eventually(30, "the annotation restored", || async {
        (cpu_annotation(&deployments).await? == "100m").then_some(())
    })
    .await;
    let took = ready.elapsed();
    eprintln!("drift corrected {took:?} after the API server was ready");
    assert!(
        took < Duration::from_secs(5),
        "drift corrected {took:?} after the API server was ready:\n{}",
        operator.log_text()
    );
    eventually(10, "ready again", || http_get(operator.port, "/readyz")).await;
}

#[tokio::test]
async fn a_released_lease_is_taken_over_within_2s() {
    let (dir, plane, admin) = own_plane("handover").await;
    testplane::apply_yaml(
        &admin,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: meshwarden}\n",
        &[],
    )
    .await
    .unwrap();
    // The default lease duration (15 s): a standby that waited for expiry would need 5-15 s.
    let kc = &plane.operator_kubeconfig;
    let a = Replica::start(kc, "replica-a", &dir, &["--leader-election"]);
    let b = Replica::start(kc, "replica-b", &dir, &["--leader-election"]);
    let a_leads = eventually(30, "one leader", || async {
        match (
            a.metric("meshwarden_leader").await? as i64,
            b.metric("meshwarden_leader").await? as i64,
        ) {
            (1, 0) => Some(true),
            (0, 1) => Some(false),
            _ => None,
        }
    })
    .await;
    let (mut leader, standby) = if a_leads { (a, b) } else { (b, a) };
    // Let the standby settle into waiting for the lease's expiry.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = std::process::Command::new("kill")
        .args(["-TERM", &leader.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopped = Instant::now();
    eventually(20, "the standby leads", || async {
        (standby.metric("meshwarden_leader").await? == 1.0).then_some(())
    })
    .await;
    let took = stopped.elapsed();
    eprintln!("standby took over {took:?} after SIGTERM to the leader");
    let _ = leader.child.wait();
    assert!(
        took < Duration::from_secs(2),
        "took over {took:?} after SIGTERM to the leader:\n{}",
        standby.log_text()
    );
}
