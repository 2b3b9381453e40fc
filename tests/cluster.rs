//! The full test cluster does what a cluster does: the scheduler spreads pods over zones,
//! kwok runs them, the disruption controller computes PDB status, drains honour PDBs, the
//! garbage collector removes dependents, and istiod injects sidecars sized by the
//! `sidecar.istio.io/proxy*` annotations. These are the behaviours the lifecycle tests of
//! meshwarden stand on, so they are checked here first.

#[allow(dead_code)]
#[path = "integration/common.rs"]
mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

async fn wait<T, F, Fut>(what: &str, secs: u64, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn namespace(client: &Client, name: &str, labels: serde_json::Value) {
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

fn deployment(name: &str, replicas: i32, annotations: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": annotations},
                "spec": {
                    "topologySpreadConstraints": [{
                        "maxSkew": 1,
                        "topologyKey": "topology.kubernetes.io/zone",
                        "whenUnsatisfiable": "DoNotSchedule",
                        "labelSelector": {"matchLabels": {"app": name}},
                    }],
                    "containers": [{"name": "app", "image": "registry.example/app:1"}],
                },
            },
        },
    })
}

/// Ready pods of `app` in `ns`, those not being deleted.
async fn ready_pods(pods: &Api<Pod>, app: &str) -> Vec<Pod> {
    let list = pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap();
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .collect()
}

async fn zone_of(nodes: &Api<Node>, pod: &Pod) -> String {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap();
    nodes.get(&node).await.unwrap().labels()["topology.kubernetes.io/zone"].clone()
}

#[tokio::test]
async fn scheduler_disruption_drain_and_garbage_collection_work() {
    let plane = testplane::shared_cluster();
    let client = plane.client().await;
    let ns = "cluster-basics";
    namespace(&client, ns, json!({})).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let nodes: Api<Node> = Api::all(client.clone());

    // Three replicas spread over zones: one Ready pod in each of the three zones.
    deploys
        .create(
            &PostParams::default(),
            &serde_json::from_value(deployment("web", 3, json!({}))).unwrap(),
        )
        .await
        .unwrap();
    let ready = wait("3 ready web pods", 60, || async {
        let p = ready_pods(&pods, "web").await;
        (p.len() == 3).then_some(p)
    })
    .await;
    let mut zones = BTreeSet::new();
    for p in &ready {
        zones.insert(zone_of(&nodes, p).await);
    }
    assert_eq!(zones.len(), 3, "one pod per zone: {zones:?}");

    // The disruption controller computes the budget's allowed disruptions.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}},
    }))
    .unwrap();
    pdbs.create(&PostParams::default(), &pdb).await.unwrap();
    wait("PDB status with 1 allowed disruption", 60, || async {
        let p = pdbs.get("web").await.ok()?;
        let s = p.status?;
        (s.disruptions_allowed == 1 && s.current_healthy == 3).then_some(())
    })
    .await;

    // kubectl drain evicts through the PDB; the Deployment is back to 3 Ready, in the same
    // zone as before since the drained node's zone has a second node.
    let victim = ready[0].spec.as_ref().unwrap().node_name.clone().unwrap();
    let victim_zone = zone_of(&nodes, &ready[0]).await;
    let kubectl = testplane::tools_dir().join("kubectl");
    let out = Command::new(&kubectl)
        .args([
            "--kubeconfig",
            &plane.kubeconfig.display().to_string(),
            "drain",
            &victim,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--pod-selector=app=web",
            "--timeout=90s",
        ])
        .output()
        .expect("run kubectl drain");
    assert!(
        out.status.success(),
        "kubectl drain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("evicted"), "drain evicted a pod: {stdout}");
    let after = wait("3 ready web pods after the drain", 90, || async {
        let p = ready_pods(&pods, "web").await;
        (p.len() == 3).then_some(p)
    })
    .await;
    for p in &after {
        assert_ne!(
            p.spec.as_ref().unwrap().node_name.as_deref(),
            Some(&*victim)
        );
    }
    let mut zones_after = BTreeSet::new();
    for p in &after {
        zones_after.insert(zone_of(&nodes, p).await);
    }
    assert!(zones_after.contains(&victim_zone));
    assert_eq!(zones_after.len(), 3);
    nodes
        .patch(
            &victim,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": null}})),
        )
        .await
        .unwrap();

    // The garbage collector removes a dependent of a deleted owner.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let owner = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "dependent", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.uid().unwrap(),
        }]}}))
        .unwrap(),
    )
    .await
    .unwrap();
    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    wait(
        "the garbage collector to remove the dependent",
        60,
        || async {
            cms.get_opt("dependent")
                .await
                .ok()
                .and_then(|d| d.is_none().then_some(()))
        },
    )
    .await;
}

