//! Peer-link bookkeeping shared by the network client and the peer service: when this member
//! last heard from each peer (for `MemberList`), the fence that holds Raft replication back
//! from all but one follower during a leadership transfer, and the signal that this member was
//! removed from the cluster (the anti-rejoin guard), which stops the process; and whether this
//! member is still joining with no data (it takes no Raft traffic until the cluster answers).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::NodeId;

/// Request metadata naming the member that sent a Raft RPC.
pub const SENDER_ID_HEADER: &str = "kord-sender-id";

/// Metadata on the refusal a removed member gets: its own id. Seeing it, the member stops.
pub const REMOVED_HEADER: &str = "kord-removed-member";

/// A member id carried in gRPC metadata under `name` (one of the headers above), if present
/// and well formed.
pub fn metadata_id(metadata: &tonic::metadata::MetadataMap, name: &str) -> Option<NodeId> {
    metadata
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<NodeId>().ok())
}

pub struct PeerGuard {
    id: NodeId,
    contacts: Mutex<HashMap<NodeId, Instant>>,
    /// During a leadership transfer: the one follower still sent AppendEntries.
    fence: Mutex<Option<NodeId>>,
    removed: watch::Sender<Option<String>>,
    /// Started empty with `--join` and not yet added by the cluster. Such a member refuses Raft
    /// traffic: were it a voter whose data was lost, it could otherwise vote (a second time in
    /// a term, or for a log missing entries it had acknowledged) before it is refused.
    joining: AtomicBool,
}

impl PeerGuard {
    pub fn new(id: NodeId) -> Arc<PeerGuard> {
        Arc::new(PeerGuard {
            id,
            contacts: Mutex::default(),
            fence: Mutex::default(),
            removed: watch::Sender::new(None),
            joining: AtomicBool::new(false),
        })
    }

    pub fn set_joining(&self, joining: bool) {
        self.joining.store(joining, Ordering::SeqCst);
    }

    pub fn is_joining(&self) -> bool {
        self.joining.load(Ordering::SeqCst)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Records a successful reply from `peer`.
    pub fn contacted(&self, peer: NodeId) {
        self.contacts
            .lock()
            .expect("peer contacts lock poisoned")
            .insert(peer, Instant::now());
    }

    /// How long ago `peer` last answered a Raft RPC from this member (None: never).
    pub fn since_contact(&self, peer: NodeId) -> Option<Duration> {
        self.contacts
            .lock()
            .expect("peer contacts lock poisoned")
            .get(&peer)
            .map(Instant::elapsed)
    }

    /// While `Some(target)`, Raft replication goes to `target` only, so the other followers'
    /// leader leases expire and they grant `target` their votes.
    pub fn set_fence(&self, only: Option<NodeId>) {
        *self.fence.lock().expect("fence lock poisoned") = only;
    }

    /// Whether replication to `peer` is held back by the transfer fence.
    pub fn fenced(&self, peer: NodeId) -> bool {
        matches!(*self.fence.lock().expect("fence lock poisoned"), Some(only) if only != peer)
    }

    /// Signals that this member was removed from the cluster; the first reason wins.
    pub fn removed(&self, reason: String) {
        self.removed.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// Resolves with the reason once this member learns it was removed.
    pub async fn wait_removed(&self) -> String {
        let mut rx = self.removed.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_lets_only_the_target_through() {
        let g = PeerGuard::new(1);
        assert!(!g.fenced(2));
        g.set_fence(Some(2));
        assert!(!g.fenced(2));
        assert!(g.fenced(3));
        g.set_fence(None);
        assert!(!g.fenced(3));
    }

    #[tokio::test]
    async fn first_removal_reason_wins() {
        let g = PeerGuard::new(1);
        g.removed("a".into());
        g.removed("b".into());
        assert_eq!(g.wait_removed().await, "a");
    }
}
