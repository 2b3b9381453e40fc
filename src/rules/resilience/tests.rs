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

/// An index of the namespaces a judgement reads, built from the rules sorted once, finds
/// what the index of every namespace finds, for every client, host and Service namespace
/// among them (rules of every kind: exported, private, to a list, wildcards, selectors, the
/// root's private and exported ones, several per host).
#[test]
fn an_index_of_a_few_namespaces_finds_what_the_whole_one_finds() {
    let rules = [
        rule(ROOT, "default", "*.local", 1, Blocks::OUTLIER_DETECTION),
        exported(rule(ROOT, "own", "*.local", 2, Blocks::TLS), &["."]),
        rule("bookinfo", "reviews", "reviews", 3, Blocks::TLS),
        rule(
            "bookinfo",
            "reviews-2",
            "reviews",
            4,
            Blocks::CONNECTION_POOL,
        ),
        exported(
            rule("bookinfo", "for-shop", "ratings", 5, Blocks::TLS),
            &["shop"],
        ),
        exported(
            rule("bookinfo", "private", "details", 6, Blocks::TLS),
            &["."],
        ),
        rule("shop", "reviews-from-shop", REVIEWS, 7, Blocks::TLS),
        rule(
            "shop",
            "wild",
            "*.bookinfo.svc.cluster.local",
            8,
            Blocks::LOAD_BALANCER,
        ),
        selecting(rule("web", "selected", REVIEWS, 9, Blocks::TLS), "web"),
    ];
    let hosts = [
        REVIEWS,
        "ratings.bookinfo.svc.cluster.local",
        "details.bookinfo.svc.cluster.local",
        "cart.shop.svc.cluster.local",
        "home.web.svc.cluster.local",
    ];
    let namespaces = ["", ROOT, "bookinfo", "shop", "web", "other"];
    for private in [false, true] {
        let whole = Index::build(&rules, ROOT, private);
        let by_namespace = super::by_namespace::ByNamespace::new(&rules, ROOT, private);
        for client in namespaces {
            for service_ns in namespaces {
                let few = by_namespace.index(&[client, service_ns]);
                for host in hosts {
                    for labels in [none(), [("app".to_string(), "web".to_string())].into()] {
                        let found = |i: &Index| {
                            i.for_workload(client, &labels, host, service_ns).map(|a| {
                                let shadowed = a.shadowed(i, client, host);
                                (a.tier, a.namespace.to_string(), a.rule.names(), shadowed)
                            })
                        };
                        assert_eq!(
                            found(&few),
                            found(&whole),
                            "{client} -> {host} of {service_ns} (private {private})"
                        );
                    }
                }
            }
        }
    }
}

mod plan;
