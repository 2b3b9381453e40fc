//! The only way meshwarden writes to the mesh: server-side apply of partial objects with one
//! field manager, plus what a write needs to be honest about: which other managers owned the
//! fields we take over, and whether we keep correcting the same field (a fight).

use std::collections::{HashMap, VecDeque};
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
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

/// Managers other than meshwarden that own the field at `path` (keys as they appear in
/// `managedFields`, e.g. `["f:spec", "f:minReplicas"]`) or anything below it.
pub fn foreign_managers(meta: &ObjectMeta, path: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for entry in meta.managed_fields.iter().flatten() {
        let Some(manager) = entry.manager.as_deref() else {
            continue;
        };
        if manager == FIELD_MANAGER {
            continue;
        }
        let Some(fields) = entry.fields_v1.as_ref() else {
            continue;
        };
        let mut node = Some(&fields.0);
        for key in path {
            node = node.and_then(|n| n.get(*key));
        }
        if node.is_some() && !out.iter().any(|m| m == manager) {
            out.push(manager.to_string());
        }
    }
    out
}

/// Remembers recent corrections of each (object, field) so that a field somebody else keeps
/// rewriting is recognised as a fight and left alone instead of rewritten in a loop.
#[derive(Debug)]
pub struct FightTracker {
    window: Duration,
    limit: usize,
    seen: HashMap<String, VecDeque<Instant>>,
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

    /// Records a correction of `key`.
    pub fn record(&mut self, key: &str, now: Instant) {
        self.prune(key, now);
        self.seen.entry(key.to_string()).or_default().push_back(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

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
