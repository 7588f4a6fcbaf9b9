//! The Raft log for openraft: entries in segment files ([`super::log_file`]); the commit point
//! in a file of its own ([`super::commit_point`]); the vote and the purge point in RocksDB. An
//! appended entry is reported persisted to openraft only after its segment was synced; votes,
//! truncations and purges are durable when they return.
//!
//! Appends are written at once (readable, not yet durable), synced, and only then reported.
//! Where the sync runs depends on who waits for the report ([`LogFlushed::is_awaited`]):
//! - A follower's append is awaited by openraft's core before it answers the leader, so it is
//!   synced in the core's own task, right after the write: a flusher thread would only add two
//!   thread wake-ups. That blocks one runtime thread for the fsync, harmless while others serve
//!   requests; with a single runtime thread (a one-CPU pod) it would stop all serving during
//!   every fsync, so there the flusher thread syncs instead ([`SyncMode`]).
//! - A leader's append is not awaited (Kord's openraft patch, `vendor/openraft/KORD-PATCH.md`):
//!   the leader sends the entries to its followers while the flusher thread syncs them, and
//!   counts itself toward the quorum only when the sync is reported. Appends that arrive during
//!   a sync share the next one.
//!
//! The patch ignores a sync report from an earlier term, so [`LogStore::save_vote`] syncs the log
//! before it stores a new vote: a leader of the new term may count its whole log as durable. The
//! log is also synced on open, as a crashed process can leave written, unsynced records in the
//! page cache, and openraft counts every record it finds as durable.
//!
//! The state machine writes RocksDB without its WAL (see `state_machine`): its batches are
//! durable only once RocksDB flushes them to tables. Entries it has applied stay in the log
//! until a purge, and a purge point is made durable only after that flush, right before the
//! purged segments are deleted: so no entry is deleted, and no durable purge point passes an
//! entry, before the state that includes it is durable. A crash before then finds the older
//! purge point and the entries still there, and openraft applies them again.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Instant;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogId, RaftLogReader};
use rocksdb::{IteratorMode, WriteBatch, DB};

use super::codec::{self, u64_key};
use super::commit_point::{self, CommitPointFile};
use super::log_file::LogFile;
use super::{cf, cf_handle, read_meta, to_storage_error, write_batch_synced, StoreError};
use crate::metrics::Metrics;
use crate::raft::{Entry, LogId, NodeId, StorageError, TypeConfig, Vote};

/// Space allocated for each log segment up front, unless `--log-segment-size` says otherwise.
/// A snapshot, taken after `--snapshot-count` entries or `--snapshot-log-bytes` of log (64 MiB
/// by default), purges the log behind it, so a member keeps a few segments.
pub const SEGMENT_BYTES: u64 = 32 << 20;

#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    log: Arc<LogFile>,
    commit_point: Arc<CommitPointFile>,
    /// The highest committed index openraft reported; shown in status and metrics.
    committed: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    /// The flusher thread's queue of appends waiting for its next sync.
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
    /// Where awaited appends are synced.
    mode: SyncMode,
    /// The latest purge point openraft gave; written to RocksDB only by the before-delete hook
    /// (see the module comment), so the stored one may be older.
    purged: PurgePoint,
}

/// The latest purge point, shared by the store and the log's before-delete hook.
#[derive(Clone)]
struct PurgePoint(Arc<Mutex<Option<LogId>>>);

impl PurgePoint {
    fn get(&self) -> Option<LogId> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, point: LogId) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(point);
    }
}

/// Where an append that openraft's core awaits is synced before it is reported (see the module
/// comment); appends it does not await are always synced on the flusher thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// In the Raft core's task: with two runtime threads or more.
    Inline,
    /// On the flusher thread: with a single runtime thread, or outside a runtime.
    Flusher,
}

impl SyncMode {
    /// The mode for the runtime this is called in.
    pub fn for_runtime() -> SyncMode {
        let threads = tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_workers())
            .unwrap_or(1);
        if threads >= 2 {
            SyncMode::Inline
        } else {
            SyncMode::Flusher
        }
    }
}

