//! Tests of the mTLS rule's pod caches and the events that trigger the hold.

use super::*;

type Ev = Result<watcher::Event<PodMeta>, watcher::Error>;

/// A watcher factory whose every attempt is a channel the test feeds.
#[allow(clippy::type_complexity)]
fn scripted() -> (
    impl Fn() -> futures::channel::mpsc::UnboundedReceiver<Ev> + Send + 'static,
    Arc<std::sync::Mutex<Vec<futures::channel::mpsc::UnboundedSender<Ev>>>>,
) {
    let senders = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = senders.clone();
    let make = move || {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        s.lock().unwrap().push(tx);
        rx
    };
    (make, senders)
}

async fn attempt(
    senders: &std::sync::Mutex<Vec<futures::channel::mpsc::UnboundedSender<Ev>>>,
    n: usize,
) -> futures::channel::mpsc::UnboundedSender<Ev> {
    loop {
        if let Some(tx) = senders.lock().unwrap().get(n) {
            return tx.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn meta(name: &str) -> PodMeta {
    serde_json::from_value(json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {"name": name, "namespace": "n"},
    }))
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_hold_is_not_decided_before_the_pod_watch_lists_nor_after_it_failed() {
    let health = Arc::new(Health::default());
    let (pods, pod_attempts) = scripted();
    let (host, host_attempts) = scripted();
    let (cache, events) = PodCache::from_watches(&health, pods, host);
    tokio::spawn(events.for_each(|_| async {}));
    // The watches start with the cache; until both have listed it is not ready.
    assert!(!cache.ready(Duration::from_millis(100)).await);
    let host = attempt(&host_attempts, 0).await;
    host.unbounded_send(Ok(watcher::Event::Init)).unwrap();
    host.unbounded_send(Ok(watcher::Event::InitDone)).unwrap();
    let pods = attempt(&pod_attempts, 0).await;
    pods.unbounded_send(Ok(watcher::Event::Init)).unwrap();

    // Still listing: no answer, however long the reconcile waits.
    let err = cache.current(Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(
        crate::status::reasons::of_error(&crate::error::Error::Cache(err.clone())),
        crate::status::reasons::CACHE_NOT_SYNCED
    );
    assert_eq!(err.watch, PODS_WATCH);

    pods.unbounded_send(Ok(watcher::Event::InitApply(meta("a"))))
        .unwrap();
    pods.unbounded_send(Ok(watcher::Event::InitDone)).unwrap();
    cache.current(Duration::from_secs(10)).await.unwrap();
    assert_eq!(cache.pods().len(), 1);

    // The watch fails (API server unavailable): the store still holds pod a, but may
    // miss changes until it lists again, so the hold is not decided from it.
    let unavailable = kube::Error::Api(Box::new(kube::core::Status {
        code: 503,
        ..Default::default()
    }));
    pods.unbounded_send(Err(watcher::Error::WatchFailed(unavailable)))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let err = cache.current(Duration::from_millis(100)).await.unwrap_err();
    assert_eq!(
        crate::status::reasons::of_error(&crate::error::Error::Cache(err.clone())),
        crate::status::reasons::CACHE_NOT_SYNCED
    );

    // Listed again: current.
    let again = attempt(&pod_attempts, 1).await;
    again.unbounded_send(Ok(watcher::Event::Init)).unwrap();
    again.unbounded_send(Ok(watcher::Event::InitDone)).unwrap();
    // A failed watch is not waited for (a reconcile answers Unknown at once): wait for
    // the relist here.
    for _ in 0..200 {
        if health.readable(&[PODS_WATCH, HOST_PODS_WATCH]).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cache.current(Duration::from_secs(10)).await.unwrap();
    assert!(health.readable(&[PODS_WATCH, HOST_PODS_WATCH]).is_ok());
}

/// Drives the cache's pod watch with `events` (the host-network watch lists nothing) and
/// returns the names of the pods the trigger stream passed on.
async fn passed_by_the_cache(events: Vec<Ev>) -> Vec<String> {
    let health = Arc::new(Health::default());
    let (pods, pod_attempts) = scripted();
    let (host, host_attempts) = scripted();
    let (_cache, stream) = PodCache::from_watches(&health, pods, host);
    let out = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = out.clone();
    let task = tokio::spawn(stream.for_each(move |r| {
        if let Ok(p) = r {
            seen.lock().unwrap().push(p.name_any());
        }
        async {}
    }));
    let host = attempt(&host_attempts, 0).await;
    host.unbounded_send(Ok(watcher::Event::Init)).unwrap();
    host.unbounded_send(Ok(watcher::Event::InitDone)).unwrap();
    let pods = attempt(&pod_attempts, 0).await;
    for ev in events {
        pods.unbounded_send(ev).unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    task.abort();
    out.lock().unwrap().clone()
}

fn injected(name: &str) -> PodMeta {
    let mut p = meta(name);
    p.metadata.annotations = Some([(SIDECAR_STATUS.to_string(), String::new())].into());
    p
}

/// A pod without a sidecar that was deleted is forgotten: a later pod of the same name
/// with a sidecar (a Job's next run, injected now) is no change of the hold.
#[tokio::test]
async fn a_deleted_pod_without_a_sidecar_is_forgotten() {
    let passed = passed_by_the_cache(vec![
        Ok(watcher::Event::Init),
        Ok(watcher::Event::InitDone),
        Ok(watcher::Event::Apply(meta("job-1"))),
        Ok(watcher::Event::Delete(meta("job-1"))),
        Ok(watcher::Event::Apply(injected("job-1"))),
    ])
    .await;
    assert_eq!(
        passed,
        ["job-1", "job-1"],
        "created and deleted, then nothing"
    );
}

/// A relist replaces what the trigger remembers: a pod deleted while the watch was down
/// (no Delete event) and created again with the same labels is a change again.
#[tokio::test]
async fn a_relist_replaces_the_pods_remembered() {
    let passed = passed_by_the_cache(vec![
        Ok(watcher::Event::Init),
        Ok(watcher::Event::InitApply(meta("web-0"))),
        Ok(watcher::Event::InitDone),
        // The watcher lists again (its watch expired, say), and web-0 is gone.
        Ok(watcher::Event::Init),
        Ok(watcher::Event::InitDone),
        Ok(watcher::Event::Apply(meta("web-0"))),
    ])
    .await;
    assert_eq!(passed, ["web-0", "web-0"], "listed, then created again");
}

#[tokio::test]
async fn only_pods_without_a_sidecar_trigger_the_hold() {
    let labelled = |name: &str| {
        let mut p = meta(name);
        p.metadata.labels = Some([("v".to_string(), "2".to_string())].into());
        p
    };
    let events: Vec<Ev> = vec![
        Ok(watcher::Event::Apply(injected("a"))), // a healthy pod: nothing to decide
        Ok(watcher::Event::Apply(meta("b"))),     // no sidecar: a possible client
        Ok(watcher::Event::Apply(labelled("b"))), // changed, still none
        Ok(watcher::Event::Apply(injected("b"))), // got one: the hold may lift
        Ok(watcher::Event::Apply(injected("b"))), // churn of an injected pod
        Ok(watcher::Event::Apply(injected("c"))),
        Ok(watcher::Event::Delete(injected("c"))),
    ];
    let stream = changes(
        without_sidecar(futures::stream::iter(events)),
        pod_fingerprint,
    );
    let passed: Vec<String> = hold_relevant(stream)
        .map(|r| r.unwrap().metadata.name.unwrap())
        .collect()
        .await;
    assert_eq!(passed, ["b", "b", "b"]);
}

/// What the trigger remembers is the pods without a sidecar the watch holds now: a
/// thousand pods created and deleted leave nothing, and a relist drops the pods deleted
/// while the watch was down.
#[test]
fn the_fingerprints_follow_deletes_and_relists() {
    let mut seen = Fingerprints::default();
    let mut apply = |ev: watcher::Event<PodMeta>| seen.apply(ev, pod_fingerprint).is_some();
    assert!(!apply(watcher::Event::Init));
    assert!(!apply(watcher::Event::InitDone));
    for i in 0..1000 {
        let name = format!("job-{i}");
        assert!(apply(watcher::Event::Apply(meta(&name))));
        assert!(apply(watcher::Event::Delete(meta(&name))));
    }
    apply(watcher::Event::Apply(meta("deleted-while-down")));
    apply(watcher::Event::Apply(meta("kept")));
    assert_eq!(seen.current.len(), 2);
    let mut apply = |ev: watcher::Event<PodMeta>| seen.apply(ev, pod_fingerprint).is_some();
    apply(watcher::Event::Init);
    assert!(!apply(watcher::Event::InitApply(meta("kept"))), "unchanged");
    apply(watcher::Event::InitDone);
    let kept: Vec<&String> = seen.current.keys().map(|(_, n)| n).collect();
    assert_eq!(kept, ["kept"]);
    assert!(seen.relist.is_none());
}

#[tokio::test]
async fn the_store_keeps_only_pods_without_a_sidecar() {
    let injected = |name: &str| {
        let mut p = meta(name);
        p.metadata.annotations = Some([(SIDECAR_STATUS.to_string(), String::new())].into());
        p
    };
    let events: Vec<Ev> = vec![
        Ok(watcher::Event::Init),
        Ok(watcher::Event::InitApply(injected("a"))),
        Ok(watcher::Event::InitApply(meta("b"))),
        Ok(watcher::Event::InitApply(meta("c"))),
        Ok(watcher::Event::InitDone),
        Ok(watcher::Event::Apply(injected("d"))),
        // c is injected now (it never is in practice, but the store must follow).
        Ok(watcher::Event::Apply(injected("c"))),
        Ok(watcher::Event::Apply(meta("e"))),
    ];
    let (store, writer) = reflector::store::<PodMeta>();
    reflector::reflector(writer, without_sidecar(futures::stream::iter(events)))
        .for_each(|_| async {})
        .await;
    let mut names: Vec<String> = store.state().iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["b", "e"]);
}

#[test]
fn strip_keeps_only_what_the_hold_reads() {
    let mut p: PodMeta = serde_json::from_value(json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {
            "name": "a", "namespace": "n", "labels": {"app": "a"}, "resourceVersion": "7",
            "annotations": {SIDECAR_STATUS: "{\"containers\":[]}", "other": "x".repeat(1000)},
        },
    }))
    .unwrap();
    strip(&mut p);
    let info = pod_info(&p.metadata);
    assert!(info.injected);
    assert_eq!(info.labels["app"], "a");
    assert_eq!(p.metadata.annotations.as_ref().map(|a| a.len()), Some(1));
    assert_eq!(p.metadata.annotations.as_ref().unwrap()[SIDECAR_STATUS], "");
    assert!(p.metadata.resource_version.is_none());

    // A pod without a sidecar keeps the injector's own annotations (the restart hint
    // reads them), and nothing else.
    let mut p: PodMeta = serde_json::from_value(json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {
            "name": "a", "namespace": "n",
            "annotations": {"sidecar.istio.io/inject": "false", "other": "x".repeat(1000)},
        },
    }))
    .unwrap();
    strip(&mut p);
    let info = pod_info(&p.metadata);
    assert!(!info.injected);
    assert_eq!(
        p.metadata.annotations,
        Some([("sidecar.istio.io/inject".to_string(), "false".to_string())].into())
    );
    assert_eq!(info.annotations["sidecar.istio.io/inject"], "false");
}
