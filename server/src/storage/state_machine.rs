//! The state machine: applies committed entries to the in-memory [`State`] in batches and
//! persists each batch (changed znodes, deduplication records, events, last applied log id,
//! revision and membership) in one RocksDB write batch, so a crash never applies an entry
//! twice or skips one. The batches are written in apply order by the table writer
//! ([`super::table_writer`]), off the apply. Also builds and installs snapshots.
//!
//! Revisions: each log entry carries a batch of commands ([`Proposal`]); every command gets
//! the next revision as it is applied, so revisions are dense, strictly increasing and the
//! same on every member (they are a pure function of the log).

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, Snapshot,
};
use rocksdb::{IteratorMode, WriteBatch, WriteOptions, DB};
use serde_bytes::ByteBuf;

use super::codec::{self, u64_key};
use super::commit_point;
use super::snapshot::{RawPairs, SnapshotData, SnapshotFile, StoredSnapshot};
use super::table_writer::{TableWriter, Written};
use super::{cf, cf_handle, to_storage_error, StoreError};
use crate::metrics::Metrics;
use crate::raft::{Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::state::{
    ApplyOutput, ClientRecord, Op, Proposal, Reply, State, StoredLease, StoredNode,
};
use crate::watch::hub::{RevisionEvents, WatchHub};

/// What reads see: the state as of `last_applied`.
#[derive(Debug)]
pub struct AppliedState {
    pub state: State,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    /// Events of revisions at or below this one are gone.
    pub compacted_revision: u64,
    /// The revision of the last applied command (0 before the first).
    pub revision: u64,
}

impl AppliedState {
    pub fn applied_index(&self) -> u64 {
        self.last_applied.map_or(0, |l| l.index)
    }
}

/// Shared, read-mostly handle on the applied state. Locks are held only for in-memory work.
#[derive(Clone)]
pub struct SharedState(Arc<RwLock<AppliedState>>);

impl SharedState {
    pub fn read(&self) -> RwLockReadGuard<'_, AppliedState> {
        // A poisoned lock means apply panicked mid-batch: the process cannot continue safely.
        self.0.read().expect("state lock poisoned")
    }
    fn write(&self) -> RwLockWriteGuard<'_, AppliedState> {
        self.0.write().expect("state lock poisoned")
    }
}

pub struct StateMachineStore {
    db: Arc<DB>,
    shared: SharedState,
    snapshot_file: Arc<SnapshotFile>,
    metrics: Arc<Metrics>,
    snapshot_builds: Arc<AtomicU64>,
    hub: WatchHub,
    /// Writes each apply's batch to the tables, off the apply (`table_writer`).
    tables: Arc<TableWriter>,
}

fn sm_err(verb: ErrorVerb) -> impl FnOnce(StoreError) -> StorageError {
    move |e| to_storage_error(ErrorSubject::StateMachine, verb, e)
}

