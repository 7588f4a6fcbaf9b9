//! Distributed locks on the server's `Lock` service: a claim is an ephemeral sequential node
//! under `/kord/locks/<name>` owned by a [`Session`], so a crashed holder's lock goes with its
//! session. Also the blocking-claim call shared with [`crate::Election`].
//!
//! # Fencing tokens
//!
//! A lock only excludes other holders as long as the holder's session lives, and a holder can
//! be paused (GC, swap, a partition) past its session's expiry without noticing. So every
//! acquisition carries a *fencing token*, strictly increasing across successive holders of the
//! same lock. Pass it with every write to the resource the lock guards; the resource must
//! remember the highest token it has accepted and **reject any request carrying a lower one**
//! (equal is the same holder). See [`FencingGuard`] for that check.

use std::future::Future;
use std::time::Duration;

use kord_api::transport::Channel;
use kord_api::v1::lock_client::LockClient;
use kord_api::v1::{LockRequest, UnlockRequest};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::client::{Kind, BACKOFF_MAX, BACKOFF_START};
use crate::ops::duration_ms;
use crate::{Client, Error, Session};

/// A lock named `name`, held on behalf of a [`Session`]. Locks are FIFO: waiters acquire in
/// the order they asked.
#[derive(Debug)]
pub struct Mutex<'a> {
    session: &'a Session,
    name: String,
}

impl<'a> Mutex<'a> {
    /// `name` is one path component (no `/`).
    pub fn new(session: &'a Session, name: impl Into<String>) -> Self {
        Mutex {
            session,
            name: name.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits as long as it takes to hold the lock. Fails with [`Error::SessionExpired`] if the
    /// session ends first. Retried on another member when one is unavailable; a retry keeps the
    /// queue place the first attempt took, since the server keeps at most one claim per session
    /// and lock and a retried Lock finds it. (So this is not exclusive *within* a session: a
    /// second `lock` of the same name on the same session returns the same claim.)
    pub async fn lock(&self) -> Result<MutexGuard, Error> {
        match self.acquire(None).await? {
            Some(guard) => Ok(guard),
            None => Err(Error::Timeout(format!(
                "lock {} was not acquired in time",
                self.name
            ))),
        }
    }

    /// Waits at most `timeout` for the lock: `Ok(None)` if it was not acquired in time (the
    /// claim is then withdrawn from the queue).
    pub async fn try_lock(&self, timeout: Duration) -> Result<Option<MutexGuard>, Error> {
        self.acquire(Some(timeout)).await
    }

    async fn acquire(&self, wait: Option<Duration>) -> Result<Option<MutexGuard>, Error> {
        let req = LockRequest {
            name: self.name.clone(),
            lease_id: self.session.id(),
            timeout_ms: 0,
        };
        let resp = blocking_claim(
            self.session,
            req,
            wait,
            |r, ms| r.timeout_ms = ms,
            |ch, r| async move { LockClient::new(ch).lock(r).await },
        )
        .await?;
        Ok(resp.map(|resp| MutexGuard {
            client: self.session.client().clone(),
            key: resp.key,
            fencing_token: resp.fencing_token,
            lease_id: self.session.id(),
            released: false,
        }))
    }
}

/// A held lock. [`MutexGuard::unlock`] releases it. Dropping the guard without unlocking
/// spawns an unlock in the background (when inside a Tokio runtime): that is best effort only;
/// the backstop is the session, whose expiry or close deletes the claim.
#[derive(Debug)]
#[must_use = "dropping the guard releases the lock"]
pub struct MutexGuard {
    client: Client,
    key: String,
    fencing_token: u64,
    lease_id: u64,
    released: bool,
}

impl MutexGuard {
    /// The claim's path, `/kord/locks/<name>/claim-NNNNNNNNNN`.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Strictly increasing across successive holders of this lock; see the module docs for how
    /// a guarded resource must check it.
    pub fn fencing_token(&self) -> u64 {
        self.fencing_token
    }

    /// Releases the lock. Succeeds if the claim is already gone (e.g. the session expired, in
    /// which case the lock was lost earlier).
    pub async fn unlock(mut self) -> Result<(), Error> {
        self.released = true;
        unlock(&self.client, &self.key, self.lease_id).await
    }
}

impl Drop for MutexGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let client = self.client.clone();
        let key = std::mem::take(&mut self.key);
        let lease = self.lease_id;
        runtime.spawn(async move {
            if let Err(err) = unlock(&client, &key, lease).await {
                tracing::debug!(%key, error = %err, "unlock of a dropped guard failed");
            }
        });
    }
}

