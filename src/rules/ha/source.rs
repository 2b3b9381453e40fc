//! Fixing drift at its source: which Helm release installed an object, and which value of
//! Istio's charts sets what meshwarden holds, so that the condition can say what to change in
//! the installer for the drift to stop for good.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::api::DisruptionBudgetSpec;

/// Label and annotations Helm puts on every object of a release.
const HELM_MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "Helm");
const HELM_RELEASE: &str = "meta.helm.sh/release-name";
const HELM_NAMESPACE: &str = "meta.helm.sh/release-namespace";

/// A Helm release, as recognised from an object it installed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Release {
    pub name: String,
    pub namespace: String,
}

/// The Helm release that installed an object, if Helm did.
pub fn helm_release(meta: &ObjectMeta) -> Option<Release> {
    let labels = meta.labels.as_ref()?;
    if labels.get(HELM_MANAGED_BY.0).map(String::as_str) != Some(HELM_MANAGED_BY.1) {
        return None;
    }
    let ann = meta.annotations.as_ref()?;
    Some(Release {
        name: ann.get(HELM_RELEASE)?.clone(),
        namespace: ann
            .get(HELM_NAMESPACE)
            .cloned()
            .or_else(|| meta.namespace.clone())
            .unwrap_or_default(),
    })
}

/// What meshwarden holds, in the terms of Istio's charts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value {
    HpaMin,
    Replicas,
    MinAvailable,
    MaxUnavailable,
    Resources,
    Affinity,
    TopologySpread,
}

/// The chart value that sets `v`: istio-discovery (container `discovery`) or gateway.
pub fn chart_key(container: &str, v: Value) -> &'static str {
    let istiod = container == "discovery";
    match v {
        Value::HpaMin if istiod => "autoscaleMin",
        Value::HpaMin => "autoscaling.minReplicas",
        Value::Replicas => "replicaCount",
        Value::MinAvailable if istiod => "pdb.minAvailable",
        Value::MinAvailable => "podDisruptionBudget.minAvailable",
        Value::MaxUnavailable if istiod => "pdb.maxUnavailable",
        Value::MaxUnavailable => "podDisruptionBudget.maxUnavailable",
        Value::Resources => "resources",
        Value::Affinity => "affinity",
        Value::TopologySpread => "topologySpreadConstraints",
    }
}

fn ios(v: &IntOrString) -> String {
    match v {
        IntOrString::Int(i) => i.to_string(),
        IntOrString::String(s) => s.clone(),
    }
}

/// The sentence telling how to declare the budget in the installer of `pdb` (empty when no
/// Helm release installed it).
pub fn budget_hint<K: Resource>(container: &str, pdb: &K, want: &DisruptionBudgetSpec) -> String {
    let Some(release) = helm_release(pdb.meta()) else {
        return ": declare the budget where this PodDisruptionBudget comes from".into();
    };
    let (key, value) = match (&want.min_available, &want.max_unavailable) {
        (Some(m), _) => (chart_key(container, Value::MinAvailable), ios(m)),
        (None, Some(m)) => (chart_key(container, Value::MaxUnavailable), ios(m)),
        (None, None) => return String::new(),
    };
    format!(
        ": set {key}={value} in Helm release {} (namespace {}), e.g. helm upgrade {} <chart> -n {} --reuse-values --set {key}={value}",
        release.name, release.namespace, release.name, release.namespace
    )
}

/// The Gateway whose Deployment istiod renders (label `gateway.istio.io/managed`, or an owner
/// reference to a `gateway.networking.k8s.io` Gateway), if this Deployment is one.
pub fn istiod_gateway(meta: &ObjectMeta) -> Option<String> {
    let owner =
        meta.owner_references.iter().flatten().find(|o| {
            o.kind == "Gateway" && o.api_version.starts_with("gateway.networking.k8s.io/")
        });
    let labelled = meta
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key("gateway.istio.io/managed"));
    match owner {
        Some(o) => Some(o.name.clone()),
        None if labelled => Some(
            meta.labels
                .as_ref()
                .and_then(|l| l.get("gateway.networking.k8s.io/gateway-name"))
                .or(meta.name.as_ref())
                .cloned()
                .unwrap_or_default(),
        ),
        None => None,
    }
}

/// A plan that writes nothing: istiod re-renders and force-applies the Deployment, HPA and PDB
/// of the gateways it deploys on every change, so patching them would only start a fight that
/// rolls the gateway each round. The deviations are reported with the supported way to change
/// them.
pub fn report_only(mut plan: super::Plan, gateway: &str) -> super::Plan {
    plan.deployment_patch = None;
    plan.hpa_patch = None;
    plan.pdb = None;
    plan.rolls_pods = false;
    plan.takeovers.clear();
    for f in &mut plan.findings {
        f.fixable = false;
        f.message = format!(
            "{} (deployed by istiod for Gateway {gateway}: meshwarden does not patch it; set it in the ConfigMap the Gateway's spec.infrastructure.parametersRef names, with deployment, horizontalPodAutoscaler and podDisruptionBudget overlays)",
            f.message
        );
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;

    #[test]
    fn recognises_a_helm_release_and_names_the_chart_value() {
        let pdb: PodDisruptionBudget = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "istiod", "namespace": "istio-system",
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {"meta.helm.sh/release-name": "istiod", "meta.helm.sh/release-namespace": "istio-system"}
            }
        }))
        .unwrap();
        let want = DisruptionBudgetSpec {
            min_available: None,
            max_unavailable: Some(IntOrString::Int(1)),
        };
        let hint = budget_hint("discovery", &pdb, &want);
        assert!(
            hint.contains("set pdb.maxUnavailable=1 in Helm release istiod"),
            "{hint}"
        );
        assert!(
            budget_hint("istio-proxy", &pdb, &want)
                .contains("podDisruptionBudget.maxUnavailable=1")
        );
        let mut plain = pdb.clone();
        plain.metadata.annotations = None;
        assert!(helm_release(&plain.metadata).is_none());
    }
}
