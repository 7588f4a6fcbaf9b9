//! A member asked to stop (SIGTERM, or told it was removed from the cluster) exits promptly,
//! whatever its clients are doing.

use std::time::Duration;

use kord_client::{Client, WatchOptions};
use kord_e2e::*;

/// Found by the chaos suite (replace-member: the replaced member logged "removed from the
/// cluster; stopping" and "shutting down" but kept running while clients held watch streams
/// to it): the listeners' graceful shutdown waited for every open stream, and a watch stream
/// never ends by itself. The server now drops connections still open after a grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_member_with_an_open_watch() {
    let mut c = Cluster::start(1, ClusterOpts::default()).await;
    let client = Client::connect([c.client_addr(1).to_string()])
        .await
        .expect("client");
    client.create("/w", "").await.expect("create /w");
    let mut watch = client
        .watch("/w", WatchOptions::default())
        .await
        .expect("watch /w");
    client.set("/w", "1", None).await.expect("set /w");
    // The stream is established and delivering.
    let first = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an event within 10 s");
    assert!(matches!(first, Some(Ok(_))), "{first:?}");

    c.terminate(1);
    let status = c.wait_exit(1, Duration::from_secs(10)).await;
    assert!(status.success(), "kord exited with {status} after SIGTERM");
    drop(watch);
}
