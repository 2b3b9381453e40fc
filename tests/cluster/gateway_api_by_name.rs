//! A single Gateway API Gateway selected by name (`gatewayApi.gateways[]`) on the full
//! cluster, with the real istiod rendering it: meshwarden keeps a ConfigMap in the Gateway's
//! namespace and sets the Gateway's `spec.infrastructure.parametersRef` to it (server-side
//! apply of that one field), istiod lays it over the class's defaults, and another Gateway of
//! the same class stays as istiod renders it. The test's GatewayClass is its own (controller
//! `istio.io/gateway-controller`), so that no other test's class defaults reach its Gateways.

use kube::api::DynamicObject;

use super::gateway_api::{
    Posture, Sampler, condition, env_with_crds, gateway, gateways_api, posture, rerendered, text,
    zones,
};
use super::*;

/// The annotation of a policy that may hold Gateways selected by name.
const HOLDS: &str = "meshwarden.io/gateway-parameters";

/// The Gateway as the test reads it: its parametersRef (name), and the managers of that
/// field.
async fn reference(client: &Client, ns: &str, name: &str) -> (Option<String>, Vec<String>) {
    let g: DynamicObject = gateways_api(client, ns).get(name).await.unwrap();
    let r = g.data["spec"]["infrastructure"]["parametersRef"]["name"]
        .as_str()
        .map(str::to_string);
    let managers = g
        .managed_fields()
        .iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.to_string().contains("f:parametersRef"))
        })
        .filter_map(|m| m.manager.clone())
        .collect();
    (r, managers)
}

/// Waits for the GatewayAPIHA condition's `reason`; its message must hold each of `says`.
async fn reported(api: &Api<MeshPolicy>, policy: &str, reason: &str, says: &[&str]) {
    let c = common::eventually(120, &format!("condition {reason}"), || async {
        let c = condition(api, policy).await;
        (c.1 == reason).then_some(c)
    })
    .await;
    assert!(says.iter().all(|s| c.2.contains(s)), "{}", c.2);
}

/// What the two layers of overlays became in Deployment `name`: (HPA minReplicas, PDB
/// (minAvailable, maxUnavailable), pod anti-affinity (required, preferred)).
type Layers = (Option<i32>, (Option<String>, Option<String>), (bool, bool));

async fn layers(client: &Client, ns: &str, name: &str) -> Layers {
    let (_, _, hpa, _) = posture(client, ns, name).await;
    let pdb = Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
        .and_then(|b| b.spec)
        .map(|s| (s.min_available.map(text), s.max_unavailable.map(text)))
        .unwrap_or_default();
    let anti = Api::<Deployment>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
        .and_then(|d| d.spec?.template.spec?.affinity?.pod_anti_affinity)
        .map(|a| {
            (
                a.required_during_scheduling_ignored_during_execution
                    .is_some_and(|t| !t.is_empty()),
                a.preferred_during_scheduling_ignored_during_execution
                    .is_some_and(|t| !t.is_empty()),
            )
        })
        .unwrap_or_default();
    (hpa, pdb, anti)
}

async fn config_map(client: &Client, ns: &str, name: &str) -> Option<ConfigMap> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

