//! Opening sockets from many source addresses and speaking the binary
//! protocol with as little per-socket state as possible.
use std::{net::SocketAddr, sync::atomic::AtomicUsize, sync::atomic::Ordering, time::Duration};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use switchboard_protocol::{
    Encoding,
    v1::{ClientFrame, Connect, ServerFrame, client_frame, server_frame},
};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest, http::HeaderValue},
};

pub(crate) type Ws = WebSocketStream<TcpStream>;

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
    /// Connects in flight at once.
    #[arg(long, default_value_t = 200)]
    pub(crate) concurrency: usize,
    /// Source addresses 127.0.0.1..=127.0.0.N (to pass the ports limit).
    #[arg(long, default_value_t = 8)]
    pub(crate) sources: u8,
}

impl Target {
    /// The edge for socket number `i`.
    pub(crate) fn addr_for(&self, i: usize) -> SocketAddr {
        self.addr[i % self.addr.len()]
    }
}

/// Source addresses 127.0.0.1 ..= 127.0.0.N, used round-robin.
pub(crate) struct Sources {
    count: u8,
    next: AtomicUsize,
}

impl Sources {
    pub(crate) fn new(count: u8) -> Self {
        Sources {
            count: count.max(1),
            next: AtomicUsize::new(0),
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

pub(crate) async fn send(ws: &mut Ws, frame: ClientFrame) -> anyhow::Result<()> {
    ws.send(Message::binary(Encoding::Protobuf.encode_client(&frame)))
        .await?;
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

/// Opens a socket from the next source address and completes Connect.
pub(crate) async fn open(addr: SocketAddr, sources: &Sources, token: String) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(sources.pick().into(), 0))?;
    let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr)).await??;
    let mut req = format!("ws://{addr}/ws").into_client_request()?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(Encoding::PROTOBUF_SUBPROTOCOL),
    );
    // tungstenite's default 128 KiB read buffer per socket would cost GBs
    // at 100k sockets; frames here are small.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(req, stream, Some(config)).await?;
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
