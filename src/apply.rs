//! The only way meshwarden writes to the mesh: server-side apply of partial objects with one
//! field manager, plus what a write needs to be honest about: which other managers owned the
//! fields we take over, and whether we keep correcting the same field (a fight).

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Field manager of every write meshwarden makes.
pub const FIELD_MANAGER: &str = "meshwarden";

/// Counts the writes made, for tests, benchmarks and the `meshwarden_api_writes` metric.
#[derive(Debug, Default)]
pub struct WriteCounter {
    count: AtomicU64,
    metric: prometheus_client::metrics::counter::Counter,
}

impl WriteCounter {
    /// A counter that also increments `metric`.
    pub fn new(metric: prometheus_client::metrics::counter::Counter) -> Self {
        WriteCounter {
            count: AtomicU64::new(0),
            metric,
        }
    }

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
    writes: &WriteCounter,
) -> Result<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    writes.add();
    let kind = K::kind(&()).to_string();
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await
    .map_err(|e| Error::kube(format!("apply {kind} {name}"), e))
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
    writes: &WriteCounter,
) -> Result<(K, Vec<String>)>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + serde::Serialize,
{
    let kind = K::kind(&()).to_string();
    let live = api
        .get_opt(name)
        .await
        .map_err(|e| Error::kube(format!("read {kind} {name}"), e))?;
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

/// The JSON patch (and the released paths) that moves every field meshwarden's `Apply` entry
/// owns but `patch` does not carry to meshwarden's `Update` entry, guarded by the object's
/// `resourceVersion`. `None` when nothing would be released.
pub fn handover_patch(
    meta: &ObjectMeta,
    patch: &serde_json::Value,
    api_version: &str,
    now: &jiff::Timestamp,
) -> Option<(serde_json::Value, Vec<String>)> {
    use serde_json::{Value, json};
    let entries = meta.managed_fields.as_deref().unwrap_or_default();
    let ours = |e: &ManagedFieldsEntry, op: &str| {
        e.manager.as_deref() == Some(FIELD_MANAGER)
            && e.operation.as_deref() == Some(op)
            && e.subresource.as_deref().unwrap_or_default().is_empty()
    };
    let applied = entries.iter().find(|e| ours(e, "Apply"))?;
    let mut paths = Vec::new();
    flatten(&applied.fields_v1.as_ref()?.0, &mut Vec::new(), &mut paths);
    let released: Vec<Vec<String>> = paths.into_iter().filter(|p| !covered(patch, p)).collect();
    if released.is_empty() {
        return None;
    }
    let mut fields = Value::Object(Default::default());
    for p in &released {
        insert(&mut fields, p);
    }
    let names = released
        .iter()
        .map(|p| {
            p.iter()
                .map(|k| k.trim_start_matches("f:"))
                .collect::<Vec<_>>()
                .join(".")
        })
        .collect();
    let rv = meta.resource_version.clone().unwrap_or_default();
    let time = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let mut ops = vec![json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv})];
    let update = entries
        .iter()
        .position(|e| ours(e, "Update") && e.api_version.as_deref() == Some(api_version));
    match update {
        Some(i) => {
            if let Some(old) = entries[i].fields_v1.as_ref() {
                merge(&mut fields, &old.0);
            }
            let at = format!("/metadata/managedFields/{i}");
            ops.push(
                json!({"op": "test", "path": format!("{at}/manager"), "value": FIELD_MANAGER}),
            );
            ops.push(json!({"op": "test", "path": format!("{at}/operation"), "value": "Update"}));
            ops.push(json!({"op": "replace", "path": format!("{at}/fieldsV1"), "value": fields}));
            ops.push(json!({"op": "replace", "path": format!("{at}/time"), "value": time}));
        }
        None => ops.push(json!({
            "op": "add",
            "path": "/metadata/managedFields/-",
            "value": {
                "manager": FIELD_MANAGER,
                "operation": "Update",
                "apiVersion": api_version,
                "time": time,
                "fieldsType": "FieldsV1",
                "fieldsV1": fields,
            }
        })),
    }
    Some((Value::Array(ops), names))
}

