//! `meshwarden plan` (the binary) against the real API server: it lists exactly the writes of
//! Enforce's first pass, makes none itself (the audit log holds only its dry runs), names the
//! fields it takes over from Helm and the writes the API server refuses, and plans nothing for
//! a converged mesh.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::Api;
use serde_json::Value;

use crate::common::{self, Env};

const KINDS: &[&str] = &["Deployment", "HorizontalPodAutoscaler"];

/// The tests with an upgrades section take turns: the section is mesh-wide, and of two
/// policies that set it differently only the older one's is evaluated.
pub(crate) static UPGRADES_POLICY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `meshwarden plan` as the operator's user; (exit code, stdout, seconds taken).
fn plan(env: &Env, args: &[&str]) -> (i32, String, f64) {
    common::run_plan(&env.plane.operator_kubeconfig, args)
}

/// The operator's writes on the shared plane in `namespaces`.
fn writes_in(namespaces: &[&str]) -> Vec<common::Write> {
    common::writes_of(&testplane::shared().audit_events(), namespaces)
}

fn spec(env: &Env, istio: &str, enforcement: &str) -> String {
    format!(
        "enforcement: {enforcement}
controlPlane: {{namespace: {istio}, replicas: {{min: 2}}, disruptionBudget: {{maxUnavailable: 1}}, resources: {{requests: {{cpu: 600m, memory: 2Gi}}}}}}
sidecars: {{namespaceSelector: {{matchLabels: {{meshwarden-test: {id}}}}}, maxConcurrentRollouts: 1, resources: {{requests: {{cpu: 100m, memory: 128Mi}}, limits: {{cpu: '1', memory: 256Mi}}}}}}
mtls: {{mode: PERMISSIVE, scope: Namespaces, namespaceSelector: {{matchLabels: {{meshwarden-test: {id}}}}}}}
",
        id = env.id
    )
}

#[tokio::test]
async fn plan_lists_the_writes_of_enforce_writes_nothing_and_plans_nothing_once_converged() {
    let env = common::env("plan").await;
    let istio = env.namespace("istio", &[]).await;
    env.load_fixture("istiod-default.yaml", &istio, KINDS).await;
    let apps = env
        .namespace(
            "apps",
            &[("meshwarden-test", &env.id), ("istio.io/rev", "default")],
        )
        .await;
    for name in ["a", "b"] {
        let d = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {apps}}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec: {{containers: [{{name: app, image: registry.example/app:1}}]}}\n"
        );
        common::apply_as(&env.client, &d, "kubectl").await;
    }
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &istio);
    let istiod_before = deployments.get("istiod").await.unwrap();

    // The policy exists only in a file, in Audit: the plan is Enforce's all the same.
    let (file, _keep) = env.policy_file("p", &spec(&env, &istio, "Audit"));
    let (code, out, secs) = plan(&env, &["-f", &file]);
    eprintln!("plan took {secs:.2}s:\n{out}");
    assert_eq!(code, 2, "changes pending:\n{out}");
    common::assert_lists(
        &out,
        &[
            format!("~ HorizontalPodAutoscaler {istio}/istiod (updated)"),
            format!("~ Deployment {istio}/istiod (updated; its pods roll: 1 pod)"),
            format!("+ PodDisruptionBudget {istio}/istiod-meshwarden (created)"),
            format!("~ Deployment {apps}/a (updated; its pods roll: 2 pods)"),
            format!("+ PeerAuthentication {apps}/meshwarden-mtls (created)"),
            "  takes over from helm: spec.minReplicas".to_string(),
            "  takes over from helm: spec.template.spec.containers[name=discovery].resources.requests.cpu".to_string(),
            format!("  Held Deployment/{apps}/b (SidecarResources)"),
            "sidecars roll in 2 paced wave(s) of at most 1 (1 now, 1 waiting for a slot)".into(),
        ],
    );
    assert!(
        !out.contains(&format!("Deployment {apps}/b (")),
        "b waits for a slot:\n{out}"
    );
    let diff_line = |mark: char, text: &str| {
        out.lines()
            .any(|l| l.strip_prefix(mark).is_some_and(|l| l.trim() == text))
    };
    assert!(
        diff_line('-', "cpu: 500m") && diff_line('+', "cpu: 600m"),
        "{out}"
    );

    // Nothing was written: the audit log holds only dry runs of the operator's user, and
    // istiod is as it was.
    let by_plan = writes_in(&[&istio, &apps]);
    assert!(!by_plan.is_empty());
    assert!(
        by_plan.iter().all(|w| w.dry_run),
        "only dry runs: {by_plan:?}"
    );
    let istiod_after = deployments.get("istiod").await.unwrap();
    assert_eq!(
        istiod_before.metadata.resource_version,
        istiod_after.metadata.resource_version
    );

    // The same plan as JSON, then Enforce's first pass: the same objects, the same fields.
    let (code, json, _) = plan(&env, &["-f", &file, "-o", "json"]);
    assert_eq!(code, 2);
    let planned: Value = serde_json::from_str(&json).unwrap();
    env.enforce_as_planned(
        "p",
        &spec(&env, &istio, "Enforce"),
        &planned,
        &[&istio, &apps],
    )
    .await;

    // Converged: the rollouts finish, Enforce writes b, then nothing is planned.
    common::complete_rollout(&env.client, &apps, "a").await;
    env.enforce_once("p").await;
    common::complete_rollout(&env.client, &apps, "b").await;
    let (code, out, secs) = plan(&env, &[&env.policy_name("p")]);
    // A usage error is an error (clap's own code, 2, would read as "changes pending").
    assert_eq!(plan(&env, &["-o", "table", "x"]).0, 1);
    assert_eq!(plan(&env, &["no-such-policy"]).0, 1);
    eprintln!("plan of the converged mesh took {secs:.2}s:\n{out}");
    assert_eq!(code, 0, "nothing pending:\n{out}");
    assert!(
        out.contains("No changes: Enforce would write nothing now"),
        "{out}"
    );
    // No status and no Event about the policy: neither the plans (their dry-run creates of it
    // validate the file) nor the passes wrote one.
    let policy = env.policy_name("p");
    let about_policy: Vec<serde_json::Value> = testplane::shared()
        .audit_events()
        .into_iter()
        .filter(|e| e["user"]["username"] == "meshwarden-operator")
        .filter(|e| {
            !e["requestURI"]
                .as_str()
                .is_some_and(|u| u.contains("dryRun=All"))
        })
        .filter(|e| {
            e["objectRef"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(&policy))
        })
        .collect();
    assert!(about_policy.is_empty(), "{about_policy:?}");
}

