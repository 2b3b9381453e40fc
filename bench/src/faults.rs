//! `meshwarden-bench faults`: recovery after each fault, on a plane of its own with the operator
//! running as its binary (as in production). Recovery is the time from the end of the fault
//! (the API server ready again, the operator restarted, the leader killed, the permission
//! restored) until a drift injected at that moment is corrected.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::ClusterRole;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use testplane::Outage;
use testplane::operator::{Operator, http_get};

const CPU: &str = "sidecar.istio.io/proxyCPU";
const SHOP: &str = "shop";
const FLEET: &str = "fleet";

/// One row of the table.
struct Row {
    fault: String,
    from: &'static str,
    /// One time per round; `None`: not recovered within the limit.
    took: Vec<Option<Duration>>,
    note: String,
}

impl Row {
    fn cell(&self) -> String {
        let mut ok: Vec<Duration> = self.took.iter().flatten().copied().collect();
        ok.sort();
        let s = |d: Duration| format!("{:.2} s", d.as_secs_f64());
        let failed = self.took.len() - ok.len();
        let mut cell = match ok.len() {
            0 => "not recovered".to_string(),
            1 => s(ok[0]),
            n => format!(
                "{} (min {}, max {}, {n} rounds)",
                s(ok[n / 2]),
                s(ok[0]),
                s(ok[n - 1])
            ),
        };
        if failed > 0 && !ok.is_empty() {
            cell.push_str(&format!(", {failed} not recovered"));
        }
        cell
    }
}

/// The operator binary beside this one (`cargo build -p meshwarden -p meshwarden-bench`), or
/// `MESHWARDEN_BIN`.
fn operator_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHWARDEN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe.with_file_name("meshwarden");
    assert!(
        bin.exists(),
        "{} missing: build it with `cargo build -p meshwarden -p meshwarden-bench` (or set MESHWARDEN_BIN)",
        bin.display()
    );
    bin
}

/// Polls `check` every 20 ms for up to `limit`: the time it took, or `None`.
async fn within<F, Fut>(limit: Duration, check: F) -> Option<Duration>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn cpu_of(deployments: &Api<Deployment>, name: &str) -> Option<String> {
    let d = deployments.get(name).await.ok()?;
    d.spec?.template.metadata?.annotations?.get(CPU).cloned()
}

/// How many Deployments of the fleet carry `cpu`.
async fn fleet_at(admin: &Client, cpu: &str) -> usize {
    let api: Api<Deployment> = Api::namespaced(admin.clone(), FLEET);
    match api.list(&ListParams::default()).await {
        Ok(l) => l
            .iter()
            .filter(|d| {
                d.spec
                    .as_ref()
                    .and_then(|s| s.template.metadata.as_ref())
                    .and_then(|m| m.annotations.as_ref())
                    .and_then(|a| a.get(CPU))
                    .is_some_and(|v| v == cpu)
            })
            .count(),
        Err(_) => 0,
    }
}

/// Removes `web`'s CPU annotation now and returns how long until it is back (60 s at most).
async fn drift_and_recover(admin: &Client, cpu: &str) -> Option<Duration> {
    let web: Api<Deployment> = Api::namespaced(admin.clone(), SHOP);
    let start = Instant::now();
    let patch = json!({"spec": {"template": {"metadata": {"annotations": {CPU: null}}}}});
    web.patch("web", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("inject drift");
    within(Duration::from_secs(60), || async {
        cpu_of(&web, "web").await.as_deref() == Some(cpu)
    })
    .await?;
    Some(start.elapsed())
}

fn deployment(name: &str, ns: &str) -> String {
    format!(
        "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    \
         spec: {{containers: [{{name: app, image: app}}]}}\n"
    )
}

/// The policy: sidecar CPU `cpu` in every injected namespace (pacing Off: this plane has no
/// controller manager, so a paced rollout would never advance), and istiod's PDB in
/// `istio-system` (the kind the RBAC fault forbids).
fn policy(cpu: &str) -> String {
    format!(
        "apiVersion: meshwarden.io/v1alpha1\nkind: MeshPolicy\nmetadata: {{name: faults}}\n\
         spec:\n  enforcement: Enforce\n  sidecars: {{resources: {{requests: {{cpu: {cpu}, memory: 128Mi}}}}, pacing: \"Off\"}}\n  \
         controlPlane: {{namespace: istio-system, replicas: {{min: 2}}, disruptionBudget: {{maxUnavailable: 1}}}}\n"
    )
}

/// Namespaces, Deployments, istiod (from the fixture on a bare plane; a cluster has it
/// installed by Helm) and the policy.
async fn setup(admin: &Client, fleet: usize, cluster: bool) {
    let mut yaml = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: meshwarden}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: istio-system}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio-injection: enabled}}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: fleet, labels: {istio-injection: enabled}}\n",
    );
    yaml.push_str(&deployment("web", SHOP));
    for i in 0..fleet {
        yaml.push_str(&deployment(&format!("app-{i}"), FLEET));
    }
    testplane::apply_yaml(admin, &yaml, &[])
        .await
        .expect("namespaces and Deployments");
    if !cluster {
        crate::common::load(admin, "istiod-default.yaml", "istio-system").await;
    }
    testplane::apply_yaml(admin, &policy("100m"), &[])
        .await
        .expect("policy");
}

