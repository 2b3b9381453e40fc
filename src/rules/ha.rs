//! High availability of istiod revisions and mesh gateways: replicas (through the HPA when
//! one owns the count), exactly one PodDisruptionBudget that never blocks node drains,
//! spreading over nodes and zones, and container resources.

use std::time::Instant;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Affinity, PodAntiAffinity, TopologySpreadConstraint};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::api::{
    DisruptionBudgetSpec, Enforcement, MeshPolicy, ReplicasSpec, ResourceAmounts, ResourcesSpec,
    SpreadMode, SpreadSpec, Violation,
};
use crate::apply;
use crate::conditions::{Observed, Status};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::quantity;
use crate::rules::RuleReport;
use crate::selector;

/// Label on objects meshwarden creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshwarden");
/// Label naming the policy that created an object.
pub const POLICY_LABEL: &str = "meshwarden.io/policy";
const HOSTNAME: &str = "kubernetes.io/hostname";
const ZONE: &str = "topology.kubernetes.io/zone";

/// The rules of one section (control plane or one gateway entry), resolved.
#[derive(Clone, Debug, Default)]
pub struct HaRules {
    pub replicas: Option<ReplicasSpec>,
    pub budget: Option<DisruptionBudgetSpec>,
    pub spread: Option<SpreadSpec>,
    pub resources: Option<ResourcesSpec>,
    /// Container whose resources are held (`discovery` or `istio-proxy`).
    pub container: &'static str,
}

/// What was read about one target Deployment.
#[derive(Clone, Debug)]
pub struct Observation {
    pub deployment: Deployment,
    pub hpa: Option<HorizontalPodAutoscaler>,
    /// Every PodDisruptionBudget in the namespace whose selector matches the pods.
    pub pdbs: Vec<PodDisruptionBudget>,
}

/// A deviation found on a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Kind/namespace/name of the object that deviates.
    pub object: String,
    /// The field (for fight tracking and messages), e.g. `spec.minReplicas`.
    pub field: String,
    pub message: String,
    /// Whether meshwarden can correct it (false: report only, e.g. somebody else's PDB).
    pub fixable: bool,
    /// A budget that forbids every disruption.
    pub blocks_drain: bool,
}

/// What to do to a PodDisruptionBudget.
#[derive(Clone, Debug, PartialEq)]
pub enum PdbAction {
    Apply { name: String, patch: Value },
    Delete { name: String },
}

/// Everything the plan for one Deployment wants written.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub findings: Vec<Finding>,
    pub deployment_patch: Option<Value>,
    pub hpa_patch: Option<(String, Value)>,
    pub pdb: Option<PdbAction>,
    /// The Deployment patch changes the pod template: its pods roll.
    pub rolls_pods: bool,
    /// (field, manager) pairs meshwarden takes over by writing.
    pub takeovers: Vec<(String, String)>,
    /// Messages that are not deviations but worth a line (HPA handling).
    pub notes: Vec<String>,
}

fn object_id(kind: &str, ns: &str, name: &str) -> String {
    format!("{kind}/{ns}/{name}")
}

/// Pods allowed to be disrupted under `budget` when `replicas` pods run.
pub fn allowed_disruptions(
    min_available: Option<&IntOrString>,
    max_unavailable: Option<&IntOrString>,
    replicas: i32,
) -> i32 {
    let pct = |s: &str, round_up: bool| -> i32 {
        let p: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
        let n = i64::from(replicas) * p;
        let v = if round_up { (n + 99) / 100 } else { n / 100 };
        i32::try_from(v).unwrap_or(i32::MAX)
    };
    match (min_available, max_unavailable) {
        (_, Some(IntOrString::Int(m))) => (*m).min(replicas),
        (_, Some(IntOrString::String(s))) => pct(s, true).min(replicas),
        (Some(IntOrString::Int(m)), None) => (replicas - m).max(0),
        (Some(IntOrString::String(s)), None) => (replicas - pct(s, true)).max(0),
        // A budget with neither field never blocks an eviction.
        (None, None) => replicas,
    }
}

