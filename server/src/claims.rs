//! Claims: the fair, herd-free queue behind locks and elections. A claim is an ephemeral
//! sequential node `/kord/<kind>/<name>/claim-NNNNNNNNNN` owned by a lease, under a container
//! parent (reaped once its last claim goes). The first claim holds the lock or leads; every
//! other claim waits only for the deletion of the one just before it, then looks again, since
//! its predecessor may have left because its session expired rather than because it held
//! and released. Fencing tokens are the claims' create revisions: they only grow. Waits run
//! on the leader, which applies a release first: a follower forwards them there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::grpc::EdgeError;
use crate::metrics::Metrics;
use crate::proposal::{LeaderNow, Proposer, Urgency};
use crate::raft::network::PeerRpc;
use crate::raft::NodeId;
use crate::state::{path, ApplyError, CreateMode, Op, Reply, Stat, SubOp, SubReply, WriteId};
use crate::storage::state_machine::SharedState;
use crate::watch::hub::{WatchHub, Woken};

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub key: String,
    pub lease: u64,
    pub token: u64,
}

/// A blocking wait a follower hands to the leader (peer RPC `ClaimWait`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimWait {
    pub claim: Claim,
    /// How long the leader waits before answering [`WaitReply::TimedOut`].
    pub timeout_ms: u64,
}

/// The leader's answer to a [`ClaimWait`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitReply {
    /// The claim is first in its queue.
    First,
    /// The claim is no longer in its queue.
    Gone,
    /// Not first within `timeout_ms`.
    TimedOut,
    /// The member could not wait (e.g. it lost quorum): wait somewhere else.
    Failed(String),
}

/// How long one forwarded wait lasts before the follower asks again: a leader change, or a
/// leader the follower can no longer reach, is noticed within about this long.
const FORWARDED_WAIT_SLICE: Duration = Duration::from_secs(5);

