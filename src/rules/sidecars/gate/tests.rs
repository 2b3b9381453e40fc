use super::*;

fn deployment(spec: serde_json::Value) -> WorkloadFacts {
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "apps", "generation": 1},
        "spec": spec,
    }))
    .unwrap();
    WorkloadFacts::from(&d)
}

fn statefulset(spec: serde_json::Value) -> WorkloadFacts {
    let s: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "db", "namespace": "apps", "generation": 1},
        "spec": spec,
    }))
    .unwrap();
    WorkloadFacts::from(&s)
}

fn template() -> serde_json::Value {
    json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}})
}

fn budget(name: &str, app: &str, allowed: Option<i32>) -> Budget {
    let b: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "apps", "generation": 2},
        "spec": {"selector": {"matchLabels": {"app": app}}, "maxUnavailable": 1},
        "status": {
            "observedGeneration": if allowed.is_some() { 2 } else { 1 },
            "disruptionsAllowed": allowed.unwrap_or(0),
            "currentHealthy": 2, "desiredHealthy": 3, "expectedPods": 3,
        },
    }))
    .unwrap();
    Budget::from(&b)
}

fn held(g: Gate) -> String {
    match g {
        Gate::Held(why) => why,
        other => panic!("expected Held, got {other:?}"),
    }
}

#[test]
fn strategies_resolve_as_the_controllers_resolve_them() {
    let pct = |s: &str| IntOrString::String(s.into());
    assert_eq!(scaled(Some(&pct("25%")), 3, true, 0), 1);
    assert_eq!(scaled(Some(&pct("25%")), 3, false, 0), 0);
    assert_eq!(scaled(Some(&pct("50%")), 4, false, 0), 2);
    assert_eq!(scaled(Some(&IntOrString::Int(2)), 4, false, 0), 2);
    assert_eq!(scaled(Some(&pct("bad")), 4, false, 7), 7);
    // Defaults of a Deployment: 25% each; 1 replica: surge 1, unavailable 0.
    assert_eq!(
        deployment_strategy(None, 1),
        Strategy::Rolling {
            max_unavailable: 0,
            max_surge: 1
        }
    );
    // Both zero: one unavailable.
    let zero: DeploymentStrategy = serde_json::from_value(
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "10%"}}),
    )
    .unwrap();
    assert_eq!(
        deployment_strategy(Some(&zero), 3),
        Strategy::Rolling {
            max_unavailable: 1,
            max_surge: 0
        }
    );
    let recreate: DeploymentStrategy = serde_json::from_value(json!({"type": "Recreate"})).unwrap();
    assert_eq!(deployment_strategy(Some(&recreate), 3), Strategy::Recreate);
    let on_delete: StatefulSetUpdateStrategy =
        serde_json::from_value(json!({"type": "OnDelete"})).unwrap();
    assert_eq!(
        statefulset_strategy(Some(&on_delete), 3),
        Strategy::OnDelete
    );
    let partition: StatefulSetUpdateStrategy =
        serde_json::from_value(json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 3}}))
            .unwrap();
    assert_eq!(
        statefulset_strategy(Some(&partition), 3),
        Strategy::Partitioned(3)
    );
    assert_eq!(
        statefulset_strategy(Some(&partition), 5),
        Strategy::Rolling {
            max_unavailable: 1,
            max_surge: 0
        }
    );
    let ds: DaemonSetUpdateStrategy = serde_json::from_value(
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
    )
    .unwrap();
    assert_eq!(
        daemonset_strategy(Some(&ds), 6),
        Strategy::Rolling {
            max_unavailable: 0,
            max_surge: 1
        }
    );
}

