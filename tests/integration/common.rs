//! Shared helpers: one real API server per test binary, a namespace and a label per test,
//! the Istio fixtures, an in-process operator, and the audit log.
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use meshwarden::api::MeshPolicy;
use meshwarden::context::Context;
use meshwarden::controller::{self, State};
use serde::Deserialize;
use tokio::sync::OnceCell;

/// An Istio fixture: the manifests of Istio's own Helm charts, rendered with `helm template`
/// from the pinned `istio.io/istio` module (see `testplane::istio::fixture` for the list).
pub fn istio_fixture(name: &str) -> String {
    testplane::istio::fixture(name).unwrap_or_else(|e| panic!("render Istio fixture {name}: {e}"))
}

/// Everything a test needs, with names unique to the test.
pub struct Env {
    pub client: Client,
    /// Label value that scopes this test's policies and its operator.
    pub id: String,
    /// The plane the test runs on (bare or full cluster).
    pub plane: &'static testplane::SharedPlane,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Starts (once per binary) the bare API server, installs the CRDs, and returns a test env.
pub async fn env(prefix: &str) -> Env {
    static CRDS: OnceCell<()> = OnceCell::const_new();
    env_on(testplane::shared(), &CRDS, prefix).await
}

/// Starts (once per binary) the full cluster (controllers, scheduler, nodes, Istio by Helm
/// with istiod), installs the MeshPolicy CRD, and returns a test env. Used by tests/cluster.rs,
/// which includes this module.
#[allow(dead_code)]
pub async fn cluster_env(prefix: &str) -> Env {
    static CRDS: OnceCell<()> = OnceCell::const_new();
    env_on(testplane::shared_cluster(), &CRDS, prefix).await
}

async fn env_on(
    plane: &'static testplane::SharedPlane,
    crds: &'static OnceCell<()>,
    prefix: &str,
) -> Env {
    let client = plane.client().await;
    crds.get_or_init(|| async {
        // Each test has its own runtime; install with a client of our own.
        let c = plane.client().await;
        let crd = meshwarden::api::crd_yaml().unwrap();
        testplane::apply_yaml(&c, &crd, &[])
            .await
            .expect("install MeshPolicy CRD");
        if plane.flavor == testplane::Flavor::Bare {
            // A cluster has Istio installed by Helm already.
            let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n";
            testplane::apply_yaml(&c, ns, &[])
                .await
                .expect("create istio-system");
            let base = istio_fixture("base.yaml");
            testplane::apply_yaml(&c, &base, &[])
                .await
                .expect("install Istio CRDs");
        }
    })
    .await;
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let id = format!("{prefix}-{}-{n}", std::process::id() % 10000);
    Env { client, id, plane }
}

/// A test env with a namespace `<id>-<suffix>` holding the objects of `kinds` from the Istio
/// fixture `file`, and an operator running for the test's policies.
pub async fn with_fixture(
    prefix: &str,
    suffix: &str,
    file: &str,
    kinds: &[&str],
) -> (Env, String, Operator) {
    let env = env(prefix).await;
    let ns = env.namespace(suffix, &[]).await;
    env.load_fixture(file, &ns, kinds).await;
    let op = env.start_operator().await;
    (env, ns, op)
}

impl Env {
    /// Creates a namespace named `<id>-<suffix>` with `labels`, returns its name.
    pub async fn namespace(&self, suffix: &str, labels: &[(&str, &str)]) -> String {
        let name = format!("{}-{suffix}", self.id);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_,_>>()}
        }))
        .unwrap();
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        name
    }

    /// Loads the namespaced objects of an Istio fixture into `namespace` (cluster-scoped
    /// objects and webhooks are left out). `kinds` limits what is loaded (empty: all).
    pub async fn load_fixture(&self, file: &str, namespace: &str, kinds: &[&str]) -> usize {
        // Fixture objects are written with Helm's field manager, as a Helm install would.
        apply_as(&self.client, &fixture_in(file, namespace, kinds), "helm").await
    }

    /// [`Env::load_fixture`] for manifests rendered by the test (`render_istiod`).
    pub async fn load_manifests(&self, text: &str, namespace: &str, kinds: &[&str]) -> usize {
        apply_as(&self.client, &manifests_in(text, namespace, kinds), "helm").await
    }

    /// Creates a MeshPolicy from YAML (its spec), labelled for this test's operator.
    pub async fn create_policy(&self, name: &str, spec_yaml: &str) -> MeshPolicy {
        let spec = serde_yaml::from_str(spec_yaml).expect("policy spec YAML");
        let mut p = MeshPolicy::new(&format!("{}-{name}", self.id), spec);
        p.metadata.labels = Some([("meshwarden-test".to_string(), self.id.clone())].into());
        Api::<MeshPolicy>::all(self.client.clone())
            .create(&PostParams::default(), &p)
            .await
            .expect("create MeshPolicy")
    }

    /// Runs an operator for this test's policies, as user `meshwarden-operator`.
    pub async fn start_operator(&self) -> Operator {
        self.start_operator_in(meshwarden::istio::DEFAULT_ISTIO_NAMESPACE)
            .await
    }

    /// [`Env::start_operator`] with istiod's namespace (`--istio-namespace`) set, so that a
    /// test's own mesh config is read.
    pub async fn start_operator_in(&self, istio_namespace: &str) -> Operator {
        self.start_operator_with(|ctx| ctx.istio_namespace = istio_namespace.to_string())
            .await
    }

    /// [`Env::start_operator`] with its context set by `tune` (a shorter grace period, say).
    pub async fn start_operator_with(&self, tune: impl FnOnce(&mut Context)) -> Operator {
        let client = self.plane.operator_client().await;
        let mut ctx = Context::new(client, Some(self.id.clone()));
        tune(&mut ctx);
        let state = Arc::new(State::new(
            ctx,
            Some(format!("meshwarden-test={}", self.id)),
        ));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let handle = tokio::spawn(async move {
            controller::run(st, async move {
                let _ = rx.await;
            })
            .await;
        });
        Operator {
            state,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Waits until `check` returns Some for the policy (polls), or panics after `secs`.
    pub async fn wait_policy<T>(
        &self,
        name: &str,
        secs: u64,
        check: impl Fn(&MeshPolicy) -> Option<T>,
    ) -> T {
        let api: Api<MeshPolicy> = Api::all(self.client.clone());
        let full = format!("{}-{name}", self.id);
        let start = Instant::now();
        loop {
            let p = api.get(&full).await.expect("get policy");
            if let Some(v) = check(&p) {
                return v;
            }
            if start.elapsed() > Duration::from_secs(secs) {
                panic!(
                    "policy {full} did not reach the expected state in {secs}s; status:\n{}",
                    serde_yaml::to_string(&p.status).unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the policy is Ready for its current generation and its status stopped
    /// changing (no write for a second): the operator has converged.
    pub async fn wait_settled(&self, name: &str, secs: u64) -> MeshPolicy {
        self.wait_stable(name, secs, true).await
    }

    /// Waits until the policy's status is for its current generation and stopped changing (no
    /// write for a second), Ready or not: the operator has converged on what it can do.
    #[allow(dead_code)]
    pub async fn wait_converged(&self, name: &str, secs: u64) -> MeshPolicy {
        self.wait_stable(name, secs, false).await
    }

    async fn wait_stable(&self, name: &str, secs: u64, need_ready: bool) -> MeshPolicy {
        let api: Api<MeshPolicy> = Api::all(self.client.clone());
        let full = format!("{}-{name}", self.id);
        let start = Instant::now();
        let mut last: Option<String> = None;
        loop {
            let p = api.get(&full).await.expect("get policy");
            let ready = (!need_ready || condition(&p, "Ready").is_some_and(|c| c.status == "True"))
                && p.status.as_ref().and_then(|s| s.observed_generation) == p.metadata.generation;
            let rv = p.metadata.resource_version.clone();
            if ready && last.is_some() && last == rv {
                return p;
            }
            last = if ready { rv } else { None };
            if start.elapsed() > Duration::from_secs(secs) {
                panic!(
                    "policy {full} did not settle in {secs}s; status:\n{}",
                    serde_yaml::to_string(&p.status).unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    }

    /// Deletes this test's policies and waits until they are gone (a test that holds a
    /// mesh-wide section leaves none behind for the next one).
    #[allow(dead_code)]
    pub async fn delete_policies(&self) {
        let api: Api<MeshPolicy> = Api::all(self.client.clone());
        let lp = kube::api::ListParams::default().labels(&format!("meshwarden-test={}", self.id));
        api.delete_collection(&Default::default(), &lp)
            .await
            .unwrap();
        eventually(60, "the test's policies gone", || async {
            api.list(&lp).await.ok()?.items.is_empty().then_some(())
        })
        .await;
    }

    pub fn policy_name(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    /// Replaces the spec of a test's policy with `yaml` in one JSON patch: no read-modify-write,
    /// which the operator's status writes in between would turn into a conflict.
    pub async fn set_spec(&self, name: &str, yaml: &str) {
        let spec: serde_json::Value = serde_yaml::from_str(yaml).expect("policy spec YAML");
        let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "replace", "path": "/spec", "value": spec}
        ]))
        .expect("JSON patch");
        Api::<MeshPolicy>::all(self.client.clone())
            .patch(
                &self.policy_name(name),
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Json::<()>(patch),
            )
            .await
            .expect("patch the MeshPolicy's spec");
    }

    /// The test's policy `<id>-<name>` (labelled for its operator) with `spec` as a manifest
    /// in a file of its own: (path, the file's guard).
    #[allow(dead_code)]
    pub fn policy_file(&self, name: &str, spec: &str) -> (String, TempPath) {
        let name = self.policy_name(name);
        let text = format!(
            "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata:\n  name: {name}\n  labels: {{meshwarden-test: {}}}\nspec:\n{}",
            self.id,
            spec.lines().map(|l| format!("  {l}\n")).collect::<String>()
        );
        let path = std::env::temp_dir().join(format!("{name}.yaml"));
        std::fs::write(&path, text).unwrap();
        (path.display().to_string(), TempPath(path))
    }

    /// One pass of Enforce over the test's policy `name`, as the controller's reconcile
    /// evaluates it (the policy must say Enforce), as user `meshwarden-operator`; no status,
    /// no Event.
    #[allow(dead_code)]
    pub async fn enforce_once(&self, name: &str) {
        let api: Api<MeshPolicy> = Api::all(self.client.clone());
        let policy = api.get(&self.policy_name(name)).await.unwrap();
        let client = self.plane.operator_client().await;
        let ctx =
            meshwarden::plan::one_pass_context(client, meshwarden::istio::DEFAULT_ISTIO_NAMESPACE)
                .await
                .unwrap();
        meshwarden::controller::evaluate(&ctx, &policy, &[&policy]).await;
    }

    /// Creates the test's policy `name` with `enforce_spec` (in Enforce), runs Enforce's first
    /// pass ([`Env::enforce_once`]) and checks that it wrote exactly the objects of `planned`
    /// (a `meshwarden plan -o json` output) in `namespaces`, each with the planned fields (the
    /// time of a restart, `restartedAt`, by being set: the plan's and Enforce's are two
    /// instants).
    #[allow(dead_code)]
    pub async fn enforce_as_planned(
        &self,
        name: &str,
        enforce_spec: &str,
        planned: &serde_json::Value,
        namespaces: &[&str],
    ) {
        self.create_policy(name, enforce_spec).await;
        self.enforce_once(name).await;
        let real: std::collections::BTreeSet<(String, String, String)> =
            writes_of(&self.plane.audit_events(), namespaces)
                .into_iter()
                .filter(|w| !w.dry_run)
                .map(|w| (w.resource, w.namespace, w.name))
                .collect();
        let compared = planned_and_live(&self.client, planned).await;
        let objects: std::collections::BTreeSet<(String, String, String)> =
            compared.iter().map(|(o, _, _)| o.clone()).collect();
        assert_eq!(objects.len(), compared.len());
        assert_eq!(objects, real, "plan == Enforce's first pass");
        for (object, mut planned, mut live) in compared {
            for v in [&mut planned, &mut live] {
                mask_template_annotations(v, &[meshwarden::rules::sidecars::RESTARTED_AT]);
            }
            assert_eq!(
                planned, live,
                "{object:?}: the plan's object is what Enforce wrote"
            );
        }
    }

    /// Writes the operator made so far on this env's plane to objects whose audit
    /// `objectRef` passes `object`. Used by the full-cluster tests.
    #[allow(dead_code)]
    pub fn operator_writes_to(&self, object: impl Fn(&serde_json::Value) -> bool) -> usize {
        self.plane
            .audit_events()
            .iter()
            .filter(|e| e["user"]["username"] == "meshwarden-operator")
            .filter(|e| e["stage"] == "ResponseComplete")
            .filter(|e| is_write(e))
            .filter(|e| object(&e["objectRef"]))
            .count()
    }
}

/// The kinds of an HA fixture: what meshwarden's HA rules read and write.
pub const HA_KINDS: &[&str] = &[
    "Deployment",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
];

/// The namespaced objects of an Istio fixture moved into `namespace`, as a YAML stream
/// (cluster-scoped objects and webhooks are left out). `kinds` limits what is kept (empty: all).
pub fn fixture_in(file: &str, namespace: &str, kinds: &[&str]) -> String {
    manifests_in(&istio_fixture(file), namespace, kinds)
}

/// [`fixture_in`] for a rendered YAML stream.
pub fn manifests_in(yaml: &str, namespace: &str, kinds: &[&str]) -> String {
    let mut out = String::new();
    for mut v in yaml_docs(yaml) {
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        if v["metadata"]["namespace"].is_null() {
            continue;
        }
        if !kinds.is_empty() && !kinds.contains(&kind.as_str()) {
            continue;
        }
        v["metadata"]["namespace"] = serde_json::json!(namespace);
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&v).unwrap());
    }
    out
}

fn yaml_docs(yaml: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| serde_json::Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Each object of a YAML stream with the API to write it, resolved by discovery.
async fn resolved(client: &Client, yaml: &str) -> Vec<(Api<DynamicObject>, DynamicObject)> {
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    yaml_docs(yaml)
        .into_iter()
        .map(|v| {
            let obj: DynamicObject = serde_json::from_value(v).unwrap();
            let tm = obj.types.clone().unwrap();
            let (g, ver) = tm
                .api_version
                .split_once('/')
                .unwrap_or(("", &tm.api_version));
            let gvk = kube::api::GroupVersionKind::gvk(g, ver, &tm.kind);
            let (ar, _) = discovery.resolve_gvk(&gvk).expect("known kind");
            let api = Api::namespaced_with(client.clone(), &obj.namespace().unwrap(), &ar);
            (api, obj)
        })
        .collect()
}

/// Creates the objects of a YAML stream with the given field manager (an `Update` entry in
/// `managedFields`, as Helm's library writes them).
#[allow(dead_code)]
pub async fn create_as(client: &Client, yaml: &str, manager: &str) -> usize {
    let pp = PostParams {
        field_manager: Some(manager.to_string()),
        ..Default::default()
    };
    let objects = resolved(client, yaml).await;
    for (api, obj) in &objects {
        api.create(&pp, obj)
            .await
            .unwrap_or_else(|e| panic!("create {}: {e}", obj.name_any()));
    }
    objects.len()
}

/// Server-side applies a YAML stream with the given field manager.
pub async fn apply_as(client: &Client, yaml: &str, manager: &str) -> usize {
    let objects = resolved(client, yaml).await;
    for (api, obj) in &objects {
        api.patch(
            &obj.name_any(),
            &PatchParams::apply(manager).force(),
            &Patch::Apply(obj),
        )
        .await
        .unwrap_or_else(|e| panic!("apply {}: {e}", obj.name_any()));
    }
    objects.len()
}

/// A running in-process operator; stopped on drop.
pub struct Operator {
    pub state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Operator {
    /// Writes the operator made so far.
    pub fn writes(&self) -> u64 {
        self.state.ctx.writes.get()
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// Writes (create/update/patch/delete) the API server recorded from the operator's user in
/// `namespace` (or, with `None`, on cluster-scoped objects named in `names`).
pub fn operator_writes(namespace: Option<&str>, names: &[&str]) -> Vec<serde_json::Value> {
    testplane::shared()
        .audit_events()
        .into_iter()
        .filter(|e| e["user"]["username"] == "meshwarden-operator")
        .filter(|e| e["stage"] == "ResponseComplete")
        .filter(|e| {
            let r = &e["objectRef"];
            match namespace {
                Some(ns) => r["namespace"] == ns,
                None => names.iter().any(|n| r["name"] == *n),
            }
        })
        .filter(is_write)
        .collect()
}

fn is_write(e: &serde_json::Value) -> bool {
    matches!(
        e["verb"].as_str(),
        Some("create" | "update" | "patch" | "delete" | "deletecollection")
    )
}

/// Plays the Deployment controller: the latest generation is observed and fully rolled out.
#[allow(dead_code)]
pub async fn complete_rollout(client: &Client, ns: &str, name: &str) {
    let api: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), ns);
    let d = api.get(name).await.unwrap();
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {
            "observedGeneration": d.metadata.generation,
            "replicas": replicas, "updatedReplicas": replicas,
            "readyReplicas": replicas, "availableReplicas": replicas,
        }})),
    )
    .await
    .unwrap();
}

/// A change freeze: a ValidatingAdmissionPolicy `<namespace>-freeze` denying the requests that
/// `rule` (a `resourceRules` entry in YAML flow style) matches in `namespace` for which CEL
/// `allowed` is false, with `message`. The API server loads admission policies
/// asynchronously: callers wait until it denies.
#[allow(dead_code)]
pub async fn freeze(client: &Client, namespace: &str, rule: &str, allowed: &str, message: &str) {
    let freeze = format!(
        "apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {namespace}-freeze}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - {rule}
  validations:
  - {{expression: {allowed:?}, message: {message}}}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {namespace}-freeze}}
spec:
  policyName: {namespace}-freeze
  validationActions: [Deny]
  matchResources:
    namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {namespace}}}}}