impl StateMachineStore {
    /// Loads the applied state from RocksDB.
    pub fn open(
        db: Arc<DB>,
        data_dir: &std::path::Path,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StoreError> {
        let applied = load_applied(&db)?;
        // Entries after this one are applied again from the Raft log (see `apply_batch`).
        tracing::info!(
            applied_index = applied.last_applied.map_or(0, |l| l.index),
            revision = applied.revision,
            "loaded the state machine"
        );
        let hub = WatchHub::new(applied.revision);
        let tables = {
            let db = db.clone();
            let mut opts = WriteOptions::default();
            opts.disable_wal(true);
            let write = move |batch| db.write_opt(batch, &opts).map_err(|e| e.to_string());
            Arc::new(TableWriter::start(write, applied.revision)?)
        };
        Ok(StateMachineStore {
            tables,
            db,
            shared: SharedState(Arc::new(RwLock::new(applied))),
            snapshot_file: Arc::new(SnapshotFile::new(data_dir)),
            metrics,
            snapshot_builds: Arc::new(AtomicU64::new(0)),
            hub,
        })
    }

    pub fn shared(&self) -> SharedState {
        self.shared.clone()
    }

    /// Where watchers subscribe to applied events.
    pub fn hub(&self) -> WatchHub {
        self.hub.clone()
    }

    /// How far the tables are written: readers of the event history wait on it.
    pub fn written(&self) -> Written {
        self.tables.written()
    }

    fn apply_batch(&self, entries: Vec<Entry>) -> Result<Vec<Vec<ApplyOutput>>, StoreError> {
        let events_cf = cf_handle(&self.db, cf::EVENTS)?;
        let nodes_cf = cf_handle(&self.db, cf::NODES)?;
        let clients_cf = cf_handle(&self.db, cf::CLIENTS)?;
        let leases_cf = cf_handle(&self.db, cf::LEASES)?;
        let meta_cf = cf_handle(&self.db, cf::SM_META)?;
        let mut batch = WriteBatch::default();
        let mut outputs = Vec::with_capacity(entries.len());
        let mut published = Vec::new();
        let mut guard = self.shared.write();
        let applied = &mut *guard;
        let mut membership_changed = false;
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => outputs.push(Vec::new()),
                EntryPayload::Normal(Proposal { commands }) => {
                    let mut replies = Vec::with_capacity(commands.len());
                    for cmd in &commands {
                        applied.revision += 1;
                        let revision = applied.revision;
                        if let Op::Compact { revision: upto } = cmd.op {
                            // Never past the command itself, never backwards.
                            let point = upto
                                .min(revision.saturating_sub(1))
                                .max(applied.compacted_revision);
                            batch.delete_range_cf(events_cf, u64_key(0), u64_key(point + 1));
                            batch.put_cf(meta_cf, codec::COMPACTED, codec::encode(&point));
                            applied.compacted_revision = point;
                            replies.push(ApplyOutput {
                                revision,
                                reply: Ok(Reply::Compacted { revision: point }),
                            });
                            continue;
                        }
                        let (out, events) = applied.state.apply(revision, cmd);
                        if !events.is_empty() {
                            batch.put_cf(events_cf, u64_key(revision), codec::encode(&events));
                            published.push(RevisionEvents { revision, events });
                        }
                        replies.push(out);
                    }
                    outputs.push(replies);
                }
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    membership_changed = true;
                    outputs.push(Vec::new());
                }
            }
        }
        let dirty = applied.state.take_dirty();
        for path in &dirty.nodes {
            match applied.state.stored_node(path) {
                Some(node) => batch.put_cf(nodes_cf, path.as_bytes(), codec::encode(&node)),
                None => batch.delete_cf(nodes_cf, path.as_bytes()),
            }
        }
        for id in &dirty.clients {
            match applied.state.client(*id) {
                Some(record) => batch.put_cf(clients_cf, u64_key(*id), codec::encode(record)),
                None => batch.delete_cf(clients_cf, u64_key(*id)),
            }
        }
        for id in &dirty.leases {
            match applied.state.stored_lease(*id) {
                Some(lease) => batch.put_cf(leases_cf, u64_key(*id), codec::encode(&lease)),
                None => batch.delete_cf(leases_cf, u64_key(*id)),
            }
        }
        batch.put_cf(
            meta_cf,
            codec::LAST_APPLIED,
            codec::encode(&applied.last_applied),
        );
        batch.put_cf(meta_cf, codec::REVISION, codec::encode(&applied.revision));
        if membership_changed {
            batch.put_cf(
                meta_cf,
                codec::MEMBERSHIP,
                codec::encode(&applied.membership),
            );
        }
        // Without RocksDB's WAL, as etcd commits its backend: the committed entries are durable
        // in the Raft log, and a crash that loses this batch (still in a memtable) makes
        // openraft apply them again from there. A purged segment is deleted only after a flush
        // made this batch durable (`log_store`). The WAL would cost a write per batch and, on
        // the same disk, lengthen every log fsync (BENCHMARKS.md, "The state machine without
        // RocksDB's WAL"). For the same reason the batch is written on the table writer's
        // thread: when it lands does not matter, only that it lands whole and in order.
        let revision = applied.revision;
        self.tables.write(batch, revision)?;
        drop(guard);
        self.hub.publish(published, revision);
        Ok(outputs)
    }

    fn install(&self, meta: &SnapshotMeta, bytes: Vec<u8>) -> Result<(), StoreError> {
        let data: SnapshotData = codec::decode("snapshot", &bytes)?;
        // Batches still queued belong to the state this replaces: they land first.
        self.tables.drain()?;
        let mut batch = WriteBatch::default();
        for name in [cf::NODES, cf::CLIENTS, cf::LEASES, cf::EVENTS, cf::SM_META] {
            batch.delete_range_cf(
                cf_handle(&self.db, name)?,
                b"".as_slice(),
                codec::KEY_MAX.as_slice(),
            );
        }
        let nodes_cf = cf_handle(&self.db, cf::NODES)?;
        for (k, v) in &data.nodes {
            batch.put_cf(nodes_cf, k, v);
        }
        let clients_cf = cf_handle(&self.db, cf::CLIENTS)?;
        for (k, v) in &data.clients {
            batch.put_cf(clients_cf, k, v);
        }
        let leases_cf = cf_handle(&self.db, cf::LEASES)?;
        for (k, v) in &data.leases {
            batch.put_cf(leases_cf, k, v);
        }
        let meta_cf = cf_handle(&self.db, cf::SM_META)?;
        // The snapshot carries no event history: everything up to its revision is compacted.
        let compacted = data.revision;
        batch.put_cf(meta_cf, codec::REVISION, codec::encode(&data.revision));
        batch.put_cf(
            meta_cf,
            codec::LAST_APPLIED,
            codec::encode(&meta.last_log_id),
        );
        batch.put_cf(
            meta_cf,
            codec::MEMBERSHIP,
            codec::encode(&meta.last_membership),
        );
        batch.put_cf(meta_cf, codec::COMPACTED, codec::encode(&compacted));
        let mut opts = WriteOptions::default();
        opts.set_sync(true);
        self.db.write_opt(batch, &opts)?;

        let state = decode_state(&data)?;
        *self.shared.write() = AppliedState {
            state,
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            compacted_revision: compacted,
            revision: data.revision,
        };
        self.tables.reset(data.revision);
        self.hub.reset(compacted);
        self.snapshot_file.save(&StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        })?;
        Ok(())
    }
}

