//! Wires the layers together and runs a member until shutdown: storage → Raft → proposal →
//! gRPC (client and peer) and HTTP. Tests and `main.rs` both call [`run`].

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::{Stream, TryStreamExt};
use kord_api::coalesce::CoalescedWrites;
use kord_api::peer::peer_server::PeerServer;
use kord_api::v1::cluster_client::ClusterClient;
use kord_api::v1::cluster_server::ClusterServer;
use kord_api::v1::election_server::ElectionServer;
use kord_api::v1::kv_server::KvServer;
use kord_api::v1::lease_server::LeaseServer;
use kord_api::v1::lock_server::LockServer;
use kord_api::v1::AddMemberRequest;
use kord_api::v1::{MemberListRequest, MemberRole};
use kord_api::watch_wire::watch_server::WatchServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::claims::Claims;
use crate::config::{Bootstrap, Config};
use crate::grpc::cluster::ClusterService;
use crate::grpc::kv::KvService;
use crate::grpc::lease::LeaseService;
use crate::grpc::lock::LockService;
use crate::grpc::watch::WatchService;
use crate::http::{self, HttpContext};
use crate::liveness::Liveness;
use crate::membership::{Membership, Settings};
use crate::metrics::Metrics;
use crate::proposal::Proposer;
use crate::raft::link::{accept_peer_port, LinkServer};
use crate::raft::network::{NetworkFactory, PeerChannels, MAX_PEER_MESSAGE_BYTES};
use crate::raft::peer_service::{PeerService, RaftGate};
use crate::raft::peers::PeerGuard;
use crate::raft::Raft;
use crate::storage::events::EventLog;
use crate::storage::{self, LogStore, StateMachineStore};
use crate::watch::WatchContext;

