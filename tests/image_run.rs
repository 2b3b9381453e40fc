//! The operator image run the way the chart runs it, on the full cluster, and a real
//! Prometheus scraping it:
//!
//! the demo's cluster (Istio by Helm, the ingress gateway by Helm, the demo's workloads), the
//! chart installed by `helm install`, then the image (hack/image.sh) started with podman as the
//! chart's pod: its ServiceAccount's token, CA and namespace mounted at
//! `/var/run/secrets/kubernetes.io/serviceaccount`, `KUBERNETES_SERVICE_HOST/PORT`, the
//! Deployment's args and env, UID 65532, a read-only root, no capability, nothing writable.
//! It must converge `deploy/examples/production.yaml`; `/readyz` is 200 as leader only with
//! every watch synced; `/metrics` serves. A Prometheus (Debian's package) scrapes it as the
//! chart's ServiceMonitor says, with the chart's rules: every query of the dashboard and every
//! alert evaluates without error, and the panels that the example policy feeds return its
//! series. Last, SIGTERM releases the Lease within a second and the container exits 0.
//!
//! The metrics port is the chart's args' with another port number: the container shares the
//! host's network (no other network works here) with whatever else the machine runs.
//!
//! A binary of its own: one full cluster, and the policy is mesh-wide.

#[path = "support/container.rs"]
mod container;
#[path = "support/operator.rs"]
mod operator;
#[path = "support/prometheus.rs"]
mod prometheus;
#[path = "support/tools.rs"]
mod tools;

use std::time::{Duration, Instant};

use container::{Container, podman_ok};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use meshwarden::api::MeshPolicy;
use operator::{eventually, http_get};
use prometheus::{Prometheus, value};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const NS: &str = "meshwarden";
const POD: &str = "meshwarden-image-test";

/// The documents of a `helm template` render, as JSON values.
fn documents(yaml: &str) -> Vec<Value> {
    yaml.split("\n---\n")
        .filter_map(|d| serde_yaml::from_str::<Value>(d).ok())
        .filter(|v| v.is_object())
        .collect()
}

/// The operator's metrics on `port`: `meshwarden_leader`, and the `meshwarden_watch_synced`
/// values (none when the page is unreachable).
async fn leader_and_watches(port: u16) -> Option<(f64, Vec<f64>)> {
    let text = http_get(port, "/metrics").await?;
    let sample = |line: &str| line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
    let leader = text
        .lines()
        .find(|l| l.starts_with("meshwarden_leader "))
        .and_then(sample)?;
    let watches = text
        .lines()
        .filter(|l| l.starts_with("meshwarden_watch_synced{"))
        .filter_map(sample)
        .collect();
    Some((leader, watches))
}

/// The Deployment's container args and env, as the kubelet would hand them to the process
/// (field references resolved for a pod named [`POD`] in [`NS`]).
fn container_of(
    deployment: &Deployment,
    metrics_port: u16,
) -> (Vec<String>, Vec<(String, String)>) {
    let spec = deployment.spec.as_ref().unwrap();
    let c = &spec.template.spec.as_ref().unwrap().containers[0];
    let args = c
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|a| match a.strip_prefix("--metrics-addr=") {
            Some(addr) => {
                assert_eq!(addr, "0.0.0.0:8080", "the chart's metrics address");
                format!("--metrics-addr=0.0.0.0:{metrics_port}")
            }
            None => a,
        })
        .collect();
    let env = c
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            let field = e
                .value_from
                .as_ref()
                .and_then(|f| f.field_ref.as_ref())
                .map(|f| f.field_path.clone());
            let v = match field.as_deref() {
                Some("metadata.name") => POD.to_string(),
                Some("metadata.namespace") => NS.to_string(),
                Some(other) => panic!("unexpected field reference {other}"),
                None => e.value.unwrap_or_default(),
            };
            (e.name, v)
        })
        .collect();
    (args, env)
}

