//! Claims: the fair, herd-free queue behind locks and elections. A claim is an ephemeral
//! sequential node `/kord/<kind>/<name>/claim-NNNNNNNNNN` owned by a lease, under a container
//! parent (reaped once its last claim goes). The first claim holds the lock or leads; every
//! other claim waits only for the deletion of the one just before it, then looks again, since
//! its predecessor may have left because its session expired rather than because it held
//! and released. Fencing tokens are the claims' create revisions: they only grow.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::broadcast::error::RecvError;

use crate::grpc::EdgeError;
use crate::metrics::Metrics;
use crate::proposal::Proposer;
use crate::state::{
    path, ApplyError, CreateMode, EventKind, Op, Reply, Stat, SubOp, SubReply, WriteId,
};
use crate::storage::state_machine::SharedState;
use crate::watch::hub::WatchHub;

/// Where locks and elections keep their queues.
pub const ROOT: &str = "/kord";

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Lock,
    Election,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Lock => "/kord/locks",
            Kind::Election => "/kord/elections",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub key: String,
    pub lease: u64,
    pub token: u64,
}

#[derive(Clone)]
pub struct Claims {
    proposer: Proposer,
    state: SharedState,
    hub: WatchHub,
    metrics: Arc<Metrics>,
}

/// The queue's parent path for a lock or election name (one path component).
pub fn queue_path(kind: Kind, name: &str) -> Result<String, EdgeError> {
    if name.is_empty() || name.contains('/') {
        return Err(EdgeError::InvalidArgument(format!(
            "name {name:?} must be one non-empty path component (no '/')"
        )));
    }
    let p = format!("{}/{name}", kind.dir());
    path::validate(&p)?;
    Ok(p)
}

impl Claims {
    pub fn new(
        proposer: Proposer,
        state: SharedState,
        hub: WatchHub,
        metrics: Arc<Metrics>,
    ) -> Self {
        Claims {
            proposer,
            state,
            hub,
            metrics,
        }
    }

    async fn write(&self, write_id: WriteId, op: SubOp) -> Result<SubReply, EdgeError> {
        match crate::grpc::propose(&self.proposer, write_id, Op::Single(op)).await? {
            (_, Reply::Single(r)) => Ok(r),
            _ => Err(EdgeError::WriteIdReused),
        }
    }

