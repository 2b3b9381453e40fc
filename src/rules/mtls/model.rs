//! Istio's PeerAuthentication as meshwarden reads it, and the section's findings and fixes.

use super::*;

/// Name of the namespace-wide PeerAuthentication meshwarden creates for a scope.
pub const SCOPE_OBJECT: &str = "meshwarden-mtls";

/// Prefix of the PeerAuthentications that render exemptions.
pub const EXEMPTION_PREFIX: &str = "meshwarden-exemption-";

pub use crate::istio::SIDECAR_STATUS;

pub(super) const API_VERSION: &str = "security.istio.io/v1";

pub(super) const KIND: &str = "PeerAuthentication";

/// Istio's PeerAuthentication (only the fields meshwarden reads). Not part of the MeshPolicy
/// CRD output: Istio installs its own CRD.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "PeerAuthentication",
    plural = "peerauthentications",
    namespaced,
    schema = "disabled"
)]
pub struct PeerAuthenticationSpec {
    /// Workloads the policy applies to; the whole namespace when absent or empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<PeerMtls>,
    /// Port number (as a string) -> mode.
    #[serde(
        default,
        rename = "portLevelMtls",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub port_level_mtls: BTreeMap<String, PeerMtls>,
}

/// Istio's workload selector: labels only.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct WorkloadSelector {
    #[serde(default, rename = "matchLabels")]
    pub match_labels: BTreeMap<String, String>,
}

/// A mode as Istio spells it (`UNSET`, `DISABLE`, `PERMISSIVE`, `STRICT`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct PeerMtls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// How much plain text a mode lets in, ordered weakest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Strength {
    Disable,
    Permissive,
    Strict,
}

impl Strength {
    pub fn as_str(self) -> &'static str {
        match self {
            Strength::Disable => "DISABLE",
            Strength::Permissive => "PERMISSIVE",
            Strength::Strict => "STRICT",
        }
    }

    /// `None` for UNSET, absent or unknown: the parent's mode is inherited.
    pub fn parse(mode: Option<&str>) -> Option<Strength> {
        match mode {
            Some("DISABLE") => Some(Strength::Disable),
            Some("PERMISSIVE") => Some(Strength::Permissive),
            Some("STRICT") => Some(Strength::Strict),
            _ => None,
        }
    }
}

impl From<MtlsMode> for Strength {
    fn from(m: MtlsMode) -> Self {
        match m {
            MtlsMode::STRICT => Strength::Strict,
            MtlsMode::PERMISSIVE => Strength::Permissive,
        }
    }
}

pub(super) fn shown(mode: Option<Strength>) -> &'static str {
    mode.map(Strength::as_str).unwrap_or("UNSET")
}

/// A namespace as meshwarden needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// The pod annotations Istio's injector decides by (an opt-out, the gateway template); the
/// only annotations the pod cache keeps besides the sidecar's status.
pub const INJECTOR_ANNOTATIONS: [&str; 2] = [
    crate::rules::sidecars::INJECT,
    crate::rules::sidecars::INJECT_TEMPLATES,
];

/// A pod as meshwarden needs it (from metadata only).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Only the annotations the injector reads on a pod ([`INJECTOR_ANNOTATIONS`]): whether a
    /// restart would add the sidecar.
    pub annotations: BTreeMap<String, String>,
    /// Carries the `sidecar.istio.io/status` annotation.
    pub injected: bool,
    /// Runs on the host network: a sidecar can never capture its traffic.
    pub host_network: bool,
}

/// What a write does.
#[derive(Clone, Debug, PartialEq)]
pub enum Fix {
    Apply {
        namespace: String,
        name: String,
        patch: Value,
        /// Fields taken over from other managers, as `field (was managed by m)`.
        takeovers: Vec<String>,
    },
    Delete {
        namespace: String,
        name: String,
    },
}

