//! The watch caches the section reads, and the reads without them.

use super::*;

use k8s_openapi::api::policy::v1::PodDisruptionBudget;

/// A namespace's metadata as kept in the controller's store: name and labels.
pub fn strip_namespace(n: &mut PartialObjectMeta<Namespace>) {
    n.metadata.managed_fields = None;
    n.metadata.annotations = None;
}

/// What the section reads, kept current by the controller's watches so that a reconcile makes
/// no LIST. Workloads and pods are kept as their [`WorkloadFacts`] and [`PodFacts`] only.
/// Without it (or before it is filled) the rule lists.
#[derive(Clone)]
pub struct Cache {
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub deployments: Store<CachedWorkload<Deployment>>,
    pub statefulsets: Store<CachedWorkload<StatefulSet>>,
    pub daemonsets: Store<CachedWorkload<DaemonSet>>,
    pub limit_ranges: Store<LimitRange>,
    pub quotas: Store<ResourceQuota>,
    /// Workloads written by this process that the watch may not have delivered yet: the
    /// generation the write produced and when. A cached object of an older generation is read
    /// as carrying the written annotations, so a reconcile that runs before the watch catches
    /// up neither writes it again nor hands its rollout slot to another workload.
    written: Arc<Mutex<Written>>,
    /// For each workload in `written` whose cached copy is older: that copy and the facts it
    /// is read as, so that every evaluation until the watch catches up reads the same shared
    /// facts (and a kept namespace part stays valid) instead of a new copy each time.
    read_as_written: Arc<Mutex<ReadAsWritten>>,
    /// Workloads whose last write failed, and when: they take a rollout slot only after the
    /// others, so a write that keeps failing never holds the pacing.
    failed: Arc<Mutex<Failed>>,
    /// Workloads this process is writing, with the generation the write will produce: the
    /// watch event that delivers exactly that state (its echo) triggers no evaluation.
    echoes: Arc<Mutex<Written>>,
    /// Each policy's namespace parts of its last evaluation ([`Memo`]), and when it was used.
    memos: Arc<Mutex<HashMap<String, (Instant, Memo)>>>,
    /// Per policy, the workloads its last evaluation (Enforce) will roll (written now, or
    /// waiting for a slot or for the rollout gate): the upgrades section leaves them to it, so
    /// that one rollout carries both changes.
    wants: Arc<Mutex<HashMap<String, (Instant, Wanted)>>>,
    /// Each namespace's labels as an evaluation reads them, with the store entry they were
    /// copied from: copied again only when the store holds a new entry (see
    /// [`observe_cached`]).
    ns_labels: Arc<Mutex<NamespaceLabels>>,
    /// The workloads' and pods' facts by namespace ([`ByNamespace`]), which
    /// [`observe_cached`] reads; the controller applies each watch event to them as the
    /// stores do ([`Cache::index`]).
    pub by_namespace: Indexes,
}

/// The facts of the watched workloads and running pods, by namespace.
#[derive(Clone, Default)]
pub struct Indexes {
    pub deployments: ByNamespace<WorkloadFacts>,
    pub statefulsets: ByNamespace<WorkloadFacts>,
    pub daemonsets: ByNamespace<WorkloadFacts>,
    /// Running pods (field selector `status.phase=Running`), kept only here.
    pub pods: ByNamespace<PodFacts>,
    /// Pending pods (`status.phase=Pending`: not scheduled, or not started), read by the HA
    /// sections only.
    pub pending: ByNamespace<PodFacts>,
}

/// A policy's [`Memo`] unused this long is dropped (its policy was deleted or lost its
/// section): at most one evaluation's parts are kept per policy.
const MEMO_TTL: Duration = Duration::from_secs(600);

/// Namespace name -> (the store's entry, its labels).
type NamespaceLabels = HashMap<
    String,
    (
        Arc<PartialObjectMeta<Namespace>>,
        Arc<BTreeMap<String, String>>,
    ),
>;

/// Workloads (kind, namespace, name) an evaluation will roll.
pub type Wanted = std::collections::HashSet<(Kind, String, String)>;

/// Workloads whose last write failed: (kind, namespace, name) -> (when, the error).
pub(super) type Failed = HashMap<(Kind, String, String), (Instant, String)>;

