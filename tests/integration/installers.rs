//! Istio installed by something other than `helm install`: Argo CD syncing the rendered charts
//! server-side, and the Sail operator. meshwarden holds the posture against each without a
//! fight, never changes the form of their PodDisruptionBudget, and names the value to change
//! in that installer's own terms.
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use kube::api::Api;
use meshwarden::api::MeshPolicy;

use crate::common::{self, condition, container_resources, quantity};

const KINDS: &[&str] = common::HA_KINDS;

/// The policy of both scenarios: raise istiod's HPA minimum and CPU request, and declare a
/// budget in the other form than the chart's PDB (`minAvailable: 1`), which has no equivalent
/// with an HPA, so that PDB is reported and left alone.
fn policy(ns: &str) -> String {
    format!(
        "enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, replicas: {{min: 3}}, disruptionBudget: {{maxUnavailable: 1}}, resources: {{requests: {{cpu: 700m}}}}}}"
    )
}

/// Istio's HA fixture rendered into `ns`: HPA minimum 2 and the chart's PDB (minAvailable 1).
struct Istiod {
    hpas: Api<HorizontalPodAutoscaler>,
    deployments: Api<Deployment>,
    budgets: Api<PodDisruptionBudget>,
}

impl Istiod {
    fn new(env: &common::Env, ns: &str) -> Self {
        Istiod {
            hpas: Api::namespaced(env.client.clone(), ns),
            deployments: Api::namespaced(env.client.clone(), ns),
            budgets: Api::namespaced(env.client.clone(), ns),
        }
    }

    /// HPA minimum 3 and CPU request 700m.
    async fn corrected(&self) -> Option<()> {
        let min = self.hpas.get("istiod").await.ok()?.spec?.min_replicas;
        let d = self.deployments.get("istiod").await.ok()?;
        let cpu = quantity(&container_resources(&d, "discovery").requests, "cpu");
        (min == Some(3) && cpu.as_deref() == Some("700m")).then_some(())
    }

    /// Starts the operator and the policy; returns once istiod is corrected, its PDB kept its
    /// form, and the condition names where to fix the drift for good.
    async fn enforce(&self, env: &common::Env, ns: &str) -> (common::Operator, MeshPolicy) {
        let op = env.start_operator().await;
        env.create_policy("p", &policy(ns)).await;
        common::eventually(20, "istiod corrected", || self.corrected()).await;
        self.assert_chart_budget("corrected").await;
        let p = env
            .wait_policy("p", 20, |p| {
                let c = condition(p, "ControlPlaneHA")?;
                c.message.contains("to stop the drift").then(|| p.clone())
            })
            .await;
        (op, p)
    }

    /// After the installer re-applied its render at `step`: meshwarden wrote again (more than
    /// `writes`) and restored the posture, the PDB kept its form, and the condition is no fight
    /// and still names the values to set at the source (`hint`).
    async fn restored(
        &self,
        env: &common::Env,
        op: &common::Operator,
        writes: u64,
        step: &str,
        hint: &str,
    ) {
        common::eventually(
            10,
            "posture restored after the installer's write",
            || async {
                self.corrected().await?;
                (op.writes() > writes).then_some(())
            },
        )
        .await;
        self.assert_chart_budget(step).await;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let p = env.wait_policy("p", 5, |p| Some(p.clone())).await;
        let c = condition(&p, "ControlPlaneHA").unwrap();
        assert_ne!(c.reason, "FightDetected", "{step}: {c:?}");
        assert!(
            c.message.contains(hint),
            "{step}: still names the values to set: {}",
            c.message
        );
    }

    async fn assert_chart_budget(&self, step: &str) {
        let s = self.budgets.get("istiod").await.unwrap().spec.unwrap();
        assert_eq!(
            (s.min_available, s.max_unavailable),
            (Some(IntOrString::Int(1)), None),
            "{step}: the PDB keeps its form"
        );
    }
}

