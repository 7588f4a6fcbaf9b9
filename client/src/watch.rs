//! Watches: a [`WatchStream`] of the changes under a path that survives member failures by
//! resuming where it left off, and ZooKeeper-style one-shot watches set by a read
//! ([`Client::get_watch`], [`Client::exists_watch`], [`Client::children_watch`]).
//!
//! The bookkeeping that makes resumption exact (which revision to resume from, which messages
//! are duplicates, what a cancel means) lives in [`Tracker`], which is pure. All watches of a
//! [`Client`] share one gRPC stream, owned by one task (`watch_mux`), which only moves messages
//! between the trackers, the consumers and the network.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use kord_api::v1::kv_client::KvClient;
use kord_api::v1::{
    self as pb, ChildrenRequest, Consistency, EventType, ExistsRequest, GetRequest, Stat,
    WatchCreateRequest, WatchResponse, WatchScope,
};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::Code;

use crate::client::Inner;
use crate::watch_mux::{Command, NewWatch};
use crate::{Client, Error};

pub(crate) const BACKOFF_START: Duration = Duration::from_millis(20);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// Messages decoded ahead of a consumer that is not reading. Beyond this the client cancels
/// the watch on the server (the other watches of the client's stream go on) and creates it
/// again, from the revision after the last one taken, once the consumer catches up.
const CHANNEL_CAPACITY: usize = 64;

/// What to watch. The default watches the node itself, every event type, from now on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchOptions {
    /// The node itself (default), its children (and its own `ChildrenChanged`), or its whole
    /// subtree.
    pub scope: WatchScope,
    /// Event types to deliver; empty means all.
    pub types: Vec<EventType>,
    /// First revision to deliver (inclusive). `None` (or `Some(0)`): changes after the watch is
    /// created. A revision at or below the compaction point fails with [`Error::Compacted`].
    pub start_revision: Option<u64>,
    /// Also deliver each node as it was before the change ([`Event::prev`]).
    pub prev_value: bool,
}

/// A node as it was before a change (with [`WatchOptions::prev_value`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrevNode {
    pub stat: Stat,
    pub data: Vec<u8>,
}

/// One change to one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The revision of the write that made the change.
    pub revision: u64,
    pub kind: EventType,
    pub path: String,
    /// The node after the change (for `Deleted`: as it was).
    pub stat: Stat,
    /// The data after the change; empty for `Deleted` and `ChildrenChanged`.
    pub data: Vec<u8>,
    /// With [`WatchOptions::prev_value`]: the node before the change (`None` for `Created`).
    pub prev: Option<PrevNode>,
}

impl Event {
    /// `None` for an event type this client does not know (from a newer server).
    fn from_proto(revision: u64, e: pb::Event) -> Option<Event> {
        let kind = EventType::try_from(e.r#type).ok()?;
        let prev = e.prev_stat.map(|stat| PrevNode {
            stat,
            data: e.prev_data,
        });
        Some(Event {
            revision,
            kind,
            path: e.path,
            stat: e.stat.unwrap_or_default(),
            data: e.data,
            prev,
        })
    }
}

/// What a [`WatchStream`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// All matching events of one revision. Revisions strictly increase along a stream.
    Events { revision: u64, events: Vec<Event> },
    /// Every matching event up to `revision` has been delivered (an answer to
    /// [`WatchStream::request_progress`]). Never below an already delivered revision.
    Progress { revision: u64 },
}

impl WatchEvent {
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Events { revision, .. } | WatchEvent::Progress { revision } => *revision,
        }
    }
}

/// What the task must do after one server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Nothing for the consumer (a creation ack, a duplicate).
    Skip,
    Yield(WatchEvent),
    /// The server ended the watch for a passing reason: open it again from
    /// [`Tracker::resume_revision`] (the member is not to blame).
    Resume(String),
    /// The watch cannot go on.
    Fail(Error),
}

