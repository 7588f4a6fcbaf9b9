//! Leases: grant, revoke, time-to-live, list, and keeping one alive; sessions are opened here
//! too, since a session is a lease granted with `session = true`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kord_api::v1::lease_client::LeaseClient;
use kord_api::v1::{
    Consistency, LeaseGrantRequest, LeaseKeepAliveRequest, LeaseListRequest, LeaseRevokeRequest,
    LeaseTimeToLiveRequest,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::{Request, Response, Status};

use crate::client::Kind;
use crate::keepalive::{self, Flow, Observer};
use crate::ops::duration_ms;
use crate::{Client, Error, Session};

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    pub id: u64,
    /// The granted TTL (for a session: its negotiated timeout).
    pub ttl: Duration,
}

/// A lease's time to live, as the leader counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTtl {
    pub id: u64,
    pub granted: Duration,
    pub remaining: Duration,
    pub session: bool,
    /// Ephemeral nodes attached, sorted.
    pub nodes: Vec<String>,
}

/// One lease of [`Client::lease_list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: u64,
    pub granted_ttl: Duration,
    pub session: bool,
    pub node_count: u32,
}

/// The latest news from a [`KeepAlive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAliveStatus {
    /// The TTL the server reported with the last successful refresh (its full TTL).
    pub ttl: Duration,
    /// When that reply arrived.
    pub refreshed_at: Instant,
    /// Successful refreshes so far, the one made by [`Client::lease_keep_alive`] included.
    pub refreshes: u64,
    /// The server no longer knows the lease (revoked or expired). Final: refreshing stops.
    pub lost: bool,
}

impl KeepAliveStatus {
    /// Time left as of `now`, counting down from the last refresh; zero once lost.
    pub fn remaining_at(&self, now: Instant) -> Duration {
        if self.lost {
            return Duration::ZERO;
        }
        self.ttl
            .saturating_sub(now.saturating_duration_since(self.refreshed_at))
    }
}

/// Publishes refreshes; a lease is lost only when the server says it does not know it. While
/// no member answers, refreshing goes on: only the leader can tell whether the lease expired.
struct LeaseObserver {
    status: Arc<watch::Sender<KeepAliveStatus>>,
}

impl Observer for LeaseObserver {
    fn refreshed(&mut self, _sent: Instant, now: Instant, ttl: Duration) -> Flow {
        self.status.send_modify(|s| {
            s.ttl = ttl;
            s.refreshed_at = now;
            s.refreshes += 1;
        });
        Flow::Continue
    }

    fn not_found(&mut self, _now: Instant) {
        self.status.send_modify(|s| s.lost = true);
    }

    fn tick(&mut self, _now: Instant) -> Flow {
        Flow::Continue
    }

    fn deadline(&self) -> Option<Instant> {
        None
    }
}

/// Keeps a lease alive from a background task, refreshing it every third of its TTL over a
/// `KeepAlive` stream and moving to another member when one fails. Dropping the handle (or
/// [`KeepAlive::stop`]) stops refreshing; the lease then expires after its TTL.
#[derive(Debug)]
pub struct KeepAlive {
    id: u64,
    status: Arc<watch::Sender<KeepAliveStatus>>,
    task: JoinHandle<()>,
}

impl KeepAlive {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn status(&self) -> KeepAliveStatus {
        *self.status.borrow()
    }

    /// The TTL reported by the last refresh.
    pub fn ttl(&self) -> Duration {
        self.status().ttl
    }

    /// Time left now, counting down from the last refresh; zero once lost.
    pub fn remaining(&self) -> Duration {
        self.status().remaining_at(Instant::now())
    }

    pub fn is_lost(&self) -> bool {
        self.status().lost
    }

    /// Follows each refresh and the loss of the lease.
    pub fn watch(&self) -> watch::Receiver<KeepAliveStatus> {
        self.status.subscribe()
    }

    /// Resolves once the lease is lost.
    pub async fn lost(&self) {
        let mut rx = self.status.subscribe();
        // The sender lives as long as `self`, so this only returns once lost.
        let _ = rx.wait_for(|s| s.lost).await;
    }

    /// Stops refreshing (as dropping does).
    pub fn stop(self) {}
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    /// Grants a lease with a server-chosen id. TTLs outside the server's bounds are refused
    /// with [`Error::InvalidArgument`].
    pub async fn lease_grant(&self, ttl: Duration) -> Result<LeaseGrant, Error> {
        self.grant(0, ttl, false).await
    }

    /// Grants a lease with the given (nonzero) id.
    pub async fn lease_grant_with_id(&self, id: u64, ttl: Duration) -> Result<LeaseGrant, Error> {
        if id == 0 {
            return Err(Error::invalid("lease id must be nonzero"));
        }
        self.grant(id, ttl, false).await
    }

    /// Revokes a lease, deleting its ephemeral nodes; returns their paths.
    /// [`Error::LeaseNotFound`] if it does not exist.
    pub async fn lease_revoke(&self, id: u64) -> Result<Vec<String>, Error> {
        let req = LeaseRevokeRequest { write_id: None, id };
        let resp = self
            .write(
                req,
                |ch, r| async move { LeaseClient::new(ch).revoke(r).await },
            )
            .await
            .map_err(|e| e.for_lease(id))?;
        Ok(resp.deleted)
    }

