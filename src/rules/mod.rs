//! Rule sections of a MeshPolicy. Each module turns one section into a [`RuleReport`]:
//! observe (reads), plan (pure functions), apply (server-side apply, Enforce only), report.

pub mod ha;
pub mod mtls;
pub mod sidecars;

pub use crate::status::RuleReport;

/// Whether a policy's rules cover objects in `namespace` (routes watch events to policies).
pub fn covers_namespace(spec: &crate::api::MeshPolicySpec, namespace: &str) -> bool {
    spec.control_plane
        .as_ref()
        .is_some_and(|c| c.namespace == namespace)
        || spec.gateways.iter().any(|g| g.namespace == namespace)
}
