use super::*;
use crate::istio::ProxyVersion;
use crate::rules::sidecars::{Budget, Gate, Kind, PROXY_IMAGE, Rollout, Strategy, WorkloadFacts};
use std::collections::BTreeSet;

mod memo;
mod restarts;

fn map(pairs: &[(&str, &str)]) -> Arc<BTreeMap<String, String>> {
    Arc::new(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// default 1.31-dev and canary 1.33.1 in istio-system; tag prod -> canary, tag old -> gone.
fn revisions() -> Revisions {
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    Revisions {
        live: [
            ("default".to_string(), set(&["istio-system"])),
            ("canary".to_string(), set(&["istio-system"])),
        ]
        .into(),
        tags: [
            ("prod".to_string(), "canary".to_string()),
            ("old".to_string(), "gone".to_string()),
        ]
        .into(),
        versions: [
            ("default".to_string(), set(&["1.31-dev"])),
            ("canary".to_string(), set(&["1.33.1"])),
        ]
        .into(),
        any: false,
        settling: Default::default(),
    }
}

fn pod(name: &str, owner: Option<&str>, rev: Option<&str>, version: Option<&str>) -> PodFacts {
    PodFacts {
        name: name.into(),
        owner: owner.map(|o| (Kind::Deployment, o.to_string())),
        labels: crate::compact::small_map(rev.map(|r| ("istio.io/rev", r.to_string()))),
        annotations: Default::default(),
        proxy: None,
        sidecar: version.map(|v| ProxyVersion {
            revision: rev.map(str::to_string),
            version: v.into(),
        }),
        placement: Default::default(),
        native_sidecar: false,
    }
}

fn spec(skew: i32) -> UpgradesSpec {
    serde_yaml::from_str(&format!("maxMinorSkew: {skew}")).unwrap()
}

#[test]
fn versions_parse_to_major_and_minor() {
    let m = |major, minor| Some(Minor { major, minor });
    assert_eq!(Minor::parse("1.31-dev"), m(1, 31));
    assert_eq!(Minor::parse("1.30.2"), m(1, 30));
    assert_eq!(Minor::parse("1.30.2-distroless"), m(1, 30));
    assert_eq!(Minor::parse("v1.29.0"), m(1, 29));
    assert_eq!(Minor::parse("1.22-alpha.9c1f"), m(1, 22));
    assert_eq!(Minor::parse("latest"), None);
    assert_eq!(Minor::parse("1"), None);
    assert_eq!(Minor::parse("1.x"), None);
    assert_eq!(Minor::parse(".31"), None);
    assert_eq!(Minor::parse("unknown"), None);
    let v = |s| Minor::parse(s).unwrap();
    assert_eq!(v("1.29.4").behind(v("1.31-dev")), 2);
    assert_eq!(v("1.31.0").behind(v("1.31-dev")), 0);
    assert_eq!(v("1.32.0").behind(v("1.31-dev")), -1);
    assert!(
        v("1.31.0").behind(v("2.0.0")) > 100,
        "a major version is many minors"
    );
    assert_eq!(
        istiod_version(&revisions(), "canary"),
        Some((v("1.33.1"), "1.33.1".to_string()))
    );
    assert_eq!(istiod_version(&revisions(), "gone"), None);
}

#[test]
fn proxies_are_counted_and_skew_is_judged_against_their_own_istiod() {
    let r = revisions();
    let pods = [
        pod("web-1", Some("web"), Some("default"), Some("1.31-dev")),
        pod("web-2", Some("web"), Some("default"), Some("1.31-dev")),
        // 1.33.1 - 1.31 = 2 > 1.
        pod("old-1", Some("old"), Some("canary"), Some("1.31-dev")),
        pod("old-2", Some("old"), Some("canary"), Some("1.31-dev")),
        // 1 behind: allowed.
        pod("near-1", Some("near"), Some("canary"), Some("1.32.0")),
        // Newer than its istiod.
        pod("ahead-1", None, Some("default"), Some("1.32.0")),
        // No sidecar: not a proxy.
        pod("plain", Some("plain"), None, None),
    ];
    let refs: Vec<(&str, &PodFacts)> = pods.iter().map(|p| ("apps", p)).collect();
    let p = plan(1, &r, &[], &refs);
    assert_eq!(p.pods, 6);
    assert_eq!(p.outdated_pods, 3);
    let counts: Vec<(&str, &str, i32)> = p
        .status
        .proxies
        .iter()
        .map(|c| (c.revision.as_str(), c.version.as_str(), c.pods))
        .collect();
    assert_eq!(
        counts,
        [
            ("canary", "1.31-dev", 2),
            ("canary", "1.32.0", 1),
            ("default", "1.31-dev", 2),
            ("default", "1.32.0", 1)
        ]
    );
    let skewed: Vec<&str> = p
        .findings
        .iter()
        .filter(|f| f.reason == reasons::PROXY_VERSION_SKEW)
        .map(|f| f.object.as_str())
        .collect();
    assert_eq!(skewed, ["Pod/apps/ahead-1", "Deployment/apps/old"]);
    let old = &p.findings[p
        .findings
        .iter()
        .position(|f| f.object == "Deployment/apps/old")
        .unwrap()];
    assert!(
        old.message.contains("2 running pod(s)")
            && old
                .message
                .contains("2 minor version(s) behind istiod canary (1.33.1)"),
        "{}",
        old.message
    );
    assert!(
        p.outdated
            .contains_key(&("apps".into(), Some(Kind::Deployment), "old".into()))
    );
    // Newer than its istiod (after a rollback of istiod): reported, never restarted.
    assert!(
        !p.outdated
            .contains_key(&("apps".into(), None, "ahead-1".into()))
    );
    let ahead = p
        .findings
        .iter()
        .find(|f| f.object == "Pod/apps/ahead-1")
        .unwrap();
    assert!(
        ahead
            .message
            .contains("meshwarden never restarts these itself")
    );
    // The canary's istiod rolls out (a `helm upgrade` not finished, or stuck): the version
    // that serves is not known, so its proxies are not judged, and nothing is restarted.
    let mut rolling = r.clone();
    rolling.settling.insert("canary".into());
    let p2 = plan(1, &rolling, &[], &refs);
    assert!(
        !p2.outdated
            .contains_key(&("apps".into(), Some(Kind::Deployment), "old".into()))
    );
    assert_eq!(p2.outdated_pods, 1, "only the default revision's newer pod");
    // With a skew of 2 the canary pods are fine.
    let p = plan(2, &r, &[], &refs);
    assert_eq!(p.outdated_pods, 1);
    // The revision falls back to the pod label, a tag resolved to its revision.
    let mut tagged = pod("t", None, Some("prod"), Some("1.31-dev"));
    tagged.sidecar.as_mut().unwrap().revision = None;
    assert_eq!(proxy_revision(&tagged, &r), "canary");
    let unlabelled = pod("u", None, None, Some("1.31-dev"));
    assert_eq!(proxy_revision(&unlabelled, &r), "default");
}

#[test]
fn revisions_and_tags_that_name_nothing_are_violations() {
    let r = revisions();
    let namespaces = vec![
        ("shop".to_string(), map(&[("istio-injection", "enabled")])),
        (
            "both".to_string(),
            map(&[("istio-injection", "enabled"), ("istio.io/rev", "canary")]),
        ),
        ("missing".to_string(), map(&[("istio.io/rev", "retired")])),
        ("via-tag".to_string(), map(&[("istio.io/rev", "prod")])),
        // The tag's webhook exists but points at no live injector: the tag's violation, and
        // the namespace's too (its pods get no sidecar).
        ("dangling".to_string(), map(&[("istio.io/rev", "old")])),
    ];
    let pods = [
        pod("gone-1", Some("legacy"), Some("retired"), Some("1.29.0")),
        // A pod label naming nothing, and no sidecar therefore.
        pod("nolabel", Some("lost"), Some("nowhere"), None),
    ];
    let refs: Vec<(&str, &PodFacts)> = pods.iter().map(|p| ("apps", p)).collect();
    let p = plan(1, &r, &namespaces, &refs);
    let found: Vec<(&str, &str)> = p
        .findings
        .iter()
        .map(|f| (f.reason, f.object.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            (reasons::TAG_WITHOUT_REVISION, "RevisionTag/old"),
            (reasons::INJECTION_LABELS_CONFLICT, "Namespace/both"),
            (reasons::UNKNOWN_REVISION, "Namespace/missing"),
            (reasons::UNKNOWN_REVISION, "Namespace/dangling"),
            (reasons::REVISION_NOT_RUNNING, "Deployment/apps/legacy"),
            (reasons::UNKNOWN_REVISION, "Deployment/apps/lost"),
        ]
    );
    assert!(
        p.outdated
            .contains_key(&("apps".into(), Some(Kind::Deployment), "legacy".into()))
    );
    assert!(
        !p.outdated
            .contains_key(&("apps".into(), Some(Kind::Deployment), "lost".into()))
    );
    let tags: Vec<(&str, &str)> = p
        .status
        .tags
        .iter()
        .map(|t| (t.name.as_str(), t.revision.as_str()))
        .collect();
    assert_eq!(tags, [("old", "gone"), ("prod", "canary")]);
    // default (shop) and canary (both namespaces, via the tag) are in use.
    assert!(p.unused.is_empty(), "{:?}", p.unused);
}

#[test]
fn a_revision_only_idle_pods_name_is_reported() {
    let r = revisions();
    let namespaces = vec![("shop".to_string(), map(&[("istio-injection", "enabled")]))];
    let p = plan(1, &r, &namespaces, &[]);
    assert_eq!(p.unused, BTreeSet::from(["canary".to_string()]));
    let idle: IdlePods = [
        ("canary".to_string(), vec!["jobs/import-x1".to_string()]),
        ("default".to_string(), vec!["jobs/other".to_string()]),
    ]
    .into();
    let f = idle_revisions(&p.unused, &idle);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].object, "Revision/canary");
    assert_eq!(f[0].reason, reasons::REVISION_KEPT_BY_IDLE_PODS);
    assert!(f[0].message.contains("jobs/import-x1"), "{}", f[0].message);
    assert!(idle_revisions(&p.unused, &IdlePods::new()).is_empty());
}

