//! The commit point openraft stores before each apply, kept in a small file of its own and
//! overwritten in place: one `pwrite` of a fixed-size record, not synced.
//!
//! Why not RocksDB: a put through its WAL runs RocksDB's write path (and waits behind the
//! table writer's batches in its write queue) on Raft's core, once per commit, between the
//! log's fsync and the client's reply. A write into the page cache that never changes the
//! file's size costs a syscall, and leaves nothing for the log's fdatasync to commit.
//!
//! Why store it at all, unsynced: after a process crash the page cache still holds it, so a
//! member applies again everything it had made visible and its local reads never go back in
//! time across a restart. After a power loss it may be older or torn (the CRC tells); openraft
//! then re-learns the commit point from the leader. One thing must survive a power loss: a
//! commit point at least as high as the snapshot file, or openraft refuses to start. The
//! snapshot build stores that floor in RocksDB, synced, before it saves the file
//! ([`store_floor`]); on open the higher of the two is the commit point.
//!
//! Record (64 bytes at offset 0): CRC-32 of the rest (u32 LE), payload length (u16 LE), the
//! postcard-encoded `Option<LogId>`, zeros.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rocksdb::{WriteBatch, DB};

use super::{cf, cf_handle, codec, read_meta, write_batch_synced, StoreError};
use crate::raft::LogId;

const RECORD: usize = 64;
const HEADER: usize = 6;
const FILE_NAME: &str = "commit-point";

#[derive(Debug, thiserror::Error)]
#[error("commit point file {path}: {source}")]
pub struct CommitPointError {
    path: PathBuf,
    source: io::Error,
}

pub struct CommitPointFile {
    path: PathBuf,
    file: File,
}

impl CommitPointFile {
    /// Opens `<dir>/commit-point`, creating it at its full size (so later writes never change
    /// it) if missing.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(FILE_NAME);
        let open = || -> io::Result<File> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            if file.metadata()?.len() < RECORD as u64 {
                file.write_all_at(&[0; RECORD], 0)?;
                file.sync_all()?;
            }
            Ok(file)
        };
        let file = open().map_err(io_err(&path))?;
        Ok(CommitPointFile { path, file })
    }

    /// Overwrites the record; durable against a process crash, not a power loss.
    pub fn write(&self, point: Option<LogId>) -> Result<(), StoreError> {
        self.file
            .write_all_at(&encode_record(point), 0)
            .map_err(io_err(&self.path))?;
        Ok(())
    }

    /// The stored commit point; None if there is none or the record is torn.
    pub fn read(&self) -> Result<Option<LogId>, StoreError> {
        let mut record = [0; RECORD];
        self.file
            .read_exact_at(&mut record, 0)
            .map_err(io_err(&self.path))?;
        if record == [0; RECORD] {
            // Created, never written.
            return Ok(None);
        }
        Ok(decode_record(&record).unwrap_or_else(|| {
            tracing::warn!(path = %self.path.display(), "commit point record is torn; ignoring it");
            None
        }))
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CommitPointError + '_ {
    move |source| CommitPointError {
        path: path.to_owned(),
        source,
    }
}

fn encode_record(point: Option<LogId>) -> [u8; RECORD] {
    let payload = codec::encode(&point);
    // Three varint u64s and a tag: at most 31 bytes.
    assert!(
        payload.len() <= RECORD - HEADER,
        "a commit point encodes in {} bytes",
        payload.len()
    );
    let mut record = [0; RECORD];
    record[4..6].copy_from_slice(&(payload.len() as u16).to_le_bytes());
    record[HEADER..HEADER + payload.len()].copy_from_slice(&payload);
    let crc = crc32fast::hash(&record[4..]);
    record[..4].copy_from_slice(&crc.to_le_bytes());
    record
}

/// The record's commit point, or None if it is torn.
fn decode_record(record: &[u8; RECORD]) -> Option<Option<LogId>> {
    let crc = u32::from_le_bytes(record[..4].try_into().ok()?);
    if crc != crc32fast::hash(&record[4..]) {
        return None;
    }
    let len = u16::from_le_bytes(record[4..6].try_into().ok()?) as usize;
    let payload = record.get(HEADER..HEADER + len)?;
    codec::decode("commit point", payload).ok()
}

/// The commit point to start from: the higher of the file's and the floor in RocksDB.
pub fn load(file: &CommitPointFile, db: &DB) -> Result<Option<LogId>, StoreError> {
    let floor = read_meta::<Option<LogId>>(db, codec::COMMITTED)?.flatten();
    Ok(file.read()?.max(floor))
}

/// Stores `point` in RocksDB as a floor under the commit point, synced: a snapshot build calls
/// this with its own index before saving the snapshot file (see the module comment).
pub fn store_floor(db: &DB, point: Option<LogId>) -> Result<(), StoreError> {
    let mut batch = WriteBatch::default();
    batch.put_cf(
        cf_handle(db, cf::RAFT_META)?,
        codec::COMMITTED,
        codec::encode(&point),
    );
    write_batch_synced(db, batch)
}

#[cfg(test)]
mod tests {
    use openraft::CommittedLeaderId;

    use super::*;
    use crate::storage::open_db;

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    #[test]
    fn the_last_write_is_read_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let file = CommitPointFile::open(dir.path()).unwrap();
        assert_eq!(file.read().unwrap(), None);
        file.write(Some(log_id(2, 7))).unwrap();
        file.write(Some(log_id(3, u64::MAX))).unwrap();
        drop(file);
        let file = CommitPointFile::open(dir.path()).unwrap();
        assert_eq!(file.read().unwrap(), Some(log_id(3, u64::MAX)));
        assert_eq!(
            std::fs::metadata(dir.path().join(FILE_NAME)).unwrap().len(),
            RECORD as u64
        );
    }

    #[test]
    fn a_torn_record_reads_as_none_and_the_floor_takes_over() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db")).unwrap();
        let file = CommitPointFile::open(dir.path()).unwrap();
        file.write(Some(log_id(1, 40))).unwrap();
        store_floor(&db, Some(log_id(1, 30))).unwrap();
        assert_eq!(load(&file, &db).unwrap(), Some(log_id(1, 40)));

        // A power loss in the middle of a write: the record's tail is stale.
        let mut record = encode_record(Some(log_id(1, 50)));
        record[RECORD - 1] ^= 0xFF;
        file.file.write_all_at(&record, 0).unwrap();
        assert_eq!(file.read().unwrap(), None);
        assert_eq!(load(&file, &db).unwrap(), Some(log_id(1, 30)));
    }

    #[test]
    fn the_floor_wins_when_it_is_higher() {
        // A data dir written before this file existed keeps its commit point in RocksDB.
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(&dir.path().join("db")).unwrap();
        store_floor(&db, Some(log_id(4, 90))).unwrap();
        let file = CommitPointFile::open(dir.path()).unwrap();
        assert_eq!(load(&file, &db).unwrap(), Some(log_id(4, 90)));
        file.write(Some(log_id(4, 91))).unwrap();
        assert_eq!(load(&file, &db).unwrap(), Some(log_id(4, 91)));
    }
}
