//! The connection to a Kord cluster: one lazy channel per endpoint, a preference for the leader,
//! retries with backoff across endpoints, and the typed znode calls built on them.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use kord_api::v1::cluster_client::ClusterClient;
use kord_api::v1::kv_client::KvClient;
use kord_api::v1::{
    ChildrenRequest, CompactRequest, Consistency, CreateRequest, DeleteRequest, ExistsRequest,
    GetRequest, LeaseGrantRequest, LeaseRevokeRequest, Member, MemberRole, SetRequest, Stat,
    StatusRequest, StatusResponse, TxnRequest, WriteId,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::batch::{Batchable, CallBatcher};
use crate::write_id::WriteTracker;
use crate::{CreateMode, CreateOptions, Created, Error, Op, OpResult, Session};
use kord_api::transport::Channel;

const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(15);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub(crate) const BACKOFF_START: Duration = Duration::from_millis(20);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Leader discovery is only an optimisation, so it must never hold a caller up for long.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(2);
const NO_LEADER: usize = usize::MAX;

/// Configures a [`Client`]. Endpoints are `host:port` or `http://host:port`. Writes,
/// linearizable reads, locks and sessions go to the leader (found by asking the endpoints);
/// watches, local reads and status calls go to an endpoint each client picks at random, and
/// move on to the next one when it fails.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    endpoints: Vec<String>,
    request_timeout: Duration,
    connect_timeout: Duration,
    max_retries: Option<u32>,
    retry_budget: Duration,
    consistency: Consistency,
    auto_sync: Option<Duration>,
    batch_writes: bool,
}

impl ClientBuilder {
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        ClientBuilder {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_retries: None,
            retry_budget: DEFAULT_RETRY_BUDGET,
            consistency: Consistency::Linearizable,
            auto_sync: None,
            batch_writes: true,
        }
    }

    /// Deadline of each attempt (sent to the server as `grpc-timeout` and enforced locally).
    /// Default 5 s.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Whether creates, sets and deletes that callers make at the same moment on one connection
    /// travel together in one `Batch` call (each still succeeds or fails on its own). Default
    /// on: it saves both ends the per-call work. A write made while none is in flight always
    /// goes alone at once.
    pub fn batch_writes(mut self, on: bool) -> Self {
        self.batch_writes = on;
        self
    }

    /// How long to wait for a TCP connection to one endpoint before trying the next. Default 1 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Caps the number of retries of one call. Default: no cap, only the retry budget.
    pub fn max_retries(mut self, retries: u32) -> Self {
        self.max_retries = Some(retries);
        self
    }

    /// Total time one call may spend retrying before its last error is returned. Default 15 s,
    /// enough to ride out a leader election.
    pub fn retry_budget(mut self, budget: Duration) -> Self {
        self.retry_budget = budget;
        self
    }

    /// Consistency of reads that don't name one. Default linearizable.
    pub fn consistency(mut self, consistency: Consistency) -> Self {
        self.consistency = consistency;
        self
    }

    /// Replaces the endpoint list with the cluster's members this often (as
    /// [`Client::sync_endpoints`] does), so that a long-lived client follows members that are
    /// added, replaced or removed (as etcd's `AutoSyncInterval`). Default: never; the list
    /// stays as given.
    pub fn auto_sync_interval(mut self, interval: Duration) -> Self {
        self.auto_sync = Some(interval);
        self
    }

    /// Builds the channels (they connect on first use) and, with several endpoints, asks them
    /// who leads. Fails only on a malformed or empty endpoint list: an unreachable cluster shows
    /// up on the first call instead, so a client can be made before the servers are up.
    pub async fn connect(self) -> Result<Client, Error> {
        let addrs: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if addrs.is_empty() {
            return Err(Error::invalid("no endpoints given"));
        }
        let endpoints = addrs
            .into_iter()
            .map(|addr| EndpointConn::new(&addr, self.connect_timeout))
            .collect::<Result<Vec<_>, Error>>()?;
        // Each client starts on an endpoint of its own choosing, as ZooKeeper's clients shuffle
        // their server list: the watches, local reads and status calls of many clients given
        // the same list then spread over the members instead of all landing on the first.
        let first = rand::random_range(0..endpoints.len());
        let inner = Arc::new(Inner {
            endpoints: RwLock::new(Arc::new(endpoints)),
            leader: AtomicUsize::new(NO_LEADER),
            current: AtomicUsize::new(first),
            discovering: AtomicBool::new(false),
            writes: WriteTracker::new(rand::random_range(1..=u64::MAX)),
            request_timeout: self.request_timeout,
            connect_timeout: self.connect_timeout,
            max_retries: self.max_retries,
            retry_budget: self.retry_budget,
            batch_writes: self.batch_writes,
            watches: std::sync::Mutex::default(),
        });
        if inner.endpoint_list().len() > 1 {
            inner.discover().await;
        }
        if let Some(interval) = self.auto_sync {
            spawn_auto_sync(Arc::downgrade(&inner), interval);
        }
        Ok(Client {
            inner,
            consistency: self.consistency,
        })
    }
}

