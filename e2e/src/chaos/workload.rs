//! Step 2 of a chaos run: the workload generator. Seeded workers drive writes, CAS, multi-op
//! transactions, linearizable and local reads through the Kord client, and record each op in
//! the history; a session worker churns sessions and their ephemeral nodes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kord_client::{Client, Consistency, Error, Op, OpResult, Stat};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::history::{Entry, Recorder};
use super::model::{Input, Node, Output, Refusal, WriteOp, KEYS_PER_GROUP};

/// Root of the checked keys: `/chaos/g<G>/k<K>`.
pub const ROOT: &str = "/chaos";
/// Parent of the session workers' ephemeral nodes (outside the watched subtree).
pub const EPHEMERAL_ROOT: &str = "/chaos-eph";
/// Upper bound on one client call, past the client's own retry budget: a stuck call is an
/// unknown outcome, never a hung worker.
const OP_GUARD: Duration = Duration::from_secs(20);

pub fn key_path(group: usize, key: usize) -> String {
    format!("{ROOT}/g{group}/k{key}")
}

/// Which key of which group a path names, if it is a checked key.
pub fn parse_key_path(path: &str) -> Option<(usize, usize)> {
    let rest = path.strip_prefix(ROOT)?.strip_prefix("/g")?;
    let (g, k) = rest.split_once("/k")?;
    let group = g.parse().ok()?;
    let key = k.parse().ok()?;
    (key < KEYS_PER_GROUP).then_some((group, key))
}

/// A value as stored: its decimal id.
pub fn encode_value(value: u64) -> Vec<u8> {
    value.to_string().into_bytes()
}

pub fn decode_value(data: &[u8]) -> Option<u64> {
    std::str::from_utf8(data).ok()?.parse().ok()
}

/// Creates the key tree (every key with value 0). Returns the revision of the last create:
/// the checked history starts after it.
pub async fn setup(client: &Client, groups: usize) -> Result<u64, Error> {
    client.create(ROOT, "").await?;
    client.create(EPHEMERAL_ROOT, "").await?;
    let mut revision = 0;
    for g in 0..groups {
        client.create(&format!("{ROOT}/g{g}"), "").await?;
        for k in 0..KEYS_PER_GROUP {
            let created = client.create(&key_path(g, k), encode_value(0)).await?;
            revision = revision.max(created.stat.modify_revision);
        }
    }
    Ok(revision)
}

/// What one worker does.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker: usize,
    pub seed: u64,
    pub groups: usize,
    /// Stop issuing ops after this long (a worker also stops when `stop` is set).
    pub duration: Duration,
    /// Upper bound on ops, whatever the duration.
    pub max_ops: u64,
}

/// Counts for the report.
#[derive(Debug, Default, Clone)]
pub struct WorkerStats {
    pub ops: u64,
    pub ok: u64,
    pub refused: u64,
    pub unknown: u64,
    pub failed_reads: u64,
    /// Error messages of unknown outcomes and failed reads, by gRPC code (first few kept).
    pub errors: HashMap<String, u64>,
}

impl WorkerStats {
    pub fn merge(&mut self, o: &WorkerStats) {
        self.ops += o.ops;
        self.ok += o.ok;
        self.refused += o.refused;
        self.unknown += o.unknown;
        self.failed_reads += o.failed_reads;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }
}

