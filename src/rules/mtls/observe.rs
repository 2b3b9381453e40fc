//! What the section reads: namespaces, PeerAuthentications, the root namespace, pods from the watch cache.

use super::*;

/// What was read from the cluster.
pub struct Observation {
    pub namespaces: Vec<NamespaceInfo>,
    pub peer_auths: Vec<PeerAuthentication>,
    /// Pods, read only when STRICT is declared (for the hold, and the cut-off report).
    pub pods: Vec<PodInfo>,
}

pub(super) const PAGE: u32 = 500;

/// Lists the metadata of every object of a kind, page by page.
pub(super) async fn list_meta<K>(
    api: &Api<K>,
    what: &str,
    fields: Option<&str>,
) -> Result<Vec<PartialObjectMeta<K>>>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut lp = ListParams::default().limit(PAGE);
        if let Some(f) = fields {
            lp = lp.fields(f);
        }
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = api
            .list_metadata(&lp)
            .await
            .map_err(|e| Error::kube(format!("list {what}"), e))?;
        out.extend(page.items);
        match page.metadata.continue_ {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => return Ok(out),
        }
    }
}

/// The pods that have not finished, from the controller's watch cache, or listed (metadata
/// only, pages of 500) when no cache runs (a caller without the controller). A cache that
/// has not listed within 10 s, or whose watch failed and has not listed again, is an error:
/// the section is Unknown until the cache is current, never Compliant on a partial view.
pub(super) async fn observe_pods(ctx: &Context) -> Result<Vec<PodInfo>> {
    if let Some(cache) = ctx.cache::<PodCache>() {
        cache
            .current(std::time::Duration::from_secs(10))
            .await
            .map_err(Error::Cache)?;
        return Ok(cache.pods());
    }
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let (pods, host) = tokio::try_join!(
        list_meta(&api, "Pods", Some(pods::NOT_FINISHED)),
        list_meta(&api, "Pods", Some(pods::HOST_NETWORK)),
    )?;
    let host: BTreeSet<(Option<String>, Option<String>)> = host
        .into_iter()
        .map(|p| (p.metadata.namespace, p.metadata.name))
        .collect();
    Ok(pods
        .iter()
        // A pod being deleted is no client worth holding STRICT for.
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let mut info = pods::pod_info(&p.metadata);
            info.host_network =
                host.contains(&(p.metadata.namespace.clone(), p.metadata.name.clone()));
            info
        })
        .collect())
}

/// Reads namespaces, PeerAuthentications and (when needed) the pods: from the controller's
/// stores when it runs (no LIST), listed otherwise.
pub async fn observe(ctx: &Context, need_pods: bool) -> Result<Observation> {
    let Some(stores) = ctx.cache::<crate::rules::stores::Stores>() else {
        return observe_listed(ctx, need_pods).await;
    };
    use crate::rules::stores::{NAMESPACES, PEER_AUTHENTICATIONS};
    stores
        .readable(&[NAMESPACES, PEER_AUTHENTICATIONS])
        .await
        .map_err(Error::Cache)?;
    let pods = match need_pods {
        true => observe_pods(ctx).await?,
        false => Vec::new(),
    };
    let mut namespaces: Vec<NamespaceInfo> = stores
        .namespaces
        .state()
        .iter()
        .map(|n| NamespaceInfo {
            name: n.name_any(),
            labels: n.metadata.labels.clone().unwrap_or_default(),
        })
        .collect();
    namespaces.sort_by(|a, b| a.name.cmp(&b.name));
    let mut peer_auths: Vec<PeerAuthentication> = stores
        .peer_auths
        .state()
        .iter()
        .map(|p| (**p).clone())
        .collect();
    peer_auths.sort_by_key(|p| (p.namespace(), p.name_any()));
    Ok(Observation {
        namespaces,
        peer_auths,
        pods,
    })
}

/// [`observe`] without the controller: lists.
async fn observe_listed(ctx: &Context, need_pods: bool) -> Result<Observation> {
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let pas: Api<PeerAuthentication> = Api::all(ctx.client.clone());
    let (ns, pa, pods) = tokio::try_join!(
        list_meta(&namespaces, "Namespaces", None),
        async {
            pas.list(&ListParams::default())
                .await
                .map(|l| l.items)
                .map_err(|e| {
                    Error::kube("list PeerAuthentications (are Istio's CRDs installed?)", e)
                })
        },
        async {
            if need_pods {
                observe_pods(ctx).await
            } else {
                Ok(Vec::new())
            }
        },
    )?;
    Ok(Observation {
        namespaces: ns
            .into_iter()
            .map(|n| NamespaceInfo {
                name: n.metadata.name.unwrap_or_default(),
                labels: n.metadata.labels.unwrap_or_default(),
            })
            .collect(),
        peer_auths: pa,
        pods,
    })
}

/// Istio's root namespace as this policy uses it.
pub(super) struct Root {
    pub(super) namespace: String,
    /// Where it comes from, for the condition.
    pub(super) source: String,
    /// The policy's `rootNamespace` disagrees with meshConfig: what to say.
    pub(super) mismatch: Option<String>,
    /// meshConfig's root namespace, when it differs from `namespace`.
    pub(super) istio_root: Option<String>,
    /// Assumed (istiod's namespace) for want of any mesh config, not read.
    pub(super) assumed: bool,
}