"
    );
    testplane::apply_yaml(client, &freeze, &[]).await.unwrap();
}

/// [`freeze`] of the UPDATEs of Deployments; returns once it denies the dry run of `probe` (a
/// merge patch) on Deployment `name`.
#[allow(dead_code)]
pub async fn freeze_deployments(
    client: &Client,
    namespace: &str,
    allowed: &str,
    message: &str,
    name: &str,
    probe: serde_json::Value,
) {
    let rule =
        "{apiGroups: [apps], apiVersions: [v1], operations: [UPDATE], resources: [deployments]}";
    freeze(client, namespace, rule, allowed, message).await;
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), namespace);
    eventually(20, "the freeze is in force", || async {
        let denied = deployments
            .patch(
                name,
                &PatchParams::default().dry_run(),
                &Patch::Merge(&probe),
            )
            .await
            .is_err();
        denied.then_some(())
    })
    .await;
}

/// Lifts [`freeze_deployments`].
#[allow(dead_code)]
pub async fn lift_freeze(client: &Client, namespace: &str) {
    Api::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding>::all(
        client.clone(),
    )
    .delete(&format!("{namespace}-freeze"), &Default::default())
    .await
    .unwrap();
}

/// Runs `meshwarden plan ARGS` (the binary) with `kubeconfig`; (exit code, stdout with any
/// stderr after it, seconds taken). Anything on stderr is an error (exit code 1).
#[allow(dead_code)]
pub fn run_plan(kubeconfig: &std::path::Path, args: &[&str]) -> (i32, String, f64) {
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshwarden"))
        .arg("plan")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("run meshwarden plan");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.is_empty() || out.status.code() == Some(1),
        "{stderr}"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &stderr,
        started.elapsed().as_secs_f64(),
    )
}