/// (kind, namespace, name) -> (the cached facts, the facts they are read as).
type ReadAsWritten = HashMap<(Kind, String, String), (Arc<WorkloadFacts>, Arc<WorkloadFacts>)>;

/// Written workloads: (kind, namespace, name) -> (generation the write produced, when).
pub(super) type Written = HashMap<(Kind, String, String), (i64, Instant)>;

/// How long a written generation is remembered at most (the watch delivers within seconds).
pub(super) const WRITTEN_TTL: Duration = Duration::from_secs(300);

impl Cache {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        namespaces: Store<PartialObjectMeta<Namespace>>,
        deployments: Store<CachedWorkload<Deployment>>,
        statefulsets: Store<CachedWorkload<StatefulSet>>,
        daemonsets: Store<CachedWorkload<DaemonSet>>,
        limit_ranges: Store<LimitRange>,
        quotas: Store<ResourceQuota>,
    ) -> Self {
        Cache {
            namespaces,
            deployments,
            statefulsets,
            daemonsets,
            limit_ranges,
            quotas,
            written: Arc::new(Mutex::new(HashMap::new())),
            read_as_written: Arc::new(Mutex::new(HashMap::new())),
            failed: Arc::new(Mutex::new(HashMap::new())),
            echoes: Arc::new(Mutex::new(HashMap::new())),
            memos: Arc::new(Mutex::new(HashMap::new())),
            wants: Arc::new(Mutex::new(HashMap::new())),
            ns_labels: Arc::new(Mutex::new(HashMap::new())),
            by_namespace: Indexes::default(),
        }
    }

    /// The cache with `by_namespace` as its indexes (the controller feeds them).
    pub fn indexed(mut self, by_namespace: Indexes) -> Self {
        self.by_namespace = by_namespace;
        self
    }

    /// Runs `f` with the [`Memo`] of `policy`'s last evaluation (empty the first time) and
    /// keeps what `f` leaves in it. One policy is never reconciled twice at once; another
    /// policy's evaluation meanwhile uses its own memo.
    pub fn with_memo<R>(&self, policy: &str, f: impl FnOnce(&mut Memo) -> R) -> R {
        let taken = self
            .memos
            .lock()
            .ok()
            .and_then(|mut m| m.remove(policy))
            .map(|(_, memo)| memo);
        let mut memo = taken.unwrap_or_default();
        let out = f(&mut memo);
        if let Ok(mut m) = self.memos.lock() {
            m.retain(|_, (used, _)| used.elapsed() < MEMO_TTL);
            m.insert(policy.to_string(), (Instant::now(), memo));
        }
        out
    }

    /// Records the workloads `policy`'s evaluation will roll (empty: none, or the section is
    /// gone or in Audit).
    pub fn record_wanted(&self, policy: &str, wanted: Wanted) {
        if let Ok(mut m) = self.wants.lock() {
            m.retain(|_, (at, _)| at.elapsed() < MEMO_TTL);
            if wanted.is_empty() {
                m.remove(policy);
            } else {
                m.insert(policy.to_string(), (Instant::now(), wanted));
            }
        }
    }

    /// Whether `policy`'s sidecars section will roll workload (kind, namespace, name): it
    /// changes its template anyway, so a restart would roll it a second time.
    pub fn sidecars_will_roll(&self, policy: &str, key: &(Kind, String, String)) -> bool {
        self.wants.lock().is_ok_and(|m| {
            m.get(policy)
                .is_some_and(|(at, w)| at.elapsed() < MEMO_TTL && w.contains(key))
        })
    }

    /// Whether any write is recorded as failed (most passes: none, and nothing to sort).
    /// Forgets first the failures older than [`WRITTEN_TTL`] and, once the workload watches
    /// have listed, those of workloads they no longer hold (deleted, or missing from a relist).
    pub(super) fn any_failed(&self) -> bool {
        let Ok(mut m) = self.failed.lock() else {
            return false;
        };
        if m.is_empty() {
            return false;
        }
        let idx = &self.by_namespace;
        let exists = |(kind, ns, name): &(Kind, String, String)| {
            let index = match kind {
                Kind::Deployment => &idx.deployments,
                Kind::StatefulSet => &idx.statefulsets,
                Kind::DaemonSet => &idx.daemonsets,
            };
            !index.is_synced() || index.read().get(ns).is_some_and(|m| m.contains_key(name))
        };
        m.retain(|k, (at, _)| at.elapsed() < WRITTEN_TTL && exists(k));
        !m.is_empty()
    }

    /// Whether the last write of `w` failed less than [`WRITTEN_TTL`] ago.
    pub(super) fn failed_recently(&self, w: &Workload) -> bool {
        let key = (w.kind, w.namespace.to_string(), w.name.clone());
        self.failed
            .lock()
            .is_ok_and(|m| m.get(&key).is_some_and(|(t, _)| t.elapsed() < WRITTEN_TTL))
    }

    /// The error of the last write of `w`, when it failed less than [`WRITTEN_TTL`] ago.
    pub(super) fn last_failure(&self, w: &Workload) -> Option<String> {
        let key = (w.kind, w.namespace.to_string(), w.name.clone());
        let m = self.failed.lock().ok()?;
        m.get(&key)
            .filter(|(t, _)| t.elapsed() < WRITTEN_TTL)
            .map(|(_, e)| e.clone())
    }

    /// Records a write of `w`: `failure` is its error, `None` when it succeeded.
    pub(super) fn record_write_result(&self, w: &Workload, failure: Option<String>) {
        if let Ok(mut m) = self.failed.lock() {
            m.retain(|_, (at, _)| at.elapsed() < WRITTEN_TTL);
            let key = (w.kind, w.namespace.to_string(), w.name.clone());
            match failure {
                None => m.remove(&key),
                Some(e) => m.insert(key, (Instant::now(), e)),
            };
        }
    }

    /// Waits (up to `limit`) until every store and the pod index hold their initial list. A
    /// store's readiness future wakes only the waiter that polled it last, so with several
    /// waiters (reconciles of several policies, the readiness probe) each one re-polls every
    /// 50 ms.
    pub async fn ready(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let all = async {
                self.namespaces.wait_until_ready().await.is_ok()
                    && self.deployments.wait_until_ready().await.is_ok()
                    && self.statefulsets.wait_until_ready().await.is_ok()
                    && self.daemonsets.wait_until_ready().await.is_ok()
                    && self.limit_ranges.wait_until_ready().await.is_ok()
                    && self.quotas.wait_until_ready().await.is_ok()
                    && ((self.by_namespace.pods.is_synced()
                        && self.by_namespace.pending.is_synced())
                        || std::future::pending::<bool>().await)
            };
            let step = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50));
            if let Ok(ready) = tokio::time::timeout(step, all).await {
                return ready;
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Before a write of `w` that will produce `generation`: its echo is expected.
    pub(super) fn expect_echo(&self, w: &Workload, generation: i64) {
        if let Ok(mut m) = self.echoes.lock() {
            m.retain(|_, (_, at)| at.elapsed() < WRITTEN_TTL);
            m.insert(
                (w.kind, w.namespace.to_string(), w.name.clone()),
                (generation, Instant::now()),
            );
        }
    }

    /// Whether a watched workload is the echo of a write of this process: at the generation
    /// that write produced, carrying it as meshwarden's written generation, not yet observed
    /// by its controller. The reconcile that wrote it planned with exactly that state (see
    /// [`observe_cached`]), so evaluating the section again for it decides nothing new; the
    /// controller's next status update is evaluated as any other change. Each echo is
    /// recognised once.
    pub fn echoes_own_write(&self, namespace: &str, facts: &WorkloadFacts) -> bool {
        if facts.observed || facts.written_generation != Some(facts.generation) {
            return false;
        }
        let Ok(mut m) = self.echoes.lock() else {
            return false;
        };
        let key = (facts.kind, namespace.to_string(), facts.name.clone());
        match m.get(&key) {
            Some((g, at)) if *g == facts.generation && at.elapsed() < WRITTEN_TTL => {
                m.remove(&key);
                true
            }
            _ => false,
        }
    }

    /// `facts` of a workload in `namespace` as this process's last sidecar write left it,
    /// while the watch has not delivered that write: at the written generation, not yet
    /// observed by its controller (the upgrades section reads it so, and does not restart a
    /// workload that write is rolling).
    pub fn as_written(&self, namespace: &str, facts: &Arc<WorkloadFacts>) -> Arc<WorkloadFacts> {
        let key = (facts.kind, namespace.to_string(), facts.name.clone());
        let pending = match self.written.lock() {
            Ok(mut w) => pending_write(&mut w, key, facts.generation),
            Err(_) => None,
        };
        match pending {
            None => facts.clone(),
            Some(g) => {
                let mut out = (**facts).clone();
                out.generation = g;
                out.written_generation = Some(g);
                out.observed = false;
                out.rollout = Rollout::InProgress(format!(
                    "the {} controller has not observed generation {g} yet",
                    facts.kind.as_str()
                ));
                Arc::new(out)
            }
        }
    }

    pub(super) fn record_written(&self, w: &Workload, generation: Option<i64>) {
        if let (Some(g), Ok(mut m)) = (generation, self.written.lock()) {
            m.insert(
                (w.kind, w.namespace.to_string(), w.name.clone()),
                (g, Instant::now()),
            );
        }
    }
}