fn int_or_string_json(v: &IntOrString) -> Value {
    match v {
        IntOrString::Int(i) => json!(i),
        IntOrString::String(s) => json!(s),
    }
}

fn amounts_json(a: &ResourceAmounts) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(c) = &a.cpu {
        m.insert("cpu".into(), json!(ios_string(c)));
    }
    if let Some(mem) = &a.memory {
        m.insert("memory".into(), json!(ios_string(mem)));
    }
    Value::Object(m)
}

fn ios_string(v: &IntOrString) -> String {
    match v {
        IntOrString::Int(i) => i.to_string(),
        IntOrString::String(s) => s.clone(),
    }
}

/// Deviations of a container's resources from the declared ones (empty when compliant).
pub fn resource_deviations(
    declared: &ResourcesSpec,
    current: Option<&k8s_openapi::api::core::v1::ResourceRequirements>,
) -> Vec<String> {
    let mut out = Vec::new();
    let pairs = [
        (
            "requests",
            declared.requests.as_ref(),
            current.and_then(|c| c.requests.as_ref()),
        ),
        (
            "limits",
            declared.limits.as_ref(),
            current.and_then(|c| c.limits.as_ref()),
        ),
    ];
    for (what, want, have) in pairs {
        let Some(want) = want else { continue };
        for (res, value) in [("cpu", &want.cpu), ("memory", &want.memory)] {
            let Some(value) = value else { continue };
            let want_s = ios_string(value);
            let have_s = have.and_then(|h| h.get(res)).map(|q| q.0.clone());
            match have_s {
                Some(h) if quantity::same(&h, &want_s) => {}
                Some(h) => out.push(format!("{what}.{res} is {h}, declared {want_s}")),
                None => out.push(format!("{what}.{res} is unset, declared {want_s}")),
            }
        }
    }
    out
}

fn spread_term(selector: &Value) -> Value {
    json!({"labelSelector": selector, "topologyKey": HOSTNAME})
}

