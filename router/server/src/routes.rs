//! The `switchboard-router` process: NATS consumers, the presence sweeper
//! and a small HTTP API (health, metrics, backend publish, channel members).
use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use switchboard_presence::{PresenceStore, RedisPresence};
use switchboard_protocol::{ChatId, UserId};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    Bus, HistoryLimits, Members, NatsBus, NatsSettings, RedisHistory, Router, RouterLimits,
    connect_redis, has_api_key, parse_api_publish, publish_error_status,
};

/// `switchboard-router`: sequences, stores and delivers messages for a
/// Switchboard cluster. Any number of replicas share the work.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "switchboard-router", version, about)]
pub struct RouterConfig {
    /// host:port of the HTTP API (health, metrics, publish, members).
    #[arg(
        long,
        env = "SWITCHBOARD_ROUTER_LISTEN",
        default_value = "127.0.0.1:8090"
    )]
    pub listen: SocketAddr,
    /// NATS server URL(s), comma-separated.
    #[arg(long = "nats", env = "SWITCHBOARD_NATS_URL")]
    pub nats_url: String,
    /// Redis URL.
    #[arg(long = "redis", env = "SWITCHBOARD_REDIS_URL")]
    pub redis_url: String,
    /// Name in logs and NATS connection name.
    #[arg(long, env = "SWITCHBOARD_NODE_ID", default_value = "router")]
    pub node_id: String,
    /// Bearer key of POST /api/publish and /api/channels; unset: those are off.
    #[arg(long, env = "SWITCHBOARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest payload, bytes.
    #[arg(long, env = "SWITCHBOARD_MAX_PAYLOAD_BYTES", default_value_t = 32 * 1024)]
    pub max_payload_bytes: usize,
    /// Messages kept per stream.
    #[arg(long, env = "SWITCHBOARD_HISTORY_MAX_MESSAGES", default_value_t = 1000)]
    pub history_max_messages: usize,
    /// Age after which history messages are dropped, ms.
    #[arg(
        long,
        env = "SWITCHBOARD_HISTORY_MAX_AGE_MS",
        default_value_t = 600_000
    )]
    pub history_max_age_ms: i64,
    /// Member buckets per channel (shard jobs per post). Never change it on
    /// existing data.
    #[arg(long, env = "SWITCHBOARD_CHANNEL_BUCKETS", default_value_t = 64)]
    pub channel_buckets: u32,
    /// Replicas of the JetStream push-job stream SB_PUSH (1-5; 3 on a NATS
    /// cluster, so losing one server loses no queued push job). Applies when
    /// the stream is created; an existing stream keeps its own.
    #[arg(
        long,
        env = "SWITCHBOARD_PUSH_STREAM_REPLICAS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=5)
    )]
    pub push_stream_replicas: u8,
    /// Presence lease, ms (same value as the edges).
    #[arg(long, env = "SWITCHBOARD_PRESENCE_TTL_MS", default_value_t = 30_000)]
    pub presence_ttl_ms: i64,
    /// Log filter.
    #[arg(long, env = "SWITCHBOARD_LOG", default_value = "info")]
    pub log: String,
}

struct Node {
    router: Arc<Router>,
    members: Arc<Members>,
    bus: Arc<NatsBus>,
    presence: Arc<dyn PresenceStore>,
    api_key: Option<String>,
    max_body: usize,
    prometheus: PrometheusHandle,
}

/// Builds the backends and serves until `shutdown`.
pub async fn run_router(
    config: RouterConfig,
    listener: TcpListener,
    prometheus: PrometheusHandle,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    crate::telemetry::register_router_series();
    let nats = NatsSettings {
        url: config.nats_url.clone(),
        name: config.node_id.clone(),
        subscription_capacity: 65_536,
    };
    let bus = Arc::new(NatsBus::connect(&nats).await.map_err(|e| e.to_string())?);
    let redis = connect_redis(&config.redis_url)
        .await
        .map_err(|e| format!("redis {}: {e}", crate::redact_url(&config.redis_url)))?;
    let limits = HistoryLimits {
        max_messages: config.history_max_messages,
        max_age_ms: config.history_max_age_ms,
        ..HistoryLimits::default()
    };
    let history = Arc::new(RedisHistory::new(redis.clone(), limits));
    let presence: Arc<dyn PresenceStore> =
        Arc::new(RedisPresence::new(redis.clone(), config.presence_ttl_ms));
    let members = Arc::new(
        Members::new(
            redis,
            presence.clone(),
            bus.client().clone(),
            config.channel_buckets,
            usize::from(config.push_stream_replicas),
        )
        .await
        .map_err(|e| e.to_string())?,
    );
    let router = Arc::new(
        Router::new(
            history,
            bus.clone(),
            presence.clone(),
            RouterLimits {
                max_payload_bytes: config.max_payload_bytes,
            },
        )
        .with_members(members.clone()),
    );
    let stop = CancellationToken::new();
    let nats_task = tokio::spawn(crate::serve(
        bus.client().clone(),
        router.clone(),
        Some(members.clone()),
        stop.clone(),
    ));
    let sweep = tokio::spawn(crate::sweep_presence(
        presence.clone(),
        bus.clone() as Arc<dyn Bus>,
        Duration::from_millis((config.presence_ttl_ms / 3).max(100) as u64),
        stop.clone(),
    ));
    let node = Arc::new(Node {
        router,
        members,
        bus,
        presence: presence.clone(),
        api_key: config.api_key.filter(|k| !k.is_empty()),
        max_body: config.max_payload_bytes * 4 / 3 + 4096,
        prometheus,
    });
    tracing::info!(addr = %config.listen, node = %config.node_id, "switchboard router serving");
    let http = tokio::spawn(accept(listener, node.clone(), stop.clone()));
    shutdown.await;
    tracing::info!("router shutting down");
    stop.cancel();
    let _ = nats_task.await;
    let _ = sweep.await;
    let _ = http.await;
    let _ = node.bus.client().flush().await;
    Ok(())
}

