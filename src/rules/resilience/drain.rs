//! Workloads whose proxy's drain does not end before their pods' grace period does, pure.
//!
//! On SIGTERM pilot-agent drains Envoy and then stops it after `terminationDrainDuration`,
//! or, with `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`, after `MINIMUM_DRAIN_DURATION` and then once
//! no connection is active ([`crate::istio::drain`]). The kubelet kills every container still
//! running when the pod's `terminationGracePeriodSeconds` ends. A drain at or beyond the
//! grace period is cut by SIGKILL (Envoy never stops on its own, and the app containers get
//! no time after it); a drain that waits for idle connections is bounded by nothing else.
//! Native sidecars are not judged: their drain starts with the pod's shutdown and ends when
//! the app containers have stopped, whatever these settings say.

use std::collections::BTreeSet;

use crate::istio::drain::{Drain, Effective};

/// Kubernetes' `terminationGracePeriodSeconds` when a pod spec leaves it unset.
pub const DEFAULT_GRACE_SECONDS: u32 = 30;

/// What is wrong with one workload's drain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    /// The drain (ms) lasts at least the grace period (s).
    Exceeds { drain_ms: u32, grace: u32 },
    /// `EXIT_ON_ZERO_ACTIVE_CONNECTIONS`: after `minimum_ms`, the drain lasts until the last
    /// connection closes, bounded only by the grace period (`minimum_ms` below it).
    UntilIdle { minimum_ms: u32, grace: u32 },
}

/// One workload's finding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    /// `Deployment/web`.
    pub workload: String,
    pub finding: Finding,
}

/// A namespace's workloads that were judged, and their findings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Findings {
    pub judged: usize,
    pub gaps: Vec<Gap>,
}

/// A workload as the check reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload<'a> {
    pub kind: &'static str,
    pub name: &'a str,
    /// `terminationGracePeriodSeconds` of its template, if set.
    pub grace_seconds: Option<u32>,
    /// Its `proxy.istio.io/config` annotation's drain settings.
    pub drain: Drain,
}

/// Judges a workload whose pods run a sidecar that is not native, with the mesh's
/// `defaultConfig` (`mesh`) under its own settings.
pub fn judge(mesh: Drain, w: &Workload) -> Option<Finding> {
    let grace = w.grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS);
    let grace_ms = grace.saturating_mul(1000);
    match w.drain.over(mesh).effective() {
        Effective::Fixed { ms } if ms >= grace_ms => Some(Finding::Exceeds {
            drain_ms: ms,
            grace,
        }),
        Effective::Fixed { .. } => None,
        Effective::UntilIdle { minimum_ms } if minimum_ms >= grace_ms => Some(Finding::Exceeds {
            drain_ms: minimum_ms,
            grace,
        }),
        Effective::UntilIdle { minimum_ms } => Some(Finding::UntilIdle { minimum_ms, grace }),
    }
}

/// The workloads of a namespace to judge: those with a running pod whose sidecar is not
/// native (`with_sidecar`: (kind, name) of such pods' owners).
pub fn judged<'a>(
    workloads: impl IntoIterator<Item = Workload<'a>>,
    with_sidecar: &BTreeSet<(&'static str, &str)>,
    mesh: Drain,
) -> Findings {
    let mut out = Findings::default();
    for w in workloads {
        if !with_sidecar.contains(&(w.kind, w.name)) {
            continue;
        }
        out.judged += 1;
        if let Some(finding) = judge(mesh, &w) {
            out.gaps.push(Gap {
                workload: format!("{}/{}", w.kind, w.name),
                finding,
            });
        }
    }
    out
}

fn seconds(ms: u32) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}ms", ms)
    }
}

