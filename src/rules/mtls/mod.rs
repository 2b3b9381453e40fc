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
    Enforcement, MeshPolicy, MtlsExemption, MtlsMode, MtlsOverrides, MtlsScope, MtlsSpec, Violation,
};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::rules::RuleReport;
use crate::selector;
use crate::status::conditions::{Observed, Status, types};
use crate::status::messages::{self, Contested};
use crate::status::reasons::{self, CLIENTS_CUT_OFF, OVERRIDES_REPORTED, ViolationAction};
use crate::write::driver::{self, Outcome, Planned};
use crate::write::fight::{TakeoverKey, TakeoverPart};
use crate::write::{self, FightKey, ForeignWrites, MANAGED_BY, POLICY_LABEL};

/// PeerAuthentication writes of one reconcile in flight at once.
pub const WRITE_CONCURRENCY: usize = 16;
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

fn takeovers_of(meta: &ObjectMeta, id: &str, path: &[&str], field: &str) -> Vec<String> {
    write::foreign_managers(meta, path)
        .into_iter()
        .map(|m| format!("{id} {field} (was managed by {m})"))
        .collect()
}

mod clients;
mod plan;
mod pods;

pub use clients::{blockers, cut_off_message, hold_message};
pub use plan::{expand_exemptions, plan};
pub use pods::{PodCache, only_changes};

/// What was read from the cluster.
pub struct Observation {
    pub namespaces: Vec<NamespaceInfo>,
    pub peer_auths: Vec<PeerAuthentication>,
    /// Pods, read only when a STRICT hold has to be decided.
    pub pods: Vec<PodInfo>,
}

const PAGE: u32 = 500;

/// Lists the metadata of every object of a kind, page by page.
async fn list_meta<K>(
    api: &Api<K>,
    what: &str,
    fields: Option<&str>,
) -> Result<Vec<PartialObjectMeta<K>>>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(PAGE);
        if let Some(f) = fields {
            lp = lp.fields(f);
        }
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

/// The pods that have not finished, from the controller's watch cache, or listed (metadata
/// only, pages of 500) when no cache runs (a caller without the controller). A cache that
/// has not listed within 10 s, or whose watch failed and has not listed again, is an error:
/// the section is Unknown until the cache is current, never Compliant on a partial view.
async fn observe_pods(ctx: &Context) -> Result<Vec<PodInfo>> {
    if let Some(cache) = ctx.cache::<PodCache>() {
        cache
            .current(std::time::Duration::from_secs(10))
            .await
            .map_err(Error::Cache)?;
        return Ok(cache.pods());
    }
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let (pods, host) = tokio::try_join!(
        list_meta(&api, "Pods", Some(pods::NOT_FINISHED)),
        list_meta(&api, "Pods", Some(pods::HOST_NETWORK)),
    )?;
    let host: BTreeSet<(Option<String>, Option<String>)> = host
        .into_iter()
        .map(|p| (p.metadata.namespace, p.metadata.name))
        .collect();
    Ok(pods
        .iter()
        // A pod being deleted is no client worth holding STRICT for.
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let mut info = pods::pod_info(&p.metadata);
            info.host_network =
                host.contains(&(p.metadata.namespace.clone(), p.metadata.name.clone()));
            info
        })
        .collect())
}

/// Reads namespaces, PeerAuthentications and (when needed) the pods.
pub async fn observe(ctx: &Context, need_pods: bool) -> Result<Observation> {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let pas: Api<PeerAuthentication> = Api::all(ctx.client.clone());
    let (ns, pa, pods) = tokio::try_join!(
        list_meta(&namespaces, "Namespaces", None),
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
                observe_pods(ctx).await
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
        pods,
    })
}

/// The fields of a PeerAuthentication meshwarden sets.
const OWNED_PATHS: [&[&str]; 2] = [&["f:spec", "f:mtls"], &["f:spec", "f:portLevelMtls"]];

fn owned_paths() -> Vec<Vec<String>> {
    OWNED_PATHS
        .iter()
        .map(|p| p.iter().map(|k| k.to_string()).collect())
        .collect()
}

