//! Mutual TLS against a real API server with Istio's CRDs.
//!
//! Every test has its own namespaces, and its own root namespace. Tests run in parallel on one
//! API server, so two rules keep them apart: pods without a sidecar count for every policy
//! that declares STRICT (held at PERMISSIVE without `force`, reported as cut off with it), so
//! every test here holds [`PLAIN_PODS`] and removes the pods without a sidecar it created;
//! and weaker overrides of other tests are only reported (`overrides: Report`, the default) by
//! Mesh-scope policies, never rewritten.
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use meshwarden::api::MeshPolicy;
use meshwarden::rules::mtls::{PeerAuthentication, exemption_name};
use serde_json::json;

use crate::common::{self, Env, condition};

/// Held by every test: they create pods without a sidecar or declare STRICT.
static PLAIN_PODS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn pas(client: &Client, ns: &str) -> Api<PeerAuthentication> {
    Api::namespaced(client.clone(), ns)
}

fn mode(pa: &PeerAuthentication) -> Option<String> {
    pa.spec.mtls.as_ref().and_then(|m| m.mode.clone())
}

fn managers(pa: &PeerAuthentication) -> Vec<String> {
    pa.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect()
}

/// Server-side applies a PeerAuthentication as a user would (manager `kubectl`).
async fn user_pa(client: &Client, ns: &str, name: &str, spec: serde_json::Value) {
    let obj = json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    });
    pas(client, ns)
        .patch(
            name,
            &PatchParams::apply("kubectl").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap();
}

async fn create_pod(client: &Client, ns: &str, name: &str, injected: bool) {
    let mut annotations = serde_json::Map::new();
    if injected {
        annotations.insert("sidecar.istio.io/status".into(), json!("{}"));
    }
    let pod = json!({"metadata": {"labels": {"app": name}, "annotations": annotations}});
    plain_pod(client, ns, name, pod).await;
}

/// Creates pod `name` in `ns`; `extra` is merged into it (metadata and spec, one level deep).
async fn plain_pod(client: &Client, ns: &str, name: &str, extra: serde_json::Value) {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    });
    for part in ["metadata", "spec"] {
        if let (Some(to), Some(from)) = (pod[part].as_object_mut(), extra[part].as_object()) {
            to.extend(from.clone());
        }
    }
    let pod: Pod = serde_json::from_value(pod).unwrap();
    Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
}

/// Waits for the MutualTLS condition of the current generation to have `reason`.
async fn wait_reason(env: &Env, policy: &str, reason: &str, secs: u64) -> MeshPolicy {
    env.wait_policy(policy, secs, |p| {
        let c = condition(p, "MutualTLS")?;
        (c.reason == reason && p.status.as_ref()?.observed_generation == p.metadata.generation)
            .then(|| p.clone())
    })
    .await
}

async fn wait_mode(client: &Client, ns: &str, name: &str, want: &str, secs: u64) -> Duration {
    let start = Instant::now();
    let api = pas(client, ns);
    common::eventually(secs, &format!("{ns}/{name} mode {want}"), || async {
        let pa = api.get_opt(name).await.unwrap()?;
        (mode(&pa).as_deref() == Some(want)).then_some(())
    })
    .await;
    start.elapsed()
}

async fn patch_policy(env: &Env, name: &str, patch: serde_json::Value) {
    Api::<MeshPolicy>::all(env.client.clone())
        .patch(
            &env.policy_name(name),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn mesh_scope_is_created_and_drift_is_corrected() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-mesh").await;
    let root = env.namespace("root", &[]).await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!("enforcement: Enforce\nmtls: {{mode: PERMISSIVE, rootNamespace: {root}}}"),
    )
    .await;
    let p = env
        .wait_policy("p", 30, |p| {
            let c = condition(p, "MutualTLS")?;
            (c.status == "True").then(|| p.clone())
        })
        .await;
    let c = condition(&p, "MutualTLS").unwrap();
    assert!(
        c.message.contains("mode PERMISSIVE for the mesh"),
        "{}",
        c.message
    );
    let api = pas(&env.client, &root);
    let all = api.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(all.len(), 1, "exactly one mesh-wide object");
    let pa = &all[0];
    assert_eq!(pa.name_any(), "meshwarden-mtls");
    assert!(pa.spec.selector.is_none(), "selector-less");
    assert_eq!(mode(pa).as_deref(), Some("PERMISSIVE"));
    assert_eq!(pa.labels()["app.kubernetes.io/managed-by"], "meshwarden");
    assert_eq!(pa.labels()["meshwarden.io/policy"], env.policy_name("p"));
    assert!(
        pa.owner_references().is_empty(),
        "a PERMISSIVE object is not owned: the garbage collector must not remove it with the policy"
    );

    // Somebody edits the mode: it is restored within seconds.
    api.patch(
        "meshwarden-mtls",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"mtls": {"mode": "DISABLE"}}})),
    )
    .await
    .unwrap();
    let edited = wait_mode(&env.client, &root, "meshwarden-mtls", "PERMISSIVE", 10).await;

    // Somebody deletes it: it is recreated within seconds.
    api.delete("meshwarden-mtls", &Default::default())
        .await
        .unwrap();
    let deleted = wait_mode(&env.client, &root, "meshwarden-mtls", "PERMISSIVE", 10).await;
    println!("mesh drift corrected: edit in {edited:?}, delete in {deleted:?}");
    assert!(
        !common::operator_writes(Some(&root), &[]).is_empty(),
        "the writes came from the operator"
    );
    op.stop().await;
}

