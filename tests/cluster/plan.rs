//! `meshwarden plan` on the full cluster: a gateway installed by Helm 4 from Istio's chart and
//! workloads whose sidecars istiod injected. The plan from a file (the policy in Audit, not in
//! the cluster) names the fields it takes over from Helm and the workload held for a rollout
//! slot, writes nothing (only dry runs in the audit log), and lists exactly the objects and
//! fields Enforce's first pass then writes.

use super::*;

/// `meshwarden plan -f` of a policy with `spec` (not in the cluster), run with the operator's
/// credentials, as text and as JSON: both exit 2 (changes pending), and neither wrote anything
/// in `namespaces` (only dry runs in the audit log).
fn plan_pending(env: &common::Env, spec: &str, namespaces: &[&str]) -> (String, serde_json::Value) {
    let (file, _keep) = env.policy_file("p", spec);
    let kubeconfig = &env.plane.operator_kubeconfig;
    let (code, out, secs) = common::run_plan(kubeconfig, &["-f", &file]);
    eprintln!("plan took {secs:.2}s:\n{out}");
    assert_eq!(code, 2, "changes pending:\n{out}");
    let (code, json, _) = common::run_plan(kubeconfig, &["-f", &file, "-o", "json"]);
    assert_eq!(code, 2, "{json}");
    let by_plan = common::writes_of(&env.plane.audit_events(), namespaces);
    assert!(
        !by_plan.is_empty() && by_plan.iter().all(|w| w.dry_run),
        "the plan wrote: {by_plan:?}"
    );
    (out, serde_json::from_str(&json).unwrap())
}

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
    // Rolled out as the controller reports it: while it reports a rollout in progress, the
    // sidecars section holds the write (and so does the plan).
    let shop_deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &shop);
    for name in ["cart", "checkout"] {
        common::eventually(
            90,
            "2 ready injected pods per workload, rolled out",
            || async {
                let p = ready_pods(&pods, name).await;
                let d = shop_deploys.get(name).await.ok()?;
                (p.len() == 2 && p.iter().all(|p| proxy_requests(p).is_some()) && !rolling(&d))
                    .then_some(())
            },
        )
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
    let (out, planned) = plan_pending(&env, &spec("Audit"), &[&gw, &shop]);
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
    env.enforce_as_planned("p", &spec("Enforce"), &planned, &[&gw, &shop])
        .await;
    helm(
        &testplane::istio::helm(),
        &env.plane.kubeconfig,
        &["uninstall", "gw", "-n", &gw],
    );
}

