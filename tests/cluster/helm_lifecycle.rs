//! The gateway's and istiod's Helm releases through their lifecycle (install, policy edits,
//! upgrades with Helm 3 and 4, rollback, Audit, deletion), sampled all along: the posture is
//! never lowered.

use super::*;

/// The lowest values seen while sampling: Deployment replicas, available pods, HPA minimum.
#[derive(Debug, Default)]
struct Floor {
    replicas: AtomicI32,
    available: AtomicI32,
    hpa_min: AtomicI32,
    /// What ran when the fewest pods were available: the Deployment's rollout counters and
    /// each pod (its ReplicaSet's template hash, Ready, being deleted).
    seen_at_floor: std::sync::Mutex<String>,
}

/// Samples a Deployment and the HPA scaling it every 100 ms in the background, for the whole
/// test, and keeps the lowest values seen since the last reset.
struct Sampler {
    floor: Arc<Floor>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(client: &Client, ns: &str, deployment: &str, hpa: &str) -> Self {
        use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
        let floor = Arc::new(Floor::default());
        let deploys: Api<Deployment> = Api::namespaced(client.clone(), ns);
        let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let (f, deployment, hpa) = (floor.clone(), deployment.to_string(), hpa.to_string());
        let task = tokio::spawn(async move {
            loop {
                if let (Ok(d), Ok(h)) = (deploys.get(&deployment).await, hpas.get(&hpa).await) {
                    let spec = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    // The pods that serve: Ready and not being deleted, counted directly. The
                    // Deployment's `availableReplicas` sums its ReplicaSets' statuses and can
                    // lag a rollout step by a sync, showing a dip no client sees.
                    let selector = d
                        .spec
                        .as_ref()
                        .and_then(|s| s.selector.match_labels.clone())
                        .unwrap_or_default()
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",");
                    let Ok(list) = pods.list(&ListParams::default().labels(&selector)).await else {
                        continue;
                    };
                    let avail = list
                        .items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none())
                        .filter(|p| {
                            p.status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|c| {
                                    c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                                })
                        })
                        .count();
                    let avail = i32::try_from(avail).unwrap_or(i32::MAX);
                    let min = h.spec.and_then(|s| s.min_replicas).unwrap_or(1);
                    f.replicas.fetch_min(spec, SeqCst);
                    if f.available.fetch_min(avail, SeqCst) > avail
                        && let Ok(mut seen) = f.seen_at_floor.lock()
                    {
                        *seen = describe(&d, &list.items);
                    }
                    f.hpa_min.fetch_min(min, SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let sampler = Sampler { floor, task };
        sampler.reset();
        sampler
    }

    /// [`Sampler::check`] without the HPA, with a floor of its own for available pods.
    fn check_available(&self, step: &str, replicas_min: i32, available_min: i32) {
        let replicas = self.floor.replicas.load(SeqCst);
        let available = self.floor.available.load(SeqCst);
        assert!(
            replicas >= replicas_min,
            "{step}: Deployment replicas went down to {replicas}"
        );
        assert!(
            available >= available_min,
            "{step}: available pods went down to {available}: {}",
            self.seen_at_floor()
        );
        self.reset();
    }

    fn reset(&self) {
        self.floor.replicas.store(i32::MAX, SeqCst);
        self.floor.available.store(i32::MAX, SeqCst);
        self.floor.hpa_min.store(i32::MAX, SeqCst);
    }

    /// Asserts that since the last reset the Deployment's replicas and available pods, and
    /// (with `hpa`) the HPA minimum, never went below `min`; then resets. A `helm upgrade`
    /// writes the chart's HPA minimum back for the moment until meshwarden restores it, so the
    /// HPA is left out of the check of an upgrade.
    fn check(&self, step: &str, min: i32, hpa: bool) {
        let replicas = self.floor.replicas.load(SeqCst);
        let available = self.floor.available.load(SeqCst);
        let hpa_min = self.floor.hpa_min.load(SeqCst);
        assert!(
            replicas >= min,
            "{step}: Deployment replicas went down to {replicas}"
        );
        assert!(
            available >= min,
            "{step}: available pods went down to {available}: {}",
            self.seen_at_floor()
        );
        assert!(
            !hpa || hpa_min >= min,
            "{step}: HPA minReplicas went down to {hpa_min}"
        );
        self.reset();
    }
}

impl Sampler {
    fn seen_at_floor(&self) -> String {
        self.floor
            .seen_at_floor
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
}

/// The Deployment's rollout counters and its pods, for a failure message.
fn describe(d: &Deployment, pods: &[Pod]) -> String {
    let st = d.status.clone().unwrap_or_default();
    let pods: Vec<String> = pods
        .iter()
        .map(|p| {
            let hash = p
                .labels()
                .get("pod-template-hash")
                .cloned()
                .unwrap_or_default();
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let deleting = p.metadata.deletion_timestamp.is_some();
            format!(
                "{} rs={hash} ready={ready} deleting={deleting}",
                p.name_any()
            )
        })
        .collect();
    format!(
        "generation {:?} observed {:?}, replicas {:?} updated {:?} available {:?}; pods: {}",
        d.metadata.generation,
        st.observed_generation,
        st.replicas,
        st.updated_replicas,
        st.available_replicas,
        pods.join(", ")
    )
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `helm upgrade --reuse-values` of `release` with Helm 3 (three-way merge), Helm 4 as the
/// release was installed (client-side after Helm 3), Helm 4 server-side with `--force-conflicts`
/// (it asks for it on the fields meshwarden holds) twice, then `helm rollback` server-side: five
/// installer writes within ten minutes, more than a fight takes. Every one must succeed; after
/// each, `after(step)` runs once meshwarden converged, and the section's condition must not
/// call the installer's write a fight.
async fn helm_upgrades<F, Fut>(
    env: &common::Env,
    policy: &str,
    condition: &str,
    release: &str,
    chart: &str,
    ns: &str,
    after: F,
) where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let kc = env.plane.kubeconfig.clone();
    let server_side = ["--server-side=true", "--force-conflicts"];
    let upgrade = |extra: &[&'static str]| {
        let mut args = vec!["upgrade", release, chart, "-n", ns, "--reuse-values"];
        args.extend_from_slice(extra);
        args
    };
    let rollback = [vec!["rollback", release, "-n", ns], server_side.to_vec()].concat();
    let steps: [(&str, std::path::PathBuf, Vec<&str>); 5] = [
        ("helm 3 upgrade", testplane::istio::helm3(), upgrade(&[])),
        ("helm 4 upgrade", testplane::istio::helm(), upgrade(&[])),
        (
            "helm 4 server-side upgrade",
            testplane::istio::helm(),
            upgrade(&server_side),
        ),
        (
            "helm 4 server-side upgrade again",
            testplane::istio::helm(),
            upgrade(&server_side),
        ),
        (
            "helm 4 server-side rollback",
            testplane::istio::helm(),
            rollback,
        ),
    ];
    for (step, bin, args) in steps {
        helm(&bin, &kc, &args);
        let p = env.wait_converged(policy, 90).await;
        let c = common::condition(&p, condition).unwrap();
        assert_ne!(
            c.reason, "FightDetected",
            "{step}: a Helm upgrade is not a fight: {c:?}"
        );
        after(step.to_string()).await;
    }
}

/// One gateway release through its whole life with meshwarden, checking after every step that
/// no replica count or HPA minimum went down, no pod became unavailable (sampled every 100 ms
/// for a few seconds once the posture holds), the proxy resources meshwarden set are there,
/// Helm upgrades work and nothing is fought: install with Helm 3 -> policy in Audit -> Enforce
/// -> edit the policy (replicas and limits dropped, CPU request changed) -> `helm upgrade` with
/// Helm 3 and with Helm 4, and `helm rollback` -> Audit -> delete the policy.
#[tokio::test]
async fn gateway_release_lifecycle_with_helm_never_lowers_the_posture() {
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;

    let env = common::cluster_env("gwlife").await;
    let ns = env.namespace("gw", &[]).await;
    let kc = env.plane.kubeconfig.clone();
    let chart = testplane::istio::chart("gateway").display().to_string();
    helm(
        &testplane::istio::helm3(),
        &kc,
        &[
            "install",
            "gw",
            &chart,
            "-n",
            &ns,
            "--set",
            "global.hub=docker.io/istio",
        ],
    );
    let deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &ns);
    common::eventually(90, "the gateway Deployment ready", || async {
        let d = deploys.get("gw").await.ok()?;
        (d.status?.available_replicas? >= 1).then_some(())
    })
    .await;
    let sampler = Sampler::start(&env.client, &ns, "gw", "gw");

    let gateway = |extra: &str| {
        format!(
            "gateways:\n- name: ingress\n  namespace: {ns}\n  selector: {{matchLabels: {{istio: gw}}}}\n{extra}"
        )
    };
    // The memory limit differs from the chart's 1024Mi, so that a Helm write shows.
    let full = "  replicas: {min: 3}\n  disruptionBudget: {maxUnavailable: 1}\n  resources: {requests: {cpu: 200m, memory: 256Mi}, limits: {memory: 1536Mi}}\n";
    // The proxy's CPU request and memory limit, as meshwarden set them.
    let resources_are = |step: &str, cpu: &str| {
        let (deploys, step, cpu) = (deploys.clone(), step.to_string(), cpu.to_string());
        async move {
            let d = deploys.get("gw").await.unwrap();
            let r = common::container_resources(&d, "istio-proxy");
            assert_eq!(
                (
                    common::quantity(&r.requests, "cpu"),
                    common::quantity(&r.limits, "memory")
                ),
                (Some(cpu), Some("1536Mi".to_string())),
                "{step}: the proxy's CPU request and memory limit"
            );
        }
    };
    // The posture: 3 available pods with the HPA minimum at 3, a PDB allowing 1 disruption,
    // the CPU request `cpu` rolled out.
    let posture = |cpu: &'static str| {
        let (deploys, hpas, pdbs) = (deploys.clone(), hpas.clone(), pdbs.clone());
        async move {
            let d = deploys.get("gw").await.ok()?;
            let h = hpas.get("gw").await.ok()?;
            let pdb = pdbs.list(&ListParams::default()).await.ok()?.items;
            let allowed = pdb.first()?.status.as_ref()?.disruptions_allowed;
            let r = common::container_resources(&d, "istio-proxy");
            let rolled = !rolling(&d) && d.status.as_ref()?.available_replicas? >= 3;
            (rolled
                && h.spec?.min_replicas? >= 3
                && allowed == 1
                && common::quantity(&r.requests, "cpu").as_deref() == Some(cpu))
            .then_some(())
        }
    };

    // Audit: reported, nothing written.
    env.create_policy("gw", &format!("enforcement: Audit\n{}", gateway(full)))
        .await;
    let _op = env.start_operator().await;
    let p = env
        .wait_policy("gw", 60, |p| {
            let c = common::condition(p, "GatewayHA")?;
            (c.status == "False").then_some(p.clone())
        })
        .await;
    assert!(p.status.unwrap().violation_count > 0);
    assert_eq!(writes_in(&env, &ns), 0, "Audit writes nothing");

    // Enforce: HPA minimum 3, three available pods, one PDB with one allowed disruption.
    set_spec(
        &env,
        "gw",
        &format!("enforcement: Enforce\n{}", gateway(full)),
    )
    .await;
    common::eventually(120, "3 available gateway pods and a PDB allowing 1", || {
        posture("200m")
    })
    .await;
    env.wait_settled("gw", 60).await;
    sampler.reset();
    tokio::time::sleep(Duration::from_secs(6)).await; // an HPA sync period
    sampler.check("Enforce", 3, true);
    resources_are("Enforce", "200m").await;

    // Edit: the policy stops declaring replicas and changes resources. Nothing goes down.
    set_spec(
        &env,
        "gw",
        &format!(
            "enforcement: Enforce\n{}",
            gateway("  disruptionBudget: {maxUnavailable: 1}\n  resources: {requests: {cpu: 300m, memory: 256Mi}}\n")
        ),
    )
    .await;
    common::eventually(120, "the edited CPU request rolled out", || posture("300m")).await;
    env.wait_settled("gw", 90).await;
    tokio::time::sleep(Duration::from_secs(6)).await; // an HPA sync period
    sampler.check("policy edited", 3, true);
    resources_are("policy edited", "300m").await;
    set_spec(
        &env,
        "gw",
        &format!("enforcement: Enforce\n{}", gateway(full)),
    )
    .await;
    common::eventually(120, "the full posture again", || posture("200m")).await;
    env.wait_settled("gw", 90).await;
    sampler.check("policy restored", 3, true);

    // helm upgrade with unchanged values: Helm 3 (three-way merge), then Helm 4.
    helm_upgrades(&env, "gw", "GatewayHA", "gw", &chart, &ns, |step| {
        let (posture, resources_are, sampler) = (&posture, &resources_are, &sampler);
        async move {
            common::eventually(120, "the posture restored after the upgrade", || {
                posture("200m")
            })
            .await;
            tokio::time::sleep(Duration::from_secs(6)).await;
            // The upgrade writes the chart's proxy resources and meshwarden writes the
            // declared ones back: two rollouts of the installer's making, during which the
            // serving pods may dip by what the declared budget allows (maxUnavailable 1),
            // never below it; replicas never drop.
            sampler.check_available(&step, 3, 2);
            resources_are(&step, "200m").await;
        }
    })
    .await;

    // Audit again: nothing written, values stay.
    set_spec(
        &env,
        "gw",
        &format!("enforcement: Audit\n{}", gateway(full)),
    )
    .await;
    env.wait_settled("gw", 60).await;
    let before = writes_in(&env, &ns);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(writes_in(&env, &ns), before, "Audit writes nothing");
    sampler.check("Audit", 3, true);
    resources_are("Audit", "200m").await;

    // Delete the policy: the garbage collector removes what meshwarden created; the values
    // it set stay.
    Api::<MeshPolicy>::all(env.client.clone())
        .delete(&env.policy_name("gw"), &DeleteParams::default())
        .await
        .unwrap();
    common::eventually(60, "meshwarden's PDB garbage-collected", || async {
        let left = pdbs.list(&ListParams::default()).await.ok()?.items;
        left.iter()
            .all(|p| !p.name_any().ends_with("-meshwarden"))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    sampler.check("policy deleted", 3, true);
    resources_are("policy deleted", "200m").await;
}

/// istiod's own Helm release through its whole life with meshwarden: installed with Helm 3
/// (revision `lc` in a namespace of its own, so the cluster's istiod is not touched;
/// `autoscaleMin=2`, so the chart renders its PDB `minAvailable: 1`) -> policy in Audit ->
/// Enforce -> policy edited (replicas dropped, resources changed, node spread off) -> `helm
/// upgrade --reuse-values` with Helm 3, with Helm 4 as installed and twice with Helm 4
/// server-side and `--force-conflicts`, then `helm rollback` (five installer writes within ten
/// minutes, none a fight) -> Audit -> policy deleted. After every step: no replica count,
/// available pod count or HPA minimum went below 3 since Enforce (sampled every 100 ms; the
/// HPA minimum is left out while Helm writes the chart's value back), every installer value
/// is still there, the chart's PDB keeps its form, the posture is restored after each
/// upgrade without a fight, and Audit writes nothing.
#[tokio::test]
async fn istiod_release_lifecycle_with_helm_never_lowers_the_posture() {
    use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    let env = common::cluster_env("istiodlife").await;
    let ns = env.namespace("istio", &[]).await;
    let kc = env.plane.kubeconfig.clone();
    let chart = testplane::istio::chart("istiod").display().to_string();
    let istio_ns = format!("global.istioNamespace={ns}");
    helm(
        &testplane::istio::helm3(),
        &kc,
        &[
            "install",
            "istiod-lc",
            &chart,
            "-n",
            &ns,
            "--set",
            "revision=lc",
            "--set",
            "autoscaleMin=2",
            "--set",
            &istio_ns,
            "--set",
            "global.operatorManageWebhooks=true",
            "--set",
            "global.configValidation=false",
            "--set",
            "global.hub=docker.io/istio",
        ],
    );
    let name = "istiod-lc";
    let deploys: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(env.client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(env.client.clone(), &ns);
    common::eventually(90, "2 available istiod pods", || async {
        let d = deploys.get(name).await.ok()?;
        (d.status?.available_replicas? >= 2).then_some(())
    })
    .await;
    let sampler = Sampler::start(&env.client, &ns, name, name);

    // What the installer set and must keep: the memory request the policy does not declare,
    // the HPA maximum, the PDB in its chart form, the revision label.
    let installer_values_kept = |step: &str| {
        let (deploys, hpas, pdbs) = (deploys.clone(), hpas.clone(), pdbs.clone());
        let step = step.to_string();
        async move {
            let d = deploys.get(name).await.unwrap();
            let r = common::container_resources(&d, "discovery");
            assert_eq!(
                common::quantity(&r.requests, "memory").as_deref(),
                Some("2Gi"), // the chart's 2048Mi, as the API server stores it
                "{step}: the chart's memory request"
            );
            assert_eq!(
                d.labels().get("istio.io/rev").map(String::as_str),
                Some("lc"),
                "{step}"
            );
            let h = hpas.get(name).await.unwrap().spec.unwrap();
            assert_eq!(h.max_replicas, 5, "{step}: the chart's HPA maximum");
            let b = pdbs.get(name).await.unwrap().spec.unwrap();
            assert_eq!(
                (b.min_available, b.max_unavailable),
                (Some(IntOrString::Int(1)), None),
                "{step}: the chart's PDB keeps its form"
            );
            let all = pdbs.list(&ListParams::default()).await.unwrap().items;
            assert_eq!(all.len(), 1, "{step}: one PDB, the chart's");
        }
    };
    // What the policy holds while it declares it: None when istiod has it and finished
    // rolling, else what is missing.
    let gap = |cpu: &'static str| {
        let (deploys, hpas) = (deploys.clone(), hpas.clone());
        async move {
            let d = deploys.get(name).await.unwrap();
            let min = hpas.get(name).await.unwrap().spec.unwrap().min_replicas;
            let r = common::container_resources(&d, "discovery");
            let got_cpu = common::quantity(&r.requests, "cpu");
            let available = d.status.as_ref().and_then(|s| s.available_replicas);
            if min < Some(3) {
                Some(format!("HPA minReplicas {min:?}"))
            } else if got_cpu.as_deref() != Some(cpu) {
                Some(format!("CPU request {got_cpu:?}, not {cpu}"))
            } else if common::anti_affinity_terms(&d) < 1 {
                Some("no pod anti-affinity term".into())
            } else if rolling(&d) || available < Some(3) {
                Some(format!("rolling, {available:?} available"))
            } else {
                None
            }
        }
    };
    let posture = |cpu: &'static str| async move { gap(cpu).await.is_none().then_some(()) };
    let control_plane = |enforcement: &str, rules: &str| {
        format!("enforcement: {enforcement}\ncontrolPlane:\n  namespace: {ns}\n{rules}")
    };
    let full = "  replicas: {min: 3}\n  disruptionBudget: {maxUnavailable: 1}\n  resources: {requests: {cpu: 700m}}\n  spread: {nodes: Preferred, zones: Preferred}\n";

    // Audit: violations reported, nothing written.
    installer_values_kept("installed").await;
    env.create_policy("cp", &control_plane("Audit", full)).await;
    let _op = env.start_operator().await;
    let p = env
        .wait_policy("cp", 60, |p| {
            let c = common::condition(p, "ControlPlaneHA")?;
            (c.status == "False" && p.status.as_ref()?.violation_count > 0).then_some(p.clone())
        })
        .await;
    assert!(
        common::condition(&p, "ControlPlaneHA")
            .unwrap()
            .message
            .contains("Audit mode")
    );
    assert_eq!(writes_in(&env, &ns), 0, "Audit writes nothing");
    installer_values_kept("Audit").await;

    // Enforce: HPA minimum 3, the CPU request, spread; three available pods. The chart's PDB
    // has no equivalent of maxUnavailable 1 at 3..5 replicas: reported, left in its form.
    set_spec(&env, "cp", &control_plane("Enforce", full)).await;
    common::eventually(120, "istiod raised to the posture", || posture("700m")).await;
    let p = env.wait_converged("cp", 60).await;
    let c = common::condition(&p, "ControlPlaneHA").unwrap();
    assert!(
        c.message
            .contains("pdb.maxUnavailable=1 in Helm release istiod-lc"),
        "the chart value of the budget: {}",
        c.message
    );
    assert!(
        c.message.contains(
            "set autoscaleMin, pdb.maxUnavailable, resources, affinity, topologySpreadConstraints in Helm release istiod-lc"
        ),
        "every chart value that declares what meshwarden took over: {}",
        c.message
    );
    sampler.reset();
    tokio::time::sleep(Duration::from_secs(6)).await; // an HPA sync period
    sampler.check("Enforce", 3, true);
    installer_values_kept("Enforce").await;

    // Edit: replicas dropped, the CPU request changed, node spread off. Nothing goes down and
    // the anti-affinity term meshwarden added stays (released, not removed).
    set_spec(
        &env,
        "cp",
        &control_plane(
            "Enforce",
            "  disruptionBudget: {maxUnavailable: 1}\n  resources: {requests: {cpu: 600m}}\n  spread: {nodes: Off, zones: Preferred}\n",
        ),
    )
    .await;
    common::eventually(120, "the edited CPU request rolled out", || async {
        let g = gap("600m").await;
        (g.is_none() || g.is_some_and(|g| !g.starts_with("CPU") && !g.starts_with("rolling")))
            .then_some(())
    })
    .await;
    env.wait_converged("cp", 60).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    sampler.check("policy edited", 3, true);
    assert_eq!(gap("600m").await, None, "policy edited: the values stay");
    installer_values_kept("policy edited").await;
    set_spec(&env, "cp", &control_plane("Enforce", full)).await;
    common::eventually(120, "the full posture again", || posture("700m")).await;
    env.wait_converged("cp", 60).await;
    sampler.check("policy restored", 3, true);

    // helm upgrade with unchanged values: each succeeds, meshwarden restores the posture.
    helm_upgrades(&env, "cp", "ControlPlaneHA", name, &chart, &ns, |step| {
        let (posture, kept, sampler) = (&posture, &installer_values_kept, &sampler);
        async move {
            common::eventually(120, "the posture restored after the upgrade", || {
                posture("700m")
            })
            .await;
            tokio::time::sleep(Duration::from_secs(6)).await;
            sampler.check(&step, 3, false);
            kept(&step).await;
        }
    })
    .await;

    // Audit again: nothing written, values stay.
    set_spec(&env, "cp", &control_plane("Audit", full)).await;
    env.wait_converged("cp", 60).await;
    let before = writes_in(&env, &ns);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(writes_in(&env, &ns), before, "Audit writes nothing");
    sampler.check("Audit", 3, true);
    assert_eq!(gap("700m").await, None, "Audit keeps the values");
    installer_values_kept("Audit again").await;

    // Delete the policy: the values stay, the chart's PDB is untouched.
    Api::<MeshPolicy>::all(env.client.clone())
        .delete(&env.policy_name("cp"), &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    sampler.check("policy deleted", 3, true);
    assert_eq!(gap("700m").await, None, "the values stay after the delete");
    installer_values_kept("policy deleted").await;
    helm(
        &testplane::istio::helm3(),
        &kc,
        &["uninstall", name, "-n", &ns],
    );
}
