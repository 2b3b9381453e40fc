//! Mutual TLS with Istio `PeerAuthentication` objects.
//!
//! observe (namespaces, every PeerAuthentication, and pod metadata when STRICT is declared)
//! -> pure [`plan`] -> execute with server-side apply (Enforce only) -> report in the
//! `MutualTLS` condition.
//!
//! A scope (the mesh, or one selected namespace) has exactly one namespace-wide
//! PeerAuthentication: a user's own selector-less object is corrected in place (only
//! `spec.mtls.mode` is applied), otherwise meshwarden creates `meshwarden-mtls`. Exemptions
//! are rendered as `meshwarden-exemption-<hash>`. A scope is moved to STRICT only when no pod
//! without a sidecar would be cut off, or when `force` is set.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Instant;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use kube::{CustomResource, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{
    Enforcement, MeshPolicy, MtlsExemption, MtlsMode, MtlsScope, MtlsSpec, Violation,
};
use crate::apply::{self, FIELD_MANAGER};
use crate::conditions::{Observed, Status, types};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::rules::RuleReport;
use crate::rules::ha::{MANAGED_BY, POLICY_LABEL};
use crate::selector;

/// Name of the namespace-wide PeerAuthentication meshwarden creates for a scope.
pub const SCOPE_OBJECT: &str = "meshwarden-mtls";
/// Prefix of the PeerAuthentications that render exemptions.
pub const EXEMPTION_PREFIX: &str = "meshwarden-exemption-";
/// Annotation Istio's injector puts on every pod it gave a sidecar.
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";
const API_VERSION: &str = "security.istio.io/v1";
const KIND: &str = "PeerAuthentication";

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

fn shown(mode: Option<Strength>) -> &'static str {
    mode.map(Strength::as_str).unwrap_or("UNSET")
}

/// A namespace as meshwarden needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamespaceInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// A pod as meshwarden needs it (from metadata only).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Carries the `sidecar.istio.io/status` annotation.
    pub injected: bool,
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
    pub namespaces: &'a [NamespaceInfo],
    pub peer_auths: &'a [PeerAuthentication],
    /// Pods without a sidecar that could no longer connect under STRICT (see [`blockers`]).
    pub blockers: &'a [PodInfo],
}

fn pa_id(ns: &str, name: &str) -> String {
    format!("PeerAuthentication/{ns}/{name}")
}

/// FNV-1a: stable across Rust versions, unlike the std hasher.
fn fnv1a(data: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The name of the PeerAuthentication rendering an exemption: stable for a namespace and
/// selector, so that changing the modes updates the same object.
pub fn exemption_name(ex: &MtlsExemption) -> String {
    let selector = ex
        .selector
        .as_ref()
        .map(|s| serde_json::to_string(s).unwrap_or_default())
        .unwrap_or_default();
    let h = fnv1a(&format!("{}\n{selector}", ex.namespace));
    format!("{EXEMPTION_PREFIX}{:010x}", h & 0xff_ffff_ffff)
}

fn is_ours(meta: &ObjectMeta, policy: &str) -> bool {
    let labels = meta.labels.as_ref();
    labels.and_then(|l| l.get(MANAGED_BY.0)).map(String::as_str) == Some(MANAGED_BY.1)
        && labels.and_then(|l| l.get(POLICY_LABEL)).map(String::as_str) == Some(policy)
}

/// Created by any meshwarden policy: another policy's objects are that policy's business
/// (policies that disagree are resolved as conflicts), never overrides to correct.
fn is_meshwarden(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY.0))
        .map(String::as_str)
        == Some(MANAGED_BY.1)
}

fn selector_labels(pa: &PeerAuthentication) -> BTreeMap<String, String> {
    pa.spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone())
        .unwrap_or_default()
}

fn is_namespace_wide(pa: &PeerAuthentication) -> bool {
    selector_labels(pa).is_empty()
}

fn pa_mode(pa: &PeerAuthentication) -> Option<Strength> {
    Strength::parse(pa.spec.mtls.as_ref().and_then(|m| m.mode.as_deref()))
}

/// True when meshwarden's manager owns the field at `path` of the object.
fn owned_by_us(meta: &ObjectMeta, path: &[&str]) -> bool {
    meta.managed_fields.iter().flatten().any(|e| {
        e.manager.as_deref() == Some(FIELD_MANAGER)
            && e.fields_v1.as_ref().is_some_and(|f| {
                let mut node = Some(&f.0);
                for key in path {
                    node = node.and_then(|n| n.get(*key));
                }
                node.is_some()
            })
    })
}

fn takeovers_of(meta: &ObjectMeta, id: &str, path: &[&str], field: &str) -> Vec<String> {
    apply::foreign_managers(meta, path)
        .into_iter()
        .map(|m| format!("{id} {field} (was managed by {m})"))
        .collect()
}

fn is_ambient(labels: &BTreeMap<String, String>) -> Option<bool> {
    labels
        .get("istio.io/dataplane-mode")
        .map(|v| v.as_str() == "ambient")
}

/// Istio's own control plane and node agents: they never call workloads on their ports.
fn is_istio_infra(labels: &BTreeMap<String, String>) -> bool {
    matches!(
        labels.get("app").map(String::as_str),
        Some("istiod" | "ztunnel")
    ) || labels.get("k8s-app").map(String::as_str) == Some("istio-cni-node")
}

fn injection_on(labels: &BTreeMap<String, String>) -> bool {
    labels.get("istio-injection").map(String::as_str) == Some("enabled")
        || labels.contains_key("istio.io/rev")
}

/// Pods that could no longer connect to a STRICT scope: no injected sidecar and not in ambient
/// mode, wherever they run (any of them can be a client of any namespace). Exempted namespaces
/// and workloads are left out, as are Istio's own infrastructure pods.
pub fn blockers(
    pods: &[PodInfo],
    namespaces: &[NamespaceInfo],
    exemptions: &[MtlsExemption],
) -> Vec<PodInfo> {
    let ns_labels: HashMap<&str, &BTreeMap<String, String>> = namespaces
        .iter()
        .map(|n| (n.name.as_str(), &n.labels))
        .collect();
    pods.iter()
        .filter(|p| !p.injected && !is_istio_infra(&p.labels))
        .filter(|p| {
            // A pod label overrides the namespace's (`istio.io/dataplane-mode: none` opts out).
            let ambient = is_ambient(&p.labels)
                .or_else(|| {
                    ns_labels
                        .get(p.namespace.as_str())
                        .and_then(|l| is_ambient(l))
                })
                .unwrap_or(false);
            !ambient
        })
        .filter(|p| {
            !exemptions.iter().any(|e| {
                e.namespace == p.namespace
                    && e.selector
                        .as_ref()
                        .is_none_or(|s| selector::matches(s, &p.labels))
            })
        })
        .cloned()
        .collect()
}