#[tokio::test]
async fn namespaces_scope_over_twenty_namespaces() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-many").await;
    let team = env.id.clone();
    let mut names = Vec::new();
    for i in 0..20 {
        names.push(env.namespace(&format!("n{i}"), &[("team", &team)]).await);
    }
    let other = env.namespace("other", &[]).await;
    let op = env.start_operator().await;
    let started = Instant::now();
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\nmtls: {{mode: STRICT, force: true, scope: Namespaces, namespaceSelector: {{matchLabels: {{team: {team}}}}}}}"
        ),
    )
    .await;
    env.wait_policy("p", 60, |p| {
        let s = p.status.as_ref()?;
        (s.targets == 20 && s.compliant == 20 && condition(p, "MutualTLS")?.status == "True")
            .then_some(())
    })
    .await;
    println!("20 namespaces held in {:?}", started.elapsed());
    for ns in &names {
        let pa = pas(&env.client, ns).get("meshwarden-mtls").await.unwrap();
        assert_eq!(mode(&pa).as_deref(), Some("STRICT"), "{ns}");
    }
    assert!(
        pas(&env.client, &other)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "an unselected namespace is left alone"
    );

    // A namespace joining the selector gets its object; one leaving it loses ours.
    let ns_api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.client.clone());
    ns_api
        .patch(
            &other,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": team}}})),
        )
        .await
        .unwrap();
    let joined = wait_mode(&env.client, &other, "meshwarden-mtls", "STRICT", 10).await;
    ns_api
        .patch(
            &names[0],
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": null}}})),
        )
        .await
        .unwrap();
    let start = Instant::now();
    let first = pas(&env.client, &names[0]);
    common::eventually(10, "object of the namespace that left removed", || async {
        first
            .get_opt("meshwarden-mtls")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    println!(
        "namespace joined in {joined:?}, left in {:?}",
        start.elapsed()
    );
    op.stop().await;
}

#[tokio::test]
async fn exemptions_are_rendered() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-exempt").await;
    let team = env.id.clone();
    let app = env.namespace("app", &[("team", &team)]).await;
    let legacy = env.namespace("legacy", &[("team", &team)]).await;
    let op = env.start_operator().await;
    let exemptions = format!(
        "[{{namespace: {legacy}}}, {{namespace: {app}, selector: {{matchLabels: {{app: pay}}}}, mode: STRICT, ports: [{{port: 8080, mode: PERMISSIVE}}]}}]"
    );
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\nmtls: {{mode: STRICT, force: true, scope: Namespaces, namespaceSelector: {{matchLabels: {{team: {team}}}}}, exemptions: {exemptions}}}"
        ),
    )
    .await;
    let p = env
        .wait_policy("p", 30, |p| {
            let c = condition(p, "MutualTLS")?;
            (c.status == "True" && p.status.as_ref()?.compliant == 3).then(|| p.clone())
        })
        .await;
    let spec = p.spec.mtls.clone().unwrap();
    let legacy_name = exemption_name(&spec.exemptions[0]);
    let pay_name = exemption_name(&spec.exemptions[1]);
    let c = condition(&p, "MutualTLS").unwrap();
    assert!(c.message.contains("exemptions:"), "{}", c.message);
    assert!(
        c.message
            .contains(&format!("namespace {legacy} PERMISSIVE")),
        "{}",
        c.message
    );
    assert!(c.message.contains(&pay_name), "{}", c.message);

    // The namespace exemption replaces the scope's object in that namespace.
    let in_legacy = pas(&env.client, &legacy)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert_eq!(in_legacy.len(), 1);
    assert_eq!(in_legacy[0].name_any(), legacy_name);
    assert!(in_legacy[0].spec.selector.is_none());
    assert_eq!(mode(&in_legacy[0]).as_deref(), Some("PERMISSIVE"));

    let pay = pas(&env.client, &app).get(&pay_name).await.unwrap();
    assert_eq!(
        pay.spec.selector.as_ref().unwrap().match_labels["app"],
        "pay"
    );
    assert_eq!(mode(&pay).as_deref(), Some("STRICT"));
    assert_eq!(
        pay.spec.port_level_mtls["8080"].mode.as_deref(),
        Some("PERMISSIVE")
    );
    assert_eq!(pay.labels()["meshwarden.io/policy"], env.policy_name("p"));
    assert_eq!(
        mode(&pas(&env.client, &app).get("meshwarden-mtls").await.unwrap()).as_deref(),
        Some("STRICT")
    );

    // Removing the exemptions removes their objects; legacy is back in the scope.
    patch_policy(&env, "p", json!({"spec": {"mtls": {"exemptions": null}}})).await;
    wait_mode(&env.client, &legacy, "meshwarden-mtls", "STRICT", 15).await;
    common::eventually(15, "exemption objects deleted", || async {
        let a = pas(&env.client, &legacy)
            .get_opt(&legacy_name)
            .await
            .unwrap();
        let b = pas(&env.client, &app).get_opt(&pay_name).await.unwrap();
        (a.is_none() && b.is_none()).then_some(())
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn users_default_is_corrected_in_place() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-inplace").await;
    let team = env.id.clone();
    let ns = env.namespace("app", &[("team", &team)]).await;
    user_pa(
        &env.client,
        &ns,
        "default",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    )
    .await;
    user_pa(
        &env.client,
        &ns,
        "api",
        json!({"selector": {"matchLabels": {"app": "api"}}, "portLevelMtls": {"9000": {"mode": "PERMISSIVE"}}}),
    )
    .await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\nmtls: {{mode: STRICT, force: true, overrides: Enforce, scope: Namespaces, namespaceSelector: {{matchLabels: {{team: {team}}}}}}}"
        ),
    )
    .await;
    let p = wait_reason(&env, "p", "FieldOwnedByOther", 30).await;
    let c = condition(&p, "MutualTLS").unwrap();
    assert!(
        c.message.contains("was managed by kubectl"),
        "{}",
        c.message
    );

    let api = pas(&env.client, &ns);
    let all = api.list(&ListParams::default()).await.unwrap().items;
    let names: Vec<String> = all.iter().map(|p| p.name_any()).collect();
    assert!(
        !names.contains(&"meshwarden-mtls".to_string()),
        "no second namespace-wide object: {names:?}"
    );
    let default = api.get("default").await.unwrap();
    assert_eq!(mode(&default).as_deref(), Some("STRICT"));
    assert!(
        !default.labels().contains_key("meshwarden.io/policy"),
        "a user's object is not relabelled"
    );
    let ours = default
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|m| m.manager.as_deref() == Some("meshwarden"))
        .unwrap();
    assert_eq!(
        ours.fields_v1.as_ref().unwrap().0,
        json!({"f:spec": {"f:mtls": {"f:mode": {}}}}),
        "meshwarden owns only spec.mtls.mode"
    );
    let port = api.get("api").await.unwrap();
    assert_eq!(
        port.spec.port_level_mtls["9000"].mode.as_deref(),
        Some("STRICT"),
        "the weaker port-level mode was raised"
    );
    assert!(port.spec.mtls.is_none(), "nothing else added");

    // A second, newer namespace-wide object is ignored by Istio: reported, not touched.
    user_pa(
        &env.client,
        &ns,
        "extra",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    )
    .await;
    let p = wait_reason(&env, "p", "CannotCorrect", 15).await;
    let v = &p.status.as_ref().unwrap().violations;
    assert!(
        v.iter()
            .any(|v| v.object == format!("PeerAuthentication/{ns}/extra")
                && v.message.contains("uses the oldest, default")
                && v.rule == "MutualTLS"),
        "{v:?}"
    );
    assert_eq!(
        mode(&api.get("extra").await.unwrap()).as_deref(),
        Some("PERMISSIVE")
    );
    assert!(!managers(&api.get("extra").await.unwrap()).contains(&"meshwarden".to_string()));
    op.stop().await;
}

