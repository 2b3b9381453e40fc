//! Once started, the operator reads from its watch caches: drift corrections and reconciles
//! of every section send no LIST to the API server (its audit log records the operator's
//! lists and watches on this test's own plane), and the churn of pods with a sidecar costs no
//! reconcile. The operator runs as its binary.
use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use meshwarden::api::MeshPolicy;
use serde_json::json;

#[path = "support/operator.rs"]
mod operator;
use operator::{Replica, eventually, http_get};

const CPU: &str = "sidecar.istio.io/proxyCPU";

const POLICY: &str = "apiVersion: meshwarden.io/v1alpha1
kind: MeshPolicy
metadata: {name: steady}
spec:
  enforcement: Enforce
  controlPlane:
    namespace: istio-system
    replicas: {min: 2}
    disruptionBudget: {maxUnavailable: 1}
  sidecars:
    pacing: 'Off'
    resources: {requests: {cpu: 100m, memory: 128Mi}}
  mtls: {mode: STRICT, scope: Mesh}
  upgrades: {maxMinorSkew: 1}
  certificates: {warnBefore: 720h}
  gatewayApi:
    classes: [{className: istio, replicas: {min: 2}, disruptionBudget: {maxUnavailable: 1}}]
    gateways: [{namespace: edge, name: public}, {namespace: edge, name: later}]
  ambient: {}
  resilience: {outlierDetection: Required}
  security: {defaultDeny: Required}
";

/// The operator's LIST requests in the audit log from entry `from` on, by URI.
fn lists_since(plane: &testplane::Plane, from: usize) -> Vec<String> {
    plane
        .audit_events()
        .into_iter()
        .skip(from)
        .filter(|e| e["user"]["username"] == "meshwarden-operator")
        .filter(|e| e["verb"] == "list" && e["stage"] == "ResponseComplete")
        .map(|e| e["requestURI"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Gateway `name` of class `istio` in namespace `edge` (created with it).
fn gateway(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: edge}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: edge}}\n\
         spec: {{gatewayClassName: istio, listeners: [{{name: http, port: 80, protocol: HTTP}}]}}\n"
    )
}

async fn hpa_min(hpas: &Api<HorizontalPodAutoscaler>) -> Option<i32> {
    hpas.get("istiod").await.ok()?.spec?.min_replicas
}

async fn cpu_annotation(deployments: &Api<Deployment>) -> Option<String> {
    let d = deployments.get("web").await.ok()?;
    d.spec?.template.metadata?.annotations?.get(CPU).cloned()
}

/// The `istio-ca-root-cert` ConfigMap istiod would write into `namespace`, with a root
/// valid for `days`.
async fn root_config_map(admin: &kube::Client, namespace: &str, days: i64) {
    let now = testplane::certs::unix_now();
    let pem = testplane::certs::root_certificate(namespace, None, now, now + days * 86_400);
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio-ca-root-cert", "namespace": namespace},
        "data": {"root-cert.pem": pem.unwrap()}});
    testplane::apply_yaml(admin, &serde_yaml::to_string(&cm).unwrap(), &[])
        .await
        .unwrap();
}

