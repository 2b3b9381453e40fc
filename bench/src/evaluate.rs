//! One evaluation of the sidecars section from its watch caches, in process (issue 13): the
//! stores filled with N namespaces, D Deployments (half of them carrying the declared values)
//! and P running pods as the operator's watches would hold them, then E evaluations timed one
//! by one, with the heap growth they cause. No API server: this isolates the per-event cost
//! that `scale` measures as CPU and drift latency. Then the upgrades section's count of the
//! running pods over the same caches: every pod counted anew, and after one pod event with the
//! other namespaces' counts kept (issue 29).
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{LimitRange, Namespace, Pod, ResourceQuota};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::watcher::Event;
use meshwarden::api::{Enforcement, MeshPolicy};
use meshwarden::istio::Revisions;
use meshwarden::rules::sidecars::{
    self, CachedPod, CachedWorkload, Covered, Memo, PodFacts, WorkloadFacts, desired, evaluate_with,
};
use meshwarden::rules::upgrades::{self, PodMemo};
use serde_json::json;

use crate::sidecars::{DECLARED, REPLICAS, deploy_name, deployment, ns_name, pod, proc_status_kib};

/// A store holding `items`, as a watch's initial list leaves it.
fn store<K>(items: impl IntoIterator<Item = K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    filled(items, |_| {}).0
}

/// [`store`] and its writer, which applies later watch events; `index` receives the same
/// events (as the controller's by-namespace index does).
fn filled<K>(items: impl IntoIterator<Item = K>, index: impl Fn(&Event<K>)) -> (Store<K>, Writer<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let (reader, mut writer) = reflector::store();
    let mut apply = |e: Event<K>| {
        index(&e);
        writer.apply_watcher_event(&e);
    };
    apply(Event::Init);
    for item in items {
        apply(Event::InitApply(item));
    }
    apply(Event::InitDone);
    (reader, writer)
}

