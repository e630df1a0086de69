//! The backend hooks (ADR 0034): `--chat-auth proxy` and the moderation
//! hook, against a real HTTP server and a real gRPC server (tonic, the
//! generated `Hooks` service) started here, on a standalone edge and on
//! an edge of a real cluster.
//!
//! The fake backend decides by name: chats `deny-*` are refused, `slow-*`
//! and payloads `slow*` answer after the edge's deadline, chats `short-*`
//! may be cached for 0 ms; payloads `spam*` are rejected and `swear*`
//! replaced by `****`. It counts its calls.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use switchboard_edge::{ChatAuthMode, HookSettings, ModerationSettings};
use switchboard_protocol::hooks::v1::{
    AuthorizeRequest, AuthorizeResponse, ModerateRequest, ModerateResponse, Verdict,
    hooks_server::{Hooks, HooksServer},
    moderate_request,
};

use crate::common::{cluster::Cluster, *};

/// How long the fake backend takes for `slow` requests: past every
/// deadline set here.
const SLOW: Duration = Duration::from_secs(3);
/// The edge's hook deadline in these tests.
const DEADLINE: Duration = Duration::from_millis(300);

#[derive(Default)]
struct Backend {
    authorize_calls: AtomicUsize,
    moderate_calls: AtomicUsize,
}

struct Authorized {
    allow: bool,
    reason: Option<String>,
    cache_ttl_ms: Option<u32>,
}

enum Moderation {
    Accept,
    Reject(String),
    Replace(Bytes),
}

impl Backend {
    async fn authorize(&self, user: &str, chat: &str, action: &str) -> Authorized {
        self.authorize_calls.fetch_add(1, Ordering::SeqCst);
        assert!(!user.is_empty() && !action.is_empty(), "{user} {action}");
        if chat.starts_with("slow-") {
            tokio::time::sleep(SLOW).await;
        }
        Authorized {
            allow: !chat.starts_with("deny-"),
            reason: chat
                .starts_with("deny-")
                .then(|| format!("{user} is not in {chat}")),
            cache_ttl_ms: chat.starts_with("short-").then_some(0),
        }
    }

    async fn moderate(&self, payload: &[u8]) -> Moderation {
        self.moderate_calls.fetch_add(1, Ordering::SeqCst);
        if payload.starts_with(b"slow") {
            tokio::time::sleep(SLOW).await;
        }
        if payload.starts_with(b"spam") {
            Moderation::Reject("looks like spam".into())
        } else if payload.starts_with(b"swear") {
            Moderation::Replace(Bytes::from_static(b"****"))
        } else {
            Moderation::Accept
        }
    }

    fn authorize_calls(&self) -> usize {
        self.authorize_calls.load(Ordering::SeqCst)
    }

    fn moderate_calls(&self) -> usize {
        self.moderate_calls.load(Ordering::SeqCst)
    }
}

/// The backend as a JSON-over-HTTP server: `POST /authorize`,
/// `POST /moderate` (docs/operations.md, "Backend hooks").
async fn serve_http(backend: Arc<Backend>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((io, _)) = listener.accept().await else {
                return;
            };
            let backend = backend.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let backend = backend.clone();
                    async move { Ok::<_, Infallible>(http_answer(&backend, req).await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(io), service)
                    .await;
            });
        }
    });
    addr
}

