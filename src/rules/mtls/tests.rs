use super::*;

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
