//! The pure planner: every write and deviation of the `mtls` section.

use super::*;

/// Whether removing an object with this spec can only weaken what Istio enforces: its mode
/// and every port-level mode are STRICT, so what it falls back to is never stricter.
fn only_strict(spec: &PeerAuthenticationSpec) -> bool {
    Strength::parse(spec.mtls.as_ref().and_then(|m| m.mode.as_deref())) == Some(Strength::Strict)
        && spec
            .port_level_mtls
            .values()
            .all(|m| Strength::parse(m.mode.as_deref()) == Some(Strength::Strict))
}

/// The ownerReference an object meshwarden creates carries: the policy's, only when the
/// object is [`only_strict`]. The garbage collector removes owned objects with the policy (in
/// any order), so an object that lets plain text in (an exemption, a scope held at PERMISSIVE,
/// a PERMISSIVE scope) is never owned: deleting the policy must never make a namespace
/// stricter for a client that had access.
fn owner_for<'o>(
    owner: Option<&'o OwnerReference>,
    spec: &PeerAuthenticationSpec,
) -> Option<&'o OwnerReference> {
    owner.filter(|_| only_strict(spec))
}

/// The full object meshwarden owns (labels, owner when [`owner_for`] says so, spec). An
/// ownerReference meshwarden stops sending is removed by server-side apply.
fn own_patch(
    ns: &str,
    name: &str,
    policy: &str,
    owner: Option<&OwnerReference>,
    spec: &PeerAuthenticationSpec,
) -> Value {
    let owner_refs: Vec<Value> = owner_for(owner, spec)
        .iter()
        .map(|o| serde_json::to_value(o).unwrap_or(Value::Null))
        .collect();
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {MANAGED_BY.0: MANAGED_BY.1, POLICY_LABEL: policy},
            "ownerReferences": owner_refs,
        },
        "spec": serde_json::to_value(spec).unwrap_or(Value::Null),
    })
}

fn normalised_ports(spec: &PeerAuthenticationSpec) -> BTreeMap<String, Option<Strength>> {
    spec.port_level_mtls
        .iter()
        .map(|(k, v)| (k.clone(), Strength::parse(v.mode.as_deref())))
        .collect()
}

/// Whether an object meshwarden created already matches what it would write.
fn own_object_matches(
    pa: &PeerAuthentication,
    policy: &str,
    owner: Option<&OwnerReference>,
    want: &PeerAuthenticationSpec,
) -> bool {
    let has = |o: &OwnerReference| pa.owner_references().iter().any(|r| r.uid == o.uid);
    let owner_ok = match owner_for(owner, want) {
        Some(o) => has(o),
        None => owner.is_none_or(|o| !has(o)),
    };
    is_ours(&pa.metadata, policy)
        && owner_ok
        && selector_labels(pa)
            == want
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone())
                .unwrap_or_default()
        && pa_mode(pa) == Strength::parse(want.mtls.as_ref().and_then(|m| m.mode.as_deref()))
        && normalised_ports(&pa.spec) == normalised_ports(want)
}

fn mode_spec(mode: Strength) -> Option<PeerMtls> {
    Some(PeerMtls {
        mode: Some(mode.as_str().to_string()),
    })
}

fn in_namespace<'x>(
    pas: &'x [PeerAuthentication],
    ns: &'x str,
) -> impl Iterator<Item = &'x PeerAuthentication> {
    pas.iter()
        .filter(move |p| p.namespace().as_deref() == Some(ns))
}

/// One namespace-wide slot: the mesh (root namespace), a selected namespace, or a namespace
/// exemption.
struct Slot<'a> {
    namespace: &'a str,
    declared: Strength,
    /// Name of the object meshwarden creates when the user has none.
    name: String,
    /// What the slot is, for messages.
    what: String,
}

struct Planner<'a> {
    input: &'a Input<'a>,
    plan: Plan,
    /// (namespace, name) of every object meshwarden wants to exist.
    desired: BTreeSet<(String, String)>,
    /// (namespace, name) of objects handled as slots (not scanned as overrides).
    handled: BTreeSet<(String, String)>,
    /// meshwarden's own objects that Istio ignores (an older namespace-wide object exists).
    shadowed: BTreeSet<(String, String)>,
    hold: bool,
}

