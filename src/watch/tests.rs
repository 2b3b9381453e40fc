//! Tests of the resilient watches.
use super::*;
use kube::core::Status;

fn api_error(code: u16) -> watcher::Error {
    watcher::Error::InitialListFailed(kube::Error::Api(Box::new(Status {
        code,
        ..Status::default()
    })))
}

#[test]
fn causes_from_errors() {
    assert_eq!(Cause::of(&api_error(403)), Cause::Forbidden);
    assert_eq!(Cause::of(&api_error(404)), Cause::NotFound);
    assert_eq!(Cause::of(&api_error(410)), Cause::Expired);
    assert_eq!(Cause::of(&api_error(503)), Cause::Unavailable);
    assert_eq!(Cause::of(&api_error(429)), Cause::Unavailable);
    assert_eq!(Cause::of(&api_error(422)), Cause::Rejected);
    let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
    let refused = watcher::Error::WatchStartFailed(kube::Error::Service(Box::new(io)));
    assert_eq!(Cause::of(&refused), Cause::Unavailable);
}

#[test]
fn refused_watches_back_off_to_minutes_unavailable_servers_to_seconds() {
    let waits: Vec<u64> = (1..=12)
        .map(|n| Cause::Forbidden.delay(n).as_secs())
        .collect();
    assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    assert_eq!(Cause::Unavailable.delay(1), Duration::from_millis(250));
    assert_eq!(Cause::Unavailable.delay(100), UNAVAILABLE_MAX);
    assert_eq!(Cause::Expired.delay(5), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn a_watch_whose_list_always_fails_backs_off_and_init_does_not_reset_it() {
    let health = Arc::new(Health::default());
    let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = attempts.clone();
    // Like kube's watcher on a forbidden kind: `Init`, then the LIST fails.
    let stream = resilient(health.clone(), "pdbs", move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        futures::stream::iter(vec![Ok(watcher::Event::<()>::Init), Err(api_error(403))])
            .chain(futures::stream::pending())
    });
    let started = tokio::time::Instant::now();
    let mut stream = Box::pin(stream);
    while started.elapsed() < Duration::from_secs(600) {
        stream.next().await;
    }
    // 1+2+4+…+256 = 511 s, then 300 s apart: 10 attempts in 10 minutes, not 500.
    let n = attempts.load(std::sync::atomic::Ordering::SeqCst);
    assert!((9..=11).contains(&n), "{n} attempts");
    assert!(
        health.current(),
        "a refused kind does not make the process unready"
    );
    assert!(health.stale(&["pdbs"]).is_empty());
}

/// Events a test hands to the watchers `resilient` makes, one attempt after the other: each
/// attempt takes the next events in order; with none left it waits (`Pending`).
struct Script<K>(Arc<Mutex<std::collections::VecDeque<Item<K>>>>);

type Item<K> = Result<watcher::Event<K>, watcher::Error>;

impl<K> Default for Script<K> {
    fn default() -> Self {
        Script(Arc::default())
    }
}

type Events<K> = futures::stream::BoxStream<'static, Item<K>>;

impl<K: Send + 'static> Script<K> {
    fn push(&self, events: Vec<Item<K>>) {
        if let Ok(mut q) = self.0.lock() {
            q.extend(events);
        }
    }

    fn maker(&self) -> impl Fn() -> Events<K> + Send + 'static {
        let q = self.0.clone();
        move || {
            let q = q.clone();
            futures::stream::poll_fn(
                move |_| match q.lock().ok().and_then(|mut q| q.pop_front()) {
                    Some(e) => std::task::Poll::Ready(Some(e)),
                    None => std::task::Poll::Pending,
                },
            )
            .boxed()
        }
    }
}

/// The next item, or `None` once the stream waits for more (time is paused, so the
/// timeout passes at once when nothing else can run).
async fn step<T>(stream: &mut (impl Stream<Item = T> + Unpin)) -> Option<T> {
    tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .ok()
        .flatten()
}

fn up() -> Vec<Item<()>> {
    vec![Ok(watcher::Event::Init), Ok(watcher::Event::InitDone)]
}

#[tokio::test(start_paused = true)]
async fn an_unavailable_server_marks_the_cache_stale_until_it_lists_again() {
    let health = Arc::new(Health::default());
    let script = Script::default();
    script.push(up());
    script.push(vec![Err(api_error(503))]);
    script.push(up());
    let mut stream = Box::pin(resilient(health.clone(), "pods", script.maker()));
    assert!(!health.current(), "listing");
    step(&mut stream).await;
    step(&mut stream).await;
    assert!(
        !health.current(),
        "InitDone handed on, not yet applied by the consumer"
    );
    assert!(matches!(step(&mut stream).await, Some(Err(_))));
    assert_eq!(health.stale(&["pods"]).len(), 1);
    assert!(!health.current());
    step(&mut stream).await;
    step(&mut stream).await;
    assert!(!health.current(), "listing again: still stale");
    assert!(step(&mut stream).await.is_none());
    assert!(health.current());
    assert!(health.stale(&["pods"]).is_empty());
}

