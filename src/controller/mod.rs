//! The MeshPolicy controller: watches policies and the objects their rules cover, and
//! reconciles each policy: resolve conflicts, run every rule section, write status (only when
//! it changed) and publish Events for transitions and corrections.
//!
//! `mod.rs` wires it (watches, readiness, shutdown drain); [`reconcile`] is one reconcile;
//! [`watches`] builds the streams; [`routing`] decides which policies an event concerns.

mod reconcile;
mod routing;
mod watches;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{LimitRange, Namespace, ResourceQuota};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, predicates, watcher};
use tracing::{Instrument, warn};

use crate::api::MeshPolicy;
use crate::context::Context;
use crate::rules::stores::{self, Stores};
use crate::rules::{
    Section, Sections, ambient, certificates, gateway_api, ha, mtls, resilience, security, sidecars,
};
use crate::telemetry::Metrics;
use crate::watch;

pub use reconcile::evaluate;
use routing::Route;
use watches::{Triggers, cached, cached_observed, observed};

/// Shared state of the running controller.
pub struct State {
    pub ctx: Context,
    /// Only policies with these labels are handled (`--policy-selector`); all when `None`.
    pub policy_selector: Option<String>,
    store: RwLock<Option<Store<MeshPolicy>>>,
    /// Policies queued by watch events, with the sections each event concerns.
    triggers: Triggers,
    /// Each policy's last evaluation, whose reports the sections no event concerned reuse.
    memo: std::sync::Mutex<HashMap<String, reconcile::Memo>>,
    /// The status this process last wrote for each policy, the policy's own view until the
    /// store has its write.
    written: std::sync::Mutex<HashMap<String, reconcile::Written>>,
    /// Policies whose last status write ended without an answer (an error, or it gave way):
    /// it may have been applied or not, so the next reconcile writes the status even if it
    /// looks unchanged.
    unsure: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Each policy's status writes, paced (`status::pace`): when the last was sent, and the
    /// latest status built and not written yet.
    paced: std::sync::Mutex<HashMap<String, reconcile::Paced>>,
    /// Reconciles running now; a shutdown waits for them (up to [`SHUTDOWN_GRACE`]).
    in_flight: AtomicUsize,
}

impl State {
    pub fn new(ctx: Context, policy_selector: Option<String>) -> Self {
        State {
            ctx,
            policy_selector,
            store: RwLock::new(None),
            triggers: Triggers::default(),
            memo: Default::default(),
            written: Default::default(),
            unsure: Default::default(),
            paced: Default::default(),
            in_flight: AtomicUsize::new(0),
        }
    }
}

/// Lives as long as one reconcile: counts it as running (a shutdown waits for it) and, when
/// dropped (however the reconcile ended), records its count and duration.
struct Running<'a> {
    count: &'a AtomicUsize,
    metrics: &'a Metrics,
    started: Instant,
}