/// Waits for policy `p` to report one pod without a sidecar cut off by the STRICT scope of
/// namespace `scope`: listed as `listed`, with the exemption of `exempt` to add.
async fn expect_cut_off(env: &Env, scope: &str, listed: &str, exempt: &str) {
    let p = wait_reason(env, "p", "ClientsCutOff", 15).await;
    let c = condition(&p, "MutualTLS").unwrap();
    assert_eq!(c.status, "False");
    for needle in [
        "1 pod(s) without a sidecar cannot connect",
        listed,
        &format!("  exemptions:\n  - namespace: {exempt}"),
    ] {
        assert!(
            c.message.contains(needle),
            "{needle:?} not in {}",
            c.message
        );
    }
    let v = &p.status.as_ref().unwrap().violations;
    assert!(
        v.iter().any(
            |v| v.object == format!("PeerAuthentication/{scope}/meshwarden-mtls")
                && v.message.contains("is STRICT and stays so")
        ),
        "{v:?}"
    );
}

#[tokio::test]
async fn pod_without_sidecar_holds_strict_until_exempted() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-hold").await;
    let team = env.id.clone();
    let app = env
        .namespace("app", &[("team", &team), ("istio-injection", "enabled")])
        .await;
    let legacy = env.namespace("legacy", &[]).await;
    create_pod(&env.client, &app, "web", true).await;
    create_pod(&env.client, &legacy, "cron", false).await;
    create_pod(&env.client, &legacy, "batch", false).await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\nmtls: {{mode: STRICT, scope: Namespaces, namespaceSelector: {{matchLabels: {{team: {team}}}}}}}"
        ),
    )
    .await;
    let p = wait_reason(&env, "p", "StrictHeld", 30).await;
    let c = condition(&p, "MutualTLS").unwrap();
    assert_eq!(c.status, "False");
    for needle in [
        "2 pod(s) without a sidecar",
        &format!("{legacy} (2: batch, cron)"),
        &format!("  exemptions:\n  - namespace: {legacy}"),
        "force: true",
    ] {
        assert!(
            c.message.contains(needle),
            "{needle:?} not in {}",
            c.message
        );
    }
    assert!(
        !c.message.contains(&format!("{app} (")),
        "the injected pod is no blocker: {}",
        c.message
    );
    let v = &p.status.as_ref().unwrap().violations;
    assert!(
        v.iter().any(
            |v| v.object == format!("PeerAuthentication/{app}/meshwarden-mtls")
                && v.action == "Held"
        ),
        "{v:?}"
    );
    assert_eq!(
        mode(&pas(&env.client, &app).get("meshwarden-mtls").await.unwrap()).as_deref(),
        Some("PERMISSIVE"),
        "held at PERMISSIVE"
    );

    // The exemption from the message releases the hold.
    let start = Instant::now();
    patch_policy(
        &env,
        "p",
        json!({"spec": {"mtls": {"exemptions": [{"namespace": legacy}]}}}),
    )
    .await;
    wait_mode(&env.client, &app, "meshwarden-mtls", "STRICT", 15).await;
    let p = env
        .wait_policy("p", 15, |p| {
            let c = condition(p, "MutualTLS")?;
            (c.status == "True" && p.status.as_ref()?.observed_generation == p.metadata.generation)
                .then(|| p.clone())
        })
        .await;
    println!("hold released in {:?}", start.elapsed());
    let spec = p.spec.mtls.clone().unwrap();
    let exempt = pas(&env.client, &legacy)
        .get(&exemption_name(&spec.exemptions[0]))
        .await
        .unwrap();
    assert_eq!(mode(&exempt).as_deref(), Some("PERMISSIVE"));

    // A new pod without a sidecar elsewhere once a scope is STRICT: the scope is never
    // weakened, and the pod is reported as cut off, with the exemption to add.
    let stray = env.namespace("stray", &[]).await;
    create_pod(&env.client, &stray, "tool", false).await;
    expect_cut_off(&env, &app, &format!("{stray} (1: tool)"), &stray).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        mode(&pas(&env.client, &app).get("meshwarden-mtls").await.unwrap()).as_deref(),
        Some("STRICT")
    );
    // Leave no pod without a sidecar behind for other tests' holds.
    for (ns, name) in [(&legacy, "cron"), (&legacy, "batch"), (&stray, "tool")] {
        Api::<Pod>::namespaced(env.client.clone(), ns)
            .delete(name, &Default::default())
            .await
            .unwrap();
    }
    op.stop().await;
}

