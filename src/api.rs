//! The `MeshPolicy` custom resource (`meshwarden.io/v1alpha1`).
//!
//! Everything a user can write is declared here, with its documentation (which becomes
//! `kubectl explain` text), its defaults and its validation. Validation that spans fields is
//! written as CEL rules so that the API server itself rejects a bad policy, before the
//! operator ever sees it.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, ValidationRule,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod upgrades;
pub use upgrades::*;
mod ambient;
pub use ambient::{AmbientCheck, AmbientSpec};
mod certificates;
mod gateway_api;
mod mtls;
mod resilience;
mod security;
pub use certificates::{
    CertificatesSpec, CertificatesStatus, GO_DURATION_PATTERN, RootCertificateStatus, SecretRef,
};
pub use gateway_api::{
    GatewayApiReplicas, GatewayApiSpec, GatewayApiSpread, GatewayClassSpec, GatewayPosture,
    GatewayRefSpec,
};
pub use mtls::*;
pub use resilience::{Requirement, ResilienceSpec};
pub use security::{DefaultDeny, SecuritySpec};

/// API group of every meshwarden resource.
pub const GROUP: &str = "meshwarden.io";

/// Desired production posture of an Istio mesh.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "meshwarden.io",
    version = "v1alpha1",
    kind = "MeshPolicy",
    plural = "meshpolicies",
    shortname = "mpol",
    category = "meshwarden",
    status = "MeshPolicyStatus",
    doc = "MeshPolicy declares what production posture means for an Istio mesh: control-plane and gateway high availability, sidecar resources and mutual TLS. meshwarden holds the mesh there and reports in status.",
    printcolumn = r#"{"name":"Enforcement","type":"string","jsonPath":".spec.enforcement"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Violations","type":"integer","jsonPath":".status.violationCount"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.controlPlane) || !has(self.controlPlane.replicas) || !has(self.controlPlane.disruptionBudget) || !has(self.controlPlane.disruptionBudget.minAvailable) || type(self.controlPlane.disruptionBudget.minAvailable) == string || self.controlPlane.disruptionBudget.minAvailable < self.controlPlane.replicas.min",
        "message": "controlPlane.disruptionBudget.minAvailable must be lower than controlPlane.replicas.min, otherwise the budget forbids every voluntary disruption (node drains block): lower minAvailable or raise replicas.min",
        "fieldPath": ".controlPlane.disruptionBudget.minAvailable",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.controlPlane) || !has(self.controlPlane.replicas) || !has(self.controlPlane.disruptionBudget) || !has(self.controlPlane.disruptionBudget.minAvailable) || type(self.controlPlane.disruptionBudget.minAvailable) != string || self.controlPlane.replicas.min - (self.controlPlane.replicas.min * int(self.controlPlane.disruptionBudget.minAvailable.replace('%', '')) + 99) / 100 >= 1",
        "message": "controlPlane.disruptionBudget.minAvailable as a percentage of controlPlane.replicas.min leaves no pod that may be disrupted (node drains block): lower the percentage or raise replicas.min",
        "fieldPath": ".controlPlane.disruptionBudget.minAvailable",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.gateways) || self.gateways.all(g, !has(g.replicas) || !has(g.disruptionBudget) || !has(g.disruptionBudget.minAvailable) || (type(g.disruptionBudget.minAvailable) == string ? g.replicas.min - (g.replicas.min * int(g.disruptionBudget.minAvailable.replace('%', '')) + 99) / 100 >= 1 : g.disruptionBudget.minAvailable < g.replicas.min))",
        "message": "gateways[].disruptionBudget.minAvailable leaves no gateway pod that may be disrupted at replicas.min (node drains block): lower minAvailable or raise replicas.min",
        "fieldPath": ".gateways",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct MeshPolicySpec {
    /// Default enforcement of every rule section: `Enforce` corrects the mesh with server-side
    /// apply; `Audit` only reports deviations in status, events and logs and writes nothing to
    /// the mesh. Each section may override it. Defaults to `Audit`, so a new policy is safe to try.
    #[serde(default)]
    pub enforcement: Enforcement,

    /// High availability of istiod: every revision's Deployment (label `app=istiod`) in the
    /// control-plane namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlaneSpec>,

    /// High availability of mesh gateways: one entry per set of gateway Deployments, chosen by
    /// namespace and label selector. Entry names are unique; two entries that select the same
    /// Deployment are reported as a conflict.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub gateways: Vec<GatewaySpec>,

    /// High availability of the gateways and waypoints istiod deploys for Gateway API
    /// Gateways, per GatewayClass through istiod's class-defaults ConfigMap, and per Gateway
    /// through a ConfigMap its `spec.infrastructure.parametersRef` names (Istio 1.26 and
    /// later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_api: Option<GatewayApiSpec>,

    /// Resources of the injected `istio-proxy` sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<SidecarSpec>,

    /// Mutual TLS between workloads, enforced with Istio `PeerAuthentication` objects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSpec>,

    /// Upgrade posture: istiod revisions and revision tags, and the revision and version of
    /// every injected proxy (mesh-wide).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrades: Option<UpgradesSpec>,
    /// Expiry of the mesh's root certificates, read from Istio's public `istio-ca-root-cert`
    /// ConfigMaps (no access to Secrets needed). Reports only; never writes to the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<CertificatesSpec>,
    /// The ambient data plane: ztunnel and istio-cni against the production settings of
    /// Istio's charts, ready on every node that runs ambient pods, at istiod's version.
    /// Reports only; never writes to the mesh, whatever `enforcement` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ambient: Option<AmbientSpec>,
    /// Fault tolerance of every Service's traffic: the DestinationRule its clients actually
    /// get (outlier detection, connection pool limits) and the root settings it shadows.
    /// Reports only; never writes to the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resilience: Option<ResilienceSpec>,
    /// Security hardening: namespaces without a default deny, `outboundTrafficPolicy`, and
    /// the CA istiod signs with (self-signed, plugged-in, external). Reports only; never
    /// writes to the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<SecuritySpec>,
}

