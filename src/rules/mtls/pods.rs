//! The pods the STRICT hold reads: metadata-only watch caches of the pods that have not
//! finished, reduced on arrival to what the rule reads (name, namespace, labels, whether the
//! injector gave it a sidecar, being deleted). A second, small cache holds the pods on the host
//! network, which a sidecar can never capture. Reconciles read the caches instead of listing
//! every pod; the events that matter (see [`pod_fingerprint`]) trigger the mTLS policies.

use std::time::Duration;

use futures::future::ready;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};

use super::*;

/// Pods that can still send traffic: finished pods (Jobs) leave the watch as deletions.
pub const NOT_FINISHED: &str = "status.phase!=Succeeded,status.phase!=Failed";
/// The subset of [`NOT_FINISHED`] that runs on the host network.
pub const HOST_NETWORK: &str = "spec.hostNetwork=true,status.phase!=Succeeded,status.phase!=Failed";

type PodMeta = PartialObjectMeta<Pod>;

/// The watched pods of the mTLS rule, while the controller runs.
#[derive(Clone)]
pub struct PodCache {
    pods: Store<PodMeta>,
    host: Store<PodMeta>,
}

/// Keeps only what the rule reads: a pod's metadata shrinks from a few KiB (managedFields,
/// owner references, every annotation) to its name, namespace and labels.
pub fn strip(p: &mut PodMeta) {
    let m = &mut p.metadata;
    let injected = m
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SIDECAR_STATUS));
    *m = ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        labels: m.labels.take(),
        annotations: injected.then(|| [(SIDECAR_STATUS.to_string(), String::new())].into()),
        deletion_timestamp: m.deletion_timestamp.take(),
        ..ObjectMeta::default()
    };
}

/// Passes on only the events where `fingerprint` changed, and deletions: pods change status
/// all the time, and none of that matters to the hold.
pub fn only_changes<K>(
    stream: impl Stream<Item = Result<watcher::Event<PartialObjectMeta<K>>, watcher::Error>>
    + Send
    + 'static,
    fingerprint: fn(&ObjectMeta) -> u64,
) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: crate::watch::Watched,
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
                seen.remove(&key(&o.metadata));
                Some(Ok(o))
            }
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                let fp = fingerprint(&o.metadata);
                if seen.insert(key(&o.metadata), fp) == Some(fp) {
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

fn watch_pods(
    client: &kube::Client,
    fields: &str,
) -> (
    Store<PodMeta>,
    impl Stream<Item = Result<PodMeta, watcher::Error>> + Send + 'static,
) {
    let (store, writer) = reflector::store::<PodMeta>();
    let api: Api<PodMeta> = Api::all(client.clone());
    let events = reflector::reflector(
        writer,
        watcher::watcher(
            api,
            watcher::Config::default().fields(fields).page_size(500),
        )
        .default_backoff()
        .modify(strip),
    );
    (store, only_changes(events, pod_fingerprint))
}

impl PodCache {
    /// Starts nothing: the returned stream drives both watches and yields a pod whenever
    /// something the hold reads changed (it must be polled).
    pub fn watch(
        client: &kube::Client,
    ) -> (
        PodCache,
        impl Stream<Item = Result<PodMeta, watcher::Error>> + Send + 'static,
    ) {
        let (pods, pod_events) = watch_pods(client, NOT_FINISHED);
        let (host, host_events) = watch_pods(client, HOST_NETWORK);
        (
            PodCache { pods, host },
            futures::stream::select(pod_events, host_events),
        )
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
        host_network: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
