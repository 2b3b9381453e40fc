//! The `resilience` section: for every Service of the covered namespaces, the DestinationRule
//! its clients actually get, resolved as istiod resolves it ([`resolve`]), with the mesh's
//! `defaultTrafficPolicy` under it, against the declared minimums (outlier detection,
//! connection pool limits), and the root-namespace settings a host-specific rule shadows
//! ([`plan`]); the mesh routes of VirtualServices without a timeout ([`routes`]); the
//! workloads whose proxy drain reaches their grace period ([`drain`], read by [`workloads`]
//! from the sidecars section's watch indexes). Report only, whatever `enforcement` says: it
//! never writes to the mesh. DestinationRules, VirtualServices and Services are watched from
//! the first reconcile that needs them, reduced on arrival ([`cache`]).

pub mod by_namespace;
pub mod cache;
pub mod drain;
pub mod plan;
pub mod resolve;
pub mod routes;
#[cfg(test)]
mod tests;
pub mod workloads;

pub use cache::ResilienceCache;

use crate::api::{MeshPolicy, Requirement, ResilienceSpec};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::istio::Istiod;
use crate::rules::posture::{self, WAIT};
use crate::rules::upgrades::Minor;
use crate::status::RuleReport;
use crate::status::conditions::types;

/// Evaluates the section for `policy`.
pub async fn reconcile(ctx: &Context, _policy: &MeshPolicy, spec: &ResilienceSpec) -> RuleReport {
    match evaluate(ctx, spec).await {
        Ok(r) => r,
        Err(e) => RuleReport::failed(types::RESILIENCE, &e),
    }
}

async fn evaluate(ctx: &Context, spec: &ResilienceSpec) -> Result<RuleReport> {
    let cp = posture::control_plane(ctx).await?;
    let mesh = mesh(cp.root, &cp.documents, &cp.istiods)?;
    let objects = match ctx.cache::<ResilienceCache>() {
        Some(c) => c.read(WAIT).await.map_err(Error::Cache)?,
        None => cache::list(&ctx.client).await?,
    };
    let covered = posture::selected_namespaces(ctx, spec.namespace_selector.as_ref()).await?;
    let is_covered = |ns: &str| covered.contains(ns);
    let mut plan = plan::plan(
        spec,
        &mesh,
        &objects.rules,
        objects.services.keys(),
        &is_covered,
    );
    if spec.route_timeouts == Requirement::Required {
        plan::add_routes(&mut plan, &mesh, &objects.routes, &is_covered);
    }
    if spec.drain_within_grace_period == Requirement::Required {
        for (ns, f) in workloads::observe(ctx, mesh.default_drain, &covered).await? {
            plan.entry(ns).or_default().drains = f;
        }
    }
    Ok(plan::report(spec, &mesh, plan))
}

/// The mesh configs' `defaultTrafficPolicy` and `defaultDestinationRuleExportTo`, and
/// whether every istiod applies the former (1.31 or later).
pub fn mesh(
    root: String,
    documents: &[String],
    istiods: &[(String, Istiod)],
) -> Result<plan::Mesh> {
    let mut out = plan::Mesh {
        root,
        ..plan::Mesh::default()
    };
    for doc in documents {
        let (traffic, private) = plan::mesh_settings(doc).map_err(Error::MeshConfig)?;
        out.default_traffic = out.default_traffic.or(traffic);
        out.default_private |= private;
        let (drain, hidden) = plan::proxy_settings(doc).map_err(Error::MeshConfig)?;
        out.default_drain = out.default_drain.over(drain);
        out.default_vs_hidden |= hidden;
    }
    let (major, minor) = plan::DEFAULT_TRAFFIC_POLICY_SINCE;
    let since = Minor { major, minor };
    out.default_traffic_supported = !istiods.is_empty()
        && istiods
            .iter()
            .all(|(_, i)| Minor::parse(&i.version).is_some_and(|v| v >= since));
    Ok(out)
}
