//! Snapshot format and the current-snapshot file. A snapshot is a point-in-time copy of the
//! state column families (znodes and deduplication records) read from a RocksDB snapshot, so
//! it is built while writes continue. The latest one is kept in `snapshot.bin` in the data
//! directory, written to a temporary file, synced and renamed into place.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::codec;
use super::StoreError;
use crate::raft::SnapshotMeta;

/// Raw RocksDB keys and values of one column family. (`ByteBuf`s encode as a length and the
/// bytes in one call; `Vec<u8>` would go through serde a byte at a time, to the same bytes.)
pub type RawPairs = Vec<(ByteBuf, ByteBuf)>;

/// The replicated state, as raw RocksDB keys and values (decoded only when loaded).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SnapshotData {
    pub nodes: RawPairs,
    pub clients: RawPairs,
    pub leases: RawPairs,
    /// The revision of the last command applied into this state.
    pub revision: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StoredSnapshot {
    pub meta: SnapshotMeta,
    /// postcard-encoded [`SnapshotData`], exactly the bytes sent to other members.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

pub struct SnapshotFile {
    path: PathBuf,
}

impl SnapshotFile {
    pub fn new(data_dir: &Path) -> Self {
        SnapshotFile {
            path: data_dir.join("snapshot.bin"),
        }
    }

    fn io_err(&self, source: std::io::Error) -> StoreError {
        StoreError::SnapshotFile {
            path: self.path.display().to_string(),
            source,
        }
    }

    pub fn load(&self) -> Result<Option<StoredSnapshot>, StoreError> {
        match fs::read(&self.path) {
            Ok(bytes) => Ok(Some(codec::decode("snapshot file", &bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err(e)),
        }
    }

    /// Replaces the file atomically and durably.
    pub fn save(&self, snapshot: &StoredSnapshot) -> Result<(), StoreError> {
        let tmp = self.path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&codec::encode(snapshot))?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| self.io_err(e))
    }
}
