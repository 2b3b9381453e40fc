//! The mutual TLS mode Istio applies to a workload, computed from PeerAuthentication objects the
//! way istiod composes them (`ComposePeerAuthentication` in Istio's `pilot/pkg/model`), so that
//! lifecycle tests can check what every namespace's clients get after each step:
//!
//! - one mesh-wide object: the oldest selector-less PeerAuthentication in the root namespace
//!   (objects with a selector there are ignored);
//! - one namespace-wide object: the oldest selector-less one in the workload's namespace;
//! - one workload object: the oldest one in the workload's namespace whose `matchLabels` all
//!   match the workload's labels;
//! - the mode starts PERMISSIVE; each level whose mode is set (not `UNSET`) replaces it, mesh
//!   then namespace then workload; a port-level mode of the workload object applies to its port
//!   (`UNSET` there takes the workload's mode).
//!
//! "Oldest" is by creation time, then name (the order Istio lists configs in).

use std::collections::BTreeMap;

use serde_json::Value;

/// A mutual TLS mode as Istio applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    /// Plain text only.
    Disable,
    /// mTLS and plain text.
    Permissive,
    /// mTLS only.
    Strict,
}

impl Mode {
    fn parse(v: Option<&str>) -> Option<Mode> {
        match v? {
            "STRICT" => Some(Mode::Strict),
            "PERMISSIVE" => Some(Mode::Permissive),
            "DISABLE" => Some(Mode::Disable),
            _ => None,
        }
    }

    /// Whether a client without a sidecar (plain text) can connect.
    pub fn admits_plain_text(self) -> bool {
        self != Mode::Strict
    }
}

/// A PeerAuthentication, reduced to what Istio composes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub namespace: String,
    pub name: String,
    /// `metadata.creationTimestamp` (RFC 3339, which sorts by time).
    pub created: String,
    /// `spec.selector.matchLabels`; empty: namespace-wide (mesh-wide in the root namespace).
    pub selector: BTreeMap<String, String>,
    /// `spec.mtls.mode`; `None` for `UNSET` or no mode.
    pub mode: Option<Mode>,
    /// `spec.portLevelMtls`: port -> mode (`None` for `UNSET`).
    pub ports: BTreeMap<u32, Option<Mode>>,
}

impl PeerAuthentication {
    /// Reads an object as returned by the API server (JSON, or YAML parsed into JSON).
    pub fn from_value(v: &Value) -> PeerAuthentication {
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or_default();
        let selector = v
            .pointer("/spec/selector/matchLabels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let ports = v
            .pointer("/spec/portLevelMtls")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(port, mtls)| {
                        let port = port.parse().ok()?;
                        Some((port, Mode::parse(mtls["mode"].as_str())))
                    })
                    .collect()
            })
            .unwrap_or_default();
        PeerAuthentication {
            namespace: s("/metadata/namespace").to_string(),
            name: s("/metadata/name").to_string(),
            created: s("/metadata/creationTimestamp").to_string(),
            selector,
            mode: Mode::parse(v.pointer("/spec/mtls/mode").and_then(Value::as_str)),
            ports,
        }
    }

    fn age(&self) -> (&str, &str) {
        (&self.created, &self.name)
    }
}

