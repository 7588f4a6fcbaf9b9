//! Conversions between the wire types (`kord_api::v1`) and the state machine's types.

use kord_api::v1 as pb;

use crate::state::{self, SubOp, SubReply, WriteId};

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
    }
}

pub fn write_id(id: Option<pb::WriteId>) -> WriteId {
    id.map_or_else(WriteId::default, |w| WriteId {
        client_id: w.client_id,
        seq: w.seq,
        acked_below: w.acked_below,
    })
}

/// A txn op from the wire; `None` when the oneof is unset.
pub fn txn_op(op: pb::TxnOp) -> Option<SubOp> {
    Some(match op.op? {
        pb::txn_op::Op::Create(c) => SubOp::Create {
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
