//! The only way meshwarden writes to the mesh: server-side apply of partial objects with one
//! field manager, plus what a write needs to be honest about: which other managers owned the
//! fields we take over ([`fields`]), whether we keep correcting the same field ([`fight`]), and
//! one bounded loop that checks fights, writes and records ([`driver`]). Labels and owner
//! references of the objects meshwarden creates are built here too.

pub mod driver;
pub mod dry_run;
pub mod fields;
pub mod fight;

pub use dry_run::DryRun;
pub use fields::{ForeignWrites, foreign_managers, foreign_writes, handover_patch};
pub use fight::{FightKey, FightTracker, Memory};

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Field manager of every write meshwarden makes.
pub const FIELD_MANAGER: &str = "meshwarden";

/// The label every object meshwarden creates carries.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "meshwarden");

/// The label naming the policy an object meshwarden created belongs to.
pub const POLICY_LABEL: &str = "meshwarden.io/policy";

/// The labels of an object meshwarden creates for `policy`.
pub fn labels(policy: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
        (POLICY_LABEL.to_string(), policy.to_string()),
    ])
}

/// The label selector of the objects meshwarden created for `policy` ([`labels`]).
pub fn label_selector(policy: &str) -> String {
    format!("{}={},{POLICY_LABEL}={policy}", MANAGED_BY.0, MANAGED_BY.1)
}

/// True when meshwarden created the object, for any policy (it carries [`MANAGED_BY`]).
pub fn created_by_meshwarden(meta: &ObjectMeta) -> bool {
    label(meta, MANAGED_BY.0) == Some(MANAGED_BY.1)
}

/// True when meshwarden created the object for `policy` (it carries [`labels`]).
pub fn created_for(meta: &ObjectMeta, policy: &str) -> bool {
    created_by_meshwarden(meta) && label(meta, POLICY_LABEL) == Some(policy)
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// The owner reference of an object meshwarden creates for `policy`: the garbage collector
/// deletes it with the policy; deleting the policy is never blocked by it.
pub fn owner_reference(policy: &crate::api::MeshPolicy) -> Option<OwnerReference> {
    policy.controller_owner_ref(&()).map(|mut o| {
        o.block_owner_deletion = Some(false);
        o
    })
}

/// How writes are made: counted (for tests, benchmarks and the `meshwarden_api_writes`
/// metric), or, for `meshwarden plan`, sent as dry runs and recorded ([`DryRun`]).
#[derive(Debug, Default)]
pub struct Writes {
    count: AtomicU64,
    metric: prometheus_client::metrics::counter::Counter,
    dry_run: Option<Arc<DryRun>>,
}

impl Writes {
    /// Real writes, each also counted in `metric`.
    pub fn new(metric: prometheus_client::metrics::counter::Counter) -> Self {
        Writes {
            count: AtomicU64::new(0),
            metric,
            dry_run: None,
        }
    }

    /// Every write a dry run (`dryRun=All`), recorded in `record`; none is counted.
    pub fn dry_run(record: Arc<DryRun>) -> Self {
        Writes {
            dry_run: Some(record),
            ..Default::default()
        }
    }

    /// The record of the dry runs, when writes are dry runs.
    pub fn dry_runs(&self) -> Option<&DryRun> {
        self.dry_run.as_deref()
    }

    /// Writes made so far (dry runs are not writes).
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Counts one write.
    pub fn add(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.metric.inc();
    }
}

/// Server-side applies `patch` (a partial object holding only the fields meshwarden owns)
/// to `name`, taking over conflicting fields (`force`), as the Kubernetes docs advise for
/// controllers. Callers report the previous owners (see [`foreign_managers`]).
pub async fn apply<K>(
    api: &Api<K>,
    name: &str,
    patch: &serde_json::Value,
    writes: &Writes,
) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + serde::Serialize,
{
    apply_with(api, name, patch, writes, true).await
}

/// Server-side applies `patch` like [`apply`]; without `force`, fields another manager owns
/// are not taken over: the API server refuses the apply (409) instead. For a field of an
/// object others write that meshwarden sets only while nobody else does.
pub async fn apply_with<K>(
    api: &Api<K>,
    name: &str,
    patch: &serde_json::Value,
    writes: &Writes,
    force: bool,
) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + serde::Serialize,
{
    let kind = K::kind(&()).to_string();
    let params = apply_params(force);
    let Some(record) = writes.dry_runs() else {
        writes.add();
        return api
            .patch(name, &params, &Patch::Apply(patch))
            .await
            .map_err(|e| Error::kube(format!("apply {kind} {name}"), e));
    };
    let seq = record.start();
    let live = read(api, name).await?;
    dry_apply(api, name, patch, (seq, live), (Vec::new(), force), record).await
}

fn apply_params(force: bool) -> PatchParams {
    let params = PatchParams::apply(FIELD_MANAGER);
    if force { params.force() } else { params }
}

async fn read<K>(api: &Api<K>, name: &str) -> Result<Option<K>>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let kind = K::kind(&()).to_string();
    api.get_opt(name)
        .await
        .map_err(|e| Error::kube(format!("read {kind} {name}"), e))
}

