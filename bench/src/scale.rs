//! The operator at cluster scale under pod churn (issue 13): N injected namespaces, D
//! Deployments and P running pods; a production policy (control plane, sidecars with pacing
//! off, STRICT mTLS mesh-wide); then, for S seconds, pod churn at R events/s while the bench
//! removes one sidecar annotation after another and times its correction. The policy also
//! has the report sections (resilience, security), with one Service per Deployment. Measured in one run:
//! the same churn and drift with a direct corrector (a watch that server-side applies the
//! annotations back, 16 in flight) as the baseline, then the operator (a separate process):
//! drift-correction latency, peak RSS, average CPU during the churn, and from the audit log
//! every LIST and WATCH it sent after it was ready.
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use meshwarden::api::MeshPolicy;
use meshwarden::rules::sidecars::{PROXY_CPU, WRITE_CONCURRENCY};
use serde_json::json;

use crate::common::{load, ms, percentile};
use crate::sidecars::{
    BASELINE_MANAGER, DECLARED, LABEL, Watch, apply_baseline, deploy_name, free_port, has_declared,
    ns_name, pod, proc_status_kib, setup, spawn_watch, start_operator, wait_http_ok,
};

/// Pause between one drift's correction and the next drift.
const DRIFT_PAUSE: Duration = Duration::from_millis(200);
/// A drift not corrected within this long counts as lost.
const DRIFT_LIMIT: Duration = Duration::from_secs(30);
/// Pod writes of the churn in flight at most.
const CHURN_CONCURRENCY: usize = 16;

const POLICY: &str = "apiVersion: meshwarden.io/v1alpha1
kind: MeshPolicy
metadata: {name: scale}
spec:
  enforcement: Enforce
  controlPlane:
    namespace: istio-system
    replicas: {min: 2}
    disruptionBudget: {maxUnavailable: 1}
  sidecars:
    pacing: 'Off'
    resources: {requests: {cpu: 100m, memory: 128Mi}, limits: {cpu: '1', memory: 512Mi}}
  mtls: {mode: STRICT, scope: Mesh}
  resilience: {outlierDetection: Required}
  security: {defaultDeny: Required}
";

/// What the report sections read besides: a root `*.local` DestinationRule with outlier
/// detection, one host-specific rule per namespace without it (a finding each), and a
/// mesh-wide allow-nothing AuthorizationPolicy.
fn report_objects(namespaces: usize) -> String {
    let mut yaml = String::from(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: default, namespace: istio-system}\n\
         spec: {host: '*.local', trafficPolicy: {outlierDetection: {consecutive5xxErrors: 5}}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: istio-system}\nspec: {}\n",
    );
    for i in 0..namespaces {
        yaml.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: tls, namespace: {ns}}}\n\
             spec: {{host: {dep}, trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}}}\n",
            ns = ns_name(i),
            dep = deploy_name(i),
        ));
    }
    yaml
}

struct Scale {
    namespaces: usize,
    deployments: usize,
    /// Pod indices alive, oldest first (a pod `i` belongs to Deployment `i % deployments`).
    pods: tokio::sync::Mutex<VecDeque<usize>>,
    next_pod: AtomicU64,
}

/// What one phase (baseline or operator) measured.
struct Phase {
    latencies: Vec<Duration>,
    lost: usize,
    churn_events: u64,
    elapsed: Duration,
}

impl Phase {
    fn line(&self, name: &str) -> String {
        let mut l = self.latencies.clone();
        l.sort();
        let (p50, p99, max) = if l.is_empty() {
            (Duration::ZERO, Duration::ZERO, Duration::ZERO)
        } else {
            (percentile(&l, 0.5), percentile(&l, 0.99), l[l.len() - 1])
        };
        format!(
            "  {name}: {} drifts corrected, p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms, {} not corrected within {}s; churn {:.0} pod events/s",
            l.len(),
            ms(p50),
            ms(p99),
            ms(max),
            self.lost,
            DRIFT_LIMIT.as_secs(),
            self.churn_events as f64 / self.elapsed.as_secs_f64()
        )
    }

