//! The operator image run with podman the way the chart's Deployment runs it: the
//! ServiceAccount's token, CA and namespace mounted at the in-cluster path, the API server's
//! address in `KUBERNETES_SERVICE_HOST/PORT`, the Deployment's args and env, UID 65532, a
//! read-only root and no capability.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `podman` with the runtime and cgroup manager this machine needs (crun refuses its hybrid
/// cgroups).
pub fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
        .args(args)
        .output()
        .expect("podman (hack/image.sh installs it)")
}

/// stdout of a podman command that must succeed.
pub fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The image under test, removed when dropped if the test built it.
pub struct Image {
    pub name: String,
    built: bool,
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.built {
            let _ = podman(&["rmi", &self.name]);
        }
    }
}

/// The image under test: `MESHWARDEN_IMAGE` (hack/test.sh sets it to the one hack/image.sh
/// built from the release binary), else one built now by hack/image.sh from this package's
/// binary, so that what runs is what was just compiled.
pub fn image() -> Image {
    if let Ok(name) = std::env::var("MESHWARDEN_IMAGE") {
        return Image { name, built: false };
    }
    let name = format!("localhost/meshwarden:test-{}", std::process::id());
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/hack/image.sh"))
        .env("IMAGE", &name)
        .env("MESHWARDEN_BIN", env!("CARGO_BIN_EXE_meshwarden"))
        .output()
        .expect("hack/image.sh");
    assert!(
        out.status.success(),
        "hack/image.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    Image { name, built: true }
}

/// The in-cluster ServiceAccount mount: `token`, `ca.crt`, `namespace`, readable by 65532.
pub fn service_account_dir(dir: &Path, token: &str, ca: &Path, namespace: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let sa = dir.join("serviceaccount");
    std::fs::create_dir_all(&sa).unwrap();
    std::fs::write(sa.join("token"), token).unwrap();
    std::fs::copy(ca, sa.join("ca.crt")).unwrap();
    std::fs::write(sa.join("namespace"), namespace).unwrap();
    for f in ["token", "ca.crt", "namespace"] {
        std::fs::set_permissions(sa.join(f), std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    std::fs::set_permissions(&sa, std::fs::Permissions::from_mode(0o755)).unwrap();
    sa
}

/// A container started with `podman run -d`, removed (killed first) when dropped.
pub struct Container {
    pub name: String,
}

impl Container {
    /// Runs `image` as the chart does: `args` and `env` from the Deployment, the
    /// ServiceAccount mount `sa`, the API server at 127.0.0.1:`api_port`, host network.
    pub fn run(
        name: &str,
        image: &str,
        sa: &Path,
        api_port: u16,
        env: &[(String, String)],
        args: &[String],
    ) -> Container {
        let mut cmd: Vec<String> = [
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            // securityContext: runAsUser/runAsGroup 65532, readOnlyRootFilesystem,
            // allowPrivilegeEscalation false, capabilities drop ALL. No tmpfs either: the
            // chart mounts no volume.
            "--user",
            "65532:65532",
            "--read-only",
            "--read-only-tmpfs=false",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        cmd.push("-v".into());
        cmd.push(format!(
            "{}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
            sa.display()
        ));
        cmd.push("-e".into());
        cmd.push("KUBERNETES_SERVICE_HOST=127.0.0.1".into());
        cmd.push("-e".into());
        cmd.push(format!("KUBERNETES_SERVICE_PORT={api_port}"));
        for (k, v) in env {
            cmd.push("-e".into());
            cmd.push(format!("{k}={v}"));
        }
        cmd.push(image.into());
        cmd.extend(args.iter().cloned());
        let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
        podman_ok(&refs);
        Container { name: name.into() }
    }

    /// The container's main process on the host.
    pub fn pid(&self) -> u32 {
        podman_ok(&["inspect", "--format", "{{.State.Pid}}", &self.name])
            .parse()
            .expect("a pid")
    }

    pub fn logs(&self) -> String {
        let out = podman(&["logs", &self.name]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}

/// The mounts of process `pid` that are writable, by mount point.
pub fn writable_mounts(pid: u32) -> Vec<String> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    info.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            // mount ID, parent, major:minor, root, mount point, mount options, ...
            let (point, options) = (f.get(4)?, f.get(5)?);
            options
                .split(',')
                .any(|o| o == "rw")
                .then(|| point.to_string())
        })
        .collect()
}

/// A line of /proc/`pid`/status, such as `CapEff`.
pub fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}
