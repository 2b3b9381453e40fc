//! Every reason a condition can carry, and every action a violation can name. Conditions,
//! Events, metric labels and docs/reference.md use these words; a test keeps the reference
//! in step with [`ALL`].

/// The section holds: every target meets it.
pub const COMPLIANT: &str = "Compliant";
/// meshwarden corrected deviations in this reconcile; the section now holds.
pub const CORRECTED: &str = "Corrected";
/// Holds, but a field another manager set was taken over (change it at the source).
pub const FIELD_OWNED_BY_OTHER: &str = "FieldOwnedByOther";
/// The section is not set in the policy.
pub const NOT_CONFIGURED: &str = "NotConfigured";
/// Deviations reported (Audit, or nothing meshwarden may write).
pub const NON_COMPLIANT: &str = "NonCompliant";
/// The section selects nothing that exists.
pub const NO_TARGETS: &str = "NoTargets";
/// A deviation meshwarden cannot correct by writing (for example a HPA that caps replicas).
pub const CANNOT_CORRECT: &str = "CannotCorrect";
/// Another writer keeps reverting values meshwarden set; those fields are left alone for a while.
pub const FIGHT_DETECTED: &str = "FightDetected";
/// The API server refused a write (admission policy, change freeze, permission).
pub const WRITE_FAILED: &str = "WriteFailed";
/// A PodDisruptionBudget allows no disruption: node drains block.
pub const BUDGET_BLOCKS_DRAIN: &str = "BudgetBlocksDrain";
/// Fewer replicas serve than wanted (the declared minimum, the Deployment's or its HPA's
/// count) for longer than the grace period; the pods that do not serve are named with why.
pub const REPLICAS_UNAVAILABLE: &str = "ReplicasUnavailable";
/// The pods of a target run on one node, or in one zone while other zones could take them,
/// for longer than the grace period.
pub const SPREAD_NOT_ACHIEVED: &str = "SpreadNotAchieved";
/// A PodDisruptionBudget covering a target allows no disruption now (its status), for longer
/// than the grace period: draining the nodes named blocks.
pub const DRAIN_BLOCKED: &str = "DrainBlocked";
/// A target falls short of what the policy wants (replicas, spread, drains) for less than the
/// grace period: a rollout or a rescheduling under way.
pub const PROGRESSING: &str = "Progressing";
/// The gateway is rendered by istiod; meshwarden reports it and never patches it.
pub const MANAGED_BY_ISTIOD: &str = "ManagedByIstiod";
/// Somebody else keeps the class-defaults ConfigMap of a GatewayClass (istiod reads only the
/// oldest): meshwarden writes none and says what to add to theirs.
pub const CLASS_DEFAULTS_EXIST: &str = "ClassDefaultsExist";
/// A Gateway selected by name already references somebody else's parameters
/// (`spec.infrastructure.parametersRef`; istiod reads one per Gateway): meshwarden writes none
/// and says what to add to theirs.
pub const GATEWAY_PARAMETERS_EXIST: &str = "GatewayParametersExist";
/// A Gateway selected by name does not exist.
pub const GATEWAY_NOT_FOUND: &str = "GatewayNotFound";
/// istiod predates class-defaults ConfigMaps (Istio 1.26): nothing is written for Gateway API
/// gateways; the condition says what to create instead.
pub const ISTIO_TOO_OLD: &str = "IstioTooOld";
/// istiod's version cannot be read (no istiod runs, or its image has no version tag):
/// nothing is written for Gateway API gateways.
pub const ISTIO_VERSION_UNKNOWN: &str = "IstioVersionUnknown";
/// STRICT is held back while clients without a sidecar would be cut off.
pub const STRICT_HELD: &str = "StrictHeld";
/// Weaker user overrides exist and are reported, not rewritten (`mtls.overrides: Report`).
pub const OVERRIDES_REPORTED: &str = "OverridesReported";
/// STRICT is in force and clients without a sidecar are cut off by it.
pub const CLIENTS_CUT_OFF: &str = "ClientsCutOff";
/// A sidecar rollout meshwarden started stopped making progress.
pub const ROLLOUT_STALLED: &str = "RolloutStalled";
/// Sidecar rollouts are under way (paced).
pub const ROLLOUT_IN_PROGRESS: &str = "RolloutInProgress";
/// A rollout meshwarden would start is held (or never started): it would take the workload
/// below its availability (strategy, replica count, a PodDisruptionBudget), or roll no pod.
pub const ROLLOUT_HELD: &str = "RolloutHeld";
/// The declared proxy resources do not fit a LimitRange or ResourceQuota.
pub const QUOTA_CONFLICT: &str = "QuotaConflict";
/// `sidecars.resources` lacks a value the section needs.
pub const INCOMPLETE_RESOURCES: &str = "IncompleteResources";
/// A watch the section reads from failed and has not listed again.
pub const CACHE_NOT_SYNCED: &str = "CacheNotSynced";
/// `mtls.rootNamespace` disagrees with Istio's `meshConfig.rootNamespace`.
pub const ROOT_NAMESPACE_MISMATCH: &str = "RootNamespaceMismatch";
/// The revisions' mesh configs name different root namespaces, or one cannot be read.
pub const MESH_CONFIG_UNCLEAR: &str = "MeshConfigUnclear";
/// Istio's root namespace cannot be read from meshConfig now (a mesh config seen before is
/// gone, or one is not YAML): the mTLS writes that depend on it are held.
pub const ROOT_NAMESPACE_UNKNOWN: &str = "RootNamespaceUnknown";
/// A selected namespace's `istio.io/rev` names no live revision and no revision tag.
pub const UNKNOWN_REVISION: &str = "UnknownRevision";
/// A namespace has both `istio-injection=enabled` and `istio.io/rev`.
pub const INJECTION_LABELS_CONFLICT: &str = "InjectionLabelsConflict";
/// A revision tag points at a revision whose istiod no longer runs.
pub const TAG_WITHOUT_REVISION: &str = "TagWithoutRevision";
/// Running proxies belong to a revision whose istiod no longer runs.
pub const REVISION_NOT_RUNNING: &str = "RevisionNotRunning";
/// Running proxies are more minor versions behind their istiod than `maxMinorSkew` (or ahead).
pub const PROXY_VERSION_SKEW: &str = "ProxyVersionSkew";
/// A live revision is named only by pods that are not running.
pub const REVISION_KEPT_BY_IDLE_PODS: &str = "RevisionKeptByIdlePods";
/// A root certificate of the mesh expires within `certificates.warnBefore`.
pub const ROOT_CERTIFICATE_EXPIRING: &str = "RootCertificateExpiring";
/// A root certificate of the mesh has expired: workloads trusting only it fail mTLS.
pub const ROOT_CERTIFICATE_EXPIRED: &str = "RootCertificateExpired";
/// An `istio-ca-root-cert` ConfigMap (or a granted Secret) holds no readable certificate.
pub const CERTIFICATE_UNREADABLE: &str = "CertificateUnreadable";
/// A node runs ambient pods without a Ready ztunnel (or istio-cni) pod: their traffic stops.
pub const DATA_PLANE_NOT_READY: &str = "DataPlaneNotReady";
/// ztunnel or istio-cni is not installed where the `ambient` section looks.
pub const DATA_PLANE_COMPONENT_MISSING: &str = "DataPlaneComponentMissing";
/// ztunnel or istio-cni is newer than its istiod, or more than one minor version behind.
pub const DATA_PLANE_VERSION_SKEW: &str = "DataPlaneVersionSkew";
/// A ztunnel or istio-cni DaemonSet lacks a production setting of Istio's charts.
pub const DATA_PLANE_POSTURE_DRIFT: &str = "DataPlanePostureDrift";
/// Services whose clients get a DestinationRule (or none) lacking the declared minimums, or
/// shadowing root-namespace settings.
pub const MINIMUMS_NOT_MET: &str = "MinimumsNotMet";
/// Selected namespaces have no allow-nothing or deny-all AuthorizationPolicy of their own or
/// in the root namespace.
pub const DEFAULT_DENY_MISSING: &str = "DefaultDenyMissing";
/// Ambient namespaces have AuthorizationPolicies that ztunnel cannot enforce as written (HTTP
/// attributes, CUSTOM, AUDIT) and that target no waypoint.
pub const L7_POLICY_WITHOUT_WAYPOINT: &str = "L7PolicyWithoutWaypoint";
/// istiod signs with its own self-signed root.
pub const SELF_SIGNED_CA: &str = "SelfSignedCA";
/// `outboundTrafficPolicy.mode` is not `REGISTRY_ONLY` while the policy requires it.
pub const OUTBOUND_ALLOW_ANY: &str = "OutboundAllowAny";
/// `Ready`: some section is not True.
pub const RULES_NOT_READY: &str = "RulesNotReady";
/// `Conflict`: an older policy sets a rule differently and wins.
pub const OLDER_POLICY_WINS: &str = "OlderPolicyWins";

