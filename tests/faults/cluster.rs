//! Faults on a full cluster of this test's own (kube-controller-manager, kube-scheduler, kwok
//! nodes, Istio installed by Helm and a real istiod injecting sidecars): one cluster, the faults
//! in sequence, the cluster's invariants checked after every step and sampled in between.
//!
//! Invariants, sampled every 200 ms (samples the API server cannot answer are skipped) and
//! checked after every step: istiod's replicas and its HPA minimum never below the policy's 2
//! and never lowered, a PDB covering istiod always present, no plane process exited, no Event
//! published twice within a step, no Compliant status written while a drift made right after
//! the API server returned was still uncorrected.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testplane::cluster::rolling;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use meshwarden::api::MeshPolicy;
use serde_json::json;
use testplane::{Outage, Plane};

use super::operator::{Replica, eventually, http_get};

const NS: &str = "shop";
const CPU: &str = "sidecar.istio.io/proxyCPU";
/// The shop's Deployments and their replicas; `web` takes the drifts.
const WORKLOADS: [(&str, i32); 4] = [("web", 1), ("cart", 2), ("checkout", 2), ("search", 2)];
/// How long each API server or etcd outage lasts.
const OUTAGE: Duration = Duration::from_secs(10);
/// The operator's default leader-election lease duration.
const LEASE: Duration = Duration::from_secs(15);

/// The policy: istiod HA (2 replicas through its HPA, a PDB), the shop's sidecars at `cpu`
/// with at most `concurrent` rollouts at once, STRICT mTLS in the shop.
fn policy(cpu: &str, concurrent: u32) -> String {
    format!(
        "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: faults}}\n\
         spec:\n  enforcement: Enforce\n  \
         controlPlane: {{namespace: istio-system, replicas: {{min: 2}}, disruptionBudget: {{maxUnavailable: 1}}}}\n  \
         sidecars:\n    namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {NS}}}}}\n    \
         resources: {{requests: {{cpu: {cpu}, memory: 128Mi}}}}\n    maxConcurrentRollouts: {concurrent}\n  \
         mtls: {{mode: STRICT, scope: Namespaces, namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {NS}}}}}}}\n"
    )
}

fn shop() -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: meshwarden}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}, labels: {{istio-injection: enabled}}}}\n"
    );
    for (name, replicas) in WORKLOADS {
        yaml.push_str(&format!(
            "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {NS}}}\n\
             spec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    \
             metadata: {{labels: {{app: {name}}}}}\n    \
             spec: {{containers: [{{name: app, image: registry.example/{name}:1}}]}}\n"
        ));
    }
    yaml
}

fn proxy_cpu(p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    let proxy = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == "istio-proxy")?;
    Some(
        proxy
            .resources
            .as_ref()?
            .requests
            .as_ref()?
            .get("cpu")?
            .0
            .clone(),
    )
}

fn cpu_annotation(d: &Deployment) -> Option<String> {
    d.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(CPU)
        .cloned()
}

/// Every shop workload rolled out, each pod (not being deleted) with a sidecar asking `cpu`.
async fn shop_at(client: &Client, cpu: &str) -> bool {
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let (Ok(ds), Ok(ps)) = (
        deploys.list(&ListParams::default()).await,
        pods.list(&ListParams::default()).await,
    ) else {
        return false;
    };
    let live: Vec<&Pod> = ps
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let want: i32 = WORKLOADS.iter().map(|(_, r)| r).sum();
    ds.items.len() == WORKLOADS.len()
        && ds
            .items
            .iter()
            .all(|d| !rolling(d) && cpu_annotation(d).as_deref() == Some(cpu))
        && live.len() == want as usize
        && live.iter().all(|p| proxy_cpu(p).as_deref() == Some(cpu))
}

