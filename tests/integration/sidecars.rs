//! Sidecar resources against a real API server. The server runs no controllers: rollouts are
//! completed by writing the workload's status from the test.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use meshwarden::api::MeshPolicy;
use meshwarden::rules::sidecars::{
    GENERATION_ANNOTATION, HASH_ANNOTATION, PROXY_CPU, PROXY_CPU_LIMIT, PROXY_MEMORY,
    PROXY_MEMORY_LIMIT,
};

use crate::common::{self, Env, condition};

const FOUR: [&str; 4] = [PROXY_CPU, PROXY_CPU_LIMIT, PROXY_MEMORY, PROXY_MEMORY_LIMIT];
const RESOURCES: &str =
    "resources: {requests: {cpu: 100m, memory: 128Mi}, limits: {cpu: '1', memory: 256Mi}}";

/// A namespace of this test, selected by the test's policies through the `meshwarden-test`
/// label (policies are cluster-wide; the label keeps them off other tests' namespaces).
pub(crate) async fn ns(env: &Env, suffix: &str, labels: &[(&str, &str)]) -> String {
    let mut all = vec![("meshwarden-test", env.id.as_str())];
    all.extend_from_slice(labels);
    env.namespace(suffix, &all).await
}

pub(crate) fn policy_spec(env: &Env, enforcement: &str, max: i32) -> String {
    format!(
        "enforcement: {enforcement}\nsidecars: {{namespaceSelector: {{matchLabels: {{meshwarden-test: {}}}}}, maxConcurrentRollouts: {max}, {RESOURCES}}}",
        env.id
    )
}

/// Creates a workload as `kubectl` would. `kind` is Deployment, StatefulSet or DaemonSet.
#[allow(clippy::too_many_arguments)]
async fn workload(
    client: &Client,
    kind: &str,
    ns: &str,
    name: &str,
    replicas: i32,
    tpl_labels: &[(&str, &str)],
    tpl_annotations: &[(&str, &str)],
    annotations: &[(&str, &str)],
) {
    let to_map = |p: &[(&str, &str)]| -> BTreeMap<String, String> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let mut labels = to_map(tpl_labels);
    labels.insert("app".into(), name.into());
    let mut spec = serde_json::json!({
        "selector": {"matchLabels": {"app": name}},
        "template": {
            "metadata": {"labels": labels, "annotations": to_map(tpl_annotations)},
            "spec": {"containers": [{"name": "app", "image": "registry.example/app:1",
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}}}]}
        }
    });
    if kind != "DaemonSet" {
        spec["replicas"] = serde_json::json!(replicas);
    }
    if kind == "StatefulSet" {
        spec["serviceName"] = serde_json::json!(name);
    }
    let obj = serde_json::json!({
        "apiVersion": "apps/v1", "kind": kind,
        "metadata": {"name": name, "namespace": ns, "annotations": to_map(annotations)},
        "spec": spec,
    });
    common::apply_as(client, &serde_yaml::to_string(&obj).unwrap(), "kubectl").await;
}

pub(crate) async fn deployment(client: &Client, ns: &str, name: &str, replicas: i32) {
    workload(client, "Deployment", ns, name, replicas, &[], &[], &[]).await;
}

fn template_annotations(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default()
}

pub(crate) async fn annotations_of(
    client: &Client,
    ns: &str,
    name: &str,
) -> BTreeMap<String, String> {
    let d = Api::<Deployment>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap();
    template_annotations(&d)
}

pub(crate) fn has_four(a: &BTreeMap<String, String>) -> bool {
    FOUR.iter().all(|k| a.contains_key(*k))
}

async fn wait_reason(env: &Env, policy: &str, reason: &str, secs: u64) -> MeshPolicy {
    env.wait_policy(policy, secs, |p| {
        let c = condition(p, "SidecarResources")?;
        (c.reason == reason && p.status.as_ref()?.observed_generation == p.metadata.generation)
            .then(|| p.clone())
    })
    .await
}

