//! The `Cluster` service: status as this member sees it, and adding members.

use std::collections::{BTreeMap, BTreeSet};

use kord_api::v1 as pb;
use kord_api::v1::cluster_server::Cluster;
use openraft::ChangeMembers;
use tonic::{Request, Response, Status};

use crate::raft::{KordNode, NodeId, Raft, ServerState};
use crate::storage::state_machine::SharedState;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub struct ClusterService {
    pub id: NodeId,
    pub raft: Raft,
    pub state: SharedState,
    pub committed: Arc<AtomicU64>,
}

fn state_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

impl ClusterService {
    fn members(&self) -> Vec<pb::Member> {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let matched: BTreeMap<NodeId, u64> = metrics
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, l)| (*id, l.map_or(0, |l| l.index)))
                    .collect()
            })
            .unwrap_or_default();
        membership
            .nodes()
            .map(|(id, node)| pb::Member {
                id: *id,
                peer_addr: node.peer_addr.clone(),
                client_addr: node.client_addr.clone(),
                role: if voters.contains(id) {
                    pb::MemberRole::Voter
                } else {
                    pb::MemberRole::Learner
                } as i32,
                matched_index: matched.get(id).copied().unwrap_or(0),
                ..Default::default()
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let metrics = self.raft.metrics().borrow().clone();
        let (applied_index, revision, digest, znodes, compacted) = {
            let applied = self.state.read();
            (
                applied.applied_index(),
                applied.revision,
                applied.state.digest(),
                applied.state.node_count() as u64,
                applied.compacted_revision,
            )
        };
        Ok(Response::new(pb::StatusResponse {
            member_id: self.id,
            leader_id: metrics.current_leader.unwrap_or(0),
            raft_term: metrics.current_term,
            commit_index: self.committed.load(Ordering::Relaxed).max(applied_index),
            applied_index,
            members: self.members(),
            state_digest: digest,
            znode_count: znodes,
            compacted_revision: compacted,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            snapshot_index: metrics.snapshot.map_or(0, |s| s.index),
            raft_state: state_name(metrics.state).to_owned(),
            revision,
        }))
    }

    async fn add_member(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::AddMemberResponse>, Status> {
        let r = req.into_inner();
        if r.id == 0 {
            return Err(Status::invalid_argument("id must be a positive integer"));
        }
        if r.peer_addr.is_empty() {
            return Err(Status::invalid_argument("peer_addr must not be empty"));
        }
        let node = KordNode {
            peer_addr: r.peer_addr,
            client_addr: r.client_addr,
        };
        tracing::info!(member = r.id, %node, learner_only = r.learner_only, "adding member");
        self.raft
            .add_learner(r.id, node, true)
            .await
            .map_err(|e| Status::unavailable(format!("adding member {} as learner: {e}", r.id)))?;
        if !r.learner_only {
            self.raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([r.id])), false)
                .await
                .map_err(|e| {
                    Status::unavailable(format!("promoting member {} to voter: {e}", r.id))
                })?;
        }
        Ok(Response::new(pb::AddMemberResponse {
            members: self.members(),
        }))
    }

    async fn member_list(
        &self,
        _req: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        Err(Status::unimplemented("MemberList is not implemented yet"))
    }

    async fn promote_member(
        &self,
        _req: Request<pb::PromoteMemberRequest>,
    ) -> Result<Response<pb::MembershipChangeResponse>, Status> {
        Err(Status::unimplemented(
            "PromoteMember is not implemented yet",
        ))
    }

    async fn remove_member(
        &self,
        _req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MembershipChangeResponse>, Status> {
        Err(Status::unimplemented("RemoveMember is not implemented yet"))
    }

    async fn replace_member(
        &self,
        _req: Request<pb::ReplaceMemberRequest>,
    ) -> Result<Response<pb::MembershipChangeResponse>, Status> {
        Err(Status::unimplemented(
            "ReplaceMember is not implemented yet",
        ))
    }

    async fn transfer_leader(
        &self,
        _req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        Err(Status::unimplemented(
            "TransferLeader is not implemented yet",
        ))
    }
}
