//! Istio from its own Helm charts (the `manifests/charts` of the pinned `istio.io/istio`
//! module, linked into the binary cache by `hack/build-k8s-bins.sh`), installed with Helm as
//! users install it, and a real istiod (`pilot-discovery`) on the host.
//!
//! istiod runs outside the cluster, so the charts are installed the way Istio supports an
//! external istiod: `istiodRemote.injectionURL` and `base.validationURL` point the webhooks at
//! `https://localhost:<port>`, and `ISTIOD_CUSTOM_HOST=localhost` puts that name into istiod's
//! serving certificate. istiod writes its CA into the webhooks itself. The istiod Deployment the
//! chart creates still runs, on simulated nodes, so the cluster looks like a real one to
//! meshwarden.
//!
//! A test can add a second revision the same way ([`start_revision`]): its release
//! `istiod-<revision>` in `istio-system` and its own `pilot-discovery` with `REVISION` set,
//! which then injects the pods its namespaces and tags select.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::Api;

use crate::cluster::wait_for_in;
use crate::{Error, Lifetime, Plane, Result, bin_dir, free_port, spawn_with, tools_dir};

/// The pins of `tools/versions.env`.
const VERSIONS: &str = include_str!("../../tools/versions.env");

/// A pinned version from `tools/versions.env` (`KEY=VALUE` lines).
pub fn pinned(key: &str) -> Option<&'static str> {
    VERSIONS.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim())
    })
}

/// The Istio version the charts are installed as (image tag).
pub fn version() -> &'static str {
    pinned("ISTIO_VERSION").unwrap_or("unknown")
}

/// Root of Istio's Helm charts.
pub fn charts_dir() -> PathBuf {
    bin_dir().join("istio-charts")
}

/// A chart by its short name: `base`, `istiod` (istio-discovery), `gateway`, `ztunnel`, `cni`.
pub fn chart(name: &str) -> PathBuf {
    let rel = match name {
        "istiod" | "istio-discovery" => "istio-control/istio-discovery",
        "cni" => "istio-cni",
        other => other,
    };
    charts_dir().join(rel)
}

/// The Gateway API CRDs of the standard channel, from the `config/crd/standard` of the
/// pinned `sigs.k8s.io/gateway-api` module (the version `istio.io/istio` depends on), linked
/// into the binary cache by `hack/build-k8s-bins.sh`: every CustomResourceDefinition there,
/// as one YAML stream.
pub fn gateway_api_crds() -> Result<String> {
    let dir = bin_dir().join("gateway-api-crds").join("standard");
    let entries = std::fs::read_dir(&dir).map_err(|e| Error::Io {
        path: dir.clone(),
        source: e,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut out = String::new();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| Error::Io {
            path: f.clone(),
            source: e,
        })?;
        if text.contains("kind: CustomResourceDefinition") {
            out.push_str("---\n");
            out.push_str(&text);
            out.push('\n');
        }
    }
    Ok(out)
}

/// Helm 4 (from `hack/install-tools.sh`), else `helm` on PATH.
pub fn helm() -> PathBuf {
    let p = tools_dir().join("helm");
    if p.exists() { p } else { PathBuf::from("helm") }
}

/// Helm 3 (built by `hack/build-k8s-bins.sh`).
pub fn helm3() -> PathBuf {
    bin_dir().join("helm3")
}

/// Values every Istio install here sets: where images would come from.
pub fn image_values() -> Vec<String> {
    vec![
        "global.hub=docker.io/istio".into(),
        format!("global.tag={}", version()),
    ]
}

