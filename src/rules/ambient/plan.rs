//! The section's whole decision, pure: from the ztunnel and istio-cni DaemonSets, their pods,
//! the nodes that run ambient pods and istiod's versions, the findings, the condition and the
//! violations.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::facts::{Component, DataPlaneFacts, NODE_CRITICAL};
use crate::api::{AmbientCheck, Violation};
use crate::istio::{DATAPLANE_MODE_LABEL, Revisions};
use crate::rules::sidecars::{Kind, PodFacts};
use crate::rules::upgrades::{Minor, istiod_version};
use crate::status::RuleReport;
use crate::status::conditions::{Observed, Status, types};
use crate::status::reasons::{self, ViolationAction};

/// Nodes named one violation each per component; the others share one.
pub const MAX_NODES: usize = 10;

/// What the section read.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub namespace: String,
    /// The DaemonSets of the namespace labelled as ztunnel or istio-cni, by name.
    pub daemonsets: Vec<(String, Arc<DataPlaneFacts>)>,
    /// The pods of the namespace, running and pending (the agents' pods among them).
    pub pods: Vec<Arc<PodFacts>>,
    /// Nodes that run ambient pods ([`ambient_nodes`]).
    pub ambient_nodes: BTreeMap<String, AmbientPods>,
    pub revisions: Revisions,
}

/// The ambient pods of one node: how many, and the first by namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmbientPods {
    pub count: usize,
    pub first: String,
}

/// Whether a running pod is in ambient mode: its own `istio.io/dataplane-mode` when it has
/// one (`none` opts it out), else its namespace's; never a pod with a sidecar (istio-cni leaves
/// those to their proxy).
pub fn is_ambient(namespace_mode: Option<&str>, pod: &PodFacts) -> bool {
    let mode = pod
        .labels
        .get(DATAPLANE_MODE_LABEL)
        .map(String::as_str)
        .or(namespace_mode);
    mode == Some("ambient") && pod.sidecar.is_none() && !pod.placement.terminating
}

/// Whether a change of `pod` (in a namespace whose `istio.io/dataplane-mode` is
/// `namespace_mode`) can change what the section reports: a DaemonSet's pod (a node agent's,
/// perhaps), or a pod in ambient mode by its labels (whatever its state).
pub fn concerns(namespace_mode: Option<&str>, pod: &PodFacts) -> bool {
    matches!(pod.owner, Some((Kind::DaemonSet, _)))
        || pod
            .labels
            .get(DATAPLANE_MODE_LABEL)
            .map(String::as_str)
            .or(namespace_mode)
            == Some("ambient")
}

/// The nodes running ambient pods, from every running pod (namespace, facts) and each
/// namespace's `istio.io/dataplane-mode`.
pub fn ambient_nodes<'a>(
    pods: impl IntoIterator<Item = (&'a str, &'a PodFacts)>,
    namespace_mode: impl Fn(&str) -> Option<&'a str>,
) -> BTreeMap<String, AmbientPods> {
    let mut out: BTreeMap<String, AmbientPods> = BTreeMap::new();
    for (ns, pod) in pods {
        let Some(node) = pod.placement.node.as_deref() else {
            continue;
        };
        if !is_ambient(namespace_mode(ns), pod) {
            continue;
        }
        let name = format!("{ns}/{}", pod.name);
        let e = out.entry(node.to_string()).or_default();
        e.count += 1;
        if e.first.is_empty() || name < e.first {
            e.first = name;
        }
    }
    out
}

/// One thing wrong: the reason it stands for, the object and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub reason: &'static str,
    pub object: String,
    pub message: String,
}

/// Reasons from the most to the least urgent: the condition carries the first found.
const SEVERITY: [&str; 4] = [
    reasons::DATA_PLANE_NOT_READY,
    reasons::DATA_PLANE_COMPONENT_MISSING,
    reasons::DATA_PLANE_VERSION_SKEW,
    reasons::DATA_PLANE_POSTURE_DRIFT,
];

/// What the plan found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub findings: Vec<Finding>,
    /// DaemonSets found plus nodes running ambient pods.
    pub targets: usize,
    pub compliant: usize,
    /// What holds, for the condition's message when nothing is wrong.
    pub holds: Vec<String>,
}

fn object(namespace: &str, name: &str) -> String {
    format!("DaemonSet/{namespace}/{name}")
}

