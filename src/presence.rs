//! Presence: every instance that writes (or, without leader election, would write) keeps a
//! Lease of its own, `<lease name>-<identity>` in the lease namespace, renewed every third of
//! the lease duration and deleted on a graceful stop. Each instance watches its peers' records
//! (label `meshwarden.io/instance-of=<lease name>`), so a second instance that runs without
//! leader election is seen by both: each logs it once per change, exports
//! `meshwarden_other_instances` and records one Event on its own record. Without leader
//! election the instance that started later (or any instance, next to an elected leader) goes
//! passive: it writes nothing and publishes no Event until the other is gone.
//!
//! Instances with different `--policy-selector`s handle different policies (shards) and are
//! not each other's peers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{reflector, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::telemetry::Metrics;
use crate::write::{FIELD_MANAGER, MANAGED_BY};

/// Label naming the leader-election Lease the instances share (their group).
pub const GROUP_LABEL: &str = "meshwarden.io/instance-of";
/// Label saying whether the instance runs with leader election (`"true"`/`"false"`).
pub const ELECTED_LABEL: &str = "meshwarden.io/leader-election";
/// Annotation holding the instance's `--policy-selector` (absent: every policy).
pub const SELECTOR_ANNOTATION: &str = "meshwarden.io/policy-selector";
/// Event reasons on an instance's own record.
pub const OTHER_INSTANCE: &str = "OtherInstanceRunning";
pub const OTHER_INSTANCE_GONE: &str = "OtherInstanceGone";

/// One instance's record as read from its Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub identity: String,
    pub elected: bool,
    pub selector: Option<String>,
    /// When the instance started (its Lease's `acquireTime`): the older one stays active.
    pub started: jiff::Timestamp,
    /// Last renewal plus the lease duration.
    pub expires: jiff::Timestamp,
}

impl Record {
    fn from_lease(lease: &Lease) -> Option<Record> {
        let spec = lease.spec.as_ref()?;
        let started = spec.acquire_time.as_ref()?.0;
        let renewed = spec.renew_time.as_ref()?.0;
        let secs = i64::from(spec.lease_duration_seconds?);
        Some(Record {
            identity: spec.holder_identity.clone()?,
            elected: lease.labels().get(ELECTED_LABEL).map(String::as_str) == Some("true"),
            selector: lease.annotations().get(SELECTOR_ANNOTATION).cloned(),
            started,
            expires: renewed
                .checked_add(jiff::SignedDuration::from_secs(secs))
                .ok()?,
        })
    }
}

/// What an instance makes of its peers' records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Seen {
    /// Other live instances handling the same policies, by identity.
    pub others: Vec<String>,
    /// The instance this one yields to (goes passive for); only without leader election.
    pub yield_to: Option<String>,
}

/// Decides from the live records of the group: a record of another identity with the same
/// policy selector that has not expired is another instance. Without leader election, `me`
/// yields to an elected leader, and to an older instance without leader election (ties by
/// identity), so exactly one of two unelected instances stays active.
pub fn decide(me: &Record, records: &[Record], now: jiff::Timestamp) -> Seen {
    let mut others: Vec<&Record> = records
        .iter()
        .filter(|r| r.identity != me.identity && r.selector == me.selector && r.expires > now)
        .collect();
    others.sort_by(|a, b| (a.started, &a.identity).cmp(&(b.started, &b.identity)));
    let yield_to = if me.elected {
        None
    } else {
        others
            .iter()
            .find(|o| o.elected || (o.started, &o.identity) < (me.started, &me.identity))
            .map(|o| o.identity.clone())
    };
    Seen {
        others: others.iter().map(|o| o.identity.clone()).collect(),
        yield_to,
    }
}

/// Name of an instance's record: `<lease name>-<identity>`, reduced to what a name allows.
pub fn record_name(lease_name: &str, identity: &str) -> String {
    let clean: String = format!("{lease_name}-{identity}")
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(253)
        .collect();
    clean.trim_matches(|c| c == '-' || c == '.').to_string()
}

/// An instance's presence in its group.
pub struct Presence {
    pub client: kube::Client,
    pub namespace: String,
    /// The leader-election Lease's name: the group.
    pub lease_name: String,
    pub identity: String,
    pub elected: bool,
    pub selector: Option<String>,
    /// Seconds a record stays live without renewal.
    pub duration: u64,
    pub metrics: Arc<Metrics>,
}

