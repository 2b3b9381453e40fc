//! The report-only sections against what a real istiod made, on the full cluster: the CA
//! mode of the istiod Helm installed (its self-signed root, which it stored in
//! `istio-ca-secret` itself, read from that Secret's metadata), and the advice on
//! `meshConfig.defaultTrafficPolicy`, which this istiod (1.31) applies.

use super::*;

const LABEL: &str = "meshwarden-test-report";

#[tokio::test]
async fn the_report_sections_read_what_a_real_istiod_made() {
    let env = common::cluster_env("report").await;
    let id = env.id.clone();
    let shop = env.namespace("shop", &[(LABEL, &id)]).await;
    common::apply_as(
        &env.client,
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: cart, namespace: {shop}}}\nspec: {{ports: [{{port: 80}}], selector: {{app: cart}}}}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-nothing, namespace: {shop}}}\nspec: {{}}\n"
        ),
        "kubectl",
    )
    .await;
    let _op = env.start_operator().await;
    let selector = format!("namespaceSelector: {{matchLabels: {{{LABEL}: {id}}}}}");
    env.create_policy(
        "p",
        &format!("resilience: {{{selector}}}\nsecurity: {{{selector}}}\n"),
    )
    .await;
    let (security, resilience) = env
        .wait_policy("p", 60, |p| {
            let s = common::condition(p, "Security")?;
            let r = common::condition(p, "Resilience")?;
            (s.observed_generation == p.metadata.generation
                && s.reason == "SelfSignedCA"
                && r.reason == "MinimumsNotMet")
                .then(|| (s.message.clone(), r.message.clone()))
        })
        .await;
    assert!(
        security.contains("CA: self-signed (Secret istio-system/istio-ca-secret)"),
        "{security}"
    );
    assert!(security.contains("default deny in 1 of 1"), "{security}");
    // The advice names meshConfig.defaultTrafficPolicy: as applied when every istiod of the
    // cluster is 1.31 or later, as available from 1.31 on when one is not (other tests of the
    // shared cluster run istiods of other versions and revisions; the unit tests check which
    // applies when).
    assert!(
        resilience
            .contains("istiod applies meshConfig.defaultTrafficPolicy under every DestinationRule")
            || resilience.contains(
                "from Istio 1.31 on, meshConfig.defaultTrafficPolicy sets them for every host"
            ),
        "{resilience}"
    );
}