/// Reasons of a section that could not be evaluated (`Unknown`), from the error.
pub const FORBIDDEN: &str = "Forbidden";
pub const CONFLICT: &str = "Conflict";
pub const NOT_FOUND: &str = "NotFound";
pub const REJECTED: &str = "Rejected";
pub const API_ERROR: &str = "ApiError";
pub const API_UNREACHABLE: &str = "ApiUnreachable";
pub const INVALID_SPEC: &str = "InvalidSpec";
pub const UNEXPECTED_OBJECT: &str = "UnexpectedObject";
pub const INTERNAL_ERROR: &str = "InternalError";

/// Every reason above, for the reference check.
pub const ALL: &[&str] = &[
    COMPLIANT,
    CORRECTED,
    FIELD_OWNED_BY_OTHER,
    NOT_CONFIGURED,
    NON_COMPLIANT,
    NO_TARGETS,
    CANNOT_CORRECT,
    FIGHT_DETECTED,
    WRITE_FAILED,
    BUDGET_BLOCKS_DRAIN,
    REPLICAS_UNAVAILABLE,
    SPREAD_NOT_ACHIEVED,
    DRAIN_BLOCKED,
    PROGRESSING,
    MANAGED_BY_ISTIOD,
    CLASS_DEFAULTS_EXIST,
    GATEWAY_PARAMETERS_EXIST,
    GATEWAY_NOT_FOUND,
    ISTIO_TOO_OLD,
    ISTIO_VERSION_UNKNOWN,
    STRICT_HELD,
    OVERRIDES_REPORTED,
    CLIENTS_CUT_OFF,
    ROLLOUT_STALLED,
    ROLLOUT_IN_PROGRESS,
    ROLLOUT_HELD,
    QUOTA_CONFLICT,
    INCOMPLETE_RESOURCES,
    CACHE_NOT_SYNCED,
    ROOT_NAMESPACE_MISMATCH,
    MESH_CONFIG_UNCLEAR,
    ROOT_NAMESPACE_UNKNOWN,
    UNKNOWN_REVISION,
    INJECTION_LABELS_CONFLICT,
    TAG_WITHOUT_REVISION,
    REVISION_NOT_RUNNING,
    PROXY_VERSION_SKEW,
    REVISION_KEPT_BY_IDLE_PODS,
    ROOT_CERTIFICATE_EXPIRING,
    ROOT_CERTIFICATE_EXPIRED,
    CERTIFICATE_UNREADABLE,
    DATA_PLANE_NOT_READY,
    DATA_PLANE_COMPONENT_MISSING,
    DATA_PLANE_VERSION_SKEW,
    DATA_PLANE_POSTURE_DRIFT,
    MINIMUMS_NOT_MET,
    DEFAULT_DENY_MISSING,
    L7_POLICY_WITHOUT_WAYPOINT,
    SELF_SIGNED_CA,
    OUTBOUND_ALLOW_ANY,
    RULES_NOT_READY,
    OLDER_POLICY_WINS,
    FORBIDDEN,
    CONFLICT,
    NOT_FOUND,
    REJECTED,
    API_ERROR,
    API_UNREACHABLE,
    INVALID_SPEC,
    UNEXPECTED_OBJECT,
    INTERNAL_ERROR,
];

