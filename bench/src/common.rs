//! Helpers shared by the benchmarks.
use std::time::Duration;

use kube::Client;

/// An Istio fixture rendered from Istio's own charts (`testplane::istio::fixture`).
pub fn istio_fixture(name: &str) -> String {
    testplane::istio::fixture(name).unwrap_or_else(|e| panic!("render Istio fixture {name}: {e}"))
}

/// A fresh kube-apiserver and etcd in a scratch directory named after `tag`, with the
/// MeshPolicy CRD installed: the directory, the plane and an admin client.
pub async fn start_plane(tag: &str) -> (std::path::PathBuf, testplane::Plane, Client) {
    start_plane_of(tag, testplane::Flavor::Bare).await
}

/// [`start_plane`] of either flavour: `Cluster` adds the controllers, the scheduler, kwok nodes
/// and Istio installed by Helm with a real istiod.
pub async fn start_plane_of(
    tag: &str,
    flavor: testplane::Flavor,
) -> (std::path::PathBuf, testplane::Plane, Client) {
    let dir = testplane::scratch_dir(tag);
    let plane = testplane::Plane::start_with(&dir, testplane::Lifetime::Attached, flavor)
        .await
        .expect("start the plane (run hack/build-k8s-bins.sh first)");
    let admin = plane.client().await.expect("client");
    let crd = meshwarden::api::crd_yaml().expect("crd");
    testplane::apply_yaml(&admin, &crd, &[]).await.expect("crd");
    (dir, plane, admin)
}

/// The `istio-system` namespace and Istio's CRDs (the `base` chart).
pub async fn istio_base(admin: &Client) {
    testplane::apply_yaml(
        admin,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n",
        &[],
    )
    .await
    .expect("istio-system");
    testplane::apply_yaml(admin, &istio_fixture("base.yaml"), &[])
        .await
        .expect("Istio CRDs");
}

/// `fut`, given at most `limit`: a benchmark waits only for what can happen, and says what
/// it waited for when it does not.
pub async fn bounded<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: not within {limit:?}"),
    }
}

/// Whether an audit log entry is one of the operator's periodic writes, which it makes
/// whatever else happens: the renewal of its presence or leader Lease (every 5 s). A wait for
/// the operator to be quiet leaves them out, or it would never end.
pub fn periodic(entry: &serde_json::Value) -> bool {
    entry["objectRef"]["resource"] == "leases"
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn load(client: &Client, file: &str, namespace: &str) {
    let text = istio_fixture(file);
    let keep = [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ];
    let mut out = String::new();
    for doc in text.split("\n---") {
        let Ok(v) = serde_yaml::from_str::<serde_json::Value>(doc) else {
            continue;
        };
        if v.is_null() || !keep.contains(&v["kind"].as_str().unwrap_or_default()) {
            continue;
        }
        let mut v = v;
        v["metadata"]["namespace"] = serde_json::json!(namespace);
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&v).expect("yaml"));
    }
    testplane::apply_yaml(client, &out, &[])
        .await
        .expect("load fixture");
}
