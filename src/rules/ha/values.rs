//! `meshwarden values`: the values of Istio's Helm charts that declare what a policy holds, one
//! values file per Helm release found, ready for `helm upgrade --reuse-values -f`. Once the
//! release carries them, an upgrade no longer reverts anything and meshwarden holds nothing
//! against Helm.

use std::collections::BTreeMap;

use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

use super::source::{Installer, Value as Key, installer};
use super::{HaRules, Observation};
use crate::api::{MeshPolicy, SpreadMode};
use crate::context::Context;
use crate::error::{Error, Result};

/// Sets `value` at a dotted chart key (`pdb.maxUnavailable`).
fn set(values: &mut Value, key: &str, value: Value) {
    let mut cur = values;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, k) in parts.iter().enumerate() {
        let Some(map) = cur.as_object_mut() else {
            return;
        };
        if i + 1 == parts.len() {
            map.insert((*k).to_string(), value);
            return;
        }
        cur = map.entry((*k).to_string()).or_insert_with(|| json!({}));
    }
}

/// Deep-merges `from` into `into`, `from` winning on leaves.
fn merge_values(into: &mut Value, from: &Value) {
    match (into.as_object_mut(), from.as_object()) {
        (Some(i), Some(f)) => {
            for (k, v) in f {
                merge_values(i.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        _ => *into = from.clone(),
    }
}

/// The values declaring `rules` for a target, in the terms of its installer, with the keys set
/// (dotted, in order) and the installer. None when no installer was recognised.
pub fn installer_values(
    rules: &HaRules,
    obs: &Observation,
) -> Option<(Installer, Value, Vec<String>)> {
    let installer = installer(&obs.deployment.metadata)?;
    let c = rules.container;
    let mut v = json!({});
    let mut keys = Vec::new();
    // A key without a value is only named: spread meshwarden has not written yet.
    let mut put = |k: Key, value: Option<Value>| {
        if let Some(key) = installer.key(c, k) {
            if let Some(value) = value {
                set(&mut v, &key, value);
            }
            keys.push(key);
        }
    };
    let spec = obs.deployment.spec.clone().unwrap_or_default();
    if let Some(r) = &rules.replicas {
        match &obs.hpa {
            Some(h) => {
                let current = h.spec.as_ref().and_then(|s| s.min_replicas).unwrap_or(1);
                put(Key::HpaMin, Some(json!(current.max(r.min))));
            }
            None => {
                let current = spec.replicas.unwrap_or(1);
                put(Key::Replicas, Some(json!(current.max(r.min))));
            }
        }
    }
    if let Some(b) = &rules.budget {
        if let Some(m) = &b.min_available {
            put(Key::MinAvailable, Some(json!(m)));
        } else if let Some(m) = &b.max_unavailable {
            put(Key::MaxUnavailable, Some(json!(m)));
        }
    }
    let pod = spec.template.spec.unwrap_or_default();
    if let Some(res) = &rules.resources {
        let mut r = serde_json::to_value(res).unwrap_or(Value::Null);
        // The chart's resources replace the container's: keep what is set and not declared.
        if let Some(current) = pod
            .containers
            .iter()
            .find(|x| x.name == c)
            .and_then(|x| x.resources.as_ref())
            .and_then(|x| serde_json::to_value(x).ok())
        {
            let mut merged = current;
            merge_values(&mut merged, &r);
            r = merged;
        }
        put(Key::Resources, Some(r));
    }
    if let Some(spread) = &rules.spread {
        let affinity = pod.affinity.as_ref().map(|a| json!(a));
        if spread.nodes != SpreadMode::Off || affinity.is_some() {
            put(Key::Affinity, affinity);
        }
        let zones = pod.topology_spread_constraints.as_ref().map(|t| json!(t));
        if spread.zones != SpreadMode::Off || zones.is_some() {
            put(Key::TopologySpread, zones);
        }
    }
    Some((installer, v, keys))
}

/// The values files for `policy` (all policies when `None`), as one YAML stream.
pub async fn values_files(ctx: &Context, policy: Option<&str>) -> Result<String> {
    let api: Api<MeshPolicy> = Api::all(ctx.client.clone());
    let all = api
        .list(&ListParams::default())
        .await
        .map_err(|e| Error::kube("list MeshPolicies", e))?
        .items;
    let refs: Vec<&MeshPolicy> = all.iter().collect();
    let mut files: BTreeMap<Installer, (Value, Vec<String>)> = BTreeMap::new();
    for p in all
        .iter()
        .filter(|p| policy.is_none_or(|n| p.name_any() == n))
    {
        let (spec, _) = crate::policy::resolve(p, &refs);
        let groups = super::control_plane_groups(&spec)
            .into_iter()
            .chain(super::gateway_groups(&spec));
        for group in groups {
            let (observations, pdbs_refused) = super::observe(ctx, &group).await?;
            if let Some(e) = pdbs_refused {
                return Err(e);
            }
            for obs in observations {
                if let Some((installer, v, _)) = installer_values(&group.rules, &obs) {
                    let entry = files
                        .entry(installer)
                        .or_insert_with(|| (json!({}), vec![]));
                    merge_values(&mut entry.0, &v);
                    entry
                        .1
                        .push(format!("{} ({})", obs.deployment.name_any(), p.name_any()));
                }
            }
        }
    }
    if files.is_empty() {
        return Err(Error::InvalidSpec(match policy {
            Some(n) => format!("no target of MeshPolicy {n} was installed by Helm (no meta.helm.sh/release-name annotation), the Sail operator or Argo CD, or the policy does not exist"),
            None => "no target of any MeshPolicy was installed by Helm (no meta.helm.sh/release-name annotation), the Sail operator or Argo CD".into(),
        }));
    }
    let mut out = String::new();
    for (installer, (values, targets)) in files {
        out.push_str(&format!(
            "# {}, for {}\n# {}\n---\n",
            match &installer {
                Installer::Helm(r) =>
                    format!("Helm release {} in namespace {}", r.name, r.namespace),
                other => capitalised(&other.place()),
            },
            targets.join(", "),
            installer.how()
        ));
        out.push_str(
            &serde_yaml::to_string(&values)
                .map_err(|e| Error::InvalidSpec(format!("cannot print values: {e}")))?,
        );
    }
    Ok(out)
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// The sentence telling which values of which installer declare what meshwarden took over on
/// this target (None when no installer was recognised).
pub fn source_sentence(rules: &HaRules, obs: &Observation, policy: &str) -> Option<String> {
    let (installer, _, keys) = installer_values(rules, obs)?;
    let what = match &installer {
        Installer::Helm(_) => "as a values file for helm upgrade --reuse-values -f",
        Installer::Sail { .. } => "as a patch of the Istio resource",
        Installer::ArgoCd => "as a values file for the Application",
    };
    Some(format!(
        "to stop the drift for good, set {} in {}: `meshwarden values {policy}` prints them {what}",
        keys.join(", "),
        installer.place(),
    ))
}
