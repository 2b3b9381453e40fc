use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use super::plan::*;
use crate::api::GatewayClassSpec;

fn class(yaml: &str) -> GatewayClassSpec {
    serde_yaml::from_str(yaml).unwrap()
}

/// An overlay as istiod reads it: YAML.
fn overlay(data: &BTreeMap<String, String>, key: &str) -> Value {
    serde_yaml::from_str(&data[key]).unwrap()
}

#[test]
fn a_class_becomes_the_overlays_istiod_renders() {
    let c = class(
        "{className: istio, replicas: {min: 2}, disruptionBudget: {maxUnavailable: 1}, spread: {nodes: Preferred, zones: Required}, resources: {requests: {cpu: 100m, memory: 1}, limits: {memory: 1Gi}}}",
    );
    let data = overlays(&c.posture, "prod");
    assert_eq!(
        data.keys().cloned().collect::<Vec<_>>(),
        [DEPLOYMENT_KEY, HPA_KEY, PDB_KEY],
        "only keys istiod supports"
    );
    assert_eq!(
        overlay(&data, HPA_KEY),
        json!({"metadata": {"labels": {RENDERED_FOR: "prod"}}, "spec": {"minReplicas": 2, "maxReplicas": 2}})
    );
    assert_eq!(
        overlay(&data, PDB_KEY),
        json!({"metadata": {"labels": {RENDERED_FOR: "prod"}}, "spec": {"maxUnavailable": 1}})
    );
    let pod = &overlay(&data, DEPLOYMENT_KEY)["spec"]["template"]["spec"];
    let term =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0];
    assert_eq!(term["weight"], 100);
    assert_eq!(
        term["podAffinityTerm"],
        json!({
            "labelSelector": {"matchExpressions": [{"key": MANAGED_LABEL, "operator": "Exists"}]},
            "matchLabelKeys": [GATEWAY_NAME_LABEL],
            "topologyKey": "kubernetes.io/hostname"
        }),
        "one Gateway's pods spread against each other only"
    );
    let tsc = &pod["topologySpreadConstraints"][0];
    assert_eq!(tsc["whenUnsatisfiable"], "DoNotSchedule");
    assert_eq!(tsc["topologyKey"], "topology.kubernetes.io/zone");
    assert_eq!(tsc["matchLabelKeys"], json!([GATEWAY_NAME_LABEL]));
    assert_eq!(
        pod["containers"],
        json!([{"name": "istio-proxy", "resources": {"requests": {"cpu": "100m", "memory": "1"}, "limits": {"memory": "1Gi"}}}])
    );
}

#[test]
fn only_what_is_declared_is_overlaid() {
    let data = overlays(
        &class("{className: istio-waypoint, replicas: {min: 3, max: 6}}").posture,
        "p",
    );
    assert_eq!(data.keys().cloned().collect::<Vec<_>>(), [HPA_KEY]);
    assert_eq!(
        overlay(&data, HPA_KEY)["spec"],
        json!({"minReplicas": 3, "maxReplicas": 6})
    );
    let required = overlays(
        &class("{className: istio, spread: {nodes: Required, zones: Off}}").posture,
        "p",
    );
    let pod = &overlay(&required, DEPLOYMENT_KEY)["spec"]["template"]["spec"];
    assert!(
        pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
            .is_object()
    );
    assert!(pod.get("topologySpreadConstraints").is_none());
    assert!(overlays(&class("{className: istio}").posture, "p").is_empty());
    // The budget as a percentage stays a string.
    let pct = overlays(
        &class("{className: istio, disruptionBudget: {minAvailable: \"50%\"}}").posture,
        "p",
    );
    assert_eq!(
        overlay(&pct, PDB_KEY)["spec"],
        json!({"minAvailable": "50%"})
    );
}

