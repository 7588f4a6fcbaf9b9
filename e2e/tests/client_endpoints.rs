//! The client's endpoint list following the cluster's membership (`Client::sync_endpoints`,
//! `ClientBuilder::auto_sync_interval`), on real members.

use std::collections::BTreeSet;
use std::time::Duration;

use kord_client::{Client, Error};
use kord_e2e::*;

/// `host:port`, as members publish their client addresses.
fn bare(endpoint: &str) -> String {
    endpoint.trim_start_matches("http://").to_owned()
}

fn addrs_of(c: &Cluster, ids: &[u64]) -> BTreeSet<String> {
    ids.iter().map(|id| bare(&c.client_endpoint(*id))).collect()
}

/// Waits until the client's endpoint list is `want`.
async fn wait_for_list(client: &Client, want: BTreeSet<String>, what: &str) {
    wait_until(what, Duration::from_secs(10), || async {
        let got: BTreeSet<String> = client.endpoints().into_iter().collect();
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await
}

/// A client given one member learns the others, and then outlives that member. Without the
/// sync, the same client has nowhere else to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_given_one_member_learns_the_others_and_outlives_it() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let synced = Client::builder([c.client_endpoint(1)])
        .request_timeout(Duration::from_secs(2))
        .retry_budget(Duration::from_secs(20))
        .connect()
        .await
        .expect("client");
    let got: BTreeSet<String> = synced
        .sync_endpoints()
        .await
        .expect("sync endpoints")
        .into_iter()
        .collect();
    assert_eq!(got, addrs_of(&c, &[1, 2, 3]));
    assert_eq!(
        synced.endpoints().into_iter().collect::<BTreeSet<_>>(),
        got,
        "the list in use is the synced one"
    );
    synced.create("/kept", "x").await.expect("create /kept");

    c.kill(1);
    let (data, _) = synced
        .get("/kept")
        .await
        .expect("get /kept after member 1 is gone");
    assert_eq!(data, b"x");
    synced
        .create("/after", "y")
        .await
        .expect("create after member 1 is gone");

    let lost = Client::builder([c.client_endpoint(1)])
        .max_retries(2)
        .connect()
        .await
        .expect("client")
        .get("/kept")
        .await;
    assert!(
        matches!(lost, Err(Error::Unavailable(_))),
        "a client that knows only the dead member: {lost:?}"
    );
}

/// With auto-sync on, a client's list follows a member that joins and one that is removed,
/// and the client keeps working on members it was never given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_sync_follows_members_that_join_and_leave() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let all: Vec<String> = c.ids().iter().map(|id| c.client_endpoint(*id)).collect();
    let client = Client::builder(all)
        .auto_sync_interval(Duration::from_millis(200))
        .connect()
        .await
        .expect("client");
    // A member joins as a learner, then becomes a voter; the list takes it in only then.
    c.spawn_joining(4, &[]);
    c.wait_voter(1, 4, Duration::from_secs(30)).await;
    wait_for_list(
        &client,
        addrs_of(&c, &[1, 2, 3, 4]),
        "the list has member 4",
    )
    .await;

    // A member that does not lead leaves (a leader must hand over first).
    let leader = c.leader().await;
    let gone = *[1, 2, 3]
        .iter()
        .find(|id| **id != leader)
        .expect("a member that does not lead");
    client
        .remove_member(gone, Duration::from_secs(30))
        .await
        .expect("remove a member");
    let kept: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|id| *id != gone).collect();
    wait_for_list(
        &client,
        addrs_of(&c, &kept),
        "the list drops the removed member",
    )
    .await;
    // Left running: the removed member and one other of the first three go; the last of them
    // and member 4 are a majority of the three, and member 4 was never in the given list.
    c.kill(gone);
    c.kill(kept[0]);
    client
        .create("/after-changes", "z")
        .await
        .expect("create after the membership changes");
    let (data, _) = client.get("/after-changes").await.expect("get");
    assert_eq!(data, b"z");
}
