//! The section's condition: its status, reason and message from what one pass decided and did.

use super::*;

/// What one pass did with its targets (ids), for the condition.
#[derive(Debug, Default)]
pub(super) struct Tally {
    pub started: Vec<String>,
    pub rolling: Vec<String>,
    /// Waiting for a rollout slot.
    pub held: Vec<String>,
    /// Held or skipped by the rollout gate ([`availability`]).
    pub gated: Vec<String>,
    pub stalled: Vec<String>,
    pub fights: Vec<String>,
    pub takeovers: Vec<String>,
    /// Writes that failed in this pass, and the first error.
    pub failed_writes: usize,
    pub first_error: Option<String>,
    /// Targets not written this pass whose last write failed, and the first such error.
    pub earlier_failures: usize,
    pub first_failure: Option<String>,
}

/// What the condition is decided from besides the [`Tally`].
pub(super) struct Seen<'a> {
    pub spec: &'a SidecarSpec,
    pub desired: &'a Desired,
    pub revisions: &'a Revisions,
    pub classified: &'a Classified,
    pub decisions: &'a [Decision],
    pub unfit: &'a BTreeMap<String, Vec<String>>,
    pub ambient: &'a [String],
    pub unknown_revision: &'a [(String, String)],
    pub enforce: bool,
}

