//! Command-line flags (each documented in `kord --help`) and the validated configuration the
//! server runs with. Defaults are named constants; every check happens once, here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::grpc::Limits;
use crate::raft::{KordNode, NodeId};

pub const DEFAULT_CLIENT_ADDR: &str = "127.0.0.1:7379";
pub const DEFAULT_PEER_ADDR: &str = "127.0.0.1:7380";
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7381";
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;
pub const DEFAULT_MEMBER_MAX_LAG: u64 = 1000;

/// Kord: a replicated coordination service (znodes, versions, transactions) on Raft.
///
/// With no flags, runs a single-member cluster with its data in ./kord-data.
#[derive(Debug, Clone, Parser)]
#[command(name = "kord", version)]
pub struct Args {
    /// This member's id: a positive integer, unique in the cluster and never reused.
    #[arg(long, env = "KORD_ID", default_value_t = 1)]
    pub id: NodeId,

    /// Where the Raft log, state and snapshots live. Restarting with the same directory resumes.
    #[arg(long, env = "KORD_DATA_DIR", default_value = "kord-data")]
    pub data_dir: PathBuf,

    /// Address for the client gRPC API.
    #[arg(long, env = "KORD_LISTEN_CLIENT", default_value = DEFAULT_CLIENT_ADDR)]
    pub listen_client: SocketAddr,

    /// Address for Raft traffic between members.
    #[arg(long, env = "KORD_LISTEN_PEER", default_value = DEFAULT_PEER_ADDR)]
    pub listen_peer: SocketAddr,

    /// Address for HTTP: /healthz, /readyz, /metrics.
    #[arg(long, env = "KORD_LISTEN_HTTP", default_value = DEFAULT_HTTP_ADDR)]
    pub listen_http: SocketAddr,

    /// Client address other members and clients use to reach this member [default: --listen-client].
    #[arg(long, env = "KORD_ADVERTISE_CLIENT")]
    pub advertise_client: Option<String>,

    /// Peer address other members use to reach this member [default: --listen-peer].
    #[arg(long, env = "KORD_ADVERTISE_PEER")]
    pub advertise_peer: Option<String>,

    /// Bootstraps a static cluster: "1=host:port,2=host:port,3=host:port" (peer addresses;
    /// optionally "id=peer@client" to also publish client addresses). Used only when the data
    /// directory is empty.
    #[arg(long, env = "KORD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,

    /// Starts as an empty member and asks the cluster at this client endpoint to add it.
    #[arg(long, env = "KORD_JOIN", conflicts_with = "initial_cluster")]
    pub join: Option<String>,

    /// With --join: join as a learner (non-voting) only.
    #[arg(long, requires = "join")]
    pub join_as_learner: bool,

    /// With --join: join as an observer, a non-voting member that is never promoted and serves
    /// local reads and watches (ZooKeeper's observers).
    #[arg(long, env = "KORD_OBSERVER", requires = "join")]
    pub observer: bool,

    /// A human name for this member (e.g. the pod name), shown in member lists.
    #[arg(long, env = "KORD_NAME", default_value = "")]
    pub name: String,

    /// A learner is caught up (may be promoted, or swapped in by a replace) when it is at most
    /// this many log entries behind the leader, unless the request names its own threshold.
    #[arg(long, env = "KORD_MEMBER_MAX_LAG", default_value_t = DEFAULT_MEMBER_MAX_LAG)]
    pub member_max_lag: u64,

    /// Leader heartbeat interval.
    #[arg(long, env = "KORD_HEARTBEAT_INTERVAL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// Minimum election timeout; the maximum is twice this. Must exceed 3x the heartbeat.
    #[arg(long, env = "KORD_ELECTION_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub election_timeout: Duration,

    /// Replicate over the peer link, a plain TCP connection per peer on the peer port, instead
    /// of one gRPC call per AppendEntries. `false` also refuses incoming links (senders then
    /// use gRPC), as a member older than the link does.
    #[arg(long, env = "KORD_PEER_LINK", default_value_t = true, action = clap::ArgAction::Set)]
    pub peer_link: bool,

    /// Take a snapshot after this many log entries since the last one (etcd's and
    /// ZooKeeper's default is 100,000 too). Each snapshot copies the whole state.
    #[arg(long, env = "KORD_SNAPSHOT_COUNT", default_value_t = 100_000)]
    pub snapshot_count: u64,

    /// Also take a snapshot once the log since the last one holds this many bytes: an entry
    /// carries a batch of commands, so under load a few thousand entries can fill many
    /// megabytes of disk.
    #[arg(long, env = "KORD_SNAPSHOT_LOG_BYTES", default_value_t = 64 << 20)]
    pub snapshot_log_bytes: u64,

