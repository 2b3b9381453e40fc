//! Default deny, the egress mode and the CA mode, decided without a server.
use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;

use super::cache::{AuthorizationPolicy, Authz, istio_generated, reduce};
use super::plan::{CaMode, ca_mode, outbound_mode, plan, report};
use crate::api::{Requirement, SecuritySpec};
use crate::istio::Istiod;
use crate::status::conditions::Status;
use crate::status::reasons;

fn policy(spec: serde_json::Value) -> AuthorizationPolicy {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": spec,
    }))
    .unwrap()
}

#[test]
fn allow_nothing_and_deny_all_are_told_from_scoped_policies() {
    let kind = |spec| reduce(&policy(spec));
    use serde_json::json;
    assert_eq!(kind(json!({})), Authz::AllowNothing);
    assert_eq!(
        kind(json!({"action": "ALLOW", "rules": []})),
        Authz::AllowNothing
    );
    assert_eq!(
        kind(json!({"selector": {"matchLabels": {}}})),
        Authz::AllowNothing
    );
    assert_eq!(
        kind(json!({"action": "DENY", "rules": [{}]})),
        Authz::DenyAll
    );
    // Scoped to workloads, a waypoint, or allowing something: no default deny.
    assert_eq!(
        kind(json!({"selector": {"matchLabels": {"app": "a"}}})),
        Authz::Other
    );
    assert_eq!(
        kind(
            json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}]})
        ),
        Authz::Other
    );
    assert_eq!(kind(json!({"rules": [{}]})), Authz::Other);
    assert_eq!(
        kind(json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["x"]}}]}]})),
        Authz::Other
    );
    // DENY without rules matches nothing.
    assert_eq!(kind(json!({"action": "DENY"})), Authz::Other);
}

fn secret(managed: serde_json::Value) -> PartialObjectMeta<Secret> {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {"name": "cacerts", "namespace": "istio-system", "managedFields": managed},
    }))
    .unwrap()
}

#[test]
fn istio_generated_is_read_from_managed_fields() {
    let by_istiod = secret(serde_json::json!([{
        "manager": "pilot-discovery", "operation": "Update", "apiVersion": "v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:data": {".": {}, "f:ca-cert.pem": {}, "f:istio-generated": {}}, "f:type": {}}
    }]));
    assert!(istio_generated(&by_istiod));
    let by_kubectl = secret(serde_json::json!([{
        "manager": "kubectl-create", "operation": "Update", "apiVersion": "v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:data": {".": {}, "f:ca-cert.pem": {}, "f:ca-key.pem": {}}}
    }]));
    assert!(!istio_generated(&by_kubectl));
}

fn istiod(ca_server: bool, external: Option<&str>) -> (String, Istiod) {
    (
        "istio-system".into(),
        Istiod {
            revision: "default".into(),
            version: "1.31.0".into(),
            serving: true,
            ca_server,
            external_ca: external.map(str::to_string),
        },
    )
}

#[test]
fn the_ca_mode_follows_istiods_own_decision() {
    let secrets = |list: &[(&str, bool)]| -> BTreeMap<String, bool> {
        list.iter().map(|(n, g)| (n.to_string(), *g)).collect()
    };
    let ns = "istio-system";
    let on = [istiod(true, None)];
    assert_eq!(
        ca_mode(&on, ns, Some(&secrets(&[("cacerts", false)]))),
        CaMode::PluggedIn
    );
    assert!(matches!(
        ca_mode(&on, ns, Some(&secrets(&[("cacerts", true)]))),
        CaMode::SelfSigned(how) if how.contains("istio-generated")
    ));
    assert!(matches!(
        ca_mode(&on, ns, Some(&secrets(&[("istio-ca-secret", false)]))),
        CaMode::SelfSigned(how) if how.contains("istio-ca-secret")
    ));
    // cacerts wins over istio-ca-secret (istiod mounts it and reads it first).
    assert_eq!(
        ca_mode(
            &on,
            ns,
            Some(&secrets(&[("cacerts", false), ("istio-ca-secret", false)]))
        ),
        CaMode::PluggedIn
    );
    assert!(matches!(
        ca_mode(&on, ns, Some(&secrets(&[]))),
        CaMode::SelfSigned(_)
    ));
    assert!(matches!(
        ca_mode(&[istiod(false, None)], ns, None),
        CaMode::External(_)
    ));
    assert!(matches!(
        ca_mode(&[istiod(true, Some("ISTIOD_RA_KUBERNETES_API"))], ns, None),
        CaMode::External(how) if how.contains("ISTIOD_RA_KUBERNETES_API")
    ));
    assert!(matches!(ca_mode(&on, ns, None), CaMode::Unknown(_)));
    assert!(matches!(
        ca_mode(&on, "other", Some(&secrets(&[]))),
        CaMode::Unknown(_)
    ));
}