#[test]
fn the_condition_names_the_most_urgent_finding() {
    let r = revisions();
    let namespaces = vec![
        ("shop".to_string(), map(&[("istio-injection", "enabled")])),
        (
            "both".to_string(),
            map(&[("istio-injection", "enabled"), ("istio.io/rev", "canary")]),
        ),
    ];
    let pods = [pod("old-1", Some("old"), Some("canary"), Some("1.31-dev"))];
    let refs: Vec<(&str, &PodFacts)> = pods.iter().map(|p| ("apps", p)).collect();
    let rep = report(&spec(1), &r, plan(1, &r, &namespaces, &refs));
    assert_eq!(rep.condition.status, Status::False);
    // The dangling tag comes before the skew and the labels.
    assert_eq!(rep.condition.reason, reasons::TAG_WITHOUT_REVISION);
    assert_eq!(rep.violations.len(), 3);
    assert_eq!((rep.targets, rep.compliant), (1, 0));
    let status = rep.upgrades.unwrap();
    assert_eq!(status.revisions.len(), 2);
    assert!(
        rep.condition.message.contains("canary (1.33.1)"),
        "{}",
        rep.condition.message
    );

    let mut clean = r.clone();
    clean.tags.remove("old");
    let pods = [pod("web-1", Some("web"), Some("default"), Some("1.31-dev"))];
    let refs: Vec<(&str, &PodFacts)> = pods.iter().map(|p| ("apps", p)).collect();
    let rep = report(&spec(1), &clean, plan(1, &clean, &namespaces[..1], &refs));
    assert_eq!(
        rep.condition.reason,
        reasons::COMPLIANT,
        "{}",
        rep.condition.message
    );
    assert_eq!((rep.targets, rep.compliant), (1, 1));

    let none = Revisions::default();
    let rep = report(&spec(1), &none, plan(1, &none, &[], &[]));
    assert_eq!(rep.condition.reason, reasons::NO_TARGETS);
}

