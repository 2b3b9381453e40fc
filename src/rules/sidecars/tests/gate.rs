//! The rollout gate in the section's plan: held targets take no slot, a restart rolling holds
//! the write, and nothing is gated in Audit.

use super::*;

fn devs(n: usize) -> Vec<Vec<String>> {
    vec![vec!["requests.cpu: want 100m".to_string()]; n]
}

#[test]
fn a_target_the_gate_holds_takes_no_slot_and_is_never_written() {
    let ts = vec![
        workload("a", &[], Rollout::Complete),
        workload("b", &[], Rollout::Complete),
        workload("c", &[], Rollout::Complete),
        workload("d", &[], Rollout::Complete),
    ];
    let gate = |w: &Workload| match w.name.as_str() {
        "a" => Gate::Held("strategy Recreate".into()),
        "b" => Gate::Skipped("OnDelete".into()),
        _ => Gate::Go,
    };
    let d = plan_with(&ts, devs(4), &BTreeMap::new(), Some(1), true, &gate);
    let actions: Vec<&Action> = d.iter().map(|d| &d.action).collect();
    assert_eq!(
        actions,
        [
            &Action::Gated(Gate::Held("strategy Recreate".into())),
            &Action::Gated(Gate::Skipped("OnDelete".into())),
            &Action::Apply,
            &Action::Held("waits for a rollout slot (maxConcurrentRollouts 1)".into()),
        ]
    );
    // Audit: reported, the gate is not asked.
    let d = plan_with(&ts, devs(4), &BTreeMap::new(), Some(1), false, &gate);
    assert!(d.iter().all(|d| d.action == Action::Reported));
    // A target already rolling because of meshwarden's write is rewritten, whatever the gate,
    // once the Deployment controller rolls no other template (the tail of the rollout); while
    // it still does, the rewrite waits and keeps the slot.
    let h = full().hash();
    let rolling = |r: Rollout| vec![workload("a", &[(HASH_ANNOTATION, h.as_str())], r)];
    let ts = rolling(Rollout::Settling(
        "1 of 2 updated replicas available".into(),
    ));
    let d = plan_with(&ts, devs(1), &BTreeMap::new(), Some(1), true, &gate);
    assert_eq!(d[0].action, Action::Apply);
    let ts = rolling(Rollout::InProgress("1 of 2 replicas updated".into()));
    let d = plan_with(&ts, devs(1), &BTreeMap::new(), Some(1), true, &gate);
    assert!(matches!(d[0].action, Action::Held(_)), "{:?}", d[0]);
    assert!(d[0].rolling, "it keeps its slot");
}

#[test]
fn a_restart_rolling_holds_the_write_and_takes_a_slot() {
    let mut restarting = (*workload("a", &[], Rollout::Complete).facts).clone();
    restarting.restart_generation = Some(restarting.generation);
    restarting.rollout = Rollout::InProgress("1 of 2 replicas updated".into());
    let ts = vec![
        Workload {
            namespace: "apps".into(),
            facts: Arc::new(restarting),
            rollout: Rollout::Complete,
        },
        workload("b", &[], Rollout::Complete),
    ];
    let go = |_: &Workload| Gate::Go;
    let d = plan_with(&ts, devs(2), &BTreeMap::new(), Some(1), true, &go);
    assert!(
        matches!(&d[0].action, Action::Held(w) if w.contains("restart of it (upgrades section) is rolling")),
        "{:?}",
        d[0].action
    );
    assert_eq!(
        d[1].action,
        Action::Held("waits for a rollout slot (maxConcurrentRollouts 1)".into()),
        "the restart's rollout holds the only slot"
    );
}
