//! The certificates section on a real API server: root certificates made here with rcgen, put
//! into `istio-ca-root-cert` ConfigMaps as istiod would; the condition flips at `warnBefore`
//! and at expiry (as time passes, with no event), the metric shows the time left, a converged
//! policy costs no write. One test of steps: the section reads every namespace, so two such
//! tests at once would see each other's roots.
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams, PostParams};
use meshwarden::api::MeshPolicy;

use crate::common::{self, Env, condition};

const DAY: i64 = 86_400;

use testplane::certs::unix_now as now;

/// A self-signed root named `cn` whose `notAfter` is `seconds` from now, in PEM.
fn root(cn: &str, seconds: i64) -> String {
    testplane::certs::root_certificate(cn, None, now() - DAY, now() + seconds).unwrap()
}

/// A namespace `<id>-<suffix>` with the `istio-ca-root-cert` ConfigMap istiod would write.
async fn namespace_with_roots(env: &Env, suffix: &str, pem: &str) -> String {
    let ns = env.namespace(suffix, &[]).await;
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio-ca-root-cert", "namespace": ns, "labels": {"istio.io/config": "true"}},
        "data": {"root-cert.pem": pem}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(env.client.clone(), &ns)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    ns
}

async fn set_warn_before(env: &Env, warn: &str) {
    Api::<MeshPolicy>::all(env.client.clone())
        .patch(
            &env.policy_name("p"),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"certificates": {"warnBefore": warn}}})),
        )
        .await
        .unwrap();
}

/// Waits for the `Certificates` condition of the current generation with `reason`.
async fn wait_reason(env: &Env, reason: &str, secs: u64) -> MeshPolicy {
    env.wait_policy("p", secs, |p| {
        let c = condition(p, "Certificates")?;
        (c.reason == reason && c.observed_generation == p.metadata.generation).then(|| p.clone())
    })
    .await
}

/// Roots of this test in status: (subject, days left, namespaces).
fn roots(p: &MeshPolicy, id: &str) -> Vec<(String, i64, i32)> {
    p.status
        .as_ref()
        .and_then(|s| s.certificates.as_ref())
        .map(|c| {
            c.roots
                .iter()
                .filter(|r| r.subject.contains(id))
                .map(|r| (r.subject.clone(), r.days_left, r.namespaces))
                .collect()
        })
        .unwrap_or_default()
}

/// Invariants after every step: the status agrees with itself (status True exactly when no
/// violation of this section), and the operator wrote nothing but the policy's status and
/// Events (the section never writes to the mesh).
fn check_invariants(p: &MeshPolicy, namespaces: &[String]) {
    let c = condition(p, "Certificates").unwrap();
    let s = p.status.as_ref().unwrap();
    let violations = s
        .violations
        .iter()
        .filter(|v| v.rule == "Certificates")
        .count();
    assert_eq!(
        c.status == "True",
        violations == 0,
        "{c:?} {:?}",
        s.violations
    );
    for ns in namespaces {
        assert!(
            common::operator_writes(Some(ns), &[]).is_empty(),
            "the section wrote into {ns}"
        );
    }
}