/// A GitOps tool that syncs istiod's manifests server-side: Argo CD applies with the field
/// manager `argocd-controller` and `--force-conflicts` (gitops-engine sets ForceConflicts for
/// every server-side apply), and re-applies its unchanged manifests on every sync. Each sync
/// succeeds, meshwarden restores the posture right after without calling it a fight, the PDB
/// keeps its form, and the condition names the values to change in the Application's Git
/// source.
#[tokio::test]
async fn gitops_server_side_sync_and_meshwarden_coexist() {
    let env = common::env("gitops").await;
    let ns = env.namespace("istio", &[]).await;
    let manifests = std::env::temp_dir().join(format!("{ns}-istiod.yaml"));
    std::fs::write(&manifests, common::fixture_in("istiod-ha.yaml", &ns, KINDS)).unwrap();
    let sync = |step: &str| {
        let out = Command::new(testplane::tools_dir().join("kubectl"))
            .args(["--kubeconfig", &env.plane.kubeconfig.display().to_string()])
            .args(["apply", "--server-side", "--force-conflicts"])
            .args(["--field-manager=argocd-controller", "-f"])
            .arg(&manifests)
            .output()
            .expect("run kubectl");
        assert!(
            out.status.success(),
            "{step}: the sync failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    sync("first sync");
    let istiod = Istiod::new(&env, &ns);
    let (op, p) = istiod.enforce(&env, &ns).await;
    let p = condition(&p, "ControlPlaneHA").unwrap().clone();
    assert!(
        p.message.contains(
            "set autoscaleMin, pdb.maxUnavailable, resources in the Helm values of the Argo CD Application in Git"
        ),
        "names the values to change in Git: {}",
        p.message
    );
    assert!(
        p.message
            .contains("set pdb.maxUnavailable=1 in the Helm values of the Argo CD Application"),
        "the budget's hint names its value: {}",
        p.message
    );

    // Every sync (or self-heal) re-applies the unchanged manifests, taking the fields back:
    // more of them within ten minutes than a fight takes.
    for round in 1..=5 {
        let step = format!("sync {round}");
        let writes = op.writes();
        sync(&step);
        // The sync took the fields back, and meshwarden wrote them again.
        let hint = "in the Helm values of the Argo CD Application in Git";
        istiod.restored(&env, &op, writes, &step, hint).await;
        let hpa = istiod.hpas.get("istiod").await.unwrap();
        assert!(
            hpa.managed_fields()
                .iter()
                .any(|m| m.manager.as_deref() == Some("argocd-controller")),
            "{step}: Argo CD still manages the HPA"
        );
    }
    let ctx = meshwarden::context::Context::new(env.client.clone(), None);
    let file = meshwarden::rules::ha::values::values_files(&ctx, Some(&env.policy_name("p")))
        .await
        .unwrap();
    assert!(
        file.contains("Argo CD Application") && file.contains("autoscaleMin: 3"),
        "{file}"
    );
}

/// The Sail operator installs istiod through Helm's library from an `Istio` resource (via an
/// `IstioRevision`): its objects carry a Helm release (`<revision>-istiod`), the label
/// `managed-by: sail-operator`, a controller owner reference to the `IstioRevision`
/// (`sailoperator.io/v1`), and `Update` entries of the field manager `sail-operator` (the
/// binary's name, which Helm's library uses). `helm upgrade` of that release would be undone by
/// the operator, so the condition, the violations and `meshwarden values` speak in the `Istio`
/// resource's `spec.values.pilot.*` terms; its re-renders (applied here as `sail-operator`)
/// are restored, never a fight. The Sail operator itself does not run here: the `IstioRevision`
/// CRD is a minimal stand-in (only its group, version and kind matter for the owner reference),
/// and the objects are created the way its Helm library does.
#[tokio::test]
async fn the_sail_operator_is_named_with_its_istio_values() {
    let env = common::env("sail").await;
    let ns = env.namespace("istio", &[]).await;
    let crd = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: istiorevisions.sailoperator.io}\nspec:\n  group: sailoperator.io\n  scope: Cluster\n  names: {kind: IstioRevision, plural: istiorevisions, singular: istiorevision}\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}\n";
    testplane::apply_yaml(&env.client, crd, &[]).await.unwrap();
    let revision = format!("{ns}-rev");
    let revisions = kube::api::Api::<kube::api::DynamicObject>::all_with(
        env.client.clone(),
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("sailoperator.io", "v1", "IstioRevision"),
            "istiorevisions",
        ),
    );
    let owner = common::eventually(20, "the stand-in IstioRevision created", || async {
        let obj: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "sailoperator.io/v1", "kind": "IstioRevision",
            "metadata": {"name": revision},
            "spec": {"namespace": ns, "values": {"pilot": {"autoscaleMin": 2}}},
        }))
        .unwrap();
        revisions.create(&Default::default(), &obj).await.ok()
    })
    .await;
    let mut stream = String::new();
    for mut o in
        serde_yaml::Deserializer::from_str(&common::fixture_in("istiod-ha.yaml", &ns, KINDS))
            .map(|d| <serde_json::Value as serde::Deserialize>::deserialize(d).unwrap())
    {
        let m = &mut o["metadata"];
        m["labels"]["managed-by"] = "sail-operator".into();
        m["labels"]["app.kubernetes.io/managed-by"] = "Helm".into();
        m["annotations"]["meta.helm.sh/release-name"] = format!("{revision}-istiod").into();
        m["annotations"]["meta.helm.sh/release-namespace"] = ns.clone().into();
        m["ownerReferences"] = serde_json::json!([{
            "apiVersion": "sailoperator.io/v1", "kind": "IstioRevision", "name": revision,
            "uid": owner.uid().unwrap(), "controller": true, "blockOwnerDeletion": true,
        }]);
        stream.push_str("---\n");
        stream.push_str(&serde_yaml::to_string(&o).unwrap());
    }
    common::create_as(&env.client, &stream, "sail-operator").await;
    let istiod = Istiod::new(&env, &ns);
    let (op, p) = istiod.enforce(&env, &ns).await;
    let c = condition(&p, "ControlPlaneHA").unwrap();
    assert!(
        c.message.contains(&format!(
            "set spec.values.pilot.autoscaleMin, spec.values.pilot.resources in the Sail operator's Istio resource that owns IstioRevision {revision}"
        )),
        "names the Istio resource's values: {}",
        c.message
    );
    assert!(
        !c.message.contains("helm upgrade") && !c.message.contains("Helm release"),
        "no Helm advice for a release the operator owns: {}",
        c.message
    );
    let budget = p
        .status
        .as_ref()
        .unwrap()
        .violations
        .iter()
        .find(|v| v.object.starts_with("PodDisruptionBudget/"))
        .expect("the chart's PDB is reported");
    assert!(
        budget.message.contains("has no value for this budget"),
        "{}",
        budget.message
    );
    // The operator re-applies its render whenever it reconciles: each time the fields go
    // back to the chart's values, and meshwarden restores them without a fight.
    for round in 1..=4 {
        let step = format!("Sail operator render {round}");
        let writes = op.writes();
        common::apply_as(&env.client, &stream, "sail-operator").await;
        let hint = "set spec.values.pilot.autoscaleMin";
        istiod.restored(&env, &op, writes, &step, hint).await;
    }
    let ctx = meshwarden::context::Context::new(env.client.clone(), None);
    let file = meshwarden::rules::ha::values::values_files(&ctx, Some(&env.policy_name("p")))
        .await
        .unwrap();
    assert!(
        file.contains(&format!("IstioRevision {revision}"))
            && file.contains("spec:\n  values:\n    pilot:\n      autoscaleMin: 3")
            && file.contains("cpu: 700m")
            && !file.contains("pdb"),
        "{file}"
    );
}