fn managed_by_meshwarden(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> bool {
    meta.managed_fields
        .iter()
        .flatten()
        .any(|m| m.manager.as_deref() == Some("meshwarden"))
}

/// Injected and non-injected namespaces, opt-out, inject=false, an ambient namespace and an
/// Istio gateway; all four annotations written on every kind, other annotations kept; a
/// converged mesh costs no write; a removed annotation comes back; running pods with other
/// proxy resources are reported.
#[tokio::test]
async fn targets_get_all_four_annotations_and_nothing_else_is_touched() {
    let env = common::env("sc-targets").await;
    let c = &env.client;
    let inj = ns(&env, "inj", &[("istio-injection", "enabled")]).await;
    let plain = ns(&env, "plain", &[]).await;
    let amb = ns(
        &env,
        "amb",
        &[
            ("istio-injection", "enabled"),
            ("istio.io/dataplane-mode", "ambient"),
        ],
    )
    .await;
    workload(
        c,
        "Deployment",
        &inj,
        "web",
        2,
        &[],
        &[("prometheus.io/scrape", "true")],
        &[],
    )
    .await;
    // Two replicas: a StatefulSet of one is held by the rollout gate (its only pod would be
    // deleted before its replacement exists; `rollout_gate` in tests/cluster covers it).
    workload(c, "StatefulSet", &inj, "db", 2, &[], &[], &[]).await;
    workload(c, "DaemonSet", &inj, "agent", 0, &[], &[], &[]).await;
    workload(
        c,
        "Deployment",
        &inj,
        "legacy",
        1,
        &[],
        &[],
        &[("meshwarden.io/ignore", "sidecar-resources")],
    )
    .await;
    workload(
        c,
        "Deployment",
        &inj,
        "batch",
        1,
        &[("sidecar.istio.io/inject", "false")],
        &[],
        &[],
    )
    .await;
    workload(c, "Deployment", &plain, "web", 1, &[], &[], &[]).await;
    // Opt-in by pod label in a namespace without injection.
    workload(
        c,
        "Deployment",
        &plain,
        "optin",
        1,
        &[("sidecar.istio.io/inject", "true")],
        &[],
        &[],
    )
    .await;
    workload(c, "Deployment", &amb, "web", 1, &[], &[], &[]).await;
    // The Istio ingress gateway chart's Deployment, in the injected namespace.
    env.load_fixture("gateway-ingress.yaml", &inj, &["Deployment"])
        .await;

    let op = env.start_operator().await;
    env.create_policy("p", &policy_spec(&env, "Enforce", 10))
        .await;
    let started = Instant::now();
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), &inj);
    common::eventually(30, "annotations on inj/web", || async {
        has_four(&annotations_of(c, &inj, "web").await).then_some(())
    })
    .await;
    let first_write = started.elapsed();

    let web = annotations_of(c, &inj, "web").await;
    assert_eq!(web[PROXY_CPU], "100m");
    assert_eq!(web[PROXY_CPU_LIMIT], "1");
    assert_eq!(web[PROXY_MEMORY], "128Mi");
    assert_eq!(web[PROXY_MEMORY_LIMIT], "256Mi");
    assert!(web.contains_key(HASH_ANNOTATION));
    assert_eq!(
        web["prometheus.io/scrape"], "true",
        "other annotations are kept"
    );
    common::eventually(10, "annotations on plain/optin", || async {
        has_four(&annotations_of(c, &plain, "optin").await).then_some(())
    })
    .await;
    let optin = annotations_of(c, &plain, "optin").await;
    assert!(
        has_four(&optin),
        "a pod opting in by label is a target: {optin:?}"
    );
    let tpl = |m: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>| {
        m.and_then(|m| m.annotations.clone()).unwrap_or_default()
    };
    let sts = Api::<StatefulSet>::namespaced(c.clone(), &inj)
        .get("db")
        .await
        .unwrap();
    assert!(has_four(&tpl(sts
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref())));
    let ds = Api::<DaemonSet>::namespaced(c.clone(), &inj)
        .get("agent")
        .await
        .unwrap();
    assert!(has_four(&tpl(ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref())));

    for (ns, name) in [
        (&inj, "legacy"),
        (&inj, "batch"),
        (&inj, "istio-ingressgateway"),
        (&plain, "web"),
        (&amb, "web"),
    ] {
        let d = Api::<Deployment>::namespaced(c.clone(), ns)
            .get(name)
            .await
            .unwrap();
        assert!(
            !managed_by_meshwarden(&d.metadata),
            "{ns}/{name} must not be written"
        );
        assert!(
            !template_annotations(&d).contains_key(PROXY_CPU),
            "{ns}/{name} got a proxy annotation"
        );
    }
    assert!(common::operator_writes(Some(&amb), &[]).is_empty());

    // A running pod whose proxy has other resources is reported.
    let pods: Api<Pod> = Api::namespaced(c.clone(), &inj);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        // Injected (Istio's annotation): a pod without it would count as a plain-text client
        // for the mTLS tests running alongside.
        "metadata": {"name": "stray-1", "namespace": inj, "annotations": {"sidecar.istio.io/status": "{}"}},
        "spec": {"containers": [
            {"name": "app", "image": "registry.example/app:1"},
            {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.30.3",
             "resources": {"requests": {"cpu": "10m", "memory": "40Mi"}}}
        ]}
    }))
    .unwrap();
    pods.create(&Default::default(), &pod).await.unwrap();
    pods.patch_status(
        "stray-1",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap();

    // The DaemonSet and StatefulSet finish rolling (DaemonSet: 0 pods scheduled).
    let generation = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| m.generation;
    let sts_api: Api<StatefulSet> = Api::namespaced(c.clone(), &inj);
    let sts = sts_api.get("db").await.unwrap();
    sts_api
        .patch_status(
            "db",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
            "observedGeneration": generation(&sts.metadata), "replicas": 2, "readyReplicas": 2,
            "updatedReplicas": 2, "currentRevision": "r2", "updateRevision": "r2"}})),
        )
        .await
        .unwrap();
    let ds_api: Api<DaemonSet> = Api::namespaced(c.clone(), &inj);
    let ds = ds_api.get("agent").await.unwrap();
    ds_api
        .patch_status(
            "agent",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
            "observedGeneration": generation(&ds.metadata), "desiredNumberScheduled": 0,
            "currentNumberScheduled": 0, "numberMisscheduled": 0, "numberReady": 0,
            "updatedNumberScheduled": 0, "numberAvailable": 0}})),
        )
        .await
        .unwrap();
    common::complete_rollout(c, &inj, "web").await;
    common::complete_rollout(c, &plain, "optin").await;
    let p = wait_reason(&env, "p", "Compliant", 30).await;
    let cond = condition(&p, "SidecarResources").unwrap().clone();
    let status = p.status.clone().unwrap();
    assert_eq!(status.targets, 4, "web, db, agent, optin: {}", cond.message);
    assert!(
        cond.message.contains(&format!("Deployment/{inj}/legacy")),
        "opt-out listed: {}",
        cond.message
    );
    assert!(
        cond.message.contains(&format!("{inj}: 1 (stray-1)")),
        "pod drift: {}",
        cond.message
    );
    let metrics = op.state.ctx.metrics.encode();
    let series = format!(
        "meshwarden_sidecar_drift_pods{{policy=\"{}\",namespace=\"{inj}\"}} 1",
        env.policy_name("p")
    );
    assert!(metrics.contains(&series), "{series} missing in\n{metrics}");
    assert!(
        cond.message.contains(&amb),
        "ambient namespace named: {}",
        cond.message
    );

    // Converged: another reconcile (the policy is touched) writes nothing to the mesh.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = common::operator_writes(Some(&inj), &[]).len();
    let before_plain = common::operator_writes(Some(&plain), &[]).len();
    let status_before = common::operator_writes(None, &[&env.policy_name("p")]).len();
    Api::<MeshPolicy>::all(c.clone())
        .patch(
            &env.policy_name("p"),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"touch": "1"}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        common::operator_writes(Some(&inj), &[]).len(),
        before,
        "no write to the mesh"
    );
    assert_eq!(
        common::operator_writes(Some(&plain), &[]).len(),
        before_plain
    );
    assert_eq!(
        common::operator_writes(None, &[&env.policy_name("p")]).len(),
        status_before,
        "no status write either"
    );
    assert_eq!(before, 3, "web, db and agent written once each");

    // Drift: somebody removes an annotation; it is back within seconds, before the Deployment
    // controller has observed the drifted template (none runs here), so no rollout of it
    // starts. (The object the patch returns shows the removal: a read after it may already
    // see it restored.)
    let patched = deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"template": {"metadata": {"annotations": {PROXY_MEMORY_LIMIT: null}}}}})),
        )
        .await
        .unwrap();
    assert!(!template_annotations(&patched).contains_key(PROXY_MEMORY_LIMIT));
    let removed = Instant::now();
    common::eventually(10, "annotation restored", || async {
        let a = annotations_of(c, &inj, "web").await;
        (a.get(PROXY_MEMORY_LIMIT).map(String::as_str) == Some("256Mi")).then_some(())
    })
    .await;
    let restored = removed.elapsed();
    assert_eq!(
        annotations_of(c, &inj, "web").await["prometheus.io/scrape"],
        "true"
    );
    eprintln!("timings: first write {first_write:?}, drift restored in {restored:?}");
    op.stop().await;
}