/// The condition text of a STRICT hold: how many pods, where, a few names, and the exact
/// exemptions to add (or `force`).
pub fn hold_message(blockers: &[PodInfo], namespaces: &[NamespaceInfo]) -> String {
    let mut by_ns: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in blockers {
        by_ns.entry(&p.namespace).or_default().push(&p.name);
    }
    let injected: BTreeSet<&str> = namespaces
        .iter()
        .filter(|n| injection_on(&n.labels))
        .map(|n| n.name.as_str())
        .collect();
    let mut parts = Vec::new();
    for (ns, names) in by_ns.iter().take(5) {
        let mut names = names.clone();
        names.sort_unstable();
        let more = names.len().saturating_sub(3);
        let mut s = format!(
            "{ns} ({}: {}",
            names.len(),
            names[..names.len().min(3)].join(", ")
        );
        if more > 0 {
            s.push_str(&format!(" and {more} more"));
        }
        if injected.contains(ns) {
            s.push_str("; injection is on there, so restarting them adds the sidecar");
        }
        s.push(')');
        parts.push(s);
    }
    if by_ns.len() > 5 {
        parts.push(format!("and {} more namespace(s)", by_ns.len() - 5));
    }
    let snippet: Vec<String> = by_ns
        .keys()
        .map(|ns| format!("  - namespace: {ns}"))
        .collect();
    format!(
        "STRICT is held at PERMISSIVE: {} pod(s) without a sidecar could no longer connect: {}. To exempt them (they keep PERMISSIVE and lose access to STRICT workloads), add to the policy:\n  exemptions:\n{}\nor set spec.mtls.force: true to move to STRICT anyway",
        blockers.len(),
        parts.join(", "),
        snippet.join("\n")
    )
}

/// The full object meshwarden owns (labels, owner, spec).
fn own_patch(
    ns: &str,
    name: &str,
    policy: &str,
    owner: Option<&OwnerReference>,
    spec: &PeerAuthenticationSpec,
) -> Value {
    let owner_refs: Vec<Value> = owner
        .iter()
        .map(|o| serde_json::to_value(o).unwrap_or(Value::Null))
        .collect();
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {MANAGED_BY.0: MANAGED_BY.1, POLICY_LABEL: policy},
            "ownerReferences": owner_refs,
        },
        "spec": serde_json::to_value(spec).unwrap_or(Value::Null),
    })
}

fn normalised_ports(spec: &PeerAuthenticationSpec) -> BTreeMap<String, Option<Strength>> {
    spec.port_level_mtls
        .iter()
        .map(|(k, v)| (k.clone(), Strength::parse(v.mode.as_deref())))
        .collect()
}

/// Whether an object meshwarden created already matches what it would write.
fn own_object_matches(
    pa: &PeerAuthentication,
    policy: &str,
    owner: Option<&OwnerReference>,
    want: &PeerAuthenticationSpec,
) -> bool {
    let owner_ok = owner.is_none_or(|o| pa.owner_references().iter().any(|r| r.uid == o.uid));
    is_ours(&pa.metadata, policy)
        && owner_ok
        && selector_labels(pa)
            == want
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone())
                .unwrap_or_default()
        && pa_mode(pa) == Strength::parse(want.mtls.as_ref().and_then(|m| m.mode.as_deref()))
        && normalised_ports(&pa.spec) == normalised_ports(want)
}

fn mode_spec(mode: Strength) -> Option<PeerMtls> {
    Some(PeerMtls {
        mode: Some(mode.as_str().to_string()),
    })
}

fn in_namespace<'x>(
    pas: &'x [PeerAuthentication],
    ns: &'x str,
) -> impl Iterator<Item = &'x PeerAuthentication> {
    pas.iter()
        .filter(move |p| p.namespace().as_deref() == Some(ns))
}

/// One namespace-wide slot: the mesh (root namespace), a selected namespace, or a namespace
/// exemption.
struct Slot<'a> {
    namespace: &'a str,
    declared: Strength,
    /// Name of the object meshwarden creates when the user has none.
    name: String,
    /// What the slot is, for messages.
    what: String,
}

struct Planner<'a> {
    input: &'a Input<'a>,
    plan: Plan,
    /// (namespace, name) of every object meshwarden wants to exist.
    desired: BTreeSet<(String, String)>,
    /// (namespace, name) of objects handled as slots (not scanned as overrides).
    handled: BTreeSet<(String, String)>,
    hold: bool,
}

