//! The watch streams of the controller: the metadata triggers, the rule caches' reflectors,
//! and the coalesced trigger queue that feeds the controller from them.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};

use crate::api::MeshPolicy;
use crate::watch;

/// Policies to reconcile, coalesced: however many events name a policy while it waits, it is
/// queued once.
#[derive(Clone, Default)]
pub(super) struct Triggers {
    pending: Arc<std::sync::Mutex<std::collections::HashSet<ObjectRef<MeshPolicy>>>>,
    notify: Arc<tokio::sync::Notify>,
}

impl Triggers {
    pub(super) fn add(&self, refs: Vec<ObjectRef<MeshPolicy>>) {
        if refs.is_empty() {
            return;
        }
        if let Ok(mut p) = self.pending.lock() {
            p.extend(refs);
        }
        self.notify.notify_one();
    }

    pub(super) fn stream(&self) -> impl Stream<Item = ObjectRef<MeshPolicy>> + Send + 'static {
        let this = self.clone();
        futures::stream::unfold(this, |this| async move {
            loop {
                let taken = this
                    .pending
                    .lock()
                    .map(|mut p| std::mem::take(&mut *p))
                    .unwrap_or_default();
                if !taken.is_empty() {
                    return Some((futures::stream::iter(taken), this));
                }
                this.notify.notified().await;
            }
        })
        .flatten()
    }
}

/// A store of `K` kept by a watch whose objects pass through `strip` first, and the stream of
/// touched objects that drives it (it must be polled).
#[allow(clippy::type_complexity)]
pub(super) fn cached<K>(
    client: &kube::Client,
    (health, name): (&Arc<watch::Health>, &'static str),
    config: watcher::Config,
    strip: fn(&mut K),
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: watch::Watched,
{
    let (store, writer) = reflector::store::<K>();
    let api: Api<K> = Api::all(client.clone());
    let events = watch::resilient(health.clone(), name, move || {
        watcher(api.clone(), config.clone())
    });
    let stream = reflector::reflector(writer, events.modify(strip)).touched_objects();
    (store, stream)
}
