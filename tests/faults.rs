//! Faults on a plane of this test's own: kube-apiserver killed (`kill -9`) and started again;
//! the leader stopped; two instances started without leader election. `cluster.rs`: the same
//! faults and more on a full cluster of its own.
//! The operator runs as its binary, as in production.
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use meshwarden::api::MeshPolicy;
use serde_json::json;

#[path = "support/operator.rs"]
mod operator;
use operator::{Replica, eventually, http_get};

#[path = "faults/cluster.rs"]
mod cluster;
#[path = "faults/relist.rs"]
mod relist;

const NS: &str = "shop";
const CPU: &str = "sidecar.istio.io/proxyCPU";

async fn cpu_annotation(deployments: &Api<Deployment>) -> Option<String> {
    let d = deployments.get("web").await.ok()?;
    d.spec?.template.metadata?.annotations?.get(CPU).cloned()
}

/// Drift: the sidecar CPU annotation removed by someone else.
async fn remove_cpu(deployments: &Api<Deployment>) {
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"template": {"metadata": {"annotations": {CPU: null}}}}}),
            ),
        )
        .await
        .unwrap();
}

/// A plane of this test's own (its API server may be killed), with the MeshPolicy CRD and the
/// operator's namespace `meshwarden` (its Leases).
async fn own_plane(tag: &str) -> (std::path::PathBuf, testplane::Plane, kube::Client) {
    let dir = testplane::scratch_dir(tag);
    let plane = testplane::Plane::start(&dir, testplane::Lifetime::Attached)
        .await
        .expect("start kube-apiserver (run hack/build-k8s-bins.sh first)");
    let admin = plane.client().await.unwrap();
    testplane::apply_yaml(&admin, &meshwarden::api::crd_yaml().unwrap(), &[])
        .await
        .unwrap();
    testplane::apply_yaml(
        &admin,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: meshwarden}\n",
        &[],
    )
    .await
    .unwrap();
    (dir, plane, admin)
}

/// Namespace `shop` (injection on) with Deployment `web`, and MeshPolicy `faults` holding its
/// sidecar's CPU request at 100m in Enforce.
async fn shop_with_policy(admin: &kube::Client) {
    testplane::apply_yaml(
        admin,
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}, labels: {{istio-injection: enabled}}}}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: {NS}}}\n\
             spec:\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    \
             spec: {{containers: [{{name: web, image: web}}]}}\n"
        ),
        &[],
    )
    .await
    .unwrap();
    // `pacing: "Off"`: this plane runs no controller manager, so no rollout ever completes.
    let policy: MeshPolicy = serde_yaml::from_str(
        "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: faults}\n\
         spec:\n  enforcement: Enforce\n  sidecars: {resources: {requests: {cpu: 100m, memory: 128Mi}}, pacing: \"Off\"}\n",
    )
    .unwrap();
    Api::<MeshPolicy>::all(admin.clone())
        .create(&Default::default(), &policy)
        .await
        .unwrap();
}

