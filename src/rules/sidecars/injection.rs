//! Which namespaces and workloads the section covers, and why a workload gets no sidecar.

use super::*;

/// True when meshwarden owns fields of the object beyond the sidecar annotations and the
/// upgrades section's restart annotations, i.e. another meshwarden rule (gateway or
/// control-plane HA) writes it with the same field manager. Writing
/// it from this rule too would release that rule's fields, so it is left alone.
pub fn owned_by_other_rule(meta: &ObjectMeta) -> bool {
    crate::write::fields::owns_more_than_annotations(
        meta,
        &[
            PROXY_CPU,
            PROXY_CPU_LIMIT,
            PROXY_MEMORY,
            PROXY_MEMORY_LIMIT,
            HASH_ANNOTATION,
            RESTARTED_AT,
        ],
        &[
            GENERATION_ANNOTATION,
            RESTART_GENERATION_ANNOTATION,
            RESTART_TARGET_ANNOTATION,
        ],
    )
}

/// The namespace is in ambient mode ([`crate::istio::ambient`] of the namespace alone).
pub(super) fn is_ambient(ns_labels: &BTreeMap<String, String>) -> bool {
    crate::istio::ambient(ns_labels, None)
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

/// The namespace's part of [`no_sidecar_reason`], decided once per namespace rather than
/// once per workload and pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceInjection {
    ambient: bool,
    injection: Injection,
    /// `istio-injection` is set (to anything): the pod's own labels cannot turn it on.
    labelled: bool,
}

impl NamespaceInjection {
    pub fn of(ns_labels: &BTreeMap<String, String>, revisions: &Revisions) -> Self {
        NamespaceInjection {
            ambient: is_ambient(ns_labels),
            injection: namespace_injection(ns_labels, revisions),
            labelled: ns_labels.contains_key(crate::istio::INJECTION_LABEL),
        }
    }

    /// Why pods from this template get no sidecar in the namespace, or `None` when they get
    /// one (Istio's webhook selectors: namespace `istio-injection` / `istio.io/rev`, pod
    /// `sidecar.istio.io/inject`).
    pub fn no_sidecar_reason(
        &self,
        tpl_labels: &impl KeyValues,
        tpl_annotations: &impl KeyValues,
        revisions: &Revisions,
    ) -> Option<&'static str> {
        if self.ambient {
            return Some("ambient namespace");
        }
        // Most templates carry none of the keys read below.
        if tpl_labels.has_none() && tpl_annotations.has_none() {
            return match self.injection {
                Injection::On => None,
                _ => Some(self.off_reason(None)),
            };
        }
        if tpl_labels.value(INJECT) == Some("false")
            || tpl_annotations.value(INJECT) == Some("false")
        {
            return Some("sidecar.istio.io/inject is false");
        }
        if tpl_annotations
            .value(INJECT_TEMPLATES)
            .is_some_and(|t| t.split(',').any(|t| t.trim() == "gateway"))
        {
            return Some(
                "Istio gateway (inject.istio.io/templates: gateway), held by the gateways section",
            );
        }
        match self.injection {
            Injection::On => None,
            _ if self.labelled || matches!(self.injection, Injection::UnknownRevision(_)) => {
                Some(self.off_reason(None))
            }
            Injection::Off => match tpl_labels.value(crate::istio::REVISION_LABEL) {
                Some(rev) if revisions.resolve(rev).is_none() => Some(self.off_reason(Some(rev))),
                Some(_) => None,
                None if tpl_labels.value(INJECT) == Some("true") => None,
                None => Some(self.off_reason(None)),
            },
            Injection::UnknownRevision(_) => Some(self.off_reason(None)),
        }
    }

    /// Why nothing injects, the namespace not injecting (`pod_rev`: the pod's own
    /// `istio.io/rev`, which names nothing live).
    fn off_reason(&self, pod_rev: Option<&str>) -> &'static str {
        match (&self.injection, pod_rev) {
            (Injection::UnknownRevision(_), _) => {
                "the namespace's istio.io/rev names no live revision or tag"
            }
            (_, _) if self.labelled => "injection disabled in the namespace",
            (_, Some(_)) => "the pod's istio.io/rev names no live revision or tag",
            (_, None) => "injection is not on for the namespace or the pod",
        }
    }
}

/// Why pods from this template get no sidecar in a namespace with these labels, or `None`
/// when they get one (see [`NamespaceInjection::no_sidecar_reason`]).
pub fn no_sidecar_reason(
    ns_labels: &BTreeMap<String, String>,
    tpl_labels: &impl KeyValues,
    tpl_annotations: &impl KeyValues,
    revisions: &Revisions,
) -> Option<&'static str> {
    NamespaceInjection::of(ns_labels, revisions).no_sidecar_reason(
        tpl_labels,
        tpl_annotations,
        revisions,
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Namespace labels, template labels, template annotations, the reason.
    type Case = (
        &'static [(&'static str, &'static str)],
        &'static [(&'static str, &'static str)],
        &'static [(&'static str, &'static str)],
        Option<&'static str>,
    );

    #[test]
    fn every_reason_is_decided_with_the_namespace_part_computed_once() {
        let revisions = Revisions {
            live: BTreeMap::from([(
                "canary".to_string(),
                BTreeSet::from(["istio-system".to_string()]),
            )]),
            ..Revisions::default()
        };
        let none = labels(&[]);
        let cases: [Case; 10] = [
            (&[("istio-injection", "enabled")], &[], &[], None),
            (&[("istio.io/rev", "canary")], &[], &[], None),
            (
                &[("istio.io/dataplane-mode", "ambient")],
                &[],
                &[],
                Some("ambient namespace"),
            ),
            (
                &[("istio-injection", "enabled")],
                &[(INJECT, "false")],
                &[],
                Some("sidecar.istio.io/inject is false"),
            ),
            (
                &[("istio-injection", "enabled")],
                &[],
                &[(INJECT_TEMPLATES, "gateway")],
                Some(
                    "Istio gateway (inject.istio.io/templates: gateway), held by the gateways section",
                ),
            ),
            (
                &[("istio.io/rev", "gone")],
                &[],
                &[],
                Some("the namespace's istio.io/rev names no live revision or tag"),
            ),
            (
                &[("istio-injection", "disabled"), ("istio.io/rev", "canary")],
                &[(INJECT, "true")],
                &[],
                Some("injection disabled in the namespace"),
            ),
            (
                &[],
                &[("istio.io/rev", "gone")],
                &[],
                Some("the pod's istio.io/rev names no live revision or tag"),
            ),
            (&[], &[("istio.io/rev", "canary")], &[], None),
            (
                &[],
                &[],
                &[],
                Some("injection is not on for the namespace or the pod"),
            ),
        ];
        for (ns, tpl, ann, want) in cases {
            let (ns, tpl, ann) = (labels(ns), labels(tpl), labels(ann));
            let once = NamespaceInjection::of(&ns, &revisions);
            assert_eq!(
                once.no_sidecar_reason(&tpl, &ann, &revisions),
                want,
                "{ns:?} {tpl:?} {ann:?}"
            );
            assert_eq!(no_sidecar_reason(&ns, &tpl, &ann, &revisions), want);
        }
        assert_eq!(
            NamespaceInjection::of(&none, &revisions).no_sidecar_reason(
                &labels(&[(INJECT, "true")]),
                &none,
                &revisions
            ),
            None
        );
    }
}
