//! The security section on a real API server with Istio's own CRDs: default deny from real
//! AuthorizationPolicies, and the CA mode from istiod's Deployment (Istio's chart rendered)
//! and the metadata of real Secrets, in an istiod namespace of the test's own
//! (tests/steady_state.rs checks that the operator's only requests on Secrets are lists and
//! watches by name).
use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use meshwarden::api::MeshPolicy;

use crate::common::{self, Env, condition};

const LABEL: &str = "meshwarden-test-security";

/// Waits for the `Security` condition of the current generation with `reason` and the
/// violations' objects `objects` (in any order); returns the condition's message.
async fn wait_for(env: &Env, reason: &str, objects: &[String]) -> String {
    let mut objects = objects.to_vec();
    objects.sort();
    env.wait_policy("p", 30, |p: &MeshPolicy| {
        let c = condition(p, "Security")?;
        let mut got: Vec<String> = p
            .status
            .as_ref()?
            .violations
            .iter()
            .filter(|v| v.rule == "Security")
            .map(|v| v.object.clone())
            .collect();
        got.sort();
        (c.reason == reason && c.observed_generation == p.metadata.generation && got == objects)
            .then(|| c.message.clone())
    })
    .await
}

async fn allow_nothing(env: &Env, ns: &str) {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-nothing, namespace: {ns}}}\nspec: {{}}\n"
    );
    common::apply_as(&env.client, &yaml, "kubectl").await;
}

fn ca_metric(op: &common::Operator, policy: &str) -> Option<String> {
    op.state
        .ctx
        .metrics
        .encode()
        .lines()
        .find(|l| l.starts_with("meshwarden_ca_mode{") && l.contains(policy) && l.ends_with(" 1"))
        .map(str::to_string)
}

#[tokio::test]
async fn default_deny_and_the_ca_mode_are_reported_from_what_exists() {
    let env = common::env("sec").await;
    let id = env.id.clone();
    let istio = env.namespace("istio", &[]).await;
    env.load_manifests(
        &common::istio_fixture("istiod-default.yaml"),
        &istio,
        &["Deployment"],
    )
    .await;
    let a = env.namespace("a", &[(LABEL, &id)]).await;
    let b = env.namespace("b", &[(LABEL, &id)]).await;
    let op = env.start_operator_in(&istio).await;
    env.create_policy(
        "p",
        &format!("security: {{namespaceSelector: {{matchLabels: {{{LABEL}: {id}}}}}}}"),
    )
    .await;
    let ns = |n: &str| format!("Namespace/{n}");
    let ca = format!("CA/{istio}");

    // Nothing: neither namespace denies by default, and istiod has no cacerts (self-signed).
    let m = wait_for(&env, "DefaultDenyMissing", &[ns(&a), ns(&b), ca.clone()]).await;
    assert!(m.contains("default deny in 0 of 2"), "{m}");
    assert!(m.contains("CA: self-signed (no Secret cacerts"), "{m}");
    assert!(m.contains("outboundTrafficPolicy: ALLOW_ANY"), "{m}");

    // An allow-nothing policy in a: only b is left.
    allow_nothing(&env, &a).await;
    wait_for(&env, "DefaultDenyMissing", &[ns(&b), ca.clone()]).await;
    // One in the root namespace (istiod's, as no mesh config names another): every namespace.
    allow_nothing(&env, &istio).await;
    let m = wait_for(&env, "SelfSignedCA", std::slice::from_ref(&ca)).await;
    assert!(
        m.contains(&format!("default deny mesh-wide ({istio}/allow-nothing)")),
        "{m}"
    );

    // A plugged-in CA: cacerts made by an admin.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &istio);
    let data = |keys: &[&str]| -> BTreeMap<String, ByteString> {
        keys.iter()
            .map(|k| (k.to_string(), ByteString(b"not a real key".to_vec())))
            .collect()
    };
    let mut cacerts = Secret {
        data: Some(data(&[
            "ca-cert.pem",
            "ca-key.pem",
            "root-cert.pem",
            "cert-chain.pem",
        ])),
        ..Default::default()
    };
    cacerts.metadata.name = Some("cacerts".into());
    let pp = PostParams {
        field_manager: Some("kubectl-create".into()),
        ..Default::default()
    };
    secrets.create(&pp, &cacerts).await.unwrap();
    let m = wait_for(&env, "Compliant", &[]).await;
    assert!(
        m.contains(&format!("CA: plugged-in (Secret {istio}/cacerts)")),
        "{m}"
    );
    assert!(
        ca_metric(&op, &env.policy_name("p")).is_some_and(|l| l.contains("mode=\"plugged-in\"")),
        "{}",
        op.state.ctx.metrics.encode()
    );

    // The key istiod adds to a cacerts it generated: self-signed again.
    secrets
        .patch(
            "cacerts",
            &PatchParams::apply("pilot-discovery"),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "cacerts", "namespace": istio},
                "data": {"istio-generated": ""}
            })),
        )
        .await
        .unwrap();
    let m = wait_for(&env, "SelfSignedCA", std::slice::from_ref(&ca)).await;
    assert!(
        m.contains("generated by istiod (key istio-generated)"),
        "{m}"
    );
    assert!(
        ca_metric(&op, &env.policy_name("p")).is_some_and(|l| l.contains("mode=\"self-signed\"")),
    );

    op.stop().await;
}
