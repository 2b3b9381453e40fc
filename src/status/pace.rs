//! Status writes of one policy while things move (pure): at most one per [`INTERVAL`], always
//! the latest status, and never dropping the last one.
//!
//! A rollout of thousands of workloads changes the status with every finished rollout (counts,
//! the message), and every change was a write. Now the first change after a quiet interval is
//! written at once; changes within the interval after a write are coalesced: the latest one is
//! kept and written when the interval ends (the reconcile asks to be run again then). A status
//! in which a condition changes its status (a section turning False or True, `Ready` among
//! them) is news users and alerts wait for: it is written at once, once per interval (a
//! second such write within the interval is coalesced like any change), so writes stay within
//! two per interval even when a condition flaps.

use std::time::{Duration, Instant};

use super::unchanged;
use crate::api::MeshPolicyStatus;

/// The least time between two status writes of one policy (but see [`pace`]).
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What to do with a status just built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pace {
    /// Write it now.
    Write,
    /// Keep it as the policy's latest status and write it at this instant (or whatever newer
    /// status was built by then).
    Defer(Instant),
    /// Nothing to write: it is what was last written.
    Nothing,
}

/// When the last writes were sent, whatever their outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// The last write.
    pub last: Option<Instant>,
    /// The last write sent within the interval after the one before it (a condition changed
    /// its status).
    pub early: Option<Instant>,
}

impl Sent {
    /// Records a write sent at `at`.
    pub fn record(&mut self, at: Instant) {
        if self.last.is_some_and(|last| at < last + INTERVAL) {
            self.early = Some(at);
        }
        self.last = Some(at);
    }
}

/// What to do with `new`, given the status as last written (`written`), when the last writes
/// were sent (`sent`), and whether the last write may not have landed (`unsure`: it failed or
/// was abandoned, so even an unchanged status is written again).
pub fn pace(
    now: Instant,
    sent: Sent,
    written: Option<&MeshPolicyStatus>,
    new: &MeshPolicyStatus,
    unsure: bool,
) -> Pace {
    if !unsure && unchanged(written, new) {
        return Pace::Nothing;
    }
    let early_allowed = sent.early.is_none_or(|at| now >= at + INTERVAL);
    match sent.last.map(|at| at + INTERVAL) {
        Some(due) if now < due && !(early_allowed && transition(written, new)) => Pace::Defer(due),
        _ => Pace::Write,
    }
}

/// Whether a condition of `new` has another status than in `written` (or is new).
fn transition(written: Option<&MeshPolicyStatus>, new: &MeshPolicyStatus) -> bool {
    let before = |type_: &str| written.and_then(|w| w.conditions.iter().find(|c| c.type_ == type_));
    new.conditions
        .iter()
        .any(|c| before(&c.type_).is_none_or(|b| b.status != c.status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::conditions::types;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    fn status(ready: bool, compliant: i32) -> MeshPolicyStatus {
        MeshPolicyStatus {
            conditions: vec![Condition {
                type_: types::READY.into(),
                status: if ready { "True" } else { "False" }.into(),
                reason: "R".into(),
                message: "m".into(),
                last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
                observed_generation: None,
            }],
            compliant,
            ..Default::default()
        }
    }

    /// The writes (time in ms, the status's `compliant`) of statuses built at the given
    /// times, each paced; a deferred status is built again when it is due (the reconcile asks
    /// to run then), as the latest built.
    fn simulate(builds: &[(u64, MeshPolicyStatus)]) -> Vec<(u64, i32)> {
        let t0 = Instant::now();
        let (mut written, mut sent, mut latest, mut due) = (None, Sent::default(), None, None);
        let mut writes = Vec::new();
        for ms in (0..=5000).step_by(50) {
            let now = t0 + Duration::from_millis(ms);
            let new = match builds.iter().find(|b| b.0 == ms) {
                Some((_, s)) => s.clone(),
                None if due.is_some_and(|d| d <= now) => match latest.clone() {
                    Some(s) => s,
                    None => continue,
                },
                None => continue,
            };
            match pace(now, sent, written.as_ref(), &new, false) {
                Pace::Write => {
                    writes.push((ms, new.compliant));
                    sent.record(now);
                    (written, latest, due) = (Some(new), None, None);
                }
                Pace::Defer(when) => (latest, due) = (Some(new), Some(when)),
                Pace::Nothing => (latest, due) = (None, None),
            }
        }
        writes
    }

    #[test]
    fn changes_within_an_interval_are_coalesced_into_the_latest() {
        let builds: Vec<(u64, MeshPolicyStatus)> = (0..30)
            .map(|i| (i * 100, status(false, i as i32)))
            .collect();
        let writes = simulate(&builds);
        // The first at once, then one a second, each with the latest count; the last status
        // (29) is written when its interval ends, though nothing was built after it.
        assert_eq!(writes, vec![(0, 0), (1000, 10), (2000, 20), (3000, 29)]);
    }

    #[test]
    fn a_status_that_turns_ready_true_is_written_at_once() {
        let mut builds: Vec<(u64, MeshPolicyStatus)> =
            (0..5).map(|i| (i * 100, status(false, i as i32))).collect();
        builds.push((500, status(true, 5)));
        assert_eq!(simulate(&builds), vec![(0, 0), (500, 5)]);
        // Flapping: at most two writes within any interval, and the last status written.
        let flapping: Vec<(u64, MeshPolicyStatus)> = (0..30)
            .map(|i| (i * 100, status(i % 2 == 1, i as i32)))
            .collect();
        let writes = simulate(&flapping);
        for w in writes.windows(3) {
            assert!(w[2].0 - w[0].0 >= 1000, "{writes:?}");
        }
        assert_eq!(writes.last().map(|w| w.1), Some(29), "{writes:?}");
    }

    #[test]
    fn a_condition_turning_false_is_written_at_once_once_per_interval() {
        // Written at 0 (True), a count change at 300 (coalesced), a section turning False at
        // 400 (written at once), another count change at 600 (coalesced with the interval of
        // the write at 400), False again with a new count at 700 and back to True at 800: the
        // early write of the interval is spent, so 800 is written when that interval ends.
        let builds = vec![
            (0, status(true, 0)),
            (300, status(true, 1)),
            (400, status(false, 2)),
            (600, status(false, 3)),
            (800, status(true, 4)),
        ];
        assert_eq!(simulate(&builds), vec![(0, 0), (400, 2), (1400, 4)]);
    }

    #[test]
    fn an_unchanged_status_is_not_written_unless_the_last_write_is_unsure() {
        let now = Instant::now();
        let s = status(true, 1);
        let none = Sent::default();
        assert_eq!(pace(now, none, Some(&s), &s, false), Pace::Nothing);
        assert_eq!(pace(now, none, Some(&s), &s, true), Pace::Write);
        // A write that failed a moment ago is retried when the interval ends.
        let sent = Sent {
            last: Some(now - Duration::from_millis(300)),
            early: None,
        };
        assert_eq!(
            pace(now, sent, Some(&s), &s, true),
            Pace::Defer(now + Duration::from_millis(700))
        );
        assert_eq!(pace(now, none, None, &s, false), Pace::Write);
    }
}
