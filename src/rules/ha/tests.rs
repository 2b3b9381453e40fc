//! Unit tests of the pure plan over small objects written as YAML.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::*;
use crate::write::MANAGED_BY;

fn yaml<T: serde::de::DeserializeOwned>(s: &str) -> T {
    serde_yaml::from_str(s).unwrap()
}

fn deployment(replicas: &str) -> Deployment {
    yaml(&format!(
        "metadata:
  name: istiod
  namespace: istio-system
  managedFields:
  - {{manager: helm, operation: Apply, apiVersion: apps/v1, fieldsType: FieldsV1, fieldsV1: {{f:spec: {{f:replicas: {{}}}}}}}}
spec:
  {replicas}
  selector: {{matchLabels: {{app: istiod}}}}
  template:
    metadata: {{labels: {{app: istiod}}}}
    spec:
      containers: [{{name: discovery, image: pilot}}]
"
    ))
}

fn hpa(min: i32, max: i32) -> HorizontalPodAutoscaler {
    yaml(&format!(
        "metadata: {{name: istiod, namespace: istio-system}}
spec: {{minReplicas: {min}, maxReplicas: {max}, scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: istiod}}}}
"
    ))
}

fn chart_pdb() -> PodDisruptionBudget {
    yaml(
        "metadata:
  name: istiod
  namespace: istio-system
  labels: {app.kubernetes.io/managed-by: Helm}
  annotations: {meta.helm.sh/release-name: istiod, meta.helm.sh/release-namespace: istio-system}
  managedFields:
  - {manager: helm, operation: Update, apiVersion: policy/v1, fieldsType: FieldsV1, fieldsV1: {f:spec: {f:minAvailable: {}, f:selector: {}}}}
spec: {minAvailable: 1, selector: {matchLabels: {app: istiod}}}
",
    )
}

fn rules(spec: &str) -> HaRules {
    let cp: crate::api::ControlPlaneSpec = yaml(&format!("{{{spec}}}"));
    HaRules {
        replicas: cp.replicas,
        budget: cp.disruption_budget,
        spread: cp.spread,
        resources: cp.resources,
        container: "discovery",
    }
}

fn policy() -> MeshPolicy {
    MeshPolicy::new("p", yaml("enforcement: Enforce"))
}

fn obs(
    replicas: &str,
    hpa: Option<HorizontalPodAutoscaler>,
    pdbs: Vec<PodDisruptionBudget>,
) -> Observation {
    Observation {
        deployment: deployment(replicas),
        hpa,
        other_hpas: Vec::new(),
        pdbs,
        pods: Vec::new(),
    }
}

#[test]
fn fixed_replicas_are_raised_and_the_previous_owner_named() {
    let p = plan(
        &rules("replicas: {min: 3}"),
        &obs("replicas: 1", None, vec![]),
        &policy(),
        true,
    );
    assert_eq!(p.deployment_patch.unwrap()["spec"]["replicas"], json!(3));
    assert_eq!(p.findings.len(), 1);
    assert_eq!(p.findings[0].changed_by, vec!["helm"]);
    assert_eq!(p.takeovers[0].1, "helm");
    assert!(p.hpa_patch.is_none() && p.pdb.is_none() && !p.rolls_pods);
}

#[test]
fn an_hpa_owns_the_count_and_its_minimum_is_raised() {
    let p = plan(
        &rules("replicas: {min: 3}"),
        &obs("", Some(hpa(1, 2)), vec![]),
        &policy(),
        true,
    );
    let (_, patch) = p.hpa_patch.unwrap();
    assert_eq!(patch["spec"], json!({"minReplicas": 3, "maxReplicas": 3}));
    assert!(
        p.deployment_patch.is_none(),
        "the Deployment's replicas is never written"
    );
}

#[test]
fn audit_reports_the_same_findings() {
    let r = rules("replicas: {min: 3}, disruptionBudget: {maxUnavailable: 1}");
    let o = obs("replicas: 1", None, vec![]);
    let enforce = plan(&r, &o, &policy(), true);
    let audit = plan(&r, &o, &policy(), false);
    assert_eq!(enforce.findings, audit.findings);
    assert_eq!(audit.findings.len(), 2, "replicas and the missing PDB");
}