/// 1. Enforce, one Gateway selected by name: it reaches 2 replicas (the HPA istiod renders), a
///    PDB with maxUnavailable 1 and zone spread, judged by what runs; another Gateway of the
///    same class keeps one replica, no HPA, no PDB, no spread; meshwarden is the only manager
///    of the Gateway's parametersRef.
/// 2. istiod re-renders three times (annotation changes on both Gateways, applied by another
///    manager): zero writes by meshwarden, nothing reverted.
/// 2b. The policy declares the class too, with another budget form and required node spread:
///    the other Gateway takes the class's posture; istiod lays the selected Gateway's
///    overlays over the class's and renders its entry's (the class's `minAvailable` nulled,
///    its required anti-affinity replaced).
/// 3. Audit: the parametersRef and the ConfigMap go, then the HPA and PDB istiod leaves
///    behind; the finalizer goes.
/// 4. Somebody else's parametersRef, then Enforce: meshwarden writes nothing and says what to
///    add to theirs (`GatewayParametersExist`); theirs goes, meshwarden's comes back.
/// 5. The policy is deleted: no parametersRef, ConfigMap, HPA or PDB left, the policy gone.
///
/// Through every step the selected gateway has a replica available (sampled every 200 ms).
#[tokio::test]
async fn gateway_api_single_gateway_selected_by_name_reaches_ha_through_its_parameters() {
    let env = env_with_crds("gwname").await;
    let class = env.id.clone();
    testplane::apply_yaml(
        &env.client,
        &format!("apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {{name: {class}}}\nspec: {{controllerName: istio.io/gateway-controller}}\n"),
        &[],
    )
    .await
    .expect("create the test's GatewayClass");
    let ns = format!("{}-edge", env.id);
    namespace(&env.client, &ns, json!({})).await;
    let apply = |n: u32| {
        let (client, ns, class) = (env.client.clone(), ns.clone(), class.clone());
        async move {
            for name in ["public", "internal"] {
                gateways_api(&client, &ns)
                    .patch(
                        name,
                        &PatchParams::apply("gwapi-test").force(),
                        &Patch::Apply(gateway(name, &class, json!({}), n)),
                    )
                    .await
                    .expect("apply a Gateway");
            }
        }
    };
    apply(0).await;
    let (public, internal) = (format!("public-{class}"), format!("internal-{class}"));
    let untouched: Posture = (1, false, None, None);
    common::eventually(120, "istiod deploys both Gateways", || async {
        let a = posture(&env.client, &ns, &public).await;
        let b = posture(&env.client, &ns, &internal).await;
        (a == untouched && b == untouched).then_some(())
    })
    .await;
    let sampler = Sampler::start(&env.client, &ns, vec![public.clone()]);

    let spec = format!(
        "enforcement: Enforce
gatewayApi:
  gateways:
  - name: public
    namespace: {ns}
    replicas: {{min: 2}}
    disruptionBudget: {{maxUnavailable: 1}}
    spread: {{nodes: Preferred, zones: Preferred}}
"
    );
    let start = Instant::now();
    env.create_policy("gwname", &spec).await;
    let op = env.start_operator().await;
    let api: Api<MeshPolicy> = Api::all(env.client.clone());
    let policy = env.policy_name("gwname");
    let cm = format!("meshwarden-{policy}-public");
    let held: Posture = (2, true, Some(2), Some("1".into()));

    // 1. The declared HA for the selected Gateway only.
    common::eventually(
        120,
        "1. public: 2 available, HPA, PDB, zone spread",
        || async { (posture(&env.client, &ns, &public).await == held).then_some(()) },
    )
    .await;
    let reached = start.elapsed();
    common::eventually(120, "1. public's pods in two zones", || async {
        (zones(&env.client, &ns, "public").await.len() >= 2).then_some(())
    })
    .await;
    common::eventually(120, "1. GatewayAPIHA True", || async {
        (condition(&api, &policy).await.0 == "True").then_some(())
    })
    .await;
    eprintln!(
        "1. declared HA reached {:.1}s after the policy",
        reached.as_secs_f64()
    );
    assert_eq!(
        posture(&env.client, &ns, &internal).await,
        untouched,
        "1. the other Gateway of the class is untouched"
    );
    let p = api.get(&policy).await.unwrap();
    assert!(
        p.annotations().contains_key(HOLDS),
        "1. the policy is marked as holding Gateways"
    );
    assert_eq!(
        reference(&env.client, &ns, "public").await,
        (Some(cm.clone()), vec!["meshwarden".to_string()]),
        "1. public references meshwarden's ConfigMap, meshwarden alone manages the field"
    );
    assert_eq!(reference(&env.client, &ns, "internal").await.0, None);
    let data = config_map(&env.client, &ns, &cm)
        .await
        .expect("1. the ConfigMap");
    let owner = data.owner_references().first().cloned().expect("an owner");
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Gateway", "public")
    );

    // 2. Three re-renders: no write by meshwarden, nothing reverted.
    let writes = op.writes();
    for n in 1..=3u32 {
        apply(n).await;
        let until = Instant::now() + Duration::from_secs(8);
        while Instant::now() < until {
            let p = posture(&env.client, &ns, &public).await;
            assert!(
                p.1 && p.2 == Some(2) && p.3.as_deref() == Some("1"),
                "2. re-render {n} reverted the posture: {p:?}"
            );
            let other = posture(&env.client, &ns, &internal).await;
            assert!(other.2.is_none() && !other.1, "2. {other:?}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    rerendered(&env.client, &ns, &public, 3).await;
    assert_eq!(op.writes(), writes, "2. meshwarden wrote during re-renders");
    assert_eq!(
        reference(&env.client, &ns, "public").await.0,
        Some(cm.clone()),
        "2. the other manager's applies keep the reference"
    );

    // 2b. The class declared too: each Gateway at its own entry's posture.
    let with_class = spec.replace(
        "gatewayApi:\n",
        &format!("gatewayApi:\n  classes:\n  - className: {class}\n    replicas: {{min: 3}}\n    disruptionBudget: {{minAvailable: 1}}\n    spread: {{nodes: Required, zones: Preferred}}\n"),
    );
    env.set_spec("gwname", &with_class).await;
    common::eventually(
        120,
        "2b. internal at the class's posture, public at its own",
        || async {
            let i = layers(&env.client, &ns, &internal).await;
            let p = layers(&env.client, &ns, &public).await;
            let class_posture = (Some(3), (Some("1".into()), None), (true, false));
            let own = (Some(2), (None, Some("1".into())), (false, true));
            (i == class_posture && p == own).then_some(())
        },
    )
    .await;
    common::eventually(120, "2b. GatewayAPIHA True", || async {
        (condition(&api, &policy).await.0 == "True").then_some(())
    })
    .await;
    env.set_spec("gwname", &spec).await;
    common::eventually(120, "2b. the class let go", || async {
        let i = posture(&env.client, &ns, &internal).await;
        (i.2.is_none() && !i.1).then_some(())
    })
    .await;

    // 3. Audit: the reference, the ConfigMap, then what istiod left behind, go.
    env.set_spec(
        "gwname",
        &spec.replace("enforcement: Enforce", "enforcement: Audit"),
    )
    .await;
    common::eventually(120, "3. Audit: nothing of meshwarden's left", || async {
        let p = posture(&env.client, &ns, &public).await;
        let r = reference(&env.client, &ns, "public").await;
        let c = config_map(&env.client, &ns, &cm).await;
        (r == (None, vec![]) && c.is_none() && p.2.is_none() && p.3.is_none() && !p.1).then_some(())
    })
    .await;
    reported(
        &api,
        &policy,
        "NonCompliant",
        &["Audit mode", "parameters of Gateway"],
    )
    .await;
    common::eventually(
        60,
        "3. Audit: the finalizer and the mark removed",
        || async {
            let p = api.get(&policy).await.ok()?;
            (p.finalizers().is_empty() && !p.annotations().contains_key(HOLDS)).then_some(())
        },
    )
    .await;

    // 4. Somebody else's parameters: nothing written, advice; then meshwarden's come back.
    let theirs = format!("{}-tuning", env.id);
    let cms: Api<ConfigMap> = Api::namespaced(env.client.clone(), &ns);
    let their_cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": theirs},
        "data": {"service": "metadata: {annotations: {team: edge}}"},
    }))
    .unwrap();
    cms.create(&PostParams::default(), &their_cm).await.unwrap();
    // Their manager sets the field (Some) or gives it up (None).
    let set_theirs = |name: Option<String>| {
        let mut patch = json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                               "metadata": {"name": "public"}});
        if let Some(n) = name {
            patch["spec"] = json!({"infrastructure": {"parametersRef": {"group": "", "kind": "ConfigMap", "name": n}}});
        }
        let api = gateways_api(&env.client, &ns);
        async move {
            api.patch(
                "public",
                &PatchParams::apply("team-edge"),
                &Patch::Apply(patch),
            )
            .await
            .unwrap();
        }
    };
    set_theirs(Some(theirs.clone())).await;
    env.set_spec("gwname", &spec).await;
    let advice = ["add to its data", "horizontalPodAutoscaler"];
    reported(&api, &policy, "GatewayParametersExist", &advice).await;
    assert!(config_map(&env.client, &ns, &cm).await.is_none());
    assert_eq!(
        reference(&env.client, &ns, "public").await,
        (Some(theirs.clone()), vec!["team-edge".to_string()])
    );
    // Theirs goes (their manager gives the field up): meshwarden's come back.
    set_theirs(None).await;
    common::eventually(120, "4. meshwarden's parameters back", || async {
        let r = reference(&env.client, &ns, "public").await;
        (r.0 == Some(cm.clone()) && posture(&env.client, &ns, &public).await.2 == Some(2))
            .then_some(())
    })
    .await;

    // 5. The policy deleted: nothing left.
    api.delete(&policy, &DeleteParams::default()).await.unwrap();
    common::eventually(120, "5. deleted: nothing of meshwarden's left", || async {
        let p = posture(&env.client, &ns, &public).await;
        let r = reference(&env.client, &ns, "public").await;
        let c = config_map(&env.client, &ns, &cm).await;
        let gone = api.get_opt(&policy).await.unwrap().is_none();
        (gone && r.0.is_none() && c.is_none() && p.2.is_none() && p.3.is_none()).then_some(())
    })
    .await;

    sampler.finish("public").await;
    op.stop().await;
    for name in ["public", "internal"] {
        gateways_api(&env.client, &ns)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
}
