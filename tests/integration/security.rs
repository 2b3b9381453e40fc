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
    authz(env, ns, "allow-nothing", "{}").await;
}

/// An AuthorizationPolicy `name` in `ns` with `spec` (flow YAML).
async fn authz(env: &Env, ns: &str, name: &str, spec: &str) {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    );
    common::apply_as(&env.client, &yaml, "kubectl").await;
}

/// A test's environment with an istiod namespace of its own (Istio's chart rendered, the
/// Deployment only); returns it, the test's id and that namespace.
async fn with_istiod(prefix: &str) -> (Env, String, String) {
    let env = common::env(prefix).await;
    let id = env.id.clone();
    let istio = env.namespace("istio", &[]).await;
    env.load_manifests(
        &common::istio_fixture("istiod-default.yaml"),
        &istio,
        &["Deployment"],
    )
    .await;
    (env, id, istio)
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
    let (env, id, istio) = with_istiod("sec").await;
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

#[tokio::test]
async fn uncovered_workloads_and_l7_policies_without_a_waypoint_are_reported() {
    let (env, id, istio) = with_istiod("secwl").await;
    let web = env.namespace("web", &[(LABEL, &id)]).await;
    let amb = env
        .namespace(
            "amb",
            &[(LABEL, &id), ("istio.io/dataplane-mode", "ambient")],
        )
        .await;
    for name in ["frontend", "api"] {
        crate::sidecars::deployment(&env.client, &web, name, 1).await;
    }
    let select = |app: &str| {
        format!(
            "{{selector: {{matchLabels: {{app: {app}}}}}, rules: [{{from: [{{source: {{namespaces: [{web}]}}}}]}}]}}"
        )
    };
    authz(&env, &web, "frontend", &select("frontend")).await;
    // HTTP methods on workloads of an ambient namespace: ztunnel drops the rule.
    let get_only =
        "{selector: {matchLabels: {app: a}}, rules: [{to: [{operation: {methods: [GET]}}]}]}";
    authz(&env, &amb, "get-only", get_only).await;
    let op = env.start_operator_in(&istio).await;
    env.create_policy(
        "p",
        &format!(
            "security: {{namespaceSelector: {{matchLabels: {{{LABEL}: {id}}}}}, defaultDeny: PerWorkload, pluggedInCA: \"Off\"}}"
        ),
    )
    .await;
    let ns = format!("Namespace/{web}");
    let policies = format!("AuthorizationPolicies/{amb}");

    // api is selected by no policy; get-only needs a waypoint amb does not have.
    wait_for(&env, "DefaultDenyMissing", &[ns.clone(), policies.clone()]).await;
    let p: MeshPolicy = Api::all(env.client.clone())
        .get(&env.policy_name("p"))
        .await
        .unwrap();
    let message = |object: &str| {
        p.status
            .as_ref()
            .and_then(|s| s.violations.iter().find(|v| v.object == object))
            .map(|v| v.message.clone())
            .unwrap_or_default()
    };
    let m = message(&ns);
    assert!(
        m.contains("1 of its 2 workload(s)") && m.contains("(Deployment/api)"),
        "{m}"
    );
    let m = message(&policies);
    assert!(
        m.contains("get-only: HTTP attributes (methods)") && m.contains("it has no waypoint"),
        "{m}"
    );

    // api covered: only the ambient namespace is left.
    authz(&env, &web, "api", &select("api")).await;
    wait_for(
        &env,
        "L7PolicyWithoutWaypoint",
        std::slice::from_ref(&policies),
    )
    .await;
    // A new workload is uncovered again (workload events reach the section).
    crate::sidecars::deployment(&env.client, &web, "batch", 1).await;
    wait_for(&env, "DefaultDenyMissing", &[ns.clone(), policies.clone()]).await;
    authz(&env, &web, "batch", &select("batch")).await;
    wait_for(
        &env,
        "L7PolicyWithoutWaypoint",
        std::slice::from_ref(&policies),
    )
    .await;

    // The namespace names its waypoint: the violation says so.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.client.clone());
    namespaces
        .patch(
            &amb,
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"labels": {"istio.io/use-waypoint": "waypoint"}}}),
            ),
        )
        .await
        .unwrap();
    env.wait_policy("p", 30, |p: &MeshPolicy| {
        p.status
            .as_ref()?
            .violations
            .iter()
            .find(|v| {
                v.object == policies
                    && v.message
                        .contains("it has a waypoint (istio.io/use-waypoint: waypoint)")
            })
            .map(|v| v.message.clone())
    })
    .await;

    // The policy targets a waypoint instead: nothing is left.
    authz(
        &env,
        &amb,
        "get-only",
        "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], rules: [{to: [{operation: {methods: [GET]}}]}]}",
    )
    .await;
    let m = wait_for(&env, "Compliant", &[]).await;
    assert!(
        m.contains("default deny in 2 of 2 selected namespace(s) (namespace-wide or per workload)"),
        "{m}"
    );
    op.stop().await;
}
