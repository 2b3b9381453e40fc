//! What the HA sections read: the Deployments of a group with their HPAs and PDBs, the
//! budgets meshwarden left behind, and the groups a policy declares.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

use super::nodes::{NodeFacts, Nodes};
use super::*;
use crate::rules::sidecars::PodFacts;

/// Reads the targets of a group: Deployments by label, the HPA targeting each, and the
/// PodDisruptionBudgets selecting each one's pods. PodDisruptionBudgets the ClusterRole does
/// not let meshwarden read (403) are returned as that error, so the other rules still hold.
/// Under the controller, HPAs and PDBs come from its stores and the Deployments are found in
/// the sidecars section's Deployment store (names and labels) and read by name: no LIST.
pub async fn observe(ctx: &Context, group: &Group) -> Result<(Vec<Observation>, Option<Error>)> {
    match (ctx.cache::<Stores>(), ctx.cache::<sidecars::Cache>()) {
        (Some(stores), Some(workloads)) => observe_cached(ctx, &stores, &workloads, group).await,
        _ => observe_listed(ctx, group).await,
    }
}

/// The Deployments of `group` by name, from the sidecars section's Deployment store.
fn deployment_names(
    ctx: &Context,
    workloads: &sidecars::Cache,
    group: &Group,
) -> Result<Vec<String>> {
    ctx.metrics
        .watches
        .readable(&[stores::DEPLOYMENTS])
        .map_err(Error::Cache)?;
    // The namespace's Deployments only, from the index the Deployment watch feeds.
    let mut names: Vec<String> = workloads
        .by_namespace
        .deployments
        .read()
        .get(&group.namespace)
        .into_iter()
        .flat_map(|m| m.values())
        .filter(|d| {
            let labels: std::collections::BTreeMap<String, String> = d
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            selector::matches(&group.selector, &labels)
        })
        .map(|d| d.name.clone())
        .collect();
    names.sort();
    Ok(names)
}

/// The PodDisruptionBudgets of `namespace` from the store, or the error that keeps them out
/// (403: the others rules still hold).
async fn store_pdbs(
    stores: &Stores,
    namespace: &str,
) -> Result<(Vec<PodDisruptionBudget>, Option<Error>)> {
    match stores.readable(&[stores::PDBS]).await {
        Ok(()) => Ok((
            stores
                .pdbs
                .state()
                .iter()
                .filter(|b| b.metadata.namespace.as_deref() == Some(namespace))
                .map(|b| (**b).clone())
                .collect(),
            None,
        )),
        Err(e) if e.cause == Some(crate::watch::Cause::Forbidden) => {
            Ok((Vec::new(), Some(Error::Cache(e))))
        }
        Err(e) => Err(Error::Cache(e)),
    }
}

async fn observe_cached(
    ctx: &Context,
    stores: &Stores,
    workloads: &sidecars::Cache,
    group: &Group,
) -> Result<(Vec<Observation>, Option<Error>)> {
    let ns = &group.namespace;
    // Waits while a watch lists for the first time (a reconcile right after start-up).
    stores
        .readable(&[stores::HPAS, stores::DEPLOYMENTS])
        .await
        .map_err(Error::Cache)?;
    workloads.ready(std::time::Duration::from_secs(10)).await;
    let hpas: Vec<HorizontalPodAutoscaler> = stores
        .hpas
        .state()
        .iter()
        .filter(|h| h.metadata.namespace.as_deref() == Some(ns.as_str()))
        .map(|h| (**h).clone())
        .collect();
    let (pdbs, pdbs_refused) = store_pdbs(stores, ns).await?;
    // The namespace's running and pending pods, from the indexes their watches feed.
    let mut pods: Vec<Arc<PodFacts>> = Vec::new();
    for index in [
        &workloads.by_namespace.pods,
        &workloads.by_namespace.pending,
    ] {
        if let Some(m) = index.read().get(ns) {
            pods.extend(m.values().cloned());
        }
    }
    let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let mut deps = Vec::new();
    for name in deployment_names(ctx, workloads, group)? {
        // Read whole and current (the store keeps facts only); gone since: skipped.
        if let Some(d) = api
            .get_opt(&name)
            .await
            .map_err(|e| Error::kube(format!("read Deployment {ns}/{name}"), e))?
        {
            deps.push(d);
        }
    }
    Ok((matched(deps, &hpas, &pdbs, &pods), pdbs_refused))
}

