//! What Istio itself decides, in one place for every rule: whether its sidecar injector
//! injects the pods of a namespace (which depends on the revisions and revision tags that
//! exist), and which namespace is its root namespace (meshConfig).
//!
//! The controller keeps three small watch caches for this ([`IstioCache`]): the istiod
//! Deployments (label `app=istiod`, every namespace, reduced to revision, version and whether
//! that version serves), the injector webhook configurations (`MutatingWebhookConfiguration`,
//! label `istio.io/rev`, reduced to the revision, the tag and whether they call an istiod
//! outside the cluster) and the ConfigMaps of istiod's namespace (`--istio-namespace`),
//! reduced on arrival to the `mesh` key of `istio` / `istio-<revision>`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};

use crate::error::{Error, Result};
use crate::watch::{self, Health};

/// Namespace label of the default injector (`enabled` turns injection on).
pub const INJECTION_LABEL: &str = "istio-injection";
/// Namespace (or pod) label naming the revision (or revision tag) whose injector injects.
pub const REVISION_LABEL: &str = "istio.io/rev";
/// Label of the injector webhook configuration of a revision tag (its value is the tag).
pub const TAG_LABEL: &str = "istio.io/tag";
/// istiod's namespace unless `--istio-namespace` says otherwise.
pub const DEFAULT_ISTIO_NAMESPACE: &str = "istio-system";
/// Key of the mesh config in its ConfigMap.
pub const MESH_KEY: &str = "mesh";

/// Pod annotation the injector writes: what it injected, and from which revision (JSON).
pub const SIDECAR_STATUS: &str = "sidecar.istio.io/status";

/// The revision named in a `sidecar.istio.io/status` annotation (`None` when it names none or
/// is not JSON).
pub fn injected_revision(status: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(status).ok()?;
    v.get("revision")?
        .as_str()
        .filter(|r| !r.is_empty())
        .map(str::to_string)
}

/// An injected proxy as its pod shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyVersion {
    /// The injector's revision (`sidecar.istio.io/status`).
    pub revision: Option<String>,
    /// Image tag of the `istio-proxy` container ([`UNKNOWN`] without one).
    pub version: String,
}

/// Name of istiod's container in its Deployment.
pub const DISCOVERY_CONTAINER: &str = "discovery";
/// Version of an image without a tag (a digest only).
pub const UNKNOWN: &str = "unknown";

/// The tag of a container image (`docker.io/istio/proxyv2:1.30.2@sha256:…` -> `1.30.2`);
/// `None` for an image named by digest only or without a tag.
pub fn image_tag(image: &str) -> Option<&str> {
    let image = image.split('@').next().unwrap_or_default();
    let last = image.rsplit('/').next().unwrap_or_default();
    last.split_once(':')
        .map(|(_, tag)| tag)
        .filter(|t| !t.is_empty())
}

/// An istiod Deployment as the revisions cache keeps it: its revision and version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Istiod {
    /// `istio.io/rev` (`default` without one).
    pub revision: String,
    /// Image tag of the discovery container ([`UNKNOWN`] without one).
    pub version: String,
    /// The template (so `version`) is what serves: its controller observed it and no pod of
    /// an older template is left ([`serves_template`]).
    pub serving: bool,
    /// Its discovery container's `ENABLE_CA_SERVER` is not `false`: istiod signs workload
    /// certificates itself.
    pub ca_server: bool,
    /// Its discovery container's `EXTERNAL_CA` (`ISTIOD_RA_KUBERNETES_API`: istiod passes
    /// certificate requests to a Kubernetes signer).
    pub external_ca: Option<String>,
}