/// A running presence: what it sees, and how to end it (which deletes the record).
pub struct Running {
    pub seen: watch::Receiver<Seen>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Deletes the record (so a passive peer resumes at once) and ends the heartbeat.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

impl Presence {
    fn api(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn name(&self) -> String {
        record_name(&self.lease_name, &self.identity)
    }

    fn record(&self, started: jiff::Timestamp) -> Record {
        Record {
            identity: self.identity.clone(),
            elected: self.elected,
            selector: self.selector.clone(),
            started,
            expires: started,
        }
    }

    async fn heartbeat(&self, started: jiff::Timestamp) -> Result<(), kube::Error> {
        let mut annotations = BTreeMap::new();
        if let Some(s) = &self.selector {
            annotations.insert(SELECTOR_ANNOTATION, s.clone());
        }
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name(),
                "labels": {
                    GROUP_LABEL: self.lease_name,
                    ELECTED_LABEL: self.elected.to_string(),
                    MANAGED_BY.0: MANAGED_BY.1,
                },
                "annotations": annotations,
            },
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": i32::try_from(self.duration).unwrap_or(i32::MAX),
                "acquireTime": MicroTime(started),
                "renewTime": MicroTime(jiff::Timestamp::now()),
            },
        });
        self.api()
            .patch(
                &self.name(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await
            .map(|_| ())
    }

    /// Writes the record, reads the group once (so a second instance knows at once whether
    /// to stay passive), then keeps renewing and watching until stopped. A record that cannot
    /// be written or read is logged and leaves the instance active: detection is a safeguard,
    /// never a reason to stop holding the mesh.
    pub async fn start(self) -> Running {
        let started = jiff::Timestamp::now();
        let me = self.record(started);
        let selector = format!("{GROUP_LABEL}={}", self.lease_name);
        // Logged once per change, not at every renewal.
        let mut renewing = match self.heartbeat(started).await {
            Ok(()) => true,
            Err(e) => {
                warn!(namespace = %self.namespace, error = %e, "cannot write this instance's presence Lease; another instance running without leader election would not be detected");
                false
            }
        };
        let first = match self
            .api()
            .list(&ListParams::default().labels(&selector))
            .await
        {
            Ok(list) => {
                let records: Vec<Record> = list.iter().filter_map(Record::from_lease).collect();
                decide(&me, &records, jiff::Timestamp::now())
            }
            Err(_) => Seen::default(),
        };
        let (tx, rx) = watch::channel(Seen::default());
        let (stop_tx, mut stop_rx) = oneshot::channel();
        let mut reporter = Reporting::new(&self);
        reporter.update(&first, &tx).await;
        let task = tokio::spawn(async move {
            let (store, writer) = reflector::store::<Lease>();
            let api = self.api();
            let config = watcher::Config::default().labels(&selector);
            let health = Arc::new(crate::watch::Health::default());
            let events = crate::watch::resilient(health, "presence Leases", move || {
                watcher(api.clone(), config.clone())
            });
            let mut events = std::pin::pin!(reflector::reflector(writer, events));
            let period = Duration::from_secs((self.duration / 3).max(1));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            // Until the watch has listed, the store is empty: the first read decides.
            let mut listed = false;
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    _ = tick.tick() => {
                        match (self.heartbeat(started).await, renewing) {
                            (Ok(()), false) => {
                                info!("this instance's presence Lease is written again");
                                renewing = true;
                            }
                            (Err(e), true) => {
                                warn!(error = %e, "cannot renew this instance's presence Lease (logged again when it is written)");
                                renewing = false;
                            }
                            _ => {}
                        }
                        self.forget_expired(&store.state()).await;
                    }
                    ev = events.next() => match ev {
                        None => break,
                        Some(Ok(watcher::Event::InitDone)) => listed = true,
                        Some(_) => {}
                    },
                }
                if !listed {
                    continue;
                }
                let records: Vec<Record> = store
                    .state()
                    .iter()
                    .filter_map(|l| Record::from_lease(l))
                    .collect();
                reporter
                    .update(&decide(&me, &records, jiff::Timestamp::now()), &tx)
                    .await;
            }
            if let Err(e) = self
                .api()
                .delete(&self.name(), &DeleteParams::default())
                .await
            {
                warn!(error = %e, "cannot delete this instance's presence Lease; it expires by itself");
            }
            self.metrics.other_instances.set(0);
        });
        Running {
            seen: rx,
            stop: stop_tx,
            task,
        }
    }

    /// Deletes records of instances gone for more than ten lease durations (killed, not
    /// stopped), so that pods of past rollouts leave nothing behind.
    async fn forget_expired(&self, leases: &[Arc<Lease>]) {
        let grace = jiff::SignedDuration::from_secs(i64::try_from(self.duration * 10).unwrap_or(0));
        let now = jiff::Timestamp::now();
        for lease in leases {
            if let Some(r) = Record::from_lease(lease)
                && r.identity != self.identity
                && r.expires.checked_add(grace).is_ok_and(|t| t < now)
            {
                let _ = self
                    .api()
                    .delete(&lease.name_any(), &DeleteParams::default())
                    .await;
            }
        }
    }
}

