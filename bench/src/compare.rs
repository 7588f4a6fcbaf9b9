//! `kord-bench compare`: installs the peers if missing, starts 1- and 3-member setups of Kord,
//! etcd and ZooKeeper on 127.0.0.1, runs the same matrix against each, stops everything it
//! started and prints a Markdown table with Kord's ratio to each peer.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cluster::{Cluster, ETCD_BIN, JAVA_BIN, ZK_JAR};
use crate::config::{RunConfig, Target, Workload};
use crate::report::{fmt_cpu, fmt_ms, fmt_num, Report};

/// One row of the matrix.
#[derive(Debug, Clone)]
pub struct Row {
    pub workload: Workload,
    pub clients: usize,
    pub connections: usize,
    pub rate: Option<f64>,
    pub watchers: usize,
}

impl Row {
    fn new(workload: Workload, clients: usize, connections: usize) -> Row {
        Row {
            workload,
            clients,
            connections,
            rate: None,
            watchers: 1000,
        }
    }

    fn at(mut self, rate: f64) -> Row {
        self.rate = Some(rate);
        self
    }

    /// Rows whose figure is latency at a given rate rather than throughput.
    pub fn is_latency_row(&self) -> bool {
        self.rate.is_some() || self.workload.is_watch()
    }

    pub fn label(&self) -> String {
        let c = |n: usize| format!("{n} client{}", if n == 1 { "" } else { "s" });
        match self.workload {
            Workload::Watch => format!(
                "watch, 1 watcher, {} writes/s: write to event",
                self.rate.unwrap_or(50.0)
            ),
            Workload::WatchFanout => format!(
                "watch, {} watchers on one key, {} writes/s: write to last event",
                self.watchers,
                self.rate.unwrap_or(50.0)
            ),
            Workload::Lock => format!("lock acquire+release, {}, uncontended", c(self.clients)),
            Workload::LockContended => {
                format!("lock, {} on one lock: hand-offs/s", c(self.clients))
            }
            Workload::Lease => format!(
                "lease grant+revoke (ZK: session open+close), {}",
                c(self.clients)
            ),
            w => match self.rate {
                Some(r) => format!("{w}, {} at {r} ops/s", c(self.clients)),
                None => format!("{w}, {}", c(self.clients)),
            },
        }
    }

    fn key(&self) -> (Workload, usize, u64) {
        (
            self.workload,
            self.clients,
            self.rate.map(|r| r as u64).unwrap_or(0),
        )
    }
}

/// The default matrix: 1 and 64 clients for the write and read rows (as in the reference
/// figures), equal-rate latency rows, then watches, locks and leases.
pub fn default_rows() -> Vec<Row> {
    use Workload::*;
    let mut rows = Vec::new();
    for w in [Write, Create, Read, ReadLocal] {
        rows.push(Row::new(w, 1, 1));
        rows.push(Row::new(w, 64, 8));
    }
    rows.push(Row::new(Write, 8, 1).at(500.0));
    rows.push(Row::new(Read, 8, 1).at(1000.0));
    rows.push(Row::new(Watch, 1, 1).at(50.0));
    rows.push(Row::new(WatchFanout, 1, 8).at(50.0));
    rows.push(Row::new(Lock, 1, 1));
    rows.push(Row::new(LockContended, 8, 8));
    rows.push(Row::new(Lease, 1, 1));
    rows
}

