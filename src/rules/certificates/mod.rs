//! The `certificates` section: how long the mesh's root certificates have left. Roots are
//! read from Istio's public `istio-ca-root-cert` ConfigMaps ([`cache`]), so no access to
//! Secrets is needed (a Secret is read only when a policy names it and the chart grants it:
//! [`secrets`]); [`plan`] groups them by fingerprint and weighs them against
//! `warnBefore`. The section only reports: it never writes to the mesh. As time passes
//! without events, the report asks to be evaluated again when the next root crosses a
//! threshold ([`RuleReport::recheck_in`]).

pub mod cache;
pub mod facts;
pub mod plan;
pub mod secrets;
#[cfg(test)]
mod tests;

use std::time::Duration;

use kube::ResourceExt;

pub use cache::RootCache;

use crate::api::{CertificatesSpec, MeshPolicy};
use crate::context::Context;
use crate::error::Error;
use crate::status::RuleReport;
use crate::status::conditions::types;

/// Evaluates the section for `policy`.
pub async fn reconcile(ctx: &Context, policy: &MeshPolicy, spec: &CertificatesSpec) -> RuleReport {
    let ctype = types::CERTIFICATES;
    let warn_before = match facts::parse_go_duration("certificates.warnBefore", &spec.warn_before) {
        Ok(d) => d,
        Err(e) => return RuleReport::failed(ctype, &Error::InvalidSpec(e)),
    };
    let bundles = match ctx.cache::<RootCache>() {
        Some(c) => c
            .bundles(Duration::from_secs(10))
            .await
            .map_err(Error::Cache),
        None => cache::list(&ctx.client).await,
    };
    let mut bundles = match bundles {
        Ok(b) => b,
        Err(e) => return RuleReport::failed(ctype, &e),
    };
    match secrets::read(&ctx.client, &spec.secrets).await {
        Ok(s) => bundles.extend(s),
        Err(e) => return RuleReport::failed(ctype, &e),
    }
    let plan = plan::plan(&bundles, jiff::Timestamp::now().as_second(), warn_before);
    ctx.metrics.set_root_certificates(
        &policy.name_any(),
        Some(
            plan.roots
                .iter()
                .map(|r| {
                    (
                        r.fact.fingerprint.clone(),
                        r.fact.subject.clone(),
                        r.fact.not_after,
                    )
                })
                .collect(),
        ),
    );
    plan::report(&plan, &spec.warn_before)
}
