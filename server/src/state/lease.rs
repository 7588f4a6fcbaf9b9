//! Leases and the nodes that die with them or on their own: ephemeral nodes (owned by a
//! lease or session), container nodes and TTL nodes. Everything here is applied from the log;
//! the leader decides *when* (see `liveness`), apply only carries it out.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::{ApplyError, Event, NodeKind, ReapCandidate, Reply, Stat, State, SubOp};

/// A lease as stored. Its ephemeral nodes are found from their stats on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLease {
    pub ttl_ms: u64,
    pub session: bool,
    pub granted_revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub ttl_ms: u64,
    pub session: bool,
    pub granted_revision: u64,
    /// Ephemeral nodes attached, by path.
    pub nodes: BTreeSet<String>,
}

impl Lease {
    pub fn from_stored(s: StoredLease) -> Self {
        Lease {
            ttl_ms: s.ttl_ms,
            session: s.session,
            granted_revision: s.granted_revision,
            nodes: BTreeSet::new(),
        }
    }

    pub fn stored(&self) -> StoredLease {
        StoredLease {
            ttl_ms: self.ttl_ms,
            session: self.session,
            granted_revision: self.granted_revision,
        }
    }
}

impl State {
    pub fn lease(&self, id: u64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    pub fn leases(&self) -> impl Iterator<Item = (u64, &Lease)> {
        self.leases.iter().map(|(id, l)| (*id, l))
    }

    /// Changes whenever a lease is granted or removed.
    pub fn lease_generation(&self) -> u64 {
        self.lease_generation
    }

    /// Container and TTL nodes with their stats, for the leader's reaper.
    pub fn reapable(&self) -> impl Iterator<Item = (&str, &Stat)> {
        self.reapable
            .iter()
            .filter_map(|p| self.nodes.get(p).map(|n| (p.as_str(), &n.stat)))
    }

    /// Keeps the derived indexes (lease → nodes, reapable nodes) in step with the tree.
    pub(super) fn index_node(&mut self, path: &str, stat: &Stat) {
        match stat.kind {
            NodeKind::Ephemeral => {
                if let Some(lease) = self.leases.get_mut(&stat.ephemeral_owner) {
                    lease.nodes.insert(path.to_owned());
                }
            }
            NodeKind::Container | NodeKind::Ttl => {
                self.reapable.insert(path.to_owned());
            }
            NodeKind::Persistent => {}
        }
    }

    pub(super) fn unindex_node(&mut self, path: &str, stat: &Stat) {
        match stat.kind {
            NodeKind::Ephemeral => {
                if let Some(lease) = self.leases.get_mut(&stat.ephemeral_owner) {
                    lease.nodes.remove(path);
                }
            }
            NodeKind::Container | NodeKind::Ttl => {
                self.reapable.remove(path);
            }
            NodeKind::Persistent => {}
        }
    }

    pub(super) fn grant_lease(
        &mut self,
        revision: u64,
        wanted: u64,
        ttl_ms: u64,
        session: bool,
    ) -> Result<Reply, ApplyError> {
        let id = if wanted == 0 {
            // The revision is unique; step past ids that clients picked themselves.
            let mut id = revision;
            while self.leases.contains_key(&id) {
                id += 1;
            }
            id
        } else if self.leases.contains_key(&wanted) {
            return Err(ApplyError::LeaseExists { id: wanted });
        } else {
            wanted
        };
        self.leases.insert(
            id,
            Lease {
                ttl_ms,
                session,
                granted_revision: revision,
                nodes: BTreeSet::new(),
            },
        );
        self.lease_generation += 1;
        self.dirty.leases.insert(id);
        Ok(Reply::LeaseGranted { id, ttl_ms })
    }

    pub(super) fn revoke_lease(
        &mut self,
        revision: u64,
        time_ms: i64,
        id: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, ApplyError> {
        if !self.leases.contains_key(&id) {
            return Err(ApplyError::LeaseNotFound { id });
        }
        Ok(Reply::Deleted {
            paths: self.remove_lease(revision, time_ms, id, events),
        })
    }

    pub(super) fn expire_leases(
        &mut self,
        revision: u64,
        time_ms: i64,
        ids: &[u64],
        events: &mut Vec<Event>,
    ) -> Reply {
        let mut paths = Vec::new();
        for id in ids {
            if self.leases.contains_key(id) {
                paths.extend(self.remove_lease(revision, time_ms, *id, events));
            }
        }
        Reply::Deleted { paths }
    }

    /// Deletes the lease and every node attached to it, in path order.
    fn remove_lease(
        &mut self,
        revision: u64,
        time_ms: i64,
        id: u64,
        events: &mut Vec<Event>,
    ) -> Vec<String> {
        let nodes = self
            .leases
            .get(&id)
            .map(|l| l.nodes.clone())
            .unwrap_or_default();
        let mut deleted = Vec::with_capacity(nodes.len());
        for path in nodes {
            if self.delete_unchecked(revision, time_ms, &path, events) {
                deleted.push(path);
            }
        }
        self.leases.remove(&id);
        self.lease_generation += 1;
        self.dirty.leases.insert(id);
        deleted
    }

    /// Deletes the candidates that are still due: a container that has had children and has
    /// none now; a TTL node without children, not modified since the leader looked.
    pub(super) fn reap(
        &mut self,
        revision: u64,
        time_ms: i64,
        candidates: &[ReapCandidate],
        events: &mut Vec<Event>,
    ) -> Reply {
        let mut deleted = Vec::new();
        for c in candidates {
            let due = self.nodes.get(&c.path).is_some_and(|n| {
                n.children.is_empty()
                    && match n.stat.kind {
                        NodeKind::Container => n.stat.cversion > 0,
                        NodeKind::Ttl => n.stat.modify_revision == c.modify_revision,
                        _ => false,
                    }
            });
            if due && self.delete_unchecked(revision, time_ms, &c.path, events) {
                deleted.push(c.path.clone());
            }
        }
        Reply::Deleted { paths: deleted }
    }

    /// Deletes a childless node through the ordinary delete, so stats and events match a
    /// client's delete exactly. Returns whether it was deleted.
    fn delete_unchecked(
        &mut self,
        revision: u64,
        time_ms: i64,
        path: &str,
        events: &mut Vec<Event>,
    ) -> bool {
        let op = SubOp::Delete {
            path: path.to_owned(),
            expected_version: None,
        };
        self.apply_sub(revision, time_ms, &op, events, None).is_ok()
    }

    pub fn stored_lease(&self, id: u64) -> Option<StoredLease> {
        self.leases.get(&id).map(Lease::stored)
    }
}
