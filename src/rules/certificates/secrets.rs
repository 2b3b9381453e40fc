//! The Secrets a policy names in `certificates.secrets` (a plugged-in `cacerts`): read with a
//! `get` each, only their certificates' facts kept. meshwarden's ServiceAccount may read them
//! only when the chart grants it (`certificates.readSecrets`); a refused or missing Secret is
//! reported as unreadable, naming the fix, while the ConfigMaps are still reported.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use super::facts::{Bundle, RootFact, parse_bundle};
use crate::api::SecretRef;
use crate::error::{Error, Result};

/// The keys of Istio's plugged-in CA Secret holding certificates meshwarden checks.
pub const KEYS: [&str; 2] = ["root-cert.pem", "ca-cert.pem"];

/// The source name of a Secret, as violations and status name it.
pub fn source(r: &SecretRef) -> String {
    format!("Secret/{}/{}", r.namespace, r.name)
}

/// The certificates of [`KEYS`] in a Secret's data.
pub fn reduce(secret: &Secret) -> Bundle {
    let mut roots: Vec<RootFact> = Vec::new();
    let mut problems = Vec::new();
    let data = secret.data.as_ref();
    for key in KEYS {
        let Some(bytes) = data.and_then(|d| d.get(key)) else {
            continue;
        };
        match parse_bundle(&String::from_utf8_lossy(&bytes.0)) {
            Bundle::Roots(r) => roots.extend(r.iter().cloned()),
            Bundle::Unreadable(why) => problems.push(format!("{key} {why}")),
        }
    }
    if let Some(p) = problems.first() {
        return Bundle::Unreadable(p.clone());
    }
    if roots.is_empty() {
        return Bundle::Unreadable(format!("has neither key {}", KEYS.join(" nor ")));
    }
    roots.sort();
    roots.dedup();
    Bundle::Roots(roots.into())
}

/// Reads every named Secret. A Secret meshwarden may not read (403) or that does not exist
/// (404) is an unreadable source; other errors fail the section.
pub async fn read(client: &kube::Client, refs: &[SecretRef]) -> Result<BTreeMap<String, Bundle>> {
    let mut out = BTreeMap::new();
    for r in refs {
        let api: Api<Secret> = Api::namespaced(client.clone(), &r.namespace);
        let bundle = match api.get(&r.name).await {
            Ok(s) => reduce(&s),
            Err(kube::Error::Api(s)) if s.code == 403 => Bundle::Unreadable(format!(
                "cannot be read: meshwarden's ServiceAccount may not get it; grant it with the chart value certificates.readSecrets (a Role in {} with get on this name), or remove it from certificates.secrets",
                r.namespace
            )),
            Err(kube::Error::Api(s)) if s.code == 404 => {
                Bundle::Unreadable("does not exist; fix certificates.secrets".to_string())
            }
            Err(e) => {
                return Err(Error::kube(
                    format!("get Secret {}/{}", r.namespace, r.name),
                    e,
                ));
            }
        };
        out.insert(source(r), bundle);
    }
    Ok(out)
}