/// A handle to a Kord cluster. Cloning is cheap and clones share channels, leader knowledge and
/// the write numbering, so one client can serve a whole process.
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    consistency: Consistency,
}

/// One endpoint and its channel; clones share the connection.
#[derive(Debug, Clone)]
pub(crate) struct EndpointConn {
    pub(crate) addr: Arc<str>,
    pub(crate) channel: Channel,
    /// Combines the writes made at the same moment on this connection ([`crate::batch`]).
    pub(crate) batcher: Arc<CallBatcher>,
}

impl EndpointConn {
    fn new(addr: &str, connect_timeout: Duration) -> Result<EndpointConn, Error> {
        Ok(EndpointConn {
            addr: addr.into(),
            channel: lazy_channel(addr, connect_timeout)?,
            batcher: Arc::default(),
        })
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    /// Replaced whole by [`Client::sync_endpoints`]; a call works on the list it picked from.
    endpoints: RwLock<Arc<Vec<EndpointConn>>>,
    /// Index of the leader's endpoint, or `NO_LEADER`. Indexes are into the current list; one
    /// taken from a replaced list may point at another endpoint, which costs at most a
    /// preference or a discovery.
    leader: AtomicUsize,
    /// Endpoint for requests that need no leader, or when the leader is unknown: a random one
    /// at first, advanced past an endpoint when a call to it fails.
    current: AtomicUsize,
    /// Keeps failures from piling up concurrent discoveries.
    discovering: AtomicBool,
    writes: WriteTracker,
    pub(crate) request_timeout: Duration,
    connect_timeout: Duration,
    pub(crate) max_retries: Option<u32>,
    pub(crate) retry_budget: Duration,
    batch_writes: bool,
    /// The task that owns this client's watch stream (started by the first watch), and the
    /// last key given to a watch.
    watches: std::sync::Mutex<(
        Option<mpsc::UnboundedSender<crate::watch_mux::Command>>,
        u64,
    )>,
}

/// What a call is, which decides where it goes and which failures may be retried.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Write,
    Read(Consistency),
    Status,
}

impl Kind {
    fn prefers_leader(self) -> bool {
        matches!(self, Kind::Write | Kind::Read(Consistency::Linearizable))
    }

    /// A write that timed out may have been applied; its outcome is reported rather than
    /// guessed at. Reads have no outcome to lose.
    fn retries_timeouts(self) -> bool {
        !matches!(self, Kind::Write)
    }

    fn is_retryable(self, err: &Error) -> bool {
        match err {
            Error::Unavailable(_) => true,
            Error::Timeout(_) => self.retries_timeouts(),
            _ => false,
        }
    }
}

/// The write requests, which all carry a `WriteId`.
pub(crate) trait WriteRequest: Clone {
    fn set_write_id(&mut self, id: WriteId);
}

macro_rules! write_request {
    ($($t:ty),*) => {$(
        impl WriteRequest for $t {
            fn set_write_id(&mut self, id: WriteId) {
                self.write_id = Some(id);
            }
        }
    )*};
}
write_request!(
    CreateRequest,
    SetRequest,
    DeleteRequest,
    TxnRequest,
    LeaseGrantRequest,
    LeaseRevokeRequest,
    CompactRequest
);

impl Client {
    /// Connects with default settings; see [`ClientBuilder`].
    pub async fn connect(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
    ) -> Result<Client, Error> {
        ClientBuilder::new(endpoints).connect().await
    }

    pub fn builder(endpoints: impl IntoIterator<Item = impl Into<String>>) -> ClientBuilder {
        ClientBuilder::new(endpoints)
    }