/// The written generation of a workload whose cached copy is older, if any (and forgets
/// entries the cache has caught up with or that are too old).
pub(super) fn pending_write(
    written: &mut Written,
    key: (Kind, String, String),
    cached_generation: i64,
) -> Option<i64> {
    let (g, at) = *written.get(&key)?;
    if cached_generation >= g || at.elapsed() > WRITTEN_TTL {
        written.remove(&key);
        return None;
    }
    Some(g)
}

/// What the section covers: namespaces (by name, empty observations), the selected ambient
/// ones, and the namespaces it would select whose `istio.io/rev` names no live revision or
/// tag (name, revision), which get no sidecar.
#[derive(Clone, Debug, Default)]
pub struct Covered {
    pub namespaces: Vec<NamespaceObservation>,
    pub ambient: Vec<String>,
    pub unknown_revision: Vec<(String, String)>,
}

/// Namespaces the section covers (by name, empty observations), the selected ambient ones,
/// and the selected ones whose revision label resolves to nothing.
#[allow(clippy::type_complexity)]
pub(super) fn covered_namespaces<'a>(
    spec: &SidecarSpec,
    namespaces: impl Iterator<Item = (String, Arc<BTreeMap<String, String>>)> + 'a,
    revisions: &Revisions,
) -> (
    Vec<NamespaceObservation>,
    Vec<String>,
    Vec<(String, String)>,
) {
    let mut out = Vec::new();
    let mut ambient = Vec::new();
    let mut unknown = Vec::new();
    for (name, labels) in namespaces {
        let selected = |any: bool| match &spec.namespace_selector {
            Some(sel) => selector::matches(sel, &labels),
            None => any,
        };
        if is_ambient(&labels) {
            if selected(namespace_injection_on(&labels, revisions)) {
                ambient.push(name);
            }
            continue;
        }
        if let Injection::UnknownRevision(rev) = namespace_injection(&labels, revisions)
            && selected(true)
        {
            unknown.push((name.clone(), rev));
        }
        if selects_namespace(spec, &labels, revisions) {
            out.push(NamespaceObservation {
                name,
                labels,
                ..Default::default()
            });
        }
    }
    // By name: the store lists namespaces in no order (one sort, no map of them).
    out.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    ambient.sort();
    unknown.sort();
    (out, ambient, unknown)
}

