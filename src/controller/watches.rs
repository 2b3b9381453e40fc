//! The watch streams of the controller: the metadata triggers, the rule caches' reflectors,
//! and the coalesced trigger queue that feeds the controller from them.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};

use std::collections::HashMap;

use crate::api::MeshPolicy;
use crate::rules::Sections;
use crate::watch;

/// Policies to reconcile, coalesced: however many events name a policy while it waits, it is
/// queued once, with the union of the sections those events concern. When the controller
/// takes a policy, its sections move to the dirty set that its reconcile takes.
#[derive(Clone, Default)]
pub struct Triggers {
    pending: Arc<std::sync::Mutex<HashMap<ObjectRef<MeshPolicy>, Sections>>>,
    dirty: Arc<std::sync::Mutex<HashMap<ObjectRef<MeshPolicy>, Sections>>>,
    notify: Arc<tokio::sync::Notify>,
}

impl Triggers {
    /// Queues `refs`, each for `sections`.
    pub(super) fn add(&self, refs: Vec<ObjectRef<MeshPolicy>>, sections: Sections) {
        if refs.is_empty() || sections.is_empty() {
            return;
        }
        if let Ok(mut p) = self.pending.lock() {
            for r in refs {
                let s = p.entry(r).or_default();
                *s = *s | sections;
            }
        }
        self.notify.notify_one();
    }

    /// The sections queued for `policy` since its last reconcile took them (`None`: no
    /// watch event named it; a reconcile of its own, such as a spec change or a requeue).
    pub(super) fn take_dirty(&self, policy: &ObjectRef<MeshPolicy>) -> Option<Sections> {
        self.dirty.lock().ok()?.remove(policy)
    }

    /// Whether an evaluation of `policy` is queued (an event named it since its reconcile
    /// took its sections).
    pub(super) fn queued(&self, policy: &ObjectRef<MeshPolicy>) -> bool {
        let has = |m: &std::sync::Mutex<HashMap<ObjectRef<MeshPolicy>, Sections>>| {
            m.lock().is_ok_and(|m| m.contains_key(policy))
        };
        has(&self.pending) || has(&self.dirty)
    }

    /// Resolves once `after` has passed and an evaluation of `policy` is queued.
    pub(super) async fn queued_after(&self, policy: &ObjectRef<MeshPolicy>, after: Duration) {
        tokio::time::sleep(after).await;
        while !self.queued(policy) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
                    let refs: Vec<ObjectRef<MeshPolicy>> = match this.dirty.lock() {
                        Ok(mut d) => taken
                            .into_iter()
                            .map(|(r, s)| {
                                let e = d.entry(r.clone()).or_default();
                                *e = *e | s;
                                r
                            })
                            .collect(),
                        Err(_) => taken.into_keys().collect(),
                    };
                    return Some((futures::stream::iter(refs), this));
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
    watch: (&Arc<watch::Health>, &'static str),
    config: watcher::Config,
    strip: fn(&mut K),
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: watch::Watched,
{
    cached_observed(client, watch, config, strip, |_| {})
}

/// [`cached`], with every watch event also handed to `observe` as the store receives it (to
/// keep another index of the same objects).
#[allow(clippy::type_complexity)]
pub(super) fn cached_observed<K>(
    client: &kube::Client,
    (health, name): (&Arc<watch::Health>, &'static str),
    config: watcher::Config,
    strip: fn(&mut K),
    observe: impl Fn(&watcher::Event<K>) + Send + 'static,
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
    let events = events.modify(strip).inspect_ok(move |e| observe(e));
    let stream = reflector::reflector(writer, events).touched_objects();
    (store, stream)
}

/// The stream of touched objects of a watch whose objects pass through `strip` first and
/// whose every event goes to `observe` only: no store (the caller keeps what it needs).
pub(super) fn observed<K>(
    client: &kube::Client,
    (health, name): (&Arc<watch::Health>, &'static str),
    config: watcher::Config,
    strip: fn(&mut K),
    observe: impl Fn(&watcher::Event<K>) + Send + 'static,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: watch::Watched,
{
    let api: Api<K> = Api::all(client.clone());
    let events = watch::resilient(health.clone(), name, move || {
        watcher(api.clone(), config.clone())
    });
    events
        .modify(strip)
        .inspect_ok(move |e| observe(e))
        .touched_objects()
}
