//! Rollout state and stalls, from the workloads' status.

use super::*;

fn deployment(yaml: &str) -> Deployment {
    serde_yaml::from_str(yaml).unwrap()
}

#[test]
fn a_recreate_rollout_is_not_complete_before_its_new_pods_exist() {
    // Old pods deleted, new ReplicaSet not created yet: the controller recorded the new
    // generation and kept the last rollout's completion mark.
    let d = deployment(
        "metadata: {name: a, generation: 4}\nspec: {replicas: 2, selector: {}, template: {}, strategy: {type: Recreate}}\nstatus: {observedGeneration: 4, replicas: 0, updatedReplicas: 0, availableReplicas: 0, conditions: [{type: Progressing, status: 'True', reason: NewReplicaSetAvailable}]}",
    );
    assert!(matches!(deployment_rollout(&d), Rollout::InProgress(_)));
}

#[test]
fn deployment_rollout_like_kubectl() {
    let base =
        "metadata: {name: a, generation: 3}\nspec: {replicas: 2, selector: {}, template: {}}\n";
    assert!(matches!(
        deployment_rollout(&deployment(&format!(
            "{base}status: {{observedGeneration: 2, replicas: 2, updatedReplicas: 2, availableReplicas: 2}}"
        ))),
        Rollout::InProgress(_)
    ));
    assert!(matches!(
        deployment_rollout(&deployment(&format!("{base}status: {{observedGeneration: 3, replicas: 3, updatedReplicas: 2, availableReplicas: 2}}"))),
        Rollout::InProgress(w) if w.contains("old replica")
    ));
    assert!(matches!(
        deployment_rollout(&deployment(&format!("{base}status: {{observedGeneration: 3, replicas: 2, updatedReplicas: 2, availableReplicas: 1}}"))),
        Rollout::Settling(w) if w.contains("available")
    ));
    // The controller declared generation 3 rolled out; a replica unavailable since, or
    // deleted and not yet replaced, is churn.
    for counts in [
        "replicas: 2, updatedReplicas: 2, availableReplicas: 1",
        "replicas: 1, updatedReplicas: 1, availableReplicas: 1",
    ] {
        assert_eq!(
            deployment_rollout(&deployment(&format!(
                "{base}status: {{observedGeneration: 3, {counts}, conditions: [{{type: Progressing, status: 'True', reason: NewReplicaSetAvailable}}]}}"
            ))),
            Rollout::Complete
        );
    }
    assert_eq!(
        deployment_rollout(&deployment(
            &format!("{base}status: {{observedGeneration: 2}}")
                .replace("replicas: 2,", "replicas: 2, paused: true,")
        )),
        Rollout::Paused
    );
    assert_eq!(
        deployment_rollout(&deployment(&format!(
            "{base}status: {{observedGeneration: 3, replicas: 2, updatedReplicas: 2, availableReplicas: 2}}"
        ))),
        Rollout::Complete
    );
    assert!(matches!(
        deployment_rollout(&deployment(&format!(
            "{base}status: {{observedGeneration: 3, replicas: 2, updatedReplicas: 1, availableReplicas: 2, conditions: [{{type: Progressing, status: 'False', reason: ProgressDeadlineExceeded, message: slow}}]}}"
        ))),
        Rollout::Stalled(_)
    ));
}