/// What the sampler saw.
#[derive(Default)]
struct Seen {
    /// istiod's floor is checked once set (after the first convergence).
    armed: bool,
    /// Most shop workloads allowed to roll at once (while a paced rollout runs).
    pacing: Option<usize>,
    most_rolling: usize,
    /// Generations seen per shop Deployment (cleared when the paced rollout starts).
    generations: BTreeMap<String, BTreeSet<i64>>,
    last_replicas: Option<i32>,
    samples: usize,
    violations: Vec<String>,
}

/// Whether the PDB selects the pods of `istiod` (its matchLabels a subset of the template's).
fn covers(p: &PodDisruptionBudget, istiod: &Deployment) -> bool {
    let labels = istiod
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    p.spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .and_then(|s| s.match_labels.as_ref())
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Follows the shop's Deployments through a watch: on every change, how many roll at once
/// (against the pacing, when set) and each one's generations.
fn watch_shop(client: Client, seen: Arc<Mutex<Seen>>) -> tokio::task::JoinHandle<()> {
    use kube::runtime::WatchStreamExt;
    tokio::spawn(async move {
        let api: Api<Deployment> = Api::namespaced(client, NS);
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut now: BTreeMap<String, Deployment> = BTreeMap::new();
        while let Some(ev) = events.next().await {
            match ev {
                Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) => {
                    now.insert(d.name_any(), d);
                }
                Ok(watcher::Event::Delete(d)) => {
                    now.remove(&d.name_any());
                }
                _ => continue,
            }
            let mut seen = seen.lock().unwrap();
            let rolling: Vec<&String> = now
                .iter()
                .filter(|(_, d)| rolling(d))
                .map(|(n, _)| n)
                .collect();
            seen.most_rolling = seen.most_rolling.max(rolling.len());
            if let Some(limit) = seen.pacing
                && rolling.len() > limit
            {
                let v = format!("{rolling:?} rolling at once, the pacing allows {limit}");
                seen.violations.push(v);
            }
            for (name, d) in &now {
                let g = d.metadata.generation.unwrap_or_default();
                seen.generations.entry(name.clone()).or_default().insert(g);
            }
        }
    })
}

/// Samples istiod's floor and PDB every 200 ms.
fn sample(client: Client, seen: Arc<Mutex<Seen>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let istiod: Api<Deployment> = Api::namespaced(client.clone(), "istio-system");
        let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), "istio-system");
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "istio-system");
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let lp = ListParams::default();
            let (d, h, p) = tokio::join!(istiod.get("istiod"), hpas.get("istiod"), pdbs.list(&lp));
            let (Ok(d), Ok(h), Ok(p)) = (d, h, p) else {
                continue;
            };
            let mut seen = seen.lock().unwrap();
            seen.samples += 1;
            if !seen.armed {
                continue;
            }
            let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            if replicas < 2 || seen.last_replicas.is_some_and(|r| replicas < r) {
                let before = seen.last_replicas;
                seen.violations
                    .push(format!("istiod replicas {replicas} (before {before:?})"));
            }
            seen.last_replicas = Some(replicas);
            let min = h.spec.and_then(|s| s.min_replicas).unwrap_or(1);
            if min < 2 {
                seen.violations.push(format!("istiod's HPA minimum {min}"));
            }
            if !p.items.iter().any(|p| covers(p, &d)) {
                seen.violations.push("no PDB covers istiod".into());
            }
        }
    })
}

