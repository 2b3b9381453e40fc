use super::*;
use crate::rules::mtls::testutil::*;
use crate::write::POLICY_LABEL;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

#[test]
fn mesh_scope_creates_one_root_object_then_converges() {
    let s = spec("{mode: STRICT, rootNamespace: root}");
    let nss = [ns("root", &[]), ns("app", &[])];
    let p = run(&s, &nss, &[], &[]);
    assert_eq!(p.targets, 1);
    assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
    let f = &p.findings[0];
    assert_eq!(f.object, "PeerAuthentication/root/meshwarden-mtls");
    let patch = patch_of(f);
    assert_eq!(patch["spec"]["mtls"]["mode"], "STRICT");
    assert!(patch["spec"].get("selector").is_none());
    assert_eq!(patch["metadata"]["labels"][POLICY_LABEL], "p");
    assert!(!f.held);

    // What the apply creates is compliant: nothing more to do.
    let created = ours(
        pa(
            "root",
            "meshwarden-mtls",
            1,
            json!({"mtls": {"mode": "STRICT"}}),
        ),
        "p",
    );
    assert!(run(&s, &nss, &[created], &[]).findings.is_empty());
}

#[test]
fn mesh_level_unset_is_permissive_and_is_corrected() {
    let s = spec("{mode: PERMISSIVE, rootNamespace: root}");
    let nss = [ns("root", &[])];
    let user = pa("root", "default", 5, json!({"mtls": {"mode": "UNSET"}}));
    let p = run(&s, &nss, &[user], &[]);
    assert_eq!(p.findings.len(), 1);
    assert!(
        p.findings[0].message.contains("mode is UNSET"),
        "{}",
        p.findings[0].message
    );
    assert_eq!(
        patch_of(&p.findings[0])["spec"]["mtls"]["mode"],
        "PERMISSIVE"
    );
}

#[test]
fn users_default_is_corrected_in_place_with_only_the_mode() {
    let s = spec("{mode: STRICT, rootNamespace: root}");
    let nss = [ns("root", &[])];
    let older = pa(
        "root",
        "default",
        10,
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    );
    let newer = pa("root", "another", 2, json!({"mtls": {"mode": "DISABLE"}}));
    let p = run(&s, &nss, &[newer, older], &[]);
    let fixes: Vec<&Finding> = p.findings.iter().filter(|f| f.fix.is_some()).collect();
    assert_eq!(fixes.len(), 1, "{:?}", p.findings);
    assert_eq!(
        fixes[0].object, "PeerAuthentication/root/default",
        "the oldest one"
    );
    assert_eq!(
        patch_of(fixes[0]),
        &json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": "root"},
            "spec": {"mtls": {"mode": "STRICT"}},
        }),
        "no labels, no owner: only the mode"
    );
    let other = p
        .findings
        .iter()
        .find(|f| f.object == "PeerAuthentication/root/another")
        .unwrap();
    assert!(other.fix.is_none());
    assert!(other.message.contains("uses the oldest, default"));
    assert!(
        !p.findings
            .iter()
            .any(|f| f.object.ends_with("meshwarden-mtls")),
        "no second object"
    );
}

#[test]
fn our_newer_object_is_removed_once_an_older_user_object_sets_the_namespace_mode() {
    let s = spec("{mode: STRICT, rootNamespace: root}");
    let nss = [ns("root", &[])];
    let mine = ours(
        pa(
            "root",
            "meshwarden-mtls",
            1,
            json!({"mtls": {"mode": "STRICT"}}),
        ),
        "p",
    );
    let user = pa("root", "default", 10, json!({"mtls": {"mode": "STRICT"}}));
    let p = run(&s, &nss, &[mine, user], &[]);
    assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
    assert_eq!(
        p.findings[0].fix,
        Some(Fix::Delete {
            namespace: "root".into(),
            name: "meshwarden-mtls".into()
        })
    );
}

