//! Resources of injected `istio-proxy` sidecars (`spec.sidecars`).
//!
//! Istio sizes a sidecar from four pod annotations (`sidecar.istio.io/proxyCPU`,
//! `proxyCPULimit`, `proxyMemory`, `proxyMemoryLimit`). Its injection template uses them as
//! soon as any one is present and then ignores the mesh defaults for the others, so meshwarden
//! always writes all four together, on the pod template of every Deployment, StatefulSet and
//! DaemonSet whose pods get a sidecar, plus `meshwarden.io/sidecar-resources: <hash>` so that
//! the templates it changed are recognisable after a restart.
//!
//! Changing a pod template rolls the workload, so rollouts are paced: at most
//! `maxConcurrentRollouts` workloads carrying meshwarden's hash are rolling at once, and a
//! stalled rollout stops the pacing. The pacing state is read from the cluster (hash annotation
//! and rollout status), never kept only in memory.
//!
//! observe (reads) -> [`classify`] and [`plan`] (pure) -> apply (Enforce) -> report.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{
    Container, LimitRange, Namespace, Pod, PodTemplateSpec, ResourceQuota,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;
use serde_json::{Value, json};

use crate::api::{Enforcement, MeshPolicy, Pacing, ResourcesSpec, SidecarSpec, Violation};
use crate::compact::Compact;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::quantity;
use crate::rules::RuleReport;
use crate::selector;
use crate::status::conditions::{Observed, Status, types};
use crate::status::messages::{self, Contested, list};
use crate::status::reasons::{self, ViolationAction};
use crate::write::driver::{self, Outcome, Planned};
use crate::write::{self, FIELD_MANAGER, FightKey, ForeignWrites};

/// The watches whose caches the section reads (their names in `watch::Health`).
pub const WATCHES: [&str; 7] = [
    "Namespaces",
    "Deployments",
    "StatefulSets",
    "DaemonSets",
    "LimitRanges",
    "ResourceQuotas",
    "RunningPods",
];

/// CPU request of the proxy.
pub const PROXY_CPU: &str = "sidecar.istio.io/proxyCPU";
/// CPU limit of the proxy.
pub const PROXY_CPU_LIMIT: &str = "sidecar.istio.io/proxyCPULimit";
/// Memory request of the proxy.
pub const PROXY_MEMORY: &str = "sidecar.istio.io/proxyMemory";
/// Memory limit of the proxy.
pub const PROXY_MEMORY_LIMIT: &str = "sidecar.istio.io/proxyMemoryLimit";
/// Hash of the four values meshwarden wrote on a pod template.
pub const HASH_ANNOTATION: &str = "meshwarden.io/sidecar-resources";
/// Workload annotation (on its metadata, not the template, so writing it starts no rollout):
/// the `metadata.generation` meshwarden's last write of the template produced. A rollout is
/// meshwarden's only while the workload is still at that generation.
pub const GENERATION_ANNOTATION: &str = "meshwarden.io/sidecar-generation";
/// Workload annotation that opts out of meshwarden rules (comma-separated rule names).
pub const IGNORE_ANNOTATION: &str = "meshwarden.io/ignore";
/// The rule name that opts a workload out of this section.
pub const IGNORE_VALUE: &str = "sidecar-resources";
/// Injection switch on a pod (label or annotation).
pub const INJECT: &str = "sidecar.istio.io/inject";
/// Injection templates of a pod; `gateway` marks an Istio gateway, which is not a sidecar.
pub const INJECT_TEMPLATES: &str = "inject.istio.io/templates";
const PROXY_CONTAINER: &str = "istio-proxy";
/// A StatefulSet or DaemonSet rollout not done this long after meshwarden's write is stalled:
/// 10 minutes (the Deployment default `progressDeadlineSeconds`) plus one minute per pod.
const STALL_BASE_SECS: i64 = 600;
const STALL_PER_POD_SECS: i64 = 60;
/// Pods named per namespace in the condition.
const DRIFT_NAMES: usize = 3;
/// Server-side applies of one reconcile in flight at once.
pub const WRITE_CONCURRENCY: usize = 16;
/// Corrections of one reconcile described one by one (Events); `corrected` counts them all.
const CORRECTIONS_LISTED: usize = 5;

/// The workload kinds whose pod templates are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deployment => "Deployment",
            Kind::StatefulSet => "StatefulSet",
            Kind::DaemonSet => "DaemonSet",
        }
    }
}

/// The four values written, derived from `spec.sidecars.resources`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub cpu: String,
    pub cpu_limit: String,
    pub memory: String,
    pub memory_limit: String,
    /// How omitted values were filled in (said in the condition).
    pub notes: Vec<String>,
}

impl Desired {
    /// The four annotations, in a fixed order.
    pub fn annotations(&self) -> [(&'static str, &str); 4] {
        [
            (PROXY_CPU, self.cpu.as_str()),
            (PROXY_CPU_LIMIT, self.cpu_limit.as_str()),
            (PROXY_MEMORY, self.memory.as_str()),
            (PROXY_MEMORY_LIMIT, self.memory_limit.as_str()),
        ]
    }

    /// A short stable hash of the four values (FNV-1a, hex).
    pub fn hash(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for (k, v) in self.annotations() {
            for b in k.bytes().chain([b'=']).chain(v.bytes()).chain([b';']) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("{h:016x}")
    }

    /// `cpu 100m/1, memory 128Mi/512Mi` (request/limit).
    pub fn summary(&self) -> String {
        format!(
            "cpu {}/{}, memory {}/{}",
            self.cpu, self.cpu_limit, self.memory, self.memory_limit
        )
    }

    /// Per-pod amount of a quota key (`requests.cpu`, ...) in milli-units.
    fn amount(&self, key: &str) -> i128 {
        let v = match key {
            "requests.cpu" => &self.cpu,
            "limits.cpu" => &self.cpu_limit,
            "requests.memory" => &self.memory,
            _ => &self.memory_limit,
        };
        quantity::millis(v).unwrap_or(0)
    }
}

fn ios(v: &IntOrString) -> String {
    match v {
        IntOrString::Int(i) => i.to_string(),
        IntOrString::String(s) => s.clone(),
    }
}

/// Derives the four values. An omitted request takes the limit (what Kubernetes does for a
/// container with only a limit); an omitted limit takes the request (Istio would otherwise
/// give the proxy no limit at all, not the mesh default). A resource with neither is an error.
pub fn desired(res: &ResourcesSpec) -> std::result::Result<Desired, String> {
    let req = res.requests.clone().unwrap_or_default();
    let lim = res.limits.clone().unwrap_or_default();
    let mut notes = Vec::new();
    let mut missing = Vec::new();
    let mut pick = |name: &str, r: Option<IntOrString>, l: Option<IntOrString>| match (r, l) {
        (Some(r), Some(l)) => Some((ios(&r), ios(&l))),
        (None, Some(l)) => {
            let l = ios(&l);
            notes.push(format!(
                "requests.{name} is not declared: the request is set to the limit {l}, as Kubernetes does"
            ));
            Some((l.clone(), l))
        }
        (Some(r), None) => {
            let r = ios(&r);
            notes.push(format!(
                "limits.{name} is not declared: the limit is set to the request {r} (once one proxy annotation is set Istio gives the proxy no {name} limit instead of the mesh default)"
            ));
            Some((r.clone(), r))
        }
        (None, None) => {
            missing.push(name.to_string());
            None
        }
    };
    let cpu = pick("cpu", req.cpu, lim.cpu);
    let memory = pick("memory", req.memory, lim.memory);
    match (cpu, memory) {
        (Some((cpu, cpu_limit)), Some((memory, memory_limit))) => Ok(Desired {
            cpu,
            cpu_limit,
            memory,
            memory_limit,
            notes,
        }),
        _ => Err(format!(
            "spec.sidecars.resources declares neither a request nor a limit for {}: Istio uses the four proxy annotations together, so meshwarden writes nothing until requests or limits of both cpu and memory are declared",
            missing.join(" and ")
        )),
    }
}

/// Where a workload stands in a rollout, as `kubectl rollout status` sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    Complete,
    InProgress(String),
    /// The template is rolled out to every replica, but not every replica is available: the
    /// tail of a rollout, or pod churn long after one (a node drained, a pod restarting).
    /// [`classify`] counts it as in progress only shortly after meshwarden's write.
    Settling(String),
    Stalled(String),
    /// A paused Deployment: its template changes do not roll out until it is resumed.
    Paused,
}

fn annotations_of(meta: Option<&ObjectMeta>) -> BTreeMap<String, String> {
    meta.and_then(|m| m.annotations.clone()).unwrap_or_default()
}

/// Rollout state of a Deployment: the controller saw the latest generation, every replica is
/// updated, no old replica is left and every updated replica is available; stalled when the
/// `Progressing` condition says `ProgressDeadlineExceeded`.
pub fn deployment_rollout(d: &Deployment) -> Rollout {
    if d.spec.as_ref().and_then(|s| s.paused) == Some(true) {
        return Rollout::Paused;
    }
    let generation = d.metadata.generation.unwrap_or(0);
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let st = d.status.clone().unwrap_or_default();
    if st.observed_generation.unwrap_or(-1) < generation {
        return Rollout::InProgress(format!(
            "the Deployment controller has not observed generation {generation} yet"
        ));
    }
    if let Some(c) = st.conditions.iter().flatten().find(|c| {
        c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    }) {
        return Rollout::Stalled(format!(
            "Progressing condition is ProgressDeadlineExceeded: {}",
            c.message.clone().unwrap_or_default()
        ));
    }
    if progress_complete(&st) {
        // The controller declared the observed generation rolled out; fewer updated or
        // available replicas since are pod churn (a pod deleted and not yet replaced).
        return Rollout::Complete;
    }
    let updated = st.updated_replicas.unwrap_or(0);
    let total = st.replicas.unwrap_or(0);
    let available = st.available_replicas.unwrap_or(0);
    if updated < replicas {
        Rollout::InProgress(format!("{updated} of {replicas} replicas updated"))
    } else if total > updated {
        Rollout::InProgress(format!(
            "{} old replica(s) pending termination",
            total - updated
        ))
    } else if available < updated {
        Rollout::Settling(format!(
            "{available} of {updated} updated replicas available"
        ))
    } else {
        Rollout::Complete
    }
}

/// The Deployment controller's `Progressing` condition says the observed generation finished
/// rolling out (`NewReplicaSetAvailable`). The controller replaces that reason, in the same
/// status write that records a new `observedGeneration`, as soon as a new template has
/// replicas to roll, and keeps it while a replica of a finished rollout is deleted or becomes
/// unavailable.
fn progress_complete(st: &k8s_openapi::api::apps::v1::DeploymentStatus) -> bool {
    st.conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Progressing" && c.reason.as_deref() == Some("NewReplicaSetAvailable"))
}

/// Rollout state of a StatefulSet (`OnDelete` never rolls by itself: complete).
pub fn statefulset_rollout(s: &StatefulSet) -> Rollout {
    let spec = s.spec.clone().unwrap_or_default();
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    if strategy.type_.as_deref() == Some("OnDelete") {
        return Rollout::Complete;
    }
    let generation = s.metadata.generation.unwrap_or(0);
    let st = s.status.clone().unwrap_or_default();
    if st.observed_generation.unwrap_or(-1) < generation {
        return Rollout::InProgress(format!(
            "the StatefulSet controller has not observed generation {generation} yet"
        ));
    }
    let replicas = spec.replicas.unwrap_or(1);
    let ready = st.ready_replicas.unwrap_or(0);
    let partition = strategy
        .rolling_update
        .and_then(|r| r.partition)
        .unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    if st.update_revision == st.current_revision {
        // The controller makes the update revision current only once every replica is
        // updated and ready, and keeps it so: a replica not ready since is pod churn.
        return Rollout::Complete;
    }
    if partition > 0 {
        // Pods of the old revision beyond the ordinals the partition keeps are still to be
        // replaced (a deleted pod lowers the counts of both revisions, not this one).
        let old = st.current_replicas.unwrap_or(0);
        if old > partition.min(replicas) {
            return Rollout::InProgress(format!(
                "{updated} of {} replicas above the partition updated",
                replicas - partition.min(replicas)
            ));
        }
        if ready < replicas {
            return Rollout::Settling(format!("{ready} of {replicas} replicas ready"));
        }
        return Rollout::Complete;
    }
    // Until every replica is updated and ready the rollout runs.
    Rollout::InProgress(format!(
        "{updated} of {replicas} replicas updated, {ready} ready"
    ))
}

/// Rollout state of a DaemonSet (`OnDelete` never rolls by itself: complete).
pub fn daemonset_rollout(d: &DaemonSet) -> Rollout {
    let spec = d.spec.clone().unwrap_or_default();
    if spec.update_strategy.and_then(|s| s.type_).as_deref() == Some("OnDelete") {
        return Rollout::Complete;
    }
    let generation = d.metadata.generation.unwrap_or(0);
    let st = d.status.clone().unwrap_or_default();
    if st.observed_generation.unwrap_or(-1) < generation {
        return Rollout::InProgress(format!(
            "the DaemonSet controller has not observed generation {generation} yet"
        ));
    }
    let want = st.desired_number_scheduled;
    let updated = st.updated_number_scheduled.unwrap_or(0);
    let available = st.number_available.unwrap_or(0);
    if updated < st.current_number_scheduled {
        // Nodes still run a pod of an older template.
        Rollout::InProgress(format!("{updated} of {want} pods updated"))
    } else if updated < want {
        // No old pod is left; some nodes have none yet (a new node): not a template rollout.
        Rollout::Settling(format!("{updated} of {want} pods scheduled"))
    } else if available < want {
        Rollout::Settling(format!("{available} of {want} pods available"))
    } else {
        Rollout::Complete
    }
}

/// True when meshwarden owns fields of the object beyond the sidecar annotations, i.e. another
/// meshwarden rule (gateway or control-plane HA) writes it with the same field manager. Writing
/// it from this rule too would release that rule's fields, so it is left alone.
pub fn owned_by_other_rule(meta: &ObjectMeta) -> bool {
    let ours: BTreeSet<String> = [
        PROXY_CPU,
        PROXY_CPU_LIMIT,
        PROXY_MEMORY,
        PROXY_MEMORY_LIMIT,
        HASH_ANNOTATION,
    ]
    .iter()
    .map(|k| format!("f:{k}"))
    .collect();
    let only = |v: &Value, key: &str| -> Option<Value> {
        let m = v.as_object()?;
        if m.keys().all(|k| k == key || k == ".") {
            Some(m.get(key).cloned().unwrap_or(Value::Null))
        } else {
            None
        }
    };
    meta.managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some(FIELD_MANAGER))
        .filter(|m| m.subresource.as_deref().unwrap_or_default().is_empty())
        .filter_map(|m| m.fields_v1.as_ref())
        .any(|f| {
            let Some(top) = f.0.as_object() else {
                return true;
            };
            // This rule's fields: the template's annotations and one on the metadata.
            let template = top.get("f:spec").map(|spec| {
                let annotations = only(spec, "f:template")
                    .and_then(|v| only(&v, "f:metadata"))
                    .and_then(|v| only(&v, "f:annotations"));
                match annotations {
                    Some(Value::Object(a)) => a.keys().any(|k| k != "." && !ours.contains(k)),
                    Some(Value::Null) => false,
                    _ => true,
                }
            });
            let metadata = top
                .get("f:metadata")
                .map(|m| match only(m, "f:annotations") {
                    Some(Value::Object(a)) => a
                        .keys()
                        .any(|k| k != "." && k != &format!("f:{GENERATION_ANNOTATION}")),
                    Some(Value::Null) => false,
                    _ => true,
                });
            top.keys()
                .any(|k| k != "f:spec" && k != "f:metadata" && k != ".")
                || template.unwrap_or(false)
                || metadata.unwrap_or(false)
        })
}

