//! What the section keeps of an AuthorizationPolicy, decided on arrival from its spec: whether
//! it is a namespace-wide default deny ([`Authz`]), which workloads it makes deny by default,
//! and what ztunnel does with it in an ambient namespace ([`Ztunnel`]).
//!
//! The ambient rules follow istiod's translation for ztunnel
//! (`pilot/pkg/serviceregistry/ambient/authorization.go`, `convertAuthorizationPolicy` and
//! `handleRule`): a policy with `targetRef(s)` is not sent to ztunnel (a waypoint or gateway
//! enforces it); CUSTOM and AUDIT are not supported; the HTTP attributes are dropped, an ALLOW
//! rule with one never matches, and a DENY is enforced without them (or not at all when no
//! rule keeps an L4 match).

use std::collections::BTreeMap;

use serde_json::Value;

use super::cache::AuthorizationPolicy;

/// How an AuthorizationPolicy denies by default for a whole namespace, if it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authz {
    /// `spec: {}`: ALLOW with no rule, for every workload of its namespace (of the mesh in
    /// the root namespace): nothing is allowed but what other ALLOW policies allow.
    AllowNothing,
    /// DENY with an empty rule (`rules: [{}]`), for every workload: nothing is allowed at all.
    DenyAll,
    /// Anything else (scoped to workloads, or with rules).
    Other,
}

/// What ztunnel does with a policy that applies to ambient workloads and uses what it cannot
/// enforce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ztunnel {
    /// CUSTOM or AUDIT: ztunnel ignores the policy.
    Unsupported(String),
    /// ALLOW with HTTP attributes (named as istiod names them): those rules never match, so
    /// it allows less than written.
    AllowsLess(Vec<String>),
    /// DENY with HTTP attributes, enforced without them: it denies more than written.
    DeniesMore(Vec<String>),
    /// DENY whose every rule needs an HTTP attribute: no effect at ztunnel.
    NoEffect(Vec<String>),
}

impl Ztunnel {
    /// Why the policy needs a waypoint, in a violation's words.
    pub fn describe(&self) -> String {
        match self {
            Ztunnel::Unsupported(action) => {
                format!("{action} is not supported by ztunnel: not enforced")
            }
            Ztunnel::AllowsLess(http) => format!(
                "HTTP attributes ({}): ztunnel drops the ALLOW rules that use them, so it allows less than written",
                http.join(", ")
            ),
            Ztunnel::DeniesMore(http) => format!(
                "HTTP attributes ({}): ztunnel enforces the DENY without them, so it denies more than written",
                http.join(", ")
            ),
            Ztunnel::NoEffect(http) => format!(
                "HTTP attributes ({}): no DENY rule is left for ztunnel, so it has no effect",
                http.join(", ")
            ),
        }
    }
}

/// An AuthorizationPolicy as the section keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyFacts {
    pub kind: Authz,
    /// The pod labels of the workloads it applies to (empty: every workload of its namespace,
    /// or of the mesh in the root namespace); `None` with `targetRef(s)`: it applies to
    /// gateways, waypoints or Services, not to workloads.
    pub selector: Option<BTreeMap<String, String>>,
    /// The workloads it applies to are denied by default: an ALLOW policy that does not allow
    /// every request (no empty rule), or a DENY with an empty rule.
    pub denies_by_default: bool,
    /// What ztunnel does with it, when that is not what it says (`None` with `targetRef(s)`).
    pub ztunnel: Option<Ztunnel>,
}