    fn p99(&self) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        if l.is_empty() {
            Duration::MAX
        } else {
            percentile(&l, 0.99)
        }
    }
}

/// One pod replaced as a ReplicaSet does after a pod went away: the oldest pod deleted
/// (grace period 0: no kubelet runs here), a new pod of another Deployment created and marked
/// Running. Three writes, three pod watch events.
async fn replace_one(admin: &Client, s: &Scale) -> Result<(), kube::Error> {
    let Some(victim) = s.pods.lock().await.pop_front() else {
        return Ok(());
    };
    let (vd, vns) = (
        victim % s.deployments,
        ns_name((victim % s.deployments) % s.namespaces),
    );
    let vapi: Api<Pod> = Api::namespaced(admin.clone(), &vns);
    vapi.delete(
        &pod(&vns, &deploy_name(vd), victim).name_any(),
        &DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await?;
    let i = s.next_pod.fetch_add(1, Ordering::Relaxed) as usize;
    let di = i % s.deployments;
    let ns = ns_name(di % s.namespaces);
    let api: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let p = api
        .create(&PostParams::default(), &pod(&ns, &deploy_name(di), i))
        .await?;
    api.patch_status(
        &p.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}]}})),
    )
    .await?;
    s.pods.lock().await.push_back(i);
    Ok(())
}

/// Pod churn at `rate` events/s until `stop`; returns the pod events written.
async fn churn(admin: Client, s: Arc<Scale>, rate: f64, stop: Arc<AtomicBool>) -> u64 {
    let every = Duration::from_secs_f64(3.0 / rate);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let sem = Arc::new(tokio::sync::Semaphore::new(CHURN_CONCURRENCY));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let (admin, s, done) = (admin.clone(), s.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            replace_one(&admin, &s).await.expect("pod churn");
            done.fetch_add(3, Ordering::Relaxed);
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed)
}

/// For `seconds`, with churn running: removes the declared CPU annotation from one Deployment
/// after another (a merge patch setting it to null, as `kubectl annotate NAME KEY-` would for an annotation) and times until the watch shows it
/// back.
async fn drift_and_churn(
    admin: &Client,
    s: &Arc<Scale>,
    watch: &Watch,
    rate: f64,
    seconds: u64,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let churner = tokio::spawn(churn(admin.clone(), s.clone(), rate, stop.clone()));
    let start = Instant::now();
    let (mut latencies, mut lost) = (Vec::new(), 0);
    let remove = json!({"spec": {"template": {"metadata": {"annotations": {PROXY_CPU: null}}}}});
    let edit = PatchParams {
        field_manager: Some("kubectl-edit".into()),
        ..Default::default()
    };
    let mut k = 0usize;
    while start.elapsed() < Duration::from_secs(seconds) {
        // Spread over the Deployments (7919 is prime, so every one comes up once).
        let i = (k * 7919) % s.deployments;
        k += 1;
        let ns = ns_name(i % s.namespaces);
        let api: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
        let d = api
            .patch(&deploy_name(i), &edit, &Patch::Merge(&remove))
            .await
            .expect("drift");
        let drifted = Instant::now();
        let rv = d
            .resource_version()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match watch
            .fixed_after(&format!("{ns}/{}", deploy_name(i)), rv, DRIFT_LIMIT)
            .await
        {
            Some(at) => latencies.push(at - drifted),
            None => lost += 1,
        }
        tokio::time::sleep(DRIFT_PAUSE).await;
    }
    stop.store(true, Ordering::Relaxed);
    let churn_events = churner.await.expect("churn");
    Phase {
        latencies,
        lost,
        churn_events,
        elapsed: start.elapsed(),
    }
}

