//! Gateway API gateways and waypoints on the full cluster, with the real istiod rendering
//! them: the Gateway API CRDs come from the pinned `sigs.k8s.io/gateway-api` module, istiod
//! creates the GatewayClass `istio` and deploys a Gateway's Deployment, Service, and (from
//! meshwarden's class defaults) its HPA and PDB; a second istiod revision with ambient on
//! (`PILOT_ENABLE_AMBIENT`) deploys a waypoint of class `istio-waypoint` the same way.
//! meshwarden reaches the declared HA through istiod's own customization, never fights
//! istiod's re-renders, and Audit and deletion leave nothing behind; the gateways keep
//! serving throughout (sampled).

use std::sync::atomic::AtomicBool;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject};

use super::behaviour::zone_of;
use super::*;

const CLASS_DEFAULTS: &str = "gateway.istio.io/defaults-for-class";

pub(super) fn gateways_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "gateway.networking.k8s.io".into(),
        version: "v1".into(),
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "Gateway".into(),
        plural: "gateways".into(),
    };
    Api::namespaced_with(client.clone(), ns, &ar)
}

/// Gateway `name` of `class`, labelled `labels`, annotated `rerender: <n>` (istiod renders
/// the Gateway's annotations into its Deployment, so each new value is a re-render).
pub(super) fn gateway(
    name: &str,
    class: &str,
    labels: serde_json::Value,
    n: u32,
) -> serde_json::Value {
    let listener = match class {
        "istio-waypoint" => json!({"name": "mesh", "port": 15008, "protocol": "HBONE"}),
        _ => json!({"name": "http", "port": 80, "protocol": "HTTP"}),
    };
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "labels": labels, "annotations": {"test.meshwarden.io/rerender": n.to_string()}},
        "spec": {"gatewayClassName": class, "listeners": [listener]},
    })
}

/// The revision whose istiod runs with ambient on, so that it deploys waypoints.
const WAYPOINT_REVISION: &str = "wp";

/// The two gateways: (Gateway, class, Deployment istiod renders, labels).
fn gateways() -> [(&'static str, &'static str, &'static str, serde_json::Value); 2] {
    [
        ("public", "istio", "public-istio", json!({})),
        (
            "waypoint",
            "istio-waypoint",
            "waypoint",
            json!({"istio.io/rev": WAYPOINT_REVISION, "istio.io/waypoint-for": "service"}),
        ),
    ]
}

async fn apply_gateways(client: &Client, ns: &str, n: u32) {
    for (name, class, _, labels) in gateways() {
        gateways_api(client, ns)
            .patch(
                name,
                &PatchParams::apply("gwapi-test").force(),
                &Patch::Apply(gateway(name, class, labels, n)),
            )
            .await
            .expect("apply a Gateway");
    }
}

/// What the test reads of the gateway: (available replicas, zone spread in the template,
/// HPA minReplicas, PDB maxUnavailable).
pub(super) type Posture = (i32, bool, Option<i32>, Option<String>);

pub(super) async fn posture(client: &Client, ns: &str, name: &str) -> Posture {
    let d = Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(name)
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
        .get_opt(name)
        .await
        .unwrap()
        .and_then(|h| h.spec)
        .and_then(|s| s.min_replicas);
    let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
        .and_then(|b| b.spec)
        .and_then(|s| s.max_unavailable)
        .map(text);
    (available, spread, hpa, pdb)
}

/// A budget's count or percentage as text.
pub(super) fn text(v: IntOrString) -> String {
    match v {
        IntOrString::Int(i) => i.to_string(),
        IntOrString::String(s) => s,
    }
}

/// The zones of the running pods of Gateway `gateway`.
pub(super) async fn zones(client: &Client, ns: &str, gateway: &str) -> BTreeSet<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let nodes: Api<Node> = Api::all(client.clone());
    let mut out = BTreeSet::new();
    let lp =
        ListParams::default().labels(&format!("gateway.networking.k8s.io/gateway-name={gateway}"));
    for p in pods.list(&lp).await.unwrap().items {
        if p.metadata.deletion_timestamp.is_none()
            && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        {
            out.insert(zone_of(&nodes, &p).await);
        }
    }
    out
}

