//! The requests of one authenticated socket: Connect's registration and
//! recovery, subscribe and unsubscribe, publish, receipts, typing, ping,
//! token refresh and presence watches. A session reaches the rest of the
//! edge only through its [`SessionContext`].
use std::sync::Arc;

use bytes::Bytes;
use switchboard_protocol::{
    ChatId, CloseReason, IdError, SharedFrame, StreamKey, UserId, now_ms,
    subject::chat_subject,
    v1::{
        self, ClientFrame, ConnectResult, ErrorCode, PresenceEvent, PublishAck, ReceiptEvent,
        RefreshResult, ServerFrame, SubscribeResult, TypingEvent, client_frame, publish, receipt,
        server_frame,
    },
};
use switchboard_router::{PublishRequest, publish_to_user};
use tracing::Instrument;

use crate::{
    auth::{AuthError, Identity},
    authz::{Action, Denied},
    hooks::Moderated,
    mailbox::{ConnHandle, Outbound, Recovered},
    metrics,
    state::SessionContext,
};

/// A request refused with a protocol error code.
pub(super) struct Refusal(pub(super) ErrorCode, pub(super) String);

impl From<IdError> for Refusal {
    fn from(e: IdError) -> Self {
        Refusal(ErrorCode::InvalidId, e.to_string())
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        Refusal(e.code(), e.to_string())
    }
}

impl From<Denied> for Refusal {
    fn from(Denied(code, message): Denied) -> Self {
        Refusal(code, message)
    }
}

fn code_label(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::BadRequest => "bad_request",
        ErrorCode::Unauthorized => "unauthorized",
        ErrorCode::Forbidden => "forbidden",
        ErrorCode::NotSubscribed => "not_subscribed",
        ErrorCode::AlreadySubscribed => "already_subscribed",
        ErrorCode::TooLarge => "too_large",
        ErrorCode::InvalidId => "invalid_id",
        ErrorCode::LimitExceeded => "limit_exceeded",
        ErrorCode::TokenExpired => "token_expired",
        ErrorCode::Rejected => "rejected",
        ErrorCode::Internal => "internal",
        ErrorCode::Unavailable => "unavailable",
        ErrorCode::Unspecified => "unspecified",
    }
}

/// One authenticated socket's requests and what they hold: its chats,
/// its presence watches, its personal stream. Every idle socket holds
/// one, so its presence session (three strings) is made when needed, and
/// its sets are sorted vectors (no hasher, nothing allocated while empty).
pub(crate) struct Session {
    /// One pointer to what every session shares: idle sockets pay for it.
    ctx: Arc<SessionContext>,
    conn: ConnHandle,
    identity: Identity,
    chats: Subscriptions,
    watching: SortedSet<UserId>,
    joined_user_stream: bool,
}

/// What a subscription token granted in its chat (ADR 0031).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    /// Nothing: the chat was authorized by the token's claim or the mode.
    None,
    /// Reading it and receipts.
    Read,
    /// And publishing and typing.
    ReadWrite,
}

impl Grant {
    fn allows(self, action: Action) -> bool {
        match self {
            Grant::None => false,
            Grant::Read => matches!(action, Action::Subscribe | Action::Receipt),
            Grant::ReadWrite => true,
        }
    }
}

/// The session's chats, sorted by id, with what a subscription token
/// granted in each (bounded by `max_subscriptions`).
#[derive(Default)]
struct Subscriptions(Vec<(ChatId, Grant)>);

impl Subscriptions {
    fn get(&self, chat: &ChatId) -> Option<Grant> {
        self.0
            .binary_search_by(|(c, _)| c.cmp(chat))
            .ok()
            .map(|at| self.0[at].1)
    }

    fn insert(&mut self, chat: ChatId, grant: Grant) {
        match self.0.binary_search_by(|(c, _)| c.cmp(&chat)) {
            Ok(at) => self.0[at].1 = grant,
            Err(at) => self.0.insert(at, (chat, grant)),
        }
    }

