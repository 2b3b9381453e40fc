//! How a policy's status follows a cluster in motion: since when a condition has been True, as
//! a watch of the policy sees it, and the operator's status writes, counted by time from the
//! audit log.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use meshwarden::api::MeshPolicy;

/// What a watch of one MeshPolicy saw of one condition.
pub(crate) struct PolicyWatch {
    /// When the condition turned True, while it is (`None` while it is not), and the
    /// condition as `status/reason` the last event showed.
    state: Mutex<(Option<Timestamp>, String)>,
    notify: tokio::sync::Notify,
}

impl PolicyWatch {
    /// Waits until the condition is True; returns when the watch saw it turn True, and the
    /// condition.
    pub(crate) async fn until_true(&self, limit: Duration) -> (Timestamp, String) {
        let wait = async {
            loop {
                let notified = self.notify.notified();
                if let Ok(s) = self.state.lock()
                    && let Some(at) = s.0
                {
                    return (at, s.1.clone());
                }
                notified.await;
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(v) => v,
            Err(_) => panic!(
                "condition not True within {limit:?}: {}",
                self.state.lock().map(|s| s.1.clone()).unwrap_or_default()
            ),
        }
    }

    /// When the condition turned True and stayed so since, if it is True now.
    pub(crate) fn true_since(&self) -> Option<Timestamp> {
        self.state.lock().ok().and_then(|s| s.0)
    }
}

/// Watches MeshPolicy `name` for condition `ctype`.
pub(crate) fn watch_policy(
    client: kube::Client,
    name: &str,
    ctype: &'static str,
) -> Arc<PolicyWatch> {
    let w = Arc::new(PolicyWatch {
        state: Mutex::new((None, String::new())),
        notify: tokio::sync::Notify::new(),
    });
    let out = w.clone();
    let api: Api<MeshPolicy> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    tokio::spawn(async move {
        let mut events = watcher(api, cfg)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(ev) = events.next().await {
            let Ok(p) = ev else { continue };
            let seen = Timestamp::now();
            let c = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == ctype))
                .map(|c| (c.status == "True", format!("{}/{}", c.status, c.reason)));
            if let Ok(mut s) = w.state.lock() {
                match c {
                    Some((true, text)) => *s = (s.0.or(Some(seen)), text),
                    Some((false, text)) => *s = (None, text),
                    None => s.0 = None,
                }
            }
            w.notify.notify_waiters();
        }
    });
    out
}

/// A time from the audit log.
pub(crate) fn audit_time(e: &serde_json::Value, field: &str) -> Option<Timestamp> {
    e[field].as_str().and_then(|t| t.parse().ok())
}

/// Completed writes of `user` to `resource` (`deployments/status`): when each was received.
pub(crate) fn writes_of(
    events: &[serde_json::Value],
    user: &str,
    resource: &str,
) -> Vec<Timestamp> {
    let mut out: Vec<Timestamp> = events
        .iter()
        .filter(|e| e["stage"] == "ResponseComplete" && e["user"]["username"] == user)
        .filter(|e| {
            let r = &e["objectRef"];
            let res = r["resource"].as_str().unwrap_or_default();
            match r["subresource"].as_str() {
                Some(s) => resource == format!("{res}/{s}"),
                None => resource == res,
            }
        })
        .filter(|e| !matches!(e["verb"].as_str(), Some("get" | "list" | "watch")))
        .filter_map(|e| audit_time(e, "requestReceivedTimestamp"))
        .collect();
    out.sort();
    out
}

/// The most of `times` (sorted) that fall within any one `window`.
pub(crate) fn most_within(times: &[Timestamp], window: Duration) -> usize {
    let window = jiff::SignedDuration::try_from(window).unwrap_or_default();
    let mut most = 0;
    let mut start = 0;
    for (end, t) in times.iter().enumerate() {
        while times[start] + window <= *t {
            start += 1;
        }
        most = most.max(end + 1 - start);
    }
    most
}

/// A counter or gauge from the operator's `/metrics` on `port` (`meshwarden_reconciles_total`).
pub(crate) async fn metric(port: u16, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Seconds from `a` to `b`.
pub(crate) fn secs(a: Timestamp, b: Timestamp) -> f64 {
    b.duration_since(a).as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_within_counts_the_busiest_window() {
        let t = |ms: i64| Timestamp::from_millisecond(ms).unwrap();
        let times = [t(0), t(100), t(900), t(1000), t(1050), t(3000)];
        assert_eq!(most_within(&times, Duration::from_secs(1)), 4);
        assert_eq!(most_within(&times[5..], Duration::from_secs(1)), 1);
        assert_eq!(most_within(&[], Duration::from_secs(1)), 0);
    }
}
