//! Coalesced writes for one application connection.
//!
//! fe2o3-amqp writes every frame with a flush of its own, so each transfer became one `writev`
//! system call and one TCP segment: at ~90k transfers/s a third of the bridge's CPU was in the
//! kernel's send path. [`BatchedIo`] takes the connection's writes into a buffer and a writer
//! task of its own sends whatever gathered while its previous write was in progress, in one
//! call. A flush returns once the bytes are handed to that task, which starts on them at
//! once: nothing waits for more to come, so a lone frame goes out as soon as before.
//!
//! The buffer is bounded ([`BUFFER_LIMIT`]): a peer that does not read holds up the writes of
//! its own connection (back-pressure to fe2o3's engine), nothing else. A failed write fails
//! every later write, flush and shutdown with the same error kind.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

/// Bytes a connection may have waiting for its writer task before its writes wait.
pub(crate) const BUFFER_LIMIT: usize = 256 * 1024;

/// Capacity a buffer keeps after a larger batch went out.
const KEPT_CAPACITY: usize = 16 * 1024;

/// The read half of a stream, and writes that go to the stream's writer task.
pub(crate) struct BatchedIo<R> {
    read: R,
    shared: Arc<Shared>,
}

impl<R> std::fmt::Debug for BatchedIo<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchedIo").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the writer task: bytes arrived, or the connection is closing.
    work: Notify,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// No more writes come: the writer sends what is pending and shuts the stream down.
    closing: bool,
    /// The writer task has finished (shut down, or failed).
    done: bool,
    failed: Option<io::ErrorKind>,
    /// The connection's task, waiting for room or for the shutdown to finish.
    waiting: Option<Waker>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl State {
    fn check(&self) -> io::Result<()> {
        match self.failed {
            Some(kind) => Err(io::Error::new(kind, "the connection's writer failed")),
            None => Ok(()),
        }
    }

    fn wake_waiting(&mut self) {
        if let Some(w) = self.waiting.take() {
            w.wake();
        }
    }
}

/// Splits `stream` into a [`BatchedIo`] for the AMQP engine and the writer task that owns the
/// stream's write half (spawned here).
pub(crate) fn batched<S>(stream: S) -> BatchedIo<tokio::io::ReadHalf<S>>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(stream);
    let shared = Arc::new(Shared::default());
    tokio::spawn(write_out(write, shared.clone()));
    BatchedIo { read, shared }
}

async fn write_out<W: AsyncWrite + Unpin>(mut write: W, shared: Arc<Shared>) {
    let mut batch = Vec::new();
    let result: io::Result<()> = async {
        loop {
            let closing = {
                let mut s = shared.state();
                std::mem::swap(&mut batch, &mut s.pending);
                // Room again for the connection's writes.
                s.wake_waiting();
                s.closing
            };
            if !batch.is_empty() {
                write.write_all(&batch).await?;
                // A TLS stream may keep encrypted records when the socket would block: the
                // flush sends them, as fe2o3's own flush did.
                write.flush().await?;
                batch.clear();
                // A burst does not leave its buffer behind on an idle connection.
                if batch.capacity() > KEPT_CAPACITY {
                    batch.shrink_to(KEPT_CAPACITY);
                }
                continue;
            }
            if closing {
                return write.shutdown().await;
            }
            shared.work.notified().await;
        }
    }
    .await;
    let mut s = shared.state();
    if let Err(e) = result {
        s.failed = Some(e.kind());
    }
    s.done = true;
    s.wake_waiting();
}

impl<R: AsyncRead + Unpin> AsyncRead for BatchedIo<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl<R: Unpin> AsyncWrite for BatchedIo<R> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut s = self.shared.state();
        s.check()?;
        if s.closing || s.done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if s.pending.len() >= BUFFER_LIMIT {
            s.waiting = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(BUFFER_LIMIT - s.pending.len());
        let was_empty = s.pending.is_empty();
        s.pending.extend_from_slice(&buf[..n]);
        drop(s);
        if was_empty {
            self.shared.work.notify_one();
        }
        Poll::Ready(Ok(n))
    }

    /// Done once the bytes are the writer task's: it writes them without waiting for more.
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.shared.state().check())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = self.shared.state();
        if s.done {
            return Poll::Ready(s.check());
        }
        s.waiting = Some(cx.waker().clone());
        if !s.closing {
            s.closing = true;
            drop(s);
            self.shared.work.notify_one();
        }
        Poll::Pending
    }
}

impl<R> Drop for BatchedIo<R> {
    /// What is pending still goes out; then the writer shuts the stream down and ends.
    fn drop(&mut self) {
        self.shared.state().closing = true;
        self.shared.work.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn flushed_frames_arrive_in_order_and_shutdown_sends_the_rest() {
        let (ours, mut peer) = tokio::io::duplex(64);
        let mut io = batched(ours);
        let mut expected = Vec::new();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            got
        });
        for i in 0..2_000u32 {
            let frame = i.to_be_bytes();
            io.write_all(&frame).await.unwrap();
            io.flush().await.unwrap();
            expected.extend_from_slice(&frame);
        }
        io.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), expected);
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_holds_up_writes_at_the_limit() {
        let (ours, peer) = tokio::io::duplex(1024);
        let mut io = batched(ours);
        let chunk = vec![7u8; 4096];
        let mut written = 0usize;
        let stuck = tokio::time::timeout(std::time::Duration::from_millis(300), async {
            loop {
                io.write_all(&chunk).await.unwrap();
                written += chunk.len();
            }
        })
        .await;
        assert!(stuck.is_err(), "writes never waited");
        // The limit, plus what the writer task holds and the pipe took.
        assert!(
            written <= 2 * BUFFER_LIMIT + 1024 + chunk.len(),
            "{written} bytes taken"
        );
        assert!(written >= BUFFER_LIMIT, "{written} bytes taken");
        drop(peer);
    }

    #[tokio::test]
    async fn a_failed_write_fails_the_next_ones() {
        let (ours, peer) = tokio::io::duplex(16);
        drop(peer);
        let mut io = batched(ours);
        io.write_all(b"lost").await.unwrap();
        io.flush().await.unwrap();
        let mut failed = false;
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            if io.write_all(b"x").await.is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed, "the writer's failure never reached the connection");
        assert!(io.shutdown().await.is_err());
    }
}
