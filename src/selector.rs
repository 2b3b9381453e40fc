//! Label selectors of a policy, evaluated with kube's own [`Selector`]: in memory against
//! labels the operator already holds, or as a query for list and watch calls.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};

/// A query no object matches, for a selector kube cannot read (the CRD admits only the four
/// operators kube knows, so this is a safety net, never a way to select everything).
const NOTHING: &str = "meshwarden.io/unreadable-selector,!meshwarden.io/unreadable-selector";

/// True when `labels` satisfy `selector`. An empty selector matches everything; one kube
/// cannot read matches nothing.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// The selector in Kubernetes' query syntax (`a=b,c in (d,e)`), for list/watch calls.
pub fn to_query(selector: &LabelSelector) -> String {
    Selector::try_from(selector.clone()).map_or_else(|_| NOTHING.to_string(), |s| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn match_labels_and_expressions() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("istio", "ingressgateway")])),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "NotIn".into(),
                values: Some(vec!["test".into()]),
            }]),
        };
        assert!(matches(&sel, &labels(&[("istio", "ingressgateway")])));
        assert!(!matches(
            &sel,
            &labels(&[("istio", "ingressgateway"), ("tier", "test")])
        ));
        assert!(!matches(&sel, &labels(&[("istio", "egressgateway")])));
        assert!(matches(&LabelSelector::default(), &labels(&[])));
        assert_eq!(to_query(&sel), "istio=ingressgateway,tier notin (test)");
        let bad = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "tier".into(),
                operator: "Near".into(),
                values: None,
            }]),
            ..Default::default()
        };
        assert!(!matches(&bad, &labels(&[("tier", "x")])));
        assert_eq!(to_query(&bad), NOTHING);
    }
}