/// `force` skips the hold, not the report: a pod without a sidecar that appears while the
/// forced STRICT is in force is reported as cut off, with the exemption that would let it in,
/// and the scope stays STRICT.
#[tokio::test]
async fn a_forced_strict_still_reports_the_clients_it_cuts_off() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-force").await;
    let team = env.id.clone();
    let app = env.namespace("app", &[("team", &team)]).await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\nmtls: {{mode: STRICT, force: true, scope: Namespaces, namespaceSelector: {{matchLabels: {{team: {team}}}}}}}"
        ),
    )
    .await;
    wait_mode(&env.client, &app, "meshwarden-mtls", "STRICT", 30).await;
    let compliant = |p: &MeshPolicy| {
        let c = condition(p, "MutualTLS")?;
        (c.status == "True").then_some(())
    };
    env.wait_policy("p", 15, compliant).await;

    let stray = env
        .namespace("stray", &[("istio-injection", "enabled")])
        .await;
    create_pod(&env.client, &stray, "tool", false).await;
    let listed =
        format!("{stray} (1: tool; injection is on there, so restarting them adds the sidecar)");
    expect_cut_off(&env, &app, &listed, &stray).await;
    assert_eq!(
        mode(&pas(&env.client, &app).get("meshwarden-mtls").await.unwrap()).as_deref(),
        Some("STRICT")
    );

    // Gone again: compliant.
    Api::<Pod>::namespaced(env.client.clone(), &stray)
        .delete("tool", &Default::default())
        .await
        .unwrap();
    env.wait_policy("p", 15, compliant).await;
    op.stop().await;
}

#[tokio::test]
async fn audit_writes_nothing() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-audit").await;
    let team = env.id.clone();
    let ns = env.namespace("app", &[("team", &team)]).await;
    let empty = env.namespace("empty", &[("team", &team)]).await;
    user_pa(
        &env.client,
        &ns,
        "default",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    )
    .await;
    user_pa(
        &env.client,
        &ns,
        "api",
        json!({"selector": {"matchLabels": {"app": "api"}}, "portLevelMtls": {"9000": {"mode": "PERMISSIVE"}}}),
    )
    .await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!(
            "mtls: {{mode: STRICT, force: true, scope: Namespaces, namespaceSelector: {{matchLabels: {{team: {team}}}}}, exemptions: [{{namespace: {ns}, selector: {{matchLabels: {{app: pay}}}}}}]}}"
        ),
    )
    .await;
    let p = wait_reason(&env, "p", "NonCompliant", 30).await;
    let c = condition(&p, "MutualTLS").unwrap();
    assert!(c.message.contains("Audit mode"), "{}", c.message);
    let v = &p.status.as_ref().unwrap().violations;
    let objects: Vec<&str> = v.iter().map(|v| v.object.as_str()).collect();
    for want in [
        format!("PeerAuthentication/{ns}/default"),
        format!("PeerAuthentication/{ns}/api"),
        format!("PeerAuthentication/{empty}/meshwarden-mtls"),
    ] {
        assert!(objects.contains(&want.as_str()), "{want} in {objects:?}");
    }
    assert!(v.iter().all(|v| v.action == "Reported"), "{v:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in [&ns, &empty] {
        assert!(
            common::operator_writes(Some(n), &[]).is_empty(),
            "Audit wrote to {n}"
        );
        for pa in pas(&env.client, n)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
        {
            assert!(
                !managers(&pa).contains(&"meshwarden".to_string()),
                "{} carries meshwarden's field manager",
                pa.name_any()
            );
        }
    }
    assert_eq!(op.writes(), 0);
    op.stop().await;
}

#[tokio::test]
async fn converged_mesh_costs_no_write() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-conv").await;
    let team = env.id.clone();
    let mut names = Vec::new();
    for i in 0..3 {
        names.push(env.namespace(&format!("n{i}"), &[("team", &team)]).await);
    }
    user_pa(
        &env.client,
        &names[0],
        "default",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    )
    .await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\nmtls: {{mode: STRICT, force: true, scope: Namespaces, namespaceSelector: {{matchLabels: {{team: {team}}}}}, exemptions: [{{namespace: {}, selector: {{matchLabels: {{app: pay}}}}, ports: [{{port: 8080, mode: PERMISSIVE}}]}}]}}",
            names[1]
        ),
    )
    .await;
    env.wait_policy("p", 30, |p| {
        let s = p.status.as_ref()?;
        (s.compliant == 4 && condition(p, "MutualTLS")?.status == "True").then_some(())
    })
    .await;
    env.wait_settled("p", 20).await;
    let count = || -> usize {
        names
            .iter()
            .map(|n| common::operator_writes(Some(n), &[]).len())
            .sum()
    };
    let before = count();
    let counted = op.writes();
    let status_before = common::operator_writes(None, &[&env.policy_name("p")]).len();
    let started = Instant::now();
    patch_policy(
        &env,
        "p",
        json!({"metadata": {"annotations": {"touch": "1"}}}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(), before, "no write to the mesh");
    assert_eq!(
        common::operator_writes(None, &[&env.policy_name("p")]).len(),
        status_before,
        "no status write either"
    );
    assert_eq!(op.writes(), counted, "the operator's own counter agrees");
    assert!(
        before >= 4,
        "three scopes and the exemption were written ({before})"
    );
    println!("converged reconcile checked in {:?}", started.elapsed());
    op.stop().await;
}

