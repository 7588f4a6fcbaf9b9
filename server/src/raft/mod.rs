//! openraft's type configuration for Kord and the peer network. Together with `storage`, the
//! only place that names openraft types; other modules use the aliases below.

pub mod link;
pub mod network;
pub mod peer_service;
pub mod peers;
pub mod snapshot_trigger;
pub mod split_vote;

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{ApplyOutput, Proposal};

pub type NodeId = u64;

/// What every member knows about another: where to reach it, what to call it, and whether it
/// is an observer. Stored in the membership entries of the log (and snapshots), so every member
/// reports the same roles.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KordNode {
    /// Raft traffic and forwarding (the peer gRPC service).
    pub peer_addr: String,
    /// The client gRPC API; empty when not known (a member bootstrapped by peer address only).
    pub client_addr: String,
    /// A human name (e.g. the pod name); empty when none was given.
    pub name: String,
    /// A learner that is never promoted to voter (ZooKeeper's observer).
    pub observer: bool,
}

impl fmt::Display for KordNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer={} client={}", self.peer_addr, self.client_addr)?;
        if !self.name.is_empty() {
            write!(f, " name={}", self.name)?;
        }
        if self.observer {
            write!(f, " observer")?;
        }
        Ok(())
    }
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Proposal,
        R = Vec<ApplyOutput>,
        NodeId = NodeId,
        Node = KordNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type StoredMembership = openraft::StoredMembership<NodeId, KordNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, KordNode>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, KordNode>;
pub use openraft::{ServerState, Vote};
