//! Single Gateways selected by name (`gatewayApi.gateways[]`), held through istiod's
//! per-Gateway customization: a ConfigMap in the Gateway's namespace that the Gateway's
//! `spec.infrastructure.parametersRef` names. istiod lays its overlays over the class's
//! defaults (both strategic-merge patches, the Gateway's last) and re-renders the Gateway when
//! that ConfigMap changes. meshwarden keeps the ConfigMap (owned by the Gateway) and sets the
//! reference, by a server-side apply of that one field, only on a Gateway that references
//! nothing; it gives the field up (an apply without it) and deletes the ConfigMap when it lets
//! go. The reference goes first: istiod renders nothing for a Gateway whose reference names
//! a missing ConfigMap.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::{Resource, ResourceExt};

use super::Synced;
use super::observe::{self, Gateway};
use super::plan::{self, GatewayPlan, GatewayRef};
use crate::api::{GatewayClassSpec, GatewayPosture, GatewayRefSpec, MeshPolicy};
use crate::context::Context;
use crate::error::Result;
use crate::write;

/// One Gateway selected by name, as decided in a pass.
#[derive(Clone, Debug)]
pub(super) struct Selected {
    pub gateway: GatewayRef,
    /// Its class, when the Gateway exists.
    pub class: Option<String>,
    /// What it is held at: its entry over its class's entry.
    pub posture: GatewayPosture,
    /// The overlays of its ConfigMap.
    pub want: BTreeMap<String, String>,
    pub plan: GatewayPlan,
}

/// Holds the Gateways of `entries` (their classes' entries in `classes`), writing only when
/// `write`; gives up the references and ConfigMaps of the others. Returns the overlay keys of
/// meshwarden's ConfigMaps the Gateways referenced at the start of the pass.
pub(super) async fn sync(
    ctx: &Context,
    policy: &MeshPolicy,
    (entries, classes): (&[GatewayRefSpec], &[GatewayClassSpec]),
    write: bool,
    out: &mut Synced,
) -> Result<BTreeMap<GatewayRef, BTreeSet<String>>> {
    let name = policy.name_any();
    let all = if entries.is_empty() && !super::holds_gateways(policy) {
        BTreeMap::new()
    } else {
        observe::gateways(ctx).await?
    };
    let own = |g: &GatewayRef| plan::gateway_config_map_name(&name, &g.name);
    let held: BTreeSet<GatewayRef> = all
        .values()
        .filter(|g| {
            g.parameters_ref()
                .is_some_and(|r| plan::is_own(&r, &own(&g.id())))
        })
        .map(Gateway::id)
        .collect();
    let wanted: BTreeSet<GatewayRef> = entries.iter().map(id).collect();
    let mut live = BTreeMap::new();
    for g in held.union(&wanted) {
        if let Some(data) = observe::own_data(ctx, &g.namespace, &own(g)).await? {
            live.insert(g.clone(), data);
        }
    }
    out.gateways_clean = held.is_empty() && live.is_empty();
    out.clean &= out.gateways_clean;
    let mut kept = BTreeSet::new();
    for entry in entries {
        let gw = id(entry);
        let found = all.get(&gw);
        let class_name = found.map(|g| g.spec.gateway_class_name.clone());
        let class = classes
            .iter()
            .find(|c| Some(&c.class_name) == class_name.as_ref());
        let posture = plan::effective(&entry.posture, class.map(|c| &c.posture));
        let want = plan::gateway_overlays(&posture, &name);
        let decided = plan::decide_gateway(
            &want,
            found.is_some(),
            found.and_then(Gateway::parameters_ref).as_ref(),
            &own(&gw),
            live.get(&gw),
        );
        if let (true, Some(g)) = (write && !want.is_empty(), found) {
            match decided {
                GatewayPlan::Write { reference } => {
                    kept.insert(gw.clone());
                    hold(ctx, &name, g, (&want, reference), out).await;
                }
                GatewayPlan::Current => {
                    kept.insert(gw.clone());
                }
                GatewayPlan::Missing | GatewayPlan::Foreign(_) => {}
            }
        }
        out.selected.push(Selected {
            gateway: gw,
            class: class_name,
            posture,
            want,
            plan: decided,
        });
    }
    for gw in held.iter().chain(live.keys()).collect::<BTreeSet<_>>() {
        if !kept.contains(gw) {
            out.pending = true;
            let reference = held.contains(gw);
            let_go(ctx, gw, &own(gw), reference, out).await;
        }
    }
    Ok(live
        .into_iter()
        .filter(|(g, _)| held.contains(g))
        .map(|(g, d)| (g, d.into_keys().collect()))
        .collect())
}