/// A file removed when dropped.
pub struct TempPath(pub std::path::PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One write of the operator's user in the audit log.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Write {
    pub verb: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// Sent with `dryRun=All`.
    pub dry_run: bool,
}

/// The writes of user `meshwarden-operator` in `namespaces`, from audit `events`.
#[allow(dead_code)]
pub fn writes_of(events: &[serde_json::Value], namespaces: &[&str]) -> Vec<Write> {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    events
        .iter()
        .filter(|e| e["user"]["username"] == "meshwarden-operator")
        .filter(|e| e["stage"] == "ResponseComplete")
        .filter(|e| is_write(e))
        .filter(|e| {
            namespaces
                .iter()
                .any(|ns| e["objectRef"]["namespace"] == *ns)
        })
        .map(|e| Write {
            verb: s(&e["verb"]),
            resource: s(&e["objectRef"]["resource"]),
            namespace: s(&e["objectRef"]["namespace"]),
            name: s(&e["objectRef"]["name"]),
            dry_run: e["requestURI"]
                .as_str()
                .is_some_and(|u| u.contains("dryRun=All")),
        })
        .collect()
}

/// The API resource of a kind meshwarden writes.
#[allow(dead_code)]
pub fn resource(kind: &str) -> String {
    match kind {
        "HorizontalPodAutoscaler" => "horizontalpodautoscalers".into(),
        "PodDisruptionBudget" => "poddisruptionbudgets".into(),
        "PeerAuthentication" => "peerauthentications".into(),
        k => format!("{}s", k.to_lowercase()),
    }
}

