//! Assembles a MeshPolicy's status from the rule reports (pure).
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use std::borrow::Borrow;

use crate::api::{MeshPolicyStatus, Violation};
pub mod conditions;
pub mod messages;
pub mod pace;
pub mod reasons;
mod report;

pub use report::RuleReport;

use crate::policy::Conflict;
use conditions::{Observed, Status, types};

/// Most violations listed in status; `violationCount` has them all.
pub const MAX_VIOLATIONS: usize = 50;

/// The new status, given the stored one (for transition times).
pub fn build<R: std::borrow::Borrow<RuleReport>>(
    current: Option<&MeshPolicyStatus>,
    generation: Option<i64>,
    reports: &[R],
    conflicts: &[Conflict],
    now: &Time,
) -> MeshPolicyStatus {
    let reports: Vec<&RuleReport> = reports.iter().map(Borrow::borrow).collect();
    let mut observed: Vec<Observed> = Vec::new();
    let not_ready: Vec<&RuleReport> = reports
        .iter()
        .copied()
        .filter(|r| r.condition.status != Status::True)
        .collect();
    let ready = if !conflicts.is_empty() {
        Observed::new(
            types::READY,
            Status::False,
            reasons::CONFLICT,
            "another, older MeshPolicy sets some of the same rules differently; see the Conflict condition",
        )
    } else if not_ready.is_empty() {
        Observed::new(
            types::READY,
            Status::True,
            reasons::COMPLIANT,
            "every configured rule holds",
        )
    } else {
        let names: Vec<String> = not_ready
            .iter()
            .map(|r| format!("{} ({})", r.condition.type_, r.condition.reason))
            .collect();
        let status = if not_ready
            .iter()
            .any(|r| r.condition.status == Status::False)
        {
            Status::False
        } else {
            Status::Unknown
        };
        Observed::new(
            types::READY,
            status,
            reasons::RULES_NOT_READY,
            format!("not ready: {}", names.join(", ")),
        )
    };
    observed.push(ready);
    observed.extend(reports.iter().map(|r| r.condition.clone()));
    if !conflicts.is_empty() {
        let parts: Vec<String> = conflicts
            .iter()
            .map(|c| format!("spec.{} (MeshPolicy {} wins)", c.field, c.winner))
            .collect();
        observed.push(Observed::new(
            types::CONFLICT,
            Status::True,
            reasons::OLDER_POLICY_WINS,
            format!(
                "not enforced because an older MeshPolicy sets the same rule differently: {}; align the values or remove the rule from one policy",
                parts.join(", ")
            ),
        ));
    }
    let empty = Vec::new();
    let before = current.map(|s| &s.conditions).unwrap_or(&empty);
    // Counted, and only the listed ones copied: a report section may hold thousands.
    let violation_count: usize = reports.iter().map(|r| r.violations.len()).sum();
    let violations: Vec<Violation> = reports
        .iter()
        .flat_map(|r| &r.violations)
        .take(MAX_VIOLATIONS)
        .cloned()
        .collect();
    MeshPolicyStatus {
        observed_generation: generation,
        conditions: conditions::merge(before, &observed, generation, now),
        violation_count: i32::try_from(violation_count).unwrap_or(i32::MAX),
        violations,
        targets: reports.iter().map(|r| r.targets).sum(),
        compliant: reports.iter().map(|r| r.compliant).sum(),
        // Corrections add up while the spec stays the same, so that a converged pass right
        // after a correction changes nothing (and writes nothing).
        corrected: reports.iter().map(|r| r.corrected).sum::<i32>()
            + current
                .filter(|s| s.observed_generation == generation)
                .map(|s| s.corrected)
                .unwrap_or(0),
        upgrades: reports.iter().find_map(|r| r.upgrades.clone()),
        certificates: reports.iter().find_map(|r| r.certificates.clone()),
    }
}

