//! An async Rust client for Switchboard (feature `client`).
//!
//! [`Client::connect`] dials the edge, sends `Connect` and resolves once
//! the `ConnectResult` arrives. One task then owns the WebSocket; [`Client`]
//! is a cheap cloneable handle that sends it commands over a bounded
//! channel, and [`Events`] receives the pushes. The client:
//!
//! - answers each request with its reply, or a typed [`ClientError`]
//!   (`Server { code, .. }` for an `Error` frame, `Timeout`, `Disconnected`);
//! - de-duplicates deliveries by (stream, seq), so the app sees each message
//!   once and in order, and reports holes as [`Event::ResyncRequired`];
//! - reconnects by itself after a network error or a close with a reconnect
//!   code (4000-4499), waiting the server's advised delay, `Retry-After` on
//!   HTTP 503, or full-jitter exponential backoff; it then resumes the
//!   personal stream and re-subscribes every chat from the last seq it saw
//!   ([`Event::Reconnected`]), on the next of its URLs when it has
//!   `fallback_urls` (edges without a load balancer). Requests in flight when the socket drops fail
//!   with [`ClientError::Disconnected`]; requests made while reconnecting
//!   wait for the new session (within the request timeout).
//!
//! The connection lives as long as some [`Client`] handle does, or until
//! [`Client::close`] or a terminal close (4500+). Read [`Events`]: when the
//! app stops reading, the client stops reading the socket too.
//!
//! With [`ClientConfig::deflate`] the client offers permessage-deflate
//! (RFC 7692, no context takeover): what the server compresses is
//! inflated under tungstenite by [`DeflateStream`], and the client
//! compresses what it sends from `deflate::DEFAULT_MIN_BYTES` on.
//!
//! `wss://` URLs go over rustls (ring provider), trusting the bundled
//! webpki roots unless [`ClientConfig::tls`] says otherwise (see
//! [`tls::custom_ca`] for a private CA).
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchboard_protocol::client::ClientError> {
//! use switchboard_protocol::client::{Client, ClientConfig, Event};
//!
//! let config = ClientConfig::new("ws://127.0.0.1:8080/ws", "<jwt>");
//! let (client, mut events) = Client::connect(config).await?;
//! client.subscribe("lobby").await?;
//! client.publish_chat("lobby", "m-1", "hello").await?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Delivery(d) = event {
//!         println!("{}: {:?}", d.sender, d.payload);
//!     }
//! }
//! # Ok(()) }
//! ```
mod actor;
mod backoff;
mod config;
mod cursor;
mod deflate_stream;
mod error;
mod event;
mod link;
#[cfg(test)]
mod tests;
pub mod tls;

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

pub use backoff::delay as full_jitter_delay;
pub use config::ClientConfig;
pub use deflate_stream::DeflateStream;
pub use error::ClientError;
pub use event::{Cursor, Event, Events, Positions, ResubscribeFailure, StreamId};

use self::actor::{Actor, Command};
use crate::v1::{
    self, ConnectResult, Pong, PublishAck, ReceiptKind, RefreshResult, SubscribeResult,
    client_frame, publish, receipt, server_frame,
};

/// A handle to one connection. Clone it freely; all clones talk to the same
/// connection task.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    session: watch::Receiver<ConnectResult>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session_id", &self.session.borrow().session_id)
            .field("closed", &self.commands.is_closed())
            .finish()
    }
}

