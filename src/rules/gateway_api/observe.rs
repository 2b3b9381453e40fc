//! What the `gatewayApi` section reads: istiod's version, the class-defaults ConfigMaps of
//! istiod's namespace, meshwarden's own ones, what istiod rendered from them, and the
//! namespaces of the gateways it deployed for a class, and the Gateways (for those selected
//! by name and those referencing meshwarden's ConfigMaps). Under the controller everything but
//! meshwarden's own ConfigMaps (a get each) comes from watch caches; alone (`meshwarden
//! plan`, tests), from lists.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::CustomResource;
use kube::api::{Api, ListParams};
use serde::{Deserialize, Serialize};

use super::plan::{
    CLASS_LABEL, DEFAULTS_FOR_CLASS, Found, GATEWAY_NAME_LABEL, GatewayRef, ParametersRef,
    RENDERED_FOR, Rendered,
};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::istio::IstioCache;
use crate::rules::sidecars;
use crate::rules::stores::{self, Stores};
use crate::write;

const WAIT: Duration = Duration::from_secs(10);

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

/// The image tags of every istiod that runs (any revision).
pub async fn istiod_versions(ctx: &Context) -> Result<BTreeSet<String>> {
    let revisions = match ctx.cache::<IstioCache>() {
        Some(c) => c.revisions(WAIT).await?,
        None => crate::istio::list_revisions(&ctx.client).await?,
    };
    Ok(revisions.versions.into_values().flatten().collect())
}

