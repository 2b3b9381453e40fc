//! Which fields a manager owns, read from `managedFields`: the managers meshwarden takes a field
//! over from, their writes (the evidence of a fight), and the hand-over of fields meshwarden
//! stops declaring. Every `managedFields` query of meshwarden is here.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};

use super::FIELD_MANAGER;

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
    let released = released_paths(meta, patch);
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

/// The fields meshwarden's `Apply` entry owns that `patch` no longer carries (keys as in
/// `managedFields`): an apply of `patch` would remove them where nobody else owns them.
pub fn released_paths(meta: &ObjectMeta, patch: &serde_json::Value) -> Vec<Vec<String>> {
    let applied = meta.managed_fields.iter().flatten().find(|e| {
        e.manager.as_deref() == Some(FIELD_MANAGER)
            && e.operation.as_deref() == Some("Apply")
            && e.subresource.as_deref().unwrap_or_default().is_empty()
    });
    let Some(fields) = applied.and_then(|e| e.fields_v1.as_ref()) else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    flatten(&fields.0, &mut Vec::new(), &mut paths);
    paths.into_iter().filter(|p| !covered(patch, p)).collect()
}

/// What a write did to the fields of another manager (`managedFields` before and after it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Taken {
    pub manager: String,
    /// Owned by the manager before, by meshwarden and no longer by the manager after (a
    /// forced apply of another value).
    pub fields: Vec<String>,
    /// Owned by the manager before and after, and by meshwarden after but not before: the
    /// same value applied, so both own it now.
    pub shared: Vec<String>,
}

/// The fields a write took over from other managers, or now shares with them, by manager:
/// compares `before` with `after` (the object as the API server returned it). Paths as
/// `spec.template.metadata.annotations.<name>`, list items as their key
/// (`containers[name=discovery]`).
pub fn taken_over(before: &ObjectMeta, after: &ObjectMeta) -> Vec<Taken> {
    let paths = |meta: &ObjectMeta, want: &dyn Fn(&ManagedFieldsEntry) -> bool| {
        let mut out = Vec::new();
        for e in meta.managed_fields.iter().flatten().filter(|e| want(e)) {
            if let Some(f) = &e.fields_v1 {
                flatten(&f.0, &mut Vec::new(), &mut out);
            }
        }
        out
    };
    let top = |e: &ManagedFieldsEntry| e.subresource.as_deref().unwrap_or_default().is_empty();
    let ours = |e: &ManagedFieldsEntry| e.manager.as_deref() == Some(FIELD_MANAGER) && top(e);
    let (ours_before, ours_after) = (paths(before, &ours), paths(after, &ours));
    let mut managers: Vec<String> = before
        .managed_fields
        .iter()
        .flatten()
        .filter(|e| top(e))
        .filter_map(|e| e.manager.clone())
        .filter(|m| m != FIELD_MANAGER)
        .collect();
    managers.sort();
    managers.dedup();
    let names = |paths: Vec<Vec<String>>| {
        let mut n: Vec<String> = paths.iter().map(|p| field_name(p)).collect();
        n.sort();
        n.dedup();
        n
    };
    let mut out = Vec::new();
    for m in managers {
        let theirs = |e: &ManagedFieldsEntry| e.manager.as_deref() == Some(&m) && top(e);
        let still = paths(after, &theirs);
        let (lost, shared): (Vec<_>, Vec<_>) = paths(before, &theirs)
            .into_iter()
            .filter(|p| ours_after.contains(p) && !item_key(p))
            .partition(|p| !still.contains(p));
        let shared: Vec<_> = shared
            .into_iter()
            .filter(|p| !ours_before.contains(p))
            .collect();
        if !lost.is_empty() || !shared.is_empty() {
            out.push(Taken {
                manager: m.clone(),
                fields: names(lost),
                shared: names(shared),
            });
        }
    }
    out
}

/// Whether `path` is a list item's own entry (`.`) or one of the fields its key names: owned
/// with the item, never worth naming apart from its other fields.
fn item_key(path: &[String]) -> bool {
    match path {
        [.., last] if last == "." => true,
        [.., item, field] => item.strip_prefix("k:").is_some_and(|key| {
            let name = field.trim_start_matches("f:");
            serde_json::from_str::<serde_json::Value>(key).is_ok_and(|k| k.get(name).is_some())
        }),
        _ => false,
    }
}

/// A `managedFields` path as a field name: `spec.template.spec.containers[name=discovery]`.
pub fn field_name(path: &[String]) -> String {
    let mut out = String::new();
    for k in path.iter().filter(|k| k.as_str() != ".") {
        if let Some(f) = k.strip_prefix("f:") {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(f);
        } else if let Some(key) = k.strip_prefix("k:") {
            let item = match serde_json::from_str::<serde_json::Value>(key) {
                Ok(serde_json::Value::Object(m)) => m
                    .iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => format!("{k}={s}"),
                        other => format!("{k}={other}"),
                    })
                    .collect::<Vec<_>>()
                    .join(","),
                _ => key.to_string(),
            };
            out.push_str(&format!("[{item}]"));
        } else if let Some(v) = k.strip_prefix("v:") {
            out.push_str(&format!("[{v}]"));
        } else if let Some(i) = k.strip_prefix("i:") {
            out.push_str(&format!("[{i}]"));
        }
    }
    out
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

