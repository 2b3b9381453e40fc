//! The evaluation that keeps namespace parts between reconciles, reading the index's shared
//! slices as `observe_cached` does, decides exactly what a fresh evaluation decides, over
//! random sequences of watch events; and it decides anew only the namespaces an event touched.

use super::*;
use crate::compact::Compact;
use kube::runtime::watcher::Event;
use proptest::prelude::*;

const NAMESPACES: [&str; 3] = ["a", "b", "c"];

/// `(kind, namespace, object, variant)`: kind 0-3 applies a Deployment (variant: declared
/// values or not, rolled out or rolling), 4 deletes one, 5-6 apply a running pod (variant: its
/// proxy CPU), 7 deletes one, 8 relists the Deployments the index holds.
type Step = (u8, usize, u8, u8);

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    (0u8..9, 0..NAMESPACES.len(), 0u8..3, 0u8..4)
}

fn deployment(d: &Desired, ns: &str, n: u8, variant: u8) -> CachedWorkload<Deployment> {
    let annotations = match variant % 2 {
        0 => "{}".to_string(),
        _ => format!(
            "{{{}}}",
            compliant_annotations(d)
                .iter()
                .map(|(k, v)| format!("{k}: '{v}'"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let updated = if variant < 2 { 2 } else { 1 };
    let dep: Deployment = serde_yaml::from_str(&format!(
        "metadata: {{name: w{n}, namespace: {ns}, generation: 3}}
spec: {{replicas: 2, selector: {{}}, template: {{metadata: {{annotations: {annotations}}}}}}}
status: {{observedGeneration: 3, replicas: 2, updatedReplicas: {updated}, availableReplicas: 2}}"
    ))
    .unwrap();
    Compact::new(dep.metadata.clone(), WorkloadFacts::from(&dep))
}

fn pod(ns: &str, n: u8, variant: u8) -> CachedPod {
    let cpu = ["100m", "50m", "200m", "100m"][usize::from(variant)];
    let p: Pod = serde_yaml::from_str(&format!(
        "metadata: {{name: w{n}-p, namespace: {ns}, labels: {{pod-template-hash: abc}}, ownerReferences: [{{apiVersion: apps/v1, kind: ReplicaSet, name: w{n}-abc, uid: u}}]}}
spec: {{containers: [{{name: app}}, {{name: istio-proxy, resources: {{requests: {{cpu: {cpu}, memory: 128Mi}}}}}}]}}"
    ))
    .unwrap();
    Compact::new(p.metadata.clone(), PodFacts::from(&p))
}

/// The covered namespaces as `observe_cached` reads them from the index: one shared slice
/// per namespace and kind.
fn observe(
    deployments: &ByNamespace<WorkloadFacts>,
    pods: &ByNamespace<PodFacts>,
    labels: &Arc<BTreeMap<String, String>>,
) -> Vec<NamespaceObservation> {
    let (mut dv, mut pv) = (deployments.read(), pods.read());
    NAMESPACES
        .iter()
        .map(|ns| NamespaceObservation {
            name: ns.to_string(),
            labels: labels.clone(),
            workloads: dv.shared(ns).into_iter().collect(),
            pods: pv.shared(ns).unwrap_or_default(),
            ..Default::default()
        })
        .collect()
}

/// The addresses of `entries`, in order.
fn addresses<'a, T: 'a>(entries: impl Iterator<Item = &'a Arc<T>>) -> Vec<*const T> {
    entries.map(Arc::as_ptr).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn kept_parts_over_shared_slices_decide_as_a_fresh_evaluation(
        steps in proptest::collection::vec(step(), 1..40),
        paced in proptest::bool::ANY,
    ) {
        let d = full();
        let spec: SidecarSpec = serde_yaml::from_str(&format!(
            "{{pacing: {}, maxConcurrentRollouts: 1, resources: {{requests: {{cpu: 100m}}}}}}",
            if paced { "Paced" } else { "'Off'" }
        ))
        .unwrap();
        let labels: Arc<BTreeMap<String, String>> =
            Arc::new(map(&[("istio-injection", "enabled")]));
        let (deployments, pods) = (ByNamespace::<WorkloadFacts>::default(), ByNamespace::<PodFacts>::default());
        deployments.apply(&Event::<CachedWorkload<Deployment>>::InitDone);
        pods.apply(&Event::<CachedPod>::InitDone);
        let mut held: BTreeMap<(usize, u8), CachedWorkload<Deployment>> = BTreeMap::new();
        let (r, now) = (Revisions::any(), jiff::Timestamp::now());
        let mut memo = Memo::default();
        evaluate_with(&mut memo, &observe(&deployments, &pods, &labels), &d, &spec, true, &r, now, None, None);
        for (kind, ns_i, n, variant) in steps {
            let ns = NAMESPACES[ns_i];
            let relist = kind == 8;
            match kind {
                0..=3 => {
                    let w = deployment(&d, ns, n, variant);
                    held.insert((ns_i, n), w.clone());
                    deployments.apply(&Event::Apply(w));
                }
                4 => {
                    if let Some(w) = held.remove(&(ns_i, n)) {
                        deployments.apply(&Event::Delete(w));
                    }
                }
                5 | 6 => pods.apply(&Event::Apply(pod(ns, n, variant))),
                7 => pods.apply(&Event::Delete(pod(ns, n, variant))),
                _ => {
                    deployments.apply(&Event::<CachedWorkload<Deployment>>::Init);
                    for w in held.values() {
                        deployments.apply(&Event::InitApply(w.clone()));
                    }
                    deployments.apply(&Event::<CachedWorkload<Deployment>>::InitDone);
                }
            }
            let obs = observe(&deployments, &pods, &labels);
            // The shared slices hold what the index holds now.
            for o in &obs {
                prop_assert_eq!(addresses(o.all_workloads()), addresses(deployments.read().get(&o.name).into_iter().flat_map(|m| m.values())));
                prop_assert_eq!(addresses(o.pods.iter()), addresses(pods.read().get(&o.name).into_iter().flat_map(|m| m.values())));
            }
            let kept = evaluate_with(&mut memo, &obs, &d, &spec, true, &r, now, None, None);
            let fresh = evaluate(&obs, &d, &spec, true, &r, now, None, None);
            prop_assert_eq!(format!("{kept:?}"), format!("{fresh:?}"));
            if !relist {
                prop_assert!(memo.last_decided <= 1, "decided {} namespaces after one event", memo.last_decided);
            }
            // Read again without an event: the same slices, nothing decided.
            let again = observe(&deployments, &pods, &labels);
            evaluate_with(&mut memo, &again, &d, &spec, true, &r, now, None, None);
            prop_assert_eq!(memo.last_decided, 0);
        }
    }
}