impl Planner<'_> {
    /// Holds one namespace-wide slot at its mode: corrects the user's own selector-less
    /// object in place (the oldest, the one Istio uses), else renders meshwarden's.
    fn slot(&mut self, slot: Slot<'_>) {
        let policy = self.input.policy;
        let ns = slot.namespace;
        let mut users: Vec<&PeerAuthentication> = in_namespace(self.input.peer_auths, ns)
            .filter(|p| is_namespace_wide(p) && !is_ours(&p.metadata, policy))
            .collect();
        users.sort_by_key(|p| {
            (
                p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                p.name_any(),
            )
        });
        // Never weaken a scope that is already STRICT, hold it at PERMISSIVE otherwise.
        let target_mode = |observed: Option<Strength>| {
            if self.hold && slot.declared == Strength::Strict && observed != Some(Strength::Strict)
            {
                Strength::Permissive
            } else {
                slot.declared
            }
        };
        let held_note = |mode: Strength| {
            if mode < slot.declared {
                format!(", held at {} (see below)", mode.as_str())
            } else {
                String::new()
            }
        };
        if let Some(first) = users.first() {
            let name = first.name_any();
            let id = pa_id(ns, &name);
            self.handled.insert((ns.to_string(), name.clone()));
            let observed = pa_mode(first);
            let want = target_mode(observed);
            if observed != Some(want) {
                let path = ["f:spec", "f:mtls", "f:mode"];
                self.plan.findings.push(Finding {
                    object: id.clone(),
                    message: format!(
                        "{}: namespace-wide mode is {}, declared {}{}",
                        slot.what,
                        shown(observed),
                        slot.declared.as_str(),
                        held_note(want)
                    ),
                    fix: Some(Fix::Apply {
                        namespace: ns.to_string(),
                        name: name.clone(),
                        patch: json!({
                            "apiVersion": API_VERSION,
                            "kind": KIND,
                            "metadata": {"name": name, "namespace": ns},
                            "spec": {"mtls": {"mode": want.as_str()}},
                        }),
                        takeovers: takeovers_of(&first.metadata, &id, &path, "spec.mtls.mode"),
                    }),
                    held: want < slot.declared,
                    target: true,
                });
            } else if want < slot.declared {
                self.plan.findings.push(Finding {
                    object: id,
                    message: format!(
                        "{}: namespace-wide mode is {}, declared {}{}",
                        slot.what,
                        shown(observed),
                        slot.declared.as_str(),
                        held_note(want)
                    ),
                    fix: None,
                    held: true,
                    target: true,
                });
            } else {
                self.already_strict(&slot, &id);
            }
            for other in users.iter().skip(1) {
                let oname = other.name_any();
                self.handled.insert((ns.to_string(), oname.clone()));
                self.plan.findings.push(Finding {
                    object: pa_id(ns, &oname),
                    message: format!(
                        "ignored by Istio: namespace {ns} has several namespace-wide PeerAuthentications and Istio uses the oldest, {name}; delete this one"
                    ),
                    fix: None,
                    held: false,
                    target: false,
                });
            }
            return;
        }

        let name = slot.name.clone();
        let id = pa_id(ns, &name);
        self.desired.insert((ns.to_string(), name.clone()));
        self.handled.insert((ns.to_string(), name.clone()));
        let existing = in_namespace(self.input.peer_auths, ns).find(|p| p.name_any() == name);
        let observed = existing.and_then(pa_mode);
        let want = target_mode(observed);
        let spec = PeerAuthenticationSpec {
            selector: None,
            mtls: mode_spec(want),
            port_level_mtls: BTreeMap::new(),
        };
        let owner = self.input.owner.as_ref();
        let matches = existing.is_some_and(|p| own_object_matches(p, policy, owner, &spec));
        if !matches {
            let message = match existing {
                None => format!(
                    "{}: no namespace-wide PeerAuthentication; declared {}{}",
                    slot.what,
                    slot.declared.as_str(),
                    held_note(want)
                ),
                Some(_) => format!(
                    "{}: mode is {}, declared {}{}",
                    slot.what,
                    shown(observed),
                    slot.declared.as_str(),
                    held_note(want)
                ),
            };
            self.plan.findings.push(Finding {
                object: id,
                message,
                fix: Some(Fix::Apply {
                    namespace: ns.to_string(),
                    name: name.clone(),
                    patch: own_patch(ns, &name, policy, owner, &spec),
                    takeovers: Vec::new(),
                }),
                held: want < slot.declared,
                target: true,
            });
        } else if want >= slot.declared {
            self.already_strict(&slot, &id);
        } else {
            self.plan.findings.push(Finding {
                object: id,
                message: format!(
                    "{}: mode is {}, declared {}{}",
                    slot.what,
                    shown(observed),
                    slot.declared.as_str(),
                    held_note(want)
                ),
                fix: None,
                held: true,
                target: true,
            });
        }
    }

    /// A compliant STRICT scope while pods without a sidecar exist: said, never weakened.
    fn already_strict(&mut self, slot: &Slot<'_>, id: &str) {
        if self.hold && slot.declared == Strength::Strict {
            self.plan.notes.push(format!(
                "{id} is already STRICT and stays so although pods without a sidecar cannot reach it"
            ));
        }
    }

    /// Renders a workload exemption as its own PeerAuthentication.
    fn workload_exemption(&mut self, ex: &MtlsExemption, labels: BTreeMap<String, String>) {
        let policy = self.input.policy;
        let ns = ex.namespace.as_str();
        let name = exemption_name(ex);
        let id = pa_id(ns, &name);
        self.desired.insert((ns.to_string(), name.clone()));
        self.handled.insert((ns.to_string(), name.clone()));
        let spec = PeerAuthenticationSpec {
            selector: Some(WorkloadSelector {
                match_labels: labels,
            }),
            mtls: mode_spec(ex.mode.into()),
            port_level_mtls: ex
                .ports
                .iter()
                .map(|p| {
                    (
                        p.port.to_string(),
                        PeerMtls {
                            mode: Some(Strength::from(p.mode).as_str().to_string()),
                        },
                    )
                })
                .collect(),
        };
        let owner = self.input.owner.as_ref();
        let existing = in_namespace(self.input.peer_auths, ns).find(|p| p.name_any() == name);
        if !existing.is_some_and(|p| own_object_matches(p, policy, owner, &spec)) {
            self.plan.findings.push(Finding {
                object: id,
                message: format!(
                    "exemption {} is {}",
                    describe_exemption(ex),
                    if existing.is_some() {
                        "out of date"
                    } else {
                        "not rendered yet"
                    }
                ),
                fix: Some(Fix::Apply {
                    namespace: ns.to_string(),
                    name: name.clone(),
                    patch: own_patch(ns, &name, policy, owner, &spec),
                    takeovers: Vec::new(),
                }),
                held: false,
                target: true,
            });
        }
    }

    /// Weaker PeerAuthentications in `scanned` namespaces: a namespace or workload mode, or a
    /// port, below `required`.
    fn overrides(
        &mut self,
        scanned: &BTreeSet<&str>,
        required: Strength,
        exempt_ns: &BTreeSet<&str>,
    ) {
        let policy = self.input.policy;
        let root = self.input.spec.root_namespace.as_str();
        let scope = self.input.spec.scope;
        for pa in self.input.peer_auths {
            let ns = pa.namespace().unwrap_or_default();
            let name = pa.name_any();
            if !scanned.contains(ns.as_str())
                || exempt_ns.contains(ns.as_str())
                || is_ours(&pa.metadata, policy)
                || is_meshwarden(&pa.metadata)
                || self.handled.contains(&(ns.clone(), name.clone()))
            {
                continue;
            }
            let labels = selector_labels(pa);
            // Istio ignores workload selectors in the root namespace.
            if scope == MtlsScope::Mesh && ns == root && !labels.is_empty() {
                continue;
            }
            let covered = !labels.is_empty()
                && self.input.spec.exemptions.iter().any(|e| {
                    e.namespace == ns
                        && e.selector.as_ref().is_some_and(|s| {
                            s.match_expressions.iter().flatten().next().is_none()
                                && s.match_labels
                                    .iter()
                                    .flatten()
                                    .all(|(k, v)| labels.get(k) == Some(v))
                        })
                });
            if covered {
                continue;
            }
            let id = pa_id(&ns, &name);
            let mode = pa_mode(pa);
            let mut problems = Vec::new();
            let mut mtls = serde_json::Map::new();
            let mut ports = serde_json::Map::new();
            let mut takeovers = Vec::new();
            let mode_path = ["f:spec", "f:mtls", "f:mode"];
            if mode.is_some_and(|m| m < required) {
                problems.push(format!(
                    "mode {} is weaker than {}",
                    shown(mode),
                    required.as_str()
                ));
                mtls.insert("mode".into(), json!(required.as_str()));
                takeovers.extend(takeovers_of(
                    &pa.metadata,
                    &id,
                    &mode_path,
                    "spec.mtls.mode",
                ));
            } else if let Some(m) = mode
                && owned_by_us(&pa.metadata, &mode_path)
            {
                // Every apply carries all the fields meshwarden owns, or they would be removed.
                mtls.insert("mode".into(), json!(m.as_str()));
            }
            for (port, pm) in &pa.spec.port_level_mtls {
                let pmode = Strength::parse(pm.mode.as_deref());
                let key = format!("f:{port}");
                let path = ["f:spec", "f:portLevelMtls", key.as_str(), "f:mode"];
                if pmode.is_some_and(|m| m < required) {
                    problems.push(format!(
                        "port {port} is {}, weaker than {}",
                        shown(pmode),
                        required.as_str()
                    ));
                    ports.insert(port.clone(), json!({"mode": required.as_str()}));
                    takeovers.extend(takeovers_of(
                        &pa.metadata,
                        &id,
                        &path,
                        &format!("spec.portLevelMtls.{port}.mode"),
                    ));
                } else if let Some(m) = pmode
                    && owned_by_us(&pa.metadata, &path)
                {
                    ports.insert(port.clone(), json!({"mode": m.as_str()}));
                }
            }
            if problems.is_empty() {
                continue;
            }
            let mut spec = serde_json::Map::new();
            if !mtls.is_empty() {
                spec.insert("mtls".into(), Value::Object(mtls));
            }
            if !ports.is_empty() {
                spec.insert("portLevelMtls".into(), Value::Object(ports));
            }
            let what = if labels.is_empty() {
                "namespace-wide override".to_string()
            } else {
                format!("workload override ({})", label_text(&labels))
            };
            self.plan.findings.push(Finding {
                object: id,
                message: format!("{what}: {}", problems.join(", ")),
                fix: Some(Fix::Apply {
                    namespace: ns.clone(),
                    name: name.clone(),
                    patch: json!({
                        "apiVersion": API_VERSION,
                        "kind": KIND,
                        "metadata": {"name": name, "namespace": ns},
                        "spec": Value::Object(spec),
                    }),
                    takeovers,
                }),
                held: false,
                target: false,
            });
        }
    }

    /// meshwarden's own objects that are no longer declared (a namespace left the selector,
    /// an exemption was removed, a user's object now sets the namespace-wide mode).
    fn stale(&mut self) {
        let policy = self.input.policy;
        for pa in self.input.peer_auths {
            let ns = pa.namespace().unwrap_or_default();
            let name = pa.name_any();
            if is_ours(&pa.metadata, policy) && !self.desired.contains(&(ns.clone(), name.clone()))
            {
                self.plan.findings.push(Finding {
                    object: pa_id(&ns, &name),
                    message: "created by meshwarden but no longer declared".to_string(),
                    fix: Some(Fix::Delete {
                        namespace: ns,
                        name,
                    }),
                    held: false,
                    target: false,
                });
            }
        }
    }
}

