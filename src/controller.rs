//! The MeshPolicy controller: watches policies and the objects their rules cover, and
//! reconciles each policy: resolve conflicts, run every rule section, write status (only when
//! it changed) and publish Events for transitions and corrections.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{LimitRange, Namespace, ResourceQuota};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::api::MeshPolicy;
use crate::apply::FIELD_MANAGER;
use crate::conditions::{self, Status, types};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::policy;
use crate::rules::{self, RuleReport, ha, mtls, sidecars};
use crate::status;
use crate::watch;

/// Shared state of the running controller.
pub struct State {
    pub ctx: Context,
    /// Only policies with these labels are handled (`--policy-selector`); all when `None`.
    pub policy_selector: Option<String>,
    store: RwLock<Option<Store<MeshPolicy>>>,
    /// Reconciles running now; a shutdown waits for them (up to [`SHUTDOWN_GRACE`]).
    in_flight: AtomicUsize,
}

impl State {
    pub fn new(ctx: Context, policy_selector: Option<String>) -> Self {
        State {
            ctx,
            policy_selector,
            store: RwLock::new(None),
            in_flight: AtomicUsize::new(0),
        }
    }
}

/// Counts a reconcile as running while it lives.
struct Running<'a>(&'a AtomicUsize);

impl<'a> Running<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Running(count)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a shutdown waits for running reconciles (below Kubernetes' default 30 s grace).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Periodic re-check of every policy, as a safety net behind the watches.
const RESYNC: Duration = Duration::from_secs(300);

/// Runs the rule sections of one policy. Pure of status; used by the reconciler and tests.
pub async fn evaluate(
    ctx: &Context,
    policy: &MeshPolicy,
    all: &[&MeshPolicy],
) -> (Vec<RuleReport>, Vec<policy::Conflict>) {
    let (spec, conflicts) = policy::resolve(policy, all);
    let control_plane = if spec.control_plane.is_some() {
        ha::reconcile(
            ctx,
            policy,
            ha::Section::ControlPlane,
            &ha::control_plane_groups(&spec),
        )
        .await
    } else {
        RuleReport::not_configured(types::CONTROL_PLANE_HA, "controlPlane")
    };
    let gateways = if !spec.gateways.is_empty() {
        ha::reconcile(
            ctx,
            policy,
            ha::Section::Gateways,
            &ha::gateway_groups(&spec),
        )
        .await
    } else {
        RuleReport::not_configured(types::GATEWAY_HA, "gateways")
    };
    let name = policy.name_any();
    let sidecars = match &spec.sidecars {
        None => {
            ctx.metrics.set_sidecar_drift(&name, &Default::default());
            RuleReport::not_configured(types::SIDECAR_RESOURCES, "sidecars")
        }
        Some(_) if !stale_sidecar_caches(ctx).is_empty() => {
            let stale = stale_sidecar_caches(ctx);
            let names: Vec<&str> = stale.iter().map(|(n, _)| n.as_str()).collect();
            RuleReport {
                condition: conditions::Observed::new(
                    types::SIDECAR_RESOURCES,
                    Status::Unknown,
                    "CacheNotSynced",
                    format!(
                        "the watches of {} failed ({}) and have not listed again: the section is evaluated once they have, within seconds of the API server answering",
                        names.join(", "),
                        stale[0].1
                    ),
                ),
                ..RuleReport::not_configured(types::SIDECAR_RESOURCES, "sidecars")
            }
        }
        Some(s) => {
            let enforcement = policy::effective(&spec, s.enforcement);
            let (report, stats) = sidecars::reconcile_with_stats(ctx, policy, s, enforcement).await;
            // A failed pass keeps the last known drift.
            if report.condition.status != Status::Unknown {
                let drift = stats
                    .pod_drift
                    .iter()
                    .map(|(ns, pods)| (ns.clone(), pods.len()))
                    .collect();
                ctx.metrics.set_sidecar_drift(&name, &drift);
            }
            report
        }
    };
    let mtls = match &spec.mtls {
        None => RuleReport::not_configured(types::MUTUAL_TLS, "mtls"),
        Some(m) => mtls::reconcile(ctx, policy, m, policy::effective(&spec, m.enforcement)).await,
    };
    (vec![control_plane, gateways, sidecars, mtls], conflicts)
}

