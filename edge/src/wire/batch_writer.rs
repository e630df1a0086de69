//! A socket's outgoing frames, coalesced into one write per drained batch.
//!
//! Frames are appended synchronously (header from fastwebsockets'
//! `Frame::fmt_head`, then the payload) and handed to the socket by
//! `write_some`, so a burst of deliveries costs one syscall and the writer's
//! only await on the hot path is that write: awaiting fastwebsockets'
//! `write_frame` per frame made every socket's task carry its state
//! (hundreds of bytes per idle socket). The buffer is allocated on first
//! use and released once the batch is written, so idle sockets pay nothing.
//!
//! `write_some` is one step of a batch and may be dropped between steps
//! (the writer races it against close requests and the heartbeat): what
//! the socket took is remembered, so a batch never goes out twice or torn.
use std::{
    future::poll_fn,
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, Waker, ready},
};

use fastwebsockets::{Frame, OpCode, Payload};
use tokio::io::AsyncWrite;

/// Buffered bytes above which the writer should flush before buffering
/// more (bounded memory).
pub(crate) const FLUSH_AT_BYTES: usize = 256 * 1024;
/// Longest server frame header (no mask): 2 bytes plus 8 of length.
const MAX_HEAD: usize = 10;
/// RSV1 in a frame's first byte: permessage-deflate's "compressed" bit.
const RSV1: u8 = 0x40;

pub(crate) struct BatchWriter<W> {
    inner: W,
    buf: Vec<u8>,
    /// Bytes of `buf` the socket has taken.
    sent: usize,
    /// Frames buffered since the last `take_frames`, for metrics.
    frames: u32,
    /// The batch is written but the stream still owes a flush (TLS
    /// records buffered in rustls).
    unflushed: bool,
}