fn is_ambient(ns_labels: &BTreeMap<String, String>) -> bool {
    ns_labels.get("istio.io/dataplane-mode").map(String::as_str) == Some("ambient")
}

pub use crate::istio::namespace_injection_on;

/// Whether the section covers a namespace with these labels: its `namespaceSelector`, or by
/// default every namespace with injection on. Ambient namespaces are never covered.
pub fn selects_namespace(spec: &SidecarSpec, ns_labels: &BTreeMap<String, String>) -> bool {
    if is_ambient(ns_labels) {
        return false;
    }
    match &spec.namespace_selector {
        Some(sel) => selector::matches(sel, ns_labels),
        None => namespace_injection_on(ns_labels),
    }
}

/// Routing of watch events: whether a policy's sidecars section may cover a namespace
/// (`None`: labels unknown, so yes).
pub fn covers_namespace(
    spec: &crate::api::MeshPolicySpec,
    ns_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    match (&spec.sidecars, ns_labels) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(s), Some(l)) => selects_namespace(s, l),
    }
}

/// Why pods from this template get no sidecar, or `None` when they get one (Istio's webhook
/// selectors: namespace `istio-injection` / `istio.io/rev`, pod `sidecar.istio.io/inject`).
pub fn no_sidecar_reason(
    ns_labels: &BTreeMap<String, String>,
    tpl_labels: &BTreeMap<String, String>,
    tpl_annotations: &BTreeMap<String, String>,
) -> Option<&'static str> {
    if is_ambient(ns_labels) {
        return Some("ambient namespace");
    }
    if tpl_labels.get(INJECT).map(String::as_str) == Some("false")
        || tpl_annotations.get(INJECT).map(String::as_str) == Some("false")
    {
        return Some("sidecar.istio.io/inject is false");
    }
    if tpl_annotations
        .get(INJECT_TEMPLATES)
        .is_some_and(|t| t.split(',').any(|t| t.trim() == "gateway"))
    {
        return Some(
            "Istio gateway (inject.istio.io/templates: gateway), held by the gateways section",
        );
    }
    match ns_labels.get("istio-injection").map(String::as_str) {
        Some("enabled") => None,
        Some(_) => Some("injection disabled in the namespace"),
        None if ns_labels.contains_key("istio.io/rev") => None,
        None if tpl_labels.get(INJECT).map(String::as_str) == Some("true")
            || tpl_labels.contains_key("istio.io/rev") =>
        {
            None
        }
        None => Some("injection is not on for the namespace or the pod"),
    }
}

/// True when a workload's annotation `meshwarden.io/ignore` names `sidecar-resources`.
pub fn opted_out(workload_annotations: &BTreeMap<String, String>) -> bool {
    workload_annotations
        .get(IGNORE_ANNOTATION)
        .is_some_and(|v| v.split(',').any(|p| p.trim() == IGNORE_VALUE))
}

/// Per-pod requests/limits (milli-units) keyed `requests.cpu`, `limits.memory`, ...
pub type Amounts = BTreeMap<&'static str, i128>;
const KEYS: [&str; 4] = [
    "requests.cpu",
    "requests.memory",
    "limits.cpu",
    "limits.memory",
];

/// A workload whose pods get a sidecar, as read from the cluster: its facts (shared with the
/// cache, see [`WorkloadFacts`]), its namespace, and its rollout state as of now.
#[derive(Clone, Debug)]
pub struct Workload {
    pub namespace: String,
    pub facts: Arc<WorkloadFacts>,
    /// The facts' rollout, with stalls of StatefulSets and DaemonSets decided.
    pub rollout: Rollout,
}

impl std::ops::Deref for Workload {
    type Target = WorkloadFacts;
    fn deref(&self) -> &WorkloadFacts {
        &self.facts
    }
}

impl Workload {
    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.kind.as_str(), self.namespace, self.name)
    }

    /// Current per-pod proxy amount from the template's annotations (0 when unset: the mesh
    /// default is not known, so the whole declared amount counts as added).
    fn current(&self, key: &str) -> i128 {
        let ann = match key {
            "requests.cpu" => PROXY_CPU,
            "limits.cpu" => PROXY_CPU_LIMIT,
            "requests.memory" => PROXY_MEMORY,
            _ => PROXY_MEMORY_LIMIT,
        };
        self.template_annotations
            .get(ann)
            .and_then(|v| quantity::millis(v))
            .unwrap_or(0)
    }
}

/// Deviations of a template's annotations from the declared values (empty: compliant).
pub fn deviations(desired: &Desired, annotations: &BTreeMap<String, String>) -> Vec<String> {
    desired
        .annotations()
        .iter()
        .filter_map(|(k, want)| match annotations.get(*k) {
            Some(have) if quantity::same(have, want) => None,
            Some(have) => Some(format!("{k} is {have}, declared {want}")),
            None => Some(format!("{k} is unset, declared {want}")),
        })
        .collect()
}

fn container_amounts(containers: &[Container]) -> Amounts {
    let mut out = Amounts::new();
    for c in containers.iter().filter(|c| c.name != PROXY_CONTAINER) {
        let Some(r) = &c.resources else { continue };
        for (prefix, map) in [("requests", &r.requests), ("limits", &r.limits)] {
            for (res, q) in map.iter().flatten() {
                let key = match (prefix, res.as_str()) {
                    ("requests", "cpu") => "requests.cpu",
                    ("requests", "memory") => "requests.memory",
                    ("limits", "cpu") => "limits.cpu",
                    ("limits", "memory") => "limits.memory",
                    _ => continue,
                };
                *out.entry(key).or_insert(0) += quantity::millis(&q.0).unwrap_or(0);
            }
        }
    }
    out
}

/// What the rule knows of a workload, read from the whole object once (watch event or LIST)
/// and kept instead of it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadFacts {
    pub kind: Kind,
    pub name: String,
    pub generation: i64,
    /// Pods it runs when rolled out (a DaemonSet: the nodes it is scheduled on).
    pub replicas: i32,
    /// Template labels that decide injection (`sidecar.istio.io/inject`, `istio.io/rev`).
    pub template_labels: BTreeMap<String, String>,
    /// Template annotations the rule reads: the four proxy values, meshwarden's hash,
    /// `sidecar.istio.io/inject` and `inject.istio.io/templates`.
    pub template_annotations: BTreeMap<String, String>,
    /// Opted out with `meshwarden.io/ignore: sidecar-resources` on the workload.
    pub opted_out: bool,
    /// Another meshwarden rule writes it (see [`owned_by_other_rule`]).
    pub other_rule: bool,
    /// When meshwarden last changed it.
    pub written_at: Option<jiff::Timestamp>,
    /// The generation meshwarden's last write of the template produced
    /// ([`GENERATION_ANNOTATION`]); `None` when it never wrote it (or an older version did).
    pub written_generation: Option<i64>,
    /// Managers other than meshwarden that own one of the four annotations.
    pub foreign_owners: Vec<String>,
    /// Their writes of the four annotations (the evidence of a fight).
    pub foreign_writes: ForeignWrites,
    /// Requests/limits of the template's other containers.
    pub other_containers: Amounts,
    pub rollout: Rollout,
}

/// The `managedFields` paths of the four proxy annotations.
fn annotation_paths() -> Vec<Vec<String>> {
    [PROXY_CPU, PROXY_CPU_LIMIT, PROXY_MEMORY, PROXY_MEMORY_LIMIT]
        .iter()
        .map(|k| {
            ["f:spec", "f:template", "f:metadata", "f:annotations"]
                .iter()
                .map(|p| p.to_string())
                .chain([format!("f:{k}")])
                .collect()
        })
        .collect()
}

const TEMPLATE_LABELS: [&str; 2] = [INJECT, "istio.io/rev"];
const TEMPLATE_ANNOTATIONS: [&str; 7] = [
    PROXY_CPU,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY,
    PROXY_MEMORY_LIMIT,
    HASH_ANNOTATION,
    INJECT,
    INJECT_TEMPLATES,
];