fn label_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn describe_exemption(ex: &MtlsExemption) -> String {
    let mut s = match &ex.selector {
        None => format!(
            "namespace {} {}",
            ex.namespace,
            Strength::from(ex.mode).as_str()
        ),
        Some(sel) => format!(
            "workloads {} in {} {}",
            selector::to_query(sel),
            ex.namespace,
            Strength::from(ex.mode).as_str()
        ),
    };
    if !ex.ports.is_empty() {
        let ports: Vec<String> = ex
            .ports
            .iter()
            .map(|p| format!("{} {}", p.port, Strength::from(p.mode).as_str()))
            .collect();
        s.push_str(&format!(" (ports {})", ports.join(", ")));
    }
    s
}

/// Decides every write and deviation of the `mtls` section (pure).
pub fn plan(input: &Input<'_>) -> Plan {
    let spec = input.spec;
    let declared = Strength::from(spec.mode);
    let hold = declared == Strength::Strict && !spec.force && !input.blockers.is_empty();
    let mut p = Planner {
        input,
        plan: Plan {
            held: false,
            ..Plan::default()
        },
        desired: BTreeSet::new(),
        handled: BTreeSet::new(),
        hold,
    };
    let known: BTreeSet<&str> = input.namespaces.iter().map(|n| n.name.as_str()).collect();
    let root = spec.root_namespace.as_str();

    // Exemptions first: a namespace exemption takes its namespace out of the scope.
    let mut exempt_ns: BTreeSet<&str> = BTreeSet::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut namespace_slots = Vec::new();
    let mut workload = Vec::new();
    for ex in &spec.exemptions {
        let name = exemption_name(ex);
        let obj = pa_id(&ex.namespace, &name);
        let reject = |msg: String| Finding {
            object: obj.clone(),
            message: format!("exemption {} {msg}", describe_exemption(ex)),
            fix: None,
            held: false,
            target: false,
        };
        if !seen.insert(name.clone()) {
            p.plan
                .findings
                .push(reject("repeats an earlier exemption and is ignored".into()));
            continue;
        }
        if !known.contains(ex.namespace.as_str()) {
            p.plan.findings.push(reject(format!(
                "cannot be rendered: namespace {} does not exist",
                ex.namespace
            )));
            continue;
        }
        match &ex.selector {
            None if spec.scope == MtlsScope::Mesh && ex.namespace == root => {
                p.plan.findings.push(reject(
                    "cannot be rendered: the root namespace holds the mesh-wide mode; exempt other namespaces or change mtls.mode".into(),
                ));
            }
            None => {
                exempt_ns.insert(ex.namespace.as_str());
                namespace_slots.push(ex);
            }
            Some(_) if ex.namespace == root => {
                p.plan.findings.push(reject(
                    "cannot be rendered: Istio ignores workload selectors in the root namespace"
                        .into(),
                ));
            }
            Some(sel) => {
                let exprs = sel.match_expressions.iter().flatten().next().is_some();
                let labels: BTreeMap<String, String> = sel.match_labels.clone().unwrap_or_default();
                if exprs || labels.is_empty() {
                    p.plan.findings.push(reject(
                        "cannot be rendered: a PeerAuthentication selects workloads by matchLabels only; use matchLabels (at least one)".into(),
                    ));
                } else {
                    workload.push((ex, labels));
                }
            }
        }
    }

    // The scopes.
    let scanned: BTreeSet<&str> = match spec.scope {
        MtlsScope::Mesh => {
            p.plan.targets += 1;
            if known.contains(root) {
                p.slot(Slot {
                    namespace: root,
                    declared,
                    name: SCOPE_OBJECT.to_string(),
                    what: "mesh-wide mode".to_string(),
                });
            } else {
                p.plan.findings.push(Finding {
                    object: format!("Namespace/{root}"),
                    message: format!(
                        "root namespace {root} does not exist: set mtls.rootNamespace to Istio's root namespace"
                    ),
                    fix: None,
                    held: false,
                    target: true,
                });
            }
            known.clone()
        }
        MtlsScope::Namespaces => {
            let sel = spec.namespace_selector.clone().unwrap_or_default();
            let selected: BTreeSet<&str> = input
                .namespaces
                .iter()
                .filter(|n| selector::matches(&sel, &n.labels))
                .map(|n| n.name.as_str())
                .filter(|n| !exempt_ns.contains(n))
                .collect();
            for ns in &selected {
                p.plan.targets += 1;
                p.slot(Slot {
                    namespace: ns,
                    declared,
                    name: SCOPE_OBJECT.to_string(),
                    what: format!("namespace {ns}"),
                });
            }
            selected
        }
    };

    for ex in namespace_slots {
        p.plan.targets += 1;
        let name = exemption_name(ex);
        p.slot(Slot {
            namespace: &ex.namespace,
            declared: ex.mode.into(),
            name: name.clone(),
            what: format!("exemption {}", describe_exemption(ex)),
        });
        p.plan.exemptions.push(format!(
            "{} (namespace-wide PeerAuthentication in {})",
            describe_exemption(ex),
            ex.namespace
        ));
    }
    for (ex, labels) in workload {
        p.plan.targets += 1;
        p.workload_exemption(ex, labels);
        p.plan.exemptions.push(format!(
            "{} as {}",
            describe_exemption(ex),
            pa_id(&ex.namespace, &exemption_name(ex))
        ));
    }

    let required = if hold { Strength::Permissive } else { declared };
    p.overrides(&scanned, required, &exempt_ns);
    p.stale();
    p.plan.held = p.plan.findings.iter().any(|f| f.held);
    p.plan
}