/// Deletes a claim owned by `lease`. A claim already gone counts as released.
pub(crate) async fn unlock(client: &Client, key: &str, lease: u64) -> Result<(), Error> {
    let req = UnlockRequest {
        key: key.to_owned(),
        lease_id: lease,
    };
    let result = client
        .call(Kind::Write, |ch| {
            let mut lock = LockClient::new(ch);
            let req = client.inner.request(req.clone());
            async move { lock.unlock(req).await }
        })
        .await;
    match result {
        Ok(_) | Err(Error::NoNode { .. }) => Ok(()),
        Err(err) => Err(err.for_session(lease)),
    }
}

/// Tracks the highest fencing token a guarded resource has accepted, and rejects requests
/// from older holders: a holder whose session expired while it was paused still believes it
/// holds the lock, but its token is lower than its successor's.
///
/// Keep one per guarded resource, durably if the resource is durable, and check (and record)
/// the token atomically with the write it guards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FencingGuard {
    highest: u64,
}

impl FencingGuard {
    pub fn new() -> Self {
        FencingGuard::default()
    }

    /// The highest token accepted so far (0 if none).
    pub fn highest(&self) -> u64 {
        self.highest
    }

    /// Accepts `token` (recording it) if it is at least the highest seen; rejects a lower one.
    pub fn check(&mut self, token: u64) -> bool {
        if token < self.highest {
            return false;
        }
        self.highest = token;
        true
    }
}

/// Sends a claim request (Lock, Campaign) that blocks on the server until the claim is first
/// in its queue. Unlike ordinary calls it has no per-attempt deadline beyond `wait`: the
/// connection's HTTP/2 keep-alive notices a dead member. UNAVAILABLE and unanswered attempts
/// are retried on another member until the session expires; the server keeps one claim per
/// lease and queue, so a retry finds the claim an earlier attempt made instead of queueing
/// twice. Returns `None` if `wait` passed first (the server then withdrew the claim).
pub(crate) async fn blocking_claim<Req, T, F, Fut>(
    session: &Session,
    req: Req,
    wait: Option<Duration>,
    set_timeout_ms: fn(&mut Req, u64),
    mut send: F,
) -> Result<Option<T>, Error>
where
    Req: Clone,
    F: FnMut(Channel, Request<Req>) -> Fut,
    Fut: Future<Output = Result<Response<T>, Status>>,
{
    let id = session.id();
    if session.is_expired() {
        return Err(Error::session_expired(id));
    }
    let client = session.client();
    let inner = &client.inner;
    let deadline = wait.map(|w| Instant::now() + w);
    let mut backoff = BACKOFF_START;
    loop {
        let (idx, endpoint) = inner.pick(true);
        let mut attempt = req.clone();
        // With a deadline, the server answers DEADLINE_EXCEEDED at it; the local limit only
        // catches a member that never answers. Past the deadline (after a retry) the attempt
        // still goes out with 1 ms, which settles a claim a lost attempt may have left.
        let local_limit = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            set_timeout_ms(&mut attempt, duration_ms(left).max(1));
            left + inner.request_timeout
        });
        let mut request = Request::new(attempt);
        if let Some(limit) = local_limit {
            request.set_timeout(limit);
        }
        let call = send(endpoint.channel.clone(), request);
        let bounded = async {
            match local_limit {
                Some(limit) => match tokio::time::timeout(limit, call).await {
                    Ok(r) => r.map_err(|s| Error::from_status(&s)),
                    Err(_) => Err(Error::Unavailable(format!(
                        "{}: no reply within {}",
                        endpoint.addr,
                        humantime::format_duration(limit)
                    ))),
                },
                None => call.await.map_err(|s| Error::from_status(&s)),
            }
        };
        let outcome = tokio::select! {
            () = session.expired() => return Err(Error::session_expired(id)),
            r = bounded => r,
        };
        let err = match outcome {
            Ok(resp) => return Ok(Some(resp.into_inner())),
            Err(err) => err,
        };
        match err.for_session(id) {
            Error::Timeout(_) if deadline.is_some() => return Ok(None),
            Error::SessionExpired { .. } => {
                session.mark_expired();
                return Err(Error::session_expired(id));
            }
            Error::Unavailable(msg) => {
                tracing::debug!(endpoint = %endpoint.addr, error = %msg, "retrying claim");
                inner.note_failure(idx);
            }
            err => return Err(err),
        }
        tokio::select! {
            () = session.expired() => return Err(Error::session_expired(id)),
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fencing_guard_rejects_lower_tokens_only() {
        let mut g = FencingGuard::new();
        assert!(g.check(5));
        assert!(g.check(5), "the same holder may write again");
        assert!(g.check(9));
        assert!(!g.check(7), "an older holder is fenced off");
        assert_eq!(g.highest(), 9);
        assert!(g.check(10));
    }
}
