//! The upgrades section against two real istiod revisions: reported, and restarts paced.

use super::*;

/// The Deployments `apis` name, and how many of them roll because of meshwarden's restart.
async fn sample_restarts(apis: Vec<(Api<Deployment>, &str)>) -> (Vec<Deployment>, usize) {
    let mut all = Vec::new();
    for (a, n) in &apis {
        all.push(a.get(n).await.unwrap());
    }
    let rolling = all.iter().filter(|d| restart_rolling(d)).count();
    (all, rolling)
}

/// Whether a Deployment rolls because of meshwarden's restart: its current generation is the
/// one the restart produced.
fn restart_rolling(d: &Deployment) -> bool {
    let ours = d
        .annotations()
        .get("meshwarden.io/restart-generation")
        .and_then(|g| g.parse::<i64>().ok())
        == d.metadata.generation;
    ours && rolling(d)
}

/// Samples the Deployments until every one is at the generation meshwarden's restart produced
/// and none rolls; returns the most that rolled because of a restart at once.
async fn restarts_finish<F, Fut>(sample: &F) -> usize
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (Vec<Deployment>, usize)>,
{
    let (mut most, start) = (0, Instant::now());
    loop {
        let (all, n) = sample().await;
        most = most.max(n);
        let done = all.iter().all(|d| {
            d.annotations()
                .get("meshwarden.io/restart-generation")
                .and_then(|g| g.parse::<i64>().ok())
                == d.metadata.generation
        });
        if done && all.iter().all(|d| !rolling(d)) {
            return most;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the restarts did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The upgrades section with two istiod revisions really injecting (issue 14): the shared
/// cluster's default istiod (1.31-dev) and a second revision `canary` (`helm install
/// istiod-canary <istio-discovery> -n istio-system --set revision=canary`, image tag 1.33.1, a
/// revision tag through the chart's `revisionTags`) whose own `pilot-discovery` runs on the host
/// (`testplane::istio::start_revision`). Pods are injected by the canary through
/// `istio.io/rev=canary` and through the tag, by the default revision through
/// `istio-injection=enabled`; a namespace names a missing revision, one has both injection
/// labels, a tag points at a revision that does not run. `restartOutdated: true,
/// maxConcurrentRestarts: 1`. After every step the condition, the violations with their
/// actions, `status.upgrades` proxies, the counts and the metric are exact:
/// 0. Audit: no namespace selects the canary and no running proxy is its, but a pending pod
///    the canary injected keeps it in use (`RevisionKeptByIdlePods`).
/// 1. Audit: namespaces on the canary (directly and through the tag), every pod on its
///    revision, nothing outdated, nothing written. One canary workload, `a`, runs on one node
///    with a host port.
/// 2. Audit: a namespace moved from canary to `istio.io/rev=default` (its running pod keeps
///    its canary proxy).
/// 3. Enforce: nothing is outdated, nothing is written.
/// 4. `helm upgrade` of the canary to 1.35.0: the five canary workloads are two minors behind;
///    `a` (first in order) is restarted and its restart stalls (the surge pod cannot get the
///    host port; progress deadline 5 s): `RolloutStalled`, the four others held behind it,
///    none restarted.
/// 5. The owner drops the host port: `a`'s own rollout finishes (not restarted on top of it),
///    the four are restarted one at a time and re-injected for real by the revision their
///    namespace selects now (canary 1.35.0; default 1.31-dev for the moved namespace).
/// 6. Converged: no write over two more reconciles.
/// 7. The canary upgraded again (1.37.0): the workloads meshwarden restarted for 1.35.0 are
///    restarted again (the restart recorded the revision and version it aimed for), one at a
///    time, and re-injected with 1.37.0. 8. Converged: no write over two more reconciles.
/// 9. `helm rollback` of the canary: its proxies are newer than istiod, reported and never
///    restarted.
#[tokio::test]
async fn upgrades_with_two_real_revisions_report_and_restart_paced() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;

    let _upgrades = UPGRADES_POLICY.lock().await;

    let env = common::cluster_env("canary").await;
    let id = env.id.clone();
    let mine = ("meshwarden-upgrades", id.as_str());
    let tag = format!("{id}-prod");
    let started = Instant::now();
    let canary = testplane::istio::start_revision(
        &env.plane.dir,
        &env.plane.kubeconfig,
        "canary",
        &[
            format!("revisionTags={{{tag}}}"),
            "global.configValidation=false".into(),
            "global.tag=1.33.1".into(),
        ],
    )
    .await
    .unwrap();
    eprintln!("canary istiod serving after {:?}", started.elapsed());
    // A tag whose revision does not run.
    let old_tag = format!("{id}-old");
    let mwc: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": format!("istio-revision-tag-{old_tag}"),
                     "labels": {"istio.io/tag": old_tag, "istio.io/rev": format!("{id}-gone")}},
        "webhooks": [],
    }))
    .unwrap();
    Api::<MutatingWebhookConfiguration>::all(env.client.clone())
        .create(&PostParams::default(), &mwc)
        .await
        .unwrap();
    let web = env
        .namespace("web", &[mine, ("istio-injection", "enabled")])
        .await;
    // Labelled with their revision (or tag) once step 0 is checked.
    let can = env.namespace("canary", &[mine]).await;
    let tagged = env.namespace("tagged", &[mine]).await;
    let moved = env.namespace("move", &[mine]).await;
    let idle = env
        .namespace("idle", &[mine, ("istio.io/rev", "canary")])
        .await;
    let missing = env
        .namespace("missing", &[mine, ("istio.io/rev", "retired")])
        .await;
    let both = env
        .namespace(
            "both",
            &[
                mine,
                ("istio-injection", "enabled"),
                ("istio.io/rev", "canary"),
            ],
        )
        .await;
    // Moved to the canary in step 1; first in name order (its restart takes the first slot).
    let stall = env.namespace("a-stall", &[mine]).await;
    // A pod the canary really injects that never runs (no node matches); its namespace then
    // stops selecting the canary.
    let stuck: Pod = serde_json::from_value(json!({
        "metadata": {"name": "stuck", "labels": {"app": "stuck"}},
        "spec": {
            "nodeSelector": {"meshwarden.io/no-such-node": "x"},
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        },
    }))
    .unwrap();
    let stuck = Api::<Pod>::namespaced(env.client.clone(), &idle)
        .create(&PostParams::default(), &stuck)
        .await
        .unwrap();
    assert!(
        stuck.annotations()["sidecar.istio.io/status"].contains("\"revision\":\"canary\""),
        "{:?}",
        stuck.annotations()
    );
    let relabel = |ns: &str, labels: serde_json::Value| {
        let (namespaces, ns) = (Api::<Namespace>::all(env.client.clone()), ns.to_string());
        async move {
            namespaces
                .patch(
                    &ns,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": labels}})),
                )
                .await
                .unwrap();
        }
    };
    relabel(
        &idle,
        json!({"istio.io/rev": null, "istio-injection": "disabled"}),
    )
    .await;
    let api = |ns: &str| Api::<Deployment>::namespaced(env.client.clone(), ns);
    let create = |ns: &str, d: serde_json::Value| {
        let api = api(ns);
        async move {
            api.create(&PostParams::default(), &serde_json::from_value(d).unwrap())
                .await
                .unwrap();
        }
    };
    create(&web, deployment("web", 1, json!({}))).await;
    injected_by(&env.client, &web, "web", "default", "1.31-dev").await;

    let spec = |mode: &str| {
        format!(
            "enforcement: {mode}\nupgrades:\n  restartOutdated: true\n  maxConcurrentRestarts: 1\n  namespaceSelector: {{matchLabels: {{meshwarden-upgrades: {id}}}}}\n"
        )
    };
    env.create_policy("canary", &spec("Audit")).await;
    let op = env.start_operator().await;
    let policy = env.policy_name("canary");
    let mine_ns = [&web, &can, &tagged, &moved, &idle, &missing, &both, &stall];
    let writes = |env: &common::Env| mine_ns.iter().map(|ns| writes_in(env, ns)).sum::<usize>();
    // Waits until the section reports exactly `objects` (object, action) with `reason`, the
    // running proxies `proxies` (revision, version, pods) and `compliant` of them; then checks
    // the settled status and the metric. Returns the policy.
    let report = |step: &'static str,
                  reason: &'static str,
                  objects: Vec<(String, &'static str)>,
                  proxies: Vec<(&'static str, &'static str, i32)>,
                  compliant: i32| {
        let (env, op, policy) = (&env, &op, &policy);
        let always = [
            (format!("Namespace/{missing}"), "Reported"),
            (format!("Namespace/{both}"), "Reported"),
            (format!("RevisionTag/{old_tag}"), "Reported"),
        ];
        // Revision tags are mesh-wide: another test's may be listed too.
        let own_tag = format!("RevisionTag/{old_tag}");
        async move {
            let mut want: Vec<(String, String)> = objects
                .into_iter()
                .chain(always)
                .map(|(o, a)| (o, a.to_string()))
                .collect();
            want.sort();
            let counts: Vec<(String, String, i32)> = proxies
                .iter()
                .map(|(r, v, n)| (r.to_string(), v.to_string(), *n))
                .collect();
            let targets: i32 = proxies.iter().map(|p| p.2).sum();
            let seen = |p: &MeshPolicy| {
                let c = common::condition(p, "Upgrades")?;
                let st = p.status.as_ref()?;
                let mut found: Vec<(String, String)> = st
                    .violations
                    .iter()
                    .filter(|v| !v.object.starts_with("RevisionTag/") || v.object == own_tag)
                    .map(|v| (v.object.clone(), v.action.as_str().to_string()))
                    .collect();
                found.sort();
                let got: Vec<(String, String, i32)> = st
                    .upgrades
                    .as_ref()?
                    .proxies
                    .iter()
                    .map(|c| (c.revision.clone(), c.version.clone(), c.pods))
                    .collect();
                (c.reason == reason
                    && found == want
                    && got == counts
                    && (st.targets, st.compliant) == (targets, compliant))
                    .then_some(())
            };
            env.wait_policy("canary", 90, seen).await;
            let p = env.wait_converged("canary", 60).await;
            assert!(seen(&p).is_some(), "{step}: {:#?}", p.status);
            let c = common::condition(&p, "Upgrades").unwrap();
            assert_eq!(c.status, "False", "{step}: {c:?}");
            let prefix = format!("meshwarden_proxies{{policy=\"{policy}\",");
            let text = op.state.ctx.metrics.encode();
            let mut lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
            lines.sort();
            let expected: Vec<String> = proxies
                .iter()
                .map(|(r, v, n)| format!("{prefix}revision=\"{r}\",version=\"{v}\"}} {n}"))
                .collect();
            assert_eq!(lines, expected, "{step}: the metric");
            eprintln!("{step}: checked after {:?}", started.elapsed());
            p
        }
    };

    // 0. Audit: the canary runs, no namespace selects it and no running proxy is its: only
    // the pending pod keeps it in use.
    let p = report(
        "canary kept by a pending pod",
        "UnknownRevision",
        vec![("Revision/canary".into(), "Reported")],
        vec![("default", "1.31-dev", 1)],
        1,
    )
    .await;
    let v = &p.status.as_ref().unwrap().violations;
    let kept = v.iter().find(|v| v.object == "Revision/canary").unwrap();
    assert!(kept.message.contains(&format!("{idle}/stuck")), "{kept:?}");

    // 1. Audit: namespaces on the canary, directly and through the tag; pods on both
    // revisions, nothing outdated.
    relabel(&can, json!({"istio.io/rev": "canary"})).await;
    relabel(&moved, json!({"istio.io/rev": "canary"})).await;
    relabel(&tagged, json!({"istio.io/rev": tag})).await;
    relabel(&stall, json!({"istio.io/rev": "canary"})).await;
    let canaries = [(&can, "c1"), (&can, "c2"), (&tagged, "t1"), (&moved, "m1")];
    for (ns, name) in canaries {
        create(ns, deployment(name, 1, json!({}))).await;
    }
    // a: one replica on one node with a host port, so that the surge pod of a restart can
    // never start (progress deadline 5 s).
    let node = Api::<Node>::all(env.client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items[1]
        .name_any();
    let mut a = deployment("a", 1, json!({}));
    a["spec"]["progressDeadlineSeconds"] = json!(5);
    a["spec"]["template"]["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    a["spec"]["template"]["spec"]["containers"][0]["ports"] =
        json!([{"containerPort": 8080, "hostPort": 18081}]);
    create(&stall, a).await;
    for (ns, name) in canaries.iter().chain([&(&stall, "a")]) {
        injected_by(&env.client, ns, name, "canary", "1.33.1").await;
    }
    let a_id = format!("Deployment/{stall}/a");
    let p = report(
        "pods on both revisions",
        "UnknownRevision",
        vec![],
        vec![("canary", "1.33.1", 5), ("default", "1.31-dev", 1)],
        6,
    )
    .await;
    let st = p.status.as_ref().unwrap().upgrades.clone().unwrap();
    let revs: Vec<(String, String)> = st
        .revisions
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    assert!(
        revs.contains(&("canary".into(), "1.33.1".into())),
        "{revs:?}"
    );
    assert!(
        revs.contains(&("default".into(), "1.31-dev".into())),
        "{revs:?}"
    );
    let tags: Vec<(String, String)> = st
        .tags
        .iter()
        .map(|t| (t.name.clone(), t.revision.clone()))
        .collect();
    assert!(tags.contains(&(tag.clone(), "canary".into())), "{tags:?}");
    assert!(
        tags.contains(&(old_tag.clone(), format!("{id}-gone"))),
        "{tags:?}"
    );

    // 2. Audit: `move` now selects the default revision.
    relabel(&moved, json!({"istio.io/rev": "default"})).await;
    // The running proxies from step 2 until the canary's workloads are restarted.
    let before_upgrade = || vec![("canary", "1.33.1", 5), ("default", "1.31-dev", 1)];
    report(
        "namespace moved",
        "UnknownRevision",
        vec![],
        before_upgrade(),
        6,
    )
    .await;
    // Relabelling a namespace re-injects nothing that runs.
    injected_by(&env.client, &moved, "m1", "canary", "1.33.1").await;
    assert_eq!(writes(&env), 0, "Audit writes nothing");

    // 3. Enforce: nothing is outdated, nothing is written.
    set_spec(&env, "canary", &spec("Enforce")).await;
    report(
        "Enforce, nothing outdated",
        "UnknownRevision",
        vec![],
        before_upgrade(),
        6,
    )
    .await;
    assert_eq!(writes(&env), 0, "nothing to restart");

    // 4. The canary upgraded to 1.35.0 by Helm: its four workloads are two minors behind and
    // held behind the stalled restart.
    let chart = testplane::istio::chart("istiod").display().to_string();
    let kc = env.plane.kubeconfig.clone();
    let upgrade_canary = |version: &str| {
        helm(
            &testplane::istio::helm(),
            &kc,
            &[
                "upgrade",
                &canary.release,
                &chart,
                "-n",
                "istio-system",
                "--reuse-values",
                "--set",
                &format!("global.tag={version}"),
            ],
        );
    };
    upgrade_canary("1.35.0");
    let ids: Vec<String> = canaries
        .iter()
        .map(|(ns, n)| format!("Deployment/{ns}/{n}"))
        .collect();
    let with = |action: &'static str| -> Vec<(String, &'static str)> {
        ids.iter().map(|i| (i.clone(), action)).collect()
    };
    let mut held = with("Held");
    held.push((a_id.clone(), "Reported"));
    report(
        "canary upgraded: a restarted and stalled, the others held behind it",
        "RolloutStalled",
        held,
        before_upgrade(),
        1,
    )
    .await;
    let only_stall = writes_in(&env, &stall);
    assert!(only_stall >= 1, "a restarted");
    assert_eq!(writes(&env), only_stall, "only a was written");
    let four = || sample_restarts(canaries.iter().map(|(ns, n)| (api(ns), *n)).collect());
    let held_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < held_until {
        let (all, _) = four().await;
        for d in &all {
            assert!(
                !d.annotations()
                    .contains_key("meshwarden.io/restart-generation"),
                "{} restarted while a is stalled",
                d.name_any()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        writes(&env),
        only_stall,
        "nothing restarted while a is stalled"
    );

    // 5. The owner drops a's host port: its rollout finishes (re-injected by the canary, now
    // 1.35.0), and the four restart one at a time, re-injected by the revision their namespace
    // selects now.
    api(&stall)
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([
                    {"op": "remove", "path": "/spec/template/spec/containers/0/ports"},
                ]))
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    let most = restarts_finish(&four).await;
    assert_eq!(
        most, 1,
        "restarts rolling at once (maxConcurrentRestarts 1)"
    );
    for (ns, name) in canaries {
        let (rev, version) = if ns == &moved {
            ("default", "1.31-dev")
        } else {
            ("canary", "1.35.0")
        };
        injected_by(&env.client, ns, name, rev, version).await;
    }
    injected_by(&env.client, &stall, "a", "canary", "1.35.0").await;
    report(
        "restarted and re-injected",
        "UnknownRevision",
        vec![],
        vec![("canary", "1.35.0", 4), ("default", "1.31-dev", 2)],
        6,
    )
    .await;

    // 6. Converged: no write over two more reconciles.
    let before = writes(&env);
    two_more_reconciles(&env, &op.state, &web).await;
    assert_eq!(writes(&env), before, "a converged mesh costs no write");

    // 7. The canary upgraded again: the workloads meshwarden restarted for canary@1.35.0 are
    // restarted again for canary@1.37.0 (their restart recorded its target), and a, changed
    // by its owner since; one at a time, re-injected for real.
    upgrade_canary("1.37.0");
    let again = || {
        let apis = canaries
            .iter()
            .filter(|(ns, _)| *ns != &moved)
            .map(|(ns, n)| (api(ns), *n))
            .chain([(api(&stall), "a")])
            .collect();
        sample_restarts(apis)
    };
    // Until each was restarted for 1.37.0 and rolled out: the most rolling at once.
    let (mut most, start) = (0, Instant::now());
    loop {
        let (all, n) = again().await;
        most = most.max(n);
        let done = all.iter().all(|d| {
            d.annotations()
                .get("meshwarden.io/restart-target")
                .map(String::as_str)
                == Some("canary@1.37.0")
                && !rolling(d)
        });
        if done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the restarts for 1.37.0 did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        most, 1,
        "restarts rolling at once (maxConcurrentRestarts 1)"
    );
    for (ns, name) in canaries
        .iter()
        .filter(|(ns, _)| *ns != &moved)
        .chain([&(&stall, "a")])
    {
        injected_by(&env.client, ns, name, "canary", "1.37.0").await;
    }
    report(
        "upgraded again: restarted again",
        "UnknownRevision",
        vec![],
        vec![("canary", "1.37.0", 4), ("default", "1.31-dev", 2)],
        6,
    )
    .await;
    let targets: Vec<String> = again()
        .await
        .0
        .iter()
        .map(|d| d.annotations()["meshwarden.io/restart-target"].clone())
        .collect();
    assert_eq!(targets, vec!["canary@1.37.0".to_string(); 4]);
    // 8. Converged again: no write over two more reconciles.
    let before = writes(&env);
    two_more_reconciles(&env, &op.state, &web).await;
    assert_eq!(writes(&env), before, "a converged mesh costs no write");

    // 9. `helm rollback` of the canary (to 1.35.0), as in an incident: every canary proxy is
    // newer than its istiod; reported, never restarted.
    helm(
        &testplane::istio::helm(),
        &kc,
        &["rollback", &canary.release, "-n", "istio-system"],
    );
    let mut newer = with("Reported");
    newer.retain(|(i, _)| !i.contains(&format!("/{moved}/")));
    newer.push((a_id.clone(), "Reported"));
    let p = report(
        "istiod rolled back: newer proxies reported",
        "UnknownRevision",
        newer,
        vec![("canary", "1.37.0", 4), ("default", "1.31-dev", 2)],
        2,
    )
    .await;
    let v = p
        .status
        .as_ref()
        .unwrap()
        .violations
        .iter()
        .find(|v| v.object == a_id)
        .unwrap();
    assert!(
        v.message.contains("newer than istiod canary (1.35.0)"),
        "{v:?}"
    );
    two_more_reconciles(&env, &op.state, &web).await;
    assert_eq!(
        writes(&env),
        before,
        "nothing restarted after a rollback of istiod"
    );

    op.stop().await;
    Api::<MutatingWebhookConfiguration>::all(env.client.clone())
        .delete(
            &format!("istio-revision-tag-{old_tag}"),
            &Default::default(),
        )
        .await
        .unwrap();
    canary.stop().unwrap();
    env.delete_policies().await;
    eprintln!("done after {:?}", started.elapsed());
}
