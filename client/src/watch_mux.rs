//! One gRPC watch stream per [`Client`](crate::Client), carrying all of its watches, as etcd's
//! clients do: a revision that reaches many watches of one process costs the server one write
//! to the connection instead of one per watch, and the process one read.
//!
//! A single task owns the stream. It routes each server message by watch id to that watch's
//! [`Tracker`] and consumer channel, re-creates every watch (each from its own resume revision)
//! when the stream fails, and keeps one consumer that stops reading from holding up the others:
//! a watch whose channel is full is canceled on the server and created again, from the revision
//! after its last delivered one, once its consumer has room.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::Weak;

use futures::FutureExt;
use kord_api::v1::watch_client::WatchClient;
use kord_api::v1::{
    watch_request, WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest,
    WatchResponse,
};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Request, Streaming};

use crate::client::Inner;
use crate::watch::{Step, Tracker, WatchEvent, BACKOFF_MAX, BACKOFF_START};
use crate::Error;

/// Messages routed per turn of the task's loop before it looks at commands again.
const BURST: usize = 256;

/// Maps keyed by watch keys and ids, which this client makes itself: no need for a hash that
/// resists chosen keys, and every message looks up two of them.
type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// Fibonacci hashing of one integer key.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_i64(&mut self, n: i64) {
        self.write_u64(n as u64);
    }
}

/// A consumer's channel of a watch.
pub(crate) type EventTx = mpsc::Sender<Result<WatchEvent, Error>>;
/// Answers once the watch is established (or can never be).
pub(crate) type ReadyTx = oneshot::Sender<Result<(), Error>>;

/// What a watch handle asks of the stream's task.
#[derive(Debug)]
pub(crate) enum Command {
    Add {
        key: u64,
        watch: Box<NewWatch>,
    },
    /// The consumer dropped its stream: cancel the watch.
    Remove {
        key: u64,
    },
    /// Ask the server for progress notifications on every watch of the stream.
    Progress,
}

#[derive(Debug)]
pub(crate) struct NewWatch {
    pub tracker: Tracker,
    /// The create request; `watch_id` and `start_revision` are set per creation.
    pub request: WatchCreateRequest,
    pub tx: EventTx,
    pub ready: ReadyTx,
}

/// Starts the task for `inner`'s watches; it ends once every sender of its commands is gone.
pub(crate) fn spawn(
    inner: Weak<Inner>,
    request_timeout: Duration,
) -> mpsc::UnboundedSender<Command> {
    let (tx, commands) = mpsc::unbounded_channel();
    let (room_tx, room) = mpsc::unbounded_channel();
    let mux = Mux {
        inner,
        request_timeout,
        commands,
        room,
        room_tx,
        watches: IdMap::default(),
        pending: Vec::new(),
        by_id: IdMap::default(),
        next_id: 1,
        unacked: VecDeque::new(),
        unacked_ids: HashSet::new(),
        stream: None,
        backoff: BACKOFF_START,
        retry_at: None,
    };
    tokio::spawn(mux.run());
    tx
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// To be created on the next stream (or the current one).
    Pending,
    /// Created on the current stream under this id.
    Active(i64),
    /// Canceled because its consumer's channel was full; waits for room.
    Paused,
}

struct Entry {
    tracker: Tracker,
    request: WatchCreateRequest,
    tx: EventTx,
    ready: Option<ReadyTx>,
    state: State,
    /// When `open_watch` was called, and how many streams failed before it was established.
    started: Instant,
    failures: u32,
}

struct Stream {
    idx: usize,
    addr: Arc<str>,
    requests: mpsc::UnboundedSender<WatchRequest>,
    responses: Streaming<WatchResponse>,
    /// The stream has delivered something.
    heard: bool,
}

