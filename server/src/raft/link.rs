//! The peer link: AppendEntries (replication and heartbeats, nearly all Raft traffic) over a
//! plain TCP connection per leader and follower, beside the peer gRPC service on the same port.
//!
//! A unary gRPC call costs each AppendEntries an HTTP/2 stream, a hop through tonic's buffer
//! task and the connection task on the leader, and the connection task plus a task per request
//! on the follower. On the link the leader's replication task writes the request and reads the
//! answer itself, and one task per connection on the follower hands each request to Raft: four
//! thread hand-offs fewer per round trip, on the path of every replicated write.
//!
//! Protocol: the sender opens with [`MAGIC`], its own id and the target's id (little-endian
//! u64s); the receiver answers with [`MAGIC`]. Then each request is a frame (u32 little-endian
//! length, then the postcard-encoded `AppendEntriesRequest`) answered by one frame holding a
//! [`LinkReply`], in order. A receiver that does not speak the link (an older member, or one
//! started with `--peer-link=false`) hands the connection to its HTTP/2 server, which answers
//! with something other than [`MAGIC`]; the sender then uses gRPC for a while.

use std::io;
use std::time::Duration;

use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::network::MAX_PEER_MESSAGE_BYTES;
use super::peer_service::{RaftGate, Refusal};
use super::{NodeId, Raft, TypeConfig};
use crate::metrics::Metrics;
use crate::server::accept_until_stopped;

/// The first bytes of a link connection, and the receiver's answer to them.
pub const MAGIC: &[u8; 8] = b"KORDLNK1";

/// How long a new connection has to say what it is.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// A link that carried nothing for this long is closed by the receiver. A leader sends a
/// heartbeat every `--heartbeat-interval`; a silent link is one whose sender is gone behind a
/// partition, which would otherwise hold the connection open for good.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One answer on the link.
#[derive(Debug, Serialize, Deserialize)]
pub enum LinkReply {
    /// Raft's answer to the request.
    Raft(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// Refused before Raft saw it.
    Refused(Refusal),
}

/// Why a link call failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer did not answer the opening as a link peer: use gRPC with it.
    #[error("{0} does not speak the peer link")]
    Unsupported(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("peer link to {addr}: {source}")]
    Io { addr: String, source: io::Error },
    #[error("peer link to {addr}: no answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("peer link to {addr}: {what}")]
    Protocol { addr: String, what: String },
}

// ---- the sending side -------------------------------------------------------------------------

/// A connected link to one peer, used by one replication stream at a time.
pub struct LinkConn {
    addr: String,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl LinkConn {
    /// Connects to `addr` and opens the link as `sender` talking to `target`.
    pub async fn connect(
        addr: &str,
        sender: NodeId,
        target: NodeId,
        timeout: Duration,
    ) -> Result<LinkConn, LinkError> {
        let connect = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|source| LinkError::Connect {
                    addr: addr.to_owned(),
                    source,
                })?;
            let io_err = |source| LinkError::Io {
                addr: addr.to_owned(),
                source,
            };
            stream.set_nodelay(true).map_err(io_err)?;
            let (reader, mut writer) = stream.into_split();
            let mut hello = Vec::with_capacity(24);
            hello.extend_from_slice(MAGIC);
            hello.extend_from_slice(&sender.to_le_bytes());
            hello.extend_from_slice(&target.to_le_bytes());
            writer.write_all(&hello).await.map_err(io_err)?;
            let mut reader = BufReader::new(reader);
            let mut answer = [0u8; 8];
            match reader.read_exact(&mut answer).await {
                Ok(_) if &answer == MAGIC => {}
                // An HTTP/2 server answers with its own frames, or closes.
                Ok(_) => return Err(LinkError::Unsupported(addr.to_owned())),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(LinkError::Unsupported(addr.to_owned()))
                }
                Err(e) => return Err(io_err(e)),
            }
            Ok(LinkConn {
                addr: addr.to_owned(),
                reader,
                writer,
            })
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| LinkError::Timeout {
                addr: addr.to_owned(),
                timeout,
            })?
    }

    /// Sends one request and waits for its answer. After an error the connection is in an
    /// unknown state: drop it.
    pub async fn append(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        timeout: Duration,
    ) -> Result<LinkReply, LinkError> {
        let addr = self.addr.clone();
        let io_err = |source| LinkError::Io {
            addr: addr.clone(),
            source,
        };
        let call = async {
            write_frame(&mut self.writer, rpc).await.map_err(io_err)?;
            let frame = read_frame(&mut self.reader).await.map_err(io_err)?;
            postcard::from_bytes(&frame).map_err(|e| LinkError::Protocol {
                addr: addr.clone(),
                what: format!("undecodable answer: {e}"),
            })
        };
        tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| LinkError::Timeout {
                addr: self.addr.clone(),
                timeout,
            })?
    }
}