#[test]
fn the_config_map_carries_the_class_label_and_meshwardens_labels() {
    let data = overlays(
        &class("{className: istio, replicas: {min: 2}}").posture,
        "prod",
    );
    let cm = config_map("prod", "istio", "istio-system", &data, None);
    assert_eq!(cm["metadata"]["name"], "meshwarden-istio-prod");
    assert_eq!(cm["metadata"]["namespace"], "istio-system");
    assert_eq!(cm["metadata"]["labels"][DEFAULTS_FOR_CLASS], "istio");
    assert_eq!(
        cm["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "meshwarden"
    );
    assert_eq!(cm["metadata"]["labels"]["meshwarden.io/policy"], "prod");
    assert_eq!(cm["data"][HPA_KEY], data[HPA_KEY].as_str());
    assert!(cm["metadata"].get("ownerReferences").is_none());
}

#[test]
fn istiod_reads_class_defaults_from_1_26() {
    assert_eq!(release("1.26.0"), Some((1, 26)));
    assert_eq!(release("1.31-dev"), Some((1, 31)));
    assert_eq!(release("1.27.2-distroless"), Some((1, 27)));
    assert_eq!(release("latest"), None);
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(support(&set(&["1.26.0", "1.31-dev"])), Support::Yes);
    assert_eq!(
        support(&set(&["1.25.4", "1.26.1"])),
        Support::TooOld("1.25.4".into()),
        "one older revision renders its gateways without the defaults"
    );
    assert!(matches!(support(&set(&["unknown"])), Support::Unknown(_)));
    assert!(matches!(support(&BTreeSet::new()), Support::Unknown(_)));
}

#[test]
fn somebody_elses_class_defaults_are_never_overridden() {
    let want: BTreeMap<String, String> = [(HPA_KEY.to_string(), "spec: {}".to_string())].into();
    let found = |name: &str, policy: Option<&str>| Found {
        name: name.into(),
        class: "istio".into(),
        policy: policy.map(str::to_string),
    };
    assert_eq!(decide(&want, None, &[]), ClassPlan::Write);
    assert_eq!(
        decide(
            &want,
            Some(&want),
            &[found("meshwarden-istio-p", Some("p"))]
        ),
        ClassPlan::Current
    );
    let changed: BTreeMap<String, String> =
        [(HPA_KEY.to_string(), "spec: {x: 1}".to_string())].into();
    assert_eq!(
        decide(&want, Some(&changed), &[]),
        ClassPlan::Write,
        "edited: written back"
    );
    assert_eq!(
        decide(
            &want,
            Some(&want),
            &[
                found("meshwarden-istio-p", Some("p")),
                found("team-defaults", None)
            ]
        ),
        ClassPlan::Foreign(vec!["team-defaults".into()]),
    );
    // Another policy's ConfigMap is not somebody else's: conflicts between policies are
    // resolved by age before this.
    assert_eq!(
        decide(&want, None, &[found("meshwarden-istio-q", Some("q"))]),
        ClassPlan::Write
    );
    let advice = advice("istio", &want, &["team-defaults".into()]);
    assert!(
        advice.contains("ConfigMap team-defaults already holds the defaults of GatewayClass istio"),
        "{advice}"
    );
    assert!(
        advice.contains("horizontalPodAutoscaler: |\n  spec: {}"),
        "{advice}"
    );
}

#[test]
fn rendered_objects_go_once_their_overlay_is_gone() {
    let r = |kind: &'static str, name: &str, class: &str| Rendered {
        kind,
        namespace: "edge".into(),
        name: name.into(),
        class: class.into(),
        gateway: name.into(),
    };
    let rendered = vec![
        r("HorizontalPodAutoscaler", "public-istio", "istio"),
        r("PodDisruptionBudget", "public-istio", "istio"),
        r("PodDisruptionBudget", "waypoint", "istio-waypoint"),
    ];
    let live = LiveKeys {
        classes: [("istio".to_string(), [PDB_KEY.to_string()].into())].into(),
        ..Default::default()
    };
    assert_eq!(
        left_behind(&rendered, &live),
        vec![
            r("HorizontalPodAutoscaler", "public-istio", "istio"),
            r("PodDisruptionBudget", "waypoint", "istio-waypoint"),
        ],
        "the HPA whose key was dropped, and what a class without a ConfigMap left"
    );
    let classes: BTreeMap<String, BTreeSet<String>> = [
        (
            "istio".to_string(),
            [HPA_KEY.to_string(), PDB_KEY.to_string()].into(),
        ),
        ("istio-waypoint".to_string(), [PDB_KEY.to_string()].into()),
    ]
    .into();
    let all = LiveKeys {
        classes,
        ..Default::default()
    };
    assert!(left_behind(&rendered, &all).is_empty());
}

fn posture(yaml: &str) -> crate::api::GatewayPosture {
    serde_yaml::from_str(yaml).unwrap()
}