/// Where a watch stands, fed every server message: decides what the consumer sees and where a
/// new stream must start so that nothing is missed and nothing is delivered twice.
#[derive(Debug, Clone)]
pub(crate) struct Tracker {
    path: String,
    /// The next revision to deliver; 0 while "now" has not been pinned by a `created` ack.
    next: u64,
    one_shot: bool,
    /// The current stream acknowledged the watch.
    created: bool,
    /// Some stream acknowledged the watch (or delivered something).
    established: bool,
    /// A one-shot watch delivered its events, or the watch failed.
    done: bool,
}

impl Tracker {
    pub(crate) fn new(path: &str, start_revision: Option<u64>, one_shot: bool) -> Tracker {
        Tracker {
            path: path.to_owned(),
            next: start_revision.unwrap_or(0),
            one_shot,
            created: false,
            established: false,
            done: false,
        }
    }

    /// The `start_revision` for the next create request: one past the last delivered (or
    /// acknowledged as delivered) revision, or the pinned start; 0 ("now") only before the
    /// first stream acknowledged the watch.
    pub(crate) fn resume_revision(&self) -> u64 {
        self.next
    }

    pub(crate) fn established(&self) -> bool {
        self.established
    }

    pub(crate) fn is_done(&self) -> bool {
        self.done
    }

    /// A new stream is being opened.
    pub(crate) fn reconnecting(&mut self) {
        self.created = false;
    }

    pub(crate) fn on_response(&mut self, resp: WatchResponse) -> Step {
        if self.done {
            return Step::Skip;
        }
        let revision = resp.header.map_or(0, |h| h.revision);
        if resp.canceled {
            return self.on_cancel(&resp);
        }
        if resp.created {
            self.created = true;
            self.established = true;
            if self.next == 0 {
                // The watch starts after `revision`: pin that, so a stream opened later starts
                // at the same place instead of at a later "now".
                self.next = revision.saturating_add(1);
            }
        }
        if resp.progress {
            self.established = true;
            self.next = self.next.max(revision.saturating_add(1));
            return Step::Yield(WatchEvent::Progress {
                revision: self.next - 1,
            });
        }
        if resp.events.is_empty() {
            return Step::Skip;
        }
        if self.next != 0 && revision < self.next {
            return Step::Skip;
        }
        self.established = true;
        self.next = revision.saturating_add(1);
        let events: Vec<Event> = resp
            .events
            .into_iter()
            .filter_map(|e| Event::from_proto(revision, e))
            .collect();
        if events.is_empty() {
            return Step::Skip;
        }
        if self.one_shot {
            self.done = true;
        }
        Step::Yield(WatchEvent::Events { revision, events })
    }

    fn on_cancel(&mut self, resp: &WatchResponse) -> Step {
        let reason = if resp.cancel_reason.is_empty() {
            "no reason given"
        } else {
            resp.cancel_reason.as_str()
        };
        if resp.compact_revision != 0 {
            self.done = true;
            let wanted = match self.next {
                0 => "now".to_owned(),
                r => format!("revision {r}"),
            };
            return Step::Fail(Error::Compacted {
                compact_revision: resp.compact_revision,
                message: format!(
                    "watch on {}: cannot start at {wanted}: history up to revision {} is \
                     compacted; re-read and watch from revision {}",
                    self.path,
                    resp.compact_revision,
                    resp.compact_revision.saturating_add(1)
                ),
            });
        }
        if !self.created || resp.created {
            // Refused at creation: asking again would get the same answer.
            self.done = true;
            return Step::Fail(Error::Other {
                code: Code::Cancelled,
                message: format!("watch on {} refused by the server: {reason}", self.path),
                failed_op: None,
            });
        }
        self.created = false;
        Step::Resume(reason.to_owned())
    }
}

/// The changes under a path, as a [`Stream`] (also readable with [`WatchStream::next`]).
///
/// The stream resumes by itself when its member fails or the server cancels it (e.g. as a slow
/// consumer): it reconnects, rotating through the endpoints with backoff, and asks again from
/// the revision after the last one delivered, dropping anything already seen. So it yields
/// every matching revision once, in order, for as long as it lives. It ends after an error:
/// [`Error::Compacted`] when the history it needs is gone (re-read, then watch again), or an
/// error no retry can fix. Once established it retries a lost connection indefinitely.
///
/// It shares its client's gRPC stream with the client's other watches. If it is not read, its
/// buffer (64 messages) fills and the client cancels its watch on the server, without holding up
/// the others; once it is read again the watch is created again from the revision after the last
/// one delivered, so nothing is lost or repeated.
///
/// Dropping the stream cancels the watch.
#[derive(Debug)]
pub struct WatchStream {
    rx: mpsc::Receiver<Result<WatchEvent, Error>>,
    /// This watch's key in the client's stream task.
    key: u64,
    mux: mpsc::UnboundedSender<Command>,
    /// Keeps the client's channels (and so its stream task) alive as long as the watch.
    _client: Arc<Inner>,
    last: Option<u64>,
}