async fn http_answer(backend: &Backend, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let answer = match path.as_str() {
        "/authorize" => {
            let a = backend
                .authorize(&s("user"), &s("chat"), &s("action"))
                .await;
            let mut out = json!({"allow": a.allow});
            if let Some(r) = a.reason {
                out["reason"] = json!(r);
            }
            if let Some(t) = a.cache_ttl_ms {
                out["cache_ttl_ms"] = json!(t);
            }
            out
        }
        "/moderate" => {
            assert!(!s("sender").is_empty());
            assert!(!s("client_msg_id").is_empty());
            use base64::Engine;
            let payload = base64::engine::general_purpose::STANDARD
                .decode(s("payload"))
                .unwrap();
            match backend.moderate(&payload).await {
                Moderation::Accept => json!({"verdict": "accept"}),
                Moderation::Reject(r) => json!({"verdict": "reject", "reason": r}),
                Moderation::Replace(p) => {
                    json!({"verdict": "replace", "payload": b64(std::str::from_utf8(&p).unwrap())})
                }
            }
        }
        "/broken" => {
            return Response::builder()
                .status(500)
                .body(Full::new(Bytes::new()))
                .unwrap();
        }
        _ => {
            return Response::builder()
                .status(404)
                .body(Full::new(Bytes::new()))
                .unwrap();
        }
    };
    Response::new(Full::new(Bytes::from(answer.to_string())))
}

struct Grpc(Arc<Backend>);

#[tonic::async_trait]
impl Hooks for Grpc {
    async fn authorize(
        &self,
        req: tonic::Request<AuthorizeRequest>,
    ) -> Result<tonic::Response<AuthorizeResponse>, tonic::Status> {
        let r = req.into_inner();
        let a = self
            .0
            .authorize(&r.user, &r.chat, r.action().as_str_name())
            .await;
        Ok(tonic::Response::new(AuthorizeResponse {
            allow: a.allow,
            reason: a.reason,
            cache_ttl_ms: a.cache_ttl_ms,
        }))
    }

    async fn moderate(
        &self,
        req: tonic::Request<ModerateRequest>,
    ) -> Result<tonic::Response<ModerateResponse>, tonic::Status> {
        let r = req.into_inner();
        assert!(matches!(r.target, Some(moderate_request::Target::Chat(_))));
        let (verdict, payload, reason) = match self.0.moderate(&r.payload).await {
            Moderation::Accept => (Verdict::Accept, Bytes::new(), String::new()),
            Moderation::Reject(why) => (Verdict::Reject, Bytes::new(), why),
            Moderation::Replace(p) => (Verdict::Replace, p, String::new()),
        };
        Ok(tonic::Response::new(ModerateResponse {
            verdict: verdict as i32,
            payload,
            reason,
        }))
    }
}

/// The backend as a gRPC server (HTTP/2, plaintext).
async fn serve_grpc(backend: Arc<Backend>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(
        HooksServer::new(Grpc(backend)),
        tonic::transport::server::TcpIncoming::from(listener),
    ));
    addr
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Http,
    Grpc,
}

/// A fresh backend on `transport`; the URLs of its two hooks.
async fn backend(transport: Transport) -> (Arc<Backend>, String, String) {
    let b = Arc::new(Backend::default());
    match transport {
        Transport::Http => {
            let addr = serve_http(b.clone()).await;
            (
                b,
                format!("http://{addr}/authorize"),
                format!("http://{addr}/moderate"),
            )
        }
        Transport::Grpc => {
            let addr = serve_grpc(b.clone()).await;
            (b, format!("grpc://{addr}"), format!("grpc://{addr}"))
        }
    }
}

fn hook(url: &str) -> HookSettings {
    HookSettings {
        url: url.parse().unwrap(),
        timeout: DEADLINE,
    }
}

fn code(reply: &Value) -> u64 {
    reply["error"]["code"].as_u64().unwrap_or(0)
}

async fn publish(raw: &mut Raw, chat: &str, id: &str, payload: &str) -> Value {
    raw.request(json!({"publish": {"chat": chat, "clientMsgId": id, "payload": b64(payload)}}))
        .await
}

async fn subscribe(raw: &mut Raw, chat: &str) -> Value {
    raw.request(json!({"subscribe": {"chat": chat}})).await
}

async fn unsubscribe(raw: &mut Raw, chat: &str) {
    let r = raw.request(json!({"unsubscribe": {"chat": chat}})).await;
    assert!(r.get("ok").is_some(), "{r}");
}

/// A series' value in a `/metrics` text, labels included in `series`.
fn series(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} not in /metrics"))
}

