//! ZooKeeper-style sessions: a lease granted with `session = true`, kept alive in the background
//! by pings on a `KeepAlive` stream that moves to another member when one fails, with a local
//! view of whether the session is still alive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::keepalive::{self, Flow, Observer};
use crate::{Client, Error};

/// A session's health as this client sees it. Published by [`Session::watch_state`].
///
/// All times are measured locally from the send time of the last successful ping (or from the
/// grant's reply), which is no later than when the server refreshed the session, so the client
/// declares the session expired no later than the server expires it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// Pings are succeeding.
    Connected,
    /// No ping has succeeded for two thirds of the timeout (two ping intervals), but the
    /// timeout has not run out: the server may still hold the session, and the client keeps
    /// trying every member. Ephemeral nodes may or may not still exist.
    Disconnected,
    /// A ping succeeded again after `Disconnected`: the session survived. This lasts until the
    /// next successful ping, which makes it `Connected` again (or until it is `Disconnected`
    /// again), so a watcher sees every recovery.
    Reconnected,
    /// The session is over and its ephemeral nodes are deleted (or soon will be): the server
    /// said it does not know it, no ping succeeded for the whole timeout, or it was closed or
    /// dropped. Final: the client never opens a new session by itself.
    Expired,
}

impl SessionState {
    /// `Connected` or `Reconnected`.
    pub fn is_connected(self) -> bool {
        matches!(self, SessionState::Connected | SessionState::Reconnected)
    }

    pub fn is_expired(self) -> bool {
        self == SessionState::Expired
    }
}

/// The session state machine, driven by ping outcomes and the clock. Pure: every input carries
/// its timestamp.
#[derive(Debug, Clone)]
pub(crate) struct SessionTracker {
    timeout: Duration,
    disconnect_after: Duration,
    /// Send time of the last successful ping (or when the session was granted).
    last_ok: Instant,
    state: SessionState,
}

impl SessionTracker {
    /// A session granted with `timeout`, alive as of `granted_at`.
    pub(crate) fn new(timeout: Duration, granted_at: Instant) -> Self {
        SessionTracker {
            timeout,
            disconnect_after: timeout * 2 / 3,
            last_ok: granted_at,
            state: SessionState::Connected,
        }
    }

    pub(crate) fn state(&self) -> SessionState {
        self.state
    }

    /// A ping sent at `sent` succeeded; its reply arrived at `now`. A reply after the timeout
    /// has run out (locally) does not revive the session.
    pub(crate) fn ping_ok(&mut self, sent: Instant, now: Instant) -> SessionState {
        if self.tick(now) == SessionState::Expired {
            return self.state;
        }
        self.last_ok = self.last_ok.max(sent);
        self.state = match self.state {
            SessionState::Disconnected => SessionState::Reconnected,
            _ => SessionState::Connected,
        };
        // A reply that took most of the timeout may leave the session disconnected already.
        self.tick(now)
    }

    /// The server does not know the session.
    pub(crate) fn not_found(&mut self) -> SessionState {
        self.state = SessionState::Expired;
        self.state
    }

    /// Time has passed without a successful ping.
    pub(crate) fn tick(&mut self, now: Instant) -> SessionState {
        if self.state == SessionState::Expired {
            return self.state;
        }
        let quiet = now.saturating_duration_since(self.last_ok);
        if quiet >= self.timeout {
            self.state = SessionState::Expired;
        } else if quiet >= self.disconnect_after {
            self.state = SessionState::Disconnected;
        }
        self.state
    }

    /// When the state changes next if no ping succeeds.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self.state {
            SessionState::Connected | SessionState::Reconnected => {
                Some(self.last_ok + self.disconnect_after)
            }
            SessionState::Disconnected => Some(self.last_ok + self.timeout),
            SessionState::Expired => None,
        }
    }
}

/// Feeds the pinger's outcomes to the tracker and publishes the state.
struct SessionObserver {
    tracker: SessionTracker,
    state: Arc<watch::Sender<SessionState>>,
}

impl SessionObserver {
    fn publish(&mut self, state: SessionState) -> Flow {
        let mut final_state = state;
        self.state.send_if_modified(|current| {
            if current.is_expired() {
                // Expired elsewhere (closed, or a create found the session gone): stay so.
                final_state = SessionState::Expired;
                return false;
            }
            let changed = *current != state;
            *current = state;
            changed
        });
        if final_state.is_expired() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }
}

impl Observer for SessionObserver {
    fn refreshed(&mut self, sent: Instant, now: Instant, _ttl: Duration) -> Flow {
        let state = self.tracker.ping_ok(sent, now);
        self.publish(state)
    }

    fn not_found(&mut self, _now: Instant) {
        let state = self.tracker.not_found();
        self.publish(state);
    }

