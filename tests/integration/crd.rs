//! The CRD installs and every shipped example is accepted by the API server.
use kube::api::{Api, PostParams};
use meshwarden::api::MeshPolicy;

use crate::common;

#[tokio::test]
async fn crd_installs_and_examples_are_accepted() {
    let env = common::env("crd").await;
    let api: Api<MeshPolicy> = Api::all(env.client.clone());
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut p: MeshPolicy = serde_yaml::from_str(&text).unwrap();
        p.metadata.name = Some(format!("{}-{}", env.id, p.metadata.name.clone().unwrap()));
        let created = api
            .create(&PostParams::default(), &p)
            .await
            .unwrap_or_else(|e| panic!("{} rejected: {e}", path.display()));
        // What the server stored reads back as the same spec (defaults filled in).
        assert_eq!(created.spec.enforcement, p.spec.enforcement);
        api.delete(&created.metadata.name.clone().unwrap(), &Default::default())
            .await
            .unwrap();
        n += 1;
    }
    assert!(
        n >= 2,
        "expected the examples in deploy/examples, found {n}"
    );
}

#[tokio::test]
async fn defaults_are_applied_by_the_server() {
    let env = common::env("defaults").await;
    let p = env
        .create_policy("d", "controlPlane: {replicas: {min: 2}}\nsidecars: {resources: {requests: {cpu: 100m}}}\nmtls: {mode: STRICT}")
        .await;
    assert_eq!(p.spec.enforcement, meshwarden::api::Enforcement::Audit);
    assert_eq!(
        p.spec.control_plane.as_ref().unwrap().namespace,
        "istio-system"
    );
    assert_eq!(p.spec.sidecars.as_ref().unwrap().max_concurrent_rollouts, 1);
    let m = p.spec.mtls.as_ref().unwrap();
    assert_eq!(m.scope, meshwarden::api::MtlsScope::Mesh);
    // No default: unset, the root namespace is read from Istio's mesh config.
    assert_eq!(m.root_namespace, None);
}
