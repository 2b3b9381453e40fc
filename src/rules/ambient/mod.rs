//! The `ambient` section: the ambient data plane, report first. The ztunnel and istio-cni
//! DaemonSets (watched by their chart label, reduced on arrival to [`facts::DataPlaneFacts`])
//! against the production settings of Istio's charts; a Ready ztunnel and istio-cni pod on
//! every node that runs ambient pods (the running and pending pods the sidecars and HA sections
//! already keep, with their node and readiness); their versions against istiod's. [`plan`]
//! decides, pure. The section never writes to the mesh, whatever `enforcement` says.

pub mod facts;
pub mod plan;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;

use facts::{CachedDaemonSet, DataPlaneFacts, SELECTOR};
use plan::Seen;

use crate::api::{AmbientSpec, MeshPolicy};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::istio::{self, DATAPLANE_MODE_LABEL};
use crate::rules::sidecars::{Cache, PodFacts};
use crate::status::RuleReport;
use crate::status::conditions::types;
use crate::watch::Health;

/// Watch name (in `meshwarden_watch_synced`, logs and conditions).
pub const WATCH: &str = "AmbientDaemonSets";

/// The watches the section reads: its DaemonSets, and the namespaces and pods the sidecars
/// section's cache keeps.
pub const WATCHES: [&str; 4] = [WATCH, "Namespaces", "RunningPods", "PendingPods"];

/// The ztunnel and istio-cni DaemonSets of every namespace, kept current by the controller.
#[derive(Clone)]
pub struct DaemonSets {
    pub store: Store<CachedDaemonSet>,
    health: Arc<Health>,
}

impl DaemonSets {
    /// The store and the stream that drives its watch (it must be polled).
    #[allow(clippy::type_complexity)]
    pub fn watch(
        client: &kube::Client,
        health: &Arc<Health>,
    ) -> (
        DaemonSets,
        impl Stream<Item = std::result::Result<CachedDaemonSet, watcher::Error>> + Send + 'static,
    ) {
        let (store, writer) = kube::runtime::reflector::store::<CachedDaemonSet>();
        let api: Api<CachedDaemonSet> = Api::all(client.clone());
        let events = crate::watch::resilient(health.clone(), WATCH, move || {
            watcher(api.clone(), watcher::Config::default().labels(SELECTOR))
        });
        use kube::runtime::WatchStreamExt;
        let stream = kube::runtime::reflector::reflector(writer, events).touched_objects();
        (
            DaemonSets {
                store,
                health: health.clone(),
            },
            stream,
        )
    }
}

/// Evaluates the section for `policy`.
pub async fn reconcile(ctx: &Context, _policy: &MeshPolicy, spec: &AmbientSpec) -> RuleReport {
    let ctype = types::AMBIENT_DATA_PLANE;
    if let Some(stale) = super::stale_caches(ctx, ctype, "ambient", &WATCHES) {
        return stale;
    }
    match observe(ctx, spec).await {
        Ok(seen) => plan::report(&spec.checks, &seen, &plan::plan(&spec.checks, &seen)),
        Err(e) => RuleReport::failed(ctype, &e),
    }
}

/// Namespace name -> its `istio.io/dataplane-mode`, if set.
type Modes = BTreeMap<String, String>;

fn mode_of(labels: Option<&BTreeMap<String, String>>) -> Option<String> {
    labels.and_then(|l| l.get(DATAPLANE_MODE_LABEL)).cloned()
}

/// What the section reads: from the controller's caches, or listed without them.
async fn observe(ctx: &Context, spec: &AmbientSpec) -> Result<Seen> {
    let revisions = if ctx.cache::<istio::IstioCache>().is_some() {
        ctx.revisions().await?
    } else {
        istio::list_revisions(&ctx.client).await?
    };
    let ns = spec.namespace.as_str();
    let mut seen = Seen {
        namespace: ns.to_string(),
        revisions,
        ..Seen::default()
    };
    if let (Some(ds), Some(c)) = (ctx.cache::<DaemonSets>(), ctx.cache::<Cache>())
        && c.ready(Duration::from_secs(30)).await
    {
        ds.health
            .wait_readable(&[WATCH], Duration::from_secs(10))
            .await
            .map_err(Error::Cache)?;
        seen.daemonsets = ds
            .store
            .state()
            .iter()
            .filter(|d| d.metadata.namespace.as_deref() == Some(ns))
            .map(|d| (d.name_any(), d.facts.clone()))
            .collect();
        let modes: Modes = c
            .namespaces
            .state()
            .iter()
            .filter_map(|n| Some((n.name_any(), mode_of(n.metadata.labels.as_ref())?)))
            .collect();
        let running = c.by_namespace.pods.read();
        seen.ambient_nodes =
            plan::ambient_nodes(running.iter().map(|(n, p)| (n, p.as_ref())), |n| {
                modes.get(n).map(String::as_str)
            });
        seen.pods = running
            .get(ns)
            .into_iter()
            .flatten()
            .map(|(_, p)| p.clone())
            .collect();
        drop(running);
        let pending = c.by_namespace.pending.read();
        seen.pods.extend(
            pending
                .get(ns)
                .into_iter()
                .flatten()
                .map(|(_, p)| p.clone()),
        );
        return Ok(seen);
    }
    // Without the controller (a section run alone): list.
    let lp = ListParams::default();
    seen.daemonsets = Api::<DaemonSet>::namespaced(ctx.client.clone(), ns)
        .list(&lp.clone().labels(SELECTOR))
        .await
        .map_err(|e| Error::kube("list DaemonSets", e))?
        .items
        .iter()
        .map(|d| (d.name_any(), Arc::new(DataPlaneFacts::from(d))))
        .collect();
    let modes: Modes = Api::<Namespace>::all(ctx.client.clone())
        .list_metadata(&lp)
        .await
        .map_err(|e| Error::kube("list Namespaces", e))?
        .items
        .iter()
        .filter_map(|n| Some((n.name_any(), mode_of(n.metadata.labels.as_ref())?)))
        .collect();
    let pods = |api: Api<Pod>, phase: &'static str| {
        let lp = lp.clone().fields(phase);
        async move {
            api.list(&lp)
                .await
                .map_err(|e| Error::kube("list Pods", e))
                .map(|l| {
                    l.items
                        .iter()
                        .map(|p| (p.namespace().unwrap_or_default(), PodFacts::from(p)))
                        .collect::<Vec<_>>()
                })
        }
    };
    let (running, pending) = tokio::try_join!(
        pods(Api::all(ctx.client.clone()), "status.phase=Running"),
        pods(
            Api::namespaced(ctx.client.clone(), ns),
            "status.phase=Pending"
        ),
    )?;
    seen.ambient_nodes = plan::ambient_nodes(running.iter().map(|(n, p)| (n.as_str(), p)), |n| {
        modes.get(n).map(String::as_str)
    });
    seen.pods = running
        .into_iter()
        .filter(|(n, _)| n == ns)
        .chain(pending)
        .map(|(_, p)| Arc::new(p))
        .collect();
    Ok(seen)
}
