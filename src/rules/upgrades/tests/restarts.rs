//! The restart gate, targets and the debounce of a revision that is gone.

use super::*;

#[test]
fn a_restart_must_give_the_intended_proxy_and_keep_the_workload_available() {
    let r = revisions();
    let ns = |pairs: &[(&str, &str)]| map(pairs);
    let w = facts("web", 3, None, Rollout::Complete);
    let enabled = ns(&[("istio-injection", "enabled")]);
    let none: Option<&crate::error::Result<Budgets>> = None;
    assert_eq!(restart_gate("apps", Some(&enabled), &w, &r, none), Gate::Go);
    // The namespace selects a revision that is gone, or nothing at all.
    for labels in [ns(&[("istio.io/rev", "retired")]), ns(&[])] {
        let g = restart_gate("apps", Some(&labels), &w, &r, none);
        assert!(
            matches!(&g, Gate::Skipped(why) if why.contains("a restart would give its pods no sidecar")),
            "{labels:?}: {g:?}"
        );
    }
    // A tag whose revision is gone.
    let mut dangling = r.clone();
    dangling.tags.insert("old".into(), "retired".into());
    let g = restart_gate(
        "apps",
        Some(&ns(&[("istio.io/rev", "old")])),
        &w,
        &dangling,
        none,
    );
    assert!(matches!(g, Gate::Skipped(_)), "{g:?}");
    // istio-injection=enabled in a revision-only install.
    let mut canary_only = r.clone();
    canary_only.live.remove("default");
    let g = restart_gate("apps", Some(&enabled), &w, &canary_only, none);
    assert!(
        matches!(&g, Gate::Skipped(why) if why.contains("no default revision")),
        "{g:?}"
    );
    // A pinned proxy image.
    let mut pinned = (*w).clone();
    pinned
        .template_annotations
        .insert(PROXY_IMAGE, "registry.example/proxyv2:1.20.0".into());
    let g = restart_gate("apps", Some(&enabled), &pinned, &r, none);
    assert!(
        matches!(&g, Gate::Skipped(why) if why.contains("pins sidecar.istio.io/proxyImage")),
        "{g:?}"
    );
    // Enforce: the availability gate with the namespace's budgets.
    let mut recreate = (*w).clone();
    recreate.strategy = Strategy::Recreate;
    let budgets: crate::error::Result<Budgets> = Ok(Budgets::new());
    let g = restart_gate("apps", Some(&enabled), &recreate, &r, Some(&budgets));
    assert!(
        matches!(&g, Gate::Held(why) if why.contains("Recreate")),
        "{g:?}"
    );
    let blocking = Budget {
        name: "web".into(),
        selector: Some(Default::default()),
        allowed: Some(0),
        healthy: 1,
        desired: 2,
    };
    let budgets: crate::error::Result<Budgets> =
        Ok(Budgets::from([("apps".to_string(), vec![blocking])]));
    let g = restart_gate("apps", Some(&enabled), &w, &r, Some(&budgets));
    assert!(
        matches!(&g, Gate::Held(why) if why.contains("PodDisruptionBudget web")),
        "{g:?}"
    );
    assert_eq!(
        restart_gate("other", Some(&enabled), &w, &r, Some(&budgets)),
        Gate::Go
    );
}

#[test]
fn a_restart_is_repeated_only_for_another_target() {
    let r = revisions();
    let ns = map(&[("istio.io/rev", "prod")]);
    let w = facts("web", 4, Some(4), Rollout::Complete);
    // The tag resolves to the canary, whose istiod serves 1.33.1.
    assert_eq!(
        restart_target(&ns, &w, &r),
        Some("canary@1.33.1".to_string())
    );
    assert_eq!(
        restart_target(&map(&[("istio-injection", "enabled")]), &w, &r),
        Some("default@1.31-dev".to_string())
    );
    let mut settling = r.clone();
    settling.settling.insert("canary".into());
    assert_eq!(restart_target(&ns, &w, &settling), None);
    let outdated: Outdated = [(owner("web"), "behind".to_string())].into();
    let go = |_: &str, _: &WorkloadFacts| Gate::Go;
    let at = |t: &'static str| move |_: &str, _: &WorkloadFacts| Some(t.to_string());
    let plan_for = |w: WorkloadFacts, target: &dyn Fn(&str, &WorkloadFacts) -> Option<String>| {
        let w = Arc::new(w);
        let ws: Workloads = [(
            ("apps".to_string(), w.kind, w.name.clone()),
            (w.clone(), Rollout::Complete),
        )]
        .into();
        plan_restarts(&outdated, &ws, 2, &go, target).decisions[0]
            .1
            .clone()
    };
    let mut done = (*w).clone();
    done.restart_target = Some("canary@1.33.1".into());
    // Same target: the injector gives the same proxy, not restarted again.
    let d = plan_for(done.clone(), &at("canary@1.33.1"));
    assert!(
        matches!(&d, Restart::Skipped(why) if why.contains("restarted it (for canary@1.33.1)")),
        "{d:?}"
    );
    // istiod upgraded since: restarted again.
    assert_eq!(plan_for(done.clone(), &at("canary@1.35.0")), Restart::Now);
    // Target not known (istiod rolls out), or a restart by a version that recorded none.
    assert!(matches!(
        plan_for(done, &|_: &str, _: &WorkloadFacts| None),
        Restart::Skipped(_)
    ));
    assert!(matches!(
        plan_for((*w).clone(), &at("canary@1.35.0")),
        Restart::Skipped(_)
    ));
    let p = restart::patch(
        Kind::Deployment,
        "apps",
        "web",
        "t",
        5,
        Some("canary@1.35.0"),
    );
    assert_eq!(
        p["metadata"]["annotations"]["meshwarden.io/restart-target"],
        "canary@1.35.0"
    );
}

#[test]
fn proxies_of_a_revision_that_is_gone_are_restarted_only_once_it_stayed_gone() {
    use std::time::Duration;
    assert!(
        debounce("canary", Duration::from_secs(20))
            .is_some_and(|w| w.contains("revision canary has been gone for 20s"))
    );
    assert_eq!(debounce("canary", REVISION_GONE_AFTER), None);
    let gone = GoneSince::default();
    let first = gone.update(&["canary".to_string()].into());
    assert!(first["canary"] < Duration::from_secs(1));
    // Back (no proxy names a gone revision): forgotten, so a later removal starts anew.
    assert!(gone.update(&BTreeSet::new()).is_empty());
    assert!(gone.update(&["canary".to_string()].into())["canary"] < Duration::from_secs(1));
    // The plan names the revision of each orphaned workload.
    let r = revisions();
    let pods = [pod(
        "gone-1",
        Some("legacy"),
        Some("retired"),
        Some("1.29.0"),
    )];
    let refs: Vec<(&str, &PodFacts)> = pods.iter().map(|p| ("apps", p)).collect();
    let p = plan(1, &r, &[], &refs);
    assert_eq!(
        p.orphaned
            .get(&("apps".into(), Some(Kind::Deployment), "legacy".into())),
        Some(&"retired".to_string())
    );
}