/// Lists the group's objects (no controller, hence no stores).
async fn observe_listed(ctx: &Context, group: &Group) -> Result<(Vec<Observation>, Option<Error>)> {
    let ns = &group.namespace;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    // Served from the API server's watch cache (resourceVersion 0): it already holds the change
    // that triggered this reconcile, and a consistent read would first wait for the cache to
    // catch up with etcd, which costs tens of milliseconds per list.
    let lp = ListParams::default()
        .match_any()
        .labels(&selector::to_query(&group.selector));
    let (deps, hpas, pdbs, pods) = tokio::try_join!(
        async {
            deployments
                .list(&lp)
                .await
                .map_err(|e| Error::kube(format!("list Deployments in {ns}"), e))
        },
        async {
            hpas.list(&ListParams::default().match_any())
                .await
                .map_err(|e| Error::kube(format!("list HorizontalPodAutoscalers in {ns}"), e))
        },
        async {
            match pdbs.list(&ListParams::default().match_any()).await {
                Ok(list) => Ok((list.items, None)),
                Err(e) => {
                    let e = Error::kube(format!("list PodDisruptionBudgets in {ns}"), e);
                    match e.status_code() {
                        Some(403) => Ok((Vec::new(), Some(e))),
                        _ => Err(e),
                    }
                }
            }
        },
        async {
            let lp = ListParams::default()
                .match_any()
                .fields("status.phase!=Succeeded,status.phase!=Failed");
            pods.list(&lp)
                .await
                .map_err(|e| Error::kube(format!("list Pods in {ns}"), e))
        },
    )?;
    let (pdbs, pdbs_refused) = pdbs;
    let pods: Vec<Arc<PodFacts>> = pods
        .items
        .iter()
        .map(|p| Arc::new(PodFacts::from(p)))
        .collect();
    Ok((matched(deps.items, &hpas.items, &pdbs, &pods), pdbs_refused))
}

/// Each Deployment with the HPAs targeting it, the budgets selecting its pods and its pods
/// (those of its ReplicaSets, among `pods` of the namespace).
fn matched(
    deps: Vec<Deployment>,
    hpas: &[HorizontalPodAutoscaler],
    pdbs: &[PodDisruptionBudget],
    pods: &[Arc<PodFacts>],
) -> Vec<Observation> {
    let mut out = Vec::new();
    for d in deps {
        let name = d.name_any();
        let mut targeting = hpas.iter().filter(|h| {
            h.spec.as_ref().is_some_and(|s| {
                s.scale_target_ref.kind == "Deployment" && s.scale_target_ref.name == name
            })
        });
        let hpa = targeting.next().cloned();
        let other_hpas = targeting.map(|h| h.name_any()).collect();
        let labels = d
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        let matching = pdbs
            .iter()
            .filter(|b| {
                b.spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .is_some_and(|sel| {
                        // An empty selector in policy/v1 selects every pod of the namespace.
                        selector::matches(sel, &labels)
                    })
            })
            .cloned()
            .collect();
        let own = pods
            .iter()
            .filter(|p| {
                p.owner
                    .as_ref()
                    .is_some_and(|(kind, n)| *kind == sidecars::Kind::Deployment && *n == name)
            })
            .cloned()
            .collect();
        out.push(Observation {
            deployment: d,
            hpa,
            other_hpas,
            pdbs: matching,
            pods: own,
        });
    }
    out
}

