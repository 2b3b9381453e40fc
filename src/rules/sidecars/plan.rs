//! The pure plan: which workloads are written, held or reported, and the pacing of rollouts.

use super::*;

/// Why a target is held while every rollout slot is taken (`meshwarden plan` counts them).
pub const WAITS_FOR_SLOT: &str = "waits for a rollout slot";

/// Pods named per namespace in the condition.
pub(super) const DRIFT_NAMES: usize = 3;
/// Namespaces named in the condition message's pod drift line (the metric has every one).
pub(super) const DRIFT_NAMESPACES: usize = 5;

/// What was read in one namespace the section covers.
#[derive(Clone, Debug, Default)]
pub struct NamespaceObservation {
    pub name: String,
    /// Shared with the cache's copy while the namespace is unchanged (see
    /// [`Cache`]): an evaluation neither copies nor compares the labels of every namespace.
    pub labels: Arc<BTreeMap<String, String>>,
    /// Deployments, StatefulSets and DaemonSets: one slice per kind present, each by name,
    /// shared with the cache's index while the namespace's entries of that kind are unchanged
    /// ([`View::shared`]).
    pub workloads: Vec<Shared<WorkloadFacts>>,
    pub limit_ranges: Vec<LimitRange>,
    pub quotas: Vec<ResourceQuota>,
    /// Running pods (field selector `status.phase=Running`), shared like `workloads`.
    pub pods: Shared<PodFacts>,
}

impl NamespaceObservation {
    /// Every workload, kind after kind.
    pub fn all_workloads(&self) -> impl Iterator<Item = &Arc<WorkloadFacts>> {
        self.workloads.iter().flat_map(|s| s.iter())
    }
}

/// Workloads of the covered namespaces, sorted into targets and the ones left alone.
#[derive(Clone, Debug, Default)]
pub struct Classified {
    /// The targets with something to do or report: deviations, or a rollout the workload's
    /// controller reports not complete. An evaluation counts the others in `settled`.
    pub targets: Vec<Workload>,
    /// Targets that carry the declared values and whose rollout is complete (or paused):
    /// compliant whatever the pacing, so they are counted, not assembled (an evaluation after
    /// one event lists only the targets with something to do). [`classify`] lists every
    /// target and leaves this 0.
    pub settled: usize,
    /// Workloads opted out with `meshwarden.io/ignore: sidecar-resources`.
    pub opted_out: Vec<String>,
    /// Workloads another meshwarden rule writes (HA), left to it.
    pub other_rule: Vec<String>,
    /// (namespace, kind, name) of every workload not held, so its pods are not counted as drift.
    pub excluded: BTreeSet<(String, Kind, String)>,
}

/// Sorts the observed workloads (pure). `now` decides stalls of StatefulSets and DaemonSets.
pub fn classify(
    namespaces: &[NamespaceObservation],
    now: jiff::Timestamp,
    revisions: &Revisions,
) -> Classified {
    let mut out = Classified::default();
    for ns in namespaces {
        let part = classify_namespace(ns, revisions);
        for w in part.targets {
            let rollout = meshwarden_rollout(&w, now);
            out.targets.push(Workload {
                namespace: ns.name.as_str().into(),
                facts: w,
                rollout,
            });
        }
        out.opted_out.extend(part.opted_out);
        out.other_rule.extend(part.other_rule);
        out.excluded.extend(
            part.excluded
                .into_iter()
                .map(|(kind, name)| (ns.name.clone(), kind, name)),
        );
    }
    out.targets
        .sort_by(|a, b| (&a.namespace, a.kind, &a.name).cmp(&(&b.namespace, b.kind, &b.name)));
    out.opted_out.sort();
    out.other_rule.sort();
    out
}

/// One namespace's workloads sorted (pure): the targets in the order of `ns.workloads`, the
/// ids of the ones opted out or left to another rule, and (kind, name) of every one not held.
#[derive(Clone, Debug, Default)]
pub struct NamespaceClasses {
    pub targets: Vec<Arc<WorkloadFacts>>,
    pub opted_out: Vec<String>,
    pub other_rule: Vec<String>,
    pub excluded: BTreeSet<(Kind, String)>,
}

