//! `kord-operator`: parses flags, sets up logging and metrics, then runs the controller (or
//! prints the generated CRD).

use std::net::SocketAddr;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use kord_operator::{controller, crd, metrics};

/// The Kubernetes operator for KordCluster resources.
#[derive(Debug, Parser)]
#[command(name = "kord-operator", version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the KordCluster CustomResourceDefinition (YAML), generated from the Rust types.
    Crd,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Watch only this namespace [default: every namespace].
    #[arg(long, env = "KORD_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Address for /metrics and /healthz.
    #[arg(
        long,
        env = "KORD_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: SocketAddr,
    /// Reach members here instead of "<cluster>.<namespace>.svc:7379" (for an operator running
    /// outside the cluster, e.g. through a port-forward).
    #[arg(long, env = "KORD_OPERATOR_MEMBER_ENDPOINT")]
    member_endpoint: Option<String>,
    /// Log as JSON lines (filter with RUST_LOG, default "info").
    #[arg(long, env = "KORD_OPERATOR_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(Command::Crd) = args.command {
        print!("{}", crd::crd_yaml()?);
        return Ok(());
    }
    let run = args.run;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if run.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        // Colour only on a terminal: pod logs get plain text.
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init();
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let listener = tokio::net::TcpListener::bind(run.metrics_addr).await?;
    tokio::spawn(metrics::serve(listener, metrics.clone()));
    let client = kube::Client::try_default().await?;
    tracing::info!(namespace = ?run.namespace, metrics = %run.metrics_addr, "kord-operator starting");
    controller::run(client, run.namespace, metrics, run.member_endpoint).await;
    Ok(())
}
