//! A real kube-apiserver and etcd on loopback, and optionally a whole cluster around them.
//!
//! The binaries are built from Go modules by `hack/build-k8s-bins.sh` into a cache outside the
//! repository. [`Plane::start`] writes a small PKI, starts etcd and kube-apiserver on free
//! ports, waits until the API server is ready and writes an admin kubeconfig: the *bare* plane.
//! [`Plane::start_with`] with [`Flavor::Cluster`] adds what a cluster runs (see [`cluster`]):
//! kube-controller-manager, kube-scheduler, kwok nodes in three zones, and Istio installed by
//! Helm from its own charts with a real istiod on the host (see [`istio`]).
//! Tests share one plane of each flavour per test binary through [`shared`] and
//! [`shared_cluster`]; `testplane up` starts a detached one for people.

pub mod certs;
pub mod cluster;
pub mod istio;
pub mod mtls;

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope};
use kube::{Client, Config, ResourceExt};

pub mod operator;
pub mod ports;
pub mod proxy;
mod restart;
pub use restart::Outage;

/// Kubernetes version the binaries are built at (see `tools/k8s-bins/go.mod`).
pub const K8S_VERSION: &str = "v1.36.2";

/// Everything that can go wrong while starting or using a plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cluster binaries not found in {0} (etcd and kube-apiserver; for a full cluster also kube-controller-manager, kube-scheduler, kwok, kwok-stages, pilot-discovery and istio-charts): run hack/build-k8s-bins.sh (or set KUBEBUILDER_ASSETS to a directory holding them)"
    )]
    MissingBinaries(PathBuf),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("{what} did not become ready within {secs}s; last log lines:\n{log}")]
    NotReady {
        what: &'static str,
        secs: u64,
        log: String,
    },
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("manifest: {0}")]
    Manifest(String),
}

type Result<T, E = Error> = std::result::Result<T, E>;

fn io<T>(path: &Path, r: std::io::Result<T>) -> Result<T> {
    r.map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The cache outside the repository that `hack/build-k8s-bins.sh` and
/// `hack/install-tools.sh` fill: `$MESHWARDEN_CACHE`, else `$XDG_CACHE_HOME/meshwarden`, else
/// `~/.cache/meshwarden`.
pub fn cache_dir() -> PathBuf {
    std::env::var("MESHWARDEN_CACHE")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("meshwarden")))
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/meshwarden")
        })
}

/// Directory holding the cluster binaries (`kube-apiserver`, `etcd`, `kube-controller-manager`,
/// `kube-scheduler`, `kwok`, `pilot-discovery`, `helm3`) and the Istio charts.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("KUBEBUILDER_ASSETS") {
        return PathBuf::from(d);
    }
    cache_dir().join("bin").join(format!("k8s-{K8S_VERSION}"))
}

/// Directory holding helm (4), kubectl, kube-score and hadolint (`hack/install-tools.sh`).
pub fn tools_dir() -> PathBuf {
    cache_dir().join("tools").join("bin")
}

/// How the processes relate to the one that starts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Killed when the starting thread exits (tests).
    Attached,
    /// Runs on after the starting process exits, in its own session (`testplane up`).
    Detached,
}

/// What a plane runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// etcd and kube-apiserver only: fast, nothing acts on what is written.
    Bare,
    /// The bare plane plus controllers, scheduler, simulated nodes and Istio with istiod.
    Cluster,
}

/// A running etcd + kube-apiserver pair (and, for a cluster, the rest).
pub struct Plane {
    /// Directory with certificates, logs, data and the kubeconfig.
    pub dir: PathBuf,
    /// Admin kubeconfig (user `admin`, group `system:masters`).
    pub kubeconfig: PathBuf,
    /// Kubeconfig of a second `system:masters` user, `meshwarden-operator`, so tests can tell
    /// the operator's requests from their own in the audit log.
    pub operator_kubeconfig: PathBuf,
    /// API server URL.
    pub server: String,
    /// What runs besides etcd and kube-apiserver.
    pub flavor: Flavor,
    children: Vec<Child>,
}

