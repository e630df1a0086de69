//! The backend API as one transport-neutral service, [`Api`]: typed
//! requests in, typed results or an [`ApiError`] out. The HTTP routes
//! (`http`) and the gRPC service (`grpc`) only translate their wire form
//! into these calls and the answers back, so both accept exactly the same
//! requests, refuse them with the same message, and change nothing when
//! they refuse. [`ApiCode`] is the one table from a refusal to an HTTP
//! status and a gRPC status code.
use std::sync::Arc;

use bytes::Bytes;
use switchboard_presence::{MemberStore, PresenceStore, UserStatus};
use switchboard_protocol::{
    ChatId, IdError, StreamKey, UserId,
    v1::{Delivery, ErrorCode, StreamPosition, server_frame},
    validate_client_msg_id,
};
use switchboard_router::{
    Bus, History, PublishError, PublishRequest, Published, Publisher, publish_to_user,
};
use tracing::Instrument;

use crate::{
    members::{self, Changed, MembersApiError},
    telemetry::api_publish,
};

/// Users one presence request may ask about.
pub const MAX_PRESENCE_USERS: usize = 1000;
/// Messages one history read may return.
pub const MAX_HISTORY_LIMIT: u32 = 1000;
/// Messages a history read returns when it names no limit.
pub const DEFAULT_HISTORY_LIMIT: u32 = 100;
/// Messages one batch publish may carry.
pub const MAX_BATCH_MESSAGES: usize = 1000;
/// Longest epoch a history read may name (epochs are short hex strings).
const MAX_EPOCH_LEN: usize = 64;

/// Why a backend API request was refused: what the caller can do about
/// it, and its status on each transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiCode {
    /// Malformed: not JSON or protobuf, a field missing or one too many.
    BadRequest,
    /// A chat, user, session or client message id that is not allowed.
    InvalidId,
    /// Over a size or count limit.
    TooLarge,
    /// Missing or wrong API key.
    Unauthorized,
    /// The API is off on this node (no `--api-key`).
    Disabled,
    /// A backend (NATS, Redis, the routers) failed; retry later. Retrying
    /// a publish with the same client message id is safe.
    Unavailable,
}

impl ApiCode {
    /// The HTTP status: the protocol's error code numbers where there is
    /// one (400, 401, 413, 422, 503), 404 for an API that is off.
    pub fn http_status(self) -> u16 {
        match self {
            ApiCode::BadRequest => 400,
            ApiCode::InvalidId => 422,
            ApiCode::TooLarge => 413,
            ApiCode::Unauthorized => 401,
            ApiCode::Disabled => 404,
            ApiCode::Unavailable => 503,
        }
    }

    /// The gRPC status code. Both kinds of bad input are
    /// `INVALID_ARGUMENT` (the `switchboard-code` metadata tells them
    /// apart); every size limit, tonic's own message limit included, is
    /// `RESOURCE_EXHAUSTED`; an API that is off is `UNIMPLEMENTED`, as a
    /// gRPC server without the service would answer.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ApiCode::BadRequest | ApiCode::InvalidId => tonic::Code::InvalidArgument,
            ApiCode::TooLarge => tonic::Code::ResourceExhausted,
            ApiCode::Unauthorized => tonic::Code::Unauthenticated,
            ApiCode::Disabled => tonic::Code::Unimplemented,
            ApiCode::Unavailable => tonic::Code::Unavailable,
        }
    }

    /// A bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            ApiCode::BadRequest => "bad_request",
            ApiCode::InvalidId => "invalid_id",
            ApiCode::TooLarge => "too_large",
            ApiCode::Unauthorized => "unauthorized",
            ApiCode::Disabled => "disabled",
            ApiCode::Unavailable => "unavailable",
        }
    }

    /// The protocol error code an Error message carries (a batch's
    /// per-message results).
    pub fn error_code(self) -> ErrorCode {
        match self {
            ApiCode::BadRequest => ErrorCode::BadRequest,
            ApiCode::InvalidId => ErrorCode::InvalidId,
            ApiCode::TooLarge => ErrorCode::TooLarge,
            ApiCode::Unauthorized => ErrorCode::Unauthorized,
            ApiCode::Disabled => ErrorCode::Unspecified,
            ApiCode::Unavailable => ErrorCode::Unavailable,
        }
    }
}

