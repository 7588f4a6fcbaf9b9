//! Membership administration: list the members, add, promote, remove and replace them, and
//! move leadership. Every call goes to the leader when it is known (any member forwards it
//! there) and is retried on another endpoint while the cluster is unavailable. The server makes
//! retries safe: re-adding a member with the same address resumes, promoting a voter and
//! removing an already removed member succeed.

use std::future::Future;
use std::time::Duration;

use kord_api::transport::Channel;
use kord_api::v1::cluster_client::ClusterClient;
use kord_api::v1::{
    AddMemberRequest, Member, MemberListRequest, PromoteMemberRequest, RemoveMemberRequest,
    ReplaceMemberRequest, TransferLeaderRequest,
};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::client::{BACKOFF_MAX, BACKOFF_START};
use crate::{Client, Error};

/// Deadline of a membership change unless one is given: long enough for a learner to catch
/// up by snapshot or for an election.
pub const DEFAULT_ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

/// A member to add (or to swap in by [`Client::replace_member`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewMember {
    /// Never used before in this cluster: ids of removed members are refused.
    pub id: u64,
    /// Where the other members reach it (`host:port` of its peer listener).
    pub peer_addr: String,
    /// Its client API address, published in member lists.
    pub client_addr: String,
    /// A human name (e.g. the pod name).
    pub name: String,
    /// Never a voter: serves local reads and watches only.
    pub observer: bool,
    /// Stay a learner instead of being promoted once caught up.
    pub learner_only: bool,
    /// Return only once the learner is within `max_lag` entries of the leader.
    pub wait_caught_up: bool,
    /// Catch-up threshold in entries; 0 for the server's default.
    pub max_lag: u64,
}

impl From<NewMember> for AddMemberRequest {
    fn from(m: NewMember) -> Self {
        AddMemberRequest {
            id: m.id,
            peer_addr: m.peer_addr,
            client_addr: m.client_addr,
            learner_only: m.learner_only,
            observer: m.observer,
            name: m.name,
            wait_caught_up: m.wait_caught_up,
            max_lag: m.max_lag,
        }
    }
}

/// The members as the leader sees them.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberList {
    /// 0 when no leader is known.
    pub leader_id: u64,
    pub members: Vec<Member>,
    /// A joint configuration is in effect or a change is running.
    pub change_in_progress: bool,
}

impl Client {
    /// Every member with its role, replication progress and last contact, as the leader sees
    /// them.
    pub async fn member_list(&self) -> Result<MemberList, Error> {
        let timeout = self.inner.request_timeout;
        let resp = self
            .admin(timeout, |ch, t| async move {
                ClusterClient::new(ch)
                    .member_list(with_timeout(MemberListRequest {}, t))
                    .await
            })
            .await?;
        Ok(MemberList {
            leader_id: resp.leader_id,
            members: resp.members,
            change_in_progress: resp.change_in_progress,
        })
    }

    /// Adds a member as a learner and, unless `learner_only` or `observer`, promotes it to
    /// voter once caught up. `timeout` bounds the whole change (catch-up included).
    pub async fn add_member(
        &self,
        member: NewMember,
        timeout: Duration,
    ) -> Result<Vec<Member>, Error> {
        let req = AddMemberRequest::from(member);
        let resp = self
            .admin(timeout, |ch, t| {
                let req = with_timeout(req.clone(), t);
                async move { ClusterClient::new(ch).add_member(req).await }
            })
            .await?;
        Ok(resp.members)
    }

    /// Promotes a learner to voter; refused while it lags more than `max_lag` entries (0: the
    /// server default) and for observers.
    pub async fn promote_member(
        &self,
        id: u64,
        max_lag: u64,
        timeout: Duration,
    ) -> Result<Vec<Member>, Error> {
        let resp = self
            .admin(timeout, |ch, t| async move {
                ClusterClient::new(ch)
                    .promote_member(with_timeout(PromoteMemberRequest { id, max_lag }, t))
                    .await
            })
            .await?;
        Ok(resp.members)
    }

    /// Removes a member; its id is never accepted again.
    pub async fn remove_member(&self, id: u64, timeout: Duration) -> Result<Vec<Member>, Error> {
        let resp = self
            .admin(timeout, |ch, t| async move {
                ClusterClient::new(ch)
                    .remove_member(with_timeout(RemoveMemberRequest { id }, t))
                    .await
            })
            .await?;
        Ok(resp.members)
    }

    /// Migration: adds `new` as a learner, waits until it caught up, then swaps it in for
    /// `old_id` in one joint-consensus change that also removes `old_id`.
    pub async fn replace_member(
        &self,
        old_id: u64,
        new: NewMember,
        timeout: Duration,
    ) -> Result<Vec<Member>, Error> {
        let req = ReplaceMemberRequest {
            old_id,
            new_member: Some(new.into()),
        };
        let resp = self
            .admin(timeout, |ch, t| {
                let req = with_timeout(req.clone(), t);
                async move { ClusterClient::new(ch).replace_member(req).await }
            })
            .await?;
        Ok(resp.members)
    }

    /// Makes voter `to` the leader; returns the leader afterwards.
    pub async fn transfer_leader(&self, to: u64, timeout: Duration) -> Result<u64, Error> {
        let resp = self
            .admin(timeout, |ch, t| async move {
                ClusterClient::new(ch)
                    .transfer_leader(with_timeout(TransferLeaderRequest { to_id: to }, t))
                    .await
            })
            .await?;
        Ok(resp.leader_id)
    }

    /// One admin call with its own deadline (longer than ordinary requests'), retried on
    /// other endpoints while the cluster is unavailable.
    async fn admin<T, F, Fut>(&self, timeout: Duration, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let inner = &self.inner;
        let started = Instant::now();
        let budget = inner.retry_budget.max(timeout);
        let mut backoff = BACKOFF_START;
        let mut retries: u32 = 0;
        loop {
            let (idx, endpoint) = inner.pick(true);
            let left = budget.saturating_sub(started.elapsed()).min(timeout);
            let result = tokio::time::timeout(
                left + Duration::from_secs(1),
                attempt(endpoint.channel.clone(), left),
            )
            .await;
            let err = match result {
                Ok(Ok(resp)) => return Ok(resp.into_inner()),
                Ok(Err(status)) => match Error::from_status(&status) {
                    Error::Unavailable(m) => Error::Unavailable(format!("{}: {m}", endpoint.addr)),
                    err => err,
                },
                Err(_) => Error::Timeout(format!(
                    "{}: no reply within {}",
                    endpoint.addr,
                    humantime::format_duration(left)
                )),
            };
            if !matches!(err, Error::Unavailable(_)) {
                return Err(err);
            }
            inner.note_failure(idx);
            let capped = inner.max_retries.is_some_and(|max| retries >= max);
            if capped || started.elapsed() + backoff >= budget {
                return Err(err);
            }
            tracing::debug!(endpoint = %endpoint.addr, error = %err, "retrying admin call");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            retries += 1;
        }
    }
}

fn with_timeout<T>(message: T, timeout: Duration) -> Request<T> {
    let mut req = Request::new(message);
    req.set_timeout(timeout);
    req
}
