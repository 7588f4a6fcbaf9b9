//! Picks free loopback ports for the members of a test cluster.

use std::net::TcpListener;

/// `n` distinct ports that were free a moment ago on 127.0.0.1.
///
/// All listeners are held until every port is picked, so the ports are distinct; they are then
/// released for the server to bind. Another process may grab one in between: `Cluster::start`
/// notices the bind failure and retries with fresh ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}
