//! The section's decision, from DaemonSets and pods as the API server returns them (no server).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Pod, Toleration};
use serde_json::json;

use super::facts::{Component, DataPlaneFacts, tolerates_every};
use super::plan::{self, AmbientPods, Seen, ambient_nodes, concerns, is_ambient};
use crate::api::AmbientCheck;
use crate::istio::Revisions;
use crate::rules::sidecars::PodFacts;
use crate::status::conditions::Status;
use crate::status::reasons;

const ALL: [AmbientCheck; 3] = [
    AmbientCheck::Posture,
    AmbientCheck::NodeCoverage,
    AmbientCheck::Versions,
];

/// A DaemonSet as Istio's chart renders it (and the API server defaults it), changed by
/// `edit`.
fn daemonset(component: &str, tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> DaemonSet {
    let (name, container, strategy) = match component {
        "ztunnel" => (
            "ztunnel",
            "istio-proxy",
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
        ),
        _ => (
            "istio-cni-node",
            "install-cni",
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}),
        ),
    };
    let mut v = json!({
        "metadata": {"name": name, "namespace": "istio-system",
                     "labels": {"app.kubernetes.io/name": component}},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "updateStrategy": strategy,
            "template": {
                "metadata": {"labels": {"app": name, "istio.io/dataplane-mode": "none"}},
                "spec": {
                    "priorityClassName": "system-node-critical",
                    "tolerations": [
                        {"effect": "NoSchedule", "operator": "Exists"},
                        {"key": "CriticalAddonsOnly", "operator": "Exists"},
                        {"effect": "NoExecute", "operator": "Exists"},
                    ],
                    "containers": [{
                        "name": container,
                        "image": format!("docker.io/istio/{component}:{tag}"),
                        "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}},
                    }],
                },
            },
        },
        "status": {"desiredNumberScheduled": 2, "numberReady": 2, "currentNumberScheduled": 2,
                   "numberMisscheduled": 0},
    });
    edit(&mut v);
    serde_json::from_value(v).unwrap()
}

fn facts(d: &DaemonSet) -> (String, Arc<DataPlaneFacts>) {
    (
        d.metadata.name.clone().unwrap(),
        Arc::new(DataPlaneFacts::from(d)),
    )
}

fn pod(
    name: &str,
    node: &str,
    ready: bool,
    labels: serde_json::Value,
    owner: Option<&str>,
) -> PodFacts {
    let owners = owner
        .map(|o| json!([{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": o, "uid": "u"}]));
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels, "ownerReferences": owners},
        "spec": {"nodeName": node, "containers": [{"name": "app"}]},
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    }))
    .unwrap();
    PodFacts::from(&p)
}

/// A Ready pod on `node` labelled `istio.io/dataplane-mode: <mode>`.
fn labelled(name: &str, node: &str, mode: &str) -> PodFacts {
    pod(
        name,
        node,
        true,
        json!({"istio.io/dataplane-mode": mode}),
        None,
    )
}

/// Asserts that `text` contains `part`.
fn contains(text: &str, part: &str) {
    assert!(text.contains(part), "{part:?} is not in: {text}");
}

fn revisions(version: &str) -> Revisions {
    Revisions {
        live: [(
            "default".to_string(),
            BTreeSet::from(["istio-system".to_string()]),
        )]
        .into(),
        versions: [("default".to_string(), BTreeSet::from([version.to_string()]))].into(),
        ..Revisions::default()
    }
}

/// ztunnel and istio-cni as the charts render them, at istiod's version, Ready on nodes a and
/// b; an ambient pod on node a.
fn healthy() -> Seen {
    let mut pods = Vec::new();
    for node in ["a", "b"] {
        pods.push(Arc::new(pod(
            &format!("ztunnel-{node}"),
            node,
            true,
            json!({}),
            Some("ztunnel"),
        )));
        pods.push(Arc::new(pod(
            &format!("cni-{node}"),
            node,
            true,
            json!({}),
            Some("istio-cni-node"),
        )));
    }
    Seen {
        namespace: "istio-system".into(),
        daemonsets: vec![
            facts(&daemonset("ztunnel", "1.31.0", |_| {})),
            facts(&daemonset("istio-cni", "1.31.0", |_| {})),
        ],
        pods,
        ambient_nodes: [(
            "a".to_string(),
            AmbientPods {
                count: 1,
                first: "app/web".into(),
            },
        )]
        .into(),
        revisions: revisions("1.31.2"),
    }
}

#[test]
fn the_charts_settings_hold() {
    let seen = healthy();
    let p = plan::plan(&ALL, &seen);
    assert_eq!(p.findings, vec![]);
    assert_eq!(
        (p.targets, p.compliant),
        (3, 3),
        "two DaemonSets and one node"
    );
    let r = plan::report(&ALL, &seen, &p);
    assert_eq!(r.condition.status, Status::True);
    assert_eq!(r.condition.reason, reasons::COMPLIANT);
    contains(
        &r.condition.message,
        "DaemonSet/istio-system/ztunnel 1.31.0 (2/2 Ready)",
    );
    assert!(r.violations.is_empty());
}