fn only(map: Option<&BTreeMap<String, String>>, keys: &[&str]) -> BTreeMap<String, String> {
    map.into_iter()
        .flatten()
        .filter(|(k, _)| keys.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl WorkloadFacts {
    fn read(
        kind: Kind,
        meta: &ObjectMeta,
        template: Option<&PodTemplateSpec>,
        replicas: i32,
        rollout: Rollout,
    ) -> Self {
        let tpl_meta = template.and_then(|t| t.metadata.as_ref());
        let mut foreign_owners = Vec::new();
        let paths = annotation_paths();
        for path in &paths {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            for m in write::foreign_managers(meta, &path) {
                if !foreign_owners.contains(&m) {
                    foreign_owners.push(m);
                }
            }
        }
        let containers = template
            .and_then(|t| t.spec.as_ref())
            .map(|s| s.containers.as_slice())
            .unwrap_or_default();
        WorkloadFacts {
            kind,
            name: meta.name.clone().unwrap_or_default(),
            generation: meta.generation.unwrap_or(0),
            replicas,
            template_labels: only(tpl_meta.and_then(|m| m.labels.as_ref()), &TEMPLATE_LABELS),
            template_annotations: only(
                tpl_meta.and_then(|m| m.annotations.as_ref()),
                &TEMPLATE_ANNOTATIONS,
            ),
            opted_out: opted_out(&annotations_of(Some(meta))),
            other_rule: owned_by_other_rule(meta),
            written_at: write::fields::meshwarden_write_time(meta),
            written_generation: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(GENERATION_ANNOTATION))
                .and_then(|v| v.parse().ok()),
            foreign_owners,
            foreign_writes: write::foreign_writes(meta, &paths),
            other_containers: container_amounts(containers),
            rollout,
        }
    }

    /// Reads the facts as a write of this process left the workload, before a watch has
    /// delivered it: the five annotations on its template and the written generation, whose
    /// rollout the workload's controller has not observed yet.
    fn written(&self, generation: i64, d: &Desired) -> Self {
        let mut out = self.clone();
        out.generation = generation;
        out.written_generation = Some(generation);
        for (k, v) in d.annotations() {
            out.template_annotations
                .insert(k.to_string(), v.to_string());
        }
        out.template_annotations
            .insert(HASH_ANNOTATION.to_string(), d.hash());
        out.rollout = Rollout::InProgress(format!(
            "the {} controller has not observed generation {generation} yet",
            self.kind.as_str()
        ));
        out
    }
}

impl From<&Deployment> for WorkloadFacts {
    fn from(d: &Deployment) -> Self {
        let spec = d.spec.as_ref();
        let replicas = spec.and_then(|s| s.replicas).unwrap_or(1);
        let template = spec.map(|s| &s.template);
        WorkloadFacts::read(
            Kind::Deployment,
            &d.metadata,
            template,
            replicas,
            deployment_rollout(d),
        )
    }
}

impl From<&StatefulSet> for WorkloadFacts {
    fn from(s: &StatefulSet) -> Self {
        let spec = s.spec.as_ref();
        let replicas = spec.and_then(|s| s.replicas).unwrap_or(1);
        let template = spec.map(|s| &s.template);
        WorkloadFacts::read(
            Kind::StatefulSet,
            &s.metadata,
            template,
            replicas,
            statefulset_rollout(s),
        )
    }
}

impl From<&DaemonSet> for WorkloadFacts {
    fn from(d: &DaemonSet) -> Self {
        let replicas = d
            .status
            .as_ref()
            .map(|s| s.desired_number_scheduled)
            .unwrap_or(0);
        let template = d.spec.as_ref().map(|s| &s.template);
        WorkloadFacts::read(
            Kind::DaemonSet,
            &d.metadata,
            template,
            replicas,
            daemonset_rollout(d),
        )
    }
}

/// What the rule knows of a running pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodFacts {
    pub name: String,
    /// The workload that runs it (a ReplicaSet's pods: its Deployment).
    pub owner: Option<(Kind, String)>,
    /// Labels that decide injection (`sidecar.istio.io/inject`, `istio.io/rev`).
    pub labels: BTreeMap<String, String>,
    /// Annotations that decide injection (`sidecar.istio.io/inject`, `inject.istio.io/templates`).
    pub annotations: BTreeMap<String, String>,
    /// The `istio-proxy` container's requests/limits in milli-units, in the order of
    /// [`Desired::annotations`] (cpu, cpu limit, memory, memory limit); `None` without one.
    pub proxy: Option<[Option<i128>; 4]>,
}

impl From<&Pod> for PodFacts {
    fn from(p: &Pod) -> Self {
        let labels = p.labels();
        let owner = p
            .owner_references()
            .iter()
            .find_map(|o| match o.kind.as_str() {
                "ReplicaSet" => {
                    let hash = labels.get("pod-template-hash")?;
                    let name = o.name.strip_suffix(&format!("-{hash}"))?;
                    Some((Kind::Deployment, name.to_string()))
                }
                "StatefulSet" => Some((Kind::StatefulSet, o.name.clone())),
                "DaemonSet" => Some((Kind::DaemonSet, o.name.clone())),
                _ => None,
            });
        let proxy = p.spec.as_ref().and_then(|spec| {
            let c = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .find(|c| c.name == PROXY_CONTAINER)?;
            let res = c.resources.clone().unwrap_or_default();
            let get = |m: &Option<
                BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
            >,
                       k: &str| {
                m.as_ref()
                    .and_then(|m| m.get(k))
                    .and_then(|q| quantity::millis(&q.0))
            };
            Some([
                get(&res.requests, "cpu"),
                get(&res.limits, "cpu"),
                get(&res.requests, "memory"),
                get(&res.limits, "memory"),
            ])
        });
        PodFacts {
            name: p.name_any(),
            owner,
            labels: only(Some(labels), &[INJECT, "istio.io/rev"]),
            annotations: only(Some(p.annotations()), &[INJECT, INJECT_TEMPLATES]),
            proxy,
        }
    }
}

/// A cached workload.
pub type CachedWorkload<K> = Compact<K, WorkloadFacts>;
/// A cached running pod.
pub type CachedPod = Compact<Pod, PodFacts>;

/// What was read in one namespace the section covers.
#[derive(Clone, Debug, Default)]
pub struct NamespaceObservation {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Deployments, StatefulSets and DaemonSets.
    pub workloads: Vec<Arc<WorkloadFacts>>,
    pub limit_ranges: Vec<LimitRange>,
    pub quotas: Vec<ResourceQuota>,
    /// Running pods (field selector `status.phase=Running`).
    pub pods: Vec<Arc<PodFacts>>,
}

/// Workloads of the covered namespaces, sorted into targets and the ones left alone.
#[derive(Clone, Debug, Default)]
pub struct Classified {
    pub targets: Vec<Workload>,
    /// Workloads opted out with `meshwarden.io/ignore: sidecar-resources`.
    pub opted_out: Vec<String>,
    /// Workloads another meshwarden rule writes (HA), left to it.
    pub other_rule: Vec<String>,
    /// (namespace, kind, name) of every workload not held, so its pods are not counted as drift.
    pub excluded: BTreeSet<(String, Kind, String)>,
}

/// The rollout meshwarden is responsible for (pure): the workload's rollout when meshwarden's
/// last write produced its current generation, `Complete` otherwise. A generation written since
/// by someone else (a `helm upgrade`, a scale) is their rollout: it neither holds a rollout slot
/// nor is ever reported stalled. Pod churn after a rollout finished (a node drained, a new
/// node) is no rollout: the kinds' rollout states tell it apart where their controllers keep
/// a lasting mark of completion (a StatefulSet's current revision, a Deployment's
/// `NewReplicaSetAvailable`); a DaemonSet has none, so pods not all available count as the
/// tail of meshwarden's rollout only while its write is recent. A StatefulSet or DaemonSet
/// whose template is still not on every pod long after meshwarden's write is stalled (a
/// Deployment says so itself: `ProgressDeadlineExceeded`). Workloads written by versions that
/// did not record the generation are taken as meshwarden's but never time out.
pub fn meshwarden_rollout(w: &WorkloadFacts, now: jiff::Timestamp) -> Rollout {
    let written = w.template_annotations.contains_key(HASH_ANNOTATION);
    let current = match w.written_generation {
        Some(g) => g == w.generation,
        None => written,
    };
    if w.rollout == Rollout::Paused {
        return Rollout::Paused;
    }
    if !current {
        return Rollout::Complete;
    }
    let limit = STALL_BASE_SECS + STALL_PER_POD_SECS * i64::from(w.replicas.max(0));
    let waited = w
        .written_at
        .map(|since| now.as_second() - since.as_second());
    match &w.rollout {
        Rollout::Settling(why) if waited.is_some_and(|s| s <= limit) => {
            Rollout::InProgress(why.clone())
        }
        Rollout::Settling(_) => Rollout::Complete,
        Rollout::InProgress(why)
            if w.kind != Kind::Deployment
                && w.written_generation.is_some()
                && waited.is_some_and(|s| s > limit) =>
        {
            Rollout::Stalled(format!(
                "not rolled out {}s after meshwarden changed it (limit {limit}s): {why}",
                waited.unwrap_or_default()
            ))
        }
        other => other.clone(),
    }
}

/// Sorts the observed workloads (pure). `now` decides stalls of StatefulSets and DaemonSets.
pub fn classify(namespaces: &[NamespaceObservation], now: jiff::Timestamp) -> Classified {
    let mut out = Classified::default();
    for ns in namespaces {
        for w in &ns.workloads {
            let id = format!("{}/{}/{}", w.kind.as_str(), ns.name, w.name);
            let key = (ns.name.clone(), w.kind, w.name.clone());
            if no_sidecar_reason(&ns.labels, &w.template_labels, &w.template_annotations).is_some()
            {
                out.excluded.insert(key);
                continue;
            }
            if w.opted_out {
                out.opted_out.push(id);
                out.excluded.insert(key);
                continue;
            }
            if w.other_rule {
                out.other_rule.push(id);
                out.excluded.insert(key);
                continue;
            }
            let rollout = meshwarden_rollout(w, now);
            out.targets.push(Workload {
                namespace: ns.name.clone(),
                facts: w.clone(),
                rollout,
            });
        }
    }
    out.targets
        .sort_by(|a, b| (&a.namespace, a.kind, &a.name).cmp(&(&b.namespace, b.kind, &b.name)));
    out.opted_out.sort();
    out.other_rule.sort();
    out
}

fn show(key: &str, millis: i128) -> String {
    if key.ends_with("cpu") {
        format!("{millis}m")
    } else {
        let bytes = millis / 1000;
        let mi = 1024 * 1024;
        if bytes % mi == 0 {
            format!("{}Mi", bytes / mi)
        } else {
            format!("{bytes}")
        }
    }
}

/// Why the declared values cannot be used in a namespace (empty: they fit).
///
/// LimitRange (type `Container`): each declared request must be at least `min`, each limit at
/// most `max`, and limit/request at most `maxLimitRequestRatio`. ResourceQuota: for every key
/// the quota limits (`requests.cpu`/`cpu`, `requests.memory`/`memory`, `limits.cpu`,
/// `limits.memory`), `used + added + surge` must not exceed `hard`, where `added` sums
/// `replicas x (declared - current)` over the workloads to change (current from their
/// annotations, 0 when unset) and `surge` is one whole extra pod of the largest Deployment to
/// change (the surge pod of its rolling update).
pub fn namespace_fit(
    desired: &Desired,
    changes: &[&Workload],
    limit_ranges: &[LimitRange],
    quotas: &[ResourceQuota],
) -> Vec<String> {
    let mut problems = Vec::new();
    for lr in limit_ranges {
        for item in lr.spec.iter().flat_map(|s| s.limits.iter()) {
            if item.type_ != "Container" {
                continue;
            }
            for res in ["cpu", "memory"] {
                let req = desired.amount(&format!("requests.{res}"));
                let lim = desired.amount(&format!("limits.{res}"));
                let get = |m: &Option<
                    BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
                >| {
                    m.as_ref()
                        .and_then(|m| m.get(res))
                        .and_then(|q| quantity::millis(&q.0))
                };
                if let Some(max) = get(&item.max)
                    && lim > max
                {
                    problems.push(format!(
                        "LimitRange {} allows at most {} {res} per container, declared limit {}",
                        lr.name_any(),
                        show(res, max),
                        show(res, lim)
                    ));
                }
                if let Some(min) = get(&item.min)
                    && req < min
                {
                    problems.push(format!(
                        "LimitRange {} requires at least {} {res} per container, declared request {}",
                        lr.name_any(),
                        show(res, min),
                        show(res, req)
                    ));
                }
                if let Some(ratio) = get(&item.max_limit_request_ratio)
                    && req > 0
                    && lim * 1000 > ratio * req
                {
                    problems.push(format!(
                        "LimitRange {} allows a {res} limit/request ratio of at most {}, declared {}/{}",
                        lr.name_any(),
                        ratio as f64 / 1000.0,
                        show(res, lim),
                        show(res, req)
                    ));
                }
            }
        }
    }
    if changes.is_empty() {
        return problems;
    }
    for q in quotas {
        let hard = q
            .spec
            .as_ref()
            .and_then(|s| s.hard.clone())
            .unwrap_or_default();
        let used = q
            .status
            .as_ref()
            .and_then(|s| s.used.clone())
            .unwrap_or_default();
        for key in KEYS {
            let alias = key.strip_prefix("requests.").unwrap_or(key);
            let name = if hard.contains_key(key) { key } else { alias };
            let Some(h) = hard.get(name).and_then(|q| quantity::millis(&q.0)) else {
                continue;
            };
            let u = used
                .get(name)
                .and_then(|q| quantity::millis(&q.0))
                .unwrap_or(0);
            let want = desired.amount(key);
            let added: i128 = changes
                .iter()
                .map(|w| i128::from(w.replicas.max(0)) * (want - w.current(key)).max(0))
                .sum();
            let surge: i128 = changes
                .iter()
                .filter(|w| w.kind == Kind::Deployment)
                .map(|w| w.other_containers.get(key).copied().unwrap_or(0) + want)
                .max()
                .unwrap_or(0);
            if u + added + surge > h {
                problems.push(format!(
                    "ResourceQuota {} {name}: {} used of {}, the declared sidecars add {} plus {} for a surge pod",
                    q.name_any(),
                    show(key, u),
                    show(key, h),
                    show(key, added),
                    show(key, surge)
                ));
            }
        }
    }
    problems
}

