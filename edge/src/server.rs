//! The listener and the HTTP surface on it: `/ws`, `/healthz`, `/readyz`,
//! `/metrics`, `POST /api/publish`, and in dev mode `/` and `/dev/token`.
use std::{convert::Infallible, sync::Arc, sync::atomic::Ordering, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use switchboard_protocol::{Encoding, UserId};
use switchboard_router::{has_api_key, parse_api_publish, publish_error_status};
use tokio::{net::TcpListener, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::Claims,
    conn::{self, Accepted},
    metrics,
    state::EdgeState,
};

type Body = Full<Bytes>;

const DEMO_PAGE: &str = include_str!("../assets/demo.html");

pub(crate) async fn accept_loop(
    state: Arc<EdgeState>,
    listener: TcpListener,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, _peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: never let an accept error stop the
                // server; back off so we don't spin.
                tracing::warn!(error = %e, "accept failed");
                metrics::upgrade_rejected("accept_error");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let accepted_at = Instant::now();
        let state2 = state.clone();
        state.tracker.spawn(async move {
            let Some(tls) = &state2.tls else {
                return serve_http(state2, stream, accepted_at).await;
            };
            // The TLS handshake counts against the same deadline as the
            // WebSocket one (slowloris).
            let deadline = accepted_at + state2.config.handshake_timeout;
            match tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await {
                Ok(Ok(tls_stream)) => serve_http(state2, tls_stream, accepted_at).await,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    metrics::upgrade_rejected("tls_handshake");
                }
                Err(_) => metrics::upgrade_rejected("tls_timeout"),
            }
        });
    }
}

/// HTTP/1.1 with upgrades over a plain or TLS stream.
async fn serve_http<S>(state: Arc<EdgeState>, io: S, accepted_at: Instant)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timeout = state.config.handshake_timeout;
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(state, req, accepted_at).await) }
    });
    let conn = http1::Builder::new()
        .header_read_timeout(Some(timeout))
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "http connection ended");
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn api_error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    json(
        status,
        serde_json::json!({ "error": { "code": status.as_u16(), "message": message.to_string() } }),
    )
}

async fn route(
    state: Arc<EdgeState>,
    req: Request<Incoming>,
    accepted_at: Instant,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ws") => upgrade(state, req, accepted_at),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            // Not ready: new sockets would fail (no bus, or presence could
            // not route to them); open ones keep being served.
            let unready = if state.draining.load(Ordering::Acquire) {
                Some("draining")
            } else if !state.bus.connected() {
                Some("bus (NATS) disconnected")
            } else if !state.sessions.renewed() {
                Some("presence (Redis) unavailable")
            } else {
                None
            };
            match unready {
                Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                None => text(StatusCode::OK, "ready\n"),
            }
        }
        (&Method::GET, "/metrics") => {
            state.refresh_gauges();
            let mut r = text(StatusCode::OK, state.prometheus.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::POST, "/api/publish") => api_publish(state, req).await,
        (&Method::POST, "/api/kick") => api_kick(state, req).await,
        (&Method::GET, "/") if state.config.dev => {
            let mut r = text(StatusCode::OK, DEMO_PAGE);
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        (&Method::GET, "/dev/token") if state.config.dev => {
            dev_token(&state, req.uri().query().unwrap_or(""))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn upgrade(
    state: Arc<EdgeState>,
    mut req: Request<Incoming>,
    accepted_at: Instant,
) -> Response<Body> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        metrics::upgrade_rejected("not_websocket");
        return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade\n");
    }
    if state.draining.load(Ordering::Acquire) {
        metrics::upgrade_rejected("draining");
        return retry_later("draining");
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok());
    if !origin_allowed(&state.config.allowed_origins, origin) {
        metrics::upgrade_rejected("origin");
        return text(StatusCode::FORBIDDEN, "origin not allowed\n");
    }
    // Subprotocol: JSON when none is offered; an offer without ours fails.
    let offered = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok());
    let (encoding, echo) = match offered {
        None => (Encoding::Json, false),
        Some(list) => match Encoding::negotiate(list) {
            Some(e) => (e, true),
            None => {
                metrics::upgrade_rejected("subprotocol");
                return text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unsupported subprotocol; offer {} or {}\n",
                        Encoding::PROTOBUF_SUBPROTOCOL,
                        Encoding::JSON_SUBPROTOCOL
                    ),
                );
            }
        },
    };
    let header_identity = match req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        None => None,
        Some(h) => match h
            .strip_prefix("Bearer ")
            .map(|t| state.config.auth.verify(t.trim()))
        {
            Some(Ok(id)) => Some(id),
            Some(Err(e)) => {
                metrics::auth_failure(e.label());
                metrics::upgrade_rejected("unauthorized");
                return text(StatusCode::UNAUTHORIZED, format!("{e}\n"));
            }
            None => {
                metrics::upgrade_rejected("unauthorized");
                return text(
                    StatusCode::UNAUTHORIZED,
                    "expected Authorization: Bearer <token>\n",
                );
            }
        },
    };
    let Some(permit) = state.admission.try_admit() else {
        metrics::upgrade_rejected("over_capacity");
        return retry_later("connection limit reached");
    };
    // A storm is spread out at the clients (Retry-After, then their own
    // jitter) instead of queuing handshakes here.
    let admitted = {
        let mut bucket = state.accept_rate.lock().unwrap_or_else(|e| e.into_inner());
        bucket.take(state.config.accept_rate, crate::ratelimit::clock_ms())
    };
    if !admitted {
        metrics::upgrade_rejected("accept_rate");
        return retry_later("too many new connections");
    }
    let Ok(handshake) = state.handshakes.clone().try_acquire_owned() else {
        metrics::upgrade_rejected("handshakes");
        return retry_later("too many handshakes in progress");
    };
    let (response, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(r) => r,
        Err(e) => {
            metrics::upgrade_rejected("bad_handshake");
            return text(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
    };
    let accepted = Accepted {
        encoding,
        header_identity,
        deadline: accepted_at + state.config.handshake_timeout,
        permit,
        handshake,
    };
    state
        .tracker
        .spawn(conn::serve(state.clone(), fut, accepted));
    let mut response = response.map(|_| Full::new(Bytes::new()));
    if echo {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            header::HeaderValue::from_static(encoding.subprotocol()),
        );
    }
    response
}

