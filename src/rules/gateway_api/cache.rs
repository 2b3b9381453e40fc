//! The Gateways, watched from the first reconcile that reads them (a policy selecting
//! Gateways by name, or holding some it must give up) and reduced on arrival to what the
//! section reads: name, namespace and uid (the owner of meshwarden's per-Gateway ConfigMap),
//! class and `parametersRef`. A cluster without such a policy never lists Gateways; with one,
//! they are listed once, not on every pass.

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::observe::Gateway;
use crate::rules::lazy::{self, Reduced};
use crate::watch::{Health, NotReadable};

/// The watch's name (in `meshwarden_watch_synced`, logs and conditions).
pub const GATEWAYS: &str = "Gateways";

/// A Gateway as the section reads it: the rest of its metadata and its status left out, so
/// that its controller's status updates change nothing here.
#[derive(Clone, Debug)]
pub struct Seen(pub Gateway);

impl PartialEq for Seen {
    fn eq(&self, other: &Self) -> bool {
        self.0.metadata == other.0.metadata && self.0.spec == other.0.spec
    }
}

/// Reduces a Gateway to [`Seen`].
pub fn reduce(g: &Gateway) -> Seen {
    Seen(Gateway {
        metadata: ObjectMeta {
            name: g.metadata.name.clone(),
            namespace: g.metadata.namespace.clone(),
            uid: g.metadata.uid.clone(),
            ..ObjectMeta::default()
        },
        spec: g.spec.clone(),
    })
}

/// The watched Gateways, while the controller runs.
#[derive(Clone)]
pub struct GatewayCache {
    gateways: Reduced<Seen>,
    health: Arc<Health>,
    wanted: Arc<tokio::sync::watch::Sender<bool>>,
}

impl GatewayCache {
    /// Starts nothing: the returned stream drives the watch once a reconcile asks for it, and
    /// yields whenever a Gateway changed (it must be polled).
    pub fn watch(
        client: &kube::Client,
        health: &Arc<Health>,
    ) -> (
        GatewayCache,
        impl Stream<Item = lazy::Changed> + Send + 'static,
    ) {
        let (wanted, gate) = tokio::sync::watch::channel(false);
        let (gateways, events) = Reduced::all::<Gateway>(client, health, GATEWAYS, gate, reduce);
        let cache = GatewayCache {
            gateways,
            health: health.clone(),
            wanted: Arc::new(wanted),
        };
        (cache, events)
    }

    /// Starts the watch (at start-up, when a policy reads Gateways, so that its first list
    /// comes before readiness).
    pub fn want(&self) {
        self.wanted.send_replace(true);
    }

    /// Whether the watch has listed or failed (see [`Reduced::settled`]).
    pub fn settled(&self) -> bool {
        self.gateways.settled(&self.health, GATEWAYS)
    }

    /// The Gateways, once the watch has listed (waiting up to `limit`) and not failed since.
    /// A failing watch (the Gateway API CRDs not installed, the list not granted) answers at
    /// once with why.
    pub async fn read(&self, limit: Duration) -> Result<lazy::Snapshot<Seen>, NotReadable> {
        self.want();
        let deadline = tokio::time::Instant::now() + limit;
        self.health.wait_readable(&[GATEWAYS], limit).await?;
        // The watch turns Synced just before its map is replaced by the list.
        while !self.gateways.listed() {
            if tokio::time::Instant::now() >= deadline {
                return Err(NotReadable {
                    watch: GATEWAYS.to_string(),
                    cause: None,
                    message: "the watch of Gateways has not listed yet".to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(self.gateways.snapshot())
    }
}
