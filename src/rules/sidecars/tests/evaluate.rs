//! The evaluation that keeps namespace parts between reconciles decides exactly what a fresh
//! one does, and re-decides only the namespaces whose objects changed.

use super::*;

fn deployment(ns: &str, name: &str, annotations: &str) -> Arc<WorkloadFacts> {
    let d: Deployment = serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, namespace: {ns}, generation: 1}}
spec: {{replicas: 2, selector: {{}}, template: {{metadata: {{annotations: {annotations}}}}}}}
status: {{observedGeneration: 1, replicas: 2, updatedReplicas: 2, availableReplicas: 2}}"
    ))
    .unwrap();
    Arc::new(WorkloadFacts::from(&d))
}

fn pod(name: &str, owner: &str, cpu: &str) -> Arc<PodFacts> {
    let p: Pod = serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, labels: {{pod-template-hash: abc}}, ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {owner}-abc, uid: u}}]}}
spec: {{containers: [{{name: app}}, {{name: istio-proxy, resources: {{requests: {{cpu: {cpu}, memory: 128Mi}}, limits: {{cpu: '1', memory: 512Mi}}}}}}]}}"
    ))
    .unwrap();
    Arc::new(PodFacts::from(&p))
}

fn quota(cpu: &str) -> ResourceQuota {
    serde_yaml::from_str(&format!(
        "metadata: {{name: q}}\nspec: {{hard: {{requests.cpu: {cpu}}}}}\nstatus: {{used: {{requests.cpu: '0'}}}}"
    ))
    .unwrap()
}

fn namespaces(d: &Desired) -> Vec<NamespaceObservation> {
    let declared = {
        let pairs: Vec<String> = compliant_annotations(d)
            .iter()
            .map(|(k, v)| format!("{k}: '{v}'"))
            .collect();
        format!("{{{}}}", pairs.join(", "))
    };
    let on = map(&[("istio-injection", "enabled")]);
    vec![
        NamespaceObservation {
            name: "a".into(),
            labels: on.clone().into(),
            workloads: vec![
                vec![
                    deployment("a", "one", &declared),
                    deployment("a", "two", "{}"),
                ]
                .into(),
            ],
            pods: vec![pod("one-1", "one", "100m"), pod("two-1", "two", "50m")].into(),
            ..Default::default()
        },
        NamespaceObservation {
            name: "b".into(),
            labels: on.clone().into(),
            workloads: vec![
                vec![
                    deployment("b", "kept", "{}"),
                    deployment("b", "off", "{sidecar.istio.io/inject: 'false'}"),
                ]
                .into(),
            ],
            pods: vec![pod("off-1", "off", "50m"), pod("kept-1", "kept", "50m")].into(),
            quotas: vec![quota("10m")],
            ..Default::default()
        },
        NamespaceObservation {
            name: "c".into(),
            labels: on.into(),
            workloads: vec![vec![deployment("c", "three", "{}")].into()],
            pods: vec![pod("three-1", "three", "50m")].into(),
            ..Default::default()
        },
    ]
}

/// A copy of `slice` changed by `edit`, as the index makes one after a watch event.
fn edited<T>(slice: &Shared<T>, edit: impl FnOnce(&mut Vec<Arc<T>>)) -> Shared<T> {
    let mut v = slice.to_vec();
    edit(&mut v);
    v.into()
}

/// Evaluates with `memo` and fresh; both must decide the same. Returns how many namespaces
/// the memo's evaluation decided anew.
fn same_as_fresh(memo: &mut Memo, obs: &[NamespaceObservation], d: &Desired) -> usize {
    let spec: SidecarSpec = serde_yaml::from_str(
        "{pacing: Paced, maxConcurrentRollouts: 1, resources: {requests: {cpu: 100m}}}",
    )
    .unwrap();
    let now = jiff::Timestamp::now();
    let r = Revisions::any();
    let kept = evaluate_with(memo, obs, d, &spec, true, &r, now, None, None);
    let fresh = evaluate(obs, d, &spec, true, &r, now, None, None);
    assert_eq!(format!("{kept:?}"), format!("{fresh:?}"));
    memo.last_decided
}

