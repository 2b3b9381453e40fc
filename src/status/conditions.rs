//! Kubernetes-style conditions: merging new observations into the current list so that
//! `lastTransitionTime` moves only when `status` flips, and comparing lists without timestamps
//! so that an unchanged status is never written again.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Condition types written by meshwarden.
pub mod types {
    pub const READY: &str = "Ready";
    pub const CONTROL_PLANE_HA: &str = "ControlPlaneHA";
    pub const GATEWAY_HA: &str = "GatewayHA";
    pub const GATEWAY_API_HA: &str = "GatewayAPIHA";
    pub const SIDECAR_RESOURCES: &str = "SidecarResources";
    pub const MUTUAL_TLS: &str = "MutualTLS";
    pub const UPGRADES: &str = "Upgrades";
    pub const CERTIFICATES: &str = "Certificates";
    pub const AMBIENT_DATA_PLANE: &str = "AmbientDataPlane";
    pub const RESILIENCE: &str = "Resilience";
    pub const SECURITY: &str = "Security";
    pub const CONFLICT: &str = "Conflict";
}

/// Status of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// A condition as computed by a reconcile, before it is merged with the stored one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub type_: String,
    pub status: Status,
    pub reason: String,
    pub message: String,
}

impl Observed {
    pub fn new(
        type_: &str,
        status: Status,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Observed {
            type_: type_.to_string(),
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Merges `observed` into `current`: the result holds exactly the observed types, in the
/// order given; a condition whose status did not change keeps its `lastTransitionTime`.
pub fn merge(
    current: &[Condition],
    observed: &[Observed],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    observed
        .iter()
        .map(|o| {
            let previous = current.iter().find(|c| c.type_ == o.type_);
            let last_transition_time = match previous {
                Some(p) if p.status == o.status.as_str() => p.last_transition_time.clone(),
                _ => now.clone(),
            };
            Condition {
                type_: o.type_.clone(),
                status: o.status.as_str().to_string(),
                reason: o.reason.clone(),
                message: truncate(&o.message, 4096),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

/// True when both lists say the same thing, ignoring `lastTransitionTime`.
pub fn same_ignoring_time(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
        })
}

/// Conditions whose status or reason changed from `before` to `after` (new types included):
/// the transitions worth an Event.
pub fn transitions<'a>(before: &[Condition], after: &'a [Condition]) -> Vec<&'a Condition> {
    after
        .iter()
        .filter(|a| {
            !before
                .iter()
                .any(|b| b.type_ == a.type_ && b.status == a.status && b.reason == a.reason)
        })
        .collect()
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn new_condition_gets_now() {
        let merged = merge(
            &[],
            &[Observed::new("Ready", Status::True, "Compliant", "ok")],
            Some(3),
            &t(100),
        );
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].last_transition_time, t(100));
        assert_eq!(merged[0].observed_generation, Some(3));
        assert_eq!(merged[0].status, "True");
    }

    #[test]
    fn unchanged_status_keeps_transition_time_even_if_reason_changes() {
        let first = merge(
            &[],
            &[Observed::new("Ready", Status::False, "A", "one")],
            Some(1),
            &t(100),
        );
        let second = merge(
            &first,
            &[Observed::new("Ready", Status::False, "B", "two")],
            Some(2),
            &t(200),
        );
        assert_eq!(second[0].last_transition_time, t(100));
        assert_eq!(second[0].reason, "B");
        let third = merge(
            &second,
            &[Observed::new("Ready", Status::True, "C", "three")],
            Some(2),
            &t(300),
        );
        assert_eq!(third[0].last_transition_time, t(300));
    }

    #[test]
    fn merge_drops_types_no_longer_observed() {
        let first = merge(
            &[],
            &[
                Observed::new("Ready", Status::True, "A", ""),
                Observed::new("Conflict", Status::True, "B", ""),
            ],
            None,
            &t(1),
        );
        let second = merge(
            &first,
            &[Observed::new("Ready", Status::True, "A", "")],
            None,
            &t(2),
        );
        assert_eq!(second.len(), 1);
    }

    #[test]
    fn comparison_ignores_time_only() {
        let obs = [Observed::new("Ready", Status::True, "A", "m")];
        let a = merge(&[], &obs, Some(1), &t(1));
        let b = merge(&[], &obs, Some(1), &t(2));
        assert!(same_ignoring_time(&a, &b));
        let c = merge(&[], &obs, Some(2), &t(1));
        assert!(!same_ignoring_time(&a, &c));
        let d = merge(
            &[],
            &[Observed::new("Ready", Status::True, "A", "other")],
            Some(1),
            &t(1),
        );
        assert!(!same_ignoring_time(&a, &d));
    }

    #[test]
    fn transitions_report_status_or_reason_changes() {
        let before = merge(
            &[],
            &[
                Observed::new("Ready", Status::True, "A", "m"),
                Observed::new("MutualTLS", Status::True, "A", "m"),
            ],
            None,
            &t(1),
        );
        let after = merge(
            &before,
            &[
                Observed::new("Ready", Status::True, "A", "changed message only"),
                Observed::new("MutualTLS", Status::False, "A", "m"),
            ],
            None,
            &t(2),
        );
        let changed: Vec<_> = transitions(&before, &after)
            .iter()
            .map(|c| c.type_.clone())
            .collect();
        assert_eq!(changed, vec!["MutualTLS".to_string()]);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        let s = "é".repeat(10);
        let cut = truncate(&s, 8);
        assert!(cut.len() <= 8);
        assert!(cut.ends_with("..."));
        assert_eq!(truncate("short", 8), "short");
    }
}
