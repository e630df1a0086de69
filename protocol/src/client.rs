//! An async Rust client for Switchboard (feature `client`).
//!
//! One task owns the WebSocket; [`Client`] is a cheap cloneable handle that
//! sends it commands over a bounded channel, and [`Events`] is the stream of
//! pushes. The client de-duplicates deliveries by (stream, seq), reconnects
//! by itself with full-jitter exponential backoff (or the server's advised
//! delay, or `Retry-After` on HTTP 503), and resumes the personal stream and
//! every subscribed chat from the last seq it saw.
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchboard_protocol::client::ClientError> {
//! use switchboard_protocol::client::{Client, ClientConfig, Event};
//! let (client, mut events) = Client::connect(ClientConfig::new("ws://127.0.0.1:8080/ws", "<jwt>")).await?;
//! client.subscribe("lobby").await?;
//! client.publish_chat("lobby", "m-1", "hello".into()).await?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Delivery(d) = event { println!("{}: {:?}", d.sender, d.payload); }
//! }
//! # Ok(()) }
//! ```
use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::{
    net::TcpStream,
    sync::{Mutex, mpsc, oneshot},
};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{self, Message, client::IntoClientRequest, http::HeaderValue},
};

use crate::{
    CloseReason, Encoding,
    v1::{
        self, ClientFrame, ConnectResult, Delivery, PresenceEvent, PublishAck, ReceiptEvent,
        ReceiptKind, RefreshResult, ServerFrame, StreamPosition, SubscribeResult, TypingEvent,
        client_frame, publish, receipt, server_frame,
    },
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How to reach and talk to an edge.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `ws://host:port/ws`.
    pub url: String,
    /// JWT sent in Connect.
    pub token: String,
    /// Wire encoding.
    pub encoding: Encoding,
    /// Sent in Connect.
    pub client_name: String,
    /// Sent in Connect.
    pub client_version: String,
    /// Reconnect by itself after a reconnectable close or a network error.
    pub reconnect: bool,
    /// First backoff step (full jitter: a delay is uniform in 0..step).
    pub backoff_base: Duration,
    /// Largest backoff step.
    pub backoff_max: Duration,
    /// How long a request waits for its reply.
    pub request_timeout: Duration,
    /// Capacity of the event channel; when the app does not keep up, the
    /// socket's reader waits (the server may then close it as a slow
    /// consumer, and the client resumes).
    pub event_capacity: usize,
}

impl ClientConfig {
    /// Defaults: protobuf, reconnect on, 100 ms..10 s backoff, 10 s timeout.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        ClientConfig {
            url: url.into(),
            token: token.into(),
            encoding: Encoding::Protobuf,
            client_name: "switchboard-rust".into(),
            client_version: env!("CARGO_PKG_VERSION").into(),
            reconnect: true,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            event_capacity: 4096,
        }
    }
}

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered a request with an error frame.
    #[error("server error {code}: {message}")]
    Server {
        /// Protocol error code (docs/protocol.md).
        code: u32,
        /// Human-readable text.
        message: String,
    },
    /// The upgrade was refused with an HTTP status.
    #[error("HTTP {status}")]
    Http {
        /// Status code.
        status: u16,
        /// `Retry-After`, when the server sent one.
        retry_after: Option<Duration>,
    },
    /// The server closed the socket.
    #[error("closed by server: {code} {reason}")]
    Closed {
        /// Close code.
        code: u16,
        /// Close reason.
        reason: String,
    },
    /// The connection dropped while the request was in flight; retry it
    /// (a publish with the same client message id is de-duplicated).
    #[error("disconnected")]
    Disconnected,
    /// No reply in time.
    #[error("request timed out")]
    Timeout,
    /// The client was closed.
    #[error("client closed")]
    ClientClosed,
    /// The server sent something unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Transport failure.
    #[error(transparent)]
    WebSocket(#[from] tungstenite::Error),
}

