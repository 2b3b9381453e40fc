//! What the section reads, watched from the first reconcile that needs it and reduced on
//! arrival: DestinationRules to their [`Rule`] (host, `exportTo`, selector, creation time and
//! the blocks of their top-level `trafficPolicy`; not their subsets or port settings),
//! VirtualServices to the counts of their mesh routes with and without a timeout
//! ([`Routes`]), and Services to their names (a metadata-only watch). Until a policy has a
//! `resilience` section, none is listed.

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use k8s_openapi::api::core::v1::Service;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::{CustomResource, ResourceExt};
use serde::{Deserialize, Serialize};

use super::resolve::{Blocks, Rule, Traffic};
use super::routes::{self, Routes, VirtualService};
use crate::rules::lazy::{self, Reduced};
use crate::watch::{Health, NotReadable};

/// Watch names (in `meshwarden_watch_synced`, logs and conditions).
pub const DESTINATION_RULES: &str = "DestinationRules";
pub const SERVICES: &str = "Services";
pub const VIRTUAL_SERVICES: &str = "VirtualServices";

/// Istio's DestinationRule, only the fields the section reads. Istio installs the CRD.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "DestinationRule",
    plural = "destinationrules",
    namespaced,
    schema = "disabled"
)]
pub struct DestinationRuleSpec {
    #[serde(default)]
    pub host: String,
    #[serde(default, rename = "exportTo", skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    #[serde(
        default,
        rename = "workloadSelector",
        skip_serializing_if = "Option::is_none"
    )]
    pub workload_selector: Option<crate::rules::mtls::WorkloadSelector>,
    #[serde(
        default,
        rename = "trafficPolicy",
        skip_serializing_if = "Option::is_none"
    )]
    pub traffic_policy: Option<serde_json::Value>,
}

/// The connection pool fields that limit something.
const POOL_LIMITS: [(&str, &str); 5] = [
    ("tcp", "maxConnections"),
    ("http", "http1MaxPendingRequests"),
    ("http", "http2MaxRequests"),
    ("http", "maxRequestsPerConnection"),
    ("http", "maxConcurrentStreams"),
];

/// What a `trafficPolicy` (or the mesh's `defaultTrafficPolicy`) sets.
pub fn traffic(policy: &serde_json::Value) -> Traffic {
    let set = |k: &str| policy.get(k).is_some_and(|v| !v.is_null());
    let mut blocks = Blocks::NONE;
    for (b, k) in [
        (Blocks::CONNECTION_POOL, "connectionPool"),
        (Blocks::OUTLIER_DETECTION, "outlierDetection"),
        (Blocks::LOAD_BALANCER, "loadBalancer"),
        (Blocks::TLS, "tls"),
    ] {
        if set(k) {
            blocks = blocks.union(b);
        }
    }
    let pool = policy.get("connectionPool");
    let pool_limits = POOL_LIMITS.iter().any(|(group, field)| {
        pool.and_then(|p| p.get(group))
            .and_then(|g| g.get(field))
            .is_some_and(|v| !v.is_null())
    });
    Traffic {
        blocks,
        pool_limits,
    }
}

/// Reduces a DestinationRule to what the resolution reads.
pub fn reduce(dr: &DestinationRule) -> Rule {
    Rule {
        namespace: dr.namespace().unwrap_or_default(),
        name: dr.name_any(),
        host: dr.spec.host.clone(),
        export_to: dr.spec.export_to.clone(),
        selector: dr
            .spec
            .workload_selector
            .as_ref()
            .map(|s| s.match_labels.clone()),
        created: dr
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
        policy: dr.spec.traffic_policy.as_ref().map(traffic),
    }
}

/// The watched DestinationRules and Services, while the controller runs.
#[derive(Clone)]
pub struct ResilienceCache {
    rules: Reduced<Rule>,
    services: Reduced<()>,
    routes: Reduced<Routes>,
    health: Arc<Health>,
    wanted: Arc<tokio::sync::watch::Sender<bool>>,
}

/// A Service: its namespace and name.
pub type ServiceKey = (String, String);

