//! One pass of the section: observe (the watch caches, or reads) → evaluate (pure, over what
//! was observed) → sort each target into what is reported and what is written → write
//! (Enforce) → the condition. Each step is a function of its own; [`reconcile_with_stats`]
//! only runs them in order.

use super::*;

/// What a pass observed.
struct Observation {
    revisions: Revisions,
    cache: Option<Cache>,
    /// The namespaces came from the watch caches, so they share their entries with the last
    /// pass and its namespace parts can be reused.
    from_cache: bool,
    covered: Covered,
}

/// Observes, plans and (in Enforce) applies the sidecars section; reports the result.
pub async fn reconcile(
    ctx: &Context,
    policy: &MeshPolicy,
    spec: &SidecarSpec,
    enforcement: Enforcement,
) -> RuleReport {
    reconcile_with_stats(ctx, policy, spec, enforcement).await.0
}

/// [`reconcile`], with the numbers behind the report.
pub async fn reconcile_with_stats(
    ctx: &Context,
    policy: &MeshPolicy,
    spec: &SidecarSpec,
    enforcement: Enforcement,
) -> (RuleReport, SidecarStats) {
    let ctype = types::SIDECAR_RESOURCES;
    let mut stats = SidecarStats::default();
    let mut report = RuleReport::new(Observed::new(ctype, Status::True, reasons::COMPLIANT, ""));
    let desired = match desired(&spec.resources) {
        Ok(d) => d,
        Err(msg) => {
            report.condition =
                Observed::new(ctype, Status::False, reasons::INCOMPLETE_RESOURCES, msg);
            return (report, stats);
        }
    };
    let obs = match observe_pass(ctx, spec, &desired).await {
        Ok(o) => o,
        Err(failed) => return (*failed, stats),
    };
    let enforce = enforcement == Enforcement::Enforce;
    let evaluation = evaluate_pass(ctx, policy, spec, &desired, &obs, enforce).await;
    let targets = &evaluation.classified.targets;
    let cache = obs.cache.as_ref();
    let mut tally = report::Tally::default();
    let to_write = triage(
        policy,
        cache,
        (targets, evaluation.classified.settled),
        &evaluation.decisions,
        &mut report,
        &mut tally,
    );
    if let Err(e) = write_planned(ctx, cache, &desired, to_write, &mut report, &mut tally).await {
        let mut failed = RuleReport::failed(ctype, &e);
        failed.targets = report.targets;
        return (failed, stats);
    }
    let Evaluation {
        classified,
        unfit,
        decisions,
        pod_drift,
    } = evaluation;
    stats.pod_drift = pod_drift;
    stats.targets = classified.targets.len() + classified.settled;
    stats.compliant = usize::try_from(report.compliant).unwrap_or(0);
    stats.opted_out = classified.opted_out.len();
    stats.rolling = tally.rolling.len() + tally.started.len() + tally.stalled.len();
    stats.held = tally.held.len() + tally.gated.len();
    stats.stalled = tally.stalled.len();
    stats.skipped_namespaces = unfit.keys().cloned().collect();
    report::condition(
        &mut report,
        &tally,
        &report::Seen {
            spec,
            desired: &desired,
            revisions: &obs.revisions,
            classified: &classified,
            decisions: &decisions,
            unfit: &unfit,
            ambient: &obs.covered.ambient,
            unknown_revision: &obs.covered.unknown_revision,
            enforce,
        },
        &stats,
    );
    (report, stats)
}

/// The covered namespaces and what decides their injection, from the watch caches when they
/// have listed (30 s at most are waited for), read otherwise. Revision labels are resolved
/// against the live revisions and tags; when those cannot be read, every label is taken as
/// live, and the section is Unknown only if a namespace it covers depends on one.
async fn observe_pass(
    ctx: &Context,
    spec: &SidecarSpec,
    desired: &Desired,
) -> std::result::Result<Observation, Box<RuleReport>> {
    let ctype = types::SIDECAR_RESOURCES;
    let (revisions, revisions_error) = match ctx.revisions().await {
        Ok(r) => (r, None),
        Err(e) => (Revisions::any(), Some(e)),
    };
    let cache = ctx.cache::<Cache>();
    let cached = match &cache {
        Some(c) if c.ready(Duration::from_secs(30)).await => {
            Some(observe_cached(c, spec, desired, &revisions))
        }
        _ => None,
    };
    let from_cache = cached.is_some();
    let covered = match cached {
        Some(o) => o,
        None => observe(ctx, spec, &revisions)
            .await
            .map_err(|e| Box::new(RuleReport::failed(ctype, &e)))?,
    };
    if let Some(e) = revisions_error
        && covered.namespaces.iter().any(|n| {
            n.labels.contains_key(crate::istio::REVISION_LABEL)
                && !n.labels.contains_key(crate::istio::INJECTION_LABEL)
        })
    {
        let mut failed = RuleReport::failed(ctype, &e);
        failed.condition.message = format!(
            "{}: revision labels (istio.io/rev) of the covered namespaces cannot be resolved. {}",
            failed.condition.message,
            "meshwarden reads istiod Deployments (label app=istiod) and MutatingWebhookConfigurations (label istio.io/rev): compare its ClusterRole with the chart's"
        );
        return Err(Box::new(failed));
    }
    Ok(Observation {
        revisions,
        cache,
        from_cache,
        covered,
    })
}

