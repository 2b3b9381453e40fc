//! The resilience section on a real API server with Istio's own CRDs (from the base chart):
//! each finding appears when the DestinationRules that cause it are created and goes when they
//! are fixed, as istiod would resolve them (root `*.local`, a host-specific rule shadowing it,
//! a client-namespace rule, `exportTo: ["."]`, two rules of one host merged). One test of steps:
//! the root namespace's rules concern every test that reads them.
use std::time::Duration;

use kube::api::{Api, DeleteParams};
use meshwarden::api::MeshPolicy;
use meshwarden::rules::resilience::cache::DestinationRule;

use crate::common::{self, Env, condition};

const LABEL: &str = "meshwarden-test-resilience";

async fn service(env: &Env, ns: &str, name: &str) {
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
async fn wait_for(
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

fn one(v: &[(String, String)], object: &str, parts: &[&str]) -> bool {
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
