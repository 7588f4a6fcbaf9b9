//! The Raft log and vote in RocksDB. An appended entry is reported persisted to openraft only
//! after the WAL holding it was synced; votes, truncations and purges are written synced.
//! Appends are written at once (readable, not yet durable) and a flusher thread syncs the WAL,
//! once for every append that arrived meanwhile, then reports them all; the fsync never blocks
//! a runtime thread. openraft 0.9.25 awaits each append's report inside its core before it runs
//! anything else (`RaftCore::append_to_log`), so appends from one core never overlap and a group
//! is normally one append: it is the proposal batcher (`proposal/batch.rs`) that makes
//! concurrent writes share an fsync. The same wait makes a leader's fsync and its followers'
//! round trip serial (see BENCHMARKS.md, "What limits each figure").

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Weak};
use std::time::Instant;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, RaftLogReader};
use rocksdb::{Direction, IteratorMode, WriteBatch, WriteOptions, DB};

use super::codec::{self, u64_key};
use super::{cf, cf_handle, to_storage_error, StoreError};
use crate::metrics::Metrics;
use crate::raft::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    /// The highest committed index openraft reported; shown in status and metrics.
    committed: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    /// Appends waiting for the next WAL sync.
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
}

/// Syncs the WAL once per group of waiting appends and reports each of them. Runs on its own
/// thread (fsync blocks) until every `LogStore` clone is gone.
fn run_flusher(
    db: Weak<DB>,
    metrics: Arc<Metrics>,
    waiting: mpsc::Receiver<LogFlushed<TypeConfig>>,
) {
    while let Ok(first) = waiting.recv() {
        // Every append in this group wrote its batch before queueing its callback, so one sync
        // started now makes all of them durable.
        let mut group = vec![first];
        group.extend(waiting.try_iter());
        let start = Instant::now();
        let result = match db.upgrade() {
            Some(db) => db.flush_wal(true).map_err(|e| e.to_string()),
            None => Err("the database is closed".to_owned()),
        };
        metrics.fsync_seconds.observe(start.elapsed().as_secs_f64());
        for callback in group {
            let outcome = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::other(format!("syncing the raft log: {e}"))),
            };
            callback.log_io_completed(outcome);
        }
    }
}

impl LogStore {
    pub fn new(db: Arc<DB>, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        let (flusher, waiting) = mpsc::channel();
        {
            let (db, metrics) = (Arc::downgrade(&db), metrics.clone());
            std::thread::Builder::new()
                .name("kord-log-flush".into())
                .spawn(move || run_flusher(db, metrics, waiting))
                .map_err(|e| StoreError::Thread(e.to_string()))?;
        }
        let store = LogStore {
            db,
            committed: Arc::new(AtomicU64::new(0)),
            metrics,
            flusher,
        };
        if let Some(c) = store
            .read_meta::<Option<LogId>>(codec::COMMITTED)?
            .flatten()
        {
            store.committed.store(c.index, Ordering::Relaxed);
        }
        Ok(store)
    }

    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        let cf = cf_handle(&self.db, cf::RAFT_META)?;
        match self.db.get_pinned_cf(cf, key)? {
            Some(bytes) => Ok(Some(codec::decode("raft meta", &bytes)?)),
            None => Ok(None),
        }
    }

    /// Writes a batch and syncs the WAL, recording how long the sync took.
    fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        let start = Instant::now();
        self.db.write_opt(batch, &opts)?;
        self.metrics
            .fsync_seconds
            .observe(start.elapsed().as_secs_f64());
        Ok(())
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StoreError> {
        let cf = cf_handle(&self.db, cf::LOG)?;
        let mut it = self.db.iterator_cf(cf, IteratorMode::End);
        match it.next() {
            Some(item) => {
                let (_, value) = item?;
                let entry: Entry = codec::decode("log entry", &value)?;
                Ok(Some(entry.log_id))
            }
            None => Ok(None),
        }
    }
}