impl WatchStream {
    /// The next event, or `None` once the stream has ended (after an error).
    pub async fn next(&mut self) -> Option<Result<WatchEvent, Error>> {
        let item = self.rx.recv().await;
        self.observe(&item);
        item
    }

    /// Asks the server for a [`WatchEvent::Progress`]. The client's other watches, which
    /// share its gRPC stream, get one too.
    pub fn request_progress(&self) {
        let _ = self.mux.send(Command::Progress);
    }

    /// The revision of the last item yielded (events or progress).
    pub fn last_revision(&self) -> Option<u64> {
        self.last
    }

    fn observe(&mut self, item: &Option<Result<WatchEvent, Error>>) {
        if let Some(Ok(ev)) = item {
            self.last = Some(ev.revision());
        }
    }
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = std::task::ready!(self.rx.poll_recv(cx));
        self.observe(&item);
        Poll::Ready(item)
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        let _ = self.mux.send(Command::Remove { key: self.key });
    }
}

/// A ZooKeeper-style watch set by a read: a future that resolves with the first matching event
/// after the read (if several events share that revision, the first of them). It survives
/// reconnects like a [`WatchStream`]; dropping it cancels the watch.
#[derive(Debug)]
pub struct OneShot {
    stream: WatchStream,
}

impl OneShot {
    /// The same as awaiting the `OneShot` itself.
    pub async fn fired(self) -> Result<Event, Error> {
        self.await
    }
}

impl Future for OneShot {
    type Output = Result<Event, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match std::task::ready!(Pin::new(&mut self.stream).poll_next(cx)) {
                Some(Ok(WatchEvent::Events { mut events, .. })) if !events.is_empty() => {
                    return Poll::Ready(Ok(events.swap_remove(0)));
                }
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Poll::Ready(Err(err)),
                None => {
                    return Poll::Ready(Err(Error::protocol("watch ended before it fired")));
                }
            }
        }
    }
}

/// ZooKeeper's data watch: the node changed or was deleted (or, for `exists_watch` on a
/// missing node, created).
const NODE_TYPES: [EventType; 3] = [
    EventType::Created,
    EventType::Deleted,
    EventType::DataChanged,
];
/// ZooKeeper's child watch: a child was created or deleted, or the node itself was deleted.
/// Both are events whose path is the node, so a node-scoped watch sees them.
const CHILD_TYPES: [EventType; 2] = [EventType::ChildrenChanged, EventType::Deleted];

impl Client {
    /// Watches `path` as `options` say. Returns once a member has acknowledged the watch, so
    /// with no start revision every change after this call returns is delivered. Fails if no
    /// member acknowledges it within the retry budget.
    pub async fn watch(&self, path: &str, options: WatchOptions) -> Result<WatchStream, Error> {
        self.open_watch(path, options, false).await
    }

    /// The node's data and stat, and a one-shot watch for its next change or deletion. The read
    /// is linearizable; the watch starts right after it, so no change is missed in between.
    pub async fn get_watch(&self, path: &str) -> Result<(Vec<u8>, Stat, OneShot), Error> {
        let req = GetRequest {
            path: path.to_owned(),
            consistency: Consistency::Linearizable.into(),
        };
        let resp = self
            .read(Consistency::Linearizable, req, |ch, r| async move {
                KvClient::new(ch).get(r).await
            })
            .await?;
        let revision = resp.header.map_or(0, |h| h.revision);
        let watch = self.one_shot(path, &NODE_TYPES, revision).await?;
        Ok((resp.data, resp.stat.unwrap_or_default(), watch))
    }