/// A namespace whose `istio.io/rev` names no istiod revision and no revision tag gets no
/// sidecar from Istio's injector: it is reported, and its workloads are not rolled out for
/// sidecar resources. A revision tag created later (Istio's own rendered tag webhook, `prod`
/// pointing at revision `canary`) makes the same label resolve, and the workload is held.
#[tokio::test]
async fn revision_labels_resolve_against_live_revisions_and_tags() {
    let env = common::env("sc-rev").await;
    let c = &env.client;
    let istio = env.namespace("istio", &[]).await;
    let rendered = common::render_istiod(
        "istiod-canary",
        &istio,
        &["revision=canary", "revisionTags={prod}"],
    );
    env.load_manifests(&rendered, &istio, &["Deployment"]).await;
    let gone = ns(&env, "gone", &[("istio.io/rev", "gone")]).await;
    let tagged = ns(&env, "tagged", &[("istio.io/rev", "prod")]).await;
    for n in [&gone, &tagged] {
        deployment(c, n, "a", 1).await;
    }
    let op = env.start_operator().await;
    env.create_policy("p", &policy_spec(&env, "Enforce", 5))
        .await;

    // Step 1: neither label resolves (no tag `prod` yet, no revision `gone`).
    let p = wait_reason(&env, "p", "UnknownRevision", 30).await;
    let check_reported = |p: &MeshPolicy, namespaces: &[&String]| {
        let status = p.status.as_ref().unwrap();
        for n in namespaces {
            let v = status
                .violations
                .iter()
                .find(|v| v.object == format!("Namespace/{n}"))
                .unwrap_or_else(|| panic!("{n} reported: {:?}", status.violations));
            assert!(
                v.message.contains("names no istiod revision"),
                "{}",
                v.message
            );
        }
    };
    check_reported(&p, &[&gone, &tagged]);
    for n in [&gone, &tagged] {
        assert!(
            !has_four(&annotations_of(c, n, "a").await),
            "{n}: no rollout for a sidecar that is never injected"
        );
    }

    // Step 2: the tag appears; `prod` resolves to `canary`, `gone` still names nothing.
    let tags = common::create_revision_tags(c, &rendered).await;
    assert_eq!(tags.len(), 1, "{tags:?}");
    common::eventually(30, "the tagged namespace's workload is held", || async {
        has_four(&annotations_of(c, &tagged, "a").await).then_some(())
    })
    .await;
    // The annotations are written before the status of the same reconcile: wait for the
    // status that no longer reports the tagged namespace.
    let p = env
        .wait_policy("p", 15, |p| {
            let c = common::condition(p, "SidecarResources")?;
            let tagged_reported = p
                .status
                .as_ref()?
                .violations
                .iter()
                .any(|v| v.object == format!("Namespace/{tagged}"));
            (c.reason == "UnknownRevision" && !tagged_reported).then(|| p.clone())
        })
        .await;
    check_reported(&p, &[&gone]);
    let status = p.status.as_ref().unwrap();
    assert!(
        !status
            .violations
            .iter()
            .any(|v| v.object == format!("Namespace/{tagged}")),
        "{:?}",
        status.violations
    );
    assert!(!has_four(&annotations_of(c, &gone, "a").await));

    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(c.clone());
    for t in tags {
        mwcs.delete(&t, &Default::default()).await.unwrap();
    }
    op.stop().await;
}

