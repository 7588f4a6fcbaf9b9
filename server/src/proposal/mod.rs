//! The proposal layer, between the gRPC edge and Raft. Writes are proposed on the leader; a
//! follower forwards them over the peer link. The leader stamps its wall-clock time into the
//! command here, so apply never reads a clock. Linearizable reads pass [`Proposer::read_barrier`]:
//! the leader confirms its leadership with a quorum (read index), and the serving member waits
//! until it has applied up to that index. On the leader, `batch` groups concurrent commands
//! into one log entry.

mod batch;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::error::{CheckIsLeaderError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::liveness::{LeaseError, LeaseQuery};
use crate::metrics::Metrics;
use crate::raft::network::{PeerChannels, PeerRpc};
use crate::raft::{NodeId, Raft};
use crate::state::{ApplyOutput, Command};
use batch::Batcher;
pub use batch::Batching;

/// Why a proposal or read barrier did not complete. All of these are retryable by the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ProposeError {
    #[error("no leader elected yet")]
    NoLeader,
    #[error("member {member} is not the leader (leader: {leader:?})")]
    NotLeader {
        member: NodeId,
        leader: Option<NodeId>,
    },
    #[error("leader {leader} at {addr} could not be reached: {reason}")]
    ForwardFailed {
        leader: NodeId,
        addr: String,
        reason: String,
    },
    #[error("raft is shutting down: {0}")]
    Stopped(String),
    #[error("the cluster could not confirm leadership: {0}")]
    QuorumLost(String),
    #[error("timed out after {0:?} waiting for this member to apply the read index")]
    ApplyTimeout(Duration),
}

impl ProposeError {
    /// Whether the same call may succeed later, once a leader is elected or reachable.
    pub fn is_transient(&self) -> bool {
        !matches!(self, ProposeError::Stopped(_))
    }
}

/// Whether somebody waits on a command's result now, which decides when the leader's batcher
/// hands it to Raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    /// Its caller waits on it: it goes to Raft as soon as an entry can take it.
    Now,
    /// Like `Now`, but it came with others that should share its entry (the items of a `Batch`
    /// call): it never goes to Raft alone by the idle leader's direct path.
    Together,
    /// Its caller will wait longer anyway (a lock claim queued behind a holder, which waits for
    /// that holder's release): it rides in the next entry a command of the other kind starts —
    /// typically that very release — or goes alone after a millisecond or two.
    Deferrable,
}

impl Urgency {
    /// Whether the command's caller waits on its result now: such a command ends a deferrable
    /// one's wait, and its caller may finish the entry for the others.
    pub fn awaited(self) -> bool {
        self != Urgency::Deferrable
    }

    /// Whether the command may go to Raft by the idle leader's direct path, alone.
    pub fn may_go_alone(self) -> bool {
        self == Urgency::Now
    }
}

/// What the leader returns for a forwarded write.
pub type ForwardReply = Result<ApplyOutput, ProposeError>;

#[derive(Clone)]
pub struct Proposer {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    raft: Raft,
    channels: PeerChannels,
    metrics: Arc<Metrics>,
    /// How long to wait for a leader to appear or for apply to catch up.
    wait: Duration,
    /// Linearizable reads waiting for the next read-index round.
    reads: Mutex<ReadRounds>,
    /// Groups this member's proposals into log entries while it leads.
    batcher: Batcher,
}

/// Read-index batching (as etcd does): one quorum round answers every read that arrived
/// before the round started. A read arriving during a round waits for the next one, so the
/// index it gets is always confirmed after the read arrived.
#[derive(Default)]
struct ReadRounds {
    running: bool,
    waiting: Vec<oneshot::Sender<Result<u64, ProposeError>>>,
}

/// Who leads, as this member knows it now (without waiting for an election).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaderNow {
    Here,
    Remote(NodeId),
    Unknown,
}

/// Forwarding hops before giving up (leadership may move while a write is in flight).
const MAX_ATTEMPTS: usize = 3;