/// Reports each change of what an instance sees: one log line, the gauge, one Event on the
/// instance's own record.
struct Reporting {
    recorder: Recorder,
    reference: k8s_openapi::api::core::v1::ObjectReference,
    metrics: Arc<Metrics>,
    last: Seen,
}

impl Reporting {
    fn new(p: &Presence) -> Self {
        let mut lease = Lease::default();
        lease.metadata.name = Some(p.name());
        lease.metadata.namespace = Some(p.namespace.clone());
        Reporting {
            recorder: Recorder::new(
                p.client.clone(),
                Reporter {
                    controller: "meshwarden".into(),
                    instance: Some(p.identity.clone()),
                },
            ),
            reference: lease.object_ref(&()),
            metrics: p.metrics.clone(),
            last: Seen::default(),
        }
    }

    async fn update(&mut self, seen: &Seen, tx: &watch::Sender<Seen>) {
        if *seen == self.last {
            return;
        }
        self.metrics
            .other_instances
            .set(i64::try_from(seen.others.len()).unwrap_or(i64::MAX));
        let (type_, reason, note) = if seen.others.is_empty() {
            info!("no other meshwarden instance is running any more");
            (
                EventType::Normal,
                OTHER_INSTANCE_GONE,
                "no other meshwarden instance handles these policies any more".to_string(),
            )
        } else {
            let others = seen.others.join(", ");
            let role = match &seen.yield_to {
                Some(o) => format!("this instance is passive (writes nothing, publishes no Event) while {o} runs"),
                None => "this instance keeps writing; the other one is passive unless it runs with leader election".into(),
            };
            warn!(%others, passive = seen.yield_to.is_some(), "another meshwarden instance handles the same policies without leader election; {role}");
            (
                EventType::Warning,
                OTHER_INSTANCE,
                format!(
                    "other meshwarden instance(s) running: {others}; {role}. Run one instance, or enable leader election (--leader-election)"
                ),
            )
        };
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Detect".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &self.reference).await {
            warn!(error = %e, "cannot publish event");
        }
        self.last = seen.clone();
        let _ = tx.send(seen.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(secs).unwrap()
    }

    fn record(id: &str, elected: bool, started: i64, expires: i64) -> Record {
        Record {
            identity: id.into(),
            elected,
            selector: None,
            started: at(started),
            expires: at(expires),
        }
    }

    #[test]
    fn the_younger_of_two_unelected_instances_yields() {
        let a = record("a", false, 100, 200);
        let b = record("b", false, 110, 200);
        let both = [a.clone(), b.clone()];
        assert_eq!(
            decide(&a, &both, at(150)),
            Seen {
                others: vec!["b".into()],
                yield_to: None
            }
        );
        assert_eq!(
            decide(&b, &both, at(150)),
            Seen {
                others: vec!["a".into()],
                yield_to: Some("a".into())
            }
        );
        // The same start: the identity decides, the same way on both sides.
        let c = record("c", false, 100, 200);
        assert_eq!(
            decide(&c, &[a.clone(), c.clone()], at(150)).yield_to,
            Some("a".into())
        );
        assert_eq!(decide(&a, &[a.clone(), c.clone()], at(150)).yield_to, None);
    }

    #[test]
    fn expired_records_other_shards_and_oneself_are_no_other_instance() {
        let me = record("me", false, 200, 300);
        let gone = record("gone", false, 100, 150);
        let mut shard = record("shard", false, 100, 300);
        shard.selector = Some("team=a".into());
        assert_eq!(
            decide(&me, &[me.clone(), gone, shard], at(200)),
            Seen::default()
        );
    }

    #[test]
    fn an_elected_leader_is_yielded_to_and_never_yields() {
        let leader = record("leader", true, 300, 400);
        let early = record("early", false, 100, 400);
        assert_eq!(
            decide(&early, &[leader.clone(), early.clone()], at(350)).yield_to,
            Some("leader".into())
        );
        let seen = decide(&leader, &[leader.clone(), early.clone()], at(350));
        assert_eq!(seen.others, vec!["early".to_string()]);
        assert_eq!(seen.yield_to, None);
    }

    #[test]
    fn record_names_are_valid_names() {
        assert_eq!(
            record_name("meshwarden-leader", "Replica_A"),
            "meshwarden-leader-replica-a"
        );
        assert!(record_name("l", &"x".repeat(400)).len() <= 253);
    }
}
