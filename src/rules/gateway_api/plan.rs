//! The pure part of the `gatewayApi` section: the overlays a class's declaration becomes, the
//! class-defaults ConfigMap that carries them, whether Istio reads it, what to do about the
//! ConfigMaps already there, and which objects istiod rendered from an overlay that is gone.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{Value, json};

use crate::api::{GatewayClassSpec, SpreadMode};
use crate::rules::ha::{HOSTNAME, ZONE, int_or_string_json, resources_json};

/// The label istiod finds a class's defaults by (in its own namespace; the oldest counts).
pub const DEFAULTS_FOR_CLASS: &str = "gateway.istio.io/defaults-for-class";
/// The label istiod puts on what it renders for a Gateway: its class.
pub const CLASS_LABEL: &str = "gateway.networking.k8s.io/gateway-class-name";
/// The label istiod puts on a gateway's pods: its Gateway's name.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The label istiod puts on everything it renders for a Gateway, pods included.
pub const MANAGED_LABEL: &str = "gateway.istio.io/managed";
/// The label meshwarden's overlays put on the HorizontalPodAutoscaler and
/// PodDisruptionBudget istiod renders from them: the policy's name. istiod leaves those
/// objects behind when the overlay goes; meshwarden finds and deletes them by it.
pub const RENDERED_FOR: &str = "meshwarden.io/gateway-defaults";
/// The first Istio release that reads class-defaults ConfigMaps (istio/istio#55283).
pub const FIRST_RELEASE: (u32, u32) = (1, 26);

/// The overlay keys and the kinds istiod renders them into.
pub const HPA_KEY: &str = "horizontalPodAutoscaler";
pub const PDB_KEY: &str = "podDisruptionBudget";
pub const DEPLOYMENT_KEY: &str = "deployment";

/// The `data` of the class-defaults ConfigMap for `class` (key -> YAML overlay), labelled
/// for `policy`. Empty when the class declares nothing istiod can carry.
pub fn overlays(class: &GatewayClassSpec, policy: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let marked = json!({"labels": {RENDERED_FOR: policy}});
    if let Some(r) = &class.replicas {
        let hpa = json!({"metadata": marked.clone(), "spec": {"minReplicas": r.min, "maxReplicas": r.max.unwrap_or(r.min).max(r.min)}});
        out.insert(HPA_KEY.to_string(), yaml(&hpa));
    }
    if let Some(b) = &class.disruption_budget {
        let mut spec = serde_json::Map::new();
        if let Some(v) = &b.min_available {
            spec.insert("minAvailable".into(), int_or_string_json(v));
        }
        if let Some(v) = &b.max_unavailable {
            spec.insert("maxUnavailable".into(), int_or_string_json(v));
        }
        let pdb = json!({"metadata": marked, "spec": Value::Object(spec)});
        out.insert(PDB_KEY.to_string(), yaml(&pdb));
    }
    if let Some(pod) = pod_overlay(class) {
        let dep = json!({"spec": {"template": {"spec": pod}}});
        out.insert(DEPLOYMENT_KEY.to_string(), yaml(&dep));
    }
    out
}

fn yaml(v: &Value) -> String {
    crate::yaml::to_string(v).unwrap_or_else(|_| v.to_string())
}

