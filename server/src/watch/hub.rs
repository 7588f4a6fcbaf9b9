//! Where applied events enter the watch system. The state machine publishes each applied
//! batch's events here after the batch is in RocksDB; watchers subscribe. The broadcast
//! buffer is bounded: a watcher that falls behind it catches up from the stored history
//! instead of losing events. Lock and election waiters instead register for one path's
//! deletion, so a release wakes exactly the one waiter behind it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, oneshot};

use crate::state::{Event, EventKind};

/// Why a deletion waiter woke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// The path was deleted.
    Deleted,
    /// A snapshot replaced the state (its deletions have no events): look again.
    Reset,
}

/// Waiters by the path whose deletion they wait for.
type DeletionWaiters = HashMap<String, Vec<oneshot::Sender<Woken>>>;

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
    deletions: Arc<Mutex<DeletionWaiters>>,
}

impl WatchHub {
    pub fn new(published: u64) -> Self {
        let (tx, _) = broadcast::channel(LIVE_BUFFER_REVISIONS);
        WatchHub {
            tx,
            published: Arc::new(AtomicU64::new(published)),
            deletions: Arc::default(),
        }
    }

    /// Called by apply after the batch is durable in RocksDB's write path. Sends first, then
    /// advances `published`: a reader that sees `published = R` finds every revision up to R
    /// either in storage or in its subscription.
    pub fn publish(&self, revisions: Vec<RevisionEvents>, applied: u64) {
        {
            let mut waiters = self.deletions.lock().expect("deletion waiters poisoned");
            if !waiters.is_empty() {
                let deleted = revisions
                    .iter()
                    .flat_map(|r| &r.events)
                    .filter(|e| e.kind == EventKind::Deleted);
                for e in deleted {
                    for w in waiters.remove(&e.path).into_iter().flatten() {
                        let _ = w.send(Woken::Deleted);
                    }
                }
            }
        }
        for r in revisions {
            // No subscribers is fine: the history is in storage.
            let _ = self.tx.send(Arc::new(r));
        }
        self.published.fetch_max(applied, Ordering::Release);
    }

    /// After a snapshot install the history restarts at the snapshot's index.
    pub fn reset(&self, applied: u64) {
        self.published.store(applied, Ordering::Release);
        let waiters =
            std::mem::take(&mut *self.deletions.lock().expect("deletion waiters poisoned"));
        for w in waiters.into_values().flatten() {
            let _ = w.send(Woken::Reset);
        }
    }

    /// Resolves once `path` is deleted on this member (or a snapshot replaced the state).
    /// Register before looking at the state: a deletion applied after the look is then never
    /// missed, since apply changes the state before it publishes.
    pub fn on_delete(&self, path: &str) -> DeletionWait {
        let (tx, rx) = oneshot::channel();
        let mut waiters = self.deletions.lock().expect("deletion waiters poisoned");
        waiters.entry(path.to_owned()).or_default().push(tx);
        DeletionWait {
            rx,
            path: path.to_owned(),
            deletions: self.deletions.clone(),
        }
    }

    pub fn published(&self) -> u64 {
        self.published.load(Ordering::Acquire)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<RevisionEvents>> {
        self.tx.subscribe()
    }
}

/// One registration of [`WatchHub::on_delete`]; await [`DeletionWait::woken`]. Dropping it
/// (the waiter looked again, gave up or was canceled) removes its entry.
pub struct DeletionWait {
    rx: oneshot::Receiver<Woken>,
    path: String,
    deletions: Arc<Mutex<DeletionWaiters>>,
}

impl DeletionWait {
    /// Why the wait ended; `Reset` also if the hub is gone.
    pub async fn woken(&mut self) -> Woken {
        (&mut self.rx).await.unwrap_or(Woken::Reset)
    }
}

impl Drop for DeletionWait {
    fn drop(&mut self) {
        self.rx.close();
        let mut waiters = self.deletions.lock().expect("deletion waiters poisoned");
        if let Some(list) = waiters.get_mut(&self.path) {
            list.retain(|w| !w.is_closed());
            if list.is_empty() {
                waiters.remove(&self.path);
            }
        }
    }
}