fn facts(
    name: &str,
    generation: i64,
    restarted: Option<i64>,
    rollout: Rollout,
) -> Arc<WorkloadFacts> {
    Arc::new(WorkloadFacts {
        kind: Kind::Deployment,
        name: name.into(),
        labels: Default::default(),
        generation,
        replicas: 2,
        template_labels: Default::default(),
        template_annotations: Default::default(),
        opted_out: false,
        other_rule: false,
        written_at: None,
        written_generation: None,
        restart_generation: restarted,
        restart_opted_out: false,
        restart_target: None,
        foreign_owners: vec![],
        foreign_writes: Default::default(),
        other_containers: Default::default(),
        rollout,
        rolled_out_at: None,
        observed: true,
        strategy: Strategy::default(),
        pod_labels: Default::default(),
        allow_disruption: false,
        grace_seconds: None,
        drain: Default::default(),
    })
}

fn owner(name: &str) -> Owner {
    ("apps".into(), Some(Kind::Deployment), name.into())
}

#[test]
fn restarts_are_paced_and_a_stall_stops_them() {
    let now = jiff::Timestamp::now();
    let pending = Pending::default();
    let go = |_: &str, _: &WorkloadFacts| Gate::Go;
    let no_target = |_: &str, _: &WorkloadFacts| None;
    let rolling = Rollout::InProgress("1 of 2 replicas updated".into());
    let all = |ws: Vec<Arc<WorkloadFacts>>| -> Workloads {
        ws.into_iter()
            .map(|w| {
                let r = restart_rollout(&w, "apps", &pending, now);
                (("apps".to_string(), w.kind, w.name.clone()), (w, r))
            })
            .collect()
    };
    let outdated: Outdated = ["a", "b", "c", "d"]
        .iter()
        .map(|n| (owner(n), "behind".to_string()))
        .collect();
    // Nothing rolling: two slots.
    let ws = all(["a", "b", "c", "d"]
        .iter()
        .map(|n| facts(n, 3, None, Rollout::Complete))
        .collect());
    let p = plan_restarts(&outdated, &ws, 2, &go, &no_target);
    let d: Vec<&Restart> = p.decisions.iter().map(|(_, d)| d).collect();
    assert_eq!(d[0], &Restart::Now);
    assert_eq!(d[1], &Restart::Now);
    assert!(matches!(d[2], Restart::Held(w) if w.contains("maxConcurrentRestarts 2")));
    // a is restarting (meshwarden's generation, rolling): one slot left. b rolls because of
    // its owner (kubectl rollout restart, a helm upgrade): not restarted on top of that, and
    // it holds no slot.
    let ws = all(vec![
        facts("a", 4, Some(4), rolling.clone()),
        facts("b", 3, None, rolling.clone()),
        facts("c", 3, None, Rollout::Complete),
        facts("d", 3, None, Rollout::Complete),
    ]);
    let p = plan_restarts(&outdated, &ws, 2, &go, &no_target);
    let d: Vec<&Restart> = p.decisions.iter().map(|(_, d)| d).collect();
    let slot = Restart::Held(
        "waits for a restart slot (maxConcurrentRestarts 2, counting meshwarden's sidecar rollouts)"
            .into(),
    );
    assert_eq!(d[0], &Restart::Rolling);
    assert!(
        matches!(d[1], Restart::Held(w) if w.contains("its own rollout is in progress")),
        "{:?}",
        d[1]
    );
    assert_eq!(d[2..], [&Restart::Now, &slot]);
    assert_eq!(p.rolling, ["Deployment/apps/a"]);
    // A sidecar write of meshwarden rolling c: c is not restarted on top of it, and its
    // rollout takes a slot of the same budget.
    let mut written = (*facts("c", 5, None, rolling.clone())).clone();
    written.written_generation = Some(5);
    let ws = all(vec![
        facts("a", 4, Some(4), rolling.clone()),
        facts("b", 3, None, Rollout::Complete),
        Arc::new(written),
        facts("d", 3, None, Rollout::Complete),
    ]);
    let p = plan_restarts(&outdated, &ws, 2, &go, &no_target);
    let d: Vec<&Restart> = p.decisions.iter().map(|(_, d)| d).collect();
    assert_eq!(d[0], &Restart::Rolling);
    assert_eq!(d[1], &slot, "a and c's sidecar rollout fill both slots");
    assert!(matches!(d[2], Restart::Held(w) if w.contains("sidecar write is rolling it")));
    // The gate: a restart that gives no sidecar or rolls no pod is skipped, one that costs
    // availability is held and takes no slot.
    let gate = |_: &str, w: &WorkloadFacts| match w.name.as_str() {
        "a" => Gate::Skipped("no injector".into()),
        "b" => Gate::Held("Recreate".into()),
        _ => Gate::Go,
    };
    let ws = all(["a", "b", "c", "d"]
        .iter()
        .map(|n| facts(n, 3, None, Rollout::Complete))
        .collect());
    let p = plan_restarts(&outdated, &ws, 2, &gate, &no_target);
    let d: Vec<&Restart> = p.decisions.iter().map(|(_, d)| d).collect();
    assert_eq!(
        d,
        [
            &Restart::Skipped("no injector".into()),
            &Restart::Held("Recreate".into()),
            &Restart::Now,
            &Restart::Now
        ]
    );
    // a stalled: nothing else starts.
    let stalled = Rollout::Stalled("ProgressDeadlineExceeded".into());
    let ws = all(vec![
        facts("a", 4, Some(4), stalled),
        facts("b", 3, None, Rollout::Complete),
        facts("c", 3, None, Rollout::Complete),
        facts("d", 3, None, Rollout::Complete),
    ]);
    let p = plan_restarts(&outdated, &ws, 2, &go, &no_target);
    assert_eq!(p.stalled.len(), 1);
    assert!(
        p.decisions[1..]
            .iter()
            .all(|(_, d)| matches!(d, Restart::Held(w) if w.contains("stalled")))
    );
    // Restarted and complete but still outdated: never restarted again; opted out, HA-owned,
    // pods of no workload and unknown workloads are skipped.
    let mut opted = (*facts("b", 3, None, Rollout::Complete)).clone();
    opted.restart_opted_out = true;
    let mut ha = (*facts("c", 3, None, Rollout::Complete)).clone();
    ha.other_rule = true;
    let ws = all(vec![
        facts("a", 4, Some(4), Rollout::Complete),
        Arc::new(opted),
        Arc::new(ha),
    ]);
    let mut outdated = outdated;
    outdated.insert(("apps".into(), None, "bare".into()), "behind".into());
    let p = plan_restarts(&outdated, &ws, 2, &go, &no_target);
    let skipped = p
        .decisions
        .iter()
        .filter(|(_, d)| matches!(d, Restart::Skipped(_)))
        .count();
    assert_eq!(skipped, 5, "{:?}", p.decisions);
    // A restart this process wrote that the cache has not seen yet counts as rolling.
    pending.record((Kind::Deployment, "apps".into(), "b".into()), 4);
    let ws = all(vec![facts("b", 3, None, Rollout::Complete)]);
    assert!(matches!(
        ws.values().next().unwrap().1,
        Rollout::InProgress(_)
    ));
}