impl Proposer {
    pub fn new(
        id: NodeId,
        raft: Raft,
        channels: PeerChannels,
        metrics: Arc<Metrics>,
        wait: Duration,
        batching: Batching,
    ) -> Self {
        Proposer {
            inner: Arc::new(Inner {
                id,
                batcher: Batcher::start(id, raft.clone(), batching),
                raft,
                channels,
                metrics,
                wait,
                reads: Mutex::default(),
            }),
        }
    }

    /// Proposes a command wherever the leader is and returns its apply result.
    pub async fn propose(&self, cmd: Command) -> Result<ApplyOutput, ProposeError> {
        self.propose_with(cmd, Urgency::Now).await
    }

    /// [`Proposer::propose`] with the command's urgency. It counts only on the leader: a
    /// forwarded command goes to Raft as soon as it can.
    pub async fn propose_with(
        &self,
        cmd: Command,
        urgency: Urgency,
    ) -> Result<ApplyOutput, ProposeError> {
        let start = Instant::now();
        let mut leader = self.leader().await?;
        let mut forwards = 0;
        let out = loop {
            if leader == self.inner.id {
                // Moved, not copied: if leadership moved meanwhile the write was not appended,
                // and the client retries it (with the same write id).
                break self.inner.batcher.propose(cmd, urgency).await?;
            }
            match self.forward(leader, &cmd).await {
                Ok(out) => break out,
                // Leadership moved while forwarding: look again, a bounded number of times.
                Err(ProposeError::NotLeader { .. }) if forwards + 1 < MAX_ATTEMPTS => {
                    forwards += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    leader = self.leader().await?;
                }
                Err(e) => return Err(e),
            }
        };
        self.inner
            .metrics
            .proposal_seconds
            .observe(start.elapsed().as_secs_f64());
        Ok(out)
    }

    /// Proposes on this member, which must be the leader; the batcher stamps the time.
    pub async fn propose_here(&self, cmd: Command) -> ForwardReply {
        self.inner.batcher.propose(cmd, Urgency::Now).await
    }

    async fn forward(&self, leader: NodeId, cmd: &Command) -> ForwardReply {
        self.call_leader::<_, ForwardReply>(leader, PeerRpc::Forward, cmd, self.inner.wait * 2)
            .await?
    }

    /// One peer call to the leader; transport failures become `ForwardFailed`.
    async fn call_leader<Req: Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        leader: NodeId,
        rpc: PeerRpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, ProposeError> {
        let addr = self.peer_addr(leader)?;
        self.inner
            .channels
            .call(&addr, rpc, req, timeout)
            .await
            .map_err(|reason| ProposeError::ForwardFailed {
                leader,
                addr,
                reason,
            })
    }

    /// The leader as this member's Raft knows it at this moment.
    pub fn leader_now(&self) -> LeaderNow {
        match self.inner.raft.metrics().borrow().current_leader {
            Some(l) if l == self.inner.id => LeaderNow::Here,
            Some(l) => LeaderNow::Remote(l),
            None => LeaderNow::Unknown,
        }
    }

    /// One peer call to `member` (the leader, as this member last knew it).
    pub async fn call_member<Req: Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        member: NodeId,
        rpc: PeerRpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, ProposeError> {
        self.call_leader(member, rpc, req, timeout).await
    }

    /// How long this member waits for a leader or for apply to catch up.
    pub fn wait_limit(&self) -> Duration {
        self.inner.wait
    }

    /// Sends a lease query to the leader's countdowns on another member.
    pub async fn forward_lease(
        &self,
        query: LeaseQuery,
    ) -> Result<Result<u64, LeaseError>, ProposeError> {
        let leader = self.leader().await?;
        let answer = self
            .call_leader::<_, Result<u64, LeaseError>>(
                leader,
                PeerRpc::Lease,
                &query,
                self.inner.wait,
            )
            .await?;
        match answer {
            // Leadership moved between our look-up and its answer: the client retries.
            Err(LeaseError::NotLeader { member }) => Err(ProposeError::NotLeader {
                member,
                leader: None,
            }),
            other => Ok(other),
        }
    }