/// What was read from the cluster.
pub struct Observation {
    pub namespaces: Vec<NamespaceInfo>,
    pub peer_auths: Vec<PeerAuthentication>,
    /// Pods, read only when a STRICT hold has to be decided.
    pub pods: Vec<PodInfo>,
}

const PAGE: u32 = 500;

/// Lists the metadata of every object of a kind, page by page.
async fn list_meta<K>(api: &Api<K>, what: &str) -> Result<Vec<PartialObjectMeta<K>>>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(PAGE);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api
            .list_metadata(&lp)
            .await
            .map_err(|e| Error::kube(format!("list {what}"), e))?;
        out.extend(page.items);
        match page.metadata.continue_ {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(out),
        }
    }
}

/// Reads namespaces, PeerAuthentications and (when needed) pod metadata.
pub async fn observe(ctx: &Context, need_pods: bool) -> Result<Observation> {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let pas: Api<PeerAuthentication> = Api::all(ctx.client.clone());
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let (ns, pa, pods) = tokio::try_join!(
        list_meta(&namespaces, "Namespaces"),
        async {
            pas.list(&ListParams::default())
                .await
                .map(|l| l.items)
                .map_err(|e| {
                    Error::kube("list PeerAuthentications (are Istio's CRDs installed?)", e)
                })
        },
        async {
            if need_pods {
                list_meta(&pods, "Pods").await
            } else {
                Ok(Vec::new())
            }
        },
    )?;
    Ok(Observation {
        namespaces: ns
            .into_iter()
            .map(|n| NamespaceInfo {
                name: n.metadata.name.unwrap_or_default(),
                labels: n.metadata.labels.unwrap_or_default(),
            })
            .collect(),
        peer_auths: pa,
        pods: pods
            .into_iter()
            // A pod being deleted is no client worth holding STRICT for.
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| PodInfo {
                injected: p
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(SIDECAR_STATUS)),
                namespace: p.metadata.namespace.unwrap_or_default(),
                name: p.metadata.name.unwrap_or_default(),
                labels: p.metadata.labels.unwrap_or_default(),
            })
            .collect(),
    })
}

async fn execute(ctx: &Context, fix: &Fix) -> Result<()> {
    match fix {
        Fix::Apply {
            namespace,
            name,
            patch,
            ..
        } => {
            let api: Api<PeerAuthentication> = Api::namespaced(ctx.client.clone(), namespace);
            apply::apply(&api, name, patch, &ctx.writes)
                .await
                .map(|_| ())
        }
        Fix::Delete { namespace, name } => {
            let api: Api<PeerAuthentication> = Api::namespaced(ctx.client.clone(), namespace);
            apply::delete(&api, name, &ctx.writes).await
        }
    }
}

/// Observes, plans and (in Enforce) applies the `mtls` section; reports the result.
pub async fn reconcile(
    ctx: &Context,
    policy: &MeshPolicy,
    spec: &MtlsSpec,
    enforcement: Enforcement,
) -> RuleReport {
    let ctype = types::MUTUAL_TLS;
    let enforce = enforcement == Enforcement::Enforce;
    let need_pods = spec.mode == MtlsMode::STRICT && !spec.force;
    let obs = match observe(ctx, need_pods).await {
        Ok(o) => o,
        Err(e) => return RuleReport::failed(ctype, &e),
    };
    let blocking = blockers(&obs.pods, &obs.namespaces, &spec.exemptions);
    let owner = policy.controller_owner_ref(&()).map(|mut o| {
        o.block_owner_deletion = Some(false);
        o
    });
    let name = policy.name_any();
    let plan = plan(&Input {
        spec,
        policy: &name,
        owner,
        namespaces: &obs.namespaces,
        peer_auths: &obs.peer_auths,
        blockers: &blocking,
    });

    let mut report = RuleReport {
        condition: Observed::new(ctype, Status::True, "Compliant", ""),
        violations: Vec::new(),
        targets: plan.targets,
        compliant: 0,
        corrected: 0,
        corrections: Vec::new(),
    };
    let mut takeovers = Vec::new();
    let mut fights = Vec::new();
    let mut unfixable = false;
    let mut outstanding_targets = 0;
    for f in &plan.findings {
        let key = format!("{name}:{}", f.object);
        let now = Instant::now();
        let mut fighting = false;
        let mut fixed = false;
        if enforce && let Some(fix) = &f.fix {
            if ctx.fight_check(&key, now) {
                fighting = true;
                fights.push(f.object.clone());
            } else {
                if let Err(e) = execute(ctx, fix).await {
                    let mut failed = RuleReport::failed(ctype, &e);
                    failed.targets = plan.targets;
                    return failed;
                }
                ctx.fight_record(&key, now);
                fixed = true;
                report.corrected += 1;
                report
                    .corrections
                    .push(format!("{}: {}", f.object, f.message));
                if let Fix::Apply { takeovers: t, .. } = fix {
                    takeovers.extend(t.iter().cloned());
                }
            }
        }
        if fixed && !f.held {
            continue;
        }
        if f.target {
            outstanding_targets += 1;
        }
        unfixable |= f.fix.is_none() && !f.held;
        let action = if !enforce {
            "Reported"
        } else if f.held {
            "Held"
        } else if fighting {
            "Skipped"
        } else {
            "Reported"
        };
        report.violations.push(Violation {
            rule: ctype.to_string(),
            object: f.object.clone(),
            message: f.message.clone(),
            action: action.to_string(),
        });
    }
    report.compliant = (plan.targets - outstanding_targets).max(0);

    let key = format!(
        "{name}/{}/{ctype}",
        policy.metadata.generation.unwrap_or_default()
    );
    let takeovers = ctx.remember_takeovers(&key, &takeovers);
    let mut msg = Vec::new();
    let scope = match spec.scope {
        MtlsScope::Mesh => format!(
            "mode {} for the mesh (root namespace {})",
            Strength::from(spec.mode).as_str(),
            spec.root_namespace
        ),
        MtlsScope::Namespaces => format!(
            "mode {} for each selected namespace",
            Strength::from(spec.mode).as_str()
        ),
    };
    msg.push(format!(
        "{scope}: {} of {} target(s) compliant",
        report.compliant, report.targets
    ));
    if report.corrected > 0 {
        msg.push(format!("{} corrected", report.corrected));
    }
    if !plan.exemptions.is_empty() {
        msg.push(format!("exemptions: {}", plan.exemptions.join("; ")));
    }
    msg.extend(super::takeover_sentence(&takeovers));
    msg.extend(super::fight_sentence(&fights));
    let deviations: Vec<&Violation> = report
        .violations
        .iter()
        .filter(|v| v.action != "Held")
        .collect();
    if !deviations.is_empty() {
        let shown: Vec<String> = deviations
            .iter()
            .take(5)
            .map(|v| format!("{} {}", v.object, v.message))
            .collect();
        msg.push(format!("deviations: {}", shown.join("; ")));
        if !enforce {
            msg.push("Audit mode: nothing was changed".to_string());
        }
    }
    msg.extend(plan.notes.iter().take(3).cloned());
    if plan.held {
        msg.push(hold_message(&blocking, &obs.namespaces));
    }

    let held = plan.held && enforce;
    let (status, reason) = if !fights.is_empty() {
        (Status::False, "FightDetected")
    } else if held {
        (Status::False, "StrictHeld")
    } else if !report.violations.is_empty() && !enforce {
        (Status::False, "NonCompliant")
    } else if !report.violations.is_empty() && unfixable {
        (Status::False, "CannotCorrect")
    } else if !report.violations.is_empty() {
        (Status::False, "NonCompliant")
    } else if report.targets == 0 {
        (Status::False, "NoTargets")
    } else if !takeovers.is_empty() {
        (Status::True, "FieldOwnedByOther")
    } else if report.corrected > 0 {
        (Status::True, "Corrected")
    } else {
        (Status::True, "Compliant")
    };
    if reason == "NoTargets" {
        msg.push(
            "mtls.namespaceSelector selects no namespace: check its labels against `kubectl get ns --show-labels`"
                .to_string(),
        );
    }
    report.condition = Observed::new(ctype, status, reason, msg.join(". "));
    report
}

