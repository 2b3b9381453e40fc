//! Gateway API gateways on the full cluster, with the real istiod rendering them: the Gateway
//! API CRDs come from the pinned `sigs.k8s.io/gateway-api` module, istiod creates the
//! GatewayClass `istio` and deploys a Gateway's Deployment, Service, and (from meshwarden's
//! class defaults) its HPA and PDB. meshwarden reaches the declared HA through istiod's own
//! customization, never fights istiod's re-renders, and Audit and deletion leave nothing
//! behind; the gateway keeps serving throughout (sampled).

use std::sync::atomic::AtomicBool;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{ApiResource, DynamicObject};

use super::*;

const CLASS_DEFAULTS: &str = "gateway.istio.io/defaults-for-class";

fn gateways_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    };
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// The Gateway `public` of class `istio`, annotated `rerender: <n>` (istiod renders the
/// Gateway's annotations into its Deployment, so each new value is a re-render).
fn gateway(n: u32) -> serde_json::Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "public", "annotations": {"test.meshwarden.io/rerender": n.to_string()}},
        "spec": {
            "gatewayClassName": "istio",
            "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}],
        },
    })
}

/// What the test reads of the gateway: (available replicas, zone spread in the template,
/// HPA minReplicas, PDB maxUnavailable).
type Posture = (i32, bool, Option<i32>, Option<String>);

async fn posture(client: &Client, ns: &str) -> Posture {
    let d = Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt("public-istio")
        .await
        .unwrap();
    let available = d
        .as_ref()
        .and_then(|d| d.status.as_ref())
        .and_then(|s| s.available_replicas)
        .unwrap_or(0);
    let spread = d
        .as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.topology_spread_constraints.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.topology_key == "topology.kubernetes.io/zone")
        });
    let hpa = Api::<HorizontalPodAutoscaler>::namespaced(client.clone(), ns)
        .get_opt("public-istio")
        .await
        .unwrap()
        .and_then(|h| h.spec)
        .and_then(|s| s.min_replicas);
    let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
        .get_opt("public-istio")
        .await
        .unwrap()
        .and_then(|b| b.spec)
        .and_then(|s| s.max_unavailable)
        .map(|v| match v {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => i.to_string(),
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s,
        });
    (available, spread, hpa, pdb)
}

/// meshwarden's class-defaults ConfigMaps in istio-system.
async fn own_defaults(client: &Client) -> Vec<String> {
    Api::<ConfigMap>::namespaced(client.clone(), "istio-system")
        .list(&ListParams::default().labels(&format!(
            "{CLASS_DEFAULTS},app.kubernetes.io/managed-by=meshwarden"
        )))
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .collect()
}

/// The zones of the gateway's running pods.
async fn zones(client: &Client, ns: &str) -> BTreeSet<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let nodes: Api<Node> = Api::all(client.clone());
    let mut out = BTreeSet::new();
    for p in pods
        .list(&ListParams::default().labels("gateway.networking.k8s.io/gateway-name=public"))
        .await
        .unwrap()
        .items
    {
        if p.metadata.deletion_timestamp.is_none()
            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        {
            out.insert(zone_of(&nodes, &p).await);
        }
    }
    out
}

