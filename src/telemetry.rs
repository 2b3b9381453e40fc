//! Prometheus metrics and the HTTP endpoints `/livez`, `/readyz` and `/metrics`.
pub mod ha;
mod labels;
pub mod posture;

pub use labels::*;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Every metric meshwarden exports (names are prefixed `meshwarden_`).
pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    /// Rule sections evaluated, by section (a settled one whose inputs did not change is
    /// reused instead).
    pub section_evaluations: Family<SectionLabels, Counter>,
    pub corrections: Family<RuleLabels, Counter>,
    pub violations: Family<RuleLabels, Gauge>,
    pub policy_ready: Family<PolicyLabels, Gauge>,
    /// Running pods whose istio-proxy has other resources than the policy declares.
    pub sidecar_drift: Family<NamespaceLabels, Gauge>,
    pub leader: Gauge,
    /// Other live instances handling the same policies (`presence`).
    pub other_instances: Gauge,
    pub writes: Counter,
    /// State of every watch of the running controller (readiness, sections, `watch_synced`).
    pub watches: Arc<crate::watch::Health>,
    watch_synced: Family<WatchLabels, Gauge>,
    /// Seconds left per root certificate, computed when scraped from `roots`.
    root_expiry: Family<RootLabels, Gauge>,
    /// The roots each policy's `certificates` section found last.
    roots: std::sync::Mutex<BTreeMap<String, Vec<RootExpiry>>>,
    /// Health: set once the process serves; readiness: leader with synced watches, or standby.
    ready: AtomicBool,
    /// Policies with series, so that deleted ones can be forgotten.
    known: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// Namespaces with a `sidecar_drift` series, per policy, so that fixed ones are removed.
    drift_namespaces: Series<String>,
    pub proxies: Family<ProxyLabels, Gauge>,
    /// (revision, version) with a `proxies` series, per policy, so that gone ones are removed.
    proxy_series: Series<(String, String)>,
    /// What each HA target achieves.
    pub ha: ha::HaMetrics,
    /// The posture sections' metrics (the CA mode).
    pub posture: posture::PostureMetrics,
    /// 1 for the reason each rule section's condition carries now (fights, held rollouts).
    rule_reason: Family<ReasonLabels, Gauge>,
    /// (rule, reason) with a `rule_reason` series, per policy.
    reason_series: Series<(String, String)>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("meshwarden");
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        let section_evaluations = Family::<SectionLabels, Counter>::default();
        let corrections = Family::<RuleLabels, Counter>::default();
        let violations = Family::<RuleLabels, Gauge>::default();
        let policy_ready = Family::<PolicyLabels, Gauge>::default();
        let sidecar_drift = Family::<NamespaceLabels, Gauge>::default();
        let leader = Gauge::default();
        let other_instances = Gauge::default();
        let writes = Counter::default();
        let proxies = Family::<ProxyLabels, Gauge>::default();
        let rule_reason = Family::<ReasonLabels, Gauge>::default();
        registry.register(
            "rule_reason",
            "1 for the reason the condition of each rule section carries now (FightDetected, RolloutHeld, ...), by policy and rule",
            rule_reason.clone(),
        );
        registry.register(
            "proxies",
            "Running pods with an injected istio-proxy, by revision and proxy version (policies with an upgrades section)",
            proxies.clone(),
        );
        let watch_synced = Family::<WatchLabels, Gauge>::default();
        let root_expiry = Family::<RootLabels, Gauge>::default();
        registry.register(
            "root_certificate_expiry_seconds",
            "Seconds until a root certificate of the mesh expires (negative once expired), by SHA-256 fingerprint and subject",
            root_expiry.clone(),
        );
        registry.register(
            "watch_synced",
            "1 while the watch of a kind has listed and is watching; 0 while it lists or fails",
            watch_synced.clone(),
        );
        registry.register(
            "reconciles",
            "MeshPolicy reconciles run",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Rule sections that failed, by error kind",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of one MeshPolicy reconcile",
            reconcile_duration.clone(),
        );
        registry.register(
            "section_evaluations",
            "Rule sections evaluated, by section; a reconcile reuses the last report of a settled section that no change it reads concerns",
            section_evaluations.clone(),
        );
        registry.register(
            "corrections",
            "Objects corrected, by policy and rule",
            corrections.clone(),
        );
        registry.register(
            "violations",
            "Current deviations, by policy and rule",
            violations.clone(),
        );
        registry.register(
            "policy_ready",
            "1 when the policy's Ready condition is True",
            policy_ready.clone(),
        );
        registry.register(
            "sidecar_drift_pods",
            "Running pods whose istio-proxy has other resources than the policy declares, by namespace",
            sidecar_drift.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance writes: it holds the leader lease, or runs without leader election and is not passive",
            leader.clone(),
        );
        registry.register(
            "other_instances",
            "Other live meshwarden instances handling the same policies (more than 0: one of them is passive)",
            other_instances.clone(),
        );
        registry.register(
            "api_writes",
            "Writes sent to the Kubernetes API",
            writes.clone(),
        );
        let ha = ha::HaMetrics::default();
        ha.register(&mut registry);
        let posture = posture::PostureMetrics::default();
        posture.register(&mut registry);
        Metrics {
            registry,
            reconciles,
            section_evaluations,
            reconcile_errors,
            reconcile_duration,
            corrections,
            violations,
            policy_ready,
            sidecar_drift,
            leader,
            other_instances,
            writes,
            watches: Default::default(),
            watch_synced,
            root_expiry,
            roots: Default::default(),
            ready: AtomicBool::new(false),
            known: Default::default(),
            drift_namespaces: Default::default(),
            proxies,
            proxy_series: Default::default(),
            ha,
            posture,
            rule_reason,
            reason_series: Default::default(),
        }
    }
}

