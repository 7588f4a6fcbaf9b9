//! Replication over the peer link (`server/src/raft/link.rs`), and with members that do not
//! speak it: an older member, or one started with `--peer-link=false`.

use std::time::Duration;

use kord_client::ClientBuilder;
use kord_e2e::*;

const WAIT: Duration = Duration::from_secs(30);
const LINK_APPENDS: &str = "kord_peer_link_appends_total";

async fn write_all(c: &Cluster, via: u64, prefix: &str, n: usize) {
    let mut kv = c.kv(via);
    for i in 0..n {
        kv.create(create_req(&format!("/{prefix}-{i:03}"), b"v"))
            .await
            .unwrap_or_else(|e| panic!("create /{prefix}-{i:03} through member {via}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_without_the_peer_link_replicate_over_grpc_and_can_lead() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;
    write_all(&c, leader, "linked", 20).await;
    assert_same_state(&c.wait_converged(WAIT).await);
    for f in c.followers().await {
        let appends = c.metric(f, LINK_APPENDS).await;
        assert!(
            appends > 0,
            "follower {f} took no AppendEntries over the link"
        );
    }

    // A follower restarted on its data without the link, as a rolling upgrade or downgrade
    // would: the leader finds it does not speak the link and replicates to it over gRPC.
    let plain = c.followers().await[0];
    c.kill(plain);
    c.respawn_joining(plain, &["--peer-link=false"]);
    write_all(&c, leader, "mixed", 20).await;
    assert_same_state(&c.wait_converged(WAIT).await);
    assert_eq!(
        c.metric(plain, LINK_APPENDS).await,
        0,
        "a member without the link took AppendEntries over it"
    );

    // It can lead: its followers get its writes over gRPC, none over the link.
    let admin = ClientBuilder::new(c.live_ids().iter().map(|&id| c.client_addr(id).to_string()))
        .request_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("client");
    let now = admin
        .transfer_leader(plain, Duration::from_secs(20))
        .await
        .expect("transfer leadership to the member without the link");
    assert_eq!(now, plain);
    let others: Vec<u64> = c.ids().into_iter().filter(|&id| id != plain).collect();
    let mut before = Vec::new();
    for &id in &others {
        before.push(c.metric(id, LINK_APPENDS).await);
    }
    write_all(&c, plain, "led-without-link", 20).await;
    assert_same_state(&c.wait_converged(WAIT).await);
    for (&id, before) in others.iter().zip(before) {
        assert_eq!(
            c.metric(id, LINK_APPENDS).await,
            before,
            "member {id} took link appends from a leader without the link"
        );
    }
    assert_eq!(c.leader().await, plain);
}
