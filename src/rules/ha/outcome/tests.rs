//! Unit tests of the outcome judgement over small objects written as YAML.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;

use super::*;
use crate::rules::ha::nodes::NodeFacts;
use crate::rules::sidecars::{Kind, Placement};

fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
    serde_yaml::from_str(s).unwrap()
}

fn rules(spec: &str) -> HaRules {
    let g: crate::api::ControlPlaneSpec = yaml(&format!("{{{spec}}}"));
    HaRules {
        replicas: g.replicas,
        budget: g.disruption_budget,
        spread: g.spread,
        resources: None,
        container: "istio-proxy",
    }
}

fn deployment(replicas: i32, template_spec: &str) -> Deployment {
    yaml(&format!(
        "metadata: {{name: gw, namespace: gw-ns, generation: 1}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: gw}}}}
  template:
    metadata: {{labels: {{app: gw}}}}
    spec: {{containers: [{{name: istio-proxy}}], {template_spec}}}
status: {{observedGeneration: 1}}
"
    ))
}

/// A pod of the Deployment: on `node` (Ready when `ready`), or Pending with `unscheduled`.
fn pod(name: &str, node: Option<&str>, ready: bool, unscheduled: Option<&str>) -> Arc<PodFacts> {
    Arc::new(PodFacts {
        name: name.into(),
        owner: Some((Kind::Deployment, "gw".into())),
        labels: Default::default(),
        annotations: Default::default(),
        proxy: None,
        sidecar: None,
        placement: Placement {
            node: node.map(Box::from),
            ready,
            unscheduled: unscheduled.map(Box::from),
            terminating: false,
        },
        native_sidecar: false,
    })
}

fn obs(d: Deployment, pods: Vec<Arc<PodFacts>>) -> Observation {
    Observation {
        deployment: d,
        hpa: None,
        other_hpas: Vec::new(),
        pdbs: Vec::new(),
        pods,
    }
}

fn node(zone: &str, ready: bool, unschedulable: bool) -> Arc<NodeFacts> {
    Arc::new(NodeFacts {
        zone: Some(zone.into()),
        unschedulable,
        ready,
        taints: Vec::new(),
        labels: [(super::super::ZONE.to_string(), zone.to_string())].into(),
    })
}

/// a1, a2 in zone-a; b1 in zone-b; c1 in zone-c; all Ready and schedulable.
fn nodes() -> Nodes {
    [
        ("a1", node("zone-a", true, false)),
        ("a2", node("zone-a", true, false)),
        ("b1", node("zone-b", true, false)),
        ("c1", node("zone-c", true, false)),
    ]
    .into_iter()
    .map(|(n, f)| (n.to_string(), f))
    .collect()
}

/// Ready pods `gw-1`… on `nodes` in order, then `extra`.
fn serving(nodes: &[&str], extra: Vec<Arc<PodFacts>>) -> Vec<Arc<PodFacts>> {
    let mut pods: Vec<Arc<PodFacts>> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| pod(&format!("gw-{}", i + 1), Some(n), true, None))
        .collect();
    pods.extend(extra);
    pods
}

const SCHEDULER: &str = "0/6 nodes are available: 2 node(s) didn't match pod anti-affinity rules, 4 node(s) were unschedulable.";

#[test]
fn a_pending_replica_is_named_with_the_schedulers_message() {
    let o = obs(
        deployment(3, ""),
        serving(
            &["a1", "b1"],
            vec![pod("gw-3", None, false, Some(SCHEDULER))],
        ),
    );
    let got = judge(&rules("replicas: {min: 3}"), &o, Some(&nodes()));
    assert_eq!((got.available, got.wanted), (2, 3));
    assert_eq!(got.shortfalls.len(), 1, "{:?}", got.shortfalls);
    let s = &got.shortfalls[0];
    assert_eq!(s.reason, reasons::REPLICAS_UNAVAILABLE);
    assert_eq!(s.object, "Deployment/gw-ns/gw");
    assert!(
        s.message.starts_with("2 of 3 replica(s) available"),
        "{}",
        s.message
    );
    assert!(
        s.message
            .contains(&format!("pod gw-3 is Pending: {SCHEDULER}")),
        "{}",
        s.message
    );
}

