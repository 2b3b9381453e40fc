//! Changes made while the operator's watches are down are acted on once they have listed
//! again: the operator reaches the API server through a proxy the test controls
//! (`testplane::proxy`). The test cuts it (every watch fails), changes or deletes one object of
//! each kind meshwarden watches and writes or decides by, then lets the operator's requests
//! through again except its reads, which it holds: the MeshPolicies watch lists again, the
//! policy is reconciled while every other cache is stale, and that reconcile's status write
//! is held too, as a restarted API server holds requests for a custom resource it does not
//! serve yet. Then the reads go through (the watches list again) while that status write
//! still hangs. Each change must be corrected or reported within 2 s of its watch listing
//! again (`meshwarden_watch_synced` back at 1). Every step waits for a condition, none for
//! time: the changes reach the operator only through relists (a LIST sends no Delete for
//! what vanished), after a reconcile that decided from the stale caches.
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams, PostParams};
use meshwarden::api::MeshPolicy;
use meshwarden::rules::mtls::PeerAuthentication;
use serde_json::json;

use super::operator::{Replica, eventually, http_get};
use super::{CPU, cpu_annotation};

/// Istio's PeerAuthentication kind, enough of it for the mTLS section (the bare plane has no
/// Istio charts).
const PEER_AUTHENTICATION_CRD: &str = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\n\
metadata: {name: peerauthentications.security.istio.io}\n\
spec:\n  group: security.istio.io\n  scope: Namespaced\n  \
names: {plural: peerauthentications, singular: peerauthentication, kind: PeerAuthentication, listKind: PeerAuthenticationList}\n  \
versions:\n  - name: v1\n    served: true\n    storage: true\n    \
schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}\n";

fn deployment(name: &str, ns: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\n\
         spec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    \
         spec: {{containers: [{{name: discovery, image: docker.io/istio/pilot:1.31-dev}}]}}\n"
    )
}

/// istiod (a Deployment labelled `app: istiod` with its HPA), `shop` (injected) with `web`,
/// `extra` (not injected yet) with `late`, `secure` (STRICT by the policy) and `stray` (where
/// a pod without a sidecar will appear).
async fn setup(admin: &kube::Client) {
    testplane::apply_yaml(admin, PEER_AUTHENTICATION_CRD, &[])
        .await
        .unwrap();
    testplane::wait_crd_established(admin, "peerauthentications.security.istio.io")
        .await
        .unwrap();
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio-injection: enabled}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: extra}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: secure, labels: {team: sec}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: stray}\n",
    );
    yaml.push_str(&deployment("istiod", "istio-system", "app: istiod"));
    yaml.push_str(&deployment("web", "shop", "app: web"));
    yaml.push_str(&deployment("late", "extra", "app: late"));
    yaml.push_str(
        "---\napiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {name: istiod, namespace: istio-system}\n\
         spec:\n  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: istiod}\n  minReplicas: 1\n  maxReplicas: 5\n  \
         metrics: [{type: Resource, resource: {name: cpu, target: {type: Utilization, averageUtilization: 80}}}]\n",
    );
    testplane::apply_yaml(admin, &yaml, &[]).await.unwrap();
    // `pacing: "Off"`: this plane runs no controller manager, so no rollout ever completes.
    // `force: true`: `secure` is STRICT even when a client without a sidecar appears, which
    // is then reported (`ClientsCutOff`).
    let policy: MeshPolicy = serde_yaml::from_str(
        "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: relist}\n\
         spec:\n  enforcement: Enforce\n  \
         sidecars: {resources: {requests: {cpu: 100m, memory: 128Mi}}, pacing: \"Off\"}\n  \
         controlPlane: {namespace: istio-system, replicas: {min: 2}, disruptionBudget: {maxUnavailable: 1}}\n  \
         mtls: {mode: STRICT, force: true, scope: Namespaces, namespaceSelector: {matchLabels: {team: sec}}}\n",
    )
    .unwrap();
    Api::<MeshPolicy>::all(admin.clone())
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
}

/// `meshwarden_watch_synced` of every watch, from the operator's metrics.
async fn synced(port: u16) -> Option<Vec<(String, bool)>> {
    let text = http_get(port, "/metrics").await?;
    Some(
        text.lines()
            .filter_map(|l| l.strip_prefix("meshwarden_watch_synced{watch=\""))
            .filter_map(|l| {
                let (name, value) = l.split_once("\"} ")?;
                Some((name.to_string(), value.trim() == "1"))
            })
            .collect(),
    )
}