/// Whether a Deployment's pods all run its current template: the controller observed the
/// generation and either declared it rolled out (`NewReplicaSetAvailable`) or no replica of an
/// older template is left. During a `helm upgrade` of istiod, and for good when the new pods
/// never become ready, the old version still serves.
pub fn serves_template(d: &Deployment) -> bool {
    let Some(st) = &d.status else {
        return false;
    };
    if st.observed_generation.unwrap_or(-1) < d.metadata.generation.unwrap_or(0) {
        return false;
    }
    let declared =
        st.conditions.iter().flatten().any(|c| {
            c.type_ == "Progressing" && c.reason.as_deref() == Some("NewReplicaSetAvailable")
        });
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let updated = st.updated_replicas.unwrap_or(0);
    declared || (updated >= replicas && st.replicas.unwrap_or(0) <= updated)
}

impl From<&Deployment> for Istiod {
    fn from(d: &Deployment) -> Self {
        let revision = d
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(REVISION_LABEL))
            .cloned()
            .unwrap_or_else(|| "default".to_string());
        let discovery = d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.containers.iter().find(|c| c.name == DISCOVERY_CONTAINER));
        let env = |name: &str| {
            discovery
                .and_then(|c| c.env.as_ref())
                .and_then(|e| e.iter().find(|v| v.name == name))
                .and_then(|v| v.value.clone())
        };
        let version = discovery
            .and_then(|c| c.image.as_deref())
            .and_then(image_tag)
            .unwrap_or(UNKNOWN)
            .to_string();
        Istiod {
            revision,
            version,
            serving: serves_template(d),
            ca_server: env("ENABLE_CA_SERVER").is_none_or(|v| v != "false"),
            external_ca: env("EXTERNAL_CA").filter(|v| !v.is_empty()),
        }
    }
}

/// Watch names (in `meshwarden_watch_synced` and conditions).
pub const REVISIONS_WATCH: &str = "IstiodRevisions";
pub const TAGS_WATCH: &str = "RevisionTags";
pub const MESH_CONFIG_WATCH: &str = "MeshConfig";

/// The revisions that exist and the tags that point at them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Revisions {
    /// `istio.io/rev` of every istiod Deployment (label `app=istiod`), with its namespace.
    pub live: BTreeMap<String, BTreeSet<String>>,
    /// Tag -> revision, from the MutatingWebhookConfigurations labelled `istio.io/tag`.
    pub tags: BTreeMap<String, String>,
    /// Revision -> image tags of the discovery container of its Deployments ([`UNKNOWN`]
    /// when an image has no tag).
    pub versions: BTreeMap<String, BTreeSet<String>>,
    /// Not known (no controller runs): every value is taken to name a revision.
    pub any: bool,
    /// Revisions with an istiod Deployment whose template does not serve yet (rolling out,
    /// or stuck): the version that serves is not known, so their proxies are not judged.
    pub settling: BTreeSet<String>,
}

impl Revisions {
    /// Every `istio.io/rev` value is taken to name a revision (routing of watch events, where
    /// covering too much costs only a reconcile).
    pub fn any() -> Self {
        Revisions {
            any: true,
            ..Revisions::default()
        }
    }

    /// The revision whose injector serves `value` of an `istio.io/rev` label: the revision of
    /// that name when an istiod of it runs, or the revision a tag of that name points at when
    /// that revision runs. `None`: no live injector serves it, so pods get no sidecar (a tag
    /// of a revision that is gone keeps a webhook pointing at an istiod that no longer
    /// answers: with `failurePolicy: Fail` its pods are refused).
    pub fn resolve<'a>(&'a self, value: &'a str) -> Option<&'a str> {
        if self.any || self.live.contains_key(value) {
            return Some(value);
        }
        self.tags
            .get(value)
            .map(String::as_str)
            .filter(|rev| self.live.contains_key(*rev))
    }

    /// Whether the default injector (`istio-injection=enabled`) exists: the `default`
    /// revision runs, or a `default` tag points at a live revision. Revision-only installs
    /// have none.
    pub fn default_injector(&self) -> bool {
        self.resolve("default").is_some()
    }

