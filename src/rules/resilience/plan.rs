//! The section's whole decision, pure: for every Service of the covered namespaces, the
//! DestinationRule its clients get ([`super::resolve`]) with the mesh's
//! `defaultTrafficPolicy` under it, against the declared minimums; the findings aggregated
//! into one violation per namespace (counts and the first names), so that thousands of
//! namespaces make at most thousands of lines in memory and fifty in status.
//!
//! Clients are looked at from three places: any namespace without a rule of its own for the
//! host (most clients), the Service's own namespace, and every covered namespace holding a
//! rule of its own for the host (a client-namespace rule wins over the Service's).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::by_namespace::ByNamespace;
use super::resolve::{Blocks, Index, Rule, Tier, Traffic, qualify};
use super::{drain, routes};
use crate::api::{Requirement, ResilienceSpec, Violation};
use crate::status::RuleReport;
use crate::status::conditions::{Observed, Status, types};
use crate::status::reasons::{self, ViolationAction};

/// Services named per namespace in a violation; the rest are counted.
pub const NAMED: usize = 5;

/// The Istio version from which istiod applies `meshConfig.defaultTrafficPolicy`.
pub const DEFAULT_TRAFFIC_POLICY_SINCE: (u32, u32) = (1, 31);

/// What the section reads of the mesh config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mesh {
    /// Istio's root namespace.
    pub root: String,
    /// `meshConfig.defaultTrafficPolicy`, when set.
    pub default_traffic: Option<Traffic>,
    /// `meshConfig.defaultDestinationRuleExportTo` is `["."]`.
    pub default_private: bool,
    /// Every running istiod is at least [`DEFAULT_TRAFFIC_POLICY_SINCE`].
    pub default_traffic_supported: bool,
    /// The drain settings of the mesh's `defaultConfig`.
    pub default_drain: crate::istio::drain::Drain,
    /// `meshConfig.defaultVirtualServiceExportTo` is `["~"]`.
    pub default_vs_hidden: bool,
}

/// Reads `defaultTrafficPolicy` and `defaultDestinationRuleExportTo` of a `mesh` document.
pub fn mesh_settings(mesh: &str) -> Result<(Option<Traffic>, bool), String> {
    let v: serde_json::Value = serde_yaml::from_str(mesh).map_err(|e| e.to_string())?;
    Ok(traffic_settings(&v))
}

/// Reads the drain settings of a `mesh` document's `defaultConfig`, and whether its
/// `defaultVirtualServiceExportTo` is `["~"]`.
pub fn proxy_settings(mesh: &str) -> Result<(crate::istio::drain::Drain, bool), String> {
    let v: serde_json::Value = serde_yaml::from_str(mesh).map_err(|e| e.to_string())?;
    let drain = v
        .get("defaultConfig")
        .map(crate::istio::drain::Drain::read)
        .unwrap_or_default();
    let hidden = v
        .get("defaultVirtualServiceExportTo")
        .and_then(|e| e.as_array())
        .is_some_and(|e| e.iter().any(|e| e == "~"));
    Ok((drain, hidden))
}

fn traffic_settings(v: &serde_json::Value) -> (Option<Traffic>, bool) {
    let traffic = v
        .get("defaultTrafficPolicy")
        .filter(|t| !t.is_null())
        .map(super::cache::traffic);
    let private = v
        .get("defaultDestinationRuleExportTo")
        .and_then(|e| e.as_array())
        .is_some_and(|e| e.len() == 1 && e[0] == ".");
    (traffic, private)
}

/// Where the clients of a finding are.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Clients {
    /// Namespaces without a rule of their own for the host.
    Elsewhere,
    /// The Service's own namespace.
    Own,
    /// A namespace with a rule of its own for the host.
    In(String),
}

/// One Service whose clients (from one place) get less than the minimums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    pub service: String,
    pub clients: Clients,
    /// `None`: no DestinationRule applies.
    pub rule: Option<(Tier, Vec<String>)>,
    /// The minimums it lacks (field names).
    pub missing: Vec<&'static str>,
    /// Root namespace rules whose blocks this rule does not carry, and those blocks.
    pub shadowed: Option<(Vec<String>, Blocks)>,
}

