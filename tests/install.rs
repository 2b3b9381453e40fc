//! The product as users install it: `helm install` into a real API server (RBAC on), the
//! operator binary authenticated as the chart's ServiceAccount, two replicas electing a leader,
//! a missing permission reported instead of a crash loop, then `helm upgrade` and `helm uninstall`.
use std::time::{Duration, Instant};

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::rbac::v1::{ClusterRole, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use meshwarden::api::MeshPolicy;

#[path = "support/operator.rs"]
mod operator;
#[path = "support/tools.rs"]
mod tools;
use operator::{Replica, eventually, http_get};
use tools::helm;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const NS: &str = "meshwarden";
const LEADER_ELECTION: &[&str] = &["--leader-election", "--lease-duration", "6"];

async fn apply_fixture(client: &kube::Client, file: &str) {
    let text = testplane::istio::fixture(file).unwrap();
    testplane::apply_yaml(
        client,
        &text,
        &[
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
        ],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn helm_install_rbac_leader_election_upgrade_uninstall() {
    let plane = testplane::shared();
    let admin = plane.client().await;
    let dir = plane.dir.clone();

    for ns in [NS, "istio-system"] {
        testplane::apply_yaml(
            &admin,
            &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"),
            &[],
        )
        .await
        .unwrap();
    }
    apply_fixture(&admin, "base.yaml").await;
    apply_fixture(&admin, "istiod-default.yaml").await;

    tools::helm_install_chart(&plane.kubeconfig, &admin, NS).await;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    assert!(
        crds.get_opt("meshpolicies.meshwarden.io")
            .await
            .unwrap()
            .is_some(),
        "the chart installs the CRD"
    );

    // A token of the chart's ServiceAccount: real authentication, real RBAC.
    let sa_kc = testplane::service_account_kubeconfig(&plane.dir, NS, "meshwarden")
        .await
        .expect("TokenRequest for the chart's ServiceAccount");

    let a = Replica::start(&sa_kc, "replica-a", &dir, LEADER_ELECTION);
    let b = Replica::start(&sa_kc, "replica-b", &dir, LEADER_ELECTION);

    let policies = operator::create_policy(
        &admin,
        "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: install-test}\nspec:\n  enforcement: Enforce\n  controlPlane: {replicas: {min: 2}, disruptionBudget: {maxUnavailable: 1}}\n  mtls: {mode: PERMISSIVE}\n  gatewayApi: {classes: [{className: istio, replicas: {min: 2}}]}\n",
    )
    .await;
    let ready = |p: &MeshPolicy| {
        p.status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Ready" && c.status == "True")
            .map(|_| ())
    };
    eventually(
        45,
        "policy Ready with the ServiceAccount's permissions",
        || async { ready(&policies.get("install-test").await.ok()?) },
    )
    .await;
    // The gatewayApi section's writes, with the chart's RBAC: its class-defaults ConfigMap in
    // istiod's namespace (the Role) and its finalizer on the policy (the ClusterRole).
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(admin.clone(), "istio-system");
    assert!(
        cms.get_opt("meshwarden-istio-install-test")
            .await
            .unwrap()
            .is_some(),
        "class-defaults ConfigMap written with the ServiceAccount's permissions"
    );
    let p = policies.get("install-test").await.unwrap();
    assert_eq!(
        p.metadata.finalizers.as_deref(),
        Some(&["meshwarden.io/gateway-api".to_string()][..])
    );

    // Exactly one replica leads; the standby has written nothing.
    let a_leads = eventually(20, "exactly one leader", || async {
        let la = a.metric("meshwarden_leader").await?;
        let lb = b.metric("meshwarden_leader").await?;
        match (la as i64, lb as i64) {
            (1, 0) => Some(true),
            (0, 1) => Some(false),
            _ => None,
        }
    })
    .await;
    let (leader, standby) = if a_leads { (a, b) } else { (b, a) };
    assert!(leader.metric("meshwarden_api_writes_total").await.unwrap() >= 2.0);
    assert_eq!(
        standby.metric("meshwarden_api_writes_total").await,
        Some(0.0),
        "the standby writes nothing"
    );
    assert!(
        http_get(standby.port, "/readyz").await.is_some(),
        "a standby is ready"
    );
    assert!(http_get(leader.port, "/livez").await.is_some());
    // Ready once every watch cache has listed (the pod caches can take a while on a busy
    // machine): polled, not read once.
    eventually(
        30,
        "the leader is ready once its watches have synced",
        || async { http_get(leader.port, "/readyz").await },
    )
    .await;
    for r in [&leader, &standby] {
        let log = r.log_text();
        assert!(!mentions_forbidden(&log), "a 403 in:\n{log}");
    }

    // The leader dies; the standby takes over within the lease duration and corrects drift.
    let mut leader = leader;
    leader.child.kill().unwrap();
    let _ = leader.child.wait();
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(admin.clone(), "istio-system");
    lower_hpa_minimum(&hpas).await;
    let took = Instant::now();
    eventually(
        30,
        "the standby takes over and restores the HPA minimum",
        || async {
            let h = hpas.get("istiod").await.ok()?;
            (h.spec?.min_replicas == Some(2)).then_some(())
        },
    )
    .await;
    assert!(
        took.elapsed() < Duration::from_secs(20),
        "takeover took {:?}",
        took.elapsed()
    );
    assert_eq!(standby.metric("meshwarden_leader").await, Some(1.0));

    // A permission removed from the ClusterRole: a clear condition, no crash loop.
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let mut role = roles.get("meshwarden").await.unwrap();
    let before = role.rules.as_ref().unwrap().len();
    role.rules.as_mut().unwrap().retain(|r| {
        !r.resources
            .iter()
            .flatten()
            .any(|x| x == "poddisruptionbudgets")
    });
    assert_eq!(role.rules.as_ref().unwrap().len(), before - 1);
    role.metadata.managed_fields = None;
    roles
        .replace("meshwarden", &PostParams::default(), &role)
        .await
        .unwrap();
    // And the Role that lets it read the mesh config in istio-system.
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), "istio-system");
    bindings
        .delete("meshwarden-mesh-config", &Default::default())
        .await
        .unwrap();
    // Open watches outlive the change (authorization is checked when a request starts): the
    // leader is replaced by a replica that starts with the permission missing.
    let mut old_leader = standby;
    old_leader.child.kill().unwrap();
    let _ = old_leader.child.wait();
    let standby = Replica::start(&sa_kc, "replica-c", &dir, LEADER_ELECTION);
    eventually(30, "replica-c leads", || async {
        (standby.metric("meshwarden_leader").await? == 1.0).then_some(())
    })
    .await;
    policies
        .patch("install-test", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"controlPlane": {"disruptionBudget": {"maxUnavailable": 2}}}})))
        .await
        .unwrap();
    let cond = eventually(30, "a Forbidden condition", || async {
        let p = policies.get("install-test").await.ok()?;
        p.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "ControlPlaneHA" && c.reason == "Forbidden")
    })
    .await;
    assert!(cond.message.contains("ClusterRole"), "{}", cond.message);
    assert_eq!(cond.status, "Unknown");
    // The mTLS section, which needs the root namespace from the mesh config, is Unknown
    // with the watch and the server's answer named; the process keeps running.
    let mtls = eventually(30, "a Forbidden MutualTLS condition", || async {
        let p = policies.get("install-test").await.ok()?;
        p.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "MutualTLS" && c.reason == "Forbidden")
    })
    .await;
    assert_eq!(mtls.status, "Unknown");
    assert!(mtls.message.contains("MeshConfig"), "{}", mtls.message);
    let mut standby = standby;
    assert!(
        standby.child.try_wait().unwrap().is_none(),
        "the operator keeps running"
    );
    // Only the budget is unknown: HPA drift is still corrected.
    assert!(
        cond.message.contains("the other rules are held"),
        "{}",
        cond.message
    );
    lower_hpa_minimum(&hpas).await;
    eventually(
        15,
        "the HPA minimum restored while PodDisruptionBudgets are forbidden",
        || async {
            let h = hpas.get("istiod").await.ok()?;
            (h.spec?.min_replicas == Some(2)).then_some(())
        },
    )
    .await;
    // The refused watch backs off (1, 2, 4, 8 s, … up to 5 min) and says so once, instead of
    // a line every second or so.
    let pdb_watch_lines = || {
        standby
            .log_text()
            .lines()
            // meshwarden's own lines (`RUST_LOG=info` here also lets kube's watcher log each
            // attempt, and the watch's span names the kind on those lines too).
            .filter(|l| l.contains("PodDisruptionBudgets") && l.contains("meshwarden::watch"))
            .count()
    };
    let lines_before = pdb_watch_lines();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let logged = pdb_watch_lines() - lines_before;
    assert!(
        logged <= 1,
        "{logged} log lines about the PodDisruptionBudget watch in 20 s:\n{}",
        standby.log_text()
    );

    // helm upgrade restores the ClusterRole; helm uninstall keeps the CRD and the policies.
    helm(
        &plane.kubeconfig,
        &[
            "upgrade",
            "meshwarden",
            &format!("{ROOT}/charts/meshwarden"),
            "-n",
            NS,
            "--set",
            "logFormat=json",
            // Helm 4 applies server-side: a hand edit of the ClusterRole is a conflict until
            // forced, as docs/operations.md says.
            "--force-conflicts",
        ],
    );
    let restored = roles.get("meshwarden").await.unwrap();
    assert_eq!(
        restored.rules.unwrap().len(),
        before,
        "upgrade puts the rule back"
    );
    eventually(
        50,
        "policy Ready again after the upgrade (Forbidden is retried every 30s)",
        || async { ready(&policies.get("install-test").await.ok()?) },
    )
    .await;

    // SIGTERM: the leader, with its policy reconciled and requeued, exits at once and cleanly.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &standby.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopped = Instant::now();
    let exit = loop {
        if let Some(st) = standby.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM:\n{}",
            standby.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "exit status {exit}");
    eprintln!("stopped {:?} after SIGTERM", stopped.elapsed());

    helm(&plane.kubeconfig, &["uninstall", "meshwarden", "-n", NS]);
    assert!(
        crds.get_opt("meshpolicies.meshwarden.io")
            .await
            .unwrap()
            .is_some(),
        "CRD kept on uninstall"
    );
    assert!(
        policies.get_opt("install-test").await.unwrap().is_some(),
        "policies kept on uninstall"
    );
    assert!(
        roles.get_opt("meshwarden").await.unwrap().is_none(),
        "RBAC removed on uninstall"
    );
}

