//! The pods the STRICT hold and the cut-off report read: metadata-only watch caches of the
//! pods that have not finished (`Pending` ones included) and have no sidecar, reduced on
//! arrival to what the rule reads (name, namespace, labels, the injector's annotations, being
//! deleted); pods with a sidecar are dropped as they arrive. A second, small cache holds the
//! pods on the host network, which a sidecar can never capture. Reconciles read the caches
//! instead of listing every pod; the events that matter (see [`pod_fingerprint`]) trigger the
//! mTLS policies.

use std::sync::Arc;
use std::time::Duration;

use futures::future::ready;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};

use super::*;
use crate::watch::{self, Health};

/// Pods that can still send traffic: finished pods (Jobs) leave the watch as deletions.
pub const NOT_FINISHED: &str = "status.phase!=Succeeded,status.phase!=Failed";
/// The subset of [`NOT_FINISHED`] that runs on the host network.
pub const HOST_NETWORK: &str = "spec.hostNetwork=true,status.phase!=Succeeded,status.phase!=Failed";

type PodMeta = PartialObjectMeta<Pod>;

/// Watch names (in `meshwarden_watch_synced`, logs and conditions).
pub const PODS_WATCH: &str = "MtlsPods";
pub const HOST_PODS_WATCH: &str = "MtlsHostNetworkPods";

/// The watched pods of the mTLS rule, while the controller runs. The watches start with the
/// controller, so the first STRICT policy is decided at once and no pod is listed after
/// start-up. The stores hold only the pods without a sidecar (a few in a healthy mesh); the
/// injected ones pass through the watch and are dropped.
#[derive(Clone)]
pub struct PodCache {
    pods: Store<PodMeta>,
    host: Store<PodMeta>,
    health: Arc<Health>,
}

/// Keeps only what the rule reads: a pod's metadata shrinks from a few KiB (managedFields,
/// owner references, every annotation) to its name, namespace, labels and the injector's
/// own annotations ([`INJECTOR_ANNOTATIONS`], for the restart hint).
pub fn strip(p: &mut PodMeta) {
    let m = &mut p.metadata;
    let mut kept: BTreeMap<String, String> = BTreeMap::new();
    if let Some(a) = m.annotations.as_mut() {
        if a.contains_key(SIDECAR_STATUS) {
            kept.insert(SIDECAR_STATUS.to_string(), String::new());
        }
        for key in INJECTOR_ANNOTATIONS {
            if let Some(v) = a.remove(key) {
                kept.insert(key.to_string(), v);
            }
        }
    }
    *m = ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        labels: m.labels.take(),
        annotations: (!kept.is_empty()).then_some(kept),
        deletion_timestamp: m.deletion_timestamp.take(),
        ..ObjectMeta::default()
    };
}

/// Passes on only the events where `fingerprint` changed, and deletions: pods change status
/// all the time, and none of that matters to the hold.
pub fn only_changes<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    fingerprint: fn(&ObjectMeta) -> u64,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
{
    let mut seen: HashMap<(String, String), u64> = HashMap::new();
    stream.filter_map(move |ev| {
        let key = |m: &ObjectMeta| {
            (
                m.namespace.clone().unwrap_or_default(),
                m.name.clone().unwrap_or_default(),
            )
        };
        let out = match ev {
            Err(e) => Some(Err(e)),
            Ok(watcher::Event::Delete(o)) => {
                seen.remove(&key(o.meta()));
                Some(Ok(o))
            }
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                let fp = fingerprint(o.meta());
                if seen.insert(key(o.meta()), fp) == Some(fp) {
                    None
                } else {
                    Some(Ok(o))
                }
            }
            Ok(_) => None,
        };
        ready(out)
    })
}

