//! The mTLS rule at scale (issue 4): scope `Namespaces` over N namespaces with pods, the
//! operator as its own process, against a baseline that sends the same server-side applies
//! directly, 16 in flight, in the same run.
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use meshwarden::api::MeshPolicy;
use meshwarden::rules::mtls::{self, PeerAuthentication};
use serde_json::{Value, json};

use crate::common::ms;

/// Pods per namespace (all with a sidecar, so that STRICT is not held).
const PODS: usize = 3;
/// Concurrency of the setup (namespaces, pods, cleanup); not measured.
const SETUP: usize = 16;
/// Label of the namespaces the policy selects, and of the baseline's.
const OPERATOR_SET: &str = "mtls";
const BASELINE_SET: &str = "mtls-baseline";
const POLICY: &str = "bench-mtls";
/// The baseline's concurrency: the best direct way to send the same applies (16 in flight),
/// whatever the operator itself does.
const BASELINE_CONCURRENCY: usize = 16;
const WAIT: Duration = Duration::from_secs(900);
/// How long the operator may take to be quiet (10 s without a write) once converged.
const QUIET_WITHIN: Duration = Duration::from_secs(120);

/// The operator binary: `$MESHWARDEN_BIN`, else `meshwarden` next to this binary.
fn operator_bin() -> PathBuf {
    if let Ok(p) = std::env::var("MESHWARDEN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.with_file_name("meshwarden")
}

/// The operator process; killed when dropped.
struct Operator {
    child: Child,
    metrics: String,
    log: PathBuf,
}

impl Operator {
    fn start(kubeconfig: &Path, log: &Path) -> Operator {
        let port = testplane::ports::free_port().expect("free port");
        let metrics = format!("127.0.0.1:{port}");
        let err = std::fs::File::create(log).expect("operator log");
        let bin = operator_bin();
        let mut cmd = Command::new(&bin);
        // SAFETY: prctl is async-signal-safe; the operator dies with the benchmark.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .args(["run", "--metrics-addr", &metrics])
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "info,kube=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start {}: {e} (build it with cargo build --release -p meshwarden)",
                    bin.display()
                )
            });
        Operator {
            child,
            metrics,
            log: log.to_path_buf(),
        }
    }

    fn get(&self, path: &str) -> Option<String> {
        let mut s = std::net::TcpStream::connect(&self.metrics).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.metrics).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    /// Waits for `/livez`, then until the process has used no CPU for a second: its initial
    /// lists and watches are done. (`/readyz` is not used: it stays 503 without leader
    /// election, see docs/benchmarks.md.)
    async fn wait_settled(&mut self) {
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("operator exited ({st}); see {}", self.log.display());
            }
            if self.get("/livez").is_some_and(|r| r.contains(" 200 ")) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "operator not live in 120s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut last = self.cpu_ticks();
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = self.cpu_ticks();
            if now == last {
                return;
            }
            last = now;
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "operator never idle"
            );
        }
    }

    /// utime + stime of the process, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which is in parentheses and may hold spaces).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        n(11) + n(12)
    }

    /// A `/proc/<pid>/status` value in KiB (`VmHWM`, `VmRSS`).
    fn proc_kib(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// A counter or sum from `/metrics` (0 when absent).
    fn metric(&self, name: &str) -> f64 {
        self.get("/metrics")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ns_name(set: &str, i: usize) -> String {
    format!("{set}-{i:04}")
}

/// N namespaces labelled `bench=<set>` with injection on, each with [`PODS`] pods that carry
/// Istio's sidecar annotation.
async fn create_set(client: &Client, set: &str, n: usize) {
    let nss: Api<Namespace> = Api::all(client.clone());
    futures::stream::iter(0..n)
        .map(|i| {
            let nss = nss.clone();
            let client = client.clone();
            async move {
                let name = ns_name(set, i);
                let ns: Namespace = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"bench": set, "istio-injection": "enabled"}}
                }))
                .expect("namespace");
                nss.create(&PostParams::default(), &ns).await.expect("create namespace");
                let pods: Api<Pod> = Api::namespaced(client, &name);
                for p in 0..PODS {
                    let pod: Pod = serde_json::from_value(json!({
                        "metadata": {
                            "name": format!("app-{p}"),
                            "labels": {"app": format!("app-{p}")},
                            "annotations": {mtls::SIDECAR_STATUS: "{\"containers\":[\"istio-proxy\"]}"},
                        },
                        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
                    }))
                    .expect("pod");
                    pods.create(&PostParams::default(), &pod).await.expect("create pod");
                }
            }
        })
        .buffer_unordered(SETUP)
        .collect::<Vec<()>>()
        .await;
}