#[test]
fn a_pod_that_cannot_be_placed_is_reported_while_the_old_pods_still_serve() {
    // A rollout's surge pod: three old pods serve, the new one fits nowhere.
    let o = obs(
        deployment(3, ""),
        serving(
            &["a1", "b1", "c1"],
            vec![pod("gw-4", None, false, Some(SCHEDULER))],
        ),
    );
    let got = judge(&rules("replicas: {min: 3}"), &o, Some(&nodes()));
    assert_eq!((got.available, got.wanted), (3, 3));
    assert_eq!(got.shortfalls.len(), 1, "{:?}", got.shortfalls);
    assert_eq!(
        got.shortfalls[0].message,
        format!(
            "3 of 3 replica(s) available (wanted: spec.replicas 3), but a rollout or scale-up cannot place its pods; pod gw-4 is Pending: {SCHEDULER}"
        )
    );
    // Pending but not refused by the scheduler (not tried yet): not a shortfall.
    let o = obs(
        deployment(3, ""),
        serving(&["a1", "b1", "c1"], vec![pod("gw-4", None, false, None)]),
    );
    assert!(judge(&rules(""), &o, Some(&nodes())).shortfalls.is_empty());
}

#[test]
fn a_pod_on_a_node_that_is_not_ready_does_not_serve() {
    let mut n = nodes();
    n.insert("b1".into(), node("zone-b", false, false));
    let o = obs(deployment(2, ""), serving(&["a1", "b1"], Vec::new()));
    let got = judge(&rules(""), &o, Some(&n));
    assert_eq!((got.available, got.wanted), (1, 2));
    assert!(
        got.shortfalls[0]
            .message
            .contains("pod gw-2 runs on node b1, which is NotReady"),
        "{:?}",
        got.shortfalls
    );
    // Without the nodes, the pod's own readiness is all there is.
    assert_eq!(judge(&rules(""), &o, None).available, 2);
    // No controller has reported on the Deployment yet: its pods may not be asked for.
    let mut new = obs(deployment(2, ""), Vec::new());
    new.deployment.status = None;
    let got = judge(&rules(""), &new, Some(&n));
    assert_eq!((got.available, got.wanted), (0, 2));
    assert!(got.shortfalls.is_empty(), "{:?}", got.shortfalls);
}

#[test]
fn the_hpas_desired_count_is_wanted_when_above_the_minimum_and_missing_pods_are_named() {
    let mut o = obs(deployment(3, ""), serving(&["a1", "b1", "c1"], Vec::new()));
    o.hpa = Some(yaml(
        "metadata: {name: gw, namespace: gw-ns}
spec: {minReplicas: 3, maxReplicas: 9, scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: gw}}
status: {currentReplicas: 3, desiredReplicas: 5}
",
    ));
    o.deployment.status = Some(yaml(
        "observedGeneration: 1
conditions: [{type: ReplicaFailure, status: 'True', reason: FailedCreate, message: 'pods \"gw-x\" is forbidden: exceeded quota: q'}]",
    ));
    let got = judge(&rules("replicas: {min: 3}"), &o, Some(&nodes()));
    assert_eq!((got.available, got.wanted), (3, 5));
    let m = &got.shortfalls[0].message;
    assert!(m.contains("the HorizontalPodAutoscaler's desired 5"), "{m}");
    assert!(
        m.contains("2 pod(s) not created: pods \"gw-x\" is forbidden: exceeded quota: q"),
        "{m}"
    );
}

#[test]
fn every_replica_on_one_node_is_a_spread_not_achieved_for_preferred_too() {
    let o = obs(deployment(2, ""), serving(&["a1", "a1"], Vec::new()));
    let got = judge(
        &rules("spread: {nodes: Preferred, zones: Off}"),
        &o,
        Some(&nodes()),
    );
    assert_eq!(got.shortfalls.len(), 1, "{:?}", got.shortfalls);
    assert_eq!(got.shortfalls[0].reason, reasons::SPREAD_NOT_ACHIEVED);
    assert!(
        got.shortfalls[0]
            .message
            .contains("all 2 scheduled pods run on node a1"),
        "{}",
        got.shortfalls[0].message
    );
    // Not asked for: not judged.
    let off = judge(
        &rules("spread: {nodes: Off, zones: Off}"),
        &o,
        Some(&nodes()),
    );
    assert!(off.shortfalls.is_empty(), "{:?}", off.shortfalls);
    assert!(judge(&rules(""), &o, Some(&nodes())).shortfalls.is_empty());
}

