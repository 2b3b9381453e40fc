use serde_json::json;

use super::*;

fn deployment(cpu: &str, manager: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {
            "name": "istiod", "namespace": "istio-system", "generation": 3,
            "resourceVersion": "10", "uid": "u",
            "managedFields": [{
                "manager": manager, "operation": "Apply", "apiVersion": "apps/v1",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {
                    "k:{\"name\":\"discovery\"}": {".": {}, "f:name": {}, "f:resources": {"f:requests": {"f:cpu": {}}}}
                }}}}}
            }]
        },
        "spec": {"replicas": replicas, "template": {"spec": {"containers": [
            {"name": "discovery", "resources": {"requests": {"cpu": cpu}}}
        ]}}},
        "status": {"replicas": replicas}
    })
}

fn change(before: Option<Value>, after: Option<Value>, verb: Verb) -> Change {
    Change {
        seq: 0,
        kind: "Deployment".into(),
        namespace: Some("istio-system".into()),
        name: "istiod".into(),
        verb,
        before,
        after,
        released: Vec::new(),
        refused: None,
        sent: None,
    }
}

#[test]
fn a_takeover_is_named_by_manager_and_field_and_a_template_change_rolls() {
    let before = deployment("10m", "helm", 2);
    let after = deployment("500m", "meshwarden", 2);
    let c = object_change(change(Some(before), Some(after), Verb::Apply));
    assert_eq!(c.action, Action::Update);
    assert_eq!(
        c.takeovers,
        [Takeover {
            manager: "helm".into(),
            fields: vec![
                "spec.replicas".into(),
                "spec.template.spec.containers[name=discovery].resources.requests.cpu".into(),
            ],
            shared: Vec::new(),
        }]
    );
    assert_eq!(
        c.rollout,
        Some(Rollout {
            pods: Some(2),
            cause: None
        })
    );
    // What every write changes is not shown.
    let after = c.after.unwrap();
    assert!(after.get("status").is_none());
    assert!(after["metadata"].get("managedFields").is_none());
    assert!(after["metadata"].get("resourceVersion").is_none());
}

#[test]
fn creates_deletes_refusals_and_writes_that_change_nothing() {
    let d = deployment("10m", "meshwarden", 1);
    let create = object_change(change(None, Some(d.clone()), Verb::Apply));
    assert_eq!((create.action, create.rollout), (Action::Create, None));
    let delete = object_change(change(Some(d.clone()), None, Verb::Delete));
    assert_eq!(delete.action, Action::Delete);
    let same = object_change(change(Some(d.clone()), Some(d.clone()), Verb::Apply));
    assert_eq!(same.action, Action::Unchanged);
    let mut refused = change(Some(d), None, Verb::Apply);
    refused.refused = Some("frozen".into());
    assert_eq!(object_change(refused).action, Action::Refused);
}

fn plan_of(changes: Vec<ObjectChange>, failed: bool) -> Plan {
    Plan {
        policy: "p".into(),
        notes: Vec::new(),
        changes,
        not_written: Vec::new(),
        failed_sections: match failed {
            true => vec![NotWritten {
                section: "MutualTLS".into(),
                object: "MeshPolicy/p".into(),
                action: "Forbidden".into(),
                message: "no".into(),
            }],
            false => Vec::new(),
        },
        waves: None,
        restart_waves: None,
        stopped_sections: Vec::new(),
    }
}

#[test]
fn exit_codes_say_nothing_pending_pending_or_incomplete() {
    let d = deployment("10m", "helm", 1);
    let same = object_change(change(Some(d.clone()), Some(d.clone()), Verb::Apply));
    let update = object_change(change(
        Some(d),
        Some(deployment("20m", "meshwarden", 1)),
        Verb::Apply,
    ));
    assert_eq!(plan_of(vec![], false).exit_code(), 0);
    assert_eq!(plan_of(vec![same], false).exit_code(), 0);
    assert_eq!(plan_of(vec![update.clone()], false).exit_code(), 2);
    assert_eq!(plan_of(vec![update], true).exit_code(), 1);
}