/// Passes on the pod events that can change the STRICT hold: a pod without a sidecar (a
/// possible plain-text client) appearing, changing or going away, and a pod that had none
/// getting one; errors too. Pods with a sidecar coming and going, the churn of a healthy
/// mesh, change nothing the hold reads, so they trigger no reconcile. (The host-network
/// pods, always possible clients, are passed on by their own watch.)
pub fn hold_relevant<S>(
    stream: S,
) -> impl Stream<Item = Result<PodMeta, watcher::Error>> + Send + 'static
where
    S: Stream<Item = Result<PodMeta, watcher::Error>> + Send + 'static,
{
    // Pods last seen without a sidecar.
    let mut bare: std::collections::HashSet<(String, String)> = Default::default();
    stream.filter(move |r| {
        let pass = match r {
            Err(_) => true,
            Ok(p) if !pod_info(&p.metadata).injected => {
                bare.insert(key(&p.metadata));
                true
            }
            Ok(p) => bare.remove(&key(&p.metadata)),
        };
        ready(pass)
    })
}

/// Keeps the pods with a sidecar out of the store: the hold reads only the pods without one,
/// and in a healthy mesh that is almost none, so 50,000 injected pods cost the cache nothing.
/// A pod seen with a sidecar is a deletion for the store (it may have been stored without
/// one); during a list it is simply left out.
pub fn without_sidecar<S>(
    stream: S,
) -> impl Stream<Item = Result<watcher::Event<PodMeta>, watcher::Error>> + Send + 'static
where
    S: Stream<Item = Result<watcher::Event<PodMeta>, watcher::Error>> + Send + 'static,
{
    stream.filter_map(|ev| {
        ready(match ev {
            Ok(watcher::Event::Apply(p)) if pod_info(&p.metadata).injected => {
                Some(Ok(watcher::Event::Delete(p)))
            }
            Ok(watcher::Event::InitApply(p)) if pod_info(&p.metadata).injected => None,
            other => Some(other),
        })
    })
}

/// A reduced store of pods fed by `make` (a watcher), restarted after failures by
/// [`watch::resilient`] under `name`; the stream yields pods whose fingerprint changed.
fn watch_pods<S, F>(
    health: &Arc<Health>,
    name: &'static str,
    make: F,
) -> (
    Store<PodMeta>,
    impl Stream<Item = Result<PodMeta, watcher::Error>> + Send + 'static,
)
where
    S: Stream<Item = Result<watcher::Event<PodMeta>, watcher::Error>> + Send + 'static,
    F: Fn() -> S + Send + 'static,
{
    let (store, writer) = reflector::store::<PodMeta>();
    let pods = watch::resilient(health.clone(), name, make).modify(strip);
    let events = reflector::reflector(writer, without_sidecar(pods));
    (store, only_changes(events, pod_fingerprint))
}