#[test]
fn a_rollout_that_would_take_the_workload_down_is_held_with_the_reason() {
    // Recreate.
    let w = deployment(
        json!({"replicas": 3, "strategy": {"type": "Recreate"}, "selector": {}, "template": template()}),
    );
    assert!(held(availability(&w, &[])).contains("strategy Recreate deletes all 3 pod(s)"));
    // maxUnavailable equal to the replicas, no surge.
    let w = deployment(
        json!({"replicas": 2, "selector": {}, "template": template(),
        "strategy": {"rollingUpdate": {"maxUnavailable": 2, "maxSurge": 0}}}),
    );
    assert!(held(availability(&w, &[])).contains("may take all 2 pod(s) down at once"));
    // One replica, default strategy: surge only, so it stays available.
    let w = deployment(json!({"replicas": 1, "selector": {}, "template": template()}));
    assert_eq!(availability(&w, &[]), Gate::Go);
    // A StatefulSet of one replica.
    let s = statefulset(json!({"replicas": 1, "selector": {}, "template": template()}));
    assert!(held(availability(&s, &[])).contains("a StatefulSet of 1 replica"));
    let s = statefulset(json!({"replicas": 3, "selector": {}, "template": template()}));
    assert_eq!(availability(&s, &[]), Gate::Go);
    // OnDelete and a partition keeping every ordinal: the write changes nothing that runs.
    let s = statefulset(
        json!({"replicas": 3, "selector": {}, "template": template(),
        "updateStrategy": {"type": "OnDelete"}}),
    );
    assert!(matches!(availability(&s, &[]), Gate::Skipped(w) if w.contains("OnDelete")));
    let s = statefulset(
        json!({"replicas": 3, "selector": {}, "template": template(),
        "updateStrategy": {"rollingUpdate": {"partition": 3}}}),
    );
    assert!(matches!(availability(&s, &[]), Gate::Skipped(w) if w.contains("partition 3")));
    // No replicas: nothing to lose.
    let w = deployment(
        json!({"replicas": 0, "strategy": {"type": "Recreate"}, "selector": {}, "template": template()}),
    );
    assert_eq!(availability(&w, &[]), Gate::Go);
}

#[test]
fn budgets_that_select_the_pods_must_allow_a_disruption_now() {
    let w = deployment(json!({"replicas": 3, "selector": {}, "template": template()}));
    assert_eq!(
        availability(&w, &[budget("other", "api", Some(0))]),
        Gate::Go
    );
    assert_eq!(availability(&w, &[budget("web", "web", Some(1))]), Gate::Go);
    let why = held(availability(
        &w,
        &[
            budget("web", "web", Some(1)),
            budget("web-pdb", "web", Some(0)),
        ],
    ));
    assert!(
        why.contains(
            "PodDisruptionBudget web-pdb allows no disruption now (2 of 3 required pods healthy)"
        ),
        "{why}"
    );
    assert!(
        why.contains("meshwarden.io/rollout=AllowDisruption"),
        "{why}"
    );
    // A budget whose status is not computed for its generation yet.
    assert!(held(availability(&w, &[budget("web", "web", None)])).contains("not computed"));
    // An empty selector selects every pod of the namespace.
    let mut all = budget("all", "x", Some(0));
    all.selector = Some(Default::default());
    assert!(held(availability(&w, &[all])).contains("PodDisruptionBudget all"));
}

#[test]
fn the_owner_can_accept_the_downtime_but_never_turn_on_delete_into_a_rollout() {
    let w = deployment(
        json!({"replicas": 3, "selector": {}, "template": template(),
        "strategy": {"type": "Recreate"}}),
    );
    let mut allowed = w.clone();
    allowed.allow_disruption = true;
    assert_eq!(
        availability(&allowed, &[budget("web", "web", Some(0))]),
        Gate::Go
    );
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "apps",
                     "annotations": {ROLLOUT_ANNOTATION: ALLOW_DISRUPTION}},
        "spec": {"replicas": 3, "selector": {}, "template": template(),
                 "strategy": {"type": "Recreate"}},
    }))
    .unwrap();
    assert!(WorkloadFacts::from(&d).allow_disruption);
    let s: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "db", "namespace": "apps",
                     "annotations": {ROLLOUT_ANNOTATION: ALLOW_DISRUPTION}},
        "spec": {"replicas": 3, "selector": {}, "template": template(),
                 "updateStrategy": {"type": "OnDelete"}},
    }))
    .unwrap();
    assert!(matches!(
        availability(&WorkloadFacts::from(&s), &[]),
        Gate::Skipped(_)
    ));
}