#[test]
fn the_diff_output_shows_fields_takeovers_and_rollouts() {
    let update = object_change(change(
        Some(deployment("10m", "helm", 2)),
        Some(deployment("500m", "meshwarden", 2)),
        Verb::Apply,
    ));
    let text = render(&plan_of(vec![update], false), Output::Diff).unwrap();
    assert!(
        text.contains("~ Deployment istio-system/istiod (updated; its pods roll: 2 pods)\n"),
        "{text}"
    );
    assert!(
        text.contains("  takes over from helm: spec.replicas, "),
        "{text}"
    );
    assert!(text.contains("--- Deployment istio-system/istiod (live)\n+++ Deployment istio-system/istiod (after)\n"), "{text}");
    assert!(
        text.contains("-            cpu: 10m\n+            cpu: 500m\n"),
        "{text}"
    );
    assert!(text.ends_with("Plan: 0 to create, 1 to update, 0 to delete, 0 refused; 1 workload(s) roll (2 pods), 0 held\n"), "{text}");
    let json = render(&plan_of(vec![], false), Output::Json).unwrap();
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["policy"], "p");
    assert!(
        render(&plan_of(vec![], false), Output::Diff)
            .unwrap()
            .ends_with("No changes: Enforce would write nothing now (0 held).\n")
    );
}

#[test]
fn every_section_is_forced_to_enforce() {
    let mut p: MeshPolicy = serde_yaml::from_str(
        "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {name: p}\nspec:\n  controlPlane: {enforcement: Audit, namespace: istio-system}\n  mtls: {enforcement: Audit, mode: STRICT}\n  upgrades: {enforcement: Audit}\n  gatewayApi: {enforcement: Audit, classes: [{className: istio}]}\n",
    )
    .unwrap();
    enforce_everything(&mut p.spec);
    assert_eq!(p.spec.enforcement, Enforcement::Enforce);
    assert_eq!(p.spec.control_plane.unwrap().enforcement, None);
    assert_eq!(p.spec.mtls.unwrap().enforcement, None);
    assert_eq!(p.spec.upgrades.unwrap().enforcement, None);
    assert_eq!(p.spec.gateway_api.unwrap().enforcement, None);
}

#[test]
fn the_same_value_applied_is_owned_with_its_manager_not_taken_over() {
    let entry = |manager: &str| {
        json!({"manager": manager, "operation": "Apply", "apiVersion": "apps/v1", "fieldsType": "FieldsV1",
            "fieldsV1": {"f:spec": {"f:minReplicas": {}}}})
    };
    let object = |entries: Vec<Value>| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "istiod", "namespace": "istio-system", "managedFields": entries},
            "spec": {"minReplicas": 2}})
    };
    let c = object_change(change(
        Some(object(vec![entry("helm")])),
        Some(object(vec![entry("helm"), entry("meshwarden")])),
        Verb::Apply,
    ));
    assert_eq!(
        c.takeovers,
        [Takeover {
            manager: "helm".into(),
            fields: Vec::new(),
            shared: vec!["spec.minReplicas".into()],
        }]
    );
    assert_eq!(c.action, Action::Unchanged, "no value changes hands");
}

#[test]
fn waves_count_the_rollouts_now_and_those_waiting_for_a_slot() {
    assert_eq!(Waves::of(1, 0, 1), None, "nothing waits: no waves to tell");
    let w = Waves::of(2, 5, 2).unwrap();
    assert_eq!((w.waves, w.max_concurrent), (4, 2), "2 now, then 2, 2, 1");
    assert_eq!(
        Waves::of(0, 3, 2).unwrap().waves,
        2,
        "slots taken by rollouts in progress"
    );
    let update = object_change(change(
        Some(deployment("10m", "helm", 2)),
        Some(deployment("500m", "meshwarden", 2)),
        Verb::Apply,
    ));
    let mut p = plan_of(vec![update], false);
    p.waves = Waves::of(1, 1, 1);
    let text = render(&p, Output::Diff).unwrap();
    assert!(
        text.contains(
            "; sidecars roll in 2 paced wave(s) of at most 1 (1 now, 1 waiting for a slot)"
        ),
        "{text}"
    );
}