    /// Adds an istiod Deployment of `namespace`.
    fn add(&mut self, istiod: &Istiod, namespace: String) {
        let rev = &istiod.revision;
        self.live.entry(rev.clone()).or_default().insert(namespace);
        self.versions
            .entry(rev.clone())
            .or_default()
            .insert(istiod.version.clone());
        if !istiod.serving {
            self.settling.insert(rev.clone());
        }
    }

    /// The revisions whose istiod runs in `namespace`.
    pub fn live_in(&self, namespace: &str) -> BTreeSet<String> {
        self.live
            .iter()
            .filter(|(_, namespaces)| namespaces.contains(namespace))
            .map(|(rev, _)| rev.clone())
            .collect()
    }

    /// What to tell a user whose label names `value`, which resolves to nothing.
    pub fn unknown_message(&self, value: &str) -> String {
        if let Some(rev) = self.tags.get(value) {
            return format!(
                "istio.io/rev={value} is a revision tag of revision {rev}, whose istiod no longer runs: its webhook points at no live injector, so its pods get no sidecar (or are refused while the webhook fails closed); point the tag at a live revision (istioctl tag set {value} --revision <revision> --overwrite)"
            );
        }
        let mut known: Vec<String> = self.live.keys().cloned().collect();
        known.extend(self.tags.keys().map(|t| format!("{t} (tag)")));
        let known = if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        };
        format!(
            "istio.io/rev={value} names no istiod revision (Deployment labelled app=istiod, istio.io/rev={value}) and no revision tag (MutatingWebhookConfiguration labelled istio.io/tag={value}), so no injector matches and its pods get no sidecar; revisions and tags: {known}"
        )
    }
}

/// The injector's decision for the pods of a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Injection {
    /// The default injector (`istio-injection=enabled`) or a live revision or tag injects.
    On,
    /// No injector selects the namespace.
    Off,
    /// `istio.io/rev` names no live revision and no tag: no injector webhook matches.
    UnknownRevision(String),
}

/// Whether Istio's injector injects every pod of a namespace with these labels. It follows the
/// namespace selectors of the injector webhooks in the istio-discovery chart
/// (`MutatingWebhookConfiguration` `istio-sidecar-injector`, and `istio-revision-tag-<tag>`):
/// - `namespace.sidecar-injector.istio.io` selects `istio-injection In [enabled]`;
/// - `rev.namespace.sidecar-injector.istio.io` selects `istio.io/rev In [<revision or tag>]`
///   **and** `istio-injection DoesNotExist`; only revisions that run and tags that exist
///   have such a webhook.
///
/// So any other value of `istio-injection` (`disabled`) switches injection off even when
/// `istio.io/rev` is set, and `istio.io/rev` alone turns it on when it names a revision or tag.
pub fn namespace_injection(
    ns_labels: &BTreeMap<String, String>,
    revisions: &Revisions,
) -> Injection {
    match ns_labels.get(INJECTION_LABEL).map(String::as_str) {
        Some("enabled") => Injection::On,
        Some(_) => Injection::Off,
        None => match ns_labels.get(REVISION_LABEL) {
            None => Injection::Off,
            Some(rev) if revisions.resolve(rev).is_some() => Injection::On,
            Some(rev) => Injection::UnknownRevision(rev.clone()),
        },
    }
}

/// The label that puts a namespace's or a pod's traffic through ztunnel (`ambient`); on a pod,
/// `none` takes it out of its ambient namespace.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// Whether pods are in ambient mode: a pod's `istio.io/dataplane-mode` label, when it has one,
/// overrides its namespace's. With `pod_labels` `None` it is the namespace's mode: the sidecars
/// section decides which namespaces it covers (the template labels it keeps are the injection
/// ones), the mTLS section decides for each pod.
pub fn ambient(
    ns_labels: &BTreeMap<String, String>,
    pod_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let mode = |labels: &BTreeMap<String, String>| {
        labels
            .get(DATAPLANE_MODE_LABEL)
            .map(|v| v.as_str() == "ambient")
    };
    pod_labels
        .and_then(mode)
        .or_else(|| mode(ns_labels))
        .unwrap_or(false)
}