#[test]
fn a_missing_budget_is_created_owned_by_the_policy() {
    let p = plan(
        &rules("disruptionBudget: {maxUnavailable: 1}"),
        &obs("replicas: 3", None, vec![]),
        &policy(),
        true,
    );
    let Some(PdbAction::Apply { name, patch }) = p.pdb else {
        panic!("no PDB planned")
    };
    assert_eq!(name, "istiod-meshwarden");
    assert_eq!(patch["spec"]["maxUnavailable"], json!(1));
    assert_eq!(
        patch["metadata"]["labels"][MANAGED_BY.0],
        json!(MANAGED_BY.1)
    );
}

#[test]
fn the_charts_budget_keeps_its_form_when_equivalent() {
    // Fixed at 3 replicas: maxUnavailable 1 is held as minAvailable 2 on Helm's PDB.
    let p = plan(
        &rules("replicas: {min: 3}, disruptionBudget: {maxUnavailable: 1}"),
        &obs("replicas: 3", None, vec![chart_pdb()]),
        &policy(),
        true,
    );
    let Some(PdbAction::Apply { name, patch }) = p.pdb else {
        panic!("no PDB planned")
    };
    assert_eq!(name, "istiod");
    assert_eq!(
        patch["spec"],
        json!({"minAvailable": 2}),
        "no maxUnavailable, no null"
    );
}

#[test]
fn the_charts_budget_is_left_alone_when_not_equivalent() {
    // An HPA range 3..5: no minAvailable allows exactly one disruption at every count.
    let p = plan(
        &rules("replicas: {min: 3}, disruptionBudget: {maxUnavailable: 1}"),
        &obs("", Some(hpa(2, 5)), vec![chart_pdb()]),
        &policy(),
        true,
    );
    assert!(p.pdb.is_none());
    let f = p
        .findings
        .iter()
        .find(|f| f.object.ends_with("/istiod") && f.field == "spec")
        .unwrap();
    assert!(!f.fixable);
    assert!(
        f.message
            .contains("set pdb.maxUnavailable=1 in Helm release istiod"),
        "{}",
        f.message
    );
}

#[test]
fn spread_keeps_the_users_terms_and_rolls_the_pods() {
    let p = plan(
        &rules("spread: {nodes: Required, zones: Preferred}"),
        &obs("replicas: 3", None, vec![]),
        &policy(),
        true,
    );
    assert!(p.rolls_pods);
    let tpl = &p.deployment_patch.unwrap()["spec"]["template"]["spec"];
    assert_eq!(
        tpl["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"],
        json!(HOSTNAME)
    );
    assert_eq!(
        tpl["topologySpreadConstraints"][0]["whenUnsatisfiable"],
        json!("ScheduleAnyway")
    );
}

#[test]
fn two_hpas_on_one_deployment_are_reported() {
    let mut o = obs("", Some(hpa(3, 5)), vec![]);
    o.other_hpas = vec!["istiod-extra".into()];
    let p = plan(&rules("replicas: {min: 3}"), &o, &policy(), true);
    let f = p
        .findings
        .iter()
        .find(|f| f.field == "HorizontalPodAutoscaler")
        .unwrap();
    assert!(!f.fixable);
    assert!(f.message.contains("istiod, istiod-extra"), "{}", f.message);
}

/// istiod with the chart's container resources, owned by Helm.
fn with_resources(resources: &str) -> Observation {
    let mut o = obs("replicas: 2", None, vec![]);
    o.deployment.spec.as_mut().unwrap().template = yaml(&format!(
        "metadata: {{labels: {{app: istiod}}}}
spec:
  containers: [{{name: discovery, image: pilot, resources: {resources}}}]
"
    ));
    o.deployment.metadata.managed_fields = yaml(
        r#"- {manager: helm, operation: Apply, apiVersion: apps/v1, fieldsType: FieldsV1, fieldsV1: {f:spec: {f:template: {f:spec: {f:containers: {'k:{"name":"discovery"}': {f:resources: {}}}}}}}}"#,
    );
    o
}

#[test]
fn resources_are_compared_by_value() {
    let declared: crate::api::ResourcesSpec =
        yaml("{requests: {cpu: 500m, memory: 2Gi}, limits: {memory: 4Gi}}");
    let same: k8s_openapi::api::core::v1::ResourceRequirements =
        yaml("{requests: {cpu: '0.5', memory: 2048Mi}, limits: {memory: 4Gi, cpu: '2'}}");
    assert!(resource_deviations(&declared, Some(&same)).is_empty());
    let lower: k8s_openapi::api::core::v1::ResourceRequirements =
        yaml("{requests: {cpu: 250m, memory: 2Gi}}");
    assert_eq!(
        resource_deviations(&declared, Some(&lower)),
        vec![
            "requests.cpu is 250m, declared 500m",
            "limits.memory is unset, declared 4Gi"
        ]
    );
    assert_eq!(resource_deviations(&declared, None).len(), 3);
}