struct Mux {
    inner: Weak<Inner>,
    /// How long a member may take to acknowledge a watch (the client's request timeout).
    request_timeout: Duration,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Keys of paused watches whose consumers have room again.
    room: mpsc::UnboundedReceiver<u64>,
    room_tx: mpsc::UnboundedSender<u64>,
    watches: IdMap<u64, Entry>,
    /// Keys of watches that became pending since the last creations were sent (some may have
    /// been removed or paused since): no scan of every watch per message.
    pending: Vec<u64>,
    by_id: IdMap<i64, u64>,
    /// Watch ids are never reused, so a late message for a canceled watch is recognized.
    next_id: i64,
    /// Creations not yet acknowledged, oldest first, with their deadlines: a member that
    /// accepts a stream but never acknowledges a watch on it is as good as down.
    unacked: VecDeque<(Instant, i64)>,
    /// The ids in `unacked` that the server has not answered yet.
    unacked_ids: HashSet<i64>,
    stream: Option<Stream>,
    backoff: std::time::Duration,
    /// No new stream before this (backoff after a failure).
    retry_at: Option<Instant>,
}

/// What to do with the stream after an event on it.
enum After {
    Keep,
    /// The stream failed: retry elsewhere (blaming its member), or give up on its watches.
    Failed {
        err: Error,
        retry: bool,
    },
}

