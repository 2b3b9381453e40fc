//! `spec.resilience`: the DestinationRule settings every Service's clients should get.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Fault tolerance of the traffic to every Service of the selected namespaces, judged on the
/// DestinationRule istiod actually applies to its clients (client namespace, Service
/// namespace, root namespace; same-host rules merged; `exportTo`) with
/// `meshConfig.defaultTrafficPolicy` under it. Reports only, whatever `enforcement` says: it
/// never writes to the mesh.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResilienceSpec {
    /// Namespaces whose Services are checked. Default: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "super::label_selector")]
    pub namespace_selector: Option<LabelSelector>,
    /// `Required`: the rule that applies (or the mesh default) sets
    /// `trafficPolicy.outlierDetection`. Default `Required`.
    #[serde(default = "required")]
    pub outlier_detection: Requirement,
    /// `Required`: the rule that applies (or the mesh default) sets a connection pool limit
    /// (`tcp.maxConnections`, `http.http1MaxPendingRequests`, `http.http2MaxRequests`,
    /// `http.maxRequestsPerConnection` or `http.maxConcurrentStreams`). Default `"Off"`.
    #[serde(default)]
    pub connection_pool_limits: Requirement,
    /// `Required`: every HTTP route that sidecars apply (of a VirtualService of the selected
    /// namespaces whose `gateways` is empty or names `mesh`) and that forwards to a
    /// destination sets a `timeout` (istiod sets none by default; `0s` is none). Default
    /// `"Off"`.
    #[serde(default)]
    pub route_timeouts: Requirement,
    /// `Required`: every workload of the selected namespaces lets its proxy finish draining
    /// before its pods' `terminationGracePeriodSeconds` (default 30) ends. Reported: a
    /// `terminationDrainDuration` (annotation `proxy.istio.io/config` over the mesh's
    /// `defaultConfig`; default 5s) at or beyond the grace period, and
    /// `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`, whose drain ignores `terminationDrainDuration` and
    /// lasts until the last connection closes, so that only the grace period (SIGKILL) bounds
    /// it. Default `Required`.
    #[serde(default = "required")]
    pub drain_within_grace_period: Requirement,
}

impl Default for ResilienceSpec {
    fn default() -> Self {
        ResilienceSpec {
            namespace_selector: None,
            outlier_detection: Requirement::Required,
            connection_pool_limits: Requirement::Off,
            route_timeouts: Requirement::Off,
            drain_within_grace_period: Requirement::Required,
        }
    }
}

/// Whether a setting is required.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Requirement {
    /// Reported where it is missing.
    Required,
    /// Not checked.
    #[default]
    Off,
}

pub(super) fn required() -> Requirement {
    Requirement::Required
}
