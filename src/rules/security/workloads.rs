//! Default deny per workload, pure: which workloads of a namespace no AuthorizationPolicy
//! makes deny by default. Istio: "if any allow policies apply to a workload, access to that
//! workload is denied by default, unless explicitly allowed by the rule in the policy". An
//! ALLOW policy applies to the workloads its `selector` selects in its namespace (every one
//! without a selector), in every namespace when it is in the root namespace; a policy with
//! `targetRef(s)` applies to gateways, waypoints or Services instead; CUSTOM and AUDIT decide
//! nothing by default. An ALLOW policy with an empty rule allows every request, so it is no
//! default deny; a DENY with an empty rule denies everything.

use std::sync::Arc;

use super::policy::PolicyFacts;
use crate::rules::gateway_api::plan::CLASS_LABEL;
use crate::rules::sidecars::WorkloadFacts;

/// How many uncovered workloads a violation names.
pub const NAMED: usize = 5;

/// A namespace's workloads against its policies and the root namespace's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Its Deployments, StatefulSets and DaemonSets, but the gateways and waypoints istiod
    /// deploys (a policy reaches those by `targetRefs`).
    pub workloads: usize,
    /// Those no policy makes deny by default.
    pub uncovered: usize,
    /// The first [`NAMED`] of them, `Kind/name`, sorted.
    pub first: Vec<String>,
}

/// Whether `policy` makes `workload` deny by default (`policy` is of its namespace or the
/// root namespace).
fn covers(policy: &PolicyFacts, workload: &WorkloadFacts) -> bool {
    policy.denies_by_default
        && policy.selector.as_ref().is_some_and(|s| {
            s.iter()
                .all(|(k, v)| workload.pod_labels.get(k.as_str()) == Some(v))
        })
}

/// The coverage of `workloads` by `policies` (those of their namespace and of the root).
pub fn coverage<'a>(
    workloads: impl Iterator<Item = &'a Arc<WorkloadFacts>>,
    policies: impl Iterator<Item = &'a PolicyFacts> + Clone,
) -> Coverage {
    let mut out = Coverage::default();
    let mut open = Vec::new();
    for w in workloads {
        if w.labels.get(CLASS_LABEL).is_some() {
            continue;
        }
        out.workloads += 1;
        if !policies.clone().any(|p| covers(p, w)) {
            open.push(format!("{}/{}", w.kind.as_str(), w.name));
        }
    }
    open.sort();
    out.uncovered = open.len();
    open.truncate(NAMED);
    out.first = open;
    out
}

impl Coverage {
    /// The uncovered workloads in a violation's words.
    pub fn describe(&self) -> String {
        if self.workloads == 0 {
            return "it has no workload yet".to_string();
        }
        if self.uncovered == 0 {
            return format!(
                "every one of its {} workload(s) is selected by an ALLOW or deny-all policy, but a workload created later would not be",
                self.workloads
            );
        }
        format!(
            "{} of its {} workload(s) are selected by no ALLOW or deny-all policy ({}{})",
            self.uncovered,
            self.workloads,
            self.first.join(", "),
            if self.uncovered > self.first.len() {
                ", …"
            } else {
                ""
            }
        )
    }
}

/// Whether a workload's change (`None`: absent before, or deleted) can change what this
/// section decides: it came or went, or its pods' labels (the policies' selectors) or its
/// Gateway class (a gateway or waypoint is not counted; a waypoint is) changed. Its spec's
/// other fields and its status do not.
pub fn reads_changed(before: Option<&WorkloadFacts>, after: Option<&WorkloadFacts>) -> bool {
    match (before, after) {
        (None, None) => false,
        (Some(b), Some(a)) => {
            b.pod_labels != a.pod_labels || b.labels.get(CLASS_LABEL) != a.labels.get(CLASS_LABEL)
        }
        _ => true,
    }
}
