//! Writes that callers make at the same moment on one connection go to the server in one
//! `Kv.Batch` call instead of one call each.
//!
//! Each unary gRPC call costs both ends the same HTTP/2 work whatever it carries: a stream, its
//! headers and trailers (HPACK), and on the server a task of its own. A write made while other
//! writes are in flight on the connection leads a batch: it yields once, so that the callers
//! ready to run on this thread (typically those its previous reply woke) add their writes, and
//! then sends them all together, hands the others their results and returns its own. A write
//! made while none is in flight goes alone at once, as before, so batching adds no latency to a
//! lone caller. The server applies each item as if sent alone (the call is not atomic), so a
//! caller sees the same result and error either way; a failed batch fails each caller's attempt,
//! which then retries on its own (with its own write id, so a retry never applies twice).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use kord_api::transport::Channel;
use kord_api::v1::batch_item::Request as Item;
use kord_api::v1::batch_result::Result as Out;
use kord_api::v1::kv_client::KvClient;
use kord_api::v1::{
    BatchItem, BatchRequest, CreateRequest, CreateResponse, DeleteRequest, DeleteResponse,
    SetRequest, SetResponse,
};
use tokio::sync::oneshot;
use tonic::{Code, Request, Response, Status};

use crate::client::WriteRequest;

/// Most items in one batch (the server takes up to 1024).
const MAX_ITEMS: usize = 128;
/// Most encoded bytes of items in one batch: well under the smallest request a member can be
/// configured to take (its value size limit plus 64 KiB).
const MAX_BYTES: usize = 60 * 1024;
/// A bigger write goes alone: the per-call cost is small next to its own.
const MAX_ITEM_BYTES: usize = 8 * 1024;

/// A write request that can travel in a batch.
pub(crate) trait Batchable: WriteRequest + prost::Message + Send + 'static {
    type Response: Send + 'static;
    fn into_item(self) -> Item;
    fn from_out(out: Out) -> Option<Self::Response>;
    fn send_alone(
        ch: Channel,
        req: Request<Self>,
    ) -> impl Future<Output = Result<Response<Self::Response>, Status>> + Send;
}

macro_rules! batchable {
    ($req:ty, $resp:ty, $variant:ident, $rpc:ident) => {
        impl Batchable for $req {
            type Response = $resp;
            fn into_item(self) -> Item {
                Item::$variant(self)
            }
            fn from_out(out: Out) -> Option<$resp> {
                match out {
                    Out::$variant(r) => Some(r),
                    _ => None,
                }
            }
            async fn send_alone(
                ch: Channel,
                req: Request<Self>,
            ) -> Result<Response<$resp>, Status> {
                KvClient::new(ch).$rpc(req).await
            }
        }
    };
}
batchable!(CreateRequest, CreateResponse, Create, create);
batchable!(SetRequest, SetResponse, Set, set);
batchable!(DeleteRequest, DeleteResponse, Delete, delete);

/// A write waiting in a forming batch, and where its result goes.
struct Joined {
    item: Item,
    reply: oneshot::Sender<Result<Out, Status>>,
}

/// The writes that joined a forming batch, and their encoded size.
#[derive(Default)]
struct Forming {
    joined: Vec<Joined>,
    bytes: usize,
}

/// The batching state of one endpoint's connection.
#[derive(Default)]
pub(crate) struct CallBatcher {
    /// The batch a leading caller is forming (`Some` from its start until it sends).
    forming: Mutex<Option<Forming>>,
    /// Batched writes between their start and their result.
    in_flight: AtomicUsize,
    /// The server has no `Batch` call (an older Kord): every write goes alone.
    unsupported: AtomicBool,
}

impl std::fmt::Debug for CallBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallBatcher")
            .field("in_flight", &self.in_flight.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// What a write does on arrival: join the batch being formed, go alone, or lead a batch.
enum Role<R> {
    Joined(oneshot::Receiver<Result<Out, Status>>),
    Alone(Request<R>),
    Lead(Request<R>),
}

/// Counts a write in flight for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A leading caller's claim on the forming batch: if the caller is dropped before it sends,
/// the batch is dissolved, and the writes that joined fail their attempt (and retry).
struct Lead<'a> {
    forming: &'a Mutex<Option<Forming>>,
    taken: bool,
}

