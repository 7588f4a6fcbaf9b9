//! What one benchmark run is: the target, its endpoints, the workload and the load shape.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Kord,
    Etcd,
    #[value(alias = "zk")]
    Zookeeper,
}

impl Target {
    pub const ALL: [Target; 3] = [Target::Kord, Target::Etcd, Target::Zookeeper];

    pub fn name(self) -> &'static str {
        match self {
            Target::Kord => "kord",
            Target::Etcd => "etcd",
            Target::Zookeeper => "zookeeper",
        }
    }

    /// Name for tables.
    pub fn title(self) -> &'static str {
        match self {
            Target::Kord => "Kord",
            Target::Etcd => "etcd",
            Target::Zookeeper => "ZooKeeper",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The workloads. Each target maps them onto its own API (see BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Overwrite a value in the pre-created key space (Kord set, etcd put, ZooKeeper setData).
    Write,
    /// Create a new node: sequential create (Kord, ZooKeeper); etcd: put-if-absent txn.
    Create,
    /// Linearizable read (Kord get, etcd range, ZooKeeper sync + getData).
    Read,
    /// Local / serializable read (Kord get LOCAL, etcd serializable range, ZooKeeper getData).
    ReadLocal,
    /// One watcher on one key, writes at `--rate` (default 50/s): write to event latency.
    Watch,
    /// `--watchers` (default 1000) watchers on one key, writes at `--rate` (default 50/s):
    /// write to the last watcher's event.
    WatchFanout,
    /// Uncontended lock: each client acquires and releases its own lock. Latency = acquire.
    Lock,
    /// All clients contend for one lock. ops/s = hand-offs per second. Latency = acquire wait.
    LockContended,
    /// Lease grant + revoke (Kord, etcd); ZooKeeper: session open + close. Latency = the pair.
    Lease,
}

impl Workload {
    pub const ALL: [Workload; 9] = [
        Workload::Write,
        Workload::Create,
        Workload::Read,
        Workload::ReadLocal,
        Workload::Watch,
        Workload::WatchFanout,
        Workload::Lock,
        Workload::LockContended,
        Workload::Lease,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Write => "write",
            Workload::Create => "create",
            Workload::Read => "read",
            Workload::ReadLocal => "read-local",
            Workload::Watch => "watch",
            Workload::WatchFanout => "watch-fanout",
            Workload::Lock => "lock",
            Workload::LockContended => "lock-contended",
            Workload::Lease => "lease",
        }
    }

    /// Watch workloads are driven by a paced writer and report delivery latency.
    pub fn is_watch(self) -> bool {
        matches!(self, Workload::Watch | Workload::WatchFanout)
    }

    /// Why `target` cannot run this workload yet, or `None` when it can.
    pub fn unsupported_on(self, _target: Target) -> Option<&'static str> {
        // Every target runs every workload today; a workload a target lacks is named here.
        None
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One run: a target, a workload and its load.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub target: Target,
    /// `host:port` client endpoints of every member.
    pub endpoints: Vec<String>,
    pub workload: Workload,
    /// Concurrent closed-loop clients (tasks), each with one request in flight.
    pub clients: usize,
    /// Connections (Kord/etcd channels, ZooKeeper sessions) the clients are spread over.
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub value_size: usize,
    /// Keys written and read (`write`, `read`, `read-local`), created before the run.
    pub keys: usize,
    /// Total request rate over all clients (ops/s); `None`: back to back. For watch
    /// workloads: the write rate (default 50/s).
    pub rate: Option<f64>,
    /// Watchers for `watch-fanout`.
    pub watchers: usize,
    /// PIDs of the server processes whose CPU time is reported.
    pub server_pids: Vec<u32>,
    /// Free-form description of the setup, e.g. "1 node", carried into the report.
    pub setup: String,
    /// Deadline of one operation; a slower one counts as an error.
    pub op_timeout: Duration,
    /// Upper bound on the operations of one client in one run (loops are bounded in count
    /// as well as time).
    pub max_ops_per_client: u64,
    /// Kord only: the client sends writes made at the same moment on a connection in one
    /// `Batch` call (kord-client's default). Off, each write is a call of its own.
    pub kord_batch_writes: bool,
}

impl RunConfig {
    /// Defaults for everything but the target, endpoints and workload.
    pub fn new(target: Target, endpoints: Vec<String>, workload: Workload) -> RunConfig {
        RunConfig {
            target,
            endpoints,
            workload,
            clients: 1,
            connections: 1,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            value_size: 256,
            keys: 1000,
            rate: None,
            watchers: 1000,
            server_pids: Vec::new(),
            setup: String::new(),
            op_timeout: Duration::from_secs(10),
            max_ops_per_client: 10_000_000,
            kord_batch_writes: true,
        }
    }

    /// Watchers this run has.
    pub fn watcher_count(&self) -> usize {
        match self.workload {
            Workload::Watch => 1,
            Workload::WatchFanout => self.watchers.max(1),
            _ => 0,
        }
    }

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.endpoints.is_empty(), "no endpoints given");
        anyhow::ensure!(self.clients >= 1, "--clients must be at least 1");
        anyhow::ensure!(self.connections >= 1, "--connections must be at least 1");
        anyhow::ensure!(self.keys >= 1, "--keys must be at least 1");
        anyhow::ensure!(
            self.value_size >= 16,
            "--value-size must be at least 16 bytes"
        );
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be positive");
        if let Some(rate) = self.rate {
            anyhow::ensure!(rate > 0.0 && rate.is_finite(), "--rate must be positive");
        }
        Ok(())
    }
}
