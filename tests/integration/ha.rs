//! Control plane and gateway HA against the real Istio fixtures.
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::common::{self, Env, anti_affinity_terms, condition, container_resources, quantity};

const KINDS: &[&str] = common::HA_KINDS;

fn managers(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Vec<String> {
    meta.managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect()
}

async fn pdbs(client: &Client, ns: &str) -> Vec<PodDisruptionBudget> {
    Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

async fn wait_true(env: &Env, policy: &str, cond: &str) -> meshwarden::api::MeshPolicy {
    env.wait_policy(policy, 30, |p| {
        let c = condition(p, cond)?;
        (c.status == "True" && p.status.as_ref()?.observed_generation == p.metadata.generation)
            .then(|| p.clone())
    })
    .await
}

const FULL: &str = "replicas: {min: 2}, disruptionBudget: {maxUnavailable: 1}, spread: {nodes: Preferred, zones: Preferred}, resources: {requests: {cpu: 500m, memory: 2Gi}, limits: {memory: 4Gi}}";

#[tokio::test]
async fn default_istiod_with_hpa() {
    let env = common::env("hpa").await;
    let ns = env.namespace("istio", &[]).await;
    env.load_fixture("istiod-default.yaml", &ns, KINDS).await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!("enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, {FULL}}}"),
    )
    .await;
    let p = wait_true(&env, "p", "Ready").await;
    let c = condition(&p, "ControlPlaneHA").unwrap();
    assert!(
        c.message.contains("owns the replica count"),
        "{}",
        c.message
    );

    let hpa = Api::<HorizontalPodAutoscaler>::namespaced(env.client.clone(), &ns)
        .get("istiod")
        .await
        .unwrap();
    let hs = hpa.spec.unwrap();
    assert_eq!(hs.min_replicas, Some(2), "HPA minimum raised");
    assert_eq!(hs.max_replicas, 5, "HPA maximum untouched");

    let d = Api::<Deployment>::namespaced(env.client.clone(), &ns)
        .get("istiod")
        .await
        .unwrap();
    let ds = d.spec.clone().unwrap();
    assert_eq!(
        ds.replicas,
        Some(1),
        "the server's default stays: the HPA owns the count"
    );
    let ours = d
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .find(|m| m.manager.as_deref() == Some("meshwarden"))
        .expect("meshwarden manages some Deployment fields");
    let fields = ours.fields_v1.as_ref().unwrap().0.clone();
    assert!(
        fields["f:spec"].get("f:replicas").is_none(),
        "meshwarden must not own spec.replicas: {fields}"
    );
    let tpl = ds.template.spec.unwrap();
    let anti = tpl.affinity.unwrap().pod_anti_affinity.unwrap();
    let pref = anti
        .preferred_during_scheduling_ignored_during_execution
        .unwrap();
    assert!(
        pref.iter()
            .any(|t| t.pod_affinity_term.topology_key == "kubernetes.io/hostname")
    );
    let tsc = tpl.topology_spread_constraints.unwrap();
    assert!(
        tsc.iter()
            .any(|t| t.topology_key == "topology.kubernetes.io/zone"
                && t.when_unsatisfiable == "ScheduleAnyway")
    );
    let discovery = tpl
        .containers
        .iter()
        .find(|c| c.name == "discovery")
        .unwrap();
    let res = discovery.resources.clone().unwrap();
    assert_eq!(res.requests.unwrap()["cpu"].0, "500m");
    assert_eq!(res.limits.unwrap()["memory"].0, "4Gi");
    assert!(
        discovery.image.is_some(),
        "the rest of the container is kept"
    );

    let budgets = pdbs(&env.client, &ns).await;
    assert_eq!(budgets.len(), 1, "one PDB created");
    assert_eq!(
        budgets[0].spec.as_ref().unwrap().max_unavailable,
        Some(IntOrString::Int(1))
    );
    assert_eq!(
        budgets[0].labels()["app.kubernetes.io/managed-by"],
        "meshwarden"
    );
    assert_eq!(
        budgets[0].owner_references()[0].name,
        env.policy_name("p"),
        "owned by the policy"
    );

    // Converged: another reconcile, triggered by touching the policy, writes nothing at all.
    let settled = env.wait_settled("p", 20).await;
    assert_eq!(
        settled.status.as_ref().unwrap().corrected,
        1,
        "one target corrected once, kept after converging"
    );
    let counted = op.writes();
    let before = common::operator_writes(Some(&ns), &[]).len();
    let status_before = common::operator_writes(None, &[&env.policy_name("p")]).len();
    Api::<meshwarden::api::MeshPolicy>::all(env.client.clone())
        .patch(
            &env.policy_name("p"),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"touch": "1"}}})),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        common::operator_writes(Some(&ns), &[]).len(),
        before,
        "no write to the mesh"
    );
    assert_eq!(
        common::operator_writes(None, &[&env.policy_name("p")]).len(),
        status_before,
        "no status write either"
    );
    assert!(
        before >= 3,
        "HPA, Deployment and PDB were written ({before})"
    );
    assert_eq!(
        op.writes(),
        counted,
        "the operator's own write counter agrees"
    );
    op.stop().await;
}

