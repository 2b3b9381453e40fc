//! `meshwarden plan`: exactly what Enforce would write, before it writes anything.
//!
//! The policy (from the cluster, or from a file that need not exist there yet) is evaluated by
//! the operator's own code ([`crate::controller::evaluate`]: the same observe and plan of every
//! section, with each section's enforcement set to Enforce), with a context whose writes are
//! dry runs ([`crate::write::dry_run`]): every write goes to the API server as the same
//! server-side apply or delete with `dryRun=All`, so admission, validation and field ownership
//! answer as they would, and nothing is persisted. No status is written and no Event published:
//! those are the controller's, which does not run here. What each write would do is rendered
//! per object ([`render`]).

pub mod diff;
mod render;

use std::sync::Arc;

use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde::Serialize;
use serde_json::Value;

use crate::api::{Enforcement, MeshPolicy, MeshPolicySpec, ViolationAction};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::rules::upgrades::{RESTARTED_NOW, WAITS_FOR_RESTART_SLOT};
use crate::status::conditions::Status;
use crate::write::dry_run::{Change, DryRun, Verb};
use crate::write::{Writes, fields};

pub use render::{Output, render};

/// Where the policy comes from.
pub enum Source {
    /// A MeshPolicy in the cluster, by name.
    Cluster(String),
    /// A MeshPolicy manifest (YAML or JSON), which need not exist in the cluster, nor its CRD.
    File(String),
}

/// What Enforce would do for one policy.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub policy: String,
    /// Remarks on how the plan was made (the policy not validated without its CRD, say).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Every write, in the order Enforce makes them.
    pub changes: Vec<ObjectChange>,
    /// Deviations Enforce would leave for now (a rollout slot, the STRICT hold, a fight) or
    /// cannot correct, with why.
    pub not_written: Vec<NotWritten>,
    /// Sections that could not be evaluated (the plan is incomplete), with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed_sections: Vec<NotWritten>,
    /// The sidecar rollouts and their pacing, when the sidecars section is paced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waves: Option<Waves>,
    /// The upgrades section's restarts of outdated proxies and their pacing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restart_waves: Option<Waves>,
    /// Sections Enforce stops at a refused write: the writes they would make after it are
    /// not planned.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stopped_sections: Vec<Stopped>,
}

/// A section stopped at a refused write, in Enforce as in the plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stopped {
    pub section: String,
    /// The refused writes it stopped at (`Kind namespace/name`).
    pub at: Vec<String>,
    pub message: String,
}

/// What a [`Stopped`] section's message says.
pub const NOT_PLANNED_AFTER_REFUSAL: &str = "the writes it would make after this refused one were not planned, as Enforce stops the section at a refused write";

/// The rollouts (sidecar rollouts, or restarts) Enforce starts now and those waiting for a
/// slot: one wave after the other, each of at most `max_concurrent` workloads (rollouts already
/// in progress hold slots too, so this is the fewest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Waves {
    pub now: usize,
    pub waiting: usize,
    pub max_concurrent: usize,
    pub waves: usize,
}

impl Waves {
    /// `now` rollouts written, `waiting` held for a slot, `max_concurrent` at once.
    pub fn of(now: usize, waiting: usize, max_concurrent: usize) -> Option<Waves> {
        let max = max_concurrent.max(1);
        (waiting > 0).then(|| Waves {
            now,
            waiting,
            max_concurrent: max,
            waves: usize::from(now > 0) + waiting.div_ceil(max),
        })
    }
}

/// One object Enforce would write.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectChange {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    pub action: Action,
    /// The object as read (without `managedFields`, status and the server's bookkeeping).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    /// The object as the API server's dry run returned it, likewise trimmed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
    /// Fields taken over from other managers (or shared with them), by manager.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub takeovers: Vec<Takeover>,
    /// Fields meshwarden's apply owned and no longer declares: their values stay.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<String>,
    /// The API server's message when it refuses the write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// The server-side apply a refused write sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent: Option<Value>,
    /// The write changes the pod template: the workload's pods roll.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