#[test]
fn a_restart_carries_only_the_restart_annotation_and_its_generation() {
    let p = restart::patch(
        Kind::StatefulSet,
        "apps",
        "db",
        "2026-01-01T00:00:00Z",
        7,
        None,
    );
    assert_eq!(
        p,
        serde_json::json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": "apps",
                "annotations": {"meshwarden.io/restart-generation": "7"}},
            "spec": {"template": {"metadata": {"annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"}}}},
        })
    );
}

/// ztunnel's pods run a container named `istio-proxy` too, but no injector put it there: they
/// are no sidecar proxy, never counted or outdated (a restart of the DaemonSet would cut every
/// node's connections and upgrade nothing). An injected pod of the same image is.
#[test]
fn ztunnel_pods_are_no_sidecar_proxies() {
    let pod = |annotations: serde_json::Value| -> PodFacts {
        let p: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "ztunnel-x", "namespace": "istio-system",
                         "annotations": annotations,
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                                              "name": "ztunnel", "uid": "u"}]},
            "spec": {"containers": [{"name": "istio-proxy",
                                     "image": "docker.io/istio/ztunnel:1.29.0-distroless"}]},
        }))
        .unwrap();
        PodFacts::from(&p)
    };
    let ztunnel = pod(serde_json::json!({}));
    assert_eq!(ztunnel.sidecar, None);
    let r = revisions();
    let p = plan(1, &r, &[], &[("istio-system", &ztunnel)]);
    assert_eq!((p.pods, p.outdated.len()), (0, 0), "{:?}", p.findings);
    let injected =
        pod(serde_json::json!({"sidecar.istio.io/status": "{\"revision\":\"default\"}"}));
    let p = plan(1, &r, &[], &[("istio-system", &injected)]);
    assert_eq!((p.pods, p.outdated.len()), (1, 1), "{:?}", p.findings);
}

