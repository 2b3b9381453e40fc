//! Which DestinationRule applies to a client's traffic to a host, as istiod decides it, pure.
//!
//! istiod indexes DestinationRules once per push (`PushContext.setDestinationRules`,
//! `pilot/pkg/model/push_context.go`) and looks them up per client namespace and host
//! (`PushContext.destinationRule`, same file; `SidecarScope.DestinationRule`,
//! `pilot/pkg/model/sidecar.go`). [`Index`] follows those steps:
//!
//! - rules are taken in order: those with a `workloadSelector` first, then by creation time,
//!   name and namespace (`sortConfigBySelectorAndCreationTime`);
//! - a short `host` is qualified with the rule's namespace (`reviews` in `shop` is
//!   `reviews.shop.svc.cluster.local`; `ResolveShortnameToFQDN`, `pilot/pkg/model/config.go`);
//! - a rule is visible to clients of its own namespace unless its `exportTo` leaves that
//!   namespace out; it is exported to other namespaces unless it is private (`exportTo: ["."]`
//!   or only its own namespace, or no `exportTo` while the mesh's
//!   `defaultDestinationRuleExportTo` is `.`); a rule with a `workloadSelector` is private;
//! - rules of one namespace for the same host are merged (`mergeDestinationRule`,
//!   `pilot/pkg/model/destination_rule.go`) when their `exportTo` sets are equal and their
//!   selectors agree: subsets are concatenated and only the first top-level `trafficPolicy`
//!   counts (the oldest rule's); nothing is inherited between different hosts, so
//!   `reviews.shop.svc.cluster.local` in `shop` takes nothing from `*.local` in the root
//!   namespace (the `*.local` settings it lacks are shadowed, see [`Applied::shadowed`]);
//! - a lookup takes the most specific host that matches (exact first, then the longest
//!   wildcard; `MostSpecificHostMatch`) in the first of: the client's namespace (any rule
//!   visible there; a client in the root namespace reads the root namespace's private rules),
//!   the service's namespace (rules exported to the client), the root namespace (rules
//!   exported to the client);
//! - of the rules found, a workload gets the one whose selector matches its labels, otherwise
//!   the last one without a selector, otherwise none: the lookup does not go on to the next
//!   namespace ([`Index::for_workload`]).
//!
//! Gateway API backend policies synthesise rules istiod merges underneath (user fields win);
//! they are not objects in the API server and are not modelled. Port-level settings and
//! subsets are not modelled: the minimums concern the top-level `trafficPolicy`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// The Kubernetes domain suffix istiod qualifies short hosts with (its `DOMAIN_SUFFIX`
/// default).
pub const DOMAIN: &str = "cluster.local";

/// The blocks of a `trafficPolicy` that istiod takes or leaves whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Blocks(u8);

impl Blocks {
    pub const NONE: Blocks = Blocks(0);
    pub const CONNECTION_POOL: Blocks = Blocks(1);
    pub const OUTLIER_DETECTION: Blocks = Blocks(2);
    pub const LOAD_BALANCER: Blocks = Blocks(4);
    pub const TLS: Blocks = Blocks(8);
    const NAMES: [(Blocks, &'static str); 4] = [
        (Blocks::CONNECTION_POOL, "connectionPool"),
        (Blocks::OUTLIER_DETECTION, "outlierDetection"),
        (Blocks::LOAD_BALANCER, "loadBalancer"),
        (Blocks::TLS, "tls"),
    ];

    pub fn contains(self, other: Blocks) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: Blocks) -> Blocks {
        Blocks(self.0 | other.0)
    }

    /// The blocks of `self` that `other` lacks.
    pub fn without(self, other: Blocks) -> Blocks {
        Blocks(self.0 & !other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The field names of the blocks, in `trafficPolicy` order.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(b, _)| self.contains(*b))
            .map(|(_, n)| *n)
            .collect()
    }
}

/// What a top-level `trafficPolicy` sets, as far as the section judges it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Traffic {
    pub blocks: Blocks,
    /// `connectionPool` sets a limit (`tcp.maxConnections`, `http.http1MaxPendingRequests`,
    /// `http.http2MaxRequests`, `http.maxRequestsPerConnection`, `http.maxConcurrentStreams`).
    pub pool_limits: bool,
}