/// `meshwarden plan` of the upgrades section's restarts, on the full cluster: four Deployments
/// whose proxies (the default injection's pod, moved to proxy 1.29.0, carried in their
/// templates) are two minors behind the default istiod; three in a namespace whose injection is
/// turned on once they run, one with injection off; a ValidatingAdmissionPolicy freezes `b`'s
/// pod template. `restartOutdated: true, maxConcurrentRestarts: 2`. The plan from a file names
/// the restart that starts now with the pods it rolls, `b`'s restart refused with the
/// policy's message, the third held for a restart slot, the fourth skipped (a restart would
/// give its pods no sidecar) and the waves; it writes nothing. Enforce's first pass then makes
/// exactly the planned writes: `a`'s pods are re-injected by istiod with its own proxy, and no
/// other pod is replaced. (Before the plan read the operator's caches, it planned no restart.)
#[tokio::test]
async fn plan_of_restarts_names_the_restarts_the_slot_and_the_skipped_as_enforce_does_them() {
    let _upgrades = UPGRADES_POLICY.lock().await;
    let env = common::cluster_env("plan-restarts").await;
    let id = env.id.clone();
    let ((key, value), injected) = upgrades_fixture(&env).await;
    let mine = (key, value.as_str());
    // Injection is turned on in `on` once its pods run the outdated proxy (istiod would
    // inject its own into them otherwise), as for pods that predate an upgrade.
    let on = env
        .namespace("on", &[mine, ("istio-injection", "disabled")])
        .await;
    let off = env
        .namespace("off", &[mine, ("istio-injection", "disabled")])
        .await;
    let outdated = |name: &str| outdated_deployment(&injected, name, "1.29.0");
    let (ons, offs) = (
        Api::<Deployment>::namespaced(env.client.clone(), &on),
        Api::<Deployment>::namespaced(env.client.clone(), &off),
    );
    for name in ["a", "b", "c"] {
        ons.create(&PostParams::default(), &outdated(name))
            .await
            .unwrap();
    }
    offs.create(&PostParams::default(), &outdated("d"))
        .await
        .unwrap();
    // Their pods run the template's proxy as it is: nothing injected them.
    let template = vec![("default".to_string(), String::new(), "1.29.0".to_string())];
    for (ns, app) in [(&on, "a"), (&on, "b"), (&on, "c"), (&off, "d")] {
        let what = format!("{ns}/{app} running proxy 1.29.0");
        let running = || injections(&env.client, ns, app);
        wait_equal(90, &what, running, template.clone()).await;
    }
    Api::<Namespace>::all(env.client.clone())
        .patch(
            &on,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio-injection": "enabled"}}})),
        )
        .await
        .unwrap();
    let pods_of = |ns: &str, app: &str| {
        let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
        let app = app.to_string();
        async move {
            let mut uids: Vec<String> = ready_pods(&pods, &app)
                .await
                .iter()
                .map(|p| p.uid().unwrap_or_default())
                .collect();
            uids.sort();
            uids
        }
    };
    let (b_pods, c_pods, d_pods) = (
        pods_of(&on, "b").await,
        pods_of(&on, "c").await,
        pods_of(&off, "d").await,
    );
    // A release freeze on `b`'s pod template, as an admission policy would hold it.
    common::freeze_deployments(
        &env.client,
        &on,
        "object.metadata.name != 'b' || object.spec.template == oldObject.spec.template",
        "b is frozen for the release",
        "b",
        json!({"spec": {"template": {"metadata": {"annotations": {"probe": "1"}}}}}),
    )
    .await;

    let spec = |mode: &str| {
        format!(
            "enforcement: {mode}\nupgrades:\n  restartOutdated: true\n  maxConcurrentRestarts: 2\n  namespaceSelector: {{matchLabels: {{meshwarden-upgrades: {id}}}}}\n"
        )
    };
    // A plan made while an istiod of the proxies' revision rolls out (another test's, in the
    // shared cluster) judges none of them, as Enforce would not, and one made within
    // `SETTLE_SECS` of a Deployment's rollout holds its restart: wait for one that sees every
    // outdated proxy and restarts as soon as a slot allows.
    let (probe, _probe) = env.policy_file("probe", &spec("Audit"));
    let kubeconfig = env.plane.operator_kubeconfig.clone();
    common::eventually_or_report(
        120,
        "a plan that sees the outdated proxies",
        || async {
            let (code, out, _) = common::run_plan(&kubeconfig, &["-f", &probe]);
            (code == 2 && out.contains("(1 now, 1 waiting for a slot)")).then_some(())
        },
        || async {
            let lp = ListParams::default().labels("app=istiod");
            for d in Api::<Deployment>::all(env.client.clone())
                .list(&lp)
                .await
                .unwrap()
            {
                eprintln!(
                    "istiod {}/{} rev {:?} serving {} status {:?}",
                    d.namespace().unwrap_or_default(),
                    d.name_any(),
                    d.labels().get("istio.io/rev"),
                    meshwarden::istio::serves_template(&d),
                    d.status
                );
            }
            eprintln!("{}", common::run_plan(&kubeconfig, &["-f", &probe]).1);
        },
    )
    .await;
    let (out, planned) = plan_pending(&env, &spec("Audit"), &[&on, &off]);
    common::assert_lists(
        &out,
        &[
            format!("~ Deployment {on}/a (updated; its pods roll: 1 pod)"),
            format!("! Deployment {on}/b (REFUSED by the API server)"),
            "b is frozen for the release".into(),
            format!("  Held Deployment/{on}/c (Upgrades)"),
            "waits for a restart slot (maxConcurrentRestarts 2".into(),
            format!("  Skipped Deployment/{off}/d (Upgrades)"),
            "a restart would give its pods no sidecar (injection disabled in the namespace)".into(),
            "Plan: 0 to create, 1 to update, 0 to delete, 1 refused".into(),
            "restarts run in 2 paced wave(s) of at most 2 (1 now, 1 waiting for a slot)".into(),
        ],
    );
    assert!(!out.contains(&format!("Deployment {on}/c (")), "{out}");
    assert_eq!(planned["restartWaves"]["waves"], 2, "{planned:#}");
    env.enforce_as_planned("p", &spec("Enforce"), &planned, &[&on, &off])
        .await;
    // What runs: `a` restarted with istiod's own proxy; nothing else is replaced.
    injected_by(&env.client, &on, "a", "default", "1.31-dev").await;
    assert_eq!(pods_of(&on, "b").await, b_pods, "b's restart was refused");
    assert_eq!(pods_of(&on, "c").await, c_pods, "c waits for a slot");
    assert_eq!(pods_of(&off, "d").await, d_pods, "d is never restarted");
    env.delete_policies().await;
}
