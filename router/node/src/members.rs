//! The backend's membership API (ADR 0031), the same on edges and routers:
//! who is in a chat, which chats a user is in, whose direct messages a
//! user accepts. Transport-neutral functions (typed requests, typed
//! errors) and their HTTP routes:
//!
//! - `GET /api/chats/<chat>/members` → `{"chat", "members"}` (the count);
//! - `POST /api/chats/<chat>/members` `{"add": [...], "remove": [...]}` →
//!   `{"added", "removed"}`; at most [`MAX_USERS`] users per request (a
//!   bulk import is a series of them);
//! - `GET /api/users/<user>/chats?after=<chat>&limit=<n>` → `{"user",
//!   "chats", "next"}`, pages in chat id order;
//! - `POST /api/users/<user>/contacts` `{"add": [...], "remove": [...]}` →
//!   `{"added", "removed"}`.
//!
//! Removing members publishes an `Unsubscribed` notice naming them on
//! `sb.members`: every edge drops their cached allows and ends their live
//! subscriptions to the chat. A removal answered 503 may have been stored
//! without the notice going out: retrying it is safe and sends it.
use bytes::Bytes;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use serde::Deserialize;
use switchboard_presence::MemberStore;
use switchboard_protocol::{
    ChatId, IdError, SharedFrame, UserId,
    subject::MEMBERS,
    v1::{ServerFrame, Unsubscribed, server_frame},
};
use switchboard_router::Bus;

use crate::{
    api::{ApiCode, Op},
    http::{Body, api_error, json, query_param, read_body, refusal, too_large},
    telemetry::{Transport, api_request},
};

/// Most users one change names (added and removed together).
pub const MAX_USERS: usize = 100_000;
/// Largest page of a user's chats.
pub const MAX_PAGE: usize = 1_000;
/// Users named by one removal notice on the bus.
const NOTICE_USERS: usize = 1_000;
/// Largest request body: `MAX_USERS` ids of the longest allowed length
/// would be more; this fits 100,000 ids of 60 bytes.
const MAX_BODY: usize = 8 << 20;