/// Events meshwarden published since `since` that say what the Event before them about the
/// same object and action said (the same transition or correction published twice in a row),
/// or that count a series (the recorder folded several Events into one).
pub(super) async fn doubled_events(client: &Client, since: jiff::Timestamp) -> Vec<String> {
    let all = Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let mut ours: Vec<(jiff::Timestamp, Event)> = all
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("meshwarden"))
        .filter_map(|e| Some((e.event_time.as_ref()?.0, e)))
        .filter(|(t, _)| *t >= since)
        .collect();
    ours.sort_by_key(|(t, _)| *t);
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut doubled = Vec::new();
    for (t, e) in ours {
        let about = e
            .regarding
            .as_ref()
            .map(|r| {
                format!(
                    "{}/{}",
                    r.kind.clone().unwrap_or_default(),
                    r.name.clone().unwrap_or_default()
                )
            })
            .unwrap_or_default();
        let stream = format!("{about} {}", e.action.clone().unwrap_or_default());
        let said = format!(
            "{} {}",
            e.reason.clone().unwrap_or_default(),
            e.note.clone().unwrap_or_default()
        );
        if let Some(s) = e.series.as_ref().filter(|s| s.count > 1) {
            doubled.push(format!("{t} {stream}: a series of {}: {said}", s.count));
        }
        if last.get(&stream) == Some(&said) {
            doubled.push(format!("{t} {stream}: again: {said}"));
        }
        last.insert(stream, said);
    }
    doubled
}

/// The cluster, the sampler and the step bookkeeping.
struct Run {
    dir: std::path::PathBuf,
    plane: Plane,
    admin: Client,
    seen: Arc<Mutex<Seen>>,
    step_start: jiff::Timestamp,
}

impl Run {
    /// After a step: every invariant held since the last step, and holds now.
    async fn check(&mut self, step: &str) {
        self.keep_logs();
        let exited = self.plane.exited();
        assert!(exited.is_empty(), "after {step}: exited: {exited:?}");
        let doubled = doubled_events(&self.admin, self.step_start).await;
        assert!(
            doubled.is_empty(),
            "after {step}: Events doubled: {doubled:#?}"
        );
        let seen = self.seen.lock().unwrap();
        assert!(
            seen.violations.is_empty(),
            "after {step}: {:#?}",
            seen.violations
        );
        eprintln!("{step}: invariants held ({} samples so far)", seen.samples);
        drop(seen);
        self.step_start = jiff::Timestamp::now();
    }

    /// Copies the logs (the operator's, the audit log) to `$FAULTS_KEEP`, if set: the scratch
    /// directory goes when the next plane starts.
    fn keep_logs(&self) {
        let Some(keep) = std::env::var_os("FAULTS_KEEP") else {
            return;
        };
        let _ = std::fs::create_dir_all(&keep);
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let _ = std::fs::copy(e.path(), std::path::Path::new(&keep).join(e.file_name()));
            }
        }
    }

    fn web(&self) -> Api<Deployment> {
        Api::namespaced(self.admin.clone(), NS)
    }

    /// Removes `web`'s CPU annotation: the resourceVersion of the drifted object.
    async fn drift(&self) -> u64 {
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {CPU: null}}}}});
        let d = self
            .web()
            .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        rv(&d)
    }

    async fn wait_restored(&self, cpu: &str, secs: u64) {
        let web = self.web();
        eventually(secs, "web's CPU annotation restored", || async {
            let d = web.get("web").await.ok()?;
            (cpu_annotation(&d).as_deref() == Some(cpu)).then_some(())
        })
        .await;
    }
}

fn rv<K: kube::Resource>(o: &K) -> u64 {
    o.meta()
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or_default()
}

type Shared<T> = Arc<Mutex<Vec<T>>>;

