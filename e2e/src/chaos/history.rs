//! Step 1 of a chaos run: records every operation's invocation and completion (ok, failed
//! definitely, or unknown outcome) with monotonic timestamps, for the checkers.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::model::{Input, Output};

/// Nanoseconds since the history's start (monotonic clock).
pub type Nanos = u64;

/// One finished operation of the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The worker that ran it (workers are sequential).
    pub worker: usize,
    /// The key group it touched (the checker's partition).
    pub group: usize,
    pub input: Input,
    /// `Output::Unknown` when the outcome is unknown (timeout, UNAVAILABLE after sending).
    pub output: Output,
    pub invoke: Nanos,
    /// When the reply arrived; `None` for an unknown outcome (it may take effect any time
    /// until the end of the history).
    pub complete: Option<Nanos>,
    /// Revision of an acknowledged write (from the stat it returned), when it has one.
    pub revision: Option<u64>,
    /// Whether the read was local (not linearizable): checked by a weaker rule.
    pub local: bool,
}

#[cfg(test)]
impl Entry {
    /// An entry of worker 0, group 0, without a revision (for the checkers' unit tests).
    pub(crate) fn for_test(
        input: Input,
        output: Output,
        invoke: Nanos,
        complete: Option<Nanos>,
        local: bool,
    ) -> Entry {
        Entry {
            worker: 0,
            group: 0,
            input,
            output,
            invoke,
            complete,
            revision: None,
            local,
        }
    }
}

impl Entry {
    /// `[worker w] 12.345s..12.350s g3 Input -> Output`
    pub fn describe(&self) -> String {
        let end = match self.complete {
            Some(t) => format!("{:.3}s", t as f64 / 1e9),
            None => "?".into(),
        };
        format!(
            "[w{} {:.3}s..{end}] g{} {}{:?} -> {:?}{}",
            self.worker,
            self.invoke as f64 / 1e9,
            self.group,
            if self.local { "local " } else { "" },
            self.input,
            self.output,
            self.revision
                .map(|r| format!(" @rev {r}"))
                .unwrap_or_default()
        )
    }
}

/// A shared, append-only history. Clones share the same log and clock.
#[derive(Debug, Clone)]
pub struct Recorder {
    start: Instant,
    entries: Arc<Mutex<Vec<Entry>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Recorder {
            start: Instant::now(),
            entries: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The current time on the history's clock.
    pub fn now(&self) -> Nanos {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    pub fn record(&self, entry: Entry) {
        // A poisoned lock only means another worker panicked; the log itself is intact.
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.push(entry);
    }

    /// Every entry recorded so far, by invocation time.
    pub fn snapshot(&self) -> Vec<Entry> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = entries.clone();
        out.sort_by_key(|e| e.invoke);
        out
    }
}