#[tokio::test]
async fn drift_is_corrected_within_5s_of_the_api_server_returning() {
    let (dir, mut plane, admin) = own_plane("faults").await;
    shop_with_policy(&admin).await;

    let operator = Replica::start(&plane.operator_kubeconfig, "operator", &dir, &[]);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    eventually(30, "the sidecar annotation set", || async {
        (cpu_annotation(&deployments).await? == "100m").then_some(())
    })
    .await;
    eventually(10, "ready", || http_get(operator.port, "/readyz")).await;

    plane.kill_apiserver().unwrap();
    let killed = Instant::now();
    eventually(10, "/readyz 503 while the API server is gone", || async {
        http_get(operator.port, "/readyz")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    eprintln!("unready {:?} after the kill", killed.elapsed());
    tokio::time::sleep(Duration::from_secs(15)).await;

    plane.restart_apiserver().await.unwrap();
    let ready = Instant::now();
    eprintln!("API server ready again after {:?}", killed.elapsed());
    let admin = plane.client().await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    remove_cpu(&deployments).await;
    eventually(30, "the annotation restored", || async {
        (cpu_annotation(&deployments).await? == "100m").then_some(())
    })
    .await;
    let took = ready.elapsed();
    eprintln!("drift corrected {took:?} after the API server was ready");
    assert!(
        took < Duration::from_secs(5),
        "drift corrected {took:?} after the API server was ready:\n{}",
        operator.log_text()
    );
    eventually(10, "ready again", || http_get(operator.port, "/readyz")).await;
}

#[tokio::test]
async fn a_released_lease_is_taken_over_within_2s() {
    let (dir, plane, _) = own_plane("handover").await;
    // The default lease duration (15 s): a standby that waited for expiry would need 5-15 s.
    let kc = &plane.operator_kubeconfig;
    let a = Replica::start(kc, "replica-a", &dir, &["--leader-election"]);
    let b = Replica::start(kc, "replica-b", &dir, &["--leader-election"]);
    let a_leads = eventually(30, "one leader", || async {
        match (
            a.metric("meshwarden_leader").await? as i64,
            b.metric("meshwarden_leader").await? as i64,
        ) {
            (1, 0) => Some(true),
            (0, 1) => Some(false),
            _ => None,
        }
    })
    .await;
    let (mut leader, standby) = if a_leads { (a, b) } else { (b, a) };
    // Let the standby settle into waiting for the lease's expiry.
    tokio::time::sleep(Duration::from_secs(3)).await;
    leader.terminate().unwrap();
    let stopped = Instant::now();
    eventually(20, "the standby leads", || async {
        (standby.metric("meshwarden_leader").await? == 1.0).then_some(())
    })
    .await;
    let took = stopped.elapsed();
    eprintln!("standby took over {took:?} after SIGTERM to the leader");
    let _ = leader.child.wait();
    assert!(
        took < Duration::from_secs(2),
        "took over {took:?} after SIGTERM to the leader:\n{}",
        standby.log_text()
    );
}

/// Events meshwarden published about `kind`/`name`, as (reason, note, reporting instance).
async fn events_about(
    admin: &kube::Client,
    kind: &str,
    name: &str,
    since: jiff::Timestamp,
) -> Vec<(String, String, String)> {
    use k8s_openapi::api::events::v1::Event;
    let all = Api::<Event>::all(admin.clone())
        .list(&Default::default())
        .await
        .unwrap();
    let mut found: Vec<_> = all
        .items
        .into_iter()
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
        })
        .filter_map(|e| Some((e.event_time.as_ref()?.0, e)))
        .filter(|(t, _)| *t >= since)
        .collect();
    found.sort_by_key(|(t, _)| *t);
    found
        .into_iter()
        .map(|(_, e)| {
            (
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
                e.reporting_instance.unwrap_or_default(),
            )
        })
        .collect()
}