#[tokio::test]
async fn plan_names_a_refused_write_with_the_servers_message() {
    let env = common::env("plan-freeze").await;
    let istio = env.namespace("istio", &[]).await;
    env.load_fixture("istiod-default.yaml", &istio, KINDS).await;
    common::freeze_deployments(
        &env.client,
        &istio,
        "object.spec.template == oldObject.spec.template",
        "change freeze on the pod template",
        "istiod",
        serde_json::json!({"spec": {"template": {"metadata": {"labels": {"probe": "1"}}}}}),
    )
    .await;
    let (file, _keep) = env.policy_file(
        "p",
        &format!(
            "controlPlane: {{namespace: {istio}, replicas: {{min: 2}}, resources: {{requests: {{cpu: 600m}}}}}}\n"
        ),
    );
    let (code, out, _) = plan(&env, &["-f", &file]);
    eprintln!("{out}");
    assert_eq!(code, 2, "{out}");
    common::assert_lists(
        &out,
        &[
            format!("! Deployment {istio}/istiod (REFUSED by the API server)"),
            "change freeze on the pod template".to_string(),
            "  the apply it sent:\n".to_string(),
            "                cpu: 600m\n".to_string(),
            format!("~ HorizontalPodAutoscaler {istio}/istiod (updated)"),
            "Plan: 0 to create, 1 to update, 0 to delete, 1 refused".to_string(),
        ],
    );
    assert!(writes_in(&[&istio]).iter().all(|w| w.dry_run));
    common::lift_freeze(&env.client, &istio).await;
}