#[test]
fn strict_is_held_at_permissive_but_a_strict_scope_is_never_weakened() {
    let s = spec("{mode: STRICT, rootNamespace: root}");
    let nss = [ns("root", &[])];
    let blockers = [pod("legacy", "web", false)];
    let p = run(&s, &nss, &[], &blockers);
    assert!(p.held);
    assert!(p.findings[0].held);
    assert_eq!(
        patch_of(&p.findings[0])["spec"]["mtls"]["mode"],
        "PERMISSIVE"
    );

    // Already STRICT: never weakened, and the pods it cuts off are reported.
    let strict = pa("root", "default", 3, json!({"mtls": {"mode": "STRICT"}}));
    let p = run(&s, &nss, &[strict], &blockers);
    assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
    assert!(p.findings[0].fix.is_none());
    assert_eq!(p.findings[0].reason, Some(CLIENTS_CUT_OFF));
    assert_eq!(p.findings[0].object, "PeerAuthentication/root/default");
    assert!(!p.held);

    let mine = ours(
        pa(
            "root",
            "meshwarden-mtls",
            3,
            json!({"mtls": {"mode": "STRICT"}}),
        ),
        "p",
    );
    let p = run(&s, &nss, &[mine], &blockers);
    assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
    assert_eq!(p.findings[0].reason, Some(CLIENTS_CUT_OFF));
    assert!(
        p.findings[0]
            .message
            .contains("mesh-wide mode is STRICT and stays so")
    );

    let forced = spec("{mode: STRICT, rootNamespace: root, force: true}");
    let p = run(&forced, &nss, &[], &blockers);
    assert!(!p.held);
    assert_eq!(patch_of(&p.findings[0])["spec"]["mtls"]["mode"], "STRICT");

    // `force` skips the hold, not the report: once STRICT, the pods it cuts off are reported.
    let strict = pa("root", "default", 3, json!({"mtls": {"mode": "STRICT"}}));
    let p = run(&forced, &nss, &[strict], &blockers);
    assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
    assert_eq!(p.findings[0].reason, Some(CLIENTS_CUT_OFF));
    assert!(!p.held);
}

#[test]
fn namespaces_scope_holds_every_selected_namespace() {
    let s = spec("{mode: STRICT, scope: Namespaces, namespaceSelector: {matchLabels: {team: a}}}");
    let nss: Vec<NamespaceInfo> = (0..5)
        .map(|i| ns(&format!("n{i}"), &[("team", if i < 3 { "a" } else { "b" })]))
        .collect();
    let p = run(&s, &nss, &[], &[]);
    assert_eq!(p.targets, 3);
    let objs: Vec<&str> = p.findings.iter().map(|f| f.object.as_str()).collect();
    assert_eq!(
        objs,
        vec![
            "PeerAuthentication/n0/meshwarden-mtls",
            "PeerAuthentication/n1/meshwarden-mtls",
            "PeerAuthentication/n2/meshwarden-mtls"
        ]
    );
    let none =
        spec("{mode: STRICT, scope: Namespaces, namespaceSelector: {matchLabels: {team: c}}}");
    assert_eq!(run(&none, &nss, &[], &[]).targets, 0);
}

