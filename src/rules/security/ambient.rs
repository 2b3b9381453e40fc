//! Ambient namespaces whose AuthorizationPolicies need a waypoint, pure. In ambient mode
//! ztunnel enforces the policies that apply to workloads (by `selector`, or namespace-wide)
//! with their L4 attributes only; what it does with the rest is in [`Ztunnel`]. Such a policy
//! is enforced as written only by a waypoint it targets (`targetRefs` to the waypoint's
//! Gateway, or to a Service or ServiceEntry that uses one).

use std::collections::BTreeSet;

use super::policy::{PolicyFacts, Ztunnel};
use crate::api::Violation;
use crate::status::reasons::ViolationAction;

/// How many policies a violation names.
pub const NAMED: usize = 3;

/// A selected namespace as the section reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceFacts {
    pub name: String,
    /// Labelled `istio.io/dataplane-mode=ambient`.
    pub ambient: bool,
    /// Its `istio.io/use-waypoint` label.
    pub use_waypoint: Option<String>,
}

/// An ambient namespace with policies ztunnel does not enforce as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Misplaced {
    pub namespace: String,
    /// The waypoint it has, as found: its `istio.io/use-waypoint` label, or a waypoint
    /// Deployment istiod runs there.
    pub waypoint: Option<String>,
    /// How many policies.
    pub count: usize,
    /// The first [`NAMED`], by name, with what ztunnel does with them.
    pub first: Vec<(String, Ztunnel)>,
}

/// The ambient namespaces of `namespaces` whose own policies (`policies`: namespace, name,
/// facts; sorted by namespace and name) need a waypoint; `waypoints`: the namespaces where
/// istiod runs a waypoint.
pub fn misplaced<'a>(
    namespaces: &[NamespaceFacts],
    policies: impl Iterator<Item = (&'a str, &'a str, &'a PolicyFacts)>,
    waypoints: &BTreeSet<String>,
) -> Vec<Misplaced> {
    let ambient: std::collections::BTreeMap<&str, &NamespaceFacts> = namespaces
        .iter()
        .filter(|n| n.ambient)
        .map(|n| (n.name.as_str(), n))
        .collect();
    let mut out: Vec<Misplaced> = Vec::new();
    for (ns, name, p) in policies {
        let (Some(facts), Some(z)) = (ambient.get(ns), &p.ztunnel) else {
            continue;
        };
        if out.last().is_none_or(|m| m.namespace != ns) {
            let waypoint = match (&facts.use_waypoint, waypoints.contains(ns)) {
                (Some(w), _) => Some(format!("istio.io/use-waypoint: {w}")),
                (None, true) => Some("a waypoint Deployment runs here".to_string()),
                (None, false) => None,
            };
            out.push(Misplaced {
                namespace: ns.to_string(),
                waypoint,
                count: 0,
                first: Vec::new(),
            });
        }
        if let Some(m) = out.last_mut() {
            m.count += 1;
            if m.first.len() < NAMED {
                m.first.push((name.to_string(), z.clone()));
            }
        }
    }
    out
}

/// The violation of one namespace.
pub fn violation(rule: &str, m: &Misplaced) -> Violation {
    let named: Vec<String> = m
        .first
        .iter()
        .map(|(n, z)| format!("{n}: {}", z.describe()))
        .collect();
    let more = if m.count > m.first.len() { "; …" } else { "" };
    let fix = match &m.waypoint {
        Some(w) => format!(
            "it has a waypoint ({w}): have these policies target it (targetRefs to its Gateway, or to the Services that use it) instead of selecting workloads"
        ),
        None => "it has no waypoint: deploy one (istioctl waypoint apply --enroll-namespace) and have these policies target it with targetRefs, or keep to L4 attributes".to_string(),
    };
    Violation {
        rule: rule.to_string(),
        object: format!("AuthorizationPolicies/{}", m.namespace),
        message: format!(
            "ambient namespace: {} AuthorizationPolicy(ies) apply to workloads with what ztunnel does not enforce ({}{more}); {fix}",
            m.count,
            named.join("; "),
        ),
        action: ViolationAction::Reported,
    }
}
