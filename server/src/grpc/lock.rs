//! The `Lock` and `Election` services: thin edges over [`crate::claims`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use kord_api::v1 as pb;
use kord_api::v1::election_server::Election;
use kord_api::v1::lock_server::Lock;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use super::{finish, header, EdgeError};
use crate::claims::{queue_path, Claim, Claims, Kind, PendingClaim};
use crate::metrics::Metrics;
use crate::raft::{NodeId, Raft};
use crate::state::path;

#[derive(Clone)]
pub struct LockService {
    pub id: NodeId,
    pub raft: Raft,
    pub claims: Claims,
    pub metrics: Arc<Metrics>,
}

/// No deadline for 0, and for a timeout too large to add to the clock (effectively forever).
fn deadline(timeout_ms: u64) -> Option<Instant> {
    (timeout_ms > 0)
        .then(|| Instant::now().checked_add(Duration::from_millis(timeout_ms)))
        .flatten()
}

impl LockService {
    /// Joins the queue and waits to be first; the claim is withdrawn if that fails.
    async fn acquire(
        &self,
        kind: Kind,
        name: &str,
        lease: u64,
        value: Vec<u8>,
        timeout_ms: u64,
    ) -> Result<Claim, EdgeError> {
        if lease == 0 {
            return Err(EdgeError::InvalidArgument(
                "lease_id must name a lease or session".into(),
            ));
        }
        // A claim withdrawn by an abandoned earlier attempt of the same lease: queue again.
        let mut retried = false;
        loop {
            let claim = self
                .claims
                .enqueue(kind, name, lease, value.clone())
                .await?;
            let pending = PendingClaim::new(&self.claims, claim);
            match self
                .claims
                .wait_first(pending.claim(), deadline(timeout_ms))
                .await
            {
                Ok(()) => return Ok(pending.keep()),
                Err(EdgeError::ClaimGone { .. }) if !retried => retried = true,
                Err(e) => return Err(e),
            }
        }
    }

    fn leader_key(name: &str, claim: &Claim) -> pb::LeaderKey {
        pb::LeaderKey {
            name: name.to_owned(),
            key: claim.key.clone(),
            lease_id: claim.lease,
            fencing_token: claim.token,
        }
    }

    /// The current leader of an election, from this member's applied state.
    fn leader_now(&self, name: &str) -> Result<pb::LeaderResponse, EdgeError> {
        let parent = queue_path(Kind::Election, name)?;
        let first = self.claims.first(&parent)?;
        let revision = self.claims.hub().published();
        Ok(match first {
            Some((key, stat, value)) => pb::LeaderResponse {
                header: Some(header(self.id, &self.raft, revision)),
                leader: Some(pb::LeaderKey {
                    name: name.to_owned(),
                    key,
                    lease_id: stat.ephemeral_owner,
                    fencing_token: stat.create_revision,
                }),
                value,
            },
            None => pb::LeaderResponse {
                header: Some(header(self.id, &self.raft, revision)),
                leader: None,
                value: Vec::new(),
            },
        })
    }
}

fn claim_of(leader: Option<pb::LeaderKey>) -> Result<pb::LeaderKey, EdgeError> {
    let leader = leader.ok_or_else(|| EdgeError::InvalidArgument("leader is not set".into()))?;
    path::validate(&leader.key)?;
    Ok(leader)
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<pb::LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lock for LockService {
    #[tracing::instrument(level = "debug", skip_all, fields(member = self.id, name = %req.get_ref().name, lease = req.get_ref().lease_id))]
    async fn lock(
        &self,
        req: Request<pb::LockRequest>,
    ) -> Result<Response<pb::LockResponse>, Status> {
        let r = req.into_inner();
        let result = self
            .acquire(Kind::Lock, &r.name, r.lease_id, Vec::new(), r.timeout_ms)
            .await
            .map(|claim| pb::LockResponse {
                header: Some(header(self.id, &self.raft, claim.token)),
                key: claim.key,
                fencing_token: claim.token,
            });
        finish(&self.metrics, "lock", result)
    }

    async fn unlock(
        &self,
        req: Request<pb::UnlockRequest>,
    ) -> Result<Response<pb::UnlockResponse>, Status> {
        let r = req.into_inner();
        let result = self
            .claims
            .withdraw(&r.key, r.lease_id)
            .await
            .map(|()| pb::UnlockResponse {
                header: Some(header(self.id, &self.raft, self.claims.hub().published())),
            });
        finish(&self.metrics, "unlock", result)
    }
}

#[tonic::async_trait]
impl Election for LockService {
    async fn campaign(
        &self,
        req: Request<pb::CampaignRequest>,
    ) -> Result<Response<pb::CampaignResponse>, Status> {
        let r = req.into_inner();
        let result = self
            .acquire(Kind::Election, &r.name, r.lease_id, r.value, r.timeout_ms)
            .await
            .map(|claim| pb::CampaignResponse {
                header: Some(header(self.id, &self.raft, claim.token)),
                leader: Some(Self::leader_key(&r.name, &claim)),
            });
        finish(&self.metrics, "campaign", result)
    }

    async fn proclaim(
        &self,
        req: Request<pb::ProclaimRequest>,
    ) -> Result<Response<pb::ProclaimResponse>, Status> {
        let r = req.into_inner();
        let result = async {
            let leader = claim_of(r.leader)?;
            self.claims
                .proclaim(&leader.key, leader.lease_id, r.value)
                .await?;
            Ok(pb::ProclaimResponse {
                header: Some(header(self.id, &self.raft, self.claims.hub().published())),
            })
        }
        .await;
        finish(&self.metrics, "proclaim", result)
    }

    async fn leader(
        &self,
        req: Request<pb::LeaderRequest>,
    ) -> Result<Response<pb::LeaderResponse>, Status> {
        let r = req.into_inner();
        let result = async {
            self.claims.proposer().read_barrier().await?;
            self.leader_now(&r.name)
        }
        .await;
        finish(&self.metrics, "leader", result)
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        req: Request<pb::LeaderRequest>,
    ) -> Result<Response<ObserveStream>, Status> {
        let name = req.into_inner().name;
        let parent = queue_path(Kind::Election, &name).map_err(Status::from)?;
        let service = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last: Option<(Option<pb::LeaderKey>, Vec<u8>)> = None;
            if let Err(e) = service.claims.proposer().read_barrier().await {
                let _ = tx.send(Err(Status::from(EdgeError::from(e)))).await;
                return;
            }
            let prefix = format!("{parent}/");
            loop {
                // Subscribed before looking, so no change after the look is missed.
                let mut live = service.claims.hub().subscribe();
                let now = match service.leader_now(&name) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let current = (now.leader.clone(), now.value.clone());
                if last.as_ref() != Some(&current) {
                    last = Some(current);
                    if tx.send(Ok(now)).await.is_err() {
                        return;
                    }
                }
                loop {
                    match live.recv().await {
                        Ok(rev) if rev.events.iter().any(|e| e.path.starts_with(&prefix)) => break,
                        Ok(_) => {}
                        Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => return,
                    }
                    if tx.is_closed() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn resign(
        &self,
        req: Request<pb::ResignRequest>,
    ) -> Result<Response<pb::ResignResponse>, Status> {
        let r = req.into_inner();
        let result = async {
            let leader = claim_of(r.leader)?;
            self.claims.withdraw(&leader.key, leader.lease_id).await?;
            Ok(pb::ResignResponse {
                header: Some(header(self.id, &self.raft, self.claims.hub().published())),
            })
        }
        .await;
        finish(&self.metrics, "resign", result)
    }
}
