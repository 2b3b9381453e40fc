//! The posture sections' metrics: the CA istiod signs with, per policy with a `security`
//! section (`meshwarden_ca_mode{policy, mode}`, 1 for the mode found).

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaLabels {
    pub policy: String,
    /// `self-signed`, `plugged-in`, `external` or `unknown`.
    pub mode: String,
}

#[derive(Default)]
pub struct PostureMetrics {
    ca_mode: Family<CaLabels, Gauge>,
    /// The mode each policy has a series for.
    known: Mutex<BTreeMap<String, String>>,
}

impl PostureMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "ca_mode",
            "The CA istiod signs workload certificates with (mode: self-signed, plugged-in, external, unknown), 1 per policy with a security section",
            self.ca_mode.clone(),
        );
    }

    /// Sets the CA mode `policy`'s security section found (`None`: it has none).
    pub fn set_ca_mode(&self, policy: &str, mode: Option<&str>) {
        let Ok(mut known) = self.known.lock() else {
            return;
        };
        let labels = |mode: &str| CaLabels {
            policy: policy.to_string(),
            mode: mode.to_string(),
        };
        let before = match mode {
            Some(m) => known.insert(policy.to_string(), m.to_string()),
            None => known.remove(policy),
        };
        if let Some(b) = before.filter(|b| Some(b.as_str()) != mode) {
            self.ca_mode.remove(&labels(&b));
        }
        if let Some(m) = mode {
            self.ca_mode.get_or_create(&labels(m)).set(1);
        }
    }
}
