//! Opening sockets from many source addresses and speaking the binary
//! protocol with as little per-socket state as possible, with
//! permessage-deflate when asked (`--deflate`).
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use switchboard_protocol::{
    Encoding,
    client::DeflateStream,
    deflate,
    v1::{ClientFrame, Connect, ServerFrame, client_frame, server_frame},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        protocol::{
            Role,
            frame::{
                Frame,
                coding::{Data, OpCode},
            },
        },
    },
};

use crate::recorder::Recorder;

/// A socket: TCP, its bytes counted ([`wire_bytes_read`]), under the
/// deflate stream (a pass-through unless `--deflate` was agreed).
pub(crate) type Ws = WebSocketStream<DeflateStream<Metered>>;

/// Largest message a socket accepts from the edge, inflated or not.
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Bytes read from every socket of this process, as they came off the
/// wire (WebSocket frames, compressed or not).
static WIRE_BYTES_READ: AtomicU64 = AtomicU64::new(0);

/// Bytes all of this process's sockets have read so far.
pub(crate) fn wire_bytes_read() -> u64 {
    WIRE_BYTES_READ.load(Ordering::Relaxed)
}

/// A TCP socket whose reads are counted in [`WIRE_BYTES_READ`] and,
/// where asked ([`Sources::kernel_stamps`]), stamped with the time the
/// kernel received their bytes.
pub(crate) struct Metered {
    stream: TcpStream,
    stamps: bool,
    /// Unix µs the kernel received the last bytes read (0: none yet).
    received_us: u64,
}

impl Metered {
    /// When the kernel received the bytes of the last read: with
    /// thousands of sockets on a few threads a frame may wait in its
    /// socket long after it arrived, and this leaves that wait out. A
    /// frame read across several reads gets the last one's time (never
    /// earlier than it arrived). `None` unless stamps were asked for.
    pub(crate) fn received_us(&self) -> Option<u64> {
        (self.received_us > 0).then_some(self.received_us)
    }

