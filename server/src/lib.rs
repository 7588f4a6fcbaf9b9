//! The Kord server. A request flows through these modules in order:
//!
//! - [`grpc`]: the edge. Validates a client request, turns it into a [`state::Command`] or a
//!   read, and maps every error to a gRPC status.
//! - [`proposal`]: proposes a command on the leader (forwarding from followers), stamps the
//!   leader's time into it, and provides the read barrier for linearizable reads.
//! - [`raft`]: openraft's type configuration and the peer network between members.
//! - [`storage`]: RocksDB: the durable Raft log and the state machine that applies committed
//!   entries in batches and persists each batch with its index.
//! - [`state`]: the pure, deterministic znode tree that apply mutates.
//! - [`watch`]: fans applied events out to watchers, live or from the stored history.
//! - [`claims`]: the fair, herd-free queue of ephemeral sequential nodes behind locks and
//!   elections (served by `grpc::lock` and `grpc::election`).
//! - [`liveness`]: the leader's lease countdowns and the reaper of container and TTL nodes;
//!   it decides when, and proposes entries that apply carries out.
//! - [`membership`]: membership administration on the leader (add, promote, remove, replace,
//!   transfer leadership) with its safety rules, and the removed-member guard.
//! - [`http`] and [`metrics`]: health, readiness and Prometheus metrics.
//!
//! [`server::run`] wires them together; `main.rs` only parses flags.

pub mod claims;
pub mod config;
pub mod grpc;
pub mod http;
pub mod liveness;
pub mod membership;
pub mod metrics;
pub mod proposal;
pub mod raft;
pub mod server;
pub mod state;
pub mod storage;
pub mod watch;