/// Whether a rule corrects the mesh or only reports.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Enforcement {
    /// Correct deviations with server-side apply (field manager `meshwarden`).
    Enforce,
    /// Report deviations only; write nothing to the mesh.
    #[default]
    Audit,
}

/// How strongly pods are spread over a topology domain.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SpreadMode {
    /// Pods must not share a domain: a pod that cannot be placed stays Pending.
    Required,
    /// Pods are spread when the scheduler can; placement never fails because of it.
    #[default]
    Preferred,
    /// No spreading is added (what the pod template already has is left alone).
    Off,
}

/// Minimum replica count.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicasSpec {
    /// Lowest number of replicas. When a HorizontalPodAutoscaler owns the count, its
    /// `minReplicas` is raised instead (and `maxReplicas` when it is lower); a count already
    /// higher is never lowered.
    #[schemars(range(min = 1, max = 1000))]
    pub min: i32,
}

/// The PodDisruptionBudget that covers a Deployment's pods. Exactly one of `minAvailable` and
/// `maxUnavailable` is set.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.minAvailable) != has(self.maxUnavailable)",
        "message": "set exactly one of minAvailable and maxUnavailable"
    },
    {
        "rule": "!has(self.maxUnavailable) || (type(self.maxUnavailable) == string ? int(self.maxUnavailable.replace('%', '')) > 0 : self.maxUnavailable > 0)",
        "message": "maxUnavailable must be above 0: a budget of 0 forbids every voluntary disruption, so node drains block",
        "fieldPath": ".maxUnavailable",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.minAvailable) || type(self.minAvailable) != string || int(self.minAvailable.replace('%', '')) < 100",
        "message": "minAvailable of 100% forbids every voluntary disruption, so node drains block: use a lower percentage or maxUnavailable",
        "fieldPath": ".minAvailable",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct DisruptionBudgetSpec {
    /// Pods that must stay available during voluntary disruptions: a count, or a percentage
    /// such as `50%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "int_or_percent")]
    pub min_available: Option<IntOrString>,
    /// Pods that may be unavailable during voluntary disruptions: a count above 0, or a
    /// percentage such as `25%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "int_or_percent")]
    pub max_unavailable: Option<IntOrString>,
}

