//! A few seconds of the bench against one real `kord` process, so the tool cannot rot. No
//! speed is asserted here: speed checks live in `kord-bench compare`, never in tests.
//!
//! The `kord` binary is `$KORD_BIN`, else `kord` in the target profile dir (build it first:
//! `cargo build --bins`, as scripts/test.sh does).

use std::path::PathBuf;
use std::time::Duration;

use kord_bench::{Cluster, RunConfig, Target, Workload};

fn kord_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KORD_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "KORD_BIN={} is not a file", p.display());
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    // Test binaries live in target/<profile>/deps/; the server binary in target/<profile>/.
    let candidates: Vec<PathBuf> = [exe.parent().and_then(|d| d.parent()), exe.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join("kord"))
        .collect();
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!("no kord binary at {candidates:?}: run `cargo build --bins` or set KORD_BIN")
        })
}

fn config(cluster: &Cluster, workload: Workload) -> RunConfig {
    let mut cfg = RunConfig::new(Target::Kord, cluster.endpoints.clone(), workload);
    cfg.clients = 4;
    cfg.connections = 2;
    cfg.duration = Duration::from_secs(1);
    cfg.warmup = Duration::from_millis(200);
    cfg.keys = 50;
    cfg.server_pids = cluster.pids();
    cfg.setup = cluster.setup();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kord_smoke_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = tokio::time::timeout(
        Duration::from_secs(60),
        Cluster::start(Target::Kord, 1, dir.path(), &kord_bin()),
    )
    .await
    .expect("kord started in time")
    .expect("kord starts");

    let mut reports = Vec::new();
    for workload in [
        Workload::Write,
        Workload::Read,
        Workload::Lock,
        Workload::Watch,
    ] {
        let report = kord_bench::run(&config(&cluster, workload))
            .await
            .expect("run");
        assert_eq!(report.status, "ok", "{}", report.summary());
        assert!(report.ops.unwrap() > 0, "no ops: {}", report.summary());
        assert_eq!(report.errors, Some(0), "{}", report.summary());
        assert!(report.p99_ms.is_some() && report.server_cpu_s.is_some());
        let line = report.to_json_line();
        let json: serde_json::Value = serde_json::from_str(&line).expect("JSON line parses");
        assert_eq!(json["target"], "kord");
        assert_eq!(json["workload"], workload.name());
        assert!(json["ops_per_sec"].as_f64().unwrap() > 0.0);
        reports.push(report);
    }
    // Writes each in a call of their own, as `--kord-unbatched` runs them.
    let mut unbatched = config(&cluster, Workload::Write);
    unbatched.kord_batch_writes = false;
    let report = kord_bench::run(&unbatched).await.expect("unbatched run");
    assert_eq!(report.status, "ok", "{}", report.summary());
    assert_eq!(report.errors, Some(0), "{}", report.summary());
    assert!(report.ops.unwrap() > 0, "no ops: {}", report.summary());

    // What Kord cannot do yet is "n/a", never zero, and needs no server round trip.
    let na = kord_bench::Report::not_available(&config(&cluster, Workload::Watch), "not here");
    assert!(na.is_na());
    assert!(na.summary().contains("n/a"), "{}", na.summary());
    let json: serde_json::Value = serde_json::from_str(&na.to_json_line()).unwrap();
    assert_eq!(json["status"], "n/a");
    assert!(json["ops"].is_null());
    reports.push(na);

    let rows = vec![
        kord_bench::Row {
            workload: Workload::Write,
            clients: 4,
            connections: 2,
            rate: None,
            watchers: 1,
        },
        kord_bench::Row {
            workload: Workload::Watch,
            clients: 4,
            connections: 2,
            rate: None,
            watchers: 1,
        },
    ];
    let table = kord_bench::markdown(&reports, &rows);
    assert!(table_line(&table, "| watch").contains("n/a"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("| write")), "{table}");
    cluster.stop();
}

/// `compare --rounds 2` against a 3-member Kord: the second round starts its members on fresh
/// data dirs (reused ones held the first round's cluster, and its members failed to start),
/// and each round's reports carry their round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_in_rounds_starts_every_round_afresh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = kord_bench::CompareOptions {
        duration: Duration::from_millis(500),
        warmup: Duration::from_millis(100),
        sizes: vec![3],
        targets: vec![Target::Kord],
        workloads: vec![Workload::Write],
        value_size: 64,
        keys: 20,
        watchers: 1,
        kord_bin: kord_bin(),
        rounds: 2,
        kord_batch_writes: true,
        install: false,
        json_out: None,
        work_dir: Some(dir.path().to_owned()),
    };
    let rows = kord_bench::default_rows();
    let reports = tokio::time::timeout(Duration::from_secs(240), kord_bench::compare(&opts, &rows))
        .await
        .expect("compare finished in time")
        .expect("compare");
    let write_rows = rows
        .iter()
        .filter(|r| r.workload == Workload::Write)
        .count();
    assert_eq!(reports.len(), 2 * write_rows, "{reports:?}");
    for round in [1, 2] {
        let of_round: Vec<_> = reports.iter().filter(|r| r.round == Some(round)).collect();
        assert_eq!(of_round.len(), write_rows, "round {round}: {reports:?}");
        for r in of_round {
            assert_eq!(r.status, "ok", "round {round}: {}", r.summary());
            assert!(r.ops.unwrap_or(0) > 0, "round {round}: {}", r.summary());
        }
    }
    let table = kord_bench::markdown(&reports, &rows);
    let line = table_line(&table, "| write, 64 clients");
    assert!(line.contains("median of 2 rounds"), "{table}");
}

/// The line of a rendered table that starts with `prefix`.
fn table_line<'a>(table: &'a str, prefix: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting {prefix:?} in {table}"))
}
