//! Planning: a pure function from (desired cluster, observed pods/volumes/Raft membership, clock)
//! to the next single step. No I/O and no clock reads here; `actuate.rs` executes the step and
//! the controller observes again before planning the next one, so a crash between two steps
//! just re-plans from what is really there.
//!
//! Safety rules every step obeys (property-tested in `tests/plan_props.rs`):
//! - with no leader, or fewer than a majority of voters healthy, only pods of members whose
//!   volume is intact are recreated: nothing is removed, restarted or deleted;
//! - a step never leaves fewer than a majority of the (new) voter set healthy;
//! - pods and volumes are deleted only for ids that are not (or no longer) Raft members; a voter's
//!   pod is only ever restarted on its own volume (rolling update), never deleted for good;
//! - member ids are never reused: new members take `next_id`, which only grows;
//! - a member's removal is first recorded on its objects (`Retire`), so a crash right after the
//!   Raft removal never mistakes the leftover pod for a member that is still joining.

use std::collections::BTreeMap;
use std::fmt;

pub type MemberId = u64;
/// Milliseconds on the operator's clock (Unix epoch in production, anything in tests).
pub type Millis = u64;

/// A learner within this many entries of the leader is caught up and may be promoted.
pub const CAUGHT_UP_LAG: u64 = 1_000;
/// A new member not in the Raft membership after this long is given up (retired and deleted).
pub const DEFAULT_JOIN_TIMEOUT_MS: Millis = 10 * 60 * 1000;

/// What the user asked for, reduced to what planning needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub voters: usize,
    pub observers: usize,
    /// The pod template's revision (`objects::pod_revision`): a member pod made from another
    /// is outdated and is rolled.
    pub revision: String,
    /// Members keep data in an emptyDir: a pod gone is a member's data gone.
    pub ephemeral: bool,
    /// How long a member may be unhealthy before it is replaced.
    pub replace_after: Millis,
    pub join_timeout: Millis,
}