/// Another writer sets the istiod HPA's minReplicas to 1.
async fn lower_hpa_minimum(hpas: &Api<HorizontalPodAutoscaler>) {
    hpas.patch("istiod", &PatchParams::apply("someone").force(), &Patch::Apply(serde_json::json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "spec": {"minReplicas": 1, "maxReplicas": 5, "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "istiod"}}
    })))
    .await
    .unwrap();
}

/// Whether a log mentions an HTTP 403 or a Forbidden API error. The status code is
/// matched as a whole number so that timestamps and durations containing the digits
/// "403" do not count.
fn mentions_forbidden(log: &str) -> bool {
    log.to_lowercase().contains("forbidden")
        || log
            .split(|c: char| !c.is_ascii_digit())
            .any(|number| number == "403")
}

#[test]
fn forbidden_detection_ignores_digits_inside_timestamps() {
    assert!(!mentions_forbidden(
        "2026-11-23T18:59:17.304039Z reconciled took_ms=14034"
    ));
    assert!(!mentions_forbidden("at 18:59:17.304039Z"));
    assert!(mentions_forbidden(
        "ErrorResponse { reason: \"Forbidden\", code: 403 }"
    ));
    assert!(mentions_forbidden("status 403"));
    assert!(mentions_forbidden("pods is forbidden: User cannot list"));
}
