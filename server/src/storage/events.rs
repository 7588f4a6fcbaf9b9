//! The stored event history: events by revision in the `events` column family, kept until
//! compaction. Watches read it to start at a past revision or to catch up after falling
//! behind the live broadcast.

use std::sync::Arc;

use rocksdb::{Direction, IteratorMode, DB};

use super::codec::{self, u64_key};
use super::table_writer::Written;
use super::{cf, cf_handle, StoreError};
use crate::state::Event;

#[derive(Clone)]
pub struct EventLog {
    db: Arc<DB>,
    /// The state machine's batches reach the tables after their revision is published.
    written: Written,
}

/// A range of history, read from one consistent RocksDB snapshot.
pub struct HistoryChunk {
    /// Revisions at or below this one are gone.
    pub compacted: u64,
    pub revisions: Vec<(u64, Vec<Event>)>,
}

impl EventLog {
    pub fn new(db: Arc<DB>, written: Written) -> Self {
        EventLog { db, written }
    }

    /// Revisions with events in `from..=to`, at most `limit` of them, once the tables hold
    /// `to`.
    pub async fn read(&self, from: u64, to: u64, limit: usize) -> Result<HistoryChunk, StoreError> {
        self.written.through(to).await?;
        let snap = self.db.snapshot();
        let meta_cf = cf_handle(&self.db, cf::SM_META)?;
        let compacted = match snap.get_cf(meta_cf, codec::COMPACTED)? {
            Some(bytes) => codec::decode("compacted revision", &bytes)?,
            None => 0,
        };
        let events_cf = cf_handle(&self.db, cf::EVENTS)?;
        let start = u64_key(from);
        let mut revisions = Vec::new();
        for item in snap.iterator_cf(events_cf, IteratorMode::From(&start, Direction::Forward)) {
            let (key, value) = item?;
            let Some(revision) = codec::key_u64(&key) else {
                continue;
            };
            if revision > to || revisions.len() >= limit {
                break;
            }
            revisions.push((revision, codec::decode("events", &value)?));
        }
        Ok(HistoryChunk {
            compacted,
            revisions,
        })
    }
}
