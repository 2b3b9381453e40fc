//! One reconcile of one policy: evaluate every rule section, write status when it changed,
//! publish Events, record metrics, and decide when to look again.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::{Running, State};
use crate::api::MeshPolicy;
use crate::context::Context;
use crate::error::{Error, Result, Retry, backoff};
use crate::policy;
use crate::rules::{RuleReport, Section, Sections};
use crate::status;
use crate::status::conditions::{self, Status, types};
use crate::status::pace::{Pace, pace};
use crate::status::reasons;
use crate::write::FIELD_MANAGER;

/// Periodic re-check of every policy, as a safety net behind the watches.
pub(super) const RESYNC: Duration = Duration::from_secs(300);

/// How long a status write may take before it gives way to an evaluation of the same policy
/// queued meanwhile (see [`reconcile`]). A status write takes milliseconds; one that has not
/// been answered by then is waiting for the API server (after a restart, a custom resource is
/// served a few seconds after the server says it is ready, and the client sets no read
/// timeout).
const GIVE_WAY_AFTER: Duration = Duration::from_secs(1);

/// Runs every rule section of one policy. Pure of status; used by the reconciler and tests.
pub async fn evaluate(
    ctx: &Context,
    policy: &MeshPolicy,
    all: &[&MeshPolicy],
) -> (Vec<RuleReport>, Vec<policy::Conflict>) {
    let (spec, conflicts) = policy::resolve(policy, all);
    let mut reports = Vec::with_capacity(Section::ALL.len());
    for section in Section::ALL {
        reports.push(section.run(ctx, policy, &spec).await);
    }
    (reports, conflicts)
}

/// A policy's last evaluation: what it was evaluated against and every section's report.
#[derive(Clone)]
pub(super) struct Memo {
    generation: Option<i64>,
    /// The spec after conflicts were resolved.
    spec: crate::api::MeshPolicySpec,
    /// Shared with the reconcile that made them and the next one's reuse: a report section's
    /// violations can number thousands, and are not copied.
    reports: Vec<Arc<RuleReport>>,
    /// When every section was last evaluated.
    full_at: std::time::Instant,
}

/// Evaluates the sections of `dirty` and reuses the last reports of the others, when the last
/// evaluation was of the same spec and generation, less than [`RESYNC`] ago, and the reused
/// section was settled (True, nothing corrected); otherwise (`dirty` is `None`: the
/// policy itself changed or was requeued) evaluates every section. A reused report carries no
/// corrections, which were counted and published when they were made.
async fn evaluate_dirty(
    ctx: &Context,
    policy: &MeshPolicy,
    all: &[&MeshPolicy],
    dirty: Option<Sections>,
    memo: Option<Memo>,
) -> (Vec<Arc<RuleReport>>, Vec<policy::Conflict>, Memo) {
    let (spec, conflicts) = policy::resolve(policy, all);
    let reusable = memo.filter(|m| {
        dirty.is_some()
            && m.generation == policy.metadata.generation
            && m.spec == spec
            && m.full_at.elapsed() < RESYNC
    });
    let dirty = dirty.unwrap_or(Sections::ALL);
    let mut reports = Vec::with_capacity(Section::ALL.len());
    for (i, section) in Section::ALL.into_iter().enumerate() {
        // Only a settled section is reused: True, and nothing corrected in its last pass
        // (a correction's effects, rollouts and holds are followed up by evaluating again);
        // a report-only section's False too (nothing of it is followed up).
        let settled = |r: &&Arc<RuleReport>| match r.condition.status {
            Status::True => r.corrected == 0,
            Status::False => section.reports_only(),
            Status::Unknown => false,
        };
        let last = reusable
            .as_ref()
            .and_then(|m| m.reports.get(i))
            .filter(settled);
        match last {
            Some(r) if !dirty.contains(section) => {
                reports.push(if r.corrected == 0 && r.corrections.is_empty() {
                    r.clone()
                } else {
                    Arc::new(RuleReport {
                        corrected: 0,
                        corrections: Vec::new(),
                        ..RuleReport::clone(r)
                    })
                })
            }
            _ => {
                let report = section.run(ctx, policy, &spec).await;
                // Sections the policy does not declare are not counted.
                if report.condition.reason != crate::status::reasons::NOT_CONFIGURED {
                    ctx.metrics
                        .section_evaluations
                        .get_or_create(&crate::telemetry::SectionLabels {
                            section: section.field().to_string(),
                        })
                        .inc();
                }
                reports.push(Arc::new(report))
            }
        }
    }
    tracing::debug!(sections = ?dirty, reused = reusable.is_some(), "evaluated");
    let memo = Memo {
        generation: policy.metadata.generation,
        full_at: match &reusable {
            Some(m) => m.full_at,
            None => std::time::Instant::now(),
        },
        spec,
        reports: reports.clone(),
    };
    (reports, conflicts, memo)
}

