//! Helpers shared by the benchmarks.
use std::time::Duration;

use kube::Client;

pub const FIXTURES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/fixtures/istio-1.30.3"
);

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn load(client: &Client, file: &str, namespace: &str) {
    let text = std::fs::read_to_string(format!("{FIXTURES}/{file}")).expect("fixture");
    let keep = [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ];
    let mut out = String::new();
    for doc in text.split("\n---") {
        let Ok(v) = serde_yaml::from_str::<serde_json::Value>(doc) else {
            continue;
        };
        if v.is_null() || !keep.contains(&v["kind"].as_str().unwrap_or_default()) {
            continue;
        }
        let mut v = v;
        v["metadata"]["namespace"] = serde_json::json!(namespace);
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&v).expect("yaml"));
    }
    testplane::apply_yaml(client, &out, &[])
        .await
        .expect("load fixture");
}