/// maxConcurrentRollouts 1 with three Deployments: one at a time, the next only once the
/// previous one is rolled out; the pacing holds across an operator restart.
#[tokio::test]
async fn rollouts_are_paced_one_at_a_time() {
    let env = common::env("sc-pace").await;
    let c = &env.client;
    // The namespace's revision label names a revision that runs (an istiod Deployment).
    let istio = env.namespace("istio", &[]).await;
    env.load_fixture("istiod-default.yaml", &istio, &["Deployment"])
        .await;
    let ns = ns(&env, "apps", &[("istio.io/rev", "default")]).await;
    for name in ["a", "b", "c"] {
        deployment(c, &ns, name, 2).await;
    }
    let op = env.start_operator().await;
    env.create_policy("p", &policy_spec(&env, "Enforce", 1))
        .await;
    let changed = || async {
        let mut out = Vec::new();
        for name in ["a", "b", "c"] {
            if has_four(&annotations_of(c, &ns, name).await) {
                out.push(name.to_string());
            }
        }
        out
    };
    common::eventually(30, "first rollout", || async {
        (changed().await.len() == 1).then_some(())
    })
    .await;
    let p = wait_reason(&env, "p", "RolloutInProgress", 15).await;
    let status = p.status.clone().unwrap();
    assert_eq!(
        status
            .violations
            .iter()
            .filter(|v| v.action == "Held")
            .count(),
        2,
        "{:?}",
        status.violations
    );
    // Restart the operator: the pacing state comes from the cluster.
    op.stop().await;
    let op = env.start_operator().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let first = changed().await;
    assert_eq!(first.len(), 1, "still one rollout at a time: {first:?}");

    let mut done = Vec::new();
    for round in 1..=3 {
        let now = changed().await;
        assert_eq!(now.len(), round, "{now:?}");
        let current = now.iter().find(|n| !done.contains(*n)).unwrap().clone();
        // Not available yet: nothing else starts.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            changed().await.len(),
            round,
            "nothing starts while {current} rolls"
        );
        common::complete_rollout(c, &ns, &current).await;
        done.push(current);
        if round < 3 {
            common::eventually(15, "next rollout", || async {
                (changed().await.len() == round + 1).then_some(())
            })
            .await;
        }
    }
    wait_reason(&env, "p", "Compliant", 15).await;
    assert_eq!(common::operator_writes(Some(&ns), &[]).len(), 3);
    op.stop().await;
}

