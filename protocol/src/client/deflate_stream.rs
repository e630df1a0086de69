//! The receiving half of permessage-deflate for tungstenite, as a
//! transport under it.
//!
//! tungstenite 0.30 has no extension support (no `deflate` feature; the
//! pull requests adding one are still open) and fails a connection on any
//! frame with RSV1. [`DeflateStream`] sits between the socket and
//! tungstenite: once deflate is agreed it reads the server's frames as they
//! pass, and hands each compressed message (RSV1 on its first frame) to
//! tungstenite as one plain frame, inflated within a size limit. Without
//! context takeover every message inflates on its own, so nothing is kept
//! between messages: an idle socket owns no buffer. Sending compressed
//! messages needs no help: tungstenite writes a `Message::Frame` with RSV1
//! set as it is.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::deflate;

/// Longest HTTP response head read while looking for the extension answer.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Bytes read from the socket at a time while frames are parsed.
const CHUNK_BYTES: usize = 8 * 1024;

/// A socket for tungstenite that inflates compressed server messages (see
/// the module docs). Writes pass through untouched.
pub struct DeflateStream<S> {
    io: S,
    /// `None`: deflate not offered, every byte passes straight through.
    state: Option<Box<State>>,
}

struct State {
    phase: Phase,
    /// Bytes for the reader, passed through or made here, from `pos` on.
    out: Vec<u8>,
    pos: usize,
    max_message_bytes: usize,
    inflated: u64,
}

enum Phase {
    /// The HTTP response is arriving: held until whole, to read its answer.
    Head(Vec<u8>),
    /// Deflate agreed: frames parsed, compressed messages inflated.
    Frames(Frames),
    /// Deflate declined: everything passes through.
    Plain,
}

impl<S> DeflateStream<S> {
    /// A stream that does nothing: deflate was not offered.
    pub fn plain(io: S) -> Self {
        DeflateStream { io, state: None }
    }

    /// Before the HTTP upgrade: the response's `Sec-WebSocket-Extensions`
    /// answer, read as it passes ([`deflate::agreed`]), decides whether the
    /// frames after it are inflated. Messages inflating past
    /// `max_message_bytes` fail the stream.
    pub fn before_upgrade(io: S, max_message_bytes: usize) -> Self {
        Self::with(io, Phase::Head(Vec::new()), max_message_bytes)
    }

    /// After an upgrade whose answer agreed to deflate (the caller read it):
    /// the stream starts at the first frame.
    pub fn agreed(io: S, max_message_bytes: usize) -> Self {
        Self::with(io, Phase::Frames(Frames::new()), max_message_bytes)
    }

    fn with(io: S, phase: Phase, max_message_bytes: usize) -> Self {
        DeflateStream {
            io,
            state: Some(Box::new(State {
                phase,
                out: Vec::new(),
                pos: 0,
                max_message_bytes,
                inflated: 0,
            })),
        }
    }

    /// Whether compressed messages are inflated (false until the upgrade
    /// response has passed).
    pub fn is_agreed(&self) -> bool {
        matches!(
            self.state.as_deref(),
            Some(State {
                phase: Phase::Frames(_),
                ..
            })
        )
    }

    /// Compressed messages inflated so far.
    pub fn inflated_messages(&self) -> u64 {
        self.state.as_ref().map_or(0, |s| s.inflated)
    }

    /// The socket.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The socket, to set options on; reading from it directly would break
    /// the frame parsing.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }
}