/// Per policy, the keys of a family's series and the count each was last set to.
type Series<K> = std::sync::Mutex<BTreeMap<String, BTreeMap<K, usize>>>;

/// Sets a policy's series of `family` to `counts`; keys the policy had series for before
/// (`known`) and no longer counts lose theirs.
fn replace_series<K: Ord + Clone, L: EncodeLabelSet + Clone + std::hash::Hash + Eq>(
    family: &Family<L, Gauge>,
    known: &Series<K>,
    policy: &str,
    counts: &BTreeMap<K, usize>,
    labels: impl Fn(&K) -> L,
) {
    let before = match known.lock() {
        Ok(mut m) => {
            // Most reconciles count what the last one did (thousands of series at scale).
            if m.get(policy).map_or(counts.is_empty(), |b| b == counts) {
                return;
            }
            if counts.is_empty() {
                m.remove(policy).unwrap_or_default()
            } else {
                m.insert(policy.to_string(), counts.clone())
                    .unwrap_or_default()
            }
        }
        Err(_) => BTreeMap::new(),
    };
    for key in before.keys().filter(|k| !counts.contains_key(*k)) {
        family.remove(&labels(key));
    }
    for (key, n) in counts {
        if before.get(key) != Some(n) {
            family
                .get_or_create(&labels(key))
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }
}

impl Metrics {
    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        self.watch_synced.clear();
        for (watch, state) in self.watches.snapshot() {
            self.watch_synced
                .get_or_create(&WatchLabels {
                    watch: watch.to_string(),
                })
                .set(i64::from(state == crate::watch::State::Synced));
        }
        self.root_expiry.clear();
        let now = jiff::Timestamp::now().as_second();
        if let Ok(roots) = self.roots.lock() {
            for (fingerprint, subject, not_after) in roots.values().flatten() {
                self.root_expiry
                    .get_or_create(&RootLabels {
                        fingerprint: fingerprint.clone(),
                        subject: subject.clone(),
                    })
                    .set(not_after.saturating_sub(now));
            }
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Ready: set by the controller once its caches have listed (or as a standby), and no
    /// watch is missing changes for want of the API server.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed) && self.watches.current()
    }

    /// Records that `current` are the existing policies; forgets the series of the others.
    pub fn retain_policies(&self, current: &[String]) {
        let gone: Vec<String> = match self.known.lock() {
            Ok(mut known) => {
                let gone = known
                    .iter()
                    .filter(|k| !current.contains(k))
                    .cloned()
                    .collect();
                *known = current.iter().cloned().collect();
                gone
            }
            Err(_) => Vec::new(),
        };
        for p in gone {
            self.forget_policy(&p);
        }
    }

    /// Sets the policy's `sidecar_drift_pods` series to `per_namespace` (namespace -> pods);
    /// namespaces no longer listed lose their series.
    pub fn set_sidecar_drift(&self, policy: &str, per_namespace: &BTreeMap<String, usize>) {
        replace_series(
            &self.sidecar_drift,
            &self.drift_namespaces,
            policy,
            per_namespace,
            |namespace| NamespaceLabels {
                policy: policy.to_string(),
                namespace: namespace.clone(),
            },
        );
    }

    /// Sets the policy's `proxies` series to `counts` ((revision, version) -> running pods);
    /// pairs no longer counted lose their series.
    pub fn set_proxies(&self, policy: &str, counts: &BTreeMap<(String, String), usize>) {
        replace_series(
            &self.proxies,
            &self.proxy_series,
            policy,
            counts,
            |(revision, version)| ProxyLabels {
                policy: policy.to_string(),
                revision: revision.clone(),
                version: version.clone(),
            },
        );
    }

    /// Sets the policy's `rule_reason` series to `reasons` (rule -> the reason of its
    /// condition); a rule's former reason loses its series.
    pub fn set_rule_reasons(&self, policy: &str, reasons: &BTreeMap<String, String>) {
        let counts: BTreeMap<(String, String), usize> = reasons
            .iter()
            .map(|(rule, reason)| ((rule.clone(), reason.clone()), 1))
            .collect();
        replace_series(
            &self.rule_reason,
            &self.reason_series,
            policy,
            &counts,
            |(rule, reason)| ReasonLabels {
                policy: policy.to_string(),
                rule: rule.clone(),
                reason: reason.clone(),
            },
        );
    }

    /// Records the roots `policy`'s `certificates` section found (`None`: it has none).
    pub fn set_root_certificates(&self, policy: &str, roots: Option<Vec<RootExpiry>>) {
        if let Ok(mut m) = self.roots.lock() {
            match roots {
                Some(r) => m.insert(policy.to_string(), r),
                None => m.remove(policy),
            };
        }
    }

    /// Removes the per-policy series of a deleted policy.
    pub fn forget_policy(&self, policy: &str) {
        self.set_root_certificates(policy, None);
        self.posture.set_ca_mode(policy, None);
        self.set_sidecar_drift(policy, &BTreeMap::new());
        self.set_proxies(policy, &BTreeMap::new());
        self.ha.forget(
            policy,
            &[
                crate::status::conditions::types::CONTROL_PLANE_HA,
                crate::status::conditions::types::GATEWAY_HA,
                crate::status::conditions::types::GATEWAY_API_HA,
            ],
        );
        self.set_rule_reasons(policy, &BTreeMap::new());
        self.policy_ready.remove(&PolicyLabels {
            policy: policy.to_string(),
        });
        for rule in [
            crate::status::conditions::types::CONTROL_PLANE_HA,
            crate::status::conditions::types::GATEWAY_HA,
            crate::status::conditions::types::GATEWAY_API_HA,
            crate::status::conditions::types::SIDECAR_RESOURCES,
            crate::status::conditions::types::MUTUAL_TLS,
            crate::status::conditions::types::UPGRADES,
            crate::status::conditions::types::CERTIFICATES,
            crate::status::conditions::types::AMBIENT_DATA_PLANE,
            crate::status::conditions::types::RESILIENCE,
            crate::status::conditions::types::SECURITY,
        ] {
            let labels = RuleLabels {
                policy: policy.to_string(),
                rule: rule.to_string(),
            };
            self.violations.remove(&labels);
            self.corrections.remove(&labels);
        }
    }
}

async fn livez() -> &'static str {
    "ok"
}

