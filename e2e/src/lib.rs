//! Harness for Kord's end-to-end tests: clusters of real `kord` processes on loopback ports.
//!
//! The binaries under test are not built by `cargo test -p kord-e2e`: build them first with
//! `cargo build --bins` (or point `KORD_BIN` / `KORDCTL_BIN` at them).
//!
//! Environment knobs:
//! - `KORD_BIN`, `KORDCTL_BIN`: paths of the binaries under test.
//! - `KORD_E2E_KEEP=1`: keep the temporary data dirs and logs of every cluster.
//! - `KORD_E2E_LOG_LINES=N`: how many lines of each member's log to print when a test fails.
//! - `KORD_CHAOS_SEED=N`, `KORD_CHAOS_SECS=N`: seed and load seconds of the chaos tests
//!   (`tests/chaos.rs`); long runs use the `kord-chaos` binary (see [`chaos`]).

pub mod bins;
pub mod chaos;
pub mod cluster;
pub mod http;
pub mod k8s;
pub mod kv;
pub mod ports;
pub mod wait;
pub mod watch;

pub use bins::{kord_bin, kordctl_bin};
pub use cluster::{assert_same_state, Cluster, ClusterOpts, MemberHost};
pub use http::{http_get, HttpResponse};
pub use kv::*;
pub use wait::{wait_until, POLL_INTERVAL};
pub use watch::{revision_of, WatchConn};

pub use kord_api::v1;
