//! The one table that maps why a server closes a socket to a WebSocket
//! close code and reconnect advice.
//!
//! Codes 4000-4499 mean "reconnect by yourself (after the advised delay)";
//! 4500-4999 mean "do not reconnect until something changes" (a new token,
//! a fixed client). The same reason, as [`CloseReason::as_str`], is the
//! bounded `reason` label of the disconnect metrics.

use std::ops::Range;

/// Reconnect soon: the socket or its network failed, not the service.
const SOON_MS: Range<u32> = 500..3_000;
/// A backend failed: coming back at once would only fail again.
const BACKEND_MS: Range<u32> = 2_000..10_000;
/// The client flooded: it waits long enough for its bug not to hurt.
const PENALTY_MS: Range<u32> = 15_000..45_000;
/// The app only needs a new token first.
const TOKEN_MS: Range<u32> = 100..1_000;

/// Why the server closed a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The node is draining (deploy, scale-in). Reconnect elsewhere.
    Shutdown,
    /// The socket could not keep up with its deliveries. Reconnect and resume.
    SlowConsumer,
    /// Nothing was received for two heartbeat intervals.
    HeartbeatTimeout,
    /// The client sent requests faster than allowed.
    RateLimited,
    /// A backend (bus, presence, history) is unavailable.
    Unavailable,
    /// The token expired on an open socket. Get a new token, then reconnect.
    TokenExpired,
    /// No Connect frame arrived within the handshake timeout.
    ConnectTimeout,
    /// The client sent a malformed frame. Terminal: a retry would repeat it.
    BadRequest,
    /// The token was refused. Terminal until the client has a new token.
    Unauthorized,
    /// A frame was over the size limit.
    MessageTooLarge,
    /// An operator or backend removed this session or user.
    Kicked,
}

impl CloseReason {
    /// Every reason, for docs and metric pre-registration.
    pub const ALL: [CloseReason; 11] = [
        CloseReason::Shutdown,
        CloseReason::SlowConsumer,
        CloseReason::HeartbeatTimeout,
        CloseReason::RateLimited,
        CloseReason::Unavailable,
        CloseReason::TokenExpired,
        CloseReason::ConnectTimeout,
        CloseReason::BadRequest,
        CloseReason::Unauthorized,
        CloseReason::MessageTooLarge,
        CloseReason::Kicked,
    ];

    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            CloseReason::Shutdown => 4000,
            CloseReason::SlowConsumer => 4001,
            CloseReason::HeartbeatTimeout => 4002,
            CloseReason::RateLimited => 4003,
            CloseReason::Unavailable => 4004,
            CloseReason::TokenExpired => 4005,
            CloseReason::ConnectTimeout => 4006,
            CloseReason::BadRequest => 4500,
            CloseReason::Unauthorized => 4501,
            CloseReason::MessageTooLarge => 4502,
            CloseReason::Kicked => 4503,
        }
    }

    /// The reason for a close code, if it is one of ours.
    pub fn from_code(code: u16) -> Option<CloseReason> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// Whether a client should reconnect by itself.
    pub fn reconnect(self) -> bool {
        self.code() < 4500
    }

    /// The reconnect delay advised with this reason, in ms: a close draws
    /// `reconnectDelayMs` uniformly from this range, so clients closed
    /// together come back spread out. Never 0 for 4000-4499 (a client told
    /// 0 would come back at once); empty for 4500-4999. `Shutdown` spreads
    /// over the drain's `drain_spread_ms` (`--reconnect-jitter-max-ms`).
    pub fn reconnect_delay_range_ms(self, drain_spread_ms: u32) -> Range<u32> {
        match self {
            CloseReason::Shutdown => 1..drain_spread_ms.max(2),
            CloseReason::SlowConsumer
            | CloseReason::HeartbeatTimeout
            | CloseReason::ConnectTimeout => SOON_MS,
            CloseReason::Unavailable => BACKEND_MS,
            CloseReason::RateLimited => PENALTY_MS,
            CloseReason::TokenExpired => TOKEN_MS,
            CloseReason::BadRequest
            | CloseReason::Unauthorized
            | CloseReason::MessageTooLarge
            | CloseReason::Kicked => 0..0,
        }
    }

    /// The `Disconnect` frame sent just before closing with this reason.
    pub fn disconnect_frame(self, reconnect_delay_ms: u32) -> crate::v1::ServerFrame {
        crate::v1::ServerFrame {
            id: 0,
            kind: Some(crate::v1::server_frame::Kind::Disconnect(
                crate::v1::Disconnect {
                    code: self.code() as u32,
                    reason: self.as_str().into(),
                    reconnect: self.reconnect(),
                    reconnect_delay_ms,
                    session: String::new(),
                },
            )),
        }
    }

    /// Stable snake_case name: close frame reason text and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Shutdown => "shutdown",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::HeartbeatTimeout => "heartbeat_timeout",
            CloseReason::RateLimited => "rate_limited",
            CloseReason::Unavailable => "unavailable",
            CloseReason::TokenExpired => "token_expired",
            CloseReason::ConnectTimeout => "connect_timeout",
            CloseReason::BadRequest => "bad_request",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::MessageTooLarge => "message_too_large",
            CloseReason::Kicked => "kicked",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_in_range() {
        let mut codes: Vec<u16> = CloseReason::ALL.iter().map(|r| r.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), CloseReason::ALL.len());
        for r in CloseReason::ALL {
            assert!((4000..5000).contains(&r.code()));
            assert_eq!(CloseReason::from_code(r.code()), Some(r));
            // A close frame leaves 123 bytes for the reason.
            assert!(r.as_str().len() <= 123);
        }
        assert!(CloseReason::SlowConsumer.reconnect());
        assert!(!CloseReason::Unauthorized.reconnect());
    }

    #[test]
    fn every_reconnectable_close_advises_a_nonzero_jittered_delay() {
        for spread in [1, 2, 1_000, 10_000] {
            for r in CloseReason::ALL {
                let range = r.reconnect_delay_range_ms(spread);
                if r.reconnect() {
                    assert!(range.start >= 1, "{r:?}: {range:?}");
                    assert!(!range.is_empty(), "{r:?}: {range:?}");
                } else {
                    assert!(range.is_empty(), "{r:?} is terminal: {range:?}");
                }
            }
        }
        // Room to jitter in, except a drain spread set to 1 ms.
        for r in CloseReason::ALL.into_iter().filter(|r| r.reconnect()) {
            assert!(r.reconnect_delay_range_ms(10_000).len() >= 900, "{r:?}");
        }
        // A flood waits longer than any other reconnectable reason.
        let flood = CloseReason::RateLimited.reconnect_delay_range_ms(10_000);
        for r in CloseReason::ALL {
            if r != CloseReason::RateLimited && r != CloseReason::Shutdown {
                assert!(
                    r.reconnect_delay_range_ms(10_000).end <= flood.start,
                    "{r:?}"
                );
            }
        }
        assert_eq!(
            CloseReason::Shutdown.reconnect_delay_range_ms(3_000),
            1..3_000,
            "a drain spreads below its maximum"
        );
    }
}