#[tokio::test]
async fn deleting_auditing_or_dropping_the_policy_never_makes_a_namespace_stricter() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-delete").await;
    let team = env.id.clone();
    let app = env.namespace("app", &[("team", &team)]).await;
    let legacy = env.namespace("legacy", &[("team", &team)]).await;
    // The user's own namespace-wide object: meshwarden corrects it in place to STRICT.
    user_pa(
        &env.client,
        &app,
        "default",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    )
    .await;
    let op = env.start_operator().await;
    let created = env
        .create_policy(
            "p",
            &format!(
                "enforcement: Enforce\nmtls: {{mode: STRICT, force: true, scope: Namespaces, namespaceSelector: {{matchLabels: {{team: {team}}}}}, exemptions: [{{namespace: {legacy}}}, {{namespace: {app}, selector: {{matchLabels: {{app: pay}}}}, mode: STRICT}}]}}"
            ),
        )
        .await;
    let uid = created.metadata.uid.clone().unwrap();
    let p = env
        .wait_policy("p", 30, |p| {
            let c = condition(p, "MutualTLS")?;
            (c.status == "True" && p.status.as_ref()?.compliant == 3).then(|| p.clone())
        })
        .await;
    let spec = p.spec.mtls.clone().unwrap();
    let legacy_name = exemption_name(&spec.exemptions[0]);
    let pay_name = exemption_name(&spec.exemptions[1]);
    assert_eq!(
        mode(&pas(&env.client, &app).get("default").await.unwrap()).as_deref(),
        Some("STRICT")
    );
    // What the garbage collector would remove with the policy is what carries its
    // ownerReference: never the exemption that lets legacy's plain-text clients in while the
    // user's `default` in app stays STRICT.
    let owned = |pa: &PeerAuthentication| pa.owner_references().iter().any(|o| o.uid == uid);
    let exempt = pas(&env.client, &legacy).get(&legacy_name).await.unwrap();
    assert_eq!(mode(&exempt).as_deref(), Some("PERMISSIVE"));
    assert!(
        !owned(&exempt),
        "a PERMISSIVE exemption is not owned by the policy: {:?}",
        exempt.owner_references()
    );
    let pay = pas(&env.client, &app).get(&pay_name).await.unwrap();
    assert!(
        owned(&pay),
        "a STRICT-only object is owned: removing it only weakens"
    );
    assert!(!owned(
        &pas(&env.client, &app).get("default").await.unwrap()
    ));

    let snapshot = || async {
        let mut out = Vec::new();
        for ns in [&app, &legacy] {
            for pa in pas(&env.client, ns)
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
            {
                out.push((pa.name_any(), mode(&pa)));
            }
        }
        out.sort();
        out
    };
    let before = snapshot().await;
    let writes = op.writes();

    // Audit: nothing is written or removed.
    patch_policy(&env, "p", json!({"spec": {"enforcement": "Audit"}})).await;
    env.wait_policy("p", 15, |p| {
        (p.status.as_ref()?.observed_generation == p.metadata.generation).then_some(())
    })
    .await;
    // The mtls section removed: nothing is written or removed either.
    patch_policy(
        &env,
        "p",
        json!({"spec": {"enforcement": "Enforce", "mtls": null}}),
    )
    .await;
    wait_reason(&env, "p", "NotConfigured", 15).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(snapshot().await, before);
    assert_eq!(op.writes(), writes, "no write to the mesh");

    // Deleted: no finalizer holds it, and nothing is written on the way out.
    Api::<MeshPolicy>::all(env.client.clone())
        .delete(&env.policy_name("p"), &Default::default())
        .await
        .unwrap();
    common::eventually(15, "policy gone", || async {
        Api::<MeshPolicy>::all(env.client.clone())
            .get_opt(&env.policy_name("p"))
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(snapshot().await, before);
    assert_eq!(op.writes(), writes);
    op.stop().await;
}

#[tokio::test]
async fn a_newer_mesh_wide_object_is_reported_and_never_displaces_the_applied_one() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-newer").await;
    let root = env.namespace("root", &[]).await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\nmtls: {{mode: STRICT, force: true, rootNamespace: {root}}}"
        ),
    )
    .await;
    wait_mode(&env.client, &root, "meshwarden-mtls", "STRICT", 30).await;
    // creationTimestamp has a resolution of one second: the user's object must be newer.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    user_pa(
        &env.client,
        &root,
        "default",
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    )
    .await;
    let id = format!("PeerAuthentication/{root}/default");
    let p = env
        .wait_policy("p", 15, |p| {
            p.status
                .as_ref()?
                .violations
                .iter()
                .find(|v| v.object == id)
                .cloned()
        })
        .await;
    assert!(
        p.message.contains("Istio uses the oldest, meshwarden-mtls"),
        "{}",
        p.message
    );
    let c = wait_reason(&env, "p", "CannotCorrect", 15).await;
    assert!(
        condition(&c, "MutualTLS").unwrap().message.contains(&id),
        "the condition names the newer object"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let api = pas(&env.client, &root);
    assert_eq!(
        mode(&api.get("meshwarden-mtls").await.unwrap()).as_deref(),
        Some("STRICT"),
        "the object Istio applies is kept"
    );
    let default = api.get("default").await.unwrap();
    assert_eq!(mode(&default).as_deref(), Some("PERMISSIVE"));
    assert!(!managers(&default).contains(&"meshwarden".to_string()));
    op.stop().await;
}

