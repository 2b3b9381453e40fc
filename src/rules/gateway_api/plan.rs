//! The pure part of the `gatewayApi` section: the overlays a class's declaration becomes, the
//! class-defaults ConfigMap that carries them, whether Istio reads it, what to do about the
//! ConfigMaps already there, and which objects istiod rendered from an overlay that is gone.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{Value, json};

use crate::api::{GatewayPosture, SpreadMode};
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

/// The `data` of the class-defaults ConfigMap for a class declaring `class` (key -> YAML
/// overlay), labelled for `policy`. Empty when the class declares nothing istiod can carry.
pub fn overlays(class: &GatewayPosture, policy: &str) -> BTreeMap<String, String> {
    layered(class, policy, false)
}

/// The overlays of `posture`; `over`: they are laid over a class's defaults (istiod applies
/// a Gateway's own overlays after its class's, field by field), so each declared field is
/// written whole where the two layers could combine into something nobody declared: the
/// other form of a budget is nulled (a PDB with both is invalid, and istiod's apply of it
/// fails), the anti-affinity replaces the class's (`$patch: replace`: required and preferred
/// terms would add up). Lists merged by key (the zone constraint, the proxy container) and
/// the resources' amounts are overridden key by key already.
fn layered(posture: &GatewayPosture, policy: &str, over: bool) -> BTreeMap<String, String> {
    let class = posture;
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
        if over {
            for key in ["minAvailable", "maxUnavailable"] {
                spec.entry(key).or_insert(Value::Null);
            }
        }
        let pdb = json!({"metadata": marked, "spec": Value::Object(spec)});
        out.insert(PDB_KEY.to_string(), yaml(&pdb));
    }
    if let Some(pod) = pod_overlay(class, over) {
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
fn pod_overlay(class: &GatewayPosture, over: bool) -> Option<Value> {
    let mut pod = serde_json::Map::new();
    let replace = |mut v: Value| {
        if over && let Some(m) = v.as_object_mut() {
            m.insert("$patch".into(), json!("replace"));
        }
        v
    };
    let selector = json!({"matchExpressions": [{"key": MANAGED_LABEL, "operator": "Exists"}]});
    if let Some(spread) = &class.spread {
        let term = json!({"labelSelector": selector.clone(), "matchLabelKeys": [GATEWAY_NAME_LABEL], "topologyKey": HOSTNAME});
        match spread.nodes {
            SpreadMode::Required => {
                pod.insert(
                    "affinity".into(),
                    json!({"podAntiAffinity": replace(json!({"requiredDuringSchedulingIgnoredDuringExecution": [term]}))}),
                );
            }
            SpreadMode::Preferred => {
                pod.insert(
                    "affinity".into(),
                    json!({"podAntiAffinity": replace(json!({"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term}]}))}),
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
    let name = config_map_name(policy, class);
    owned_config_map(&name, namespace, labels, data, owner)
}

/// A ConfigMap's apply body: its name, namespace, labels and data, owned by `owner`.
fn owned_config_map(
    name: &str,
    namespace: &str,
    labels: BTreeMap<String, String>,
    data: &BTreeMap<String, String>,
    owner: Option<OwnerReference>,
) -> Value {
    let mut meta = json!({"name": name, "namespace": namespace, "labels": labels});
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
    format!(
        "ConfigMap {} already holds the defaults of GatewayClass {class} (istiod reads only the oldest ConfigMap labelled {DEFAULTS_FOR_CLASS}={class}), so meshwarden writes none; add to its data:\n{}",
        holders.join(", "),
        data_yaml(want)
    )
}

/// `want` as the `data` of a ConfigMap in YAML, each overlay a block.
fn data_yaml(want: &BTreeMap<String, String>) -> String {
    want.iter()
        .map(|(k, v)| format!("{k}: |\n{}", indent(v)))
        .collect::<Vec<_>>()
        .join("\n")
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
    /// The Gateway it was rendered for ([`GATEWAY_NAME_LABEL`]).
    pub gateway: String,
}

/// The overlay keys of meshwarden's ConfigMaps as read at the start of a pass: per class (its
/// class defaults) and per Gateway selected by name (the ConfigMap it references).
#[derive(Clone, Debug, Default)]
pub struct LiveKeys {
    pub classes: BTreeMap<String, BTreeSet<String>>,
    pub gateways: BTreeMap<GatewayRef, BTreeSet<String>>,
}

/// The rendered objects to delete: those for which neither meshwarden's live class defaults of
/// their class nor meshwarden's live ConfigMap of their Gateway carries their overlay key (a
/// class or Gateway without one: absent). Objects of a ConfigMap removed in this same pass
/// wait for the next, once istiod has re-rendered without it.
pub fn left_behind(rendered: &[Rendered], live: &LiveKeys) -> Vec<Rendered> {
    let mut out: Vec<Rendered> = rendered
        .iter()
        .filter(|r| {
            let key = if r.kind == "HorizontalPodAutoscaler" {
                HPA_KEY
            } else {
                PDB_KEY
            };
            let gateway = GatewayRef {
                namespace: r.namespace.clone(),
                name: r.gateway.clone(),
            };
            let by_class = live.classes.get(&r.class);
            let by_gateway = live.gateways.get(&gateway);
            ![by_class, by_gateway]
                .iter()
                .flatten()
                .any(|keys| keys.contains(key))
        })
        .cloned()
        .collect();
    out.sort();
    out
}

/// The label on meshwarden's per-Gateway ConfigMaps: the Gateway's name.
pub const PARAMETERS_FOR: &str = "meshwarden.io/gateway-parameters";

/// What a Gateway selected by name is held at: what its entry declares, each field it leaves
/// out from its class's entry (when the policy declares its class).
pub fn effective(entry: &GatewayPosture, class: Option<&GatewayPosture>) -> GatewayPosture {
    let class = class.cloned().unwrap_or_default();
    GatewayPosture {
        replicas: entry.replicas.clone().or(class.replicas),
        disruption_budget: entry.disruption_budget.clone().or(class.disruption_budget),
        spread: entry.spread.clone().or(class.spread),
        resources: entry.resources.clone().or(class.resources),
    }
}

/// The `data` of the ConfigMap a Gateway selected by name references: the overlays of its
/// effective posture, written whole over whatever its class's defaults set ([`layered`]).
pub fn gateway_overlays(posture: &GatewayPosture, policy: &str) -> BTreeMap<String, String> {
    layered(posture, policy, true)
}

/// The name of the ConfigMap meshwarden keeps in a Gateway's namespace for `policy`: a hash
/// when the two names do not fit into one.
pub fn gateway_config_map_name(policy: &str, gateway: &str) -> String {
    let name = format!("meshwarden-{policy}-{gateway}");
    if name.len() <= 253 {
        return name;
    }
    let hash = crate::hash::fnv1a(format!("{policy}/{gateway}").as_bytes());
    format!("meshwarden-{hash:016x}")
}

/// The server-side apply of that ConfigMap: meshwarden's labels, [`PARAMETERS_FOR`] and the
/// overlays; owned by the Gateway (`owner`), so that it never goes while the Gateway can
/// still reference it (istiod renders nothing for a Gateway whose parametersRef names a
/// missing ConfigMap), and goes with the Gateway.
pub fn gateway_config_map(
    policy: &str,
    gateway: &GatewayRef,
    data: &BTreeMap<String, String>,
    owner: Option<OwnerReference>,
) -> Value {
    let mut labels = crate::write::labels(policy);
    labels.insert(PARAMETERS_FOR.to_string(), gateway.name.clone());
    let name = gateway_config_map_name(policy, &gateway.name);
    owned_config_map(&name, &gateway.namespace, labels, data, owner)
}

/// The server-side apply of a Gateway by meshwarden: only `spec.infrastructure.parametersRef`
/// naming `config_map`, or nothing at all (`None`), which gives the field up: the API server
/// removes it when meshwarden was its only manager.
pub fn gateway_reference(gateway: &GatewayRef, config_map: Option<&str>) -> Value {
    let mut patch = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": gateway.name, "namespace": gateway.namespace},
    });
    if let Some(cm) = config_map {
        patch["spec"] = json!({"infrastructure": {"parametersRef": {"group": "", "kind": "ConfigMap", "name": cm}}});
    }
    patch
}

/// A Gateway by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GatewayRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for GatewayRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Gateway's `spec.infrastructure.parametersRef` as read: (group, kind, name).
pub type ParametersRef = (String, String, String);

/// What to do for one Gateway selected by name.
#[derive(Clone, Debug, PartialEq)]
pub enum GatewayPlan {
    /// No such Gateway.
    Missing,
    /// Apply meshwarden's ConfigMap (missing, or its data differs), and then the Gateway's
    /// reference to it when `reference` (the Gateway references nothing yet).
    Write { reference: bool },
    /// The Gateway references meshwarden's ConfigMap, which holds the declaration.
    Current,
    /// The Gateway references somebody else's parameters (`kind/name`): istiod reads one
    /// per Gateway, so meshwarden writes none and says what to add to theirs.
    Foreign(String),
}

/// Decides one Gateway: `exists` whether it does, `reference` its parametersRef, `own` the
/// name of meshwarden's ConfigMap for it and `live` that ConfigMap's data as read.
pub fn decide_gateway(
    want: &BTreeMap<String, String>,
    exists: bool,
    reference: Option<&ParametersRef>,
    own: &str,
    live: Option<&BTreeMap<String, String>>,
) -> GatewayPlan {
    if !exists {
        return GatewayPlan::Missing;
    }
    match reference {
        Some(r) if !is_own(r, own) => GatewayPlan::Foreign(format!("{}/{}", r.1, r.2)),
        Some(_) if live == Some(want) => GatewayPlan::Current,
        reference => GatewayPlan::Write {
            reference: reference.is_none(),
        },
    }
}

/// Whether a parametersRef names meshwarden's ConfigMap `own` (in the Gateway's namespace,
/// the only one istiod reads it from).
pub fn is_own(reference: &ParametersRef, own: &str) -> bool {
    reference.0.is_empty() && reference.1 == "ConfigMap" && reference.2 == own
}

/// The advice for a Gateway that references somebody else's parameters.
pub fn gateway_advice(
    gateway: &GatewayRef,
    holder: &str,
    want: &BTreeMap<String, String>,
) -> String {
    format!(
        "Gateway {gateway} already references {holder} in spec.infrastructure.parametersRef (istiod reads one per Gateway, over its class's defaults), so meshwarden writes none; add to its data:\n{}",
        data_yaml(want)
    )
}
