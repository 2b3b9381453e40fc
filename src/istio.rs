//! What Istio itself decides, in one place for every rule: whether its sidecar injector
//! injects the pods of a namespace.

use std::collections::BTreeMap;

/// Namespace label of the default injector (`enabled` turns injection on).
pub const INJECTION_LABEL: &str = "istio-injection";
/// Namespace (or pod) label naming the revision whose injector injects.
pub const REVISION_LABEL: &str = "istio.io/rev";

/// Whether Istio's injector injects every pod of a namespace with these labels. It follows the
/// namespace selectors of the injector webhooks in the istio-discovery chart
/// (`MutatingWebhookConfiguration` `istio-sidecar-injector`):
/// - `namespace.sidecar-injector.istio.io` selects `istio-injection In [enabled]`;
/// - `rev.namespace.sidecar-injector.istio.io` selects `istio.io/rev In [<revision>]` **and**
///   `istio-injection DoesNotExist`.
///
/// So any other value of `istio-injection` (`disabled`) switches injection off even when
/// `istio.io/rev` is set, and `istio.io/rev` alone turns it on.
pub fn namespace_injection_on(ns_labels: &BTreeMap<String, String>) -> bool {
    match ns_labels.get(INJECTION_LABEL).map(String::as_str) {
        Some("enabled") => true,
        Some(_) => false,
        None => ns_labels.contains_key(REVISION_LABEL),
    }
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

    #[test]
    fn injection_follows_the_injector_webhook_selectors() {
        assert!(namespace_injection_on(&labels(&[(
            "istio-injection",
            "enabled"
        )])));
        assert!(namespace_injection_on(&labels(&[(
            "istio.io/rev",
            "canary"
        )])));
        assert!(namespace_injection_on(&labels(&[
            ("istio-injection", "enabled"),
            ("istio.io/rev", "canary")
        ])));
        assert!(
            !namespace_injection_on(&labels(&[
                ("istio-injection", "disabled"),
                ("istio.io/rev", "canary")
            ])),
            "istio-injection=disabled wins over a revision label"
        );
        assert!(!namespace_injection_on(&labels(&[])));
    }
}