/// A refused backend API request. The message is what the caller sees,
/// the same on both transports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// What kind of refusal.
    pub code: ApiCode,
    /// Why, for the caller.
    pub message: String,
}

impl ApiError {
    /// A refusal of kind `code`.
    pub fn new(code: ApiCode, message: impl std::fmt::Display) -> ApiError {
        ApiError {
            code,
            message: message.to_string(),
        }
    }

    /// Malformed input.
    pub fn bad_request(message: impl std::fmt::Display) -> ApiError {
        ApiError::new(ApiCode::BadRequest, message)
    }

    /// The same refusal, its message prefixed with where it happened
    /// (`users[3]`, `messages[7]`).
    pub fn at(self, place: impl std::fmt::Display) -> ApiError {
        ApiError {
            message: format!("{place}: {}", self.message),
            ..self
        }
    }
}

impl From<IdError> for ApiError {
    fn from(e: IdError) -> ApiError {
        ApiError::new(ApiCode::InvalidId, e)
    }
}

impl From<MembersApiError> for ApiError {
    fn from(e: MembersApiError) -> ApiError {
        ApiError::new(e.code(), e)
    }
}

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> ApiError {
        let code = match e.code() {
            ErrorCode::InvalidId => ApiCode::InvalidId,
            ErrorCode::TooLarge => ApiCode::TooLarge,
            ErrorCode::BadRequest => ApiCode::BadRequest,
            _ => ApiCode::Unavailable,
        };
        ApiError::new(code, e)
    }
}

/// The calls of the backend API, for key checks and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Publish, one or a batch.
    Publish,
    /// Kick a user or session.
    Kick,
    /// Presence of many users.
    Presence,
    /// Read a stream's history.
    History,
    /// Chat members.
    Members,
}

impl Op {
    /// Every call (series registered at zero).
    pub const ALL: [Op; 5] = [
        Op::Publish,
        Op::Kick,
        Op::Presence,
        Op::History,
        Op::Members,
    ];

    /// Its name in messages and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Op::Publish => "publish",
            Op::Kick => "kick",
            Op::Presence => "presence",
            Op::History => "history",
            Op::Members => "members",
        }
    }
}

/// A publish as a transport hands it over, not yet checked.
#[derive(Debug, Clone, Default)]
pub struct PublishFields {
    /// Into this chat (exclusive with `user`).
    pub chat: Option<String>,
    /// Into this user's personal stream.
    pub user: Option<String>,
    /// The de-duplication key.
    pub client_msg_id: String,
    /// Opaque payload.
    pub payload: Bytes,
    /// Sender shown to receivers; `None`: "backend".
    pub sender: Option<String>,
}

/// A history read as a transport hands it over, not yet checked.
#[derive(Debug, Clone, Default)]
pub struct HistoryFields {
    /// This chat's stream (exclusive with `user`).
    pub chat: Option<String>,
    /// This user's personal stream.
    pub user: Option<String>,
    /// Messages after this seq.
    pub after_seq: u64,
    /// At most this many; `None`: [`DEFAULT_HISTORY_LIMIT`].
    pub limit: Option<u32>,
    /// The epoch `after_seq` belongs to; empty: any.
    pub epoch: String,
}

/// A page of a stream's history.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// The stream read.
    pub stream: StreamKey,
    /// Its last seq and epoch, `recovered` = messages returned, and
    /// whether messages after `after_seq` were lost to the window.
    pub position: StreamPosition,
    /// In seq order.
    pub messages: Vec<Delivery>,
    /// More messages follow the last one.
    pub more: bool,
}

/// What the API reaches: the same handles the node's sockets use.
pub struct ApiBackends {
    /// The publish path (in-process or over NATS).
    pub publisher: Arc<dyn Publisher>,
    /// Frames to edges (kicks).
    pub bus: Arc<dyn Bus>,
    /// Who is online, and on which edges.
    pub presence: Arc<dyn PresenceStore>,
    /// Streams' history, for reads.
    pub history: Arc<dyn History>,
    /// Chat membership and contacts (ADR 0031).
    pub members: Arc<dyn MemberStore>,
}