/// Syncs the log, recording how long it took.
fn sync_log(log: &LogFile, metrics: &Metrics) -> Result<(), String> {
    let start = Instant::now();
    let result = log.sync().map_err(|e| e.to_string());
    metrics.fsync_seconds.observe(start.elapsed().as_secs_f64());
    result
}

fn sync_outcome(result: &Result<(), String>) -> std::io::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(e) => Err(std::io::Error::other(format!("syncing the raft log: {e}"))),
    }
}

/// Syncs the log once per group of waiting appends and reports each of them. Runs on its own
/// thread (fsync blocks) until every `LogStore` clone is gone.
fn run_flusher(
    log: Weak<LogFile>,
    metrics: Arc<Metrics>,
    waiting: mpsc::Receiver<LogFlushed<TypeConfig>>,
) {
    while let Ok(first) = waiting.recv() {
        // Every append in this group wrote its records before queueing its callback, so one
        // sync started now makes all of them durable.
        let mut group = vec![first];
        group.extend(waiting.try_iter());
        let result = match log.upgrade() {
            Some(log) => sync_log(&log, &metrics),
            None => Err("the log is closed".to_owned()),
        };
        for callback in group {
            callback.log_io_completed(sync_outcome(&result));
        }
    }
}

impl LogStore {
    /// Opens the log in `log_dir`, with its metadata in `db`. A log still kept in RocksDB (data
    /// dirs written before the segment files) is moved into them first.
    pub fn open(
        db: Arc<DB>,
        log_dir: &Path,
        segment_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        Self::open_syncing(db, log_dir, segment_bytes, metrics, SyncMode::for_runtime())
    }

    /// [`LogStore::open`] with the sync mode chosen by the caller (tests run both).
    pub fn open_syncing(
        db: Arc<DB>,
        log_dir: &Path,
        segment_bytes: u64,
        metrics: Arc<Metrics>,
        mode: SyncMode,
    ) -> Result<Self, StoreError> {
        // Versions before 240fe28 wrote the purge point without syncing: one recovered from the
        // WAL's unsynced tail (still in the page cache after a process crash) is synced before
        // the log deletes anything by it.
        db.flush_wal(true)?;
        let last_purged: Option<LogId> = read_meta(&db, codec::LAST_PURGED)?;
        let purged = PurgePoint(Arc::new(Mutex::new(last_purged)));
        // Before purged segments are deleted: the state machine's tables, then the purge point
        // (read first: every entry up to it was applied when openraft purged it, so the flush
        // covers it even if a later purge moves it meanwhile).
        let before_delete = {
            let (db, purged) = (db.clone(), purged.clone());
            Arc::new(move || persist_purge_point(&db, purged.get()).map_err(|e| e.to_string()))
        };
        let log = Arc::new(
            LogFile::open(log_dir, segment_bytes, last_purged.map(|p| p.index))?
                .with_before_delete(before_delete),
        );
        move_rocksdb_log(&db, &log, last_purged)?;
        // Records a crashed process wrote but never synced may still be in the page cache.
        log.sync()?;
        let (flusher, waiting) = mpsc::channel();
        {
            let (log, metrics) = (Arc::downgrade(&log), metrics.clone());
            std::thread::Builder::new()
                .name("kord-log-flush".into())
                .spawn(move || run_flusher(log, metrics, waiting))
                .map_err(|e| StoreError::Thread(e.to_string()))?;
        }
        let commit_point = Arc::new(CommitPointFile::open(log_dir)?);
        let committed = commit_point::load(&commit_point, &db)?.map_or(0, |c| c.index);
        Ok(LogStore {
            db,
            log,
            commit_point,
            committed: Arc::new(AtomicU64::new(committed)),
            metrics,
            flusher,
            mode,
            purged,
        })
    }

    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    /// Bytes of the log after `index` (all of it for None): how much a snapshot taken at
    /// `index` leaves behind it.
    pub fn bytes_after(&self, index: Option<u64>) -> u64 {
        self.log.bytes_from(index.map_or(0, |i| i + 1))
    }

