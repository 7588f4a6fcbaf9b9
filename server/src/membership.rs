//! Membership administration, between the `Cluster` edge and openraft: the safety decisions
//! (one change at a time, never a majority of voters removed, ids never reused, observers never
//! promoted, learners promoted only once caught up) and the openraft calls that carry them out.
//! Every change runs on the leader; other members forward it there over the peer link.
//!
//! Removed ids are remembered as tombstones: ordinary persistent znodes under [`REMOVED_DIR`],
//! written through the replicated log *before* the configuration change, so every member that
//! applied a removal also knows the tombstone. A member that finds its own tombstone while it is
//! absent from its applied membership stops; peers refuse Raft traffic from a tombstoned id that
//! is not in their membership (see `raft::peer_service`).
//!
//! Leadership transfer: the leader fences replication to every follower but the target (so
//! their leader leases expire and they grant votes), waits out that lease, checks that the
//! target holds every entry the others do, and asks the target (peer `Admin` RPC) to start an
//! election with `Raft::trigger().elect()`, repeating until the target leads or the deadline
//! passes.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::ChangeMembers;
use serde::{Deserialize, Serialize};

use crate::proposal::Proposer;
use crate::raft::network::{PeerChannels, PeerRpc};
use crate::raft::peers::PeerGuard;
use crate::raft::{KordNode, NodeId, Raft, RaftMetrics};
use crate::state::{ApplyError, Command, CreateMode, Op, SubOp, WriteId};
use crate::storage::state_machine::SharedState;

/// The membership service's subtree: read-only for clients (the Kv edge refuses writes).
pub const MEMBERS_DIR: &str = "/kord/members";
/// Where removed member ids are remembered (one persistent znode per id), under MEMBERS_DIR.
pub const REMOVED_DIR: &str = "/kord/members/removed";

/// How long a change may take when the request carries no deadline (`kord --join`).
pub const DEFAULT_ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

const POLL: Duration = Duration::from_millis(50);

pub fn tombstone_path(id: NodeId) -> String {
    format!("{REMOVED_DIR}/{id}")
}

/// A member to add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMember {
    pub id: NodeId,
    pub node: KordNode,
    /// Stay a learner (observers always do).
    pub learner_only: bool,
    /// Return only once the learner is within `max_lag` entries of the leader.
    pub wait_caught_up: bool,
    /// 0: the server default.
    pub max_lag: u64,
}

/// What an admin call asks for; forwarded to the leader as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    List,
    Add(NewMember),
    Promote {
        id: NodeId,
        max_lag: u64,
    },
    Remove {
        id: NodeId,
    },
    Replace {
        old_id: NodeId,
        new: NewMember,
    },
    Transfer {
        to: NodeId,
    },
    /// Leader to transfer target: start an election now.
    Elect {
        from: NodeId,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminCall {
    pub request: AdminRequest,
    /// What is left of the client's deadline.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Voter,
    Learner,
    Observer,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub id: NodeId,
    pub node: KordNode,
    pub role: Role,
    /// Replication progress, known on the leader only (0 elsewhere).
    pub matched_index: u64,
    pub lag: u64,
    pub last_contact_ms: Option<u64>,
    pub is_leader: bool,
}

/// The membership as one member (the leader, for admin calls) sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersView {
    /// The member that produced this view.
    pub member_id: NodeId,
    pub term: u64,
    pub leader_id: NodeId,
    pub members: Vec<MemberView>,
    /// A joint configuration is in effect, or a change is running on the leader.
    pub change_in_progress: bool,
}

pub type AdminReply = Result<MembersView, MembershipError>;

/// Why an admin call was refused or failed. Serializable: a forwarded call returns it as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MembershipError {
    #[error("membership change in progress: {0}")]
    InProgress(String),
    #[error("member id {id} {why}")]
    IdUsed { id: NodeId, why: String },
    #[error("{0}")]
    Invalid(String),
    #[error("member {0} is not a member of the cluster")]
    NotMember(NodeId),
    /// A precondition of the change does not hold (lagging, observer, majority, leader).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Unavailable(String),
}