/// The audit log records every write with its user and verb (`audit.log` in the plane dir).
const AUDIT_POLICY: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  verbs: ["create", "update", "patch", "delete", "deletecollection"]
- level: None
"#;

/// [`AUDIT_POLICY`] plus every list and watch made by the operator's user, for benchmarks
/// that check the operator never lists again after its start.
const AUDIT_POLICY_WITH_READS: &str = r#"apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
- level: Metadata
  verbs: ["create", "update", "patch", "delete", "deletecollection"]
- level: Metadata
  users: ["meshwarden-operator"]
  verbs: ["list", "watch"]
- level: None
"#;

impl Plane {
    /// Starts a bare plane in `dir` (created; must not hold a running plane).
    pub async fn start(dir: &Path, lifetime: Lifetime) -> Result<Plane> {
        Plane::start_with(dir, lifetime, Flavor::Bare).await
    }

    /// Starts a plane of `flavor` in `dir` (created; must not hold a running plane).
    pub async fn start_with(dir: &Path, lifetime: Lifetime, flavor: Flavor) -> Result<Plane> {
        let mut plane = Plane::start_apiserver(dir, lifetime, flavor, AUDIT_POLICY).await?;
        if flavor == Flavor::Cluster
            && let Err(e) = cluster::start(&mut plane, lifetime).await
        {
            plane.kill();
            return Err(e);
        }
        Ok(plane)
    }

    /// Starts a bare plane whose audit log also records the operator's lists and watches.
    pub async fn start_auditing_reads(dir: &Path, lifetime: Lifetime) -> Result<Plane> {
        Plane::start_apiserver(dir, lifetime, Flavor::Bare, AUDIT_POLICY_WITH_READS).await
    }

