//! Sidecar resources at scale (issue 5): N injected namespaces with D Deployments and P running
//! pods; time for the operator (a separate process) to write the four proxy annotations on every
//! Deployment with pacing off, its writes, its peak RSS, and a direct server-side-apply baseline
//! of the same annotations measured in the same run.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use meshwarden::api::MeshPolicy;
use meshwarden::quantity;
use meshwarden::rules::sidecars::{
    HASH_ANNOTATION, PROXY_CPU, PROXY_CPU_LIMIT, PROXY_MEMORY, PROXY_MEMORY_LIMIT,
    WRITE_CONCURRENCY,
};
use serde_json::json;

use crate::settle;

/// Concurrency of the bench's own setup requests.
pub(crate) const SETUP_CONCURRENCY: usize = 32;
/// Label on everything the benchmark creates.
pub(crate) const LABEL: (&str, &str) = ("meshwarden-bench", "sidecars");
/// The declared values (policy) and the annotations they give.
pub(crate) const DECLARED: [(&str, &str); 4] = [
    (PROXY_CPU, "100m"),
    (PROXY_CPU_LIMIT, "1"),
    (PROXY_MEMORY, "128Mi"),
    (PROXY_MEMORY_LIMIT, "512Mi"),
];
/// Replicas of every Deployment.
pub(crate) const REPLICAS: i32 = 2;
pub(crate) const BASELINE_MANAGER: &str = "bench-baseline";

pub(crate) fn ns_name(i: usize) -> String {
    format!("bench-sc-{i:03}")
}

pub(crate) fn deploy_name(i: usize) -> String {
    format!("app-{i:05}")
}

pub(crate) fn deployment(ns: &str, name: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, "labels": {LABEL.0: LABEL.1, "app": name}},
        "spec": {
            "replicas": REPLICAS,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, "version": "v1"},
                             "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8080"}},
                "spec": {"containers": [{
                    "name": "app", "image": "registry.example/team/app:1.2.3",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                                  "limits": {"memory": "256Mi"}}
                }]}
            }
        }
    }))
    .expect("deployment")
}

/// A pod as the ReplicaSet and Istio's injector would have created it.
pub(crate) fn pod(ns: &str, owner: &str, i: usize) -> Pod {
    let hash = "5d8f7c9b4";
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": format!("{owner}-{hash}-{i:05}"), "namespace": ns,
            "labels": {LABEL.0: LABEL.1, "app": owner, "version": "v1", "pod-template-hash": hash,
                       "security.istio.io/tlsMode": "istio", "service.istio.io/canonical-name": owner},
            "annotations": {"sidecar.istio.io/status": "{\"initContainers\":[\"istio-init\"],\"containers\":[\"istio-proxy\"],\"volumes\":[\"istio-envoy\",\"istio-data\",\"istio-podinfo\",\"istio-token\",\"istiod-ca-cert\"],\"imagePullSecrets\":null,\"revision\":\"default\"}",
                            "prometheus.io/scrape": "true"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{owner}-{hash}"),
                                 "uid": "00000000-0000-0000-0000-000000000001", "controller": true}]
        },
        "spec": {
            "nodeName": "node-1",
            "containers": [
                {"name": "app", "image": "registry.example/team/app:1.2.3",
                 "ports": [{"name": "http", "containerPort": 8080}],
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}},
                {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.30.3",
                 "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
                 "resources": {"requests": {"cpu": "10m", "memory": "40Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}}}
            ]
        }
    }))
    .expect("pod")
}

pub(crate) fn has_declared(d: &Deployment) -> bool {
    let ann = d
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref());
    let Some(ann) = ann else { return false };
    DECLARED
        .iter()
        .all(|(k, want)| ann.get(*k).is_some_and(|have| quantity::same(have, want)))
}

fn carries_hash(d: &Deployment) -> bool {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .is_some_and(|a| a.contains_key(HASH_ANNOTATION))
}

