//! Unit tests of the injection decision, revisions, versions and mesh config.
use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn revisions() -> Revisions {
    Revisions {
        live: [
            ("default".to_string(), ["istio-system".to_string()].into()),
            ("canary".to_string(), ["istio-system".to_string()].into()),
        ]
        .into(),
        tags: [("prod".to_string(), "canary".to_string())].into(),
        ..Revisions::default()
    }
}

#[test]
fn injection_follows_the_injector_webhook_selectors() {
    let r = revisions();
    let on = |l: &[(&str, &str)]| namespace_injection(&labels(l), &r);
    assert_eq!(on(&[("istio-injection", "enabled")]), Injection::On);
    assert_eq!(on(&[("istio.io/rev", "canary")]), Injection::On);
    assert_eq!(
        on(&[("istio-injection", "enabled"), ("istio.io/rev", "canary")]),
        Injection::On
    );
    assert_eq!(
        on(&[("istio-injection", "disabled"), ("istio.io/rev", "canary")]),
        Injection::Off,
        "istio-injection=disabled wins over a revision label"
    );
    assert_eq!(on(&[]), Injection::Off);
}

#[test]
fn revision_labels_resolve_against_live_revisions_and_tags() {
    let r = revisions();
    assert_eq!(r.resolve("canary"), Some("canary"));
    assert_eq!(
        r.resolve("prod"),
        Some("canary"),
        "a tag names its revision"
    );
    assert_eq!(r.resolve("gone"), None);
    // A tag whose revision is gone serves nothing.
    let mut dangling = r.clone();
    dangling.tags.insert("old".into(), "retired".into());
    assert_eq!(dangling.resolve("old"), None);
    assert_eq!(
        namespace_injection(&labels(&[("istio.io/rev", "old")]), &dangling),
        Injection::UnknownRevision("old".into())
    );
    assert!(
        dangling
            .unknown_message("old")
            .contains("revision tag of revision retired, whose istiod no longer runs"),
        "{}",
        dangling.unknown_message("old")
    );
    assert!(r.default_injector());
    let mut canary_only = r.clone();
    canary_only.live.remove("default");
    assert!(!canary_only.default_injector(), "a revision-only install");
    canary_only.tags.insert("default".into(), "canary".into());
    assert!(canary_only.default_injector(), "the default tag");
    assert_eq!(
        namespace_injection(&labels(&[("istio.io/rev", "gone")]), &r),
        Injection::UnknownRevision("gone".into())
    );
    assert!(namespace_injection_on(
        &labels(&[("istio.io/rev", "prod")]),
        &r
    ));
    // `istio-injection=enabled` is the default injector's, whatever the revision label.
    assert!(namespace_injection_on(
        &labels(&[("istio-injection", "enabled"), ("istio.io/rev", "gone")]),
        &r
    ));
    assert!(Revisions::any().resolve("gone").is_some());
    let msg = r.unknown_message("gone");
    assert!(
        msg.contains("istio.io/rev=gone") && msg.contains("prod (tag)"),
        "{msg}"
    );
}

#[test]
fn versions_are_image_tags() {
    assert_eq!(
        image_tag("docker.io/istio/pilot:1.31-dev"),
        Some("1.31-dev")
    );
    assert_eq!(
        image_tag("localhost:5000/istio/proxyv2:1.30.2"),
        Some("1.30.2")
    );
    assert_eq!(
        image_tag("gcr.io/istio/proxyv2:1.29.1-distroless@sha256:abc"),
        Some("1.29.1-distroless")
    );
    assert_eq!(image_tag("localhost:5000/istio/proxyv2"), None);
    assert_eq!(image_tag("istio/proxyv2@sha256:abc"), None);
    let d: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "istiod-canary", "labels": {"app": "istiod", "istio.io/rev": "canary"}},
        "spec": {"selector": {}, "template": {"spec": {"containers": [
            {"name": "discovery", "image": "docker.io/istio/pilot:1.30.1"}]}}},
    }))
    .unwrap();
    assert_eq!(
        injected_revision(r#"{"containers":["istio-proxy"],"revision":"canary"}"#).as_deref(),
        Some("canary")
    );
    assert_eq!(injected_revision("{}"), None);
    assert_eq!(injected_revision("x"), None);
    let i = Istiod::from(&d);
    assert_eq!(
        (i.revision.as_str(), i.version.as_str()),
        ("canary", "1.30.1")
    );
}

