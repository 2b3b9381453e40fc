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
        .filter_map(|p| judged_owner(p))
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

/// The workload a running pod makes the check judge: its owner, when the injector gave it a
/// sidecar that is not native.
pub fn judged_owner(p: &PodFacts) -> Option<&(sidecars::Kind, String)> {
    (p.sidecar.is_some() && !p.native_sidecar)
        .then_some(p.owner.as_ref())
        .flatten()
}

/// Whether a workload's change (`None`: absent before, or deleted) can change the check: it
/// came or went, or its grace period or drain settings changed. Its other fields (the proxy's
/// resources, replicas, its status) do not.
pub fn drain_reads_changed(before: Option<&WorkloadFacts>, after: Option<&WorkloadFacts>) -> bool {
    match (before, after) {
        (None, None) => false,
        (Some(b), Some(a)) => b.grace_seconds != a.grace_seconds || b.drain != a.drain,
        _ => true,
    }
}

/// Whether a running pod's change (`before` it, `after` it; `None`: absent) changes which
/// workloads of its namespace the check judges, with `pods` the namespace's running pods
/// after the change: its owner's first judged pod came, or its last one went. Pods of a
/// workload replaced one by one, or changing status, do not.
pub fn judged_set_changed(
    before: Option<&PodFacts>,
    after: Option<&PodFacts>,
    pods: Option<&BTreeMap<String, Arc<PodFacts>>>,
) -> bool {
    let (was, is) = (before.and_then(judged_owner), after.and_then(judged_owner));
    if was == is {
        return false;
    }
    let left = |owner: &(sidecars::Kind, String)| {
        pods.map_or(0, |m| {
            m.values()
                .filter(|p| judged_owner(p) == Some(owner))
                .take(2)
                .count()
        })
    };
    is.is_some_and(|o| left(o) == 1) || was.is_some_and(|o| left(o) == 0)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::istio::ProxyVersion;
    use sidecars::Kind;

    fn deployment(grace: Option<i64>, drain: Option<&str>) -> WorkloadFacts {
        let d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {"selector": {}, "template": {
                "metadata": {"annotations": drain.map(|c| serde_json::json!({"proxy.istio.io/config": c}))},
                "spec": {"containers": [], "terminationGracePeriodSeconds": grace}}},
        }))
        .unwrap();
        WorkloadFacts::from(&d)
    }

    fn pod(name: &str, owner: &str, native: bool) -> Arc<PodFacts> {
        let mut p = PodFacts::from(&Pod::default());
        p.name = name.to_string();
        p.owner = Some((Kind::Deployment, owner.to_string()));
        p.sidecar = Some(ProxyVersion {
            revision: None,
            version: "1.28.0".to_string(),
        });
        p.native_sidecar = native;
        Arc::new(p)
    }

    #[test]
    fn a_workload_change_concerns_the_drain_check_only_through_what_it_reads() {
        let w = deployment(None, None);
        assert!(!drain_reads_changed(None, None));
        assert!(drain_reads_changed(None, Some(&w)));
        assert!(drain_reads_changed(Some(&w), None));
        let mut edited = w.clone();
        edited.generation += 1;
        edited.replicas += 3;
        edited.rollout = sidecars::Rollout::InProgress("rolling".to_string());
        assert!(!drain_reads_changed(Some(&w), Some(&edited)));
        assert!(drain_reads_changed(
            Some(&w),
            Some(&deployment(Some(10), None))
        ));
        assert!(drain_reads_changed(
            Some(&w),
            Some(&deployment(None, Some("terminationDrainDuration: 20s")))
        ));
    }

    #[test]
    fn only_a_workloads_first_and_last_judged_pod_change_what_is_judged() {
        let (a, b) = (pod("api-1", "api", false), pod("api-2", "api", false));
        let pods = |ps: &[&Arc<PodFacts>]| -> BTreeMap<String, Arc<PodFacts>> {
            ps.iter().map(|p| (p.name.clone(), (*p).clone())).collect()
        };
        // The first pod of `api` comes: judged from now on.
        assert!(judged_set_changed(None, Some(&a), Some(&pods(&[&a]))));
        // A second one, and a status change of one: nothing new.
        assert!(!judged_set_changed(None, Some(&b), Some(&pods(&[&a, &b]))));
        assert!(!judged_set_changed(
            Some(&a),
            Some(&a),
            Some(&pods(&[&a, &b]))
        ));
        // One of two goes: still judged. The last goes: no more.
        assert!(!judged_set_changed(Some(&a), None, Some(&pods(&[&b]))));
        assert!(judged_set_changed(Some(&b), None, None));
        // A pod without a judged sidecar changes nothing, coming or going.
        let native = pod("api-3", "api", true);
        assert!(!judged_set_changed(
            None,
            Some(&native),
            Some(&pods(&[&native]))
        ));
        // A pod's sidecar turning native ends the owner's last judged pod.
        assert!(judged_set_changed(
            Some(&a),
            Some(&pod("api-1", "api", true)),
            Some(&pods(&[&pod("api-1", "api", true)]))
        ));
    }
}
