//! VirtualService HTTP routes that sidecars apply without a timeout: the reduction of a
//! VirtualService on arrival, and the per-namespace findings, pure.
//!
//! As istiod reads them: a VirtualService applies to sidecars when its `gateways` is empty
//! or names `mesh` (`getGatewayNames`, `initVirtualServices`, `pilot/pkg/model/push_context.go`)
//! and its `exportTo` (or, without one, the mesh's `defaultVirtualServiceExportTo`) is not
//! `~`; a route whose matches all name `gateways` without `mesh` is left out for sidecars
//! (`sourceMatchHTTP`, `pilot/pkg/networking/core/route/route.go`). A route without a
//! `timeout` gets none (`setTimeout`, same file: `Notimeout`, 0, which Envoy reads as
//! disabled), and `0s` is none too. Judged: routes that forward (`route`); a `redirect` or
//! `directResponse` answers without an upstream, and a `delegate` takes its delegate's
//! routes, which keep their own timeout or inherit the root's (`mergeHTTPRoute`,
//! `pilot/pkg/model/virtualservice.go`): a delegating route is judged by its own `timeout`
//! only when it sets one, and the delegate VirtualServices (no `hosts`) are not judged alone.

use kube::{CustomResource, ResourceExt};
use serde::{Deserialize, Serialize};

/// The gateway name that stands for every sidecar.
pub const MESH: &str = "mesh";

/// VirtualServices named per namespace in a violation; the rest are counted.
pub const NAMED: usize = 5;

/// Istio's VirtualService, only the fields the section reads. Istio installs the CRD.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "networking.istio.io",
    version = "v1",
    kind = "VirtualService",
    plural = "virtualservices",
    namespaced,
    schema = "disabled"
)]
pub struct VirtualServiceSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    #[serde(default, rename = "exportTo", skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<serde_json::Value>,
}

/// What the section keeps of a VirtualService: its HTTP routes that sidecars apply and that
/// forward, and how many of them set no timeout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    /// Routes judged (0 when the VirtualService does not apply to sidecars).
    pub judged: u16,
    /// Of them, those without a timeout.
    pub without_timeout: u16,
    /// No `exportTo`: the mesh's `defaultVirtualServiceExportTo` decides whether anyone
    /// sees it.
    pub default_export: bool,
}

fn applies_to_mesh(gateways: &[serde_json::Value]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g.as_str() == Some(MESH))
}

/// Whether a `timeout` is set to something other than zero.
fn has_timeout(route: &serde_json::Value) -> bool {
    route
        .get("timeout")
        .and_then(|t| t.as_str())
        .and_then(crate::istio::drain::duration_ms)
        .is_some_and(|ms| ms > 0)
}

/// Reduces a VirtualService to its [`Routes`].
pub fn reduce(vs: &VirtualService) -> Routes {
    let s = &vs.spec;
    let hidden = s.export_to.iter().any(|e| e == "~");
    let for_mesh = s.gateways.is_empty() || s.gateways.iter().any(|g| g == MESH);
    let mut out = Routes {
        default_export: s.export_to.is_empty(),
        ..Routes::default()
    };
    if hidden || !for_mesh || s.hosts.is_empty() {
        return out;
    }
    for route in &s.http {
        let matches = route
            .get("match")
            .and_then(|m| m.as_array())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let sidecars = matches.is_empty()
            || matches.iter().any(|m| {
                applies_to_mesh(
                    m.get("gateways")
                        .and_then(|g| g.as_array())
                        .map(Vec::as_slice)
                        .unwrap_or_default(),
                )
            });
        let forwards = route
            .get("route")
            .and_then(|r| r.as_array())
            .is_some_and(|r| !r.is_empty());
        let delegates = route.get("delegate").is_some_and(|d| !d.is_null());
        let timeout = has_timeout(route);
        if !sidecars || !(forwards || (delegates && timeout)) {
            continue;
        }
        out.judged = out.judged.saturating_add(1);
        if !timeout {
            out.without_timeout = out.without_timeout.saturating_add(1);
        }
    }
    out
}

/// A VirtualService's key and its routes.
pub fn key(vs: &VirtualService) -> (String, String) {
    (vs.namespace().unwrap_or_default(), vs.name_any())
}

/// A namespace's judged routes and the VirtualServices with routes lacking a timeout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Findings {
    pub judged: usize,
    pub without_timeout: usize,
    /// VirtualService name, routes without a timeout, routes judged.
    pub services: Vec<(String, u16, u16)>,
}