/// [`classify`] of one namespace, without the rollout states (they depend on the time).
pub fn classify_namespace(ns: &NamespaceObservation, revisions: &Revisions) -> NamespaceClasses {
    let mut out = NamespaceClasses::default();
    let injection = NamespaceInjection::of(&ns.labels, revisions);
    for w in ns.all_workloads() {
        // Built only for the workloads left out (most are targets).
        let id = || format!("{}/{}/{}", w.kind.as_str(), ns.name, w.name);
        if injection
            .no_sidecar_reason(&w.template_labels, &w.template_annotations, revisions)
            .is_some()
        {
            out.excluded.insert((w.kind, w.name.clone()));
            continue;
        }
        if w.opted_out {
            out.opted_out.push(id());
            out.excluded.insert((w.kind, w.name.clone()));
            continue;
        }
        if w.other_rule {
            out.other_rule.push(id());
            out.excluded.insert((w.kind, w.name.clone()));
            continue;
        }
        out.targets.push(w.clone());
    }
    out
}

/// What to do with one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The template has the declared values.
    Compliant,
    /// Write the annotations now (its pods roll).
    Apply,
    /// Needs the annotations but waits for a rollout slot, or for a stalled rollout.
    Held(String),
    /// Needs the annotations, but rolling it now would cost its availability
    /// ([`availability`]): held until that changes, or never written when the write would
    /// roll no pod.
    Gated(Gate),
    /// Not written: the namespace's LimitRange or ResourceQuota does not fit.
    Skipped(String),
    /// Audit: reported only.
    Reported,
}

/// The decision for one target (same index as the targets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub deviations: Vec<String>,
    /// Carries meshwarden's hash and is not rolled out yet (uses a rollout slot).
    pub rolling: bool,
    /// Its rollout stalled.
    pub stalled: Option<String>,
}

/// Plans every target (pure). Targets come sorted; earlier ones get rollout slots first.
/// `unfit` maps a namespace to the reasons its LimitRange/ResourceQuota rejects the values.
/// `max_concurrent` is the pacing limit; `None` (pacing off) writes every target at once and
/// lets no stalled rollout hold the others.
pub fn plan(
    desired: &Desired,
    targets: &[Workload],
    unfit: &BTreeMap<String, Vec<String>>,
    max_concurrent: Option<i32>,
    enforce: bool,
) -> Vec<Decision> {
    let deviations = targets
        .iter()
        .map(|w| deviations(desired, &w.template_annotations))
        .collect();
    plan_with(
        targets,
        deviations,
        unfit,
        max_concurrent,
        enforce,
        &|_: &Workload| Gate::Go,
    )
}

/// The rollout gate of a plan: [`availability`] of a target, with its namespace's budgets.
pub type GateFn<'a> = &'a dyn Fn(&Workload) -> Gate;

