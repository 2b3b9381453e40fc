//! Users' PeerAuthentications that let in more plain text than the scope: reported, or with
//! `overrides: Enforce` raised (pure).

use super::*;

impl Planner<'_> {
    /// Weaker PeerAuthentications in `scanned` namespaces: a namespace or workload mode, or a
    /// port, below `required`.
    pub(super) fn overrides(
        &mut self,
        scanned: &BTreeSet<&str>,
        required: Strength,
        exempt_ns: &BTreeSet<&str>,
    ) {
        let policy = self.input.policy;
        let root = self.input.root;
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
}
