//! What an HA target achieves, as opposed to what its objects declare: replicas available
//! against the count wanted (with the scheduler's reason for each pod that does not serve),
//! the nodes and zones its pods actually use, and whether its PodDisruptionBudgets let a node
//! drain. Pure: judged from the observation and the nodes; the grace period a shortfall gets
//! before it counts is applied by the section ([`Since`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;

use super::nodes::Nodes;
use super::{HaRules, Observation, object_id};
use crate::api::SpreadMode;
use crate::context::Context;
use crate::rules::sidecars::PodFacts;
use crate::status::reasons;
use crate::write;

/// An outcome that falls short of the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shortfall {
    /// [`reasons::REPLICAS_UNAVAILABLE`], [`reasons::SPREAD_NOT_ACHIEVED`] or
    /// [`reasons::DRAIN_BLOCKED`].
    pub reason: &'static str,
    /// Kind/namespace/name of the object it is about.
    pub object: String,
    /// The target Deployment (`Deployment/<ns>/<name>`).
    pub target: String,
    pub message: String,
}

/// What one target achieves now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Achieved {
    /// Pods that serve: Ready, not being deleted, on a Ready node.
    pub available: usize,
    /// What must serve: the Deployment's count (the HPA's desired count when one owns it),
    /// at least the declared minimum.
    pub wanted: usize,
    /// Zones the scheduled pods run in (0 when the nodes cannot be read).
    pub zones: usize,
    /// The least `disruptionsAllowed` of the budgets covering the pods (`None`: none, or
    /// not computed yet).
    pub disruptions_allowed: Option<i32>,
    pub shortfalls: Vec<Shortfall>,
}

fn node_of(p: &PodFacts) -> Option<&str> {
    p.placement.node.as_deref()
}

/// Why a pod does not serve, or `None` when it does.
fn unavailable(p: &PodFacts, nodes: Option<&Nodes>) -> Option<String> {
    let pl = &p.placement;
    if let Some(why) = &pl.unscheduled {
        return Some(format!("pod {} is Pending: {why}", p.name));
    }
    let Some(node) = node_of(p) else {
        return Some(format!("pod {} is Pending (not scheduled yet)", p.name));
    };
    if let Some(n) = nodes.and_then(|n| n.get(node))
        && !n.ready
    {
        return Some(format!(
            "pod {} runs on node {node}, which is NotReady",
            p.name
        ));
    }
    (!pl.ready).then(|| format!("pod {} on node {node} is not Ready", p.name))
}

/// Pods of the target that count: those not being deleted.
fn live(obs: &Observation) -> impl Iterator<Item = &Arc<PodFacts>> {
    obs.pods.iter().filter(|p| !p.placement.terminating)
}

