//! Kord errors as a typed enum, decoded from the gRPC status the server (or the transport) returned.

use std::error::Error as _;

use tonic::{Code, Status};

/// Metadata key under which the server names the index of the op that failed a txn.
pub const FAILED_OP_METADATA: &str = "kord-failed-op";

/// Every failure of a Kord call. `Display` shows the server's own message, which names the path,
/// field or limit involved, so it can be shown to a user as is.
///
/// `failed_op` is the index of the failing op when the error came from [`crate::Client::txn`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The node (or, for a create, its parent) does not exist.
    #[error("{message}")]
    NoNode {
        message: String,
        failed_op: Option<usize>,
    },
    /// A create named a node that already exists.
    #[error("{message}")]
    NodeExists {
        message: String,
        failed_op: Option<usize>,
    },
    /// An expected version did not match.
    #[error("{message}")]
    BadVersion {
        message: String,
        failed_op: Option<usize>,
    },
    /// A delete named a node that still has children.
    #[error("{message}")]
    NotEmpty {
        message: String,
        failed_op: Option<usize>,
    },
    /// The request was malformed (bad path, value too large, ...) or the client was misconfigured.
    #[error("{message}")]
    InvalidArgument {
        message: String,
        failed_op: Option<usize>,
    },
    /// The lease (or session) does not exist: never granted, revoked, or expired. Also what a
    /// create of an ephemeral node under such a lease fails with.
    #[error("{message}")]
    LeaseNotFound {
        id: u64,
        message: String,
        failed_op: Option<usize>,
    },
    /// The session expired (the server no longer knows it, or no keep-alive succeeded within its
    /// timeout) or was closed. Its ephemeral nodes are deleted (or about to be); a new session is
    /// needed. Returned without calling the server by calls made through an expired
    /// [`crate::Session`].
    #[error("{message}")]
    SessionExpired { id: u64, message: String },
    /// No member could serve the request (no leader, shutting down, unreachable) within the retry
    /// budget.
    #[error("{0}")]
    Unavailable(String),
    /// The request's deadline passed. For a write, its outcome is unknown.
    #[error("{0}")]
    Timeout(String),
    /// A watch needed events at or below `compact_revision`, which compaction has forgotten.
    /// Re-read the state, then watch from a revision after the read.
    #[error("{message}")]
    Compacted {
        compact_revision: u64,
        message: String,
    },
    /// Any other status, kept with its code.
    #[error("{message}")]
    Other {
        code: Code,
        message: String,
        failed_op: Option<usize>,
    },
}

impl Error {
    /// Decodes a status. Statuses produced locally by tonic (connection refused, reset, client
    /// side deadline) are folded into `Unavailable`/`Timeout`, since callers care about "retry
    /// elsewhere" vs "gave up waiting", not about which layer noticed.
    pub fn from_status(status: &Status) -> Error {
        let message = describe(status);
        let failed_op = status
            .metadata()
            .get(FAILED_OP_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok());
        match status.code() {
            Code::NotFound => match lease_in_message(&message) {
                Some(id) => Error::LeaseNotFound {
                    id,
                    message,
                    failed_op,
                },
                None => Error::NoNode { message, failed_op },
            },
            Code::AlreadyExists => Error::NodeExists { message, failed_op },
            Code::Aborted => Error::BadVersion { message, failed_op },
            Code::FailedPrecondition if is_not_empty_message(&message) => {
                Error::NotEmpty { message, failed_op }
            }
            Code::InvalidArgument => Error::InvalidArgument { message, failed_op },
            Code::Unavailable => Error::Unavailable(message),
            Code::DeadlineExceeded => Error::Timeout(message),
            // tonic reports its own client-side deadline as CANCELLED("Timeout expired").
            Code::Cancelled if status.message() == tonic::TimeoutExpired(()).to_string() => {
                Error::Timeout(message)
            }
            // The server never cancels; a local CANCELLED means the connection went away
            // mid-call.
            Code::Cancelled => Error::Unavailable(message),
            // An error tonic built from a transport failure carries its cause as `source`;
            // statuses received from the server never do.
            Code::Unknown if status.source().is_some() => Error::Unavailable(message),
            code => Error::Other {
                code,
                message,
                failed_op,
            },
        }
    }