#[tokio::test]
async fn weaker_overrides_are_reported_not_rewritten_unless_enforced() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-override").await;
    let team = env.id.clone();
    let ns = env.namespace("app", &[("team", &team)]).await;
    user_pa(
        &env.client,
        &ns,
        "api",
        json!({"selector": {"matchLabels": {"app": "api"}}, "portLevelMtls": {"9000": {"mode": "PERMISSIVE"}}}),
    )
    .await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\nmtls: {{mode: STRICT, force: true, scope: Namespaces, namespaceSelector: {{matchLabels: {{team: {team}}}}}}}"
        ),
    )
    .await;
    let p = wait_reason(&env, "p", "OverridesReported", 30).await;
    let v = &p.status.as_ref().unwrap().violations;
    assert!(
        v.iter()
            .any(|v| v.object == format!("PeerAuthentication/{ns}/api")
                && v.message.contains("port 9000 is PERMISSIVE")
                && v.message.contains("overrides: Enforce")
                && v.action == "Reported"),
        "{v:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let api = pas(&env.client, &ns);
    let port = api.get("api").await.unwrap();
    assert_eq!(
        port.spec.port_level_mtls["9000"].mode.as_deref(),
        Some("PERMISSIVE")
    );
    assert!(!managers(&port).contains(&"meshwarden".to_string()));
    // The scope itself is held as declared.
    assert_eq!(
        mode(&api.get("meshwarden-mtls").await.unwrap()).as_deref(),
        Some("STRICT")
    );

    // Opting in raises it.
    patch_policy(
        &env,
        "p",
        json!({"spec": {"mtls": {"overrides": "Enforce"}}}),
    )
    .await;
    common::eventually(15, "port raised", || async {
        let pa = api.get("api").await.unwrap();
        (pa.spec.port_level_mtls["9000"].mode.as_deref() == Some("STRICT")).then_some(())
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn finished_pods_waypoints_and_gateways_hold_nothing_and_host_network_is_its_own_class() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-classes").await;
    let team = env.id.clone();
    let app = env
        .namespace("app", &[("team", &team), ("istio-injection", "enabled")])
        .await;
    let jobs = env.namespace("jobs", &[]).await;
    let mon = env.namespace("mon", &[]).await;
    // A Job's pod that finished: it will never send traffic again.
    plain_pod(
        &env.client,
        &jobs,
        "done",
        json!({"spec": {"restartPolicy": "Never"}}),
    )
    .await;
    Api::<Pod>::namespaced(env.client.clone(), &jobs)
        .patch_status(
            "done",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
        )
        .await
        .unwrap();
    // A waypoint and a gateway that istiod deployed: no sidecar, but they speak mTLS/HBONE.
    plain_pod(
        &env.client,
        &app,
        "waypoint",
        json!({"metadata": {"labels": {"gateway.istio.io/managed": "istio.io-mesh-controller", "istio.io/waypoint-for": "service", "istio.io/dataplane-mode": "none"}}}),
    )
    .await;
    plain_pod(
        &env.client,
        &app,
        "gateway",
        json!({"metadata": {"labels": {"gateway.istio.io/managed": "istio.io-gateway-controller"}}}),
    )
    .await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\nmtls: {{mode: STRICT, scope: Namespaces, namespaceSelector: {{matchLabels: {{team: {team}}}}}}}"
        ),
    )
    .await;
    wait_mode(&env.client, &app, "meshwarden-mtls", "STRICT", 30).await;
    // Corrected, then Compliant once the next reconcile reads its own write back: either
    // says that nothing holds STRICT back.
    env.wait_policy("p", 15, |p| {
        let c = condition(p, "MutualTLS")?;
        (c.status == "True" && ["Corrected", "Compliant"].contains(&c.reason.as_str()))
            .then_some(())
    })
    .await;

    // A pod on the host network appears: cut off, and said to be on the host network.
    plain_pod(
        &env.client,
        &mon,
        "exporter",
        json!({"spec": {"hostNetwork": true}}),
    )
    .await;
    let p = wait_reason(&env, "p", "ClientsCutOff", 15).await;
    let c = condition(&p, "MutualTLS").unwrap();
    assert!(
        c.message.contains(&format!(
            "{mon} (1: exporter; 1 on the host network, which no sidecar can capture)"
        )),
        "{}",
        c.message
    );
    for absent in ["done", "waypoint", "gateway"] {
        assert!(
            !c.message.contains(absent),
            "{absent} counted: {}",
            c.message
        );
    }
    // It goes away: the pod cache sees the deletion, the report ends.
    Api::<Pod>::namespaced(env.client.clone(), &mon)
        .delete("exporter", &Default::default())
        .await
        .unwrap();
    env.wait_policy("p", 15, |p| {
        (condition(p, "MutualTLS")?.status == "True").then_some(())
    })
    .await;
    for (ns, name) in [(&jobs, "done"), (&app, "waypoint"), (&app, "gateway")] {
        Api::<Pod>::namespaced(env.client.clone(), ns)
            .delete(name, &Default::default())
            .await
            .unwrap();
    }
    op.stop().await;
}

#[tokio::test]
async fn exemptions_select_namespaces_by_label() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-exsel").await;
    let team = env.id.clone();
    let app = env.namespace("app", &[("team", &team)]).await;
    let old1 = env
        .namespace("old1", &[("team", &team), ("legacy", &team)])
        .await;
    let old2 = env.namespace("old2", &[("legacy", &team)]).await;
    // Exactly one of namespace and namespaceSelector: the API server says so.
    let both = Api::<MeshPolicy>::all(env.client.clone())
        .create(
            &PostParams::default(),
            &serde_yaml::from_str(&format!(
                "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: {team}-bad}}\nspec:\n  mtls: {{mode: STRICT, exemptions: [{{namespace: {app}, namespaceSelector: {{matchLabels: {{legacy: {team}}}}}}}]}}"
            ))
            .unwrap(),
        )
        .await
        .unwrap_err();
    assert!(
        both.to_string()
            .contains("set exactly one of namespace and namespaceSelector"),
        "{both}"
    );
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\nmtls: {{mode: STRICT, force: true, scope: Namespaces, namespaceSelector: {{matchLabels: {{team: {team}}}}}, exemptions: [{{namespaceSelector: {{matchLabels: {{legacy: {team}}}}}}}]}}"
        ),
    )
    .await;
    wait_mode(&env.client, &app, "meshwarden-mtls", "STRICT", 30).await;
    for ns in [&old1, &old2] {
        let items = common::eventually(15, &format!("exemption in {ns}"), || async {
            let items = pas(&env.client, ns)
                .list(&ListParams::default())
                .await
                .unwrap()
                .items;
            (!items.is_empty()).then_some(items)
        })
        .await;
        assert_eq!(items.len(), 1, "{items:?}");
        assert!(items[0].name_any().starts_with("meshwarden-exemption-"));
        assert_eq!(mode(&items[0]).as_deref(), Some("PERMISSIVE"));
    }
    op.stop().await;
}

