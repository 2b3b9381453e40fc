//! Which pods are clients that a STRICT scope would cut off.

use super::*;
use crate::istio::{Injection, Revisions, namespace_injection};
use crate::rules::sidecars::no_sidecar_reason;

/// Istio's own control plane and node agents, which never call workloads on their ports, and
/// the proxies istiod deploys itself, which speak mTLS or HBONE without a sidecar: waypoints
/// (`gateway.istio.io/managed: istio.io-mesh-controller`, `istio.io/waypoint-for`) and
/// gateways for Gateway API resources (`gateway.istio.io/managed`).
fn is_istio_infra(labels: &BTreeMap<String, String>) -> bool {
    matches!(
        labels.get("app").map(String::as_str),
        Some("istiod" | "ztunnel")
    ) || labels.get("k8s-app").map(String::as_str) == Some("istio-cni-node")
        || labels.contains_key("gateway.istio.io/managed")
        || labels.contains_key("istio.io/waypoint-for")
}

/// Pods that could no longer connect to a STRICT scope: no injected sidecar and not in ambient
/// mode, wherever they run (any of them can be a client of any namespace). Exempted namespaces
/// and workloads are left out, as are Istio's own infrastructure pods.
pub fn blockers(
    pods: &[PodInfo],
    namespaces: &[NamespaceInfo],
    exemptions: &[MtlsExemption],
) -> Vec<PodInfo> {
    let ns_labels: HashMap<&str, &BTreeMap<String, String>> = namespaces
        .iter()
        .map(|n| (n.name.as_str(), &n.labels))
        .collect();
    let unknown = BTreeMap::new();
    pods.iter()
        .filter(|p| !p.injected && !is_istio_infra(&p.labels))
        .filter(|p| {
            // A pod label overrides the namespace's (`istio.io/dataplane-mode: none` opts out).
            let ns = ns_labels.get(p.namespace.as_str()).copied();
            !crate::istio::ambient(ns.unwrap_or(&unknown), Some(&p.labels))
        })
        .filter(|p| {
            !exemptions.iter().any(|e| {
                e.namespace == p.namespace
                    && e.selector
                        .as_ref()
                        .is_none_or(|s| selector::matches(s, &p.labels))
            })
        })
        .cloned()
        .collect()
}

/// The condition text of a STRICT hold: how many pods, where, a few names, and the exact
/// exemptions to add (or `force`).
pub fn hold_message(
    blockers: &[PodInfo],
    namespaces: &[NamespaceInfo],
    revisions: &Revisions,
) -> String {
    let (count, places, snippet) = clients_text(blockers, namespaces, revisions);
    format!(
        "STRICT is held at PERMISSIVE: {count} pod(s) without a sidecar could no longer connect: {places}. To exempt them (they keep PERMISSIVE and lose access to STRICT workloads), add to the policy:\n  exemptions:\n{snippet}\nor set spec.mtls.force: true to move to STRICT anyway"
    )
}

/// The condition text of a scope that is STRICT already while pods without a sidecar run:
/// they are cut off. A STRICT scope is never weakened; the exemption is the decision that
/// serves their own namespace in plain text again and stops the report.
pub fn cut_off_message(
    blockers: &[PodInfo],
    namespaces: &[NamespaceInfo],
    revisions: &Revisions,
) -> String {
    let (count, places, snippet) = clients_text(blockers, namespaces, revisions);
    format!(
        "STRICT is in force and {count} pod(s) without a sidecar cannot connect to STRICT workloads: {places}. Give them a sidecar, or, to let plain-text clients reach their own namespace again and accept that they stay cut off from STRICT workloads, add to the policy:\n  exemptions:\n{snippet}"
    )
}

