//! The meshwarden binary: `meshwarden run` runs the operator, `meshwarden crd` prints the CRD,
//! `meshwarden values` prints the installers' values (Helm, Sail operator, Argo CD) that declare
//! what the policies hold, `meshwarden plan` shows what Enforce would write.
mod allocator;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use meshwarden::context::Context;
use meshwarden::controller::{self, State};
use meshwarden::presence::{Presence, Seen};
use meshwarden::telemetry::{self, Metrics};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "meshwarden",
    version,
    about = "Keeps an Istio mesh in production posture"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator against the cluster of the current kubeconfig or service account.
    Run(RunArgs),
    /// Print the MeshPolicy CustomResourceDefinition as YAML.
    Crd,
    /// Print, per installer of istiod or a gateway that a policy covers (a Helm release, the
    /// Sail operator's Istio resource, an Argo CD Application), the values that declare what the
    /// policy holds (for `helm upgrade --reuse-values -f`, a patch of the Istio resource, or the
    /// Application's values in Git).
    Values {
        /// Only this MeshPolicy (default: every policy).
        policy: Option<String>,
    },
    /// Show exactly what Enforce would write for a policy, without writing anything: the
    /// operator's own evaluation with every section in Enforce, each write sent as a dry run
    /// (`dryRun=All`). Exit code 0: nothing would change; 2: changes are pending; 1: error.
    Plan(PlanArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum PlanOutput {
    /// Per object a unified diff of its fields, takeovers, refusals and rollouts.
    Diff,
    Yaml,
    Json,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// The MeshPolicy in the cluster to plan.
    #[arg(required_unless_present = "filename", conflicts_with = "filename")]
    policy: Option<String>,
    /// A MeshPolicy manifest to plan instead (`-` reads stdin); neither it nor its CRD need
    /// exist in the cluster.
    #[arg(short = 'f', long)]
    filename: Option<std::path::PathBuf>,
    /// What to print.
    #[arg(short = 'o', long, value_enum, default_value = "diff")]
    output: PlanOutput,
    /// Namespace of istiod, as for `run`.
    #[arg(long, default_value = meshwarden::istio::DEFAULT_ISTIO_NAMESPACE, env = "MESHWARDEN_ISTIO_NAMESPACE")]
    istio_namespace: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Log format.
    #[arg(
        long,
        value_enum,
        default_value = "plain",
        env = "MESHWARDEN_LOG_FORMAT"
    )]
    log_format: LogFormat,
    /// Handle only MeshPolicies matching this label selector (e.g. `team=platform`).
    #[arg(long, env = "MESHWARDEN_POLICY_SELECTOR")]
    policy_selector: Option<String>,
    /// Address of the `/livez`, `/readyz` and `/metrics` endpoints.
    #[arg(long, default_value = "0.0.0.0:8080", env = "MESHWARDEN_METRICS_ADDR")]
    metrics_addr: SocketAddr,
    /// Elect a leader through a Lease so that only one replica writes.
    #[arg(long, default_value_t = false, env = "MESHWARDEN_LEADER_ELECTION")]
    leader_election: bool,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "meshwarden-leader")]
    lease_name: String,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Namespace of istiod, whose mesh config (ConfigMap `istio` or `istio-<revision>`, key
    /// `mesh`) gives Istio's root namespace. meshwarden reads ConfigMaps only there.
    #[arg(long, default_value = meshwarden::istio::DEFAULT_ISTIO_NAMESPACE, env = "MESHWARDEN_ISTIO_NAMESPACE")]
    istio_namespace: String,
    /// Seconds a leader holds the Lease without renewing it; a standby takes over after that.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(5..=300))]
    lease_duration: u64,
    /// Seconds an HA target may fall short of what runs (replicas available, spread achieved,
    /// drains possible) before its section reports it; until then it reads `Progressing`.
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(0..=3600), env = "MESHWARDEN_AVAILABILITY_GRACE")]
    availability_grace: u64,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // kube's watcher logs every failed attempt; `watch::resilient` logs each change of state.
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,kube=warn,kube_runtime::watcher=error")
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down");
}

/// Resolves once this instance is (`true`) or is no longer (`false`) passive. Without a
/// presence task (it ended) the instance stays active.
async fn until_passive(rx: &mut watch::Receiver<Seen>, passive: bool) {
    if rx
        .wait_for(|s| s.yield_to.is_some() == passive)
        .await
        .is_err()
        && passive
    {
        std::future::pending::<()>().await;
    }
}

