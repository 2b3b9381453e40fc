//! Dry runs of the write path, for `meshwarden plan`: every write a section makes goes to the
//! API server as the same request with `dryRun=All` (admission, validation, field ownership
//! and defaulting all run, nothing is persisted), and the object before and after it, or the
//! server's refusal, is recorded here.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;

/// What one write would do to one object.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// When the write started, in the order of [`DryRun::start`].
    pub seq: usize,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub verb: Verb,
    /// The object as read before the write (`None`: it does not exist).
    pub before: Option<Value>,
    /// The object the API server returned for the dry run (`None`: deleted, or refused).
    pub after: Option<Value>,
    /// Fields meshwarden's apply owned that the write no longer carries: handed to
    /// meshwarden's `Update` entry first, so their values stay (paths as `spec.replicas`).
    pub released: Vec<String>,
    /// The API server's message when it refused the write.
    pub refused: Option<String>,
    /// What the apply sent (its fields are what meshwarden would own).
    pub sent: Option<Value>,
}

/// The request a write makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    /// Server-side apply (creates the object when it does not exist).
    Apply,
    Delete,
}

/// The dry runs made so far, in the order they were started (a section starts its writes in
/// plan order, though several may be in flight at once); a second write of the same object
/// (the sidecars section corrects its generation annotation) is folded into the first.
#[derive(Debug, Default)]
pub struct DryRun {
    changes: Mutex<Vec<Change>>,
    started: AtomicUsize,
}

impl DryRun {
    /// The sequence number of a write starting now.
    pub fn start(&self) -> usize {
        self.started.fetch_add(1, Ordering::Relaxed)
    }

    pub fn record(&self, change: Change) {
        let Ok(mut all) = self.changes.lock() else {
            return;
        };
        let same = |c: &Change| {
            c.kind == change.kind && c.namespace == change.namespace && c.name == change.name
        };
        match all.iter_mut().find(|c| same(c)) {
            Some(c) => {
                c.after = change.after;
                c.verb = change.verb;
                c.refused = change.refused.or(c.refused.take());
                c.released.extend(change.released);
                c.sent = change.sent.or(c.sent.take());
            }
            None => all.push(change),
        }
    }

    /// Every change recorded, in the order the writes started.
    pub fn changes(&self) -> Vec<Change> {
        let mut all = self.changes.lock().map(|c| c.clone()).unwrap_or_default();
        all.sort_by_key(|c| c.seq);
        all
    }
}

/// The API server's own message for a refused request (the whole error otherwise).
pub fn refusal(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// `after` with the values `live` holds at `paths` (`managedFields` keys, as
/// `["f:spec", "f:replicas"]`) put back: a released field keeps its value in the cluster, but a
/// dry run cannot hand it over first, so its answer drops it. Paths through list items (`k:`,
/// `v:`, `i:` keys) are restored from their nearest field of plain keys only when `after` lost
/// that field entirely.
pub fn keep_released(after: &mut Value, live: &Value, paths: &[Vec<String>]) {
    for path in paths {
        let keys: Vec<&str> = path
            .iter()
            .take_while(|k| k.starts_with("f:"))
            .map(|k| k.trim_start_matches("f:"))
            .collect();
        let whole = keys.len() == path.len();
        let Some(value) = keys.iter().try_fold(live, |v, k| v.get(k)) else {
            continue;
        };
        let Some((last, parents)) = keys.split_last() else {
            continue;
        };
        if let Some(o) = object_at(after, parents)
            && (whole || !o.contains_key(*last))
        {
            o.insert(last.to_string(), value.clone());
        }
    }
}

/// The object at `keys` under `node`, made where missing; `None` where a value on the way is
/// not an object.
fn object_at<'a>(
    node: &'a mut Value,
    keys: &[&str],
) -> Option<&'a mut serde_json::Map<String, Value>> {
    let o = node.as_object_mut()?;
    match keys.split_first() {
        None => Some(o),
        Some((k, rest)) => object_at(
            o.entry(k.to_string())
                .or_insert_with(|| Value::Object(Default::default())),
            rest,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn change(name: &str, after: i64) -> Change {
        Change {
            seq: 0,
            kind: "Deployment".into(),
            namespace: Some("ns".into()),
            name: name.into(),
            verb: Verb::Apply,
            before: Some(json!({"g": 1})),
            after: Some(json!({"g": after})),
            released: Vec::new(),
            refused: None,
            sent: None,
        }
    }

    #[test]
    fn a_second_write_of_an_object_is_folded_into_the_first() {
        let d = DryRun::default();
        let (a, b) = (d.start(), d.start());
        // b's answer comes first: listed in the order the writes started.
        d.record(Change {
            seq: b,
            ..change("b", 2)
        });
        d.record(Change {
            seq: a,
            ..change("a", 2)
        });
        d.record(Change {
            seq: d.start(),
            ..change("a", 3)
        });
        let c = d.changes();
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].name.as_str(), c[1].name.as_str()), ("a", "b"));
        assert_eq!(c[0].before, Some(json!({"g": 1})));
        assert_eq!(c[0].after, Some(json!({"g": 3})));
    }

    #[test]
    fn released_fields_keep_their_live_values() {
        let live =
            json!({"spec": {"replicas": 3, "template": {"metadata": {"annotations": {"a": "1"}}}}});
        let mut after = json!({"spec": {"template": {}}});
        let p = |keys: &[&str]| keys.iter().map(|k| k.to_string()).collect::<Vec<_>>();
        keep_released(
            &mut after,
            &live,
            &[
                p(&["f:spec", "f:replicas"]),
                p(&["f:spec", "f:template", "f:metadata", "f:annotations", "f:a"]),
                p(&["f:spec", "f:missing"]),
            ],
        );
        assert_eq!(after, live);
    }
}