impl Traffic {
    /// `self`, with the blocks it lacks taken from the mesh's `defaultTrafficPolicy`
    /// (`applyDefaultTrafficPolicy`, `pilot/pkg/networking/core/cluster_traffic_policy.go`:
    /// `connectionPool` and `outlierDetection` only, each whole).
    pub fn with_mesh_default(self, mesh: Traffic) -> Traffic {
        let fill = Blocks::CONNECTION_POOL.union(Blocks::OUTLIER_DETECTION);
        let taken = mesh.blocks.without(self.blocks).0 & fill.0;
        let taken = Blocks(taken);
        Traffic {
            blocks: self.blocks.union(taken),
            pool_limits: if taken.contains(Blocks::CONNECTION_POOL) {
                mesh.pool_limits
            } else {
                self.pool_limits
            },
        }
    }
}

/// A DestinationRule, reduced to what the resolution and the minimums read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rule {
    pub namespace: String,
    pub name: String,
    /// `spec.host` as written.
    pub host: String,
    /// `spec.exportTo` as written.
    pub export_to: Vec<String>,
    /// `spec.workloadSelector.matchLabels`, when it has a selector.
    pub selector: Option<BTreeMap<String, String>>,
    /// `metadata.creationTimestamp`, seconds.
    pub created: i64,
    /// The top-level `spec.trafficPolicy`, when set.
    pub policy: Option<Traffic>,
}

impl Rule {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `host` as istiod reads it in a rule of `namespace`.
pub fn qualify(host: &str, namespace: &str) -> String {
    if host == "*" || host.contains('.') || host.contains(':') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.{DOMAIN}")
    }
}

/// The rules of one namespace merged for one host (istiod's `ConsolidatedDestRule`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consolidated {
    /// The rules merged in, the one whose `trafficPolicy` and `exportTo` were kept first.
    pub rules: Vec<Arc<Rule>>,
    export_to: BTreeSet<String>,
    selector: Option<BTreeMap<String, String>>,
    /// The merged top-level policy: the first rule's that sets one.
    pub policy: Option<Traffic>,
}

impl Consolidated {
    fn new(rule: Arc<Rule>, export_to: BTreeSet<String>) -> Self {
        Consolidated {
            policy: rule.policy,
            selector: rule.selector.clone(),
            rules: vec![rule],
            export_to,
        }
    }

    /// Whether it is exported to clients of `client` (no `exportTo`, `*`, or naming it).
    fn exported_to(&self, client: &str) -> bool {
        self.export_to.is_empty() || self.export_to.contains("*") || self.export_to.contains(client)
    }

    /// The merged rules, `ns/name` each.
    pub fn names(&self) -> Vec<String> {
        self.rules.iter().map(|r| r.key()).collect()
    }
}

/// The rules of one index of one namespace, by host, each list sorted by host (a namespace
/// usually holds one or two: vectors, not hash maps, which allocate room for several).
#[derive(Clone, Debug, Default)]
pub(super) struct Hosts {
    specific: Vec<(String, Vec<Consolidated>)>,
    wildcard: Vec<(String, Vec<Consolidated>)>,
}

/// [`Hosts`] while one namespace's rules are merged into it.
#[derive(Default)]
pub(super) struct HostsBuilder {
    specific: HashMap<String, Vec<Consolidated>>,
    wildcard: HashMap<String, Vec<Consolidated>>,
}

impl HostsBuilder {
    /// `mergeDestinationRule` with `ENABLE_ENHANCED_DESTINATIONRULE_MERGE` (istiod's default).
    fn merge(&mut self, host: &str, rule: &Arc<Rule>, export_to: &BTreeSet<String>) {
        let map = if host.starts_with('*') {
            &mut self.wildcard
        } else {
            &mut self.specific
        };
        // Most hosts have one rule: a list sized to it, not grown to four entries.
        let list = map
            .entry(host.to_string())
            .or_insert_with(|| Vec::with_capacity(1));
        let mut separately = true;
        for c in list.iter_mut() {
            if *export_to == c.export_to {
                separately = false;
            } else if !c.export_to.is_empty() && export_to.is_superset(&c.export_to) {
                separately = true;
            } else {
                separately = true;
                continue;
            }
            let both_without = rule.selector.is_none() && c.selector.is_none();
            let both_with = rule.selector.is_some() && c.selector.is_some();
            if both_with && rule.selector != c.selector {
                separately = true;
                continue;
            }
            if both_without || both_with {
                separately = false;
            }
            c.rules.push(rule.clone());
            if c.policy.is_none() {
                c.policy = rule.policy;
            }
        }
        if separately {
            list.push(Consolidated::new(rule.clone(), export_to.clone()));
        }
    }