    /// A malformed reply: the server broke the contract.
    pub(crate) fn protocol(message: impl Into<String>) -> Error {
        Error::Other {
            code: Code::Internal,
            message: message.into(),
            failed_op: None,
        }
    }

    pub(crate) fn session_expired(id: u64) -> Error {
        Error::SessionExpired {
            id,
            message: format!("session {id} expired"),
        }
    }

    /// On a call about lease `id`, NOT_FOUND can only mean the lease is gone.
    pub(crate) fn for_lease(self, id: u64) -> Error {
        match self {
            Error::NoNode { message, failed_op } => Error::LeaseNotFound {
                id,
                message,
                failed_op,
            },
            err => err,
        }
    }

    /// On a call about session `id`: the session is gone.
    pub(crate) fn for_session(self, id: u64) -> Error {
        match self.for_lease(id) {
            Error::LeaseNotFound { id: found, .. } if found == id => Error::session_expired(id),
            err => err,
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::InvalidArgument {
            message: message.into(),
            failed_op: None,
        }
    }

    /// The gRPC code this error corresponds to.
    pub fn code(&self) -> Code {
        match self {
            Error::NoNode { .. } | Error::LeaseNotFound { .. } | Error::SessionExpired { .. } => {
                Code::NotFound
            }
            Error::NodeExists { .. } => Code::AlreadyExists,
            Error::BadVersion { .. } => Code::Aborted,
            Error::NotEmpty { .. } => Code::FailedPrecondition,
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Timeout(_) => Code::DeadlineExceeded,
            Error::Compacted { .. } => Code::OutOfRange,
            Error::Other { code, .. } => *code,
        }
    }

    /// The server's (or transport's) message.
    pub fn message(&self) -> &str {
        match self {
            Error::NoNode { message, .. }
            | Error::NodeExists { message, .. }
            | Error::BadVersion { message, .. }
            | Error::NotEmpty { message, .. }
            | Error::InvalidArgument { message, .. }
            | Error::LeaseNotFound { message, .. }
            | Error::SessionExpired { message, .. }
            | Error::Compacted { message, .. }
            | Error::Other { message, .. } => message,
            Error::Unavailable(message) | Error::Timeout(message) => message,
        }
    }

    /// For a failed txn: the index of the op that failed, from `kord-failed-op`.
    pub fn failed_op(&self) -> Option<usize> {
        match self {
            Error::NoNode { failed_op, .. }
            | Error::NodeExists { failed_op, .. }
            | Error::BadVersion { failed_op, .. }
            | Error::NotEmpty { failed_op, .. }
            | Error::InvalidArgument { failed_op, .. }
            | Error::LeaseNotFound { failed_op, .. }
            | Error::Other { failed_op, .. } => *failed_op,
            Error::SessionExpired { .. }
            | Error::Unavailable(_)
            | Error::Timeout(_)
            | Error::Compacted { .. } => None,
        }
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Error::from_status(&status)
    }
}

/// The id in the server's "lease N not found: ..." (possibly behind a txn's "op I: " prefix).
fn lease_in_message(message: &str) -> Option<u64> {
    let lower = message.to_ascii_lowercase();
    let mut rest = lower.as_str();
    while let Some(at) = rest.find("lease ") {
        let after = &rest[at + "lease ".len()..];
        let digits = after.len() - after.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 && after[digits..].starts_with(" not found") {
            return after[..digits].parse().ok();
        }
        rest = after;
    }
    None
}

fn is_not_empty_message(message: &str) -> bool {
    let lower = message.to_ascii_lowercase();
    lower.contains("not empty") || lower.contains("has children")
}

/// The status message plus its source chain: tonic's own message for transport failures is
/// just "transport error", while the cause ("connection refused") is further down.
fn describe(status: &Status) -> String {
    let mut message = status.message().to_owned();
    let mut source = status.source();
    while let Some(err) = source {
        let text = err.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
        source = err.source();
    }
    if message.is_empty() {
        message = format!("{:?}", status.code());
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    #[test]
    fn maps_codes_and_keeps_message() {
        let cases = [
            (Status::not_found("node /a does not exist"), Code::NotFound),
            (
                Status::already_exists("node /a exists"),
                Code::AlreadyExists,
            ),
            (Status::aborted("version 3 != 2"), Code::Aborted),
            (Status::invalid_argument("bad path"), Code::InvalidArgument),
            (Status::unavailable("no leader"), Code::Unavailable),
            (
                Status::deadline_exceeded("too slow"),
                Code::DeadlineExceeded,
            ),
            (Status::internal("boom"), Code::Internal),
        ];
        for (status, code) in cases {
            let err = Error::from_status(&status);
            assert_eq!(err.code(), code);
            assert_eq!(err.message(), status.message());
            assert_eq!(err.to_string(), status.message());
        }
        assert!(matches!(
            Error::from(Status::not_found("x")),
            Error::NoNode { .. }
        ));
        assert!(matches!(
            Error::from(Status::aborted("x")),
            Error::BadVersion { .. }
        ));
    }

    #[test]
    fn failed_precondition_is_not_empty_only_for_children() {
        let err = Error::from(Status::failed_precondition("node /a has children"));
        assert!(matches!(err, Error::NotEmpty { .. }));
        let err = Error::from(Status::failed_precondition("directory Not Empty"));
        assert!(matches!(err, Error::NotEmpty { .. }));
        let err = Error::from(Status::failed_precondition("write already acknowledged"));
        assert!(matches!(
            err,
            Error::Other {
                code: Code::FailedPrecondition,
                ..
            }
        ));
    }

    #[test]
    fn client_timeout_and_transport_errors() {
        let err = Error::from(Status::cancelled(tonic::TimeoutExpired(()).to_string()));
        assert!(matches!(err, Error::Timeout(_)));
        let err = Error::from(Status::cancelled("operation was canceled"));
        assert!(matches!(err, Error::Unavailable(_)));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let err = Error::from(Status::from_error(Box::new(io)));
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
        // An UNKNOWN sent by the server is not a transport failure.
        let err = Error::from(Status::unknown("weird"));
        assert_eq!(err.code(), Code::Unknown);
    }

    #[test]
    fn lease_not_found_is_told_apart_from_a_missing_node() {
        let err = Error::from(Status::not_found(
            "lease 42 not found: never granted, revoked, or expired",
        ));
        assert!(
            matches!(err, Error::LeaseNotFound { id: 42, .. }),
            "{err:?}"
        );
        assert_eq!(err.code(), Code::NotFound);
        assert!(err.to_string().contains("lease 42 not found"));

        let mut status = Status::not_found("op 1: lease 7 not found: never granted");
        status
            .metadata_mut()
            .insert(FAILED_OP_METADATA, MetadataValue::from_static("1"));
        let err = Error::from(status);
        assert!(matches!(
            err,
            Error::LeaseNotFound {
                id: 7,
                failed_op: Some(1),
                ..
            }
        ));

        for msg in [
            "node /lease 5 does not exist",
            "node /a does not exist",
            "lease x not found",
        ] {
            let err = Error::from(Status::not_found(msg));
            assert!(matches!(err, Error::NoNode { .. }), "{msg}: {err:?}");
        }
    }

    #[test]
    fn lease_and_session_calls_rename_not_found() {
        let err = Error::from(Status::not_found("gone")).for_lease(3);
        assert!(matches!(err, Error::LeaseNotFound { id: 3, .. }));
        let err = Error::from(Status::not_found("lease 3 not found")).for_session(3);
        assert_eq!(err, Error::session_expired(3));
        assert_eq!(err.to_string(), "session 3 expired");
        assert_eq!(err.code(), Code::NotFound);
        // Another lease's absence is not this session's expiry.
        let err = Error::from(Status::not_found("lease 4 not found")).for_session(3);
        assert!(matches!(err, Error::LeaseNotFound { id: 4, .. }));
        let err = Error::from(Status::unavailable("no leader")).for_session(3);
        assert!(matches!(err, Error::Unavailable(_)));
    }

    #[test]
    fn parses_failed_op() {
        let mut status = Status::aborted("op 2: version mismatch");
        status
            .metadata_mut()
            .insert(FAILED_OP_METADATA, MetadataValue::from_static("2"));
        let err = Error::from(status);
        assert_eq!(err.failed_op(), Some(2));
        assert!(matches!(
            err,
            Error::BadVersion {
                failed_op: Some(2),
                ..
            }
        ));

        let mut status = Status::not_found("x");
        status
            .metadata_mut()
            .insert(FAILED_OP_METADATA, MetadataValue::from_static("nope"));
        assert_eq!(Error::from(status).failed_op(), None);
        assert_eq!(Error::from(Status::not_found("x")).failed_op(), None);
    }
}