/// What to do with one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The template has the declared values.
    Compliant,
    /// Write the annotations now (its pods roll).
    Apply,
    /// Needs the annotations but waits for a rollout slot, or for a stalled rollout.
    Held(String),
    /// Not written: the namespace's LimitRange or ResourceQuota does not fit.
    Skipped(String),
    /// Audit: reported only.
    Reported,
}

/// The decision for one target (same index as the targets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub deviations: Vec<String>,
    /// Carries meshwarden's hash and is not rolled out yet (uses a rollout slot).
    pub rolling: bool,
    /// Its rollout stalled.
    pub stalled: Option<String>,
}

/// Plans every target (pure). Targets come sorted; earlier ones get rollout slots first.
/// `unfit` maps a namespace to the reasons its LimitRange/ResourceQuota rejects the values.
/// `max_concurrent` is the pacing limit; `None` (pacing off) writes every target at once and
/// lets no stalled rollout hold the others.
pub fn plan(
    desired: &Desired,
    targets: &[Workload],
    unfit: &BTreeMap<String, Vec<String>>,
    max_concurrent: Option<i32>,
    enforce: bool,
) -> Vec<Decision> {
    let mut decisions: Vec<Decision> = targets
        .iter()
        .map(|w| {
            let ours = w.template_annotations.contains_key(HASH_ANNOTATION);
            let (rolling, stalled) = match &w.rollout {
                _ if !ours => (false, None),
                Rollout::Complete | Rollout::Paused => (false, None),
                Rollout::InProgress(_) | Rollout::Settling(_) => (true, None),
                Rollout::Stalled(why) => (true, Some(why.clone())),
            };
            Decision {
                action: Action::Compliant,
                deviations: deviations(desired, &w.template_annotations),
                rolling,
                stalled,
            }
        })
        .collect();
    let mut in_flight = decisions.iter().filter(|d| d.rolling).count();
    let stalled = max_concurrent.is_some() && decisions.iter().any(|d| d.stalled.is_some());
    let max = match max_concurrent {
        Some(n) => usize::try_from(n.max(1)).unwrap_or(1),
        None => usize::MAX,
    };
    for (w, d) in targets.iter().zip(decisions.iter_mut()) {
        if d.deviations.is_empty() {
            continue;
        }
        d.action = if !enforce {
            Action::Reported
        } else if let Some(why) = unfit.get(&w.namespace) {
            Action::Skipped(why.join("; "))
        } else if w.rollout == Rollout::Paused {
            // Reported, never written while paused, and it holds no rollout slot.
            Action::Held(
                "the Deployment is paused (spec.paused): meshwarden writes it once it is resumed"
                    .into(),
            )
        } else if stalled {
            Action::Held("a sidecar rollout stalled; no other starts until it completes".into())
        } else if d.rolling {
            // Already rolling because of meshwarden: rewriting it takes no new slot.
            Action::Apply
        } else if in_flight < max {
            in_flight += 1;
            Action::Apply
        } else {
            Action::Held(format!(
                "waits for a rollout slot (maxConcurrentRollouts {max})"
            ))
        };
    }
    decisions
}

/// The server-side apply patch: exactly the five annotations meshwarden owns on the template,
/// and [`GENERATION_ANNOTATION`] on the workload with `generation`, the generation the write
/// will produce (the template changes, so the server adds one to the stored generation).
pub fn patch(w: &Workload, desired: &Desired, generation: i64) -> Value {
    let mut ann = serde_json::Map::new();
    for (k, v) in desired.annotations() {
        ann.insert(k.into(), json!(v));
    }
    ann.insert(HASH_ANNOTATION.into(), json!(desired.hash()));
    json!({
        "apiVersion": "apps/v1",
        "kind": w.kind.as_str(),
        "metadata": {"name": w.name, "namespace": w.namespace,
            "annotations": {GENERATION_ANNOTATION: generation.to_string()}},
        "spec": {"template": {"metadata": {"annotations": Value::Object(ann)}}},
    })
}

/// Running pods whose `istio-proxy` has other resources than declared, per namespace (pure).
/// Pods of workloads left alone (opted out, no sidecar, other rule) are not counted.
pub fn pod_drift(
    desired: &Desired,
    namespaces: &[NamespaceObservation],
    excluded: &BTreeSet<(String, Kind, String)>,
) -> BTreeMap<String, Vec<String>> {
    let want: Vec<Option<i128>> = desired
        .annotations()
        .iter()
        .map(|(_, v)| quantity::millis(v))
        .collect();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for ns in namespaces {
        for pod in &ns.pods {
            if let Some((kind, name)) = &pod.owner
                && excluded.contains(&(ns.name.clone(), *kind, name.clone()))
            {
                continue;
            }
            if no_sidecar_reason(&ns.labels, &pod.labels, &pod.annotations).is_some() {
                continue;
            }
            let Some(have) = &pod.proxy else { continue };
            let differs = want
                .iter()
                .zip(have.iter())
                .any(|(want, have)| have.is_none() || want != have);
            if differs {
                out.entry(ns.name.clone())
                    .or_default()
                    .push(pod.name.clone());
            }
        }
    }
    for names in out.values_mut() {
        names.sort();
    }
    out
}

/// Numbers of one reconcile, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarStats {
    pub targets: usize,
    pub compliant: usize,
    pub opted_out: usize,
    /// Workloads rolling because of meshwarden (including the ones started in this reconcile).
    pub rolling: usize,
    pub held: usize,
    pub stalled: usize,
    /// Namespaces skipped because of their LimitRange/ResourceQuota.
    pub skipped_namespaces: Vec<String>,
    /// Running pods whose istio-proxy differs from the declared resources, per namespace.
    pub pod_drift: BTreeMap<String, Vec<String>>,
}

/// A namespace's metadata as kept in the controller's store: name and labels.
pub fn strip_namespace(n: &mut PartialObjectMeta<Namespace>) {
    n.metadata.managed_fields = None;
    n.metadata.annotations = None;
}

/// What the section reads, kept current by the controller's watches so that a reconcile makes
/// no LIST. Workloads and pods are kept as their [`WorkloadFacts`] and [`PodFacts`] only.
/// Without it (or before it is filled) the rule lists.
#[derive(Clone)]
pub struct Cache {
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub deployments: Store<CachedWorkload<Deployment>>,
    pub statefulsets: Store<CachedWorkload<StatefulSet>>,
    pub daemonsets: Store<CachedWorkload<DaemonSet>>,
    pub limit_ranges: Store<LimitRange>,
    pub quotas: Store<ResourceQuota>,
    /// Running pods (field selector `status.phase=Running`).
    pub pods: Store<CachedPod>,
    /// Workloads written by this process that the watch may not have delivered yet: the
    /// generation the write produced and when. A cached object of an older generation is read
    /// as carrying the written annotations, so a reconcile that runs before the watch catches
    /// up neither writes it again nor hands its rollout slot to another workload.
    written: Arc<Mutex<Written>>,
    /// Workloads whose last write failed, and when: they take a rollout slot only after the
    /// others, so a write that keeps failing never holds the pacing.
    failed: Arc<Mutex<Failed>>,
}

/// Workloads whose last write failed: (kind, namespace, name) -> when.
type Failed = HashMap<(Kind, String, String), Instant>;

/// Written workloads: (kind, namespace, name) -> (generation the write produced, when).
type Written = HashMap<(Kind, String, String), (i64, Instant)>;

/// How long a written generation is remembered at most (the watch delivers within seconds).
const WRITTEN_TTL: Duration = Duration::from_secs(300);