/// The evaluation of what was observed ([`evaluate_with`]), reusing the policy's namespace
/// parts of the last pass when the namespaces came from the caches, with the rollout gate when
/// the pass may start rollouts; records the targets the pass will roll.
async fn evaluate_pass(
    ctx: &Context,
    policy: &MeshPolicy,
    spec: &SidecarSpec,
    desired: &Desired,
    obs: &Observation,
    enforce: bool,
) -> Evaluation {
    let cache = obs.cache.as_ref();
    let failed = cache
        .filter(|c| c.any_failed())
        .map(|c| move |w: &Workload| c.failed_recently(w));
    // The budgets the rollout gate reads (only a pass that may start rollouts asks it).
    let budgets = match enforce {
        true => Some(budgets(ctx).await),
        false => None,
    };
    let gate = |w: &Workload| match &budgets {
        Some(Ok(b)) => availability(w, b.get(&*w.namespace).map_or(&[], Vec::as_slice)),
        Some(Err(e)) => Gate::Held(format!(
            "the PodDisruptionBudgets that may select its pods cannot be read ({e}), so meshwarden cannot tell whether it can lose a pod"
        )),
        None => Gate::Go,
    };
    let failed = failed.as_ref().map(|f| f as &dyn Fn(&Workload) -> bool);
    let now = jiff::Timestamp::now();
    let run = |memo: &mut Memo| {
        evaluate_with(
            memo,
            &obs.covered.namespaces,
            desired,
            spec,
            enforce,
            &obs.revisions,
            now,
            failed,
            Some(&gate),
        )
    };
    let evaluation = match cache.filter(|_| obs.from_cache) {
        Some(c) => c.with_memo(&policy.name_any(), run),
        None => run(&mut Memo::default()),
    };
    if let Some(c) = cache.filter(|_| obs.from_cache) {
        c.record_wanted(
            &policy.name_any(),
            wanted(&evaluation.classified.targets, &evaluation.decisions),
        );
    }
    evaluation
}

/// Counts the compliant targets (the listed ones and the `settled` count) and reports the
/// others in `report` and `tally`; returns the writes to make. The deviations are joined into
/// a message only for the targets that need one (a converging cluster plans thousands).
fn triage<'a>(
    policy: &MeshPolicy,
    cache: Option<&Cache>,
    (targets, settled): (&'a [Workload], usize),
    decisions: &'a [Decision],
    report: &mut RuleReport,
    tally: &mut report::Tally,
) -> Vec<Planned<(&'a Workload, &'a Decision)>> {
    let ctype = types::SIDECAR_RESOURCES;
    let mut to_write = Vec::new();
    report.targets = i32::try_from(targets.len() + settled).unwrap_or(i32::MAX);
    report.compliant += i32::try_from(settled).unwrap_or(i32::MAX);
    for (w, d) in targets.iter().zip(decisions) {
        // Most targets: nothing to say about them (no name built).
        if d.action == Action::Compliant && d.stalled.is_none() && !d.rolling {
            report.compliant += 1;
            continue;
        }
        let id = w.id();
        if let Some(why) = &d.stalled {
            tally.stalled.push(id.clone());
            report.violations.push(Violation {
                rule: ctype.into(),
                object: id.clone(),
                message: format!("rollout stalled: {why}"),
                action: ViolationAction::Reported,
            });
        } else if d.rolling {
            tally.rolling.push(id.clone());
        }
        let devs = || d.deviations.join("; ");
        let violation = |action: ViolationAction, message: String| Violation {
            rule: ctype.into(),
            object: id.clone(),
            message,
            action,
        };
        match &d.action {
            Action::Compliant => report.compliant += 1,
            Action::Reported => report
                .violations
                .push(violation(ViolationAction::Reported, devs())),
            // A target whose last write failed and that now waits for a slot stays reported
            // with that failure: waiting hides nothing the user has to fix.
            Action::Held(why) => match cache.and_then(|c| c.last_failure(w)) {
                Some(e) => {
                    tally.earlier_failures += 1;
                    tally.first_failure.get_or_insert(e.clone());
                    report.violations.push(violation(
                        ViolationAction::Skipped,
                        format!(
                            "{}; the write failed: {e}; retried after the other targets ({why})",
                            devs()
                        ),
                    ));
                }
                None => {
                    tally.held.push(id.clone());
                    report.violations.push(violation(
                        ViolationAction::Held,
                        format!("{}; {why}", devs()),
                    ));
                }
            },
            Action::Skipped(why) | Action::Gated(Gate::Skipped(why)) => {
                if matches!(d.action, Action::Gated(_)) {
                    tally.gated.push(id.clone());
                }
                report.violations.push(violation(
                    ViolationAction::Skipped,
                    format!("{}; not written: {why}", devs()),
                ))
            }
            Action::Gated(Gate::Held(why)) => {
                tally.gated.push(id.clone());
                report.violations.push(violation(
                    ViolationAction::Held,
                    format!("{}; held: {why}", devs()),
                ))
            }
            Action::Gated(Gate::Go) => {}
            Action::Apply => to_write.push(Planned::one(
                FightKey {
                    policy: policy.name_any(),
                    section: ctype,
                    object: id.clone(),
                    field: None,
                },
                Some(w.foreign_writes.clone()),
                (w, d),
            )),
        }
    }
    to_write
}

