//! Typed request options and results, and the txn `Op`/`OpResult` types with their proto
//! conversions, so callers never build raw protos.

use std::time::Duration;

use kord_api::v1::{self as pb, txn_op, txn_op_result, Stat};

use crate::Error;

/// Options for [`crate::Client::create_with`] and [`crate::Client::create_with_mode`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// Append a 10-digit, zero-padded counter to the name; the result's `path` has it.
    pub sequential: bool,
}

/// How long a created node lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum CreateMode {
    /// Until deleted.
    #[default]
    Persistent,
    /// Until the lease (or session) with this id is revoked or expires; cannot have children.
    /// Prefer [`crate::Client::create_ephemeral`], which refuses an expired session locally.
    Ephemeral(u64),
    /// Deleted by the server once its last child is deleted (only after it has had one).
    /// Not sequential.
    Container,
    /// Persistent, but deleted once unmodified for this long and childless. Sent in whole
    /// milliseconds (at least 1); the server refuses TTLs outside its bounds.
    Ttl(Duration),
}

impl CreateMode {
    /// The proto's `(lease_id, container, ttl_ms)` for this mode.
    pub(crate) fn to_proto(self) -> (u64, bool, u64) {
        match self {
            CreateMode::Persistent => (0, false, 0),
            CreateMode::Ephemeral(lease) => (lease, false, 0),
            CreateMode::Container => (0, true, 0),
            CreateMode::Ttl(ttl) => (0, false, duration_ms(ttl).max(1)),
        }
    }
}

/// Whole milliseconds, saturating.
pub(crate) fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A created node. `path` differs from the requested one for sequential nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub path: String,
    pub stat: Stat,
}

impl From<pb::CreateResponse> for Created {
    fn from(r: pb::CreateResponse) -> Self {
        Created {
            path: r.path,
            stat: r.stat.unwrap_or_default(),
        }
    }
}

/// One operation of a transaction. `expected_version: None` means "any version".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Create {
        path: String,
        data: Vec<u8>,
        sequential: bool,
        mode: CreateMode,
    },
    Set {
        path: String,
        data: Vec<u8>,
        expected_version: Option<i32>,
    },
    Delete {
        path: String,
        expected_version: Option<i32>,
    },
    /// Succeeds when the node exists and, if given, its version matches.
    Check {
        path: String,
        expected_version: Option<i32>,
    },
}

impl Op {
    pub fn create(path: impl Into<String>, data: impl Into<Vec<u8>>) -> Op {
        Op::create_with_mode(path, data, CreateMode::Persistent, false)
    }

    pub fn create_sequential(path: impl Into<String>, data: impl Into<Vec<u8>>) -> Op {
        Op::create_with_mode(path, data, CreateMode::Persistent, true)
    }

    /// An ephemeral node owned by a lease or session (e.g. [`crate::Session::id`]).
    pub fn create_ephemeral(
        path: impl Into<String>,
        data: impl Into<Vec<u8>>,
        lease_id: u64,
    ) -> Op {
        Op::create_with_mode(path, data, CreateMode::Ephemeral(lease_id), false)
    }

    pub fn create_with_mode(
        path: impl Into<String>,
        data: impl Into<Vec<u8>>,
        mode: CreateMode,
        sequential: bool,
    ) -> Op {
        Op::Create {
            path: path.into(),
            data: data.into(),
            sequential,
            mode,
        }
    }

    pub fn set(
        path: impl Into<String>,
        data: impl Into<Vec<u8>>,
        expected_version: Option<i32>,
    ) -> Op {
        Op::Set {
            path: path.into(),
            data: data.into(),
            expected_version,
        }
    }

    pub fn delete(path: impl Into<String>, expected_version: Option<i32>) -> Op {
        Op::Delete {
            path: path.into(),
            expected_version,
        }
    }

    pub fn check(path: impl Into<String>, expected_version: Option<i32>) -> Op {
        Op::Check {
            path: path.into(),
            expected_version,
        }
    }