#[test]
fn exemptions_are_rendered_with_stable_names() {
    let s = spec(
        r#"{mode: STRICT, rootNamespace: root, exemptions: [
            {namespace: legacy},
            {namespace: shop, selector: {matchLabels: {app: pay}}, mode: STRICT, ports: [{port: 8080, mode: PERMISSIVE}]},
            {namespace: shop, selector: {matchExpressions: [{key: app, operator: Exists}]}},
            {namespace: root, selector: {matchLabels: {app: x}}},
            {namespace: gone}
        ]}"#,
    );
    let nss = [ns("root", &[]), ns("legacy", &[]), ns("shop", &[])];
    let p = run(&s, &nss, &[], &[]);
    assert_eq!(p.targets, 3, "mesh, legacy and shop/pay");
    let legacy = exemption_name(&s.exemptions[0]);
    let pay = exemption_name(&s.exemptions[1]);
    assert!(legacy.starts_with(EXEMPTION_PREFIX) && legacy.len() == EXEMPTION_PREFIX.len() + 10);
    assert_ne!(legacy, pay);
    assert_eq!(pay, exemption_name(&s.exemptions[1].clone()), "stable");
    assert_eq!(
        legacy, "meshwarden-exemption-e486891c3c",
        "the name of an existing PeerAuthentication: stable across releases"
    );
    let find = |id: String| p.findings.iter().find(|f| f.object == id).unwrap();
    let l = patch_of(find(format!("PeerAuthentication/legacy/{legacy}")));
    assert_eq!(l["spec"], json!({"mtls": {"mode": "PERMISSIVE"}}));
    let w = patch_of(find(format!("PeerAuthentication/shop/{pay}")));
    assert_eq!(
        w["spec"],
        json!({"selector": {"matchLabels": {"app": "pay"}}, "mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}})
    );
    let rejected: Vec<&String> = p
        .findings
        .iter()
        .filter(|f| f.fix.is_none())
        .map(|f| &f.message)
        .collect();
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    assert!(rejected.iter().any(|m| m.contains("matchLabels only")));
    assert!(
        rejected
            .iter()
            .any(|m| m.contains("ignores workload selectors in the root"))
    );
    assert!(rejected.iter().any(|m| m.contains("gone does not exist")));
    assert_eq!(p.exemptions.len(), 2);
}

#[test]
fn weaker_overrides_are_corrected_unless_exempted() {
    let s = spec(
        "{mode: STRICT, rootNamespace: root, force: true, overrides: Enforce, exemptions: [{namespace: legacy}, {namespace: shop, selector: {matchLabels: {app: pay}}}]}",
    );
    let nss = [
        ns("root", &[]),
        ns("legacy", &[]),
        ns("shop", &[]),
        ns("web", &[]),
    ];
    let root = pa("root", "default", 9, json!({"mtls": {"mode": "STRICT"}}));
    let ns_wide = pa("web", "default", 1, json!({"mtls": {"mode": "PERMISSIVE"}}));
    let port = pa(
        "web",
        "api",
        1,
        json!({"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "UNSET"}, "portLevelMtls": {"9000": {"mode": "DISABLE"}, "9001": {"mode": "STRICT"}}}),
    );
    let covered = pa(
        "shop",
        "pay",
        1,
        json!({"selector": {"matchLabels": {"app": "pay", "v": "2"}}, "mtls": {"mode": "DISABLE"}}),
    );
    let in_exempt_ns = pa("legacy", "default", 1, json!({"mtls": {"mode": "DISABLE"}}));
    let fine = pa(
        "web",
        "ok",
        1,
        json!({"selector": {"matchLabels": {"app": "ok"}}, "mtls": {"mode": "STRICT"}}),
    );
    let other_policy = ours(
        pa(
            "web",
            "meshwarden-mtls",
            1,
            json!({"mtls": {"mode": "PERMISSIVE"}}),
        ),
        "q",
    );
    let p = run(
        &s,
        &nss,
        &[
            root,
            ns_wide,
            port,
            covered,
            in_exempt_ns,
            fine,
            other_policy,
        ],
        &[],
    );
    assert!(
        !p.findings
            .iter()
            .any(|f| f.object.ends_with("web/meshwarden-mtls")),
        "another policy's object is that policy's business"
    );
    let by = |id: &str| p.findings.iter().find(|f| f.object == id);
    let w = by("PeerAuthentication/web/default").unwrap();
    assert_eq!(patch_of(w)["spec"], json!({"mtls": {"mode": "STRICT"}}));
    let a = by("PeerAuthentication/web/api").unwrap();
    assert_eq!(
        patch_of(a)["spec"],
        json!({"portLevelMtls": {"9000": {"mode": "STRICT"}}}),
        "only the weak port; UNSET inherits"
    );
    assert!(a.message.contains("port 9000 is DISABLE"), "{}", a.message);
    assert!(
        by("PeerAuthentication/shop/pay").is_none(),
        "covered by the workload exemption"
    );
    assert!(by("PeerAuthentication/web/ok").is_none());
    // The exempted namespace's own default is corrected to the exemption's mode.
    let l = by("PeerAuthentication/legacy/default").unwrap();
    assert_eq!(patch_of(l)["spec"], json!({"mtls": {"mode": "PERMISSIVE"}}));
}

#[test]
fn an_apply_to_a_user_object_keeps_every_field_we_own() {
    let s = spec("{mode: STRICT, rootNamespace: root, force: true, overrides: Enforce}");
    let nss = [ns("root", &[]), ns("web", &[])];
    let root = pa("root", "default", 9, json!({"mtls": {"mode": "STRICT"}}));
    let mut api = pa(
        "web",
        "api",
        1,
        json!({"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "STRICT"}, "portLevelMtls": {"9000": {"mode": "DISABLE"}}}),
    );
    api.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
        manager: Some(write::FIELD_MANAGER.into()),
        fields_v1: Some(FieldsV1(json!({"f:spec": {"f:mtls": {"f:mode": {}}}}))),
        ..Default::default()
    }]);
    let p = run(&s, &nss, &[root, api], &[]);
    assert_eq!(
        patch_of(&p.findings[0])["spec"],
        json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"9000": {"mode": "STRICT"}}})
    );
}

