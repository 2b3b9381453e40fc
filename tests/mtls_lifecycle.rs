//! The mutual TLS lifecycle of a policy on the full cluster (Istio installed by Helm, a real
//! istiod injecting sidecars, the real garbage collector), with what every namespace's clients
//! get checked on every change of a PeerAuthentication, not only between steps:
//!
//! the user's own mesh-wide `default` (PERMISSIVE) -> a policy STRICT with an exemption for
//! `legacy` (whose clients have no sidecar) in Audit -> Enforce -> a Job finishes and a waypoint
//! appears -> a Job pod without a sidecar that has not finished is reported as cut off ->
//! the user adds a PERMISSIVE override in `ext` (reported, not rewritten) -> the policy is
//! deleted and the garbage collector runs. From Enforce on, the namespaces the policy makes
//! STRICT are checked never to be weakened, until the override opens `ext` and until deletion.
//!
//! A binary of its own: the mesh-wide object in the root namespace applies to the whole
//! cluster, and the STRICT hold counts pods without a sidecar in every namespace, so this test
//! needs a cluster where no other test runs.

#[allow(dead_code)]
#[path = "integration/common.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use meshwarden::api::MeshPolicy;
use serde_json::json;
use testplane::mtls::{Mode, PeerAuthentication, effective_mode};

const ROOT: &str = "istio-system";

fn peer_auth_api(client: &Client) -> Api<DynamicObject> {
    let ar = ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: "PeerAuthentication".into(),
        plural: "peerauthentications".into(),
    };
    Api::all_with(client.clone(), &ar)
}

fn reduce(o: &DynamicObject) -> PeerAuthentication {
    PeerAuthentication::from_value(&serde_json::to_value(o).unwrap())
}

/// What the clients of each namespace need, and what every PeerAuthentication change is
/// checked against.
#[derive(Default)]
struct Invariants {
    /// Every namespace of the cluster.
    namespaces: Vec<String>,
    /// Namespaces whose clients need plain text: never STRICT.
    plain_text: BTreeSet<String>,
    /// Namespaces made STRICT by the policy: never weakened while it is in force (until the
    /// step that legitimately opens one, and until the policy is deleted).
    floor: BTreeSet<String>,
    /// After the policy is deleted: no namespace stricter than this.
    ceiling: Option<BTreeMap<String, Mode>>,
    /// Violations seen, with the modes at that moment.
    violations: Vec<String>,
    /// PeerAuthentication states checked.
    states: usize,
}

impl Invariants {
    fn modes(&self, all: &[PeerAuthentication]) -> BTreeMap<String, Mode> {
        self.namespaces
            .iter()
            .map(|ns| {
                let mode = effective_mode(all, ROOT, ns, &BTreeMap::new(), None);
                (ns.clone(), mode)
            })
            .collect()
    }

    fn check(&mut self, all: &[PeerAuthentication], when: &str) {
        self.states += 1;
        let modes = self.modes(all);
        for ns in &self.plain_text {
            if modes.get(ns) == Some(&Mode::Strict) {
                self.violations.push(format!(
                    "{when}: {ns} is STRICT although its clients need plain text; modes {modes:?}"
                ));
            }
        }
        for ns in &self.floor {
            if modes.get(ns) != Some(&Mode::Strict) {
                self.violations.push(format!(
                    "{when}: {ns} is no longer STRICT while the policy holds it so; modes {modes:?}"
                ));
            }
        }
        if let Some(ceiling) = &self.ceiling {
            for (ns, mode) in &modes {
                if ceiling.get(ns).is_some_and(|c| mode > c) {
                    self.violations.push(format!(
                        "{when}: {ns} became {mode:?}, stricter than {:?} before the policy was deleted",
                        ceiling[ns]
                    ));
                }
            }
        }
    }
}