impl Planner<'_> {
    /// Holds one namespace-wide slot at its mode: corrects the user's own selector-less
    /// object in place (the oldest, the one Istio uses), else renders meshwarden's.
    fn slot(&mut self, slot: Slot<'_>) {
        let policy = self.input.policy;
        let ns = slot.namespace;
        // Every namespace-wide object of the namespace, oldest first: Istio applies the oldest.
        // This policy's own objects of other names are stale (deleted by `stale`).
        let mine =
            |p: &PeerAuthentication| is_ours(&p.metadata, policy) && p.name_any() == slot.name;
        let mut wide: Vec<&PeerAuthentication> = in_namespace(self.input.peer_auths, ns)
            .filter(|p| is_namespace_wide(p) && (!is_ours(&p.metadata, policy) || mine(p)))
            .collect();
        wide.sort_by_key(|p| {
            (
                p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                p.name_any(),
            )
        });
        // Never weaken a scope that is already STRICT, hold it at PERMISSIVE otherwise.
        let hold = self.hold;
        let target_mode = |observed: Option<Strength>| {
            if hold && slot.declared == Strength::Strict && observed != Some(Strength::Strict) {
                Strength::Permissive
            } else {
                slot.declared
            }
        };
        let held_note = |mode: Strength| {
            if mode < slot.declared {
                format!(", held at {} (see below)", mode.as_str())
            } else {
                String::new()
            }
        };
        let ours_applies = wide.first().is_some_and(|p| mine(p));
        let first = wide.first().copied().filter(|_| !ours_applies);
        if let Some(first) = first {
            let name = first.name_any();
            let id = pa_id(ns, &name);
            self.handled.insert((ns.to_string(), name.clone()));
            let observed = pa_mode(first);
            let want = target_mode(observed);
            if observed != Some(want) {
                let path = ["f:spec", "f:mtls", "f:mode"];
                self.plan.findings.push(Finding {
                    object: id.clone(),
                    message: format!(
                        "{}: namespace-wide mode is {}, declared {}{}",
                        slot.what,
                        shown(observed),
                        slot.declared.as_str(),
                        held_note(want)
                    ),
                    fix: Some(Fix::Apply {
                        namespace: ns.to_string(),
                        name: name.clone(),
                        patch: json!({
                            "apiVersion": API_VERSION,
                            "kind": KIND,
                            "metadata": {"name": name, "namespace": ns},
                            "spec": {"mtls": {"mode": want.as_str()}},
                        }),
                        takeovers: takeovers_of(&first.metadata, &id, &path, "spec.mtls.mode"),
                    }),
                    held: want < slot.declared,
                    target: true,
                    reason: None,
                });
            } else if want < slot.declared {
                self.plan.findings.push(Finding {
                    object: id,
                    message: format!(
                        "{}: namespace-wide mode is {}, declared {}{}",
                        slot.what,
                        shown(observed),
                        slot.declared.as_str(),
                        held_note(want)
                    ),
                    fix: None,
                    held: true,
                    target: true,
                    reason: None,
                });
            } else {
                self.already_strict(&slot, &id);
            }
            // Our own object, if newer, is ignored by Istio: `stale` deletes it.
            let others: Vec<&PeerAuthentication> =
                wide.iter().skip(1).filter(|p| !mine(p)).copied().collect();
            if let Some(own) = wide.iter().find(|p| mine(p)) {
                self.shadowed.insert((ns.to_string(), own.name_any()));
            }
            self.ignored(ns, &name, &others);
            return;
        }

        let name = slot.name.clone();
        let id = pa_id(ns, &name);
        self.desired.insert((ns.to_string(), name.clone()));
        self.handled.insert((ns.to_string(), name.clone()));
        if ours_applies {
            let others: Vec<&PeerAuthentication> = wide.iter().skip(1).copied().collect();
            self.ignored(ns, &name, &others);
        }
        let existing = in_namespace(self.input.peer_auths, ns).find(|p| p.name_any() == name);
        let observed = existing.and_then(pa_mode);
        let want = target_mode(observed);
        let spec = PeerAuthenticationSpec {
            selector: None,
            mtls: mode_spec(want),
            port_level_mtls: BTreeMap::new(),
        };
        let owner = self.input.owner.as_ref();
        let matches = existing.is_some_and(|p| own_object_matches(p, policy, owner, &spec));
        if !matches {
            let message = match existing {
                None => format!(
                    "{}: no namespace-wide PeerAuthentication; declared {}{}",
                    slot.what,
                    slot.declared.as_str(),
                    held_note(want)
                ),
                Some(_) => format!(
                    "{}: mode is {}, declared {}{}",
                    slot.what,
                    shown(observed),
                    slot.declared.as_str(),
                    held_note(want)
                ),
            };
            self.plan.findings.push(Finding {
                object: id,
                message,
                fix: Some(Fix::Apply {
                    namespace: ns.to_string(),
                    name: name.clone(),
                    patch: own_patch(ns, &name, policy, owner, &spec),
                    takeovers: Vec::new(),
                }),
                held: want < slot.declared,
                target: true,
                reason: None,
            });
        } else if want >= slot.declared {
            self.already_strict(&slot, &id);
        } else {
            self.plan.findings.push(Finding {
                object: id,
                message: format!(
                    "{}: mode is {}, declared {}{}",
                    slot.what,
                    shown(observed),
                    slot.declared.as_str(),
                    held_note(want)
                ),
                fix: None,
                held: true,
                target: true,
                reason: None,
            });
        }
    }

    /// Newer namespace-wide objects next to the one Istio applies (`applied`): reported as a
    /// conflict naming them, never written to; the applied one is never deleted for them.
    fn ignored(&mut self, ns: &str, applied: &str, others: &[&PeerAuthentication]) {
        for other in others {
            let oname = other.name_any();
            self.handled.insert((ns.to_string(), oname.clone()));
            self.plan.findings.push(Finding {
                object: pa_id(ns, &oname),
                message: format!(
                    "ignored by Istio: namespace {ns} has several namespace-wide PeerAuthentications and Istio uses the oldest, {applied}; delete this one (its mode {} has no effect)",
                    shown(pa_mode(other))
                ),
                fix: None,
                held: false,
                target: false,
                reason: None,
            });
        }
    }

    /// A STRICT scope while pods without a sidecar exist: never weakened, and reported, because
    /// those pods are cut off from it.
    fn already_strict(&mut self, slot: &Slot<'_>, id: &str) {
        if self.hold && slot.declared == Strength::Strict {
            self.plan.findings.push(Finding {
                object: id.to_string(),
                message: format!(
                    "{} is STRICT and stays so; pods without a sidecar cannot reach it (see below)",
                    slot.what
                ),
                fix: None,
                held: false,
                target: false,
                reason: Some(CLIENTS_CUT_OFF),
            });
        }
    }

    /// Renders a workload exemption as its own PeerAuthentication.
    fn workload_exemption(&mut self, ex: &MtlsExemption, labels: BTreeMap<String, String>) {
        let policy = self.input.policy;
        let ns = ex.namespace.as_str();
        let name = exemption_name(ex);
        let id = pa_id(ns, &name);
        self.desired.insert((ns.to_string(), name.clone()));
        self.handled.insert((ns.to_string(), name.clone()));
        let spec = PeerAuthenticationSpec {
            selector: Some(WorkloadSelector {
                match_labels: labels,
            }),
            mtls: mode_spec(ex.mode.into()),
            port_level_mtls: ex
                .ports
                .iter()
                .map(|p| {
                    (
                        p.port.to_string(),
                        PeerMtls {
                            mode: Some(Strength::from(p.mode).as_str().to_string()),
                        },
                    )
                })
                .collect(),
        };
        let owner = self.input.owner.as_ref();
        let existing = in_namespace(self.input.peer_auths, ns).find(|p| p.name_any() == name);
        if !existing.is_some_and(|p| own_object_matches(p, policy, owner, &spec)) {
            self.plan.findings.push(Finding {
                object: id,
                message: format!(
                    "exemption {} is {}",
                    describe_exemption(ex),
                    if existing.is_some() {
                        "out of date"
                    } else {
                        "not rendered yet"
                    }
                ),
                fix: Some(Fix::Apply {
                    namespace: ns.to_string(),
                    name: name.clone(),
                    patch: own_patch(ns, &name, policy, owner, &spec),
                    takeovers: Vec::new(),
                }),
                held: false,
                target: true,
                reason: None,
            });
        }
    }

    /// Weaker PeerAuthentications in `scanned` namespaces: a namespace or workload mode, or a
    /// port, below `required`.
    fn overrides(
        &mut self,
        scanned: &BTreeSet<&str>,
        required: Strength,
        exempt_ns: &BTreeSet<&str>,
    ) {
        let policy = self.input.policy;
        let root = self.input.spec.root_namespace.as_str();
        let scope = self.input.spec.scope;
        for pa in self.input.peer_auths {
            let ns = pa.namespace().unwrap_or_default();
            let name = pa.name_any();
            if !scanned.contains(ns.as_str())
                || exempt_ns.contains(ns.as_str())
                || is_ours(&pa.metadata, policy)
                || is_meshwarden(&pa.metadata)
                || self.handled.contains(&(ns.clone(), name.clone()))
            {
                continue;
            }
            let labels = selector_labels(pa);
            // Istio ignores workload selectors in the root namespace.
            if scope == MtlsScope::Mesh && ns == root && !labels.is_empty() {
                continue;
            }
            let covered = !labels.is_empty()
                && self.input.spec.exemptions.iter().any(|e| {
                    e.namespace == ns
                        && e.selector.as_ref().is_some_and(|s| {
                            s.match_expressions.iter().flatten().next().is_none()
                                && s.match_labels
                                    .iter()
                                    .flatten()
                                    .all(|(k, v)| labels.get(k) == Some(v))
                        })
                });
            if covered {
                continue;
            }
            let id = pa_id(&ns, &name);
            let mode = pa_mode(pa);
            let mut problems = Vec::new();
            let mut mtls = serde_json::Map::new();
            let mut ports = serde_json::Map::new();
            let mut takeovers = Vec::new();
            let mode_path = ["f:spec", "f:mtls", "f:mode"];
            if mode.is_some_and(|m| m < required) {
                problems.push(format!(
                    "mode {} is weaker than {}",
                    shown(mode),
                    required.as_str()
                ));
                mtls.insert("mode".into(), json!(required.as_str()));
                takeovers.extend(takeovers_of(
                    &pa.metadata,
                    &id,
                    &mode_path,
                    "spec.mtls.mode",
                ));
            } else if let Some(m) = mode
                && write::fields::owned_by_meshwarden(&pa.metadata, &mode_path)
            {
                // Every apply carries all the fields meshwarden owns, or they would be removed.
                mtls.insert("mode".into(), json!(m.as_str()));
            }
            for (port, pm) in &pa.spec.port_level_mtls {
                let pmode = Strength::parse(pm.mode.as_deref());
                let key = format!("f:{port}");
                let path = ["f:spec", "f:portLevelMtls", key.as_str(), "f:mode"];
                if pmode.is_some_and(|m| m < required) {
                    problems.push(format!(
                        "port {port} is {}, weaker than {}",
                        shown(pmode),
                        required.as_str()
                    ));
                    ports.insert(port.clone(), json!({"mode": required.as_str()}));
                    takeovers.extend(takeovers_of(
                        &pa.metadata,
                        &id,
                        &path,
                        &format!("spec.portLevelMtls.{port}.mode"),
                    ));
                } else if let Some(m) = pmode
                    && write::fields::owned_by_meshwarden(&pa.metadata, &path)
                {
                    ports.insert(port.clone(), json!({"mode": m.as_str()}));
                }
            }
            if problems.is_empty() {
                continue;
            }
            let mut spec = serde_json::Map::new();
            if !mtls.is_empty() {
                spec.insert("mtls".into(), Value::Object(mtls));
            }
            if !ports.is_empty() {
                spec.insert("portLevelMtls".into(), Value::Object(ports));
            }
            let what = if labels.is_empty() {
                "namespace-wide override".to_string()
            } else {
                format!("workload override ({})", label_text(&labels))
            };
            if self.input.spec.overrides == MtlsOverrides::Report {
                self.plan.findings.push(Finding {
                    object: id,
                    message: format!(
                        "{what}: {}; reported, not changed (its clients may not be pods: cover it with an exemption, or set mtls.overrides: Enforce to raise it)",
                        problems.join(", ")
                    ),
                    fix: None,
                    held: false,
                    target: false,
                    reason: Some(OVERRIDES_REPORTED),
                });
                continue;
            }
            self.plan.findings.push(Finding {
                object: id,
                message: format!("{what}: {}", problems.join(", ")),
                fix: Some(Fix::Apply {
                    namespace: ns.clone(),
                    name: name.clone(),
                    patch: json!({
                        "apiVersion": API_VERSION,
                        "kind": KIND,
                        "metadata": {"name": name, "namespace": ns},
                        "spec": Value::Object(spec),
                    }),
                    takeovers,
                }),
                held: false,
                target: false,
                reason: None,
            });
        }
    }

    /// meshwarden's own objects that are no longer declared (a namespace left the selector,
    /// an exemption was removed, a user's object now sets the namespace-wide mode).
    fn stale(&mut self) {
        let policy = self.input.policy;
        for pa in self.input.peer_auths {
            let ns = pa.namespace().unwrap_or_default();
            let name = pa.name_any();
            let key = (ns.clone(), name.clone());
            if !is_ours(&pa.metadata, policy) || self.desired.contains(&key) {
                continue;
            }
            // Removing an object that lets plain text in makes its namespace stricter: not
            // while pods without a sidecar are counted, unless Istio ignores it anyway.
            if !only_strict(&pa.spec)
                && !self.input.blockers.is_empty()
                && !self.shadowed.contains(&key)
            {
                self.plan.findings.push(Finding {
                    object: pa_id(&ns, &name),
                    message: format!(
                        "created by meshwarden but no longer declared; left in place because its mode {} still lets in pods without a sidecar (removing it would make {ns} stricter): delete it once they have a sidecar",
                        shown(pa_mode(pa))
                    ),
                    fix: None,
                    held: true,
                    target: false,
                    reason: None,
                });
                continue;
            }
            {
                self.plan.findings.push(Finding {
                    object: pa_id(&ns, &name),
                    message: "created by meshwarden but no longer declared".to_string(),
                    fix: Some(Fix::Delete {
                        namespace: ns,
                        name,
                    }),
                    held: false,
                    target: false,
                    reason: None,
                });
            }
        }
    }
}

