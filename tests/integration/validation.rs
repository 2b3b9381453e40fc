//! Invalid policies are rejected by the API server itself, with a message naming the field.
use kube::api::{Api, DynamicObject, PostParams};
use kube::discovery::ApiResource;

use crate::common;

/// (spec YAML, substring the error must contain: the offending field path)
const INVALID: &[(&str, &str)] = &[
    ("enforcement: Sometimes", "spec.enforcement"),
    (
        "controlPlane: {replicas: {min: 0}}",
        "spec.controlPlane.replicas.min",
    ),
    (
        "controlPlane: {disruptionBudget: {minAvailable: 1, maxUnavailable: 1}}",
        "spec.controlPlane.disruptionBudget",
    ),
    (
        "controlPlane: {disruptionBudget: {}}",
        "spec.controlPlane.disruptionBudget",
    ),
    (
        "controlPlane: {disruptionBudget: {maxUnavailable: 0}}",
        "spec.controlPlane.disruptionBudget.maxUnavailable",
    ),
    (
        "controlPlane: {disruptionBudget: {minAvailable: \"100%\"}}",
        "spec.controlPlane.disruptionBudget.minAvailable",
    ),
    (
        "controlPlane: {replicas: {min: 2}, disruptionBudget: {minAvailable: 2}}",
        "spec.controlPlane.disruptionBudget.minAvailable",
    ),
    (
        "controlPlane: {replicas: {min: 1}, disruptionBudget: {minAvailable: \"50%\"}}",
        "spec.controlPlane.disruptionBudget.minAvailable",
    ),
    (
        "controlPlane: {resources: {requests: {cpu: lots}}}",
        "spec.controlPlane.resources.requests.cpu",
    ),
    (
        "controlPlane: {resources: {requests: {memory: 2Gi}, limits: {memory: 1Gi}}}",
        "spec.controlPlane.resources.limits.memory",
    ),
    (
        "controlPlane: {namespace: Bad_NS}",
        "spec.controlPlane.namespace",
    ),
    (
        "controlPlane: {spread: {nodes: Always}}",
        "spec.controlPlane.spread.nodes",
    ),
    (
        "gateways: [{name: in, namespace: gw}]",
        "spec.gateways[0].selector",
    ),
    (
        "gateways: [{name: In Gress, namespace: gw, selector: {}}]",
        "spec.gateways[0].name",
    ),
    (
        "gateways: [{name: a, namespace: gw, selector: {}}, {name: a, namespace: gw2, selector: {}}]",
        "spec.gateways[1]",
    ),
    (
        "gateways: [{name: a, namespace: gw, selector: {}, replicas: {min: 3}, disruptionBudget: {minAvailable: 3}}]",
        "spec.gateways",
    ),
    (
        "gateways: [{name: a, namespace: gw, selector: {}, resources: {requests: {cpu: 2}, limits: {cpu: 1}}}]",
        "spec.gateways[0].resources.limits.cpu",
    ),
    (
        "sidecars: {resources: {}, maxConcurrentRollouts: 0}",
        "spec.sidecars.maxConcurrentRollouts",
    ),
    (
        "sidecars: {maxConcurrentRollouts: 1}",
        "spec.sidecars.resources",
    ),
    (
        "sidecars: {resources: {}, pacing: None}",
        "spec.sidecars.pacing",
    ),
    (
        "upgrades: {maxConcurrentRestarts: 0}",
        "spec.upgrades.maxConcurrentRestarts",
    ),
    ("upgrades: {maxMinorSkew: -1}", "spec.upgrades.maxMinorSkew"),
    ("mtls: {mode: DISABLE}", "spec.mtls.mode"),
    (
        "mtls: {mode: STRICT, scope: Namespaces}",
        "spec.mtls.namespaceSelector",
    ),
    (
        "mtls: {mode: STRICT, exemptions: [{namespace: m, selector: {}, ports: [{port: 70000, mode: PERMISSIVE}]}]}",
        "spec.mtls.exemptions[0].ports[0].port",
    ),
    (
        "mtls: {mode: STRICT, exemptions: [{namespace: m, ports: [{port: 9090, mode: PERMISSIVE}]}]}",
        "spec.mtls.exemptions[0].selector",
    ),
    (
        "mtls: {mode: STRICT, exemptions: [{namespace: m, selector: {}, ports: [{port: 1, mode: PERMISSIVE}, {port: 1, mode: STRICT}]}]}",
        "spec.mtls.exemptions[0].ports[1]",
    ),
    (
        "certificates: {warnBefore: 60d}",
        "spec.certificates.warnBefore",
    ),
    (
        "gatewayApi: {classes: [{className: istio, replicas: {min: 2}, disruptionBudget: {minAvailable: 2}}]}",
        "spec.gatewayApi.classes[0].disruptionBudget.minAvailable",
    ),
    (
        "gatewayApi: {classes: [{className: istio, replicas: {min: 3, max: 2}}]}",
        "spec.gatewayApi.classes[0].replicas.max",
    ),
    (
        "gatewayApi: {classes: [{className: Istio_Class}]}",
        "spec.gatewayApi.classes[0].className",
    ),
    ("gatewayApi: {classes: []}", "spec.gatewayApi.classes"),
    (
        "gatewayApi: {classes: [{className: istio}, {className: istio}]}",
        "spec.gatewayApi.classes[1]",
    ),
    (
        "gatewayApi: {gateways: [{name: Public_GW, namespace: edge}]}",
        "spec.gatewayApi.gateways[0].name",
    ),
    (
        "gatewayApi: {gateways: [{name: public}]}",
        "spec.gatewayApi.gateways[0].namespace",
    ),
    (
        "gatewayApi: {gateways: [{name: public, namespace: edge}, {name: public, namespace: edge}]}",
        "spec.gatewayApi.gateways[1]",
    ),
    (
        "gatewayApi: {gateways: [{name: public, namespace: edge, replicas: {min: 2}, disruptionBudget: {minAvailable: 2}}]}",
        "spec.gatewayApi.gateways[0].disruptionBudget.minAvailable",
    ),
    (
        "gatewayApi: {gateways: [{name: public, namespace: edge, replicas: {min: 3, max: 1}}]}",
        "spec.gatewayApi.gateways[0].replicas.max",
    ),
    ("gatewayApi: {gateways: []}", "spec.gatewayApi.gateways"),
    (
        "gatewayApi: {enforcement: Audit}",
        "declare classes, gateways or both",
    ),
    (
        "certificates: {warnBefore: \"1440\"}",
        "spec.certificates.warnBefore",
    ),
    (
        "certificates: {warnBefore: \"-720h\"}",
        "spec.certificates.warnBefore",
    ),
    ("ambient: {checks: []}", "spec.ambient.checks"),
    (
        "ambient: {checks: [Posture, Posture]}",
        "spec.ambient.checks[1]",
    ),
    ("ambient: {checks: [Readiness]}", "spec.ambient.checks[0]"),
    (
        "ambient: {namespace: Istio_System}",
        "spec.ambient.namespace",
    ),
];

