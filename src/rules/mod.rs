//! Rule sections of a MeshPolicy. Each section turns its part of the policy into a
//! [`RuleReport`]: observe (reads), plan (pure functions), write (through
//! [`crate::write::driver`], Enforce only), report. [`Section`] is the list of sections and
//! the one way the controller runs them: adding a section is adding its module and one entry
//! here.

pub mod ambient;
pub mod certificates;
pub mod gateway_api;
pub mod ha;
pub mod lazy;
pub mod mtls;
pub mod posture;
pub mod resilience;
pub mod security;
pub mod sidecars;
pub mod stores;
pub mod upgrades;

use kube::ResourceExt;
use tracing::Instrument;

use crate::api::{MeshPolicy, MeshPolicySpec};
use crate::context::Context;
use crate::policy;
use crate::status::conditions::{Observed, Status, types};
use crate::status::reasons;

pub use crate::status::RuleReport;

/// The rule sections, in the order their conditions are listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    ControlPlaneHa,
    GatewayHa,
    GatewayApi,
    SidecarResources,
    MutualTls,
    Upgrades,
    Certificates,
    Ambient,
    Resilience,
    Security,
}

impl Section {
    pub const ALL: [Section; 10] = [
        Section::ControlPlaneHa,
        Section::GatewayHa,
        Section::GatewayApi,
        Section::SidecarResources,
        Section::MutualTls,
        Section::Upgrades,
        Section::Certificates,
        Section::Ambient,
        Section::Resilience,
        Section::Security,
    ];

    /// This section alone, as a [`Sections`] set.
    pub fn only(self) -> Sections {
        Sections(1 << self as u16)
    }

    /// Reports only, from inputs whose every change is routed to it (its own watches, the
    /// namespaces, the mesh config, istiod): a report of it that is False stays true until
    /// such an event, so it is reused like a settled one.
    pub fn reports_only(self) -> bool {
        matches!(self, Section::Resilience | Section::Security)
    }

    /// The section's condition type.
    pub fn condition_type(self) -> &'static str {
        match self {
            Section::ControlPlaneHa => types::CONTROL_PLANE_HA,
            Section::GatewayHa => types::GATEWAY_HA,
            Section::GatewayApi => types::GATEWAY_API_HA,
            Section::SidecarResources => types::SIDECAR_RESOURCES,
            Section::MutualTls => types::MUTUAL_TLS,
            Section::Upgrades => types::UPGRADES,
            Section::Certificates => types::CERTIFICATES,
            Section::Ambient => types::AMBIENT_DATA_PLANE,
            Section::Resilience => types::RESILIENCE,
            Section::Security => types::SECURITY,
        }
    }

    /// The `spec` field that declares it.
    pub fn field(self) -> &'static str {
        match self {
            Section::ControlPlaneHa => "controlPlane",
            Section::GatewayHa => "gateways",
            Section::GatewayApi => "gatewayApi",
            Section::SidecarResources => "sidecars",
            Section::MutualTls => "mtls",
            Section::Upgrades => "upgrades",
            Section::Certificates => "certificates",
            Section::Ambient => "ambient",
            Section::Resilience => "resilience",
            Section::Security => "security",
        }
    }

    /// Evaluates the section of `spec` (the policy's spec after conflicts were resolved) in a
    /// span of its own.
    pub async fn run(
        self,
        ctx: &Context,
        policy: &MeshPolicy,
        spec: &MeshPolicySpec,
    ) -> RuleReport {
        let span = tracing::info_span!("section", section = self.condition_type());
        self.evaluate(ctx, policy, spec).instrument(span).await
    }

    async fn evaluate(
        self,
        ctx: &Context,
        policy: &MeshPolicy,
        spec: &MeshPolicySpec,
    ) -> RuleReport {
        let not_configured = || RuleReport::not_configured(self.condition_type(), self.field());
        match self {
            Section::ControlPlaneHa if spec.control_plane.is_some() => {
                ha::reconcile(
                    ctx,
                    policy,
                    ha::Section::ControlPlane,
                    &ha::control_plane_groups(spec),
                )
                .await
            }
            Section::GatewayHa if !spec.gateways.is_empty() => {
                ha::reconcile(
                    ctx,
                    policy,
                    ha::Section::Gateways,
                    &ha::gateway_groups(spec),
                )
                .await
            }
            Section::GatewayApi => match &spec.gateway_api {
                Some(g) => {
                    gateway_api::reconcile(ctx, policy, g, policy::effective(spec, g.enforcement))
                        .await
                }
                None => gateway_api::release(ctx, policy).await,
            },
            Section::SidecarResources => match &spec.sidecars {
                Some(s) => {
                    sidecars_section(ctx, policy, s, policy::effective(spec, s.enforcement)).await
                }
                None => {
                    ctx.metrics
                        .set_sidecar_drift(&policy.name_any(), &Default::default());
                    if let Some(c) = ctx.cache::<sidecars::Cache>() {
                        c.record_wanted(&policy.name_any(), Default::default());
                    }
                    not_configured()
                }
            },
            Section::MutualTls => match &spec.mtls {
                Some(m) => {
                    mtls::reconcile(ctx, policy, m, policy::effective(spec, m.enforcement)).await
                }
                None => not_configured(),
            },
            Section::Upgrades => match &spec.upgrades {
                Some(u) => {
                    upgrades::reconcile(ctx, policy, u, policy::effective(spec, u.enforcement))
                        .await
                }
                None => {
                    ctx.metrics
                        .set_proxies(&policy.name_any(), &Default::default());
                    not_configured()
                }
            },
            Section::Certificates => match &spec.certificates {
                Some(c) => certificates::reconcile(ctx, policy, c).await,
                None => {
                    ctx.metrics.set_root_certificates(&policy.name_any(), None);
                    not_configured()
                }
            },
            // Reports only: Audit whatever `enforcement` says.
            Section::Ambient => match &spec.ambient {
                Some(a) => ambient::reconcile(ctx, policy, a).await,
                None => not_configured(),
            },
            Section::Resilience => match &spec.resilience {
                Some(r) => resilience::reconcile(ctx, policy, r).await,
                None => not_configured(),
            },
            Section::Security => match &spec.security {
                Some(s) => security::reconcile(ctx, policy, s).await,
                None => {
                    ctx.metrics.posture.set_ca_mode(&policy.name_any(), None);
                    not_configured()
                }
            },
            _ => not_configured(),
        }
    }
}