#[test]
fn statefulset_and_daemonset_rollouts() {
    let s: StatefulSet = serde_yaml::from_str("metadata: {name: s, generation: 2}\nspec: {replicas: 2, selector: {}, serviceName: s, template: {}}\nstatus: {observedGeneration: 2, replicas: 2, readyReplicas: 2, updatedReplicas: 1, currentRevision: r1, updateRevision: r2}").unwrap();
    assert!(matches!(statefulset_rollout(&s), Rollout::InProgress(_)));
    let s: StatefulSet = serde_yaml::from_str("metadata: {name: s, generation: 2}\nspec: {replicas: 2, selector: {}, serviceName: s, template: {}}\nstatus: {observedGeneration: 2, replicas: 2, readyReplicas: 2, updatedReplicas: 2, currentRevision: r2, updateRevision: r2}").unwrap();
    assert_eq!(statefulset_rollout(&s), Rollout::Complete);
    let s: StatefulSet = serde_yaml::from_str("metadata: {name: s, generation: 5}\nspec: {replicas: 2, selector: {}, serviceName: s, template: {}, updateStrategy: {type: OnDelete}}").unwrap();
    assert_eq!(
        statefulset_rollout(&s),
        Rollout::Complete,
        "OnDelete never rolls"
    );
    let d: DaemonSet = serde_yaml::from_str("metadata: {name: d, generation: 2}\nspec: {selector: {}, template: {}}\nstatus: {observedGeneration: 2, desiredNumberScheduled: 3, currentNumberScheduled: 3, numberMisscheduled: 0, numberReady: 3, updatedNumberScheduled: 3, numberAvailable: 2}").unwrap();
    assert!(matches!(daemonset_rollout(&d), Rollout::Settling(w) if w.contains("available")));
    // Rolled out (current = update revision) with a replica not ready later: pod churn.
    let s: StatefulSet = serde_yaml::from_str("metadata: {name: s, generation: 2}\nspec: {replicas: 3, selector: {}, serviceName: s, template: {}}\nstatus: {observedGeneration: 2, replicas: 3, readyReplicas: 2, updatedReplicas: 3, currentRevision: r2, updateRevision: r2}").unwrap();
    assert_eq!(statefulset_rollout(&s), Rollout::Complete);
    // Partitioned: old pods above the partition are a rollout; a pod not ready is not.
    let part = "metadata: {name: s, generation: 2}\nspec: {replicas: 4, selector: {}, serviceName: s, template: {}, updateStrategy: {type: RollingUpdate, rollingUpdate: {partition: 2}}}\n";
    let s: StatefulSet = serde_yaml::from_str(&format!("{part}status: {{observedGeneration: 2, replicas: 4, readyReplicas: 4, currentReplicas: 3, updatedReplicas: 1, currentRevision: r1, updateRevision: r2}}")).unwrap();
    assert!(matches!(statefulset_rollout(&s), Rollout::InProgress(_)));
    let s: StatefulSet = serde_yaml::from_str(&format!("{part}status: {{observedGeneration: 2, replicas: 3, readyReplicas: 3, currentReplicas: 2, updatedReplicas: 1, currentRevision: r1, updateRevision: r2}}")).unwrap();
    assert!(
        matches!(statefulset_rollout(&s), Rollout::Settling(_)),
        "an updated pod deleted (a drain) is no rollout"
    );
    // A new node: no pod of an older template left, one node without its pod yet.
    let d: DaemonSet = serde_yaml::from_str("metadata: {name: d, generation: 2}\nspec: {selector: {}, template: {}}\nstatus: {observedGeneration: 2, desiredNumberScheduled: 4, currentNumberScheduled: 3, numberMisscheduled: 0, numberReady: 3, updatedNumberScheduled: 3, numberAvailable: 3}").unwrap();
    assert!(matches!(daemonset_rollout(&d), Rollout::Settling(_)));
    let d: DaemonSet = serde_yaml::from_str("metadata: {name: d, generation: 2}\nspec: {selector: {}, template: {}}\nstatus: {observedGeneration: 2, desiredNumberScheduled: 4, currentNumberScheduled: 4, numberMisscheduled: 0, numberReady: 4, updatedNumberScheduled: 2, numberAvailable: 4}").unwrap();
    assert!(matches!(daemonset_rollout(&d), Rollout::InProgress(_)));
}

