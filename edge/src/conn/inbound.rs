//! Inbound frames without an idle read buffer.
//!
//! fastwebsockets' reader allocates an 8 KiB buffer when it is created and
//! keeps it for the socket's life: at 19,000 idle sockets that is 150 MiB
//! holding nothing. [`Inbound`] waits for a frame header in 14 inline
//! bytes, then builds a fastwebsockets reader for that one frame and drops
//! it afterwards, so an idle socket owns no read buffer at all. For no byte
//! to be lost with the dropped reader, the stream it reads from ends at the
//! frame's last byte ([`FrameBounded`]): the header is read exactly and the
//! payload passes through capped at its announced length. Parsing frames
//! (masks, opcodes, UTF-8, size limits) stays fastwebsockets' job.
//!
//! fastwebsockets knows no extensions and refuses any RSV bit. On a socket
//! that negotiated permessage-deflate, the header of a compressed data
//! frame (RSV1 on a text or binary frame) is handed to it as a plain
//! binary frame, RSV1 cleared, and the frame comes back marked compressed
//! with its own opcode; the caller inflates the message. Anywhere else RSV1
//! stays set, and fastwebsockets refuses the frame.
use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError};
use tokio::io::{AsyncRead, ReadBuf};

/// Longest WebSocket frame header: 2 bytes, 8 of length, 4 of mask.
const MAX_HEADER: usize = 14;
/// RSV1 in a frame's first byte: permessage-deflate's "compressed" bit.
const RSV1: u8 = 0x40;
const OPCODE_TEXT: u8 = 0x1;
const OPCODE_BINARY: u8 = 0x2;

/// Reads one WebSocket frame at a time from `R`, holding no buffer between
/// frames. Pings are returned like other frames (auto-pong is off: the
/// caller answers them), so a ping never leaves a reader waiting.
pub(crate) struct Inbound<R> {
    io: FrameBounded<R>,
    max_message_bytes: usize,
}

impl<R: AsyncRead + Unpin> Inbound<R> {
    /// `deflate`: the socket negotiated permessage-deflate, so RSV1 marks a
    /// compressed message.
    pub(crate) fn new(io: R, max_message_bytes: usize, deflate: bool) -> Self {
        let mut io = FrameBounded::new(io);
        io.deflate = deflate;
        Inbound {
            io,
            max_message_bytes,
        }
    }

    /// The stream, once the socket is done with.
    pub(crate) fn into_inner(self) -> R {
        self.io.inner
    }

    /// The next frame, and whether it starts a compressed message (its
    /// payload as sent, still compressed); `obligated` receives what the
    /// protocol obliges us to send back (the echo of a close).
    pub(crate) async fn read_frame<F, E>(
        &mut self,
        obligated: &mut impl FnMut(Frame<'static>) -> F,
    ) -> Result<(Frame<'static>, bool), WebSocketError>
    where
        F: Future<Output = Result<(), E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    {
        // Wait for a whole header first: nothing is allocated while idle.
        poll_fn(|cx| self.io.poll_header(cx))
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => WebSocketError::UnexpectedEOF,
                _ => WebSocketError::IoError(e),
            })?;
        // Boxed with the reader: the frame's read state exists only while a
        // frame is arriving, not in every idle socket's task.
        let max = self.max_message_bytes;
        let compressed = self.io.compressed;
        let io = &mut self.io;
        Box::pin(async move {
            let (mut rd, _) =
                fastwebsockets::after_handshake_split(io, tokio::io::sink(), Role::Server);
            rd.set_max_message_size(max);
            rd.set_auto_close(true);
            rd.set_auto_pong(false);
            let frame = rd.read_frame(obligated).await?;
            // The payload is already owned (split off the reader's buffer);
            // only the type still borrows the reader.
            let payload = match frame.payload {
                Payload::Bytes(b) => Payload::Bytes(b),
                other => Payload::Owned(other.to_vec()),
            };
            let opcode = match compressed {
                Some(true) => OpCode::Text,
                Some(false) => OpCode::Binary,
                None => frame.opcode,
            };
            Ok((
                Frame::new(frame.fin, opcode, None, payload),
                compressed.is_some(),
            ))
        })
        .await
    }
}

