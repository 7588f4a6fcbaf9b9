//! Drives one run: closed-loop (or paced) clients for the request workloads, a paced writer
//! and many watchers for the watch workloads. Every loop ends at the run's deadline or after
//! `max_ops_per_client` operations, whichever comes first.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{RunConfig, Target, Workload};
use crate::report::{new_histogram, Report};
use crate::{cpu, etcd, kord, zk};

/// What one step returns: `Ok(None)` to time the whole step, `Ok(Some(d))` when only part of
/// it counts (a lock's acquire), `Err` for a failed operation.
pub(crate) type StepResult = Result<Option<Duration>, String>;

/// One closed-loop client of a request workload.
pub(crate) trait Worker: Send {
    fn step(&mut self) -> BoxFuture<'_, StepResult>;
    /// Releases what the worker holds (an etcd lease, say). Bounded by the caller.
    fn finish(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// The paced writer of a watch workload.
pub(crate) trait Writer: Send {
    fn write(&mut self, value: Vec<u8>) -> BoxFuture<'_, Result<(), String>>;
}

/// Set-up of a watch workload: the writer and the tasks that hold the watchers (aborted at
/// the end of the run).
pub(crate) struct WatchSetup {
    pub writer: Box<dyn Writer>,
    pub tasks: Vec<JoinHandle<()>>,
}

/// Key `i` of the key space (a znode path; etcd uses the same string as its key).
pub(crate) fn key(i: usize) -> String {
    format!("/bench/k/{i:07}")
}

/// A value of `size` bytes that starts with `seq` (little-endian u64).
pub(crate) fn value(size: usize, seq: u64) -> Vec<u8> {
    let mut v = vec![b'x'; size.max(8)];
    v[..8].copy_from_slice(&seq.to_le_bytes());
    v
}

/// The sequence number a watch value carries.
pub(crate) fn seq_of(value: &[u8]) -> Option<u64> {
    value
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

/// A unique-enough id for one run, used to keep the names of created nodes and locks apart.
pub(crate) fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("r{:x}", nanos & 0xffff_ffff_ffff)
}

/// Small, fast, deterministic per-client key picker (xorshift64*).
pub(crate) struct KeyPicker {
    state: u64,
    keys: usize,
}

impl KeyPicker {
    pub fn new(seed: u64, keys: usize) -> KeyPicker {
        KeyPicker {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            keys,
        }
    }

    pub fn next_key(&mut self) -> String {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        key((x.wrapping_mul(0x2545_F491_4F6C_DD1D) % self.keys as u64) as usize)
    }
}

/// Runs one benchmark and reports it. A workload the target cannot run yields an "n/a"
/// report without contacting the target.
pub async fn run(cfg: &RunConfig) -> anyhow::Result<Report> {
    cfg.validate()?;
    if let Some(why) = cfg.workload.unsupported_on(cfg.target) {
        return Ok(Report::not_available(cfg, why));
    }
    let id = run_id();
    // The whole run, set-up included, is bounded.
    let limit = cfg.warmup + cfg.duration + Duration::from_secs(180);
    let fut = async {
        if cfg.workload.is_watch() {
            run_watch(cfg, &id).await
        } else {
            run_requests(cfg, &id).await
        }
    };
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow::anyhow!("run did not finish within {limit:?}"))?
}

/// CPU sampled at the start and end of the measured window.
struct CpuWindow {
    server: Option<f64>,
    client: f64,
}

impl CpuWindow {
    fn sample(pids: &[u32]) -> CpuWindow {
        CpuWindow {
            server: cpu::pids_cpu(pids),
            client: cpu::self_cpu(),
        }
    }

