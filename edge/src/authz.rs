//! Chat authorization (ADR 0031): who may subscribe to, publish in, send
//! receipts to and type in a chat, and who may message whom.
//!
//! A chat granted by a signed token is allowed in every mode: the
//! connection token's `chats` claim, or a subscription token the socket
//! subscribed with. Every other chat is decided by `--chat-auth`:
//! `token` refuses it, `members` asks the member store (Redis, or memory
//! standalone), `proxy` asks the backend's hook, `open` allows it.
//! Positive answers of the store and the hook are cached per (user, chat),
//! bounded in entries and time; a member removed through the API is
//! dropped from every edge's cache over the bus (`sb.members`), and the
//! edge ends the user's live subscriptions to the chat.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use dashmap::DashMap;
use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use switchboard_presence::{MemberStore, PresenceError};
use switchboard_protocol::{ChatId, UserId, v1::ErrorCode};

use crate::auth::{AuthError, Identity};

/// How chats not granted by a token are decided (`--chat-auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatAuthMode {
    /// Refused: only token grants count.
    Token,
    /// The member store decides (the backend keeps it through the API).
    Members,
    /// The backend's authorization hook decides.
    Proxy,
    /// Allowed (development and demos; `--dev` implies it).
    Open,
}

impl ChatAuthMode {
    /// The metric label and setting value.
    pub fn as_str(self) -> &'static str {
        match self {
            ChatAuthMode::Token => "token",
            ChatAuthMode::Members => "members",
            ChatAuthMode::Proxy => "proxy",
            ChatAuthMode::Open => "open",
        }
    }
}

impl std::str::FromStr for ChatAuthMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "token" => Ok(ChatAuthMode::Token),
            "members" => Ok(ChatAuthMode::Members),
            "proxy" => Ok(ChatAuthMode::Proxy),
            "open" => Ok(ChatAuthMode::Open),
            _ => Err(format!("{s:?}: expected token, members, proxy or open")),
        }
    }
}

/// Who may message a user directly (`--dm-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DmPolicy {
    /// Any authenticated user.
    Anyone,
    /// Only users the backend made contacts of the recipient.
    Contacts,
}

impl std::str::FromStr for DmPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "anyone" => Ok(DmPolicy::Anyone),
            "contacts" => Ok(DmPolicy::Contacts),
            _ => Err(format!("{s:?}: expected anyone or contacts")),
        }
    }
}

/// What a request does in a chat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read it (subscribe).
    Subscribe,
    /// Publish a message.
    Publish,
    /// Send a receipt.
    Receipt,
    /// Send typing.
    Typing,
}

impl Action {
    /// The name the proxy hook is told.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Subscribe => "subscribe",
            Action::Publish => "publish",
            Action::Receipt => "receipt",
            Action::Typing => "typing",
        }
    }
}

/// The proxy hook's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookDecision {
    /// Allowed.
    pub allow: bool,
    /// Why not (shown to the client).
    pub reason: String,
    /// How long an allow may be cached; `None`: the edge's setting.
    pub cache_ttl: Option<Duration>,
}

/// The proxy hook could not answer (timeout, transport, bad answer).
#[derive(Debug, thiserror::Error)]
#[error("authorization hook: {0}")]
pub struct HookError(pub String);

/// The backend's authorization hook (`proxy` mode), over HTTP or gRPC.
#[async_trait]
pub trait AuthorizeHook: Send + Sync + 'static {
    /// Asks whether `user` may do `action` in `chat`, within the hook's deadline.
    async fn authorize(
        &self,
        user: &UserId,
        chat: &ChatId,
        action: Action,
    ) -> Result<HookDecision, HookError>;
}

/// A request refused: the protocol code and the message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Denied(pub(crate) ErrorCode, pub(crate) String);

/// Settings of [`ChatAuth`].
#[derive(Debug, Clone, Copy)]
pub struct AuthzSettings {
    /// The mode (`--chat-auth`).
    pub mode: ChatAuthMode,
    /// Direct messages (`--dm-policy`).
    pub dm: DmPolicy,
    /// How long a positive answer is kept (`--chat-auth-cache-ttl-ms`).
    pub cache_ttl: Duration,
    /// Most answers kept (`--chat-auth-cache-entries`).
    pub cache_entries: usize,
}

