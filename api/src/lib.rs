//! Kord's wire contract, generated from `proto/`: the client API (`kord.v1`) and the peer
//! protocol between members (`kord.peer.v1`).

pub mod v1 {
    tonic::include_proto!("kord.v1");
}

pub mod peer {
    tonic::include_proto!("kord.peer.v1");
}
