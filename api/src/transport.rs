//! A gRPC channel on `h2`: one HTTP/2 connection per endpoint, for `kord-client` and for the
//! members' peer calls (forwarding, read index, votes, snapshots).
//!
//! tonic's own channel runs on hyper's HTTP/2 client, which queues a request's body only once
//! the connection has opened the new stream and given it flow-control capacity. Every unary
//! call then left in three TCP writes (HEADERS, the message's DATA, an empty DATA ending the
//! stream), each a loopback packet both sides pay for: about half of the client's CPU in the
//! 64-client write row went to those writes (BENCHMARKS.md, "The client transport"). Here a
//! call's whole message is queued together with its headers, so the connection writes both in
//! one go, and several calls' frames share a write when they come together (the socket is
//! wrapped in [`CoalescedWrites`]).
//!
//! What tonic's channel did that this one must also do: connect lazily and again after the
//! connection is lost (each call that finds no live connection waits for one attempt, bounded
//! by the connect timeout), set `TCP_NODELAY`, and ping the server so that a connection to a
//! member that vanished without closing it (power loss, partition) is noticed and dropped.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::{poll_fn, BoxFuture};
use h2::client::SendRequest;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, Uri};
use http_body::{Body as _, Frame};
use tokio::net::TcpStream;
use tonic::body::Body;
use tonic::Status;

use crate::coalesce::CoalescedWrites;

/// HTTP/2 pings on every connection this often, and a connection whose ping is not answered
/// within the timeout is dropped: its calls fail as unavailable and the next call reconnects.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Flow-control windows as hyper's client sets them (h2's own 64 KiB would make a 1 MiB value
/// wait for window updates).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// A gRPC channel to one endpoint; clones share the connection.
#[derive(Clone)]
pub struct Channel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

