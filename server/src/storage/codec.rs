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
