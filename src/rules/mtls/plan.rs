//! The pure planner: every write and deviation of the `mtls` section.

mod objects;
mod overrides;

use super::*;
pub use objects::expand_exemptions;
use objects::*;

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
    /// STRICT is declared while pods without a sidecar run (with or without `force`): a
    /// scope that is STRICT already cuts them off, which is reported.
    cut_off: bool,
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
        if self.cut_off && slot.declared == Strength::Strict {
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
            // The mesh-wide object in the root namespace Istio reads (meshConfig) while the
            // policy names another one: it is the one in force, so it stays.
            if self.input.spec.scope == MtlsScope::Mesh
                && name == SCOPE_OBJECT
                && self.input.istio_root == Some(ns.as_str())
            {
                self.plan.notes.push(format!(
                    "{} is kept: it is the mesh-wide mode in Istio's root namespace, which mtls.rootNamespace disagrees with",
                    pa_id(&ns, &name)
                ));
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

/// Decides every write and deviation of the `mtls` section (pure).
pub fn plan(input: &Input<'_>) -> Plan {
    let spec = input.spec;
    let declared = Strength::from(spec.mode);
    let cut_off = declared == Strength::Strict && !input.blockers.is_empty();
    // `force` skips the hold, never the report of the pods a STRICT scope cuts off.
    let hold = cut_off && !spec.force;
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
        cut_off,
    };
    let known: BTreeSet<&str> = input.namespaces.iter().map(|n| n.name.as_str()).collect();
    let root = input.root;

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
mod tests;
