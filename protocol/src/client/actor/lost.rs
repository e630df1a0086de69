//! Losing the socket: fail what was in flight, tell the app, and decide
//! whether and when to dial again (backoff, the server's advice, HTTP
//! `Retry-After`, or waiting for a new token).
use std::time::Duration;

use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Error;

use super::{Actor, Link, Meta};
use crate::{
    CloseReason,
    client::{
        ClientError, Event, backoff,
        error::{retryable_code, retryable_status},
        link,
    },
    v1,
};

/// A session that lasted this long (or `backoff_max`, if longer) resets
/// the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(1);

/// When to dial again.
enum Wait {
    Backoff,
    /// The server's `reconnect_delay_ms` (already jittered by the server).
    Exactly(Duration),
    /// HTTP `Retry-After`.
    RetryAfter(Duration),
}

enum Next {
    Retry(Wait),
    AwaitToken { code: u32, message: String },
    Stop,
}

/// The server closed because the token expired: the same token would be
/// refused, so wait for a new one.
fn token_expired(reason: &str) -> Next {
    Next::AwaitToken {
        code: 440,
        message: if reason.is_empty() {
            "token expired".into()
        } else {
            reason.into()
        },
    }
}

/// Why the link went down, and what to do next.
pub(super) struct Lost {
    /// What `Client::connect` returns when this was the first attempt.
    error: ClientError,
    code: Option<u16>,
    pub(super) reason: String,
    next: Next,
}

impl Lost {
    /// A network failure, a timeout, or a server breaking the protocol.
    pub(super) fn failed(error: ClientError) -> Lost {
        Lost {
            code: None,
            reason: error.to_string(),
            next: Next::Retry(Wait::Backoff),
            error,
        }
    }

    pub(super) fn closed(code: Option<u16>, reason: String) -> Lost {
        Lost {
            error: ClientError::Closed {
                // 1006: closed without a close frame.
                code: code.unwrap_or(1006),
                reason: reason.clone(),
            },
            next: if code == Some(CloseReason::TokenExpired.code()) {
                token_expired(&reason)
            } else if link::reconnect_advised(code) {
                Next::Retry(Wait::Backoff)
            } else {
                Next::Stop
            },
            code,
            reason,
        }
    }

    pub(super) fn disconnect(d: v1::Disconnect) -> Lost {
        let code = u16::try_from(d.code).unwrap_or(u16::MAX);
        Lost {
            error: ClientError::Closed {
                code,
                reason: d.reason.clone(),
            },
            code: Some(code),
            next: match (d.reconnect, d.reconnect_delay_ms) {
                _ if code == CloseReason::TokenExpired.code() => token_expired(&d.reason),
                (false, _) => Next::Stop,
                (true, 0) => Next::Retry(Wait::Backoff),
                (true, ms) => Next::Retry(Wait::Exactly(Duration::from_millis(ms.into()))),
            },
            reason: d.reason,
        }
    }

    pub(super) fn dial(error: ClientError) -> Lost {
        let next = match &error {
            ClientError::Http {
                status,
                retry_after,
            } if retryable_status(*status) => Next::Retry(match retry_after {
                Some(after) => Wait::RetryAfter(*after),
                None => Wait::Backoff,
            }),
            // The URL or the TLS settings are wrong: a retry would repeat it.
            ClientError::Http { .. }
            | ClientError::WebSocket(Error::Url(_))
            | ClientError::Tls(_) => Next::Stop,
            _ => Next::Retry(Wait::Backoff),
        };
        Lost {
            code: None,
            reason: error.to_string(),
            next,
            error,
        }
    }

    /// The server answered Connect with an error.
    pub(super) fn refused(e: v1::Error) -> Lost {
        let next = match e.code {
            401 | 440 => Next::AwaitToken {
                code: e.code,
                message: e.message.clone(),
            },
            c if retryable_code(c) => Next::Retry(Wait::Backoff),
            _ => Next::Stop,
        };
        Lost {
            code: None,
            reason: format!("connect refused: {} {}", e.code, e.message),
            next,
            error: ClientError::Server {
                code: e.code,
                message: e.message,
            },
        }
    }
}

impl Actor {
    /// Fails the requests in flight. The server forgets a socket's state
    /// with it, so a pending unsubscribe counts as done, and a pending
    /// refresh's token is the newest the app has.
    pub(super) fn fail_in_flight(&mut self, error: fn() -> ClientError) {
        for (_, pending) in self.pending.drain() {
            match pending.meta {
                Meta::Unsubscribe { chat } => self.cursors.forget(&chat),
                Meta::Refresh { token } => self.config.token = token,
                _ => {}
            }
            if let Some(reply) = pending.reply {
                let _ = reply.send(Err(error()));
            }
        }
    }

    /// The socket (or an attempt at one) is gone: clean up and decide
    /// whether, and when, to dial again.
    pub(super) async fn on_lost(&mut self, lost: Lost) {
        if let Link::Open { ws, .. } = std::mem::replace(&mut self.link, Link::Stopped) {
            // Finish the close handshake on the side (bounded): the server
            // may keep the TCP connection open a while, and the actor must
            // not wait for it.
            tokio::spawn(link::shut(*ws, None));
        }
        self.fail_in_flight(|| ClientError::Disconnected);
        if let Some(ready) = self.ready.take() {
            // The first attempt: Client::connect reports it; no retries.
            let _ = ready.send(Err(lost.error));
            return;
        }
        let Lost {
            code, reason, next, ..
        } = lost;
        let next = if self.config.reconnect {
            next
        } else {
            Next::Stop
        };
        let was_live = match self.live_since.take() {
            Some(since) => {
                // Only a session that lasted counts as recovered: a server
                // that accepts and then drops us at once must not get a
                // tight reconnect loop.
                if since.elapsed() >= STABLE_SESSION.max(self.config.backoff_max) {
                    self.attempt = 0;
                }
                true
            }
            None => false,
        };
        match next {
            Next::Stop => {
                tracing::debug!(?code, %reason, "disconnected for good");
                self.emit(Event::Disconnected {
                    code,
                    reason,
                    reconnect: false,
                });
            }
            Next::Retry(wait) => {
                let wait = match wait {
                    Wait::Backoff => backoff::delay(
                        &mut rand::rng(),
                        self.config.backoff_base,
                        self.config.backoff_max,
                        self.attempt,
                    ),
                    Wait::Exactly(d) => d,
                    Wait::RetryAfter(d) => {
                        backoff::after(&mut rand::rng(), d, self.config.backoff_max)
                    }
                };
                tracing::debug!(?code, %reason, ?wait, attempt = self.attempt, "reconnecting");
                self.attempt = self.attempt.saturating_add(1);
                if was_live {
                    self.emit(Event::Disconnected {
                        code,
                        reason,
                        reconnect: true,
                    });
                }
                self.link = Link::Idle {
                    until: Instant::now() + wait,
                };
            }
            Next::AwaitToken {
                code: refused,
                message,
            } => {
                tracing::debug!(code = refused, "token refused; waiting for a new one");
                if was_live {
                    self.emit(Event::Disconnected {
                        code,
                        reason,
                        reconnect: true,
                    });
                }
                self.emit(Event::TokenRejected {
                    code: refused,
                    message,
                });
                self.link = Link::Parked;
            }
        }
    }
}