fn config_map(name: &str) -> k8s_openapi::api::core::v1::ConfigMap {
    k8s_openapi::api::core::v1::ConfigMap {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.into()),
            namespace: Some("ns".into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// What a relist wakes (the controller's resync) reads the stores the watch feeds: the relist
/// must not be visible before the store holds the new list. A probe between the watch and the
/// store's reflector sees each `InitDone` on its way to the store: the relist is not visible
/// then, nor is the watch `Synced`; both are once the consumer asks for the next event, and
/// by then the ConfigMap deleted while the watch was down is gone from the store.
#[tokio::test(start_paused = true)]
async fn a_relist_is_seen_only_once_the_store_holds_the_new_list() {
    use kube::runtime::reflector::{self, ObjectRef};
    let health = Arc::new(Health::default());
    let relists = health.relists();
    let script = Script::default();
    script.push(vec![
        Ok(watcher::Event::Init),
        Ok(watcher::Event::InitApply(config_map("kept"))),
        Ok(watcher::Event::InitApply(config_map("deleted"))),
        Ok(watcher::Event::InitDone),
        Err(api_error(503)),
        Ok(watcher::Event::Init),
        Ok(watcher::Event::InitApply(config_map("kept"))),
        Ok(watcher::Event::InitDone),
    ]);
    // (relist visible, watch Synced) each time an `InitDone` passes the probe.
    let probed = Arc::new(Mutex::new(Vec::new()));
    let (probe, h, r) = (probed.clone(), health.clone(), relists.clone());
    let watch = resilient(health.clone(), "ConfigMaps", script.maker()).inspect(move |e| {
        if let Ok(watcher::Event::InitDone) = e
            && let Ok(mut p) = probe.lock()
        {
            p.push((
                r.has_changed().unwrap_or(false),
                h.state("ConfigMaps") == Some(State::Synced),
            ));
        }
    });
    let (store, writer) = reflector::store();
    let mut stream = Box::pin(reflector::reflector(writer, watch));
    while step(&mut stream).await.is_some() {}
    assert_eq!(
        probed.lock().map(|p| p.clone()).unwrap_or_default(),
        [(false, false), (false, false)],
        "a list was reported applied before the store had it"
    );
    let mut relists = relists;
    assert!(relists.has_changed().unwrap_or(false), "the relist is seen");
    assert_eq!(
        *relists.borrow_and_update(),
        1,
        "the first list is no relist"
    );
    assert_eq!(health.state("ConfigMaps"), Some(State::Synced));
    assert!(store.get(&ObjectRef::new("deleted").within("ns")).is_none());
    assert!(store.get(&ObjectRef::new("kept").within("ns")).is_some());
}

/// However many watches list again together, each relist counts: the resync sees one after
/// the last of them.
#[tokio::test(start_paused = true)]
async fn twenty_watches_relisting_together_each_count() {
    const NAMES: [&str; 20] = [
        "w0", "w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9", "w10", "w11", "w12", "w13",
        "w14", "w15", "w16", "w17", "w18", "w19",
    ];
    let health = Arc::new(Health::default());
    let mut relists = health.relists();
    let mut streams = Vec::new();
    for name in NAMES {
        let script = Script::default();
        script.push(up());
        script.push(vec![Err(api_error(503))]);
        script.push(up());
        streams.push(Box::pin(resilient(health.clone(), name, script.maker())));
    }
    for s in &mut streams {
        while step(s).await.is_some() {}
    }
    assert!(health.current());
    assert!(relists.has_changed().unwrap_or(false));
    assert_eq!(*relists.borrow_and_update(), 20);
}

/// A 403 or 404 after a successful list leaves a frozen cache: stale (nothing is decided from
/// it, the process is not ready) until it lists again. A 404 there (a custom resource a
/// restarted API server does not serve yet) is retried within seconds.
#[tokio::test(start_paused = true)]
async fn a_refusal_after_a_list_marks_the_cache_stale() {
    for code in [403, 404] {
        let health = Arc::new(Health::default());
        let script = Script::default();
        script.push(up());
        script.push(vec![Err(api_error(code))]);
        let mut stream = Box::pin(resilient(health.clone(), "pas", script.maker()));
        step(&mut stream).await;
        step(&mut stream).await;
        assert!(matches!(step(&mut stream).await, Some(Err(_))));
        assert_eq!(health.stale(&["pas"]).len(), 1, "{code}");
        assert!(!health.current(), "{code}");
        let err = health.readable(&["pas"]).unwrap_err();
        assert_eq!(err.cause, Some(Cause::of(&api_error(code))));
        script.push(up());
        while step(&mut stream).await.is_some() {}
        assert!(health.current(), "{code}: listed again");
    }
    assert_eq!(Cause::NotFound.delay_after_sync(10), UNAVAILABLE_MAX);
    assert_eq!(Cause::Forbidden.delay_after_sync(3), Duration::from_secs(4));
}

/// A reconcile that meets a cache whose watch failed (the API server gone) answers at once
/// instead of waiting: while it waited, the controller held the policy, so drift made
/// after the server returned waited for it too. Only a first list is waited for.
#[tokio::test(start_paused = true)]
async fn a_failed_watch_is_not_waited_for_a_first_list_is() {
    let health = Health::default();
    let failing = State::Failing {
        cause: Cause::Unavailable,
        error: "connection refused".into(),
        stale: true,
    };
    health.set("pods", failing);
    let start = tokio::time::Instant::now();
    let err = health
        .wait_readable(&["pods"], Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(err.cause, Some(Cause::Unavailable));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "waited {:?} for a failed watch",
        start.elapsed()
    );

    let health = Arc::new(Health::default());
    health.set("pods", State::Listing);
    let h = health.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        h.set("pods", State::Synced);
    });
    health
        .wait_readable(&["pods"], Duration::from_secs(10))
        .await
        .unwrap();
}
