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
//! Ephemeral nodes live as long as a [`Session`] (a lease the client keeps alive in the
//! background):
//!
//! ```no_run
//! # async fn demo(client: kord_client::Client) -> Result<(), kord_client::Error> {
//! use std::time::Duration;
//! let session = client.session(Duration::from_secs(10)).await?;
//! client.create_ephemeral("/workers/me", "", &session).await?;
//! let mut state = session.watch_state();
//! while state.changed().await.is_ok() {
//!     if state.borrow().is_expired() {
//!         break; // the node is gone; open a new session to re-register
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Watches resume by themselves across member failures and never repeat or reorder a
//! revision; ZooKeeper-style one-shot watches are set by a read:
//!
//! ```no_run
//! # async fn demo(client: kord_client::Client) -> Result<(), kord_client::Error> {
//! use kord_client::{WatchEvent, WatchOptions, WatchScope};
//! let mut changes = client
//!     .watch("/app", WatchOptions { scope: WatchScope::Subtree, ..Default::default() })
//!     .await?;
//! while let Some(change) = changes.next().await {
//!     if let WatchEvent::Events { revision, events } = change? {
//!         println!("{revision}: {} events", events.len());
//!     }
//! }
//! let (data, stat, fired) = client.get_watch("/app/config").await?;
//! let event = fired.await?; // the next change or deletion after the read
//! # let _ = (data, stat, event);
//! # Ok(())
//! # }
//! ```
//!
//! Writes are exactly-once across retries: each carries a `WriteId` that stays the same on
//! every retry, so a write that reached the server before a connection dropped is not applied
//! twice.

mod batch;
pub mod cli;
mod client;
mod election;
mod error;
mod keepalive;
mod lease;
mod lock;
mod members;
mod ops;
mod recipes;
mod session;
mod watch;
mod watch_mux;
mod write_id;

pub use client::{Client, ClientBuilder};
pub use election::{Election, LeaderInfo, LeaderKey, LeaderStream, Leadership};
pub use error::{Error, FAILED_OP_METADATA};
pub use kord_api::v1::{
    Consistency, EventType, Member, MemberRole, NodeKind, Stat, StatusResponse, WatchScope,
};
pub use lease::{KeepAlive, KeepAliveStatus, LeaseGrant, LeaseInfo, LeaseTtl};
pub use lock::{FencingGuard, Mutex, MutexGuard};
pub use members::{MemberList, NewMember, DEFAULT_ADMIN_TIMEOUT};
pub use ops::{CreateMode, CreateOptions, Created, Op, OpResult};
pub use recipes::{RwLock, RwLockGuard, RwMode, Semaphore, SemaphorePermit};
pub use session::{Session, SessionState};
pub use watch::{Event, OneShot, PrevNode, WatchEvent, WatchOptions, WatchStream};
