//! Breaks split votes that openraft 0.9 does not break by itself.
//!
//! A member draws its election timeout once, when it starts, and checks it on its heartbeat
//! tick. Two members started together whose timeouts fall within the same tick campaign at
//! the same instant after every failed round, each voting for itself, for as long as both live
//! (seen in `e2e/tests/locks.rs`: the two survivors of a killed leader, 20 s with no leader,
//! campaigning every 1.96 s within 2 ms of each other). A voter that has seen no leader for
//! two maximal election timeouts therefore campaigns once more, after a random delay of its
//! own, which puts the two out of step.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use super::{NodeId, Raft};

/// How often the watch looks at Raft's metrics.
const CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// Runs until `stop` changes. `election_timeout` is the minimum election timeout (the maximum
/// is twice it, as configured in `server.rs`).
pub async fn run(
    raft: Raft,
    id: NodeId,
    election_timeout: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let stuck_after = election_timeout * 4;
    let mut checks = tokio::time::interval(CHECK_INTERVAL);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leaderless_since: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = checks.tick() => {}
            _ = stop.changed() => return,
        }
        let (has_leader, voter) = {
            let m = raft.metrics().borrow().clone();
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == id);
            (m.current_leader.is_some(), voter)
        };
        if has_leader || !voter {
            leaderless_since = None;
            continue;
        }
        let since = *leaderless_since.get_or_insert_with(Instant::now);
        if since.elapsed() < stuck_after {
            continue;
        }
        // A delay of up to one election timeout, different on every member and every round.
        let delay = election_timeout.mul_f64(random_fraction());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
        if raft.metrics().borrow().current_leader.is_none() {
            tracing::warn!(
                leaderless_for = ?since.elapsed(),
                "no leader elected; campaigning out of step with the other candidates"
            );
            if raft.trigger().elect().await.is_err() {
                return;
            }
        }
        leaderless_since = None;
    }
}

/// A number in [0, 1) from the process's random hash keys and the clock.
fn random_fraction() -> f64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_fractions_are_in_range_and_differ() {
        let draws: Vec<f64> = (0..100).map(|_| random_fraction()).collect();
        assert!(draws.iter().all(|f| (0.0..1.0).contains(f)));
        let mut distinct = draws.clone();
        distinct.sort_by(f64::total_cmp);
        distinct.dedup();
        assert!(distinct.len() > 90, "{} distinct of 100", distinct.len());
    }
}