/// The findings of one namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceFindings {
    pub services: usize,
    /// Services with at least one gap here (a Service of this namespace, or one whose
    /// clients here have a rule of their own).
    pub failing: usize,
    /// Services of this namespace with at least one gap, wherever it is reported: their sum
    /// over the namespaces counts every failing Service once.
    pub failing_own: usize,
    /// The Service judged last that was counted in `failing` (its place in the plan's
    /// order): a Service's gaps come together, so it is counted once.
    last_failing: Option<usize>,
    /// The first [`NAMED`] gaps in words ([`describe`]), the ones a violation names (5,000
    /// failing Services do not keep 5,000 gaps in memory for five lines).
    pub gaps: Vec<String>,
    /// Every gap, named or not.
    pub gap_count: usize,
    /// Mesh routes of the namespace's VirtualServices (when `routeTimeouts` is required).
    pub routes: routes::Findings,
    /// The namespace's workloads with a sidecar (when `drainWithinGracePeriod` is required).
    pub drains: drain::Findings,
}

impl NamespaceFindings {
    /// Whether anything is reported for the namespace.
    pub fn failed(&self) -> bool {
        !self.gaps.is_empty() || self.routes.without_timeout > 0 || !self.drains.gaps.is_empty()
    }
}

/// Adds the route findings of the covered namespaces' VirtualServices to `plan`.
pub fn add_routes(
    plan: &mut Plan,
    mesh: &Mesh,
    virtual_services: &[((String, String), Arc<routes::Routes>)],
    covered: &dyn Fn(&str) -> bool,
) {
    for ((ns, name), r) in virtual_services.iter().filter(|((ns, _), _)| covered(ns)) {
        plan.entry(ns.clone())
            .or_default()
            .routes
            .add(name, r, mesh.default_vs_hidden);
    }
}

/// Every namespace's findings, by namespace.
pub type Plan = BTreeMap<String, NamespaceFindings>;