type Result<T, E = MembershipError> = std::result::Result<T, E>;

/// Server settings for admin calls.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Default catch-up threshold (entries behind the leader's last log index).
    pub max_lag: u64,
    /// The Raft election timeout (minimum); paces transfer attempts.
    pub election_timeout: Duration,
}

#[derive(Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    raft: Raft,
    state: SharedState,
    proposer: Proposer,
    channels: PeerChannels,
    guard: Arc<PeerGuard>,
    settings: Settings,
    /// Held by the running change on the leader: a second one is refused, never interleaved.
    change: tokio::sync::Mutex<()>,
    /// Set while `change` is held, for views (which must not touch the lock: a view taking it
    /// even briefly could make a concurrent change look refused).
    changing: AtomicBool,
}

impl Membership {
    pub fn new(
        raft: Raft,
        state: SharedState,
        proposer: Proposer,
        channels: PeerChannels,
        guard: Arc<PeerGuard>,
        settings: Settings,
    ) -> Membership {
        Membership {
            inner: Arc::new(Inner {
                id: guard.id(),
                raft,
                state,
                proposer,
                channels,
                guard,
                settings,
                change: tokio::sync::Mutex::new(()),
                changing: AtomicBool::new(false),
            }),
        }
    }

    fn metrics(&self) -> RaftMetrics {
        self.inner.raft.metrics().borrow().clone()
    }

    // ---- views ----------------------------------------------------------------------------

    /// The membership as this member sees it; progress fields only when it leads.
    pub fn view(&self) -> MembersView {
        let m = self.metrics();
        let me = self.inner.id;
        let leading = m.current_leader == Some(me);
        let last = m.last_log_index.unwrap_or(0);
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members = membership
            .nodes()
            .map(|(&id, node)| {
                let role = if voters.contains(&id) {
                    Role::Voter
                } else if node.observer {
                    Role::Observer
                } else {
                    Role::Learner
                };
                let (matched_index, lag, last_contact_ms) = if !leading {
                    (0, 0, None)
                } else if id == me {
                    (last, 0, Some(0))
                } else {
                    let matched = matched(&m, id).unwrap_or(0);
                    let contact = self
                        .inner
                        .guard
                        .since_contact(id)
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                    (matched, last.saturating_sub(matched), contact)
                };
                MemberView {
                    id,
                    node: node.clone(),
                    role,
                    matched_index,
                    lag,
                    last_contact_ms,
                    is_leader: m.current_leader == Some(id),
                }
            })
            .collect();
        MembersView {
            member_id: me,
            term: m.current_term,
            leader_id: m.current_leader.unwrap_or(0),
            members,
            change_in_progress: membership.get_joint_config().len() > 1
                || (leading && self.inner.changing.load(Ordering::Relaxed)),
        }
    }

    /// Whether `id` was removed: tombstoned and absent from this member's membership. A
    /// tombstone of a member still in the configuration (a removal under way) does not count.
    pub fn is_removed(&self, id: NodeId) -> bool {
        // The membership first: it is the cheap check, and it clears every current member
        // (every Raft RPC passes here).
        let member = self
            .inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .is_some();
        !member && self.tombstoned(id)
    }

    /// This member's own removal, as its applied state shows it.
    fn removed_here(&self) -> Option<String> {
        let me = self.inner.id;
        let applied = self.inner.state.read();
        let tombstoned = applied.state.get(&tombstone_path(me)).is_some();
        let member = applied.membership.membership().get_node(&me).is_some();
        (tombstoned && !member).then(|| {
            format!(
                "member {me} was removed from the cluster (its tombstone {} is applied and the \
                 membership no longer lists it); a removed id is never reused: wipe the data \
                 directory and join with a new id",
                tombstone_path(me)
            )
        })
    }

    /// Resolves when this member learns it was removed: from its own applied state (looked
    /// at on every tick of `checks`), or from a peer refusing its Raft traffic. The caller
    /// stops the process.
    pub async fn removed(&self, mut checks: tokio::time::Interval) -> String {
        loop {
            if let Some(reason) = self.removed_here() {
                self.inner.guard.removed(reason);
            }
            tokio::select! {
                reason = self.inner.guard.wait_removed() => return reason,
                _ = checks.tick() => {}
            }
        }
    }