/// Watches every PeerAuthentication and checks the invariants on each change.
fn watch_modes(client: &Client, inv: Arc<Mutex<Invariants>>) -> tokio::task::JoinHandle<()> {
    let api = peer_auth_api(client);
    tokio::spawn(async move {
        let mut known: BTreeMap<(String, String), PeerAuthentication> = BTreeMap::new();
        let mut initial: BTreeMap<(String, String), PeerAuthentication> = BTreeMap::new();
        let mut events = watcher(api, watcher::Config::default()).boxed();
        while let Some(ev) = events.next().await {
            let Ok(ev) = ev else { continue };
            let changed = match ev {
                watcher::Event::Init => {
                    initial.clear();
                    None
                }
                watcher::Event::InitApply(o) => {
                    let p = reduce(&o);
                    initial.insert((p.namespace.clone(), p.name.clone()), p);
                    None
                }
                watcher::Event::InitDone => {
                    known = std::mem::take(&mut initial);
                    Some("listed".to_string())
                }
                watcher::Event::Apply(o) => {
                    let p = reduce(&o);
                    let what = format!("{}/{} applied", p.namespace, p.name);
                    known.insert((p.namespace.clone(), p.name.clone()), p);
                    Some(what)
                }
                watcher::Event::Delete(o) => {
                    let p = reduce(&o);
                    known.remove(&(p.namespace.clone(), p.name.clone()));
                    Some(format!("{}/{} deleted", p.namespace, p.name))
                }
            };
            if let Some(when) = changed {
                let all: Vec<PeerAuthentication> = known.values().cloned().collect();
                inv.lock().unwrap().check(&all, &when);
            }
        }
    })
}

/// The PeerAuthentications now, read from the API server.
async fn peer_auths(client: &Client) -> Vec<DynamicObject> {
    peer_auth_api(client)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

/// After a step: the invariants hold now and held on every change since the start.
async fn step(client: &Client, inv: &Arc<Mutex<Invariants>>, name: &str) -> BTreeMap<String, Mode> {
    let all: Vec<PeerAuthentication> = peer_auths(client).await.iter().map(reduce).collect();
    let mut inv = inv.lock().unwrap();
    inv.check(&all, name);
    assert!(
        inv.violations.is_empty(),
        "after {name}: {:#?}",
        inv.violations
    );
    inv.modes(&all)
}

fn mode_of(o: &DynamicObject) -> String {
    o.data["spec"]["mtls"]["mode"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn managers(o: &DynamicObject) -> Vec<String> {
    o.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect()
}

/// A Deployment of one replica whose pod template has `labels` (plus `app: name`).
fn deployment(ns: &str, name: &str, labels: serde_json::Value) -> String {
    let mut labels = labels;
    labels["app"] = json!(name);
    serde_yaml::to_string(&json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]},
            },
        },
    }))
    .unwrap()
}

/// A Job whose pod opts out of injection (as Jobs in meshed namespaces usually do: a sidecar
/// would keep the pod from completing). kwok completes pods owned by a Job once they run.
fn job(ns: &str, name: &str) -> String {
    job_with(ns, name, json!({}))
}

/// [`job`] with `node_selector` on its pod.
fn job_with(ns: &str, name: &str, node_selector: serde_json::Value) -> String {
    serde_yaml::to_string(&json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "template": {
                "metadata": {"labels": {"sidecar.istio.io/inject": "false"}},
                "spec": {
                    "restartPolicy": "Never",
                    "nodeSelector": node_selector,
                    "containers": [{"name": "task", "image": "registry.example/task:1"}],
                },
            },
        },
    }))
    .unwrap()
}

async fn running_pod(client: &Client, ns: &str, app: &str) -> Pod {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    common::eventually(90, &format!("a running pod of {ns}/{app}"), || async {
        let list = pods
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
            .ok()?;
        list.items.into_iter().find(|p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && p.metadata.deletion_timestamp.is_none()
        })
    })
    .await
}