/// [`plan`] with each target's deviations from the declared values already known (same
/// order as `targets`). `gate` is asked before a target's rollout starts (not for a target
/// already rolling because of meshwarden): a target it holds takes no slot.
/// A target whose pods are rolling because of meshwarden's restart (the upgrades section)
/// waits for that rollout: one rollout per change, and it counts against the slots.
pub fn plan_with(
    targets: &[Workload],
    deviations: Vec<Vec<String>>,
    unfit: &BTreeMap<String, Vec<String>>,
    max_concurrent: Option<i32>,
    enforce: bool,
    gate: GateFn<'_>,
) -> Vec<Decision> {
    let mut decisions: Vec<Decision> = targets
        .iter()
        .zip(deviations)
        .map(|(w, deviations)| {
            let ours = w.template_annotations.contains_key(HASH_ANNOTATION);
            let (rolling, stalled) = match &w.rollout {
                _ if !ours => (false, None),
                Rollout::Complete | Rollout::Paused => (false, None),
                Rollout::InProgress(_) | Rollout::Settling(_) => (true, None),
                Rollout::Stalled(why) => (true, Some(why.clone())),
            };
            Decision {
                action: Action::Compliant,
                deviations,
                rolling,
                stalled,
            }
        })
        .collect();
    // Rollouts of meshwarden's restarts take slots too (one budget for both sections).
    let restarting: Vec<bool> = targets.iter().map(restart_in_progress).collect();
    let mut in_flight =
        decisions.iter().filter(|d| d.rolling).count() + restarting.iter().filter(|r| **r).count();
    let stalled = max_concurrent.is_some() && decisions.iter().any(|d| d.stalled.is_some());
    let max = match max_concurrent {
        Some(n) => usize::try_from(n.max(1)).unwrap_or(1),
        None => usize::MAX,
    };
    for ((w, d), restarting) in targets.iter().zip(decisions.iter_mut()).zip(restarting) {
        if d.deviations.is_empty() {
            continue;
        }
        d.action = if !enforce {
            Action::Reported
        } else if let Some(why) = unfit.get(&*w.namespace) {
            Action::Skipped(why.join("; "))
        } else if w.rollout == Rollout::Paused {
            // Reported, never written while paused, and it holds no rollout slot.
            Action::Held(
                "the Deployment is paused (spec.paused): meshwarden writes it once it is resumed"
                    .into(),
            )
        } else if stalled {
            Action::Held("a sidecar rollout stalled; no other starts until it completes".into())
        } else if let (Kind::Deployment, true, false, Rollout::InProgress(why)) =
            (w.kind, w.observed, restarting, &w.facts.rollout)
        {
            // A template written while the Deployment controller rolls another one (anyone's:
            // the rollout as the controller reports it, not only meshwarden's) makes it roll
            // over, scaling old ReplicaSets down by statuses that can lag their pods. A
            // template the controller has not observed yet has started no rollout: writing
            // now replaces it before it rolls (a drift is corrected at once).
            Action::Held(format!(
                "its rollout is in progress ({why}): written once that rollout completes, so that the Deployment controller never rolls two templates at once"
            ))
        } else if d.rolling {
            // Already rolling because of meshwarden: rewriting it takes no new slot.
            Action::Apply
        } else if restarting {
            Action::Held(
                "meshwarden's restart of it (upgrades section) is rolling; written once that rollout completes, so that its pods roll once per change".into(),
            )
        } else if let gated @ (Gate::Held(_) | Gate::Skipped(_)) = gate(w) {
            Action::Gated(gated)
        } else if in_flight < max {
            in_flight += 1;
            Action::Apply
        } else {
            Action::Held(format!("{WAITS_FOR_SLOT} (maxConcurrentRollouts {max})"))
        };
    }
    decisions
}

/// Whether the upgrades section's restart of `w` is rolling (its last restart produced the
/// current generation, which is not rolled out yet).
fn restart_in_progress(w: &Workload) -> bool {
    w.restart_generation == Some(w.generation) && matches!(w.facts.rollout, Rollout::InProgress(_))
}

/// The server-side apply patch: exactly the five annotations meshwarden owns on the template,
/// and [`GENERATION_ANNOTATION`] on the workload with `generation`, the generation the write
/// will produce (the template changes, so the server adds one to the stored generation).
pub fn patch(w: &Workload, desired: &Desired, generation: i64) -> Value {
    let mut ann = serde_json::Map::new();
    for (k, v) in desired.annotations() {
        ann.insert(k.into(), json!(v));
    }
    ann.insert(HASH_ANNOTATION.into(), json!(desired.hash()));
    json!({
        "apiVersion": "apps/v1",
        "kind": w.kind.as_str(),
        "metadata": {"name": w.name, "namespace": &*w.namespace,
            "annotations": {GENERATION_ANNOTATION: generation.to_string()}},
        "spec": {"template": {"metadata": {"annotations": Value::Object(ann)}}},
    })
}