/// Removes the CPU annotation, waits until it is back (and 2 s more for Events), and returns
/// the `Corrected` Events about the policy since the removal that name `web` (one per
/// correction; the condition's move to `Corrected` is an Event of its own).
async fn drift_corrected(
    admin: &kube::Client,
    deployments: &Api<Deployment>,
) -> Vec<(String, String, String)> {
    let drift = jiff::Timestamp::now();
    remove_cpu(deployments).await;
    eventually(30, "the annotation restored", || async {
        (cpu_annotation(deployments).await? == "100m").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    events_about(admin, "MeshPolicy", "faults", drift)
        .await
        .into_iter()
        .filter(|(reason, note, _)| {
            reason == "Corrected" && note.starts_with("Deployment/shop/web:")
        })
        .collect()
}

/// Reasons of the Events on an instance's presence Lease, oldest first.
async fn reasons_on_record(admin: &kube::Client, who: &str, since: jiff::Timestamp) -> Vec<String> {
    let record = format!("meshwarden-leader-{who}");
    let seen = events_about(admin, "Lease", &record, since).await;
    seen.into_iter().map(|(r, _, _)| r).collect()
}

/// Every step checks: one instance writes (`meshwarden_leader` 1 on exactly one), each sees
/// the other (`meshwarden_other_instances`), and no Event about the policy comes from the
/// passive one.
#[tokio::test]
async fn a_second_instance_without_leader_election_goes_passive_and_never_doubles_events() {
    let (dir, plane, admin) = own_plane("twins").await;
    shop_with_policy(&admin).await;
    let kc = &plane.operator_kubeconfig;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    let start = jiff::Timestamp::now();

    // Step 1: one instance, no leader election: it writes and sees nobody else.
    let mut a = Replica::start(kc, "replica-a", &dir, &[]);
    eventually(30, "the sidecar annotation set", || async {
        (cpu_annotation(&deployments).await? == "100m").then_some(())
    })
    .await;
    eventually(10, "a writes, alone", || async {
        (a.metric("meshwarden_leader").await? == 1.0
            && a.metric("meshwarden_other_instances").await? == 0.0)
            .then_some(())
    })
    .await;

    // Step 2: a second one, also without leader election: both see it, the younger is passive.
    let b = Replica::start(kc, "replica-b", &dir, &[]);
    let started_b = std::time::Instant::now();
    eventually(20, "b's endpoint", || http_get(b.port, "/livez")).await;
    eventually(10, "each sees the other; b is passive", || async {
        (a.metric("meshwarden_other_instances").await? == 1.0
            && b.metric("meshwarden_other_instances").await? == 1.0
            && a.metric("meshwarden_leader").await? == 1.0
            && b.metric("meshwarden_leader").await? == 0.0)
            .then_some(())
    })
    .await;
    let detected = started_b.elapsed();
    eprintln!("second instance detected {detected:?} after it was started");
    assert!(
        b.log_text().contains("another meshwarden instance"),
        "b logs nothing about a:\n{}",
        b.log_text()
    );

    // Step 3: drift is corrected once, by a; b publishes nothing about the policy.
    let corrected = drift_corrected(&admin, &deployments).await;
    assert_eq!(
        corrected.len(),
        1,
        "one correction, one Event: {corrected:#?}"
    );
    let about_policy = events_about(&admin, "MeshPolicy", "faults", start).await;
    assert!(
        about_policy.iter().all(|(_, _, by)| by == "replica-a"),
        "b published Events about the policy while a writes: {about_policy:#?}"
    );
    // One detection Event per instance, on its own presence record, however many heartbeats.
    for (who, r) in [("replica-a", &a), ("replica-b", &b)] {
        let reasons = reasons_on_record(&admin, who, start).await;
        assert_eq!(reasons, ["OtherInstanceRunning"], "{who}");
        assert_eq!(r.metric("meshwarden_other_instances").await, Some(1.0));
    }
    assert_eq!(a.metric("meshwarden_leader").await, Some(1.0));
    assert_eq!(b.metric("meshwarden_leader").await, Some(0.0));

    // Step 4: a stops gracefully: b resumes and clears what it reported.
    a.terminate().unwrap();
    let stopped = std::time::Instant::now();
    let _ = a.child.wait();
    eventually(20, "b writes, alone", || async {
        (b.metric("meshwarden_leader").await? == 1.0
            && b.metric("meshwarden_other_instances").await? == 0.0)
            .then_some(())
    })
    .await;
    let resumed = stopped.elapsed();
    eprintln!("b resumed {resumed:?} after SIGTERM to a");
    assert!(
        resumed < Duration::from_secs(5),
        "b resumed {resumed:?} after a stopped:\n{}",
        b.log_text()
    );
    let corrected = drift_corrected(&admin, &deployments).await;
    assert_eq!(corrected.len(), 1, "{corrected:#?}");
    assert_eq!(corrected[0].2, "replica-b");
    assert_eq!(
        reasons_on_record(&admin, "replica-b", start).await,
        ["OtherInstanceRunning", "OtherInstanceGone"]
    );
}