/// Server-side applies `body` to every bench Deployment as the baseline's manager (force),
/// `concurrency` in flight.
pub(crate) async fn apply_baseline(
    admin: &Client,
    namespaces: usize,
    deployments: usize,
    body: &serde_json::Value,
    concurrency: usize,
) {
    bounded(deployments, concurrency, |i| {
        let admin = admin.clone();
        async move {
            let api: Api<Deployment> = Api::namespaced(admin, &ns_name(i % namespaces));
            api.patch(
                &deploy_name(i),
                &PatchParams::apply(BASELINE_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .map(|_| ())
        }
    })
    .await;
}

/// Runs `n` requests made by `f` with at most `c` in flight; panics on the first failure.
pub(crate) async fn bounded<F, Fut>(n: usize, c: usize, f: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), kube::Error>>,
{
    futures::stream::iter(0..n)
        .map(f)
        .buffer_unordered(c)
        .try_collect::<Vec<()>>()
        .await
        .expect("request");
}

/// What the bench's Deployment watch saw: which Deployments carry the declared values, and
/// rollouts it completed (it plays the Deployment controller, which this API server lacks).
pub(crate) struct Watch {
    /// `namespace/name` -> (carries the declared values, resourceVersion of the last event).
    compliant: Mutex<HashMap<String, (bool, u64)>>,
    /// Whether it completes rollouts (off while the operator's convergence is timed).
    pub(crate) completing: std::sync::atomic::AtomicBool,
    /// Whether it completes every rollout, not only those meshwarden started.
    pub(crate) complete_any: std::sync::atomic::AtomicBool,
    pub(crate) completed: AtomicU64,
    notify: tokio::sync::Notify,
}

impl Watch {
    pub(crate) fn count(&self) -> usize {
        self.compliant
            .lock()
            .map(|m| m.values().filter(|v| v.0).count())
            .unwrap_or(0)
    }

    pub(crate) fn listed(&self) -> usize {
        self.compliant.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Waits until the watch shows `key` with the declared values in a version newer than
    /// `after` (resourceVersions of one etcd are increasing numbers); returns when it saw it,
    /// or `None` after `limit`.
    pub(crate) async fn fixed_after(
        &self,
        key: &str,
        after: u64,
        limit: Duration,
    ) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.notify.notified();
            let state = self.compliant.lock().ok().and_then(|m| m.get(key).copied());
            if state.is_some_and(|(ok, rv)| ok && rv > after) {
                return Some(Instant::now());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), notified).await;
        }
    }

    /// Waits until `want(count)`; returns the time it became true.
    pub(crate) async fn until(&self, want: impl Fn(usize) -> bool, limit: Duration) -> Instant {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.notify.notified();
            if want(self.count()) {
                return Instant::now();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "not converged within {limit:?}: {} compliant",
                self.count()
            );
            let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), notified).await;
        }
    }
}

/// Watches the bench's Deployments: records which carry the declared values and, for those
/// meshwarden changed (hash annotation) whose new generation is not observed yet, completes the
/// rollout at once by writing the status as the Deployment controller would.
pub(crate) fn spawn_watch(client: Client) -> Arc<Watch> {
    let w = Arc::new(Watch {
        compliant: Mutex::new(HashMap::new()),
        completing: std::sync::atomic::AtomicBool::new(true),
        complete_any: std::sync::atomic::AtomicBool::new(false),
        completed: AtomicU64::new(0),
        notify: tokio::sync::Notify::new(),
    });
    let out = w.clone();
    let api: Api<Deployment> = Api::all(client.clone());
    let cfg = watcher::Config::default().labels(&format!("{}={}", LABEL.0, LABEL.1));
    let sem = Arc::new(tokio::sync::Semaphore::new(WRITE_CONCURRENCY));
    tokio::spawn(async move {
        let mut events = watcher(api, cfg)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(ev) = events.next().await {
            let Ok(d) = ev else { continue };
            let key = format!("{}/{}", d.namespace().unwrap_or_default(), d.name_any());
            let rv = d
                .resource_version()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if let Ok(mut m) = w.compliant.lock() {
                m.insert(key, (has_declared(&d), rv));
            }
            w.notify.notify_waiters();
            if let Some(generation) = unobserved_generation(&d)
                && (carries_hash(&d) || w.complete_any.load(Ordering::Relaxed))
                && w.completing.load(Ordering::Relaxed)
            {
                let permit = sem.clone().acquire_owned().await.expect("semaphore");
                let (client, w) = (client.clone(), w.clone());
                tokio::spawn(async move {
                    let api: Api<Deployment> =
                        Api::namespaced(client, &d.namespace().unwrap_or_default());
                    complete_rollout(&api, &d.name_any(), generation)
                        .await
                        .expect("complete rollout");
                    w.completed.fetch_add(1, Ordering::Relaxed);
                    drop(permit);
                });
            }
        }
    });
    out
}

