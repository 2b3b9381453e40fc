//! The controller reports observedGeneration and conditions, follows updates, and a deleted
//! policy leaves the mesh as it was.
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};
use meshwarden::api::MeshPolicy;

use crate::common::{self, anti_affinity_terms, condition, container_resources, quantity};

const KINDS: &[&str] = common::HA_KINDS;

#[tokio::test]
async fn status_follows_generation_and_delete_is_clean() {
    let env = common::env("life").await;
    let ns = env.namespace("istio", &[]).await;
    env.load_fixture("istiod-fixed-replicas.yaml", &ns, KINDS)
        .await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!("controlPlane: {{namespace: {ns}, replicas: {{min: 2}}}}"),
    )
    .await;

    let first = env
        .wait_policy("p", 30, |p| {
            let s = p.status.as_ref()?;
            (s.observed_generation == Some(1) && condition(p, "Ready").is_some()).then(|| p.clone())
        })
        .await;
    let cp = condition(&first, "ControlPlaneHA").unwrap();
    assert_eq!(
        cp.status, "False",
        "Audit by default: the deviation is reported"
    );
    assert_eq!(cp.reason, "NonCompliant");
    assert!(
        cp.message
            .contains("replicas is 1, below the declared minimum 2"),
        "{}",
        cp.message
    );
    assert_eq!(cp.observed_generation, Some(1));
    assert_eq!(first.status.as_ref().unwrap().violation_count, 1);
    let sidecars = condition(&first, "SidecarResources").unwrap();
    assert_eq!(sidecars.reason, "NotConfigured");

    // An update bumps the generation; status follows with new conditions.
    let api: Api<MeshPolicy> = Api::all(env.client.clone());
    let name = env.policy_name("p");
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"enforcement": "Enforce"}})),
    )
    .await
    .unwrap();
    let second = env
        .wait_policy("p", 30, |p| {
            let c = condition(p, "ControlPlaneHA")?;
            (p.status.as_ref()?.observed_generation == Some(2) && c.status == "True")
                .then(|| p.clone())
        })
        .await;
    assert_eq!(condition(&second, "Ready").unwrap().status, "True");
    assert_eq!(
        condition(&second, "Ready").unwrap().observed_generation,
        Some(2)
    );
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let d = deployments.get("istiod").await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));

    // Deleting the policy changes nothing on the mesh, now or later.
    let before = common::operator_writes(Some(&ns), &[]).len();
    api.delete(&name, &Default::default()).await.unwrap();
    common::eventually(10, "policy deleted", || async {
        api.get_opt(&name).await.unwrap().is_none().then_some(())
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let d2 = deployments.get("istiod").await.unwrap();
    assert_eq!(
        d2.spec.as_ref().unwrap().replicas,
        Some(2),
        "values stay as they were"
    );
    assert_eq!(d2.metadata.generation, d.metadata.generation, "no rollout");
    assert_eq!(
        common::operator_writes(Some(&ns), &[]).len(),
        before,
        "no write after delete"
    );
    op.stop().await;
}

/// A shutdown also ends an operator whose policies could never be listed (here: an identity
/// without RBAC), which kube's controller alone would wait on forever.
#[tokio::test]
async fn shutdown_ends_an_operator_that_cannot_list_policies() {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    use meshwarden::context::Context;
    use meshwarden::controller::{self, State};
    use std::sync::Arc;
    let kc = Kubeconfig::read_from(&testplane::shared().kubeconfig).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    config.auth_info.impersonate = Some("meshwarden-test-nobody".into());
    let client = kube::Client::try_from(config).unwrap();
    let state = Arc::new(State::new(Context::new(client, None), None));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(controller::run(state, async move {
        let _ = rx.await;
    }));
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    tx.send(()).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), handle)
        .await
        .expect("the controller returns within 5 s of the shutdown signal")
        .unwrap();
}

async fn wait_cpu_request(api: &Api<Deployment>, name: &str, container: &str, cpu: &str) {
    common::eventually(20, "CPU request changed", || async {
        let d = api.get(name).await.unwrap();
        (quantity(&container_resources(&d, container).requests, "cpu").as_deref() == Some(cpu))
            .then_some(())
    })
    .await;
}

