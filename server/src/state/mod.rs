//! The replicated state, pure and in memory: the znode tree and the deduplication table.
//! [`State::apply`] turns one committed [`Command`] into a reply and the events it caused.
//! It reads no clock, draws no random number and iterates only ordered maps, so every member
//! that applies the same log reaches the same state. Storage persists what apply marks dirty.

pub mod command;
mod lease;
pub mod path;

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use command::{
    ApplyError, ApplyOutput, Command, CreateMode, Event, EventKind, Op, Prev, Proposal,
    ReapCandidate, Reply, SubOp, SubReply, WriteId,
};
pub use lease::{Lease, StoredLease};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    #[default]
    Persistent,
    Ephemeral,
    Container,
    Ttl,
}

/// ZooKeeper's Stat, with revisions (log indexes) in place of zxids.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stat {
    pub create_revision: u64,
    pub modify_revision: u64,
    pub children_revision: u64,
    pub ctime_ms: i64,
    pub mtime_ms: i64,
    pub version: i32,
    pub cversion: i32,
    pub ephemeral_owner: u64,
    pub data_length: u32,
    pub num_children: u32,
    pub kind: NodeKind,
    /// TTL nodes only.
    pub ttl_ms: u64,
}

/// A znode as stored: its stat and data. Children are kept in memory only and rebuilt on load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredNode {
    pub stat: Stat,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, Default)]
pub struct Node {
    pub stat: Stat,
    pub data: Vec<u8>,
    pub children: BTreeSet<String>,
}

/// Per-client memory of recent replies, so a retried write returns its first result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientRecord {
    /// Replies with a smaller seq were acknowledged by the client and forgotten.
    pub acked_below: u64,
    pub replies: BTreeMap<u64, ApplyOutput>,
    /// Revision of the client's last write: the least recently active client is evicted first.
    pub last_revision: u64,
}

/// Bounds on the deduplication table; part of the replicated semantics, so not configurable.
pub const MAX_CLIENTS: usize = 100_000;
pub const MAX_REPLIES_PER_CLIENT: usize = 1024;

/// Keys that changed since the last [`State::take_dirty`], for storage to persist.
#[derive(Debug, Default)]
pub struct Dirty {
    pub nodes: BTreeSet<String>,
    pub clients: BTreeSet<u64>,
    pub leases: BTreeSet<u64>,
}

#[derive(Debug)]
pub struct State {
    nodes: BTreeMap<String, Node>,
    clients: BTreeMap<u64, ClientRecord>,
    /// (last_revision, client_id), to evict the least recently active client deterministically.
    clients_by_activity: BTreeSet<(u64, u64)>,
    leases: BTreeMap<u64, Lease>,
    /// Container and TTL nodes: what the leader's reaper looks at.
    reapable: BTreeSet<String>,
    /// Bumped whenever a lease is granted or removed, so the leader's countdowns can follow.
    lease_generation: u64,
    dirty: Dirty,
}

