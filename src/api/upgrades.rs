//! `spec.upgrades` and its part of the status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Enforcement;

/// Upgrade posture of the mesh (mesh-wide): revisions, tags and proxy versions.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradesSpec {
    /// Overrides `spec.enforcement` for this section (only `restartOutdated` writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// Namespaces whose labels and pods are checked. Default: every namespace. Revisions and
    /// tags are always mesh-wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "super::label_selector")]
    pub namespace_selector: Option<LabelSelector>,
    /// Minor versions an injected proxy may be behind the istiod of its revision (Istio
    /// supports proxies one minor version behind their control plane). Default 1.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 10))]
    pub max_minor_skew: i32,
    /// Enforce only: restart (`kubectl rollout restart`) the Deployments, StatefulSets and
    /// DaemonSets whose running proxies are more than `maxMinorSkew` behind their istiod or
    /// belong to a revision whose istiod no longer runs, paced by `maxConcurrentRestarts`.
    #[serde(default)]
    pub restart_outdated: bool,
    /// Workloads restarting at once because of meshwarden; a stalled restart stops the others.
    #[serde(default = "two")]
    #[schemars(range(min = 1, max = 100))]
    pub max_concurrent_restarts: i32,
}

/// Upgrade posture as last observed (`spec.upgrades`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradesStatus {
    /// Every istiod revision that runs (Deployments labelled `app=istiod`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub revisions: Vec<RevisionStatus>,
    /// Every revision tag (MutatingWebhookConfigurations labelled `istio.io/tag`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tags: Vec<RevisionTagStatus>,
    /// Running pods with an injected proxy, per revision and proxy version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub proxies: Vec<ProxyCount>,
}

/// One istiod revision.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionStatus {
    /// `istio.io/rev` of its Deployments (`default` without one).
    pub name: String,
    /// Image tag of the discovery container (`unknown` when the image has no tag).
    pub version: String,
}

/// One revision tag.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionTagStatus {
    pub name: String,
    /// The revision it points at.
    pub revision: String,
}

/// Running pods with a proxy of one revision and version.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyCount {
    pub revision: String,
    /// Image tag of the `istio-proxy` container.
    pub version: String,
    pub pods: i32,
}

fn one() -> i32 {
    1
}

fn two() -> i32 {
    2
}
