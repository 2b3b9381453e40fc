//! The resilience section on a real API server with Istio's own CRDs (from the base chart):
//! each finding appears when the DestinationRules that cause it are created and goes when they
//! are fixed, as istiod would resolve them (root `*.local`, a host-specific rule shadowing it,
//! a client-namespace rule, `exportTo: ["."]`, two rules of one host merged). One test of steps:
//! the root namespace's rules concern every test that reads them.
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use meshwarden::api::MeshPolicy;
use meshwarden::rules::resilience::cache::DestinationRule;

use crate::common::{self, Env, condition};

const LABEL: &str = "meshwarden-test-resilience";

pub async fn service(env: &Env, ns: &str, name: &str) {
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{ports: [{{port: 80}}], selector: {{app: {name}}}}}\n"
    );
    common::apply_as(&env.client, &yaml, "kubectl").await;
}

/// Applies a DestinationRule `name` in `ns` with `spec` (YAML flow mapping).
async fn rule(env: &Env, ns: &str, name: &str, spec: &str) {
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    );
    common::apply_as(&env.client, &yaml, "kubectl").await;
}

async fn delete_rule(env: &Env, ns: &str, name: &str) {
    Api::<DestinationRule>::namespaced(env.client.clone(), ns)
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
}

/// Waits for the `Resilience` condition of the current generation with `reason` and whose
/// violations satisfy `check`; returns the policy.
pub async fn wait_for(
    env: &Env,
    reason: &str,
    what: &str,
    check: impl Fn(&[(String, String)]) -> bool,
) -> MeshPolicy {
    env.wait_policy("p", 30, |p| {
        let c = condition(p, "Resilience")?;
        let violations: Vec<(String, String)> = p
            .status
            .as_ref()?
            .violations
            .iter()
            .filter(|v| v.rule == "Resilience")
            .map(|v| (v.object.clone(), v.message.clone()))
            .collect();
        let ok = c.reason == reason
            && c.observed_generation == p.metadata.generation
            && (c.status == "True") == violations.is_empty()
            && check(&violations);
        ok.then(|| p.clone())
    })
    .await;
    let p = Api::<MeshPolicy>::all(env.client.clone())
        .get(&env.policy_name("p"))
        .await
        .unwrap();
    eprintln!(
        "{what}: {:?}",
        condition(&p, "Resilience").map(|c| &c.message)
    );
    p
}

pub fn one(v: &[(String, String)], object: &str, parts: &[&str]) -> bool {
    v.len() == 1 && v[0].0 == object && parts.iter().all(|p| v[0].1.contains(p))
}

