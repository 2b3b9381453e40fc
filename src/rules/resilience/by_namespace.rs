//! The DestinationRule index built a few namespaces at a time: judging the Services of one
//! namespace reads the rules of its namespace, of the client namespaces with a rule of their
//! own for the host, and of the root namespace (see [`super::resolve`]), never all of them.
//! The rules are sorted once; each namespace's part is built when first asked for, kept while
//! few are, and the root namespace's for the whole evaluation. An evaluation over 5,000
//! namespaces then holds a few namespaces' parts instead of 5,000 (`meshwarden-bench scale`
//! reached its peak memory with the whole index built).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use super::resolve::{Hosts, HostsBuilder, Index, Rule, Scoped, istiod_order, scoped};

/// Namespace parts kept at most before they are dropped all at once.
const KEPT: usize = 64;

/// DestinationRules sorted in istiod's order and grouped by namespace, from which
/// [`Index`]es of a few namespaces are made.
pub struct ByNamespace<'a> {
    sorted: Vec<&'a Arc<Rule>>,
    root: String,
    default_private: bool,
    /// The root namespace's part (`None`: it has no rule) and its private rules.
    root_part: Option<Arc<Scoped>>,
    root_local: Arc<Hosts>,
    /// Parts built (`None`: the namespace has no rule).
    kept: RefCell<HashMap<String, Option<Arc<Scoped>>>>,
}

impl<'a> ByNamespace<'a> {
    /// Sorts `rules`, with Istio's root namespace `root` (`default_private`: the mesh's
    /// `defaultDestinationRuleExportTo` is `["."]`).
    pub fn new(
        rules: impl IntoIterator<Item = &'a Arc<Rule>>,
        root: &str,
        default_private: bool,
    ) -> Self {
        let sorted = istiod_order(rules);
        let mut root_local = HostsBuilder::default();
        let group = group_of(&sorted, root);
        let root_part = (!group.is_empty())
            .then(|| Arc::new(scoped(group, root, default_private, &mut root_local)));
        ByNamespace {
            root_local: Arc::new(root_local.finish()),
            sorted,
            root: root.to_string(),
            default_private,
            root_part,
            kept: RefCell::default(),
        }
    }

    /// The part of namespace `ns`, built if it is not kept.
    fn part(&self, ns: &str) -> Option<Arc<Scoped>> {
        if ns == self.root {
            return self.root_part.clone();
        }
        let mut kept = self.kept.borrow_mut();
        if let Some(p) = kept.get(ns) {
            return p.clone();
        }
        if kept.len() >= KEPT {
            kept.clear();
        }
        let group = group_of(&self.sorted, ns);
        let part = (!group.is_empty()).then(|| {
            // Only the root namespace's part adds root-private rules, and it is built in `new`.
            let mut unused = HostsBuilder::default();
            Arc::new(scoped(group, &self.root, self.default_private, &mut unused))
        });
        kept.insert(ns.to_string(), part.clone());
        part
    }

    /// An index of the root namespace and `namespaces`: what judging traffic between them
    /// reads. A lookup in it from or to another namespace finds nothing of that namespace's.
    pub fn index(&self, namespaces: &[&str]) -> Index {
        let mut names: Vec<&str> = namespaces.to_vec();
        names.push(&self.root);
        names.sort_unstable();
        names.dedup();
        let parts = names
            .into_iter()
            .filter_map(|ns| Some((ns.to_string(), self.part(ns)?)))
            .collect();
        Index::of(&self.root, parts, self.root_local.clone())
    }
}

/// The rules of namespace `ns` in `sorted` (grouped by namespace).
fn group_of<'s, 'a>(sorted: &'s [&'a Arc<Rule>], ns: &str) -> &'s [&'a Arc<Rule>] {
    let from = sorted.partition_point(|r| r.namespace.as_str() < ns);
    let to = sorted.partition_point(|r| r.namespace.as_str() <= ns);
    &sorted[from..to]
}