/// Settings of a comparison.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    pub duration: Duration,
    pub warmup: Duration,
    pub sizes: Vec<usize>,
    pub targets: Vec<Target>,
    /// Restrict the matrix to these workloads (all when empty).
    pub workloads: Vec<Workload>,
    pub value_size: usize,
    pub keys: usize,
    pub watchers: usize,
    pub kord_bin: PathBuf,
    /// Runs of the whole matrix per cluster size, the targets' order rotated each round;
    /// the table shows each cell's median (see [`markdown`]).
    pub rounds: u32,
    /// Kord's client batches concurrent writes (see [`RunConfig::kord_batch_writes`]).
    pub kord_batch_writes: bool,
    /// Install missing peers with apt-get (only as root).
    pub install: bool,
    /// Also write the JSON lines here.
    pub json_out: Option<PathBuf>,
    /// Keep data dirs and logs here instead of a temporary directory.
    pub work_dir: Option<PathBuf>,
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn installed(target: Target) -> bool {
    match target {
        Target::Kord => true,
        Target::Etcd => Path::new(ETCD_BIN).is_file(),
        Target::Zookeeper => Path::new(ZK_JAR).is_file() && Path::new(JAVA_BIN).is_file(),
    }
}

fn package(target: Target) -> &'static str {
    match target {
        Target::Kord => "",
        Target::Etcd => "etcd-server",
        Target::Zookeeper => "zookeeper",
    }
}

/// Installs missing peers with apt-get when allowed and running as root; returns why each
/// still-missing target cannot run.
fn ensure_installed(targets: &[Target], install: bool) -> HashMap<Target, String> {
    let missing: Vec<Target> = targets.iter().copied().filter(|t| !installed(*t)).collect();
    let mut why = HashMap::new();
    if missing.is_empty() {
        return why;
    }
    let pkgs: Vec<&str> = missing.iter().map(|t| package(*t)).collect();
    if install && is_root() {
        eprintln!("installing {} with apt-get", pkgs.join(" "));
        let run = |args: &[&str]| {
            std::process::Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !run(&["update", "-q"]) {
            eprintln!("apt-get update failed");
        }
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&pkgs);
        if !run(&args) {
            eprintln!("apt-get install {} failed", pkgs.join(" "));
        }
    } else {
        eprintln!(
            "missing: {}. Install them with: sudo apt-get install {}",
            pkgs.join(", "),
            pkgs.join(" ")
        );
    }
    for t in missing {
        if !installed(t) {
            why.insert(
                t,
                format!("{} is not installed (apt-get install {})", t, package(t)),
            );
        }
    }
    why
}

/// Runs the whole comparison; returns every report (JSON lines went to stdout as they came).
/// Ctrl-C or SIGTERM stops it: the clusters are dropped, which kills their processes.
pub async fn compare(opts: &CompareOptions, rows: &[Row]) -> anyhow::Result<Vec<Report>> {
    let interrupted = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    };
    tokio::select! {
        r = compare_inner(opts, rows) => r,
        _ = interrupted => anyhow::bail!("interrupted: stopped every process it started"),
    }
}