    fn tick(&mut self, now: Instant) -> Flow {
        let state = self.tracker.tick(now);
        self.publish(state)
    }

    fn deadline(&self) -> Option<Instant> {
        self.tracker.deadline()
    }
}

/// A ZooKeeper-style session: a lease that a background task keeps alive by pinging every
/// third of the negotiated timeout, moving to another member when one fails, so the session
/// outlives the loss of the member it was talking to as long as another answers in time.
///
/// Ephemeral nodes created with [`Client::create_ephemeral`] live as long as the session.
/// Once [`SessionState::Expired`] the session stays expired and pinging stops; a new session
/// must be opened explicitly with [`Client::session`].
///
/// [`Session::close`] revokes the session, deleting its ephemeral nodes at once. Dropping a
/// `Session` only stops pinging: the server expires it (and deletes its ephemeral nodes) once
/// the timeout passes. Either way the local state becomes `Expired`.
#[derive(Debug)]
pub struct Session {
    id: u64,
    timeout: Duration,
    client: Client,
    state: Arc<watch::Sender<SessionState>>,
    task: JoinHandle<()>,
}

impl Session {
    /// Starts keeping session `id` alive; it was granted with `timeout`, as of `granted_at`.
    pub(crate) fn start(client: Client, id: u64, timeout: Duration, granted_at: Instant) -> Self {
        let tracker = SessionTracker::new(timeout, granted_at);
        let state = Arc::new(watch::Sender::new(tracker.state()));
        let observer = SessionObserver {
            tracker,
            state: Arc::clone(&state),
        };
        let first_ping = granted_at + keepalive::ping_interval(timeout);
        let task = keepalive::spawn(Arc::clone(&client.inner), id, timeout, first_ping, observer);
        Session {
            id,
            timeout,
            client,
            state,
            task,
        }
    }