/// The posture a DaemonSet lacks (empty when it has the charts' production settings).
pub fn posture(component: Component, f: &DataPlaneFacts) -> Vec<String> {
    let mut out = Vec::new();
    let name = component.name();
    if f.priority_class.as_deref() != Some(NODE_CRITICAL) {
        out.push(format!(
            "priorityClassName is {}, not {NODE_CRITICAL}: under node pressure its pods are evicted before others, and a full node cannot make room for them",
            f.priority_class.as_deref().unwrap_or("unset")
        ));
    }
    if !f.untolerated.is_empty() {
        out.push(format!(
            "its pods do not tolerate every {} taint (the chart tolerates them all with operator: Exists): a tainted node gets no {name} pod, or loses it, while ambient pods may run there",
            f.untolerated.join(" and ")
        ));
    }
    for (container, missing) in &f.missing_requests {
        out.push(format!(
            "container {container} has no {} request: the scheduler reserves no room for it",
            missing.join(" or ")
        ));
    }
    let s = &f.strategy;
    if s.kind != "RollingUpdate" {
        out.push(format!(
            "updateStrategy is {}: nodes keep the old {name} until its pods are deleted by hand (the chart rolls it)",
            s.kind
        ));
    } else if component == Component::Ztunnel
        && !matches!(s.max_unavailable.as_deref(), Some("0" | "0%"))
    {
        out.push(format!(
            "it rolls with maxUnavailable {} (maxSurge {}): a node's ztunnel stops before its successor runs, so an upgrade cuts that node's ambient traffic; the chart sets maxUnavailable: 0, maxSurge: 1",
            s.max_unavailable.as_deref().unwrap_or("unset"),
            s.max_surge.as_deref().unwrap_or("unset"),
        ));
    }
    out
}

/// The version finding of a DaemonSet, if any.
pub fn version(component: Component, f: &DataPlaneFacts, revisions: &Revisions) -> Option<String> {
    let name = component.name();
    let Some(revision) = revisions.resolve(&f.revision) else {
        return Some(format!(
            "its revision {} (istio.io/rev) names no running istiod and no tag of one: {name} gets no configuration from it",
            f.revision
        ));
    };
    let (istiod, istiod_tag) = istiod_version(revisions, revision)?;
    let mine = Minor::parse(&f.version)?;
    let behind = mine.behind(istiod);
    let supported = "Istio supports ztunnel and istio-cni at istiod's minor version or one behind, and upgrades istiod first";
    if behind < 0 {
        Some(format!(
            "{name} {} is newer than istiod {istiod_tag} (revision {revision}): {supported}; upgrade istiod, or roll {name} back",
            f.version
        ))
    } else if behind > 1 {
        Some(format!(
            "{name} {} is {behind} minor versions behind istiod {istiod_tag} (revision {revision}): {supported}; upgrade {name} (helm upgrade)",
            f.version
        ))
    } else {
        None
    }
}

/// Why `node` has no Ready pod of `component`: its pods there and their state.
fn not_ready_detail(component: Component, node: &str, pods: &[&PodFacts]) -> String {
    let here: Vec<String> = pods
        .iter()
        .filter(|p| p.placement.node.as_deref() == Some(node))
        .map(
            |p| match (&p.placement.unscheduled, p.placement.terminating) {
                (_, true) => format!("{} is terminating", p.name),
                (Some(why), _) => format!("{} is not scheduled: {why}", p.name),
                _ => format!("{} is not Ready", p.name),
            },
        )
        .collect();
    if here.is_empty() {
        format!("no {} pod runs there", component.name())
    } else {
        here.join(", ")
    }
}

fn coverage(component: Component, seen: &Seen, names: &[&str], plan: &mut Plan) -> Vec<String> {
    let pods: Vec<&PodFacts> = seen
        .pods
        .iter()
        .filter(|p| {
            p.owner
                .as_ref()
                .is_some_and(|(k, n)| *k == Kind::DaemonSet && names.contains(&n.as_str()))
        })
        .map(|p| p.as_ref())
        .collect();
    let consequence = match component {
        Component::Ztunnel => "their traffic has no node proxy: connections from and to them fail",
        Component::Cni => "new ambient pods scheduled there are not added to the mesh",
    };
    let mut uncovered = Vec::new();
    for (node, ambient) in &seen.ambient_nodes {
        let ready = pods.iter().any(|p| {
            p.placement.node.as_deref() == Some(node.as_str())
                && p.placement.ready
                && !p.placement.terminating
        });
        if !ready {
            uncovered.push((node, ambient));
        }
    }
    for (node, ambient) in uncovered.iter().take(MAX_NODES) {
        plan.findings.push(Finding {
            reason: reasons::DATA_PLANE_NOT_READY,
            object: format!("Node/{node}"),
            message: format!(
                "runs {} ambient pod(s) ({} first) without a Ready {} pod ({}): {consequence}",
                ambient.count,
                ambient.first,
                component.name(),
                not_ready_detail(component, node, &pods)
            ),
        });
    }
    if uncovered.len() > MAX_NODES {
        let rest: Vec<&str> = uncovered[MAX_NODES..]
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        plan.findings.push(Finding {
            reason: reasons::DATA_PLANE_NOT_READY,
            object: format!("Node/{} and {} more", rest[0], rest.len() - 1),
            message: format!(
                "{} more nodes run ambient pods without a Ready {} pod: {}",
                rest.len(),
                component.name(),
                rest.join(", ")
            ),
        });
    }
    uncovered.into_iter().map(|(n, _)| n.clone()).collect()
}

