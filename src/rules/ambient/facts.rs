//! What the section keeps of a ztunnel or istio-cni DaemonSet: the settings it checks,
//! reduced on arrival from the watch (a DaemonSet carries its whole pod template; a handful of
//! values is kept instead).

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{PodSpec, Toleration};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::compact::Compact;
use crate::istio::{REVISION_LABEL, UNKNOWN, image_tag};

/// The label Istio's ztunnel and istio-cni charts set on their DaemonSets.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// The watch's label selector: both components, in every namespace.
pub const SELECTOR: &str = "app.kubernetes.io/name in (ztunnel,istio-cni)";
/// The priority class both charts set.
pub const NODE_CRITICAL: &str = "system-node-critical";
/// Taint effects a node agent must tolerate whatever the taint (kept off a node otherwise).
pub const EFFECTS: [&str; 2] = ["NoSchedule", "NoExecute"];

/// One of the two node agents of the ambient data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    /// The node proxy: every ambient pod's traffic goes through its node's ztunnel.
    Ztunnel,
    /// The CNI node agent: it puts new ambient pods into the mesh.
    Cni,
}

impl Component {
    pub const ALL: [Component; 2] = [Component::Ztunnel, Component::Cni];

    /// The value of [`NAME_LABEL`], which is also how status names it.
    pub fn name(self) -> &'static str {
        match self {
            Component::Ztunnel => "ztunnel",
            Component::Cni => "istio-cni",
        }
    }

    fn of(label: &str) -> Option<Component> {
        Component::ALL.into_iter().find(|c| c.name() == label)
    }
}

/// A DaemonSet's update strategy as the API server stored it (defaults filled in).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Strategy {
    /// `RollingUpdate` or `OnDelete`.
    pub kind: String,
    pub max_unavailable: Option<String>,
    pub max_surge: Option<String>,
}

/// What the section knows of a ztunnel or istio-cni DaemonSet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataPlaneFacts {
    /// `None`: its label names neither (not one of ours).
    pub component: Option<Component>,
    /// Its `istio.io/rev` (label, else annotation), `default` without one.
    pub revision: String,
    /// The pod template's `priorityClassName`.
    pub priority_class: Option<String>,
    /// The taint effects of [`EFFECTS`] its pods do not tolerate for every taint.
    pub untolerated: Vec<&'static str>,
    /// Containers without a CPU or memory request, with the resources missing.
    pub missing_requests: Vec<(String, Vec<&'static str>)>,
    pub strategy: Strategy,
    /// The image tag of its first container ([`UNKNOWN`] without one).
    pub version: String,
    /// `status.desiredNumberScheduled` and `status.numberReady`.
    pub desired: i32,
    pub ready: i32,
}

/// A DaemonSet as the watch cache keeps it.
pub type CachedDaemonSet = Compact<DaemonSet, DataPlaneFacts>;

fn int_or_string(v: &IntOrString) -> String {
    match v {
        IntOrString::Int(i) => i.to_string(),
        IntOrString::String(s) => s.clone(),
    }
}

/// Whether `tolerations` tolerate every taint of `effect`, whatever its key and value.
pub fn tolerates_every(tolerations: &[Toleration], effect: &str) -> bool {
    tolerations.iter().any(|t| {
        t.key.as_deref().unwrap_or_default().is_empty()
            && t.operator.as_deref() == Some("Exists")
            && t.effect
                .as_deref()
                .is_none_or(|e| e.is_empty() || e == effect)
    })
}

fn missing_requests(spec: &PodSpec) -> Vec<(String, Vec<&'static str>)> {
    spec.containers
        .iter()
        .filter_map(|c| {
            let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
            let missing: Vec<&'static str> = ["cpu", "memory"]
                .into_iter()
                .filter(|k| requests.is_none_or(|r| !r.contains_key(*k)))
                .collect();
            (!missing.is_empty()).then(|| (c.name.clone(), missing))
        })
        .collect()
}

impl From<&DaemonSet> for DataPlaneFacts {
    fn from(d: &DaemonSet) -> Self {
        let meta = &d.metadata;
        let get = |m: &Option<std::collections::BTreeMap<String, String>>, k: &str| {
            m.as_ref().and_then(|m| m.get(k)).cloned()
        };
        let spec = d.spec.as_ref();
        let pod = spec.and_then(|s| s.template.spec.as_ref());
        let tolerations = pod
            .and_then(|p| p.tolerations.as_deref())
            .unwrap_or_default();
        let strategy = spec.and_then(|s| s.update_strategy.as_ref());
        let rolling = strategy.and_then(|s| s.rolling_update.as_ref());
        DataPlaneFacts {
            component: get(&meta.labels, NAME_LABEL)
                .as_deref()
                .and_then(Component::of),
            revision: get(&meta.labels, REVISION_LABEL)
                .or_else(|| get(&meta.annotations, REVISION_LABEL))
                .unwrap_or_else(|| "default".to_string()),
            priority_class: pod.and_then(|p| p.priority_class_name.clone()),
            untolerated: EFFECTS
                .into_iter()
                .filter(|e| !tolerates_every(tolerations, e))
                .collect(),
            missing_requests: pod.map(missing_requests).unwrap_or_default(),
            strategy: Strategy {
                kind: strategy
                    .and_then(|s| s.type_.clone())
                    .unwrap_or_else(|| "RollingUpdate".to_string()),
                max_unavailable: rolling
                    .and_then(|r| r.max_unavailable.as_ref())
                    .map(int_or_string),
                max_surge: rolling
                    .and_then(|r| r.max_surge.as_ref())
                    .map(int_or_string),
            },
            version: pod
                .and_then(|p| p.containers.first())
                .and_then(|c| c.image.as_deref())
                .and_then(image_tag)
                .unwrap_or(UNKNOWN)
                .to_string(),
            desired: d
                .status
                .as_ref()
                .map(|s| s.desired_number_scheduled)
                .unwrap_or(0),
            ready: d.status.as_ref().map(|s| s.number_ready).unwrap_or(0),
        }
    }
}
