//! The client-facing gRPC edge: validates requests, hands them to the proposal layer or reads
//! applied state, and maps every error to a status whose message names the path and limit.

pub mod cluster;
pub mod convert;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod watch;

use tonic::{Code, Status};

use crate::proposal::ProposeError;
use crate::state::path::PathError;
use crate::state::ApplyError;

/// Request limits, validated once at start-up.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest znode value.
    pub max_value_bytes: usize,
    /// Most ops in one transaction.
    pub max_txn_ops: usize,
    /// Largest encoded request (all of a transaction's values together).
    pub max_request_bytes: usize,
    /// Sessions get a timeout clamped into these bounds (milliseconds, inclusive).
    pub session_timeout_ms: (u64, u64),
    /// Leases outside these TTL bounds are refused.
    pub lease_ttl_ms: (u64, u64),
    /// TTL nodes outside these TTL bounds are refused.
    pub node_ttl_ms: (u64, u64),
}

/// Everything that can go wrong at the edge, converted to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("{field} is {actual} bytes; the limit is {limit} bytes (--max-value-size)")]
    ValueTooLarge {
        field: String,
        actual: usize,
        limit: usize,
    },
    #[error("txn has {actual} ops; the limit is {limit} (--max-txn-ops)")]
    TooManyOps { actual: usize, limit: usize },
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{field} {value} is out of bounds: it must be between {min} and {max} ({flags})")]
    OutOfBounds {
        field: &'static str,
        value: u64,
        min: u64,
        max: u64,
        flags: &'static str,
    },
    #[error("lease {id} not found: never granted, revoked, or expired")]
    LeaseNotFound { id: u64 },
    #[error("claim {key} is gone: lease {lease} expired or was revoked")]
    ClaimGone { key: String, lease: u64 },
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Timeout(String),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Propose(#[from] ProposeError),
    #[error("node {path} does not exist")]
    NoNode { path: String },
    /// A retry must repeat its write exactly; a seq reused for another kind of op is a bug.
    #[error("write_id (client_id, seq) was already used for a different operation")]
    WriteIdReused,
}

impl From<EdgeError> for Status {
    fn from(e: EdgeError) -> Status {
        let message = e.to_string();
        match e {
            EdgeError::Path(_)
            | EdgeError::ValueTooLarge { .. }
            | EdgeError::TooManyOps { .. }
            | EdgeError::OutOfBounds { .. }
            | EdgeError::InvalidArgument(_) => Status::invalid_argument(message),
            EdgeError::NoNode { .. }
            | EdgeError::LeaseNotFound { .. }
            | EdgeError::ClaimGone { .. } => Status::not_found(message),
            EdgeError::PermissionDenied(_) => Status::permission_denied(message),
            EdgeError::Timeout(_) => Status::deadline_exceeded(message),
            EdgeError::WriteIdReused => Status::failed_precondition(message),
            EdgeError::Propose(_) => Status::unavailable(message),
            EdgeError::Apply(ref apply) => {
                let mut status = Status::new(apply_code(apply), message);
                if let ApplyError::TxnOp { index, .. } = apply {
                    if let Ok(v) = index.to_string().parse() {
                        status.metadata_mut().insert("kord-failed-op", v);
                    }
                }
                status
            }
        }
    }
}

fn apply_code(e: &ApplyError) -> Code {
    match e {
        ApplyError::NoNode { .. }
        | ApplyError::NoParent { .. }
        | ApplyError::LeaseNotFound { .. } => Code::NotFound,
        ApplyError::NodeExists { .. } | ApplyError::LeaseExists { .. } => Code::AlreadyExists,
        ApplyError::EphemeralParent { .. } => Code::InvalidArgument,
        ApplyError::BadVersion { .. } => Code::Aborted,
        ApplyError::NotEmpty { .. }
        | ApplyError::SequenceOverflow { .. }
        | ApplyError::StaleWrite { .. } => Code::FailedPrecondition,
        ApplyError::RootNode { .. } => Code::InvalidArgument,
        ApplyError::TxnOp { cause, .. } => apply_code(cause),
    }
}

/// The header every response carries.
pub(crate) fn header(
    member_id: crate::raft::NodeId,
    raft: &crate::raft::Raft,
    revision: u64,
) -> kord_api::v1::ResponseHeader {
    kord_api::v1::ResponseHeader {
        revision,
        member_id,
        raft_term: raft.metrics().borrow().current_term,
    }
}

/// Counts a unary request by op and outcome, and converts its error to a status.
pub(crate) fn finish<T>(
    metrics: &crate::metrics::Metrics,
    op: &'static str,
    result: Result<T, EdgeError>,
) -> Result<tonic::Response<T>, Status> {
    let result = result.map(tonic::Response::new).map_err(Status::from);
    let code = result.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
    metrics.count_request(op, code);
    result
}

/// Proposes `op` under `write_id` and returns its revision and reply; an apply error becomes
/// an edge error. Every write at the edge goes through here.
pub(crate) async fn propose(
    proposer: &crate::proposal::Proposer,
    write_id: crate::state::WriteId,
    op: crate::state::Op,
) -> Result<(u64, crate::state::Reply), EdgeError> {
    propose_with(proposer, write_id, op, crate::proposal::Urgency::Now).await
}

/// [`propose`] with the write's urgency (see [`crate::proposal::Urgency`]).
pub(crate) async fn propose_with(
    proposer: &crate::proposal::Proposer,
    write_id: crate::state::WriteId,
    op: crate::state::Op,
    urgency: crate::proposal::Urgency,
) -> Result<(u64, crate::state::Reply), EdgeError> {
    let cmd = crate::state::Command {
        write_id,
        time_ms: 0,
        op,
    };
    let out = proposer.propose_with(cmd, urgency).await?;
    Ok((out.revision, out.reply?))
}
