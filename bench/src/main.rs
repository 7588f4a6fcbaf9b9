//! The `kord-bench` command line: `run` one workload against running servers, or `compare`
//! Kord with etcd and ZooKeeper on freshly started local setups.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kord_bench::{CompareOptions, RunConfig, Target, Workload};

/// The same allocator as the `kord` server; it serves all three targets' clients alike.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kord-bench",
    version,
    about = "Benchmarks Kord against etcd and ZooKeeper"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One workload against running servers; prints a summary line (or JSON with --json).
    Run(RunArgs),
    /// Starts Kord, etcd and ZooKeeper on 127.0.0.1 (1 and 3 members), runs the matrix,
    /// stops everything it started and prints JSON lines and a Markdown table.
    Compare(CompareArgs),
    /// Renders the Markdown table from JSON lines files of earlier runs (a later line for the
    /// same setup, target and row replaces an earlier one).
    Table(TableArgs),
}

#[derive(Args)]
struct TableArgs {
    /// JSON lines files written by `compare --json-out` or `run --json`.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    #[arg(long, value_enum)]
    target: Target,
    /// Client endpoints, host:port, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    #[arg(long, value_enum, default_value = "write")]
    workload: Workload,
    /// Closed-loop clients (one request in flight each).
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Connections (ZooKeeper: sessions) shared by the clients. Default: clients, at most 8.
    #[arg(long)]
    connections: Option<usize>,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    duration: Duration,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    warmup: Duration,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Keys in the key space (created before the run).
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    /// Fixed total request rate (ops/s) instead of back to back; for watches the write rate
    /// (default 50).
    #[arg(long)]
    rate: Option<f64>,
    /// Watchers of the watch-fanout workload.
    #[arg(long, default_value_t = 1000)]
    watchers: usize,
    /// Server PIDs whose CPU seconds are reported, comma-separated.
    #[arg(long, value_delimiter = ',')]
    server_pids: Vec<u32>,
    /// Label of the setup carried into the report, e.g. "3 nodes".
    #[arg(long, default_value = "")]
    setup: String,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    op_timeout: Duration,
    /// Kord: send every write in a call of its own, not batched with concurrent ones.
    #[arg(long)]
    kord_unbatched: bool,
    /// Print the report as a JSON line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CompareArgs {
    /// A short matrix: 2 s runs, 0.5 s warm-up, 100 watchers.
    #[arg(long)]
    quick: bool,
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Only these workloads, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    workloads: Vec<Workload>,
    /// Cluster sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    sizes: Vec<usize>,
    /// Targets, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kord,etcd,zookeeper"
    )]
    targets: Vec<Target>,
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    #[arg(long, default_value_t = 1000)]
    keys: usize,
    #[arg(long)]
    watchers: Option<usize>,
    /// The kord server binary. Default: `kord` next to this executable.
    #[arg(long)]
    kord_bin: Option<PathBuf>,
    /// Don't apt-get install missing peers.
    #[arg(long)]
    no_install: bool,
    /// Also write the JSON lines to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Also write the Markdown table to this file.
    #[arg(long)]
    markdown_out: Option<PathBuf>,
    /// Keep data dirs and logs here instead of a temporary directory that is removed.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Run the matrix this many times per cluster size, rotating the targets' order each
    /// round; each table cell is then its median round. On a shared or noisy machine a
    /// single round can be off by a third.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// Kord: send every write in a call of its own, not batched with concurrent ones.
    #[arg(long)]
    kord_unbatched: bool,
}

fn default_kord_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("kord")))
        .unwrap_or_else(|| PathBuf::from("kord"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => {
            let mut cfg = RunConfig::new(a.target, a.endpoints, a.workload);
            cfg.clients = a.clients;
            cfg.connections = a.connections.unwrap_or(a.clients.min(8));
            cfg.duration = a.duration;
            cfg.warmup = a.warmup;
            cfg.value_size = a.value_size;
            cfg.keys = a.keys;
            cfg.rate = a.rate;
            cfg.watchers = a.watchers;
            cfg.server_pids = a.server_pids;
            cfg.setup = a.setup;
            cfg.op_timeout = a.op_timeout;
            cfg.kord_batch_writes = !a.kord_unbatched;
            let report = kord_bench::run(&cfg).await?;
            if a.json {
                println!("{}", report.to_json_line());
            } else {
                println!("{}", report.summary());
            }
        }
        Cmd::Table(a) => {
            let mut reports: Vec<kord_bench::Report> = Vec::new();
            for f in &a.files {
                let text = std::fs::read_to_string(f)?;
                for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
                    let r: kord_bench::Report = serde_json::from_str(line)?;
                    reports.retain(|o| !kord_bench::compare::same_cell(o, &r));
                    reports.push(r);
                }
            }
            println!(
                "{}",
                kord_bench::markdown(&reports, &kord_bench::default_rows())
            );
        }
        Cmd::Compare(a) => {
            let opts = CompareOptions {
                duration: a.duration.unwrap_or(if a.quick {
                    Duration::from_secs(2)
                } else {
                    Duration::from_secs(10)
                }),
                warmup: a.warmup.unwrap_or(if a.quick {
                    Duration::from_millis(500)
                } else {
                    Duration::from_secs(2)
                }),
                sizes: a.sizes,
                targets: a.targets,
                workloads: a.workloads,
                value_size: a.value_size,
                keys: a.keys,
                watchers: a.watchers.unwrap_or(if a.quick { 100 } else { 1000 }),
                kord_bin: a.kord_bin.unwrap_or_else(default_kord_bin),
                rounds: a.rounds,
                kord_batch_writes: !a.kord_unbatched,
                install: !a.no_install,
                json_out: a.json_out,
                work_dir: a.work_dir,
            };
            let rows = kord_bench::default_rows();
            let reports = kord_bench::compare(&opts, &rows).await?;
            let table = kord_bench::markdown(&reports, &rows);
            println!("\n{table}");
            if let Some(p) = a.markdown_out {
                std::fs::write(p, &table)?;
            }
        }
    }
    Ok(())
}
