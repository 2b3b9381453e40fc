//! The committed CRD files are exactly what the Rust types generate.
use kube::CustomResourceExt;
use meshwarden::api::MeshPolicy;

#[test]
fn committed_crd_matches_the_types() {
    let generated = serde_yaml::to_string(&MeshPolicy::crd()).unwrap();
    for path in [
        "crds/meshpolicies.meshwarden.io.yaml",
        "charts/meshwarden/crds/meshpolicies.yaml",
    ] {
        let full = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
        let Ok(committed) = std::fs::read_to_string(&full) else {
            assert!(
                path.starts_with("charts"),
                "{path} is missing: run `cargo run -- crd > {path}`"
            );
            continue;
        };
        assert!(
            committed == generated,
            "{path} is out of date with src/api.rs: run `cargo run -- crd > {path}`"
        );
    }
}