    /// The random id under which the server deduplicates this client's writes.
    pub fn client_id(&self) -> u64 {
        self.inner.writes.client_id()
    }

    /// The endpoints as given (trimmed), in order.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner
            .endpoint_list()
            .iter()
            .map(|e| e.addr.to_string())
            .collect()
    }

    /// The endpoint believed to reach the leader, if any is known.
    pub fn leader_endpoint(&self) -> Option<String> {
        let idx = self.inner.leader.load(Ordering::Relaxed);
        self.inner
            .endpoint_list()
            .get(idx)
            .map(|e| e.addr.to_string())
    }

    /// Asks every endpoint who leads now, instead of waiting for a failure to prompt it.
    pub async fn refresh_leader(&self) -> Option<String> {
        let (list, idx) = self.inner.discover().await?;
        list.get(idx).map(|e| e.addr.to_string())
    }

    /// Replaces the endpoint list with the client addresses of the cluster's voters and
    /// observers, as the leader lists them (learners still catching up are left out, as etcd's
    /// `Sync` leaves them out), and returns it. A client given one endpoint then reaches every
    /// member, and one that lives through membership changes reaches the new members and stops
    /// trying removed ones. Endpoints already in the list keep their connections. Fails, and
    /// keeps the list, when the members cannot be listed or none has a client address.
    pub async fn sync_endpoints(&self) -> Result<Vec<String>, Error> {
        let list = self.member_list().await?;
        let addrs = serving_addrs(&list.members);
        if addrs.is_empty() {
            return Err(Error::Unavailable(format!(
                "no member lists a client address: {:?}",
                list.members
            )));
        }
        self.inner.replace_endpoints(&addrs)?;
        Ok(addrs)
    }

    /// Default consistency of this handle's reads.
    pub fn consistency(&self) -> Consistency {
        self.consistency
    }

    /// A handle sharing everything with this one but reading at `consistency` by default.
    pub fn with_consistency(&self, consistency: Consistency) -> Client {
        Client {
            inner: Arc::clone(&self.inner),
            consistency,
        }
    }

    pub async fn create(&self, path: &str, data: impl Into<Vec<u8>>) -> Result<Created, Error> {
        self.create_with(path, data, CreateOptions::default()).await
    }

    /// A persistent node, sequential or not.
    pub async fn create_with(
        &self,
        path: &str,
        data: impl Into<Vec<u8>>,
        options: CreateOptions,
    ) -> Result<Created, Error> {
        self.create_with_mode(path, data, CreateMode::Persistent, options)
            .await
    }

    /// A node of any kind. For an ephemeral node owned by a [`Session`], prefer
    /// [`Client::create_ephemeral`], which refuses an expired session without a round trip.
    pub async fn create_with_mode(
        &self,
        path: &str,
        data: impl Into<Vec<u8>>,
        mode: CreateMode,
        options: CreateOptions,
    ) -> Result<Created, Error> {
        let (lease_id, container, ttl_ms) = mode.to_proto();
        let req = CreateRequest {
            write_id: None,
            path: path.to_owned(),
            data: data.into(),
            sequential: options.sequential,
            lease_id,
            container,
            ttl_ms,
        };
        let resp = self.write_batched(req).await?;
        Ok(resp.into())
    }

    /// An ephemeral node owned by `session`: deleted when the session is closed or expires.
    /// Fails with [`Error::SessionExpired`] without calling the server once the session is
    /// expired, and marks the session expired if the server no longer knows it.
    pub async fn create_ephemeral(
        &self,
        path: &str,
        data: impl Into<Vec<u8>>,
        session: &Session,
    ) -> Result<Created, Error> {
        self.create_in_session(path, data, session, CreateOptions::default())
            .await
    }

    /// [`Client::create_ephemeral`] with a sequence number appended to the name.
    pub async fn create_ephemeral_sequential(
        &self,
        path: &str,
        data: impl Into<Vec<u8>>,
        session: &Session,
    ) -> Result<Created, Error> {
        self.create_in_session(path, data, session, CreateOptions { sequential: true })
            .await
    }

    /// A container node: deleted by the server once its last child is deleted.
    pub async fn create_container(
        &self,
        path: &str,
        data: impl Into<Vec<u8>>,
    ) -> Result<Created, Error> {
        self.create_with_mode(path, data, CreateMode::Container, CreateOptions::default())
            .await
    }

    /// A TTL node: deleted once unmodified for `ttl` and childless.
    pub async fn create_ttl(
        &self,
        path: &str,
        data: impl Into<Vec<u8>>,
        ttl: Duration,
    ) -> Result<Created, Error> {
        self.create_with_mode(path, data, CreateMode::Ttl(ttl), CreateOptions::default())
            .await
    }

    async fn create_in_session(
        &self,
        path: &str,
        data: impl Into<Vec<u8>>,
        session: &Session,
        options: CreateOptions,
    ) -> Result<Created, Error> {
        let id = session.id();
        if session.is_expired() {
            return Err(Error::session_expired(id));
        }
        let result = self
            .create_with_mode(path, data, CreateMode::Ephemeral(id), options)
            .await;
        match result {
            Err(Error::LeaseNotFound { id: gone, .. }) if gone == id => {
                session.mark_expired();
                Err(Error::session_expired(id))
            }
            other => other,
        }
    }

    pub async fn get(&self, path: &str) -> Result<(Vec<u8>, Stat), Error> {
        self.get_with(path, self.consistency).await
    }

    pub async fn get_with(
        &self,
        path: &str,
        consistency: Consistency,
    ) -> Result<(Vec<u8>, Stat), Error> {
        let req = GetRequest {
            path: path.to_owned(),
            consistency: consistency.into(),
        };
        let resp = self
            .read(consistency, req, |ch, r| async move {
                KvClient::new(ch).get(r).await
            })
            .await?;
        Ok((resp.data, resp.stat.unwrap_or_default()))
    }

    /// Replaces the data; with `expected_version`, only if the node's version equals it.
    pub async fn set(
        &self,
        path: &str,
        data: impl Into<Vec<u8>>,
        expected_version: Option<i32>,
    ) -> Result<Stat, Error> {
        let req = SetRequest {
            write_id: None,
            path: path.to_owned(),
            data: data.into(),
            expected_version,
        };
        let resp = self.write_batched(req).await?;
        Ok(resp.stat.unwrap_or_default())
    }

    pub async fn delete(&self, path: &str, expected_version: Option<i32>) -> Result<(), Error> {
        let req = DeleteRequest {
            write_id: None,
            path: path.to_owned(),
            expected_version,
        };
        self.write_batched(req).await?;
        Ok(())
    }

    /// The node's stat, or `None` when it does not exist.
    pub async fn exists(&self, path: &str) -> Result<Option<Stat>, Error> {
        self.exists_with(path, self.consistency).await
    }

    pub async fn exists_with(
        &self,
        path: &str,
        consistency: Consistency,
    ) -> Result<Option<Stat>, Error> {
        let req = ExistsRequest {
            path: path.to_owned(),
            consistency: consistency.into(),
        };
        let resp = self
            .read(consistency, req, |ch, r| async move {
                KvClient::new(ch).exists(r).await
            })
            .await?;
        Ok(resp.stat)
    }

    /// Names (not paths) of the children, sorted bytewise.
    pub async fn children(&self, path: &str) -> Result<Vec<String>, Error> {
        self.children_with(path, self.consistency).await
    }

    pub async fn children_with(
        &self,
        path: &str,
        consistency: Consistency,
    ) -> Result<Vec<String>, Error> {
        let req = ChildrenRequest {
            path: path.to_owned(),
            consistency: consistency.into(),
            with_stats: false,
        };
        let resp = self
            .read(consistency, req, |ch, r| async move {
                KvClient::new(ch).children(r).await
            })
            .await?;
        Ok(resp.names)
    }

    /// Children's names with their stats, sorted bytewise by name.
    pub async fn children_with_stats(&self, path: &str) -> Result<Vec<(String, Stat)>, Error> {
        let consistency = self.consistency;
        let req = ChildrenRequest {
            path: path.to_owned(),
            consistency: consistency.into(),
            with_stats: true,
        };
        let resp = self
            .read(consistency, req, |ch, r| async move {
                KvClient::new(ch).children(r).await
            })
            .await?;
        if resp.stats.len() != resp.names.len() {
            return Err(Error::protocol(format!(
                "server listed {} children of {path} but {} stats",
                resp.names.len(),
                resp.stats.len()
            )));
        }
        Ok(resp.names.into_iter().zip(resp.stats).collect())
    }

    /// Applies all ops or none. On failure, [`Error::failed_op`] names the failing op's index.
    pub async fn txn(&self, ops: Vec<Op>) -> Result<Vec<OpResult>, Error> {
        let req = TxnRequest {
            write_id: None,
            ops: ops.into_iter().map(Into::into).collect(),
        };
        let resp = self
            .write(req, |ch, r| async move { KvClient::new(ch).txn(r).await })
            .await?;
        resp.results.into_iter().map(OpResult::try_from).collect()
    }

    /// Forgets the events of every revision up to and including `revision`, on every member:
    /// watches can no longer start at or below it. Returns the compaction point afterwards
    /// (which never moves backwards, so it may exceed `revision`).
    pub async fn compact(&self, revision: u64) -> Result<u64, Error> {
        let req = CompactRequest {
            write_id: None,
            revision,
        };
        let resp = self
            .write(
                req,
                |ch, r| async move { KvClient::new(ch).compact(r).await },
            )
            .await?;
        Ok(resp.compacted_revision)
    }

    /// The cluster as some reachable endpoint sees it.
    pub async fn status(&self) -> Result<StatusResponse, Error> {
        self.call(Kind::Status, |ch| {
            let mut cluster = ClusterClient::new(ch);
            let req = self.inner.request(StatusRequest {});
            async move { cluster.status(req).await }
        })
        .await
    }

    /// The cluster as one given endpoint (`host:port`) sees it, with a single attempt: for
    /// inspecting a particular member, where an answer from another would be misleading.
    pub async fn status_of(&self, endpoint: &str) -> Result<StatusResponse, Error> {
        let list = self.inner.endpoint_list();
        let known = list.iter().find(|e| same_addr(&e.addr, endpoint));
        let channel = match known {
            Some(e) => e.channel.clone(),
            None => lazy_channel(endpoint, self.inner.connect_timeout)?,
        };
        let mut cluster = ClusterClient::new(channel);
        let req = self.inner.request(StatusRequest {});
        self.inner.attempt(endpoint, cluster.status(req)).await
    }

    /// A write of any service: every attempt carries the same `WriteId`.
    pub(crate) async fn write<Req, T, F, Fut>(&self, req: Req, mut send: F) -> Result<T, Error>
    where
        Req: WriteRequest,
        F: FnMut(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.write_on(req, |endpoint, r| send(endpoint.channel.clone(), r))
            .await
    }

    /// A create, set or delete, in a batch with the writes other callers make at the same
    /// moment on the same connection, if any ([`crate::batch`]).
    pub(crate) async fn write_batched<Req: Batchable>(
        &self,
        req: Req,
    ) -> Result<Req::Response, Error> {
        self.write_on(req, |endpoint, request| {
            let channel = endpoint.channel.clone();
            let batcher = self.inner.batch_writes.then(|| endpoint.batcher.clone());
            async move {
                match batcher {
                    Some(batcher) => batcher.submit(channel, request).await,
                    None => Req::send_alone(channel, request).await,
                }
            }
        })
        .await
    }

    /// [`Client::write`] with the whole endpoint (its connection and batcher) for each attempt.
    async fn write_on<Req, T, F, Fut>(&self, req: Req, mut send: F) -> Result<T, Error>
    where
        Req: WriteRequest,
        F: FnMut(&EndpointConn, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let pending = self.inner.writes.begin();
        self.call_on(Kind::Write, |endpoint| {
            let mut req = req.clone();
            req.set_write_id(pending.write_id());
            send(endpoint, self.inner.request(req))
        })
        .await
    }

    pub(crate) async fn read<Req, T, F, Fut>(
        &self,
        consistency: Consistency,
        req: Req,
        mut send: F,
    ) -> Result<T, Error>
    where
        Req: Clone,
        F: FnMut(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.call(Kind::Read(consistency), |ch| {
            send(ch, self.inner.request(req.clone()))
        })
        .await
    }

    /// Runs `attempt` against a chosen endpoint until it succeeds, fails for good, or the retry
    /// budget runs out; each retry goes to another endpoint, after a growing pause.
    pub(crate) async fn call<T, F, Fut>(&self, kind: Kind, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        self.call_on(kind, |endpoint| attempt(endpoint.channel.clone()))
            .await
    }

    /// [`Client::call`] with the whole endpoint (its connection and batcher) for each attempt.
    pub(crate) async fn call_on<T, F, Fut>(&self, kind: Kind, mut attempt: F) -> Result<T, Error>
    where
        F: FnMut(&EndpointConn) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let inner = &self.inner;
        let started = Instant::now();
        let mut backoff = BACKOFF_START;
        let mut retries: u32 = 0;
        loop {
            let (idx, endpoint) = inner.pick(kind.prefers_leader());
            let err = match inner.attempt(&endpoint.addr, attempt(&endpoint)).await {
                Ok(resp) => return Ok(resp),
                Err(err) => err,
            };
            if !kind.is_retryable(&err) {
                return Err(err);
            }
            inner.note_failure(idx);
            let capped = inner.max_retries.is_some_and(|max| retries >= max);
            if capped || started.elapsed() + backoff >= inner.retry_budget {
                return Err(err);
            }
            tracing::debug!(endpoint = %endpoint.addr, error = %err, ?kind, "retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            retries += 1;
        }
    }
}