use crate::error::Error;
use crate::watch::Cause;

/// The reason of a section that failed with `err`: a bounded CamelCase word for conditions, events and metric labels.
pub fn of_error(err: &Error) -> &'static str {
    match err {
        Error::Kube { .. } => match err.status_code() {
            Some(403) => FORBIDDEN,
            Some(409) => CONFLICT,
            Some(404) => NOT_FOUND,
            Some(422) => REJECTED,
            Some(_) => API_ERROR,
            None => API_UNREACHABLE,
        },
        Error::InvalidSpec(_) => INVALID_SPEC,
        Error::Cache(c) => match c.cause {
            Some(Cause::Forbidden) => FORBIDDEN,
            Some(Cause::NotFound) => NOT_FOUND,
            Some(Cause::Rejected) => API_ERROR,
            None | Some(Cause::Unavailable | Cause::Expired) => CACHE_NOT_SYNCED,
        },
        Error::MeshConfig(_) => MESH_CONFIG_UNCLEAR,
        Error::RootNamespaceUnknown(_) => ROOT_NAMESPACE_UNKNOWN,
        Error::MissingField(..) => UNEXPECTED_OBJECT,
        Error::Serialize(_) => INTERNAL_ERROR,
    }
}

pub use crate::api::ViolationAction;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_names_every_reason_and_action() {
        let reference = include_str!("../../docs/reference.md");
        let missing: Vec<&str> = ALL
            .iter()
            .copied()
            .chain(ViolationAction::ALL.iter().map(|a| a.as_str()))
            .filter(|r| !reference.contains(&format!("`{r}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/reference.md does not name {missing:?}"
        );
    }

    /// `status.violations[].action` is the variant's name on the wire, both ways.
    #[test]
    fn violation_actions_are_plain_strings() {
        for a in ViolationAction::ALL {
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
            let back: ViolationAction = serde_json::from_value(a.as_str().into()).unwrap();
            assert_eq!(back, a);
        }
        let crd = serde_json::to_value(crate::api::crd()).unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
            ["properties"]["violations"]["items"]["properties"]["action"];
        assert_eq!(schema["type"], "string", "{schema}");
        assert_eq!(
            schema["enum"],
            serde_json::json!(["Reported", "Held", "Skipped", "Failed"])
        );
    }

    #[test]
    fn errors_map_to_reasons() {
        let api = |code: u16| Error::Kube {
            action: "x".into(),
            source: kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            })),
        };
        assert_eq!(of_error(&api(403)), FORBIDDEN);
        assert_eq!(of_error(&api(422)), REJECTED);
        assert_eq!(of_error(&api(500)), API_ERROR);
        assert_eq!(of_error(&Error::InvalidSpec("x".into())), INVALID_SPEC);
    }

    #[test]
    fn reasons_are_unique_camel_case_words() {
        let mut seen = std::collections::BTreeSet::new();
        for r in ALL {
            assert!(seen.insert(*r), "{r} twice");
            assert!(
                r.chars().next().is_some_and(|c| c.is_ascii_uppercase()),
                "{r}"
            );
            assert!(r.chars().all(|c| c.is_ascii_alphanumeric()), "{r}");
        }
    }
}