/// Why a membership request failed; each maps to one HTTP status (and
/// gRPC code).
#[derive(Debug, thiserror::Error)]
pub enum MembersApiError {
    /// The body is not what the route takes.
    #[error("{0}")]
    BadRequest(String),
    /// A chat or user id is not valid.
    #[error(transparent)]
    InvalidId(#[from] IdError),
    /// Too many users in one request.
    #[error("{0} users in one request; at most {MAX_USERS}")]
    TooMany(usize),
    /// The store or the bus failed; safe to retry.
    #[error("{0}")]
    Unavailable(String),
}

impl MembersApiError {
    /// Its kind in the backend API's table (`ApiCode`: HTTP and gRPC).
    pub fn code(&self) -> ApiCode {
        match self {
            MembersApiError::BadRequest(_) => ApiCode::BadRequest,
            MembersApiError::InvalidId(_) => ApiCode::InvalidId,
            MembersApiError::TooMany(_) => ApiCode::TooLarge,
            MembersApiError::Unavailable(_) => ApiCode::Unavailable,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            MembersApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            MembersApiError::InvalidId(_) => StatusCode::UNPROCESSABLE_ENTITY,
            MembersApiError::TooMany(_) => StatusCode::PAYLOAD_TOO_LARGE,
            MembersApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    /// Users that were not members (contacts) before.
    pub added: u64,
    /// Users that were.
    pub removed: u64,
}

/// Parses ids, all or nothing.
pub fn parse_users(list: &[String]) -> Result<Vec<UserId>, IdError> {
    list.iter().map(|u| UserId::parse(u)).collect()
}

fn bounded(add: &[UserId], remove: &[UserId]) -> Result<(), MembersApiError> {
    match add.len() + remove.len() {
        n if n > MAX_USERS => Err(MembersApiError::TooMany(n)),
        _ => Ok(()),
    }
}

fn unavailable(e: impl std::fmt::Display) -> MembersApiError {
    MembersApiError::Unavailable(e.to_string())
}

/// Adds and removes members of `chat`, then tells every edge whom it removed.
pub async fn change_members(
    store: &dyn MemberStore,
    bus: &dyn Bus,
    chat: &ChatId,
    add: &[UserId],
    remove: &[UserId],
) -> Result<Changed, MembersApiError> {
    bounded(add, remove)?;
    let added = store.add(chat, add).await.map_err(unavailable)?;
    let removed = store.remove(chat, remove).await.map_err(unavailable)?;
    // Every user asked, not only those found: a retry after a lost notice
    // finds none, and must still reach the edges.
    for users in remove.chunks(NOTICE_USERS) {
        let notice = SharedFrame::new(ServerFrame {
            id: 0,
            kind: Some(server_frame::Kind::Unsubscribed(Unsubscribed {
                chat: chat.to_string(),
                reason: "removed".into(),
                users: users.iter().map(|u| u.to_string()).collect(),
            })),
        });
        bus.publish(MEMBERS, notice).await.map_err(unavailable)?;
    }
    if !remove.is_empty() {
        bus.flush().await.map_err(unavailable)?;
    }
    Ok(Changed { added, removed })
}

/// Adds and removes contacts of `user` (who may message it directly).
pub async fn change_contacts(
    store: &dyn MemberStore,
    user: &UserId,
    add: &[UserId],
    remove: &[UserId],
) -> Result<Changed, MembersApiError> {
    bounded(add, remove)?;
    let added = store.add_contacts(user, add).await.map_err(unavailable)?;
    let removed = store
        .remove_contacts(user, remove)
        .await
        .map_err(unavailable)?;
    Ok(Changed { added, removed })
}

/// A page of `user`'s chats after `after`, and the cursor of the next
/// page (`None`: this was the last).
pub async fn chats_of(
    store: &dyn MemberStore,
    user: &UserId,
    after: Option<&ChatId>,
    limit: usize,
) -> Result<(Vec<ChatId>, Option<ChatId>), MembersApiError> {
    if limit == 0 || limit > MAX_PAGE {
        return Err(MembersApiError::BadRequest(format!(
            "limit must be 1..={MAX_PAGE}"
        )));
    }
    let chats = store
        .chats_of(user, after, limit)
        .await
        .map_err(unavailable)?;
    let next = (chats.len() == limit).then(|| chats[limit - 1].clone());
    Ok((chats, next))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

/// The users a change names, counted before their ids are read (the HTTP
/// body and the gRPC request alike).
pub fn change_lists(
    add: &[String],
    remove: &[String],
) -> Result<(Vec<UserId>, Vec<UserId>), MembersApiError> {
    if add.len() + remove.len() > MAX_USERS {
        return Err(MembersApiError::TooMany(add.len() + remove.len()));
    }
    Ok((parse_users(add)?, parse_users(remove)?))
}

fn parse_change(body: &Bytes) -> Result<(Vec<UserId>, Vec<UserId>), MembersApiError> {
    let change: Change =
        serde_json::from_slice(body).map_err(|e| MembersApiError::BadRequest(e.to_string()))?;
    change_lists(&change.add, &change.remove)
}

fn error(e: MembersApiError) -> Response<Body> {
    api_error(e.status(), e)
}

fn changed(c: Changed) -> Response<Body> {
    json(
        StatusCode::OK,
        serde_json::json!({"added": c.added, "removed": c.removed}),
    )
}

/// Whether `path` is one of this module's routes.
pub fn is_members_route(path: &str) -> bool {
    path.starts_with("/api/chats/") || path.starts_with("/api/users/")
}

/// Serves the routes above (callers check [`is_members_route`]).
pub async fn route(
    req: Request<Incoming>,
    api_key: Option<&str>,
    store: &dyn MemberStore,
    bus: &dyn Bus,
) -> Response<Body> {
    if let Some(refused) = refusal(api_key, req.headers(), "members") {
        let code = match refused.status() {
            StatusCode::UNAUTHORIZED => ApiCode::Unauthorized,
            _ => ApiCode::Disabled,
        };
        api_request(Transport::Http, Op::Members, Err(code));
        return refused;
    }
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let method = req.method().clone();
    let (kind, id, what) = match path.strip_prefix("/api/").and_then(|p| {
        let mut parts = p.splitn(3, '/');
        Some((parts.next()?, parts.next()?, parts.next()?))
    }) {
        Some((k, id, w)) => (k.to_owned(), id.to_owned(), w.to_owned()),
        None => return api_error(StatusCode::NOT_FOUND, "not found"),
    };
    let body = match method {
        Method::POST => match read_body(req.into_body(), MAX_BODY).await {
            Some(b) => b,
            None => return too_large(MAX_BODY),
        },
        _ => Bytes::new(),
    };
    let answer = match (kind.as_str(), what.as_str(), &method) {
        ("chats", "members", &Method::GET) => match ChatId::parse(&id) {
            Ok(chat) => match store.count(&chat).await {
                Ok(n) => Ok(json(
                    StatusCode::OK,
                    serde_json::json!({"chat": chat.as_str(), "members": n}),
                )),
                Err(e) => Err(unavailable(e)),
            },
            Err(e) => Err(e.into()),
        },
        ("chats", "members", &Method::POST) => {
            async {
                let chat = ChatId::parse(&id)?;
                let (add, remove) = parse_change(&body)?;
                change_members(store, bus, &chat, &add, &remove)
                    .await
                    .map(changed)
            }
            .await
        }
        ("users", "chats", &Method::GET) => {
            async {
                let user = UserId::parse(&id)?;
                let (mut after, mut limit) = (None, 100);
                if let Some(v) = query_param(&query, "after").filter(|v| !v.is_empty()) {
                    after = Some(ChatId::parse(&v)?);
                }
                if let Some(v) = query_param(&query, "limit") {
                    limit = v.parse().map_err(|_| {
                        MembersApiError::BadRequest(format!("limit {v:?} is not a number"))
                    })?;
                }
                let (chats, next) = chats_of(store, &user, after.as_ref(), limit).await?;
                Ok(json(
                    StatusCode::OK,
                    serde_json::json!({
                        "user": user.as_str(),
                        "chats": chats.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
                        "next": next.as_ref().map(|c| c.as_str()),
                    }),
                ))
            }
            .await
        }
        ("users", "contacts", &Method::POST) => {
            async {
                let user = UserId::parse(&id)?;
                let (add, remove) = parse_change(&body)?;
                change_contacts(store, &user, &add, &remove)
                    .await
                    .map(changed)
            }
            .await
        }
        ("chats", "members", _) | ("users", "contacts", _) | ("users", "chats", _) => {
            return api_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
        }
        _ => return api_error(StatusCode::NOT_FOUND, "not found"),
    };
    api_request(
        Transport::Http,
        Op::Members,
        answer.as_ref().map(|_| ()).map_err(MembersApiError::code),
    );
    answer.unwrap_or_else(error)
}
