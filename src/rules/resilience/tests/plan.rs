//! The section's plan and report: findings per namespace, counts, violations.
use super::*;
use crate::api::{Requirement, ResilienceSpec};
use crate::rules::resilience::plan::{Mesh, plan, report};
use crate::status::conditions::Status;
use crate::status::reasons;

fn mesh() -> Mesh {
    Mesh {
        root: ROOT.into(),
        ..Mesh::default()
    }
}

fn services(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(ns, n)| (ns.to_string(), n.to_string()))
        .collect()
}

fn all(_: &str) -> bool {
    true
}

#[test]
fn a_host_specific_rule_loses_the_root_outlier_detection_and_is_named() {
    let rules = [
        rule(
            ROOT,
            "default",
            "*.local",
            1,
            Blocks::OUTLIER_DETECTION.union(Blocks::CONNECTION_POOL),
        ),
        rule("bookinfo", "reviews", "reviews", 2, Blocks::TLS),
    ];
    let svcs = services(&[("bookinfo", "reviews"), ("bookinfo", "ratings")]);
    let spec = ResilienceSpec::default();
    let p = plan(&spec, &mesh(), &rules, &svcs, &all);
    let r = report(&spec, &mesh(), p.clone());
    assert_eq!(r.condition.status, Status::False);
    assert_eq!(r.condition.reason, reasons::MINIMUMS_NOT_MET);
    assert_eq!((r.targets, r.compliant), (2, 1));
    assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
    let v = &r.violations[0];
    assert_eq!(v.object, "Namespace/bookinfo");
    assert!(
        v.message.contains("reviews: DestinationRule bookinfo/reviews (the service's namespace) lacks outlierDetection; it shadows connectionPool, outlierDetection of istio-system/default"),
        "{}",
        v.message
    );
    // Said once although the Service's own namespace sees the same rule.
    assert!(
        v.message.starts_with("1 finding(s) for 1 Service(s)"),
        "{}",
        v.message
    );
    // Without the host-specific rule, the root's applies: compliant.
    let p = plan(&spec, &mesh(), &rules[..1], &svcs, &all);
    let r = report(&spec, &mesh(), p.clone());
    assert_eq!(r.condition.status, Status::True, "{:?}", r.violations);
}

#[test]
fn the_mesh_default_counts_only_where_istiod_applies_it() {
    let rules = [rule("bookinfo", "reviews", "reviews", 2, Blocks::TLS)];
    let svcs = services(&[("bookinfo", "reviews")]);
    let spec = ResilienceSpec {
        connection_pool_limits: Requirement::Required,
        ..ResilienceSpec::default()
    };
    let with_default = |supported| Mesh {
        default_traffic: Some(Traffic {
            blocks: Blocks::OUTLIER_DETECTION.union(Blocks::CONNECTION_POOL),
            pool_limits: true,
        }),
        default_traffic_supported: supported,
        ..mesh()
    };
    let r = report(
        &spec,
        &with_default(true),
        plan(&spec, &with_default(true), &rules, &svcs, &all),
    );
    assert_eq!(r.condition.status, Status::True, "{:?}", r.violations);
    // An istiod older than 1.31 ignores the field: both minimums are missing, and the
    // advice says to set them per rule.
    let old = with_default(false);
    let r = report(&spec, &old, plan(&spec, &old, &rules, &svcs, &all));
    assert_eq!(r.condition.status, Status::False);
    assert!(
        r.violations[0]
            .message
            .contains("lacks outlierDetection and connectionPool limits"),
        "{}",
        r.violations[0].message
    );
    assert!(
        r.condition.message.contains("from Istio 1.31 on"),
        "{}",
        r.condition.message
    );
    // Where istiod applies it but it is not set, the advice gives the values to set.
    let m = Mesh {
        default_traffic_supported: true,
        ..mesh()
    };
    let r = report(&spec, &m, plan(&spec, &m, &rules, &svcs, &all));
    assert!(
        r.condition
            .message
            .contains("meshConfig: {defaultTrafficPolicy: {outlierDetection:"),
        "{}",
        r.condition.message
    );
}

#[test]
fn a_client_namespace_rule_is_judged_for_its_clients() {
    let rules = [
        rule("shop", "reviews-from-shop", REVIEWS, 3, Blocks::TLS),
        rule(
            "bookinfo",
            "reviews",
            "reviews",
            2,
            Blocks::OUTLIER_DETECTION,
        ),
    ];
    let svcs = services(&[("bookinfo", "reviews"), ("bookinfo", "ratings")]);
    let spec = ResilienceSpec::default();
    let p = plan(&spec, &mesh(), &rules, &svcs, &all);
    let r = report(&spec, &mesh(), p.clone());
    // reviews fails for shop's clients only, and counts once, in its own namespace's
    // total; ratings (no rule at all) fails in bookinfo.
    assert_eq!((r.targets, r.compliant), (2, 0));
    assert_eq!(
        (
            p["shop"].failing,
            p["shop"].failing_own,
            p["bookinfo"].failing_own
        ),
        (1, 0, 2)
    );
    assert_eq!(r.violations.len(), 2, "{:?}", r.violations);
    assert_eq!(r.violations[1].object, "Namespace/shop");
    assert!(
        r.violations[1]
            .message
            .contains("reviews (clients in shop, calling bookinfo/reviews): DestinationRule shop/reviews-from-shop (the client's namespace) lacks outlierDetection"),
        "{}",
        r.violations[1].message
    );
    // shop not covered: its clients are not judged.
    let p = plan(&spec, &mesh(), &rules, &svcs, &|ns| ns != "shop");
    let r = report(&spec, &mesh(), p);
    let objects: Vec<&str> = r.violations.iter().map(|v| v.object.as_str()).collect();
    assert_eq!(objects, ["Namespace/bookinfo"]);
    assert_eq!((r.targets, r.compliant), (2, 1));
}