/// Judges the Services `services` (namespace, name) of the covered namespaces (`covered`)
/// against `spec`.
pub fn plan<'a>(
    spec: &ResilienceSpec,
    mesh: &Mesh,
    rules: &[Arc<Rule>],
    services: impl IntoIterator<Item = &'a (String, String)>,
    covered: &dyn Fn(&str) -> bool,
) -> Plan {
    // The index of the namespaces a Service's judgement reads, built per namespace.
    let by_namespace = ByNamespace::new(rules, &mesh.root, mesh.default_private);
    let mut here: Option<(String, Index)> = None;
    // Covered namespaces with a rule of their own: (host, namespace) sorted, and those with
    // wildcard hosts (a sorted vector: one entry per rule, where a map of sets allocates a
    // node per host).
    let mut own_rules: Vec<(String, &str)> = Vec::new();
    let mut wildcards: BTreeSet<&str> = BTreeSet::new();
    for r in rules
        .iter()
        .filter(|r| covered(&r.namespace) && r.namespace != mesh.root)
    {
        let host = qualify(&r.host, &r.namespace);
        if host.starts_with('*') {
            wildcards.insert(r.namespace.as_str());
        } else {
            own_rules.push((host, r.namespace.as_str()));
        }
    }
    own_rules.sort_unstable();
    own_rules.dedup();
    let own = |host: &str| {
        let from = own_rules.partition_point(|(h, _)| h.as_str() < host);
        let to = own_rules.partition_point(|(h, _)| h.as_str() <= host);
        own_rules[from..to].iter().map(|(_, ns)| *ns)
    };
    let mut out = Plan::new();
    for (i, (ns, name)) in services
        .into_iter()
        .filter(|(ns, _)| covered(ns))
        .enumerate()
    {
        let host = qualify(name, ns);
        let mut places = vec![(Clients::Elsewhere, ""), (Clients::Own, ns.as_str())];
        let others = own(&host).chain(wildcards.iter().copied());
        let others: BTreeSet<&str> = others.filter(|c| *c != ns.as_str()).collect();
        for c in &others {
            places.push((Clients::In(c.to_string()), c));
        }
        // Most Services are judged from their own namespace and the root's: one index per
        // namespace; one with the client namespaces too for the others.
        if here.as_ref().is_none_or(|(n, _)| n != ns) {
            here = Some((ns.clone(), by_namespace.index(&[ns.as_str()])));
        }
        let wide;
        let index = match here.as_ref() {
            Some((_, index)) if others.is_empty() => index,
            _ => {
                let names: Vec<&str> = others.iter().copied().chain([ns.as_str()]).collect();
                wide = by_namespace.index(&names);
                &wide
            }
        };
        let entry = out.entry(ns.clone()).or_default();
        entry.services += 1;
        // What clients elsewhere get is often what the Service's own namespace gets: said once.
        let mut said: Vec<Gap> = Vec::new();
        for (clients, client_ns) in places {
            let Some(gap) = judge(spec, mesh, index, client_ns, &host, ns, name, clients) else {
                continue;
            };
            let key = |g: &Gap| {
                (
                    g.rule.as_ref().map(|r| r.1.clone()),
                    g.missing.clone(),
                    g.shadowed.clone(),
                )
            };
            let same = |g: &Gap| key(g) == key(&gap);
            if said.iter().any(same) {
                continue;
            }
            said.push(gap.clone());
            let at = match &gap.clients {
                Clients::In(c) => c.clone(),
                _ => ns.clone(),
            };
            let findings = out.entry(at).or_default();
            if findings.last_failing != Some(i) {
                findings.last_failing = Some(i);
                findings.failing += 1;
            }
            findings.gap_count += 1;
            if findings.gaps.len() < NAMED {
                findings.gaps.reserve_exact(1);
                findings.gaps.push(describe(&gap));
            }
        }
        if !said.is_empty() {
            out.entry(ns.clone()).or_default().failing_own += 1;
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn judge(
    spec: &ResilienceSpec,
    mesh: &Mesh,
    index: &Index,
    client: &str,
    host: &str,
    service_ns: &str,
    name: &str,
    clients: Clients,
) -> Option<Gap> {
    let applied = index.for_workload(client, &BTreeMap::new(), host, service_ns);
    let own = applied
        .as_ref()
        .and_then(|a| a.rule.policy)
        .unwrap_or_default();
    let effective = match mesh.default_traffic {
        Some(d) if mesh.default_traffic_supported => own.with_mesh_default(d),
        _ => own,
    };
    let mut missing = Vec::new();
    if spec.outlier_detection == Requirement::Required
        && !effective.blocks.contains(Blocks::OUTLIER_DETECTION)
    {
        missing.push("outlierDetection");
    }
    if spec.connection_pool_limits == Requirement::Required && !effective.pool_limits {
        missing.push("connectionPool limits");
    }
    // Root settings the rule does not carry, unless the mesh default makes up for them.
    let shadowed = applied
        .as_ref()
        .and_then(|a| a.shadowed(index, client, host))
        .map(|(root, lost)| (root, lost.without(effective.blocks)))
        .filter(|(_, lost)| !lost.is_empty());
    if missing.is_empty() && shadowed.is_none() {
        return None;
    }
    Some(Gap {
        service: format!("{service_ns}/{name}"),
        clients,
        rule: applied.map(|a| (a.tier, a.rule.names())),
        missing,
        shadowed,
    })
}

/// One gap in words: `reviews (clients in shop): DestinationRule shop/r (the client's
/// namespace) lacks outlierDetection; it shadows connectionPool of istio-system/default`.
pub fn describe(g: &Gap) -> String {
    let service = g.service.rsplit('/').next().unwrap_or(&g.service);
    let clients = match &g.clients {
        Clients::Elsewhere => String::new(),
        Clients::Own => " (clients in its namespace)".to_string(),
        Clients::In(c) => format!(" (clients in {c}, calling {})", g.service),
    };
    let rule = match &g.rule {
        None => "no DestinationRule applies".to_string(),
        Some((tier, names)) => format!(
            "DestinationRule {} ({})",
            names.join(" + "),
            tier.describe()
        ),
    };
    let mut parts = Vec::new();
    if !g.missing.is_empty() {
        parts.push(format!("{rule} lacks {}", g.missing.join(" and ")));
    }
    if let Some((root, blocks)) = &g.shadowed {
        let subject = if parts.is_empty() {
            rule.clone()
        } else {
            "it".to_string()
        };
        parts.push(format!(
            "{subject} shadows {} of {} (DestinationRules do not inherit across hosts)",
            blocks.names().join(", "),
            root.join(" + ")
        ));
    }
    format!("{service}{clients}: {}", parts.join("; "))
}

/// What to set so that every Service gets the minimums without a rule each.
pub fn advice(spec: &ResilienceSpec, mesh: &Mesh) -> String {
    let mut values = Vec::new();
    if spec.outlier_detection == Requirement::Required {
        values.push(
            "outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}",
        );
    }
    if spec.connection_pool_limits == Requirement::Required {
        values
            .push("connectionPool: {tcp: {maxConnections: 1024}, http: {http2MaxRequests: 1024}}");
    }
    if mesh.default_traffic_supported && !values.is_empty() {
        format!(
            "istiod applies meshConfig.defaultTrafficPolicy under every DestinationRule (Istio 1.31 and later), host-specific ones included; for example, in the istiod chart's values: meshConfig: {{defaultTrafficPolicy: {{{}}}}}",
            values.join(", ")
        )
    } else {
        format!(
            "add the settings to each DestinationRule that applies (a host-specific rule takes nothing from {}'s *.local rule); from Istio 1.31 on, meshConfig.defaultTrafficPolicy sets them for every host at once",
            mesh.root
        )
    }
}

/// The section's report. Takes the plan: each namespace's findings are dropped once its
/// violation is written, so that findings and violations are not both held whole.
pub fn report(spec: &ResilienceSpec, mesh: &Mesh, plan: Plan) -> RuleReport {
    let ctype = types::RESILIENCE;
    let services: usize = plan.values().map(|f| f.services).sum();
    let failing: usize = plan.values().map(|f| f.failing_own).sum();
    let routes: usize = plan.values().map(|f| f.routes.judged).sum();
    let untimed: usize = plan.values().map(|f| f.routes.without_timeout).sum();
    let workloads: usize = plan.values().map(|f| f.drains.judged).sum();
    let draining: usize = plan.values().map(|f| f.drains.gaps.len()).sum();
    let mut violations = Vec::new();
    for (ns, f) in plan.into_iter().filter(|(_, f)| f.failed()) {
        let mut parts = Vec::new();
        if !f.gaps.is_empty() {
            parts.push(format!(
                "{} finding(s) for {} Service(s): {}{}",
                f.gap_count,
                f.failing,
                f.gaps.join("; "),
                more(f.gap_count)
            ));
        }
        parts.extend(f.routes.describe());
        if !f.drains.gaps.is_empty() {
            let first: Vec<String> = f
                .drains
                .gaps
                .iter()
                .take(NAMED)
                .map(drain::describe)
                .collect();
            parts.push(format!(
                "{} workload(s) whose proxy drain reaches the grace period: {}{}",
                f.drains.gaps.len(),
                first.join("; "),
                more(f.drains.gaps.len())
            ));
        }
        violations.push(Violation {
            rule: ctype.to_string(),
            object: format!("Namespace/{ns}"),
            message: parts.join("; "),
            action: ViolationAction::Reported,
        });
    }
    let condition = if services + routes + workloads == 0 {
        Observed::new(
            ctype,
            Status::False,
            reasons::NO_TARGETS,
            "no Service in the namespaces resilience.namespaceSelector selects",
        )
    } else if violations.is_empty() {
        let mut said = vec![format!(
            "every one of {services} Service(s) gets the minimums from the DestinationRule that applies to its clients{}",
            if mesh.default_traffic.is_some() && mesh.default_traffic_supported {
                " or from meshConfig.defaultTrafficPolicy"
            } else {
                ""
            }
        )];
        if spec.route_timeouts == Requirement::Required {
            said.push(format!(
                "every one of {routes} mesh HTTP route(s) sets a timeout"
            ));
        }
        if spec.drain_within_grace_period == Requirement::Required {
            said.push(format!(
                "every one of {workloads} workload(s) with a sidecar drains within its grace period"
            ));
        }
        Observed::new(ctype, Status::True, reasons::COMPLIANT, said.join("; "))
    } else {
        let mut said = Vec::new();
        if failing > 0 {
            said.push(format!(
                "{failing} of {services} Service(s) lack the minimums or shadow root settings for some clients ({})",
                advice(spec, mesh)
            ));
        }
        if untimed > 0 {
            said.push(format!(
                "{untimed} of {routes} mesh HTTP route(s) set no timeout (istiod sets none: a slow backend holds its callers as long as they wait; set http[].timeout)"
            ));
        }
        if draining > 0 {
            said.push(format!(
                "{draining} of {workloads} workload(s) with a sidecar drain until or beyond their grace period (give terminationGracePeriodSeconds more than the drain, or a shorter terminationDrainDuration in proxy.istio.io/config)"
            ));
        }
        Observed::new(
            ctype,
            Status::False,
            reasons::MINIMUMS_NOT_MET,
            format!(
                "{} namespace(s) with findings (see the violations, one per namespace): {}",
                violations.len(),
                said.join("; ")
            ),
        )
    };
    RuleReport {
        violations,
        targets: i32::try_from(services).unwrap_or(i32::MAX),
        compliant: i32::try_from(services.saturating_sub(failing)).unwrap_or(i32::MAX),
        ..RuleReport::new(condition)
    }
}

/// `; and N more` past the first [`NAMED`].
fn more(n: usize) -> String {
    match n.saturating_sub(NAMED) {
        0 => String::new(),
        m => format!("; and {m} more"),
    }
}