#[tokio::test]
async fn the_rule_istiod_applies_is_judged_and_each_finding_goes_when_fixed() {
    let env = common::env("resil").await;
    let id = env.id.clone();
    let shop = env.namespace("shop", &[(LABEL, &id)]).await;
    let web = env.namespace("web", &[(LABEL, &id)]).await;
    for name in ["reviews", "ratings"] {
        service(&env, &shop, name).await;
    }
    let _op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!("resilience: {{namespaceSelector: {{matchLabels: {{{LABEL}: {id}}}}}}}"),
    )
    .await;

    // No rule at all: both Services lack outlier detection, in one violation for the namespace.
    wait_for(&env, "MinimumsNotMet", "no rule", |v| {
        one(
            v,
            &format!("Namespace/{shop}"),
            &[
                "2 finding(s) for 2 Service(s)",
                "no DestinationRule applies lacks outlierDetection",
            ],
        )
    })
    .await;

    // A root-namespace *.local rule with outlier detection: every Service gets it.
    let root = format!("{id}-mesh");
    rule(
        &env,
        "istio-system",
        &root,
        "{host: '*.local', trafficPolicy: {outlierDetection: {consecutive5xxErrors: 5}}}",
    )
    .await;
    wait_for(&env, "Compliant", "root rule", |v| v.is_empty()).await;

    // A host-specific rule for reviews with TLS only: it takes nothing from *.local.
    rule(
        &env,
        &shop,
        "reviews",
        "{host: reviews, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}",
    )
    .await;
    wait_for(&env, "MinimumsNotMet", "shadowing", |v| {
        one(
            v,
            &format!("Namespace/{shop}"),
            &[
                "1 finding(s) for 1 Service(s)",
                &format!("reviews: DestinationRule {shop}/reviews (the service's namespace) lacks outlierDetection; it shadows outlierDetection of istio-system/{root}"),
            ],
        ) && !v[0].1.contains("ratings")
    })
    .await;

    // A second rule for the same host, newer, with outlier detection: merged, and the older
    // rule's trafficPolicy is the one that counts.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    rule(
        &env,
        &shop,
        "reviews-outliers",
        "{host: reviews, trafficPolicy: {outlierDetection: {consecutive5xxErrors: 3}}}",
    )
    .await;
    wait_for(&env, "MinimumsNotMet", "same-host merge", |v| {
        one(v, &format!("Namespace/{shop}"), &[&format!("DestinationRule {shop}/reviews + {shop}/reviews-outliers (the service's namespace) lacks outlierDetection")])
    })
    .await;
    delete_rule(&env, &shop, "reviews").await;
    wait_for(&env, "Compliant", "merged rule gone", |v| v.is_empty()).await;

    // A rule in the client's namespace wins over the Service's: judged for web's clients.
    rule(&env, &web, "reviews", &format!("{{host: reviews.{shop}.svc.cluster.local, trafficPolicy: {{loadBalancer: {{simple: LEAST_REQUEST}}}}}}")).await;
    wait_for(&env, "MinimumsNotMet", "client namespace", |v| {
        one(v, &format!("Namespace/{web}"), &[&format!("reviews (clients in {web}, calling {shop}/reviews): DestinationRule {web}/reviews (the client's namespace) lacks outlierDetection")])
    })
    .await;
    delete_rule(&env, &web, "reviews").await;
    wait_for(&env, "Compliant", "client rule gone", |v| v.is_empty()).await;

    // exportTo ".": the rule serves shop's own clients only; other namespaces keep the root's.
    rule(
        &env,
        &shop,
        "ratings",
        "{host: ratings, exportTo: ['.'], trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}",
    )
    .await;
    wait_for(&env, "MinimumsNotMet", "exportTo", |v| {
        one(
            v,
            &format!("Namespace/{shop}"),
            &["ratings (clients in its namespace)", "1 finding(s)"],
        )
    })
    .await;
    delete_rule(&env, &shop, "ratings").await;
    delete_rule(&env, &shop, "reviews-outliers").await;
    let p = wait_for(&env, "Compliant", "all fixed", |v| v.is_empty()).await;
    assert_eq!(p.status.as_ref().unwrap().targets, 2);

    // Report only: nothing written to the mesh.
    for ns in [&shop, &web] {
        assert!(
            common::operator_writes(Some(ns), &[]).is_empty(),
            "wrote into {ns}"
        );
    }
    assert!(common::operator_writes(Some("istio-system"), &[&root]).is_empty());
    delete_rule(&env, "istio-system", &root).await;
}

/// Applies a StatefulSet `name` in `ns` whose template has `grace` seconds and the proxy
/// config `proxy_config` (JSON), and, the first time, a running pod of it with an injected
/// proxy, native (an init container that restarts always) or not.
async fn workload(env: &Env, ns: &str, name: &str, grace: u32, proxy_config: &str, native: bool) {
    stateful_set(env, ns, name, grace, proxy_config).await;
    running_pod(env, ns, name, native).await;
}

/// Applies a StatefulSet `name` in `ns` whose template has `grace` seconds and the proxy
/// config `proxy_config` (JSON), without pods (no controller runs here).
pub async fn stateful_set(env: &Env, ns: &str, name: &str, grace: u32, proxy_config: &str) {
    let yaml = format!(
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  serviceName: {name}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata:\n      labels: {{app: {name}}}\n      annotations: {{proxy.istio.io/config: '{proxy_config}'}}\n    spec:\n      terminationGracePeriodSeconds: {grace}\n      containers: [{{name: app, image: registry.example/app:1}}]\n"
    );
    common::apply_as(&env.client, &yaml, "kubectl").await;
}

/// Creates the running pod `<name>-0` of StatefulSet `name` in `ns`, with an injected proxy,
/// native (an init container that restarts always) or not, unless it exists.
pub async fn running_pod(env: &Env, ns: &str, name: &str, native: bool) {
    let sts = Api::<StatefulSet>::namespaced(env.client.clone(), ns)
        .get(name)
        .await
        .unwrap();
    let proxy =
        serde_json::json!({"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.31.0"});
    let (containers, init) = if native {
        let mut p = proxy;
        p["restartPolicy"] = "Always".into();
        (
            serde_json::json!([{"name": "app", "image": "registry.example/app:1"}]),
            serde_json::json!([p]),
        )
    } else {
        (
            serde_json::json!([{"name": "app", "image": "registry.example/app:1"}, proxy]),
            serde_json::json!([]),
        )
    };
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{name}-0"), "namespace": ns, "labels": {"app": name},
            "annotations": {"sidecar.istio.io/status": "{}"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": name,
                                 "uid": sts.metadata.uid, "controller": true}]
        },
        "spec": {"containers": containers, "initContainers": init}
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    if pods.get_opt(&format!("{name}-0")).await.unwrap().is_some() {
        return;
    }
    pods.create(&Default::default(), &pod).await.unwrap();
    pods.patch_status(
        &format!("{name}-0"),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap();
}