/// An `AsyncRead` that ends each frame at its last byte: reads of the
/// header are exact (from inline storage), reads of the payload are capped
/// at what the header announced. Bytes of the next frame stay in the socket.
pub(crate) struct FrameBounded<R> {
    inner: R,
    header: [u8; MAX_HEADER],
    /// Header bytes read so far / needed / already handed to the reader
    /// (at most `MAX_HEADER`; bytes, as every idle socket holds these).
    have: u8,
    need: u8,
    given: u8,
    /// Payload bytes the reader may still take; `None` until the header is whole.
    payload_left: Option<u64>,
    /// permessage-deflate was negotiated: RSV1 may mark a compressed message.
    deflate: bool,
    /// This frame is compressed (RSV1 cleared before fastwebsockets saw it),
    /// and whether it was a text frame (handed over as binary, so that
    /// fastwebsockets does not check compressed bytes for UTF-8).
    compressed: Option<bool>,
}

impl<R: AsyncRead + Unpin> FrameBounded<R> {
    pub(crate) fn new(inner: R) -> Self {
        FrameBounded {
            inner,
            header: [0; MAX_HEADER],
            have: 0,
            need: 2,
            given: 0,
            payload_left: None,
            deflate: false,
            compressed: None,
        }
    }

    fn frame_done(&self) -> bool {
        self.payload_left == Some(0) && self.given == self.have
    }

    /// Completes the current frame's header, reading no byte past it. A
    /// finished frame makes room for the next header first.
    pub(crate) fn poll_header(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.frame_done() {
            (self.have, self.need, self.given, self.payload_left) = (0, 2, 0, None);
        }
        while self.payload_left.is_none() {
            let (have, need) = (usize::from(self.have), usize::from(self.need));
            let mut buf = ReadBuf::new(&mut self.header[have..need]);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut buf))?;
            let n = buf.filled().len();
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            // At most `need - have`, so within a header.
            self.have += n as u8;
            if self.have < self.need {
                continue;
            }
            let code = self.header[1] & 0x7f;
            let extended: usize = match code {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
            // At most `MAX_HEADER`.
            self.need = (2 + extended + mask) as u8;
            if self.have < self.need {
                continue;
            }
            let len = match extended {
                0 => u64::from(code),
                _ => self.header[2..2 + extended]
                    .iter()
                    .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
            };
            self.payload_left = Some(len);
            self.compressed = None;
            let (first, opcode) = (self.header[0], self.header[0] & 0x0f);
            if self.deflate && first & RSV1 != 0 && matches!(opcode, OPCODE_TEXT | OPCODE_BINARY) {
                self.compressed = Some(opcode == OPCODE_TEXT);
                self.header[0] = (first & !(RSV1 | 0x0f)) | OPCODE_BINARY;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for FrameBounded<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_header(cx))?;
        if this.given < this.have {
            let given = usize::from(this.given);
            let n = usize::from(this.have - this.given).min(buf.remaining());
            buf.put_slice(&this.header[given..given + n]);
            this.given += n as u8;
            return Poll::Ready(Ok(()));
        }
        let left = this.payload_left.unwrap_or(0);
        let cap = left.min(buf.remaining() as u64) as usize;
        if cap == 0 {
            return Poll::Ready(Ok(()));
        }
        let dst = buf.initialize_unfilled_to(cap);
        let mut part = ReadBuf::new(dst);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        buf.advance(n);
        this.payload_left = Some(left - n as u64);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use fastwebsockets::WebSocket;
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Frames as a client sends them (masked), encoded by fastwebsockets.
    async fn client_frames(frames: Vec<(OpCode, Vec<u8>)>) -> Vec<u8> {
        let (a, mut b) = tokio::io::duplex(1 << 22);
        let mut ws = WebSocket::after_handshake(a, Role::Client);
        for (op, payload) in frames {
            ws.write_frame(Frame::new(true, op, None, Payload::Owned(payload)))
                .await
                .unwrap();
        }
        drop(ws);
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut b, &mut out)
            .await
            .unwrap();
        out
    }

