//! The PeerAuthentication objects the planner writes and how it matches what exists, and the
//! exemptions it expands and describes (pure).

use super::*;

/// Whether removing an object with this spec can only weaken what Istio enforces: its mode
/// and every port-level mode are STRICT, so what it falls back to is never stricter.
pub(super) fn only_strict(spec: &PeerAuthenticationSpec) -> bool {
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
pub(super) fn owner_for<'o>(
    owner: Option<&'o OwnerReference>,
    spec: &PeerAuthenticationSpec,
) -> Option<&'o OwnerReference> {
    owner.filter(|_| only_strict(spec))
}

/// The full object meshwarden owns (labels, owner when [`owner_for`] says so, spec). An
/// ownerReference meshwarden stops sending is removed by server-side apply.
pub(super) fn own_patch(
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
            "labels": write::labels(policy),
            "ownerReferences": owner_refs,
        },
        "spec": serde_json::to_value(spec).unwrap_or(Value::Null),
    })
}

pub(super) fn normalised_ports(
    spec: &PeerAuthenticationSpec,
) -> BTreeMap<String, Option<Strength>> {
    spec.port_level_mtls
        .iter()
        .map(|(k, v)| (k.clone(), Strength::parse(v.mode.as_deref())))
        .collect()
}

/// Whether an object meshwarden created already matches what it would write.
pub(super) fn own_object_matches(
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

pub(super) fn mode_spec(mode: Strength) -> Option<PeerMtls> {
    Some(PeerMtls {
        mode: Some(mode.as_str().to_string()),
    })
}

pub(super) fn in_namespace<'x>(
    pas: &'x [PeerAuthentication],
    ns: &'x str,
) -> impl Iterator<Item = &'x PeerAuthentication> {
    pas.iter()
        .filter(move |p| p.namespace().as_deref() == Some(ns))
}

pub(super) fn label_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub(super) fn describe_exemption(ex: &MtlsExemption) -> String {
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