/// The Deployment's generation when its controller has not observed it yet.
fn unobserved_generation(d: &Deployment) -> Option<i64> {
    let generation = d.metadata.generation.unwrap_or(0);
    let observed = d.status.as_ref().and_then(|s| s.observed_generation);
    (observed.unwrap_or(0) < generation).then_some(generation)
}

/// Completes the rollout of every bench Deployment whose generation is not observed yet.
async fn complete_all(admin: &Client, namespaces: usize, deployments: usize) -> u64 {
    let n = AtomicU64::new(0);
    bounded(deployments, WRITE_CONCURRENCY, |i| {
        let (admin, n) = (admin.clone(), &n);
        async move {
            let api: Api<Deployment> = Api::namespaced(admin, &ns_name(i % namespaces));
            let d = api.get(&deploy_name(i)).await?;
            if let Some(generation) = unobserved_generation(&d) {
                complete_rollout(&api, &deploy_name(i), generation).await?;
                n.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }
    })
    .await;
    n.into_inner()
}

pub(crate) async fn complete_rollout(
    api: &Api<Deployment>,
    name: &str,
    generation: i64,
) -> Result<(), kube::Error> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "observedGeneration": generation,
            "replicas": REPLICAS, "updatedReplicas": REPLICAS,
            "readyReplicas": REPLICAS, "availableReplicas": REPLICAS,
        }})),
    )
    .await
    .map(|_| ())
}

pub(crate) fn proc_status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

pub(crate) fn free_port() -> u16 {
    testplane::ports::free_port().expect("free port")
}

