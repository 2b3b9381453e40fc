//! The `mtls` section's types.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::*;

/// mTLS mode of a scope.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[allow(clippy::upper_case_acronyms)]
pub enum MtlsMode {
    /// Only mutual-TLS traffic is accepted.
    STRICT,
    /// Mutual-TLS and plain-text traffic are accepted.
    PERMISSIVE,
}

/// Where the declared mTLS mode is set.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MtlsScope {
    /// One mesh-wide PeerAuthentication in the root namespace.
    #[default]
    Mesh,
    /// One PeerAuthentication in each namespace chosen by `namespaceSelector`.
    Namespaces,
}

/// Mutual TLS.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.scope != 'Namespaces' || has(self.namespaceSelector)",
    "message": "mtls.namespaceSelector is required when mtls.scope is Namespaces",
    "fieldPath": ".namespaceSelector",
    "reason": "FieldValueRequired"
}]))]
pub struct MtlsSpec {
    /// Overrides `spec.enforcement` for this section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// Declared mode. A scope is moved to STRICT only when no client without a sidecar would be
    /// cut off (see `force`).
    pub mode: MtlsMode,
    /// `Mesh`: one PeerAuthentication in the root namespace; `Namespaces`: one per namespace
    /// chosen by `namespaceSelector`.
    #[serde(default)]
    pub scope: MtlsScope,
    /// Istio's root namespace, where the mesh-wide PeerAuthentication lives. Leave it unset:
    /// meshwarden then reads `meshConfig.rootNamespace` from istiod's mesh config (ConfigMap
    /// `istio`, or `istio-<revision>`, key `mesh`, in istiod's namespace; istiod's namespace
    /// when the mesh config does not set it). When set, it is used as written, and a value
    /// that disagrees with the mesh config is reported (`RootNamespaceMismatch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "namespace_name")]
    pub root_namespace: Option<String>,
    /// Namespaces that get their own PeerAuthentication (scope `Namespaces`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "label_selector")]
    pub namespace_selector: Option<LabelSelector>,
    /// Namespaces, workloads or ports that keep a weaker mode. At most 64 entries: an entry
    /// with `namespaceSelector` covers any number of namespaces, so large clusters select them
    /// by label instead of listing them (and never need `force`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub exemptions: Vec<MtlsExemption>,
    /// Move to STRICT even when pods without a sidecar would lose access.
    #[serde(default)]
    pub force: bool,
    /// What happens to users' PeerAuthentications that let in more plain text than the scope
    /// (PERMISSIVE or DISABLE, namespace-wide, per workload or per port) and that no exemption
    /// covers: `Report` (default) lists them and leaves them alone; `Enforce` raises them to
    /// the scope's mode, which cuts off their clients that are not pods (load balancers with
    /// `externalTrafficPolicy: Local`, kubelet probes, VMs, callers outside the cluster).
    #[serde(default)]
    pub overrides: MtlsOverrides,
}

/// Handling of weaker PeerAuthentications written by users.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum MtlsOverrides {
    /// Report them in status; never rewrite them.
    #[default]
    Report,
    /// Raise their weaker modes to the scope's mode (in Enforce).
    Enforce,
}

/// A namespace, workload or port that keeps a weaker mTLS mode.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.ports) || has(self.selector)",
    "message": "exemption ports need a workload selector: Istio applies port-level modes only to selected workloads",
    "fieldPath": ".selector",
    "reason": "FieldValueRequired"
}, {
    "rule": "has(self.namespace) != has(self.namespaceSelector)",
    "message": "set exactly one of namespace and namespaceSelector in each exemption",
    "fieldPath": ".namespace",
    "reason": "FieldValueInvalid"
}]))]
pub struct MtlsExemption {
    /// Namespace of the exemption (or `namespaceSelector`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(schema_with = "namespace_name")]
    pub namespace: String,
    /// Namespaces of the exemption, by label: the exemption applies to each namespace it selects
    /// (or `namespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "label_selector")]
    pub namespace_selector: Option<LabelSelector>,
    /// Workloads of the exemption; the whole namespace when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "label_selector")]
    pub selector: Option<LabelSelector>,
    /// Mode of the exempted namespace or workloads. Default PERMISSIVE.
    #[serde(default = "default_permissive")]
    pub mode: MtlsMode,
    /// Port-level modes of the selected workloads, one entry per port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["port"]))]
    pub ports: Vec<PortMode>,
}

/// The mTLS mode of one port.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortMode {
    /// Container port number.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Mode of that port.
    pub mode: MtlsMode,
}
