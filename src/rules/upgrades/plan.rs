//! The pure plan of the section: versions and skew, the revisions and tags in use, and what
//! is wrong with them. Everything here reads what was observed and nothing else.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::api::{ProxyCount, RevisionStatus, RevisionTagStatus, UpgradesStatus};
use crate::istio::{INJECTION_LABEL, Injection, REVISION_LABEL, Revisions, namespace_injection};
use crate::rules::sidecars::{Kind, PodFacts};
use crate::status::reasons;

/// Most entries of each list in `status.upgrades` (the CRD's limits).
pub const MAX_REVISIONS: usize = 32;
pub const MAX_PROXY_COUNTS: usize = 64;

/// Major and minor of a version, which is all skew is about: `1.31-dev`, `1.31.0`,
/// `1.31.2-distroless` and `v1.31.1` are all 1.31.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Minor {
    pub major: u32,
    pub minor: u32,
}

impl Minor {
    /// `None` for a tag that does not start with `<major>.<minor>` (`latest`, a commit).
    pub fn parse(tag: &str) -> Option<Minor> {
        let tag = tag.strip_prefix('v').unwrap_or(tag);
        let (major, rest) = tag.split_once('.')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if major.is_empty() || !major.chars().all(|c| c.is_ascii_digit()) || digits.is_empty() {
            return None;
        }
        Some(Minor {
            major: major.parse().ok()?,
            minor: digits.parse().ok()?,
        })
    }

    /// Minor versions `self` is behind `newer` (negative: ahead). A major version counts as
    /// 1000 minors.
    pub fn behind(self, newer: Minor) -> i64 {
        let at = |m: Minor| i64::from(m.major) * 1000 + i64::from(m.minor);
        at(newer) - at(self)
    }
}

/// The version of a revision's istiod: the newest parseable image tag of its Deployments.
pub fn istiod_version(revisions: &Revisions, revision: &str) -> Option<(Minor, String)> {
    revisions
        .versions
        .get(revision)?
        .iter()
        .filter_map(|t| Minor::parse(t).map(|m| (m, t.clone())))
        .max()
}

/// One thing wrong, for a violation: the condition reason it stands for, the object
/// (`Kind/namespace/name`) and what to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub reason: &'static str,
    pub object: String,
    pub message: String,
}

/// A workload (namespace, kind, name) or a pod of none (kind `None`).
pub type Owner = (String, Option<Kind>, String);

/// Workloads (or pods of none) whose running proxies are outdated, with why.
pub type Outdated = BTreeMap<Owner, String>;

/// What the plan found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub status: UpgradesStatus,
    /// Running pods with a proxy, per (revision, version).
    pub proxies: BTreeMap<(String, String), usize>,
    pub findings: Vec<Finding>,
    /// Workloads (namespace, kind, name; a pod of no workload: kind `None`) whose running
    /// proxies are outdated: behind their istiod by more than the skew allowed, or of a
    /// revision that no longer runs. Proxies newer than their istiod are reported only.
    pub outdated: Outdated,
    /// The outdated workloads whose proxies' revision no longer runs, with that revision.
    pub orphaned: BTreeMap<Owner, String>,
    /// Running pods with a proxy, and those of them that are outdated.
    pub pods: usize,
    pub outdated_pods: usize,
    /// Live revisions no running proxy and no namespace uses: if pods that are not running
    /// name them, those pods alone keep them in use ([`idle_revisions`]).
    pub unused: BTreeSet<String>,
}

/// The revision a pod's proxy belongs to: the injector's (`sidecar.istio.io/status`), else
/// the pod's `istio.io/rev` label (a tag resolved to its revision), else `default`.
pub fn proxy_revision(pod: &PodFacts, revisions: &Revisions) -> String {
    if let Some(rev) = pod.sidecar.as_ref().and_then(|s| s.revision.clone()) {
        return rev;
    }
    match pod.labels.get(REVISION_LABEL) {
        Some(l) => revisions.resolve(l).unwrap_or(l).to_string(),
        None => "default".to_string(),
    }
}