fn authz(list: &[(&str, &str, Authz)]) -> Vec<((String, String), Arc<Authz>)> {
    list.iter()
        .map(|(ns, n, a)| ((ns.to_string(), n.to_string()), Arc::new(*a)))
        .collect()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn namespaces_without_a_default_deny_are_one_violation_each() {
    let spec = SecuritySpec::default();
    let policies = authz(&[
        ("shop", "allow-nothing", Authz::AllowNothing),
        ("web", "allow-frontend", Authz::Other),
    ]);
    // The report on namespaces shop, web and bare with `policies` and `outbound`.
    let judge = |policies: &[((String, String), Arc<Authz>)], outbound: &str| {
        let ns = names(&["shop", "web", "bare"]);
        let p = plan(
            "istio-system",
            &ns,
            policies,
            outbound.into(),
            CaMode::PluggedIn,
        );
        report(&spec, &p, "istio-system", "istio-system")
    };
    let r = judge(&policies, "ALLOW_ANY");
    assert_eq!(r.condition.status, Status::False);
    assert_eq!(r.condition.reason, reasons::DEFAULT_DENY_MISSING);
    let objects: Vec<&str> = r.violations.iter().map(|v| v.object.as_str()).collect();
    assert_eq!(objects, vec!["Namespace/bare", "Namespace/web"]);
    assert!(
        r.violations[1]
            .message
            .contains("its 1 AuthorizationPolicies (allow-frontend)")
    );
    assert!(
        r.condition.message.contains("default deny in 1 of 3"),
        "{}",
        r.condition.message
    );
    assert!(
        r.condition
            .message
            .contains("CA: plugged-in (Secret istio-system/cacerts)")
    );

    // A mesh-wide allow-nothing in the root namespace covers every namespace.
    let mut with_root = policies.clone();
    with_root.extend(authz(&[("istio-system", "deny", Authz::AllowNothing)]));
    let r = judge(&with_root, "REGISTRY_ONLY");
    assert_eq!(r.condition.status, Status::True, "{:?}", r.violations);
    assert!(
        r.condition
            .message
            .contains("default deny mesh-wide (istio-system/deny)")
    );
}

#[test]
fn a_self_signed_ca_and_allow_any_egress_are_reported_when_required() {
    let p = plan(
        "istio-system",
        &[],
        &[],
        "ALLOW_ANY".into(),
        CaMode::SelfSigned("Secret istio-system/istio-ca-secret".into()),
    );
    let spec = SecuritySpec {
        registry_only: Requirement::Required,
        ..SecuritySpec::default()
    };
    let r = report(&spec, &p, "istio-system", "istio-system");
    assert_eq!(r.condition.reason, reasons::SELF_SIGNED_CA);
    let objects: Vec<&str> = r.violations.iter().map(|v| v.object.as_str()).collect();
    assert_eq!(objects, vec!["CA/istio-system", "MeshConfig/istio-system"]);
    // Not required: shown in the condition only.
    let spec = SecuritySpec {
        plugged_in_ca: Requirement::Off,
        ..SecuritySpec::default()
    };
    let r = report(&spec, &p, "istio-system", "istio-system");
    assert_eq!(r.condition.status, Status::True);
    assert!(
        r.condition.message.contains("CA: self-signed"),
        "{}",
        r.condition.message
    );
    assert!(
        r.condition
            .message
            .contains("outboundTrafficPolicy: ALLOW_ANY")
    );
}

#[test]
fn the_outbound_mode_defaults_to_allow_any() {
    assert_eq!(
        outbound_mode("rootNamespace: istio-system\n").unwrap(),
        "ALLOW_ANY"
    );
    assert_eq!(
        outbound_mode("outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n").unwrap(),
        "REGISTRY_ONLY"
    );
}