#[test]
fn posture_drift_is_named_field_by_field() {
    let mut seen = healthy();
    seen.daemonsets[0] = facts(&daemonset("ztunnel", "1.31.0", |v| {
        let spec = &mut v["spec"];
        spec["updateStrategy"] =
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}});
        let pod = &mut spec["template"]["spec"];
        pod["priorityClassName"] = json!(null);
        pod["tolerations"] = json!([{"key": "CriticalAddonsOnly", "operator": "Exists"}]);
        pod["containers"][0]["resources"] = json!({"requests": {"cpu": "200m"}});
    }));
    let p = plan::plan(&ALL, &seen);
    assert_eq!(
        p.findings.len(),
        1,
        "one violation per DaemonSet: {:?}",
        p.findings
    );
    let f = &p.findings[0];
    assert_eq!(f.reason, reasons::DATA_PLANE_POSTURE_DRIFT);
    assert_eq!(f.object, "DaemonSet/istio-system/ztunnel");
    for part in [
        "priorityClassName is unset, not system-node-critical",
        "do not tolerate every NoSchedule and NoExecute taint",
        "container istio-proxy has no memory request",
        "maxUnavailable 1 (maxSurge 0)",
    ] {
        contains(&f.message, part);
    }
    assert_eq!(p.compliant, 2);
    let r = plan::report(&ALL, &seen, &p);
    assert_eq!(r.condition.status, Status::False);
    assert_eq!(r.condition.reason, reasons::DATA_PLANE_POSTURE_DRIFT);
    // Without the Posture check the same DaemonSet holds.
    let p = plan::plan(&[AmbientCheck::NodeCoverage], &seen);
    assert!(p.findings.is_empty(), "{:?}", p.findings);
}

#[test]
fn cni_rolls_with_one_unavailable_but_not_on_delete() {
    let mut seen = healthy();
    assert!(plan::plan(&ALL, &seen).findings.is_empty());
    seen.daemonsets[1] = facts(&daemonset("istio-cni", "1.31.0", |v| {
        v["spec"]["updateStrategy"] = json!({"type": "OnDelete"});
    }));
    let p = plan::plan(&ALL, &seen);
    assert_eq!(p.findings.len(), 1);
    contains(&p.findings[0].message, "updateStrategy is OnDelete");
    assert_eq!(
        p.findings[0].object,
        "DaemonSet/istio-system/istio-cni-node"
    );
}

#[test]
fn tolerations_of_every_taint() {
    let t = |v: serde_json::Value| serde_json::from_value::<Vec<Toleration>>(v).unwrap();
    assert!(tolerates_every(
        &t(json!([{"operator": "Exists"}])),
        "NoExecute"
    ));
    assert!(tolerates_every(
        &t(json!([{"operator": "Exists", "effect": "NoSchedule"}])),
        "NoSchedule"
    ));
    assert!(!tolerates_every(
        &t(json!([{"operator": "Exists", "effect": "NoSchedule"}])),
        "NoExecute"
    ));
    assert!(!tolerates_every(
        &t(json!([{"key": "k", "operator": "Exists"}])),
        "NoSchedule"
    ));
    assert!(!tolerates_every(
        &t(json!([{"key": "", "operator": "Equal", "value": ""}])),
        "NoSchedule"
    ));
}

#[test]
fn a_node_with_ambient_pods_and_no_ready_ztunnel() {
    let mut seen = healthy();
    // Node c runs ambient pods and no agent; node b's ztunnel is not Ready.
    seen.ambient_nodes.insert(
        "b".into(),
        AmbientPods {
            count: 2,
            first: "app/a".into(),
        },
    );
    seen.ambient_nodes.insert(
        "c".into(),
        AmbientPods {
            count: 1,
            first: "app/c".into(),
        },
    );
    seen.pods[2] = Arc::new(pod("ztunnel-b", "b", false, json!({}), Some("ztunnel")));
    let p = plan::plan(&ALL, &seen);
    let objects: Vec<(&str, &str)> = p
        .findings
        .iter()
        .map(|f| (f.reason, f.object.as_str()))
        .collect();
    assert_eq!(
        objects,
        vec![
            (reasons::DATA_PLANE_NOT_READY, "Node/b"),
            (reasons::DATA_PLANE_NOT_READY, "Node/c"),
            (reasons::DATA_PLANE_NOT_READY, "Node/c"),
        ],
        "{:?}",
        p.findings
    );
    contains(
        &p.findings[0].message,
        "runs 2 ambient pod(s) (app/a first) without a Ready ztunnel pod (ztunnel-b is not Ready)",
    );
    contains(&p.findings[1].message, "no ztunnel pod runs there");
    contains(&p.findings[2].message, "without a Ready istio-cni pod");
    // Two DaemonSets and node a comply.
    assert_eq!((p.targets, p.compliant), (5, 3));
    let r = plan::report(&ALL, &seen, &p);
    assert_eq!(r.condition.reason, reasons::DATA_PLANE_NOT_READY);
    assert!(
        r.condition.message.starts_with("Node/b: runs 2"),
        "{}",
        r.condition.message
    );
}

