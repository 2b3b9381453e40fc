//! Fight detection: a field another writer keeps reverting is left alone instead of rewritten
//! in a loop. Also what a section remembers between reconciles about its writes (the fields it
//! took over), under typed keys.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::fields::ForeignWrites;

/// Remembers recent corrections of each (object, field) so that a field somebody else keeps
/// rewriting is recognised as a fight and left alone instead of rewritten in a loop.
#[derive(Debug)]
pub struct FightTracker<K = FightKey> {
    window: Duration,
    limit: usize,
    seen: HashMap<K, VecDeque<Instant>>,
    /// Keys meshwarden has set, with the object as its last correction left it (see
    /// [`FightTracker::correct`]).
    set: HashMap<K, Corrected>,
    /// When every key was last checked for expiry (see [`FightTracker::sweep`]).
    swept: Option<Instant>,
}

/// What meshwarden's last correction of a field left.
#[derive(Debug)]
struct Corrected {
    after: ForeignWrites,
    /// The write raised the object's `generation`, so its kind keeps one (Deployments and
    /// PodDisruptionBudgets do, HorizontalPodAutoscalers do not).
    ordered: bool,
    /// When that correction was made.
    at: Instant,
}

impl<K: Hash + Eq + Clone> Default for FightTracker<K> {
    fn default() -> Self {
        FightTracker::new(Duration::from_secs(600), 3)
    }
}

impl<K: Hash + Eq + Clone> FightTracker<K> {
    /// A fight is `limit` corrections of the same key within `window`.
    pub fn new(window: Duration, limit: usize) -> Self {
        FightTracker {
            window,
            limit,
            seen: HashMap::new(),
            set: HashMap::new(),
            swept: None,
        }
    }

    /// Forgets, at most once per window, every key whose corrections are all older than the
    /// window: objects and policies come and go (a workload deleted, a policy removed), and
    /// their keys would otherwise stay for the process's life. A correction that comes more
    /// than a window after meshwarden's previous one of the same key is therefore counted as
    /// a first correction, not a revert: the fight count starts afresh.
    fn sweep(&mut self, now: Instant) {
        let window = self.window;
        if self
            .swept
            .is_some_and(|t| now.saturating_duration_since(t) <= window)
        {
            return;
        }
        self.swept = Some(now);
        let old = |t: &Instant| now.saturating_duration_since(*t) > window;
        self.seen.retain(|_, q| {
            while q.front().is_some_and(old) {
                q.pop_front();
            }
            !q.is_empty()
        });
        self.set.retain(|_, c| !old(&c.at));
    }

    /// Drops the corrections of `key` older than the window; returns how many are left. A key
    /// with none left is forgotten (a check adds no entry: most keys are never corrected twice).
    fn prune(&mut self, key: &K, now: Instant) -> usize {
        let window = self.window;
        let Some(q) = self.seen.get_mut(key) else {
            return 0;
        };
        while q
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > window)
        {
            q.pop_front();
        }
        let left = q.len();
        if left == 0 {
            self.seen.remove(key);
        }
        left
    }

    /// True when `key` was corrected `limit` times within the window: do not write again.
    pub fn is_fight(&mut self, key: &K, now: Instant) -> bool {
        self.sweep(now);
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
    /// owns never count. The HA rule leaves the writes of the object's installer out of `seen`
    /// and `after`: an installer re-applying its render is restored, never a fight.
    pub fn correct(&mut self, key: &K, now: Instant, seen: &ForeignWrites, after: &ForeignWrites) {
        self.sweep(now);
        let reverted = self.set.get(key).is_some_and(|prev| {
            (!prev.ordered || seen.generation > prev.after.generation)
                && seen.writes.iter().any(|w| !prev.after.writes.contains(w))
        });
        let corrected = Corrected {
            after: after.clone(),
            ordered: after.generation > seen.generation,
            at: now,
        };
        self.set.insert(key.clone(), corrected);
        if reverted {
            self.record(key, now);
        }
    }

    /// Records a correction of `key`.
    pub fn record(&mut self, key: &K, now: Instant) {
        self.sweep(now);
        self.prune(key, now);
        self.seen.entry(key.clone()).or_default().push_back(now);
    }
}

/// Names one thing whose corrections are counted: a field of an object (HA), or a whole object
/// (mTLS PeerAuthentications, sidecar annotations of a workload), written for one policy's
/// section.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FightKey {
    pub policy: String,
    /// The section's condition type.
    pub section: &'static str,
    /// `Kind/namespace/name`.
    pub object: String,
    /// The field (`spec.minReplicas`), or `None` for the object's fields the section sets.
    pub field: Option<String>,
}

/// Names what a section remembers it took over in one generation of a policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TakeoverKey {
    pub policy: String,
    pub generation: i64,
    /// The section's condition type.
    pub section: &'static str,
    /// Which list: the fields taken over, or the values to set at their source.
    pub part: TakeoverPart,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TakeoverPart {
    /// Fields taken over from other managers.
    Fields,
    /// Values to set in the installer so that the takeover ends.
    AtSource,
}

