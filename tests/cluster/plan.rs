//! `meshwarden plan` on the full cluster: a gateway installed by Helm 4 from Istio's chart and
//! workloads whose sidecars istiod injected. The plan from a file (the policy in Audit, not in
//! the cluster) names the fields it takes over from Helm and the workload held for a rollout
//! slot, writes nothing (only dry runs in the audit log), and lists exactly the objects and
//! fields Enforce's first pass then writes.

use super::*;

#[tokio::test]
async fn plan_on_a_helm_gateway_and_injected_workloads_is_the_first_enforce_pass() {
    let env = common::cluster_env("plan").await;
    let gw = env.namespace("gw", &[]).await;
    let chart = testplane::istio::chart("gateway").display().to_string();
    helm(
        &testplane::istio::helm(),
        &env.plane.kubeconfig,
        &[
            "install",
            "gw",
            &chart,
            "-n",
            &gw,
            "--set",
            "global.hub=docker.io/istio",
        ],
    );
    let shop = env
        .namespace(
            "shop",
            &[("istio-injection", "enabled"), ("meshwarden-test", &env.id)],
        )
        .await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &shop);
    create_deployments(&env.client, &shop, &["cart", "checkout"]).await;
    let gateway: Api<Deployment> = Api::namespaced(env.client.clone(), &gw);
    common::eventually(90, "the gateway Deployment ready", || async {
        let d = gateway.get("gw").await.ok()?;
        (d.status?.available_replicas? >= 1).then_some(())
    })
    .await;
    for name in ["cart", "checkout"] {
        common::eventually(90, "2 ready injected pods per workload", || async {
            let p = ready_pods(&pods, name).await;
            (p.len() == 2 && p.iter().all(|p| proxy_requests(p).is_some())).then_some(())
        })
        .await;
    }
    let spec = |enforcement: &str| {
        format!(
            "enforcement: {enforcement}
gateways:
- {{name: ingress, namespace: {gw}, selector: {{matchLabels: {{istio: gw}}}}, replicas: {{min: 2}}, disruptionBudget: {{maxUnavailable: 1}}, resources: {{limits: {{memory: 1536Mi}}}}}}
sidecars: {{namespaceSelector: {{matchLabels: {{meshwarden-test: {id}}}}}, maxConcurrentRollouts: 1, resources: {{requests: {{cpu: 200m, memory: 256Mi}}, limits: {{memory: 512Mi}}}}}}
",
            id = env.id
        )
    };
    let (file, _keep) = env.policy_file("p", &spec("Audit"));
    let kubeconfig = &env.plane.operator_kubeconfig;
    let (code, out, secs) = common::run_plan(kubeconfig, &["-f", &file]);
    eprintln!("plan took {secs:.2}s:\n{out}");
    assert_eq!(code, 2, "changes pending:\n{out}");
    common::assert_lists(
        &out,
        &[
            format!("~ HorizontalPodAutoscaler {gw}/gw (updated)"),
            format!("~ Deployment {gw}/gw (updated; its pods roll: 1 pod)"),
            format!("+ PodDisruptionBudget {gw}/gw-meshwarden (created)"),
            format!("~ Deployment {shop}/cart (updated; its pods roll: 2 pods)"),
            "  takes over from helm: spec.minReplicas".into(),
            "  takes over from helm: spec.template.spec.containers[name=istio-proxy].resources.limits.memory".into(),
            format!("  Held Deployment/{shop}/checkout (SidecarResources)"),
            "sidecars roll in 2 paced wave(s) of at most 1 (1 now, 1 waiting for a slot)".into(),
        ],
    );
    let writes = || common::writes_of(&env.plane.audit_events(), &[&gw, &shop]);
    let by_plan = writes();
    assert!(
        !by_plan.is_empty() && by_plan.iter().all(|w| w.dry_run),
        "{by_plan:?}"
    );

    let (code, json, _) = common::run_plan(kubeconfig, &["-f", &file, "-o", "json"]);
    assert_eq!(code, 2);
    let planned: serde_json::Value = serde_json::from_str(&json).unwrap();
    env.enforce_as_planned("p", &spec("Enforce"), &planned, &[&gw, &shop])
        .await;
    helm(
        &testplane::istio::helm(),
        &env.plane.kubeconfig,
        &["uninstall", "gw", "-n", &gw],
    );
}