impl ObjectChange {
    /// `Kind namespace/name` (`Kind name` when cluster-scoped).
    pub fn id(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    Delete,
    /// A write that would change no field (nothing taken over either).
    Unchanged,
    Refused,
}

/// Another manager's fields a write takes over, or applies with the same value (both own
/// them afterwards).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Takeover {
    pub manager: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shared: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rollout {
    /// The pods that roll (the workload's replicas; a DaemonSet's scheduled pods).
    pub pods: Option<i64>,
    /// Which paced rollout it is, when it is one: paced with the others of its kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
}

/// The paced rollouts meshwarden starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cause {
    /// The sidecars section changes the proxy resources (meshwarden's hash on the template).
    Sidecars,
    /// The upgrades section restarts the workload: its proxies are outdated
    /// (`kubectl.kubernetes.io/restartedAt` on the template).
    Restart,
}

/// A deviation left alone, or a section that could not be evaluated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NotWritten {
    pub section: String,
    pub object: String,
    /// `Held`, `Skipped`, `Reported` (cannot be corrected), `Failed`.
    pub action: String,
    pub message: String,
}

impl Plan {
    /// Whether Enforce would change anything (a refused write included).
    pub fn pending(&self) -> bool {
        self.changes.iter().any(|c| c.action != Action::Unchanged)
    }

    /// The exit code of `meshwarden plan`: 0 nothing would change, 2 changes are pending, 1 a
    /// section could not be evaluated (the plan would be incomplete).
    pub fn exit_code(&self) -> u8 {
        match (self.failed_sections.is_empty(), self.pending()) {
            (false, _) => 1,
            (true, true) => 2,
            (true, false) => 0,
        }
    }
}

/// Every section's enforcement set to Enforce.
pub fn enforce_everything(spec: &mut MeshPolicySpec) {
    spec.enforcement = Enforcement::Enforce;
    if let Some(c) = &mut spec.control_plane {
        c.enforcement = None;
    }
    for g in &mut spec.gateways {
        g.enforcement = None;
    }
    if let Some(s) = &mut spec.sidecars {
        s.enforcement = None;
    }
    if let Some(m) = &mut spec.mtls {
        m.enforcement = None;
    }
    if let Some(u) = &mut spec.upgrades {
        u.enforcement = None;
    }
    if let Some(g) = &mut spec.gateway_api {
        g.enforcement = None;
    }
}