#[test]
fn kept_parts_decide_as_a_fresh_evaluation_and_only_changed_namespaces_are_redone() {
    let d = full();
    let mut memo = Memo::default();
    let mut obs = namespaces(&d);
    assert_eq!(same_as_fresh(&mut memo, &obs, &d), 3);

    // Nothing changed: nothing decided.
    assert_eq!(same_as_fresh(&mut memo, &obs, &d), 0);
    // The same entries in another order: decided anew (the cache lists them by name).
    obs[0].pods = edited(&obs[0].pods, |p| p.reverse());
    assert_eq!(same_as_fresh(&mut memo, &obs, &d), 1);

    // A workload of `a` now carries the declared values (its watch event replaced the entry).
    let declared = compliant_annotations(&d)
        .iter()
        .map(|(k, v)| format!("{k}: '{v}'"))
        .collect::<Vec<_>>()
        .join(", ");
    obs[0].workloads[0] = edited(&obs[0].workloads[0], |w| {
        w[1] = deployment("a", "two", &format!("{{{declared}}}"))
    });
    assert_eq!(same_as_fresh(&mut memo, &obs, &d), 1);

    // A pod of `b` replaced; the quota of `b` raised so that the values fit.
    obs[1].pods = edited(&obs[1].pods, |p| p[1] = pod("kept-2", "kept", "100m"));
    assert_eq!(same_as_fresh(&mut memo, &obs, &d), 1);
    obs[1].quotas = vec![quota("100")];
    assert_eq!(same_as_fresh(&mut memo, &obs, &d), 1);

    // Injection turned off in `c`: its workload is no target any more.
    obs[2].labels = map(&[("istio-injection", "disabled")]).into();
    assert_eq!(same_as_fresh(&mut memo, &obs, &d), 1);

    // Other declared values: every namespace is decided anew.
    let other = desired(&resources(
        "{requests: {cpu: 200m, memory: 128Mi}, limits: {cpu: '1', memory: 512Mi}}",
    ))
    .unwrap();
    assert_eq!(same_as_fresh(&mut memo, &obs, &other), 3);

    // `c` no longer covered: nothing to decide, and its part is dropped.
    obs.pop();
    assert_eq!(same_as_fresh(&mut memo, &obs, &other), 0);
    obs.push(namespaces(&d).pop().unwrap());
    assert_eq!(same_as_fresh(&mut memo, &obs, &other), 1);
}

#[test]
fn settled_targets_are_counted_not_assembled() {
    let d = full();
    let spec: SidecarSpec = serde_yaml::from_str(
        "{pacing: Paced, maxConcurrentRollouts: 1, resources: {requests: {cpu: 100m}}}",
    )
    .unwrap();
    let now = jiff::Timestamp::now();
    let e = evaluate(
        &namespaces(&d),
        &d,
        &spec,
        true,
        &Revisions::any(),
        now,
        None,
        None,
    );
    // a/one carries the declared values and its rollout is complete: counted only.
    assert_eq!(e.classified.settled, 1);
    let listed: Vec<String> = e.classified.targets.iter().map(Workload::id).collect();
    assert_eq!(
        listed,
        [
            "Deployment/a/two",
            "Deployment/b/kept",
            "Deployment/c/three"
        ]
    );
    assert_eq!(e.decisions.len(), 3);
    // The same workload while its controller still rolls it out is listed (it may hold a
    // rollout slot).
    let mut obs = namespaces(&d);
    let rolling: Deployment = serde_yaml::from_str(&format!(
        "metadata: {{name: one, namespace: a, generation: 2}}
spec: {{replicas: 2, selector: {{}}, template: {{metadata: {{annotations: {{{}}}}}}}}}
status: {{observedGeneration: 2, replicas: 3, updatedReplicas: 1, availableReplicas: 2}}",
        compliant_annotations(&d)
            .iter()
            .map(|(k, v)| format!("{k}: '{v}'"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .unwrap();
    obs[0].workloads[0] = edited(&obs[0].workloads[0], |w| {
        w[0] = Arc::new(WorkloadFacts::from(&rolling))
    });
    let e = evaluate(&obs, &d, &spec, true, &Revisions::any(), now, None, None);
    assert_eq!(e.classified.settled, 0);
    assert_eq!(e.classified.targets.len(), 4);
}
