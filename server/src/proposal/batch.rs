//! Proposal batching on the leader: client commands → one [`Proposal`] per log entry.
//!
//! At most `in_flight` entries of client commands are appended and not yet applied at a time.
//! While they are in flight, new commands queue here; the next entry takes all of them (up to
//! the batch limits). A lone command never waits: with nothing in flight it goes at once, so
//! batching adds no latency when idle and amortizes the per-entry cost (Raft bookkeeping, log
//! append, fsync, replication message, apply call) when busy, as etcd and ZooKeeper do.
//! Entries are handed to Raft in arrival order by one task.

use std::sync::Arc;

use openraft::error::ClientWriteError;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::{now_ms, ForwardReply, ProposeError};
use crate::raft::{NodeId, Raft};
use crate::state::{Command, Proposal};

/// Batch limits, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most commands in one entry.
    pub max_commands: usize,
    /// A batch stops growing once its commands take this many bytes (roughly).
    pub max_bytes: usize,
    /// Entries of client commands appended and not yet applied, at most.
    pub in_flight: usize,
}

struct Pending {
    cmd: Command,
    reply: oneshot::Sender<ForwardReply>,
}

/// Queues commands for the batching task.
#[derive(Clone)]
pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Batcher {
    /// Starts the batching task; it ends when every `Batcher` clone is gone.
    pub(super) fn start(id: NodeId, raft: Raft, limits: Batching) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(id, raft, limits, rx));
        Batcher { queue }
    }

    /// Proposes `cmd` in the next batch and waits for its apply result.
    pub(super) async fn propose(&self, cmd: Command) -> ForwardReply {
        let (reply, rx) = oneshot::channel();
        self.queue
            .send(Pending { cmd, reply })
            .map_err(|_| ProposeError::Stopped("the proposal queue is closed".into()))?;
        rx.await
            .map_err(|_| ProposeError::Stopped("the proposal was dropped".into()))?
    }
}

async fn run(id: NodeId, raft: Raft, limits: Batching, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(limits.in_flight.max(1)));
    while let Some(first) = rx.recv().await {
        // Waiting here is what forms batches: commands arriving meanwhile join this one.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.cmd.approx_size();
        let mut batch = vec![first];
        while batch.len() < limits.max_commands && bytes < limits.max_bytes {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.cmd.approx_size();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        // The leader's clock, stamped once per entry, so apply never reads one.
        let time_ms = now_ms();
        let mut commands = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for Pending { mut cmd, reply } in batch {
            cmd.time_ms = time_ms;
            commands.push(cmd);
            replies.push(reply);
        }
        let count = commands.len();
        match raft.client_write_ff(Proposal { commands }).await {
            Ok(applied) => {
                tokio::spawn(async move {
                    let result = applied.await;
                    drop(permit);
                    let outputs = match result {
                        Ok(Ok(response)) => response.data,
                        Ok(Err(e)) => return fail_all(replies, write_error(id, e)),
                        Err(_) => {
                            return fail_all(
                                replies,
                                ProposeError::Stopped("raft dropped the proposal".into()),
                            )
                        }
                    };
                    if outputs.len() != count {
                        // Apply returns one output per command; anything else is a bug.
                        return fail_all(
                            replies,
                            ProposeError::Stopped(format!(
                                "apply returned {} outputs for {count} commands",
                                outputs.len()
                            )),
                        );
                    }
                    for (reply, out) in replies.into_iter().zip(outputs) {
                        let _ = reply.send(Ok(out));
                    }
                });
            }
            Err(fatal) => {
                fail_all(replies, ProposeError::Stopped(fatal.to_string()));
                return;
            }
        }
    }
}

fn write_error(id: NodeId, e: ClientWriteError<NodeId, crate::raft::KordNode>) -> ProposeError {
    match e {
        ClientWriteError::ForwardToLeader(f) => ProposeError::NotLeader {
            member: id,
            leader: f.leader_id,
        },
        ClientWriteError::ChangeMembershipError(e) => ProposeError::Stopped(e.to_string()),
    }
}

fn fail_all(replies: Vec<oneshot::Sender<ForwardReply>>, e: ProposeError) {
    for reply in replies {
        let _ = reply.send(Err(e.clone()));
    }
}