/// istiod's names of the HTTP attributes ztunnel does not enforce, per part of a rule.
const HTTP_OPERATION: [&str; 6] = [
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];
const HTTP_SOURCE: [&str; 4] = [
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "requestPrincipals",
    "notRequestPrincipals",
];
/// The L4 fields ztunnel keeps.
const L4_OPERATION: [&str; 2] = ["ports", "notPorts"];
const L4_SOURCE: [&str; 8] = [
    "ipBlocks",
    "notIpBlocks",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "principals",
    "notPrincipals",
];
/// The `when` keys ztunnel keeps; any other is an HTTP attribute.
const L4_WHEN: [&str; 5] = [
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

fn non_empty(v: Option<&Value>) -> bool {
    v.and_then(Value::as_array).is_some_and(|a| !a.is_empty())
}

fn list<'a>(rule: &'a Value, key: &str, inner: &'a str) -> Vec<Option<&'a Value>> {
    rule.get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| e.get(inner))
        .collect()
}

/// The HTTP attributes of `rule`, and whether ztunnel keeps a match of it after dropping
/// them (an empty rule matches everything; a part of it whose matches are all left empty
/// matches nothing, `hasEffectiveRules`).
fn http_of(rule: &Value, found: &mut Vec<String>) -> bool {
    let mut effective = true;
    let mut part = |entries: Vec<Option<&Value>>, http: &[&str], l4: &[&str]| {
        if entries.is_empty() {
            return;
        }
        let mut kept = false;
        for e in entries {
            found.extend(
                http.iter()
                    .filter(|k| non_empty(e.and_then(|e| e.get(**k))))
                    .map(|k| k.to_string()),
            );
            kept |= l4.iter().any(|k| non_empty(e.and_then(|e| e.get(*k))));
        }
        effective &= kept;
    };
    part(
        list(rule, "to", "operation"),
        &HTTP_OPERATION,
        &L4_OPERATION,
    );
    part(list(rule, "from", "source"), &HTTP_SOURCE, &L4_SOURCE);
    for when in rule
        .get("when")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = when.get("key").and_then(Value::as_str).unwrap_or_default();
        if L4_WHEN.contains(&key) {
            effective &= non_empty(when.get("values")) || non_empty(when.get("notValues"));
        } else {
            found.push(key.to_string());
            effective = false;
        }
    }
    effective
}

/// Reduces an AuthorizationPolicy to the section's facts.
pub fn reduce(p: &AuthorizationPolicy) -> PolicyFacts {
    let s = &p.spec;
    let targeted = s.target_ref.is_some() || !s.target_refs.is_empty();
    let labels = s
        .selector
        .as_ref()
        .map(|w| w.match_labels.clone())
        .unwrap_or_default();
    let everyone = labels.is_empty() && !targeted;
    let action = s.action.as_deref().unwrap_or("ALLOW");
    let rules = s.rules.as_deref().unwrap_or_default();
    let empty_rule = |r: &Value| r.as_object().is_some_and(|o| o.is_empty());
    let kind = match (everyone, action) {
        (true, "ALLOW") if rules.is_empty() => Authz::AllowNothing,
        (true, "DENY") if rules.iter().any(empty_rule) => Authz::DenyAll,
        _ => Authz::Other,
    };
    let denies_by_default = match action {
        "ALLOW" => !rules.iter().any(empty_rule),
        "DENY" => rules.iter().any(empty_rule),
        _ => false,
    };
    let ztunnel = (!targeted).then(|| ztunnel(action, rules)).flatten();
    PolicyFacts {
        kind,
        selector: (!targeted).then_some(labels),
        denies_by_default,
        ztunnel,
    }
}

fn ztunnel(action: &str, rules: &[Value]) -> Option<Ztunnel> {
    if action != "ALLOW" && action != "DENY" {
        return Some(Ztunnel::Unsupported(action.to_string()));
    }
    let mut http = Vec::new();
    let mut effective = false;
    for rule in rules {
        effective |= http_of(rule, &mut http);
    }
    if http.is_empty() {
        return None;
    }
    http.sort();
    http.dedup();
    Some(match action {
        "ALLOW" => Ztunnel::AllowsLess(http),
        _ if effective => Ztunnel::DeniesMore(http),
        _ => Ztunnel::NoEffect(http),
    })
}