#[tokio::test]
async fn fixed_replicas_are_raised_and_drift_is_corrected() {
    let env = common::env("fixed").await;
    let ns = env.namespace("istio", &[]).await;
    env.load_fixture("istiod-fixed-replicas.yaml", &ns, KINDS)
        .await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!("enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, {FULL}}}"),
    )
    .await;
    wait_true(&env, "p", "Ready").await;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let replicas = |d: &Deployment| d.spec.as_ref().and_then(|s| s.replicas);
    assert_eq!(replicas(&deployments.get("istiod").await.unwrap()), Some(2));
    let c = condition(
        &env.wait_policy("p", 5, |p| Some(p.clone())).await,
        "ControlPlaneHA",
    )
    .unwrap()
    .clone();
    assert!(
        c.reason == "FieldOwnedByOther" || c.reason == "Compliant" || c.reason == "Corrected",
        "{c:?}"
    );

    // Somebody scales istiod down: it comes back.
    deployments
        .patch(
            "istiod",
            &PatchParams::apply("someone").force(),
            &Patch::Apply(serde_json::json!({
                "apiVersion": "apps/v1", "kind": "Deployment", "spec": {"replicas": 1}
            })),
        )
        .await
        .unwrap();
    common::eventually(10, "replicas restored", || async {
        (replicas(&deployments.get("istiod").await.unwrap()) == Some(2)).then_some(())
    })
    .await;

    // Somebody deletes the PDB: it comes back.
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &ns);
    budgets
        .delete("istiod-meshwarden", &Default::default())
        .await
        .unwrap();
    common::eventually(10, "PDB recreated", || async {
        budgets
            .get_opt("istiod-meshwarden")
            .await
            .unwrap()
            .map(|_| ())
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn hpa_edit_is_corrected_and_a_fight_is_detected() {
    let env = common::env("fight").await;
    let ns = env.namespace("istio", &[]).await;
    env.load_fixture("istiod-default.yaml", &ns, KINDS).await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!("enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, replicas: {{min: 3}}}}"),
    )
    .await;
    wait_true(&env, "p", "Ready").await;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), &ns);
    let min = |h: &HorizontalPodAutoscaler| h.spec.as_ref().and_then(|s| s.min_replicas);
    // Someone keeps lowering the HPA minimum: after a few corrections meshwarden stops.
    for round in 0..6 {
        hpas.patch("istiod", &PatchParams::apply("autoscaler-tuner").force(), &Patch::Apply(serde_json::json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "spec": {"minReplicas": 1, "maxReplicas": 5, "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "istiod"}}
        })))
        .await
        .unwrap();
        let corrected = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if min(&hpas.get("istiod").await.unwrap()) == Some(3) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .is_ok();
        if round == 0 {
            assert!(corrected, "an edited HPA is corrected");
        }
        if !corrected {
            break;
        }
    }
    let p = env
        .wait_policy("p", 15, |p| {
            let c = condition(p, "ControlPlaneHA")?;
            (c.reason == "FightDetected").then(|| p.clone())
        })
        .await;
    assert!(
        condition(&p, "ControlPlaneHA")
            .unwrap()
            .message
            .contains("stopped rewriting")
    );
    assert_eq!(
        min(&hpas.get("istiod").await.unwrap()),
        Some(1),
        "the other writer's value stays"
    );
    op.stop().await;
}

