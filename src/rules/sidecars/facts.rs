//! The facts the section reads about a workload or pod, reduced on arrival from the watch.

use super::*;

/// A workload whose pods get a sidecar, as read from the cluster: its facts (shared with the
/// cache, see [`WorkloadFacts`]), its namespace, and its rollout state as of now.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Shared by the namespace's workloads (an evaluation assembles every target).
    pub namespace: Arc<str>,
    pub facts: Arc<WorkloadFacts>,
    /// The facts' rollout, with stalls of StatefulSets and DaemonSets decided.
    pub rollout: Rollout,
}

impl std::ops::Deref for Workload {
    type Target = WorkloadFacts;
    fn deref(&self) -> &WorkloadFacts {
        &self.facts
    }
}

impl Workload {
    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.kind.as_str(), self.namespace, self.name)
    }

    /// Current per-pod proxy amount from the template's annotations (0 when unset: the mesh
    /// default is not known, so the whole declared amount counts as added).
    pub(super) fn current(&self, key: &str) -> i128 {
        let ann = match key {
            "requests.cpu" => PROXY_CPU,
            "limits.cpu" => PROXY_CPU_LIMIT,
            "requests.memory" => PROXY_MEMORY,
            _ => PROXY_MEMORY_LIMIT,
        };
        self.template_annotations
            .get(ann)
            .and_then(|v| quantity::millis(v))
            .unwrap_or(0)
    }
}

/// What the rule knows of a workload, read from the whole object once (watch event or LIST)
/// and kept instead of it.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadFacts {
    pub kind: Kind,
    pub name: String,
    /// The workload's own labels (the HA section finds its targets by them).
    pub labels: SmallMap<String>,
    pub generation: i64,
    /// Pods it runs when rolled out (a DaemonSet: the nodes it is scheduled on).
    pub replicas: i32,
    /// Template labels that decide injection (`sidecar.istio.io/inject`, `istio.io/rev`).
    pub template_labels: SmallMap<&'static str>,
    /// Template annotations the rule reads: the four proxy values, meshwarden's hash,
    /// `sidecar.istio.io/inject` and `inject.istio.io/templates`.
    pub template_annotations: SmallMap<&'static str>,
    /// Opted out with `meshwarden.io/ignore: sidecar-resources` on the workload.
    pub opted_out: bool,
    /// Another meshwarden rule writes it (see [`owned_by_other_rule`]).
    pub other_rule: bool,
    /// When meshwarden last changed it.
    pub written_at: Option<jiff::Timestamp>,
    /// The generation meshwarden's last write of the template produced
    /// ([`GENERATION_ANNOTATION`]); `None` when it never wrote it (or an older version did).
    pub written_generation: Option<i64>,
    /// The generation the upgrades section's last restart produced
    /// ([`RESTART_GENERATION_ANNOTATION`]).
    pub restart_generation: Option<i64>,
    /// What that restart aimed for ([`RESTART_TARGET_ANNOTATION`]).
    pub restart_target: Option<String>,
    /// Opted out of restarts with `meshwarden.io/ignore: upgrades`.
    pub restart_opted_out: bool,
    /// Managers other than meshwarden that own one of the four annotations.
    pub foreign_owners: Vec<String>,
    /// Their writes of the four annotations (the evidence of a fight).
    pub foreign_writes: ForeignWrites,
    /// Requests/limits of the template's other containers.
    pub other_containers: Amounts,
    pub rollout: Rollout,
    /// When its controller declared its last rollout complete (a Deployment's `Progressing`
    /// condition `lastUpdateTime` with reason `NewReplicaSetAvailable`; `None` for the other
    /// kinds).
    pub rolled_out_at: Option<jiff::Timestamp>,
    /// The workload's controller has observed its generation (`status.observedGeneration`).
    pub observed: bool,
    /// How its controller replaces pods ([`super::gate`]).
    pub strategy: Strategy,
    /// The pod template's labels: the PodDisruptionBudgets that select its pods are found
    /// by them.
    pub pod_labels: SmallMap<String>,
    /// Opted in to rollouts that may cost availability ([`ROLLOUT_ANNOTATION`]).
    pub allow_disruption: bool,
    // Read by the resilience section (drain against the grace period), parsed on arrival.
    /// The template's `terminationGracePeriodSeconds` (`None`: unset).
    pub grace_seconds: Option<u32>,
    /// The drain settings of the template's `proxy.istio.io/config` annotation.
    pub drain: crate::istio::drain::Drain,
}