/// What meshwarden remembers about its writes between reconciles: corrections per
/// [`FightKey`], and per [`TakeoverKey`] the fields taken over, so that the condition keeps
/// naming them after the other manager lost ownership, until the policy's spec changes.
#[derive(Debug, Default)]
pub struct Memory {
    fights: Mutex<FightTracker>,
    takeovers: Mutex<HashMap<TakeoverKey, Vec<String>>>,
}

impl Memory {
    /// Replaces the fight detection: `limit` corrections within `window` (0 turns it off).
    pub fn set_fight_limit(&self, window: Duration, limit: usize) {
        if let Ok(mut f) = self.fights.lock() {
            *f = FightTracker::new(window, if limit == 0 { usize::MAX } else { limit });
        }
    }

    /// True when `key` is in a fight: do not write it now.
    pub fn fighting(&self, key: &FightKey, now: Instant) -> bool {
        self.fights
            .lock()
            .map(|mut f| f.is_fight(key, now))
            .unwrap_or(false)
    }

    /// Records that meshwarden set `key` (see [`FightTracker::correct`]).
    pub fn corrected(
        &self,
        key: &FightKey,
        now: Instant,
        seen: &ForeignWrites,
        after: &ForeignWrites,
    ) {
        if let Ok(mut f) = self.fights.lock() {
            f.correct(key, now, seen, after);
        }
    }

    /// Adds `new` to what was taken over under `key` and returns all of it so far. Entries of
    /// other generations of the same policy are dropped.
    pub fn takeovers(&self, key: TakeoverKey, new: &[String]) -> Vec<String> {
        let Ok(mut t) = self.takeovers.lock() else {
            return new.to_vec();
        };
        t.retain(|k, _| k.policy != key.policy || k.generation == key.generation);
        let all = t.entry(key).or_default();
        for n in new {
            if !all.contains(n) {
                all.push(n.clone());
            }
        }
        all.clone()
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn writes(generation: i64, writes: &[&str]) -> ForeignWrites {
        ForeignWrites {
            generation,
            writes: writes.iter().map(|w| w.to_string()).collect(),
        }
    }

    #[test]
    fn one_foreign_write_is_one_revert_however_often_it_is_seen() {
        let mut f: FightTracker<&str> = FightTracker::new(Duration::from_secs(600), 2);
        let t0 = Instant::now();
        let install = "helm Update 2026-01-01T00:00:00Z";
        let upgrade = "helm Update 2026-01-01T00:05:00Z";
        // meshwarden takes the requests over from the install; Helm keeps the CPU limit.
        f.correct(&"d/res", t0, &writes(1, &[install]), &writes(2, &[install]));
        // The HPA scales the Deployment, then the policy is edited twice: Helm's install still
        // owns the sibling limit, which is no new write.
        f.correct(&"d/res", t0, &writes(3, &[install]), &writes(4, &[install]));
        f.correct(&"d/res", t0, &writes(4, &[install]), &writes(5, &[install]));
        assert!(!f.is_fight(&"d/res", t0), "policy edits are no reverts");
        // One upgrade, seen again on a later reconcile before the correction shows.
        f.correct(&"d/res", t0, &writes(6, &[upgrade]), &writes(7, &[upgrade]));
        f.correct(&"d/res", t0, &writes(6, &[upgrade]), &writes(8, &[upgrade]));
        assert!(!f.is_fight(&"d/res", t0), "one upgrade is one revert");
        f.correct(
            &"d/res",
            t0,
            &writes(9, &["helm Update 2026-01-01T00:06:00Z"]),
            &writes(10, &[]),
        );
        assert!(f.is_fight(&"d/res", t0), "a second write reverts again");
    }

    #[test]
    fn writes_within_one_second_are_told_apart() {
        let mut f: FightTracker<&str> = FightTracker::new(Duration::from_secs(600), 2);
        let t0 = Instant::now();
        let tuner = "tuner Apply 2026-01-01T00:00:00Z";
        // meshwarden's apply takes the field from the tuner: its entry no longer owns it.
        f.correct(&"hpa/min", t0, &writes(1, &[tuner]), &writes(2, &[]));
        // The tuner writes it again within the same second: same entry time, newer object.
        f.correct(&"hpa/min", t0, &writes(3, &[tuner]), &writes(4, &[]));
        f.correct(&"hpa/min", t0, &writes(5, &[tuner]), &writes(6, &[]));
        assert!(f.is_fight(&"hpa/min", t0));
        // HPAs keep no generation: the writes alone decide.
        let mut f: FightTracker<&str> = FightTracker::new(Duration::from_secs(600), 2);
        f.correct(&"hpa/min", t0, &writes(1, &[tuner]), &writes(1, &[]));
        f.correct(&"hpa/min", t0, &writes(1, &[tuner]), &writes(1, &[]));
        f.correct(&"hpa/min", t0, &writes(1, &[tuner]), &writes(1, &[]));
        assert!(f.is_fight(&"hpa/min", t0));
    }

    #[test]
    fn only_reverts_by_another_manager_count() {
        let mut f: FightTracker<&str> = FightTracker::new(Duration::from_secs(60), 2);
        let t0 = Instant::now();
        let helm = |g: i64| writes(g, &["helm Update 1"]);
        // First correction (taking over Helm's value) and corrections of values nobody else
        // owns are no reverts.
        f.correct(&"hpa/min", t0, &helm(1), &writes(2, &[]));
        f.correct(&"hpa/min", t0, &writes(3, &[]), &writes(4, &[]));
        f.correct(&"hpa/min", t0, &writes(5, &[]), &writes(6, &[]));
        assert!(!f.is_fight(&"hpa/min", t0));
        f.correct(&"hpa/min", t0, &helm(7), &writes(8, &[]));
        assert!(!f.is_fight(&"hpa/min", t0), "one revert is no fight");
        f.correct(&"hpa/min", t0, &helm(9), &writes(10, &[]));
        assert!(f.is_fight(&"hpa/min", t0));
        assert!(!f.is_fight(&"pdb/spec", t0), "per field");
    }

    #[test]
    fn fight_needs_repeated_corrections_within_the_window() {
        let mut f: FightTracker<&str> = FightTracker::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        assert!(!f.is_fight(&"d/replicas", t0));
        f.record(&"d/replicas", t0);
        f.record(&"d/replicas", t0 + Duration::from_secs(10));
        assert!(!f.is_fight(&"d/replicas", t0 + Duration::from_secs(20)));
        f.record(&"d/replicas", t0 + Duration::from_secs(20));
        assert!(f.is_fight(&"d/replicas", t0 + Duration::from_secs(30)));
        assert!(!f.is_fight(&"other", t0 + Duration::from_secs(30)));
        // Once the corrections age out of the window, writing resumes, and the key is
        // forgotten; checking a key adds none.
        assert!(!f.is_fight(&"d/replicas", t0 + Duration::from_secs(200)));
        assert!(f.seen.is_empty(), "{:?}", f.seen);
    }
}

#[cfg(test)]
mod bound_tests {
    use super::*;