/// Plans one target. `enforce` decides whether writes are planned; `policy` names the owner
/// of a PodDisruptionBudget that has to be created.
pub fn plan(rules: &HaRules, obs: &Observation, policy: &MeshPolicy, enforce: bool) -> Plan {
    let mut p = Plan::default();
    let d = &obs.deployment;
    let ns = d.namespace().unwrap_or_default();
    let name = d.name_any();
    let dep_id = object_id("Deployment", &ns, &name);
    let spec = d.spec.clone().unwrap_or_default();
    let pod_selector = serde_json::to_value(&spec.selector).unwrap_or(Value::Null);
    let pod_spec = spec.template.spec.clone().unwrap_or_default();
    let mut dep_spec = serde_json::Map::new();
    let mut template_spec = serde_json::Map::new();
    let mut dep_changed = false;

    // Replicas: through the HPA when one targets the Deployment.
    let current_min = match &obs.hpa {
        Some(h) => h.spec.as_ref().and_then(|s| s.min_replicas).unwrap_or(1),
        None => spec.replicas.unwrap_or(1),
    };
    let mut effective_min = current_min;
    if let Some(r) = &rules.replicas {
        match &obs.hpa {
            Some(hpa) => {
                let hs = hpa.spec.clone().unwrap_or_default();
                let hpa_id = object_id("HorizontalPodAutoscaler", &ns, &hpa.name_any());
                let want_min = current_min.max(r.min);
                let want_max = hs.max_replicas.max(want_min);
                p.notes.push(format!(
                    "{hpa_id} owns the replica count of {dep_id}: its minReplicas is held at {} or more",
                    r.min
                ));
                if current_min < r.min {
                    p.findings.push(Finding {
                        object: hpa_id.clone(),
                        field: "spec.minReplicas".into(),
                        message: format!(
                            "minReplicas is {current_min}, below the declared minimum {}",
                            r.min
                        ),
                        fixable: true,
                        blocks_drain: false,
                    });
                    for m in apply::foreign_managers(&hpa.metadata, &["f:spec", "f:minReplicas"]) {
                        p.takeovers.push((format!("{hpa_id} spec.minReplicas"), m));
                    }
                    p.hpa_patch = Some((
                        hpa.name_any(),
                        json!({
                            "apiVersion": "autoscaling/v2",
                            "kind": "HorizontalPodAutoscaler",
                            "metadata": {"name": hpa.name_any(), "namespace": ns},
                            "spec": {"minReplicas": want_min, "maxReplicas": want_max}
                        }),
                    ));
                }
                effective_min = if enforce { want_min } else { current_min };
            }
            None => {
                if current_min < r.min {
                    p.findings.push(Finding {
                        object: dep_id.clone(),
                        field: "spec.replicas".into(),
                        message: format!(
                            "replicas is {current_min}, below the declared minimum {}",
                            r.min
                        ),
                        fixable: true,
                        blocks_drain: false,
                    });
                    for m in apply::foreign_managers(&d.metadata, &["f:spec", "f:replicas"]) {
                        p.takeovers.push((format!("{dep_id} spec.replicas"), m));
                    }
                    dep_changed = true;
                }
                dep_spec.insert("replicas".into(), json!(current_min.max(r.min)));
                if enforce {
                    effective_min = current_min.max(r.min);
                }
            }
        }
    }

    // Spread over nodes: pod anti-affinity on the hostname.
    if let Some(spread) = &rules.spread {
        let anti = pod_spec
            .affinity
            .as_ref()
            .and_then(|a: &Affinity| a.pod_anti_affinity.clone())
            .unwrap_or_default();
        let PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: required,
            preferred_during_scheduling_ignored_during_execution: preferred,
        } = anti;
        let required = required.unwrap_or_default();
        let preferred = preferred.unwrap_or_default();
        let has_required = required.iter().any(|t| t.topology_key == HOSTNAME);
        let has_preferred = preferred
            .iter()
            .any(|w| w.pod_affinity_term.topology_key == HOSTNAME);
        let (ok, which) = match spread.nodes {
            SpreadMode::Off => (true, None),
            SpreadMode::Required => (has_required, Some("required")),
            SpreadMode::Preferred => (has_required || has_preferred, Some("preferred")),
        };
        if let Some(which) = which {
            let mut req: Vec<Value> = required
                .iter()
                .map(|t| serde_json::to_value(t).unwrap_or(Value::Null))
                .collect();
            let mut pref: Vec<Value> = preferred
                .iter()
                .map(|t| serde_json::to_value(t).unwrap_or(Value::Null))
                .collect();
            if !ok {
                p.findings.push(Finding {
                    object: dep_id.clone(),
                    field: "spec.template.spec.affinity.podAntiAffinity".into(),
                    message: format!("no {which} pod anti-affinity on {HOSTNAME}"),
                    fixable: true,
                    blocks_drain: false,
                });
                dep_changed = true;
                p.rolls_pods = true;
                if which == "required" {
                    req.push(spread_term(&pod_selector));
                } else {
                    pref.push(
                        json!({"weight": 100, "podAffinityTerm": spread_term(&pod_selector)}),
                    );
                }
            }
            // Both lists are atomic: the user's own terms are sent along so none is lost.
            let mut anti_json = serde_json::Map::new();
            if !req.is_empty() {
                anti_json.insert(
                    "requiredDuringSchedulingIgnoredDuringExecution".into(),
                    Value::Array(req),
                );
            }
            if !pref.is_empty() {
                anti_json.insert(
                    "preferredDuringSchedulingIgnoredDuringExecution".into(),
                    Value::Array(pref),
                );
            }
            template_spec.insert(
                "affinity".into(),
                json!({"podAntiAffinity": Value::Object(anti_json)}),
            );
        }

        // Spread over zones: a topology spread constraint (a list keyed by topologyKey and
        // whenUnsatisfiable, so only our entry is sent).
        let tsc: Vec<TopologySpreadConstraint> = pod_spec
            .topology_spread_constraints
            .clone()
            .unwrap_or_default();
        let zone_mode = match spread.zones {
            SpreadMode::Off => None,
            SpreadMode::Required => Some("DoNotSchedule"),
            SpreadMode::Preferred => Some("ScheduleAnyway"),
        };
        if let Some(when) = zone_mode {
            let ok = tsc.iter().any(|c| {
                c.topology_key == ZONE
                    && (when == "ScheduleAnyway" || c.when_unsatisfiable == "DoNotSchedule")
            });
            let entry = tsc
                .iter()
                .find(|c| c.topology_key == ZONE && c.when_unsatisfiable == when)
                .map(|c| serde_json::to_value(c).unwrap_or(Value::Null))
                .unwrap_or_else(|| {
                    json!({"maxSkew": 1, "topologyKey": ZONE, "whenUnsatisfiable": when, "labelSelector": pod_selector})
                });
            if !ok {
                p.findings.push(Finding {
                    object: dep_id.clone(),
                    field: "spec.template.spec.topologySpreadConstraints".into(),
                    message: format!("no topology spread constraint on {ZONE} ({when})"),
                    fixable: true,
                    blocks_drain: false,
                });
                dep_changed = true;
                p.rolls_pods = true;
            }
            template_spec.insert("topologySpreadConstraints".into(), json!([entry]));
        }
    }

    // Container resources.
    if let Some(res) = &rules.resources {
        let container = pod_spec
            .containers
            .iter()
            .find(|c| c.name == rules.container);
        match container {
            None => p.findings.push(Finding {
                object: dep_id.clone(),
                field: format!("spec.template.spec.containers[{}]", rules.container),
                message: format!("has no container named {}", rules.container),
                fixable: false,
                blocks_drain: false,
            }),
            Some(c) => {
                let devs = resource_deviations(res, c.resources.as_ref());
                if !devs.is_empty() {
                    p.findings.push(Finding {
                        object: dep_id.clone(),
                        field: format!(
                            "spec.template.spec.containers[{}].resources",
                            rules.container
                        ),
                        message: format!("container {}: {}", rules.container, devs.join("; ")),
                        fixable: true,
                        blocks_drain: false,
                    });
                    dep_changed = true;
                    p.rolls_pods = true;
                    let key = format!("k:{{\"name\":\"{}\"}}", rules.container);
                    for m in apply::foreign_managers(
                        &d.metadata,
                        &[
                            "f:spec",
                            "f:template",
                            "f:spec",
                            "f:containers",
                            &key,
                            "f:resources",
                        ],
                    ) {
                        p.takeovers.push((
                            format!("{dep_id} container {} resources", rules.container),
                            m,
                        ));
                    }
                }
                let mut r = serde_json::Map::new();
                if let Some(req) = &res.requests {
                    r.insert("requests".into(), amounts_json(req));
                }
                if let Some(lim) = &res.limits {
                    r.insert("limits".into(), amounts_json(lim));
                }
                template_spec.insert(
                    "containers".into(),
                    json!([{"name": rules.container, "resources": Value::Object(r)}]),
                );
            }
        }
    }

    if dep_changed {
        if !template_spec.is_empty() {
            dep_spec.insert(
                "template".into(),
                json!({"spec": Value::Object(template_spec)}),
            );
        }
        p.deployment_patch = Some(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": Value::Object(dep_spec),
        }));
    }

    plan_budget(&mut p, rules, obs, policy, &pod_selector, effective_min);
    p
}