/// Writes `value` as one frame, in one write.
async fn write_frame<T: Serialize>(writer: &mut OwnedWriteHalf, value: &T) -> io::Result<()> {
    // The length goes in front once the payload is encoded after it.
    let mut frame = postcard::to_extend(value, vec![0u8; 4]).map_err(io::Error::other)?;
    let len = u32::try_from(frame.len() - 4)
        .ok()
        .filter(|n| *n as usize <= MAX_PEER_MESSAGE_BYTES)
        .ok_or_else(|| {
            io::Error::other(format!(
                "a peer link frame of {} bytes exceeds the limit of {MAX_PEER_MESSAGE_BYTES}",
                frame.len() - 4
            ))
        })?;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    writer.write_all(&frame).await
}

/// Reads one frame's payload; a length above the peer message limit is an error.
async fn read_frame(reader: &mut BufReader<OwnedReadHalf>) -> io::Result<Vec<u8>> {
    let len = reader.read_u32_le().await? as usize;
    if len > MAX_PEER_MESSAGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a peer link frame of {len} bytes exceeds the limit of {MAX_PEER_MESSAGE_BYTES}"
            ),
        ));
    }
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await?;
    Ok(payload)
}

// ---- the receiving side -----------------------------------------------------------------------

/// Serves link connections: hands each request to Raft after the gate's checks.
#[derive(Clone)]
pub struct LinkServer {
    pub raft: Raft,
    pub gate: RaftGate,
    pub metrics: std::sync::Arc<Metrics>,
}

impl LinkServer {
    async fn serve(self, stream: TcpStream, mut stop: watch::Receiver<bool>) {
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let (reader, mut writer) = stream.into_split();
        let mut reader = BufReader::new(reader);
        let result = tokio::select! {
            r = self.serve_requests(&mut reader, &mut writer) => r,
            _ = stop.changed() => Ok(()),
        };
        if let Err(e) = result {
            // A sender that goes away (a leader stepping down, a restart) ends its link.
            tracing::debug!(%peer, error = %e, "peer link closed");
        }
    }

    async fn serve_requests(
        &self,
        reader: &mut BufReader<OwnedReadHalf>,
        writer: &mut OwnedWriteHalf,
    ) -> io::Result<()> {
        let mut hello = [0u8; 24];
        tokio::time::timeout(HELLO_TIMEOUT, reader.read_exact(&mut hello))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no opening"))??;
        let sender = NodeId::from_le_bytes(hello[8..16].try_into().expect("8 bytes"));
        let target = NodeId::from_le_bytes(hello[16..24].try_into().expect("8 bytes"));
        writer.write_all(MAGIC).await?;
        loop {
            let frame = match tokio::time::timeout(IDLE_TIMEOUT, read_frame(reader)).await {
                Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "idle link")),
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(Err(e)) => return refuse_malformed(writer, e).await,
                Ok(Ok(frame)) => frame,
            };
            if let Err(refusal) = self.gate.check(Some(target), Some(sender)) {
                write_frame(writer, &LinkReply::Refused(refusal)).await?;
                continue;
            }
            let rpc = match postcard::from_bytes::<AppendEntriesRequest<TypeConfig>>(&frame) {
                Ok(rpc) => rpc,
                Err(e) => {
                    let e = io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("malformed peer payload: {e}"),
                    );
                    return refuse_malformed(writer, e).await;
                }
            };
            self.metrics.peer_link_appends.inc();
            let reply = LinkReply::Raft(self.raft.append_entries(rpc).await);
            write_frame(writer, &reply).await?;
        }
    }
}

/// Answers a frame that could not be read or decoded, then ends the link with `e`: after it
/// the stream's framing cannot be trusted.
async fn refuse_malformed(writer: &mut OwnedWriteHalf, e: io::Error) -> io::Result<()> {
    let refusal = Refusal::Malformed {
        message: e.to_string(),
    };
    let _ = write_frame(writer, &LinkReply::Refused(refusal)).await;
    Err(e)
}

/// Accepts connections on the peer port: link connections are served here (when `links` is
/// given), every other connection goes to the returned stream for the peer gRPC server.
pub fn accept_peer_port(
    listener: TcpListener,
    links: Option<LinkServer>,
    stop: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<TcpStream>> {
    let (to_grpc, incoming) = mpsc::channel(64);
    let mut stopped = stop.clone();
    tokio::spawn(async move {
        while let Some(stream) = accept_until_stopped(&listener, &mut stopped, "peer").await {
            // Without this, small replies wait ~40 ms for the peer's delayed ACK.
            let _ = stream.set_nodelay(true);
            let Some(links) = links.clone() else {
                if to_grpc.send(Ok(stream)).await.is_err() {
                    return;
                }
                continue;
            };
            let (to_grpc, stop) = (to_grpc.clone(), stop.clone());
            tokio::spawn(async move {
                if opens_link(&stream).await {
                    links.serve(stream, stop).await;
                } else {
                    let _ = to_grpc.send(Ok(stream)).await;
                }
            });
        }
    });
    ReceiverStream::new(incoming)
}

/// Whether a new connection starts with [`MAGIC`], looking without consuming. An HTTP/2
/// client's preface differs at the first byte.
async fn opens_link(stream: &TcpStream) -> bool {
    let mut start = [0u8; 8];
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut start)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 || start[..n] != MAGIC[..n] {
            return false;
        }
        if n == MAGIC.len() {
            return true;
        }
        // The opening arrived in pieces: wait for the rest.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