/// Whether a browser at `origin` may open a socket. Only browsers send
/// `Origin`, and they always do on a WebSocket: without one the request
/// comes from an app or a server, which the token authenticates.
fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    let Some(origin) = origin else { return true };
    if allowed.is_empty() {
        return true;
    }
    let origin = origin.trim_end_matches('/').to_ascii_lowercase();
    allowed.iter().any(|pattern| {
        if pattern == "*" || *pattern == origin {
            return true;
        }
        // `https://*.example.com`: any subdomain, not the bare domain.
        match pattern.split_once("://*.") {
            Some((scheme, domain)) => origin
                .strip_prefix(scheme)
                .and_then(|o| o.strip_prefix("://"))
                .and_then(|host| host.strip_suffix(domain))
                .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
            None => false,
        }
    })
}

/// 503 with a jittered Retry-After (1-5 s) so refused clients spread out.
fn retry_later(why: &str) -> Response<Body> {
    let mut r = text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
    let secs = rand::random_range(1..=5u32);
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    r
}

async fn api_publish(state: Arc<EdgeState>, req: Request<Incoming>) -> Response<Body> {
    let Some(key) = state.config.api_key.as_deref() else {
        return api_error(StatusCode::NOT_FOUND, "publish API disabled: set --api-key");
    };
    if !has_api_key(req.headers(), key) {
        metrics::api_publish("unauthorized");
        return api_error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
    }
    // Base64 grows payloads by 4/3; leave room for the JSON around it.
    let limit = state.config.max_payload_bytes * 4 / 3 + 4096;
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            metrics::api_publish("too_large");
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body over {limit} bytes"),
            );
        }
    };
    let request = match parse_api_publish(&body) {
        Ok(r) => r,
        Err((status, message)) => {
            metrics::api_publish("bad_request");
            return api_error(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                message,
            );
        }
    };
    let target = request.target.clone();
    match state.router.publish(request).await {
        Ok(p) => {
            metrics::api_publish(if p.duplicate { "duplicate" } else { "ok" });
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
            metrics::api_publish("refused");
            let status = StatusCode::from_u16(publish_error_status(&e))
                .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            api_error(status, e)
        }
    }
}

/// `POST /api/kick {"user", "session"?}`: closes the user's sockets (or one
/// session) on every edge with 4503, through presence like a DM.
async fn api_kick(state: Arc<EdgeState>, req: Request<Incoming>) -> Response<Body> {
    let Some(key) = state.config.api_key.as_deref() else {
        return api_error(StatusCode::NOT_FOUND, "kick API disabled: set --api-key");
    };
    if !has_api_key(req.headers(), key) {
        return api_error(StatusCode::UNAUTHORIZED, "missing or wrong API key");
    }
    let body = match Limited::new(req.into_body(), 4096).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return api_error(StatusCode::PAYLOAD_TOO_LARGE, "body over 4096 bytes"),
    };
    let (user, session) = match switchboard_router::parse_api_kick(&body) {
        Ok(k) => k,
        Err((status, message)) => {
            return api_error(
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
                message,
            );
        }
    };
    match switchboard_router::kick(state.bus.as_ref(), state.presence.as_ref(), &user, session)
        .await
    {
        Ok(edges) => json(
            StatusCode::OK,
            serde_json::json!({"user": user.as_str(), "edges": edges}),
        ),
        Err(e) => api_error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

fn dev_token(state: &EdgeState, query: &str) -> Response<Body> {
    let user = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "user")
        .map(|(_, v)| percent_decode(v))
        .unwrap_or_default();
    if let Err(e) = UserId::parse(&user) {
        return api_error(StatusCode::UNPROCESSABLE_ENTITY, e);
    }
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let claims = Claims {
        sub: user.clone(),
        exp,
        nbf: None,
        aud: None,
        iss: None,
        chats: None,
    };
    match state.config.auth.mint_hs256(&claims) {
        Some(token) => json(
            StatusCode::OK,
            serde_json::json!({ "token": token, "user": user, "expires_at_ms": exp * 1000 }),
        ),
        None => api_error(StatusCode::NOT_FOUND, "dev tokens need an HS256 secret"),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod origin_tests {
    use super::origin_allowed;

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let allowed = vec![
            "https://app.example.com".to_owned(),
            "https://*.chat.example".to_owned(),
        ];
        assert!(origin_allowed(&allowed, None), "apps send no Origin");
        assert!(origin_allowed(&[], Some("https://anything")));
        assert!(origin_allowed(&allowed, Some("https://app.example.com")));
        assert!(origin_allowed(&allowed, Some("HTTPS://App.Example.com/")));
        assert!(origin_allowed(&allowed, Some("https://web.chat.example")));
        assert!(origin_allowed(&allowed, Some("https://a.b.chat.example")));
        for bad in [
            "https://evil.example",
            "http://app.example.com",
            "https://app.example.com.evil",
            "https://chat.example",
            "https://evilchat.example",
            "http://web.chat.example",
            "null",
        ] {
            assert!(!origin_allowed(&allowed, Some(bad)), "{bad}");
        }
        assert!(origin_allowed(&["*".to_owned()], Some("null")));
    }
}
