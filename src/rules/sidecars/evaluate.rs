//! The section's decision over what was observed (pure): classify the workloads, check that
//! the declared values fit each namespace, plan the writes and pacing, count pod drift.
//!
//! Everything but the pacing is decided per namespace, from that namespace's objects alone.
//! A [`Memo`] keeps each namespace's part between evaluations together with the inputs it was
//! decided from, so an evaluation re-decides only the namespaces whose objects changed (a
//! watch event replaces the cached entry, so a changed object is a different `Arc`).

use super::*;

/// What one evaluation decided.
#[derive(Clone, Debug, Default)]
pub struct Evaluation {
    pub classified: Classified,
    /// Namespaces whose LimitRange or ResourceQuota rejects the declared values, with why.
    pub unfit: BTreeMap<String, Vec<String>>,
    /// One per target, in the order of `classified.targets`.
    pub decisions: Vec<Decision>,
    /// Shared with the namespace parts a [`Memo`] keeps.
    pub pod_drift: BTreeMap<String, Arc<PodDrift>>,
}

/// One namespace's part of an evaluation and the inputs it was decided from. The inputs are
/// held, not only their addresses compared: an entry the cache dropped could otherwise be
/// freed and its address reused by a new one.
#[derive(Clone, Debug)]
struct NamespacePart {
    /// The namespace's name, shared by its targets.
    name: Arc<str>,
    /// Shared with the cache (see [`NamespaceObservation::labels`]).
    labels: Arc<BTreeMap<String, String>>,
    workloads: Vec<Shared<WorkloadFacts>>,
    /// In the order observed (the cache's: by name); another order only decides anew.
    pods: Shared<PodFacts>,
    limit_ranges: Vec<LimitRange>,
    quotas: Vec<ResourceQuota>,
    classes: NamespaceClasses,
    /// Per target (order of `classes.targets`).
    deviations: Vec<Vec<String>>,
    /// The targets with something to do or report (see [`Classified::targets`]), by index
    /// into `classes.targets`; the others are counted in `settled`.
    active: Vec<usize>,
    settled: usize,
    unfit: Option<Vec<String>>,
    pod_drift: Option<Arc<PodDrift>>,
    /// The evaluation that last used it ([`Memo::round`]).
    round: u64,
}

impl NamespacePart {
    /// Whether the part was decided from exactly these objects.
    fn decided_from(&self, ns: &NamespaceObservation) -> bool {
        self.workloads.len() == ns.workloads.len()
            && self
                .workloads
                .iter()
                .zip(&ns.workloads)
                .all(|(a, b)| same_slice(a, b))
            && same_slice(&self.pods, &ns.pods)
            && (Arc::ptr_eq(&self.labels, &ns.labels) || self.labels == ns.labels)
            && self.limit_ranges == ns.limit_ranges
            && self.quotas == ns.quotas
    }
}

/// The same shared slice (the common case: one pointer compared), or slices of the same
/// entries (a slice rebuilt around an entry read as written).
fn same_slice<T>(a: &Shared<T>, b: &Shared<T>) -> bool {
    Arc::ptr_eq(a, b)
        || (a.len() == b.len() && a.iter().zip(b.iter()).all(|(a, b)| Arc::ptr_eq(a, b)))
}

/// Namespace parts kept between evaluations of one policy's section. Parts are reused only
/// while the declared values and the revisions stay the same; a namespace no longer covered
/// is dropped at the next evaluation.
#[derive(Debug, Default)]
pub struct Memo {
    decided_for: Option<(Desired, Revisions)>,
    parts: HashMap<String, NamespacePart>,
    /// Counts evaluations, to drop the parts of namespaces the last one did not cover.
    round: u64,
    /// Namespaces decided anew by the last evaluation (the others were reused).
    pub last_decided: usize,
}

/// Evaluates the covered namespaces. `failed_recently` tells the targets whose last write
/// failed (they queue behind the others for rollout slots); `None` when none did. `gate` is
/// the rollout gate ([`availability`] with the namespace's budgets); `None`: every rollout
/// may start.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    namespaces: &[NamespaceObservation],
    desired: &Desired,
    spec: &SidecarSpec,
    enforce: bool,
    revisions: &Revisions,
    now: jiff::Timestamp,
    failed_recently: Option<&dyn Fn(&Workload) -> bool>,
    gate: Option<GateFn<'_>>,
) -> Evaluation {
    evaluate_with(
        &mut Memo::default(),
        namespaces,
        desired,
        spec,
        enforce,
        revisions,
        now,
        failed_recently,
        gate,
    )
}