    /// The node's stat (`None` if it does not exist) and a one-shot watch for its creation,
    /// change or deletion after the (linearizable) read.
    pub async fn exists_watch(&self, path: &str) -> Result<(Option<Stat>, OneShot), Error> {
        let req = ExistsRequest {
            path: path.to_owned(),
            consistency: Consistency::Linearizable.into(),
        };
        let resp = self
            .read(Consistency::Linearizable, req, |ch, r| async move {
                KvClient::new(ch).exists(r).await
            })
            .await?;
        let revision = resp.header.map_or(0, |h| h.revision);
        let watch = self.one_shot(path, &NODE_TYPES, revision).await?;
        Ok((resp.stat, watch))
    }

    /// The children's names and a one-shot watch that fires when a child is created or
    /// deleted, or the node itself is deleted, after the (linearizable) read.
    pub async fn children_watch(&self, path: &str) -> Result<(Vec<String>, OneShot), Error> {
        let req = ChildrenRequest {
            path: path.to_owned(),
            consistency: Consistency::Linearizable.into(),
            with_stats: false,
        };
        let resp = self
            .read(Consistency::Linearizable, req, |ch, r| async move {
                KvClient::new(ch).children(r).await
            })
            .await?;
        let revision = resp.header.map_or(0, |h| h.revision);
        let watch = self.one_shot(path, &CHILD_TYPES, revision).await?;
        Ok((resp.names, watch))
    }

    async fn one_shot(
        &self,
        path: &str,
        types: &[EventType],
        read_revision: u64,
    ) -> Result<OneShot, Error> {
        let options = WatchOptions {
            scope: WatchScope::Node,
            types: types.to_vec(),
            start_revision: Some(read_revision.saturating_add(1)),
            prev_value: false,
        };
        let stream = self.open_watch(path, options, true).await?;
        Ok(OneShot { stream })
    }

    async fn open_watch(
        &self,
        path: &str,
        options: WatchOptions,
        one_shot: bool,
    ) -> Result<WatchStream, Error> {
        let start = options.start_revision.filter(|&r| r != 0);
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (ready_tx, ready_rx) = oneshot::channel();
        let watch = NewWatch {
            tracker: Tracker::new(path, start, one_shot),
            request: WatchCreateRequest {
                path: path.to_owned(),
                scope: options.scope.into(),
                types: options.types.iter().map(|&t| t.into()).collect(),
                start_revision: 0,
                one_shot,
                prev_value: options.prev_value,
                watch_id: 0,
            },
            tx,
            ready: ready_tx,
        };
        let (mux, key) = self.inner.watch_mux();
        let stream = WatchStream {
            rx,
            key,
            mux: mux.clone(),
            _client: Arc::clone(&self.inner),
            last: None,
        };
        mux.send(Command::Add {
            key,
            watch: Box::new(watch),
        })
        .map_err(|_| Error::protocol("the client's watch task has ended"))?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(Error::protocol("watch task ended without a result")),
        }
    }
}