/// How long a removal is remembered to catch a check that raced it.
const TOMBSTONE_TTL: Duration = Duration::from_secs(10);
/// Fewest time between two sweeps of a full cache for expired allows.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The edge's chat authorization.
pub(crate) struct ChatAuth {
    settings: AuthzSettings,
    members: Arc<dyn MemberStore>,
    hook: Option<Arc<dyn AuthorizeHook>>,
    /// (user, chat) → allowed until.
    allowed: DashMap<(UserId, ChatId), Instant, foldhash::fast::RandomState>,
    /// (user, chat) → removed at: a check that began before a removal and
    /// ends after it must not cache (or keep) what the removal took back.
    removed: DashMap<(UserId, ChatId), Instant, foldhash::fast::RandomState>,
    /// When a full cache was last swept for expired allows.
    swept: std::sync::Mutex<Instant>,
    metrics: AuthzMetrics,
}

struct AuthzMetrics {
    answers: [[Counter; 3]; 4],
    cache_entries: Gauge,
    evictions: Counter,
    lookup: Histogram,
}

/// Where an answer came from (`switchboard_edge_chat_auth_total{source}`).
#[derive(Clone, Copy)]
enum Source {
    Cache,
    Store,
    Hook,
    Mode,
}

/// What it was (`{result}`).
#[derive(Clone, Copy)]
enum Answer {
    Allow,
    Deny,
    Error,
}

const SOURCES: [&str; 4] = ["cache", "store", "hook", "mode"];
const ANSWERS: [&str; 3] = ["allow", "deny", "error"];

impl AuthzMetrics {
    /// Every (source, result) handle, registered at zero once: a request
    /// then bumps an atomic instead of looking its series up.
    fn answers() -> [[Counter; 3]; 4] {
        SOURCES.map(|source| {
            ANSWERS.map(|result| {
                let c = counter!("switchboard_edge_chat_auth_total", "source" => source, "result" => result);
                c.absolute(0);
                c
            })
        })
    }

    fn count(&self, source: Source, answer: Answer) {
        self.answers[source as usize][answer as usize].increment(1);
    }
}

impl ChatAuth {
    /// `hook` is required in `proxy` mode (the caller checks).
    pub(crate) fn new(
        settings: AuthzSettings,
        members: Arc<dyn MemberStore>,
        hook: Option<Arc<dyn AuthorizeHook>>,
    ) -> Self {
        gauge!("switchboard_edge_chat_auth_mode", "mode" => settings.mode.as_str()).set(1.0);
        ChatAuth {
            settings,
            members,
            hook,
            allowed: DashMap::default(),
            removed: DashMap::default(),
            swept: std::sync::Mutex::new(Instant::now()),
            metrics: AuthzMetrics {
                answers: AuthzMetrics::answers(),
                cache_entries: gauge!("switchboard_edge_chat_auth_cache_entries"),
                evictions: counter!("switchboard_edge_chat_auth_cache_evictions_total"),
                lookup: histogram!("switchboard_edge_chat_auth_lookup_seconds"),
            },
        }
    }

    /// Decides a chat request that no token granted. `Ok` allows it.
    pub(crate) async fn check(
        &self,
        user: &UserId,
        chat: &ChatId,
        action: Action,
    ) -> Result<(), Denied> {
        let started = Instant::now();
        match self.settings.mode {
            ChatAuthMode::Open => {
                self.metrics.count(Source::Mode, Answer::Allow);
                return Ok(());
            }
            ChatAuthMode::Token => {
                self.metrics.count(Source::Mode, Answer::Deny);
                return Err(Denied(
                    ErrorCode::Forbidden,
                    format!("no token grants chat {chat}"),
                ));
            }
            ChatAuthMode::Members | ChatAuthMode::Proxy => {}
        }
        let key = (user.clone(), chat.clone());
        if self.allowed.get(&key).is_some_and(|until| *until > started) {
            self.metrics.count(Source::Cache, Answer::Allow);
            return Ok(());
        }
        let (source, answer) = match self.settings.mode {
            ChatAuthMode::Members => (Source::Store, self.ask_store(user, chat).await),
            _ => (Source::Hook, self.ask_hook(user, chat, action).await),
        };
        self.metrics.lookup.record(started.elapsed().as_secs_f64());
        match answer {
            Ok((true, ttl)) => {
                self.metrics.count(source, Answer::Allow);
                if self.removed_since(user, chat, started) {
                    return Err(removed(chat));
                }
                self.remember(key, started + ttl.unwrap_or(self.settings.cache_ttl));
                Ok(())
            }
            Ok((false, _)) => {
                self.metrics.count(source, Answer::Deny);
                Err(Denied(
                    ErrorCode::Forbidden,
                    format!("not a member of chat {chat}"),
                ))
            }
            Err(denied) => {
                self.metrics.count(source, Answer::Error);
                Err(denied)
            }
        }
    }