struct Shared {
    /// `host:port`, for connecting and for error messages (shared with every response body).
    addr: Arc<str>,
    authority: Authority,
    connect_timeout: Duration,
    live: std::sync::Mutex<Option<Connection>>,
    /// One connection attempt at a time; callers that find none live wait for it.
    connecting: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Connection {
    id: u64,
    send: SendRequest<Bytes>,
}

static CONNECTION_IDS: AtomicU64 = AtomicU64::new(1);

impl Channel {
    /// A channel to `addr` (`host:port` or `http://host:port`); it connects on first use.
    pub fn lazy(addr: &str, connect_timeout: Duration) -> Result<Channel, String> {
        let trimmed = addr.trim().trim_end_matches('/');
        let host_port = match trimmed.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "scheme {scheme:?} is not supported (only http://, or none)"
                ))
            }
            None => trimmed,
        };
        let authority: Authority = host_port
            .parse()
            .map_err(|e| format!("not a host:port: {e}"))?;
        if authority.port_u16().is_none() {
            return Err("no port given (expected host:port)".into());
        }
        Ok(Channel {
            shared: Arc::new(Shared {
                addr: host_port.into(),
                authority,
                connect_timeout,
                live: std::sync::Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

impl tower_service::Service<Request<Body>> for Channel {
    type Response = Response<ResponseBody>;
    type Error = Status;
    type Future = BoxFuture<'static, Result<Response<ResponseBody>, Status>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Readiness is per call: h2 queues a stream beyond the server's concurrency limit.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let shared = self.shared.clone();
        Box::pin(async move { shared.call(req).await })
    }
}

impl Shared {
    async fn call(self: Arc<Self>, req: Request<Body>) -> Result<Response<ResponseBody>, Status> {
        let conn = self.connection().await?;
        let (mut parts, mut body) = req.into_parts();
        parts.uri = self.uri_for(&parts.uri)?;
        let head = Request::from_parts(parts, ());
        let mut send = conn
            .send
            .clone()
            .ready()
            .await
            .map_err(|e| self.lost(conn.id, &e))?;
        let (message, rest) = take_ready(&mut body)?;
        let ends = matches!(rest, Rest::Ended);
        let (response, mut stream) = send
            .send_request(head, ends && message.is_empty())
            .map_err(|e| self.lost(conn.id, &e))?;
        // Queued before the connection task next writes, so it leaves with the headers. h2
        // buffers it until the stream has flow-control capacity; it is one encoded message,
        // already bounded by the request size limit.
        if !message.is_empty() {
            stream
                .send_data(message, ends)
                .map_err(|e| status_of(&self.addr, &e))?;
        }
        match rest {
            Rest::Ended => {}
            Rest::Trailers(trailers) => stream
                .send_trailers(trailers)
                .map_err(|e| status_of(&self.addr, &e))?,
            // A streaming request: the rest follows as the caller produces it.
            Rest::More => {
                tokio::spawn(pipe(body, stream));
            }
        }
        let response = response.await.map_err(|e| status_of(&self.addr, &e))?;
        Ok(response.map(|recv| ResponseBody {
            recv,
            data_done: false,
            addr: self.addr.clone(),
        }))
    }

    /// The request's path on this endpoint (tonic's generated clients give only the path).
    fn uri_for(&self, uri: &Uri) -> Result<Uri, Status> {
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| Status::internal(format!("request URI for {}: {e}", self.addr)))
    }

    fn live(&self) -> Option<Connection> {
        self.live.lock().expect("connection slot poisoned").clone()
    }

    /// The live connection, connecting first if there is none.
    async fn connection(self: &Arc<Self>) -> Result<Connection, Status> {
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let _attempt = self.connecting.lock().await;
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let conn = self.connect().await?;
        *self.live.lock().expect("connection slot poisoned") = Some(conn.clone());
        Ok(conn)
    }

    async fn connect(self: &Arc<Self>) -> Result<Connection, Status> {
        let unavailable = |what: String| Status::unavailable(format!("{}: {what}", self.addr));
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(&*self.addr))
            .await
            .map_err(|_| {
                unavailable(format!(
                    "connect timed out after {}",
                    humantime::format_duration(self.connect_timeout)
                ))
            })?
            .map_err(|e| unavailable(format!("connect: {e}")))?;
        tcp.set_nodelay(true)
            .map_err(|e| unavailable(format!("TCP_NODELAY: {e}")))?;
        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(CoalescedWrites::new(tcp))
            .await
            .map_err(|e| unavailable(format!("HTTP/2 handshake: {e}")))?;
        let pings = connection
            .ping_pong()
            .expect("a new connection hands out its ping handle");
        let id = CONNECTION_IDS.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(drive(
            connection,
            pings,
            Arc::downgrade(self),
            id,
            self.addr.clone(),
        ));
        Ok(Connection { id, send })
    }

    /// Forgets connection `id` after a failure on it, so that the next call reconnects.
    fn lost(&self, id: u64, err: &h2::Error) -> Status {
        self.forget(id);
        status_of(&self.addr, err)
    }

    fn forget(&self, id: u64) {
        let mut live = self.live.lock().expect("connection slot poisoned");
        if live.as_ref().is_some_and(|c| c.id == id) {
            *live = None;
        }
    }
}

/// Runs one connection until it fails, closes or stops answering pings.
async fn drive(
    connection: h2::client::Connection<CoalescedWrites<TcpStream>, Bytes>,
    mut pings: h2::PingPong,
    shared: Weak<Shared>,
    id: u64,
    addr: Arc<str>,
) {
    tokio::pin!(connection);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + KEEP_ALIVE_INTERVAL,
        KEEP_ALIVE_INTERVAL,
    );
    let mut pong_due: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            done = &mut connection => {
                if let Err(e) = done {
                    tracing::debug!(%addr, error = %e, "connection closed");
                }
                break;
            }
            _ = tick.tick(), if pong_due.is_none() => {
                if pings.send_ping(h2::Ping::opaque()).is_err() {
                    break;
                }
                pong_due = Some(tokio::time::Instant::now() + KEEP_ALIVE_TIMEOUT);
            }
            pong = poll_fn(|cx| pings.poll_pong(cx)), if pong_due.is_some() => {
                if pong.is_err() {
                    break;
                }
                pong_due = None;
            }
            _ = tokio::time::sleep_until(pong_due.unwrap_or_else(tokio::time::Instant::now)),
                if pong_due.is_some() =>
            {
                tracing::debug!(%addr, "no ping answer within {:?}; dropping the connection", KEEP_ALIVE_TIMEOUT);
                break;
            }
        }
    }
    if let Some(shared) = shared.upgrade() {
        shared.forget(id);
    }
    // Dropping the connection fails its open streams, so their callers move on.
}

/// What follows the part of a request body that was ready at once.
enum Rest {
    Ended,
    Trailers(HeaderMap),
    More,
}

/// The request body's frames that are ready without waiting: for a unary call, its whole
/// encoded message and its end.
fn take_ready(body: &mut Body) -> Result<(Bytes, Rest), Status> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut first: Option<Bytes> = None;
    let mut more: Option<BytesMut> = None;
    let rest = loop {
        match Pin::new(&mut *body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => match (&mut first, &mut more) {
                    (None, _) => first = Some(data),
                    (Some(f), None) => {
                        let mut joined = BytesMut::from(&f[..]);
                        joined.extend_from_slice(&data);
                        more = Some(joined);
                    }
                    (Some(_), Some(joined)) => joined.extend_from_slice(&data),
                },
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => break Rest::Trailers(trailers),
                    Err(_) => continue,
                },
            },
            Poll::Ready(Some(Err(status))) => return Err(status),
            Poll::Ready(None) => break Rest::Ended,
            Poll::Pending => break Rest::More,
        }
    };
    let message = match more {
        Some(joined) => joined.freeze(),
        None => first.unwrap_or_default(),
    };
    Ok((message, rest))
}