impl ResilienceCache {
    /// Starts nothing: the returned stream drives both watches once a reconcile asks for
    /// them, and yields whenever one changed (it must be polled).
    pub fn watch(
        client: &kube::Client,
        health: &Arc<Health>,
    ) -> (
        ResilienceCache,
        impl Stream<Item = lazy::Changed> + Send + 'static,
    ) {
        let (wanted, gate) = tokio::sync::watch::channel(false);
        let (rules, s1) = Reduced::all::<DestinationRule>(
            client,
            health,
            DESTINATION_RULES,
            gate.clone(),
            reduce,
        );
        let (services, s2) = Reduced::all::<PartialObjectMeta<Service>>(
            client,
            health,
            SERVICES,
            gate.clone(),
            |_: &PartialObjectMeta<Service>| (),
        );
        let (routes, s3) =
            Reduced::all::<VirtualService>(client, health, VIRTUAL_SERVICES, gate, routes::reduce);
        let cache = ResilienceCache {
            rules,
            services,
            routes,
            health: health.clone(),
            wanted: Arc::new(wanted),
        };
        let events = futures::stream::select(futures::stream::select(s1, s2), s3);
        (cache, events)
    }

    /// Starts the watches (at start-up, when a policy with the section exists, so that their
    /// first lists come before readiness, not after).
    pub fn want(&self) {
        self.wanted.send_replace(true);
    }

    /// Whether every watch has listed or failed (see [`Reduced::settled`]).
    pub fn settled(&self) -> bool {
        let h = &self.health;
        self.rules.settled(h, DESTINATION_RULES)
            && self.services.settled(h, SERVICES)
            && self.routes.settled(h, VIRTUAL_SERVICES)
    }

    /// The DestinationRules, the Services and the VirtualServices, once the watches have
    /// listed (waiting up to `limit`) and not failed since.
    pub async fn read(&self, limit: Duration) -> Result<Objects, NotReadable> {
        self.wanted.send_replace(true);
        let deadline = tokio::time::Instant::now() + limit;
        let names = [DESTINATION_RULES, SERVICES, VIRTUAL_SERVICES];
        self.health.wait_readable(&names, limit).await?;
        // A watch turns Synced just before its map is replaced by the list.
        while !(self.rules.listed() && self.services.listed() && self.routes.listed()) {
            if tokio::time::Instant::now() >= deadline {
                return Err(NotReadable {
                    watch: DESTINATION_RULES.to_string(),
                    cause: None,
                    message: "the watches of DestinationRules, Services and VirtualServices have not listed yet"
                        .to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Objects {
            rules: self.rules.values(),
            services: self.services.snapshot(),
            routes: self.routes.entries(),
        })
    }
}

/// What the section reads of the cluster's networking objects.
pub struct Objects {
    pub rules: Vec<Arc<Rule>>,
    /// Services, by namespace and name (shared with the watch: 10,000 Services are not
    /// copied per evaluation).
    pub services: lazy::Snapshot<()>,
    /// VirtualServices (namespace, name) and their routes.
    pub routes: Vec<(ServiceKey, Arc<Routes>)>,
}

/// Without a running controller: lists them once.
pub async fn list(client: &kube::Client) -> crate::error::Result<Objects> {
    use crate::error::Error;
    let rules = Api::<DestinationRule>::all(client.clone())
        .list(&Default::default())
        .await
        .map_err(|e| Error::kube("list DestinationRules", e))?;
    let services = Api::<Service>::all(client.clone())
        .list_metadata(&Default::default())
        .await
        .map_err(|e| Error::kube("list Services", e))?;
    let virtual_services = Api::<VirtualService>::all(client.clone())
        .list(&Default::default())
        .await
        .map_err(|e| Error::kube("list VirtualServices", e))?;
    Ok(Objects {
        rules: rules.items.iter().map(|r| Arc::new(reduce(r))).collect(),
        services: Arc::new(
            services
                .items
                .iter()
                .map(|s| {
                    (
                        (s.namespace().unwrap_or_default(), s.name_any()),
                        Arc::new(()),
                    )
                })
                .collect(),
        ),
        routes: virtual_services
            .items
            .iter()
            .map(|v| (routes::key(v), Arc::new(routes::reduce(v))))
            .collect(),
    })
}