/// A status this process wrote: the resourceVersion of the policy it was built from, the one
/// the write produced, and the status itself.
#[derive(Clone)]
pub(super) struct Written {
    from: Option<String>,
    to: Option<String>,
    status: crate::api::MeshPolicyStatus,
}

/// A policy's status writes, paced ([`status::pace`]).
#[derive(Clone, Default)]
pub(super) struct Paced {
    /// When the last status writes were sent, whatever their outcome.
    sent: crate::status::pace::Sent,
    /// The latest status built and not written: coalesced, or its write ended without an
    /// answer. The next status is built on it, so that it keeps its corrections and
    /// transition times, and it is written when `due` comes (or whatever newer status was
    /// built by then; a failed write is retried with the reconcile's backoff).
    pending: Option<crate::api::MeshPolicyStatus>,
    /// When a coalesced status is to be written; the reconcile asks to run again then.
    due: Option<std::time::Instant>,
}

impl Paced {
    /// How long until the coalesced status is due, if one is.
    fn due_in(&self) -> Option<Duration> {
        self.due
            .map(|d| d.saturating_duration_since(std::time::Instant::now()))
    }
}

/// The policy's status as this process knows it: the status it last wrote while the store
/// holds an older object than that write produced, else the store's. The store is behind when
/// its watch has not delivered the write yet, and also when it listed again after an outage:
/// a LIST answered before the write (or from the API server's watch cache, which may lag)
/// hands the store an object older than the write, and the relist itself asks for every
/// policy to be evaluated at once. Without this a reconcile would compare with the older
/// status, write again and publish the same transitions twice. Objects are ordered by
/// resourceVersion, which Kubernetes defines as comparable integers for objects of one
/// resource (KEP-5504, GA in 1.35); where one is not such an integer, only the object the
/// write was built from counts as older.
pub(super) fn own_view<'a>(
    policy: &'a MeshPolicy,
    written: Option<&'a Written>,
) -> Option<&'a crate::api::MeshPolicyStatus> {
    let stored = policy.metadata.resource_version.as_deref();
    match written {
        Some(w) if w.from.is_some() && w.from.as_deref() == stored => Some(&w.status),
        Some(w) if older(stored, w.to.as_deref()) => Some(&w.status),
        _ => policy.status.as_ref(),
    }
}

/// Whether the store's `policy` carries a status this process did not write: newer than its
/// last write (`written`) and different from it. A status write that gave way (see
/// [`reconcile`]) may still land after the one that took over; the policy is then evaluated
/// again rather than left with the older status.
pub(super) fn foreign_status(policy: &MeshPolicy, written: Option<&Written>) -> bool {
    let (Some(w), Some(status)) = (written, policy.status.as_ref()) else {
        return false;
    };
    older(w.to.as_deref(), policy.metadata.resource_version.as_deref())
        && !status::unchanged(Some(&w.status), status)
}