/// How many pods, where (a few names each), and one exemption line per namespace. Pods on
/// the host network are their own class: a sidecar can never capture their traffic.
fn clients_text(
    blockers: &[PodInfo],
    namespaces: &[NamespaceInfo],
    revisions: &Revisions,
) -> (usize, String, String) {
    let mut by_ns: BTreeMap<&str, Vec<&PodInfo>> = BTreeMap::new();
    for p in blockers {
        by_ns.entry(&p.namespace).or_default().push(p);
    }
    let ns_labels: HashMap<&str, &BTreeMap<String, String>> = namespaces
        .iter()
        .map(|n| (n.name.as_str(), &n.labels))
        .collect();
    let none = BTreeMap::new();
    let mut parts = Vec::new();
    for (ns, pods) in by_ns.iter().take(5) {
        let mut names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        let more = names.len().saturating_sub(3);
        let mut s = format!(
            "{ns} ({}: {}",
            names.len(),
            names[..names.len().min(3)].join(", ")
        );
        if more > 0 {
            s.push_str(&format!(" and {more} more"));
        }
        let labels = ns_labels.get(ns).copied().unwrap_or(&none);
        s.push_str(&restart_hint(pods, labels, revisions));
        s.push(')');
        parts.push(s);
    }
    if by_ns.len() > 5 {
        parts.push(format!("and {} more namespace(s)", by_ns.len() - 5));
    }
    let snippet: Vec<String> = by_ns
        .keys()
        .map(|ns| format!("  - namespace: {ns}"))
        .collect();
    (blockers.len(), parts.join(", "), snippet.join("\n"))
}

