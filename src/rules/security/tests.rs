//! Default deny, the egress mode and the CA mode, decided without a server.
use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;

use super::ambient::NamespaceFacts;
use super::cache::{AuthorizationPolicy, istio_generated};
use super::plan::{CaMode, Seen, ca_mode, outbound_mode, plan, report};
use super::policy::{Authz, PolicyFacts, Ztunnel, reduce};
use crate::api::{DefaultDeny, Requirement, SecuritySpec};
use crate::istio::Istiod;
use crate::rules::sidecars::WorkloadFacts;
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
    let kind = |spec| reduce(&policy(spec)).kind;
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

/// The facts of AuthorizationPolicies (namespace, name, spec).
fn policies(list: &[(&str, &str, serde_json::Value)]) -> Vec<((String, String), Arc<PolicyFacts>)> {
    list.iter()
        .map(|(ns, n, spec)| {
            (
                (ns.to_string(), n.to_string()),
                Arc::new(reduce(&policy(spec.clone()))),
            )
        })
        .collect()
}

/// What the section sees of `namespaces` (name, ambient, `istio.io/use-waypoint`).
fn seen(
    namespaces: &[(&str, bool, Option<&str>)],
    policies: Vec<((String, String), Arc<PolicyFacts>)>,
) -> Seen {
    Seen {
        root: "istio-system".into(),
        namespaces: namespaces
            .iter()
            .map(|(n, ambient, w)| NamespaceFacts {
                name: n.to_string(),
                ambient: *ambient,
                use_waypoint: w.map(str::to_string),
            })
            .collect(),
        policies,
        ..Seen::default()
    }
}

fn judge(spec: &SecuritySpec, seen: &Seen) -> crate::status::RuleReport {
    let p = plan(seen, "ALLOW_ANY".into(), CaMode::PluggedIn);
    report(spec, &p, "istio-system", "istio-system")
}

/// Asserts that `message` says each of `parts`.
fn says(message: &str, parts: &[&str]) {
    for p in parts {
        assert!(message.contains(p), "{p:?} not in {message:?}");
    }
}

fn objects(r: &crate::status::RuleReport) -> Vec<&str> {
    r.violations.iter().map(|v| v.object.as_str()).collect()
}

#[test]
fn namespaces_without_a_default_deny_are_one_violation_each() {
    use serde_json::json;
    let spec = SecuritySpec::default();
    let allow_frontend = json!({"selector": {"matchLabels": {"app": "frontend"}}, "rules": [{"from": [{"source": {"namespaces": ["web"]}}]}]});
    let list = vec![
        ("shop", "allow-nothing", json!({})),
        ("web", "allow-frontend", allow_frontend),
    ];
    let ns = [
        ("shop", false, None),
        ("web", false, None),
        ("bare", false, None),
    ];
    let r = judge(&spec, &seen(&ns, policies(&list)));
    assert_eq!(r.condition.status, Status::False);
    assert_eq!(r.condition.reason, reasons::DEFAULT_DENY_MISSING);
    assert_eq!(objects(&r), vec!["Namespace/bare", "Namespace/web"]);
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
    let mut with_root = list.clone();
    with_root.push(("istio-system", "deny", json!({})));
    let p = plan(
        &seen(&ns, policies(&with_root)),
        "REGISTRY_ONLY".into(),
        CaMode::PluggedIn,
    );
    let r = report(&spec, &p, "istio-system", "istio-system");
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
        &Seen::default(),
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

#[test]
fn policies_are_reduced_to_whom_they_deny_by_default_and_what_ztunnel_does() {
    use serde_json::json;
    let facts = |spec| reduce(&policy(spec));
    // ALLOW with rules: its workloads are denied what no rule allows.
    let p = facts(
        json!({"selector": {"matchLabels": {"app": "a"}}, "rules": [{"to": [{"operation": {"ports": ["80"]}}]}]}),
    );
    assert!(p.denies_by_default);
    assert_eq!(
        p.selector,
        Some([("app".to_string(), "a".to_string())].into())
    );
    assert_eq!(p.ztunnel, None);
    // ALLOW with an empty rule allows everything; CUSTOM, AUDIT and DENY with rules decide
    // nothing by default; DENY with an empty rule denies everything.
    assert!(!facts(json!({"rules": [{}]})).denies_by_default);
    assert!(!facts(json!({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]})).denies_by_default);
    assert!(!facts(json!({"action": "AUDIT", "rules": [{}]})).denies_by_default);
    assert!(
        !facts(json!({"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["x"]}}]}]}))
            .denies_by_default
    );
    assert!(facts(json!({"action": "DENY", "rules": [{}]})).denies_by_default);
    // targetRefs: applies to no workload, and is not for ztunnel.
    let t = facts(
        json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}], "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
    );
    assert_eq!((t.selector, t.ztunnel), (None, None));

    // What ztunnel does (istiod's handleRule and hasEffectiveRules).
    let z = |spec| facts(spec).ztunnel;
    assert_eq!(
        z(
            json!({"rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/a"]}}], "from": [{"source": {"requestPrincipals": ["*"]}}]}]})
        ),
        Some(Ztunnel::AllowsLess(vec![
            "methods".into(),
            "paths".into(),
            "requestPrincipals".into()
        ]))
    );
    assert_eq!(
        z(
            json!({"rules": [{"when": [{"key": "request.auth.claims[groups]", "values": ["admin"]}]}]})
        ),
        Some(Ztunnel::AllowsLess(vec![
            "request.auth.claims[groups]".into()
        ]))
    );
    // L4 attributes only: enforced as written.
    assert_eq!(
        z(
            json!({"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/b"], "ipBlocks": ["10.0.0.0/8"]}}], "when": [{"key": "source.namespace", "values": ["a"]}]}]})
        ),
        None
    );
    // DENY: with an L4 match left, it denies more; without, it does nothing.
    assert_eq!(
        z(
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"], "ports": ["8080"]}}]}]})
        ),
        Some(Ztunnel::DeniesMore(vec!["methods".into()]))
    );
    assert_eq!(
        z(
            json!({"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin"]}}], "from": [{"source": {"namespaces": ["x"]}}]}]})
        ),
        Some(Ztunnel::NoEffect(vec!["paths".into()]))
    );
    assert_eq!(
        z(
            json!({"action": "DENY", "rules": [{"when": [{"key": "request.headers[x]", "values": ["y"]}]}, {"from": [{"source": {"namespaces": ["x"]}}]}]})
        ),
        Some(Ztunnel::DeniesMore(vec!["request.headers[x]".into()]))
    );
    assert_eq!(
        z(json!({"action": "CUSTOM", "provider": {"name": "ext-authz"}, "rules": [{}]})),
        Some(Ztunnel::Unsupported("CUSTOM".into()))
    );
}