/// Fight check → write (a bounded number in flight, each patch built only when it starts) →
/// record, in target order; the outcomes go into `report` and `tally`. A failed write is
/// reported on its own and holds up no other; `Err` when every write failed (most likely not
/// about one workload: permissions, the API server).
async fn write_planned(
    ctx: &Context,
    cache: Option<&Cache>,
    desired: &Desired,
    to_write: Vec<Planned<(&Workload, &Decision)>>,
    report: &mut RuleReport,
    tally: &mut report::Tally,
) -> std::result::Result<(), Error> {
    let ctype = types::SIDECAR_RESOURCES;
    let generations: Mutex<HashMap<String, Option<i64>>> = Default::default();
    let generations_ref = &generations;
    let outcomes = driver::drive(&ctx.memory, to_write, WRITE_CONCURRENCY, |&(w, _)| {
        let generations = generations_ref;
        async move {
            let (generation, after) = write_recording(ctx, w, desired).await?;
            if let Ok(mut g) = generations.lock() {
                g.insert(w.id(), generation);
            }
            Ok(Some(after))
        }
    })
    .await;
    let generations = generations.into_inner().unwrap_or_default();
    let written = outcomes
        .iter()
        .filter(|o| !matches!(o, Outcome::Fighting(_)))
        .count();
    let mut first_error = None;
    // A target not written: skipped with why, after its deviations.
    let skipped = |w: &Workload, d: &Decision, why: String| Violation {
        rule: ctype.into(),
        object: w.id(),
        message: format!("{}; {why}", d.deviations.join("; ")),
        action: ViolationAction::Skipped,
    };
    for outcome in outcomes {
        let (w, d) = match outcome {
            Outcome::Fighting((w, d)) => {
                tally.fights.push(w.id());
                let why = "another writer keeps changing these annotations back";
                report.violations.push(skipped(w, d, why.into()));
                continue;
            }
            Outcome::Failed((w, d), e) => {
                if let Some(c) = cache {
                    c.record_write_result(w, Some(e.to_string()));
                }
                tally.failed_writes += 1;
                let why = format!(
                    "the write failed: {e}; retried at the next reconcile, after the other targets"
                );
                report.violations.push(skipped(w, d, why));
                first_error.get_or_insert(e);
                continue;
            }
            Outcome::Written(item) => item,
        };
        let id = w.id();
        if let Some(c) = cache {
            c.record_write_result(w, None);
            c.record_written(w, generations.get(&id).copied().flatten());
        }
        report.corrected += 1;
        report.compliant += 1;
        // The first few are published as Events; the rest are counted in `corrected`.
        if report.corrections.len() < CORRECTIONS_LISTED {
            report.corrections.push(format!(
                "{id}: sidecar resources set to {} ({}); its pods roll",
                desired.summary(),
                d.deviations.join("; ")
            ));
        }
        for m in &w.foreign_owners {
            tally.takeovers.push(format!("{id} (was managed by {m})"));
        }
        if !d.rolling {
            tally.started.push(id.clone());
        }
    }
    tally.first_error = first_error.as_ref().map(|e| e.to_string());
    match first_error {
        Some(e) if tally.failed_writes == written => Err(e),
        _ => Ok(()),
    }
}