/// The `managedFields` paths of the four proxy annotations.
pub(super) fn annotation_paths() -> Vec<Vec<String>> {
    [PROXY_CPU, PROXY_CPU_LIMIT, PROXY_MEMORY, PROXY_MEMORY_LIMIT]
        .iter()
        .map(|k| {
            ["f:spec", "f:template", "f:metadata", "f:annotations"]
                .iter()
                .map(|p| p.to_string())
                .chain([format!("f:{k}")])
                .collect()
        })
        .collect()
}

pub(super) const TEMPLATE_LABELS: [&str; 2] = [INJECT, "istio.io/rev"];

pub(super) const TEMPLATE_ANNOTATIONS: [&str; 8] = [
    PROXY_CPU,
    PROXY_CPU_LIMIT,
    PROXY_MEMORY,
    PROXY_MEMORY_LIMIT,
    HASH_ANNOTATION,
    INJECT,
    INJECT_TEMPLATES,
    PROXY_IMAGE,
];

/// The entries of `map` under `keys`, keyed by them.
pub(super) fn only(
    map: Option<&BTreeMap<String, String>>,
    keys: &[&'static str],
) -> SmallMap<&'static str> {
    small_map(map.into_iter().flat_map(|m| {
        keys.iter()
            .filter_map(|k| m.get(*k).map(|v| (*k, v.clone())))
    }))
}

impl WorkloadFacts {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn read(
        kind: Kind,
        meta: &ObjectMeta,
        template: Option<&PodTemplateSpec>,
        replicas: i32,
        rollout: Rollout,
        observed_generation: Option<i64>,
        strategy: Strategy,
    ) -> Self {
        let tpl_meta = template.and_then(|t| t.metadata.as_ref());
        let mut foreign_owners = Vec::new();
        let paths = annotation_paths();
        for path in &paths {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            for m in write::foreign_managers(meta, &path) {
                if !foreign_owners.contains(&m) {
                    foreign_owners.push(m);
                }
            }
        }
        let containers = template
            .and_then(|t| t.spec.as_ref())
            .map(|s| s.containers.as_slice())
            .unwrap_or_default();
        // Read by the resilience section.
        let (grace_seconds, drain) = crate::istio::drain::of_template(template);
        WorkloadFacts {
            kind,
            name: meta.name.clone().unwrap_or_default(),
            labels: small_map(
                meta.labels
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.clone())),
            ),
            generation: meta.generation.unwrap_or(0),
            replicas,
            template_labels: only(tpl_meta.and_then(|m| m.labels.as_ref()), &TEMPLATE_LABELS),
            template_annotations: only(
                tpl_meta.and_then(|m| m.annotations.as_ref()),
                &TEMPLATE_ANNOTATIONS,
            ),
            opted_out: opted_out(&annotations_of(Some(meta))),
            restart_opted_out: ignores(&annotations_of(Some(meta)), IGNORE_UPGRADES),
            restart_generation: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(RESTART_GENERATION_ANNOTATION))
                .and_then(|v| v.parse().ok()),
            restart_target: annotations_of(Some(meta))
                .get(RESTART_TARGET_ANNOTATION)
                .cloned(),
            other_rule: owned_by_other_rule(meta),
            written_at: write::fields::meshwarden_write_time(meta),
            written_generation: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(GENERATION_ANNOTATION))
                .and_then(|v| v.parse().ok()),
            foreign_owners,
            foreign_writes: write::foreign_writes(meta, &paths),
            other_containers: container_amounts(containers),
            rollout,
            rolled_out_at: None,
            observed: observed_generation.unwrap_or(-1) >= meta.generation.unwrap_or(0),
            strategy,
            pod_labels: small_map(
                tpl_meta
                    .and_then(|m| m.labels.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.clone())),
            ),
            allow_disruption: annotations_of(Some(meta))
                .get(ROLLOUT_ANNOTATION)
                .is_some_and(|v| v == ALLOW_DISRUPTION),
            // Read by the resilience section.
            grace_seconds,
            drain,
        }
    }

    /// Reads the facts as a write of this process left the workload, before a watch has
    /// delivered it: the five annotations on its template and the written generation, whose
    /// rollout the workload's controller has not observed yet.
    pub(super) fn written(&self, generation: i64, d: &Desired) -> Self {
        let mut out = self.clone();
        out.generation = generation;
        out.written_generation = Some(generation);
        out.observed = false;
        for (k, v) in d.annotations() {
            out.template_annotations.insert(k, v.to_string());
        }
        out.template_annotations.insert(HASH_ANNOTATION, d.hash());
        out.rollout = Rollout::InProgress(format!(
            "the {} controller has not observed generation {generation} yet",
            self.kind.as_str()
        ));
        out
    }
}

