//! A map of objects reduced on arrival, kept by a watch that starts only when a reconcile
//! first needs it: report-only sections read kinds that most clusters have many of
//! (Services, DestinationRules, AuthorizationPolicies), and a cluster without a policy that
//! reads them never lists them. Each object is kept as the facts its section reads, behind an
//! `Arc`, by namespace and name; a relist replaces the map when it completes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures::future::ready;
use futures::{Stream, StreamExt};
use kube::runtime::watcher;

use crate::watch::{self, Health};

/// Objects per page of a first list: a page is held whole before it is reduced, and these
/// lists may run while the workloads converge.
pub const PAGE: u32 = 100;

/// Namespace and name.
pub type Key = (String, String);

/// A map of reduced objects kept by a lazily started watch.
pub struct Reduced<V> {
    map: Arc<RwLock<BTreeMap<Key, Arc<V>>>>,
    listed: Arc<AtomicBool>,
}

impl<V> Clone for Reduced<V> {
    fn clone(&self) -> Self {
        Reduced {
            map: self.map.clone(),
            listed: self.listed.clone(),
        }
    }
}

impl<V: PartialEq + Send + Sync + 'static> Reduced<V> {
    /// The map, and the stream that fills it from `make`'s watch once `gate` is true; it
    /// yields when the map changed.
    pub fn fed<K, S, F>(
        health: &Arc<Health>,
        name: &'static str,
        mut gate: tokio::sync::watch::Receiver<bool>,
        make: F,
        reduce: fn(&K) -> V,
    ) -> (Self, impl Stream<Item = ()> + Send + 'static)
    where
        K: kube::Resource + Send + 'static,
        S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
        F: Fn() -> S + Send + 'static,
    {
        let this = Reduced {
            map: Arc::default(),
            listed: Arc::default(),
        };
        let h = health.clone();
        let events = futures::stream::once(async move {
            let _ = gate.wait_for(|w| *w).await;
            watch::resilient(h, name, make)
        })
        .flatten();
        let (map, listed) = (this.map.clone(), this.listed.clone());
        let key = |o: &K| {
            (
                o.meta().namespace.clone().unwrap_or_default(),
                o.meta().name.clone().unwrap_or_default(),
            )
        };
        let mut relist: Option<BTreeMap<Key, Arc<V>>> = None;
        let stream = events.filter_map(move |ev| {
            let changed = match ev {
                Err(_) => false,
                Ok(watcher::Event::Init) => {
                    relist = Some(BTreeMap::new());
                    false
                }
                Ok(watcher::Event::InitApply(o)) => {
                    relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key(&o), Arc::new(reduce(&o)));
                    false
                }
                Ok(watcher::Event::InitDone) => {
                    let seen = relist.take().unwrap_or_default();
                    let changed = map.write().is_ok_and(|mut m| {
                        let same = *m == seen;
                        *m = seen;
                        !same
                    });
                    listed.store(true, Ordering::SeqCst);
                    changed
                }
                Ok(watcher::Event::Apply(o)) => {
                    let v = Arc::new(reduce(&o));
                    map.write()
                        .is_ok_and(|mut m| m.insert(key(&o), v.clone()).is_none_or(|old| old != v))
                }
                Ok(watcher::Event::Delete(o)) => {
                    map.write().is_ok_and(|mut m| m.remove(&key(&o)).is_some())
                }
            };
            ready(changed.then_some(()))
        });
        (this, stream)
    }

    pub fn values(&self) -> Vec<Arc<V>> {
        self.map
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

impl<V> Reduced<V> {
    /// Whether the watch has listed since it started.
    pub fn listed(&self) -> bool {
        self.listed.load(Ordering::SeqCst)
    }

    /// Whether the watch `name` feeding this map has come to an answer: listed, or failing
    /// (a kind the server refuses or does not serve never lists, and must not hold readiness;
    /// the sections that read it report why).
    pub fn settled(&self, health: &Health, name: &str) -> bool {
        self.listed() || matches!(health.state(name), Some(watch::State::Failing { .. }))
    }

    /// Namespace and name of every object.
    pub fn keys(&self) -> Vec<Key> {
        self.map
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every object with its key.
    pub fn entries(&self) -> Vec<(Key, Arc<V>)> {
        self.map
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }
}
