//! The upgrades section never restarts a workload into no injected proxy.

use super::*;

/// `restartOutdated` never restarts into no injected proxy: four Deployments whose proxies (the
/// default injection's pod, moved to proxy 1.29.0, carried in their templates) are two minor
/// versions behind the default istiod, in namespaces with injection disabled, so no injector
/// would give their new pods a current proxy. Audit reports them; Enforce skips them with that
/// reason and writes nothing, over two more reconciles too; the pods are never replaced. (On
/// the code before the rollout gate, Enforce restarted all four, and their new pods came up
/// with the same outdated proxy.)
#[tokio::test]
async fn upgrades_never_restarts_where_no_injector_gives_a_current_proxy() {
    let _upgrades = UPGRADES_POLICY.lock().await;
    let env = common::cluster_env("restarts").await;
    let id = env.id.clone();
    let ((key, value), injected) = upgrades_fixture(&env).await;
    let mine = (key, value.as_str());
    let first = env
        .namespace("a-stall", &[mine, ("istio-injection", "disabled")])
        .await;
    let rest = env
        .namespace("b-rest", &[mine, ("istio-injection", "disabled")])
        .await;
    let outdated = |name: &str| outdated_deployment(&injected, name, "1.29.0");
    let firsts: Api<Deployment> = Api::namespaced(env.client.clone(), &first);
    let rests: Api<Deployment> = Api::namespaced(env.client.clone(), &rest);
    firsts
        .create(&PostParams::default(), &outdated("a"))
        .await
        .unwrap();
    for name in ["b", "c", "d"] {
        rests
            .create(&PostParams::default(), &outdated(name))
            .await
            .unwrap();
    }
    let sample = || {
        let (firsts, rests) = (firsts.clone(), rests.clone());
        async move {
            let mut all = firsts.list(&ListParams::default()).await.unwrap().items;
            all.extend(rests.list(&ListParams::default()).await.unwrap().items);
            all
        }
    };
    common::eventually(90, "four available outdated Deployments", || async {
        let all = sample().await;
        (all.len() == 4 && all.iter().all(|d| !rolling(d))).then_some(())
    })
    .await;
    // The pods running now: none may be replaced.
    let pod_names = || {
        let client = env.client.clone();
        let (first, rest) = (first.clone(), rest.clone());
        async move {
            let mut names = Vec::new();
            for ns in [first, rest] {
                let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
                for p in pods.list(&ListParams::default()).await.unwrap().items {
                    names.push(format!("{ns}/{}", p.name_any()));
                }
            }
            names.sort();
            names
        }
    };
    let running = pod_names().await;
    assert_eq!(running.len(), 4, "{running:?}");
    let selector = format!("namespaceSelector: {{matchLabels: {{meshwarden-upgrades: {id}}}}}");
    let spec = |mode: &str| {
        format!(
            "enforcement: {mode}\nupgrades:\n  restartOutdated: true\n  maxConcurrentRestarts: 2\n  {selector}\n"
        )
    };
    env.create_policy("restarts", &spec("Audit")).await;
    let op = env.start_operator().await;
    let writes = |env: &common::Env| writes_in(env, &first) + writes_in(env, &rest);
    let policy_api: Api<MeshPolicy> = Api::all(env.client.clone());
    let policy = env.policy_name("restarts");
    let violations = || {
        let api = policy_api.clone();
        let policy = policy.clone();
        async move {
            let p = api.get(&policy).await.unwrap();
            let mut v: Vec<(String, String, String)> = p
                .status
                .unwrap_or_default()
                .violations
                .into_iter()
                // Revision tags are mesh-wide: another test's may be listed too.
                .filter(|v| v.object.starts_with("Deployment/"))
                .map(|v| (v.object, v.action.as_str().to_string(), v.message))
                .collect();
            v.sort();
            v
        }
    };
    let ids: Vec<String> = [(&first, "a"), (&rest, "b"), (&rest, "c"), (&rest, "d")]
        .iter()
        .map(|(ns, n)| format!("Deployment/{ns}/{n}"))
        .collect();
    let actions = || async {
        violations()
            .await
            .into_iter()
            .map(|(o, a, _)| (o, a))
            .collect::<Vec<_>>()
    };
    let all_with = |action: &str| -> Vec<(String, String)> {
        ids.iter()
            .map(|i| (i.clone(), action.to_string()))
            .collect()
    };

    // 1. Audit: every outdated workload reported, nothing written.
    wait_for_actions(&actions, all_with("Reported"), "Audit").await;
    for (o, _, m) in violations().await {
        assert!(
            m.contains("1.29.0, 2 minor version(s) behind istiod default"),
            "{o}: {m}"
        );
    }
    assert_eq!(writes(&env), 0, "Audit writes nothing");

    // 2. Enforce: each skipped with the reason, nothing written, no pod replaced, also over
    // two more reconciles.
    set_spec(&env, "restarts", &spec("Enforce")).await;
    wait_for_actions(&actions, all_with("Skipped"), "Enforce").await;
    for (o, _, m) in violations().await {
        assert!(
            m.contains(
                "a restart would give its pods no sidecar (injection disabled in the namespace)"
            ),
            "{o}: {m}"
        );
    }
    two_more_reconciles(&env, &op.state, &first).await;
    assert_eq!(writes(&env), 0, "nothing restarted");
    assert_eq!(pod_names().await, running, "no pod replaced");
    for d in sample().await {
        assert!(
            !d.annotations()
                .contains_key("meshwarden.io/restart-generation"),
            "{} restarted",
            d.name_any()
        );
    }
    op.stop().await;
    env.delete_policies().await;
}