async fn accept(listener: TcpListener, node: Arc<Node>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let node = node.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let node = node.clone();
                async move { Ok::<_, Infallible>(route(node, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn json(status: u16, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn err(status: u16, message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::json!({"error": {"code": status, "message": message.to_string()}}),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemberChange {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

async fn route(node: Arc<Node>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/healthz") => json(200, serde_json::json!({"status": "ok"})),
        (Method::GET, "/readyz") => {
            let connected = matches!(
                node.bus.client().connection_state(),
                async_nats::connection::State::Connected
            );
            if connected {
                json(200, serde_json::json!({"status": "ready"}))
            } else {
                err(503, "NATS disconnected")
            }
        }
        (Method::GET, "/metrics") => {
            crate::telemetry::collect_process_metrics();
            let mut r = Response::new(Full::new(Bytes::from(node.prometheus.render())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        (Method::POST, "/api/kick") => {
            let Some(key) = node.api_key.as_deref() else {
                return err(404, "API disabled: set --api-key");
            };
            if !has_api_key(req.headers(), key) {
                return err(401, "missing or wrong API key");
            }
            let body = match Limited::new(req.into_body(), 4096).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return err(413, "body over 4096 bytes"),
            };
            let (user, session) = match crate::parse_api_kick(&body) {
                Ok(k) => k,
                Err((status, message)) => return err(status, message),
            };
            match crate::kick(node.bus.as_ref(), node.presence.as_ref(), &user, session).await {
                Ok(edges) => json(
                    200,
                    serde_json::json!({"user": user.as_str(), "edges": edges}),
                ),
                Err(e) => err(503, e),
            }
        }
        (method, p) if p == "/api/publish" || p.starts_with("/api/channels/") => {
            let Some(key) = node.api_key.as_deref() else {
                return err(404, "API disabled: set --api-key");
            };
            if !has_api_key(req.headers(), key) {
                return err(401, "missing or wrong API key");
            }
            // Member imports may be large: 64 MiB for those, the payload limit otherwise.
            let limit = if p == "/api/publish" {
                node.max_body
            } else {
                64 << 20
            };
            let body = match Limited::new(req.into_body(), limit).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return err(413, format!("body over {limit} bytes")),
            };
            if p == "/api/publish" && method == Method::POST {
                let request = match parse_api_publish(&body) {
                    Ok(r) => r,
                    Err((status, message)) => return err(status, message),
                };
                let stream = request.target.to_string();
                return match node.router.publish(request).await {
                    Ok(pb) => json(
                        200,
                        serde_json::json!({"stream": stream, "seq": pb.seq, "timestamp_ms": pb.timestamp_ms, "duplicate": pb.duplicate}),
                    ),
                    Err(e) => err(publish_error_status(&e), e),
                };
            }
            let Some(channel) = p
                .strip_prefix("/api/channels/")
                .and_then(|r| r.strip_suffix("/members"))
            else {
                return err(404, "not found");
            };
            let channel = match ChatId::parse(channel) {
                Ok(c) => c,
                Err(e) => return err(422, e),
            };
            members_api(&node, method, &channel, &body).await
        }
        _ => err(404, "not found"),
    }
}

async fn members_api(
    node: &Node,
    method: Method,
    channel: &ChatId,
    body: &[u8],
) -> Response<Full<Bytes>> {
    match method {
        Method::GET => {
            let count = node.members.count(channel).await;
            let online = node.members.online_count(channel).await;
            match (count, online) {
                (Ok(n), Ok(o)) => json(
                    200,
                    serde_json::json!({"channel": channel.as_str(), "members": n, "online": o}),
                ),
                (Err(e), _) | (_, Err(e)) => err(503, e),
            }
        }
        Method::POST => {
            let change: MemberChange = match serde_json::from_slice(body) {
                Ok(c) => c,
                Err(e) => return err(400, e),
            };
            let parse = |list: &[String]| {
                list.iter()
                    .map(|u| UserId::parse(u))
                    .collect::<Result<Vec<_>, _>>()
            };
            let (add, remove) = match (parse(&change.add), parse(&change.remove)) {
                (Ok(a), Ok(r)) => (a, r),
                (Err(e), _) | (_, Err(e)) => return err(422, e),
            };
            let added = node.members.add(channel, &add).await;
            let removed = node.members.remove(channel, &remove).await;
            match (added, removed) {
                (Ok(a), Ok(r)) => json(200, serde_json::json!({"added": a, "removed": r})),
                (Err(e), _) | (_, Err(e)) => err(503, e),
            }
        }
        _ => err(405, "use GET or POST"),
    }
}

/// Resolves on SIGTERM or SIGINT: both start a graceful shutdown.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}