/// Every ConfigMap of istiod's namespace labelled [`DEFAULTS_FOR_CLASS`].
pub async fn class_defaults(ctx: &Context) -> Result<Vec<Found>> {
    let metas: Vec<ObjectMeta> = match ctx.cache::<IstioCache>() {
        Some(c) => c.config_maps_labelled(DEFAULTS_FOR_CLASS, WAIT).await?,
        None => {
            let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.istio_namespace);
            api.list_metadata(&ListParams::default().labels(DEFAULTS_FOR_CLASS))
                .await
                .map_err(|e| Error::kube(format!("list ConfigMaps in {}", ctx.istio_namespace), e))?
                .items
                .into_iter()
                .map(|m| m.metadata)
                .collect()
        }
    };
    let mut out: Vec<Found> = metas
        .iter()
        .map(|m| Found {
            name: m.name.clone().unwrap_or_default(),
            class: label(m, DEFAULTS_FOR_CLASS).unwrap_or_default().to_string(),
            policy: write::created_by_meshwarden(m)
                .then(|| label(m, write::POLICY_LABEL).map(str::to_string))
                .flatten(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The data of meshwarden's ConfigMap `name` in `namespace`, if it exists (a get).
pub async fn own_data(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, String>>> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let cm = api
        .get_opt(name)
        .await
        .map_err(|e| Error::kube(format!("read ConfigMap {namespace}/{name}"), e))?;
    Ok(cm.map(|c| c.data.unwrap_or_default()))
}

/// Gateway API's Gateway, only what meshwarden reads. Not part of the MeshPolicy CRD output:
/// the Gateway API CRDs are installed by whoever installs Gateway API.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "Gateway",
    plural = "gateways",
    namespaced,
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    #[serde(default)]
    pub gateway_class_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infrastructure: Option<Infrastructure>,
}

/// A Gateway's `spec.infrastructure`, only its parametersRef.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Infrastructure {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters_ref: Option<LocalReference>,
}

/// Gateway API's LocalParametersReference.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
pub struct LocalReference {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
}

impl Gateway {
    /// Its namespace and name.
    pub fn id(&self) -> GatewayRef {
        GatewayRef {
            namespace: self.metadata.namespace.clone().unwrap_or_default(),
            name: self.metadata.name.clone().unwrap_or_default(),
        }
    }

    /// Its `spec.infrastructure.parametersRef`, if set.
    pub fn parameters_ref(&self) -> Option<ParametersRef> {
        let r = self.spec.infrastructure.as_ref()?.parameters_ref.as_ref()?;
        Some((r.group.clone(), r.kind.clone(), r.name.clone()))
    }
}

/// Every Gateway, by namespace and name (none when the Gateway API CRDs are not installed):
/// from the watch under the controller; listed when it cannot be read (the CRDs missing or
/// the watch not granted: the list says which).
pub async fn gateways(ctx: &Context) -> Result<BTreeMap<GatewayRef, Gateway>> {
    if let Some(c) = ctx.cache::<super::cache::GatewayCache>()
        && let Ok(seen) = c.read(WAIT).await
    {
        return Ok(seen.values().map(|g| (g.0.id(), g.0.clone())).collect());
    }
    match Api::<Gateway>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(l) => Ok(l.items.into_iter().map(|g| (g.id(), g)).collect()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(BTreeMap::new()),
        Err(e) => Err(Error::kube("list Gateways", e)),
    }
}

fn rendered_of(kind: &'static str, meta: &ObjectMeta, policy: &str) -> Option<Rendered> {
    (label(meta, RENDERED_FOR) == Some(policy)).then(|| Rendered {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        class: label(meta, CLASS_LABEL).unwrap_or_default().to_string(),
        gateway: label(meta, GATEWAY_NAME_LABEL)
            .unwrap_or_default()
            .to_string(),
    })
}

/// The HorizontalPodAutoscalers and PodDisruptionBudgets istiod rendered from the overlays
/// of `policy` (labelled [`RENDERED_FOR`]), in every namespace.
pub async fn rendered(ctx: &Context, policy: &str) -> Result<Vec<Rendered>> {
    const HPA: &str = "HorizontalPodAutoscaler";
    const PDB: &str = "PodDisruptionBudget";
    if let Some(s) = ctx.cache::<Stores>() {
        s.readable(&[stores::HPAS, stores::PDBS])
            .await
            .map_err(Error::Cache)?;
        let hpas = s.hpas.state();
        let pdbs = s.pdbs.state();
        let hpas = hpas
            .iter()
            .filter_map(|h| rendered_of(HPA, &h.metadata, policy));
        let pdbs = pdbs
            .iter()
            .filter_map(|b| rendered_of(PDB, &b.metadata, policy));
        return Ok(hpas.chain(pdbs).collect());
    }
    let lp = ListParams::default().labels(&format!("{RENDERED_FOR}={policy}"));
    let hpas = Api::<HorizontalPodAutoscaler>::all(ctx.client.clone())
        .list_metadata(&lp)
        .await
        .map_err(|e| Error::kube("list HorizontalPodAutoscalers", e))?;
    let pdbs = Api::<PodDisruptionBudget>::all(ctx.client.clone())
        .list_metadata(&lp)
        .await
        .map_err(|e| Error::kube("list PodDisruptionBudgets", e))?;
    let hpas = hpas
        .items
        .iter()
        .filter_map(|h| rendered_of(HPA, &h.metadata, policy));
    let pdbs = pdbs
        .items
        .iter()
        .filter_map(|b| rendered_of(PDB, &b.metadata, policy));
    Ok(hpas.chain(pdbs).collect())
}

/// The namespaces that hold a Deployment istiod rendered for a Gateway of `class`.
pub async fn namespaces_of_class(ctx: &Context, class: &str) -> Result<BTreeSet<String>> {
    if let Some(w) = ctx.cache::<sidecars::Cache>() {
        ctx.metrics
            .watches
            .readable(&[stores::DEPLOYMENTS])
            .map_err(Error::Cache)?;
        w.ready(WAIT).await;
        return Ok(w
            .deployments
            .state()
            .iter()
            .filter(|d| d.facts.labels.get(CLASS_LABEL).map(String::as_str) == Some(class))
            .filter_map(|d| d.metadata.namespace.clone())
            .collect());
    }
    let lp = ListParams::default().labels(&format!("{CLASS_LABEL}={class}"));
    Ok(Api::<Deployment>::all(ctx.client.clone())
        .list_metadata(&lp)
        .await
        .map_err(|e| Error::kube("list Deployments", e))?
        .items
        .into_iter()
        .filter_map(|d| d.metadata.namespace)
        .collect())
}