    // ---- entry points ---------------------------------------------------------------------

    /// Runs an admin call on the leader, forwarding it there from other members.
    #[tracing::instrument(skip(self), fields(member = self.inner.id))]
    pub async fn execute(&self, request: AdminRequest, timeout: Duration) -> AdminReply {
        let deadline = Instant::now() + timeout;
        let leader = self.leader(deadline).await?;
        if leader == self.inner.id {
            return self.execute_here(request, deadline).await;
        }
        let call = AdminCall {
            request,
            timeout_ms: ms(deadline.saturating_duration_since(Instant::now())),
        };
        self.call_peer(leader, &call, deadline).await?
    }

    /// A call another member forwarded (or, for `Elect`, the leader's transfer request).
    pub async fn serve_forwarded(&self, call: AdminCall) -> AdminReply {
        let deadline = Instant::now() + Duration::from_millis(call.timeout_ms);
        self.execute_here(call.request, deadline).await
    }

    async fn execute_here(&self, request: AdminRequest, deadline: Instant) -> AdminReply {
        match request {
            AdminRequest::Elect { from } => return self.elect_here(from).await,
            AdminRequest::List => {
                self.ensure_leader()?;
                return Ok(self.view());
            }
            _ => {}
        }
        self.ensure_leader()?;
        {
            let _running = self.inner.change.try_lock().map_err(|_| {
                MembershipError::InProgress(
                    "another membership change is running on the leader; retry once it is done"
                        .into(),
                )
            })?;
            let _flag = Changing::set(&self.inner.changing);
            self.ensure_settled(deadline).await?;
            match request {
                AdminRequest::Add(new) => self.add(new, deadline).await?,
                AdminRequest::Promote { id, max_lag } => {
                    self.promote(id, max_lag, deadline).await?
                }
                AdminRequest::Remove { id } => self.remove(id, deadline).await?,
                AdminRequest::Replace { old_id, new } => {
                    self.replace(old_id, new, deadline).await?
                }
                AdminRequest::Transfer { to } => self.transfer(to, deadline).await?,
                AdminRequest::List | AdminRequest::Elect { .. } => {}
            }
        }
        Ok(self.view())
    }

    // ---- the changes ----------------------------------------------------------------------

    #[tracing::instrument(skip(self, new), fields(new_id = new.id, node = %new.node))]
    async fn add(&self, new: NewMember, deadline: Instant) -> Result<()> {
        validate(&new)?;
        let learner_only = new.learner_only || new.node.observer;
        self.add_learner(&new).await?;
        if new.wait_caught_up || !learner_only {
            self.wait_caught_up(new.id, self.max_lag(new.max_lag), deadline)
                .await?;
        }
        if !learner_only {
            tracing::info!(member = new.id, "promoting the new member to voter");
            self.change(
                ChangeMembers::AddVoterIds(BTreeSet::from([new.id])),
                deadline,
            )
            .await?;
        }
        Ok(())
    }

