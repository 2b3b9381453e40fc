//! `testplane up|down|apply`: a real kube-apiserver and etcd on loopback (or, with
//! `--cluster`, a whole cluster with Istio) for trying meshwarden by hand. Used by
//! `hack/dev-apiserver.sh`, `hack/dev-cluster.sh` and the demo.
use std::path::PathBuf;
use std::process::ExitCode;

use testplane::{Flavor, Lifetime, Plane};

fn usage() -> ExitCode {
    eprintln!(
        "usage: testplane up [--cluster] [DIR] | down [DIR] | apply KUBECONFIG FILE... [--skip KIND,KIND] [--manager NAME]\n\
         DIR defaults to $MESHWARDEN_DEV_DIR or /tmp/meshwarden-dev"
    );
    ExitCode::from(2)
}

fn dev_dir(arg: Option<&String>) -> PathBuf {
    arg.map(PathBuf::from)
        .or_else(|| std::env::var("MESHWARDEN_DEV_DIR").ok().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/tmp/meshwarden-dev"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("up") if args.get(1).map(String::as_str) == Some("--cluster") => {
            up(dev_dir(args.get(2)), Flavor::Cluster).await
        }
        Some("up") => up(dev_dir(args.get(1)), Flavor::Bare).await,
        Some("down") => testplane::stop_detached(&dev_dir(args.get(1))).map_err(|e| e.to_string()),
        Some("apply") if args.len() >= 3 => apply(&args[1..]).await,
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testplane: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn up(dir: PathBuf, flavor: Flavor) -> Result<(), String> {
    if dir.join("pids").exists() {
        return Err(format!(
            "a plane already runs in {} (stop it with: hack/dev-apiserver.sh down)",
            dir.display()
        ));
    }
    let started = std::time::Instant::now();
    let plane = Plane::start_with(&dir, Lifetime::Detached, flavor)
        .await
        .map_err(|e| e.to_string())?;
    let what = match flavor {
        Flavor::Bare => "kube-apiserver".to_string(),
        Flavor::Cluster => format!(
            "cluster ({} nodes in {} zones, Istio {} with istiod on the host)",
            testplane::cluster::node_names().len(),
            testplane::cluster::ZONES.len(),
            testplane::istio::version()
        ),
    };
    eprintln!(
        "{what} {} ready at {} in {:.1}s (logs and data in {})",
        testplane::K8S_VERSION,
        plane.server,
        started.elapsed().as_secs_f64(),
        plane.dir.display()
    );
    println!("export KUBECONFIG={}", plane.kubeconfig.display());
    plane.release();
    Ok(())
}

async fn apply(args: &[String]) -> Result<(), String> {
    let mut skip: Vec<String> = Vec::new();
    let mut manager = "testplane".to_string();
    let mut files = Vec::new();
    let mut it = args[1..].iter();
    while let Some(a) = it.next() {
        if a == "--skip" {
            skip.extend(
                it.next()
                    .into_iter()
                    .flat_map(|s| s.split(',').map(String::from)),
            );
        } else if a == "--manager" {
            manager = it.next().cloned().ok_or("--manager needs a name")?;
        } else {
            files.push(a);
        }
    }
    let skip: Vec<&str> = skip.iter().map(String::as_str).collect();
    let client = testplane::client_from(std::path::Path::new(&args[0]))
        .await
        .map_err(|e| e.to_string())?;
    for f in files {
        let yaml = std::fs::read_to_string(f).map_err(|e| format!("{f}: {e}"))?;
        let n = testplane::apply_yaml_as(&client, &yaml, &skip, &manager)
            .await
            .map_err(|e| format!("{f}: {e}"))?;
        eprintln!("applied {n} objects from {f}");
    }
    Ok(())
}
