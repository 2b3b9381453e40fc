//! What the section reads, watched from the first reconcile that needs it and reduced on
//! arrival: AuthorizationPolicies to their [`PolicyFacts`], and the two
//! Secrets istiod's CA may use (`cacerts`, `istio-ca-secret` in istiod's namespace) as
//! metadata only, each watched by name: whether it exists, and whether a writer's
//! `managedFields` entry records the key `istio-generated` (istiod's mark on a `cacerts` it
//! generated itself). No Secret's data is ever requested.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use kube::{CustomResource, ResourceExt};
use serde::{Deserialize, Serialize};

use super::policy::{PolicyFacts, reduce};
use crate::error::{Error, Result};
use crate::rules::lazy::{self, Reduced};
use crate::rules::mtls::WorkloadSelector;
use crate::watch::{Health, NotReadable};

/// Watch names (in `meshwarden_watch_synced`, logs and conditions).
pub const AUTHORIZATION_POLICIES: &str = "AuthorizationPolicies";
pub const CA_SECRETS: &str = "CASecrets";
pub const CA_ROOT_SECRET: &str = "CARootSecret";

/// The Secret a plugged-in CA is given in (or istiod writes its own root into, with the key
/// `istio-generated`, under `USE_CACERTS_FOR_SELF_SIGNED_CA`).
pub const CACERTS: &str = "cacerts";
/// The Secret istiod keeps its self-signed root in.
pub const ISTIO_CA_SECRET: &str = "istio-ca-secret";
/// The key istiod adds to a `cacerts` it generated (`security/pkg/pki/ca/ca.go`).
pub const ISTIO_GENERATED: &str = "istio-generated";

/// Istio's AuthorizationPolicy, only the fields the section reads. Istio installs the CRD.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.istio.io",
    version = "v1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    namespaced,
    schema = "disabled"
)]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, rename = "targetRef", skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<serde_json::Value>,
    #[serde(default, rename = "targetRefs", skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// `None`: no `rules` field; `Some([])`: an empty list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<serde_json::Value>>,
}

/// Whether a Secret's `managedFields` record the key `istio-generated` in its data.
pub fn istio_generated(s: &PartialObjectMeta<Secret>) -> bool {
    let key = format!("f:{ISTIO_GENERATED}");
    s.metadata.managed_fields.iter().flatten().any(|m| {
        m.fields_v1
            .as_ref()
            .is_some_and(|f| f.0.get("f:data").and_then(|d| d.get(&key)).is_some())
    })
}

/// What the section reads, while the controller runs.
#[derive(Clone)]
pub struct SecurityCache {
    policies: Reduced<PolicyFacts>,
    cacerts: Reduced<bool>,
    root: Reduced<bool>,
    health: Arc<Health>,
    wanted: Arc<tokio::sync::watch::Sender<bool>>,
}

/// The AuthorizationPolicies (namespace, name, facts) and the CA Secrets found (name ->
/// `istio-generated` recorded), `None` when those cannot be watched (not granted).
pub type Seen = (
    Vec<((String, String), Arc<PolicyFacts>)>,
    Option<BTreeMap<String, bool>>,
);

fn secret_watch(
    api: Api<PartialObjectMeta<Secret>>,
    name: &'static str,
) -> impl Fn() -> futures::stream::BoxStream<
    'static,
    std::result::Result<watcher::Event<PartialObjectMeta<Secret>>, watcher::Error>,
> + Send
+ 'static {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    move || watcher::watcher(api.clone(), config.clone()).boxed()
}

