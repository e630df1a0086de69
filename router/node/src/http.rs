//! The HTTP answers edges and routers share, written once so both answer
//! alike: plain-text probes (`/healthz`, `/readyz`) and 404, Prometheus
//! text at `/metrics`, and the backend API (`POST /api/publish`,
//! `/api/kick`, `/api/presence`, `/api/history`): JSON bodies translated
//! to and from [`Api`] calls, errors as `{"error": {"code", "message"}}`,
//! behind `Authorization: Bearer <api key>` and off (404) without a key.
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{HeaderMap, Request, Response, StatusCode, body::Incoming, header};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{Api, ApiCode, ApiError, HistoryFields, Op, PublishFields};
use crate::telemetry::{Transport, api_publish, api_request};

/// Every answer is one buffered body.
pub type Body = Full<Bytes>;

/// A plain-text answer.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON answer.
pub fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// An API error: `{"error": {"code": <status>, "message": ...}}`.
pub fn api_error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    json(
        status,
        serde_json::json!({ "error": { "code": status.as_u16(), "message": message.to_string() } }),
    )
}

/// `404 not found` for any path a node does not serve.
pub fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "not found\n")
}

/// `GET /healthz`: 200 while the process serves.
pub fn health() -> Response<Body> {
    text(StatusCode::OK, "ok\n")
}

/// `GET /readyz`: 200, or 503 with why the node should get no new work.
pub fn ready(unready: Option<&str>) -> Response<Body> {
    match unready {
        Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        None => text(StatusCode::OK, "ready\n"),
    }
}

/// `GET /metrics`: process metrics read now, then everything recorded.
pub fn metrics(prometheus: &PrometheusHandle) -> Response<Body> {
    crate::telemetry::collect_process_metrics();
    let mut r = text(StatusCode::OK, prometheus.render());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// An [`ApiError`] as an HTTP answer.
pub fn refused(e: &ApiError) -> Response<Body> {
    let status = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    api_error(status, &e.message)
}

/// The key check of every `/api/` route; the refusal, if any: 404 while
/// the API is off (no key configured), 401 without the right key. `api`
/// names the API in the refusal ("publish API disabled: set --api-key").
pub fn refusal(api_key: Option<&str>, headers: &HeaderMap, api: &str) -> Option<Response<Body>> {
    crate::api::check_key(api_key, api, authorization(headers))
        .err()
        .map(|e| refused(&e))
}

/// The percent-decoded value of `name` in a query string (`a=1&b=x%3Ay`),
/// the first if it repeats. Names are compared as sent (after decoding).
/// A `+` stays a `+`: ids may contain it (protocol.md, "Ids"), and no id
/// holds a space. Bytes that do not decode to UTF-8 become U+FFFD, which
/// no id accepts.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| percent_encoding::percent_decode_str(k).decode_utf8_lossy() == name)
        .map(|(_, v)| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
}

/// The `authorization` header's value, if it is text.
fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// Reads a request body of at most `limit` bytes; `None` beyond (answer
/// [`too_large`]).
pub async fn read_body(body: Incoming, limit: usize) -> Option<Bytes> {
    Limited::new(body, limit)
        .collect()
        .await
        .ok()
        .map(|b| b.to_bytes())
}

/// 413 for a body over `limit` bytes.
pub fn too_large(limit: usize) -> Response<Body> {
    refused(&body_too_large(limit))
}

fn body_too_large(limit: usize) -> ApiError {
    ApiError::new(ApiCode::TooLarge, format_args!("body over {limit} bytes"))
}

/// The key check, then the body of at most `limit` bytes.
async fn checked_body(
    req: Request<Incoming>,
    api: &Api,
    op: Op,
    limit: usize,
) -> Result<Bytes, Response<Body>> {
    if let Err(e) = api.authorize(op, authorization(req.headers())) {
        api_request(Transport::Http, op, Err(e.code));
        return Err(refused(&e));
    }
    match read_body(req.into_body(), limit).await {
        Some(body) => Ok(body),
        None => {
            if op == Op::Publish {
                api_publish("too_large");
            }
            Err(answer(op, Err(body_too_large(limit))))
        }
    }
}

/// A call's result as an answer: 200 with its JSON, or the refusal;
/// counted either way.
fn answer(op: Op, result: Result<Value, ApiError>) -> Response<Body> {
    api_request(
        Transport::Http,
        op,
        result.as_ref().map(|_| ()).map_err(|e| e.code),
    );
    match result {
        Ok(value) => json(StatusCode::OK, value),
        Err(e) => refused(&e),
    }
}

/// A JSON body as `T`; malformed: 400 with serde's message.
fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(ApiError::bad_request)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
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

/// Parses a publish body into the API's fields.
fn publish_fields(body: &[u8]) -> Result<PublishFields, ApiError> {
    use base64::Engine;
    let p: PublishBody = parse(body)?;
    let payload = match (p.payload, p.text) {
        (Some(b64), None) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| ApiError::bad_request(format_args!("payload is not base64: {e}")))?,
        ),
        (None, Some(t)) => Bytes::from(t),
        _ => return Err(ApiError::bad_request("give exactly one of payload, text")),
    };
    Ok(PublishFields {
        chat: p.chat,
        user: p.user,
        client_msg_id: p.client_msg_id,
        payload,
        sender: p.sender,
    })
}