    pub async fn lease_time_to_live(&self, id: u64) -> Result<LeaseTtl, Error> {
        let req = LeaseTimeToLiveRequest { id };
        let resp = self
            .read(Consistency::Linearizable, req, |ch, r| async move {
                LeaseClient::new(ch).time_to_live(r).await
            })
            .await
            .map_err(|e| e.for_lease(id))?;
        Ok(LeaseTtl {
            id: resp.id,
            granted: Duration::from_millis(resp.granted_ttl_ms),
            remaining: Duration::from_millis(resp.remaining_ms),
            session: resp.session,
            nodes: resp.nodes,
        })
    }

    /// Every lease and session, as the leader's applied state has them.
    pub async fn lease_list(&self) -> Result<Vec<LeaseInfo>, Error> {
        let resp = self
            .read(
                Consistency::Linearizable,
                LeaseListRequest {},
                |ch, r| async move { LeaseClient::new(ch).list(r).await },
            )
            .await?;
        Ok(resp
            .leases
            .into_iter()
            .map(|l| LeaseInfo {
                id: l.id,
                granted_ttl: Duration::from_millis(l.granted_ttl_ms),
                session: l.session,
                node_count: l.node_count,
            })
            .collect())
    }

    /// Refreshes a lease once; returns its TTL from now. [`Error::LeaseNotFound`] if it does
    /// not exist.
    pub async fn lease_keep_alive_once(&self, id: u64) -> Result<Duration, Error> {
        let resp = self
            .call(Kind::Read(Consistency::Linearizable), |ch| async move {
                let req = Request::new(tokio_stream::once(LeaseKeepAliveRequest { id }));
                let mut replies = LeaseClient::new(ch).keep_alive(req).await?.into_inner();
                match replies.message().await? {
                    Some(reply) => Ok(Response::new(reply)),
                    None => Err(Status::unavailable(
                        "keep-alive stream ended without a reply",
                    )),
                }
            })
            .await
            .map_err(|e| e.for_lease(id))?;
        Ok(Duration::from_millis(resp.ttl_ms))
    }

    /// Refreshes the lease once (failing with [`Error::LeaseNotFound`] if it does not exist),
    /// then keeps it alive in the background; see [`KeepAlive`].
    pub async fn lease_keep_alive(&self, id: u64) -> Result<KeepAlive, Error> {
        let sent = Instant::now();
        let ttl = self.lease_keep_alive_once(id).await?;
        let status = Arc::new(watch::Sender::new(KeepAliveStatus {
            ttl,
            refreshed_at: Instant::now(),
            refreshes: 1,
            lost: false,
        }));
        let observer = LeaseObserver {
            status: Arc::clone(&status),
        };
        let first_ping = sent + keepalive::ping_interval(ttl);
        let task = keepalive::spawn(Arc::clone(&self.inner), id, ttl, first_ping, observer);
        Ok(KeepAlive { id, status, task })
    }

    /// Opens a session with the requested timeout, which the server clamps into its bounds
    /// ([`Session::timeout`] has the result), and keeps it alive in the background.
    pub async fn session(&self, timeout: Duration) -> Result<Session, Error> {
        let grant = self.grant(0, timeout, true).await?;
        Ok(Session::start(
            self.clone(),
            grant.id,
            grant.ttl,
            Instant::now(),
        ))
    }

    async fn grant(&self, id: u64, ttl: Duration, session: bool) -> Result<LeaseGrant, Error> {
        let req = LeaseGrantRequest {
            write_id: None,
            ttl_ms: duration_ms(ttl),
            id,
            session,
        };
        let resp = self
            .write(
                req,
                |ch, r| async move { LeaseClient::new(ch).grant(r).await },
            )
            .await?;
        if resp.id == 0 || resp.ttl_ms == 0 {
            return Err(Error::protocol(format!(
                "server granted lease {} with ttl_ms {}",
                resp.id, resp.ttl_ms
            )));
        }
        Ok(LeaseGrant {
            id: resp.id,
            ttl: Duration::from_millis(resp.ttl_ms),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_counts_down_from_the_last_refresh() {
        let t0 = Instant::now();
        let mut status = KeepAliveStatus {
            ttl: Duration::from_secs(10),
            refreshed_at: t0,
            refreshes: 1,
            lost: false,
        };
        assert_eq!(status.remaining_at(t0), Duration::from_secs(10));
        assert_eq!(
            status.remaining_at(t0 + Duration::from_secs(4)),
            Duration::from_secs(6)
        );
        assert_eq!(
            status.remaining_at(t0 + Duration::from_secs(11)),
            Duration::ZERO
        );
        status.lost = true;
        assert_eq!(status.remaining_at(t0), Duration::ZERO);
    }

    #[test]
    fn lease_observer_counts_refreshes_and_loss() {
        let t0 = Instant::now();
        let status = Arc::new(watch::Sender::new(KeepAliveStatus {
            ttl: Duration::from_secs(3),
            refreshed_at: t0,
            refreshes: 1,
            lost: false,
        }));
        let mut obs = LeaseObserver {
            status: Arc::clone(&status),
        };
        assert_eq!(obs.deadline(), None);
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            obs.refreshed(t0, later, Duration::from_secs(3)),
            Flow::Continue
        );
        assert_eq!(status.borrow().refreshes, 2);
        assert_eq!(status.borrow().refreshed_at, later);
        obs.not_found(later);
        assert!(status.borrow().lost);
    }
}