impl SecurityCache {
    /// Starts nothing: the returned stream drives the watches once a reconcile asks for
    /// them, and yields whenever one changed (it must be polled).
    pub fn watch(
        client: &kube::Client,
        health: &Arc<Health>,
        istio_namespace: &str,
    ) -> (
        SecurityCache,
        impl Stream<Item = lazy::Changed> + Send + 'static,
    ) {
        let (wanted, gate) = tokio::sync::watch::channel(false);
        let (policies, s1) = Reduced::all::<AuthorizationPolicy>(
            client,
            health,
            AUTHORIZATION_POLICIES,
            gate.clone(),
            reduce,
        );
        let secrets: Api<PartialObjectMeta<Secret>> =
            Api::namespaced(client.clone(), istio_namespace);
        let (cacerts, s2) = Reduced::fed(
            health,
            CA_SECRETS,
            gate.clone(),
            secret_watch(secrets.clone(), CACERTS),
            istio_generated,
        );
        let (root, s3) = Reduced::fed(
            health,
            CA_ROOT_SECRET,
            gate,
            secret_watch(secrets, ISTIO_CA_SECRET),
            istio_generated,
        );
        let cache = SecurityCache {
            policies,
            cacerts,
            root,
            health: health.clone(),
            wanted: Arc::new(wanted),
        };
        let events = futures::stream::select(s1, futures::stream::select(s2, s3));
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
        self.policies.settled(h, AUTHORIZATION_POLICIES)
            && self.cacerts.settled(h, CA_SECRETS)
            && self.root.settled(h, CA_ROOT_SECRET)
    }

    /// The policies and the CA Secrets, once the watches have listed (waiting up to
    /// `limit`). The Secrets' watches refused (the chart value withheld) give `None`.
    pub async fn read(&self, limit: Duration) -> std::result::Result<Seen, NotReadable> {
        self.wanted.send_replace(true);
        self.health
            .wait_readable(&[AUTHORIZATION_POLICIES], limit)
            .await?;
        let secrets = match self
            .health
            .wait_readable(&[CA_SECRETS, CA_ROOT_SECRET], limit)
            .await
        {
            Ok(()) => true,
            Err(e) if e.cause.is_some_and(|c| !c.stale()) => false,
            Err(e) => return Err(e),
        };
        let deadline = tokio::time::Instant::now() + limit;
        while !(self.policies.listed()
            && (!secrets || (self.cacerts.listed() && self.root.listed())))
        {
            if tokio::time::Instant::now() >= deadline {
                return Err(NotReadable {
                    watch: AUTHORIZATION_POLICIES.to_string(),
                    cause: None,
                    message: "the watches of AuthorizationPolicies and the CA Secrets have not listed yet"
                        .to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let found = secrets.then(|| {
            self.cacerts
                .entries()
                .into_iter()
                .chain(self.root.entries())
                .map(|((_, name), generated)| (name, *generated))
                .collect()
        });
        Ok((self.policies.entries(), found))
    }
}

/// Without a running controller: lists once (the Secrets as metadata, by name).
pub async fn list(client: &kube::Client, istio_namespace: &str) -> Result<Seen> {
    let policies = Api::<AuthorizationPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::kube("list AuthorizationPolicies", e))?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), istio_namespace);
    let mut found = BTreeMap::new();
    for name in [CACERTS, ISTIO_CA_SECRET] {
        let lp = ListParams::default().fields(&format!("metadata.name={name}"));
        match secrets.list_metadata(&lp).await {
            Ok(l) => found.extend(l.items.iter().map(|s| (s.name_any(), istio_generated(s)))),
            Err(kube::Error::Api(e)) if e.code == 403 => {
                return Ok((entries(&policies.items), None));
            }
            Err(e) => {
                return Err(Error::kube(
                    format!("list Secret {istio_namespace}/{name}"),
                    e,
                ));
            }
        }
    }
    Ok((entries(&policies.items), Some(found)))
}

fn entries(items: &[AuthorizationPolicy]) -> Vec<((String, String), Arc<PolicyFacts>)> {
    items
        .iter()
        .map(|p| {
            (
                (p.namespace().unwrap_or_default(), p.name_any()),
                Arc::new(reduce(p)),
            )
        })
        .collect()
}
