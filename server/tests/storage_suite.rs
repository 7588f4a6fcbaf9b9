//! openraft's storage test suite against Kord's log store (segment files plus RocksDB) and state
//! machine.

use std::sync::Arc;

use kord_server::metrics::Metrics;
use kord_server::raft::{StorageError, TypeConfig};
use kord_server::storage::log_store::SyncMode;
use kord_server::storage::{open_db, LogStore, StateMachineStore};
use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

struct RocksBuilder(SyncMode);

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RocksBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new().expect("temp dir");
        let metrics = Arc::new(Metrics::new());
        let db = open_db(&dir.path().join("db")).expect("open rocksdb");
        // 4 KiB segments, so the suite's appends, truncations and purges cross segment files.
        let log = LogStore::open_syncing(
            db.clone(),
            &dir.path().join("raft-log"),
            4096,
            metrics.clone(),
            self.0,
        )
        .expect("log store");
        let sm = StateMachineStore::open(db, dir.path(), metrics).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_syncing_inline() {
    if let Err(e) = Suite::test_all(RocksBuilder(SyncMode::Inline)) {
        panic!("openraft storage suite failed: {e}");
    }
}

#[test]
fn openraft_storage_suite_syncing_on_a_flusher_thread() {
    if let Err(e) = Suite::test_all(RocksBuilder(SyncMode::Flusher)) {
        panic!("openraft storage suite failed: {e}");
    }
}
