//! The running pods counted per namespace and kept between evaluations agree with counting
//! every pod anew, over random sequences of watch events.

use super::*;
use crate::compact::Compact;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::Event;
use proptest::prelude::*;

use crate::rules::sidecars::ByNamespace;

const NAMESPACES: [&str; 4] = ["a", "b", "c", "d"];
const VERSIONS: [&str; 4] = ["1.31.0", "1.29.2", "1.33.1", "latest"];
const REVISIONS: [Option<&str>; 4] = [None, Some("canary"), Some("prod"), Some("gone")];

/// A watch event of the running-pod watch: `(kind, namespace, pod, owner, revision, version)`
/// with kind 0-5 an Apply, 6-7 a Delete, 8 a relist of what the index holds.
type Step = (u8, usize, u8, u8, usize, Option<usize>);

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    (
        0u8..9,
        0..NAMESPACES.len(),
        0u8..6,
        0u8..3,
        0..REVISIONS.len(),
        proptest::option::of(0..VERSIONS.len()),
    )
}

fn cached(ns: &str, name: String, facts: PodFacts) -> Compact<Pod, PodFacts> {
    let meta = ObjectMeta {
        namespace: Some(ns.into()),
        name: Some(name),
        ..Default::default()
    };
    Compact::new(meta, facts)
}

/// Every pod the index holds, as the section lists them without the index.
fn every_pod(index: &ByNamespace<PodFacts>) -> Vec<(String, Arc<PodFacts>)> {
    index
        .read()
        .iter()
        .map(|(ns, p)| (ns.to_string(), p.clone()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    #[test]
    fn kept_counts_equal_counting_every_pod_anew(
        steps in proptest::collection::vec(step(), 1..60),
        skew in 0i32..3,
        selected_mask in 1u8..16,
    ) {
        let r = revisions();
        let index = ByNamespace::<PodFacts>::default();
        index.apply(&Event::<Compact<Pod, PodFacts>>::InitDone);
        let namespaces: Vec<(String, Arc<BTreeMap<String, String>>)> = NAMESPACES
            .iter()
            .enumerate()
            .filter(|(i, _)| selected_mask & (1 << i) != 0)
            .map(|(_, n)| (n.to_string(), map(&[("istio-injection", "enabled")])))
            .collect();
        let selected: BTreeSet<&str> = namespaces.iter().map(|(n, _)| n.as_str()).collect();
        let mut memo = PodMemo::default();
        for (kind, ns, name, owner, rev, version) in steps {
            let ns = NAMESPACES[ns];
            let name = format!("p{name}");
            let owner = format!("w{owner}");
            let facts = pod(&name, Some(&owner), REVISIONS[rev], version.map(|v| VERSIONS[v]));
            match kind {
                0..=5 => index.apply(&Event::Apply(cached(ns, name, facts))),
                6 | 7 => index.apply(&Event::Delete(cached(ns, name, facts))),
                // A relist delivers every pod anew (new shared facts).
                _ => {
                    let held = every_pod(&index);
                    index.apply(&Event::<Compact<Pod, PodFacts>>::Init);
                    for (ns, p) in held {
                        index.apply(&Event::InitApply(cached(&ns, p.name.clone(), (*p).clone())));
                    }
                    index.apply(&Event::<Compact<Pod, PodFacts>>::InitDone);
                }
            }
            let kept = memo.parts(skew, &r, &selected, &index.read());
            let incremental = plan_parts(skew, &r, &namespaces, kept.iter().map(Arc::as_ref));
            let pods = every_pod(&index);
            let refs: Vec<(&str, &PodFacts)> = pods
                .iter()
                .filter(|(ns, _)| selected.contains(ns.as_str()))
                .map(|(ns, p)| (ns.as_str(), p.as_ref()))
                .collect();
            let full = plan(skew, &r, &namespaces, &refs);
            prop_assert_eq!(&incremental, &full);
            // An event changes one namespace: only it is counted anew.
            if kind < 8 {
                prop_assert!(memo.last_counted <= 1, "{} namespaces counted", memo.last_counted);
            }
        }
    }
}