fn plan_budget(
    p: &mut Plan,
    rules: &HaRules,
    obs: &Observation,
    policy: &MeshPolicy,
    pod_selector: &Value,
    effective_min: i32,
) {
    let d = &obs.deployment;
    let ns = d.namespace().unwrap_or_default();
    let dep_id = object_id("Deployment", &ns, &d.name_any());
    let ours = |pdb: &PodDisruptionBudget| {
        pdb.labels().get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1)
    };

    if obs.pdbs.len() > 1 {
        let names: Vec<String> = obs.pdbs.iter().map(|b| b.name_any()).collect();
        let own: Vec<&PodDisruptionBudget> = obs.pdbs.iter().filter(|b| ours(b)).collect();
        let fixable = !own.is_empty() && own.len() < obs.pdbs.len();
        p.findings.push(Finding {
            object: dep_id.clone(),
            field: "PodDisruptionBudget".into(),
            message: format!(
                "{} PodDisruptionBudgets select its pods ({}); evictions fail while more than one does",
                obs.pdbs.len(),
                names.join(", ")
            ),
            fixable,
            blocks_drain: true,
        });
        if fixable && let Some(b) = own.first() {
            p.pdb = Some(PdbAction::Delete { name: b.name_any() });
        }
        return;
    }

    let existing = obs.pdbs.first();
    let Some(want) = &rules.budget else {
        // Not configured: still report a budget that blocks every drain.
        if let Some(b) = existing {
            let s = b.spec.clone().unwrap_or_default();
            if allowed_disruptions(
                s.min_available.as_ref(),
                s.max_unavailable.as_ref(),
                effective_min,
            ) < 1
            {
                p.findings.push(Finding {
                    object: object_id("PodDisruptionBudget", &ns, &b.name_any()),
                    field: "spec".into(),
                    message: format!(
                        "allows no disruption at {effective_min} replica(s): node drains block; set controlPlane/gateways disruptionBudget to let meshwarden fix it"
                    ),
                    fixable: false,
                    blocks_drain: true,
                });
            }
        }
        return;
    };

    let mut budget_json = serde_json::Map::new();
    match (&want.min_available, &want.max_unavailable) {
        (Some(m), _) => {
            budget_json.insert("minAvailable".into(), int_or_string_json(m));
        }
        (None, Some(m)) => {
            budget_json.insert("maxUnavailable".into(), int_or_string_json(m));
        }
        (None, None) => {}
    }
    let declared_allows = allowed_disruptions(
        want.min_available.as_ref(),
        want.max_unavailable.as_ref(),
        effective_min,
    );
    if declared_allows < 1 {
        p.findings.push(Finding {
            object: dep_id.clone(),
            field: "disruptionBudget".into(),
            message: format!(
                "the declared budget allows no disruption at {effective_min} replica(s); raise replicas.min or loosen the budget"
            ),
            fixable: false,
            blocks_drain: true,
        });
        return;
    }

    match existing {
        None => {
            let name = format!("{}-meshwarden", d.name_any());
            p.findings.push(Finding {
                object: dep_id.clone(),
                field: "PodDisruptionBudget".into(),
                message: "no PodDisruptionBudget covers its pods".into(),
                fixable: true,
                blocks_drain: false,
            });
            let owner = policy.controller_owner_ref(&()).map(|mut o| {
                o.controller = Some(false);
                o.block_owner_deletion = Some(false);
                o
            });
            let mut spec = budget_json.clone();
            spec.insert("selector".into(), pod_selector.clone());
            p.pdb = Some(PdbAction::Apply {
                name: name.clone(),
                patch: json!({
                    "apiVersion": "policy/v1",
                    "kind": "PodDisruptionBudget",
                    "metadata": {
                        "name": name,
                        "namespace": ns,
                        "labels": {MANAGED_BY.0: MANAGED_BY.1, POLICY_LABEL: policy.name_any()},
                        "ownerReferences": owner.into_iter().collect::<Vec<_>>(),
                    },
                    "spec": Value::Object(spec),
                }),
            });
        }
        Some(b) => {
            let s = b.spec.clone().unwrap_or_default();
            let pdb_id = object_id("PodDisruptionBudget", &ns, &b.name_any());
            let same =
                s.min_available == want.min_available && s.max_unavailable == want.max_unavailable;
            if same {
                return;
            }
            let allows = allowed_disruptions(
                s.min_available.as_ref(),
                s.max_unavailable.as_ref(),
                effective_min,
            );
            p.findings.push(Finding {
                object: pdb_id.clone(),
                field: "spec".into(),
                message: if allows < 1 {
                    format!(
                        "allows no disruption at {effective_min} replica(s) (minAvailable {:?}, maxUnavailable {:?}): node drains block",
                        s.min_available.as_ref().map(ios_string),
                        s.max_unavailable.as_ref().map(ios_string)
                    )
                } else {
                    format!(
                        "budget is minAvailable {:?} / maxUnavailable {:?}, declared {}",
                        s.min_available.as_ref().map(ios_string),
                        s.max_unavailable.as_ref().map(ios_string),
                        Value::Object(budget_json.clone())
                    )
                },
                fixable: true,
                blocks_drain: allows < 1,
            });
            for f in ["f:minAvailable", "f:maxUnavailable"] {
                for m in apply::foreign_managers(&b.metadata, &["f:spec", f]) {
                    let field = format!("{pdb_id} spec.{}", &f[2..]);
                    if !p.takeovers.iter().any(|(x, y)| x == &field && y == &m) {
                        p.takeovers.push((field, m));
                    }
                }
            }
            // The other form is cleared explicitly: a budget may not carry both.
            let mut spec = budget_json.clone();
            if want.min_available.is_some() && s.max_unavailable.is_some() {
                spec.insert("maxUnavailable".into(), Value::Null);
            }
            if want.max_unavailable.is_some() && s.min_available.is_some() {
                spec.insert("minAvailable".into(), Value::Null);
            }
            p.pdb = Some(PdbAction::Apply {
                name: b.name_any(),
                patch: json!({
                    "apiVersion": "policy/v1",
                    "kind": "PodDisruptionBudget",
                    "metadata": {"name": b.name_any(), "namespace": ns},
                    "spec": Value::Object(spec),
                }),
            });
        }
    }
}

