//! `spec.security`: default deny, egress mode and the CA in use, reported.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Requirement;

/// Security hardening of the mesh, reported: namespaces (or workloads) without an effective
/// default deny, ambient namespaces whose AuthorizationPolicies need a waypoint they lack,
/// `outboundTrafficPolicy`, and the CA istiod signs with. Reports only, whatever
/// `enforcement` says: it never writes to the mesh.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecuritySpec {
    /// Namespaces checked for a default deny. Default: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "super::label_selector")]
    pub namespace_selector: Option<LabelSelector>,
    /// `Required`: every selected namespace has an allow-nothing AuthorizationPolicy (no
    /// selector, no rules, action ALLOW) or a deny-all one, of its own or in Istio's root
    /// namespace (a violation names the workloads no ALLOW policy selects). `PerWorkload`:
    /// that, or every Deployment, StatefulSet and DaemonSet of the namespace is selected by an
    /// ALLOW policy (which denies it what no rule allows) or a deny-all one. Default
    /// `Required`.
    #[serde(default)]
    pub default_deny: DefaultDeny,
    /// `Required`: in ambient namespaces, no AuthorizationPolicy that ztunnel cannot enforce
    /// (HTTP attributes, CUSTOM or AUDIT) applies to workloads instead of targeting a
    /// waypoint with `targetRefs`. Default `Required`.
    #[serde(default = "super::resilience::required", rename = "l7Waypoint")]
    pub l7_waypoint: Requirement,
    /// `Required`: the mesh config's `outboundTrafficPolicy.mode` is `REGISTRY_ONLY`
    /// (hygiene, not a security boundary). Default `"Off"`: the mode is only shown.
    #[serde(default)]
    pub registry_only: Requirement,
    /// `Required`: istiod does not sign with its own self-signed root (a plugged-in CA in
    /// `cacerts`, or an external CA). Default `Required`.
    #[serde(default = "super::resilience::required", rename = "pluggedInCA")]
    pub plugged_in_ca: Requirement,
}

impl Default for SecuritySpec {
    fn default() -> Self {
        SecuritySpec {
            namespace_selector: None,
            default_deny: DefaultDeny::Required,
            l7_waypoint: Requirement::Required,
            registry_only: Requirement::Off,
            plugged_in_ca: Requirement::Required,
        }
    }
}

/// How a namespace's default deny is judged.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DefaultDeny {
    /// A namespace-wide allow-nothing or deny-all AuthorizationPolicy (of its own or in the
    /// root namespace): it covers workloads created later too.
    #[default]
    Required,
    /// That, or every workload of the namespace is selected by an ALLOW or deny-all policy.
    PerWorkload,
    /// Not checked.
    Off,
}
