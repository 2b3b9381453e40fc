//! A pod-template change waits for the rollout in progress (an installer's upgrade, a
//! previous write, anyone's) to finish: the HA sections (the HPA and the budget do not wait)
//! and the sidecars section.
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

use crate::common::{self, condition, container_resources, quantity};
use crate::sidecars;
use meshwarden::status::reasons::ViolationAction;

const KINDS: &[&str] = common::HA_KINDS;

/// Plays the Deployment controller in the middle of a rollout of `name`: the generation
/// observed, a surge pod of the new template created, none of it available yet. Returns the
/// Deployment as it was before.
async fn rolling(deploys: &Api<Deployment>, name: &str) -> Deployment {
    let d = deploys.get(name).await.unwrap();
    deploys
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
                "observedGeneration": d.metadata.generation,
                "replicas": 2, "updatedReplicas": 0, "readyReplicas": 1, "availableReplicas": 1,
                "conditions": [{"type": "Progressing", "status": "True",
                    "reason": "ReplicaSetUpdated", "message": "rolling"}],
            }})),
        )
        .await
        .unwrap();
    d
}

#[tokio::test]
async fn ha_template_writes_wait_for_the_rollout_in_progress() {
    let env = common::env("harollout").await;
    let ns = env.namespace("istio", &[]).await;
    env.load_fixture("istiod-default.yaml", &ns, KINDS).await;
    let deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), &ns);

    let d = rolling(&deploys, "istiod").await;
    let cpu = |d: &Deployment| quantity(&container_resources(d, "discovery").requests, "cpu");
    let installed = cpu(&d);
    assert_ne!(installed.as_deref(), Some("700m"));

    let _op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, replicas: {{min: 3}}, disruptionBudget: {{maxUnavailable: 1}}, resources: {{requests: {{cpu: 700m}}}}}}"
        ),
    )
    .await;
    let p = env
        .wait_policy("p", 30, |p| {
            let c = condition(p, "ControlPlaneHA")?;
            (c.reason == "Progressing"
                && p.status.as_ref()?.observed_generation == p.metadata.generation)
                .then(|| p.clone())
        })
        .await;
    let c = condition(&p, "ControlPlaneHA").unwrap();
    assert_eq!(c.status, "False");
    assert!(
        c.message.contains(&format!(
            "the pod template of Deployment/{ns}/istiod (0 of 1 replicas updated) is changed once its rollout in progress finishes"
        )),
        "{}",
        c.message
    );
    let violations = p.status.as_ref().unwrap().violations.clone();
    assert!(
        violations.iter().any(|v| v.message.contains("resources")
            && v.message.ends_with("(written once the rollout finishes)")),
        "{violations:?}"
    );
    // The HPA minimum is raised now; the template is not touched while the rollout runs.
    let min = hpas.get("istiod").await.unwrap().spec.unwrap().min_replicas;
    assert_eq!(min, Some(3), "the HPA does not wait");
    let d = deploys.get("istiod").await.unwrap();
    assert_eq!(cpu(&d), installed, "the template waits");
    assert!(
        !d.managed_fields()
            .iter()
            .any(|m| m.manager.as_deref() == Some("meshwarden")),
        "no Deployment write at all while its rollout is in progress"
    );

    // The rollout finishes: the template is written (and its own rollout starts).
    common::complete_rollout(&env.client, &ns, "istiod").await;
    common::eventually(30, "the CPU request written after the rollout", || async {
        let d = deploys.get("istiod").await.ok()?;
        (cpu(&d).as_deref() == Some("700m")).then_some(())
    })
    .await;
}