fn object(namespace: &str, pod: &PodFacts) -> Owner {
    match &pod.owner {
        Some((kind, name)) => (namespace.to_string(), Some(*kind), name.clone()),
        None => (namespace.to_string(), None, pod.name.clone()),
    }
}

fn object_id((ns, kind, name): &Owner) -> String {
    format!("{}/{ns}/{name}", kind.map_or("Pod", Kind::as_str))
}

/// One namespace's running pods as the plan counts them (pure, from that namespace's pods
/// alone): an evaluation decides it once per namespace and keeps it while the namespace's pods
/// stay the same ([`super::PodMemos`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodPart {
    pods: usize,
    outdated_pods: usize,
    proxies: BTreeMap<(String, String), usize>,
    used: BTreeSet<String>,
    /// Per workload: (revision, proxy version, minors behind, pods).
    skewed: BTreeMap<Owner, (String, String, i64, usize)>,
    /// Per workload: (revision, pods).
    orphaned: BTreeMap<Owner, (String, usize)>,
    /// Per workload: (revision label, pods).
    unlabelled: BTreeMap<Owner, (String, usize)>,
}

/// Counts the running pods `pods` of namespace `ns` (pure).
pub fn pod_part<'a>(
    max_minor_skew: i32,
    revisions: &Revisions,
    ns: &str,
    pods: impl IntoIterator<Item = &'a PodFacts>,
) -> PodPart {
    let mut out = PodPart::default();
    let allowed = i64::from(max_minor_skew.max(0));
    for pod in pods {
        // Being deleted (a finished rollout's old pod still stopping): it needs no restart,
        // and counting it would restart a workload whose rollout already replaced it.
        if pod.placement.terminating {
            continue;
        }
        let Some(sidecar) = &pod.sidecar else {
            if let Some(rev) = pod.labels.get(REVISION_LABEL)
                && revisions.resolve(rev).is_none()
            {
                out.unlabelled
                    .entry(object(ns, pod))
                    .or_insert((rev.clone(), 0))
                    .1 += 1;
            }
            continue;
        };
        out.pods += 1;
        let rev = proxy_revision(pod, revisions);
        *out.proxies
            .entry((rev.clone(), sidecar.version.clone()))
            .or_default() += 1;
        if !out.used.contains(&rev) {
            out.used.insert(rev.clone());
        }
        if !revisions.any && !revisions.live.contains_key(&rev) {
            out.outdated_pods += 1;
            out.orphaned.entry(object(ns, pod)).or_insert((rev, 0)).1 += 1;
            continue;
        }
        if revisions.settling.contains(&rev) {
            // Its istiod rolls out (or is stuck): the version that serves is not known.
            continue;
        }
        let (Some((istiod, _)), Some(proxy)) = (
            istiod_version(revisions, &rev),
            Minor::parse(&sidecar.version),
        ) else {
            continue;
        };
        let behind = proxy.behind(istiod);
        if behind > allowed || behind < 0 {
            out.outdated_pods += 1;
            out.skewed
                .entry(object(ns, pod))
                .or_insert((rev, sidecar.version.clone(), behind, 0))
                .3 += 1;
        }
    }
    out
}

/// Plans the section (pure): `namespaces` are every namespace's (name, labels), `pods` every
/// running pod (namespace, facts). Every namespace's pods counted anew: what [`plan_parts`]
/// over kept parts must equal.
pub fn plan(
    max_minor_skew: i32,
    revisions: &Revisions,
    namespaces: &[(String, Arc<BTreeMap<String, String>>)],
    pods: &[(&str, &PodFacts)],
) -> Plan {
    let mut by_namespace: BTreeMap<&str, Vec<&PodFacts>> = BTreeMap::new();
    for (ns, pod) in pods {
        by_namespace.entry(ns).or_default().push(pod);
    }
    let parts: Vec<PodPart> = by_namespace
        .into_iter()
        .map(|(ns, pods)| pod_part(max_minor_skew, revisions, ns, pods))
        .collect();
    plan_parts(max_minor_skew, revisions, namespaces, &parts)
}