#[tokio::test]
async fn proxy_mode_asks_the_backend_caches_allows_and_fails_closed() {
    for transport in [Transport::Http, Transport::Grpc] {
        let (backend, authorize, _) = backend(transport).await;
        let mut c = config();
        c.authz.mode = ChatAuthMode::Proxy;
        c.authorize_hook = Some(hook(&authorize));
        let edge = start(c).await;
        let mut alice = Raw::connected(&edge, "alice").await;

        // Allow: asked once, then cached for subscribe and publish alike.
        let sub = subscribe(&mut alice, "room").await;
        assert!(sub.get("subscribeResult").is_some(), "{transport:?} {sub}");
        assert_eq!(backend.authorize_calls(), 1, "{transport:?}");
        unsubscribe(&mut alice, "room").await;
        let sub = subscribe(&mut alice, "room").await;
        assert!(sub.get("subscribeResult").is_some(), "{sub}");
        let ack = publish(&mut alice, "room", "m1", "hi").await;
        assert!(ack.get("publishAck").is_some(), "{ack}");
        assert_eq!(backend.authorize_calls(), 1, "{transport:?}: cached");

        // The hook's own TTL (0 ms here) overrides the edge's.
        for _ in 0..2 {
            let sub = subscribe(&mut alice, "short-lived").await;
            assert!(sub.get("subscribeResult").is_some(), "{sub}");
            unsubscribe(&mut alice, "short-lived").await;
        }
        assert_eq!(backend.authorize_calls(), 3, "{transport:?}");

        // Deny: 403 with the backend's reason, never cached.
        for _ in 0..2 {
            let sub = subscribe(&mut alice, "deny-vault").await;
            assert_eq!(code(&sub), 403, "{transport:?} {sub}");
            assert_eq!(
                sub["error"]["message"],
                json!("alice is not in deny-vault"),
                "{sub}"
            );
        }
        assert_eq!(backend.authorize_calls(), 5, "{transport:?}");

        // Timeout: refused with 503 at the deadline (fail closed).
        let started = Instant::now();
        let sub = subscribe(&mut alice, "slow-room").await;
        assert_eq!(code(&sub), 503, "{transport:?} {sub}");
        assert!(started.elapsed() < SLOW, "{:?}", started.elapsed());
        let published = publish(&mut alice, "slow-room", "m2", "hi").await;
        assert_eq!(code(&published), 503, "{published}");

        let (_, metrics) = http_get(edge.addr(), "/metrics").await;
        assert!(
            series(&metrics, "switchboard_edge_authorize_hook_seconds_count") >= 7.0,
            "{transport:?}"
        );
        edge.shutdown().await;
    }
}

#[tokio::test]
async fn a_broken_or_absent_authorization_hook_fails_closed() {
    let (_backend, authorize, _) = backend(Transport::Http).await;
    let broken = authorize.replace("/authorize", "/broken");
    let down = format!("grpc://127.0.0.1:{}", free_port());
    for url in [broken, down] {
        let mut c = config();
        c.authz.mode = ChatAuthMode::Proxy;
        c.authorize_hook = Some(hook(&url));
        let edge = start(c).await;
        let mut alice = Raw::connected(&edge, "alice").await;
        let sub = subscribe(&mut alice, "room").await;
        assert_eq!(code(&sub), 503, "{url}: {sub}");
        edge.shutdown().await;
    }
}

fn moderated_config(url: &str, fail_open: bool) -> switchboard_edge::Config {
    let mut c = config();
    c.moderation = Some(ModerationSettings {
        hook: hook(url),
        fail_open,
    });
    c
}

