//! Watches that recover on their own: a backoff chosen by the cause of the failure, one log
//! line per change of state, and a record of which watches hold a current cache, which the
//! sections and `/readyz` read.
//!
//! kube-runtime's `default_backoff` is reset by every event, and a watcher emits `Init` before
//! each LIST, so a LIST that always fails (403) was retried every second or so, logging each
//! time. Here only a completed LIST or a watch event counts as success.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::watcher;
use tracing::{Instrument, debug, info, warn};

/// Why a watch failed, which decides how soon it is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The API server (or etcd behind it) cannot answer now: connection refused or reset,
    /// timeouts, 429, 5xx. Retried at most [`UNAVAILABLE_MAX`] apart, so that a returning
    /// server is caught up with within seconds.
    Unavailable,
    /// 410 Gone: the resourceVersion was compacted. Listed again at once.
    Expired,
    /// 401/403: a permission the ClusterRole lacks.
    Forbidden,
    /// 404: the kind is not served (say, Istio's CRDs are not installed).
    NotFound,
    /// Any other error the server returned.
    Rejected,
}

impl Cause {
    pub fn of(err: &watcher::Error) -> Cause {
        let client_err = match err {
            watcher::Error::InitialListFailed(e)
            | watcher::Error::WatchStartFailed(e)
            | watcher::Error::WatchFailed(e) => e,
            watcher::Error::WatchError(status) => return Cause::of_code(status.code),
            _ => return Cause::Rejected,
        };
        match client_err {
            kube::Error::Api(status) => Cause::of_code(status.code),
            _ => Cause::Unavailable,
        }
    }

    fn of_code(code: u16) -> Cause {
        match code {
            410 => Cause::Expired,
            401 | 403 => Cause::Forbidden,
            404 => Cause::NotFound,
            429 | 500..=599 => Cause::Unavailable,
            _ => Cause::Rejected,
        }
    }

    /// Wait before attempt `failures + 1` (`failures` ≥ 1 in a row with this cause).
    pub fn delay(self, failures: u32) -> Duration {
        let doubled = |first: Duration, max: Duration| {
            first
                .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
                .min(max)
        };
        match self {
            Cause::Expired => Duration::ZERO,
            Cause::Unavailable => doubled(Duration::from_millis(250), UNAVAILABLE_MAX),
            Cause::Forbidden | Cause::NotFound | Cause::Rejected => {
                doubled(Duration::from_secs(1), PERSISTENT_MAX)
            }
        }
    }

    /// Whether the failure means the cache missed changes that a retry will bring (as opposed
    /// to a kind that cannot be read at all, which the sections report themselves). A watch
    /// that has listed before is stale whatever the cause (see [`State::Failing`]).
    pub fn stale(self) -> bool {
        matches!(self, Cause::Unavailable | Cause::Expired)
    }

    /// Wait before attempt `failures + 1` of a watch that has listed before: a kind that was
    /// served and is not found now is, in practice, a custom resource that a restarted API
    /// server serves again a few seconds after it reports ready, so it is retried like an
    /// unavailable server (at most [`UNAVAILABLE_MAX`] apart) rather than backing off to
    /// minutes.
    pub fn delay_after_sync(self, failures: u32) -> Duration {
        match self {
            Cause::NotFound => Cause::Unavailable.delay(failures),
            other => other.delay(failures),
        }
    }
}

/// Longest wait between attempts to reach an unavailable API server.
pub const UNAVAILABLE_MAX: Duration = Duration::from_secs(2);
/// Longest wait between attempts of a watch the server refuses (403, 404, 4xx).
pub const PERSISTENT_MAX: Duration = Duration::from_secs(300);

/// State of one watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// The first LIST has not completed.
    Listing,
    /// The cache is current: listed, and watching.
    Synced,
    /// Failing since the last LIST: the cache may miss changes until it lists again.
    /// `stale`: the cache holds what an earlier LIST and its watch brought, now frozen, so
    /// nothing may be decided from it until it lists again: any failure after a successful
    /// list (a 403 or 404 included), and an unreachable server or an expired watch always.
    /// A kind refused from the start (403, 404, never listed) is not stale: its cache is
    /// empty, and the sections that need it report why it cannot be read.
    Failing {
        cause: Cause,
        error: String,
        stale: bool,
    },
}