async fn edit_policy(env: &common::Env, name: &str, spec: serde_json::Value) {
    Api::<MeshPolicy>::all(env.client.clone())
        .patch(
            &env.policy_name(name),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": spec })),
        )
        .await
        .unwrap();
}

/// Issue 11 case 1: a policy edit, a switch to Audit and a delete never lower replicas or
/// remove a value meshwarden set before (server-side apply would reset a field its only
/// manager stops sending).
#[tokio::test]
async fn policy_edits_never_lower_or_remove_values() {
    let (env, ns, op) =
        common::with_fixture("keep", "istio", "istiod-fixed-replicas.yaml", KINDS).await;
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, replicas: {{min: 3}}, spread: {{nodes: Preferred, zones: Off}}, resources: {{requests: {{cpu: 500m}}, limits: {{memory: 4Gi}}}}}}"
        ),
    )
    .await;
    env.wait_settled("p", 30).await;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let d = deployments.get("istiod").await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));
    assert_eq!(anti_affinity_terms(&d), 1);

    // The policy stops declaring replicas and spread, and changes the CPU request.
    edit_policy(
        &env,
        "p",
        serde_json::json!({"controlPlane": {"replicas": null, "spread": {"nodes": "Off"}, "resources": {"requests": {"cpu": "600m"}}}}),
    )
    .await;
    wait_cpu_request(&deployments, "istiod", "discovery", "600m").await;
    env.wait_settled("p", 30).await;
    let d = deployments.get("istiod").await.unwrap();
    assert_eq!(
        d.spec.as_ref().unwrap().replicas,
        Some(3),
        "replicas stay at 3 when the policy stops declaring them"
    );
    assert_eq!(anti_affinity_terms(&d), 1, "the anti-affinity term stays");
    assert_eq!(
        quantity(&container_resources(&d, "discovery").limits, "memory").as_deref(),
        Some("4Gi")
    );

    // Limits leave the policy while the request changes again: the limit stays.
    edit_policy(
        &env,
        "p",
        serde_json::json!({"controlPlane": {"resources": {"limits": null, "requests": {"cpu": "700m"}}}}),
    )
    .await;
    wait_cpu_request(&deployments, "istiod", "discovery", "700m").await;
    env.wait_settled("p", 30).await;
    let d = deployments.get("istiod").await.unwrap();
    assert_eq!(
        quantity(&container_resources(&d, "discovery").limits, "memory").as_deref(),
        Some("4Gi"),
        "the memory limit stays when the policy stops declaring it"
    );
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));

    // Audit, then delete: nothing changes.
    let generation = d.metadata.generation;
    edit_policy(&env, "p", serde_json::json!({"enforcement": "Audit"})).await;
    env.wait_settled("p", 30).await;
    let api: Api<MeshPolicy> = Api::all(env.client.clone());
    api.delete(&env.policy_name("p"), &Default::default())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let d = deployments.get("istiod").await.unwrap();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(3));
    assert_eq!(anti_affinity_terms(&d), 1);
    assert_eq!(d.metadata.generation, generation, "no rollout");
    op.stop().await;
}