    async fn start_apiserver(
        dir: &Path,
        lifetime: Lifetime,
        flavor: Flavor,
        audit: &str,
    ) -> Result<Plane> {
        let bins = bin_dir();
        let (apiserver_bin, etcd_bin) = (bins.join("kube-apiserver"), bins.join("etcd"));
        if !apiserver_bin.exists() || !etcd_bin.exists() {
            return Err(Error::MissingBinaries(bins));
        }
        io(dir, fs::create_dir_all(dir))?;
        let dir = io(dir, fs::canonicalize(dir))?;
        let (etcd_port, peer_port, api_port) =
            (free_port(&dir)?, free_port(&dir)?, free_port(&dir)?);
        write_pki(&dir)?;
        let audit_policy = dir.join("audit-policy.yaml");
        io(&audit_policy, fs::write(&audit_policy, audit))?;

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let etcd = spawn(
            &etcd_bin,
            &[
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer_port}"),
                "--unsafe-no-fsync=true".into(),
                "--log-level=warn".into(),
            ],
            &dir.join("etcd.log"),
            lifetime,
        )?;
        let d = |f: &str| dir.join(f).display().to_string();
        let server = format!("https://127.0.0.1:{api_port}");
        // The bare plane has no service-account controllers, so the ServiceAccount admission
        // plugin (which needs them) is off there; a cluster runs them and needs the plugin for
        // the projected tokens injected pods mount.
        let admission = match flavor {
            Flavor::Bare => "--disable-admission-plugins=ServiceAccount",
            Flavor::Cluster => "--enable-admission-plugins=ServiceAccount",
        };
        let apiserver = spawn(
            &apiserver_bin,
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                format!("--cert-dir={}", dir.display()),
                format!("--tls-cert-file={}", d("serving.crt")),
                format!("--tls-private-key-file={}", d("serving.key")),
                format!("--client-ca-file={}", d("ca.crt")),
                "--authorization-mode=RBAC".into(),
                format!("--service-account-issuer={server}"),
                format!("--service-account-key-file={}", d("sa.pub")),
                format!("--service-account-signing-key-file={}", d("sa.key")),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                admission.into(),
                "--allow-privileged=true".into(),
                "--endpoint-reconciler-type=none".into(),
                "--enable-priority-and-fairness=false".into(),
                "--profiling=false".into(),
                format!("--audit-policy-file={}", audit_policy.display()),
                format!("--audit-log-path={}", d("audit.log")),
                "--audit-log-mode=blocking".into(),
                "--audit-log-format=json".into(),
            ],
            &dir.join("kube-apiserver.log"),
            lifetime,
        )?;
        let kubeconfig = dir.join("kubeconfig");
        let operator_kubeconfig = dir.join("operator.kubeconfig");
        write_kubeconfig(&kubeconfig, &server, &dir, "admin")?;
        write_kubeconfig(&operator_kubeconfig, &server, &dir, "operator")?;
        let mut plane = Plane {
            dir,
            kubeconfig,
            operator_kubeconfig,
            server,
            flavor,
            children: Vec::new(),
        };
        plane.adopt(etcd, lifetime)?;
        plane.adopt(apiserver, lifetime)?;
        if let Err(e) = plane.wait_ready().await {
            plane.kill();
            return Err(e);
        }
        Ok(plane)
    }

    /// Takes a started process into the plane: killed with it, and listed in `pids` for
    /// [`stop_detached`] when the plane outlives its starter. Later processes stop first.
    pub(crate) fn adopt(&mut self, child: Child, lifetime: Lifetime) -> Result<()> {
        if lifetime == Lifetime::Detached {
            let path = self.dir.join("pids");
            let mut f = io(
                &path,
                fs::OpenOptions::new().create(true).append(true).open(&path),
            )?;
            io(&path, writeln!(f, "{}", child.id()))?;
        }
        self.children.insert(0, child);
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let client = client_from(&self.kubeconfig).await?;
        let started = Instant::now();
        let limit = Duration::from_secs(90);
        loop {
            let req = http_get("/readyz");
            if let Ok(body) = client.request_text(req).await
                && body.trim() == "ok"
            {
                // The bootstrap RBAC and the default namespace come with readiness.
                let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
                if ns.get_opt("default").await.ok().flatten().is_some() {
                    return Ok(());
                }
            }
            for child in &mut self.children {
                if let Ok(Some(_)) = child.try_wait() {
                    return Err(self.not_ready(started));
                }
            }
            if started.elapsed() > limit {
                return Err(self.not_ready(started));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn not_ready(&self, started: Instant) -> Error {
        let mut log = tail(&self.dir.join("etcd.log"), 10);
        log.push_str(&tail(&self.dir.join("kube-apiserver.log"), 30));
        Error::NotReady {
            what: "kube-apiserver",
            secs: started.elapsed().as_secs(),
            log,
        }
    }

    /// A client authenticated as `admin` (`system:masters`).
    pub async fn client(&self) -> Result<Client> {
        client_from(&self.kubeconfig).await
    }

    /// A client authenticated as `meshwarden-operator` (`system:masters`).
    pub async fn operator_client(&self) -> Result<Client> {
        client_from(&self.operator_kubeconfig).await
    }

    /// Leaves the processes running after this value is dropped (detached planes).
    pub fn release(mut self) {
        self.children.clear();
    }

    /// Stops the processes (data stays until the directory is removed).
    pub fn kill(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
    }

    /// Audit log entries (one JSON object each) written so far.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        read_audit(&self.dir.join("audit.log"))
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A kubeconfig for the plane in `plane_dir` (written there as `<name>.kubeconfig`)
/// authenticating as ServiceAccount `namespace/name` with a one-hour TokenRequest token: real authentication, so the
/// account's RBAC applies.
pub async fn service_account_kubeconfig(
    plane_dir: &Path,
    namespace: &str,
    name: &str,
) -> Result<PathBuf> {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    let admin_kc = plane_dir.join("kubeconfig");
    let admin = client_from(&admin_kc).await?;
    let text = io(&admin_kc, fs::read_to_string(&admin_kc))?;
    let parsed: serde_json::Value =
        serde_yaml::from_str(&text).map_err(|e| Error::Manifest(e.to_string()))?;
    let server = parsed["clusters"][0]["cluster"]["server"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(admin, namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request(name, &Default::default(), &request)
        .await
        .map_err(|e| Error::Manifest(format!("TokenRequest for {namespace}/{name}: {e}")))?
        .status
        .ok_or_else(|| Error::Manifest(format!("TokenRequest for {namespace}/{name}: no status")))?
        .token;
    let path = plane_dir.join(format!("{name}.kubeconfig"));
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: '{}', certificate-authority: '{}'}}}}]\n\
         users: [{{name: sa, user: {{token: '{token}'}}}}]\ncontexts: [{{name: t, context: {{cluster: t, user: sa}}}}]\ncurrent-context: t\n",
        server,
        plane_dir.join("ca.crt").display()
    );
    io(&path, fs::write(&path, yaml))?;
    Ok(path)
}

