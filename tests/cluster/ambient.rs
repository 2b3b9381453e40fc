//! The ambient section on the full cluster: Istio's own ztunnel and cni charts installed by
//! Helm (as users install them) on two nodes of the test's own, their pods run by kwok, and an
//! app in an ambient namespace. The section reports True with the charts' defaults, then a
//! toleration a user removed from the ztunnel DaemonSet, then a node that runs ambient pods and
//! has no ztunnel; it writes nothing.

use super::*;
use k8s_openapi::api::apps::v1::DaemonSet;

/// Istio's `chart` installed by Helm as release `release` in `ns`, its pods on the nodes of
/// `pool` only (the chart's own values for it), images as the plane's istiod has them.
fn install(release: &str, chart: &str, ns: &str, pool: &str) {
    let mut args: Vec<String> = vec![
        "install".into(),
        release.into(),
        testplane::istio::chart(chart).display().to_string(),
        "--namespace".into(),
        ns.into(),
        "--set".into(),
        "profile=ambient".into(),
    ];
    for v in testplane::istio::image_values() {
        args.extend(["--set".into(), v]);
    }
    let placement = match chart {
        // ztunnel: `nodeSelector`; cni: `affinity`.
        "ztunnel" => format!("nodeSelector={}", json!({"pool": pool})),
        _ => format!(
            "affinity={}",
            json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "pool", "operator": "In", "values": [pool]}]}]}}})
        ),
    };
    args.extend(["--set-json".into(), placement]);
    testplane::istio::run_helm(
        &testplane::istio::helm(),
        &args,
        Some(&testplane::shared_cluster().kubeconfig),
    )
    .unwrap_or_else(|e| panic!("helm install {release}: {e}"));
}

/// Patches DaemonSet `name` as `kubectl patch` would (its field manager).
async fn patch_as_user(api: &Api<DaemonSet>, name: &str, patch: Patch<serde_json::Value>) {
    let params = PatchParams {
        field_manager: Some("kubectl-patch".into()),
        ..Default::default()
    };
    api.patch(name, &params, &patch).await.unwrap();
}

/// Waits until the `AmbientDataPlane` condition's reason and the section's violations (object,
/// message) pass `done`; returns the condition's message and those violations.
async fn wait_until(
    env: &common::Env,
    secs: u64,
    done: impl Fn(&str, &[(String, String)]) -> bool,
) -> (String, Vec<(String, String)>) {
    env.wait_policy("p", secs, |p| {
        let c = common::condition(p, "AmbientDataPlane")?;
        let violations: Vec<(String, String)> = p
            .status
            .as_ref()?
            .violations
            .iter()
            .filter(|v| v.rule == "AmbientDataPlane")
            .map(|v| (v.object.clone(), v.message.clone()))
            .collect();
        done(&c.reason, &violations).then(|| (c.message.clone(), violations))
    })
    .await
}

/// [`wait_until`] the condition has `reason`.
async fn wait_reason(
    env: &common::Env,
    secs: u64,
    reason: &str,
) -> (String, Vec<(String, String)>) {
    wait_until(env, secs, |r, _| r == reason).await
}

