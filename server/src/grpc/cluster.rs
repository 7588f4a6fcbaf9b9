//! The `Cluster` service: status as this member sees it, and membership administration
//! (validated here, decided and carried out by [`crate::membership`] on the leader).

use std::time::Duration;

use kord_api::v1 as pb;
use kord_api::v1::cluster_server::Cluster;
use tonic::{Request, Response, Status};

use crate::membership::{
    AdminRequest, MemberView, MembersView, Membership, MembershipError, NewMember, Role,
    DEFAULT_ADMIN_TIMEOUT,
};
use crate::raft::{KordNode, NodeId, Raft, ServerState};
use crate::storage::state_machine::SharedState;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub struct ClusterService {
    pub id: NodeId,
    pub raft: Raft,
    pub state: SharedState,
    pub committed: Arc<AtomicU64>,
    pub membership: Membership,
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

impl From<MembershipError> for Status {
    fn from(e: MembershipError) -> Status {
        let message = e.to_string();
        match e {
            MembershipError::InProgress(_) | MembershipError::Refused(_) => {
                Status::failed_precondition(message)
            }
            MembershipError::IdUsed { .. } => Status::already_exists(message),
            MembershipError::Invalid(_) => Status::invalid_argument(message),
            MembershipError::NotMember(_) => Status::not_found(message),
            MembershipError::Timeout(_) => Status::deadline_exceeded(message),
            MembershipError::Unavailable(_) => Status::unavailable(message),
        }
    }
}

fn member_pb(m: &MemberView) -> pb::Member {
    pb::Member {
        id: m.id,
        peer_addr: m.node.peer_addr.clone(),
        client_addr: m.node.client_addr.clone(),
        role: match m.role {
            Role::Voter => pb::MemberRole::Voter,
            Role::Learner => pb::MemberRole::Learner,
            Role::Observer => pb::MemberRole::Observer,
        } as i32,
        matched_index: m.matched_index,
        name: m.node.name.clone(),
        lag: m.lag,
        last_contact_ms: m.last_contact_ms,
        is_leader: m.is_leader,
    }
}

fn members_pb(view: &MembersView) -> Vec<pb::Member> {
    view.members.iter().map(member_pb).collect()
}

/// The time an admin call may take: the client's `grpc-timeout` less a margin, so the client
/// gets our error rather than its own, or [`DEFAULT_ADMIN_TIMEOUT`] without one.
fn request_timeout<T>(req: &Request<T>) -> Duration {
    let parsed = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    parsed.map_or(DEFAULT_ADMIN_TIMEOUT, |d| {
        d.saturating_sub(Duration::from_millis(200).min(d / 10))
    })
}

/// gRPC's "<digits><unit>" timeout format.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn new_member(r: pb::AddMemberRequest, field: &str) -> Result<NewMember, Status> {
    if r.id == 0 {
        return Err(Status::invalid_argument(format!(
            "{field}id must be a positive integer"
        )));
    }
    if r.peer_addr.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{field}peer_addr must not be empty"
        )));
    }
    if !r.peer_addr.contains(':') {
        return Err(Status::invalid_argument(format!(
            "{field}peer_addr {:?} must be host:port",
            r.peer_addr
        )));
    }
    Ok(NewMember {
        id: r.id,
        node: KordNode {
            peer_addr: r.peer_addr,
            client_addr: r.client_addr,
            name: r.name,
            observer: r.observer,
        },
        learner_only: r.learner_only || r.observer,
        wait_caught_up: r.wait_caught_up,
        max_lag: r.max_lag,
    })
}

fn positive(id: u64, field: &str) -> Result<u64, Status> {
    if id == 0 {
        Err(Status::invalid_argument(format!(
            "{field} must be a positive integer"
        )))
    } else {
        Ok(id)
    }
}

impl ClusterService {
    fn header(&self) -> pb::ResponseHeader {
        let revision = self.state.read().applied_index();
        super::header(self.id, &self.raft, revision)
    }