/// Someone else's rollout of a Deployment in progress: the sidecar annotations wait for it
/// (the target is held, named with the controller's progress), and are written once it is done.
#[tokio::test]
async fn sidecar_writes_wait_for_someone_elses_rollout() {
    let env = common::env("scrollout").await;
    let c = &env.client;
    let ns = sidecars::ns(&env, "apps", &[("istio-injection", "enabled")]).await;
    sidecars::deployment(c, &ns, "web", 2).await;
    sidecars::deployment(c, &ns, "api", 2).await;
    let deploys: Api<Deployment> = Api::namespaced(c.clone(), &ns);
    rolling(&deploys, "web").await;
    common::complete_rollout(c, &ns, "api").await;
    let _op = env.start_operator().await;
    env.create_policy("p", &sidecars::policy_spec(&env, "Enforce", 5))
        .await;
    common::eventually(30, "api written", || async {
        sidecars::has_four(&sidecars::annotations_of(c, &ns, "api").await).then_some(())
    })
    .await;
    let p = env
        .wait_policy("p", 30, |p| {
            let v = p.status.as_ref()?.violations.iter().find(|v| {
                v.object == format!("Deployment/{ns}/web")
                    && v.message
                        .contains("its rollout is in progress (0 of 2 replicas updated)")
            })?;
            Some(v.clone())
        })
        .await;
    assert_eq!(p.action, ViolationAction::Held, "{p:?}");
    assert!(
        !sidecars::has_four(&sidecars::annotations_of(c, &ns, "web").await),
        "web waits for its rollout"
    );
    common::complete_rollout(c, &ns, "web").await;
    common::eventually(30, "web written once its rollout completed", || async {
        sidecars::has_four(&sidecars::annotations_of(c, &ns, "web").await).then_some(())
    })
    .await;
}

/// A Deployment whose rollout its controller declared complete a moment ago still shows, to
/// the running-pod watch, the pods that rollout replaced until their deletion arrives: the
/// upgrades section does not restart it on their account (a second rollout for one change)
/// while the completion is recent, says why, and restarts it once the settling time has passed
/// with its pods still outdated, without any other event.
#[tokio::test]
async fn a_restart_waits_while_the_last_rollout_settles() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::PostParams;
    use meshwarden::rules::upgrades::SETTLE_SECS;
    let _upgrades = crate::plan::UPGRADES_POLICY.lock().await;
    let env = common::env("settle").await;
    let (rev, _, apps) = common::istiod_at_1_31(&env).await;
    let d = format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: {apps}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: app, image: registry.example/app:1}}]}}\n"
    );
    common::apply_as(&env.client, &d, "kubectl").await;
    // Its template changed once (generation 2), and that rollout completed just now, as the
    // Deployment controller records it.
    let deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &apps);
    deploys
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"template": {"metadata": {
                "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-08T00:00:00Z"}}}}})),
        )
        .await
        .unwrap();
    let now = jiff::Timestamp::now().to_string();
    let rolled = std::time::Instant::now();
    deploys
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {
                "observedGeneration": 2,
                "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1,
                "conditions": [{"type": "Progressing", "status": "True",
                    "reason": "NewReplicaSetAvailable", "message": "rolled out",
                    "lastUpdateTime": now, "lastTransitionTime": now}],
            }})),
        )
        .await
        .unwrap();
    // A pod the running-pod watch still holds with the outdated proxy.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &apps);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": "web-h1-0",
            "labels": {"app": "web", "pod-template-hash": "h1"},
            "annotations": {"sidecar.istio.io/status": format!("{{\"revision\":\"{rev}\"}}")},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "web-h1", "uid": "6a1f2c3d-0000-4000-8000-000000000002",
                "controller": true}],
        },
        "spec": {"containers": [
            {"name": "app", "image": "registry.example/app:1"},
            {"name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.29.0"},
        ]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    pods.patch_status(
        "web-h1-0",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap();

    let _op = env.start_operator().await;
    env.create_policy(
        "p",
        &format!(
            "enforcement: Enforce\nupgrades:\n  restartOutdated: true\n  namespaceSelector: {{matchLabels: {{meshwarden-test: {}}}}}\n",
            env.id
        ),
    )
    .await;
    let held = env
        .wait_policy("p", 30, |p| {
            let v = p.status.as_ref()?.violations.iter().find(|v| {
                v.object == format!("Deployment/{apps}/web")
                    && v.message.contains("its rollout completed")
            })?;
            Some(v.clone())
        })
        .await;
    assert_eq!(held.action, ViolationAction::Held, "{held:?}");
    let generation = deploys.get("web").await.unwrap().metadata.generation;
    assert_eq!(
        generation,
        Some(2),
        "not restarted while its rollout settles"
    );
    // Nothing else happens: the section looks again once the settling time has passed.
    common::eventually(30, "restarted after the settling time", || async {
        let d = deploys.get("web").await.ok()?;
        (d.metadata.generation == Some(3)).then_some(())
    })
    .await;
    // The completion time is kept to the second: the hold ends between SETTLE_SECS - 1 and
    // SETTLE_SECS after it.
    assert!(
        rolled.elapsed().as_secs() >= u64::try_from(SETTLE_SECS).unwrap() - 2,
        "restarted {:?} after the rollout completed",
        rolled.elapsed()
    );
    env.delete_policies().await;
}