/// Audit entries from a plane directory's `audit.log`.
pub fn read_audit(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Stops a detached plane started in `dir` and removes the directory.
pub fn stop_detached(dir: &Path) -> Result<()> {
    if let Ok(pids) = fs::read_to_string(dir.join("pids")) {
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: sending a signal to a process id we started has no memory effects.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    if dir.exists() {
        io(dir, fs::remove_dir_all(dir))?;
    }
    Ok(())
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| Error::Kubeconfig(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig(e.to_string()))?;
    Ok(Client::try_from(config)?)
}

fn http_get(path: &str) -> http::Request<Vec<u8>> {
    let mut req = http::Request::new(Vec::new());
    *req.uri_mut() = http::Uri::try_from(path).unwrap_or_default();
    req
}

/// The bare plane shared by every test of one test binary, started on first use.
pub fn shared() -> &'static SharedPlane {
    static PLANE: OnceLock<SharedPlane> = OnceLock::new();
    PLANE.get_or_init(|| start_shared(Flavor::Bare))
}

/// The full cluster shared by every test of one test binary that asks for it, started on
/// first use (about a minute: controllers, nodes, Istio by Helm and istiod).
pub fn shared_cluster() -> &'static SharedPlane {
    static PLANE: OnceLock<SharedPlane> = OnceLock::new();
    PLANE.get_or_init(|| start_shared(Flavor::Cluster))
}

/// Starts a plane from a thread that lives as long as the process, so that the processes'
/// parent-death signal fires only when the test binary exits.
fn start_shared(flavor: Flavor) -> SharedPlane {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("testplane-{flavor:?}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            let tag = match flavor {
                Flavor::Bare => "test",
                Flavor::Cluster => "cluster",
            };
            let dir = scratch_dir(tag);
            match rt.block_on(Plane::start_with(&dir, Lifetime::Attached, flavor)) {
                Ok(plane) => {
                    let _ = tx.send(Ok(SharedPlane {
                        dir: plane.dir.clone(),
                        kubeconfig: plane.kubeconfig.clone(),
                        operator_kubeconfig: plane.operator_kubeconfig.clone(),
                        flavor,
                    }));
                    // Keep the processes (and this thread) alive until the process exits.
                    let _plane = plane;
                    loop {
                        std::thread::park();
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                }
            }
        })
        .expect("spawn the test plane thread");
    match rx.recv() {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => panic!("test {flavor:?} plane did not start: {e}"),
        Err(e) => panic!("test {flavor:?} plane thread died: {e}"),
    }
}

/// What a test needs to know of the shared plane.
#[derive(Clone, Debug)]
pub struct SharedPlane {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub operator_kubeconfig: PathBuf,
    pub flavor: Flavor,
}

