//! Leader-only countdowns. The leader alone keeps, on its monotonic clock, when each lease
//! was last refreshed; when one goes unrefreshed for its TTL it proposes one `LeaseExpire`
//! entry, which deletes the lease's ephemeral nodes atomically when applied on every member.
//! Replicas never expire anything on their own clock. When a member becomes leader (or a new
//! term starts) every countdown restarts with the lease's full TTL, so a failover never
//! expires live sessions en masse: a lease can only outlive its TTL, never be cut short.
//!
//! The same loop reaps container nodes (childless after having had children) and TTL nodes
//! (unmodified for their TTL, childless) by proposing `Reap` entries that apply re-checks.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::proposal::Proposer;
use crate::raft::{NodeId, Raft, ServerState};
use crate::state::{Command, NodeKind, Op, ReapCandidate, WriteId};
use crate::storage::state_machine::SharedState;

/// How often the leader looks for expired leases.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// A lease question only the leader can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseQuery {
    /// Restart the countdown; answers the full TTL.
    KeepAlive(u64),
    /// Answers the time left.
    Remaining(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LeaseError {
    #[error("lease {0} not found: never granted, revoked, or expired")]
    NotFound(u64),
    #[error("member {member} is not the leader")]
    NotLeader { member: NodeId },
}

#[derive(Default)]
struct Countdowns {
    /// The term in which this member leads, if it does.
    leading_term: Option<u64>,
    /// The state's lease generation the deadlines were last synced with.
    generation: u64,
    deadlines: HashMap<u64, Instant>,
    /// Proposed for expiry, not yet applied: not proposed again meanwhile.
    expiring: HashSet<u64>,
}

#[derive(Clone)]
pub struct Liveness {
    id: NodeId,
    raft: Raft,
    state: SharedState,
    proposer: Proposer,
    reap_interval: Duration,
    /// Revisions of event history to keep (0: keep all).
    event_retention: u64,
    countdowns: Arc<Mutex<Countdowns>>,
}

impl Liveness {
    pub fn new(
        id: NodeId,
        raft: Raft,
        state: SharedState,
        proposer: Proposer,
        reap_interval: Duration,
        event_retention: u64,
    ) -> Self {
        Liveness {
            id,
            raft,
            state,
            proposer,
            reap_interval,
            event_retention,
            countdowns: Arc::default(),
        }
    }

    /// Answers a lease query on this member, which must be the leader.
    pub fn answer(&self, query: LeaseQuery) -> Result<u64, LeaseError> {
        let now = Instant::now();
        let mut c = self.sync(now);
        if c.leading_term.is_none() {
            return Err(LeaseError::NotLeader { member: self.id });
        }
        let (id, refresh) = match query {
            LeaseQuery::KeepAlive(id) => (id, true),
            LeaseQuery::Remaining(id) => (id, false),
        };
        let ttl = {
            let applied = self.state.read();
            applied.state.lease(id).map(|l| l.ttl_ms)
        };
        let (Some(ttl), false) = (ttl, c.expiring.contains(&id)) else {
            return Err(LeaseError::NotFound(id));
        };
        let ttl = Duration::from_millis(ttl);
        if refresh {
            c.deadlines.insert(id, now + ttl);
            return Ok(ttl.as_millis() as u64);
        }
        let deadline = *c.deadlines.entry(id).or_insert(now + ttl);
        Ok(deadline.saturating_duration_since(now).as_millis() as u64)
    }

    /// Brings the countdowns in step with leadership and the applied leases.
    fn sync(&self, now: Instant) -> std::sync::MutexGuard<'_, Countdowns> {
        let metrics = self.raft.metrics().borrow().clone();
        let leading = (metrics.state == ServerState::Leader).then_some(metrics.current_term);
        let mut c = self.countdowns.lock().expect("countdowns lock poisoned");
        if leading.is_none() {
            *c = Countdowns::default();
            return c;
        }
        let applied = self.state.read();
        let generation = applied.state.lease_generation();
        if c.leading_term != leading {
            // New leadership: every lease gets its full TTL from now.
            c.leading_term = leading;
            c.deadlines.clear();
            c.expiring.clear();
            c.generation = u64::MAX;
        }
        if c.generation != generation {
            let mut fresh = HashMap::with_capacity(c.deadlines.len());
            for (id, lease) in applied.state.leases() {
                let deadline = c
                    .deadlines
                    .get(&id)
                    .copied()
                    .unwrap_or(now + Duration::from_millis(lease.ttl_ms));
                fresh.insert(id, deadline);
            }
            c.expiring.retain(|id| fresh.contains_key(id));
            c.deadlines = fresh;
            c.generation = generation;
        }
        drop(applied);
        c
    }

    /// Runs until `stop` changes: expires leases and reaps nodes while this member leads.
    pub async fn run(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(CHECK_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reap = Instant::now();
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.changed() => return,
            }
            let now = Instant::now();
            self.expire_due(now);
            if now.duration_since(last_reap) >= self.reap_interval {
                last_reap = now;
                self.reap_due();
                self.compact_due();
            }
        }
    }

    fn expire_due(&self, now: Instant) {
        let due: Vec<u64> = {
            let mut c = self.sync(now);
            if c.leading_term.is_none() {
                return;
            }
            let mut due: Vec<u64> = c
                .deadlines
                .iter()
                .filter(|(id, deadline)| **deadline <= now && !c.expiring.contains(id))
                .map(|(id, _)| *id)
                .collect();
            due.sort_unstable();
            c.expiring.extend(due.iter().copied());
            due
        };
        if due.is_empty() {
            return;
        }
        tracing::info!(leases = ?due, "expiring leases");
        self.propose(Op::LeaseExpire { ids: due });
    }

    fn reap_due(&self) {
        if self.raft.metrics().borrow().state != ServerState::Leader {
            return;
        }
        let now_ms = wall_clock_ms();
        let candidates: Vec<ReapCandidate> = {
            let applied = self.state.read();
            applied
                .state
                .reapable()
                .filter(|(_, stat)| stat.num_children == 0)
                .filter(|(_, stat)| match stat.kind {
                    NodeKind::Container => stat.cversion > 0,
                    // Wall clock, like ZooKeeper: the TTL counts from the leader-stamped mtime.
                    NodeKind::Ttl => now_ms.saturating_sub(stat.mtime_ms) >= stat.ttl_ms as i64,
                    _ => false,
                })
                .map(|(path, stat)| ReapCandidate {
                    path: path.to_owned(),
                    modify_revision: stat.modify_revision,
                })
                .collect()
        };
        if candidates.is_empty() {
            return;
        }
        tracing::info!(nodes = candidates.len(), "reaping container and TTL nodes");
        self.propose(Op::Reap { nodes: candidates });
    }

    /// Keeps the event history to `event_retention` revisions, compacting in steps of a tenth
    /// of it so compaction entries stay rare.
    fn compact_due(&self) {
        if self.event_retention == 0 || self.raft.metrics().borrow().state != ServerState::Leader {
            return;
        }
        let (applied, compacted) = {
            let a = self.state.read();
            (a.revision, a.compacted_revision)
        };
        let keep_from = applied.saturating_sub(self.event_retention);
        if keep_from > compacted + (self.event_retention / 10).max(1) {
            tracing::info!(revision = keep_from, "compacting event history");
            self.propose(Op::Compact {
                revision: keep_from,
            });
        }
    }

    /// Proposes in the background; a failure is retried by the next tick (the lease stays
    /// due, the node stays reapable).
    fn propose(&self, op: Op) {
        let proposer = self.proposer.clone();
        let countdowns = self.countdowns.clone();
        tokio::spawn(async move {
            let ids = match &op {
                Op::LeaseExpire { ids } => ids.clone(),
                _ => Vec::new(),
            };
            let cmd = Command {
                write_id: WriteId::default(),
                time_ms: 0,
                op,
            };
            if let Err(e) = proposer.propose_here(cmd).await {
                tracing::warn!(error = %e, "leader housekeeping proposal failed");
                let mut c = countdowns.lock().expect("countdowns lock poisoned");
                for id in ids {
                    c.expiring.remove(&id);
                }
            }
        });
    }
}

fn wall_clock_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
