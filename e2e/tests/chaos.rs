//! The chaos suite's short mode: 3- and 5-member clusters of real `kord` processes under a mixed,
//! recorded workload while a nemesis kills, pauses, partitions and slows members; the history
//! must be linearizable, watches complete and in order, members' states equal and every
//! acknowledged write present. Long soak runs: `kord-chaos --seed N --duration 10m`.
//!
//! The seed is random unless `KORD_CHAOS_SEED` is set; every run prints it for replay.

use std::time::Duration;

use kord_e2e::chaos::{self, ChaosOpts, Fault};

fn seed() -> u64 {
    match std::env::var("KORD_CHAOS_SEED") {
        Ok(s) => s
            .parse()
            .expect("KORD_CHAOS_SEED must be an unsigned integer"),
        Err(_) => rand::random(),
    }
}

/// Seconds of faulty load per test (`KORD_CHAOS_SECS`, default 30).
fn duration() -> Duration {
    let secs = std::env::var("KORD_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// Runs one chaos run and asserts it passed, was decided and exercised load and faults.
async fn run_and_check(members: usize, faults: Vec<Fault>) {
    let report = chaos::run(ChaosOpts::new(seed(), members, duration(), faults)).await;
    assert!(
        report.passed(),
        "chaos run failed (seed {}):\n{}",
        report.seed,
        report.summary()
    );
    // Every key group decided (a checker that ran out of budget proves nothing).
    assert!(
        report.verdict.is_linearizable(),
        "linearizability undecided:\n{}",
        report.summary()
    );
    // The run must have exercised something: load and faults.
    assert!(
        report.stats.ok > 100,
        "too little load got through: {:?}",
        report.stats
    );
    assert!(
        report.nemesis.faults >= 3,
        "too few faults: {:?}",
        report.nemesis.log
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_survive_kills_and_pauses() {
    let faults = vec![
        Fault::KillLeader,
        Fault::KillRandom,
        Fault::PauseLeader,
        Fault::PauseRandom,
        Fault::TransferLeader,
        Fault::ReplaceWiped,
        Fault::ReplaceMember,
    ];
    run_and_check(3, faults).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_survive_partitions_and_slow_links() {
    let faults = vec![
        Fault::PartitionLeader,
        Fault::PartitionHalves,
        Fault::SlowLink,
        Fault::KillLeader,
    ];
    run_and_check(5, faults).await;
}
