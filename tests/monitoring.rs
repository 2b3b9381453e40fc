//! The chart's monitoring names only what the operator exports: every metric in an alert of
//! the PrometheusRule and in a query of the Grafana dashboard is in a live scrape of
//! `/metrics` (the operator's own registry, served by its own HTTP server), and every
//! exported metric is documented in docs/operations.md. A renamed metric fails here, not
//! during an incident. `hack/check-monitoring.sh` checks the rest: the rules and the
//! dashboard's queries parse in promtool, and the alerts' unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use meshwarden::telemetry::Metrics;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// GET `path` from `port` on loopback: (status code, body).
async fn get(port: u16, path: &str) -> (u16, String) {
    testplane::operator::http_answer(port, path)
        .await
        .expect("an HTTP answer")
}

/// A series in every family, set through the setters the controller uses: prometheus-client
/// leaves a family with no series out of the scrape altogether.
fn populated() -> Arc<Metrics> {
    use meshwarden::telemetry::{ErrorLabels, PolicyLabels, RuleLabels};
    let m = Metrics::default();
    let policy = || "production".to_string();
    let rule = || RuleLabels {
        policy: policy(),
        rule: "SidecarResources".into(),
    };
    m.policy_ready
        .get_or_create(&PolicyLabels { policy: policy() })
        .set(1);
    m.violations.get_or_create(&rule()).set(2);
    m.corrections.get_or_create(&rule()).inc();
    m.reconcile_errors
        .get_or_create(&ErrorLabels {
            kind: "Forbidden".into(),
        })
        .inc();
    m.reconcile_duration.observe(0.02);
    m.section_evaluations
        .get_or_create(&meshwarden::telemetry::SectionLabels {
            section: "sidecars".into(),
        })
        .inc();
    m.set_rule_reasons(
        "production",
        &BTreeMap::from([("SidecarResources".into(), "RolloutHeld".into())]),
    );
    m.set_sidecar_drift("production", &BTreeMap::from([("shop".into(), 1)]));
    m.set_proxies(
        "production",
        &BTreeMap::from([(("default".into(), "1.31-dev".into()), 3)]),
    );
    m.ha.set(
        "production",
        "GatewayHA",
        &[meshwarden::telemetry::ha::TargetOutcome {
            namespace: "istio-ingress".into(),
            deployment: "istio-ingressgateway".into(),
            available: 2,
            wanted: 3,
            zones: 2,
            disruptions_allowed: Some(0),
        }],
    );
    let in_ten_days = jiff::Timestamp::now().as_second() + 10 * 86_400;
    m.set_root_certificates(
        "production",
        Some(vec![("ab".into(), "O=cluster.local".into(), in_ten_days)]),
    );
    // A watch registers its state as soon as it is made (Listing, then Synced).
    let _watch = meshwarden::watch::resilient(m.watches.clone(), "namespaces", || {
        futures::stream::pending::<
            Result<
                kube::runtime::watcher::Event<k8s_openapi::api::core::v1::Namespace>,
                kube::runtime::watcher::Error,
            >,
        >()
    });
    Arc::new(m)
}

/// Serves `metrics` with the operator's HTTP server on a free port of loopback.
async fn serve(metrics: Arc<Metrics>) -> u16 {
    let port = testplane::ports::free_port().unwrap();
    tokio::spawn(meshwarden::telemetry::serve(
        ([127, 0, 0, 1], port).into(),
        metrics,
    ));
    for _ in 0..250 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return port;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the metrics server did not listen on {port}");
}

