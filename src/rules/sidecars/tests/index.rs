//! The by-namespace index follows the watch events as the store does.

use super::*;
use kube::runtime::watcher::Event;

fn pod(ns: &str, name: &str) -> CachedPod {
    let p: Pod = serde_yaml::from_str(&format!(
        "metadata: {{name: {name}, namespace: {ns}}}\nspec: {{containers: [{{name: app}}]}}"
    ))
    .unwrap();
    CachedPod::new(p.metadata.clone(), PodFacts::from(&p))
}

fn names(index: &ByNamespace<PodFacts>, namespaces: &[&str]) -> Vec<String> {
    let view = index.read();
    let mut out = Vec::new();
    for ns in namespaces {
        for f in view.get(ns).into_iter().flat_map(|m| m.values()) {
            out.push(format!("{ns}/{}", f.name));
        }
    }
    out
}

#[test]
fn index_follows_applies_deletes_and_relists() {
    let index = ByNamespace::<PodFacts>::default();
    assert!(!index.is_synced());
    index.apply(&Event::<CachedPod>::Init);
    index.apply(&Event::InitApply(pod("a", "web-2")));
    assert!(!index.is_synced(), "not before the first list is whole");
    index.apply(&Event::<CachedPod>::InitDone);
    assert!(index.is_synced());
    for (ns, name) in [("a", "web-1"), ("b", "db-1")] {
        index.apply(&Event::Apply(pod(ns, name)));
    }
    assert_eq!(
        names(&index, &["a", "b", "c"]),
        ["a/web-1", "a/web-2", "b/db-1"]
    );
    // An update replaces the entry; a delete drops it (and an emptied namespace).
    index.apply(&Event::Apply(pod("a", "web-1")));
    index.apply(&Event::Delete(pod("b", "db-1")));
    assert_eq!(names(&index, &["a", "b"]), ["a/web-1", "a/web-2"]);
    assert_eq!(index.len(), 2);

    // A relist after the watch was down: the old entries are served until it is done, then
    // only what it listed remains (web-2 was deleted meanwhile).
    index.apply(&Event::<CachedPod>::Init);
    index.apply(&Event::InitApply(pod("a", "web-1")));
    index.apply(&Event::InitApply(pod("c", "cache-1")));
    assert_eq!(names(&index, &["a", "c"]), ["a/web-1", "a/web-2"]);
    index.apply(&Event::<CachedPod>::InitDone);
    assert_eq!(names(&index, &["a", "b", "c"]), ["a/web-1", "c/cache-1"]);

    let all: Vec<(String, String)> = {
        let view = index.read();
        let mut v: Vec<_> = view
            .iter()
            .map(|(ns, f)| (ns.to_string(), f.name.clone()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        all,
        [("a".into(), "web-1".into()), ("c".into(), "cache-1".into())]
    );

    // A shared clone sees the same entries.
    let other = index.clone();
    other.apply(&Event::Delete(pod("c", "cache-1")));
    assert_eq!(names(&index, &["a", "c"]), ["a/web-1"]);
}