impl Mux {
    async fn run(mut self) {
        loop {
            if let Some(stream) = &self.stream {
                if !self.pending.is_empty() {
                    let requests = stream.requests.clone();
                    self.create_pending(&requests);
                }
            } else if self.wants_stream() {
                if let Some(at) = self.retry_at {
                    tokio::select! {
                        biased;
                        command = self.commands.recv() => {
                            match command {
                                Some(c) => self.command(c),
                                None => return,
                            }
                            continue;
                        }
                        () = tokio::time::sleep_until(at) => self.retry_at = None,
                    }
                }
                let Some(inner) = self.inner.upgrade() else {
                    return;
                };
                if let After::Failed { err, retry } = self.connect(&inner).await {
                    self.failed(&inner, err, retry);
                }
                continue;
            }
            let deadline = self.ack_deadline();
            let after = tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(c) => { self.command(c); After::Keep }
                    None => return,
                },
                Some(key) = self.room.recv() => {
                    if let Some(e) = self.watches.get_mut(&key) {
                        if e.state == State::Paused {
                            e.state = State::Pending;
                            self.pending.push(key);
                        }
                    }
                    After::Keep
                }
                message = next_message(&mut self.stream) => {
                    // Route what has already arrived before going round the select again:
                    // one revision reaching many watches arrives as a burst of messages.
                    let mut after = self.message(message);
                    for _ in 1..BURST {
                        if !matches!(after, After::Keep) {
                            break;
                        }
                        match next_message(&mut self.stream).now_or_never() {
                            Some(message) => after = self.message(message),
                            None => break,
                        }
                    }
                    after
                }
                () = sleep_until(deadline) => {
                    let timeout = self.request_timeout;
                    let addr = self.stream.as_ref().map_or("", |s| &*s.addr);
                    After::Failed {
                        err: Error::Timeout(format!(
                            "{addr}: watch not acknowledged within {}",
                            humantime::format_duration(timeout)
                        )),
                        retry: true,
                    }
                }
            };
            if let After::Failed { err, retry } = after {
                let Some(inner) = self.inner.upgrade() else {
                    return;
                };
                self.failed(&inner, err, retry);
            }
            if self.watches.is_empty() && self.stream.is_some() {
                // Nothing left to watch: let the member release the stream.
                self.stream = None;
                self.unacked.clear();
                self.unacked_ids.clear();
            }
        }
    }

    /// Whether some watch waits for a stream (called only while there is none).
    fn wants_stream(&mut self) -> bool {
        let watches = &self.watches;
        self.pending
            .retain(|k| watches.get(k).is_some_and(|e| e.state == State::Pending));
        !self.pending.is_empty()
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Add { key, watch } => {
                let NewWatch {
                    tracker,
                    request,
                    tx,
                    ready,
                } = *watch;
                self.watches.insert(
                    key,
                    Entry {
                        tracker,
                        request,
                        tx,
                        ready: Some(ready),
                        state: State::Pending,
                        started: Instant::now(),
                        failures: 0,
                    },
                );
                self.pending.push(key);
            }
            Command::Remove { key } => self.remove(key),
            Command::Progress => {
                if let Some(s) = &self.stream {
                    let _ = s.requests.send(WatchRequest {
                        request: Some(watch_request::Request::Progress(WatchProgressRequest {})),
                    });
                }
            }
        }
    }

    /// Cancels an active watch on the server; its later messages are ignored.
    fn forget(&mut self, state: State) {
        if let State::Active(id) = state {
            self.by_id.remove(&id);
            if let Some(s) = &self.stream {
                let _ = s.requests.send(WatchRequest {
                    request: Some(watch_request::Request::Cancel(WatchCancelRequest {
                        watch_id: id,
                    })),
                });
            }
        }
    }

    /// Sends a create request for every pending watch.
    fn create_pending(&mut self, requests: &mpsc::UnboundedSender<WatchRequest>) {
        let deadline = Instant::now() + self.request_timeout;
        for key in std::mem::take(&mut self.pending) {
            let Some(e) = self.watches.get_mut(&key) else {
                continue;
            };
            if e.state != State::Pending {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            e.tracker.reconnecting();
            let mut create = e.request.clone();
            create.watch_id = id;
            create.start_revision = e.tracker.resume_revision();
            let _ = requests.send(WatchRequest {
                request: Some(watch_request::Request::Create(create)),
            });
            e.state = State::Active(id);
            self.by_id.insert(id, key);
            self.unacked.push_back((deadline, id));
            self.unacked_ids.insert(id);
        }
    }

    /// The deadline of the oldest creation still unanswered.
    fn ack_deadline(&mut self) -> Option<Instant> {
        while let Some(&(at, id)) = self.unacked.front() {
            if self.unacked_ids.contains(&id) && self.by_id.contains_key(&id) {
                return Some(at);
            }
            self.unacked.pop_front();
        }
        None
    }

    /// Opens a stream to the next endpoint, with every pending watch's creation queued on it.
    async fn connect(&mut self, inner: &Arc<Inner>) -> After {
        let (idx, endpoint) = inner.pick(false);
        let (requests, rx) = mpsc::unbounded_channel();
        // Queued before the call, so the request stream never starts empty.
        self.create_pending(&requests);
        let mut client = WatchClient::new(endpoint.channel.clone());
        // No grpc-timeout: the stream is meant to outlive any deadline.
        let call = client.watch(Request::new(UnboundedReceiverStream::new(rx)));
        match inner.attempt(&endpoint.addr, call).await {
            Ok(responses) => {
                self.stream = Some(Stream {
                    idx,
                    addr: endpoint.addr.clone(),
                    requests,
                    responses,
                    heard: false,
                });
                After::Keep
            }
            Err(err) => {
                self.stream = None;
                let after = classify(err);
                if let After::Failed { retry: true, .. } = after {
                    inner.note_failure(idx);
                }
                after
            }
        }
    }

    /// The stream (or the attempt to open one) failed. A retryable failure sends every watch
    /// back to pending, and a watch never established gives up once its retries or its time
    /// run out; any other failure ends every watch with the error.
    fn failed(&mut self, inner: &Arc<Inner>, err: Error, retry: bool) {
        if let Some(s) = self.stream.take() {
            if retry {
                inner.note_failure(s.idx);
            }
            if s.heard {
                // The stream worked for a while: reconnect promptly.
                self.backoff = BACKOFF_START;
            }
            tracing::debug!(endpoint = %s.addr, error = %err, "watch stream failed; resuming");
        }
        self.unacked.clear();
        self.unacked_ids.clear();
        self.by_id.clear();
        let backoff = self.backoff;
        let mut gone = Vec::new();
        for (key, e) in self.watches.iter_mut() {
            if let State::Active(_) = e.state {
                e.state = State::Pending;
                self.pending.push(*key);
            }
            if !retry {
                gone.push(*key);
            } else if e.ready.is_some() {
                // Never acknowledged: give up like any other call would.
                e.failures = e.failures.saturating_add(1);
                let capped = inner.max_retries.is_some_and(|max| e.failures > max);
                if capped || e.started.elapsed() + backoff >= inner.retry_budget {
                    gone.push(*key);
                }
            }
        }
        for key in gone {
            if let Some(e) = self.watches.remove(&key) {
                fail(e, err.clone());
            }
        }
        self.retry_at = Some(Instant::now() + backoff);
        self.backoff = (backoff * 2).min(BACKOFF_MAX);
    }

    fn message(&mut self, message: Result<Option<WatchResponse>, tonic::Status>) -> After {
        let addr = || self.stream.as_ref().map_or("", |s| &*s.addr).to_owned();
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                return After::Failed {
                    err: Error::Unavailable(format!("{}: watch stream ended", addr())),
                    retry: true,
                }
            }
            Err(status) => return classify(crate::watch::with_addr(&addr(), Error::from(status))),
        };
        if let Some(s) = &mut self.stream {
            s.heard = true;
        }
        if !self.unacked_ids.is_empty() {
            self.unacked_ids.remove(&resp.watch_id);
        }
        let id = resp.watch_id;
        let Some(&key) = self.by_id.get(&id) else {
            // A watch canceled or created again since: its id is retired.
            return After::Keep;
        };
        let Some(e) = self.watches.get_mut(&key) else {
            return After::Keep;
        };
        // Room first: a consumer that is not reading pauses its own watch, before the tracker
        // moves past a revision it could not take. Only this task sends on the channel, so
        // room seen here is still there below.
        if e.tx.capacity() == 0 {
            self.pause(key);
            return After::Keep;
        }
        let step = e.tracker.on_response(resp);
        if e.tracker.established() {
            if let Some(ready) = e.ready.take() {
                let _ = ready.send(Ok(()));
            }
        }
        match step {
            Step::Skip => {}
            Step::Yield(ev) => {
                if e.tx.try_send(Ok(ev)).is_err() {
                    // Only a closed channel refuses: the consumer is gone.
                    self.remove(key);
                    return After::Keep;
                }
                if e.tracker.is_done() {
                    // A fired one-shot: the server has ended it already.
                    self.by_id.remove(&id);
                    self.watches.remove(&key);
                }
            }
            Step::Resume(reason) => {
                tracing::debug!(%reason, "watch canceled by the server; creating it again");
                e.state = State::Pending;
                self.pending.push(key);
                self.by_id.remove(&id);
            }
            Step::Fail(err) => {
                self.by_id.remove(&id);
                if let Some(e) = self.watches.remove(&key) {
                    fail(e, err);
                }
            }
        }
        After::Keep
    }

    /// Drops a watch, canceling it on the server if it is active there.
    fn remove(&mut self, key: u64) {
        if let Some(e) = self.watches.remove(&key) {
            self.forget(e.state);
        }
    }

    /// Cancels a watch whose consumer is not keeping up, and creates it again once there is
    /// room: the server's history fills the gap, so nothing is lost or repeated.
    fn pause(&mut self, key: u64) {
        let Some(e) = self.watches.get_mut(&key) else {
            return;
        };
        let state = std::mem::replace(&mut e.state, State::Paused);
        let tx = e.tx.clone();
        self.forget(state);
        let room = self.room_tx.clone();
        tokio::spawn(async move {
            if let Ok(permit) = tx.reserve().await {
                drop(permit);
                let _ = room.send(key);
            }
        });
    }
}

fn fail(mut e: Entry, err: Error) {
    match e.ready.take() {
        Some(ready) => {
            let _ = ready.send(Err(err));
        }
        None => {
            let tx = e.tx;
            // The consumer may be behind: deliver the error when it has room.
            tokio::spawn(async move {
                let _ = tx.send(Err(err)).await;
            });
        }
    }
}

fn classify(err: Error) -> After {
    let retry = matches!(err, Error::Unavailable(_) | Error::Timeout(_))
        || err.code() == Code::ResourceExhausted;
    After::Failed { err, retry }
}

async fn next_message(stream: &mut Option<Stream>) -> Result<Option<WatchResponse>, tonic::Status> {
    match stream {
        Some(s) => s.responses.message().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