/// Applies a VirtualService `name` in `ns` with `spec` (YAML flow mapping).
async fn virtual_service(env: &Env, ns: &str, name: &str, spec: &str) {
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    );
    common::apply_as(&env.client, &yaml, "kubectl").await;
}

#[tokio::test]
async fn mesh_routes_without_a_timeout_and_drains_reaching_the_grace_period_are_reported() {
    let env = common::env("resil-rt").await;
    let id = env.id.clone();
    let ns = env.namespace("apps", &[(LABEL, &id)]).await;
    // Proxies drain 10s, against a grace period of 10s; a native sidecar is never judged.
    workload(
        &env,
        &ns,
        "db",
        10,
        r#"{"terminationDrainDuration": "10s"}"#,
        false,
    )
    .await;
    workload(
        &env,
        &ns,
        "cache",
        1,
        r#"{"terminationDrainDuration": "10s"}"#,
        true,
    )
    .await;
    let to = format!("[{{destination: {{host: reviews.{ns}.svc.cluster.local}}}}]");
    // A mesh route without a timeout, one with; a gateway-only VirtualService is not judged.
    virtual_service(
        &env,
        &ns,
        "reviews",
        &format!("{{hosts: [reviews], http: [{{route: {to}}}, {{route: {to}, timeout: 2s}}]}}"),
    )
    .await;
    virtual_service(
        &env,
        &ns,
        "edge",
        &format!("{{hosts: [shop.example], gateways: [{ns}/ingress], http: [{{route: {to}}}]}}"),
    )
    .await;
    let _op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!("resilience: {{outlierDetection: 'Off', routeTimeouts: Required, namespaceSelector: {{matchLabels: {{{LABEL}: {id}}}}}}}"),
    )
    .await;
    let object = format!("Namespace/{ns}");
    wait_for(&env, "MinimumsNotMet", "both", |v| {
        one(
            v,
            &object,
            &[
                "1 HTTP route(s) without a timeout in 1 VirtualService(s): reviews (1 of 2 routes)",
                "1 workload(s) whose proxy drain reaches the grace period: StatefulSet/db: the proxy drains 10s against a grace period of 10s",
            ],
        ) && !v[0].1.contains("edge")
            && !v[0].1.contains("cache")
    })
    .await;

    // The route gets a timeout; the drain waits for idle connections instead: bounded only by
    // the grace period.
    virtual_service(&env, &ns, "reviews", &format!("{{hosts: [reviews], http: [{{route: {to}, timeout: 5s}}, {{route: {to}, timeout: 2s}}]}}")).await;
    workload(
        &env,
        &ns,
        "db",
        10,
        r#"{"proxyMetadata": {"EXIT_ON_ZERO_ACTIVE_CONNECTIONS": "true"}}"#,
        false,
    )
    .await;
    wait_for(&env, "MinimumsNotMet", "exit on zero", |v| {
        one(v, &object, &["StatefulSet/db: with EXIT_ON_ZERO_ACTIVE_CONNECTIONS the proxy drains 5s and then until the last connection closes"])
            && !v[0].1.contains("VirtualService")
    })
    .await;

    // A fixed drain shorter than the grace period: compliant.
    workload(
        &env,
        &ns,
        "db",
        30,
        r#"{"terminationDrainDuration": "20s"}"#,
        false,
    )
    .await;
    let p = wait_for(&env, "Compliant", "fixed", |v| v.is_empty()).await;
    let message = &condition(&p, "Resilience").unwrap().message;
    assert!(
        message.contains("every one of 2 mesh HTTP route(s) sets a timeout"),
        "{message}"
    );
    assert!(
        message
            .contains("every one of 1 workload(s) with a sidecar drains within its grace period"),
        "{message}"
    );
    assert!(
        common::operator_writes(Some(&ns), &[]).is_empty(),
        "wrote into {ns}"
    );
}