    pub(super) fn finish(self) -> Hosts {
        let sorted = |map: HashMap<String, Vec<Consolidated>>| {
            let mut v: Vec<(String, Vec<Consolidated>)> = map.into_iter().collect();
            v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            v
        };
        Hosts {
            specific: sorted(self.specific),
            wildcard: sorted(self.wildcard),
        }
    }
}

/// The entry of `host` in a list sorted by host.
fn by_host<'a>(
    list: &'a [(String, Vec<Consolidated>)],
    host: &str,
) -> Option<&'a (String, Vec<Consolidated>)> {
    list.binary_search_by(|(h, _)| h.as_str().cmp(host))
        .ok()
        .map(|i| &list[i])
}

impl Hosts {
    /// `MostSpecificHostMatch`: the exact host, else the longest matching wildcard.
    fn most_specific(&self, needle: &str) -> Option<(&str, &[Consolidated])> {
        fn found((h, v): &(String, Vec<Consolidated>)) -> (&str, &[Consolidated]) {
            (h.as_str(), v.as_slice())
        }
        if !needle.starts_with('*')
            && let Some(e) = by_host(&self.specific, needle)
        {
            return Some(found(e));
        }
        if let Some(e) = by_host(&self.wildcard, needle) {
            return Some(found(e));
        }
        let bare = needle.strip_prefix('*').unwrap_or(needle);
        self.wildcard
            .iter()
            .filter(|(h, _)| bare.ends_with(&h[1..]))
            .min_by(|(a, _), (b, _)| more_specific_first(a, b))
            .map(found)
    }
}

/// istiod's `host.MoreSpecific` as an ordering: longer first, then alphabetically.
fn more_specific_first(a: &str, b: &str) -> std::cmp::Ordering {
    b.len().cmp(&a.len()).then_with(|| a.cmp(b))
}

/// Where the rule that applies was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// The client's own namespace.
    ClientNamespace,
    /// The service's namespace, exported to the client.
    ServiceNamespace,
    /// Istio's root namespace, exported to the client.
    RootNamespace,
}

impl Tier {
    pub fn describe(self) -> &'static str {
        match self {
            Tier::ClientNamespace => "the client's namespace",
            Tier::ServiceNamespace => "the service's namespace",
            Tier::RootNamespace => "the root namespace",
        }
    }
}

/// The rules a lookup found: where, for which rule host, and the merged rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found<'a> {
    pub tier: Tier,
    pub namespace: &'a str,
    /// The rule host that matched (`*.local`, `reviews.shop.svc.cluster.local`).
    pub host: &'a str,
    pub rules: Vec<&'a Consolidated>,
}

/// The rule a workload's traffic to a host gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied<'a> {
    pub tier: Tier,
    pub namespace: &'a str,
    pub host: &'a str,
    pub rule: &'a Consolidated,
}

/// DestinationRules indexed as istiod indexes them in one push.
#[derive(Clone, Debug, Default)]
pub struct Index {
    root: String,
    /// By namespace, sorted: the rules of each namespace with rules (shared with the
    /// indexes of other namespaces built from the same rules, [`super::by_namespace`]).
    namespaces: Vec<(String, Arc<Scoped>)>,
    /// The root namespace's private rules.
    root_local: Arc<Hosts>,
}

/// One namespace's rules, as its own clients and as other namespaces' clients see them.
#[derive(Clone, Debug, Default)]
pub(super) struct Scoped {
    /// Every rule visible to its own clients.
    local: Hosts,
    /// The rules exported beyond it.
    exported: Exported,
}

