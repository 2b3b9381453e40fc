//! The section's cached facts by namespace, kept from watch events as a store keeps them.
//!
//! kube-runtime's store is one map over the whole cluster: reading one namespace's objects
//! from it means walking all of them. An evaluation reads every covered namespace, so it
//! would hash every cached workload and pod to find its namespace, on every reconcile. This
//! index keeps each namespace's facts apart (by name), applying each watch event as the
//! store does, so an evaluation takes a namespace's entries with one lookup. Running pods
//! are kept only here (no store: at 50,000 pods a store's entries and keys cost about 30 MiB
//! more); workloads are also kept in stores, which the HA section searches by labels.

use super::*;
use crate::compact::Compact;
use kube::runtime::watcher;

type Namespaces<F> = HashMap<String, BTreeMap<String, Arc<F>>>;

/// One namespace's entries of one kind, by name, shared: an evaluation takes a namespace's
/// entries with one pointer copy, and compares them with the ones it decided from by address.
pub type Shared<F> = Arc<[Arc<F>]>;

/// The clock of every index's change stamps: shared, so that no two changes anywhere in the
/// process get the same stamp (an index made anew never repeats an older one's).
static CLOCK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn tick() -> u64 {
    CLOCK.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Facts of one watched kind, by namespace and name. Cloning shares the index.
pub struct ByNamespace<F> {
    state: Arc<Mutex<Indexed<F>>>,
}

impl<F> Clone for ByNamespace<F> {
    fn clone(&self) -> Self {
        ByNamespace {
            state: self.state.clone(),
        }
    }
}

impl<F> Default for ByNamespace<F> {
    fn default() -> Self {
        ByNamespace {
            state: Arc::new(Mutex::new(Indexed {
                current: HashMap::new(),
                stamps: HashMap::new(),
                shared: HashMap::new(),
                relist: None,
                synced: false,
            })),
        }
    }
}

struct Indexed<F> {
    current: Namespaces<F>,
    /// Per namespace in `current`, the stamp of its last change: a namespace whose stamp is
    /// the same holds the same entries ([`View::stamp`]).
    stamps: HashMap<String, u64>,
    /// Per namespace read since its last change: its entries as one shared slice, with the
    /// stamp they were taken at ([`View::shared`]).
    shared: HashMap<String, (u64, Shared<F>)>,
    /// A (re)list in progress: its entries replace `current` when it is done, as the store's
    /// do, so that objects deleted while the watch was down are dropped.
    relist: Option<Namespaces<F>>,
    /// A first list was applied whole.
    synced: bool,
}

/// Inserts `facts`, returning the entry they replace.
fn insert<F>(into: &mut Namespaces<F>, meta: &ObjectMeta, facts: &Arc<F>) -> Option<Arc<F>> {
    let (Some(ns), Some(name)) = (&meta.namespace, &meta.name) else {
        return None;
    };
    // Looked up before inserting: most events concern a namespace already indexed.
    match into.get_mut(ns.as_str()) {
        Some(m) => m.insert(name.clone(), facts.clone()),
        None => {
            into.insert(ns.clone(), BTreeMap::from([(name.clone(), facts.clone())]));
            None
        }
    }
}

/// Stamps a change of namespace `ns`.
fn stamp(stamps: &mut HashMap<String, u64>, ns: &str) {
    match stamps.get_mut(ns) {
        Some(at) => *at = tick(),
        None => {
            stamps.insert(ns.to_string(), tick());
        }
    }
}

impl<F> ByNamespace<F> {
    /// Applies one watch event.
    pub fn apply<K>(&self, event: &watcher::Event<Compact<K, F>>) {
        self.apply_replacing(event);
    }

    /// Applies one watch event, returning the entry an `Apply` replaced or a `Delete` removed
    /// (`None` for a new object, and for the events of a (re)list, which replace the whole
    /// index at its end).
    pub fn apply_replacing<K>(&self, event: &watcher::Event<Compact<K, F>>) -> Option<Arc<F>> {
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        let mut replaced = None;
        match event {
            watcher::Event::Apply(o) => {
                replaced = insert(&mut s.current, &o.metadata, &o.facts);
                if let Some(ns) = &o.metadata.namespace {
                    stamp(&mut s.stamps, ns);
                }
            }
            watcher::Event::Delete(o) => {
                if let (Some(ns), Some(name)) = (&o.metadata.namespace, &o.metadata.name)
                    && let Some(m) = s.current.get_mut(ns.as_str())
                {
                    replaced = m.remove(name.as_str());
                    if m.is_empty() {
                        s.current.remove(ns.as_str());
                        s.stamps.remove(ns.as_str());
                        s.shared.remove(ns.as_str());
                    } else {
                        stamp(&mut s.stamps, ns);
                    }
                }
            }
            watcher::Event::Init => s.relist = Some(HashMap::new()),
            watcher::Event::InitApply(o) => {
                let relist = s.relist.get_or_insert_with(HashMap::new);
                insert(relist, &o.metadata, &o.facts);
            }
            watcher::Event::InitDone => {
                if let Some(done) = s.relist.take() {
                    // Every entry is new: every namespace changed.
                    let now = tick();
                    s.stamps = done.keys().map(|ns| (ns.clone(), now)).collect();
                    s.shared.clear();
                    s.current = done;
                }
                s.synced = true;
            }
        }
        replaced
    }

    /// The index as it is now, locked until the view is dropped (a watch event waits).
    pub fn read(&self) -> View<'_, F> {
        View(match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        })
    }

    /// Whether a first list was applied whole (before it, the index is not the cluster's
    /// state).
    pub fn is_synced(&self) -> bool {
        match self.state.lock() {
            Ok(s) => s.synced,
            Err(p) => p.into_inner().synced,
        }
    }

    /// How many entries the index holds.
    pub fn len(&self) -> usize {
        let s = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        s.current.values().map(BTreeMap::len).sum()
    }

    /// Whether the index holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A locked view of a [`ByNamespace`].
pub struct View<'a, F>(std::sync::MutexGuard<'a, Indexed<F>>);

impl<F> View<'_, F> {
    /// The facts of `namespace`'s objects, by name; `None` when it has none.
    pub fn get(&self, namespace: &str) -> Option<&BTreeMap<String, Arc<F>>> {
        self.0.current.get(namespace)
    }

    /// The stamp of `namespace`'s last change (`None`: it has no entry). Two reads with the
    /// same stamp saw the same entries, so what was decided from them still holds.
    pub fn stamp(&self, namespace: &str) -> Option<u64> {
        self.0.stamps.get(namespace).copied()
    }

    /// The entries of `namespace` by name, as one shared slice (`None`: it has none). Built
    /// once per change of the namespace and shared by every read until the next one, so two
    /// reads between changes get the same slice.
    pub fn shared(&mut self, namespace: &str) -> Option<Shared<F>> {
        let at = self.stamp(namespace)?;
        let s = &mut *self.0;
        if let Some((stamp, slice)) = s.shared.get(namespace)
            && *stamp == at
        {
            return Some(slice.clone());
        }
        let slice: Shared<F> = s.current.get(namespace)?.values().cloned().collect();
        s.shared.insert(namespace.to_string(), (at, slice.clone()));
        Some(slice)
    }

    /// Every entry with its namespace.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Arc<F>)> {
        self.0
            .current
            .iter()
            .flat_map(|(ns, m)| m.values().map(move |f| (ns.as_str(), f)))
    }
}
