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
///
/// The message carries the cause's text (callers print one line: a
/// client's error, a log field); [`std::error::Error::source`] keeps the
/// typed cause.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// Redis could not be reached, timed out or answered with an error.
    #[error("presence backend unavailable: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Who is online.
///
/// Contract: a session lives as long as its node's lease. Nodes renew the
/// lease with [`PresenceStore::node_heartbeat`]; once a lease runs out, any
/// node's [`PresenceStore::expire`] removes that node's sessions, so a
/// crashed node's users go offline by themselves. One heartbeat per node
/// (not per session) keeps a million sessions cheap. A node leases itself
/// before it registers sessions. [`Transition`]s are reported exactly once
/// per change of the user's online state, also under concurrent
/// registration of the same user's sessions.
#[async_trait]
pub trait PresenceStore: Send + Sync + 'static {
    /// Registers a live session.
    async fn register(&self, session: &Session, now_ms: i64) -> Result<Transition, PresenceError>;
    /// Removes a session (clean disconnect).
    async fn unregister(&self, session: &Session, now_ms: i64)
    -> Result<Transition, PresenceError>;
    /// Registers these sessions again after the store lost them (restarted
    /// empty, or a stalled node's lease ran out and was swept); returns the
    /// users this brought back online.
    async fn restore(
        &self,
        sessions: &[Session],
        now_ms: i64,
    ) -> Result<Vec<UserId>, PresenceError>;
    /// Which of `sessions` the store holds, for their node, in the order
    /// asked: a node's check that no registration was lost (a write a
    /// Redis master acknowledged and died with before its replica had it).
    async fn registered(&self, sessions: &[Session]) -> Result<Vec<bool>, PresenceError>;
    /// Status of many users in one call.
    async fn status(&self, users: &[UserId], now_ms: i64)
    -> Result<Vec<UserStatus>, PresenceError>;
    /// The nodes holding a session of `user`: where its personal stream
    /// is delivered.
    async fn nodes_of(&self, user: &UserId) -> Result<Vec<String>, PresenceError>;
    /// Removes the sessions of nodes whose lease ran out; returns the users
    /// that went offline (each to exactly one caller).
    async fn expire(&self, now_ms: i64) -> Result<Vec<(UserId, i64)>, PresenceError>;
    /// Removes every session of `node`: a node starting again under the
    /// same id drops what its previous run left.
    async fn drop_node(&self, node: &str, now_ms: i64)
    -> Result<Vec<(UserId, i64)>, PresenceError>;
    /// Renews `node`'s lease for one TTL with its address. Returns true
    /// when the store held no live lease for it (first start, the store
    /// lost its data, or the lease ran out): the node then restores its
    /// sessions.
    async fn node_heartbeat(
        &self,
        node: &str,
        addr: &str,
        now_ms: i64,
    ) -> Result<bool, PresenceError>;
    /// Live nodes and their addresses.
    async fn nodes(&self, now_ms: i64) -> Result<Vec<(String, String)>, PresenceError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_failure_keeps_its_cause() {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = PresenceError::from(redis::RedisError::from(cause));
        assert!(e.to_string().starts_with("presence backend unavailable: "));
        let source = std::error::Error::source(&e).expect("a source");
        assert!(source.downcast_ref::<redis::RedisError>().is_some());
    }
}
