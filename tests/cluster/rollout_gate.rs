//! The rollout gate on the full cluster: every rollout meshwarden starts (a sidecar write, an
//! upgrades restart) asks first whether the new pods get the intended proxy and whether the
//! workload can lose pods, and a workload is rolled once per change even when both sections
//! want it. Injection is real (a second istiod revision, `gate`, upgraded by Helm), rollouts
//! are real (the workload controllers), budgets are computed by the disruption controller.

use super::*;
use k8s_openapi::api::apps::v1::{ReplicaSet, StatefulSet};

/// A StatefulSet of `replicas` pods labelled `app: <name>`, with `strategy` as its
/// `updateStrategy`.
fn statefulset(name: &str, replicas: i32, strategy: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "updateStrategy": strategy,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
            },
        },
    })
}

/// Waits until the `n` ready pods of `app` were all injected by `revision` with proxy `tag`.
async fn injected_all(client: &Client, ns: &str, app: &str, n: usize, revision: &str, tag: &str) {
    let one = (revision.to_string(), revision.to_string(), tag.to_string());
    let what = format!("{ns}/{app}: {n} pods injected by {revision} with {tag}");
    wait_equal(90, &what, || injections(client, ns, app), vec![one; n]).await;
}

/// ReplicaSets of Deployment `app` (one per template it ever rolled out).
async fn replica_sets(client: &Client, ns: &str, app: &str) -> usize {
    Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap()
        .items
        .len()
}

/// What rolled Deployment `app` (for a failure's message): each ReplicaSet with its creation
/// time, revision and the template annotations meshwarden or a restart set, and each write of
/// the operator to the Deployment (time, verb, field manager).
async fn rollouts_of(env: &common::Env, ns: &str, app: &str) -> String {
    let mut sets = Api::<ReplicaSet>::namespaced(env.client.clone(), ns)
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    sets.sort_by_key(|r| r.metadata.creation_timestamp.clone());
    let mut out = Vec::new();
    for r in &sets {
        let revision = r
            .annotations()
            .get("deployment.kubernetes.io/revision")
            .cloned()
            .unwrap_or_default();
        let marks: std::collections::BTreeMap<String, String> = r
            .spec
            .as_ref()
            .and_then(|s| s.template.as_ref())
            .and_then(|t| t.metadata.as_ref())
            .and_then(|m| m.annotations.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| {
                k.contains("sidecar.istio.io")
                    || k.contains("restartedAt")
                    || k.contains("meshwarden")
            })
            .collect();
        out.push(format!(
            "ReplicaSet {} created {:?} revision {revision}: {marks:?}",
            r.name_any(),
            r.metadata.creation_timestamp.as_ref().map(|t| t.0)
        ));
    }
    for e in env.plane.audit_events() {
        let o = &e["objectRef"];
        if e["user"]["username"] == "meshwarden-operator"
            && e["stage"] == "ResponseComplete"
            && o["resource"] == "deployments"
            && o["namespace"] == ns
            && o["name"] == app
            && e["verb"] != "get"
            && e["verb"] != "list"
            && e["verb"] != "watch"
        {
            out.push(format!(
                "operator {} at {} ({})",
                e["verb"], e["stageTimestamp"], e["requestURI"]
            ));
        }
    }
    out.join("\n")
}

/// (uid) of every pod of `app`: a StatefulSet or a held Deployment keeps its pods.
async fn pod_uids(client: &Client, ns: &str, app: &str) -> Vec<String> {
    let mut uids: Vec<String> = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.uid)
        .collect();
    uids.sort();
    uids
}