impl SharedPlane {
    /// A client authenticated as `admin`.
    pub async fn client(&self) -> Client {
        client_from(&self.kubeconfig).await.expect("admin client")
    }
    /// A client authenticated as `meshwarden-operator`.
    pub async fn operator_client(&self) -> Client {
        client_from(&self.operator_kubeconfig)
            .await
            .expect("operator client")
    }
    /// Audit log entries written so far.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        read_audit(&self.dir.join("audit.log"))
    }
}

/// A fresh directory for a plane: on `/dev/shm` when it exists (etcd is faster there).
/// Directories that earlier processes left behind are removed first (a test binary's shared
/// plane lives in a static and is never dropped, so its etcd data outlives the process).
pub fn scratch_dir(tag: &str) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    sweep_stale(&base);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base.join(format!("meshwarden-{tag}-{}-{nanos}", std::process::id()))
}

/// The process id in a scratch directory's name, `meshwarden-<tag>-<pid>-<nanos>`.
fn scratch_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("meshwarden-")?;
    let mut parts = rest.rsplitn(3, '-');
    let (nanos, pid, tag) = (parts.next()?, parts.next()?, parts.next()?);
    nanos.parse::<u32>().ok()?;
    (!tag.is_empty()).then_some(())?;
    pid.parse().ok()
}

/// Removes scratch directories whose process no longer runs (Linux: checked in `/proc`).
fn sweep_stale(base: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = scratch_owner(&name.to_string_lossy()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn free_port(dir: &Path) -> Result<u16> {
    io(dir, ports::free_port())
}

fn spawn(bin: &Path, args: &[String], log: &Path, lifetime: Lifetime) -> Result<Child> {
    spawn_with(bin, args, &[], None, log, lifetime)
}

/// Starts `bin` with `args`, extra environment `envs` and working directory `cwd`, its output
/// in `log`, tied to the starter (`Attached`) or in a session of its own (`Detached`).
fn spawn_with(
    bin: &Path,
    args: &[String],
    envs: &[(&str, String)],
    cwd: Option<&Path>,
    log: &Path,
    lifetime: Lifetime,
) -> Result<Child> {
    let out = io(log, fs::File::create(log))?;
    let err = io(log, out.try_clone())?;
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    cmd.envs(envs.iter().map(|(k, v)| (*k, v.as_str())));
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    // SAFETY: the closures only call async-signal-safe libc functions.
    unsafe {
        match lifetime {
            Lifetime::Attached => cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            }),
            Lifetime::Detached => cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            }),
        };
    }
    io(bin, cmd.spawn())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    format!("--- {}\n{}\n", path.display(), all[start..].join("\n"))
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    let mut f = io(path, fs::File::create(path))?;
    io(path, f.write_all(contents.as_bytes()))
}

fn write_pki(dir: &Path) -> Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "meshwarden-test-ca");
    let ca_cert = ca.self_signed(&ca_key)?;
    write_file(&dir.join("ca.crt"), &ca_cert.pem())?;
    let issuer = Issuer::new(ca, ca_key);

    let serving_key = KeyPair::generate()?;
    let mut serving =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    write_file(
        &dir.join("serving.crt"),
        &serving.signed_by(&serving_key, &issuer)?.pem(),
    )?;
    write_file(&dir.join("serving.key"), &serving_key.serialize_pem())?;

    for (file, user) in [("admin", "admin"), ("operator", "meshwarden-operator")] {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, user);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        write_file(
            &dir.join(format!("{file}.crt")),
            &params.signed_by(&key, &issuer)?.pem(),
        )?;
        write_file(&dir.join(format!("{file}.key")), &key.serialize_pem())?;
    }
    let sa = KeyPair::generate()?;
    write_file(&dir.join("sa.pub"), &sa.public_key_pem())?;
    write_file(&dir.join("sa.key"), &sa.serialize_pem())
}

