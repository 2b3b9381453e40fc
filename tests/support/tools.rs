//! The command-line tools users install meshwarden with (helm, kubectl), run against a test
//! plane's kubeconfig.
use std::path::{Path, PathBuf};
use std::process::Command;

/// `name` from PATH, else from the tools cache of hack/install-tools.sh.
pub fn tool(name: &str) -> PathBuf {
    let from_path = std::env::var_os("PATH").map(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    });
    if let Some(Some(p)) = from_path {
        return p;
    }
    let cache = testplane::bin_dir()
        .parent()
        .and_then(Path::parent)
        .map(|c| c.join("tools/bin").join(name));
    match cache {
        Some(p) if p.is_file() => p,
        _ => panic!("{name} not found on PATH nor in the tools cache: run hack/install-tools.sh"),
    }
}

/// Runs `helm args… --kubeconfig kubeconfig`; panics with its output when it fails.
pub fn helm(kubeconfig: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(tool("helm"));
    cmd.args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("meshwarden-helm-cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("meshwarden-helm-config"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("meshwarden-helm-data"),
        );
    run(cmd, "helm", args)
}

/// Runs `kubectl --kubeconfig kubeconfig args…`; panics with its output when it fails.
#[allow(dead_code)]
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(tool("kubectl"));
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    run(cmd, "kubectl", args)
}

fn run(mut cmd: Command, name: &str, args: &[&str]) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {name}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{name} {args:?} failed:\n{text}");
    text
}

/// `helm install meshwarden` of this repository's chart into `namespace`, as a user would (no
/// `--wait`: a bare plane runs no pods), then waits until the MeshPolicy CRD is established.
#[allow(dead_code)]
pub async fn helm_install_chart(kubeconfig: &Path, admin: &kube::Client, namespace: &str) {
    helm(
        kubeconfig,
        &[
            "install",
            "meshwarden",
            &format!("{}/charts/meshwarden", env!("CARGO_MANIFEST_DIR")),
            "-n",
            namespace,
        ],
    );
    testplane::wait_crd_established(admin, "meshpolicies.meshwarden.io")
        .await
        .unwrap();
}
