//! The root certificates of every namespace: a watch of the `istio-ca-root-cert` ConfigMaps
//! only (field selector on the name), each reduced on arrival to the facts of its
//! `root-cert.pem` ([`Bundle`]): fingerprints, subjects and expiry, not the PEM text. Namespaces
//! holding the same roots share one copy. The watch starts when a reconcile first needs it
//! (a policy with a `certificates` section).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::ready;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::watcher;

use super::facts::{Bundle, RootFact, parse_bundle};
use crate::error::{Error, Result};
use crate::watch::{self, Health, NotReadable};

/// The ConfigMap istiod writes into every namespace it serves, with its root certificates.
pub const CONFIGMAP: &str = "istio-ca-root-cert";
/// Its key holding the PEM bundle.
pub const KEY: &str = "root-cert.pem";
/// Watch name (in `meshwarden_watch_synced`, logs and conditions).
pub const WATCH: &str = "RootCertificates";

/// The source name of a namespace's bundle, as violations name it.
pub fn source(namespace: &str) -> String {
    format!("ConfigMap/{namespace}/{CONFIGMAP}")
}

/// Reduces a ConfigMap to the facts of its `root-cert.pem`.
pub fn reduce(cm: &ConfigMap) -> Bundle {
    match cm.data.as_ref().and_then(|d| d.get(KEY)) {
        Some(pem) => match parse_bundle(pem) {
            Bundle::Unreadable(why) => Bundle::Unreadable(format!("{KEY} {why}")),
            roots => roots,
        },
        None => Bundle::Unreadable(format!("has no key {KEY}")),
    }
}

#[derive(Default)]
struct Inner {
    /// Namespace -> its bundle.
    bundles: BTreeMap<String, Bundle>,
    /// One copy of each distinct set of roots, shared by the namespaces holding it.
    shared: HashSet<Arc<[RootFact]>>,
}

impl Inner {
    /// Sets the bundle of `namespace` (`None`: gone); true when that changed anything.
    fn set(&mut self, namespace: String, bundle: Option<Bundle>) -> bool {
        let bundle = bundle.map(|b| match b {
            Bundle::Roots(roots) => match self.shared.get(&roots[..]) {
                Some(same) => Bundle::Roots(same.clone()),
                None => {
                    self.shared.insert(roots.clone());
                    Bundle::Roots(roots)
                }
            },
            unreadable => unreadable,
        });
        let before = match bundle {
            Some(b) => self.bundles.insert(namespace.clone(), b),
            None => self.bundles.remove(&namespace),
        };
        let changed = before != self.bundles.get(&namespace).cloned();
        drop(before);
        if changed {
            // Forget sets no namespace holds any more.
            self.shared.retain(|r| Arc::strong_count(r) > 1);
        }
        changed
    }
}

/// The watched root certificates, while the controller runs.
#[derive(Clone)]
pub struct RootCache {
    inner: Arc<RwLock<Inner>>,
    listed: Arc<AtomicBool>,
    health: Arc<Health>,
    wanted: Arc<tokio::sync::watch::Sender<bool>>,
}

impl RootCache {
    /// Starts nothing: the returned stream drives the watch once a reconcile asks for the
    /// roots, and yields whenever a namespace's roots changed (it must be polled).
    pub fn watch(
        client: &kube::Client,
        health: &Arc<Health>,
    ) -> (
        RootCache,
        impl Stream<Item = Result<(), watcher::Error>> + Send + 'static,
    ) {
        let api: Api<ConfigMap> = Api::all(client.clone());
        let config = watcher::Config::default().fields(&format!("metadata.name={CONFIGMAP}"));
        Self::from_watch(health, move || {
            watcher::watcher(api.clone(), config.clone())
        })
    }

