//! The section's decision over what was observed (pure): classify the workloads, check that
//! the declared values fit each namespace, plan the writes and pacing, count pod drift.

use super::*;

/// What one evaluation decided.
#[derive(Clone, Debug, Default)]
pub struct Evaluation {
    pub classified: Classified,
    /// Namespaces whose LimitRange or ResourceQuota rejects the declared values, with why.
    pub unfit: BTreeMap<String, Vec<String>>,
    /// One per target, in the order of `classified.targets`.
    pub decisions: Vec<Decision>,
    pub pod_drift: BTreeMap<String, PodDrift>,
}

/// Evaluates the covered namespaces. `failed_recently` tells the targets whose last write
/// failed (they queue behind the others for rollout slots); `None` when none did.
pub fn evaluate(
    namespaces: &[NamespaceObservation],
    desired: &Desired,
    spec: &SidecarSpec,
    enforce: bool,
    revisions: &Revisions,
    now: jiff::Timestamp,
    failed_recently: Option<&dyn Fn(&Workload) -> bool>,
) -> Evaluation {
    let mut classified = classify(namespaces, now, revisions);
    if let Some(failed) = failed_recently {
        classified.targets.sort_by_cached_key(|w| failed(w));
    }
    // Targets to change, by namespace (one pass: deviations format strings).
    let mut changes_by_ns: HashMap<&str, Vec<&Workload>> = HashMap::new();
    for w in &classified.targets {
        if !deviations(desired, &w.template_annotations).is_empty() {
            changes_by_ns
                .entry(w.namespace.as_str())
                .or_default()
                .push(w);
        }
    }
    let mut unfit: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for ns in namespaces {
        let Some(changes) = changes_by_ns.get(ns.name.as_str()) else {
            continue;
        };
        let problems = namespace_fit(desired, changes, &ns.limit_ranges, &ns.quotas);
        if !problems.is_empty() {
            unfit.insert(ns.name.clone(), problems);
        }
    }
    let paced = spec.pacing == Pacing::Paced;
    let decisions = plan(
        desired,
        &classified.targets,
        &unfit,
        paced.then_some(spec.max_concurrent_rollouts),
        enforce,
    );
    let pod_drift = pod_drift(desired, namespaces, &classified.excluded, revisions);
    Evaluation {
        classified,
        unfit,
        decisions,
        pod_drift,
    }
}