/// A Deployment `name` of namespace `ns` whose pods carry `labels`, as the cache keeps it.
fn workload(name: &str, labels: serde_json::Value) -> Arc<WorkloadFacts> {
    let d: Deployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "web"},
        "spec": {"selector": {}, "template": {"metadata": {"labels": labels}}},
    }))
    .unwrap();
    Arc::new(WorkloadFacts::from(&d))
}

#[test]
fn a_namespace_is_covered_per_workload_when_every_workload_is_selected() {
    use serde_json::json;
    let select = |app: &str| json!({"selector": {"matchLabels": {"app": app}}, "rules": [{"from": [{"source": {"namespaces": ["web"]}}]}]});
    let mut s = seen(
        &[("web", false, None)],
        policies(&[
            ("web", "frontend", select("frontend")),
            // Allows everything: no default deny for api.
            (
                "web",
                "api-open",
                json!({"selector": {"matchLabels": {"app": "api"}}, "rules": [{}]}),
            ),
            // A waypoint's policy: no workload's.
            (
                "web",
                "at-waypoint",
                json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}]}),
            ),
        ]),
    );
    let mut waypoint = workload("waypoint", json!({}));
    Arc::make_mut(&mut waypoint).labels = crate::compact::small_map([(
        "gateway.networking.k8s.io/gateway-class-name".to_string(),
        "istio-waypoint".to_string(),
    )]);
    s.workloads.insert(
        "web".into(),
        vec![
            vec![
                workload("frontend", json!({"app": "frontend", "v": "1"})),
                workload("api", json!({"app": "api"})),
                workload("batch", json!({"app": "batch"})),
                waypoint,
            ]
            .into(),
        ],
    );
    let per_workload = SecuritySpec {
        default_deny: DefaultDeny::PerWorkload,
        ..SecuritySpec::default()
    };
    for spec in [&SecuritySpec::default(), &per_workload] {
        let r = judge(spec, &s);
        assert_eq!(objects(&r), vec!["Namespace/web"]);
        says(
            &r.violations[0].message,
            &[
                "2 of its 3 workload(s) are selected by no ALLOW or deny-all policy (Deployment/api, Deployment/batch)",
            ],
        );
    }

    // batch by a root-namespace policy (it selects in every namespace), api by a deny-all.
    s.policies.extend(policies(&[
        ("istio-system", "batch", select("batch")),
        (
            "web",
            "api-closed",
            json!({"action": "DENY", "selector": {"matchLabels": {"app": "api"}}, "rules": [{}]}),
        ),
    ]));
    let r = judge(&per_workload, &s);
    assert_eq!(r.condition.status, Status::True, "{:?}", r.violations);
    assert!(
        r.condition.message.contains(
            "default deny in 1 of 1 selected namespace(s) (namespace-wide or per workload)"
        ),
        "{}",
        r.condition.message
    );
    // Required still asks for the namespace-wide policy, which covers workloads to come.
    let r = judge(&SecuritySpec::default(), &s);
    assert_eq!(objects(&r), vec!["Namespace/web"]);
    says(
        &r.violations[0].message,
        &[
            "every one of its 3 workload(s) is selected by an ALLOW or deny-all policy, but a workload created later would not be",
        ],
    );
    let off = SecuritySpec {
        default_deny: DefaultDeny::Off,
        ..SecuritySpec::default()
    };
    assert_eq!(judge(&off, &s).condition.status, Status::True);
}

