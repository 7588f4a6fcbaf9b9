//! The peer network, server side: hands openraft's RPCs from other members to the local Raft
//! and serves forwarded writes and read-index requests for followers.

use kord_api::peer::peer_server::Peer;
use kord_api::peer::Payload;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::{NodeId, Raft, TypeConfig};
use crate::liveness::{LeaseQuery, Liveness};
use crate::proposal::{ForwardReply, Proposer};
use crate::state::Command;
use crate::storage::codec;

pub struct PeerService {
    pub raft: Raft,
    pub proposer: Proposer,
    pub liveness: Liveness,
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
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
        let rpc: VoteRequest<NodeId> = decode(req)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(&self, req: Request<Payload>) -> Result<Response<Payload>, Status> {
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
