//! The peer network, server side: hands openraft's RPCs from other members to the local Raft
//! and serves forwarded writes, read-index, membership requests and claim waits for
//! followers. Raft traffic from a member removed from the cluster is refused (the anti-rejoin
//! guard), and so is all Raft traffic while this member joins with no data.

use kord_api::peer::peer_server::Peer;
use kord_api::peer::Payload;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::network::TARGET_ID_HEADER;
use super::peers::{metadata_id, PeerGuard, REMOVED_HEADER, SENDER_ID_HEADER};
use super::{NodeId, Raft, TypeConfig};
use crate::claims::{ClaimWait, Claims};
use crate::liveness::{LeaseQuery, Liveness};
use crate::membership::{AdminCall, Membership};
use crate::proposal::{ForwardReply, Proposer};
use crate::state::Command;
use crate::storage::codec;

pub struct PeerService {
    pub gate: RaftGate,
    pub raft: Raft,
    pub proposer: Proposer,
    pub liveness: Liveness,
    pub membership: Membership,
    pub claims: Claims,
}

/// Why a member refuses a Raft request before Raft sees it. Sent as is over the peer link
/// (`link.rs`), and as a gRPC status over the peer service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Refusal {
    /// The request names another member: a misconfigured address, which openraft would
    /// otherwise take for its own and trip over.
    WrongTarget { message: String },
    /// The sender was removed from the cluster (its id is tombstoned): it stops on seeing this.
    Removed { sender: NodeId, message: String },
    /// This member started with no data and the cluster has not added it yet.
    Joining { message: String },
    /// The request could not be decoded.
    Malformed { message: String },
}

impl Refusal {
    pub fn message(&self) -> &str {
        match self {
            Refusal::WrongTarget { message }
            | Refusal::Removed { message, .. }
            | Refusal::Joining { message }
            | Refusal::Malformed { message } => message,
        }
    }

    fn into_status(self) -> Status {
        match self {
            Refusal::WrongTarget { message } => Status::failed_precondition(message),
            Refusal::Removed { sender, message } => {
                let mut status = Status::permission_denied(message);
                status.metadata_mut().insert(REMOVED_HEADER, sender.into());
                status
            }
            Refusal::Joining { message } => Status::unavailable(message),
            Refusal::Malformed { message } => Status::invalid_argument(message),
        }
    }
}

/// The checks every Raft request passes before it reaches Raft, over either transport.
#[derive(Clone)]
pub struct RaftGate {
    pub id: NodeId,
    pub membership: Membership,
    pub guard: std::sync::Arc<PeerGuard>,
}

impl RaftGate {
    /// `target`: the member the request is meant for; `sender`: the member that sent it (None
    /// where an older sender did not say).
    pub fn check(&self, target: Option<NodeId>, sender: Option<NodeId>) -> Result<(), Refusal> {
        if let Some(t) = target.filter(|t| *t != self.id) {
            tracing::error!(
                member = self.id,
                addressed_to = t,
                "refusing raft traffic meant for another member"
            );
            return Err(Refusal::WrongTarget {
                message: format!(
                    "this is member {}, not member {t}: check --initial-cluster and the advertised peer addresses",
                    self.id
                ),
            });
        }
        if let Some(sender) = sender.filter(|s| self.membership.is_removed(*s)) {
            tracing::warn!(
                member = self.id,
                sender,
                "refusing raft traffic from a removed member"
            );
            return Err(Refusal::Removed {
                sender,
                message: format!(
                    "member {sender} was removed from the cluster and its id may not be reused: \
                     wipe its data and join with a new id"
                ),
            });
        }
        if self.guard.is_joining() {
            return Err(Refusal::Joining {
                message: format!(
                    "member {} started with no data and the cluster has not added it yet: it \
                     takes no Raft traffic until then",
                    self.id
                ),
            });
        }
        Ok(())
    }
}

impl PeerService {
    fn check(&self, req: &Request<Payload>) -> Result<(), Status> {
        self.gate
            .check(
                metadata_id(req.metadata(), TARGET_ID_HEADER),
                metadata_id(req.metadata(), SENDER_ID_HEADER),
            )
            .map_err(Refusal::into_status)
    }
}

fn decode<T: DeserializeOwned>(req: Request<Payload>) -> Result<T, Status> {
    postcard::from_bytes(&req.into_inner().data)
        .map_err(|e| Status::invalid_argument(format!("malformed peer payload: {e}")))
}

fn reply<T: Serialize>(value: &T) -> Result<Response<Payload>, Status> {
    Ok(Response::new(Payload {
        data: codec::encode(value),
    }))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        self.check(&req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        self.check(&req)?;
        let rpc: VoteRequest<NodeId> = decode(req)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        self.check(&req)?;
        let rpc: InstallSnapshotRequest<TypeConfig> = decode(req)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn forward(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let cmd: Command = decode(req)?;
        let result: ForwardReply = self.proposer.propose_here(cmd).await;
        reply(&result)
    }

    async fn read_index(&self, _req: Request<Payload>) -> Result<Response<Payload>, Status> {
        reply(&self.proposer.read_index_here().await)
    }

    async fn lease(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let query: LeaseQuery = decode(req)?;
        reply(&self.liveness.answer(query))
    }

    async fn admin(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let call: AdminCall = decode(req)?;
        reply(&self.membership.serve_forwarded(call).await)
    }

    async fn claim_wait(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let wait: ClaimWait = decode(req)?;
        reply(&self.claims.serve_forwarded_wait(wait).await)
    }
}