    /// Every key meshwarden ever corrected (workloads and PeerAuthentications come and go)
    /// leaves the tracker once its corrections are older than the window: the tracker holds
    /// the keys of one window, not of the process's life.
    #[test]
    fn keys_leave_once_their_corrections_are_older_than_the_window() {
        let window = Duration::from_secs(60);
        let mut f: FightTracker<String> = FightTracker::new(window, 3);
        let t0 = Instant::now();
        let none = ForeignWrites::default();
        let helm = ForeignWrites {
            generation: 1,
            writes: vec!["helm Update 1".into()],
        };
        for i in 0..1000 {
            let key = format!("Deployment/n/job-{i}");
            f.correct(&key, t0, &helm, &none);
            f.correct(&key, t0, &helm, &none);
        }
        assert_eq!(f.set.len(), 1000);
        // Much later, one correction of another key: the old ones are gone.
        let later = t0 + 2 * window + Duration::from_secs(1);
        f.correct(&"Deployment/n/web".to_string(), later, &helm, &none);
        assert!(f.set.len() <= 1, "{} keys kept", f.set.len());
        assert!(f.seen.len() <= 1, "{} keys kept", f.seen.len());
    }
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    fn key(policy: &str, generation: i64, section: &'static str) -> TakeoverKey {
        TakeoverKey {
            policy: policy.into(),
            generation,
            section,
            part: TakeoverPart::Fields,
        }
    }

    #[test]
    fn takeovers_accumulate_per_generation_and_section() {
        let m = Memory::default();
        assert_eq!(
            m.takeovers(key("p", 1, "ControlPlaneHA"), &["a".into()]),
            vec!["a"]
        );
        assert_eq!(
            m.takeovers(key("p", 1, "GatewayHA"), &["g".into()]),
            vec!["g"]
        );
        assert_eq!(
            m.takeovers(key("p", 1, "ControlPlaneHA"), &[]),
            vec!["a"],
            "kept across reconciles and sections"
        );
        let source = TakeoverKey {
            part: TakeoverPart::AtSource,
            ..key("p", 1, "ControlPlaneHA")
        };
        assert!(m.takeovers(source, &[]).is_empty(), "parts are apart");
        assert!(
            m.takeovers(key("p", 2, "ControlPlaneHA"), &[]).is_empty(),
            "a new generation starts afresh"
        );
        assert!(
            m.takeovers(key("p", 1, "GatewayHA"), &[]).is_empty(),
            "older generations are dropped"
        );
        assert_eq!(
            m.takeovers(key("q", 1, "GatewayHA"), &["x".into()]),
            vec!["x"]
        );
    }
}