impl<W: AsyncWrite + Unpin> BatchWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        BatchWriter {
            inner,
            buf: Vec::new(),
            sent: 0,
            frames: 0,
            unflushed: false,
        }
    }

    /// Appends one unmasked, unfragmented frame (behind a batch that is
    /// still going out, if any).
    pub(crate) fn push(&mut self, opcode: OpCode, payload: &[u8]) {
        self.push_frame(opcode, false, payload);
    }

    /// Appends one unmasked, unfragmented frame, with RSV1 set when its
    /// payload is compressed (permessage-deflate; data frames only).
    pub(crate) fn push_frame(&mut self, opcode: OpCode, compressed: bool, payload: &[u8]) {
        let mut head = [0u8; MAX_HEAD + 4];
        let n = Frame::new(true, opcode, None, Payload::Borrowed(payload)).fmt_head(&mut head);
        // fastwebsockets' header has no RSV bits of its own.
        if compressed {
            head[0] |= RSV1;
        }
        self.buf.reserve(n + payload.len());
        self.buf.extend_from_slice(&head[..n]);
        self.buf.extend_from_slice(payload);
        self.frames = self.frames.saturating_add(1);
    }

    /// Hands one frame straight to an idle socket, without waiting and
    /// without buffering it first: the header and the shared payload go
    /// out in one vectored write, and only what the socket did not take
    /// is copied into the batch for the writer task (the fan-out's common
    /// case costs no allocation). Returns the bytes the socket took.
    /// A stream without vectored writes (TLS) buffers the frame and writes
    /// the batch as `poll_write_some` does.
    pub(crate) fn write_frame_now(
        &mut self,
        opcode: OpCode,
        compressed: bool,
        payload: &[u8],
    ) -> usize {
        let mut cx = Context::from_waker(Waker::noop());
        if self.pending() || !self.inner.is_write_vectored() {
            self.push_frame(opcode, compressed, payload);
            let mut took = 0;
            while self.pending() {
                match self.poll_write_some(&mut cx) {
                    Poll::Ready(Ok(n)) => took += n,
                    Poll::Ready(Err(_)) | Poll::Pending => break,
                }
            }
            return took;
        }
        let mut head = [0u8; MAX_HEAD + 4];
        let n = Frame::new(true, opcode, None, Payload::Borrowed(payload)).fmt_head(&mut head);
        if compressed {
            head[0] |= RSV1;
        }
        self.frames = self.frames.saturating_add(1);
        let total = n + payload.len();
        let parts = [IoSlice::new(&head[..n]), IoSlice::new(payload)];
        let took = match Pin::new(&mut self.inner).poll_write_vectored(&mut cx, &parts) {
            Poll::Ready(Ok(took)) => took.min(total),
            // Pending: the writer task waits for the socket. An error: the
            // writer meets it on its own write of what is buffered here.
            Poll::Ready(Err(_)) | Poll::Pending => 0,
        };
        if took < total {
            let rest = total - took;
            self.buf.reserve(rest);
            if took < n {
                self.buf.extend_from_slice(&head[took..n]);
                self.buf.extend_from_slice(payload);
            } else {
                self.buf.extend_from_slice(&payload[took - n..]);
            }
        } else if Pin::new(&mut self.inner).poll_flush(&mut cx).is_pending() {
            self.unflushed = true;
        }
        took
    }

    /// Frames buffered since the last call.
    pub(crate) fn take_frames(&mut self) -> u32 {
        std::mem::take(&mut self.frames)
    }

    /// A close frame with a code and a reason.
    pub(crate) fn push_close(&mut self, code: u16, reason: &[u8]) {
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason);
        self.push(OpCode::Close, &payload);
    }

    /// Bytes buffered and not yet taken by the socket.
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Whether anything is still owed to the socket.
    pub(crate) fn pending(&self) -> bool {
        self.buffered() > 0 || self.unflushed
    }

    /// One step of the batch: resolves with the bytes the socket took once
    /// it took some (0: the stream's own flush finished). Cancel-safe.
    pub(crate) async fn write_some(&mut self) -> io::Result<usize> {
        poll_fn(|cx| self.poll_write_some(cx)).await
    }

    pub(crate) fn poll_write_some(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut n = 0;
        if self.sent < self.buf.len() {
            n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
            if self.sent < self.buf.len() {
                return Poll::Ready(Ok(n));
            }
            // Released after every batch: an idle socket owns no buffer,
            // and a busy one pays one allocation per batch, not per frame.
            (self.buf, self.sent, self.unflushed) = (Vec::new(), 0, true);
        }
        if self.unflushed {
            match Pin::new(&mut self.inner).poll_flush(cx) {
                Poll::Ready(r) => {
                    self.unflushed = false;
                    r?;
                }
                // The batch itself went out: that is progress.
                Poll::Pending if n > 0 => return Poll::Ready(Ok(n)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(n))
    }

    /// Writes everything owed, however long the socket takes (the
    /// handshake, which has its own deadline).
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        while self.pending() {
            self.write_some().await?;
        }
        Ok(())
    }

    /// The stream, once the socket is done with.
    pub(crate) fn into_inner(self) -> W {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use fastwebsockets::{Role, WebSocket};

    use super::*;

    #[tokio::test]
    async fn nothing_reaches_the_socket_before_flush_and_frames_parse() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut w = BatchWriter::new(a);
        w.push(OpCode::Binary, b"one");
        w.push(OpCode::Text, &vec![b'x'; 300]); // 16-bit length
        w.push(OpCode::Binary, &vec![7; 70_000]); // 64-bit length
        w.push(OpCode::Ping, b"");
        w.push_close(4001, b"slow_consumer");
        let mut client = WebSocket::after_handshake(b, Role::Client);
        client.set_auto_pong(false);
        client.set_auto_close(false);
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(20), client.read_frame()).await;
        assert!(early.is_err(), "nothing is written before flush");
        w.flush().await.unwrap();
        assert_eq!(w.buf.capacity(), 0, "the batch is given back");
        let expect: [(OpCode, usize); 5] = [
            (OpCode::Binary, 3),
            (OpCode::Text, 300),
            (OpCode::Binary, 70_000),
            (OpCode::Ping, 0),
            (OpCode::Close, 15),
        ];
        for (op, len) in expect {
            let f = client.read_frame().await.unwrap();
            assert_eq!((f.opcode, f.payload.len()), (op, len));
            if op == OpCode::Close {
                assert_eq!(&f.payload[..2], &4001u16.to_be_bytes());
                assert_eq!(&f.payload[2..], b"slow_consumer");
            }
        }
    }

    #[tokio::test]
    async fn a_compressed_frame_has_rsv1_and_no_other_does() {
        let (a, _b) = tokio::io::duplex(1 << 20);
        let mut w = BatchWriter::new(a);
        w.push_frame(OpCode::Text, true, &[9; 300]);
        w.push_frame(OpCode::Binary, false, b"plain");
        w.push(OpCode::Ping, b"");
        assert_eq!(&w.buf[..4], &[0x80 | 0x40 | 0x1, 126, 1, 44]);
        assert_eq!(&w.buf[304..306], &[0x82, 5], "no RSV1 on a plain frame");
        assert_eq!(&w.buf[311..], &[0x89, 0]);
    }

    #[tokio::test]
    async fn a_batch_goes_out_in_steps_that_may_be_dropped() {
        // The socket takes 64 bytes, then nothing until the peer reads.
        let (a, b) = tokio::io::duplex(64);
        let mut w = BatchWriter::new(a);
        w.push(OpCode::Binary, &[7; 1000]);
        assert_eq!(w.write_some().await.unwrap(), 64);
        let wait = std::time::Duration::from_millis(20);
        assert!(
            tokio::time::timeout(wait, w.write_some()).await.is_err(),
            "no progress while the peer does not read"
        );
        assert!(w.pending());
        // A frame pushed while the batch waits goes out behind it.
        w.push(OpCode::Text, b"after");
        let reader = tokio::spawn(async move {
            let mut client = WebSocket::after_handshake(b, Role::Client);
            let mut got = Vec::new();
            for _ in 0..2 {
                let f = client.read_frame().await.unwrap();
                got.push((f.opcode, f.payload.to_vec()));
            }
            got
        });
        w.flush().await.unwrap();
        assert!(!w.pending());
        assert_eq!(w.buf.capacity(), 0, "the batch is given back");
        let got = reader.await.unwrap();
        assert_eq!(
            got[0],
            (OpCode::Binary, vec![7; 1000]),
            "not torn, not twice"
        );
        assert_eq!(got[1], (OpCode::Text, b"after".to_vec()));
        assert_eq!(w.take_frames(), 2);
    }

    #[tokio::test]
    async fn an_idle_socket_owns_no_buffer() {
        let (a, _b) = tokio::io::duplex(1 << 20);
        let mut w = BatchWriter::new(a);
        assert_eq!(w.buf.capacity(), 0, "nothing up front");
        w.push(OpCode::Binary, &[1; 100]);
        assert_eq!(w.buffered(), 102);
        w.flush().await.unwrap();
        assert_eq!((w.buffered(), w.buf.capacity()), (0, 0));
    }

    /// A TCP pair on loopback: the accepted end's owned write half (as an
    /// edge's socket writes) and the connecting end.
    async fn tcp_pair() -> (tokio::net::tcp::OwnedWriteHalf, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        let (_read, write) = server.into_split();
        // The read half may go: the write half keeps the stream open.
        (write, client)
    }

    #[tokio::test]
    async fn a_frame_written_now_goes_out_unbuffered_or_its_rest_is_kept() {
        let (w, client) = tcp_pair().await;
        let mut w = BatchWriter::new(w);
        // Taken whole: nothing buffered, nothing allocated.
        assert_eq!(w.write_frame_now(OpCode::Binary, false, b"small"), 7);
        assert!(!w.pending());
        assert_eq!(w.buf.capacity(), 0);
        // Larger than the socket takes while its peer does not read: the
        // rest waits in the batch, and a frame after it goes out behind.
        let big = vec![9u8; 4 << 20];
        let took = w.write_frame_now(OpCode::Binary, false, &big);
        assert!(took < big.len(), "the kernel took all of {took}");
        assert!(w.pending());
        // Behind a batch still owed it is buffered (the batch goes on).
        w.write_frame_now(OpCode::Text, false, b"after");
        assert!(w.pending());
        assert_eq!(w.take_frames(), 3);
        let reader = tokio::spawn(async move {
            let mut ws = WebSocket::after_handshake(client, Role::Client);
            ws.set_max_message_size(8 << 20);
            let mut got = Vec::new();
            for _ in 0..3 {
                let f = ws.read_frame().await.unwrap();
                got.push((f.opcode, f.payload.len(), f.payload.first().copied()));
            }
            got
        });
        w.flush().await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(got[0], (OpCode::Binary, 5, Some(b's')));
        assert_eq!(got[1], (OpCode::Binary, big.len(), Some(9)), "not torn");
        assert_eq!(got[2], (OpCode::Text, 5, Some(b'a')));
    }
}