fn log_err(verb: ErrorVerb) -> impl FnOnce(StoreError) -> StorageError {
    move |e| to_storage_error(ErrorSubject::Logs, verb, e)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let read = || -> Result<Vec<Entry>, StoreError> {
            let start = match range.start_bound() {
                std::ops::Bound::Included(i) => *i,
                std::ops::Bound::Excluded(i) => *i + 1,
                std::ops::Bound::Unbounded => 0,
            };
            let cf = cf_handle(&self.db, cf::LOG)?;
            let mut entries = Vec::new();
            let key = u64_key(start);
            for item in self
                .db
                .iterator_cf(cf, IteratorMode::From(&key, Direction::Forward))
            {
                let (key, value) = item?;
                let Some(index) = codec::key_u64(&key) else {
                    break;
                };
                if !range.contains(&index) {
                    break;
                }
                entries.push(codec::decode("log entry", &value)?);
            }
            Ok(entries)
        };
        read().map_err(log_err(ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let read = || -> Result<LogState<TypeConfig>, StoreError> {
            let last_purged: Option<LogId> = self.read_meta(codec::LAST_PURGED)?;
            let last = self.last_entry_log_id()?.or(last_purged);
            Ok(LogState {
                last_purged_log_id: last_purged,
                last_log_id: last,
            })
        };
        read().map_err(log_err(ErrorVerb::Read))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let write = || -> Result<(), StoreError> {
            let mut batch = WriteBatch::default();
            batch.put_cf(
                cf_handle(&self.db, cf::RAFT_META)?,
                codec::VOTE,
                codec::encode(vote),
            );
            self.write_synced(batch)
        };
        write().map_err(|e| to_storage_error(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.read_meta(codec::VOTE)
            .map_err(|e| to_storage_error(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: after a crash openraft re-learns the commit index from the leader.
        let write = || -> Result<(), StoreError> {
            let cf = cf_handle(&self.db, cf::RAFT_META)?;
            self.db
                .put_cf(cf, codec::COMMITTED, codec::encode(&committed))?;
            Ok(())
        };
        write().map_err(log_err(ErrorVerb::Write))?;
        if let Some(c) = committed {
            self.committed.fetch_max(c.index, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self
            .read_meta::<Option<LogId>>(codec::COMMITTED)
            .map_err(log_err(ErrorVerb::Read))?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let write = || -> Result<(), StoreError> {
            let cf = cf_handle(&self.db, cf::LOG)?;
            let mut batch = WriteBatch::default();
            for entry in entries {
                batch.put_cf(cf, u64_key(entry.get_log_id().index), codec::encode(&entry));
            }
            // Readable at once; durable when the flusher's next sync completes.
            self.db.write_opt(batch, &WriteOptions::default())?;
            Ok(())
        };
        if let Err(e) = write() {
            let io = std::io::Error::other(e.to_string());
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
            return Err(to_storage_error(ErrorSubject::Logs, ErrorVerb::Write, io));
        }
        if let Err(mpsc::SendError(callback)) = self.flusher.send(callback) {
            // The flusher only stops when every store is gone; report rather than hang.
            callback.log_io_completed(Err(std::io::Error::other("the log flusher stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let write = || -> Result<(), StoreError> {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(
                cf_handle(&self.db, cf::LOG)?,
                u64_key(log_id.index),
                u64_key(u64::MAX),
            );
            self.write_synced(batch)
        };
        write().map_err(log_err(ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let write = || -> Result<(), StoreError> {
            let mut batch = WriteBatch::default();
            batch.put_cf(
                cf_handle(&self.db, cf::RAFT_META)?,
                codec::LAST_PURGED,
                codec::encode(&log_id),
            );
            batch.delete_range_cf(
                cf_handle(&self.db, cf::LOG)?,
                u64_key(0),
                u64_key(log_id.index + 1),
            );
            // Synced: a purge must never be durable while the state it relies on is not.
            self.write_synced(batch)
        };
        write().map_err(log_err(ErrorVerb::Delete))
    }
}