impl Default for State {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    /// An empty tree: just the root.
    pub fn new() -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert("/".to_owned(), Node::default());
        State {
            nodes,
            clients: BTreeMap::new(),
            clients_by_activity: BTreeSet::new(),
            leases: BTreeMap::new(),
            reapable: BTreeSet::new(),
            lease_generation: 0,
            dirty: Dirty::default(),
        }
    }

    /// Rebuilds the state from stored nodes, client records and leases (in any order).
    pub fn load(
        nodes: impl IntoIterator<Item = (String, StoredNode)>,
        clients: impl IntoIterator<Item = (u64, ClientRecord)>,
        leases: impl IntoIterator<Item = (u64, StoredLease)>,
    ) -> Self {
        let mut state = State::new();
        for (id, stored) in leases {
            state.leases.insert(id, Lease::from_stored(stored));
        }
        for (path, stored) in nodes {
            state.nodes.insert(
                path,
                Node {
                    stat: stored.stat,
                    data: stored.data,
                    children: BTreeSet::new(),
                },
            );
        }
        let paths: Vec<String> = state.nodes.keys().filter(|p| *p != "/").cloned().collect();
        for p in paths {
            let parent = path::parent(&p).to_owned();
            if let Some(parent) = state.nodes.get_mut(&parent) {
                parent.children.insert(path::name(&p).to_owned());
            }
            let stat = state.nodes[&p].stat;
            match stat.kind {
                NodeKind::Ephemeral => {
                    if let Some(lease) = state.leases.get_mut(&stat.ephemeral_owner) {
                        lease.nodes.insert(p.clone());
                    }
                }
                NodeKind::Container | NodeKind::Ttl => {
                    state.reapable.insert(p.clone());
                }
                NodeKind::Persistent => {}
            }
        }
        for (id, record) in clients {
            state.clients_by_activity.insert((record.last_revision, id));
            state.clients.insert(id, record);
        }
        state
    }

    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn client(&self, id: u64) -> Option<&ClientRecord> {
        self.clients.get(&id)
    }

    /// The stored form of a node, or `None` if it no longer exists.
    pub fn stored_node(&self, path: &str) -> Option<StoredNode> {
        self.nodes.get(path).map(|n| StoredNode {
            stat: n.stat,
            data: n.data.clone(),
        })
    }

    pub fn take_dirty(&mut self) -> Dirty {
        std::mem::take(&mut self.dirty)
    }

    /// FNV-1a over every node's path, stat and data, in path order: equal trees give equal
    /// digests on every member.
    pub fn digest(&self) -> u64 {
        let mut h = Fnv::new();
        for (path, node) in &self.nodes {
            h.write(path.as_bytes());
            h.write(&[0]);
            let s = &node.stat;
            for v in [
                s.create_revision,
                s.modify_revision,
                s.children_revision,
                s.ctime_ms as u64,
                s.mtime_ms as u64,
                s.version as u64,
                s.cversion as u64,
                s.ephemeral_owner,
                s.data_length as u64,
                s.num_children as u64,
                s.kind as u64,
                s.ttl_ms,
            ] {
                h.write(&v.to_le_bytes());
            }
            h.write(&(node.data.len() as u64).to_le_bytes());
            h.write(&node.data);
        }
        h.finish()
    }

    /// Applies one committed command at `revision`. Deduplicated retries return the stored
    /// output and emit no events.
    pub fn apply(&mut self, revision: u64, cmd: &Command) -> (ApplyOutput, Vec<Event>) {
        let id = cmd.write_id;
        if id.client_id != 0 {
            if let Some(record) = self.clients.get(&id.client_id) {
                if let Some(out) = record.replies.get(&id.seq) {
                    return (out.clone(), Vec::new());
                }
                if id.seq < record.acked_below {
                    let out = ApplyOutput {
                        revision,
                        reply: Err(ApplyError::StaleWrite {
                            client_id: id.client_id,
                            seq: id.seq,
                            acked_below: record.acked_below,
                        }),
                    };
                    return (out, Vec::new());
                }
            }
        }
        let mut events = Vec::new();
        let reply = match &cmd.op {
            Op::Single(op) => self
                .apply_sub(revision, cmd.time_ms, op, &mut events, None)
                .map(Reply::Single),
            Op::Txn(ops) => self
                .apply_txn(revision, cmd.time_ms, ops, &mut events)
                .map(Reply::Txn),
            Op::LeaseGrant {
                id: wanted,
                ttl_ms,
                session,
            } => self.grant_lease(revision, *wanted, *ttl_ms, *session),
            Op::LeaseRevoke { id: lease } => {
                self.revoke_lease(revision, cmd.time_ms, *lease, &mut events)
            }
            Op::LeaseExpire { ids } => {
                Ok(self.expire_leases(revision, cmd.time_ms, ids, &mut events))
            }
            Op::Reap { nodes } => Ok(self.reap(revision, cmd.time_ms, nodes, &mut events)),
            // The event history lives in storage: the state machine store compacts it.
            Op::Compact { revision: upto } => Ok(Reply::Compacted { revision: *upto }),
            Op::Claim {
                parent,
                lease,
                data,
            } => self
                .claim(revision, cmd.time_ms, parent, *lease, data, &mut events)
                .map(Reply::Single),
        };
        let out = ApplyOutput { revision, reply };
        if id.client_id != 0 {
            self.remember(revision, id, &out);
        }
        (out, events)
    }

    /// [`Op::Claim`]: the node `lease` already owns under `parent`, else a new sequential
    /// ephemeral `claim-` node. Found through the lease's own node set, not the queue's.
    fn claim(
        &mut self,
        revision: u64,
        time_ms: i64,
        parent: &str,
        lease: u64,
        data: &[u8],
        events: &mut Vec<Event>,
    ) -> Result<SubReply, ApplyError> {
        let owned = self.leases.get(&lease).and_then(|l| {
            l.nodes
                .iter()
                .find(|p| p.as_str() != "/" && path::parent(p) == parent)
        });
        if let Some(existing) = owned {
            if let Some(node) = self.nodes.get(existing) {
                return Ok(SubReply::Created {
                    path: existing.clone(),
                    stat: node.stat,
                });
            }
        }
        let op = SubOp::Create {
            path: format!("{parent}/claim-"),
            data: data.to_vec(),
            sequential: true,
            mode: CreateMode::Ephemeral { lease },
        };
        self.apply_sub(revision, time_ms, &op, events, None)
    }

    fn remember(&mut self, revision: u64, id: WriteId, out: &ApplyOutput) {
        let record = self.clients.entry(id.client_id).or_default();
        self.clients_by_activity
            .remove(&(record.last_revision, id.client_id));
        record.last_revision = revision;
        record.acked_below = record.acked_below.max(id.acked_below);
        record.replies.insert(id.seq, out.clone());
        let keep = record.replies.split_off(&record.acked_below);
        record.replies = keep;
        while record.replies.len() > MAX_REPLIES_PER_CLIENT {
            if let Some((seq, _)) = record.replies.pop_first() {
                record.acked_below = record.acked_below.max(seq + 1);
            }
        }
        self.clients_by_activity.insert((revision, id.client_id));
        self.dirty.clients.insert(id.client_id);
        while self.clients.len() > MAX_CLIENTS {
            let Some((_, oldest)) = self.clients_by_activity.pop_first() else {
                break;
            };
            self.clients.remove(&oldest);
            self.dirty.clients.insert(oldest);
        }
    }

    /// Applies ops in order; on the first failure restores every node it touched.
    fn apply_txn(
        &mut self,
        revision: u64,
        time_ms: i64,
        ops: &[SubOp],
        events: &mut Vec<Event>,
    ) -> Result<Vec<SubReply>, ApplyError> {
        let mut undo: BTreeMap<String, Option<Node>> = BTreeMap::new();
        let mut replies = Vec::with_capacity(ops.len());
        for (index, op) in ops.iter().enumerate() {
            match self.apply_sub(revision, time_ms, op, events, Some(&mut undo)) {
                Ok(reply) => replies.push(reply),
                Err(cause) => {
                    for (path, before) in undo {
                        if let Some(current) = self.nodes.remove(&path) {
                            self.unindex_node(&path, &current.stat);
                        }
                        if let Some(node) = before {
                            self.index_node(&path, &node.stat);
                            self.nodes.insert(path, node);
                        }
                    }
                    events.clear();
                    return Err(ApplyError::TxnOp {
                        index: index as u32,
                        kind: op.kind().to_owned(),
                        path: op.path().to_owned(),
                        cause: Box::new(cause),
                    });
                }
            }
        }
        Ok(replies)
    }

    /// Checks everything first, then mutates, so a failed op leaves no trace. In a txn, each
    /// node's state before its first change is saved in `undo`.
    fn apply_sub(
        &mut self,
        revision: u64,
        time_ms: i64,
        op: &SubOp,
        events: &mut Vec<Event>,
        mut undo: Option<&mut BTreeMap<String, Option<Node>>>,
    ) -> Result<SubReply, ApplyError> {
        let mut save = |nodes: &BTreeMap<String, Node>, path: &str| {
            if let Some(undo) = undo.as_deref_mut() {
                if !undo.contains_key(path) {
                    undo.insert(path.to_owned(), nodes.get(path).cloned());
                }
            }
        };
        match op {
            SubOp::Create {
                path: requested,
                data,
                sequential,
                mode,
            } => {
                if requested == "/" {
                    return Err(ApplyError::NodeExists { path: "/".into() });
                }
                let parent_path = path::parent(requested);
                let Some(parent) = self.nodes.get(parent_path) else {
                    return Err(ApplyError::NoParent {
                        path: requested.clone(),
                        parent: parent_path.to_owned(),
                    });
                };
                if parent.stat.kind == NodeKind::Ephemeral {
                    return Err(ApplyError::EphemeralParent {
                        path: requested.clone(),
                        parent: parent_path.to_owned(),
                    });
                }
                if let CreateMode::Ephemeral { lease } = mode {
                    if !self.leases.contains_key(lease) {
                        return Err(ApplyError::LeaseNotFound { id: *lease });
                    }
                }
                let path = if *sequential {
                    if parent.stat.cversion == i32::MAX {
                        return Err(ApplyError::SequenceOverflow {
                            parent: parent_path.to_owned(),
                        });
                    }
                    format!("{requested}{:010}", parent.stat.cversion)
                } else {
                    requested.clone()
                };
                if self.nodes.contains_key(&path) {
                    return Err(ApplyError::NodeExists { path });
                }
                let parent_path = parent_path.to_owned();
                save(&self.nodes, &parent_path);
                save(&self.nodes, &path);
                let (kind, ephemeral_owner, ttl_ms) = match *mode {
                    CreateMode::Persistent => (NodeKind::Persistent, 0, 0),
                    CreateMode::Ephemeral { lease } => (NodeKind::Ephemeral, lease, 0),
                    CreateMode::Container => (NodeKind::Container, 0, 0),
                    CreateMode::Ttl { ttl_ms } => (NodeKind::Ttl, 0, ttl_ms),
                };
                let stat = Stat {
                    create_revision: revision,
                    modify_revision: revision,
                    children_revision: revision,
                    ctime_ms: time_ms,
                    mtime_ms: time_ms,
                    data_length: data.len() as u32,
                    kind,
                    ephemeral_owner,
                    ttl_ms,
                    ..Stat::default()
                };
                let parent = self.nodes.get_mut(&parent_path).expect("checked above");
                let parent_prev = parent.stat;
                parent.children.insert(path::name(&path).to_owned());
                parent.stat.cversion += 1;
                parent.stat.children_revision = revision;
                parent.stat.num_children = parent.children.len() as u32;
                let parent_stat = parent.stat;
                self.nodes.insert(
                    path.clone(),
                    Node {
                        stat,
                        data: data.clone(),
                        children: BTreeSet::new(),
                    },
                );
                self.dirty.nodes.insert(parent_path.clone());
                self.dirty.nodes.insert(path.clone());
                self.index_node(&path, &stat);
                events.push(Event {
                    kind: EventKind::Created,
                    path: path.clone(),
                    stat,
                    data: data.clone(),
                    prev: None,
                });
                events.push(Event {
                    kind: EventKind::ChildrenChanged,
                    path: parent_path,
                    stat: parent_stat,
                    data: Vec::new(),
                    prev: Some(Prev {
                        stat: parent_prev,
                        data: Vec::new(),
                    }),
                });
                Ok(SubReply::Created { path, stat })
            }
            SubOp::Set {
                path,
                data,
                expected_version,
            } => {
                let node = self.existing(path, *expected_version)?;
                let _ = node;
                save(&self.nodes, path);
                let node = self.nodes.get_mut(path).expect("checked above");
                let prev = Prev {
                    stat: node.stat,
                    data: std::mem::replace(&mut node.data, data.clone()),
                };
                node.stat.version = node.stat.version.wrapping_add(1);
                node.stat.modify_revision = revision;
                node.stat.mtime_ms = time_ms;
                node.stat.data_length = data.len() as u32;
                let stat = node.stat;
                self.dirty.nodes.insert(path.clone());
                events.push(Event {
                    kind: EventKind::DataChanged,
                    path: path.clone(),
                    stat,
                    data: data.clone(),
                    prev: Some(prev),
                });
                Ok(SubReply::Set { stat })
            }
            SubOp::Delete {
                path,
                expected_version,
            } => {
                if path == "/" {
                    return Err(ApplyError::RootNode {
                        op: "delete".into(),
                    });
                }
                let node = self.existing(path, *expected_version)?;
                if !node.children.is_empty() {
                    return Err(ApplyError::NotEmpty {
                        path: path.clone(),
                        children: node.children.len() as u32,
                    });
                }
                let parent_path = path::parent(path).to_owned();
                save(&self.nodes, path);
                save(&self.nodes, &parent_path);
                let removed = self.nodes.remove(path).expect("checked above");
                self.unindex_node(path, &removed.stat);
                let parent = self
                    .nodes
                    .get_mut(&parent_path)
                    .expect("a node's parent exists");
                let parent_prev = parent.stat;
                parent.children.remove(path::name(path));
                parent.stat.cversion += 1;
                parent.stat.children_revision = revision;
                parent.stat.num_children = parent.children.len() as u32;
                let parent_stat = parent.stat;
                self.dirty.nodes.insert(path.clone());
                self.dirty.nodes.insert(parent_path.clone());
                events.push(Event {
                    kind: EventKind::Deleted,
                    path: path.clone(),
                    stat: removed.stat,
                    data: Vec::new(),
                    prev: Some(Prev {
                        stat: removed.stat,
                        data: removed.data,
                    }),
                });
                events.push(Event {
                    kind: EventKind::ChildrenChanged,
                    path: parent_path,
                    stat: parent_stat,
                    data: Vec::new(),
                    prev: Some(Prev {
                        stat: parent_prev,
                        data: Vec::new(),
                    }),
                });
                Ok(SubReply::Deleted)
            }
            SubOp::Check {
                path,
                expected_version,
            } => {
                self.existing(path, *expected_version)?;
                Ok(SubReply::Checked)
            }
        }
    }

    /// The node at `path`, if it exists and its version matches the expected one.
    fn existing(&self, path: &str, expected_version: Option<i32>) -> Result<&Node, ApplyError> {
        let node = self.nodes.get(path).ok_or_else(|| ApplyError::NoNode {
            path: path.to_owned(),
        })?;
        if let Some(expected) = expected_version {
            if expected != node.stat.version {
                return Err(ApplyError::BadVersion {
                    path: path.to_owned(),
                    expected,
                    actual: node.stat.version,
                });
            }
        }
        Ok(node)
    }
}

/// 64-bit FNV-1a: tiny, stable across versions and platforms, good enough to compare replicas.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests;