#[test]
fn nodes_beyond_the_limit_share_one_violation() {
    let mut seen = healthy();
    seen.daemonsets.truncate(1);
    seen.pods.clear();
    seen.ambient_nodes = (0..13)
        .map(|i| {
            (
                format!("n{i:02}"),
                AmbientPods {
                    count: 1,
                    first: format!("app/p{i}"),
                },
            )
        })
        .collect();
    let p = plan::plan(&[AmbientCheck::NodeCoverage], &seen);
    let not_ready: Vec<&str> = p
        .findings
        .iter()
        .filter(|f| f.reason == reasons::DATA_PLANE_NOT_READY)
        .map(|f| f.object.as_str())
        .collect();
    assert_eq!(not_ready.len(), plan::MAX_NODES + 1);
    assert_eq!(not_ready[plan::MAX_NODES], "Node/n10 and 2 more");
    assert_eq!(p.compliant, 1, "the ztunnel DaemonSet; no node");
}

#[test]
fn a_missing_agent_and_no_agent_at_all() {
    let mut seen = healthy();
    seen.daemonsets.truncate(1);
    let p = plan::plan(&ALL, &seen);
    assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
    assert_eq!(p.findings[0].reason, reasons::DATA_PLANE_COMPONENT_MISSING);
    assert_eq!(p.findings[0].object, "DaemonSet/istio-system/istio-cni");
    seen.daemonsets.clear();
    let r = plan::report(&ALL, &seen, &plan::plan(&ALL, &seen));
    assert_eq!(
        (r.condition.status, r.condition.reason.as_str()),
        (Status::False, reasons::NO_TARGETS)
    );
    contains(&r.condition.message, "set ambient.namespace");
}

#[test]
fn versions_against_istiod() {
    let at = |tag: &str, istiod: &str| {
        let f = DataPlaneFacts::from(&daemonset("ztunnel", tag, |_| {}));
        plan::version(Component::Ztunnel, &f, &revisions(istiod))
    };
    assert_eq!(at("1.31.0", "1.31.2"), None);
    assert_eq!(
        at("1.30.4", "1.31.2"),
        None,
        "one minor behind is supported"
    );
    assert_eq!(at("1.31-dev", "1.31-dev"), None);
    assert_eq!(at("latest", "1.31.2"), None, "not a version: not judged");
    let behind = at("1.29.0", "1.31.2").unwrap();
    contains(&behind, "2 minor versions behind istiod 1.31.2");
    let ahead = at("1.32.0", "1.31.2").unwrap();
    contains(&ahead, "newer than istiod 1.31.2");
    // A revision with no istiod.
    let f = DataPlaneFacts::from(&daemonset("ztunnel", "1.31.0", |v| {
        v["metadata"]["annotations"] = json!({"istio.io/rev": "gone"});
    }));
    assert_eq!(f.revision, "gone");
    let gone = plan::version(Component::Ztunnel, &f, &revisions("1.31.0")).unwrap();
    contains(
        &gone,
        "revision gone (istio.io/rev) names no running istiod",
    );
}

#[test]
fn ambient_pods_by_namespace_and_pod_label() {
    let web = pod("web", "a", true, json!({}), None);
    let out = labelled("out", "b", "none");
    let opted_in = labelled("in", "c", "ambient");
    assert!(is_ambient(Some("ambient"), &web));
    assert!(!is_ambient(Some("ambient"), &out), "opted out per pod");
    assert!(is_ambient(None, &opted_in), "opted in per pod");
    assert!(!is_ambient(None, &web));
    let modes: BTreeMap<&str, &str> = [("amb", "ambient")].into();
    let pods = [
        ("amb", &web),
        ("amb", &out),
        ("plain", &opted_in),
        ("plain", &web),
    ];
    let nodes = ambient_nodes(pods.iter().map(|(n, p)| (*n, *p)), |n| {
        modes.get(n).copied()
    });
    assert_eq!(
        nodes,
        [
            (
                "a".to_string(),
                AmbientPods {
                    count: 1,
                    first: "amb/web".into()
                }
            ),
            (
                "c".to_string(),
                AmbientPods {
                    count: 1,
                    first: "plain/in".into()
                }
            ),
        ]
        .into()
    );
}

#[test]
fn changes_that_concern_the_section() {
    let agent = pod("ztunnel-a", "a", true, json!({}), Some("ztunnel"));
    let web = pod("web", "a", true, json!({}), None);
    let opted_in = labelled("in", "a", "ambient");
    let opted_out = labelled("out", "a", "none");
    assert!(concerns(None, &agent));
    assert!(concerns(Some("ambient"), &web));
    assert!(concerns(None, &opted_in));
    assert!(!concerns(None, &web), "a pod outside ambient");
    assert!(!concerns(Some("ambient"), &opted_out));
}