/// `POST /api/publish`: a backend publishes into a chat or to a user.
pub async fn publish(req: Request<Incoming>, api: &Api) -> Response<Body> {
    // Base64 grows payloads by 4/3; leave room for the JSON around it.
    let limit = api.max_payload_bytes() * 4 / 3 + 4096;
    // A backend's own trace goes on through the publish (ADR 0038).
    let traceparent = switchboard_router::trace::enabled()
        .then(|| req.headers().get(switchboard_router::trace::TRACEPARENT))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match checked_body(req, api, Op::Publish, limit).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let fields = match publish_fields(&body) {
        Ok(f) => f,
        Err(e) => {
            api_publish("bad_request");
            return answer(Op::Publish, Err(e));
        }
    };
    let result = api
        .publish_from(fields, traceparent.as_deref())
        .await
        .map(|(stream, p)| {
            json!({
                "stream": stream.to_string(),
                "seq": p.seq,
                "timestamp_ms": p.timestamp_ms,
                "duplicate": p.duplicate,
            })
        });
    answer(Op::Publish, result)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KickBody {
    user: String,
    /// One session (`connectResult.sessionId`); absent: every session.
    session: Option<String>,
    /// Also revoke the user's tokens issued until now, for this long
    /// (ADR 0039); absent: a kick only.
    revoke_secs: Option<u64>,
}

/// `POST /api/kick {"user", "session"?, "revoke_secs"?}`: closes the
/// user's sockets (or one session) on every edge with 4503, through
/// presence like a DM; with `revoke_secs`, first revokes the user's
/// tokens issued until now.
pub async fn kick(req: Request<Incoming>, api: &Api) -> Response<Body> {
    let body = match checked_body(req, api, Op::Kick, 4096).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let result = async {
        let k: KickBody = parse(&body)?;
        let (user, session) = Api::kick_request(&k.user, k.session.as_deref())?;
        let revoked_until = match k.revoke_secs {
            Some(secs) => Some(api.revoke(&user, secs).await?),
            None => None,
        };
        let edges = api.kick(&user, session).await?;
        let mut answer = json!({"user": user.as_str(), "edges": edges});
        if let Some(until) = revoked_until {
            answer["revoked_until_ms"] = json!(until);
        }
        Ok(answer)
    };
    answer(Op::Kick, result.await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceBody {
    users: Vec<String>,
}

/// `POST /api/presence {"users": [...]}`: each user's online status, in
/// the order asked.
pub async fn presence(req: Request<Incoming>, api: &Api) -> Response<Body> {
    // 1,000 ids of up to 64 bytes, quoted and separated.
    let limit = crate::api::MAX_PRESENCE_USERS * 70 + 1024;
    let body = match checked_body(req, api, Op::Presence, limit).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let result = async {
        let p: PresenceBody = parse(&body)?;
        let statuses = api.presence(&p.users).await?;
        let users: Vec<Value> = statuses
            .iter()
            .map(|s| {
                json!({
                    "user": s.user.as_str(),
                    "online": s.online,
                    "devices": s.devices,
                    "last_seen_ms": s.last_seen_ms,
                })
            })
            .collect();
        Ok(json!({ "users": users }))
    };
    answer(Op::Presence, result.await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryBody {
    chat: Option<String>,
    user: Option<String>,
    #[serde(default)]
    after_seq: u64,
    limit: Option<u32>,
    #[serde(default)]
    epoch: String,
}

/// `POST /api/history {"chat" | "user", "after_seq"?, "limit"?,
/// "epoch"?}`: a page of a stream's history, payloads in base64.
pub async fn history(req: Request<Incoming>, api: &Api) -> Response<Body> {
    let body = match checked_body(req, api, Op::History, 4096).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let result = async {
        use base64::Engine;
        let h: HistoryBody = parse(&body)?;
        let page = api
            .history(HistoryFields {
                chat: h.chat,
                user: h.user,
                after_seq: h.after_seq,
                limit: h.limit,
                epoch: h.epoch,
            })
            .await?;
        let b64 = &base64::engine::general_purpose::STANDARD;
        let messages: Vec<Value> = page
            .messages
            .iter()
            .map(|d| {
                json!({
                    "seq": d.seq,
                    "sender": d.sender,
                    "timestamp_ms": d.timestamp_ms,
                    "client_msg_id": d.client_msg_id,
                    "payload": b64.encode(&d.payload),
                })
            })
            .collect();
        let p = &page.position;
        Ok(json!({
            "stream": page.stream.to_string(),
            "seq": p.seq,
            "epoch": p.epoch,
            "resync_required": p.resync_required,
            "messages": messages,
            "more": page.more,
        }))
    };
    answer(Op::History, result.await)
}

#[cfg(test)]
mod tests {
    use super::query_param;

    #[test]
    fn query_params_are_percent_decoded_and_plus_stays() {
        let q = "limit=5&after=team%3A42&user=a+b&x";
        assert_eq!(query_param(q, "after").as_deref(), Some("team:42"));
        assert_eq!(query_param(q, "limit").as_deref(), Some("5"));
        assert_eq!(query_param(q, "user").as_deref(), Some("a+b"));
        assert_eq!(query_param(q, "x"), None);
        assert_eq!(query_param(q, "missing"), None);
        // Not UTF-8: replaced, so no id parser accepts it.
        assert_eq!(query_param("user=%FF", "user").as_deref(), Some("\u{fffd}"));
        // A dangling escape stays as sent.
        assert_eq!(query_param("user=a%4", "user").as_deref(), Some("a%4"));
    }
}
