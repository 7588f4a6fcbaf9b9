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
use super::peers::{PeerGuard, REMOVED_HEADER, SENDER_ID_HEADER};
use super::{NodeId, Raft, TypeConfig};
use crate::claims::{ClaimWait, Claims};
use crate::liveness::{LeaseQuery, Liveness};
use crate::membership::{AdminCall, Membership};
use crate::proposal::{ForwardReply, Proposer};
use crate::state::Command;
use crate::storage::codec;

pub struct PeerService {
    pub id: NodeId,
    pub raft: Raft,
    pub proposer: Proposer,
    pub liveness: Liveness,
    pub membership: Membership,
    pub guard: std::sync::Arc<PeerGuard>,
    pub claims: Claims,
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

    /// Refuses Raft traffic from a member that was removed (its id is tombstoned and it is not
    /// in this member's membership), with a status the sender recognises and stops on.
    fn check_sender(&self, req: &Request<Payload>) -> Result<(), Status> {
        let sender = req
            .metadata()
            .get(SENDER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<NodeId>().ok());
        let Some(sender) = sender else {
            return Ok(());
        };
        if !self.membership.is_removed(sender) {
            return Ok(());
        }
        tracing::warn!(
            member = self.id,
            sender,
            "refusing raft traffic from a removed member"
        );
        let mut status = Status::permission_denied(format!(
            "member {sender} was removed from the cluster and its id may not be reused: \
             wipe its data and join with a new id"
        ));
        status.metadata_mut().insert(REMOVED_HEADER, sender.into());
        Err(status)
    }

    fn check(&self, req: &Request<Payload>) -> Result<(), Status> {
        self.check_target(req)?;
        self.check_sender(req)?;
        if self.guard.is_joining() {
            return Err(Status::unavailable(format!(
                "member {} started with no data and the cluster has not added it yet: it takes \
                 no Raft traffic until then",
                self.id
            )));
        }
        Ok(())
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