/// A set of sections: those a change in the cluster concerns, hence those a reconcile it
/// triggers has to evaluate again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sections(u16);

impl Sections {
    pub const NONE: Sections = Sections(0);
    pub const ALL: Sections = Sections((1 << Section::ALL.len()) - 1);
    /// The HA sections (they read the same kinds).
    pub const HA: Sections = Sections(
        1 << Section::ControlPlaneHa as u16
            | 1 << Section::GatewayHa as u16
            | 1 << Section::GatewayApi as u16,
    );

    pub fn contains(self, s: Section) -> bool {
        self.0 & s.only().0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for Sections {
    type Output = Sections;
    fn bitor(self, other: Sections) -> Sections {
        Sections(self.0 | other.0)
    }
}

/// The sidecars section: `Unknown` while a cache it reads missed changes; otherwise evaluated,
/// with the pod drift kept as a metric (a failed pass keeps the last known drift).
async fn sidecars_section(
    ctx: &Context,
    policy: &MeshPolicy,
    spec: &crate::api::SidecarSpec,
    enforcement: crate::api::Enforcement,
) -> RuleReport {
    if let Some(stale) = stale_caches(
        ctx,
        types::SIDECAR_RESOURCES,
        "sidecars",
        &sidecars::WATCHES,
    ) {
        return stale;
    }
    let (report, stats) = sidecars::reconcile_with_stats(ctx, policy, spec, enforcement).await;
    if report.condition.status != Status::Unknown {
        let drift = stats
            .pod_drift
            .iter()
            .map(|(ns, drift)| (ns.clone(), drift.pods))
            .collect();
        ctx.metrics.set_sidecar_drift(&policy.name_any(), &drift);
    }
    report
}

/// `Unknown` (`CacheNotSynced`) while one of the watches a section reads (`watches`) failed
/// and has not listed again; `None` when they are all current.
pub fn stale_caches(
    ctx: &Context,
    ctype: &str,
    field: &str,
    watches: &[&str],
) -> Option<RuleReport> {
    let stale = ctx.metrics.watches.stale(watches);
    let (_, error) = stale.first()?;
    let names: Vec<&str> = stale.iter().map(|(n, _)| n.as_str()).collect();
    Some(RuleReport {
        condition: Observed::new(
            ctype,
            Status::Unknown,
            reasons::CACHE_NOT_SYNCED,
            format!(
                "the watches of {} failed ({error}) and have not listed again: the section is evaluated once they have, within seconds of the API server answering",
                names.join(", "),
            ),
        ),
        ..RuleReport::not_configured(ctype, field)
    })
}

/// Whether a policy's rules cover objects in `namespace` (routes watch events to policies).
pub fn covers_namespace(spec: &MeshPolicySpec, namespace: &str) -> bool {
    spec.control_plane
        .as_ref()
        .is_some_and(|c| c.namespace == namespace)
        || spec.gateways.iter().any(|g| g.namespace == namespace)
}