/// Spreading of pods over nodes and zones.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpreadSpec {
    /// Pod anti-affinity on `kubernetes.io/hostname`. Changing it rolls the pods.
    #[serde(default)]
    pub nodes: SpreadMode,
    /// Topology spread constraint on `topology.kubernetes.io/zone`. Changing it rolls the pods.
    #[serde(default)]
    pub zones: SpreadMode,
    /// What meshwarden does when the pods run on one node or in one zone although others
    /// could take them (`SpreadNotAchieved`): `Off` reports it; `Evict` (Enforce only) also
    /// evicts one of those pods through the Eviction API, so that the scheduler places its
    /// replacement elsewhere: one pod per target at a time, only while every replica serves
    /// and the budgets allow a disruption, at most once per grace period.
    #[serde(default)]
    pub rebalance: Rebalance,
}

/// Whether meshwarden moves pods to achieve the declared spread.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Rebalance {
    /// Report only.
    #[default]
    Off,
    /// Evict one misplaced pod at a time (the budgets decide whether it may go now).
    Evict,
}

/// CPU and memory amounts.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceAmounts {
    /// CPU, as a Kubernetes quantity (`500m`, `"1"`, `2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "quantity")]
    pub cpu: Option<IntOrString>,
    /// Memory, as a Kubernetes quantity (`128Mi`, `2Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "quantity")]
    pub memory: Option<IntOrString>,
}

/// Resource requests and limits of one container. Limits may not be lower than requests.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.requests) || !has(self.limits) || !has(self.requests.cpu) || !has(self.limits.cpu) || quantity(string(self.limits.cpu)).compareTo(quantity(string(self.requests.cpu))) >= 0",
        "message": "limits.cpu is lower than requests.cpu: raise the limit or lower the request",
        "fieldPath": ".limits.cpu",
        "reason": "FieldValueInvalid"
    },
    {
        "rule": "!has(self.requests) || !has(self.limits) || !has(self.requests.memory) || !has(self.limits.memory) || quantity(string(self.limits.memory)).compareTo(quantity(string(self.requests.memory))) >= 0",
        "message": "limits.memory is lower than requests.memory: raise the limit or lower the request",
        "fieldPath": ".limits.memory",
        "reason": "FieldValueInvalid"
    }
]))]
pub struct ResourcesSpec {
    /// Requested CPU and memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceAmounts>,
    /// CPU and memory limits; not lower than the requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceAmounts>,
}

/// High availability of istiod.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlaneSpec {
    /// Overrides `spec.enforcement` for this section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// Namespace of the istiod Deployments. Every revision found there (label `app=istiod`)
    /// is held to this section.
    #[serde(default = "default_istio_namespace")]
    #[schemars(schema_with = "namespace_name")]
    pub namespace: String,
    /// Minimum istiod replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicasSpec>,
    /// The single PodDisruptionBudget covering each istiod revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption_budget: Option<DisruptionBudgetSpec>,
    /// Spreading of istiod pods over nodes and zones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<SpreadSpec>,
    /// Requests and limits of the `discovery` container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesSpec>,
}

/// High availability of one set of gateway Deployments.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Name of this entry (unique in the list), used in status and events.
    #[schemars(schema_with = "entry_name")]
    pub name: String,
    /// Overrides `spec.enforcement` for this entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// Namespace of the gateway Deployments.
    #[schemars(schema_with = "namespace_name")]
    pub namespace: String,
    /// Labels of the gateway Deployments' pods (for example `istio: ingressgateway`).
    #[schemars(schema_with = "label_selector")]
    pub selector: LabelSelector,
    /// Minimum gateway replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicasSpec>,
    /// The single PodDisruptionBudget covering each gateway Deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption_budget: Option<DisruptionBudgetSpec>,
    /// Spreading of gateway pods over nodes and zones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<SpreadSpec>,
    /// Requests and limits of the gateway's proxy container (`istio-proxy`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesSpec>,
}