#[test]
fn one_zone_is_a_violation_only_while_another_zone_could_take_the_pods() {
    let o = obs(deployment(2, ""), serving(&["a1", "a2"], Vec::new()));
    let spread = rules("spread: {nodes: Required, zones: Preferred}");
    let got = judge(&spread, &o, Some(&nodes()));
    assert_eq!(got.zones, 1);
    assert_eq!(got.shortfalls.len(), 1, "{:?}", got.shortfalls);
    let m = &got.shortfalls[0].message;
    assert!(
        m.contains("all 2 scheduled pods run in zone zone-a while nodes in zone(s) zone-b, zone-c could take them"),
        "{m}"
    );
    // Cordoned or NotReady elsewhere: one zone is all the cluster offers.
    let mut closed = nodes();
    closed.insert("b1".into(), node("zone-b", true, true));
    closed.insert("c1".into(), node("zone-c", false, false));
    assert!(judge(&spread, &o, Some(&closed)).shortfalls.is_empty());
    // A taint the pods do not tolerate closes a node; one they tolerate does not.
    let mut tainted = closed.clone();
    let mut c = (*node("zone-c", true, false)).clone();
    c.taints.push(crate::rules::ha::nodes::Taint {
        key: "dedicated".into(),
        value: Some("batch".into()),
        effect: "NoSchedule".into(),
    });
    tainted.insert("c1".into(), Arc::new(c));
    assert!(judge(&spread, &o, Some(&tainted)).shortfalls.is_empty());
    let tolerant = obs(
        deployment(
            2,
            "tolerations: [{key: dedicated, operator: Equal, value: batch, effect: NoSchedule}]",
        ),
        o.pods.clone(),
    );
    let got = judge(&spread, &tolerant, Some(&tainted));
    assert!(
        got.shortfalls[0].message.contains("zone(s) zone-c could"),
        "{:?}",
        got.shortfalls
    );
    // A nodeSelector the other zones' nodes lack closes them too.
    let pinned = obs(
        deployment(2, "nodeSelector: {topology.kubernetes.io/zone: zone-a}"),
        o.pods.clone(),
    );
    assert!(
        judge(&spread, &pinned, Some(&nodes()))
            .shortfalls
            .is_empty()
    );
}

fn pdb(allowed: i32, observed: i64, policy: Option<&str>) -> PodDisruptionBudget {
    let policy = policy.map_or(String::new(), |p| {
        format!(", unhealthyPodEvictionPolicy: {p}")
    });
    yaml(&format!(
        "metadata: {{name: gw-meshwarden, namespace: gw-ns, generation: 2, labels: {{app.kubernetes.io/managed-by: meshwarden}}}}
spec: {{maxUnavailable: 1, selector: {{matchLabels: {{app: gw}}}}{policy}}}
status: {{disruptionsAllowed: {allowed}, currentHealthy: 2, desiredHealthy: 2, expectedPods: 3, observedGeneration: {observed}}}
"
    ))
}

#[test]
fn a_budget_at_zero_names_the_nodes_whose_drain_it_blocks() {
    let pods = serving(&["a1", "b1"], vec![pod("gw-3", Some("c1"), false, None)]);
    let mut o = obs(deployment(3, ""), pods);
    o.pdbs = vec![pdb(0, 2, Some("AlwaysAllow"))];
    let got = judge(&rules(""), &o, Some(&nodes()));
    assert_eq!(got.disruptions_allowed, Some(0));
    let s = got
        .shortfalls
        .iter()
        .find(|s| s.reason == reasons::DRAIN_BLOCKED)
        .expect("DrainBlocked");
    assert_eq!(s.object, "PodDisruptionBudget/gw-ns/gw-meshwarden");
    assert_eq!(s.target, "Deployment/gw-ns/gw");
    // Under AlwaysAllow the pod that is not Ready can be evicted: c1 drains.
    assert!(
        s.message.contains(
            "allows no disruption (2 healthy, 2 required; meshwarden's budget): draining node(s) a1, b1 blocks until pod gw-3 on node c1 is not Ready"
        ),
        "{}",
        s.message
    );
    // Without it, every node with a covered pod is held.
    o.pdbs = vec![pdb(0, 2, None)];
    let got = judge(&rules(""), &o, Some(&nodes()));
    let s = got
        .shortfalls
        .iter()
        .find(|s| s.reason == reasons::DRAIN_BLOCKED)
        .unwrap();
    assert!(
        s.message.contains("draining node(s) a1, b1, c1 blocks"),
        "{}",
        s.message
    );
    // Not computed for its generation yet, or allowing one: nothing.
    o.pdbs = vec![pdb(0, 1, None)];
    let got = judge(&rules(""), &o, Some(&nodes()));
    assert_eq!(got.disruptions_allowed, None);
    assert!(
        got.shortfalls
            .iter()
            .all(|s| s.reason != reasons::DRAIN_BLOCKED)
    );
    o.pdbs = vec![pdb(1, 2, None)];
    assert_eq!(
        judge(&rules(""), &o, Some(&nodes())).disruptions_allowed,
        Some(1)
    );
}