    /// Writes a batch and syncs the WAL, recording how long the sync took.
    fn write_synced(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let start = Instant::now();
        write_batch_synced(&self.db, batch)?;
        self.metrics
            .fsync_seconds
            .observe(start.elapsed().as_secs_f64());
        Ok(())
    }

    fn read_entries(&self, from: u64, to: u64) -> Result<Vec<Entry>, StoreError> {
        self.log
            .read(from, to)?
            .iter()
            .map(|bytes| codec::decode("log entry", bytes))
            .collect()
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StoreError> {
        let Some((_, last)) = self.log.bounds() else {
            return Ok(None);
        };
        Ok(self
            .read_entries(last, last + 1)?
            .pop()
            .map(|entry| entry.log_id))
    }
}

/// Moves entries from RocksDB's log column family (where data dirs before the segment files
/// kept them) into the segment files, synced, then deletes them there, synced. Idempotent: a
/// crash between the two steps finds the entries in both and copies none twice.
fn move_rocksdb_log(db: &DB, log: &LogFile, last_purged: Option<LogId>) -> Result<(), StoreError> {
    let cf = cf_handle(db, cf::LOG)?;
    let mut records = Vec::new();
    let mut in_rocksdb = false;
    let next_in_files = log.bounds().map(|(_, last)| last + 1);
    for item in db.iterator_cf(cf, IteratorMode::Start) {
        let (key, value) = item?;
        in_rocksdb = true;
        let Some(index) = codec::key_u64(&key) else {
            continue;
        };
        let purged = last_purged.is_some_and(|p| index <= p.index);
        let already_moved = next_in_files.is_some_and(|next| index < next);
        if !purged && !already_moved {
            records.push((index, value.to_vec()));
        }
    }
    if !in_rocksdb {
        return Ok(());
    }
    tracing::info!(
        entries = records.len(),
        "moving the raft log from RocksDB into segment files"
    );
    log.append(&records)?;
    log.sync()?;
    let mut batch = WriteBatch::default();
    batch.delete_range_cf(cf, u64_key(0), u64_key(u64::MAX));
    write_batch_synced(db, batch)
}

fn log_err(verb: ErrorVerb) -> impl FnOnce(StoreError) -> StorageError {
    move |e| to_storage_error(ErrorSubject::Logs, verb, e)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let from = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        self.read_entries(from, to)
            .map_err(log_err(ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let read = || -> Result<LogState<TypeConfig>, StoreError> {
            let last_purged = self.purged.get();
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
            // Appends whose sync is still on its way are made durable first (module comment).
            self.log.sync()?;
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
        read_meta(&self.db, codec::VOTE)
            .map_err(|e| to_storage_error(ErrorSubject::Vote, ErrorVerb::Read, e))
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: after a power loss openraft re-learns the commit point from the leader
        // (see `commit_point` for what must survive one, and how).
        self.commit_point
            .write(committed)
            .map_err(log_err(ErrorVerb::Write))?;
        if let Some(c) = committed {
            self.committed.fetch_max(c.index, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        commit_point::load(&self.commit_point, &self.db).map_err(log_err(ErrorVerb::Read))
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
        let records: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|entry| (entry.get_log_id().index, codec::encode(&entry)))
            .collect();
        // Readable at once; durable when the sync completes.
        if let Err(e) = self.log.append(&records) {
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
            return Err(to_storage_error(ErrorSubject::Logs, ErrorVerb::Write, e));
        }
        if callback.is_awaited() && self.mode == SyncMode::Inline {
            callback.log_io_completed(sync_outcome(&sync_log(&self.log, &self.metrics)));
            return Ok(());
        }
        if let Err(mpsc::SendError(callback)) = self.flusher.send(callback) {
            // The flusher only stops when every store is gone; report rather than hang.
            callback.log_io_completed(Err(std::io::Error::other("the log flusher stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.log
            .truncate(log_id.index)
            .map_err(|e| to_storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Nothing is written here, where a flush would hold up Raft's core: the purge point is
        // stored by the before-delete hook (see `open`).
        self.purged.set(log_id);
        self.log
            .purge(log_id.index)
            .map_err(|e| to_storage_error(ErrorSubject::Logs, ErrorVerb::Delete, e))
    }
}

/// Makes the state machine's writes durable (a flush of every column family, atomic), then
/// stores `point` as the purge point, synced.
fn persist_purge_point(db: &DB, point: Option<LogId>) -> Result<(), StoreError> {
    super::flush_tables(db)?;
    let Some(point) = point else {
        return Ok(());
    };
    let mut batch = WriteBatch::default();
    batch.put_cf(
        cf_handle(db, cf::RAFT_META)?,
        codec::LAST_PURGED,
        codec::encode(&point),
    );
    write_batch_synced(db, batch)
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::storage::open_db;

    #[test]
    fn appends_are_synced_inline_only_with_two_runtime_threads_or_more() {
        assert_eq!(
            SyncMode::for_runtime(),
            SyncMode::Flusher,
            "outside a runtime"
        );
        let one = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(
            one.block_on(async { SyncMode::for_runtime() }),
            SyncMode::Flusher
        );
        for (threads, want) in [(1, SyncMode::Flusher), (2, SyncMode::Inline)] {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .build()
                .unwrap();
            assert_eq!(
                rt.block_on(async { SyncMode::for_runtime() }),
                want,
                "{threads} threads"
            );
        }
    }

    fn entry(term: u64, index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    #[tokio::test]
    async fn a_log_kept_in_rocksdb_is_moved_into_segment_files() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db")).unwrap();
        // A data dir from before the segment files: entries 1..=9 in the log column family,
        // 1..=3 purged.
        let cf = cf_handle(&db, cf::LOG).unwrap();
        for index in 1..=9 {
            db.put_cf(cf, u64_key(index), codec::encode(&entry(2, index)))
                .unwrap();
        }
        let purged = entry(2, 3).log_id;
        db.put_cf(
            cf_handle(&db, cf::RAFT_META).unwrap(),
            codec::LAST_PURGED,
            codec::encode(&purged),
        )
        .unwrap();

        let log_dir = dir.path().join("raft-log");
        let metrics = Arc::new(Metrics::new());
        let mut store =
            LogStore::open(db.clone(), &log_dir, SEGMENT_BYTES, metrics.clone()).unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(purged));
        assert_eq!(state.last_log_id, Some(entry(2, 9).log_id));
        let ids: Vec<u64> = store
            .try_get_log_entries(0..100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(ids, (4..=9).collect::<Vec<_>>());
        assert!(
            db.iterator_cf(cf, IteratorMode::Start).next().is_none(),
            "the column family is emptied"
        );
        drop(store);

        // Opening again finds them in the files only, once.
        let mut store = LogStore::open(db, &log_dir, SEGMENT_BYTES, metrics).unwrap();
        let entries = store.try_get_log_entries(4..=9).await.unwrap();
        assert_eq!(entries.len(), 6);
        assert_eq!(entries[5].log_id, entry(2, 9).log_id);
    }

    #[tokio::test]
    async fn the_commit_point_survives_a_reopen_without_touching_rocksdb() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db")).unwrap();
        let log_dir = dir.path().join("raft-log");
        let metrics = Arc::new(Metrics::new());
        let mut store =
            LogStore::open(db.clone(), &log_dir, SEGMENT_BYTES, metrics.clone()).unwrap();
        assert_eq!(store.read_committed().await.unwrap(), None);
        store
            .save_committed(Some(entry(3, 12).log_id))
            .await
            .unwrap();
        assert_eq!(
            db.get_cf(cf_handle(&db, cf::RAFT_META).unwrap(), codec::COMMITTED)
                .unwrap(),
            None,
            "a commit is not written to RocksDB"
        );
        drop(store);

        let mut store = LogStore::open(db, &log_dir, SEGMENT_BYTES, metrics).unwrap();
        assert_eq!(store.committed_index().load(Ordering::Relaxed), 12);
        assert_eq!(
            store.read_committed().await.unwrap(),
            Some(entry(3, 12).log_id)
        );
    }
}