/// Which section a report is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    ControlPlane,
    Gateways,
}

impl Section {
    pub fn condition_type(self) -> &'static str {
        match self {
            Section::ControlPlane => crate::conditions::types::CONTROL_PLANE_HA,
            Section::Gateways => crate::conditions::types::GATEWAY_HA,
        }
    }
}

/// One group of targets with its rules (the control plane, or one gateway entry).
pub struct Group {
    pub label: String,
    pub namespace: String,
    pub selector: String,
    pub rules: HaRules,
    pub enforcement: Enforcement,
}

/// Reads the targets of a group: Deployments by label, the HPA targeting each, and the
/// PodDisruptionBudgets selecting each one's pods.
pub async fn observe(ctx: &Context, group: &Group) -> Result<Vec<Observation>> {
    let ns = &group.namespace;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    // Served from the API server's watch cache (resourceVersion 0): it already holds the change
    // that triggered this reconcile, and a consistent read would first wait for the cache to
    // catch up with etcd, which costs tens of milliseconds per list.
    let lp = ListParams::default().match_any().labels(&group.selector);
    let (deps, hpas, pdbs) = tokio::try_join!(
        async {
            deployments
                .list(&lp)
                .await
                .map_err(|e| Error::kube(format!("list Deployments in {ns}"), e))
        },
        async {
            hpas.list(&ListParams::default().match_any())
                .await
                .map_err(|e| Error::kube(format!("list HorizontalPodAutoscalers in {ns}"), e))
        },
        async {
            pdbs.list(&ListParams::default().match_any())
                .await
                .map_err(|e| Error::kube(format!("list PodDisruptionBudgets in {ns}"), e))
        },
    )?;
    let mut out = Vec::new();
    for d in deps.items {
        let name = d.name_any();
        let hpa = hpas
            .items
            .iter()
            .find(|h| {
                h.spec.as_ref().is_some_and(|s| {
                    s.scale_target_ref.kind == "Deployment" && s.scale_target_ref.name == name
                })
            })
            .cloned();
        let labels = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let matching = pdbs
            .items
            .iter()
            .filter(|b| {
                b.spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .is_some_and(|sel| {
                        // An empty selector in policy/v1 selects every pod of the namespace.
                        selector::matches(sel, &labels)
                    })
            })
            .cloned()
            .collect();
        out.push(Observation {
            deployment: d,
            hpa,
            pdbs: matching,
        });
    }
    Ok(out)
}

