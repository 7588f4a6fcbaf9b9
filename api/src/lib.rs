//! Kord's wire contract, generated from `proto/`: the client API (`kord.v1`) and the peer
//! protocol between members (`kord.peer.v1`); and [`transport`], the gRPC channel that the
//! client and the members' peer calls use.

// Proto comments with indented list continuations are not Markdown lists; clippy (1.95+) reads
// them as such in the generated docs.
#[allow(clippy::doc_lazy_continuation)]
pub mod v1 {
    tonic::include_proto!("kord.v1");
}

pub mod coalesce;
pub mod transport;

pub mod peer {
    tonic::include_proto!("kord.peer.v1");
}

/// The server's side of the Watch service: the same RPC as [`v1::watch_server`], with
/// responses whose events are already encoded (`proto/kord/v1/watch_wire.proto`). Clients
/// decode them as [`v1::WatchResponse`].
pub mod watch_wire {
    include!(concat!(env!("OUT_DIR"), "/wire/kord.v1.rs"));
}
