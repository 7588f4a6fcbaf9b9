//! `kord-bench`: drives Kord, etcd and ZooKeeper with identical closed-loop workloads and
//! reports throughput, latency percentiles, errors and CPU seconds.
//!
//! The binary is a thin layer over this library: [`run`] does one run against running
//! servers; [`compare`] starts 1- and 3-member setups of every target on 127.0.0.1, runs a
//! matrix against each and renders a Markdown table with Kord's ratio to each peer.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use kord_bench::{RunConfig, Target, Workload};
//! let mut cfg = RunConfig::new(Target::Kord, vec!["127.0.0.1:7379".into()], Workload::Write);
//! cfg.clients = 4;
//! let report = kord_bench::run(&cfg).await?;
//! println!("{}", report.to_json_line());
//! # Ok(())
//! # }
//! ```

pub mod cluster;
pub mod compare;
pub mod config;
pub mod cpu;
mod etcd;
mod kord;
pub mod report;
mod run;
mod zk;

pub use cluster::Cluster;
pub use compare::{compare, default_rows, markdown, CompareOptions, Row};
pub use config::{RunConfig, Target, Workload};
pub use report::Report;
pub use run::run;