/// True when writing `new` over `old` would change nothing but timestamps.
/// Every field is named (no `..`), so a new status field cannot escape this check.
pub fn unchanged(old: Option<&MeshPolicyStatus>, new: &MeshPolicyStatus) -> bool {
    let Some(old) = old else { return false };
    let MeshPolicyStatus {
        observed_generation,
        conditions,
        violations,
        violation_count,
        targets,
        compliant,
        corrected,
        upgrades,
        certificates,
    } = new;
    old.observed_generation == *observed_generation
        && conditions::same_ignoring_time(&old.conditions, conditions)
        && old.violations == *violations
        && old.violation_count == *violation_count
        && old.targets == *targets
        && old.compliant == *compliant
        && old.corrected == *corrected
        && old.upgrades == *upgrades
        && old.certificates == *certificates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Time {
        Time(jiff::Timestamp::from_second(s).unwrap())
    }

    fn report(type_: &str, status: Status, reason: &str, violations: usize) -> RuleReport {
        RuleReport {
            condition: Observed::new(type_, status, reason, "m"),
            violations: (0..violations)
                .map(|i| Violation {
                    rule: type_.into(),
                    object: format!("Deployment/ns/d{i}"),
                    message: "x".into(),
                    action: reasons::ViolationAction::Reported,
                })
                .collect(),
            targets: 2,
            compliant: 1,
            corrected: 0,
            corrections: vec![],
            ..RuleReport::new(Observed::new(type_, status, reason, "m"))
        }
    }

    #[test]
    fn ready_true_only_when_every_rule_is_true() {
        let ok = build(
            None,
            Some(1),
            &[report("ControlPlaneHA", Status::True, "Compliant", 0)],
            &[],
            &t(1),
        );
        assert_eq!(ok.conditions[0].type_, "Ready");
        assert_eq!(ok.conditions[0].status, "True");
        let bad = build(
            None,
            Some(1),
            &[
                report("ControlPlaneHA", Status::True, "Compliant", 0),
                report("GatewayHA", Status::False, "NonCompliant", 2),
            ],
            &[],
            &t(1),
        );
        assert_eq!(bad.conditions[0].status, "False");
        assert!(
            bad.conditions[0]
                .message
                .contains("GatewayHA (NonCompliant)")
        );
        assert_eq!(bad.violation_count, 2);
        assert_eq!(bad.targets, 4);
        assert_eq!(bad.observed_generation, Some(1));
    }

    #[test]
    fn unknown_rule_makes_ready_unknown() {
        let s = build(
            None,
            None,
            &[report("MutualTLS", Status::Unknown, "Forbidden", 0)],
            &[],
            &t(1),
        );
        assert_eq!(s.conditions[0].status, "Unknown");
    }

    #[test]
    fn violations_are_bounded_but_counted() {
        let s = build(
            None,
            None,
            &[report("GatewayHA", Status::False, "NonCompliant", 80)],
            &[],
            &t(1),
        );
        assert_eq!(s.violations.len(), MAX_VIOLATIONS);
        assert_eq!(s.violation_count, 80);
    }

    #[test]
    fn conflicts_get_a_condition_naming_the_winner() {
        let s = build(
            None,
            None,
            &[report("ControlPlaneHA", Status::True, "Compliant", 0)],
            &[Conflict {
                field: "controlPlane.replicas".into(),
                winner: "base".into(),
            }],
            &t(1),
        );
        let c = s.conditions.iter().find(|c| c.type_ == "Conflict").unwrap();
        assert!(c.message.contains("MeshPolicy base wins"));
        assert_eq!(s.conditions[0].reason, "Conflict");
    }

    #[test]
    fn corrections_add_up_within_a_generation() {
        let mut r = report("ControlPlaneHA", Status::True, "Corrected", 0);
        r.corrected = 2;
        let a = build(None, Some(1), std::slice::from_ref(&r), &[], &t(1));
        assert_eq!(a.corrected, 2);
        r.corrected = 0;
        let b = build(Some(&a), Some(1), std::slice::from_ref(&r), &[], &t(2));
        assert_eq!(b.corrected, 2, "a converged pass keeps the count");
        assert!(unchanged(Some(&a), &b));
        r.corrected = 1;
        let c = build(Some(&b), Some(1), std::slice::from_ref(&r), &[], &t(3));
        assert_eq!(c.corrected, 3);
        let d = build(Some(&c), Some(2), std::slice::from_ref(&r), &[], &t(4));
        assert_eq!(d.corrected, 1, "a new generation starts from zero");
    }

    #[test]
    fn a_second_identical_build_is_unchanged() {
        let reports = [report("ControlPlaneHA", Status::True, "Compliant", 0)];
        let a = build(None, Some(2), &reports, &[], &t(1));
        let b = build(Some(&a), Some(2), &reports, &[], &t(99));
        assert!(unchanged(Some(&a), &b));
        assert_eq!(a.conditions, b.conditions, "transition times are kept");
        let c = build(Some(&a), Some(3), &reports, &[], &t(99));
        assert!(!unchanged(Some(&a), &c));
    }
}
