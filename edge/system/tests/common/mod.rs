//! Shared helpers of the system tests: start a real edge on 127.0.0.1:0
//! and talk to it over real sockets.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard_edge::{AuthConfig, Claims, Config, Edge};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{
        Message, client::IntoClientRequest, http::HeaderValue, protocol::frame::coding::CloseCode,
    },
};

pub mod cluster;

pub const SECRET: &str = "integration-test-secret";

/// The edge binary: `switchboard_edge::main`, built fresh by cargo for
/// this test run (this package's `system-edge`).
pub const EDGE_BIN: &str = env!("CARGO_BIN_EXE_system-edge");
/// The router binary: `switchboard_router_server::main` (`system-router`).
pub const ROUTER_BIN: &str = env!("CARGO_BIN_EXE_system-router");

pub fn config() -> Config {
    let mut c = Config::for_secret(SECRET);
    // Tests of everything but authorization use chats freely; the modes
    // have tests of their own (authorization.rs).
    c.authz.mode = switchboard_edge::ChatAuthMode::Open;
    // Tests publish much faster than people do; the limit has tests of its
    // own (limits.rs).
    c.rate_publish = switchboard_edge::Rate {
        per_sec: 100_000.0,
        burst: 100_000.0,
    };
    c
}

pub async fn start(config: Config) -> Edge {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Edge::start(config, listener).unwrap()
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn claims(user: &str) -> Claims {
    Claims {
        sub: user.into(),
        exp: now_secs() + 3600,
        nbf: None,
        iat: None,
        aud: None,
        iss: None,
        chats: None,
        chat: None,
    }
}

pub fn token_for(claims: &impl serde::Serialize) -> String {
    AuthConfig::new(Some(SECRET.as_bytes().to_vec()), None, None, None, 0)
        .unwrap()
        .mint_hs256(claims)
        .unwrap()
}

pub fn token(user: &str) -> String {
    token_for(&claims(user))
}

pub fn ws_url(edge: &Edge) -> String {
    format!("ws://{}/ws", edge.addr())
}

/// A bare JSON-protocol socket, for tests that need to misbehave.
pub struct Raw {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub next_id: u32,
    /// Pushes read while waiting for a reply, handed out by `next` first.
    pub skipped: std::collections::VecDeque<Value>,
}

impl Raw {
    pub async fn open(edge: &Edge, subprotocol: &str) -> Raw {
        Raw::open_addr(edge.addr(), subprotocol).await
    }

    pub async fn open_addr(addr: std::net::SocketAddr, subprotocol: &str) -> Raw {
        let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(subprotocol).unwrap(),
        );
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("upgrade");
        Raw::new(ws)
    }

    /// Wraps a socket that finished its upgrade.
    pub fn new(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Raw {
        Raw {
            ws,
            next_id: 1,
            skipped: Default::default(),
        }
    }

    /// Completes Connect as `user`.
    pub async fn connect_as(mut self, user: &str) -> Raw {
        let reply = self
            .request(json!({"connect": {"token": token(user)}}))
            .await;
        assert!(
            reply.get("connectResult").is_some(),
            "connect failed: {reply}"
        );
        self
    }

    /// Opens a JSON socket and completes Connect as `user`.
    pub async fn connected(edge: &Edge, user: &str) -> Raw {
        Raw::connected_addr(edge.addr(), user).await
    }

    /// Opens a JSON socket to `addr` and completes Connect as `user`.
    pub async fn connected_addr(addr: std::net::SocketAddr, user: &str) -> Raw {
        Raw::open_addr(addr, "switchboard.v1.json")
            .await
            .connect_as(user)
            .await
    }

    /// Opens a JSON socket over a TCP connection whose receive buffer is
    /// `rcvbuf` bytes (which also stops the kernel growing it), and
    /// completes Connect as `user`. Returns it with its local port.
    pub async fn with_rcvbuf(addr: std::net::SocketAddr, user: &str, rcvbuf: u32) -> (Raw, u16) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // Before connect, so the window scale is chosen for it.
        socket.set_recv_buffer_size(rcvbuf).unwrap();
        let tcp = socket.connect(addr).await.unwrap();
        let port = tcp.local_addr().unwrap().port();
        let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("switchboard.v1.json"),
        );
        let (ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp))
            .await
            .unwrap();
        (Raw::new(ws).connect_as(user).await, port)
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    /// Sends a request with a fresh id and returns the reply with that id
    /// (pushes that arrive first are skipped).
    pub async fn request(&mut self, mut v: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        v["id"] = json!(id);
        self.send(v).await;
        loop {
            let msg = self
                .read_within(Duration::from_secs(5))
                .await
                .expect("socket closed before reply");
            if msg.get("id").and_then(Value::as_u64) == Some(id as u64) {
                return msg;
            }
            self.skipped.push_back(msg);
        }
    }

    /// Next JSON frame, or None when the socket closed / timed out.
    pub async fn next(&mut self) -> Option<Value> {
        self.next_within(Duration::from_secs(5)).await
    }

    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        if let Some(v) = self.skipped.pop_front() {
            return Some(v);
        }
        self.read_within(wait).await
    }

    async fn read_within(&mut self, wait: Duration) -> Option<Value> {
        loop {
            let msg = tokio::time::timeout(wait, self.ws.next())
                .await
                .ok()??
                .ok()?;
            match msg {
                Message::Text(t) => {
                    return Some(serde_json::from_str(&t).expect("server sent invalid JSON"));
                }
                Message::Binary(_) => panic!("binary frame on a JSON socket"),
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Reads until the close frame; returns its code and every JSON frame before it.
    pub async fn until_close(&mut self) -> (Option<u16>, Vec<Value>) {
        let mut frames = Vec::new();
        loop {
            let msg = match tokio::time::timeout(Duration::from_secs(10), self.ws.next()).await {
                Ok(Some(Ok(m))) => m,
                _ => return (None, frames),
            };
            match msg {
                Message::Text(t) => frames.push(serde_json::from_str(&t).unwrap()),
                Message::Close(c) => return (c.map(|c| u16::from(c.code)), frames),
                _ => {}
            }
        }
    }

    /// Collects deliveries until `n` arrived (or 5 s passed).
    pub async fn deliveries(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next().await {
                Some(v) => {
                    if let Some(d) = v.get("delivery") {
                        out.push(d.clone());
                    }
                }
                None => break,
            }
        }
        out
    }

    /// Asserts no delivery arrives within `wait`.
    pub async fn assert_no_delivery(&mut self, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(v)) = tokio::time::timeout_at(deadline, self.next_within(wait)).await {
            assert!(v.get("delivery").is_none(), "unexpected delivery {v}");
        }
    }
}