/// With `pacing: Off` every workload is written in one pass, without waiting for rollouts.
#[tokio::test]
async fn pacing_off_writes_every_workload_at_once() {
    let env = common::env("sc-nopace").await;
    let c = &env.client;
    let ns = ns(&env, "apps", &[("istio-injection", "enabled")]).await;
    for name in ["a", "b", "c", "d"] {
        deployment(c, &ns, name, 2).await;
    }
    let op = env.start_operator().await;
    let spec = policy_spec(&env, "Enforce", 1).replace(
        "maxConcurrentRollouts: 1",
        "maxConcurrentRollouts: 1, pacing: 'Off'",
    );
    env.create_policy("p", &spec).await;
    // No rollout is completed by the test: all four are written anyway.
    common::eventually(30, "every workload written", || async {
        let mut all = true;
        for name in ["a", "b", "c", "d"] {
            all &= has_four(&annotations_of(c, &ns, name).await);
        }
        all.then_some(())
    })
    .await;
    let p = wait_reason(&env, "p", "RolloutInProgress", 15).await;
    let status = p.status.clone().unwrap();
    assert!(
        status.violations.iter().all(|v| v.action != "Held"),
        "{:?}",
        status.violations
    );
    for name in ["a", "b", "c", "d"] {
        common::complete_rollout(c, &ns, name).await;
    }
    wait_reason(&env, "p", "Compliant", 15).await;
    assert_eq!(common::operator_writes(Some(&ns), &[]).len(), 4);
    op.stop().await;
}

/// A stalled rollout (ProgressDeadlineExceeded) stops the pacing and is reported.
#[tokio::test]
async fn a_stalled_rollout_stops_the_pacing() {
    let env = common::env("sc-stall").await;
    let c = &env.client;
    let ns = ns(&env, "apps", &[("istio-injection", "enabled")]).await;
    deployment(c, &ns, "a", 1).await;
    deployment(c, &ns, "b", 1).await;
    let op = env.start_operator().await;
    env.create_policy("p", &policy_spec(&env, "Enforce", 1))
        .await;
    common::eventually(30, "first rollout", || async {
        has_four(&annotations_of(c, &ns, "a").await).then_some(())
    })
    .await;
    let api: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    let d = api.get("a").await.unwrap();
    api.patch_status("a", &PatchParams::default(), &Patch::Merge(serde_json::json!({"status": {
        "observedGeneration": d.metadata.generation, "replicas": 2, "updatedReplicas": 1,
        "readyReplicas": 1, "availableReplicas": 1,
        "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
            "message": "ReplicaSet \"a-123\" has timed out progressing."}]}})))
        .await
        .unwrap();
    let p = wait_reason(&env, "p", "RolloutStalled", 15).await;
    let cond = condition(&p, "SidecarResources").unwrap();
    assert!(
        cond.message.contains(&format!("Deployment/{ns}/a")),
        "{}",
        cond.message
    );
    assert_eq!(cond.status, "False");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!has_four(&annotations_of(c, &ns, "b").await), "b waits");
    op.stop().await;
}

