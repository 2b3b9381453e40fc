//! The nodes as the HA sections read them: zone, whether new pods may be placed there
//! (cordon, taints), readiness and labels. A Node carries its images and addresses in its
//! status (kilobytes each); the watch reduces each to these facts on arrival.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, PodSpec, Toleration};

use super::ZONE;
use crate::compact::Compact;

/// A taint that keeps new pods off a node unless they tolerate it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Taint {
    pub key: String,
    pub value: Option<String>,
    pub effect: String,
}

/// What the HA sections know of a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeFacts {
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<String>,
    /// `spec.unschedulable` (cordoned).
    pub unschedulable: bool,
    /// The `Ready` condition is True.
    pub ready: bool,
    /// `NoSchedule` and `NoExecute` taints, the node controller's included.
    pub taints: Vec<Taint>,
    /// Every label (matched against a pod template's `nodeSelector`).
    pub labels: BTreeMap<String, String>,
}

impl From<&Node> for NodeFacts {
    fn from(n: &Node) -> Self {
        let labels = n.metadata.labels.clone().unwrap_or_default();
        let spec = n.spec.as_ref();
        NodeFacts {
            zone: labels.get(ZONE).cloned(),
            unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
            ready: n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .is_some_and(|c| c.status == "True"),
            taints: spec
                .and_then(|s| s.taints.as_ref())
                .into_iter()
                .flatten()
                .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
                .map(|t| Taint {
                    key: t.key.clone(),
                    value: t.value.clone(),
                    effect: t.effect.clone(),
                })
                .collect(),
            labels,
        }
    }
}

/// A node as the watch cache keeps it.
pub type CachedNode = Compact<Node, NodeFacts>;

/// The nodes by name.
pub type Nodes = BTreeMap<String, Arc<NodeFacts>>;

fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect = t.effect.as_deref().unwrap_or_default();
        let effect_ok = effect.is_empty() || effect == taint.effect;
        let key_ok = match t.key.as_deref() {
            None | Some("") => t.operator.as_deref() == Some("Exists"),
            Some(k) => k == taint.key,
        };
        let value_ok = match t.operator.as_deref() {
            Some("Exists") => true,
            _ => {
                t.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default()
            }
        };
        effect_ok && key_ok && value_ok
    })
}

impl NodeFacts {
    /// Whether the scheduler may place a new pod of `spec` here: Ready, not cordoned, every
    /// `nodeSelector` label present, every taint tolerated. (Required node affinity is not
    /// read: a template with one may see more nodes counted as open to it than are.)
    pub fn open_to(&self, spec: &PodSpec) -> bool {
        let tolerations = spec.tolerations.as_deref().unwrap_or_default();
        self.ready
            && !self.unschedulable
            && spec
                .node_selector
                .iter()
                .flatten()
                .all(|(k, v)| self.labels.get(k) == Some(v))
            && self.taints.iter().all(|t| tolerates(tolerations, t))
    }
}

/// A hash of what a node event can change for the HA sections: the watch passes on only
/// events that change it (a kubelet's status heartbeat does not).
pub fn fingerprint(n: &CachedNode) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    n.facts.hash(&mut h);
    Some(h.finish())
}