fn decode_state(data: &SnapshotData) -> Result<State, StoreError> {
    let nodes = data
        .nodes
        .iter()
        .map(|(k, v)| {
            let path = String::from_utf8_lossy(k).into_owned();
            Ok((path, codec::decode::<StoredNode>("znode", v)?))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let clients = data
        .clients
        .iter()
        .filter_map(|(k, v)| codec::key_u64(k).map(|id| (id, v)))
        .map(|(id, v)| Ok((id, codec::decode::<ClientRecord>("client record", v)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let leases = data
        .leases
        .iter()
        .filter_map(|(k, v)| codec::key_u64(k).map(|id| (id, v)))
        .map(|(id, v)| Ok((id, codec::decode::<StoredLease>("lease", v)?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(State::load(nodes, clients, leases))
}

/// Reads the state column families through `scan` (over the live DB or a DB snapshot).
fn read_state_cfs(
    db: &DB,
    mut scan: impl FnMut(&rocksdb::ColumnFamily) -> Result<RawPairs, rocksdb::Error>,
) -> Result<SnapshotData, StoreError> {
    Ok(SnapshotData {
        nodes: scan(cf_handle(db, cf::NODES)?)?,
        clients: scan(cf_handle(db, cf::CLIENTS)?)?,
        leases: scan(cf_handle(db, cf::LEASES)?)?,
        revision: 0,
    })
}

fn collect_kv<I, K, V>(iter: I) -> Result<RawPairs, rocksdb::Error>
where
    I: Iterator<Item = Result<(K, V), rocksdb::Error>>,
    K: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    iter.map(|item| item.map(|(k, v)| (ByteBuf::from(k.as_ref()), ByteBuf::from(v.as_ref()))))
        .collect()
}

fn get_meta<T: serde::de::DeserializeOwned>(
    get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, rocksdb::Error>,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    match get(key)? {
        Some(bytes) => Ok(Some(codec::decode("state machine meta", &bytes)?)),
        None => Ok(None),
    }
}

fn load_applied(db: &DB) -> Result<AppliedState, StoreError> {
    let meta_cf = cf_handle(db, cf::SM_META)?;
    let get = |k: &[u8]| db.get_cf(meta_cf, k);
    let data = read_state_cfs(db, |cf| collect_kv(db.iterator_cf(cf, IteratorMode::Start)))?;
    Ok(AppliedState {
        revision: get_meta(get, codec::REVISION)?.unwrap_or(0),
        state: decode_state(&data)?,
        last_applied: get_meta::<Option<LogId>>(get, codec::LAST_APPLIED)?.flatten(),
        membership: get_meta(get, codec::MEMBERSHIP)?.unwrap_or_default(),
        compacted_revision: get_meta(get, codec::COMPACTED)?.unwrap_or(0),
    })
}

/// Builds a snapshot from a RocksDB snapshot, concurrently with apply.
#[derive(Clone)]
pub struct SnapshotBuilder {
    db: Arc<DB>,
    tables: Arc<TableWriter>,
    snapshot_file: Arc<SnapshotFile>,
    metrics: Arc<Metrics>,
    builds: Arc<AtomicU64>,
}

impl SnapshotBuilder {
    fn build(&self) -> Result<StoredSnapshot, StoreError> {
        // Everything applied so far, not only what the table writer got to.
        self.tables.drain()?;
        let snap = self.db.snapshot();
        let meta_cf = cf_handle(&self.db, cf::SM_META)?;
        let get = |k: &[u8]| snap.get_cf(meta_cf, k);
        let last_applied: Option<LogId> =
            get_meta::<Option<LogId>>(get, codec::LAST_APPLIED)?.flatten();
        let membership: StoredMembership = get_meta(get, codec::MEMBERSHIP)?.unwrap_or_default();
        let mut data = read_state_cfs(&self.db, |cf| {
            collect_kv(snap.iterator_cf(cf, IteratorMode::Start))
        })?;
        data.revision = get_meta(get, codec::REVISION)?.unwrap_or(0);
        let n = self.builds.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, n),
            None => format!("none-{n}"),
        };
        let stored = StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: last_applied,
                last_membership: membership,
                snapshot_id,
            },
            data: codec::encode(&data),
        };
        // On restart openraft requires the snapshot to be at or below the commit point, which
        // it takes as the stored commit point or, if higher, the state machine's applied one.
        // The snapshot file is synced but the state machine's tables may be older (they skip
        // the WAL), and the commit point is not synced: store the snapshot's own index as a
        // floor under it first, synced, so that a power loss cannot leave a snapshot above
        // every commit point on disk (the member would refuse to start).
        commit_point::store_floor(&self.db, last_applied)?;
        self.snapshot_file.save(&stored)?;
        self.metrics.snapshots.inc();
        self.metrics.snapshot_bytes.set(stored.data.len() as i64);
        Ok(stored)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Reading, encoding and syncing the whole state takes time in proportion to its size:
        // off the runtime's threads, which serve requests meanwhile.
        let builder = self.clone();
        let stored = tokio::task::spawn_blocking(move || builder.build())
            .await
            .unwrap_or_else(|e| Err(StoreError::Thread(format!("building a snapshot: {e}"))))
            .map_err(sm_err(ErrorVerb::Write))?;
        tracing::info!(snapshot = %stored.meta.snapshot_id, bytes = stored.data.len(), "built snapshot");
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied = self.shared.read();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<ApplyOutput>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.apply_batch(entries.into_iter().collect())
            .map_err(sm_err(ErrorVerb::Write))
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            tables: self.tables.clone(),
            snapshot_file: self.snapshot_file.clone(),
            metrics: self.metrics.clone(),
            builds: self.snapshot_builds.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        tracing::info!(snapshot = %meta.snapshot_id, "installing snapshot");
        self.install(meta, snapshot.into_inner()).map_err(|e| {
            to_storage_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                e,
            )
        })
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let stored = self.snapshot_file.load().map_err(sm_err(ErrorVerb::Read))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
