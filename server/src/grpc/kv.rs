//! The `Kv` service: znode reads and writes.

use std::sync::Arc;

use kord_api::v1 as pb;
use kord_api::v1::kv_server::Kv;
use tonic::{Request, Response, Status};

use super::convert;
use super::{EdgeError, Limits};
use crate::metrics::Metrics;
use crate::proposal::{Proposer, Urgency};
use crate::raft::{NodeId, Raft};
use crate::state::{path, CreateMode, Op, Reply, SubOp, SubReply};
use crate::storage::state_machine::{AppliedState, SharedState};

/// Most items in one `Batch` call (kord-client sends at most 128).
pub const MAX_BATCH_ITEMS: usize = 1024;

pub struct KvService {
    pub id: NodeId,
    pub raft: Raft,
    pub proposer: Proposer,
    pub state: SharedState,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
}

impl KvService {
    fn header(&self, revision: u64) -> pb::ResponseHeader {
        super::header(self.id, &self.raft, revision)
    }

    fn finish<T>(
        &self,
        op: &'static str,
        result: Result<T, EdgeError>,
    ) -> Result<Response<T>, Status> {
        super::finish(&self.metrics, op, result)
    }

    fn check_op(&self, op: &SubOp) -> Result<(), EdgeError> {
        match op {
            // A sequential name may end in '/': the counter completes it, as in ZooKeeper.
            SubOp::Create {
                path,
                sequential: true,
                ..
            } => path::validate(&format!("{path}0")).map_err(|mut e| {
                e.path = path.clone();
                e
            })?,
            _ => path::validate(op.path())?,
        }
        // Membership tombstones keep removed ids from ever rejoining; only the membership
        // service writes them (reads are allowed).
        let members_dir = crate::membership::MEMBERS_DIR;
        if !matches!(op, SubOp::Check { .. }) && path::is_at_or_below(op.path(), members_dir) {
            return Err(EdgeError::PermissionDenied(format!(
                "{} is reserved for the membership service: {members_dir} and below are read-only for clients",
                op.path()
            )));
        }
        if let SubOp::Create {
            mode: CreateMode::Ttl { ttl_ms },
            ..
        } = op
        {
            let (min, max) = self.limits.node_ttl_ms;
            if !(min..=max).contains(ttl_ms) {
                return Err(EdgeError::OutOfBounds {
                    field: "ttl_ms",
                    value: *ttl_ms,
                    min,
                    max,
                    flags: "--node-ttl-min/--node-ttl-max",
                });
            }
        }
        if let SubOp::Create { path, data, .. } | SubOp::Set { path, data, .. } = op {
            if data.len() > self.limits.max_value_bytes {
                return Err(EdgeError::ValueTooLarge {
                    field: format!("value for {path}"),
                    actual: data.len(),
                    limit: self.limits.max_value_bytes,
                });
            }
        }
        Ok(())
    }

    async fn write(
        &self,
        write_id: Option<pb::WriteId>,
        op: Op,
        urgency: Urgency,
    ) -> Result<(u64, Reply), EdgeError> {
        match &op {
            Op::LeaseGrant { .. }
            | Op::Compact { .. }
            | Op::LeaseRevoke { .. }
            | Op::LeaseExpire { .. }
            | Op::Reap { .. }
            | Op::Claim { .. } => {
                return Err(EdgeError::InvalidArgument("not a znode operation".into()))
            }
            Op::Single(sub) => self.check_op(sub)?,
            Op::Txn(ops) => {
                if ops.len() > self.limits.max_txn_ops {
                    return Err(EdgeError::TooManyOps {
                        actual: ops.len(),
                        limit: self.limits.max_txn_ops,
                    });
                }
                for (i, sub) in ops.iter().enumerate() {
                    self.check_op(sub)
                        .map_err(|e| EdgeError::InvalidArgument(format!("txn op {i}: {e}")))?;
                }
            }
        }
        super::propose_with(&self.proposer, convert::write_id(write_id), op, urgency).await
    }

    async fn write_single(
        &self,
        write_id: Option<pb::WriteId>,
        op: SubOp,
        urgency: Urgency,
    ) -> Result<(pb::ResponseHeader, SubReply), EdgeError> {
        let (revision, reply) = self.write(write_id, Op::Single(op), urgency).await?;
        match reply {
            Reply::Single(r) => Ok((self.header(revision), r)),
            _ => Err(EdgeError::WriteIdReused),
        }
    }