/// One change made while the watches are down, and how to see it corrected or reported.
struct Check {
    what: &'static str,
    /// The watch whose relist brings the change.
    watch: &'static str,
    listed: Option<Instant>,
    done: Option<Instant>,
}

async fn hpa_min(admin: &kube::Client) -> Option<i32> {
    Api::<HorizontalPodAutoscaler>::namespaced(admin.clone(), "istio-system")
        .get("istiod")
        .await
        .ok()?
        .spec?
        .min_replicas
}

async fn cpu_of(admin: &kube::Client, ns: &str, name: &str) -> Option<String> {
    let d = Api::<Deployment>::namespaced(admin.clone(), ns)
        .get(name)
        .await
        .ok()?;
    d.spec?.template.metadata?.annotations?.get(CPU).cloned()
}

/// The policy's condition `type_`: its status and reason, read from the API server.
async fn condition(admin: &kube::Client, type_: &str) -> Option<(String, String)> {
    let p = Api::<MeshPolicy>::all(admin.clone())
        .get("relist")
        .await
        .ok()?;
    p.status?
        .conditions
        .into_iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status, c.reason))
}

/// The MutualTLS condition's status and reason.
async fn mtls_condition(admin: &kube::Client) -> Option<(String, String)> {
    condition(admin, "MutualTLS").await
}

/// The status of the policy's condition `type_`.
async fn condition_status(admin: &kube::Client, type_: &str) -> Option<String> {
    Some(condition(admin, type_).await?.0)
}

/// Whether check `i` is corrected or reported now.
async fn holds(admin: &kube::Client, i: usize, pdb: &str) -> bool {
    match i {
        0 => cpu_of(admin, "shop", "web").await.as_deref() == Some("100m"),
        1 => hpa_min(admin).await == Some(2),
        2 => Api::<PodDisruptionBudget>::namespaced(admin.clone(), "istio-system")
            .get_opt(pdb)
            .await
            .ok()
            .flatten()
            .is_some(),
        3 => Api::<PeerAuthentication>::namespaced(admin.clone(), "secure")
            .get_opt("meshwarden-mtls")
            .await
            .ok()
            .flatten()
            .is_some(),
        4 => cpu_of(admin, "extra", "late").await.as_deref() == Some("100m"),
        _ => mtls_condition(admin)
            .await
            .is_some_and(|(_, r)| r == "ClientsCutOff"),
    }
}

/// A plane of its own set up as [`setup`] does, and the operator reaching it through a proxy.
async fn behind_proxy(
    tag: &str,
) -> (
    testplane::Plane,
    kube::Client,
    testplane::proxy::Proxy,
    Replica,
) {
    let (dir, plane, admin) = super::own_plane(tag).await;
    setup(&admin).await;
    let proxy = testplane::proxy::Proxy::start(&plane.operator_kubeconfig)
        .await
        .unwrap();
    let kubeconfig = dir.join("operator-via-proxy.kubeconfig");
    proxy.kubeconfig(&kubeconfig).unwrap();
    let operator = Replica::start(&kubeconfig, "operator", &dir, &[]);
    (plane, admin, proxy, operator)
}

/// The proxy's hold rules: the operator's reads of everything but its policies, and its
/// writes of a policy's status.
const READS: &str = "reads";
const STATUS: &str = "status writes";