    fn since(&self, start: &CpuWindow) -> (Option<f64>, f64) {
        let server = match (self.server, start.server) {
            (Some(b), Some(a)) => Some((b - a).max(0.0)),
            _ => None,
        };
        (server, (self.client - start.client).max(0.0))
    }
}

async fn build_workers(cfg: &RunConfig, id: &str) -> anyhow::Result<Vec<Box<dyn Worker>>> {
    match cfg.target {
        Target::Kord => kord::workers(cfg, id).await,
        Target::Etcd => etcd::workers(cfg, id).await,
        Target::Zookeeper => zk::workers(cfg, id).await,
    }
}

#[derive(Default)]
struct WorkerResult {
    ops: u64,
    errors: u64,
    first_error: Option<String>,
}

/// When one operation was due, started and done, and when the client's previous one was done.
struct OpTimes {
    intended: Instant,
    prev_done: Option<Instant>,
    started: Instant,
    done: Instant,
}

impl OpTimes {
    /// The operation's latency: its own time (or the part of it the worker measured), plus how
    /// long the previous operation held it past its intended start, which the target caused.
    /// So a paced run shows queueing, and a closed loop (intended = started) adds nothing. The
    /// pacing timer's own lateness is not counted: tokio's timers fire up to a millisecond
    /// late, which made every paced operation look up to a millisecond slower, whatever the
    /// target.
    fn latency(&self, part: Option<Duration>) -> Duration {
        let held = self.prev_done.map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(self.intended)
        });
        part.unwrap_or(self.done - self.started) + held
    }
}

async fn run_requests(cfg: &RunConfig, id: &str) -> anyhow::Result<Report> {
    let workers = build_workers(cfg, id)
        .await
        .with_context(|| format!("setting up {} {}", cfg.target, cfg.workload))?;
    let start = Instant::now();
    let warm_end = start + cfg.warmup;
    let end = warm_end + cfg.duration;
    // Per-client pacing: client i of n sends at start + (i/n + k) * n/rate.
    let interval = cfg
        .rate
        .map(|r| Duration::from_secs_f64(cfg.clients as f64 / r));
    let hist = Arc::new(Mutex::new(new_histogram()));
    let mut handles = Vec::with_capacity(workers.len());
    for (i, mut w) in workers.into_iter().enumerate() {
        let hist = Arc::clone(&hist);
        let op_timeout = cfg.op_timeout;
        let max_ops = cfg.max_ops_per_client;
        let n = cfg.clients as u32;
        handles.push(tokio::spawn(async move {
            let mut local = new_histogram();
            let mut res = WorkerResult::default();
            let mut next = interval.map(|iv| start + iv * i as u32 / n);
            let mut issued = 0u64;
            // When this client's previous operation completed.
            let mut prev_done: Option<Instant> = None;
            while issued < max_ops && Instant::now() < end {
                let intended = match (next.as_mut(), interval) {
                    (Some(next), Some(iv)) => {
                        let at = *next;
                        *next += iv;
                        if at >= end {
                            break;
                        }
                        tokio::time::sleep_until(at).await;
                        at
                    }
                    _ => Instant::now(),
                };
                if intended >= end {
                    break;
                }
                issued += 1;
                let t0 = Instant::now();
                let outcome = tokio::time::timeout(op_timeout, w.step()).await;
                let t1 = Instant::now();
                let op = OpTimes {
                    intended,
                    prev_done,
                    started: t0,
                    done: t1,
                };
                prev_done = Some(t1);
                if intended < warm_end {
                    continue;
                }
                match outcome {
                    Ok(Ok(part)) => {
                        if t1 > end {
                            continue; // finished after the window: not counted either way
                        }
                        let lat = op.latency(part);
                        res.ops += 1;
                        let _ = local.record((lat.as_micros() as u64).max(1));
                    }
                    Ok(Err(e)) => {
                        res.errors += 1;
                        res.first_error.get_or_insert(e);
                    }
                    Err(_) => {
                        res.errors += 1;
                        res.first_error
                            .get_or_insert_with(|| format!("timed out after {op_timeout:?}"));
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), w.finish()).await;
            hist.lock().expect("histogram lock").add(&local).ok();
            res
        }));
    }
    let (elapsed, cpu) = measure_window(cfg, warm_end, end).await;
    let mut ops = 0;
    let mut errors = 0;
    let mut first_error = None;
    let join_by = end + cfg.op_timeout + Duration::from_secs(10);
    for h in handles {
        let abort = h.abort_handle();
        match tokio::time::timeout_at(join_by, h).await {
            Ok(Ok(r)) => {
                ops += r.ops;
                errors += r.errors;
                if first_error.is_none() {
                    first_error = r.first_error;
                }
            }
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert(format!("client task failed: {e}"));
            }
            Err(_) => {
                abort.abort();
                errors += 1;
                first_error.get_or_insert("client task did not stop".into());
            }
        }
    }
    let hist = hist.lock().expect("histogram lock").clone();
    let mut report = Report::measured(cfg, ops, errors, elapsed, &hist, cpu);
    if let Some(e) = first_error {
        report.note = Some(format!("first error: {e}"));
    }
    Ok(report)
}

