//! The one loop sections write through: fight check → write (a bounded number in flight) →
//! record. A section plans its writes as [`Planned`] items, each with the fight checks it
//! carries (one per object, or one per field when the fight memory counts fields); [`drive`]
//! leaves out items in a fight, [`drive_checks`] lets a section cut only the fighting checks out
//! of an item and still write the rest. The writes run with at most `limit` in flight (a slow
//! write holds no slot but its own) and every correction is recorded in the fight memory from
//! the evidence the write returned.

use std::future::Future;
use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::fields::ForeignWrites;
use super::fight::{FightKey, Memory};
use crate::error::{Error, Result};

/// What the fight memory counts one planned correction under, and what the plan read of it.
pub struct Check {
    pub key: FightKey,
    /// The other managers' writes of the fields the correction sets, as the plan read them;
    /// `None` when nothing was read (the object is created) or the write sets nothing (a
    /// delete): such corrections never count toward a fight.
    pub seen: Option<ForeignWrites>,
}

/// One write a section planned, with its fight checks (none: never held, never recorded).
pub struct Planned<T> {
    pub checks: Vec<Check>,
    pub item: T,
}

impl<T> Planned<T> {
    /// A write the fight memory counts as a whole, under `key`.
    pub fn one(key: FightKey, seen: Option<ForeignWrites>, item: T) -> Self {
        Planned {
            checks: vec![Check { key, seen }],
            item,
        }
    }
}

/// What became of one [`Planned`] write.
pub enum Outcome<T> {
    /// Another writer keeps reverting it: not written (see [`Memory::fighting`]).
    Fighting(T),
    Written(T),
    Failed(T, Error),
}

impl<T> Outcome<T> {
    pub fn item(&self) -> &T {
        match self {
            Outcome::Fighting(t) | Outcome::Written(t) | Outcome::Failed(t, _) => t,
        }
    }
}