/// How long a wait pauses before looking again after a transient failure (no leader, no
/// quorum), so that an election is not met with a busy loop.
const TRANSIENT_ERROR_PAUSE: Duration = Duration::from_millis(100);

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

    /// Joins the queue, or finds the claim this lease already has there (so a retried or
    /// concurrent request never queues twice: the state machine decides, see [`Op::Claim`]).
    /// The container parent may be reaped between its creation and the claim's: then both
    /// are made again.
    pub async fn enqueue(
        &self,
        kind: Kind,
        name: &str,
        lease: u64,
        value: Vec<u8>,
    ) -> Result<Claim, EdgeError> {
        let parent = queue_path(kind, name)?;
        for attempt in 0..3 {
            // The queue usually exists: then the claim is the only write. If it vanishes
            // (reaped) before the claim applies, the claim fails with NoParent and the next
            // attempt makes the ancestors first.
            let queued = self
                .state
                .read()
                .state
                .get(&parent)
                .map(|queue| queue.children.len());
            let queue_exists = queued.is_some();
            if attempt > 0 || !queue_exists {
                self.ensure(ROOT, CreateMode::Persistent).await?;
                self.ensure(kind.dir(), CreateMode::Persistent).await?;
                self.ensure(&parent, CreateMode::Container).await?;
            }
            let op = Op::Claim {
                parent: parent.clone(),
                lease,
                data: value.clone(),
            };
            // Behind a holder the claim waits for that holder's release anyway, so it may ride
            // in the release's entry instead of taking an entry (a commit) of its own.
            let urgency = if queued.is_some_and(|n| n > 0) {
                Urgency::Deferrable
            } else {
                Urgency::Now
            };
            match crate::grpc::propose_with(&self.proposer, WriteId::default(), op, urgency).await {
                Ok((_, Reply::Single(SubReply::Created { path, stat }))) => {
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

    /// Returns once `claim` is first in its queue. The wait runs on the leader, which applies
    /// the predecessor's deletion first (a follower applies it a replication round later): a
    /// follower forwards it there in slices of `FORWARDED_WAIT_SLICE`, and waits on its own
    /// state for the rest of a slice when the leader is unknown or cannot be reached. Either
    /// way is correct, since every member applies the same queue; only the wake-up's delay
    /// differs. While the cluster elects a leader this member may not be able to confirm its
    /// state either: the claim is still queued, so the wait goes on until its deadline.
    #[tracing::instrument(level = "debug", skip_all, fields(key = %claim.key))]
    pub async fn wait_first(
        &self,
        claim: &Claim,
        deadline: Option<Instant>,
    ) -> Result<(), EdgeError> {
        loop {
            let now = Instant::now();
            if deadline.is_some_and(|d| d <= now) {
                return Err(Self::late(claim));
            }
            let slice_end = match deadline {
                Some(d) => d.min(now + FORWARDED_WAIT_SLICE),
                None => now + FORWARDED_WAIT_SLICE,
            };
            let failed = match self.proposer.leader_now() {
                LeaderNow::Here => return self.wait_here(claim, deadline).await,
                LeaderNow::Remote(leader) => {
                    match self.forward_wait(leader, claim, slice_end).await {
                        Ok(WaitReply::First) => return Ok(()),
                        Ok(WaitReply::Gone) => return Err(Self::gone(claim)),
                        Ok(WaitReply::TimedOut) => continue,
                        Ok(WaitReply::Failed(reason)) => reason,
                        Err(e) => e.to_string(),
                    }
                }
                LeaderNow::Unknown => "no leader known".to_owned(),
            };
            tracing::debug!(reason = %failed, "waiting on this member for one slice");
            match self.wait_here(claim, Some(slice_end)).await {
                Err(EdgeError::Timeout(_)) => continue,
                Err(EdgeError::Propose(e)) if e.is_transient() => {
                    tracing::debug!(error = %e, "this member cannot confirm its state yet");
                    let pause = Instant::now() + TRANSIENT_ERROR_PAUSE;
                    tokio::time::sleep_until(pause.min(slice_end).into()).await;
                }
                other => return other,
            }
        }
    }

    async fn forward_wait(
        &self,
        leader: NodeId,
        claim: &Claim,
        until: Instant,
    ) -> Result<WaitReply, crate::proposal::ProposeError> {
        let left = until.saturating_duration_since(Instant::now());
        let req = ClaimWait {
            claim: claim.clone(),
            timeout_ms: (left.as_millis() as u64).max(1),
        };
        // The leader answers at `until`; the margin only catches a leader that never does.
        let limit = left + self.proposer.wait_limit();
        self.proposer
            .call_member(leader, PeerRpc::ClaimWait, &req, limit)
            .await
    }

    /// Serves a follower's forwarded wait on this member (normally the leader).
    #[tracing::instrument(level = "debug", skip_all, fields(key = %wait.claim.key))]
    pub async fn serve_forwarded_wait(&self, wait: ClaimWait) -> WaitReply {
        self.metrics.claim_waits_served.inc();
        // The follower sends at most one slice; an absurd value just means no deadline.
        let deadline = Instant::now().checked_add(Duration::from_millis(wait.timeout_ms));
        match self.wait_here(&wait.claim, deadline).await {
            Ok(()) => WaitReply::First,
            Err(EdgeError::ClaimGone { .. }) => WaitReply::Gone,
            Err(EdgeError::Timeout(_)) => WaitReply::TimedOut,
            Err(e) => WaitReply::Failed(e.to_string()),
        }
    }

    fn gone(claim: &Claim) -> EdgeError {
        EdgeError::ClaimGone {
            key: claim.key.clone(),
            lease: claim.lease,
        }
    }

    fn late(claim: &Claim) -> EdgeError {
        EdgeError::Timeout(format!("{} was not first in its queue in time", claim.key))
    }

    /// Returns once `claim` is first in this member's applied queue, waiting only for its
    /// predecessor.
    async fn wait_here(&self, claim: &Claim, deadline: Option<Instant>) -> Result<(), EdgeError> {
        let parent = path::parent(&claim.key).to_owned();
        let own = path::name(&claim.key).to_owned();
        // The first look needs this member to have applied our own claim: then every claim
        // ahead of ours (older) is applied here too. If the claim is already visible (always
        // on the leader, which replied after applying it) no barrier is needed; otherwise a
        // read barrier brings this member up to date. After a predecessor's deletion event
        // none is needed either: that event was applied here, after our claim.
        let mut barrier = self.state.read().state.get(&claim.key).is_none();
        loop {
            if barrier {
                self.proposer.read_barrier().await?;
                barrier = false;
            }
            let predecessor = {
                let applied = self.state.read();
                let children = applied.state.get(&parent).map(|n| &n.children);
                let Some(children) = children.filter(|c| c.contains(&own)) else {
                    return Err(Self::gone(claim));
                };
                match children.range::<String, _>(..&own).next_back() {
                    None => return Ok(()),
                    Some(p) => format!("{parent}/{p}"),
                }
            };
            // Only the predecessor's deletion wakes this waiter: one wake-up per release.
            let mut wait = self.hub.on_delete(&predecessor);
            // Apply changes the state before it publishes: if the predecessor is still here
            // after registering, its deletion cannot be missed; if not, look again.
            if self.state.read().state.get(&predecessor).is_none() {
                continue;
            }
            let woken = match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), wait.woken())
                    .await
                    .map_err(|_| Self::late(claim))?,
                None => wait.woken().await,
            };
            // A deletion event was applied here after our claim, so the next look needs no
            // barrier; neither does a look at a newer snapshot.
            if woken == Woken::Deleted {
                self.metrics.claim_wakeups.inc();
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
