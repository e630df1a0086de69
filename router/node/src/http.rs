//! The HTTP answers edges and routers share, written once so both answer
//! alike: plain-text probes (`/healthz`, `/readyz`) and 404, Prometheus
//! text at `/metrics`, and the backend API (`POST /api/publish`,
//! `POST /api/kick`): JSON, errors as `{"error": {"code", "message"}}`,
//! behind `Authorization: Bearer <api key>` and off (404) without a key.
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{HeaderMap, Request, Response, StatusCode, body::Incoming, header};
use metrics_exporter_prometheus::PrometheusHandle;
use switchboard_presence::PresenceStore;
use switchboard_router::{Bus, Publisher};

use crate::telemetry::api_publish;

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

/// The API-key check of every `/api/` route; the refusal, if any: 404
/// while the API is off (no key configured), 401 without the right key.
pub fn refusal(api_key: Option<&str>, headers: &HeaderMap, api: &str) -> Option<Response<Body>> {
    let Some(key) = api_key else {
        return Some(api_error(
            StatusCode::NOT_FOUND,
            format!("{api} API disabled: set --api-key"),
        ));
    };
    if !crate::has_api_key(headers, key) {
        return Some(api_error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API key",
        ));
    }
    None
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
    api_error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("body over {limit} bytes"),
    )
}

fn status(code: u16, otherwise: StatusCode) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(otherwise)
}

/// `POST /api/publish`: a backend publishes into a chat or to a user.
pub async fn publish(
    req: Request<Incoming>,
    api_key: Option<&str>,
    max_payload_bytes: usize,
    publisher: &dyn Publisher,
) -> Response<Body> {
    if let Some(refused) = refusal(api_key, req.headers(), "publish") {
        if refused.status() == StatusCode::UNAUTHORIZED {
            api_publish("unauthorized");
        }
        return refused;
    }
    // Base64 grows payloads by 4/3; leave room for the JSON around it.
    let limit = max_payload_bytes * 4 / 3 + 4096;
    let Some(body) = read_body(req.into_body(), limit).await else {
        api_publish("too_large");
        return too_large(limit);
    };
    let request = match crate::parse_api_publish(&body) {
        Ok(r) => r,
        Err((code, message)) => {
            api_publish("bad_request");
            return api_error(status(code, StatusCode::BAD_REQUEST), message);
        }
    };
    let target = request.target.clone();
    let received = std::time::Instant::now();
    match publisher.publish(request).await {
        Ok(p) => {
            switchboard_router::Hop::Ack
                .histogram()
                .record(received.elapsed().as_secs_f64());
            api_publish(if p.duplicate { "duplicate" } else { "ok" });
            json(
                StatusCode::OK,
                serde_json::json!({
                    "stream": target.to_string(),
                    "seq": p.seq,
                    "timestamp_ms": p.timestamp_ms,
                    "duplicate": p.duplicate,
                }),
            )
        }
        Err(e) => {
            api_publish("refused");
            let code = crate::publish_error_status(&e);
            api_error(status(code, StatusCode::SERVICE_UNAVAILABLE), e)
        }
    }
}

/// `POST /api/kick {"user", "session"?}`: closes the user's sockets (or one
/// session) on every edge with 4503, through presence like a DM.
pub async fn kick(
    req: Request<Incoming>,
    api_key: Option<&str>,
    bus: &dyn Bus,
    presence: &dyn PresenceStore,
) -> Response<Body> {
    if let Some(refused) = refusal(api_key, req.headers(), "kick") {
        return refused;
    }
    let Some(body) = read_body(req.into_body(), 4096).await else {
        return too_large(4096);
    };
    let (user, session) = match crate::parse_api_kick(&body) {
        Ok(k) => k,
        Err((code, message)) => {
            return api_error(status(code, StatusCode::BAD_REQUEST), message);
        }
    };
    match crate::kick(bus, presence, &user, session).await {
        Ok(edges) => json(
            StatusCode::OK,
            serde_json::json!({"user": user.as_str(), "edges": edges}),
        ),
        Err(e) => api_error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}