/// Every namespace in the store with its labels, shared with the cache's copy of them: a
/// namespace's labels are copied once per store entry (a new entry is a changed namespace),
/// not on every evaluation.
pub fn namespace_labels(cache: &Cache) -> Vec<(String, Arc<BTreeMap<String, String>>)> {
    let entries = cache.namespaces.state();
    let mut kept = match cache.ns_labels.lock() {
        Ok(k) => k,
        Err(p) => p.into_inner(),
    };
    let mut out = Vec::with_capacity(entries.len());
    for ns in entries {
        let name = ns.name_any();
        let labels = match kept.get(&name) {
            Some((entry, labels)) if Arc::ptr_eq(entry, &ns) => labels.clone(),
            _ => {
                let labels = Arc::new(ns.metadata.labels.clone().unwrap_or_default());
                kept.insert(name.clone(), (ns, labels.clone()));
                labels
            }
        };
        out.push((name, labels));
    }
    // Namespaces deleted from the store.
    if kept.len() > out.len() {
        let present: std::collections::HashSet<&str> =
            out.iter().map(|(n, _)| n.as_str()).collect();
        kept.retain(|n, _| present.contains(n.as_str()));
    }
    out
}

/// [`observe`] from the controller's cache: no request to the API server. Entries are shared
/// with the cache, not copied; a workload written by this process that the cache has not seen
/// yet is read as written.
pub fn observe_cached(
    cache: &Cache,
    spec: &SidecarSpec,
    desired: &Desired,
    revisions: &Revisions,
) -> Covered {
    let labelled = namespace_labels(cache);
    let (covered, ambient, unknown_revision) =
        covered_namespaces(spec, labelled.into_iter(), revisions);
    // Sorted by name (the map's order): a namespace is found by binary search, and each
    // index is looked up once per namespace, never per workload or pod.
    let mut out: Vec<NamespaceObservation> = covered;
    let position = |out: &[NamespaceObservation], ns: &str| {
        out.binary_search_by(|o| o.name.as_str().cmp(ns)).ok()
    };
    let idx = &cache.by_namespace;
    // Deployments, then StatefulSets, then DaemonSets, each by name: the order targets are
    // planned in. The four views are locked in this order only here.
    let mut kinds = [
        idx.deployments.read(),
        idx.statefulsets.read(),
        idx.daemonsets.read(),
    ];
    let mut pods = idx.pods.read();
    for o in out.iter_mut() {
        // One shared slice per kind: a pointer copy each, the same slice as the last
        // evaluation's while the namespace's entries are unchanged.
        for kind in &mut kinds {
            o.workloads.extend(kind.shared(&o.name));
        }
        if let Some(p) = pods.shared(&o.name) {
            o.pods = p;
        }
    }
    drop((kinds, pods));
    // The few workloads written by this process that the cache has not caught up with are
    // read as written (looked up from the written ones: no key is built per workload).
    let mut written = match cache.written.lock() {
        Ok(w) => w,
        Err(p) => p.into_inner(),
    };
    written.retain(|_, (_, at)| at.elapsed() <= WRITTEN_TTL);
    let mut seen_as = match cache.read_as_written.lock() {
        Ok(w) => w,
        Err(p) => p.into_inner(),
    };
    seen_as.retain(|k, _| written.contains_key(k));
    let keys: Vec<(Kind, String, String)> = written.keys().cloned().collect();
    let hash = if keys.is_empty() {
        String::new()
    } else {
        desired.hash()
    };
    for key in keys {
        let Some(ns) = position(&out, &key.1).map(|i| &mut out[i]) else {
            continue;
        };
        // The slice holding it is copied and replaced (the index's stays as it is).
        let Some((kind, at)) = ns.workloads.iter().enumerate().find_map(|(k, s)| {
            s.iter()
                .position(|f| f.kind == key.0 && f.name == key.2)
                .map(|i| (k, i))
        }) else {
            continue;
        };
        let mut copied: Vec<Arc<WorkloadFacts>> = ns.workloads[kind].to_vec();
        let slot = &mut copied[at];
        let cached_generation = slot.generation;
        match pending_write(&mut written, key.clone(), cached_generation) {
            Some(g) => {
                let reuse = seen_as.get(&key).and_then(|(base, facts)| {
                    let same = Arc::ptr_eq(base, slot)
                        && facts.generation == g
                        && facts.template_annotations.get(HASH_ANNOTATION) == Some(&hash);
                    same.then(|| facts.clone())
                });
                let facts = reuse.unwrap_or_else(|| {
                    let facts = Arc::new(slot.written(g, desired));
                    seen_as.insert(key, (slot.clone(), facts.clone()));
                    facts
                });
                *slot = facts;
                ns.workloads[kind] = copied.into();
            }
            None => {
                seen_as.remove(&key);
            }
        }
    }
    drop((written, seen_as));
    for o in cache.limit_ranges.state() {
        if let Some(i) = position(&out, o.metadata.namespace.as_deref().unwrap_or_default()) {
            out[i].limit_ranges.push((*o).clone());
        }
    }
    for o in cache.quotas.state() {
        if let Some(i) = position(&out, o.metadata.namespace.as_deref().unwrap_or_default()) {
            out[i].quotas.push((*o).clone());
        }
    }
    Covered {
        namespaces: out,
        ambient,
        unknown_revision,
    }
}

