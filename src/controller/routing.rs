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
use crate::rules::{self, sidecars};

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

/// Policies to reconcile for an event on a workload in `namespace`: those whose HA rules cover
/// it, and those whose sidecars section covers it (by the namespace's labels, when known).
pub(super) fn policies_for_workload(
    store: &Store<MeshPolicy>,
    namespaces: &Store<PartialObjectMeta<Namespace>>,
    namespace: &str,
) -> Vec<ObjectRef<MeshPolicy>> {
    let ns = namespaces.get(&ObjectRef::new(namespace));
    let labels = ns.as_ref().map(|n| n.labels().clone());
    store
        .state()
        .iter()
        .filter(|p| {
            rules::covers_namespace(&p.spec, namespace)
                || sidecars::covers_namespace(&p.spec, labels.as_ref())
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Every policy with a sidecars or an mtls section: both decide by namespace labels and by
/// what Istio injects (revisions, tags), and mtls by the mesh config.
pub(super) fn policies_with_sidecars_or_mtls(
    store: &Store<MeshPolicy>,
) -> Vec<ObjectRef<MeshPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| p.spec.sidecars.is_some() || p.spec.mtls.is_some())
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Turns watch events of the rule caches into policies to reconcile.
pub(super) struct Route {
    pub policies: Store<MeshPolicy>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub triggers: Triggers,
}

impl Route {
    /// A workload changed: the policies whose HA or sidecars sections cover its namespace.
    pub fn workload(&self, event: Result<ObjectMeta, watcher::Error>) -> Ready<()> {
        if let Some(ns) = event.ok().and_then(|m| m.namespace) {
            self.triggers
                .add(policies_for_workload(&self.policies, &self.namespaces, &ns));
        }
        ready(())
    }

    /// An HPA or PDB changed: the policies whose HA sections cover its namespace.
    pub fn namespaced(&self, event: Result<ObjectMeta, watcher::Error>) -> Ready<()> {
        if let Some(ns) = event.ok().and_then(|m| m.namespace) {
            self.triggers
                .add(policies_for_namespace(&self.policies, &ns));
        }
        ready(())
    }

    /// Something the policies chosen by `which` read changed.
    pub fn when_ok<T>(
        &self,
        event: Result<T, watcher::Error>,
        which: impl Fn(&Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>>,
    ) -> Ready<()> {
        if event.is_ok() {
            self.triggers.add(which(&self.policies));
        }
        ready(())
    }
}