/// Whether resourceVersion `a` is older than `b` (both decimal integers as the API server
/// writes them: no sign, no leading zero).
fn older(a: Option<&str>, b: Option<&str>) -> bool {
    let number = |v: Option<&str>| {
        v.filter(|v| !v.starts_with('0') && !v.is_empty() && v.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|v| v.parse::<u128>().ok())
    };
    matches!((number(a), number(b)), (Some(a), Some(b)) if a < b)
}

/// Reconciles one policy. A policy deleted while it was evaluated loses the metric series its
/// sections set meanwhile: the deletion's own cleanup may have run before them, and nothing
/// else would remove them.
pub(super) async fn reconcile(policy: Arc<MeshPolicy>, state: Arc<State>) -> Result<Action> {
    let name = policy.name_any();
    let out = reconcile_policy(policy, state.clone()).await;
    let present = state.store.read().ok().is_some_and(|s| {
        s.as_ref()
            .is_none_or(|s| s.state().iter().any(|p| p.name_any() == name))
    });
    if !present {
        state.ctx.metrics.forget_policy(&name);
    }
    out
}

#[tracing::instrument(skip_all, fields(policy = %policy.name_any(), generation = policy.metadata.generation))]
async fn reconcile_policy(policy: Arc<MeshPolicy>, state: Arc<State>) -> Result<Action> {
    let running = Running::enter(&state.in_flight, &state.ctx.metrics);
    let ctx = &state.ctx;
    let name = policy.name_any();
    tracing::debug!("reconcile starts");
    // Being deleted while it holds meshwarden's finalizer: only what has to go before it.
    if policy.metadata.deletion_timestamp.is_some()
        && policy
            .finalizers()
            .iter()
            .any(|f| f == crate::rules::gateway_api::FINALIZER)
    {
        return match crate::rules::gateway_api::finalize(ctx, &policy).await? {
            true => Ok(Action::await_change()),
            false => Ok(Action::requeue(Duration::from_secs(2))),
        };
    }
    let all: Vec<Arc<MeshPolicy>> = state
        .store
        .read()
        .ok()
        .and_then(|s| s.as_ref().map(|s| s.state()))
        .unwrap_or_default();
    let refs: Vec<&MeshPolicy> = all.iter().map(|p| p.as_ref()).collect();
    let mut paced = state.paced.lock().map_or_else(
        |_| Paced::default(),
        |mut p| {
            p.retain(|k, _| all.iter().any(|p| p.name_any() == *k));
            p.get(&name).cloned().unwrap_or_default()
        },
    );
    // Run when a coalesced status is due (the requeue asked for it), and no event came: what
    // an event concerned was evaluated by the reconcile that coalesced it, so the sections
    // are evaluated as after an event concerning none of them (the unsettled ones again).
    let flush = paced.due.is_some_and(|d| d <= std::time::Instant::now());
    let dirty = state
        .triggers
        .take_dirty(&kube::runtime::reflector::ObjectRef::from_obj(
            policy.as_ref(),
        ))
        .or(flush.then_some(Sections::NONE));
    let memo = state.memo.lock().ok().and_then(|m| m.get(&name).cloned());
    let (reports, conflicts, memo) = evaluate_dirty(ctx, &policy, &refs, dirty, memo).await;
    if let Ok(mut m) = state.memo.lock() {
        m.retain(|k, _| all.iter().any(|p| p.name_any() == *k));
        m.insert(name.clone(), memo);
    }
    let written = state.written.lock().ok().and_then(|w| {
        let mut w = w;
        w.retain(|k, _| all.iter().any(|p| p.name_any() == *k));
        w.get(&name).cloned()
    });
    let current = own_view(&policy, written.as_ref());

    let now = Time(jiff::Timestamp::now());
    // Built on the latest status built, written or not.
    let new_status = status::build(
        paced.pending.as_ref().or(current),
        policy.metadata.generation,
        &reports,
        &conflicts,
        &now,
    );
    let unsure = state.unsure.lock().is_ok_and(|mut u| {
        u.retain(|k| all.iter().any(|p| p.name_any() == *k));
        u.contains(&name)
    });
    // While things move, writes are coalesced: at most one per interval, the latest status.
    let sent = std::time::Instant::now();
    let decision = pace(sent, paced.sent, current, &new_status, unsure);
    (paced.pending, paced.due) = match decision {
        Pace::Nothing => (None, None),
        Pace::Defer(due) => (Some(new_status.clone()), Some(due)),
        Pace::Write => {
            paced.sent.record(sent);
            (Some(new_status.clone()), None)
        }
    };
    let keep = |paced: &Paced| {
        if let Ok(mut p) = state.paced.lock() {
            p.insert(name.clone(), paced.clone());
        }
    };
    keep(&paced);
    let outcome = match decision {
        Pace::Write => write_status(&state, &policy, &new_status, &running).await,
        Pace::Defer(_) | Pace::Nothing => Ok(false),
    };
    // Corrections were made whatever became of the status write: their Events go out now;
    // the conditions' transitions only with the write that shows them.
    let before = current.map(|s| s.conditions.clone()).unwrap_or_default();
    let after = match outcome {
        Ok(true) => {
            paced.pending = None;
            keep(&paced);
            Some(new_status.conditions.as_slice())
        }
        _ => None,
    };
    publish_events(ctx, &policy, &before, after, &reports).await;
    match outcome {
        Err(e) => return Err(e),
        // It gave way to the evaluation queued meanwhile, which runs next.
        Ok(false) if decision == Pace::Write => return Ok(Action::requeue(RESYNC)),
        Ok(_) => {}
    }

    let names: Vec<String> = all.iter().map(|p| p.name_any()).collect();
    ctx.metrics.retain_policies(&names);
    record_metrics(ctx, &name, &reports, &new_status);

    // A section that could not be evaluated, or whose writes the API server refused (an
    // admission policy, a change freeze), is retried with backoff.
    let failing: Vec<&Arc<RuleReport>> = reports
        .iter()
        .filter(|r| {
            r.condition.status == Status::Unknown || r.condition.reason == reasons::WRITE_FAILED
        })
        .collect();
    if failing.is_empty() {
        ctx.succeeded(&name);
        info!(
            policy = %name,
            targets = new_status.targets,
            violations = new_status.violation_count,
            took_ms = running.elapsed().as_millis() as u64,
            "reconciled"
        );
        // A section that changes with time alone (a certificate nearing expiry) asks to be
        // evaluated again when it will have.
        let next = reports
            .iter()
            .filter_map(|r| r.recheck_in)
            .chain(paced.due_in())
            .min()
            .map_or(RESYNC, |d| d.min(RESYNC));
        Ok(Action::requeue(next))
    } else {
        let n = ctx.failed(&name);
        let retry = if failing
            .iter()
            .any(|r| r.condition.reason == reasons::FORBIDDEN)
        {
            Retry::Permission
        } else {
            Retry::Transient
        };
        let wait = backoff(retry, n).min(paced.due_in().unwrap_or(RESYNC));
        for r in failing {
            warn!(policy = %name, rule = %r.condition.type_, reason = %r.condition.reason, message = %r.condition.message, "rule failed");
        }
        Ok(Action::requeue(wait))
    }
}