/// The log lines an operator wrote since `from` bytes that mention an expired watch.
fn expired_lines(op: &Operator, from: usize) -> usize {
    let log = op.log_text();
    log.get(from..)
        .unwrap_or_default()
        .lines()
        // Not "410": timestamps contain it.
        .filter(|l| l.contains("Expired") || l.contains("too old resource version"))
        .count()
}

/// Rounds of each API server and etcd fault (the watches retry at most 2 s apart, so one
/// round alone says little).
const ROUNDS: usize = 3;

/// Rounds of the change made right at `/readyz`, and the time it must be corrected within.
const READYZ_ROUNDS: usize = 20;
const READYZ_LIMIT: Duration = Duration::from_secs(2);

/// kube-apiserver killed and started again `rounds` times; each time `/readyz` answers, the
/// PodDisruptionBudgets in `istio-system` (istiod's, which the policy holds) are deleted at
/// once: the time until one exists again. The watches list again around that moment, some
/// before it and some after, so this is the race a change in the reconnect window meets.
async fn pdb_deleted_at_readyz(
    plane: &mut testplane::Plane,
    outage: Duration,
    rounds: usize,
) -> Row {
    let mut took = Vec::new();
    for _ in 0..rounds {
        Outage::Apiserver
            .inject(plane, outage)
            .await
            .expect("inject the outage");
        let admin = plane.client().await.expect("client");
        let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin, "istio-system");
        let start = Instant::now();
        let names: Vec<String> = pdbs
            .list(&ListParams::default())
            .await
            .expect("list PDBs")
            .iter()
            .map(|p| p.name_any())
            .collect();
        for name in &names {
            pdbs.delete(name, &Default::default())
                .await
                .expect("delete PDB");
        }
        took.push(
            within(Duration::from_secs(60), || async {
                pdbs.list(&ListParams::default())
                    .await
                    .is_ok_and(|l| !l.items.is_empty())
            })
            .await
            .map(|_| start.elapsed()),
        );
    }
    let in_time = took
        .iter()
        .flatten()
        .filter(|t| **t <= READYZ_LIMIT)
        .count();
    Row {
        fault: format!(
            "{}; istiod's PDB deleted at /readyz",
            Outage::Apiserver.describe(outage.as_secs())
        ),
        from: "PDB deleted",
        took,
        note: format!(
            "re-created within {} s in {in_time} of {rounds} rounds",
            READYZ_LIMIT.as_secs()
        ),
    }
}

