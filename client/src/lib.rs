//! Async Rust client for Kord, a ZooKeeper-like coordination service, and the implementation
//! of the `kordctl` command line.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kord_client::Error> {
//! let client = kord_client::Client::connect(["127.0.0.1:7379"]).await?;
//! client.create("/app", "config").await?;
//! let (data, stat) = client.get("/app").await?;
//! client.set("/app", "v2", Some(stat.version)).await?;
//! # let _ = data;
//! # Ok(())
//! # }
//! ```
//!
//! Writes are exactly-once across retries: each carries a `WriteId` that stays the same on
//! every retry, so a write that reached the server before a connection dropped is not applied
//! twice.

pub mod cli;
mod client;
mod error;
mod ops;
mod write_id;

pub use client::{Client, ClientBuilder};
pub use error::{Error, FAILED_OP_METADATA};
pub use kord_api::v1::{Consistency, Member, MemberRole, Stat, StatusResponse};
pub use ops::{CreateOptions, Created, Op, OpResult};