impl ForeignWrites {
    /// These writes without those of the field manager `manager`, if any.
    pub fn without(mut self, manager: Option<&str>) -> Self {
        if let Some(m) = manager {
            self.writes.retain(|w| w.split(' ').next() != Some(m));
        }
        self
    }
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

/// True when meshwarden's `Apply` entry owns the field at `path` (keys as in
/// [`foreign_managers`]) or anything below it.
pub fn owned_by_meshwarden(meta: &ObjectMeta, path: &[&str]) -> bool {
    meta.managed_fields.iter().flatten().any(|e| {
        e.manager.as_deref() == Some(FIELD_MANAGER)
            && e.fields_v1.as_ref().is_some_and(|f| {
                let mut node = Some(&f.0);
                for key in path {
                    node = node.and_then(|n| n.get(*key));
                }
                node.is_some()
            })
    })
}

/// When meshwarden last changed the object (the newest time of its entries, the status
/// subresource excepted).
pub fn meshwarden_write_time(meta: &ObjectMeta) -> Option<jiff::Timestamp> {
    meta.managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some(FIELD_MANAGER))
        .filter(|m| m.subresource.as_deref().unwrap_or_default().is_empty())
        .filter_map(|m| m.time.as_ref().map(|t| t.0))
        .max()
}

/// True when an entry of meshwarden (of the object itself, not a subresource) owns a field
/// other than the pod template annotations `template` and the object annotations `metadata`
/// (annotation names), for instance because another rule writes the object with the same field
/// manager.
pub fn owns_more_than_annotations(meta: &ObjectMeta, template: &[&str], metadata: &[&str]) -> bool {
    use serde_json::Value;
    let key = |k: &&str| format!("f:{k}");
    let template: Vec<String> = template.iter().map(key).collect();
    let metadata: Vec<String> = metadata.iter().map(key).collect();
    // The child `key` of `v` when `v` holds nothing else (`Null` when it holds nothing).
    let only = |v: &Value, key: &str| -> Option<Value> {
        let m = v.as_object()?;
        if m.keys().all(|k| k == key || k == ".") {
            Some(m.get(key).cloned().unwrap_or(Value::Null))
        } else {
            None
        }
    };
    // Whether an annotations node holds a key outside `allowed` (anything else: true).
    let beyond = |node: Option<Value>, allowed: &[String]| match node {
        Some(Value::Object(a)) => a.keys().any(|k| k != "." && !allowed.contains(k)),
        Some(Value::Null) => false,
        _ => true,
    };
    meta.managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some(FIELD_MANAGER))
        .filter(|m| m.subresource.as_deref().unwrap_or_default().is_empty())
        .filter_map(|m| m.fields_v1.as_ref())
        .any(|f| {
            let Some(top) = f.0.as_object() else {
                return true;
            };
            let in_template = top.get("f:spec").map(|spec| {
                let annotations = only(spec, "f:template")
                    .and_then(|v| only(&v, "f:metadata"))
                    .and_then(|v| only(&v, "f:annotations"));
                beyond(annotations, &template)
            });
            let in_metadata = top
                .get("f:metadata")
                .map(|m| beyond(only(m, "f:annotations"), &metadata));
            top.keys()
                .any(|k| k != "f:spec" && k != "f:metadata" && k != ".")
                || in_template.unwrap_or(false)
                || in_metadata.unwrap_or(false)
        })
}

/// True when `manager` has an entry in the object's `managedFields`.
pub fn has_manager(meta: &ObjectMeta, manager: &str) -> bool {
    meta.managed_fields
        .iter()
        .flatten()
        .any(|m| m.manager.as_deref() == Some(manager))
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
    fn without_drops_only_the_named_managers_writes() {
        let w = ForeignWrites {
            generation: 3,
            writes: vec![
                "helm Update 2026-01-01T00:00:00Z".into(),
                "helm-controller Update 2026-01-01T00:00:00Z".into(),
                "kubectl-edit Update 2026-01-01T00:01:00Z".into(),
            ],
        };
        assert_eq!(w.clone().without(None), w);
        let left = w.without(Some("helm"));
        assert_eq!(left.generation, 3);
        assert_eq!(
            left.writes,
            vec![
                "helm-controller Update 2026-01-01T00:00:00Z",
                "kubectl-edit Update 2026-01-01T00:01:00Z"
            ]
        );
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

    #[test]
    fn fields_beyond_the_given_annotations() {
        use serde_json::json;
        let ours = |f: serde_json::Value| meta(&[("meshwarden", f)]);
        let tpl = json!({"f:spec": {"f:template": {"f:metadata": {"f:annotations": {"f:a": {}}}}}});
        assert!(!owns_more_than_annotations(&ours(tpl.clone()), &["a"], &[]));
        assert!(owns_more_than_annotations(&ours(tpl), &["b"], &["a"]));
        let top = json!({"f:metadata": {"f:annotations": {"f:m": {}}}});
        assert!(!owns_more_than_annotations(&ours(top.clone()), &[], &["m"]));
        assert!(owns_more_than_annotations(&ours(top), &["m"], &[]));
        let replicas = json!({"f:spec": {"f:replicas": {}}});
        assert!(owns_more_than_annotations(
            &ours(replicas.clone()),
            &["a"],
            &["m"]
        ));
        // Another manager's fields are not meshwarden's.
        let helm = meta(&[("helm", replicas)]);
        assert!(!owns_more_than_annotations(&helm, &[], &[]));
        assert!(has_manager(&helm, "helm") && !has_manager(&helm, "meshwarden"));
    }
}