/// A namespace whose ResourceQuota cannot take the added sidecar resources is reported and
/// not written.
#[tokio::test]
async fn quota_conflict_is_reported_not_patched() {
    let env = common::env("sc-quota").await;
    let c = &env.client;
    let ns = ns(&env, "apps", &[("istio-injection", "enabled")]).await;
    deployment(c, &ns, "web", 3).await;
    common::apply_as(
        c,
        &format!("apiVersion: v1\nkind: ResourceQuota\nmetadata: {{name: small, namespace: {ns}}}\nspec: {{hard: {{limits.memory: 512Mi}}}}\n"),
        "kubectl",
    )
    .await;
    let op = env.start_operator().await;
    env.create_policy("p", &policy_spec(&env, "Enforce", 5))
        .await;
    let p = wait_reason(&env, "p", "QuotaConflict", 30).await;
    let status = p.status.clone().unwrap();
    let v = status
        .violations
        .iter()
        .find(|v| v.object == format!("Deployment/{ns}/web"))
        .expect("violation for web");
    assert_eq!(v.action, "Skipped");
    assert!(
        v.message.contains("ResourceQuota small limits.memory"),
        "{}",
        v.message
    );
    assert!(
        common::operator_writes(Some(&ns), &[]).is_empty(),
        "nothing written"
    );
    assert!(!has_four(&annotations_of(c, &ns, "web").await));
    op.stop().await;
}

/// Audit reports every deviation and writes nothing.
#[tokio::test]
async fn audit_writes_nothing() {
    let env = common::env("sc-audit").await;
    let c = &env.client;
    let ns = ns(&env, "apps", &[("istio-injection", "enabled")]).await;
    deployment(c, &ns, "a", 1).await;
    deployment(c, &ns, "b", 1).await;
    let op = env.start_operator().await;
    env.create_policy("p", &policy_spec(&env, "Audit", 1)).await;
    let p = wait_reason(&env, "p", "NonCompliant", 30).await;
    let status = p.status.clone().unwrap();
    assert_eq!(status.violation_count, 2, "{:?}", status.violations);
    assert!(status.violations.iter().all(|v| v.action == "Reported"));
    assert!(
        status.violations[0]
            .message
            .contains("sidecar.istio.io/proxyCPU is unset")
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(common::operator_writes(Some(&ns), &[]).is_empty());
    assert_eq!(op.writes(), 0);
    op.stop().await;
}

/// A Deployment written by the gateway HA rule (same field manager) is left to that rule.
#[tokio::test]
async fn workloads_of_the_ha_rule_are_left_alone() {
    let env = common::env("sc-ha").await;
    let c = &env.client;
    let ns = ns(&env, "apps", &[("istio-injection", "enabled")]).await;
    deployment(c, &ns, "edge", 1).await;
    deployment(c, &ns, "web", 1).await;
    // meshwarden already holds `edge` for another rule.
    let owner = testplane::shared().operator_client().await;
    Api::<Deployment>::namespaced(owner, &ns)
        .patch(
            "edge",
            &PatchParams::apply("meshwarden").force(),
            &Patch::Apply(serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment", "spec": {"replicas": 2}})),
        )
        .await
        .unwrap();
    let op = env.start_operator().await;
    env.create_policy("p", &policy_spec(&env, "Enforce", 5))
        .await;
    common::eventually(30, "web written", || async {
        has_four(&annotations_of(c, &ns, "web").await).then_some(())
    })
    .await;
    let p = env
        .wait_policy("p", 10, |p| {
            let c = condition(p, "SidecarResources")?;
            c.message
                .contains("left to meshwarden's HA rules")
                .then(|| p.clone())
        })
        .await;
    assert!(
        condition(&p, "SidecarResources")
            .unwrap()
            .message
            .contains(&format!("Deployment/{ns}/edge"))
    );
    let edge = Api::<Deployment>::namespaced(c.clone(), &ns)
        .get("edge")
        .await
        .unwrap();
    assert!(!template_annotations(&edge).contains_key(PROXY_CPU));
    assert_eq!(
        edge.spec.unwrap().replicas,
        Some(2),
        "the HA rule's field stays"
    );
    op.stop().await;
}

/// maxConcurrentRollouts 1: a paused Deployment is reported and written only once resumed; it
/// never takes the rollout slot from the others.
#[tokio::test]
async fn a_paused_deployment_is_reported_and_holds_no_slot() {
    let env = common::env("sc-paused").await;
    let c = &env.client;
    let ns = ns(&env, "apps", &[("istio-injection", "enabled")]).await;
    deployment(c, &ns, "a", 1).await;
    deployment(c, &ns, "b", 1).await;
    let api: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"paused": true}})),
    )
    .await
    .unwrap();
    let op = env.start_operator().await;
    env.create_policy("p", &policy_spec(&env, "Enforce", 1))
        .await;
    common::eventually(30, "b written", || async {
        has_four(&annotations_of(c, &ns, "b").await).then_some(())
    })
    .await;
    let p = env
        .wait_policy("p", 15, |p| {
            p.status
                .as_ref()?
                .violations
                .iter()
                .find(|v| v.object == format!("Deployment/{ns}/a"))
                .cloned()
        })
        .await;
    assert_eq!(p.action, "Held", "{p:?}");
    assert!(p.message.contains("paused"), "{}", p.message);
    assert!(
        !has_four(&annotations_of(c, &ns, "a").await),
        "a paused Deployment is not written"
    );
    op.stop().await;
}