/// Waits for the MutualTLS condition of the current generation to say `text`.
async fn wait_message(env: &Env, policy: &str, text: &str, secs: u64) -> MeshPolicy {
    env.wait_policy(policy, secs, |p| {
        let c = condition(p, "MutualTLS")?;
        (c.message.contains(text)
            && p.status.as_ref()?.observed_generation == p.metadata.generation)
            .then(|| p.clone())
    })
    .await
}

/// No report of a root namespace mismatch. (Mesh-scope policies also report the weaker
/// overrides of other tests, so the condition need not be True.)
fn no_mismatch(p: &MeshPolicy) {
    let c = condition(p, "MutualTLS").unwrap();
    assert_ne!(c.reason, "RootNamespaceMismatch", "{}", c.message);
    let v = &p.status.as_ref().unwrap().violations;
    assert!(
        !v.iter().any(|v| v.object.starts_with("MeshPolicy/")),
        "{v:?}"
    );
}

/// What the condition says of a root namespace read from the mesh config `istio`.
fn from_mesh_config(istio: &str, config: &str) -> String {
    format!("root namespace {config}: meshConfig.rootNamespace in ConfigMap {istio}/istio")
}

/// The mesh-wide object meshwarden writes, in `ns`.
async fn mesh_object(client: &Client, ns: String) -> Option<PeerAuthentication> {
    pas(client, &ns).get_opt("meshwarden-mtls").await.unwrap()
}

/// Starts the operator with istiod's namespace `istio` and the policy `p` declaring STRICT
/// for the mesh (with `force`), and waits for its mesh-wide object in the root namespace the
/// mesh config names, `config`.
async fn forced_strict(env: &Env, istio: &str, config: &str) -> (common::Operator, MeshPolicy) {
    let op = env.start_operator_in(istio).await;
    env.create_policy(
        "p",
        "enforcement: Enforce\nmtls: {mode: STRICT, force: true}",
    )
    .await;
    wait_mode(&env.client, config, "meshwarden-mtls", "STRICT", 30).await;
    let p = wait_message(env, "p", &from_mesh_config(istio, config), 15).await;
    (op, p)
}

/// Istio's root namespace is `meshConfig.rootNamespace` of istiod's mesh config, not a guess:
/// with Istio's own chart rendered with `meshConfig.rootNamespace` set to another namespace,
/// the mesh-wide object lands there (and not in istiod's namespace). A policy that names
/// another root namespace is used as written, and the disagreement is reported, naming both.
#[tokio::test]
async fn the_root_namespace_is_read_from_the_mesh_config() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-root").await;
    let istio = env.namespace("istio", &[]).await;
    let config = env.namespace("config", &[]).await;
    let rendered = common::render_istiod(
        "istiod",
        &istio,
        &[&format!("meshConfig.rootNamespace={config}")],
    );
    let loaded = env
        .load_manifests(&rendered, &istio, &["ConfigMap", "Deployment"])
        .await;
    assert!(
        loaded >= 3,
        "istio, istio-sidecar-injector, istiod: {loaded}"
    );
    // Step 1: the mesh-wide STRICT object is in meshConfig's root namespace only.
    let (op, p) = forced_strict(&env, &istio, &config).await;
    let ours = |ns: String| mesh_object(&env.client, ns);
    let from_mesh_config = from_mesh_config(&istio, &config);
    no_mismatch(&p);
    assert!(
        ours(istio.clone()).await.is_none(),
        "nothing in istiod's namespace"
    );

    // Step 2: the policy names istiod's namespace instead: used as written, and reported.
    patch_policy(
        &env,
        "p",
        json!({"spec": {"mtls": {"rootNamespace": istio}}}),
    )
    .await;
    let p = wait_reason(&env, "p", "RootNamespaceMismatch", 30).await;
    let c = condition(&p, "MutualTLS").unwrap();
    assert_eq!(c.status, "False");
    for needle in [
        format!("mtls.rootNamespace is {istio}"),
        format!("Istio's root namespace is {config}"),
    ] {
        assert!(
            c.message.contains(&needle),
            "{needle:?} not in {}",
            c.message
        );
    }
    let v = &p.status.as_ref().unwrap().violations;
    assert!(
        v.iter()
            .any(|v| v.message.contains(&format!("set it to {config}"))),
        "{v:?}"
    );
    assert_eq!(
        mode(
            &ours(istio.clone())
                .await
                .expect("written where the policy says")
        )
        .as_deref(),
        Some("STRICT")
    );
    assert_eq!(
        mode(
            &ours(config.clone())
                .await
                .expect("the STRICT object in force stays")
        )
        .as_deref(),
        Some("STRICT"),
        "moving the root namespace never removes the mesh-wide object Istio applies"
    );

    // Step 3: the setting removed again: meshConfig's root namespace, no report.
    Api::<MeshPolicy>::all(env.client.clone())
        .patch(
            &env.policy_name("p"),
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([
                    {"op": "remove", "path": "/spec/mtls/rootNamespace"}
                ]))
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    let p = wait_message(&env, "p", &from_mesh_config, 30).await;
    no_mismatch(&p);
    common::eventually(15, "the object in istiod's namespace removed", || async {
        ours(istio.clone()).await.is_none().then_some(())
    })
    .await;
    assert_eq!(
        mode(&ours(config.clone()).await.unwrap()).as_deref(),
        Some("STRICT")
    );
    op.stop().await;
}

