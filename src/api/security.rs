//! `spec.security`: default deny, egress mode and the CA in use, reported.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Requirement;

/// Security hardening of the mesh, reported: namespaces without an effective default deny,
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
    /// namespace. Default `Required`.
    #[serde(default = "super::resilience::required")]
    pub default_deny: Requirement,
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
            default_deny: Requirement::Required,
            registry_only: Requirement::Off,
            plugged_in_ca: Requirement::Required,
        }
    }
}
