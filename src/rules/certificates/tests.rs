//! The section's decision on certificates made here with rcgen (no server).
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher;

use super::cache::{self, RootCache};
use super::facts::{Bundle, parse_bundle};
use super::plan::{Standing, plan, report};
use crate::status::conditions::Status;
use crate::status::reasons;

const DAY: i64 = 86_400;
const NOW: i64 = 1_800_000_000;

/// A self-signed CA certificate named `cn`, valid until `NOW + seconds`, in PEM.
fn root(cn: &str, seconds: i64) -> String {
    testplane::certs::root_certificate(cn, Some("cluster.local"), NOW - 365 * DAY, NOW + seconds)
        .unwrap()
}

fn sources(entries: &[(&str, &str)]) -> BTreeMap<String, Bundle> {
    entries
        .iter()
        .map(|(ns, pem)| (cache::source(ns), parse_bundle(pem)))
        .collect()
}

fn warn(days: u64) -> Duration {
    Duration::from_secs(days * 86_400)
}

#[test]
fn a_bundle_is_read_as_facts() {
    let pem = root("old root", 10 * DAY);
    let Bundle::Roots(roots) = parse_bundle(&pem) else {
        panic!("not parsed")
    };
    assert_eq!(roots.len(), 1);
    assert_eq!(roots[0].not_after, NOW + 10 * DAY);
    assert_eq!(roots[0].subject, "CN=old root, O=cluster.local");
    assert_eq!(roots[0].fingerprint.len(), 64);
    // Istio's root-cert.pem holds several roots while one is rotated; other blocks are skipped.
    let two = format!(
        "{pem}-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{}",
        root("new root", 100 * DAY)
    );
    let Bundle::Roots(roots) = parse_bundle(&two) else {
        panic!("not parsed")
    };
    assert_eq!(roots.len(), 2);
}

#[test]
fn the_condition_turns_false_within_warn_before_and_counts_namespaces() {
    let (soon, later) = (root("soon", 10 * DAY), root("later", 100 * DAY));
    let s = sources(&[("a", &soon), ("b", &soon), ("c", &later)]);

    let p = plan(&s, NOW, warn(30));
    assert_eq!(p.roots.len(), 2, "distinct by fingerprint");
    assert_eq!(p.roots[0].standing, Standing::Expiring);
    assert_eq!(p.roots[1].standing, Standing::Valid);
    let r = report(&p, "720h");
    assert_eq!(r.condition.status, Status::False);
    assert_eq!(r.condition.reason, reasons::ROOT_CERTIFICATE_EXPIRING);
    assert!(
        r.condition.message.contains("in 10 days"),
        "{}",
        r.condition.message
    );
    assert!(
        r.condition.message.contains("720h"),
        "{}",
        r.condition.message
    );
    assert_eq!(r.violations.len(), 1);
    assert_eq!((r.targets, r.compliant), (2, 1));
    let roots = r.certificates.unwrap().roots;
    assert_eq!(roots.len(), 2);
    assert_eq!(roots[0].subject, "CN=soon, O=cluster.local");
    assert_eq!((roots[0].days_left, roots[0].namespaces), (10, 2));
    assert_eq!((roots[1].days_left, roots[1].namespaces), (100, 1));
    assert_eq!(roots[0].not_after, "2027-01-25T08:00:00Z");

    // 200 days: both within; 5 days: none.
    let both = report(&plan(&s, NOW, warn(200)), "4800h");
    assert_eq!(both.violations.len(), 2);
    assert_eq!(both.compliant, 0);
    let none = report(&plan(&s, NOW, warn(5)), "120h");
    assert_eq!(none.condition.status, Status::True);
    assert_eq!(none.condition.reason, reasons::COMPLIANT);
    assert!(none.violations.is_empty());
}

#[test]
fn an_expired_root_has_its_own_reason() {
    let s = sources(&[
        ("a", &root("gone", -DAY - 60)),
        ("b", &root("ok", 100 * DAY)),
    ]);
    let r = report(&plan(&s, NOW, warn(30)), "720h");
    assert_eq!(r.condition.status, Status::False);
    assert_eq!(r.condition.reason, reasons::ROOT_CERTIFICATE_EXPIRED);
    assert!(
        r.violations[0].message.contains("2 days ago"),
        "{:?}",
        r.violations
    );
    assert_eq!(r.certificates.unwrap().roots[0].days_left, -2);
}

#[test]
fn the_next_look_is_when_the_next_threshold_is_crossed() {
    let s = sources(&[
        ("a", &root("soon", 10 * DAY)),
        ("b", &root("later", 100 * DAY)),
    ]);
    // 30 days: "soon" is within already; it expires in 10 days, "later" enters in 70.
    assert_eq!(
        plan(&s, NOW, warn(30)).recheck_in,
        Some(Duration::from_secs(10 * 86_400 + 1))
    );
    // 95 days: "later" enters the window in 5 days.
    assert_eq!(
        plan(&s, NOW, warn(95)).recheck_in,
        Some(Duration::from_secs(5 * 86_400 + 1))
    );
    let expired = sources(&[("a", &root("gone", -DAY))]);
    assert_eq!(plan(&expired, NOW, warn(30)).recheck_in, None);
}