/// What runs, sampled every 100 ms in the background: the fewest ready pods seen per app, and
/// every pod seen without an `istio-proxy` container.
struct Outcomes {
    fewest: Arc<std::sync::Mutex<std::collections::BTreeMap<String, usize>>>,
    bare: Arc<std::sync::Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Outcomes {
    fn start(client: Client, ns: String, apps: Vec<&'static str>) -> Outcomes {
        let fewest: Arc<std::sync::Mutex<std::collections::BTreeMap<String, usize>>> =
            Default::default();
        let bare: Arc<std::sync::Mutex<BTreeSet<String>>> = Default::default();
        let (f, b) = (fewest.clone(), bare.clone());
        let task = tokio::spawn(async move {
            let pods: Api<Pod> = Api::namespaced(client, &ns);
            loop {
                for app in &apps {
                    let n = ready_pods(&pods, app).await.len();
                    let mut f = f.lock().unwrap();
                    let e = f.entry(app.to_string()).or_insert(n);
                    *e = (*e).min(n);
                }
                if let Ok(list) = pods.list(&ListParams::default()).await {
                    for p in list.items {
                        let spec = p.spec.clone().unwrap_or_default();
                        let proxy = spec
                            .containers
                            .iter()
                            .chain(spec.init_containers.iter().flatten())
                            .any(|c| c.name == "istio-proxy");
                        if !proxy {
                            b.lock().unwrap().insert(p.name_any());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Outcomes { fewest, bare, task }
    }

    /// Asserts that no pod ran without a proxy and each app kept at least its floor
    /// (`floors`: app, fewest ready pods allowed) since the last check; starts a new window.
    fn check(&self, step: &str, floors: &[(&str, usize)]) {
        let bare = std::mem::take(&mut *self.bare.lock().unwrap());
        assert!(
            bare.is_empty(),
            "{step}: pods without istio-proxy: {bare:?}"
        );
        let mut fewest = self.fewest.lock().unwrap();
        for (app, floor) in floors {
            let seen = fewest.get(*app).copied().unwrap_or(0);
            assert!(
                seen >= *floor,
                "{step}: {app} went down to {seen} ready pod(s), below {floor}"
            );
        }
        fewest.clear();
    }
}

impl Drop for Outcomes {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The gate through a policy's life, with both sections wanting the same workloads:
/// 1. Audit after `helm upgrade` of the revision (1.33.1 to 1.35.0): every workload reported
///    by both sections, nothing written.
/// 2. Enforce: the sidecars section rolls the workloads that can lose a pod, once each; the
///    upgrades section restarts none of them on top (their new pods get the current proxy).
///    Held by both, with the reason: a `Recreate` Deployment, a 1-replica StatefulSet, a
///    Deployment whose PDB allows no disruption. Skipped: an `OnDelete` StatefulSet (both
///    sections), a template pinning its proxy image and a namespace selecting a revision that
///    is gone (upgrades). No pod ever runs without a proxy, none of the held ones loses one.
/// 3. The owner opts the Recreate Deployment in (`meshwarden.io/rollout: AllowDisruption`):
///    rolled once. 4. The PDB relaxed: rolled once. 4b. A `helm upgrade` of the revision whose
///    new istiod never starts: nothing judged against the version that does not serve, nothing
///    restarted; rolled back. 5. Audit, 6. delete: nothing written. 7. The revision removed
///    (`helm uninstall`) while namespaces still select it, one through a tag left behind: no
///    restart into no sidecar. Throughout, a workload whose owner's rollout is in progress
///    (2) is not restarted on top; it finishes with the current proxy (2b).
#[tokio::test]
async fn rollouts_meshwarden_starts_never_cost_availability() {
    let _upgrades = UPGRADES_POLICY.lock().await;
    let env = common::cluster_env("gate").await;
    let id = env.id.clone();
    let started = Instant::now();
    let gate = testplane::istio::start_revision(
        &env.plane.dir,
        &env.plane.kubeconfig,
        "gate",
        &[
            "global.configValidation=false".into(),
            "global.tag=1.33.1".into(),
        ],
    )
    .await
    .unwrap();
    let both = [
        ("meshwarden-gate", id.as_str()),
        ("meshwarden-gate-up", id.as_str()),
        ("istio.io/rev", "gate"),
    ];
    let apps = env.namespace("apps", &both).await;
    let lost = env
        .namespace(
            "lost",
            &[
                ("meshwarden-gate-up", id.as_str()),
                ("istio.io/rev", "gate"),
            ],
        )
        .await;
    // A workload whose owner's rollout is in progress when the policy is enforced.
    let busy = env
        .namespace(
            "busy",
            &[
                ("meshwarden-gate-up", id.as_str()),
                ("istio.io/rev", "gate"),
            ],
        )
        .await;
    let create = |ns: &str, o: serde_json::Value| {
        let (client, ns) = (env.client.clone(), ns.to_string());
        async move {
            let kind = o["kind"].as_str().unwrap().to_string();
            match kind.as_str() {
                "Deployment" => {
                    Api::<Deployment>::namespaced(client, &ns)
                        .create(&PostParams::default(), &serde_json::from_value(o).unwrap())
                        .await
                        .unwrap();
                }
                "StatefulSet" => {
                    Api::<StatefulSet>::namespaced(client, &ns)
                        .create(&PostParams::default(), &serde_json::from_value(o).unwrap())
                        .await
                        .unwrap();
                }
                _ => {
                    Api::<PodDisruptionBudget>::namespaced(client, &ns)
                        .create(&PostParams::default(), &serde_json::from_value(o).unwrap())
                        .await
                        .unwrap();
                }
            }
        }
    };
    let mut recreate = deployment("recreate", 3, json!({}));
    recreate["spec"]["strategy"] = json!({"type": "Recreate"});
    let mut allowed = deployment("allowed", 2, json!({}));
    allowed["spec"]["strategy"] = json!({"type": "Recreate"});
    allowed["metadata"]["annotations"] = json!({"meshwarden.io/rollout": "AllowDisruption"});
    let pinned = deployment(
        "pinned",
        1,
        json!({"sidecar.istio.io/proxyImage": "docker.io/istio/proxyv2:1.33.1"}),
    );
    create(&apps, recreate).await;
    create(&apps, allowed).await;
    create(&apps, pinned).await;
    create(&apps, deployment("rolling", 2, json!({}))).await;
    create(&apps, deployment("guarded", 2, json!({}))).await;
    create(
        &apps,
        json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
               "metadata": {"name": "guarded"},
               "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "guarded"}}}}),
    )
    .await;
    create(
        &apps,
        statefulset("solo", 1, json!({"type": "RollingUpdate"})),
    )
    .await;
    create(
        &apps,
        statefulset("ondelete", 2, json!({"type": "OnDelete"})),
    )
    .await;
    create(&lost, deployment("orphan", 1, json!({}))).await;
    create(&busy, deployment("busy", 2, json!({}))).await;
    for (app, n) in [
        ("recreate", 3),
        ("allowed", 2),
        ("pinned", 1),
        ("rolling", 2),
        ("guarded", 2),
        ("solo", 1),
        ("ondelete", 2),
    ] {
        injected_all(&env.client, &apps, app, n, "gate", "1.33.1").await;
    }
    injected_all(&env.client, &lost, "orphan", 1, "gate", "1.33.1").await;
    injected_all(&env.client, &busy, "busy", 2, "gate", "1.33.1").await;
    eprintln!("workloads injected after {:?}", started.elapsed());
    // `lost` now names a revision that is gone; then the revision is upgraded by Helm.
    Api::<Namespace>::all(env.client.clone())
        .patch(
            &lost,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio.io/rev": "retired"}}})),
        )
        .await
        .unwrap();
    let chart = testplane::istio::chart("istiod").display().to_string();
    helm(
        &testplane::istio::helm(),
        &env.plane.kubeconfig,
        &[
            "upgrade",
            &gate.release,
            &chart,
            "-n",
            "istio-system",
            "--reuse-values",
            "--set",
            "global.tag=1.35.0",
        ],
    );
    let held_pods = [
        ("solo", pod_uids(&env.client, &apps, "solo").await),
        ("ondelete", pod_uids(&env.client, &apps, "ondelete").await),
        ("recreate", pod_uids(&env.client, &apps, "recreate").await),
        ("guarded", pod_uids(&env.client, &apps, "guarded").await),
    ];
    let orphan_pods = pod_uids(&env.client, &lost, "orphan").await;
    // The owner restarts busy with a change that cannot finish (its surge pod fits no node):
    // its own rollout stays in progress.
    let busy_api: Api<Deployment> = Api::namespaced(env.client.clone(), &busy);
    busy_api
        .patch(
            "busy",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"template": {
                "metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-07T00:00:00Z"}},
                "spec": {"nodeSelector": {"meshwarden.io/no-such-node": "x"}},
            }}})),
        )
        .await
        .unwrap();
    let outcomes = Outcomes::start(
        env.client.clone(),
        apps.clone(),
        vec![
            "recreate", "solo", "guarded", "ondelete", "rolling", "pinned",
        ],
    );
    let floors = [
        ("recreate", 3),
        ("solo", 1),
        ("guarded", 2),
        ("ondelete", 2),
        ("rolling", 2),
    ];

    let spec = |mode: &str| {
        format!(
            "enforcement: {mode}
sidecars:
  namespaceSelector: {{matchLabels: {{meshwarden-gate: {id}}}}}
  resources: {{requests: {{cpu: 50m, memory: 64Mi}}, limits: {{cpu: 500m, memory: 256Mi}}}}
  maxConcurrentRollouts: 10
upgrades:
  restartOutdated: true
  maxConcurrentRestarts: 10
  namespaceSelector: {{matchLabels: {{meshwarden-gate-up: {id}}}}}
"
        )
    };
    env.create_policy("gate", &spec("Audit")).await;
    let op = env.start_operator().await;
    let writes =
        |env: &common::Env| writes_in(env, &apps) + writes_in(env, &lost) + writes_in(env, &busy);
    let policy_api: Api<MeshPolicy> = Api::all(env.client.clone());
    let policy = env.policy_name("gate");
    // (condition type, object, action) of this test's workloads and namespaces, sorted.
    let violations = || {
        let (api, policy, apps, lost, busy) = (
            policy_api.clone(),
            policy.clone(),
            apps.clone(),
            lost.clone(),
            busy.clone(),
        );
        async move {
            let p = api.get(&policy).await.unwrap();
            let mut v: Vec<(String, String, String, String)> = p
                .status
                .unwrap_or_default()
                .violations
                .into_iter()
                // Revisions and tags are mesh-wide: other tests' may be listed too.
                .filter(|v| [&apps, &lost, &busy].iter().any(|n| v.object.contains(*n)))
                .map(|v| (v.rule, v.object, v.action.as_str().to_string(), v.message))
                .collect();
            v.sort();
            v
        }
    };
    let actions = || async {
        violations()
            .await
            .into_iter()
            .map(|(r, o, a, _)| (r, o, a))
            .collect::<Vec<_>>()
    };
    let expect = |rows: &[(&str, &str, &str, &str)]| {
        let mut v: Vec<(String, String, String)> = rows
            .iter()
            .map(|(rule, kind, name, action)| {
                let ns = match *name {
                    "orphan" => &lost,
                    "busy" => &busy,
                    _ => &apps,
                };
                let object = match *kind {
                    "Namespace" => format!("Namespace/{lost}"),
                    k => format!("{k}/{ns}/{name}"),
                };
                (rule.to_string(), object, action.to_string())
            })
            .collect();
        v.sort();
        v
    };
    let (s, u) = ("SidecarResources", "Upgrades");
    let (dep, sts) = ("Deployment", "StatefulSet");

    // 1. Audit: everything reported by both sections, nothing written.
    let mut audit = Vec::new();
    for (kind, name) in [
        (dep, "recreate"),
        (dep, "allowed"),
        (dep, "pinned"),
        (dep, "rolling"),
        (dep, "guarded"),
        (sts, "solo"),
        (sts, "ondelete"),
    ] {
        audit.push((s, kind, name, "Reported"));
        audit.push((u, kind, name, "Reported"));
    }
    audit.push((u, dep, "orphan", "Reported"));
    audit.push((u, dep, "busy", "Reported"));
    audit.push((u, "Namespace", "lost", "Reported"));
    wait_equal(120, "1. Audit", actions, expect(&audit)).await;
    assert_eq!(writes(&env), 0, "Audit writes nothing");
    outcomes.check("1. Audit", &floors);
    eprintln!("1. checked after {:?}", started.elapsed());

    // 2. Enforce.
    set_spec(&env, "gate", &spec("Enforce")).await;
    let enforced = expect(&[
        (s, dep, "recreate", "Held"),
        (u, dep, "recreate", "Held"),
        (s, dep, "guarded", "Held"),
        (u, dep, "guarded", "Held"),
        (s, sts, "solo", "Held"),
        (u, sts, "solo", "Held"),
        (s, sts, "ondelete", "Skipped"),
        (u, sts, "ondelete", "Skipped"),
        (u, dep, "pinned", "Skipped"),
        (u, dep, "orphan", "Skipped"),
        (u, dep, "busy", "Held"),
        (u, "Namespace", "lost", "Reported"),
    ]);
    wait_equal(180, "2. Enforce", actions, enforced.clone()).await;
    for (app, n) in [("rolling", 2), ("allowed", 2)] {
        injected_all(&env.client, &apps, app, n, "gate", "1.35.0").await;
    }
    injected_all(&env.client, &apps, "pinned", 1, "gate", "1.33.1").await;
    let by_reason: Vec<(String, String, String, String)> = violations().await;
    let message = |rule: &str, name: &str| {
        by_reason
            .iter()
            .find(|(r, o, _, _)| r == rule && o.ends_with(&format!("/{name}")))
            .map(|v| v.3.clone())
            .unwrap()
    };
    for rule in [s, u] {
        assert!(message(rule, "recreate").contains("strategy Recreate deletes all 3 pod(s)"));
        assert!(message(rule, "solo").contains("a StatefulSet of 1 replica"));
        assert!(
            message(rule, "guarded")
                .contains("PodDisruptionBudget guarded allows no disruption now"),
            "{}",
            message(rule, "guarded")
        );
        assert!(message(rule, "ondelete").contains("updateStrategy OnDelete"));
    }
    assert!(message(u, "pinned").contains("pins sidecar.istio.io/proxyImage"));
    assert!(
        message(u, "orphan").contains("a restart would give its pods no sidecar"),
        "{}",
        message(u, "orphan")
    );
    assert!(
        message(u, "busy").contains("its own rollout is in progress"),
        "{}",
        message(u, "busy")
    );
    let p = policy_api.get(&policy).await.unwrap();
    let c = common::condition(&p, "SidecarResources").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "RolloutHeld"),
        "{c:?}"
    );
    // One rollout per workload, by the sidecars section, with the declared proxy resources;
    // the held ones kept every pod.
    for app in ["rolling", "allowed", "pinned"] {
        assert_eq!(
            replica_sets(&env.client, &apps, app).await,
            2,
            "{app} rolled once:\n{}",
            rollouts_of(&env, &apps, app).await
        );
    }
    for app in ["recreate", "guarded"] {
        assert_eq!(
            replica_sets(&env.client, &apps, app).await,
            1,
            "{app} never rolled"
        );
    }
    for (app, uids) in &held_pods {
        assert_eq!(
            &pod_uids(&env.client, &apps, app).await,
            uids,
            "{app} kept its pods"
        );
    }
    assert_eq!(pod_uids(&env.client, &lost, "orphan").await, orphan_pods);
    assert_eq!(
        writes_in(&env, &lost),
        0,
        "nothing restarted into no sidecar"
    );
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &apps);
    for p in ready_pods(&pods, "rolling").await {
        assert_eq!(
            proxy_requests(&p),
            Some(("50m".to_string(), "64Mi".to_string())),
            "{}",
            p.name_any()
        );
    }
    outcomes.check("2. Enforce", &floors);
    eprintln!("2. checked after {:?}", started.elapsed());

    // 2b. The owner fixes busy's rollout: it finishes with the current proxy, and meshwarden
    // never restarted it on top.
    busy_api
        .patch(
            "busy",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(
                    json!([{"op": "remove", "path": "/spec/template/spec/nodeSelector"}]),
                )
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    let enforced: Vec<(String, String, String)> = enforced
        .into_iter()
        .filter(|(_, o, _)| !o.ends_with("/busy"))
        .collect();
    wait_equal(
        120,
        "2b. the owner's rollout finished",
        actions,
        enforced.clone(),
    )
    .await;
    injected_all(&env.client, &busy, "busy", 2, "gate", "1.35.0").await;
    assert_eq!(
        writes_in(&env, &busy),
        0,
        "busy never restarted by meshwarden"
    );
    assert_eq!(
        replica_sets(&env.client, &busy, "busy").await,
        3,
        "the owner's two templates"
    );

    // 3. The owner accepts the downtime of the Recreate Deployment: rolled once, with the
    // sidecar resources and the current proxy together.
    Api::<Deployment>::namespaced(env.client.clone(), &apps)
        .patch(
            "recreate",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"meshwarden.io/rollout": "AllowDisruption"}}}),
            ),
        )
        .await
        .unwrap();
    let no_recreate: Vec<(String, String, String)> = enforced
        .iter()
        .filter(|(_, o, _)| !o.ends_with("/recreate"))
        .cloned()
        .collect();
    wait_equal(120, "3. recreate allowed", actions, no_recreate.clone()).await;
    injected_all(&env.client, &apps, "recreate", 3, "gate", "1.35.0").await;
    assert_eq!(replica_sets(&env.client, &apps, "recreate").await, 2);
    let floors: Vec<(&str, usize)> = floors
        .iter()
        .filter(|(a, _)| *a != "recreate")
        .copied()
        .collect();
    outcomes.check("3. recreate allowed", &floors);

    // 4. The budget relaxed: guarded rolls once, never below its budget.
    Api::<PodDisruptionBudget>::namespaced(env.client.clone(), &apps)
        .patch(
            "guarded",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"minAvailable": 1}})),
        )
        .await
        .unwrap();
    let no_guarded: Vec<(String, String, String)> = no_recreate
        .iter()
        .filter(|(_, o, _)| !o.ends_with("/guarded"))
        .cloned()
        .collect();
    wait_equal(120, "4. budget relaxed", actions, no_guarded.clone()).await;
    injected_all(&env.client, &apps, "guarded", 2, "gate", "1.35.0").await;
    assert_eq!(replica_sets(&env.client, &apps, "guarded").await, 2);
    let floors: Vec<(&str, usize)> = floors
        .iter()
        .map(|(a, n)| (*a, if *a == "guarded" { 1 } else { *n }))
        .collect();
    outcomes.check("4. budget relaxed", &floors);

    // 4b. A helm upgrade of the revision whose new istiod pod never starts (a node selector no
    // node has): 1.35.0 still serves, so no proxy is judged against 1.37.0 and nothing is
    // restarted; rolled back, the findings are the ones before.
    let before_stuck = writes(&env);
    let upgrade = |args: &[&str]| {
        let mut all = vec![
            "upgrade",
            gate.release.as_str(),
            chart.as_str(),
            "-n",
            "istio-system",
            "--reuse-values",
        ];
        all.extend_from_slice(args);
        helm(&testplane::istio::helm(), &env.plane.kubeconfig, &all);
    };
    upgrade(&[
        "--set",
        "global.tag=1.37.0",
        "--set",
        "pilot.nodeSelector.nosuchnode=x",
    ]);
    let stuck = expect(&[
        (s, sts, "solo", "Held"),
        (s, sts, "ondelete", "Skipped"),
        (u, "Namespace", "lost", "Reported"),
    ]);
    wait_equal(90, "4b. stuck istiod upgrade", actions, stuck).await;
    two_more_reconciles(&env, &op.state, &apps).await;
    assert_eq!(
        writes(&env),
        before_stuck,
        "nothing restarted for a version that does not serve"
    );
    let p = policy_api.get(&policy).await.unwrap();
    let c = common::condition(&p, "Upgrades").unwrap();
    // Another test's revision may be rolling out too: `istiod canary, gate rolls out`.
    let settling = c.message.split(" rolls out").next().unwrap_or_default();
    assert!(
        settling.contains("istiod ") && settling.contains("gate"),
        "{c:?}"
    );
    helm(
        &testplane::istio::helm(),
        &env.plane.kubeconfig,
        &["rollback", gate.release.as_str(), "-n", "istio-system"],
    );
    wait_equal(120, "4b. rolled back", actions, no_guarded.clone()).await;
    assert_eq!(writes(&env), before_stuck, "nothing restarted");
    outcomes.check("4b. stuck istiod upgrade", &floors);

    // 5. Audit: nothing written, the rest reported.
    let before = writes(&env);
    set_spec(&env, "gate", &spec("Audit")).await;
    let audit_left = expect(&[
        (s, sts, "solo", "Reported"),
        (u, sts, "solo", "Reported"),
        (s, sts, "ondelete", "Reported"),
        (u, sts, "ondelete", "Reported"),
        (u, dep, "pinned", "Reported"),
        (u, dep, "orphan", "Reported"),
        (u, "Namespace", "lost", "Reported"),
    ]);
    wait_equal(60, "5. Audit", actions, audit_left).await;
    two_more_reconciles(&env, &op.state, &apps).await;
    assert_eq!(writes(&env), before, "Audit writes nothing");
    outcomes.check("5. Audit", &floors);

    // 6. Deleted: nothing written, nothing rolls.
    policy_api
        .delete(&policy, &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(writes(&env), before, "deleting the policy writes nothing");
    for (app, uids) in &held_pods[..2] {
        assert_eq!(
            &pod_uids(&env.client, &apps, app).await,
            uids,
            "{app} kept its pods"
        );
    }
    outcomes.check("6. deleted", &floors);

    // 7. The revision removed (`helm uninstall`, its istiod stopped) while the namespaces still
    // select it, under an upgrades policy in Enforce: every proxy is of a revision that no
    // longer runs, and a restart would give the pods no sidecar: skipped, nothing written, no
    // pod replaced.
    let upgrades_only = format!(
        "enforcement: Enforce\nupgrades:\n  restartOutdated: true\n  maxConcurrentRestarts: 10\n  namespaceSelector: {{matchLabels: {{meshwarden-gate-up: {id}}}}}\n"
    );
    env.create_policy("gate", &upgrades_only).await;
    let apps_uids: Vec<(&str, Vec<String>)> = {
        let mut v = Vec::new();
        for app in [
            "rolling", "allowed", "recreate", "guarded", "solo", "ondelete",
        ] {
            v.push((app, pod_uids(&env.client, &apps, app).await));
        }
        v
    };
    gate.stop().unwrap();
    // A revision tag left pointing at the removed revision, selected by `lost`.
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let tag = format!("{id}-gt");
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.client.clone());
    mwcs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": format!("istio-revision-tag-{tag}"),
                         "labels": {"istio.io/tag": tag, "istio.io/rev": "gate"}},
            "webhooks": [],
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    Api::<Namespace>::all(env.client.clone())
        .patch(
            &lost,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio.io/rev": tag}}})),
        )
        .await
        .unwrap();
    let removed: Vec<(String, String, String)> =
        ["rolling", "allowed", "recreate", "guarded", "pinned"]
            .iter()
            .map(|n| (dep, *n))
            .chain([(sts, "solo"), (sts, "ondelete")])
            .map(|(k, n)| {
                (
                    u.to_string(),
                    format!("{k}/{apps}/{n}"),
                    "Skipped".to_string(),
                )
            })
            .chain([
                (
                    u.to_string(),
                    format!("Deployment/{lost}/orphan"),
                    "Skipped".to_string(),
                ),
                (
                    u.to_string(),
                    format!("Deployment/{busy}/busy"),
                    "Skipped".to_string(),
                ),
                (
                    u.to_string(),
                    format!("Namespace/{busy}"),
                    "Reported".to_string(),
                ),
                (
                    u.to_string(),
                    format!("Namespace/{apps}"),
                    "Reported".to_string(),
                ),
                (
                    u.to_string(),
                    format!("Namespace/{lost}"),
                    "Reported".to_string(),
                ),
            ])
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
    wait_equal(120, "7. revision removed", actions, removed).await;
    // `lost` was relabelled to the tag after the revision went: its finding names the tag.
    let tagged = format!("Namespace/{lost}");
    common::eventually(60, "the namespace's finding names the tag", || async {
        violations()
            .await
            .iter()
            .any(|(_, o, _, m)| *o == tagged && m.contains(&format!("istio.io/rev={tag}")))
            .then_some(())
    })
    .await;
    for (rule, object, _, message) in violations().await {
        let why = match object.as_str() {
            o if o == format!("Namespace/{lost}") => {
                "is a revision tag of revision gate, whose istiod no longer runs"
            }
            o if o.starts_with("Namespace/") => continue,
            o if o.ends_with("/pinned") => "pins sidecar.istio.io/proxyImage",
            _ => "a restart would give its pods no sidecar",
        };
        assert!(message.contains(why), "{rule} {object}: {message}");
    }
    two_more_reconciles(&env, &op.state, &apps).await;
    assert_eq!(writes(&env), before, "nothing restarted into no sidecar");
    for (app, uids) in &apps_uids {
        assert_eq!(
            &pod_uids(&env.client, &apps, app).await,
            uids,
            "{app} kept its pods"
        );
    }
    assert_eq!(pod_uids(&env.client, &lost, "orphan").await, orphan_pods);
    outcomes.check("7. revision removed", &floors);
    op.stop().await;
    mwcs.delete(
        &format!("istio-revision-tag-{tag}"),
        &DeleteParams::default(),
    )
    .await
    .unwrap();
    eprintln!("done after {:?}", started.elapsed());
}
