//! The peer network, server side: hands openraft's RPCs from other members to the local Raft
//! and serves forwarded writes and read-index requests for followers.

use kord_api::peer::peer_server::Peer;
use kord_api::peer::Payload;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::network::TARGET_ID_HEADER;
use super::{NodeId, Raft, TypeConfig};
use crate::liveness::{LeaseQuery, Liveness};
use crate::proposal::{ForwardReply, Proposer};
use crate::state::Command;
use crate::storage::codec;

pub struct PeerService {
    pub id: NodeId,
    pub raft: Raft,
    pub proposer: Proposer,
    pub liveness: Liveness,
}

impl PeerService {
    /// Refuses Raft traffic addressed to another member id.
    fn check_target(&self, req: &Request<Payload>) -> Result<(), Status> {
        let target = req
            .metadata()
            .get(TARGET_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<NodeId>().ok());
        match target {
            Some(t) if t != self.id => {
                tracing::error!(
                    member = self.id,
                    addressed_to = t,
                    "refusing raft traffic meant for another member"
                );
                Err(Status::failed_precondition(format!(
                    "this is member {}, not member {t}: check --initial-cluster and the advertised peer addresses",
                    self.id
                )))
            }
            _ => Ok(()),
        }
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
        self.check_target(&req)?;
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        self.check_target(&req)?;
        let rpc: VoteRequest<NodeId> = decode(req)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        self.check_target(&req)?;
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
}