/// `-f` before the MeshPolicy CRD is installed: a plane of its own without it.
#[tokio::test]
async fn plan_from_a_file_works_before_the_crd_exists() {
    let dir = testplane::scratch_dir("plan-nocrd");
    let plane = testplane::Plane::start(&dir, testplane::Lifetime::Attached)
        .await
        .expect("start kube-apiserver (run hack/build-k8s-bins.sh first)");
    let admin = plane.client().await.unwrap();
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n";
    testplane::apply_yaml(&admin, ns, &[]).await.unwrap();
    common::apply_as(
        &admin,
        &common::fixture_in("istiod-default.yaml", "istio-system", KINDS),
        "helm",
    )
    .await;
    let file = std::env::temp_dir().join(format!("plan-nocrd-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: production}\nspec:\n  controlPlane: {namespace: istio-system, replicas: {min: 2}, disruptionBudget: {maxUnavailable: 1}}\n",
    )
    .unwrap();
    let _keep = common::TempPath(file.clone());
    let (code, out, secs) =
        common::run_plan(&plane.operator_kubeconfig, &["-f", file.to_str().unwrap()]);
    eprintln!("plan without the CRD took {secs:.2}s:\n{out}");
    assert_eq!(code, 2, "{out}");
    common::assert_lists(
        &out,
        &[
            "note: the MeshPolicy CRD is not installed",
            "~ HorizontalPodAutoscaler istio-system/istiod (updated)",
            "+ PodDisruptionBudget istio-system/istiod-meshwarden (created)",
        ],
    );
    assert!(
        !out.contains("ownerReferences"),
        "no policy to own it yet:\n{out}"
    );
    // By name there is nothing to plan: an error.
    assert_eq!(
        common::run_plan(&plane.operator_kubeconfig, &["production"]).0,
        1
    );
    let writes: Vec<Value> = plane
        .audit_events()
        .into_iter()
        .filter(|e| e["user"]["username"] == "meshwarden-operator")
        .filter(|e| e["stage"] == "ResponseComplete")
        .filter(|e| e["verb"] != "get" && e["verb"] != "list")
        .collect();
    assert!(!writes.is_empty());
    assert!(
        writes.iter().all(|e| e["requestURI"]
            .as_str()
            .is_some_and(|u| u.contains("dryRun=All"))),
        "only dry runs: {writes:?}"
    );
}

/// mTLS stops at a refused write, in Enforce as in the plan: the plan names it and is complete
/// (exit 2, not 1).
#[tokio::test]
async fn a_section_stopped_by_a_refused_write_is_planned_not_failed() {
    let env = common::env("plan-pa").await;
    let apps = env.namespace("apps", &[("meshwarden-test", &env.id)]).await;
    let rule = "{apiGroups: [security.istio.io], apiVersions: ['*'], operations: [CREATE], resources: [peerauthentications]}";
    common::freeze(
        &env.client,
        &apps,
        rule,
        "false",
        "no new PeerAuthentications",
    )
    .await;
    let probe = serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "probe", "namespace": apps},
        "spec": {"mtls": {"mode": "PERMISSIVE"}},
    });
    common::eventually(20, "the freeze is in force", || async {
        let ar = kube::discovery::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "security.istio.io",
            "v1",
            "PeerAuthentication",
        ));
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(env.client.clone(), &apps, &ar);
        let obj: kube::api::DynamicObject = serde_json::from_value(probe.clone()).unwrap();
        let pp = kube::api::PostParams {
            dry_run: true,
            ..Default::default()
        };
        api.create(&pp, &obj).await.is_err().then_some(())
    })
    .await;
    let (file, _keep) = env.policy_file(
        "p",
        &format!(
            "mtls: {{mode: PERMISSIVE, scope: Namespaces, namespaceSelector: {{matchLabels: {{meshwarden-test: {}}}}}}}\n",
            env.id
        ),
    );
    let (code, out, _) = plan(&env, &["-f", &file]);
    eprintln!("{out}");
    assert_eq!(code, 2, "{out}");
    common::assert_lists(
        &out,
        &[
            format!("! PeerAuthentication {apps}/meshwarden-mtls (REFUSED by the API server)"),
            "no new PeerAuthentications".to_string(),
        ],
    );
    assert!(!out.contains("could not be evaluated"), "{out}");
    // What comes after the refusal in the section is not planned, and the plan says so under
    // the refusal.
    let stops = format!(
        "  MutualTLS stops here: {}",
        meshwarden::plan::NOT_PLANNED_AFTER_REFUSAL
    );
    let lines: Vec<&str> = out.lines().collect();
    let refused = format!("! PeerAuthentication {apps}/meshwarden-mtls (");
    let at = lines.iter().position(|l| l.starts_with(&refused));
    assert!(
        at.is_some_and(|i| lines[i + 1].starts_with("  refused: ") && lines[i + 2] == stops),
        "{out}"
    );
    let (_, json, _) = plan(&env, &["-f", &file, "-o", "json"]);
    let planned: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        planned["stoppedSections"][0]["at"],
        serde_json::json!([format!("PeerAuthentication {apps}/meshwarden-mtls")]),
        "{planned:#}"
    );
    common::lift_freeze(&env.client, &apps).await;
}