/// What Enforce writes of an object, read back or planned: its spec, labels and annotations
/// (without the revision the Deployment controller records after a rollout starts).
#[allow(dead_code)]
pub fn written(v: &serde_json::Value) -> serde_json::Value {
    let mut annotations = v["metadata"]["annotations"].clone();
    if let Some(a) = annotations.as_object_mut() {
        a.remove("deployment.kubernetes.io/revision");
    }
    serde_json::json!({
        "spec": v["spec"],
        "labels": v["metadata"]["labels"],
        "annotations": annotations,
    })
}

/// Replaces the values of the pod template annotations `keys` in a [`written`] object by
/// whether they are set.
fn mask_template_annotations(v: &mut serde_json::Value, keys: &[&str]) {
    if let Some(a) = v
        .pointer_mut("/spec/template/metadata/annotations")
        .and_then(serde_json::Value::as_object_mut)
    {
        for k in keys {
            if let Some(value) = a.get_mut(*k) {
                let set = value.as_str().is_some_and(|s| !s.is_empty());
                *value = serde_json::json!(if set { "<set>" } else { "<empty>" });
            }
        }
    }
}

/// The objects of a `meshwarden plan -o json` output and their writes read back: (resource,
/// namespace, name) of each change, with its planned (for a refused write, as read) and its
/// live [`written`] fields.
#[allow(dead_code)]
pub async fn planned_and_live(
    client: &Client,
    plan: &serde_json::Value,
) -> Vec<(
    (String, String, String),
    serde_json::Value,
    serde_json::Value,
)> {
    let mut out = Vec::new();
    for c in plan["changes"].as_array().into_iter().flatten() {
        let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
        let (kind, ns, name) = (s("kind"), s("namespace"), s("name"));
        let (group, version) = match kind.as_str() {
            "Deployment" | "StatefulSet" | "DaemonSet" => ("apps", "v1"),
            "HorizontalPodAutoscaler" => ("autoscaling", "v2"),
            "PodDisruptionBudget" => ("policy", "v1"),
            _ => ("security.istio.io", "v1"),
        };
        let ar = kube::discovery::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            group, version, &kind,
        ));
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
        let live = serde_json::to_value(api.get(&name).await.unwrap()).unwrap();
        // A refused write changes nothing: the object stays as the plan read it.
        let planned = match c["action"].as_str() {
            Some("refused") => &c["before"],
            _ => &c["after"],
        };
        out.push((
            (resource(&kind), ns, name),
            written(planned),
            written(&live),
        ));
    }
    out
}

