//! Numbers this client's writes for the server's exactly-once deduplication and tracks which
//! replies are still outstanding, so `acked_below` lets the server forget the rest.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

use kord_api::v1::WriteId;

/// Hands out `seq`s and remembers which are in flight.
///
/// The counter lives under the same lock as the in-flight set: if it were a separate atomic, a
/// seq could be taken but not yet inserted while another thread computes `acked_below`, which
/// would then tell the server to forget a write that has not even been sent.
#[derive(Debug)]
pub(crate) struct WriteTracker {
    client_id: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    next_seq: u64,
    in_flight: BTreeSet<u64>,
}

impl WriteTracker {
    pub(crate) fn new(client_id: u64) -> Self {
        WriteTracker {
            client_id,
            state: Mutex::new(State {
                next_seq: 1,
                in_flight: BTreeSet::new(),
            }),
        }
    }

    pub(crate) fn client_id(&self) -> u64 {
        self.client_id
    }

    /// Starts a write; its seq stays in flight until the returned guard is dropped (also when
    /// the caller's future is cancelled, after which nobody will retry it).
    pub(crate) fn begin(&self) -> PendingWrite<'_> {
        let mut state = self.lock();
        let seq = state.next_seq;
        state.next_seq += 1;
        state.in_flight.insert(seq);
        PendingWrite { tracker: self, seq }
    }

    /// Every seq below this has had its reply received (or been abandoned).
    pub(crate) fn acked_below(&self) -> u64 {
        let state = self.lock();
        state.in_flight.first().copied().unwrap_or(state.next_seq)
    }

    /// A panic while holding the lock cannot leave the set inconsistent (every mutation is a
    /// single insert/remove), so a poisoned lock is still safe to use.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One write in flight. Every attempt of the write sends [`PendingWrite::write_id`], which keeps
/// `client_id` and `seq` fixed so the server can recognise retries.
#[derive(Debug)]
pub(crate) struct PendingWrite<'a> {
    tracker: &'a WriteTracker,
    seq: u64,
}

impl PendingWrite<'_> {
    /// `acked_below` is read fresh on each attempt: it can only have grown since the last one and
    /// never passes this write's own seq, so retries stay recognisable while the server gets to
    /// forget older replies sooner.
    pub(crate) fn write_id(&self) -> WriteId {
        WriteId {
            client_id: self.tracker.client_id,
            seq: self.seq,
            acked_below: self.tracker.acked_below(),
        }
    }
}

impl Drop for PendingWrite<'_> {
    fn drop(&mut self) {
        self.tracker.lock().in_flight.remove(&self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_below_is_next_seq_when_idle() {
        let t = WriteTracker::new(7);
        assert_eq!(t.acked_below(), 1);
        drop(t.begin());
        drop(t.begin());
        assert_eq!(t.acked_below(), 3);
    }

    #[test]
    fn acked_below_is_smallest_in_flight() {
        let t = WriteTracker::new(7);
        let a = t.begin();
        let b = t.begin();
        let c = t.begin();
        assert_eq!(a.write_id().seq, 1);
        assert_eq!(c.write_id().seq, 3);
        assert_eq!(t.acked_below(), 1);
        drop(b);
        assert_eq!(t.acked_below(), 1);
        drop(a);
        assert_eq!(t.acked_below(), 3);
        assert_eq!(c.write_id().acked_below, 3);
        drop(c);
        assert_eq!(t.acked_below(), 4);
    }

    #[test]
    fn retries_reuse_client_id_and_seq() {
        let t = WriteTracker::new(42);
        let w = t.begin();
        let first = w.write_id();
        let second = w.write_id();
        assert_eq!(first, second);
        assert_eq!(first.client_id, 42);
        assert!(first.acked_below <= first.seq);
    }
}