/// [`evaluate`], deciding anew only the namespaces whose objects differ from the ones `memo`
/// holds their part for; the result is the same as [`evaluate`]'s.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_with(
    memo: &mut Memo,
    namespaces: &[NamespaceObservation],
    desired: &Desired,
    spec: &SidecarSpec,
    enforce: bool,
    revisions: &Revisions,
    now: jiff::Timestamp,
    failed_recently: Option<&dyn Fn(&Workload) -> bool>,
    gate: Option<GateFn<'_>>,
) -> Evaluation {
    if memo
        .decided_for
        .as_ref()
        .is_none_or(|(d, r)| d != desired || r != revisions)
    {
        memo.parts.clear();
        memo.decided_for = Some((desired.clone(), revisions.clone()));
    }
    let want = declared_millis(desired);
    memo.last_decided = 0;
    memo.round = memo.round.wrapping_add(1);
    for ns in namespaces {
        match memo.parts.get_mut(ns.name.as_str()) {
            Some(part) if part.decided_from(ns) => part.round = memo.round,
            _ => {
                memo.last_decided += 1;
                let mut part = decide_namespace(ns, desired, &want, revisions);
                part.round = memo.round;
                memo.parts.insert(ns.name.clone(), part);
            }
        }
    }
    // Namespaces no longer covered.
    let round = memo.round;
    memo.parts.retain(|_, p| p.round == round);

    // The namespaces' parts, in namespace order (targets within one are in the order the
    // observation lists its workloads).
    let mut order: Vec<&NamespaceObservation> = namespaces.iter().collect();
    order.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    let mut classified = Classified::default();
    let mut deviations: Vec<Vec<String>> = Vec::new();
    // Gathered in namespace order and collected at the end: a map built from sorted entries
    // compares each key once, where inserting one at a time searches from the root.
    let mut unfit: Vec<(String, Vec<String>)> = Vec::new();
    let mut pod_drift: Vec<(String, Arc<PodDrift>)> = Vec::new();
    let mut targets: Vec<(Workload, Vec<String>)> = Vec::new();
    for ns in order {
        let Some(part) = memo.parts.get(&ns.name) else {
            continue;
        };
        classified.settled += part.settled;
        for &i in &part.active {
            let w = &part.classes.targets[i];
            targets.push((
                Workload {
                    namespace: part.name.clone(),
                    facts: w.clone(),
                    rollout: meshwarden_rollout(w, now),
                },
                part.deviations[i].clone(),
            ));
        }
        classified
            .opted_out
            .extend(part.classes.opted_out.iter().cloned());
        classified
            .other_rule
            .extend(part.classes.other_rule.iter().cloned());
        classified.excluded.extend(
            part.classes
                .excluded
                .iter()
                .map(|(kind, name)| (ns.name.clone(), *kind, name.clone())),
        );
        if let Some(problems) = &part.unfit {
            unfit.push((ns.name.clone(), problems.clone()));
        }
        if let Some(drift) = &part.pod_drift {
            pod_drift.push((ns.name.clone(), Arc::clone(drift)));
        }
    }
    // Sorted as `classify` sorts them (a namespace's workloads may come in any order).
    targets.sort_by(|(a, _), (b, _)| {
        (&a.namespace, a.kind, &a.name).cmp(&(&b.namespace, b.kind, &b.name))
    });
    if let Some(failed) = failed_recently {
        targets.sort_by_cached_key(|(w, _)| failed(w));
    }
    classified.opted_out.sort();
    classified.other_rule.sort();
    classified.targets.reserve(targets.len());
    deviations.reserve(targets.len());
    for (w, devs) in targets {
        classified.targets.push(w);
        deviations.push(devs);
    }
    let unfit: BTreeMap<String, Vec<String>> = unfit.into_iter().collect();
    let pod_drift: BTreeMap<String, Arc<PodDrift>> = pod_drift.into_iter().collect();
    let paced = spec.pacing == Pacing::Paced;
    let decisions = plan_with(
        &classified.targets,
        deviations,
        &unfit,
        paced.then_some(spec.max_concurrent_rollouts),
        enforce,
        gate.unwrap_or(&|_: &Workload| Gate::Go),
    );
    Evaluation {
        classified,
        unfit,
        decisions,
        pod_drift,
    }
}

/// Decides one namespace: its classes, each target's deviations, whether the values fit, and
/// its pod drift.
fn decide_namespace(
    ns: &NamespaceObservation,
    desired: &Desired,
    want: &[Option<i128>; 4],
    revisions: &Revisions,
) -> NamespacePart {
    let name: Arc<str> = ns.name.as_str().into();
    let classes = classify_namespace(ns, revisions);
    let deviations: Vec<Vec<String>> = classes
        .targets
        .iter()
        .map(|w| deviations(desired, &w.template_annotations))
        .collect();
    // The fit is checked for the targets to change (their rollout state does not matter).
    let changes: Vec<Workload> = classes
        .targets
        .iter()
        .zip(&deviations)
        .filter(|(_, d)| !d.is_empty())
        .map(|(w, _)| Workload {
            namespace: name.clone(),
            facts: w.clone(),
            rollout: Rollout::Complete,
        })
        .collect();
    let unfit = if changes.is_empty() {
        None
    } else {
        let refs: Vec<&Workload> = changes.iter().collect();
        let problems = namespace_fit(desired, &refs, &ns.limit_ranges, &ns.quotas);
        (!problems.is_empty()).then_some(problems)
    };
    let pod_drift = namespace_pod_drift(want, &ns.labels, &ns.pods, &classes.excluded, revisions);
    // A target with the declared values whose controller reports its rollout complete (or
    // paused) is compliant whatever the pacing and the time: `plan_with` gives it no action,
    // no slot and no stall (meshwarden's view of a rollout is never less complete than the
    // controller's). Only the others are assembled by each evaluation.
    let active: Vec<usize> = (0..classes.targets.len())
        .filter(|&i| {
            !deviations[i].is_empty()
                || !matches!(
                    classes.targets[i].rollout,
                    Rollout::Complete | Rollout::Paused
                )
        })
        .collect();
    let settled = classes.targets.len() - active.len();
    NamespacePart {
        name,
        labels: ns.labels.clone(),
        workloads: ns.workloads.clone(),
        pods: ns.pods.clone(),
        limit_ranges: ns.limit_ranges.clone(),
        quotas: ns.quotas.clone(),
        classes,
        deviations,
        active,
        settled,
        unfit,
        pod_drift: pod_drift.map(Arc::new),
        round: 0,
    }
}