fn expiry_metric(op: &common::Operator, subject: &str) -> Option<i64> {
    op.state
        .ctx
        .metrics
        .encode()
        .lines()
        .find(|l| {
            l.starts_with("meshwarden_root_certificate_expiry_seconds{")
                && l.contains(&format!("subject=\"{subject}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn root_expiry_is_reported_against_warn_before_and_as_time_passes() {
    let env = common::env("certs").await;
    let id = env.id.clone();
    // 10 and 100 days (and an hour, so that whole days do not round down during the test).
    let (old, new) = (
        root(&format!("{id} old"), 10 * DAY + 3600),
        root(&format!("{id} new"), 100 * DAY + 3600),
    );
    let mut namespaces = vec![
        namespace_with_roots(&env, "a", &old).await,
        namespace_with_roots(&env, "b", &new).await,
        // A bundle with both, as while a root is rotated.
        namespace_with_roots(&env, "c", &format!("{old}{new}")).await,
    ];
    let op = env.start_operator().await;
    env.create_policy("p", "certificates: {warnBefore: 720h}")
        .await;

    // Step 1: 30 days: the 10-day root is within, the 100-day one is not.
    let p = wait_reason(&env, "RootCertificateExpiring", 30).await;
    let c = condition(&p, "Certificates").unwrap();
    assert_eq!(c.status, "False");
    assert!(c.message.contains(&format!("CN={id} old")), "{}", c.message);
    assert!(c.message.contains("in 10 days"), "{}", c.message);
    assert_eq!(
        roots(&p, &id),
        [
            (format!("CN={id} old"), 10, 2),
            (format!("CN={id} new"), 100, 2)
        ]
    );
    check_invariants(&p, &namespaces);
    // The metric: seconds left per root, as of the scrape.
    let left = expiry_metric(&op, &format!("CN={id} old")).expect("metric of the old root");
    assert!(
        (10 * DAY + 3600 - 300..=10 * DAY + 3600).contains(&left),
        "{left}"
    );
    let left = expiry_metric(&op, &format!("CN={id} new")).expect("metric of the new root");
    assert!(
        (100 * DAY + 3600 - 300..=100 * DAY + 3600).contains(&left),
        "{left}"
    );

    // Step 2: converged, nothing changes: reconciles (a label on the policy, an unchanged
    // ConfigMap touched) write nothing.
    let p = env.wait_converged("p", 30).await;
    let name = env.policy_name("p");
    // Status patches and Events name the policy.
    let writes_to_policy = || common::operator_writes(None, &[&name]).len();
    let before = writes_to_policy();
    Api::<MeshPolicy>::all(env.client.clone())
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"touched": "1"}}})),
        )
        .await
        .unwrap();
    Api::<ConfigMap>::namespaced(env.client.clone(), &namespaces[0])
        .patch(
            "istio-ca-root-cert",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"touched": "1"}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        writes_to_policy(),
        before,
        "a converged policy costs no write"
    );
    check_invariants(&p, &namespaces);

    // Step 3: 200 days: both roots are within.
    set_warn_before(&env, "4800h").await;
    let p = wait_reason(&env, "RootCertificateExpiring", 30).await;
    let s = p.status.as_ref().unwrap();
    let ours: Vec<_> = s
        .violations
        .iter()
        .filter(|v| v.object.contains(&id))
        .collect();
    assert_eq!(ours.len(), 2, "{:?}", s.violations);
    check_invariants(&p, &namespaces);

    // Step 4: 5 days: neither is.
    set_warn_before(&env, "120h").await;
    let p = wait_reason(&env, "Compliant", 30).await;
    assert_eq!(condition(&p, "Certificates").unwrap().status, "True");
    check_invariants(&p, &namespaces);

    // Step 5: a root that enters the 5-day window 20 s from now: True first, then False
    // without any event (the section asked to be evaluated again when the root crosses).
    namespaces.push(
        namespace_with_roots(&env, "d", &root(&format!("{id} crossing"), 5 * DAY + 20)).await,
    );
    let p = env
        .wait_policy("p", 10, |p| {
            roots(p, &id)
                .iter()
                .any(|r| r.0.ends_with("crossing"))
                .then(|| p.clone())
        })
        .await;
    assert_eq!(condition(&p, "Certificates").unwrap().reason, "Compliant");
    check_invariants(&p, &namespaces);
    let p = wait_reason(&env, "RootCertificateExpiring", 40).await;
    assert!(
        condition(&p, "Certificates")
            .unwrap()
            .message
            .contains("crossing")
    );
    check_invariants(&p, &namespaces);

    // Step 6: a root that expires 15 s from now: Expired, with its own reason, as time passes.
    namespaces.push(namespace_with_roots(&env, "e", &root(&format!("{id} expiring"), 15)).await);
    let p = wait_reason(&env, "RootCertificateExpired", 40).await;
    let c = condition(&p, "Certificates").unwrap();
    assert!(c.message.contains("expiring"), "{}", c.message);
    assert!(expiry_metric(&op, &format!("CN={id} expiring")).unwrap() <= 0);
    check_invariants(&p, &namespaces);

    // Step 7: the expired and crossing roots go (their ConfigMaps deleted): back to True, and
    // their series leave the metric.
    for ns in &namespaces[3..] {
        Api::<ConfigMap>::namespaced(env.client.clone(), ns)
            .delete("istio-ca-root-cert", &Default::default())
            .await
            .unwrap();
    }
    let p = wait_reason(&env, "Compliant", 20).await;
    assert_eq!(roots(&p, &id).len(), 2);
    assert_eq!(expiry_metric(&op, &format!("CN={id} expiring")), None);
    check_invariants(&p, &namespaces);
    op.stop().await;
}
