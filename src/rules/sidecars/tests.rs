use super::*;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

mod evaluate;
mod gate;
mod index;
mod memo;
mod rollout;

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A template map of the keys the facts keep.
fn small(pairs: &[(&'static str, &str)]) -> SmallMap<&'static str> {
    small_map(pairs.iter().map(|(k, v)| (*k, v.to_string())))
}

fn resources(yaml: &str) -> ResourcesSpec {
    serde_yaml::from_str(yaml).unwrap()
}

fn full() -> Desired {
    desired(&resources(
        "{requests: {cpu: 100m, memory: 128Mi}, limits: {cpu: '1', memory: 512Mi}}",
    ))
    .unwrap()
}

fn workload(name: &str, annotations: &[(&'static str, &str)], rollout: Rollout) -> Workload {
    Workload {
        namespace: "apps".into(),
        facts: Arc::new(WorkloadFacts {
            kind: Kind::Deployment,
            name: name.into(),
            labels: SmallMap::new(),
            generation: 1,
            replicas: 2,
            template_labels: SmallMap::new(),
            template_annotations: small(annotations),
            opted_out: false,
            other_rule: false,
            written_at: None,
            written_generation: None,
            restart_generation: None,
            restart_opted_out: false,
            restart_target: None,
            foreign_owners: vec![],
            foreign_writes: ForeignWrites::default(),
            other_containers: Amounts::new(),
            rollout: rollout.clone(),
            rolled_out_at: None,
            observed: true,
            strategy: Strategy::default(),
            pod_labels: Default::default(),
            allow_disruption: false,
            grace_seconds: None,
            drain: Default::default(),
        }),
        rollout,
    }
}

fn compliant_annotations(d: &Desired) -> Vec<(&'static str, String)> {
    let mut v: Vec<(&'static str, String)> = d
        .annotations()
        .iter()
        .map(|(k, v)| (*k, v.to_string()))
        .collect();
    v.push((HASH_ANNOTATION, d.hash()));
    v
}

#[test]
fn all_four_values_are_derived_and_omissions_are_explained() {
    let d = full();
    assert_eq!(
        (
            d.cpu.as_str(),
            d.cpu_limit.as_str(),
            d.memory.as_str(),
            d.memory_limit.as_str()
        ),
        ("100m", "1", "128Mi", "512Mi")
    );
    assert!(d.notes.is_empty());

    let d = desired(&resources(
        "{requests: {cpu: 100m, memory: 128Mi}, limits: {memory: 1Gi}}",
    ))
    .unwrap();
    assert_eq!(d.cpu_limit, "100m", "a missing limit takes the request");
    assert!(
        d.notes[0].contains("limits.cpu is not declared"),
        "{:?}",
        d.notes
    );

    let d = desired(&resources("{limits: {cpu: 2, memory: 1Gi}}")).unwrap();
    assert_eq!((d.cpu.as_str(), d.memory.as_str()), ("2", "1Gi"));
    assert_eq!(d.notes.len(), 2);

    let err = desired(&resources("{requests: {cpu: 100m}}")).unwrap_err();
    assert!(err.contains("memory"), "{err}");
    assert!(err.contains("for memory:"), "only memory is missing: {err}");
}

#[test]
fn hash_follows_the_values() {
    let a = full();
    let mut b = full();
    assert_eq!(a.hash(), b.hash());
    b.memory_limit = "1Gi".into();
    assert_ne!(a.hash(), b.hash());
    assert_eq!(a.hash().len(), 16);
}

/// The hash is stored in the workloads' annotations: it must not change between releases.
#[test]
fn hash_is_stable_across_releases() {
    assert_eq!(full().hash(), "ed6686402a0c22d3");
}

#[test]
fn which_pods_get_a_sidecar() {
    let none = map(&[]);
    let injected = map(&[("istio-injection", "enabled")]);
    let rev = map(&[("istio.io/rev", "canary")]);
    assert_eq!(
        no_sidecar_reason(&injected, &none, &none, &Revisions::any()),
        None
    );
    assert_eq!(
        no_sidecar_reason(&rev, &none, &none, &Revisions::any()),
        None
    );
    assert!(no_sidecar_reason(&none, &none, &none, &Revisions::any()).is_some());
    assert!(
        no_sidecar_reason(
            &map(&[("istio-injection", "disabled"), ("istio.io/rev", "x")]),
            &none,
            &none,
            &Revisions::any()
        )
        .is_some(),
        "istio-injection=disabled wins over a revision label"
    );
    // Opt-out on the pod, as label or annotation.
    let off = map(&[(INJECT, "false")]);
    assert!(no_sidecar_reason(&injected, &off, &none, &Revisions::any()).is_some());
    assert!(no_sidecar_reason(&injected, &none, &off, &Revisions::any()).is_some());
    // Opt-in on the pod in a namespace without injection labels.
    assert_eq!(
        no_sidecar_reason(&none, &map(&[(INJECT, "true")]), &none, &Revisions::any()),
        None
    );
    assert!(
        no_sidecar_reason(&none, &none, &map(&[(INJECT, "true")]), &Revisions::any()).is_some(),
        "the webhook selects on the label, not the annotation"
    );
    // An Istio gateway (as the gateway chart renders it) is not a sidecar.
    let gw_labels = map(&[(INJECT, "true"), ("istio", "ingressgateway")]);
    let gw_ann = map(&[(INJECT_TEMPLATES, "gateway"), (INJECT, "true")]);
    assert!(no_sidecar_reason(&injected, &gw_labels, &gw_ann, &Revisions::any()).is_some());
    // Ambient namespaces have no sidecars.
    let ambient = map(&[
        ("istio-injection", "enabled"),
        ("istio.io/dataplane-mode", "ambient"),
    ]);
    assert!(no_sidecar_reason(&ambient, &none, &none, &Revisions::any()).is_some());
}

#[test]
fn namespace_selection_defaults_to_injection_on() {
    let mut spec: SidecarSpec =
        serde_yaml::from_str("{resources: {requests: {cpu: 1, memory: 1Gi}}}").unwrap();
    assert!(selects_namespace(
        &spec,
        &map(&[("istio-injection", "enabled")]),
        &Revisions::any()
    ));
    assert!(selects_namespace(
        &spec,
        &map(&[("istio.io/rev", "default")]),
        &Revisions::any()
    ));
    assert!(!selects_namespace(
        &spec,
        &map(&[("team", "a")]),
        &Revisions::any()
    ));
    assert!(!selects_namespace(
        &spec,
        &map(&[
            ("istio-injection", "enabled"),
            ("istio.io/dataplane-mode", "ambient")
        ]),
        &Revisions::any()
    ));
    // A revision label counts only when it names a live revision or a tag.
    let live = Revisions {
        live: [("canary".to_string(), ["istio-system".to_string()].into())].into(),
        tags: [("prod".to_string(), "canary".to_string())].into(),
        ..Revisions::default()
    };
    assert!(selects_namespace(
        &spec,
        &map(&[("istio.io/rev", "prod")]),
        &live
    ));
    assert!(!selects_namespace(
        &spec,
        &map(&[("istio.io/rev", "gone")]),
        &live
    ));
    let (covered, _, unknown) = covered_namespaces(
        &spec,
        [
            ("a".to_string(), Arc::new(map(&[("istio.io/rev", "gone")]))),
            (
                "b".to_string(),
                Arc::new(map(&[("istio.io/rev", "canary")])),
            ),
        ]
        .into_iter(),
        &live,
    );
    assert_eq!(
        covered.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["b"]
    );
    assert_eq!(unknown, [("a".to_string(), "gone".to_string())]);
    assert!(
        no_sidecar_reason(
            &map(&[]),
            &map(&[("istio.io/rev", "gone")]),
            &map(&[]),
            &live
        )
        .is_some(),
        "a pod template naming no revision gets no sidecar"
    );
    assert!(
        no_sidecar_reason(
            &map(&[]),
            &map(&[("istio.io/rev", "prod")]),
            &map(&[]),
            &live
        )
        .is_none()
    );
    spec.namespace_selector = Some(serde_yaml::from_str("{matchLabels: {team: a}}").unwrap());
    assert!(selects_namespace(
        &spec,
        &map(&[("team", "a")]),
        &Revisions::any()
    ));
    assert!(!selects_namespace(
        &spec,
        &map(&[("istio-injection", "enabled")]),
        &Revisions::any()
    ));
}

#[test]
fn opt_out_names_the_rule() {
    assert!(opted_out(&map(&[(IGNORE_ANNOTATION, "sidecar-resources")])));
    assert!(opted_out(&map(&[(
        IGNORE_ANNOTATION,
        "mtls, sidecar-resources"
    )])));
    assert!(!opted_out(&map(&[(IGNORE_ANNOTATION, "mtls")])));
    assert!(!opted_out(&map(&[])));
}

#[test]
fn pacing_starts_at_most_max_rollouts() {
    let d = full();
    let targets = vec![
        workload("a", &[], Rollout::Complete),
        workload("b", &[], Rollout::Complete),
        workload("c", &[(PROXY_CPU, "50m")], Rollout::Complete),
    ];
    let p = plan(&d, &targets, &BTreeMap::new(), Some(1), true);
    assert_eq!(p[0].action, Action::Apply);
    assert!(matches!(p[1].action, Action::Held(_)), "{:?}", p[1]);
    assert!(matches!(p[2].action, Action::Held(_)));
    let p = plan(&d, &targets, &BTreeMap::new(), Some(2), true);
    let applied = p.iter().filter(|x| x.action == Action::Apply).count();
    assert_eq!(applied, 2);
}

#[test]
fn a_rollout_of_ours_in_progress_takes_the_slot() {
    let d = full();
    let ours: Vec<(&str, String)> = compliant_annotations(&d);
    let ours: Vec<(&str, &str)> = ours.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let targets = vec![
        workload(
            "a",
            &ours,
            Rollout::InProgress("1 of 2 replicas updated".into()),
        ),
        workload("b", &[], Rollout::Complete),
    ];
    let p = plan(&d, &targets, &BTreeMap::new(), Some(1), true);
    assert_eq!(p[0].action, Action::Compliant);
    assert!(p[0].rolling);
    assert!(matches!(p[1].action, Action::Held(_)), "{:?}", p[1]);
    // Done rolling: the next one starts.
    let targets = vec![
        workload("a", &ours, Rollout::Complete),
        workload("b", &[], Rollout::Complete),
    ];
    let p = plan(&d, &targets, &BTreeMap::new(), Some(1), true);
    assert_eq!(p[1].action, Action::Apply);
    // A rollout that is not ours (meshwarden's view: complete; the controller's: in
    // progress) takes no slot, and its template waits for it to finish.
    let foreign = Workload {
        rollout: Rollout::Complete,
        ..workload("a", &[], Rollout::InProgress("x".into()))
    };
    let targets = vec![foreign, workload("b", &[], Rollout::Complete)];
    let p = plan(&d, &targets, &BTreeMap::new(), Some(1), true);
    assert!(
        matches!(&p[0].action, Action::Held(why) if why.contains("rollout is in progress (x)")),
        "{:?}",
        p[0]
    );
    assert_eq!(p[1].action, Action::Apply);
}

#[test]
fn a_stalled_rollout_stops_the_pacing() {
    let d = full();
    let ours: Vec<(&str, String)> = compliant_annotations(&d);
    let ours: Vec<(&str, &str)> = ours.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let targets = vec![
        workload(
            "a",
            &ours,
            Rollout::Stalled("ProgressDeadlineExceeded".into()),
        ),
        workload("b", &[], Rollout::Complete),
    ];
    let p = plan(&d, &targets, &BTreeMap::new(), Some(5), true);
    assert!(p[0].stalled.is_some());
    assert!(matches!(&p[1].action, Action::Held(w) if w.contains("stalled")));
}

#[test]
fn pacing_off_writes_every_target_even_past_a_stall() {
    let d = full();
    let ours: Vec<(&str, String)> = compliant_annotations(&d);
    let ours: Vec<(&str, &str)> = ours.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut targets = vec![workload(
        "a",
        &ours,
        Rollout::Stalled("ProgressDeadlineExceeded".into()),
    )];
    for i in 0..150 {
        targets.push(workload(&format!("w{i}"), &[], Rollout::Complete));
    }
    let p = plan(&d, &targets, &BTreeMap::new(), None, true);
    assert!(p[0].stalled.is_some());
    assert_eq!(p.iter().filter(|d| d.action == Action::Apply).count(), 150);
    let paced = plan(&d, &targets, &BTreeMap::new(), Some(100), true);
    assert_eq!(
        paced.iter().filter(|d| d.action == Action::Apply).count(),
        0
    );
}

#[test]
fn audit_reports_quota_skips_and_equal_values_are_compliant() {
    let d = full();
    let targets = vec![
        workload("a", &[], Rollout::Complete),
        workload(
            "b",
            &[
                (PROXY_CPU, "0.1"),
                (PROXY_CPU_LIMIT, "1000m"),
                (PROXY_MEMORY, "128Mi"),
                (PROXY_MEMORY_LIMIT, "0.5Gi"),
            ],
            Rollout::Complete,
        ),
    ];
    let p = plan(&d, &targets, &BTreeMap::new(), Some(1), false);
    assert_eq!(p[0].action, Action::Reported);
    assert_eq!(p[0].deviations.len(), 4);
    assert_eq!(p[1].action, Action::Compliant, "{:?}", p[1].deviations);
    let unfit = BTreeMap::from([("apps".to_string(), vec!["quota".to_string()])]);
    let p = plan(&d, &targets, &unfit, Some(1), true);
    assert!(matches!(p[0].action, Action::Skipped(_)));
    assert_eq!(p[1].action, Action::Compliant);
}

#[test]
fn patch_holds_exactly_the_five_annotations() {
    let d = full();
    let p = patch(&workload("a", &[("keep", "me")], Rollout::Complete), &d, 7);
    let ann = p["spec"]["template"]["metadata"]["annotations"]
        .as_object()
        .unwrap();
    assert_eq!(ann.len(), 5);
    assert_eq!(ann[PROXY_MEMORY_LIMIT], "512Mi");
    assert_eq!(ann[HASH_ANNOTATION], d.hash().as_str());
    assert_eq!(p["kind"], "Deployment");
    assert!(p["spec"].as_object().unwrap().len() == 1);
    // The generation the write produces, on the workload's metadata (no rollout of its own).
    assert_eq!(
        p["metadata"]["annotations"],
        json!({GENERATION_ANNOTATION: "7"})
    );
}

#[test]
fn quota_and_limit_range_fit() {
    let d = full();
    let w = workload("a", &[], Rollout::Complete);
    let quota: ResourceQuota = serde_yaml::from_str(
        "metadata: {name: q}\nspec: {hard: {limits.memory: 1Gi, requests.cpu: '10'}}\nstatus: {used: {limits.memory: 256Mi}}",
    )
    .unwrap();
    // 2 replicas x 512Mi + a 512Mi surge pod + 256Mi used > 1Gi.
    let problems = namespace_fit(&d, &[&w], &[], std::slice::from_ref(&quota));
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("limits.memory"), "{problems:?}");
    // Already at 256Mi per pod: 2 x 256Mi + 512Mi surge + 256Mi used = 1280Mi > 1Gi still.
    let w2 = workload("a", &[(PROXY_MEMORY_LIMIT, "256Mi")], Rollout::Complete);
    assert_eq!(
        namespace_fit(&d, &[&w2], &[], std::slice::from_ref(&quota)).len(),
        1
    );
    let roomy: ResourceQuota =
        serde_yaml::from_str("metadata: {name: q}\nspec: {hard: {memory: 8Gi, limits.cpu: '8'}}")
            .unwrap();
    assert!(namespace_fit(&d, &[&w], &[], &[roomy]).is_empty());
    assert!(
        namespace_fit(&d, &[], &[], &[quota]).is_empty(),
        "nothing to change, nothing to fit"
    );
    let lr: LimitRange = serde_yaml::from_str(
        "metadata: {name: lr}\nspec: {limits: [{type: Container, max: {memory: 256Mi}, min: {cpu: 200m}}]}",
    )
    .unwrap();
    let problems = namespace_fit(&d, &[&w], &[lr], &[]);
    assert_eq!(problems.len(), 2, "{problems:?}");
}

fn meta_with(fields: serde_json::Value) -> ObjectMeta {
    ObjectMeta {
        managed_fields: Some(vec![ManagedFieldsEntry {
            manager: Some("meshwarden".into()),
            operation: Some("Apply".into()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

#[test]
fn fields_of_the_ha_rule_are_recognised() {
    let ours = meta_with(
        json!({"f:spec": {"f:template": {"f:metadata": {"f:annotations": {"f:sidecar.istio.io/proxyCPU": {}, "f:meshwarden.io/sidecar-resources": {}}}}}}),
    );
    assert!(!owned_by_other_rule(&ours));
    let with_generation = meta_with(
        json!({"f:metadata": {"f:annotations": {"f:meshwarden.io/sidecar-generation": {}}}, "f:spec": {"f:template": {"f:metadata": {"f:annotations": {"f:meshwarden.io/sidecar-resources": {}}}}}}),
    );
    assert!(!owned_by_other_rule(&with_generation));
    // The upgrades section's restart is no other rule's write either.
    let restarted = meta_with(
        json!({"f:metadata": {"f:annotations": {"f:meshwarden.io/restart-generation": {}}}, "f:spec": {"f:template": {"f:metadata": {"f:annotations": {"f:kubectl.kubernetes.io/restartedAt": {}}}}}}),
    );
    assert!(!owned_by_other_rule(&restarted));
    let labels = meta_with(json!({"f:metadata": {"f:labels": {"f:x": {}}}}));
    assert!(owned_by_other_rule(&labels));
    let ha = meta_with(json!({"f:spec": {"f:replicas": {}}}));
    assert!(owned_by_other_rule(&ha));
    let ha_tpl = meta_with(json!({"f:spec": {"f:template": {"f:spec": {"f:affinity": {}}}}}));
    assert!(owned_by_other_rule(&ha_tpl));
    assert!(!owned_by_other_rule(&ObjectMeta::default()));
}

#[test]
fn pod_drift_counts_running_proxies_with_other_resources() {
    let d = full();
    let pod = |name: &str, owner: &str, cpu: &str| -> Pod {
        serde_yaml::from_str(&format!(
            "metadata: {{name: {name}, labels: {{pod-template-hash: abc}}, ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: {owner}-abc, uid: u}}]}}\nspec: {{containers: [{{name: app}}, {{name: istio-proxy, resources: {{requests: {{cpu: {cpu}, memory: 128Mi}}, limits: {{cpu: '1', memory: 512Mi}}}}}}]}}"
        ))
        .unwrap()
    };
    let ns = NamespaceObservation {
        name: "apps".into(),
        labels: map(&[("istio-injection", "enabled")]).into(),
        pods: [
            pod("a-1", "a", "100m"),
            pod("a-2", "a", "200m"),
            pod("b-1", "b", "200m"),
        ]
        .iter()
        .map(|p| Arc::new(PodFacts::from(p)))
        .collect(),
        ..Default::default()
    };
    let excluded = BTreeSet::from([("apps".to_string(), Kind::Deployment, "b".to_string())]);
    let drift = pod_drift(&d, &[ns], &excluded, &Revisions::any());
    assert_eq!(drift["apps"].pods, 1);
    assert_eq!(drift["apps"].names(), "a-2");
}

#[test]
fn facts_keep_what_the_rule_reads() {
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "a", "namespace": "apps", "generation": 4,
            "labels": {"app": "a"},
            "annotations": {IGNORE_ANNOTATION: "mtls", "kubectl.kubernetes.io/last-applied-configuration": "{...}"},
            "managedFields": [
                {"manager": "helm", "operation": "Apply", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {"f:metadata": {"f:annotations": {
                    "f:sidecar.istio.io/proxyCPU": {}, "f:other": {}}}}}}},
                {"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:spec": {"f:paused": {}}}},
                {"manager": "meshwarden", "operation": "Apply", "fieldsType": "FieldsV1",
                 "time": "2026-01-01T00:00:00Z",
                 "fieldsV1": {"f:spec": {"f:template": {"f:metadata": {"f:annotations": {
                    "f:sidecar.istio.io/proxyMemory": {}}}}}}}
            ]},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "a"}},
            "template": {"metadata": {"labels": {"app": "a", INJECT: "true"},
                    "annotations": {PROXY_CPU: "50m", "prometheus.io/scrape": "true"}},
                "spec": {"containers": [{"name": "app", "image": "x", "env": [{"name": "A", "value": "b"}],
                    "resources": {"requests": {"cpu": "1"}}}]}}},
        "status": {"observedGeneration": 4, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3}
    }))
    .unwrap();
    let f = WorkloadFacts::from(&d);
    assert_eq!(f.foreign_owners, vec!["helm".to_string()]);
    assert_eq!(f.template_annotations, small(&[(PROXY_CPU, "50m")]));
    assert_eq!(f.template_labels, small(&[(INJECT, "true")]));
    assert_eq!(
        (f.kind, f.name.as_str(), f.generation, f.replicas),
        (Kind::Deployment, "a", 4, 3)
    );
    assert_eq!(f.rollout, Rollout::Complete);
    assert_eq!(f.other_containers.get("requests.cpu"), Some(&1000));
    assert!(!f.opted_out && !f.other_rule);
    assert_eq!(f.written_at, Some("2026-01-01T00:00:00Z".parse().unwrap()));
    let ns = NamespaceObservation {
        name: "apps".into(),
        labels: map(&[("istio-injection", "enabled")]).into(),
        workloads: vec![vec![Arc::new(f)].into()],
        ..Default::default()
    };
    let c = classify(&[ns], jiff::Timestamp::now(), &Revisions::any());
    assert_eq!(c.targets.len(), 1);
    assert_eq!(c.targets[0].id(), "Deployment/apps/a");

    // A cache entry parses the whole object and keeps only identity and facts.
    let entry: CachedWorkload<Deployment> = serde_json::from_value(json!({
        "metadata": {"name": "b", "namespace": "apps", "resourceVersion": "9",
            "annotations": {IGNORE_ANNOTATION: "sidecar-resources"}},
        "spec": {"selector": {}, "template": {"spec": {"containers": []}}}
    }))
    .unwrap();
    assert!(entry.facts.opted_out);
    assert!(entry.metadata.annotations.is_none());
    assert_eq!(entry.metadata.resource_version.as_deref(), Some("9"));
}

#[test]
fn pod_facts_keep_their_drift() {
    let p: CachedPod = serde_yaml::from_str(
        "metadata: {name: a-1, namespace: apps, labels: {pod-template-hash: abc, app: a}, annotations: {sidecar.istio.io/status: x}, ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: a-abc, uid: u}]}\nspec: {containers: [{name: app, image: x}, {name: istio-proxy, image: y, resources: {requests: {cpu: 10m, memory: 128Mi}, limits: {cpu: '1', memory: 512Mi}}}]}\nstatus: {phase: Running}",
    )
    .unwrap();
    assert_eq!(p.facts.owner, Some((Kind::Deployment, "a".to_string())));
    assert!(p.facts.labels.is_empty() && p.facts.annotations.is_empty());
    assert_eq!(
        p.facts.proxy,
        Some([
            Some(10),
            Some(1000),
            Some(128 * 1024 * 1024 * 1000),
            Some(512 * 1024 * 1024 * 1000)
        ])
    );
    let ns = NamespaceObservation {
        name: "apps".into(),
        labels: map(&[("istio-injection", "enabled")]).into(),
        pods: vec![p.facts.clone()].into(),
        ..Default::default()
    };
    let drift = pod_drift(&full(), &[ns], &BTreeSet::new(), &Revisions::any());
    assert_eq!(drift["apps"].names(), "a-1");
}

#[test]
fn a_write_the_cache_has_not_seen_is_read_as_written() {
    let d = full();
    let key = (Kind::Deployment, "apps".to_string(), "a".to_string());
    let mut written = HashMap::from([(key.clone(), (5, Instant::now()))]);
    assert_eq!(pending_write(&mut written, key.clone(), 4), Some(5));
    let mut cached = (*workload("a", &[(PROXY_CPU, "1")], Rollout::Complete).facts).clone();
    cached.generation = 4;
    let seen = cached.written(5, &d);
    assert_eq!(seen.generation, 5);
    assert_eq!(seen.written_generation, Some(5));
    assert!(deviations(&d, &seen.template_annotations).is_empty());
    assert_eq!(
        seen.template_annotations.value(HASH_ANNOTATION),
        Some(d.hash().as_str())
    );
    assert!(matches!(seen.rollout, Rollout::InProgress(_)));
    // Caught up: forgotten.
    assert_eq!(pending_write(&mut written, key.clone(), 5), None);
    assert!(written.is_empty());
}

#[test]
fn pod_drift_keeps_a_count_and_the_first_names_only() {
    let mut d = PodDrift::default();
    for name in ["e", "b", "d", "a", "c", "b2"] {
        d.add(name);
    }
    assert_eq!(d.pods, 6);
    assert_eq!(d.first, ["a", "b", "b2"]);
    assert_eq!(d.names(), "a, b, b2 and 3 more");
    let mut one = PodDrift::default();
    one.add("x");
    assert_eq!(one.names(), "x");
}
