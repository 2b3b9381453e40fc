//! The writes of one HA target: its HPA, Deployment and PodDisruptionBudget, each failing on
//! its own.

use super::*;

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
            let (message, forbidden) = match &e {
                Error::Kube {
                    source: kube::Error::Api(s),
                    ..
                } => (s.message.clone(), s.code == 403),
                other => (other.to_string(), false),
            };
            tracing::warn!(kind, name, namespace = %ns, error = %e, "write failed");
            failed.push(WriteFailure {
                kind,
                object: object_id(kind, ns, name),
                message,
                forbidden,
            });
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