/// Everything the operator observed, in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub now: Millis,
    /// The next id to allocate: at least one more than every id seen anywhere.
    pub next_id: MemberId,
    /// The cluster was formed once (recorded in status); bootstrap flags are never used again.
    pub bootstrapped: bool,
    /// Every id that has a pod, a volume or a Raft membership.
    pub members: BTreeMap<MemberId, Member>,
    /// The leader's view; `None` when no leader answers.
    pub raft: Option<RaftView>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftView {
    pub leader: MemberId,
    /// A joint configuration is in effect.
    pub change_in_progress: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Meant to be (or become) a voter.
    Voter,
    /// A permanent non-voting member.
    Observer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RaftRole {
    Voter,
    /// Non-voting (a learner catching up, or an observer).
    Learner,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub kind: Kind,
    /// Marked for removal on its objects.
    pub retired: bool,
    pub pod: Option<Pod>,
    /// The member's data is intact: its volume exists and is not being deleted (for ephemeral
    /// storage: its pod exists).
    pub volume: bool,
    pub raft: Option<RaftRole>,
    /// Entries behind the leader.
    pub lag: u64,
    /// Its pod is ready and (for Raft members) the leader hears from it.
    pub healthy: bool,
    /// When it was last seen healthy or created (only meaningful while unhealthy).
    pub unhealthy_since: Millis,
    /// When its first object was created.
    pub created_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// The revision of the spec the pod was made from.
    pub revision: String,
}

/// One action. Each is idempotent: applying it twice is the same as once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Form the cluster: the first member's volume and pod, with `--initial-cluster` of itself.
    Bootstrap {
        id: MemberId,
    },
    /// A new member's volume and pod, joining as a learner (never reuses an id).
    CreateMember {
        id: MemberId,
        kind: Kind,
    },
    /// Recreate a member's pod on its intact volume.
    CreatePod {
        id: MemberId,
        bootstrap: bool,
    },
    /// Record on the member's objects that it is to be removed.
    Retire {
        id: MemberId,
        reason: RetireReason,
    },
    /// Learner to voter (joint consensus).
    Promote {
        id: MemberId,
    },
    TransferLeader {
        from: MemberId,
        to: MemberId,
    },
    /// Out of the Raft membership (joint consensus for voters).
    RemoveMember {
        id: MemberId,
    },
    /// Rolling update: delete the pod; `CreatePod` brings it back on the same volume.
    RestartPod {
        id: MemberId,
    },
    /// Delete the pod of an id that is not a Raft member.
    DeletePod {
        id: MemberId,
    },
    /// Delete the volume of an id that is not a Raft member and has no pod.
    DeleteVolume {
        id: MemberId,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetireReason {
    ScaleDown,
    /// Its data is gone (volume lost or being deleted).
    DataLost,
    /// Unhealthy for longer than the grace period.
    Unhealthy,
    /// Never made it into the membership.
    JoinTimedOut,
    /// Not needed any more (a learner after a scale-down, an extra observer).
    Surplus,
    /// Rolling update of a member that cannot be restarted in place.
    Outdated,
}

/// Why nothing is done now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    Bootstrapping,
    /// No leader answers. Degraded: nothing destructive is done.
    NoLeader,
    /// Every member's data is gone after the cluster was formed. Degraded: needs a human.
    AllDataLost,
    /// Fewer than a majority of voters are healthy. Degraded: nothing destructive is done.
    QuorumUnhealthy {
        healthy: usize,
        voters: usize,
    },
    ChangeInProgress,
    Joining {
        id: MemberId,
    },
    CatchingUp {
        id: MemberId,
        lag: u64,
    },
    /// The next step would leave too few healthy voters; waiting for members to recover.
    QuorumAtRisk {
        id: MemberId,
    },
    /// A rolling update waits for every member to be healthy again.
    Recovering {
        id: MemberId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Act(Step),
    Wait(Wait),
    /// Nothing to do: the cluster matches the spec.
    Converged,
}

impl Wait {
    /// Waits that mean the cluster is not serving safely (Degraded condition).
    pub fn degraded(&self) -> bool {
        matches!(
            self,
            Wait::NoLeader | Wait::AllDataLost | Wait::QuorumUnhealthy { .. }
        )
    }
}

/// Smallest number of voters that forms a quorum of `n`.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

impl Member {
    fn is_voter(&self) -> bool {
        self.raft == Some(RaftRole::Voter)
    }

    /// Must leave: retired, data gone, or unhealthy past the grace period.
    fn condemned(&self, desired: &Desired, now: Millis) -> bool {
        self.retired
            || !self.volume
            || (!self.healthy && now.saturating_sub(self.unhealthy_since) >= desired.replace_after)
    }

    /// Nothing is left to carry a retirement mark.
    fn marked(&self) -> bool {
        self.retired || (self.pod.is_none() && !self.volume)
    }

    fn retire_reason(&self, desired: &Desired, now: Millis) -> RetireReason {
        if !self.volume {
            RetireReason::DataLost
        } else if !self.healthy && now.saturating_sub(self.unhealthy_since) >= desired.replace_after
        {
            RetireReason::Unhealthy
        } else {
            RetireReason::Surplus
        }
    }
}

/// The next step towards `desired`, or why to wait.
pub fn plan(desired: &Desired, obs: &Observed) -> Plan {
    let now = obs.now;
    let members = &obs.members;

    // Recreating a pod on its own intact volume is never destructive: it is how a member whose
    // pod was evicted (or restarted for an update) comes back, and how quorum is regained. A
    // retired member still in the membership counts for quorum until it is removed: it too.
    let bootstrapped = obs.bootstrapped || obs.raft.is_some();
    if let Some((&id, _)) = members
        .iter()
        .find(|(_, m)| m.pod.is_none() && m.volume && (!m.retired || m.raft.is_some()))
    {
        return Plan::Act(Step::CreatePod {
            id,
            bootstrap: !bootstrapped,
        });
    }

    if !bootstrapped {
        // A pod whose volume is gone before the cluster formed holds nothing: start over.
        if let Some((&id, _)) = members.iter().find(|(_, m)| !m.volume && m.pod.is_some()) {
            return Plan::Act(Step::DeletePod { id });
        }
        if members.values().all(|m| !m.volume) {
            return Plan::Act(Step::Bootstrap { id: obs.next_id });
        }
        return Plan::Wait(Wait::Bootstrapping);
    }
    let Some(raft) = &obs.raft else {
        if members.values().all(|m| !m.volume) {
            return Plan::Wait(Wait::AllDataLost);
        }
        return Plan::Wait(Wait::NoLeader);
    };
    if raft.change_in_progress {
        return Plan::Wait(Wait::ChangeInProgress);
    }

    let voters: Vec<MemberId> = ids(members, |m| m.is_voter());
    let healthy = count(members, |m| m.is_voter() && m.healthy);
    if healthy < majority(voters.len()) {
        return Plan::Wait(Wait::QuorumUnhealthy {
            healthy,
            voters: voters.len(),
        });
    }

    // Ids outside the membership: clean up what was removed or lost; give up on joins that
    // never happened.
    for (&id, m) in members.iter().filter(|(_, m)| m.raft.is_none()) {
        if m.retired || !m.volume {
            if m.pod.is_some() {
                return Plan::Act(Step::DeletePod { id });
            }
            if m.volume {
                return Plan::Act(Step::DeleteVolume { id });
            }
        } else if now.saturating_sub(m.created_at) >= desired.join_timeout {
            return Plan::Act(Step::Retire {
                id,
                reason: RetireReason::JoinTimedOut,
            });
        }
    }

    // Non-voters that must go: mark, then remove (no quorum impact).
    for (&id, m) in members
        .iter()
        .filter(|(_, m)| m.raft == Some(RaftRole::Learner))
    {
        if m.condemned(desired, now) {
            if !m.marked() {
                let reason = m.retire_reason(desired, now);
                return Plan::Act(Step::Retire { id, reason });
            }
            return Plan::Act(Step::RemoveMember { id });
        }
    }

    let good_voters = ids(members, |m| m.is_voter() && !m.condemned(desired, now));
    let candidates = ids(members, |m| {
        m.raft == Some(RaftRole::Learner) && m.kind == Kind::Voter
    });
    let joining = |kind: Kind| {
        members
            .iter()
            .find(|(_, m)| m.raft.is_none() && !m.retired && m.volume && m.kind == kind)
            .map(|(&id, _)| id)
    };

    // Too few good voters (scale-up or replacement): one new member at a time, learner first.
    if good_voters.len() < desired.voters {
        if let Some(&id) = candidates.first() {
            let m = &members[&id];
            if m.healthy && m.lag <= CAUGHT_UP_LAG {
                return Plan::Act(Step::Promote { id });
            }
            return Plan::Wait(Wait::CatchingUp { id, lag: m.lag });
        }
        if let Some(id) = joining(Kind::Voter) {
            return Plan::Wait(Wait::Joining { id });
        }
        return Plan::Act(Step::CreateMember {
            id: obs.next_id,
            kind: Kind::Voter,
        });
    }
    // Enough voters: learners meant as voters are surplus (the spec shrank while they joined).
    if let Some(&id) = candidates.first() {
        return Plan::Act(Step::Retire {
            id,
            reason: RetireReason::Surplus,
        });
    }
    if let Some(id) = joining(Kind::Voter) {
        return Plan::Act(Step::Retire {
            id,
            reason: RetireReason::Surplus,
        });
    }

    // Condemned voters leave once their replacements are in: mark, move leadership away, remove.
    // Unhealthy ones first, then those whose data is gone: removing them never lowers the share
    // of voters that can stay healthy (a healthy one first could wait forever for a majority it
    // takes away itself).
    if let Some(id) = voters
        .iter()
        .copied()
        .filter(|id| members[id].condemned(desired, now))
        .min_by_key(|&id| {
            let m = &members[&id];
            (m.healthy, m.volume, id == raft.leader, id)
        })
    {
        return remove_voter(desired, obs, &voters, id);
    }

    // Scale down: retire one good voter (unhealthy ones first, the leader last).
    if good_voters.len() > desired.voters {
        let victim = good_voters
            .iter()
            .copied()
            .max_by_key(|&id| (!members[&id].healthy, id != raft.leader, id))
            .unwrap_or(raft.leader);
        return Plan::Act(Step::Retire {
            id: victim,
            reason: RetireReason::ScaleDown,
        });
    }

    // Observers: create or retire one at a time.
    let observers = ids(members, |m| {
        m.kind == Kind::Observer && !m.condemned(desired, now) && m.raft.is_some()
    });
    let joining_observer = joining(Kind::Observer);
    let observer_count = observers.len() + usize::from(joining_observer.is_some());
    if observer_count < desired.observers {
        if let Some(id) = joining_observer {
            return Plan::Wait(Wait::Joining { id });
        }
        return Plan::Act(Step::CreateMember {
            id: obs.next_id,
            kind: Kind::Observer,
        });
    }
    if observer_count > desired.observers {
        let id = joining_observer.or(observers.last().copied());
        if let Some(id) = id {
            return Plan::Act(Step::Retire {
                id,
                reason: RetireReason::Surplus,
            });
        }
    }
    if joining_observer.is_some() {
        return Plan::Wait(Wait::Joining {
            id: joining_observer.unwrap_or_default(),
        });
    }

    rolling_update(desired, obs, &voters)
}

/// Removes a condemned voter: retire mark first, leadership away, then joint consensus.
fn remove_voter(desired: &Desired, obs: &Observed, voters: &[MemberId], id: MemberId) -> Plan {
    let members = &obs.members;
    let m = &members[&id];
    if !m.marked() {
        return Plan::Act(Step::Retire {
            id,
            reason: m.retire_reason(desired, obs.now),
        });
    }
    let leader = obs.raft.as_ref().map_or(0, |r| r.leader);
    if id == leader {
        return match transfer_target(desired, obs, voters, id) {
            Some(to) => Plan::Act(Step::TransferLeader { from: id, to }),
            None => Plan::Wait(Wait::QuorumAtRisk { id }),
        };
    }
    let remaining = voters.len() - 1;
    // A voter whose data is gone counts as lost already: it cannot come back after a restart.
    let healthy_after = voters
        .iter()
        .filter(|&&v| v != id && members[&v].healthy && members[&v].volume)
        .count();
    if healthy_after < majority(remaining) {
        return Plan::Wait(Wait::QuorumAtRisk { id });
    }
    Plan::Act(Step::RemoveMember { id })
}

/// A healthy voter that is staying, on the desired pod revision if possible, the least behind first.
fn transfer_target(
    desired: &Desired,
    obs: &Observed,
    voters: &[MemberId],
    from: MemberId,
) -> Option<MemberId> {
    voters
        .iter()
        .copied()
        .filter(|&v| v != from)
        .filter(|v| {
            let m = &obs.members[v];
            m.healthy && !m.condemned(desired, obs.now)
        })
        .min_by_key(|v| {
            let m = &obs.members[v];
            let outdated = m
                .pod
                .as_ref()
                .is_none_or(|p| p.revision != desired.revision);
            (outdated, m.lag, *v)
        })
}

/// Leader-aware rolling update: non-voters, then followers, the leader last after a transfer.
fn rolling_update(desired: &Desired, obs: &Observed, voters: &[MemberId]) -> Plan {
    let members = &obs.members;
    let leader = obs.raft.as_ref().map_or(0, |r| r.leader);
    let outdated = |m: &Member| {
        m.pod
            .as_ref()
            .is_some_and(|p| p.revision != desired.revision)
    };
    let mut order: Vec<MemberId> = members
        .iter()
        .filter(|(_, m)| outdated(m))
        .map(|(&id, _)| id)
        .collect();
    order.sort_by_key(|&id| (members[&id].is_voter(), id == leader, id));
    // One member down at a time: the previous one must be back first. A member unhealthy for
    // less than the grace period is waited for, not replaced (and the cluster is not converged).
    if let Some((&sick, _)) = members.iter().find(|(_, m)| !m.healthy) {
        return Plan::Wait(Wait::Recovering { id: sick });
    }
    let Some(&id) = order.first() else {
        return Plan::Converged;
    };
    let m = &members[&id];
    // No data survives a restart on ephemeral storage, and with one or two voters a restart
    // loses quorum: replace those under a new id instead (learner, promote, then remove).
    let restart_loses_quorum = m.is_voter() && voters.len() - 1 < majority(voters.len());
    if desired.ephemeral || restart_loses_quorum {
        return Plan::Act(Step::Retire {
            id,
            reason: RetireReason::Outdated,
        });
    }
    if id == leader {
        return match transfer_target(desired, obs, voters, id) {
            Some(to) => Plan::Act(Step::TransferLeader { from: id, to }),
            None => Plan::Wait(Wait::QuorumAtRisk { id }),
        };
    }
    Plan::Act(Step::RestartPod { id })
}

fn ids(members: &BTreeMap<MemberId, Member>, pred: impl Fn(&Member) -> bool) -> Vec<MemberId> {
    members
        .iter()
        .filter(|(_, m)| pred(m))
        .map(|(&id, _)| id)
        .collect()
}

fn count(members: &BTreeMap<MemberId, Member>, pred: impl Fn(&Member) -> bool) -> usize {
    members.values().filter(|m| pred(m)).count()
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Bootstrap { id } => write!(f, "bootstrap the cluster with member {id}"),
            Step::CreateMember { id, kind } => {
                write!(f, "create member {id} ({kind:?}) as a learner")
            }
            Step::CreatePod { id, .. } => {
                write!(f, "recreate the pod of member {id} on its volume")
            }
            Step::Retire { id, reason } => write!(f, "retire member {id} ({reason:?})"),
            Step::Promote { id } => write!(f, "promote member {id} to voter"),
            Step::TransferLeader { from, to } => {
                write!(f, "transfer leadership from member {from} to member {to}")
            }
            Step::RemoveMember { id } => write!(f, "remove member {id} from the membership"),
            Step::RestartPod { id } => write!(f, "restart the pod of member {id} (rolling update)"),
            Step::DeletePod { id } => write!(f, "delete the pod of removed member {id}"),
            Step::DeleteVolume { id } => write!(f, "delete the volume of removed member {id}"),
        }
    }
}

impl fmt::Display for Wait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wait::Bootstrapping => write!(f, "waiting for the first member to form the cluster"),
            Wait::NoLeader => write!(f, "no leader answers: quorum may be lost; nothing destructive is done"),
            Wait::AllDataLost => write!(f, "every member's data is gone; see the manual recovery in the README"),
            Wait::QuorumUnhealthy { healthy, voters } => write!(
                f,
                "only {healthy} of {voters} voters are healthy (a majority is needed); nothing destructive is done"
            ),
            Wait::ChangeInProgress => write!(f, "a joint-consensus change is in progress"),
            Wait::Joining { id } => write!(f, "waiting for member {id} to join as a learner"),
            Wait::CatchingUp { id, lag } => {
                write!(f, "waiting for learner {id} to catch up ({lag} entries behind)")
            }
            Wait::QuorumAtRisk { id } => write!(
                f,
                "member {id} must wait: acting now would leave too few healthy voters"
            ),
            Wait::Recovering { id } => write!(f, "waiting for member {id} to be healthy again"),
        }
    }
}