/// Reads every namespace the section covers and what is needed in it.
pub async fn observe(ctx: &Context, spec: &SidecarSpec, revisions: &Revisions) -> Result<Covered> {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let list = namespaces
        .list_metadata(&ListParams::default())
        .await
        .map_err(|e| Error::kube("list Namespaces", e))?;
    let (mut out, ambient, unknown_revision) = covered_namespaces(
        spec,
        list.items.into_iter().map(|ns| {
            (
                ns.name_any(),
                Arc::new(ns.metadata.labels.unwrap_or_default()),
            )
        }),
        revisions,
    );
    for ns in out.iter_mut() {
        let (c, name) = (&ctx.client, ns.name.as_str());
        let (lp, running) = (
            ListParams::default(),
            ListParams::default().fields("status.phase=Running"),
        );
        let (deployments, statefulsets, daemonsets, limit_ranges, quotas, pods) = tokio::try_join!(
            list_in::<Deployment>(c, name, &lp, "Deployments"),
            list_in::<StatefulSet>(c, name, &lp, "StatefulSets"),
            list_in::<DaemonSet>(c, name, &lp, "DaemonSets"),
            list_in::<LimitRange>(c, name, &lp, "LimitRanges"),
            list_in::<ResourceQuota>(c, name, &lp, "ResourceQuotas"),
            list_in::<Pod>(c, name, &running, "Pods"),
        )?;
        let facts = deployments.items.iter().map(WorkloadFacts::from);
        let facts = facts.chain(statefulsets.items.iter().map(WorkloadFacts::from));
        let facts = facts.chain(daemonsets.items.iter().map(WorkloadFacts::from));
        ns.workloads = vec![facts.map(Arc::new).collect()];
        ns.limit_ranges = limit_ranges.items;
        ns.quotas = quotas.items;
        ns.pods = pods
            .items
            .iter()
            .map(|p| Arc::new(PodFacts::from(p)))
            .collect();
    }
    Ok(Covered {
        namespaces: out,
        ambient,
        unknown_revision,
    })
}

