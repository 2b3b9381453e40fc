//! What the drain check reads: the covered namespaces' workloads (their grace period and
//! drain settings) and which of them run a pod with a sidecar that is not native, from the
//! sidecars section's watch indexes (facts reduced on arrival), or listed once without a
//! controller (`meshwarden plan`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use super::drain::{self, Findings, Workload};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::istio::drain::Drain;
use crate::rules::sidecars::{self, PodFacts, WorkloadFacts};

/// The sidecars section's watches this check reads.
const WATCHES: [&str; 4] = ["Deployments", "StatefulSets", "DaemonSets", "RunningPods"];

/// One namespace's workloads and running pods, as facts.
#[derive(Default)]
struct Namespace {
    workloads: Vec<Arc<WorkloadFacts>>,
    pods: Vec<Arc<PodFacts>>,
}

/// The drain findings of every covered namespace.
pub async fn observe(
    ctx: &Context,
    mesh: Drain,
    covered: &BTreeSet<String>,
) -> Result<BTreeMap<String, Findings>> {
    let namespaces = match ctx.cache::<sidecars::Cache>() {
        Some(c) => {
            // Waits while a watch lists for the first time (a reconcile right after
            // start-up); a watch that failed since is reported rather than read partly.
            ctx.metrics
                .watches
                .wait_readable(&WATCHES, crate::rules::posture::WAIT)
                .await
                .map_err(Error::Cache)?;
            cached(&c, covered).await
        }
        None => listed(ctx, covered).await?,
    };
    Ok(namespaces
        .into_iter()
        .map(|(ns, n)| (ns, judge(&n, mesh)))
        .collect())
}

fn judge(n: &Namespace, mesh: Drain) -> Findings {
    let with_sidecar: BTreeSet<(&'static str, &str)> = n
        .pods
        .iter()
        .filter(|p| p.sidecar.is_some() && !p.native_sidecar)
        .filter_map(|p| p.owner.as_ref())
        .map(|(kind, name)| (kind.as_str(), name.as_str()))
        .collect();
    let workloads = n.workloads.iter().map(|w| Workload {
        kind: w.kind.as_str(),
        name: &w.name,
        grace_seconds: w.grace_seconds,
        drain: w.drain,
    });
    drain::judged(workloads, &with_sidecar, mesh)
}

async fn cached(c: &sidecars::Cache, covered: &BTreeSet<String>) -> BTreeMap<String, Namespace> {
    // The pod index turns synced once its first list is applied whole.
    c.ready(Duration::from_secs(1)).await;
    let idx = &c.by_namespace;
    let mut out: BTreeMap<String, Namespace> = BTreeMap::new();
    for index in [&idx.deployments, &idx.statefulsets, &idx.daemonsets] {
        let view = index.read();
        for ns in covered {
            if let Some(m) = view.get(ns) {
                let entry = out.entry(ns.clone()).or_default();
                entry.workloads.extend(m.values().cloned());
            }
        }
    }
    let view = idx.pods.read();
    for (ns, entry) in out.iter_mut() {
        if let Some(m) = view.get(ns) {
            entry.pods.extend(m.values().cloned());
        }
    }
    out
}

async fn listed(ctx: &Context, covered: &BTreeSet<String>) -> Result<BTreeMap<String, Namespace>> {
    let c = &ctx.client;
    let lp = ListParams::default();
    let running = ListParams::default().fields("status.phase=Running");
    let list_error = |what: &'static str| move |e| Error::kube(format!("list {what}"), e);
    let (deployments, statefulsets, daemonsets, pods) = tokio::try_join!(
        async {
            Api::<Deployment>::all(c.clone())
                .list(&lp)
                .await
                .map_err(list_error("Deployments"))
        },
        async {
            Api::<StatefulSet>::all(c.clone())
                .list(&lp)
                .await
                .map_err(list_error("StatefulSets"))
        },
        async {
            Api::<DaemonSet>::all(c.clone())
                .list(&lp)
                .await
                .map_err(list_error("DaemonSets"))
        },
        async {
            Api::<Pod>::all(c.clone())
                .list(&running)
                .await
                .map_err(list_error("Pods"))
        },
    )?;
    let mut out: BTreeMap<String, Namespace> = BTreeMap::new();
    let mut add = |ns: String, w: WorkloadFacts| {
        if covered.contains(&ns) {
            out.entry(ns).or_default().workloads.push(Arc::new(w));
        }
    };
    for d in &deployments.items {
        add(d.namespace().unwrap_or_default(), WorkloadFacts::from(d));
    }
    for s in &statefulsets.items {
        add(s.namespace().unwrap_or_default(), WorkloadFacts::from(s));
    }
    for d in &daemonsets.items {
        add(d.namespace().unwrap_or_default(), WorkloadFacts::from(d));
    }
    for p in &pods.items {
        if let Some(n) = out.get_mut(&p.namespace().unwrap_or_default()) {
            n.pods.push(Arc::new(PodFacts::from(p)));
        }
    }
    Ok(out)
}