#[test]
fn violations_are_one_per_namespace_with_the_first_names() {
    let mut list = Vec::new();
    for ns in ["a", "b", "c"] {
        for i in 0..7 {
            list.push((ns.to_string(), format!("svc-{i}")));
        }
    }
    let spec = ResilienceSpec::default();
    let p = plan(&spec, &mesh(), &[], &list, &all);
    // Only the gaps a violation names are kept, with the count of all.
    assert_eq!(
        (p["a"].gaps.len(), p["a"].gap_count),
        (super::super::plan::NAMED, 7)
    );
    let r = report(&spec, &mesh(), p.clone());
    assert_eq!(r.violations.len(), 3);
    assert_eq!((r.targets, r.compliant), (21, 0));
    let m = &r.violations[0].message;
    assert!(m.starts_with("7 finding(s) for 7 Service(s): svc-0: no DestinationRule applies lacks outlierDetection"), "{m}");
    assert!(m.ends_with("; and 2 more"), "{m}");
    assert!(!m.contains("svc-5"), "{m}");
}

#[test]
fn no_service_is_no_target() {
    let spec = ResilienceSpec::default();
    let r = report(&spec, &mesh(), plan(&spec, &mesh(), &[], &[], &all));
    assert_eq!(r.condition.reason, reasons::NO_TARGETS);
}

#[test]
fn mesh_settings_are_read_from_the_mesh_config() {
    let (t, private) = crate::rules::resilience::plan::mesh_settings(
        "defaultTrafficPolicy:\n  outlierDetection: {consecutive5xxErrors: 5}\n  connectionPool: {http: {http2MaxRequests: 100}}\ndefaultDestinationRuleExportTo: [\".\"]\n",
    )
    .unwrap();
    let t = t.unwrap();
    assert!(t.blocks.contains(Blocks::OUTLIER_DETECTION) && t.pool_limits);
    assert!(private);
    assert_eq!(
        crate::rules::resilience::plan::mesh_settings("rootNamespace: istio-system\n").unwrap(),
        (None, false)
    );
    // A connectionPool without a limit is not a limit.
    let t = crate::rules::resilience::cache::traffic(
        &serde_json::json!({"connectionPool": {"tcp": {"connectTimeout": "1s"}}}),
    );
    assert!(t.blocks.contains(Blocks::CONNECTION_POOL) && !t.pool_limits);
}

#[test]
fn routes_and_drains_join_the_namespace_violation_and_the_mesh_settings() {
    use crate::rules::resilience::{drain, plan::add_routes, plan::proxy_settings, routes};
    let spec = ResilienceSpec {
        outlier_detection: Requirement::Off,
        route_timeouts: Requirement::Required,
        ..ResilienceSpec::default()
    };
    let (d, hidden) = proxy_settings(
        "defaultConfig: {terminationDrainDuration: 30s}\ndefaultVirtualServiceExportTo: ['~']\n",
    )
    .unwrap();
    assert!(hidden);
    let m = Mesh {
        default_drain: d,
        default_vs_hidden: hidden,
        ..mesh()
    };
    let vs = |w, e| {
        std::sync::Arc::new(routes::Routes {
            judged: 2,
            without_timeout: w,
            default_export: e,
        })
    };
    let virtual_services = [
        (("shop".to_string(), "reviews".to_string()), vs(1, false)),
        // Hidden by the mesh's defaultVirtualServiceExportTo.
        (("shop".to_string(), "hidden".to_string()), vs(2, true)),
        (("web".to_string(), "fine".to_string()), vs(0, false)),
    ];
    let mut p = plan(&spec, &m, &[], &[], &all);
    add_routes(&mut p, &m, &virtual_services, &all);
    let workload = drain::Workload {
        kind: "Deployment",
        name: "api",
        grace_seconds: None,
        drain: Default::default(),
    };
    let with: std::collections::BTreeSet<(&str, &str)> =
        [("Deployment", "api")].into_iter().collect();
    p.entry("shop".into()).or_default().drains = drain::judged([workload], &with, m.default_drain);
    let r = report(&spec, &m, p.clone());
    assert_eq!(r.condition.reason, reasons::MINIMUMS_NOT_MET);
    assert_eq!(r.violations.len(), 1, "{:?}", r.violations);
    assert_eq!(
        r.violations[0].message,
        "1 HTTP route(s) without a timeout in 1 VirtualService(s): reviews (1 of 2 routes); 1 workload(s) whose proxy drain reaches the grace period: Deployment/api: the proxy drains 30s against a grace period of 30s (the kubelet kills it first)"
    );
    assert!(
        r.condition
            .message
            .contains("1 of 4 mesh HTTP route(s) set no timeout")
    );
    assert!(
        r.condition
            .message
            .contains("1 of 1 workload(s) with a sidecar drain")
    );
    // Off: neither is judged, and nothing else is there to judge.
    let off = ResilienceSpec {
        drain_within_grace_period: Requirement::Off,
        ..spec.clone()
    };
    let r = report(&off, &m, plan(&off, &m, &[], &[], &all));
    assert_eq!(r.condition.reason, reasons::NO_TARGETS);
}
