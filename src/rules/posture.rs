//! Reads the report-only posture sections (`resilience`, `security`) share: the selected
//! namespaces, and what Istio's control plane says (the root namespace, the mesh configs'
//! documents, the istiods and their versions), from the controller's caches, or read once
//! without them (`meshwarden plan`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::istio::{self, IstioCache, Istiod};
use crate::rules::stores::{self, Stores};
use crate::selector;

/// How long a read waits for a watch that is listing.
pub const WAIT: Duration = Duration::from_secs(10);

/// The names of the namespaces `selector` selects (all without one).
pub async fn selected_namespaces(
    ctx: &Context,
    selector: Option<&LabelSelector>,
) -> Result<BTreeSet<String>> {
    Ok(selected_namespace_objects(ctx, selector)
        .await?
        .iter()
        .map(|n| n.name_any())
        .collect())
}

/// The namespaces `selector` selects (all without one), as the store keeps them (name and
/// labels), shared with it.
pub async fn selected_namespace_objects(
    ctx: &Context,
    selector: Option<&LabelSelector>,
) -> Result<Vec<Arc<PartialObjectMeta<Namespace>>>> {
    let selects = |labels: &std::collections::BTreeMap<String, String>| {
        selector.is_none_or(|s| selector::matches(s, labels))
    };
    if let Some(s) = ctx.cache::<Stores>() {
        s.readable(&[stores::NAMESPACES])
            .await
            .map_err(Error::Cache)?;
        let mut all = s.namespaces.state();
        all.retain(|n| selects(n.labels()));
        return Ok(all);
    }
    Ok(Api::<Namespace>::all(ctx.client.clone())
        .list_metadata(&ListParams::default())
        .await
        .map_err(|e| Error::kube("list Namespaces", e))?
        .items
        .into_iter()
        .filter(|n| selects(n.labels()))
        .map(Arc::new)
        .collect())
}

/// What the control plane says.
pub struct ControlPlane {
    /// Istio's root namespace.
    pub root: String,
    /// The `mesh` documents of the mesh configs in istiod's namespace.
    pub documents: Vec<String>,
    /// Every istiod Deployment's facts, with its namespace.
    pub istiods: Vec<(String, Istiod)>,
}

/// The control plane's root namespace, mesh configs and istiods.
pub async fn control_plane(ctx: &Context) -> Result<ControlPlane> {
    if let Some(c) = ctx.cache::<IstioCache>() {
        let root = c
            .mesh_root(WAIT)
            .await?
            .map_err(|e| Error::MeshConfig(e.to_string()))?;
        return Ok(ControlPlane {
            root: root.namespace,
            documents: c.mesh_documents(),
            istiods: c.istiods(),
        });
    }
    let ns = &ctx.istio_namespace;
    let cm = Api::<ConfigMap>::namespaced(ctx.client.clone(), ns)
        .get_opt(&istio::mesh_config_map("default"))
        .await
        .map_err(|e| Error::kube(format!("get ConfigMap {ns}/istio"), e))?;
    let doc = cm.and_then(|c| c.data?.remove(istio::MESH_KEY));
    let root = match &doc {
        Some(d) => istio::root_namespace_of(d).map_err(Error::MeshConfig)?,
        None => None,
    };
    let istiods = Api::<Deployment>::all(ctx.client.clone())
        .list(&ListParams::default().labels("app=istiod"))
        .await
        .map_err(|e| Error::kube("list istiod Deployments", e))?
        .items
        .iter()
        .map(|d| (d.namespace().unwrap_or_default(), Istiod::from(d)))
        .collect();
    Ok(ControlPlane {
        root: root.unwrap_or_else(|| ns.clone()),
        documents: doc.into_iter().collect(),
        istiods,
    })
}