#[derive(Clone, Debug, Default)]
pub(super) enum Exported {
    /// The same as the local ones: every rule of the namespace is visible to its own clients
    /// and exported (most namespaces; built and held once).
    #[default]
    Local,
    Own(Hosts),
}

/// Where a rule of namespace `ns` is visible: its `exportTo` as istiod reads it, whether its
/// own namespace's clients see it, and whether it is private (not exported).
fn visibility(rule: &Rule, default_private: bool) -> (BTreeSet<String>, bool, bool) {
    let ns = rule.namespace.as_str();
    let export_to: BTreeSet<String> = match rule.selector {
        Some(_) => [".".to_string()].into(),
        None => rule.export_to.iter().cloned().collect(),
    };
    let local = export_to.is_empty()
        || export_to.contains("*")
        || export_to.contains(".")
        || export_to.contains(ns);
    let private = (export_to.is_empty() && default_private)
        || (export_to.len() == 1 && (export_to.contains(".") || export_to.contains(ns)));
    (export_to, local, private)
}

/// `rules` in istiod's order (those with a selector first, then by creation time, name and
/// namespace), grouped by namespace (a stable sort keeps that order within each).
pub(super) fn istiod_order<'a>(
    rules: impl IntoIterator<Item = &'a Arc<Rule>>,
) -> Vec<&'a Arc<Rule>> {
    let mut rules: Vec<&Arc<Rule>> = rules.into_iter().collect();
    rules.sort_by(|a, b| {
        b.selector
            .is_some()
            .cmp(&a.selector.is_some())
            .then(a.created.cmp(&b.created))
            .then_with(|| a.name.cmp(&b.name))
            .then_with(|| a.namespace.cmp(&b.namespace))
    });
    rules.sort_by(|a, b| a.namespace.cmp(&b.namespace));
    rules
}

/// The rules of one namespace (`group`, in istiod's order) as its clients and others see them;
/// the root namespace's private ones also go to `root_local`.
pub(super) fn scoped(
    group: &[&Arc<Rule>],
    root: &str,
    default_private: bool,
    root_local: &mut HostsBuilder,
) -> Scoped {
    let Some(first) = group.first() else {
        return Scoped::default();
    };
    let ns = first.namespace.as_str();
    let same = group.iter().all(|r| {
        let (_, local, private) = visibility(r, default_private);
        local && !private
    });
    let (mut local, mut exported) = (HostsBuilder::default(), HostsBuilder::default());
    for rule in group {
        let host = qualify(&rule.host, ns);
        let (export_to, visible, private) = visibility(rule, default_private);
        if visible {
            local.merge(&host, rule, &export_to);
        }
        if same {
            continue;
        }
        if !private {
            exported.merge(&host, rule, &export_to);
        } else if ns == root {
            root_local.merge(&host, rule, &export_to);
        }
    }
    Scoped {
        local: local.finish(),
        exported: if same {
            Exported::Local
        } else {
            Exported::Own(exported.finish())
        },
    }
}