impl Client {
    /// Dials, sends `Connect` and waits for the `ConnectResult` (at most
    /// `request_timeout` for dialing and as much for the reply). This first
    /// attempt is not retried: a refused token is
    /// `ClientError::Server { code: 401 | 440, .. }`, an overloaded edge
    /// `ClientError::Http { status: 503, retry_after }`.
    pub async fn connect(config: ClientConfig) -> Result<(Client, Events), ClientError> {
        let (events_tx, events) = mpsc::channel(config.event_capacity.max(1));
        let (commands, commands_rx) = mpsc::channel(config.command_capacity.max(1));
        let (session_tx, session) = watch::channel(ConnectResult::default());
        let (ready_tx, ready) = oneshot::channel();
        let request_timeout = config.request_timeout;
        let span = tracing::debug_span!(
            "switchboard_client",
            url = %config.url,
            session = tracing::field::Empty
        );
        let actor = Actor::new(config, commands_rx, events_tx, session_tx, ready_tx);
        tokio::spawn(actor.run().instrument(span));
        match ready.await {
            Ok(Ok(())) => Ok((
                Client {
                    commands,
                    session,
                    request_timeout,
                },
                events,
            )),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ClientError::ClientClosed),
        }
    }

    /// The latest `ConnectResult`: user, session id, node, token expiry.
    /// It changes after each reconnect.
    pub async fn session(&self) -> ConnectResult {
        self.session.borrow().clone()
    }

    /// Whether the client has stopped (closed, or a terminal disconnect).
    pub fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }

    /// The last seq seen in the personal stream and in each followed chat:
    /// where the client would resume from.
    pub async fn positions(&self) -> Result<Positions, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Positions(tx))
            .await
            .map_err(|_| ClientError::ClientClosed)?;
        rx.await.map_err(|_| ClientError::ClientClosed)
    }

    /// Subscribes to a chat, live messages only. From now on the client
    /// follows it: de-duplicates its deliveries and re-subscribes it after
    /// a reconnect.
    pub async fn subscribe(&self, chat: &str) -> Result<SubscribeResult, ClientError> {
        self.subscribe_with(chat, None, "").await
    }

    /// Subscribes and first recovers the messages after `since` (of
    /// `epoch`, from an earlier `SubscribeResult` or [`Client::positions`]);
    /// they arrive right after the result. When history no longer reaches
    /// back, the result says `resync_required` and an
    /// [`Event::ResyncRequired`] follows.
    pub async fn subscribe_since(
        &self,
        chat: &str,
        since: u64,
        epoch: &str,
    ) -> Result<SubscribeResult, ClientError> {
        self.subscribe_with(chat, Some(since), epoch).await
    }

    /// Subscribes with a subscription token from the app's backend (a
    /// JWT naming this user and `chat`); the client keeps it to
    /// re-subscribe after reconnects.
    pub async fn subscribe_with_token(
        &self,
        chat: &str,
        token: &str,
    ) -> Result<SubscribeResult, ClientError> {
        let kind = client_frame::Kind::Subscribe(v1::Subscribe {
            chat: chat.into(),
            since: None,
            epoch: String::new(),
            token: token.into(),
        });
        match self.request(kind).await? {
            server_frame::Kind::SubscribeResult(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn subscribe_with(
        &self,
        chat: &str,
        since: Option<u64>,
        epoch: &str,
    ) -> Result<SubscribeResult, ClientError> {
        let kind = client_frame::Kind::Subscribe(v1::Subscribe {
            chat: chat.into(),
            since,
            epoch: epoch.into(),
            token: String::new(),
        });
        match self.request(kind).await? {
            server_frame::Kind::SubscribeResult(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Leaves a chat; the client stops following it.
    pub async fn unsubscribe(&self, chat: &str) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Kind::Unsubscribe(v1::Unsubscribe {
            chat: chat.into(),
        }))
        .await
    }

    /// Publishes to a chat and returns its seq. After a
    /// [`ClientError::Disconnected`] or [`ClientError::Timeout`], retry with
    /// the same `client_msg_id`: the server de-duplicates it (the ack then
    /// says `duplicate`).
    pub async fn publish_chat(
        &self,
        chat: &str,
        client_msg_id: &str,
        payload: impl Into<Bytes>,
    ) -> Result<PublishAck, ClientError> {
        let target = publish::Target::Chat(chat.into());
        self.publish(target, client_msg_id, payload.into()).await
    }

    /// Publishes into a user's personal stream (all their devices); retry
    /// as with [`Client::publish_chat`].
    pub async fn publish_user(
        &self,
        user: &str,
        client_msg_id: &str,
        payload: impl Into<Bytes>,
    ) -> Result<PublishAck, ClientError> {
        let target = publish::Target::User(user.into());
        self.publish(target, client_msg_id, payload.into()).await
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

    /// Tells a chat's subscribers "delivered/read up to `seq`".
    pub async fn receipt_chat(
        &self,
        chat: &str,
        seq: u64,
        kind: ReceiptKind,
    ) -> Result<(), ClientError> {
        self.receipt(receipt::Target::Chat(chat.into()), seq, kind)
            .await
    }

    /// Tells `user`, the sender of personal messages, "delivered/read up to
    /// `seq`".
    pub async fn receipt_user(
        &self,
        user: &str,
        seq: u64,
        kind: ReceiptKind,
    ) -> Result<(), ClientError> {
        self.receipt(receipt::Target::User(user.into()), seq, kind)
            .await
    }

    async fn receipt(
        &self,
        target: receipt::Target,
        seq: u64,
        kind: ReceiptKind,
    ) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Kind::Receipt(v1::Receipt {
            target: Some(target),
            seq,
            kind: kind.into(),
        }))
        .await
    }

    /// Says "typing" in a chat.
    pub async fn typing(&self, chat: &str) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Kind::Typing(v1::Typing { chat: chat.into() }))
            .await
    }

    /// Watches users' presence; changes arrive as [`Event::Presence`].
    pub async fn watch_presence<I>(&self, users: I) -> Result<(), ClientError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let users = users.into_iter().map(|u| u.as_ref().to_owned()).collect();
        self.expect_ok(client_frame::Kind::WatchPresence(v1::WatchPresence {
            users,
        }))
        .await
    }

    /// Stops watching users' presence.
    pub async fn unwatch_presence<I>(&self, users: I) -> Result<(), ClientError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let users = users.into_iter().map(|u| u.as_ref().to_owned()).collect();
        self.expect_ok(client_frame::Kind::UnwatchPresence(v1::UnwatchPresence {
            users,
        }))
        .await
    }

    /// A round trip to the server.
    pub async fn ping(&self) -> Result<Pong, ClientError> {
        match self.request(client_frame::Kind::Ping(v1::Ping {})).await? {
            server_frame::Kind::Pong(p) => Ok(p),
            other => Err(unexpected(other)),
        }
    }

    /// Replaces the token of the session; later reconnects use it too.
    /// While disconnected it is used for the next connect at once (and a
    /// client waiting after [`Event::TokenRejected`] reconnects with it);
    /// the reply comes once connected.
    pub async fn refresh_token(&self, token: &str) -> Result<RefreshResult, ClientError> {
        let kind = client_frame::Kind::Refresh(v1::RefreshToken {
            token: token.into(),
        });
        match self.request(kind).await? {
            server_frame::Kind::RefreshResult(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    /// Closes the socket with 1000 and stops the client (no reconnect);
    /// returns once the socket is closed. Requests in flight fail with
    /// [`ClientError::ClientClosed`], the event stream ends after a last
    /// [`Event::Disconnected`]. Closing a closed client does nothing.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Sends a request and waits for its reply, within the request timeout.
    async fn request(&self, kind: client_frame::Kind) -> Result<server_frame::Kind, ClientError> {
        let (reply, rx) = oneshot::channel();
        let exchange = async {
            self.commands
                .send(Command::Request { kind, reply })
                .await
                .map_err(|_| ClientError::ClientClosed)?;
            rx.await.map_err(|_| ClientError::ClientClosed)?
        };
        tokio::time::timeout(self.request_timeout, exchange)
            .await
            .unwrap_or(Err(ClientError::Timeout))
    }

    async fn expect_ok(&self, kind: client_frame::Kind) -> Result<(), ClientError> {
        match self.request(kind).await? {
            server_frame::Kind::Ok(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(kind: server_frame::Kind) -> ClientError {
    ClientError::Protocol(format!("unexpected reply: {kind:?}"))
}