#[tokio::test]
async fn the_ambient_section_reports_the_charts_agents_a_drift_and_a_node_without_ztunnel() {
    // Its nodes' names (`ztunnel-…`) sort after the cluster's own (`node-…`): a test that
    // takes the cluster's second node by name order is not given one of them.
    let _upgrades = UPGRADES_POLICY.lock().await;
    let env = common::cluster_env("ztunnel").await;
    let id = env.id.clone();
    // Two nodes of the test's own, tainted so that only its pods (and agents that tolerate
    // every taint) run there.
    let nodes: Api<Node> = Api::all(env.client.clone());
    let names = [format!("{id}-n1"), format!("{id}-n2")];
    for (name, zone) in names.iter().zip(["zone-a", "zone-b"]) {
        let node = serde_json::from_value(posture::node(name, zone, &id)).unwrap();
        nodes.create(&PostParams::default(), &node).await.unwrap();
    }
    let system = env.namespace("istio", &[]).await;
    install("ztunnel", "ztunnel", &system, &id);
    install("istio-cni", "cni", &system, &id);
    let daemonsets: Api<DaemonSet> = Api::namespaced(env.client.clone(), &system);
    for ds in ["ztunnel", "istio-cni-node"] {
        common::eventually(90, &format!("{ds} Ready on both nodes"), || async {
            let st = daemonsets.get(ds).await.ok()?.status?;
            (st.desired_number_scheduled == 2 && st.number_ready == 2).then_some(())
        })
        .await;
    }
    // An app in an ambient namespace, on node 1.
    let app = env
        .namespace("app", &[("istio.io/dataplane-mode", "ambient")])
        .await;
    let mut web = deployment("web", 2, json!({}));
    web["spec"]["template"]["spec"] = json!({
        "nodeSelector": {"kubernetes.io/hostname": names[0]},
        "tolerations": [{"key": "pool", "operator": "Equal", "value": id, "effect": "NoSchedule"}],
        "containers": [{"name": "app", "image": "registry.example/app:1"}],
    });
    Api::<Deployment>::namespaced(env.client.clone(), &app)
        .create(
            &PostParams::default(),
            &serde_json::from_value(web).unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &app);
    common::eventually(90, "two ready web pods", || async {
        (ready_pods(&pods, "web").await.len() == 2).then_some(())
    })
    .await;

    let op = env.start_operator().await;
    // Enforce: the section reports all the same.
    env.create_policy(
        "p",
        // The upgrades section restarts outdated proxies in the agents' namespace: ztunnel's
        // `istio-proxy` container is none (a restart would cut every node's connections).
        &format!(
            "enforcement: Enforce\nambient: {{namespace: {system}}}\nupgrades: {{restartOutdated: true, namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {system}}}}}}}"
        ),
    )
    .await;
    // 1. The charts' defaults hold, ztunnel and istio-cni are Ready where the app runs, and
    //    their version is istiod's.
    let (message, violations) = wait_reason(&env, 60, "Compliant").await;
    eprintln!("1. {message}");
    // The charts add the image variant to the tag (`1.31-dev-distroless`).
    let version = testplane::istio::version();
    for part in [
        format!("DaemonSet/{system}/ztunnel {version}"),
        format!("DaemonSet/{system}/istio-cni-node {version}"),
        "1 node(s) run ambient pods".to_string(),
    ] {
        assert!(message.contains(&part), "{part}: {message}");
    }
    assert_eq!(message.matches("(2/2 Ready)").count(), 2, "{message}");
    assert!(violations.is_empty(), "{violations:?}");

    // 2. A user removes ztunnel's toleration of every NoExecute taint.
    patch_as_user(
        &daemonsets,
        "ztunnel",
        Patch::Merge(json!({"spec": {"template": {"spec": {"tolerations": [
            {"effect": "NoSchedule", "operator": "Exists"},
            {"key": "CriticalAddonsOnly", "operator": "Exists"},
        ]}}}})),
    )
    .await;
    let (message, violations) = wait_reason(&env, 30, "DataPlanePostureDrift").await;
    eprintln!("2. {message}");
    assert_eq!(
        violations.len(),
        1,
        "one violation for the DaemonSet: {violations:?}"
    );
    assert_eq!(violations[0].0, format!("DaemonSet/{system}/ztunnel"));
    assert!(
        violations[0]
            .1
            .contains("its pods do not tolerate every NoExecute taint"),
        "{violations:?}"
    );
    assert!(message.contains("The section only reports"), "{message}");

    // 3. ztunnel is taken off node 1, where the app runs (a node affinity, as a user would).
    patch_as_user(
        &daemonsets,
        "ztunnel",
        Patch::Merge(
            json!({"spec": {"template": {"spec": {"affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": [names[0]]},
                    {"key": "pool", "operator": "In", "values": [id]},
                ]},
            ]}}}}}}}),
        ),
    )
    .await;
    let (message, violations) = wait_reason(&env, 60, "DataPlaneNotReady").await;
    eprintln!("3. {message}\n   {violations:?}");
    let node = format!("Node/{}", names[0]);
    let not_ready: Vec<&(String, String)> = violations.iter().filter(|v| v.0 == node).collect();
    assert_eq!(not_ready.len(), 1, "{violations:?}");
    assert!(
        not_ready[0]
            .1
            .contains(&format!("runs 2 ambient pod(s) ({app}/web-")),
        "{not_ready:?}"
    );
    assert!(
        not_ready[0].1.contains("without a Ready ztunnel pod"),
        "{not_ready:?}"
    );
    assert!(message.starts_with(&node), "{message}");
    // The drift is still reported, next to it.
    assert!(
        violations
            .iter()
            .any(|v| v.0 == format!("DaemonSet/{system}/ztunnel")),
        "{violations:?}"
    );
    // 4. ztunnel rolled back two minor versions below istiod (the container's image, as
    //    `kubectl set image` would): reported next to the node without ztunnel.
    let old = "docker.io/istio/ztunnel:1.29.0";
    patch_as_user(
        &daemonsets,
        "ztunnel",
        Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "istio-proxy", "image": old},
        ]}}}})),
    )
    .await;
    let ztunnel = format!("DaemonSet/{system}/ztunnel");
    let (message, violations) = wait_until(&env, 30, |_, v| {
        v.iter()
            .any(|(o, m)| *o == ztunnel && m.contains("1.29.0 is"))
    })
    .await;
    eprintln!("4. {message}\n   {violations:?}");
    let skew: Vec<&(String, String)> = violations
        .iter()
        .filter(|(o, m)| *o == ztunnel && m.contains("1.29.0 is"))
        .collect();
    assert_eq!(skew.len(), 1, "{violations:?}");
    assert!(
        skew[0].1.contains(&format!(
            "ztunnel 1.29.0 is 2 minor versions behind istiod {version}"
        )),
        "{skew:?}"
    );
    assert!(
        message.starts_with(&node),
        "the most urgent first: {message}"
    );
    // Once ztunnel runs 1.29.0 (on node 2, kept off node 1), two more evaluations restart
    // nothing.
    common::eventually(90, "ztunnel 1.29.0 Ready where it runs", || async {
        let ds = daemonsets.get("ztunnel").await.ok()?;
        let st = ds.status?;
        (st.observed_generation == ds.metadata.generation
            && st.desired_number_scheduled > 0
            && st.updated_number_scheduled == Some(st.desired_number_scheduled)
            && st.number_ready == st.desired_number_scheduled)
            .then_some(())
    })
    .await;
    two_more_reconciles(&env, &op.state, &system).await;
    let p = env.wait_converged("p", 30).await;
    let st = p.status.unwrap_or_default();
    let as_proxy: Vec<_> = st
        .violations
        .iter()
        .filter(|v| v.rule == "Upgrades" && v.object.contains("ztunnel"))
        .collect();
    assert!(
        as_proxy.is_empty(),
        "ztunnel taken for a sidecar: {as_proxy:?}"
    );
    let counted = st.upgrades.map(|u| u.proxies).unwrap_or_default();
    assert!(counted.is_empty(), "no sidecar runs here: {counted:?}");
    // Nothing was written to the agents or the app.
    let writes = env.operator_writes_to(|r| r["namespace"] == system || r["namespace"] == app);
    assert_eq!(writes, 0, "the section writes nothing");
    op.stop().await;
    env.delete_policies().await;
    for release in ["ztunnel", "istio-cni"] {
        let _ = testplane::istio::run_helm(
            &testplane::istio::helm(),
            &[
                "uninstall".into(),
                release.into(),
                "--namespace".into(),
                system.clone(),
            ],
            Some(&testplane::shared_cluster().kubeconfig),
        );
    }
    for name in &names {
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }
}