/// A rollout that finished leaves its old pods stopping for their grace period: they are not
/// outdated proxies (restarting the workload for them would roll it a second time).
#[test]
fn pods_being_deleted_are_not_outdated() {
    let r = revisions();
    let mut stopping = pod("web-old", Some("web"), None, Some("1.29.0"));
    stopping.placement.terminating = true;
    let current = pod("web-new", Some("web"), None, Some("1.31.0"));
    let p = plan(1, &r, &[], &[("apps", &stopping), ("apps", &current)]);
    assert_eq!((p.pods, p.outdated.len()), (1, 0), "{:?}", p.findings);
    stopping.placement.terminating = false;
    let p = plan(1, &r, &[], &[("apps", &stopping), ("apps", &current)]);
    assert_eq!((p.pods, p.outdated.len()), (2, 1), "{:?}", p.findings);
}

/// The running-pod watch can deliver a finished rollout's old pods stopping after the
/// Deployment's completion: a restart waits out [`SETTLE_SECS`] from that completion.
#[test]
fn a_restart_waits_while_a_rollout_just_completed_settles() {
    let done: k8s_openapi::api::apps::v1::Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "generation": 2},
        "spec": {"replicas": 1, "selector": {}, "template": {}},
        "status": {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1,
            "availableReplicas": 1, "readyReplicas": 1,
            "conditions": [
                {"type": "Available", "status": "True", "lastUpdateTime": "2026-12-08T01:00:00Z"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable",
                 "lastUpdateTime": "2026-12-08T02:00:00Z", "lastTransitionTime": "2026-12-08T01:59:00Z"}]},
    }))
    .unwrap();
    let w = WorkloadFacts::from(&done);
    let at: jiff::Timestamp = "2026-12-08T02:00:00Z".parse().unwrap();
    // A Deployment's first rollout replaced no pod: nothing to wait for.
    let first = WorkloadFacts {
        generation: 1,
        ..w.clone()
    };
    assert!(just_rolled_out(&first, at).is_none());
    assert_eq!(w.rolled_out_at, Some(at));
    let after = |s: i64| at + jiff::SignedDuration::from_secs(s);
    let (why, left) = just_rolled_out(&w, after(4)).unwrap();
    assert!(why.contains("its rollout completed 4s ago"), "{why}");
    assert_eq!(left, std::time::Duration::from_secs(11));
    // The controller's clock a little ahead of meshwarden's: waits the whole time.
    assert_eq!(
        just_rolled_out(&w, after(-3)).map(|(_, l)| l),
        Some(std::time::Duration::from_secs(15))
    );
    assert!(just_rolled_out(&w, after(SETTLE_SECS)).is_none());
    // Rolling, or never rolled out: no completion time.
    let mut rolling = done.clone();
    rolling
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()[1]
        .reason = Some("ReplicaSetUpdated".into());
    assert_eq!(WorkloadFacts::from(&rolling).rolled_out_at, None);
}