/// Sends a streaming request's later frames as the caller produces them, within the stream's
/// flow-control window, until the body ends or the server resets the stream.
async fn pipe(mut body: Body, mut stream: h2::SendStream<Bytes>) {
    loop {
        stream.reserve_capacity(1);
        let ready = poll_fn(|cx| {
            if stream.poll_reset(cx).is_ready() {
                return Poll::Ready(false);
            }
            if stream.capacity() > 0 {
                return Poll::Ready(true);
            }
            loop {
                match stream.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(_))) if stream.capacity() > 0 => return Poll::Ready(true),
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(false),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await;
        if !ready {
            return;
        }
        let frame = poll_fn(|cx| {
            if stream.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        let Some(frame) = frame else { return };
        let sent = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let ends = body.is_end_stream();
                    let sent = stream.send_data(data, ends);
                    if ends {
                        return;
                    }
                    sent
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        let _ = stream.send_trailers(trailers);
                        return;
                    }
                    Err(_) => Ok(()),
                },
            },
            Some(Err(_)) => {
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// A response body read from the h2 stream, giving back flow-control capacity as it is read.
pub struct ResponseBody {
    recv: h2::RecvStream,
    data_done: bool,
    addr: Arc<str>,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Some(Err(status_of(&this.addr, &e))))
                }
                Poll::Ready(None) => this.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(status_of(&this.addr, &e)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// The gRPC status for a transport failure. A lost or refused connection or stream is
/// UNAVAILABLE, which the client retries elsewhere; a stream the server reset for another
/// reason keeps the mapping gRPC's HTTP/2 spec gives it.
fn status_of(addr: &str, err: &h2::Error) -> Status {
    let message = format!("{addr}: {err}");
    // A GOAWAY carries a reason too, but it ends the connection, not one stream's request.
    if err.is_go_away() {
        return Status::unavailable(message);
    }
    // No reason: an I/O or library failure of the connection.
    match err.reason() {
        Some(h2::Reason::REFUSED_STREAM) | None => Status::unavailable(message),
        Some(h2::Reason::CANCEL) => Status::cancelled(message),
        Some(h2::Reason::ENHANCE_YOUR_CALM) => Status::resource_exhausted(message),
        Some(_) => Status::internal(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A request body that yields the given frames, then `Pending` (if `open`) or its end.
    struct Frames {
        frames: VecDeque<Frame<Bytes>>,
        open: bool,
    }

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            match self.frames.pop_front() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None if self.open => Poll::Pending,
                None => Poll::Ready(None),
            }
        }
    }

    fn body(frames: Vec<Frame<Bytes>>, open: bool) -> Body {
        Body::new(Frames {
            frames: frames.into(),
            open,
        })
    }

    #[test]
    fn a_unary_message_is_taken_whole_with_its_end() {
        let mut b = body(
            vec![
                Frame::data(Bytes::from_static(b"ab")),
                Frame::data(Bytes::from_static(b"cd")),
            ],
            false,
        );
        let (message, rest) = take_ready(&mut b).expect("no error");
        assert_eq!(&message[..], b"abcd");
        assert!(matches!(rest, Rest::Ended));
    }

    #[test]
    fn a_streaming_body_hands_over_what_is_ready_and_the_rest_follows() {
        let mut b = body(vec![Frame::data(Bytes::from_static(b"first"))], true);
        let (message, rest) = take_ready(&mut b).expect("no error");
        assert_eq!(&message[..], b"first");
        assert!(matches!(rest, Rest::More));
        let mut empty = body(Vec::new(), true);
        let (message, rest) = take_ready(&mut empty).expect("no error");
        assert!(message.is_empty());
        assert!(matches!(rest, Rest::More));
    }

    #[test]
    fn trailers_end_the_ready_part() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-end", "1".parse().unwrap());
        let mut b = body(
            vec![
                Frame::data(Bytes::from_static(b"m")),
                Frame::trailers(trailers),
            ],
            false,
        );
        let (message, rest) = take_ready(&mut b).expect("no error");
        assert_eq!(&message[..], b"m");
        assert!(matches!(rest, Rest::Trailers(t) if t.get("x-end").is_some()));
    }

    #[test]
    fn endpoints_are_host_and_port_with_at_most_an_http_scheme() {
        let t = Duration::from_secs(1);
        for ok in [
            "127.0.0.1:7379",
            "http://kord-0.kord:7379/",
            " localhost:1 ",
        ] {
            Channel::lazy(ok, t).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        let err = Channel::lazy("https://h:7379", t).unwrap_err();
        assert!(err.contains("\"https\""), "{err}");
        let err = Channel::lazy("kord-0", t).unwrap_err();
        assert!(err.contains("no port"), "{err}");
        assert!(Channel::lazy("", t).is_err());
    }

    #[test]
    fn a_refused_stream_is_unavailable_and_other_resets_keep_their_meaning() {
        let refused = h2::Error::from(h2::Reason::REFUSED_STREAM);
        assert_eq!(status_of("a:1", &refused).code(), tonic::Code::Unavailable);
        let cancel = h2::Error::from(h2::Reason::CANCEL);
        assert_eq!(status_of("a:1", &cancel).code(), tonic::Code::Cancelled);
        let calm = h2::Error::from(h2::Reason::ENHANCE_YOUR_CALM);
        assert_eq!(
            status_of("a:1", &calm).code(),
            tonic::Code::ResourceExhausted
        );
        let internal = h2::Error::from(h2::Reason::INTERNAL_ERROR);
        let status = status_of("a:1", &internal);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(
            status.message().starts_with("a:1: "),
            "{}",
            status.message()
        );
    }
}
