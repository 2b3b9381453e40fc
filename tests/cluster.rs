//! The full test cluster does what a cluster does: the scheduler spreads pods over zones,
//! kwok runs them, the disruption controller computes PDB status, drains honour PDBs, the
//! garbage collector removes dependents, and istiod injects sidecars sized by the
//! `sidecar.istio.io/proxy*` annotations. These are the behaviours the lifecycle tests of
//! meshwarden stand on, so they are checked here first.

#[allow(dead_code)]
#[path = "integration/common.rs"]
mod common;

#[path = "cluster/plan.rs"]
mod plan;
#[path = "cluster/posture.rs"]
mod posture;
#[path = "cluster/report.rs"]
mod report;
#[path = "cluster/rollout_gate.rs"]
mod rollout_gate;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicI32;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};
use testplane::cluster::rolling;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use meshwarden::api::MeshPolicy;
use serde_json::json;

async fn namespace(client: &Client, name: &str, labels: serde_json::Value) {
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

fn deployment(name: &str, replicas: i32, annotations: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": annotations},
                "spec": {
                    "topologySpreadConstraints": [{
                        "maxSkew": 1,
                        "topologyKey": "topology.kubernetes.io/zone",
                        "whenUnsatisfiable": "DoNotSchedule",
                        "labelSelector": {"matchLabels": {"app": name}},
                    }],
                    "containers": [{"name": "app", "image": "registry.example/app:1"}],
                },
            },
        },
    })
}

/// Creates a [`deployment`] of two replicas for each of `names` in `ns`.
async fn create_deployments(client: &Client, ns: &str, names: &[&str]) {
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    for name in names {
        deploys
            .create(
                &PostParams::default(),
                &serde_json::from_value(deployment(name, 2, json!({}))).unwrap(),
            )
            .await
            .unwrap();
    }
}

/// Ready pods of `app` in `ns`, those not being deleted.
async fn ready_pods(pods: &Api<Pod>, app: &str) -> Vec<Pod> {
    let list = pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap();
    list.items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .collect()
}

async fn zone_of(nodes: &Api<Node>, pod: &Pod) -> String {
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap();
    nodes.get(&node).await.unwrap().labels()["topology.kubernetes.io/zone"].clone()
}

#[tokio::test]
async fn scheduler_disruption_drain_and_garbage_collection_work() {
    let plane = testplane::shared_cluster();
    let client = plane.client().await;
    let ns = "cluster-basics";
    namespace(&client, ns, json!({})).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let nodes: Api<Node> = Api::all(client.clone());

    // Three replicas spread over zones: one Ready pod in each of the three zones.
    deploys
        .create(
            &PostParams::default(),
            &serde_json::from_value(deployment("web", 3, json!({}))).unwrap(),
        )
        .await
        .unwrap();
    let ready = common::eventually(60, "3 ready web pods", || async {
        let p = ready_pods(&pods, "web").await;
        (p.len() == 3).then_some(p)
    })
    .await;
    let mut zones = BTreeSet::new();
    for p in &ready {
        zones.insert(zone_of(&nodes, p).await);
    }
    assert_eq!(zones.len(), 3, "one pod per zone: {zones:?}");

    // The disruption controller computes the budget's allowed disruptions.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"app": "web"}}},
    }))
    .unwrap();
    pdbs.create(&PostParams::default(), &pdb).await.unwrap();
    common::eventually(60, "PDB status with 1 allowed disruption", || async {
        let p = pdbs.get("web").await.ok()?;
        let s = p.status?;
        (s.disruptions_allowed == 1 && s.current_healthy == 3).then_some(())
    })
    .await;

    // kubectl drain evicts through the PDB; the Deployment is back to 3 Ready, in the same
    // zone as before since the drained node's zone has a second node.
    let victim = ready[0].spec.as_ref().unwrap().node_name.clone().unwrap();
    let victim_zone = zone_of(&nodes, &ready[0]).await;
    let kubectl = testplane::tools_dir().join("kubectl");
    let out = Command::new(&kubectl)
        .args([
            "--kubeconfig",
            &plane.kubeconfig.display().to_string(),
            "drain",
            &victim,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--pod-selector=app=web",
            "--timeout=90s",
        ])
        .output()
        .expect("run kubectl drain");
    assert!(
        out.status.success(),
        "kubectl drain failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("evicted"), "drain evicted a pod: {stdout}");
    let after = common::eventually(90, "3 ready web pods after the drain", || async {
        let p = ready_pods(&pods, "web").await;
        (p.len() == 3).then_some(p)
    })
    .await;
    for p in &after {
        assert_ne!(
            p.spec.as_ref().unwrap().node_name.as_deref(),
            Some(&*victim)
        );
    }
    let mut zones_after = BTreeSet::new();
    for p in &after {
        zones_after.insert(zone_of(&nodes, p).await);
    }
    assert!(zones_after.contains(&victim_zone));
    assert_eq!(zones_after.len(), 3);
    nodes
        .patch(
            &victim,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": null}})),
        )
        .await
        .unwrap();

    // The garbage collector removes a dependent of a deleted owner.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let owner = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "dependent", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.uid().unwrap(),
        }]}}))
        .unwrap(),
    )
    .await
    .unwrap();
    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    common::eventually(
        60,
        "the garbage collector to remove the dependent",
        || async {
            cms.get_opt("dependent")
                .await
                .ok()
                .and_then(|d| d.is_none().then_some(()))
        },
    )
    .await;
}

#[tokio::test]
async fn istiod_injects_sidecars_sized_by_the_annotations() {
    let plane = testplane::shared_cluster();
    let client = plane.client().await;
    let ns = "cluster-injected";
    namespace(&client, ns, json!({"istio-injection": "enabled"})).await;
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    deploys
        .create(
            &PostParams::default(),
            &serde_json::from_value(deployment(
                "shop",
                2,
                json!({"sidecar.istio.io/proxyCPU": "150m", "sidecar.istio.io/proxyMemory": "192Mi"}),
            ))
            .unwrap(),
        )
        .await
        .unwrap();
    let ready = common::eventually(90, "2 ready injected pods", || async {
        let p = ready_pods(&pods, "shop").await;
        (p.len() == 2).then_some(p)
    })
    .await;
    for p in ready {
        let spec = p.spec.unwrap();
        let proxy = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .find(|c| c.name == "istio-proxy")
            .unwrap_or_else(|| panic!("{} has no istio-proxy", p.metadata.name.unwrap()));
        let requests = proxy.resources.as_ref().unwrap().requests.as_ref().unwrap();
        assert_eq!(requests["cpu"].0, "150m");
        assert_eq!(requests["memory"].0, "192Mi");
        assert!(
            p.metadata
                .annotations
                .unwrap_or_default()
                .contains_key("sidecar.istio.io/status")
        );
    }
}

fn proxy_requests(p: &Pod) -> Option<(String, String)> {
    let spec = p.spec.as_ref()?;
    let proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == "istio-proxy")?;
    let r = proxy.resources.as_ref()?.requests.as_ref()?;
    Some((r.get("cpu")?.0.clone(), r.get("memory")?.0.clone()))
}