#[test]
fn a_shortfall_counts_once_it_outlasts_the_grace_period_and_is_forgotten_when_gone() {
    let since = Since::default();
    let s = |reason, object: &str| Shortfall {
        reason,
        object: object.into(),
        target: object.into(),
        message: String::new(),
    };
    let first = vec![s(reasons::REPLICAS_UNAVAILABLE, "Deployment/a/b")];
    let g = grade(
        &since,
        "p/GatewayHA",
        first.clone(),
        Duration::from_secs(60),
    );
    assert!(g.counted.is_empty());
    assert_eq!(g.waiting.len(), 1);
    assert!(g.recheck.unwrap() <= Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(30));
    // Still there: its age grows from the first sighting.
    let g = grade(
        &since,
        "p/GatewayHA",
        first.clone(),
        Duration::from_millis(20),
    );
    assert_eq!(g.counted, first);
    assert_eq!(g.recheck, None);
    // Gone once: seen again, it starts over.
    grade(&since, "p/GatewayHA", Vec::new(), Duration::ZERO);
    let g = grade(
        &since,
        "p/GatewayHA",
        first.clone(),
        Duration::from_millis(20),
    );
    assert!(g.counted.is_empty());
    // Another scope keeps its own memory.
    let g = grade(&since, "q/GatewayHA", first, Duration::ZERO);
    assert_eq!(g.counted.len(), 1);
}

#[test]
fn the_most_pressing_reason_wins() {
    let s = |reason| Shortfall {
        reason,
        object: String::new(),
        target: String::new(),
        message: String::new(),
    };
    assert_eq!(
        worst(&[s(reasons::SPREAD_NOT_ACHIEVED), s(reasons::DRAIN_BLOCKED)]),
        Some(reasons::DRAIN_BLOCKED)
    );
    assert_eq!(
        worst(&[
            s(reasons::SPREAD_NOT_ACHIEVED),
            s(reasons::REPLICAS_UNAVAILABLE)
        ]),
        Some(reasons::REPLICAS_UNAVAILABLE)
    );
    assert_eq!(worst(&[]), None);
}

#[test]
fn rebalancing_picks_a_serving_pod_only_when_asked_and_nothing_is_short() {
    use crate::rules::ha::rebalance::pick;
    let o = obs(deployment(2, ""), serving(&["a1", "a2"], Vec::new()));
    let evict = rules("spread: {nodes: Off, zones: Preferred, rebalance: Evict}");
    let got = judge(&evict, &o, Some(&nodes()));
    assert_eq!(got.shortfalls[0].reason, reasons::SPREAD_NOT_ACHIEVED);
    assert_eq!(pick(&evict, &o, &got).as_deref(), Some("gw-2"));
    // Report only by default.
    let report = rules("spread: {nodes: Off, zones: Preferred}");
    assert_eq!(pick(&report, &o, &judge(&report, &o, Some(&nodes()))), None);
    // A replica short, or a budget at zero: nothing is evicted.
    let short = obs(deployment(3, ""), o.pods.clone());
    assert_eq!(
        pick(&evict, &short, &judge(&evict, &short, Some(&nodes()))),
        None
    );
    let mut closed = got.clone();
    closed.disruptions_allowed = Some(0);
    assert_eq!(pick(&evict, &o, &closed), None);
    // Only a serving, scheduled pod is chosen.
    let mixed = obs(
        deployment(2, ""),
        serving(&["a1", "a2"], vec![pod("gw-9", None, false, None)]),
    );
    let got = judge(&evict, &mixed, Some(&nodes()));
    assert_eq!(pick(&evict, &mixed, &got).as_deref(), Some("gw-2"));
}
