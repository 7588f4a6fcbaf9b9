//! A socket wrapper that lets HTTP/2 frames from concurrent calls share one TCP write.
//!
//! An HTTP/2 connection (h2) writes from its own task, which each call's task wakes when it
//! queues frames. tokio runs a task woken from a running task next (its LIFO slot), so under
//! load the connection task ran once per call and wrote each reply (or request) alone: about
//! one `writev` per call on each side, each a loopback packet that the sender and the
//! receiver both pay for in the kernel. Here the first write of a burst is put off until the
//! runtime thread has run the tasks that are ready (`tokio::task::yield_now`'s deferred
//! wake-up, which comes once the thread's run queue is empty, or when it next checks for I/O
//! events: every 61 tasks at the latest); the calls that completed meanwhile queue their
//! frames too, and the connection writes them together. With nothing else ready the write
//! goes out after one pass of the scheduler. At 64 writing clients on 3 members this took the
//! leader from 0.87 socket writes per call to 0.28, and the client from 0.94 to 0.16.
//!
//! The cost: a thread that blocks (the Raft core syncs the log in its task) keeps its deferred
//! wake-ups until it returns, as it keeps the task in its LIFO slot, so a write put off there
//! waits for that sync too (about 0.1-0.2 ms). And a lone call pays for nothing on each
//! side: a zero-timeout `epoll_wait` and a second poll of the connection, about a third of
//! the client's CPU for a lone write (BENCHMARKS.md, "Socket writes put off only where it
//! pays").
//!
//! So the deferral follows what it gains. A burst coalesced if more bytes were waiting when
//! it was released than at its first write. After [`MISSES_TO_STOP`] bursts in a row gained
//! nothing, bursts are written at once, except every [`PROBE_EVERY`]th, which is put off
//! again to see whether calls come together now; one that gains turns the deferral back on.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bursts in a row that gained nothing from being put off before bursts are written at once.
pub const MISSES_TO_STOP: u32 = 4;
/// While bursts are written at once, one in this many is put off as a probe.
pub const PROBE_EVERY: u32 = 16;

/// `io` with its writes deferred as described in the module docs.
#[derive(Debug)]
pub struct CoalescedWrites<T> {
    io: T,
    state: Burst,
    /// Put-off bursts in a row that gained nothing, up to [`MISSES_TO_STOP`].
    misses: u32,
    /// Bursts written at once since the last probe.
    since_probe: u32,
}

#[derive(Debug)]
enum Burst {
    /// Nothing written since the last flush.
    Idle,
    /// The first write was put off; writes wait until this is set by the deferred wake-up
    /// (wake-ups from elsewhere, such as another call queueing frames, do not end the wait).
    /// It wakes the task that tried that first write: the connection's own task, the only
    /// one that polls the socket. `first` is how many bytes the first write offered.
    PutOff { release: Arc<Release>, first: usize },
    /// Put off once already: write, until the next flush.
    Writing,
}

/// The deferred wake-up: marks the burst released, then wakes the connection's task.
#[derive(Debug)]
struct Release {
    released: AtomicBool,
    task: Waker,
}