/// The chart's PDB (`minAvailable: 1`, owned by Helm) is adopted, never duplicated, and keeps
/// its form: `maxUnavailable: 1` has no equivalent `minAvailable` over the HPA's range 2..5, so
/// it is reported and left alone (switching the form breaks `helm upgrade`).
#[tokio::test]
async fn chart_pdb_is_adopted_not_duplicated() {
    let (env, ns, op) = common::with_fixture("adopt", "istio", "istiod-ha.yaml", KINDS).await;
    env.create_policy("p", &format!("enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, replicas: {{min: 2}}, disruptionBudget: {{maxUnavailable: 1}}}}"))
        .await;
    let p = env
        .wait_policy("p", 30, |p| {
            (condition(p, "ControlPlaneHA")?.reason == "CannotCorrect").then(|| p.clone())
        })
        .await;
    let budgets = pdbs(&env.client, &ns).await;
    assert_eq!(
        budgets.len(),
        1,
        "no second PDB: {:?}",
        budgets.iter().map(|b| b.name_any()).collect::<Vec<_>>()
    );
    let b = &budgets[0];
    assert_eq!(b.name_any(), "istiod");
    let s = b.spec.clone().unwrap();
    assert_eq!(s.min_available, Some(IntOrString::Int(1)), "form kept");
    assert_eq!(s.max_unavailable, None);
    assert!(!managers(&b.metadata).contains(&"meshwarden".to_string()));
    let v = &p.status.unwrap().violations;
    assert!(
        v.iter().any(|v| v.object.ends_with("/istiod")
            && v.message.contains("no equivalent minAvailable at 2..5")
            && v.message.contains("helm owns")),
        "{v:?}"
    );
    op.stop().await;
}

#[tokio::test]
async fn default_and_canary_revisions_are_both_handled() {
    let env = common::env("canary").await;
    let ns = env.namespace("istio", &[]).await;
    env.load_fixture("istiod-default.yaml", &ns, KINDS).await;
    env.load_fixture("istiod-revision-canary.yaml", &ns, KINDS)
        .await;
    let op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!("enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, {FULL}}}"),
    )
    .await;
    let p = wait_true(&env, "p", "Ready").await;
    assert_eq!(p.status.as_ref().unwrap().targets, 2);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), &ns);
    for name in ["istiod", "istiod-canary"] {
        assert_eq!(
            hpas.get(name).await.unwrap().spec.unwrap().min_replicas,
            Some(2),
            "{name}"
        );
    }
    let names: Vec<String> = pdbs(&env.client, &ns)
        .await
        .iter()
        .map(|b| b.name_any())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"istiod-canary-meshwarden".to_string()));
    op.stop().await;
}

#[tokio::test]
async fn gateway_rules_are_applied() {
    let env = common::env("gw").await;
    let ns = env.namespace("ingress", &[]).await;
    env.load_fixture("gateway-ingress.yaml", &ns, KINDS).await;
    let op = env.start_operator().await;
    env.create_policy("p", &format!(
        "enforcement: Enforce\ngateways: [{{name: ingress, namespace: {ns}, selector: {{matchLabels: {{istio: ingressgateway}}}}, replicas: {{min: 3}}, disruptionBudget: {{maxUnavailable: 1}}, spread: {{nodes: Required, zones: Preferred}}, resources: {{requests: {{cpu: 200m, memory: 256Mi}}, limits: {{memory: 1Gi}}}}}}]"
    ))
    .await;
    wait_true(&env, "p", "Ready").await;
    let hpa = Api::<HorizontalPodAutoscaler>::namespaced(env.client.clone(), &ns)
        .get("istio-ingressgateway")
        .await
        .unwrap();
    assert_eq!(hpa.spec.unwrap().min_replicas, Some(3));
    let d = Api::<Deployment>::namespaced(env.client.clone(), &ns)
        .get("istio-ingressgateway")
        .await
        .unwrap();
    let tpl = d.spec.unwrap().template.spec.unwrap();
    let req = tpl
        .affinity
        .unwrap()
        .pod_anti_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap();
    assert!(
        req.iter()
            .any(|t| t.topology_key == "kubernetes.io/hostname")
    );
    let proxy = tpl
        .containers
        .iter()
        .find(|c| c.name == "istio-proxy")
        .unwrap();
    assert_eq!(
        proxy.resources.clone().unwrap().requests.unwrap()["memory"].0,
        "256Mi"
    );
    assert_eq!(pdbs(&env.client, &ns).await.len(), 1);
    op.stop().await;
}

