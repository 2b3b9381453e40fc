//! Which namespaces and workloads the section covers, and why a workload gets no sidecar.

use super::*;

/// True when meshwarden owns fields of the object beyond the sidecar annotations and the
/// upgrades section's restart annotations, i.e. another meshwarden rule (gateway or
/// control-plane HA) writes it with the same field manager. Writing
/// it from this rule too would release that rule's fields, so it is left alone.
pub fn owned_by_other_rule(meta: &ObjectMeta) -> bool {
    let ours: BTreeSet<String> = [
        PROXY_CPU,
        PROXY_CPU_LIMIT,
        PROXY_MEMORY,
        PROXY_MEMORY_LIMIT,
        HASH_ANNOTATION,
        RESTARTED_AT,
    ]
    .iter()
    .map(|k| format!("f:{k}"))
    .collect();
    let only = |v: &Value, key: &str| -> Option<Value> {
        let m = v.as_object()?;
        if m.keys().all(|k| k == key || k == ".") {
            Some(m.get(key).cloned().unwrap_or(Value::Null))
        } else {
            None
        }
    };
    meta.managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some(FIELD_MANAGER))
        .filter(|m| m.subresource.as_deref().unwrap_or_default().is_empty())
        .filter_map(|m| m.fields_v1.as_ref())
        .any(|f| {
            let Some(top) = f.0.as_object() else {
                return true;
            };
            // This rule's fields: the template's annotations and one on the metadata.
            let template = top.get("f:spec").map(|spec| {
                let annotations = only(spec, "f:template")
                    .and_then(|v| only(&v, "f:metadata"))
                    .and_then(|v| only(&v, "f:annotations"));
                match annotations {
                    Some(Value::Object(a)) => a.keys().any(|k| k != "." && !ours.contains(k)),
                    Some(Value::Null) => false,
                    _ => true,
                }
            });
            let metadata = top
                .get("f:metadata")
                .map(|m| match only(m, "f:annotations") {
                    Some(Value::Object(a)) => a.keys().any(|k| {
                        k != "."
                            && k != &format!("f:{GENERATION_ANNOTATION}")
                            && k != &format!("f:{RESTART_GENERATION_ANNOTATION}")
                    }),
                    Some(Value::Null) => false,
                    _ => true,
                });
            top.keys()
                .any(|k| k != "f:spec" && k != "f:metadata" && k != ".")
                || template.unwrap_or(false)
                || metadata.unwrap_or(false)
        })
}

pub(super) fn is_ambient(ns_labels: &BTreeMap<String, String>) -> bool {
    ns_labels.get("istio.io/dataplane-mode").map(String::as_str) == Some("ambient")
}

pub use crate::istio::{Injection, Revisions, namespace_injection, namespace_injection_on};

/// Whether the section covers a namespace with these labels: its `namespaceSelector`, or by
/// default every namespace with injection on (an `istio.io/rev` label counts only when it
/// names a live revision or a tag). Ambient namespaces are never covered.
pub fn selects_namespace(
    spec: &SidecarSpec,
    ns_labels: &BTreeMap<String, String>,
    revisions: &Revisions,
) -> bool {
    if is_ambient(ns_labels) {
        return false;
    }
    match &spec.namespace_selector {
        Some(sel) => selector::matches(sel, ns_labels),
        None => namespace_injection_on(ns_labels, revisions),
    }
}

/// Routing of watch events: whether a policy's sidecars section may cover a namespace
/// (`None`: labels unknown, so yes).
pub fn covers_namespace(
    spec: &crate::api::MeshPolicySpec,
    ns_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    match (&spec.sidecars, ns_labels) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(s), Some(l)) => selects_namespace(s, l, &Revisions::any()),
    }
}

/// Why pods from this template get no sidecar, or `None` when they get one (Istio's webhook
/// selectors: namespace `istio-injection` / `istio.io/rev`, pod `sidecar.istio.io/inject`).
pub fn no_sidecar_reason(
    ns_labels: &BTreeMap<String, String>,
    tpl_labels: &BTreeMap<String, String>,
    tpl_annotations: &BTreeMap<String, String>,
    revisions: &Revisions,
) -> Option<&'static str> {
    if is_ambient(ns_labels) {
        return Some("ambient namespace");
    }
    if tpl_labels.get(INJECT).map(String::as_str) == Some("false")
        || tpl_annotations.get(INJECT).map(String::as_str) == Some("false")
    {
        return Some("sidecar.istio.io/inject is false");
    }
    if tpl_annotations
        .get(INJECT_TEMPLATES)
        .is_some_and(|t| t.split(',').any(|t| t.trim() == "gateway"))
    {
        return Some(
            "Istio gateway (inject.istio.io/templates: gateway), held by the gateways section",
        );
    }
    match namespace_injection(ns_labels, revisions) {
        Injection::On => None,
        Injection::UnknownRevision(_) => {
            Some("the namespace's istio.io/rev names no live revision or tag")
        }
        Injection::Off if ns_labels.contains_key(crate::istio::INJECTION_LABEL) => {
            Some("injection disabled in the namespace")
        }
        Injection::Off => match tpl_labels.get(crate::istio::REVISION_LABEL) {
            Some(rev) if revisions.resolve(rev).is_none() => {
                Some("the pod's istio.io/rev names no live revision or tag")
            }
            Some(_) => None,
            None if tpl_labels.get(INJECT).map(String::as_str) == Some("true") => None,
            None => Some("injection is not on for the namespace or the pod"),
        },
    }
}

/// True when a workload's annotation `meshwarden.io/ignore` names `sidecar-resources`.
pub fn opted_out(workload_annotations: &BTreeMap<String, String>) -> bool {
    ignores(workload_annotations, IGNORE_VALUE)
}

/// True when a workload's annotation `meshwarden.io/ignore` names `rule`.
pub fn ignores(workload_annotations: &BTreeMap<String, String>, rule: &str) -> bool {
    workload_annotations
        .get(IGNORE_ANNOTATION)
        .is_some_and(|v| v.split(',').any(|p| p.trim() == rule))
}