/// Runs `checks` against what was seen.
pub fn plan(checks: &[AmbientCheck], seen: &Seen) -> Plan {
    let mut plan = Plan::default();
    let on = |c: AmbientCheck| checks.contains(&c);
    let ns = &seen.namespace;
    let mut uncovered_nodes = std::collections::BTreeSet::new();
    for component in Component::ALL {
        let mine: Vec<&(String, Arc<DataPlaneFacts>)> = seen
            .daemonsets
            .iter()
            .filter(|(_, f)| f.component == Some(component))
            .collect();
        if mine.is_empty() {
            plan.findings.push(Finding {
                reason: reasons::DATA_PLANE_COMPONENT_MISSING,
                object: object(ns, component.name()),
                message: format!(
                    "no DaemonSet labelled {}={} in {ns}: {}",
                    super::facts::NAME_LABEL,
                    component.name(),
                    match component {
                        Component::Ztunnel => "ambient pods have no node proxy (install Istio's ztunnel chart)",
                        Component::Cni => "new ambient pods are not added to the mesh (install Istio's cni chart with profile=ambient)",
                    }
                ),
            });
            continue;
        }
        for (name, f) in &mine {
            plan.targets += 1;
            let mut wrong = 0;
            if on(AmbientCheck::Posture) {
                let lacks = posture(component, f);
                if !lacks.is_empty() {
                    wrong += 1;
                    plan.findings.push(Finding {
                        reason: reasons::DATA_PLANE_POSTURE_DRIFT,
                        object: object(ns, name),
                        message: format!(
                            "{} lacks the production settings of Istio's chart: {}",
                            component.name(),
                            lacks.join("; ")
                        ),
                    });
                }
            }
            if on(AmbientCheck::Versions)
                && let Some(message) = version(component, f, &seen.revisions)
            {
                wrong += 1;
                plan.findings.push(Finding {
                    reason: reasons::DATA_PLANE_VERSION_SKEW,
                    object: object(ns, name),
                    message,
                });
            }
            if wrong == 0 {
                plan.compliant += 1;
            }
            plan.holds.push(format!(
                "{} {} ({}/{} Ready)",
                object(ns, name),
                f.version,
                f.ready,
                f.desired
            ));
        }
        if on(AmbientCheck::NodeCoverage) {
            let names: Vec<&str> = mine.iter().map(|(n, _)| n.as_str()).collect();
            uncovered_nodes.extend(coverage(component, seen, &names, &mut plan));
        }
    }
    if on(AmbientCheck::NodeCoverage) {
        plan.targets += seen.ambient_nodes.len();
        plan.compliant += seen
            .ambient_nodes
            .len()
            .saturating_sub(uncovered_nodes.len());
        plan.holds.push(format!(
            "{} node(s) run ambient pods, each with a Ready ztunnel and istio-cni",
            seen.ambient_nodes.len()
        ));
    }
    plan
}

/// The section's report: every finding a violation (reported only: the section never writes).
pub fn report(checks: &[AmbientCheck], seen: &Seen, plan: &Plan) -> RuleReport {
    let ctype = types::AMBIENT_DATA_PLANE;
    let violations: Vec<Violation> = plan
        .findings
        .iter()
        .map(|f| Violation {
            rule: ctype.to_string(),
            object: f.object.clone(),
            message: f.message.clone(),
            action: ViolationAction::Reported,
        })
        .collect();
    let checked: Vec<String> = checks.iter().map(|c| format!("{c:?}")).collect();
    let condition = if seen.daemonsets.is_empty() {
        Observed::new(
            ctype,
            Status::False,
            reasons::NO_TARGETS,
            format!(
                "no ztunnel or istio-cni DaemonSet (label app.kubernetes.io/name) in {}: ambient is not installed there; set ambient.namespace to where Istio's ztunnel and cni charts are installed",
                seen.namespace
            ),
        )
    } else if let Some(worst) = SEVERITY
        .iter()
        .find_map(|r| plan.findings.iter().find(|f| f.reason == *r))
    {
        Observed::new(
            ctype,
            Status::False,
            worst.reason,
            format!(
                "{}: {} ({} finding(s); see status.violations). The section only reports",
                worst.object,
                worst.message,
                plan.findings.len()
            ),
        )
    } else {
        Observed::new(
            ctype,
            Status::True,
            reasons::COMPLIANT,
            format!(
                "{}; checks {} hold",
                plan.holds.join(", "),
                checked.join(", ")
            ),
        )
    };
    RuleReport {
        violations,
        targets: i32::try_from(plan.targets).unwrap_or(i32::MAX),
        compliant: i32::try_from(plan.compliant).unwrap_or(i32::MAX),
        ..RuleReport::new(condition)
    }
}