    /// Creates a node unless it exists.
    async fn ensure(&self, path: &str, mode: CreateMode) -> Result<(), EdgeError> {
        let op = SubOp::Create {
            path: path.to_owned(),
            data: Vec::new(),
            sequential: false,
            mode,
        };
        match self.write(WriteId::default(), op).await {
            Ok(_) | Err(EdgeError::Apply(ApplyError::NodeExists { .. })) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The claim `lease` already has in the queue, if any.
    async fn existing(&self, parent: &str, lease: u64) -> Result<Option<Claim>, EdgeError> {
        self.proposer.read_barrier().await?;
        let applied = self.state.read();
        let Some(queue) = applied.state.get(parent) else {
            return Ok(None);
        };
        Ok(queue.children.iter().find_map(|name| {
            let key = format!("{parent}/{name}");
            let stat = applied.state.get(&key)?.stat;
            (stat.ephemeral_owner == lease).then_some(Claim {
                key,
                lease,
                token: stat.create_revision,
            })
        }))
    }

    /// Joins the queue, or finds the claim this lease already has there (so a retried request
    /// never queues twice). The container parent may be reaped between its creation and the
    /// claim's: then both are made again.
    pub async fn enqueue(
        &self,
        kind: Kind,
        name: &str,
        lease: u64,
        value: Vec<u8>,
    ) -> Result<Claim, EdgeError> {
        let parent = queue_path(kind, name)?;
        if let Some(claim) = self.existing(&parent, lease).await? {
            return Ok(claim);
        }
        for attempt in 0..3 {
            // The queue usually exists: then the claim is the only write. If it vanishes
            // (reaped) before the claim applies, the create fails with NoParent and the next
            // attempt makes the ancestors first.
            let queue_exists = self.state.read().state.get(&parent).is_some();
            if attempt > 0 || !queue_exists {
                self.ensure(ROOT, CreateMode::Persistent).await?;
                self.ensure(kind.dir(), CreateMode::Persistent).await?;
                self.ensure(&parent, CreateMode::Container).await?;
            }
            let op = SubOp::Create {
                path: format!("{parent}/claim-"),
                data: value.clone(),
                sequential: true,
                mode: CreateMode::Ephemeral { lease },
            };
            match self.write(WriteId::default(), op).await {
                Ok(SubReply::Created { path, stat }) => {
                    return Ok(Claim {
                        key: path,
                        lease,
                        token: stat.create_revision,
                    })
                }
                Ok(_) => return Err(EdgeError::WriteIdReused),
                Err(EdgeError::Apply(ApplyError::NoParent { .. })) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(EdgeError::InvalidArgument(format!(
            "the queue {parent} kept vanishing; try again"
        )))
    }

    /// Returns once `claim` is first in its queue, waiting only for its predecessor.
    pub async fn wait_first(
        &self,
        claim: &Claim,
        deadline: Option<Instant>,
    ) -> Result<(), EdgeError> {
        let parent = path::parent(&claim.key).to_owned();
        let own = path::name(&claim.key).to_owned();
        // The first look needs this member to have applied our own claim: then every claim
        // ahead of ours (older) is applied here too. If the claim is already visible (always
        // on the leader, which replied after applying it) no barrier is needed; otherwise a
        // read barrier brings this member up to date. After a predecessor's deletion event
        // none is needed either: that event was applied here, after our claim.
        let mut barrier = self.state.read().state.get(&claim.key).is_none();
        loop {
            // Subscribed before looking, so a deletion after the look is not missed.
            let mut live = self.hub.subscribe();
            if barrier {
                self.proposer.read_barrier().await?;
            }
            let predecessor = {
                let applied = self.state.read();
                let children = applied.state.get(&parent).map(|n| &n.children);
                let Some(children) = children.filter(|c| c.contains(&own)) else {
                    return Err(EdgeError::ClaimGone {
                        key: claim.key.clone(),
                        lease: claim.lease,
                    });
                };
                match children.range::<String, _>(..&own).next_back() {
                    None => return Ok(()),
                    Some(p) => format!("{parent}/{p}"),
                }
            };
            loop {
                let next = async {
                    match deadline {
                        Some(d) => tokio::time::timeout_at(d.into(), live.recv()).await.ok(),
                        None => Some(live.recv().await),
                    }
                };
                match next.await {
                    None => {
                        return Err(EdgeError::Timeout(format!(
                            "{} was not first in its queue in time",
                            claim.key
                        )))
                    }
                    Some(Ok(rev)) => {
                        if rev
                            .events
                            .iter()
                            .any(|e| e.kind == EventKind::Deleted && e.path == predecessor)
                        {
                            self.metrics.claim_wakeups.inc();
                            barrier = false;
                            break;
                        }
                    }
                    // Fell behind the broadcast: look again.
                    Some(Err(RecvError::Lagged(_))) => {
                        barrier = true;
                        break;
                    }
                    Some(Err(RecvError::Closed)) => {
                        return Err(EdgeError::Propose(crate::proposal::ProposeError::Stopped(
                            "watch hub closed".into(),
                        )))
                    }
                }
            }
        }
    }

    /// The claim's current stat, checked to be owned by `lease`.
    async fn owned(&self, key: &str, lease: u64) -> Result<Stat, EdgeError> {
        path::validate(key)?;
        // A claim's owner never changes and the delete or set that follows is conditional on
        // its version, so a claim found here needs no read barrier; one not found may just not
        // be applied here yet.
        if self.state.read().state.get(key).is_none() {
            self.proposer.read_barrier().await?;
        }
        let applied = self.state.read();
        let node = applied.state.get(key).ok_or_else(|| EdgeError::NoNode {
            path: key.to_owned(),
        })?;
        if node.stat.ephemeral_owner != lease {
            return Err(EdgeError::PermissionDenied(format!(
                "{key} is owned by lease {}, not lease {lease}",
                node.stat.ephemeral_owner
            )));
        }
        Ok(node.stat)
    }

    /// Leaves the queue (unlock, resign). Only the owning lease may.
    pub async fn withdraw(&self, key: &str, lease: u64) -> Result<(), EdgeError> {
        let stat = self.owned(key, lease).await?;
        let op = SubOp::Delete {
            path: key.to_owned(),
            expected_version: Some(stat.version),
        };
        self.write(WriteId::default(), op).await.map(|_| ())
    }

    /// Replaces the value of a leading claim (proclaim).
    pub async fn proclaim(&self, key: &str, lease: u64, value: Vec<u8>) -> Result<(), EdgeError> {
        let stat = self.owned(key, lease).await?;
        if self.first(path::parent(key))?.map(|(k, _, _)| k).as_deref() != Some(key) {
            return Err(EdgeError::PermissionDenied(format!(
                "{key} does not lead its election"
            )));
        }
        let op = SubOp::Set {
            path: key.to_owned(),
            data: value,
            expected_version: Some(stat.version),
        };
        self.write(WriteId::default(), op).await.map(|_| ())
    }

    /// The first claim of a queue, from this member's applied state: key, stat, value.
    pub fn first(&self, parent: &str) -> Result<Option<(String, Stat, Vec<u8>)>, EdgeError> {
        let applied = self.state.read();
        let Some(queue) = applied.state.get(parent) else {
            return Ok(None);
        };
        Ok(queue.children.iter().next().and_then(|name| {
            let key = format!("{parent}/{name}");
            applied
                .state
                .get(&key)
                .map(|n| (key, n.stat, n.data.clone()))
        }))
    }

    pub fn hub(&self) -> &WatchHub {
        &self.hub
    }

    pub fn proposer(&self) -> &Proposer {
        &self.proposer
    }
}

/// Withdraws a claim whose request ended before it was first (timeout, cancel, error), so
/// an abandoned waiter never blocks the queue until its session ends.
pub struct PendingClaim {
    claims: Claims,
    claim: Option<Claim>,
}

impl PendingClaim {
    pub fn new(claims: &Claims, claim: Claim) -> Self {
        PendingClaim {
            claims: claims.clone(),
            claim: Some(claim),
        }
    }

    pub fn claim(&self) -> &Claim {
        self.claim.as_ref().expect("claim present until kept")
    }

    /// The claim is first: keep it.
    pub fn keep(mut self) -> Claim {
        self.claim.take().expect("claim present until kept")
    }
}

impl Drop for PendingClaim {
    fn drop(&mut self) {
        if let Some(claim) = self.claim.take() {
            let claims = self.claims.clone();
            tokio::spawn(async move {
                if let Err(e) = claims.withdraw(&claim.key, claim.lease).await {
                    tracing::debug!(key = %claim.key, error = %e, "withdrawing an abandoned claim");
                }
            });
        }
    }
}