#[tokio::test]
async fn the_image_runs_as_the_chart_runs_it_and_prometheus_scrapes_it() {
    let image = container::image();
    let plane = testplane::shared_cluster();
    let admin = plane.client().await;
    let kc = &plane.kubeconfig;

    // The demo's cluster: the ingress gateway by Helm, the workloads, the chart.
    tools::helm(
        kc,
        &[
            "install",
            "istio-ingressgateway",
            testplane::istio::chart("gateway").to_str().unwrap(),
            "-n",
            "istio-ingress",
            "--create-namespace",
            "--set",
            "global.hub=docker.io/istio",
        ],
    );
    tools::kubectl(
        kc,
        &[
            "apply",
            "-f",
            &format!("{ROOT}/hack/fixtures/demo-workloads.yaml"),
        ],
    );
    for d in [
        "shop/cart",
        "shop/checkout",
        "legacy/batch-report",
        "monitoring/prometheus",
    ] {
        let (ns, name) = d.split_once('/').unwrap();
        tools::kubectl(
            kc,
            &[
                "-n",
                ns,
                "rollout",
                "status",
                &format!("deploy/{name}"),
                "--timeout=120s",
            ],
        );
    }
    tools::kubectl(kc, &["create", "namespace", NS]);
    tools::helm_install_chart(kc, &admin, NS).await;
    tools::kubectl(
        kc,
        &[
            "apply",
            "-f",
            &format!("{ROOT}/deploy/examples/production.yaml"),
        ],
    );

    // The chart's pod, as podman runs it.
    let sa_kc = testplane::service_account_kubeconfig(&plane.dir, NS, "meshwarden")
        .await
        .unwrap();
    let sa_config: Value = serde_yaml::from_str(&std::fs::read_to_string(&sa_kc).unwrap()).unwrap();
    let token = sa_config["users"][0]["user"]["token"].as_str().unwrap();
    let server = sa_config["clusters"][0]["cluster"]["server"]
        .as_str()
        .unwrap();
    let api_port: u16 = server.rsplit(':').next().unwrap().parse().unwrap();
    assert!(server.starts_with("https://127.0.0.1:"), "{server}");
    let sa = container::service_account_dir(
        &plane.dir.join("image"),
        token,
        &plane.dir.join("ca.crt"),
        NS,
    );
    let deployment = Api::<Deployment>::namespaced(admin.clone(), NS)
        .get("meshwarden")
        .await
        .unwrap();
    let port = testplane::operator::free_port().unwrap();
    let (args, env) = container_of(&deployment, port);
    let started = Instant::now();
    let name = format!("meshwarden-run-{}", std::process::id());
    let c = Container::run(&name, &image.name, &sa, api_port, &env, &args);

    // /readyz: 200 as leader only with every watch synced.
    let mut samples = Vec::new();
    let ready_after = loop {
        let before = leader_and_watches(port).await;
        let ready = http_get(port, "/readyz").await.is_some();
        let after = leader_and_watches(port).await;
        if let (Some((1.0, _)), Some((1.0, watches))) = (&before, &after) {
            samples.push((ready, watches.clone()));
            if ready {
                assert!(
                    !watches.is_empty() && watches.iter().all(|w| *w == 1.0),
                    "/readyz 200 as leader with watches {watches:?}:\n{}",
                    c.logs()
                );
                break started.elapsed();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not ready as leader within 60s:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let unready_as_leader = samples.iter().filter(|(r, _)| !r).count();
    eprintln!(
        "container start to /readyz 200 as leader: {ready_after:?} ({unready_as_leader} polls as leader answered 503 before)"
    );

    // It converges the example policy: the status written for its generation and settled
    // (the same for 6 s, the paced sidecar rollout finished), every section evaluated.
    let policies = Api::<MeshPolicy>::all(admin.clone());
    let mut last = (String::new(), Instant::now());
    let conditions = loop {
        let p = policies.get("production").await.unwrap();
        let status = p.status.clone().unwrap_or_default();
        let now: Vec<String> = status
            .conditions
            .iter()
            .map(|c| format!("{} {} {}: {}", c.type_, c.status, c.reason, c.message))
            .collect();
        let key = format!(
            "{:?}/{:?}/{now:?}",
            p.metadata.generation, status.observed_generation
        );
        if key != last.0 {
            last = (key, Instant::now());
        } else if status.observed_generation == p.metadata.generation
            && last.1.elapsed() > Duration::from_secs(6)
        {
            break now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "production did not settle within 300s: {now:?}:\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "production settled {:?} after the container started: {conditions:?}",
        last.1.duration_since(started)
    );
    // Every section evaluated; the HA sections and the sidecars hold. MutualTLS holds STRICT
    // back, so Ready stays False: the chart's own pods (simulated by kwok here, as on a real
    // cluster) have no sidecar and would be cut off; the example does not exempt the
    // operator's namespace.
    let status_of = |t: &str| {
        conditions
            .iter()
            .find(|c| c.starts_with(&format!("{t} ")))
            .unwrap_or_else(|| panic!("no {t} condition: {conditions:?}"))
            .split(' ')
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert!(
        !conditions
            .iter()
            .any(|c| c.split(' ').nth(1) == Some("Unknown")),
        "{conditions:?}"
    );
    for t in ["ControlPlaneHA", "GatewayHA", "SidecarResources"] {
        assert_eq!(status_of(t), "True", "{t}: {conditions:?}");
    }
    let mtls = conditions
        .iter()
        .find(|c| c.starts_with("MutualTLS "))
        .unwrap();
    assert!(
        mtls.starts_with("MutualTLS False StrictHeld") && mtls.contains(&format!("{NS} (2: ")),
        "{mtls}"
    );
    let ready = if status_of("Ready") == "True" {
        1.0
    } else {
        0.0
    };
    let metrics = http_get(port, "/metrics").await.expect("/metrics");
    assert!(
        metrics.contains(&format!(
            "meshwarden_policy_ready{{policy=\"production\"}} {ready}"
        )),
        "{metrics}"
    );

    // As the chart runs it: UID 65532, no capability, no privilege to gain, nothing
    // writable but the kernel's own file systems.
    let pid = c.pid();
    let uid = container::status_field(pid, "Uid");
    assert!(uid.split_whitespace().all(|u| u == "65532"), "Uid {uid}");
    let gid = container::status_field(pid, "Gid");
    assert!(gid.split_whitespace().all(|g| g == "65532"), "Gid {gid}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            container::status_field(pid, caps),
            "0000000000000000",
            "{caps}"
        );
    }
    assert_eq!(container::status_field(pid, "NoNewPrivs"), "1");
    let writable = container::writable_mounts(pid);
    let kernel = |m: &str| {
        ["/proc", "/sys", "/dev"]
            .iter()
            .any(|k| m == *k || m.starts_with(&format!("{k}/")))
    };
    let other: Vec<&String> = writable.iter().filter(|m| !kernel(m)).collect();
    assert!(
        other.is_empty(),
        "writable mounts: {other:?} (all: {writable:?})"
    );
    eprintln!("writable mounts (kernel file systems only): {writable:?}");

    scraped_by_prometheus(&plane.dir.join("prometheus"), port, ready).await;

    // SIGTERM: the Lease is released within a second, the process exits 0.
    let leases = Api::<Lease>::namespaced(admin.clone(), NS);
    let holder = leases
        .get("meshwarden-leader")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.holder_identity);
    assert_eq!(
        holder.as_deref(),
        Some(POD),
        "the container holds the Lease"
    );
    podman_ok(&["kill", "--signal", "TERM", &name]);
    let term = Instant::now();
    let released = eventually(5, "the Lease released", || async {
        let l = leases.get("meshwarden-leader").await.ok()?;
        l.spec
            .and_then(|s| s.holder_identity)
            .is_none()
            .then(|| term.elapsed())
    })
    .await;
    let code = podman_ok(&["wait", &name]);
    eprintln!("SIGTERM: Lease released after {released:?}, exit code {code}");
    assert!(
        released < Duration::from_secs(1),
        "Lease released after {released:?}"
    );
    assert_eq!(code, "0", "exit code:\n{}", c.logs());
    drop(c);
}

/// A Prometheus scraping the operator on `port` as the chart's ServiceMonitor says, with the
/// chart's rules: every dashboard query and every alert evaluates, the panels the example
/// policy feeds return its series, every rule is healthy and no alert is pending.
async fn scraped_by_prometheus(dir: &std::path::Path, port: u16, ready: f64) {
    let render = tools::helm(
        &testplane::shared_cluster().kubeconfig,
        &[
            "template",
            "meshwarden",
            &format!("{ROOT}/charts/meshwarden"),
            "-n",
            NS,
            "--set",
            "serviceMonitor.enabled=true,serviceMonitor.interval=1s,serviceMonitor.scrapeTimeout=1s",
            "--set",
            "prometheusRule.enabled=true",
        ],
    );
    let docs = documents(&render);
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let rules = serde_yaml::to_string(&kind("PrometheusRule")["spec"]).unwrap();
    let scrape = prometheus::scrape_config(kind("ServiceMonitor"), &format!("127.0.0.1:{port}"));
    let prom = Prometheus::start(dir, &scrape, &rules);
    prom.until_series(30, "up == 1").await;
    prom.until_series(30, "count_over_time(meshwarden_leader[1m]) >= 5")
        .await;

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{ROOT}/charts/meshwarden/dashboards/meshwarden.json"
        ))
        .unwrap(),
    )
    .unwrap();
    // Panels the example policy (no upgrades or certificates section, nothing failing) feeds.
    let fed = [
        "Policies Ready",
        "Ready per policy",
        "Violations by policy and rule",
        "Condition reasons",
        "Drift-correction latency (reconcile duration)",
        "Watch health",
        "Leader and other instances",
        "Reconciles and API writes",
    ];
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let result = prom
                .query(expr)
                .await
                .unwrap_or_else(|e| panic!("panel {title}: {expr}: {e}"));
            queries += 1;
            if fed.contains(&title) {
                assert!(!result.is_empty(), "panel {title}: no series for {expr}");
            }
        }
    }
    let series = prom
        .query(
            "max by (policy) (meshwarden_policy_ready and on (instance) (meshwarden_leader == 1))",
        )
        .await
        .unwrap();
    assert_eq!(series.len(), 1, "{series:?}");
    assert_eq!(series[0]["metric"]["policy"], "production");
    assert_eq!(value(&series[0]), ready, "{series:?}");
    let reasons = prom
        .query("meshwarden_rule_reason{policy=\"production\"}")
        .await
        .unwrap();
    let rules_seen: Vec<&str> = reasons
        .iter()
        .filter_map(|r| r["metric"]["rule"].as_str())
        .collect();
    for rule in [
        "ControlPlaneHA",
        "GatewayHA",
        "SidecarResources",
        "MutualTLS",
    ] {
        assert!(
            rules_seen.contains(&rule),
            "no reason for {rule}: {reasons:?}"
        );
    }

    // Every alert's expression evaluates, and every rule of the group is healthy.
    let group = &kind("PrometheusRule")["spec"]["groups"][0]["rules"];
    for rule in group.as_array().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        prom.query(expr)
            .await
            .unwrap_or_else(|e| panic!("alert {}: {expr}: {e}", rule["alert"]));
    }
    let healthy = eventually(30, "every rule evaluated and healthy", || async {
        let answer = prom.api("/api/v1/rules").await?;
        let rules = answer["data"]["groups"][0]["rules"].as_array()?.clone();
        (rules.len() == group.as_array()?.len() && rules.iter().all(|r| r["health"] == "ok"))
            .then_some(rules.len())
    })
    .await;
    // Nothing fires (every alert waits out its `for:` first); a policy that is not Ready has
    // its alert pending.
    let firing = prom.query("ALERTS{alertstate=\"firing\"}").await.unwrap();
    assert!(firing.is_empty(), "alerts firing: {firing:?}");
    let pending = prom
        .until_series(10, "ALERTS{alertstate=\"pending\"}")
        .await;
    let not_ready = pending.iter().any(|a| {
        a["metric"]["alertname"] == "MeshwardenPolicyNotReady"
            && a["metric"]["policy"] == "production"
    });
    assert_eq!(not_ready, ready == 0.0, "pending: {pending:?}");
    let names: Vec<String> = pending
        .iter()
        .map(|a| {
            let label = |l: &str| a["metric"][l].as_str().unwrap_or_default().to_string();
            format!("{}{{policy={}}}", label("alertname"), label("policy"))
        })
        .collect();
    eprintln!(
        "Prometheus: {queries} dashboard queries and {healthy} alerts evaluated; pending: {names:?}"
    );
}
