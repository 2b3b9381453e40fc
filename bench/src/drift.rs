//! Drift-correction latency of the HA rule (issue: break a rule N times, time the fix).
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use meshwarden::api::MeshPolicy;
use meshwarden::context::Context;
use meshwarden::controller::{self, State};

use crate::common::{load, ms, percentile};

pub async fn run(n: usize) {
    let (dir, plane, admin) = crate::common::start_plane("bench").await;
    let ns = "bench-istio";
    testplane::apply_yaml(
        &admin,
        &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"),
        &[],
    )
    .await
    .expect("namespace");
    load(&admin, "istiod-fixed-replicas.yaml", ns).await;

    // The operator, in-process, as its own user; fight detection off: this benchmark is a
    // deliberate fight of 50 rounds.
    let state = Arc::new(State::new(
        Context::new(
            plane.operator_client().await.expect("client"),
            Some("bench".into()),
        ),
        None,
    ));
    state.ctx.memory.set_fight_limit(Duration::from_secs(1), 0);
    let st = state.clone();
    tokio::spawn(async move { controller::run(st, std::future::pending()).await });
    let policies: Api<MeshPolicy> = Api::all(admin.clone());
    let policy: MeshPolicy = serde_yaml::from_str(&format!(
        "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: bench}}\nspec: {{enforcement: Enforce, controlPlane: {{namespace: {ns}, replicas: {{min: 2}}}}}}\n"
    ))
    .expect("policy");
    policies
        .create(&PostParams::default(), &policy)
        .await
        .expect("create policy");

    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), ns);
    let replicas = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas);
    let mut events = watcher(
        deployments.clone(),
        watcher::Config::default().fields("metadata.name=istiod"),
    )
    .applied_objects()
    .boxed();
    // Converged first.
    crate::common::bounded(
        Duration::from_secs(120),
        "istiod at 2 replicas (the policy converged)",
        async {
            while let Some(Ok(d)) = events.next().await {
                if replicas(&d) == Some(2) {
                    return;
                }
            }
            panic!("the bench's Deployment watch ended");
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Baseline: the round trip of one server-side apply PATCH, measured now.
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": "rtt"}})).expect("cm"),
    )
    .await
    .expect("configmap");
    let mut rtt = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        cms.patch(
            "rtt",
            &PatchParams::apply("bench").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "v1", "kind": "ConfigMap", "data": {"i": i.to_string()}
            })),
        )
        .await
        .expect("patch");
        rtt.push(t.elapsed());
    }

    // Break the rule n times; time until the watch shows it corrected.
    let mut lat = Vec::new();
    let mut seen_break = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        deployments
            .patch(
                "istiod",
                &PatchParams::apply("someone").force(),
                &Patch::Apply(serde_json::json!({
                    "apiVersion": "apps/v1", "kind": "Deployment", "spec": {"replicas": 1}
                })),
            )
            .await
            .expect("break");
        loop {
            match tokio::time::timeout(Duration::from_secs(30), events.next()).await {
                Ok(Some(Ok(d))) if replicas(&d) == Some(1) => {
                    seen_break.push(t.elapsed());
                }
                Ok(Some(Ok(d))) if replicas(&d) == Some(2) => break,
                Ok(Some(_)) => continue,
                _ => panic!("not corrected within 30s"),
            }
        }
        lat.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Server clock: from the commit of each break to the commit of the operator's correction,
    // both read from the API server's audit log. This is how long the rule stayed broken,
    // without the delay of the benchmark's own watch.
    let mut broken = Vec::new();
    let stamp = |e: &serde_json::Value| {
        e["stageTimestamp"]
            .as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    };
    let mut pending_break: Option<jiff::Timestamp> = None;
    for e in plane.audit_events() {
        let r = &e["objectRef"];
        if e["stage"] != "ResponseComplete"
            || e["verb"] != "patch"
            || r["resource"] != "deployments"
            || r["name"] != "istiod"
            || r["namespace"] != ns
        {
            continue;
        }
        let Some(at) = stamp(&e) else { continue };
        match e["user"]["username"].as_str() {
            Some("meshwarden-operator") => {
                if let Some(b) = pending_break.take() {
                    let d = at.duration_since(b);
                    broken.push(Duration::from_micros(d.as_micros().max(0) as u64));
                }
            }
            _ => pending_break = Some(at),
        }
    }
    // The first pair is the initial convergence, before the breaks.
    let mut broken = broken.split_off(broken.len().saturating_sub(n));
    rtt.sort();
    lat.sort();
    broken.sort();
    seen_break.sort();
    if !seen_break.is_empty() {
        println!(
            "  a watcher sees the break itself after: median {:.2} ms",
            ms(percentile(&seen_break, 0.5))
        );
    }
    let (rtt_med, lat_med, lat_p95) = (
        percentile(&rtt, 0.5),
        percentile(&lat, 0.5),
        percentile(&lat, 0.95),
    );
    println!(
        "drift-correction latency over {n} breaks (replicas of istiod set to 1, restored to 2)"
    );
    println!(
        "  baseline: one server-side apply PATCH round trip, median {:.2} ms",
        ms(rtt_med)
    );
    if broken.len() == n {
        let (b_med, b_p95) = (percentile(&broken, 0.5), percentile(&broken, 0.95));
        println!(
            "  time broken (server clock, break committed -> correction committed): median {:.2} ms, p95 {:.2} ms",
            ms(b_med),
            ms(b_p95)
        );
        println!(
            "  ratio to the PATCH round trip: median {:.2}x, p95 {:.2}x (target: median within 5x)",
            ms(b_med) / ms(rtt_med),
            ms(b_p95) / ms(rtt_med)
        );
    } else {
        println!("  audit log pairs found: {} of {n}", broken.len());
    }
    println!(
        "  seen by a client watching the Deployment (one more watch delivery): median {:.2} ms, p95 {:.2} ms ({:.2}x)",
        ms(lat_med),
        ms(lat_p95),
        ms(lat_med) / ms(rtt_med)
    );
    println!("  writes by the operator: {}", state.ctx.writes.get());
    drop(plane);
    let _ = std::fs::remove_dir_all(dir);
}
