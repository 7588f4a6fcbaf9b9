//! Elections with the client library: a partitioned leader learns it lost leadership before a
//! successor can act, and a killed leader is replaced within its session timeout plus a bound.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kord_client::{Client, Election};
use kord_e2e::*;
use tokio::net::{TcpListener, TcpStream};

/// A loopback TCP proxy to one member that can be cut: open connections are dropped and new
/// ones refused, as in a network partition of the client.
struct Proxy {
    addr: String,
    cut: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(target: std::net::SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("addr").to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if flag.load(Ordering::SeqCst) {
                    continue;
                }
                let flag = flag.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    let watch_cut = async {
                        while !flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! { _ = copy => {}, _ = watch_cut => {} }
                });
            }
        });
        Proxy { addr, cut }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_knows_before_a_successor_acts() {
    let c = Cluster::start(1, ClusterOpts::new().args(["--session-timeout-min", "1s"])).await;
    let proxy = Proxy::start(c.client_addr(1)).await;
    let a_client = Client::connect([proxy.addr.clone()])
        .await
        .expect("client a");
    let b_client = Client::connect([c.client_addr(1).to_string()])
        .await
        .expect("client b");
    let timeout = Duration::from_secs(3);
    let a_session = a_client.session(timeout).await.expect("session a");
    let b_session = b_client.session(timeout).await.expect("session b");
    let a = Election::new(&a_session, "p")
        .campaign("a")
        .await
        .expect("a leads");
    assert!(a.is_leader());

    let b_election = Election::new(&b_session, "p");
    let b = async {
        let l = b_election.campaign("b").await.expect("b campaigns");
        (Instant::now(), l.fencing_token())
    };
    let a_lost = async {
        a.lost().await;
        Instant::now()
    };
    proxy.cut();
    let cut_at = Instant::now();
    let ((b_at, b_token), lost_at) =
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(b, a_lost) })
            .await
            .expect("b elected and a told of its loss in time");
    assert!(
        lost_at < b_at,
        "a learned of its loss {:?} after b was elected",
        lost_at - b_at
    );
    assert!(b_token > a.fencing_token());
    assert!(!a.is_leader());
    // The successor came once a's session expired: after the timeout, within a bound.
    let took = b_at - cut_at;
    assert!(
        took >= Duration::from_secs(2),
        "b elected only {took:?} after the cut"
    );
    assert!(
        took <= timeout + Duration::from_secs(3),
        "b elected {took:?} after the cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_is_replaced_within_its_session_timeout_plus_a_bound() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let c = Cluster::start(3, ClusterOpts::new().args(["--session-timeout-min", "1s"])).await;
    let mut leader = tokio::process::Command::new(kordctl_bin())
        .args([
            "--endpoints",
            &c.endpoints_csv(),
            "elect",
            "k",
            "a",
            "--session-timeout",
            "2s",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn kordctl elect");
    let mut lines = BufReader::new(leader.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
        .await
        .expect("elected in time")
        .expect("read")
        .expect("a line");
    assert!(line.starts_with("leader "), "{line}");
    let client = Client::connect(c.endpoints_csv().split(',').map(String::from))
        .await
        .expect("client");
    let session = client
        .session(Duration::from_secs(10))
        .await
        .expect("session");
    let election = Election::new(&session, "k");
    leader.start_kill().expect("kill -9 the leader");
    let killed = Instant::now();
    let successor = tokio::time::timeout(Duration::from_secs(15), election.campaign("b"))
        .await
        .expect("a successor in time")
        .expect("campaign");
    let took = killed.elapsed();
    assert!(successor.is_leader());
    // The dead leader's session lasts 2 s from its last ping (at most 2/3 s before the kill).
    assert!(
        took >= Duration::from_millis(1300),
        "successor after only {took:?}"
    );
    assert!(took <= Duration::from_secs(5), "successor after {took:?}");
}

/// An observer's stream lives on one member; when that member dies, the client re-opens it on
/// another and still sees every later change of leader (re-opening starts with the current
/// leader, so nothing after the kill is missed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_follows_leader_changes_across_a_member_kill() {
    const T: Duration = Duration::from_secs(15);
    let mut c = Cluster::start(3, ClusterOpts::new()).await;
    let raft_leader = c.leader().await;
    let followers = c.followers().await;
    // The observer's first endpoint is the member that will be killed: streams open there first.
    let mut observer_endpoints = vec![c.client_addr(raft_leader).to_string()];
    observer_endpoints.extend(followers.iter().map(|f| c.client_addr(*f).to_string()));
    let observer = Client::connect(observer_endpoints).await.expect("observer");
    let mut stream = observer.observe("svc");
    let candidates = Client::connect(followers.iter().map(|f| c.client_addr(*f).to_string()))
        .await
        .expect("candidate client");
    let value_of = |info: kord_client::LeaderInfo| info.map(|(_, v)| v);
    let first = tokio::time::timeout(T, stream.next())
        .await
        .expect("first observation in time")
        .expect("stream open")
        .expect("no error");
    assert_eq!(value_of(first), None, "nobody leads yet");

    let session_a = candidates
        .session(Duration::from_secs(10))
        .await
        .expect("a");
    let a = Election::new(&session_a, "svc")
        .campaign("a")
        .await
        .expect("a leads");
    let seen = tokio::time::timeout(T, stream.next())
        .await
        .expect("a observed in time")
        .expect("stream open")
        .expect("no error");
    assert_eq!(value_of(seen), Some(b"a".to_vec()));

    c.kill(raft_leader);
    a.resign().await.expect("a resigns");
    let session_b = candidates
        .session(Duration::from_secs(10))
        .await
        .expect("b");
    let _b = Election::new(&session_b, "svc")
        .campaign("b")
        .await
        .expect("b leads");
    // Between a and b the stream may report "nobody" (a resigned before b won), never
    // anything else.
    loop {
        let seen = tokio::time::timeout(T, stream.next())
            .await
            .expect("b observed in time after the member kill")
            .expect("stream open")
            .expect("no error");
        match value_of(seen) {
            Some(v) if v == b"b" => break,
            None => continue,
            Some(v) if v == b"a" => continue, // re-opened before a's resignation applied there
            Some(other) => panic!("unexpected leader value {other:?}"),
        }
    }
}