pub(crate) fn start_operator(dir: &Path, kubeconfig: &Path, port: u16) -> Child {
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe.with_file_name("meshwarden");
    assert!(
        bin.exists(),
        "{} not found: cargo build --release -p meshwarden",
        bin.display()
    );
    let log = std::fs::File::create(dir.join("operator.log")).expect("operator log");
    Command::new(&bin)
        .args(["run", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", kubeconfig)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_OPERATOR_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start meshwarden")
}

/// Waits until the operator answers 200 on `path`.
pub(crate) async fn wait_http_ok(port: u16, path: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("meshwarden exited: {st}");
        }
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
                .await;
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200") {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "meshwarden {path} not 200 in 120s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Write counts from the audit log: (user, resource[/subresource]) -> writes, and the number of
/// distinct Deployments the operator wrote.
fn audit_counts(plane: &testplane::Plane) -> (BTreeMap<(String, String), u64>, usize) {
    let mut counts = BTreeMap::new();
    let mut written = std::collections::HashSet::new();
    for e in plane.audit_events() {
        if e["stage"] != "ResponseComplete" {
            continue;
        }
        let user = e["user"]["username"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let r = &e["objectRef"];
        let mut res = r["resource"].as_str().unwrap_or_default().to_string();
        if let Some(s) = r["subresource"].as_str() {
            res = format!("{res}/{s}");
        }
        if user == "meshwarden-operator" && res == "deployments" {
            written.insert(format!(
                "{}/{}",
                r["namespace"].as_str().unwrap_or_default(),
                r["name"].as_str().unwrap_or_default()
            ));
        }
        *counts.entry((user, res)).or_insert(0) += 1;
    }
    (counts, written.len())
}

/// Creates `namespaces` injected namespaces, `deployments` rolled-out Deployments and `pods`
/// Running pods (32 requests in flight); returns the time it took and the pods created.
pub(crate) async fn setup(
    admin: &Client,
    namespaces: usize,
    deployments: usize,
    pods: usize,
) -> (Duration, usize) {
    let t = Instant::now();
    let ns_api: Api<Namespace> = Api::all(admin.clone());
    bounded(namespaces, SETUP_CONCURRENCY, |i| {
        let ns_api = ns_api.clone();
        async move {
            let ns: Namespace = serde_json::from_value(json!({
                "metadata": {"name": ns_name(i), "labels": {"istio-injection": "enabled", LABEL.0: LABEL.1}}
            }))
            .expect("namespace");
            ns_api.create(&PostParams::default(), &ns).await.map(|_| ())
        }
    })
    .await;
    let kubectl = PostParams {
        field_manager: Some("kubectl".into()),
        ..Default::default()
    };
    bounded(deployments, SETUP_CONCURRENCY, |i| {
        let (admin, pp) = (admin.clone(), kubectl.clone());
        async move {
            let ns = ns_name(i % namespaces);
            let api: Api<Deployment> = Api::namespaced(admin, &ns);
            let d = api.create(&pp, &deployment(&ns, &deploy_name(i))).await?;
            complete_rollout(&api, &d.name_any(), d.metadata.generation.unwrap_or(1)).await
        }
    })
    .await;
    let running = AtomicUsize::new(0);
    bounded(pods, SETUP_CONCURRENCY, |i| {
        let (admin, pp, running) = (admin.clone(), kubectl.clone(), &running);
        async move {
            // Pod i belongs to Deployment i % deployments, in that Deployment's namespace.
            let di = i % deployments;
            let ns = ns_name(di % namespaces);
            let api: Api<Pod> = Api::namespaced(admin, &ns);
            let p = api.create(&pp, &pod(&ns, &deploy_name(di), i)).await?;
            api.patch_status(
                &p.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}]}})),
            )
            .await?;
            running.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    })
    .await;
    (t.elapsed(), running.into_inner())
}