#[test]
fn each_revision_has_its_mesh_config_map() {
    assert_eq!(mesh_config_map("default"), "istio");
    assert_eq!(mesh_config_map(""), "istio");
    assert_eq!(mesh_config_map("canary"), "istio-canary");
}

#[test]
fn root_namespace_comes_from_mesh_config_or_istiods_namespace() {
    let maps = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let live = |revs: &[&str]| -> BTreeSet<String> { revs.iter().map(|r| r.to_string()).collect() };
    let none = BTreeSet::new();
    let set = "trustDomain: cluster.local\nrootNamespace: \"istio-config\"\n";
    let root = mesh_root(
        "istio-system",
        &live(&["default"]),
        &maps(&[("istio", set)]),
        &none,
    )
    .unwrap();
    assert_eq!(root.namespace, "istio-config");
    assert!(root.from_mesh_config);
    assert!(
        root.source.contains("ConfigMap istio-system/istio"),
        "{}",
        root.source
    );

    // Not set: istiod's namespace.
    let unset = "trustDomain: cluster.local\n";
    let root = mesh_root(
        "istiod-ns",
        &live(&["default"]),
        &maps(&[("istio", unset)]),
        &none,
    )
    .unwrap();
    assert_eq!(root.namespace, "istiod-ns");
    assert!(root.from_mesh_config);

    // A canary revision alone reads istio-canary; another revision's ConfigMap is ignored.
    let root = mesh_root(
        "istio-system",
        &live(&["canary"]),
        &maps(&[("istio", set), ("istio-canary", "rootNamespace: c\n")]),
        &none,
    )
    .unwrap();
    assert_eq!(root.namespace, "c");

    // No mesh config: assumed, and said so.
    let root = mesh_root("istio-system", &live(&[]), &maps(&[]), &none).unwrap();
    assert_eq!(root.namespace, "istio-system");
    assert!(!root.from_mesh_config);
    assert!(root.source.contains("assumed"));

    // No istiod here: any istio / istio-<rev> mesh config counts.
    let root = mesh_root(
        "istio-system",
        &live(&[]),
        &maps(&[("istio-x", set)]),
        &none,
    )
    .unwrap();
    assert_eq!(root.namespace, "istio-config");

    // Revisions that disagree, and a mesh config that is not YAML.
    let err = mesh_root(
        "istio-system",
        &live(&["default", "canary"]),
        &maps(&[("istio", set), ("istio-canary", "rootNamespace: other\n")]),
        &none,
    )
    .unwrap_err();
    let MeshRootError::Unclear(err) = err else {
        panic!("{err:?}")
    };
    assert!(
        err.contains("istio-config") && err.contains("other"),
        "{err}"
    );
    let err = mesh_root(
        "istio-system",
        &live(&["default"]),
        &maps(&[("istio", "a: [")]),
        &none,
    )
    .unwrap_err();
    let MeshRootError::Unreadable(err) = err else {
        panic!("{err:?}")
    };
    assert!(err.contains("istio-system/istio"), "{err}");
}

/// A mesh config seen since the watch started and gone now makes the root namespace unknown,
/// never assumed: absent since the start is istiod's defaults, gone is most likely a moment
/// of an installer re-creating it.
#[test]
fn a_mesh_config_seen_and_gone_leaves_the_root_namespace_unknown() {
    let names = |n: &[&str]| -> BTreeSet<String> { n.iter().map(|r| r.to_string()).collect() };
    let set = "rootNamespace: istio-config\n";
    let maps = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    // The default revision's mesh config, seen, then deleted.
    let err = mesh_root(
        "istio-system",
        &names(&["default"]),
        &maps(&[]),
        &names(&["istio"]),
    )
    .unwrap_err();
    let MeshRootError::Unreadable(err) = err else {
        panic!("{err:?}")
    };
    assert!(err.contains("ConfigMap istio-system/istio"), "{err}");
    // No istiod here (a control plane elsewhere, a bare API server): the same once none is
    // left.
    assert!(mesh_root("istio-system", &names(&[]), &maps(&[]), &names(&["istio"])).is_err());
    // A revision removed with its istiod: its mesh config is no longer wanted.
    let root = mesh_root(
        "istio-system",
        &names(&["default"]),
        &maps(&[("istio", set)]),
        &names(&["istio", "istio-canary"]),
    )
    .unwrap();
    assert_eq!(root.namespace, "istio-config");
    // Back: read again.
    let root = mesh_root(
        "istio-system",
        &names(&[]),
        &maps(&[("istio", set)]),
        &names(&["istio"]),
    )
    .unwrap();
    assert_eq!(root.namespace, "istio-config");
}

