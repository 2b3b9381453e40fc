//! The pure plan for one target Deployment: replicas (through its HPA), spread and resources.

use k8s_openapi::api::core::v1::{Affinity, PodAntiAffinity, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde_json::{Value, json};

use super::{Finding, HOSTNAME, HaRules, Observation, Plan, ZONE, object_id};
use crate::api::{MeshPolicy, ResourceAmounts, ResourcesSpec, SpreadMode};
use crate::quantity;
use crate::write;

pub(crate) fn int_or_string_json(v: &IntOrString) -> Value {
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

/// A container's `resources` as declared: requests and limits, quantities as strings.
pub(crate) fn resources_json(res: &ResourcesSpec) -> Value {
    let mut r = serde_json::Map::new();
    if let Some(req) = &res.requests {
        r.insert("requests".into(), amounts_json(req));
    }
    if let Some(lim) = &res.limits {
        r.insert("limits".into(), amounts_json(lim));
    }
    Value::Object(r)
}

pub(super) fn ios_string(v: &IntOrString) -> String {
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

/// Records who owns a deviating field (the finding just pushed; `path` as in `managedFields`)
/// and names them as taken over.
fn note_owners(p: &mut Plan, meta: &ObjectMeta, path: &[&str], field: String) {
    let owners = write::foreign_managers(meta, path);
    if let Some(f) = p.findings.last_mut() {
        f.changed_by = owners.clone();
        f.owned = owned(path);
    }
    for m in owners {
        p.takeovers.push((field.clone(), m));
    }
}

const AFFINITY: &[&str] = &["f:spec", "f:template", "f:spec", "f:affinity"];
const SPREAD: &[&str] = &[
    "f:spec",
    "f:template",
    "f:spec",
    "f:topologySpreadConstraints",
];

pub(super) fn owned(path: &[&str]) -> Vec<Vec<String>> {
    vec![path.iter().map(|k| k.to_string()).collect()]
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

    // Two HPAs on one Deployment: the HPA controller scales it by neither.
    if let (Some(first), false) = (&obs.hpa, obs.other_hpas.is_empty()) {
        let mut names = vec![first.name_any()];
        names.extend(obs.other_hpas.iter().cloned());
        p.findings.push(Finding {
            object: dep_id.clone(),
            field: "HorizontalPodAutoscaler".into(),
            message: format!(
                "{} HorizontalPodAutoscalers target it ({}): the HPA controller scales it by none of them (AmbiguousSelector); keep one and delete the others",
                names.len(),
                names.join(", ")
            ),
            fixable: false,
            blocks_drain: false,
            changed_by: Vec::new(),
            owned: Vec::new(),
        });
    }

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
                        changed_by: Vec::new(),
                        owned: Vec::new(),
                    });
                    note_owners(
                        &mut p,
                        &hpa.metadata,
                        &["f:spec", "f:minReplicas"],
                        format!("{hpa_id} spec.minReplicas"),
                    );
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
                        changed_by: Vec::new(),
                        owned: Vec::new(),
                    });
                    note_owners(
                        &mut p,
                        &d.metadata,
                        &["f:spec", "f:replicas"],
                        format!("{dep_id} spec.replicas"),
                    );
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
                    changed_by: write::foreign_managers(&d.metadata, AFFINITY),
                    owned: owned(AFFINITY),
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
                    changed_by: write::foreign_managers(&d.metadata, SPREAD),
                    owned: owned(SPREAD),
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
                changed_by: Vec::new(),
                owned: Vec::new(),
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
                        changed_by: Vec::new(),
                        owned: Vec::new(),
                    });
                    dep_changed = true;
                    p.rolls_pods = true;
                    let key = format!("k:{{\"name\":\"{}\"}}", rules.container);
                    note_owners(
                        &mut p,
                        &d.metadata,
                        &[
                            "f:spec",
                            "f:template",
                            "f:spec",
                            "f:containers",
                            &key,
                            "f:resources",
                        ],
                        format!("{dep_id} container {} resources", rules.container),
                    );
                }
                template_spec.insert(
                    "containers".into(),
                    json!([{"name": rules.container, "resources": resources_json(res)}]),
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

    // The replica counts the budget must work at: fixed, or the HPA's range.
    let max_replicas = match &obs.hpa {
        Some(h) => h
            .spec
            .as_ref()
            .map_or(effective_min, |s| s.max_replicas)
            .max(effective_min),
        None => effective_min,
    };
    super::budget::plan_budget(
        &mut p,
        rules,
        obs,
        policy,
        &pod_selector,
        (effective_min, max_replicas),
    );
    p
}
