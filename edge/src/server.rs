//! The listener and the HTTP surface on it: `/ws`, and in dev mode `/` and
//! `/dev/token`, here; `/healthz`, `/readyz`, `/metrics` and the backend
//! API (`POST /api/publish`, `/api/kick`, `/api/presence`, `/api/history`)
//! answered by `switchboard_node::http`, and the admin API (`/admin/*`,
//! `switchboard_node::admin`), as the router answers them.
use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use switchboard_node::http::{self, Body, api_error, json, text};
use switchboard_protocol::UserId;
use tokio::{
    net::{TcpListener, TcpStream},
    runtime::Handle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    auth::Claims,
    conn::{self, Refused},
    metrics,
    state::EdgeState,
};

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
        let (state2, stop) = (state.clone(), stop.clone());
        state.tracker.spawn(async move {
            let Some(tls) = &state2.tls else {
                return match state2.control.clone() {
                    Some(control) => serve_plain(state2, stream, accepted_at, stop, control).await,
                    None => serve_http(state2, stream, accepted_at, stop, false).await,
                };
            };
            // The TLS handshake counts against the same deadline as the
            // WebSocket one (slowloris).
            let deadline = accepted_at + state2.config.handshake_timeout;
            match tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await {
                Ok(Ok(tls_stream)) => {
                    serve_http(state2, tls_stream, accepted_at, stop, false).await
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    metrics::upgrade_rejected("tls_handshake");
                }
                Err(_) => metrics::upgrade_rejected("tls_timeout"),
            }
        });
    }
}

/// Serves a plain connection: on the control runtime if its first request
/// is one of `control::CONTROL_REQUESTS`, else here.
pub(crate) async fn serve_plain(
    state: Arc<EdgeState>,
    stream: TcpStream,
    accepted_at: Instant,
    stop: CancellationToken,
    control: Handle,
) {
    let mut first = [0u8; 12];
    let deadline = accepted_at + state.config.handshake_timeout;
    let n = match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(n)) => n,
        // A peer that sends nothing in time, or a reset: as hyper would.
        _ => return,
    };
    if !crate::control::is_control_request(&first[..n]) {
        return serve_http(state, stream, accepted_at, stop, false).await;
    }
    // Moved between reactors as a std socket: deregistered here,
    // registered with the control runtime's.
    let std = match stream.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "handing a connection to the control runtime failed");
            return;
        }
    };
    let tracker = state.tracker.clone();
    tracker.spawn_on(
        async move {
            match TcpStream::from_std(std) {
                Ok(s) => serve_http(state, s, accepted_at, stop, true).await,
                Err(e) => tracing::debug!(error = %e, "registering a control connection failed"),
            }
        },
        &control,
    );
}

/// HTTP/1.1 with upgrades over a plain or TLS stream. Once the drain
/// begins (`stop`), an idle keep-alive connection closes and a busy one
/// closes after its answer, so neither holds the drain. `control`: served
/// on the control runtime, where no socket may live (`control.rs`).
pub(crate) async fn serve_http<S>(
    state: Arc<EdgeState>,
    io: S,
    accepted_at: Instant,
    stop: CancellationToken,
    control: bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let timeout = state.config.handshake_timeout;
    let service = service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(state, req, accepted_at, control).await) }
    });
    let conn = http1::Builder::new()
        .header_read_timeout(Some(timeout))
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "http connection ended");
    }
}

async fn route(
    state: Arc<EdgeState>,
    req: Request<Incoming>,
    accepted_at: Instant,
    control: bool,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        // A keep-alive API connection asking for a socket: the socket would
        // live on the control runtime's one thread.
        (&Method::GET, "/ws") if control => text(
            StatusCode::BAD_REQUEST,
            "open a WebSocket on a connection of its own\n",
        ),
        (&Method::GET, "/ws") => match conn::upgrade(&state, req, accepted_at) {
            Ok(switching) => switching.map(|_| Full::new(Bytes::new())),
            Err(Refused::Status(status, why)) => text(status, why),
            Err(Refused::RetryLater(why)) => retry_later(why),
        },
        (&Method::GET, "/healthz") => http::health(),
        (&Method::GET, "/readyz") => http::ready(state.unready()),
        (&Method::GET, "/metrics") => {
            state.refresh_gauges();
            http::metrics(&state.prometheus)
        }
        (&Method::POST, "/api/publish") => http::publish(req, &state.api).await,
        (&Method::POST, "/api/kick") => http::kick(req, &state.api).await,
        (&Method::POST, "/api/presence") => http::presence(req, &state.api).await,
        (&Method::POST, "/api/history") => http::history(req, &state.api).await,
        (_, path) if switchboard_node::admin::is_admin_route(path) => {
            switchboard_node::admin::route(req, &state.admin).await
        }
        (_, path) if switchboard_node::members::is_members_route(path) => {
            let key = state.config.api_key.as_deref();
            let (store, bus) = (state.members.as_ref(), state.bus.as_ref());
            switchboard_node::members::route(req, key, store, bus).await
        }
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
        _ => http::not_found(),
    }
}

/// 503 with a jittered Retry-After (1-5 s) so refused clients spread out.
fn retry_later(why: &str) -> Response<Body> {
    let mut r = text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"));
    let secs = rand::random_range(1..=5u32);
    r.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
    r
}

fn dev_token(state: &EdgeState, query: &str) -> Response<Body> {
    let user = http::query_param(query, "user").unwrap_or_default();
    if let Err(e) = UserId::parse(&user) {
        return api_error(StatusCode::UNPROCESSABLE_ENTITY, e);
    }
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let claims = Claims {
        sub: user.clone(),
        exp,
        nbf: None,
        iat: Some(jsonwebtoken::get_current_timestamp()),
        aud: None,
        iss: None,
        chats: None,
        chat: None,
    };
    match state.config.auth.mint_hs256(&claims) {
        Some(token) => json(
            StatusCode::OK,
            serde_json::json!({ "token": token, "user": user, "expires_at_ms": exp * 1000 }),
        ),
        None => api_error(StatusCode::NOT_FOUND, "dev tokens need an HS256 secret"),
    }
}