#[test]
fn a_restart_is_told_from_a_sidecar_rollout_and_its_waves_are_told_apart() {
    let with = |annotations: Value| {
        let mut d = deployment("10m", "meshwarden", 3);
        d["spec"]["template"]["metadata"] = json!({ "annotations": annotations });
        d
    };
    let restarted = object_change(change(
        Some(with(json!({}))),
        Some(with(
            json!({(crate::rules::sidecars::RESTARTED_AT): "2026-12-07T16:00:00Z"}),
        )),
        Verb::Apply,
    ));
    assert_eq!(
        restarted.rollout,
        Some(Rollout {
            pods: Some(3),
            cause: Some(Cause::Restart)
        })
    );
    let sidecar = object_change(change(
        Some(with(json!({}))),
        Some(with(
            json!({(crate::rules::sidecars::HASH_ANNOTATION): "h"}),
        )),
        Verb::Apply,
    ));
    assert_eq!(
        sidecar.rollout.as_ref().and_then(|r| r.cause),
        Some(Cause::Sidecars)
    );
    // A drift put right: an annotation someone removed written back, the hash as it was.
    let hashed = |more: Value| {
        let mut a = json!({(crate::rules::sidecars::HASH_ANNOTATION): "h"});
        a.as_object_mut()
            .unwrap()
            .extend(more.as_object().unwrap().clone());
        with(a)
    };
    let drift = object_change(change(
        Some(hashed(json!({}))),
        Some(hashed(
            json!({(crate::rules::sidecars::PROXY_MEMORY_LIMIT): "512Mi"}),
        )),
        Verb::Apply,
    ));
    assert_eq!(drift.rollout.and_then(|r| r.cause), Some(Cause::Sidecars));
    let mut p = plan_of(vec![restarted, sidecar], false);
    p.restart_waves = Waves::of(1, 3, 2);
    let text = render(&p, Output::Diff).unwrap();
    assert!(
        text.contains(
            "; restarts run in 3 paced wave(s) of at most 2 (1 now, 3 waiting for a slot)"
        ),
        "{text}"
    );
    assert!(!text.contains("sidecars roll in"), "{text}");
    assert!(
        text.contains("(updated; its pods roll: 3 pods)\n  a restart by the upgrades section (its proxies are outdated)\n"),
        "{text}"
    );
    assert!(
        text.contains("  a sidecar rollout (its proxy resources change)\n"),
        "{text}"
    );
    let json: Value = serde_json::from_str(&render(&p, Output::Json).unwrap()).unwrap();
    assert_eq!(json["changes"][0]["rollout"]["cause"], "restart");
    assert_eq!(json["changes"][1]["rollout"]["cause"], "sidecars");
}

#[test]
fn a_section_stopped_at_a_refused_write_says_its_later_writes_were_not_planned() {
    let pa = |name: &str, refused: Option<&str>| ObjectChange {
        kind: "PeerAuthentication".into(),
        namespace: Some("apps".into()),
        name: name.into(),
        action: if refused.is_some() {
            Action::Refused
        } else {
            Action::Create
        },
        before: None,
        after: None,
        takeovers: Vec::new(),
        released: Vec::new(),
        refused: refused.map(str::to_string),
        sent: None,
        rollout: None,
    };
    let changes = vec![
        pa("other", None),
        pa("meshwarden-mtls", Some("no new ones")),
    ];
    // As the section's error names the write it stopped at.
    let message = "apply PeerAuthentication meshwarden-mtls: no new ones";
    assert_eq!(
        stopped_at(&changes, message),
        ["PeerAuthentication apps/meshwarden-mtls"]
    );
    assert!(stopped_at(&changes, "list Namespaces: forbidden").is_empty());
    let mut p = plan_of(changes, false);
    p.stopped_sections = vec![Stopped {
        section: "MutualTLS".into(),
        at: stopped_at(&p.changes, message),
        message: NOT_PLANNED_AFTER_REFUSAL.into(),
    }];
    let text = render(&p, Output::Diff).unwrap();
    let line = format!("  MutualTLS stops here: {NOT_PLANNED_AFTER_REFUSAL}\n");
    assert!(
        text.contains(&format!(
            "! PeerAuthentication apps/meshwarden-mtls (REFUSED by the API server)\n  refused: no new ones\n{line}"
        )),
        "{text}"
    );
    assert_eq!(
        text.matches(&line).count(),
        1,
        "once, after the refusal: {text}"
    );
    assert_eq!(p.exit_code(), 2, "the plan is complete");
    let json: Value = serde_json::from_str(&render(&p, Output::Json).unwrap()).unwrap();
    assert_eq!(
        json["stoppedSections"],
        json!([{"section": "MutualTLS", "at": ["PeerAuthentication apps/meshwarden-mtls"],
            "message": NOT_PLANNED_AFTER_REFUSAL}])
    );
    let yaml = render(&p, Output::Yaml).unwrap();
    assert!(yaml.contains("stoppedSections:\n"), "{yaml}");
    assert!(
        render(&plan_of(vec![], false), Output::Json)
            .unwrap()
            .find("stoppedSections")
            .is_none(),
        "none, none printed"
    );
}