/// Every owned path of a `fieldsV1` set (a leaf is `{}`; `.` marks the node itself).
fn flatten(node: &serde_json::Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let Some(map) = node.as_object() else { return };
    for (k, v) in map {
        prefix.push(k.clone());
        if v.as_object().is_some_and(|m| m.is_empty()) {
            out.push(prefix.clone());
        } else {
            flatten(v, prefix, out);
        }
        prefix.pop();
    }
}

/// Whether the applied configuration `node` still sets the field at `path`.
fn covered(node: &serde_json::Value, path: &[String]) -> bool {
    use serde_json::Value;
    let Some((head, rest)) = path.split_first() else {
        return !node.is_null();
    };
    if head == "." {
        return !node.is_null();
    }
    match node {
        Value::Object(m) => head
            .strip_prefix("f:")
            .and_then(|f| m.get(f))
            .is_some_and(|child| covered(child, rest)),
        Value::Array(items) => {
            if let Some(key) = head.strip_prefix("k:") {
                let Ok(Value::Object(key)) = serde_json::from_str::<Value>(key) else {
                    return false;
                };
                items
                    .iter()
                    .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))
                    .is_some_and(|item| covered(item, rest))
            } else {
                // Set members (`v:`) and positions (`i:`): the list is sent whole.
                true
            }
        }
        _ => false,
    }
}

fn insert(node: &mut serde_json::Value, path: &[String]) {
    let mut cur = node;
    for k in path {
        let Some(map) = cur.as_object_mut() else {
            return;
        };
        cur = map
            .entry(k.clone())
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
    }
}

fn merge(into: &mut serde_json::Value, from: &serde_json::Value) {
    let (Some(into), Some(from)) = (into.as_object_mut(), from.as_object()) else {
        return;
    };
    for (k, v) in from {
        match into.get_mut(k) {
            Some(existing) => merge(existing, v),
            None => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Deletes an object meshwarden created, if it still exists.
pub async fn delete<K>(api: &Api<K>, name: &str, writes: &WriteCounter) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    writes.add();
    let kind = K::kind(&()).to_string();
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(Error::kube(format!("delete {kind} {name}"), e)),
    }
}

/// `managedFields` entries of managers other than meshwarden that own the field at `path`
/// (keys as they appear in `managedFields`, e.g. `["f:spec", "f:minReplicas"]`) or anything
/// below it.
fn foreign_entries<'a, P: AsRef<str>>(
    meta: &'a ObjectMeta,
    path: &'a [P],
) -> impl Iterator<Item = (&'a str, &'a ManagedFieldsEntry)> + 'a {
    meta.managed_fields
        .iter()
        .flatten()
        .filter_map(move |entry| {
            let manager = entry.manager.as_deref()?;
            if manager == FIELD_MANAGER {
                return None;
            }
            let mut node = Some(&entry.fields_v1.as_ref()?.0);
            for key in path {
                node = node.and_then(|n| n.get(key.as_ref()));
            }
            node.map(|_| (manager, entry))
        })
}

/// Managers other than meshwarden that own the field at `path` or anything below it.
pub fn foreign_managers(meta: &ObjectMeta, path: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (manager, _) in foreign_entries(meta, path) {
        if !out.iter().any(|m| m == manager) {
            out.push(manager.to_string());
        }
    }
    out
}

/// What [`FightTracker::correct`] needs to know about one field of one object, read at one
/// moment: the object's `generation` and the writes by managers other than meshwarden that
/// own the field (`manager operation time` of their `managedFields` entries, for the fields
/// at `paths`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForeignWrites {
    pub generation: i64,
    pub writes: Vec<String>,
}

/// The [`ForeignWrites`] of the fields at `paths` (keys as in [`foreign_managers`]).
pub fn foreign_writes(meta: &ObjectMeta, paths: &[Vec<String>]) -> ForeignWrites {
    let mut writes: Vec<String> = Vec::new();
    for path in paths {
        for (manager, e) in foreign_entries(meta, path) {
            let write = format!(
                "{manager} {} {}",
                e.operation.as_deref().unwrap_or_default(),
                e.time.as_ref().map(|t| t.0.to_string()).unwrap_or_default()
            );
            if !writes.contains(&write) {
                writes.push(write);
            }
        }
    }
    ForeignWrites {
        generation: meta.generation.unwrap_or_default(),
        writes,
    }
}

