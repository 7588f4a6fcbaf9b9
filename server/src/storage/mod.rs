//! Storage. The Raft log's entries live in segment files ([`log_file`], behind
//! [`log_store`]); everything else lives in one RocksDB database with several column families:
//! the Raft metadata (vote, commit and purge points), written through RocksDB's WAL, and the
//! state machine ([`state_machine`]), written without it and made durable by flushes. The
//! database flushes all column families together (atomic flush), so the tables always hold
//! the state machine as of one applied entry.

pub mod codec;
pub mod commit_point;
pub mod events;
pub mod log_file;
pub mod log_store;
pub mod snapshot;
pub mod state_machine;
pub mod table_writer;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, Options, DB};

pub use log_store::LogStore;
pub use state_machine::{AppliedState, StateMachineStore};

/// Column families. Names are part of the on-disk format.
pub mod cf {
    /// Raft log entries by index, in data dirs written before the segment files; moved out
    /// of it on open (`log_store::move_rocksdb_log`).
    pub const LOG: &str = "log";
    /// Vote, last purged log id, and a floor under the commit point (`commit_point`).
    pub const RAFT_META: &str = "raft_meta";
    /// Znodes by path.
    pub const NODES: &str = "nodes";
    /// Deduplication records by client id.
    pub const CLIENTS: &str = "clients";
    /// Leases and sessions by id.
    pub const LEASES: &str = "leases";
    /// Events by revision, kept until compaction.
    pub const EVENTS: &str = "events";
    /// Last applied log id, membership, compaction point.
    pub const SM_META: &str = "sm_meta";

    pub const ALL: [&str; 7] = [LOG, RAFT_META, NODES, CLIENTS, LEASES, EVENTS, SM_META];

    /// Read only by full scans (on open and for snapshots), never by key or range.
    pub const READ_ONLY_IN_BULK: [&str; 3] = [NODES, CLIENTS, LEASES];
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("column family {0} is missing")]
    MissingColumnFamily(&'static str),
    #[error("corrupt {what}: {source}")]
    Decode {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("starting a storage thread: {0}")]
    Thread(String),
    #[error("writing the state machine's tables: {0}")]
    TableWrite(String),
    #[error(transparent)]
    LogFile(#[from] log_file::LogFileError),
    #[error(transparent)]
    CommitPoint(#[from] commit_point::CommitPointError),
    #[error("snapshot file {path}: {source}")]
    SnapshotFile {
        path: String,
        source: std::io::Error,
    },
}

/// Opens (or creates) the database with every column family.
pub fn open_db(dir: &Path) -> Result<Arc<DB>, StoreError> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // Keep the WAL (for the Raft metadata): recovery replays it to the last complete batch.
    opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
    // The state machine's batches skip the WAL: its column families must reach the tables
    // together, as of the same batch, or a crash could leave them at different entries.
    opts.set_atomic_flush(true);
    // Nothing here is synced per write (the Raft log is what is synced): write the WAL and
    // the tables back a megabyte at a time instead of in bursts that a log fsync would wait
    // behind (seen as 20-50 ms stalls every few seconds at 64 clients).
    opts.set_wal_bytes_per_sync(1 << 20);
    opts.set_bytes_per_sync(1 << 20);
    // Vector memtables (below) take no concurrent inserts; there is one writer anyway.
    opts.set_allow_concurrent_memtable_write(false);
    let cfs = cf::ALL.map(|name| {
        let mut cf_opts = Options::default();
        cf_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        if cf::READ_ONLY_IN_BULK.contains(&name) {
            // These hold what the in-memory state persists: RocksDB reads them only whole
            // (on open and into snapshots), never by key. An unsorted memtable makes each
            // write an append instead of a skiplist insert, which cost a few cache misses per
            // key per level (about a tenth of a 3-member cluster's CPU at 64 writing clients);
            // it is sorted once, when flushed or iterated.
            cf_opts.set_memtable_factory(rocksdb::MemtableFactory::Vector);
        }
        ColumnFamilyDescriptor::new(name, cf_opts)
    });
    Ok(Arc::new(DB::open_cf_descriptors(&opts, dir, cfs)?))
}

/// A value of the Raft metadata column family ([`cf::RAFT_META`]).
pub(crate) fn read_meta<T: serde::de::DeserializeOwned>(
    db: &DB,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    let cf = cf_handle(db, cf::RAFT_META)?;
    match db.get_pinned_cf(cf, key)? {
        Some(bytes) => Ok(Some(codec::decode("raft meta", &bytes)?)),
        None => Ok(None),
    }
}

/// Writes a batch through RocksDB's WAL and syncs it.
pub(crate) fn write_batch_synced(db: &DB, batch: rocksdb::WriteBatch) -> Result<(), StoreError> {
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    db.write_opt(batch, &opts)?;
    Ok(())
}

/// Flushes every column family's memtable to tables (one atomic flush) and waits: after it,
/// every state-machine batch written so far is durable.
pub(crate) fn flush_tables(db: &DB) -> Result<(), StoreError> {
    let cfs = cf::ALL
        .iter()
        .map(|name| cf_handle(db, name))
        .collect::<Result<Vec<_>, _>>()?;
    let mut opts = rocksdb::FlushOptions::default();
    opts.set_wait(true);
    db.flush_cfs_opt(&cfs, &opts)?;
    Ok(())
}

pub(crate) fn cf_handle<'a>(
    db: &'a DB,
    name: &'static str,
) -> Result<&'a ColumnFamily, StoreError> {
    db.cf_handle(name)
        .ok_or(StoreError::MissingColumnFamily(name))
}

/// Errors at the openraft boundary must be openraft's `StorageError`.
pub(crate) fn to_storage_error(
    subject: openraft::ErrorSubject<crate::raft::NodeId>,
    verb: openraft::ErrorVerb,
    err: impl std::error::Error + 'static,
) -> crate::raft::StorageError {
    openraft::StorageIOError::new(subject, verb, openraft::AnyError::new(&err)).into()
}
