//! Rollout state of Deployments, StatefulSets and DaemonSets, read from their status.

use super::*;

/// A StatefulSet or DaemonSet rollout not done this long after meshwarden's write is stalled:
/// 10 minutes (the Deployment default `progressDeadlineSeconds`) plus one minute per pod.
pub(super) const STALL_BASE_SECS: i64 = 600;

pub(super) const STALL_PER_POD_SECS: i64 = 60;

/// Where a workload stands in a rollout, as `kubectl rollout status` sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    Complete,
    InProgress(String),
    /// The template is rolled out to every replica, but not every replica is available: the
    /// tail of a rollout, or pod churn long after one (a node drained, a pod restarting).
    /// [`classify`] counts it as in progress only shortly after meshwarden's write.
    Settling(String),
    Stalled(String),
    /// A paused Deployment: its template changes do not roll out until it is resumed.
    Paused,
}

pub(super) fn annotations_of(meta: Option<&ObjectMeta>) -> BTreeMap<String, String> {
    meta.and_then(|m| m.annotations.clone()).unwrap_or_default()
}

/// Rollout state of a Deployment: the controller saw the latest generation, every replica is
/// updated, no old replica is left and every updated replica is available; stalled when the
/// `Progressing` condition says `ProgressDeadlineExceeded`.
pub fn deployment_rollout(d: &Deployment) -> Rollout {
    if d.spec.as_ref().and_then(|s| s.paused) == Some(true) {
        return Rollout::Paused;
    }
    let generation = d.metadata.generation.unwrap_or(0);
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let st = d.status.clone().unwrap_or_default();
    if st.observed_generation.unwrap_or(-1) < generation {
        return Rollout::InProgress(format!(
            "the Deployment controller has not observed generation {generation} yet"
        ));
    }
    if let Some(c) = st.conditions.iter().flatten().find(|c| {
        c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    }) {
        return Rollout::Stalled(format!(
            "Progressing condition is ProgressDeadlineExceeded: {}",
            c.message.clone().unwrap_or_default()
        ));
    }
    let updated = st.updated_replicas.unwrap_or(0);
    let recreate = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.type_.as_deref())
        == Some("Recreate");
    if recreate && updated < replicas {
        // A Recreate rollout records the new generation while it deletes the old pods, before
        // the new ReplicaSet exists, and leaves the last rollout's `NewReplicaSetAvailable`
        // in place meanwhile: that mark says nothing until every replica is updated.
        return Rollout::InProgress(format!("{updated} of {replicas} replicas updated"));
    }
    if progress_complete(&st) {
        // The controller declared the observed generation rolled out; fewer updated or
        // available replicas since are pod churn (a pod deleted and not yet replaced).
        return Rollout::Complete;
    }
    let total = st.replicas.unwrap_or(0);
    let available = st.available_replicas.unwrap_or(0);
    if updated < replicas {
        Rollout::InProgress(format!("{updated} of {replicas} replicas updated"))
    } else if total > updated {
        Rollout::InProgress(format!(
            "{} old replica(s) pending termination",
            total - updated
        ))
    } else if available < updated {
        Rollout::Settling(format!(
            "{available} of {updated} updated replicas available"
        ))
    } else {
        Rollout::Complete
    }
}

/// The Deployment controller's `Progressing` condition says the observed generation finished
/// rolling out (`NewReplicaSetAvailable`). The controller replaces that reason, in the same
/// status write that records a new `observedGeneration`, as soon as a new template has
/// replicas to roll, and keeps it while a replica of a finished rollout is deleted or becomes
/// unavailable.
pub(super) fn progress_complete(st: &k8s_openapi::api::apps::v1::DeploymentStatus) -> bool {
    st.conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Progressing" && c.reason.as_deref() == Some("NewReplicaSetAvailable"))
}

/// When the Deployment controller declared the observed generation rolled out: its
/// `Progressing` condition's `lastUpdateTime` once the reason is `NewReplicaSetAvailable` (set
/// when the reason first becomes that, kept while it stays).
pub(super) fn rolled_out_at(
    st: &k8s_openapi::api::apps::v1::DeploymentStatus,
) -> Option<jiff::Timestamp> {
    st.conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing" && c.reason.as_deref() == Some("NewReplicaSetAvailable"))
        .and_then(|c| c.last_update_time.as_ref())
        .map(|t| t.0)
}

