//! The `Watch` service: bidirectional streams, each carrying many watches and served by one
//! task (see `watch::stream`). Deliveries go into the stream's bounded buffer, so a consumer
//! that stops reading gets its watches canceled, not the server's memory exhausted.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use kord_api::v1 as pb;
use kord_api::v1::watch_server::Watch;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use crate::metrics::Metrics;
use crate::raft::{NodeId, Raft};
use crate::state::{path, EventKind};
use crate::watch::{
    kind_bit, stream, Delivery, Outbox, Scope, Sent, WatchContext, WatchSpec, SLOW_CONSUMER_GRACE,
};

pub struct WatchService {
    pub id: NodeId,
    pub raft: Raft,
    pub ctx: Arc<WatchContext>,
    /// Messages a stream may hold unread before its watches are canceled as slow.
    pub stream_buffer: usize,
    pub metrics: Arc<Metrics>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

/// The sending half of one stream.
struct StreamOutbox {
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    member_id: NodeId,
    raft: Raft,
}

impl StreamOutbox {
    fn response(&self, watch_id: i64, d: Delivery) -> pb::WatchResponse {
        let header = |revision| Some(super::header(self.member_id, &self.raft, revision));
        let mut r = pb::WatchResponse {
            watch_id,
            ..Default::default()
        };
        match d {
            Delivery::Created { revision } => {
                r.header = header(revision);
                r.created = true;
            }
            Delivery::Events { revision, events } => {
                r.header = header(revision);
                r.events = events.into_iter().map(convert::event).collect();
            }
            Delivery::Progress { revision } => {
                r.header = header(revision);
                r.progress = true;
            }
            Delivery::Canceled {
                reason,
                compact_revision,
            } => {
                r.header = header(0);
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
