//! Callbacks used by Storage API

use std::io;

use tokio::sync::mpsc;
use tokio::sync::oneshot;

use crate::async_runtime::AsyncOneshotSendExt;
use crate::core::notify::Notify;
use crate::raft_state::io_state::log_io_id::LogIOId;
use crate::type_config::alias::OneshotSenderOf;
use crate::LogId;
use crate::RaftTypeConfig;
use crate::StorageIOError;
use crate::Vote;

/// A oneshot callback for completion of log io operation.
pub struct LogFlushed<C>
where C: RaftTypeConfig
{
    log_io_id: LogIOId<C::NodeId>,
    tx: FlushReport<C>,
}

/// Where a [`LogFlushed`] report goes.
///
/// Kord patch: a follower's append is awaited by `RaftCore` before it answers the leader; a
/// leader's append is not: the leader replicates while its own append syncs, and counts itself
/// toward the quorum only when the report arrives (Raft thesis, 10.2.1).
enum FlushReport<C>
where C: RaftTypeConfig
{
    /// `RaftCore` waits on the receiving end before it runs anything else.
    Awaited(OneshotSenderOf<C, Result<LogIOId<C::NodeId>, io::Error>>),
    /// Sent to `RaftCore` as a notification; it goes on meanwhile.
    Notify {
        tx: mpsc::UnboundedSender<Notify<C>>,
        /// The leader's vote the append was made in.
        vote: Vote<C::NodeId>,
    },
}

impl<C> LogFlushed<C>
where C: RaftTypeConfig
{
    pub(crate) fn new(
        log_io_id: LogIOId<C::NodeId>,
        tx: OneshotSenderOf<C, Result<LogIOId<C::NodeId>, io::Error>>,
    ) -> Self {
        Self {
            log_io_id,
            tx: FlushReport::Awaited(tx),
        }
    }

    /// A report that reaches `RaftCore` as [`Notify::LocalLogFlushed`].
    pub(crate) fn notifying(
        vote: Vote<C::NodeId>,
        last_log_id: LogId<C::NodeId>,
        tx: mpsc::UnboundedSender<Notify<C>>,
    ) -> Self {
        Self {
            log_io_id: LogIOId::new(vote.clone(), Some(last_log_id)),
            tx: FlushReport::Notify { tx, vote },
        }
    }

    /// Whether Raft's core waits for this report before it does anything else (a follower's
    /// append, whose answer to the leader must follow the sync). When false (a leader's
    /// append), the core replicates the entries meanwhile, so a storage that syncs off the
    /// core's task lets the sync and the replication overlap.
    pub fn is_awaited(&self) -> bool {
        matches!(self.tx, FlushReport::Awaited(_))
    }

    /// Report log io completion event.
    ///
    /// It will be called when the log is successfully appended to the storage or an error occurs.
    pub fn log_io_completed(self, result: Result<(), io::Error>) {
        if let Err(e) = &result {
            tracing::error!("LogFlush error: {}, while flushing upto {}", e, self.log_io_id);
        }
        match self.tx {
            FlushReport::Awaited(tx) => {
                let res = tx.send(result.map(|_| self.log_io_id));
                if let Err(e) = res {
                    tracing::error!("failed to send log io completion event: {:?}", e);
                }
            }
            FlushReport::Notify { tx, vote } => {
                let notify = Notify::LocalLogFlushed {
                    vote,
                    log_id: self.log_io_id.log_id,
                    result,
                };
                // `RaftCore` may have stopped; then nobody waits for this report.
                let _ = tx.send(notify);
            }
        }
    }
}

/// A oneshot callback for completion of applying logs to state machine.
pub struct LogApplied<C>
where C: RaftTypeConfig
{
    last_log_id: LogId<C::NodeId>,
    tx: oneshot::Sender<Result<(LogId<C::NodeId>, Vec<C::R>), StorageIOError<C::NodeId>>>,
}

impl<C> LogApplied<C>
where C: RaftTypeConfig
{
    #[allow(dead_code)]
    pub(crate) fn new(
        last_log_id: LogId<C::NodeId>,
        tx: oneshot::Sender<Result<(LogId<C::NodeId>, Vec<C::R>), StorageIOError<C::NodeId>>>,
    ) -> Self {
        Self { last_log_id, tx }
    }

    /// Report apply io completion event.
    ///
    /// It will be called when the log is successfully applied to the state machine or an error
    /// occurs.
    pub fn completed(self, result: Result<Vec<C::R>, StorageIOError<C::NodeId>>) {
        let res = match result {
            Ok(x) => {
                tracing::debug!("LogApplied upto {}", self.last_log_id);
                let resp = (self.last_log_id.clone(), x);
                self.tx.send(Ok(resp))
            }
            Err(e) => {
                tracing::error!("LogApplied error: {}, while applying upto {}", e, self.last_log_id);
                self.tx.send(Err(e))
            }
        };

        if let Err(_e) = res {
            tracing::error!("failed to send apply complete event, last_log_id: {}", self.last_log_id);
        }
    }
}