/// Runs every fault on a bare plane, or with `cluster` on a full cluster (pods scheduled and
/// run by kwok, rollouts done by the controller manager, sidecars injected by istiod).
pub async fn run(outage: u64, fleet: usize, cluster: bool) {
    let bin = operator_bin();
    let outage_d = Duration::from_secs(outage);
    let (tag, flavor) = if cluster {
        ("bench-faults-cluster", testplane::Flavor::Cluster)
    } else {
        ("bench-faults", testplane::Flavor::Bare)
    };
    let (dir, mut plane, mut admin) = crate::common::start_plane_of(tag, flavor).await;
    setup(&admin, fleet, cluster).await;
    let kc = plane.operator_kubeconfig.clone();
    let start = |name: &str, args: &[&str]| {
        Operator::start(&bin, &kc, name, &dir, args).expect("start meshwarden")
    };
    let mut op = start("operator", &[]);
    let web: Api<Deployment> = Api::namespaced(admin.clone(), SHOP);
    let started = Instant::now();
    within(Duration::from_secs(120), || async {
        cpu_of(&web, "web").await.as_deref() == Some("100m")
            && fleet_at(&admin, "100m").await == fleet
    })
    .await
    .expect("the first convergence");
    let first = started.elapsed();
    println!(
        "meshwarden-bench faults: {}, outage {outage} s, fleet of {fleet} Deployments; first convergence {:.2} s",
        if cluster {
            "full cluster (controller manager, scheduler, kwok nodes, Istio by Helm)"
        } else {
            "bare plane"
        },
        first.as_secs_f64()
    );
    let mut rows = Vec::new();

    // 1-3. kube-apiserver killed; etcd killed (kube-apiserver keeps running); a watch expiry:
    //      etcd compacted while kube-apiserver is down, so a watch resumed from its last
    //      resourceVersion would end with 410 Expired.
    for fault in [Outage::Apiserver, Outage::Etcd, Outage::Expiry] {
        let (mut took, mut expired) = (Vec::new(), 0);
        for _ in 0..ROUNDS {
            let log_mark = op.log_text().len();
            fault
                .inject(&mut plane, outage_d)
                .await
                .expect("inject the outage");
            admin = plane.client().await.expect("client");
            took.push(drift_and_recover(&admin, "100m").await);
            expired += expired_lines(&op, log_mark);
        }
        rows.push(Row {
            fault: fault.describe(outage),
            from: "API server ready",
            took,
            note: format!("{expired} watches ended with 410 Expired"),
        });
    }
    // A change made right at `/readyz`, while the watches list again.
    rows.push(pdb_deleted_at_readyz(&mut plane, outage_d, READYZ_ROUNDS).await);
    admin = plane.client().await.expect("client");

    // 4. The operator killed mid-rollout: the policy's CPU changes, so every Deployment is
    //    rewritten; kill -9 once a tenth of the fleet has the new value, start it again.
    testplane::apply_yaml(&admin, &policy("200m"), &[])
        .await
        .expect("policy edit");
    let tenth = fleet.div_ceil(10).max(1);
    within(Duration::from_secs(60), || async {
        fleet_at(&admin, "200m").await >= tenth
    })
    .await
    .expect("the rollout starts");
    op.child.kill().expect("kill the operator");
    let _ = op.child.wait();
    let done_at_kill = fleet_at(&admin, "200m").await;
    drop(op);
    op = start("operator", &[]);
    let converged = within(Duration::from_secs(120), || async {
        fleet_at(&admin, "200m").await == fleet
            && cpu_of(&web, "web").await.as_deref() == Some("200m")
    })
    .await;
    rows.push(Row {
        fault: "kill -9 the operator mid-rollout, started again at once".into(),
        from: "operator started",
        took: vec![converged],
        note: format!(
            "{done_at_kill} of {fleet} rewritten at the kill; until all {} are (a fresh start converged in {:.2} s)",
            fleet + 1,
            first.as_secs_f64()
        ),
    });

    // 5. The leader killed with a standby running (default 15 s lease).
    op.terminate().expect("stop the operator");
    let _ = op.child.wait();
    drop(op);
    let a = start("replica-a", &["--leader-election"]);
    let b = start("replica-b", &["--leader-election"]);
    within(Duration::from_secs(60), || async {
        let (x, y) = (
            a.metric("meshwarden_leader").await,
            b.metric("meshwarden_leader").await,
        );
        matches!((x, y), (Some(1.0), Some(0.0)) | (Some(0.0), Some(1.0)))
            && http_get(if x == Some(1.0) { a.port } else { b.port }, "/readyz")
                .await
                .is_some()
    })
    .await
    .expect("one leader");
    let (mut leader, standby) = if a.metric("meshwarden_leader").await == Some(1.0) {
        (a, b)
    } else {
        (b, a)
    };
    leader.child.kill().expect("kill the leader");
    let _ = leader.child.wait();
    rows.push(Row {
        fault: "kill -9 the leader, a standby running (lease 15 s)".into(),
        from: "leader killed",
        took: vec![drift_and_recover(&admin, "200m").await],
        note: String::new(),
    });
    drop(leader);
    drop(standby);

    // 6. A forbidden kind: the operator as a ServiceAccount with the chart's RBAC minus
    //    PodDisruptionBudgets. The sidecars section still converges; after the permission is
    //    restored, istiod's PDB is created.
    rows.extend(forbidden(&plane, &admin, &bin).await);

    println!();
    println!("| fault | measured from | recovered after | note |");
    println!("| --- | --- | --- | --- |");
    for r in &rows {
        println!("| {} | {} | {} | {} |", r.fault, r.from, r.cell(), r.note);
    }
}

