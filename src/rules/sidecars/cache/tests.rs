//! Tests of the section's caches: echoes of own writes, writes read as written, shared
//! namespace labels.

mod echoes {
    use super::super::*;
    use kube::runtime::reflector;

    fn empty<K: kube::Resource<DynamicType = ()> + Clone + 'static>() -> Store<K> {
        reflector::store().0
    }

    fn facts(generation: i64, written: Option<i64>, observed: bool) -> WorkloadFacts {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "apps", "generation": generation,
                "annotations": written.map(|g| json!({GENERATION_ANNOTATION: g.to_string()}))},
            "spec": {"selector": {}, "template": {}},
            "status": {"observedGeneration": if observed { generation } else { generation - 1 }},
        }))
        .unwrap();
        WorkloadFacts::from(&d)
    }

    #[test]
    fn only_the_exact_state_of_an_own_write_is_its_echo_and_only_once() {
        let cache = Cache::new(empty(), empty(), empty(), empty(), empty(), empty());
        let w = Workload {
            namespace: "apps".into(),
            facts: Arc::new(facts(4, None, true)),
            rollout: Rollout::Complete,
        };
        // Nothing written: no echo.
        assert!(!cache.echoes_own_write("apps", &facts(5, Some(5), false)));
        cache.expect_echo(&w, 5);
        // Another writer's generation, a state the controller observed, a missing mark, or
        // another namespace: not the echo.
        assert!(!cache.echoes_own_write("apps", &facts(6, Some(5), false)));
        assert!(!cache.echoes_own_write("apps", &facts(5, Some(5), true)));
        assert!(!cache.echoes_own_write("apps", &facts(5, None, false)));
        assert!(!cache.echoes_own_write("other", &facts(5, Some(5), false)));
        // The write's own state, once.
        assert!(cache.echoes_own_write("apps", &facts(5, Some(5), false)));
        assert!(!cache.echoes_own_write("apps", &facts(5, Some(5), false)));
    }
}

mod observe {
    use super::super::*;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    fn deployment(generation: i64) -> CachedWorkload<Deployment> {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "apps", "generation": generation},
            "spec": {"selector": {}, "template": {}},
            "status": {"observedGeneration": generation},
        }))
        .unwrap();
        CachedWorkload::new(d.metadata.clone(), WorkloadFacts::from(&d))
    }

    #[test]
    fn a_pending_write_is_read_as_the_same_facts_until_the_watch_delivers_it() {
        let (namespaces, mut ns_writer) = reflector::store::<PartialObjectMeta<Namespace>>();
        let ns: Namespace = serde_json::from_value(json!({"metadata": {
            "name": "apps", "labels": {"istio-injection": "enabled"}}}))
        .unwrap();
        ns_writer.apply_watcher_event(&Event::Apply(PartialObjectMeta {
            types: None,
            metadata: ns.metadata,
            _phantom: Default::default(),
        }));
        fn e<K: kube::Resource<DynamicType = ()> + Clone + 'static>() -> Store<K> {
            reflector::store().0
        }
        let cache = Cache::new(namespaces, e(), e(), e(), e(), e());
        cache
            .by_namespace
            .deployments
            .apply(&Event::Apply(deployment(4)));
        let spec: SidecarSpec =
            serde_yaml::from_str("{resources: {requests: {cpu: 100m, memory: 128Mi}}}").unwrap();
        let d = desired(&spec.resources).unwrap();
        let observe = || {
            let c = observe_cached(&cache, &spec, &d, &Revisions::any());
            c.namespaces[0].workloads[0][0].clone()
        };
        let w = Workload {
            namespace: "apps".into(),
            facts: observe(),
            rollout: Rollout::Complete,
        };
        cache.record_written(&w, Some(5));
        // Read as written, and the same facts each time while the watch has not delivered it.
        let (first, second) = (observe(), observe());
        assert_eq!((first.generation, first.written_generation), (5, Some(5)));
        assert!(deviations(&d, &first.template_annotations).is_empty());
        assert!(Arc::ptr_eq(&first, &second));
        // Delivered: the cached entry itself.
        let delivered = deployment(5);
        let cached = delivered.facts.clone();
        cache
            .by_namespace
            .deployments
            .apply(&Event::Apply(delivered));
        assert!(Arc::ptr_eq(&observe(), &cached));
    }

    #[test]
    fn namespace_labels_are_copied_once_per_store_entry() {
        let (namespaces, mut writer) = reflector::store::<PartialObjectMeta<Namespace>>();
        let apply = |writer: &mut reflector::store::Writer<_>, name: &str, injection: &str| {
            let ns: Namespace = serde_json::from_value(json!({"metadata": {
                "name": name, "labels": {"istio-injection": injection}}}))
            .unwrap();
            writer.apply_watcher_event(&Event::Apply(PartialObjectMeta {
                types: None,
                metadata: ns.metadata,
                _phantom: Default::default(),
            }));
        };
        apply(&mut writer, "a", "enabled");
        apply(&mut writer, "b", "enabled");
        fn e<K: kube::Resource<DynamicType = ()> + Clone + 'static>() -> Store<K> {
            reflector::store().0
        }
        let cache = Cache::new(namespaces, e(), e(), e(), e(), e());
        let spec: SidecarSpec =
            serde_yaml::from_str("{resources: {requests: {cpu: 100m, memory: 128Mi}}}").unwrap();
        let d = desired(&spec.resources).unwrap();
        let observe = || {
            observe_cached(&cache, &spec, &d, &Revisions::any())
                .namespaces
                .into_iter()
                .map(|n| (n.name, n.labels))
                .collect::<Vec<_>>()
        };
        let first = observe();
        assert_eq!(first.len(), 2);
        let second = observe();
        assert!(
            first
                .iter()
                .zip(&second)
                .all(|(x, y)| Arc::ptr_eq(&x.1, &y.1))
        );
        // A changed namespace is read anew, the other one stays shared.
        apply(&mut writer, "b", "disabled");
        let third = observe();
        assert_eq!(third.len(), 1, "b no longer injects: {third:?}");
        assert!(Arc::ptr_eq(&third[0].1, &first[0].1));
        apply(&mut writer, "b", "enabled");
        let fourth = observe();
        assert_eq!(
            fourth[1].1.get("istio-injection").map(String::as_str),
            Some("enabled")
        );
        assert!(!Arc::ptr_eq(&fourth[1].1, &first[1].1));
        // A deleted namespace is forgotten.
        let gone: Namespace = serde_json::from_value(json!({"metadata": {"name": "a"}})).unwrap();
        writer.apply_watcher_event(&Event::Delete(PartialObjectMeta {
            types: None,
            metadata: gone.metadata,
            _phantom: Default::default(),
        }));
        assert_eq!(observe().len(), 1);
        assert_eq!(cache.ns_labels.lock().unwrap().len(), 1);
    }
}

