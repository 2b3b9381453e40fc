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

/// One event passed on by [`changes`]: the object, whether it left the watch, and whether
/// it was known before (seen since the last list, and not deleted since).
pub struct Change<K> {
    pub object: K,
    pub gone: bool,
    pub was_known: bool,
}

/// What [`changes`] remembers: each object's fingerprint, and during a (re)list the
/// fingerprints listed so far, which replace the others when the list is done. So the map
/// holds the objects the watch holds now: a Delete removes its entry, and an object deleted
/// while the watch was down leaves with the next list.
#[derive(Default)]
struct Fingerprints {
    current: HashMap<(String, String), u64>,
    relist: Option<HashMap<(String, String), u64>>,
}

impl Fingerprints {
    /// Applies one watch event; returns it when it is a change worth passing on.
    fn apply<K: Resource>(
        &mut self,
        event: watcher::Event<K>,
        fingerprint: fn(&ObjectMeta) -> u64,
    ) -> Option<Change<K>> {
        let (object, listing) = match event {
            watcher::Event::Delete(object) => {
                let k = key(object.meta());
                let was_known = self.current.remove(&k).is_some();
                if let Some(r) = self.relist.as_mut() {
                    r.remove(&k);
                }
                return Some(Change {
                    object,
                    gone: true,
                    was_known,
                });
            }
            watcher::Event::Init => {
                self.relist = Some(HashMap::new());
                return None;
            }
            watcher::Event::InitDone => {
                if let Some(done) = self.relist.take() {
                    self.current = done;
                }
                return None;
            }
            watcher::Event::Apply(object) => (object, false),
            watcher::Event::InitApply(object) => (object, true),
        };
        let k = key(object.meta());
        let fp = fingerprint(object.meta());
        let before = self.current.get(&k).copied();
        match self.relist.as_mut().filter(|_| listing) {
            Some(relist) => relist.insert(k, fp),
            None => self.current.insert(k, fp),
        };
        (before != Some(fp)).then_some(Change {
            object,
            gone: false,
            was_known: before.is_some(),
        })
    }
}

/// Passes on only the events where `fingerprint` changed, and deletions: objects change
/// status all the time, and none of that matters to the hold. Each passed event says whether
/// the object left the watch and whether it was known.
pub fn changes<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    fingerprint: fn(&ObjectMeta) -> u64,
) -> impl Stream<Item = Result<Change<K>, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
{
    let mut seen = Fingerprints::default();
    stream.filter_map(move |ev| {
        ready(match ev {
            Err(e) => Some(Err(e)),
            Ok(ev) => seen.apply(ev, fingerprint).map(Ok),
        })
    })
}

/// [`changes`], yielding the objects alone.
pub fn only_changes<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    fingerprint: fn(&ObjectMeta) -> u64,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Send + 'static,
{
    changes(stream, fingerprint).map(|r| r.map(|c| c.object))
}

/// Passes on the pod events that can change the STRICT hold: a pod without a sidecar (a
/// possible plain-text client) appearing, changing or going away, and a pod that had none
/// getting one; errors too. Pods with a sidecar coming and going, the churn of a healthy
/// mesh, change nothing the hold reads, so they trigger no reconcile. (The host-network
/// pods, always possible clients, are passed on by their own watch.) Which pods were last
/// seen without a sidecar is what [`changes`] knows (the store it follows holds only those),
/// so nothing is remembered here.
pub fn hold_relevant<S>(
    stream: S,
) -> impl Stream<Item = Result<PodMeta, watcher::Error>> + Send + 'static
where
    S: Stream<Item = Result<Change<PodMeta>, watcher::Error>> + Send + 'static,
{
    stream.filter_map(|r| {
        let out = match r {
            Err(e) => Some(Err(e)),
            Ok(c) => {
                let bare = !pod_info(&c.object.metadata).injected;
                let pass = if c.gone {
                    c.was_known
                } else {
                    bare || c.was_known
                };
                pass.then_some(Ok(c.object))
            }
        };
        ready(out)
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
    impl Stream<Item = Result<Change<PodMeta>, watcher::Error>> + Send + 'static,
)
where
    S: Stream<Item = Result<watcher::Event<PodMeta>, watcher::Error>> + Send + 'static,
    F: Fn() -> S + Send + 'static,
{
    let (store, writer) = reflector::store::<PodMeta>();
    let pods = watch::resilient(health.clone(), name, make).modify(strip);
    let events = reflector::reflector(writer, without_sidecar(pods));
    (store, changes(events, pod_fingerprint))
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
        let host_events = host_events.map(|r| r.map(|c| c.object));
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
mod tests;