/// Plans `source` against the cluster of `client`; `istio_namespace` as `run`'s.
pub async fn plan(client: Client, source: Source, istio_namespace: &str) -> Result<Plan> {
    let api: Api<MeshPolicy> = Api::all(client.clone());
    let mut notes = Vec::new();
    // Every policy, for the conflicts between them (older policies win); none without the CRD.
    let all = match api.list(&ListParams::default()).await {
        Ok(l) => Some(l.items),
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => return Err(Error::kube("list MeshPolicies", e)),
    };
    let mut policy = match source {
        Source::Cluster(name) => all
            .iter()
            .flatten()
            .find(|p| p.name_any() == name)
            .cloned()
            .ok_or_else(|| Error::InvalidSpec(format!("no MeshPolicy {name} in the cluster")))?,
        Source::File(text) => from_file(&api, &text, all.is_some(), &mut notes).await?,
    };
    let name = policy.name_any();
    enforce_everything(&mut policy.spec);
    let mut others: Vec<MeshPolicy> = all
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.name_any() != name)
        .collect();
    others.push(policy.clone());
    let refs: Vec<&MeshPolicy> = others.iter().collect();

    let record = Arc::new(DryRun::default());
    let mut ctx = one_pass_context(client, istio_namespace).await?;
    ctx.writes = Writes::dry_run(record.clone());
    let (reports, conflicts) = crate::controller::evaluate(&ctx, &policy, &refs).await;
    // As the Conflict condition would say: what an older policy decides instead.
    notes.extend(conflicts.iter().map(|c| {
        format!(
            "spec.{} is not planned: the older MeshPolicy {} sets it differently and wins (condition Conflict)",
            c.field, c.winner
        )
    }));

    let changes: Vec<ObjectChange> = record.changes().into_iter().map(object_change).collect();
    let mut not_written = Vec::new();
    let mut failed_sections = Vec::new();
    let mut stopped_sections = Vec::new();
    for r in &reports {
        let section = r.condition.type_.clone();
        // A section that stops at a refused write reports it as failed: the refusal is shown,
        // and the plan is no less complete than Enforce's pass, which stops there too.
        let at = stopped_at(&changes, &r.condition.message);
        if r.condition.status == Status::Unknown && at.is_empty() {
            failed_sections.push(NotWritten {
                section: section.clone(),
                object: format!("MeshPolicy/{name}"),
                action: r.condition.reason.clone(),
                message: r.condition.message.clone(),
            });
        }
        if r.condition.status == Status::Unknown && !at.is_empty() {
            stopped_sections.push(Stopped {
                section: section.clone(),
                at,
                message: NOT_PLANNED_AFTER_REFUSAL.into(),
            });
        }
        for v in &r.violations {
            // A restart made in this pass is a change listed above, not a deviation left.
            let restarted = section == crate::status::conditions::types::UPGRADES
                && v.message.ends_with(RESTARTED_NOW);
            if v.action == ViolationAction::Failed || restarted {
                continue;
            }
            not_written.push(NotWritten {
                section: section.clone(),
                object: v.object.clone(),
                action: v.action.as_str().to_string(),
                message: v.message.clone(),
            });
        }
    }
    let paced = |cause: Cause, slot: &str, max: i32| {
        let now = changes
            .iter()
            .filter(|c| c.rollout.as_ref().is_some_and(|r| r.cause == Some(cause)))
            .count();
        let waiting = not_written
            .iter()
            .filter(|n| n.message.contains(slot))
            .count();
        Waves::of(now, waiting, usize::try_from(max).unwrap_or(1))
    };
    let waves = policy
        .spec
        .sidecars
        .as_ref()
        .filter(|s| s.pacing == crate::api::Pacing::Paced)
        .and_then(|s| {
            paced(
                Cause::Sidecars,
                crate::rules::sidecars::WAITS_FOR_SLOT,
                s.max_concurrent_rollouts,
            )
        });
    let restart_waves = policy
        .spec
        .upgrades
        .as_ref()
        .filter(|u| u.restart_outdated)
        .and_then(|u| {
            paced(
                Cause::Restart,
                WAITS_FOR_RESTART_SLOT,
                u.max_concurrent_restarts,
            )
        });
    Ok(Plan {
        policy: name,
        notes,
        changes,
        not_written,
        failed_sections,
        waves,
        restart_waves,
        stopped_sections,
    })
}

/// The refused writes a section's error names (`apply PeerAuthentication meshwarden-mtls:
/// ...`), as `Kind namespace/name`: the section stopped there.
fn stopped_at(changes: &[ObjectChange], message: &str) -> Vec<String> {
    changes
        .iter()
        .filter(|c| c.action == Action::Refused)
        .filter(|c| message.contains(&format!("{} {}", c.kind, c.name)))
        .map(ObjectChange::id)
        .collect()
}

/// A context for one evaluation outside the controller: the workload and pod caches the
/// operator's reconciles read, filled from one LIST of each kind
/// ([`crate::rules::sidecars::Cache::snapshot`]), so that every section decides from what it
/// decides from under the controller (the upgrades section plans restarts only from them).
pub async fn one_pass_context(client: Client, istio_namespace: &str) -> Result<Context> {
    let mut ctx = Context::new(client, None);
    ctx.istio_namespace = istio_namespace.to_string();
    ctx.set_cache(Some(
        crate::rules::sidecars::Cache::snapshot(&ctx.client).await?,
    ));
    Ok(ctx)
}

/// The policy of a manifest, validated by the API server (a dry-run create, or update of the
/// policy of that name) when the CRD is installed.
async fn from_file(
    api: &Api<MeshPolicy>,
    text: &str,
    crd: bool,
    notes: &mut Vec<String>,
) -> Result<MeshPolicy> {
    let mut policy: MeshPolicy = serde_yaml::from_str(text)
        .map_err(|e| Error::InvalidSpec(format!("not a MeshPolicy manifest: {e}")))?;
    let name = policy.name_any();
    if name.is_empty() {
        return Err(Error::InvalidSpec(
            "the MeshPolicy has no metadata.name".into(),
        ));
    }
    policy.status = None;
    if !crd {
        notes.push(
            "the MeshPolicy CRD is not installed: the policy was not validated by the API server, and the PodDisruptionBudgets and PeerAuthentications it creates get their ownerReference to it once it exists".into(),
        );
        policy.metadata.creation_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        );
        return Ok(policy);
    }
    let dry = PostParams {
        dry_run: true,
        field_manager: Some(crate::write::FIELD_MANAGER.into()),
    };
    let existing = api
        .get_opt(&name)
        .await
        .map_err(|e| Error::kube(format!("read MeshPolicy {name}"), e))?;
    let validated = match existing {
        Some(live) => {
            policy.metadata.resource_version = live.metadata.resource_version.clone();
            notes.push(format!(
                "the spec of {name} is taken from the file, not from the cluster"
            ));
            api.replace(&name, &dry, &policy).await
        }
        None => {
            notes.push(format!(
                "{name} does not exist in the cluster: its ownerReferences name the uid of a dry-run create"
            ));
            api.create(&dry, &policy).await
        }
    };
    validated.map_err(|e| match e {
        kube::Error::Api(s) => Error::InvalidSpec(s.message),
        e => Error::kube(format!("validate MeshPolicy {name}"), e),
    })
}

