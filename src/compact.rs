//! Watch-cache entries reduced to what a rule reads.
//!
//! A typed Kubernetes object is large even when most of its fields are empty (a k8s-openapi
//! `Pod` is about 2 KiB before any string, each `Container` another 2 KiB). The sidecars rule
//! watches every workload and running pod of the covered namespaces, so its caches hold
//! [`Compact`] entries instead: the object is parsed, reduced at once to a small `F` (the
//! rule's facts about it), and dropped. Only the name, namespace and resourceVersion of the
//! metadata are kept, which is what kube-runtime's watcher and store need.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// `K` as a watch cache keeps it: identity plus `F`, derived from the whole object when it
/// is parsed.
pub struct Compact<K, F> {
    pub metadata: ObjectMeta,
    /// Shared, so that a reader takes the facts without copying them.
    pub facts: Arc<F>,
    kind: PhantomData<fn() -> K>,
}

impl<K, F> Compact<K, F> {
    pub fn new(metadata: ObjectMeta, facts: F) -> Self {
        Compact {
            metadata: ObjectMeta {
                name: metadata.name,
                namespace: metadata.namespace,
                resource_version: metadata.resource_version,
                ..Default::default()
            },
            facts: Arc::new(facts),
            kind: PhantomData,
        }
    }
}

impl<K, F> Clone for Compact<K, F> {
    fn clone(&self) -> Self {
        Compact {
            metadata: self.metadata.clone(),
            facts: self.facts.clone(),
            kind: PhantomData,
        }
    }
}

impl<K, F: Debug> Debug for Compact<K, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compact")
            .field("metadata", &self.metadata)
            .field("facts", &self.facts)
            .finish()
    }
}

impl<'de, K, F> Deserialize<'de> for Compact<K, F>
where
    K: Resource + DeserializeOwned,
    F: for<'a> From<&'a K>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut object = K::deserialize(d)?;
        let facts = F::from(&object);
        // Taken, not cloned: the rest of the object is dropped here.
        Ok(Compact::new(std::mem::take(object.meta_mut()), facts))
    }
}

/// A few labels or annotations kept from an object, sorted in one allocation sized to them.
/// A `BTreeMap` allocates a node for eleven entries however few it holds (544 bytes for
/// `String` keys and values); cached facts hold a few maps each, for every workload and pod.
pub type SmallMap<K> = litemap::LiteMap<K, String>;

/// A [`SmallMap`] of `entries` (no key twice).
pub fn small_map<K: Ord>(entries: impl IntoIterator<Item = (K, String)>) -> SmallMap<K> {
    let mut v: Vec<(K, String)> = entries.into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.dedup_by(|a, b| a.0 == b.0);
    v.shrink_to_fit();
    litemap::LiteMap::from_sorted_store_unchecked(v)
}

/// Labels or annotations read by key: an object's own map or a [`SmallMap`] kept from it.
pub trait KeyValues {
    fn value(&self, key: &str) -> Option<&str>;
    fn has_none(&self) -> bool;
}

impl KeyValues for BTreeMap<String, String> {
    fn value(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
    fn has_none(&self) -> bool {
        self.is_empty()
    }
}

impl<K: Borrow<str> + Ord> KeyValues for SmallMap<K> {
    fn value(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
    fn has_none(&self) -> bool {
        self.is_empty()
    }
}

impl<K, F> Resource for Compact<K, F>
where
    K: Resource<DynamicType = ()>,
{
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        K::kind(&())
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        K::group(&())
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        K::version(&())
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        K::plural(&())
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    #[derive(Clone, Debug, PartialEq)]
    struct Keys(Vec<String>);

    impl From<&ConfigMap> for Keys {
        fn from(c: &ConfigMap) -> Self {
            Keys(c.data.iter().flatten().map(|(k, _)| k.clone()).collect())
        }
    }

    #[test]
    fn parses_the_whole_object_and_keeps_identity_and_facts() {
        let c: Compact<ConfigMap, Keys> = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "a", "namespace": "n", "resourceVersion": "7",
                         "labels": {"x": "y"}, "uid": "u"},
            "data": {"one": "1", "two": "2"}
        }))
        .unwrap();
        assert_eq!(*c.facts, Keys(vec!["one".into(), "two".into()]));
        assert_eq!(c.metadata.name.as_deref(), Some("a"));
        assert_eq!(c.metadata.namespace.as_deref(), Some("n"));
        assert_eq!(c.metadata.resource_version.as_deref(), Some("7"));
        assert!(c.metadata.labels.is_none() && c.metadata.uid.is_none());
        assert_eq!(Compact::<ConfigMap, Keys>::kind(&()), "ConfigMap");
        assert_eq!(Compact::<ConfigMap, Keys>::plural(&()), "configmaps");
    }

    #[test]
    fn a_small_map_is_sorted_sized_to_its_entries_and_read_like_the_map_it_came_from() {
        let from = BTreeMap::from([
            ("b".to_string(), "2".to_string()),
            ("a".to_string(), "1".to_string()),
            ("c".to_string(), "3".to_string()),
        ]);
        let small = small_map(
            ["c", "a", "z"]
                .into_iter()
                .filter_map(|k| from.get(k).map(|v| (k, v.clone()))),
        );
        assert_eq!(
            small
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect::<Vec<_>>(),
            vec![("a", "1"), ("c", "3")]
        );
        assert_eq!(small.as_slice().len(), 2);
        assert_eq!(small.value("c"), Some("3"));
        assert_eq!(small.value("b"), None);
        assert_eq!(from.value("b"), Some("2"));
        assert!(!small.has_none() && small_map::<&str>([]).has_none());
        let twice = small_map([("k", "1".to_string()), ("k", "2".to_string())]);
        assert_eq!(twice.len(), 1);
    }
}