/// maxConcurrentRollouts 1: a workload whose write is rejected (here by a
/// ValidatingAdmissionPolicy, as a policy engine would) is reported and queues behind the
/// others instead of taking the only slot on every pass.
#[tokio::test]
async fn a_failing_write_does_not_take_the_slot_from_the_others() {
    let env = common::env("sc-fail").await;
    let c = &env.client;
    let ns = ns(&env, "apps", &[("istio-injection", "enabled")]).await;
    deployment(c, &ns, "a", 1).await;
    deployment(c, &ns, "b", 1).await;
    let name = format!("{}-deny-a", env.id);
    common::deny(
        c,
        &name,
        ("apps", "deployments", "UPDATE"),
        (
            "object.metadata.name != 'a' || request.userInfo.username != 'meshwarden-operator'",
            "deployment a is frozen",
        ),
        &format!(
            "  matchResources:\n    namespaceSelector: {{matchLabels: {{meshwarden-test: {}}}}}\n",
            env.id
        ),
    )
    .await;
    // The binding takes effect asynchronously: wait until a write as the operator is denied.
    let op_client = testplane::shared().operator_client().await;
    common::eventually(30, "the admission policy denies writes to a", || async {
        let r = Api::<Deployment>::namespaced(op_client.clone(), &ns)
            .patch(
                "a",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"labels": {"probe": "1"}}})),
            )
            .await;
        r.is_err().then_some(())
    })
    .await;
    let op = env.start_operator().await;
    env.create_policy("p", &policy_spec(&env, "Enforce", 1))
        .await;
    common::eventually(30, "b written although a's write fails", || async {
        has_four(&annotations_of(c, &ns, "b").await).then_some(())
    })
    .await;
    assert!(!has_four(&annotations_of(c, &ns, "a").await));
    // The failed write is reported on its own target, with the server's denial, and names the
    // condition's reason.
    let a = format!("Deployment/{ns}/a");
    let p = env
        .wait_policy("p", 30, |p| {
            let v = p
                .status
                .as_ref()?
                .violations
                .iter()
                .find(|v| v.object == a)?;
            (v.action == "Skipped"
                && v.message.contains("the write failed")
                && v.message.contains("deployment a is frozen"))
            .then(|| p.clone())
        })
        .await;
    let cond = condition(&p, "SidecarResources").unwrap();
    assert_eq!(cond.reason, "WriteFailed", "{}", cond.message);
    assert_eq!(cond.status, "False");
    op.stop().await;
    common::delete_admission_policy(c, &name).await;
}

