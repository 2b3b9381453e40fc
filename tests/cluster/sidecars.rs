//! Sidecar rollouts meshwarden starts on the full cluster: paced for real, and their completion
//! marks kept through pod churn.

use super::*;

#[tokio::test]
async fn meshwarden_paces_a_real_sidecar_rollout() {
    let env = common::cluster_env("rollout").await;
    let ns = env
        .namespace("shop", &[("istio-injection", "enabled")])
        .await;
    let deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    create_deployments(&env.client, &ns, &["cart", "checkout"]).await;
    for name in ["cart", "checkout"] {
        common::eventually(90, "2 ready injected pods per workload", || async {
            let p = ready_pods(&pods, name).await;
            (p.len() == 2 && p.iter().all(|p| proxy_requests(p).is_some())).then_some(())
        })
        .await;
        // And their controller reports the creation rolled out: its status follows the pods
        // late under load, and a creation still reported rolling would count as a rollout of
        // meshwarden's below (two at once, at the first sample).
        common::eventually(90, "the creation reported rolled out", || async {
            (!rolling(&deploys.get(name).await.unwrap())).then_some(())
        })
        .await;
    }
    env.create_policy(
        "sidecars",
        &format!(
            "enforcement: Enforce\nsidecars:\n  namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {ns}}}}}\n  resources: {{requests: {{cpu: 200m, memory: 256Mi}}, limits: {{memory: 512Mi}}}}\n"
        ),
    )
    .await;
    let _op = env.start_operator().await;

    // Watch both rollouts until every pod carries the new proxy size; never two at once.
    let start = Instant::now();
    let mut most_rolling = 0;
    loop {
        let list = deploys.list(&ListParams::default()).await.unwrap();
        let now: Vec<&Deployment> = list.items.iter().filter(|d| rolling(d)).collect();
        if now.len() > 1 {
            // What a failure of the assertion below is made of.
            for d in &now {
                eprintln!(
                    "pacing at {:.1}s: rolling together: {} generation {:?}, status {:?}",
                    start.elapsed().as_secs_f64(),
                    d.name_any(),
                    d.metadata.generation,
                    d.status
                );
            }
        }
        most_rolling = most_rolling.max(now.len());
        let all = pods.list(&ListParams::default()).await.unwrap().items;
        let live: Vec<&Pod> = all
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let resized = live
            .iter()
            .all(|p| proxy_requests(p) == Some(("200m".to_string(), "256Mi".to_string())));
        if live.len() == 4 && resized && list.items.iter().all(|d| !rolling(d)) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "the sidecar rollout did not finish in 180s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(most_rolling, 1, "pacing rolls one workload at a time");
    let p = env.wait_settled("sidecars", 60).await;
    let cond = common::condition(&p, "SidecarResources").expect("SidecarResources condition");
    assert_eq!(cond.status, "True", "{cond:?}");
}

/// What the sidecars rule reads to tell pod churn from a rollout, from the real controllers:
/// a pod of a rolled-out StatefulSet and of a rolled-out Deployment is deleted (as a drain
/// does); while the replacement is not ready yet, the StatefulSet keeps its update revision
/// current and the Deployment keeps `Progressing` at `NewReplicaSetAvailable`, so
/// `statefulset_rollout` and `deployment_rollout` read every state in between as rolled out.
#[tokio::test]
async fn pod_churn_after_a_rollout_keeps_the_controllers_completion_marks() {
    use k8s_openapi::api::apps::v1::StatefulSet;
    use meshwarden::rules::sidecars::{Rollout, deployment_rollout, statefulset_rollout};

    let env = common::cluster_env("churn").await;
    let ns = env.namespace("apps", &[]).await;
    let c = &env.client;
    let mut sts = deployment("db", 2, json!({}));
    sts["kind"] = json!("StatefulSet");
    sts["spec"]["serviceName"] = json!("db");
    let sts: StatefulSet = serde_json::from_value(sts).unwrap();
    let statefulsets: Api<StatefulSet> = Api::namespaced(c.clone(), &ns);
    statefulsets
        .create(&PostParams::default(), &sts)
        .await
        .unwrap();
    let deploys: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    deploys
        .create(
            &PostParams::default(),
            &serde_json::from_value(deployment("web", 2, json!({}))).unwrap(),
        )
        .await
        .unwrap();
    let marks = |s: &StatefulSet, d: &Deployment| {
        let st = s.status.clone().unwrap_or_default();
        let progressing = d
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().flatten())
            .find(|c| c.type_ == "Progressing")
            .and_then(|c| c.reason.clone());
        (
            st.current_revision.is_some() && st.current_revision == st.update_revision,
            progressing.as_deref() == Some("NewReplicaSetAvailable"),
        )
    };
    common::eventually(90, "both rolled out and ready", || async {
        let (s, d) = (
            statefulsets.get("db").await.ok()?,
            deploys.get("web").await.ok()?,
        );
        let ready = s.status.as_ref()?.ready_replicas == Some(2)
            && d.status.as_ref()?.available_replicas == Some(2);
        (ready && marks(&s, &d) == (true, true)).then_some(())
    })
    .await;

    // Every status the controllers write is seen through a watch (polling can miss a
    // replacement that kwok makes ready within a few milliseconds).
    use futures::{StreamExt, TryStreamExt};
    use kube::runtime::{WatchStreamExt, watcher};
    enum Seen {
        Sts(Box<StatefulSet>),
        Deploy(Box<Deployment>),
    }
    let sts_events = watcher(
        statefulsets.clone(),
        watcher::Config::default().fields("metadata.name=db"),
    )
    .applied_objects()
    .map_ok(|s| Seen::Sts(Box::new(s)));
    let deploy_events = watcher(
        deploys.clone(),
        watcher::Config::default().fields("metadata.name=web"),
    )
    .applied_objects()
    .map_ok(|d| Seen::Deploy(Box::new(d)));
    let mut events = futures::stream::select(sts_events.boxed(), deploy_events.boxed());
    // The watches are running (each has listed its object) before any pod goes away.
    let (mut s, mut d) = (None, None);
    while s.is_none() || d.is_none() {
        match events.next().await.expect("watch").expect("watch") {
            Seen::Sts(new) => s = Some(*new),
            Seen::Deploy(new) => d = Some(*new),
        }
    }
    let (mut s, mut d) = (s.expect("listed"), d.expect("listed"));

    let pods: Api<Pod> = Api::namespaced(c.clone(), &ns);
    for app in ["db", "web"] {
        let victim = ready_pods(&pods, app).await.remove(0);
        pods.delete(&victim.name_any(), &DeleteParams::default())
            .await
            .unwrap();
    }
    let (mut sts_unready, mut deploy_unavailable) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let next = tokio::time::timeout_at(deadline.into(), events.next()).await;
        let Ok(Some(event)) = next else {
            panic!(
                "the pods were not replaced in 60s (StatefulSet unready seen {sts_unready} times, Deployment unavailable {deploy_unavailable})"
            );
        };
        match event.expect("watch") {
            Seen::Sts(new) => s = *new,
            Seen::Deploy(new) => d = *new,
        }
        let ready = s
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        let available = d
            .status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0);
        if ready < 2 {
            sts_unready += 1;
        }
        if available < 2 {
            deploy_unavailable += 1;
        }
        assert_eq!(marks(&s, &d), (true, true), "{:?} {:?}", s.status, d.status);
        assert_eq!(statefulset_rollout(&s), Rollout::Complete, "{:?}", s.status);
        assert_eq!(deployment_rollout(&d), Rollout::Complete, "{:?}", d.status);
        if ready == 2 && available == 2 && sts_unready > 0 && deploy_unavailable > 0 {
            break;
        }
    }
}