impl Lead<'_> {
    fn take(&mut self) -> Vec<Joined> {
        self.taken = true;
        lock(self.forming).take().unwrap_or_default().joined
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if !self.taken {
            lock(self.forming).take();
        }
    }
}

fn lock(m: &Mutex<Option<Forming>>) -> std::sync::MutexGuard<'_, Option<Forming>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl CallBatcher {
    /// Sends `req` on `ch`, alone or in a batch with the writes made at the same moment.
    pub(crate) async fn submit<R: Batchable>(
        &self,
        ch: Channel,
        req: Request<R>,
    ) -> Result<Response<R::Response>, Status> {
        if self.unsupported.load(Ordering::Relaxed) {
            return R::send_alone(ch, req).await;
        }
        let len = req.get_ref().encoded_len();
        if len > MAX_ITEM_BYTES {
            return R::send_alone(ch, req).await;
        }
        let others = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.in_flight);
        let role = {
            let mut forming = lock(&self.forming);
            match forming.as_mut() {
                Some(batch)
                    if batch.joined.len() + 1 < MAX_ITEMS && batch.bytes + len <= MAX_BYTES =>
                {
                    let (reply, rx) = oneshot::channel();
                    batch.bytes += len;
                    batch.joined.push(Joined {
                        item: req.into_inner().into_item(),
                        reply,
                    });
                    Role::Joined(rx)
                }
                Some(_) => Role::Alone(req),
                None if others == 0 => Role::Alone(req),
                None => {
                    *forming = Some(Forming {
                        joined: Vec::new(),
                        bytes: len,
                    });
                    Role::Lead(req)
                }
            }
        };
        let req = match role {
            Role::Alone(req) => return R::send_alone(ch, req).await,
            Role::Joined(rx) => {
                return match rx.await {
                    Ok(out) => typed::<R>(out?).map(Response::new),
                    Err(_) => Err(Status::unavailable(
                        "the call this write was batched with was cancelled",
                    )),
                }
            }
            Role::Lead(req) => req,
        };
        let mut lead = Lead {
            forming: &self.forming,
            taken: false,
        };
        // Let the callers ready to run on this thread join before the batch goes.
        tokio::task::yield_now().await;
        let joined = lead.take();
        if joined.is_empty() {
            return R::send_alone(ch, req).await;
        }
        let (metadata, extensions, own) = req.into_parts();
        // One pass: the leader's item first, then the joiners' in order, as results come back.
        let mut items = Vec::with_capacity(joined.len() + 1);
        items.push(BatchItem {
            request: Some(own.into_item()),
        });
        let mut replies = Vec::with_capacity(joined.len());
        for j in joined {
            items.push(BatchItem {
                request: Some(j.item),
            });
            replies.push(j.reply);
        }
        // The batch carries the leading request's metadata (its deadline).
        let batch = Request::from_parts(metadata, extensions, BatchRequest { items });
        let mut results = match self.send(ch, batch).await {
            Ok(results) => results,
            Err(status) => {
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
                return Err(status);
            }
        };
        let missing = || {
            Err(Status::internal(
                "the batch reply has fewer results than items",
            ))
        };
        let own = results.next().unwrap_or_else(missing);
        for reply in replies {
            let _ = reply.send(results.next().unwrap_or_else(missing));
        }
        typed::<R>(own?).map(Response::new)
    }

    /// Sends a batch and returns its items' results in order. A server without `Batch` is
    /// remembered, and the batch's writes fail their attempt once, to be sent alone.
    async fn send(
        &self,
        ch: Channel,
        batch: Request<BatchRequest>,
    ) -> Result<impl Iterator<Item = Result<Out, Status>>, Status> {
        let results = match KvClient::new(ch).batch(batch).await {
            Ok(resp) => resp.into_inner().results,
            Err(status) if status.code() == Code::Unimplemented => {
                self.unsupported.store(true, Ordering::Relaxed);
                return Err(Status::unavailable(
                    "the server takes no batches; sent alone next",
                ));
            }
            Err(status) => return Err(status),
        };
        Ok(results.into_iter().map(|r| match r.result {
            Some(Out::Error(e)) => Err(Status::new(Code::from_i32(e.code), e.message)),
            Some(out) => Ok(out),
            None => Err(Status::internal("a batch result was empty")),
        }))
    }
}

fn typed<R: Batchable>(out: Out) -> Result<R::Response, Status> {
    R::from_out(out).ok_or_else(|| Status::internal("a batch result of another kind"))
}