/// Why a watched cache cannot be read now (see [`Health::readable`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReadable {
    /// The watch at fault.
    pub watch: String,
    /// Why it failed; `None` while it lists for the first time.
    pub cause: Option<Cause>,
    pub message: String,
}

/// The state of every watch of the running controller.
pub struct Health {
    watches: Mutex<BTreeMap<&'static str, State>>,
    /// How many times a watch has listed again after a failure, each counted once its
    /// consumer has applied the list (see [`resilient`]).
    relists: tokio::sync::watch::Sender<u64>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            watches: Mutex::default(),
            relists: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Health {
    /// A receiver that sees a change each time a watch has listed again after a failure, its
    /// list applied to the caches it feeds (whatever depends on them may have missed changes
    /// meanwhile, a deletion included, so it should be evaluated again). Relists that come
    /// together are seen at least once after the last of them; the receiver starts with
    /// every relist before this call seen.
    pub fn relists(&self) -> tokio::sync::watch::Receiver<u64> {
        self.relists.subscribe()
    }

    fn set(&self, name: &'static str, state: State) -> Option<State> {
        self.watches.lock().ok()?.insert(name, state)
    }

    /// Forgets every watch (the controller stopped).
    pub fn clear(&self) {
        if let Ok(mut w) = self.watches.lock() {
            w.clear();
        }
    }

    /// Watches among `names` whose cache may be out of date (failing, or failing and listing
    /// again), with the error.
    pub fn stale(&self, names: &[&str]) -> Vec<(String, String)> {
        let Ok(w) = self.watches.lock() else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|n| match w.get(n) {
                Some(State::Failing {
                    error, stale: true, ..
                }) => Some((n.to_string(), error.clone())),
                _ => None,
            })
            .collect()
    }

    /// True when no watch misses changes a retry would bring: every watch has listed, and
    /// none is failing for want of the API server. (A kind the server refuses is reported by
    /// the sections that need it, and does not make the process unready.)
    pub fn current(&self) -> bool {
        self.watches.lock().is_ok_and(|w| {
            w.values().all(|s| match s {
                State::Synced => true,
                State::Listing => false,
                State::Failing { stale, .. } => !stale,
            })
        })
    }

    /// The state of one watch (`None`: not started).
    pub fn state(&self, name: &str) -> Option<State> {
        self.watches.lock().ok()?.get(name).cloned()
    }

    /// Whether the caches fed by the watches `names` can be read now: every one has listed
    /// and none has failed since. Otherwise why not: `Forbidden` or `NotFound` for a kind the
    /// server refuses (the message names the watch and the server's answer), `CacheNotSynced`
    /// while a watch lists for the first time or again after a failure.
    pub fn readable(&self, names: &[&str]) -> Result<(), NotReadable> {
        for n in names {
            let not = |cause: Option<Cause>, message: String| {
                Err(NotReadable {
                    watch: n.to_string(),
                    cause,
                    message,
                })
            };
            match self.state(n) {
                Some(State::Synced) => {}
                None | Some(State::Listing) => {
                    return not(None, format!("the watch of {n} has not listed yet"));
                }
                Some(State::Failing { cause, error, .. }) => {
                    return not(
                        Some(cause),
                        format!("the watch of {n} failed ({error}) and has not listed again"),
                    );
                }
            }
        }
        Ok(())
    }