/// Sleeps through warm-up and the measured window, sampling CPU at both ends.
async fn measure_window(
    cfg: &RunConfig,
    warm_end: Instant,
    end: Instant,
) -> (f64, (Option<f64>, f64)) {
    tokio::time::sleep_until(warm_end).await;
    let a = CpuWindow::sample(&cfg.server_pids);
    let t0 = Instant::now();
    tokio::time::sleep_until(end).await;
    let b = CpuWindow::sample(&cfg.server_pids);
    (t0.elapsed().as_secs_f64(), b.since(&a))
}

/// Matches watch events to the writes that caused them: a write is done when every watcher
/// has seen it, and its latency is write start to the last watcher's event.
pub(crate) struct Tracker {
    watchers: u32,
    pending: Mutex<HashMap<u64, Pending>>,
    hist: Mutex<Histogram<u64>>,
    completed: AtomicU64,
}

struct Pending {
    sent: Instant,
    seen: u32,
    measured: bool,
}

impl Tracker {
    fn new(watchers: usize) -> Tracker {
        Tracker {
            watchers: watchers as u32,
            pending: Mutex::new(HashMap::new()),
            hist: Mutex::new(new_histogram()),
            completed: AtomicU64::new(0),
        }
    }

    fn start(&self, seq: u64, measured: bool) {
        self.pending.lock().expect("tracker lock").insert(
            seq,
            Pending {
                sent: Instant::now(),
                seen: 0,
                measured,
            },
        );
    }

    fn cancel(&self, seq: u64) {
        self.pending.lock().expect("tracker lock").remove(&seq);
    }

    /// A watcher saw the write numbered `seq`.
    pub fn hit(&self, seq: u64) {
        let now = Instant::now();
        let mut pending = self.pending.lock().expect("tracker lock");
        let Some(p) = pending.get_mut(&seq) else {
            return;
        };
        p.seen += 1;
        if p.seen >= self.watchers {
            let p = pending.remove(&seq).expect("present");
            drop(pending);
            if p.measured {
                self.completed.fetch_add(1, Ordering::Relaxed);
                let us = (now - p.sent).as_micros() as u64;
                let _ = self.hist.lock().expect("hist lock").record(us.max(1));
            }
        }
    }

    fn measured_pending(&self) -> u64 {
        self.pending
            .lock()
            .expect("tracker lock")
            .values()
            .filter(|p| p.measured)
            .count() as u64
    }
}

