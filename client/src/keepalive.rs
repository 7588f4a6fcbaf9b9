//! The background task that keeps one lease alive over a `Lease.KeepAlive` stream, shared by
//! [`crate::KeepAlive`] (plain leases) and [`crate::Session`]. What the outcomes mean (a lost
//! lease, a session's state) is left to an [`Observer`], so the task itself holds no policy
//! and the policies are pure and testable.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kord_api::v1::lease_client::LeaseClient;
use kord_api::v1::{LeaseKeepAliveRequest, LeaseKeepAliveResponse};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Streaming};

use crate::client::{EndpointConn, Inner};
use crate::Error;

/// Refreshes go out this many times per TTL.
const PINGS_PER_TTL: u32 = 3;
const MIN_INTERVAL: Duration = Duration::from_millis(10);
const MIN_REPLY_TIMEOUT: Duration = Duration::from_millis(50);
const BACKOFF_START: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(500);

/// Whether the task goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    Stop,
}

/// Interprets the task's outcomes. Every call gets the current time, so implementations stay
/// pure.
pub(crate) trait Observer: Send + 'static {
    /// A refresh sent at `sent` was answered at `now` with `ttl` left.
    fn refreshed(&mut self, sent: Instant, now: Instant, ttl: Duration) -> Flow;
    /// The server no longer knows the lease. The task stops after this.
    fn not_found(&mut self, now: Instant);
    /// Called at (or after) [`Observer::deadline`] while nothing else happens.
    fn tick(&mut self, now: Instant) -> Flow;
    /// When `tick` must next be called, if ever.
    fn deadline(&self) -> Option<Instant>;
}

/// How often to refresh a lease of this TTL: a third of it, so two refreshes in a row can be
/// lost before it runs out.
pub(crate) fn ping_interval(ttl: Duration) -> Duration {
    (ttl / PINGS_PER_TTL).max(MIN_INTERVAL)
}

/// How long to wait for one refresh's reply before trying another member: no longer than the
/// refresh interval, so a hung member costs at most one interval.
pub(crate) fn reply_timeout(interval: Duration, request_timeout: Duration) -> Duration {
    interval.min(request_timeout).max(MIN_REPLY_TIMEOUT)
}

/// Pause before the next attempt after `failures` failures in a row (1 = the first).
pub(crate) fn retry_backoff(failures: u32, interval: Duration) -> Duration {
    let doubled = BACKOFF_START.saturating_mul(1 << failures.saturating_sub(1).min(16));
    doubled.min(BACKOFF_MAX).min(interval)
}

/// Starts the task; the first refresh goes out at `first_ping`. It runs until the observer
/// says stop or the returned handle is aborted.
pub(crate) fn spawn<O: Observer>(
    inner: Arc<Inner>,
    id: u64,
    ttl: Duration,
    first_ping: Instant,
    observer: O,
) -> tokio::task::JoinHandle<()> {
    let interval = ping_interval(ttl);
    let pinger = Pinger {
        reply_timeout: reply_timeout(interval, inner.request_timeout),
        inner,
        id,
        interval,
        conn: None,
    };
    tokio::spawn(pinger.run(first_ping, observer))
}

/// One open stream, to `endpoint` (at `idx` in the list it was picked from).
struct Conn {
    idx: usize,
    endpoint: EndpointConn,
    tx: mpsc::Sender<LeaseKeepAliveRequest>,
    rx: Streaming<LeaseKeepAliveResponse>,
}

struct Pinger {
    inner: Arc<Inner>,
    id: u64,
    interval: Duration,
    reply_timeout: Duration,
    conn: Option<Conn>,
}

enum PingError {
    NotFound,
    Failed(Error),
}

impl Pinger {
    async fn run<O: Observer>(mut self, first_ping: Instant, mut observer: O) {
        let mut next = first_ping;
        let mut failures: u32 = 0;
        loop {
            let wait = tokio::time::sleep_until(next.into());
            if watch_over(&mut observer, wait).await.is_none() {
                return;
            }
            let sent = Instant::now();
            let Some(outcome) = watch_over(&mut observer, self.ping()).await else {
                return;
            };
            let now = Instant::now();
            match outcome {
                Ok(ttl) => {
                    failures = 0;
                    if observer.refreshed(sent, now, ttl) == Flow::Stop {
                        return;
                    }
                    next = sent + self.interval;
                }
                Err(PingError::NotFound) => {
                    tracing::debug!(lease = self.id, "keep-alive: lease not found");
                    observer.not_found(now);
                    return;
                }
                Err(PingError::Failed(err)) => {
                    failures = failures.saturating_add(1);
                    tracing::debug!(lease = self.id, error = %err, "keep-alive failed; retrying");
                    next = now + retry_backoff(failures, self.interval);
                }
            }
        }
    }

