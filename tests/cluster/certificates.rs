//! The certificates section reads the root certificate istiod really writes.

use super::*;

/// istiod writes its root certificate into the `istio-ca-root-cert` ConfigMap of every
/// namespace it serves; the certificates section reads that real root (issue 14).
#[tokio::test]
async fn the_certificates_section_reads_istiods_own_root() {
    use meshwarden::rules::certificates::facts::{Bundle, parse_bundle};
    let env = common::cluster_env("roots").await;
    let ns = env.namespace("app", &[]).await;
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &ns);
    let pem = common::eventually(30, "istiod writes istio-ca-root-cert", || async {
        cms.get_opt("istio-ca-root-cert")
            .await
            .ok()??
            .data?
            .remove("root-cert.pem")
    })
    .await;
    let Bundle::Roots(istiod_roots) = parse_bundle(&pem) else {
        panic!("istiod's root-cert.pem is not readable:\n{pem}")
    };
    let op = env.start_operator().await;
    env.create_policy("p", "certificates: {}").await;
    let p = env
        .wait_policy("p", 30, |p| {
            let c = common::condition(p, "Certificates")?;
            (c.reason == "Compliant").then(|| p.clone())
        })
        .await;
    let roots = p.status.unwrap().certificates.unwrap().roots;
    assert_eq!(roots.len(), 1, "one root in the mesh: {roots:?}");
    let root = &roots[0];
    assert_eq!(root.fingerprint, istiod_roots[0].fingerprint);
    // Istio's self-signed CA: organisation = the trust domain, valid ten years.
    assert!(root.subject.contains("O=cluster.local"), "{}", root.subject);
    assert!(root.days_left > 3000, "{root:?}");
    assert!(
        root.namespaces >= 2,
        "istio-system and {ns} at least: {root:?}"
    );
    op.stop().await;
}
