//! The `ambient` section of a MeshPolicy: the ambient data plane (ztunnel and istio-cni).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The `ambient` section: the ztunnel and istio-cni DaemonSets against the production settings
/// of Istio's charts, ztunnel and the CNI agent Ready on every node that runs ambient pods, and
/// their versions against istiod's. Reports only: it never writes to the mesh, whatever
/// `enforcement` says. `ambient: {}` turns every check on for `istio-system`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AmbientSpec {
    /// Namespace of the ztunnel and istio-cni DaemonSets (found by their label
    /// `app.kubernetes.io/name`, `ztunnel` or `istio-cni`, as Istio's charts set it).
    #[serde(default = "super::default_istio_namespace")]
    #[schemars(schema_with = "super::namespace_name")]
    pub namespace: String,
    /// The checks to run (each at most once). Default: all of them.
    /// `Posture`: priority class `system-node-critical`, tolerations of every taint, CPU and
    /// memory requests, `RollingUpdate` (ztunnel: `maxUnavailable: 0`, so a node's ztunnel is
    /// replaced only once its successor runs). `NodeCoverage`: every node running an ambient
    /// pod has a Ready ztunnel and istio-cni pod. `Versions`: ztunnel and istio-cni at their
    /// istiod's minor version or one behind (Istio upgrades istiod first).
    #[serde(default = "all_checks")]
    #[schemars(length(min = 1, max = 3))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub checks: Vec<AmbientCheck>,
}

impl Default for AmbientSpec {
    fn default() -> Self {
        AmbientSpec {
            namespace: super::default_istio_namespace(),
            checks: all_checks(),
        }
    }
}

/// One check of the `ambient` section.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum AmbientCheck {
    /// The DaemonSets against the charts' production settings.
    Posture,
    /// A Ready ztunnel and istio-cni pod on every node that runs ambient pods.
    NodeCoverage,
    /// ztunnel and istio-cni versions against istiod's.
    Versions,
}

fn all_checks() -> Vec<AmbientCheck> {
    vec![
        AmbientCheck::Posture,
        AmbientCheck::NodeCoverage,
        AmbientCheck::Versions,
    ]
}
