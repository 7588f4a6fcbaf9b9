//! The client's connections to real members: its own HTTP/2 transport
//! (`api/src/transport.rs`) with flow control at the value size limit, many calls sharing
//! one connection, reconnecting after the member restarts and dropping a connection whose
//! member stopped answering; and the spread of many clients over the members.

use std::time::{Duration, Instant};

use kord_client::{Client, Error, WatchOptions};
use kord_e2e::*;

const MIB: usize = 1024 * 1024;

fn big_value(i: usize) -> Vec<u8> {
    (0..MIB).map(|j| ((i * 31 + j * 7) % 251) as u8).collect()
}

/// Eight 1 MiB values written and read back at the same time: more than the connection's
/// flow-control window each way, so both the sending side (waiting for capacity) and the
/// receiving side (giving capacity back as replies are read) must work for this to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_at_the_size_limit_round_trip_concurrently() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    let client = Client::builder([c.client_endpoint(1)])
        .request_timeout(Duration::from_secs(30))
        .connect()
        .await
        .expect("client");
    client.create("/big", "").await.expect("create /big");
    let writes = (0..8).map(|i| {
        let client = client.clone();
        async move { client.create(&format!("/big/{i}"), big_value(i)).await }
    });
    for (i, r) in futures::future::join_all(writes)
        .await
        .into_iter()
        .enumerate()
    {
        r.unwrap_or_else(|e| panic!("create /big/{i} with a 1 MiB value: {e}"));
    }
    let reads = (0..8).map(|i| {
        let client = client.clone();
        async move { client.get(&format!("/big/{i}")).await }
    });
    for (i, r) in futures::future::join_all(reads)
        .await
        .into_iter()
        .enumerate()
    {
        let (data, stat) = r.unwrap_or_else(|e| panic!("get /big/{i}: {e}"));
        assert_eq!(stat.data_length as usize, MIB, "/big/{i} stat");
        assert!(data == big_value(i), "/big/{i} came back different");
    }
}

/// 600 calls at once on one client, so on one connection: more streams than a server usually
/// lets a connection open at a time (hyper's default is 200); the rest wait their turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_calls_share_one_connection() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    let client = Client::connect([c.client_endpoint(1)])
        .await
        .expect("client");
    client.create("/many", "").await.expect("create /many");
    let calls = (0..600).map(|i| {
        let client = client.clone();
        async move { client.create(&format!("/many/{i}"), i.to_string()).await }
    });
    let results = futures::future::join_all(calls).await;
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} calls failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let mut children = client.children("/many").await.expect("children");
    children.sort_by_key(|c| c.parse::<u32>().expect("numeric child"));
    assert_eq!(
        children,
        (0..600).map(|i| i.to_string()).collect::<Vec<_>>()
    );
}

/// A member killed and started again on the same port: the client's connection to it is gone,
/// and the next call connects anew (retrying while the member starts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reconnects_after_its_member_restarts() {
    let mut c = Cluster::start(1, ClusterOpts::default()).await;
    let client = Client::connect([c.client_endpoint(1)])
        .await
        .expect("client");
    client.create("/r", "before").await.expect("create /r");
    c.kill(1);
    c.restart(1).await;
    client
        .set("/r", "after", None)
        .await
        .expect("set /r after the restart");
    let (data, _) = client.get("/r").await.expect("get /r");
    assert_eq!(data, b"after");
}

/// A member that stops answering without closing its connection (SIGSTOP here; power loss or
/// a partition alike) must not hold a call for the whole request timeout: the connection's
/// unanswered ping (every 10 s, 5 s to answer) drops it and the call fails as unavailable.
/// Once the member answers again, the next call reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_member_stopped_answering_is_dropped() {
    let mut c = Cluster::start(1, ClusterOpts::default()).await;
    let client = Client::builder([c.client_endpoint(1)])
        .request_timeout(Duration::from_secs(60))
        .max_retries(0)
        .connect()
        .await
        .expect("client");
    client.create("/p", "x").await.expect("create /p");
    c.pause(1);
    let started = Instant::now();
    let outcome = client.get("/p").await;
    let waited = started.elapsed();
    c.resume(1);
    assert!(
        matches!(outcome, Err(Error::Unavailable(_))),
        "a call to a stopped member: {outcome:?} after {waited:?}"
    );
    // At most one ping interval plus the ping timeout, with room for a loaded machine; far
    // below the 60 s request timeout.
    assert!(
        waited < Duration::from_secs(25),
        "the call failed only after {waited:?}"
    );
    let (data, _) = client.get("/p").await.expect("get /p after resuming");
    assert_eq!(data, b"x");
}

/// Clients given the same endpoint list each start on an endpoint of their own (as ZooKeeper's
/// clients shuffle their list), so their watches spread over the members instead of all
/// going through the first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_the_same_endpoints_spread_their_watches_over_the_members() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let endpoints: Vec<String> = c.ids().iter().map(|id| c.client_endpoint(*id)).collect();
    let setup = Client::connect(endpoints.clone()).await.expect("client");
    setup.create("/spread", "").await.expect("create /spread");
    const CLIENTS: u64 = 24;
    let mut held = Vec::new();
    for _ in 0..CLIENTS {
        let client = Client::connect(endpoints.clone()).await.expect("client");
        let watch = client
            .watch("/spread", WatchOptions::default())
            .await
            .expect("watch /spread");
        held.push((client, watch));
    }
    let streams: Vec<u64> = wait_until(
        "every watch stream open",
        Duration::from_secs(10),
        || async {
            let mut streams = Vec::new();
            for id in c.ids() {
                streams.push(c.metric(id, "kord_watch_streams").await);
            }
            match streams.iter().sum::<u64>() {
                CLIENTS => Ok(streams),
                n => Err(format!("{n} streams open: {streams:?}")),
            }
        },
    )
    .await;
    // All 24 on one member by chance: 3 x (1/3)^24, about 1e-11.
    let members_used = streams.iter().filter(|n| **n > 0).count();
    assert!(
        members_used >= 2,
        "{CLIENTS} clients' watch streams per member: {streams:?}"
    );
}

/// Established TCP connections from this process's network namespace to `port` (the client
/// ends, whose remote port is the server's), from `/proc/net/tcp`.
fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = fields
                .get(2)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            remote_port == Some(port) && fields.get(3) == Some(&"01")
        })
        .count()
}

/// A client holds one connection per endpoint it has used, and dropping its last handle closes
/// them (the connection task does not keep a connection alive on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_client_closes_its_connection() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    let port = c.client_addr(1).port();
    let before = connections_to(port);
    let client = Client::connect([c.client_endpoint(1)])
        .await
        .expect("client");
    let clone = client.clone();
    for i in 0..20 {
        clone.create(&format!("/d{i}"), "").await.expect("create");
    }
    assert_eq!(
        connections_to(port),
        before + 1,
        "one connection for all the calls of a client and its clones"
    );
    drop(client);
    drop(clone);
    wait_until(
        "the client's connection closed",
        Duration::from_secs(10),
        || async {
            match connections_to(port) {
                n if n == before => Ok(()),
                n => Err(format!(
                    "{n} connections to {port}, {before} before the client"
                )),
            }
        },
    )
    .await;
}
