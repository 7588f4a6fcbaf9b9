//! The `Watch` service: bidirectional streams, each carrying many watches and served by one
//! task (see `watch::stream`). Deliveries go into the stream's bounded buffer, so a consumer
//! that stops reading gets its watches canceled, not the server's memory exhausted.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use kord_api::v1 as pb;
use kord_api::watch_wire::watch_server::Watch;
use kord_api::watch_wire::WatchResponseWire;
use prost::bytes::Bytes;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use crate::metrics::Metrics;
use crate::raft::{NodeId, Raft};
use crate::state::{path, EventKind};
use crate::watch::hub::RevisionEvents;
use crate::watch::{
    kind_bit, stream, Delivery, Outbox, Scope, Selected, Sent, WatchContext, WatchSpec,
    SLOW_CONSUMER_GRACE,
};

pub struct WatchService {
    pub id: NodeId,
    pub raft: Raft,
    pub ctx: Arc<WatchContext>,
    /// Messages a stream may hold unread before its watches are canceled as slow.
    pub stream_buffer: usize,
    pub metrics: Arc<Metrics>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponseWire, Status>> + Send>>;

/// The sending half of one stream.
struct StreamOutbox {
    tx: mpsc::Sender<Result<WatchResponseWire, Status>>,
    member_id: NodeId,
    raft: Raft,
    /// The last revision's events, encoded once for all of this stream's watches.
    encoded: Mutex<Encoded>,
}

/// One revision's events as encoded `Event` messages, each made at most twice (without and
/// with the previous value), and the header every watch's message of that revision carries.
#[derive(Default)]
struct Encoded {
    source: Option<Arc<RevisionEvents>>,
    header: pb::ResponseHeader,
    /// Per event: `[without prev, with prev]`.
    events: Vec<[Option<Bytes>; 2]>,
}

impl Encoded {
    /// The encoded events of `selected`, from this revision's cache.
    fn select(
        &mut self,
        selected: &Selected,
        header: impl FnOnce() -> pb::ResponseHeader,
    ) -> Vec<Bytes> {
        let current = self
            .source
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &selected.source));
        if !current {
            self.source = Some(Arc::clone(&selected.source));
            self.header = header();
            self.events.clear();
            self.events
                .resize(selected.source.events.len(), [None, None]);
        }
        let prev = usize::from(selected.prev_value);
        selected
            .events()
            .map(|(i, e)| {
                self.events[i][prev]
                    .get_or_insert_with(|| {
                        let mut e = e.clone();
                        if !selected.prev_value {
                            e.prev = None;
                        }
                        Bytes::from(convert::event(e).encode_to_vec())
                    })
                    .clone()
            })
            .collect()
    }
}

impl StreamOutbox {
    fn header(&self, revision: u64) -> pb::ResponseHeader {
        super::header(self.member_id, &self.raft, revision)
    }

    fn response(&self, watch_id: i64, d: Delivery) -> WatchResponseWire {
        let mut r = WatchResponseWire {
            watch_id,
            ..Default::default()
        };
        match d {
            Delivery::Created { revision } => {
                r.header = Some(self.header(revision));
                r.created = true;
            }
            Delivery::Events(selected) => {
                let mut encoded = self.encoded.lock().expect("watch encode cache poisoned");
                r.events = encoded.select(&selected, || self.header(selected.revision()));
                r.header = Some(encoded.header);
            }
            Delivery::Progress { revision } => {
                r.header = Some(self.header(revision));
                r.progress = true;
            }
            Delivery::Canceled {
                reason,
                compact_revision,
            } => {
                r.header = Some(self.header(0));
                r.canceled = true;
                r.cancel_reason = reason;
                r.compact_revision = compact_revision;
            }
        }
        r
    }
}

impl Outbox for StreamOutbox {
    async fn try_deliver(&self, watch_id: i64, d: Delivery) -> Sent {
        // The common case, room in the buffer, needs no timer.
        let response = match self.tx.try_send(Ok(self.response(watch_id, d))) {
            Ok(()) => return Sent::Ok,
            Err(mpsc::error::TrySendError::Full(response)) => response,
            Err(mpsc::error::TrySendError::Closed(_)) => return Sent::Blocked,
        };
        match tokio::time::timeout(SLOW_CONSUMER_GRACE, self.tx.send(response)).await {
            Ok(Ok(())) => Sent::Ok,
            _ => Sent::Blocked,
        }
    }

    async fn deliver(&self, watch_id: i64, d: Delivery) {
        let _ = self.tx.send(Ok(self.response(watch_id, d))).await;
    }
}

/// Counts something in a gauge for as long as it lives (an aborted task drops it too).
struct Counted(prometheus_client::metrics::gauge::Gauge);