#[test]
fn held_scope_does_not_raise_permissive_overrides() {
    let s = spec("{mode: STRICT, rootNamespace: root, overrides: Enforce}");
    let nss = [ns("root", &[]), ns("web", &[])];
    let perm = pa("web", "default", 1, json!({"mtls": {"mode": "PERMISSIVE"}}));
    let dis = pa(
        "web",
        "x",
        1,
        json!({"selector": {"matchLabels": {"a": "b"}}, "mtls": {"mode": "DISABLE"}}),
    );
    let p = run(&s, &nss, &[perm, dis], &[pod("web", "w", false)]);
    assert!(
        !p.findings
            .iter()
            .any(|f| f.object == "PeerAuthentication/web/default")
    );
    let x = p
        .findings
        .iter()
        .find(|f| f.object == "PeerAuthentication/web/x")
        .unwrap();
    assert_eq!(patch_of(x)["spec"], json!({"mtls": {"mode": "PERMISSIVE"}}));
}

fn run_owned(
    s: &MtlsSpec,
    nss: &[NamespaceInfo],
    pas: &[PeerAuthentication],
    blockers: &[PodInfo],
) -> Plan {
    plan(&Input {
        spec: s,
        root: s.root_namespace.as_deref().unwrap_or("istio-system"),
        istio_root: None,
        policy: "p",
        owner: Some(OwnerReference {
            api_version: "meshwarden.io/v1alpha1".into(),
            kind: "MeshPolicy".into(),
            name: "p".into(),
            uid: "uid-p".into(),
            ..Default::default()
        }),
        namespaces: nss,
        peer_auths: pas,
        blockers,
    })
}

fn owners(f: &Finding) -> usize {
    patch_of(f)["metadata"]["ownerReferences"]
        .as_array()
        .map_or(0, Vec::len)
}