/// Rollout state of a StatefulSet (`OnDelete` never rolls by itself: complete).
pub fn statefulset_rollout(s: &StatefulSet) -> Rollout {
    let spec = s.spec.clone().unwrap_or_default();
    let strategy = spec.update_strategy.clone().unwrap_or_default();
    if strategy.type_.as_deref() == Some("OnDelete") {
        return Rollout::Complete;
    }
    let generation = s.metadata.generation.unwrap_or(0);
    let st = s.status.clone().unwrap_or_default();
    if st.observed_generation.unwrap_or(-1) < generation {
        return Rollout::InProgress(format!(
            "the StatefulSet controller has not observed generation {generation} yet"
        ));
    }
    let replicas = spec.replicas.unwrap_or(1);
    let ready = st.ready_replicas.unwrap_or(0);
    let partition = strategy
        .rolling_update
        .and_then(|r| r.partition)
        .unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    if st.update_revision == st.current_revision {
        // The controller makes the update revision current only once every replica is
        // updated and ready, and keeps it so: a replica not ready since is pod churn.
        return Rollout::Complete;
    }
    if partition > 0 {
        // Pods of the old revision beyond the ordinals the partition keeps are still to be
        // replaced (a deleted pod lowers the counts of both revisions, not this one).
        let old = st.current_replicas.unwrap_or(0);
        if old > partition.min(replicas) {
            return Rollout::InProgress(format!(
                "{updated} of {} replicas above the partition updated",
                replicas - partition.min(replicas)
            ));
        }
        if ready < replicas {
            return Rollout::Settling(format!("{ready} of {replicas} replicas ready"));
        }
        return Rollout::Complete;
    }
    // Until every replica is updated and ready the rollout runs.
    Rollout::InProgress(format!(
        "{updated} of {replicas} replicas updated, {ready} ready"
    ))
}

/// Rollout state of a DaemonSet (`OnDelete` never rolls by itself: complete).
pub fn daemonset_rollout(d: &DaemonSet) -> Rollout {
    let spec = d.spec.clone().unwrap_or_default();
    if spec.update_strategy.and_then(|s| s.type_).as_deref() == Some("OnDelete") {
        return Rollout::Complete;
    }
    let generation = d.metadata.generation.unwrap_or(0);
    let st = d.status.clone().unwrap_or_default();
    if st.observed_generation.unwrap_or(-1) < generation {
        return Rollout::InProgress(format!(
            "the DaemonSet controller has not observed generation {generation} yet"
        ));
    }
    let want = st.desired_number_scheduled;
    let updated = st.updated_number_scheduled.unwrap_or(0);
    let available = st.number_available.unwrap_or(0);
    if updated < st.current_number_scheduled {
        // Nodes still run a pod of an older template.
        Rollout::InProgress(format!("{updated} of {want} pods updated"))
    } else if updated < want {
        // No old pod is left; some nodes have none yet (a new node): not a template rollout.
        Rollout::Settling(format!("{updated} of {want} pods scheduled"))
    } else if available < want {
        Rollout::Settling(format!("{available} of {want} pods available"))
    } else {
        Rollout::Complete
    }
}

/// The rollout meshwarden is responsible for (pure): the workload's rollout when meshwarden's
/// last write produced its current generation, `Complete` otherwise. A generation written since
/// by someone else (a `helm upgrade`, a scale) is their rollout: it neither holds a rollout slot
/// nor is ever reported stalled. Pod churn after a rollout finished (a node drained, a new
/// node) is no rollout: the kinds' rollout states tell it apart where their controllers keep
/// a lasting mark of completion (a StatefulSet's current revision, a Deployment's
/// `NewReplicaSetAvailable`); a DaemonSet has none, so pods not all available count as the
/// tail of meshwarden's rollout only while its write is recent. A StatefulSet or DaemonSet
/// whose template is still not on every pod long after meshwarden's write is stalled (a
/// Deployment says so itself: `ProgressDeadlineExceeded`). Workloads written by versions that
/// did not record the generation are taken as meshwarden's but never time out.
pub fn meshwarden_rollout(w: &WorkloadFacts, now: jiff::Timestamp) -> Rollout {
    let written = w.template_annotations.contains_key(HASH_ANNOTATION);
    paced_rollout(w, w.written_generation, written, now)
}

/// [`meshwarden_rollout`] for any write of the template meshwarden records the generation of
/// (`written_generation`; `written`: the template carries meshwarden's mark, for writes that
/// did not record one): the upgrades section's restarts use the same slots and stalls.
pub fn paced_rollout(
    w: &WorkloadFacts,
    written_generation: Option<i64>,
    written: bool,
    now: jiff::Timestamp,
) -> Rollout {
    let current = match written_generation {
        Some(g) => g == w.generation,
        None => written,
    };
    if w.rollout == Rollout::Paused {
        return Rollout::Paused;
    }
    if !current {
        return Rollout::Complete;
    }
    let limit = STALL_BASE_SECS + STALL_PER_POD_SECS * i64::from(w.replicas.max(0));
    let waited = w
        .written_at
        .map(|since| now.as_second() - since.as_second());
    match &w.rollout {
        Rollout::Settling(why) if waited.is_some_and(|s| s <= limit) => {
            Rollout::InProgress(why.clone())
        }
        Rollout::Settling(_) => Rollout::Complete,
        Rollout::InProgress(why)
            if w.kind != Kind::Deployment
                && written_generation.is_some()
                && waited.is_some_and(|s| s > limit) =>
        {
            Rollout::Stalled(format!(
                "not rolled out {}s after meshwarden changed it (limit {limit}s): {why}",
                waited.unwrap_or_default()
            ))
        }
        other => other.clone(),
    }
}
