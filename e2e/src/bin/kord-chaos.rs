//! `kord-chaos`: long soak runs of the chaos suite (see `kord_e2e::chaos`). Prints the seed;
//! exits non-zero when a checker finds a problem.

use std::time::Duration;

use clap::Parser;
use kord_e2e::chaos::{self, ChaosOpts, Fault};

/// Runs a real Kord cluster under load and faults, then checks linearizability, watches,
/// convergence and acknowledged writes. Needs `kord` built (or `KORD_BIN`); partitions need root.
#[derive(Debug, Parser)]
#[command(name = "kord-chaos")]
struct Args {
    /// RNG seed for the workload and fault schedule [default: random, printed].
    #[arg(long)]
    seed: Option<u64>,
    /// Length of the loaded, faulty phase.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Cluster size (3 or 5 are typical).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    members: u64,
    /// Comma-separated fault kinds, or "all": kill-leader, kill-random, pause-leader,
    /// pause-random, partition-leader, partition-halves, slow-link, transfer-leader, replace-wiped,
    /// replace-member.
    #[arg(long, default_value = "all")]
    faults: String,
    /// Concurrent workload clients.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=64))]
    workers: u64,
    /// Wall-time budget of the linearizability checker.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    check_budget: Duration,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let faults = match Fault::parse_list(&args.faults) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("kord-chaos: --faults: {e}");
            std::process::exit(2);
        }
    };
    let seed = args.seed.unwrap_or_else(rand::random);
    let members = usize::try_from(args.members).expect("members fits usize");
    let mut opts = ChaosOpts::new(seed, members, args.duration, faults);
    opts.workers = usize::try_from(args.workers).expect("workers fits usize");
    opts.budget.max_time = args.check_budget;
    // Ctrl-C drops the run, whose guards kill the members and delete the namespaces.
    let report = tokio::select! {
        r = chaos::run(opts) => r,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("kord-chaos: interrupted (seed {seed}); cleaned up");
            std::process::exit(130);
        }
    };
    if !report.passed() {
        eprintln!("kord-chaos: FAILED with seed {seed}");
        std::process::exit(1);
    }
    println!("kord-chaos: passed with seed {seed}");
}