    /// The session's lease id: the `ephemeral_owner` of its nodes.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The client the session was opened with.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The timeout the server granted (the requested one clamped into the server's bounds).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn state(&self) -> SessionState {
        *self.state.borrow()
    }

    pub fn is_expired(&self) -> bool {
        self.state().is_expired()
    }

    /// Follows the state as it changes. The last value is `Expired`.
    pub fn watch_state(&self) -> watch::Receiver<SessionState> {
        self.state.subscribe()
    }

    /// Resolves once the session is expired.
    pub async fn expired(&self) {
        let mut rx = self.state.subscribe();
        // The sender lives as long as `self`, so this only returns once expired.
        let _ = rx.wait_for(|s| s.is_expired()).await;
    }

    /// Stops pinging and revokes the session, deleting its ephemeral nodes; returns their paths.
    /// Fails with [`Error::SessionExpired`] if the server no longer knew it. If the server
    /// cannot be reached, the session still ends: the server expires it after the timeout.
    pub async fn close(self) -> Result<Vec<String>, Error> {
        self.mark_expired();
        self.client
            .lease_revoke(self.id)
            .await
            .map_err(|e| e.for_session(self.id))
    }

    /// Stops pinging and publishes `Expired`.
    pub(crate) fn mark_expired(&self) {
        self.task.abort();
        self.state.send_if_modified(|current| {
            let changed = !current.is_expired();
            *current = SessionState::Expired;
            changed
        });
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.mark_expired();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(9);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn stays_connected_while_pings_succeed() {
        let t0 = Instant::now();
        let mut s = SessionTracker::new(TIMEOUT, t0);
        assert_eq!(s.state(), SessionState::Connected);
        assert_eq!(s.deadline(), Some(t0 + ms(6000)));
        for i in 1..10 {
            let sent = t0 + ms(3000 * i);
            assert_eq!(s.tick(sent), SessionState::Connected);
            assert_eq!(s.ping_ok(sent, sent + ms(5)), SessionState::Connected);
            assert_eq!(s.deadline(), Some(sent + ms(6000)));
        }
    }

    #[test]
    fn disconnects_after_two_thirds_then_reconnects_then_connects() {
        let t0 = Instant::now();
        let mut s = SessionTracker::new(TIMEOUT, t0);
        assert_eq!(s.tick(t0 + ms(5999)), SessionState::Connected);
        assert_eq!(s.tick(t0 + ms(6000)), SessionState::Disconnected);
        assert_eq!(s.deadline(), Some(t0 + TIMEOUT));
        assert_eq!(s.tick(t0 + ms(8000)), SessionState::Disconnected);
        // A ping sent while disconnected succeeds within the timeout.
        assert_eq!(
            s.ping_ok(t0 + ms(8000), t0 + ms(8100)),
            SessionState::Reconnected
        );
        assert_eq!(s.deadline(), Some(t0 + ms(14000)));
        assert_eq!(s.tick(t0 + ms(11000)), SessionState::Reconnected);
        assert_eq!(
            s.ping_ok(t0 + ms(11000), t0 + ms(11010)),
            SessionState::Connected
        );
    }

    #[test]
    fn failed_pings_alone_do_not_disconnect() {
        // Disconnection is decided by time only: ticks before 2/3 of the timeout keep it.
        let t0 = Instant::now();
        let mut s = SessionTracker::new(TIMEOUT, t0);
        assert_eq!(s.tick(t0 + ms(3000)), SessionState::Connected);
        assert_eq!(s.tick(t0 + ms(3020)), SessionState::Connected);
        assert_eq!(
            s.ping_ok(t0 + ms(3060), t0 + ms(3100)),
            SessionState::Connected
        );
    }

    #[test]
    fn expires_after_the_timeout_and_stays_expired() {
        let t0 = Instant::now();
        let mut s = SessionTracker::new(TIMEOUT, t0);
        assert_eq!(s.tick(t0 + ms(7000)), SessionState::Disconnected);
        assert_eq!(s.tick(t0 + ms(8999)), SessionState::Disconnected);
        assert_eq!(s.tick(t0 + TIMEOUT), SessionState::Expired);
        assert_eq!(s.deadline(), None);
        // A late success does not bring it back.
        assert_eq!(
            s.ping_ok(t0 + ms(9500), t0 + ms(9600)),
            SessionState::Expired
        );
        assert_eq!(s.tick(t0 + ms(20000)), SessionState::Expired);
    }

    #[test]
    fn a_reply_arriving_after_the_timeout_does_not_revive() {
        // The ping went out in time but its reply came after the local timeout: the session
        // may have expired on the server in between, so it counts as expired.
        let t0 = Instant::now();
        let mut s = SessionTracker::new(TIMEOUT, t0);
        assert_eq!(
            s.ping_ok(t0 + ms(8000), t0 + ms(9001)),
            SessionState::Expired
        );
    }

    #[test]
    fn skipped_ticks_still_expire() {
        // Even if no tick came at the disconnect deadline, a late one sees the whole gap.
        let t0 = Instant::now();
        let mut s = SessionTracker::new(TIMEOUT, t0);
        assert_eq!(s.tick(t0 + ms(12000)), SessionState::Expired);
    }

    #[test]
    fn not_found_expires_at_once_from_any_state() {
        let t0 = Instant::now();
        let mut s = SessionTracker::new(TIMEOUT, t0);
        assert_eq!(s.not_found(), SessionState::Expired);
        assert_eq!(s.ping_ok(t0 + ms(1), t0 + ms(2)), SessionState::Expired);

        let mut s = SessionTracker::new(TIMEOUT, t0);
        s.tick(t0 + ms(7000));
        assert_eq!(s.state(), SessionState::Disconnected);
        assert_eq!(s.not_found(), SessionState::Expired);
    }

    #[test]
    fn the_last_ok_never_moves_back() {
        // An out-of-order success (sent earlier than the last one) must not shorten the session.
        let t0 = Instant::now();
        let mut s = SessionTracker::new(TIMEOUT, t0);
        s.ping_ok(t0 + ms(3000), t0 + ms(3001));
        s.ping_ok(t0 + ms(1000), t0 + ms(3002));
        assert_eq!(s.deadline(), Some(t0 + ms(9000)));
    }

    #[test]
    fn observer_publishes_changes_and_respects_external_expiry() {
        let t0 = Instant::now();
        let state = Arc::new(watch::Sender::new(SessionState::Connected));
        let mut rx = state.subscribe();
        let mut obs = SessionObserver {
            tracker: SessionTracker::new(TIMEOUT, t0),
            state: Arc::clone(&state),
        };
        assert_eq!(obs.tick(t0 + ms(1000)), Flow::Continue);
        assert!(!rx.has_changed().unwrap());
        assert_eq!(obs.tick(t0 + ms(6500)), Flow::Continue);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), SessionState::Disconnected);
        assert_eq!(
            obs.refreshed(t0 + ms(7000), t0 + ms(7001), TIMEOUT),
            Flow::Continue
        );
        assert_eq!(*rx.borrow_and_update(), SessionState::Reconnected);

        // Closed from outside: the observer stops and never un-expires it.
        state.send_replace(SessionState::Expired);
        assert_eq!(
            obs.refreshed(t0 + ms(8000), t0 + ms(8001), TIMEOUT),
            Flow::Stop
        );
        assert_eq!(*state.borrow(), SessionState::Expired);

        let state = Arc::new(watch::Sender::new(SessionState::Connected));
        let mut obs = SessionObserver {
            tracker: SessionTracker::new(TIMEOUT, t0),
            state: Arc::clone(&state),
        };
        assert_eq!(obs.tick(t0 + TIMEOUT), Flow::Stop);
        assert_eq!(*state.borrow(), SessionState::Expired);
    }
}
