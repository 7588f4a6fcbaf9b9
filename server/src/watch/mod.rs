//! Watches: the last step of the data flow. Each watch is a task that delivers, in revision
//! order and each revision whole, the events matching its filter: first from the stored
//! history (when it starts in the past or falls behind), then live from the [`hub`]. It
//! tracks the next revision it owes, so switching between the two never skips or repeats one.

pub mod hub;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;

use crate::state::{path, Event, EventKind};
use crate::storage::events::EventLog;
use hub::WatchHub;

/// Revisions read from storage per step while catching up.
const CATCH_UP_CHUNK: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Node,
    Children,
    Subtree,
}

/// What a watch selects, and how.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    pub id: i64,
    pub path: String,
    pub scope: Scope,
    /// Bit per [`EventKind`]; 0 means every kind.
    pub kinds: u8,
    /// First revision to deliver; 0 means the next one.
    pub start_revision: u64,
    pub one_shot: bool,
    pub prev_value: bool,
}

pub fn kind_bit(kind: EventKind) -> u8 {
    1 << (kind as u8)
}

impl WatchSpec {
    pub fn matches(&self, event: &Event) -> bool {
        if self.kinds != 0 && self.kinds & kind_bit(event.kind) == 0 {
            return false;
        }
        let p = event.path.as_str();
        match self.scope {
            Scope::Node => p == self.path,
            Scope::Children => {
                (p == self.path && event.kind == EventKind::ChildrenChanged)
                    || (p != "/" && path::parent(p) == self.path)
            }
            Scope::Subtree => path::is_at_or_below(p, &self.path),
        }
    }
}

/// What a watch task hands to its stream.
#[derive(Debug)]
pub enum Delivery {
    Created {
        revision: u64,
    },
    Events {
        revision: u64,
        events: Vec<Event>,
    },
    Progress {
        revision: u64,
    },
    Canceled {
        reason: String,
        compact_revision: u64,
    },
}

/// Whether a delivery went into the stream's buffer.
pub enum Sent {
    Ok,
    /// The buffer stayed full for the grace period, or the stream is gone.
    Blocked,
}

/// How long a stream's buffer may stay full before its watch is canceled as too slow. While
/// it waits, the watch falls behind the live broadcast and later catches up from storage, so
/// a brief stall costs nothing.
pub const SLOW_CONSUMER_GRACE: Duration = Duration::from_secs(2);

/// The stream side of a watch: bounded, shared by the watches of one stream.
pub trait Outbox: Send + Sync + 'static {
    /// Waits up to [`SLOW_CONSUMER_GRACE`] for room in the buffer.
    fn try_deliver(
        &self,
        watch_id: i64,
        d: Delivery,
    ) -> impl std::future::Future<Output = Sent> + Send;
    /// Waits for room; used for the final cancel of a slow watch.
    fn deliver(&self, watch_id: i64, d: Delivery) -> impl std::future::Future<Output = ()> + Send;
}

pub struct WatchContext {
    pub hub: WatchHub,
    pub log: EventLog,
    /// Idle watches get a progress notification this often.
    pub progress_interval: Duration,
}

/// Runs one watch until it is one-shot done, canceled, or its stream goes away.
/// `progress` ticks when the client asks for progress notifications.
pub async fn run<O: Outbox>(
    spec: WatchSpec,
    ctx: Arc<WatchContext>,
    out: Arc<O>,
    mut progress: tokio::sync::watch::Receiver<u64>,
) {
    let mut live = ctx.hub.subscribe();
    let mut next = if spec.start_revision == 0 {
        ctx.hub.published() + 1
    } else {
        spec.start_revision
    };
    if let Sent::Blocked = out
        .try_deliver(spec.id, Delivery::Created { revision: next - 1 })
        .await
    {
        return;
    }
    let mut w = Watcher {
        spec,
        out,
        next: &mut next,
    };
    'catch_up: loop {
        // From storage, until it has everything published so far.
        loop {
            let upto = ctx.hub.published();
            if *w.next > upto {
                break;
            }
            let chunk = match ctx.log.read(*w.next, upto, CATCH_UP_CHUNK) {
                Ok(c) => c,
                Err(e) => {
                    w.cancel(format!("reading the event history failed: {e}"), 0)
                        .await;
                    return;
                }
            };
            if *w.next <= chunk.compacted {
                let reason = format!(
                    "compacted: revision {} is gone; the oldest kept is {}",
                    *w.next,
                    chunk.compacted + 1
                );
                w.cancel(reason, chunk.compacted).await;
                return;
            }
            let full = chunk.revisions.len() == CATCH_UP_CHUNK;
            let mut last = None;
            for (revision, events) in &chunk.revisions {
                match w.offer(*revision, events).await {
                    Flow::Continue => last = Some(*revision),
                    Flow::Stop => return,
                }
            }
            *w.next = match (full, last) {
                (true, Some(r)) => r + 1,
                _ => upto + 1,
            };
        }
        // Live, until the broadcast leaves this watch behind. The idle timer is not reset per
        // event (a timer-wheel update for every watch on every revision); a tick that finds a
        // recent event skips the progress notification instead.
        let mut idle = tokio::time::interval(ctx.progress_interval);
        idle.reset();
        let mut last_event = tokio::time::Instant::now();
        loop {
            tokio::select! {
                received = live.recv() => match received {
                    Ok(rev) => {
                        if rev.revision < *w.next {
                            continue;
                        }
                        if let Flow::Stop = w.offer(rev.revision, &rev.events).await {
                            return;
                        }
                        *w.next = rev.revision + 1;
                        last_event = tokio::time::Instant::now();
                    }
                    Err(RecvError::Lagged(_)) => continue 'catch_up,
                    Err(RecvError::Closed) => return,
                },
                changed = progress.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if let Flow::Stop = w.progress(&ctx.hub, &mut live).await {
                        return;
                    }
                }
                _ = idle.tick() => {
                    if last_event.elapsed() < ctx.progress_interval {
                        continue;
                    }
                    if let Flow::Stop = w.progress(&ctx.hub, &mut live).await {
                        return;
                    }
                }
            }
        }
    }
}