    /// One refresh over the open stream, opening one first if needed. Any failure closes the
    /// stream and makes the client prefer another member next time.
    async fn ping(&mut self) -> Result<Duration, PingError> {
        let (idx, endpoint) = match &self.conn {
            Some(conn) => (conn.idx, conn.endpoint.clone()),
            None => self.inner.pick(true),
        };
        let result = tokio::time::timeout(self.reply_timeout, self.exchange(idx, &endpoint)).await;
        let err = match result {
            Ok(Ok(resp)) => return Ok(Duration::from_millis(resp.ttl_ms)),
            Ok(Err(err)) => err,
            Err(_) => Error::Timeout(format!(
                "{}: no keep-alive reply within {}",
                endpoint.addr,
                humantime::format_duration(self.reply_timeout)
            )),
        };
        self.conn = None;
        if err.code() == Code::NotFound {
            return Err(PingError::NotFound);
        }
        self.inner.note_failure(idx);
        Err(PingError::Failed(err))
    }

    async fn exchange(
        &mut self,
        idx: usize,
        endpoint: &EndpointConn,
    ) -> Result<LeaseKeepAliveResponse, Error> {
        let req = LeaseKeepAliveRequest { id: self.id };
        let addr = &*endpoint.addr;
        if let Some(conn) = &self.conn {
            conn.tx
                .send(req)
                .await
                .map_err(|_| Error::Unavailable(format!("{addr}: keep-alive stream closed")))?;
        } else {
            let (tx, rx) = mpsc::channel(4);
            // Queued before the call, so the request stream never starts empty.
            let _ = tx.try_send(req);
            let mut lease = LeaseClient::new(endpoint.channel.clone());
            let rx = lease
                .keep_alive(Request::new(ReceiverStream::new(rx)))
                .await
                .map_err(|s| with_addr(addr, Error::from_status(&s)))?
                .into_inner();
            self.conn = Some(Conn {
                idx,
                endpoint: endpoint.clone(),
                tx,
                rx,
            });
        }
        let Some(conn) = &mut self.conn else {
            return Err(Error::protocol("keep-alive stream vanished"));
        };
        match conn.rx.message().await {
            Ok(Some(resp)) => Ok(resp),
            Ok(None) => Err(Error::Unavailable(format!(
                "{addr}: keep-alive stream ended"
            ))),
            Err(status) => Err(with_addr(addr, Error::from_status(&status))),
        }
    }
}

fn with_addr(addr: &str, err: Error) -> Error {
    match err {
        Error::Unavailable(m) => Error::Unavailable(format!("{addr}: {m}")),
        Error::Timeout(m) => Error::Timeout(format!("{addr}: {m}")),
        err => err,
    }
}

/// Runs `fut` while giving the observer its ticks. `None` when the observer stopped first.
async fn watch_over<O: Observer, F: Future>(observer: &mut O, fut: F) -> Option<F::Output> {
    tokio::pin!(fut);
    loop {
        let deadline = observer.deadline();
        tokio::select! {
            biased;
            out = &mut fut => return Some(out),
            () = sleep_until(deadline) => {
                if observer.tick(Instant::now()) == Flow::Stop {
                    return None;
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_three_times_per_ttl() {
        assert_eq!(
            ping_interval(Duration::from_secs(9)),
            Duration::from_secs(3)
        );
        assert_eq!(ping_interval(Duration::ZERO), MIN_INTERVAL);
    }

    #[test]
    fn reply_timeout_is_bounded_by_the_interval() {
        let interval = Duration::from_secs(3);
        assert_eq!(
            reply_timeout(interval, Duration::from_secs(5)),
            Duration::from_secs(3)
        );
        assert_eq!(
            reply_timeout(interval, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        assert_eq!(
            reply_timeout(Duration::from_millis(1), Duration::from_secs(1)),
            MIN_REPLY_TIMEOUT
        );
    }

    #[test]
    fn backoff_grows_and_stays_within_the_interval() {
        let interval = Duration::from_secs(3);
        assert_eq!(retry_backoff(1, interval), Duration::from_millis(20));
        assert_eq!(retry_backoff(2, interval), Duration::from_millis(40));
        assert_eq!(retry_backoff(100, interval), BACKOFF_MAX);
        let short = Duration::from_millis(30);
        assert_eq!(retry_backoff(5, short), short);
    }
}