#[test]
fn mesh_config_maps_keep_only_the_mesh_key() {
    let mut cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "istio", "namespace": "istio-system", "resourceVersion": "3"},
        "data": {"mesh": "rootNamespace: x", "meshNetworks": "networks: {}"},
    }))
    .unwrap();
    strip_config_map(&mut cm);
    assert_eq!(cm.data.as_ref().map(|d| d.len()), Some(1));
    assert!(cm.metadata.resource_version.is_none());
    let mut other: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "kube-root-ca.crt"}, "data": {"mesh": "x", "ca.crt": "y"},
    }))
    .unwrap();
    strip_config_map(&mut other);
    assert!(other.data.is_none());
}

#[test]
fn a_pods_dataplane_mode_overrides_its_namespaces() {
    let ambient_ns = labels(&[(DATAPLANE_MODE_LABEL, "ambient")]);
    let plain = labels(&[]);
    assert!(ambient(&ambient_ns, None));
    assert!(!ambient(&plain, None));
    assert!(!ambient(&labels(&[(DATAPLANE_MODE_LABEL, "none")]), None));
    assert!(
        ambient(&ambient_ns, Some(&plain)),
        "no label: the namespace's"
    );
    let none = labels(&[(DATAPLANE_MODE_LABEL, "none")]);
    assert!(!ambient(&ambient_ns, Some(&none)), "opted out");
    let opted_in = labels(&[(DATAPLANE_MODE_LABEL, "ambient")]);
    assert!(ambient(&plain, Some(&opted_in)));
}

#[test]
fn an_istiod_template_serves_once_no_older_pod_is_left() {
    let d = |status: serde_json::Value| -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "istiod", "generation": 3},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": status,
        }))
        .unwrap()
    };
    // A helm upgrade whose new pods never become ready: the old ReplicaSet still serves.
    let stuck = d(
        serde_json::json!({"observedGeneration": 3, "replicas": 3, "updatedReplicas": 1,
        "conditions": [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]}),
    );
    assert!(!serves_template(&stuck));
    assert!(!serves_template(&d(
        serde_json::json!({"observedGeneration": 2})
    )));
    assert!(serves_template(&d(
        serde_json::json!({"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2})
    )));
    assert!(serves_template(&d(
        serde_json::json!({"observedGeneration": 3, "replicas": 1, "updatedReplicas": 1,
        "conditions": [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]})
    )));
    let mut r = Revisions::default();
    r.add(&Istiod::from(&stuck), "istio-system".into());
    assert!(r.settling.contains("default"));
}

#[test]
fn injector_webhooks_name_tags_and_external_revisions() {
    let mwc = |name: &str, labels: serde_json::Value, client: serde_json::Value| {
        let m: MutatingWebhookConfiguration = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels},
            "webhooks": [{"name": "rev.namespace.sidecar-injector.istio.io",
                "clientConfig": client, "admissionReviewVersions": ["v1"],
                "sideEffects": "None"}],
        }))
        .unwrap();
        Injector::from(&m)
    };
    let svc =
        serde_json::json!({"service": {"name": "istiod-remote", "namespace": "istio-system"}});
    let url = serde_json::json!({"url": "https://istiod.example:15017/inject"});
    let mut r = Revisions::default();
    // A remote cluster's injector: the external istiod's URL, no local Deployment.
    r.add_injector(&mwc(
        "istio-sidecar-injector-remote",
        serde_json::json!({"istio.io/rev": "remote"}),
        url.clone(),
    ));
    // A revision whose istiod (a Service of the cluster) is gone: not live.
    r.add_injector(&mwc(
        "istio-sidecar-injector-gone",
        serde_json::json!({"istio.io/rev": "gone"}),
        svc,
    ));
    r.add_injector(&mwc(
        "istio-revision-tag-prod",
        serde_json::json!({"istio.io/rev": "remote", "istio.io/tag": "prod"}),
        url,
    ));
    assert!(r.live.contains_key("remote"));
    assert!(!r.live.contains_key("gone"));
    assert_eq!(r.resolve("prod"), Some("remote"));
    assert_eq!(
        namespace_injection(&labels(&[("istio.io/rev", "remote")]), &r),
        Injection::On
    );
    // Its version is not known: its proxies are never judged outdated (no versions).
    assert!(!r.versions.contains_key("remote"));
}