pub async fn run(namespaces: usize, deployments: usize, pods: usize) {
    assert!(
        namespaces > 0 && deployments > 0,
        "namespaces and deployments must be > 0"
    );
    let (dir, plane, admin) = crate::common::start_plane("bench-sidecars").await;
    println!(
        "sidecar resources at scale: {namespaces} namespaces, {deployments} Deployments ({REPLICAS} replicas), {pods} running pods"
    );

    let (setup, running) = setup(&admin, namespaces, deployments, pods).await;
    println!(
        "  setup: {namespaces} namespaces, {deployments} Deployments (rolled out), {} pods (Running) in {:.1} s",
        running,
        setup.as_secs_f64()
    );

    let watch = spawn_watch(admin.clone());
    // Wait until the watch has listed every Deployment.
    let deadline = Instant::now() + Duration::from_secs(120);
    while watch.listed() < deployments {
        assert!(
            Instant::now() < deadline,
            "bench watch did not list every Deployment"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Baseline: the same four annotations, server-side applied directly, same concurrency as
    // the operator's writes; converged when the watch shows every Deployment with them.
    let patch = |ann: serde_json::Value| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "spec": {"template": {"metadata": {"annotations": ann}}}})
    };
    let declared: serde_json::Map<String, serde_json::Value> = DECLARED
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let with = patch(serde_json::Value::Object(declared));
    let t = Instant::now();
    apply_baseline(&admin, namespaces, deployments, &with, WRITE_CONCURRENCY).await;
    let writes_done = t.elapsed();
    let seen = watch
        .until(|n| n == deployments, Duration::from_secs(600))
        .await;
    let baseline = seen - t;
    println!(
        "  baseline: {deployments} server-side applies of the four annotations ({WRITE_CONCURRENCY} in flight): {:.2} s (last response after {:.2} s)",
        baseline.as_secs_f64(),
        writes_done.as_secs_f64()
    );

    // Reset: the baseline's manager applies nothing, which removes its annotations.
    let empty = patch(json!({}));
    bounded(deployments, SETUP_CONCURRENCY, |i| {
        let (admin, empty) = (admin.clone(), &empty);
        async move {
            let api: Api<Deployment> = Api::namespaced(admin, &ns_name(i % namespaces));
            let d = api
                .patch(
                    &deploy_name(i),
                    &PatchParams::apply(BASELINE_MANAGER).force(),
                    &Patch::Apply(empty),
                )
                .await?;
            complete_rollout(&api, &deploy_name(i), d.metadata.generation.unwrap_or(0)).await
        }
    })
    .await;
    watch.until(|n| n == 0, Duration::from_secs(120)).await;

    // The operator, as its own process and user.
    let port = free_port();
    let mut child = start_operator(&plane.dir, &plane.operator_kubeconfig, port);
    let pid = child.id();
    // Ready: the policies and every watch cache have their initial list.
    let t_ready = Instant::now();
    wait_http_ok(port, "/readyz", &mut child).await;
    let ready_after = t_ready.elapsed();
    let started_rss = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let peak_sampled = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = peak_sampled.clone();
        tokio::spawn(async move {
            loop {
                if let Some(kib) = proc_status_kib(pid, "VmRSS:") {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let policies: Api<MeshPolicy> = Api::all(admin.clone());
    let policy: MeshPolicy = serde_yaml::from_str(
        "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: bench}\nspec:\n  enforcement: Enforce\n  sidecars:\n    pacing: 'Off'\n    resources: {requests: {cpu: 100m, memory: 128Mi}, limits: {cpu: '1', memory: 512Mi}}\n",
    )
    .expect("policy");
    // Pacing is off, so no write waits for a rollout: the bench completes none while the
    // operator's convergence is timed (the baseline has none either), and completes them all
    // afterwards so that the policy's condition can settle.
    watch.completing.store(false, Ordering::Relaxed);
    let policy_watch = settle::watch_policy(admin.clone(), "bench", "SidecarResources");
    let t = Instant::now();
    let created = jiff::Timestamp::now();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("create policy");
    let seen = watch
        .until(|n| n == deployments, Duration::from_secs(3600))
        .await;
    let operator = seen - t;
    watch.completing.store(true, Ordering::Relaxed);
    let (cpu_before, reconciles_before) = (
        crate::leak::cpu_ticks(pid),
        settle::metric(port, "meshwarden_reconciles_total").await,
    );
    let completing = Instant::now();
    let completed_after = complete_all(&admin, namespaces, deployments).await;
    // The policy's condition catches up with the last rollouts (seen by a watch of it).
    let (true_at, condition) = policy_watch.until_true(Duration::from_secs(600)).await;
    let condition_at = settle::secs(created, true_at);
    let completing = completing.elapsed();
    let cpu = crate::leak::cpu_ticks(pid).saturating_sub(cpu_before) as f64 / 100.0;
    let reconciles = settle::metric(port, "meshwarden_reconciles_total")
        .await
        .zip(reconciles_before)
        .map(|(after, before)| after - before);
    // Quiet period: a converged mesh should cost no write.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let hwm = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    let rss_end = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    sampler.abort();

    // Check from the API: one LIST of every bench Deployment.
    let all: Api<Deployment> = Api::all(admin.clone());
    let list = all
        .list(&ListParams::default().labels(&format!("{}={}", LABEL.0, LABEL.1)))
        .await
        .expect("list deployments");
    let ok = list.items.iter().filter(|d| has_declared(d)).count();
    assert_eq!(
        ok, deployments,
        "LIST shows {ok} of {deployments} with the declared values"
    );

    let _ = child.kill();
    let _ = child.wait();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (counts, distinct) = audit_counts(&plane);
    let events = plane.audit_events();
    let status_writes = settle::writes_of(&events, "meshwarden-operator", "meshpolicies/status");
    let rolling: Vec<jiff::Timestamp> = status_writes
        .iter()
        .copied()
        .filter(|w| *w >= created && *w <= true_at)
        .collect();
    let after_true = status_writes.iter().filter(|w| **w > true_at).count();
    // The mesh converged when the last rollout completed: the bench's last status write as the
    // Deployment controller.
    let last_rollout = settle::writes_of(&events, "admin", "deployments/status")
        .into_iter()
        .rfind(|w| *w >= created);
    let stayed_true = policy_watch.true_since() == Some(true_at);
    let of = |user: &str, res: &str| {
        counts
            .get(&(user.to_string(), res.to_string()))
            .copied()
            .unwrap_or(0)
    };
    let op_user = "meshwarden-operator";
    let op_total: u64 = counts
        .iter()
        .filter(|((u, _), _)| u == op_user)
        .map(|(_, n)| n)
        .sum();
    let workload = of(op_user, "deployments");

    let ratio = operator.as_secs_f64() / baseline.as_secs_f64();
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "  operator: converged (all {deployments} Deployments carry the four declared values, seen by a watch) in {:.2} s; condition {condition} after {:.2} s",
        operator.as_secs_f64(),
        condition_at
    );
    println!("  ratio operator/baseline: {ratio:.2}x (target: within 1.25x)");
    let roll = settle::secs(created, true_at);
    println!(
        "  MeshPolicy status writes while the Deployments rolled (policy created until SidecarResources True, {roll:.1} s): {} ({:.2} per s, at most {} within one second; target about 1 per s); after it: {after_true}{}",
        rolling.len(),
        rolling.len() as f64 / roll.max(0.001),
        settle::most_within(&rolling, Duration::from_secs(1)),
        if stayed_true {
            ""
        } else {
            " (the condition did not stay True)"
        },
    );
    println!(
        "  while the bench completed the rollouts ({:.1} s): operator CPU {cpu:.1} s ({:.2} cores), {} reconciles",
        completing.as_secs_f64(),
        cpu / completing.as_secs_f64().max(0.001),
        reconciles.map_or("?".into(), |n| format!("{n:.0}")),
    );
    match last_rollout {
        Some(last) => println!(
            "  SidecarResources True {:.2} s after the last rollout completed (target: within 1 s)",
            settle::secs(last, true_at)
        ),
        None => println!("  no rollout completed after the policy was created"),
    }
    println!(
        "  operator writes (audit log, user {op_user}): {op_total} in all; Deployments {workload} ({distinct} distinct; target {deployments}), MeshPolicy status {}, Events {}",
        of(op_user, "meshpolicies/status"),
        of(op_user, "events"),
    );
    for ((user, res), n) in &counts {
        if user == op_user
            && !["deployments", "meshpolicies/status", "events"].contains(&res.as_str())
        {
            println!("    other operator writes: {res} {n}");
        }
    }
    println!(
        "  rollouts completed by the bench after the timed part (status writes as the Deployment controller): {}",
        watch.completed.load(Ordering::Relaxed) + completed_after
    );
    println!(
        "  operator ready (initial lists done) {:.1} s after its start",
        ready_after.as_secs_f64()
    );
    println!(
        "  operator RSS: peak (VmHWM) {:.1} MiB (target: under 64 MiB); ready {:.1} MiB, sampled peak {:.1} MiB, at the end {:.1} MiB",
        mib(hwm),
        mib(started_rss),
        mib(peak_sampled.load(Ordering::Relaxed)),
        mib(rss_end)
    );
    println!(
        "  operator log: {}",
        plane.dir.join("operator.log").display()
    );
    if std::env::var_os("BENCH_KEEP").is_none() {
        drop(plane);
        let _ = std::fs::remove_dir_all(dir);
    }
}