/// meshwarden's class-defaults ConfigMaps in istio-system, sorted.
async fn own_defaults(client: &Client) -> Vec<String> {
    let lp = ListParams::default().labels(&format!(
        "{CLASS_DEFAULTS},app.kubernetes.io/managed-by=meshwarden"
    ));
    let mut names: Vec<String> = Api::<ConfigMap>::namespaced(client.clone(), "istio-system")
        .list(&lp)
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    names.sort();
    names
}

/// The posture of both gateways: (Deployment, posture).
async fn postures(client: &Client, ns: &str) -> Vec<(&'static str, Posture)> {
    let mut out = Vec::new();
    for (_, _, deployment, _) in gateways() {
        out.push((deployment, posture(client, ns, deployment).await));
    }
    out
}

/// [`common::eventually`] that, when it times out, first prints what the test sees: both
/// gateways' posture, meshwarden's ConfigMaps, the policy's finalizers and condition, and the
/// end of the istiod logs.
async fn wait<T, F, Fut>(env: &common::Env, ns: &str, secs: u64, what: &str, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    common::eventually_or_report(secs, what, f, || async {
        let api: Api<MeshPolicy> = Api::all(env.client.clone());
        let p = api.get_opt(&env.policy_name("gwapi")).await.ok().flatten();
        eprintln!(
            "postures {:?}\nmeshwarden's ConfigMaps {:?}\nfinalizers {:?}, deleting {:?}\ncondition {:?}",
            postures(&env.client, ns).await,
            own_defaults(&env.client).await,
            p.as_ref().map(|p| p.finalizers().to_vec()),
            p.as_ref().map(|p| p.metadata.deletion_timestamp.is_some()),
            p.as_ref()
                .and_then(|p| common::condition(p, "GatewayAPIHA").cloned()),
        );
        for log in ["istiod.log", "istiod-wp.log"] {
            let text = std::fs::read_to_string(env.plane.dir.join(log)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(30)..].join("\n");
            eprintln!("--- {log} (last 30 lines)\n{tail}");
        }
    })
    .await
}

/// Deployment `name` as istiod rendered it, asserting that it rendered re-render `n` (the
/// Gateway's annotation `rerender`).
pub(super) async fn rerendered(client: &Client, ns: &str, name: &str, n: u32) -> Deployment {
    let d = Api::<Deployment>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap();
    let rendered = d
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get("test.meshwarden.io/rerender").cloned());
    assert_eq!(
        rendered,
        Some(n.to_string()),
        "2. istiod re-rendered {name}"
    );
    d
}

/// The test's environment on the shared cluster, with the Gateway API CRDs installed.
pub(super) async fn env_with_crds(prefix: &str) -> common::Env {
    let env = common::cluster_env(prefix).await;
    testplane::apply_yaml(
        &env.client,
        &testplane::istio::gateway_api_crds().unwrap(),
        &[],
    )
    .await
    .expect("install the Gateway API CRDs");
    env
}

/// Reads the available replicas of Deployments every 200 ms, keeping the lowest.
pub(super) struct Sampler {
    lowest: Arc<AtomicI32>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u32>,
}

impl Sampler {
    pub(super) fn start(client: &Client, ns: &str, deployments: Vec<String>) -> Sampler {
        let lowest = Arc::new(AtomicI32::new(i32::MAX));
        let stop = Arc::new(AtomicBool::new(false));
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
        let (low, halt) = (lowest.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut samples = 0u32;
            while !halt.load(SeqCst) {
                for name in &deployments {
                    // A read that failed observed nothing (it is not 0 available): skipped.
                    let Ok(d) = deploys.get(name).await else {
                        eprintln!("sampler: reading Deployment {name} failed; sample skipped");
                        continue;
                    };
                    let status = d.status.clone().unwrap_or_default();
                    let available = status.available_replicas.unwrap_or(0);
                    if available == 0 {
                        // What the failure below is made of: which gateway, when, in what state.
                        eprintln!(
                            "sampler: {name} has no available replica at sample {samples} (generation {:?}): {status:?}",
                            d.metadata.generation
                        );
                    }
                    low.fetch_min(available, SeqCst);
                }
                samples += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            samples
        });
        Sampler { lowest, stop, task }
    }