impl State {
    fn feed(&mut self, input: &[u8]) -> io::Result<()> {
        match &mut self.phase {
            Phase::Plain => self.out.extend_from_slice(input),
            Phase::Frames(f) => f.feed(
                input,
                &mut self.out,
                self.max_message_bytes,
                &mut self.inflated,
            )?,
            Phase::Head(head) => {
                // Where "\r\n\r\n" can start that was not searched before.
                let from = head.len().saturating_sub(3);
                head.extend_from_slice(input);
                let end = head[from..]
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|i| from + i + 4);
                match end {
                    Some(end) => {
                        let mut head = std::mem::take(head);
                        let rest = head.split_off(end);
                        self.phase = if agreed_in(&head) {
                            Phase::Frames(Frames::new())
                        } else {
                            Phase::Plain
                        };
                        self.out.extend_from_slice(&head);
                        self.feed(&rest)?;
                    }
                    // Not an upgrade response we can read: tungstenite
                    // judges it; nothing here is inflated.
                    None if head.len() > MAX_HEAD_BYTES => {
                        let head = std::mem::take(head);
                        self.phase = Phase::Plain;
                        self.out.extend_from_slice(&head);
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }
}

/// Whether an HTTP response head is a 101 whose extension answer agrees to
/// deflate in a way this client follows.
fn agreed_in(head: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(head) else {
        return false;
    };
    let mut lines = text.split("\r\n");
    let switching = lines
        .next()
        .and_then(|status| status.split(' ').nth(1))
        .is_some_and(|code| code == "101");
    let mut answer = String::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("sec-websocket-extensions") {
            if !answer.is_empty() {
                answer.push(',');
            }
            answer.push_str(value.trim());
        }
    }
    switching && matches!(deflate::agreed(Some(&answer)), Ok(Some(_)))
}

/// The frame parser of an agreed stream. Server frames are unmasked; a
/// masked one (or one with other reserved bits) passes through for
/// tungstenite to refuse.
struct Frames {
    /// The frame header being read: 2 bytes, 8 of length, 4 of mask.
    header: [u8; 14],
    have: usize,
    need: usize,
    /// Payload bytes left in this frame; `None` while a header is read.
    left: Option<u64>,
    fin: bool,
    /// This frame belongs to the compressed message: kept, not passed.
    collecting: bool,
    /// The compressed message being read: its opcode and bytes so far.
    message: Option<(u8, Vec<u8>)>,
}

fn invalid(what: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Frames {
    fn new() -> Self {
        Frames {
            header: [0; 14],
            have: 0,
            need: 2,
            left: None,
            fin: false,
            collecting: false,
            message: None,
        }
    }

    fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        max: usize,
        inflated: &mut u64,
    ) -> io::Result<()> {
        while !input.is_empty() {
            let Some(left) = self.left else {
                let take = (self.need - self.have).min(input.len());
                self.header[self.have..self.have + take].copy_from_slice(&input[..take]);
                self.have += take;
                input = &input[take..];
                if self.have == 2 && self.need == 2 {
                    let extended = match self.header[1] & 0x7f {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
                    self.need = 2 + extended + mask;
                }
                if self.have == self.need {
                    self.start_frame(out)?;
                    if self.left == Some(0) {
                        self.end_frame(out, max, inflated)?;
                    }
                }
                continue;
            };
            let n = left.min(input.len() as u64) as usize;
            if self.collecting {
                if let Some((_, bytes)) = self.message.as_mut() {
                    if bytes.len() + n > max {
                        return Err(invalid(format!("compressed message over {max} bytes")));
                    }
                    bytes.extend_from_slice(&input[..n]);
                }
            } else {
                out.extend_from_slice(&input[..n]);
            }
            input = &input[n..];
            self.left = Some(left - n as u64);
            if left == n as u64 {
                self.end_frame(out, max, inflated)?;
            }
        }
        Ok(())
    }

    /// A whole header: keep the frame (part of a compressed message) or
    /// pass it on.
    fn start_frame(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        let (first, second) = (self.header[0], self.header[1]);
        let opcode = first & 0x0f;
        let masked = second & 0x80 != 0;
        let extended = self.need - 2 - if masked { 4 } else { 0 };
        let len = match extended {
            0 => u64::from(second & 0x7f),
            n => self.header[2..2 + n]
                .iter()
                .fold(0, |acc, b| (acc << 8) | u64::from(*b)),
        };
        let data = matches!(opcode, 0x1 | 0x2);
        let rsv = first & 0x70;
        self.collecting = if self.message.is_some() && opcode == 0 {
            if rsv != 0 {
                return Err(invalid("reserved bits on a continuation frame"));
            }
            true
        } else if self.message.is_some() && data {
            return Err(invalid("a new message inside a compressed one"));
        } else if rsv == 0x40 && data && !masked {
            self.message = Some((opcode, Vec::new()));
            true
        } else {
            out.extend_from_slice(&self.header[..self.need]);
            false
        };
        self.fin = first & 0x80 != 0;
        self.left = Some(len);
        (self.have, self.need) = (0, 2);
        Ok(())
    }

    /// The end of a frame's payload; the end of a compressed message
    /// becomes one plain frame.
    fn end_frame(&mut self, out: &mut Vec<u8>, max: usize, inflated: &mut u64) -> io::Result<()> {
        self.left = None;
        let whole = self.collecting && self.fin;
        self.collecting = false;
        if !whole {
            return Ok(());
        }
        let Some((opcode, packed)) = self.message.take() else {
            return Ok(());
        };
        let plain = deflate::inflate(&packed, max).map_err(invalid)?;
        let first = 0x80 | opcode;
        match plain.len() {
            n if n < 126 => out.extend_from_slice(&[first, n as u8]),
            n if n < 65536 => {
                out.extend_from_slice(&[first, 126]);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.extend_from_slice(&[first, 127]);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&plain);
        *inflated += 1;
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for DeflateStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(state) = this.state.as_deref_mut() else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        loop {
            if state.pos < state.out.len() {
                let n = (state.out.len() - state.pos).min(buf.remaining());
                buf.put_slice(&state.out[state.pos..state.pos + n]);
                state.pos += n;
                if state.pos == state.out.len() {
                    // Drained: an idle socket keeps no buffer.
                    (state.out, state.pos) = (Vec::new(), 0);
                }
                return Poll::Ready(Ok(()));
            }
            if matches!(state.phase, Phase::Plain) {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            let mut chunk = [0u8; CHUNK_BYTES];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // End of stream; a message cut short is tungstenite's to report.
                return Poll::Ready(Ok(()));
            }
            state.feed(read.filled())?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DeflateStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An unmasked server frame with this first byte.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(n as u8),
            n if n < 65536 => {
                out.push(126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(payload);
        out
    }

    type Duplex = tokio::io::DuplexStream;

    /// What a stream made by `make` reads from `wire`, arriving in chunks
    /// of `chunk` bytes.
    async fn through(
        make: impl FnOnce(Duplex) -> DeflateStream<Duplex>,
        wire: Vec<u8>,
        chunk: usize,
    ) -> (Vec<u8>, u64) {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut stream = make(rx);
        let writer = tokio::spawn(async move {
            for part in wire.chunks(chunk) {
                tx.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        (out, stream.inflated_messages())
    }

    const TEXT: &str =
        "{\"delivery\":{\"chat\":\"lobby\",\"payload\":\"hello hello hello hello hello\"}}";

    #[tokio::test]
    async fn compressed_messages_become_plain_frames_and_the_rest_passes() {
        let packed = deflate::compress(TEXT.as_bytes());
        let big: Vec<u8> = TEXT.bytes().cycle().take(70_000).collect();
        let (a, b) = packed.split_at(packed.len() / 2);
        let mut wire = Vec::new();
        wire.extend(frame(0x80 | 0x40 | 0x1, &packed));
        wire.extend(frame(0x82, b"plain"));
        // Fragmented, with a ping between the fragments.
        wire.extend(frame(0x40 | 0x2, a));
        wire.extend(frame(0x89, b"p"));
        wire.extend(frame(0x80, b));
        wire.extend(frame(0x80 | 0x40 | 0x2, &deflate::compress(&big)));
        wire.extend(frame(0x88, &[0x03, 0xe8]));
        let mut want = Vec::new();
        want.extend(frame(0x81, TEXT.as_bytes()));
        want.extend(frame(0x82, b"plain"));
        want.extend(frame(0x89, b"p"));
        want.extend(frame(0x82, TEXT.as_bytes()));
        want.extend(frame(0x82, &big));
        want.extend(frame(0x88, &[0x03, 0xe8]));
        for chunk in [1, 2, 3, 5, 64, 4096, wire.len()] {
            let (got, inflated) =
                through(|io| DeflateStream::agreed(io, 1 << 20), wire.clone(), chunk).await;
            assert_eq!(got, want, "chunk {chunk}");
            assert_eq!(inflated, 3);
        }
    }

    #[tokio::test]
    async fn the_upgrade_answer_decides() {
        let packed = frame(0xc1, &deflate::compress(TEXT.as_bytes()));
        let agreed = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
            Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n\r\n";
        let declined = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        let mut wire = agreed.as_bytes().to_vec();
        wire.extend(&packed);
        let (got, n) = through(|io| DeflateStream::before_upgrade(io, 1 << 20), wire, 7).await;
        let mut want = agreed.as_bytes().to_vec();
        want.extend(frame(0x81, TEXT.as_bytes()));
        assert_eq!((got, n), (want, 1));
        // Declined: RSV1 frames pass untouched, for tungstenite to refuse.
        let mut wire = declined.as_bytes().to_vec();
        wire.extend(&packed);
        let (got, n) = through(
            |io| DeflateStream::before_upgrade(io, 1 << 20),
            wire.clone(),
            5,
        )
        .await;
        assert_eq!((got, n), (wire, 0));
    }

    #[tokio::test]
    async fn bombs_and_garbage_fail_the_stream() {
        for payload in [
            deflate::compress(&vec![0u8; 1 << 20]),
            vec![0xff, 0xff, 0xff],
        ] {
            let (mut tx, rx) = tokio::io::duplex(1 << 16);
            tx.write_all(&frame(0xc2, &payload)).await.unwrap();
            drop(tx);
            let mut stream = DeflateStream::agreed(rx, 64 << 10);
            let err = stream.read_to_end(&mut Vec::new()).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        }
    }
}