/// How long a stopping member waits for open client streams to end before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Runs a member until `shutdown` resolves, then stops Raft and the listeners.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let metrics = Arc::new(Metrics::new());
    let db = storage::open_db(&config.data_dir.join("db"))
        .with_context(|| format!("opening RocksDB in {}", config.data_dir.display()))?;
    let log_store = LogStore::open(
        db.clone(),
        &config.data_dir.join("raft-log"),
        config.log_segment_size,
        metrics.clone(),
    )?;
    let committed = log_store.committed_index();
    let sm = StateMachineStore::open(db.clone(), &config.data_dir, metrics.clone())?;
    let event_log = EventLog::new(db, sm.written());
    let state = sm.shared();
    let hub = sm.hub();

    let raft_config = openraft::Config {
        cluster_name: "kord".into(),
        heartbeat_interval: config.heartbeat_interval.as_millis() as u64,
        election_timeout_min: config.election_timeout.as_millis() as u64,
        election_timeout_max: config.election_timeout.as_millis() as u64 * 2,
        install_snapshot_timeout: 10_000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_count),
        max_in_snapshot_log_to_keep: config.snapshot_catchup_entries,
        // An entry holds a batch of commands (up to ~1 MiB, or one larger command): fewer
        // entries per AppendEntries than openraft's 300 keep a message under the peer limit.
        max_payload_entries: 32,
        ..Default::default()
    }
    .validate()
    .context("raft configuration")?;
    let channels = PeerChannels::default();
    let guard = PeerGuard::new(config.id);
    let network = NetworkFactory {
        channels: channels.clone(),
        guard: guard.clone(),
        links: config.peer_link,
    };
    // The snapshot trigger reads the log's size; Raft owns the store itself.
    let log_for_snapshots = log_store.clone();
    let raft = Raft::new(config.id, Arc::new(raft_config), network, log_store, sm)
        .await
        .context("starting raft")?;

    let client_listener = bind(config.listen_client, "client").await?;
    let peer_listener = bind(config.listen_peer, "peer").await?;
    let http_listener = bind(config.listen_http, "http").await?;

    bootstrap(&config, &raft, &guard).await?;

    let proposer = Proposer::new(
        config.id,
        raft.clone(),
        channels.clone(),
        metrics.clone(),
        config.election_timeout * 3,
        config.batching,
    );
    let membership = Membership::new(
        raft.clone(),
        state.clone(),
        proposer.clone(),
        channels,
        guard.clone(),
        Settings {
            max_lag: config.member_max_lag,
            election_timeout: config.election_timeout,
        },
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };

    let kv = KvService {
        id: config.id,
        raft: raft.clone(),
        proposer: proposer.clone(),
        state: state.clone(),
        limits: config.limits,
        metrics: metrics.clone(),
    };
    let cluster = ClusterService {
        id: config.id,
        raft: raft.clone(),
        state: state.clone(),
        committed: committed.clone(),
        membership: membership.clone(),
    };
    let liveness = Liveness::new(
        config.id,
        raft.clone(),
        state.clone(),
        proposer.clone(),
        config.reap_interval,
        config.event_retention,
    );
    let claims = Claims::new(
        proposer.clone(),
        state.clone(),
        hub.clone(),
        metrics.clone(),
    );
    let lock = LockService {
        id: config.id,
        raft: raft.clone(),
        claims: claims.clone(),
        metrics: metrics.clone(),
    };
    let watch = WatchService {
        id: config.id,
        raft: raft.clone(),
        ctx: Arc::new(WatchContext {
            hub: hub.clone(),
            log: event_log,
            progress_interval: config.watch_progress_interval,
            running: metrics.watches.clone(),
        }),
        stream_buffer: config.watch_buffer,
        metrics: metrics.clone(),
    };
    let lease = LeaseService {
        id: config.id,
        raft: raft.clone(),
        proposer: proposer.clone(),
        liveness: liveness.clone(),
        state: state.clone(),
        limits: config.limits,
        metrics: metrics.clone(),
    };
    let max_request = config.limits.max_request_bytes;
    let client_server = tonic::transport::Server::builder()
        .add_service(KvServer::new(kv).max_decoding_message_size(max_request))
        .add_service(ClusterServer::new(cluster))
        .add_service(LeaseServer::new(lease))
        .add_service(WatchServer::new(watch))
        .add_service(LockServer::new(lock.clone()))
        .add_service(ElectionServer::new(lock))
        .serve_with_incoming_shutdown(incoming(client_listener), stopped(stop_rx.clone()));
    let gate = RaftGate {
        id: config.id,
        membership: membership.clone(),
        guard: guard.clone(),
    };
    let links = config.peer_link.then(|| LinkServer {
        raft: raft.clone(),
        gate: gate.clone(),
        metrics: metrics.clone(),
    });
    let peer = PeerService {
        gate,
        raft: raft.clone(),
        proposer,
        liveness: liveness.clone(),
        membership: membership.clone(),
        claims,
    };
    let peer_server = tonic::transport::Server::builder()
        .add_service(
            PeerServer::new(peer)
                .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(
            accept_peer_port(peer_listener, links, stop_rx.clone()),
            stopped(stop_rx.clone()),
        );
    let http_ctx = HttpContext {
        raft: raft.clone(),
        state,
        committed,
        metrics,
    };
    let client_task = tokio::spawn(client_server);
    let peer_task = tokio::spawn(peer_server);
    let liveness_task = tokio::spawn(liveness.run(stop_rx.clone()));
    tokio::spawn(crate::raft::split_vote::run(
        raft.clone(),
        config.id,
        config.election_timeout,
        stop_rx.clone(),
    ));
    let snapshot_task = tokio::spawn(crate::raft::snapshot_trigger::run(
        raft.clone(),
        log_for_snapshots,
        config.snapshot_log_bytes,
        stop_rx.clone(),
    ));
    let http_task = tokio::spawn(http::serve(http_listener, http_ctx, stop_rx));
    tracing::info!(
        member = config.id,
        client = %config.listen_client,
        peer = %config.listen_peer,
        http = %config.listen_http,
        data_dir = %config.data_dir.display(),
        "kord is serving"
    );

    // A Raft core that stopped on its own (a storage error or a bug) cannot serve: exit so a
    // supervisor restarts the member from its durable state, instead of answering errors.
    // A member removed from the cluster exits too: its id is never accepted again.
    let fatal = tokio::select! {
        _ = shutdown => None,
        reason = raft_stopped(&raft) => Some(format!("raft stopped: {reason}")),
        reason = membership.removed(state_checks()) => {
            tracing::error!(member = config.id, %reason, "removed from the cluster; stopping");
            Some(reason)
        }
    };
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "raft shutdown");
    }
    // Open streams (watches, keep-alives, observers) never end by themselves, and the
    // listeners' graceful shutdown waits for them: after a grace period the connections are
    // dropped (clients resume elsewhere).
    let grace = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    for task in [client_task, peer_task] {
        let abort = task.abort_handle();
        match tokio::time::timeout_at(grace, task).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "server ended with an error"),
            Ok(_) => {}
            Err(_) => {
                tracing::info!(grace = ?SHUTDOWN_GRACE, "dropping connections still open after the grace period");
                abort.abort();
            }
        }
    }
    let _ = http_task.await;
    let _ = liveness_task.await;
    let _ = snapshot_task.await;
    match fatal {
        None => Ok(()),
        Some(reason) => Err(anyhow::anyhow!(reason)),
    }
}