/// Every PodDisruptionBudget as the rollout gate reads it, by namespace: from the
/// controller's store, or listed without one.
pub async fn budgets(ctx: &Context) -> Result<HashMap<String, Vec<Budget>>> {
    let mut out: HashMap<String, Vec<Budget>> = HashMap::new();
    let mut add = |b: &PodDisruptionBudget| {
        out.entry(b.metadata.namespace.clone().unwrap_or_default())
            .or_default()
            .push(Budget::from(b));
    };
    match ctx.cache::<crate::rules::stores::Stores>() {
        Some(stores) => {
            stores
                .readable(&[crate::rules::stores::PDBS])
                .await
                .map_err(Error::Cache)?;
            for b in stores.pdbs.state() {
                add(&b);
            }
        }
        None => {
            let list = Api::<PodDisruptionBudget>::all(ctx.client.clone())
                .list(&ListParams::default())
                .await
                .map_err(|e| Error::kube("list PodDisruptionBudgets", e))?;
            for b in &list.items {
                add(b);
            }
        }
    }
    Ok(out)
}

/// Lists `K` in `namespace`, naming what failed.
pub(super) async fn list_in<K>(
    client: &kube::Client,
    namespace: &str,
    lp: &ListParams,
    what: &str,
) -> Result<kube::core::ObjectList<K>>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    Api::<K>::namespaced(client.clone(), namespace)
        .list(lp)
        .await
        .map_err(|e| Error::kube(format!("list {what} in {namespace}"), e))
}

#[cfg(test)]
mod tests;