    #[tracing::instrument(skip(self))]
    async fn promote(&self, id: NodeId, max_lag: u64, deadline: Instant) -> Result<()> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let node = membership
            .get_node(&id)
            .ok_or(MembershipError::NotMember(id))?;
        if membership.voter_ids().any(|v| v == id) {
            return Ok(());
        }
        if node.observer {
            return Err(MembershipError::Refused(format!(
                "member {id} is an observer: observers are never promoted to voter \
                 (replace it with a new member instead)"
            )));
        }
        let max_lag = self.max_lag(max_lag);
        let lag = lag(&m, id);
        if lag.is_none_or(|lag| lag > max_lag) {
            return Err(MembershipError::Refused(format!(
                "member {id} is not caught up: {} entries behind the leader, more than max_lag \
                 {max_lag}; wait until it catches up",
                lag.map_or("an unknown number of".to_owned(), |l| l.to_string())
            )));
        }
        tracing::info!(member = id, "promoting learner to voter");
        self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id])), deadline)
            .await
    }

    #[tracing::instrument(skip(self))]
    async fn remove(&self, id: NodeId, deadline: Instant) -> Result<()> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        if membership.get_node(&id).is_none() {
            return if self.tombstoned(id) {
                Ok(()) // removed earlier: a retry
            } else {
                Err(MembershipError::NotMember(id))
            };
        }
        self.refuse_self(id)?;
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let is_voter = voters.contains(&id);
        if is_voter {
            check_majority_kept(&voters, &BTreeSet::from([id]))?;
        }
        self.tombstone(id, membership.get_node(&id)).await?;
        tracing::info!(member = id, is_voter, "removing member");
        let change = if is_voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.change(change, deadline).await
    }

    /// This member leads: it is never removed or replaced directly.
    fn refuse_self(&self, id: NodeId) -> Result<()> {
        if id == self.inner.id {
            return Err(MembershipError::Refused(format!(
                "member {id} is the leader: transfer leadership to another voter first \
                 (TransferLeader)"
            )));
        }
        Ok(())
    }

    #[tracing::instrument(skip(self, new), fields(new_id = new.id))]
    async fn replace(&self, old_id: NodeId, new: NewMember, deadline: Instant) -> Result<()> {
        validate(&new)?;
        if old_id == new.id {
            return Err(MembershipError::Invalid(
                "new_member.id must differ from old_id: a member's id is never reused".into(),
            ));
        }
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let old = membership
            .get_node(&old_id)
            .cloned()
            .ok_or(MembershipError::NotMember(old_id))?;
        self.refuse_self(old_id)?;
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let old_is_voter = voters.contains(&old_id);
        if old_is_voter && new.node.observer {
            return Err(MembershipError::Invalid(format!(
                "an observer cannot replace voter {old_id}: new_member.observer must be false"
            )));
        }
        // The new member first catches up as a learner (snapshot plus log)...
        self.add_learner(&new).await?;
        self.wait_caught_up(new.id, self.max_lag(new.max_lag), deadline)
            .await?;
        // ...then one joint-consensus change swaps it in for the old one, which leaves.
        self.tombstone(old_id, Some(&old)).await?;
        let change = if old_is_voter {
            let mut next = voters;
            next.remove(&old_id);
            next.insert(new.id);
            tracing::info!(old_id, new_id = new.id, voters = ?next, "swapping voters");
            ChangeMembers::ReplaceAllVoters(next)
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([old_id]))
        };
        self.change(change, deadline).await
    }

    #[tracing::instrument(skip(self))]
    async fn transfer(&self, to: NodeId, deadline: Instant) -> Result<()> {
        let me = self.inner.id;
        if to == me {
            return Ok(());
        }
        let m = self.metrics();
        let membership = m.membership_config.membership();
        if membership.get_node(&to).is_none() {
            return Err(MembershipError::NotMember(to));
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if !voters.contains(&to) {
            return Err(MembershipError::Refused(format!(
                "member {to} is not a voter: only a voter can lead"
            )));
        }
        // A target far behind would keep the fence up past the followers' election timers.
        self.wait_caught_up(to, self.max_lag(0), deadline).await?;
        let fence = Fence::new(&self.inner.guard, to);
        tracing::info!(to, "transferring leadership");
        // The fenced voters grant votes once their leader lease (openraft: the maximum election
        // timeout, twice the minimum) has run out since our last AppendEntries reached them.
        // Asking earlier only makes the target a candidate they refuse, which disrupts the
        // term; later than lease plus the minimum timeout, they start elections of their own.
        // A fifth of the timeout of slack covers AppendEntries already in flight at the fence.
        let timeout = self.inner.settings.election_timeout;
        let mut next_attempt = Instant::now() + timeout * 2 + timeout / 5;
        loop {
            let m = self.metrics();
            if m.current_leader == Some(to) {
                tracing::info!(to, "leadership transferred");
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MembershipError::Timeout(format!(
                    "member {to} did not become the leader before the deadline (leader now: {})",
                    m.current_leader
                        .map_or("unknown".to_owned(), |l| l.to_string())
                )));
            }
            let pace = self.inner.settings.election_timeout / 2;
            // The target must hold every entry the other voters may hold, or they refuse it.
            if now >= next_attempt && target_caught_up(&m, to, &voters) {
                next_attempt = now + pace;
                let call = AdminCall {
                    request: AdminRequest::Elect { from: me },
                    timeout_ms: ms(pace.max(POLL)),
                };
                let reply = self.call_peer(to, &call, deadline).await;
                if let Err(e) | Ok(Err(e)) = reply.map(|r| r.map(|_| ())) {
                    tracing::info!(to, error = %e, "election request to the target failed; retrying");
                }
            }
            tokio::time::sleep(POLL).await;
        }
        drop(fence);
        Ok(())
    }

    /// On the transfer target: start an election now.
    async fn elect_here(&self, from: NodeId) -> AdminReply {
        let m = self.metrics();
        let me = self.inner.id;
        if !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == me)
        {
            return Err(MembershipError::Refused(format!(
                "member {me} is not a voter and cannot lead"
            )));
        }
        tracing::info!(from, "starting an election on the leader's request");
        self.inner
            .raft
            .trigger()
            .elect()
            .await
            .map_err(|e| MembershipError::Unavailable(format!("raft stopped: {e}")))?;
        Ok(self.view())
    }

    // ---- steps ----------------------------------------------------------------------------

    /// Adds `new` as a learner, unless it is already one with the same address (a retry).
    async fn add_learner(&self, new: &NewMember) -> Result<()> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        if let Some(node) = membership.get_node(&new.id) {
            // A retry (or `kord --join` racing an operator's call) resumes; a voter is never
            // demoted by it.
            let same = node.peer_addr == new.node.peer_addr && node.observer == new.node.observer;
            // Joiners always ask as learners first, with no data. A voter asking that has lost
            // the data it voted and acknowledged with: letting it back under its id could lose
            // committed writes, so it must be replaced under a new id.
            let voter = membership.voter_ids().any(|v| v == new.id);
            if voter && new.learner_only {
                return Err(MembershipError::IdUsed {
                    id: new.id,
                    why: "is a voter, and a voter never joins as a learner: this one has lost its \
                          data; remove it and add a member with a new id"
                        .into(),
                });
            }
            if same {
                tracing::info!(
                    member = new.id,
                    "already a member with this address: resuming"
                );
                return Ok(());
            }
            return Err(MembershipError::IdUsed {
                id: new.id,
                why: format!("is already a member ({node})"),
            });
        }
        if self.tombstoned(new.id) {
            return Err(MembershipError::IdUsed {
                id: new.id,
                why: "was removed from the cluster and is never reused: pick a new id".into(),
            });
        }
        tracing::info!(member = new.id, node = %new.node, "adding learner");
        self.inner
            .raft
            .add_learner(new.id, new.node.clone(), false)
            .await
            .map(|_| ())
            .map_err(change_error)
    }

    /// Waits until `id` is within `max_lag` entries of the leader's last log index.
    async fn wait_caught_up(&self, id: NodeId, max_lag: u64, deadline: Instant) -> Result<()> {
        loop {
            let m = self.metrics();
            let lag = lag(&m, id);
            if lag.is_some_and(|l| l <= max_lag) {
                tracing::info!(member = id, ?lag, "caught up");
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(MembershipError::Timeout(format!(
                    "member {id} did not catch up to within {max_lag} entries of the leader \
                     before the deadline (lag: {})",
                    lag.map_or("unknown".to_owned(), |l| l.to_string())
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// One configuration change through openraft (joint consensus for voter changes), bounded
    /// by the deadline.
    async fn change(
        &self,
        change: ChangeMembers<NodeId, KordNode>,
        deadline: Instant,
    ) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.inner.raft.change_membership(change, false)).await {
            Ok(result) => result.map(|_| ()).map_err(change_error),
            Err(_) => Err(MembershipError::Timeout(
                "the configuration change did not commit before the deadline; its outcome is \
                 unknown: list the members to see it"
                    .into(),
            )),
        }
    }

    /// Refuses a new change while the last one is not finished. A joint configuration left
    /// by a previous leader is finished here (to its new side) and the call refused, so the
    /// caller's retry starts from a settled configuration.
    async fn ensure_settled(&self, deadline: Instant) -> Result<()> {
        let m = self.metrics();
        let joint = m.membership_config.membership().get_joint_config().clone();
        if joint.len() <= 1 {
            return Ok(());
        }
        let next = joint.last().cloned().unwrap_or_default();
        tracing::warn!(
            ?joint,
            "finishing a joint configuration left by a previous leader"
        );
        let finished = self
            .change(ChangeMembers::ReplaceAllVoters(next), deadline)
            .await;
        Err(MembershipError::InProgress(match finished {
            Ok(()) => "a joint configuration was in effect; it has been finished: retry".into(),
            Err(e) => format!("a joint configuration is in effect and finishing it failed: {e}"),
        }))
    }

    fn tombstoned(&self, id: NodeId) -> bool {
        self.inner
            .state
            .read()
            .state
            .get(&tombstone_path(id))
            .is_some()
    }

    /// Records `id` as removed, through the log, before the change that removes it.
    async fn tombstone(&self, id: NodeId, node: Option<&KordNode>) -> Result<()> {
        let path = tombstone_path(id);
        let data = node.map(|n| n.to_string()).unwrap_or_default();
        for (dir, data) in [
            ("/kord", Vec::new()),
            ("/kord/members", Vec::new()),
            (REMOVED_DIR, Vec::new()),
            (path.as_str(), data.into_bytes()),
        ] {
            if self.inner.state.read().state.get(dir).is_some() {
                continue;
            }
            let cmd = Command {
                write_id: WriteId::default(),
                time_ms: 0,
                op: Op::Single(SubOp::Create {
                    path: dir.to_owned(),
                    data,
                    sequential: false,
                    mode: CreateMode::Persistent,
                }),
            };
            let failed = |why: String| {
                MembershipError::Unavailable(format!(
                    "recording the removal of member {id} at {path}: {why}"
                ))
            };
            let out = self
                .inner
                .proposer
                .propose(cmd)
                .await
                .map_err(|e| failed(e.to_string()))?;
            match out.reply {
                Ok(_) | Err(ApplyError::NodeExists { .. }) => {}
                Err(e) => return Err(failed(e.to_string())),
            }
        }
        Ok(())
    }

    // ---- plumbing -------------------------------------------------------------------------

    fn max_lag(&self, requested: u64) -> u64 {
        if requested == 0 {
            self.inner.settings.max_lag
        } else {
            requested
        }
    }

    fn ensure_leader(&self) -> Result<()> {
        let leader = self.inner.raft.metrics().borrow().current_leader;
        if leader == Some(self.inner.id) {
            Ok(())
        } else {
            Err(MembershipError::Unavailable(format!(
                "member {} is not the leader (leader: {}); retry",
                self.inner.id,
                leader.map_or("unknown".to_owned(), |l| l.to_string())
            )))
        }
    }

    /// The current leader, waiting (bounded by the deadline) for an election to finish.
    async fn leader(&self, deadline: Instant) -> Result<NodeId> {
        loop {
            if let Some(l) = self.inner.raft.metrics().borrow().current_leader {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                return Err(MembershipError::Unavailable("no leader elected yet".into()));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends an admin call to another member over the peer link.
    async fn call_peer(
        &self,
        to: NodeId,
        call: &AdminCall,
        deadline: Instant,
    ) -> Result<AdminReply> {
        let addr = self
            .inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&to)
            .map(|n| n.peer_addr.clone())
            .ok_or(MembershipError::Unavailable(format!(
                "member {to} is not in this member's membership"
            )))?;
        // A little over the call's own budget, so the remote's answer arrives before ours ends.
        let timeout =
            deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(500);
        self.inner
            .channels
            .call(&addr, PeerRpc::Admin, call, timeout)
            .await
            .map_err(|why| {
                MembershipError::Unavailable(format!("calling member {to} at {addr}: {why}"))
            })
    }
}

/// Marks a change as running while it lives.
struct Changing<'a>(&'a AtomicBool);

impl<'a> Changing<'a> {
    fn set(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        Changing(flag)
    }
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Holds replication back from every follower but the transfer target while it lives.
struct Fence<'a>(&'a PeerGuard);

impl<'a> Fence<'a> {
    fn new(guard: &'a PeerGuard, to: NodeId) -> Self {
        guard.set_fence(Some(to));
        Fence(guard)
    }
}

impl Drop for Fence<'_> {
    fn drop(&mut self) {
        self.0.set_fence(None);
    }
}

fn validate(new: &NewMember) -> Result<()> {
    if new.id == 0 {
        return Err(MembershipError::Invalid(
            "id must be a positive integer".into(),
        ));
    }
    if new.node.peer_addr.is_empty() {
        return Err(MembershipError::Invalid(
            "peer_addr must not be empty".into(),
        ));
    }
    Ok(())
}

/// The voters kept must be a majority of the current voters, so no single step can hand the
/// cluster to a minority of its members (2 voters never shrink to 1, the last never leaves).
pub fn check_majority_kept(voters: &BTreeSet<NodeId>, removed: &BTreeSet<NodeId>) -> Result<()> {
    let kept = voters.difference(removed).count();
    let majority = voters.len() / 2 + 1;
    if kept < majority {
        return Err(MembershipError::Refused(format!(
            "removing {removed:?} would keep {kept} of {} voters, fewer than a majority \
             ({majority}) of the current voters: add or promote a voter first",
            voters.len()
        )));
    }
    Ok(())
}

fn matched(m: &RaftMetrics, id: NodeId) -> Option<u64> {
    m.replication
        .as_ref()?
        .get(&id)
        .copied()
        .flatten()
        .map(|l| l.index)
}

/// Entries `id` is behind the leader's last log index; None when unknown.
fn lag(m: &RaftMetrics, id: NodeId) -> Option<u64> {
    let matched = matched(m, id)?;
    Some(m.last_log_index.unwrap_or(0).saturating_sub(matched))
}

fn target_caught_up(m: &RaftMetrics, to: NodeId, voters: &BTreeSet<NodeId>) -> bool {
    let Some(target) = matched(m, to) else {
        return false;
    };
    voters
        .iter()
        .filter(|&&v| v != to && Some(v) != m.current_leader)
        .all(|&v| matched(m, v).unwrap_or(0) <= target)
}

fn change_error(e: RaftError<NodeId, ClientWriteError<NodeId, KordNode>>) -> MembershipError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            MembershipError::Unavailable(format!(
                "this member is no longer the leader (leader: {}); retry",
                f.leader_id.map_or("unknown".to_owned(), |l| l.to_string())
            ))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            e @ ChangeMembershipError::InProgress(_),
        )) => MembershipError::InProgress(e.to_string()),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            MembershipError::Refused(e.to_string())
        }
        RaftError::Fatal(f) => MembershipError::Unavailable(format!("raft stopped: {f}")),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_majority_of_voters_is_always_kept() {
        let three = BTreeSet::from([1, 2, 3]);
        assert!(check_majority_kept(&three, &BTreeSet::from([3])).is_ok());
        assert!(check_majority_kept(&three, &BTreeSet::from([2, 3])).is_err());
        let two = BTreeSet::from([1, 2]);
        let err = check_majority_kept(&two, &BTreeSet::from([2])).unwrap_err();
        assert!(err.to_string().contains("fewer than a majority"), "{err}");
        assert!(check_majority_kept(&BTreeSet::from([1]), &BTreeSet::from([1])).is_err());
        let five = BTreeSet::from([1, 2, 3, 4, 5]);
        assert!(check_majority_kept(&five, &BTreeSet::from([4, 5])).is_ok());
        assert!(check_majority_kept(&five, &BTreeSet::from([3, 4, 5])).is_err());
    }

    #[test]
    fn tombstones_live_under_the_removed_dir() {
        assert_eq!(tombstone_path(7), "/kord/members/removed/7");
    }
}