#[test]
fn container_resources_are_patched_and_their_owner_named() {
    let r = rules("resources: {requests: {cpu: 500m, memory: 2Gi}}");
    let p = plan(
        &r,
        &with_resources("{requests: {cpu: 100m, memory: 2Gi}}"),
        &policy(),
        true,
    );
    assert!(p.rolls_pods);
    assert_eq!(
        p.deployment_patch.unwrap()["spec"],
        json!({"template": {"spec": {"containers": [
            {"name": "discovery", "resources": {"requests": {"cpu": "500m", "memory": "2Gi"}}}
        ]}}}),
        "only the declared resources of the one container"
    );
    assert_eq!(p.findings.len(), 1, "{:?}", p.findings);
    let f = &p.findings[0];
    assert!(f.fixable && f.message.contains("requests.cpu is 100m, declared 500m"));
    assert_eq!(f.changed_by, vec!["helm"]);
    assert_eq!(
        p.takeovers,
        vec![(
            "Deployment/istio-system/istiod container discovery resources".to_string(),
            "helm".to_string()
        )]
    );

    // The same amounts written differently: nothing to do.
    let p = plan(
        &r,
        &with_resources("{requests: {cpu: '0.5', memory: 2048Mi}}"),
        &policy(),
        true,
    );
    assert!(p.findings.is_empty() && p.deployment_patch.is_none() && !p.rolls_pods);
}

/// A PodDisruptionBudget meshwarden created for policy `p`.
fn own_pdb(spec: &str) -> PodDisruptionBudget {
    yaml(&format!(
        "metadata:
  name: istiod-meshwarden
  namespace: istio-system
  labels: {{app.kubernetes.io/managed-by: meshwarden, meshwarden.io/policy: p}}
  managedFields:
  - {{manager: meshwarden, operation: Apply, apiVersion: policy/v1, fieldsType: FieldsV1, fieldsV1: {{f:spec: {{f:maxUnavailable: {{}}, f:minAvailable: {{}}, f:selector: {{}}}}}}}}
spec: {{{spec}, selector: {{matchLabels: {{app: istiod}}}}}}
"
    ))
}

fn pdb_finding(p: &Plan) -> &Finding {
    p.findings
        .iter()
        .find(|f| f.field == "PodDisruptionBudget" || f.object.starts_with("PodDisruptionBudget/"))
        .unwrap()
}

#[test]
fn of_two_budgets_meshwarden_deletes_its_own() {
    let r = rules("disruptionBudget: {maxUnavailable: 1}");
    let p = plan(
        &r,
        &obs(
            "replicas: 3",
            None,
            vec![chart_pdb(), own_pdb("maxUnavailable: 1")],
        ),
        &policy(),
        true,
    );
    let f = pdb_finding(&p);
    assert!(f.fixable && f.blocks_drain);
    assert!(
        f.message
            .contains("2 PodDisruptionBudgets select its pods (istiod, istiod-meshwarden)"),
        "{}",
        f.message
    );
    assert_eq!(
        p.pdb,
        Some(PdbAction::Delete {
            name: "istiod-meshwarden".into()
        })
    );

    // Two budgets of others: reported, none deleted.
    let mut other = chart_pdb();
    other.metadata.name = Some("istiod-extra".into());
    let p = plan(
        &r,
        &obs("replicas: 3", None, vec![chart_pdb(), other]),
        &policy(),
        true,
    );
    let f = pdb_finding(&p);
    assert!(!f.fixable && f.blocks_drain);
    assert!(p.pdb.is_none());
}

#[test]
fn an_undeclared_budget_that_blocks_drains_is_reported_only() {
    // The chart's minAvailable 1 at one replica allows no eviction.
    let p = plan(
        &rules("spread: {nodes: Preferred}"),
        &obs("replicas: 1", None, vec![chart_pdb()]),
        &policy(),
        true,
    );
    let f = pdb_finding(&p);
    assert!(!f.fixable && f.blocks_drain);
    assert!(
        f.message.contains("allows no disruption at 1 replica(s)"),
        "{}",
        f.message
    );
    assert!(p.pdb.is_none());
    // At two replicas it allows one: nothing to say.
    let p = plan(
        &rules("spread: {nodes: Preferred}"),
        &obs("replicas: 2", None, vec![chart_pdb()]),
        &policy(),
        true,
    );
    assert!(
        p.findings.iter().all(|f| f.field != "spec"),
        "{:?}",
        p.findings
    );
}

