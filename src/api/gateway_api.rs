//! The `gatewayApi` section of a MeshPolicy: high availability of the gateways and waypoints
//! istiod deploys for Gateway API `Gateway` objects, held through istiod's own customization
//! (the class-defaults ConfigMap), never by patching what istiod renders.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{DisruptionBudgetSpec, Enforcement, ResourcesSpec, SpreadMode, SpreadSpec};

/// The `gatewayApi` section: the GatewayClasses whose gateways are held, and single Gateways
/// held by name.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.classes) || has(self.gateways)",
        "message": "declare classes, gateways or both: the section holds nothing",
        "fieldPath": ".classes",
        "reason": "FieldValueRequired"
    }
]))]
pub struct GatewayApiSpec {
    /// Overrides `spec.enforcement` for this section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// The GatewayClasses whose gateways are held, one entry per class: every Gateway of
    /// that class in any namespace. `istio` for ingress gateways, `istio-waypoint` for
    /// ambient waypoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["className"]))]
    pub classes: Vec<GatewayClassSpec>,
    /// Single Gateways, by name and namespace, held through a ConfigMap of their own that
    /// their `spec.infrastructure.parametersRef` names (istiod layers it over the class's
    /// defaults). A Gateway listed here is held by this entry, not by its class's: what the
    /// entry declares overrides the class entry for that Gateway; what it leaves out stays
    /// the class entry's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 32))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["namespace", "name"]))]
    pub gateways: Vec<GatewayRefSpec>,
}

/// The posture of the gateway istiod deploys for one Gateway, selected by name.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayRefSpec {
    /// Name of the Gateway (not of the Deployment istiod renders for it).
    #[schemars(schema_with = "gateway_name")]
    pub name: String,
    /// Namespace of the Gateway.
    #[schemars(schema_with = "namespace_name")]
    pub namespace: String,
    #[serde(flatten)]
    pub posture: GatewayPosture,
}

/// The posture of every gateway istiod deploys for the Gateways of one class.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayClassSpec {
    /// Name of the GatewayClass (`istio`, `istio-waypoint`).
    #[schemars(schema_with = "class_name")]
    pub class_name: String,
    #[serde(flatten)]
    pub posture: GatewayPosture,
}

/// What a `gatewayApi` entry declares for a gateway istiod deploys.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.replicas) || !has(self.disruptionBudget) || !has(self.disruptionBudget.minAvailable) || (type(self.disruptionBudget.minAvailable) == string ? self.replicas.min - (self.replicas.min * int(self.disruptionBudget.minAvailable.replace('%', '')) + 99) / 100 >= 1 : self.disruptionBudget.minAvailable < self.replicas.min)",
        "message": "disruptionBudget.minAvailable leaves no gateway pod that may be disrupted at replicas.min (node drains block): lower minAvailable or raise replicas.min",
        "fieldPath": ".disruptionBudget.minAvailable",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct GatewayPosture {
    /// Replicas of each gateway, through the HorizontalPodAutoscaler istiod renders for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<GatewayApiReplicas>,
    /// The PodDisruptionBudget istiod renders for each gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption_budget: Option<DisruptionBudgetSpec>,
    /// Spreading of each gateway's pods over nodes and zones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<GatewayApiSpread>,
    /// Requests and limits of the gateway's proxy container (`istio-proxy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesSpec>,
}

/// Replicas of a gateway istiod deploys: istiod renders a HorizontalPodAutoscaler with these
/// bounds (its Deployment declares no replica count of its own).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.max) || self.max >= self.min",
        "message": "max must not be lower than min: raise max or lower min",
        "fieldPath": ".max",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct GatewayApiReplicas {
    /// Lowest number of replicas (the HPA's `minReplicas`).
    #[schemars(range(min = 1, max = 1000))]
    pub min: i32,
    /// Highest number of replicas (the HPA's `maxReplicas`); defaults to `min`, so the count
    /// is held at `min`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: Option<i32>,
}

/// Spreading of one gateway's pods over nodes and zones (among the pods of the same Gateway).
/// Unlike `controlPlane.spread` there is no `rebalance`: istiod owns the gateway's pods.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayApiSpread {
    /// Pod anti-affinity on `kubernetes.io/hostname`. Changing it rolls the pods.
    #[serde(default)]
    pub nodes: SpreadMode,
    /// Topology spread constraint on `topology.kubernetes.io/zone`. Changing it rolls the pods.
    #[serde(default)]
    pub zones: SpreadMode,
}

impl From<&GatewayApiSpread> for SpreadSpec {
    fn from(s: &GatewayApiSpread) -> Self {
        SpreadSpec {
            nodes: s.nodes,
            zones: s.zones,
            rebalance: super::Rebalance::Off,
        }
    }
}

fn class_name(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 63,
        "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        "description": "A GatewayClass name (lowercase letters, digits, '-' and '.')."
    })
}

fn gateway_name(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 253,
        "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        "description": "A Gateway name (lowercase letters, digits, '-' and '.')."
    })
}

fn namespace_name(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 63,
        "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        "description": "A namespace name (lowercase letters, digits and '-')."
    })
}
