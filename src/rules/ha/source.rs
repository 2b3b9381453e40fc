//! Fixing drift at its source: which installer wrote an object (a Helm release, the Sail
//! operator, a GitOps tool applying rendered charts), and which of its values sets what
//! meshwarden holds, so that the condition can say what to change there for the drift to stop
//! for good.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::api::DisruptionBudgetSpec;

/// Label and annotations Helm puts on every object of a release.
const HELM_MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "Helm");
const HELM_RELEASE: &str = "meta.helm.sh/release-name";
const HELM_NAMESPACE: &str = "meta.helm.sh/release-namespace";
/// What the Sail operator puts on every object it installs: its post-renderer adds the label
/// `managed-by: sail-operator` and a controller owner reference to the `IstioRevision`
/// (`sailoperator.io/v1`); it installs through Helm's library, whose field manager is the
/// binary's name, `sail-operator`.
const SAIL_LABEL: (&str, &str) = ("managed-by", "sail-operator");
const SAIL_MANAGER: &str = "sail-operator";
const SAIL_GROUP: &str = "sailoperator.io/";
/// The field manager of Argo CD's server-side syncs (`ArgoCDSSAManager`); they apply with
/// `--force-conflicts`.
const ARGOCD_MANAGER: &str = "argocd-controller";
/// The field manager of `helm install`/`upgrade`/`rollback`, Helm 3 (client-side) and Helm 4.
const HELM_MANAGER: &str = "helm";

/// A Helm release, as recognised from an object it installed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Release {
    pub name: String,
    pub namespace: String,
}

/// Who renders an object and writes it back: where a value has to change for good.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Installer {
    /// `helm install`/`helm upgrade` of Istio's charts.
    Helm(Release),
    /// The Sail operator, from the `Istio` resource that owns this `IstioRevision` (or the
    /// `IstioRevision` itself when it was created directly): `spec.values`.
    Sail { revision: String },
    /// Argo CD syncing Istio's charts, rendered from the Application's Helm values in Git.
    ArgoCd,
}

fn has_label(meta: &ObjectMeta, (k, v): (&str, &str)) -> bool {
    meta.labels
        .as_ref()
        .is_some_and(|l| l.get(k).map(String::as_str) == Some(v))
}

