//! What goes into the replicated log (a [`Command`]) and what applying it returns
//! ([`ApplyOutput`]). These types are encoded with postcard into log entries, snapshots and
//! the deduplication table, so changing them changes the on-disk format.

use serde::{Deserialize, Serialize};

use super::Stat;

/// Identifies a client's write for exactly-once application (Raft thesis §6.3).
/// `client_id == 0` means the write is not deduplicated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteId {
    pub client_id: u64,
    pub seq: u64,
    /// Every reply with a smaller seq reached the client: the server may forget them.
    pub acked_below: u64,
}

/// One replicated write. `time_ms` is stamped by the leader when it proposes, so apply never
/// reads a clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub write_id: WriteId,
    pub time_ms: i64,
    pub op: Op,
}

/// One log entry: the commands the leader proposed together. Batching amortizes the per-entry
/// costs (Raft bookkeeping, log append, fsync, replication message, apply call) over every
/// write that arrived while earlier entries were in flight. Each command still gets its own
/// revision, in order, when applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub commands: Vec<Command>,
}

impl Command {
    /// Roughly the bytes this command takes in a log entry: enough to cap a batch's size.
    pub fn approx_size(&self) -> usize {
        const FIXED: usize = 32;
        let sub = |op: &SubOp| {
            FIXED
                + op.path().len()
                + match op {
                    SubOp::Create { data, .. } | SubOp::Set { data, .. } => data.len(),
                    SubOp::Delete { .. } | SubOp::Check { .. } => 0,
                }
        };
        FIXED
            + match &self.op {
                Op::Single(op) => sub(op),
                Op::Txn(ops) => ops.iter().map(sub).sum(),
                Op::LeaseExpire { ids } => ids.len() * 8,
                Op::Reap { nodes } => nodes.iter().map(|n| FIXED + n.path.len()).sum(),
                Op::Claim { parent, data, .. } => FIXED + parent.len() + data.len(),
                Op::LeaseGrant { .. } | Op::LeaseRevoke { .. } | Op::Compact { .. } => 0,
            }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// One operation on its own.
    Single(SubOp),
    /// All or nothing, under one revision.
    Txn(Vec<SubOp>),
    /// Grants a lease; `id == 0` lets the state machine pick one.
    LeaseGrant { id: u64, ttl_ms: u64, session: bool },
    /// Revokes a lease on its holder's request, deleting its ephemeral nodes.
    LeaseRevoke { id: u64 },
    /// Proposed by the leader when leases went unrefreshed for their TTL. Ids already gone
    /// are skipped.
    LeaseExpire { ids: Vec<u64> },
    /// Proposed by the leader: deletes container and TTL nodes that it saw due. Each is
    /// re-checked at apply and skipped if it changed since.
    Reap { nodes: Vec<ReapCandidate> },
    /// Forgets the events of revisions up to `revision` (clamped below this entry's own).
    Compact { revision: u64 },
    /// Joins a lock or election queue: creates the ephemeral sequential node
    /// `<parent>/claim-NNNNNNNNNN` owned by `lease`, unless `lease` already owns a node under
    /// `parent`, whose path and stat are then returned unchanged. Deciding this at apply makes
    /// a retried or concurrent claim of one lease never queue twice, with no read barrier.
    /// (Appended last: older log entries decode unchanged.)
    Claim {
        parent: String,
        lease: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReapCandidate {
    pub path: String,
    /// The node's modify revision when the leader judged it due (TTL nodes).
    pub modify_revision: u64,
}

/// The kind of node a create makes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CreateMode {
    #[default]
    Persistent,
    Ephemeral {
        lease: u64,
    },
    Container,
    Ttl {
        ttl_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubOp {
    Create {
        path: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        sequential: bool,
        mode: CreateMode,
    },
    Set {
        path: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        expected_version: Option<i32>,
    },
    Delete {
        path: String,
        expected_version: Option<i32>,
    },
    Check {
        path: String,
        expected_version: Option<i32>,
    },
}

impl SubOp {
    pub fn path(&self) -> &str {
        match self {
            SubOp::Create { path, .. }
            | SubOp::Set { path, .. }
            | SubOp::Delete { path, .. }
            | SubOp::Check { path, .. } => path,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SubOp::Create { .. } => "create",
            SubOp::Set { .. } => "set",
            SubOp::Delete { .. } => "delete",
            SubOp::Check { .. } => "check",
        }
    }
}

/// The result of one [`SubOp`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubReply {
    Created { path: String, stat: Stat },
    Set { stat: Stat },
    Deleted,
    Checked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Single(SubReply),
    Txn(Vec<SubReply>),
    LeaseGranted {
        id: u64,
        ttl_ms: u64,
    },
    /// Revoke, expire and reap: the nodes deleted, in deletion order.
    Deleted {
        paths: Vec<String>,
    },
    /// The compaction point after a compact.
    Compacted {
        revision: u64,
    },
}

/// Why a command changed nothing. Deterministic data: it is stored for deduplicated retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error("node {path} does not exist")]
    NoNode { path: String },
    #[error("parent of {path} does not exist: {parent}")]
    NoParent { path: String, parent: String },
    #[error("node {path} already exists")]
    NodeExists { path: String },
    #[error("bad version for {path}: expected {expected}, actual {actual}")]
    BadVersion {
        path: String,
        expected: i32,
        actual: i32,
    },
    #[error("node {path} is not empty: it has {children} children")]
    NotEmpty { path: String, children: u32 },
    #[error("lease {id} not found: never granted, revoked, or expired")]
    LeaseNotFound { id: u64 },
    #[error("lease {id} already exists")]
    LeaseExists { id: u64 },
    #[error("cannot create {path}: its parent {parent} is ephemeral, and ephemeral nodes cannot have children")]
    EphemeralParent { path: String, parent: String },
    #[error("cannot {op} the root node")]
    RootNode { op: String },
    #[error("sequence counter of {parent} overflowed")]
    SequenceOverflow { parent: String },
    #[error("write (client {client_id}, seq {seq}) was already acknowledged and forgotten (acked below {acked_below})")]
    StaleWrite {
        client_id: u64,
        seq: u64,
        acked_below: u64,
    },
    #[error("txn op {index} ({kind} {path}) failed: {cause}")]
    TxnOp {
        index: u32,
        kind: String,
        path: String,
        cause: Box<ApplyError>,
    },
}

/// What applying one command produced: its revision and the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyOutput {
    pub revision: u64,
    pub reply: Result<Reply, ApplyError>,
}

/// One change, as a watch will see it. A revision's events are stored together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub path: String,
    /// The node's stat after the change (before it, for deletions).
    pub stat: Stat,
    /// The node's data after the change; empty for deletions and children changes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// The node before the change (none for creations).
    pub prev: Option<Prev>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prev {
    pub stat: Stat,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Created,
    Deleted,
    DataChanged,
    ChildrenChanged,
}