async fn compare_inner(opts: &CompareOptions, rows: &[Row]) -> anyhow::Result<Vec<Report>> {
    let unavailable = ensure_installed(&opts.targets, opts.install);
    let tmp;
    let root: PathBuf = match &opts.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("kord-bench-").tempdir()?;
            tmp.path().to_owned()
        }
    };
    let mut json = match &opts.json_out {
        Some(p) => Some(std::fs::File::create(p)?),
        None => None,
    };
    let rows: Vec<Row> = rows
        .iter()
        .filter(|r| opts.workloads.is_empty() || opts.workloads.contains(&r.workload))
        .cloned()
        .map(|mut r| {
            r.watchers = opts.watchers;
            r
        })
        .collect();
    let mut reports = Vec::new();
    let rounds = opts.rounds.max(1);
    for &size in &opts.sizes {
        for (round, target) in round_order(&opts.targets, rounds) {
            let round = (rounds > 1).then_some(round);
            let setup = format!("{size} node{}", if size == 1 { "" } else { "s" });
            let make_cfg = |row: &Row, endpoints: Vec<String>, pids: Vec<u32>| {
                let mut cfg = RunConfig::new(target, endpoints, row.workload);
                cfg.clients = row.clients;
                cfg.connections = row.connections;
                cfg.rate = row.rate;
                cfg.watchers = row.watchers;
                cfg.duration = opts.duration;
                cfg.warmup = opts.warmup;
                cfg.value_size = opts.value_size;
                cfg.keys = opts.keys;
                cfg.server_pids = pids;
                cfg.setup = setup.clone();
                cfg.kord_batch_writes = opts.kord_batch_writes;
                cfg
            };
            let mut emit = |mut r: Report| -> anyhow::Result<()> {
                r.round = round;
                eprintln!("{}", r.summary());
                println!("{}", r.to_json_line());
                if let Some(f) = json.as_mut() {
                    writeln!(f, "{}", r.to_json_line())?;
                }
                reports.push(r);
                Ok(())
            };
            let runnable: Vec<&Row> = rows
                .iter()
                .filter(|r| r.workload.unsupported_on(target).is_none())
                .collect();
            // Rows the target cannot run need no cluster.
            for row in rows
                .iter()
                .filter(|r| r.workload.unsupported_on(target).is_some())
            {
                emit(Report::not_available(
                    &make_cfg(row, vec!["-".into()], vec![]),
                    row.workload.unsupported_on(target).unwrap_or_default(),
                ))?;
            }
            if runnable.is_empty() {
                continue;
            }
            if let Some(why) = unavailable.get(&target) {
                for row in runnable {
                    emit(Report::not_available(
                        &make_cfg(row, vec!["-".into()], vec![]),
                        why.clone(),
                    ))?;
                }
                continue;
            }
            settle_disk();
            // Every round starts from empty data dirs, as the first does.
            let dir = match round {
                Some(r) => root.join(format!("round-{r}")),
                None => root.clone(),
            };
            eprintln!("starting {target} ({setup}) under {}", dir.display());
            let cluster = match Cluster::start(target, size, &dir, &opts.kord_bin).await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("could not start {target} ({setup}): {e:#}");
                    for row in runnable {
                        emit(Report::not_available(
                            &make_cfg(row, vec!["-".into()], vec![]),
                            format!("did not start: {e:#}"),
                        ))?;
                    }
                    continue;
                }
            };
            for row in runnable {
                let cfg = make_cfg(row, cluster.endpoints.clone(), cluster.pids());
                let report = match crate::run(&cfg).await {
                    Ok(r) => r,
                    Err(e) => {
                        let mut r = Report::not_available(&cfg, format!("failed: {e:#}"));
                        r.status = "error".into();
                        r
                    }
                };
                emit(report)?;
            }
            cluster.stop();
        }
    }
    Ok(reports)
}

/// Each round runs every target once; the order rotates by one target per round, so that no
/// target always runs first after a fresh `sync` or last after the others heated the machine.
/// Slow drifts of a shared machine then spread over all targets alike.
fn round_order(targets: &[Target], rounds: u32) -> Vec<(u32, Target)> {
    let mut order = Vec::new();
    for round in 1..=rounds {
        for i in 0..targets.len() {
            let at = (i + round as usize - 1) % targets.len();
            order.push((round, targets[at]));
        }
    }
    order
}

/// Writes back every dirty page on the machine and waits for it, so that a setup does not
/// start while the page cache still holds what the one before wrote (gigabytes after a
/// 64-client run): that writeback would slow the new setup's fsyncs. Measured: Kord's 3-node
/// 64-client writes ran at 16.7k/s right after ZooKeeper's 1-node rows, 22.0-22.5k/s alone.
fn settle_disk() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Whether two reports fill the same table cell (setup, target and matrix row) in the same
/// round.
pub fn same_cell(a: &Report, b: &Report) -> bool {
    a.round == b.round
        && a.setup == b.setup
        && a.target == b.target
        && a.workload == b.workload
        && a.clients == b.clients
        && a.rate.map(|x| x as u64) == b.rate.map(|x| x as u64)
}

