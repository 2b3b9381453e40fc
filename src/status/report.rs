//! What one rule section reports: its condition, violations and counts.

use crate::api::Violation;
use crate::error::Error;
use crate::status::conditions::{Observed, Status};
use crate::status::reasons;

/// What one rule section found and did in one reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleReport {
    /// The section's condition (`ControlPlaneHA`, `GatewayHA`, ...).
    pub condition: Observed,
    /// Outstanding deviations (not those corrected in this reconcile).
    pub violations: Vec<Violation>,
    /// Objects the section applies to.
    pub targets: i32,
    /// Targets that meet the section after this reconcile.
    pub compliant: i32,
    /// Targets written to in this reconcile.
    pub corrected: i32,
    /// One line per correction made, for Events.
    pub corrections: Vec<String>,
    /// `status.upgrades` (the upgrades section only).
    pub upgrades: Option<crate::api::UpgradesStatus>,
    /// Evaluate again within this time even without an event (a certificate crosses a
    /// threshold as time passes).
    pub recheck_in: Option<std::time::Duration>,
    /// The root certificates found (`certificates` section only), for `status.certificates`.
    pub certificates: Option<crate::api::CertificatesStatus>,
}

impl RuleReport {
    /// A report with `condition` and nothing found yet: no targets, violations or corrections.
    pub fn new(condition: Observed) -> Self {
        RuleReport {
            condition,
            violations: Vec::new(),
            targets: 0,
            compliant: 0,
            corrected: 0,
            corrections: Vec::new(),
            upgrades: None,
            recheck_in: None,
            certificates: None,
        }
    }

    /// The section is not set in the policy: nothing to hold, nothing violated.
    pub fn not_configured(type_: &str, field: &str) -> Self {
        RuleReport::new(Observed::new(
            type_,
            Status::True,
            reasons::NOT_CONFIGURED,
            format!("spec.{field} is not set; meshwarden leaves this part of the mesh alone"),
        ))
    }

    /// The section could not be evaluated.
    pub fn failed(type_: &str, err: &Error) -> Self {
        let hint = match err.status_code() {
            Some(403) => {
                " meshwarden's ClusterRole lacks a permission: compare it with the chart's (charts/meshwarden/templates/clusterrole.yaml)."
            }
            _ => "",
        };
        RuleReport::new(Observed::new(
            type_,
            Status::Unknown,
            reasons::of_error(err),
            format!("{err}.{hint}"),
        ))
    }
}
