//! `kord`: parses flags, sets up logging, and runs a member until SIGINT or SIGTERM.

use clap::Parser;
use kord_server::config::{Args, LogFormat};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    // Colour only on a terminal: pod logs and files get plain text.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    let config = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kord: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match kord_server::server::run(config, shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kord: {e:#}");
            // Kubernetes keeps this file as the container's termination message: the reason
            // shows in `kubectl describe pod`, and the operator acts on a lost-data stop.
            let log = std::path::Path::new(TERMINATION_LOG);
            if log.exists() {
                let _ = std::fs::write(log, format!("kord: {e:#}\n"));
            }
            std::process::ExitCode::FAILURE
        }
    }
}

const TERMINATION_LOG: &str = "/dev/termination-log";

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