#[tokio::test]
async fn changes_made_while_the_watches_are_down_are_acted_on_within_2s_of_their_relist() {
    let (_plane, admin, proxy, operator) = behind_proxy("relist").await;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), "shop");
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), "istio-system");
    let pas: Api<PeerAuthentication> = Api::namespaced(admin.clone(), "secure");
    let pdb = eventually(
        60,
        "converged: web's sidecar, istiod's HPA and PDB, STRICT secure",
        || async {
            let pdb = pdbs.list(&Default::default()).await.ok()?.items.pop()?;
            (cpu_annotation(&deployments).await? == "100m"
                && hpa_min(&admin).await? == 2
                && pas
                    .get_opt("meshwarden-mtls")
                    .await
                    .ok()??
                    .metadata
                    .name
                    .is_some()
                && mtls_condition(&admin).await?.0 == "True")
                .then(|| pdb.metadata.name.unwrap_or_default())
        },
    )
    .await;
    eventually(20, "ready", || http_get(operator.port, "/readyz")).await;

    let mut checks = [
        ("web's sidecar CPU annotation removed", "Deployments"),
        (
            "istiod's HPA minimum lowered to 1",
            "HorizontalPodAutoscalers",
        ),
        ("istiod's PDB deleted", "PodDisruptionBudgets"),
        (
            "secure's STRICT PeerAuthentication deleted",
            "PeerAuthentications",
        ),
        ("namespace extra labelled for injection", "Namespaces"),
        ("a pod without a sidecar created in stray", "MtlsPods"),
    ]
    .map(|(what, watch)| Check {
        what,
        watch,
        listed: None,
        done: None,
    });
    let all_down = |s: &[(String, bool)]| {
        checks
            .iter()
            .map(|c| c.watch)
            .chain(["MeshPolicies"])
            .all(|w| s.iter().any(|(n, up)| n == w && !up))
    };

    // 1. Every watch down: the proxy closes the operator's connections and refuses new ones.
    proxy.cut();
    eventually(20, "every watch of the operator failing", || async {
        all_down(&synced(operator.port).await?).then_some(())
    })
    .await;

    // 2. The changes, straight to the API server.
    super::remove_cpu(&deployments).await;
    Api::<HorizontalPodAutoscaler>::namespaced(admin.clone(), "istio-system")
        .patch(
            "istiod",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"minReplicas": 1}})),
        )
        .await
        .unwrap();
    pdbs.delete(&pdb, &Default::default()).await.unwrap();
    pas.delete("meshwarden-mtls", &Default::default())
        .await
        .unwrap();
    Api::<Namespace>::all(admin.clone())
        .patch(
            "extra",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"istio-injection": "enabled"}}})),
        )
        .await
        .unwrap();
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "tool", "namespace": "stray"},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
    }))
    .unwrap();
    Api::<Pod>::namespaced(admin.clone(), "stray")
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();

    // 3. Connections again, but every read except the policies' waits, and so does the first
    //    status write: the MeshPolicies watch lists again, the policy is reconciled from the
    //    stale caches, and its status write hangs.
    proxy.hold(
        READS,
        Box::new(|method, path| method == "GET" && !path.contains("/meshpolicies")),
    );
    proxy.hold(
        STATUS,
        Box::new(|method, path| {
            method != "GET" && path.contains("/meshpolicies/") && path.contains("/status")
        }),
    );
    proxy.restore();
    eventually(
        30,
        "a status write held, from a reconcile while the caches are stale",
        || async { (proxy.held(STATUS) > 0).then_some(()) },
    )
    .await;
    let s = synced(operator.port).await.unwrap_or_default();
    assert!(
        checks
            .iter()
            .all(|c| s.iter().any(|(n, up)| n == c.watch && !up)),
        "a watch listed again while its reads were held: {s:?}"
    );

    // 4. The reads go through: every watch lists again, while that status write still hangs.
    proxy.stop_holding(STATUS);
    proxy.release(READS);
    let restored = Instant::now();
    while checks.iter().any(|c| c.done.is_none()) && restored.elapsed() < Duration::from_secs(10) {
        let s = synced(operator.port).await.unwrap_or_default();
        let now = Instant::now();
        for c in checks.iter_mut().filter(|c| c.listed.is_none()) {
            if s.iter().any(|(n, up)| n == c.watch && *up) {
                c.listed = Some(now);
            }
        }
        for (i, c) in checks.iter_mut().enumerate() {
            if c.done.is_none() && holds(&admin, i, &pdb).await {
                c.done = Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let still_held = proxy.held(STATUS);
    proxy.release(STATUS);
    let mut late = Vec::new();
    for c in &checks {
        let at = |t: Option<Instant>| {
            t.map_or("never".to_string(), |t| {
                format!("{:.2} s", (t - restored).as_secs_f64())
            })
        };
        eprintln!(
            "{}: {} listed again at {}, acted on at {} (after the reads were let through)",
            c.what,
            c.watch,
            at(c.listed),
            at(c.done)
        );
        let in_time = match (c.listed, c.done) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(l), Some(d)) => d.saturating_duration_since(l) <= Duration::from_secs(2),
        };
        if !in_time {
            late.push(c.what);
        }
    }
    eprintln!("status writes still held when the checks ended: {still_held}");
    assert!(
        late.is_empty(),
        "not acted on within 2 s of the relist: {late:?}\n{}",
        operator.log_text()
    );
    eventually(10, "ready again", || http_get(operator.port, "/readyz")).await;
}

/// The status of every section's condition.
async fn statuses(admin: &kube::Client) -> Vec<Option<String>> {
    let mut all = Vec::new();
    for t in ["SidecarResources", "ControlPlaneHA", "MutualTLS"] {
        all.push(condition_status(admin, t).await);
    }
    all
}