/// Zone spread that the policy turns `Off` and HPA bounds it stops declaring keep their values:
/// the zone topology spread constraint stays in the pod template (no rollout), and an HPA
/// whose maximum meshwarden raised along with its minimum keeps both. Checked after every step.
#[tokio::test]
async fn released_zone_spread_and_hpa_bounds_keep_their_values() {
    let (env, ns, op) =
        common::with_fixture("keepspread", "istio", "istiod-default.yaml", KINDS).await;
    // The chart's HPA is 1..5: a minimum of 7 raises the maximum to 7 too.
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, replicas: {{min: 7}}, spread: {{nodes: 'Off', zones: Preferred}}}}"
        ),
    )
    .await;
    env.wait_settled("p", 30).await;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), &ns);
    let zone_constraints = |d: &Deployment| {
        d.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.topology_spread_constraints.as_ref())
            .map_or(0, |c| {
                c.iter()
                    .filter(|c| c.topology_key == "topology.kubernetes.io/zone")
                    .count()
            })
    };
    let posture_kept = |step: &'static str| {
        let (deployments, hpas) = (deployments.clone(), hpas.clone());
        async move {
            let d = deployments.get("istiod").await.unwrap();
            assert_eq!(
                zone_constraints(&d),
                1,
                "{step}: the zone spread constraint"
            );
            let h = hpas.get("istiod").await.unwrap().spec.unwrap();
            assert_eq!(
                (h.min_replicas, h.max_replicas),
                (Some(7), 7),
                "{step}: the HPA bounds"
            );
            d.metadata.generation
        }
    };
    let generation = posture_kept("enforced").await;

    // Zone spread turned off: the constraint stays, the pods do not roll.
    edit_policy(
        &env,
        "p",
        serde_json::json!({"controlPlane": {"spread": {"zones": "Off"}}}),
    )
    .await;
    env.wait_converged("p", 30).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        posture_kept("zone spread off").await,
        generation,
        "zone spread off: no rollout"
    );

    // Replicas dropped: the HPA keeps its minimum and its raised maximum.
    edit_policy(
        &env,
        "p",
        serde_json::json!({"controlPlane": {"replicas": null}}),
    )
    .await;
    env.wait_converged("p", 30).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(posture_kept("replicas dropped").await, generation);

    // Audit, then delete: nothing changes.
    edit_policy(&env, "p", serde_json::json!({"enforcement": "Audit"})).await;
    env.wait_converged("p", 30).await;
    assert_eq!(posture_kept("Audit").await, generation);
    Api::<MeshPolicy>::all(env.client.clone())
        .delete(&env.policy_name("p"), &Default::default())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(posture_kept("policy deleted").await, generation);
    op.stop().await;
}

/// The same for a gateway: proxy limits that leave the policy stay on the gateway.
#[tokio::test]
async fn gateway_limits_stay_when_the_policy_drops_them() {
    let (env, ns, op) =
        common::with_fixture("keepgw", "ingress", "gateway-ingress.yaml", KINDS).await;
    let entry = |res: &str| {
        format!(
            "enforcement: Enforce\ngateways: [{{name: ingress, namespace: {ns}, selector: {{matchLabels: {{istio: ingressgateway}}}}, spread: {{nodes: Required, zones: Off}}, {res}}}]"
        )
    };
    env.create_policy(
        "p",
        &entry("resources: {requests: {cpu: 200m}, limits: {cpu: '3', memory: 1536Mi}}"),
    )
    .await;
    env.wait_settled("p", 30).await;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let spec = entry("spread: {nodes: 'Off'}, resources: {requests: {cpu: 300m}}");
    edit_policy(&env, "p", serde_yaml::from_str(&spec).unwrap()).await;
    wait_cpu_request(&deployments, "istio-ingressgateway", "istio-proxy", "300m").await;
    let d = deployments.get("istio-ingressgateway").await.unwrap();
    let limits = container_resources(&d, "istio-proxy").limits;
    assert_eq!(quantity(&limits, "memory").as_deref(), Some("1536Mi"));
    assert_eq!(quantity(&limits, "cpu").as_deref(), Some("3"));
    assert_eq!(anti_affinity_terms(&d), 1, "the required term stays");
    op.stop().await;
}

