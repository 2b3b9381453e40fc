//! The certificates section as users install it: `helm install` of the chart into a real API
//! server (RBAC on), the operator binary authenticated as the chart's ServiceAccount. Proves
//! that ServiceAccount can read no Secret (by default) and no ConfigMap but the
//! `istio-ca-root-cert` ones, while the section reports the roots and their time left.
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams, PostParams};

#[path = "support/operator.rs"]
mod operator;
#[path = "support/tools.rs"]
mod tools;
use operator::{Replica, eventually, http_get};

const NS: &str = "meshwarden";
const DAY: i64 = 86_400;

async fn apply(client: &kube::Client, yaml: &str) {
    testplane::apply_yaml(client, yaml, &[]).await.unwrap();
}

/// Whether the client's user may `verb` `resource` (in `namespace`, or all; named, or any),
/// as the API server's authorizer answers a SelfSubjectAccessReview.
async fn allowed(
    client: &kube::Client,
    verb: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                resource: Some(resource.into()),
                namespace: namespace.map(Into::into),
                name: name.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .is_some_and(|s| s.allowed)
}

fn forbidden<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> bool {
    matches!(r, Err(kube::Error::Api(s)) if s.code == 403)
}

#[tokio::test]
async fn the_charts_service_account_reads_roots_without_any_secret_access() {
    let plane = testplane::shared();
    let admin = plane.client().await;
    let dir = plane.dir.clone();
    for ns in [NS, "istio-system", "certs-a", "certs-b"] {
        apply(
            &admin,
            &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"),
        )
        .await;
    }
    // Roots as istiod writes them, expiring in 10 and 100 days; a plugged-in CA Secret and
    // another ConfigMap that must stay out of reach.
    let pem = |cn: &str, days: i64| {
        testplane::certs::root_certificate(
            cn,
            None,
            testplane::certs::unix_now() - DAY,
            testplane::certs::unix_now() + days * DAY + 3600,
        )
        .unwrap()
    };
    for (ns, cn, days) in [("certs-a", "old root", 10), ("certs-b", "new root", 100)] {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "istio-ca-root-cert", "namespace": ns},
            "data": {"root-cert.pem": pem(cn, days)}
        }))
        .unwrap();
        Api::<ConfigMap>::namespaced(admin.clone(), ns)
            .create(&PostParams::default(), &cm)
            .await
            .unwrap();
    }
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "cacerts", "namespace": "istio-system"},
        "stringData": {"root-cert.pem": pem("plugged root", 200), "ca-cert.pem": pem("plugged ca", 50)}
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), "istio-system")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    tools::helm_install_chart(&plane.kubeconfig, &admin, NS).await;
    let sa_kc = testplane::service_account_kubeconfig(&plane.dir, NS, "meshwarden")
        .await
        .expect("TokenRequest for the chart's ServiceAccount");
    let sa = testplane::client_from(&sa_kc).await.unwrap();

    // As the chart's ServiceAccount: no Secret, anywhere, by any verb.
    for verb in ["get", "list", "watch"] {
        for ns in [Some("istio-system"), None] {
            assert!(
                !allowed(&sa, verb, "secrets", ns, None).await,
                "{verb} secrets in {ns:?}"
            );
        }
    }
    assert!(!allowed(&sa, "get", "secrets", Some("istio-system"), Some("cacerts")).await);
    let secrets: Api<Secret> = Api::namespaced(sa.clone(), "istio-system");
    assert!(forbidden(secrets.get("cacerts").await), "get cacerts");
    assert!(forbidden(secrets.list(&ListParams::default()).await));
    // ConfigMaps: only those named istio-ca-root-cert, listed by name; nothing else.
    let all_cms: Api<ConfigMap> = Api::all(sa.clone());
    assert!(forbidden(all_cms.list(&ListParams::default()).await));
    let roots = all_cms
        .list(&ListParams::default().fields("metadata.name=istio-ca-root-cert"))
        .await
        .expect("list the istio-ca-root-cert ConfigMaps by name");
    assert_eq!(roots.items.len(), 2);
    assert!(forbidden(
        Api::<ConfigMap>::namespaced(sa.clone(), "certs-a")
            .get("istio-ca-root-cert")
            .await
    ));

    // The section works with exactly those permissions.
    let op = Replica::start(&sa_kc, "replica-a", &dir, &[]);
    let policies = operator::create_policy(
        &admin,
        "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: certs}\nspec:\n  certificates: {warnBefore: 720h, secrets: [{name: cacerts}]}\n",
    )
    .await;
    let p = eventually(45, "the Certificates condition", || async {
        let p = policies.get("certs").await.ok()?;
        let c = p
            .status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == "Certificates")?;
        (c.reason == "RootCertificateExpiring").then_some(p)
    })
    .await;
    let roots: Vec<(String, i64, i32)> = p
        .status
        .unwrap()
        .certificates
        .unwrap()
        .roots
        .into_iter()
        .map(|r| (r.subject, r.days_left, r.namespaces))
        .collect();
    assert_eq!(
        roots,
        [
            ("CN=old root".to_string(), 10, 1),
            ("CN=new root".to_string(), 100, 1)
        ]
    );
    let metrics = http_get(op.port, "/metrics").await.unwrap();
    let old = metrics
        .lines()
        .find(|l| {
            l.starts_with("meshwarden_root_certificate_expiry_seconds{")
                && l.contains("subject=\"CN=old root\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .expect("the expiry metric of the old root");
    assert!((10 * DAY..=10 * DAY + 3600).contains(&old), "{old}");
    // The named Secret cannot be read by default: reported, naming the chart value.
    let status = policies.get("certs").await.unwrap().status.unwrap();
    let refused = status
        .violations
        .iter()
        .find(|v| v.object == "Secret/istio-system/cacerts")
        .expect("the unreadable Secret is a violation");
    assert!(
        refused.message.contains("certificates.readSecrets"),
        "{}",
        refused.message
    );

    // The user grants that one Secret through the chart: get on cacerts, nothing more.
    tools::helm(
        &plane.kubeconfig,
        &[
            "upgrade",
            "meshwarden",
            &format!("{}/charts/meshwarden", env!("CARGO_MANIFEST_DIR")),
            "-n",
            NS,
            "--reuse-values",
            "--set",
            "certificates.readSecrets={cacerts}",
        ],
    );
    assert!(allowed(&sa, "get", "secrets", Some("istio-system"), Some("cacerts")).await);
    assert!(
        !allowed(
            &sa,
            "get",
            "secrets",
            Some("istio-system"),
            Some("istio-ca-secret")
        )
        .await
    );
    assert!(!allowed(&sa, "list", "secrets", Some("istio-system"), None).await);
    assert!(!allowed(&sa, "get", "secrets", Some("certs-a"), Some("cacerts")).await);
    // Read again within 30 s, with no event: the plugged-in CA's certificates join the roots.
    let roots = eventually(45, "the Secret's certificates in status", || async {
        let s = policies.get("certs").await.ok()?.status?;
        let roots: Vec<(String, i64, i32, Vec<String>)> = s
            .certificates?
            .roots
            .into_iter()
            .map(|r| (r.subject, r.days_left, r.namespaces, r.secrets))
            .collect();
        (roots.len() == 4).then_some(roots)
    })
    .await;
    let secret = vec!["istio-system/cacerts".to_string()];
    assert_eq!(
        roots,
        [
            ("CN=old root".to_string(), 10, 1, vec![]),
            ("CN=plugged ca".to_string(), 50, 0, secret.clone()),
            ("CN=new root".to_string(), 100, 1, vec![]),
            ("CN=plugged root".to_string(), 200, 0, secret),
        ]
    );
    let log = op.log_text();
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "no refused request:\n{log}"
    );
}