/// Running pods whose `istio-proxy` has other resources than declared, per namespace (pure).
/// Pods of workloads left alone (opted out, no sidecar, other rule) are not counted.
pub fn pod_drift(
    desired: &Desired,
    namespaces: &[NamespaceObservation],
    excluded: &BTreeSet<(String, Kind, String)>,
    revisions: &Revisions,
) -> BTreeMap<String, PodDrift> {
    let want = declared_millis(desired);
    let mut out: BTreeMap<String, PodDrift> = BTreeMap::new();
    for ns in namespaces {
        let excluded_here: BTreeSet<(Kind, String)> = excluded
            .iter()
            .filter(|(n, _, _)| *n == ns.name)
            .map(|(_, kind, name)| (*kind, name.clone()))
            .collect();
        if let Some(drift) =
            namespace_pod_drift(&want, &ns.labels, &ns.pods, &excluded_here, revisions)
        {
            out.insert(ns.name.clone(), drift);
        }
    }
    out
}

/// The declared values in milli-units, in the order of [`Desired::annotations`].
pub(super) fn declared_millis(desired: &Desired) -> [Option<i128>; 4] {
    desired.annotations().map(|(_, v)| quantity::millis(v))
}

/// [`pod_drift`] of one namespace (its labels and running pods): `want` from
/// [`declared_millis`], `excluded` the (kind, name) of its workloads left alone. `None` when no
/// pod drifts.
pub(super) fn namespace_pod_drift(
    want: &[Option<i128>; 4],
    labels: &BTreeMap<String, String>,
    pods: &[Arc<PodFacts>],
    excluded: &BTreeSet<(Kind, String)>,
    revisions: &Revisions,
) -> Option<PodDrift> {
    let injection = NamespaceInjection::of(labels, revisions);
    let mut drift = PodDrift::default();
    for pod in pods {
        // The cheap test first: most pods run the declared values.
        let Some(have) = &pod.proxy else { continue };
        let differs = want
            .iter()
            .zip(have.iter())
            .any(|(want, have)| have.is_none() || want != have);
        if !differs {
            continue;
        }
        if !excluded.is_empty()
            && let Some((kind, name)) = &pod.owner
            && excluded.contains(&(*kind, name.clone()))
        {
            continue;
        }
        if injection
            .no_sidecar_reason(&pod.labels, &pod.annotations, revisions)
            .is_some()
        {
            continue;
        }
        drift.add(&pod.name);
    }
    (drift.pods > 0).then_some(drift)
}

/// The running pods of one namespace whose proxy has other resources than declared: how many,
/// and the first few names in order (all a condition message shows; a cluster mid-rollout can
/// have tens of thousands).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodDrift {
    pub pods: usize,
    /// The [`DRIFT_NAMES`] smallest names, sorted.
    pub first: Vec<String>,
}

impl PodDrift {
    pub(super) fn add(&mut self, name: &str) {
        self.pods += 1;
        if self.first.len() == DRIFT_NAMES && self.first.last().is_some_and(|l| l.as_str() <= name)
        {
            return;
        }
        let at = self.first.partition_point(|n| n.as_str() < name);
        self.first.insert(at, name.to_string());
        self.first.truncate(DRIFT_NAMES);
    }

    /// `a-1, a-2, a-3 and 4 more`.
    pub fn names(&self) -> String {
        let more = self.pods.saturating_sub(self.first.len());
        match more {
            0 => self.first.join(", "),
            n => format!("{} and {n} more", self.first.join(", ")),
        }
    }
}

/// Numbers of one reconcile, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SidecarStats {
    pub targets: usize,
    pub compliant: usize,
    pub opted_out: usize,
    /// Workloads rolling because of meshwarden (including the ones started in this reconcile).
    pub rolling: usize,
    pub held: usize,
    pub stalled: usize,
    /// Namespaces skipped because of their LimitRange/ResourceQuota.
    pub skipped_namespaces: Vec<String>,
    /// Running pods whose istio-proxy differs from the declared resources, per namespace.
    pub pod_drift: BTreeMap<String, Arc<PodDrift>>,
}