/// Checks that a plan's output holds every line of `lines`.
#[allow(dead_code)]
pub fn assert_lists<S: AsRef<str>>(out: &str, lines: &[S]) {
    for line in lines.iter().map(AsRef::as_ref) {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
}

/// A ValidatingAdmissionPolicy `name` and its binding (same name, `binding` added to its spec):
/// UPDATEs (and `operations`) of `resource` in API group `group` are denied with `message`
/// unless `expression` holds.
#[allow(dead_code)]
pub async fn deny(
    client: &Client,
    name: &str,
    (group, resource, operations): (&str, &str, &str),
    (expression, message): (&str, &str),
    binding: &str,
) {
    let yaml = format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {{name: {name}}}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: [{group}]
      apiVersions: ["*"]
      operations: [{operations}]
      resources: [{resource}]
  validations:
  - expression: {expression:?}
    message: {message:?}
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {{name: {name}}}
spec:
  policyName: {name}
  validationActions: [Deny]
{binding}"#
    );
    testplane::apply_yaml(client, &yaml, &[])
        .await
        .expect("admission policy");
}

/// Deletes the ValidatingAdmissionPolicy `name` and its binding of the same name.
#[allow(dead_code)]
pub async fn delete_admission_policy(client: &Client, name: &str) {
    for kind in [
        "validatingadmissionpolicybindings",
        "validatingadmissionpolicies",
    ] {
        let ar = kube::core::ApiResource {
            group: "admissionregistration.k8s.io".into(),
            version: "v1".into(),
            api_version: "admissionregistration.k8s.io/v1".into(),
            kind: String::new(),
            plural: kind.into(),
        };
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let _ = api.delete(name, &Default::default()).await;
    }
}

