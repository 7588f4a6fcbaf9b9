//! Step 3b: watch validators. Long-lived watches record what they deliver through the faults;
//! at the end a reference watch replays the same revisions from the server's event history.
//! Each watch must deliver revisions in order, without duplicates or gaps (equal to the
//! reference over its range); the reference must replay the checked keys consistently
//! (versions step by one), contain every acknowledged write at its revision, and end in the
//! state the final reads saw.

use std::collections::HashMap;
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
    /// The highest revision this watch is known complete up to.
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

/// Watches the checked subtree from `start_revision` until `drain_to` names a revision, then
/// until a progress notice confirms delivery up to it (bounded by `drain_timeout`).
pub async fn record(
    name: String,
    client: Client,
    start_revision: u64,
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
        if drain_to.has_changed().is_err() && drain_to.borrow().is_none() {
            log.error = Some("the run ended before asking the watch to drain".into());
            return log;
        }
        let target = *drain_to.borrow();
        if let Some(target) = target {
            // Only a progress notice proves every event up to it was delivered.
            if log.progress >= target {
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
            Ok(Some(Ok(WatchEvent::Events { revision, events }))) => {
                log.events.push((revision, events))
            }
            Ok(Some(Ok(WatchEvent::Progress { revision }))) => {
                if revision < log.progress {
                    log.error = Some(format!(
                        "progress went back from {} to {revision}",
                        log.progress
                    ));
                    return log;
                }
                log.progress = revision;
            }
        }
    }
}

