//! The full test cluster does what a cluster does: the scheduler spreads pods over zones,
//! kwok runs them, the disruption controller computes PDB status, drains honour PDBs, the
//! garbage collector removes dependents, and istiod injects sidecars sized by the
//! `sidecar.istio.io/proxy*` annotations. These are the behaviours the lifecycle tests of
//! meshwarden stand on, so they are checked first.

use super::*;

/// The zone of the node `pod` runs on.
pub(super) async fn zone_of(nodes: &Api<Node>, pod: &Pod) -> String {
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
    let ready = common::eventually(60, "3 ready web pods", || async {
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
    common::eventually(60, "PDB status with 1 allowed disruption", || async {
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
    let after = common::eventually(90, "3 ready web pods after the drain", || async {
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
    common::eventually(
        60,
        "the garbage collector to remove the dependent",
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
    let ready = common::eventually(90, "2 ready injected pods", || async {
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