/// A user's PDB with maxUnavailable 0: Audit reports and leaves it; Enforce fixes it.
#[tokio::test]
async fn blocking_user_pdb_reported_in_audit_fixed_in_enforce() {
    let env = common::env("block").await;
    let ns = env.namespace("istio", &[]).await;
    env.load_fixture("istiod-fixed-replicas.yaml", &ns, KINDS)
        .await;
    common::apply_as(&env.client, &format!(
        "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata: {{name: user-pdb, namespace: {ns}}}\nspec: {{maxUnavailable: 0, selector: {{matchLabels: {{app: istiod}}}}}}\n"
    ), "kubectl").await;
    let op = env.start_operator().await;
    env.create_policy("p", &format!("enforcement: Audit\ncontrolPlane: {{namespace: {ns}, replicas: {{min: 2}}, disruptionBudget: {{maxUnavailable: 1}}}}"))
        .await;
    let p = env
        .wait_policy("p", 30, |p| {
            let c = condition(p, "ControlPlaneHA")?;
            (c.reason == "BudgetBlocksDrain").then(|| p.clone())
        })
        .await;
    let status = p.status.clone().unwrap();
    assert!(
        status
            .violations
            .iter()
            .any(|v| v.object.ends_with("/user-pdb") && v.message.contains("node drains block")),
        "{:?}",
        status.violations
    );
    assert!(status.violations.iter().all(|v| v.action == "Reported"));
    // Audit wrote nothing: no object in the namespace carries the meshwarden manager.
    assert!(common::operator_writes(Some(&ns), &[]).is_empty());
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &ns);
    let b = budgets.get("user-pdb").await.unwrap();
    assert!(!managers(&b.metadata).contains(&"meshwarden".to_string()));
    let d = Api::<Deployment>::namespaced(env.client.clone(), &ns)
        .get("istiod")
        .await
        .unwrap();
    assert!(!managers(&d.metadata).contains(&"meshwarden".to_string()));

    // Switch to Enforce: the budget is fixed in place.
    Api::<meshwarden::api::MeshPolicy>::all(env.client.clone())
        .patch(
            &env.policy_name("p"),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"enforcement": "Enforce"}})),
        )
        .await
        .unwrap();
    let p = wait_true(&env, "p", "Ready").await;
    let b = budgets.get("user-pdb").await.unwrap();
    assert_eq!(b.spec.unwrap().max_unavailable, Some(IntOrString::Int(1)));
    assert_eq!(pdbs(&env.client, &ns).await.len(), 1);
    let c = condition(&p, "ControlPlaneHA").unwrap();
    assert_eq!(c.reason, "FieldOwnedByOther", "{c:?}");
    assert!(
        c.message.contains("kubectl"),
        "names the previous owner: {}",
        c.message
    );
    op.stop().await;
}