/// Injection switch on a pod (label or annotation).
pub const INJECT: &str = "sidecar.istio.io/inject";

/// Injection templates of a pod; `gateway` marks an Istio gateway, which is not a sidecar.
pub const INJECT_TEMPLATES: &str = "inject.istio.io/templates";

/// [`namespace_injection`] is [`Injection::On`].
pub fn namespace_injection_on(ns_labels: &BTreeMap<String, String>, revisions: &Revisions) -> bool {
    namespace_injection(ns_labels, revisions) == Injection::On
}

type IstiodEntry = crate::compact::Compact<Deployment, Istiod>;

/// An injector webhook configuration (label `istio.io/rev`) as the cache keeps it: a
/// revision's own (`istio-sidecar-injector[-<revision>]`) or a revision tag's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injector {
    /// `istio.io/rev`: the revision it injects for.
    pub revision: String,
    /// `istio.io/tag`: the tag, for a tag's webhook.
    pub tag: Option<String>,
    /// Its webhooks call a URL, not a Service of the cluster: an istiod outside the cluster
    /// (an external control plane, a remote cluster), which has no local Deployment.
    pub external: bool,
}

impl From<&MutatingWebhookConfiguration> for Injector {
    fn from(m: &MutatingWebhookConfiguration) -> Self {
        let labels = m.metadata.labels.clone().unwrap_or_default();
        let hooks = m.webhooks.iter().flatten();
        Injector {
            revision: labels.get(REVISION_LABEL).cloned().unwrap_or_default(),
            tag: labels.get(TAG_LABEL).cloned(),
            external: hooks
                .map(|w| &w.client_config)
                .any(|c| c.url.is_some() && c.service.is_none()),
        }
    }
}

impl Revisions {
    /// Adds an injector webhook configuration: a tag, or a revision served from outside the
    /// cluster (live without a local istiod; its version is not known, so its proxies are
    /// never judged outdated). A revision's webhook calling a Service whose istiod is gone
    /// adds nothing: it injects nothing (or refuses pods while it fails closed).
    pub fn add_injector(&mut self, injector: &Injector) {
        if injector.revision.is_empty() {
            return;
        }
        match &injector.tag {
            Some(tag) => {
                self.tags.insert(tag.clone(), injector.revision.clone());
            }
            None if injector.external => {
                self.live.entry(injector.revision.clone()).or_default();
            }
            None => {}
        }
    }
}

/// The live revisions, their versions and the tags, listed (without the controller's cache).
pub async fn list_revisions(client: &kube::Client) -> Result<Revisions> {
    let lp = kube::api::ListParams::default().match_any();
    let istiods = Api::<Deployment>::all(client.clone())
        .list(&lp.clone().labels("app=istiod"))
        .await
        .map_err(|e| Error::kube("list istiod Deployments", e))?;
    let injectors = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .list(&lp.labels(REVISION_LABEL))
        .await
        .map_err(|e| Error::kube("list injector webhook configurations", e))?;
    let mut out = Revisions::default();
    for d in &istiods.items {
        let ns = d.metadata.namespace.clone().unwrap_or_default();
        out.add(&Istiod::from(d), ns);
    }
    for m in &injectors.items {
        out.add_injector(&Injector::from(m));
    }
    Ok(out)
}
/// An injector webhook configuration, reduced on arrival ([`Injector`]).
type InjectorEntry = crate::compact::Compact<MutatingWebhookConfiguration, Injector>;