impl<'a> Running<'a> {
    fn enter(count: &'a AtomicUsize, metrics: &'a Metrics) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Running {
            count,
            metrics,
            started: Instant::now(),
        }
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        self.metrics.reconciles.inc();
        self.metrics
            .reconcile_duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// How long a shutdown waits for running reconciles (below Kubernetes' default 30 s grace).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Builds the controller and runs it until `shutdown` resolves.
pub async fn run(
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let shutdown = shutdown.shared();
    let client = state.ctx.client.clone();
    let policies: Api<MeshPolicy> = Api::all(client.clone());
    let mut wc = watcher::Config::default();
    if let Some(sel) = &state.policy_selector {
        wc = wc.labels(sel);
    }
    // The policy reflector is ours so that readiness can follow the end of its initial list
    // (the store's own readiness future wakes only one waiter, which the controller needs).
    let (store, writer) = reflector::store::<MeshPolicy>();
    let listed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let policies_listed = listed.clone();
    let health = state.ctx.metrics.watches.clone();
    let policy_watch = watch::resilient(health.clone(), "MeshPolicies", move || {
        watcher(policies.clone(), wc.clone())
    });
    let metrics = state.ctx.metrics.clone();
    let policy_stream = reflector::reflector(writer, policy_watch)
        .inspect(move |ev| match ev {
            Ok(watcher::Event::InitDone) => {
                policies_listed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            // A deleted policy's series go with it (a relist that misses a deletion leaves
            // them to the next reconcile's `retain_policies`).
            Ok(watcher::Event::Delete(p)) => metrics.forget_policy(&kube::ResourceExt::name_any(p)),
            _ => {}
        })
        .touched_objects()
        // A status newer than this process's last write and different from it (a write that
        // gave way and landed after the one that took over, another instance's) is evaluated
        // again: the generation predicate below would let it stand.
        .inspect_ok({
            let state = state.clone();
            move |p| {
                let foreign = state.written.lock().is_ok_and(|w| {
                    reconcile::foreign_status(p, w.get(&kube::ResourceExt::name_any(p)))
                });
                if foreign {
                    state
                        .triggers
                        .add(vec![ObjectRef::from_obj(p)], Sections::ALL);
                }
            }
        })
        // A policy is reconciled when its spec changes (generation), not when its status
        // does: meshwarden's own status writes would each cost a full evaluation.
        .predicate_filter(predicates::generation, Default::default());
    let controller = Controller::for_stream(policy_stream, store.clone());
    if let Ok(mut s) = state.store.write() {
        *s = Some(store.clone());
    }
    // The mTLS section's pods (metadata of the pods that have not finished, reduced), read by
    // its reconciles; changes that matter to the STRICT hold trigger every mtls policy.
    let (mtls_pods, mtls_pod_events) = mtls::PodCache::watch(&client, &health);
    state.ctx.set_cache(Some(mtls_pods));
    // Revisions, revision tags and the mesh config (root namespace): a change can change what
    // the mtls and sidecars sections decide.
    let (istio_cache, istio_events) =
        crate::istio::IstioCache::watch(&client, &health, &state.ctx.istio_namespace);
    state.ctx.set_cache(Some(istio_cache));
    // Root certificates (the istio-ca-root-cert ConfigMaps, reduced): watched from the first
    // reconcile of a policy with a certificates section on.
    let (root_certs, root_cert_events) = certificates::RootCache::watch(&client, &health);
    state.ctx.set_cache(Some(root_certs));
    // The upgrades section's running-pod counts per namespace, kept between evaluations.
    state
        .ctx
        .set_cache(Some(crate::rules::upgrades::PodMemos::default()));
    // The ztunnel and istio-cni DaemonSets (by their chart label, reduced): the ambient section.
    let (ambient_daemonsets, ambient_events) = ambient::DaemonSets::watch(&client, &health);
    state.ctx.set_cache(Some(ambient_daemonsets));
    // DestinationRules and Services (reduced): watched from the first reconcile of a policy
    // with a resilience section on.
    let (resilience_cache, resilience_events) =
        resilience::ResilienceCache::watch(&client, &health);
    state.ctx.set_cache(Some(resilience_cache));
    // AuthorizationPolicies (reduced) and the CA Secrets' metadata: from the first reconcile
    // of a policy with a security section on.
    let (security_cache, security_events) =
        security::SecurityCache::watch(&client, &health, &state.ctx.istio_namespace);
    state.ctx.set_cache(Some(security_cache));
    // Gateways (reduced): from the first reconcile of a policy that selects Gateways by name
    // or still holds some.
    let (gateway_cache, gateway_events) = gateway_api::cache::GatewayCache::watch(&client, &health);
    state.ctx.set_cache(Some(gateway_cache));
    // Namespace labels, for routing workload events to sidecars sections; namespace changes
    // also reach mtls sections (one watch serves both).
    let (ns_store, ns_stream) = cached::<PartialObjectMeta<Namespace>>(
        &client,
        (&health, "Namespaces"),
        watcher::Config::default(),
        sidecars::strip_namespace,
    );
    // The sidecars section reads workloads, LimitRanges, ResourceQuotas and running pods from
    // these stores instead of listing them on every reconcile. Workloads and pods are kept as
    // the facts the rule reads (`compact::Compact`), not as objects. Pages of 100 on the large
    // lists: a page is held whole before it is reduced.
    // The workloads' and pods' facts are also kept by namespace, from the same events, for
    // the section's evaluation (`sidecars::ByNamespace`).
    // Workload events reach the policies whose HA or sidecars sections cover the namespace;
    // namespace changes reach sidecars and mtls sections; mTLS pod changes reach mtls sections.
    // running pods reach upgrades sections; LimitRanges and ResourceQuotas only keep their
    // stores current. The report sections hear of a workload or running pod as its index
    // applies the event, when what they read of it changed.
    let route = Arc::new(Route {
        policies: store.clone(),
        namespaces: ns_store.clone(),
        triggers: state.triggers.clone(),
        istio: state.ctx.cache::<crate::istio::IstioCache>(),
    });
    let indexes = sidecars::Indexes::default();
    let (index, r) = (indexes.deployments.clone(), route.clone());
    let (deployments, deployment_events) = cached_observed::<sidecars::CachedWorkload<Deployment>>(
        &client,
        (&health, "Deployments"),
        watcher::Config::default().page_size(100),
        |_| {},
        move |e| r.workload_replaced(e, index.apply_replacing(e)),
    );
    let (index, r) = (indexes.statefulsets.clone(), route.clone());
    let (statefulsets, statefulset_events) = cached_observed::<sidecars::CachedWorkload<StatefulSet>>(
        &client,
        (&health, "StatefulSets"),
        watcher::Config::default(),
        |_| {},
        move |e| r.workload_replaced(e, index.apply_replacing(e)),
    );
    let (index, r) = (indexes.daemonsets.clone(), route.clone());
    let (daemonsets, daemonset_events) = cached_observed::<sidecars::CachedWorkload<DaemonSet>>(
        &client,
        (&health, "DaemonSets"),
        watcher::Config::default(),
        |_| {},
        move |e| r.workload_replaced(e, index.apply_replacing(e)),
    );
    let (limit_ranges, limit_range_events) = cached::<LimitRange>(
        &client,
        (&health, "LimitRanges"),
        watcher::Config::default(),
        |_| {},
    );
    let (quotas, quota_events) = cached::<ResourceQuota>(
        &client,
        (&health, "ResourceQuotas"),
        watcher::Config::default(),
        |_| {},
    );
    // Running pods are kept in the index only (no store).
    let (index, r) = (indexes.pods.clone(), route.clone());
    let pod_events = observed::<sidecars::CachedPod>(
        &client,
        (&health, "RunningPods"),
        watcher::Config::default()
            .fields("status.phase=Running")
            .page_size(100),
        |_| {},
        move |e| r.pod_replaced(&index, e, index.apply_replacing(e)),
    );
    // Pending pods (few, and briefly): the HA sections name the ones that do not serve.
    let index = indexes.pending.clone();
    let pending_events = observed::<sidecars::CachedPod>(
        &client,
        (&health, "PendingPods"),
        watcher::Config::default()
            .fields("status.phase=Pending")
            .page_size(100),
        |_| {},
        move |e| index.apply(e),
    );
    // Nodes, reduced to zone, cordon, readiness, labels and taints: where HA targets run and
    // could run. Only events that change those pass (not the kubelets' status heartbeats).
    let (nodes, node_events) = cached::<ha::nodes::CachedNode>(
        &client,
        (&health, stores::NODES),
        watcher::Config::default(),
        |_| {},
    );
    let node_events = node_events.predicate_filter(ha::nodes::fingerprint, Default::default());
    // HPAs, PDBs and PeerAuthentications, whole (few objects): the HA and mtls sections read
    // them, with the namespaces, from these stores instead of listing.
    let (hpas, hpa_events) = cached::<HorizontalPodAutoscaler>(
        &client,
        (&health, stores::HPAS),
        watcher::Config::default(),
        |_| {},
    );
    let (pdbs, pdb_events) = cached::<PodDisruptionBudget>(
        &client,
        (&health, stores::PDBS),
        watcher::Config::default(),
        |_| {},
    );
    let (peer_auths, pa_events) = mtls::watch_peer_auths(&client, &health);
    state.ctx.set_cache(Some(Stores::new(
        ns_store.clone(),
        peer_auths,
        hpas,
        pdbs,
        nodes,
        health.clone(),
    )));
    state.ctx.set_cache(Some(
        sidecars::Cache::new(
            ns_store.clone(),
            deployments,
            statefulsets,
            daemonsets,
            limit_ranges,
            quotas,
        )
        .indexed(indexes),
    ));
    // Ready once the policies and every cache have their initial list (a reconcile before
    // that would wait for them). Polled: a store's readiness future wakes one waiter only.
    let ready_task = {
        let (metrics, cache) = (
            state.ctx.metrics.clone(),
            state.ctx.cache::<sidecars::Cache>(),
        );
        let mtls_pods = state.ctx.cache::<mtls::PodCache>();
        let stores = state.ctx.cache::<Stores>();
        let lazy = Lazy {
            resilience: state.ctx.cache::<resilience::ResilienceCache>(),
            security: state.ctx.cache::<security::SecurityCache>(),
            gateways: state.ctx.cache::<gateway_api::cache::GatewayCache>(),
            policies: store.clone(),
        };
        tokio::spawn(async move {
            loop {
                let caches = match &cache {
                    Some(c) => c.ready(Duration::from_millis(100)).await,
                    None => true,
                } && stores.as_ref().is_none_or(|s| s.ready())
                    && match &mtls_pods {
                        Some(c) => c.ready(Duration::from_millis(100)).await,
                        None => true,
                    };
                if caches
                    && listed.load(std::sync::atomic::Ordering::Relaxed)
                    && lazy_watches_settled(&lazy)
                {
                    metrics.set_ready(true);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    // The stores' watches run in a task of their own: the controller stops polling its
    // trigger streams while the policy they point at is being reconciled, and a reconcile
    // reads these stores, so they must not wait for it. Their events reach the controller as
    // a coalesced set of policies to reconcile.
    let triggers = state.triggers.clone();
    // A cache that listed again after a failure may have missed changes, deletions included
    // (a LIST sends no Delete for what vanished; its sections said Unknown meanwhile): every
    // policy is evaluated again, each section of it. A relist is counted once its list is in
    // the cache (`watch::resilient`), so this evaluation reads the new list; however many
    // watches relist together, one more round follows the last of them.
    let resync_task = {
        let (mut relists, t, s) = (health.relists(), triggers.clone(), store.clone());
        tokio::spawn(async move {
            while relists.changed().await.is_ok() {
                t.add(
                    s.state()
                        .iter()
                        .map(|p| ObjectRef::from_obj(p.as_ref()))
                        .collect(),
                    Sections::ALL,
                );
            }
        })
    };
    let mtls = Section::MutualTls.only();
    let upgrades = Section::Upgrades.only();
    // Namespace labels and Istio's revisions and tags are read by these four.
    let sidecars_or_mtls =
        Section::SidecarResources.only() | mtls | upgrades | Section::Ambient.only();
    // ... and, with the mesh config and istiod, by resilience and security.
    let resilience = Section::Resilience.only();
    let security = Section::Security.only();
    let reading_namespaces = sidecars_or_mtls | resilience | security;
    // The echo of the sidecars section's own write triggers no evaluation of that section.
    let echoes = state.ctx.cache::<sidecars::Cache>();
    let (e1, e2, e3) = (echoes.clone(), echoes.clone(), echoes);
    let cache_task = tokio::spawn(
        async move {
            futures::join!(
                deployment_events.for_each(|r| route.workload(r.map(|o| routing::echo(&e1, o)))),
                statefulset_events.for_each(|r| route.workload(r.map(|o| routing::echo(&e2, o)))),
                daemonset_events.for_each(|r| route.workload(r.map(|o| routing::echo(&e3, o)))),
                ns_stream.for_each(|r| {
                    route.when_ok(
                        r,
                        routing::policies_with_sidecars_or_mtls,
                        reading_namespaces,
                    )
                }),
                limit_range_events.for_each(|_| async {}),
                quota_events.for_each(|_| async {}),
                // Running pods: what the upgrades sections count.
                pod_events.for_each(|r| route.running_pod(r)),
                // Pending pods of an HA target's namespace; nodes: every HA section.
                pending_events.for_each(|r| route.namespaced(r.map(|o| o.metadata))),
                node_events.for_each(|r| route.when_ok(r, routing::policies_with_ha, Sections::HA)),
                // Errors were logged by `watch::resilient`.
                mtls_pod_events.for_each(|r| route.when_ok(r, routing::policies_with_mtls, mtls)),
                hpa_events.for_each(|r| route.namespaced(r.map(|o| o.metadata))),
                pdb_events.for_each(|r| route.budget(r.map(|o| o.metadata))),
                pa_events.for_each(|r| route.when_ok(r, routing::policies_with_mtls, mtls)),
                ambient_events.for_each(|r| {
                    route.when_ok(r, routing::policies_with_ambient, Section::Ambient.only())
                }),
                root_cert_events.for_each(|r| {
                    route.when_ok(
                        r,
                        routing::policies_with_certificates,
                        Section::Certificates.only(),
                    )
                }),
                istio_events.for_each(|()| {
                    // Revisions and ConfigMaps of istiod's namespace: also istiod's version and
                    // the class defaults the gatewayApi sections read.
                    route.gateway_api(None);
                    route.when_ok(
                        Ok::<(), watcher::Error>(()),
                        routing::policies_with_sidecars_or_mtls,
                        reading_namespaces,
                    )
                }),
                resilience_events.for_each(|c| route.report_object(c, Section::Resilience)),
                security_events.for_each(|c| route.report_object(c, Section::Security)),
                // Few objects, read by few policies: any change reaches every gatewayApi section.
                gateway_events.for_each(|_| {
                    route.gateway_api(None);
                    futures::future::ready(())
                }),
            );
        }
        .instrument(tracing::info_span!("watches", of = "rule caches")),
    );
    let running = controller
        .reconcile_on(triggers.stream())
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile::reconcile, reconcile::error_policy, state.clone())
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "controller event");
            }
        });
    // kube's graceful shutdown never returns while the policy store has not listed (CRD
    // missing, list forbidden, API server down at start): its runner waits for the store
    // first. Only the reconciles running when the shutdown comes are waited for.
    let drained = async {
        shutdown.await;
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        while state.in_flight.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                warn!("reconciles still running after the shutdown grace period; stopping them");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = running => {}
        _ = drained => {}
    }
    cache_task.abort();
    ready_task.abort();
    resync_task.abort();
    state.ctx.set_cache::<sidecars::Cache>(None);
    health.clear();
    state.ctx.set_cache::<mtls::PodCache>(None);
    state.ctx.set_cache::<Stores>(None);
    state.ctx.set_cache::<crate::istio::IstioCache>(None);
    state.ctx.set_cache::<certificates::RootCache>(None);
    state.ctx.set_cache::<ambient::DaemonSets>(None);
    state.ctx.set_cache::<resilience::ResilienceCache>(None);
    state.ctx.set_cache::<security::SecurityCache>(None);
    state
        .ctx
        .set_cache::<gateway_api::cache::GatewayCache>(None);
}

/// The lazily started watches, and the policies that may want them.
struct Lazy {
    resilience: Option<resilience::ResilienceCache>,
    security: Option<security::SecurityCache>,
    gateways: Option<gateway_api::cache::GatewayCache>,
    policies: reflector::Store<MeshPolicy>,
}

/// Whether the lazily started watches have settled for the policies listed: a policy
/// declaring `resilience` or `security`, or reading Gateways (`gatewayApi.gateways[]`, or
/// Gateways it still holds), starts them here, at start-up, so that their first lists (paged
/// over every Service, DestinationRule and AuthorizationPolicy) come before readiness instead
/// of after it. Without such a policy they stay unstarted.
fn lazy_watches_settled(lazy: &Lazy) -> bool {
    let Lazy {
        resilience,
        security,
        gateways,
        policies,
    } = lazy;
    let declared = policies.state();
    let wants = |f: fn(&MeshPolicy) -> bool| declared.iter().any(|p| f(p));
    let mut settled = true;
    if let Some(c) = resilience
        && wants(|p| p.spec.resilience.is_some())
    {
        c.want();
        settled &= c.settled();
    }
    if let Some(c) = security
        && wants(|p| p.spec.security.is_some())
    {
        c.want();
        settled &= c.settled();
    }
    if let Some(c) = gateways
        && wants(reads_gateways)
    {
        c.want();
        settled &= c.settled();
    }
    settled
}

/// Whether `policy` reads the Gateways: it selects some by name, or holds some.
fn reads_gateways(policy: &MeshPolicy) -> bool {
    policy
        .spec
        .gateway_api
        .as_ref()
        .is_some_and(|g| !g.gateways.is_empty())
        || gateway_api::holds_gateways(policy)
}