    /// Bytes allocated for each Raft log segment file up front; a member keeps at least two
    /// (the one being written and the next). Smaller suits small volumes, at one extra
    /// segment switch per this many bytes written.
    #[arg(long, env = "KORD_LOG_SEGMENT_SIZE", default_value_t = crate::storage::log_store::SEGMENT_BYTES)]
    pub log_segment_size: u64,

    /// Log entries kept behind a snapshot so slow followers can catch up without one.
    #[arg(long, env = "KORD_SNAPSHOT_CATCHUP_ENTRIES", default_value_t = 5_000)]
    pub snapshot_catchup_entries: u64,

    /// Most client commands the leader puts into one log entry. Commands that arrive while
    /// earlier entries are in flight wait and go together, sharing one append, fsync,
    /// replication message and apply call.
    #[arg(long, env = "KORD_PROPOSAL_BATCH", default_value_t = 512)]
    pub proposal_batch: usize,

    /// Log entries of client commands the leader keeps in flight (appended, not yet applied)
    /// before it waits and batches. One is fastest on the machines measured (BENCHMARKS.md):
    /// every entry costs a fixed amount of CPU on every member, so fewer, larger entries win
    /// once writes are concurrent.
    #[arg(long, env = "KORD_PROPOSALS_IN_FLIGHT", default_value_t = 1)]
    pub proposals_in_flight: usize,

    /// Largest znode value, in bytes.
    #[arg(long, env = "KORD_MAX_VALUE_SIZE", default_value_t = DEFAULT_MAX_VALUE_BYTES)]
    pub max_value_size: usize,

    /// Most operations in one transaction.
    #[arg(long, env = "KORD_MAX_TXN_OPS", default_value_t = DEFAULT_MAX_TXN_OPS)]
    pub max_txn_ops: usize,

    /// Largest client request, in bytes (a transaction's values count together).
    #[arg(long, env = "KORD_MAX_REQUEST_SIZE", default_value_t = DEFAULT_MAX_REQUEST_BYTES)]
    pub max_request_size: usize,

    /// Shortest session timeout; shorter requests are raised to it (ZooKeeper: 2x its 2 s tick).
    #[arg(long, env = "KORD_SESSION_TIMEOUT_MIN", default_value = "4s", value_parser = humantime::parse_duration)]
    pub session_timeout_min: Duration,

    /// Longest session timeout; longer requests are lowered to it (ZooKeeper: 20x its tick).
    #[arg(long, env = "KORD_SESSION_TIMEOUT_MAX", default_value = "40s", value_parser = humantime::parse_duration)]
    pub session_timeout_max: Duration,

    /// Shortest lease TTL; shorter grants are refused.
    #[arg(long, env = "KORD_LEASE_TTL_MIN", default_value = "1s", value_parser = humantime::parse_duration)]
    pub lease_ttl_min: Duration,

    /// Longest lease TTL; longer grants are refused.
    #[arg(long, env = "KORD_LEASE_TTL_MAX", default_value = "24h", value_parser = humantime::parse_duration)]
    pub lease_ttl_max: Duration,

    /// Shortest TTL of a TTL node.
    #[arg(long, env = "KORD_NODE_TTL_MIN", default_value = "1s", value_parser = humantime::parse_duration)]
    pub node_ttl_min: Duration,

    /// Longest TTL of a TTL node.
    #[arg(long, env = "KORD_NODE_TTL_MAX", default_value = "30days", value_parser = humantime::parse_duration)]
    pub node_ttl_max: Duration,

    /// How often the leader looks for container and TTL nodes to delete.
    #[arg(long, env = "KORD_REAP_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reap_interval: Duration,

    /// Idle watches get a progress notification this often.
    #[arg(long, env = "KORD_WATCH_PROGRESS_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    pub watch_progress_interval: Duration,

    /// Messages a watch stream may hold unread before its watches are canceled as too slow.
    #[arg(long, env = "KORD_WATCH_BUFFER", default_value_t = 1024)]
    pub watch_buffer: usize,

    /// Revisions of event history kept for watches; the leader compacts older ones (0: never).
    #[arg(long, env = "KORD_EVENT_RETENTION", default_value_t = 100_000)]
    pub event_retention: u64,

