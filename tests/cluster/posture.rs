//! Posture judged by what runs, on the full cluster: the HA sections report replicas that do
//! not serve (with the scheduler's own message), budgets that block drains (naming the
//! nodes), and pods crowded into one zone, after a grace period; and they say True again once
//! the cluster recovers. The scheduler, the disruption controller and `kubectl drain` are
//! real. The test brings three nodes of its own (one per zone), tainted so that only its pods
//! run there: cordoning them disturbs no other test.

use super::*;

/// The test's grace period (the default is two minutes).
const GRACE: Duration = Duration::from_secs(10);

/// Node `name` in `zone`, run by kwok, labelled and tainted `pool=<pool>`.
pub(super) fn node(name: &str, zone: &str, pool: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "topology.kubernetes.io/zone": zone,
                "type": "kwok",
                "pool": pool,
            },
        },
        "spec": {"taints": [{"key": "pool", "value": pool, "effect": "NoSchedule"}]},
        "status": {
            "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "250"},
            "capacity": {"cpu": "64", "memory": "256Gi", "pods": "250"},
        },
    })
}

/// A Deployment of `replicas` pods labelled `app: <name>` that run only on the pool's nodes.
/// It rolls one pod at a time without a surge pod: with required anti-affinity on as many
/// nodes as replicas, a surge pod would fit nowhere.
fn pooled(name: &str, replicas: i32, pool: &str) -> serde_json::Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "nodeSelector": {"pool": pool},
                    "tolerations": [{"key": "pool", "operator": "Equal", "value": pool, "effect": "NoSchedule"}],
                    "containers": [{"name": "istio-proxy", "image": "registry.example/proxy:1"}],
                },
            },
        },
    })
}

async fn cordon(nodes: &Api<Node>, name: &str, on: bool) {
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"unschedulable": if on { json!(true) } else { json!(null) }}}),
            ),
        )
        .await
        .unwrap();
}

/// Every node as the HA sections judge it (zone, cordon, Ready, taints): what a failure
/// names.
async fn described_nodes(nodes: &Api<Node>) -> String {
    let list = nodes.list(&Default::default()).await.unwrap();
    let each = list.items.iter().map(|n| {
        let zone = n.labels().get("topology.kubernetes.io/zone").cloned();
        let spec = n.spec.clone().unwrap_or_default();
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.clone());
        let taints: Vec<String> = spec
            .taints
            .iter()
            .flatten()
            .map(|t| format!("{}:{}", t.key, t.effect))
            .collect();
        format!(
            "{} zone={zone:?} unschedulable={:?} ready={ready:?} taints={taints:?}",
            n.name_any(),
            spec.unschedulable
        )
    });
    each.collect::<Vec<_>>().join("; ")
}

/// `app`'s pods: node, phase, Ready.
async fn described_pods(pods: &Api<Pod>, app: &str) -> String {
    let list = pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap();
    let each = list.items.iter().map(|p| {
        let status = p.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status.clone());
        format!(
            "{} node={:?} phase={:?} ready={ready:?}",
            p.name_any(),
            p.spec.as_ref().and_then(|s| s.node_name.clone()),
            status.phase
        )
    });
    each.collect::<Vec<_>>().join("; ")
}

/// The nodes the ready pods of `app` run on, sorted.
async fn nodes_of(pods: &Api<Pod>, app: &str) -> Vec<String> {
    let mut n: Vec<String> = ready_pods(pods, app)
        .await
        .iter()
        .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
        .collect();
    n.sort();
    n
}

/// `kubectl drain` of `node` for `app`'s pods (evictions through the budgets).
fn drain(plane: &testplane::SharedPlane, node: &str, app: &str) -> std::process::Output {
    Command::new(testplane::tools_dir().join("kubectl"))
        .args([
            "--kubeconfig",
            &plane.kubeconfig.display().to_string(),
            "drain",
            node,
            "--ignore-daemonsets",
            &format!("--pod-selector=app={app}"),
            "--timeout=20s",
        ])
        .output()
        .expect("run kubectl drain")
}

/// (status, reason) of the policy's GatewayHA and Ready conditions, and its GatewayHA
/// violations as (object, message).
type Seen = (String, String, String, Vec<(String, String)>);

async fn seen(api: &Api<MeshPolicy>, name: &str) -> Seen {
    let p = api.get(name).await.unwrap();
    let c = |t: &str| {
        common::condition(&p, t)
            .map(|c| (c.status.clone(), c.reason.clone()))
            .unwrap_or_default()
    };
    let (status, reason) = c("GatewayHA");
    let ready = c("Ready").0;
    let v = p
        .status
        .clone()
        .unwrap_or_default()
        .violations
        .into_iter()
        .filter(|v| v.rule == "GatewayHA")
        .map(|v| (v.object, v.message))
        .collect();
    (status, reason, ready, v)
}

