//! The one loop sections write through: fight check → write (a bounded number in flight) →
//! record. A section plans its writes as [`Planned`] items; [`drive`] leaves out those in a
//! fight, runs the rest with at most `limit` in flight (a slow write holds no slot but its own)
//! and records each correction in the fight memory from the evidence the write returned.

use std::future::Future;
use std::time::Instant;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::fields::ForeignWrites;
use super::fight::{FightKey, Memory};
use crate::error::{Error, Result};

/// One write a section planned.
pub struct Planned<T> {
    /// What the fight memory counts this write under.
    pub key: FightKey,
    /// The other managers' writes of the fields this write sets, as the plan read them; `None`
    /// when nothing was read (the object is created) or the write sets nothing (a delete):
    /// such writes never count toward a fight.
    pub seen: Option<ForeignWrites>,
    pub item: T,
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

/// Fight check → write → record, for every planned write, in order of `planned`. `write`
/// returns the other managers' writes of the fields it set as the object it returned shows
/// them (`None` when there is no object, a delete); a write that reverted another manager's
/// write counts toward a fight, meshwarden's own creates, deletes and first corrections never.
pub async fn drive<T, F, Fut>(
    memory: &Memory,
    planned: Vec<Planned<T>>,
    limit: usize,
    write: F,
) -> Vec<(FightKey, Outcome<T>)>
where
    F: Fn(&T) -> Fut,
    Fut: Future<Output = Result<Option<ForeignWrites>>>,
{
    let now = Instant::now();
    let mut outcomes: Vec<Option<(FightKey, Outcome<T>)>> = Vec::with_capacity(planned.len());
    let mut to_write = Vec::new();
    for (i, p) in planned.into_iter().enumerate() {
        if memory.fighting(&p.key, now) {
            outcomes.push(Some((p.key, Outcome::Fighting(p.item))));
        } else {
            outcomes.push(None);
            to_write.push((i, p));
        }
    }
    let results = bounded(to_write, limit, |(i, p)| {
        let fut = write(&p.item);
        async move { (i, p, fut.await) }
    })
    .await;
    for (i, p, result) in results {
        let outcome = match result {
            Ok(after) => {
                if let (Some(seen), Some(after)) = (&p.seen, &after) {
                    memory.corrected(&p.key, now, seen, after);
                }
                Outcome::Written(p.item)
            }
            Err(e) => Outcome::Failed(p.item, e),
        };
        outcomes[i] = Some((p.key, outcome));
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
            vec![Planned {
                key: key("PeerAuthentication/a/default"),
                seen,
                item: (),
            }]
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
        assert!(matches!(out[0].1, Outcome::Fighting(())));
        assert_eq!(written.load(Ordering::SeqCst), before);
    }

    #[tokio::test]
    async fn a_failed_write_is_returned_in_place_and_the_others_still_run() {
        let memory = Memory::default();
        let planned = ["a", "b", "c"]
            .iter()
            .map(|o| Planned {
                key: key(o),
                seen: None,
                item: o.to_string(),
            })
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
            .map(|(_, o)| match o {
                Outcome::Written(_) => "written",
                Outcome::Failed(..) => "failed",
                Outcome::Fighting(_) => "fighting",
            })
            .collect();
        assert_eq!(kinds, ["written", "failed", "written"]);
        assert_eq!(out[1].1.item(), "b");
    }
}