/// Resolves once `rx` holds `want` (or its sender is gone).
async fn until(rx: &mut watch::Receiver<bool>, want: bool) {
    let _ = rx.wait_for(|v| *v == want).await;
}

async fn run(args: RunArgs) -> Result<(), String> {
    init_logging(args.log_format);
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the Kubernetes API: {e}"))?;
    let metrics = Arc::new(Metrics::default());
    let server = telemetry::serve(args.metrics_addr, metrics.clone());
    let addr = args.metrics_addr;
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(%addr, error = %e, "cannot serve /livez, /readyz and /metrics");
        }
    });
    let identity = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("meshwarden-{}", std::process::id()));
    let mut ctx = Context::with_metrics(client.clone(), Some(identity.clone()), metrics.clone());
    ctx.istio_namespace = args.istio_namespace;
    ctx.availability_grace = std::time::Duration::from_secs(args.availability_grace);
    let state = Arc::new(State::new(ctx, args.policy_selector.clone()));
    tracing::info!(version = env!("CARGO_PKG_VERSION"), %identity, "meshwarden starting");

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let presence = |elected: bool, namespace: String| Presence {
        client: client.clone(),
        namespace,
        lease_name: args.lease_name.clone(),
        identity: identity.clone(),
        elected,
        selector: args.policy_selector.clone(),
        duration: args.lease_duration,
        metrics: metrics.clone(),
    };

    if !args.leader_election {
        // Without leader election this instance still keeps a presence record, so that a
        // second one is detected; the younger of two goes passive (writes nothing, publishes
        // no Event) until the other is gone.
        let namespace = args
            .lease_namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let present = presence(false, namespace).start().await;
        loop {
            let mut seen = present.seen.clone();
            if seen.borrow().yield_to.is_some() {
                metrics.leader.set(0);
                metrics.set_ready(true);
                let mut stop = stop_rx.clone();
                tokio::select! {
                    _ = until_passive(&mut seen, false) => {},
                    _ = until(&mut stop, true) => break,
                }
                tracing::info!("no other instance is active; resuming writes");
            }
            if *stop_rx.borrow() {
                break;
            }
            metrics.leader.set(1);
            metrics.set_ready(false);
            let mut stop = stop_rx.clone();
            controller::run(state.clone(), async move {
                tokio::select! {
                    _ = until_passive(&mut seen, true) => tracing::warn!("another instance is active; stopping writes"),
                    _ = until(&mut stop, true) => {},
                }
            })
            .await;
            if *stop_rx.borrow() {
                break;
            }
        }
        // The record goes once nothing is written any more: a passive peer resumes at once.
        present.stop().await;
        return Ok(());
    }

    let namespace = args.lease_namespace.clone().ok_or(
        "--leader-election needs --lease-namespace (or the POD_NAMESPACE environment variable)",
    )?;
    let lease = LeaseConfig {
        client: client.clone(),
        namespace,
        name: args.lease_name.clone(),
        identity: identity.clone(),
        duration: args.lease_duration,
    };
    let mut election = lease.start().await?;
    loop {
        // Standby: ready (so rollouts of the operator proceed) but writing nothing.
        metrics.leader.set(0);
        metrics.set_ready(true);
        tracing::info!(lease = %lease.name, "waiting to become leader");
        let mut stop = stop_rx.clone();
        let (mut leader, task) = election;
        tokio::select! {
            _ = until(&mut leader, true) => {},
            _ = until(&mut stop, true) => {
                election = (leader, task);
                break;
            }
            // The lease manager sleeps until the holder's lease expires; a holder that
            // released it (graceful shutdown) is taken over at once by starting it afresh.
            _ = lease.released() => {
                drop(leader);
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
                election = lease.start().await?;
                continue;
            }
        }
        election = (leader, task);
        if *stop_rx.borrow() {
            break;
        }
        tracing::info!("became leader");
        metrics.leader.set(1);
        metrics.set_ready(false);
        // The leader's presence record: an instance started without leader election next to
        // it sees it and stays passive.
        let present = presence(true, lease.namespace.clone()).start().await;
        let (mut lost, mut stop) = (election.0.clone(), stop_rx.clone());
        controller::run(state.clone(), async move {
            tokio::select! {
                _ = until(&mut lost, false) => tracing::warn!("lost leadership; stopping writes"),
                _ = until(&mut stop, true) => {},
            }
        })
        .await;
        present.stop().await;
        if *stop_rx.borrow() {
            break;
        }
    }
    // Closing the channel releases the Lease, so a standby takes over at once.
    let (leader, task) = election;
    drop(leader);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    Ok(())
}

