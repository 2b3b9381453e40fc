//! The proxy's drain settings, read from a `ProxyConfig` document (the mesh config's
//! `defaultConfig`, or a pod template's `proxy.istio.io/config` annotation) and kept in a few
//! bytes.
//!
//! pilot-agent's drain (`Agent.terminate`, `pkg/envoy/agent.go`): on SIGTERM it drains Envoy's
//! listeners, then either waits `terminationDrainDuration` (the mesh default is 5 s,
//! `DefaultProxyConfig`, `pkg/config/mesh/mesh.go`) and stops Envoy, or, with
//! `EXIT_ON_ZERO_ACTIVE_CONNECTIONS=true` in `proxyMetadata` (an environment variable of the
//! proxy, `pilot/cmd/pilot-agent/options/options.go`), sleeps `MINIMUM_DRAIN_DURATION`
//! (default 5 s) and then polls Envoy every second until no downstream connection is active:
//! `terminationDrainDuration` is not read, and nothing but the kubelet's SIGKILL at the end of
//! the pod's grace period ends a drain whose connections stay open. The injector merges the
//! annotation over the mesh's `defaultConfig` (`mesh.ApplyProxyConfig`,
//! `pkg/kube/inject/webhook.go`): a field of the annotation replaces the mesh's, and
//! `proxyMetadata` is merged key by key (`MergeProxyConfig`).

/// The annotation a pod template sets its proxy's config with.
pub const PROXY_CONFIG_ANNOTATION: &str = "proxy.istio.io/config";

/// `terminationDrainDuration` when neither the mesh nor the workload sets it, in milliseconds.
pub const DEFAULT_DRAIN_MS: u32 = 5_000;

/// `MINIMUM_DRAIN_DURATION` when unset, in milliseconds.
pub const DEFAULT_MINIMUM_DRAIN_MS: u32 = 5_000;

/// The `proxyMetadata` keys read.
pub const EXIT_ON_ZERO: &str = "EXIT_ON_ZERO_ACTIVE_CONNECTIONS";
pub const MINIMUM_DRAIN: &str = "MINIMUM_DRAIN_DURATION";

/// What one `ProxyConfig` document sets of the drain (`None`: not set there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drain {
    /// `terminationDrainDuration`, in milliseconds.
    pub duration_ms: Option<u32>,
    /// `proxyMetadata.EXIT_ON_ZERO_ACTIVE_CONNECTIONS`.
    pub exit_on_zero: Option<bool>,
    /// `proxyMetadata.MINIMUM_DRAIN_DURATION`, in milliseconds.
    pub minimum_ms: Option<u32>,
}

/// How a proxy drains once every setting is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effective {
    /// Waits this long, then stops Envoy.
    Fixed { ms: u32 },
    /// Waits `minimum_ms`, then until no connection is active (no bound of its own).
    UntilIdle { minimum_ms: u32 },
}

impl Drain {
    /// Reads a `ProxyConfig` document (YAML or JSON). Unreadable: nothing set (the injector
    /// refuses such an annotation, and the mesh config is validated by istiod).
    pub fn parse(doc: &str) -> Drain {
        match serde_yaml::from_str::<serde_json::Value>(doc) {
            Ok(v) => Drain::read(&v),
            Err(_) => Drain::default(),
        }
    }

    /// Reads a parsed `ProxyConfig`.
    pub fn read(v: &serde_json::Value) -> Drain {
        let meta = |k: &str| {
            v.get("proxyMetadata")
                .and_then(|m| m.get(k))
                .and_then(|s| s.as_str())
        };
        Drain {
            duration_ms: v
                .get("terminationDrainDuration")
                .and_then(|d| d.as_str())
                .and_then(duration_ms),
            exit_on_zero: meta(EXIT_ON_ZERO).and_then(go_bool),
            minimum_ms: meta(MINIMUM_DRAIN).and_then(duration_ms),
        }
    }

    /// These settings over `base` (the annotation over the mesh's `defaultConfig`).
    pub fn over(self, base: Drain) -> Drain {
        Drain {
            duration_ms: self.duration_ms.or(base.duration_ms),
            exit_on_zero: self.exit_on_zero.or(base.exit_on_zero),
            minimum_ms: self.minimum_ms.or(base.minimum_ms),
        }
    }

    /// What the agent does with these settings (the defaults filled in).
    pub fn effective(self) -> Effective {
        if self.exit_on_zero == Some(true) {
            Effective::UntilIdle {
                minimum_ms: self.minimum_ms.unwrap_or(DEFAULT_MINIMUM_DRAIN_MS),
            }
        } else {
            Effective::Fixed {
                ms: self.duration_ms.unwrap_or(DEFAULT_DRAIN_MS),
            }
        }
    }
}