    /// Log format: "text" or "json". Filter with RUST_LOG (default "info").
    #[arg(long, env = "KORD_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// How a member with an empty data directory starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// Initialize a cluster of these voters.
    Initialize(BTreeMap<NodeId, KordNode>),
    /// Wait to be added; ask the cluster at this client endpoint to add us.
    Join {
        endpoint: String,
        learner: bool,
        observer: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub id: NodeId,
    pub data_dir: PathBuf,
    pub listen_client: SocketAddr,
    pub listen_peer: SocketAddr,
    pub listen_http: SocketAddr,
    pub node: KordNode,
    pub bootstrap: Bootstrap,
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    pub peer_link: bool,
    pub snapshot_count: u64,
    pub snapshot_log_bytes: u64,
    pub snapshot_catchup_entries: u64,
    pub log_segment_size: u64,
    pub batching: crate::proposal::Batching,
    pub reap_interval: Duration,
    pub watch_progress_interval: Duration,
    pub watch_buffer: usize,
    pub event_retention: u64,
    pub member_max_lag: u64,
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--id must be a positive integer")]
    ZeroId,
    #[error("--initial-cluster entry {entry:?}: {reason}")]
    BadClusterEntry { entry: String, reason: &'static str },
    #[error("--initial-cluster does not list this member's --id {0}")]
    SelfMissing(NodeId),
    #[error("--election-timeout ({election:?}) must be more than 3x --heartbeat-interval ({heartbeat:?})")]
    Timeouts {
        election: Duration,
        heartbeat: Duration,
    },
    #[error("--{flag} must be at least {min}")]
    TooSmall { flag: &'static str, min: u64 },
    #[error("--{what}-min ({min:?}) must be positive and at most --{what}-max ({max:?})")]
    Bounds {
        what: &'static str,
        min: Duration,
        max: Duration,
    },
}

impl Args {
    pub fn validate(self) -> Result<Config, ConfigError> {
        if self.id == 0 {
            return Err(ConfigError::ZeroId);
        }
        if self.election_timeout <= self.heartbeat_interval * 3 {
            return Err(ConfigError::Timeouts {
                election: self.election_timeout,
                heartbeat: self.heartbeat_interval,
            });
        }
        for (flag, value, min) in [
            ("snapshot-count", self.snapshot_count, 1),
            ("snapshot-log-bytes", self.snapshot_log_bytes, 1 << 20),
            ("log-segment-size", self.log_segment_size, 1 << 20),
            ("proposal-batch", self.proposal_batch as u64, 1),
            ("proposals-in-flight", self.proposals_in_flight as u64, 1),
            ("max-value-size", self.max_value_size as u64, 1),
            ("max-txn-ops", self.max_txn_ops as u64, 1),
            ("max-request-size", self.max_request_size as u64, 1024),
            ("watch-buffer", self.watch_buffer as u64, 1),
            ("member-max-lag", self.member_max_lag, 1),
        ] {
            if value < min {
                return Err(ConfigError::TooSmall { flag, min });
            }
        }
        for (what, min, max) in [
            (
                "session-timeout",
                self.session_timeout_min,
                self.session_timeout_max,
            ),
            ("lease-ttl", self.lease_ttl_min, self.lease_ttl_max),
            ("node-ttl", self.node_ttl_min, self.node_ttl_max),
        ] {
            if min.is_zero() || min > max {
                return Err(ConfigError::Bounds { what, min, max });
            }
        }
        let mut node = KordNode {
            peer_addr: self
                .advertise_peer
                .clone()
                .unwrap_or_else(|| self.listen_peer.to_string()),
            client_addr: self
                .advertise_client
                .clone()
                .unwrap_or_else(|| self.listen_client.to_string()),
            name: self.name.clone(),
            observer: self.observer,
        };
        let bootstrap = match (&self.initial_cluster, &self.join) {
            (_, Some(endpoint)) => Bootstrap::Join {
                endpoint: endpoint.clone(),
                learner: self.join_as_learner || self.observer,
                observer: self.observer,
            },
            (Some(spec), None) => {
                let mut members = parse_initial_cluster(spec)?;
                let me = members
                    .get_mut(&self.id)
                    .ok_or(ConfigError::SelfMissing(self.id))?;
                // This member knows its own client address even if the list does not.
                if me.client_addr.is_empty() {
                    me.client_addr = node.client_addr.clone();
                }
                me.name = node.name.clone();
                if self.advertise_peer.is_none() {
                    node.peer_addr = me.peer_addr.clone();
                }
                Bootstrap::Initialize(members)
            }
            (None, None) => Bootstrap::Initialize(BTreeMap::from([(self.id, node.clone())])),
        };
        Ok(Config {
            id: self.id,
            data_dir: self.data_dir,
            listen_client: self.listen_client,
            listen_peer: self.listen_peer,
            listen_http: self.listen_http,
            node,
            bootstrap,
            heartbeat_interval: self.heartbeat_interval,
            election_timeout: self.election_timeout,
            peer_link: self.peer_link,
            snapshot_count: self.snapshot_count,
            snapshot_log_bytes: self.snapshot_log_bytes,
            snapshot_catchup_entries: self.snapshot_catchup_entries,
            log_segment_size: self.log_segment_size,
            batching: crate::proposal::Batching {
                max_commands: self.proposal_batch,
                // A batch stops growing past this size; a single larger command goes alone.
                max_bytes: 1024 * 1024,
                in_flight: self.proposals_in_flight,
            },
            reap_interval: self.reap_interval,
            watch_progress_interval: self.watch_progress_interval,
            watch_buffer: self.watch_buffer,
            event_retention: self.event_retention,
            member_max_lag: self.member_max_lag,
            limits: Limits {
                max_value_bytes: self.max_value_size,
                max_txn_ops: self.max_txn_ops,
                max_request_bytes: self.max_request_size.max(self.max_value_size + 64 * 1024),
                session_timeout_ms: ms_bounds(self.session_timeout_min, self.session_timeout_max),
                lease_ttl_ms: ms_bounds(self.lease_ttl_min, self.lease_ttl_max),
                node_ttl_ms: ms_bounds(self.node_ttl_min, self.node_ttl_max),
            },
        })
    }
}

fn ms_bounds(min: Duration, max: Duration) -> (u64, u64) {
    (min.as_millis() as u64, max.as_millis() as u64)
}

/// Parses "1=host:port,2=host:port@client_host:port".
pub fn parse_initial_cluster(spec: &str) -> Result<BTreeMap<NodeId, KordNode>, ConfigError> {
    let mut members = BTreeMap::new();
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |reason| ConfigError::BadClusterEntry {
            entry: entry.to_owned(),
            reason,
        };
        let (id, addrs) = entry
            .split_once('=')
            .ok_or_else(|| bad("expected id=host:port"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| bad("id is not a positive integer"))?;
        if id == 0 {
            return Err(bad("id is not a positive integer"));
        }
        let (peer, client) = addrs.split_once('@').unwrap_or((addrs, ""));
        if !peer.contains(':') {
            return Err(bad("peer address must be host:port"));
        }
        let node = KordNode {
            peer_addr: peer.trim().to_owned(),
            client_addr: client.trim().to_owned(),
            ..Default::default()
        };
        if members.insert(id, node).is_some() {
            return Err(bad("id listed twice"));
        }
    }
    if members.is_empty() {
        return Err(ConfigError::BadClusterEntry {
            entry: spec.to_owned(),
            reason: "no members",
        });
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        Args::parse_from(std::iter::once("kord").chain(extra.iter().copied()))
    }

    #[test]
    fn no_flags_is_a_single_member_cluster() {
        let c = args(&[]).validate().unwrap();
        assert_eq!(c.data_dir, PathBuf::from("kord-data"));
        assert_eq!(c.listen_client.to_string(), DEFAULT_CLIENT_ADDR);
        let Bootstrap::Initialize(members) = c.bootstrap else {
            panic!()
        };
        assert_eq!(members.len(), 1);
        assert_eq!(members[&1].peer_addr, DEFAULT_PEER_ADDR);
    }

    #[test]
    fn initial_cluster_parses_and_checks() {
        let c = args(&["--id", "2", "--initial-cluster", "1=a:1,2=b:2@b:3,3=c:1"])
            .validate()
            .unwrap();
        let Bootstrap::Initialize(members) = c.bootstrap else {
            panic!()
        };
        assert_eq!(members.len(), 3);
        assert_eq!(members[&2].client_addr, "b:3");
        assert_eq!(c.node.peer_addr, "b:2");
        assert_eq!(
            args(&["--id", "4", "--initial-cluster", "1=a:1"])
                .validate()
                .unwrap_err(),
            ConfigError::SelfMissing(4)
        );
        for bad in ["x=a:1", "0=a:1", "1=nohost", "1=a:1,1=b:2", "1"] {
            assert!(parse_initial_cluster(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn observer_needs_join_and_implies_learner() {
        assert!(Args::try_parse_from(["kord", "--observer"]).is_err());
        let c = args(&["--join", "a:1", "--observer", "--name", "obs-0"])
            .validate()
            .unwrap();
        assert!(c.node.observer);
        assert_eq!(c.node.name, "obs-0");
        assert!(matches!(
            c.bootstrap,
            Bootstrap::Join {
                learner: true,
                observer: true,
                ..
            }
        ));
    }

    #[test]
    fn log_segment_size_has_a_default_and_a_floor() {
        assert_eq!(args(&[]).validate().unwrap().log_segment_size, 32 << 20);
        let c = args(&["--log-segment-size", "4194304"]).validate().unwrap();
        assert_eq!(c.log_segment_size, 4 << 20);
        let err = args(&["--log-segment-size", "4096"])
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("log-segment-size"), "{err}");
        assert!(err.to_string().contains("1048576"), "{err}");
    }

    #[test]
    fn timeouts_are_checked() {
        let err = args(&["--heartbeat-interval", "500ms", "--election-timeout", "1s"]).validate();
        assert!(matches!(err, Err(ConfigError::Timeouts { .. })));
    }
}