/// What meshwarden writes for a selected namespace: the whole object it owns.
fn peer_auth(ns: &str, owner_uid: &str) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {
            "name": mtls::SCOPE_OBJECT,
            "namespace": ns,
            "labels": {"app.kubernetes.io/managed-by": "meshwarden", "meshwarden.io/policy": POLICY},
            "ownerReferences": [{
                "apiVersion": "meshwarden.io/v1alpha1", "kind": "MeshPolicy", "name": POLICY,
                "uid": owner_uid, "controller": true, "blockOwnerDeletion": false,
            }],
        },
        "spec": {"mtls": {"mode": "STRICT"}},
    })
}

/// The baseline: the same applies sent directly, 16 in flight. Returns the wall time.
async fn baseline(client: &Client, n: usize) -> Duration {
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let ns = ns_name(BASELINE_SET, i);
            let api: Api<PeerAuthentication> = Api::namespaced(client.clone(), &ns);
            async move {
                api.patch(
                    mtls::SCOPE_OBJECT,
                    &PatchParams::apply(meshwarden::write::FIELD_MANAGER).force(),
                    &Patch::Apply(peer_auth(&ns, "00000000-0000-0000-0000-000000000000")),
                )
                .await
                .expect("baseline apply");
            }
        })
        .buffer_unordered(BASELINE_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    start.elapsed()
}

async fn delete_baseline_objects(client: &Client, n: usize) {
    futures::stream::iter(0..n)
        .map(|i| {
            let api: Api<PeerAuthentication> =
                Api::namespaced(client.clone(), &ns_name(BASELINE_SET, i));
            async move {
                api.delete(mtls::SCOPE_OBJECT, &DeleteParams::default())
                    .await
                    .expect("delete");
            }
        })
        .buffer_unordered(SETUP)
        .collect::<Vec<()>>()
        .await;
}

/// Consumes a watch until its initial list is done (at most two minutes).
async fn until_init<K>(
    events: &mut (impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin),
) {
    crate::common::bounded(
        Duration::from_secs(120),
        "the bench's watch listed",
        async {
            while let Some(ev) = events.next().await {
                if let Ok(watcher::Event::InitDone) = ev {
                    return;
                }
            }
            panic!("the bench's watch ended");
        },
    )
    .await;
}

fn is_converged(p: &MeshPolicy, n: usize) -> bool {
    let Some(st) = p.status.as_ref() else {
        return false;
    };
    let mtls_true = st
        .conditions
        .iter()
        .any(|c| c.type_ == "MutualTLS" && c.status == "True");
    st.observed_generation == p.metadata.generation
        && mtls_true
        && usize::try_from(st.targets).ok() == Some(n)
        && usize::try_from(st.compliant).ok() == Some(n)
}

fn strict_in_set(pa: &PeerAuthentication) -> bool {
    pa.name_any() == mtls::SCOPE_OBJECT
        && pa
            .namespace()
            .is_some_and(|ns| ns.starts_with(&format!("{OPERATOR_SET}-")))
        && pa.spec.mtls.as_ref().and_then(|m| m.mode.as_deref()) == Some("STRICT")
}

