//! The declared proxy resources: the four annotations, their hash, deviations from them.

use super::*;

/// The four values written, derived from `spec.sidecars.resources`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub cpu: String,
    pub cpu_limit: String,
    pub memory: String,
    pub memory_limit: String,
    /// How omitted values were filled in (said in the condition).
    pub notes: Vec<String>,
}

impl Desired {
    /// The four annotations, in a fixed order.
    pub fn annotations(&self) -> [(&'static str, &str); 4] {
        [
            (PROXY_CPU, self.cpu.as_str()),
            (PROXY_CPU_LIMIT, self.cpu_limit.as_str()),
            (PROXY_MEMORY, self.memory.as_str()),
            (PROXY_MEMORY_LIMIT, self.memory_limit.as_str()),
        ]
    }

    /// A short stable hash of the four values (FNV-1a of `key=value;` per annotation, hex). It
    /// is stored in the workloads, so the bytes hashed must not change.
    pub fn hash(&self) -> String {
        let mut data = String::new();
        for (k, v) in self.annotations() {
            data.push_str(k);
            data.push('=');
            data.push_str(v);
            data.push(';');
        }
        format!("{:016x}", crate::hash::fnv1a(data.as_bytes()))
    }

    /// `cpu 100m/1, memory 128Mi/512Mi` (request/limit).
    pub fn summary(&self) -> String {
        format!(
            "cpu {}/{}, memory {}/{}",
            self.cpu, self.cpu_limit, self.memory, self.memory_limit
        )
    }

    /// Per-pod amount of a quota key (`requests.cpu`, ...) in milli-units.
    pub(super) fn amount(&self, key: &str) -> i128 {
        let v = match key {
            "requests.cpu" => &self.cpu,
            "limits.cpu" => &self.cpu_limit,
            "requests.memory" => &self.memory,
            _ => &self.memory_limit,
        };
        quantity::millis(v).unwrap_or(0)
    }
}

pub(super) fn ios(v: &IntOrString) -> String {
    match v {
        IntOrString::Int(i) => i.to_string(),
        IntOrString::String(s) => s.clone(),
    }
}

/// Derives the four values. An omitted request takes the limit (what Kubernetes does for a
/// container with only a limit); an omitted limit takes the request (Istio would otherwise
/// give the proxy no limit at all, not the mesh default). A resource with neither is an error.
pub fn desired(res: &ResourcesSpec) -> std::result::Result<Desired, String> {
    let req = res.requests.clone().unwrap_or_default();
    let lim = res.limits.clone().unwrap_or_default();
    let mut notes = Vec::new();
    let mut missing = Vec::new();
    let mut pick = |name: &str, r: Option<IntOrString>, l: Option<IntOrString>| match (r, l) {
        (Some(r), Some(l)) => Some((ios(&r), ios(&l))),
        (None, Some(l)) => {
            let l = ios(&l);
            notes.push(format!(
                "requests.{name} is not declared: the request is set to the limit {l}, as Kubernetes does"
            ));
            Some((l.clone(), l))
        }
        (Some(r), None) => {
            let r = ios(&r);
            notes.push(format!(
                "limits.{name} is not declared: the limit is set to the request {r} (once one proxy annotation is set Istio gives the proxy no {name} limit instead of the mesh default)"
            ));
            Some((r.clone(), r))
        }
        (None, None) => {
            missing.push(name.to_string());
            None
        }
    };
    let cpu = pick("cpu", req.cpu, lim.cpu);
    let memory = pick("memory", req.memory, lim.memory);
    match (cpu, memory) {
        (Some((cpu, cpu_limit)), Some((memory, memory_limit))) => Ok(Desired {
            cpu,
            cpu_limit,
            memory,
            memory_limit,
            notes,
        }),
        _ => Err(format!(
            "spec.sidecars.resources declares neither a request nor a limit for {}: Istio uses the four proxy annotations together, so meshwarden writes nothing until requests or limits of both cpu and memory are declared",
            missing.join(" and ")
        )),
    }
}

/// Per-pod requests/limits (milli-units) of the four [`KEYS`] (`requests.cpu`,
/// `limits.memory`, ...), held inline: one is kept per cached workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Amounts([Option<i128>; 4]);

impl Amounts {
    pub fn new() -> Self {
        Amounts::default()
    }

    /// The amount of `key` (one of [`KEYS`]); `None` when no container declares it.
    pub fn get(&self, key: &str) -> Option<&i128> {
        let i = KEYS.iter().position(|k| *k == key)?;
        self.0[i].as_ref()
    }

    /// Adds `millis` to `key` (one of [`KEYS`]; another key is ignored).
    fn add(&mut self, key: &str, millis: i128) {
        if let Some(i) = KEYS.iter().position(|k| *k == key) {
            *self.0[i].get_or_insert(0) += millis;
        }
    }
}

pub(super) const KEYS: [&str; 4] = [
    "requests.cpu",
    "requests.memory",
    "limits.cpu",
    "limits.memory",
];

/// Deviations of a template's annotations from the declared values (empty: compliant).
pub fn deviations(desired: &Desired, annotations: &impl KeyValues) -> Vec<String> {
    desired
        .annotations()
        .iter()
        .filter_map(|(k, want)| match annotations.value(k) {
            Some(have) if quantity::same(have, want) => None,
            Some(have) => Some(format!("{k} is {have}, declared {want}")),
            None => Some(format!("{k} is unset, declared {want}")),
        })
        .collect()
}

pub(super) fn container_amounts(containers: &[Container]) -> Amounts {
    let mut out = Amounts::new();
    for c in containers.iter().filter(|c| c.name != PROXY_CONTAINER) {
        let Some(r) = &c.resources else { continue };
        for (prefix, map) in [("requests", &r.requests), ("limits", &r.limits)] {
            for (res, q) in map.iter().flatten() {
                let key = match (prefix, res.as_str()) {
                    ("requests", "cpu") => "requests.cpu",
                    ("requests", "memory") => "requests.memory",
                    ("limits", "cpu") => "limits.cpu",
                    ("limits", "memory") => "limits.memory",
                    _ => continue,
                };
                out.add(key, quantity::millis(&q.0).unwrap_or(0));
            }
        }
    }
    out
}

pub(super) fn show(key: &str, millis: i128) -> String {
    if key.ends_with("cpu") {
        format!("{millis}m")
    } else {
        let bytes = millis / 1000;
        let mi = 1024 * 1024;
        if bytes % mi == 0 {
            format!("{}Mi", bytes / mi)
        } else {
            format!("{bytes}")
        }
    }
}
