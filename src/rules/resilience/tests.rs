//! DestinationRule resolution against istiod's rules, with the cases of Istio's documentation
//! (traffic management best practices, "Cross-namespace configuration"; the DestinationRule
//! reference on `exportTo` and `workloadSelector`) and of istiod's own lookup.
use std::collections::BTreeMap;
use std::sync::Arc;

use super::resolve::{Blocks, Index, Rule, Tier, Traffic, qualify};

const ROOT: &str = "istio-system";

fn traffic(blocks: Blocks) -> Option<Traffic> {
    Some(Traffic {
        blocks,
        pool_limits: blocks.contains(Blocks::CONNECTION_POOL),
    })
}

fn rule(ns: &str, name: &str, host: &str, created: i64, blocks: Blocks) -> Arc<Rule> {
    Arc::new(Rule {
        namespace: ns.into(),
        name: name.into(),
        host: host.into(),
        created,
        policy: traffic(blocks),
        ..Rule::default()
    })
}

fn exported(r: Arc<Rule>, to: &[&str]) -> Arc<Rule> {
    let mut r = (*r).clone();
    r.export_to = to.iter().map(|s| s.to_string()).collect();
    Arc::new(r)
}

fn selecting(r: Arc<Rule>, app: &str) -> Arc<Rule> {
    let mut r = (*r).clone();
    r.selector = Some([("app".to_string(), app.to_string())].into());
    Arc::new(r)
}

const REVIEWS: &str = "reviews.bookinfo.svc.cluster.local";

fn none() -> BTreeMap<String, String> {
    BTreeMap::new()
}