/// Observes, plans and (in Enforce) applies every group of a section; reports the result.
pub async fn reconcile(
    ctx: &Context,
    policy: &MeshPolicy,
    section: Section,
    groups: &[Group],
) -> RuleReport {
    let ctype = section.condition_type();
    let mut report = RuleReport {
        condition: Observed::new(ctype, Status::True, "Compliant", ""),
        violations: Vec::new(),
        targets: 0,
        compliant: 0,
        corrected: 0,
        corrections: Vec::new(),
    };
    let mut empty_groups = Vec::new();
    let mut takeovers: Vec<String> = Vec::new();
    let mut fights: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut rolled: Vec<String> = Vec::new();
    let mut blocking = false;
    let mut audit = false;
    let mut unfixable = false;

    for group in groups {
        let observations = match observe(ctx, group).await {
            Ok(o) => o,
            Err(e) => return RuleReport::failed(ctype, &e),
        };
        if observations.is_empty() {
            empty_groups.push(format!(
                "{} (namespace {}, selector {})",
                group.label, group.namespace, group.selector
            ));
            continue;
        }
        let enforce = group.enforcement == Enforcement::Enforce;
        audit |= !enforce;
        for obs in &observations {
            report.targets += 1;
            let plan = plan(&group.rules, obs, policy, enforce);
            notes.extend(plan.notes.iter().cloned());
            if plan.findings.is_empty() {
                report.compliant += 1;
                continue;
            }
            let dep_id = object_id("Deployment", &group.namespace, &obs.deployment.name_any());
            let fight_key = format!("{}:{}", policy.name_any(), dep_id);
            let now = Instant::now();
            let fighting = ctx.fight_check(&fight_key, now);
            let outstanding: Vec<Finding> = if !enforce {
                plan.findings.clone()
            } else if fighting {
                fights.push(dep_id.clone());
                plan.findings.clone()
            } else {
                tracing::debug!(target = %dep_id, "correcting");
                let result = execute(ctx, group, &plan).await;
                tracing::debug!(target = %dep_id, "corrected");
                match result {
                    Ok(()) => {
                        let fixed: Vec<&Finding> =
                            plan.findings.iter().filter(|f| f.fixable).collect();
                        if !fixed.is_empty() {
                            ctx.fight_record(&fight_key, now);
                            report.corrected += 1;
                            for f in &fixed {
                                report
                                    .corrections
                                    .push(format!("{}: {}", f.object, f.message));
                            }
                        }
                        if plan.rolls_pods {
                            rolled.push(dep_id.clone());
                        }
                        for (field, manager) in &plan.takeovers {
                            takeovers.push(format!("{field} (was managed by {manager})"));
                        }
                        plan.findings
                            .iter()
                            .filter(|f| !f.fixable)
                            .cloned()
                            .collect()
                    }
                    Err(e) => {
                        let mut failed = RuleReport::failed(ctype, &e);
                        failed.targets = report.targets;
                        return failed;
                    }
                }
            };
            if outstanding.is_empty() {
                report.compliant += 1;
            }
            for f in outstanding {
                blocking |= f.blocks_drain;
                unfixable |= !f.fixable && enforce;
                let action = if enforce && fighting {
                    "Skipped"
                } else {
                    "Reported"
                };
                report.violations.push(Violation {
                    rule: ctype.to_string(),
                    object: f.object.clone(),
                    message: format!("{}: {}", f.field, f.message),
                    action: action.to_string(),
                });
            }
        }
    }

    let key = format!(
        "{}/{}/{ctype}",
        policy.name_any(),
        policy.metadata.generation.unwrap_or_default()
    );
    let takeovers = ctx.remember_takeovers(&key, &takeovers);
    let mut msg = Vec::new();
    msg.push(format!(
        "{} of {} target(s) compliant",
        report.compliant, report.targets
    ));
    if report.corrected > 0 {
        msg.push(format!("{} corrected", report.corrected));
    }
    if !rolled.is_empty() {
        msg.push(format!(
            "the pod template of {} changed, so its pods roll",
            rolled.join(", ")
        ));
    }
    msg.extend(super::takeover_sentence(&takeovers));
    msg.extend(super::fight_sentence(&fights));
    if !empty_groups.is_empty() {
        msg.push(format!(
            "no Deployment found for {}",
            empty_groups.join(", ")
        ));
    }
    if !report.violations.is_empty() {
        let shown: Vec<String> = report
            .violations
            .iter()
            .take(5)
            .map(|v| format!("{} {}", v.object, v.message))
            .collect();
        msg.push(format!("deviations: {}", shown.join("; ")));
        if audit {
            msg.push("Audit mode: nothing was changed".to_string());
        }
    }
    msg.extend(notes.into_iter().take(3));

    let (status, reason) = if !fights.is_empty() {
        (Status::False, "FightDetected")
    } else if blocking {
        (Status::False, "BudgetBlocksDrain")
    } else if !report.violations.is_empty() && unfixable {
        (Status::False, "CannotCorrect")
    } else if !report.violations.is_empty() {
        (Status::False, "NonCompliant")
    } else if report.targets == 0 || !empty_groups.is_empty() {
        (Status::False, "NoTargets")
    } else if !takeovers.is_empty() {
        (Status::True, "FieldOwnedByOther")
    } else if report.corrected > 0 {
        (Status::True, "Corrected")
    } else {
        (Status::True, "Compliant")
    };
    report.condition = Observed::new(ctype, status, reason, msg.join(". "));
    report
}