#[test]
fn a_budget_allowing_no_disruption_is_corrected_in_its_owners_form() {
    let mut pdb = chart_pdb();
    pdb.spec.as_mut().unwrap().min_available = Some(IntOrString::Int(3));
    let p = plan(
        &rules("disruptionBudget: {maxUnavailable: 1}"),
        &obs("replicas: 3", None, vec![pdb]),
        &policy(),
        true,
    );
    let f = pdb_finding(&p);
    assert!(f.fixable && f.blocks_drain);
    assert!(
        f.message.contains("allows no disruption at 3 replica(s)"),
        "{}",
        f.message
    );
    let Some(PdbAction::Apply { name, patch }) = p.pdb else {
        panic!("no PDB planned")
    };
    assert_eq!(name, "istiod");
    assert_eq!(patch["spec"], json!({"minAvailable": 2}));
}

#[test]
fn a_declared_budget_allowing_no_disruption_is_not_written() {
    let p = plan(
        &rules("disruptionBudget: {minAvailable: 3}"),
        &obs("replicas: 3", None, vec![]),
        &policy(),
        true,
    );
    let f = p
        .findings
        .iter()
        .find(|f| f.field == "disruptionBudget")
        .unwrap();
    assert!(!f.fixable && f.blocks_drain);
    assert!(f.message.contains("raise replicas.min"), "{}", f.message);
    assert!(p.pdb.is_none());
}

#[test]
fn meshwardens_own_budget_switches_form_and_clears_the_other() {
    let p = plan(
        &rules("disruptionBudget: {minAvailable: 2}"),
        &obs("replicas: 3", None, vec![own_pdb("maxUnavailable: 1")]),
        &policy(),
        true,
    );
    let Some(PdbAction::Apply { name, patch }) = p.pdb else {
        panic!("no PDB planned")
    };
    assert_eq!(name, "istiod-meshwarden");
    // The whole budget meshwarden created, every time: an apply without its selector, labels
    // or owner reference would remove them.
    let selector = json!({"matchLabels": {"app": "istiod"}});
    assert_eq!(
        patch["spec"],
        json!({"minAvailable": 2, "maxUnavailable": null, "selector": selector,
               "unhealthyPodEvictionPolicy": "AlwaysAllow"})
    );
    assert_eq!(patch["metadata"]["labels"]["meshwarden.io/policy"], "p");
    assert!(p.takeovers.is_empty(), "nobody else owns it");

    let p = plan(
        &rules("disruptionBudget: {maxUnavailable: 1}"),
        &obs("replicas: 3", None, vec![own_pdb("minAvailable: 2")]),
        &policy(),
        true,
    );
    let Some(PdbAction::Apply { patch, .. }) = p.pdb else {
        panic!("no PDB planned")
    };
    assert_eq!(
        patch["spec"],
        json!({"maxUnavailable": 1, "minAvailable": null, "selector": selector,
               "unhealthyPodEvictionPolicy": "AlwaysAllow"})
    );
}

#[test]
fn meshwardens_own_budget_lets_pods_that_are_not_ready_be_evicted() {
    // Created by an earlier version, without the eviction policy: written once.
    let p = plan(
        &rules("disruptionBudget: {maxUnavailable: 1}"),
        &obs("replicas: 3", None, vec![own_pdb("maxUnavailable: 1")]),
        &policy(),
        true,
    );
    let Some(PdbAction::Apply { patch, .. }) = p.pdb else {
        panic!("no PDB planned")
    };
    assert_eq!(patch["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
    assert_eq!(patch["spec"]["maxUnavailable"], 1);
    assert_eq!(patch["spec"]["selector"]["matchLabels"]["app"], "istiod");
    // With it: nothing to write.
    let p = plan(
        &rules("disruptionBudget: {maxUnavailable: 1}"),
        &obs(
            "replicas: 3",
            None,
            vec![own_pdb(
                "maxUnavailable: 1, unhealthyPodEvictionPolicy: AlwaysAllow",
            )],
        ),
        &policy(),
        true,
    );
    assert!(p.pdb.is_none(), "{:?}", p.pdb);
    // A budget of another owner is never given it.
    let p = plan(
        &rules("disruptionBudget: {maxUnavailable: 1}"),
        &obs("replicas: 3", None, vec![chart_pdb()]),
        &policy(),
        true,
    );
    if let Some(PdbAction::Apply { patch, .. }) = p.pdb {
        assert!(patch["spec"].get("unhealthyPodEvictionPolicy").is_none());
    }
}
