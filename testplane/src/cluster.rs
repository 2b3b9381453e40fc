//! What a cluster runs around the API server: kube-controller-manager (garbage collector,
//! workload, disruption, namespace, autoscaling and service-account controllers),
//! kube-scheduler, kwok for six simulated nodes over three zones (pods are scheduled for real
//! and become Running and Ready; eviction and drains honour PDBs), and Istio (see
//! [`crate::istio`]).

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, Patch, PatchParams};

use crate::{Error, Lifetime, Plane, Result, bin_dir, free_port, spawn, tail};

/// Zones of the simulated nodes, two nodes each.
pub const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
/// Nodes per zone.
pub const NODES_PER_ZONE: usize = 2;
/// Annotation kwok selects the nodes it manages by.
const KWOK_NODE: &str = "kwok.x-k8s.io/node";

/// Names of the simulated nodes, in zone order.
pub fn node_names() -> Vec<String> {
    ZONES
        .iter()
        .flat_map(|z| (1..=NODES_PER_ZONE).map(move |i| format!("node-{z}-{i}")))
        .collect()
}

/// Starts the controllers, the scheduler, kwok and its nodes, then Istio, on a ready plane.
pub(crate) async fn start(plane: &mut Plane, lifetime: Lifetime) -> Result<()> {
    let bins = bin_dir();
    for b in ["kube-controller-manager", "kube-scheduler", "kwok"] {
        if !bins.join(b).exists() {
            return Err(Error::MissingBinaries(bins));
        }
    }
    let d = |f: &str| plane.dir.join(f).display().to_string();
    let kubeconfig = plane.kubeconfig.display().to_string();
    let cm = spawn(
        &bins.join("kube-controller-manager"),
        &[
            format!("--kubeconfig={kubeconfig}"),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
            "--controllers=*".into(),
            format!("--service-account-private-key-file={}", d("sa.key")),
            format!("--root-ca-file={}", d("ca.crt")),
            "--use-service-account-credentials=false".into(),
            // The autoscaler acts on its bounds every 5 s instead of 15 s (no metrics run
            // here, so bounds are all it acts on).
            "--horizontal-pod-autoscaler-sync-period=5s".into(),
            "--v=1".into(),
        ],
        &plane.dir.join("kube-controller-manager.log"),
        lifetime,
    )?;
    plane.adopt(cm, lifetime)?;
    let scheduler = spawn(
        &bins.join("kube-scheduler"),
        &[
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
            "--v=1".into(),
        ],
        &plane.dir.join("kube-scheduler.log"),
        lifetime,
    )?;
    plane.adopt(scheduler, lifetime)?;
    let stages = bins.join("kwok-stages");
    let stage = |p: &str| stages.join(p).display().to_string();
    let kwok = spawn(
        &bins.join("kwok"),
        &[
            format!("--kubeconfig={kubeconfig}"),
            "--manage-all-nodes=false".into(),
            format!("--manage-nodes-with-annotation-selector={KWOK_NODE}=fake"),
            format!("--server-address=127.0.0.1:{}", free_port(&plane.dir)?),
            "--node-ip=127.0.0.1".into(),
            // The heartbeat stage below refreshes node status every ~10 minutes and leaves the
            // liveness to node Leases, which kwok renews only with a lease duration set. Without
            // them the node controller finds every node unreachable after its grace period (50 s)
            // and marks every pod NotReady, which the pod stages never undo.
            "--node-lease-duration-seconds=40".into(),
            "--cidr=10.244.0.1/16".into(),
            format!("--config={}", stage("node/fast/node-initialize.yaml")),
            format!(
                "--config={}",
                stage("node/heartbeat-with-lease/node-heartbeat-with-lease.yaml")
            ),
            format!("--config={}", stage("pod/fast/pod-ready.yaml")),
            format!("--config={}", stage("pod/fast/pod-complete.yaml")),
            format!("--config={}", stage("pod/fast/pod-delete.yaml")),
        ],
        &plane.dir.join("kwok.log"),
        lifetime,
    )?;
    plane.adopt(kwok, lifetime)?;

    let client = plane.client().await?;
    let nodes: Api<Node> = Api::all(client.clone());
    for (i, name) in node_names().iter().enumerate() {
        let zone = ZONES[i / NODES_PER_ZONE];
        nodes
            .patch(
                name,
                &PatchParams::apply("testplane").force(),
                &Patch::Apply(node_manifest(name, zone)),
            )
            .await?;
    }
    wait_for(
        plane,
        "simulated nodes Ready",
        Duration::from_secs(60),
        || {
            let nodes = nodes.clone();
            async move {
                let list = nodes.list(&Default::default()).await.ok()?;
                let ready = list
                    .items
                    .iter()
                    .filter(|n| {
                        n.status
                            .as_ref()
                            .and_then(|s| s.conditions.as_ref())
                            .is_some_and(|c| {
                                c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                            })
                    })
                    .count();
                (ready >= node_names().len()).then_some(())
            }
        },
    )
    .await?;
    // Pods need their namespace's `default` ServiceAccount (made by the controller manager).
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    wait_for(
        plane,
        "the default ServiceAccount",
        Duration::from_secs(60),
        || {
            let sas = sas.clone();
            async move { sas.get_opt("default").await.ok().flatten().map(|_| ()) }
        },
    )
    .await?;
    crate::istio::start(plane, lifetime).await
}

/// A simulated node: kwok keeps it Ready; room for a few hundred pods.
fn node_manifest(name: &str, zone: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/region": "region-1",
                "topology.kubernetes.io/zone": zone,
                "type": "kwok",
            },
        },
        "status": {
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "250"},
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "250"},
        },
    })
}

/// Polls `check` every 250 ms until it returns `Some`, or fails after `limit` with the
/// cluster components' last log lines.
pub async fn wait_for<T, F, Fut>(
    plane: &Plane,
    what: &'static str,
    limit: Duration,
    check: F,
) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_for_in(&plane.dir, what, limit, check).await
}

/// [`wait_for`] for the plane in `dir`.
pub(crate) async fn wait_for_in<T, F, Fut>(
    dir: &std::path::Path,
    what: &'static str,
    limit: Duration,
    check: F,
) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if started.elapsed() > limit {
            let mut log = String::new();
            for f in [
                "kube-controller-manager.log",
                "kube-scheduler.log",
                "kwok.log",
                "istiod.log",
                "istiod-canary.log",
            ] {
                let path = dir.join(f);
                if path.exists() {
                    log.push_str(&tail(&path, 15));
                }
            }
            return Err(Error::NotReady {
                what,
                secs: started.elapsed().as_secs(),
                log,
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Rolling: the Deployment controller has not finished the newest generation.
pub fn rolling(d: &Deployment) -> bool {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let st = d.status.clone().unwrap_or_default();
    st.observed_generation < d.metadata.generation
        || st.updated_replicas.unwrap_or(0) < want
        || st.replicas.unwrap_or(0) > want
        || st.available_replicas.unwrap_or(0) < want
}