/// A plan of an apply that no longer carries a field meshwarden's apply owned (the policy
/// stopped declaring it): Enforce hands the field to meshwarden's `Update` entry first, so its
/// value stays; the dry run cannot, and puts the live value back into its answer instead.
#[tokio::test]
async fn a_released_field_keeps_its_value_in_the_plan_as_in_enforce() {
    use meshwarden::write::{self, DryRun, Writes};
    let env = common::env("plan-keep").await;
    let ns = env.namespace("apps", &[]).await;
    let d = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: a, namespace: {ns}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: a}}}}\n  template:\n    metadata: {{labels: {{app: a}}}}\n    spec: {{containers: [{{name: app, image: registry.example/app:1}}]}}\n"
    );
    common::apply_as(&env.client, &d, "kubectl").await;
    let api: Api<Deployment> = Api::namespaced(env.plane.operator_client().await, &ns);
    let patch = |replicas: Option<i32>| {
        let mut p = serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "a", "namespace": ns, "annotations": {"meshwarden.io/x": "1"}},
        });
        if let Some(r) = replicas {
            p["spec"] = serde_json::json!({"replicas": r});
        }
        p
    };
    // meshwarden's apply owns replicas 3 (taken over from kubectl) and the annotation.
    let real = Writes::default();
    write::apply(&api, "a", &patch(Some(3)), &real)
        .await
        .unwrap();
    let record = std::sync::Arc::new(DryRun::default());
    let (planned, released) =
        write::apply_keeping(&api, "a", &patch(None), &Writes::dry_run(record.clone()))
            .await
            .unwrap();
    assert_eq!(released, ["spec.replicas"]);
    assert_eq!(planned.spec.unwrap().replicas, Some(3), "the value stays");
    let changes = record.changes();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].released, ["spec.replicas"]);
    assert_eq!(changes[0].after.as_ref().unwrap()["spec"]["replicas"], 3);
    // Enforce does the same for real: the value stays.
    let (applied, released) = write::apply_keeping(&api, "a", &patch(None), &real)
        .await
        .unwrap();
    assert_eq!(released, ["spec.replicas"]);
    assert_eq!(applied.spec.unwrap().replicas, Some(3));
    let dry: Vec<common::Write> = writes_in(&[&ns])
        .into_iter()
        .filter(|w| w.dry_run)
        .collect();
    assert_eq!(dry.len(), 1, "the hand-over is not sent in a plan: {dry:?}");
}

/// A section an older policy sets differently is not planned, as Enforce would not evaluate
/// it: the plan says so and names the winner, instead of planning nothing in silence.
#[tokio::test]
async fn a_section_an_older_policy_wins_is_named_not_planned_in_silence() {
    let _upgrades = UPGRADES_POLICY.lock().await;
    let env = common::env("plan-conflict").await;
    env.create_policy("older", "upgrades: {maxMinorSkew: 3}\n")
        .await;
    // Creation times count in seconds (then names decide): the next second is younger.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (file, _keep) = env.policy_file("newer", "upgrades: {maxMinorSkew: 1}\n");
    let (_, out, _) = plan(&env, &["-f", &file]);
    common::assert_lists(
        &out,
        &["note: spec.upgrades is not planned: the older MeshPolicy "],
    );
    assert!(out.contains("wins (condition Conflict)"), "{out}");
    env.delete_policies().await;
}

