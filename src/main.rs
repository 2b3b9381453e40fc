//! The meshwarden binary: `meshwarden run` runs the operator, `meshwarden crd` prints the CRD.
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use kube::CustomResourceExt;

use meshwarden::api::MeshPolicy;
use meshwarden::context::Context;
use meshwarden::controller::{self, State};

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
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

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

async fn run(args: RunArgs) -> Result<(), String> {
    init_logging(args.log_format);
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("cannot reach the Kubernetes API: {e}"))?;
    let state = Arc::new(State::new(
        Context::new(client, std::env::var("POD_NAME").ok()),
        args.policy_selector,
    ));
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "meshwarden starting");
    controller::run(state, shutdown_signal()).await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crd => serde_yaml::to_string(&MeshPolicy::crd())
            .map(|y| print!("{y}"))
            .map_err(|e| e.to_string()),
        Command::Run(args) => run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshwarden: {e}");
            ExitCode::FAILURE
        }
    }
}
