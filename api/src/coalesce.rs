//! A socket wrapper that lets HTTP/2 frames from concurrent calls share one TCP write.
//!
//! An HTTP/2 connection (h2) writes from its own task, which each call's task wakes when it
//! queues frames. tokio runs a task woken from a running task next (its LIFO slot), so under
//! load the connection task ran once per call and wrote each reply (or request) alone: about
//! one `writev` per call on each side, each a loopback packet that the sender and the
//! receiver both pay for in the kernel. Here the first write of a burst is put off until the
//! runtime thread has run the tasks that are ready (`tokio::task::yield_now`, which resumes
//! the task once the thread's run queue is empty or after at most a scheduler tick); the calls
//! that completed meanwhile queue their frames too, and the connection writes them together.
//! With nothing else ready the write goes out after one pass of the scheduler.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `io` with its writes deferred as described in the module docs.
#[derive(Debug)]
pub struct CoalescedWrites<T> {
    io: T,
    /// This burst's first write was put off once already: write now, until the next flush.
    deferred: bool,
}

impl<T> CoalescedWrites<T> {
    pub fn new(io: T) -> Self {
        CoalescedWrites {
            io,
            deferred: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// Whether to put this write off: true the first time in a burst, after arranging for the
    /// task to be woken once the runtime thread has run what is ready.
    fn put_off(&mut self, cx: &mut Context<'_>) -> bool {
        if self.deferred {
            return false;
        }
        self.deferred = true;
        // The first poll of a fresh `yield_now` hands the waker to the scheduler's deferred
        // list and returns `Pending`; dropping it afterwards leaves that wake-up in place.
        pin!(tokio::task::yield_now()).poll(cx).is_pending()
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
        if this.put_off(cx) {
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
            this.deferred = false;
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Counts the writes that reach it.
    struct CountingSink {
        writes: Arc<AtomicUsize>,
        bytes: Vec<u8>,
    }

    impl AsyncWrite for CountingSink {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes.fetch_add(1, Ordering::SeqCst);
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
        let writes = Arc::new(AtomicUsize::new(0));
        let mut io = CoalescedWrites::new(CountingSink {
            writes: writes.clone(),
            bytes: Vec::new(),
        });
        // One burst: the first poll is put off (and the task woken again), the rest go on.
        io.write_all(b"one ").await.unwrap();
        io.write_all(b"two ").await.unwrap();
        io.flush().await.unwrap();
        // The next burst is put off again, and still arrives.
        io.write_all(b"three").await.unwrap();
        io.flush().await.unwrap();
        assert_eq!(io.get_ref().bytes, b"one two three");
        assert_eq!(writes.load(Ordering::SeqCst), 3);

        let mut first = pin!(io.write(b"!"));
        let polled = futures::poll!(first.as_mut());
        assert!(polled.is_pending(), "a burst's first write is put off");
        assert_eq!(first.await.unwrap(), 1, "and then written");
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