/// Remembers recent corrections of each (object, field) so that a field somebody else keeps
/// rewriting is recognised as a fight and left alone instead of rewritten in a loop.
#[derive(Debug)]
pub struct FightTracker {
    window: Duration,
    limit: usize,
    seen: HashMap<String, VecDeque<Instant>>,
    /// Keys meshwarden has set, with the object as its last correction left it (see
    /// [`FightTracker::correct`]).
    set: HashMap<String, Corrected>,
}

/// What meshwarden's last correction of a field left.
#[derive(Debug)]
struct Corrected {
    after: ForeignWrites,
    /// The write raised the object's `generation`, so its kind keeps one (Deployments and
    /// PodDisruptionBudgets do, HorizontalPodAutoscalers do not).
    ordered: bool,
}

impl Default for FightTracker {
    fn default() -> Self {
        FightTracker::new(Duration::from_secs(600), 3)
    }
}

impl FightTracker {
    /// A fight is `limit` corrections of the same key within `window`.
    pub fn new(window: Duration, limit: usize) -> Self {
        FightTracker {
            window,
            limit,
            seen: HashMap::new(),
            set: HashMap::new(),
        }
    }

    fn prune(&mut self, key: &str, now: Instant) -> usize {
        let window = self.window;
        let q = self.seen.entry(key.to_string()).or_default();
        while q
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > window)
        {
            q.pop_front();
        }
        q.len()
    }

    /// True when `key` was corrected `limit` times within the window: do not write again.
    pub fn is_fight(&mut self, key: &str, now: Instant) -> bool {
        self.prune(key, now) >= self.limit
    }

    /// Records that meshwarden set the field `key`: `seen` is what the plan read (the deviating
    /// object), `after` what meshwarden's write left (the object the API server returned).
    ///
    /// A correction counts toward a fight only when it reverts a write by another manager made
    /// after meshwarden's previous correction of the field: another manager owns the field
    /// through a write that did not own it right after that correction, and, for kinds that keep
    /// a `generation`, the object read is newer than the one that correction left (an older copy
    /// read again before the correction shows is not). So one `helm upgrade` is one revert however many
    /// reconciles see it, and a field an installer still owns a part of since its install
    /// (a sibling meshwarden never took, or an equal value both own) makes no policy edit a
    /// revert. meshwarden's own first correction, a re-created object and a field nobody else
    /// owns never count.
    pub fn correct(
        &mut self,
        key: &str,
        now: Instant,
        seen: &ForeignWrites,
        after: &ForeignWrites,
    ) {
        let reverted = self.set.get(key).is_some_and(|prev| {
            (!prev.ordered || seen.generation > prev.after.generation)
                && seen.writes.iter().any(|w| !prev.after.writes.contains(w))
        });
        let corrected = Corrected {
            after: after.clone(),
            ordered: after.generation > seen.generation,
        };
        self.set.insert(key.to_string(), corrected);
        if reverted {
            self.record(key, now);
        }
    }

    /// Records a correction of `key`.
    pub fn record(&mut self, key: &str, now: Instant) {
        self.prune(key, now);
        self.seen.entry(key.to_string()).or_default().push_back(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;

    fn meta(entries: &[(&str, serde_json::Value)]) -> ObjectMeta {
        ObjectMeta {
            managed_fields: Some(
                entries
                    .iter()
                    .map(|(m, f)| ManagedFieldsEntry {
                        manager: Some(m.to_string()),
                        fields_v1: Some(FieldsV1(f.clone())),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn finds_other_owners_of_a_field_but_not_ourselves() {
        let m = meta(&[
            (
                "helm",
                serde_json::json!({"f:spec": {"f:minReplicas": {}, "f:maxReplicas": {}}}),
            ),
            (
                "meshwarden",
                serde_json::json!({"f:spec": {"f:minReplicas": {}}}),
            ),
            (
                "kubectl",
                serde_json::json!({"f:metadata": {"f:labels": {}}}),
            ),
        ]);
        assert_eq!(
            foreign_managers(&m, &["f:spec", "f:minReplicas"]),
            vec!["helm"]
        );
        assert!(foreign_managers(&m, &["f:spec", "f:behavior"]).is_empty());
        assert_eq!(foreign_managers(&m, &["f:metadata"]), vec!["kubectl"]);
    }

    fn entry(manager: &str, op: &str, fields: serde_json::Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(op.into()),
            api_version: Some("apps/v1".into()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        }
    }

    fn owned() -> serde_json::Value {
        serde_json::json!({"f:spec": {
            "f:replicas": {},
            "f:template": {"f:spec": {
                "f:affinity": {"f:podAntiAffinity": {"f:preferredDuringSchedulingIgnoredDuringExecution": {}}},
                "f:containers": {"k:{\"name\":\"discovery\"}": {
                    ".": {}, "f:name": {},
                    "f:resources": {"f:requests": {"f:cpu": {}}, "f:limits": {"f:memory": {}}}
                }}
            }}
        }})
    }

    #[test]
    fn handover_moves_exactly_the_fields_no_longer_sent() {
        let meta = ObjectMeta {
            resource_version: Some("42".into()),
            managed_fields: Some(vec![
                entry(
                    "helm",
                    "Apply",
                    serde_json::json!({"f:spec": {"f:replicas": {}}}),
                ),
                entry(FIELD_MANAGER, "Apply", owned()),
            ]),
            ..Default::default()
        };
        let now: jiff::Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        // Still sends the container's CPU request and the anti-affinity; drops replicas and
        // the memory limit.
        let patch = serde_json::json!({"spec": {"template": {"spec": {
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100}]}},
            "containers": [{"name": "discovery", "resources": {"requests": {"cpu": "600m"}}}]
        }}}});
        let (ops, names) = handover_patch(&meta, &patch, "apps/v1", &now).unwrap();
        assert_eq!(
            names,
            vec![
                "spec.replicas",
                "spec.template.spec.containers.k:{\"name\":\"discovery\"}.resources.limits.memory"
            ]
        );
        assert_eq!(
            ops,
            serde_json::json!([
                {"op": "test", "path": "/metadata/resourceVersion", "value": "42"},
                {"op": "add", "path": "/metadata/managedFields/-", "value": {
                    "manager": "meshwarden", "operation": "Update", "apiVersion": "apps/v1",
                    "time": "2026-01-02T03:04:05Z", "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:spec": {
                        "f:replicas": {},
                        "f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"discovery\"}": {
                            "f:resources": {"f:limits": {"f:memory": {}}}
                        }}}}
                    }}
                }}
            ])
        );
        // Sending everything again releases nothing.
        let full = serde_json::json!({"spec": {"replicas": 3, "template": {"spec": {
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            "containers": [{"name": "discovery", "resources": {"requests": {"cpu": "1"}, "limits": {"memory": "1Gi"}}}]
        }}}});
        assert!(handover_patch(&meta, &full, "apps/v1", &now).is_none());
    }

    #[test]
    fn handover_extends_an_existing_update_entry() {
        let meta = ObjectMeta {
            resource_version: Some("7".into()),
            managed_fields: Some(vec![
                entry(
                    FIELD_MANAGER,
                    "Update",
                    serde_json::json!({"f:spec": {"f:paused": {}}}),
                ),
                entry(
                    FIELD_MANAGER,
                    "Apply",
                    serde_json::json!({"f:spec": {"f:replicas": {}}}),
                ),
            ]),
            ..Default::default()
        };
        let now: jiff::Timestamp = "2026-01-02T03:04:05Z".parse().unwrap();
        let (ops, _) =
            handover_patch(&meta, &serde_json::json!({"spec": {}}), "apps/v1", &now).unwrap();
        assert_eq!(ops[1]["path"], "/metadata/managedFields/0/manager");
        assert_eq!(ops[2]["value"], "Update");
        assert_eq!(
            ops[3]["value"],
            serde_json::json!({"f:spec": {"f:replicas": {}, "f:paused": {}}})
        );
    }

    fn writes(generation: i64, writes: &[&str]) -> ForeignWrites {
        ForeignWrites {
            generation,
            writes: writes.iter().map(|w| w.to_string()).collect(),
        }
    }

    #[test]
    fn one_foreign_write_is_one_revert_however_often_it_is_seen() {
        let mut f = FightTracker::new(Duration::from_secs(600), 2);
        let t0 = Instant::now();
        let install = "helm Update 2026-01-01T00:00:00Z";
        let upgrade = "helm Update 2026-01-01T00:05:00Z";
        // meshwarden takes the requests over from the install; Helm keeps the CPU limit.
        f.correct("d/res", t0, &writes(1, &[install]), &writes(2, &[install]));
        // The HPA scales the Deployment, then the policy is edited twice: Helm's install still
        // owns the sibling limit, which is no new write.
        f.correct("d/res", t0, &writes(3, &[install]), &writes(4, &[install]));
        f.correct("d/res", t0, &writes(4, &[install]), &writes(5, &[install]));
        assert!(!f.is_fight("d/res", t0), "policy edits are no reverts");
        // One upgrade, seen again on a later reconcile before the correction shows.
        f.correct("d/res", t0, &writes(6, &[upgrade]), &writes(7, &[upgrade]));
        f.correct("d/res", t0, &writes(6, &[upgrade]), &writes(8, &[upgrade]));
        assert!(!f.is_fight("d/res", t0), "one upgrade is one revert");
        f.correct(
            "d/res",
            t0,
            &writes(9, &["helm Update 2026-01-01T00:06:00Z"]),
            &writes(10, &[]),
        );
        assert!(f.is_fight("d/res", t0), "a second write reverts again");
    }

    #[test]
    fn writes_within_one_second_are_told_apart() {
        let mut f = FightTracker::new(Duration::from_secs(600), 2);
        let t0 = Instant::now();
        let tuner = "tuner Apply 2026-01-01T00:00:00Z";
        // meshwarden's apply takes the field from the tuner: its entry no longer owns it.
        f.correct("hpa/min", t0, &writes(1, &[tuner]), &writes(2, &[]));
        // The tuner writes it again within the same second: same entry time, newer object.
        f.correct("hpa/min", t0, &writes(3, &[tuner]), &writes(4, &[]));
        f.correct("hpa/min", t0, &writes(5, &[tuner]), &writes(6, &[]));
        assert!(f.is_fight("hpa/min", t0));
        // HPAs keep no generation: the writes alone decide.
        let mut f = FightTracker::new(Duration::from_secs(600), 2);
        f.correct("hpa/min", t0, &writes(1, &[tuner]), &writes(1, &[]));
        f.correct("hpa/min", t0, &writes(1, &[tuner]), &writes(1, &[]));
        f.correct("hpa/min", t0, &writes(1, &[tuner]), &writes(1, &[]));
        assert!(f.is_fight("hpa/min", t0));
    }

    #[test]
    fn only_reverts_by_another_manager_count() {
        let mut f = FightTracker::new(Duration::from_secs(60), 2);
        let t0 = Instant::now();
        let helm = |g: i64| writes(g, &["helm Update 1"]);
        // First correction (taking over Helm's value) and corrections of values nobody else
        // owns are no reverts.
        f.correct("hpa/min", t0, &helm(1), &writes(2, &[]));
        f.correct("hpa/min", t0, &writes(3, &[]), &writes(4, &[]));
        f.correct("hpa/min", t0, &writes(5, &[]), &writes(6, &[]));
        assert!(!f.is_fight("hpa/min", t0));
        f.correct("hpa/min", t0, &helm(7), &writes(8, &[]));
        assert!(!f.is_fight("hpa/min", t0), "one revert is no fight");
        f.correct("hpa/min", t0, &helm(9), &writes(10, &[]));
        assert!(f.is_fight("hpa/min", t0));
        assert!(!f.is_fight("pdb/spec", t0), "per field");
    }

    #[test]
    fn fight_needs_repeated_corrections_within_the_window() {
        let mut f = FightTracker::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        assert!(!f.is_fight("d/replicas", t0));
        f.record("d/replicas", t0);
        f.record("d/replicas", t0 + Duration::from_secs(10));
        assert!(!f.is_fight("d/replicas", t0 + Duration::from_secs(20)));
        f.record("d/replicas", t0 + Duration::from_secs(20));
        assert!(f.is_fight("d/replicas", t0 + Duration::from_secs(30)));
        assert!(!f.is_fight("other", t0 + Duration::from_secs(30)));
        // Once the corrections age out of the window, writing resumes.
        assert!(!f.is_fight("d/replicas", t0 + Duration::from_secs(200)));
    }
}
