//! The peer network, client side: sends openraft's RPCs to other members over the peer gRPC
//! service, postcard-encoded, and maps transport failures to openraft's error kinds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kord_api::peer::peer_client::PeerClient;
use kord_api::peer::Payload;
use kord_api::transport::Channel;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::link::{LinkConn, LinkError, LinkReply};
use super::peer_service::Refusal;
use super::peers::{metadata_id, PeerGuard, REMOVED_HEADER, SENDER_ID_HEADER};
use super::{KordNode, NodeId, TypeConfig};

/// Request metadata naming the member a Raft RPC is meant for.
pub const TARGET_ID_HEADER: &str = "kord-target-id";

/// Largest peer message: a snapshot chunk or a batch of log entries.
pub const MAX_PEER_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// One lazily connected channel per peer address, shared by Raft traffic and forwarding. The
/// channel is `kord_api::transport`'s, as the client's: a forwarded write leaves in one TCP
/// write instead of hyper's three.
#[derive(Clone, Default)]
pub struct PeerChannels {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl PeerChannels {
    pub fn client(&self, addr: &str) -> Result<PeerClient<Channel>, String> {
        let mut channels = self.channels.lock().expect("peer channel map poisoned");
        let channel = match channels.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = Channel::lazy(addr, Duration::from_secs(1))
                    .map_err(|e| format!("peer address {addr:?}: {e}"))?;
                channels.insert(addr.to_owned(), c.clone());
                c
            }
        };
        Ok(PeerClient::new(channel)
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES))
    }
}

/// The peer RPCs members make to each other outside Raft (forwarding to the leader).
#[derive(Debug, Clone, Copy)]
pub enum PeerRpc {
    Forward,
    ReadIndex,
    Lease,
    Admin,
    ClaimWait,
}

impl PeerChannels {
    /// One non-Raft peer call: encodes `req` with postcard, calls `rpc` at `addr` within
    /// `timeout` and decodes the reply. The error names the transport or decoding failure.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        rpc: PeerRpc,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, String> {
        let mut client = self.client(addr)?;
        let mut request = tonic::Request::new(Payload {
            data: postcard::to_allocvec(req).map_err(|e| format!("encoding the request: {e}"))?,
        });
        request.set_timeout(timeout);
        let response = match rpc {
            PeerRpc::Forward => client.forward(request).await,
            PeerRpc::ReadIndex => client.read_index(request).await,
            PeerRpc::Lease => client.lease(request).await,
            PeerRpc::Admin => client.admin(request).await,
            PeerRpc::ClaimWait => client.claim_wait(request).await,
        }
        .map_err(|s| s.message().to_owned())?;
        postcard::from_bytes(&response.into_inner().data)
            .map_err(|e| format!("malformed reply: {e}"))
    }
}

pub struct NetworkFactory {
    pub channels: PeerChannels,
    pub guard: Arc<PeerGuard>,
    /// Whether AppendEntries go over the peer link (`link.rs`) where the peer speaks it.
    pub links: bool,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &KordNode) -> Self::Network {
        PeerConnection {
            target,
            addr: node.peer_addr.clone(),
            channels: self.channels.clone(),
            guard: self.guard.clone(),
            links: self.links,
            link: None,
            grpc_until: None,
        }
    }
}

/// How long AppendEntries go over gRPC after a peer turned out not to speak the link (an older
/// member, or one started with `--peer-link=false`) before the link is tried again.
const LINK_RETRY_AFTER: Duration = Duration::from_secs(30);

/// How long connecting and opening a link may take.
const LINK_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub struct PeerConnection {
    target: NodeId,
    addr: String,
    channels: PeerChannels,
    guard: Arc<PeerGuard>,
    /// Whether to use the peer link at all (`--peer-link`).
    links: bool,
    /// The open link to this peer, if any.
    link: Option<LinkConn>,
    /// Until then AppendEntries use gRPC.
    grpc_until: Option<Instant>,
}

/// Why a call failed before the remote Raft could answer.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("cannot reach {addr}: {source}")]
    Unreachable {
        addr: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("peer {addr} failed the call: {status}")]
    Status { addr: String, status: tonic::Status },
    #[error("replication to member {target} is held back during a leadership transfer")]
    Fenced { target: NodeId },
    #[error("peer {addr} refused the request: {message}")]
    Refused { addr: String, message: String },
    #[error("bad payload from {addr}: {source}")]
    Decode {
        addr: String,
        source: postcard::Error,
    },
}