/// Issue 11 case 2: after meshwarden corrected a Helm release of istiod (HPA minimum 2 and the
/// chart's PDB `minAvailable: 1`; policy `replicas.min: 3`, `maxUnavailable: 1`, a CPU request),
/// `helm upgrade --reuse-values` still succeeds, and meshwarden restores the posture right after
/// without calling it a fight. The chart's PDB keeps its form; the condition says which chart
/// value declares the budget at the source.
async fn helm_upgrade_after_correction(prefix: &str, v3: bool) {
    let env = common::env(prefix).await;
    let ns = env.namespace("istio", &[]).await;
    let chart = testplane::istio::chart("istiod").display().to_string();
    let install = [
        "install",
        "istiod",
        chart.as_str(),
        "-n",
        ns.as_str(),
        "--set",
        "autoscaleMin=2",
        "--set",
        &format!("global.istioNamespace={ns}"),
        "--set",
        "global.operatorManageWebhooks=true",
    ];
    common::helm(v3, &install).unwrap_or_else(|e| panic!("helm install: {e}"));
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!("enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, replicas: {{min: 3}}, disruptionBudget: {{maxUnavailable: 1}}, resources: {{requests: {{cpu: 700m}}}}}}"),
    )
    .await;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &ns);
    let corrected = || async {
        let min = hpas.get("istiod").await.ok()?.spec?.min_replicas;
        let d = deployments.get("istiod").await.ok()?;
        let cpu = quantity(&container_resources(&d, "discovery").requests, "cpu");
        (min == Some(3) && cpu.as_deref() == Some("700m")).then_some(())
    };
    common::eventually(20, "istiod corrected", corrected).await;
    let p = env
        .wait_policy("p", 20, |p| {
            let c = condition(p, "ControlPlaneHA")?;
            c.message
                .contains("pdb.maxUnavailable=1")
                .then(|| p.clone())
        })
        .await;
    let c = condition(&p, "ControlPlaneHA").unwrap();
    assert!(
        c.message.contains("Helm release istiod")
            && c.message
                .contains("set autoscaleMin, pdb.maxUnavailable, resources in Helm release istiod"),
        "names the release and the values to set: {}",
        c.message
    );
    let chart_budget = || async {
        let s = budgets.get("istiod").await.unwrap().spec.unwrap();
        (s.min_available, s.max_unavailable)
    };
    assert_eq!(
        chart_budget().await,
        (Some(IntOrString::Int(1)), None),
        "the chart's PDB keeps its form"
    );

    // helm upgrade with unchanged values. Helm 4 applies server-side and reports conflicts
    // with meshwarden's fields; it is then run with --force-conflicts, as it asks.
    let reuse = [
        "upgrade",
        "istiod",
        chart.as_str(),
        "-n",
        ns.as_str(),
        "--reuse-values",
    ];
    let mut upgrade = reuse.to_vec();
    let result = match common::helm(v3, &upgrade) {
        Err(e) if !v3 && e.contains("conflict") => {
            upgrade.push("--force-conflicts");
            common::helm(v3, &upgrade)
        }
        other => other,
    };
    result.unwrap_or_else(|e| panic!("helm upgrade (Helm {}): {e}", if v3 { 3 } else { 4 }));
    common::eventually(10, "posture restored after the upgrade", corrected).await;
    assert_eq!(chart_budget().await, (Some(IntOrString::Int(1)), None));
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let p = env.wait_policy("p", 5, |p| Some(p.clone())).await;
    let c = condition(&p, "ControlPlaneHA").unwrap();
    assert_ne!(c.reason, "FightDetected", "{c:?}");

    // Fix it at the source: `meshwarden values` prints the release's values; after an upgrade
    // with them, the chart itself declares the posture and the section is compliant.
    let ctx = meshwarden::context::Context::new(env.client.clone(), None);
    let file = meshwarden::rules::ha::values::values_files(&ctx, Some(&env.policy_name("p")))
        .await
        .unwrap();
    assert!(
        file.contains("# Helm release istiod in namespace")
            && file.contains("autoscaleMin: 3")
            && file.contains("maxUnavailable: 1")
            && file.contains("cpu: 700m"),
        "{file}"
    );
    let path = std::env::temp_dir().join(format!("{ns}-values.yaml"));
    std::fs::write(&path, &file).unwrap();
    let path = path.display().to_string();
    let mut upgrade = reuse.to_vec();
    upgrade.extend(["-f", path.as_str()]);
    if !v3 {
        upgrade.push("--force-conflicts");
    }
    common::helm(v3, &upgrade).unwrap_or_else(|e| panic!("helm upgrade -f values: {e}"));
    assert_eq!(
        chart_budget().await,
        (None, Some(IntOrString::Int(1))),
        "the chart now renders the declared budget"
    );
    env.wait_policy("p", 20, |p| {
        (condition(p, "ControlPlaneHA")?.status == "True").then_some(())
    })
    .await;
    op.stop().await;
    common::helm(v3, &["uninstall", "istiod", "-n", ns.as_str()])
        .unwrap_or_else(|e| panic!("helm uninstall: {e}"));
}

#[tokio::test]
async fn helm4_upgrade_after_correction() {
    helm_upgrade_after_correction("helm4", false).await;
}

#[tokio::test]
async fn helm3_upgrade_after_correction() {
    helm_upgrade_after_correction("helm3", true).await;
}
