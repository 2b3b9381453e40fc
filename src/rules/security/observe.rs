//! What the section reads besides its own watches: the selected namespaces' labels (the
//! namespace store), their workloads and the namespaces where istiod runs a waypoint (the
//! sidecars section's workload cache, which keeps each workload's pod-template labels), or
//! lists of them without the controller.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use super::ambient::NamespaceFacts;
use super::plan::Seen;
use crate::api::{DefaultDeny, SecuritySpec};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::istio::DATAPLANE_MODE_LABEL;
use crate::rules::gateway_api::observe::namespaces_of_class;
use crate::rules::posture::{self, WAIT};
use crate::rules::sidecars::{self, Shared, WorkloadFacts};

/// The namespace label that names the waypoint of a namespace's traffic.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// The GatewayClass of waypoints.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// The sidecars section's workload watches.
const WORKLOADS: [&str; 3] = ["Deployments", "StatefulSets", "DaemonSets"];

type ByNamespace = BTreeMap<String, Vec<Shared<WorkloadFacts>>>;

/// The selected namespaces, their workloads (when the default deny is checked) and the
/// waypoints; the policies are left to the caller.
pub async fn seen(ctx: &Context, spec: &SecuritySpec, root: &str) -> Result<Seen> {
    let namespaces: Vec<NamespaceFacts> =
        posture::selected_namespace_objects(ctx, spec.namespace_selector.as_ref())
            .await?
            .iter()
            .map(|n| {
                let label = |k: &str| n.labels().get(k).cloned();
                NamespaceFacts {
                    name: n.name_any(),
                    ambient: label(DATAPLANE_MODE_LABEL).as_deref() == Some("ambient"),
                    use_waypoint: label(USE_WAYPOINT),
                }
            })
            .collect();
    let workloads = if spec.default_deny == DefaultDeny::Off {
        ByNamespace::new()
    } else {
        workloads(ctx, &namespaces).await?
    };
    let waypoints = if namespaces.iter().any(|n| n.ambient) {
        namespaces_of_class(ctx, WAYPOINT_CLASS).await?
    } else {
        Default::default()
    };
    Ok(Seen {
        root: root.to_string(),
        namespaces,
        policies: Vec::new(),
        workloads,
        waypoints,
    })
}

/// The workloads of `namespaces`, shared with the sidecars section's cache.
async fn workloads(ctx: &Context, namespaces: &[NamespaceFacts]) -> Result<ByNamespace> {
    let mut out = ByNamespace::new();
    if let Some(c) = ctx.cache::<sidecars::Cache>() {
        ctx.metrics
            .watches
            .readable(&WORKLOADS)
            .map_err(Error::Cache)?;
        c.ready(WAIT).await;
        let idx = &c.by_namespace;
        let mut kinds = [
            idx.deployments.read(),
            idx.statefulsets.read(),
            idx.daemonsets.read(),
        ];
        for n in namespaces {
            // A pointer per kind, not one per workload (see `View::shared`).
            let here: Vec<Shared<WorkloadFacts>> =
                kinds.iter_mut().filter_map(|k| k.shared(&n.name)).collect();
            if !here.is_empty() {
                out.insert(n.name.clone(), here);
            }
        }
        return Ok(out);
    }
    let lp = ListParams::default();
    let kube = |e| Error::kube("list workloads", e);
    let (d, s, ds) = (
        Api::<Deployment>::all(ctx.client.clone()),
        Api::<StatefulSet>::all(ctx.client.clone()),
        Api::<DaemonSet>::all(ctx.client.clone()),
    );
    let (d, s, ds) = tokio::try_join!(d.list(&lp), s.list(&lp), ds.list(&lp)).map_err(kube)?;
    let selected: std::collections::BTreeSet<&str> =
        namespaces.iter().map(|n| n.name.as_str()).collect();
    let all = d
        .items
        .iter()
        .map(|o| (o.namespace(), WorkloadFacts::from(o)))
        .chain(
            s.items
                .iter()
                .map(|o| (o.namespace(), WorkloadFacts::from(o))),
        )
        .chain(
            ds.items
                .iter()
                .map(|o| (o.namespace(), WorkloadFacts::from(o))),
        );
    let mut listed: BTreeMap<String, Vec<Arc<WorkloadFacts>>> = BTreeMap::new();
    for (ns, facts) in all {
        if let Some(ns) = ns.filter(|n| selected.contains(n.as_str())) {
            listed.entry(ns).or_default().push(Arc::new(facts));
        }
    }
    for (ns, here) in listed {
        out.insert(ns, vec![here.into()]);
    }
    Ok(out)
}
