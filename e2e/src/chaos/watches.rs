//! Step 3b: watch validators. Long-lived watches record what they deliver through the faults;
//! at the end a reference watch replays the same revisions from the server's event history.
//! Each watch must deliver revisions in order, without duplicates or gaps (equal to the
//! reference over its range); the reference must replay the checked keys consistently
//! (versions step by one), contain every acknowledged write at its revision, and end in the
//! state the final reads saw.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kord_client::{Client, Event, EventType, WatchEvent, WatchOptions, WatchScope};

use super::history::Entry;
use super::model::{Node, Output, WriteOp};
use super::workload::{decode_value, key_path, parse_key_path, ROOT};

/// What one watch delivered.
#[derive(Debug, Clone, Default)]
pub struct WatchLog {
    pub name: String,
    pub start_revision: u64,
    pub events: Vec<(u64, Vec<Event>)>,
    /// The highest revision a progress notice confirmed.
    pub progress: u64,
    pub error: Option<String>,
}

impl WatchLog {
    fn last(&self) -> u64 {
        self.progress
            .max(self.events.last().map(|(r, _)| *r).unwrap_or(0))
    }
}

fn options(start_revision: u64) -> WatchOptions {
    WatchOptions {
        scope: WatchScope::Subtree,
        start_revision: Some(start_revision),
        ..Default::default()
    }
}

/// Watches the checked subtree from `start_revision` until `stop`, then until it has
/// delivered up to the revision `drain_to` names (bounded by `drain_timeout`).
pub async fn record(
    name: String,
    client: Client,
    start_revision: u64,
    stop: Arc<AtomicBool>,
    drain_to: tokio::sync::watch::Receiver<Option<u64>>,
    drain_timeout: Duration,
) -> WatchLog {
    let mut log = WatchLog {
        name,
        start_revision,
        ..Default::default()
    };
    let mut stream = match client.watch(ROOT, options(start_revision)).await {
        Ok(s) => s,
        Err(e) => {
            log.error = Some(format!("could not start: {e}"));
            return log;
        }
    };
    let mut drain_deadline: Option<Instant> = None;
    loop {
        let target = *drain_to.borrow();
        if let Some(target) = target {
            if log.last() >= target {
                return log;
            }
            let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + drain_timeout);
            if Instant::now() > deadline {
                log.error = Some(format!(
                    "did not reach revision {target} within {drain_timeout:?} after the run (at {})",
                    log.last()
                ));
                return log;
            }
            stream.request_progress();
        } else if stop.load(Ordering::Relaxed) && drain_deadline.is_none() {
            // Waiting for the target; keep reading meanwhile.
        }
        match tokio::time::timeout(Duration::from_millis(250), stream.next()).await {
            Err(_) => continue,
            Ok(None) => {
                log.error.get_or_insert_with(|| "stream ended".into());
                return log;
            }
            Ok(Some(Err(e))) => {
                log.error = Some(format!("stream failed: {e}"));
                return log;
            }
            Ok(Some(Ok(WatchEvent::Events { revision, events }))) => log.events.push((revision, events)),
            Ok(Some(Ok(WatchEvent::Progress { revision }))) => {
                if revision < log.progress {
                    log.error = Some(format!("progress went back from {} to {revision}", log.progress));
                    return log;
                }
                log.progress = revision;
            }
        }
    }
}

/// Reads the server's events from `start_revision` up to its current revision, at least
/// `at_least` (the cluster is quiet by then).
pub async fn reference(client: &Client, start_revision: u64, at_least: u64, timeout: Duration) -> Result<WatchLog, String> {
    let (tx, rx) = tokio::sync::watch::channel(Some(at_least.max(1)));
    let log = record(
        "reference".into(),
        client.clone(),
        start_revision,
        Arc::new(AtomicBool::new(true)),
        rx,
        timeout,
    )
    .await;
    drop(tx);
    match &log.error {
        Some(e) => Err(format!("reference watch: {e}")),
        None => Ok(log),
    }
}