pub fn close_code(code: CloseCode) -> u16 {
    u16::from(code)
}

/// The text of a delivery's base64 payload.
pub fn payload_text(d: &Value) -> String {
    use base64::Engine;
    let b64 = d["payload"].as_str().unwrap_or("");
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

pub fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

pub fn seq(v: &Value) -> u64 {
    match &v["seq"] {
        Value::String(s) => s.parse().unwrap(),
        Value::Number(n) => n.as_u64().unwrap(),
        _ => 0,
    }
}

/// A port nobody listens on right now, to hand to a child process.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (at most 20 s) until something accepts on `addr`.
pub async fn wait_listening(addr: std::net::SocketAddr, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not listen on {addr}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` over plain HTTP/1.1: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

/// The value of an unlabelled series on a node's `/metrics`.
pub async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let (_, out) = http_get(addr, "/metrics").await;
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not on {addr}/metrics"))
}

/// The hops a node records (`switchboard_hop_seconds{hop}`), in path order.
pub const HOPS: [&str; 5] = ["ack", "sequence", "bus", "queue", "fanout"];

/// How many times a node's `/metrics` counted `hop`
/// (`switchboard_hop_seconds_count{hop="..."}`); `None` when the series is
/// not there.
pub fn hop_count(metrics: &str, hop: &str) -> Option<f64> {
    let series = format!("switchboard_hop_seconds_count{{hop=\"{hop}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits (up to 5 s) until each of `hops` was counted at least `n` times on
/// `addr`'s `/metrics`: a fan-out is recorded after its last push, so the
/// scrape may come just before it. Panics with the counts seen otherwise.
pub async fn wait_for_hops(addr: std::net::SocketAddr, hops: &[&str], n: usize) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, text) = http_get(addr, "/metrics").await;
        let counts: Vec<_> = hops.iter().map(|h| (*h, hop_count(&text, h))).collect();
        if counts.iter().all(|(_, c)| c.is_some_and(|c| c >= n as f64)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{addr}: expected each hop counted >= {n} times, got {counts:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Joins the chunks of a `Transfer-Encoding: chunked` body.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// One end of a loopback TCP connection in the kernel's table, in any
/// state (TIME_WAIT and orphans included): `(state, send queue bytes)`.
pub fn tcp_end(local_port: u16, peer_port: u16) -> Option<(u8, u64)> {
    let hex_port = |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap(), 16).unwrap();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if hex_port(cols[1]) == local_port && hex_port(cols[2]) == peer_port {
                let state = u8::from_str_radix(cols[3], 16).unwrap();
                let queued = cols[4].split(':').next().unwrap();
                return Some((state, u64::from_str_radix(queued, 16).unwrap()));
            }
        }
    }
    None
}

/// Waits (at most `within`) until both ends of the connection are gone
/// from the kernel's table while the client still holds its socket: the
/// edge reset it, and kept nothing. An orderly close would leave the
/// edge's end queued in FIN_WAIT and the client's in CLOSE_WAIT.
pub async fn reset_by_the_edge(edge_port: u16, client_port: u16, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let ends = (
            tcp_end(edge_port, client_port),
            tcp_end(client_port, edge_port),
        );
        if ends == (None, None) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "not reset: {ends:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the kernel showed of the edge's end of a connection, polled every
/// 10 ms until it left the table.
pub struct Watched {
    /// The most bytes it held unsent or unacknowledged.
    pub most: u64,
    /// When that count last changed: the last time the socket took bytes
    /// (or the peer acknowledged some).
    pub last_change: std::time::Instant,
    /// When it left the table.
    pub gone: std::time::Instant,
}

pub fn watch(
    edge_port: u16,
    client_port: u16,
    within: Duration,
) -> tokio::task::JoinHandle<Watched> {
    tokio::spawn(async move {
        let deadline = std::time::Instant::now() + within;
        let (mut most, mut last, mut last_change) = (0, 0, std::time::Instant::now());
        while let Some((_, queued)) = tcp_end(edge_port, client_port) {
            if queued != last {
                (last, last_change) = (queued, std::time::Instant::now());
            }
            most = most.max(queued);
            assert!(
                std::time::Instant::now() < deadline,
                "still held: {queued} bytes"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Watched {
            most,
            last_change,
            gone: std::time::Instant::now(),
        }
    })
}