#[tokio::test]
async fn meshwarden_paces_a_real_sidecar_rollout() {
    let env = common::cluster_env("rollout").await;
    let ns = env
        .namespace("shop", &[("istio-injection", "enabled")])
        .await;
    let deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    create_deployments(&env.client, &ns, &["cart", "checkout"]).await;
    for name in ["cart", "checkout"] {
        common::eventually(90, "2 ready injected pods per workload", || async {
            let p = ready_pods(&pods, name).await;
            (p.len() == 2 && p.iter().all(|p| proxy_requests(p).is_some())).then_some(())
        })
        .await;
    }
    env.create_policy(
        "sidecars",
        &format!(
            "enforcement: Enforce\nsidecars:\n  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}\n  resources: {{requests: {{cpu: 200m, memory: 256Mi}}, limits: {{memory: 512Mi}}}}\n"
        ),
    )
    .await;
    let _op = env.start_operator().await;

    // Watch both rollouts until every pod carries the new proxy size; never two at once.
    let start = Instant::now();
    let mut most_rolling = 0;
    loop {
        let list = deploys.list(&ListParams::default()).await.unwrap();
        most_rolling = most_rolling.max(list.items.iter().filter(|d| rolling(d)).count());
        let all = pods.list(&ListParams::default()).await.unwrap().items;
        let live: Vec<&Pod> = all
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let resized = live
            .iter()
            .all(|p| proxy_requests(p) == Some(("200m".to_string(), "256Mi".to_string())));
        if live.len() == 4 && resized && list.items.iter().all(|d| !rolling(d)) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the sidecar rollout did not finish in 180s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(most_rolling, 1, "pacing rolls one workload at a time");
    let p = env.wait_settled("sidecars", 60).await;
    let cond = common::condition(&p, "SidecarResources").expect("SidecarResources condition");
    assert_eq!(cond.status, "True", "{cond:?}");
}

/// Runs a Helm binary against the cluster; panics with Helm's message when it fails.
fn helm(bin: &std::path::Path, kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    testplane::istio::run_helm(bin, &args, Some(kubeconfig))
        .unwrap_or_else(|e| panic!("helm failed: {e}"))
}

/// The lowest values seen while sampling: Deployment replicas, available pods, HPA minimum.
#[derive(Debug, Default)]
struct Floor {
    replicas: AtomicI32,
    available: AtomicI32,
    hpa_min: AtomicI32,
}

/// Samples a Deployment and the HPA scaling it every 100 ms in the background, for the whole
/// test, and keeps the lowest values seen since the last reset.
struct Sampler {
    floor: Arc<Floor>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(client: &Client, ns: &str, deployment: &str, hpa: &str) -> Self {
        use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
        let floor = Arc::new(Floor::default());
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
        let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let (f, deployment, hpa) = (floor.clone(), deployment.to_string(), hpa.to_string());
        let task = tokio::spawn(async move {
            loop {
                if let (Ok(d), Ok(h)) = (deploys.get(&deployment).await, hpas.get(&hpa).await) {
                    let spec = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    // The pods that serve: Ready and not being deleted, counted directly. The
                    // Deployment's `availableReplicas` sums its ReplicaSets' statuses and can
                    // lag a rollout step by a sync, showing a dip no client sees.
                    let selector = d
                        .spec
                        .as_ref()
                        .and_then(|s| s.selector.match_labels.clone())
                        .unwrap_or_default()
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",");
                    let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await else {
                        continue;
                    };
                    let avail = list
                        .items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none())
                        .filter(|p| {
                            p.status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|c| {
                                    c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                                })
                        })
                        .count();
                    let avail = i32::try_from(avail).unwrap_or(i32::MAX);
                    let min = h.spec.and_then(|s| s.min_replicas).unwrap_or(1);
                    f.replicas.fetch_min(spec, SeqCst);
                    f.available.fetch_min(avail, SeqCst);
                    f.hpa_min.fetch_min(min, SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let sampler = Sampler { floor, task };
        sampler.reset();
        sampler
    }

    /// [`Sampler::check`] without the HPA, with a floor of its own for available pods.
    fn check_available(&self, step: &str, replicas_min: i32, available_min: i32) {
        let replicas = self.floor.replicas.load(SeqCst);
        let available = self.floor.available.load(SeqCst);
        assert!(
            replicas >= replicas_min,
            "{step}: Deployment replicas went down to {replicas}"
        );
        assert!(
            available >= available_min,
            "{step}: available pods went down to {available}"
        );
        self.reset();
    }

    fn reset(&self) {
        self.floor.replicas.store(i32::MAX, SeqCst);
        self.floor.available.store(i32::MAX, SeqCst);
        self.floor.hpa_min.store(i32::MAX, SeqCst);
    }

    /// Asserts that since the last reset the Deployment's replicas and available pods, and
    /// (with `hpa`) the HPA minimum, never went below `min`; then resets. A `helm upgrade`
    /// writes the chart's HPA minimum back for the moment until meshwarden restores it, so the
    /// HPA is left out of the check of an upgrade.
    fn check(&self, step: &str, min: i32, hpa: bool) {
        let replicas = self.floor.replicas.load(SeqCst);
        let available = self.floor.available.load(SeqCst);
        let hpa_min = self.floor.hpa_min.load(SeqCst);
        assert!(
            replicas >= min,
            "{step}: Deployment replicas went down to {replicas}"
        );
        assert!(
            available >= min,
            "{step}: available pods went down to {available}"
        );
        assert!(
            !hpa || hpa_min >= min,
            "{step}: HPA minReplicas went down to {hpa_min}"
        );
        self.reset();
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Replaces the spec of a test's policy with `yaml`.
async fn set_spec(env: &common::Env, name: &str, yaml: &str) {
    env.set_spec(name, yaml).await;
}

/// Runs `helm upgrade --reuse-values` of `release` with Helm 3 (three-way merge), Helm 4 as the
/// release was installed (client-side after Helm 3), Helm 4 server-side with `--force-conflicts`
/// (it asks for it on the fields meshwarden holds) twice, then `helm rollback` server-side: five
/// installer writes within ten minutes, more than a fight takes. Every one must succeed; after
/// each, `after(step)` runs once meshwarden converged, and the section's condition must not
/// call the installer's write a fight.
async fn helm_upgrades<F, Fut>(
    env: &common::Env,
    policy: &str,
    condition: &str,
    release: &str,
    chart: &str,
    ns: &str,
    after: F,
) where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let kc = env.plane.kubeconfig.clone();
    let server_side = ["--server-side=true", "--force-conflicts"];
    let upgrade = |extra: &[&'static str]| {
        let mut args = vec!["upgrade", release, chart, "-n", ns, "--reuse-values"];
        args.extend_from_slice(extra);
        args
    };
    let rollback = [vec!["rollback", release, "-n", ns], server_side.to_vec()].concat();
    let steps: [(&str, std::path::PathBuf, Vec<&str>); 5] = [
        ("helm 3 upgrade", testplane::istio::helm3(), upgrade(&[])),
        ("helm 4 upgrade", testplane::istio::helm(), upgrade(&[])),
        (
            "helm 4 server-side upgrade",
            testplane::istio::helm(),
            upgrade(&server_side),
        ),
        (
            "helm 4 server-side upgrade again",
            testplane::istio::helm(),
            upgrade(&server_side),
        ),
        (
            "helm 4 server-side rollback",
            testplane::istio::helm(),
            rollback,
        ),
    ];
    for (step, bin, args) in steps {
        helm(&bin, &kc, &args);
        let p = env.wait_converged(policy, 90).await;
        let c = common::condition(&p, condition).unwrap();
        assert_ne!(
            c.reason, "FightDetected",
            "{step}: a Helm upgrade is not a fight: {c:?}"
        );
        after(step.to_string()).await;
    }
}

/// The operator's writes in `namespace` so far.
fn writes_in(env: &common::Env, namespace: &str) -> usize {
    env.operator_writes_to(|o| o["namespace"] == namespace)
}

/// One gateway release through its whole life with meshwarden, checking after every step that
/// no replica count or HPA minimum went down, no pod became unavailable (sampled every 100 ms
/// for a few seconds once the posture holds), the proxy resources meshwarden set are there,
/// Helm upgrades work and nothing is fought: install with Helm 3 -> policy in Audit -> Enforce
/// -> edit the policy (replicas and limits dropped, CPU request changed) -> `helm upgrade` with
/// Helm 3 and with Helm 4, and `helm rollback` -> Audit -> delete the policy.
#[tokio::test]
async fn gateway_release_lifecycle_with_helm_never_lowers_the_posture() {
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;

    let env = common::cluster_env("gwlife").await;
    let ns = env.namespace("gw", &[]).await;
    let kc = env.plane.kubeconfig.clone();
    let chart = testplane::istio::chart("gateway").display().to_string();
    helm(
        &testplane::istio::helm3(),
        &kc,
        &[
            "install",
            "gw",
            &chart,
            "-n",
            &ns,
            "--set",
            "global.hub=docker.io/istio",
        ],
    );
    let deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &ns);
    common::eventually(90, "the gateway Deployment ready", || async {
        let d = deploys.get("gw").await.ok()?;
        (d.status?.available_replicas? >= 1).then_some(())
    })
    .await;
    let sampler = Sampler::start(&env.client, &ns, "gw", "gw");

    let gateway = |extra: &str| {
        format!(
            "gateways:\n- name: ingress\n  namespace: {ns}\n  selector: {{matchLabels: {{istio: gw}}}}\n{extra}"
        )
    };
    // The memory limit differs from the chart's 1024Mi, so that a Helm write shows.
    let full = "  replicas: {min: 3}\n  disruptionBudget: {maxUnavailable: 1}\n  resources: {requests: {cpu: 200m, memory: 256Mi}, limits: {memory: 1536Mi}}\n";
    // The proxy's CPU request and memory limit, as meshwarden set them.
    let resources_are = |step: &str, cpu: &str| {
        let (deploys, step, cpu) = (deploys.clone(), step.to_string(), cpu.to_string());
        async move {
            let d = deploys.get("gw").await.unwrap();
            let r = common::container_resources(&d, "istio-proxy");
            assert_eq!(
                (
                    common::quantity(&r.requests, "cpu"),
                    common::quantity(&r.limits, "memory")
                ),
                (Some(cpu), Some("1536Mi".to_string())),
                "{step}: the proxy's CPU request and memory limit"
            );
        }
    };
    // The posture: 3 available pods with the HPA minimum at 3, a PDB allowing 1 disruption,
    // the CPU request `cpu` rolled out.
    let posture = |cpu: &'static str| {
        let (deploys, hpas, pdbs) = (deploys.clone(), hpas.clone(), pdbs.clone());
        async move {
            let d = deploys.get("gw").await.ok()?;
            let h = hpas.get("gw").await.ok()?;
            let pdb = pdbs.list(&ListParams::default()).await.ok()?.items;
            let allowed = pdb.first()?.status.as_ref()?.disruptions_allowed;
            let r = common::container_resources(&d, "istio-proxy");
            let rolled = !rolling(&d) && d.status.as_ref()?.available_replicas? >= 3;
            (rolled
                && h.spec?.min_replicas? >= 3
                && allowed == 1
                && common::quantity(&r.requests, "cpu").as_deref() == Some(cpu))
            .then_some(())
        }
    };

    // Audit: reported, nothing written.
    env.create_policy("gw", &format!("enforcement: Audit\n{}", gateway(full)))
        .await;
    let _op = env.start_operator().await;
    let p = env
        .wait_policy("gw", 60, |p| {
            let c = common::condition(p, "GatewayHA")?;
            (c.status == "False").then_some(p.clone())
        })
        .await;
    assert!(p.status.unwrap().violation_count > 0);
    assert_eq!(writes_in(&env, &ns), 0, "Audit writes nothing");

    // Enforce: HPA minimum 3, three available pods, one PDB with one allowed disruption.
    set_spec(
        &env,
        "gw",
        &format!("enforcement: Enforce\n{}", gateway(full)),
    )
    .await;
    common::eventually(120, "3 available gateway pods and a PDB allowing 1", || {
        posture("200m")
    })
    .await;
    env.wait_settled("gw", 60).await;
    sampler.reset();
    tokio::time::sleep(Duration::from_secs(6)).await; // an HPA sync period
    sampler.check("Enforce", 3, true);
    resources_are("Enforce", "200m").await;

    // Edit: the policy stops declaring replicas and changes resources. Nothing goes down.
    set_spec(
        &env,
        "gw",
        &format!(
            "enforcement: Enforce\n{}",
            gateway("  disruptionBudget: {maxUnavailable: 1}\n  resources: {requests: {cpu: 300m, memory: 256Mi}}\n")
        ),
    )
    .await;
    common::eventually(120, "the edited CPU request rolled out", || posture("300m")).await;
    env.wait_settled("gw", 90).await;
    tokio::time::sleep(Duration::from_secs(6)).await; // an HPA sync period
    sampler.check("policy edited", 3, true);
    resources_are("policy edited", "300m").await;
    set_spec(
        &env,
        "gw",
        &format!("enforcement: Enforce\n{}", gateway(full)),
    )
    .await;
    common::eventually(120, "the full posture again", || posture("200m")).await;
    env.wait_settled("gw", 90).await;
    sampler.check("policy restored", 3, true);

    // helm upgrade with unchanged values: Helm 3 (three-way merge), then Helm 4.
    helm_upgrades(&env, "gw", "GatewayHA", "gw", &chart, &ns, |step| {
        let (posture, resources_are, sampler) = (&posture, &resources_are, &sampler);
        async move {
            common::eventually(120, "the posture restored after the upgrade", || {
                posture("200m")
            })
            .await;
            tokio::time::sleep(Duration::from_secs(6)).await;
            // The upgrade writes the chart's proxy resources and meshwarden writes the
            // declared ones back: two rollouts of the installer's making, during which the
            // serving pods may dip by what the declared budget allows (maxUnavailable 1),
            // never below it; replicas never drop.
            sampler.check_available(&step, 3, 2);
            resources_are(&step, "200m").await;
        }
    })
    .await;

    // Audit again: nothing written, values stay.
    set_spec(
        &env,
        "gw",
        &format!("enforcement: Audit\n{}", gateway(full)),
    )
    .await;
    env.wait_settled("gw", 60).await;
    let before = writes_in(&env, &ns);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(writes_in(&env, &ns), before, "Audit writes nothing");
    sampler.check("Audit", 3, true);
    resources_are("Audit", "200m").await;

    // Delete the policy: the garbage collector removes what meshwarden created; the values
    // it set stay.
    Api::<MeshPolicy>::all(env.client.clone())
        .delete(&env.policy_name("gw"), &DeleteParams::default())
        .await
        .unwrap();
    common::eventually(60, "meshwarden's PDB garbage-collected", || async {
        let left = pdbs.list(&ListParams::default()).await.ok()?.items;
        left.iter()
            .all(|p| !p.name_any().ends_with("-meshwarden"))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    sampler.check("policy deleted", 3, true);
    resources_are("policy deleted", "200m").await;
}

/// istiod's own Helm release through its whole life with meshwarden: installed with Helm 3
/// (revision `lc` in a namespace of its own, so the cluster's istiod is not touched;
/// `autoscaleMin=2`, so the chart renders its PDB `minAvailable: 1`) -> policy in Audit ->
/// Enforce -> policy edited (replicas dropped, resources changed, node spread off) -> `helm
/// upgrade --reuse-values` with Helm 3, with Helm 4 as installed and twice with Helm 4
/// server-side and `--force-conflicts`, then `helm rollback` (five installer writes within ten
/// minutes, none a fight) -> Audit -> policy deleted. After every step: no replica count,
/// available pod count or HPA minimum went below 3 since Enforce (sampled every 100 ms; the
/// HPA minimum is left out while Helm writes the chart's value back), every installer value
/// is still there, the chart's PDB keeps its form, the posture is restored after each
/// upgrade without a fight, and Audit writes nothing.
#[tokio::test]
async fn istiod_release_lifecycle_with_helm_never_lowers_the_posture() {
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    let env = common::cluster_env("istiodlife").await;
    let ns = env.namespace("istio", &[]).await;
    let kc = env.plane.kubeconfig.clone();
    let chart = testplane::istio::chart("istiod").display().to_string();
    let istio_ns = format!("global.istioNamespace={ns}");
    helm(
        &testplane::istio::helm3(),
        &kc,
        &[
            "install",
            "istiod-lc",
            &chart,
            "-n",
            &ns,
            "--set",
            "revision=lc",
            "--set",
            "autoscaleMin=2",
            "--set",
            &istio_ns,
            "--set",
            "global.operatorManageWebhooks=true",
            "--set",
            "global.configValidation=false",
            "--set",
            "global.hub=docker.io/istio",
        ],
    );
    let name = "istiod-lc";
    let deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &ns);
    common::eventually(90, "2 available istiod pods", || async {
        let d = deploys.get(name).await.ok()?;
        (d.status?.available_replicas? >= 2).then_some(())
    })
    .await;
    let sampler = Sampler::start(&env.client, &ns, name, name);

    // What the installer set and must keep: the memory request the policy does not declare,
    // the HPA maximum, the PDB in its chart form, the revision label.
    let installer_values_kept = |step: &str| {
        let (deploys, hpas, pdbs) = (deploys.clone(), hpas.clone(), pdbs.clone());
        let step = step.to_string();
        async move {
            let d = deploys.get(name).await.unwrap();
            let r = common::container_resources(&d, "discovery");
            assert_eq!(
                common::quantity(&r.requests, "memory").as_deref(),
                Some("2Gi"), // the chart's 2048Mi, as the API server stores it
                "{step}: the chart's memory request"
            );
            assert_eq!(
                d.labels().get("istio.io/rev").map(String::as_str),
                Some("lc"),
                "{step}"
            );
            let h = hpas.get(name).await.unwrap().spec.unwrap();
            assert_eq!(h.max_replicas, 5, "{step}: the chart's HPA maximum");
            let b = pdbs.get(name).await.unwrap().spec.unwrap();
            assert_eq!(
                (b.min_available, b.max_unavailable),
                (Some(IntOrString::Int(1)), None),
                "{step}: the chart's PDB keeps its form"
            );
            let all = pdbs.list(&ListParams::default()).await.unwrap().items;
            assert_eq!(all.len(), 1, "{step}: one PDB, the chart's");
        }
    };
    // What the policy holds while it declares it: None when istiod has it and finished
    // rolling, else what is missing.
    let gap = |cpu: &'static str| {
        let (deploys, hpas) = (deploys.clone(), hpas.clone());
        async move {
            let d = deploys.get(name).await.unwrap();
            let min = hpas.get(name).await.unwrap().spec.unwrap().min_replicas;
            let r = common::container_resources(&d, "discovery");
            let got_cpu = common::quantity(&r.requests, "cpu");
            let available = d.status.as_ref().and_then(|s| s.available_replicas);
            if min < Some(3) {
                Some(format!("HPA minReplicas {min:?}"))
            } else if got_cpu.as_deref() != Some(cpu) {
                Some(format!("CPU request {got_cpu:?}, not {cpu}"))
            } else if common::anti_affinity_terms(&d) < 1 {
                Some("no pod anti-affinity term".into())
            } else if rolling(&d) || available < Some(3) {
                Some(format!("rolling, {available:?} available"))
            } else {
                None
            }
        }
    };
    let posture = |cpu: &'static str| async move { gap(cpu).await.is_none().then_some(()) };
    let control_plane = |enforcement: &str, rules: &str| {
        format!("enforcement: {enforcement}\ncontrolPlane:\n  namespace: {ns}\n{rules}")
    };
    let full = "  replicas: {min: 3}\n  disruptionBudget: {maxUnavailable: 1}\n  resources: {requests: {cpu: 700m}}\n  spread: {nodes: Preferred, zones: Preferred}\n";

    // Audit: violations reported, nothing written.
    installer_values_kept("installed").await;
    env.create_policy("cp", &control_plane("Audit", full)).await;
    let _op = env.start_operator().await;
    let p = env
        .wait_policy("cp", 60, |p| {
            let c = common::condition(p, "ControlPlaneHA")?;
            (c.status == "False" && p.status.as_ref()?.violation_count > 0).then_some(p.clone())
        })
        .await;
    assert!(
        common::condition(&p, "ControlPlaneHA")
            .unwrap()
            .message
            .contains("Audit mode")
    );
    assert_eq!(writes_in(&env, &ns), 0, "Audit writes nothing");
    installer_values_kept("Audit").await;

    // Enforce: HPA minimum 3, the CPU request, spread; three available pods. The chart's PDB
    // has no equivalent of maxUnavailable 1 at 3..5 replicas: reported, left in its form.
    set_spec(&env, "cp", &control_plane("Enforce", full)).await;
    common::eventually(120, "istiod raised to the posture", || posture("700m")).await;
    let p = env.wait_converged("cp", 60).await;
    let c = common::condition(&p, "ControlPlaneHA").unwrap();
    assert!(
        c.message
            .contains("pdb.maxUnavailable=1 in Helm release istiod-lc"),
        "the chart value of the budget: {}",
        c.message
    );
    assert!(
        c.message.contains(
            "set autoscaleMin, pdb.maxUnavailable, resources, affinity, topologySpreadConstraints in Helm release istiod-lc"
        ),
        "every chart value that declares what meshwarden took over: {}",
        c.message
    );
    sampler.reset();
    tokio::time::sleep(Duration::from_secs(6)).await; // an HPA sync period
    sampler.check("Enforce", 3, true);
    installer_values_kept("Enforce").await;

    // Edit: replicas dropped, the CPU request changed, node spread off. Nothing goes down and
    // the anti-affinity term meshwarden added stays (released, not removed).
    set_spec(
        &env,
        "cp",
        &control_plane(
            "Enforce",
            "  disruptionBudget: {maxUnavailable: 1}\n  resources: {requests: {cpu: 600m}}\n  spread: {nodes: Off, zones: Preferred}\n",
        ),
    )
    .await;
    common::eventually(120, "the edited CPU request rolled out", || async {
        let g = gap("600m").await;
        (g.is_none() || g.is_some_and(|g| !g.starts_with("CPU") && !g.starts_with("rolling")))
            .then_some(())
    })
    .await;
    env.wait_converged("cp", 60).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    sampler.check("policy edited", 3, true);
    assert_eq!(gap("600m").await, None, "policy edited: the values stay");
    installer_values_kept("policy edited").await;
    set_spec(&env, "cp", &control_plane("Enforce", full)).await;
    common::eventually(120, "the full posture again", || posture("700m")).await;
    env.wait_converged("cp", 60).await;
    sampler.check("policy restored", 3, true);

    // helm upgrade with unchanged values: each succeeds, meshwarden restores the posture.
    helm_upgrades(&env, "cp", "ControlPlaneHA", name, &chart, &ns, |step| {
        let (posture, kept, sampler) = (&posture, &installer_values_kept, &sampler);
        async move {
            common::eventually(120, "the posture restored after the upgrade", || {
                posture("700m")
            })
            .await;
            tokio::time::sleep(Duration::from_secs(6)).await;
            sampler.check(&step, 3, false);
            kept(&step).await;
        }
    })
    .await;

    // Audit again: nothing written, values stay.
    set_spec(&env, "cp", &control_plane("Audit", full)).await;
    env.wait_converged("cp", 60).await;
    let before = writes_in(&env, &ns);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(writes_in(&env, &ns), before, "Audit writes nothing");
    sampler.check("Audit", 3, true);
    assert_eq!(gap("700m").await, None, "Audit keeps the values");
    installer_values_kept("Audit again").await;

    // Delete the policy: the values stay, the chart's PDB is untouched.
    Api::<MeshPolicy>::all(env.client.clone())
        .delete(&env.policy_name("cp"), &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    sampler.check("policy deleted", 3, true);
    assert_eq!(gap("700m").await, None, "the values stay after the delete");
    installer_values_kept("policy deleted").await;
    helm(
        &testplane::istio::helm3(),
        &kc,
        &["uninstall", name, "-n", &ns],
    );
}

/// What the sidecars rule reads to tell pod churn from a rollout, from the real controllers:
/// a pod of a rolled-out StatefulSet and of a rolled-out Deployment is deleted (as a drain
/// does); while the replacement is not ready yet, the StatefulSet keeps its update revision
/// current and the Deployment keeps `Progressing` at `NewReplicaSetAvailable`, so
/// `statefulset_rollout` and `deployment_rollout` read every state in between as rolled out.
#[tokio::test]
async fn pod_churn_after_a_rollout_keeps_the_controllers_completion_marks() {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use meshwarden::rules::sidecars::{Rollout, deployment_rollout, statefulset_rollout};

    let env = common::cluster_env("churn").await;
    let ns = env.namespace("apps", &[]).await;
    let c = &env.client;
    let mut sts = deployment("db", 2, json!({}));
    sts["kind"] = json!("StatefulSet");
    sts["spec"]["serviceName"] = json!("db");
    let sts: StatefulSet = serde_json::from_value(sts).unwrap();
    let statefulsets: Api<StatefulSet> = Api::namespaced(c.clone(), &ns);
    statefulsets
        .create(&PostParams::default(), &sts)
        .await
        .unwrap();
    let deploys: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    deploys
        .create(
            &PostParams::default(),
            &serde_json::from_value(deployment("web", 2, json!({}))).unwrap(),
        )
        .await
        .unwrap();
    let marks = |s: &StatefulSet, d: &Deployment| {
        let st = s.status.clone().unwrap_or_default();
        let progressing = d
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .find(|c| c.type_ == "Progressing")
            .and_then(|c| c.reason.clone());
        (
            st.current_revision.is_some() && st.current_revision == st.update_revision,
            progressing.as_deref() == Some("NewReplicaSetAvailable"),
        )
    };
    common::eventually(90, "both rolled out and ready", || async {
        let (s, d) = (
            statefulsets.get("db").await.ok()?,
            deploys.get("web").await.ok()?,
        );
        let ready = s.status.as_ref()?.ready_replicas == Some(2)
            && d.status.as_ref()?.available_replicas == Some(2);
        (ready && marks(&s, &d) == (true, true)).then_some(())
    })
    .await;

    // Every status the controllers write is seen through a watch (polling can miss a
    // replacement that kwok makes ready within a few milliseconds).
    use futures::{StreamExt, TryStreamExt};
    use kube::runtime::{WatchStreamExt, watcher};
    enum Seen {
        Sts(Box<StatefulSet>),
        Deploy(Box<Deployment>),
    }
    let sts_events = watcher(
        statefulsets.clone(),
        watcher::Config::default().fields("metadata.name=db"),
    )
    .applied_objects()
    .map_ok(|s| Seen::Sts(Box::new(s)));
    let deploy_events = watcher(
        deploys.clone(),
        watcher::Config::default().fields("metadata.name=web"),
    )
    .applied_objects()
    .map_ok(|d| Seen::Deploy(Box::new(d)));
    let mut events = futures::stream::select(sts_events.boxed(), deploy_events.boxed());
    // The watches are running (each has listed its object) before any pod goes away.
    let (mut s, mut d) = (None, None);
    while s.is_none() || d.is_none() {
        match events.next().await.expect("watch").expect("watch") {
            Seen::Sts(new) => s = Some(*new),
            Seen::Deploy(new) => d = Some(*new),
        }
    }
    let (mut s, mut d) = (s.expect("listed"), d.expect("listed"));

    let pods: Api<Pod> = Api::namespaced(c.clone(), &ns);
    for app in ["db", "web"] {
        let victim = ready_pods(&pods, app).await.remove(0);
        pods.delete(&victim.name_any(), &DeleteParams::default())
            .await
            .unwrap();
    }
    let (mut sts_unready, mut deploy_unavailable) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let next = tokio::time::timeout_at(deadline.into(), events.next()).await;
        let Ok(Some(event)) = next else {
            panic!(
                "the pods were not replaced in 60s (StatefulSet unready seen {sts_unready} times, Deployment unavailable {deploy_unavailable})"
            );
        };
        match event.expect("watch") {
            Seen::Sts(new) => s = *new,
            Seen::Deploy(new) => d = *new,
        }
        let ready = s
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        let available = d
            .status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0);
        if ready < 2 {
            sts_unready += 1;
        }
        if available < 2 {
            deploy_unavailable += 1;
        }
        assert_eq!(marks(&s, &d), (true, true), "{:?} {:?}", s.status, d.status);
        assert_eq!(statefulset_rollout(&s), Rollout::Complete, "{:?}", s.status);
        assert_eq!(deployment_rollout(&d), Rollout::Complete, "{:?}", d.status);
        if ready == 2 && available == 2 && sts_unready > 0 && deploy_unavailable > 0 {
            break;
        }
    }
}

/// Runs a Deployment `web` of one pod in `namespace` (injection on) and returns its pod once
/// the default istiod really injected it and it is ready.
async fn injected_web_pod(client: &Client, namespace: &str) -> Pod {
    let webs: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    webs.create(
        &PostParams::default(),
        &serde_json::from_value(deployment("web", 1, json!({}))).unwrap(),
    )
    .await
    .unwrap();
    let web_pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    common::eventually(90, "a ready injected web pod", || async {
        let p = ready_pods(&web_pods, "web").await;
        p.into_iter().find(|p| proxy_requests(p).is_some())
    })
    .await
}

/// The pod spec and metadata the default istiod's injection really produced, moved to revision
/// `revision` (the status annotation and revision labels) with the proxy image tag `tag`.
fn injected_as(pod: &Pod, app: &str, revision: &str, tag: &str) -> serde_json::Value {
    let ann = pod.annotations();
    let mut status: serde_json::Value =
        serde_json::from_str(&ann["sidecar.istio.io/status"]).unwrap();
    status["revision"] = json!(revision);
    let mut labels = pod.labels().clone();
    labels.remove("pod-template-hash");
    labels.insert("app".into(), app.into());
    labels.insert("service.istio.io/canonical-name".into(), app.into());
    if labels.contains_key("istio.io/rev") {
        labels.insert("istio.io/rev".into(), revision.into());
    }
    let mut spec = serde_json::to_value(pod.spec.clone().unwrap()).unwrap();
    spec.as_object_mut().unwrap().remove("nodeName");
    spec.as_object_mut()
        .unwrap()
        .remove("topologySpreadConstraints");
    for list in ["containers", "initContainers"] {
        for c in spec[list].as_array_mut().into_iter().flatten() {
            if c["name"] == "istio-proxy" {
                let image = c["image"].as_str().unwrap();
                let (repo, _) = image.rsplit_once(':').unwrap();
                c["image"] = json!(format!("{repo}:{tag}"));
            }
        }
    }
    json!({
        "metadata": {"labels": labels, "annotations": {"sidecar.istio.io/status": status.to_string()}},
        "spec": spec,
    })
}

/// What istiod's injection really wrote into the ready pods of `app` in `namespace`, per pod:
/// the `revision` of `sidecar.istio.io/status`, the `istio.io/rev` annotation (the injection
/// template writes it as an annotation, not a label) and the `istio-proxy` image tag.
async fn injections(client: &Client, namespace: &str, app: &str) -> Vec<(String, String, String)> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut out: Vec<(String, String, String)> = ready_pods(&pods, app)
        .await
        .iter()
        .map(|p| {
            let status: serde_json::Value = p
                .annotations()
                .get("sidecar.istio.io/status")
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or_default();
            let spec = p.spec.clone().unwrap_or_default();
            let proxy = spec
                .containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .find(|c| c.name == "istio-proxy")
                .and_then(|c| c.image.clone())
                .and_then(|i| i.rsplit_once(':').map(|(_, t)| t.to_string()))
                .unwrap_or_default();
            (
                status["revision"].as_str().unwrap_or_default().to_string(),
                p.annotations()
                    .get("istio.io/rev")
                    .cloned()
                    .unwrap_or_default(),
                proxy,
            )
        })
        .collect();
    out.sort();
    out
}

