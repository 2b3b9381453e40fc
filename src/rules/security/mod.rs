//! The `security` section: selected namespaces without an effective default deny (an
//! allow-nothing or deny-all AuthorizationPolicy of their own or in Istio's root namespace,
//! or per workload: [`workloads`]), ambient namespaces whose policies need a waypoint
//! ([`ambient`]), the mesh's `outboundTrafficPolicy` mode, and the CA istiod signs with
//! (self-signed, plugged-in, external; also a metric). Report only, whatever `enforcement`
//! says: it never writes to the mesh. AuthorizationPolicies and the CA Secrets' metadata are
//! watched from the first reconcile that needs them ([`cache`]); no Secret's data is read.
//! Workloads and waypoints come from the sidecars section's cache ([`observe`]).

pub mod ambient;
pub mod cache;
mod observe;
pub mod plan;
pub mod policy;
#[cfg(test)]
mod tests;
pub mod workloads;

use kube::ResourceExt;

pub use cache::SecurityCache;

use crate::api::{MeshPolicy, SecuritySpec};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::rules::posture::{self, WAIT};
use crate::status::RuleReport;
use crate::status::conditions::types;

/// Evaluates the section for `policy`.
pub async fn reconcile(ctx: &Context, policy: &MeshPolicy, spec: &SecuritySpec) -> RuleReport {
    match evaluate(ctx, spec).await {
        Ok((report, ca)) => {
            ctx.metrics
                .posture
                .set_ca_mode(&policy.name_any(), Some(ca.label()));
            report
        }
        Err(e) => RuleReport::failed(types::SECURITY, &e),
    }
}

async fn evaluate(ctx: &Context, spec: &SecuritySpec) -> Result<(RuleReport, plan::CaMode)> {
    let cp = posture::control_plane(ctx).await?;
    let istio_ns = ctx.istio_namespace.clone();
    let (policies, secrets) = match ctx.cache::<SecurityCache>() {
        Some(c) => c.read(WAIT).await.map_err(Error::Cache)?,
        None => cache::list(&ctx.client, &istio_ns).await?,
    };
    let mut seen = observe::seen(ctx, spec, &cp.root).await?;
    seen.policies = policies;
    let mut outbound = "ALLOW_ANY".to_string();
    for doc in &cp.documents {
        outbound = plan::outbound_mode(doc).map_err(Error::MeshConfig)?;
    }
    let ca = plan::ca_mode(&cp.istiods, &istio_ns, secrets.as_ref());
    let plan = plan::plan(&seen, outbound, ca.clone());
    Ok((plan::report(spec, &plan, &istio_ns, &cp.root), ca))
}
