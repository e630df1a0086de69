//! What the client tells the app: pushes from the server and changes of
//! the connection.
use std::collections::BTreeMap;

use crate::v1::{Delivery, PresenceEvent, ReceiptEvent, StreamPosition, TypingEvent};

/// A sequenced stream the client follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamId {
    /// The user's personal stream (deliveries with `user` set).
    Personal,
    /// A chat (deliveries with `chat` set).
    Chat(String),
}

/// The last message the client has seen in a stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Last seq handed to the app (or the stream's seq when it was joined
    /// live); 0 when nothing yet.
    pub seq: u64,
    /// Epoch of the stream's history that `seq` belongs to; empty when
    /// the stream had no history yet.
    pub epoch: String,
}

/// Where the client stands in every stream it follows (see
/// [`Client::positions`]). The client resumes from these on reconnect; an
/// app may store them and pass them back via `ClientConfig::user_since` and
/// [`Client::subscribe_since`].
///
/// [`Client::positions`]: super::Client::positions
/// [`Client::subscribe_since`]: super::Client::subscribe_since
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Positions {
    /// The personal stream.
    pub personal: Cursor,
    /// Each subscribed chat.
    pub chats: BTreeMap<String, Cursor>,
}

/// A chat that could not be re-subscribed after a reconnect; the client
/// no longer follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResubscribeFailure {
    /// The chat.
    pub chat: String,
    /// The server's error code (403 forbidden, 422 invalid id, ...).
    pub code: u32,
    /// The server's text.
    pub message: String,
}

/// Pushes from the server and changes of the connection, in the order
/// they happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A message the app has not seen before: deliveries are de-duplicated
    /// by (stream, seq), so each seq of a stream arrives once, in order.
    Delivery(Delivery),
    /// Someone's delivered/read receipt.
    Receipt(ReceiptEvent),
    /// A watched user's presence changed.
    Presence(PresenceEvent),
    /// Someone is typing in a chat.
    Typing(TypingEvent),
    /// The server ended a subscription (the user was removed from the
    /// chat): it is no longer followed nor re-subscribed on reconnect.
    Unsubscribed {
        /// The chat.
        chat: String,
        /// Why ("removed").
        reason: String,
    },
    /// The token expires soon; call `Client::refresh_token`.
    TokenExpiring {
        /// Expiry, unix ms.
        expires_at_ms: i64,
    },
    /// Messages of a stream were lost (its history no longer reaches back
    /// to `last_seen`, its epoch changed, or seqs were skipped): fetch what
    /// came after `last_seen` from the app's backend. Delivery goes on.
    ResyncRequired {
        /// The stream with the hole.
        stream: StreamId,
        /// The last seq the app got before the hole.
        last_seen: u64,
    },
    /// The connection dropped. In-flight requests failed with
    /// `ClientError::Disconnected`; later ones wait for the reconnect.
    Disconnected {
        /// Close code from the server (close frame or `Disconnect`), if any.
        code: Option<u16>,
        /// Reason text.
        reason: String,
        /// Whether the client reconnects by itself. When false, the client
        /// has stopped and the event stream ends after this event.
        reconnect: bool,
    },
    /// The client reconnected, resumed the personal stream and
    /// re-subscribed its chats. Recovered deliveries may precede this event
    /// (they come in wire order, de-duplicated).
    Reconnected {
        /// Personal stream position after the resume.
        user_stream: StreamPosition,
        /// Each chat re-subscribed, with its position.
        resubscribed: Vec<(String, StreamPosition)>,
        /// Chats the server refused; they are no longer followed.
        failed: Vec<ResubscribeFailure>,
    },
    /// The token is no longer accepted: a reconnect was refused (401, 440),
    /// or the server closed the socket because the token expired (then
    /// `code` is 440). The client waits without dialing: call
    /// `Client::refresh_token` with a new token to reconnect with it, or
    /// `Client::close`. Requests made meanwhile wait (within their timeout).
    TokenRejected {
        /// Protocol error code.
        code: u32,
        /// The server's text.
        message: String,
    },
    /// A server frame could not be decoded and was skipped. A skipped
    /// delivery shows up as `ResyncRequired` when the next one arrives.
    Malformed {
        /// What was wrong.
        error: String,
    },
}

/// Receives [`Event`]s. It ends after the client stops.
pub type Events = tokio::sync::mpsc::Receiver<Event>;