enum Flow {
    Continue,
    Stop,
}

struct Watcher<'a, O: Outbox> {
    spec: WatchSpec,
    out: Arc<O>,
    next: &'a mut u64,
}

impl<O: Outbox> Watcher<'_, O> {
    /// Delivers a revision's matching events, if any.
    async fn offer(&mut self, revision: u64, events: &[Event]) -> Flow {
        let matching: Vec<Event> = events
            .iter()
            .filter(|e| self.spec.matches(e))
            .map(|e| {
                let mut e = e.clone();
                if !self.spec.prev_value {
                    e.prev = None;
                }
                e
            })
            .collect();
        if matching.is_empty() {
            return Flow::Continue;
        }
        let d = Delivery::Events {
            revision,
            events: matching,
        };
        match self.out.try_deliver(self.spec.id, d).await {
            Sent::Ok if self.spec.one_shot => Flow::Stop,
            Sent::Ok => Flow::Continue,
            Sent::Blocked => {
                let reason = format!(
                    "slow consumer: the stream's buffer is full; resume from revision {revision}"
                );
                self.cancel(reason, 0).await;
                Flow::Stop
            }
        }
    }

    /// Every revision up to the one published before draining the live buffer is delivered.
    async fn progress(
        &mut self,
        hub: &WatchHub,
        live: &mut tokio::sync::broadcast::Receiver<Arc<hub::RevisionEvents>>,
    ) -> Flow {
        let published = hub.published();
        loop {
            match live.try_recv() {
                Ok(rev) => {
                    if rev.revision < *self.next {
                        continue;
                    }
                    if let Flow::Stop = self.offer(rev.revision, &rev.events).await {
                        return Flow::Stop;
                    }
                    *self.next = rev.revision + 1;
                }
                // Behind: no progress claim now; the catch-up will come first.
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                    return Flow::Continue
                }
                Err(_) => break,
            }
        }
        let revision = published.max(*self.next - 1);
        *self.next = revision + 1;
        match self
            .out
            .try_deliver(self.spec.id, Delivery::Progress { revision })
            .await
        {
            Sent::Ok => Flow::Continue,
            Sent::Blocked => {
                self.cancel("slow consumer: the stream's buffer is full".into(), 0)
                    .await;
                Flow::Stop
            }
        }
    }

    async fn cancel(&mut self, reason: String, compact_revision: u64) {
        self.out
            .deliver(
                self.spec.id,
                Delivery::Canceled {
                    reason,
                    compact_revision,
                },
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Stat;

    fn ev(kind: EventKind, path: &str) -> Event {
        Event {
            kind,
            path: path.into(),
            stat: Stat::default(),
            data: Vec::new(),
            prev: None,
        }
    }

    fn spec(path: &str, scope: Scope, kinds: u8) -> WatchSpec {
        WatchSpec {
            id: 1,
            path: path.into(),
            scope,
            kinds,
            start_revision: 0,
            one_shot: false,
            prev_value: false,
        }
    }

    #[test]
    fn scopes_select_the_right_paths() {
        let node = spec("/a", Scope::Node, 0);
        assert!(node.matches(&ev(EventKind::DataChanged, "/a")));
        assert!(!node.matches(&ev(EventKind::DataChanged, "/a/b")));
        let children = spec("/a", Scope::Children, 0);
        assert!(children.matches(&ev(EventKind::ChildrenChanged, "/a")));
        assert!(children.matches(&ev(EventKind::Created, "/a/b")));
        assert!(!children.matches(&ev(EventKind::DataChanged, "/a")));
        assert!(!children.matches(&ev(EventKind::Created, "/a/b/c")));
        let subtree = spec("/a", Scope::Subtree, 0);
        assert!(subtree.matches(&ev(EventKind::Created, "/a/b/c")));
        assert!(subtree.matches(&ev(EventKind::Deleted, "/a")));
        assert!(!subtree.matches(&ev(EventKind::Created, "/ab")));
        assert!(spec("/", Scope::Subtree, 0).matches(&ev(EventKind::Created, "/x/y")));
        assert!(spec("/", Scope::Children, 0).matches(&ev(EventKind::Created, "/x")));
    }

    #[test]
    fn kinds_filter() {
        let w = spec("/a", Scope::Node, kind_bit(EventKind::Deleted));
        assert!(w.matches(&ev(EventKind::Deleted, "/a")));
        assert!(!w.matches(&ev(EventKind::DataChanged, "/a")));
    }
}