/// The watched revisions, tags and mesh configs, while the controller runs.
#[derive(Clone)]
pub struct IstioCache {
    istio_namespace: String,
    istiods: Store<IstiodEntry>,
    injectors: Store<InjectorEntry>,
    meshes: Store<ConfigMap>,
    /// The ConfigMaps seen holding a mesh config since the watch started (names; a few at
    /// most): one of them gone makes the root namespace unknown, not assumed.
    seen_meshes: Arc<std::sync::Mutex<BTreeSet<String>>>,
    health: Arc<Health>,
}

/// Keeps name, namespace and labels.
fn strip_meta(m: &mut kube::core::ObjectMeta) {
    *m = kube::core::ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        labels: m.labels.take(),
        ..Default::default()
    };
}

/// Keeps only the `mesh` key of the ConfigMaps that can hold a mesh config.
fn strip_config_map(cm: &mut ConfigMap) {
    strip_meta(&mut cm.metadata);
    let name = cm.metadata.name.as_deref().unwrap_or_default();
    let mesh_config = name == "istio" || name.starts_with("istio-");
    cm.data = cm
        .data
        .take()
        .and_then(|mut d| d.remove(MESH_KEY))
        .filter(|_| mesh_config)
        .map(|m| [(MESH_KEY.to_string(), m)].into());
    cm.binary_data = None;
}

/// Records that `cm` holds a mesh config (after [`strip_config_map`], only those keep data).
fn remember_mesh_config(seen: &std::sync::Mutex<BTreeSet<String>>, cm: &ConfigMap) {
    let holds = cm.data.as_ref().is_some_and(|d| d.contains_key(MESH_KEY));
    if let (true, Some(name), Ok(mut s)) = (holds, cm.metadata.name.as_ref(), seen.lock())
        && !s.contains(name)
    {
        s.insert(name.clone());
    }
}