/// Issue 11: `helm upgrade --reuse-values` and `helm rollback` re-apply the release's own
/// values; each takes the fields meshwarden holds back, and meshwarden restores them right
/// after. However many fall within the fight window, they are installer upgrades, not a fight,
/// and the condition keeps naming the chart values to set. Another writer reverting the same
/// field as often is still a fight.
#[tokio::test]
async fn repeated_helm_upgrades_are_no_fight() {
    let env = common::env("upgrades").await;
    let ns = env.namespace("istio", &[]).await;
    let chart = testplane::istio::chart("istiod").display().to_string();
    let istio_ns = format!("global.istioNamespace={ns}");
    let helm = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["-n", ns.as_str()]);
        common::helm(true, &all).unwrap_or_else(|e| panic!("helm {args:?}: {e}"))
    };
    helm(&[
        "install",
        "istiod",
        &chart,
        "--set",
        "autoscaleMin=2",
        "--set",
        &istio_ns,
        "--set",
        "global.operatorManageWebhooks=true",
    ]);
    let istiod = Istiod::new(&env, &ns);
    let (op, _) = istiod.enforce(&env, &ns).await;
    let upgrade = ["upgrade", "istiod", chart.as_str(), "--reuse-values"];
    for round in 1..=5 {
        let step = if round < 5 {
            format!("upgrade {round}")
        } else {
            "rollback".to_string()
        };
        let writes = op.writes();
        match round {
            5 => helm(&["rollback", "istiod"]),
            _ => helm(&upgrade),
        };
        let hint = "set autoscaleMin, pdb.maxUnavailable, resources in Helm release istiod";
        istiod.restored(&env, &op, writes, &step, hint).await;
    }

    // Somebody else lowering the HPA minimum as often is a fight on that field.
    for round in 0..6 {
        common::edit_hpa_min(&istiod.hpas, "istiod", 1).await;
        let restored = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while istiod.corrected().await.is_none() {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await
        .is_ok();
        assert!(restored || round >= 3, "revert {round} restored");
        if !restored {
            break;
        }
    }
    env.wait_policy("p", 15, |p| {
        (condition(p, "ControlPlaneHA")?.reason == "FightDetected").then_some(())
    })
    .await;
    op.stop().await;
    helm(&["uninstall", "istiod"]);
}