impl Counted {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Counted {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn spec(create: pb::WatchCreateRequest, id: i64) -> Result<WatchSpec, String> {
    path::validate(&create.path).map_err(|e| e.to_string())?;
    let scope = match pb::WatchScope::try_from(create.scope) {
        Ok(pb::WatchScope::Node) => Scope::Node,
        Ok(pb::WatchScope::Children) => Scope::Children,
        Ok(pb::WatchScope::Subtree) => Scope::Subtree,
        Err(_) => return Err(format!("scope {} is not a known value", create.scope)),
    };
    let mut kinds = 0;
    for t in create.types {
        kinds |= kind_bit(match pb::EventType::try_from(t) {
            Ok(pb::EventType::Created) => EventKind::Created,
            Ok(pb::EventType::Deleted) => EventKind::Deleted,
            Ok(pb::EventType::DataChanged) => EventKind::DataChanged,
            Ok(pb::EventType::ChildrenChanged) => EventKind::ChildrenChanged,
            Err(_) => return Err(format!("event type {t} is not a known value")),
        });
    }
    Ok(WatchSpec {
        id,
        path: create.path,
        scope,
        kinds,
        start_revision: create.start_revision,
        one_shot: create.one_shot,
        prev_value: create.prev_value,
    })
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let (tx, rx) = mpsc::channel(self.stream_buffer);
        let outbox = Arc::new(StreamOutbox {
            tx,
            member_id: self.id,
            raft: self.raft.clone(),
            encoded: Mutex::default(),
        });
        let metrics = self.metrics.clone();
        // The stream ends at the client's end or at the first malformed message.
        let commands = req
            .into_inner()
            .map_while(Result::ok)
            .filter_map(move |msg| match msg.request? {
                pb::watch_request::Request::Create(create) => {
                    let id = create.watch_id;
                    let spec = spec(create, id).map_err(|reason| (id, reason));
                    let code = match spec {
                        Ok(_) => tonic::Code::Ok,
                        Err(_) => tonic::Code::InvalidArgument,
                    };
                    metrics.count_request("watch", code);
                    Some(stream::Command::Create(spec))
                }
                pb::watch_request::Request::Cancel(cancel) => {
                    Some(stream::Command::Cancel(cancel.watch_id))
                }
                pb::watch_request::Request::Progress(_) => Some(stream::Command::Progress),
            });
        let ctx = self.ctx.clone();
        let open = Counted::new(&self.metrics.watch_streams);
        tokio::spawn(async move {
            stream::serve(ctx, outbox, Box::pin(commands)).await;
            drop(open);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Event, EventKind, Prev, Stat};
    use crate::watch::Selected;

    fn event(path: &str, data: &[u8], prev: Option<&[u8]>) -> Event {
        Event {
            kind: EventKind::DataChanged,
            path: path.into(),
            stat: Stat {
                modify_revision: 7,
                version: 3,
                ..Stat::default()
            },
            data: data.to_vec(),
            prev: prev.map(|d| Prev {
                stat: Stat::default(),
                data: d.to_vec(),
            }),
        }
    }

    /// What the pre-encoded response must decode to: kord.proto's message, built the plain way.
    fn expected(header: pb::ResponseHeader, events: Vec<Event>) -> pb::WatchResponse {
        pb::WatchResponse {
            header: Some(header),
            watch_id: 9,
            events: events.into_iter().map(convert::event).collect(),
            ..Default::default()
        }
    }

    fn decode_as_client(events: Vec<Bytes>, header: pb::ResponseHeader) -> pb::WatchResponse {
        let wire = WatchResponseWire {
            header: Some(header),
            watch_id: 9,
            events,
            ..Default::default()
        };
        pb::WatchResponse::decode(wire.encode_to_vec().as_slice())
            .expect("decodes as WatchResponse")
    }

    #[test]
    fn pre_encoded_events_decode_as_the_client_api_message() {
        let header = pb::ResponseHeader {
            revision: 7,
            member_id: 2,
            raft_term: 4,
        };
        let rev = Arc::new(RevisionEvents {
            revision: 7,
            events: vec![
                event("/a", b"one", Some(b"zero")),
                event("/b", b"two", None),
                event("/c", b"three", Some(b"before")),
            ],
        });
        let mut cache = Encoded::default();
        let all = Selected {
            source: rev.clone(),
            indexes: None,
            prev_value: false,
        };
        let got = cache.select(&all, || header);
        let without_prev: Vec<Event> = rev
            .events
            .iter()
            .cloned()
            .map(|mut e| {
                e.prev = None;
                e
            })
            .collect();
        assert_eq!(
            decode_as_client(got, header),
            expected(header, without_prev)
        );

        // A second watch of the same revision, with previous values and only two events: the
        // header is not asked for again, and the events come out in order.
        let some = Selected {
            source: rev.clone(),
            indexes: Some(vec![0, 2]),
            prev_value: true,
        };
        let got = cache.select(&some, || panic!("the header is cached per revision"));
        let picked = vec![rev.events[0].clone(), rev.events[2].clone()];
        assert_eq!(decode_as_client(got, header), expected(header, picked));

        // A new revision replaces the cache.
        let next = Arc::new(RevisionEvents {
            revision: 8,
            events: vec![event("/a", b"new", None)],
        });
        let header8 = pb::ResponseHeader {
            revision: 8,
            ..header
        };
        let got = cache.select(
            &Selected {
                source: next.clone(),
                indexes: None,
                prev_value: false,
            },
            || header8,
        );
        assert_eq!(cache.header, header8);
        assert_eq!(
            decode_as_client(got, header8),
            expected(header8, next.events.clone())
        );
    }
}