/// A pod without a sidecar in a namespace whose `istio.io/rev` names no revision or tag is
/// not told that a restart adds the sidecar: no injector matches that namespace.
#[tokio::test]
async fn a_revision_label_naming_nothing_is_not_counted_as_injection() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-gone").await;
    let root = env.namespace("root", &[]).await;
    let gone = env.namespace("gone", &[("istio.io/rev", "gone")]).await;
    let on = env.namespace("on", &[("istio-injection", "enabled")]).await;
    create_pod(&env.client, &gone, "legacy", false).await;
    create_pod(&env.client, &on, "old", false).await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!("enforcement: Enforce\nmtls: {{mode: STRICT, rootNamespace: {root}}}"),
    )
    .await;
    let p = wait_reason(&env, "p", "StrictHeld", 30).await;
    let c = condition(&p, "MutualTLS").unwrap();
    for needle in [
        format!(
            "{gone} (1: legacy; its istio.io/rev=gone names no live revision or tag, so restarting them adds no sidecar)"
        ),
        format!("{on} (1: old; injection is on there, so restarting them adds the sidecar)"),
    ] {
        assert!(
            c.message.contains(&needle),
            "{needle:?} not in {}",
            c.message
        );
    }
    for (ns, name) in [(&gone, "legacy"), (&on, "old")] {
        Api::<Pod>::namespaced(env.client.clone(), ns)
            .delete(name, &Default::default())
            .await
            .unwrap();
    }
    op.stop().await;
}

/// Istio's root namespace is never guessed for a write: when the mesh config that named it
/// goes away (deleted, as a `kubectl replace` or an installer that re-creates it does for a
/// moment), the mesh-wide object stays where it is, nothing is created in istiod's namespace,
/// and the condition says the writes are held, also after a restart of meshwarden (which then
/// has never seen the mesh config); with the mesh config back, all is as before.
#[tokio::test]
async fn a_mesh_config_gone_holds_the_writes_that_depend_on_the_root_namespace() {
    let _plain = PLAIN_PODS.lock().await;
    let env = common::env("mtls-meshgone").await;
    let istio = env.namespace("istio", &[]).await;
    let config = env.namespace("config", &[]).await;
    let maps: Api<ConfigMap> = Api::namespaced(env.client.clone(), &istio);
    let mesh_config = || -> ConfigMap {
        serde_json::from_value(json!({
            "metadata": {"name": "istio", "namespace": istio},
            "data": {"mesh": format!("rootNamespace: {config}\ntrustDomain: cluster.local\n")},
        }))
        .unwrap()
    };
    maps.create(&PostParams::default(), &mesh_config())
        .await
        .unwrap();
    let (op, _) = forced_strict(&env, &istio, &config).await;
    let ours = |ns: String| mesh_object(&env.client, ns);
    let from_mesh_config = from_mesh_config(&istio, &config);
    let uid = ours(config.clone()).await.unwrap().metadata.uid;

    // The mesh config is deleted: held, nothing moved.
    maps.delete("istio", &Default::default()).await.unwrap();
    let start = Instant::now();
    let held = loop {
        assert!(
            ours(istio.clone()).await.is_none(),
            "a mesh-wide object was created in istiod's namespace {istio}"
        );
        let kept = ours(config.clone()).await;
        assert_eq!(
            kept.and_then(|pa| pa.metadata.uid),
            uid,
            "the mesh-wide object in {config} was deleted"
        );
        let p = Api::<MeshPolicy>::all(env.client.clone())
            .get(&env.policy_name("p"))
            .await
            .unwrap();
        if let Some(c) = condition(&p, "MutualTLS")
            .filter(|c| c.reason == "RootNamespaceUnknown")
            .cloned()
        {
            break c;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the condition never said the writes are held: {:?}",
            condition(&p, "MutualTLS")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(held.message.contains("held"), "{}", held.message);
    assert!(
        held.message.contains(&format!("ConfigMap {istio}/istio")),
        "{}",
        held.message
    );
    // And stays so: no write at all while the root namespace is unknown.
    let writes = op.writes();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        op.writes(),
        writes,
        "no write while the root namespace is unknown"
    );
    assert!(ours(istio.clone()).await.is_none());
    assert_eq!(
        mode(&ours(config.clone()).await.unwrap()).as_deref(),
        Some("STRICT")
    );

    // meshwarden restarted while the mesh config is gone: it has never seen one, so the root
    // namespace would be assumed, but the mesh-wide object is elsewhere: still held.
    op.stop().await;
    let op = env.start_operator_in(&istio).await;
    let p = env
        .wait_policy("p", 30, |p| {
            condition(p, "MutualTLS")
                .filter(|c| {
                    c.reason == "RootNamespaceUnknown"
                        && c.message
                            .contains(&format!("mesh-wide object is in {config}"))
                })
                .cloned()
        })
        .await;
    assert!(p.message.contains("held"), "{}", p.message);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(op.writes(), 0, "no write after the restart");
    assert!(ours(istio.clone()).await.is_none());
    assert_eq!(ours(config.clone()).await.unwrap().metadata.uid, uid);

    // Restored: read from the mesh config again, the same object, nothing in istiod's
    // namespace.
    maps.create(&PostParams::default(), &mesh_config())
        .await
        .unwrap();
    wait_message(&env, "p", &from_mesh_config, 30).await;
    assert_eq!(ours(config.clone()).await.unwrap().metadata.uid, uid);
    assert!(ours(istio.clone()).await.is_none());
    op.stop().await;
}