#[tokio::test]
async fn invalid_policies_are_rejected_naming_the_field() {
    let env = common::env("invalid").await;
    let ar = ApiResource {
        group: "meshwarden.io".into(),
        version: "v1alpha1".into(),
        api_version: "meshwarden.io/v1alpha1".into(),
        kind: "MeshPolicy".into(),
        plural: "meshpolicies".into(),
    };
    let api: Api<DynamicObject> = Api::all_with(env.client.clone(), &ar);
    let mut failures = Vec::new();
    for (i, (spec, field)) in INVALID.iter().enumerate() {
        let spec: serde_json::Value = serde_yaml::from_str(spec).unwrap();
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "meshwarden.io/v1alpha1", "kind": "MeshPolicy",
            "metadata": {"name": format!("{}-{i}", env.id)}, "spec": spec
        }))
        .unwrap();
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => failures.push(format!("#{i} accepted: {spec}")),
            Err(kube::Error::Api(s)) => {
                if s.code != 422 || !s.message.contains(field) {
                    failures.push(format!(
                        "#{i} ({spec}): code {} message lacks {field}: {}",
                        s.code, s.message
                    ));
                }
            }
            Err(e) => failures.push(format!("#{i}: {e}")),
        }
    }
    assert!(INVALID.len() >= 15);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
