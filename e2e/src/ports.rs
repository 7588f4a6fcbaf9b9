//! Picks free loopback ports for the members of a test cluster.
//!
//! Ports come from below the kernel's ephemeral range, handed out in turn from a random start,
//! each checked free by binding it. Two things made ports picked by binding port 0 collide: the
//! kernel gives out a port released a moment ago again, to another test's `bind(0)` or as the
//! local port of any outgoing connection (every client and peer link in the tests makes them),
//! before the member that was meant to listen there binds it. Below the ephemeral range neither
//! happens, and the turn-taking keeps this process's tests (which run in parallel threads) off
//! each other's ports. `Cluster` still checks that the server answering on a port is its own.

use std::net::TcpListener;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Where picked ports start: above the well-known and registered ports most services use.
const LOWEST: u16 = 10_000;
/// Fewer ports than this below the ephemeral range: pick ephemeral ones, as before.
const ENOUGH: u16 = 2_000;

/// `n` distinct ports that were free a moment ago on 127.0.0.1.
///
/// All listeners are held until every port is picked, so the ports are distinct; they are then
/// released for the server to bind. Something else may still take one in between:
/// `Cluster::start` notices the bind failure and retries with fresh ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    let Some(range) = below_ephemeral() else {
        return ephemeral_ports(n);
    };
    let span = u32::from(range.end - range.start);
    let next = next_offset(span);
    let mut held = Vec::with_capacity(n);
    // Every port of the range once at most: the ones in use are skipped.
    for _ in 0..span {
        if held.len() == n {
            break;
        }
        let port = range.start + (next.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
        }
    }
    if held.len() < n {
        return ephemeral_ports(n);
    }
    held.iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

/// The process's turn counter, starting at a random offset so that test binaries run one after
/// another (or a leftover process of an earlier run) do not start on the same ports.
fn next_offset(span: u32) -> &'static AtomicU32 {
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    NEXT.get_or_init(|| AtomicU32::new(rand::random_range(0..span)))
}

/// `LOWEST` up to the start of the ephemeral range, if that leaves enough ports.
fn below_ephemeral() -> Option<Range<u16>> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let low: u16 = text.split_whitespace().next()?.parse().ok()?;
    (low >= LOWEST + ENOUGH).then_some(LOWEST..low)
}

/// `n` distinct ports the kernel picks (`bind` to port 0).
fn ephemeral_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use super::*;

    /// These tests take and check ports around each other's picks: one at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() {
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let range = below_ephemeral();
        let mut seen = HashSet::new();
        for _ in 0..50 {
            let ports = free_ports(9);
            assert_eq!(ports.len(), 9);
            for port in ports {
                assert!(seen.insert(port), "port {port} handed out twice");
                if let Some(range) = &range {
                    assert!(range.contains(&port), "{port} outside {range:?}");
                }
                TcpListener::bind(("127.0.0.1", port))
                    .unwrap_or_else(|e| panic!("port {port} is not free: {e}"));
            }
        }
    }

    #[test]
    fn a_port_in_use_is_skipped() {
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let Some(range) = below_ephemeral() else {
            return;
        };
        let span = u32::from(range.end - range.start);
        // Take the port that is next in turn, so that the next pick must skip it.
        let next = next_offset(span).load(Ordering::Relaxed);
        let port = range.start + (next % span) as u16;
        let Ok(taken) = TcpListener::bind(("127.0.0.1", port)) else {
            return;
        };
        let picked = free_ports(3);
        assert!(!picked.contains(&port), "{port} is in use but was picked");
        drop(taken);
    }
}
