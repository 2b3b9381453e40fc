use super::testutil::*;
use super::*;

/// Raising the user's mesh-wide default to STRICT goes out only after the exemption that
/// keeps legacy PERMISSIVE exists; deletions last.
#[test]
fn exemptions_are_written_before_anything_turns_strict() {
    let s = spec("{mode: STRICT, rootNamespace: root, exemptions: [{namespace: legacy}]}");
    let nss = [ns("root", &[]), ns("legacy", &[]), ns("shop", &[])];
    let pas = [pa(
        "root",
        "default",
        100,
        serde_json::json!({"mtls": {"mode": "PERMISSIVE"}}),
    )];
    let p = run(&s, &nss, &pas, &[]);
    let phase = |ns: &str| {
        p.findings
            .iter()
            .filter_map(|f| f.fix.as_ref())
            .find(|f| matches!(f, Fix::Apply { namespace, .. } if namespace == ns))
            .map(Fix::phase)
    };
    assert_eq!(phase("legacy"), Some(0), "{:#?}", p.findings);
    assert_eq!(phase("root"), Some(1), "{:#?}", p.findings);
    let apply = |patch: Value| Fix::Apply {
        namespace: "n".into(),
        name: "x".into(),
        patch,
        takeovers: vec![],
    };
    let mixed = serde_json::json!({"spec": {"mtls": {"mode": "STRICT"},
        "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}});
    assert_eq!(
        apply(mixed).phase(),
        0,
        "a PERMISSIVE port lets plain text in"
    );
    let labels_only = serde_json::json!({"metadata": {"labels": {"a": "b"}}});
    assert_eq!(apply(labels_only).phase(), 0);
    let delete = Fix::Delete {
        namespace: "n".into(),
        name: "x".into(),
    };
    assert_eq!(delete.phase(), 2);
}

#[test]
fn fingerprints_ignore_what_does_not_matter() {
    let mut a = ObjectMeta {
        labels: Some([("app".to_string(), "x".to_string())].into()),
        ..Default::default()
    };
    let base = pod_fingerprint(&a);
    a.resource_version = Some("42".into());
    a.annotations = Some([("other".to_string(), "y".to_string())].into());
    assert_eq!(pod_fingerprint(&a), base);
    a.annotations = Some([(SIDECAR_STATUS.to_string(), "{}".to_string())].into());
    assert_ne!(pod_fingerprint(&a), base);
}
