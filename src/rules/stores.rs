//! Watch stores the sections read instead of listing on every reconcile: namespaces (name and
//! labels), PeerAuthentications, HorizontalPodAutoscalers, PodDisruptionBudgets and Nodes
//! (reduced to their facts), kept
//! current by the controller's watches. These kinds are few, so they are kept whole (the HA
//! section reads their `managedFields`). Without the controller (a section called alone) there
//! are none and the sections list.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;

use super::ha::nodes::CachedNode;
use super::mtls::PeerAuthentication;
use crate::watch::{Health, NotReadable};

/// Names of the watches that fill the stores (as [`Health`] knows them).
pub const NAMESPACES: &str = "Namespaces";
pub const PEER_AUTHENTICATIONS: &str = "PeerAuthentications";
pub const HPAS: &str = "HorizontalPodAutoscalers";
pub const PDBS: &str = "PodDisruptionBudgets";
pub const NODES: &str = "Nodes";
/// The sidecars section's Deployment store, whose names and labels the HA section reads.
pub const DEPLOYMENTS: &str = "Deployments";

/// How long a read waits for a watch that is listing.
const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct Stores {
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub peer_auths: Store<PeerAuthentication>,
    pub hpas: Store<HorizontalPodAutoscaler>,
    pub pdbs: Store<PodDisruptionBudget>,
    /// Nodes reduced to what the HA sections read ([`CachedNode`]).
    pub nodes: Store<CachedNode>,
    health: Arc<Health>,
}

impl Stores {
    pub fn new(
        namespaces: Store<PartialObjectMeta<Namespace>>,
        peer_auths: Store<PeerAuthentication>,
        hpas: Store<HorizontalPodAutoscaler>,
        pdbs: Store<PodDisruptionBudget>,
        nodes: Store<CachedNode>,
        health: Arc<Health>,
    ) -> Self {
        Stores {
            namespaces,
            peer_auths,
            hpas,
            pdbs,
            nodes,
            health,
        }
    }

    /// Whether the stores fed by the watches `names` can be read: waits while one lists for
    /// the first time; an error when one is refused by the server or has failed since its last
    /// list (its store may miss changes).
    pub async fn readable(&self, names: &[&str]) -> Result<(), NotReadable> {
        self.health.wait_readable(names, WAIT).await
    }

    /// Whether every store has its initial list, or its kind is refused by the server (the
    /// sections that need it say so; the process is ready without it).
    pub fn ready(&self) -> bool {
        [NAMESPACES, PEER_AUTHENTICATIONS, HPAS, PDBS, NODES]
            .iter()
            .all(|n| match self.health.readable(&[n]) {
                Ok(()) => true,
                Err(e) => e.cause.is_some_and(|c| !c.stale()),
            })
    }
}