/// The dry run of an apply of `patch` to `live` (as read): recorded with the object the API
/// server returned, the values of `released` fields put back (see
/// [`dry_run::keep_released`]), or with the server's refusal.
async fn dry_apply<K>(
    api: &Api<K>,
    name: &str,
    patch: &serde_json::Value,
    (seq, live): (usize, Option<K>),
    (released, force): (Vec<Vec<String>>, bool),
    record: &DryRun,
) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + serde::Serialize,
{
    let kind = K::kind(&()).to_string();
    let params = apply_params(force).dry_run();
    let before = live.as_ref().map(serde_json::to_value).transpose()?;
    let result = api.patch(name, &params, &Patch::Apply(patch)).await;
    let mut change = dry_run::Change {
        seq,
        kind: kind.clone(),
        namespace: api_namespace(api, live.as_ref()),
        name: name.to_string(),
        verb: dry_run::Verb::Apply,
        before,
        after: None,
        released: released.iter().map(|p| fields::field_name(p)).collect(),
        refused: None,
        sent: Some(patch.clone()),
    };
    match result {
        Ok(mut applied) => {
            let mut after = serde_json::to_value(&applied)?;
            if let Some(live) = &change.before
                && !released.is_empty()
            {
                dry_run::keep_released(&mut after, live, &released);
                applied = serde_json::from_value(after.clone())?;
            }
            change.after = Some(after);
            record.record(change);
            Ok(applied)
        }
        Err(e) => {
            change.refused = Some(dry_run::refusal(&e));
            record.record(change);
            Err(Error::kube(format!("apply {kind} {name}"), e))
        }
    }
}

/// The namespace a write goes to: the object's as read, else the `Api`'s.
fn api_namespace<K: Resource>(api: &Api<K>, live: Option<&K>) -> Option<String> {
    live.and_then(|l| l.meta().namespace.clone())
        .or_else(|| api.namespace().map(str::to_string))
}

/// Server-side applies `patch` like [`apply`], first making sure that no value meshwarden set
/// is lost because `patch` no longer carries it.
///
/// Server-side apply removes a field that its manager stops sending when no other manager owns
/// it (`spec.replicas` falls back to 1, anti-affinity terms and resource limits disappear).
/// meshwarden often is the only owner of what it took over, so before an apply that drops such
/// fields they are handed to meshwarden's own `Update` entry in `managedFields`, the entry a
/// `kubectl edit` by the same manager would have left: the values stay as they are, nobody
/// re-declares them, and the next writer of any of them (Helm, a human) simply takes them over.
/// Returns the released fields' paths (for logs and tests) with the applied object.
pub async fn apply_keeping<K>(
    api: &Api<K>,
    name: &str,
    patch: &serde_json::Value,
    writes: &Writes,
) -> Result<(K, Vec<String>)>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + serde::Serialize,
{
    let kind = K::kind(&()).to_string();
    let seq = writes.dry_runs().map(DryRun::start);
    let live = read(api, name).await?;
    if let (Some(record), Some(seq)) = (writes.dry_runs(), seq) {
        // The hand-over is not sent: its JSON patch would have to persist before the apply
        // it prepares; the values it keeps are put back into the apply's answer instead.
        let released = live
            .as_ref()
            .map(|l| fields::released_paths(l.meta(), patch))
            .unwrap_or_default();
        let names = released.iter().map(|p| fields::field_name(p)).collect();
        let applied = dry_apply(api, name, patch, (seq, live), (released, true), record).await?;
        return Ok((applied, names));
    }
    let mut released = Vec::new();
    if let Some(live) = live {
        let meta = live.meta();
        let api_version = K::api_version(&()).to_string();
        if let Some(ops) = handover_patch(meta, patch, &api_version, &jiff::Timestamp::now()) {
            released = ops.1;
            let ops: json_patch::Patch = serde_json::from_value(ops.0)?;
            writes.add();
            api.patch(
                name,
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.to_string()),
                    ..Default::default()
                },
                &Patch::<()>::Json(ops),
            )
            .await
            .map_err(|e| Error::kube(format!("keep released fields of {kind} {name}"), e))?;
        }
    }
    let applied = apply(api, name, patch, writes).await?;
    Ok((applied, released))
}

