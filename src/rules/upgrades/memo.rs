//! The running pods' counts kept between evaluations, per policy and namespace: an evaluation
//! counts anew only the namespaces whose running pods changed, so a pod event costs one
//! namespace's count, not the cluster's ([`PodPart`], [`plan_parts`]). The sidecars section's
//! index stamps each namespace's changes ([`View::stamp`]): a namespace with the stamp its part
//! was counted at holds the same pods.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::plan::{PodPart, pod_part};
use crate::istio::Revisions;
use crate::rules::sidecars::{PodFacts, View};

/// A policy's memo unused this long is dropped (the policy was deleted or lost its section).
const MEMO_TTL: Duration = Duration::from_secs(600);

/// Each policy's [`PodMemo`], kept by the controller (a cache of the context).
#[derive(Clone, Default)]
pub struct PodMemos(Arc<Mutex<HashMap<String, (Instant, PodMemo)>>>);

impl PodMemos {
    /// Runs `f` with the memo of `policy` (empty the first time) and keeps what it leaves.
    /// One policy is never reconciled twice at once.
    pub fn with<R>(&self, policy: &str, f: impl FnOnce(&mut PodMemo) -> R) -> R {
        let taken = match self.0.lock() {
            Ok(mut m) => {
                m.retain(|_, (used, _)| used.elapsed() < MEMO_TTL);
                m.remove(policy)
            }
            Err(_) => None,
        };
        let mut memo = taken.map(|(_, m)| m).unwrap_or_default();
        let out = f(&mut memo);
        if let Ok(mut m) = self.0.lock() {
            m.insert(policy.to_string(), (Instant::now(), memo));
        }
        out
    }
}

/// One policy's namespace counts, each with the stamp of the pods it was counted from; valid
/// while the skew allowed and the revisions stay the same.
#[derive(Debug, Default)]
pub struct PodMemo {
    decided_for: Option<(i32, Revisions)>,
    /// Per namespace: the index's stamp of the pods it was counted from, and the part.
    parts: HashMap<String, (u64, Arc<PodPart>)>,
    /// Namespaces counted anew by the last evaluation (the others were kept).
    pub last_counted: usize,
}

impl PodMemo {
    /// The parts of the `selected` namespaces that have running pods (in `pods`, the index),
    /// in namespace order, counting anew only the namespaces whose pods changed since their
    /// part was counted. Parts of namespaces no longer selected, or without running pods, are dropped.
    pub fn parts(
        &mut self,
        max_minor_skew: i32,
        revisions: &Revisions,
        selected: &BTreeSet<&str>,
        pods: &View<'_, PodFacts>,
    ) -> Vec<Arc<PodPart>> {
        if self
            .decided_for
            .as_ref()
            .is_none_or(|(s, r)| *s != max_minor_skew || r != revisions)
        {
            self.parts.clear();
            self.decided_for = Some((max_minor_skew, revisions.clone()));
        }
        self.last_counted = 0;
        let mut out = Vec::with_capacity(selected.len());
        let mut present: HashSet<&str> = HashSet::new();
        for ns in selected {
            let (Some(now), Some(stamp)) = (pods.get(ns), pods.stamp(ns)) else {
                continue;
            };
            present.insert(ns);
            let part = match self.parts.get(*ns).filter(|(at, _)| *at == stamp) {
                Some((_, part)) => part.clone(),
                None => {
                    self.last_counted += 1;
                    let part = Arc::new(pod_part(
                        max_minor_skew,
                        revisions,
                        ns,
                        now.values().map(Arc::as_ref),
                    ));
                    self.parts.insert(ns.to_string(), (stamp, part.clone()));
                    part
                }
            };
            out.push(part);
        }
        if self.parts.len() > present.len() {
            self.parts.retain(|ns, _| present.contains(ns.as_str()));
        }
        out
    }
}