/// Every version of the policy's `SidecarResources` condition and of `web`'s CPU annotation
/// the API server serves from now on, with its resourceVersion and arrival.
struct Versions {
    /// (resourceVersion, arrival, "status reason") of each policy version.
    policy: Shared<(u64, Instant, String)>,
    /// (resourceVersion, CPU annotation) of each version of `web`.
    web: Shared<(u64, Option<String>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Versions {
    fn record(client: &Client) -> Versions {
        let policy = Arc::new(Mutex::new(Vec::new()));
        let web = Arc::new(Mutex::new(Vec::new()));
        let by_name = watcher::Config::default().fields("metadata.name=faults");
        let mut policies = watcher(Api::<MeshPolicy>::all(client.clone()), by_name).boxed();
        let p = policy.clone();
        let t1 = tokio::spawn(async move {
            while let Some(ev) = policies.next().await {
                if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = ev {
                    let c = o
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "SidecarResources"))
                        .map(|c| format!("{} {}", c.status, c.reason))
                        .unwrap_or_default();
                    p.lock().unwrap().push((rv(&o), Instant::now(), c));
                }
            }
        });
        let by_name = watcher::Config::default().fields("metadata.name=web");
        let mut webs = watcher(Api::<Deployment>::namespaced(client.clone(), NS), by_name).boxed();
        let w = web.clone();
        let t2 = tokio::spawn(async move {
            while let Some(ev) = webs.next().await {
                if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = ev {
                    w.lock().unwrap().push((rv(&o), cpu_annotation(&o)));
                }
            }
        });
        Versions {
            policy,
            web,
            tasks: vec![t1, t2],
        }
    }

    /// Compliant statuses written after the drift (`drifted`, made at `at`) and before its
    /// correction. One written within a second of the drift is a reconcile that read a synced
    /// cache just before the drift arrived (the race every watch-driven controller has); a
    /// stale cache is older than that.
    fn compliant_while_drifted(&self, drifted: u64, at: Instant, cpu: &str) -> Vec<String> {
        let web = self.web.lock().unwrap();
        let Some(fixed) = web
            .iter()
            .filter(|(v, a)| *v > drifted && a.as_deref() == Some(cpu))
            .map(|(v, _)| *v)
            .min()
        else {
            return vec![format!(
                "no corrected version of web seen after {drifted}: {web:?}"
            )];
        };
        self.policy
            .lock()
            .unwrap()
            .iter()
            .filter(|(v, seen, c)| {
                *v > drifted
                    && *v < fixed
                    && c == "True Compliant"
                    && seen.duration_since(at) > Duration::from_secs(1)
            })
            .map(|(v, seen, c)| {
                format!(
                    "{c} at resourceVersion {v}, {:?} after the drift ({drifted}) and before its correction ({fixed})",
                    seen.duration_since(at)
                )
            })
            .collect()
    }
}

impl Drop for Versions {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Step (a)-(c): `outage`, then a drift made as soon as the API server is ready, corrected
/// within 5 s, with no Compliant status while it lasts.
async fn outage_step(run: &mut Run, op: &Replica, outage: Outage) -> Duration {
    let what = outage.describe(OUTAGE.as_secs());
    let log_mark = op.log_text().len();
    let killed = Instant::now();
    let inject = outage.inject(&mut run.plane, OUTAGE);
    let unready = async {
        // kube-apiserver gone: the operator's watches fail and it turns unready. (With etcd
        // gone the API server still answers, from its watch cache, so it may not.)
        if outage != Outage::Etcd {
            eventually(10, "/readyz 503 while the API server is gone", || async {
                http_get(op.port, "/readyz").await.is_none().then_some(())
            })
            .await;
        }
    };
    let (result, ()) = tokio::join!(inject, unready);
    result.unwrap();
    let ready = Instant::now();
    eprintln!(
        "{what}: API server ready {:?} after the kill",
        killed.elapsed()
    );
    let versions = Versions::record(&run.admin);
    let drifted = run.drift().await;
    let drift_at = Instant::now();
    run.wait_restored("100m", 30).await;
    let took = ready.elapsed();
    eprintln!("{what}: drift corrected {took:?} after the API server was ready");
    assert!(
        took < Duration::from_secs(5),
        "{what}: drift corrected {took:?} after the API server was ready:\n{}",
        op.log_text()
    );
    eventually(20, "ready again", || http_get(op.port, "/readyz")).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stale = versions.compliant_while_drifted(drifted, drift_at, "100m");
    assert!(stale.is_empty(), "{what}: {stale:#?}");
    let log = op.log_text();
    let expired = log
        .get(log_mark..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Expired") || l.contains("too old resource version"))
        .count();
    eprintln!("{what}: {expired} log lines about expired watches");
    took
}

/// What the cluster looks like, for a failure message: the policy's conditions, the shop's
/// Deployments and pods, istiod.
async fn describe(client: &Client, op: &Replica) -> String {
    let mut out = String::new();
    if let Ok(p) = Api::<MeshPolicy>::all(client.clone()).get("faults").await {
        let st = p.status.unwrap_or_default();
        out += &format!(
            "policy generation {:?}, observed {:?}\n",
            p.metadata.generation, st.observed_generation
        );
        for c in st.conditions {
            out += &format!("  {} {} {}: {}\n", c.type_, c.status, c.reason, c.message);
        }
    }
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), NS);
    for d in deploys
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let st = d.status.clone().unwrap_or_default();
        out += &format!(
            "{}: generation {:?} observed {:?} updated {:?} available {:?} replicas {:?} cpu {:?}\n",
            d.name_any(),
            d.metadata.generation,
            st.observed_generation,
            st.updated_replicas,
            st.available_replicas,
            st.replicas,
            cpu_annotation(&d)
        );
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    for p in pods
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        out += &format!(
            "pod {} {:?} deleting {} proxy cpu {:?}\n",
            p.name_any(),
            p.status.as_ref().and_then(|s| s.phase.clone()),
            p.metadata.deletion_timestamp.is_some(),
            proxy_cpu(&p)
        );
    }
    let (ready, pdb) = istiod_state(client).await;
    out += &format!("istiod: {ready} ready, covered by a PDB: {pdb}\n");
    let log = op.log_text();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    out += "operator log (last 40 lines):\n";
    for l in tail.into_iter().rev() {
        out += l;
        out += "\n";
    }
    out
}