#[tokio::test]
async fn reconciles_after_start_up_send_no_list() {
    let dir = testplane::scratch_dir("steady");
    let plane = testplane::Plane::start_auditing_reads(&dir, testplane::Lifetime::Attached)
        .await
        .expect("start kube-apiserver (run hack/build-k8s-bins.sh first)");
    let admin = plane.client().await.unwrap();
    testplane::apply_yaml(&admin, &meshwarden::api::crd_yaml().unwrap(), &[])
        .await
        .unwrap();
    testplane::apply_yaml(
        &admin,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n",
        &[],
    )
    .await
    .unwrap();
    let rendered = testplane::istio::fixture("base.yaml").unwrap();
    testplane::apply_yaml(&admin, &rendered, &[]).await.unwrap();
    // istiod as Helm renders it (Deployment, HPA, PDB) and ztunnel's DaemonSet, loaded into
    // istio-system.
    let istiod = testplane::istio::fixture("istiod-default.yaml").unwrap();
    let ztunnel = testplane::istio::fixture("ztunnel.yaml").unwrap();
    let mut keep = String::new();
    for doc in istiod.split("\n---").chain(ztunnel.split("\n---")) {
        let Ok(mut v) = serde_yaml::from_str::<serde_json::Value>(doc) else {
            continue;
        };
        let kind = v["kind"].as_str().unwrap_or_default();
        if ![
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "DaemonSet",
        ]
        .contains(&kind)
        {
            continue;
        }
        v["metadata"]["namespace"] = json!("istio-system");
        keep.push_str("---\n");
        keep.push_str(&serde_yaml::to_string(&v).unwrap());
    }
    testplane::apply_yaml(&admin, &keep, &[]).await.unwrap();
    testplane::apply_yaml(
        &admin,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio-injection: enabled}}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    \
         spec: {containers: [{name: web, image: web}]}\n",
        &[],
    )
    .await
    .unwrap();
    // The root istiod would write into the namespace (the certificates section's watch).
    root_config_map(&admin, "shop", 400).await;
    // Gateway API: one of the two Gateways the policy selects by name exists.
    testplane::apply_yaml(&admin, &testplane::istio::gateway_api_crds().unwrap(), &[])
        .await
        .unwrap();
    testplane::apply_yaml(&admin, &gateway("public"), &[])
        .await
        .unwrap();
    let policies: Api<MeshPolicy> = Api::all(admin.clone());
    policies
        .create(&Default::default(), &serde_yaml::from_str(POLICY).unwrap())
        .await
        .unwrap();

    let operator = Replica::start(&plane.operator_kubeconfig, "operator", &dir, &[]);
    // Polled closely: what the operator lists after this point, it listed after readiness.
    let ready_by = std::time::Instant::now() + Duration::from_secs(30);
    while http_get(operator.port, "/readyz").await.is_none() {
        assert!(std::time::Instant::now() < ready_by, "not ready after 30 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let from_ready = plane.audit_events().len();
    let conditions = |p: &MeshPolicy| -> BTreeMap<String, String> {
        p.status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .map(|c| (c.type_.clone(), format!("{}/{}", c.status, c.reason)))
            .collect()
    };
    eventually(
        60,
        "every section evaluated, the sidecars rollout started",
        || async {
            let c = conditions(&policies.get("steady").await.ok()?);
            // No controller rolls Deployments out here: the sidecars section waits for the
            // rollout it started.
            let is = |t: &str, prefix: &str| c.get(t).is_some_and(|v| v.starts_with(prefix));
            (is("ControlPlaneHA", "True/")
                && is("MutualTLS", "True/")
                && is("Upgrades", "True/")
                && is("Certificates", "True/")
                && is("GatewayAPIHA", "False/GatewayNotFound")
                && is("AmbientDataPlane", "False/DataPlaneComponentMissing")
                // The `kubernetes` Service has no DestinationRule.
                && is("Resilience", "False/MinimumsNotMet")
                && is("Security", "False/")
                && is("SidecarResources", "False/RolloutInProgress"))
            .then_some(())
        },
    )
    .await;
    let from = plane.audit_events().len();

    // HA drift: an HPA lowered by hand is raised again.
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(admin.clone(), "istio-system");
    let edit = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    hpas.patch(
        "istiod",
        &edit,
        &Patch::Merge(json!({"spec": {"minReplicas": 1}})),
    )
    .await
    .unwrap();
    eventually(30, "the HPA raised again", || async {
        (hpa_min(&hpas).await? == 2).then_some(())
    })
    .await;
    // Sidecars drift: a removed proxy annotation comes back.
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), "shop");
    deployments
        .patch(
            "web",
            &edit,
            &Patch::Merge(
                json!({"spec": {"template": {"metadata": {"annotations": {CPU: null}}}}}),
            ),
        )
        .await
        .unwrap();
    eventually(30, "the annotation restored", || async {
        (cpu_annotation(&deployments).await? == "100m").then_some(())
    })
    .await;
    // mTLS: a new namespace and a PERMISSIVE override are read and reported.
    testplane::apply_yaml(
        &admin,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n---\n\
         apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: legacy}\n\
         spec: {mtls: {mode: PERMISSIVE}}\n",
        &[],
    )
    .await
    .unwrap();
    eventually(30, "the override reported", || async {
        let p = policies.get("steady").await.ok()?;
        let s = p.status?;
        s.violations
            .iter()
            .any(|v| v.object.contains("legacy"))
            .then_some(())
    })
    .await;

    // Pods with a sidecar coming and going, the churn of a healthy mesh, trigger no
    // reconcile; a pod without one (a possible plain-text client) does.
    let reconciles = || async {
        operator
            .metric("meshwarden_reconciles_total")
            .await
            .unwrap_or(-1.0)
    };
    let mut settled = reconciles().await;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = reconciles().await;
        if now == settled {
            break;
        }
        settled = now;
    }
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "shop");
    let pod = |name: &str, injected: bool| -> Pod {
        let annotations = match injected {
            true => json!({"sidecar.istio.io/status": "{}"}),
            false => json!({}),
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "web"}, "annotations": annotations},
            "spec": {"containers": [{"name": "web", "image": "web"}]},
        }))
        .unwrap()
    };
    let now = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    for i in 0..10 {
        let name = format!("web-{i}");
        pods.create(&PostParams::default(), &pod(&name, true))
            .await
            .unwrap();
        pods.delete(&name, &now).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        reconciles().await,
        settled,
        "pods with a sidecar triggered reconciles"
    );
    pods.create(&PostParams::default(), &pod("plain", false))
        .await
        .unwrap();
    eventually(30, "a reconcile for the pod without a sidecar", || async {
        (reconciles().await > settled).then_some(())
    })
    .await;

    // Certificates: a new root within warnBefore is read from the watch and reported.
    root_config_map(&admin, "legacy", 10).await;
    eventually(30, "the expiring root reported", || async {
        let p = policies.get("steady").await.ok()?;
        p.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Certificates" && c.reason == "RootCertificateExpiring")
            .then_some(())
    })
    .await;

    // Ambient: a ztunnel DaemonSet edited by hand is read from the watch and reported.
    let daemonsets: Api<DaemonSet> = Api::namespaced(admin.clone(), "istio-system");
    daemonsets
        .patch(
            "ztunnel",
            &edit,
            &Patch::Merge(json!({"spec": {"template": {"spec": {"priorityClassName": null}}}})),
        )
        .await
        .unwrap();
    eventually(30, "the ztunnel drift reported", || async {
        let p = policies.get("steady").await.ok()?;
        p.status?
            .violations
            .iter()
            .any(|v| v.message.contains("priorityClassName is unset"))
            .then_some(())
    })
    .await;
    // Gateway API: the Gateway selected by name that was missing is created; it is read from
    // the watch, and gets its parameters.
    testplane::apply_yaml(&admin, &gateway("later"), &[])
        .await
        .unwrap();
    let gateways: Api<kube::api::DynamicObject> = Api::namespaced_with(
        admin.clone(),
        "edge",
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"),
            "gateways",
        ),
    );
    eventually(
        30,
        "the new Gateway found and given its parameters",
        || async {
            let p = policies.get("steady").await.ok()?;
            let found = !p
                .status?
                .conditions
                .iter()
                .any(|c| c.reason == "GatewayNotFound");
            let g = gateways.get("later").await.ok()?;
            let named = g.data["spec"]["infrastructure"]["parametersRef"]["name"].as_str()
                == Some("meshwarden-steady-later");
            (found && named).then_some(())
        },
    )
    .await;
    // Resilience: a root-namespace DestinationRule with outlier detection is read from the
    // watch, and every Service gets it.
    testplane::apply_yaml(
        &admin,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: default, namespace: istio-system}\n\
         spec: {host: '*.local', trafficPolicy: {outlierDetection: {consecutive5xxErrors: 5}}}\n",
        &[],
    )
    .await
    .unwrap();
    eventually(30, "every Service gets the root rule", || async {
        let p = policies.get("steady").await.ok()?;
        p.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Resilience" && c.reason == "Compliant")
            .then_some(())
    })
    .await;

    // Security: no Secret is read, only the CA Secrets' metadata, each listed and watched by
    // name (the requests' own record: the audit log has no Accept header).
    let secret_reads: Vec<String> = plane
        .audit_events()
        .into_iter()
        .filter(|e| e["user"]["username"] == "meshwarden-operator")
        .filter(|e| e["objectRef"]["resource"] == "secrets")
        .map(|e| format!("{} {}", e["verb"], e["requestURI"]))
        .collect();
    assert!(!secret_reads.is_empty(), "the CA Secrets were not watched");
    for r in &secret_reads {
        assert!(
            r.contains("fieldSelector=metadata.name%3Dcacerts")
                || r.contains("fieldSelector=metadata.name%3Distio-ca-secret"),
            "{r}"
        );
    }

    // The lazily started watches (report sections, Gateways), started at start-up for this
    // policy, listed before
    // readiness (the first reconcile would otherwise start them after it).
    let lazy: Vec<String> = lists_since(&plane, from_ready)
        .into_iter()
        .filter(|uri| {
            [
                "/destinationrules",
                "/virtualservices",
                "/api/v1/services",
                "/authorizationpolicies",
                "/secrets",
                "/gateways",
            ]
            .iter()
            .any(|r| uri.contains(r))
        })
        .collect();
    assert!(
        lazy.is_empty(),
        "the lazily started watches listed after readiness:\n{}",
        lazy.join("\n")
    );
    let lists = lists_since(&plane, from);
    assert!(
        lists.is_empty(),
        "the operator listed after start-up:\n{}\n{}",
        lists.join("\n"),
        operator.log_text()
    );
    drop(operator);
    drop(plane);
    let _ = std::fs::remove_dir_all(dir);
}
