//! Which policies an object event concerns.

use futures::future::{Ready, ready};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

use super::watches::Triggers;
use crate::api::MeshPolicy;
use crate::rules::{self, Section, Sections, sidecars};

/// Policies with an `mtls` section: a PeerAuthentication, namespace or pod anywhere can
/// change what it holds.
pub(super) fn policies_with_mtls(store: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| p.spec.mtls.is_some())
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Policies with a `certificates` section: a root certificate anywhere concerns them.
pub(super) fn policies_with_certificates(store: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| p.spec.certificates.is_some())
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Policies whose rules cover objects in `namespace`.
pub(super) fn policies_for_namespace(
    store: &Store<MeshPolicy>,
    namespace: &str,
) -> Vec<ObjectRef<MeshPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| rules::covers_namespace(&p.spec, namespace))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Every policy with an HA section (control plane or gateways): a node change can change
/// where their pods run or could run.
pub(super) fn policies_with_ha(store: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| p.spec.control_plane.is_some() || !p.spec.gateways.is_empty())
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Every policy with a sidecars, mtls, upgrades, resilience or security section: they decide
/// by namespace labels and by what Istio injects (revisions, tags), and mtls, resilience and
/// security by the mesh config (security by istiod's CA settings too).
pub(super) fn policies_with_sidecars_or_mtls(
    store: &Store<MeshPolicy>,
) -> Vec<ObjectRef<MeshPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| {
            p.spec.sidecars.is_some()
                || p.spec.mtls.is_some()
                || p.spec.upgrades.is_some()
                || p.spec.resilience.is_some()
                || p.spec.security.is_some()
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// The policies of `store` that `f` chooses.
fn chosen(
    store: &Store<MeshPolicy>,
    f: impl Fn(&MeshPolicy) -> bool,
) -> Vec<ObjectRef<MeshPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| f(p))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Policies with a `resilience` section: a DestinationRule or Service anywhere concerns them.
pub(super) fn policies_with_resilience(store: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    chosen(store, |p| p.spec.resilience.is_some())
}

/// Policies with a `security` section: an AuthorizationPolicy anywhere, or a CA Secret,
/// concerns them.
pub(super) fn policies_with_security(store: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    chosen(store, |p| p.spec.security.is_some())
}

/// Policies with an `upgrades` section: a running pod anywhere can change what it counts.
pub(super) fn policies_with_upgrades(store: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| p.spec.upgrades.is_some())
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// A workload's metadata, and whether its event is the echo of the sidecars section's own
/// write ([`sidecars::Cache::echoes_own_write`]).
pub(super) fn echo<K>(
    cache: &Option<sidecars::Cache>,
    o: sidecars::CachedWorkload<K>,
) -> (ObjectMeta, bool) {
    let echo = cache.as_ref().is_some_and(|c| {
        c.echoes_own_write(
            o.metadata.namespace.as_deref().unwrap_or_default(),
            &o.facts,
        )
    });
    (o.metadata, echo)
}

/// Turns watch events of the rule caches into policies to reconcile.
pub(super) struct Route {
    pub policies: Store<MeshPolicy>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub triggers: Triggers,
}

impl Route {
    /// A workload changed: the policies whose HA sections cover its namespace (for those
    /// sections), and those whose sidecars section covers it.
    /// `echo`: the event is the echo of the sidecars section's own write ([`echo`]).
    pub fn workload(&self, event: Result<(ObjectMeta, bool), watcher::Error>) -> Ready<()> {
        if let Ok((meta, echo)) = event
            && let Some(ns) = meta.namespace
        {
            tracing::debug!(namespace = %ns, name = meta.name.as_deref().unwrap_or_default(), echo, "workload changed");
            self.triggers.add(
                self.policies_where(|p| rules::covers_namespace(&p.spec, &ns)),
                Sections::HA,
            );
            if !echo {
                self.triggers.add(
                    self.sidecars_covering(&ns),
                    Section::SidecarResources.only(),
                );
            }
        }
        ready(())
    }

    /// The policies `f` chooses.
    fn policies_where(&self, f: impl Fn(&MeshPolicy) -> bool) -> Vec<ObjectRef<MeshPolicy>> {
        self.policies
            .state()
            .iter()
            .filter(|p| f(p))
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect()
    }

    /// The policies whose sidecars section may cover namespace `ns`.
    fn sidecars_covering(&self, ns: &str) -> Vec<ObjectRef<MeshPolicy>> {
        let labels = self
            .namespaces
            .get(&ObjectRef::new(ns))
            .map(|n| n.labels().clone());
        self.policies_where(|p| sidecars::covers_namespace(&p.spec, labels.as_ref()))
    }

    /// A PDB changed: the HA sections of the policies covering its namespace, and the
    /// sections whose rollout gate reads budgets (sidecars covering the namespace, upgrades).
    pub fn budget(&self, event: Result<ObjectMeta, watcher::Error>) -> Ready<()> {
        if let Some(ns) = event.ok().and_then(|m| m.namespace) {
            self.triggers.add(
                self.policies_where(|p| rules::covers_namespace(&p.spec, &ns)),
                Sections::HA,
            );
            self.triggers.add(
                self.sidecars_covering(&ns),
                Section::SidecarResources.only(),
            );
            self.triggers.add(
                self.policies_where(|p| p.spec.upgrades.is_some()),
                Section::Upgrades.only(),
            );
        }
        ready(())
    }

    /// A running pod changed: the upgrades sections (they count every proxy) and the HA
    /// sections covering its namespace (it may be a replica of their targets).
    pub fn running_pod(
        &self,
        event: Result<crate::rules::sidecars::CachedPod, watcher::Error>,
    ) -> Ready<()> {
        if let Ok(pod) = event {
            if let Some(ns) = &pod.metadata.namespace {
                self.triggers
                    .add(policies_for_namespace(&self.policies, ns), Sections::HA);
            }
            self.triggers.add(
                policies_with_upgrades(&self.policies),
                Section::Upgrades.only(),
            );
        }
        ready(())
    }

    /// An HPA changed: the HA sections of the policies covering its namespace.
    pub fn namespaced(&self, event: Result<ObjectMeta, watcher::Error>) -> Ready<()> {
        if let Some(ns) = event.ok().and_then(|m| m.namespace) {
            self.triggers
                .add(policies_for_namespace(&self.policies, &ns), Sections::HA);
        }
        ready(())
    }

    /// Something `sections` of the policies chosen by `which` read changed.
    pub fn when_ok<T>(
        &self,
        event: Result<T, watcher::Error>,
        which: impl Fn(&Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>>,
        sections: Sections,
    ) -> Ready<()> {
        if event.is_ok() {
            self.triggers.add(which(&self.policies), sections);
        }
        ready(())
    }
}