    /// The read index, confirmed by a quorum; only the leader can answer.
    pub async fn read_index_here(&self) -> Result<u64, ProposeError> {
        match self.inner.raft.get_read_log_id().await {
            Ok((read_log_id, _applied)) => Ok(read_log_id.map_or(0, |l| l.index)),
            Err(e) => Err(self.check_leader_error(e)),
        }
    }

    fn check_leader_error(
        &self,
        e: RaftError<NodeId, CheckIsLeaderError<NodeId, crate::raft::KordNode>>,
    ) -> ProposeError {
        match e {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => {
                ProposeError::NotLeader {
                    member: self.inner.id,
                    leader: f.leader_id,
                }
            }
            RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
                ProposeError::QuorumLost(q.to_string())
            }
            RaftError::Fatal(f) => ProposeError::Stopped(f.to_string()),
        }
    }

    /// Returns once this member's state reflects every write acknowledged before the call.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        let (tx, rx) = oneshot::channel();
        let start_round = {
            let mut rounds = self.inner.reads.lock().expect("read rounds lock poisoned");
            rounds.waiting.push(tx);
            !std::mem::replace(&mut rounds.running, true)
        };
        if start_round {
            // Driven by its own task, so a cancelled request cannot strand the others.
            tokio::spawn(self.clone().drive_read_rounds());
        }
        let index = rx
            .await
            .map_err(|_| ProposeError::Stopped("read round abandoned".into()))??;
        self.wait_applied(index).await
    }

    async fn drive_read_rounds(self) {
        loop {
            let batch = {
                let mut rounds = self.inner.reads.lock().expect("read rounds lock poisoned");
                if rounds.waiting.is_empty() {
                    rounds.running = false;
                    return;
                }
                std::mem::take(&mut rounds.waiting)
            };
            let result = self.read_index().await;
            for waiter in batch {
                let _ = waiter.send(result.clone());
            }
        }
    }

    /// One read-index round, through the leader wherever it is.
    async fn read_index(&self) -> Result<u64, ProposeError> {
        let mut last_err = ProposeError::NoLeader;
        for _ in 0..MAX_ATTEMPTS {
            let leader = self.leader().await?;
            let index = if leader == self.inner.id {
                self.read_index_here().await
            } else {
                self.remote_read_index(leader).await
            };
            match index {
                Err(e @ ProposeError::NotLeader { .. }) => last_err = e,
                other => return other,
            }
        }
        Err(last_err)
    }

    async fn remote_read_index(&self, leader: NodeId) -> Result<u64, ProposeError> {
        self.call_leader::<_, Result<u64, ProposeError>>(
            leader,
            PeerRpc::ReadIndex,
            &(),
            self.inner.wait,
        )
        .await?
    }

    async fn wait_applied(&self, index: u64) -> Result<(), ProposeError> {
        let applied = self
            .inner
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        if applied >= index {
            return Ok(());
        }
        self.inner
            .raft
            .wait(Some(self.inner.wait))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map(|_| ())
            .map_err(|_| ProposeError::ApplyTimeout(self.inner.wait))
    }

    /// The current leader, waiting a bounded time for an election to finish.
    async fn leader(&self) -> Result<NodeId, ProposeError> {
        if let Some(l) = self.inner.raft.metrics().borrow().current_leader {
            return Ok(l);
        }
        self.inner
            .raft
            .wait(Some(self.inner.wait))
            .metrics(|m| m.current_leader.is_some(), "leader elected")
            .await
            .ok()
            .and_then(|m| m.current_leader)
            .ok_or(ProposeError::NoLeader)
    }

    fn peer_addr(&self, id: NodeId) -> Result<String, ProposeError> {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        m.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.peer_addr.clone())
            .ok_or(ProposeError::NotLeader {
                member: self.inner.id,
                leader: Some(id),
            })
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
