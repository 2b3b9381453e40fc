//! The writes of one HA group through `write::driver`: per target its HPA, Deployment and
//! PodDisruptionBudget (in that order, each failing on its own) with one fight check per
//! fixable finding, and the PodDisruptionBudgets left behind by Deployments that are gone.

use std::sync::Mutex;

use super::*;
use crate::write::ForeignWrites;
use crate::write::driver::{Check, Planned};

/// One write of a group, as the driver runs it.
#[derive(Clone)]
pub(super) enum HaWrite<'a> {
    /// A PodDisruptionBudget meshwarden created for a Deployment that is gone: deleted.
    LeftBehind {
        name: String,
    },
    Target(Box<Target<'a>>),
}

/// The writes of one target.
#[derive(Clone)]
pub(super) struct Target<'a> {
    pub(super) obs: &'a Observation,
    pub(super) plan: Plan,
    /// The finding each fight check is about (its index in `plan.findings`).
    checked: Vec<usize>,
    /// Findings another writer keeps reverting: their writes are cut out of `plan`.
    pub(super) held: Vec<Finding>,
}

/// The write of one target: in Enforce, one fight check per fixable finding, under the key of
/// its object and field.
pub(super) fn planned<'a>(
    policy: &str,
    section: &'static str,
    obs: &'a Observation,
    plan: Plan,
    enforce: bool,
) -> Planned<HaWrite<'a>> {
    let checked: Vec<usize> = (0..plan.findings.len())
        .filter(|&i| enforce && plan.findings[i].fixable)
        .collect();
    let checks = checked
        .iter()
        .map(|&i| {
            let f = &plan.findings[i];
            Check {
                key: FightKey {
                    policy: policy.to_string(),
                    section,
                    object: f.object.clone(),
                    field: Some(f.field.clone()),
                },
                seen: observed_meta(obs, f).map(|read| foreign(read, read, f)),
            }
        })
        .collect();
    Planned {
        checks,
        item: HaWrite::Target(Box::new(Target {
            obs,
            plan,
            checked,
            held: Vec::new(),
        })),
    }
}

/// The other managers' writes of `f`'s field in `meta`, without those of the installer of the
/// object as read: an installer re-applying its own render (an upgrade, a rollback, a sync) is
/// restored, never counted toward a fight.
fn foreign(meta: &ObjectMeta, read: &ObjectMeta, f: &Finding) -> ForeignWrites {
    let installer = source::installer(read).map(|i| i.manager());
    write::foreign_writes(meta, &f.owned).without(installer)
}

/// Cuts the writes of the fields in a fight (`checks`) out of a target's plan; whether anything
/// is left to write.
pub(super) fn hold(w: &mut HaWrite<'_>, checks: &[usize]) -> bool {
    let HaWrite::Target(t) = w else {
        return true;
    };
    t.held = checks
        .iter()
        .filter_map(|&c| t.checked.get(c))
        .filter_map(|&i| t.plan.findings.get(i))
        .cloned()
        .collect();
    fight::hold(&mut t.plan, &t.held);
    let p = &t.plan;
    p.hpa_patch.is_some()
        || p.deployment_patch.is_some()
        || p.pdb.is_some()
        || t.checked
            .iter()
            .filter_map(|&i| p.findings.get(i))
            .any(|f| !t.held.contains(f))
}

/// Sends one write of a group. A target's refused writes go to `failures` (by Deployment name);
/// its result is the foreign writes after the write for each fight check (`None`: its object
/// was not written). Without the object the write returned (a deleted PDB), the next
/// correction compares with what was read.
pub(super) async fn send(
    ctx: &Context,
    group: &Group,
    w: HaWrite<'_>,
    failures: &Mutex<HashMap<String, Vec<WriteFailure>>>,
) -> Result<Vec<Option<ForeignWrites>>> {
    let t = match w {
        HaWrite::LeftBehind { name } => {
            let api: Api<PodDisruptionBudget> =
                Api::namespaced(ctx.client.clone(), &group.namespace);
            return write::delete(&api, &name, &ctx.writes)
                .await
                .map(|()| Vec::new());
        }
        HaWrite::Target(t) => t,
    };
    let name = t.obs.deployment.name_any();
    let dep_id = object_id("Deployment", &group.namespace, &name);
    tracing::debug!(target = %dep_id, "correcting");
    let (failed, applied) = execute(ctx, group, &t.plan).await;
    tracing::debug!(target = %dep_id, "corrected");
    let afters = t
        .checked
        .iter()
        .filter_map(|&i| t.plan.findings.get(i))
        .map(|f| {
            if failed.iter().any(|w| w.kind == write_kind(f)) {
                return None;
            }
            let read = observed_meta(t.obs, f)?;
            Some(
                applied
                    .get(write_kind(f))
                    .map_or_else(|| foreign(read, read, f), |m| foreign(m, read, f)),
            )
        })
        .collect();
    if let Ok(mut all) = failures.lock() {
        all.insert(name, failed);
    }
    Ok(afters)
}