/// The baseline's corrector: a watch of the bench's Deployments that server-side applies the
/// four declared annotations to any Deployment without them, 16 in flight.
fn spawn_corrector(client: Client) -> tokio::task::JoinHandle<()> {
    let declared: serde_json::Map<String, serde_json::Value> = DECLARED
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let body = Arc::new(json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "spec": {"template": {"metadata": {"annotations": declared}}}}));
    let api: Api<Deployment> = Api::all(client.clone());
    let cfg = watcher::Config::default().labels(&format!("{}={}", LABEL.0, LABEL.1));
    tokio::spawn(async move {
        watcher(api, cfg)
            .default_backoff()
            .applied_objects()
            .filter_map(|d| async move { d.ok().filter(|d| !has_declared(d)) })
            .for_each_concurrent(WRITE_CONCURRENCY, |d| {
                let (client, body) = (client.clone(), body.clone());
                async move {
                    let api: Api<Deployment> =
                        Api::namespaced(client, &d.namespace().unwrap_or_default());
                    let _ = api
                        .patch(
                            &d.name_any(),
                            &PatchParams::apply(BASELINE_MANAGER).force(),
                            &Patch::Apply(&*body),
                        )
                        .await;
                }
            })
            .await;
    })
}

/// CPU time (user + system) of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state.
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    // USER_HZ: 100 ticks per second on Linux.
    Duration::from_millis(ticks * 10)
}