/// Whether restarting the pods of one namespace adds the sidecar: Istio's injector decides
/// per pod ([`no_sidecar_reason`]: the namespace's labels, then the pod's own opt-out or
/// opt-in), so a pod that opts out is never told a restart helps.
fn restart_hint(
    pods: &[&PodInfo],
    ns_labels: &BTreeMap<String, String>,
    revisions: &Revisions,
) -> String {
    let host = pods.iter().filter(|p| p.host_network).count();
    if host > 0 {
        return format!("; {host} on the host network, which no sidecar can capture");
    }
    let injection = namespace_injection(ns_labels, revisions);
    if let Injection::UnknownRevision(rev) = &injection {
        return format!(
            "; its istio.io/rev={rev} names no live revision or tag, so restarting them adds no sidecar"
        );
    }
    let mut sorted = pods.to_vec();
    sorted.sort_unstable_by_key(|p| &p.name);
    let why_not: Vec<&'static str> = sorted
        .iter()
        .filter_map(|p| no_sidecar_reason(ns_labels, &p.labels, &p.annotations, revisions))
        .collect();
    let adds = pods.len() - why_not.len();
    match (why_not.first(), adds) {
        (None, _) if injection == Injection::On => {
            "; injection is on there, so restarting them adds the sidecar".to_string()
        }
        (None, _) => "; injection is on for them, so restarting them adds the sidecar".to_string(),
        (Some(why), 0) if injection == Injection::On => format!(
            "; injection is on there but they opt out ({why}), so restarting them adds no sidecar"
        ),
        (Some(_), 0) => String::new(),
        (Some(why), _) => format!(
            "; restarting {adds} of them adds the sidecar, not the other {} ({why})",
            why_not.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::mtls::testutil::*;

    #[test]
    fn blockers_are_pods_without_sidecar_outside_ambient_and_exemptions() {
        let nss = [
            ns("plain", &[]),
            ns("injected", &[("istio-injection", "enabled")]),
            ns("ambient", &[("istio.io/dataplane-mode", "ambient")]),
            ns("exempt", &[]),
            ns("istio-system", &[]),
        ];
        let mut istiod = pod("istio-system", "istiod", false);
        istiod.labels.insert("app".into(), "istiod".into());
        let mut opted_out = pod("ambient", "opted-out", false);
        opted_out
            .labels
            .insert("istio.io/dataplane-mode".into(), "none".into());
        let pods = [
            pod("plain", "a", false),
            pod("plain", "b", true),
            pod("injected", "old", false),
            pod("injected", "new", true),
            pod("ambient", "z", false),
            opted_out,
            pod("exempt", "x", false),
            pod("plain", "skipped", false),
            istiod,
        ];
        let s = spec(
            "{mode: STRICT, exemptions: [{namespace: exempt}, {namespace: plain, selector: {matchLabels: {app: skipped}}}]}",
        );
        let b = blockers(&pods, &nss, &s.exemptions);
        let names: Vec<&str> = b.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["a", "old", "opted-out"]);

        let msg = hold_message(&b, &nss, &Revisions::any());
        assert!(msg.contains("3 pod(s)"), "{msg}");
        assert!(msg.contains("plain (1: a)"), "{msg}");
        assert!(msg.contains("restarting them adds the sidecar"), "{msg}");
        assert!(msg.contains("  exemptions:\n  - namespace: ambient\n  - namespace: injected\n  - namespace: plain"), "{msg}");
        assert!(msg.contains("force: true"), "{msg}");
    }

    #[test]
    fn waypoints_and_gateways_istiod_deploys_are_no_blockers_and_host_network_is_its_own_class() {
        let nss = [ns("app", &[]), ns("monitoring", &[])];
        let label = |mut p: PodInfo, k: &str, v: &str| {
            p.labels.insert(k.into(), v.into());
            p
        };
        let waypoint = label(
            label(
                pod("app", "waypoint", false),
                "istio.io/dataplane-mode",
                "none",
            ),
            "gateway.istio.io/managed",
            "istio.io-mesh-controller",
        );
        let waypoint_for = label(pod("app", "wp2", false), "istio.io/waypoint-for", "service");
        let gateway = label(
            pod("app", "gw", false),
            "gateway.istio.io/managed",
            "istio.io-gateway-controller",
        );
        let mut exporter = pod("monitoring", "node-exporter", false);
        exporter.host_network = true;
        let pods = [waypoint, waypoint_for, gateway, exporter];
        let b = blockers(&pods, &nss, &[]);
        let names: Vec<&str> = b.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["node-exporter"]);
        let msg = hold_message(&b, &nss, &Revisions::any());
        assert!(
            msg.contains(
                "monitoring (1: node-exporter; 1 on the host network, which no sidecar can capture)"
            ),
            "{msg}"
        );
    }

    #[test]
    fn the_restart_hint_follows_each_pods_own_opt_out() {
        let nss = [
            ns("on", &[("istio-injection", "enabled")]),
            ns("plain", &[]),
        ];
        let with = |mut p: PodInfo, labels: &[(&str, &str)], annotations: &[(&str, &str)]| {
            for (k, v) in labels {
                p.labels.insert(k.to_string(), v.to_string());
            }
            for (k, v) in annotations {
                p.annotations.insert(k.to_string(), v.to_string());
            }
            p
        };
        let out = with(
            pod("on", "job", false),
            &[("sidecar.istio.io/inject", "false")],
            &[],
        );
        let msg = hold_message(std::slice::from_ref(&out), &nss, &Revisions::any());
        assert!(!msg.contains("restarting them adds the sidecar"), "{msg}");
        assert!(
            msg.contains("on (1: job; injection is on there but they opt out (sidecar.istio.io/inject is false), so restarting them adds no sidecar)"),
            "{msg}"
        );
        // The annotation opts out as well.
        let by_annotation = with(
            pod("on", "cron", false),
            &[],
            &[("sidecar.istio.io/inject", "false")],
        );
        let msg = cut_off_message(&[by_annotation], &nss, &Revisions::any());
        assert!(msg.contains("restarting them adds no sidecar"), "{msg}");
        // Mixed: only the pods that do not opt out are promised a sidecar.
        let msg = hold_message(&[out, pod("on", "web", false)], &nss, &Revisions::any());
        assert!(
            msg.contains("on (2: job, web; restarting 1 of them adds the sidecar, not the other 1 (sidecar.istio.io/inject is false))"),
            "{msg}"
        );
        // A pod that opts in where the namespace does not inject.
        let opted_in = with(
            pod("plain", "api", false),
            &[("sidecar.istio.io/inject", "true")],
            &[],
        );
        let msg = hold_message(
            &[opted_in, pod("plain", "old", false)],
            &nss,
            &Revisions::any(),
        );
        assert!(
            msg.contains("plain (2: api, old; restarting 1 of them adds the sidecar, not the other 1 (injection is not on for the namespace or the pod))"),
            "{msg}"
        );
        let msg = hold_message(&[pod("plain", "old", false)], &nss, &Revisions::any());
        assert!(msg.contains("plain (1: old)"), "{msg}");
    }

    #[test]
    fn the_restart_hint_follows_the_injector_disabled_wins_over_a_revision() {
        let nss = [ns(
            "off",
            &[("istio-injection", "disabled"), ("istio.io/rev", "canary")],
        )];
        let msg = hold_message(&[pod("off", "a", false)], &nss, &Revisions::any());
        assert!(!msg.contains("restarting them adds the sidecar"), "{msg}");
    }
}