/// The Helm release that installed an object, if Helm did.
pub fn helm_release(meta: &ObjectMeta) -> Option<Release> {
    if !has_label(meta, HELM_MANAGED_BY) {
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

/// The installer of an object. The Sail operator installs through Helm's library, so its
/// objects carry a Helm release too (`<revision>-istiod`); it is checked first, since running
/// `helm upgrade` on that release would be undone by the operator.
pub fn installer(meta: &ObjectMeta) -> Option<Installer> {
    let sail_owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.kind == "IstioRevision" && o.api_version.starts_with(SAIL_GROUP));
    if let Some(o) = sail_owner {
        return Some(Installer::Sail {
            revision: o.name.clone(),
        });
    }
    if has_label(meta, SAIL_LABEL) || crate::write::fields::has_manager(meta, SAIL_MANAGER) {
        let revision = helm_release(meta)
            .and_then(|r| r.name.strip_suffix("-istiod").map(str::to_string))
            .unwrap_or_else(|| "default".into());
        return Some(Installer::Sail { revision });
    }
    if let Some(r) = helm_release(meta) {
        return Some(Installer::Helm(r));
    }
    crate::write::fields::has_manager(meta, ARGOCD_MANAGER).then_some(Installer::ArgoCd)
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

impl Installer {
    /// The field manager this installer writes with. Its writes re-apply its own render (an
    /// upgrade, a rollback, a sync or self-heal): meshwarden restores the posture after them
    /// without counting them toward a fight.
    pub fn manager(&self) -> &'static str {
        match self {
            Installer::Helm(_) => HELM_MANAGER,
            Installer::Sail { .. } => SAIL_MANAGER,
            Installer::ArgoCd => ARGOCD_MANAGER,
        }
    }

    /// The key that sets `v` in this installer, or None when it has none. The Sail operator
    /// passes `spec.values.pilot` to the istiod chart, which reads `pilot.*` as its top-level
    /// values; its values API (Istio's `PilotConfig`) has no PodDisruptionBudget field.
    pub fn key(&self, container: &str, v: Value) -> Option<String> {
        match self {
            Installer::Sail { .. } => match v {
                Value::MinAvailable | Value::MaxUnavailable => None,
                _ => Some(format!("spec.values.pilot.{}", chart_key(container, v))),
            },
            Installer::Helm(_) | Installer::ArgoCd => Some(chart_key(container, v).to_string()),
        }
    }

    /// Where the values live, e.g. "Helm release istiod (namespace istio-system)".
    pub fn place(&self) -> String {
        match self {
            Installer::Helm(r) => format!("Helm release {} (namespace {})", r.name, r.namespace),
            Installer::Sail { revision } => format!(
                "the Sail operator's Istio resource that owns IstioRevision {revision} (or that IstioRevision, if it was created directly)"
            ),
            Installer::ArgoCd => {
                "the Helm values of the Argo CD Application in Git (Argo CD applies as argocd-controller and re-applies its manifests on every sync)".into()
            }
        }
    }

    /// How to make an installer carry a values file that `meshwarden values` printed.
    pub fn how(&self) -> String {
        match self {
            Installer::Helm(r) => format!(
                "helm upgrade {} <chart> -n {} --reuse-values -f <this file>",
                r.name, r.namespace
            ),
            Installer::Sail { revision } => format!(
                "merge into the spec of the Istio resource that owns IstioRevision {revision}: kubectl patch istio <name> --type merge --patch-file <this file>"
            ),
            Installer::ArgoCd => {
                "merge into the Application's Helm values in Git; Argo CD renders them on its next sync".into()
            }
        }
    }
}

fn ios(v: &IntOrString) -> String {
    match v {
        IntOrString::Int(i) => i.to_string(),
        IntOrString::String(s) => s.clone(),
    }
}

/// The sentence telling how to declare the budget in the installer of `pdb`.
pub fn budget_hint<K: Resource>(container: &str, pdb: &K, want: &DisruptionBudgetSpec) -> String {
    let Some(installer) = installer(pdb.meta()) else {
        return ": declare the budget where this PodDisruptionBudget comes from".into();
    };
    let (v, value) = match (&want.min_available, &want.max_unavailable) {
        (Some(m), _) => (Value::MinAvailable, ios(m)),
        (None, Some(m)) => (Value::MaxUnavailable, ios(m)),
        (None, None) => return String::new(),
    };
    match (&installer, installer.key(container, v)) {
        (Installer::Helm(r), Some(key)) => format!(
            ": set {key}={value} in {}, e.g. helm upgrade {} <chart> -n {} --reuse-values --set {key}={value}",
            installer.place(),
            r.name,
            r.namespace
        ),
        (_, Some(key)) => format!(": set {key}={value} in {}", installer.place()),
        (_, None) => format!(
            ": {} has no value for this budget (spec.values.pilot has no pdb), so it cannot be declared at the source; replace the chart's PodDisruptionBudget or leave its form as it is",
            installer.place()
        ),
    }
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
            "{} (deployed by istiod for Gateway {gateway}: meshwarden does not patch it; hold its GatewayClass with spec.gatewayApi instead, or set it in the ConfigMap the Gateway's spec.infrastructure.parametersRef names, with deployment, horizontalPodAutoscaler and podDisruptionBudget overlays)",
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

    /// What the Sail operator's post-renderer and Helm's library put on istiod's objects.
    fn sail_meta(with_owner: bool) -> ObjectMeta {
        serde_json::from_value(serde_json::json!({
            "name": "istiod", "namespace": "istio-system",
            "labels": {"app.kubernetes.io/managed-by": "Helm", "managed-by": "sail-operator"},
            "annotations": {"meta.helm.sh/release-name": "default-istiod", "meta.helm.sh/release-namespace": "istio-system"},
            "ownerReferences": if with_owner { serde_json::json!([{
                "apiVersion": "sailoperator.io/v1", "kind": "IstioRevision", "name": "prod",
                "uid": "1", "controller": true, "blockOwnerDeletion": true
            }]) } else { serde_json::json!([]) },
            "managedFields": [{"manager": "sail-operator", "operation": "Update", "apiVersion": "apps/v1"}]
        }))
        .unwrap()
    }

    #[test]
    fn the_sail_operator_wins_over_the_helm_release_it_installs_through() {
        let owned = installer(&sail_meta(true)).unwrap();
        assert_eq!(
            owned,
            Installer::Sail {
                revision: "prod".into()
            }
        );
        // Without the owner reference: the label, and the revision from the release name.
        assert_eq!(
            installer(&sail_meta(false)),
            Some(Installer::Sail {
                revision: "default".into()
            })
        );
        assert_eq!(
            owned.key("discovery", Value::HpaMin).as_deref(),
            Some("spec.values.pilot.autoscaleMin")
        );
        assert_eq!(
            owned.key("discovery", Value::Resources).as_deref(),
            Some("spec.values.pilot.resources")
        );
        assert_eq!(
            owned.key("discovery", Value::Replicas).as_deref(),
            Some("spec.values.pilot.replicaCount")
        );
        assert_eq!(owned.key("discovery", Value::MaxUnavailable), None);
        assert!(
            owned
                .place()
                .contains("Istio resource that owns IstioRevision prod")
        );
        let pdb = PodDisruptionBudget {
            metadata: sail_meta(true),
            ..Default::default()
        };
        let want = DisruptionBudgetSpec {
            min_available: None,
            max_unavailable: Some(IntOrString::Int(1)),
        };
        let hint = budget_hint("discovery", &pdb, &want);
        assert!(hint.contains("has no value for this budget"), "{hint}");
        assert!(!hint.contains("helm upgrade"), "{hint}");
    }

    #[test]
    fn argo_cd_is_recognised_by_its_field_manager() {
        let meta: ObjectMeta = serde_json::from_value(serde_json::json!({
            "name": "istiod",
            "labels": {"app.kubernetes.io/managed-by": "Helm", "helm.sh/chart": "istiod-1.31.0"},
            "managedFields": [{"manager": "argocd-controller", "operation": "Apply", "apiVersion": "apps/v1"}]
        }))
        .unwrap();
        let found = installer(&meta).unwrap();
        assert_eq!(found, Installer::ArgoCd);
        assert_eq!(
            found.key("discovery", Value::HpaMin).as_deref(),
            Some("autoscaleMin")
        );
        assert!(found.place().contains("Argo CD Application in Git"));
        assert_eq!(found.manager(), "argocd-controller");
        let mut other = meta.clone();
        other.managed_fields = None;
        assert_eq!(installer(&other), None);
    }
}