/// Polls `check` every 500 ms for `secs`; on timeout panics with [`describe`].
async fn until<F, Fut>(secs: u64, what: &str, client: &Client, op: &Replica, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        if start.elapsed() > Duration::from_secs(secs) {
            panic!(
                "timed out after {secs}s waiting for {what}:\n{}",
                describe(client, op).await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The policy's sections all True for the current generation.
async fn converged(client: &Client) -> bool {
    let Ok(p) = Api::<MeshPolicy>::all(client.clone()).get("faults").await else {
        return false;
    };
    let Some(st) = p.status.as_ref() else {
        return false;
    };
    st.observed_generation == p.metadata.generation
        && ["ControlPlaneHA", "SidecarResources", "MutualTLS"]
            .iter()
            .all(|t| {
                st.conditions
                    .iter()
                    .any(|c| c.type_ == *t && c.status == "True")
            })
}

/// istiod's ready replicas and whether a PDB covers it.
async fn istiod_state(client: &Client) -> (i32, bool) {
    let d: Api<Deployment> = Api::namespaced(client.clone(), "istio-system");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "istio-system");
    let Ok(istiod) = d.get("istiod").await else {
        return (0, false);
    };
    let ready = istiod
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let pdb = pdbs
        .list(&ListParams::default())
        .await
        .is_ok_and(|l| l.items.iter().any(|p| covers(p, &istiod)));
    (ready, pdb)
}

async fn istiod_at_floor(client: &Client) -> bool {
    let (ready, pdb) = istiod_state(client).await;
    ready >= 2 && pdb
}

#[tokio::test]
async fn full_cluster_lifecycle_under_faults() {
    let started = Instant::now();
    let dir = testplane::scratch_dir("fullfaults");
    let plane = Plane::start_with(
        &dir,
        testplane::Lifetime::Attached,
        testplane::Flavor::Cluster,
    )
    .await
    .expect("start the cluster (run hack/build-k8s-bins.sh first)");
    eprintln!("cluster ready after {:?}", started.elapsed());
    let admin = plane.client().await.unwrap();
    testplane::apply_yaml(&admin, &meshwarden::api::crd_yaml().unwrap(), &[])
        .await
        .unwrap();
    testplane::apply_yaml(&admin, &shop(), &[]).await.unwrap();
    testplane::apply_yaml(&admin, &policy("100m", 4), &[])
        .await
        .unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let sampler = sample(admin.clone(), seen.clone());
    let mut run = Run {
        dir,
        plane,
        admin: admin.clone(),
        seen: seen.clone(),
        step_start: jiff::Timestamp::now(),
    };

    // Step 0: converge: istiod at 2 replicas with a PDB, every sidecar at 100m, STRICT.
    let kc = run.plane.operator_kubeconfig.clone();
    let mut op = Replica::start(&kc, "operator", &run.dir, &[]);
    until(240, "the first convergence", &admin, &op, || async {
        shop_at(&admin, "100m").await && istiod_at_floor(&admin).await && converged(&admin).await
    })
    .await;
    eventually(10, "ready", || http_get(op.port, "/readyz")).await;
    eprintln!("converged {:?} after the start", started.elapsed());
    seen.lock().unwrap().armed = true;
    tokio::time::sleep(Duration::from_secs(1)).await;
    run.check("convergence").await;

    // Steps a-c: kube-apiserver killed; etcd killed; a watch expiry.
    let mut recovery = Vec::new();
    for outage in [Outage::Apiserver, Outage::Etcd, Outage::Expiry] {
        let took = outage_step(&mut run, &op, outage).await;
        recovery.push((outage.describe(OUTAGE.as_secs()), took));
        // The drift rolled web twice (removed, restored): let it finish before the next step.
        until(60, "the shop rolled out", &admin, &op, || {
            shop_at(&admin, "100m")
        })
        .await;
        run.check(&format!("{outage:?}")).await;
    }

    // Step d: kill -9 the operator in the middle of a paced rollout (one at a time).
    let deploys: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    let before: BTreeMap<String, i64> = deploys
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|d| (d.name_any(), d.metadata.generation.unwrap_or_default()))
        .collect();
    {
        let mut s = seen.lock().unwrap();
        s.pacing = Some(1);
        s.most_rolling = 0;
        s.generations.clear();
    }
    // A watch of its own, started after the outages: one resumed from its resourceVersion
    // across them (kube's watcher with backoff) once delivered no event at all in this step,
    // like the controller manager's informers after the watch expiry.
    let shop_watch = watch_shop(admin.clone(), seen.clone());
    eventually(10, "the shop's watch listed", || async {
        (seen.lock().unwrap().generations.len() == WORKLOADS.len()).then_some(())
    })
    .await;
    testplane::apply_yaml(&admin, &policy("200m", 1), &[])
        .await
        .unwrap();
    let written = eventually(60, "the first workload written", || async {
        let list = deploys.list(&ListParams::default()).await.ok()?;
        let moved = list
            .items
            .iter()
            .filter(|d| d.metadata.generation > before.get(&d.name_any()).copied())
            .count();
        (moved >= 1).then_some(moved)
    })
    .await;
    op.child.kill().unwrap();
    let _ = op.child.wait();
    let killed = Instant::now();
    eprintln!(
        "operator killed with {written} of {} workloads written",
        WORKLOADS.len()
    );
    assert!(
        written < WORKLOADS.len(),
        "killed after the rollout, not during it"
    );
    drop(op);
    // A replacement pod has another name: the killed instance's presence record, not renewed
    // any more, keeps the new one passive until it expires (an instance cannot tell a dead
    // peer from a slow one sooner).
    let op = Replica::start(&kc, "operator-2", &run.dir, &[]);
    eventually(60, "the new instance writes", || async {
        (op.metric("meshwarden_leader").await? == 1.0).then_some(())
    })
    .await;
    let resumed = killed.elapsed();
    eprintln!("the new instance resumed {resumed:?} after the kill");
    until(300, "the paced rollout completed", &admin, &op, || {
        shop_at(&admin, "200m")
    })
    .await;
    let completed = killed.elapsed();
    eprintln!("rollout completed {completed:?} after the kill");
    {
        let now = deploys.list(&ListParams::default()).await.unwrap().items;
        let mut s = seen.lock().unwrap();
        let twice: Vec<String> = now
            .iter()
            .filter_map(|d| {
                let name = d.name_any();
                let first = before[&name];
                let seen_max = s
                    .generations
                    .get(&name)
                    .and_then(|g| g.iter().max().copied());
                let last = d
                    .metadata
                    .generation
                    .unwrap_or_default()
                    .max(seen_max.unwrap_or(0));
                (last != first + 1).then(|| {
                    format!(
                        "{name} went from generation {first} to {last}: not rolled exactly once"
                    )
                })
            })
            .collect();
        s.violations.extend(twice);
        s.pacing = None;
        assert_eq!(s.most_rolling, 1, "one workload rolled at a time");
    }
    until(30, "the policy settled", &admin, &op, || converged(&admin)).await;
    run.check("operator killed mid-rollout").await;

    // Step e: two instances with leader election; kill -9 the leader.
    op.terminate().unwrap();
    drop(op);
    let a = Replica::start(&kc, "replica-a", &run.dir, &["--leader-election"]);
    let b = Replica::start(&kc, "replica-b", &run.dir, &["--leader-election"]);
    let a_leads = eventually(60, "one leader, ready", || async {
        let lead = match (
            a.metric("meshwarden_leader").await? as i64,
            b.metric("meshwarden_leader").await? as i64,
        ) {
            (1, 0) => true,
            (0, 1) => false,
            _ => return None,
        };
        http_get(if lead { a.port } else { b.port }, "/readyz").await?;
        Some(lead)
    })
    .await;
    let (mut leader, standby) = if a_leads { (a, b) } else { (b, a) };
    // Let the standby settle into waiting for the lease's expiry.
    tokio::time::sleep(Duration::from_secs(3)).await;
    leader.child.kill().unwrap();
    let _ = leader.child.wait();
    let killed = Instant::now();
    // The dead leader's Lease expires one lease duration after its last renewal.
    let lease = Api::<Lease>::namespaced(admin.clone(), "meshwarden")
        .get("meshwarden-leader")
        .await
        .unwrap()
        .spec
        .unwrap();
    let renewed = lease.renew_time.unwrap().0;
    let expires =
        renewed + jiff::SignedDuration::from_secs(lease.lease_duration_seconds.unwrap().into());
    let expires_in = jiff::Timestamp::now().duration_until(expires);
    run.drift().await;
    run.wait_restored("200m", 60).await;
    let took = killed.elapsed();
    let after_expiry = jiff::Timestamp::now().duration_since(expires);
    eprintln!(
        "leader killed: its Lease expired {expires_in:?} after the kill; the standby corrected the drift {took:?} after the kill, {after_expiry:?} after the expiry"
    );
    assert_eq!(standby.metric("meshwarden_leader").await, Some(1.0));
    // The kill comes at any point of the renewal period, so the Lease expires up to one lease
    // duration later; the standby takes over at the expiry, lists and corrects.
    assert!(
        took < LEASE + Duration::from_secs(3) && after_expiry < jiff::SignedDuration::from_secs(3),
        "the standby corrected the drift {took:?} after the leader was killed, {after_expiry:?} after its Lease expired (lease {LEASE:?}):\n{}",
        standby.log_text()
    );
    run.check("leader killed").await;
    sampler.abort();
    shop_watch.abort();

    eprintln!("recovery after each fault:");
    for (what, took) in recovery {
        eprintln!("  {what}: {took:?}");
    }
    eprintln!(
        "  kill -9 the operator mid-rollout: resumed {resumed:?}, rollout complete {completed:?}"
    );
    eprintln!(
        "  kill -9 the leader (lease {LEASE:?}): {took:?} ({after_expiry:?} after the expiry)"
    );
    eprintln!("whole test {:?}", started.elapsed());
}