fn label_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn describe_exemption(ex: &MtlsExemption) -> String {
    let mut s = match &ex.selector {
        None => format!(
            "namespace {} {}",
            ex.namespace,
            Strength::from(ex.mode).as_str()
        ),
        Some(sel) => format!(
            "workloads {} in {} {}",
            selector::to_query(sel),
            ex.namespace,
            Strength::from(ex.mode).as_str()
        ),
    };
    if !ex.ports.is_empty() {
        let ports: Vec<String> = ex
            .ports
            .iter()
            .map(|p| format!("{} {}", p.port, Strength::from(p.mode).as_str()))
            .collect();
        s.push_str(&format!(" (ports {})", ports.join(", ")));
    }
    s
}

/// The exemptions with each `namespaceSelector` entry replaced by one entry per namespace it
/// selects (same selector, mode and ports), after the entries that name their namespace. A
/// selected namespace that an earlier entry already exempts the same way is skipped.
pub fn expand_exemptions(
    exemptions: &[MtlsExemption],
    namespaces: &[NamespaceInfo],
) -> Vec<MtlsExemption> {
    let mut out: Vec<MtlsExemption> = exemptions
        .iter()
        .filter(|e| e.namespace_selector.is_none())
        .cloned()
        .collect();
    let mut names: BTreeSet<String> = out.iter().map(exemption_name).collect();
    for ex in exemptions {
        let Some(sel) = &ex.namespace_selector else {
            continue;
        };
        for n in namespaces
            .iter()
            .filter(|n| selector::matches(sel, &n.labels))
        {
            let one = MtlsExemption {
                namespace: n.name.clone(),
                namespace_selector: None,
                ..ex.clone()
            };
            if names.insert(exemption_name(&one)) {
                out.push(one);
            }
        }
    }
    out
}