pub async fn run(namespaces: usize, deployments: usize, pods: usize, rate: f64, seconds: u64) {
    assert!(
        namespaces > 0 && deployments > 0 && rate > 0.0,
        "namespaces, deployments and the churn rate must be > 0"
    );
    let dir = testplane::scratch_dir("bench-scale");
    let plane = testplane::Plane::start_auditing_reads(&dir, testplane::Lifetime::Attached)
        .await
        .expect("start kube-apiserver (run hack/build-k8s-bins.sh first)");
    let admin = plane.client().await.expect("client");
    let crd = meshwarden::api::crd_yaml().expect("crd");
    testplane::apply_yaml(&admin, &crd, &[]).await.expect("crd");
    crate::common::istio_base(&admin).await;
    load(&admin, "istiod-fixed-replicas.yaml", "istio-system").await;
    println!(
        "scale: {namespaces} namespaces, {deployments} Deployments, {pods} running pods; pod churn {rate} events/s for {seconds} s"
    );
    let (took, running) = setup(&admin, namespaces, deployments, pods).await;
    // One Service per Deployment (the report sections judge them; headless: the test plane's
    // Service IP range is small), and their rules.
    let t = Instant::now();
    crate::sidecars::bounded(deployments, 32, |i| {
        let admin = admin.clone();
        async move {
            let ns = ns_name(i % namespaces);
            let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
                "metadata": {"name": deploy_name(i), "namespace": ns},
                "spec": {"clusterIP": "None", "ports": [{"port": 80}], "selector": {"app": deploy_name(i)}},
            }))
            .expect("service");
            Api::namespaced(admin, &ns)
                .create(&PostParams::default(), &svc)
                .await
                .map(|_| ())
        }
    })
    .await;
    testplane::apply_yaml(&admin, &report_objects(namespaces), &[])
        .await
        .expect("DestinationRules and AuthorizationPolicy");
    println!(
        "  setup: {deployments} Services, {} DestinationRules, 1 AuthorizationPolicy in {:.1} s",
        namespaces + 1,
        t.elapsed().as_secs_f64()
    );
    println!(
        "  setup: {namespaces} namespaces, {deployments} Deployments (rolled out), {running} pods (Running) in {:.1} s",
        took.as_secs_f64()
    );
    let s = Arc::new(Scale {
        namespaces,
        deployments,
        pods: tokio::sync::Mutex::new((0..pods).collect()),
        next_pod: AtomicU64::new(pods as u64),
    });

    // The bench's Deployment watch, playing the Deployment controller for every rollout.
    let watch = spawn_watch(admin.clone());
    watch.complete_any.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(300);
    while watch.listed() < deployments {
        assert!(Instant::now() < deadline, "bench watch did not list");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Baseline: the direct corrector converges every Deployment, then the same churn and
    // drift as the operator gets.
    let t = Instant::now();
    let corrector = spawn_corrector(admin.clone());
    let converged = watch
        .until(|n| n == deployments, Duration::from_secs(1800))
        .await;
    let baseline_converge = converged - t;
    println!(
        "  baseline: {deployments} Deployments corrected by a direct watch-and-apply in {:.1} s",
        baseline_converge.as_secs_f64()
    );
    let baseline = drift_and_churn(&admin, &s, &watch, rate, seconds).await;
    println!("{}", baseline.line("baseline"));
    corrector.abort();
    // Reset: the baseline's manager applies nothing, which removes its annotations.
    let empty = json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "spec": {"template": {"metadata": {"annotations": {}}}}});
    apply_baseline(&admin, namespaces, deployments, &empty, 32).await;
    watch.until(|n| n == 0, Duration::from_secs(600)).await;

    // The operator, as its own process and user.
    let port = free_port();
    let mut child = start_operator(&plane.dir, &plane.operator_kubeconfig, port);
    let pid = child.id();
    let t_ready = Instant::now();
    wait_http_ok(port, "/readyz", &mut child).await;
    let ready_after = t_ready.elapsed();
    let ready_rss = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let audit_at_ready = plane.audit_events().len();
    let policies: Api<MeshPolicy> = Api::all(admin.clone());
    let policy: MeshPolicy = serde_yaml::from_str(POLICY).expect("policy");
    let t = Instant::now();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("create policy");
    let converged = watch
        .until(|n| n == deployments, Duration::from_secs(1800))
        .await;
    let operator_converge = converged - t;
    println!(
        "  operator: {deployments} Deployments converged in {:.1} s ({:.2}x the direct corrector)",
        operator_converge.as_secs_f64(),
        operator_converge.as_secs_f64() / baseline_converge.as_secs_f64()
    );
    // Every condition settles before the churn starts.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut conditions = String::new();
    while Instant::now() < deadline {
        let p = policies.get("scale").await.expect("policy");
        let cs: Vec<_> = p
            .status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .filter(|c| c.type_ != "Ready")
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect();
        conditions = cs
            .iter()
            .map(|(t, s, r)| format!("{t}={s}/{r}"))
            .collect::<Vec<_>>()
            .join(" ");
        // The report sections report findings by design (False, not Unknown).
        let settled = |(t, s, _): &(String, String, String)| {
            s == "True" || (s == "False" && (t == "Resilience" || t == "Security"))
        };
        if !cs.is_empty() && cs.iter().all(settled) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("  conditions before the churn: {conditions}");
    // Where the peak is reached: converging, or under the churn.
    println!(
        "  operator RSS before the churn: {:.1} MiB, peak so far (VmHWM) {:.1} MiB",
        proc_status_kib(pid, "VmRSS:").unwrap_or(0) as f64 / 1024.0,
        proc_status_kib(pid, "VmHWM:").unwrap_or(0) as f64 / 1024.0
    );

    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                if let Some(kib) = proc_status_kib(pid, "VmRSS:") {
                    peak.fetch_max(kib, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let cpu_before = cpu_time(pid);
    let operator = drift_and_churn(&admin, &s, &watch, rate, seconds).await;
    let cpu = cpu_time(pid).saturating_sub(cpu_before);
    println!("{}", operator.line("operator"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    sampler.abort();
    let hwm = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    if let Ok(Some(st)) = child.try_wait() {
        panic!("meshwarden exited during the run: {st}");
    }
    let _ = child.kill();
    let _ = child.wait();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The operator's reads after it was ready, from the audit log, and the kinds it had
    // listed before (a list of one of those after readiness is a re-list).
    let (mut lists, mut watches) = (Vec::new(), 0);
    let mut listed_before = std::collections::BTreeSet::new();
    for (i, e) in plane.audit_events().into_iter().enumerate() {
        if e["user"]["username"] != "meshwarden-operator" {
            continue;
        }
        let uri = e["requestURI"].as_str().unwrap_or_default().to_string();
        match e["verb"].as_str() {
            Some("list") if e["stage"] == "ResponseComplete" => {
                if i < audit_at_ready {
                    listed_before.insert(kind_of(&uri));
                } else {
                    lists.push(uri)
                }
            }
            Some("watch") if e["stage"] == "ResponseStarted" && i >= audit_at_ready => watches += 1,
            _ => {}
        }
    }
    let lists = Lists::split(&lists, &listed_before);

    let mib = |kib: u64| kib as f64 / 1024.0;
    let ratio = operator.p99().as_secs_f64() / baseline.p99().as_secs_f64();
    println!(
        "  drift correction p99 operator/baseline: {ratio:.2}x; operator p99 {:.0} ms (target: under 1000 ms)",
        ms(operator.p99())
    );
    println!(
        "  operator CPU during the churn: {:.2} cores on average ({:.1} s of CPU in {:.1} s; target: under 0.5)",
        cpu.as_secs_f64() / operator.elapsed.as_secs_f64(),
        cpu.as_secs_f64(),
        operator.elapsed.as_secs_f64()
    );
    println!(
        "  operator RSS: peak (VmHWM) {:.1} MiB (target: under 128 MiB); when ready {:.1} MiB, sampled peak during the churn {:.1} MiB",
        mib(hwm),
        mib(ready_rss),
        mib(peak.load(Ordering::Relaxed))
    );
    println!(
        "  operator ready (initial lists done) {:.1} s after its start",
        ready_after.as_secs_f64()
    );
    println!(
        "  operator requests after it was ready (audit log): {} LIST, {watches} WATCH started",
        lists.all
    );
    println!(
        "    re-lists (of a kind listed before, or a kind's first page again): {} (target: 0)",
        lists.relists.len()
    );
    for l in lists.relists.iter().take(10) {
        println!("      LIST {l}");
    }
    println!(
        "    first lists of the watches the policy's sections started (pages): {}",
        if lists.first.is_empty() {
            "none".to_string()
        } else {
            lists
                .first
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
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

/// What a request URI lists: its path with its field and label selectors (two watches of
/// one kind told apart by a selector list apart), without paging.
fn kind_of(uri: &str) -> String {
    let mut parts = uri.splitn(2, '?');
    let path = parts.next().unwrap_or(uri);
    let selectors: Vec<&str> = parts
        .next()
        .unwrap_or_default()
        .split('&')
        .filter(|p| p.starts_with("fieldSelector=") || p.starts_with("labelSelector="))
        .collect();
    match selectors.is_empty() {
        true => path.to_string(),
        false => format!("{path}?{}", selectors.join("&")),
    }
}

/// The LISTs after readiness, told apart: the pages of the first list of a watch started
/// after readiness (a section declared by a policy created then starts the watches it reads,
/// by design), and re-lists: a kind listed before readiness, or a kind's first page again.
struct Lists {
    all: usize,
    relists: Vec<String>,
    /// Pages per kind.
    first: std::collections::BTreeMap<String, usize>,
}

impl Lists {
    fn split(lists: &[String], listed_before: &std::collections::BTreeSet<String>) -> Lists {
        let mut out = Lists {
            all: lists.len(),
            relists: Vec::new(),
            first: Default::default(),
        };
        let mut first_pages = std::collections::BTreeSet::new();
        for uri in lists {
            let kind = kind_of(uri);
            let first_page = !uri.contains("continue=");
            if listed_before.contains(&kind) || (first_page && !first_pages.insert(kind.clone())) {
                out.relists.push(uri.clone());
            } else {
                *out.first.entry(kind).or_default() += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_after_readiness_are_told_apart() {
        let before = ["/api/v1/pods".to_string()].into_iter().collect();
        let uris: Vec<String> = [
            "/api/v1/services?&limit=100",
            "/api/v1/services?&limit=100&continue=abc",
            "/api/v1/pods?&limit=100",
            "/api/v1/services?&limit=100",
            // Two watches of one kind, by name: two first lists.
            "/api/v1/namespaces/x/secrets?&fieldSelector=metadata.name%3Da&limit=500",
            "/api/v1/namespaces/x/secrets?&fieldSelector=metadata.name%3Db&limit=500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let l = Lists::split(&uris, &before);
        assert_eq!(l.all, 6);
        assert_eq!(
            l.relists,
            vec![
                "/api/v1/pods?&limit=100".to_string(),
                "/api/v1/services?&limit=100".to_string()
            ]
        );
        assert_eq!(l.first.get("/api/v1/services"), Some(&2));
        assert_eq!(l.first.len(), 3, "{:?}", l.first);
    }
}