#[tokio::test]
async fn moderation_accepts_rejects_and_replaces_before_sequencing() {
    for transport in [Transport::Http, Transport::Grpc] {
        let (backend, _, moderate) = backend(transport).await;
        let edge = start(moderated_config(&moderate, false)).await;
        let mut alice = Raw::connected(&edge, "alice").await;
        let mut bob = Raw::connected(&edge, "bob").await;
        subscribe(&mut bob, "room").await;

        // Accept: delivered as sent.
        let ack = publish(&mut alice, "room", "m1", "hello").await;
        assert_eq!(ack["publishAck"]["seq"], json!("1"), "{transport:?} {ack}");
        // Replace: receivers get the replacement, the sender its ack.
        let ack = publish(&mut alice, "room", "m2", "swear words").await;
        assert_eq!(ack["publishAck"]["seq"], json!("2"), "{ack}");
        let got: Vec<_> = bob.deliveries(2).await.iter().map(payload_text).collect();
        assert_eq!(got, ["hello", "****"], "{transport:?}");

        // Reject: the new code with the backend's reason, nothing
        // sequenced; a retry gets the same answer without a second call.
        let calls = backend.moderate_calls();
        for _ in 0..2 {
            let refused = publish(&mut alice, "room", "m3", "spam spam").await;
            assert_eq!(code(&refused), 451, "{transport:?} {refused}");
            assert_eq!(refused["error"]["message"], json!("looks like spam"));
        }
        assert_eq!(backend.moderate_calls(), calls + 1, "{transport:?}");
        // A retry of a replaced message is a duplicate of what was stored.
        let again = publish(&mut alice, "room", "m2", "swear words").await;
        assert_eq!(again["publishAck"]["duplicate"], json!(true), "{again}");
        assert_eq!(again["publishAck"]["seq"], json!("2"), "{again}");

        // Timeout, fail closed: 503 at the deadline, nothing sequenced.
        let started = Instant::now();
        let refused = publish(&mut alice, "room", "m4", "slow one").await;
        assert_eq!(code(&refused), 503, "{transport:?} {refused}");
        // The hook's address stays in the edge's log.
        assert_eq!(
            refused["error"]["message"],
            json!("moderation hook unavailable")
        );
        assert!(started.elapsed() < SLOW);
        bob.assert_no_delivery(Duration::from_millis(200)).await;
        let ack = publish(&mut alice, "room", "m5", "after").await;
        assert_eq!(ack["publishAck"]["seq"], json!("3"), "{ack}");

        // Bad input is refused before the hook is asked.
        let calls = backend.moderate_calls();
        let bad = publish(&mut alice, "room", "", "x").await;
        assert_eq!(code(&bad), 422, "{bad}");
        assert_eq!(backend.moderate_calls(), calls);
        // So is a payload over the router's limit: 413, whatever the hook
        // would have said.
        let huge = "x".repeat(40_000);
        let bad = publish(&mut alice, "room", "m6", &huge).await;
        assert_eq!(code(&bad), 413, "{transport:?} {bad}");
        assert_eq!(backend.moderate_calls(), calls);

        let (_, metrics) = http_get(edge.addr(), "/metrics").await;
        for (verdict, n) in [
            ("accept", 2.0),
            ("replace", 1.0),
            ("reject", 1.0),
            ("error_closed", 1.0),
            ("error_open", 0.0),
        ] {
            let name = format!("switchboard_moderation_total{{verdict=\"{verdict}\"}}");
            assert!(series(&metrics, &name) >= n, "{transport:?} {name}");
        }
        edge.shutdown().await;
    }
}

#[tokio::test]
async fn moderation_fails_open_when_set_to() {
    for transport in [Transport::Http, Transport::Grpc] {
        let (backend, _, moderate) = backend(transport).await;
        let edge = start(moderated_config(&moderate, true)).await;
        let mut alice = Raw::connected(&edge, "alice").await;
        let mut bob = Raw::connected(&edge, "bob").await;
        subscribe(&mut bob, "room").await;
        let started = Instant::now();
        let ack = publish(&mut alice, "room", "m1", "slow but fine").await;
        assert!(ack.get("publishAck").is_some(), "{transport:?} {ack}");
        assert!(started.elapsed() < SLOW);
        let got = bob.deliveries(1).await;
        assert_eq!(payload_text(&got[0]), "slow but fine");
        assert_eq!(backend.moderate_calls(), 1);
        edge.shutdown().await;
    }
    // A hook that is down is accepted as well.
    let down = format!("http://127.0.0.1:{}/moderate", free_port());
    let edge = start(moderated_config(&down, true)).await;
    let mut alice = Raw::connected(&edge, "alice").await;
    let ack = publish(&mut alice, "room", "m1", "x").await;
    assert!(ack.get("publishAck").is_some(), "{ack}");
    let (_, metrics) = http_get(edge.addr(), "/metrics").await;
    assert!(
        series(
            &metrics,
            "switchboard_moderation_total{verdict=\"error_open\"}"
        ) >= 1.0
    );
    edge.shutdown().await;
}