impl Inner {
    pub(crate) fn request<T>(&self, message: T) -> Request<T> {
        let mut req = Request::new(message);
        req.set_timeout(self.request_timeout);
        req
    }

    /// One attempt, bounded locally too: `grpc-timeout` alone would not cover a server that
    /// never answers at the HTTP/2 level.
    pub(crate) async fn attempt<T>(
        &self,
        addr: &str,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            // Name the endpoint: transport messages like "connection refused" don't.
            Ok(Err(status)) => Err(match Error::from_status(&status) {
                Error::Unavailable(m) => Error::Unavailable(format!("{addr}: {m}")),
                Error::Timeout(m) => Error::Timeout(format!("{addr}: {m}")),
                err => err,
            }),
            Err(_) => Err(Error::Timeout(format!(
                "{addr}: no reply within {}",
                humantime::format_duration(self.request_timeout)
            ))),
        }
    }

    /// The channel to this client's watch task, started if it is not running (first watch,
    /// or its runtime has gone), and a new key for a watch.
    pub(crate) fn watch_mux(
        self: &Arc<Self>,
    ) -> (mpsc::UnboundedSender<crate::watch_mux::Command>, u64) {
        let mut watches = self.watches.lock().expect("watch task lock poisoned");
        let (mux, last_key) = &mut *watches;
        let tx = match mux {
            Some(tx) if !tx.is_closed() => tx.clone(),
            _ => mux
                .insert(crate::watch_mux::spawn(
                    Arc::downgrade(self),
                    self.request_timeout,
                ))
                .clone(),
        };
        *last_key += 1;
        (tx, *last_key)
    }

    /// The current endpoint list.
    pub(crate) fn endpoint_list(&self) -> Arc<Vec<EndpointConn>> {
        Arc::clone(&self.endpoints.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The endpoint for the next attempt, and its index (for [`Inner::note_failure`]).
    pub(crate) fn pick(&self, prefer_leader: bool) -> (usize, EndpointConn) {
        let list = self.endpoint_list();
        let n = list.len();
        let leader = self.leader.load(Ordering::Relaxed);
        let idx = if prefer_leader && leader < n {
            leader
        } else {
            self.current.load(Ordering::Relaxed) % n
        };
        (idx, list[idx].clone())
    }

    /// Stops preferring a failed endpoint and relearns the leader in the background. The
    /// compare-exchanges make concurrent failures of one endpoint advance past it only once.
    pub(crate) fn note_failure(self: &Arc<Self>, idx: usize) {
        let n = self.endpoint_list().len();
        let _ = self
            .leader
            .compare_exchange(idx, NO_LEADER, Ordering::Relaxed, Ordering::Relaxed);
        let _ =
            self.current
                .compare_exchange(idx, (idx + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
        if n > 1 {
            self.spawn_discovery();
        }
    }

    fn spawn_discovery(self: &Arc<Self>) {
        if self.discovering.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.discovering.store(false, Ordering::Release);
            return;
        };
        let inner = Arc::clone(self);
        runtime.spawn(async move {
            inner.discover().await;
            inner.discovering.store(false, Ordering::Release);
        });
    }

    /// Asks every endpoint for its status at once and records which one reaches the leader
    /// (unless the list was replaced meanwhile). Also moves `current` off an endpoint that did
    /// not answer. Returns the list it asked and the leader's index in it.
    async fn discover(&self) -> Option<(Arc<Vec<EndpointConn>>, usize)> {
        let timeout = self.request_timeout.min(DISCOVERY_TIMEOUT);
        let list = self.endpoint_list();
        // Spawned rather than awaited in place so the endpoints are asked concurrently.
        let asks: Vec<_> = list
            .iter()
            .map(|e| {
                let mut cluster = ClusterClient::new(e.channel.clone());
                tokio::spawn(async move {
                    let mut req = Request::new(StatusRequest {});
                    req.set_timeout(timeout);
                    let reply = tokio::time::timeout(timeout, cluster.status(req)).await;
                    reply.ok()?.ok().map(Response::into_inner)
                })
            })
            .collect();
        let mut replies: Vec<Option<StatusResponse>> = Vec::with_capacity(asks.len());
        for ask in asks {
            replies.push(ask.await.ok().flatten());
        }
        let addrs: Vec<&str> = list.iter().map(|e| &*e.addr).collect();
        let leader = find_leader(&addrs, &replies);
        // Under the lock that a replacement takes to write, so indexes found in a replaced
        // list are not stored.
        let current_list = self.endpoints.read().unwrap_or_else(|e| e.into_inner());
        if Arc::ptr_eq(&current_list, &list) {
            if let Some(idx) = leader {
                self.leader.store(idx, Ordering::Relaxed);
            }
            let current = self.current.load(Ordering::Relaxed) % list.len();
            if replies[current].is_none() {
                if let Some(alive) = replies.iter().position(Option::is_some) {
                    self.current.store(alive, Ordering::Relaxed);
                }
            }
        }
        drop(current_list);
        leader.map(|idx| (list, idx))
    }

    /// Makes `addrs` the endpoint list, keeping the channels of endpoints already in it, and
    /// carries the leader and current endpoint over by address.
    fn replace_endpoints(&self, addrs: &[String]) -> Result<(), Error> {
        let old = self.endpoint_list();
        let new: Vec<EndpointConn> = addrs
            .iter()
            .map(|addr| match old.iter().find(|e| same_addr(&e.addr, addr)) {
                Some(known) => Ok(EndpointConn {
                    addr: addr.as_str().into(),
                    channel: known.channel.clone(),
                    batcher: known.batcher.clone(),
                }),
                None => EndpointConn::new(addr, self.connect_timeout),
            })
            .collect::<Result<_, Error>>()?;
        let mut list = self.endpoints.write().unwrap_or_else(|e| e.into_inner());
        let position_of = |idx: usize| {
            let addr = &list.get(idx)?.addr;
            new.iter().position(|e| same_addr(&e.addr, addr))
        };
        let leader = position_of(self.leader.load(Ordering::Relaxed)).unwrap_or(NO_LEADER);
        let current = position_of(self.current.load(Ordering::Relaxed) % list.len())
            .unwrap_or_else(|| rand::random_range(0..new.len()));
        self.leader.store(leader, Ordering::Relaxed);
        self.current.store(current, Ordering::Relaxed);
        *list = Arc::new(new);
        Ok(())
    }
}

/// Syncs the endpoint list every `interval` for as long as the client lives (see
/// [`ClientBuilder::auto_sync_interval`]). A failed sync keeps the list and is tried again at
/// the next tick.
fn spawn_auto_sync(inner: Weak<Inner>, interval: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let client = Client {
                inner,
                consistency: Consistency::Linearizable,
            };
            match client.sync_endpoints().await {
                Ok(addrs) => tracing::debug!(?addrs, "endpoints synced"),
                Err(e) => tracing::debug!(error = %e, "endpoint sync failed; keeping the list"),
            }
        }
    });
}