/// Waits until what is seen passes `done`; returns it.
async fn wait_seen(
    api: &Api<MeshPolicy>,
    name: &str,
    what: &str,
    secs: u64,
    done: impl Fn(&Seen) -> bool,
) -> Seen {
    let start = Instant::now();
    loop {
        let s = seen(api, name).await;
        if done(&s) {
            return s;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            let p = api.get(name).await.unwrap();
            let c = common::condition(&p, "GatewayHA").map(|c| c.message.clone());
            panic!("waiting for {what}: got {s:?}; message: {c:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the GatewayHA condition has `reason` (`True`: any reason with status True,
/// such as `Compliant` or `FieldOwnedByOther` after meshwarden took over the replica count);
/// returns what was seen then.
async fn wait_reason(api: &Api<MeshPolicy>, name: &str, reason: &str, secs: u64) -> Seen {
    let what = format!("GatewayHA {reason}");
    wait_seen(api, name, &what, secs, |s| {
        s.1 == reason || (reason == "True" && s.0 == "True")
    })
    .await
}

/// The value of the operator's metric line starting with `series` (labels included).
fn metric(op: &common::Operator, series: &str) -> Option<String> {
    op.state
        .ctx
        .metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next().map(str::to_string))
}

/// 1. Converge: three `edge` pods on three nodes, the budget allows one disruption, True.
/// 2. A node cordoned and its `edge` pod evicted: the new pod cannot be placed (required
///    anti-affinity). Within the grace period `Progressing`; then `DrainBlocked` with the
///    pending pod named with the scheduler's message, the budget's nodes named, Ready False;
///    an eviction on those nodes is refused for real.
/// 3. Uncordoned: the pod is placed, True again.
/// 4. `kubectl drain` of a node while meshwarden's budget covers `edge`: it completes.
///    Uncordoned: True again.
/// 5. `zonal` (zones: Preferred) placed in one zone while the other zones were cordoned, then
///    uncordoned: `SpreadNotAchieved` naming the zone, and nothing moves (report only). With
///    `rebalance: Evict`: one eviction by meshwarden, the replacement placed in another zone,
///    True again.
/// 6. Policy deleted: the per-target metrics are gone.
#[tokio::test]
async fn posture_is_judged_by_what_runs() {
    let env = common::cluster_env("posture").await;
    let started = Instant::now();
    let pool = env.id.clone();
    let nodes: Api<Node> = Api::all(env.client.clone());
    let names: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|z| format!("{pool}-{z}"))
        .collect();
    for (name, zone) in names.iter().zip(["zone-a", "zone-b", "zone-c"]) {
        nodes
            .patch(
                name,
                &PatchParams::apply("posture-test").force(),
                &Patch::Apply(node(name, zone, &pool)),
            )
            .await
            .unwrap();
    }
    let ns = format!("{pool}-edge");
    namespace(&env.client, &ns, json!({})).await;
    let deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &ns);
    for d in [pooled("edge", 1, &pool)] {
        deploys
            .create(&PostParams::default(), &serde_json::from_value(d).unwrap())
            .await
            .unwrap();
    }
    let gateway = |name: &str, spread: &str, min: i32| {
        format!(
            "  - name: {name}
    namespace: {ns}
    selector: {{matchLabels: {{app: {name}}}}}
    replicas: {{min: {min}}}
    disruptionBudget: {{maxUnavailable: 1}}
    spread: {spread}
"
        )
    };
    let edge = gateway("edge", "{nodes: Required, zones: Off}", 3);
    env.create_policy(
        "posture",
        &format!("enforcement: Enforce\ngateways:\n{edge}"),
    )
    .await;
    let op = env
        .start_operator_with(|ctx| ctx.availability_grace = GRACE)
        .await;
    let api: Api<MeshPolicy> = Api::all(env.client.clone());
    let policy = env.policy_name("posture");
    let budget_allows = |n: i32| {
        let pdbs = pdbs.clone();
        async move {
            common::eventually(60, "the budget's disruptionsAllowed", || async {
                let s = pdbs.get("edge-meshwarden").await.ok()?.status?;
                (s.disruptions_allowed == n).then_some(())
            })
            .await
        }
    };
    // 1. Converged: meshwarden's template (required anti-affinity) rolled out, three pods on
    // three nodes, one disruption allowed, True.
    wait_equal(
        120,
        "1. edge rolled out with anti-affinity on the three pool nodes",
        || async {
            let d = deploys.get("edge").await.unwrap();
            let anti = common::anti_affinity_terms(&d) > 0;
            let three = d.spec.as_ref().and_then(|s| s.replicas) == Some(3);
            if anti && three && !rolling(&d) {
                nodes_of(&pods, "edge").await
            } else {
                Vec::new()
            }
        },
        names.clone(),
    )
    .await;
    budget_allows(1).await;
    let s = wait_reason(&api, &policy, "True", 60).await;
    assert_eq!((s.0.as_str(), s.2.as_str()), ("True", "True"), "1. {s:?}");
    let series = |state: &str| {
        format!(
            "meshwarden_ha_replicas{{policy=\"{policy}\",section=\"GatewayHA\",namespace=\"{ns}\",deployment=\"edge\",state=\"{state}\"}}"
        )
    };
    let allowed = format!(
        "meshwarden_ha_disruptions_allowed{{policy=\"{policy}\",section=\"GatewayHA\",namespace=\"{ns}\",deployment=\"edge\"}}"
    );
    assert_eq!(metric(&op, &series("available")).as_deref(), Some("3"));
    assert_eq!(metric(&op, &series("wanted")).as_deref(), Some("3"));
    assert_eq!(metric(&op, &allowed).as_deref(), Some("1"));
    eprintln!("1. checked after {:?}", started.elapsed());

    // 2. The third node cordoned and its pod evicted: the replacement cannot be placed.
    cordon(&nodes, &names[2], true).await;
    let out = drain(env.plane, &names[2], "edge");
    assert!(
        out.status.success(),
        "2. drain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = wait_reason(&api, &policy, "Progressing", 30).await;
    assert_eq!(s.0, "False", "2. within the grace period: {s:?}");
    assert!(s.3.is_empty(), "2. nothing counted yet: {s:?}");
    // The pending replacement and the scheduler's own reason for it.
    let (pending, scheduler) = common::eventually(30, "2. a pod the scheduler refused", || async {
        pods.list(&ListParams::default().labels("app=edge"))
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none())
            .find_map(|p| {
                let message = p
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| {
                        c.iter()
                            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                    })
                    .and_then(|c| c.message.clone())?;
                Some((p.name_any(), message))
            })
    })
    .await;
    // Both shortfalls, each once past its grace period (the budget's status drops to 0 at the
    // eviction itself, a moment before the pod is seen going, so DrainBlocked may count
    // first), the pod named with the scheduler's message (it may read "not scheduled yet"
    // until the scheduler's verdict arrives).
    let dep_id = format!("Deployment/{ns}/edge");
    let pdb_id = format!("PodDisruptionBudget/{ns}/edge-meshwarden");
    // The scheduler's message as it was read; it may be reworded on a retry (node counts),
    // so the status is matched on its words.
    let named = format!("pod {pending} is Pending: 0/");
    let why = "didn't match pod anti-affinity rules";
    assert!(
        scheduler.contains(why),
        "2. the scheduler says: {scheduler}"
    );
    let s = wait_seen(
        &api,
        &policy,
        "2. DrainBlocked and ReplicasUnavailable",
        60,
        |s| {
            s.1 == "DrainBlocked"
                && s.3.iter().any(|(o, _)| *o == pdb_id)
                && s.3
                    .iter()
                    .any(|(o, m)| *o == dep_id && m.contains(&named) && m.contains(why))
        },
    )
    .await;
    assert_eq!((s.0.as_str(), s.2.as_str()), ("False", "False"), "2. {s:?}");
    let unavailable =
        s.3.iter()
            .find(|(o, _)| *o == dep_id)
            .expect("2. the Deployment");
    assert!(
        unavailable
            .1
            .starts_with("ReplicasUnavailable: 2 of 3 replica(s) available")
            && unavailable.1.contains(&named),
        "2. {unavailable:?} (scheduler: {scheduler})"
    );
    let blocked =
        s.3.iter()
            .find(|(o, _)| *o == pdb_id)
            .expect("2. the budget");
    assert!(
        blocked.1.contains(&format!(
            "allows no disruption (2 healthy, 2 required; meshwarden's budget): draining node(s) {}, {} blocks",
            names[0], names[1]
        )),
        "2. {blocked:?}"
    );
    budget_allows(0).await;
    assert_eq!(metric(&op, &series("available")).as_deref(), Some("2"));
    assert_eq!(metric(&op, &allowed).as_deref(), Some("0"));
    // What the status says is what the cluster does: a drain of those nodes is refused.
    let out = drain(env.plane, &names[0], "edge");
    assert!(
        !out.status.success(),
        "2. a drain of {} must block",
        names[0]
    );
    cordon(&nodes, &names[0], false).await;
    eprintln!("2. checked after {:?}", started.elapsed());

    // 3. Uncordoned: the pending pod is placed; True again.
    cordon(&nodes, &names[2], false).await;
    wait_equal(
        60,
        "3. edge back on three nodes",
        || nodes_of(&pods, "edge"),
        names.clone(),
    )
    .await;
    let s = wait_reason(&api, &policy, "True", 60).await;
    assert_eq!((s.0.as_str(), s.2.as_str()), ("True", "True"), "3. {s:?}");
    budget_allows(1).await;
    eprintln!("3. checked after {:?}", started.elapsed());

    // 4. A node drained while meshwarden's budget covers edge: the drain completes.
    let out = drain(env.plane, &names[1], "edge");
    assert!(
        out.status.success(),
        "4. drain of {}: {}",
        names[1],
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !nodes_of(&pods, "edge").await.contains(&names[1]),
        "4. no edge pod left on {}",
        names[1]
    );
    cordon(&nodes, &names[1], false).await;
    wait_equal(
        60,
        "4. edge back on three nodes",
        || nodes_of(&pods, "edge"),
        names.clone(),
    )
    .await;
    let s = wait_reason(&api, &policy, "True", 60).await;
    assert_eq!((s.0.as_str(), s.2.as_str()), ("True", "True"), "4. {s:?}");
    eprintln!("4. checked after {:?}", started.elapsed());

    // 5. zonal: two pods placed in zone-a while zone-b and zone-c were cordoned.
    cordon(&nodes, &names[1], true).await;
    cordon(&nodes, &names[2], true).await;
    deploys
        .create(
            &PostParams::default(),
            &serde_json::from_value(pooled("zonal", 2, &pool)).unwrap(),
        )
        .await
        .unwrap();
    let zonal = gateway("zonal", "{nodes: Off, zones: Preferred}", 2);
    env.set_spec(
        "posture",
        &format!("enforcement: Enforce\ngateways:\n{edge}{zonal}"),
    )
    .await;
    let one_node = vec![names[0].clone(), names[0].clone()];
    wait_equal(
        90,
        "5. zonal rolled out on the zone-a node",
        || async {
            let d = deploys.get("zonal").await.unwrap();
            let rolled = d.status.as_ref().is_some_and(|s| {
                s.updated_replicas == Some(2)
                    && s.replicas == Some(2)
                    && s.ready_replicas == Some(2)
            }) && d
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|s| s.topology_spread_constraints.as_ref())
                .is_some();
            if rolled {
                nodes_of(&pods, "zonal").await
            } else {
                Vec::new()
            }
        },
        one_node,
    )
    .await;
    cordon(&nodes, &names[1], false).await;
    cordon(&nodes, &names[2], false).await;
    let waited = tokio::time::timeout(
        Duration::from_secs(60),
        wait_reason(&api, &policy, "SpreadNotAchieved", 3600),
    )
    .await;
    let Ok(s) = waited else {
        panic!(
            "5. no SpreadNotAchieved within 60 s: {:?}\nnodes: {}\nzonal pods: {}",
            seen(&api, &policy).await,
            described_nodes(&nodes).await,
            described_pods(&pods, "zonal").await
        );
    };
    assert_eq!((s.0.as_str(), s.2.as_str()), ("False", "False"), "5. {s:?}");
    let zonal_id = format!("Deployment/{ns}/zonal");
    let spread = s.3.iter().find(|(o, _)| *o == zonal_id).expect("5. zonal");
    assert!(
        spread.1.starts_with("SpreadNotAchieved: all 2 scheduled pods run in zone zone-a while nodes in zone(s) zone-b, zone-c could take them"),
        "5. {spread:?}"
    );
    // Report only by default: the pods stay where they are.
    tokio::time::sleep(GRACE).await;
    assert_eq!(nodes_of(&pods, "zonal").await, vec![names[0].clone(); 2]);
    // With `rebalance: Evict`, meshwarden evicts one pod; the scheduler places its
    // replacement in another zone.
    let zonal = gateway(
        "zonal",
        "{nodes: Off, zones: Preferred, rebalance: Evict}",
        2,
    );
    env.set_spec(
        "posture",
        &format!("enforcement: Enforce\ngateways:\n{edge}{zonal}"),
    )
    .await;
    let s = wait_reason(&api, &policy, "True", 90).await;
    assert_eq!(s.2, "True", "5. {s:?}");
    let zonal_nodes = nodes_of(&pods, "zonal").await;
    assert!(
        zonal_nodes.len() == 2 && zonal_nodes[0] != zonal_nodes[1],
        "5. zonal spread: {zonal_nodes:?}"
    );
    let evictions = env.operator_writes_to(|o| o["subresource"] == "eviction");
    assert_eq!(evictions, 1, "5. one eviction rebalanced zonal");
    eprintln!("5. checked after {:?}", started.elapsed());

    // 6. Policy deleted: the per-target series are gone.
    api.delete(&policy, &DeleteParams::default()).await.unwrap();
    common::eventually(60, "6. the per-target series removed", || async {
        metric(&op, &series("available")).is_none().then_some(())
    })
    .await;
    op.stop().await;
    for n in &names {
        let _ = nodes.delete(n, &DeleteParams::default()).await;
    }
    eprintln!("6. checked after {:?}", started.elapsed());
}
