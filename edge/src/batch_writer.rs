//! Coalesces a socket's frames into one write per drained batch.
//!
//! fastwebsockets writes each frame as it is given (one syscall per frame).
//! The writer drains its mailbox in batches; this wrapper buffers what a
//! batch writes and hands it to the socket on `flush`, so a burst of
//! deliveries costs one syscall. tokio's `BufWriter` would do the same but
//! allocates its buffer up front, for every idle socket; this one
//! allocates on first use and gives large buffers back after each flush.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::AsyncWrite;

/// Buffered bytes above which a write flushes first (bounded memory).
const FLUSH_AT_BYTES: usize = 256 * 1024;
/// Capacity kept between batches; larger buffers are released.
const KEEP_BYTES: usize = 4 * 1024;

pub(crate) struct BatchWriter<W> {
    inner: W,
    buf: Vec<u8>,
    written: usize,
}

impl<W> BatchWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        BatchWriter {
            inner,
            buf: Vec::new(),
            written: 0,
        }
    }
}

impl<W: AsyncWrite + Unpin> BatchWriter<W> {
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        if self.buf.capacity() > KEEP_BYTES {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for BatchWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() + data.len() > FLUSH_AT_BYTES && !this.buf.is_empty() {
            ready!(this.poll_drain(cx))?;
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn nothing_reaches_the_socket_before_flush() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = BatchWriter::new(a);
        w.write_all(b"one").await.unwrap();
        w.write_all(b"two").await.unwrap();
        let mut got = [0u8; 6];
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(20), b.read_exact(&mut got))
                .await
                .is_err()
        );
        w.flush().await.unwrap();
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"onetwo");
        assert_eq!(w.buf.capacity(), KEEP_BYTES.min(w.buf.capacity()));
    }

    #[tokio::test]
    async fn large_batches_flush_early_and_release_memory() {
        let (a, mut b) = tokio::io::duplex(4 << 20);
        let mut w = BatchWriter::new(a);
        let chunk = vec![7u8; 100_000];
        for _ in 0..5 {
            w.write_all(&chunk).await.unwrap();
        }
        assert!(w.buf.len() <= FLUSH_AT_BYTES, "buffer stays bounded");
        w.flush().await.unwrap();
        assert_eq!(w.buf.capacity(), 0, "large buffers are given back");
        let mut all = vec![0u8; 500_000];
        b.read_exact(&mut all).await.unwrap();
        assert!(all.iter().all(|x| *x == 7));
    }
}