impl From<&Deployment> for WorkloadFacts {
    fn from(d: &Deployment) -> Self {
        let spec = d.spec.as_ref();
        let replicas = spec.and_then(|s| s.replicas).unwrap_or(1);
        let template = spec.map(|s| &s.template);
        let mut facts = WorkloadFacts::read(
            Kind::Deployment,
            &d.metadata,
            template,
            replicas,
            deployment_rollout(d),
            d.status.as_ref().and_then(|s| s.observed_generation),
            deployment_strategy(spec.and_then(|s| s.strategy.as_ref()), replicas),
        );
        facts.rolled_out_at = d.status.as_ref().and_then(super::rollout::rolled_out_at);
        facts
    }
}

impl From<&StatefulSet> for WorkloadFacts {
    fn from(s: &StatefulSet) -> Self {
        let spec = s.spec.as_ref();
        let replicas = spec.and_then(|s| s.replicas).unwrap_or(1);
        let template = spec.map(|s| &s.template);
        WorkloadFacts::read(
            Kind::StatefulSet,
            &s.metadata,
            template,
            replicas,
            statefulset_rollout(s),
            s.status.as_ref().and_then(|s| s.observed_generation),
            statefulset_strategy(spec.and_then(|s| s.update_strategy.as_ref()), replicas),
        )
    }
}

impl From<&DaemonSet> for WorkloadFacts {
    fn from(d: &DaemonSet) -> Self {
        let replicas = d
            .status
            .as_ref()
            .map(|s| s.desired_number_scheduled)
            .unwrap_or(0);
        let template = d.spec.as_ref().map(|s| &s.template);
        WorkloadFacts::read(
            Kind::DaemonSet,
            &d.metadata,
            template,
            replicas,
            daemonset_rollout(d),
            d.status.as_ref().and_then(|s| s.observed_generation),
            daemonset_strategy(
                d.spec.as_ref().and_then(|s| s.update_strategy.as_ref()),
                replicas,
            ),
        )
    }
}

/// What the rule knows of a running pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodFacts {
    pub name: String,
    /// The workload that runs it (a ReplicaSet's pods: its Deployment).
    pub owner: Option<(Kind, String)>,
    /// Labels that decide injection (`sidecar.istio.io/inject`, `istio.io/rev`) and ambient
    /// mode (`istio.io/dataplane-mode`, read by the ambient section).
    pub labels: SmallMap<&'static str>,
    /// Annotations that decide injection (`sidecar.istio.io/inject`, `inject.istio.io/templates`).
    pub annotations: SmallMap<&'static str>,
    /// The `istio-proxy` container's requests/limits in milli-units, in the order of
    /// [`Desired::annotations`] (cpu, cpu limit, memory, memory limit); `None` without one.
    pub proxy: Option<[Option<i128>; 4]>,
    /// The injected proxy's revision and version (read by the upgrades section); `None`
    /// without one, or for an `istio-proxy` container the injector did not add (ztunnel's).
    pub sidecar: Option<crate::istio::ProxyVersion>,
    /// Where it runs and whether it serves (read by the HA sections).
    pub placement: Placement,
    /// Read by the resilience section: its proxy is a native sidecar, which drains from the
    /// pod's shutdown until its app containers stop.
    pub native_sidecar: bool,
}