/// Polls `f` until it returns Some, or panics with `what` after `secs`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_or_report(secs, what, f, || async {}).await
}

/// [`eventually`] that runs `report` (which prints what the test sees) before it panics.
pub async fn eventually_or_report<T, F, Fut, R, RFut>(secs: u64, what: &str, f: F, report: R) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<T>>,
    R: FnOnce() -> RFut,
    RFut: Future<Output = ()>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            report().await;
            panic!("timed out after {secs}s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The condition of `type_` in a policy's status.
pub fn condition<'a>(
    p: &'a MeshPolicy,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    p.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Renders Istio's istiod chart into `namespace` with the usual image values and `values`.
pub fn render_istiod(release: &str, namespace: &str, values: &[&str]) -> String {
    let mut all = testplane::istio::image_values();
    all.extend(values.iter().map(|v| v.to_string()));
    testplane::istio::template("istiod", release, namespace, &all)
        .unwrap_or_else(|e| panic!("render istiod {release}: {e}"))
}

/// Creates the cluster-scoped revision-tag webhook configurations (label `istio.io/tag`) of
/// rendered istiod manifests; returns their names (delete them at the end of the test).
pub async fn create_revision_tags(client: &Client, rendered: &str) -> Vec<String> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut names = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let v = serde_json::Value::deserialize(doc).unwrap();
        if v["kind"] != "MutatingWebhookConfiguration"
            || v["metadata"]["labels"]["istio.io/tag"].is_null()
        {
            continue;
        }
        let name = v["metadata"]["name"].as_str().unwrap().to_string();
        api.patch(
            &name,
            &PatchParams::apply("helm").force(),
            &Patch::Apply(&v),
        )
        .await
        .unwrap_or_else(|e| panic!("create revision tag {name}: {e}"));
        names.push(name);
    }
    names
}