    /// The cache fed by a watcher of the `istio-ca-root-cert` ConfigMaps.
    pub fn from_watch<S, F>(
        health: &Arc<Health>,
        make: F,
    ) -> (
        RootCache,
        impl Stream<Item = Result<(), watcher::Error>> + Send + 'static,
    )
    where
        S: Stream<Item = Result<watcher::Event<ConfigMap>, watcher::Error>> + Send + 'static,
        F: Fn() -> S + Send + 'static,
    {
        let (wanted, mut gate) = tokio::sync::watch::channel(false);
        let cache = RootCache {
            inner: Arc::default(),
            listed: Arc::default(),
            health: health.clone(),
            wanted: Arc::new(wanted),
        };
        let h = health.clone();
        // Not listed, and not registered in `health` (so readiness does not wait for it),
        // until wanted.
        let events = futures::stream::once(async move {
            let _ = gate.wait_for(|w| *w).await;
            watch::resilient(h, WATCH, make)
        })
        .flatten();
        let (inner, listed) = (cache.inner.clone(), cache.listed.clone());
        // A relist gathers the namespaces it saw and replaces the map when it completes.
        let mut relist: Option<BTreeMap<String, Bundle>> = None;
        let stream = events.filter_map(move |ev| {
            let ns = |cm: &ConfigMap| cm.namespace().unwrap_or_default();
            let out = match ev {
                Err(e) => Some(Err(e)),
                Ok(watcher::Event::Init) => {
                    relist = Some(BTreeMap::new());
                    None
                }
                Ok(watcher::Event::InitApply(cm)) => {
                    relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(ns(&cm), reduce(&cm));
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    let seen = relist.take().unwrap_or_default();
                    let changed = inner.write().is_ok_and(|mut i| {
                        let gone: Vec<String> = i
                            .bundles
                            .keys()
                            .filter(|k| !seen.contains_key(*k))
                            .cloned()
                            .collect();
                        let mut changed = false;
                        for k in gone {
                            changed |= i.set(k, None);
                        }
                        for (k, b) in seen {
                            changed |= i.set(k, Some(b));
                        }
                        changed
                    });
                    listed.store(true, Ordering::SeqCst);
                    changed.then_some(Ok(()))
                }
                Ok(watcher::Event::Apply(cm)) => {
                    let b = reduce(&cm);
                    let changed = inner.write().is_ok_and(|mut i| i.set(ns(&cm), Some(b)));
                    changed.then_some(Ok(()))
                }
                Ok(watcher::Event::Delete(cm)) => {
                    let changed = inner.write().is_ok_and(|mut i| i.set(ns(&cm), None));
                    changed.then_some(Ok(()))
                }
            };
            ready(out)
        });
        (cache, stream)
    }

    /// Starts the watch, if it has not started yet.
    pub fn start(&self) {
        self.wanted.send_replace(true);
    }

    /// The bundles of every namespace, once the watch has listed (waiting up to `limit`)
    /// and not failed since.
    pub async fn bundles(
        &self,
        limit: Duration,
    ) -> std::result::Result<BTreeMap<String, Bundle>, NotReadable> {
        self.start();
        let deadline = tokio::time::Instant::now() + limit;
        self.health.wait_readable(&[WATCH], limit).await?;
        // The watch turns Synced just before the map is replaced by the list.
        while !self.listed.load(Ordering::SeqCst) {
            if tokio::time::Instant::now() >= deadline {
                return Err(NotReadable {
                    watch: WATCH.to_string(),
                    cause: None,
                    message: format!("the watch of {WATCH} has not listed yet"),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(self
            .inner
            .read()
            .map(|i| {
                i.bundles
                    .iter()
                    .map(|(ns, b)| (source(ns), b.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Distinct sets of roots held now (for tests of the sharing).
    pub fn distinct_sets(&self) -> usize {
        self.inner.read().map(|i| i.shared.len()).unwrap_or(0)
    }
}

/// Without a running controller: lists the ConfigMaps once.
pub async fn list(client: &kube::Client) -> Result<BTreeMap<String, Bundle>> {
    let api: Api<ConfigMap> = Api::all(client.clone());
    let lp = ListParams::default().fields(&format!("metadata.name={CONFIGMAP}"));
    let list = api
        .list(&lp)
        .await
        .map_err(|e| Error::kube(format!("list ConfigMaps {CONFIGMAP}"), e))?;
    Ok(list
        .items
        .iter()
        .map(|cm| (source(&cm.namespace().unwrap_or_default()), reduce(cm)))
        .collect())
}