impl Findings {
    /// Adds one VirtualService of the namespace (`hidden_by_default`: the mesh's
    /// `defaultVirtualServiceExportTo` is `~`).
    pub fn add(&mut self, name: &str, r: &Routes, hidden_by_default: bool) {
        if r.default_export && hidden_by_default {
            return;
        }
        self.judged += usize::from(r.judged);
        if r.without_timeout > 0 {
            self.without_timeout += usize::from(r.without_timeout);
            self.services
                .push((name.to_string(), r.without_timeout, r.judged));
        }
    }

    /// The findings in words: `3 HTTP route(s) without a timeout in 2 VirtualService(s):
    /// reviews (2 of 3 routes), ratings (1 of 1)`.
    pub fn describe(&self) -> Option<String> {
        if self.without_timeout == 0 {
            return None;
        }
        let first: Vec<String> = self
            .services
            .iter()
            .take(NAMED)
            .map(|(n, w, j)| format!("{n} ({w} of {j} routes)"))
            .collect();
        let more = self.services.len().saturating_sub(NAMED);
        let more = if more > 0 {
            format!(", and {more} more")
        } else {
            String::new()
        };
        Some(format!(
            "{} HTTP route(s) without a timeout in {} VirtualService(s): {}{more}",
            self.without_timeout,
            self.services.len(),
            first.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vs(spec: serde_json::Value) -> Routes {
        let spec: VirtualServiceSpec = serde_json::from_value(spec).unwrap_or_default();
        reduce(&VirtualService::new("r", spec))
    }

    fn routes(judged: u16, without_timeout: u16) -> Routes {
        Routes {
            judged,
            without_timeout,
            default_export: true,
        }
    }

    #[test]
    fn mesh_routes_that_forward_without_a_timeout_are_counted() {
        let to = json!([{"destination": {"host": "reviews"}}]);
        let r = vs(json!({"hosts": ["reviews"], "http": [
            {"route": to},
            {"route": to, "timeout": "2s"},
            {"route": to, "timeout": "0s"},
            {"redirect": {"uri": "/x"}},
            {"directResponse": {"status": 503}},
        ]}));
        assert_eq!(r, routes(3, 2));
    }

    #[test]
    fn gateways_decide_whether_sidecars_apply_the_routes() {
        let to = json!([{"destination": {"host": "reviews"}}]);
        // Gateway only: sidecars do not apply it.
        let r = vs(
            json!({"hosts": ["reviews"], "gateways": ["shop/ingress"], "http": [{"route": to}]}),
        );
        assert_eq!(r, routes(0, 0));
        // Both: they do, except routes whose matches all name another gateway.
        let r = vs(
            json!({"hosts": ["reviews"], "gateways": ["shop/ingress", "mesh"], "http": [
                {"match": [{"gateways": ["shop/ingress"]}], "route": to},
                {"match": [{"gateways": ["shop/ingress"]}, {"uri": {"prefix": "/"}}], "route": to},
                {"match": [{"gateways": ["mesh"]}], "route": to, "timeout": "1s"},
            ]}),
        );
        assert_eq!(r, routes(2, 1));
    }

    #[test]
    fn hidden_and_delegate_virtual_services_are_not_judged() {
        let to = json!([{"destination": {"host": "reviews"}}]);
        let r = vs(json!({"hosts": ["reviews"], "exportTo": ["~"], "http": [{"route": to}]}));
        assert_eq!(r.judged, 0);
        // A delegate (no hosts) is judged through its root, not alone.
        assert_eq!(vs(json!({"http": [{"route": to}]})).judged, 0);
        // A delegating route counts when it sets the timeout its delegate's routes inherit.
        let r = vs(json!({"hosts": ["reviews"], "http": [
            {"delegate": {"name": "d"}},
            {"delegate": {"name": "d"}, "timeout": "3s"},
        ]}));
        assert_eq!(r, routes(1, 0));
        let mut f = Findings::default();
        f.add("a", &routes(3, 2), false);
        f.add("b", &routes(1, 0), false);
        f.add("c", &routes(1, 1), true);
        assert_eq!(f.judged, 4);
        assert_eq!(
            f.describe().as_deref(),
            Some("2 HTTP route(s) without a timeout in 1 VirtualService(s): a (2 of 3 routes)")
        );
    }
}