/// A change freeze (a ValidatingAdmissionPolicy denying updates to the `istiod` Deployment):
/// the canary revision is still corrected, the deviations are still reported, and the condition
/// names the object that could not be written and the API server's message.
#[tokio::test]
async fn a_denied_write_affects_only_its_own_target() {
    let (env, ns, op) = common::with_fixture("deny", "istio", "istiod-default.yaml", KINDS).await;
    env.load_fixture("istiod-revision-canary.yaml", &ns, KINDS)
        .await;
    common::freeze_deployments(
        &env.client,
        &ns,
        "object.metadata.name != 'istiod'",
        "change freeze on istiod",
        "istiod",
        serde_json::json!({"metadata": {"labels": {"probe": "1"}}}),
    )
    .await;
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    env.create_policy(
        "p",
        &format!("enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, {FULL}}}"),
    )
    .await;
    let p = env
        .wait_policy("p", 30, |p| {
            let c = condition(p, "ControlPlaneHA")?;
            (c.reason == "WriteFailed").then(|| p.clone())
        })
        .await;
    let c = condition(&p, "ControlPlaneHA").unwrap();
    assert_eq!(c.status, "False");
    assert!(
        c.message.contains(&format!("Deployment/{ns}/istiod"))
            && c.message.contains("change freeze on istiod"),
        "names the object and the API server's message: {}",
        c.message
    );
    let status = p.status.clone().unwrap();
    assert!(status.violation_count > 0, "deviations are still reported");
    assert!(
        status
            .violations
            .iter()
            .any(|v| v.object == format!("Deployment/{ns}/istiod") && v.action == "Failed"),
        "{:?}",
        status.violations
    );
    // The canary revision was corrected all the same, and so were istiod's other objects:
    // only its Deployment is frozen.
    let corrected = |name: &'static str| {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get(name).await.unwrap();
            let cpu = quantity(&container_resources(&d, "discovery").requests, "cpu");
            (anti_affinity_terms(&d) == 1 && cpu.as_deref() == Some("500m")).then_some(())
        }
    };
    assert!(
        corrected("istiod-canary").await.is_some(),
        "istiod-canary was corrected"
    );
    assert!(corrected("istiod").await.is_none(), "istiod is frozen");
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), &ns);
    let hpa_min = |name: &'static str| {
        let hpas = hpas.clone();
        async move { hpas.get(name).await.unwrap().spec.unwrap().min_replicas }
    };
    assert_eq!(hpa_min("istiod-canary").await, Some(2));
    assert_eq!(
        hpa_min("istiod").await,
        Some(2),
        "istiod's own HPA is raised"
    );
    let names: Vec<String> = pdbs(&env.client, &ns)
        .await
        .iter()
        .map(|b| b.name_any())
        .collect();
    assert!(
        names.iter().any(|n| n == "istiod-canary-meshwarden"),
        "{names:?}"
    );

    // The freeze is lifted: meshwarden's retry corrects istiod and the condition turns True.
    common::lift_freeze(&env.client, &ns).await;
    let lifted = std::time::Instant::now();
    common::eventually(120, "istiod corrected after the freeze", || {
        corrected("istiod")
    })
    .await;
    let p = wait_true(&env, "p", "ControlPlaneHA").await;
    let c = condition(&p, "ControlPlaneHA").unwrap();
    assert!(!c.message.contains("could not write"), "{}", c.message);
    eprintln!(
        "istiod corrected and the condition True {:?} after the freeze was lifted",
        lifted.elapsed()
    );
    assert_eq!(hpa_min("istiod").await, Some(2));
    op.stop().await;
}

/// Issue 13 item 2: a fight is another writer reverting a value meshwarden set, counted per
/// field; meshwarden re-creating its own deleted PDB is no fight, and a hold never leaves istiod
/// without a PodDisruptionBudget.
#[tokio::test]
async fn fights_need_another_writer_and_never_drop_protection() {
    let (env, ns, op) = common::with_fixture("fight2", "istio", "istiod-default.yaml", KINDS).await;
    env.create_policy(
        "p",
        &format!("enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, replicas: {{min: 3}}, disruptionBudget: {{maxUnavailable: 1}}}}"),
    )
    .await;
    wait_true(&env, "p", "Ready").await;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), &ns);
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &ns);
    let lower_min = || common::edit_hpa_min(&hpas, "istiod", 1);
    let min_is = |want: i32| {
        let hpas = hpas.clone();
        async move {
            (hpas.get("istiod").await.unwrap().spec.unwrap().min_replicas == Some(want))
                .then_some(())
        }
    };
    let pdb_exists = || async {
        budgets
            .get_opt("istiod-meshwarden")
            .await
            .unwrap()
            .map(|_| ())
    };
    // The reproduction from the issue: twice (a) lower the HPA minimum, (b) delete the PDB.
    for _ in 0..2 {
        lower_min().await;
        common::eventually(5, "HPA minimum restored", || min_is(3)).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        budgets
            .delete("istiod-meshwarden", &Default::default())
            .await
            .unwrap();
        common::eventually(5, "PDB re-created", pdb_exists).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    let p = env.wait_settled("p", 20).await;
    let c = condition(&p, "ControlPlaneHA").unwrap();
    assert_ne!(
        c.reason, "FightDetected",
        "two human edits are no fight: {c:?}"
    );

    // A third revert of the same field by another writer makes a fight on that field: it is
    // corrected once more, then left alone.
    lower_min().await;
    common::eventually(5, "HPA minimum restored", || min_is(3)).await;
    lower_min().await;
    let p = env
        .wait_policy("p", 15, |p| {
            (condition(p, "ControlPlaneHA")?.reason == "FightDetected").then(|| p.clone())
        })
        .await;
    assert!(
        p.status
            .unwrap()
            .violations
            .iter()
            .any(|v| v.object.starts_with("HorizontalPodAutoscaler/") && v.action == "Skipped")
    );
    // While the minimum is left alone, the budget is still held.
    budgets
        .delete("istiod-meshwarden", &Default::default())
        .await
        .unwrap();
    common::eventually(5, "PDB re-created during the hold", pdb_exists).await;
    assert_eq!(min_is(1).await, Some(()), "the other writer's value stays");
    op.stop().await;
}