mod failed {
    use super::super::*;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    fn e<K: kube::Resource<DynamicType = ()> + Clone + 'static>() -> Store<K> {
        reflector::store().0
    }

    fn deployment(name: &str) -> CachedWorkload<Deployment> {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "apps", "generation": 1},
            "spec": {"selector": {}, "template": {}},
            "status": {"observedGeneration": 1},
        }))
        .unwrap();
        CachedWorkload::new(d.metadata.clone(), WorkloadFacts::from(&d))
    }

    fn workload(d: &CachedWorkload<Deployment>) -> Workload {
        Workload {
            namespace: "apps".into(),
            facts: d.facts.clone(),
            rollout: Rollout::Complete,
        }
    }

    /// A failed write is remembered while its workload exists and for [`WRITTEN_TTL`] at
    /// most: a deleted workload (a Delete, or missing from a relist) leaves the map, and so
    /// does an entry older than that.
    #[test]
    fn failed_writes_leave_on_delete_relist_and_expiry() {
        let cache = Cache::new(e(), e(), e(), e(), e(), e());
        let idx = &cache.by_namespace.deployments;
        let (a, b, c) = (deployment("a"), deployment("b"), deployment("c"));
        idx.apply(&Event::<CachedWorkload<Deployment>>::Init);
        for d in [&a, &b, &c] {
            idx.apply(&Event::InitApply(d.clone()));
        }
        idx.apply(&Event::<CachedWorkload<Deployment>>::InitDone);
        for d in [&a, &b, &c] {
            cache.record_write_result(&workload(d), Some("refused".into()));
        }
        assert!(cache.any_failed());
        assert!(cache.failed_recently(&workload(&a)));

        // Deleted: forgotten.
        idx.apply(&Event::Delete(a.clone()));
        cache.any_failed();
        assert!(!cache.failed_recently(&workload(&a)));
        assert_eq!(
            cache.failed.lock().unwrap().len(),
            2,
            "a left on its Delete"
        );

        // Missing from a relist (deleted while the watch was down): forgotten.
        idx.apply(&Event::<CachedWorkload<Deployment>>::Init);
        idx.apply(&Event::InitApply(c.clone()));
        idx.apply(&Event::<CachedWorkload<Deployment>>::InitDone);
        cache.any_failed();
        assert_eq!(
            cache.failed.lock().unwrap().len(),
            1,
            "b left on the relist"
        );

        // Older than WRITTEN_TTL: forgotten although c still exists.
        if let Some(long_ago) = Instant::now().checked_sub(WRITTEN_TTL + Duration::from_secs(1)) {
            for (at, _) in cache.failed.lock().unwrap().values_mut() {
                *at = long_ago;
            }
            assert!(!cache.any_failed());
            assert!(cache.failed.lock().unwrap().is_empty(), "c expired");
        }
    }
}