/// Writes `status` (server-side apply of the status subresource) and records it as the
/// policy's last write. `Ok(false)`: the write gave way, unanswered after [`GIVE_WAY_AFTER`]
/// while an evaluation of the policy was queued (see [`reconcile`]).
async fn write_status(
    state: &State,
    policy: &MeshPolicy,
    status: &crate::api::MeshPolicyStatus,
    running: &Running<'_>,
) -> Result<bool> {
    let name = policy.name_any();
    // A write that ended without an answer may have been applied after all: the status is
    // written again, whatever it is compared with.
    let mark_unsure = || {
        if let Ok(mut u) = state.unsure.lock() {
            u.insert(name.clone());
        }
    };
    let api: Api<MeshPolicy> = Api::all(state.ctx.client.clone());
    let patch = json!({
        "apiVersion": "meshwarden.io/v1alpha1",
        "kind": "MeshPolicy",
        "status": status,
    });
    let (params, patch) = (
        PatchParams::apply(FIELD_MANAGER).force(),
        Patch::Apply(&patch),
    );
    let write = api.patch_status(&name, &params, &patch);
    // A write the API server does not answer would hold the policy, and every evaluation
    // queued for it (the one a relist asks for included) would wait behind it: after a
    // second, a queued evaluation takes over, with caches at least as current, and writes
    // its own status. Nothing was recorded for this one, nor its transitions published.
    let oref = kube::runtime::reflector::ObjectRef::from_obj(policy);
    let written = tokio::select! {
        w = write => w.map_err(|e| {
            mark_unsure();
            Error::kube(format!("update status of MeshPolicy {name}"), e)
        })?,
        () = state.triggers.queued_after(&oref, GIVE_WAY_AFTER) => {
            mark_unsure();
            warn!(policy = %name, reconcile_ms = running.elapsed().as_millis() as u64,
                "status write not answered; it gives way to the evaluation queued since");
            return Ok(false);
        }
    };
    if let Ok(mut u) = state.unsure.lock() {
        u.remove(&name);
    }
    if let Ok(mut w) = state.written.lock() {
        w.insert(
            name.clone(),
            Written {
                from: policy.metadata.resource_version.clone(),
                to: written.metadata.resource_version,
                status: status.clone(),
            },
        );
    }
    Ok(true)
}