/// Deletes an object meshwarden created, if it still exists.
pub async fn delete<K>(api: &Api<K>, name: &str, writes: &Writes) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + serde::Serialize,
{
    let kind = K::kind(&()).to_string();
    if let Some(record) = writes.dry_runs() {
        let seq = record.start();
        let Some(live) = read(api, name).await? else {
            return Ok(());
        };
        let mut change = dry_run::Change {
            seq,
            kind: kind.clone(),
            namespace: live.meta().namespace.clone(),
            name: name.to_string(),
            verb: dry_run::Verb::Delete,
            before: Some(serde_json::to_value(&live)?),
            after: None,
            released: Vec::new(),
            refused: None,
            sent: None,
        };
        let params = DeleteParams {
            dry_run: true,
            ..Default::default()
        };
        let result = api.delete(name, &params).await;
        if let Err(e) = &result {
            change.refused = Some(dry_run::refusal(e));
        }
        record.record(change);
        return match result {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(Error::kube(format!("delete {kind} {name}"), e)),
        };
    }
    writes.add();
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("delete {kind} {name}"), e)),
    }
}

/// Evicts pod `name` through the Eviction API: its PodDisruptionBudgets decide, and the API
/// server's refusal (429 while a budget allows no disruption) is the error. In a dry run the
/// eviction is sent with `dryRun=All` and recorded as the pod's deletion.
pub async fn evict(
    api: &Api<k8s_openapi::api::core::v1::Pod>,
    name: &str,
    writes: &Writes,
) -> std::result::Result<(), kube::Error> {
    let mut params = kube::api::EvictParams::default();
    let Some(record) = writes.dry_runs() else {
        writes.add();
        return api.evict(name, &params).await.map(|_| ());
    };
    let seq = record.start();
    let live = api.get_opt(name).await?;
    params.post_options.dry_run = true;
    let result = api.evict(name, &params).await.map(|_| ());
    record.record(dry_run::Change {
        seq,
        kind: "Pod".into(),
        namespace: api.namespace().map(str::to_string),
        name: name.to_string(),
        verb: dry_run::Verb::Delete,
        before: live.map(|p| serde_json::to_value(p).unwrap_or_default()),
        after: None,
        released: Vec::new(),
        refused: result.as_ref().err().map(dry_run::refusal),
        sent: None,
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_say_who_created_an_object() {
        let meta = |labels: BTreeMap<String, String>| ObjectMeta {
            labels: Some(labels),
            ..Default::default()
        };
        let ours = meta(labels("p"));
        assert!(created_for(&ours, "p") && created_by_meshwarden(&ours));
        assert!(!created_for(&ours, "q"), "another policy's");
        let helm = meta(BTreeMap::from([(MANAGED_BY.0.into(), "Helm".into())]));
        assert!(!created_by_meshwarden(&helm) && !created_for(&helm, "p"));
        assert!(!created_by_meshwarden(&ObjectMeta::default()));
        assert_eq!(
            label_selector("p"),
            "app.kubernetes.io/managed-by=meshwarden,meshwarden.io/policy=p"
        );
    }
}
