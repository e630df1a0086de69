//! The router's HTTP API: probes, metrics and the backend API answered
//! exactly as the edge answers them (`switchboard_node::http`), and the
//! router's own `/api/channels/<channel>/members`.
use std::{convert::Infallible, sync::Arc, time::Duration};

use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use switchboard_node::Stop;
use switchboard_node::http::{self, Body, api_error, json};
use switchboard_protocol::{ChatId, UserId};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::task::TaskTracker;

use crate::state::RouterState;

/// The HTTP listener and the connections it serves.
pub(crate) struct Http {
    accept: JoinHandle<()>,
    conns: TaskTracker,
}

impl Http {
    /// Serves `listener` until `stop` begins.
    pub(crate) fn start(listener: TcpListener, state: Arc<RouterState>, stop: Stop) -> Http {
        let conns = TaskTracker::new();
        let accept = tokio::spawn(accept(listener, state, stop, conns.clone()));
        Http { accept, conns }
    }

    /// Once the stop has begun: the listener is closed, idle connections
    /// close, and requests being answered get until the work deadline.
    pub(crate) async fn stop(self, stop: &Stop) {
        stop.join("HTTP listener", stop.work_deadline(), self.accept)
            .await;
        self.conns.close();
        let answered = tokio::time::timeout_at(stop.work_deadline(), self.conns.wait()).await;
        if answered.is_err() {
            stop.gave_up(
                "HTTP requests in flight",
                &format_args!("{} connections unanswered", self.conns.len()),
            );
        }
    }
}

async fn accept(listener: TcpListener, state: Arc<RouterState>, stop: Stop, conns: TaskTracker) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.begun() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (state, stop) = (state.clone(), stop.clone());
        conns.spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(state, req).await) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stop.begun() => {}
            }
            // Answers the request in hand, if any, then closes.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
}

async fn route(state: Arc<RouterState>, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => http::health(),
        (&Method::GET, "/readyz") => http::ready(state.unready()),
        (&Method::GET, "/metrics") => http::metrics(&state.prometheus),
        (&Method::POST, "/api/publish") => http::publish(req, &state.api).await,
        (&Method::POST, "/api/kick") => http::kick(req, &state.api).await,
        (&Method::POST, "/api/presence") => http::presence(req, &state.api).await,
        (&Method::POST, "/api/history") => http::history(req, &state.api).await,
        (_, path) if path.starts_with("/api/channels/") => members_api(&state, req).await,
        (_, path) if switchboard_node::admin::is_admin_route(path) => {
            switchboard_node::admin::route(req, &state.admin).await
        }
        (_, path) if switchboard_node::members::is_members_route(path) => {
            let (store, bus) = (state.member_store.as_ref(), state.bus.as_ref());
            let key = state.config.api_key.as_deref();
            switchboard_node::members::route(req, key, store, bus).await
        }
        _ => http::not_found(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberChange {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

/// `GET` (counts) and `POST` (changes) `/api/channels/<channel>/members`.
async fn members_api(state: &RouterState, req: Request<Incoming>) -> Response<Body> {
    if let Some(refused) = http::refusal(state.config.api_key.as_deref(), req.headers(), "members")
    {
        return refused;
    }
    let Some(channel) = req
        .uri()
        .path()
        .strip_prefix("/api/channels/")
        .and_then(|r| r.strip_suffix("/members"))
    else {
        return api_error(StatusCode::NOT_FOUND, "not found");
    };
    let channel = match ChatId::parse(channel) {
        Ok(c) => c,
        Err(e) => return api_error(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    let method = req.method().clone();
    // Member imports may be large.
    let limit = 64 << 20;
    let Some(body) = http::read_body(req.into_body(), limit).await else {
        return http::too_large(limit);
    };
    let members = &state.members;
    match method {
        Method::GET => {
            let count = members.count(&channel).await;
            let online = members.online_count(&channel).await;
            match (count, online) {
                (Ok(n), Ok(o)) => json(
                    StatusCode::OK,
                    serde_json::json!({"channel": channel.as_str(), "members": n, "online": o}),
                ),
                (Err(e), _) | (_, Err(e)) => api_error(StatusCode::SERVICE_UNAVAILABLE, e),
            }
        }
        Method::POST => {
            let change: MemberChange = match serde_json::from_slice(&body) {
                Ok(c) => c,
                Err(e) => return api_error(StatusCode::BAD_REQUEST, e),
            };
            let parse = |list: &[String]| {
                list.iter()
                    .map(|u| UserId::parse(u))
                    .collect::<Result<Vec<_>, _>>()
            };
            let (add, remove) = match (parse(&change.add), parse(&change.remove)) {
                (Ok(a), Ok(r)) => (a, r),
                (Err(e), _) | (_, Err(e)) => return api_error(StatusCode::UNPROCESSABLE_ENTITY, e),
            };
            // The same change as `/api/chats/<chat>/members`, removal
            // notices included.
            let (store, bus) = (state.member_store.as_ref(), state.bus.as_ref());
            match switchboard_node::members::change_members(store, bus, &channel, &add, &remove)
                .await
            {
                Ok(c) => json(
                    StatusCode::OK,
                    serde_json::json!({"added": c.added, "removed": c.removed}),
                ),
                Err(e) => api_error(e.status(), e),
            }
        }
        _ => api_error(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST"),
    }
}