pub fn run(namespaces: usize, deployments: usize, pods: usize, evaluations: usize) {
    println!(
        "evaluate: {namespaces} namespaces, {deployments} Deployments, {pods} running pods; {evaluations} evaluations of the sidecars section from its caches"
    );
    // glibc with one arena, as in the runs recorded in docs/benchmarks.md before the operator's
    // binary moved to mimalloc (src/allocator.rs): this compares evaluations with each other.
    // SAFETY: called before any other thread allocates here.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let policy: MeshPolicy = serde_yaml::from_str(
        "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: scale}\nspec:\n  enforcement: Enforce\n  sidecars:\n    pacing: 'Off'\n    resources: {requests: {cpu: 100m, memory: 128Mi}, limits: {cpu: '1', memory: 512Mi}}\n",
    )
    .expect("policy");
    let spec = policy.spec.sidecars.clone().expect("sidecars");
    let want = desired(&spec.resources).expect("declared resources");
    let ns_store = store((0..namespaces).map(|i| {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns_name(i),
            "labels": {"istio-injection": "enabled", "kubernetes.io/metadata.name": ns_name(i),
                       "team": format!("team-{}", i % 40)}}}))
        .expect("namespace");
        PartialObjectMeta::<Namespace> {
            types: None,
            metadata: ns.metadata,
            _phantom: Default::default(),
        }
    }));
    // `rolled_out`: the Deployment controller reports the generation rolled out (the other
    // series have no controller, as in `scale`).
    let cached_deployment = |i: usize, declared: bool, generation: i64, rolled_out: bool| {
        let mut d: Deployment = deployment(&ns_name(i % namespaces), &deploy_name(i));
        if rolled_out {
            d.status = Some(
                serde_json::from_value(json!({"observedGeneration": generation,
                    "replicas": REPLICAS, "updatedReplicas": REPLICAS, "availableReplicas": REPLICAS,
                    "conditions": [{"type": "Progressing", "status": "True",
                                    "reason": "NewReplicaSetAvailable"}]}))
                .expect("status"),
            );
        }
        if declared && let Some(meta) = d.spec.as_mut().and_then(|s| s.template.metadata.as_mut()) {
            let ann = meta.annotations.get_or_insert_default();
            for (k, v) in DECLARED {
                ann.insert(k.into(), v.into());
            }
        }
        d.metadata.generation = Some(generation);
        CachedWorkload::<Deployment>::new(d.metadata.clone(), WorkloadFacts::from(&d))
    };
    let cached_pod = |i: usize| {
        let d = i % deployments;
        let p: Pod = pod(&ns_name(d % namespaces), &deploy_name(d), i);
        CachedPod::new(p.metadata.clone(), PodFacts::from(&p))
    };
    let indexes = sidecars::Indexes::default();
    let (deploy_store, mut deploy_writer) = filled(
        (0..deployments).map(|i| cached_deployment(i, i % 2 == 0, 1, false)),
        |e| indexes.deployments.apply(e),
    );
    indexes.pods.apply(&Event::<CachedPod>::Init);
    for i in 0..pods {
        indexes.pods.apply(&Event::InitApply(cached_pod(i)));
    }
    indexes.pods.apply(&Event::<CachedPod>::InitDone);
    let cache = sidecars::Cache::new(
        ns_store,
        deploy_store,
        store(std::iter::empty()),
        store(std::iter::empty()),
        store(std::iter::empty::<LimitRange>()),
        store(std::iter::empty::<ResourceQuota>()),
    )
    .indexed(indexes.clone());
    let revisions = Revisions::any();
    let pid = std::process::id();
    let before = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let mut times = Vec::with_capacity(evaluations);
    let mut last = None;
    let run = |memo: &mut Memo| {
        let t = Instant::now();
        let Covered { namespaces, .. } = sidecars::observe_cached(&cache, &spec, &want, &revisions);
        let e = evaluate_with(
            memo,
            &namespaces,
            &want,
            &spec,
            policy.spec.enforcement == Enforcement::Enforce,
            &revisions,
            jiff::Timestamp::now(),
            None,
            None,
        );
        (t.elapsed(), e, memo.last_decided)
    };
    // Every namespace decided anew (a fresh memo each time): the cost of the first reconcile,
    // and of one after the declared values changed.
    for _ in 0..evaluations {
        let (took, e, _) = run(&mut Memo::default());
        times.push(took);
        last = Some(e);
    }
    // As in a reconcile after a drift: one Deployment and one pod changed by watch events
    // (in other namespaces each time) since the last evaluation, whose parts are kept.
    let mut memo = Memo::default();
    run(&mut memo);
    let mut kept_times = Vec::with_capacity(evaluations);
    let mut decided = 0;
    for round in 0..evaluations {
        let i = (round * 7919) % deployments;
        let d = Event::Apply(cached_deployment(
            i,
            round % 2 == 1,
            2 + round as i64,
            false,
        ));
        indexes.deployments.apply(&d);
        deploy_writer.apply_watcher_event(&d);
        indexes
            .pods
            .apply(&Event::Apply(cached_pod((round * 104_729) % pods)));
        let (took, _, n) = run(&mut memo);
        kept_times.push(took);
        decided += n;
    }
    // Converged, as a cluster is between drifts: every Deployment carries the declared values
    // and its controller reports it rolled out; one Deployment (keeping them) and one pod
    // replaced before each evaluation.
    for i in 0..deployments {
        let d = Event::Apply(cached_deployment(i, true, 2, true));
        indexes.deployments.apply(&d);
        deploy_writer.apply_watcher_event(&d);
    }
    run(&mut memo);
    let mut converged_times = Vec::with_capacity(evaluations);
    let mut settled = 0;
    for round in 0..evaluations {
        let i = (round * 7919 + 1) % deployments;
        let d = Event::Apply(cached_deployment(i, true, 3 + round as i64, true));
        indexes.deployments.apply(&d);
        deploy_writer.apply_watcher_event(&d);
        indexes
            .pods
            .apply(&Event::Apply(cached_pod((round * 104_729 + 1) % pods)));
        let (took, e, _) = run(&mut memo);
        converged_times.push(took);
        settled = e.classified.settled;
    }
    let upgrades = upgrades_series(&cache, evaluations, |round| {
        indexes
            .pods
            .apply(&Event::Apply(cached_pod((round * 7_919 + 13) % pods)));
    });
    let after = proc_status_kib(pid, "VmRSS:").unwrap_or(0);
    let peak = proc_status_kib(pid, "VmHWM:").unwrap_or(0);
    times.sort();
    let e = last.expect("one evaluation at least");
    println!(
        "  {} targets, {} to write, {} namespaces with pod drift ({} pods)",
        e.classified.targets.len() + e.classified.settled,
        e.decisions
            .iter()
            .filter(|d| d.action == sidecars::Action::Apply)
            .count(),
        e.pod_drift.len(),
        e.pod_drift.values().map(|d| d.pods).sum::<usize>()
    );
    println!(
        "  one evaluation, every namespace decided: min {:.1} ms, median {:.1} ms, max {:.1} ms",
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1])
    );
    kept_times.sort();
    println!(
        "  one evaluation after a Deployment and a pod event, the other namespaces' parts kept: min {:.1} ms, median {:.1} ms, max {:.1} ms ({:.1} namespaces decided per evaluation)",
        ms(kept_times[0]),
        ms(kept_times[kept_times.len() / 2]),
        ms(kept_times[kept_times.len() - 1]),
        decided as f64 / evaluations as f64
    );
    converged_times.sort();
    println!(
        "  converged ({settled} targets settled): one evaluation after a Deployment and a pod event: min {:.2} ms, median {:.2} ms, max {:.2} ms",
        ms(converged_times[0]),
        ms(converged_times[converged_times.len() / 2]),
        ms(converged_times[converged_times.len() - 1])
    );
    println!("{upgrades}");
    println!(
        "  RSS with the caches filled {:.1} MiB, after the evaluations {:.1} MiB, peak (VmHWM) {:.1} MiB",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The upgrades section's count of the running pods in `cache`, `evaluations` times: every pod
/// counted anew (as each evaluation did before the counts were kept per namespace; the
/// namespaces' labels shared, which that code copied too), then after each `event(round)`
/// with the other namespaces' counts kept. Returns the lines to print.
fn upgrades_series(cache: &sidecars::Cache, evaluations: usize, event: impl Fn(usize)) -> String {
    let revisions = Revisions::any();
    let labelled = sidecars::namespace_labels(cache);
    let selected: BTreeSet<&str> = labelled.iter().map(|(n, _)| n.as_str()).collect();
    let index = &cache.by_namespace.pods;
    let mut anew = Vec::with_capacity(evaluations);
    let mut counted_pods = 0;
    for _ in 0..evaluations {
        let t = Instant::now();
        let running: Vec<(String, Arc<PodFacts>)> = index
            .read()
            .iter()
            .map(|(ns, p)| (ns.to_string(), p.clone()))
            .collect();
        let refs: Vec<(&str, &PodFacts)> = running
            .iter()
            .map(|(ns, p)| (ns.as_str(), p.as_ref()))
            .collect();
        counted_pods = upgrades::plan(1, &revisions, &labelled, &refs).pods;
        anew.push(t.elapsed());
    }
    let mut memo = PodMemo::default();
    memo.parts(1, &revisions, &selected, &index.read());
    let (mut kept, mut counted) = (Vec::with_capacity(evaluations), 0);
    for round in 0..evaluations {
        event(round);
        let t = Instant::now();
        let parts = memo.parts(1, &revisions, &selected, &index.read());
        let plan = upgrades::plan_parts(1, &revisions, &labelled, parts.iter().map(Arc::as_ref));
        kept.push(t.elapsed());
        assert_eq!(plan.pods, counted_pods, "the kept counts hold every pod");
        counted += memo.last_counted;
    }
    anew.sort();
    kept.sort();
    let line = |what: &str, t: &[Duration]| {
        format!(
            "  upgrades, {what}: min {:.2} ms, median {:.2} ms, max {:.2} ms",
            ms(t[0]),
            ms(t[t.len() / 2]),
            ms(t[t.len() - 1])
        )
    };
    format!(
        "{}\n{} ({:.1} namespaces counted per evaluation; {counted_pods} proxies)",
        line("every running pod counted anew", &anew),
        line(
            "after a pod event, the other namespaces' counts kept",
            &kept
        ),
        counted as f64 / evaluations as f64
    )
}