/// How often the main task looks whether the Raft core stopped or this member was removed.
const STATE_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// The main task's periodic look at the Raft core and the applied state. Polled, not woken by
/// openraft's metrics channel: that changes several times per write, and the main task runs
/// on the main thread, which every change would wake.
fn state_checks() -> tokio::time::Interval {
    let mut checks = tokio::time::interval(STATE_CHECK_INTERVAL);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    checks
}

/// Resolves when the Raft core reports a fatal error or is gone.
async fn raft_stopped(raft: &Raft) -> String {
    let metrics = raft.metrics();
    let mut checks = state_checks();
    loop {
        checks.tick().await;
        if let Err(e) = &metrics.borrow().running_state {
            tracing::error!(error = %e, "raft stopped");
            return e.to_string();
        }
        if metrics.has_changed().is_err() {
            return "raft metrics closed".into();
        }
    }
}

/// Accepted connections with Nagle's algorithm off (tonic's `tcp_nodelay` setting does not
/// reach connections from `serve_with_incoming*`: without this, small replies wait ~40 ms for
/// the peer's delayed ACK), and replies that complete together written together.
fn incoming(
    listener: TcpListener,
) -> impl Stream<Item = std::io::Result<CoalescedWrites<tokio::net::TcpStream>>> {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map_ok(CoalescedWrites::new)
}

/// The next connection on `listener`, or `None` once `stop` changes. A failed accept (out of
/// file descriptors and the like) is logged and retried after a pause rather than in a spin.
pub(crate) async fn accept_until_stopped(
    listener: &TcpListener,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    what: &str,
) -> Option<tokio::net::TcpStream> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => return Some(stream),
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a {what} connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return None,
        }
    }
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} listener on {addr}"))
}

/// Initializes a new cluster or asks to join one. Never touches a member that has state:
/// restarting on existing data resumes it.
async fn bootstrap(config: &Config, raft: &Raft, guard: &Arc<PeerGuard>) -> anyhow::Result<()> {
    if raft.is_initialized().await? {
        tracing::info!(member = config.id, "resuming from existing data");
        return Ok(());
    }
    match &config.bootstrap {
        Bootstrap::Initialize(members) => {
            tracing::info!(member = config.id, voters = ?members.keys().collect::<Vec<_>>(), "initializing a new cluster");
            if let Err(e) = raft.initialize(members.clone()).await {
                // Another member's membership entry reached us first: nothing to do.
                tracing::info!(error = %e, "not initializing");
            }
        }
        Bootstrap::Join {
            endpoint,
            learner,
            observer,
        } => {
            // No Raft traffic until the cluster has added this member (see PeerGuard).
            guard.set_joining(true);
            let request = AddMemberRequest {
                id: config.id,
                peer_addr: config.node.peer_addr.clone(),
                client_addr: config.node.client_addr.clone(),
                learner_only: *learner,
                observer: *observer,
                name: config.node.name.clone(),
                ..Default::default()
            };
            tokio::spawn(join(endpoint.clone(), request, raft.clone(), guard.clone()));
        }
    }
    Ok(())
}