    async fn ask_store(
        &self,
        user: &UserId,
        chat: &ChatId,
    ) -> Result<(bool, Option<Duration>), Denied> {
        self.members
            .is_member(chat, user)
            .await
            .map(|m| (m, None))
            .map_err(unavailable)
    }

    async fn ask_hook(
        &self,
        user: &UserId,
        chat: &ChatId,
        action: Action,
    ) -> Result<(bool, Option<Duration>), Denied> {
        let Some(hook) = &self.hook else {
            return Err(Denied(
                ErrorCode::Unavailable,
                "no authorization hook configured".into(),
            ));
        };
        match hook.authorize(user, chat, action).await {
            Ok(d) if d.allow => Ok((true, d.cache_ttl)),
            Ok(d) => Err(Denied(
                ErrorCode::Forbidden,
                if d.reason.is_empty() {
                    format!("chat {chat} refused by the backend")
                } else {
                    d.reason
                },
            )),
            // Fail closed: an unanswered check refuses. The hook's address
            // and error are for the operator's log, not the client.
            Err(e) => {
                tracing::warn!(error = %e, "authorization hook failed; refused (fail closed)");
                Err(Denied(
                    ErrorCode::Unavailable,
                    "authorization hook unavailable".into(),
                ))
            }
        }
    }

