//! Memory under pod churn (issue 22): short-lived pods without a sidecar in a plain namespace
//! (what a CronJob leaves behind), each created and deleted, while an Enforce policy declares
//! STRICT for the mesh, so every one of them reaches the mTLS rule's pod watch and triggers a
//! reconcile. The operator runs as its own process against the bare plane; its resident size
//! is read from `/proc` before and after. A bounded operator ends where it started.
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use crate::sidecars::{bounded, free_port, proc_status_kib, start_operator, wait_http_ok};

/// The namespace of the pods: no injection label, no sidecars.
const NAMESPACE: &str = "cron";
/// Pods created before the first reading (so that what the allocator keeps for the work
/// itself, not for what is remembered, is in the starting size).
const WARM_UP: usize = 500;
/// Pods created and deleted in flight at most.
const CONCURRENCY: usize = 16;
/// Growth allowed between the start and the end.
const ALLOWED_KIB: u64 = 5 * 1024;
/// Every wait of the benchmark is bounded by this.
const LIMIT: Duration = Duration::from_secs(900);

const POLICY: &str = "apiVersion: meshwarden.io/v1alpha1
kind: MeshPolicy
metadata: {name: leak}
spec:
  enforcement: Enforce
  mtls: {mode: STRICT, rootNamespace: istio-system}
";

/// Creates and deletes pods `from..to` (`job-<i>`), each deleted as soon as it exists.
async fn churn(admin: &Client, from: usize, to: usize) {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NAMESPACE);
    let work = bounded(to - from, CONCURRENCY, |i| {
        let pods = pods.clone();
        async move {
            let name = format!("job-{:06}", from + i);
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"app": "cron", "run": name}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "job", "image": "registry.example/job:1"}],
                },
            }))
            .map_err(kube::Error::SerdeError)?;
            pods.create(&PostParams::default(), &pod).await?;
            pods.delete(&name, &DeleteParams::default().grace_period(0))
                .await
                .map(|_| ())
        }
    });
    tokio::time::timeout(LIMIT, work)
        .await
        .expect("pod churn within the limit");
}

/// utime + stime of `pid`, in clock ticks (100 a second).
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

/// Waits (up to [`LIMIT`]) until the operator has used no CPU for two seconds: every event
/// it was sent is handled. Returns how long that took.
async fn settle(pid: u32) -> Duration {
    let start = Instant::now();
    let mut last = cpu_ticks(pid);
    let mut quiet = 0;
    while quiet < 4 {
        assert!(start.elapsed() < LIMIT, "operator never idle");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = cpu_ticks(pid);
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
    start.elapsed()
}

/// The resident size of `pid` in KiB: the median of five readings 200 ms apart.
async fn rss(pid: u32) -> u64 {
    let mut v = Vec::new();
    for _ in 0..5 {
        v.push(proc_status_kib(pid, "VmRSS:").unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    v.sort_unstable();
    v[2]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub async fn run(pods: usize) {
    let (_dir, plane, admin) = crate::common::start_plane("bench-leak").await;
    // The plane answers before every API group is served (a first write has seen 404).
    let deadline = Instant::now() + Duration::from_secs(60);
    while Api::<Namespace>::all(admin.clone())
        .list(&ListParams::default().limit(1))
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the API server never served namespaces"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    crate::common::istio_base(&admin).await;
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).expect("namespace");
    Api::<Namespace>::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    testplane::apply_yaml(&admin, POLICY, &[])
        .await
        .expect("policy");
    println!(
        "memory under pod churn: {pods} pods without a sidecar created and deleted in namespace {NAMESPACE} ({CONCURRENCY} in flight), policy STRICT for the mesh"
    );

    let port = free_port();
    let mut child = start_operator(&plane.dir, &plane.operator_kubeconfig, port);
    let pid = child.id();
    wait_http_ok(port, "/livez", &mut child).await;
    let settled = settle(pid).await;
    let idle = rss(pid).await;
    println!(
        "  operator idle after start: {:.1} MiB RSS (settled in {:.1} s)",
        mib(idle),
        settled.as_secs_f64()
    );

    let t = Instant::now();
    churn(&admin, 0, WARM_UP).await;
    settle(pid).await;
    let start = rss(pid).await;
    println!(
        "  after a warm-up of {WARM_UP} pods ({:.1} s): {:.1} MiB RSS (the start)",
        t.elapsed().as_secs_f64(),
        mib(start)
    );

    // Halfway and at the end, so the trend shows.
    let half = WARM_UP + pods / 2;
    let t = Instant::now();
    churn(&admin, WARM_UP, half).await;
    settle(pid).await;
    let middle = rss(pid).await;
    println!("  after {} pods: {:.1} MiB RSS", pods / 2, mib(middle));
    churn(&admin, half, WARM_UP + pods).await;
    let churned = t.elapsed();
    let handled = settle(pid).await;
    let end = rss(pid).await;
    if let Ok(Some(st)) = child.try_wait() {
        panic!("meshwarden exited during the run: {st}");
    }
    let grown = end.saturating_sub(start);
    println!(
        "  after {pods} pods ({:.1} s of churn, idle again {:.1} s later): {:.1} MiB RSS, peak {:.1} MiB",
        churned.as_secs_f64(),
        handled.as_secs_f64(),
        mib(end),
        mib(proc_status_kib(pid, "VmHWM:").unwrap_or(0))
    );
    println!(
        "  growth: {:+.2} MiB from the start ({:+.0} bytes per pod), {:+.2} MiB from idle; allowed {:.0} MiB: {}",
        (end as f64 - start as f64) / 1024.0,
        (end as f64 - start as f64) * 1024.0 / pods.max(1) as f64,
        (end as f64 - idle as f64) / 1024.0,
        mib(ALLOWED_KIB),
        if grown <= ALLOWED_KIB { "PASS" } else { "FAIL" }
    );
    let _ = child.kill();
    let _ = child.wait();
    drop(plane);
}
