//! Which policies an object event concerns.

use std::sync::Arc;

use futures::future::{Ready, ready};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;

use super::watches::Triggers;
use crate::api::MeshPolicy;
use crate::compact::Compact;
use crate::rules::{self, Section, Sections, sidecars};

/// Policies with an `mtls` section: a PeerAuthentication, namespace or pod anywhere can
/// change what it holds.
pub(super) fn policies_with_mtls(store: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    policies_with(store, |p| p.spec.mtls.is_some())
}

/// Policies with a `certificates` section: a root certificate anywhere concerns them.
pub(super) fn policies_with_certificates(store: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    policies_with(store, |p| p.spec.certificates.is_some())
}

/// The policies of `store` that `f` chooses.
fn policies_with(
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

/// Policies with an `ambient` section: a ztunnel or istio-cni DaemonSet anywhere concerns
/// them.
pub(super) fn policies_with_ambient(store: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    policies_with(store, |p| p.spec.ambient.is_some())
}

/// Policies whose rules cover objects in `namespace`.
pub(super) fn policies_for_namespace(
    store: &Store<MeshPolicy>,
    namespace: &str,
) -> Vec<ObjectRef<MeshPolicy>> {
    policies_with(store, |p| rules::covers_namespace(&p.spec, namespace))
}

/// Every policy with an HA section (control plane, gateways or Gateway API gateways): a node
/// change can change where their pods run or could run.
pub(super) fn policies_with_ha(store: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    policies_with(store, |p| {
        p.spec.control_plane.is_some()
            || !p.spec.gateways.is_empty()
            || p.spec.gateway_api.is_some()
    })
}

/// Every policy with a sidecars, mtls, upgrades, ambient, resilience or security section: they
/// decide by namespace labels and by what Istio injects (revisions, tags, versions), and mtls,
/// resilience and security by the mesh config (security by istiod's CA settings too).
pub(super) fn policies_with_sidecars_or_mtls(
    store: &Store<MeshPolicy>,
) -> Vec<ObjectRef<MeshPolicy>> {
    policies_with(store, |p| {
        p.spec.sidecars.is_some()
            || p.spec.mtls.is_some()
            || p.spec.upgrades.is_some()
            || p.spec.ambient.is_some()
            || p.spec.resilience.is_some()
            || p.spec.security.is_some()
    })
}

/// The `namespaceSelector` of a policy's report `section` (`None`: it has no such section).
fn selector(
    p: &MeshPolicy,
    section: Section,
) -> Option<&Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>> {
    match section {
        Section::Resilience => p.spec.resilience.as_ref().map(|r| &r.namespace_selector),
        Section::Security => p.spec.security.as_ref().map(|s| &s.namespace_selector),
        _ => None,
    }
}

/// The namespace and facts after a watch event of the indexed kinds (`None` facts: deleted);
/// `None` for the events of a (re)list.
fn applied<K, F>(event: &watcher::Event<Compact<K, F>>) -> Option<(&str, Option<&F>)> {
    match event {
        watcher::Event::Apply(o) => Some((o.metadata.namespace.as_deref()?, Some(&*o.facts))),
        watcher::Event::Delete(o) => Some((o.metadata.namespace.as_deref()?, None)),
        _ => None,
    }
}

/// Policies with an `upgrades` section: a running pod anywhere can change what it counts.
pub(super) fn policies_with_upgrades(store: &Store<MeshPolicy>) -> Vec<ObjectRef<MeshPolicy>> {
    policies_with(store, |p| p.spec.upgrades.is_some())
}

/// A workload's metadata, whether its event is the echo of the sidecars section's own
/// write ([`sidecars::Cache::echoes_own_write`]), and whether istiod rendered it for a Gateway
/// (it carries the Gateway's class).
pub(super) fn echo<K>(
    cache: &Option<sidecars::Cache>,
    o: sidecars::CachedWorkload<K>,
) -> (ObjectMeta, bool, bool) {
    let echo = cache.as_ref().is_some_and(|c| {
        c.echoes_own_write(
            o.metadata.namespace.as_deref().unwrap_or_default(),
            &o.facts,
        )
    });
    let rendered = o
        .facts
        .labels
        .contains_key(rules::gateway_api::plan::CLASS_LABEL);
    (o.metadata, echo, rendered)
}

/// Turns watch events of the rule caches into policies to reconcile.
pub(super) struct Route {
    pub policies: Store<MeshPolicy>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    pub triggers: Triggers,
    /// Where Istio's root namespace may be (`None`: anywhere).
    pub istio: Option<crate::istio::IstioCache>,
}

impl Route {
    /// A workload changed: the policies whose HA sections cover its namespace (for those
    /// sections), and those whose sidecars section covers it.
    /// `echo`: the event is the echo of the sidecars section's own write ([`echo`]).
    pub fn workload(&self, event: Result<(ObjectMeta, bool, bool), watcher::Error>) -> Ready<()> {
        if let Ok((meta, echo, rendered)) = event
            && let Some(ns) = meta.namespace
        {
            if rendered {
                self.gateway_api(None);
            }
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
            // The report sections are routed as the index applies the event
            // ([`Route::workload_replaced`]): only a change of what they read concerns them.
        }
        ready(())
    }

    /// A workload event as its index applied it (`replaced`: the entry it replaced or
    /// removed): the security sections when it came, went or changed its pods' labels or its
    /// Gateway class (their default deny per workload, the waypoints istiod runs), and the
    /// resilience sections checking drains in its namespace when it came, went or changed its
    /// grace period or drain settings. A spec edit of anything else, and every status update,
    /// concern neither. The events of a (re)list are not routed here: every section of every
    /// policy is evaluated after a relist.
    pub fn workload_replaced<K>(
        &self,
        event: &watcher::Event<sidecars::CachedWorkload<K>>,
        replaced: Option<Arc<sidecars::WorkloadFacts>>,
    ) {
        let Some((ns, after)) = applied(event) else {
            return;
        };
        let before = replaced.as_deref();
        if rules::security::workloads::reads_changed(before, after) {
            self.triggers.add(
                self.covering(ns, Section::Security, |_| true),
                Section::Security.only(),
            );
        }
        if rules::resilience::workloads::drain_reads_changed(before, after) {
            self.triggers
                .add(self.drains_covering(ns), Section::Resilience.only());
        }
    }

    /// A running pod's event as `index` applied it (`replaced`: the entry it replaced or
    /// removed): the resilience sections checking drains in its namespace when its workload's
    /// first pod with a judged sidecar came or its last one went.
    pub fn pod_replaced(
        &self,
        index: &sidecars::ByNamespace<sidecars::PodFacts>,
        event: &watcher::Event<sidecars::CachedPod>,
        replaced: Option<Arc<sidecars::PodFacts>>,
    ) {
        let Some((ns, after)) = applied(event) else {
            return;
        };
        let changed = rules::resilience::workloads::judged_set_changed(
            replaced.as_deref(),
            after,
            index.read().get(ns),
        );
        if changed {
            self.triggers
                .add(self.drains_covering(ns), Section::Resilience.only());
        }
    }

    /// The `gatewayApi` sections of the policies that declare one, and of the policy an object
    /// istiod rendered from meshwarden's defaults names (its section may be gone: what it
    /// left behind is removed).
    pub fn gateway_api(&self, meta: Option<&ObjectMeta>) {
        use rules::gateway_api::plan::{CLASS_LABEL, RENDERED_FOR};
        let labels = meta.and_then(|m| m.labels.as_ref());
        let named = labels.and_then(|l| l.get(RENDERED_FOR)).cloned();
        if meta.is_some() && named.is_none() && !labels.is_some_and(|l| l.contains_key(CLASS_LABEL))
        {
            return;
        }
        self.triggers.add(
            self.policies_where(|p| {
                p.spec.gateway_api.is_some() || named.as_deref() == Some(p.name_any().as_str())
            }),
            Section::GatewayApi.only(),
        );
    }

    /// An object a report section reads changed (`changed`: in which namespace): that section
    /// of the policies whose `namespaceSelector` selects the namespace, or of every policy
    /// with it when the namespace may be Istio's root namespace (its DestinationRules and
    /// AuthorizationPolicies apply mesh-wide; istiod's CA Secrets are there) or a relist
    /// changed the map. A DestinationRule, Service, VirtualService or AuthorizationPolicy of
    /// a namespace no section covers decides nothing it reports: the rules it resolves are
    /// those of the covered Services' clients, their namespaces and the root.
    pub fn report_object(
        &self,
        changed: crate::rules::lazy::Changed,
        section: Section,
    ) -> Ready<()> {
        use crate::rules::lazy::Changed;
        let everywhere = match &changed {
            Changed::All => true,
            Changed::In(ns) => self.istio.as_ref().is_none_or(|c| c.may_be_root(ns)),
        };
        let policies = match changed {
            _ if everywhere => self.policies_where(|p| selector(p, section).is_some()),
            Changed::In(ns) => self.covering(&ns, section, |_| true),
            Changed::All => Vec::new(),
        };
        self.triggers.add(policies, section.only());
        ready(())
    }

    /// The policies whose report `section` (resilience or security) covers namespace `ns`,
    /// and that `also` chooses.
    fn covering(
        &self,
        ns: &str,
        section: Section,
        also: impl Fn(&MeshPolicy) -> bool,
    ) -> Vec<ObjectRef<MeshPolicy>> {
        let labels = self
            .namespaces
            .get(&ObjectRef::new(ns))
            .map(|n| n.labels().clone())
            .unwrap_or_default();
        self.policies_where(|p| {
            selector(p, section).is_some_and(|s| {
                s.as_ref()
                    .is_none_or(|s| crate::selector::matches(s, &labels))
            }) && also(p)
        })
    }

    /// The policies `f` chooses.
    fn policies_where(&self, f: impl Fn(&MeshPolicy) -> bool) -> Vec<ObjectRef<MeshPolicy>> {
        policies_with(&self.policies, f)
    }

    /// The policies whose sidecars section may cover namespace `ns`.
    fn sidecars_covering(&self, ns: &str) -> Vec<ObjectRef<MeshPolicy>> {
        let labels = self
            .namespaces
            .get(&ObjectRef::new(ns))
            .map(|n| n.labels().clone());
        self.policies_where(|p| sidecars::covers_namespace(&p.spec, labels.as_ref()))
    }

    /// The policies whose resilience section checks drains in namespace `ns`.
    fn drains_covering(&self, ns: &str) -> Vec<ObjectRef<MeshPolicy>> {
        self.covering(ns, Section::Resilience, |p| {
            p.spec
                .resilience
                .as_ref()
                .is_some_and(|r| r.drain_within_grace_period == crate::api::Requirement::Required)
        })
    }

    /// A PDB changed: the HA sections of the policies covering its namespace, and the
    /// sections whose rollout gate reads budgets (sidecars covering the namespace, upgrades).
    pub fn budget(&self, event: Result<ObjectMeta, watcher::Error>) -> Ready<()> {
        if let Ok(meta) = &event {
            self.gateway_api(Some(meta));
        }
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

    /// A running pod changed: the upgrades sections (they count every proxy), the HA
    /// sections covering its namespace (it may be a replica of their targets) and, for a node
    /// agent's pod or a pod in ambient mode, the ambient sections.
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
            if self.concerns_ambient(&pod) {
                self.triggers.add(
                    policies_with_ambient(&self.policies),
                    Section::Ambient.only(),
                );
            }
        }
        ready(())
    }

    /// Whether a running pod's change concerns the ambient sections (a node agent's pod, or a
    /// pod in ambient mode), read with its namespace's labels.
    fn concerns_ambient(&self, pod: &crate::rules::sidecars::CachedPod) -> bool {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let labels = self
            .namespaces
            .get(&ObjectRef::new(ns))
            .map(|n| n.labels().clone());
        let mode = labels
            .as_ref()
            .and_then(|l| l.get(crate::istio::DATAPLANE_MODE_LABEL))
            .map(String::as_str);
        rules::ambient::plan::concerns(mode, &pod.facts)
    }

    /// An HPA changed: the HA sections of the policies covering its namespace.
    pub fn namespaced(&self, event: Result<ObjectMeta, watcher::Error>) -> Ready<()> {
        if let Ok(meta) = &event {
            self.gateway_api(Some(meta));
        }
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
