//! Keys and values as bytes. Log indexes and revisions are big-endian so RocksDB's bytewise
//! order is numeric order; values are postcard.

use serde::{de::DeserializeOwned, Serialize};

use super::StoreError;

pub fn u64_key(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

pub fn key_u64(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own types into a Vec cannot fail: postcard only fails on I/O or on
    // types serde cannot describe (such as maps with unknown length), which we do not use.
    postcard::to_allocvec(value).expect("postcard encoding into a Vec")
}

pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { what, source })
}

/// Meta keys.
pub const VOTE: &[u8] = b"vote";
pub const LAST_PURGED: &[u8] = b"last_purged";
pub const COMMITTED: &[u8] = b"committed";
pub const LAST_APPLIED: &[u8] = b"last_applied";
pub const MEMBERSHIP: &[u8] = b"membership";
pub const COMPACTED: &[u8] = b"compacted_revision";
/// The revision of the last applied command.
pub const REVISION: &[u8] = b"revision";

/// An end key above every key we write (paths are UTF-8, which never holds 0xFF; other keys
/// are at most 8 bytes), for deleting a whole column family with one range.
pub const KEY_MAX: [u8; 16] = [0xFF; 16];

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::{decode, encode};
    use crate::state::{Stat, StoredNode};
    use crate::storage::snapshot::SnapshotData;

    /// `StoredNode` as it was before its data was marked `serde_bytes`.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct StoredNodeAsSeq {
        stat: Stat,
        data: Vec<u8>,
    }

    #[test]
    fn byte_fields_encode_as_they_did_as_sequences() {
        // Data dirs, snapshots and log entries written before `serde_bytes` must still decode:
        // postcard writes a byte string and a sequence of u8 the same way (length, then bytes).
        let stat = Stat {
            version: 3,
            data_length: 300,
            ..Stat::default()
        };
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let old = StoredNodeAsSeq {
            stat,
            data: data.clone(),
        };
        let new = StoredNode { stat, data };
        assert_eq!(encode(&old), encode(&new));
        assert_eq!(
            decode::<StoredNode>("znode", &encode(&old)).unwrap(),
            new,
            "old bytes decode as the new type"
        );

        type OldPairs = Vec<(Vec<u8>, Vec<u8>)>;
        let pairs: OldPairs = vec![(b"/a".to_vec(), vec![1, 2, 3]), (b"/b".to_vec(), vec![])];
        let old_snapshot = (pairs.clone(), pairs.clone(), OldPairs::new(), 42u64);
        let decoded: SnapshotData = decode("snapshot", &encode(&old_snapshot)).unwrap();
        assert_eq!(decoded.revision, 42);
        assert_eq!(decoded.nodes.len(), 2);
        assert_eq!(decoded.nodes[0].1.as_slice(), [1, 2, 3]);
        assert_eq!(encode(&decoded), encode(&old_snapshot));
    }
}