/// Publishes the Events of `reports`' corrections and, when `after` is given (the status
/// written), of the conditions' transitions from `before`.
async fn publish_events(
    ctx: &Context,
    policy: &MeshPolicy,
    before: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    after: Option<&[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]>,
    reports: &[Arc<RuleReport>],
) {
    let reference = policy.object_ref(&());
    let mut events: Vec<Event> = after
        .map(|after| conditions::transitions(before, after))
        .unwrap_or_default()
        .into_iter()
        .map(|c| Event {
            type_: if c.status == "True" {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: c.reason.clone(),
            note: Some(conditions::truncate(
                &format!("{}: {}", c.type_, c.message),
                1000,
            )),
            action: c.type_.clone(),
            secondary: None,
        })
        .collect();
    for r in reports {
        for line in r.corrections.iter().take(5) {
            events.push(Event {
                type_: EventType::Normal,
                reason: reasons::CORRECTED.into(),
                note: Some(conditions::truncate(line, 1000)),
                action: r.condition.type_.clone(),
                secondary: None,
            });
        }
    }
    for ev in events {
        // A recorder of its own per Event: a recorder folds every Event with the same reason
        // and action into one series and keeps only the first note, so the corrections of one
        // reconcile (reason `Corrected`, action the section) would show as one, counted.
        let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
        if let Err(e) = recorder.publish(&ev, &reference).await {
            warn!(policy = %policy.name_any(), error = %e, "cannot publish event");
        }
    }
}

fn record_metrics(
    ctx: &Context,
    policy: &str,
    reports: &[Arc<RuleReport>],
    status: &crate::api::MeshPolicyStatus,
) {
    use crate::telemetry::{ErrorLabels, PolicyLabels, RuleLabels};
    let m = &ctx.metrics;
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == types::READY && c.status == "True");
    m.policy_ready
        .get_or_create(&PolicyLabels {
            policy: policy.to_string(),
        })
        .set(i64::from(ready));
    m.set_rule_reasons(
        policy,
        &reports
            .iter()
            .map(|r| (r.condition.type_.clone(), r.condition.reason.clone()))
            .collect(),
    );
    for r in reports {
        let labels = RuleLabels {
            policy: policy.to_string(),
            rule: r.condition.type_.clone(),
        };
        m.violations
            .get_or_create(&labels)
            .set(i64::try_from(r.violations.len()).unwrap_or(i64::MAX));
        if r.corrected > 0 {
            m.corrections
                .get_or_create(&labels)
                .inc_by(u64::try_from(r.corrected).unwrap_or(0));
        }
        if r.condition.status == Status::Unknown {
            m.reconcile_errors
                .get_or_create(&ErrorLabels {
                    kind: r.condition.reason.clone(),
                })
                .inc();
        }
    }
}