/// Runs `f` over `items` with at most `limit` futures in flight, each started only when a slot
/// frees; the results come back in the order of `items`.
pub async fn bounded<I, R, F, Fut>(items: Vec<I>, limit: usize, f: F) -> Vec<R>
where
    F: Fn(I) -> Fut,
    Fut: Future<Output = R>,
{
    let total = items.len();
    let mut pending = items.into_iter().enumerate();
    let mut in_flight = FuturesUnordered::new();
    let mut done: Vec<(usize, R)> = Vec::with_capacity(total);
    loop {
        while in_flight.len() < limit.max(1) {
            match pending.next() {
                Some((i, item)) => {
                    let fut = f(item);
                    in_flight.push(async move { (i, fut.await) });
                }
                None => break,
            }
        }
        match in_flight.next().await {
            Some(r) => done.push(r),
            None => break,
        }
    }
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Fight check → write → record, for every planned write, in order of `planned`; an item with
/// a check in a fight is not written. `write` returns the other managers' writes of the fields
/// it set as the object it returned shows them (`None` when there is no object, a delete); a
/// write that reverted another manager's write counts toward a fight, meshwarden's own creates,
/// deletes and first corrections never.
pub async fn drive<T, F, Fut>(
    memory: &Memory,
    planned: Vec<Planned<T>>,
    limit: usize,
    write: F,
) -> Vec<Outcome<T>>
where
    F: Fn(&T) -> Fut,
    Fut: Future<Output = Result<Option<ForeignWrites>>>,
{
    drive_checks(
        memory,
        planned,
        limit,
        |_, _| false,
        |item| {
            let fut = write(item);
            async move { fut.await.map(|after| vec![after]) }
        },
    )
    .await
}

/// [`drive`] for items with several checks: `hold` gets an item and the indices of its checks
/// in a fight, cuts their writes out of it and returns whether anything is left to write (if
/// not, the item is [`Outcome::Fighting`]). `write` returns one `after` per check, in the order
/// of the checks (`None`: not written, nothing to record); the held checks are not recorded.
pub async fn drive_checks<T, H, F, Fut>(
    memory: &Memory,
    planned: Vec<Planned<T>>,
    limit: usize,
    hold: H,
    write: F,
) -> Vec<Outcome<T>>
where
    H: Fn(&mut T, &[usize]) -> bool,
    F: Fn(&T) -> Fut,
    Fut: Future<Output = Result<Vec<Option<ForeignWrites>>>>,
{
    let now = Instant::now();
    let mut outcomes: Vec<Option<Outcome<T>>> = Vec::with_capacity(planned.len());
    let mut to_write = Vec::new();
    for (i, mut p) in planned.into_iter().enumerate() {
        let held: Vec<usize> = (0..p.checks.len())
            .filter(|&c| memory.fighting(&p.checks[c].key, now))
            .collect();
        if !held.is_empty() && !hold(&mut p.item, &held) {
            outcomes.push(Some(Outcome::Fighting(p.item)));
        } else {
            outcomes.push(None);
            to_write.push((i, p, held));
        }
    }
    let results = bounded(to_write, limit, |(i, p, held)| {
        let fut = write(&p.item);
        async move { (i, p, held, fut.await) }
    })
    .await;
    for (i, p, held, result) in results {
        let outcome = match result {
            Ok(afters) => {
                for (c, (check, after)) in p.checks.iter().zip(&afters).enumerate() {
                    if let (false, Some(seen), Some(after)) =
                        (held.contains(&c), &check.seen, after)
                    {
                        memory.corrected(&check.key, now, seen, after);
                    }
                }
                Outcome::Written(p.item)
            }
            Err(e) => Outcome::Failed(p.item, e),
        };
        outcomes[i] = Some(outcome);
    }
    outcomes.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn key(object: &str) -> FightKey {
        FightKey {
            policy: "p".into(),
            section: "MutualTLS",
            object: object.into(),
            field: None,
        }
    }

    fn writes(generation: i64, w: &[&str]) -> ForeignWrites {
        ForeignWrites {
            generation,
            writes: w.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn bounded_keeps_order_and_the_limit() {
        let running = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let out = bounded((0..20u64).collect(), 4, |i| {
            let (running, peak) = (&running, &peak);
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20 - i)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                i * 10
            }
        })
        .await;
        assert_eq!(out, (0..20u64).map(|i| i * 10).collect::<Vec<_>>());
        assert_eq!(peak.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn only_reverts_of_another_writer_make_a_fight_and_a_fight_is_not_written() {
        let memory = Memory::default();
        memory.set_fight_limit(Duration::from_secs(600), 2);
        let written = AtomicUsize::new(0);
        let write = |_: &()| {
            written.fetch_add(1, Ordering::SeqCst);
            async { Ok(Some(writes(2, &[]))) }
        };
        let plan = |seen: Option<ForeignWrites>| {
            vec![Planned::one(key("PeerAuthentication/a/default"), seen, ())]
        };
        // meshwarden's own creates (nothing read) and corrections of a field nobody else
        // wrote never count.
        for _ in 0..4 {
            drive(&memory, plan(None), 16, write).await;
            drive(&memory, plan(Some(writes(1, &[]))), 16, write).await;
        }
        assert!(!memory.fighting(&key("PeerAuthentication/a/default"), Instant::now()));
        // Another manager writes it back three times: a fight; the next write is left out.
        for t in 1..=3 {
            let w = format!("kubectl-edit Update 2026-01-01T00:0{t}:00Z");
            drive(&memory, plan(Some(writes(2 + t, &[&w]))), 16, write).await;
        }
        let before = written.load(Ordering::SeqCst);
        let out = drive(&memory, plan(Some(writes(9, &["x Update 1"]))), 16, write).await;
        assert!(matches!(out[0], Outcome::Fighting(())));
        assert_eq!(written.load(Ordering::SeqCst), before);
    }

    #[tokio::test]
    async fn a_check_in_a_fight_is_cut_out_of_its_item_and_the_rest_still_written() {
        let memory = Memory::default();
        memory.set_fight_limit(Duration::from_secs(600), 2);
        let fields = ["a", "b"];
        let field_key = |f: &str| FightKey {
            field: Some(f.into()),
            ..key("Deployment/ns/istiod")
        };
        let sent: std::sync::Mutex<Vec<Vec<&str>>> = Default::default();
        let write = |item: &Vec<&'static str>| {
            if let Ok(mut s) = sent.lock() {
                s.push(item.clone());
            }
            async { Ok(vec![Some(writes(2, &[])), Some(writes(2, &[]))]) }
        };
        let hold = |item: &mut Vec<&'static str>, held: &[usize]| {
            item.retain(|f| !held.iter().any(|&h| fields[h] == *f));
            !item.is_empty()
        };
        // `reverted` names the fields another manager wrote back before this correction.
        let plan = |t: usize, reverted: &[&str]| {
            let seen = |f: &str| {
                let w = format!("kubectl-edit Update 2026-01-01T00:0{t}:00Z");
                Some(match reverted.contains(&f) {
                    true => writes(2 + t as i64, &[&w]),
                    false => writes(1, &[]),
                })
            };
            vec![Planned {
                checks: fields
                    .iter()
                    .map(|f| Check {
                        key: field_key(f),
                        seen: seen(f),
                    })
                    .collect(),
                item: fields.to_vec(),
            }]
        };
        // Each check is recorded on its own: only `a` is in a fight.
        for t in 1..=3 {
            drive_checks(&memory, plan(t, &["a"]), 1, hold, write).await;
        }
        let now = Instant::now();
        assert!(memory.fighting(&field_key("a"), now));
        assert!(!memory.fighting(&field_key("b"), now));
        // `a` is cut out, `b` is still written (and recorded: now it is reverted too).
        for t in 4..=5 {
            let out = drive_checks(&memory, plan(t, &["b"]), 1, hold, write).await;
            assert!(matches!(&out[0], Outcome::Written(item) if item == &["b"]));
        }
        assert!(memory.fighting(&field_key("b"), Instant::now()));
        // Both in a fight: nothing left, not written.
        let before = sent.lock().map(|s| s.len()).unwrap_or_default();
        let out = drive_checks(&memory, plan(6, &[]), 1, hold, write).await;
        assert!(matches!(&out[0], Outcome::Fighting(item) if item.is_empty()));
        let after = sent.lock().map(|s| s.len()).unwrap_or_default();
        assert_eq!(after, before);
    }

    #[tokio::test]
    async fn a_failed_write_is_returned_in_place_and_the_others_still_run() {
        let memory = Memory::default();
        let planned = ["a", "b", "c"]
            .iter()
            .map(|o| Planned::one(key(o), None, o.to_string()))
            .collect();
        let out = drive(&memory, planned, 2, |o: &String| {
            let fail = o == "b";
            async move {
                if fail {
                    Err(Error::InvalidSpec("refused".into()))
                } else {
                    Ok(None)
                }
            }
        })
        .await;
        let kinds: Vec<&str> = out
            .iter()
            .map(|o| match o {
                Outcome::Written(_) => "written",
                Outcome::Failed(..) => "failed",
                Outcome::Fighting(_) => "fighting",
            })
            .collect();
        assert_eq!(kinds, ["written", "failed", "written"]);
        assert_eq!(out[1].item(), "b");
    }
}
