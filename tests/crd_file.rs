//! The committed CRD files are exactly what the Rust types generate.

#[test]
fn committed_crd_matches_the_types() {
    let generated = meshwarden::api::crd_yaml().unwrap();
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

/// The hazard of the report: `- Off` unquoted reads as `false` to kubectl and Helm.
#[test]
fn committed_crd_quotes_enum_values_yaml_1_1_reads_as_booleans() {
    for path in [
        "crds/meshpolicies.meshwarden.io.yaml",
        "charts/meshwarden/crds/meshpolicies.yaml",
        "deploy/install/meshwarden.yaml",
    ] {
        let text =
            std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        assert!(text.contains("- \"Off\""), "{path} has no quoted Off");
        for line in text.lines() {
            let value = line.trim().trim_start_matches("- ");
            let value = value.rsplit_once(": ").map_or(value, |(_, v)| v);
            assert!(
                !matches!(
                    value.to_ascii_lowercase().as_str(),
                    "off" | "on" | "yes" | "no" | "y" | "n"
                ),
                "{path}: unquoted YAML 1.1 boolean in {line:?}"
            );
        }
    }
}