    /// Whether `identity`'s token still stands: refused with 401 when its
    /// user's tokens issued before it were revoked (ADR 0039), 503 when
    /// the store cannot tell (fail closed, as for membership).
    pub(crate) async fn check_revoked(&self, identity: &Identity) -> Result<(), Denied> {
        match self.members.revoked_before(&identity.user).await {
            Ok(Some(before)) if identity.revoked_by(before) => Err(Denied(
                ErrorCode::Unauthorized,
                AuthError::Revoked.to_string(),
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(Denied(ErrorCode::Unavailable, format!("revocations: {e}"))),
        }
    }

    /// Whether `from` may message `to` directly.
    pub(crate) async fn check_dm(&self, from: &UserId, to: &UserId) -> Result<(), Denied> {
        if self.settings.dm == DmPolicy::Anyone || from == to {
            return Ok(());
        }
        match self.members.is_contact(to, from).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Denied(
                ErrorCode::Forbidden,
                format!("{to} accepts direct messages from contacts only"),
            )),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Keeps an allow, within the entry bound. When full, expired entries
    /// are swept (at most once per [`SWEEP_EVERY`]: a pass over the whole
    /// map per miss made a full cache cost more than no cache), and while
    /// still full an arbitrary entry makes room, so the working set keeps
    /// turning over instead of the cache freezing on its first entries.
    fn remember(&self, key: (UserId, ChatId), until: Instant) {
        if self.allowed.len() >= self.settings.cache_entries {
            let now = Instant::now();
            let sweep = self
                .swept
                .try_lock()
                .ok()
                .filter(|last| now.duration_since(**last) >= SWEEP_EVERY);
            if let Some(mut last) = sweep {
                *last = now;
                self.allowed.retain(|_, t| *t > now);
            }
            if self.allowed.len() >= self.settings.cache_entries {
                let victim = self.allowed.iter().next().map(|e| e.key().clone());
                if let Some(victim) = victim {
                    self.allowed.remove(&victim);
                    self.metrics.evictions.increment(1);
                }
            }
        }
        self.allowed.insert(key, until);
        self.metrics.cache_entries.set(self.allowed.len() as f64);
    }

    /// Members removed from a chat (the bus's `sb.members`): their cached
    /// allows go, and a check in flight for them is refused.
    pub(crate) fn on_removed(&self, chat: &ChatId, users: &[UserId]) {
        let now = Instant::now();
        if self.removed.len() + users.len() > self.settings.cache_entries {
            self.removed
                .retain(|_, at| now.duration_since(*at) < TOMBSTONE_TTL);
        }
        for u in users {
            let key = (u.clone(), chat.clone());
            self.allowed.remove(&key);
            // Bounded like the cache: past it, a removal is not remembered
            // and only the (rare) race with a concurrent check is open.
            if self.removed.len() < self.settings.cache_entries {
                self.removed.insert(key, now);
            }
        }
        self.metrics.cache_entries.set(self.allowed.len() as f64);
    }

    /// Whether `user` was removed from `chat` after `since`.
    pub(crate) fn removed_since(&self, user: &UserId, chat: &ChatId, since: Instant) -> bool {
        self.removed
            .get(&(user.clone(), chat.clone()))
            .is_some_and(|at| *at >= since)
    }

    /// The bus may have lost a removal: forget every cached answer.
    pub(crate) fn on_possible_loss(&self) {
        self.allowed.clear();
        self.metrics.cache_entries.set(0.0);
    }
}

fn removed(chat: &ChatId) -> Denied {
    Denied(ErrorCode::Forbidden, format!("removed from chat {chat}"))
}

fn unavailable(e: PresenceError) -> Denied {
    // Fail closed: a store that cannot answer refuses, retryably.
    Denied(ErrorCode::Unavailable, format!("membership: {e}"))
}

#[cfg(test)]
mod tests {
    use switchboard_presence::MemoryMembers;

    use super::*;

    fn settings(mode: ChatAuthMode) -> AuthzSettings {
        AuthzSettings {
            mode,
            dm: DmPolicy::Contacts,
            cache_ttl: Duration::from_secs(60),
            cache_entries: 2,
        }
    }

    fn ids(u: &str, c: &str) -> (UserId, ChatId) {
        (UserId::parse(u).unwrap(), ChatId::parse(c).unwrap())
    }

    #[tokio::test]
    async fn members_mode_asks_the_store_caches_allows_and_forgets_removals() {
        let store = Arc::new(MemoryMembers::new());
        let auth = ChatAuth::new(settings(ChatAuthMode::Members), store.clone(), None);
        let (alice, room) = ids("alice", "room");
        let denied = auth
            .check(&alice, &room, Action::Subscribe)
            .await
            .unwrap_err();
        assert_eq!(denied.0, ErrorCode::Forbidden);
        store
            .add(&room, std::slice::from_ref(&alice))
            .await
            .unwrap();
        auth.check(&alice, &room, Action::Publish).await.unwrap();
        // Cached: the store no longer says so, the cache still does...
        store
            .remove(&room, std::slice::from_ref(&alice))
            .await
            .unwrap();
        auth.check(&alice, &room, Action::Typing).await.unwrap();
        // ...until the removal reaches this edge.
        let before = Instant::now();
        auth.on_removed(&room, std::slice::from_ref(&alice));
        assert!(auth.removed_since(&alice, &room, before));
        let denied = auth
            .check(&alice, &room, Action::Receipt)
            .await
            .unwrap_err();
        assert_eq!(denied.0, ErrorCode::Forbidden);
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_keeps_turning_over_when_full() {
        let store = Arc::new(MemoryMembers::new());
        let auth = ChatAuth::new(settings(ChatAuthMode::Members), store.clone(), None);
        for c in ["a", "b", "c", "d"] {
            let (u, chat) = ids("u", c);
            store.add(&chat, std::slice::from_ref(&u)).await.unwrap();
            auth.check(&u, &chat, Action::Subscribe).await.unwrap();
        }
        assert_eq!(auth.allowed.len(), 2);
        // The newest answer is kept: a full cache makes room for it.
        let (u, d) = ids("u", "d");
        assert!(auth.allowed.contains_key(&(u, d)));
    }

    #[tokio::test]
    async fn token_mode_refuses_and_open_allows_what_no_token_grants() {
        let store = Arc::new(MemoryMembers::new());
        let (u, c) = ids("u", "c");
        let token = ChatAuth::new(settings(ChatAuthMode::Token), store.clone(), None);
        assert_eq!(
            token.check(&u, &c, Action::Subscribe).await.unwrap_err().0,
            ErrorCode::Forbidden
        );
        let open = ChatAuth::new(settings(ChatAuthMode::Open), store, None);
        open.check(&u, &c, Action::Publish).await.unwrap();
    }

    #[tokio::test]
    async fn contacts_policy_lets_only_contacts_message_a_user() {
        let store = Arc::new(MemoryMembers::new());
        let auth = ChatAuth::new(settings(ChatAuthMode::Token), store.clone(), None);
        let (a, _) = ids("alice", "c");
        let (b, _) = ids("bob", "c");
        assert_eq!(
            auth.check_dm(&a, &b).await.unwrap_err().0,
            ErrorCode::Forbidden
        );
        auth.check_dm(&a, &a).await.unwrap();
        store
            .add_contacts(&b, std::slice::from_ref(&a))
            .await
            .unwrap();
        auth.check_dm(&a, &b).await.unwrap();
        assert!(auth.check_dm(&b, &a).await.is_err(), "one-way");
    }
}