/// Other managers' writes of the fields `fix` sets, as read; `None` for a create or a delete.
fn seen_writes(fix: &Fix, read: &[PeerAuthentication]) -> Option<ForeignWrites> {
    let Fix::Apply {
        namespace, name, ..
    } = fix
    else {
        return None;
    };
    read.iter()
        .find(|pa| pa.namespace().as_deref() == Some(namespace) && &pa.name_any() == name)
        .map(|pa| write::foreign_writes(&pa.metadata, &owned_paths()))
}

/// Writes `fix`; returns the other managers' writes of the fields it set, as left.
async fn execute(ctx: &Context, fix: &Fix) -> Result<Option<ForeignWrites>> {
    match fix {
        Fix::Apply {
            namespace,
            name,
            patch,
            ..
        } => {
            let api: Api<PeerAuthentication> = Api::namespaced(ctx.client.clone(), namespace);
            write::apply(&api, name, patch, &ctx.writes)
                .await
                .map(|pa| Some(write::foreign_writes(&pa.metadata, &owned_paths())))
        }
        Fix::Delete { namespace, name } => {
            let api: Api<PeerAuthentication> = Api::namespaced(ctx.client.clone(), namespace);
            write::delete(&api, name, &ctx.writes).await.map(|()| None)
        }
    }
}

/// Istio's root namespace as this policy uses it.
struct Root {
    namespace: String,
    /// Where it comes from, for the condition.
    source: String,
    /// The policy's `rootNamespace` disagrees with meshConfig: what to say.
    mismatch: Option<String>,
    /// meshConfig's root namespace, when it differs from `namespace`.
    istio_root: Option<String>,
}