/// The GatewayAPIHA condition as (status, reason, message).
async fn condition(api: &Api<MeshPolicy>, name: &str) -> (String, String, String) {
    let p = api.get(name).await.unwrap();
    common::condition(&p, "GatewayAPIHA")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// 1. Enforce: the ingress gateway istiod deployed for a Gateway of class `istio` reaches 2
///    replicas (through the HPA istiod renders), a PDB with maxUnavailable 1 and zone spread,
///    judged by what runs (pods in two zones, condition True).
/// 2. istiod re-renders five times over 60 s (annotation changes on the Gateway): zero
///    writes by meshwarden, the posture never reverted.
/// 3. Somebody else's class defaults appear: meshwarden removes its own and says what to add
///    to theirs (`ClassDefaultsExist`); they go, meshwarden's come back.
/// 4. Audit: the ConfigMap goes, then the HPA and PDB istiod leaves behind.
/// 5. Enforce again, then the policy is deleted: nothing is left, the policy is gone.
///
/// Through every step the gateway has a replica available (sampled every 200 ms).
#[tokio::test]
async fn gateway_api_gateways_reach_ha_through_istiods_defaults() {
    let env = common::cluster_env("gwapi").await;
    testplane::apply_yaml(
        &env.client,
        &testplane::istio::gateway_api_crds().unwrap(),
        &[],
    )
    .await
    .expect("install the Gateway API CRDs");
    let ns = format!("{}-edge", env.id);
    namespace(&env.client, &ns, json!({})).await;
    // istiod creates the GatewayClass once it sees the CRDs; a Gateway created before is
    // picked up as well, so the Gateway is created at once.
    gateways_api(&env.client, &ns)
        .patch(
            "public",
            &PatchParams::apply("gwapi-test").force(),
            &Patch::Apply(gateway(0)),
        )
        .await
        .expect("create the Gateway");
    common::eventually(
        120,
        "istiod deploys Gateway public with one available replica",
        || async { (posture(&env.client, &ns).await.0 >= 1).then_some(()) },
    )
    .await;
    // Sampled from here on: the gateway always has an available replica.
    let lowest = Arc::new(AtomicI32::new(i32::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (client, ns, lowest, stop) =
            (env.client.clone(), ns.clone(), lowest.clone(), stop.clone());
        tokio::spawn(async move {
            let deploys: Api<Deployment> = Api::namespaced(client, &ns);
            let mut samples = 0u32;
            while !stop.load(SeqCst) {
                let available = deploys
                    .get("public-istio")
                    .await
                    .ok()
                    .and_then(|d| d.status)
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0);
                lowest.fetch_min(available, SeqCst);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            samples
        })
    };

    let spec = "enforcement: Enforce
gatewayApi:
  classes:
  - className: istio
    replicas: {min: 2}
    disruptionBudget: {maxUnavailable: 1}
    spread: {nodes: Preferred, zones: Preferred}
";
    env.create_policy("gwapi", spec).await;
    let op = env.start_operator().await;
    let api: Api<MeshPolicy> = Api::all(env.client.clone());
    let policy = env.policy_name("gwapi");
    let cm = format!("meshwarden-istio-{policy}");

    // 1. The declared HA, by what runs.
    let start = Instant::now();
    common::eventually(
        120,
        "1. two replicas available, HPA min 2, PDB maxUnavailable 1, zone spread",
        || async {
            let p = posture(&env.client, &ns).await;
            (p == (2, true, Some(2), Some("1".into()))).then_some(())
        },
    )
    .await;
    let reached = start.elapsed();
    common::eventually(60, "1. the pods in two zones", || async {
        (zones(&env.client, &ns).await.len() >= 2).then_some(())
    })
    .await;
    common::eventually(60, "1. GatewayAPIHA True", || async {
        let c = condition(&api, &policy).await;
        (c.0 == "True").then_some(c)
    })
    .await;
    assert_eq!(own_defaults(&env.client).await, vec![cm.clone()]);
    eprintln!(
        "1. declared HA reached {:.1}s after the policy",
        reached.as_secs_f64()
    );

    // 2. Five re-renders over 60 s: no write by meshwarden, nothing reverted.
    let writes = op.writes();
    let rerenders = Instant::now();
    for n in 1..=5u32 {
        gateways_api(&env.client, &ns)
            .patch(
                "public",
                &PatchParams::apply("gwapi-test").force(),
                &Patch::Apply(gateway(n)),
            )
            .await
            .unwrap();
        let until = Instant::now() + Duration::from_secs(12);
        while Instant::now() < until {
            let p = posture(&env.client, &ns).await;
            assert!(
                p.1 && p.2 == Some(2) && p.3.as_deref() == Some("1"),
                "2. re-render {n} reverted the posture: {p:?}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let d = Api::<Deployment>::namespaced(env.client.clone(), &ns)
        .get("public-istio")
        .await
        .unwrap();
    let rendered = d
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get("test.meshwarden.io/rerender").cloned());
    assert_eq!(
        rendered.as_deref(),
        Some("5"),
        "2. istiod re-rendered the last change"
    );
    let managers: Vec<String> = d
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        !managers.iter().any(|m| m == "meshwarden"),
        "2. meshwarden never writes the Deployment: {managers:?}"
    );
    assert_eq!(
        op.writes(),
        writes,
        "2. meshwarden wrote during {:.0}s of re-renders",
        rerenders.elapsed().as_secs_f64()
    );
    assert_eq!(condition(&api, &policy).await.0, "True");

    // 3. Somebody else's class defaults: meshwarden's go, with the advice; then back.
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), "istio-system");
    let theirs: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": format!("{}-team", env.id), "labels": {CLASS_DEFAULTS: "istio"}},
        "data": {"service": "metadata: {annotations: {team: edge}}"},
    }))
    .unwrap();
    cms.create(&PostParams::default(), &theirs).await.unwrap();
    let c = common::eventually(
        60,
        "3. ClassDefaultsExist and meshwarden's ConfigMap removed",
        || async {
            let c = condition(&api, &policy).await;
            (c.1 == "ClassDefaultsExist" && own_defaults(&env.client).await.is_empty()).then_some(c)
        },
    )
    .await;
    assert!(
        c.2.contains("add to its data") && c.2.contains("horizontalPodAutoscaler"),
        "{}",
        c.2
    );
    cms.delete(&theirs.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    common::eventually(60, "3. meshwarden's defaults back", || async {
        let p = posture(&env.client, &ns).await;
        (own_defaults(&env.client).await == vec![cm.clone()] && p.2 == Some(2)).then_some(())
    })
    .await;

    // 4. Audit: the ConfigMap, then what istiod left behind, go; the gateway keeps serving.
    env.set_spec(
        "gwapi",
        &spec.replace("enforcement: Enforce", "enforcement: Audit"),
    )
    .await;
    common::eventually(
        60,
        "4. Audit: no ConfigMap, HPA or PDB; istiod re-rendered without spread",
        || async {
            let p = posture(&env.client, &ns).await;
            (own_defaults(&env.client).await.is_empty() && !p.1 && p.2.is_none() && p.3.is_none())
                .then_some(())
        },
    )
    .await;
    let c = common::eventually(30, "4. Audit reports the defaults missing", || async {
        let c = condition(&api, &policy).await;
        (c.1 == "NonCompliant").then_some(c)
    })
    .await;
    assert!(c.2.contains("Audit mode"), "{}", c.2);

    // 5. Enforce again, then delete the policy: nothing left, the policy gone.
    env.set_spec("gwapi", spec).await;
    common::eventually(60, "5. Enforce: HPA back", || async {
        (posture(&env.client, &ns).await.2 == Some(2)).then_some(())
    })
    .await;
    api.delete(&policy, &DeleteParams::default()).await.unwrap();
    common::eventually(
        60,
        "5. deleted: policy gone, no ConfigMap, HPA or PDB",
        || async {
            let p = posture(&env.client, &ns).await;
            let gone = api.get_opt(&policy).await.unwrap().is_none();
            (gone && own_defaults(&env.client).await.is_empty() && p.2.is_none() && p.3.is_none())
                .then_some(())
        },
    )
    .await;

    stop.store(true, SeqCst);
    let samples = sampler.await.unwrap();
    let lowest = lowest.load(SeqCst);
    eprintln!("gateway sampled {samples} times; lowest available replicas {lowest}");
    assert!(
        lowest >= 1,
        "the gateway had no available replica at some point"
    );
    op.stop().await;
    gateways_api(&env.client, &ns)
        .delete("public", &DeleteParams::default())
        .await
        .unwrap();
}
