//! Takes a snapshot once the log since the last one outgrows `--snapshot-log-bytes`.
//!
//! openraft triggers snapshots by entry count (`--snapshot-count`), but a Kord entry carries a
//! batch of commands: under load an entry holds tens of commands, so the count alone would let
//! the log grow to gigabytes between snapshots. The byte bound keeps the log's disk use (and a
//! restart's or a lagging follower's replay) in proportion to the flag whatever the batch size.

use std::time::Duration;

use super::Raft;
use crate::storage::log_store::LogStore;

/// How often the log's size is looked at.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Runs until `stop` changes or the Raft core is gone.
pub async fn run(
    raft: Raft,
    log: LogStore,
    limit_bytes: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut checks = tokio::time::interval(CHECK_INTERVAL);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The snapshot a trigger was last sent behind, so a slow build is reported once.
    let mut triggered_behind = None;
    loop {
        tokio::select! {
            _ = checks.tick() => {}
            _ = stop.changed() => return,
        }
        let snapshot = raft.metrics().borrow().snapshot.map(|id| id.index);
        let bytes = log.bytes_after(snapshot);
        if bytes < limit_bytes {
            continue;
        }
        if triggered_behind != Some(snapshot) {
            triggered_behind = Some(snapshot);
            tracing::info!(
                log_bytes = bytes,
                limit_bytes,
                "the log since the last snapshot outgrew --snapshot-log-bytes; taking a snapshot"
            );
        }
        // A no-op while a snapshot is being built; the next check tries again.
        if raft.trigger().snapshot().await.is_err() {
            return;
        }
    }
}