fn id(entry: &GatewayRefSpec) -> GatewayRef {
    GatewayRef {
        namespace: entry.namespace.clone(),
        name: entry.name.clone(),
    }
}

/// Writes meshwarden's ConfigMap for Gateway `g`, then, when `reference`, the Gateway's
/// reference to it.
async fn hold(
    ctx: &Context,
    policy: &str,
    g: &Gateway,
    (want, reference): (&BTreeMap<String, String>, bool),
    out: &mut Synced,
) {
    let gw = g.id();
    let cm = plan::gateway_config_map_name(policy, &gw.name);
    let owner = g.owner_ref(&()).map(|mut o| {
        o.block_owner_deletion = Some(false);
        o
    });
    let patch = plan::gateway_config_map(policy, &gw, want, owner);
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &gw.namespace);
    let keys = want.keys().cloned().collect::<Vec<_>>().join(", ");
    match write::apply(&cms, &cm, &patch, &ctx.writes).await {
        Ok(_) => out.corrections.push(format!(
            "ConfigMap/{}/{cm}: the parameters of Gateway {gw} ({keys}), which istiod renders into its gateway over its class's defaults",
            gw.namespace
        )),
        Err(e) => {
            out.failures
                .push(format!("ConfigMap/{}/{cm}: {e}", gw.namespace));
            return;
        }
    }
    if !reference {
        return;
    }
    let api: Api<Gateway> = Api::namespaced(ctx.client.clone(), &gw.namespace);
    let patch = plan::gateway_reference(&gw, Some(&cm));
    match write::apply_with(&api, &gw.name, &patch, &ctx.writes, false).await {
        Ok(_) => out.corrections.push(format!(
            "Gateway/{gw}: spec.infrastructure.parametersRef names ConfigMap {cm}"
        )),
        Err(e) => out.failures.push(format!("Gateway/{gw}: {e}")),
    }
}

/// Gives up Gateway `gw`'s reference to meshwarden's ConfigMap `cm` (when it still has it:
/// `reference`), then deletes the ConfigMap.
async fn let_go(ctx: &Context, gw: &GatewayRef, cm: &str, reference: bool, out: &mut Synced) {
    if reference {
        let api: Api<Gateway> = Api::namespaced(ctx.client.clone(), &gw.namespace);
        let patch = plan::gateway_reference(gw, None);
        match write::apply_with(&api, &gw.name, &patch, &ctx.writes, false).await {
            Ok(_) => out.corrections.push(format!(
                "Gateway/{gw}: spec.infrastructure.parametersRef given up (Gateway {gw} is no longer held by this policy in Enforce)"
            )),
            Err(e) => {
                out.failures.push(format!("Gateway/{gw}: {e}"));
                return;
            }
        }
    }
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &gw.namespace);
    match write::delete(&cms, cm, &ctx.writes).await {
        Ok(()) => out
            .corrections
            .push(format!("ConfigMap/{}/{cm}: removed", gw.namespace)),
        Err(e) => out
            .failures
            .push(format!("ConfigMap/{}/{cm}: {e}", gw.namespace)),
    }
}
