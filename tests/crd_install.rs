//! The CRD as users install it: `kubectl apply -f crds/`, `helm install` of the chart and
//! `kubectl apply --server-side -f deploy/install/meshwarden.yaml`, each read by the tool's own
//! YAML parser (YAML 1.1, where a plain `Off` is the boolean false). After each, the API server
//! accepts every value of every enum, every shipped and documented example, and rejects a
//! policy name the operator could not enforce.
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, PostParams};
use kube::discovery::ApiResource;
use serde_json::{Value, json};

#[path = "support/tools.rs"]
mod tools;
use tools::{helm, kubectl};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CRD: &str = "meshpolicies.meshwarden.io";

#[tokio::test]
async fn crd_installed_with_kubectl_and_helm_accepts_every_documented_value() {
    let plane = testplane::shared();
    let admin = plane.client().await;
    let kc = plane.kubeconfig.as_path();

    kubectl(kc, &["apply", "-f", &format!("{ROOT}/crds/{CRD}.yaml")]);
    check_installed(&admin, "kubectl apply -f crds/").await;
    remove_crd(&admin, kc).await;

    // istiod's namespace exists before meshwarden is installed (docs/operations.md): the
    // chart's Role for the mesh config lives there.
    kubectl(kc, &["create", "namespace", "istio-system"]);

    helm(
        kc,
        &[
            "install",
            "crd-check",
            &format!("{ROOT}/charts/meshwarden"),
            "-n",
            "crd-check",
            "--create-namespace",
        ],
    );
    check_installed(&admin, "helm install").await;
    helm(kc, &["uninstall", "crd-check", "-n", "crd-check"]);
    remove_crd(&admin, kc).await;

    kubectl(
        kc,
        &[
            "apply",
            "--server-side",
            "-f",
            &format!("{ROOT}/deploy/install/meshwarden.yaml"),
        ],
    );
    check_installed(&admin, "kubectl apply --server-side -f deploy/install/").await;
}

async fn remove_crd(admin: &kube::Client, kc: &Path) {
    kubectl(kc, &["delete", "crd", CRD, "--wait=true"]);
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let start = Instant::now();
    while crds.get_opt(CRD).await.unwrap().is_some() {
        assert!(start.elapsed() < Duration::from_secs(30), "CRD not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn check_installed(admin: &kube::Client, how: &str) {
    testplane::wait_crd_established(admin, CRD).await.unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let stored = crds.get(CRD).await.unwrap();
    let schema = |crd: &CustomResourceDefinition| {
        serde_json::to_value(
            &crd.spec.versions[0]
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema,
        )
        .unwrap()
    };

    // Every enum reached the server with the values the Rust types declare.
    let mut declared = Vec::new();
    enums(&schema(&meshwarden::api::crd()), "", &mut declared);
    let mut installed = Vec::new();
    enums(&schema(&stored), "", &mut installed);
    assert_eq!(installed, declared, "enums after {how}");
    assert!(declared.iter().any(|(_, v)| v.contains(&json!("Off"))));

    // Every value of every enum of the spec is accepted, each in a policy that uses it.
    let api = policies(admin);
    let mut n = 0;
    for (path, values) in declared.iter().filter(|(p, _)| p.starts_with(".spec.")) {
        for v in values {
            let mut spec = everything();
            assert!(
                set(&mut spec, &path[".spec.".len()..], v.clone()),
                "{path} is not in the test's policy: extend `everything()`"
            );
            accept(
                &api,
                &format!("enum-{n}"),
                spec,
                &format!("{path}={v} after {how}"),
            )
            .await;
            n += 1;
        }
    }
    assert!(n >= 20, "only {n} enum values");

    // The shipped examples and every policy in the documentation.
    for (name, spec) in examples() {
        accept(&api, &name, spec, &format!("{name} after {how}")).await;
    }

    // Names: 63 characters fit a label value; 64 do not, and the server says why.
    accept(&api, &"a".repeat(63), json!({}), "a 63-character name").await;
    let err = create(&api, &"a".repeat(64), json!({}))
        .await
        .expect_err("a 64-character name is rejected");
    assert!(
        err.contains("metadata.name") && err.contains("at most 63 characters"),
        "{err}"
    );
}

fn policies(client: &kube::Client) -> Api<DynamicObject> {
    let ar = ApiResource::erase::<meshwarden::api::MeshPolicy>(&());
    Api::all_with(client.clone(), &ar)
}

/// A server-side dry-run create: all of the server's validation, nothing stored.
async fn create(api: &Api<DynamicObject>, name: &str, spec: Value) -> Result<(), String> {
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "meshwarden.io/v1alpha1",
        "kind": "MeshPolicy",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    api.create(&pp, &obj)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

async fn accept(api: &Api<DynamicObject>, name: &str, spec: Value, what: &str) {
    if let Err(e) = create(api, name, spec.clone()).await {
        panic!("{what} rejected: {e}\nspec: {spec}");
    }
}

/// (path, values) of every `enum` in a schema, paths like `.spec.controlPlane.spread.nodes`
/// (`[]` for list items).
fn enums(schema: &Value, path: &str, out: &mut Vec<(String, Vec<Value>)>) {
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        out.push((path.to_string(), values.clone()));
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            enums(v, &format!("{path}.{k}"), out);
        }
    }
    if let Some(items) = schema.get("items") {
        enums(items, &format!("{path}[]"), out);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        for s in schema
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            enums(s, path, out);
        }
    }
}