/// Picks the endpoint that reaches the leader named by the most recent term among `replies`
/// (one per endpoint, `None` where it did not answer). An endpoint that answered as the leader
/// itself is the surest match; otherwise the leader's advertised client address is looked up.
fn find_leader(addrs: &[&str], replies: &[Option<StatusResponse>]) -> Option<usize> {
    let best = replies
        .iter()
        .flatten()
        .filter(|r| r.leader_id != 0)
        .max_by_key(|r| r.raft_term)?;
    let leader_id = best.leader_id;
    if let Some(idx) = replies
        .iter()
        .position(|r| r.as_ref().is_some_and(|r| r.member_id == leader_id))
    {
        return Some(idx);
    }
    let member = best.members.iter().find(|m| m.id == leader_id)?;
    addrs
        .iter()
        .position(|addr| same_addr(addr, &member.client_addr))
}

/// The client addresses of the members a client should use: voters and observers that
/// publish one it can connect to (a member listening on `0.0.0.0` without
/// `--advertise-client` publishes that, which names no host).
fn serving_addrs(members: &[Member]) -> Vec<String> {
    members
        .iter()
        .filter(|m| m.role != MemberRole::Learner as i32)
        .map(|m| m.client_addr.trim())
        .filter(|addr| !addr.is_empty() && !names_no_host(addr))
        .map(str::to_owned)
        .collect()
}