/// Judges one target. `nodes` is `None` when the nodes cannot be read (spread over zones and
/// node readiness are then not judged).
pub fn judge(rules: &HaRules, obs: &Observation, nodes: Option<&Nodes>) -> Achieved {
    let d = &obs.deployment;
    let ns = d.namespace().unwrap_or_default();
    let dep_id = object_id("Deployment", &ns, &d.name_any());
    let spec = d.spec.clone().unwrap_or_default();
    let hpa_desired = obs
        .hpa
        .as_ref()
        .and_then(|h| h.status.as_ref())
        .map(|s| s.desired_replicas)
        .filter(|n| *n > 0);
    let asked = hpa_desired.unwrap_or(spec.replicas.unwrap_or(1));
    let declared = rules.replicas.as_ref().map_or(0, |r| r.min);
    let wanted = usize::try_from(asked.max(declared)).unwrap_or(0);
    let why: Vec<String> = live(obs).filter_map(|p| unavailable(p, nodes)).collect();
    let available = live(obs).count() - why.len();
    let mut out = Achieved {
        available,
        wanted,
        ..Achieved::default()
    };

    // Until the Deployment controller has reported on the Deployment (a moment after its
    // creation), its pods are not judged: they may not be asked for yet.
    let reported = d
        .status
        .as_ref()
        .and_then(|s| s.observed_generation)
        .is_some();
    // Short of the count, or a pod the scheduler cannot place (a rollout's or a scale-up's:
    // it never finishes while the old pods still serve).
    let unplaceable = live(obs).any(|p| p.placement.unscheduled.is_some());
    if reported && (available < wanted || unplaceable) {
        let source = match (hpa_desired, declared > asked) {
            (_, true) => format!("the declared minimum {declared}"),
            (Some(n), false) => format!("the HorizontalPodAutoscaler's desired {n}"),
            (None, false) => format!("spec.replicas {asked}"),
        };
        let mut parts = why.clone();
        let missing = wanted.saturating_sub(live(obs).count());
        if missing > 0 {
            let failure = d
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| {
                    c.iter()
                        .find(|c| c.type_ == "ReplicaFailure" && c.status == "True")
                })
                .and_then(|c| c.message.clone());
            parts.push(match failure {
                Some(m) => format!("{missing} pod(s) not created: {m}"),
                None => format!("{missing} pod(s) not created yet"),
            });
        }
        let but = match available < wanted {
            true => "",
            false => ", but a rollout or scale-up cannot place its pods",
        };
        out.shortfalls.push(Shortfall {
            reason: reasons::REPLICAS_UNAVAILABLE,
            object: dep_id.clone(),
            target: dep_id.clone(),
            message: format!(
                "{available} of {wanted} replica(s) available (wanted: {source}){but}; {}",
                parts.join("; ")
            ),
        });
    }

    // Spread achieved, from where the scheduled pods run.
    let placed: Vec<(&str, Option<&str>)> = live(obs)
        .filter_map(|p| node_of(p))
        .map(|n| {
            let zone = nodes
                .and_then(|all| all.get(n))
                .and_then(|f| f.zone.as_deref());
            (n, zone)
        })
        .collect();
    let used_zones: BTreeSet<&str> = placed.iter().filter_map(|(_, z)| *z).collect();
    out.zones = used_zones.len();
    if let Some(spread) = &rules.spread
        && placed.len() >= 2
    {
        let used_nodes: BTreeSet<&str> = placed.iter().map(|(n, _)| *n).collect();
        if spread.nodes != SpreadMode::Off && used_nodes.len() == 1 {
            let node = used_nodes.iter().next().copied().unwrap_or_default();
            out.shortfalls.push(Shortfall {
                reason: reasons::SPREAD_NOT_ACHIEVED,
                object: dep_id.clone(),
                target: dep_id.clone(),
                message: format!(
                    "all {} scheduled pods run on node {node}: losing that node stops every replica",
                    placed.len()
                ),
            });
        }
        let template = spec.template.spec.clone().unwrap_or_default();
        if spread.zones != SpreadMode::Off
            && used_zones.len() == 1
            && placed.iter().all(|(_, z)| z.is_some())
            && let Some(all) = nodes
        {
            let zone = used_zones.iter().next().copied().unwrap_or_default();
            let open: BTreeSet<&str> = all
                .values()
                .filter(|n| n.open_to(&template))
                .filter_map(|n| n.zone.as_deref())
                .filter(|z| *z != zone)
                .collect();
            if !open.is_empty() {
                out.shortfalls.push(Shortfall {
                    reason: reasons::SPREAD_NOT_ACHIEVED,
                    object: dep_id.clone(),
                    target: dep_id.clone(),
                    message: format!(
                        "all {} scheduled pods run in zone {zone} while nodes in zone(s) {} could take them: one zone outage stops every replica",
                        placed.len(),
                        open.into_iter().collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
    }

    // Drains possible: a budget that allows no disruption now.
    for b in &obs.pdbs {
        let Some(status) = computed(b) else {
            continue;
        };
        out.disruptions_allowed = Some(
            out.disruptions_allowed
                .map_or(status.disruptions_allowed, |n| {
                    n.min(status.disruptions_allowed)
                }),
        );
        if status.disruptions_allowed > 0 || status.expected_pods == 0 {
            continue;
        }
        out.shortfalls.push(drain_blocked(b, status, obs, nodes));
    }
    out
}

/// A budget's status, when the disruption controller has computed it for its generation.
fn computed(
    b: &PodDisruptionBudget,
) -> Option<&k8s_openapi::api::policy::v1::PodDisruptionBudgetStatus> {
    let status = b.status.as_ref()?;
    let generation = b.metadata.generation.unwrap_or_default();
    (status.observed_generation.unwrap_or_default() >= generation).then_some(status)
}

fn drain_blocked(
    b: &PodDisruptionBudget,
    status: &k8s_openapi::api::policy::v1::PodDisruptionBudgetStatus,
    obs: &Observation,
    nodes: Option<&Nodes>,
) -> Shortfall {
    let ns = b.namespace().unwrap_or_default();
    // Under AlwaysAllow, pods that are not Ready can still be evicted: only the nodes of the
    // serving pods are held.
    let always = b
        .spec
        .as_ref()
        .and_then(|s| s.unhealthy_pod_eviction_policy.as_deref())
        == Some("AlwaysAllow");
    let held: BTreeSet<&str> = live(obs)
        .filter(|p| !always || unavailable(p, nodes).is_none())
        .filter_map(|p| node_of(p))
        .collect();
    let why: Vec<String> = live(obs).filter_map(|p| unavailable(p, nodes)).collect();
    let whose = if write::created_by_meshwarden(&b.metadata) {
        "meshwarden's budget"
    } else {
        "a budget meshwarden does not manage"
    };
    let mut message = format!(
        "allows no disruption ({} healthy, {} required; {whose}): draining node(s) {} blocks",
        status.current_healthy,
        status.desired_healthy,
        if held.is_empty() {
            "(none scheduled)".to_string()
        } else {
            held.into_iter().collect::<Vec<_>>().join(", ")
        }
    );
    if !why.is_empty() {
        message.push_str(&format!(" until {}", why.join("; ")));
    }
    Shortfall {
        reason: reasons::DRAIN_BLOCKED,
        object: object_id("PodDisruptionBudget", &ns, &b.name_any()),
        target: object_id("Deployment", &ns, &obs.deployment.name_any()),
        message,
    }
}

/// When this process first saw each shortfall (per policy and section; forgotten once it is
/// gone), so that one counts only once it outlasts the grace period: a rollout, a drain or a
/// rescheduled pod is short for a moment by design.
#[derive(Clone, Default)]
pub struct Since(Arc<Mutex<HashMap<String, HashMap<String, Instant>>>>);

impl Since {
    /// The process's memory (kept in the context's caches).
    pub fn of(ctx: &Context) -> Since {
        ctx.kept()
    }

    /// Records that `now` are the shortfalls of `scope` (policy and section) and returns how
    /// long each has lasted, in the same order.
    pub fn ages(&self, scope: &str, now: &[Shortfall]) -> Vec<Duration> {
        let Ok(mut m) = self.0.lock() else {
            return vec![Duration::ZERO; now.len()];
        };
        let key = |s: &Shortfall| format!("{}\0{}", s.reason, s.object);
        let seen = m.remove(scope).unwrap_or_default();
        let at = Instant::now();
        let mut kept = HashMap::new();
        let ages = now
            .iter()
            .map(|s| {
                let first = seen.get(&key(s)).copied().unwrap_or(at);
                kept.insert(key(s), first);
                at - first
            })
            .collect();
        if !kept.is_empty() {
            m.insert(scope.to_string(), kept);
        }
        ages
    }
}

/// A section's shortfalls, split by the grace period.
#[derive(Debug, Default)]
pub struct Graded {
    /// Lasted the grace period: violations.
    pub counted: Vec<Shortfall>,
    /// Within it, with how long each has lasted.
    pub waiting: Vec<(Shortfall, Duration)>,
    /// When the first waiting one will have lasted the grace period.
    pub recheck: Option<Duration>,
}

/// Splits `all` (the shortfalls of `scope` now) by how long each has lasted.
pub fn grade(since: &Since, scope: &str, all: Vec<Shortfall>, grace: Duration) -> Graded {
    let ages = since.ages(scope, &all);
    let mut out = Graded::default();
    for (s, age) in all.into_iter().zip(ages) {
        if age >= grace {
            out.counted.push(s);
        } else {
            let left = grace - age;
            out.recheck = Some(out.recheck.map_or(left, |r: Duration| r.min(left)));
            out.waiting.push((s, age));
        }
    }
    out
}

/// The reason of the most pressing counted shortfall: a blocked drain stalls cluster
/// maintenance, missing replicas cost capacity now, a narrow spread costs it on the next outage.
pub fn worst(counted: &[Shortfall]) -> Option<&'static str> {
    [
        reasons::DRAIN_BLOCKED,
        reasons::REPLICAS_UNAVAILABLE,
        reasons::SPREAD_NOT_ACHIEVED,
    ]
    .into_iter()
    .find(|r| counted.iter().any(|s| s.reason == *r))
}

/// The sentence of the condition message for the shortfalls still within the grace period.
pub fn waiting_sentence(waiting: &[(Shortfall, Duration)], grace: Duration) -> Option<String> {
    if waiting.is_empty() {
        return None;
    }
    let shown: Vec<String> = waiting
        .iter()
        .take(3)
        .map(|(s, age)| {
            format!(
                "{} {} for {}s ({})",
                s.object,
                s.reason,
                age.as_secs(),
                s.message
            )
        })
        .collect();
    Some(format!(
        "progressing: {}; reported once it lasts {}s",
        shown.join("; "),
        grace.as_secs()
    ))
}

#[cfg(test)]
mod tests;