/// Sets the field at `path` (as from [`enums`], relative to spec) when its parent exists.
fn set(spec: &mut Value, path: &str, value: Value) -> bool {
    let mut cur = spec;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let (key, items) = match part.strip_suffix("[]") {
            Some(k) => (k, true),
            None => (*part, false),
        };
        let last = i == parts.len() - 1;
        let Some(obj) = cur.as_object_mut() else {
            return false;
        };
        if last {
            if !obj.contains_key(key) {
                return false;
            }
            // A list of enum values (a set): the value alone.
            let value = if items {
                Value::Array(vec![value])
            } else {
                value
            };
            obj.insert(key.to_string(), value);
            return true;
        }
        let Some(next) = obj.get_mut(key) else {
            return false;
        };
        cur = if items {
            match next.get_mut(0) {
                Some(n) => n,
                None => return false,
            }
        } else {
            next
        };
    }
    false
}

/// A valid spec holding every field that has an enum.
fn everything() -> Value {
    let selector = json!({"matchExpressions": [{"key": "k", "operator": "Exists"}]});
    json!({
        "enforcement": "Audit",
        "controlPlane": {"enforcement": "Audit", "spread": {"nodes": "Preferred", "zones": "Preferred", "rebalance": "Off"}},
        "gateways": [{"name": "a", "namespace": "gw", "selector": selector, "enforcement": "Audit",
                      "spread": {"nodes": "Preferred", "zones": "Preferred", "rebalance": "Off"}}],
        "gatewayApi": {"enforcement": "Audit", "classes": [{"className": "istio-waypoint",
                       "replicas": {"min": 2, "max": 4}, "disruptionBudget": {"maxUnavailable": 1},
                       "spread": {"nodes": "Preferred", "zones": "Preferred"},
                       "resources": {"requests": {"cpu": "100m"}}}],
                       "gateways": [{"name": "public", "namespace": "edge",
                       "replicas": {"min": 2, "max": 4}, "disruptionBudget": {"minAvailable": 1},
                       "spread": {"nodes": "Required", "zones": "Preferred"},
                       "resources": {"limits": {"memory": "1Gi"}}}]},
        "sidecars": {"enforcement": "Audit", "namespaceSelector": selector,
                     "resources": {"requests": {"cpu": "100m"}}, "pacing": "Paced"},
        "mtls": {"enforcement": "Audit", "mode": "STRICT", "scope": "Namespaces",
                 "namespaceSelector": selector,
                 "overrides": "Report",
                 "exemptions": [{"namespaceSelector": selector, "selector": selector,
                                 "mode": "PERMISSIVE", "ports": [{"port": 80, "mode": "PERMISSIVE"}]},
                                {"namespace": "x", "mode": "PERMISSIVE"}]},
        "upgrades": {"enforcement": "Audit", "namespaceSelector": selector, "maxMinorSkew": 1,
                     "restartOutdated": false, "maxConcurrentRestarts": 2},
        "certificates": {"warnBefore": "720h",
                         "secrets": [{"namespace": "istio-system", "name": "cacerts"}]},
        "ambient": {"namespace": "istio-system",
                    "checks": ["Posture", "NodeCoverage", "Versions"]},
        "resilience": {"namespaceSelector": selector, "outlierDetection": "Required",
                       "connectionPoolLimits": "Off", "routeTimeouts": "Required",
                       "drainWithinGracePeriod": "Required"},
        "security": {"namespaceSelector": selector, "defaultDeny": "PerWorkload",
                     "l7Waypoint": "Required", "pluggedInCA": "Off",
                     "registryOnly": "Required"},
    })
}

/// (name, spec) of deploy/examples/*.yaml and of every YAML block in README.md and docs/ that
/// is a MeshPolicy or a MeshPolicy spec.
fn examples() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(format!("{ROOT}/deploy/examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        out.push((format!("example-{}", out.len()), doc["spec"].clone()));
    }
    assert!(out.len() >= 2, "deploy/examples has {} files", out.len());
    let mut docs = vec![format!("{ROOT}/README.md")];
    for e in std::fs::read_dir(format!("{ROOT}/docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            docs.push(p.display().to_string());
        }
    }
    docs.sort();
    let before = out.len();
    for d in docs {
        let text = std::fs::read_to_string(&d).unwrap();
        for block in text.split("```yaml\n").skip(1) {
            let block = block.split("```").next().unwrap_or_default();
            let Ok(doc) = serde_yaml::from_str::<Value>(block) else {
                continue;
            };
            // A whole MeshPolicy, or a snippet that is only its `spec`.
            let policy = doc["kind"] == "MeshPolicy";
            let snippet = doc.as_object().is_some_and(|o| o.len() == 1) && doc["spec"].is_object();
            if !policy && !snippet {
                continue;
            }
            let spec = doc["spec"].clone();
            out.push((format!("doc-{}", out.len()), spec));
        }
    }
    assert!(
        out.len() - before >= 3,
        "found {} documented policies",
        out.len() - before
    );
    out
}