/// Watches whose caches the sidecars section reads.
const SIDECAR_WATCHES: [&str; 7] = [
    "Namespaces",
    "Deployments",
    "StatefulSets",
    "DaemonSets",
    "LimitRanges",
    "ResourceQuotas",
    "RunningPods",
];

/// The sidecars section's caches that missed changes (watch failed, not listed again yet).
fn stale_sidecar_caches(ctx: &Context) -> Vec<(String, String)> {
    ctx.metrics.watches.stale(&SIDECAR_WATCHES)
}

async fn reconcile(policy: Arc<MeshPolicy>, state: Arc<State>) -> Result<Action> {
    let _running = Running::enter(&state.in_flight);
    let ctx = &state.ctx;
    let name = policy.name_any();
    let started = std::time::Instant::now();
    tracing::debug!(policy = %name, "reconcile starts");
    let all: Vec<Arc<MeshPolicy>> = state
        .store
        .read()
        .ok()
        .and_then(|s| s.as_ref().map(|s| s.state()))
        .unwrap_or_default();
    let refs: Vec<&MeshPolicy> = all.iter().map(|p| p.as_ref()).collect();
    let (reports, conflicts) = evaluate(ctx, &policy, &refs).await;

    let now = Time(jiff::Timestamp::now());
    let new_status = status::build(
        policy.status.as_ref(),
        policy.metadata.generation,
        &reports,
        &conflicts,
        &now,
    );
    if !status::unchanged(policy.status.as_ref(), &new_status) {
        let api: Api<MeshPolicy> = Api::all(ctx.client.clone());
        let patch = json!({
            "apiVersion": "meshwarden.io/v1alpha1",
            "kind": "MeshPolicy",
            "status": new_status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(|e| Error::kube(format!("update status of MeshPolicy {name}"), e))?;
        let before = policy
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        publish_events(ctx, &policy, &before, &new_status.conditions, &reports).await;
    }

    let names: Vec<String> = all.iter().map(|p| p.name_any()).collect();
    ctx.metrics.retain_policies(&names);
    record_metrics(ctx, &name, &reports, &new_status, started.elapsed());

    // A section that could not be evaluated, or whose writes the API server refused (an
    // admission policy, a change freeze), is retried with backoff.
    let failing: Vec<&RuleReport> = reports
        .iter()
        .filter(|r| r.condition.status == Status::Unknown || r.condition.reason == ha::WRITE_FAILED)
        .collect();
    if failing.is_empty() {
        ctx.succeeded(&name);
        info!(
            policy = %name,
            targets = new_status.targets,
            violations = new_status.violation_count,
            took_ms = started.elapsed().as_millis() as u64,
            "reconciled"
        );
        Ok(Action::requeue(RESYNC))
    } else {
        let n = ctx.failed(&name);
        let transient = !failing.iter().any(|r| r.condition.reason == "Forbidden");
        let wait = if transient {
            Duration::from_secs((1u64 << n.min(8)).min(300))
        } else {
            // A missing permission needs a person; RBAC changes cannot be watched, so look again
            // every half minute.
            Duration::from_secs(30)
        };
        for r in failing {
            warn!(policy = %name, rule = %r.condition.type_, reason = %r.condition.reason, message = %r.condition.message, "rule failed");
        }
        Ok(Action::requeue(wait))
    }
}

async fn publish_events(
    ctx: &Context,
    policy: &MeshPolicy,
    before: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    after: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    reports: &[RuleReport],
) {
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let reference = policy.object_ref(&());
    let mut events: Vec<Event> = conditions::transitions(before, after)
        .into_iter()
        .map(|c| Event {
            type_: if c.status == "True" {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: c.reason.clone(),
            note: Some(conditions::truncate(
                &format!("{}: {}", c.type_, c.message),
                1000,
            )),
            action: c.type_.clone(),
            secondary: None,
        })
        .collect();
    for r in reports {
        for line in r.corrections.iter().take(5) {
            events.push(Event {
                type_: EventType::Normal,
                reason: "Corrected".into(),
                note: Some(conditions::truncate(line, 1000)),
                action: r.condition.type_.clone(),
                secondary: None,
            });
        }
    }
    for ev in events {
        if let Err(e) = recorder.publish(&ev, &reference).await {
            warn!(policy = %policy.name_any(), error = %e, "cannot publish event");
        }
    }
}

fn record_metrics(
    ctx: &Context,
    policy: &str,
    reports: &[RuleReport],
    status: &crate::api::MeshPolicyStatus,
    took: Duration,
) {
    use crate::telemetry::{ErrorLabels, PolicyLabels, RuleLabels};
    let m = &ctx.metrics;
    m.reconciles.inc();
    m.reconcile_duration.observe(took.as_secs_f64());
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == types::READY && c.status == "True");
    m.policy_ready
        .get_or_create(&PolicyLabels {
            policy: policy.to_string(),
        })
        .set(i64::from(ready));
    for r in reports {
        let labels = RuleLabels {
            policy: policy.to_string(),
            rule: r.condition.type_.clone(),
        };
        m.violations
            .get_or_create(&labels)
            .set(i64::try_from(r.violations.len()).unwrap_or(i64::MAX));
        if r.corrected > 0 {
            m.corrections
                .get_or_create(&labels)
                .inc_by(u64::try_from(r.corrected).unwrap_or(0));
        }
        if r.condition.status == Status::Unknown {
            m.reconcile_errors
                .get_or_create(&ErrorLabels {
                    kind: r.condition.reason.clone(),
                })
                .inc();
        }
    }
}

fn error_policy(policy: Arc<MeshPolicy>, err: &Error, state: Arc<State>) -> Action {
    let n = state.ctx.failed(&policy.name_any());
    state
        .ctx
        .metrics
        .reconcile_errors
        .get_or_create(&crate::telemetry::ErrorLabels {
            kind: err.reason().to_string(),
        })
        .inc();
    warn!(policy = %policy.name_any(), error = %err, "reconcile failed");
    Action::requeue(err.backoff(n))
}

/// Policies with an `mtls` section: a PeerAuthentication, namespace or pod anywhere can
/// change what it holds.
fn policies_with_mtls(store: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| p.spec.mtls.is_some())
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Policies whose rules cover objects in `namespace`.
fn policies_for_namespace(
    store: &Store<MeshPolicy>,
    namespace: &str,
) -> Vec<ObjectRef<MeshPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| rules::covers_namespace(&p.spec, namespace))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Policies to reconcile for an event on a workload in `namespace`: those whose HA rules cover
/// it, and those whose sidecars section covers it (by the namespace's labels, when known).
fn policies_for_workload(
    store: &Store<MeshPolicy>,
    namespaces: &Store<PartialObjectMeta<Namespace>>,
    namespace: &str,
) -> Vec<ObjectRef<MeshPolicy>> {
    let ns = namespaces.get(&ObjectRef::new(namespace));
    let labels = ns.as_ref().map(|n| n.labels().clone());
    store
        .state()
        .iter()
        .filter(|p| {
            rules::covers_namespace(&p.spec, namespace)
                || sidecars::covers_namespace(&p.spec, labels.as_ref())
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Every policy with a sidecars section (a namespace's labels decide what it covers).
fn policies_with_sidecars(store: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| p.spec.sidecars.is_some())
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Keeps a failing watch (say, on PeerAuthentications before Istio's CRDs exist) from holding
/// up the others: kube-runtime backs off the whole merged trigger stream on any error, which
/// would delay every reconcile. Errors are dropped here; [`watch::resilient`] has logged them
/// and retries with its own backoff.
fn isolated<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, watcher::Error>> + Send + 'static,
) -> impl Stream<Item = Result<T, watcher::Error>> + Send + 'static {
    stream.filter(|r| futures::future::ready(r.is_ok()))
}

fn meta_stream<K>(
    client: &kube::Client,
    health: &Arc<watch::Health>,
    name: &'static str,
) -> impl Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<PartialObjectMeta<K>> = Api::all(client.clone());
    watch::resilient(health.clone(), name, move || {
        watcher(api.clone(), watcher::Config::default())
    })
    .touched_objects()
}

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
    let policy_stream = reflector::reflector(writer, policy_watch)
        .inspect(move |ev| {
            if let Ok(watcher::Event::InitDone) = ev {
                policies_listed.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })
        .touched_objects();
    let controller = Controller::for_stream(policy_stream, store.clone());
    if let Ok(mut s) = state.store.write() {
        *s = Some(store.clone());
    }
    let (s1, s2, s3) = (store.clone(), store.clone(), store.clone());
    let (s4, s5, s6) = (store.clone(), store.clone(), store.clone());
    let (s7, s8, s1_pods) = (store.clone(), store.clone(), store.clone());
    // The mTLS section's pods (metadata of the pods that have not finished, reduced), read by
    // its reconciles; changes that matter to the STRICT hold trigger every mtls policy.
    let (mtls_pods, mtls_pod_events) = mtls::PodCache::watch(&client);
    state.ctx.set_mtls_pods(Some(mtls_pods));
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
    let (deployments, deployment_events) = cached::<sidecars::CachedWorkload<Deployment>>(
        &client,
        (&health, "Deployments"),
        watcher::Config::default().page_size(100),
        |_| {},
    );
    let (statefulsets, statefulset_events) = cached::<sidecars::CachedWorkload<StatefulSet>>(
        &client,
        (&health, "StatefulSets"),
        watcher::Config::default(),
        |_| {},
    );
    let (daemonsets, daemonset_events) = cached::<sidecars::CachedWorkload<DaemonSet>>(
        &client,
        (&health, "DaemonSets"),
        watcher::Config::default(),
        |_| {},
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
    let (pods, pod_events) = cached::<sidecars::CachedPod>(
        &client,
        (&health, "RunningPods"),
        watcher::Config::default()
            .fields("status.phase=Running")
            .page_size(100),
        |_| {},
    );
    state.ctx.set_sidecar_cache(Some(sidecars::Cache::new(
        ns_store.clone(),
        deployments,
        statefulsets,
        daemonsets,
        limit_ranges,
        quotas,
        pods,
    )));
    // Ready once the policies and every cache have their initial list (a reconcile before
    // that would wait for them). Polled: a store's readiness future wakes one waiter only.
    let ready_task = {
        let (metrics, cache) = (state.ctx.metrics.clone(), state.ctx.sidecar_cache());
        let mtls_pods = state.ctx.mtls_pods();
        tokio::spawn(async move {
            loop {
                let caches = match &cache {
                    Some(c) => c.ready(Duration::from_millis(100)).await,
                    None => true,
                } && match &mtls_pods {
                    Some(c) => c.ready(Duration::from_millis(100)).await,
                    None => true,
                };
                if caches && listed.load(std::sync::atomic::Ordering::Relaxed) {
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
    let triggers = Triggers::default();
    // A cache that listed again after a failure may have missed changes (its sections said
    // Unknown meanwhile): every policy is evaluated again.
    let resync_task = {
        let (health, t, s) = (health.clone(), triggers.clone(), store.clone());
        tokio::spawn(async move {
            loop {
                health.relisted().await;
                t.add(
                    s.state()
                        .iter()
                        .map(|p| ObjectRef::from_obj(p.as_ref()))
                        .collect(),
                );
            }
        })
    };
    let t = triggers.clone();
    let (n1, n2, n3) = (ns_store.clone(), ns_store.clone(), ns_store);
    let cache_task = tokio::spawn(async move {
        let (t1, t2, t3, t4, t5) = (t.clone(), t.clone(), t.clone(), t.clone(), t);
        let namespace_of = |r: &Result<_, watcher::Error>| -> Option<String> {
            r.as_ref()
                .ok()
                .and_then(|o: &kube::core::ObjectMeta| o.namespace.clone())
        };
        futures::join!(
            deployment_events.for_each(|r| {
                if let Some(ns) = namespace_of(&r.map(|o| o.metadata)) {
                    t1.add(policies_for_workload(&s1, &n1, &ns));
                }
                async {}
            }),
            statefulset_events.for_each(|r| {
                if let Some(ns) = namespace_of(&r.map(|o| o.metadata)) {
                    t2.add(policies_for_workload(&s4, &n2, &ns));
                }
                async {}
            }),
            daemonset_events.for_each(|r| {
                if let Some(ns) = namespace_of(&r.map(|o| o.metadata)) {
                    t3.add(policies_for_workload(&s5, &n3, &ns));
                }
                async {}
            }),
            // Namespace changes reach sidecars and mtls sections.
            ns_stream.for_each(|r| {
                if r.is_ok() {
                    t4.add(policies_with_sidecars(&s6));
                    t4.add(policies_with_mtls(&s7));
                }
                async {}
            }),
            // Not triggers (as before): they only keep their stores current.
            limit_range_events.for_each(|_| async {}),
            quota_events.for_each(|_| async {}),
            pod_events.for_each(|_| async {}),
            mtls_pod_events.for_each(|r| {
                match r {
                    Ok(_) => t5.add(policies_with_mtls(&s1_pods)),
                    Err(e) => warn!(watch = "Pods (mTLS)", error = %e, "watch failed; retrying with backoff"),
                }
                async {}
            }),
        );
    });
    let running = controller
        .reconcile_on(triggers.stream())
        .watches_stream(
            isolated(meta_stream::<HorizontalPodAutoscaler>(
                &client,
                &health,
                "HorizontalPodAutoscalers",
            )),
            move |h| policies_for_namespace(&s2, &h.namespace().unwrap_or_default()),
        )
        .watches_stream(
            isolated(meta_stream::<PodDisruptionBudget>(
                &client,
                &health,
                "PodDisruptionBudgets",
            )),
            move |b| policies_for_namespace(&s3, &b.namespace().unwrap_or_default()),
        )
        .watches_stream(
            isolated(mtls::changed_meta::<mtls::PeerAuthentication>(
                &client,
                (&health, "PeerAuthentications"),
                mtls::peer_auth_fingerprint,
            )),
            move |_| policies_with_mtls(&s8),
        )
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile, error_policy, state.clone())
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
    state.ctx.set_sidecar_cache(None);
    health.clear();
    state.ctx.set_mtls_pods(None);
}

/// Policies to reconcile, coalesced: however many events name a policy while it waits, it is
/// queued once.
#[derive(Clone, Default)]
struct Triggers {
    pending: Arc<std::sync::Mutex<std::collections::HashSet<ObjectRef<MeshPolicy>>>>,
    notify: Arc<tokio::sync::Notify>,
}

impl Triggers {
    fn add(&self, refs: Vec<ObjectRef<MeshPolicy>>) {
        if refs.is_empty() {
            return;
        }
        if let Ok(mut p) = self.pending.lock() {
            p.extend(refs);
        }
        self.notify.notify_one();
    }

    fn stream(&self) -> impl Stream<Item = ObjectRef<MeshPolicy>> + Send + 'static {
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
fn cached<K>(
    client: &kube::Client,
    (health, name): (&Arc<watch::Health>, &'static str),
    config: watcher::Config,
    strip: fn(&mut K),
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let api: Api<K> = Api::all(client.clone());
    let events = watch::resilient(health.clone(), name, move || {
        watcher(api.clone(), config.clone())
    });
    let stream = reflector::reflector(writer, events.modify(strip)).touched_objects();
    (store, stream)
}