/// The chart's RBAC (ServiceAccount, roles, bindings) rendered by `helm template` and applied;
/// returns the ClusterRole's name.
async fn chart_rbac(admin: &Client) -> String {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/meshwarden");
    let out = std::process::Command::new("helm")
        .args(["template", "meshwarden"])
        .arg(&chart)
        .args(["-n", "meshwarden"])
        .output()
        .expect("helm (hack/install-tools.sh; PATH=$HOME/.cache/meshwarden/tools/bin:$PATH)");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8_lossy(&out.stdout);
    let keep = [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ];
    let mut rbac = String::new();
    for doc in yaml.split("\n---") {
        let Ok(v) = serde_yaml::from_str::<serde_json::Value>(doc) else {
            continue;
        };
        if keep.contains(&v["kind"].as_str().unwrap_or_default()) {
            rbac.push_str("---\n");
            rbac.push_str(doc);
            rbac.push('\n');
        }
    }
    testplane::apply_yaml(admin, &rbac, &[])
        .await
        .expect("chart RBAC");
    "meshwarden".into()
}

/// Sets the ClusterRole's rules on poddisruptionbudgets: `allowed` keeps them, else removes.
async fn pdb_rule(admin: &Client, role: &str, original: &ClusterRole, allowed: bool) {
    let mut r = ClusterRole {
        metadata: kube::api::ObjectMeta {
            name: Some(role.to_string()),
            ..Default::default()
        },
        rules: original.rules.clone(),
        aggregation_rule: None,
    };
    if !allowed {
        r.rules = r.rules.map(|rules| {
            rules
                .into_iter()
                .filter(|rule| {
                    !rule
                        .resources
                        .as_ref()
                        .is_some_and(|res| res.iter().any(|x| x == "poddisruptionbudgets"))
                })
                .collect()
        });
    }
    Api::<ClusterRole>::all(admin.clone())
        .patch(
            role,
            &PatchParams::apply("testplane").force(),
            &Patch::Apply(&r),
        )
        .await
        .expect("ClusterRole");
}

async fn forbidden(plane: &testplane::Plane, admin: &Client, bin: &Path) -> Vec<Row> {
    let role = chart_rbac(admin).await;
    let roles: Api<ClusterRole> = Api::all(admin.clone());
    let original = roles.get(&role).await.expect("the chart's ClusterRole");
    pdb_rule(admin, &role, &original, false).await;
    // Istiod's PDB, deleted: the drift only the forbidden kind can correct.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), "istio-system");
    for p in pdbs.list(&ListParams::default()).await.expect("PDBs") {
        let _ = pdbs.delete(&p.name_any(), &Default::default()).await;
    }
    let sa_kc = testplane::service_account_kubeconfig(&plane.dir, "meshwarden", "meshwarden")
        .await
        .expect("TokenRequest for the chart's ServiceAccount");
    let op = Operator::start(bin, &sa_kc, "restricted", &plane.dir, &[]).expect("start meshwarden");
    // Let the refused watch back off for a while, as it would until someone notices.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let mut rows = vec![Row {
        fault: "PodDisruptionBudgets forbidden (ClusterRole rule removed)".into(),
        from: "drift injected",
        took: vec![drift_and_recover(admin, "200m").await],
        note: "the sidecars section, which needs no PDB".into(),
    }];
    // Settle: the reconciles that correction triggered are over, so only the operator's own
    // retries (the refused watch's backoff, the policy's requeue) can notice the restored rule.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let missing = pdbs
        .list(&ListParams::default())
        .await
        .map(|l| l.items.is_empty());
    pdb_rule(admin, &role, &original, true).await;
    let took = within(Duration::from_secs(330), || async {
        pdbs.list(&ListParams::default())
            .await
            .is_ok_and(|l| !l.items.is_empty())
    })
    .await;
    rows.push(Row {
        fault: "PodDisruptionBudgets allowed again after 25 s forbidden".into(),
        from: "rule restored",
        took: vec![took],
        note: format!(
            "istiod's PDB created (missing while forbidden: {}); {} log lines say Forbidden",
            missing.unwrap_or(false),
            op.log_text()
                .lines()
                .filter(|l| l.contains("Forbidden"))
                .count()
        ),
    });
    rows
}