impl PeerConnection {
    /// Sends one request and decodes the remote `Result<Resp, RaftError<E>>`.
    async fn call<Req, Resp, E>(
        &self,
        rpc: &'static str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, KordNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: DeserializeOwned + std::error::Error,
    {
        if rpc != "vote" {
            self.check_fence().map_err(RPCError::Unreachable)?;
        }
        let payload = Payload {
            data: crate::storage::codec::encode(req),
        };
        let mut client = self.channels.client(&self.addr).map_err(|e| {
            RPCError::Unreachable(Unreachable::new(&CallError::Unreachable {
                addr: self.addr.clone(),
                source: e.into(),
            }))
        })?;
        let mut request = tonic::Request::new(payload);
        request.set_timeout(timeout);
        // The receiver refuses a request meant for another member (a misconfigured address),
        // which openraft would otherwise take for its own and trip over.
        request
            .metadata_mut()
            .insert(TARGET_ID_HEADER, self.target.into());
        // The receiver refuses Raft traffic from a member removed from the cluster.
        request
            .metadata_mut()
            .insert(SENDER_ID_HEADER, self.guard.id().into());
        let response = match rpc {
            "append_entries" => client.append_entries(request).await,
            "vote" => client.vote(request).await,
            _ => client.install_snapshot(request).await,
        };
        let response = response.map_err(|status| {
            self.note_removal(&status);
            let unreachable = matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown
            );
            let err = CallError::Status {
                addr: self.addr.clone(),
                status,
            };
            if unreachable {
                RPCError::Unreachable(Unreachable::new(&err))
            } else {
                RPCError::Network(NetworkError::new(&err))
            }
        })?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            postcard::from_bytes(&response.into_inner().data).map_err(|source| {
                RPCError::Network(NetworkError::new(&CallError::Decode {
                    addr: self.addr.clone(),
                    source,
                }))
            })?;
        self.guard.contacted(self.target);
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// Replication other than votes is held back from this peer during a leadership transfer.
    fn check_fence(&self) -> Result<(), Unreachable> {
        if self.guard.fenced(self.target) {
            return Err(Unreachable::new(&CallError::Fenced {
                target: self.target,
            }));
        }
        Ok(())
    }

    /// A gRPC refusal of this member as removed stops the process ([`Self::note_refused_as`]).
    fn note_removal(&self, status: &tonic::Status) {
        let removed = metadata_id(status.metadata(), REMOVED_HEADER);
        if let (tonic::Code::PermissionDenied, Some(removed)) = (status.code(), removed) {
            self.note_refused_as(removed, status.message());
        }
    }

    /// A peer refusing this member as removed (the anti-rejoin guard) stops the process.
    fn note_refused_as(&self, removed: NodeId, message: &str) {
        if removed == self.guard.id() {
            self.guard.removed(format!(
                "member {} refused our Raft traffic: {message}",
                self.target
            ));
        }
    }
}

impl PeerConnection {
    /// One AppendEntries over the link. `None`: the peer does not speak it, use gRPC.
    async fn append_over_link(
        &mut self,
        rpc: &AppendEntriesRequest<TypeConfig>,
        timeout: Duration,
    ) -> Option<Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, KordNode, RaftError<NodeId>>>>
    {
        if !self.links || self.grpc_until.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        if let Err(fenced) = self.check_fence() {
            return Some(Err(RPCError::Unreachable(fenced)));
        }
        let mut link = match self.link.take() {
            Some(link) => link,
            None => {
                let connect = LinkConn::connect(
                    &self.addr,
                    self.guard.id(),
                    self.target,
                    LINK_CONNECT_TIMEOUT.min(timeout),
                );
                match connect.await {
                    Ok(link) => link,
                    Err(LinkError::Unsupported(addr)) => {
                        tracing::info!(peer = %addr, "peer does not speak the peer link; using gRPC");
                        self.grpc_until = Some(Instant::now() + LINK_RETRY_AFTER);
                        return None;
                    }
                    Err(e) => return Some(Err(RPCError::Unreachable(Unreachable::new(&e)))),
                }
            }
        };
        let reply = match link.append(rpc, timeout).await {
            Ok(reply) => reply,
            // The connection is dropped: a late answer must never be taken for the next one.
            Err(e) => return Some(Err(RPCError::Network(NetworkError::new(&e)))),
        };
        match reply {
            LinkReply::Raft(result) => {
                self.link = Some(link);
                self.guard.contacted(self.target);
                Some(result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))))
            }
            LinkReply::Refused(refusal) => {
                if let Refusal::Removed { sender, message } = &refusal {
                    self.note_refused_as(*sender, message);
                }
                let err = CallError::Refused {
                    addr: self.addr.clone(),
                    message: refusal.message().to_owned(),
                };
                // The receiver keeps the link open after a refusal, except for a malformed request.
                if !matches!(refusal, Refusal::Malformed { .. }) {
                    self.link = Some(link);
                }
                // As over gRPC, where a joining member answers UNAVAILABLE: back off.
                if matches!(refusal, Refusal::Joining { .. }) {
                    return Some(Err(RPCError::Unreachable(Unreachable::new(&err))));
                }
                Some(Err(RPCError::Network(NetworkError::new(&err))))
            }
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, KordNode, RaftError<NodeId>>> {
        if let Some(result) = self.append_over_link(&rpc, option.hard_ttl()).await {
            return result;
        }
        self.call("append_entries", &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, KordNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("install_snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, KordNode, RaftError<NodeId>>> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }
}