fn names_no_host(addr: &str) -> bool {
    strip_scheme(addr)
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_unspecified())
}

fn strip_scheme(addr: &str) -> &str {
    let addr = addr.trim().trim_end_matches('/');
    addr.split_once("://").map_or(addr, |(_, rest)| rest)
}

fn same_addr(a: &str, b: &str) -> bool {
    strip_scheme(a).eq_ignore_ascii_case(strip_scheme(b))
}

fn lazy_channel(addr: &str, connect_timeout: Duration) -> Result<Channel, Error> {
    Channel::lazy(addr, connect_timeout)
        .map_err(|e| Error::invalid(format!("bad endpoint {addr:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(member_id: u64, leader_id: u64, term: u64, leader_addr: &str) -> StatusResponse {
        StatusResponse {
            member_id,
            leader_id,
            raft_term: term,
            members: vec![Member {
                id: leader_id,
                client_addr: leader_addr.to_owned(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn leader_found_by_self_report_or_address() {
        let addrs = ["a:1", "b:1", "c:1"];
        let replies = [
            Some(status(1, 2, 5, "x:9")),
            None,
            Some(status(3, 2, 5, "x:9")),
        ];
        // Nobody reachable reported being member 2; its address is not in the list.
        assert_eq!(find_leader(&addrs, &replies), None);

        let replies = [Some(status(1, 2, 5, "http://c:1")), None, None];
        assert_eq!(find_leader(&addrs, &replies), Some(2));

        let replies = [None, Some(status(2, 2, 5, "0.0.0.0:1")), None];
        assert_eq!(find_leader(&addrs, &replies), Some(1));
    }

    #[test]
    fn newest_term_wins_and_no_leader_is_none() {
        let addrs = ["a:1", "b:1"];
        let replies = [Some(status(1, 1, 3, "a:1")), Some(status(2, 2, 4, "b:1"))];
        assert_eq!(find_leader(&addrs, &replies), Some(1));
        let replies = [Some(status(1, 0, 3, "")), None];
        assert_eq!(find_leader(&addrs, &replies), None);
    }

    #[test]
    fn synced_endpoints_are_voters_and_observers_with_an_address() {
        let member = |id: u64, role: MemberRole, addr: &str| Member {
            id,
            role: role as i32,
            client_addr: addr.to_owned(),
            ..Member::default()
        };
        let members = [
            member(1, MemberRole::Voter, "10.0.0.1:7379"),
            member(2, MemberRole::Learner, "10.0.0.2:7379"),
            member(3, MemberRole::Observer, " 10.0.0.3:7379 "),
            member(4, MemberRole::Voter, ""),
            member(5, MemberRole::Voter, "0.0.0.0:7379"),
            member(6, MemberRole::Voter, "http://[::]:7379"),
            member(7, MemberRole::Voter, "kord-7.kord.svc:7379"),
        ];
        assert_eq!(
            serving_addrs(&members),
            ["10.0.0.1:7379", "10.0.0.3:7379", "kord-7.kord.svc:7379"]
        );
    }

    #[test]
    fn retry_policy() {
        let timeout = Error::Timeout("t".into());
        let unavailable = Error::Unavailable("u".into());
        let bad = Error::BadVersion {
            message: "v".into(),
            failed_op: None,
        };
        assert!(Kind::Write.is_retryable(&unavailable));
        assert!(!Kind::Write.is_retryable(&timeout));
        assert!(Kind::Read(Consistency::Local).is_retryable(&timeout));
        assert!(!Kind::Read(Consistency::Linearizable).is_retryable(&bad));
        assert!(Kind::Read(Consistency::Linearizable).prefers_leader());
        assert!(!Kind::Read(Consistency::Local).prefers_leader());
    }
}