    async fn create_one(
        &self,
        urgency: Urgency,
        r: pb::CreateRequest,
    ) -> Result<pb::CreateResponse, EdgeError> {
        let mode = convert::create_mode(&r.path, r.lease_id, r.container, r.ttl_ms, r.sequential);
        let op = SubOp::Create {
            mode: mode.map_err(EdgeError::InvalidArgument)?,
            path: r.path,
            data: r.data,
            sequential: r.sequential,
        };
        match self.write_single(r.write_id, op, urgency).await? {
            (header, SubReply::Created { path, stat }) => Ok(pb::CreateResponse {
                header: Some(header),
                path,
                stat: Some(convert::stat(&stat)),
            }),
            _ => Err(EdgeError::WriteIdReused),
        }
    }

    async fn set_one(
        &self,
        urgency: Urgency,
        r: pb::SetRequest,
    ) -> Result<pb::SetResponse, EdgeError> {
        let op = SubOp::Set {
            path: r.path,
            data: r.data,
            expected_version: r.expected_version,
        };
        match self.write_single(r.write_id, op, urgency).await? {
            (header, SubReply::Set { stat }) => Ok(pb::SetResponse {
                header: Some(header),
                stat: Some(convert::stat(&stat)),
            }),
            _ => Err(EdgeError::WriteIdReused),
        }
    }

    async fn delete_one(
        &self,
        urgency: Urgency,
        r: pb::DeleteRequest,
    ) -> Result<pb::DeleteResponse, EdgeError> {
        let op = SubOp::Delete {
            path: r.path,
            expected_version: r.expected_version,
        };
        let (header, _) = self.write_single(r.write_id, op, urgency).await?;
        Ok(pb::DeleteResponse {
            header: Some(header),
        })
    }

    /// One item of a `Batch` call: the result its request would have had alone.
    async fn batch_item(
        &self,
        urgency: Urgency,
        index: usize,
        item: pb::BatchItem,
    ) -> pb::BatchResult {
        use pb::batch_item::Request as Item;
        use pb::batch_result::Result as Out;
        let (op, result) = match item.request {
            Some(Item::Create(r)) => ("create", self.create_one(urgency, r).await.map(Out::Create)),
            Some(Item::Set(r)) => ("set", self.set_one(urgency, r).await.map(Out::Set)),
            Some(Item::Delete(r)) => ("delete", self.delete_one(urgency, r).await.map(Out::Delete)),
            None => (
                "batch",
                Err(EdgeError::InvalidArgument(format!(
                    "items[{index}].request is not set (one of create, set, delete)"
                ))),
            ),
        };
        let result = match self.finish(op, result) {
            Ok(out) => out.into_inner(),
            Err(status) => Out::Error(pb::BatchError {
                code: status.code() as i32,
                message: status.message().to_owned(),
            }),
        };
        pb::BatchResult {
            result: Some(result),
        }
    }

    /// Runs `f` on the applied state after the read barrier the request asks for.
    async fn read<T>(
        &self,
        path: &str,
        consistency: i32,
        f: impl FnOnce(&AppliedState, pb::ResponseHeader) -> Result<T, EdgeError>,
    ) -> Result<T, EdgeError> {
        path::validate(path)?;
        let consistency = pb::Consistency::try_from(consistency).map_err(|_| {
            EdgeError::InvalidArgument(format!("consistency {consistency} is not a known value"))
        })?;
        if consistency == pb::Consistency::Linearizable {
            self.proposer.read_barrier().await?;
        }
        let applied = self.state.read();
        let header = self.header(applied.revision);
        f(&applied, header)
    }
}

fn no_node(path: &str) -> EdgeError {
    EdgeError::NoNode {
        path: path.to_owned(),
    }
}