/// How each named fixture is rendered: chart, release, namespace, values.
fn fixture_recipe(name: &str) -> Option<(&'static str, &'static str, &'static str, Vec<String>)> {
    let istiod = |extra: &[&str]| {
        let mut v = image_values();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    Some(match name {
        "base.yaml" => ("base", "base", "istio-system", Vec::new()),
        "istiod-default.yaml" => ("istiod", "istiod", "istio-system", istiod(&[])),
        "istiod-fixed-replicas.yaml" => (
            "istiod",
            "istiod",
            "istio-system",
            istiod(&["autoscaleEnabled=false", "replicaCount=1"]),
        ),
        "istiod-ha.yaml" => (
            "istiod",
            "istiod",
            "istio-system",
            istiod(&["autoscaleMin=2"]),
        ),
        "istiod-revision-canary.yaml" => (
            "istiod",
            "istiod-canary",
            "istio-system",
            istiod(&["revision=canary"]),
        ),
        "istiod-ambient.yaml" => (
            "istiod",
            "istiod",
            "istio-system",
            istiod(&["profile=ambient"]),
        ),
        "gateway-ingress.yaml" => (
            "gateway",
            "istio-ingressgateway",
            "istio-ingress",
            istiod(&[]),
        ),
        "ztunnel.yaml" => (
            "ztunnel",
            "ztunnel",
            "istio-system",
            istiod(&["profile=ambient"]),
        ),
        _ => return None,
    })
}

/// The manifests of a named fixture (`istiod-ha.yaml`, `gateway-ingress.yaml`, ... as listed
/// in docs/development.md), rendered from Istio's charts with `helm template` once per process.
pub fn fixture(name: &str) -> Result<String> {
    static CACHE: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);
    if let Some(text) = CACHE
        .lock()
        .ok()
        .and_then(|c| c.as_ref().and_then(|m| m.get(name).cloned()))
    {
        return Ok(text);
    }
    let (chart_name, release, namespace, values) = fixture_recipe(name)
        .ok_or_else(|| Error::Manifest(format!("no Istio fixture named {name}")))?;
    let text = template(chart_name, release, namespace, &values)?;
    if let Ok(mut c) = CACHE.lock() {
        c.get_or_insert_with(HashMap::new)
            .insert(name.to_string(), text.clone());
    }
    Ok(text)
}

/// `helm template RELEASE CHART -n NAMESPACE --set V...`: a chart's manifests as Helm would
/// install them.
pub fn template(
    chart_name: &str,
    release: &str,
    namespace: &str,
    values: &[String],
) -> Result<String> {
    let mut args: Vec<String> = vec![
        "template".into(),
        release.into(),
        chart(chart_name).display().to_string(),
        "--namespace".into(),
        namespace.into(),
    ];
    for v in values {
        args.push("--set".into());
        args.push(v.clone());
    }
    run_helm(&helm(), &args, None)
}