/// PodDisruptionBudgets meshwarden created for this policy in the group's namespace
/// (`<deployment>-meshwarden`) whose Deployment no longer exists.
pub(super) async fn left_behind(
    ctx: &Context,
    group: &Group,
    policy: &MeshPolicy,
) -> Result<Vec<String>> {
    let ns = &group.namespace;
    if let (Some(stores), Some(workloads)) = (ctx.cache::<Stores>(), ctx.cache::<sidecars::Cache>())
    {
        stores
            .readable(&[stores::PDBS, stores::DEPLOYMENTS])
            .await
            .map_err(Error::Cache)?;
        workloads.ready(std::time::Duration::from_secs(10)).await;
        let policy_name = policy.name_any();
        let ours = |b: &PodDisruptionBudget| write::created_for(&b.metadata, &policy_name);
        let exists = |name: &str| {
            workloads.deployments.state().iter().any(|d| {
                d.metadata.namespace.as_deref() == Some(ns.as_str()) && d.facts.name == name
            })
        };
        let mut out: Vec<String> = stores
            .pdbs
            .state()
            .iter()
            .filter(|b| b.metadata.namespace.as_deref() == Some(ns.as_str()) && ours(b))
            .map(|b| b.name_any())
            .filter(|name| {
                name.strip_suffix("-meshwarden")
                    .is_some_and(|deployment| !exists(deployment))
            })
            .collect();
        out.sort();
        return Ok(out);
    }
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let lp = ListParams::default()
        .match_any()
        .labels(&write::label_selector(&policy.name_any()));
    let ours = pdbs
        .list_metadata(&lp)
        .await
        .map_err(|e| Error::kube(format!("list PodDisruptionBudgets in {ns}"), e))?;
    let mut out = Vec::new();
    for b in ours.items {
        let name = b.name_any();
        let Some(deployment) = name.strip_suffix("-meshwarden") else {
            continue;
        };
        let exists = deployments
            .get_metadata_opt(deployment)
            .await
            .map_err(|e| Error::kube(format!("read Deployment {ns}/{deployment}"), e))?
            .is_some();
        if !exists {
            out.push(name);
        }
    }
    Ok(out)
}

/// The nodes, or why they cannot be read (the outcomes that need them are then not judged).
pub async fn nodes(ctx: &Context) -> std::result::Result<Nodes, String> {
    if let Some(stores) = ctx.cache::<Stores>() {
        return match stores.readable(&[stores::NODES]).await {
            Ok(()) => Ok(stores
                .nodes
                .state()
                .iter()
                .map(|n| (n.metadata.name.clone().unwrap_or_default(), n.facts.clone()))
                .collect()),
            Err(e) => Err(e.message),
        };
    }
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(ctx.client.clone());
    match api.list(&ListParams::default().match_any()).await {
        Ok(list) => Ok(list
            .items
            .iter()
            .map(|n| (n.name_any(), Arc::new(NodeFacts::from(n))))
            .collect()),
        Err(e) => Err(Error::kube("list Nodes", e).to_string()),
    }
}

/// The groups of the control-plane section: every istiod revision in the namespace.
pub fn control_plane_groups(spec: &crate::api::MeshPolicySpec) -> Vec<Group> {
    let Some(cp) = &spec.control_plane else {
        return Vec::new();
    };
    vec![Group {
        label: "istiod".into(),
        namespace: cp.namespace.clone(),
        selector: k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
            match_labels: Some([("app".to_string(), "istiod".to_string())].into()),
            ..Default::default()
        },
        rules: HaRules {
            replicas: cp.replicas.clone(),
            budget: cp.disruption_budget.clone(),
            spread: cp.spread.clone(),
            resources: cp.resources.clone(),
            container: "discovery",
        },
        enforcement: crate::policy::effective(spec, cp.enforcement),
    }]
}

/// The groups of the gateways section: one per entry.
pub fn gateway_groups(spec: &crate::api::MeshPolicySpec) -> Vec<Group> {
    spec.gateways
        .iter()
        .map(|g| Group {
            label: format!("gateway {}", g.name),
            namespace: g.namespace.clone(),
            selector: g.selector.clone(),
            rules: HaRules {
                replicas: g.replicas.clone(),
                budget: g.disruption_budget.clone(),
                spread: g.spread.clone(),
                resources: g.resources.clone(),
                container: "istio-proxy",
            },
            enforcement: crate::policy::effective(spec, g.enforcement),
        })
        .collect()
}
