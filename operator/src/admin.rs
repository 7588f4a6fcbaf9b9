//! The membership admin API (`kord.v1.Cluster`) as the operator uses it: find the leader, read
//! the membership with replication progress, and send one membership change to the leader.

use std::time::Duration;

use kord_api::v1::cluster_client::ClusterClient;
use kord_api::v1::{
    Member, MemberListRequest, MemberRole, PromoteMemberRequest, RemoveMemberRequest,
    StatusRequest, TransferLeaderRequest,
};
use tonic::transport::{Channel, Endpoint};

/// Connecting to a member: short, the operator retries on its next reconcile anyway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A membership change waits for a joint-consensus commit (or a leadership transfer).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("{rpc} at {endpoint}: {status}")]
    Rpc {
        rpc: &'static str,
        endpoint: String,
        status: Box<tonic::Status>,
    },
    #[error("no leader is known at {0}")]
    NoLeader(String),
    #[error("the leader {0} does not publish a client address")]
    NoLeaderAddress(u64),
}

/// The membership as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub leader: u64,
    pub leader_addr: String,
    pub change_in_progress: bool,
    pub members: Vec<RaftMember>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftMember {
    pub id: u64,
    pub role: MemberRole,
    pub lag: u64,
    /// Milliseconds since the leader heard from it (0 for the leader; None: unknown).
    pub last_contact_ms: Option<u64>,
}

async fn connect(endpoint: &str, timeout: Duration) -> Result<ClusterClient<Channel>, AdminError> {
    let channel = Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|source| AdminError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|source| AdminError::Connect {
            endpoint: endpoint.to_string(),
            source,
        })?;
    Ok(ClusterClient::new(channel))
}

fn rpc_error<'a>(
    rpc: &'static str,
    endpoint: &'a str,
) -> impl FnOnce(tonic::Status) -> AdminError + 'a {
    move |status| AdminError::Rpc {
        rpc,
        endpoint: endpoint.to_string(),
        status: Box::new(status),
    }
}

fn convert(m: &Member) -> RaftMember {
    RaftMember {
        id: m.id,
        role: MemberRole::try_from(m.role).unwrap_or(MemberRole::Learner),
        lag: m.lag,
        last_contact_ms: if m.is_leader {
            Some(0)
        } else {
            m.last_contact_ms
        },
    }
}

/// Asks any member (through `endpoint`, e.g. the client service) who leads, then asks the
/// leader for the membership. Servers without `MemberList` yet answer from the leader's Status.
#[tracing::instrument(skip_all, fields(endpoint))]
pub async fn membership(endpoint: &str) -> Result<Membership, AdminError> {
    let mut any = connect(endpoint, READ_TIMEOUT).await?;
    let status = any
        .status(StatusRequest {})
        .await
        .map_err(rpc_error("Status", endpoint))?
        .into_inner();
    if status.leader_id == 0 {
        return Err(AdminError::NoLeader(endpoint.to_string()));
    }
    let leader_addr = status
        .members
        .iter()
        .find(|m| m.id == status.leader_id)
        .map(|m| m.client_addr.clone())
        .filter(|a| !a.is_empty())
        .ok_or(AdminError::NoLeaderAddress(status.leader_id))?;
    let mut leader = connect(&leader_addr, READ_TIMEOUT).await?;
    match leader.member_list(MemberListRequest {}).await {
        Ok(list) => {
            let list = list.into_inner();
            Ok(Membership {
                leader: list.leader_id,
                leader_addr,
                change_in_progress: list.change_in_progress,
                members: list.members.iter().map(convert).collect(),
            })
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            let own = leader
                .status(StatusRequest {})
                .await
                .map_err(rpc_error("Status", &leader_addr))?
                .into_inner();
            Ok(Membership {
                leader: own.leader_id,
                leader_addr,
                change_in_progress: false,
                members: own.members.iter().map(convert).collect(),
            })
        }
        Err(status) => Err(rpc_error("MemberList", &leader_addr)(status)),
    }
}

#[tracing::instrument(skip_all, fields(leader = leader_addr, id))]
pub async fn promote(leader_addr: &str, id: u64) -> Result<(), AdminError> {
    connect(leader_addr, CHANGE_TIMEOUT)
        .await?
        .promote_member(PromoteMemberRequest { id, max_lag: 0 })
        .await
        .map_err(rpc_error("PromoteMember", leader_addr))?;
    Ok(())
}

#[tracing::instrument(skip_all, fields(leader = leader_addr, id))]
pub async fn remove(leader_addr: &str, id: u64) -> Result<(), AdminError> {
    connect(leader_addr, CHANGE_TIMEOUT)
        .await?
        .remove_member(RemoveMemberRequest { id })
        .await
        .map_err(rpc_error("RemoveMember", leader_addr))?;
    Ok(())
}

#[tracing::instrument(skip_all, fields(leader = leader_addr, to_id))]
pub async fn transfer_leader(leader_addr: &str, to_id: u64) -> Result<(), AdminError> {
    connect(leader_addr, CHANGE_TIMEOUT)
        .await?
        .transfer_leader(TransferLeaderRequest { to_id })
        .await
        .map_err(rpc_error("TransferLeader", leader_addr))?;
    Ok(())
}
