//! What the HA sections read: the Deployments of a group with their HPAs and PDBs, the
//! budgets meshwarden left behind, and the groups a policy declares.

use super::*;

/// Reads the targets of a group: Deployments by label, the HPA targeting each, and the
/// PodDisruptionBudgets selecting each one's pods. PodDisruptionBudgets the ClusterRole does
/// not let meshwarden read (403) are returned as that error, so the other rules still hold.
pub async fn observe(ctx: &Context, group: &Group) -> Result<(Vec<Observation>, Option<Error>)> {
    let ns = &group.namespace;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    // Served from the API server's watch cache (resourceVersion 0): it already holds the change
    // that triggered this reconcile, and a consistent read would first wait for the cache to
    // catch up with etcd, which costs tens of milliseconds per list.
    let lp = ListParams::default().match_any().labels(&group.selector);
    let (deps, hpas, pdbs) = tokio::try_join!(
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
    )?;
    let (pdbs, pdbs_refused) = pdbs;
    let mut out = Vec::new();
    for d in deps.items {
        let name = d.name_any();
        let mut targeting = hpas.items.iter().filter(|h| {
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
        out.push(Observation {
            deployment: d,
            hpa,
            other_hpas,
            pdbs: matching,
        });
    }
    Ok((out, pdbs_refused))
}

/// PodDisruptionBudgets meshwarden created for this policy in the group's namespace
/// (`<deployment>-meshwarden`) whose Deployment no longer exists.
pub(super) async fn left_behind(
    ctx: &Context,
    group: &Group,
    policy: &MeshPolicy,
) -> Result<Vec<String>> {
    let ns = &group.namespace;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let lp = ListParams::default().match_any().labels(&format!(
        "{}={},{POLICY_LABEL}={}",
        MANAGED_BY.0,
        MANAGED_BY.1,
        policy.name_any()
    ));
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

/// The groups of the control-plane section: every istiod revision in the namespace.
pub fn control_plane_groups(spec: &crate::api::MeshPolicySpec) -> Vec<Group> {
    let Some(cp) = &spec.control_plane else {
        return Vec::new();
    };
    vec![Group {
        label: "istiod".into(),
        namespace: cp.namespace.clone(),
        selector: "app=istiod".into(),
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
            selector: selector::to_query(&g.selector),
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