/// Decides every write and deviation of the `mtls` section (pure).
pub fn plan(input: &Input<'_>) -> Plan {
    let spec = input.spec;
    let declared = Strength::from(spec.mode);
    let hold = declared == Strength::Strict && !spec.force && !input.blockers.is_empty();
    let mut p = Planner {
        input,
        plan: Plan {
            held: false,
            ..Plan::default()
        },
        desired: BTreeSet::new(),
        handled: BTreeSet::new(),
        shadowed: BTreeSet::new(),
        hold,
    };
    let known: BTreeSet<&str> = input.namespaces.iter().map(|n| n.name.as_str()).collect();
    let root = spec.root_namespace.as_str();

    // Exemptions first: a namespace exemption takes its namespace out of the scope.
    let mut exempt_ns: BTreeSet<&str> = BTreeSet::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut namespace_slots = Vec::new();
    let mut workload = Vec::new();
    for ex in &spec.exemptions {
        let name = exemption_name(ex);
        let obj = pa_id(&ex.namespace, &name);
        let reject = |msg: String| Finding {
            object: obj.clone(),
            message: format!("exemption {} {msg}", describe_exemption(ex)),
            fix: None,
            held: false,
            target: false,
            reason: None,
        };
        if !seen.insert(name.clone()) {
            p.plan
                .findings
                .push(reject("repeats an earlier exemption and is ignored".into()));
            continue;
        }
        if !known.contains(ex.namespace.as_str()) {
            p.plan.findings.push(reject(format!(
                "cannot be rendered: namespace {} does not exist",
                ex.namespace
            )));
            continue;
        }
        match &ex.selector {
            None if spec.scope == MtlsScope::Mesh && ex.namespace == root => {
                p.plan.findings.push(reject(
                    "cannot be rendered: the root namespace holds the mesh-wide mode; exempt other namespaces or change mtls.mode".into(),
                ));
            }
            None => {
                exempt_ns.insert(ex.namespace.as_str());
                namespace_slots.push(ex);
            }
            Some(_) if ex.namespace == root => {
                p.plan.findings.push(reject(
                    "cannot be rendered: Istio ignores workload selectors in the root namespace"
                        .into(),
                ));
            }
            Some(sel) => {
                let exprs = sel.match_expressions.iter().flatten().next().is_some();
                let labels: BTreeMap<String, String> = sel.match_labels.clone().unwrap_or_default();
                if exprs || labels.is_empty() {
                    p.plan.findings.push(reject(
                        "cannot be rendered: a PeerAuthentication selects workloads by matchLabels only; use matchLabels (at least one)".into(),
                    ));
                } else {
                    workload.push((ex, labels));
                }
            }
        }
    }

    // The scopes.
    let scanned: BTreeSet<&str> = match spec.scope {
        MtlsScope::Mesh => {
            p.plan.targets += 1;
            if known.contains(root) {
                p.slot(Slot {
                    namespace: root,
                    declared,
                    name: SCOPE_OBJECT.to_string(),
                    what: "mesh-wide mode".to_string(),
                });
            } else {
                p.plan.findings.push(Finding {
                    object: format!("Namespace/{root}"),
                    message: format!(
                        "root namespace {root} does not exist: set mtls.rootNamespace to Istio's root namespace"
                    ),
                    fix: None,
                    held: false,
                    target: true,
                    reason: None,
                });
            }
            known.clone()
        }
        MtlsScope::Namespaces => {
            let sel = spec.namespace_selector.clone().unwrap_or_default();
            let selected: BTreeSet<&str> = input
                .namespaces
                .iter()
                .filter(|n| selector::matches(&sel, &n.labels))
                .map(|n| n.name.as_str())
                .filter(|n| !exempt_ns.contains(n))
                .collect();
            for ns in &selected {
                p.plan.targets += 1;
                p.slot(Slot {
                    namespace: ns,
                    declared,
                    name: SCOPE_OBJECT.to_string(),
                    what: format!("namespace {ns}"),
                });
            }
            selected
        }
    };

    for ex in namespace_slots {
        p.plan.targets += 1;
        let name = exemption_name(ex);
        p.slot(Slot {
            namespace: &ex.namespace,
            declared: ex.mode.into(),
            name: name.clone(),
            what: format!("exemption {}", describe_exemption(ex)),
        });
        p.plan.exemptions.push(format!(
            "{} (namespace-wide PeerAuthentication in {})",
            describe_exemption(ex),
            ex.namespace
        ));
    }
    for (ex, labels) in workload {
        p.plan.targets += 1;
        p.workload_exemption(ex, labels);
        p.plan.exemptions.push(format!(
            "{} as {}",
            describe_exemption(ex),
            pa_id(&ex.namespace, &exemption_name(ex))
        ));
    }

    let required = if hold { Strength::Permissive } else { declared };
    p.overrides(&scanned, required, &exempt_ns);
    p.stale();
    p.plan.held = p.plan.findings.iter().any(|f| f.held);
    p.plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::mtls::testutil::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    #[test]
    fn mesh_scope_creates_one_root_object_then_converges() {
        let s = spec("{mode: STRICT, rootNamespace: root}");
        let nss = [ns("root", &[]), ns("app", &[])];
        let p = run(&s, &nss, &[], &[]);
        assert_eq!(p.targets, 1);
        assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
        let f = &p.findings[0];
        assert_eq!(f.object, "PeerAuthentication/root/meshwarden-mtls");
        let patch = patch_of(f);
        assert_eq!(patch["spec"]["mtls"]["mode"], "STRICT");
        assert!(patch["spec"].get("selector").is_none());
        assert_eq!(patch["metadata"]["labels"][POLICY_LABEL], "p");
        assert!(!f.held);

        // What the apply creates is compliant: nothing more to do.
        let created = ours(
            pa(
                "root",
                "meshwarden-mtls",
                1,
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            "p",
        );
        assert!(run(&s, &nss, &[created], &[]).findings.is_empty());
    }

    #[test]
    fn mesh_level_unset_is_permissive_and_is_corrected() {
        let s = spec("{mode: PERMISSIVE, rootNamespace: root}");
        let nss = [ns("root", &[])];
        let user = pa("root", "default", 5, json!({"mtls": {"mode": "UNSET"}}));
        let p = run(&s, &nss, &[user], &[]);
        assert_eq!(p.findings.len(), 1);
        assert!(
            p.findings[0].message.contains("mode is UNSET"),
            "{}",
            p.findings[0].message
        );
        assert_eq!(
            patch_of(&p.findings[0])["spec"]["mtls"]["mode"],
            "PERMISSIVE"
        );
    }

    #[test]
    fn users_default_is_corrected_in_place_with_only_the_mode() {
        let s = spec("{mode: STRICT, rootNamespace: root}");
        let nss = [ns("root", &[])];
        let older = pa(
            "root",
            "default",
            10,
            json!({"mtls": {"mode": "PERMISSIVE"}}),
        );
        let newer = pa("root", "another", 2, json!({"mtls": {"mode": "DISABLE"}}));
        let p = run(&s, &nss, &[newer, older], &[]);
        let fixes: Vec<&Finding> = p.findings.iter().filter(|f| f.fix.is_some()).collect();
        assert_eq!(fixes.len(), 1, "{:?}", p.findings);
        assert_eq!(
            fixes[0].object, "PeerAuthentication/root/default",
            "the oldest one"
        );
        assert_eq!(
            patch_of(fixes[0]),
            &json!({
                "apiVersion": "security.istio.io/v1",
                "kind": "PeerAuthentication",
                "metadata": {"name": "default", "namespace": "root"},
                "spec": {"mtls": {"mode": "STRICT"}},
            }),
            "no labels, no owner: only the mode"
        );
        let other = p
            .findings
            .iter()
            .find(|f| f.object == "PeerAuthentication/root/another")
            .unwrap();
        assert!(other.fix.is_none());
        assert!(other.message.contains("uses the oldest, default"));
        assert!(
            !p.findings
                .iter()
                .any(|f| f.object.ends_with("meshwarden-mtls")),
            "no second object"
        );
    }

    #[test]
    fn our_newer_object_is_removed_once_an_older_user_object_sets_the_namespace_mode() {
        let s = spec("{mode: STRICT, rootNamespace: root}");
        let nss = [ns("root", &[])];
        let mine = ours(
            pa(
                "root",
                "meshwarden-mtls",
                1,
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            "p",
        );
        let user = pa("root", "default", 10, json!({"mtls": {"mode": "STRICT"}}));
        let p = run(&s, &nss, &[mine, user], &[]);
        assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
        assert_eq!(
            p.findings[0].fix,
            Some(Fix::Delete {
                namespace: "root".into(),
                name: "meshwarden-mtls".into()
            })
        );
    }

    #[test]
    fn strict_is_held_at_permissive_but_a_strict_scope_is_never_weakened() {
        let s = spec("{mode: STRICT, rootNamespace: root}");
        let nss = [ns("root", &[])];
        let blockers = [pod("legacy", "web", false)];
        let p = run(&s, &nss, &[], &blockers);
        assert!(p.held);
        assert!(p.findings[0].held);
        assert_eq!(
            patch_of(&p.findings[0])["spec"]["mtls"]["mode"],
            "PERMISSIVE"
        );

        // Already STRICT: never weakened, and the pods it cuts off are reported.
        let strict = pa("root", "default", 3, json!({"mtls": {"mode": "STRICT"}}));
        let p = run(&s, &nss, &[strict], &blockers);
        assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
        assert!(p.findings[0].fix.is_none());
        assert_eq!(p.findings[0].reason, Some(CLIENTS_CUT_OFF));
        assert_eq!(p.findings[0].object, "PeerAuthentication/root/default");
        assert!(!p.held);

        let mine = ours(
            pa(
                "root",
                "meshwarden-mtls",
                3,
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            "p",
        );
        let p = run(&s, &nss, &[mine], &blockers);
        assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
        assert_eq!(p.findings[0].reason, Some(CLIENTS_CUT_OFF));
        assert!(
            p.findings[0]
                .message
                .contains("mesh-wide mode is STRICT and stays so")
        );

        let forced = spec("{mode: STRICT, rootNamespace: root, force: true}");
        let p = run(&forced, &nss, &[], &blockers);
        assert!(!p.held);
        assert_eq!(patch_of(&p.findings[0])["spec"]["mtls"]["mode"], "STRICT");
    }

    #[test]
    fn namespaces_scope_holds_every_selected_namespace() {
        let s =
            spec("{mode: STRICT, scope: Namespaces, namespaceSelector: {matchLabels: {team: a}}}");
        let nss: Vec<NamespaceInfo> = (0..5)
            .map(|i| ns(&format!("n{i}"), &[("team", if i < 3 { "a" } else { "b" })]))
            .collect();
        let p = run(&s, &nss, &[], &[]);
        assert_eq!(p.targets, 3);
        let objs: Vec<&str> = p.findings.iter().map(|f| f.object.as_str()).collect();
        assert_eq!(
            objs,
            vec![
                "PeerAuthentication/n0/meshwarden-mtls",
                "PeerAuthentication/n1/meshwarden-mtls",
                "PeerAuthentication/n2/meshwarden-mtls"
            ]
        );
        let none =
            spec("{mode: STRICT, scope: Namespaces, namespaceSelector: {matchLabels: {team: c}}}");
        assert_eq!(run(&none, &nss, &[], &[]).targets, 0);
    }

    #[test]
    fn exemptions_are_rendered_with_stable_names() {
        let s = spec(
            r#"{mode: STRICT, rootNamespace: root, exemptions: [
                {namespace: legacy},
                {namespace: shop, selector: {matchLabels: {app: pay}}, mode: STRICT, ports: [{port: 8080, mode: PERMISSIVE}]},
                {namespace: shop, selector: {matchExpressions: [{key: app, operator: Exists}]}},
                {namespace: root, selector: {matchLabels: {app: x}}},
                {namespace: gone}
            ]}"#,
        );
        let nss = [ns("root", &[]), ns("legacy", &[]), ns("shop", &[])];
        let p = run(&s, &nss, &[], &[]);
        assert_eq!(p.targets, 3, "mesh, legacy and shop/pay");
        let legacy = exemption_name(&s.exemptions[0]);
        let pay = exemption_name(&s.exemptions[1]);
        assert!(
            legacy.starts_with(EXEMPTION_PREFIX) && legacy.len() == EXEMPTION_PREFIX.len() + 10
        );
        assert_ne!(legacy, pay);
        assert_eq!(pay, exemption_name(&s.exemptions[1].clone()), "stable");
        let find = |id: String| p.findings.iter().find(|f| f.object == id).unwrap();
        let l = patch_of(find(format!("PeerAuthentication/legacy/{legacy}")));
        assert_eq!(l["spec"], json!({"mtls": {"mode": "PERMISSIVE"}}));
        let w = patch_of(find(format!("PeerAuthentication/shop/{pay}")));
        assert_eq!(
            w["spec"],
            json!({"selector": {"matchLabels": {"app": "pay"}}, "mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}})
        );
        let rejected: Vec<&String> = p
            .findings
            .iter()
            .filter(|f| f.fix.is_none())
            .map(|f| &f.message)
            .collect();
        assert_eq!(rejected.len(), 3, "{rejected:?}");
        assert!(rejected.iter().any(|m| m.contains("matchLabels only")));
        assert!(
            rejected
                .iter()
                .any(|m| m.contains("ignores workload selectors in the root"))
        );
        assert!(rejected.iter().any(|m| m.contains("gone does not exist")));
        assert_eq!(p.exemptions.len(), 2);
    }

    #[test]
    fn weaker_overrides_are_corrected_unless_exempted() {
        let s = spec(
            "{mode: STRICT, rootNamespace: root, force: true, overrides: Enforce, exemptions: [{namespace: legacy}, {namespace: shop, selector: {matchLabels: {app: pay}}}]}",
        );
        let nss = [
            ns("root", &[]),
            ns("legacy", &[]),
            ns("shop", &[]),
            ns("web", &[]),
        ];
        let root = pa("root", "default", 9, json!({"mtls": {"mode": "STRICT"}}));
        let ns_wide = pa("web", "default", 1, json!({"mtls": {"mode": "PERMISSIVE"}}));
        let port = pa(
            "web",
            "api",
            1,
            json!({"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "UNSET"}, "portLevelMtls": {"9000": {"mode": "DISABLE"}, "9001": {"mode": "STRICT"}}}),
        );
        let covered = pa(
            "shop",
            "pay",
            1,
            json!({"selector": {"matchLabels": {"app": "pay", "v": "2"}}, "mtls": {"mode": "DISABLE"}}),
        );
        let in_exempt_ns = pa("legacy", "default", 1, json!({"mtls": {"mode": "DISABLE"}}));
        let fine = pa(
            "web",
            "ok",
            1,
            json!({"selector": {"matchLabels": {"app": "ok"}}, "mtls": {"mode": "STRICT"}}),
        );
        let other_policy = ours(
            pa(
                "web",
                "meshwarden-mtls",
                1,
                json!({"mtls": {"mode": "PERMISSIVE"}}),
            ),
            "q",
        );
        let p = run(
            &s,
            &nss,
            &[
                root,
                ns_wide,
                port,
                covered,
                in_exempt_ns,
                fine,
                other_policy,
            ],
            &[],
        );
        assert!(
            !p.findings
                .iter()
                .any(|f| f.object.ends_with("web/meshwarden-mtls")),
            "another policy's object is that policy's business"
        );
        let by = |id: &str| p.findings.iter().find(|f| f.object == id);
        let w = by("PeerAuthentication/web/default").unwrap();
        assert_eq!(patch_of(w)["spec"], json!({"mtls": {"mode": "STRICT"}}));
        let a = by("PeerAuthentication/web/api").unwrap();
        assert_eq!(
            patch_of(a)["spec"],
            json!({"portLevelMtls": {"9000": {"mode": "STRICT"}}}),
            "only the weak port; UNSET inherits"
        );
        assert!(a.message.contains("port 9000 is DISABLE"), "{}", a.message);
        assert!(
            by("PeerAuthentication/shop/pay").is_none(),
            "covered by the workload exemption"
        );
        assert!(by("PeerAuthentication/web/ok").is_none());
        // The exempted namespace's own default is corrected to the exemption's mode.
        let l = by("PeerAuthentication/legacy/default").unwrap();
        assert_eq!(patch_of(l)["spec"], json!({"mtls": {"mode": "PERMISSIVE"}}));
    }

    #[test]
    fn an_apply_to_a_user_object_keeps_every_field_we_own() {
        let s = spec("{mode: STRICT, rootNamespace: root, force: true, overrides: Enforce}");
        let nss = [ns("root", &[]), ns("web", &[])];
        let root = pa("root", "default", 9, json!({"mtls": {"mode": "STRICT"}}));
        let mut api = pa(
            "web",
            "api",
            1,
            json!({"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "STRICT"}, "portLevelMtls": {"9000": {"mode": "DISABLE"}}}),
        );
        api.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some(write::FIELD_MANAGER.into()),
            fields_v1: Some(FieldsV1(json!({"f:spec": {"f:mtls": {"f:mode": {}}}}))),
            ..Default::default()
        }]);
        let p = run(&s, &nss, &[root, api], &[]);
        assert_eq!(
            patch_of(&p.findings[0])["spec"],
            json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"9000": {"mode": "STRICT"}}})
        );
    }

    #[test]
    fn held_scope_does_not_raise_permissive_overrides() {
        let s = spec("{mode: STRICT, rootNamespace: root, overrides: Enforce}");
        let nss = [ns("root", &[]), ns("web", &[])];
        let perm = pa("web", "default", 1, json!({"mtls": {"mode": "PERMISSIVE"}}));
        let dis = pa(
            "web",
            "x",
            1,
            json!({"selector": {"matchLabels": {"a": "b"}}, "mtls": {"mode": "DISABLE"}}),
        );
        let p = run(&s, &nss, &[perm, dis], &[pod("web", "w", false)]);
        assert!(
            !p.findings
                .iter()
                .any(|f| f.object == "PeerAuthentication/web/default")
        );
        let x = p
            .findings
            .iter()
            .find(|f| f.object == "PeerAuthentication/web/x")
            .unwrap();
        assert_eq!(patch_of(x)["spec"], json!({"mtls": {"mode": "PERMISSIVE"}}));
    }

    fn run_owned(
        s: &MtlsSpec,
        nss: &[NamespaceInfo],
        pas: &[PeerAuthentication],
        blockers: &[PodInfo],
    ) -> Plan {
        plan(&Input {
            spec: s,
            policy: "p",
            owner: Some(OwnerReference {
                api_version: "meshwarden.io/v1alpha1".into(),
                kind: "MeshPolicy".into(),
                name: "p".into(),
                uid: "uid-p".into(),
                ..Default::default()
            }),
            namespaces: nss,
            peer_auths: pas,
            blockers,
        })
    }

    fn owners(f: &Finding) -> usize {
        patch_of(f)["metadata"]["ownerReferences"]
            .as_array()
            .map_or(0, Vec::len)
    }

    #[test]
    fn objects_that_let_plain_text_in_are_never_owned_by_the_policy() {
        // The garbage collector deletes owned objects with the policy: an exemption or a
        // PERMISSIVE scope removed while the user's `default` stays STRICT would cut clients
        // off. Only objects whose removal can only weaken the mesh are owned.
        let s = spec(
            r#"{mode: STRICT, rootNamespace: root, exemptions: [
                {namespace: legacy},
                {namespace: shop, selector: {matchLabels: {app: pay}}, mode: STRICT},
                {namespace: shop, selector: {matchLabels: {app: api}}, mode: STRICT, ports: [{port: 8080, mode: PERMISSIVE}]}
            ]}"#,
        );
        let nss = [ns("root", &[]), ns("legacy", &[]), ns("shop", &[])];
        let p = run_owned(&s, &nss, &[], &[]);
        let find = |id: String| p.findings.iter().find(|f| f.object == id).unwrap();
        assert_eq!(
            owners(find("PeerAuthentication/root/meshwarden-mtls".into())),
            1
        );
        let legacy = exemption_name(&s.exemptions[0]);
        assert_eq!(
            owners(find(format!("PeerAuthentication/legacy/{legacy}"))),
            0
        );
        let pay = exemption_name(&s.exemptions[1]);
        assert_eq!(owners(find(format!("PeerAuthentication/shop/{pay}"))), 1);
        let api = exemption_name(&s.exemptions[2]);
        assert_eq!(owners(find(format!("PeerAuthentication/shop/{api}"))), 0);

        // Held at PERMISSIVE: not owned; a PERMISSIVE exemption created owned by an older
        // version loses its ownerReference.
        let mut old = ours(
            pa(
                "legacy",
                &legacy,
                5,
                json!({"mtls": {"mode": "PERMISSIVE"}}),
            ),
            "p",
        );
        old.metadata.owner_references = Some(vec![OwnerReference {
            uid: "uid-p".into(),
            ..Default::default()
        }]);
        let p = run_owned(&s, &nss, &[old], &[pod("web", "w", false)]);
        let root = find_in(&p, "PeerAuthentication/root/meshwarden-mtls");
        assert!(root.held);
        assert_eq!(owners(root), 0);
        assert_eq!(
            owners(find_in(&p, &format!("PeerAuthentication/legacy/{legacy}"))),
            0
        );
    }

    fn find_in<'p>(p: &'p Plan, id: &str) -> &'p Finding {
        p.findings
            .iter()
            .find(|f| f.object == id)
            .unwrap_or_else(|| panic!("{id} in {:?}", p.findings))
    }

    #[test]
    fn a_newer_mesh_wide_object_never_displaces_the_one_istio_applies() {
        let s = spec("{mode: STRICT, rootNamespace: root}");
        let nss = [ns("root", &[])];
        let mine = ours(
            pa(
                "root",
                "meshwarden-mtls",
                10,
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            "p",
        );
        let newer = pa(
            "root",
            "default",
            1,
            json!({"mtls": {"mode": "PERMISSIVE"}}),
        );
        let p = run(&s, &nss, &[mine, newer], &[]);
        assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
        let f = &p.findings[0];
        assert_eq!(f.object, "PeerAuthentication/root/default");
        assert!(f.fix.is_none(), "neither deleted nor rewritten: {f:?}");
        assert!(
            f.message.contains("Istio uses the oldest, meshwarden-mtls"),
            "{}",
            f.message
        );
    }

    #[test]
    fn weaker_overrides_are_reported_by_default_not_rewritten() {
        let s = spec("{mode: STRICT, rootNamespace: root, force: true}");
        let nss = [ns("root", &[]), ns("web", &[])];
        let root = pa("root", "default", 9, json!({"mtls": {"mode": "STRICT"}}));
        let ns_wide = pa("web", "default", 1, json!({"mtls": {"mode": "PERMISSIVE"}}));
        let port = pa(
            "web",
            "api",
            1,
            json!({"selector": {"matchLabels": {"app": "api"}}, "portLevelMtls": {"9000": {"mode": "DISABLE"}}}),
        );
        let p = run(&s, &nss, &[root, ns_wide, port], &[]);
        assert_eq!(p.findings.len(), 2, "{:?}", p.findings);
        for f in &p.findings {
            assert!(f.fix.is_none(), "{f:?}");
            assert_eq!(f.reason, Some(OVERRIDES_REPORTED));
            assert!(f.message.contains("overrides: Enforce"), "{}", f.message);
        }
        assert!(
            find_in(&p, "PeerAuthentication/web/api")
                .message
                .contains("port 9000 is DISABLE")
        );
    }

    #[test]
    fn a_removed_exemption_stays_while_pods_without_sidecar_rely_on_it() {
        let s = spec("{mode: STRICT, rootNamespace: root}");
        let nss = [ns("root", &[]), ns("legacy", &[])];
        let root = pa("root", "default", 9, json!({"mtls": {"mode": "STRICT"}}));
        let old = ours(
            pa(
                "legacy",
                "meshwarden-exemption-0123456789",
                5,
                json!({"mtls": {"mode": "PERMISSIVE"}}),
            ),
            "p",
        );
        let p = run(
            &s,
            &nss,
            &[root.clone(), old.clone()],
            &[pod("legacy", "cron", false)],
        );
        let f = find_in(
            &p,
            "PeerAuthentication/legacy/meshwarden-exemption-0123456789",
        );
        assert!(
            f.fix.is_none() && f.message.contains("left in place"),
            "{f:?}"
        );
        // Without such pods it goes.
        let p = run(&s, &nss, &[root, old], &[]);
        let f = find_in(
            &p,
            "PeerAuthentication/legacy/meshwarden-exemption-0123456789",
        );
        assert!(matches!(f.fix, Some(Fix::Delete { .. })), "{f:?}");
    }

    #[test]
    fn namespace_selector_exemptions_expand_to_each_selected_namespace() {
        let s = spec(
            r#"{mode: STRICT, rootNamespace: root, exemptions: [
                {namespace: a},
                {namespaceSelector: {matchLabels: {legacy: "true"}}},
                {namespaceSelector: {matchLabels: {legacy: "true"}}, selector: {matchLabels: {app: x}}}
            ]}"#,
        );
        let nss = [
            ns("root", &[]),
            ns("a", &[("legacy", "true")]),
            ns("b", &[("legacy", "true")]),
            ns("c", &[]),
        ];
        let ex = expand_exemptions(&s.exemptions, &nss);
        let got: Vec<(&str, bool)> = ex
            .iter()
            .map(|e| (e.namespace.as_str(), e.selector.is_some()))
            .collect();
        assert_eq!(
            got,
            vec![("a", false), ("b", false), ("a", true), ("b", true)],
            "a is exempted once; b by the selector"
        );
        assert!(ex.iter().all(|e| e.namespace_selector.is_none()));
        let expanded = MtlsSpec {
            exemptions: ex,
            ..s.clone()
        };
        let p = run(&expanded, &nss, &[], &[pod("b", "cron", false)]);
        assert_eq!(p.exemptions.len(), 4, "{:?}", p.exemptions);
        assert!(blockers(&[pod("b", "cron", false)], &nss, &expanded.exemptions).is_empty());
    }
}