pub(super) fn error_policy(policy: Arc<MeshPolicy>, err: &Error, state: Arc<State>) -> Action {
    let n = state.ctx.failed(&policy.name_any());
    state
        .ctx
        .metrics
        .reconcile_errors
        .get_or_create(&crate::telemetry::ErrorLabels {
            kind: reasons::of_error(err).to_string(),
        })
        .inc();
    warn!(policy = %policy.name_any(), error = %err, "reconcile failed");
    Action::requeue(err.backoff(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rv: &str, corrected: i32) -> MeshPolicy {
        let mut p = MeshPolicy::new("p", Default::default());
        p.metadata.resource_version = Some(rv.into());
        p.status = Some(crate::api::MeshPolicyStatus {
            corrected,
            ..Default::default()
        });
        p
    }

    #[test]
    fn own_view_is_the_last_write_until_the_store_has_it() {
        let written = Written {
            from: Some("10".into()),
            to: None,
            status: crate::api::MeshPolicyStatus {
                corrected: 2,
                ..Default::default()
            },
        };
        // The store still holds the object the write was built from: the write is newer.
        let stale = policy("10", 1);
        assert_eq!(
            own_view(&stale, Some(&written)).map(|s| s.corrected),
            Some(2)
        );
        // The store moved on (the write, or someone else's change): the store's.
        let moved = policy("11", 1);
        assert_eq!(
            own_view(&moved, Some(&written)).map(|s| s.corrected),
            Some(1)
        );
        // Nothing written yet.
        assert_eq!(own_view(&stale, None).map(|s| s.corrected), Some(1));
    }

    /// After an outage: one reconcile wrote `Unknown` (10 → 20) while the policy watch was
    /// down, the next wrote the recovery (built from the store's 10 again, written as 30) and
    /// published its transitions. The policy watch then lists again and hands the store 20
    /// (listed before the second write landed, or served by a lagging watch cache), and the
    /// relist asks for an evaluation at once: it must compare with 30's status, or it writes
    /// the recovery again and publishes the same Events a second time.
    #[test]
    fn own_view_is_the_last_write_while_a_relist_hands_the_store_an_older_object() {
        let written = Written {
            from: Some("10".into()),
            to: Some("30".into()),
            status: crate::api::MeshPolicyStatus {
                corrected: 2,
                ..Default::default()
            },
        };
        let seen = |rv: &str, corrected| {
            own_view(&policy(rv, corrected), Some(&written)).map(|s| s.corrected)
        };
        assert_eq!(seen("20", 1), Some(2), "listed before the write: ours");
        assert_eq!(seen("9", 1), Some(2));
        assert_eq!(seen("30", 2), Some(2), "the store has the write");
        assert_eq!(seen("31", 5), Some(5), "newer than the write: the store's");
        // resourceVersions that are not integers are not ordered: only `from` is older.
        let odd = Written {
            from: Some("a".into()),
            to: Some("c".into()),
            ..written.clone()
        };
        assert_eq!(
            own_view(&policy("b", 1), Some(&odd)).map(|s| s.corrected),
            Some(1)
        );
        // A status newer than the write and different from it is someone else's.
        assert!(!foreign_status(&policy("30", 2), Some(&written)));
        assert!(!foreign_status(&policy("20", 1), Some(&written)));
        assert!(foreign_status(&policy("31", 1), Some(&written)));
        assert!(!foreign_status(&policy("31", 2), Some(&written)));
        assert!(!older(Some("020"), Some("30")));
        assert!(!older(None, Some("30")));
        assert!(older(Some("99"), Some("100")));
    }
}
