//! Watches: the last step of the data flow. Each watch delivers, in revision order and each
//! revision whole, the events matching its filter. One task per stream ([`stream::serve`])
//! delivers live revisions from the [`hub`] to all of the stream's watches in one pass; a
//! watch that starts in the past, or whose stream fell behind the hub's buffer, first catches
//! up from the stored history in a task of its own (`catch_up`) and is then handed back.
//! Every watch tracks the next revision it owes, so switching between the two never skips or
//! repeats one.

pub mod hub;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::mpsc;

use crate::state::{path, Event, EventKind};
use crate::storage::events::EventLog;
use hub::{RevisionEvents, WatchHub};

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

    /// The events of `rev` this watch delivers, or `None` if none matches. Shares `rev`
    /// instead of copying events: every watch a revision reaches points at the same events.
    fn select(&self, rev: &Arc<RevisionEvents>) -> Option<Selected> {
        let matching = rev.events.iter().filter(|e| self.matches(e)).count();
        let indexes = match matching {
            0 => return None,
            n if n == rev.events.len() => None,
            _ => Some(
                (0..rev.events.len())
                    .filter(|&i| self.matches(&rev.events[i]))
                    .collect(),
            ),
        };
        Some(Selected {
            source: Arc::clone(rev),
            indexes,
            prev_value: self.prev_value,
        })
    }
}

/// The events of one revision that one watch delivers.
#[derive(Debug)]
pub struct Selected {
    pub source: Arc<RevisionEvents>,
    /// Indexes into `source.events`, in order; `None`: all of them.
    pub indexes: Option<Vec<usize>>,
    /// Whether the events carry the node as it was before the change.
    pub prev_value: bool,
}

impl Selected {
    pub fn revision(&self) -> u64 {
        self.source.revision
    }

    /// The selected events with their indexes in the revision.
    pub fn events(&self) -> impl Iterator<Item = (usize, &Event)> {
        let (all, picked) = match &self.indexes {
            None => (0..self.source.events.len(), [].iter()),
            Some(p) => (0..0, p.iter()),
        };
        all.chain(picked.copied())
            .map(|i| (i, &self.source.events[i]))
    }
}

/// What a watch hands to its stream.
#[derive(Debug)]
pub enum Delivery {
    Created {
        revision: u64,
    },
    Events(Selected),
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

/// How long a stream's buffer may stay full before its watches are canceled as too slow.
/// While it waits, the stream falls behind the live broadcast and later catches up from
/// storage, so a brief stall costs nothing.
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
    /// Watches running on this member (a metric).
    pub running: Gauge,
}

/// Why a watch left its stream's care.
enum Ended {
    /// One-shot fired, canceled (and told so), or its stream is gone.
    Done,
    /// Caught up to everything published: live from `next` on.
    CaughtUp { next: u64 },
}

/// What a catch-up task reports to its stream's task when it ends.
pub(crate) struct Handback {
    pub id: i64,
    /// Tells this catch-up apart from an earlier watch that used the same id.
    pub generation: u64,
    pub spec: WatchSpec,
    /// `Some(next)`: caught up, deliver live from `next`; `None`: the watch has ended.
    pub next: Option<u64>,
}

/// Delivers a watch's history from storage, from `next` up to what the hub has published,
/// then hands the watch back to its stream's task (see [`stream::serve`]).
pub(crate) async fn catch_up<O: Outbox>(
    spec: WatchSpec,
    generation: u64,
    next: u64,
    ctx: Arc<WatchContext>,
    out: Arc<O>,
    handback: mpsc::UnboundedSender<Handback>,
) {
    let id = spec.id;
    let mut next = next;
    let ended = read_history(&spec, &mut next, &ctx, out.as_ref()).await;
    let next = match ended {
        Ended::CaughtUp { next } => Some(next),
        Ended::Done => None,
    };
    let _ = handback.send(Handback {
        id,
        generation,
        spec,
        next,
    });
}

/// Delivers stored revisions from `*next` until everything published is delivered.
async fn read_history<O: Outbox>(
    spec: &WatchSpec,
    next: &mut u64,
    ctx: &WatchContext,
    out: &O,
) -> Ended {
    loop {
        let upto = ctx.hub.published();
        if *next > upto {
            return Ended::CaughtUp { next: *next };
        }
        let chunk = match ctx.log.read(*next, upto, CATCH_UP_CHUNK).await {
            Ok(c) => c,
            Err(e) => {
                cancel(
                    out,
                    spec.id,
                    format!("reading the event history failed: {e}"),
                    0,
                )
                .await;
                return Ended::Done;
            }
        };
        if *next <= chunk.compacted {
            let reason = format!(
                "compacted: revision {} is gone; the oldest kept is {}",
                *next,
                chunk.compacted + 1
            );
            cancel(out, spec.id, reason, chunk.compacted).await;
            return Ended::Done;
        }
        let full = chunk.revisions.len() == CATCH_UP_CHUNK;
        let mut last = None;
        for (revision, events) in chunk.revisions {
            let rev = Arc::new(RevisionEvents { revision, events });
            match offer(spec, out, &rev).await {
                Offered::Nothing | Offered::Sent => last = Some(revision),
                Offered::Fired | Offered::Blocked => return Ended::Done,
            }
        }
        *next = match (full, last) {
            (true, Some(r)) => r + 1,
            _ => upto + 1,
        };
    }
}

/// What became of one revision offered to a watch.
#[derive(Debug, PartialEq, Eq)]
enum Offered {
    /// No event of the revision matches.
    Nothing,
    Sent,
    /// Sent, and the watch was one-shot: it is done.
    Fired,
    /// The stream's buffer stayed full: the watch was canceled as a slow consumer.
    Blocked,
}

/// Delivers a revision's matching events, if any.
async fn offer<O: Outbox>(spec: &WatchSpec, out: &O, rev: &Arc<RevisionEvents>) -> Offered {
    let Some(selected) = spec.select(rev) else {
        return Offered::Nothing;
    };
    match out.try_deliver(spec.id, Delivery::Events(selected)).await {
        Sent::Ok if spec.one_shot => Offered::Fired,
        Sent::Ok => Offered::Sent,
        Sent::Blocked => {
            cancel(out, spec.id, slow_consumer(rev.revision), 0).await;
            Offered::Blocked
        }
    }
}

fn slow_consumer(revision: u64) -> String {
    format!("slow consumer: the stream's buffer is full; resume from revision {revision}")
}

async fn cancel<O: Outbox>(out: &O, id: i64, reason: String, compact_revision: u64) {
    out.deliver(
        id,
        Delivery::Canceled {
            reason,
            compact_revision,
        },
    )
    .await;
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
