//! Mutual TLS with Istio `PeerAuthentication` objects.
//!
//! observe (namespaces, every PeerAuthentication, and pod metadata when STRICT is declared,
//! with or without `force`)
//! -> pure [`plan`] -> execute with server-side apply (Enforce only) -> report in the
//! `MutualTLS` condition.
//!
//! A scope (the mesh, or one selected namespace) has exactly one namespace-wide
//! PeerAuthentication: a user's own selector-less object is corrected in place (only
//! `spec.mtls.mode` is applied), otherwise meshwarden creates `meshwarden-mtls`. Exemptions
//! are rendered as `meshwarden-exemption-<hash>`. A scope is moved to STRICT only when no pod
//! without a sidecar would be cut off, or when `force` is set; either way, pods without a
//! sidecar that a STRICT scope cuts off are reported (`ClientsCutOff`).

mod model;
mod observe;

pub use model::*;
pub use observe::*;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::hash::{DefaultHasher, Hash, Hasher};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, ListParams};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;
use kube::{CustomResource, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{
    Enforcement, MeshPolicy, MtlsExemption, MtlsMode, MtlsOverrides, MtlsScope, MtlsSpec, Violation,
};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::rules::RuleReport;
use crate::selector;
use crate::status::conditions::{Observed, Status, types};
use crate::status::messages::{self, Contested};
use crate::status::reasons::{self, CLIENTS_CUT_OFF, OVERRIDES_REPORTED, ViolationAction};
use crate::write::driver::{self, Outcome, Planned};
use crate::write::fight::{TakeoverKey, TakeoverPart};
use crate::write::{self, FightKey, ForeignWrites};

/// PeerAuthentication writes of one reconcile in flight at once.
pub const WRITE_CONCURRENCY: usize = 16;

mod clients;

mod plan;

mod pods;

pub use clients::{blockers, cut_off_message, hold_message};
pub use plan::{expand_exemptions, plan};
pub use pods::{PodCache, only_changes};

/// The fields of a PeerAuthentication meshwarden sets.
const OWNED_PATHS: [&[&str]; 2] = [&["f:spec", "f:mtls"], &["f:spec", "f:portLevelMtls"]];

fn owned_paths() -> Vec<Vec<String>> {
    OWNED_PATHS
        .iter()
        .map(|p| p.iter().map(|k| k.to_string()).collect())
        .collect()
}

/// Other managers' writes of the fields `fix` sets, as read; `None` for a create or a delete.
fn seen_writes(fix: &Fix, read: &[PeerAuthentication]) -> Option<ForeignWrites> {
    let Fix::Apply {
        namespace, name, ..
    } = fix
    else {
        return None;
    };
    read.iter()
        .find(|pa| pa.namespace().as_deref() == Some(namespace) && &pa.name_any() == name)
        .map(|pa| write::foreign_writes(&pa.metadata, &owned_paths()))
}

/// Writes `fix`; returns the other managers' writes of the fields it set, as left.
async fn execute(ctx: &Context, fix: &Fix) -> Result<Option<ForeignWrites>> {
    match fix {
        Fix::Apply {
            namespace,
            name,
            patch,
            ..
        } => {
            let api: Api<PeerAuthentication> = Api::namespaced(ctx.client.clone(), namespace);
            write::apply(&api, name, patch, &ctx.writes)
                .await
                .map(|pa| Some(write::foreign_writes(&pa.metadata, &owned_paths())))
        }
        Fix::Delete { namespace, name } => {
            let api: Api<PeerAuthentication> = Api::namespaced(ctx.client.clone(), namespace);
            write::delete(&api, name, &ctx.writes).await.map(|()| None)
        }
    }
}

/// Observes, plans and (in Enforce) applies the `mtls` section; reports the result.
pub async fn reconcile(
    ctx: &Context,
    policy: &MeshPolicy,
    spec: &MtlsSpec,
    enforcement: Enforcement,
) -> RuleReport {
    let ctype = types::MUTUAL_TLS;
    let enforce = enforcement == Enforcement::Enforce;
    // Under STRICT the pods are read with or without `force`: `force` skips the hold, not
    // the report of the pods a STRICT scope cuts off (the cache is read, nothing is listed).
    let need_pods = spec.mode == MtlsMode::STRICT;
    let root = match root_namespace(ctx, spec).await {
        Ok(r) => r,
        Err(e) => return RuleReport::failed(ctype, &e),
    };
    let obs = match observe(ctx, need_pods).await {
        Ok(o) => o,
        Err(e) => return RuleReport::failed(ctype, &e),
    };
    // An assumed root namespace (no mesh config seen since start, such as after a restart
    // while it was gone) never moves the mesh-wide object made for a root namespace read
    // before.
    if spec.scope == MtlsScope::Mesh
        && root.assumed
        && let Some(ns) =
            mesh_object_elsewhere(&obs.peer_auths, &policy.name_any(), &root.namespace)
    {
        let e = Error::RootNamespaceUnknown(format!(
            "no mesh config in istiod's namespace {}, and this policy's mesh-wide object is in {ns}: Istio's root namespace is not guessed, so every write of the section is held (nothing is created, moved or deleted) until meshConfig names it; mtls.rootNamespace decides it instead",
            root.namespace
        ));
        return RuleReport::failed(ctype, &e);
    }
    // Only the hints about restarting pods depend on revisions: without them, every revision
    // label is taken as live.
    let revisions = ctx
        .revisions()
        .await
        .unwrap_or_else(|_| crate::istio::Revisions::any());
    // Exemptions that select namespaces by label apply to each namespace they select now.
    let spec = &MtlsSpec {
        exemptions: expand_exemptions(&spec.exemptions, &obs.namespaces),
        ..spec.clone()
    };
    let blocking = blockers(&obs.pods, &obs.namespaces, &spec.exemptions);
    let owner = write::owner_reference(policy);
    let name = policy.name_any();
    let plan = plan(&Input {
        spec,
        root: &root.namespace,
        istio_root: root.istio_root.as_deref(),
        policy: &name,
        owner,
        namespaces: &obs.namespaces,
        peer_auths: &obs.peer_auths,
        blockers: &blocking,
    });

    let mut report = RuleReport {
        targets: plan.targets,
        ..RuleReport::new(Observed::new(ctype, Status::True, reasons::COMPLIANT, ""))
    };
    let mut takeovers = Vec::new();
    let mut fights = Vec::new();
    let mut unfixable = false;
    let mut found: BTreeSet<&'static str> = BTreeSet::new();
    let mut outstanding_targets = 0;
    // Every finding with a fix is written in Enforce, except objects in a fight, in the order
    // of [`Fix::phase`]: what lets plain text in, then what only writes STRICT, then
    // deletions; each phase done before the next starts, with at most WRITE_CONCURRENCY in
    // flight.
    let mut write = vec![false; plan.findings.len()];
    let mut fighting = vec![false; plan.findings.len()];
    for phase in 0..=2 {
        let planned: Vec<Planned<(usize, &Fix)>> = plan
            .findings
            .iter()
            .enumerate()
            .filter(|_| enforce)
            .filter_map(|(i, f)| f.fix.as_ref().map(|fix| (i, f, fix)))
            .filter(|(_, _, fix)| fix.phase() == phase)
            .map(|(i, f, fix)| {
                let key = FightKey {
                    policy: name.clone(),
                    section: ctype,
                    object: f.object.clone(),
                    field: None,
                };
                Planned::one(key, seen_writes(fix, &obs.peer_auths), (i, fix))
            })
            .collect();
        let outcomes = driver::drive(&ctx.memory, planned, WRITE_CONCURRENCY, |(_, fix)| {
            execute(ctx, fix)
        })
        .await;
        let mut first_error = None;
        for outcome in outcomes {
            match outcome {
                Outcome::Fighting((i, _)) => {
                    fighting[i] = true;
                    fights.push(plan.findings[i].object.clone());
                }
                Outcome::Written((i, _)) => write[i] = true,
                Outcome::Failed(_, e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            let mut failed = RuleReport::failed(ctype, &e);
            failed.targets = plan.targets;
            return failed;
        }
    }
    for (i, f) in plan.findings.iter().enumerate() {
        let fixed = write[i];
        let fighting = fighting[i];
        if let (true, Some(fix)) = (fixed, &f.fix) {
            report.corrected += 1;
            report
                .corrections
                .push(format!("{}: {}", f.object, f.message));
            if let Fix::Apply { takeovers: t, .. } = fix {
                takeovers.extend(t.iter().cloned());
            }
        }
        if fixed && !f.held {
            continue;
        }
        if f.target {
            outstanding_targets += 1;
        }
        unfixable |= f.fix.is_none() && !f.held && f.reason.is_none();
        found.extend(f.reason);
        let action = if !enforce {
            ViolationAction::Reported
        } else if f.held {
            ViolationAction::Held
        } else if fighting {
            ViolationAction::Skipped
        } else {
            ViolationAction::Reported
        };
        report.violations.push(Violation {
            rule: ctype.to_string(),
            object: f.object.clone(),
            message: f.message.clone(),
            action,
        });
    }
    report.compliant = (plan.targets - outstanding_targets).max(0);

    let key = TakeoverKey {
        policy: name.clone(),
        generation: policy.metadata.generation.unwrap_or_default(),
        section: ctype,
        part: TakeoverPart::Fields,
    };
    let takeovers = ctx.memory.takeovers(key, &takeovers);
    let mut msg = Vec::new();
    let scope = match spec.scope {
        MtlsScope::Mesh => format!(
            "mode {} for the mesh (root namespace {}: {})",
            Strength::from(spec.mode).as_str(),
            root.namespace,
            root.source
        ),
        MtlsScope::Namespaces => format!(
            "mode {} for each selected namespace",
            Strength::from(spec.mode).as_str()
        ),
    };
    msg.push(format!(
        "{scope}: {} of {} target(s) compliant",
        report.compliant, report.targets
    ));
    if report.corrected > 0 {
        msg.push(format!("{} corrected", report.corrected));
    }
    if !plan.exemptions.is_empty() {
        let mut shown = plan.exemptions[..plan.exemptions.len().min(10)].join("; ");
        if plan.exemptions.len() > 10 {
            shown.push_str(&format!(" and {} more", plan.exemptions.len() - 10));
        }
        msg.push(format!("exemptions: {shown}"));
    }
    msg.extend(messages::takeover_sentence(&takeovers));
    msg.extend(messages::fight_sentence(&fights, Contested::Objects));
    let deviations: Vec<&Violation> = report
        .violations
        .iter()
        .filter(|v| v.action != ViolationAction::Held)
        .collect();
    if let Some(s) = messages::deviations_sentence(deviations.iter().copied(), 5) {
        msg.push(s);
        if !enforce {
            msg.push("Audit mode: nothing was changed".to_string());
        }
    }
    msg.extend(plan.notes.iter().take(3).cloned());
    if plan.held {
        msg.push(hold_message(&blocking, &obs.namespaces, &revisions));
    }
    let cut_off = found.contains(CLIENTS_CUT_OFF);
    if cut_off {
        msg.push(cut_off_message(&blocking, &obs.namespaces, &revisions));
    }

    if let Some(m) = &root.mismatch {
        msg.insert(1, m.clone());
        report.violations.insert(
            0,
            Violation {
                rule: ctype.to_string(),
                object: format!("MeshPolicy/{name}"),
                message: m.clone(),
                action: ViolationAction::Reported,
            },
        );
    }
    let held = plan.held && enforce;
    let (status, reason) = if !fights.is_empty() {
        (Status::False, reasons::FIGHT_DETECTED)
    } else if root.mismatch.is_some() {
        (Status::False, reasons::ROOT_NAMESPACE_MISMATCH)
    } else if held {
        (Status::False, reasons::STRICT_HELD)
    } else if cut_off {
        (Status::False, CLIENTS_CUT_OFF)
    } else if !report.violations.is_empty() && !enforce {
        (Status::False, reasons::NON_COMPLIANT)
    } else if !report.violations.is_empty() && unfixable {
        (Status::False, reasons::CANNOT_CORRECT)
    } else if found.contains(OVERRIDES_REPORTED) {
        (Status::False, OVERRIDES_REPORTED)
    } else if !report.violations.is_empty() {
        (Status::False, reasons::NON_COMPLIANT)
    } else if report.targets == 0 {
        (Status::False, reasons::NO_TARGETS)
    } else if !takeovers.is_empty() {
        (Status::True, reasons::FIELD_OWNED_BY_OTHER)
    } else if report.corrected > 0 {
        (Status::True, reasons::CORRECTED)
    } else {
        (Status::True, reasons::COMPLIANT)
    };
    if reason == reasons::NO_TARGETS {
        msg.push(
            "mtls.namespaceSelector selects no namespace: check its labels against `kubectl get ns --show-labels`"
                .to_string(),
        );
    }
    report.condition = Observed::new(ctype, status, reason, msg.join(". "));
    report
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    pub(crate) fn spec(yaml: &str) -> MtlsSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    pub(crate) fn ns(name: &str, labels: &[(&str, &str)]) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    pub(crate) fn pa(ns: &str, name: &str, age: i64, spec_json: Value) -> PeerAuthentication {
        let mut p = PeerAuthentication::new(name, serde_json::from_value(spec_json).unwrap());
        p.metadata.namespace = Some(ns.into());
        p.metadata.creation_timestamp =
            Some(Time(jiff::Timestamp::from_second(1_000_000 - age).unwrap()));
        p
    }

    pub(crate) fn ours(mut p: PeerAuthentication, policy: &str) -> PeerAuthentication {
        p.metadata.labels = Some(write::labels(policy));
        p
    }

    pub(crate) fn pod(ns: &str, name: &str, injected: bool) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            labels: [("app".to_string(), name.to_string())].into(),
            annotations: BTreeMap::new(),
            injected,
            host_network: false,
        }
    }

    pub(crate) fn run(
        s: &MtlsSpec,
        nss: &[NamespaceInfo],
        pas: &[PeerAuthentication],
        blockers: &[PodInfo],
    ) -> Plan {
        plan(&Input {
            spec: s,
            root: s.root_namespace.as_deref().unwrap_or("istio-system"),
            istio_root: None,
            policy: "p",
            owner: None,
            namespaces: nss,
            peer_auths: pas,
            blockers,
        })
    }

    pub(crate) fn patch_of(f: &Finding) -> &Value {
        match &f.fix {
            Some(Fix::Apply { patch, .. }) => patch,
            other => panic!("expected an apply, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests;