/// The pod template's `terminationGracePeriodSeconds` (`None`: unset, Kubernetes' 30 s) and
/// the drain settings of its `proxy.istio.io/config` annotation.
pub fn of_template(
    template: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>,
) -> (Option<u32>, Drain) {
    let grace = template
        .and_then(|t| t.spec.as_ref())
        .and_then(|s| s.termination_grace_period_seconds)
        .map(|g| u32::try_from(g.max(0)).unwrap_or(u32::MAX));
    let drain = template
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(PROXY_CONFIG_ANNOTATION))
        .map_or_else(Drain::default, |d| Drain::parse(d));
    (grace, drain)
}

/// Whether the pod's `istio-proxy` is a native sidecar (an init container that restarts
/// always): the injector's preStop hook starts its drain (`pilot-agent request POST drain`),
/// and the agent exits as soon as the app containers have stopped (`Agent.DrainNow`), so
/// neither `terminationDrainDuration` nor `EXIT_ON_ZERO_ACTIVE_CONNECTIONS` applies.
pub fn native_sidecar(spec: Option<&k8s_openapi::api::core::v1::PodSpec>) -> bool {
    spec.and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.name == "istio-proxy" && c.restart_policy.as_deref() == Some("Always"))
        })
}

/// Go's `strconv.ParseBool`, which the agent's environment variables are read with.
fn go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// A duration as protobuf's JSON (`"5s"`, `"0.5s"`) or Go (`"1m30s"`, `"500ms"`) writes it,
/// in milliseconds (saturating).
pub fn duration_ms(s: &str) -> Option<u32> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if s == "0" {
        return Some(0);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1_000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    // Saturating float-to-int conversion.
    Some(total.round().min(f64::from(u32::MAX)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_go_and_protobuf_write_them() {
        assert_eq!(duration_ms("5s"), Some(5_000));
        assert_eq!(duration_ms("0.5s"), Some(500));
        assert_eq!(duration_ms("1m30s"), Some(90_000));
        assert_eq!(duration_ms("500ms"), Some(500));
        assert_eq!(duration_ms("1h"), Some(3_600_000));
        assert_eq!(duration_ms("0"), Some(0));
        assert_eq!(duration_ms("5"), None);
        assert_eq!(duration_ms("five"), None);
        assert_eq!(duration_ms(""), None);
    }

    #[test]
    fn the_annotation_overrides_the_mesh_field_by_field() {
        let mesh = Drain::parse(
            "terminationDrainDuration: 20s\nproxyMetadata: {EXIT_ON_ZERO_ACTIVE_CONNECTIONS: 'true'}\n",
        );
        assert_eq!(
            mesh,
            Drain {
                duration_ms: Some(20_000),
                exit_on_zero: Some(true),
                minimum_ms: None
            }
        );
        // proxyMetadata merges key by key: the mesh's EXIT_ON_ZERO stays.
        let pod = Drain::parse("{proxyMetadata: {MINIMUM_DRAIN_DURATION: 40s}}");
        let d = pod.over(mesh);
        assert_eq!(d.effective(), Effective::UntilIdle { minimum_ms: 40_000 });
        let off = Drain::parse("proxyMetadata:\n  EXIT_ON_ZERO_ACTIVE_CONNECTIONS: \"false\"\n");
        assert_eq!(off.over(mesh).effective(), Effective::Fixed { ms: 20_000 });
        assert_eq!(
            Drain::default().effective(),
            Effective::Fixed {
                ms: DEFAULT_DRAIN_MS
            }
        );
        assert_eq!(Drain::parse("{not yaml"), Drain::default());
    }

    #[test]
    fn a_template_gives_its_grace_period_and_drain_and_a_pod_whether_its_sidecar_is_native() {
        let t: k8s_openapi::api::core::v1::PodTemplateSpec = serde_json::from_value(serde_json::json!({
            "metadata": {"annotations": {PROXY_CONFIG_ANNOTATION: "terminationDrainDuration: 45s"}},
            "spec": {"terminationGracePeriodSeconds": 60, "containers": []}
        }))
        .unwrap();
        let (grace, drain) = of_template(Some(&t));
        assert_eq!(grace, Some(60));
        assert_eq!(drain.duration_ms, Some(45_000));
        assert_eq!(of_template(None), (None, Drain::default()));
        let spec = |init: serde_json::Value| -> k8s_openapi::api::core::v1::PodSpec {
            serde_json::from_value(serde_json::json!({"containers": [], "initContainers": init}))
                .unwrap()
        };
        let native = spec(serde_json::json!([{"name": "istio-proxy", "restartPolicy": "Always"}]));
        assert!(native_sidecar(Some(&native)));
        // istio-init, or a proxy as a regular container: not native.
        assert!(!native_sidecar(Some(&spec(
            serde_json::json!([{"name": "istio-init"}])
        ))));
        assert!(!native_sidecar(None));
    }
}
