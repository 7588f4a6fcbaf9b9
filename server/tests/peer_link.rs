//! The peer link's protocol against a real `kord` process: requests it must refuse, frames it
//! must not trust, and the peer gRPC service on the same port.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kord_api::peer::peer_client::PeerClient;
use kord_api::peer::Payload;
use kord_server::raft::link::{LinkReply, MAGIC};
use kord_server::raft::peer_service::Refusal;
use kord_server::raft::TypeConfig;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use openraft::Vote;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One single-member `kord`, killed on drop.
struct Member {
    child: Child,
    peer: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

async fn start_member() -> Member {
    let dir = tempfile::tempdir().expect("temp dir");
    let (client, peer, http) = (free_port(), free_port(), free_port());
    let log = std::fs::File::create(dir.path().join("kord.log")).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_kord"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen-client", &client.to_string()])
        .args(["--listen-peer", &peer.to_string()])
        .args(["--listen-http", &http.to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn kord");
    let member = Member {
        child,
        peer,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(peer).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "kord's peer port {peer} never opened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    member
}

/// Opens a link as member `sender` to member `target`; the member must answer as a link peer.
async fn open(peer: SocketAddr, sender: u64, target: u64) -> TcpStream {
    let mut s = TcpStream::connect(peer).await.expect("connect");
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&sender.to_le_bytes());
    hello.extend_from_slice(&target.to_le_bytes());
    s.write_all(&hello).await.expect("hello");
    let mut answer = [0u8; 8];
    s.read_exact(&mut answer).await.expect("answer to hello");
    assert_eq!(&answer, MAGIC);
    s
}

async fn send(s: &mut TcpStream, len: u32, payload: &[u8]) {
    let mut frame = len.to_le_bytes().to_vec();
    frame.extend_from_slice(payload);
    s.write_all(&frame).await.expect("send frame");
}

async fn reply(s: &mut TcpStream) -> LinkReply {
    let len = tokio::time::timeout(Duration::from_secs(10), s.read_u32_le())
        .await
        .expect("a reply in time")
        .expect("reply length");
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await.expect("reply payload");
    postcard::from_bytes(&payload).expect("a LinkReply")
}

async fn assert_closed(s: &mut TcpStream) {
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the member kept the connection open");
}

fn request(term: u64, leader: u64) -> Vec<u8> {
    let req = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(term, leader),
        prev_log_id: None,
        entries: vec![],
        leader_commit: None,
    };
    postcard::to_allocvec(&req).expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_link_refuses_bad_requests_and_the_port_keeps_serving() {
    let m = start_member().await;

    // Meant for another member: refused, naming this one.
    let mut s = open(m.peer, 7, 99).await;
    send(&mut s, request(0, 7).len() as u32, &request(0, 7)).await;
    match reply(&mut s).await {
        LinkReply::Refused(Refusal::WrongTarget { message }) => {
            assert!(message.contains("this is member 1"), "{message}")
        }
        other => panic!("want a wrong-target refusal, got {other:?}"),
    }

    // Well-formed and for this member: Raft answers (a stale term gets this member's vote).
    let mut s = open(m.peer, 7, 1).await;
    send(&mut s, request(0, 7).len() as u32, &request(0, 7)).await;
    match reply(&mut s).await {
        LinkReply::Raft(Ok(AppendEntriesResponse::HigherVote(vote))) => {
            assert!(vote.leader_id().term >= 1, "{vote:?}")
        }
        other => panic!("want Raft's higher-vote answer, got {other:?}"),
    }

    // Undecodable: refused as malformed, and the connection is closed.
    let garbage = b"\xff\xff\xff\xff not a request";
    send(&mut s, garbage.len() as u32, garbage).await;
    match reply(&mut s).await {
        LinkReply::Refused(Refusal::Malformed { message }) => {
            assert!(message.contains("malformed peer payload"), "{message}")
        }
        other => panic!("want a malformed refusal, got {other:?}"),
    }
    assert_closed(&mut s).await;

    // A length over the peer message limit: refused without reading (or allocating) it.
    let mut s = open(m.peer, 7, 1).await;
    send(&mut s, u32::MAX, b"").await;
    match reply(&mut s).await {
        LinkReply::Refused(Refusal::Malformed { message }) => {
            assert!(message.contains("exceeds the limit"), "{message}")
        }
        other => panic!("want a malformed refusal, got {other:?}"),
    }
    assert_closed(&mut s).await;

    // Neither a link nor HTTP/2: the HTTP/2 server drops it.
    let mut s = TcpStream::connect(m.peer).await.expect("connect");
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("write");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;

    // The peer gRPC service still answers on the same port, and new links still open.
    let mut peer = PeerClient::connect(format!("http://{}", m.peer))
        .await
        .expect("peer gRPC");
    let err = peer
        .vote(Payload {
            data: vec![0xff; 3],
        })
        .await
        .expect_err("a garbage vote");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("malformed peer payload"), "{err}");
    let mut s = open(m.peer, 7, 1).await;
    send(&mut s, request(0, 7).len() as u32, &request(0, 7)).await;
    assert!(matches!(reply(&mut s).await, LinkReply::Raft(Ok(_))));
}