/// Order, duplicates and gaps of one watch against the reference, over `[start, upto]`.
pub fn validate(log: &WatchLog, reference: &WatchLog, upto: u64) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(e) = &log.error {
        problems.push(format!("watch {}: {e}", log.name));
    }
    let mut last = 0;
    for (r, _) in &log.events {
        if *r <= last {
            problems.push(format!("watch {}: revision {r} delivered after {last} (duplicate or reordered)", log.name));
        }
        last = *r;
    }
    let in_range = |events: &[(u64, Vec<Event>)]| -> Vec<(u64, Vec<Event>)> {
        events
            .iter()
            .filter(|(r, _)| *r >= log.start_revision && *r <= upto)
            .cloned()
            .collect()
    };
    let mine = in_range(&log.events);
    let expected = in_range(&reference.events);
    if mine != expected {
        let first_diff = mine
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(mine.len().min(expected.len()));
        problems.push(format!(
            "watch {}: {} revisions in [{}, {upto}] but the reference has {}; first difference at \
             position {first_diff}: got {:?}, expected {:?}",
            log.name,
            mine.len(),
            log.start_revision,
            expected.len(),
            mine.get(first_diff).map(|(r, e)| (r, e.len())),
            expected.get(first_diff).map(|(r, e)| (r, e.len())),
        ));
    }
    problems
}

/// Replays the reference over the checked keys from the setup state and checks it against the
/// history: consistent versions, every acknowledged write at its revision, and the final state
/// equal to the final reads.
pub fn check_history(
    reference: &WatchLog,
    history: &[Entry],
    groups: usize,
    final_reads: &HashMap<(usize, usize), Option<Node>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut state: HashMap<(usize, usize), Option<Node>> = HashMap::new();
    for g in 0..groups {
        for k in 0..super::model::KEYS_PER_GROUP {
            state.insert((g, k), Some(Node { value: 0, version: 0 }));
        }
    }
    let mut at: HashMap<(u64, String), &Event> = HashMap::new();
    for (revision, events) in &reference.events {
        for e in events {
            let Some(key) = parse_key_path(&e.path) else { continue };
            at.insert((*revision, e.path.clone()), e);
            let before = state.get(&key).copied().flatten();
            let after = match e.kind {
                EventType::Created => {
                    if before.is_some() || e.stat.version != 0 {
                        problems.push(format!("rev {revision}: Created {} over {before:?} (version {})", e.path, e.stat.version));
                    }
                    Some(Node { value: decode_value(&e.data).unwrap_or(u64::MAX), version: e.stat.version })
                }
                EventType::DataChanged => {
                    let expected = before.map(|n| n.version + 1);
                    if expected != Some(e.stat.version) {
                        problems.push(format!(
                            "rev {revision}: DataChanged {} to version {} after {before:?}: a gap or a repeat",
                            e.path, e.stat.version
                        ));
                    }
                    Some(Node { value: decode_value(&e.data).unwrap_or(u64::MAX), version: e.stat.version })
                }
                EventType::Deleted => {
                    if before.is_none() {
                        problems.push(format!("rev {revision}: Deleted {} which did not exist", e.path));
                    }
                    None
                }
                EventType::ChildrenChanged => before,
            };
            state.insert(key, after);
        }
    }
    // Every acknowledged write is in the history of the state, at the revision it returned.
    for entry in history {
        let (super::model::Input::Write(ops), Output::Written(_), Some(revision)) = (&entry.input, &entry.output, entry.revision) else {
            continue;
        };
        for op in ops {
            let (WriteOp::Set { key, value, .. } | WriteOp::Create { key, value }) = *op else { continue };
            let path = key_path(entry.group, key);
            match at.get(&(revision, path.clone())) {
                Some(e) if decode_value(&e.data) == Some(value) => {}
                Some(e) => problems.push(format!(
                    "acknowledged write of {value} to {path} at rev {revision}, but that revision holds {:?}",
                    String::from_utf8_lossy(&e.data)
                )),
                None => problems.push(format!(
                    "acknowledged write LOST: {} (no event for {path} at rev {revision})",
                    entry.describe()
                )),
            }
        }
    }
    for (key, read) in final_reads {
        let replayed = state.get(key).copied().flatten();
        if replayed != *read {
            problems.push(format!(
                "{}: the final read saw {read:?} but the event history ends in {replayed:?}",
                key_path(key.0, key.1)
            ));
        }
    }
    problems
}