#[test]
fn objects_that_let_plain_text_in_are_never_owned_by_the_policy() {
    // The garbage collector deletes owned objects with the policy: an exemption or a
    // PERMISSIVE scope removed while the user's `default` stays STRICT would cut clients
    // off. Only objects whose removal can only weaken the mesh are owned.
    let s = spec(
        r#"{mode: STRICT, rootNamespace: root, exemptions: [
            {namespace: legacy},
            {namespace: shop, selector: {matchLabels: {app: pay}}, mode: STRICT},
            {namespace: shop, selector: {matchLabels: {app: api}}, mode: STRICT, ports: [{port: 8080, mode: PERMISSIVE}]}
        ]}"#,
    );
    let nss = [ns("root", &[]), ns("legacy", &[]), ns("shop", &[])];
    let p = run_owned(&s, &nss, &[], &[]);
    let find = |id: String| p.findings.iter().find(|f| f.object == id).unwrap();
    assert_eq!(
        owners(find("PeerAuthentication/root/meshwarden-mtls".into())),
        1
    );
    let legacy = exemption_name(&s.exemptions[0]);
    assert_eq!(
        owners(find(format!("PeerAuthentication/legacy/{legacy}"))),
        0
    );
    let pay = exemption_name(&s.exemptions[1]);
    assert_eq!(owners(find(format!("PeerAuthentication/shop/{pay}"))), 1);
    let api = exemption_name(&s.exemptions[2]);
    assert_eq!(owners(find(format!("PeerAuthentication/shop/{api}"))), 0);

    // Held at PERMISSIVE: not owned; a PERMISSIVE exemption created owned by an older
    // version loses its ownerReference.
    let mut old = ours(
        pa(
            "legacy",
            &legacy,
            5,
            json!({"mtls": {"mode": "PERMISSIVE"}}),
        ),
        "p",
    );
    old.metadata.owner_references = Some(vec![OwnerReference {
        uid: "uid-p".into(),
        ..Default::default()
    }]);
    let p = run_owned(&s, &nss, &[old], &[pod("web", "w", false)]);
    let root = find_in(&p, "PeerAuthentication/root/meshwarden-mtls");
    assert!(root.held);
    assert_eq!(owners(root), 0);
    assert_eq!(
        owners(find_in(&p, &format!("PeerAuthentication/legacy/{legacy}"))),
        0
    );
}

fn find_in<'p>(p: &'p Plan, id: &str) -> &'p Finding {
    p.findings
        .iter()
        .find(|f| f.object == id)
        .unwrap_or_else(|| panic!("{id} in {:?}", p.findings))
}

#[test]
fn a_newer_mesh_wide_object_never_displaces_the_one_istio_applies() {
    let s = spec("{mode: STRICT, rootNamespace: root}");
    let nss = [ns("root", &[])];
    let mine = ours(
        pa(
            "root",
            "meshwarden-mtls",
            10,
            json!({"mtls": {"mode": "STRICT"}}),
        ),
        "p",
    );
    let newer = pa(
        "root",
        "default",
        1,
        json!({"mtls": {"mode": "PERMISSIVE"}}),
    );
    let p = run(&s, &nss, &[mine, newer], &[]);
    assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
    let f = &p.findings[0];
    assert_eq!(f.object, "PeerAuthentication/root/default");
    assert!(f.fix.is_none(), "neither deleted nor rewritten: {f:?}");
    assert!(
        f.message.contains("Istio uses the oldest, meshwarden-mtls"),
        "{}",
        f.message
    );
}

#[test]
fn weaker_overrides_are_reported_by_default_not_rewritten() {
    let s = spec("{mode: STRICT, rootNamespace: root, force: true}");
    let nss = [ns("root", &[]), ns("web", &[])];
    let root = pa("root", "default", 9, json!({"mtls": {"mode": "STRICT"}}));
    let ns_wide = pa("web", "default", 1, json!({"mtls": {"mode": "PERMISSIVE"}}));
    let port = pa(
        "web",
        "api",
        1,
        json!({"selector": {"matchLabels": {"app": "api"}}, "portLevelMtls": {"9000": {"mode": "DISABLE"}}}),
    );
    let p = run(&s, &nss, &[root, ns_wide, port], &[]);
    assert_eq!(p.findings.len(), 2, "{:?}", p.findings);
    for f in &p.findings {
        assert!(f.fix.is_none(), "{f:?}");
        assert_eq!(f.reason, Some(OVERRIDES_REPORTED));
        assert!(f.message.contains("overrides: Enforce"), "{}", f.message);
    }
    assert!(
        find_in(&p, "PeerAuthentication/web/api")
            .message
            .contains("port 9000 is DISABLE")
    );
}