/// The root namespace: the policy's `rootNamespace` when set (compared with meshConfig when
/// that can be read), otherwise meshConfig's (see [`crate::istio::mesh_root`]). Without a
/// controller (no cache), istiod's namespace is assumed.
async fn root_namespace(ctx: &Context, spec: &MtlsSpec) -> Result<Root> {
    let mesh = match ctx.cache::<crate::istio::IstioCache>() {
        Some(c) => Some(c.mesh_root(std::time::Duration::from_secs(10)).await),
        None => None,
    };
    let unclear = |message: String| {
        Error::MeshConfig(format!(
            "{message}: set mtls.rootNamespace to the root namespace Istio uses, or make the mesh configs agree"
        ))
    };
    Ok(match (&spec.root_namespace, mesh) {
        (Some(set), Some(Ok(Ok(m)))) if m.from_mesh_config && m.namespace != *set => Root {
            namespace: set.clone(),
            source: "mtls.rootNamespace".into(),
            mismatch: Some(format!(
                "mtls.rootNamespace is {set} but Istio's root namespace is {} ({}): Istio takes a selector-less PeerAuthentication as mesh-wide only in its root namespace, so the mode set in {set} is not the mesh's; remove mtls.rootNamespace to follow meshConfig, or set it to {}",
                m.namespace, m.source, m.namespace
            )),
            istio_root: Some(m.namespace),
        },
        (Some(set), _) => Root {
            namespace: set.clone(),
            source: "mtls.rootNamespace".into(),
            mismatch: None,
            istio_root: None,
        },
        (None, None) => Root {
            namespace: ctx.istio_namespace.clone(),
            source: "assumed: istiod's namespace".into(),
            mismatch: None,
            istio_root: None,
        },
        (None, Some(Err(e))) => return Err(e),
        (None, Some(Ok(Err(message)))) => return Err(unclear(message)),
        (None, Some(Ok(Ok(m)))) => Root {
            namespace: m.namespace,
            source: m.source,
            mismatch: None,
            istio_root: None,
        },
    })
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
    let root = match root_namespace(ctx, spec).await {
        Ok(r) => r,
        Err(e) => return RuleReport::failed(ctype, &e),
    };
    let obs = match observe(ctx, need_pods).await {
        Ok(o) => o,
        Err(e) => return RuleReport::failed(ctype, &e),
    };
    // Only the hints about restarting pods depend on revisions: without them, every revision
    // label is taken as live.
    let revisions = ctx
        .revisions()
        .await
        .unwrap_or_else(|_| crate::istio::Revisions::any());
    // Exemptions that select namespaces by label apply to each namespace they select now.
    let spec = &MtlsSpec {
        exemptions: expand_exemptions(&spec.exemptions, &obs.namespaces),
        ..spec.clone()
    };
    let blocking = blockers(&obs.pods, &obs.namespaces, &spec.exemptions);
    let owner = write::owner_reference(policy);
    let name = policy.name_any();
    let plan = plan(&Input {
        spec,
        root: &root.namespace,
        istio_root: root.istio_root.as_deref(),
        policy: &name,
        owner,
        namespaces: &obs.namespaces,
        peer_auths: &obs.peer_auths,
        blockers: &blocking,
    });

    let mut report = RuleReport {
        targets: plan.targets,
        ..RuleReport::new(Observed::new(ctype, Status::True, reasons::COMPLIANT, ""))
    };
    let mut takeovers = Vec::new();
    let mut fights = Vec::new();
    let mut unfixable = false;
    let mut found: BTreeSet<&'static str> = BTreeSet::new();
    let mut outstanding_targets = 0;
    // Every finding with a fix is written in Enforce, except objects in a fight, in the order
    // of [`Fix::phase`]: what lets plain text in, then what only writes STRICT, then
    // deletions; each phase done before the next starts, with at most WRITE_CONCURRENCY in
    // flight.
    let mut write = vec![false; plan.findings.len()];
    let mut fighting = vec![false; plan.findings.len()];
    for phase in 0..=2 {
        let planned: Vec<Planned<(usize, &Fix)>> = plan
            .findings
            .iter()
            .enumerate()
            .filter(|_| enforce)
            .filter_map(|(i, f)| f.fix.as_ref().map(|fix| (i, f, fix)))
            .filter(|(_, _, fix)| fix.phase() == phase)
            .map(|(i, f, fix)| Planned {
                key: FightKey {
                    policy: name.clone(),
                    section: ctype,
                    object: f.object.clone(),
                    field: None,
                },
                seen: seen_writes(fix, &obs.peer_auths),
                item: (i, fix),
            })
            .collect();
        let outcomes = driver::drive(&ctx.memory, planned, WRITE_CONCURRENCY, |(_, fix)| {
            execute(ctx, fix)
        })
        .await;
        let mut first_error = None;
        for (_, outcome) in outcomes {
            match outcome {
                Outcome::Fighting((i, _)) => {
                    fighting[i] = true;
                    fights.push(plan.findings[i].object.clone());
                }
                Outcome::Written((i, _)) => write[i] = true,
                Outcome::Failed(_, e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            let mut failed = RuleReport::failed(ctype, &e);
            failed.targets = plan.targets;
            return failed;
        }
    }
    for (i, f) in plan.findings.iter().enumerate() {
        let fixed = write[i];
        let fighting = fighting[i];
        if let (true, Some(fix)) = (fixed, &f.fix) {
            report.corrected += 1;
            report
                .corrections
                .push(format!("{}: {}", f.object, f.message));
            if let Fix::Apply { takeovers: t, .. } = fix {
                takeovers.extend(t.iter().cloned());
            }
        }
        if fixed && !f.held {
            continue;
        }
        if f.target {
            outstanding_targets += 1;
        }
        unfixable |= f.fix.is_none() && !f.held && f.reason.is_none();
        found.extend(f.reason);
        let action = if !enforce {
            ViolationAction::Reported
        } else if f.held {
            ViolationAction::Held
        } else if fighting {
            ViolationAction::Skipped
        } else {
            ViolationAction::Reported
        };
        report.violations.push(Violation {
            rule: ctype.to_string(),
            object: f.object.clone(),
            message: f.message.clone(),
            action: action.into(),
        });
    }
    report.compliant = (plan.targets - outstanding_targets).max(0);

    let key = TakeoverKey {
        policy: name.clone(),
        generation: policy.metadata.generation.unwrap_or_default(),
        section: ctype,
        part: TakeoverPart::Fields,
    };
    let takeovers = ctx.memory.takeovers(key, &takeovers);
    let mut msg = Vec::new();
    let scope = match spec.scope {
        MtlsScope::Mesh => format!(
            "mode {} for the mesh (root namespace {}: {})",
            Strength::from(spec.mode).as_str(),
            root.namespace,
            root.source
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
        let mut shown = plan.exemptions[..plan.exemptions.len().min(10)].join("; ");
        if plan.exemptions.len() > 10 {
            shown.push_str(&format!(" and {} more", plan.exemptions.len() - 10));
        }
        msg.push(format!("exemptions: {shown}"));
    }
    msg.extend(messages::takeover_sentence(&takeovers));
    msg.extend(messages::fight_sentence(&fights, Contested::Objects));
    let deviations: Vec<&Violation> = report
        .violations
        .iter()
        .filter(|v| v.action != ViolationAction::Held)
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
        msg.push(hold_message(&blocking, &obs.namespaces, &revisions));
    }
    let cut_off = found.contains(CLIENTS_CUT_OFF);
    if cut_off {
        msg.push(cut_off_message(&blocking, &obs.namespaces, &revisions));
    }

    if let Some(m) = &root.mismatch {
        msg.insert(1, m.clone());
        report.violations.insert(
            0,
            Violation {
                rule: ctype.to_string(),
                object: format!("MeshPolicy/{name}"),
                message: m.clone(),
                action: ViolationAction::Reported.into(),
            },
        );
    }
    let held = plan.held && enforce;
    let (status, reason) = if !fights.is_empty() {
        (Status::False, reasons::FIGHT_DETECTED)
    } else if root.mismatch.is_some() {
        (Status::False, reasons::ROOT_NAMESPACE_MISMATCH)
    } else if held {
        (Status::False, reasons::STRICT_HELD)
    } else if cut_off {
        (Status::False, CLIENTS_CUT_OFF)
    } else if !report.violations.is_empty() && !enforce {
        (Status::False, reasons::NON_COMPLIANT)
    } else if !report.violations.is_empty() && unfixable {
        (Status::False, reasons::CANNOT_CORRECT)
    } else if found.contains(OVERRIDES_REPORTED) {
        (Status::False, OVERRIDES_REPORTED)
    } else if !report.violations.is_empty() {
        (Status::False, reasons::NON_COMPLIANT)
    } else if report.targets == 0 {
        (Status::False, reasons::NO_TARGETS)
    } else if !takeovers.is_empty() {
        (Status::True, reasons::FIELD_OWNED_BY_OTHER)
    } else if report.corrected > 0 {
        (Status::True, reasons::CORRECTED)
    } else {
        (Status::True, reasons::COMPLIANT)
    };
    if reason == reasons::NO_TARGETS {
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
    K: crate::watch::Watched,
{
    let api: Api<PartialObjectMeta<K>> = Api::all(client.clone());
    only_changes(
        crate::watch::resilient(health.clone(), name, move || {
            watcher::watcher(api.clone(), watcher::Config::default())
        }),
        fingerprint,
    )
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
pub(crate) mod testutil {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    pub(crate) fn spec(yaml: &str) -> MtlsSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    pub(crate) fn ns(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    pub(crate) fn pa(ns: &str, name: &str, age: i64, spec_json: Value) -> PeerAuthentication {
        let mut p = PeerAuthentication::new(name, serde_json::from_value(spec_json).unwrap());
        p.metadata.namespace = Some(ns.into());
        p.metadata.creation_timestamp =
            Some(Time(jiff::Timestamp::from_second(1_000_000 - age).unwrap()));
        p
    }

    pub(crate) fn ours(mut p: PeerAuthentication, policy: &str) -> PeerAuthentication {
        p.metadata.labels = Some(
            [
                (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                (POLICY_LABEL.to_string(), policy.to_string()),
            ]
            .into(),
        );
        p
    }

    pub(crate) fn pod(ns: &str, name: &str, injected: bool) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            labels: [("app".to_string(), name.to_string())].into(),
            injected,
            host_network: false,
        }
    }

    pub(crate) fn run(
        s: &MtlsSpec,
        nss: &[NamespaceInfo],
        pas: &[PeerAuthentication],
        blockers: &[PodInfo],
    ) -> Plan {
        plan(&Input {
            spec: s,
            root: s.root_namespace.as_deref().unwrap_or("istio-system"),
            istio_root: None,
            policy: "p",
            owner: None,
            namespaces: nss,
            peer_auths: pas,
            blockers,
        })
    }

    pub(crate) fn patch_of(f: &Finding) -> &Value {
        match &f.fix {
            Some(Fix::Apply { patch, .. }) => patch,
            other => panic!("expected an apply, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests;