/// Runs Helm 4 (Helm 3 when `v3`), as `testplane::istio` finds them, against the shared plane;
/// Err holds Helm's message. Istio's charts are at `testplane::istio::chart(name)`.
pub fn helm(v3: bool, args: &[&str]) -> Result<String, String> {
    let bin = if v3 {
        testplane::istio::helm3()
    } else {
        testplane::istio::helm()
    };
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    testplane::istio::run_helm(&bin, &args, Some(&testplane::shared().kubeconfig))
        .map_err(|e| e.to_string())
}

/// Sets the `minReplicas` of HPA `name` as `kubectl edit` would (field manager `kubectl-edit`).
pub async fn edit_hpa_min(
    hpas: &Api<k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler>,
    name: &str,
    min: i32,
) {
    hpas.patch(
        name,
        &PatchParams {
            field_manager: Some("kubectl-edit".into()),
            ..Default::default()
        },
        &Patch::Merge(serde_json::json!({"spec": {"minReplicas": min}})),
    )
    .await
    .unwrap_or_else(|e| panic!("edit HPA {name}: {e}"));
}

/// The resources of container `name` in a Deployment's pod template.
pub fn container_resources(
    d: &k8s_openapi::api::apps::v1::Deployment,
    name: &str,
) -> k8s_openapi::api::core::v1::ResourceRequirements {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.containers.iter().find(|c| c.name == name))
        .and_then(|c| c.resources.clone())
        .unwrap_or_default()
}