#[test]
fn the_mesh_wide_object_in_istios_root_namespace_stays_while_the_policy_names_another() {
    let s = spec("{mode: STRICT, rootNamespace: other, force: true}");
    let nss = [ns("root", &[]), ns("other", &[])];
    let applied = ours(
        pa("root", SCOPE_OBJECT, 5, json!({"mtls": {"mode": "STRICT"}})),
        "p",
    );
    let input = |istio_root| Input {
        spec: &s,
        root: "other",
        istio_root,
        policy: "p",
        owner: None,
        namespaces: &nss,
        peer_auths: std::slice::from_ref(&applied),
        blockers: &[],
    };
    let p = plan(&input(Some("root")));
    assert!(
        !p.findings
            .iter()
            .any(|f| matches!(&f.fix, Some(Fix::Delete { .. }))),
        "{p:?}"
    );
    assert!(p.notes.iter().any(|n| n.contains("is kept")), "{p:?}");
    // Once meshConfig agrees with the policy, the old object goes.
    let p = plan(&input(None));
    let f = find_in(&p, "PeerAuthentication/root/meshwarden-mtls");
    assert!(matches!(f.fix, Some(Fix::Delete { .. })), "{f:?}");
}

#[test]
fn a_removed_exemption_stays_while_pods_without_sidecar_rely_on_it() {
    let s = spec("{mode: STRICT, rootNamespace: root}");
    let nss = [ns("root", &[]), ns("legacy", &[])];
    let root = pa("root", "default", 9, json!({"mtls": {"mode": "STRICT"}}));
    let old = ours(
        pa(
            "legacy",
            "meshwarden-exemption-0123456789",
            5,
            json!({"mtls": {"mode": "PERMISSIVE"}}),
        ),
        "p",
    );
    let p = run(
        &s,
        &nss,
        &[root.clone(), old.clone()],
        &[pod("legacy", "cron", false)],
    );
    let f = find_in(
        &p,
        "PeerAuthentication/legacy/meshwarden-exemption-0123456789",
    );
    assert!(
        f.fix.is_none() && f.message.contains("left in place"),
        "{f:?}"
    );
    // Without such pods it goes.
    let p = run(&s, &nss, &[root, old], &[]);
    let f = find_in(
        &p,
        "PeerAuthentication/legacy/meshwarden-exemption-0123456789",
    );
    assert!(matches!(f.fix, Some(Fix::Delete { .. })), "{f:?}");
}

#[test]
fn namespace_selector_exemptions_expand_to_each_selected_namespace() {
    let s = spec(
        r#"{mode: STRICT, rootNamespace: root, exemptions: [
            {namespace: a},
            {namespaceSelector: {matchLabels: {legacy: "true"}}},
            {namespaceSelector: {matchLabels: {legacy: "true"}}, selector: {matchLabels: {app: x}}}
        ]}"#,
    );
    let nss = [
        ns("root", &[]),
        ns("a", &[("legacy", "true")]),
        ns("b", &[("legacy", "true")]),
        ns("c", &[]),
    ];
    let ex = expand_exemptions(&s.exemptions, &nss);
    let got: Vec<(&str, bool)> = ex
        .iter()
        .map(|e| (e.namespace.as_str(), e.selector.is_some()))
        .collect();
    assert_eq!(
        got,
        vec![("a", false), ("b", false), ("a", true), ("b", true)],
        "a is exempted once; b by the selector"
    );
    assert!(ex.iter().all(|e| e.namespace_selector.is_none()));
    let expanded = MtlsSpec {
        exemptions: ex,
        ..s.clone()
    };
    let p = run(&expanded, &nss, &[], &[pod("b", "cron", false)]);
    assert_eq!(p.exemptions.len(), 4, "{:?}", p.exemptions);
    assert!(blockers(&[pod("b", "cron", false)], &nss, &expanded.exemptions).is_empty());
}