/// Waits until the one ready pod of `app` in `namespace` was injected by `revision` (both
/// annotations) with proxy `tag`.
async fn injected_by(client: &Client, namespace: &str, app: &str, revision: &str, tag: &str) {
    let want = vec![(revision.to_string(), revision.to_string(), tag.to_string())];
    let what = format!("{namespace}/{app} injected by {revision} with {tag}");
    wait_equal(90, &what, || injections(client, namespace, app), want).await;
}

/// Waits up to `secs` until `get()` returns `expected`; panics with what it returned.
async fn wait_equal<T, F, Fut>(secs: u64, what: &str, get: F, expected: T)
where
    T: PartialEq + std::fmt::Debug,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let start = Instant::now();
    loop {
        let got = get().await;
        if got == expected {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what}: got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The upgrades section with two istiod revisions really injecting (issue 14): the shared
/// cluster's default istiod (1.31-dev) and a second revision `canary` (`helm install
/// istiod-canary <istio-discovery> -n istio-system --set revision=canary`, image tag 1.33.1, a
/// revision tag through the chart's `revisionTags`) whose own `pilot-discovery` runs on the host
/// (`testplane::istio::start_revision`). Pods are injected by the canary through
/// `istio.io/rev=canary` and through the tag, by the default revision through
/// `istio-injection=enabled`; a namespace names a missing revision, one has both injection
/// labels, a tag points at a revision that does not run. `restartOutdated: true,
/// maxConcurrentRestarts: 1`. After every step the condition, the violations with their
/// actions, `status.upgrades` proxies, the counts and the metric are exact:
/// 0. Audit: no namespace selects the canary and no running proxy is its, but a pending pod
///    the canary injected keeps it in use (`RevisionKeptByIdlePods`).
/// 1. Audit: namespaces on the canary (directly and through the tag), every pod on its
///    revision, nothing outdated, nothing written. One canary workload, `a`, runs on one node
///    with a host port.
/// 2. Audit: a namespace moved from canary to `istio.io/rev=default` (its running pod keeps
///    its canary proxy).
/// 3. Enforce: nothing is outdated, nothing is written.
/// 4. `helm upgrade` of the canary to 1.35.0: the five canary workloads are two minors behind;
///    `a` (first in order) is restarted and its restart stalls (the surge pod cannot get the
///    host port; progress deadline 5 s): `RolloutStalled`, the four others held behind it,
///    none restarted.
/// 5. The owner drops the host port: `a`'s own rollout finishes (not restarted on top of it),
///    the four are restarted one at a time and re-injected for real by the revision their
///    namespace selects now (canary 1.35.0; default 1.31-dev for the moved namespace).
/// 6. Converged: no write over two more reconciles.
/// 7. The canary upgraded again (1.37.0): the workloads meshwarden restarted for 1.35.0 are
///    restarted again (the restart recorded the revision and version it aimed for), one at a
///    time, and re-injected with 1.37.0. 8. Converged: no write over two more reconciles.
/// 9. `helm rollback` of the canary: its proxies are newer than istiod, reported and never
///    restarted.
#[tokio::test]
async fn upgrades_with_two_real_revisions_report_and_restart_paced() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;

    let env = common::cluster_env("canary").await;
    let id = env.id.clone();
    let mine = ("meshwarden-upgrades", id.as_str());
    let tag = format!("{id}-prod");
    let started = Instant::now();
    let canary = testplane::istio::start_revision(
        &env.plane.dir,
        &env.plane.kubeconfig,
        "canary",
        &[
            format!("revisionTags={{{tag}}}"),
            "global.configValidation=false".into(),
            "global.tag=1.33.1".into(),
        ],
    )
    .await
    .unwrap();
    eprintln!("canary istiod serving after {:?}", started.elapsed());
    // A tag whose revision does not run.
    let old_tag = format!("{id}-old");
    let mwc: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": format!("istio-revision-tag-{old_tag}"),
                     "labels": {"istio.io/tag": old_tag, "istio.io/rev": format!("{id}-gone")}},
        "webhooks": [],
    }))
    .unwrap();
    Api::<MutatingWebhookConfiguration>::all(env.client.clone())
        .create(&PostParams::default(), &mwc)
        .await
        .unwrap();
    let web = env
        .namespace("web", &[mine, ("istio-injection", "enabled")])
        .await;
    // Labelled with their revision (or tag) once step 0 is checked.
    let can = env.namespace("canary", &[mine]).await;
    let tagged = env.namespace("tagged", &[mine]).await;
    let moved = env.namespace("move", &[mine]).await;
    let idle = env
        .namespace("idle", &[mine, ("istio.io/rev", "canary")])
        .await;
    let missing = env
        .namespace("missing", &[mine, ("istio.io/rev", "retired")])
        .await;
    let both = env
        .namespace(
            "both",
            &[
                mine,
                ("istio-injection", "enabled"),
                ("istio.io/rev", "canary"),
            ],
        )
        .await;
    // Moved to the canary in step 1; first in name order (its restart takes the first slot).
    let stall = env.namespace("a-stall", &[mine]).await;
    // A pod the canary really injects that never runs (no node matches); its namespace then
    // stops selecting the canary.
    let stuck: Pod = serde_json::from_value(json!({
        "metadata": {"name": "stuck", "labels": {"app": "stuck"}},
        "spec": {
            "nodeSelector": {"meshwarden.io/no-such-node": "x"},
            "containers": [{"name": "app", "image": "registry.example/app:1"}],
        },
    }))
    .unwrap();
    let stuck = Api::<Pod>::namespaced(env.client.clone(), &idle)
        .create(&PostParams::default(), &stuck)
        .await
        .unwrap();
    assert!(
        stuck.annotations()["sidecar.istio.io/status"].contains("\"revision\":\"canary\""),
        "{:?}",
        stuck.annotations()
    );
    let relabel = |ns: &str, labels: serde_json::Value| {
        let (namespaces, ns) = (Api::<Namespace>::all(env.client.clone()), ns.to_string());
        async move {
            namespaces
                .patch(
                    &ns,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": labels}})),
                )
                .await
                .unwrap();
        }
    };
    relabel(
        &idle,
        json!({"istio.io/rev": null, "istio-injection": "disabled"}),
    )
    .await;
    let api = |ns: &str| Api::<Deployment>::namespaced(env.client.clone(), ns);
    let create = |ns: &str, d: serde_json::Value| {
        let api = api(ns);
        async move {
            api.create(&PostParams::default(), &serde_json::from_value(d).unwrap())
                .await
                .unwrap();
        }
    };
    create(&web, deployment("web", 1, json!({}))).await;
    injected_by(&env.client, &web, "web", "default", "1.31-dev").await;

    let spec = |mode: &str| {
        format!(
            "enforcement: {mode}\nupgrades:\n  restartOutdated: true\n  maxConcurrentRestarts: 1\n  namespaceSelector: {{matchLabels: {{meshwarden-upgrades: {id}}}}}\n"
        )
    };
    env.create_policy("canary", &spec("Audit")).await;
    let op = env.start_operator().await;
    let policy = env.policy_name("canary");
    let mine_ns = [&web, &can, &tagged, &moved, &idle, &missing, &both, &stall];
    let writes = |env: &common::Env| mine_ns.iter().map(|ns| writes_in(env, ns)).sum::<usize>();
    // Waits until the section reports exactly `objects` (object, action) with `reason`, the
    // running proxies `proxies` (revision, version, pods) and `compliant` of them; then checks
    // the settled status and the metric. Returns the policy.
    let report = |step: &'static str,
                  reason: &'static str,
                  objects: Vec<(String, &'static str)>,
                  proxies: Vec<(&'static str, &'static str, i32)>,
                  compliant: i32| {
        let (env, op, policy) = (&env, &op, &policy);
        let always = [
            (format!("Namespace/{missing}"), "Reported"),
            (format!("Namespace/{both}"), "Reported"),
            (format!("RevisionTag/{old_tag}"), "Reported"),
        ];
        // Revision tags are mesh-wide: another test's may be listed too.
        let own_tag = format!("RevisionTag/{old_tag}");
        async move {
            let mut want: Vec<(String, String)> = objects
                .into_iter()
                .chain(always)
                .map(|(o, a)| (o, a.to_string()))
                .collect();
            want.sort();
            let counts: Vec<(String, String, i32)> = proxies
                .iter()
                .map(|(r, v, n)| (r.to_string(), v.to_string(), *n))
                .collect();
            let targets: i32 = proxies.iter().map(|p| p.2).sum();
            let seen = |p: &MeshPolicy| {
                let c = common::condition(p, "Upgrades")?;
                let st = p.status.as_ref()?;
                let mut found: Vec<(String, String)> = st
                    .violations
                    .iter()
                    .filter(|v| !v.object.starts_with("RevisionTag/") || v.object == own_tag)
                    .map(|v| (v.object.clone(), v.action.as_str().to_string()))
                    .collect();
                found.sort();
                let got: Vec<(String, String, i32)> = st
                    .upgrades
                    .as_ref()?
                    .proxies
                    .iter()
                    .map(|c| (c.revision.clone(), c.version.clone(), c.pods))
                    .collect();
                (c.reason == reason
                    && found == want
                    && got == counts
                    && (st.targets, st.compliant) == (targets, compliant))
                    .then_some(())
            };
            env.wait_policy("canary", 90, seen).await;
            let p = env.wait_converged("canary", 60).await;
            assert!(seen(&p).is_some(), "{step}: {:#?}", p.status);
            let c = common::condition(&p, "Upgrades").unwrap();
            assert_eq!(c.status, "False", "{step}: {c:?}");
            let prefix = format!("meshwarden_proxies{{policy=\"{policy}\",");
            let text = op.state.ctx.metrics.encode();
            let mut lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
            lines.sort();
            let expected: Vec<String> = proxies
                .iter()
                .map(|(r, v, n)| format!("{prefix}revision=\"{r}\",version=\"{v}\"}} {n}"))
                .collect();
            assert_eq!(lines, expected, "{step}: the metric");
            eprintln!("{step}: checked after {:?}", started.elapsed());
            p
        }
    };

    // 0. Audit: the canary runs, no namespace selects it and no running proxy is its: only
    // the pending pod keeps it in use.
    let p = report(
        "canary kept by a pending pod",
        "UnknownRevision",
        vec![("Revision/canary".into(), "Reported")],
        vec![("default", "1.31-dev", 1)],
        1,
    )
    .await;
    let v = &p.status.as_ref().unwrap().violations;
    let kept = v.iter().find(|v| v.object == "Revision/canary").unwrap();
    assert!(kept.message.contains(&format!("{idle}/stuck")), "{kept:?}");

    // 1. Audit: namespaces on the canary, directly and through the tag; pods on both
    // revisions, nothing outdated.
    relabel(&can, json!({"istio.io/rev": "canary"})).await;
    relabel(&moved, json!({"istio.io/rev": "canary"})).await;
    relabel(&tagged, json!({"istio.io/rev": tag})).await;
    relabel(&stall, json!({"istio.io/rev": "canary"})).await;
    let canaries = [(&can, "c1"), (&can, "c2"), (&tagged, "t1"), (&moved, "m1")];
    for (ns, name) in canaries {
        create(ns, deployment(name, 1, json!({}))).await;
    }
    // a: one replica on one node with a host port, so that the surge pod of a restart can
    // never start (progress deadline 5 s).
    let node = Api::<Node>::all(env.client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items[1]
        .name_any();
    let mut a = deployment("a", 1, json!({}));
    a["spec"]["progressDeadlineSeconds"] = json!(5);
    a["spec"]["template"]["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    a["spec"]["template"]["spec"]["containers"][0]["ports"] =
        json!([{"containerPort": 8080, "hostPort": 18081}]);
    create(&stall, a).await;
    for (ns, name) in canaries.iter().chain([&(&stall, "a")]) {
        injected_by(&env.client, ns, name, "canary", "1.33.1").await;
    }
    let a_id = format!("Deployment/{stall}/a");
    let p = report(
        "pods on both revisions",
        "UnknownRevision",
        vec![],
        vec![("canary", "1.33.1", 5), ("default", "1.31-dev", 1)],
        6,
    )
    .await;
    let st = p.status.as_ref().unwrap().upgrades.clone().unwrap();
    let revs: Vec<(String, String)> = st
        .revisions
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    assert!(
        revs.contains(&("canary".into(), "1.33.1".into())),
        "{revs:?}"
    );
    assert!(
        revs.contains(&("default".into(), "1.31-dev".into())),
        "{revs:?}"
    );
    let tags: Vec<(String, String)> = st
        .tags
        .iter()
        .map(|t| (t.name.clone(), t.revision.clone()))
        .collect();
    assert!(tags.contains(&(tag.clone(), "canary".into())), "{tags:?}");
    assert!(
        tags.contains(&(old_tag.clone(), format!("{id}-gone"))),
        "{tags:?}"
    );

    // 2. Audit: `move` now selects the default revision.
    relabel(&moved, json!({"istio.io/rev": "default"})).await;
    // The running proxies from step 2 until the canary's workloads are restarted.
    let before_upgrade = || vec![("canary", "1.33.1", 5), ("default", "1.31-dev", 1)];
    report(
        "namespace moved",
        "UnknownRevision",
        vec![],
        before_upgrade(),
        6,
    )
    .await;
    // Relabelling a namespace re-injects nothing that runs.
    injected_by(&env.client, &moved, "m1", "canary", "1.33.1").await;
    assert_eq!(writes(&env), 0, "Audit writes nothing");

    // 3. Enforce: nothing is outdated, nothing is written.
    set_spec(&env, "canary", &spec("Enforce")).await;
    report(
        "Enforce, nothing outdated",
        "UnknownRevision",
        vec![],
        before_upgrade(),
        6,
    )
    .await;
    assert_eq!(writes(&env), 0, "nothing to restart");

    // 4. The canary upgraded to 1.35.0 by Helm: its four workloads are two minors behind and
    // held behind the stalled restart.
    let chart = testplane::istio::chart("istiod").display().to_string();
    let kc = env.plane.kubeconfig.clone();
    let upgrade_canary = |version: &str| {
        helm(
            &testplane::istio::helm(),
            &kc,
            &[
                "upgrade",
                &canary.release,
                &chart,
                "-n",
                "istio-system",
                "--reuse-values",
                "--set",
                &format!("global.tag={version}"),
            ],
        );
    };
    upgrade_canary("1.35.0");
    let ids: Vec<String> = canaries
        .iter()
        .map(|(ns, n)| format!("Deployment/{ns}/{n}"))
        .collect();
    let with = |action: &'static str| -> Vec<(String, &'static str)> {
        ids.iter().map(|i| (i.clone(), action)).collect()
    };
    let mut held = with("Held");
    held.push((a_id.clone(), "Reported"));
    report(
        "canary upgraded: a restarted and stalled, the others held behind it",
        "RolloutStalled",
        held,
        before_upgrade(),
        1,
    )
    .await;
    let only_stall = writes_in(&env, &stall);
    assert!(only_stall >= 1, "a restarted");
    assert_eq!(writes(&env), only_stall, "only a was written");
    let four = || sample_restarts(canaries.iter().map(|(ns, n)| (api(ns), *n)).collect());
    let held_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < held_until {
        let (all, _) = four().await;
        for d in &all {
            assert!(
                !d.annotations()
                    .contains_key("meshwarden.io/restart-generation"),
                "{} restarted while a is stalled",
                d.name_any()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        writes(&env),
        only_stall,
        "nothing restarted while a is stalled"
    );

    // 5. The owner drops a's host port: its rollout finishes (re-injected by the canary, now
    // 1.35.0), and the four restart one at a time, re-injected by the revision their namespace
    // selects now.
    api(&stall)
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([
                    {"op": "remove", "path": "/spec/template/spec/containers/0/ports"},
                ]))
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    let most = restarts_finish(&four).await;
    assert_eq!(
        most, 1,
        "restarts rolling at once (maxConcurrentRestarts 1)"
    );
    for (ns, name) in canaries {
        let (rev, version) = if ns == &moved {
            ("default", "1.31-dev")
        } else {
            ("canary", "1.35.0")
        };
        injected_by(&env.client, ns, name, rev, version).await;
    }
    injected_by(&env.client, &stall, "a", "canary", "1.35.0").await;
    report(
        "restarted and re-injected",
        "UnknownRevision",
        vec![],
        vec![("canary", "1.35.0", 4), ("default", "1.31-dev", 2)],
        6,
    )
    .await;

    // 6. Converged: no write over two more reconciles.
    let before = writes(&env);
    two_more_reconciles(&env, &op.state, &web).await;
    assert_eq!(writes(&env), before, "a converged mesh costs no write");

    // 7. The canary upgraded again: the workloads meshwarden restarted for canary@1.35.0 are
    // restarted again for canary@1.37.0 (their restart recorded its target), and a, changed
    // by its owner since; one at a time, re-injected for real.
    upgrade_canary("1.37.0");
    let again = || {
        let apis = canaries
            .iter()
            .filter(|(ns, _)| *ns != &moved)
            .map(|(ns, n)| (api(ns), *n))
            .chain([(api(&stall), "a")])
            .collect();
        sample_restarts(apis)
    };
    // Until each was restarted for 1.37.0 and rolled out: the most rolling at once.
    let (mut most, start) = (0, Instant::now());
    loop {
        let (all, n) = again().await;
        most = most.max(n);
        let done = all.iter().all(|d| {
            d.annotations()
                .get("meshwarden.io/restart-target")
                .map(String::as_str)
                == Some("canary@1.37.0")
                && !rolling(d)
        });
        if done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the restarts for 1.37.0 did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        most, 1,
        "restarts rolling at once (maxConcurrentRestarts 1)"
    );
    for (ns, name) in canaries
        .iter()
        .filter(|(ns, _)| *ns != &moved)
        .chain([&(&stall, "a")])
    {
        injected_by(&env.client, ns, name, "canary", "1.37.0").await;
    }
    report(
        "upgraded again: restarted again",
        "UnknownRevision",
        vec![],
        vec![("canary", "1.37.0", 4), ("default", "1.31-dev", 2)],
        6,
    )
    .await;
    let targets: Vec<String> = again()
        .await
        .0
        .iter()
        .map(|d| d.annotations()["meshwarden.io/restart-target"].clone())
        .collect();
    assert_eq!(targets, vec!["canary@1.37.0".to_string(); 4]);
    // 8. Converged again: no write over two more reconciles.
    let before = writes(&env);
    two_more_reconciles(&env, &op.state, &web).await;
    assert_eq!(writes(&env), before, "a converged mesh costs no write");

    // 9. `helm rollback` of the canary (to 1.35.0), as in an incident: every canary proxy is
    // newer than its istiod; reported, never restarted.
    helm(
        &testplane::istio::helm(),
        &kc,
        &["rollback", &canary.release, "-n", "istio-system"],
    );
    let mut newer = with("Reported");
    newer.retain(|(i, _)| !i.contains(&format!("/{moved}/")));
    newer.push((a_id.clone(), "Reported"));
    let p = report(
        "istiod rolled back: newer proxies reported",
        "UnknownRevision",
        newer,
        vec![("canary", "1.37.0", 4), ("default", "1.31-dev", 2)],
        2,
    )
    .await;
    let v = p
        .status
        .as_ref()
        .unwrap()
        .violations
        .iter()
        .find(|v| v.object == a_id)
        .unwrap();
    assert!(
        v.message.contains("newer than istiod canary (1.35.0)"),
        "{v:?}"
    );
    two_more_reconciles(&env, &op.state, &web).await;
    assert_eq!(
        writes(&env),
        before,
        "nothing restarted after a rollback of istiod"
    );

    op.stop().await;
    Api::<MutatingWebhookConfiguration>::all(env.client.clone())
        .delete(
            &format!("istio-revision-tag-{old_tag}"),
            &Default::default(),
        )
        .await
        .unwrap();
    canary.stop().unwrap();
    eprintln!("done after {:?}", started.elapsed());
}

/// The Deployments `apis` name, and how many of them roll because of meshwarden's restart.
async fn sample_restarts(apis: Vec<(Api<Deployment>, &str)>) -> (Vec<Deployment>, usize) {
    let mut all = Vec::new();
    for (a, n) in &apis {
        all.push(a.get(n).await.unwrap());
    }
    let rolling = all.iter().filter(|d| restart_rolling(d)).count();
    (all, rolling)
}

/// Whether a Deployment rolls because of meshwarden's restart: its current generation is the
/// one the restart produced.
fn restart_rolling(d: &Deployment) -> bool {
    let ours = d
        .annotations()
        .get("meshwarden.io/restart-generation")
        .and_then(|g| g.parse::<i64>().ok())
        == d.metadata.generation;
    ours && rolling(d)
}

/// Samples the Deployments until every one is at the generation meshwarden's restart produced
/// and none rolls; returns the most that rolled because of a restart at once.
async fn restarts_finish<F, Fut>(sample: &F) -> usize
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (Vec<Deployment>, usize)>,
{
    let (mut most, start) = (0, Instant::now());
    loop {
        let (all, n) = sample().await;
        most = most.max(n);
        let done = all.iter().all(|d| {
            d.annotations()
                .get("meshwarden.io/restart-generation")
                .and_then(|g| g.parse::<i64>().ok())
                == d.metadata.generation
        });
        if done && all.iter().all(|d| !rolling(d)) {
            return most;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the restarts did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits up to 60 s until `actions()` returns `expected`; panics with what it returned.
async fn wait_for_actions<F, Fut>(actions: &F, expected: Vec<(String, String)>, what: &str)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<(String, String)>>,
{
    let what = format!("{what}: violations and actions");
    wait_equal(60, &what, actions, expected).await;
}

/// Makes the operator reconcile twice more (a namespace label change reaches upgrades
/// policies) and waits for it.
async fn two_more_reconciles(
    env: &common::Env,
    state: &meshwarden::controller::State,
    namespace: &str,
) {
    let metrics = state.ctx.metrics.clone();
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    for round in 0..2 {
        let before = metrics.reconciles.get();
        namespaces
            .patch(
                namespace,
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"labels": {"touched": format!("{round}-{before}")}}}),
                ),
            )
            .await
            .unwrap();
        common::eventually(30, "one more reconcile", || async {
            (metrics.reconciles.get() > before).then_some(())
        })
        .await;
    }
}

/// `restartOutdated` never restarts into no injected proxy: four Deployments whose proxies (the
/// default injection's pod, moved to proxy 1.29.0, carried in their templates) are two minor
/// versions behind the default istiod, in namespaces with injection disabled, so no injector
/// would give their new pods a current proxy. Audit reports them; Enforce skips them with that
/// reason and writes nothing, over two more reconciles too; the pods are never replaced. (On
/// the code before the rollout gate, Enforce restarted all four, and their new pods came up
/// with the same outdated proxy.)
#[tokio::test]
async fn upgrades_never_restarts_where_no_injector_gives_a_current_proxy() {
    let env = common::cluster_env("restarts").await;
    let id = env.id.clone();
    let mine = ("meshwarden-upgrades", id.as_str());
    let web = env
        .namespace("web", &[("istio-injection", "enabled")])
        .await;
    let injected = injected_web_pod(&env.client, &web).await;
    let first = env
        .namespace("a-stall", &[mine, ("istio-injection", "disabled")])
        .await;
    let rest = env
        .namespace("b-rest", &[mine, ("istio-injection", "disabled")])
        .await;
    let outdated = |name: &str| {
        let mut d = deployment(name, 1, json!({}));
        d["spec"]["template"] = injected_as(&injected, name, "default", "1.29.0");
        d
    };
    let firsts: Api<Deployment> = Api::namespaced(env.client.clone(), &first);
    let rests: Api<Deployment> = Api::namespaced(env.client.clone(), &rest);
    firsts
        .create(
            &PostParams::default(),
            &serde_json::from_value(outdated("a")).unwrap(),
        )
        .await
        .unwrap();
    for name in ["b", "c", "d"] {
        rests
            .create(
                &PostParams::default(),
                &serde_json::from_value(outdated(name)).unwrap(),
            )
            .await
            .unwrap();
    }
    let sample = || {
        let (firsts, rests) = (firsts.clone(), rests.clone());
        async move {
            let mut all = firsts.list(&ListParams::default()).await.unwrap().items;
            all.extend(rests.list(&ListParams::default()).await.unwrap().items);
            all
        }
    };
    common::eventually(90, "four available outdated Deployments", || async {
        let all = sample().await;
        (all.len() == 4 && all.iter().all(|d| !rolling(d))).then_some(())
    })
    .await;
    // The pods running now: none may be replaced.
    let pod_names = || {
        let client = env.client.clone();
        let (first, rest) = (first.clone(), rest.clone());
        async move {
            let mut names = Vec::new();
            for ns in [first, rest] {
                let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
                for p in pods.list(&ListParams::default()).await.unwrap().items {
                    names.push(format!("{ns}/{}", p.name_any()));
                }
            }
            names.sort();
            names
        }
    };
    let running = pod_names().await;
    assert_eq!(running.len(), 4, "{running:?}");
    let selector = format!("namespaceSelector: {{matchLabels: {{meshwarden-upgrades: {id}}}}}");
    let spec = |mode: &str| {
        format!(
            "enforcement: {mode}\nupgrades:\n  restartOutdated: true\n  maxConcurrentRestarts: 2\n  {selector}\n"
        )
    };
    env.create_policy("restarts", &spec("Audit")).await;
    let op = env.start_operator().await;
    let writes = |env: &common::Env| writes_in(env, &first) + writes_in(env, &rest);
    let policy_api: Api<MeshPolicy> = Api::all(env.client.clone());
    let policy = env.policy_name("restarts");
    let violations = || {
        let api = policy_api.clone();
        let policy = policy.clone();
        async move {
            let p = api.get(&policy).await.unwrap();
            let mut v: Vec<(String, String, String)> = p
                .status
                .unwrap_or_default()
                .violations
                .into_iter()
                // Revision tags are mesh-wide: another test's may be listed too.
                .filter(|v| v.object.starts_with("Deployment/"))
                .map(|v| (v.object, v.action.as_str().to_string(), v.message))
                .collect();
            v.sort();
            v
        }
    };
    let ids: Vec<String> = [(&first, "a"), (&rest, "b"), (&rest, "c"), (&rest, "d")]
        .iter()
        .map(|(ns, n)| format!("Deployment/{ns}/{n}"))
        .collect();
    let actions = || async {
        violations()
            .await
            .into_iter()
            .map(|(o, a, _)| (o, a))
            .collect::<Vec<_>>()
    };
    let all_with = |action: &str| -> Vec<(String, String)> {
        ids.iter()
            .map(|i| (i.clone(), action.to_string()))
            .collect()
    };

    // 1. Audit: every outdated workload reported, nothing written.
    wait_for_actions(&actions, all_with("Reported"), "Audit").await;
    for (o, _, m) in violations().await {
        assert!(
            m.contains("1.29.0, 2 minor version(s) behind istiod default"),
            "{o}: {m}"
        );
    }
    assert_eq!(writes(&env), 0, "Audit writes nothing");

    // 2. Enforce: each skipped with the reason, nothing written, no pod replaced, also over
    // two more reconciles.
    set_spec(&env, "restarts", &spec("Enforce")).await;
    wait_for_actions(&actions, all_with("Skipped"), "Enforce").await;
    for (o, _, m) in violations().await {
        assert!(
            m.contains(
                "a restart would give its pods no sidecar (injection disabled in the namespace)"
            ),
            "{o}: {m}"
        );
    }
    two_more_reconciles(&env, &op.state, &first).await;
    assert_eq!(writes(&env), 0, "nothing restarted");
    assert_eq!(pod_names().await, running, "no pod replaced");
    for d in sample().await {
        assert!(
            !d.annotations()
                .contains_key("meshwarden.io/restart-generation"),
            "{} restarted",
            d.name_any()
        );
    }
    op.stop().await;
}

/// istiod writes its root certificate into the `istio-ca-root-cert` ConfigMap of every
/// namespace it serves; the certificates section reads that real root (issue 14).
#[tokio::test]
async fn the_certificates_section_reads_istiods_own_root() {
    use meshwarden::rules::certificates::facts::{Bundle, parse_bundle};
    let env = common::cluster_env("roots").await;
    let ns = env.namespace("app", &[]).await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &ns);
    let pem = common::eventually(30, "istiod writes istio-ca-root-cert", || async {
        cms.get_opt("istio-ca-root-cert")
            .await
            .ok()??
            .data?
            .remove("root-cert.pem")
    })
    .await;
    let Bundle::Roots(istiod_roots) = parse_bundle(&pem) else {
        panic!("istiod's root-cert.pem is not readable:\n{pem}")
    };
    let op = env.start_operator().await;
    env.create_policy("p", "certificates: {}").await;
    let p = env
        .wait_policy("p", 30, |p| {
            let c = common::condition(p, "Certificates")?;
            (c.reason == "Compliant").then(|| p.clone())
        })
        .await;
    let roots = p.status.unwrap().certificates.unwrap().roots;
    assert_eq!(roots.len(), 1, "one root in the mesh: {roots:?}");
    let root = &roots[0];
    assert_eq!(root.fingerprint, istiod_roots[0].fingerprint);
    // Istio's self-signed CA: organisation = the trust domain, valid ten years.
    assert!(root.subject.contains("O=cluster.local"), "{}", root.subject);
    assert!(root.days_left > 3000, "{root:?}");
    assert!(
        root.namespaces >= 2,
        "istio-system and {ns} at least: {root:?}"
    );
    op.stop().await;
}