/// A quantity of a resources map, as written.
pub fn quantity(
    r: &Option<
        std::collections::BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
    >,
    key: &str,
) -> Option<String> {
    r.as_ref().and_then(|m| m.get(key)).map(|q| q.0.clone())
}

/// Pod anti-affinity terms (preferred and required) of a Deployment's pod template.
pub fn anti_affinity_terms(d: &k8s_openapi::api::apps::v1::Deployment) -> usize {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .map(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
                .map_or(0, Vec::len)
                + a.required_during_scheduling_ignored_during_execution
                    .as_ref()
                    .map_or(0, Vec::len)
        })
        .unwrap_or(0)
}

/// An istiod of revision `<env id>` at 1.31.0 as Helm installs it, its rollout completed, in a
/// namespace of its own, and a namespace `apps` labelled with that revision and the test's
/// label: (revision, istiod's namespace, apps namespace).
#[allow(dead_code)]
pub async fn istiod_at_1_31(env: &Env) -> (String, String, String) {
    let rev = env.id.clone();
    let istio = env.namespace("istio", &[]).await;
    let istiod = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: istiod-{rev}, namespace: {istio}, labels: {{app: istiod, istio.io/rev: {rev}}}}}\nspec:\n  selector: {{matchLabels: {{app: istiod, istio.io/rev: {rev}}}}}\n  template:\n    metadata: {{labels: {{app: istiod, istio.io/rev: {rev}}}}}\n    spec: {{containers: [{{name: discovery, image: docker.io/istio/pilot:1.31.0}}]}}\n"
    );
    apply_as(&env.client, &istiod, "helm").await;
    complete_rollout(&env.client, &istio, &format!("istiod-{rev}")).await;
    let apps = env
        .namespace(
            "apps",
            &[("meshwarden-test", &env.id), ("istio.io/rev", &rev)],
        )
        .await;
    (rev, istio, apps)
}
