//! A raw watch stream to one member, for tests that check the wire-level guarantees.

use std::time::Duration;

use kord_api::v1::watch_client::WatchClient;
use kord_api::v1::{
    watch_request, WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest,
    WatchResponse,
};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

pub struct WatchConn {
    tx: mpsc::Sender<WatchRequest>,
    rx: Streaming<WatchResponse>,
}

impl WatchConn {
    pub async fn open(channel: Channel) -> Result<WatchConn, Status> {
        let (tx, rx) = mpsc::channel(64);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let rx = WatchClient::new(channel).watch(stream).await?.into_inner();
        Ok(WatchConn { tx, rx })
    }

    async fn send(&self, request: watch_request::Request) {
        self.tx
            .send(WatchRequest {
                request: Some(request),
            })
            .await
            .expect("watch request stream closed");
    }

    pub async fn create(&self, create: WatchCreateRequest) {
        self.send(watch_request::Request::Create(create)).await;
    }

    pub async fn cancel(&self, watch_id: i64) {
        self.send(watch_request::Request::Cancel(WatchCancelRequest {
            watch_id,
        }))
        .await;
    }

    pub async fn request_progress(&self) {
        self.send(watch_request::Request::Progress(WatchProgressRequest {}))
            .await;
    }

    /// The next response, or `None` at the stream's end or after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Result<WatchResponse, Status>> {
        match tokio::time::timeout(timeout, self.rx.message()).await {
            Ok(Ok(Some(r))) => Some(Ok(r)),
            Ok(Ok(None)) => None,
            Ok(Err(s)) => Some(Err(s)),
            Err(_) => None,
        }
    }

    /// The next response, which must come within `timeout`.
    pub async fn expect(&mut self, timeout: Duration, what: &str) -> WatchResponse {
        match self.next(timeout).await {
            Some(Ok(r)) => r,
            Some(Err(s)) => panic!("{what}: watch stream failed: {s}"),
            None => panic!("{what}: no watch response within {timeout:?}"),
        }
    }
}

/// The revision a response speaks for.
pub fn revision_of(r: &WatchResponse) -> u64 {
    r.header.as_ref().map_or(0, |h| h.revision)
}