async fn readyz(AxState(m): AxState<Arc<Metrics>>) -> (StatusCode, &'static str) {
    if m.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "watches not synced")
    }
}

async fn metrics_text(
    AxState(m): AxState<Arc<Metrics>>,
) -> ([(&'static str, &'static str); 1], String) {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

/// Serves the endpoints on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let app = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_series_follow_the_counted_versions() {
        let m = Metrics::default();
        let k = |r: &str, v: &str| (r.to_string(), v.to_string());
        m.set_proxies(
            "p",
            &BTreeMap::from([(k("default", "1.31-dev"), 2), (k("canary", "1.30.1"), 1)]),
        );
        let text = m.encode();
        assert!(
            text.contains(
                "meshwarden_proxies{policy=\"p\",revision=\"canary\",version=\"1.30.1\"} 1"
            ),
            "{text}"
        );
        m.set_proxies("p", &BTreeMap::from([(k("default", "1.31-dev"), 3)]));
        let text = m.encode();
        assert!(!text.contains("1.30.1"), "{text}");
        assert!(
            text.contains(
                "meshwarden_proxies{policy=\"p\",revision=\"default\",version=\"1.31-dev\"} 3"
            ),
            "{text}"
        );
        m.forget_policy("p");
        assert!(!m.encode().contains("meshwarden_proxies{"));
    }

    #[test]
    fn sidecar_drift_series_follow_the_namespaces_with_drift() {
        let m = Metrics::default();
        m.set_sidecar_drift("p", &BTreeMap::from([("a".into(), 2), ("b".into(), 1)]));
        let text = m.encode();
        assert!(
            text.contains("meshwarden_sidecar_drift_pods{policy=\"p\",namespace=\"a\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("meshwarden_sidecar_drift_pods{policy=\"p\",namespace=\"b\"} 1"),
            "{text}"
        );
        m.set_sidecar_drift("p", &BTreeMap::from([("b".into(), 3)]));
        let text = m.encode();
        assert!(
            !text.contains("namespace=\"a\""),
            "a fixed namespace loses its series: {text}"
        );
        assert!(
            text.contains("meshwarden_sidecar_drift_pods{policy=\"p\",namespace=\"b\"} 3"),
            "{text}"
        );
        m.forget_policy("p");
        assert!(!m.encode().contains("namespace=\"b\""));
    }

    #[test]
    fn root_certificate_series_show_the_time_left_when_scraped() {
        let m = Metrics::default();
        let in_a_day = jiff::Timestamp::now().as_second() + 86_400;
        let root = ("ab".to_string(), "CN=root".to_string(), in_a_day);
        m.set_root_certificates("p", Some(vec![root.clone()]));
        m.set_root_certificates("q", Some(vec![root]));
        let text = m.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("meshwarden_root_certificate_expiry_seconds{"))
            .unwrap();
        assert!(
            line.starts_with("meshwarden_root_certificate_expiry_seconds{fingerprint=\"ab\",subject=\"CN=root\"} 86"),
            "{line}"
        );
        assert_eq!(
            text.matches("subject=\"CN=root\"").count(),
            1,
            "one series per root"
        );
        m.set_root_certificates("p", None);
        assert!(m.encode().contains("CN=root"), "q still holds it");
        m.retain_policies(&["q".to_string()]);
        m.retain_policies(&[]);
        assert!(!m.encode().contains("CN=root"), "gone with the last policy");
    }

    #[test]
    fn a_rule_keeps_one_reason_series() {
        let m = Metrics::default();
        let set = |reason: &str| {
            m.set_rule_reasons(
                "p",
                &BTreeMap::from([("SidecarResources".into(), reason.into())]),
            );
        };
        set("RolloutHeld");
        set("FightDetected");
        let text = m.encode();
        assert!(
            text.contains("rule=\"SidecarResources\",reason=\"FightDetected\"} 1"),
            "{text}"
        );
        assert!(
            !text.contains("reason=\"RolloutHeld\""),
            "the former reason goes: {text}"
        );
    }

    #[test]
    fn encodes_the_documented_metric_names() {
        let m = Metrics::default();
        m.reconciles.inc();
        m.policy_ready
            .get_or_create(&PolicyLabels { policy: "p".into() })
            .set(1);
        m.violations
            .get_or_create(&RuleLabels {
                policy: "p".into(),
                rule: "GatewayHA".into(),
            })
            .set(3);
        m.reconcile_errors
            .get_or_create(&ErrorLabels {
                kind: "Forbidden".into(),
            })
            .inc();
        m.corrections
            .get_or_create(&RuleLabels {
                policy: "p".into(),
                rule: "GatewayHA".into(),
            })
            .inc_by(2);
        m.set_rule_reasons(
            "p",
            &BTreeMap::from([("SidecarResources".into(), "RolloutHeld".into())]),
        );
        let text = m.encode();
        for needle in [
            "meshwarden_reconciles_total 1",
            "meshwarden_policy_ready{policy=\"p\"} 1",
            "meshwarden_violations{policy=\"p\",rule=\"GatewayHA\"} 3",
            "meshwarden_reconcile_errors_total{kind=\"Forbidden\"} 1",
            "meshwarden_reconcile_duration_seconds_bucket",
            "meshwarden_corrections_total{policy=\"p\",rule=\"GatewayHA\"} 2",
            "meshwarden_rule_reason{policy=\"p\",rule=\"SidecarResources\",reason=\"RolloutHeld\"} 1",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
        m.retain_policies(&["p".to_string()]);
        assert!(
            m.encode().contains("policy=\"p\""),
            "an existing policy keeps its series"
        );
        m.retain_policies(&[]);
        assert!(
            !m.encode().contains("policy=\"p\""),
            "a deleted policy's series go"
        );
    }
}
