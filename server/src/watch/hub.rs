//! Where applied events enter the watch system. The state machine publishes each applied
//! batch's events here after the batch is in RocksDB; watchers subscribe. The broadcast
//! buffer is bounded: a watcher that falls behind it catches up from the stored history
//! instead of losing events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::state::Event;

/// The events of one revision.
#[derive(Debug)]
pub struct RevisionEvents {
    pub revision: u64,
    pub events: Vec<Event>,
}

/// Revisions held for live watchers before the slowest must catch up from storage.
pub const LIVE_BUFFER_REVISIONS: usize = 4096;

#[derive(Clone)]
pub struct WatchHub {
    tx: broadcast::Sender<Arc<RevisionEvents>>,
    /// Every revision up to this one is in storage and was sent to subscribers.
    published: Arc<AtomicU64>,
}

impl WatchHub {
    pub fn new(published: u64) -> Self {
        let (tx, _) = broadcast::channel(LIVE_BUFFER_REVISIONS);
        WatchHub {
            tx,
            published: Arc::new(AtomicU64::new(published)),
        }
    }

    /// Called by apply after the batch is durable in RocksDB's write path. Sends first, then
    /// advances `published`: a reader that sees `published = R` finds every revision up to R
    /// either in storage or in its subscription.
    pub fn publish(&self, revisions: Vec<RevisionEvents>, applied: u64) {
        for r in revisions {
            // No subscribers is fine: the history is in storage.
            let _ = self.tx.send(Arc::new(r));
        }
        self.published.fetch_max(applied, Ordering::Release);
    }

    /// After a snapshot install the history restarts at the snapshot's index.
    pub fn reset(&self, applied: u64) {
        self.published.store(applied, Ordering::Release);
    }

    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<RevisionEvents>> {
        self.tx.subscribe()
    }
}
