//! A whole chaos run: start the cluster (in namespaces when partitions are wanted), set up the
//! keys, run the workload, watches and nemesis together, heal, then run every checker and
//! return the report. The seed decides the workload and the fault schedule.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kord_client::Client;

use super::history::Recorder;
use super::linearizability::{self, Budget, Verdict};
use super::model::State;
use super::nemesis::{self, Fault, NemesisConfig, NemesisReport};
use super::netns::Network;
use super::watches::{self, WatchLog};
use super::workload::{self, WorkerConfig, WorkerStats, EPHEMERAL_ROOT};
use crate::cluster::{Cluster, ClusterOpts};

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosOpts {
    pub seed: u64,
    pub members: usize,
    /// Length of the loaded, faulty phase.
    pub duration: Duration,
    pub faults: Vec<Fault>,
    pub workers: usize,
    pub groups: usize,
    pub max_faults: u32,
    pub election_timeout: Duration,
    pub session_timeout: Duration,
    pub budget: Budget,
}

impl ChaosOpts {
    /// Defaults for a run of `duration` on `members` members with `faults`.
    pub fn new(seed: u64, members: usize, duration: Duration, faults: Vec<Fault>) -> ChaosOpts {
        ChaosOpts {
            seed,
            members,
            duration,
            faults,
            workers: 6,
            groups: 8,
            max_faults: 10_000,
            election_timeout: Duration::from_millis(500),
            session_timeout: Duration::from_secs(4),
            budget: Budget::default(),
        }
    }
}

/// Everything a run found.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    pub stats: WorkerStats,
    pub sessions: (u64, u64),
    pub nemesis: NemesisReport,
    pub verdict: Verdict,
    /// Safety and liveness failures (empty when the run passed).
    pub problems: Vec<String>,
    /// Faults switched off, with why.
    pub skipped: Vec<String>,
    pub history_len: usize,
    /// One line per watch: name, start revision, revisions delivered.
    pub watches: Vec<String>,
}

impl Report {
    /// No problems and a linearizable history (an "unknown" verdict counts as a pass with a
    /// printed warning: the checker ran out of budget, it found nothing).
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && !self.verdict.is_illegal()
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "chaos seed {}: {} ops ({} ok, {} refused, {} unknown outcome, {} failed reads), {} history entries, \
             {} sessions ({} errors), {} faults\n",
            self.seed,
            self.stats.ops,
            self.stats.ok,
            self.stats.refused,
            self.stats.unknown,
            self.stats.failed_reads,
            self.history_len,
            self.sessions.0,
            self.sessions.1,
            self.nemesis.faults
        );
        for line in &self.nemesis.log {
            s.push_str(&format!("  nemesis {line}\n"));
        }
        for line in &self.watches {
            s.push_str(&format!("  watch {line}\n"));
        }
        for line in &self.skipped {
            s.push_str(&format!("  skipped: {line}\n"));
        }
        let mut errors: Vec<_> = self.stats.errors.iter().collect();
        errors.sort();
        for (k, v) in errors {
            s.push_str(&format!("  errors {k}: {v}\n"));
        }
        s.push_str(&self.verdict.describe());
        for p in &self.problems {
            s.push_str(&format!("  PROBLEM: {p}\n"));
        }
        s.push_str(if self.passed() {
            "  result: PASS\n"
        } else {
            "  result: FAIL\n"
        });
        s
    }
}

/// Network slots beyond the first members, for members added by replacements: a slot is a
/// member id, and ids are never reused, so every replacement takes a new one. The nemesis
/// replaces about one member per half minute; a slot per 20 s of run leaves room, and at
/// least two keep short runs as they were. Slots are host numbers 1-254 of a /24.
fn spare_slots(members: usize, duration: Duration) -> usize {
    let wanted = usize::try_from(duration.as_secs() / 20).unwrap_or(usize::MAX);
    wanted.max(2).min(254usize.saturating_sub(members))
}