    /// [`Health::readable`], waiting up to `limit` while a watch lists for the first time. A
    /// watch that failed is answered at once, whatever the cause: while the API server is
    /// gone, waiting would only hold the policy's reconcile (and every change queued behind
    /// it), and once the watch lists again every policy is reconciled anyway.
    pub async fn wait_readable(&self, names: &[&str], limit: Duration) -> Result<(), NotReadable> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.readable(names) {
                Err(e) if e.cause.is_none() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    /// Every watch and its state, for metrics.
    pub fn snapshot(&self) -> Vec<(&'static str, State)> {
        self.watches
            .lock()
            .map(|w| w.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }
}

type EventStream<K> = Pin<Box<dyn Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send>>;

/// A cluster-scoped kind the watches can list and cache (all of Kubernetes' built-in kinds and
/// the CRD types meshwarden declares).
pub trait Watched:
    kube::Resource<DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
}

impl<K> Watched for K where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// A watcher made by `make`, started again (with a fresh LIST) after each failure, after a
/// wait that depends on the failure's [`Cause`]. Its state is kept in `health` under `name`.
/// Errors are logged here (once per change of cause) and passed on.
///
/// The watch turns `Synced` (and a relist after a failure is counted, [`Health::relists`])
/// when the consumer asks for the event after `InitDone`, that is once every stage between
/// this stream and the consumer (a reflector's store, an index) has applied the list: a
/// cache is never reported current before it is.
pub fn resilient<K, S, F>(
    health: Arc<Health>,
    name: &'static str,
    make: F,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    F: Fn() -> S + Send + 'static,
{
    struct Run<K, F> {
        make: F,
        current: Option<EventStream<K>>,
        failures: u32,
        cause: Option<Cause>,
        wait: Duration,
        health: Arc<Health>,
        /// `InitDone` was passed on; the consumer has applied it once it asks for more.
        listed: bool,
        /// A LIST has completed since the watch started.
        synced_once: bool,
    }
    health.set(name, State::Listing);
    let run = Run {
        make,
        current: None,
        failures: 0,
        cause: None,
        wait: Duration::ZERO,
        health,
        listed: false,
        synced_once: false,
    };
    // Every step of the watch (its LISTs, WATCHes and backoff) runs in a span naming it.
    let span = tracing::info_span!("watch", kind = name);
    futures::stream::unfold(run, move |mut run| {
        async move {
        // The consumer asked for the event after `InitDone`, so it has handled that one: a
        // reflector downstream has swapped the LIST into its store (kube's `reflector`
        // applies an event before passing it on), an index its `observe` hook keeps has done
        // the same. Only now is the cache current, and only now may a relist trigger the
        // evaluations that read it: marked at `InitDone` itself, a reconcile woken by the
        // relist could read the store before the swap (the object deleted during the outage
        // still in it) and decide nothing, with no later event to correct it.
        if std::mem::take(&mut run.listed) {
            let before = run.health.set(name, State::Synced);
            if let Some(State::Failing { .. }) = before {
                info!(watch = name, "watch recovered: listed again");
                run.health.relists.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
        if !run.wait.is_zero() {
            tokio::time::sleep(std::mem::take(&mut run.wait)).await;
        }
        loop {
            let stream = run
                .current
                .get_or_insert_with(|| Box::pin((run.make)()) as EventStream<K>);
            let Some(item) = stream.next().await else {
                // A watcher never ends; start another if it does.
                run.current = None;
                continue;
            };
            match &item {
                Ok(watcher::Event::InitDone) => {
                    run.listed = true;
                    run.synced_once = true;
                    run.failures = 0;
                    run.cause = None;
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    run.failures = 0;
                }
                // `Init` comes before the LIST is sent: not a sign of health.
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Err(e) => {
                    let cause = Cause::of(e);
                    run.failures = if run.cause == Some(cause) {
                        run.failures.saturating_add(1)
                    } else {
                        1
                    };
                    run.wait = if run.synced_once {
                        cause.delay_after_sync(run.failures)
                    } else {
                        cause.delay(run.failures)
                    };
                    if run.cause != Some(cause) {
                        warn!(watch = name, error = %e, ?cause, retry_in = ?run.wait,
                            "watch failed; retrying with backoff (logged again when the cause changes)");
                    } else {
                        debug!(watch = name, error = %e, retry_in = ?run.wait, "watch still failing");
                    }
                    run.cause = Some(cause);
                    run.health.set(
                        name,
                        State::Failing {
                            cause,
                            error: e.to_string(),
                            stale: cause.stale() || run.synced_once,
                        },
                    );
                    // The next attempt lists afresh, so that the cache is known current
                    // once it completes.
                    run.current = None;
                }
            }
            return Some((item, run));
        }
        }
        .instrument(span.clone())
    })
}

#[cfg(test)]
mod tests;
