//! Conversions between the wire types (`kord_api::v1`) and the state machine's types.

use kord_api::v1 as pb;

use crate::state::{self, CreateMode, SubOp, SubReply, WriteId};

pub fn stat(s: &state::Stat) -> pb::Stat {
    pb::Stat {
        create_revision: s.create_revision,
        modify_revision: s.modify_revision,
        children_revision: s.children_revision,
        ctime_ms: s.ctime_ms,
        mtime_ms: s.mtime_ms,
        version: s.version,
        cversion: s.cversion,
        ephemeral_owner: s.ephemeral_owner,
        data_length: s.data_length,
        num_children: s.num_children,
        kind: match s.kind {
            state::NodeKind::Persistent => pb::NodeKind::Persistent,
            state::NodeKind::Ephemeral => pb::NodeKind::Ephemeral,
            state::NodeKind::Container => pb::NodeKind::Container,
            state::NodeKind::Ttl => pb::NodeKind::Ttl,
        } as i32,
        ttl_ms: s.ttl_ms,
    }
}

/// The requested node kind, before bounds are checked. Contradictions are refused here.
pub fn create_mode(
    path: &str,
    lease_id: u64,
    container: bool,
    ttl_ms: u64,
    sequential: bool,
) -> Result<CreateMode, String> {
    match (lease_id, container, ttl_ms) {
        (0, false, 0) => Ok(CreateMode::Persistent),
        (lease, false, 0) => Ok(CreateMode::Ephemeral { lease }),
        (0, true, 0) if !sequential => Ok(CreateMode::Container),
        (0, true, 0) => Err(format!("create {path}: a container node cannot be sequential")),
        (0, false, ttl_ms) => Ok(CreateMode::Ttl { ttl_ms }),
        (_, _, t) if t != 0 && lease_id != 0 => Err(format!(
            "create {path}: ttl_ms cannot be set on an ephemeral node (lease_id {lease_id}): it lives as long as its lease"
        )),
        _ => Err(format!("create {path}: container cannot be combined with lease_id or ttl_ms")),
    }
}

pub fn write_id(id: Option<pb::WriteId>) -> WriteId {
    id.map_or_else(WriteId::default, |w| WriteId {
        client_id: w.client_id,
        seq: w.seq,
        acked_below: w.acked_below,
    })
}

/// A txn op from the wire, or why it is malformed.
pub fn txn_op(op: pb::TxnOp) -> Result<SubOp, String> {
    Ok(match op.op.ok_or("op is not set")? {
        pb::txn_op::Op::Create(c) => SubOp::Create {
            mode: create_mode(&c.path, c.lease_id, c.container, c.ttl_ms, c.sequential)?,
            path: c.path,
            data: c.data,
            sequential: c.sequential,
        },
        pb::txn_op::Op::Set(s) => SubOp::Set {
            path: s.path,
            data: s.data,
            expected_version: s.expected_version,
        },
        pb::txn_op::Op::Delete(d) => SubOp::Delete {
            path: d.path,
            expected_version: d.expected_version,
        },
        pb::txn_op::Op::Check(c) => SubOp::Check {
            path: c.path,
            expected_version: c.expected_version,
        },
    })
}

pub fn txn_result(reply: SubReply, header: &pb::ResponseHeader) -> pb::TxnOpResult {
    use pb::txn_op_result::Result as R;
    let result = match reply {
        SubReply::Created { path, stat: s } => R::Create(pb::CreateResponse {
            header: Some(*header),
            path,
            stat: Some(stat(&s)),
        }),
        SubReply::Set { stat: s } => R::Set(pb::SetResponse {
            header: Some(*header),
            stat: Some(stat(&s)),
        }),
        SubReply::Deleted => R::Delete(pb::DeleteResponse {
            header: Some(*header),
        }),
        SubReply::Checked => R::Check(pb::CheckResult {}),
    };
    pb::TxnOpResult {
        result: Some(result),
    }
}

pub fn event(e: state::Event) -> pb::Event {
    let (prev_stat, prev_data) = match e.prev {
        Some(p) => (Some(stat(&p.stat)), p.data),
        None => (None, Vec::new()),
    };
    pb::Event {
        r#type: match e.kind {
            state::EventKind::Created => pb::EventType::Created,
            state::EventKind::Deleted => pb::EventType::Deleted,
            state::EventKind::DataChanged => pb::EventType::DataChanged,
            state::EventKind::ChildrenChanged => pb::EventType::ChildrenChanged,
        } as i32,
        path: e.path,
        stat: Some(stat(&e.stat)),
        data: e.data,
        prev_stat,
        prev_data,
    }
}