/// The Markdown tables: one per setup, a row per matrix row, a column per target and Kord's
/// ratio to each peer.
pub fn markdown(reports: &[Report], rows: &[Row]) -> String {
    let mut setups: Vec<String> = Vec::new();
    for r in reports {
        if !setups.contains(&r.setup) {
            setups.push(r.setup.clone());
        }
    }
    let of_cell = |setup: &str, target: Target, row: &Row| -> Vec<&Report> {
        reports
            .iter()
            .filter(|r| {
                r.setup == setup
                    && r.target == target
                    && (r.workload, r.clients, r.rate.map(|x| x as u64).unwrap_or(0)) == row.key()
            })
            .collect()
    };
    let mut out = String::new();
    out.push_str(
        "Cells: throughput rows `ops/s (p50 / p99 ms)`, latency rows (fixed rate, watches) \
         `p50 / p99 ms`; `srv` = server CPU seconds over the measured window (all members) and \
         that CPU time per operation; `client` = the bench process's CPU time per operation \
         (the target's client library). Ratios are \
         Kord ÷ peer: ops/s for throughput rows (above 1: Kord faster), p99 for latency rows \
         (below 1: Kord faster). With several rounds a cell is its median round by that figure \
         (of an even count, the worse middle one) and names the lowest and highest.\n",
    );
    for setup in &setups {
        out.push_str(&format!(
            "\n### {setup}\n\n| workload | Kord | etcd | ZooKeeper | Kord ÷ etcd | Kord ÷ ZooKeeper |\n|---|---|---|---|---|---|\n"
        ));
        for row in rows {
            let cells: Vec<Option<Cell>> = Target::ALL
                .iter()
                .map(|t| Cell::pick(of_cell(setup, *t, row), row))
                .collect();
            if cells.iter().all(|c| c.is_none()) {
                continue;
            }
            let mut line = format!("| {} |", row.label());
            for c in &cells {
                let text = match c {
                    Some(c) => cell(Some(c.shown), row) + &c.rounds_text(row),
                    None => cell(None, row),
                };
                line.push_str(&format!(" {text} |"));
            }
            let shown: Vec<Option<&Report>> =
                cells.iter().map(|c| c.as_ref().map(|c| c.shown)).collect();
            for peer in &shown[1..] {
                line.push_str(&format!(" {} |", ratio(shown[0], *peer, row)));
            }
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

/// The figure a row is judged by: ops/s for throughput rows, p99 for latency rows.
fn figure(r: &Report, row: &Row) -> Option<f64> {
    if row.is_latency_row() {
        r.p99_ms
    } else {
        r.ops_per_sec
    }
}

/// One table cell: the report it shows and, over several rounds, how many ran and their
/// lowest and highest figure.
struct Cell<'a> {
    shown: &'a Report,
    rounds: Option<(usize, f64, f64)>,
}

impl<'a> Cell<'a> {
    /// The median round by the row's figure, the same rule for every target: of an even count
    /// the worse of the two middle rounds. Rounds that did not run (n/a, error, no op
    /// completed) are left out; if none ran, the first report is shown as it is.
    fn pick(reports: Vec<&'a Report>, row: &Row) -> Option<Cell<'a>> {
        let first = *reports.first()?;
        let mut ran: Vec<(&Report, f64)> = reports
            .into_iter()
            .filter(|r| r.status == "ok" && r.ops != Some(0))
            .filter_map(|r| figure(r, row).map(|f| (r, f)))
            .collect();
        let n = ran.len();
        if n == 0 {
            return Some(Cell {
                shown: first,
                rounds: None,
            });
        }
        ran.sort_by(|a, b| a.1.total_cmp(&b.1));
        // Lowest figure first: the worse middle one is the lower ops/s or the higher p99.
        let median = if row.is_latency_row() {
            n / 2
        } else {
            (n - 1) / 2
        };
        Some(Cell {
            shown: ran[median].0,
            rounds: (n > 1).then(|| (n, ran[0].1, ran[n - 1].1)),
        })
    }

    fn rounds_text(&self, row: &Row) -> String {
        let Some((n, lo, hi)) = self.rounds else {
            return String::new();
        };
        if row.is_latency_row() {
            format!(
                "; median of {n} rounds, p99 {}-{} ms",
                fmt_ms(Some(lo)),
                fmt_ms(Some(hi))
            )
        } else {
            format!(
                "; median of {n} rounds, {}-{} ops/s",
                fmt_num(Some(lo)),
                fmt_num(Some(hi))
            )
        }
    }
}

fn ok(r: Option<&Report>) -> Option<&Report> {
    r.filter(|r| r.status == "ok")
}

fn cell(r: Option<&Report>, row: &Row) -> String {
    let Some(r) = r else { return "-".into() };
    match r.status.as_str() {
        "n/a" => return "n/a".into(),
        "error" => return "error".into(),
        _ => {}
    }
    if r.ops == Some(0) {
        let mut s = "no op completed in the window".to_string();
        if let Some(e) = r.errors.filter(|e| *e > 0) {
            s.push_str(&format!(", {e} err"));
        }
        return s;
    }
    let mut s = if row.is_latency_row() {
        format!("{} / {}", fmt_ms(r.p50_ms), fmt_ms(r.p99_ms))
    } else {
        format!(
            "{} ({} / {})",
            fmt_num(r.ops_per_sec),
            fmt_ms(r.p50_ms),
            fmt_ms(r.p99_ms)
        )
    };
    if let (Some(want), Some(got)) = (row.rate, r.ops_per_sec) {
        if got < 0.9 * want {
            let what = if row.workload.is_watch() {
                "writes/s"
            } else {
                "ops/s"
            };
            s.push_str(&format!(", only {got:.0} {what}"));
        }
    }
    if let Some(e) = r.errors.filter(|e| *e > 0) {
        s.push_str(&format!(", {e} err"));
    }
    s.push_str(&format!(", srv {}", fmt_cpu(r.server_cpu_s)));
    // Server CPU per operation: what one write (or read) costs the servers, all members together.
    if let (Some(cpu), Some(ops)) = (r.server_cpu_s, r.ops.filter(|n| *n > 0)) {
        s.push_str(&format!(" = {:.0} µs/op", cpu * 1e6 / ops as f64));
    }
    // The client library's share: it runs on the same cores as the servers.
    if let (Some(cpu), Some(ops)) = (r.client_cpu_s, r.ops.filter(|n| *n > 0)) {
        s.push_str(&format!(", client {:.0} µs/op", cpu * 1e6 / ops as f64));
    }
    s
}

fn ratio(kord: Option<&Report>, peer: Option<&Report>, row: &Row) -> String {
    let (Some(k), Some(p)) = (ok(kord), ok(peer)) else {
        return "n/a".into();
    };
    let (a, b) = if row.is_latency_row() {
        (k.p99_ms, p.p99_ms)
    } else {
        (k.ops_per_sec, p.ops_per_sec)
    };
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "n/a".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report of `row` in `round` with the given figures.
    fn report(target: Target, row: &Row, round: u32, ops_per_sec: f64, p99_ms: f64) -> Report {
        let mut cfg = RunConfig::new(target, vec!["-".into()], row.workload);
        cfg.clients = row.clients;
        cfg.connections = row.connections;
        cfg.rate = row.rate;
        cfg.setup = "1 node".into();
        Report {
            status: "ok".into(),
            ops: Some((ops_per_sec * 3.0) as u64),
            ops_per_sec: Some(ops_per_sec),
            p50_ms: Some(p99_ms / 2.0),
            p99_ms: Some(p99_ms),
            round: Some(round),
            ..Report::not_available(&cfg, "")
        }
    }

    /// The cells of `row`'s line in the table of `reports`.
    fn cells_of(reports: &[Report], row: &Row) -> Vec<String> {
        let table = markdown(reports, std::slice::from_ref(row));
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("| {} |", row.label())))
            .unwrap_or_else(|| panic!("no line for {}: {table}", row.label()));
        line.split(" | ").map(str::to_owned).collect()
    }

    #[test]
    fn rounds_rotate_the_order_of_the_targets() {
        let order = round_order(&Target::ALL, 3);
        let targets = |round: u32| -> Vec<Target> {
            order
                .iter()
                .filter(|(r, _)| *r == round)
                .map(|(_, t)| *t)
                .collect()
        };
        use Target::*;
        assert_eq!(targets(1), vec![Kord, Etcd, Zookeeper]);
        assert_eq!(targets(2), vec![Etcd, Zookeeper, Kord]);
        assert_eq!(targets(3), vec![Zookeeper, Kord, Etcd]);
        assert_eq!(round_order(&[Kord], 2), vec![(1, Kord), (2, Kord)]);
    }

    #[test]
    fn a_cell_of_several_rounds_shows_the_median_and_the_ratio_compares_medians() {
        let row = Row::new(Workload::Write, 64, 8);
        let mut reports = vec![
            report(Target::Kord, &row, 1, 30_000.0, 4.0),
            report(Target::Kord, &row, 2, 10_000.0, 9.0),
            report(Target::Kord, &row, 3, 20_000.0, 5.0),
            // Of an even count, the worse middle one: 12,000 (not 14,000).
            report(Target::Etcd, &row, 1, 14_000.0, 6.0),
            report(Target::Etcd, &row, 2, 12_000.0, 7.0),
            report(Target::Etcd, &row, 3, 9_000.0, 8.0),
            report(Target::Etcd, &row, 4, 16_000.0, 5.0),
        ];
        // A round that did not run is left out of the median.
        let mut failed = report(Target::Kord, &row, 4, 0.0, 0.0);
        failed.status = "error".into();
        reports.push(failed);
        let cells = cells_of(&reports, &row);
        assert!(
            cells[1].starts_with("20,000 (")
                && cells[1].ends_with("; median of 3 rounds, 10,000-30,000 ops/s"),
            "{cells:?}"
        );
        assert!(
            cells[2].starts_with("12,000 (")
                && cells[2].ends_with("; median of 4 rounds, 9,000-16,000 ops/s"),
            "{cells:?}"
        );
        assert_eq!(cells[3], "-", "{cells:?}");
        assert_eq!(cells[4], "1.67", "{cells:?}");
    }

    #[test]
    fn a_latency_cell_takes_the_median_p99() {
        let row = Row::new(Workload::Write, 8, 1).at(500.0);
        let reports = vec![
            report(Target::Kord, &row, 1, 500.0, 2.0),
            report(Target::Kord, &row, 2, 500.0, 0.9),
            report(Target::Kord, &row, 3, 500.0, 1.5),
            report(Target::Zookeeper, &row, 1, 500.0, 3.0),
        ];
        let cells = cells_of(&reports, &row);
        assert!(
            cells[1].starts_with("0.75 / 1.50, ")
                && cells[1].ends_with("; median of 3 rounds, p99 0.90-2.00 ms"),
            "{cells:?}"
        );
        assert!(!cells[3].contains("median"), "{cells:?}");
        assert_eq!(cells[5].trim_end_matches(" |"), "0.50", "{cells:?}");
    }

    #[test]
    fn a_throughput_cell_shows_server_and_client_cpu_per_operation() {
        let r: Report = serde_json::from_str(
            r#"{"target":"kord","setup":"1 node","workload":"write","clients":64,
                "connections":8,"rate":null,"watchers":0,"value_size":256,"keys":1000,
                "duration_s":3.0,"status":"ok","note":null,"ops":90000,"ops_per_sec":30000.0,
                "p50_ms":1.9,"p90_ms":2.3,"p99_ms":3.2,"p999_ms":7.3,"max_ms":9.5,"errors":0,
                "server_cpu_s":2.7,"client_cpu_s":1.2}"#,
        )
        .expect("a report line");
        let row = Row::new(Workload::Write, 64, 8);
        assert_eq!(
            cell(Some(&r), &row),
            "30,000 (1.90 / 3.20), srv 2.7 = 30 µs/op, client 13 µs/op"
        );
    }
}
