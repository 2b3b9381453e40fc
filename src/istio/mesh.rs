//! Istio's root namespace, read from the revisions' mesh configs.

use super::*;

/// The ConfigMap holding the mesh config of a revision: `istio` for the default revision,
/// `istio-<revision>` for the others (istio-discovery chart, `templates/configmap.yaml`).
pub fn mesh_config_map(revision: &str) -> String {
    match revision {
        "" | "default" => "istio".to_string(),
        rev => format!("istio-{rev}"),
    }
}

/// `rootNamespace` of a `mesh` document (`None` when it does not set one).
pub fn root_namespace_of(mesh: &str) -> std::result::Result<Option<String>, String> {
    let v: serde_json::Value = serde_yaml::from_str(mesh).map_err(|e| e.to_string())?;
    match v.get("rootNamespace") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if s.is_empty() => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("rootNamespace is not a string: {other}")),
    }
}

/// Istio's root namespace, and where it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshRoot {
    pub namespace: String,
    /// For messages: which ConfigMap said so, or why it was assumed.
    pub source: String,
    /// Read from a mesh config (not assumed for want of one).
    pub from_mesh_config: bool,
}

/// Why [`mesh_root`] cannot tell the root namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MeshRootError {
    /// The revisions' mesh configs name different root namespaces.
    Unclear(String),
    /// A mesh config cannot be read: it is not YAML, or a mesh config seen since the watch
    /// started is gone (deleted, or its `mesh` key removed). Istio's root namespace is then
    /// not known, and nothing that depends on it may be written.
    Unreadable(String),
}

impl std::fmt::Display for MeshRootError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MeshRootError::Unclear(m) | MeshRootError::Unreadable(m) => f.write_str(m),
        }
    }
}

/// The root namespace of the control plane in `istio_namespace`: `rootNamespace` of the
/// `mesh` key of the ConfigMaps `istio` / `istio-<revision>` there (`maps`: name -> `mesh`),
/// for the revisions whose istiod runs there (`live_here`; every such ConfigMap when none
/// does), or istiod's namespace where a mesh config does not set it (istiod's default). With
/// no mesh config at all, and none seen since the watch started (`seen`: the names of the
/// ConfigMaps seen holding a mesh config), istiod's namespace is assumed. Err when the mesh
/// configs disagree, when one cannot be read, or when one that was seen is gone: a mesh
/// config briefly absent (an installer re-creating it, `kubectl replace`) is no reason to
/// move the root namespace.
pub fn mesh_root(
    istio_namespace: &str,
    live_here: &BTreeSet<String>,
    maps: &BTreeMap<String, String>,
    seen: &BTreeSet<String>,
) -> std::result::Result<MeshRoot, MeshRootError> {
    let wanted: BTreeSet<String> = live_here.iter().map(|r| mesh_config_map(r)).collect();
    let is_mesh_config = |name: &str| name == "istio" || name.starts_with("istio-");
    let candidates: Vec<(&String, &String)> = maps
        .iter()
        .filter(|(name, _)| {
            if wanted.is_empty() {
                is_mesh_config(name)
            } else {
                wanted.contains(name.as_str())
            }
        })
        .collect();
    // Mesh configs seen since the watch started that are gone now: those of the revisions
    // running here, or, with none running here, all of them once none is left.
    let gone: Vec<&String> = if wanted.is_empty() {
        if candidates.is_empty() {
            seen.iter().filter(|n| is_mesh_config(n)).collect()
        } else {
            Vec::new()
        }
    } else {
        wanted
            .iter()
            .filter(|n| seen.contains(*n) && !maps.contains_key(*n))
            .collect()
    };
    if !gone.is_empty() {
        let names: Vec<String> = gone
            .iter()
            .map(|n| format!("ConfigMap {istio_namespace}/{n}"))
            .collect();
        return Err(MeshRootError::Unreadable(format!(
            "the mesh config that named Istio's root namespace is gone: {} held one and no longer does",
            names.join(", ")
        )));
    }
    if candidates.is_empty() {
        return Ok(MeshRoot {
            namespace: istio_namespace.to_string(),
            source: format!(
                "assumed: no mesh config (ConfigMap istio or istio-<revision> with a `{MESH_KEY}` key) in istiod's namespace {istio_namespace}"
            ),
            from_mesh_config: false,
        });
    }
    let mut roots: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, mesh) in &candidates {
        let root = root_namespace_of(mesh).map_err(|e| {
            MeshRootError::Unreadable(format!(
                "ConfigMap {istio_namespace}/{name}: key {MESH_KEY} cannot be read: {e}"
            ))
        })?;
        let (root, how) = match root {
            Some(r) => (r, "meshConfig.rootNamespace"),
            None => (
                istio_namespace.to_string(),
                "istiod's namespace, as meshConfig.rootNamespace is not set",
            ),
        };
        roots
            .entry(root)
            .or_default()
            .push(format!("{how} in ConfigMap {istio_namespace}/{name}"));
    }
    if roots.len() > 1 {
        let all: Vec<String> = roots
            .iter()
            .map(|(root, from)| format!("{root} ({})", from.join(", ")))
            .collect();
        return Err(MeshRootError::Unclear(format!(
            "the revisions' mesh configs name different root namespaces: {}",
            all.join("; ")
        )));
    }
    let (namespace, from) = roots.into_iter().next().unwrap_or_default();
    Ok(MeshRoot {
        namespace,
        source: from.join(", "),
        from_mesh_config: true,
    })
}
