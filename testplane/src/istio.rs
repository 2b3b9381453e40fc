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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::Api;

use crate::cluster::wait_for;
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

/// Installs base and istiod with Helm into `istio-system` and starts istiod on the host.
pub(crate) async fn start(plane: &mut Plane, lifetime: Lifetime) -> Result<()> {
    let istiod_bin = bin_dir().join("pilot-discovery");
    if !istiod_bin.exists() || !charts_dir().exists() {
        return Err(Error::MissingBinaries(bin_dir()));
    }
    let port = free_port(&plane.dir)?;
    crate::write_file(&plane.dir.join("istiod.port"), &port.to_string())?;
    let mut values = image_values();
    values.extend(host_istiod_values(port));
    let install = |release: &str, chart_name: &str| -> Result<String> {
        let mut args: Vec<String> = vec![
            "install".into(),
            release.into(),
            chart(chart_name).display().to_string(),
            "--namespace".into(),
            "istio-system".into(),
            "--create-namespace".into(),
        ];
        for v in &values {
            args.push("--set".into());
            args.push(v.clone());
        }
        run_helm(&helm(), &args, Some(&plane.kubeconfig))
    };
    install("istio-base", "base")?;
    install("istiod", "istiod")?;

    let work = plane.dir.join("istiod");
    std::fs::create_dir_all(&work).map_err(|e| Error::Io {
        path: work.clone(),
        source: e,
    })?;
    let local = |p: u16| format!("127.0.0.1:{p}");
    let http = free_port(&plane.dir)?;
    let args = vec![
        "discovery".to_string(),
        format!("--kubeconfig={}", plane.kubeconfig.display()),
        format!("--httpAddr={}", local(http)),
        format!("--httpsAddr={}", local(port)),
        format!("--grpcAddr={}", local(free_port(&plane.dir)?)),
        format!("--secureGRPCAddr={}", local(free_port(&plane.dir)?)),
        format!("--monitoringAddr={}", local(free_port(&plane.dir)?)),
        "--profile=false".into(),
        "--log_output_level=default:warn,ads:error,validation:info".into(),
    ];
    let envs = [
        ("POD_NAMESPACE", "istio-system".to_string()),
        ("POD_NAME", "istiod-host".to_string()),
        ("REVISION", "default".to_string()),
        ("ISTIOD_CUSTOM_HOST", "localhost".to_string()),
        ("KUBECONFIG", plane.kubeconfig.display().to_string()),
    ];
    let istiod = spawn_with(
        &istiod_bin,
        &args,
        &envs,
        Some(&work),
        &plane.dir.join("istiod.log"),
        lifetime,
    )?;
    plane.adopt(istiod, lifetime)?;

    // Ready when istiod serves and has written its CA into the injector webhook.
    let client = plane.client().await?;
    let mwc: Api<MutatingWebhookConfiguration> = Api::all(client);
    wait_for(plane, "istiod", Duration::from_secs(120), || {
        let mwc = mwc.clone();
        async move {
            let ready = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok();
            let hook = mwc.get_opt("istio-sidecar-injector").await.ok().flatten()?;
            let patched = hook.webhooks.iter().flatten().all(|w| {
                w.client_config
                    .ca_bundle
                    .as_ref()
                    .is_some_and(|b| !b.0.is_empty())
            });
            (ready && patched && !hook.webhooks.unwrap_or_default().is_empty()).then_some(())
        }
    })
    .await?;
    Ok(())
}