    fn remove(&mut self, chat: &ChatId) -> bool {
        match self.0.binary_search_by(|(c, _)| c.cmp(chat)) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// A small set: a sorted vector, bounded by the session's limits
/// (`max_subscriptions`, `max_presence_watches`).
struct SortedSet<T>(Vec<T>);

impl<T> Default for SortedSet<T> {
    fn default() -> Self {
        SortedSet(Vec::new())
    }
}

impl<T: Ord> SortedSet<T> {
    fn contains(&self, v: &T) -> bool {
        self.0.binary_search(v).is_ok()
    }

    /// False if it was already there.
    fn insert(&mut self, v: T) -> bool {
        match self.0.binary_search(&v) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, v);
                true
            }
        }
    }

    /// False if it was not there.
    fn remove(&mut self, v: &T) -> bool {
        match self.0.binary_search(v) {
            Ok(at) => {
                self.0.remove(at);
                true
            }
            Err(_) => false,
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

impl<T> IntoIterator for SortedSet<T> {
    type Item = T;
    type IntoIter = std::vec::IntoIter<T>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl Session {
    pub(crate) fn new(ctx: Arc<SessionContext>, conn: ConnHandle, identity: Identity) -> Self {
        Session {
            ctx,
            conn,
            identity,
            chats: Subscriptions::default(),
            watching: SortedSet::default(),
            joined_user_stream: false,
        }
    }

    /// This socket's presence session.
    fn presence(&self) -> switchboard_presence::Session {
        self.ctx
            .sessions
            .session_of(&self.identity.user, self.conn.id())
    }

    pub(super) fn context(&self) -> &SessionContext {
        &self.ctx
    }

    pub(super) fn conn(&self) -> &ConnHandle {
        &self.conn
    }

    fn encode(&self, frame: &ServerFrame) -> Bytes {
        self.conn.encoding().encode_server(frame)
    }

    fn reply(&self, id: u32, kind: server_frame::Kind) {
        let bytes = self.encode(&ServerFrame {
            id,
            kind: Some(kind),
        });
        self.conn.send(Outbound::Reply(bytes));
    }

    pub(super) fn refuse(&self, id: u32, Refusal(code, message): Refusal) {
        metrics::error_reply(code_label(code));
        self.reply(
            id,
            server_frame::Kind::Error(v1::Error {
                code: code as u32,
                message,
            }),
        );
    }

    /// Joins the personal stream, registers presence and answers Connect
    /// (with the missed personal messages right after).
    pub(crate) async fn start(&mut self, id: u32, connect: v1::Connect) -> Result<(), CloseReason> {
        let key = StreamKey::User(self.identity.user.clone());
        self.conn.send(Outbound::BeginRecovery(key.clone()));
        // From here the hub's copy of the key: the write side keeps it, so
        // the fan-out's lookups compare one shared key by address.
        let Ok(key) = self.ctx.hub.join(&key, &self.conn).await else {
            self.refuse(
                id,
                Refusal(ErrorCode::Unavailable, "bus unavailable".into()),
            );
            return Err(CloseReason::Unavailable);
        };
        self.joined_user_stream = true;
        // Presence is how routers find this edge for the personal stream,
        // so it is registered before history is read: a message stored
        // before the router's lookup is in the read below, one stored after
        // it is routed here.
        let presence = self.presence();
        let registered = self.ctx.sessions.register(self.conn.id(), &presence).await;
        if let Err(e) = registered {
            self.refuse(id, Refusal(ErrorCode::Unavailable, e.to_string()));
            return Err(CloseReason::Unavailable);
        }
        // After registering: a kick that revokes (ADR 0039) writes its mark
        // before it looks the user up in presence, so either this read
        // sees the mark or the kick sees this session.
        if let Err(denied) = self.ctx.authz.check_revoked(&self.identity).await {
            let reason = if denied.0 == ErrorCode::Unauthorized {
                metrics::auth_failure(AuthError::Revoked.label());
                CloseReason::Unauthorized
            } else {
                CloseReason::Unavailable
            };
            self.refuse(id, denied.into());
            return Err(reason);
        }
        let recovery = match self
            .ctx
            .history
            .recover(&key, connect.user_since, &connect.user_epoch)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.refuse(id, Refusal(ErrorCode::Unavailable, e.to_string()));
                return Err(CloseReason::Unavailable);
            }
        };
        self.ctx.hub.note_position(&key, &recovery.position);
        let result = ConnectResult {
            session_id: presence.session_id,
            user: self.identity.user.to_string(),
            server_time_ms: now_ms(),
            heartbeat_interval_ms: self.ctx.settings.heartbeat_interval.as_millis() as u32,
            token_expires_at_ms: self.identity.expires_at_ms,
            user_stream: Some(recovery.position),
            node: self.ctx.settings.node_id.clone(),
        };
        let reply = self.encode(&ServerFrame {
            id,
            kind: Some(server_frame::Kind::ConnectResult(result)),
        });
        self.conn.send(Outbound::Recovered(Box::new(Recovered {
            stream: key,
            reply,
            frames: recovery.frames,
        })));
        Ok(())
    }

    /// Handles one request; `Err` closes the socket.
    pub(super) async fn handle(&mut self, req: ClientFrame) -> Result<(), CloseReason> {
        let id = req.id;
        let Some(kind) = req.kind else {
            self.refuse(
                id,
                Refusal(ErrorCode::BadRequest, "frame has no request".into()),
            );
            return Ok(());
        };
        let outcome = match kind {
            client_frame::Kind::Connect(_) => {
                Err(Refusal(ErrorCode::BadRequest, "already connected".into()))
            }
            client_frame::Kind::Subscribe(s) => self.subscribe(id, s).await,
            client_frame::Kind::Unsubscribe(u) => self.unsubscribe(id, &u.chat).await,
            client_frame::Kind::Publish(p) => self.publish(id, p).await,
            client_frame::Kind::Receipt(r) => self.receipt(id, r).await,
            client_frame::Kind::Typing(t) => self.typing(id, &t.chat).await,
            client_frame::Kind::Ping(_) => {
                self.reply(
                    id,
                    server_frame::Kind::Pong(v1::Pong {
                        server_time_ms: now_ms(),
                    }),
                );
                Ok(())
            }
            client_frame::Kind::Refresh(r) => self.refresh(id, &r.token).await,
            client_frame::Kind::WatchPresence(w) => self.watch(id, w.users).await,
            client_frame::Kind::UnwatchPresence(w) => self.unwatch(id, w.users).await,
        };
        if let Err(refusal) = outcome {
            self.refuse(id, refusal);
        }
        Ok(())
    }

    /// Whether this socket may do `action` in `chat`: granted by its
    /// connection token, by the subscription token it subscribed with, or
    /// by the chat authorization mode (ADR 0031).
    async fn authorize(&self, chat: &str, action: Action) -> Result<ChatId, Refusal> {
        let chat = ChatId::parse(chat)?;
        if self.identity.grants(&chat) || self.chats.get(&chat).is_some_and(|g| g.allows(action)) {
            return Ok(chat);
        }
        self.ctx
            .authz
            .check(&self.identity.user, &chat, action)
            .await?;
        Ok(chat)
    }

    /// A subscription token's grant, checked against this socket's user
    /// and the chat asked for.
    fn subscription_grant(&self, token: &str, chat: &ChatId) -> Result<Grant, Refusal> {
        let grant = self
            .ctx
            .auth
            .verify_subscription(token)
            .inspect_err(|e| metrics::auth_failure(e.label()))?;
        if grant.user != self.identity.user {
            return Err(Refusal(
                ErrorCode::Forbidden,
                "subscription token is for another user".into(),
            ));
        }
        if grant.chat != *chat {
            return Err(Refusal(
                ErrorCode::Forbidden,
                format!("subscription token is for chat {}", grant.chat),
            ));
        }
        Ok(if grant.publish {
            Grant::ReadWrite
        } else {
            Grant::Read
        })
    }

    /// Drops the chats the hub no longer holds this socket in (it ends a
    /// removed member's subscriptions by itself).
    fn forget_ended(&mut self, only: Option<&ChatId>) {
        let (hub, id) = (&self.ctx.hub, self.conn.id());
        self.chats.0.retain(|(c, _)| {
            only.is_some_and(|o| o != c) || hub.holds(&StreamKey::Chat(c.clone()), id)
        });
    }

    async fn subscribe(&mut self, id: u32, s: v1::Subscribe) -> Result<(), Refusal> {
        let chat = ChatId::parse(&s.chat)?;
        self.forget_ended(Some(&chat));
        if self.chats.get(&chat).is_some() {
            return Err(Refusal(
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to {chat}"),
            ));
        }
        if self.chats.len() >= self.ctx.settings.max_subscriptions {
            self.forget_ended(None);
        }
        if self.chats.len() >= self.ctx.settings.max_subscriptions {
            return Err(Refusal(
                ErrorCode::LimitExceeded,
                "too many subscriptions".into(),
            ));
        }
        let checked = std::time::Instant::now();
        let grant = if s.token.is_empty() {
            self.authorize(&s.chat, Action::Subscribe).await?;
            Grant::None
        } else {
            self.subscription_grant(&s.token, &chat)?
        };
        let key = StreamKey::Chat(chat.clone());
        self.conn.send(Outbound::BeginRecovery(key.clone()));
        // The hub's copy of the key from here (see `start`).
        let key = match self.ctx.hub.join(&key, &self.conn).await {
            Ok(canonical) => canonical,
            Err(e) => {
                self.conn.send(Outbound::Forget(key));
                return Err(Refusal(ErrorCode::Unavailable, e.to_string()));
            }
        };
        // A removal that reached this edge while the check was answered:
        // the hub ended the subscriptions it found, not this one yet.
        if grant == Grant::None
            && !self.identity.grants(&chat)
            && self
                .ctx
                .authz
                .removed_since(&self.identity.user, &chat, checked)
        {
            self.ctx.hub.leave(&key, self.conn.id()).await;
            self.conn.send(Outbound::Forget(key));
            return Err(Refusal(
                ErrorCode::Forbidden,
                format!("removed from chat {chat}"),
            ));
        }
        self.chats.insert(chat.clone(), grant);
        let recovery = match self.ctx.history.recover(&key, s.since, &s.epoch).await {
            Ok(r) => r,
            Err(e) => {
                self.chats.remove(&chat);
                self.ctx.hub.leave(&key, self.conn.id()).await;
                self.conn.send(Outbound::Forget(key));
                return Err(Refusal(ErrorCode::Unavailable, e.to_string()));
            }
        };
        self.ctx.hub.note_position(&key, &recovery.position);
        let result = SubscribeResult {
            chat: chat.to_string(),
            position: Some(recovery.position),
        };
        let reply = self.encode(&ServerFrame {
            id,
            kind: Some(server_frame::Kind::SubscribeResult(result)),
        });
        self.conn.send(Outbound::Recovered(Box::new(Recovered {
            stream: key,
            reply,
            frames: recovery.frames,
        })));
        Ok(())
    }

    async fn unsubscribe(&mut self, id: u32, chat: &str) -> Result<(), Refusal> {
        let chat = ChatId::parse(chat)?;
        self.forget_ended(Some(&chat));
        if !self.chats.remove(&chat) {
            return Err(Refusal(
                ErrorCode::NotSubscribed,
                format!("not subscribed to {chat}"),
            ));
        }
        let key = StreamKey::Chat(chat);
        self.ctx.hub.leave(&key, self.conn.id()).await;
        self.conn.send(Outbound::Forget(key));
        self.reply(id, server_frame::Kind::Ok(v1::Ok {}));
        Ok(())
    }

    async fn publish(&mut self, id: u32, p: v1::Publish) -> Result<(), Refusal> {
        if !switchboard_router::trace::enabled() {
            return self.publish_traced(id, p).await;
        }
        // Its trace goes on to the router and the delivering edges (ADR 0038).
        let span = tracing::info_span!(
            target: switchboard_router::trace::TARGET,
            "edge.publish",
            otel.kind = "server",
            payload_bytes = p.payload.len(),
            stream = tracing::field::Empty,
            seq = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        let done = self.publish_traced(id, p).instrument(span.clone()).await;
        if let Err(Refusal(code, _)) = &done {
            span.record("error", code.as_str_name());
        }
        done
    }

    /// [`Self::publish`] inside its span, if any: records the stream and
    /// the seq on it.
    async fn publish_traced(&mut self, id: u32, p: v1::Publish) -> Result<(), Refusal> {
        let received = std::time::Instant::now();
        let target = match p.target {
            Some(publish::Target::Chat(c)) => {
                StreamKey::Chat(self.authorize(&c, Action::Publish).await?)
            }
            Some(publish::Target::User(u)) => StreamKey::User(self.direct_to(&u).await?),
            None => {
                return Err(Refusal(
                    ErrorCode::BadRequest,
                    "publish needs a chat or a user".into(),
                ));
            }
        };
        let payload = match &self.ctx.moderation {
            // Before sequencing: what is stored and delivered is what the
            // backend's hook let through (ADR 0034). A bad id is refused
            // first, so the hook sees only messages the router would take.
            Some(m) => {
                switchboard_protocol::validate_client_msg_id(&p.client_msg_id)?;
                // The router's size limit first too: an oversized publish
                // is 413, whatever the hook would say.
                let max = m.max_payload_bytes();
                if p.payload.len() > max {
                    let e = switchboard_router::PublishError::TooLarge {
                        len: p.payload.len(),
                        max,
                    };
                    return Err(Refusal(e.code(), e.to_string()));
                }
                match m
                    .moderate(&self.identity.user, &target, &p.client_msg_id, p.payload)
                    .await
                {
                    Moderated::Publish(payload) => payload,
                    Moderated::Rejected(reason) => {
                        return Err(Refusal(ErrorCode::Rejected, reason));
                    }
                    Moderated::Failed(why) => return Err(Refusal(ErrorCode::Unavailable, why)),
                }
            }
            None => p.payload,
        };
        let traced = switchboard_router::trace::enabled();
        if traced {
            tracing::Span::current().record("stream", tracing::field::display(&target));
        }
        let req = PublishRequest {
            sender: self.identity.user.clone(),
            target: target.clone(),
            client_msg_id: p.client_msg_id,
            payload,
        };
        let published = self
            .ctx
            .router
            .publish(req)
            .await
            .map_err(|e| Refusal(e.code(), e.to_string()))?;
        if traced {
            tracing::Span::current().record("seq", published.seq);
        }
        self.ctx
            .metrics
            .hops
            .ack
            .record(received.elapsed().as_secs_f64());
        let (chat, user) = match target {
            StreamKey::Chat(c) => (c.to_string(), String::new()),
            StreamKey::User(u) => (String::new(), u.to_string()),
        };
        self.reply(
            id,
            server_frame::Kind::PublishAck(PublishAck {
                chat,
                user,
                seq: published.seq,
                timestamp_ms: published.timestamp_ms,
                duplicate: published.duplicate,
            }),
        );
        Ok(())
    }

    /// A user this socket's user may message directly (`--dm-policy`).
    async fn direct_to(&self, user: &str) -> Result<UserId, Refusal> {
        let to = UserId::parse(user)?;
        self.ctx.authz.check_dm(&self.identity.user, &to).await?;
        Ok(to)
    }

    async fn receipt(&mut self, id: u32, r: v1::Receipt) -> Result<(), Refusal> {
        // A receipt goes to a chat, or to one user (on each edge holding a
        // socket of theirs); at most once, like every ephemeral event.
        let to = match r.target {
            Some(receipt::Target::Chat(c)) => {
                StreamKey::Chat(self.authorize(&c, Action::Receipt).await?)
            }
            Some(receipt::Target::User(u)) => StreamKey::User(self.direct_to(&u).await?),
            None => {
                return Err(Refusal(
                    ErrorCode::BadRequest,
                    "receipt needs a chat or a user".into(),
                ));
            }
        };
        let chat = match &to {
            StreamKey::Chat(c) => c.to_string(),
            StreamKey::User(_) => String::new(),
        };
        let frame = SharedFrame::new(ServerFrame {
            id: 0,
            kind: Some(server_frame::Kind::Receipt(ReceiptEvent {
                chat,
                from: self.identity.user.to_string(),
                seq: r.seq,
                kind: r.kind,
                timestamp_ms: now_ms(),
            })),
        });
        match to {
            StreamKey::Chat(c) => self.ctx.router.broadcast(&chat_subject(&c), frame).await,
            StreamKey::User(u) => {
                let (bus, presence) = (self.ctx.bus.as_ref(), self.ctx.presence.as_ref());
                if let Err(e) = publish_to_user(bus, presence, &u, frame).await {
                    tracing::debug!(error = %e, "receipt not sent");
                }
            }
        }
        self.reply(id, server_frame::Kind::Ok(v1::Ok {}));
        Ok(())
    }

    async fn typing(&mut self, id: u32, chat: &str) -> Result<(), Refusal> {
        let chat = self.authorize(chat, Action::Typing).await?;
        let frame = SharedFrame::new(ServerFrame {
            id: 0,
            kind: Some(server_frame::Kind::Typing(TypingEvent {
                chat: chat.to_string(),
                user: self.identity.user.to_string(),
            })),
        });
        self.ctx.router.broadcast(&chat_subject(&chat), frame).await;
        if id != 0 {
            self.reply(id, server_frame::Kind::Ok(v1::Ok {}));
        }
        Ok(())
    }

    async fn refresh(&mut self, id: u32, token: &str) -> Result<(), Refusal> {
        let fresh = self
            .ctx
            .auth
            .verify(token)
            .inspect_err(|e| metrics::auth_failure(e.label()))?;
        if fresh.user != self.identity.user {
            metrics::auth_failure(AuthError::OtherUser.label());
            return Err(AuthError::OtherUser.into());
        }
        // A refresh is the periodic re-check of a live socket: a revoked
        // token does not extend it (ADR 0039).
        self.ctx
            .authz
            .check_revoked(&fresh)
            .await
            .inspect_err(|d| {
                if d.0 == ErrorCode::Unauthorized {
                    metrics::auth_failure(AuthError::Revoked.label());
                }
            })?;
        let expires = fresh.expires_at_ms;
        self.identity = fresh;
        self.conn.send(Outbound::TokenExpiry(expires));
        self.reply(
            id,
            server_frame::Kind::RefreshResult(RefreshResult {
                token_expires_at_ms: expires,
            }),
        );
        Ok(())
    }

    async fn watch(&mut self, id: u32, users: Vec<String>) -> Result<(), Refusal> {
        let users = users
            .iter()
            .map(|u| UserId::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        let fresh: Vec<UserId> = users
            .into_iter()
            .filter(|u| !self.watching.contains(u))
            .collect();
        if self.watching.len() + fresh.len() > self.ctx.settings.max_presence_watches {
            return Err(Refusal(
                ErrorCode::LimitExceeded,
                "too many presence watches".into(),
            ));
        }
        for u in &fresh {
            self.ctx
                .hub
                .watch(u, &self.conn)
                .await
                .map_err(|e| Refusal(ErrorCode::Unavailable, e.to_string()))?;
            self.watching.insert(u.clone());
        }
        self.reply(id, server_frame::Kind::Ok(v1::Ok {}));
        // Current state right after the reply, so the app starts correct.
        let statuses = self
            .ctx
            .presence
            .status(&fresh, now_ms())
            .await
            .map_err(|e| Refusal(ErrorCode::Unavailable, e.to_string()))?;
        for s in statuses {
            let frame = ServerFrame {
                id: 0,
                kind: Some(server_frame::Kind::Presence(PresenceEvent {
                    user: s.user.to_string(),
                    online: s.online,
                    last_seen_ms: s.last_seen_ms,
                    devices: s.devices,
                })),
            };
            self.conn.send(Outbound::Reply(self.encode(&frame)));
        }
        Ok(())
    }

    async fn unwatch(&mut self, id: u32, users: Vec<String>) -> Result<(), Refusal> {
        for u in users {
            let u = UserId::parse(&u)?;
            if self.watching.remove(&u) {
                self.ctx.hub.unwatch(&u, self.conn.id()).await;
            }
        }
        self.reply(id, server_frame::Kind::Ok(v1::Ok {}));
        Ok(())
    }

    /// Leaves every stream and watch and unregisters presence.
    pub(crate) async fn cleanup(&mut self) {
        for (chat, _) in std::mem::take(&mut self.chats.0) {
            self.ctx
                .hub
                .leave(&StreamKey::Chat(chat), self.conn.id())
                .await;
        }
        for user in std::mem::take(&mut self.watching) {
            self.ctx.hub.unwatch(&user, self.conn.id()).await;
        }
        if self.joined_user_stream {
            self.joined_user_stream = false;
            self.ctx.sessions.forget(self.conn.id());
            self.ctx
                .hub
                .leave(&StreamKey::User(self.identity.user.clone()), self.conn.id())
                .await;
            self.ctx.sessions.unregister(&self.presence()).await;
        }
    }
}