/// Reads the server's events from `start_revision` up to its current revision, at least
/// `at_least` (the cluster is quiet by then).
pub async fn reference(
    client: &Client,
    start_revision: u64,
    at_least: u64,
    timeout: Duration,
) -> Result<WatchLog, String> {
    let (tx, rx) = tokio::sync::watch::channel(Some(at_least.max(1)));
    let log = record(
        "reference".into(),
        client.clone(),
        start_revision,
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
            problems.push(format!(
                "watch {}: revision {r} delivered after {last} (duplicate or reordered)",
                log.name
            ));
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
            state.insert(
                (g, k),
                Some(Node {
                    value: 0,
                    version: 0,
                }),
            );
        }
    }
    let mut at: HashMap<(u64, String), &Event> = HashMap::new();
    for (revision, events) in &reference.events {
        for e in events {
            let Some(key) = parse_key_path(&e.path) else {
                continue;
            };
            at.insert((*revision, e.path.clone()), e);
            let before = state.get(&key).copied().flatten();
            let after = match e.kind {
                EventType::Created => {
                    if before.is_some() || e.stat.version != 0 {
                        problems.push(format!(
                            "rev {revision}: Created {} over {before:?} (version {})",
                            e.path, e.stat.version
                        ));
                    }
                    Some(Node {
                        value: decode_value(&e.data).unwrap_or(u64::MAX),
                        version: e.stat.version,
                    })
                }
                EventType::DataChanged => {
                    let expected = before.map(|n| n.version + 1);
                    if expected != Some(e.stat.version) {
                        problems.push(format!(
                            "rev {revision}: DataChanged {} to version {} after {before:?}: a gap or a repeat",
                            e.path, e.stat.version
                        ));
                    }
                    Some(Node {
                        value: decode_value(&e.data).unwrap_or(u64::MAX),
                        version: e.stat.version,
                    })
                }
                EventType::Deleted => {
                    if before.is_none() {
                        problems.push(format!(
                            "rev {revision}: Deleted {} which did not exist",
                            e.path
                        ));
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
        let (super::model::Input::Write(ops), Output::Written(_), Some(revision)) =
            (&entry.input, &entry.output, entry.revision)
        else {
            continue;
        };
        for op in ops {
            let (WriteOp::Set { key, value, .. } | WriteOp::Create { key, value }) = *op else {
                continue;
            };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::model::Input;
    use kord_client::Stat;

    fn ev(
        revision: u64,
        kind: EventType,
        path: &str,
        value: u64,
        version: i32,
    ) -> (u64, Vec<Event>) {
        let data = if kind == EventType::Deleted {
            Vec::new()
        } else {
            value.to_string().into_bytes()
        };
        (
            revision,
            vec![Event {
                revision,
                kind,
                path: path.into(),
                stat: Stat {
                    version,
                    modify_revision: revision,
                    ..Default::default()
                },
                data,
                prev: None,
            }],
        )
    }

    fn log(name: &str, start: u64, events: Vec<(u64, Vec<Event>)>, progress: u64) -> WatchLog {
        WatchLog {
            name: name.into(),
            start_revision: start,
            events,
            progress,
            error: None,
        }
    }

    fn acked_set(group: usize, key: usize, value: u64, revision: u64) -> Entry {
        Entry {
            worker: 0,
            group,
            input: Input::Write(vec![WriteOp::Set {
                key,
                value,
                expected: None,
            }]),
            output: Output::Written(vec![Some(1)]),
            invoke: 0,
            complete: Some(1),
            revision: Some(revision),
            local: false,
        }
    }

    fn reference() -> WatchLog {
        let p = key_path(0, 0);
        log(
            "reference",
            10,
            vec![
                ev(10, EventType::DataChanged, &p, 5, 1),
                ev(11, EventType::DataChanged, &p, 6, 2),
                ev(12, EventType::Deleted, &p, 0, 2),
            ],
            12,
        )
    }

    #[test]
    fn a_complete_watch_passes() {
        let r = reference();
        assert!(validate(&r.clone(), &r, 12).is_empty());
        // A watch started later is compared from its own start.
        let late = log("late", 11, r.events[1..].to_vec(), 12);
        assert_eq!(validate(&late, &r, 12), Vec::<String>::new());
    }

    #[test]
    fn gaps_duplicates_and_reordering_are_caught() {
        let r = reference();
        let mut gap = r.clone();
        gap.events.remove(1);
        assert!(!validate(&gap, &r, 12).is_empty(), "a missing revision");
        let mut dup = r.clone();
        dup.events.insert(1, dup.events[0].clone());
        assert!(validate(&dup, &r, 12)
            .iter()
            .any(|p| p.contains("duplicate")));
        let mut reordered = r.clone();
        reordered.events.swap(0, 1);
        assert!(validate(&reordered, &r, 12)
            .iter()
            .any(|p| p.contains("reordered")));
        let mut failed = r.clone();
        failed.error = Some("stream ended".into());
        assert!(!validate(&failed, &r, 12).is_empty());
    }

    #[test]
    fn history_must_contain_every_acknowledged_write() {
        let r = reference();
        let finals = HashMap::from([
            ((0, 0), None),
            (
                (0, 1),
                Some(Node {
                    value: 0,
                    version: 0,
                }),
            ),
        ]);
        let ok = [acked_set(0, 0, 5, 10), acked_set(0, 0, 6, 11)];
        assert_eq!(check_history(&r, &ok, 1, &finals), Vec::<String>::new());
        // Acknowledged at revision 13, which the server's history does not have.
        let lost = [acked_set(0, 0, 7, 13)];
        assert!(check_history(&r, &lost, 1, &finals)
            .iter()
            .any(|p| p.contains("LOST")));
        // The final read disagrees with the event history.
        let wrong = HashMap::from([(
            (0, 0),
            Some(Node {
                value: 6,
                version: 2,
            }),
        )]);
        assert!(!check_history(&r, &ok, 1, &wrong).is_empty());
    }

    #[test]
    fn a_version_gap_in_the_events_is_caught() {
        let p = key_path(0, 0);
        let r = log(
            "reference",
            10,
            vec![
                ev(10, EventType::DataChanged, &p, 5, 1),
                ev(11, EventType::DataChanged, &p, 6, 3),
            ],
            11,
        );
        let finals = HashMap::from([(
            (0, 0),
            Some(Node {
                value: 6,
                version: 3,
            }),
        )]);
        assert!(check_history(&r, &[], 1, &finals)
            .iter()
            .any(|p| p.contains("gap")));
    }
}