// Request spans are at debug level, as in `lock.rs` and `claims.rs`: at the default level
// (info) a span per request cost about 7 % of a write's server CPU (1 member, 64 clients).
#[tonic::async_trait]
impl Kv for KvService {
    #[tracing::instrument(level = "debug", skip_all, fields(member = self.id, path = %req.get_ref().path))]
    async fn create(
        &self,
        req: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::CreateResponse>, Status> {
        let result = self.create_one(Urgency::Now, req.into_inner()).await;
        self.finish("create", result)
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let r = req.into_inner();
        let result = self
            .read(&r.path, r.consistency, |applied, header| {
                let node = applied.state.get(&r.path).ok_or_else(|| no_node(&r.path))?;
                Ok(pb::GetResponse {
                    header: Some(header),
                    data: node.data.clone(),
                    stat: Some(convert::stat(&node.stat)),
                })
            })
            .await;
        self.finish("get", result)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = self.id, path = %req.get_ref().path))]
    async fn set(&self, req: Request<pb::SetRequest>) -> Result<Response<pb::SetResponse>, Status> {
        let result = self.set_one(Urgency::Now, req.into_inner()).await;
        self.finish("set", result)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = self.id, path = %req.get_ref().path))]
    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let result = self.delete_one(Urgency::Now, req.into_inner()).await;
        self.finish("delete", result)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = self.id, items = req.get_ref().items.len()))]
    async fn batch(
        &self,
        req: Request<pb::BatchRequest>,
    ) -> Result<Response<pb::BatchResponse>, Status> {
        let items = req.into_inner().items;
        if items.len() > MAX_BATCH_ITEMS {
            let e = EdgeError::InvalidArgument(format!(
                "items: {} items, at most {MAX_BATCH_ITEMS} in one batch",
                items.len()
            ));
            return self.finish("batch", Err(e));
        }
        // Concurrently, so that the items' commands reach the batcher together and share an
        // entry (none takes the idle leader's direct path alone); each is counted in the
        // metrics under its own operation.
        let urgency = if items.len() > 1 {
            Urgency::Together
        } else {
            Urgency::Now
        };
        let results = futures::future::join_all(
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| self.batch_item(urgency, i, item)),
        )
        .await;
        self.finish("batch", Ok(pb::BatchResponse { results }))
    }

    async fn exists(
        &self,
        req: Request<pb::ExistsRequest>,
    ) -> Result<Response<pb::ExistsResponse>, Status> {
        let r = req.into_inner();
        let result = self
            .read(&r.path, r.consistency, |applied, header| {
                Ok(pb::ExistsResponse {
                    header: Some(header),
                    stat: applied.state.get(&r.path).map(|n| convert::stat(&n.stat)),
                })
            })
            .await;
        self.finish("exists", result)
    }

    async fn children(
        &self,
        req: Request<pb::ChildrenRequest>,
    ) -> Result<Response<pb::ChildrenResponse>, Status> {
        let r = req.into_inner();
        let result = self
            .read(&r.path, r.consistency, |applied, header| {
                let node = applied.state.get(&r.path).ok_or_else(|| no_node(&r.path))?;
                let names: Vec<String> = node.children.iter().cloned().collect();
                let stats = if r.with_stats {
                    let prefix = if r.path == "/" {
                        String::new()
                    } else {
                        r.path.clone()
                    };
                    names
                        .iter()
                        .filter_map(|name| applied.state.get(&format!("{prefix}/{name}")))
                        .map(|child| convert::stat(&child.stat))
                        .collect()
                } else {
                    Vec::new()
                };
                Ok(pb::ChildrenResponse {
                    header: Some(header),
                    names,
                    stats,
                    stat: Some(convert::stat(&node.stat)),
                })
            })
            .await;
        self.finish("children", result)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = self.id, ops = req.get_ref().ops.len()))]
    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let r = req.into_inner();
        let result = async {
            let mut ops = Vec::with_capacity(r.ops.len());
            for (i, op) in r.ops.into_iter().enumerate() {
                ops.push(
                    convert::txn_op(op)
                        .map_err(|e| EdgeError::InvalidArgument(format!("txn op {i}: {e}")))?,
                );
            }
            let (revision, reply) = self.write(r.write_id, Op::Txn(ops), Urgency::Now).await?;
            let header = self.header(revision);
            let results = match reply {
                Reply::Txn(replies) => replies
                    .into_iter()
                    .map(|r| convert::txn_result(r, &header))
                    .collect(),
                _ => return Err(EdgeError::WriteIdReused),
            };
            Ok(pb::TxnResponse {
                header: Some(header),
                results,
            })
        }
        .await;
        self.finish("txn", result)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = self.id, revision = req.get_ref().revision))]
    async fn compact(
        &self,
        req: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactResponse>, Status> {
        let r = req.into_inner();
        let result = async {
            let applied = self.state.read().revision;
            if r.revision > applied {
                return Err(EdgeError::InvalidArgument(format!(
                    "revision {} is in the future: the latest applied revision is {applied}",
                    r.revision
                )));
            }
            let op = Op::Compact {
                revision: r.revision,
            };
            match super::propose(&self.proposer, convert::write_id(r.write_id), op).await? {
                (at, Reply::Compacted { revision }) => Ok(pb::CompactResponse {
                    header: Some(self.header(at)),
                    compacted_revision: revision,
                }),
                _ => Err(EdgeError::WriteIdReused),
            }
        }
        .await;
        self.finish("compact", result)
    }
}