/// The stall decision: only a rollout of the generation meshwarden's write produced, not
/// finished long after that write; never someone else's rollout nor churn.
#[test]
fn only_meshwarden_s_unfinished_rollout_can_stall() {
    let now = jiff::Timestamp::from_second(1_000_000).unwrap();
    let day_ago = jiff::Timestamp::from_second(1_000_000 - 86_400).unwrap();
    let facts = |generation: i64, written: Option<i64>, rollout: Rollout| {
        let mut w = workload("s", &[(HASH_ANNOTATION, "h")], rollout);
        let f = Arc::make_mut(&mut w.facts);
        f.kind = Kind::StatefulSet;
        f.replicas = 3;
        f.generation = generation;
        f.written_generation = written;
        f.written_at = Some(day_ago);
        w.facts
    };
    let rolling = || Rollout::InProgress("1 of 3 replicas updated, 3 ready".into());
    // meshwarden's generation, not rolled out a day after its write: stalled.
    assert!(matches!(
        meshwarden_rollout(&facts(4, Some(4), rolling()), now),
        Rollout::Stalled(w) if w.contains("86400s")
    ));
    // The same shortly after the write: in progress.
    let mut recent = (*facts(4, Some(4), rolling())).clone();
    recent.written_at = Some(jiff::Timestamp::from_second(1_000_000 - 30).unwrap());
    assert!(matches!(
        meshwarden_rollout(&recent, now),
        Rollout::InProgress(_)
    ));
    // Someone else wrote generation 5 (a helm upgrade): their rollout, no slot, no stall.
    assert_eq!(
        meshwarden_rollout(&facts(5, Some(4), rolling()), now),
        Rollout::Complete
    );
    let deadline = Rollout::Stalled("ProgressDeadlineExceeded".into());
    assert_eq!(
        meshwarden_rollout(&facts(5, Some(4), deadline.clone()), now),
        Rollout::Complete
    );
    assert_eq!(
        meshwarden_rollout(&facts(4, Some(4), deadline.clone()), now),
        deadline
    );
    // Pods not ready after the rollout, long after the write: churn.
    let settling = Rollout::Settling("2 of 3 replicas ready".into());
    assert_eq!(
        meshwarden_rollout(&facts(4, Some(4), settling.clone()), now),
        Rollout::Complete
    );
    assert!(matches!(
        meshwarden_rollout(&recent_with(&facts(4, Some(4), settling), now), now),
        Rollout::InProgress(_)
    ));
    // Written by a version that did not record the generation: in progress, never stalled.
    assert_eq!(
        meshwarden_rollout(&facts(4, None, rolling()), now),
        rolling()
    );
    // Never written by meshwarden: not its rollout.
    let mut theirs = (*facts(4, None, rolling())).clone();
    theirs.template_annotations.clear();
    assert_eq!(meshwarden_rollout(&theirs, now), Rollout::Complete);
    // Paused stays paused (reported, holds no slot).
    assert_eq!(
        meshwarden_rollout(&facts(5, Some(4), Rollout::Paused), now),
        Rollout::Paused
    );
}

fn recent_with(f: &WorkloadFacts, now: jiff::Timestamp) -> WorkloadFacts {
    let mut f = f.clone();
    f.written_at = Some(jiff::Timestamp::from_second(now.as_second() - 30).unwrap());
    f
}

#[test]
fn churn_long_after_meshwarden_wrote_is_no_rollout_and_paused_holds_no_slot() {
    let ours = [(HASH_ANNOTATION, "h")];
    let now = jiff::Timestamp::from_second(1_000_000).unwrap();
    let mut churn = workload("a", &ours, Rollout::Settling("2 of 3 ready".into()));
    let f = Arc::make_mut(&mut churn.facts);
    f.kind = Kind::StatefulSet;
    f.replicas = 3;
    f.written_at = Some(jiff::Timestamp::from_second(1_000_000 - 86_400).unwrap());
    let mut recent = churn.clone();
    Arc::make_mut(&mut recent.facts).written_at =
        Some(jiff::Timestamp::from_second(1_000_000 - 30).unwrap());
    let ns = |w: &Workload| NamespaceObservation {
        name: "n".into(),
        labels: Arc::new([("istio-injection".to_string(), "enabled".to_string())].into()),
        workloads: vec![vec![w.facts.clone()].into()],
        ..Default::default()
    };
    assert_eq!(
        classify(&[ns(&churn)], now, &Revisions::any()).targets[0].rollout,
        Rollout::Complete
    );
    assert!(matches!(
        classify(&[ns(&recent)], now, &Revisions::any()).targets[0].rollout,
        Rollout::InProgress(_)
    ));

    // Pacing 1: a paused Deployment is held and reported, and the other one gets the slot.
    let d = full();
    let targets = [
        workload("a", &[], Rollout::Paused),
        workload("b", &[], Rollout::Complete),
    ];
    let p = plan(&d, &targets, &BTreeMap::new(), Some(1), true);
    assert!(
        matches!(&p[0].action, Action::Held(why) if why.contains("paused")),
        "{:?}",
        p[0]
    );
    assert_eq!(p[1].action, Action::Apply);
}