    async fn change(
        &self,
        request: AdminRequest,
        timeout: Duration,
    ) -> Result<Response<pb::MembershipChangeResponse>, Status> {
        let view = self.membership.execute(request, timeout).await?;
        Ok(Response::new(pb::MembershipChangeResponse {
            header: Some(self.header()),
            members: members_pb(&view),
        }))
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
            members: members_pb(&self.membership.view()),
            state_digest: digest,
            znode_count: znodes,
            compacted_revision: compacted,
            last_log_index: metrics.last_log_index.unwrap_or(0),
            snapshot_index: metrics.snapshot.map_or(0, |s| s.index),
            raft_state: state_name(metrics.state).to_owned(),
            revision,
        }))
    }

    #[tracing::instrument(skip_all, fields(member = self.id))]
    async fn add_member(
        &self,
        req: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::AddMemberResponse>, Status> {
        let timeout = request_timeout(&req);
        let new = new_member(req.into_inner(), "")?;
        tracing::info!(new_id = new.id, node = %new.node, learner_only = new.learner_only, "adding member");
        let view = self
            .membership
            .execute(AdminRequest::Add(new), timeout)
            .await?;
        Ok(Response::new(pb::AddMemberResponse {
            members: members_pb(&view),
        }))
    }

    async fn member_list(
        &self,
        req: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        let timeout = request_timeout(&req);
        let view = self.membership.execute(AdminRequest::List, timeout).await?;
        Ok(Response::new(pb::MemberListResponse {
            header: Some(self.header()),
            leader_id: view.leader_id,
            members: members_pb(&view),
            change_in_progress: view.change_in_progress,
        }))
    }

    #[tracing::instrument(skip_all, fields(member = self.id))]
    async fn promote_member(
        &self,
        req: Request<pb::PromoteMemberRequest>,
    ) -> Result<Response<pb::MembershipChangeResponse>, Status> {
        let timeout = request_timeout(&req);
        let r = req.into_inner();
        let id = positive(r.id, "id")?;
        self.change(
            AdminRequest::Promote {
                id,
                max_lag: r.max_lag,
            },
            timeout,
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(member = self.id))]
    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MembershipChangeResponse>, Status> {
        let timeout = request_timeout(&req);
        let id = positive(req.into_inner().id, "id")?;
        self.change(AdminRequest::Remove { id }, timeout).await
    }

    #[tracing::instrument(skip_all, fields(member = self.id))]
    async fn replace_member(
        &self,
        req: Request<pb::ReplaceMemberRequest>,
    ) -> Result<Response<pb::MembershipChangeResponse>, Status> {
        let timeout = request_timeout(&req);
        let r = req.into_inner();
        let old_id = positive(r.old_id, "old_id")?;
        let new = r
            .new_member
            .ok_or_else(|| Status::invalid_argument("new_member is required"))?;
        let new = new_member(new, "new_member.")?;
        self.change(AdminRequest::Replace { old_id, new }, timeout)
            .await
    }

    #[tracing::instrument(skip_all, fields(member = self.id))]
    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let timeout = request_timeout(&req);
        let to = positive(req.into_inner().to_id, "to_id")?;
        let view = self
            .membership
            .execute(AdminRequest::Transfer { to }, timeout)
            .await?;
        Ok(Response::new(pb::TransferLeaderResponse {
            header: Some(self.header()),
            leader_id: view.leader_id,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_grpc_timeout("1500m"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(parse_grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
        let mut req = Request::new(());
        req.set_timeout(Duration::from_secs(10));
        assert_eq!(request_timeout(&req), Duration::from_millis(9800));
        assert_eq!(request_timeout(&Request::new(())), DEFAULT_ADMIN_TIMEOUT);
    }

    #[test]
    fn membership_errors_map_to_codes() {
        let code = |e: MembershipError| Status::from(e).code();
        assert_eq!(
            code(MembershipError::InProgress("x".into())),
            tonic::Code::FailedPrecondition
        );
        assert_eq!(
            code(MembershipError::IdUsed {
                id: 1,
                why: "x".into()
            }),
            tonic::Code::AlreadyExists
        );
        assert_eq!(code(MembershipError::NotMember(1)), tonic::Code::NotFound);
        assert_eq!(
            code(MembershipError::Timeout("x".into())),
            tonic::Code::DeadlineExceeded
        );
        let s = Status::from(MembershipError::InProgress("another".into()));
        assert!(s.message().starts_with("membership change in progress"));
    }
}
