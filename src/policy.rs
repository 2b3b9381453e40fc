//! Pure policy logic: effective enforcement of a section, and resolution of policies that set
//! the same rule for the same targets to different values (the older policy wins; nothing
//! flip-flops because age never changes).

use crate::api::{Enforcement, MeshPolicy, MeshPolicySpec};
use kube::ResourceExt;

/// Effective enforcement of a section: its own override, else the policy default.
pub fn effective(spec: &MeshPolicySpec, section: Option<Enforcement>) -> Enforcement {
    section.unwrap_or(spec.enforcement)
}

/// A rule of this policy that another, older policy sets differently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// Field path of the rule in this policy, e.g. `controlPlane.replicas`.
    pub field: String,
    /// Name of the older policy that wins.
    pub winner: String,
}

/// Orders policies by age: older first; same second broken by name.
fn is_older(a: &MeshPolicy, b: &MeshPolicy) -> bool {
    let ka = (
        a.metadata.creation_timestamp.as_ref().map(|t| t.0),
        a.name_any(),
    );
    let kb = (
        b.metadata.creation_timestamp.as_ref().map(|t| t.0),
        b.name_any(),
    );
    ka < kb
}

/// Returns the spec this policy may enforce, with every rule that an older policy sets to a
/// different value for the same target removed, and the list of those conflicts.
pub fn resolve(policy: &MeshPolicy, all: &[&MeshPolicy]) -> (MeshPolicySpec, Vec<Conflict>) {
    let mut spec = policy.spec.clone();
    let mut conflicts = Vec::new();
    let mut older: Vec<&MeshPolicy> = all
        .iter()
        .copied()
        .filter(|o| o.name_any() != policy.name_any() && is_older(o, policy))
        .collect();
    older.sort_by(|a, b| {
        if is_older(a, b) {
            std::cmp::Ordering::Less
        } else {
            std::cmp::Ordering::Greater
        }
    });

    for other in older {
        let winner = other.name_any();
        let mut note = |field: String| {
            if !conflicts.iter().any(|c: &Conflict| c.field == field) {
                conflicts.push(Conflict {
                    field,
                    winner: winner.clone(),
                });
            }
        };

        if let (Some(mine), Some(theirs)) = (spec.control_plane.as_mut(), &other.spec.control_plane)
            && mine.namespace == theirs.namespace
        {
            drop_if_differs(
                &mut mine.replicas,
                &theirs.replicas,
                "controlPlane.replicas",
                &mut note,
            );
            drop_if_differs(
                &mut mine.disruption_budget,
                &theirs.disruption_budget,
                "controlPlane.disruptionBudget",
                &mut note,
            );
            drop_if_differs(
                &mut mine.spread,
                &theirs.spread,
                "controlPlane.spread",
                &mut note,
            );
            drop_if_differs(
                &mut mine.resources,
                &theirs.resources,
                "controlPlane.resources",
                &mut note,
            );
        }

        for gw in spec.gateways.iter_mut() {
            for theirs in other
                .spec
                .gateways
                .iter()
                .filter(|t| t.namespace == gw.namespace && t.selector == gw.selector)
            {
                let at = |f: &str| format!("gateways[{}].{f}", gw.name);
                let (r, b, s, res) = (
                    at("replicas"),
                    at("disruptionBudget"),
                    at("spread"),
                    at("resources"),
                );
                drop_if_differs(&mut gw.replicas, &theirs.replicas, &r, &mut note);
                drop_if_differs(
                    &mut gw.disruption_budget,
                    &theirs.disruption_budget,
                    &b,
                    &mut note,
                );
                drop_if_differs(&mut gw.spread, &theirs.spread, &s, &mut note);
                drop_if_differs(&mut gw.resources, &theirs.resources, &res, &mut note);
            }
        }

        // One class's defaults: a class both declare differently stays with the older policy.
        if let (Some(mine), Some(theirs)) = (spec.gateway_api.as_mut(), &other.spec.gateway_api) {
            let class = |c: &crate::api::GatewayClassSpec| format!("classes[{}]", c.class_name);
            drop_entries_that_differ(&mut mine.classes, &theirs.classes, class, &mut note);
            // One Gateway selected by name: likewise.
            let gateway =
                |g: &crate::api::GatewayRefSpec| format!("gateways[{}/{}]", g.namespace, g.name);
            drop_entries_that_differ(&mut mine.gateways, &theirs.gateways, gateway, &mut note);
        }

        if let (Some(mine), Some(theirs)) = (&spec.sidecars, &other.spec.sidecars)
            && mine.namespace_selector == theirs.namespace_selector
            && (mine.resources != theirs.resources
                || mine.max_concurrent_rollouts != theirs.max_concurrent_rollouts
                || mine.pacing != theirs.pacing)
        {
            note("sidecars".to_string());
            spec.sidecars = None;
        }

        if let (Some(mine), Some(theirs)) = (&spec.mtls, &other.spec.mtls)
            && mine.scope == theirs.scope
            && mine.root_namespace == theirs.root_namespace
            && mine.namespace_selector == theirs.namespace_selector
            && (mine.mode != theirs.mode
                || mine.exemptions != theirs.exemptions
                || mine.force != theirs.force)
        {
            note("mtls".to_string());
            spec.mtls = None;
        }

        // Mesh-wide: two policies that set it differently conflict.
        if let (Some(mine), Some(theirs)) = (&spec.upgrades, &other.spec.upgrades)
            && mine != theirs
        {
            note("upgrades".to_string());
            spec.upgrades = None;
        }
    }
    (spec, conflicts)
}

