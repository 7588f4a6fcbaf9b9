//! Leader election on the server's `Election` service: candidates queue under
//! `/kord/elections/<name>` like lock claims; the first leads and its value is the election's.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use kord_api::v1::election_client::ElectionClient;
use kord_api::v1::{
    CampaignRequest, Consistency, LeaderRequest, LeaderResponse, ProclaimRequest, ResignRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Request;

pub use kord_api::v1::LeaderKey;

use crate::client::{Kind, BACKOFF_MAX, BACKOFF_START};
use crate::lock::blocking_claim;
use crate::{Client, Error, Session, SessionState};

/// The current leader and its value, or `None` when nobody leads.
pub type LeaderInfo = Option<(LeaderKey, Vec<u8>)>;

/// An election named `name`, campaigned in on behalf of a [`Session`].
#[derive(Debug)]
pub struct Election<'a> {
    session: &'a Session,
    name: String,
}

impl<'a> Election<'a> {
    /// `name` is one path component (no `/`).
    pub fn new(session: &'a Session, name: impl Into<String>) -> Self {
        Election {
            session,
            name: name.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queues as a candidate with `value` and waits until this session leads. Fails with
    /// [`Error::SessionExpired`] if the session ends first. Exactly-once across retries, as
    /// [`crate::Mutex::lock`].
    pub async fn campaign(&self, value: impl Into<Vec<u8>>) -> Result<Leadership, Error> {
        match self.campaign_inner(value.into(), None).await? {
            Some(l) => Ok(l),
            None => Err(Error::Timeout(format!(
                "election {} was not won in time",
                self.name
            ))),
        }
    }

    /// [`Election::campaign`], giving up after `timeout`: `Ok(None)` (the candidacy is then
    /// withdrawn).
    pub async fn campaign_timeout(
        &self,
        value: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Option<Leadership>, Error> {
        self.campaign_inner(value.into(), Some(timeout)).await
    }

    async fn campaign_inner(
        &self,
        value: Vec<u8>,
        wait: Option<Duration>,
    ) -> Result<Option<Leadership>, Error> {
        let req = CampaignRequest {
            name: self.name.clone(),
            lease_id: self.session.id(),
            value,
            timeout_ms: 0,
        };
        let resp = blocking_claim(
            self.session,
            req,
            wait,
            |r, ms| r.timeout_ms = ms,
            |ch, r| async move { ElectionClient::new(ch).campaign(r).await },
        )
        .await?;
        let Some(resp) = resp else {
            return Ok(None);
        };
        let leader = resp
            .leader
            .ok_or_else(|| Error::protocol("campaign reply without a leader key"))?;
        Ok(Some(Leadership::new(self.session, leader)))
    }
}

/// This session's leadership of an election.
///
/// Leadership is judged conservatively: it counts as lost the moment the session is
/// [`SessionState::Disconnected`] or [`SessionState::Expired`], because a leader that cannot
/// reach the cluster cannot know whether it still leads, and must stop acting as leader. Once
/// lost it stays lost (even if the session reconnects): campaign again.
#[derive(Debug)]
pub struct Leadership {
    client: Client,
    leader: LeaderKey,
    lost: watch::Receiver<bool>,
    state: watch::Receiver<SessionState>,
    monitor: tokio::task::JoinHandle<()>,
}

impl Leadership {
    fn new(session: &Session, leader: LeaderKey) -> Self {
        let (tx, lost) = watch::channel(false);
        let state = session.watch_state();
        let mut watched = state.clone();
        let monitor = tokio::spawn(async move {
            // A closed channel means the session was dropped: lost too.
            let _ = watched.wait_for(|s| is_lost_state(*s)).await;
            tx.send_replace(true);
        });
        Leadership {
            client: session.client().clone(),
            leader,
            lost,
            state,
            monitor,
        }
    }

    /// The leader's claim path, `/kord/elections/<name>/claim-NNNNNNNNNN`.
    pub fn key(&self) -> &str {
        &self.leader.key
    }

    /// Strictly increasing across successive leaders; a resource acting on the leader's
    /// behalf should reject lower tokens (see [`crate::FencingGuard`]).
    pub fn fencing_token(&self) -> u64 {
        self.leader.fencing_token
    }

    pub fn leader_key(&self) -> &LeaderKey {
        &self.leader
    }

    /// False once the session was disconnected or expired, or after resigning.
    pub fn is_leader(&self) -> bool {
        !*self.lost.borrow() && !is_lost_state(*self.state.borrow())
    }

    /// Resolves once leadership is lost (see the type's docs); at once if it already is.
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        let _ = lost.wait_for(|l| *l).await;
    }

    /// Replaces the election's value without a new election. Fails with a PERMISSION_DENIED
    /// [`Error::Other`] if this session no longer owns the claim, and with `NoNode` if the
    /// claim is gone.
    pub async fn proclaim(&self, value: impl Into<Vec<u8>>) -> Result<(), Error> {
        let req = ProclaimRequest {
            leader: Some(self.leader.clone()),
            value: value.into(),
        };
        self.client
            .call(Kind::Write, |ch| {
                let mut election = ElectionClient::new(ch);
                let req = self.client.inner.request(req.clone());
                async move { election.proclaim(req).await }
            })
            .await
            .map_err(|e| e.for_session(self.leader.lease_id))?;
        Ok(())
    }

    /// Steps down, letting the next candidate lead. Succeeds if the claim is already gone.
    pub async fn resign(self) -> Result<(), Error> {
        self.monitor.abort();
        let req = ResignRequest {
            leader: Some(self.leader.clone()),
        };
        let result = self
            .client
            .call(Kind::Write, |ch| {
                let mut election = ElectionClient::new(ch);
                let req = self.client.inner.request(req.clone());
                async move { election.resign(req).await }
            })
            .await;
        match result {
            Ok(_) | Err(Error::NoNode { .. }) => Ok(()),
            Err(err) => Err(err.for_session(self.leader.lease_id)),
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.monitor.abort();
    }
}

fn is_lost_state(state: SessionState) -> bool {
    matches!(state, SessionState::Disconnected | SessionState::Expired)
}

fn leader_info(resp: LeaderResponse) -> LeaderInfo {
    resp.leader.map(|l| (l, resp.value))
}

impl Client {
    /// The current leader of election `name` and its value (linearizable), or `None`.
    pub async fn leader(&self, name: &str) -> Result<LeaderInfo, Error> {
        let req = LeaderRequest {
            name: name.to_owned(),
        };
        let resp = self
            .read(Consistency::Linearizable, req, |ch, r| async move {
                ElectionClient::new(ch).leader(r).await
            })
            .await?;
        Ok(leader_info(resp))
    }

    /// The leader of election `name` now, then each change of leader or value. Survives
    /// member failures by re-opening the stream elsewhere; identical consecutive values are
    /// not repeated, so a reconnect yields nothing unless something changed meanwhile (changes
    /// while disconnected collapse into the latest). Ends after an error no retry can fix.
    pub fn observe(&self, name: &str) -> LeaderStream {
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(observe_task(self.clone(), name.to_owned(), tx));
        LeaderStream {
            rx: ReceiverStream::new(rx),
            task,
        }
    }
}

/// Leader changes from [`Client::observe`]. Dropping it ends the observation.
#[derive(Debug)]
pub struct LeaderStream {
    rx: ReceiverStream<Result<LeaderInfo, Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaderStream {
    /// The next change, or `None` once the stream has ended (after an error).
    pub async fn next(&mut self) -> Option<Result<LeaderInfo, Error>> {
        self.rx.next().await
    }
}

impl Stream for LeaderStream {
    type Item = Result<LeaderInfo, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.rx).poll_next(cx)
    }
}

impl Drop for LeaderStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Drops an item equal to the last one passed on.
#[derive(Debug, Default)]
pub(crate) struct Dedup {
    last: Option<LeaderInfo>,
}

impl Dedup {
    pub(crate) fn fresh(&mut self, item: &LeaderInfo) -> bool {
        if self.last.as_ref() == Some(item) {
            return false;
        }
        self.last = Some(item.clone());
        true
    }
}

async fn observe_task(client: Client, name: String, tx: mpsc::Sender<Result<LeaderInfo, Error>>) {
    let inner = Arc::clone(&client.inner);
    let mut dedup = Dedup::default();
    let mut backoff = BACKOFF_START;
    loop {
        let (idx, endpoint) = inner.pick(true);
        let mut election = ElectionClient::new(endpoint.channel.clone());
        // Only opening the stream is bounded; it then stays open as long as it lives.
        let open = election.observe(Request::new(LeaderRequest { name: name.clone() }));
        let err = match tokio::time::timeout(inner.request_timeout, open).await {
            Err(_) => Error::Unavailable(format!("{}: observe not answered", endpoint.addr)),
            Ok(Err(status)) => Error::from_status(&status),
            Ok(Ok(resp)) => {
                let mut stream = resp.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(msg)) => {
                            backoff = BACKOFF_START;
                            let item = leader_info(msg);
                            if dedup.fresh(&item) && tx.send(Ok(item)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => {
                            break Error::Unavailable(format!(
                                "{}: observe stream ended",
                                endpoint.addr
                            ))
                        }
                        Err(status) => break Error::from_status(&status),
                    }
                }
            }
        };
        if !matches!(err, Error::Unavailable(_) | Error::Timeout(_)) {
            let _ = tx.send(Err(err)).await;
            return;
        }
        tracing::debug!(endpoint = %endpoint.addr, error = %err, "re-opening observe");
        inner.note_failure(idx);
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str, token: u64) -> LeaderKey {
        LeaderKey {
            name: "e".into(),
            key: k.into(),
            lease_id: 1,
            fencing_token: token,
        }
    }

    #[test]
    fn dedup_drops_only_identical_consecutive_items() {
        let mut d = Dedup::default();
        assert!(d.fresh(&None));
        assert!(!d.fresh(&None));
        let a = Some((key("/a", 3), b"x".to_vec()));
        assert!(d.fresh(&a));
        assert!(!d.fresh(&a));
        let a2 = Some((key("/a", 3), b"y".to_vec()));
        assert!(d.fresh(&a2), "a new value of the same leader is a change");
        assert!(d.fresh(&None));
        assert!(d.fresh(&a));
    }

    #[test]
    fn leadership_is_lost_when_disconnected_or_expired() {
        assert!(!is_lost_state(SessionState::Connected));
        assert!(!is_lost_state(SessionState::Reconnected));
        assert!(is_lost_state(SessionState::Disconnected));
        assert!(is_lost_state(SessionState::Expired));
    }
}
