//! The `Lease` service: grant, revoke, keep-alive, time-to-live and list. Grants and revokes
//! are replicated writes; keep-alives and remaining time are answered by the leader's
//! countdowns (`liveness`), forwarded there from followers.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use kord_api::v1 as pb;
use kord_api::v1::lease_server::Lease;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{convert, EdgeError, Limits};
use crate::liveness::{LeaseError, LeaseQuery, Liveness};
use crate::metrics::Metrics;
use crate::proposal::Proposer;
use crate::raft::{NodeId, Raft};
use crate::state::{Op, Reply};
use crate::storage::state_machine::SharedState;

#[derive(Clone)]
pub struct LeaseService {
    pub id: NodeId,
    pub raft: Raft,
    pub proposer: Proposer,
    pub liveness: Liveness,
    pub state: SharedState,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
}

impl From<LeaseError> for EdgeError {
    fn from(e: LeaseError) -> Self {
        match e {
            LeaseError::NotFound(id) => EdgeError::LeaseNotFound { id },
            LeaseError::NotLeader { .. } => {
                EdgeError::Propose(crate::proposal::ProposeError::NoLeader)
            }
        }
    }
}

impl LeaseService {
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

    /// Asks the leader (this member or another) about a lease.
    async fn ask_leader(&self, query: LeaseQuery) -> Result<u64, EdgeError> {
        match self.liveness.answer(query) {
            Err(LeaseError::NotLeader { .. }) => Ok(self.proposer.forward_lease(query).await??),
            other => Ok(other?),
        }
    }

    async fn propose(
        &self,
        write_id: Option<pb::WriteId>,
        op: Op,
    ) -> Result<(u64, Reply), EdgeError> {
        super::propose(&self.proposer, convert::write_id(write_id), op).await
    }

    /// Leases outside the bounds are refused; sessions are clamped into theirs.
    fn granted_ttl(&self, requested_ms: u64, session: bool) -> Result<u64, EdgeError> {
        if session {
            let (min, max) = self.limits.session_timeout_ms;
            return Ok(requested_ms.clamp(min, max));
        }
        let (min, max) = self.limits.lease_ttl_ms;
        if !(min..=max).contains(&requested_ms) {
            return Err(EdgeError::OutOfBounds {
                field: "ttl_ms",
                value: requested_ms,
                min,
                max,
                flags: "--lease-ttl-min/--lease-ttl-max",
            });
        }
        Ok(requested_ms)
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let r = req.into_inner();
        let result = async {
            let ttl_ms = self.granted_ttl(r.ttl_ms, r.session)?;
            let op = Op::LeaseGrant {
                id: r.id,
                ttl_ms,
                session: r.session,
            };
            match self.propose(r.write_id, op).await? {
                (revision, Reply::LeaseGranted { id, ttl_ms }) => Ok(pb::LeaseGrantResponse {
                    header: Some(self.header(revision)),
                    id,
                    ttl_ms,
                }),
                _ => Err(EdgeError::WriteIdReused),
            }
        }
        .await;
        self.finish("lease_grant", result)
    }

    async fn revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let r = req.into_inner();
        let result = async {
            match self
                .propose(r.write_id, Op::LeaseRevoke { id: r.id })
                .await?
            {
                (revision, Reply::Deleted { paths }) => Ok(pb::LeaseRevokeResponse {
                    header: Some(self.header(revision)),
                    deleted: paths,
                }),
                _ => Err(EdgeError::WriteIdReused),
            }
        }
        .await;
        self.finish("lease_revoke", result)
    }

    type KeepAliveStream = KeepAliveStream;

    async fn keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let mut incoming = req.into_inner();
        let service = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            while let Some(msg) = incoming.next().await {
                let reply = match msg {
                    Ok(m) => {
                        let result = service
                            .ask_leader(LeaseQuery::KeepAlive(m.id))
                            .await
                            .map_err(Status::from);
                        let code = result
                            .as_ref()
                            .map_or_else(|s| s.code(), |_| tonic::Code::Ok);
                        service.metrics.count_request("lease_keepalive", code);
                        result.map(|ttl_ms| pb::LeaseKeepAliveResponse {
                            header: Some(service.header(service.state.read().revision)),
                            id: m.id,
                            ttl_ms,
                        })
                    }
                    Err(status) => Err(status),
                };
                let failed = reply.is_err();
                if tx.send(reply).await.is_err() || failed {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let r = req.into_inner();
        let result = async {
            self.proposer.read_barrier().await?;
            let remaining_ms = self.ask_leader(LeaseQuery::Remaining(r.id)).await?;
            let applied = self.state.read();
            let lease = applied
                .state
                .lease(r.id)
                .ok_or(EdgeError::LeaseNotFound { id: r.id })?;
            Ok(pb::LeaseTimeToLiveResponse {
                header: Some(self.header(applied.revision)),
                id: r.id,
                granted_ttl_ms: lease.ttl_ms,
                remaining_ms,
                session: lease.session,
                nodes: lease.nodes.iter().cloned().collect(),
            })
        }
        .await;
        self.finish("lease_ttl", result)
    }

    async fn list(
        &self,
        _req: Request<pb::LeaseListRequest>,
    ) -> Result<Response<pb::LeaseListResponse>, Status> {
        let result = async {
            self.proposer.read_barrier().await?;
            let applied = self.state.read();
            Ok(pb::LeaseListResponse {
                header: Some(self.header(applied.revision)),
                leases: applied
                    .state
                    .leases()
                    .map(|(id, l)| pb::LeaseInfo {
                        id,
                        granted_ttl_ms: l.ttl_ms,
                        session: l.session,
                        node_count: l.nodes.len() as u32,
                    })
                    .collect(),
            })
        }
        .await;
        self.finish("lease_list", result)
    }
}
