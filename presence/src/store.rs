use async_trait::async_trait;
use switchboard_protocol::UserId;

/// One connected device session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The authenticated user.
    pub user: UserId,
    /// Unique per socket.
    pub session_id: String,
    /// The edge node holding the socket.
    pub node: String,
}

/// What a register/unregister changed for the user as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The user's first device came online: publish an online event.
    BecameOnline,
    /// The user's last device went offline at this unix ms: publish offline.
    BecameOffline {
        /// Unix ms of the disconnect.
        last_seen_ms: i64,
    },
    /// Device count changed but the user stayed online (or offline).
    Unchanged,
}

/// A user's presence as a query sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserStatus {
    /// The user.
    pub user: UserId,
    /// At least one live session.
    pub online: bool,
    /// Live sessions.
    pub devices: u32,
    /// Unix ms of the last disconnect; 0 if never seen offline.
    pub last_seen_ms: i64,
}

/// A presence backend failed; callers keep serving sockets and retry.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// The backend could not be reached or answered with an error.
    #[error("presence backend unavailable: {0}")]
    Unavailable(String),
}

/// Who is online.
///
/// Contract: sessions carry a TTL refreshed by [`PresenceStore::heartbeat`];
/// a session not refreshed within the TTL counts as gone, so a crashed
/// node's sessions disappear by themselves. [`Transition`]s are reported
/// exactly once per change of the user's online state, also under
/// concurrent registration of the same user's sessions.
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Registers a live session.
    async fn register(&self, session: &Session, now_ms: i64) -> Result<Transition, PresenceError>;
    /// Removes a session (clean disconnect).
    async fn unregister(&self, session: &Session, now_ms: i64)
    -> Result<Transition, PresenceError>;
    /// Refreshes the TTL of these sessions.
    async fn heartbeat(&self, sessions: &[Session], now_ms: i64) -> Result<(), PresenceError>;
    /// Status of many users in one call.
    async fn status(&self, users: &[UserId], now_ms: i64)
    -> Result<Vec<UserStatus>, PresenceError>;
    /// Expires sessions past their TTL; returns the users that went offline.
    async fn expire(&self, now_ms: i64) -> Result<Vec<(UserId, i64)>, PresenceError>;
    /// Registers or refreshes a node (edge or router) and its address for
    /// one TTL.
    async fn node_heartbeat(
        &self,
        node: &str,
        addr: &str,
        now_ms: i64,
    ) -> Result<(), PresenceError>;
    /// Live nodes and their addresses.
    async fn nodes(&self, now_ms: i64) -> Result<Vec<(String, String)>, PresenceError>;
}