#[tokio::test]
async fn istiod_injects_sidecars_sized_by_the_annotations() {
    let plane = testplane::shared_cluster();
    let client = plane.client().await;
    let ns = "cluster-injected";
    namespace(&client, ns, json!({"istio-injection": "enabled"})).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    deploys
        .create(
            &PostParams::default(),
            &serde_json::from_value(deployment(
                "shop",
                2,
                json!({"sidecar.istio.io/proxyCPU": "150m", "sidecar.istio.io/proxyMemory": "192Mi"}),
            ))
            .unwrap(),
        )
        .await
        .unwrap();
    let ready = wait("2 ready injected pods", 90, || async {
        let p = ready_pods(&pods, "shop").await;
        (p.len() == 2).then_some(p)
    })
    .await;
    for p in ready {
        let spec = p.spec.unwrap();
        let proxy = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == "istio-proxy")
            .unwrap_or_else(|| panic!("{} has no istio-proxy", p.metadata.name.unwrap()));
        let requests = proxy.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(requests["cpu"].0, "150m");
        assert_eq!(requests["memory"].0, "192Mi");
        assert!(
            p.metadata
                .annotations
                .unwrap_or_default()
                .contains_key("sidecar.istio.io/status")
        );
    }
}

/// Rolling: the Deployment controller has not finished the newest generation.
fn rolling(d: &Deployment) -> bool {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let st = d.status.clone().unwrap_or_default();
    st.observed_generation < d.metadata.generation
        || st.updated_replicas.unwrap_or(0) < want
        || st.replicas.unwrap_or(0) > want
        || st.available_replicas.unwrap_or(0) < want
}

fn proxy_requests(p: &Pod) -> Option<(String, String)> {
    let spec = p.spec.as_ref()?;
    let proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == "istio-proxy")?;
    let r = proxy.resources.as_ref()?.requests.as_ref()?;
    Some((r.get("cpu")?.0.clone(), r.get("memory")?.0.clone()))
}

#[tokio::test]
async fn meshwarden_paces_a_real_sidecar_rollout() {
    let env = common::cluster_env("rollout").await;
    let ns = env
        .namespace("shop", &[("istio-injection", "enabled")])
        .await;
    let deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    for name in ["cart", "checkout"] {
        deploys
            .create(
                &PostParams::default(),
                &serde_json::from_value(deployment(name, 2, json!({}))).unwrap(),
            )
            .await
            .unwrap();
    }
    for name in ["cart", "checkout"] {
        wait("2 ready injected pods per workload", 90, || async {
            let p = ready_pods(&pods, name).await;
            (p.len() == 2 && p.iter().all(|p| proxy_requests(p).is_some())).then_some(())
        })
        .await;
    }
    env.create_policy(
        "sidecars",
        &format!(
            "enforcement: Enforce\nsidecars:\n  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}\n  resources: {{requests: {{cpu: 200m, memory: 256Mi}}, limits: {{memory: 512Mi}}}}\n"
        ),
    )
    .await;
    let _op = env.start_operator().await;

    // Watch both rollouts until every pod carries the new proxy size; never two at once.
    let start = Instant::now();
    let mut most_rolling = 0;
    loop {
        let list = deploys.list(&ListParams::default()).await.unwrap();
        most_rolling = most_rolling.max(list.items.iter().filter(|d| rolling(d)).count());
        let all = pods.list(&ListParams::default()).await.unwrap().items;
        let live: Vec<&Pod> = all
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let resized = live
            .iter()
            .all(|p| proxy_requests(p) == Some(("200m".to_string(), "256Mi".to_string())));
        if live.len() == 4 && resized && list.items.iter().all(|d| !rolling(d)) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the sidecar rollout did not finish in 180s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(most_rolling, 1, "pacing rolls one workload at a time");
    let p = env.wait_settled("sidecars", 60).await;
    let cond = common::condition(&p, "SidecarResources").expect("SidecarResources condition");
    assert_eq!(cond.status, "True", "{cond:?}");
}