    /// Stops sampling; asserts that each Deployment always had an available replica.
    pub(super) async fn finish(self, what: &str) {
        self.stop.store(true, SeqCst);
        let samples = self.task.await.unwrap();
        let lowest = self.lowest.load(SeqCst);
        eprintln!("{what} sampled {samples} times; lowest available replicas {lowest}");
        assert!(lowest >= 1, "{what}: no available replica at some point");
    }
}

/// The GatewayAPIHA condition as (status, reason, message).
pub(super) async fn condition(api: &Api<MeshPolicy>, name: &str) -> (String, String, String) {
    let p = api.get(name).await.unwrap();
    common::condition(&p, "GatewayAPIHA")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

/// 1. Enforce: the ingress gateway istiod deployed for a Gateway of class `istio` and the
///    waypoint it deployed for one of class `istio-waypoint` reach 2 replicas (through the
///    HPA istiod renders), a PDB with maxUnavailable 1 and zone spread, judged by what runs
///    (pods in two zones, condition True).
/// 2. istiod re-renders five times over 60 s (annotation changes on both Gateways): zero
///    writes by meshwarden, the posture never reverted; then `helm upgrade` of the waypoint
///    revision's istiod, with Helm 4 as installed and server-side: the same.
/// 3. Somebody else's class defaults for `istio` appear: meshwarden removes its own and says
///    what to add to theirs (`ClassDefaultsExist`), the waypoint's stay; they go, meshwarden's
///    come back.
/// 4. Audit: the ConfigMaps go, then the HPAs and PDBs istiod leaves behind.
/// 5. Enforce again, then the policy is deleted: nothing is left, the policy is gone.
///
/// Through every step each gateway has a replica available (sampled every 200 ms).
#[tokio::test]
async fn gateway_api_gateways_and_waypoints_reach_ha_through_istiods_defaults() {
    let env = env_with_crds("gwapi").await;
    // The waypoint class: deployed by an istiod with ambient on (the plane's own runs without).
    let waypoints = testplane::istio::start_revision_with_env(
        &env.plane.dir,
        &env.plane.kubeconfig,
        WAYPOINT_REVISION,
        &["global.configValidation=false".into()],
        &[("PILOT_ENABLE_AMBIENT", "true")],
    )
    .await
    .expect("start the waypoint revision");
    let class = "apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: istio-waypoint}\nspec: {controllerName: istio.io/mesh-controller}\n";
    testplane::apply_yaml(&env.client, class, &[])
        .await
        .expect("create GatewayClass istio-waypoint");
    let ns = format!("{}-edge", env.id);
    namespace(&env.client, &ns, json!({})).await;
    apply_gateways(&env.client, &ns, 0).await;
    wait(
        &env,
        &ns,
        120,
        "istiod deploys both Gateways, one replica available each",
        || async {
            postures(&env.client, &ns)
                .await
                .iter()
                .all(|(_, p)| p.0 >= 1)
                .then_some(())
        },
    )
    .await;
    // Sampled from here on: each gateway always has an available replica.
    let sampler = Sampler::start(
        &env.client,
        &ns,
        gateways().iter().map(|g| g.2.to_string()).collect(),
    );

    let class_spec = "    replicas: {min: 2}
    disruptionBudget: {maxUnavailable: 1}
    spread: {nodes: Preferred, zones: Preferred}
";
    let spec = format!(
        "enforcement: Enforce\ngatewayApi:\n  classes:\n  - className: istio\n{class_spec}  - className: istio-waypoint\n{class_spec}"
    );
    env.create_policy("gwapi", &spec).await;
    let op = env.start_operator().await;
    let api: Api<MeshPolicy> = Api::all(env.client.clone());
    let policy = env.policy_name("gwapi");
    let cms = [
        format!("meshwarden-istio-{policy}"),
        format!("meshwarden-istio-waypoint-{policy}"),
    ];
    let held: Posture = (2, true, Some(2), Some("1".into()));

    // 1. The declared HA, by what runs.
    let start = Instant::now();
    wait(
        &env,
        &ns,
        120,
        "1. both: two replicas available, HPA min 2, PDB maxUnavailable 1, zone spread",
        || async {
            let p = postures(&env.client, &ns).await;
            p.iter().all(|(_, p)| *p == held).then_some(())
        },
    )
    .await;
    let reached = start.elapsed();
    wait(
        &env,
        &ns,
        120,
        "1. the pods of each in two zones",
        || async {
            let public = zones(&env.client, &ns, "public").await.len();
            let waypoint = zones(&env.client, &ns, "waypoint").await.len();
            (public >= 2 && waypoint >= 2).then_some(())
        },
    )
    .await;
    wait(&env, &ns, 120, "1. GatewayAPIHA True", || async {
        let c = condition(&api, &policy).await;
        (c.0 == "True").then_some(c)
    })
    .await;
    assert_eq!(own_defaults(&env.client).await, cms.to_vec());
    eprintln!(
        "1. declared HA reached {:.1}s after the policy",
        reached.as_secs_f64()
    );

    // 2. Five re-renders over 60 s: no write by meshwarden, nothing reverted.
    let writes = op.writes();
    let rerenders = Instant::now();
    for n in 1..=5u32 {
        apply_gateways(&env.client, &ns, n).await;
        let until = Instant::now() + Duration::from_secs(12);
        while Instant::now() < until {
            for (name, p) in postures(&env.client, &ns).await {
                assert!(
                    p.1 && p.2 == Some(2) && p.3.as_deref() == Some("1"),
                    "2. re-render {n} reverted the posture of {name}: {p:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for (_, _, name, _) in gateways() {
        let d = rerendered(&env.client, &ns, name, 5).await;
        let managers: Vec<String> = d
            .managed_fields()
            .iter()
            .filter_map(|m| m.manager.clone())
            .collect();
        assert!(
            !managers.iter().any(|m| m == "meshwarden"),
            "2. meshwarden never writes {name}: {managers:?}"
        );
    }
    assert_eq!(
        op.writes(),
        writes,
        "2. meshwarden wrote during {:.0}s of re-renders",
        rerenders.elapsed().as_secs_f64()
    );
    assert_eq!(condition(&api, &policy).await.0, "True");

    // 2b. helm upgrade of the waypoint revision's istiod, as installed and server-side (its
    // chart re-applied, its injector templates reloaded): nothing meshwarden set changes, no
    // write.
    let cm_api: Api<ConfigMap> = Api::namespaced(env.client.clone(), "istio-system");
    let versions = |cms: Vec<ConfigMap>| -> Vec<Option<String>> {
        cms.into_iter()
            .map(|c| c.metadata.resource_version)
            .collect()
    };
    let mut before = Vec::new();
    for cm in &cms {
        before.push(cm_api.get(cm).await.unwrap());
    }
    let chart = testplane::istio::chart("istiod").display().to_string();
    for extra in [&[][..], &["--server-side=true", "--force-conflicts"][..]] {
        let args: Vec<String> = [
            "upgrade",
            waypoints.release.as_str(),
            chart.as_str(),
            "-n",
            "istio-system",
            "--reuse-values",
        ]
        .iter()
        .chain(extra)
        .map(|a| a.to_string())
        .collect();
        testplane::istio::run_helm(
            &testplane::istio::helm(),
            &args,
            Some(&env.plane.kubeconfig),
        )
        .expect("helm upgrade of the waypoint revision");
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            for (name, p) in postures(&env.client, &ns).await {
                assert!(
                    p.1 && p.2 == Some(2) && p.3.as_deref() == Some("1"),
                    "2b. helm upgrade {extra:?} changed the posture of {name}: {p:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let mut after = Vec::new();
    for cm in &cms {
        after.push(cm_api.get(cm).await.unwrap());
    }
    assert_eq!(
        versions(after),
        versions(before),
        "2b. meshwarden's ConfigMaps untouched"
    );
    assert_eq!(
        op.writes(),
        writes,
        "2b. meshwarden wrote during the helm upgrades"
    );

    // 3. Somebody else's defaults for class istio: meshwarden's go, with the advice; the
    // waypoint's stay; then they come back.
    let theirs: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": format!("{}-team", env.id), "labels": {CLASS_DEFAULTS: "istio"}},
        "data": {"service": "metadata: {annotations: {team: edge}}"},
    }))
    .unwrap();
    cm_api
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    let c = wait(
        &env,
        &ns,
        120,
        "3. ClassDefaultsExist and meshwarden's istio ConfigMap removed",
        || async {
            let c = condition(&api, &policy).await;
            (c.1 == "ClassDefaultsExist" && own_defaults(&env.client).await == cms[1..])
                .then_some(c)
        },
    )
    .await;
    assert!(
        c.2.contains("add to its data") && c.2.contains("horizontalPodAutoscaler"),
        "{}",
        c.2
    );
    cm_api
        .delete(&theirs.name_any(), &DeleteParams::default())
        .await
        .unwrap();
    wait(&env, &ns, 120, "3. meshwarden's defaults back", || async {
        let p = posture(&env.client, &ns, "public-istio").await;
        (own_defaults(&env.client).await == cms && p.2 == Some(2)).then_some(())
    })
    .await;

    // 4. Audit: the ConfigMaps, then what istiod left behind, go; the gateways keep serving.
    env.set_spec(
        "gwapi",
        &spec.replace("enforcement: Enforce", "enforcement: Audit"),
    )
    .await;
    wait(
        &env,
        &ns,
        120,
        "4. Audit: no ConfigMap, HPA or PDB; istiod re-rendered both without spread",
        || async {
            let gone = postures(&env.client, &ns)
                .await
                .iter()
                .all(|(_, p)| !p.1 && p.2.is_none() && p.3.is_none());
            (own_defaults(&env.client).await.is_empty() && gone).then_some(())
        },
    )
    .await;
    let c = wait(
        &env,
        &ns,
        60,
        "4. Audit reports the defaults missing",
        || async {
            let c = condition(&api, &policy).await;
            (c.1 == "NonCompliant").then_some(c)
        },
    )
    .await;
    assert!(c.2.contains("Audit mode"), "{}", c.2);
    // Nothing of meshwarden's is left, so the finalizer goes; then Audit writes nothing.
    wait(&env, &ns, 60, "4. Audit: the finalizer removed", || async {
        let p = api.get(&policy).await.ok()?;
        p.metadata
            .finalizers
            .unwrap_or_default()
            .is_empty()
            .then_some(())
    })
    .await;
    // The operator counts its finalizer patch once the answer reaches it, which can be after
    // the test reads the policy without it: the baseline is taken once the policy settled.
    env.wait_converged("gwapi", 60).await;
    let audit_writes = op.writes();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(op.writes(), audit_writes, "4. Audit wrote");

    // 5. Enforce again, then delete the policy: nothing left, the policy gone.
    env.set_spec("gwapi", &spec).await;
    wait(&env, &ns, 120, "5. Enforce: both HPAs back", || async {
        let p = postures(&env.client, &ns).await;
        p.iter().all(|(_, p)| p.2 == Some(2)).then_some(())
    })
    .await;
    api.delete(&policy, &DeleteParams::default()).await.unwrap();
    wait(
        &env,
        &ns,
        120,
        "5. deleted: policy gone, no ConfigMap, HPA or PDB",
        || async {
            let left = postures(&env.client, &ns)
                .await
                .iter()
                .any(|(_, p)| p.2.is_some() || p.3.is_some());
            let gone = api.get_opt(&policy).await.unwrap().is_none();
            (gone && own_defaults(&env.client).await.is_empty() && !left).then_some(())
        },
    )
    .await;

    sampler.finish("gateways").await;
    op.stop().await;
    for (name, _, _, _) in gateways() {
        gateways_api(&env.client, &ns)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    waypoints.stop().unwrap();
}