/// Sets the condition of `report` (and adds the unknown-revision violations).
pub(super) fn condition(report: &mut RuleReport, t: &Tally, seen: &Seen<'_>, stats: &SidecarStats) {
    let ctype = types::SIDECAR_RESOURCES;
    let Seen {
        spec,
        desired,
        revisions,
        classified,
        decisions,
        unfit,
        ambient,
        unknown_revision,
        enforce,
    } = *seen;
    let no_targets = classified.targets.is_empty() && classified.settled == 0;
    let paced = spec.pacing == Pacing::Paced;
    let mut msg = vec![format!(
        "{} of {} workload(s) have the declared sidecar resources ({})",
        report.compliant,
        report.targets,
        desired.summary()
    )];
    msg.extend(desired.notes.iter().cloned());
    if !t.started.is_empty() {
        msg.push(format!("started the rollout of {}", list(&t.started, 5)));
    }
    if !t.rolling.is_empty() {
        msg.push(format!(
            "rolling because of meshwarden: {}",
            list(&t.rolling, 5)
        ));
    }
    if !t.held.is_empty() {
        msg.push(format!(
            "{} workload(s) wait for a rollout slot (maxConcurrentRollouts {}): {}",
            t.held.len(),
            spec.max_concurrent_rollouts,
            list(&t.held, 5)
        ));
    }
    if !t.gated.is_empty() {
        msg.push(format!(
            "{} workload(s) held by the rollout gate: rolling them now would cost their availability (strategy, replicas or a PodDisruptionBudget), or would roll no pod (OnDelete); see the violations: {}",
            t.gated.len(),
            list(&t.gated, 5)
        ));
    }
    if !t.stalled.is_empty() && paced {
        msg.push(format!(
            "the rollout of {} stalled; no other sidecar rollout starts until it completes or is rolled back (kubectl rollout status)",
            list(&t.stalled, 5)
        ));
    } else if !t.stalled.is_empty() {
        msg.push(format!(
            "the rollout of {} stalled (kubectl rollout status); pacing is off, so other rollouts were not held",
            list(&t.stalled, 5)
        ));
    }
    for (ns, why) in unfit {
        msg.push(format!(
            "namespace {ns} skipped, the declared resources do not fit: {}",
            why.join("; ")
        ));
    }
    msg.extend(messages::fight_sentence(&t.fights, Contested::Objects));
    if !t.takeovers.is_empty() {
        msg.push(format!(
            "meshwarden took over proxy annotations another manager set: {}",
            list(&t.takeovers, 5)
        ));
    }
    if !classified.opted_out.is_empty() {
        msg.push(format!(
            "opted out ({IGNORE_ANNOTATION}: {IGNORE_VALUE}): {}",
            list(&classified.opted_out, 10)
        ));
    }
    if !classified.other_rule.is_empty() {
        msg.push(format!(
            "left to meshwarden's HA rules: {}",
            list(&classified.other_rule, 5)
        ));
    }
    if !ambient.is_empty() {
        msg.push(format!(
            "ambient namespaces have no sidecars: {}",
            list(ambient, 5)
        ));
    }
    for (ns, rev) in unknown_revision {
        report.violations.push(Violation {
            rule: ctype.into(),
            object: format!("Namespace/{ns}"),
            message: format!(
                "{}: the section holds nothing there; label the namespace with a live revision or tag, or remove the label",
                revisions.unknown_message(rev)
            ),
            action: ViolationAction::Reported,
        });
    }
    if !unknown_revision.is_empty() {
        let names: Vec<String> = unknown_revision
            .iter()
            .map(|(ns, rev)| format!("{ns} (istio.io/rev={rev})"))
            .collect();
        msg.push(format!(
            "namespaces whose revision label names no live revision or tag get no sidecar: {}",
            list(&names, 5)
        ));
    }
    if !stats.pod_drift.is_empty() {
        // A few namespaces by name: the metric has them all.
        let mut parts: Vec<String> = stats
            .pod_drift
            .iter()
            .take(DRIFT_NAMESPACES)
            .map(|(ns, drift)| format!("{ns}: {} ({})", drift.pods, drift.names()))
            .collect();
        if stats.pod_drift.len() > DRIFT_NAMESPACES {
            parts.push(format!(
                "and {} more namespace(s) (metric meshwarden_sidecar_drift_pods)",
                stats.pod_drift.len() - DRIFT_NAMESPACES
            ));
        }
        let total: usize = stats.pod_drift.values().map(|d| d.pods).sum();
        msg.push(format!(
            "{total} running pod(s) have other istio-proxy resources than declared: {}",
            parts.join("; ")
        ));
    }
    if !enforce && !report.violations.is_empty() {
        msg.push("Audit mode: nothing was changed".into());
    }

    let audit_deviations = decisions.iter().any(|d| d.action == Action::Reported);
    if let Some(e) = t.first_error.clone().or(t.first_failure.clone()) {
        msg.push(format!(
            "{} write(s) failed (first: {e}); those targets are retried after the others",
            t.failed_writes + t.earlier_failures
        ));
    }
    let (status, reason) = if !t.stalled.is_empty() {
        (Status::False, reasons::ROLLOUT_STALLED)
    } else if t.first_error.is_some() || t.earlier_failures > 0 {
        (Status::False, reasons::WRITE_FAILED)
    } else if !unfit.is_empty() {
        (Status::False, reasons::QUOTA_CONFLICT)
    } else if !t.fights.is_empty() {
        (Status::False, reasons::FIGHT_DETECTED)
    } else if !unknown_revision.is_empty() {
        (Status::False, reasons::UNKNOWN_REVISION)
    } else if audit_deviations {
        (Status::False, reasons::NON_COMPLIANT)
    } else if !t.gated.is_empty() {
        (Status::False, reasons::ROLLOUT_HELD)
    } else if !t.held.is_empty() || !t.rolling.is_empty() {
        (Status::False, reasons::ROLLOUT_IN_PROGRESS)
    } else if no_targets {
        (Status::False, reasons::NO_TARGETS)
    } else if report.corrected > 0 {
        (Status::True, reasons::CORRECTED)
    } else {
        (Status::True, reasons::COMPLIANT)
    };
    if no_targets {
        msg[0] = "no Deployment, StatefulSet or DaemonSet with an injected sidecar in the selected namespaces (default: istio-injection=enabled or istio.io/rev)".into();
    }
    report.condition = Observed::new(ctype, status, reason, msg.join(". "));
}