/// Resources of injected sidecars.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Overrides `spec.enforcement` for this section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<Enforcement>,
    /// Namespaces whose workloads are held to this section. Default: every namespace with
    /// sidecar injection on (`istio-injection=enabled` or an `istio.io/rev` label).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "label_selector")]
    pub namespace_selector: Option<LabelSelector>,
    /// Requests and limits of the `istio-proxy` container.
    pub resources: ResourcesSpec,
    /// Workloads rolling at once because meshwarden changed their pod template; the next one
    /// starts only when the previous one is available again. Used when `pacing` is `Paced`.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 100))]
    pub max_concurrent_rollouts: i32,
    /// `Paced` (default): at most `maxConcurrentRollouts` workloads roll at once, and a stalled
    /// rollout stops the others. `Off`: every workload that needs the declared values is
    /// written at once, so all of them roll together (stalls are still reported); for a new
    /// cluster or a maintenance window with the capacity to spare.
    #[serde(default)]
    pub pacing: Pacing,
}

/// Whether sidecar rollouts are paced.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Pacing {
    /// At most `maxConcurrentRollouts` rollouts at once.
    #[default]
    Paced,
    /// No limit: every workload is written at once.
    Off,
}

/// Observed state of a MeshPolicy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshPolicyStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and one condition per rule section: `ControlPlaneHA`, `GatewayHA`,
    /// `GatewayAPIHA`, `SidecarResources`, `MutualTLS`, `Upgrades`, `Certificates`,
    /// `AmbientDataPlane`; `Conflict` when another policy wins a rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions")]
    pub conditions: Vec<Condition>,
    /// Current deviations from the policy (at most 50 listed; see `violationCount`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub violations: Vec<Violation>,
    /// Number of current deviations, including those not listed.
    #[serde(default)]
    pub violation_count: i32,
    /// Objects the policy applies to.
    #[serde(default)]
    pub targets: i32,
    /// Targets that meet the policy.
    #[serde(default)]
    pub compliant: i32,
    /// Corrections made since the spec last changed (metadata.generation).
    #[serde(default)]
    pub corrected: i32,
    /// Revisions, tags and proxies per revision and version (`spec.upgrades`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrades: Option<UpgradesStatus>,
    /// The root certificates the `certificates` section found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<CertificatesStatus>,
}

/// One deviation from the policy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Violation {
    /// Rule section: `ControlPlaneHA`, `GatewayHA`, `GatewayAPIHA`, `SidecarResources`,
    /// `MutualTLS`, `Upgrades`, `Certificates` or `AmbientDataPlane`.
    pub rule: String,
    /// The object, as `Kind/namespace/name`.
    pub object: String,
    /// What is wrong.
    pub message: String,
    /// What meshwarden did: `Reported` (reported only: Audit, or nothing it writes now),
    /// `Held` (Enforce, deliberately not written yet), `Skipped` (Enforce, left alone this
    /// time: a fight) or `Failed` (Enforce, the write was refused).
    pub action: ViolationAction,
}

/// What meshwarden did about one violation (`status.violations[].action`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ViolationAction {
    /// Audit, or nothing meshwarden may write: reported only.
    #[default]
    Reported,
    /// Enforce, but deliberately not written yet (the STRICT hold, a rollout slot).
    Held,
    /// Enforce, but left alone this time (a fight, a failed write retried later).
    Skipped,
    /// Enforce: the write was refused.
    Failed,
}

impl ViolationAction {
    pub const ALL: [ViolationAction; 4] = [
        ViolationAction::Reported,
        ViolationAction::Held,
        ViolationAction::Skipped,
        ViolationAction::Failed,
    ];

    /// The value in `status.violations[].action`.
    pub fn as_str(self) -> &'static str {
        match self {
            ViolationAction::Reported => "Reported",
            ViolationAction::Held => "Held",
            ViolationAction::Skipped => "Skipped",
            ViolationAction::Failed => "Failed",
        }
    }
}

impl PartialEq<&str> for ViolationAction {
    fn eq(&self, s: &&str) -> bool {
        self.as_str() == *s
    }
}

/// Longest MeshPolicy name: the name is the value of the label `meshwarden.io/policy` on
/// the objects meshwarden creates, and label values are limited to 63 characters.
pub const MAX_NAME_LENGTH: usize = 63;