/// Plays the StatefulSet controller: writes `status` (merged) with the current generation
/// observed.
async fn statefulset_status(client: &Client, ns: &str, name: &str, status: serde_json::Value) {
    let api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let s = api.get(name).await.unwrap();
    let mut status = status;
    status["observedGeneration"] = serde_json::json!(s.metadata.generation);
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .unwrap();
}

/// A rollout stall is only a rollout meshwarden started that has not finished. A StatefulSet
/// meshwarden wrote and that rolled out completely, whose pod then becomes unready, holds no
/// rollout slot; a template change by someone else long after meshwarden's write is their
/// rollout, never reported stalled. maxConcurrentRollouts 1 throughout.
#[tokio::test]
async fn pod_churn_and_other_writers_rollouts_are_no_stall() {
    let env = common::env("sc-churn").await;
    let c = &env.client;
    let ns = ns(&env, "apps", &[("istio-injection", "enabled")]).await;
    workload(c, "StatefulSet", &ns, "s", 2, &[], &[], &[]).await;
    let api: Api<StatefulSet> = Api::namespaced(c.clone(), &ns);
    let op = env.start_operator().await;
    env.create_policy("p", &policy_spec(&env, "Enforce", 1))
        .await;
    let s = common::eventually(30, "s written", || async {
        let s = api.get("s").await.unwrap();
        let tpl = s.spec.as_ref()?.template.metadata.as_ref()?;
        has_four(tpl.annotations.as_ref()?).then_some(s)
    })
    .await;
    // The generation meshwarden's write produced is recorded on the workload.
    assert_eq!(
        s.metadata.annotations.as_ref().unwrap()[GENERATION_ANNOTATION],
        s.metadata.generation.unwrap().to_string()
    );
    let done = serde_json::json!({"replicas": 2, "readyReplicas": 2, "currentReplicas": 2,
        "updatedReplicas": 2, "availableReplicas": 2, "currentRevision": "s-2", "updateRevision": "s-2"});
    statefulset_status(c, &ns, "s", done.clone()).await;
    wait_reason(&env, "p", "Compliant", 15).await;

    // A pod of s becomes unready (a node drained): churn, not a rollout.
    let mut churn = done.clone();
    churn["readyReplicas"] = serde_json::json!(1);
    churn["availableReplicas"] = serde_json::json!(1);
    statefulset_status(c, &ns, "s", churn).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    deployment(c, &ns, "b", 1).await;
    let never_stalled = |p: &MeshPolicy| {
        let c = condition(p, "SidecarResources").unwrap();
        assert_ne!(c.reason, "RolloutStalled", "{}", c.message);
        assert!(!c.message.contains("StatefulSet/"), "{}", c.message);
    };
    common::eventually(15, "b written while s has an unready pod", || async {
        has_four(&annotations_of(c, &ns, "b").await).then_some(())
    })
    .await;
    never_stalled(&wait_reason(&env, "p", "RolloutInProgress", 15).await);
    common::complete_rollout(c, &ns, "b").await;
    never_stalled(&wait_reason(&env, "p", "Compliant", 15).await);

    // meshwarden's write is a day old; someone else changes s's template (a `helm upgrade`),
    // and that rollout has not finished: theirs, not meshwarden's.
    let s = api.get("s").await.unwrap();
    let mut fields = s.metadata.managed_fields.clone().unwrap();
    for m in fields.iter_mut() {
        if m.manager.as_deref() == Some("meshwarden") {
            m.time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24),
            ));
        }
    }
    api.patch(
        "s",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"managedFields": fields}})),
    )
    .await
    .unwrap();
    workload(c, "StatefulSet", &ns, "s", 2, &[("release", "2")], &[], &[]).await;
    let mut theirs = done.clone();
    theirs["updateRevision"] = serde_json::json!("s-3");
    theirs["updatedReplicas"] = serde_json::json!(0);
    statefulset_status(c, &ns, "s", theirs).await;
    deployment(c, &ns, "c", 1).await;
    common::eventually(
        15,
        "c written while someone else's rollout of s runs",
        || async { has_four(&annotations_of(c, &ns, "c").await).then_some(()) },
    )
    .await;
    never_stalled(&wait_reason(&env, "p", "RolloutInProgress", 15).await);
    op.stop().await;
}
