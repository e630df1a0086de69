//! The one error type of the client.
use std::time::Duration;

use tokio_tungstenite::tungstenite;

use crate::DecodeError;

/// Why a connect or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an `Error` frame: to a request, or to
    /// Connect (401 unauthorized, 440 token expired, ...). The codes are
    /// the `ErrorCode` values of the `.proto` file.
    #[error("server error {code}: {message}")]
    Server {
        /// Protocol error code.
        code: u32,
        /// Human-readable text from the server.
        message: String,
    },
    /// The WebSocket upgrade was answered with an HTTP error status.
    #[error("HTTP {status} on upgrade")]
    Http {
        /// Status code (503 when the edge sheds load).
        status: u16,
        /// The `Retry-After` header, when the server sent one in seconds.
        retry_after: Option<Duration>,
    },
    /// The server closed the socket before the session started.
    #[error("closed by server: {code} {reason}")]
    Closed {
        /// WebSocket close code (or the `Disconnect` frame's code).
        code: u16,
        /// Reason text.
        reason: String,
    },
    /// The connection dropped while the request was in flight. Retry it; a
    /// publish retried with the same client message id is de-duplicated.
    #[error("disconnected while the request was in flight")]
    Disconnected,
    /// No reply (or no connection) within the request timeout.
    #[error("timed out")]
    Timeout,
    /// The client was closed, or stopped for good after a terminal close.
    #[error("client closed")]
    ClientClosed,
    /// More requests are waiting than `ClientConfig::max_in_flight`.
    #[error("too many requests in flight")]
    TooManyInFlight,
    /// A server frame could not be decoded.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The server sent a frame that does not fit the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// TLS could not be set up: a CA file without certificates, a host
    /// that is not a valid server name. (A failed handshake, such as an
    /// untrusted certificate, is `Io`.)
    #[error("TLS: {0}")]
    Tls(String),
    /// A socket error.
    #[error("I/O error: {0}")]
    Io(#[source] std::io::Error),
    /// A WebSocket error other than I/O or an HTTP status.
    #[error("WebSocket error: {0}")]
    WebSocket(#[source] tungstenite::Error),
}

impl ClientError {
    /// The protocol error code of a [`ClientError::Server`].
    pub fn server_code(&self) -> Option<u32> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the same request may succeed later: the connection dropped,
    /// timed out, or the server was briefly unable (429, 500, 503).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Disconnected | ClientError::Timeout | ClientError::Io(_) => true,
            ClientError::Server { code, .. } => retryable_code(*code),
            ClientError::Http { status, .. } => retryable_status(*status),
            _ => false,
        }
    }
}

impl From<tungstenite::Error> for ClientError {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::Io(io) => ClientError::Io(io),
            tungstenite::Error::Http(resp) => ClientError::Http {
                status: resp.status().as_u16(),
                retry_after: resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok())
                    .map(Duration::from_secs),
            },
            other => ClientError::WebSocket(other),
        }
    }
}

/// Protocol error codes that mean "try again later".
pub(super) fn retryable_code(code: u32) -> bool {
    matches!(code, 429 | 500 | 503)
}

/// HTTP statuses on the upgrade that mean "try again later".
pub(super) fn retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500..=599)
}
