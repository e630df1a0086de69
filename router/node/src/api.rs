//! The backend API's bodies (`POST /api/publish`, `POST /api/kick`) and
//! the kick, shared by edges and routers so both accept exactly the same
//! requests.
use bytes::Bytes;
use serde::Deserialize;
use switchboard_protocol::{ChatId, StreamKey, UserId};

use switchboard_router::{Bus, BusError, PublishError, PublishRequest, publish_to_user};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiPublish {
    chat: Option<String>,
    user: Option<String>,
    client_msg_id: String,
    /// Base64 payload.
    payload: Option<String>,
    /// UTF-8 payload (exclusive with `payload`).
    text: Option<String>,
    /// Sender shown to receivers. Default "backend".
    sender: Option<String>,
}

/// Parses a publish body; on error, the HTTP status and a message.
pub fn parse_api_publish(body: &[u8]) -> Result<PublishRequest, (u16, String)> {
    use base64::Engine;
    let p: ApiPublish = serde_json::from_slice(body).map_err(|e| (400, e.to_string()))?;
    let invalid = |e: switchboard_protocol::IdError| (422, e.to_string());
    let target = match (p.chat, p.user) {
        (Some(c), None) => StreamKey::Chat(ChatId::parse(&c).map_err(invalid)?),
        (None, Some(u)) => StreamKey::User(UserId::parse(&u).map_err(invalid)?),
        _ => return Err((400, "give exactly one of chat, user".into())),
    };
    let payload = match (p.payload, p.text) {
        (Some(b64), None) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| (400, format!("payload is not base64: {e}")))?,
        ),
        (None, Some(t)) => Bytes::from(t),
        _ => return Err((400, "give exactly one of payload, text".into())),
    };
    let sender = UserId::parse(p.sender.as_deref().unwrap_or("backend")).map_err(invalid)?;
    Ok(PublishRequest {
        sender,
        target,
        client_msg_id: p.client_msg_id,
        payload,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKick {
    user: String,
    /// One session (`connectResult.sessionId`); absent: every session.
    session: Option<String>,
}

/// Parses a kick body (`POST /api/kick`): the user and, optionally, one of
/// their sessions.
pub fn parse_api_kick(body: &[u8]) -> Result<(UserId, Option<String>), (u16, String)> {
    let k: ApiKick = serde_json::from_slice(body).map_err(|e| (400, e.to_string()))?;
    let user = UserId::parse(&k.user).map_err(|e| (422, e.to_string()))?;
    if let Some(s) = &k.session {
        // Session ids are `<node>-<n>`: id-safe, like everything on a subject.
        UserId::parse(s).map_err(|e| (422, format!("session: {e}")))?;
    }
    Ok((user, k.session))
}

/// Closes `user`'s sockets (or one session) on every edge holding one,
/// with 4503 `kicked`: a revoked login, a banned account. Returns how many
/// edges were told. The client is told not to reconnect by itself; keeping
/// the user out is the token issuer's part (tokens are short-lived).
pub async fn kick(
    bus: &dyn Bus,
    presence: &dyn switchboard_presence::PresenceStore,
    user: &UserId,
    session: Option<String>,
) -> Result<usize, BusError> {
    use switchboard_protocol::{CloseReason, SharedFrame, v1::server_frame};
    let mut frame = CloseReason::Kicked.disconnect_frame(0);
    if let Some(server_frame::Kind::Disconnect(d)) = &mut frame.kind {
        d.session = session.unwrap_or_default();
    }
    let frame = SharedFrame::new(frame);
    publish_to_user(bus, presence, user, frame).await
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether the request carries `Authorization: Bearer <key>`.
pub fn has_api_key(headers: &hyper::HeaderMap, key: &str) -> bool {
    let presented = headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(presented.as_bytes(), key.as_bytes())
}

/// HTTP status for a refused publish.
pub fn publish_error_status(e: &PublishError) -> u16 {
    use switchboard_protocol::v1::ErrorCode;
    match e.code() {
        ErrorCode::InvalidId => 422,
        ErrorCode::TooLarge => 413,
        ErrorCode::BadRequest => 400,
        _ => 503,
    }
}

#[cfg(test)]
mod tests {
    use switchboard_protocol::v1::ErrorCode;

    use super::*;

    #[test]
    fn refused_publishes_map_to_http_statuses() {
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
            assert_eq!(publish_error_status(&e), status, "{e:?}");
        }
    }
}