/// What one recorded dry run does, trimmed for reading.
fn object_change(c: Change) -> ObjectChange {
    let meta = |v: &Option<Value>| {
        v.as_ref()
            .and_then(|v| serde_json::from_value(v["metadata"].clone()).ok())
            .unwrap_or_default()
    };
    let takeovers: Vec<Takeover> = fields::taken_over(&meta(&c.before), &meta(&c.after))
        .into_iter()
        .map(|t| Takeover {
            manager: t.manager,
            fields: t.fields,
            shared: t.shared,
        })
        .collect();
    let taken = takeovers.iter().any(|t| !t.fields.is_empty());
    let rollout = rollout(&c);
    let (before, after) = (c.before.map(trim), c.after.map(trim));
    let action = match (&c.refused, c.verb, &before) {
        (Some(_), _, _) => Action::Refused,
        (None, Verb::Delete, _) => Action::Delete,
        (None, Verb::Apply, None) => Action::Create,
        (None, Verb::Apply, Some(_)) if before == after && !taken => Action::Unchanged,
        (None, Verb::Apply, Some(_)) => Action::Update,
    };
    ObjectChange {
        kind: c.kind,
        namespace: c.namespace,
        name: c.name,
        action,
        before,
        after,
        takeovers,
        released: c.released,
        sent: c.refused.is_some().then_some(c.sent).flatten(),
        refused: c.refused,
        rollout,
    }
}

/// Which paced rollout a write of a workload's template is: one that changes the sidecars
/// section's annotations on the template (the proxy resources or their hash; a drift put right
/// changes a value, not the hash), or the upgrades section's `restartedAt`.
fn cause(before: &Value, after: &Value) -> Option<Cause> {
    let annotation = |v: &Value, key: &str| {
        v.pointer("/spec/template/metadata/annotations")
            .and_then(|a| a.get(key))
            .cloned()
    };
    let changes = |key: &str| annotation(before, key) != annotation(after, key);
    if crate::rules::sidecars::TEMPLATE_ANNOTATIONS
        .iter()
        .any(|k| changes(k))
    {
        Some(Cause::Sidecars)
    } else if changes(crate::rules::sidecars::RESTARTED_AT) {
        Some(Cause::Restart)
    } else {
        None
    }
}

/// The pods a write rolls: those of a workload whose pod template it changes.
fn rollout(c: &Change) -> Option<Rollout> {
    let (before, after) = (c.before.as_ref()?, c.after.as_ref()?);
    let template = |v: &Value| v.pointer("/spec/template").cloned();
    if !matches!(c.kind.as_str(), "Deployment" | "StatefulSet" | "DaemonSet")
        || template(before) == template(after)
    {
        return None;
    }
    let pods = match c.kind.as_str() {
        "DaemonSet" => before.pointer("/status/desiredNumberScheduled"),
        _ => after.pointer("/spec/replicas"),
    };
    Some(Rollout {
        pods: pods.and_then(Value::as_i64),
        cause: cause(before, after),
    })
}

/// An object without what every write changes or nobody reads in a diff: `managedFields`,
/// `resourceVersion`, `generation`, `uid`, `creationTimestamp` and the status.
fn trim(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("status");
    }
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "managedFields",
            "resourceVersion",
            "generation",
            "uid",
            "creationTimestamp",
        ] {
            m.remove(k);
        }
    }
    v
}

#[cfg(test)]
mod tests;
