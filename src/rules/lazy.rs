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

/// What changed in a [`Reduced`] map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    /// An object of this namespace (cluster-scoped objects: the empty namespace).
    In(String),
    /// A (re)list found the map changed: anything may have.
    All,
}

/// The objects of a [`Reduced`] map at one moment.
pub type Snapshot<V> = Arc<BTreeMap<Key, Arc<V>>>;

/// A map of reduced objects kept by a lazily started watch. Readers take a [`Snapshot`]
/// (nothing copied); an event arriving while one is held copies the map first.
pub struct Reduced<V> {
    map: Arc<RwLock<Snapshot<V>>>,
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
    /// yields when the map changed: the namespace of the object that changed, or [`Changed::All`]
    /// when a (re)list changed it.
    pub fn fed<K, S, F>(
        health: &Arc<Health>,
        name: &'static str,
        mut gate: tokio::sync::watch::Receiver<bool>,
        make: F,
        reduce: fn(&K) -> V,
    ) -> (Self, impl Stream<Item = Changed> + Send + 'static)
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
                Err(_) => None,
                Ok(watcher::Event::Init) => {
                    relist = Some(BTreeMap::new());
                    None
                }
                Ok(watcher::Event::InitApply(o)) => {
                    relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key(&o), Arc::new(reduce(&o)));
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    let seen = relist.take().unwrap_or_default();
                    let changed = map.write().is_ok_and(|mut m| {
                        let same = **m == seen;
                        *m = Arc::new(seen);
                        !same
                    });
                    listed.store(true, Ordering::SeqCst);
                    changed.then_some(Changed::All)
                }
                Ok(watcher::Event::Apply(o)) => {
                    let v = Arc::new(reduce(&o));
                    let (k, v2) = (key(&o), v.clone());
                    let ns = k.0.clone();
                    map.write()
                        .is_ok_and(|mut m| {
                            // Unchanged (a resync, a status update of no interest): no copy.
                            if m.get(&k).is_some_and(|old| *old == v) {
                                return false;
                            }
                            Arc::make_mut(&mut m).insert(k, v2);
                            true
                        })
                        .then_some(Changed::In(ns))
                }
                Ok(watcher::Event::Delete(o)) => {
                    let k = key(&o);
                    let ns = k.0.clone();
                    map.write()
                        .is_ok_and(|mut m| {
                            m.contains_key(&k) && Arc::make_mut(&mut m).remove(&k).is_some()
                        })
                        .then_some(Changed::In(ns))
                }
            };
            ready(changed)
        });
        (this, stream)
    }

    /// [`Reduced::fed`] by a watch of every object of kind `K` in the cluster, first listed
    /// in pages of [`PAGE`].
    pub fn all<K>(
        client: &kube::Client,
        health: &Arc<Health>,
        name: &'static str,
        gate: tokio::sync::watch::Receiver<bool>,
        reduce: fn(&K) -> V,
    ) -> (Self, impl Stream<Item = Changed> + Send + 'static)
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + 'static,
    {
        let api: kube::Api<K> = kube::Api::all(client.clone());
        let config = watcher::Config::default().page_size(PAGE);
        Self::fed(
            health,
            name,
            gate,
            move || watcher::watcher(api.clone(), config.clone()),
            reduce,
        )
    }

    pub fn values(&self) -> Vec<Arc<V>> {
        self.map
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

impl<V> Reduced<V> {
    /// The objects now, shared: nothing is copied.
    pub fn snapshot(&self) -> Snapshot<V> {
        self.map.read().map(|m| m.clone()).unwrap_or_default()
    }

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