/// Runs one worker until its duration, `max_ops` or `stop`. `client` reaches every member;
/// `locals` are single-member clients for local reads.
pub async fn run_worker(
    cfg: WorkerConfig,
    client: Client,
    locals: Vec<Client>,
    recorder: Recorder,
    stop: Arc<AtomicBool>,
) -> WorkerStats {
    let mut rng =
        StdRng::seed_from_u64(cfg.seed ^ (cfg.worker as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut stats = WorkerStats::default();
    // The worker's last knowledge of each key's version (None: believed absent).
    let mut known: HashMap<(usize, usize), Option<i32>> = HashMap::new();
    let mut counter: u64 = 0;
    let until = Instant::now() + cfg.duration;
    while stats.ops < cfg.max_ops && Instant::now() < until && !stop.load(Ordering::Relaxed) {
        stats.ops += 1;
        let group = rng.random_range(0..cfg.groups);
        let key = rng.random_range(0..KEYS_PER_GROUP);
        let other = (key + 1) % KEYS_PER_GROUP;
        counter += 1;
        // Unique per write: worker in the high bits, so values never repeat across workers.
        let value = ((cfg.worker as u64 + 1) << 40) | counter;
        let last = known.get(&(group, key)).copied().flatten();
        let input = match rng.random_range(0..100) {
            0..25 => Input::Write(vec![WriteOp::Set {
                key,
                value,
                expected: None,
            }]),
            25..40 => Input::Write(vec![WriteOp::Set {
                key,
                value,
                expected: Some(last.unwrap_or(0)),
            }]),
            40..50 => {
                let first = if rng.random_bool(0.5) {
                    WriteOp::Check {
                        key,
                        expected: Some(last.unwrap_or(0)),
                    }
                } else {
                    WriteOp::Set {
                        key,
                        value,
                        expected: None,
                    }
                };
                counter += 1;
                let value2 = ((cfg.worker as u64 + 1) << 40) | counter;
                Input::Write(vec![
                    first,
                    WriteOp::Set {
                        key: other,
                        value: value2,
                        expected: None,
                    },
                ])
            }
            50..55 => Input::Write(vec![WriteOp::Delete {
                key,
                expected: if rng.random_bool(0.5) { last } else { None },
            }]),
            55..62 => Input::Write(vec![WriteOp::Create { key, value }]),
            62..85 => Input::Read { key },
            _ => {
                if locals.is_empty() {
                    Input::Read { key }
                } else {
                    let member = rng.random_range(0..locals.len());
                    let entry = read_with(
                        &locals[member],
                        &recorder,
                        cfg.worker,
                        group,
                        key,
                        Consistency::Local,
                    )
                    .await;
                    count(&mut stats, entry.as_ref());
                    if let Some(e) = entry {
                        recorder.record(e);
                    }
                    continue;
                }
            }
        };
        let entry = match &input {
            Input::Read { key } => {
                read_with(
                    &client,
                    &recorder,
                    cfg.worker,
                    group,
                    *key,
                    Consistency::Linearizable,
                )
                .await
            }
            Input::Write(ops) => Some(write(&client, &recorder, cfg.worker, group, ops).await),
        };
        count(&mut stats, entry.as_ref());
        if let Some(e) = entry {
            learn(&mut known, group, &e);
            recorder.record(e);
        }
    }
    stats
}

fn count(stats: &mut WorkerStats, entry: Option<&Entry>) {
    match entry.map(|e| &e.output) {
        None => stats.failed_reads += 1,
        Some(Output::Unknown) => stats.unknown += 1,
        Some(Output::Refused { .. }) => stats.refused += 1,
        Some(_) => stats.ok += 1,
    }
}

/// Updates the worker's idea of versions from an op it saw complete.
fn learn(known: &mut HashMap<(usize, usize), Option<i32>>, group: usize, e: &Entry) {
    match (&e.input, &e.output) {
        (Input::Read { key }, Output::Read(node)) => {
            known.insert((group, *key), node.map(|n| n.version));
        }
        (Input::Write(ops), Output::Written(versions)) => {
            for (op, v) in ops.iter().zip(versions) {
                match op {
                    WriteOp::Delete { key, .. } => {
                        known.insert((group, *key), None);
                    }
                    WriteOp::Check { .. } => {}
                    op => {
                        known.insert((group, op.key()), *v);
                    }
                }
            }
        }
        _ => {}
    }
}

/// A read, or `None` when it failed (a failed read has no effect to record).
async fn read_with(
    client: &Client,
    rec: &Recorder,
    worker: usize,
    group: usize,
    key: usize,
    consistency: Consistency,
) -> Option<Entry> {
    let path = key_path(group, key);
    let invoke = rec.now();
    let result = tokio::time::timeout(OP_GUARD, client.get_with(&path, consistency)).await;
    let output = match result {
        Ok(Ok((data, stat))) => Output::Read(Some(Node {
            // Undecodable data is a real finding: u64::MAX never matches a written value.
            value: decode_value(&data).unwrap_or(u64::MAX),
            version: stat.version,
        })),
        Ok(Err(Error::NoNode { .. })) => Output::Read(None),
        Ok(Err(_)) | Err(_) => return None,
    };
    Some(Entry {
        worker,
        group,
        input: Input::Read { key },
        output,
        invoke,
        complete: Some(rec.now()),
        revision: None,
        local: consistency == Consistency::Local,
    })
}

/// A write: one op alone, several as a transaction.
pub async fn write(
    client: &Client,
    rec: &Recorder,
    worker: usize,
    group: usize,
    ops: &[WriteOp],
) -> Entry {
    let invoke = rec.now();
    let call = async {
        if let [op] = ops {
            single(client, group, op).await.map(|s| vec![s])
        } else {
            let txn: Vec<Op> = ops.iter().map(|op| to_txn_op(group, op)).collect();
            let results = client.txn(txn).await?;
            Ok(results
                .into_iter()
                .map(|r| match r {
                    OpResult::Set(stat) => Some(stat),
                    OpResult::Create(c) => Some(c.stat),
                    OpResult::Delete | OpResult::Check => None,
                })
                .collect())
        }
    };
    let result = tokio::time::timeout(OP_GUARD, call).await;
    let (output, revision, complete) = match result {
        Ok(Ok(stats)) => {
            let versions = ops
                .iter()
                .zip(&stats)
                .map(|(op, s)| match op {
                    WriteOp::Set { .. } | WriteOp::Create { .. } => s.as_ref().map(|s| s.version),
                    WriteOp::Delete { .. } | WriteOp::Check { .. } => None,
                })
                .collect();
            let revision = stats.iter().flatten().map(|s| s.modify_revision).max();
            (Output::Written(versions), revision, Some(rec.now()))
        }
        Ok(Err(e)) => match refusal(&e) {
            Some(why) => (
                Output::Refused {
                    op: e.failed_op(),
                    why,
                },
                None,
                Some(rec.now()),
            ),
            None => (Output::Unknown, None, None),
        },
        Err(_) => (Output::Unknown, None, None),
    };
    Entry {
        worker,
        group,
        input: Input::Write(ops.to_vec()),
        output,
        invoke,
        complete,
        revision,
        local: false,
    }
}

/// The errors that prove a write was not applied.
fn refusal(e: &Error) -> Option<Refusal> {
    match e {
        Error::NoNode { .. } => Some(Refusal::NoNode),
        Error::NodeExists { .. } => Some(Refusal::NodeExists),
        Error::BadVersion { .. } => Some(Refusal::BadVersion),
        _ => None,
    }
}

async fn single(client: &Client, group: usize, op: &WriteOp) -> Result<Option<Stat>, Error> {
    match *op {
        WriteOp::Set {
            key,
            value,
            expected,
        } => client
            .set(&key_path(group, key), encode_value(value), expected)
            .await
            .map(Some),
        WriteOp::Create { key, value } => client
            .create(&key_path(group, key), encode_value(value))
            .await
            .map(|c| Some(c.stat)),
        WriteOp::Delete { key, expected } => client
            .delete(&key_path(group, key), expected)
            .await
            .map(|()| None),
        WriteOp::Check { key, expected } => client
            .txn(vec![Op::check(key_path(group, key), expected)])
            .await
            .map(|_| None),
    }
}

fn to_txn_op(group: usize, op: &WriteOp) -> Op {
    match *op {
        WriteOp::Set {
            key,
            value,
            expected,
        } => Op::set(key_path(group, key), encode_value(value), expected),
        WriteOp::Create { key, value } => Op::create(key_path(group, key), encode_value(value)),
        WriteOp::Delete { key, expected } => Op::delete(key_path(group, key), expected),
        WriteOp::Check { key, expected } => Op::check(key_path(group, key), expected),
    }
}

/// Linearizable reads of every key, recorded in the history (they end it).
pub async fn final_reads(
    client: &Client,
    rec: &Recorder,
    groups: usize,
) -> Result<HashMap<(usize, usize), Option<Node>>, String> {
    let mut out = HashMap::new();
    for g in 0..groups {
        for k in 0..KEYS_PER_GROUP {
            let mut entry = None;
            // Bounded retries: the cluster is healed, but a read may still meet an election.
            for _ in 0..10 {
                entry = read_with(client, rec, usize::MAX, g, k, Consistency::Linearizable).await;
                if entry.is_some() {
                    break;
                }
            }
            let e =
                entry.ok_or_else(|| format!("final read of {} failed 10 times", key_path(g, k)))?;
            if let Output::Read(node) = e.output {
                out.insert((g, k), node);
            }
            rec.record(e);
        }
    }
    Ok(out)
}

/// Local reads must return a value some write could have produced by then: the setup value,
/// or the value of a write (not refused) invoked before the read returned.
pub fn check_local_reads(history: &[Entry]) -> Vec<String> {
    let mut invoked: HashMap<(usize, usize, u64), u64> = HashMap::new();
    for e in history {
        if let (Input::Write(ops), out) = (&e.input, &e.output) {
            if matches!(out, Output::Refused { .. }) {
                continue;
            }
            for op in ops {
                if let WriteOp::Set { key, value, .. } | WriteOp::Create { key, value } = *op {
                    invoked.insert((e.group, key, value), e.invoke);
                }
            }
        }
    }
    let mut problems = Vec::new();
    for e in history.iter().filter(|e| e.local) {
        let (Input::Read { key }, Output::Read(Some(node))) = (&e.input, &e.output) else {
            continue;
        };
        let ok = if node.value == 0 {
            true
        } else {
            match (invoked.get(&(e.group, *key, node.value)), e.complete) {
                (Some(&inv), Some(done)) => inv <= done,
                _ => false,
            }
        };
        if !ok {
            problems.push(format!(
                "local read saw a value no write produced: {}",
                e.describe()
            ));
        }
    }
    problems
}

/// Session churn: open a session, create an ephemeral node under it, hold it a while, then
/// close the session or abandon it to expire. Returns (sessions opened, errors).
pub async fn run_sessions(
    client: Client,
    seed: u64,
    session_timeout: Duration,
    stop: Arc<AtomicBool>,
    max_sessions: u64,
) -> (u64, u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5E55_1045);
    let (mut opened, mut errors) = (0u64, 0u64);
    while opened < max_sessions && !stop.load(Ordering::Relaxed) {
        let session = match tokio::time::timeout(OP_GUARD, client.session(session_timeout)).await {
            Ok(Ok(s)) => s,
            _ => {
                errors += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        opened += 1;
        let path = format!("{EPHEMERAL_ROOT}/s{opened}");
        let created =
            tokio::time::timeout(OP_GUARD, client.create_ephemeral(&path, "", &session)).await;
        if !matches!(created, Ok(Ok(_))) {
            errors += 1;
        }
        // Pacing of the churn, not synchronisation.
        let hold = Duration::from_millis(rng.random_range(100..1500));
        let until = Instant::now() + hold;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if rng.random_bool(0.5) {
            if !matches!(
                tokio::time::timeout(OP_GUARD, session.close()).await,
                Ok(Ok(_))
            ) {
                errors += 1;
            }
        } else {
            drop(session); // abandoned: the server expires it
        }
    }
    (opened, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        input: Input,
        output: Output,
        invoke: u64,
        complete: Option<u64>,
        local: bool,
    ) -> Entry {
        Entry::for_test(input, output, invoke, complete, local)
    }

    #[test]
    fn local_reads_must_see_values_that_were_written() {
        let write = entry(
            Input::Write(vec![WriteOp::Set {
                key: 0,
                value: 7,
                expected: None,
            }]),
            Output::Unknown,
            10,
            None,
            false,
        );
        let saw = |value, t| {
            entry(
                Input::Read { key: 0 },
                Output::Read(Some(Node { value, version: 1 })),
                t,
                Some(t + 5),
                true,
            )
        };
        assert!(check_local_reads(&[write.clone(), saw(7, 20)]).is_empty());
        // Seen before the write was even sent: from the future.
        assert_eq!(check_local_reads(&[write.clone(), saw(7, 0)]).len(), 1);
        // Never written at all.
        assert_eq!(check_local_reads(&[write, saw(8, 20)]).len(), 1);
    }

    #[test]
    fn key_paths_round_trip() {
        assert_eq!(parse_key_path(&key_path(3, 1)), Some((3, 1)));
        assert_eq!(parse_key_path("/chaos/g3"), None);
        assert_eq!(parse_key_path("/chaos-eph/s1"), None);
        assert_eq!(decode_value(&encode_value(42)), Some(42));
    }
}