/// Runs one chaos run to the end. Panics only on harness failures (a member that cannot start).
pub async fn run(opts: ChaosOpts) -> Report {
    eprintln!(
        "chaos: seed {} ({} members, {:?}, faults {:?}); replay with: kord-chaos --seed {} --members {} --duration {}s --faults {}",
        opts.seed,
        opts.members,
        opts.duration,
        opts.faults.iter().map(|f| f.name()).collect::<Vec<_>>(),
        opts.seed,
        opts.members,
        opts.duration.as_secs(),
        opts.faults.iter().map(|f| f.name()).collect::<Vec<_>>().join(",")
    );
    let mut skipped = Vec::new();
    let mut faults = opts.faults.clone();
    // Declared before the cluster, so it is dropped (torn down) after the members are killed.
    let mut network = None;
    if faults.iter().any(|f| f.needs_network()) {
        match Network::create(opts.members + spare_slots(opts.members, opts.duration)) {
            Ok(n) => network = Some(n),
            Err(e) => {
                let msg =
                    format!("partition and slow-link faults: network namespaces unavailable: {e}");
                eprintln!("chaos: skipping {msg}");
                skipped.push(msg);
                faults.retain(|f| !f.needs_network());
            }
        }
    }
    let hosts = network.as_ref().map(|n| n.hosts()).unwrap_or_default();
    let heartbeat = opts.election_timeout / 5;
    let cluster_opts = ClusterOpts::new().hosts(hosts).args([
        "--heartbeat-interval".to_string(),
        humantime::format_duration(heartbeat).to_string(),
        "--election-timeout".to_string(),
        humantime::format_duration(opts.election_timeout).to_string(),
        "--event-retention".to_string(),
        "0".to_string(),
        "--session-timeout-min".to_string(),
        "1s".to_string(),
    ]);
    let mut cluster = Cluster::start(opts.members, cluster_opts).await;
    if faults.iter().any(|f| f.needs_membership_api()) {
        if let Err(why) = nemesis::membership_api_available(&cluster).await {
            let names: Vec<&str> = faults
                .iter()
                .filter(|f| f.needs_membership_api())
                .map(|f| f.name())
                .collect();
            let msg = format!("membership faults ({}): {why}", names.join(", "));
            eprintln!("chaos: skipping {msg}");
            skipped.push(msg);
            faults.retain(|f| !f.needs_membership_api());
        }
    }

    let endpoints: Vec<String> = cluster
        .ids()
        .into_iter()
        .map(|id| cluster.client_addr(id).to_string())
        .collect();
    let connect = |eps: Vec<String>| async move {
        Client::builder(eps)
            .request_timeout(Duration::from_secs(2))
            .retry_budget(Duration::from_secs(5))
            .connect()
            .await
            .expect("client: endpoints are well-formed")
    };
    let admin = connect(endpoints.clone()).await;
    let setup_revision = workload::setup(&admin, opts.groups)
        .await
        .expect("create the chaos keys");
    let start_revision = setup_revision + 1;

    let recorder = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(None);
    let drain_timeout = Duration::from_secs(60);
    let mut locals = Vec::new();
    for e in &endpoints {
        locals.push(connect(vec![e.clone()]).await);
    }
    let mut workers = Vec::new();
    let mut shared: Option<Client> = None;
    for w in 0..opts.workers {
        let cfg = WorkerConfig {
            worker: w,
            seed: opts.seed,
            groups: opts.groups,
            duration: opts.duration,
            max_ops: 1_000_000,
        };
        // Workers share a client in pairs, so that writes they make at the same moment travel
        // in one `Kv.Batch` call, faults and all.
        let client = match shared.take() {
            Some(client) => client,
            None => {
                let client = connect(endpoints.clone()).await;
                shared = Some(client.clone());
                client
            }
        };
        workers.push(tokio::spawn(workload::run_worker(
            cfg,
            client,
            locals.clone(),
            recorder.clone(),
            stop.clone(),
        )));
    }
    let sessions = tokio::spawn(workload::run_sessions(
        connect(endpoints.clone()).await,
        opts.seed,
        opts.session_timeout,
        stop.clone(),
        100_000,
    ));
    // Both watches share one client, so they share its gRPC stream: every failover moves and
    // re-creates them together, and the second is added to a stream already in use.
    let watch_client = connect(endpoints.clone()).await;
    let mut watchers = vec![tokio::spawn(watches::record(
        "from-start".into(),
        watch_client.clone(),
        start_revision,
        drain_rx.clone(),
        drain_timeout,
    ))];
    // A second watch starts mid-run at the newest acknowledged revision.
    {
        let (client, rec, rx) = (watch_client, recorder.clone(), drain_rx.clone());
        let delay = opts.duration / 2;
        watchers.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let from = rec
                .snapshot()
                .iter()
                .filter_map(|e| e.revision)
                .max()
                .unwrap_or(setup_revision)
                + 1;
            watches::record("mid-run".into(), client, from, rx, drain_timeout).await
        }));
    }

    let t0 = Instant::now();
    let ncfg = NemesisConfig {
        seed: opts.seed,
        faults,
        duration: opts.duration,
        max_faults: opts.max_faults,
        election_timeout: opts.election_timeout,
    };
    let nemesis_report = nemesis::run(&mut cluster, network.as_mut(), &ncfg, t0).await;
    let mut problems = nemesis_report.problems.clone();

    // Let the load run to its end (the nemesis may stop early), then stop everything.
    let mut stats = WorkerStats::default();
    for w in workers {
        match tokio::time::timeout(opts.duration + Duration::from_secs(90), w).await {
            Ok(Ok(s)) => stats.merge(&s),
            Ok(Err(e)) => problems.push(format!("a worker panicked: {e}")),
            Err(_) => problems.push("a worker did not finish in time".into()),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sessions = match tokio::time::timeout(Duration::from_secs(60), sessions).await {
        Ok(Ok(s)) => s,
        _ => {
            problems.push("the session worker did not finish".into());
            (0, 0)
        }
    };

    // Quiet now: every member applies the same log and holds the same state.
    let statuses = cluster.wait_converged(Duration::from_secs(60)).await;
    let digests: Vec<(u64, u64, u64)> = statuses
        .iter()
        .map(|s| (s.member_id, s.applied_index, s.state_digest))
        .collect();
    if digests
        .windows(2)
        .any(|w| w[0].1 != w[1].1 || w[0].2 != w[1].2)
    {
        problems.push(format!(
            "members' state digests differ: (member, applied, digest) = {digests:?}"
        ));
    }

    // Ephemeral nodes die with their sessions (closed or abandoned).
    let eph_deadline = Instant::now() + opts.session_timeout * 3 + Duration::from_secs(30);
    loop {
        match admin.children(EPHEMERAL_ROOT).await {
            Ok(c) if c.is_empty() => break,
            other if Instant::now() >= eph_deadline => {
                problems.push(format!(
                    "ephemeral nodes outlived their sessions: {other:?}"
                ));
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }

    let final_reads = match workload::final_reads(&admin, &recorder, opts.groups).await {
        Ok(r) => r,
        Err(e) => {
            problems.push(e);
            HashMap::new()
        }
    };
    let history = recorder.snapshot();
    let max_revision = history
        .iter()
        .filter_map(|e| e.revision)
        .max()
        .unwrap_or(setup_revision);
    let mut watch_lines = Vec::new();

    match watches::reference(
        &admin,
        start_revision,
        max_revision,
        Duration::from_secs(60),
    )
    .await
    {
        Ok(reference) => {
            let upto = reference.progress;
            let _ = drain_tx.send(Some(upto));
            for mut w in watchers {
                let joined =
                    tokio::time::timeout(drain_timeout + Duration::from_secs(10), &mut w).await;
                let log: WatchLog = match joined {
                    Ok(Ok(l)) => l,
                    _ => {
                        w.abort();
                        problems.push("a watcher did not finish".into());
                        continue;
                    }
                };
                watch_lines.push(format!(
                    "{}: from revision {}, {} revisions delivered (reference: {} up to {upto})",
                    log.name,
                    log.start_revision,
                    log.events.len(),
                    reference.events.len()
                ));
                problems.extend(watches::validate(&log, &reference, upto));
            }
            problems.extend(watches::check_history(
                &reference,
                &history,
                opts.groups,
                &final_reads,
            ));
        }
        Err(e) => {
            problems.push(e);
            for w in watchers {
                w.abort();
            }
        }
    }
    problems.extend(workload::check_local_reads(&history));

    let verdict = linearizability::check(&history, State::initial(), opts.budget);
    let report = Report {
        seed: opts.seed,
        stats,
        sessions,
        nemesis: nemesis_report,
        verdict,
        problems,
        skipped,
        history_len: history.len(),
        watches: watch_lines,
    };
    eprintln!("{}", report.summary());
    if !report.passed() {
        cluster.dump_logs();
    }
    drop(cluster);
    drop(network);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_runs_get_a_network_slot_for_every_likely_replacement() {
        assert_eq!(
            spare_slots(3, Duration::from_secs(30)),
            2,
            "short mode as before"
        );
        assert_eq!(spare_slots(5, Duration::from_secs(600)), 30);
        assert_eq!(
            spare_slots(5, Duration::from_secs(24 * 3600)),
            249,
            "within a /24"
        );
    }
}