/// Pushes from the server, and connection changes.
#[derive(Debug, Clone)]
pub enum Event {
    /// A new message (never one already seen).
    Delivery(Delivery),
    /// A receipt.
    Receipt(ReceiptEvent),
    /// A presence change.
    Presence(PresenceEvent),
    /// Someone is typing.
    Typing(TypingEvent),
    /// The token expires at this unix ms; call [`Client::refresh_token`].
    TokenExpiring(i64),
    /// The connection dropped; `reconnect` says whether the client retries.
    Disconnected {
        /// Close code, if the server sent one.
        code: Option<u16>,
        /// Reason text.
        reason: String,
        /// Whether the client will reconnect by itself.
        reconnect: bool,
    },
    /// The client reconnected and resumed.
    Reconnected {
        /// Personal stream position after the resume.
        user_stream: StreamPosition,
    },
    /// A stream could not be fully resumed from history: re-sync it from
    /// the backend. `None` is the personal stream.
    ResyncRequired {
        /// The chat, or `None` for the personal stream.
        chat: Option<String>,
    },
}

/// Receiver of [`Event`]s.
pub type Events = mpsc::Receiver<Event>;

enum Command {
    Request(
        client_frame::Kind,
        oneshot::Sender<Result<server_frame::Kind, ClientError>>,
    ),
    Close,
}

#[derive(Default, Clone)]
struct Position {
    seq: u64,
    epoch: String,
}

/// Handle to a connection. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    tx: mpsc::Sender<Command>,
    timeout: Duration,
    session: Arc<Mutex<ConnectResult>>,
}

impl Client {
    /// Connects, authenticates and starts the connection task.
    pub async fn connect(config: ClientConfig) -> Result<(Client, Events), ClientError> {
        let (events_tx, events) = mpsc::channel(config.event_capacity);
        let mut actor = Actor {
            config,
            ws: None,
            next_id: 1,
            pending: HashMap::new(),
            chats: HashMap::new(),
            user: Position::default(),
            events: events_tx,
        };
        let result = actor.dial().await?;
        let session = Arc::new(Mutex::new(result));
        let (tx, rx) = mpsc::channel(256);
        let timeout = actor.config.request_timeout;
        tokio::spawn(actor.run(rx, session.clone()));
        Ok((
            Client {
                tx,
                timeout,
                session,
            },
            events,
        ))
    }

    /// The latest ConnectResult (user, session id, node).
    pub async fn session(&self) -> ConnectResult {
        self.session.lock().await.clone()
    }