    fn no_obligation(_: Frame<'static>) -> std::future::Ready<Result<(), &'static str>> {
        std::future::ready(Ok(()))
    }

    /// Writes `bytes` in chunks of `chunk` with yields between them, so
    /// headers and payloads arrive split at every possible point.
    async fn read_back(bytes: Vec<u8>, chunk: usize, count: usize) -> Vec<(OpCode, Vec<u8>)> {
        let (mut tx, rx) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for part in bytes.chunks(chunk) {
                tx.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut inbound = Inbound::new(rx, 1 << 20, false);
        let mut got = Vec::new();
        for _ in 0..count {
            let (f, compressed) = inbound.read_frame(&mut no_obligation).await.unwrap();
            assert!(!compressed);
            got.push((f.opcode, f.payload.to_vec()));
        }
        writer.await.unwrap();
        got
    }

    #[tokio::test]
    async fn pipelined_frames_survive_a_reader_per_frame() {
        let sent = vec![
            (OpCode::Binary, b"connect".to_vec()),
            (OpCode::Text, b"{\"id\":2}".to_vec()),
            (OpCode::Ping, Vec::new()),
            (OpCode::Binary, vec![7; 300]),    // 16-bit length
            (OpCode::Binary, vec![9; 70_000]), // 64-bit length
            (OpCode::Binary, Vec::new()),
        ];
        let bytes = client_frames(sent.clone()).await;
        for chunk in [1, 2, 3, 7, 13, 4096, bytes.len()] {
            let got = read_back(bytes.clone(), chunk, sent.len()).await;
            assert_eq!(got, sent, "chunk size {chunk}");
        }
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_its_payload_is_read() {
        let bytes = client_frames(vec![(OpCode::Binary, vec![1; 5000])]).await;
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        tx.write_all(&bytes).await.unwrap();
        let mut inbound = Inbound::new(rx, 1024, false);
        let Err(err) = inbound.read_frame(&mut no_obligation).await else {
            panic!("expected an error")
        };
        assert!(matches!(err, WebSocketError::FrameTooLarge), "{err:?}");
    }

    #[tokio::test]
    async fn eof_between_frames_and_inside_a_frame() {
        let bytes = client_frames(vec![(OpCode::Binary, vec![5; 100])]).await;
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        tx.write_all(&bytes[..bytes.len() - 10]).await.unwrap();
        drop(tx);
        let mut inbound = Inbound::new(rx, 1 << 20, false);
        let Err(err) = inbound.read_frame(&mut no_obligation).await else {
            panic!("expected an error")
        };
        assert!(matches!(err, WebSocketError::UnexpectedEOF), "{err:?}");

        let (tx, rx) = tokio::io::duplex(64);
        drop(tx);
        let mut inbound = Inbound::new(rx, 1 << 20, false);
        let Err(err) = inbound.read_frame(&mut no_obligation).await else {
            panic!("expected an error")
        };
        assert!(matches!(err, WebSocketError::UnexpectedEOF), "{err:?}");
    }

    /// One masked client frame with this first byte (FIN, RSV, opcode),
    /// written by hand: fastwebsockets cannot set RSV bits.
    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x11, 0x22, 0x33, 0x44];
        let mut out = vec![first];
        if payload.len() < 126 {
            out.push(0x80 | payload.len() as u8);
        } else {
            out.push(0x80 | 126);
            out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    async fn read_one(
        bytes: Vec<u8>,
        deflate: bool,
    ) -> Result<(Frame<'static>, bool), WebSocketError> {
        let (mut tx, rx) = tokio::io::duplex(1 << 16);
        tx.write_all(&bytes).await.unwrap();
        let mut inbound = Inbound::new(rx, 1 << 20, deflate);
        inbound.read_frame(&mut no_obligation).await
    }

    #[tokio::test]
    async fn rsv1_marks_a_compressed_message_only_when_negotiated() {
        // Compressed bytes are not UTF-8; a text frame still comes back as text.
        let packed = [0xff, 0xfe, 0x00, 0x80, 0x12];
        let (f, compressed) = read_one(masked(0x80 | RSV1 | OPCODE_TEXT, &packed), true)
            .await
            .unwrap();
        assert!(compressed);
        assert_eq!(
            (f.opcode, f.fin, &f.payload[..]),
            (OpCode::Text, true, &packed[..])
        );
        let (f, compressed) = read_one(masked(RSV1 | OPCODE_BINARY, &[7; 300]), true)
            .await
            .unwrap();
        assert!(compressed);
        assert_eq!(
            (f.opcode, f.fin, f.payload.len()),
            (OpCode::Binary, false, 300)
        );
        // A plain frame on a compressing socket is just that.
        let (f, compressed) = read_one(masked(0x80 | OPCODE_TEXT, b"hi"), true)
            .await
            .unwrap();
        assert!(!compressed);
        assert_eq!((f.opcode, &f.payload[..]), (OpCode::Text, &b"hi"[..]));
        // Not negotiated, on a continuation or a control frame, or RSV2:
        // refused as fastwebsockets refuses any reserved bit.
        for (first, deflate) in [
            (0x80 | RSV1 | OPCODE_TEXT, false),
            (0x80 | RSV1, true),
            (0x80 | RSV1 | 0x9, true),
            (0x80 | 0x20 | OPCODE_BINARY, true),
        ] {
            let Err(err) = read_one(masked(first, b"x"), deflate).await else {
                panic!("{first:#x} was read");
            };
            assert!(
                matches!(err, WebSocketError::ReservedBitsNotZero),
                "{first:#x}: {err:?}"
            );
        }
    }
}