impl Cache {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        namespaces: Store<PartialObjectMeta<Namespace>>,
        deployments: Store<CachedWorkload<Deployment>>,
        statefulsets: Store<CachedWorkload<StatefulSet>>,
        daemonsets: Store<CachedWorkload<DaemonSet>>,
        limit_ranges: Store<LimitRange>,
        quotas: Store<ResourceQuota>,
        pods: Store<CachedPod>,
    ) -> Self {
        Cache {
            namespaces,
            deployments,
            statefulsets,
            daemonsets,
            limit_ranges,
            quotas,
            pods,
            written: Arc::new(Mutex::new(HashMap::new())),
            failed: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Whether the last write of `w` failed less than [`WRITTEN_TTL`] ago.
    fn failed_recently(&self, w: &Workload) -> bool {
        let key = (w.kind, w.namespace.clone(), w.name.clone());
        self.failed
            .lock()
            .is_ok_and(|m| m.get(&key).is_some_and(|t| t.elapsed() < WRITTEN_TTL))
    }

    fn record_write_result(&self, w: &Workload, ok: bool) {
        if let Ok(mut m) = self.failed.lock() {
            let key = (w.kind, w.namespace.clone(), w.name.clone());
            if ok {
                m.remove(&key);
            } else {
                m.insert(key, Instant::now());
            }
        }
    }

    /// Waits (up to `limit`) until every store holds its initial list. A store's readiness
    /// future wakes only the waiter that polled it last, so with several waiters (reconciles
    /// of several policies, the readiness probe) each one re-polls every 50 ms.
    pub async fn ready(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let all = async {
                self.namespaces.wait_until_ready().await.is_ok()
                    && self.deployments.wait_until_ready().await.is_ok()
                    && self.statefulsets.wait_until_ready().await.is_ok()
                    && self.daemonsets.wait_until_ready().await.is_ok()
                    && self.limit_ranges.wait_until_ready().await.is_ok()
                    && self.quotas.wait_until_ready().await.is_ok()
                    && self.pods.wait_until_ready().await.is_ok()
            };
            let step = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            if let Ok(ready) = tokio::time::timeout(step, all).await {
                return ready;
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    fn record_written(&self, w: &Workload, generation: Option<i64>) {
        if let (Some(g), Ok(mut m)) = (generation, self.written.lock()) {
            m.insert(
                (w.kind, w.namespace.clone(), w.name.clone()),
                (g, Instant::now()),
            );
        }
    }
}

/// The written generation of a workload whose cached copy is older, if any (and forgets
/// entries the cache has caught up with or that are too old).
fn pending_write(
    written: &mut Written,
    key: (Kind, String, String),
    cached_generation: i64,
) -> Option<i64> {
    let (g, at) = *written.get(&key)?;
    if cached_generation >= g || at.elapsed() > WRITTEN_TTL {
        written.remove(&key);
        return None;
    }
    Some(g)
}

/// Namespaces the section covers (by name, empty observations) and the selected ambient ones.
fn covered_namespaces<'a>(
    spec: &SidecarSpec,
    namespaces: impl Iterator<Item = (String, BTreeMap<String, String>)> + 'a,
) -> (BTreeMap<String, NamespaceObservation>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut ambient = Vec::new();
    for (name, labels) in namespaces {
        if is_ambient(&labels) {
            let selected = match &spec.namespace_selector {
                Some(sel) => selector::matches(sel, &labels),
                None => namespace_injection_on(&labels),
            };
            if selected {
                ambient.push(name);
            }
            continue;
        }
        if selects_namespace(spec, &labels) {
            out.insert(
                name.clone(),
                NamespaceObservation {
                    name,
                    labels,
                    ..Default::default()
                },
            );
        }
    }
    ambient.sort();
    (out, ambient)
}

/// [`observe`] from the controller's cache: no request to the API server. Entries are shared
/// with the cache, not copied; a workload written by this process that the cache has not seen
/// yet is read as written.
fn observe_cached(
    cache: &Cache,
    spec: &SidecarSpec,
    desired: &Desired,
) -> (Vec<NamespaceObservation>, Vec<String>) {
    let (mut out, ambient) = covered_namespaces(
        spec,
        cache.namespaces.state().into_iter().map(|ns| {
            (
                ns.name_any(),
                ns.metadata.labels.clone().unwrap_or_default(),
            )
        }),
    );
    let mut written = match cache.written.lock() {
        Ok(w) => w,
        Err(p) => p.into_inner(),
    };
    let mut add = |namespace: &Option<String>, facts: &Arc<WorkloadFacts>| {
        let Some(ns) = out.get_mut(namespace.as_deref().unwrap_or_default()) else {
            return;
        };
        let key = (facts.kind, ns.name.clone(), facts.name.clone());
        let facts = match pending_write(&mut written, key, facts.generation) {
            Some(g) => Arc::new(facts.written(g, desired)),
            None => facts.clone(),
        };
        ns.workloads.push(facts);
    };
    for o in cache.deployments.state() {
        add(&o.metadata.namespace, &o.facts);
    }
    for o in cache.statefulsets.state() {
        add(&o.metadata.namespace, &o.facts);
    }
    for o in cache.daemonsets.state() {
        add(&o.metadata.namespace, &o.facts);
    }
    drop(written);
    for o in cache.pods.state() {
        if let Some(ns) = out.get_mut(o.metadata.namespace.as_deref().unwrap_or_default()) {
            ns.pods.push(o.facts.clone());
        }
    }
    for o in cache.limit_ranges.state() {
        if let Some(ns) = out.get_mut(o.metadata.namespace.as_deref().unwrap_or_default()) {
            ns.limit_ranges.push((*o).clone());
        }
    }
    for o in cache.quotas.state() {
        if let Some(ns) = out.get_mut(o.metadata.namespace.as_deref().unwrap_or_default()) {
            ns.quotas.push((*o).clone());
        }
    }
    (out.into_values().collect(), ambient)
}

/// Reads every namespace the section covers and what is needed in it.
pub async fn observe(
    ctx: &Context,
    spec: &SidecarSpec,
) -> Result<(Vec<NamespaceObservation>, Vec<String>)> {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let list = namespaces
        .list_metadata(&ListParams::default())
        .await
        .map_err(|e| Error::kube("list Namespaces", e))?;
    let (mut out, ambient) = covered_namespaces(
        spec,
        list.items
            .into_iter()
            .map(|ns| (ns.name_any(), ns.metadata.labels.unwrap_or_default())),
    );
    for ns in out.values_mut() {
        let (c, name) = (&ctx.client, ns.name.as_str());
        let (lp, running) = (
            ListParams::default(),
            ListParams::default().fields("status.phase=Running"),
        );
        let (deployments, statefulsets, daemonsets, limit_ranges, quotas, pods) = tokio::try_join!(
            list_in::<Deployment>(c, name, &lp, "Deployments"),
            list_in::<StatefulSet>(c, name, &lp, "StatefulSets"),
            list_in::<DaemonSet>(c, name, &lp, "DaemonSets"),
            list_in::<LimitRange>(c, name, &lp, "LimitRanges"),
            list_in::<ResourceQuota>(c, name, &lp, "ResourceQuotas"),
            list_in::<Pod>(c, name, &running, "Pods"),
        )?;
        let facts = deployments.items.iter().map(WorkloadFacts::from);
        let facts = facts.chain(statefulsets.items.iter().map(WorkloadFacts::from));
        let facts = facts.chain(daemonsets.items.iter().map(WorkloadFacts::from));
        ns.workloads = facts.map(Arc::new).collect();
        ns.limit_ranges = limit_ranges.items;
        ns.quotas = quotas.items;
        ns.pods = pods
            .items
            .iter()
            .map(|p| Arc::new(PodFacts::from(p)))
            .collect();
    }
    Ok((out.into_values().collect(), ambient))
}

/// Lists `K` in `namespace`, naming what failed.
async fn list_in<K>(
    client: &kube::Client,
    namespace: &str,
    lp: &ListParams,
    what: &str,
) -> Result<kube::core::ObjectList<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .list(lp)
        .await
        .map_err(|e| Error::kube(format!("list {what} in {namespace}"), e))
}

/// Applies the five annotations and records the generation the write produced on the workload
/// ([`GENERATION_ANNOTATION`]). The generation is predicted from the read one; when another
/// write came in between, a second apply (metadata only: no new generation) corrects it.
async fn write_recording(
    ctx: &Context,
    w: &Workload,
    desired: &Desired,
) -> Result<(Option<i64>, ForeignWrites)> {
    let predicted = w.generation + 1;
    let produced = write(ctx, w, &patch(w, desired, predicted)).await?;
    match produced.0 {
        Some(g) if g != predicted => write(ctx, w, &patch(w, desired, g)).await,
        _ => Ok(produced),
    }
}

/// Writes the annotations; returns the generation the write produced and the other managers'
/// writes of the annotations as it left them.
async fn write(ctx: &Context, w: &Workload, patch: &Value) -> Result<(Option<i64>, ForeignWrites)> {
    let c = ctx.client.clone();
    let ns = &w.namespace;
    let w_ = &ctx.writes;
    let meta = match w.kind {
        Kind::Deployment => {
            write::apply(&Api::<Deployment>::namespaced(c, ns), &w.name, patch, w_)
                .await?
                .metadata
        }
        Kind::StatefulSet => {
            write::apply(&Api::<StatefulSet>::namespaced(c, ns), &w.name, patch, w_)
                .await?
                .metadata
        }
        Kind::DaemonSet => {
            write::apply(&Api::<DaemonSet>::namespaced(c, ns), &w.name, patch, w_)
                .await?
                .metadata
        }
    };
    let after = write::foreign_writes(&meta, &annotation_paths());
    Ok((meta.generation, after))
}

/// Observes, plans and (in Enforce) applies the sidecars section; reports the result.
pub async fn reconcile(
    ctx: &Context,
    policy: &MeshPolicy,
    spec: &SidecarSpec,
    enforcement: Enforcement,
) -> RuleReport {
    reconcile_with_stats(ctx, policy, spec, enforcement).await.0
}

/// [`reconcile`], with the numbers behind the report.
pub async fn reconcile_with_stats(
    ctx: &Context,
    policy: &MeshPolicy,
    spec: &SidecarSpec,
    enforcement: Enforcement,
) -> (RuleReport, SidecarStats) {
    let ctype = types::SIDECAR_RESOURCES;
    let mut stats = SidecarStats::default();
    let mut report = RuleReport {
        condition: Observed::new(ctype, Status::True, reasons::COMPLIANT, ""),
        violations: Vec::new(),
        targets: 0,
        compliant: 0,
        corrected: 0,
        corrections: Vec::new(),
    };
    let desired = match desired(&spec.resources) {
        Ok(d) => d,
        Err(msg) => {
            report.condition =
                Observed::new(ctype, Status::False, reasons::INCOMPLETE_RESOURCES, msg);
            return (report, stats);
        }
    };
    let cache = ctx.cache::<Cache>();
    let cached = match &cache {
        Some(c) if c.ready(Duration::from_secs(30)).await => {
            Some(observe_cached(c, spec, &desired))
        }
        _ => None,
    };
    let (namespaces, ambient) = match cached {
        Some(o) => o,
        None => match observe(ctx, spec).await {
            Ok(o) => o,
            Err(e) => return (RuleReport::failed(ctype, &e), stats),
        },
    };
    let mut classified = classify(&namespaces, jiff::Timestamp::now());
    // Targets whose last write failed queue behind the others for rollout slots.
    if let Some(c) = &cache {
        classified.targets.sort_by_key(|w| c.failed_recently(w));
    }
    let enforce = enforcement == Enforcement::Enforce;
    let targets = &classified.targets;

    let mut unfit: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Targets to change, by namespace (one pass: deviations format strings).
    let mut changes_by_ns: HashMap<&str, Vec<&Workload>> = HashMap::new();
    for w in targets {
        if !deviations(&desired, &w.template_annotations).is_empty() {
            changes_by_ns
                .entry(w.namespace.as_str())
                .or_default()
                .push(w);
        }
    }
    for ns in &namespaces {
        let Some(changes) = changes_by_ns.get(ns.name.as_str()) else {
            continue;
        };
        let problems = namespace_fit(&desired, changes, &ns.limit_ranges, &ns.quotas);
        if !problems.is_empty() {
            unfit.insert(ns.name.clone(), problems);
        }
    }
    let paced = spec.pacing == Pacing::Paced;
    let decisions = plan(
        &desired,
        targets,
        &unfit,
        paced.then_some(spec.max_concurrent_rollouts),
        enforce,
    );

    let mut started: Vec<String> = Vec::new();
    let mut fights: Vec<String> = Vec::new();
    let mut takeovers: Vec<String> = Vec::new();
    let mut held: Vec<String> = Vec::new();
    let mut stalled: Vec<String> = Vec::new();
    let mut rolling: Vec<String> = Vec::new();
    let mut to_write: Vec<Planned<(&Workload, &Decision, String)>> = Vec::new();
    report.targets = i32::try_from(targets.len()).unwrap_or(i32::MAX);
    for (w, d) in targets.iter().zip(&decisions) {
        let id = w.id();
        if let Some(why) = &d.stalled {
            stalled.push(id.clone());
            report.violations.push(Violation {
                rule: ctype.into(),
                object: id.clone(),
                message: format!("rollout stalled: {why}"),
                action: ViolationAction::Reported.into(),
            });
        } else if d.rolling {
            rolling.push(id.clone());
        }
        let devs = d.deviations.join("; ");
        let violation = |action: ViolationAction, message: String| Violation {
            rule: ctype.into(),
            object: id.clone(),
            message,
            action: action.into(),
        };
        match &d.action {
            Action::Compliant => report.compliant += 1,
            Action::Reported => report
                .violations
                .push(violation(ViolationAction::Reported, devs)),
            Action::Held(why) => {
                held.push(id.clone());
                report
                    .violations
                    .push(violation(ViolationAction::Held, format!("{devs}; {why}")));
            }
            Action::Skipped(why) => report.violations.push(violation(
                ViolationAction::Skipped,
                format!("{devs}; not written: {why}"),
            )),
            Action::Apply => to_write.push(Planned {
                key: FightKey {
                    policy: policy.name_any(),
                    section: ctype,
                    object: id.clone(),
                    field: None,
                },
                seen: Some(w.foreign_writes.clone()),
                item: (w, d, devs),
            }),
        }
    }
    // Fight check → write (a bounded number in flight, each patch built only when it starts)
    // → record, in target order.
    let generations: std::sync::Mutex<HashMap<String, Option<i64>>> = Default::default();
    let (generations_ref, desired_ref) = (&generations, &desired);
    let outcomes = driver::drive(&ctx.memory, to_write, WRITE_CONCURRENCY, |&(w, _, _)| {
        let (generations, desired) = (generations_ref, desired_ref);
        async move {
            let (generation, after) = write_recording(ctx, w, desired).await?;
            if let Ok(mut g) = generations.lock() {
                g.insert(w.id(), generation);
            }
            Ok(Some(after))
        }
    })
    .await;
    let generations = generations.into_inner().unwrap_or_default();
    let written = outcomes
        .iter()
        .filter(|(_, o)| !matches!(o, Outcome::Fighting(_)))
        .count();
    let mut first_error = None;
    let mut failed_writes = 0;
    for (_, outcome) in outcomes {
        let (w, d, devs) = match outcome {
            Outcome::Fighting((w, _, devs)) => {
                fights.push(w.id());
                report.violations.push(Violation {
                    rule: ctype.into(),
                    object: w.id(),
                    message: format!(
                        "{devs}; another writer keeps changing these annotations back"
                    ),
                    action: ViolationAction::Skipped.into(),
                });
                continue;
            }
            Outcome::Failed((w, _, devs), e) => {
                if let Some(c) = &cache {
                    c.record_write_result(w, false);
                }
                // Reported on its own; the others' writes and slots are not held up by it.
                failed_writes += 1;
                report.violations.push(Violation {
                    rule: ctype.into(),
                    object: w.id(),
                    message: format!(
                        "{devs}; the write failed: {e}; retried at the next reconcile, after the other targets"
                    ),
                    action: ViolationAction::Skipped.into(),
                });
                first_error.get_or_insert(e);
                continue;
            }
            Outcome::Written(item) => item,
        };
        let id = w.id();
        if let Some(c) = &cache {
            c.record_write_result(w, true);
            c.record_written(w, generations.get(&id).copied().flatten());
        }
        report.corrected += 1;
        report.compliant += 1;
        // The first few are published as Events; the rest are counted in `corrected`.
        if report.corrections.len() < CORRECTIONS_LISTED {
            report.corrections.push(format!(
                "{id}: sidecar resources set to {} ({devs}); its pods roll",
                desired.summary()
            ));
        }
        for m in &w.foreign_owners {
            takeovers.push(format!("{id} (was managed by {m})"));
        }
        if !d.rolling {
            started.push(id.clone());
        }
    }
    // Every write failed: most likely not about one workload (permissions, the API server).
    if let Some(e) = first_error.as_ref().filter(|_| failed_writes == written) {
        let mut failed = RuleReport::failed(ctype, e);
        failed.targets = report.targets;
        return (failed, stats);
    }
    stats.pod_drift = pod_drift(&desired, &namespaces, &classified.excluded);
    stats.targets = targets.len();
    stats.compliant = usize::try_from(report.compliant).unwrap_or(0);
    stats.opted_out = classified.opted_out.len();
    stats.rolling = rolling.len() + started.len() + stalled.len();
    stats.held = held.len();
    stats.stalled = stalled.len();
    stats.skipped_namespaces = unfit.keys().cloned().collect();

    let mut msg = vec![format!(
        "{} of {} workload(s) have the declared sidecar resources ({})",
        report.compliant,
        report.targets,
        desired.summary()
    )];
    msg.extend(desired.notes.iter().cloned());
    if !started.is_empty() {
        msg.push(format!("started the rollout of {}", list(&started, 5)));
    }
    if !rolling.is_empty() {
        msg.push(format!(
            "rolling because of meshwarden: {}",
            list(&rolling, 5)
        ));
    }
    if !held.is_empty() {
        msg.push(format!(
            "{} workload(s) wait for a rollout slot (maxConcurrentRollouts {}): {}",
            held.len(),
            spec.max_concurrent_rollouts,
            list(&held, 5)
        ));
    }
    if !stalled.is_empty() && paced {
        msg.push(format!(
            "the rollout of {} stalled; no other sidecar rollout starts until it completes or is rolled back (kubectl rollout status)",
            list(&stalled, 5)
        ));
    } else if !stalled.is_empty() {
        msg.push(format!(
            "the rollout of {} stalled (kubectl rollout status); pacing is off, so other rollouts were not held",
            list(&stalled, 5)
        ));
    }
    for (ns, why) in &unfit {
        msg.push(format!(
            "namespace {ns} skipped, the declared resources do not fit: {}",
            why.join("; ")
        ));
    }
    msg.extend(messages::fight_sentence(&fights, Contested::Objects));
    if !takeovers.is_empty() {
        msg.push(format!(
            "meshwarden took over proxy annotations another manager set: {}",
            list(&takeovers, 5)
        ));
    }
    if !classified.opted_out.is_empty() {
        msg.push(format!(
            "opted out ({IGNORE_ANNOTATION}: {IGNORE_VALUE}): {}",
            list(&classified.opted_out, 10)
        ));
    }
    if !classified.other_rule.is_empty() {
        msg.push(format!(
            "left to meshwarden's HA rules: {}",
            list(&classified.other_rule, 5)
        ));
    }
    if !ambient.is_empty() {
        msg.push(format!(
            "ambient namespaces have no sidecars: {}",
            list(&ambient, 5)
        ));
    }
    if !stats.pod_drift.is_empty() {
        let parts: Vec<String> = stats
            .pod_drift
            .iter()
            .map(|(ns, pods)| format!("{ns}: {} ({})", pods.len(), list(pods, DRIFT_NAMES)))
            .collect();
        let total: usize = stats.pod_drift.values().map(Vec::len).sum();
        msg.push(format!(
            "{total} running pod(s) have other istio-proxy resources than declared: {}",
            parts.join("; ")
        ));
    }
    if !enforce && !report.violations.is_empty() {
        msg.push("Audit mode: nothing was changed".into());
    }

    let audit_deviations = decisions.iter().any(|d| d.action == Action::Reported);
    if let Some(e) = &first_error {
        msg.push(format!(
            "{failed_writes} write(s) failed (first: {e}); those targets are retried after the others"
        ));
    }
    let (status, reason) = if !stalled.is_empty() {
        (Status::False, reasons::ROLLOUT_STALLED)
    } else if first_error.is_some() {
        (Status::False, reasons::WRITE_FAILED)
    } else if !unfit.is_empty() {
        (Status::False, reasons::QUOTA_CONFLICT)
    } else if !fights.is_empty() {
        (Status::False, reasons::FIGHT_DETECTED)
    } else if audit_deviations {
        (Status::False, reasons::NON_COMPLIANT)
    } else if !held.is_empty() || !rolling.is_empty() {
        (Status::False, reasons::ROLLOUT_IN_PROGRESS)
    } else if targets.is_empty() {
        (Status::False, reasons::NO_TARGETS)
    } else if report.corrected > 0 {
        (Status::True, reasons::CORRECTED)
    } else {
        (Status::True, reasons::COMPLIANT)
    };
    if targets.is_empty() {
        msg[0] = "no Deployment, StatefulSet or DaemonSet with an injected sidecar in the selected namespaces (default: istio-injection=enabled or istio.io/rev)".into();
    }
    report.condition = Observed::new(ctype, status, reason, msg.join(". "));
    (report, stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn resources(yaml: &str) -> ResourcesSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn full() -> Desired {
        desired(&resources(
            "{requests: {cpu: 100m, memory: 128Mi}, limits: {cpu: '1', memory: 512Mi}}",
        ))
        .unwrap()
    }

    fn workload(name: &str, annotations: &[(&str, &str)], rollout: Rollout) -> Workload {
        Workload {
            namespace: "apps".into(),
            facts: Arc::new(WorkloadFacts {
                kind: Kind::Deployment,
                name: name.into(),
                generation: 1,
                replicas: 2,
                template_labels: BTreeMap::new(),
                template_annotations: map(annotations),
                opted_out: false,
                other_rule: false,
                written_at: None,
                written_generation: None,
                foreign_owners: vec![],
                foreign_writes: ForeignWrites::default(),
                other_containers: Amounts::new(),
                rollout: rollout.clone(),
            }),
            rollout,
        }
    }

    fn compliant_annotations(d: &Desired) -> Vec<(&'static str, String)> {
        let mut v: Vec<(&'static str, String)> = d
            .annotations()
            .iter()
            .map(|(k, v)| (*k, v.to_string()))
            .collect();
        v.push((HASH_ANNOTATION, d.hash()));
        v
    }

    #[test]
    fn all_four_values_are_derived_and_omissions_are_explained() {
        let d = full();
        assert_eq!(
            (
                d.cpu.as_str(),
                d.cpu_limit.as_str(),
                d.memory.as_str(),
                d.memory_limit.as_str()
            ),
            ("100m", "1", "128Mi", "512Mi")
        );
        assert!(d.notes.is_empty());

        let d = desired(&resources(
            "{requests: {cpu: 100m, memory: 128Mi}, limits: {memory: 1Gi}}",
        ))
        .unwrap();
        assert_eq!(d.cpu_limit, "100m", "a missing limit takes the request");
        assert!(
            d.notes[0].contains("limits.cpu is not declared"),
            "{:?}",
            d.notes
        );

        let d = desired(&resources("{limits: {cpu: 2, memory: 1Gi}}")).unwrap();
        assert_eq!((d.cpu.as_str(), d.memory.as_str()), ("2", "1Gi"));
        assert_eq!(d.notes.len(), 2);

        let err = desired(&resources("{requests: {cpu: 100m}}")).unwrap_err();
        assert!(err.contains("memory"), "{err}");
        assert!(err.contains("for memory:"), "only memory is missing: {err}");
    }

    #[test]
    fn hash_follows_the_values() {
        let a = full();
        let mut b = full();
        assert_eq!(a.hash(), b.hash());
        b.memory_limit = "1Gi".into();
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash().len(), 16);
    }

    #[test]
    fn which_pods_get_a_sidecar() {
        let none = map(&[]);
        let injected = map(&[("istio-injection", "enabled")]);
        let rev = map(&[("istio.io/rev", "canary")]);
        assert_eq!(no_sidecar_reason(&injected, &none, &none), None);
        assert_eq!(no_sidecar_reason(&rev, &none, &none), None);
        assert!(no_sidecar_reason(&none, &none, &none).is_some());
        assert!(
            no_sidecar_reason(
                &map(&[("istio-injection", "disabled"), ("istio.io/rev", "x")]),
                &none,
                &none
            )
            .is_some(),
            "istio-injection=disabled wins over a revision label"
        );
        // Opt-out on the pod, as label or annotation.
        let off = map(&[(INJECT, "false")]);
        assert!(no_sidecar_reason(&injected, &off, &none).is_some());
        assert!(no_sidecar_reason(&injected, &none, &off).is_some());
        // Opt-in on the pod in a namespace without injection labels.
        assert_eq!(
            no_sidecar_reason(&none, &map(&[(INJECT, "true")]), &none),
            None
        );
        assert!(
            no_sidecar_reason(&none, &none, &map(&[(INJECT, "true")])).is_some(),
            "the webhook selects on the label, not the annotation"
        );
        // An Istio gateway (as the gateway chart renders it) is not a sidecar.
        let gw_labels = map(&[(INJECT, "true"), ("istio", "ingressgateway")]);
        let gw_ann = map(&[(INJECT_TEMPLATES, "gateway"), (INJECT, "true")]);
        assert!(no_sidecar_reason(&injected, &gw_labels, &gw_ann).is_some());
        // Ambient namespaces have no sidecars.
        let ambient = map(&[
            ("istio-injection", "enabled"),
            ("istio.io/dataplane-mode", "ambient"),
        ]);
        assert!(no_sidecar_reason(&ambient, &none, &none).is_some());
    }

    #[test]
    fn namespace_selection_defaults_to_injection_on() {
        let mut spec: SidecarSpec =
            serde_yaml::from_str("{resources: {requests: {cpu: 1, memory: 1Gi}}}").unwrap();
        assert!(selects_namespace(
            &spec,
            &map(&[("istio-injection", "enabled")])
        ));
        assert!(selects_namespace(
            &spec,
            &map(&[("istio.io/rev", "default")])
        ));
        assert!(!selects_namespace(&spec, &map(&[("team", "a")])));
        assert!(!selects_namespace(
            &spec,
            &map(&[
                ("istio-injection", "enabled"),
                ("istio.io/dataplane-mode", "ambient")
            ])
        ));
        spec.namespace_selector = Some(serde_yaml::from_str("{matchLabels: {team: a}}").unwrap());
        assert!(selects_namespace(&spec, &map(&[("team", "a")])));
        assert!(!selects_namespace(
            &spec,
            &map(&[("istio-injection", "enabled")])
        ));
    }

    #[test]
    fn opt_out_names_the_rule() {
        assert!(opted_out(&map(&[(IGNORE_ANNOTATION, "sidecar-resources")])));
        assert!(opted_out(&map(&[(
            IGNORE_ANNOTATION,
            "mtls, sidecar-resources"
        )])));
        assert!(!opted_out(&map(&[(IGNORE_ANNOTATION, "mtls")])));
        assert!(!opted_out(&map(&[])));
    }

    #[test]
    fn pacing_starts_at_most_max_rollouts() {
        let d = full();
        let targets = vec![
            workload("a", &[], Rollout::Complete),
            workload("b", &[], Rollout::Complete),
            workload("c", &[(PROXY_CPU, "50m")], Rollout::Complete),
        ];
        let p = plan(&d, &targets, &BTreeMap::new(), Some(1), true);
        assert_eq!(p[0].action, Action::Apply);
        assert!(matches!(p[1].action, Action::Held(_)), "{:?}", p[1]);
        assert!(matches!(p[2].action, Action::Held(_)));
        let p = plan(&d, &targets, &BTreeMap::new(), Some(2), true);
        let applied = p.iter().filter(|x| x.action == Action::Apply).count();
        assert_eq!(applied, 2);
    }

    #[test]
    fn a_rollout_of_ours_in_progress_takes_the_slot() {
        let d = full();
        let ours: Vec<(&str, String)> = compliant_annotations(&d);
        let ours: Vec<(&str, &str)> = ours.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let targets = vec![
            workload(
                "a",
                &ours,
                Rollout::InProgress("1 of 2 replicas updated".into()),
            ),
            workload("b", &[], Rollout::Complete),
        ];
        let p = plan(&d, &targets, &BTreeMap::new(), Some(1), true);
        assert_eq!(p[0].action, Action::Compliant);
        assert!(p[0].rolling);
        assert!(matches!(p[1].action, Action::Held(_)), "{:?}", p[1]);
        // Done rolling: the next one starts.
        let targets = vec![
            workload("a", &ours, Rollout::Complete),
            workload("b", &[], Rollout::Complete),
        ];
        let p = plan(&d, &targets, &BTreeMap::new(), Some(1), true);
        assert_eq!(p[1].action, Action::Apply);
        // A rollout that is not ours does not count.
        let targets = vec![
            workload("a", &[], Rollout::InProgress("x".into())),
            workload("b", &[], Rollout::Complete),
        ];
        let p = plan(&d, &targets, &BTreeMap::new(), Some(1), true);
        assert_eq!(p[0].action, Action::Apply);
        assert!(matches!(p[1].action, Action::Held(_)));
    }

    #[test]
    fn a_stalled_rollout_stops_the_pacing() {
        let d = full();
        let ours: Vec<(&str, String)> = compliant_annotations(&d);
        let ours: Vec<(&str, &str)> = ours.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let targets = vec![
            workload(
                "a",
                &ours,
                Rollout::Stalled("ProgressDeadlineExceeded".into()),
            ),
            workload("b", &[], Rollout::Complete),
        ];
        let p = plan(&d, &targets, &BTreeMap::new(), Some(5), true);
        assert!(p[0].stalled.is_some());
        assert!(matches!(&p[1].action, Action::Held(w) if w.contains("stalled")));
    }

    #[test]
    fn pacing_off_writes_every_target_even_past_a_stall() {
        let d = full();
        let ours: Vec<(&str, String)> = compliant_annotations(&d);
        let ours: Vec<(&str, &str)> = ours.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut targets = vec![workload(
            "a",
            &ours,
            Rollout::Stalled("ProgressDeadlineExceeded".into()),
        )];
        for i in 0..150 {
            targets.push(workload(&format!("w{i}"), &[], Rollout::Complete));
        }
        let p = plan(&d, &targets, &BTreeMap::new(), None, true);
        assert!(p[0].stalled.is_some());
        assert_eq!(p.iter().filter(|d| d.action == Action::Apply).count(), 150);
        let paced = plan(&d, &targets, &BTreeMap::new(), Some(100), true);
        assert_eq!(
            paced.iter().filter(|d| d.action == Action::Apply).count(),
            0
        );
    }

    #[test]
    fn audit_reports_quota_skips_and_equal_values_are_compliant() {
        let d = full();
        let targets = vec![
            workload("a", &[], Rollout::Complete),
            workload(
                "b",
                &[
                    (PROXY_CPU, "0.1"),
                    (PROXY_CPU_LIMIT, "1000m"),
                    (PROXY_MEMORY, "128Mi"),
                    (PROXY_MEMORY_LIMIT, "0.5Gi"),
                ],
                Rollout::Complete,
            ),
        ];
        let p = plan(&d, &targets, &BTreeMap::new(), Some(1), false);
        assert_eq!(p[0].action, Action::Reported);
        assert_eq!(p[0].deviations.len(), 4);
        assert_eq!(p[1].action, Action::Compliant, "{:?}", p[1].deviations);
        let unfit = BTreeMap::from([("apps".to_string(), vec!["quota".to_string()])]);
        let p = plan(&d, &targets, &unfit, Some(1), true);
        assert!(matches!(p[0].action, Action::Skipped(_)));
        assert_eq!(p[1].action, Action::Compliant);
    }

    #[test]
    fn patch_holds_exactly_the_five_annotations() {
        let d = full();
        let p = patch(&workload("a", &[("keep", "me")], Rollout::Complete), &d, 7);
        let ann = p["spec"]["template"]["metadata"]["annotations"]
            .as_object()
            .unwrap();
        assert_eq!(ann.len(), 5);
        assert_eq!(ann[PROXY_MEMORY_LIMIT], "512Mi");
        assert_eq!(ann[HASH_ANNOTATION], d.hash().as_str());
        assert_eq!(p["kind"], "Deployment");
        assert!(p["spec"].as_object().unwrap().len() == 1);
        // The generation the write produces, on the workload's metadata (no rollout of its own).
        assert_eq!(
            p["metadata"]["annotations"],
            json!({GENERATION_ANNOTATION: "7"})
        );
    }

    fn deployment(yaml: &str) -> Deployment {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn deployment_rollout_like_kubectl() {
        let base =
            "metadata: {name: a, generation: 3}\nspec: {replicas: 2, selector: {}, template: {}}\n";
        assert!(matches!(
            deployment_rollout(&deployment(&format!(
                "{base}status: {{observedGeneration: 2, replicas: 2, updatedReplicas: 2, availableReplicas: 2}}"
            ))),
            Rollout::InProgress(_)
        ));
        assert!(matches!(
            deployment_rollout(&deployment(&format!("{base}status: {{observedGeneration: 3, replicas: 3, updatedReplicas: 2, availableReplicas: 2}}"))),
            Rollout::InProgress(w) if w.contains("old replica")
        ));
        assert!(matches!(
            deployment_rollout(&deployment(&format!("{base}status: {{observedGeneration: 3, replicas: 2, updatedReplicas: 2, availableReplicas: 1}}"))),
            Rollout::Settling(w) if w.contains("available")
        ));
        // The controller declared generation 3 rolled out; a replica unavailable since, or
        // deleted and not yet replaced, is churn.
        for counts in [
            "replicas: 2, updatedReplicas: 2, availableReplicas: 1",
            "replicas: 1, updatedReplicas: 1, availableReplicas: 1",
        ] {
            assert_eq!(
                deployment_rollout(&deployment(&format!(
                    "{base}status: {{observedGeneration: 3, {counts}, conditions: [{{type: Progressing, status: 'True', reason: NewReplicaSetAvailable}}]}}"
                ))),
                Rollout::Complete
            );
        }
        assert_eq!(
            deployment_rollout(&deployment(
                &format!("{base}status: {{observedGeneration: 2}}")
                    .replace("replicas: 2,", "replicas: 2, paused: true,")
            )),
            Rollout::Paused
        );
        assert_eq!(
            deployment_rollout(&deployment(&format!(
                "{base}status: {{observedGeneration: 3, replicas: 2, updatedReplicas: 2, availableReplicas: 2}}"
            ))),
            Rollout::Complete
        );
        assert!(matches!(
            deployment_rollout(&deployment(&format!(
                "{base}status: {{observedGeneration: 3, replicas: 2, updatedReplicas: 1, availableReplicas: 2, conditions: [{{type: Progressing, status: 'False', reason: ProgressDeadlineExceeded, message: slow}}]}}"
            ))),
            Rollout::Stalled(_)
        ));
    }

    #[test]
    fn statefulset_and_daemonset_rollouts() {
        let s: StatefulSet = serde_yaml::from_str("metadata: {name: s, generation: 2}\nspec: {replicas: 2, selector: {}, serviceName: s, template: {}}\nstatus: {observedGeneration: 2, replicas: 2, readyReplicas: 2, updatedReplicas: 1, currentRevision: r1, updateRevision: r2}").unwrap();
        assert!(matches!(statefulset_rollout(&s), Rollout::InProgress(_)));
        let s: StatefulSet = serde_yaml::from_str("metadata: {name: s, generation: 2}\nspec: {replicas: 2, selector: {}, serviceName: s, template: {}}\nstatus: {observedGeneration: 2, replicas: 2, readyReplicas: 2, updatedReplicas: 2, currentRevision: r2, updateRevision: r2}").unwrap();
        assert_eq!(statefulset_rollout(&s), Rollout::Complete);
        let s: StatefulSet = serde_yaml::from_str("metadata: {name: s, generation: 5}\nspec: {replicas: 2, selector: {}, serviceName: s, template: {}, updateStrategy: {type: OnDelete}}").unwrap();
        assert_eq!(
            statefulset_rollout(&s),
            Rollout::Complete,
            "OnDelete never rolls"
        );
        let d: DaemonSet = serde_yaml::from_str("metadata: {name: d, generation: 2}\nspec: {selector: {}, template: {}}\nstatus: {observedGeneration: 2, desiredNumberScheduled: 3, currentNumberScheduled: 3, numberMisscheduled: 0, numberReady: 3, updatedNumberScheduled: 3, numberAvailable: 2}").unwrap();
        assert!(matches!(daemonset_rollout(&d), Rollout::Settling(w) if w.contains("available")));
        // Rolled out (current = update revision) with a replica not ready later: pod churn.
        let s: StatefulSet = serde_yaml::from_str("metadata: {name: s, generation: 2}\nspec: {replicas: 3, selector: {}, serviceName: s, template: {}}\nstatus: {observedGeneration: 2, replicas: 3, readyReplicas: 2, updatedReplicas: 3, currentRevision: r2, updateRevision: r2}").unwrap();
        assert_eq!(statefulset_rollout(&s), Rollout::Complete);
        // Partitioned: old pods above the partition are a rollout; a pod not ready is not.
        let part = "metadata: {name: s, generation: 2}\nspec: {replicas: 4, selector: {}, serviceName: s, template: {}, updateStrategy: {type: RollingUpdate, rollingUpdate: {partition: 2}}}\n";
        let s: StatefulSet = serde_yaml::from_str(&format!("{part}status: {{observedGeneration: 2, replicas: 4, readyReplicas: 4, currentReplicas: 3, updatedReplicas: 1, currentRevision: r1, updateRevision: r2}}")).unwrap();
        assert!(matches!(statefulset_rollout(&s), Rollout::InProgress(_)));
        let s: StatefulSet = serde_yaml::from_str(&format!("{part}status: {{observedGeneration: 2, replicas: 3, readyReplicas: 3, currentReplicas: 2, updatedReplicas: 1, currentRevision: r1, updateRevision: r2}}")).unwrap();
        assert!(
            matches!(statefulset_rollout(&s), Rollout::Settling(_)),
            "an updated pod deleted (a drain) is no rollout"
        );
        // A new node: no pod of an older template left, one node without its pod yet.
        let d: DaemonSet = serde_yaml::from_str("metadata: {name: d, generation: 2}\nspec: {selector: {}, template: {}}\nstatus: {observedGeneration: 2, desiredNumberScheduled: 4, currentNumberScheduled: 3, numberMisscheduled: 0, numberReady: 3, updatedNumberScheduled: 3, numberAvailable: 3}").unwrap();
        assert!(matches!(daemonset_rollout(&d), Rollout::Settling(_)));
        let d: DaemonSet = serde_yaml::from_str("metadata: {name: d, generation: 2}\nspec: {selector: {}, template: {}}\nstatus: {observedGeneration: 2, desiredNumberScheduled: 4, currentNumberScheduled: 4, numberMisscheduled: 0, numberReady: 4, updatedNumberScheduled: 2, numberAvailable: 4}").unwrap();
        assert!(matches!(daemonset_rollout(&d), Rollout::InProgress(_)));
    }

    /// The stall decision: only a rollout of the generation meshwarden's write produced, not
    /// finished long after that write; never someone else's rollout nor churn.
    #[test]
    fn only_meshwarden_s_unfinished_rollout_can_stall() {
        let now = jiff::Timestamp::from_second(1_000_000).unwrap();
        let day_ago = jiff::Timestamp::from_second(1_000_000 - 86_400).unwrap();
        let facts = |generation: i64, written: Option<i64>, rollout: Rollout| {
            let mut w = workload("s", &[(HASH_ANNOTATION, "h")], rollout);
            let f = Arc::make_mut(&mut w.facts);
            f.kind = Kind::StatefulSet;
            f.replicas = 3;
            f.generation = generation;
            f.written_generation = written;
            f.written_at = Some(day_ago);
            w.facts
        };
        let rolling = || Rollout::InProgress("1 of 3 replicas updated, 3 ready".into());
        // meshwarden's generation, not rolled out a day after its write: stalled.
        assert!(matches!(
            meshwarden_rollout(&facts(4, Some(4), rolling()), now),
            Rollout::Stalled(w) if w.contains("86400s")
        ));
        // The same shortly after the write: in progress.
        let mut recent = (*facts(4, Some(4), rolling())).clone();
        recent.written_at = Some(jiff::Timestamp::from_second(1_000_000 - 30).unwrap());
        assert!(matches!(
            meshwarden_rollout(&recent, now),
            Rollout::InProgress(_)
        ));
        // Someone else wrote generation 5 (a helm upgrade): their rollout, no slot, no stall.
        assert_eq!(
            meshwarden_rollout(&facts(5, Some(4), rolling()), now),
            Rollout::Complete
        );
        let deadline = Rollout::Stalled("ProgressDeadlineExceeded".into());
        assert_eq!(
            meshwarden_rollout(&facts(5, Some(4), deadline.clone()), now),
            Rollout::Complete
        );
        assert_eq!(
            meshwarden_rollout(&facts(4, Some(4), deadline.clone()), now),
            deadline
        );
        // Pods not ready after the rollout, long after the write: churn.
        let settling = Rollout::Settling("2 of 3 replicas ready".into());
        assert_eq!(
            meshwarden_rollout(&facts(4, Some(4), settling.clone()), now),
            Rollout::Complete
        );
        assert!(matches!(
            meshwarden_rollout(&recent_with(&facts(4, Some(4), settling), now), now),
            Rollout::InProgress(_)
        ));
        // Written by a version that did not record the generation: in progress, never stalled.
        assert_eq!(
            meshwarden_rollout(&facts(4, None, rolling()), now),
            rolling()
        );
        // Never written by meshwarden: not its rollout.
        let mut theirs = (*facts(4, None, rolling())).clone();
        theirs.template_annotations.clear();
        assert_eq!(meshwarden_rollout(&theirs, now), Rollout::Complete);
        // Paused stays paused (reported, holds no slot).
        assert_eq!(
            meshwarden_rollout(&facts(5, Some(4), Rollout::Paused), now),
            Rollout::Paused
        );
    }

    fn recent_with(f: &WorkloadFacts, now: jiff::Timestamp) -> WorkloadFacts {
        let mut f = f.clone();
        f.written_at = Some(jiff::Timestamp::from_second(now.as_second() - 30).unwrap());
        f
    }

    #[test]
    fn churn_long_after_meshwarden_wrote_is_no_rollout_and_paused_holds_no_slot() {
        let ours = [(HASH_ANNOTATION, "h")];
        let now = jiff::Timestamp::from_second(1_000_000).unwrap();
        let mut churn = workload("a", &ours, Rollout::Settling("2 of 3 ready".into()));
        let f = Arc::make_mut(&mut churn.facts);
        f.kind = Kind::StatefulSet;
        f.replicas = 3;
        f.written_at = Some(jiff::Timestamp::from_second(1_000_000 - 86_400).unwrap());
        let mut recent = churn.clone();
        Arc::make_mut(&mut recent.facts).written_at =
            Some(jiff::Timestamp::from_second(1_000_000 - 30).unwrap());
        let ns = |w: &Workload| NamespaceObservation {
            name: "n".into(),
            labels: [("istio-injection".to_string(), "enabled".to_string())].into(),
            workloads: vec![w.facts.clone()],
            ..Default::default()
        };
        assert_eq!(
            classify(&[ns(&churn)], now).targets[0].rollout,
            Rollout::Complete
        );
        assert!(matches!(
            classify(&[ns(&recent)], now).targets[0].rollout,
            Rollout::InProgress(_)
        ));

        // Pacing 1: a paused Deployment is held and reported, and the other one gets the slot.
        let d = full();
        let targets = [
            workload("a", &[], Rollout::Paused),
            workload("b", &[], Rollout::Complete),
        ];
        let p = plan(&d, &targets, &BTreeMap::new(), Some(1), true);
        assert!(
            matches!(&p[0].action, Action::Held(why) if why.contains("paused")),
            "{:?}",
            p[0]
        );
        assert_eq!(p[1].action, Action::Apply);
    }

    #[test]
    fn quota_and_limit_range_fit() {
        let d = full();
        let w = workload("a", &[], Rollout::Complete);
        let quota: ResourceQuota = serde_yaml::from_str(
            "metadata: {name: q}\nspec: {hard: {limits.memory: 1Gi, requests.cpu: '10'}}\nstatus: {used: {limits.memory: 256Mi}}",
        )
        .unwrap();
        // 2 replicas x 512Mi + a 512Mi surge pod + 256Mi used > 1Gi.
        let problems = namespace_fit(&d, &[&w], &[], std::slice::from_ref(&quota));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("limits.memory"), "{problems:?}");
        // Already at 256Mi per pod: 2 x 256Mi + 512Mi surge + 256Mi used = 1280Mi > 1Gi still.
        let w2 = workload("a", &[(PROXY_MEMORY_LIMIT, "256Mi")], Rollout::Complete);
        assert_eq!(
            namespace_fit(&d, &[&w2], &[], std::slice::from_ref(&quota)).len(),
            1
        );
        let roomy: ResourceQuota = serde_yaml::from_str(
            "metadata: {name: q}\nspec: {hard: {memory: 8Gi, limits.cpu: '8'}}",
        )
        .unwrap();
        assert!(namespace_fit(&d, &[&w], &[], &[roomy]).is_empty());
        assert!(
            namespace_fit(&d, &[], &[], &[quota]).is_empty(),
            "nothing to change, nothing to fit"
        );
        let lr: LimitRange = serde_yaml::from_str(
            "metadata: {name: lr}\nspec: {limits: [{type: Container, max: {memory: 256Mi}, min: {cpu: 200m}}]}",
        )
        .unwrap();
        let problems = namespace_fit(&d, &[&w], &[lr], &[]);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    fn meta_with(fields: serde_json::Value) -> ObjectMeta {
        ObjectMeta {
            managed_fields: Some(vec![ManagedFieldsEntry {
                manager: Some("meshwarden".into()),
                operation: Some("Apply".into()),
                fields_v1: Some(FieldsV1(fields)),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn fields_of_the_ha_rule_are_recognised() {
        let ours = meta_with(
            json!({"f:spec": {"f:template": {"f:metadata": {"f:annotations": {"f:sidecar.istio.io/proxyCPU": {}, "f:meshwarden.io/sidecar-resources": {}}}}}}),
        );
        assert!(!owned_by_other_rule(&ours));
        let with_generation = meta_with(
            json!({"f:metadata": {"f:annotations": {"f:meshwarden.io/sidecar-generation": {}}}, "f:spec": {"f:template": {"f:metadata": {"f:annotations": {"f:meshwarden.io/sidecar-resources": {}}}}}}),
        );
        assert!(!owned_by_other_rule(&with_generation));
        let labels = meta_with(json!({"f:metadata": {"f:labels": {"f:x": {}}}}));
        assert!(owned_by_other_rule(&labels));
        let ha = meta_with(json!({"f:spec": {"f:replicas": {}}}));
        assert!(owned_by_other_rule(&ha));
        let ha_tpl = meta_with(json!({"f:spec": {"f:template": {"f:spec": {"f:affinity": {}}}}}));
        assert!(owned_by_other_rule(&ha_tpl));
        assert!(!owned_by_other_rule(&ObjectMeta::default()));
    }

    #[test]
    fn pod_drift_counts_running_proxies_with_other_resources() {
        let d = full();
        let pod = |name: &str, owner: &str, cpu: &str| -> Pod {
            serde_yaml::from_str(&format!(
                "metadata: {{name: {name}, labels: {{pod-template-hash: abc}}, ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {owner}-abc, uid: u}}]}}\nspec: {{containers: [{{name: app}}, {{name: istio-proxy, resources: {{requests: {{cpu: {cpu}, memory: 128Mi}}, limits: {{cpu: '1', memory: 512Mi}}}}}}]}}"
            ))
            .unwrap()
        };
        let ns = NamespaceObservation {
            name: "apps".into(),
            labels: map(&[("istio-injection", "enabled")]),
            pods: [
                pod("a-1", "a", "100m"),
                pod("a-2", "a", "200m"),
                pod("b-1", "b", "200m"),
            ]
            .iter()
            .map(|p| Arc::new(PodFacts::from(p)))
            .collect(),
            ..Default::default()
        };
        let excluded = BTreeSet::from([("apps".to_string(), Kind::Deployment, "b".to_string())]);
        let drift = pod_drift(&d, &[ns], &excluded);
        assert_eq!(drift.get("apps"), Some(&vec!["a-2".to_string()]));
    }

    #[test]
    fn facts_keep_what_the_rule_reads() {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "apps", "generation": 4,
                "labels": {"app": "a"},
                "annotations": {IGNORE_ANNOTATION: "mtls", "kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                "managedFields": [
                    {"manager": "helm", "operation": "Apply", "fieldsType": "FieldsV1",
                     "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {"f:metadata": {"f:annotations": {
                        "f:sidecar.istio.io/proxyCPU": {}, "f:other": {}}}}}}},
                    {"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1",
                     "fieldsV1": {"f:spec": {"f:paused": {}}}},
                    {"manager": "meshwarden", "operation": "Apply", "fieldsType": "FieldsV1",
                     "time": "2026-01-01T00:00:00Z",
                     "fieldsV1": {"f:spec": {"f:template": {"f:metadata": {"f:annotations": {
                        "f:sidecar.istio.io/proxyMemory": {}}}}}}}
                ]},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "a"}},
                "template": {"metadata": {"labels": {"app": "a", INJECT: "true"},
                        "annotations": {PROXY_CPU: "50m", "prometheus.io/scrape": "true"}},
                    "spec": {"containers": [{"name": "app", "image": "x", "env": [{"name": "A", "value": "b"}],
                        "resources": {"requests": {"cpu": "1"}}}]}}},
            "status": {"observedGeneration": 4, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3}
        }))
        .unwrap();
        let f = WorkloadFacts::from(&d);
        assert_eq!(f.foreign_owners, vec!["helm".to_string()]);
        assert_eq!(f.template_annotations, map(&[(PROXY_CPU, "50m")]));
        assert_eq!(f.template_labels, map(&[(INJECT, "true")]));
        assert_eq!(
            (f.kind, f.name.as_str(), f.generation, f.replicas),
            (Kind::Deployment, "a", 4, 3)
        );
        assert_eq!(f.rollout, Rollout::Complete);
        assert_eq!(f.other_containers.get("requests.cpu"), Some(&1000));
        assert!(!f.opted_out && !f.other_rule);
        assert_eq!(f.written_at, Some("2026-01-01T00:00:00Z".parse().unwrap()));
        let ns = NamespaceObservation {
            name: "apps".into(),
            labels: map(&[("istio-injection", "enabled")]),
            workloads: vec![Arc::new(f)],
            ..Default::default()
        };
        let c = classify(&[ns], jiff::Timestamp::now());
        assert_eq!(c.targets.len(), 1);
        assert_eq!(c.targets[0].id(), "Deployment/apps/a");

        // A cache entry parses the whole object and keeps only identity and facts.
        let entry: CachedWorkload<Deployment> = serde_json::from_value(json!({
            "metadata": {"name": "b", "namespace": "apps", "resourceVersion": "9",
                "annotations": {IGNORE_ANNOTATION: "sidecar-resources"}},
            "spec": {"selector": {}, "template": {"spec": {"containers": []}}}
        }))
        .unwrap();
        assert!(entry.facts.opted_out);
        assert!(entry.metadata.annotations.is_none());
        assert_eq!(entry.metadata.resource_version.as_deref(), Some("9"));
    }

    #[test]
    fn pod_facts_keep_their_drift() {
        let p: CachedPod = serde_yaml::from_str(
            "metadata: {name: a-1, namespace: apps, labels: {pod-template-hash: abc, app: a}, annotations: {sidecar.istio.io/status: x}, ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: a-abc, uid: u}]}\nspec: {containers: [{name: app, image: x}, {name: istio-proxy, image: y, resources: {requests: {cpu: 10m, memory: 128Mi}, limits: {cpu: '1', memory: 512Mi}}}]}\nstatus: {phase: Running}",
        )
        .unwrap();
        assert_eq!(p.facts.owner, Some((Kind::Deployment, "a".to_string())));
        assert!(p.facts.labels.is_empty() && p.facts.annotations.is_empty());
        assert_eq!(
            p.facts.proxy,
            Some([
                Some(10),
                Some(1000),
                Some(128 * 1024 * 1024 * 1000),
                Some(512 * 1024 * 1024 * 1000)
            ])
        );
        let ns = NamespaceObservation {
            name: "apps".into(),
            labels: map(&[("istio-injection", "enabled")]),
            pods: vec![p.facts.clone()],
            ..Default::default()
        };
        let drift = pod_drift(&full(), &[ns], &BTreeSet::new());
        assert_eq!(drift.get("apps"), Some(&vec!["a-1".to_string()]));
    }

    #[test]
    fn a_write_the_cache_has_not_seen_is_read_as_written() {
        let d = full();
        let key = (Kind::Deployment, "apps".to_string(), "a".to_string());
        let mut written = HashMap::from([(key.clone(), (5, Instant::now()))]);
        assert_eq!(pending_write(&mut written, key.clone(), 4), Some(5));
        let cached = WorkloadFacts {
            kind: Kind::Deployment,
            name: "a".into(),
            generation: 4,
            replicas: 2,
            template_labels: BTreeMap::new(),
            template_annotations: map(&[(PROXY_CPU, "1")]),
            opted_out: false,
            other_rule: false,
            written_at: None,
            written_generation: None,
            foreign_owners: vec![],
            foreign_writes: ForeignWrites::default(),
            other_containers: Amounts::new(),
            rollout: Rollout::Complete,
        };
        let seen = cached.written(5, &d);
        assert_eq!(seen.generation, 5);
        assert_eq!(seen.written_generation, Some(5));
        assert!(deviations(&d, &seen.template_annotations).is_empty());
        assert_eq!(seen.template_annotations[HASH_ANNOTATION], d.hash());
        assert!(matches!(seen.rollout, Rollout::InProgress(_)));
        // Caught up: forgotten.
        assert_eq!(pending_write(&mut written, key.clone(), 5), None);
        assert!(written.is_empty());
    }
}