    fn poll_read_stamped(
        &mut self,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        use std::os::fd::AsRawFd;
        loop {
            std::task::ready!(self.stream.poll_read_ready(cx))?;
            let fd = self.stream.as_raw_fd();
            let unfilled = buf.initialize_unfilled();
            match self
                .stream
                .try_io(tokio::io::Interest::READABLE, || recv_stamped(fd, unfilled))
            {
                Ok((n, stamp)) => {
                    buf.advance(n);
                    if let Some(us) = stamp {
                        self.received_us = us;
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// One `recvmsg` and the kernel's receive time of what it read (unix µs;
/// SO_TIMESTAMPNS gives the time of the last segment read).
fn recv_stamped(fd: std::os::fd::RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<u64>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use nix::sys::time::TimeValLike;
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::empty())?;
    let mut stamp = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmTimestampns(ts) = c {
            stamp = u64::try_from(ts.num_microseconds()).ok();
        }
    }
    Ok((msg.bytes, stamp))
}

impl AsyncRead for Metered {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let polled = if me.stamps {
            me.poll_read_stamped(cx, buf)
        } else {
            Pin::new(&mut me.stream).poll_read(cx, buf)
        };
        let n = buf.filled().len() - before;
        if n > 0 {
            WIRE_BYTES_READ.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Initial read buffer per socket.
const READ_BUFFER_BYTES: usize = 512;

/// Where and how to connect; shared by every scenario.
#[derive(clap::Args)]
pub(crate) struct Target {
    /// Edge addresses (host:port, comma-separated); sockets are spread over
    /// them round-robin.
    #[arg(long, default_value = "127.0.0.1:8080", value_delimiter = ',')]
    pub(crate) addr: Vec<SocketAddr>,
    /// HS256 secret the edges verify tokens with.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET")]
    pub(crate) secret: String,
    /// Connects in flight at once (per worker process).
    #[arg(long, default_value_t = 200)]
    pub(crate) concurrency: usize,
    /// Source addresses 127.0.0.1..=127.0.0.N (to pass the ports limit).
    #[arg(long, default_value_t = 8)]
    pub(crate) sources: u8,
    /// Attempts per socket after a transient failure (503, timeout, reset),
    /// with full-jitter backoff as the bundled client does; 0: give up at once.
    #[arg(long, default_value_t = 4)]
    pub(crate) retries: u32,
    /// Take a refused upgrade (HTTP 503 or 429) as final instead of
    /// retrying it after Retry-After as apps do (to measure admission).
    #[arg(long)]
    pub(crate) no_retry: bool,
    /// Offer permessage-deflate on every socket (as browsers do): the edge
    /// then compresses frames from its --deflate-min-bytes on, and the
    /// sockets compress their own long requests. A socket the edge does
    /// not agree with fails.
    #[arg(long)]
    pub(crate) deflate: bool,
}

impl Target {
    /// The edge for socket number `i`.
    pub(crate) fn addr_for(&self, i: usize) -> SocketAddr {
        self.addr[i % self.addr.len()]
    }

    /// Source addresses for worker `offset`, retrying refused upgrades
    /// for up to `deadline` per socket unless `--no-retry`.
    pub(crate) fn sources(&self, offset: u32, deadline: Duration) -> Sources {
        let mut s = Sources::new(self.sources, offset);
        s.retry_for = (!self.no_retry).then_some(deadline);
        s.deflate = self.deflate;
        s
    }
}

/// Source addresses 127.0.0.1 ..= 127.0.0.N, used round-robin.
/// Also says how long a refused upgrade is retried and whether sockets
/// offer permessage-deflate (every socket of a scenario is opened with them).
pub(crate) struct Sources {
    count: u8,
    next: AtomicUsize,
    /// Longest a socket keeps retrying refused upgrades; None: never.
    retry_for: Option<Duration>,
    /// Offer permessage-deflate.
    pub(crate) deflate: bool,
    /// Stamp every read with the kernel's receive time ([`received_us`]).
    pub(crate) kernel_stamps: bool,
}

impl Sources {
    /// `offset` staggers the first address, so that workers started
    /// together do not all begin on 127.0.0.1.
    pub(crate) fn new(count: u8, offset: u32) -> Self {
        let count = count.max(1);
        Sources {
            count,
            next: AtomicUsize::new(offset as usize % count as usize),
            retry_for: None,
            deflate: false,
            kernel_stamps: false,
        }
    }

    fn pick(&self) -> std::net::Ipv4Addr {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.count as usize;
        std::net::Ipv4Addr::new(127, 0, 0, 1 + i as u8)
    }
}

/// An HS256 token for `user`, valid for a day.
pub(crate) fn token(secret: &str, user: &str) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 86_400;
    let claims = serde_json::json!({ "sub": user, "exp": exp });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

/// Sends one request; with deflate agreed, compressed from
/// `deflate::DEFAULT_MIN_BYTES` on (when that makes it smaller), as the
/// Rust client does.
pub(crate) async fn send(ws: &mut Ws, frame: ClientFrame) -> anyhow::Result<()> {
    let bytes = Encoding::Protobuf.encode_client(&frame);
    let packed = (ws.get_ref().is_agreed() && bytes.len() >= deflate::DEFAULT_MIN_BYTES)
        .then(|| deflate::compress(&bytes))
        .filter(|p| p.len() < bytes.len());
    let message = match packed {
        Some(p) => {
            let mut f = Frame::message(p, OpCode::Data(Data::Binary), true);
            f.header_mut().rsv1 = true;
            Message::Frame(f)
        }
        None => Message::binary(bytes),
    };
    ws.send(message).await?;
    Ok(())
}

/// Next server frame (pings are answered by tungstenite while reading).
pub(crate) async fn recv(ws: &mut Ws) -> anyhow::Result<ServerFrame> {
    loop {
        match ws.next().await.context("socket closed")?? {
            Message::Binary(b) => return Ok(Encoding::Protobuf.decode_server(&b, false)?),
            Message::Close(c) => bail!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// When the kernel received the bytes of the frame [`recv`] returned last
/// (unix µs), if the socket was opened with [`Sources::kernel_stamps`].
pub(crate) fn received_us(ws: &Ws) -> Option<u64> {
    ws.get_ref().get_ref().received_us()
}

/// Longest a socket may take from TCP connect to ConnectResult.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait for the reply to a request.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens a socket from the next source address and completes Connect.
pub(crate) async fn open(addr: SocketAddr, sources: &Sources, token: String) -> anyhow::Result<Ws> {
    // Boxed: the handshake's state would otherwise stay in every socket's
    // task for its whole life (about 3 KiB each).
    tokio::time::timeout(OPEN_TIMEOUT, Box::pin(open_now(addr, sources, token)))
        .await
        .map_err(|_| anyhow::anyhow!("no ConnectResult within {OPEN_TIMEOUT:?}"))?
}

/// [`open`], counted in the recorder as attempted, then established or
/// failed. A refused upgrade (503, 429) is retried as apps do: after its
/// Retry-After plus full jitter, while `sources` allow, each retry
/// counted by status; only a socket that never got in counts as failed.
pub(crate) async fn open_counted(
    rec: &Recorder,
    addr: SocketAddr,
    sources: &Sources,
    token: String,
) -> anyhow::Result<Ws> {
    rec.attempt();
    let deadline = sources.retry_for.map(|d| tokio::time::Instant::now() + d);
    loop {
        let e = match open(addr, sources, token.clone()).await {
            Ok(ws) => {
                rec.established();
                return Ok(ws);
            }
            Err(e) => e,
        };
        let refusal = e.downcast_ref::<UpgradeRefused>().filter(|r| r.retryable());
        if let Some(r) = refusal {
            if r.status == 503 {
                rec.refused();
            }
            let wait = r.retry_wait(rand::random_range(0.0..1.0));
            if deadline.is_some_and(|d| tokio::time::Instant::now() + wait < d) {
                rec.add_counter(&format!("refused_retried_{}", r.status), 1);
                tokio::time::sleep(wait).await;
                continue;
            }
        }
        rec.failed();
        return Err(e);
    }
}

/// The edge answered the upgrade with something other than 101.
#[derive(Debug, thiserror::Error)]
#[error("upgrade refused: HTTP {status}")]
pub(crate) struct UpgradeRefused {
    pub(crate) status: u16,
    /// The response's Retry-After, if it had one.
    pub(crate) retry_after: Option<Duration>,
}

/// Wait after a refusal without Retry-After.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Longest Retry-After honoured (a larger one is clamped).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

impl UpgradeRefused {
    /// Refusals an app retries: overload (503) and rate limits (429).
    pub(crate) fn retryable(&self) -> bool {
        matches!(self.status, 503 | 429)
    }

    /// Retry-After plus full jitter (`jitter` in 0..1 of it again), so
    /// that sockets refused together do not come back together.
    pub(crate) fn retry_wait(&self, jitter: f64) -> Duration {
        let base = self
            .retry_after
            .unwrap_or(DEFAULT_RETRY_AFTER)
            .min(MAX_RETRY_AFTER);
        base + base.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// The edge refused the upgrade with 503 (admission control).
#[cfg(test)]
pub(crate) fn is_refused(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<UpgradeRefused>(), Some(r) if r.status == 503)
}

/// Retries of a publish refused with a retryable code, as the bundled
/// client does (same client message id each time).
pub(crate) const PUBLISH_RETRIES: u32 = 4;
/// Full-jitter backoff between publish retries: base and cap.
const PUBLISH_RETRY_BASE: Duration = Duration::from_millis(100);
const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(2);

/// Error codes an app retries a publish on (the bundled client's set).
pub(crate) fn retryable_code(code: u32) -> bool {
    matches!(code, 429 | 500 | 503)
}

/// The wait before publish retry number `retry` (0 first): full jitter.
pub(crate) fn publish_retry_wait(retry: u32) -> Duration {
    let cap = PUBLISH_RETRY_BASE
        .saturating_mul(1 << retry.min(16))
        .min(PUBLISH_RETRY_MAX);
    cap.mul_f64(rand::random_range(0.0..1.0))
}

/// Longest upgrade response we read.
const MAX_RESPONSE_BYTES: usize = 2048;

/// The HTTP upgrade, written out here rather than by tungstenite's client
/// handshake: that one leaves its 4 KiB response buffer inside every socket
/// (collected in place into the frame codec), 4 GB at a million sockets.
/// The edge sends nothing after its 101 until our Connect, so reading up to
/// the blank line never takes a byte of the WebSocket stream. Returns
/// whether permessage-deflate was agreed (offered with `offer_deflate`).
async fn upgrade(
    stream: &mut TcpStream,
    addr: SocketAddr,
    offer_deflate: bool,
) -> anyhow::Result<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
    let key = generate_key();
    let offer = if offer_deflate {
        format!("Sec-WebSocket-Extensions: {}\r\n", deflate::CLIENT_OFFER)
    } else {
        String::new()
    };
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {}\r\n{offer}\r\n",
        Encoding::PROTOBUF_SUBPROTOCOL
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = [0u8; MAX_RESPONSE_BYTES];
    let mut len = 0;
    let end = loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            bail!("connection closed during the upgrade");
        }
        len += n;
        if let Some(i) = buf[..len].windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if len == buf.len() {
            bail!("upgrade response over {MAX_RESPONSE_BYTES} bytes");
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    response
        .parse(&buf[..end])
        .context("malformed upgrade response")?;
    let status = response.code.unwrap_or(0);
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if status != 101 {
        // Seconds only: the edge never sends an HTTP date.
        let retry_after = header("retry-after")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        return Err(UpgradeRefused {
            status,
            retry_after,
        }
        .into());
    }
    if header("sec-websocket-accept") != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
        bail!("upgrade response has a wrong Sec-WebSocket-Accept");
    }
    if header("sec-websocket-protocol") != Some(Encoding::PROTOBUF_SUBPROTOCOL.as_bytes()) {
        bail!("the edge did not choose {}", Encoding::PROTOBUF_SUBPROTOCOL);
    }
    if end != len {
        bail!("bytes after the upgrade response, before Connect");
    }
    let answer =
        header("sec-websocket-extensions").map(|v| std::str::from_utf8(v).unwrap_or("\u{fffd}"));
    let agreed = deflate::agreed(answer)?;
    match (offer_deflate, agreed) {
        (true, None) => bail!("the edge declined permessage-deflate (is its --deflate off?)"),
        (false, Some(_)) => bail!("the edge agreed to permessage-deflate, which was not offered"),
        (_, agreed) => Ok(agreed.is_some()),
    }
}

/// Sends request `frame` and waits for the reply with its id; pushes
/// that arrive meanwhile are dropped (nothing is expected before the
/// run starts). An Error reply is an error.
pub(crate) async fn request(ws: &mut Ws, frame: ClientFrame) -> anyhow::Result<ServerFrame> {
    let id = frame.id;
    send(ws, frame).await?;
    let wait = async {
        loop {
            let f = recv(ws).await?;
            if f.id != id {
                continue;
            }
            if let Some(server_frame::Kind::Error(e)) = &f.kind {
                bail!("request {id} refused: {} {}", e.code, e.message);
            }
            return Ok(f);
        }
    };
    tokio::time::timeout(REPLY_TIMEOUT, wait)
        .await
        .map_err(|_| anyhow::anyhow!("no reply to request {id} within {REPLY_TIMEOUT:?}"))?
}

/// Closes a socket politely and waits (briefly) for the edge's close.
pub(crate) async fn close(mut ws: Ws) {
    let _ = ws.close(None).await;
    let drain = async { while let Some(Ok(_)) = ws.next().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

async fn open_now(addr: SocketAddr, sources: &Sources, token: String) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    // The port is chosen at connect time and may be shared by sockets to
    // different edges: bind(addr, 0) alone reserves a port per socket and
    // searches the source's whole range for it, which slows every connect
    // as a source fills up.
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )?;
    socket.bind(SocketAddr::new(sources.pick().into(), 0))?;
    let mut stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr)).await??;
    let agreed = upgrade(&mut stream, addr, sources.deflate).await?;
    if sources.kernel_stamps {
        nix::sys::socket::setsockopt(
            &stream,
            nix::sys::socket::sockopt::ReceiveTimestampns,
            &true,
        )?;
    }
    let stream = Metered {
        stream,
        stamps: sources.kernel_stamps,
        received_us: 0,
    };
    let stream = if agreed {
        DeflateStream::agreed(stream, MAX_MESSAGE_BYTES)
    } else {
        DeflateStream::plain(stream)
    };
    // tungstenite allocates its read buffer up front (128 KiB by default):
    // at a million sockets every KiB here is a GB. Frames here are small and
    // the buffer grows for a larger one.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(0);
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Client, Some(config)).await;
    send(
        &mut ws,
        ClientFrame {
            id: 1,
            kind: Some(client_frame::Kind::Connect(Connect {
                token,
                ..Default::default()
            })),
        },
    )
    .await?;
    match recv(&mut ws).await?.kind {
        Some(server_frame::Kind::ConnectResult(_)) => Ok(ws),
        other => bail!("connect refused: {other:?}"),
    }
}

/// Unique to this process: client message ids start with it, so that a
/// second run against the same edges is not taken for retries of the
/// first (the router de-duplicates by sender and client message id).
pub(crate) fn run_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| format!("{:x}{:x}", crate::report::now_us(), std::process::id()))
}

/// A payload of `len` bytes (at least 16) carrying its send time and a
/// number (a post's index), so any receiver can time it.
pub(crate) fn stamped(len: usize, sent_us: u64, n: u64) -> bytes::Bytes {
    let mut p = vec![0u8; len.max(16)];
    p[..8].copy_from_slice(&sent_us.to_le_bytes());
    p[8..16].copy_from_slice(&n.to_le_bytes());
    p.into()
}

/// Words of the chat text in [`stamped_chat`] payloads.
const WORDS: &[&str] = &[
    "the", "meeting", "moved", "to", "tomorrow", "at", "ten", "can", "you", "send", "me", "latest",
    "draft", "please", "thanks", "sounds", "good", "I'll", "check", "with", "team", "and", "get",
    "back", "later", "today", "deploy", "finished", "without", "errors", "lunch", "anyone",
    "coffee", "review", "ticket", "merged", "release", "notes", "look", "great", "on", "my", "way",
    "running", "late", "sorry", "traffic", "call", "in", "five", "minutes", "did", "we", "ship",
    "fix", "for", "login", "bug", "yes", "no", "maybe", "tonight", "weekend", "plans", "photo",
    "from", "trip", "is", "here", "who", "has", "the", "keys", "office", "closed", "Monday",
    "budget", "approved", "customer", "asked", "about", "pricing", "invoice", "paid",
];
/// Display names of the authors of [`stamped_chat`] payloads.
const NAMES: &[&str] = &[
    "Alice Martin",
    "Bob Chen",
    "Carla Díaz",
    "Dmitri Ivanov",
    "Emeka Obi",
];

/// A realistic chat message of about `len` bytes: the 16-byte stamp of
/// [`stamped`], then the JSON an app would put in a message's payload
/// (ids, author, a text of random words, client info), different for every
/// `n`, as compressible as real messages are and no more.
pub(crate) fn stamped_chat(len: usize, sent_us: u64, n: u64) -> bytes::Bytes {
    use std::fmt::Write;
    // xorshift64, seeded by the post number: reproducible runs.
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let author = next() % 5000;
    let mut json = format!(
        r#"{{"type":"text","id":"m-{:016x}","author":{{"id":"user-{author}","name":"{}"}},"text":""#,
        next(),
        NAMES[(author % NAMES.len() as u64) as usize]
    );
    let tail = format!(
        r#"","mentions":[],"replyTo":{},"edited":false,"client":{{"platform":"web","version":"4.{}.{}"}}}}"#,
        if next() % 4 == 0 {
            format!("\"m-{:016x}\"", next())
        } else {
            "null".into()
        },
        next() % 20,
        next() % 10
    );
    let mut first = true;
    while 16 + json.len() + tail.len() < len {
        let word = WORDS[(next() % WORDS.len() as u64) as usize];
        let _ = write!(json, "{}{word}", if first { "" } else { " " });
        first = false;
    }
    json.push_str(&tail);
    let mut p = Vec::with_capacity(16 + json.len());
    p.extend_from_slice(&sent_us.to_le_bytes());
    p.extend_from_slice(&n.to_le_bytes());
    p.extend_from_slice(json.as_bytes());
    p.into()
}

/// (send time, number) of a [`stamped`] payload.
pub(crate) fn stamp(payload: &[u8]) -> Option<(u64, u64)> {
    let sent = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let n = payload
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes);
    Some((sent, n))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        time::Instant,
    };

    use super::*;

    /// Answers one upgrade request with `response(key)`.
    async fn server(response: fn(&str) -> String) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = tcp.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let key = req
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .to_string();
            tcp.write_all(response(&key).as_bytes()).await.unwrap();
            let _ = tcp.read(&mut buf).await;
        });
        addr
    }

    async fn try_upgrade(addr: SocketAddr) -> anyhow::Result<()> {
        let mut tcp = TcpStream::connect(addr).await?;
        assert!(!upgrade(&mut tcp, addr, false).await?);
        Ok(())
    }

    fn accept(key: &str) -> String {
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
            Encoding::PROTOBUF_SUBPROTOCOL
        )
    }

    #[tokio::test]
    async fn a_proper_101_upgrades() {
        try_upgrade(server(accept).await).await.unwrap();
    }

    #[tokio::test]
    async fn a_503_is_a_refusal() {
        let busy = |_: &str| "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\n".into();
        let err = try_upgrade(server(busy).await).await.unwrap_err();
        assert!(is_refused(&err), "{err:#}");
    }

    /// Refuses the first `refusals` upgrades with 503 + Retry-After: 1,
    /// then upgrades and answers Connect; returns when each came.
    async fn busy_then_open(refusals: usize) -> (SocketAddr, Arc<Mutex<Vec<Instant>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let seen = times.clone();
        tokio::spawn(async move {
            for n in 0.. {
                let (mut tcp, _) = listener.accept().await.unwrap();
                seen.lock().unwrap().push(Instant::now());
                let mut buf = vec![0u8; 4096];
                let len = tcp.read(&mut buf).await.unwrap();
                if n < refusals {
                    let busy = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\n";
                    tcp.write_all(busy.as_bytes()).await.unwrap();
                    continue;
                }
                let req = String::from_utf8_lossy(&buf[..len]).to_string();
                let key = req
                    .lines()
                    .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                    .unwrap()
                    .to_string();
                tcp.write_all(accept(&key).as_bytes()).await.unwrap();
                let mut ws = WebSocketStream::from_raw_socket(tcp, Role::Server, None).await;
                let _connect = ws.next().await;
                let reply = ServerFrame {
                    id: 1,
                    kind: Some(server_frame::Kind::ConnectResult(Default::default())),
                };
                ws.send(Message::binary(Encoding::Protobuf.encode_server(&reply)))
                    .await
                    .unwrap();
                let _ = ws.next().await;
                return;
            }
        });
        (addr, times)
    }

    #[tokio::test]
    async fn a_refused_upgrade_is_retried_after_retry_after() {
        let (addr, times) = busy_then_open(2).await;
        let rec = Recorder::new(&[], 0);
        let mut sources = Sources::new(1, 0);
        sources.retry_for = Some(Duration::from_secs(20));
        let ws = open_counted(&rec, addr, &sources, "t".into()).await;
        assert!(ws.is_ok(), "{:#}", ws.err().unwrap());
        let times = times.lock().unwrap().clone();
        assert_eq!(times.len(), 3);
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            // Retry-After: 1, plus up to as much jitter.
            assert!(gap >= Duration::from_millis(990), "{gap:?}");
            assert!(gap <= Duration::from_millis(2500), "{gap:?}");
        }
        let r = rec.report("t", serde_json::Value::Null, Default::default());
        assert_eq!(r.counter("refused_retried_503"), 2);
        assert_eq!(r.connections.refused_with_503, 2);
        assert_eq!((r.connections.established, r.connections.failed), (1, 0));
    }

    #[tokio::test]
    async fn without_retry_a_refusal_is_final() {
        let (addr, times) = busy_then_open(1).await;
        let rec = Recorder::new(&[], 0);
        let err = open_counted(&rec, addr, &Sources::new(1, 0), "t".into())
            .await
            .err()
            .unwrap();
        assert!(is_refused(&err));
        assert_eq!(times.lock().unwrap().len(), 1);
        let r = rec.report("t", serde_json::Value::Null, Default::default());
        assert_eq!((r.connections.established, r.connections.failed), (0, 1));
        assert_eq!(r.counter("refused_retried_503"), 0);
    }

    #[test]
    fn the_wait_is_retry_after_plus_full_jitter() {
        let r = UpgradeRefused {
            status: 429,
            retry_after: Some(Duration::from_secs(2)),
        };
        assert!(r.retryable());
        assert_eq!(r.retry_wait(0.0), Duration::from_secs(2));
        assert_eq!(r.retry_wait(1.0), Duration::from_secs(4));
        let never = UpgradeRefused {
            status: 3600,
            retry_after: Some(Duration::from_secs(3600)),
        };
        assert!(!never.retryable());
        assert_eq!(never.retry_wait(0.0), MAX_RETRY_AFTER);
    }

    #[tokio::test]
    async fn a_wrong_accept_key_or_missing_subprotocol_fails() {
        let wrong = |_: &str| accept("not-the-key");
        let err = try_upgrade(server(wrong).await).await.unwrap_err();
        assert!(err.to_string().contains("Sec-WebSocket-Accept"), "{err:#}");
        assert!(!is_refused(&err));
        let plain = |key: &str| accept(key).replace("Sec-WebSocket-Protocol", "X-Other");
        let err = try_upgrade(server(plain).await).await.unwrap_err();
        assert!(err.to_string().contains("did not choose"), "{err:#}");
    }

    #[tokio::test]
    async fn reads_carry_the_kernel_receive_time_when_asked() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        nix::sys::socket::setsockopt(
            &accepted,
            nix::sys::socket::sockopt::ReceiveTimestampns,
            &true,
        )
        .unwrap();
        let mut stamped = Metered {
            stream: accepted,
            stamps: true,
            received_us: 0,
        };
        assert_eq!(stamped.received_us(), None);
        // The kernel turns receive timestamps on for the whole stack in
        // deferred work after the first socket asks: a segment that
        // arrives before that carries none. Let it happen first.
        client.write_all(b"warm").await.unwrap();
        let mut warm = [0u8; 4];
        stamped.read_exact(&mut warm).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = crate::report::now_us();
        client.write_all(b"hello").await.unwrap();
        // Read well after the bytes arrived: the stamp is their arrival.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut buf = [0u8; 16];
        let n = stamped.read(&mut buf).await.unwrap();
        let after = crate::report::now_us();
        assert_eq!(&buf[..n], b"hello");
        let at = stamped.received_us().expect("a stamp");
        assert!(at >= before, "{at} < {before}");
        assert!(at + 40_000 < after, "stamped at the read, not the arrival");
    }

    #[test]
    fn chat_payloads_are_stamped_json_of_about_the_size() {
        let p = stamped_chat(600, 42, 7);
        assert_eq!(stamp(&p), Some((42, 7)));
        let json: serde_json::Value = serde_json::from_slice(&p[16..]).unwrap();
        assert_eq!(json["type"], "text");
        assert!((600..700).contains(&p.len()), "{} bytes", p.len());
        assert_ne!(
            stamped_chat(600, 42, 8)[16..],
            p[16..],
            "every post differs"
        );
        assert_eq!(stamped_chat(600, 42, 7), p, "and is reproducible");
    }

    #[tokio::test]
    async fn deflate_is_offered_and_must_be_agreed() {
        let agreeing = |key: &str| {
            accept(key).replace(
                "\r\n\r\n",
                "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n\r\n",
            )
        };
        let addr = server(agreeing).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        assert!(upgrade(&mut tcp, addr, true).await.unwrap());
        // Offered and declined: the run would measure something else.
        let addr = server(accept).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let err = upgrade(&mut tcp, addr, true).await.unwrap_err();
        assert!(err.to_string().contains("declined"), "{err:#}");
        // Agreed without an offer.
        let addr = server(agreeing).await;
        let err = try_upgrade(addr).await.unwrap_err();
        assert!(err.to_string().contains("not offered"), "{err:#}");
    }
}