/// A write of a plan that the API server refused (or that could not be sent).
pub(super) struct WriteFailure {
    /// Kind of the object (`Deployment`, `HorizontalPodAutoscaler`, `PodDisruptionBudget`).
    pub(super) kind: &'static str,
    /// `Kind/namespace/name`.
    pub(super) object: String,
    /// The API server's message.
    pub(super) message: String,
    pub(super) forbidden: bool,
}

impl WriteFailure {
    pub(super) fn of(kind: &'static str, object: String, e: &Error) -> Self {
        let (message, forbidden) = match e {
            Error::Kube {
                source: kube::Error::Api(s),
                ..
            } => (s.message.clone(), s.code == 403),
            other => (other.to_string(), false),
        };
        WriteFailure {
            kind,
            object,
            message,
            forbidden,
        }
    }
}

/// Which write of a plan corrects a finding.
pub(super) fn write_kind(f: &Finding) -> &'static str {
    if f.object.starts_with("HorizontalPodAutoscaler/") {
        "HorizontalPodAutoscaler"
    } else if f.object.starts_with("PodDisruptionBudget/") || f.field == "PodDisruptionBudget" {
        "PodDisruptionBudget"
    } else {
        "Deployment"
    }
}

/// The object a finding is about, as read.
pub(super) fn observed_meta<'a>(obs: &'a Observation, f: &Finding) -> Option<&'a ObjectMeta> {
    match write_kind(f) {
        "HorizontalPodAutoscaler" => obs.hpa.as_ref().map(|h| &h.metadata),
        "PodDisruptionBudget" => obs
            .pdbs
            .iter()
            .find(|b| {
                f.object
                    == object_id(
                        "PodDisruptionBudget",
                        &b.namespace().unwrap_or_default(),
                        &b.name_any(),
                    )
            })
            .map(|b| &b.metadata)
            .or(Some(&obs.deployment.metadata)),
        _ => Some(&obs.deployment.metadata),
    }
}

/// Sends every write of a plan; one refused write does not stop the others. Returns those
/// that failed, and the metadata of each object written, by kind, as the API server returned it.
pub(super) async fn execute(
    ctx: &Context,
    group: &Group,
    plan: &Plan,
) -> (Vec<WriteFailure>, HashMap<&'static str, ObjectMeta>) {
    let ns = &group.namespace;
    let mut failed = Vec::new();
    let mut applied = HashMap::new();
    let mut record = |kind: &'static str, name: &str, result: Result<Option<ObjectMeta>>| {
        if let Ok(Some(meta)) = &result {
            applied.insert(kind, meta.clone());
        }
        if let Err(e) = result {
            tracing::warn!(kind, name, namespace = %ns, error = %e, "write failed");
            failed.push(WriteFailure::of(kind, object_id(kind, ns, name), &e));
        }
    };
    if let Some((name, patch)) = &plan.hpa_patch {
        let api: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
        let r = write::apply_keeping(&api, name, patch, &ctx.writes).await;
        record(
            "HorizontalPodAutoscaler",
            name,
            r.map(|(h, _)| Some(h.metadata)),
        );
    }
    if let Some(patch) = &plan.deployment_patch {
        let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
        let name = patch["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let r = write::apply_keeping(&api, &name, patch, &ctx.writes).await;
        if let Ok((_, released)) = &r
            && !released.is_empty()
        {
            tracing::info!(deployment = %name, namespace = %ns, fields = ?released, "released fields the policy no longer declares; their values stay");
        }
        record("Deployment", &name, r.map(|(d, _)| Some(d.metadata)));
    }
    let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    match &plan.pdb {
        Some(PdbAction::Apply { name, patch }) => {
            let r = write::apply(&api, name, patch, &ctx.writes).await;
            record("PodDisruptionBudget", name, r.map(|b| Some(b.metadata)));
        }
        Some(PdbAction::Delete { name }) => {
            let r = write::delete(&api, name, &ctx.writes).await;
            record("PodDisruptionBudget", name, r.map(|()| None));
        }
        None => {}
    }
    (failed, applied)
}
