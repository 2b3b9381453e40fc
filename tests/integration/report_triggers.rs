//! The report sections (resilience, security) are evaluated when a workload or running pod
//! changes what they read, and only then: a running pod that makes its workload judged (its
//! first injected pod) or no longer judged (its last) reaches the drain check at once, while
//! spec edits of other fields reach neither section.
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use meshwarden::telemetry::SectionLabels;

use crate::common::{self, Operator};
use crate::resilience::{one, running_pod, service, stateful_set, wait_for};

const LABEL: &str = "meshwarden-test-report-triggers";

/// How many times `op` evaluated `section` so far.
fn evaluations(op: &Operator, section: &str) -> u64 {
    op.state
        .ctx
        .metrics
        .section_evaluations
        .get_or_create(&SectionLabels {
            section: section.to_string(),
        })
        .get()
}

#[tokio::test]
async fn report_sections_follow_what_they_read_of_workloads_and_pods() {
    let env = common::env("rep-trig").await;
    let id = env.id.clone();
    let ns = env.namespace("apps", &[(LABEL, &id)]).await;
    // istiod's namespace (and so the root namespace) of its own: the other tests' objects in
    // istio-system (root DestinationRules) concern its sections neither.
    let istio = env.namespace("istio", &[]).await;
    let op = env.start_operator_in(&istio).await;
    let select = format!("namespaceSelector: {{matchLabels: {{{LABEL}: {id}}}}}");
    env.create_policy(
        "p",
        &format!(
            "resilience: {{outlierDetection: 'Off', {select}}}\nsecurity: {{defaultDeny: PerWorkload, pluggedInCA: 'Off', {select}}}"
        ),
    )
    .await;
    let object = format!("Namespace/{ns}");
    let finding = "StatefulSet/db: the proxy drains 10s against a grace period of 10s";

    // A workload whose drain reaches its grace period, without pods: nothing to judge.
    service(&env, &ns, "db").await;
    let db = |grace: u32, drain: &'static str| {
        let config = format!(r#"{{"terminationDrainDuration": "{drain}"}}"#);
        let (env, ns) = (&env, ns.clone());
        async move { stateful_set(env, &ns, "db", grace, &config).await }
    };
    db(10, "10s").await;
    wait_for(&env, "Compliant", "no pod", |v| v.is_empty()).await;
    // Its first injected pod makes it judged; that pod gone, it is not; back, it is.
    running_pod(&env, &ns, "db", false).await;
    wait_for(&env, "MinimumsNotMet", "first pod", |v| {
        one(v, &object, &[finding])
    })
    .await;
    Api::<Pod>::namespaced(env.client.clone(), &ns)
        .delete("db-0", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(&env, "Compliant", "last pod gone", |v| v.is_empty()).await;
    running_pod(&env, &ns, "db", false).await;
    wait_for(&env, "MinimumsNotMet", "pod back", |v| {
        one(v, &object, &[finding])
    })
    .await;

    // Edits of what neither section reads, then one of the drain, through the same watch
    // (its events are routed in order): only the last concerns the resilience section, and
    // none the security section. A status change may cost one more evaluation of each (a
    // paced status write requeues the policy), so the counts are taken once the status has
    // been quiet for longer than a pacing period.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = (evaluations(&op, "resilience"), evaluations(&op, "security"));
    let sets: Api<StatefulSet> = Api::namespaced(env.client.clone(), &ns);
    for i in 0..6 {
        let edit = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {"example.com/edit": i.to_string()}}}}});
        sets.patch(
            "db",
            &PatchParams {
                field_manager: Some("kubectl-edit".to_string()),
                ..Default::default()
            },
            &Patch::Merge(edit),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    db(30, "20s").await;
    wait_for(&env, "Compliant", "drain fixed", |v| v.is_empty()).await;
    let after = (evaluations(&op, "resilience"), evaluations(&op, "security"));
    assert!(
        after.0 > before.0 && after.0 - before.0 <= 2,
        "resilience evaluated {} times for six unrelated edits and one drain fix",
        after.0 - before.0
    );
    assert!(
        after.1 - before.1 <= 1,
        "security evaluated {} times for seven edits of nothing it reads",
        after.1 - before.1
    );
}