/// The operator's `/metrics` with a series in every family.
async fn scrape() -> String {
    let port = serve(populated()).await;
    let (status, body) = get(port, "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// The families the scrape holds, by their `# TYPE` lines.
fn families(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_scrape_holds_every_registered_family() {
    let source = read("src/telemetry.rs") + &read("src/telemetry/ha.rs");
    let registered: BTreeSet<String> = source
        .split("registry.register(")
        .skip(1)
        .map(|rest| {
            let name = rest.split('"').nth(1).unwrap();
            format!("meshwarden_{name}")
        })
        .collect();
    assert!(registered.len() >= 14, "{registered:?}");
    assert_eq!(
        families(&scrape().await),
        registered,
        "a family registered in src/telemetry.rs or src/telemetry/ha.rs has no series in populated() (add one), or the reverse"
    );
}

/// The sample names a scrape can hold: every family in its `# TYPE` lines, with the
/// suffixes of its type (a family with no series yet still has its TYPE line).
fn sample_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (family, kind) = rest.split_once(' ').unwrap();
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "summary" => &["", "_sum", "_count", "_created"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{family}{s}")));
    }
    names
}

/// The `meshwarden_*` metric names in a PromQL expression.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("meshwarden_") {
        let before = rest[..i].chars().last();
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.push(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// Every `expr:` of the PrometheusRule template, by alert.
fn alert_exprs() -> Vec<(String, String)> {
    let template = read("charts/meshwarden/templates/prometheusrule.yaml");
    let mut alert = String::new();
    let mut out = Vec::new();
    for line in template.lines().map(str::trim) {
        if let Some(a) = line.strip_prefix("- alert: ") {
            alert = a.to_string();
        } else if let Some(e) = line.strip_prefix("expr: ") {
            out.push((alert.clone(), e.to_string()));
        }
    }
    out
}

/// Every query of the dashboard, by panel title.
fn dashboard_exprs() -> Vec<(String, String)> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("charts/meshwarden/dashboards/meshwarden.json")).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap().to_string();
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            out.push((title.clone(), t["expr"].as_str().unwrap().to_string()));
        }
    }
    out
}

#[tokio::test]
async fn every_alert_and_panel_names_only_exported_metrics() {
    let scrape = scrape().await;
    let exported = sample_names(&scrape);
    assert!(
        exported.contains("meshwarden_policy_ready"),
        "no meshwarden family in the scrape:\n{scrape}"
    );
    let alerts = alert_exprs();
    assert_eq!(alerts.len(), 8, "alerts in the PrometheusRule: {alerts:?}");
    let panels = dashboard_exprs();
    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for (what, expr) in alerts.iter().chain(&panels) {
        let names = metrics_in(expr);
        assert!(
            !names.is_empty(),
            "{what} names no meshwarden metric: {expr}"
        );
        for name in names {
            if !exported.contains(&name) {
                unknown.push(format!("{what}: {name} in {expr}"));
            }
            used.insert(name);
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics the operator does not export:\n{}\nexported: {exported:?}",
        unknown.join("\n")
    );
    // Every family the operator exports has a panel.
    for family in &families(&scrape) {
        assert!(
            used.iter().any(|u| u.starts_with(family)),
            "no panel or alert shows {family}"
        );
    }
}

#[tokio::test]
async fn every_exported_metric_is_documented() {
    let scrape = scrape().await;
    let docs = read("docs/operations.md");
    for line in scrape.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (family, kind) = rest.split_once(' ').unwrap();
        let name = if kind == "counter" {
            format!("{family}_total")
        } else {
            family.to_string()
        };
        assert!(
            docs.contains(&format!("| `{name}` |")),
            "{name} is missing from the metrics table of docs/operations.md"
        );
    }
}

#[tokio::test]
async fn readyz_is_503_until_ready_and_livez_always_200() {
    let metrics = Arc::new(Metrics::default());
    let port = serve(metrics.clone()).await;
    assert_eq!(get(port, "/livez").await.0, 200);
    assert_eq!(get(port, "/readyz").await.0, 503);
    metrics.set_ready(true);
    assert_eq!(get(port, "/readyz").await.0, 200);
}

#[test]
fn metric_names_are_read_from_expressions() {
    assert_eq!(
        metrics_in(
            "histogram_quantile(0.5, sum by (le) (rate(meshwarden_reconcile_duration_seconds_bucket[5m])))"
        ),
        ["meshwarden_reconcile_duration_seconds_bucket"]
    );
    assert_eq!(
        metrics_in("max(x_meshwarden_y) + meshwarden_leader"),
        ["meshwarden_leader"]
    );
}