impl IstioCache {
    /// The caches and the stream that drives their watches (it must be polled; it yields
    /// whenever one of them changed).
    pub fn watch(
        client: &kube::Client,
        health: &Arc<Health>,
        istio_namespace: &str,
    ) -> (IstioCache, impl Stream<Item = ()> + Send + 'static) {
        // Whole Deployments (few), reduced on arrival to revision and image tag.
        let (istiods, w1) = reflector::store::<IstiodEntry>();
        let api: Api<IstiodEntry> = Api::all(client.clone());
        let s1 = reflector::reflector(
            w1,
            watch::resilient(health.clone(), REVISIONS_WATCH, move || {
                watcher::watcher(api.clone(), watcher::Config::default().labels("app=istiod"))
            }),
        );
        // Injector webhook configurations (few; tags' and revisions'), reduced on arrival.
        let (injectors, w2) = reflector::store::<InjectorEntry>();
        let api: Api<InjectorEntry> = Api::all(client.clone());
        let s2 = reflector::reflector(
            w2,
            watch::resilient(health.clone(), TAGS_WATCH, move || {
                watcher::watcher(
                    api.clone(),
                    watcher::Config::default().labels(REVISION_LABEL),
                )
            }),
        );
        let (meshes, w3) = reflector::store::<ConfigMap>();
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), istio_namespace);
        let seen_meshes: Arc<std::sync::Mutex<BTreeSet<String>>> = Arc::default();
        let seen = seen_meshes.clone();
        let s3 = reflector::reflector(
            w3,
            watch::resilient(health.clone(), MESH_CONFIG_WATCH, move || {
                watcher::watcher(api.clone(), watcher::Config::default())
            })
            .modify(strip_config_map)
            .inspect(move |ev| {
                if let Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) = ev {
                    remember_mesh_config(&seen, cm);
                }
            }),
        );
        let changes = futures::stream::select(s1.map(|e| e.is_ok()), s2.map(|e| e.is_ok()));
        let changes = futures::stream::select(changes, s3.map(|e| e.is_ok()))
            .filter_map(|ok| futures::future::ready(ok.then_some(())));
        (
            IstioCache {
                istio_namespace: istio_namespace.to_string(),
                istiods,
                injectors,
                meshes,
                seen_meshes,
                health: health.clone(),
            },
            changes,
        )
    }

    /// istiod's namespace (`--istio-namespace`).
    pub fn istio_namespace(&self) -> &str {
        &self.istio_namespace
    }

    /// The live revisions and tags, once both watches have listed (waits up to `limit`).
    pub async fn revisions(&self, limit: Duration) -> Result<Revisions> {
        self.health
            .wait_readable(&[REVISIONS_WATCH, TAGS_WATCH], limit)
            .await
            .map_err(Error::Cache)?;
        let mut out = self.live();
        for m in self.injectors.state() {
            out.add_injector(&m.facts);
        }
        Ok(out)
    }

    /// The ConfigMaps of istiod's namespace labelled `key`, as the mesh-config watch keeps
    /// them (name, namespace and labels; no data).
    pub async fn config_maps_labelled(
        &self,
        key: &str,
        limit: Duration,
    ) -> Result<Vec<kube::core::ObjectMeta>> {
        self.health
            .wait_readable(&[MESH_CONFIG_WATCH], limit)
            .await
            .map_err(Error::Cache)?;
        Ok(self
            .meshes
            .state()
            .iter()
            .filter(|cm| {
                cm.metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key(key))
            })
            .map(|cm| cm.metadata.clone())
            .collect())
    }

    /// Every istiod Deployment's facts, with its namespace.
    pub fn istiods(&self) -> Vec<(String, Istiod)> {
        self.istiods
            .state()
            .iter()
            .map(|d| {
                (
                    d.metadata.namespace.clone().unwrap_or_default(),
                    Istiod::clone(&d.facts),
                )
            })
            .collect()
    }

    /// The live revisions (no tags).
    fn live(&self) -> Revisions {
        let mut out = Revisions::default();
        for d in self.istiods.state() {
            out.add(&d.facts, d.metadata.namespace.clone().unwrap_or_default());
        }
        out
    }

    /// The `mesh` documents of the mesh configs in istiod's namespace (`istio`,
    /// `istio-<revision>`), as watched now.
    pub fn mesh_documents(&self) -> Vec<String> {
        self.meshes
            .state()
            .iter()
            .filter_map(|cm| cm.data.as_ref()?.get(MESH_KEY).cloned())
            .collect()
    }

    /// Whether `namespace` may be Istio's root namespace: istiod's, or one a mesh config of
    /// istiod's namespace names (whether or not its revision runs: cheap and on the safe side,
    /// for routing events).
    pub fn may_be_root(&self, namespace: &str) -> bool {
        namespace == self.istio_namespace
            || self
                .mesh_documents()
                .iter()
                .any(|m| matches!(mesh::root_namespace_of(m), Ok(Some(r)) if r == namespace))
    }

    /// Istio's root namespace from the mesh configs of the revisions in istiod's namespace.
    /// Outer Err: the caches cannot be read; inner Err: the mesh configs are unclear, or
    /// cannot be read (see [`mesh_root`]).
    pub async fn mesh_root(
        &self,
        limit: Duration,
    ) -> Result<std::result::Result<MeshRoot, MeshRootError>> {
        self.health
            .wait_readable(&[MESH_CONFIG_WATCH, REVISIONS_WATCH], limit)
            .await
            .map_err(Error::Cache)?;
        let revisions = self.live();
        let maps: BTreeMap<String, String> = self
            .meshes
            .state()
            .iter()
            .filter_map(|cm| {
                let mesh = cm.data.as_ref()?.get(MESH_KEY)?.clone();
                Some((cm.metadata.name.clone()?, mesh))
            })
            .collect();
        let seen = self
            .seen_meshes
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        Ok(mesh_root(
            &self.istio_namespace,
            &revisions.live_in(&self.istio_namespace),
            &maps,
            &seen,
        ))
    }
}

pub mod drain;
mod mesh;
pub use mesh::*;

#[cfg(test)]
mod tests;