/// The rule names a workload without labels in `client` gets for `reviews`, and the tier.
fn applied(index: &Index, client: &str, host: &str) -> Option<(Tier, Vec<String>)> {
    let a = index.for_workload(client, &none(), host, "bookinfo")?;
    Some((a.tier, a.rule.names()))
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_short_host_is_qualified_with_the_rules_namespace() {
    assert_eq!(qualify("reviews", "bookinfo"), REVIEWS);
    assert_eq!(qualify("reviews.bookinfo", "shop"), "reviews.bookinfo");
    assert_eq!(qualify("*", "shop"), "*");
    assert_eq!(qualify("*.local", "shop"), "*.local");
    assert_eq!(qualify("10.0.0.1", "shop"), "10.0.0.1");
}

#[test]
fn the_clients_namespace_wins_over_the_services_and_the_root() {
    let rules = [
        rule(
            "shop",
            "reviews-from-shop",
            REVIEWS,
            3,
            Blocks::OUTLIER_DETECTION,
        ),
        rule("bookinfo", "reviews", "reviews", 2, Blocks::CONNECTION_POOL),
        rule(ROOT, "default", "*.local", 1, Blocks::TLS),
    ];
    let index = Index::build(&rules, ROOT, false);
    assert_eq!(
        applied(&index, "shop", REVIEWS),
        Some((Tier::ClientNamespace, names(&["shop/reviews-from-shop"])))
    );
    // Any other namespace: the service's namespace exports its rule.
    assert_eq!(
        applied(&index, "web", REVIEWS),
        Some((Tier::ServiceNamespace, names(&["bookinfo/reviews"])))
    );
    // The service's own clients read it as their namespace's rule.
    assert_eq!(
        applied(&index, "bookinfo", REVIEWS),
        Some((Tier::ClientNamespace, names(&["bookinfo/reviews"])))
    );
    // A host with no rule of its own: the root namespace's.
    assert_eq!(
        applied(&index, "web", "ratings.bookinfo.svc.cluster.local"),
        Some((Tier::RootNamespace, names(&["istio-system/default"])))
    );
}

#[test]
fn rules_for_the_same_host_merge_and_the_oldest_traffic_policy_counts() {
    let rules = [
        rule(
            "bookinfo",
            "b-newer",
            "reviews",
            20,
            Blocks::CONNECTION_POOL,
        ),
        rule(
            "bookinfo",
            "a-older",
            REVIEWS,
            10,
            Blocks::OUTLIER_DETECTION,
        ),
    ];
    let index = Index::build(&rules, ROOT, false);
    let a = index
        .for_workload("web", &none(), REVIEWS, "bookinfo")
        .unwrap();
    assert_eq!(
        a.rule.names(),
        names(&["bookinfo/a-older", "bookinfo/b-newer"])
    );
    assert_eq!(a.rule.policy, traffic(Blocks::OUTLIER_DETECTION));

    // The older rule sets no trafficPolicy: the newer one's is taken.
    let older = Arc::new(Rule {
        policy: None,
        ..(*rules[1]).clone()
    });
    let index = Index::build([&rules[0], &older], ROOT, false);
    let a = index
        .for_workload("web", &none(), REVIEWS, "bookinfo")
        .unwrap();
    assert_eq!(a.rule.policy, traffic(Blocks::CONNECTION_POOL));
}

#[test]
fn rules_with_different_export_to_are_kept_apart() {
    let rules = [
        exported(
            rule(
                "bookinfo",
                "public",
                "reviews",
                1,
                Blocks::OUTLIER_DETECTION,
            ),
            &["*"],
        ),
        exported(
            rule("bookinfo", "private", "reviews", 2, Blocks::CONNECTION_POOL),
            &["."],
        ),
    ];
    let index = Index::build(&rules, ROOT, false);
    // Other namespaces see the exported one only.
    assert_eq!(
        applied(&index, "web", REVIEWS),
        Some((Tier::ServiceNamespace, names(&["bookinfo/public"])))
    );
    // Clients in bookinfo get both rules, unmerged; a workload takes the last one without a
    // selector.
    let found = index.lookup("bookinfo", REVIEWS, "bookinfo").unwrap();
    assert_eq!(found.rules.len(), 2);
}

#[test]
fn a_root_wildcard_is_shadowed_by_any_host_specific_rule() {
    let rules = [
        rule(
            ROOT,
            "mesh-default",
            "*.local",
            1,
            Blocks::OUTLIER_DETECTION.union(Blocks::CONNECTION_POOL),
        ),
        rule("bookinfo", "reviews-tls", "reviews", 2, Blocks::TLS),
    ];
    let index = Index::build(&rules, ROOT, false);
    let a = index
        .for_workload("web", &none(), REVIEWS, "bookinfo")
        .unwrap();
    assert_eq!(a.rule.names(), names(&["bookinfo/reviews-tls"]));
    let (root, lost) = a.shadowed(&index, "web", REVIEWS).unwrap();
    assert_eq!(root, names(&["istio-system/mesh-default"]));
    assert_eq!(lost.names(), vec!["connectionPool", "outlierDetection"]);

    // A service without a rule of its own keeps the root's settings: nothing shadowed.
    let ratings = "ratings.bookinfo.svc.cluster.local";
    let a = index
        .for_workload("web", &none(), ratings, "bookinfo")
        .unwrap();
    assert_eq!(a.tier, Tier::RootNamespace);
    assert_eq!(a.shadowed(&index, "web", ratings), None);
}

#[test]
fn the_most_specific_wildcard_matches() {
    let rules = [
        rule(ROOT, "everything", "*", 1, Blocks::TLS),
        rule(ROOT, "local", "*.local", 2, Blocks::OUTLIER_DETECTION),
        rule(
            ROOT,
            "bookinfo",
            "*.bookinfo.svc.cluster.local",
            3,
            Blocks::CONNECTION_POOL,
        ),
    ];
    let index = Index::build(&rules, ROOT, false);
    assert_eq!(
        applied(&index, "web", REVIEWS).map(|a| a.1),
        Some(names(&["istio-system/bookinfo"]))
    );
    assert_eq!(
        applied(&index, "web", "cart.shop.svc.cluster.local").map(|a| a.1),
        Some(names(&["istio-system/local"]))
    );
    assert_eq!(
        applied(&index, "web", "api.example.com").map(|a| a.1),
        Some(names(&["istio-system/everything"]))
    );
}

#[test]
fn export_to_limits_who_gets_a_rule() {
    let rules = [
        exported(
            rule(
                "bookinfo",
                "for-shop",
                "reviews",
                2,
                Blocks::OUTLIER_DETECTION,
            ),
            &["shop"],
        ),
        rule(ROOT, "default", "*.local", 1, Blocks::TLS),
    ];
    let index = Index::build(&rules, ROOT, false);
    assert_eq!(
        applied(&index, "shop", REVIEWS),
        Some((Tier::ServiceNamespace, names(&["bookinfo/for-shop"])))
    );
    // Not exported to web, nor visible in bookinfo itself (its exportTo leaves it out).
    assert_eq!(
        applied(&index, "web", REVIEWS),
        Some((Tier::RootNamespace, names(&["istio-system/default"])))
    );
    assert_eq!(
        applied(&index, "bookinfo", REVIEWS),
        Some((Tier::RootNamespace, names(&["istio-system/default"])))
    );

    // exportTo ".": bookinfo's clients only.
    let rules = [
        exported(
            rule("bookinfo", "own", "reviews", 2, Blocks::OUTLIER_DETECTION),
            &["."],
        ),
        rule(ROOT, "default", "*.local", 1, Blocks::TLS),
    ];
    let index = Index::build(&rules, ROOT, false);
    assert_eq!(
        applied(&index, "bookinfo", REVIEWS).unwrap().0,
        Tier::ClientNamespace
    );
    assert_eq!(
        applied(&index, "web", REVIEWS).unwrap().0,
        Tier::RootNamespace
    );
}

#[test]
fn the_mesh_default_export_to_makes_rules_without_export_to_private() {
    let rules = [rule(
        "bookinfo",
        "reviews",
        "reviews",
        1,
        Blocks::OUTLIER_DETECTION,
    )];
    let index = Index::build(&rules, ROOT, true);
    assert_eq!(applied(&index, "web", REVIEWS), None);
    assert_eq!(
        applied(&index, "bookinfo", REVIEWS).unwrap().0,
        Tier::ClientNamespace
    );
}

#[test]
fn a_private_root_rule_serves_the_root_namespaces_own_clients() {
    let rules = [exported(
        rule(ROOT, "gateways", "*.local", 1, Blocks::TLS),
        &["."],
    )];
    let index = Index::build(&rules, ROOT, false);
    assert_eq!(
        applied(&index, ROOT, REVIEWS),
        Some((Tier::ClientNamespace, names(&["istio-system/gateways"])))
    );
    assert_eq!(applied(&index, "web", REVIEWS), None);
}

#[test]
fn a_workload_selector_rule_applies_to_its_workloads_only_and_stops_the_lookup() {
    let rules = [
        selecting(
            rule("shop", "cart-only", REVIEWS, 5, Blocks::OUTLIER_DETECTION),
            "cart",
        ),
        rule("bookinfo", "reviews", "reviews", 1, Blocks::CONNECTION_POOL),
    ];
    let index = Index::build(&rules, ROOT, false);
    let cart: BTreeMap<String, String> = [("app".to_string(), "cart".to_string())].into();
    let a = index
        .for_workload("shop", &cart, REVIEWS, "bookinfo")
        .unwrap();
    assert_eq!(a.rule.names(), names(&["shop/cart-only"]));
    // Another workload of shop: the client namespace has only a selector rule for the host, so
    // istiod finds no rule for it (the lookup does not go on to bookinfo's).
    assert_eq!(
        index.for_workload("shop", &none(), REVIEWS, "bookinfo"),
        None
    );
    // Never exported.
    assert_eq!(
        applied(&index, "web", REVIEWS),
        Some((Tier::ServiceNamespace, names(&["bookinfo/reviews"])))
    );
}

#[test]
fn the_mesh_default_fills_the_blocks_a_rule_lacks() {
    let mesh = Traffic {
        blocks: Blocks::OUTLIER_DETECTION.union(Blocks::CONNECTION_POOL),
        pool_limits: true,
    };
    let own = Traffic {
        blocks: Blocks::CONNECTION_POOL.union(Blocks::TLS),
        pool_limits: false,
    };
    // The rule's connectionPool is kept whole (without limits); outlierDetection is added.
    let merged = own.with_mesh_default(mesh);
    assert_eq!(
        merged.blocks.names(),
        vec!["connectionPool", "outlierDetection", "tls"]
    );
    assert!(!merged.pool_limits);
    assert!(Traffic::default().with_mesh_default(mesh).pool_limits);
    // loadBalancer and tls are not taken from the mesh default.
    let lb = Traffic {
        blocks: Blocks::LOAD_BALANCER,
        pool_limits: false,
    };
    assert_eq!(Traffic::default().with_mesh_default(lb), Traffic::default());
}

mod plan {
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
        p.entry("shop".into()).or_default().drains =
            drain::judged([workload], &with, m.default_drain);
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
}