/// Metadata watch of every object of a kind that only passes on events where `fingerprint`
/// changed (and deletions), so that busy objects such as pods do not trigger a reconcile on
/// every status update.
pub fn changed_meta<K>(
    client: &kube::Client,
    (health, name): (&std::sync::Arc<crate::watch::Health>, &'static str),
    fingerprint: fn(&ObjectMeta) -> u64,
) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let api: Api<PartialObjectMeta<K>> = Api::all(client.clone());
    let mut seen: HashMap<(String, String), u64> = HashMap::new();
    crate::watch::resilient(health.clone(), name, move || {
        watcher::watcher(api.clone(), watcher::Config::default())
    })
    .filter_map(move |ev| {
        let key = |m: &ObjectMeta| {
            (
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        };
        let out = match ev {
            Err(e) => Some(Err(e)),
            Ok(watcher::Event::Delete(o)) => {
                seen.remove(&key(&o.metadata));
                Some(Ok(o))
            }
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                let fp = fingerprint(&o.metadata);
                if seen.insert(key(&o.metadata), fp) == Some(fp) {
                    None
                } else {
                    Some(Ok(o))
                }
            }
            Ok(_) => None,
        };
        futures::future::ready(out)
    })
}

/// What matters about a pod: labels, sidecar, being deleted.
pub fn pod_fingerprint(m: &ObjectMeta) -> u64 {
    let mut h = DefaultHasher::new();
    m.labels.hash(&mut h);
    m.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SIDECAR_STATUS))
        .hash(&mut h);
    m.deletion_timestamp.is_some().hash(&mut h);
    h.finish()
}