/// Where a pod runs and whether it serves: what the HA sections judge availability, spread
/// and blocked drains by.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// `spec.nodeName`; `None` while the pod is not scheduled.
    pub node: Option<Box<str>>,
    /// The pod's `Ready` condition is True.
    pub ready: bool,
    /// The scheduler's message while `PodScheduled` is False (why no node fits).
    pub unscheduled: Option<Box<str>>,
    /// The pod is being deleted.
    pub terminating: bool,
}

impl From<&Pod> for Placement {
    fn from(p: &Pod) -> Self {
        let conditions = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_deref())
            .unwrap_or_default();
        let condition = |t: &str| conditions.iter().find(|c| c.type_ == t);
        Placement {
            node: p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .map(Box::from),
            ready: condition("Ready").is_some_and(|c| c.status == "True"),
            unscheduled: condition("PodScheduled")
                .filter(|c| c.status == "False")
                .map(|c| {
                    c.message
                        .as_deref()
                        .or(c.reason.as_deref())
                        .unwrap_or("not scheduled")
                        .into()
                }),
            terminating: p.metadata.deletion_timestamp.is_some(),
        }
    }
}

impl From<&Pod> for PodFacts {
    fn from(p: &Pod) -> Self {
        let labels = p.labels();
        let owner = p
            .owner_references()
            .iter()
            .find_map(|o| match o.kind.as_str() {
                "ReplicaSet" => {
                    let hash = labels.get("pod-template-hash")?;
                    let name = o.name.strip_suffix(&format!("-{hash}"))?;
                    Some((Kind::Deployment, name.to_string()))
                }
                "StatefulSet" => Some((Kind::StatefulSet, o.name.clone())),
                "DaemonSet" => Some((Kind::DaemonSet, o.name.clone())),
                _ => None,
            });
        let container = p.spec.as_ref().and_then(|spec| {
            spec.containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
                .find(|c| c.name == PROXY_CONTAINER)
        });
        // A sidecar is a proxy the injector put there, which says so in the pod's status
        // annotation (as the mTLS section reads it): the `istio-proxy` container of ztunnel's
        // DaemonSet is none, nor is a proxy written into a template by hand, which a restart
        // would only bring back as it is.
        let status = p.annotations().get(crate::istio::SIDECAR_STATUS);
        let sidecar = container
            .filter(|_| status.is_some())
            .map(|c| crate::istio::ProxyVersion {
                revision: status.and_then(|s| crate::istio::injected_revision(s)),
                version: c
                    .image
                    .as_deref()
                    .and_then(crate::istio::image_tag)
                    .unwrap_or(crate::istio::UNKNOWN)
                    .to_string(),
            });
        let proxy = container.map(|c| {
            let res = c.resources.clone().unwrap_or_default();
            let get = |m: &Option<
                BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
            >,
                       k: &str| {
                m.as_ref()
                    .and_then(|m| m.get(k))
                    .and_then(|q| quantity::millis(&q.0))
            };
            [
                get(&res.requests, "cpu"),
                get(&res.limits, "cpu"),
                get(&res.requests, "memory"),
                get(&res.limits, "memory"),
            ]
        });
        PodFacts {
            name: p.name_any(),
            owner,
            labels: only(
                Some(labels),
                &[INJECT, "istio.io/rev", crate::istio::DATAPLANE_MODE_LABEL],
            ),
            annotations: only(Some(p.annotations()), &[INJECT, INJECT_TEMPLATES]),
            proxy,
            sidecar,
            placement: Placement::from(p),
            native_sidecar: crate::istio::drain::native_sidecar(p.spec.as_ref()),
        }
    }
}

/// A cached workload.
pub type CachedWorkload<K> = Compact<K, WorkloadFacts>;

/// A cached running pod.
pub type CachedPod = Compact<Pod, PodFacts>;