/// The pods of each gateway of the class: one Gateway's pods spread against each other, never
/// against another Gateway's. A class-wide overlay cannot name the Gateway, so the terms select
/// every pod istiod rendered ([`MANAGED_LABEL`]) and `matchLabelKeys` narrows them to the
/// incoming pod's Gateway (GA in Kubernetes 1.33 for pod affinity, beta since 1.27 for spread
/// constraints). The selector must not name the key `matchLabelKeys` names: the API server
/// adds `<key> In (<value>)` to it at pod creation and rejects a key found twice.
fn pod_overlay(class: &GatewayClassSpec) -> Option<Value> {
    let mut pod = serde_json::Map::new();
    let selector = json!({"matchExpressions": [{"key": MANAGED_LABEL, "operator": "Exists"}]});
    if let Some(spread) = &class.spread {
        let term = json!({"labelSelector": selector.clone(), "matchLabelKeys": [GATEWAY_NAME_LABEL], "topologyKey": HOSTNAME});
        match spread.nodes {
            SpreadMode::Required => {
                pod.insert(
                    "affinity".into(),
                    json!({"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}),
                );
            }
            SpreadMode::Preferred => {
                pod.insert(
                    "affinity".into(),
                    json!({"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term}]}}),
                );
            }
            SpreadMode::Off => {}
        }
        let when = match spread.zones {
            SpreadMode::Required => Some("DoNotSchedule"),
            SpreadMode::Preferred => Some("ScheduleAnyway"),
            SpreadMode::Off => None,
        };
        if let Some(when) = when {
            pod.insert(
                "topologySpreadConstraints".into(),
                json!([{"maxSkew": 1, "topologyKey": ZONE, "whenUnsatisfiable": when, "labelSelector": selector, "matchLabelKeys": [GATEWAY_NAME_LABEL]}]),
            );
        }
    }
    if let Some(r) = &class.resources {
        pod.insert(
            "containers".into(),
            json!([{"name": "istio-proxy", "resources": resources_json(r)}]),
        );
    }
    (!pod.is_empty()).then_some(Value::Object(pod))
}

/// The name of the class-defaults ConfigMap meshwarden keeps for `policy` and `class`.
pub fn config_map_name(policy: &str, class: &str) -> String {
    format!("meshwarden-{class}-{policy}")
}

/// The server-side apply of that ConfigMap: the class label istiod reads, meshwarden's labels
/// and the overlays; owned by the policy, so that it never outlives it.
pub fn config_map(
    policy: &str,
    class: &str,
    namespace: &str,
    data: &BTreeMap<String, String>,
    owner: Option<OwnerReference>,
) -> Value {
    let mut labels = crate::write::labels(policy);
    labels.insert(DEFAULTS_FOR_CLASS.to_string(), class.to_string());
    let mut meta = json!({
        "name": config_map_name(policy, class),
        "namespace": namespace,
        "labels": labels,
    });
    if let Some(o) = owner {
        meta["ownerReferences"] = json!([o]);
    }
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
}

/// Whether the running istiod reads class-defaults ConfigMaps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Support {
    /// Every istiod runs 1.26 or later.
    Yes,
    /// An istiod runs an older release (its version).
    TooOld(String),
    /// No istiod runs, or one's version cannot be read (an image by digest, a custom tag).
    Unknown(String),
}

/// `1.26.3`, `1.31-dev`, `1.27.0-distroless` -> (1, 26), (1, 31), (1, 27).
pub fn release(tag: &str) -> Option<(u32, u32)> {
    let mut parts = tag.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Judges the versions (image tags) of the istiod Deployments that run.
pub fn support(versions: &BTreeSet<String>) -> Support {
    if versions.is_empty() {
        return Support::Unknown("no istiod Deployment (label app=istiod) runs".into());
    }
    for v in versions {
        match release(v) {
            None => {
                return Support::Unknown(format!(
                    "the version of istiod ({v}) cannot be read from its image tag"
                ));
            }
            Some(r) if r < FIRST_RELEASE => return Support::TooOld(v.clone()),
            Some(_) => {}
        }
    }
    Support::Yes
}

/// A class-defaults ConfigMap found in istiod's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub name: String,
    pub class: String,
    /// The policy whose ConfigMap it is, when meshwarden created it.
    pub policy: Option<String>,
}

/// What to do for one class.
#[derive(Clone, Debug, PartialEq)]
pub enum ClassPlan {
    /// Apply meshwarden's ConfigMap (missing, or its data differs).
    Write,
    /// meshwarden's ConfigMap holds the declaration.
    Current,
    /// Somebody else's class defaults exist (named): istiod reads only the oldest, so
    /// meshwarden writes none (and removes its own) and says what to add to theirs.
    Foreign(Vec<String>),
}

/// Decides one class: `live` is the data of meshwarden's ConfigMap as read (None: absent),
/// `found` every class-defaults ConfigMap of the class.
pub fn decide(
    want: &BTreeMap<String, String>,
    live: Option<&BTreeMap<String, String>>,
    found: &[Found],
) -> ClassPlan {
    let foreign: Vec<String> = found
        .iter()
        .filter(|f| f.policy.is_none())
        .map(|f| f.name.clone())
        .collect();
    if !foreign.is_empty() {
        return ClassPlan::Foreign(foreign);
    }
    match live {
        Some(data) if data == want => ClassPlan::Current,
        _ => ClassPlan::Write,
    }
}

/// The advice for a class whose defaults somebody else keeps: the keys to add to theirs.
pub fn advice(class: &str, want: &BTreeMap<String, String>, holders: &[String]) -> String {
    let keys: Vec<String> = want
        .iter()
        .map(|(k, v)| format!("{k}: |\n{}", indent(v)))
        .collect();
    format!(
        "ConfigMap {} already holds the defaults of GatewayClass {class} (istiod reads only the oldest ConfigMap labelled {DEFAULTS_FOR_CLASS}={class}), so meshwarden writes none; add to its data:\n{}",
        holders.join(", "),
        keys.join("\n")
    )
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A HorizontalPodAutoscaler or PodDisruptionBudget istiod rendered from one of meshwarden's
/// overlays (labelled [`RENDERED_FOR`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rendered {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub class: String,
}

/// The rendered objects to delete: those whose class's live ConfigMap of meshwarden no longer
/// carries their overlay key. `live` maps a class to the keys of meshwarden's ConfigMap as read
/// at the start of this pass (a class without one: absent). Objects of a ConfigMap removed in
/// this same pass wait for the next, once istiod has re-rendered without it.
pub fn left_behind(
    rendered: &[Rendered],
    live: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<Rendered> {
    let mut out: Vec<Rendered> = rendered
        .iter()
        .filter(|r| {
            let key = if r.kind == "HorizontalPodAutoscaler" {
                HPA_KEY
            } else {
                PDB_KEY
            };
            !live.get(&r.class).is_some_and(|keys| keys.contains(key))
        })
        .cloned()
        .collect();
    out.sort();
    out
}