/// The upgrades section's restarts through `meshwarden plan`, on the API server alone: an
/// istiod of revision `<id>` at 1.31.0 (its rollout completed), and four Deployments of a
/// namespace labelled with that revision whose running pods (created here as the ReplicaSet
/// controller would, marked Running) carry proxy 1.29.0 of that revision, two minors behind.
/// `restartOutdated: true, maxConcurrentRestarts: 2`: a (2 replicas) and b (1) restart now, c
/// waits for a restart slot, d is held by the rollout gate (strategy Recreate). The plan names
/// the restarts with their pods, the holds with why and the waves, and writes nothing; Enforce's
/// first pass then restarts exactly a and b, as planned, and leaves c and d alone.
#[tokio::test]
async fn plan_of_restarts_names_their_pods_waves_and_holds_as_the_first_enforce_pass() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Patch, PatchParams, PostParams};
    let _upgrades = UPGRADES_POLICY.lock().await;
    let env = common::env("plan-up").await;
    let (rev, istio, apps) = common::istiod_at_1_31(&env).await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &apps);
    for (name, replicas, strategy) in [
        ("a", 2, "RollingUpdate"),
        ("b", 1, "RollingUpdate"),
        ("c", 3, "RollingUpdate"),
        ("d", 1, "Recreate"),
    ] {
        let d = format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {apps}}}\nspec:\n  replicas: {replicas}\n  strategy: {{type: {strategy}}}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec: {{containers: [{{name: app, image: registry.example/app:1}}]}}\n"
        );
        common::apply_as(&env.client, &d, "kubectl").await;
        common::complete_rollout(&env.client, &apps, name).await;
        for i in 0..replicas {
            let pod = serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": format!("{name}-h1-{i}"),
                    "labels": {"app": name, "pod-template-hash": "h1"},
                    "annotations": {"sidecar.istio.io/status": format!("{{\"revision\":\"{rev}\"}}")},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                        "name": format!("{name}-h1"), "uid": "6a1f2c3d-0000-4000-8000-000000000001",
                        "controller": true}],
                },
                "spec": {"containers": [
                    {"name": "app", "image": "registry.example/app:1"},
                    {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.29.0"},
                ]},
            });
            let pod: Pod = serde_json::from_value(pod).unwrap();
            pods.create(&PostParams::default(), &pod).await.unwrap();
            pods.patch_status(
                &pod.metadata.name.unwrap(),
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"phase": "Running"}})),
            )
            .await
            .unwrap();
        }
    }
    let spec = |mode: &str| {
        format!(
            "enforcement: {mode}\nupgrades:\n  restartOutdated: true\n  maxConcurrentRestarts: 2\n  namespaceSelector: {{matchLabels: {{meshwarden-test: {}}}}}\n",
            env.id
        )
    };
    let (file, _keep) = env.policy_file("p", &spec("Audit"));
    let (code, out, secs) = plan(&env, &["-f", &file]);
    eprintln!("plan took {secs:.2}s:\n{out}");
    assert_eq!(code, 2, "changes pending:\n{out}");
    let restarted = "  a restart by the upgrades section (its proxies are outdated)\n";
    common::assert_lists(
        &out,
        &[
            format!("~ Deployment {apps}/a (updated; its pods roll: 2 pods)\n{restarted}"),
            format!("~ Deployment {apps}/b (updated; its pods roll: 1 pod)\n{restarted}"),
            format!("  Held Deployment/{apps}/c (Upgrades): "),
            "waits for a restart slot (maxConcurrentRestarts 2".into(),
            format!("  Held Deployment/{apps}/d (Upgrades): "),
            "strategy Recreate deletes all 1 pod(s) before new ones start".into(),
            "Plan: 0 to create, 2 to update, 0 to delete, 0 refused; 2 workload(s) roll (3 pods), 2 held".into(),
            "; restarts run in 2 paced wave(s) of at most 2 (2 now, 1 waiting for a slot)".into(),
        ],
    );
    for held in ["c", "d"] {
        assert!(
            !out.contains(&format!("Deployment {apps}/{held} (")),
            "{out}"
        );
    }
    // The restarts are listed as changes, not also as deviations left alone.
    for restarted in ["a", "b"] {
        assert!(
            !out.contains(&format!("Deployment/{apps}/{restarted} (")),
            "{out}"
        );
    }
    // Nothing was written: only dry runs, and the Deployments are at their generation.
    let by_plan = writes_in(&[&apps, &istio]);
    assert!(
        !by_plan.is_empty() && by_plan.iter().all(|w| w.dry_run),
        "only dry runs: {by_plan:?}"
    );
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &apps);
    let generation = |d: Deployment| d.metadata.generation;
    for name in ["a", "b", "c", "d"] {
        assert_eq!(generation(deployments.get(name).await.unwrap()), Some(1));
    }

    let (code, json, _) = plan(&env, &["-f", &file, "-o", "json"]);
    assert_eq!(code, 2, "{json}");
    let planned: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        planned["restartWaves"],
        serde_json::json!({"now": 2, "waiting": 1, "maxConcurrent": 2, "waves": 2}),
        "{planned:#}"
    );
    let rollouts: Vec<(String, Value)> = planned["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["rollout"].clone(),
            )
        })
        .collect();
    assert_eq!(
        rollouts,
        [
            (
                "a".into(),
                serde_json::json!({"pods": 2, "cause": "restart"})
            ),
            (
                "b".into(),
                serde_json::json!({"pods": 1, "cause": "restart"})
            ),
        ]
    );
    env.enforce_as_planned("p", &spec("Enforce"), &planned, &[&apps, &istio])
        .await;
    // a and b restarted (a new generation whose template carries the restart); c, d not.
    for (name, g) in [("a", 2), ("b", 2), ("c", 1), ("d", 1)] {
        assert_eq!(
            generation(deployments.get(name).await.unwrap()),
            Some(g),
            "{name}"
        );
    }
    env.delete_policies().await;
}