fn drop_if_differs<T: PartialEq>(
    mine: &mut Option<T>,
    theirs: &Option<T>,
    field: &str,
    note: &mut impl FnMut(String),
) {
    if let (Some(m), Some(t)) = (mine.as_ref(), theirs.as_ref())
        && m != t
    {
        note(field.to_string());
        *mine = None;
    }
}

/// Drops the entries of `mine` that `theirs` declares differently (the same `key`, under
/// `gatewayApi.`), noting each.
fn drop_entries_that_differ<T: PartialEq>(
    mine: &mut Vec<T>,
    theirs: &[T],
    key: impl Fn(&T) -> String,
    note: &mut impl FnMut(String),
) {
    mine.retain(|m| {
        let differs = theirs.iter().any(|t| key(t) == key(m) && t != m);
        if differs {
            note(format!("gatewayApi.{}", key(m)));
        }
        !differs
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn policy(name: &str, created: i64, yaml: &str) -> MeshPolicy {
        let mut p = MeshPolicy::new(name, serde_yaml::from_str(yaml).unwrap());
        p.metadata.creation_timestamp = Some(Time(jiff::Timestamp::from_second(created).unwrap()));
        p
    }

    #[test]
    fn section_override_beats_default() {
        let p = policy(
            "a",
            1,
            "enforcement: Enforce\ncontrolPlane: {enforcement: Audit}",
        );
        let cp = p.spec.control_plane.as_ref().unwrap();
        assert_eq!(effective(&p.spec, cp.enforcement), Enforcement::Audit);
        assert_eq!(effective(&p.spec, None), Enforcement::Enforce);
    }

    #[test]
    fn default_enforcement_is_audit() {
        let p = policy("a", 1, "{}");
        assert_eq!(p.spec.enforcement, Enforcement::Audit);
    }

    #[test]
    fn older_policy_wins_only_the_differing_rule() {
        let old = policy(
            "old",
            1,
            "controlPlane: {replicas: {min: 2}, spread: {nodes: Required}}",
        );
        let new = policy(
            "new",
            2,
            "controlPlane: {replicas: {min: 3}, spread: {nodes: Required}, resources: {requests: {cpu: 1}}}",
        );
        let (spec, conflicts) = resolve(&new, &[&old, &new]);
        let cp = spec.control_plane.unwrap();
        assert!(cp.replicas.is_none(), "the newer replicas rule yields");
        assert!(cp.spread.is_some(), "equal values are no conflict");
        assert!(cp.resources.is_some(), "a rule only the newer sets stays");
        assert_eq!(
            conflicts,
            vec![Conflict {
                field: "controlPlane.replicas".into(),
                winner: "old".into()
            }]
        );
        // The older policy sees no conflict: it wins.
        let (old_spec, old_conflicts) = resolve(&old, &[&old, &new]);
        assert!(old_conflicts.is_empty());
        assert_eq!(old_spec, old.spec);
    }

    #[test]
    fn different_targets_do_not_conflict() {
        let old = policy("old", 1, "controlPlane: {namespace: a, replicas: {min: 2}}");
        let new = policy("new", 2, "controlPlane: {namespace: b, replicas: {min: 3}}");
        assert!(resolve(&new, &[&old, &new]).1.is_empty());
    }

    #[test]
    fn same_age_is_broken_by_name() {
        let a = policy("a", 5, "mtls: {mode: STRICT}");
        let b = policy("b", 5, "mtls: {mode: PERMISSIVE}");
        assert!(resolve(&a, &[&a, &b]).1.is_empty());
        let (spec, conflicts) = resolve(&b, &[&a, &b]);
        assert!(spec.mtls.is_none());
        assert_eq!(conflicts[0].winner, "a");
    }

    #[test]
    fn gateway_entries_conflict_by_namespace_and_selector() {
        let old = policy(
            "old",
            1,
            "gateways: [{name: in, namespace: gw, selector: {matchLabels: {istio: ingressgateway}}, replicas: {min: 2}}]",
        );
        let new = policy(
            "new",
            2,
            "gateways: [{name: x, namespace: gw, selector: {matchLabels: {istio: ingressgateway}}, replicas: {min: 4}}, {name: y, namespace: gw, selector: {matchLabels: {istio: egressgateway}}, replicas: {min: 4}}]",
        );
        let (spec, conflicts) = resolve(&new, &[&old, &new]);
        assert!(spec.gateways[0].replicas.is_none());
        assert!(spec.gateways[1].replicas.is_some());
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].field, "gateways[x].replicas");
    }

    #[test]
    fn gateway_api_classes_and_gateways_conflict_by_key() {
        let old = policy(
            "old",
            1,
            "gatewayApi: {classes: [{className: istio, replicas: {min: 2}}], gateways: [{name: public, namespace: edge, replicas: {min: 2}}]}",
        );
        let new = policy(
            "new",
            2,
            "gatewayApi: {classes: [{className: istio, replicas: {min: 3}}, {className: istio-waypoint, replicas: {min: 2}}], gateways: [{name: public, namespace: edge, replicas: {min: 3}}, {name: public, namespace: other}]}",
        );
        let (spec, conflicts) = resolve(&new, &[&old, &new]);
        let section = spec.gateway_api.unwrap();
        assert_eq!(section.classes.len(), 1);
        assert_eq!(section.classes[0].class_name, "istio-waypoint");
        assert_eq!(section.gateways.len(), 1);
        assert_eq!(section.gateways[0].namespace, "other");
        let fields: Vec<&str> = conflicts.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "gatewayApi.classes[istio]",
                "gatewayApi.gateways[edge/public]"
            ]
        );
        assert!(conflicts.iter().all(|c| c.winner == "old"));
        let (_, none) = resolve(&old, &[&old, &new]);
        assert!(none.is_empty(), "the older policy keeps its entries");
    }
}