/// Asks the cluster to add this member, retrying (bounded) until it answers. A refusal for
/// good (the id is in use, was removed, or is a voter's whose data is gone) stops the member.
///
/// Always as a learner first: until that answer this member takes no Raft traffic, so a voter
/// that lost its data cannot vote before the cluster refuses it. A voter-to-be then asks again
/// without `learner_only` (add is idempotent for its learner; the leader waits until it caught
/// up and promotes it).
async fn join(endpoint: String, request: AddMemberRequest, raft: Raft, guard: Arc<PeerGuard>) {
    let as_learner = AddMemberRequest {
        learner_only: true,
        ..request.clone()
    };
    if !ask_to_join(&endpoint, &as_learner, None, &guard).await {
        return;
    }
    guard.set_joining(false);
    if !request.learner_only {
        ask_to_join(&endpoint, &request, Some(&raft), &guard).await;
    }
}

/// One join request, retried (bounded) until answered. True once the cluster has added it.
/// `raft` is `None` for the first, learner request: this member takes no Raft traffic yet, so
/// it asks the cluster's member list whether it is already listed. For the promotion request
/// it is this member's Raft, to stop early once it sees itself a voter (a reply lost after
/// promotion).
async fn ask_to_join(
    endpoint: &str,
    request: &AddMemberRequest,
    raft: Option<&Raft>,
    guard: &PeerGuard,
) -> bool {
    const ATTEMPTS: u32 = 60;
    for attempt in 1..=ATTEMPTS {
        if raft.is_some_and(|r| raft_lists(r, request.id, request.learner_only)) {
            tracing::info!(%endpoint, "this member is in the cluster's membership");
            return true;
        }
        let result = async {
            let mut client = ClusterClient::connect(format!("http://{endpoint}")).await?;
            if raft.is_none() {
                // Added already (an operator's AddMember or Replace, which waits for this
                // member to catch up and holds the one change slot meanwhile)?
                let list = client.member_list(MemberListRequest {}).await?.into_inner();
                let me = list
                    .members
                    .iter()
                    .find(|m| m.id == request.id && m.peer_addr == request.peer_addr);
                match me.map(|m| m.role()) {
                    Some(MemberRole::Voter) => return Ok(Listed::AsVoter),
                    Some(_) => return Ok(Listed::AsNonVoter),
                    None => {}
                }
            }
            client.add_member(request.clone()).await?;
            anyhow::Ok(Listed::AsNonVoter)
        }
        .await;
        let result = match result {
            Ok(Listed::AsVoter) => {
                guard.removed(format!(
                    "member {} is a voter of the cluster but started with no data: it has lost \
                     its data, and a voter never rejoins without it; remove it and add a member \
                     with a new id",
                    request.id
                ));
                return false;
            }
            Ok(Listed::AsNonVoter) => Ok(()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                tracing::info!(%endpoint, learner_only = request.learner_only, "joined the cluster");
                return true;
            }
            // Refused for good (an id in use or removed): retrying cannot help.
            Err(e)
                if e.downcast_ref::<tonic::Status>().is_some_and(|s| {
                    matches!(
                        s.code(),
                        tonic::Code::AlreadyExists | tonic::Code::InvalidArgument
                    )
                }) =>
            {
                guard.removed(format!("the cluster refused to add this member: {e}"));
                return false;
            }
            Err(e) => tracing::warn!(%endpoint, attempt, error = %e, "join failed; retrying"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::error!(%endpoint, "gave up joining after {ATTEMPTS} attempts");
    false
}

/// How the cluster lists a member that asks to join.
enum Listed {
    AsVoter,
    AsNonVoter,
}

/// Whether `id` is in this member's membership (as a voter unless `learner_only`).
fn raft_lists(raft: &Raft, id: crate::raft::NodeId, learner_only: bool) -> bool {
    let metrics = raft.metrics();
    let m = metrics.borrow();
    let membership = m.membership_config.membership();
    membership.get_node(&id).is_some() && (learner_only || membership.voter_ids().any(|v| v == id))
}