pub(crate) fn with_addr(addr: &str, err: Error) -> Error {
    match err {
        Error::Unavailable(m) if !m.starts_with(addr) => Error::Unavailable(format!("{addr}: {m}")),
        Error::Timeout(m) if !m.starts_with(addr) => Error::Timeout(format!("{addr}: {m}")),
        err => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kord_api::v1::ResponseHeader;

    fn header(revision: u64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision,
            ..Default::default()
        })
    }

    fn created(revision: u64) -> WatchResponse {
        WatchResponse {
            header: header(revision),
            created: true,
            ..Default::default()
        }
    }

    fn events(revision: u64, paths: &[&str]) -> WatchResponse {
        WatchResponse {
            header: header(revision),
            events: paths
                .iter()
                .map(|p| pb::Event {
                    r#type: EventType::DataChanged.into(),
                    path: (*p).to_owned(),
                    data: b"x".to_vec(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn progress(revision: u64) -> WatchResponse {
        WatchResponse {
            header: header(revision),
            progress: true,
            ..Default::default()
        }
    }

    fn canceled(reason: &str, compact_revision: u64) -> WatchResponse {
        WatchResponse {
            header: header(0),
            canceled: true,
            cancel_reason: reason.to_owned(),
            compact_revision,
            ..Default::default()
        }
    }

    /// The revisions of the events yielded for `responses`, `P<rev>` for progress.
    fn feed(t: &mut Tracker, responses: Vec<WatchResponse>) -> Vec<String> {
        responses
            .into_iter()
            .filter_map(|r| match t.on_response(r) {
                Step::Yield(WatchEvent::Events { revision, events }) => {
                    assert!(events.iter().all(|e| e.revision == revision));
                    Some(revision.to_string())
                }
                Step::Yield(WatchEvent::Progress { revision }) => Some(format!("P{revision}")),
                Step::Skip => None,
                Step::Resume(reason) => Some(format!("resume:{reason}")),
                Step::Fail(err) => Some(format!("fail:{err}")),
            })
            .collect()
    }

    #[test]
    fn now_is_pinned_by_the_first_creation_ack() {
        let mut t = Tracker::new("/a", None, false);
        assert_eq!(t.resume_revision(), 0);
        assert!(!t.established());
        assert_eq!(feed(&mut t, vec![created(10)]), Vec::<String>::new());
        assert!(t.established());
        // Nothing delivered yet: a new stream starts right after the acknowledged revision,
        // not at whatever "now" is by then.
        assert_eq!(t.resume_revision(), 11);
        t.reconnecting();
        // The resumed stream's ack (starting after 10 again, or later) does not move it.
        assert_eq!(feed(&mut t, vec![created(10)]), Vec::<String>::new());
        assert_eq!(t.resume_revision(), 11);
        assert_eq!(feed(&mut t, vec![created(15)]), Vec::<String>::new());
        assert_eq!(t.resume_revision(), 11);
    }

    #[test]
    fn explicit_start_is_kept_until_something_is_delivered() {
        let mut t = Tracker::new("/a", Some(5), false);
        assert_eq!(t.resume_revision(), 5);
        assert_eq!(feed(&mut t, vec![created(4)]), Vec::<String>::new());
        assert_eq!(t.resume_revision(), 5);
        assert_eq!(feed(&mut t, vec![events(5, &["/a"])]), ["5"]);
        assert_eq!(t.resume_revision(), 6);
    }

    #[test]
    fn delivers_in_order_and_drops_repeats() {
        let mut t = Tracker::new("/a", None, false);
        let out = feed(
            &mut t,
            vec![
                created(3),
                events(4, &["/a"]),
                events(7, &["/a", "/a"]),
                events(7, &["/a"]),
                events(5, &["/a"]),
                events(9, &["/a"]),
            ],
        );
        assert_eq!(out, ["4", "7", "9"]);
        assert_eq!(t.resume_revision(), 10);
        // A resumed stream that (wrongly) replays old revisions adds nothing.
        t.reconnecting();
        let out = feed(
            &mut t,
            vec![
                created(9),
                events(3, &["/a"]),
                events(9, &["/a"]),
                events(10, &["/a"]),
            ],
        );
        assert_eq!(out, ["10"]);
        assert_eq!(t.resume_revision(), 11);
    }

    #[test]
    fn events_keep_their_content_and_prev() {
        let mut t = Tracker::new("/a", None, false);
        feed(&mut t, vec![created(1)]);
        let resp = WatchResponse {
            header: header(2),
            events: vec![
                pb::Event {
                    r#type: EventType::DataChanged.into(),
                    path: "/a".into(),
                    stat: Some(Stat {
                        version: 2,
                        ..Default::default()
                    }),
                    data: b"new".to_vec(),
                    prev_stat: Some(Stat {
                        version: 1,
                        ..Default::default()
                    }),
                    prev_data: b"old".to_vec(),
                },
                // A type from a newer server is skipped, not misread.
                pb::Event {
                    r#type: 99,
                    path: "/a".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let Step::Yield(WatchEvent::Events { revision, events }) = t.on_response(resp) else {
            panic!("expected events");
        };
        assert_eq!(revision, 2);
        assert_eq!(
            events,
            [Event {
                revision: 2,
                kind: EventType::DataChanged,
                path: "/a".into(),
                stat: Stat {
                    version: 2,
                    ..Default::default()
                },
                data: b"new".to_vec(),
                prev: Some(PrevNode {
                    stat: Stat {
                        version: 1,
                        ..Default::default()
                    },
                    data: b"old".to_vec(),
                }),
            }]
        );
    }

    #[test]
    fn progress_moves_the_resume_point_but_never_back() {
        let mut t = Tracker::new("/a", None, false);
        let out = feed(
            &mut t,
            vec![
                created(3),
                events(5, &["/a"]),
                progress(8),
                events(8, &["/a"]),
            ],
        );
        // Everything up to 8 was delivered, so a message for 8 after it is a repeat.
        assert_eq!(out, ["5", "P8"]);
        assert_eq!(t.resume_revision(), 9);
        // A member that is behind reports less: the stream still never goes back.
        t.reconnecting();
        let out = feed(&mut t, vec![created(8), progress(6), events(9, &["/a"])]);
        assert_eq!(out, ["P8", "9"]);
        assert_eq!(t.resume_revision(), 10);
    }

    #[test]
    fn server_cancel_resumes_after_the_last_delivered_revision() {
        let mut t = Tracker::new("/a", None, false);
        let out = feed(
            &mut t,
            vec![created(1), events(2, &["/a"]), canceled("slow consumer", 0)],
        );
        assert_eq!(out, ["2", "resume:slow consumer"]);
        assert_eq!(t.resume_revision(), 3);
        assert!(!t.is_done());
        t.reconnecting();
        let out = feed(&mut t, vec![created(2), events(3, &["/a"])]);
        assert_eq!(out, ["3"]);
    }

    #[test]
    fn compaction_ends_the_watch() {
        let mut t = Tracker::new("/a", Some(3), false);
        let step = t.on_response(canceled("compacted", 7));
        let Step::Fail(Error::Compacted {
            compact_revision,
            message,
        }) = step
        else {
            panic!("expected a compaction failure, got {step:?}");
        };
        assert_eq!(compact_revision, 7);
        assert!(
            message.contains("/a") && message.contains("revision 8"),
            "{message}"
        );
        assert!(t.is_done());
        // Nothing after the end.
        assert_eq!(feed(&mut t, vec![events(9, &["/a"])]), Vec::<String>::new());

        // Also after a resume: the history the resumed stream needed is gone.
        let mut t = Tracker::new("/a", None, false);
        feed(&mut t, vec![created(1), events(2, &["/a"])]);
        t.reconnecting();
        let out = feed(&mut t, vec![canceled("compacted", 5)]);
        assert!(out[0].starts_with("fail:"), "{out:?}");
    }

    #[test]
    fn refusal_at_creation_is_final() {
        let mut t = Tracker::new("/a", None, false);
        let step = t.on_response(canceled("invalid path", 0));
        assert!(
            matches!(&step, Step::Fail(err) if err.to_string().contains("invalid path")),
            "{step:?}"
        );
        let mut t = Tracker::new("/a", None, false);
        let mut resp = canceled("too many watches", 0);
        resp.created = true;
        assert!(matches!(t.on_response(resp), Step::Fail(_)));
    }

    #[test]
    fn one_shot_is_done_after_its_first_events() {
        let mut t = Tracker::new("/a", Some(4), true);
        let out = feed(
            &mut t,
            vec![
                created(3),
                progress(5),
                events(6, &["/a"]),
                events(7, &["/a"]),
            ],
        );
        assert_eq!(out, ["P5", "6"]);
        assert!(t.is_done());

        // Interrupted before firing: resumes from the read's revision + 1.
        let mut t = Tracker::new("/a", Some(4), true);
        feed(&mut t, vec![created(3)]);
        t.reconnecting();
        assert_eq!(t.resume_revision(), 4);
        assert!(!t.is_done());
    }

    #[test]
    fn a_repeat_of_a_one_shot_event_does_not_fire_it() {
        let mut t = Tracker::new("/a", Some(4), true);
        assert_eq!(
            feed(&mut t, vec![created(3), events(3, &["/a"])]),
            Vec::<String>::new()
        );
        assert!(!t.is_done());
    }
}