/// What matters about a PeerAuthentication: its spec (generation) and labels.
pub fn peer_auth_fingerprint(m: &ObjectMeta) -> u64 {
    let mut h = DefaultHasher::new();
    m.generation.hash(&mut h);
    m.labels.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, Time};

    fn spec(yaml: &str) -> MtlsSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn ns(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn pa(ns: &str, name: &str, age: i64, spec_json: Value) -> PeerAuthentication {
        let mut p = PeerAuthentication::new(name, serde_json::from_value(spec_json).unwrap());
        p.metadata.namespace = Some(ns.into());
        p.metadata.creation_timestamp =
            Some(Time(jiff::Timestamp::from_second(1_000_000 - age).unwrap()));
        p
    }

    fn ours(mut p: PeerAuthentication, policy: &str) -> PeerAuthentication {
        p.metadata.labels = Some(
            [
                (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                (POLICY_LABEL.to_string(), policy.to_string()),
            ]
            .into(),
        );
        p
    }

    fn pod(ns: &str, name: &str, injected: bool) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            labels: [("app".to_string(), name.to_string())].into(),
            injected,
        }
    }

    fn run(
        s: &MtlsSpec,
        nss: &[NamespaceInfo],
        pas: &[PeerAuthentication],
        blockers: &[PodInfo],
    ) -> Plan {
        plan(&Input {
            spec: s,
            policy: "p",
            owner: None,
            namespaces: nss,
            peer_auths: pas,
            blockers,
        })
    }

    fn patch_of(f: &Finding) -> &Value {
        match &f.fix {
            Some(Fix::Apply { patch, .. }) => patch,
            other => panic!("expected an apply, got {other:?}"),
        }
    }

    #[test]
    fn mesh_scope_creates_one_root_object_then_converges() {
        let s = spec("{mode: STRICT, rootNamespace: root}");
        let nss = [ns("root", &[]), ns("app", &[])];
        let p = run(&s, &nss, &[], &[]);
        assert_eq!(p.targets, 1);
        assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
        let f = &p.findings[0];
        assert_eq!(f.object, "PeerAuthentication/root/meshwarden-mtls");
        let patch = patch_of(f);
        assert_eq!(patch["spec"]["mtls"]["mode"], "STRICT");
        assert!(patch["spec"].get("selector").is_none());
        assert_eq!(patch["metadata"]["labels"][POLICY_LABEL], "p");
        assert!(!f.held);

        // What the apply creates is compliant: nothing more to do.
        let created = ours(
            pa(
                "root",
                "meshwarden-mtls",
                1,
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            "p",
        );
        assert!(run(&s, &nss, &[created], &[]).findings.is_empty());
    }

    #[test]
    fn mesh_level_unset_is_permissive_and_is_corrected() {
        let s = spec("{mode: PERMISSIVE, rootNamespace: root}");
        let nss = [ns("root", &[])];
        let user = pa("root", "default", 5, json!({"mtls": {"mode": "UNSET"}}));
        let p = run(&s, &nss, &[user], &[]);
        assert_eq!(p.findings.len(), 1);
        assert!(
            p.findings[0].message.contains("mode is UNSET"),
            "{}",
            p.findings[0].message
        );
        assert_eq!(
            patch_of(&p.findings[0])["spec"]["mtls"]["mode"],
            "PERMISSIVE"
        );
    }

    #[test]
    fn users_default_is_corrected_in_place_with_only_the_mode() {
        let s = spec("{mode: STRICT, rootNamespace: root}");
        let nss = [ns("root", &[])];
        let older = pa(
            "root",
            "default",
            10,
            json!({"mtls": {"mode": "PERMISSIVE"}}),
        );
        let newer = pa("root", "another", 2, json!({"mtls": {"mode": "DISABLE"}}));
        let p = run(&s, &nss, &[newer, older], &[]);
        let fixes: Vec<&Finding> = p.findings.iter().filter(|f| f.fix.is_some()).collect();
        assert_eq!(fixes.len(), 1, "{:?}", p.findings);
        assert_eq!(
            fixes[0].object, "PeerAuthentication/root/default",
            "the oldest one"
        );
        assert_eq!(
            patch_of(fixes[0]),
            &json!({
                "apiVersion": "security.istio.io/v1",
                "kind": "PeerAuthentication",
                "metadata": {"name": "default", "namespace": "root"},
                "spec": {"mtls": {"mode": "STRICT"}},
            }),
            "no labels, no owner: only the mode"
        );
        let other = p
            .findings
            .iter()
            .find(|f| f.object == "PeerAuthentication/root/another")
            .unwrap();
        assert!(other.fix.is_none());
        assert!(other.message.contains("uses the oldest, default"));
        assert!(
            !p.findings
                .iter()
                .any(|f| f.object.ends_with("meshwarden-mtls")),
            "no second object"
        );
    }

    #[test]
    fn our_object_is_removed_once_a_user_object_sets_the_namespace_mode() {
        let s = spec("{mode: STRICT, rootNamespace: root}");
        let nss = [ns("root", &[])];
        let mine = ours(
            pa(
                "root",
                "meshwarden-mtls",
                10,
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            "p",
        );
        let user = pa("root", "default", 1, json!({"mtls": {"mode": "STRICT"}}));
        let p = run(&s, &nss, &[mine, user], &[]);
        assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
        assert_eq!(
            p.findings[0].fix,
            Some(Fix::Delete {
                namespace: "root".into(),
                name: "meshwarden-mtls".into()
            })
        );
    }

    #[test]
    fn strict_is_held_at_permissive_but_a_strict_scope_is_never_weakened() {
        let s = spec("{mode: STRICT, rootNamespace: root}");
        let nss = [ns("root", &[])];
        let blockers = [pod("legacy", "web", false)];
        let p = run(&s, &nss, &[], &blockers);
        assert!(p.held);
        assert!(p.findings[0].held);
        assert_eq!(
            patch_of(&p.findings[0])["spec"]["mtls"]["mode"],
            "PERMISSIVE"
        );

        let strict = pa("root", "default", 3, json!({"mtls": {"mode": "STRICT"}}));
        let p = run(&s, &nss, &[strict], &blockers);
        assert!(p.findings.is_empty(), "{:?}", p.findings);
        assert!(!p.held);
        assert!(p.notes[0].contains("already STRICT"));

        let mine = ours(
            pa(
                "root",
                "meshwarden-mtls",
                3,
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            "p",
        );
        let p = run(&s, &nss, &[mine], &blockers);
        assert!(p.findings.is_empty(), "{:?}", p.findings);
        assert!(p.notes[0].contains("root/meshwarden-mtls is already STRICT"));

        let forced = spec("{mode: STRICT, rootNamespace: root, force: true}");
        let p = run(&forced, &nss, &[], &blockers);
        assert!(!p.held);
        assert_eq!(patch_of(&p.findings[0])["spec"]["mtls"]["mode"], "STRICT");
    }

    #[test]
    fn blockers_are_pods_without_sidecar_outside_ambient_and_exemptions() {
        let nss = [
            ns("plain", &[]),
            ns("injected", &[("istio-injection", "enabled")]),
            ns("ambient", &[("istio.io/dataplane-mode", "ambient")]),
            ns("exempt", &[]),
            ns("istio-system", &[]),
        ];
        let mut istiod = pod("istio-system", "istiod", false);
        istiod.labels.insert("app".into(), "istiod".into());
        let mut opted_out = pod("ambient", "opted-out", false);
        opted_out
            .labels
            .insert("istio.io/dataplane-mode".into(), "none".into());
        let pods = [
            pod("plain", "a", false),
            pod("plain", "b", true),
            pod("injected", "old", false),
            pod("injected", "new", true),
            pod("ambient", "z", false),
            opted_out,
            pod("exempt", "x", false),
            pod("plain", "skipped", false),
            istiod,
        ];
        let s = spec(
            "{mode: STRICT, exemptions: [{namespace: exempt}, {namespace: plain, selector: {matchLabels: {app: skipped}}}]}",
        );
        let b = blockers(&pods, &nss, &s.exemptions);
        let names: Vec<&str> = b.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["a", "old", "opted-out"]);

        let msg = hold_message(&b, &nss);
        assert!(msg.contains("3 pod(s)"), "{msg}");
        assert!(msg.contains("plain (1: a)"), "{msg}");
        assert!(msg.contains("restarting them adds the sidecar"), "{msg}");
        assert!(msg.contains("  exemptions:\n  - namespace: ambient\n  - namespace: injected\n  - namespace: plain"), "{msg}");
        assert!(msg.contains("force: true"), "{msg}");
    }

    #[test]
    fn namespaces_scope_holds_every_selected_namespace() {
        let s =
            spec("{mode: STRICT, scope: Namespaces, namespaceSelector: {matchLabels: {team: a}}}");
        let nss: Vec<NamespaceInfo> = (0..5)
            .map(|i| ns(&format!("n{i}"), &[("team", if i < 3 { "a" } else { "b" })]))
            .collect();
        let p = run(&s, &nss, &[], &[]);
        assert_eq!(p.targets, 3);
        let objs: Vec<&str> = p.findings.iter().map(|f| f.object.as_str()).collect();
        assert_eq!(
            objs,
            vec![
                "PeerAuthentication/n0/meshwarden-mtls",
                "PeerAuthentication/n1/meshwarden-mtls",
                "PeerAuthentication/n2/meshwarden-mtls"
            ]
        );
        let none =
            spec("{mode: STRICT, scope: Namespaces, namespaceSelector: {matchLabels: {team: c}}}");
        assert_eq!(run(&none, &nss, &[], &[]).targets, 0);
    }

    #[test]
    fn exemptions_are_rendered_with_stable_names() {
        let s = spec(
            r#"{mode: STRICT, rootNamespace: root, exemptions: [
                {namespace: legacy},
                {namespace: shop, selector: {matchLabels: {app: pay}}, mode: STRICT, ports: [{port: 8080, mode: PERMISSIVE}]},
                {namespace: shop, selector: {matchExpressions: [{key: app, operator: Exists}]}},
                {namespace: root, selector: {matchLabels: {app: x}}},
                {namespace: gone}
            ]}"#,
        );
        let nss = [ns("root", &[]), ns("legacy", &[]), ns("shop", &[])];
        let p = run(&s, &nss, &[], &[]);
        assert_eq!(p.targets, 3, "mesh, legacy and shop/pay");
        let legacy = exemption_name(&s.exemptions[0]);
        let pay = exemption_name(&s.exemptions[1]);
        assert!(
            legacy.starts_with(EXEMPTION_PREFIX) && legacy.len() == EXEMPTION_PREFIX.len() + 10
        );
        assert_ne!(legacy, pay);
        assert_eq!(pay, exemption_name(&s.exemptions[1].clone()), "stable");
        let find = |id: String| p.findings.iter().find(|f| f.object == id).unwrap();
        let l = patch_of(find(format!("PeerAuthentication/legacy/{legacy}")));
        assert_eq!(l["spec"], json!({"mtls": {"mode": "PERMISSIVE"}}));
        let w = patch_of(find(format!("PeerAuthentication/shop/{pay}")));
        assert_eq!(
            w["spec"],
            json!({"selector": {"matchLabels": {"app": "pay"}}, "mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}})
        );
        let rejected: Vec<&String> = p
            .findings
            .iter()
            .filter(|f| f.fix.is_none())
            .map(|f| &f.message)
            .collect();
        assert_eq!(rejected.len(), 3, "{rejected:?}");
        assert!(rejected.iter().any(|m| m.contains("matchLabels only")));
        assert!(
            rejected
                .iter()
                .any(|m| m.contains("ignores workload selectors in the root"))
        );
        assert!(rejected.iter().any(|m| m.contains("gone does not exist")));
        assert_eq!(p.exemptions.len(), 2);
    }

    #[test]
    fn weaker_overrides_are_corrected_unless_exempted() {
        let s = spec(
            "{mode: STRICT, rootNamespace: root, force: true, exemptions: [{namespace: legacy}, {namespace: shop, selector: {matchLabels: {app: pay}}}]}",
        );
        let nss = [
            ns("root", &[]),
            ns("legacy", &[]),
            ns("shop", &[]),
            ns("web", &[]),
        ];
        let root = pa("root", "default", 9, json!({"mtls": {"mode": "STRICT"}}));
        let ns_wide = pa("web", "default", 1, json!({"mtls": {"mode": "PERMISSIVE"}}));
        let port = pa(
            "web",
            "api",
            1,
            json!({"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "UNSET"}, "portLevelMtls": {"9000": {"mode": "DISABLE"}, "9001": {"mode": "STRICT"}}}),
        );
        let covered = pa(
            "shop",
            "pay",
            1,
            json!({"selector": {"matchLabels": {"app": "pay", "v": "2"}}, "mtls": {"mode": "DISABLE"}}),
        );
        let in_exempt_ns = pa("legacy", "default", 1, json!({"mtls": {"mode": "DISABLE"}}));
        let fine = pa(
            "web",
            "ok",
            1,
            json!({"selector": {"matchLabels": {"app": "ok"}}, "mtls": {"mode": "STRICT"}}),
        );
        let other_policy = ours(
            pa(
                "web",
                "meshwarden-mtls",
                1,
                json!({"mtls": {"mode": "PERMISSIVE"}}),
            ),
            "q",
        );
        let p = run(
            &s,
            &nss,
            &[
                root,
                ns_wide,
                port,
                covered,
                in_exempt_ns,
                fine,
                other_policy,
            ],
            &[],
        );
        assert!(
            !p.findings
                .iter()
                .any(|f| f.object.ends_with("web/meshwarden-mtls")),
            "another policy's object is that policy's business"
        );
        let by = |id: &str| p.findings.iter().find(|f| f.object == id);
        let w = by("PeerAuthentication/web/default").unwrap();
        assert_eq!(patch_of(w)["spec"], json!({"mtls": {"mode": "STRICT"}}));
        let a = by("PeerAuthentication/web/api").unwrap();
        assert_eq!(
            patch_of(a)["spec"],
            json!({"portLevelMtls": {"9000": {"mode": "STRICT"}}}),
            "only the weak port; UNSET inherits"
        );
        assert!(a.message.contains("port 9000 is DISABLE"), "{}", a.message);
        assert!(
            by("PeerAuthentication/shop/pay").is_none(),
            "covered by the workload exemption"
        );
        assert!(by("PeerAuthentication/web/ok").is_none());
        // The exempted namespace's own default is corrected to the exemption's mode.
        let l = by("PeerAuthentication/legacy/default").unwrap();
        assert_eq!(patch_of(l)["spec"], json!({"mtls": {"mode": "PERMISSIVE"}}));
    }

    #[test]
    fn an_apply_to_a_user_object_keeps_every_field_we_own() {
        let s = spec("{mode: STRICT, rootNamespace: root, force: true}");
        let nss = [ns("root", &[]), ns("web", &[])];
        let root = pa("root", "default", 9, json!({"mtls": {"mode": "STRICT"}}));
        let mut api = pa(
            "web",
            "api",
            1,
            json!({"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "STRICT"}, "portLevelMtls": {"9000": {"mode": "DISABLE"}}}),
        );
        api.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some(FIELD_MANAGER.into()),
            fields_v1: Some(FieldsV1(json!({"f:spec": {"f:mtls": {"f:mode": {}}}}))),
            ..Default::default()
        }]);
        let p = run(&s, &nss, &[root, api], &[]);
        assert_eq!(
            patch_of(&p.findings[0])["spec"],
            json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"9000": {"mode": "STRICT"}}})
        );
    }

    #[test]
    fn held_scope_does_not_raise_permissive_overrides() {
        let s = spec("{mode: STRICT, rootNamespace: root}");
        let nss = [ns("root", &[]), ns("web", &[])];
        let perm = pa("web", "default", 1, json!({"mtls": {"mode": "PERMISSIVE"}}));
        let dis = pa(
            "web",
            "x",
            1,
            json!({"selector": {"matchLabels": {"a": "b"}}, "mtls": {"mode": "DISABLE"}}),
        );
        let p = run(&s, &nss, &[perm, dis], &[pod("web", "w", false)]);
        assert!(
            !p.findings
                .iter()
                .any(|f| f.object == "PeerAuthentication/web/default")
        );
        let x = p
            .findings
            .iter()
            .find(|f| f.object == "PeerAuthentication/web/x")
            .unwrap();
        assert_eq!(patch_of(x)["spec"], json!({"mtls": {"mode": "PERMISSIVE"}}));
    }

    #[test]
    fn fingerprints_ignore_what_does_not_matter() {
        let mut a = ObjectMeta {
            labels: Some([("app".to_string(), "x".to_string())].into()),
            ..Default::default()
        };
        let base = pod_fingerprint(&a);
        a.resource_version = Some("42".into());
        a.annotations = Some([("other".to_string(), "y".to_string())].into());
        assert_eq!(pod_fingerprint(&a), base);
        a.annotations = Some([(SIDECAR_STATUS.to_string(), "{}".to_string())].into());
        assert_ne!(pod_fingerprint(&a), base);
    }
}