impl Fix {
    /// When the write goes out in a reconcile: 0, applies that let plain text in or keep it
    /// (any mode in the patch other than STRICT: exemptions, PERMISSIVE or held scopes), then
    /// 1, applies that only write STRICT, then 2, deletions. Istio applies each object as it
    /// arrives, so a namespace's exemption must exist before the mesh-wide object turns STRICT,
    /// and an object that replaces another must exist before the old one goes.
    pub fn phase(&self) -> u8 {
        match self {
            Fix::Delete { .. } => 2,
            Fix::Apply { patch, .. } => {
                let spec = &patch["spec"];
                let ports = spec["portLevelMtls"].as_object();
                let mut modes = std::iter::once(&spec["mtls"]["mode"])
                    .chain(
                        ports
                            .into_iter()
                            .flat_map(|p| p.values().map(|m| &m["mode"])),
                    )
                    .filter(|m| !m.is_null())
                    .peekable();
                let some = modes.peek().is_some();
                if some && modes.all(|m| m.as_str() == Some("STRICT")) {
                    1
                } else {
                    0
                }
            }
        }
    }
}

/// A deviation, with the write that corrects it when there is one.
#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    /// `PeerAuthentication/<ns>/<name>` or `Namespace/<name>`.
    pub object: String,
    pub message: String,
    pub fix: Option<Fix>,
    /// The scope stays below the declared STRICT even after the fix (the STRICT hold).
    pub held: bool,
    /// The finding is about a target (a scope or an exemption), for the compliant count.
    pub target: bool,
    /// The condition reason this finding calls for when it is what remains
    /// ([`OVERRIDES_REPORTED`], [`CLIENTS_CUT_OFF`]); `None`: the generic ones.
    pub reason: Option<&'static str>,
}

/// Everything the pure planner decided.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub findings: Vec<Finding>,
    /// Scopes plus rendered exemptions.
    pub targets: i32,
    /// One line per exemption, for the condition.
    pub exemptions: Vec<String>,
    /// Lines worth saying that are not deviations.
    pub notes: Vec<String>,
    /// At least one scope is held below STRICT.
    pub held: bool,
}

/// Inputs of [`plan`].
pub struct Input<'a> {
    pub spec: &'a MtlsSpec,
    pub policy: &'a str,
    pub owner: Option<OwnerReference>,
    /// Istio's root namespace (the policy's `rootNamespace`, or meshConfig's).
    pub root: &'a str,
    /// meshConfig's root namespace when the policy's `rootNamespace` disagrees with it: the
    /// mesh-wide object meshwarden made there is in force, so it is never removed.
    pub istio_root: Option<&'a str>,
    pub namespaces: &'a [NamespaceInfo],
    pub peer_auths: &'a [PeerAuthentication],
    /// Pods without a sidecar that could no longer connect under STRICT (see [`blockers`]).
    pub blockers: &'a [PodInfo],
}

pub(super) fn pa_id(ns: &str, name: &str) -> String {
    format!("PeerAuthentication/{ns}/{name}")
}

/// The name of the PeerAuthentication rendering an exemption: stable for a namespace and
/// selector, so that changing the modes updates the same object.
pub fn exemption_name(ex: &MtlsExemption) -> String {
    let selector = ex
        .selector
        .as_ref()
        .map(|s| serde_json::to_string(s).unwrap_or_default())
        .unwrap_or_default();
    let h = crate::hash::fnv1a(format!("{}\n{selector}", ex.namespace).as_bytes());
    format!("{EXEMPTION_PREFIX}{:010x}", h & 0xff_ffff_ffff)
}

pub(super) fn is_ours(meta: &ObjectMeta, policy: &str) -> bool {
    write::created_for(meta, policy)
}

/// Created by any meshwarden policy: another policy's objects are that policy's business
/// (policies that disagree are resolved as conflicts), never overrides to correct.
pub(super) fn is_meshwarden(meta: &ObjectMeta) -> bool {
    write::created_by_meshwarden(meta)
}

pub(super) fn selector_labels(pa: &PeerAuthentication) -> BTreeMap<String, String> {
    pa.spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .unwrap_or_default()
}

pub(super) fn is_namespace_wide(pa: &PeerAuthentication) -> bool {
    selector_labels(pa).is_empty()
}

pub(super) fn pa_mode(pa: &PeerAuthentication) -> Option<Strength> {
    Strength::parse(pa.spec.mtls.as_ref().and_then(|m| m.mode.as_deref()))
}

pub(super) fn takeovers_of(meta: &ObjectMeta, id: &str, path: &[&str], field: &str) -> Vec<String> {
    write::foreign_managers(meta, path)
        .into_iter()
        .map(|m| format!("{id} {field} (was managed by {m})"))
        .collect()
}