#[test]
fn unreadable_and_missing_bundles() {
    let bad = ConfigMap {
        data: Some([(cache::KEY.to_string(), "garbage".to_string())].into()),
        ..Default::default()
    };
    let mut s = sources(&[("a", &root("ok", 100 * DAY))]);
    s.insert(cache::source("b"), cache::reduce(&bad));
    s.insert(cache::source("c"), cache::reduce(&ConfigMap::default()));
    let r = report(&plan(&s, NOW, warn(30)), "720h");
    assert_eq!(r.condition.status, Status::False);
    assert_eq!(r.condition.reason, reasons::CERTIFICATE_UNREADABLE);
    let objects: Vec<&str> = r.violations.iter().map(|v| v.object.as_str()).collect();
    assert_eq!(
        objects,
        [
            "ConfigMap/b/istio-ca-root-cert",
            "ConfigMap/c/istio-ca-root-cert"
        ]
    );
    assert!(r.violations[1].message.contains("has no key root-cert.pem"));

    let empty = report(&plan(&BTreeMap::new(), NOW, warn(30)), "720h");
    assert_eq!(empty.condition.status, Status::False);
    assert_eq!(empty.condition.reason, reasons::NO_TARGETS);
}

fn configmap(ns: &str, pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(cache::CONFIGMAP.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        data: Some([(cache::KEY.to_string(), pem.to_string())].into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn the_cache_keeps_one_copy_per_distinct_bundle_and_follows_events() {
    let (a, b) = (root("a", 10 * DAY), root("b", 100 * DAY));
    let (events, received) = futures::channel::mpsc::unbounded();
    let received = std::sync::Mutex::new(Some(received));
    let send = |e| events.unbounded_send(e).unwrap();
    for e in [
        watcher::Event::Init,
        watcher::Event::InitApply(configmap("n1", &a)),
        watcher::Event::InitApply(configmap("n2", &a)),
        watcher::Event::InitApply(configmap("n3", &b)),
        watcher::Event::InitDone,
    ] {
        send(e);
    }
    let health = Arc::new(crate::watch::Health::default());
    let (cache, stream) = RootCache::from_watch(&health, move || {
        match received.lock().ok().and_then(|mut r| r.take()) {
            Some(r) => r.map(Ok).boxed(),
            None => futures::stream::pending().boxed(),
        }
    });
    let mut stream = Box::pin(stream);
    cache.start();
    stream.next().await.unwrap().unwrap(); // the list
    // The watch counts as listed once its consumer asks for the next event.
    let _ = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
    send(watcher::Event::Apply(configmap("n3", &a)));
    send(watcher::Event::Apply(configmap("n3", &a)));
    send(watcher::Event::Delete(configmap("n1", &a)));
    assert_eq!(
        cache.bundles(Duration::from_secs(1)).await.unwrap().len(),
        3
    );
    assert_eq!(cache.distinct_sets(), 2);
    stream.next().await.unwrap().unwrap(); // n3 moved to a
    assert_eq!(
        cache.distinct_sets(),
        1,
        "b is held by no namespace any more"
    );
    // The repeated Apply changed nothing and yields nothing; the delete does.
    stream.next().await.unwrap().unwrap();
    let now = cache.bundles(Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        now.keys().cloned().collect::<Vec<_>>(),
        [
            "ConfigMap/n2/istio-ca-root-cert",
            "ConfigMap/n3/istio-ca-root-cert"
        ]
    );
    let Bundle::Roots(r2) = &now["ConfigMap/n2/istio-ca-root-cert"] else {
        panic!()
    };
    let Bundle::Roots(r3) = &now["ConfigMap/n3/istio-ca-root-cert"] else {
        panic!()
    };
    assert!(Arc::ptr_eq(r2, r3), "namespaces share one copy");
}

#[test]
fn secrets_add_their_certificates_and_are_not_counted_as_namespaces() {
    let root_pem = root("plugged root", 100 * DAY);
    let ca_pem = root("plugged ca", 50 * DAY);
    let secret = k8s_openapi::api::core::v1::Secret {
        data: Some(
            [
                ("root-cert.pem", &root_pem),
                ("ca-cert.pem", &ca_pem),
                ("ca-key.pem", &"not read".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    k8s_openapi::ByteString(v.clone().into_bytes()),
                )
            })
            .collect(),
        ),
        ..Default::default()
    };
    let r = crate::api::SecretRef {
        namespace: "istio-system".into(),
        name: "cacerts".into(),
    };
    let mut s = sources(&[("a", &root_pem)]);
    s.insert(super::secrets::source(&r), super::secrets::reduce(&secret));
    let report = report(&plan(&s, NOW, warn(60)), "1440h");
    let roots = report.certificates.unwrap().roots;
    assert_eq!(roots.len(), 2);
    assert_eq!(roots[0].subject, "CN=plugged ca, O=cluster.local");
    assert_eq!(
        (roots[0].namespaces, roots[0].secrets.clone()),
        (0, vec!["istio-system/cacerts".to_string()])
    );
    assert_eq!((roots[1].namespaces, roots[1].secrets.len()), (1, 1));
    assert_eq!(report.condition.reason, reasons::ROOT_CERTIFICATE_EXPIRING);
    let mut missing = s.clone();
    missing.insert(
        "Secret/istio-system/other".into(),
        Bundle::Unreadable("cannot be read".into()),
    );
    assert_eq!(
        plan(&missing, NOW, warn(60)).recheck_in,
        Some(super::plan::SECRET_RETRY),
        "an unreadable Secret is read again soon"
    );
    assert!(matches!(
        super::secrets::reduce(&Default::default()),
        Bundle::Unreadable(why) if why.contains("neither key root-cert.pem nor ca-cert.pem")
    ));
}