/// Writes by the operator's user from the audit log, after `skip` entries.
fn operator_writes(plane: &testplane::Plane, skip: usize) -> Vec<Value> {
    plane
        .audit_events()
        .into_iter()
        .skip(skip)
        .filter(|e| {
            e["user"]["username"] == "meshwarden-operator" && e["stage"] == "ResponseComplete"
        })
        .collect()
}

fn ts(e: &Value, key: &str) -> Option<f64> {
    // RFC 3339 with microseconds; seconds within the day are enough to subtract.
    let s = e[key].as_str()?;
    let t = s.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = t.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let sec: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + sec)
}

pub async fn run(n: usize) {
    let (dir, plane, admin) = crate::common::start_plane("bench-mtls").await;
    crate::common::istio_base(&admin).await;

    let t = Instant::now();
    create_set(&admin, OPERATOR_SET, n).await;
    create_set(&admin, BASELINE_SET, n).await;
    eprintln!(
        "setup: {} namespaces and {} pods in {:.1}s",
        2 * n,
        2 * n * PODS,
        t.elapsed().as_secs_f64()
    );

    // Baseline first, with no operator running: the same applies, 16 in flight.
    let base1 = baseline(&admin, n).await;
    delete_baseline_objects(&admin, n).await;

    // The operator, as its own process and user.
    let log = dir.join("operator.log");
    let mut op = Operator::start(&plane.operator_kubeconfig, &log);
    op.wait_settled().await;
    let rss_idle = op.proc_kib("VmRSS");
    let audit_before = plane.audit_events().len();

    let policies: Api<MeshPolicy> = Api::all(admin.clone());
    let pas: Api<PeerAuthentication> = Api::all(admin.clone());
    let mut policy_events = watcher(
        policies.clone(),
        watcher::Config::default().fields(&format!("metadata.name={POLICY}")),
    )
    .boxed();
    let mut pa_events = watcher(
        pas.clone(),
        watcher::Config::default().labels("meshwarden.io/policy"),
    )
    .boxed();
    // Both watches are established before the policy exists.
    until_init(&mut policy_events).await;
    until_init(&mut pa_events).await;
    let policy: MeshPolicy = serde_yaml::from_str(&format!(
        "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: {POLICY}}}\nspec:\n  enforcement: Enforce\n  mtls: {{mode: STRICT, scope: Namespaces, namespaceSelector: {{matchLabels: {{bench: {OPERATOR_SET}}}}}}}\n"
    ))
    .expect("policy");
    let mut seen = std::collections::HashSet::new();
    let start = Instant::now();
    policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("create policy");
    let (mut all_written, mut converged) = (None, None);
    while converged.is_none() || all_written.is_none() {
        assert!(
            start.elapsed() < WAIT,
            "not converged within {WAIT:?}; see {}",
            log.display()
        );
        tokio::select! {
            Some(ev) = policy_events.next() => {
                if let Ok(watcher::Event::Apply(p)) = ev
                    && converged.is_none()
                    && is_converged(&p, n)
                {
                    converged = Some(start.elapsed());
                }
            }
            Some(ev) = pa_events.next() => {
                if let Ok(watcher::Event::Apply(pa)) = ev && strict_in_set(&pa) {
                    seen.insert(pa.namespace().unwrap_or_default());
                    if seen.len() == n && all_written.is_none() {
                        all_written = Some(start.elapsed());
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    let converged = converged.expect("converged");
    let all_written = all_written.expect("all written");

    // Quiet: no write by the operator for 10 s (its own writes may trigger more reconciles),
    // its Lease renewals aside (every 5 s, whatever else happens).
    let acting = || {
        operator_writes(&plane, audit_before)
            .into_iter()
            .filter(|e| !crate::common::periodic(e))
            .count()
    };
    crate::common::bounded(QUIET_WITHIN, "the operator quiet for 10 s", async {
        let mut count = acting();
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let c = acting();
            if c != count {
                count = c;
                quiet_since = Instant::now();
            }
        }
    })
    .await;
    let hwm = op.proc_kib("VmHWM");
    let reconciles = op.metric("meshwarden_reconciles_total");
    let reconcile_secs = op.metric("meshwarden_reconcile_duration_seconds_sum");
    let cpu_secs = op.cpu_ticks() as f64 / 100.0;
    drop(op);

    // Verify the end state.
    let objs: Vec<PeerAuthentication> = pas
        .list(&ListParams::default().labels(&format!("meshwarden.io/policy={POLICY}")))
        .await
        .expect("list")
        .items;
    let ok = objs.iter().filter(|p| strict_in_set(p)).count();

    // Baseline again, after the operator stopped: the same cluster size it worked on.
    let base2 = baseline(&admin, n).await;
    let base = (base1 + base2) / 2;

    let writes = operator_writes(&plane, audit_before);
    let by = |f: &dyn Fn(&Value) -> bool| writes.iter().filter(|e| f(e)).count();
    let pa_writes = by(&|e| e["objectRef"]["resource"] == "peerauthentications");
    let status_writes = by(&|e| e["objectRef"]["resource"] == "meshpolicies");
    let event_writes = by(&|e| e["objectRef"]["resource"] == "events");
    let other = writes.len() - pa_writes - status_writes - event_writes;
    let pa_times: Vec<f64> = writes
        .iter()
        .filter(|e| e["objectRef"]["resource"] == "peerauthentications")
        .filter_map(|e| ts(e, "requestReceivedTimestamp"))
        .collect();
    let created = plane
        .audit_events()
        .into_iter()
        .skip(audit_before)
        .find(|e| {
            e["objectRef"]["resource"] == "meshpolicies"
                && e["verb"] == "create"
                && e["stage"] == "ResponseComplete"
        })
        .and_then(|e| ts(&e, "requestReceivedTimestamp"));

    let ratio = ms(converged) / ms(base);
    println!(
        "mTLS at scale: scope Namespaces over {n} namespaces, {PODS} pods each (STRICT, every pod with a sidecar)"
    );
    println!("  baseline apply concurrency: {BASELINE_CONCURRENCY} in flight");
    println!(
        "  baseline: {n} server-side applies sent directly: {:.0} ms before, {:.0} ms after the operator run (mean {:.0} ms)",
        ms(base1),
        ms(base2),
        ms(base)
    );
    println!(
        "  operator: policy created -> status converged (MutualTLS True, {n}/{n} compliant) {:.0} ms; all {n} objects STRICT after {:.0} ms",
        ms(converged),
        ms(all_written)
    );
    if let (Some(c), Some(first), Some(last)) = (
        created,
        pa_times.iter().cloned().reduce(f64::min),
        pa_times.iter().cloned().reduce(f64::max),
    ) {
        println!(
            "    (API server clock: first PeerAuthentication write {:.0} ms after the policy was created, last {:.0} ms after)",
            (first - c) * 1000.0,
            (last - c) * 1000.0
        );
    }
    println!("  ratio operator / baseline: {ratio:.2}x (target: at most 1.25x)");
    println!(
        "  writes by the operator: {} PeerAuthentication (objects that needed a change: {n}), {} MeshPolicy status, {} Event, {} other",
        pa_writes, status_writes, event_writes, other
    );
    println!(
        "  reconciles: {reconciles:.0}, {reconcile_secs:.2} s in reconcile, operator CPU {cpu_secs:.2} s since start"
    );
    println!(
        "  peak RSS (VmHWM): {:.1} MiB ({:.1} MiB when idle before the policy)",
        hwm as f64 / 1024.0,
        rss_idle as f64 / 1024.0
    );
    println!(
        "  end state: {ok} of {n} namespaces have PeerAuthentication {} in STRICT",
        mtls::SCOPE_OBJECT
    );
    assert_eq!(ok, n, "end state");
    drop(plane);
    if std::env::var_os("BENCH_KEEP").is_some() {
        println!(
            "  kept (BENCH_KEEP): operator log {}, audit log {}",
            log.display(),
            dir.join("audit.log").display()
        );
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}
