//! A real Prometheus (Debian's package) scraping a target the way the chart's ServiceMonitor
//! tells the Prometheus Operator to, with the chart's rules loaded; queried over its HTTP API.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// The scrape config the Prometheus Operator generates for the first endpoint of a rendered
/// ServiceMonitor, its Service's port resolved to `target` (the operator's `metrics` port).
pub fn scrape_config(service_monitor: &Value, target: &str) -> String {
    let meta = &service_monitor["metadata"];
    let endpoint = &service_monitor["spec"]["endpoints"][0];
    let s = |v: &Value| v.as_str().expect("a string").to_string();
    format!(
        "  - job_name: serviceMonitor/{ns}/{name}/0\n    metrics_path: {path}\n    scrape_interval: {interval}\n    scrape_timeout: {timeout}\n    static_configs:\n      - targets: ['{target}']\n        labels: {{namespace: {ns}, endpoint: {port}}}\n",
        ns = s(&meta["namespace"]),
        name = s(&meta["name"]),
        path = s(&endpoint["path"]),
        interval = s(&endpoint["interval"]),
        timeout = s(&endpoint["scrapeTimeout"]),
        port = s(&endpoint["port"]),
    )
}

pub struct Prometheus {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` in `dir` with `scrape` (scrape_configs entries) and the rule file
    /// `rules` (a Prometheus rule file), evaluating rules every second.
    pub fn start(dir: &Path, scrape: &str, rules: &str) -> Prometheus {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("rules.yaml"), rules).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!("global:\n  evaluation_interval: 1s\nrule_files: [rules.yaml]\nscrape_configs:\n{scrape}"),
        )
        .unwrap();
        let port = testplane::operator::free_port().unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .current_dir(dir)
            .arg("--config.file=prometheus.yml")
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian's package: apt-get install prometheus)");
        Prometheus {
            child,
            port,
            dir: dir.to_path_buf(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` of the HTTP API: the JSON answer, whatever its status.
    pub async fn api(&self, path: &str) -> Option<Value> {
        let (_, body) = testplane::operator::http_answer(self.port, path).await?;
        serde_json::from_str(&body).ok()
    }

    /// An instant query: its result, or the error Prometheus answered.
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let answer = self
            .api(&format!("/api/v1/query?query={}", encode(expr)))
            .await
            .ok_or_else(|| "no answer".to_string())?;
        if answer["status"] != "success" {
            return Err(answer.to_string());
        }
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits up to `secs` for `expr` to return a series.
    pub async fn until_series(&self, secs: u64, expr: &str) -> Vec<Value> {
        for _ in 0..secs * 5 {
            if let Ok(r) = self.query(expr).await
                && !r.is_empty()
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("no series for {expr} within {secs}s:\n{}", self.log());
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encoding of a query parameter's value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The value of a vector sample.
pub fn value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}
