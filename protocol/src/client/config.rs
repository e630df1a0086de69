//! What the client needs to know before it dials.
use std::{fmt, time::Duration};

use crate::Encoding;

/// How to reach an edge, and how the client behaves when things go wrong.
///
/// Build it with [`ClientConfig::new`] and change fields as needed:
///
/// ```
/// # use switchboard_protocol::{Encoding, client::ClientConfig};
/// let config = ClientConfig {
///     encoding: Encoding::Json,
///     reconnect: false,
///     ..ClientConfig::new("ws://127.0.0.1:8080/ws", "<jwt>")
/// };
/// ```
#[derive(Clone)]
pub struct ClientConfig {
    /// WebSocket URL of the edge: `wss://host/ws`, or `ws://host:port/ws`
    /// (development, or behind a TLS-terminating load balancer).
    pub url: String,
    /// JWT sent in `Connect.token`. [`Client::refresh_token`] replaces it,
    /// for the open session and for later reconnects.
    ///
    /// [`Client::refresh_token`]: super::Client::refresh_token
    pub token: String,
    /// Wire encoding (and so the subprotocol offered). Default protobuf.
    pub encoding: Encoding,
    /// Sent in `Connect.client_name`. Default `switchboard-rust`.
    pub client_name: String,
    /// Sent in `Connect.client_version`. Default this crate's version.
    pub client_version: String,
    /// More edges to reconnect to when there is no load balancer in front:
    /// each dial takes the next of `url` and these, in turn, so a client of
    /// a dead edge resumes on another. Default empty.
    pub fallback_urls: Vec<String>,
    /// Reconnect and resume by itself after a network error or a close
    /// with a reconnect code (4000-4499). Default true.
    pub reconnect: bool,
    /// First backoff step; a delay is uniform in `0..=step` (full jitter)
    /// and the step doubles per failed attempt. Default 100 ms.
    pub backoff_base: Duration,
    /// Largest backoff step. Default 10 s.
    pub backoff_max: Duration,
    /// How long a request waits for its reply, and how long dialing and the
    /// Connect handshake may take. Default 10 s.
    pub request_timeout: Duration,
    /// Capacity of the event channel, in events. When the app does not keep
    /// up, the client stops reading the socket (the server may then close
    /// it as a slow consumer, and the client resumes). Default 4096.
    pub event_capacity: usize,
    /// Capacity of the channel from [`Client`] handles to the connection
    /// task, in commands. Default 256.
    ///
    /// [`Client`]: super::Client
    pub command_capacity: usize,
    /// Requests waiting for a reply or for a connection, at most; more fail
    /// with [`ClientError::TooManyInFlight`]. Default 1024.
    ///
    /// [`ClientError::TooManyInFlight`]: super::ClientError::TooManyInFlight
    pub max_in_flight: usize,
    /// Resume the personal stream after this seq on the first connect (for
    /// an app that stored its position). Default `None`: live only.
    /// Reconnects always resume from the last seq the client saw.
    pub user_since: Option<u64>,
    /// Epoch that `user_since` belongs to. Default empty.
    pub user_epoch: String,
    /// Offer permessage-deflate (RFC 7692, no context takeover either
    /// way): the server then compresses long frames and the client its
    /// long requests. Default false.
    pub deflate: bool,
    /// TLS for `wss://` URLs: [`tls::webpki_roots`] (the default when
    /// `None`: public certificates) or [`tls::custom_ca`] (a private or
    /// test CA), or any rustls config built with the ring provider.
    ///
    /// [`tls::webpki_roots`]: super::tls::webpki_roots
    /// [`tls::custom_ca`]: super::tls::custom_ca
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl ClientConfig {
    /// A config with the defaults documented on each field.
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        ClientConfig {
            url: url.into(),
            token: token.into(),
            encoding: Encoding::Protobuf,
            client_name: "switchboard-rust".into(),
            client_version: env!("CARGO_PKG_VERSION").into(),
            fallback_urls: Vec::new(),
            reconnect: true,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            event_capacity: 4096,
            command_capacity: 256,
            max_in_flight: 1024,
            user_since: None,
            user_epoch: String::new(),
            deflate: false,
            tls: None,
        }
    }
}

/// Leaves the token out: configs end up in logs.
impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url", &self.url)
            .field("fallback_urls", &self.fallback_urls)
            .field("token", &"<redacted>")
            .field("encoding", &self.encoding)
            .field("client_name", &self.client_name)
            .field("client_version", &self.client_version)
            .field("reconnect", &self.reconnect)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_max", &self.backoff_max)
            .field("request_timeout", &self.request_timeout)
            .field("event_capacity", &self.event_capacity)
            .field("command_capacity", &self.command_capacity)
            .field("max_in_flight", &self.max_in_flight)
            .field("user_since", &self.user_since)
            .field("user_epoch", &self.user_epoch)
            .field("deflate", &self.deflate)
            .field("tls", &self.tls.as_ref().map(|_| "custom"))
            .finish()
    }
}