/// The backend API, shared by both transports of a node.
pub struct Api {
    key: Option<String>,
    max_payload_bytes: usize,
    backends: ApiBackends,
}

impl Api {
    /// The API behind `key` (`None`: off), with the node's payload limit.
    pub fn new(key: Option<String>, max_payload_bytes: usize, backends: ApiBackends) -> Api {
        Api {
            key,
            max_payload_bytes,
            backends,
        }
    }

    /// The largest payload a publish may carry.
    pub fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes
    }

    /// Whether the API is on (a key is configured).
    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// Checks the key a request presented as its `authorization` header
    /// (HTTP) or metadata (gRPC): `Bearer <key>`. Refused with
    /// [`ApiCode::Disabled`] while no key is configured.
    pub fn authorize(&self, op: Op, authorization: Option<&str>) -> Result<(), ApiError> {
        check_key(self.key.as_deref(), op.name(), authorization).inspect_err(|e| {
            if op == Op::Publish && e.code == ApiCode::Unauthorized {
                api_publish("unauthorized");
            }
        })
    }

    /// Checks a publish without publishing it: ids, exactly one target,
    /// the client message id and the payload's size, refused with the
    /// messages the publish path would give.
    pub fn publish_request(&self, p: PublishFields) -> Result<PublishRequest, ApiError> {
        let target = match (p.chat, p.user) {
            (Some(c), None) => StreamKey::Chat(ChatId::parse(&c)?),
            (None, Some(u)) => StreamKey::User(UserId::parse(&u)?),
            _ => return Err(ApiError::bad_request("give exactly one of chat, user")),
        };
        let sender = UserId::parse(p.sender.as_deref().unwrap_or("backend"))?;
        validate_client_msg_id(&p.client_msg_id).map_err(PublishError::from)?;
        if p.payload.len() > self.max_payload_bytes {
            return Err(PublishError::TooLarge {
                len: p.payload.len(),
                max: self.max_payload_bytes,
            }
            .into());
        }
        Ok(PublishRequest {
            sender,
            target,
            client_msg_id: p.client_msg_id,
            payload: p.payload,
        })
    }

    /// Checks and publishes one message; the stream it went to.
    pub async fn publish(&self, p: PublishFields) -> Result<(StreamKey, Published), ApiError> {
        self.publish_from(p, None).await
    }

    /// [`Api::publish`] with the caller's W3C `traceparent`: with traces
    /// on, an `api.publish` span (a child of it, if given) covers the
    /// publish and its trace goes on to the router and the edges (ADR 0038).
    pub async fn publish_from(
        &self,
        p: PublishFields,
        traceparent: Option<&str>,
    ) -> Result<(StreamKey, Published), ApiError> {
        if !switchboard_router::trace::enabled() {
            return self.publish_untraced(p).await;
        }
        let span = tracing::info_span!(
            target: switchboard_router::trace::TARGET,
            "api.publish",
            otel.kind = "server",
            payload_bytes = p.payload.len(),
            stream = tracing::field::Empty,
            seq = tracing::field::Empty,
        );
        if let Some(tp) = traceparent {
            switchboard_router::trace::set_parent(&span, tp);
        }
        let done = self.publish_untraced(p).instrument(span.clone()).await;
        if let Ok((stream, published)) = &done {
            span.record("stream", tracing::field::display(stream));
            span.record("seq", published.seq);
        }
        done
    }

    async fn publish_untraced(&self, p: PublishFields) -> Result<(StreamKey, Published), ApiError> {
        let request = self.publish_request(p).inspect_err(count_refused_publish)?;
        let stream = request.target.clone();
        Ok((stream, self.publish_checked(request).await?))
    }

    /// Publishes a message [`Api::publish_request`] accepted.
    async fn publish_checked(&self, request: PublishRequest) -> Result<Published, ApiError> {
        let received = std::time::Instant::now();
        match self.backends.publisher.publish(request).await {
            Ok(p) => {
                switchboard_router::Hop::Ack
                    .histogram()
                    .record(received.elapsed().as_secs_f64());
                api_publish(if p.duplicate { "duplicate" } else { "ok" });
                Ok(p)
            }
            Err(e) => {
                api_publish("refused");
                Err(e.into())
            }
        }
    }

    /// Publishes checked messages: those of one stream one after the
    /// other in the order given, streams side by side. After a failure,
    /// the rest of that stream is not attempted (so a retry of the batch
    /// keeps their order). One result per message, in the order given.
    pub async fn publish_batch(
        &self,
        requests: Vec<PublishRequest>,
    ) -> Vec<Result<Published, ApiError>> {
        let mut by_stream: Vec<(StreamKey, Vec<(usize, PublishRequest)>)> = Vec::new();
        for (i, r) in requests.into_iter().enumerate() {
            match by_stream.iter_mut().find(|(s, _)| *s == r.target) {
                Some((_, list)) => list.push((i, r)),
                None => by_stream.push((r.target.clone(), vec![(i, r)])),
            }
        }
        let runs = by_stream.into_iter().map(|(_, list)| async move {
            let mut out = Vec::with_capacity(list.len());
            let mut failed = false;
            for (i, r) in list {
                if failed {
                    out.push((
                        i,
                        Err(ApiError::new(
                            ApiCode::Unavailable,
                            "not attempted: an earlier message of this stream failed",
                        )),
                    ));
                    continue;
                }
                let result = self.publish_checked(r).await;
                failed = result.is_err();
                out.push((i, result));
            }
            out
        });
        let mut results: Vec<_> = futures_util::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
            .collect();
        results.sort_unstable_by_key(|(i, _)| *i);
        results.into_iter().map(|(_, r)| r).collect()
    }

    /// Checks a kick: the user and, optionally, one of their sessions.
    pub fn kick_request(
        user: &str,
        session: Option<&str>,
    ) -> Result<(UserId, Option<String>), ApiError> {
        let user = UserId::parse(user)?;
        if let Some(s) = session {
            // Session ids are `<node>-<n>`: id-safe, like everything on a subject.
            UserId::parse(s).map_err(|e| ApiError::from(e).at("session"))?;
        }
        Ok((user, session.map(str::to_owned)))
    }

    /// Revokes `user`'s tokens issued until now for `secs` seconds (1 to
    /// [`MAX_REVOKE_SECS`]; cover the longest token lifetime): while the
    /// mark lasts, edges refuse those tokens at connect and refresh with
    /// 401 `token revoked`, and only a token issued later (`iat`) gets in
    /// (ADR 0039). Call before [`Api::kick`], so a socket opening
    /// meanwhile is either refused or found by the kick. Returns the unix
    /// ms the mark lasts until.
    pub async fn revoke(&self, user: &UserId, secs: u64) -> Result<i64, ApiError> {
        if !(1..=MAX_REVOKE_SECS).contains(&secs) {
            return Err(ApiError::bad_request(format_args!(
                "revoke_secs is {secs}, it must be 1 to {MAX_REVOKE_SECS}"
            )));
        }
        let now = switchboard_protocol::now_ms();
        self.backends
            .members
            .revoke(user, now, secs * 1000)
            .await
            .map_err(|e| ApiError::new(ApiCode::Unavailable, e))?;
        Ok(now + secs as i64 * 1000)
    }

    /// Closes `user`'s sockets (or one session) on every edge holding one,
    /// with 4503 `kicked`: a revoked login, a banned account. Returns how
    /// many edges were told. The client is told not to reconnect by
    /// itself; keeping the user out is the token issuer's part (tokens are
    /// short-lived).
    pub async fn kick(&self, user: &UserId, session: Option<String>) -> Result<usize, ApiError> {
        use switchboard_protocol::{CloseReason, SharedFrame};
        let mut frame = CloseReason::Kicked.disconnect_frame(0);
        if let Some(server_frame::Kind::Disconnect(d)) = &mut frame.kind {
            d.session = session.unwrap_or_default();
        }
        let b = &self.backends;
        publish_to_user(
            b.bus.as_ref(),
            b.presence.as_ref(),
            user,
            SharedFrame::new(frame),
        )
        .await
        .map_err(|e| ApiError::new(ApiCode::Unavailable, e))
    }

    /// The online status of each of `users`, in their order.
    pub async fn presence(&self, users: &[String]) -> Result<Vec<UserStatus>, ApiError> {
        if users.len() > MAX_PRESENCE_USERS {
            return Err(ApiError::new(
                ApiCode::TooLarge,
                format_args!(
                    "{} users, at most {MAX_PRESENCE_USERS} per request",
                    users.len()
                ),
            ));
        }
        let users = users
            .iter()
            .enumerate()
            .map(|(i, u)| UserId::parse(u).map_err(|e| ApiError::from(e).at(format!("users[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        self.backends
            .presence
            .status(&users, switchboard_protocol::now_ms())
            .await
            .map_err(|e| ApiError::new(ApiCode::Unavailable, e))
    }

    /// Reads the messages of a stream after a seq, at most a limit.
    pub async fn history(&self, q: HistoryFields) -> Result<HistoryPage, ApiError> {
        let stream = match (q.chat, q.user) {
            (Some(c), None) => StreamKey::Chat(ChatId::parse(&c)?),
            (None, Some(u)) => StreamKey::User(UserId::parse(&u)?),
            _ => return Err(ApiError::bad_request("give exactly one of chat, user")),
        };
        let limit = q.limit.unwrap_or(DEFAULT_HISTORY_LIMIT);
        if !(1..=MAX_HISTORY_LIMIT).contains(&limit) {
            return Err(ApiError::bad_request(format_args!(
                "limit is {limit}, it must be 1 to {MAX_HISTORY_LIMIT}"
            )));
        }
        if q.epoch.len() > MAX_EPOCH_LEN {
            return Err(ApiError::bad_request(format_args!(
                "epoch is {} bytes, the limit is {MAX_EPOCH_LEN}",
                q.epoch.len()
            )));
        }
        let recovery = self
            .backends
            .history
            .recover(&stream, Some(q.after_seq), &q.epoch)
            .await
            .map_err(|e| ApiError::new(ApiCode::Unavailable, e))?;
        let more = recovery.frames.len() > limit as usize;
        let messages: Vec<Delivery> = recovery
            .frames
            .iter()
            .take(limit as usize)
            .filter_map(|f| match &f.frame().kind {
                Some(server_frame::Kind::Delivery(d)) => Some(d.clone()),
                _ => None,
            })
            .collect();
        let mut position = recovery.position;
        position.recovered = messages.len() as u32;
        Ok(HistoryPage {
            stream,
            position,
            messages,
            more,
        })
    }
}

impl Api {
    /// Adds and removes members of `chat` (at most `members::MAX_USERS`
    /// together), then tells every edge whom it removed.
    pub async fn update_members(
        &self,
        chat: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<Changed, ApiError> {
        let chat = ChatId::parse(chat)?;
        let (add, remove) = members::change_lists(add, remove)?;
        let b = &self.backends;
        Ok(
            members::change_members(b.members.as_ref(), b.bus.as_ref(), &chat, &add, &remove)
                .await?,
        )
    }

    /// How many members `chat` has.
    pub async fn count_members(&self, chat: &str) -> Result<u64, ApiError> {
        let chat = ChatId::parse(chat)?;
        self.backends
            .members
            .count(&chat)
            .await
            .map_err(|e| ApiError::new(ApiCode::Unavailable, e))
    }

    /// A page of `user`'s chats after the chat `after` (`None`: from the
    /// first), at most `limit` (`None`: 100); and the next page's cursor.
    pub async fn list_chats(
        &self,
        user: &str,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<(Vec<ChatId>, Option<ChatId>), ApiError> {
        let user = UserId::parse(user)?;
        let after = after.map(ChatId::parse).transpose()?;
        let limit = limit.unwrap_or(100);
        let b = &self.backends;
        Ok(members::chats_of(b.members.as_ref(), &user, after.as_ref(), limit).await?)
    }

    /// Adds and removes contacts of `user` (at most `members::MAX_USERS`
    /// together).
    pub async fn update_contacts(
        &self,
        user: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<Changed, ApiError> {
        let user = UserId::parse(user)?;
        let (add, remove) = members::change_lists(add, remove)?;
        Ok(members::change_contacts(self.backends.members.as_ref(), &user, &add, &remove).await?)
    }
}

/// Counts a publish refused before the publish path, by why.
pub(crate) fn count_refused_publish(e: &ApiError) {
    api_publish(match e.code {
        ApiCode::TooLarge => "too_large",
        _ => "bad_request",
    });
}

/// Longest revocation a kick may ask for (`revoke_secs`): 30 days.
pub(crate) const MAX_REVOKE_SECS: u64 = 30 * 24 * 3600;

/// The key check of the API named `api` (in messages: "publish", "members")
/// behind `key` (`None`: the API is off), given the presented
/// `authorization` value, `Bearer <key>`.
pub(crate) fn check_key(
    key: Option<&str>,
    api: &str,
    authorization: Option<&str>,
) -> Result<(), ApiError> {
    let Some(key) = key else {
        return Err(ApiError::new(
            ApiCode::Disabled,
            format_args!("{api} API disabled: set --api-key"),
        ));
    };
    let presented = authorization
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant time in the bytes compared; only the length may leak.
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        presented.as_bytes(),
        key.as_bytes(),
    )) {
        return Err(ApiError::new(
            ApiCode::Unauthorized,
            "missing or wrong API key",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use switchboard_presence::MemoryPresence;
    use switchboard_router::{MemoryBus, MemoryHistory, Router, RouterLimits};

    use super::*;

    fn api(key: Option<&str>) -> Api {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let history: Arc<dyn History> = Arc::new(MemoryHistory::new(Default::default()));
        let presence: Arc<dyn PresenceStore> = Arc::new(MemoryPresence::new(30_000, 100));
        let router = Arc::new(Router::new(
            history.clone(),
            bus.clone(),
            presence.clone(),
            RouterLimits {
                max_payload_bytes: 10,
            },
        ));
        Api::new(
            key.map(str::to_owned),
            10,
            ApiBackends {
                publisher: router,
                bus,
                presence,
                history,
                members: Arc::new(switchboard_presence::MemoryMembers::new()),
            },
        )
    }

    fn fields(chat: &str, id: &str, payload: &'static [u8]) -> PublishFields {
        PublishFields {
            chat: Some(chat.into()),
            client_msg_id: id.into(),
            payload: Bytes::from_static(payload),
            ..Default::default()
        }
    }

    #[test]
    fn refused_publishes_map_to_statuses() {
        let remote = |code| PublishError::Remote {
            code,
            message: String::new(),
        };
        let no_router = PublishError::NoRouter {
            attempts: 3,
            source: async_nats::RequestError::new(async_nats::RequestErrorKind::NoResponders),
        };
        let cases = [
            (PublishError::TooLarge { len: 2, max: 1 }, 413),
            (remote(ErrorCode::InvalidId), 422),
            (remote(ErrorCode::TooLarge), 413),
            (remote(ErrorCode::Unavailable), 503),
            (remote(ErrorCode::BadRequest), 400),
            (PublishError::EmptyReply, 503),
            (no_router, 503),
        ];
        for (e, status) in cases {
            let text = e.to_string();
            let api = ApiError::from(e);
            assert_eq!(api.code.http_status(), status, "{text}");
            assert_eq!(api.message, text);
        }
    }

    #[test]
    fn every_code_has_both_statuses() {
        use tonic::Code;
        let cases = [
            (ApiCode::BadRequest, 400, Code::InvalidArgument),
            (ApiCode::InvalidId, 422, Code::InvalidArgument),
            (ApiCode::TooLarge, 413, Code::ResourceExhausted),
            (ApiCode::Unauthorized, 401, Code::Unauthenticated),
            (ApiCode::Disabled, 404, Code::Unimplemented),
            (ApiCode::Unavailable, 503, Code::Unavailable),
        ];
        for (code, http, grpc) in cases {
            assert_eq!(code.http_status(), http, "{code:?}");
            assert_eq!(code.grpc_code(), grpc, "{code:?}");
        }
    }

    #[test]
    fn the_key_is_checked_and_an_api_without_one_is_off() {
        let on = api(Some("k"));
        assert_eq!(on.authorize(Op::Kick, Some("Bearer k")), Ok(()));
        for wrong in [
            None,
            Some("k"),
            Some("Bearer"),
            Some("Bearer kk"),
            Some("bearer k"),
        ] {
            let e = on.authorize(Op::Kick, wrong).unwrap_err();
            assert_eq!(e.code, ApiCode::Unauthorized, "{wrong:?}");
        }
        let off = api(None);
        let e = off.authorize(Op::Presence, Some("Bearer k")).unwrap_err();
        assert_eq!(e.code, ApiCode::Disabled);
        assert_eq!(e.message, "presence API disabled: set --api-key");
    }

    #[test]
    fn bad_publishes_are_refused_before_the_publish_path() {
        let api = api(Some("k"));
        let refused = |p: PublishFields| api.publish_request(p).unwrap_err();
        let both = PublishFields {
            user: Some("u".into()),
            ..fields("c", "1", b"x")
        };
        assert_eq!(refused(both).code, ApiCode::BadRequest);
        assert_eq!(
            refused(PublishFields::default()).message,
            "give exactly one of chat, user"
        );
        assert_eq!(refused(fields("a b", "1", b"x")).code, ApiCode::InvalidId);
        let e = refused(fields("c", "", b"x"));
        assert_eq!(e.code, ApiCode::InvalidId);
        assert!(e.message.starts_with("invalid client message id: "), "{e}");
        let sender = PublishFields {
            sender: Some("no/slash".into()),
            ..fields("c", "1", b"x")
        };
        assert_eq!(refused(sender).code, ApiCode::InvalidId);
        let e = refused(fields("c", "1", b"eleven byte"));
        assert_eq!(e.code, ApiCode::TooLarge);
        assert_eq!(e.message, "payload is 11 bytes, the limit is 10");
    }

    #[tokio::test]
    async fn a_batch_keeps_each_streams_order_and_answers_in_request_order() {
        let api = api(Some("k"));
        let requests = ["a", "b", "a", "b", "a"]
            .iter()
            .enumerate()
            .map(|(i, chat)| {
                api.publish_request(fields(chat, &i.to_string(), b"x"))
                    .unwrap()
            })
            .collect();
        let seqs: Vec<u64> = api
            .publish_batch(requests)
            .await
            .into_iter()
            .map(|r| r.unwrap().seq)
            .collect();
        assert_eq!(seqs, [1, 1, 2, 2, 3]);
        let page = api
            .history(HistoryFields {
                chat: Some("a".into()),
                limit: Some(2),
                ..Default::default()
            })
            .await
            .unwrap();
        let ids: Vec<&str> = page
            .messages
            .iter()
            .map(|d| d.client_msg_id.as_str())
            .collect();
        assert_eq!(ids, ["0", "2"]);
        assert!(page.more);
        assert_eq!(page.position.seq, 3);
        assert_eq!(page.position.recovered, 2);
    }

    #[tokio::test]
    async fn bad_reads_are_refused() {
        let api = api(Some("k"));
        let read = |limit, epoch: &str| HistoryFields {
            chat: Some("c".into()),
            limit,
            epoch: epoch.into(),
            ..Default::default()
        };
        for q in [
            read(Some(0), ""),
            read(Some(1001), ""),
            read(None, &"e".repeat(65)),
        ] {
            assert_eq!(api.history(q).await.unwrap_err().code, ApiCode::BadRequest);
        }
        let users: Vec<String> = (0..=MAX_PRESENCE_USERS).map(|i| format!("u{i}")).collect();
        assert_eq!(
            api.presence(&users).await.unwrap_err().code,
            ApiCode::TooLarge
        );
        let e = api
            .presence(&["ok".into(), "not ok".into()])
            .await
            .unwrap_err();
        assert_eq!(e.code, ApiCode::InvalidId);
        assert!(e.message.starts_with("users[1]: "), "{e}");
    }
}