    /// The path the op names (for a sequential create, the requested prefix).
    pub fn path(&self) -> &str {
        match self {
            Op::Create { path, .. }
            | Op::Set { path, .. }
            | Op::Delete { path, .. }
            | Op::Check { path, .. } => path,
        }
    }
}

impl From<Op> for pb::TxnOp {
    fn from(op: Op) -> Self {
        let op = match op {
            Op::Create {
                path,
                data,
                sequential,
                mode,
            } => {
                let (lease_id, container, ttl_ms) = mode.to_proto();
                txn_op::Op::Create(pb::CreateOp {
                    path,
                    data,
                    sequential,
                    lease_id,
                    container,
                    ttl_ms,
                })
            }
            Op::Set {
                path,
                data,
                expected_version,
            } => txn_op::Op::Set(pb::SetOp {
                path,
                data,
                expected_version,
            }),
            Op::Delete {
                path,
                expected_version,
            } => txn_op::Op::Delete(pb::DeleteOp {
                path,
                expected_version,
            }),
            Op::Check {
                path,
                expected_version,
            } => txn_op::Op::Check(pb::CheckOp {
                path,
                expected_version,
            }),
        };
        pb::TxnOp { op: Some(op) }
    }
}

/// The result of one txn op, in the same order as the ops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    Create(Created),
    /// The node's stat after the set.
    Set(Stat),
    Delete,
    Check,
}

impl TryFrom<pb::TxnOpResult> for OpResult {
    type Error = Error;

    fn try_from(r: pb::TxnOpResult) -> Result<Self, Error> {
        match r.result {
            Some(txn_op_result::Result::Create(c)) => Ok(OpResult::Create(c.into())),
            Some(txn_op_result::Result::Set(s)) => Ok(OpResult::Set(s.stat.unwrap_or_default())),
            Some(txn_op_result::Result::Delete(_)) => Ok(OpResult::Delete),
            Some(txn_op_result::Result::Check(_)) => Ok(OpResult::Check),
            None => Err(Error::protocol("server sent a txn result without a result")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_round_trips_into_proto() {
        let op: pb::TxnOp = Op::set("/a", "x", Some(3)).into();
        assert_eq!(
            op.op,
            Some(txn_op::Op::Set(pb::SetOp {
                path: "/a".into(),
                data: b"x".to_vec(),
                expected_version: Some(3),
            }))
        );
        let op: pb::TxnOp = Op::create_sequential("/q/n-", "").into();
        assert!(matches!(
            op.op,
            Some(txn_op::Op::Create(pb::CreateOp {
                sequential: true,
                ..
            }))
        ));
    }

    #[test]
    fn create_modes_map_to_proto_fields() {
        assert_eq!(CreateMode::Persistent.to_proto(), (0, false, 0));
        assert_eq!(CreateMode::Ephemeral(7).to_proto(), (7, false, 0));
        assert_eq!(CreateMode::Container.to_proto(), (0, true, 0));
        assert_eq!(
            CreateMode::Ttl(Duration::from_millis(1500)).to_proto(),
            (0, false, 1500)
        );
        // A zero TTL must not silently become a persistent node.
        assert_eq!(CreateMode::Ttl(Duration::ZERO).to_proto(), (0, false, 1));
        let op: pb::TxnOp = Op::create_ephemeral("/e", "x", 9).into();
        assert_eq!(
            op.op,
            Some(txn_op::Op::Create(pb::CreateOp {
                path: "/e".into(),
                data: b"x".to_vec(),
                sequential: false,
                lease_id: 9,
                container: false,
                ttl_ms: 0,
            }))
        );
    }

    #[test]
    fn empty_result_is_an_error() {
        assert!(OpResult::try_from(pb::TxnOpResult { result: None }).is_err());
        let r = pb::TxnOpResult {
            result: Some(txn_op_result::Result::Check(pb::CheckResult {})),
        };
        assert_eq!(OpResult::try_from(r).ok(), Some(OpResult::Check));
    }
}