/// Waits until every reconcile so far has ended (their count holds still for a second);
/// returns the count.
async fn idle(operator: &Replica) -> f64 {
    eventually(30, "no reconcile running", || async {
        let before = operator.metric("meshwarden_reconciles_total").await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = operator.metric("meshwarden_reconciles_total").await?;
        (before == after).then_some(after)
    })
    .await
}

/// The race behind the doubled `again: Compliant` Event after an outage, made to happen: while
/// the policy watch is down, one reconcile writes `Unknown` (the caches are stale) and the
/// next the recovery, each publishing its transitions; then the policy watch lists again, and
/// its LIST was answered between the two writes, so the store holds the `Unknown` status,
/// older than the recovery. The relist asks for an evaluation at once: it must not write the
/// recovery again, nor publish its Events a second time. The proxy orders every step (it holds
/// the policy watch's answer, then its next watch); each step waits for a condition.
#[tokio::test]
async fn a_relist_older_than_the_last_status_write_publishes_nothing_twice() {
    let (_plane, admin, proxy, operator) = behind_proxy("relist-events").await;
    eventually(60, "converged: MutualTLS True", || async {
        (condition_status(&admin, "MutualTLS").await? == "True").then_some(())
    })
    .await;
    eventually(20, "ready", || http_get(operator.port, "/readyz")).await;
    // No reconcile in flight when the connections are cut (its status write could be
    // applied with the operator never told).
    idle(&operator).await;
    let settled = statuses(&admin).await;
    let since = jiff::Timestamp::now();

    // Every read held once the connections are back: the LimitRanges watch's (released first),
    // the policy watch's, and every other.
    const LIMIT_RANGES: &str = "LimitRanges reads";
    const POLICIES: &str = "policy reads";
    const POLICY_WATCH: &str = "policy watch";
    proxy.hold(
        LIMIT_RANGES,
        Box::new(|m, p| m == "GET" && p.contains("/limitranges")),
    );
    proxy.hold(
        POLICIES,
        Box::new(|m, p| m == "GET" && p.contains("/meshpolicies")),
    );
    proxy.hold(READS, Box::new(|m, _| m == "GET"));
    proxy.cut();
    eventually(20, "every watch of the operator failing", || async {
        let s = synced(operator.port).await?;
        (s.iter().all(|(_, up)| !up) && !s.is_empty()).then_some(())
    })
    .await;
    proxy.restore();

    // 1. One watch lists again: its relist has the policy evaluated while the others are
    //    stale, and the status written says Unknown (the store still holds the policy from
    //    before the outage).
    proxy.release(LIMIT_RANGES);
    eventually(30, "Unknown written while the caches are stale", || async {
        (condition_status(&admin, "SidecarResources").await? == "Unknown").then_some(())
    })
    .await;
    // 2. The policy watch's LIST is answered now (the Unknown status) and its answer held.
    proxy.hold_answers(POLICIES);
    eventually(30, "the policy LIST answered and held", || async {
        (proxy.held_answers(POLICIES) > 0).then_some(())
    })
    .await;
    // 3. Every other watch lists again: the recovery is written and published.
    proxy.release(READS);
    eventually(30, "the recovery written", || async {
        (statuses(&admin).await == settled).then_some(())
    })
    .await;
    // 4. The held LIST reaches the store (older than the recovery), and the watch after it is
    //    held: the evaluation the relist asks for sees only that older object.
    let reconciles = idle(&operator).await;
    proxy.stop_holding(POLICIES);
    proxy.hold(
        POLICY_WATCH,
        Box::new(|m, p| m == "GET" && p.contains("/meshpolicies")),
    );
    proxy.release(POLICIES);
    eventually(30, "the policy watch listed again", || async {
        let s = synced(operator.port).await?;
        s.iter()
            .any(|(n, up)| n == "MeshPolicies" && *up)
            .then_some(())
    })
    .await;
    eventually(30, "the relist's evaluation done", || async {
        let now = operator.metric("meshwarden_reconciles_total").await?;
        (now > reconciles).then_some(())
    })
    .await;
    proxy.release(POLICY_WATCH);
    eventually(20, "ready again", || http_get(operator.port, "/readyz")).await;
    // Events are written after the status: give the last ones time to land.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let doubled = super::cluster::doubled_events(&admin, since).await;
    assert!(
        doubled.is_empty(),
        "Events published twice: {doubled:#?}\n{}",
        operator.log_text()
    );
}
