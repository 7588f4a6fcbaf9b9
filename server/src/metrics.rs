//! Prometheus metrics. Counters and histograms are updated where things happen; gauges that
//! mirror Raft and state (term, indexes, znode count) are refreshed from them at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub op: &'static str,
    pub code: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub proposal_seconds: Histogram,
    pub fsync_seconds: Histogram,
    pub snapshots: Counter,
    pub snapshot_bytes: Gauge,
    pub term: Gauge,
    pub leader_id: Gauge,
    pub is_leader: Gauge,
    pub commit_index: Gauge,
    pub applied_index: Gauge,
    pub apply_lag: Gauge,
    pub znodes: Gauge,
    pub claim_wakeups: Counter,
    pub claim_waits_served: Counter,
    pub peer_link_appends: Counter,
    pub watch_streams: Gauge,
    pub watches: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kord");
        // 50 µs to ~3 s.
        let latency = || Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        let m = Metrics {
            requests: Family::default(),
            proposal_seconds: latency(),
            fsync_seconds: latency(),
            snapshots: Counter::default(),
            snapshot_bytes: Gauge::default(),
            term: Gauge::default(),
            leader_id: Gauge::default(),
            is_leader: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            apply_lag: Gauge::default(),
            znodes: Gauge::default(),
            claim_wakeups: Counter::default(),
            claim_waits_served: Counter::default(),
            peer_link_appends: Counter::default(),
            watch_streams: Gauge::default(),
            watches: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Client requests by operation and gRPC status code",
            m.requests.clone(),
        );
        registry.register(
            "proposal_duration_seconds",
            "Time from proposing a write to its apply result",
            m.proposal_seconds.clone(),
        );
        registry.register(
            "fsync_duration_seconds",
            "Time of synced Raft log writes (append, vote, truncate, purge)",
            m.fsync_seconds.clone(),
        );
        registry.register(
            "peer_link_appends",
            "AppendEntries requests received over the peer link (the others came over gRPC)",
            m.peer_link_appends.clone(),
        );
        registry.register(
            "snapshots",
            "Snapshots built by this member",
            m.snapshots.clone(),
        );
        registry.register(
            "snapshot_size_bytes",
            "Size of the last snapshot built",
            m.snapshot_bytes.clone(),
        );
        registry.register("raft_term", "Current Raft term", m.term.clone());
        registry.register(
            "leader_id",
            "Id of the known leader (0: none)",
            m.leader_id.clone(),
        );
        registry.register(
            "is_leader",
            "1 if this member is the leader",
            m.is_leader.clone(),
        );
        registry.register(
            "commit_index",
            "Highest committed log index known here",
            m.commit_index.clone(),
        );
        registry.register(
            "applied_index",
            "Highest log index applied to the state machine",
            m.applied_index.clone(),
        );
        registry.register(
            "apply_lag",
            "commit_index - applied_index",
            m.apply_lag.clone(),
        );
        registry.register(
            "znodes",
            "Number of znodes, the root included",
            m.znodes.clone(),
        );
        registry.register(
            "claim_wakeups",
            "Lock and election waiters woken by their predecessor's deletion",
            m.claim_wakeups.clone(),
        );
        registry.register(
            "claim_waits_served",
            "Lock and election waits that followers forwarded to this member",
            m.claim_waits_served.clone(),
        );
        registry.register(
            "watch_streams",
            "Open watch streams (a client's watches share one)",
            m.watch_streams.clone(),
        );
        registry.register(
            "watches",
            "Watches running on this member",
            m.watches.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn count_request(&self, op: &'static str, code: tonic::Code) {
        self.requests
            .get_or_create(&RequestLabels {
                op,
                code: code_name(code),
            })
            .inc();
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "ok",
        Cancelled => "cancelled",
        Unknown => "unknown",
        InvalidArgument => "invalid_argument",
        DeadlineExceeded => "deadline_exceeded",
        NotFound => "not_found",
        AlreadyExists => "already_exists",
        PermissionDenied => "permission_denied",
        ResourceExhausted => "resource_exhausted",
        FailedPrecondition => "failed_precondition",
        Aborted => "aborted",
        OutOfRange => "out_of_range",
        Unimplemented => "unimplemented",
        Internal => "internal",
        Unavailable => "unavailable",
        DataLoss => "data_loss",
        Unauthenticated => "unauthenticated",
    }
}
