//! The `Watch` service: one bidirectional stream per client connection, many watches on it.
//! Creating a watch starts a task (see `watch`); its deliveries go into the stream's bounded
//! buffer, so a consumer that stops reading gets its watches canceled, not the server's
//! memory exhausted.

use std::collections::HashMap;
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
    self, kind_bit, Delivery, Outbox, Scope, Sent, WatchContext, WatchSpec, SLOW_CONSUMER_GRACE,
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
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(self.stream_buffer);
        let outbox = Arc::new(StreamOutbox {
            tx,
            member_id: self.id,
            raft: self.raft.clone(),
        });
        let ctx = self.ctx.clone();
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let _open = Counted::new(&metrics.watch_streams);
            let (progress_tx, progress_rx) = tokio::sync::watch::channel(0u64);
            let mut watches: HashMap<i64, tokio::task::JoinHandle<()>> = HashMap::new();
            let mut next_id: i64 = 1;
            while let Some(Ok(msg)) = incoming.next().await {
                watches.retain(|_, task| !task.is_finished());
                match msg.request {
                    Some(pb::watch_request::Request::Create(create)) => {
                        let id = if create.watch_id != 0 {
                            create.watch_id
                        } else {
                            next_id
                        };
                        next_id = next_id.max(id + 1);
                        let refused = |reason: String| Delivery::Canceled {
                            reason,
                            compact_revision: 0,
                        };
                        if watches.contains_key(&id) {
                            outbox
                                .deliver(
                                    id,
                                    refused(format!(
                                        "watch_id {id} is already in use on this stream"
                                    )),
                                )
                                .await;
                            continue;
                        }
                        match spec(create, id) {
                            Ok(spec) => {
                                metrics.count_request("watch", tonic::Code::Ok);
                                let task = watch::run(
                                    spec,
                                    ctx.clone(),
                                    outbox.clone(),
                                    progress_rx.clone(),
                                );
                                let running = Counted::new(&metrics.watches);
                                watches.insert(
                                    id,
                                    tokio::spawn(async move {
                                        task.await;
                                        drop(running);
                                    }),
                                );
                            }
                            Err(reason) => {
                                metrics.count_request("watch", tonic::Code::InvalidArgument);
                                outbox.deliver(id, refused(reason)).await;
                            }
                        }
                    }
                    Some(pb::watch_request::Request::Cancel(cancel)) => {
                        if let Some(task) = watches.remove(&cancel.watch_id) {
                            task.abort();
                            outbox
                                .deliver(
                                    cancel.watch_id,
                                    Delivery::Canceled {
                                        reason: "canceled by the client".into(),
                                        compact_revision: 0,
                                    },
                                )
                                .await;
                        }
                    }
                    Some(pb::watch_request::Request::Progress(_)) => {
                        progress_tx.send_modify(|n| *n += 1);
                    }
                    None => {}
                }
            }
            for (_, task) in watches {
                task.abort();
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