#[test]
fn a_gateway_entry_overrides_its_class_entry_field_by_field() {
    let class = posture(
        "{replicas: {min: 3}, disruptionBudget: {minAvailable: 1}, spread: {nodes: Required, zones: Preferred}}",
    );
    let entry = posture("{replicas: {min: 2, max: 4}, disruptionBudget: {maxUnavailable: 1}}");
    let held = effective(&entry, Some(&class));
    assert_eq!(held.replicas, entry.replicas, "the entry's own");
    assert_eq!(held.disruption_budget, entry.disruption_budget);
    assert_eq!(held.spread, class.spread, "left out: the class entry's");
    assert_eq!(held.resources, None);
    assert_eq!(effective(&entry, None), entry, "no class entry");

    // Laid over the class's defaults, each field is written whole.
    let data = gateway_overlays(&held, "prod");
    assert_eq!(
        overlay(&data, PDB_KEY)["spec"],
        json!({"maxUnavailable": 1, "minAvailable": null}),
        "the class's minAvailable is nulled: a PDB with both is invalid"
    );
    assert_eq!(
        overlay(&data, HPA_KEY)["spec"],
        json!({"minReplicas": 2, "maxReplicas": 4})
    );
    let anti =
        &overlay(&data, DEPLOYMENT_KEY)["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
    assert_eq!(
        anti["$patch"], "replace",
        "required and preferred terms of two layers would add up"
    );
    assert!(anti["requiredDuringSchedulingIgnoredDuringExecution"][0].is_object());
    // A class's own overlays stay plain merges.
    let class_data = overlays(&class, "prod");
    assert_eq!(
        overlay(&class_data, PDB_KEY)["spec"],
        json!({"minAvailable": 1})
    );
    let anti = &overlay(&class_data, DEPLOYMENT_KEY)["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
    assert!(anti.get("$patch").is_none());
}

fn gw(namespace: &str, name: &str) -> GatewayRef {
    GatewayRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

#[test]
fn a_gateway_is_referenced_only_when_it_references_nothing() {
    let want: BTreeMap<String, String> = [(HPA_KEY.to_string(), "spec: {}".to_string())].into();
    let own = gateway_config_map_name("prod", "public");
    assert_eq!(own, "meshwarden-prod-public");
    let ours: ParametersRef = (String::new(), "ConfigMap".into(), own.clone());
    assert_eq!(
        decide_gateway(&want, false, None, &own, None),
        GatewayPlan::Missing
    );
    assert_eq!(
        decide_gateway(&want, true, None, &own, None),
        GatewayPlan::Write { reference: true },
        "nothing referenced: the ConfigMap, then the reference"
    );
    assert_eq!(
        decide_gateway(&want, true, Some(&ours), &own, Some(&want)),
        GatewayPlan::Current
    );
    assert_eq!(
        decide_gateway(&want, true, Some(&ours), &own, None),
        GatewayPlan::Write { reference: false },
        "referenced, ConfigMap gone: written back, istiod renders nothing meanwhile"
    );
    let theirs: ParametersRef = (String::new(), "ConfigMap".into(), "edge-tuning".into());
    assert_eq!(
        decide_gateway(&want, true, Some(&theirs), &own, Some(&want)),
        GatewayPlan::Foreign("ConfigMap/edge-tuning".into())
    );
    let other_kind: ParametersRef = ("example.com".into(), "Params".into(), own.clone());
    assert!(!is_own(&other_kind, &own));
    let advice = gateway_advice(&gw("edge", "public"), "ConfigMap/edge-tuning", &want);
    assert!(
        advice.starts_with("Gateway edge/public already references ConfigMap/edge-tuning"),
        "{advice}"
    );
    assert!(
        advice.contains("horizontalPodAutoscaler: |\n  spec: {}"),
        "{advice}"
    );
    // Names that do not fit into one are hashed, stably.
    let long = "g".repeat(250);
    let hashed = gateway_config_map_name("prod", &long);
    assert!(hashed.len() <= 253 && hashed.starts_with("meshwarden-"));
    assert_eq!(hashed, gateway_config_map_name("prod", &long));
}

#[test]
fn the_gateway_apply_sends_only_the_reference_or_nothing() {
    let g = gw("edge", "public");
    assert_eq!(
        gateway_reference(&g, Some("meshwarden-prod-public")),
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "public", "namespace": "edge"},
            "spec": {"infrastructure": {"parametersRef": {"group": "", "kind": "ConfigMap", "name": "meshwarden-prod-public"}}},
        })
    );
    assert!(
        gateway_reference(&g, None).get("spec").is_none(),
        "giving the field up: an apply without it"
    );
    let data = gateway_overlays(&posture("{replicas: {min: 2}}"), "prod");
    let cm = gateway_config_map("prod", &g, &data, None);
    assert_eq!(cm["metadata"]["name"], "meshwarden-prod-public");
    assert_eq!(cm["metadata"]["namespace"], "edge");
    assert_eq!(cm["metadata"]["labels"][PARAMETERS_FOR], "public");
    assert_eq!(cm["metadata"]["labels"]["meshwarden.io/policy"], "prod");
    assert!(
        cm["metadata"]["labels"].get(DEFAULTS_FOR_CLASS).is_none(),
        "not class defaults"
    );
}

#[test]
fn what_istiod_rendered_from_a_gateways_parameters_goes_once_they_are_gone() {
    let r = |kind: &'static str, gateway: &str| Rendered {
        kind,
        namespace: "edge".into(),
        name: format!("{gateway}-istio"),
        class: "istio".into(),
        gateway: gateway.into(),
    };
    let rendered = vec![
        r("HorizontalPodAutoscaler", "public"),
        r("PodDisruptionBudget", "public"),
        r("HorizontalPodAutoscaler", "internal"),
    ];
    let live = LiveKeys {
        gateways: [(gw("edge", "public"), [HPA_KEY.to_string()].into())].into(),
        ..Default::default()
    };
    assert_eq!(
        left_behind(&rendered, &live),
        vec![
            r("HorizontalPodAutoscaler", "internal"),
            r("PodDisruptionBudget", "public"),
        ]
    );
    // The class's defaults still carry the budget: it stays.
    let both = LiveKeys {
        classes: [("istio".to_string(), [PDB_KEY.to_string()].into())].into(),
        ..live
    };
    assert_eq!(
        left_behind(&rendered, &both),
        vec![r("HorizontalPodAutoscaler", "internal")]
    );
}