/// Runs a Helm binary with `args` (and `--kubeconfig` when given), with Helm's own state kept
/// in a scratch directory; returns stdout, or an error with stderr.
pub fn run_helm(helm: &Path, args: &[String], kubeconfig: Option<&Path>) -> Result<String> {
    let home = std::env::temp_dir().join(format!("meshwarden-helm-{}", std::process::id()));
    let mut cmd = Command::new(helm);
    cmd.args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    if let Some(k) = kubeconfig {
        cmd.arg("--kubeconfig").arg(k);
    }
    let out = cmd.output().map_err(|e| Error::Io {
        path: helm.to_path_buf(),
        source: e,
    })?;
    if !out.status.success() {
        return Err(Error::Manifest(format!(
            "{} {}: {}",
            helm.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The webhook URL values that point Istio's charts at the istiod on the host.
pub fn host_istiod_values(port: u16) -> Vec<String> {
    vec![
        format!("istiodRemote.injectionURL=https://localhost:{port}/inject"),
        format!("base.validationURL=https://localhost:{port}/validate"),
    ]
}

/// The port of the host istiod's webhooks in a cluster plane (kept in `istiod.port`).
pub fn webhook_port(plane_dir: &Path) -> Option<u16> {
    std::fs::read_to_string(plane_dir.join("istiod.port"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `helm install RELEASE CHART -n istio-system` with `values`, as the plane's admin.
fn install(kubeconfig: &Path, release: &str, chart_name: &str, values: &[String]) -> Result<()> {
    let mut args: Vec<String> = vec![
        "install".into(),
        release.into(),
        chart(chart_name).display().to_string(),
        "--namespace".into(),
        "istio-system".into(),
        "--create-namespace".into(),
    ];
    for v in values {
        args.push("--set".into());
        args.push(v.clone());
    }
    run_helm(&helm(), &args, Some(kubeconfig)).map(|_| ())
}

/// Installs base and istiod with Helm into `istio-system` and starts istiod on the host.
pub(crate) async fn start(plane: &mut Plane, lifetime: Lifetime) -> Result<()> {
    if !bin_dir().join("pilot-discovery").exists() || !charts_dir().exists() {
        return Err(Error::MissingBinaries(bin_dir()));
    }
    let port = free_port(&plane.dir)?;
    crate::write_file(&plane.dir.join("istiod.port"), &port.to_string())?;
    let mut values = image_values();
    values.extend(host_istiod_values(port));
    install(&plane.kubeconfig, "istio-base", "base", &values)?;
    install(&plane.kubeconfig, "istiod", "istiod", &values)?;
    let istiod = spawn_istiod(
        &plane.dir,
        &plane.kubeconfig,
        "default",
        port,
        &[],
        lifetime,
    )?;
    plane.adopt(istiod, lifetime)?;
    wait_injector(&plane.dir, &plane.kubeconfig, "default", port).await
}

/// Starts `pilot-discovery discovery` for `revision` on the host, its webhooks on `port`
/// (`https://localhost:<port>`), its log in `istiod.log` (`istiod-<revision>.log` for another
/// revision). `REVISION` is what the chart's Deployment sets: the injector ConfigMap
/// (`istio-sidecar-injector-<revision>`), the mesh config (`istio-<revision>`) and the webhooks
/// it patches (labelled `istio.io/rev=<revision>`) follow from it. Every revision runs in
/// `istio-system`, so they share the CA in `istio-ca-secret` and write the same root into each
/// namespace's `istio-ca-root-cert`.
fn spawn_istiod(
    dir: &Path,
    kubeconfig: &Path,
    revision: &str,
    port: u16,
    extra_env: &[(&str, &str)],
    lifetime: Lifetime,
) -> Result<std::process::Child> {
    let name = match revision {
        "default" => "istiod".to_string(),
        other => format!("istiod-{other}"),
    };
    let work = dir.join(&name);
    std::fs::create_dir_all(&work).map_err(|e| Error::Io {
        path: work.clone(),
        source: e,
    })?;
    let local = |p: u16| format!("127.0.0.1:{p}");
    let args = vec![
        "discovery".to_string(),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--httpAddr={}", local(free_port(dir)?)),
        format!("--httpsAddr={}", local(port)),
        format!("--grpcAddr={}", local(free_port(dir)?)),
        format!("--secureGRPCAddr={}", local(free_port(dir)?)),
        format!("--monitoringAddr={}", local(free_port(dir)?)),
        "--profile=false".into(),
        "--log_output_level=default:warn,ads:error,validation:info".into(),
    ];
    let mut envs = vec![
        ("POD_NAMESPACE", "istio-system".to_string()),
        ("POD_NAME", format!("{name}-host")),
        ("REVISION", revision.to_string()),
        ("ISTIOD_CUSTOM_HOST", "localhost".to_string()),
        ("KUBECONFIG", kubeconfig.display().to_string()),
    ];
    envs.extend(extra_env.iter().map(|(k, v)| (*k, v.to_string())));
    spawn_with(
        &bin_dir().join("pilot-discovery"),
        &args,
        &envs,
        Some(&work),
        &dir.join(format!("{name}.log")),
        lifetime,
    )
}

/// Waits until the istiod of `revision` serves on `port` and has written its CA into every
/// injector webhook of its revision (its own and its tags': labelled `istio.io/rev`).
async fn wait_injector(dir: &Path, kubeconfig: &Path, revision: &str, port: u16) -> Result<()> {
    let client = crate::client_from(kubeconfig).await?;
    let mwc: Api<MutatingWebhookConfiguration> = Api::all(client);
    let selector = format!("istio.io/rev={revision}");
    wait_for_in(dir, "istiod", Duration::from_secs(120), || {
        let (mwc, selector) = (mwc.clone(), selector.clone());
        async move {
            let ready = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok();
            let lp = kube::api::ListParams::default().labels(&selector);
            let hooks = mwc.list(&lp).await.ok()?.items;
            let patched = hooks.iter().all(|h| {
                h.webhooks.iter().flatten().all(|w| {
                    w.client_config
                        .ca_bundle
                        .as_ref()
                        .is_some_and(|b| !b.0.is_empty())
                })
            });
            (ready && patched && !hooks.is_empty()).then_some(())
        }
    })
    .await
}

/// A second istiod revision on the host, next to a cluster plane's default one: its Helm
/// release `istiod-<revision>` in `istio-system` and its `pilot-discovery`. Dropping it (or
/// [`HostRevision::stop`]) uninstalls the release first, then stops istiod, so no webhook is
/// left pointing at a port nobody serves; istiod also dies with the thread that started it,
/// like the plane's own processes.
pub struct HostRevision {
    /// The revision (`canary`).
    pub revision: String,
    /// Its Helm release, `istiod-<revision>` in `istio-system`.
    pub release: String,
    /// The port of its webhooks.
    pub port: u16,
    kubeconfig: PathBuf,
    child: Option<std::process::Child>,
}

/// Installs Istio's istiod chart as revision `revision` (`helm install istiod-<revision>
/// <istio-discovery> -n istio-system --set revision=<revision>`, the plane's image values, the
/// host webhook values for a port of its own, then `values`, e.g. `revisionTags={prod}`,
/// `global.tag=1.33.1`) and starts its `pilot-discovery` with `REVISION=<revision>`; returns once
/// it serves and has patched its webhooks (and its tags'). Opt-in: only tests that call it pay
/// for it. Call it from the test's own thread (a `#[tokio::test]` runs there): istiod gets the
/// parent-death signal of that thread. Set `global.configValidation=false` unless the test
/// wants this istiod to validate Istio resources too.
pub async fn start_revision(
    plane_dir: &Path,
    kubeconfig: &Path,
    revision: &str,
    values: &[String],
) -> Result<HostRevision> {
    start_revision_with_env(plane_dir, kubeconfig, revision, values, &[]).await
}

/// [`start_revision`] with environment variables of istiod's own (`PILOT_ENABLE_AMBIENT=true`
/// for the waypoint GatewayClass, say), for this revision only.
pub async fn start_revision_with_env(
    plane_dir: &Path,
    kubeconfig: &Path,
    revision: &str,
    values: &[String],
    env: &[(&str, &str)],
) -> Result<HostRevision> {
    if revision.is_empty() || revision == "default" {
        return Err(Error::Manifest(format!(
            "start_revision: revision {revision:?} is the plane's own; name another (canary)"
        )));
    }
    let port = free_port(plane_dir)?;
    let release = format!("istiod-{revision}");
    let mut all = image_values();
    all.extend(host_istiod_values(port));
    all.push(format!("revision={revision}"));
    all.extend(values.iter().cloned());
    install(kubeconfig, &release, "istiod", &all)?;
    let mut out = HostRevision {
        revision: revision.to_string(),
        release,
        port,
        kubeconfig: kubeconfig.to_path_buf(),
        child: None,
    };
    out.child = Some(spawn_istiod(
        plane_dir,
        kubeconfig,
        revision,
        port,
        env,
        Lifetime::Attached,
    )?);
    wait_injector(plane_dir, kubeconfig, revision, port).await?;
    Ok(out)
}

impl HostRevision {
    /// `helm uninstall` of the release, then istiod stopped.
    pub fn stop(mut self) -> Result<()> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let args: Vec<String> = vec![
            "uninstall".into(),
            self.release.clone(),
            "--namespace".into(),
            "istio-system".into(),
        ];
        let uninstalled = run_helm(&helm(), &args, Some(&self.kubeconfig)).map(|_| ());
        let _ = child.kill();
        let _ = child.wait();
        uninstalled
    }
}

impl Drop for HostRevision {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}