/// One finding in words.
pub fn describe(g: &Gap) -> String {
    match g.finding {
        Finding::Exceeds { drain_ms, grace } => format!(
            "{}: the proxy drains {} against a grace period of {grace}s (the kubelet kills it first)",
            g.workload,
            seconds(drain_ms)
        ),
        Finding::UntilIdle { minimum_ms, grace } => format!(
            "{}: with EXIT_ON_ZERO_ACTIVE_CONNECTIONS the proxy drains {} and then until the last connection closes, bounded only by the grace period of {grace}s",
            g.workload,
            seconds(minimum_ms)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(grace: Option<u32>, drain: &str) -> Workload<'static> {
        Workload {
            kind: "Deployment",
            name: "web",
            grace_seconds: grace,
            drain: Drain::parse(drain),
        }
    }

    #[test]
    fn a_drain_at_or_beyond_the_grace_period_is_a_finding() {
        let none = Drain::default();
        // Defaults: 5 s against 30 s.
        assert_eq!(judge(none, &w(None, "{}")), None);
        assert_eq!(
            judge(none, &w(Some(5), "{}")),
            Some(Finding::Exceeds {
                drain_ms: 5000,
                grace: 5
            })
        );
        assert_eq!(judge(none, &w(Some(6), "{}")), None);
        assert_eq!(
            judge(none, &w(None, "{terminationDrainDuration: 45s}")),
            Some(Finding::Exceeds {
                drain_ms: 45_000,
                grace: 30
            })
        );
        assert_eq!(
            judge(none, &w(Some(60), "{terminationDrainDuration: 45s}")),
            None
        );
    }

    #[test]
    fn the_mesh_default_applies_under_the_annotation() {
        let mesh = Drain::parse("{terminationDrainDuration: 40s}");
        assert!(judge(mesh, &w(None, "{}")).is_some());
        assert_eq!(
            judge(mesh, &w(None, "{terminationDrainDuration: 10s}")),
            None
        );
        assert_eq!(judge(mesh, &w(Some(41), "{}")), None);
    }

    #[test]
    fn exit_on_zero_ignores_the_drain_duration_and_only_the_grace_period_bounds_it() {
        let none = Drain::default();
        let exit = "{terminationDrainDuration: 1s, proxyMetadata: {EXIT_ON_ZERO_ACTIVE_CONNECTIONS: 'true'}}";
        assert_eq!(
            judge(none, &w(None, exit)),
            Some(Finding::UntilIdle {
                minimum_ms: 5000,
                grace: 30
            })
        );
        let long = "{proxyMetadata: {EXIT_ON_ZERO_ACTIVE_CONNECTIONS: 'true', MINIMUM_DRAIN_DURATION: 30s}}";
        assert_eq!(
            judge(none, &w(None, long)),
            Some(Finding::Exceeds {
                drain_ms: 30_000,
                grace: 30
            })
        );
        // From the mesh's proxyMetadata too, unless the workload turns it off.
        let mesh = Drain::parse("{proxyMetadata: {EXIT_ON_ZERO_ACTIVE_CONNECTIONS: 'true'}}");
        assert!(matches!(
            judge(mesh, &w(None, "{}")),
            Some(Finding::UntilIdle { .. })
        ));
        let off = "{proxyMetadata: {EXIT_ON_ZERO_ACTIVE_CONNECTIONS: 'false'}}";
        assert_eq!(judge(mesh, &w(None, off)), None);
    }

    #[test]
    fn only_workloads_with_a_regular_sidecar_are_judged() {
        let ws = [
            w(Some(1), "{}"),
            Workload {
                name: "native",
                ..w(Some(1), "{}")
            },
        ];
        let with: BTreeSet<(&str, &str)> = [("Deployment", "web")].into_iter().collect();
        let f = judged(ws, &with, Drain::default());
        assert_eq!(f.judged, 1);
        assert_eq!(f.gaps.len(), 1);
        assert_eq!(
            describe(&f.gaps[0]),
            "Deployment/web: the proxy drains 5s against a grace period of 1s (the kubelet kills it first)"
        );
    }
}