impl PodCache {
    /// Starts nothing: the returned stream drives both watches and yields a pod whenever
    /// something the hold reads changed (it must be polled).
    pub fn watch(
        client: &kube::Client,
        health: &Arc<Health>,
    ) -> (
        PodCache,
        impl Stream<Item = Result<PodMeta, watcher::Error>> + Send + 'static,
    ) {
        let api: Api<PodMeta> = Api::all(client.clone());
        let watch = |fields: &'static str| {
            let api = api.clone();
            move || {
                watcher::watcher(
                    api.clone(),
                    watcher::Config::default().fields(fields).page_size(500),
                )
            }
        };
        Self::from_watches(health, watch(NOT_FINISHED), watch(HOST_NETWORK))
    }

    /// The cache fed by two watchers: the pods that have not finished, and those of them on
    /// the host network.
    pub fn from_watches<S1, F1, S2, F2>(
        health: &Arc<Health>,
        pods: F1,
        host: F2,
    ) -> (
        PodCache,
        impl Stream<Item = Result<PodMeta, watcher::Error>> + Send + 'static,
    )
    where
        S1: Stream<Item = Result<watcher::Event<PodMeta>, watcher::Error>> + Send + 'static,
        F1: Fn() -> S1 + Send + 'static,
        S2: Stream<Item = Result<watcher::Event<PodMeta>, watcher::Error>> + Send + 'static,
        F2: Fn() -> S2 + Send + 'static,
    {
        let (pods, pod_events) = watch_pods(health, PODS_WATCH, pods);
        let pod_events = hold_relevant(pod_events);
        let (host, host_events) = watch_pods(health, HOST_PODS_WATCH, host);
        (
            PodCache {
                pods,
                host,
                health: health.clone(),
            },
            futures::stream::select(pod_events, host_events),
        )
    }

    /// Whether the caches hold every pod now: both watches have listed (waiting up to
    /// `limit` for that) and neither has failed since. Until then the hold cannot be decided.
    pub async fn current(&self, limit: Duration) -> Result<(), crate::watch::NotReadable> {
        let started = tokio::time::Instant::now();
        self.health
            .wait_readable(&[PODS_WATCH, HOST_PODS_WATCH], limit)
            .await?;
        // The watch state turns Synced once the store has applied the list; this also covers
        // a store that has never been polled (a cache built without its stream).
        let rest = limit
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(1));
        if self.ready(rest).await {
            Ok(())
        } else {
            Err(crate::watch::NotReadable {
                watch: PODS_WATCH.to_string(),
                cause: None,
                message: format!("the watch of {PODS_WATCH} has not listed yet"),
            })
        }
    }

    /// Waits up to `limit` for both initial lists. A store's readiness future wakes only the
    /// waiter that polled it last, so with several waiters (reconciles of several policies,
    /// the readiness probe) each one re-polls every 50 ms.
    pub async fn ready(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let both = async {
                self.pods.wait_until_ready().await.is_ok()
                    && self.host.wait_until_ready().await.is_ok()
            };
            let step = deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .min(Duration::from_millis(50));
            if let Ok(ready) = tokio::time::timeout(step, both).await {
                return ready;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Every pod that has not finished and is not being deleted.
    pub fn pods(&self) -> Vec<PodInfo> {
        let host: BTreeSet<(String, String)> =
            self.host.state().iter().map(|p| key(&p.metadata)).collect();
        self.pods
            .state()
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| {
                let mut info = pod_info(&p.metadata);
                info.host_network = host.contains(&key(&p.metadata));
                info
            })
            .collect()
    }
}

fn key(m: &ObjectMeta) -> (String, String) {
    (
        m.namespace.clone().unwrap_or_default(),
        m.name.clone().unwrap_or_default(),
    )
}

/// What the rule knows of a pod from its metadata.
pub fn pod_info(m: &ObjectMeta) -> PodInfo {
    PodInfo {
        injected: m
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(SIDECAR_STATUS)),
        namespace: m.namespace.clone().unwrap_or_default(),
        name: m.name.clone().unwrap_or_default(),
        labels: m.labels.clone().unwrap_or_default(),
        annotations: m
            .annotations
            .iter()
            .flatten()
            .filter(|(k, _)| INJECTOR_ANNOTATIONS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        host_network: false,
    }
}

#[cfg(test)]
mod tests {
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

    #[tokio::test]
    async fn only_pods_without_a_sidecar_trigger_the_hold() {
        let injected = |name: &str| {
            let mut p = meta(name);
            p.metadata.annotations = Some([(SIDECAR_STATUS.to_string(), String::new())].into());
            p
        };
        let events: Vec<Result<PodMeta, watcher::Error>> = vec![
            Ok(injected("a")), // a healthy pod: nothing to decide
            Ok(meta("b")),     // no sidecar: a possible client
            Ok(meta("b")),     // changed, still none
            Ok(injected("b")), // got one: the hold may lift
            Ok(injected("b")), // churn of an injected pod
            Ok(injected("c")),
        ];
        let passed: Vec<String> = hold_relevant(futures::stream::iter(events))
            .map(|r| r.unwrap().metadata.name.unwrap())
            .collect()
            .await;
        assert_eq!(passed, ["b", "b", "b"]);
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
}