impl Index {
    /// Indexes `rules` with Istio's root namespace `root`. `default_private`: the mesh's
    /// `defaultDestinationRuleExportTo` is `["."]` (rules without `exportTo` are private).
    pub fn build<'a>(
        rules: impl IntoIterator<Item = &'a Arc<Rule>>,
        root: &str,
        default_private: bool,
    ) -> Index {
        let rules = istiod_order(rules);
        let mut root_local = HostsBuilder::default();
        let namespaces = rules
            .chunk_by(|a, b| a.namespace == b.namespace)
            .map(|group| {
                let s = scoped(group, root, default_private, &mut root_local);
                (group[0].namespace.clone(), Arc::new(s))
            })
            .collect();
        Index::of(root, namespaces, Arc::new(root_local.finish()))
    }

    /// An index of the namespaces' rules given (sorted by namespace), with the root
    /// namespace's private rules.
    pub(super) fn of(
        root: &str,
        namespaces: Vec<(String, Arc<Scoped>)>,
        root_local: Arc<Hosts>,
    ) -> Index {
        Index {
            root: root.to_string(),
            namespaces,
            root_local,
        }
    }

    /// The rules of namespace `ns`, with its name as the index holds it.
    fn namespace(&self, ns: &str) -> Option<(&str, &Scoped)> {
        let i = self
            .namespaces
            .binary_search_by(|(n, _)| n.as_str().cmp(ns))
            .ok()?;
        let (n, s) = &self.namespaces[i];
        Some((n.as_str(), s))
    }

    /// The rules namespace `ns` exports.
    fn exported(&self, ns: &str) -> Option<(&str, &Hosts)> {
        let (n, s) = self.namespace(ns)?;
        Some(match &s.exported {
            Exported::Local => (n, &s.local),
            Exported::Own(h) => (n, h),
        })
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    /// The rules found for clients in `client` calling `host` (a Service of `service_ns`):
    /// istiod's `PushContext.destinationRule`.
    pub fn lookup<'a>(
        &'a self,
        client: &str,
        host: &str,
        service_ns: &'a str,
    ) -> Option<Found<'a>> {
        let local = if client == self.root {
            Some((self.root_local.as_ref(), self.root.as_str()))
        } else {
            self.namespace(client).map(|(n, s)| (&s.local, n))
        };
        if let Some((hosts, ns)) = local
            && let Some((h, list)) = hosts.most_specific(host)
        {
            return Some(Found {
                tier: Tier::ClientNamespace,
                namespace: ns,
                host: h,
                rules: list.iter().collect(),
            });
        }
        [
            (Tier::ServiceNamespace, service_ns),
            (Tier::RootNamespace, self.root.as_str()),
        ]
        .into_iter()
        .find_map(|(tier, ns)| {
            let (ns, hosts) = self.exported(ns)?;
            let (h, list) = hosts.most_specific(host)?;
            let rules: Vec<&Consolidated> = list.iter().filter(|c| c.exported_to(client)).collect();
            (!rules.is_empty()).then_some(Found {
                tier,
                namespace: ns,
                host: h,
                rules,
            })
        })
    }

    /// The rule a workload of `client` with `labels` gets for `host`
    /// (`SidecarScope.DestinationRule`): the one whose selector matches, else the last one
    /// without a selector; `None` when none applies.
    pub fn for_workload<'a>(
        &'a self,
        client: &str,
        labels: &BTreeMap<String, String>,
        host: &str,
        service_ns: &'a str,
    ) -> Option<Applied<'a>> {
        let found = self.lookup(client, host, service_ns)?;
        let mut catch_all = None;
        for c in &found.rules {
            match &c.selector {
                None => catch_all = Some(*c),
                Some(sel) if c.rules[0].namespace == client => {
                    if sel.iter().all(|(k, v)| labels.get(k) == Some(v)) {
                        return Some(found.applied(c));
                    }
                }
                Some(_) => {}
            }
        }
        catch_all.map(|c| found.applied(c))
    }

    /// The root namespace's rule exported to `client` for `host` that a rule found elsewhere
    /// shadows (what a client would get there if the other rule did not exist).
    pub fn root_rule<'a>(&'a self, client: &str, host: &str) -> Option<&'a Consolidated> {
        let (_, hosts) = self.exported(&self.root)?;
        let (_, list) = hosts.most_specific(host)?;
        list.iter()
            .rev()
            .find(|c| c.selector.is_none() && c.exported_to(client))
    }
}

impl<'a> Found<'a> {
    fn applied(&self, rule: &'a Consolidated) -> Applied<'a> {
        Applied {
            tier: self.tier,
            namespace: self.namespace,
            host: self.host,
            rule,
        }
    }
}

impl Applied<'_> {
    /// The blocks of the root namespace's rule for the same host that this one does not
    /// carry and so does not get (DestinationRules do not inherit across hosts).
    pub fn shadowed(
        &self,
        index: &Index,
        client: &str,
        host: &str,
    ) -> Option<(Vec<String>, Blocks)> {
        if self.tier == Tier::RootNamespace || self.namespace == index.root() {
            return None;
        }
        let root = index.root_rule(client, host)?;
        let root_blocks = root.policy.map(|p| p.blocks).unwrap_or_default();
        let own = self.rule.policy.map(|p| p.blocks).unwrap_or_default();
        let lost = root_blocks.without(own);
        (!lost.is_empty()).then(|| (root.names(), lost))
    }
}