async fn execute(ctx: &Context, group: &Group, plan: &Plan) -> Result<()> {
    let ns = &group.namespace;
    if let Some((name, patch)) = &plan.hpa_patch {
        let api: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
        apply::apply(&api, name, patch, &ctx.writes).await?;
    }
    if let Some(patch) = &plan.deployment_patch {
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
        let name = patch["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        apply::apply(&api, &name, patch, &ctx.writes).await?;
    }
    match &plan.pdb {
        Some(PdbAction::Apply { name, patch }) => {
            let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
            apply::apply(&api, name, patch, &ctx.writes).await?;
        }
        Some(PdbAction::Delete { name }) => {
            let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
            apply::delete(&api, name, &ctx.writes).await?;
        }
        None => {}
    }
    Ok(())
}

/// The groups of the control-plane section: every istiod revision in the namespace.
pub fn control_plane_groups(spec: &crate::api::MeshPolicySpec) -> Vec<Group> {
    let Some(cp) = &spec.control_plane else {
        return Vec::new();
    };
    vec![Group {
        label: "istiod".into(),
        namespace: cp.namespace.clone(),
        selector: "app=istiod".into(),
        rules: HaRules {
            replicas: cp.replicas.clone(),
            budget: cp.disruption_budget.clone(),
            spread: cp.spread.clone(),
            resources: cp.resources.clone(),
            container: "discovery",
        },
        enforcement: crate::policy::effective(spec, cp.enforcement),
    }]
}

/// The groups of the gateways section: one per entry.
pub fn gateway_groups(spec: &crate::api::MeshPolicySpec) -> Vec<Group> {
    spec.gateways
        .iter()
        .map(|g| Group {
            label: format!("gateway {}", g.name),
            namespace: g.namespace.clone(),
            selector: selector::to_query(&g.selector),
            rules: HaRules {
                replicas: g.replicas.clone(),
                budget: g.disruption_budget.clone(),
                spread: g.spread.clone(),
                resources: g.resources.clone(),
                container: "istio-proxy",
            },
            enforcement: crate::policy::effective(spec, g.enforcement),
        })
        .collect()
}
