//! The section's caches filled from one LIST of each kind, as a watch's initial list leaves
//! them (`meshwarden plan`): a one-shot evaluation then reads what the operator's reconciles
//! read, through the same code (the upgrades section's restarts, for one, are planned only
//! from these caches).

use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::Event;

use super::*;
use crate::watch::Watched;

/// Lists per page at most.
const PAGE: u32 = 500;

impl Cache {
    /// The caches as the controller's watches fill them, from one paged LIST of each kind
    /// (running and pending pods by their phase, as the watches select them).
    pub async fn snapshot(client: &kube::Client) -> Result<Cache> {
        let indexes = Indexes::default();
        let namespaces = listed(
            client,
            ListParams::default(),
            strip_namespace,
            |_: &Event<PartialObjectMeta<Namespace>>| {},
        )
        .await?;
        let index = &indexes.deployments;
        let deployments = listed(client, ListParams::default(), |_| {}, |e| index.apply(e)).await?;
        let index = &indexes.statefulsets;
        let statefulsets =
            listed(client, ListParams::default(), |_| {}, |e| index.apply(e)).await?;
        let index = &indexes.daemonsets;
        let daemonsets = listed(client, ListParams::default(), |_| {}, |e| index.apply(e)).await?;
        let all = ListParams::default;
        let limit_ranges = listed::<LimitRange>(client, all(), |_| {}, |_| {}).await?;
        let quotas = listed::<ResourceQuota>(client, all(), |_| {}, |_| {}).await?;
        for (phase, index) in [
            ("status.phase=Running", &indexes.pods),
            ("status.phase=Pending", &indexes.pending),
        ] {
            let lp = ListParams::default().fields(phase);
            listed::<CachedPod>(client, lp, |_| {}, |e| index.apply(e)).await?;
        }
        Ok(Cache::new(
            namespaces,
            deployments,
            statefulsets,
            daemonsets,
            limit_ranges,
            quotas,
        )
        .indexed(indexes))
    }
}

/// A store holding every `K` that `lp` selects, each passed through `strip`, every event also
/// handed to `index`: `Init`, one `InitApply` per object, `InitDone`, as a watch's list.
async fn listed<K: Watched>(
    client: &kube::Client,
    lp: ListParams,
    strip: fn(&mut K),
    index: impl Fn(&Event<K>),
) -> Result<Store<K>> {
    let (store, mut writer) = reflector::store::<K>();
    let mut apply = |e: Event<K>| {
        writer.apply_watcher_event(&e);
        index(&e);
    };
    apply(Event::Init);
    let api: Api<K> = Api::all(client.clone());
    let mut lp = lp.limit(PAGE);
    loop {
        let page = api
            .list(&lp)
            .await
            .map_err(|e| Error::kube(format!("list {}", K::plural(&())), e))?;
        for mut o in page.items {
            strip(&mut o);
            apply(Event::InitApply(o));
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => lp = lp.continue_token(&token),
            None => break,
        }
    }
    apply(Event::InitDone);
    Ok(store)
}