fn write_kubeconfig(path: &Path, server: &str, dir: &Path, user: &str) -> Result<()> {
    let d = |f: &str| dir.join(f).display().to_string();
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: testplane\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: testplane\n  context:\n    cluster: testplane\n    user: {user}\ncurrent-context: testplane\n",
        ca = d("ca.crt"),
        crt = d(&format!("{user}.crt")),
        key = d(&format!("{user}.key")),
    );
    write_file(path, &yaml)
}

/// Server-side applies every document of a multi-document YAML stream, as field manager
/// `testplane`. `skip` filters documents out by kind. Returns the number applied.
pub async fn apply_yaml(client: &Client, yaml: &str, skip: &[&str]) -> Result<usize> {
    apply_yaml_as(client, yaml, skip, "testplane").await
}

/// [`apply_yaml`] with another field manager (e.g. `helm`, to look like a Helm install).
pub async fn apply_yaml_as(
    client: &Client,
    yaml: &str,
    skip: &[&str],
    manager: &str,
) -> Result<usize> {
    use serde::Deserialize;
    let mut discovery = Discovery::new(client.clone()).run().await?;
    let mut applied = 0;
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value =
            serde_json::Value::deserialize(doc).map_err(|e| Error::Manifest(e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let obj: DynamicObject =
            serde_json::from_value(value).map_err(|e| Error::Manifest(e.to_string()))?;
        let Some(types) = obj.types.clone() else {
            return Err(Error::Manifest(format!(
                "{} has no apiVersion/kind",
                obj.name_any()
            )));
        };
        if skip.contains(&types.kind.as_str()) {
            continue;
        }
        let (group, version) = match types.api_version.split_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (String::new(), types.api_version.clone()),
        };
        let gvk = kube::api::GroupVersionKind::gvk(&group, &version, &types.kind);
        let found = match discovery.resolve_gvk(&gvk) {
            Some(found) => found,
            None => {
                // A CRD applied earlier in the same stream: refresh discovery once.
                discovery = Discovery::new(client.clone()).run().await?;
                discovery
                    .resolve_gvk(&gvk)
                    .ok_or_else(|| Error::Manifest(format!("unknown kind {gvk:?}")))?
            }
        };
        let (ar, caps): (ApiResource, ApiCapabilities) = found;
        let api: Api<DynamicObject> = match (&caps.scope, obj.namespace()) {
            (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), &ns, &ar),
            (Scope::Namespaced, None) => Api::default_namespaced_with(client.clone(), &ar),
            (Scope::Cluster, _) => Api::all_with(client.clone(), &ar),
        };
        let name = obj.name_any();
        api.patch(
            &name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&obj),
        )
        .await?;
        if types.kind == "CustomResourceDefinition" {
            wait_crd_established(client, &name).await?;
        }
        applied += 1;
    }
    Ok(applied)
}

/// Waits until a CRD is Established (10 s at most).
pub async fn wait_crd_established(client: &Client, name: &str) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let cond = kube::runtime::wait::conditions::is_crd_established();
    let wait = kube::runtime::wait::await_condition(crds, name, cond);
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .map_err(|_| Error::Manifest(format!("CRD {name} not established within 10s")))?
        .map_err(|e| Error::Manifest(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_directory_names_give_their_process() {
        assert_eq!(scratch_owner("meshwarden-test-123-456789"), Some(123));
        assert_eq!(scratch_owner("meshwarden-bench-sidecars-77-1"), Some(77));
        assert_eq!(scratch_owner("meshwarden-dev"), None);
        assert_eq!(scratch_owner("meshwarden-test-x-1"), None);
        assert_eq!(scratch_owner("other-test-1-2"), None);
        let name = scratch_dir("t");
        let name = name.file_name().unwrap().to_string_lossy().to_string();
        assert_eq!(scratch_owner(&name), Some(std::process::id()));
    }
}