/// The mode Istio applies to inbound traffic of a workload with `labels` in `namespace`, on
/// `port` (`None`: a port without a port-level setting).
pub fn effective_mode(
    all: &[PeerAuthentication],
    root_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    port: Option<u32>,
) -> Mode {
    let oldest = |f: &dyn Fn(&PeerAuthentication) -> bool| {
        all.iter()
            .filter(|p| f(p))
            .min_by(|a, b| a.age().cmp(&b.age()))
    };
    let mesh = oldest(&|p| p.namespace == root_namespace && p.selector.is_empty());
    let namespace_wide = oldest(&|p| {
        p.namespace == namespace && namespace != root_namespace && p.selector.is_empty()
    });
    let workload = oldest(&|p| {
        p.namespace == namespace
            && namespace != root_namespace
            && !p.selector.is_empty()
            && p.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    });
    let mut mode = Mode::Permissive;
    for level in [mesh, namespace_wide, workload].into_iter().flatten() {
        if let Some(m) = level.mode {
            mode = m;
        }
    }
    if let (Some(w), Some(port)) = (workload, port)
        && let Some(port_mode) = w.ports.get(&port)
    {
        return port_mode.unwrap_or(mode);
    }
    mode
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pas(yaml: &str) -> Vec<PeerAuthentication> {
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| {
                let v: Value = serde::Deserialize::deserialize(d).unwrap();
                PeerAuthentication::from_value(&v)
            })
            .collect()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn mode(all: &[PeerAuthentication], ns: &str, l: &[(&str, &str)], port: Option<u32>) -> Mode {
        effective_mode(all, "istio-system", ns, &labels(l), port)
    }

    #[test]
    fn nothing_or_unset_at_the_mesh_level_is_permissive() {
        assert_eq!(mode(&[], "shop", &[], None), Mode::Permissive);
        let all = pas(r#"
metadata: {namespace: istio-system, name: default, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: UNSET}}
"#);
        assert_eq!(mode(&all, "shop", &[], None), Mode::Permissive);
    }

    #[test]
    fn namespace_overrides_mesh_and_unset_inherits() {
        let all = pas(r#"
metadata: {namespace: istio-system, name: default, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: STRICT}}
---
metadata: {namespace: legacy, name: open, creationTimestamp: "2026-01-02T00:00:00Z"}
spec: {mtls: {mode: PERMISSIVE}}
---
metadata: {namespace: shop, name: inherit, creationTimestamp: "2026-01-02T00:00:00Z"}
spec: {mtls: {mode: UNSET}}
"#);
        assert_eq!(mode(&all, "legacy", &[], None), Mode::Permissive);
        assert_eq!(mode(&all, "shop", &[], None), Mode::Strict);
        assert_eq!(mode(&all, "other", &[], None), Mode::Strict);
    }

    #[test]
    fn the_oldest_selector_less_object_wins_and_root_selectors_are_ignored() {
        let all = pas(r#"
metadata: {namespace: istio-system, name: newer, creationTimestamp: "2026-01-03T00:00:00Z"}
spec: {mtls: {mode: STRICT}}
---
metadata: {namespace: istio-system, name: older, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: PERMISSIVE}}
---
metadata: {namespace: istio-system, name: workloads, creationTimestamp: "2025-01-01T00:00:00Z"}
spec: {selector: {matchLabels: {app: a}}, mtls: {mode: DISABLE}}
---
metadata: {namespace: shop, name: b, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: STRICT}}
---
metadata: {namespace: shop, name: a, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: DISABLE}}
"#);
        assert_eq!(mode(&all, "other", &[("app", "a")], None), Mode::Permissive);
        // Same creation time: the name decides.
        assert_eq!(mode(&all, "shop", &[], None), Mode::Disable);
    }

    #[test]
    fn workload_and_port_levels() {
        let all = pas(r#"
metadata: {namespace: istio-system, name: default, creationTimestamp: "2026-01-01T00:00:00Z"}
spec: {mtls: {mode: STRICT}}
---
metadata: {namespace: shop, name: pay, creationTimestamp: "2026-01-02T00:00:00Z"}
spec:
  selector: {matchLabels: {app: pay}}
  mtls: {mode: UNSET}
  portLevelMtls:
    "8080": {mode: PERMISSIVE}
    "9090": {mode: UNSET}
"#);
        let pay = [("app", "pay"), ("version", "v1")];
        assert_eq!(mode(&all, "shop", &pay, Some(8080)), Mode::Permissive);
        assert_eq!(mode(&all, "shop", &pay, Some(9090)), Mode::Strict);
        assert_eq!(mode(&all, "shop", &pay, None), Mode::Strict);
        assert_eq!(
            mode(&all, "shop", &[("app", "cart")], Some(8080)),
            Mode::Strict
        );
        assert!(!Mode::Strict.admits_plain_text());
        assert!(Mode::Disable.admits_plain_text());
    }
}