async fn run_watch(cfg: &RunConfig, id: &str) -> anyhow::Result<Report> {
    let tracker = Arc::new(Tracker::new(cfg.watcher_count()));
    let key = format!("/bench/watch-{id}");
    let setup = match cfg.target {
        Target::Etcd => etcd::watch(cfg, &key, Arc::clone(&tracker)).await,
        Target::Zookeeper => zk::watch(cfg, &key, Arc::clone(&tracker)).await,
        Target::Kord => kord::watch(cfg, &key, Arc::clone(&tracker)).await,
    }
    .with_context(|| format!("setting up {} {}", cfg.target, cfg.workload))?;
    let WatchSetup { mut writer, tasks } = setup;
    let rate = cfg.rate.unwrap_or(50.0);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let warm_end = start + cfg.warmup;
    let end = warm_end + cfg.duration;
    let mut errors = 0u64;
    let mut first_error = None;
    let window = tokio::spawn({
        let cfg = cfg.clone();
        async move { measure_window(&cfg, warm_end, end).await }
    });
    let mut next = start;
    let mut seq = 0u64;
    let max_writes = cfg.max_ops_per_client;
    while next < end && seq < max_writes {
        tokio::time::sleep_until(next).await;
        next += interval;
        seq += 1;
        let measured = Instant::now() >= warm_end;
        tracker.start(seq, measured);
        let res = tokio::time::timeout(cfg.op_timeout, writer.write(value(cfg.value_size, seq)))
            .await
            .unwrap_or_else(|_| Err("write timed out".into()));
        if let Err(e) = res {
            tracker.cancel(seq);
            if measured {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
        // A slow write delays the schedule rather than bursting to catch up.
        let now = Instant::now();
        if next < now {
            next = now;
        }
    }
    let (elapsed, cpu) = window.await.context("measuring task")?;
    // Give the last writes' events a moment, bounded.
    let grace = Instant::now() + Duration::from_secs(3);
    while tracker.measured_pending() > 0 && Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let missing = tracker.measured_pending();
    if missing > 0 {
        errors += missing;
        first_error.get_or_insert(format!(
            "{missing} writes were not seen by every watcher within 3 s"
        ));
    }
    for t in &tasks {
        t.abort();
    }
    let hist = tracker.hist.lock().expect("hist lock").clone();
    let ops = tracker.completed.load(Ordering::Relaxed);
    let mut report = Report::measured(cfg, ops, errors, elapsed, &hist, cpu);
    if let Some(e) = first_error {
        report.note = Some(format!("first error: {e}"));
    }
    Ok(report)
}

/// Runs `f` on items with at most `par` at a time; the first error wins.
pub(crate) async fn for_each_limited<T, F, Fut>(
    items: Vec<T>,
    par: usize,
    f: F,
) -> anyhow::Result<()>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use futures::stream::{self, StreamExt, TryStreamExt};
    stream::iter(items.into_iter().map(f))
        .buffer_unordered(par.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The workloads that read or overwrite the pre-created key space.
pub(crate) fn uses_key_space(w: Workload) -> bool {
    matches!(w, Workload::Write | Workload::Read | Workload::ReadLocal)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn paced_latency_counts_queueing_but_not_the_timers_lateness() {
        let earlier = Instant::now();
        let t = earlier + 5 * MS;
        // Due at t, the previous op long done, the timer woke 0.9 ms late: only the op's own
        // 0.3 ms counts.
        let late_timer = OpTimes {
            intended: t,
            prev_done: Some(earlier),
            started: t + MS * 9 / 10,
            done: t + MS * 12 / 10,
        };
        assert_eq!(late_timer.latency(None), MS * 3 / 10);
        // Due at t, but the previous op ran until t + 2 ms: the 2 ms of queueing count.
        let queued = OpTimes {
            intended: t,
            prev_done: Some(t + 2 * MS),
            started: t + 2 * MS,
            done: t + 3 * MS,
        };
        assert_eq!(queued.latency(None), 3 * MS);
        // A worker that measured its own part (a watch's write-to-event time).
        assert_eq!(queued.latency(Some(MS / 2)), 2 * MS + MS / 2);
        // Closed loop: due when started, nothing before it.
        let closed = OpTimes {
            intended: t,
            prev_done: None,
            started: t,
            done: t + MS,
        };
        assert_eq!(closed.latency(None), MS);
    }
}
