//! The one table that maps why a server closes a socket to a WebSocket
//! close code and reconnect advice.
//!
//! Codes 4000-4499 mean "reconnect by yourself (after the advised delay)";
//! 4500-4999 mean "do not reconnect until something changes" (a new token,
//! a fixed client). The same reason, as [`CloseReason::as_str`], is the
//! bounded `reason` label of the disconnect metrics.

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
}
