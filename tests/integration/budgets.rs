//! The PodDisruptionBudgets meshwarden creates, through a policy's edits: whole on every
//! write (an apply without its selector, labels or owner reference would remove them) and
//! with `unhealthyPodEvictionPolicy: AlwaysAllow`, so pods that are not ready never block a
//! drain.
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams};

use crate::common::{self, condition};

const KINDS: &[&str] = common::HA_KINDS;

#[tokio::test]
async fn meshwardens_budget_keeps_its_selector_and_lets_unready_pods_go_through_edits() {
    let env = common::env("budgets").await;
    let ns = env.namespace("istio", &[]).await;
    env.load_fixture("istiod-fixed-replicas.yaml", &ns, KINDS)
        .await;
    let op = env.start_operator().await;
    let spec = |budget: &str| {
        format!(
            "enforcement: Enforce\ncontrolPlane: {{namespace: {ns}, replicas: {{min: 3}}, disruptionBudget: {{{budget}}}}}"
        )
    };
    env.create_policy("p", &spec("maxUnavailable: 1")).await;
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &ns);
    // The budget as it must be after every step, with `form` its one budget field.
    let whole = |form: &'static str, value: IntOrString| {
        let budgets = budgets.clone();
        async move {
            common::eventually(30, &format!("istiod-meshwarden with {form}"), || async {
                let b = budgets.get_opt("istiod-meshwarden").await.unwrap()?;
                let s = b.spec.clone()?;
                let got = match form {
                    "minAvailable" => (s.min_available.clone(), s.max_unavailable.clone()),
                    _ => (s.max_unavailable.clone(), s.min_available.clone()),
                };
                (got == (Some(value.clone()), None)).then_some(b)
            })
            .await
        }
    };
    let check = |b: &PodDisruptionBudget, step: &str| {
        let s = b.spec.clone().unwrap();
        assert_eq!(
            s.unhealthy_pod_eviction_policy.as_deref(),
            Some("AlwaysAllow"),
            "{step}"
        );
        let selector = s
            .selector
            .unwrap_or_default()
            .match_labels
            .unwrap_or_default();
        // The Deployment's own pod selector (the chart's `istio: pilot`).
        assert_eq!(
            selector.get("istio").map(String::as_str),
            Some("pilot"),
            "{step}: {selector:?}"
        );
        assert_eq!(
            b.metadata.labels.clone().unwrap_or_default()["meshwarden.io/policy"],
            env.policy_name("p"),
            "{step}"
        );
        assert!(
            !b.metadata
                .owner_references
                .clone()
                .unwrap_or_default()
                .is_empty(),
            "{step}: owned by the policy"
        );
    };
    let b = whole("maxUnavailable", IntOrString::Int(1)).await;
    check(&b, "created");

    // The policy switches the form: the budget follows, whole.
    env.set_spec("p", &spec("minAvailable: 2")).await;
    let b = whole("minAvailable", IntOrString::Int(2)).await;
    check(&b, "form switched");

    // Somebody drops the eviction policy: it comes back, nothing else changes.
    budgets
        .patch(
            "istiod-meshwarden",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"unhealthyPodEvictionPolicy": null}})),
        )
        .await
        .unwrap();
    let b = common::eventually(30, "the eviction policy restored", || async {
        let b = budgets.get("istiod-meshwarden").await.ok()?;
        (b.spec.as_ref()?.unhealthy_pod_eviction_policy.as_deref() == Some("AlwaysAllow"))
            .then_some(b)
    })
    .await;
    check(&b, "eviction policy restored");
    let p = env.wait_converged("p", 30).await;
    let c = condition(&p, "ControlPlaneHA").unwrap();
    assert_eq!(c.status, "True", "{c:?}");
    op.stop().await;
}