/// The leader-election Lease and this instance's part in it.
struct LeaseConfig {
    client: kube::Client,
    namespace: String,
    name: String,
    identity: String,
    duration: u64,
}

type Election = (
    watch::Receiver<bool>,
    tokio::task::JoinHandle<kube_lease_manager::Result<kube_lease_manager::LeaseManager>>,
);

impl LeaseConfig {
    /// Starts electing: the receiver holds whether this instance leads.
    async fn start(&self) -> Result<Election, String> {
        let manager = kube_lease_manager::LeaseManagerBuilder::new(self.client.clone(), &self.name)
            .with_namespace(&self.namespace)
            .with_identity(&self.identity)
            .with_duration(self.duration)
            .with_grace((self.duration / 3).max(2))
            .build()
            .await
            .map_err(|e| {
                format!(
                    "leader election on Lease {}/{}: {e}",
                    self.namespace, self.name
                )
            })?;
        Ok(manager.watch().await)
    }

    /// Resolves when the Lease is seen without a holder (released, or never held). Watches the
    /// one Lease; pends forever if it cannot be watched (the lease manager still takes over
    /// when the lease expires).
    async fn released(&self) {
        use futures::StreamExt;
        use kube::runtime::watcher;
        let api: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
            kube::Api::namespaced(self.client.clone(), &self.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        // Its own health record: this watch does not decide readiness.
        let health = Arc::new(meshwarden::watch::Health::default());
        let mut events = std::pin::pin!(meshwarden::watch::resilient(health, "Lease", move || {
            watcher(api.clone(), config.clone())
        }));
        // Only changes: a Lease free when the watch starts is taken by the lease manager itself.
        while let Some(event) = events.next().await {
            if let Ok(watcher::Event::Apply(l)) = event
                && l.spec
                    .and_then(|s| s.holder_identity)
                    .is_none_or(|h| h.is_empty())
            {
                return;
            }
        }
        std::future::pending::<()>().await;
    }
}

async fn values(policy: Option<&str>) -> Result<(), String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the cluster: {e}"))?;
    let ctx = Context::new(client, None);
    let out = meshwarden::rules::ha::values::values_files(&ctx, policy)
        .await
        .map_err(|e| e.to_string())?;
    print!("{out}");
    Ok(())
}

/// `meshwarden plan`: the exit code (0 nothing pending, 2 changes pending, 1 incomplete).
async fn plan(args: PlanArgs) -> Result<u8, String> {
    use meshwarden::plan::{self, Output, Source};
    let source = match (&args.policy, &args.filename) {
        (_, Some(path)) => {
            let text = match path.to_str() {
                Some("-") => std::io::read_to_string(std::io::stdin()),
                _ => std::fs::read_to_string(path),
            };
            Source::File(text.map_err(|e| format!("cannot read {}: {e}", path.display()))?)
        }
        (Some(name), None) => Source::Cluster(name.clone()),
        (None, None) => return Err("name a MeshPolicy or give -f FILE".into()),
    };
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the cluster: {e}"))?;
    let p = plan::plan(client, source, &args.istio_namespace)
        .await
        .map_err(|e| e.to_string())?;
    let output = match args.output {
        PlanOutput::Diff => Output::Diff,
        PlanOutput::Yaml => Output::Yaml,
        PlanOutput::Json => Output::Json,
    };
    print!("{}", plan::render(&p, output).map_err(|e| e.to_string())?);
    Ok(p.exit_code())
}

fn main() -> ExitCode {
    allocator::configure();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("meshwarden: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async_main())
}

async fn async_main() -> ExitCode {
    // A usage error exits 1, not clap's 2: `meshwarden plan` says "changes pending" with 2.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.use_stderr() {
                true => ExitCode::FAILURE,
                false => ExitCode::SUCCESS,
            };
        }
    };
    let result = match cli.command {
        Command::Plan(args) => {
            return match plan(args).await {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("meshwarden: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Crd => meshwarden::api::crd_yaml()
            .map(|y| print!("{y}"))
            .map_err(|e| e.to_string()),
        Command::Run(args) => run(args).await,
        Command::Values { policy } => values(policy.as_deref()).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshwarden: {e}");
            ExitCode::FAILURE
        }
    }
}