/// Issue 11 case 3: a gateway istiod deploys for a Gateway API Gateway (label
/// `gateway.istio.io/managed`, owner reference to the Gateway) is reported, never patched:
/// istiod re-applies it on every change, so a patch would only roll the gateway in a fight.
#[tokio::test]
async fn gateways_deployed_by_istiod_are_reported_not_patched() {
    let env = common::env("gwapi").await;
    let ns = env.namespace("gw", &[]).await;
    common::apply_as(
        &env.client,
        &format!(
            "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web-istio
  namespace: {ns}
  labels: {{gateway.istio.io/managed: istio.io-gateway-controller, gateway.networking.k8s.io/gateway-name: web}}
  ownerReferences:
  - {{apiVersion: gateway.networking.k8s.io/v1, kind: Gateway, name: web, uid: 00000000-0000-0000-0000-000000000001}}
spec:
  selector: {{matchLabels: {{gateway.networking.k8s.io/gateway-name: web}}}}
  template:
    metadata: {{labels: {{gateway.networking.k8s.io/gateway-name: web}}}}
    spec:
      containers: [{{name: istio-proxy, image: proxyv2}}]
"
        ),
        "istio.io/gateway-controller",
    )
    .await;
    let op = env.start_operator().await;
    env.create_policy("p", &format!(
        "enforcement: Enforce\ngateways: [{{name: web, namespace: {ns}, selector: {{matchLabels: {{gateway.networking.k8s.io/gateway-name: web}}}}, spread: {{nodes: Required, zones: 'Off'}}, resources: {{requests: {{cpu: 200m}}}}}}]"
    ))
    .await;
    let p = env
        .wait_policy("p", 30, |p| {
            (condition(p, "GatewayHA")?.reason == "ManagedByIstiod").then(|| p.clone())
        })
        .await;
    let v = p.status.unwrap().violations;
    assert!(
        v.iter()
            .any(|v| v.object == format!("Deployment/{ns}/web-istio")
                && v.message.contains("parametersRef")),
        "{v:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        common::operator_writes(Some(&ns), &[]).is_empty(),
        "nothing written to istiod's gateway"
    );
    op.stop().await;
}

/// Issue 13 item 5: a second HPA targeting istiod is reported (the HPA controller then scales
/// by neither), and the `<gateway>-meshwarden` PDB goes when its Deployment is deleted.
#[tokio::test]
async fn second_hpa_reported_and_left_behind_pdb_removed() {
    let (env, ns, op) = common::with_fixture("hpa2", "istio", "istiod-default.yaml", KINDS).await;
    common::apply_as(
        &env.client,
        &format!("apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata: {{name: istiod-extra, namespace: {ns}}}\nspec: {{minReplicas: 1, maxReplicas: 3, scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: istiod}}}}\n"),
        "kubectl",
    )
    .await;
    env.create_policy(
        "p",
        &format!("enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, replicas: {{min: 2}}, disruptionBudget: {{maxUnavailable: 1}}}}"),
    )
    .await;
    let p = env
        .wait_policy("p", 30, |p| {
            (condition(p, "ControlPlaneHA")?.reason == "CannotCorrect").then(|| p.clone())
        })
        .await;
    let v = p.status.unwrap().violations;
    assert!(
        v.iter()
            .any(|v| v.message.contains("2 HorizontalPodAutoscalers target it")),
        "{v:?}"
    );

    // The Deployment goes: the PDB meshwarden created for it goes too.
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &ns);
    assert!(
        budgets
            .get_opt("istiod-meshwarden")
            .await
            .unwrap()
            .is_some()
    );
    Api::<Deployment>::namespaced(env.client.clone(), &ns)
        .delete("istiod", &Default::default())
        .await
        .unwrap();
    common::eventually(10, "left-behind PDB removed", || async {
        budgets
            .get_opt("istiod-meshwarden")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    op.stop().await;
}