#[tokio::test]
async fn bad_hook_settings_are_refused_at_startup() {
    let base = || switchboard_edge::Settings {
        jwt_secret: Some(SECRET.into()),
        ..Default::default()
    };
    let err = switchboard_edge::Settings {
        chat_auth: Some("proxy".into()),
        ..base()
    }
    .resolve()
    .unwrap_err()
    .to_string();
    assert!(err.contains("--authorize-url"), "{err}");
    for (setting, s) in [
        (
            "--authorize-url",
            switchboard_edge::Settings {
                chat_auth: Some("proxy".into()),
                authorize_url: Some("https://hooks/authorize".into()),
                ..base()
            },
        ),
        (
            "--authorize-url",
            switchboard_edge::Settings {
                authorize_url: Some("grpc://hooks".into()),
                ..base()
            },
        ),
        (
            "--moderation-url",
            switchboard_edge::Settings {
                moderation_url: Some("hooks:9000".into()),
                ..base()
            },
        ),
        (
            "--moderation-timeout-ms",
            switchboard_edge::Settings {
                moderation_url: Some("grpc://hooks:9000".into()),
                moderation_timeout_ms: Some(0),
                ..base()
            },
        ),
    ] {
        let err = s.resolve().unwrap_err().to_string();
        assert!(err.contains(setting), "{setting}: {err}");
    }
    let ok = switchboard_edge::Settings {
        chat_auth: Some("proxy".into()),
        authorize_url: Some("grpc://hooks:9000".into()),
        moderation_url: Some("http://hooks:8080/moderate".into()),
        moderation_fail_open: Some(true),
        ..base()
    }
    .resolve()
    .unwrap();
    assert!(ok.authorize_hook.is_some());
    assert!(ok.moderation.as_ref().is_some_and(|m| m.fail_open));
}

/// In a cluster the router process sequences; the edge that took the
/// client's publish moderated it first, so receivers on another edge get
/// the replacement. Backend API publishes are not moderated.
#[tokio::test]
async fn moderation_applies_when_a_router_process_sequences() {
    let (backend, _, moderate) = backend(Transport::Grpc).await;
    let mut cluster = Cluster::new(1, 0).await;
    for node in ["edge-0", "edge-1"] {
        let mut c = crate::common::cluster::edge_config(&cluster.nats, &cluster.redis, node);
        c.moderation = Some(ModerationSettings {
            hook: hook(&moderate),
            fail_open: false,
        });
        cluster.edges.push(start(c).await);
    }
    let mut bob = Raw::connected(&cluster.edges[1], "bob").await;
    subscribe(&mut bob, "room").await;
    let mut alice = Raw::connected(&cluster.edges[0], "alice").await;
    let ack = publish(&mut alice, "room", "m1", "swear at routers").await;
    assert!(ack.get("publishAck").is_some(), "{ack}");
    let refused = publish(&mut alice, "room", "m2", "spam").await;
    assert_eq!(code(&refused), 451, "{refused}");
    let (status, body) = crate::common::cluster::post(
        cluster.routers[0].addr,
        "/api/publish",
        &json!({"chat": "room", "client_msg_id": "b1", "text": "swear, trusted"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let got: Vec<_> = bob.deliveries(2).await.iter().map(payload_text).collect();
    assert_eq!(got, ["****", "swear, trusted"]);
    assert_eq!(
        backend.moderate_calls(),
        2,
        "the API publish was not moderated"
    );
    cluster.shutdown().await;
}
