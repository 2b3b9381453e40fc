//! What the full-cluster scenarios share: namespaces, Deployments, pods and their injected
//! proxies, Helm, the test policy's spec, the operator's writes, waiting.

use super::*;

/// Held by every test whose policy has an `upgrades` section, from before it creates the
/// policy until it has deleted it ([`common::Env::delete_policies`]): the section is
/// mesh-wide, so of two policies that set it differently the older one wins and the newer
/// one's section is not evaluated at all (a `Conflict`), whatever their namespace selectors.
pub static UPGRADES_POLICY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn namespace(client: &Client, name: &str, labels: serde_json::Value) {
    let ns: Namespace = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

pub fn deployment(name: &str, replicas: i32, annotations: serde_json::Value) -> serde_json::Value {
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
pub async fn create_deployments(client: &Client, ns: &str, names: &[&str]) {
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
pub async fn ready_pods(pods: &Api<Pod>, app: &str) -> Vec<Pod> {
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

pub fn proxy_requests(p: &Pod) -> Option<(String, String)> {
    let spec = p.spec.as_ref()?;
    let proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == "istio-proxy")?;
    let r = proxy.resources.as_ref()?.requests.as_ref()?;
    Some((r.get("cpu")?.0.clone(), r.get("memory")?.0.clone()))
}

/// Runs a Helm binary against the cluster; panics with Helm's message when it fails.
pub fn helm(bin: &std::path::Path, kubeconfig: &std::path::Path, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    testplane::istio::run_helm(bin, &args, Some(kubeconfig))
        .unwrap_or_else(|e| panic!("helm failed: {e}"))
}

/// Replaces the spec of a test's policy with `yaml`.
pub async fn set_spec(env: &common::Env, name: &str, yaml: &str) {
    env.set_spec(name, yaml).await;
}

/// The operator's writes in `namespace` so far.
pub fn writes_in(env: &common::Env, namespace: &str) -> usize {
    env.operator_writes_to(|o| o["namespace"] == namespace)
}

/// Runs a Deployment `web` of one pod in `namespace` (injection on) and returns its pod once
/// the default istiod really injected it and it is ready.
pub async fn injected_web_pod(client: &Client, namespace: &str) -> Pod {
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
pub fn injected_as(pod: &Pod, app: &str, revision: &str, tag: &str) -> serde_json::Value {
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

/// For the upgrades scenarios: the label that puts a test's namespaces under its policy's
/// `namespaceSelector` (`meshwarden-upgrades: <test id>`), and a pod the default istiod
/// really injected (in a namespace of its own), whose spec [`outdated_deployment`] copies.
pub async fn upgrades_fixture(env: &common::Env) -> ((&'static str, String), Pod) {
    let web = env
        .namespace("web", &[("istio-injection", "enabled")])
        .await;
    let injected = injected_web_pod(&env.client, &web).await;
    (("meshwarden-upgrades", env.id.clone()), injected)
}

/// A one-replica Deployment `name` whose pod template is what the default istiod's injection
/// really produced for `injected`, with proxy image tag `tag`: its pods run that proxy.
pub fn outdated_deployment(injected: &Pod, name: &str, tag: &str) -> Deployment {
    let mut d = deployment(name, 1, json!({}));
    d["spec"]["template"] = injected_as(injected, name, "default", tag);
    serde_json::from_value(d).unwrap()
}

/// What istiod's injection really wrote into the ready pods of `app` in `namespace`, per pod:
/// the `revision` of `sidecar.istio.io/status`, the `istio.io/rev` annotation (the injection
/// template writes it as an annotation, not a label) and the `istio-proxy` image tag.
pub async fn injections(
    client: &Client,
    namespace: &str,
    app: &str,
) -> Vec<(String, String, String)> {
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
pub async fn injected_by(client: &Client, namespace: &str, app: &str, revision: &str, tag: &str) {
    let want = vec![(revision.to_string(), revision.to_string(), tag.to_string())];
    let what = format!("{namespace}/{app} injected by {revision} with {tag}");
    wait_equal(90, &what, || injections(client, namespace, app), want).await;
}

/// Waits up to `secs` until `get()` returns `expected`; panics with what it returned.
pub async fn wait_equal<T, F, Fut>(secs: u64, what: &str, get: F, expected: T)
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

/// Waits up to 60 s until `actions()` returns `expected`; panics with what it returned.
pub async fn wait_for_actions<F, Fut>(actions: &F, expected: Vec<(String, String)>, what: &str)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Vec<(String, String)>>,
{
    let what = format!("{what}: violations and actions");
    wait_equal(60, &what, actions, expected).await;
}

/// Makes the operator reconcile twice more (a namespace label change reaches upgrades
/// policies) and waits for it.
pub async fn two_more_reconciles(
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