impl Wake for Release {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.released.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl<T> CoalescedWrites<T> {
    pub fn new(io: T) -> Self {
        CoalescedWrites {
            io,
            state: Burst::Idle,
            misses: 0,
            since_probe: 0,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Whether to put off a write of `len` bytes: true from a burst's first write until the
    /// runtime thread has run what was ready then, unless recent bursts gained nothing by it.
    fn put_off(&mut self, cx: &mut Context<'_>, len: usize) -> bool {
        if let Burst::Idle = self.state {
            if !self.worth_putting_off() {
                self.state = Burst::Writing;
                return false;
            }
            let release = Arc::new(Release {
                released: AtomicBool::new(false),
                task: cx.waker().clone(),
            });
            // The first poll of a fresh `yield_now` hands the waker to the scheduler's deferred
            // list and returns `Pending`; dropping it leaves that wake-up in place. (Outside a
            // runtime it wakes at once, which releases the burst at once.)
            let _ = pin!(tokio::task::yield_now())
                .poll(&mut Context::from_waker(&Waker::from(release.clone())));
            self.state = Burst::PutOff {
                release,
                first: len,
            };
        }
        match &self.state {
            Burst::PutOff { release, .. } if !release.released.load(Ordering::Acquire) => true,
            &Burst::PutOff { first, .. } => {
                // More waiting than at the first write: other calls' frames joined the burst.
                if len > first {
                    self.misses = 0;
                } else {
                    self.misses = (self.misses + 1).min(MISSES_TO_STOP);
                }
                self.state = Burst::Writing;
                false
            }
            Burst::Idle | Burst::Writing => false,
        }
    }

    /// Whether a new burst should be put off: yes while putting off pays (or has not been
    /// shown not to), and as a probe once every [`PROBE_EVERY`] bursts when it does not.
    fn worth_putting_off(&mut self) -> bool {
        if self.misses < MISSES_TO_STOP {
            return true;
        }
        self.since_probe += 1;
        if self.since_probe >= PROBE_EVERY {
            self.since_probe = 0;
            return true;
        }
        false
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CoalescedWrites<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CoalescedWrites<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.put_off(cx, buf.len()) {
            return Poll::Pending;
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    /// Not vectored: h2 then copies frames of up to 1 KiB into its write buffer instead of
    /// keeping each larger message for a separate slice, so a burst of small calls still
    /// fits one buffer (and one write).
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.io).poll_flush(cx);
        if flushed.is_ready() {
            // h2 flushes after writing out everything it buffered: the burst is over.
            this.state = Burst::Idle;
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for CoalescedWrites<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {

    use futures::future::poll_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Counts the writes that reach it.
    #[derive(Default)]
    struct CountingSink {
        writes: usize,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for CountingSink {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes += 1;
            this.bytes.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_first_write_of_a_burst_waits_one_scheduler_pass_then_all_go_through() {
        let mut io = CoalescedWrites::new(CountingSink::default());
        // One burst: the first poll is put off (and the task woken again), the rest go on.
        io.write_all(b"one ").await.unwrap();
        io.write_all(b"two ").await.unwrap();
        io.flush().await.unwrap();
        // The next burst is put off again, and still arrives.
        io.write_all(b"three").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(io.get_ref().bytes, b"one two three");
        assert_eq!(io.get_ref().writes, 3);

        let mut first = pin!(io.write(b"!"));
        let polled = futures::poll!(first.as_mut());
        assert!(polled.is_pending(), "a burst's first write is put off");
        // Polled again before the scheduler ran its deferred wake-ups (as when another call's
        // frames wake the connection): still put off.
        let polled = futures::poll!(first.as_mut());
        assert!(
            polled.is_pending(),
            "only the deferred wake-up ends the wait"
        );
        assert_eq!(first.await.unwrap(), 1, "and then written");
    }

    /// One burst: writes `first` as its first write and, if that is put off, `then` once it
    /// is released (h2 offers its whole buffer again, grown by whatever joined), then
    /// flushes. Returns whether the first write was put off.
    async fn burst(io: &mut CoalescedWrites<CountingSink>, first: &[u8], then: &[u8]) -> bool {
        let mut polls = 0;
        poll_fn(|cx| {
            polls += 1;
            let buf = if polls == 1 { first } else { then };
            Pin::new(&mut *io).poll_write(cx, buf)
        })
        .await
        .unwrap();
        io.flush().await.unwrap();
        polls > 1
    }

    #[tokio::test]
    async fn bursts_that_gain_nothing_stop_being_put_off_and_a_probe_looks_again() {
        let mut io = CoalescedWrites::new(CountingSink::default());
        for _ in 0..MISSES_TO_STOP {
            assert!(burst(&mut io, b"x", b"x").await, "put off while it may pay");
        }
        for _ in 1..PROBE_EVERY {
            assert!(
                !burst(&mut io, b"x", b"x").await,
                "once it stopped paying, a burst goes at once"
            );
        }
        // The probe; other frames join it before its release, so it gains.
        assert!(
            burst(&mut io, b"p", b"pq").await,
            "every PROBE_EVERY-th burst is put off"
        );
        assert!(
            burst(&mut io, b"x", b"x").await,
            "a probe that gained turns the deferral back on"
        );
        let written = MISSES_TO_STOP + (PROBE_EVERY - 1) + 2 + 1;
        assert_eq!(io.get_ref().bytes.len(), written as usize);
    }

    #[tokio::test]
    async fn a_burst_that_gains_resets_the_count_of_those_that_did_not() {
        let mut io = CoalescedWrites::new(CountingSink::default());
        for _ in 0..MISSES_TO_STOP - 1 {
            assert!(burst(&mut io, b"x", b"x").await);
        }
        assert!(burst(&mut io, b"a", b"ab").await);
        for _ in 0..MISSES_TO_STOP {
            assert!(
                burst(&mut io, b"x", b"x").await,
                "it takes MISSES_TO_STOP lone bursts in a row again"
            );
        }
        assert!(!burst(&mut io, b"x", b"x").await);
    }

    #[tokio::test]
    async fn writes_through_a_real_socket_arrive_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut socket = CoalescedWrites::new(socket);
            let mut got = vec![0u8; 6];
            socket.read_exact(&mut got).await.unwrap();
            socket.write_all(&got).await.unwrap();
            socket.flush().await.unwrap();
        });
        let mut client = CoalescedWrites::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        client.write_all(b"hello!").await.unwrap();
        client.flush().await.unwrap();
        let mut echo = vec![0u8; 6];
        client.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, b"hello!");
        server.await.unwrap();
    }
}