    async fn request(&self, kind: client_frame::Kind) -> Result<server_frame::Kind, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Request(kind, tx))
            .await
            .map_err(|_| ClientError::ClientClosed)?;
        match tokio::time::timeout(self.timeout, rx).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Err(_)) => Err(ClientError::Disconnected),
            Ok(Ok(r)) => r,
        }
    }

    /// Subscribes to a chat (live messages only).
    pub async fn subscribe(&self, chat: &str) -> Result<SubscribeResult, ClientError> {
        self.subscribe_since(chat, None, "").await
    }

    /// Subscribes and recovers the messages after `since` first.
    pub async fn subscribe_since(
        &self,
        chat: &str,
        since: Option<u64>,
        epoch: &str,
    ) -> Result<SubscribeResult, ClientError> {
        let kind = client_frame::Kind::Subscribe(v1::Subscribe {
            chat: chat.into(),
            since,
            epoch: epoch.into(),
        });
        match self.request(kind).await? {
            server_frame::Kind::SubscribeResult(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Leaves a chat.
    pub async fn unsubscribe(&self, chat: &str) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Kind::Unsubscribe(v1::Unsubscribe {
            chat: chat.into(),
        }))
        .await
    }

    /// Publishes to a chat and waits for the seq.
    pub async fn publish_chat(
        &self,
        chat: &str,
        client_msg_id: &str,
        payload: Bytes,
    ) -> Result<PublishAck, ClientError> {
        self.publish(publish::Target::Chat(chat.into()), client_msg_id, payload)
            .await
    }

    /// Publishes to a user's personal stream and waits for the seq.
    pub async fn publish_user(
        &self,
        user: &str,
        client_msg_id: &str,
        payload: Bytes,
    ) -> Result<PublishAck, ClientError> {
        self.publish(publish::Target::User(user.into()), client_msg_id, payload)
            .await
    }

    async fn publish(
        &self,
        target: publish::Target,
        client_msg_id: &str,
        payload: Bytes,
    ) -> Result<PublishAck, ClientError> {
        let kind = client_frame::Kind::Publish(v1::Publish {
            target: Some(target),
            client_msg_id: client_msg_id.into(),
            payload,
        });
        match self.request(kind).await? {
            server_frame::Kind::PublishAck(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    /// Sends a delivered/read receipt for a chat.
    pub async fn receipt_chat(
        &self,
        chat: &str,
        seq: u64,
        kind: ReceiptKind,
    ) -> Result<(), ClientError> {
        let r = v1::Receipt {
            target: Some(receipt::Target::Chat(chat.into())),
            seq,
            kind: kind as i32,
        };
        self.expect_ok(client_frame::Kind::Receipt(r)).await
    }

    /// Sends a receipt for a personal message to its sender.
    pub async fn receipt_user(
        &self,
        user: &str,
        seq: u64,
        kind: ReceiptKind,
    ) -> Result<(), ClientError> {
        let r = v1::Receipt {
            target: Some(receipt::Target::User(user.into())),
            seq,
            kind: kind as i32,
        };
        self.expect_ok(client_frame::Kind::Receipt(r)).await
    }

    /// Says "typing" in a chat.
    pub async fn typing(&self, chat: &str) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Kind::Typing(v1::Typing { chat: chat.into() }))
            .await
    }

    /// Watches users' presence; their current state arrives as events.
    pub async fn watch_presence(&self, users: &[&str]) -> Result<(), ClientError> {
        let users = users.iter().map(|u| u.to_string()).collect();
        self.expect_ok(client_frame::Kind::WatchPresence(v1::WatchPresence {
            users,
        }))
        .await
    }

    /// Stops watching users.
    pub async fn unwatch_presence(&self, users: &[&str]) -> Result<(), ClientError> {
        let users = users.iter().map(|u| u.to_string()).collect();
        self.expect_ok(client_frame::Kind::UnwatchPresence(v1::UnwatchPresence {
            users,
        }))
        .await
    }

    /// Round trip to the server.
    pub async fn ping(&self) -> Result<v1::Pong, ClientError> {
        match self.request(client_frame::Kind::Ping(v1::Ping {})).await? {
            server_frame::Kind::Pong(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// Replaces the token in-band; later reconnects use it too.
    pub async fn refresh_token(&self, token: &str) -> Result<RefreshResult, ClientError> {
        match self
            .request(client_frame::Kind::Refresh(v1::RefreshToken {
                token: token.into(),
            }))
            .await?
        {
            server_frame::Kind::RefreshResult(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Closes the socket (code 1000) and stops reconnecting.
    pub async fn close(&self) {
        let _ = self.tx.send(Command::Close).await;
    }

    async fn expect_ok(&self, kind: client_frame::Kind) -> Result<(), ClientError> {
        match self.request(kind).await? {
            server_frame::Kind::Ok(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(kind: server_frame::Kind) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {kind:?}"))
}

/// Full-jitter backoff: uniform in 0..min(max, base * 2^attempt).
pub fn backoff(base: Duration, max: Duration, attempt: u32) -> Duration {
    let step = base
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(max);
    let ms = step.as_millis() as u64;
    Duration::from_millis(if ms == 0 {
        0
    } else {
        rand::random_range(0..=ms)
    })
}

/// Why a connection ended, and how soon to come back.
struct Ended {
    code: Option<u16>,
    reason: String,
    reconnect: bool,
    delay: Option<Duration>,
}

struct Actor {
    config: ClientConfig,
    ws: Option<Ws>,
    next_id: u32,
    pending: HashMap<u32, oneshot::Sender<Result<server_frame::Kind, ClientError>>>,
    /// Subscribed chats and the last position seen in each.
    chats: HashMap<String, Position>,
    user: Position,
    events: mpsc::Sender<Event>,
}

impl Actor {
    fn id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    async fn send(&mut self, kind: client_frame::Kind) -> Result<u32, ClientError> {
        let id = self.id();
        let frame = ClientFrame {
            id,
            kind: Some(kind),
        };
        let enc = self.config.encoding;
        let bytes = enc.encode_client(&frame);
        let msg = if enc.is_text() {
            Message::text(
                String::from_utf8(bytes.to_vec())
                    .map_err(|e| ClientError::Protocol(e.to_string()))?,
            )
        } else {
            Message::binary(bytes)
        };
        let ws = self.ws.as_mut().ok_or(ClientError::Disconnected)?;
        ws.send(msg).await?;
        Ok(id)
    }

    /// Next server frame, or why the socket ended.
    async fn read(&mut self) -> Result<ServerFrame, Ended> {
        let enc = self.config.encoding;
        let ws = self.ws.as_mut().ok_or(Ended {
            code: None,
            reason: "not connected".into(),
            reconnect: true,
            delay: None,
        })?;
        loop {
            let msg = match ws.next().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    return Err(Ended {
                        code: None,
                        reason: e.to_string(),
                        reconnect: true,
                        delay: None,
                    });
                }
                None => {
                    return Err(Ended {
                        code: None,
                        reason: "connection closed".into(),
                        reconnect: true,
                        delay: None,
                    });
                }
            };
            let (data, text) = match msg {
                Message::Binary(b) => (b, false),
                Message::Text(t) => (Bytes::from(t.as_str().to_owned()), true),
                Message::Close(c) => {
                    let (code, reason) = c
                        .map(|c| (u16::from(c.code), c.reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    let reconnect =
                        CloseReason::from_code(code).is_none_or(|r| r.reconnect()) && code != 1000;
                    return Err(Ended {
                        code: Some(code),
                        reason,
                        reconnect,
                        delay: None,
                    });
                }
                _ => continue,
            };
            match enc.decode_server(&data, text) {
                Ok(f) => return Ok(f),
                Err(e) => tracing::warn!(error = %e, "undecodable server frame ignored"),
            }
        }
    }

    /// Routes a push to the app; returns `Some(Ended)` for a Disconnect.
    async fn push(&mut self, kind: server_frame::Kind) -> Option<Ended> {
        let event = match kind {
            server_frame::Kind::Delivery(d) => {
                let pos = if d.chat.is_empty() {
                    &mut self.user
                } else {
                    self.chats.entry(d.chat.clone()).or_default()
                };
                if d.seq <= pos.seq && (d.epoch.is_empty() || d.epoch == pos.epoch) {
                    return None; // already seen
                }
                pos.seq = d.seq;
                if !d.epoch.is_empty() {
                    pos.epoch = d.epoch.clone();
                }
                Event::Delivery(d)
            }
            server_frame::Kind::Receipt(r) => Event::Receipt(r),
            server_frame::Kind::Presence(p) => Event::Presence(p),
            server_frame::Kind::Typing(t) => Event::Typing(t),
            server_frame::Kind::TokenExpiring(t) => Event::TokenExpiring(t.token_expires_at_ms),
            server_frame::Kind::Disconnect(d) => {
                return Some(Ended {
                    code: Some(d.code as u16),
                    reason: d.reason,
                    reconnect: d.reconnect,
                    delay: Some(Duration::from_millis(d.reconnect_delay_ms as u64)),
                });
            }
            _ => return None,
        };
        let _ = self.events.send(event).await;
        None
    }

    /// Opens the socket, sends Connect with the personal stream position,
    /// and waits for ConnectResult.
    async fn dial(&mut self) -> Result<ConnectResult, ClientError> {
        let mut req = self.config.url.as_str().into_client_request()?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(self.config.encoding.subprotocol()),
        );
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(resp) => ClientError::Http {
                    status: resp.status().as_u16(),
                    retry_after: resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .map(Duration::from_secs),
                },
                other => ClientError::WebSocket(other),
            })?;
        self.ws = Some(ws);
        let connect = v1::Connect {
            token: self.config.token.clone(),
            client_name: self.config.client_name.clone(),
            client_version: self.config.client_version.clone(),
            user_since: (self.user.seq > 0).then_some(self.user.seq),
            user_epoch: self.user.epoch.clone(),
        };
        let id = self.send(client_frame::Kind::Connect(connect)).await?;
        let result = self.await_reply(id).await?;
        match result {
            server_frame::Kind::ConnectResult(r) => {
                if let Some(pos) = &r.user_stream {
                    self.note_position(None, pos).await;
                }
                Ok(r)
            }
            other => Err(unexpected(other)),
        }
    }

    async fn note_position(&mut self, chat: Option<&str>, pos: &StreamPosition) {
        if pos.resync_required {
            let _ = self
                .events
                .send(Event::ResyncRequired {
                    chat: chat.map(str::to_owned),
                })
                .await;
        }
        let slot = match chat {
            None => &mut self.user,
            Some(c) => self.chats.entry(c.to_owned()).or_default(),
        };
        if slot.epoch != pos.epoch {
            slot.epoch = pos.epoch.clone();
            if pos.resync_required || slot.seq > pos.seq {
                slot.seq = 0;
            }
        }
    }

    /// Reads until the reply to `id`, handling pushes on the way.
    async fn await_reply(&mut self, id: u32) -> Result<server_frame::Kind, ClientError> {
        loop {
            let frame = self.read().await.map_err(|e| match e.code {
                Some(code) => ClientError::Closed {
                    code,
                    reason: e.reason,
                },
                None => ClientError::Disconnected,
            })?;
            let Some(kind) = frame.kind else { continue };
            if frame.id == id {
                return match kind {
                    server_frame::Kind::Error(e) => Err(ClientError::Server {
                        code: e.code,
                        message: e.message,
                    }),
                    other => Ok(other),
                };
            }
            if let Some(ended) = self.push(kind).await {
                return Err(ClientError::Closed {
                    code: ended.code.unwrap_or(0),
                    reason: ended.reason,
                });
            }
        }
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        session: Arc<Mutex<ConnectResult>>,
    ) {
        loop {
            let ended = self.serve(&mut commands).await;
            for (_, tx) in self.pending.drain() {
                let _ = tx.send(Err(ClientError::Disconnected));
            }
            self.ws = None;
            let reconnect = ended.reconnect && self.config.reconnect;
            let _ = self
                .events
                .send(Event::Disconnected {
                    code: ended.code,
                    reason: ended.reason.clone(),
                    reconnect,
                })
                .await;
            if !reconnect {
                return;
            }
            let mut attempt = 0;
            let mut delay = ended.delay;
            loop {
                let wait = delay.take().unwrap_or_else(|| {
                    backoff(self.config.backoff_base, self.config.backoff_max, attempt)
                });
                // Keep answering callers while we wait: they get Disconnected.
                let sleep = tokio::time::sleep(wait);
                tokio::pin!(sleep);
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        cmd = commands.recv() => match cmd {
                            None | Some(Command::Close) => return,
                            Some(Command::Request(_, tx)) => { let _ = tx.send(Err(ClientError::Disconnected)); }
                        }
                    }
                }
                attempt += 1;
                match self.resume().await {
                    Ok(result) => {
                        let user_stream = result.user_stream.clone().unwrap_or_default();
                        *session.lock().await = result;
                        let _ = self.events.send(Event::Reconnected { user_stream }).await;
                        break;
                    }
                    Err(ClientError::Http {
                        retry_after: Some(after),
                        ..
                    }) => {
                        // Over capacity: the server says when; add jitter so
                        // refused clients do not return together.
                        delay = Some(
                            after
                                + backoff(
                                    self.config.backoff_base,
                                    after.max(self.config.backoff_base),
                                    0,
                                ),
                        );
                    }
                    Err(ClientError::Server { code, .. }) if code == 401 || code == 440 => {
                        let _ = self
                            .events
                            .send(Event::Disconnected {
                                code: None,
                                reason: "token refused".into(),
                                reconnect: false,
                            })
                            .await;
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, attempt, "reconnect failed"),
                }
            }
        }
    }

    /// Reconnects and re-subscribes every chat from its last seq.
    async fn resume(&mut self) -> Result<ConnectResult, ClientError> {
        let result = self.dial().await?;
        let chats: Vec<(String, Position)> = self
            .chats
            .iter()
            .map(|(c, p)| (c.clone(), p.clone()))
            .collect();
        for (chat, pos) in chats {
            let sub = v1::Subscribe {
                chat: chat.clone(),
                since: Some(pos.seq),
                epoch: pos.epoch.clone(),
            };
            let id = self.send(client_frame::Kind::Subscribe(sub)).await?;
            match self.await_reply(id).await? {
                server_frame::Kind::SubscribeResult(r) => {
                    if let Some(p) = &r.position {
                        self.note_position(Some(&chat), p).await;
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        Ok(result)
    }

    /// Serves one connection until it ends.
    async fn serve(&mut self, commands: &mut mpsc::Receiver<Command>) -> Ended {
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None | Some(Command::Close) => {
                        if let Some(ws) = self.ws.as_mut() {
                            let _ = ws.close(None).await;
                        }
                        return Ended { code: Some(1000), reason: "closed by client".into(), reconnect: false, delay: None };
                    }
                    Some(Command::Request(kind, tx)) => {
                        let unsubscribed = match &kind {
                            client_frame::Kind::Unsubscribe(u) => Some(u.chat.clone()),
                            _ => None,
                        };
                        if let Some(tok) = match &kind { client_frame::Kind::Refresh(r) => Some(r.token.clone()), _ => None } {
                            self.config.token = tok;
                        }
                        match self.send(kind).await {
                            Ok(id) => {
                                if let Some(chat) = unsubscribed {
                                    self.chats.remove(&chat);
                                }
                                if self.pending.len() > 1024 {
                                    self.pending.retain(|_, t| !t.is_closed());
                                }
                                self.pending.insert(id, tx);
                            }
                            Err(e) => { let _ = tx.send(Err(e)); }
                        }
                    }
                },
                frame = self.read() => {
                    let frame = match frame {
                        Ok(f) => f,
                        Err(ended) => return ended,
                    };
                    let Some(kind) = frame.kind else { continue };
                    if frame.id != 0 && let Some(tx) = self.pending.remove(&frame.id) {
                        let reply = match kind {
                            server_frame::Kind::Error(e) => Err(ClientError::Server { code: e.code, message: e.message }),
                            server_frame::Kind::SubscribeResult(r) => {
                                if let Some(p) = &r.position {
                                    self.note_position(Some(&r.chat), p).await;
                                }
                                Ok(server_frame::Kind::SubscribeResult(r))
                            }
                            other => Ok(other),
                        };
                        let _ = tx.send(reply);
                        continue;
                    }
                    if let Some(ended) = self.push(kind).await {
                        return ended;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_and_capped() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 0..40 {
            let d = backoff(base, max, attempt);
            let cap = (base * 2u32.pow(attempt.min(20))).min(max);
            assert!(d <= cap, "attempt {attempt}: {d:?} > {cap:?}");
        }
        // Jitter: many draws are not all equal.
        let draws: std::collections::HashSet<_> = (0..50).map(|_| backoff(base, max, 5)).collect();
        assert!(draws.len() > 1);
    }
}