#[test]
fn ambient_namespaces_with_policies_ztunnel_cannot_enforce_are_one_violation_each() {
    use serde_json::json;
    let methods = json!({"selector": {"matchLabels": {"app": "a"}}, "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]});
    let list = [
        ("amb", "allow-nothing", json!({})),
        ("amb", "get-only", methods.clone()),
        (
            "amb",
            "ext",
            json!({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{}]}),
        ),
        (
            "amb",
            "l4",
            json!({"rules": [{"from": [{"source": {"namespaces": ["x"]}}]}]}),
        ),
        (
            "amb",
            "at-waypoint",
            json!({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}], "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}),
        ),
        ("labelled", "allow-nothing", json!({})),
        ("labelled", "get-only", methods.clone()),
        ("sidecar", "allow-nothing", json!({})),
        ("sidecar", "get-only", methods),
    ];
    let mut s = seen(
        &[
            ("amb", true, None),
            ("labelled", true, Some("waypoint")),
            ("sidecar", false, None),
        ],
        policies(&list),
    );
    let r = judge(&SecuritySpec::default(), &s);
    assert_eq!(r.condition.reason, reasons::L7_POLICY_WITHOUT_WAYPOINT);
    assert_eq!(
        objects(&r),
        vec![
            "AuthorizationPolicies/amb",
            "AuthorizationPolicies/labelled"
        ]
    );
    says(
        &r.violations[0].message,
        &[
            "2 AuthorizationPolicy(ies)",
            "ext: CUSTOM is not supported by ztunnel",
            "get-only: HTTP attributes (methods): ztunnel drops the ALLOW rules",
            "it has no waypoint",
        ],
    );
    says(
        &r.violations[1].message,
        &["it has a waypoint (istio.io/use-waypoint: waypoint)"],
    );
    says(
        &r.condition.message,
        &["2 ambient namespace(s) with AuthorizationPolicies that need a waypoint"],
    );
    // A waypoint Deployment istiod runs in amb is named as such.
    s.waypoints.insert("amb".into());
    let r = judge(&SecuritySpec::default(), &s);
    says(
        &r.violations[0].message,
        &["it has a waypoint (a waypoint Deployment runs here)"],
    );
    // Off: shown in the condition only.
    let off = SecuritySpec {
        l7_waypoint: Requirement::Off,
        ..SecuritySpec::default()
    };
    let r = judge(&off, &s);
    assert_eq!(r.condition.status, Status::True, "{:?}", r.violations);
}

#[test]
fn a_workload_change_concerns_the_section_only_through_what_it_reads() {
    use super::workloads::reads_changed;
    use serde_json::json;
    let w = workload("web", json!({"app": "web"}));
    assert!(!reads_changed(None, None));
    assert!(reads_changed(None, Some(&w)));
    assert!(reads_changed(Some(&w), None));
    let mut edited = (*w).clone();
    edited.generation += 1;
    edited.grace_seconds = Some(90);
    edited.replicas += 2;
    assert!(!reads_changed(Some(&w), Some(&edited)));
    let relabelled = workload("web", json!({"app": "other"}));
    assert!(reads_changed(Some(&w), Some(&relabelled)));
    let mut waypoint = (*w).clone();
    waypoint.labels.insert(
        crate::rules::gateway_api::plan::CLASS_LABEL.to_string(),
        "istio-waypoint".to_string(),
    );
    assert!(reads_changed(Some(&w), Some(&waypoint)));
}