async fn job_succeeded(client: &Client, ns: &str, name: &str) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    common::eventually(90, &format!("Job {ns}/{name} succeeded"), || async {
        let j = jobs.get(name).await.ok()?;
        (j.status?.succeeded? >= 1).then_some(())
    })
    .await;
    // Its pod finished (the phase the mTLS rule's pod cache drops).
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&format!("job-name={name}")))
        .await
        .unwrap();
    assert!(
        list.items
            .iter()
            .all(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")),
        "Job {name}'s pods all Succeeded"
    );
}

fn mtls_condition(p: &MeshPolicy) -> Option<(String, String, String)> {
    let c = common::condition(p, "MutualTLS")?;
    let current = p.status.as_ref()?.observed_generation == p.metadata.generation;
    current.then(|| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits for the MutualTLS condition of the current generation to be True.
async fn wait_compliant(env: &common::Env, secs: u64) {
    env.wait_policy("mtls", secs, |p| {
        mtls_condition(p).filter(|(s, _, _)| s == "True")
    })
    .await;
}

/// Writes by the operator to PeerAuthentications so far.
fn operator_peer_auth_writes(env: &common::Env) -> usize {
    env.operator_writes_to(|o| o["resource"] == "peerauthentications")
}

#[tokio::test]
async fn mtls_lifecycle_never_cuts_off_plain_text_clients() {
    let started = Instant::now();
    let env = common::cluster_env("mtls").await;
    let c = &env.client;
    let shop = env
        .namespace("shop", &[("istio-injection", "enabled")])
        .await;
    let legacy = env.namespace("legacy", &[]).await;
    let batch = env
        .namespace("batch", &[("istio-injection", "enabled")])
        .await;
    let ext = env
        .namespace("ext", &[("istio-injection", "enabled")])
        .await;
    common::apply_as(c, &deployment(&shop, "cart", json!({})), "kubectl").await;
    common::apply_as(c, &deployment(&legacy, "client", json!({})), "kubectl").await;
    let cart = running_pod(c, &shop, "cart").await;
    assert!(
        cart.annotations().contains_key("sidecar.istio.io/status"),
        "istiod injected the shop pod"
    );
    let client = running_pod(c, &legacy, "client").await;
    assert!(!client.annotations().contains_key("sidecar.istio.io/status"));

    // The user's own mesh-wide default, PERMISSIVE, as Istio's docs have it.
    let default = format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: default, namespace: {ROOT}}}\nspec: {{mtls: {{mode: PERMISSIVE}}}}\n"
    );
    common::apply_as(c, &default, "kubectl").await;

    let namespaces = Api::<Namespace>::all(c.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    let inv = Arc::new(Mutex::new(Invariants {
        namespaces,
        plain_text: [legacy.clone()].into(),
        ..Default::default()
    }));
    let watch = watch_modes(c, inv.clone());
    let before = step(c, &inv, "the user's default").await;
    assert!(
        before.values().all(|m| *m == Mode::Permissive),
        "{before:?}"
    );

    // 1. The policy in Audit; a Job runs to completion meanwhile.
    let op = env.start_operator().await;
    let spec = format!(
        "enforcement: Audit\nmtls: {{mode: STRICT, scope: Mesh, exemptions: [{{namespace: {legacy}}}]}}\n"
    );
    env.create_policy("mtls", &spec).await;
    common::apply_as(c, &job(&batch, "migrate"), "kubectl").await;
    job_succeeded(c, &batch, "migrate").await;
    let (status, reason, message) = env
        .wait_policy("mtls", 30, |p| {
            mtls_condition(p).filter(|(_, _, m)| !m.contains(&batch))
        })
        .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "NonCompliant"),
        "{message}"
    );
    assert_eq!(operator_peer_auth_writes(&env), 0, "Audit writes nothing");
    let modes = step(c, &inv, "Audit").await;
    assert_eq!(modes, before);

    // 2. Enforce: the user's default is raised to STRICT in place, legacy is exempted.
    let policies: Api<MeshPolicy> = Api::all(c.clone());
    let full = env.policy_name("mtls");
    policies
        .patch(
            &full,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"enforcement": "Enforce"}})),
        )
        .await
        .unwrap();
    wait_compliant(&env, 30).await;
    let modes = step(c, &inv, "Enforce").await;
    assert_eq!(modes[&legacy], Mode::Permissive);
    for ns in [&shop, &batch, &ext] {
        assert_eq!(modes[ns], Mode::Strict, "{ns}: {modes:?}");
    }
    // From now on every PeerAuthentication change is also checked against this floor.
    inv.lock().unwrap().floor = [shop.clone(), batch.clone(), ext.clone()].into();
    let pas = peer_auths(c).await;
    let root_default = pas
        .iter()
        .find(|o| o.namespace().as_deref() == Some(ROOT) && o.name_any() == "default")
        .unwrap();
    assert_eq!(mode_of(root_default), "STRICT");

    // 3. Another Job finishes and istiod's waypoint appears: neither holds STRICT back nor is
    // reported as cut off.
    common::apply_as(c, &job(&batch, "report"), "kubectl").await;
    let waypoint_labels = json!({
        "sidecar.istio.io/inject": "false",
        "istio.io/dataplane-mode": "none",
        "gateway.istio.io/managed": "istio.io-mesh-controller",
        "gateway.networking.k8s.io/gateway-name": "waypoint",
    });
    common::apply_as(
        c,
        &deployment(&shop, "waypoint", waypoint_labels),
        "istio.io-mesh-controller",
    )
    .await;
    job_succeeded(c, &batch, "report").await;
    let waypoint = running_pod(c, &shop, "waypoint").await;
    assert!(
        !waypoint
            .annotations()
            .contains_key("sidecar.istio.io/status")
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_compliant(&env, 30).await;
    let p = policies.get(&full).await.unwrap();
    assert!(
        p.status
            .unwrap()
            .violations
            .iter()
            .all(|v| v.rule != "MutualTLS"),
        "no mTLS violation"
    );
    step(c, &inv, "a Job finished, a waypoint appeared").await;

    // 3b. A Job pod without a sidecar that has not finished is cut off by the STRICT mesh:
    // reported, with the exemption that would let it in and no promise that a restart adds
    // the sidecar (it opts out), while every namespace stays STRICT. kwok completes a Job's
    // pod as soon as it runs, so this pod is kept unscheduled (no node has the label): a
    // Pending pod becomes a client as soon as it starts, so it counts like a running one.
    common::apply_as(
        c,
        &job_with(
            &batch,
            "nightly",
            json!({"meshwarden.io/test-no-node": "true"}),
        ),
        "kubectl",
    )
    .await;
    let (status, _, message) = env
        .wait_policy("mtls", 30, |p| {
            mtls_condition(p).filter(|(_, r, m)| r == "ClientsCutOff" && m.contains(&batch))
        })
        .await;
    assert_eq!(status, "False", "{message}");
    let pods: Api<Pod> = Api::namespaced(c.clone(), &batch);
    let nightly = pods
        .list(&ListParams::default().labels("job-name=nightly"))
        .await
        .unwrap()
        .items;
    assert_eq!(nightly.len(), 1);
    let pod_name = nightly[0].name_any();
    for needle in [
        format!(
            "{batch} (1: {pod_name}; injection is on there but they opt out (sidecar.istio.io/inject is false), so restarting them adds no sidecar)"
        ),
        format!("  exemptions:\n  - namespace: {batch}"),
    ] {
        assert!(message.contains(&needle), "{needle:?} not in {message}");
    }
    let modes = step(c, &inv, "a Job pod without a sidecar is cut off").await;
    for ns in [&shop, &batch, &ext] {
        assert_eq!(modes[ns], Mode::Strict, "{ns}: {modes:?}");
    }
    Api::<Job>::namespaced(c.clone(), &batch)
        .delete("nightly", &DeleteParams::background())
        .await
        .unwrap();
    wait_compliant(&env, 60).await;
    step(c, &inv, "the cut-off Job deleted").await;

    // 4. The user opens ext to plain text (say for NodePort traffic): reported, not rewritten.
    {
        let mut inv = inv.lock().unwrap();
        inv.plain_text.insert(ext.clone());
        inv.floor.remove(&ext);
    }
    let open = format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: nodeport, namespace: {ext}}}\nspec: {{mtls: {{mode: PERMISSIVE}}}}\n"
    );
    common::apply_as(c, &open, "kubectl").await;
    let (_, _, message) = env
        .wait_policy("mtls", 30, |p| {
            mtls_condition(p).filter(|(s, r, _)| s == "False" && r == "OverridesReported")
        })
        .await;
    assert!(message.contains(&ext), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let override_now = peer_auths(c)
        .await
        .into_iter()
        .find(|o| o.namespace().as_deref() == Some(ext.as_str()) && o.name_any() == "nodeport")
        .unwrap();
    assert_eq!(mode_of(&override_now), "PERMISSIVE");
    assert_eq!(
        managers(&override_now),
        ["kubectl"],
        "not written by meshwarden"
    );
    let before_delete = step(c, &inv, "a PERMISSIVE override").await;
    assert_eq!(before_delete[&ext], Mode::Permissive);

    // 5. The policy is deleted; the garbage collector removes what the policy owns (a
    // ConfigMap owned by it shows when it has run).
    {
        let mut inv = inv.lock().unwrap();
        inv.ceiling = Some(before_delete.clone());
        inv.floor.clear();
    }
    let p = policies.get(&full).await.unwrap();
    let uid = p.metadata.uid.clone().unwrap();
    let owned: Vec<String> = peer_auths(c)
        .await
        .iter()
        .filter(|o| o.owner_references().iter().any(|r| r.uid == uid))
        .map(|o| format!("{}/{}", o.namespace().unwrap(), o.name_any()))
        .collect();
    assert!(
        owned.is_empty(),
        "everything here lets plain text in or is the user's: nothing owned: {owned:?}"
    );
    let canary: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "gc-canary", "namespace": shop,
            "ownerReferences": [{"apiVersion": "meshwarden.io/v1alpha1", "kind": "MeshPolicy",
                "name": full, "uid": p.metadata.uid}]},
    }))
    .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), &shop);
    cms.create(&Default::default(), &canary).await.unwrap();
    let pa_writes = operator_peer_auth_writes(&env);
    policies
        .delete(&full, &DeleteParams::default())
        .await
        .unwrap();
    common::eventually(
        60,
        "the garbage collector removed the policy's dependents",
        || async {
            cms.get_opt("gc-canary")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        },
    )
    .await;
    // Let the operator see the deletion too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = step(c, &inv, "the policy deleted").await;
    assert_eq!(
        operator_peer_auth_writes(&env),
        pa_writes,
        "deleting a policy writes nothing"
    );
    // What deletion leaves behind: the exemption of legacy (labelled with the policy), the
    // user's default at the mode meshwarden set, the user's override untouched.
    let pas = peer_auths(c).await;
    let labelled: Vec<String> = pas
        .iter()
        .filter(|o| o.labels().get("meshwarden.io/policy") == Some(&full))
        .map(|o| format!("{}/{}={}", o.namespace().unwrap(), o.name_any(), mode_of(o)))
        .collect();
    assert_eq!(labelled.len(), 1, "{labelled:?}");
    assert!(
        labelled[0].starts_with(&format!("{legacy}/meshwarden-exemption-")),
        "{labelled:?}"
    );
    assert!(labelled[0].ends_with("=PERMISSIVE"), "{labelled:?}");
    let root_default = pas
        .iter()
        .find(|o| o.namespace().as_deref() == Some(ROOT) && o.name_any() == "default")
        .unwrap();
    assert_eq!(mode_of(root_default), "STRICT");
    assert_eq!(after, before_delete);
    op.stop().await;
    watch.abort();
    let states = inv.lock().unwrap().states;
    assert!(states > 5, "the watch checked {states} states");
    eprintln!(
        "mtls lifecycle: {states} PeerAuthentication states checked, {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