/// The root namespace: the policy's `rootNamespace` when set (compared with meshConfig when
/// that can be read), otherwise meshConfig's (see [`crate::istio::mesh_root`]); Err
/// ([`Error::RootNamespaceUnknown`]) when meshConfig cannot be read, so that nothing is
/// written. Without a controller (no cache), istiod's namespace is assumed.
pub(super) async fn root_namespace(ctx: &Context, spec: &MtlsSpec) -> Result<Root> {
    let mesh = match ctx.cache::<crate::istio::IstioCache>() {
        Some(c) => Some(c.mesh_root(std::time::Duration::from_secs(10)).await),
        None => None,
    };
    let unclear = |message: String| {
        Error::MeshConfig(format!(
            "{message}: set mtls.rootNamespace to the root namespace Istio uses, or make the mesh configs agree"
        ))
    };
    Ok(match (&spec.root_namespace, mesh) {
        (Some(set), Some(Ok(Ok(m)))) if m.from_mesh_config && m.namespace != *set => Root {
            namespace: set.clone(),
            source: "mtls.rootNamespace".into(),
            mismatch: Some(format!(
                "mtls.rootNamespace is {set} but Istio's root namespace is {} ({}): Istio takes a selector-less PeerAuthentication as mesh-wide only in its root namespace, so the mode set in {set} is not the mesh's; remove mtls.rootNamespace to follow meshConfig, or set it to {}",
                m.namespace, m.source, m.namespace
            )),
            istio_root: Some(m.namespace),
            assumed: false,
        },
        (Some(set), _) => Root {
            namespace: set.clone(),
            source: "mtls.rootNamespace".into(),
            mismatch: None,
            istio_root: None,
            assumed: false,
        },
        (None, None) => Root {
            namespace: ctx.istio_namespace.clone(),
            source: "assumed: istiod's namespace".into(),
            mismatch: None,
            istio_root: None,
            assumed: true,
        },
        (None, Some(Err(e))) => return Err(e),
        (None, Some(Ok(Err(crate::istio::MeshRootError::Unclear(message))))) => {
            return Err(unclear(message));
        }
        (None, Some(Ok(Err(crate::istio::MeshRootError::Unreadable(message))))) => {
            return Err(Error::RootNamespaceUnknown(format!(
                "{message}: Istio's root namespace is not guessed, so every write of the section is held (nothing is created, moved or deleted) until meshConfig can be read again; mtls.rootNamespace decides it instead"
            )));
        }
        (None, Some(Ok(Ok(m)))) => Root {
            assumed: !m.from_mesh_config,
            namespace: m.namespace,
            source: m.source,
            mismatch: None,
            istio_root: None,
        },
    })
}

/// Where `policy`'s mesh-wide object is when that is not `root`: an assumed root namespace
/// never moves it (see [`root_namespace`]).
pub(super) fn mesh_object_elsewhere(
    peer_auths: &[PeerAuthentication],
    policy: &str,
    root: &str,
) -> Option<String> {
    peer_auths
        .iter()
        .filter(|pa| pa.name_any() == SCOPE_OBJECT && is_ours(&pa.metadata, policy))
        .filter_map(|pa| pa.namespace())
        .find(|ns| ns != root)
}

/// The PeerAuthentications, whole, in a store; the stream yields those whose spec or labels
/// changed, and deletions (it must be polled).
#[allow(clippy::type_complexity)]
pub fn watch_peer_auths(
    client: &kube::Client,
    health: &std::sync::Arc<crate::watch::Health>,
) -> (
    kube::runtime::reflector::Store<PeerAuthentication>,
    impl Stream<Item = Result<PeerAuthentication, watcher::Error>> + Send + 'static,
) {
    let (store, writer) = kube::runtime::reflector::store::<PeerAuthentication>();
    let api: Api<PeerAuthentication> = Api::all(client.clone());
    let events = crate::watch::resilient(
        health.clone(),
        crate::rules::stores::PEER_AUTHENTICATIONS,
        move || watcher::watcher(api.clone(), watcher::Config::default()),
    );
    let events = kube::runtime::reflector::reflector(writer, events);
    (store, only_changes(events, peer_auth_fingerprint))
}

/// What matters about a pod: labels, sidecar, the injector's annotations, being deleted.
pub fn pod_fingerprint(m: &ObjectMeta) -> u64 {
    let mut h = DefaultHasher::new();
    m.labels.hash(&mut h);
    for key in INJECTOR_ANNOTATIONS {
        m.annotations.as_ref().and_then(|a| a.get(key)).hash(&mut h);
    }
    m.annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(SIDECAR_STATUS))
        .hash(&mut h);
    m.deletion_timestamp.is_some().hash(&mut h);
    h.finish()
}

/// What matters about a PeerAuthentication: its spec (generation) and labels.
pub fn peer_auth_fingerprint(m: &ObjectMeta) -> u64 {
    let mut h = DefaultHasher::new();
    m.generation.hash(&mut h);
    m.labels.hash(&mut h);
    h.finish()
}
