//! `kord --join`: an empty member asks a running cluster to add it, catches up, and serves.

use std::process::{Command, Stdio};
use std::time::Duration;

use kord_e2e::ports::free_ports;
use kord_e2e::v1::cluster_client::ClusterClient;
use kord_e2e::v1::kv_client::KvClient;
use kord_e2e::*;

/// Kills the joined member when the test ends, passing or not.
struct Joined(std::process::Child);

impl Drop for Joined {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_member_joins_a_running_cluster_as_a_voter() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    c.kv(1)
        .create(create_req("/before", b"1"))
        .await
        .expect("create /before");

    let dir = tempfile::tempdir().expect("temp dir");
    let ports = free_ports(3);
    let client = format!("127.0.0.1:{}", ports[0]);
    let log = std::fs::File::create(dir.path().join("kord-2.log")).expect("log file");
    let _joined = Joined(
        Command::new(kord_bin())
            .args(["--id", "2", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client", &client])
            .args(["--listen-peer", &format!("127.0.0.1:{}", ports[1])])
            .args(["--listen-http", &format!("127.0.0.1:{}", ports[2])])
            .args(["--join", &c.client_endpoint(1).replace("http://", "")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .expect("spawn joining member"),
    );

    c.wait_voter(1, 2, Duration::from_secs(30)).await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{client}"))
        .expect("endpoint")
        .connect_lazy();
    let mut kv2 = KvClient::new(channel.clone());
    // The joined member has the data written before it joined, and writes through it.
    let got = get(&mut kv2, "/before", LINEARIZABLE)
        .await
        .expect("get /before on member 2");
    assert_eq!(got.data, b"1");
    kv2.create(create_req("/after", b"2"))
        .await
        .expect("write through member 2");
    let got = get(&mut c.kv(1), "/after", LINEARIZABLE)
        .await
        .expect("get /after on member 1");
    assert_eq!(got.data, b"2");
    let s1 = c.status(1).await.expect("status 1");
    let s2 = ClusterClient::new(channel)
        .status(v1::StatusRequest {})
        .await
        .expect("status 2")
        .into_inner();
    assert_eq!(s1.leader_id, s2.leader_id);
}