/// The MeshPolicy CustomResourceDefinition as installed: the schema derived from these types
/// plus the rules on the object itself (its name).
pub fn crd() -> CustomResourceDefinition {
    let mut crd = MeshPolicy::crd();
    for version in &mut crd.spec.versions {
        if let Some(root) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            // Only `metadata.name` and `generateName` are visible to rules at the root.
            root.x_kubernetes_validations
                .get_or_insert_with(Vec::new)
                .push(ValidationRule {
                    rule: format!("self.metadata.name.size() <= {MAX_NAME_LENGTH}"),
                    message: Some(format!(
                        "metadata.name must be at most {MAX_NAME_LENGTH} characters: meshwarden writes it into the label meshwarden.io/policy of the objects it creates; choose a shorter name"
                    )),
                    reason: Some("FieldValueInvalid".into()),
                    ..Default::default()
                });
        }
    }
    crd
}

/// [`crd`] as YAML that kubectl and Helm read back as written (`meshwarden crd`, `crds/`).
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    crate::yaml::to_string(&crd())
}

pub(crate) fn default_istio_namespace() -> String {
    "istio-system".to_string()
}

fn default_one() -> i32 {
    1
}

fn default_permissive() -> MtlsMode {
    MtlsMode::PERMISSIVE
}

pub(crate) fn namespace_name(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 63,
        "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        "description": "A namespace name (RFC 1123 label)."
    })
}

fn int_or_percent(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        "maxLength": 4,
        "anyOf": [
            {"type": "integer", "minimum": 0},
            {"type": "string", "pattern": "^(100|[1-9]?[0-9])%$"}
        ],
        "description": "A pod count, or a percentage from 0% to 100%."
    })
}

fn quantity(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "x-kubernetes-int-or-string": true,
        "maxLength": 32,
        "anyOf": [
            {"type": "integer", "minimum": 0},
            {"type": "string", "maxLength": 32}
        ],
        "x-kubernetes-validations": [{
            "rule": "isQuantity(string(self)) && !quantity(string(self)).isLessThan(quantity('0'))",
            "message": "must be a non-negative Kubernetes quantity such as 500m, 1, 128Mi or 2Gi"
        }],
        "description": "A Kubernetes quantity such as 500m, 1, 128Mi or 2Gi."
    })
}

fn conditions(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "description": "A condition in Kubernetes' standard form.",
            "properties": {
                "type": {"type": "string", "description": "Condition type, such as Ready or ControlPlaneHA."},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"], "description": "True, False or Unknown."},
                "reason": {"type": "string", "description": "A CamelCase word a program can act on."},
                "message": {"type": "string", "description": "What a person should know, and how to act."},
                "observedGeneration": {"type": "integer", "format": "int64", "description": "The generation the condition describes."},
                "lastTransitionTime": {"type": "string", "format": "date-time", "description": "When status last changed."}
            },
            "required": ["type", "status", "reason", "message", "lastTransitionTime"]
        },
        "description": "Conditions, one per type."
    })
}

pub(crate) fn label_selector(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "description": "A Kubernetes label selector: matchLabels and/or matchExpressions, all of which must match.",
        "properties": {
            "matchLabels": {
                "type": "object",
                "maxProperties": 8,
                "additionalProperties": {"type": "string", "maxLength": 63},
                "description": "Labels that must all be present with these values."
            },
            "matchExpressions": {
                "type": "array",
                "maxItems": 4,
                "description": "Label requirements that must all hold.",
                "items": {
                    "type": "object",
                    "required": ["key", "operator"],
                    "properties": {
                        "key": {"type": "string", "maxLength": 63, "description": "Label key."},
                        "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"], "description": "In, NotIn, Exists or DoesNotExist."},
                        "values": {"type": "array", "maxItems": 8, "items": {"type": "string", "maxLength": 63}, "description": "Values for In and NotIn; empty for Exists and DoesNotExist."}
                    }
                }
            }
        },
        "x-kubernetes-map-type": "atomic"
    })
}

fn entry_name(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 63,
        "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        "description": "A short lowercase name (RFC 1123 label), unique in the list."
    })
}