/// [`plan`] from each namespace's [`PodPart`] (pure).
pub fn plan_parts<'a>(
    max_minor_skew: i32,
    revisions: &Revisions,
    namespaces: &[(String, Arc<BTreeMap<String, String>>)],
    parts: impl IntoIterator<Item = &'a PodPart>,
) -> Plan {
    let mut out = Plan::default();
    let mut used: BTreeSet<String> = BTreeSet::new();
    for (rev, tags) in &revisions.versions {
        for v in tags {
            out.status.revisions.push(RevisionStatus {
                name: rev.clone(),
                version: v.clone(),
            });
        }
    }
    for (tag, rev) in &revisions.tags {
        out.status.tags.push(RevisionTagStatus {
            name: tag.clone(),
            revision: rev.clone(),
        });
        if !revisions.live.contains_key(rev) {
            out.findings.push(Finding {
                reason: reasons::TAG_WITHOUT_REVISION,
                object: format!("RevisionTag/{tag}"),
                message: format!(
                    "revision tag {tag} points at revision {rev}, whose istiod no longer runs: pods of namespaces labelled istio.io/rev={tag} get no sidecar; point the tag at a live revision (istioctl tag set {tag} --revision <revision> --overwrite) or remove it"
                ),
            });
        }
    }
    for (ns, labels) in namespaces {
        // Named only for a finding (most namespaces have none).
        let object = || format!("Namespace/{ns}");
        if labels.get(INJECTION_LABEL).map(String::as_str) == Some("enabled")
            && let Some(rev) = labels.get(REVISION_LABEL)
        {
            out.findings.push(Finding {
                reason: reasons::INJECTION_LABELS_CONFLICT,
                object: object(),
                message: format!(
                    "the namespace has both istio-injection=enabled and istio.io/rev={rev}: the default injector wins and istio.io/rev is ignored, so a revision upgrade by relabelling does nothing; remove one of the two labels"
                ),
            });
        }
        match namespace_injection(labels, revisions) {
            Injection::UnknownRevision(rev) => out.findings.push(Finding {
                reason: reasons::UNKNOWN_REVISION,
                object: object(),
                message: format!(
                    "{}; label the namespace with a live revision or tag",
                    revisions.unknown_message(&rev)
                ),
            }),
            Injection::On => {
                let label = match labels.get(INJECTION_LABEL) {
                    Some(_) => "default",
                    None => labels.get(REVISION_LABEL).map_or("default", String::as_str),
                };
                if let Some(rev) = revisions.resolve(label) {
                    used.insert(rev.to_string());
                }
            }
            Injection::Off => {}
        }
    }
    // The namespaces' pods, grouped by the workload that runs them (a workload's key names
    // its namespace, so the parts never share one).
    let mut skewed: BTreeMap<&Owner, &(String, String, i64, usize)> = BTreeMap::new();
    let mut orphaned: BTreeMap<&Owner, &(String, usize)> = BTreeMap::new();
    let mut unlabelled: BTreeMap<&Owner, &(String, usize)> = BTreeMap::new();
    let allowed = i64::from(max_minor_skew.max(0));
    for part in parts {
        out.pods += part.pods;
        out.outdated_pods += part.outdated_pods;
        for (k, n) in &part.proxies {
            match out.proxies.get_mut(k) {
                Some(total) => *total += n,
                None => {
                    out.proxies.insert(k.clone(), *n);
                }
            }
        }
        for rev in &part.used {
            if !used.contains(rev) {
                used.insert(rev.clone());
            }
        }
        skewed.extend(&part.skewed);
        orphaned.extend(&part.orphaned);
        unlabelled.extend(&part.unlabelled);
    }
    for (key, (rev, version, behind, n)) in skewed {
        let (behind, n) = (*behind, *n);
        let istiod = istiod_version(revisions, rev)
            .map(|v| v.1)
            .unwrap_or_default();
        let message = if behind < 0 {
            format!(
                "{n} running pod(s) have istio-proxy {version}, newer than istiod {rev} ({istiod}), which Istio does not support; upgrade the revision or label the namespace with a newer one. meshwarden never restarts these itself (after a rollback of istiod that would roll every workload in the middle of the incident): restart them (kubectl rollout restart) once istiod runs the version you want"
            )
        } else {
            format!(
                "{n} running pod(s) have istio-proxy {version}, {behind} minor version(s) behind istiod {rev} ({istiod}), more than maxMinorSkew {allowed}: restart them (kubectl rollout restart) to get the current proxy"
            )
        };
        // A proxy newer than its istiod is reported, never restarted.
        if behind > 0 {
            out.outdated.insert(key.clone(), message.clone());
        }
        out.findings.push(Finding {
            reason: reasons::PROXY_VERSION_SKEW,
            object: object_id(key),
            message,
        });
    }
    for (key, (rev, n)) in orphaned {
        out.orphaned.insert(key.clone(), rev.clone());
        let message = format!(
            "{n} running pod(s) have a proxy of revision {rev}, whose istiod no longer runs (revisions: {}): restart them so that their namespace's injector gives them a proxy of a live revision",
            live_list(revisions)
        );
        out.outdated.insert(key.clone(), message.clone());
        out.findings.push(Finding {
            reason: reasons::REVISION_NOT_RUNNING,
            object: object_id(key),
            message,
        });
    }
    for (key, (rev, n)) in unlabelled {
        out.findings.push(Finding {
            reason: reasons::UNKNOWN_REVISION,
            object: object_id(key),
            message: format!(
                "{n} running pod(s) without a sidecar: the pod label {}",
                revisions.unknown_message(rev)
            ),
        });
    }
    for ((revision, version), pods) in &out.proxies {
        out.status.proxies.push(ProxyCount {
            revision: revision.clone(),
            version: version.clone(),
            pods: i32::try_from(*pods).unwrap_or(i32::MAX),
        });
    }
    out.status.revisions.truncate(MAX_REVISIONS);
    out.status.tags.truncate(MAX_REVISIONS);
    out.status.proxies.truncate(MAX_PROXY_COUNTS);
    out.unused = revisions
        .live
        .keys()
        .filter(|r| !used.contains(*r))
        .cloned()
        .collect();
    out
}

fn live_list(revisions: &Revisions) -> String {
    let live: Vec<&str> = revisions.live.keys().map(String::as_str).collect();
    if live.is_empty() {
        "none".into()
    } else {
        live.join(", ")
    }
}

/// Pods pending, failed or finished that name `revision` (namespace/name).
pub type IdlePods = BTreeMap<String, Vec<String>>;

/// Revisions in `unused` (live, used by no running proxy and no namespace) that pods which are
/// not running still name (`idle`: revision -> those pods): findings (pure).
pub fn idle_revisions(unused: &BTreeSet<String>, idle: &IdlePods) -> Vec<Finding> {
    unused
        .iter()
        .filter_map(|rev| {
            let pods = idle.get(rev).filter(|p| !p.is_empty())?;
            Some(Finding {
                reason: reasons::REVISION_KEPT_BY_IDLE_PODS,
                object: format!("Revision/{rev}"),
                message: format!(
                    "revision {rev} is kept in use only by {} pod(s) that are not running ({}): no running proxy and no namespace uses it; delete those pods (or restart their workloads) before removing the revision",
                    pods.len(),
                    crate::status::messages::list(pods, 5)
                ),
            })
        })
        .collect()
}
