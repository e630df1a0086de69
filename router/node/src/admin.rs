//! The admin API (ADR 0037): what an operator, through `switchboard-ctl`,
//! asks a node about the cluster and tells it to do. The same routes on
//! edges and routers, behind their own key (`--admin-key`, never the
//! publish key), JSON in and out:
//!
//! - `GET /admin/edges`: the node registry (presence leases), each edge's
//!   sockets, version, drain state and delivery counters;
//! - `GET /admin/users/<user>`: devices, edges, last seen;
//! - `GET /admin/streams/{chat,user}/<id>?last=N`: a stream's position
//!   and the metadata of its last N messages (never their payloads);
//! - `GET /admin/chats/<chat>`: member and online counts;
//! - `POST /admin/kick {"user", "session"?}`: as the backend API's kick;
//! - `POST /admin/edges/<edge>/drain`: the batched drain of a SIGTERM,
//!   without stopping the process.
//!
//! Cluster-wide reads go to the shared stores; what only an edge knows
//! (its sockets, its drain) is asked of it over NATS request-reply on
//! `sb.edge.<edge>.admin`, answered by [`serve_edge_requests`]: one
//! address reaches the whole fleet.
use std::{sync::Arc, time::Duration};

use futures_util::{StreamExt, future::BoxFuture};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use switchboard_presence::{MemberStore, PresenceStore};
use switchboard_protocol::{
    ChatId, StreamKey, UserId, now_ms, subject::edge_admin_subject, v1::server_frame,
};
use switchboard_router::History;
use tokio_util::sync::CancellationToken;

use crate::{
    api::{Api, ApiCode, ApiError, check_key},
    http::{self, Body},
};

/// Messages one stream read may describe.
pub const MAX_LAST_MESSAGES: u64 = 1000;
/// Messages a stream read describes when it names no `last`.
pub const DEFAULT_LAST_MESSAGES: u64 = 10;
/// How long an edge may take to answer an admin request over NATS.
const EDGE_TIMEOUT: Duration = Duration::from_secs(2);

/// What an edge says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EdgeStatus {
    /// Its node id.
    pub node: String,
    /// Its build's version.
    pub version: String,
    /// Open sockets.
    pub sockets: u64,
    /// Draining: refusing new sockets, closing the open ones.
    pub draining: bool,
    /// `switchboard_edge_deliveries_total` on its `/metrics`.
    pub deliveries_total: u64,
    /// `switchboard_edge_sent_frames_total` on its `/metrics`.
    pub sent_frames_total: u64,
}

/// The edge this process is, for the admin API: its status and its drain.
pub trait LocalEdge: Send + Sync + 'static {
    /// Its node id.
    fn node(&self) -> &str;
    /// Its status now.
    fn status(&self) -> EdgeStatus;
    /// Begins the batched drain (once; again: nothing new) and returns
    /// the status as it begins.
    fn drain(&self) -> EdgeStatus;
}

/// A chat's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ChatCount {
    /// Members in the member store.
    pub members: u64,
    /// Members with a live session; `None` where this node cannot count
    /// them (an edge: ask a router).
    pub online: Option<u64>,
}

/// Counts a chat's members (and, where the node can, those online).
pub trait ChatCounts: Send + Sync + 'static {
    /// The counts of `chat`.
    fn counts<'a>(&'a self, chat: &'a ChatId) -> BoxFuture<'a, Result<ChatCount, ApiError>>;
}

/// Member counts from a [`MemberStore`], no online count (an edge's).
pub struct StoreCounts(pub Arc<dyn MemberStore>);

impl ChatCounts for StoreCounts {
    fn counts<'a>(&'a self, chat: &'a ChatId) -> BoxFuture<'a, Result<ChatCount, ApiError>> {
        Box::pin(async move {
            let members = self.0.count(chat).await.map_err(unavailable)?;
            Ok(ChatCount {
                members,
                online: None,
            })
        })
    }
}

/// What the admin API reaches.
pub struct AdminBackends {
    /// The backend API (its kick).
    pub api: Arc<Api>,
    /// The node registry and who is online.
    pub presence: Arc<dyn PresenceStore>,
    /// Streams' positions and messages.
    pub history: Arc<dyn History>,
    /// Chat counts.
    pub chats: Arc<dyn ChatCounts>,
    /// How other edges are asked; `None`: standalone.
    pub nats: Option<async_nats::Client>,
    /// This process, if it is an edge.
    pub local: Option<Arc<dyn LocalEdge>>,
}

/// The admin API of one node.
pub struct Admin {
    key: Option<String>,
    b: AdminBackends,
}

/// A backend failure as a refusal.
pub fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ApiCode::Unavailable, e)
}

impl Admin {
    /// The admin API behind `key` (`None`: off).
    pub fn new(key: Option<String>, backends: AdminBackends) -> Admin {
        Admin { key, b: backends }
    }

    /// The NATS connection other edges are asked over, if any.
    pub fn nats(&self) -> Option<async_nats::Client> {
        self.b.nats.clone()
    }

    /// The edge this process is, if it is one.
    pub fn local(&self) -> Option<Arc<dyn LocalEdge>> {
        self.b.local.clone()
    }

    /// Checks `Bearer <admin key>`: [`ApiCode::Disabled`] without a key
    /// configured, [`ApiCode::Unauthorized`] with a wrong one (the
    /// publish key included).
    pub fn authorize(&self, authorization: Option<&str>) -> Result<(), ApiError> {
        check_key(self.key.as_deref(), "admin", authorization).map_err(|e| match e.code {
            ApiCode::Disabled => ApiError::new(e.code, "admin API disabled: set --admin-key"),
            _ => e,
        })
    }

    /// Every edge in the node registry with what it says about itself;
    /// one that does not answer is listed with `"reachable": false`.
    pub async fn edges(&self) -> Result<Vec<Value>, ApiError> {
        let mut nodes = self.b.presence.nodes(now_ms()).await.map_err(unavailable)?;
        if let Some(local) = &self.b.local
            && !nodes.iter().any(|(n, _)| n == local.node())
        {
            nodes.push((local.node().to_owned(), String::new()));
        }
        nodes.sort();
        let asked = nodes.into_iter().map(|(node, addr)| async move {
            match self.ask_edge(&node, EdgeOp::Status).await {
                Ok(s) => {
                    let mut v = json!(s);
                    v["addr"] = json!(addr);
                    v["reachable"] = json!(true);
                    v
                }
                Err(e) => json!({
                    "node": node, "addr": addr, "reachable": false, "error": e.message,
                }),
            }
        });
        Ok(futures_util::future::join_all(asked).await)
    }

    /// Asks `node` for its status, or to drain.
    async fn ask_edge(&self, node: &str, op: EdgeOp) -> Result<EdgeStatus, ApiError> {
        if let Some(local) = self.b.local.as_ref().filter(|l| l.node() == node) {
            return Ok(op.run(local.as_ref()));
        }
        let Some(nats) = &self.b.nats else {
            return Err(unavailable(format_args!(
                "edge {node} is not this node, and a standalone node reaches no other"
            )));
        };
        let request = serde_json::to_vec(&EdgeRequest { op }).unwrap_or_default();
        let reply = tokio::time::timeout(
            EDGE_TIMEOUT,
            nats.request(edge_admin_subject(node), request.into()),
        )
        .await
        .map_err(|_| unavailable(format_args!("edge {node} did not answer in time")))?
        .map_err(|e| unavailable(format_args!("edge {node} did not answer: {e}")))?;
        match serde_json::from_slice::<EdgeReply>(&reply.payload) {
            Ok(EdgeReply {
                status: Some(s), ..
            }) => Ok(s),
            Ok(EdgeReply { error, .. }) => Err(unavailable(format_args!(
                "edge {node}: {}",
                error.unwrap_or_default()
            ))),
            Err(e) => Err(unavailable(format_args!("edge {node}: bad answer: {e}"))),
        }
    }

    /// Drains `edge` (a node id) without stopping it.
    pub async fn drain(&self, edge: &str) -> Result<EdgeStatus, ApiError> {
        UserId::parse(edge).map_err(|e| ApiError::from(e).at("edge"))?;
        let status = self.ask_edge(edge, EdgeOp::Drain).await?;
        tracing::info!(call = "drain", edge, sockets = status.sockets, "admin");
        Ok(status)
    }

    /// A user's devices, edges and last seen.
    pub async fn user(&self, user: &str) -> Result<Value, ApiError> {
        let user = UserId::parse(user)?;
        let p = &self.b.presence;
        let status = p
            .status(std::slice::from_ref(&user), now_ms())
            .await
            .map_err(unavailable)?;
        let mut edges = p.nodes_of(&user).await.map_err(unavailable)?;
        edges.sort();
        edges.dedup();
        let s = status.first();
        Ok(json!({
            "user": user.as_str(),
            "online": s.is_some_and(|s| s.online),
            "devices": s.map_or(0, |s| s.devices),
            "edges": edges,
            "last_seen_ms": s.map_or(0, |s| s.last_seen_ms),
        }))
    }

    /// A stream's position and the metadata of its last `last` messages
    /// (seq, sender, time, client message id, payload size): never a
    /// payload.
    pub async fn stream(&self, stream: StreamKey, last: u64) -> Result<Value, ApiError> {
        if !(1..=MAX_LAST_MESSAGES).contains(&last) {
            return Err(ApiError::bad_request(format_args!(
                "last is {last}, it must be 1 to {MAX_LAST_MESSAGES}"
            )));
        }
        let h = &self.b.history;
        let head = h.recover(&stream, None, "").await.map_err(unavailable)?;
        let seq = head.position.seq;
        let mut messages = Vec::new();
        if seq > 0 {
            let since = seq.saturating_sub(last);
            let page = h
                .recover(&stream, Some(since), "")
                .await
                .map_err(unavailable)?;
            for f in &page.frames {
                if let Some(server_frame::Kind::Delivery(d)) = &f.frame().kind {
                    messages.push(json!({
                        "seq": d.seq,
                        "sender": d.sender,
                        "timestamp_ms": d.timestamp_ms,
                        "client_msg_id": d.client_msg_id,
                        "payload_bytes": d.payload.len(),
                    }));
                }
            }
        }
        Ok(json!({
            "stream": stream.to_string(),
            "seq": seq,
            "epoch": head.position.epoch,
            "messages": messages,
        }))
    }

    /// A chat's member and online counts.
    pub async fn chat(&self, chat: &str) -> Result<Value, ApiError> {
        let chat = ChatId::parse(chat)?;
        let c = self.b.chats.counts(&chat).await?;
        Ok(json!({"chat": chat.as_str(), "members": c.members, "online": c.online}))
    }

    /// Kicks a user (or one session) off every edge.
    pub async fn kick(&self, user: &str, session: Option<&str>) -> Result<Value, ApiError> {
        let (user, session) = Api::kick_request(user, session)?;
        let edges = self.b.api.kick(&user, session.clone()).await?;
        tracing::info!(call = "kick", user = %user, session = session.as_deref().unwrap_or(""), edges, "admin");
        Ok(json!({"user": user.as_str(), "session": session, "edges": edges}))
    }
}

/// What an edge is asked over NATS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum EdgeOp {
    Status,
    Drain,
}

impl EdgeOp {
    fn run(self, local: &dyn LocalEdge) -> EdgeStatus {
        match self {
            EdgeOp::Status => local.status(),
            EdgeOp::Drain => local.drain(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct EdgeRequest {
    op: EdgeOp,
}

#[derive(Default, Serialize, Deserialize)]
struct EdgeReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<EdgeStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Answers the admin requests to `local` on `sb.edge.<node>.admin` until
/// `stop`. A failed subscription is logged: the edge serves its sockets
/// without it, and the admin API lists it as unreachable.
pub async fn serve_edge_requests(
    client: async_nats::Client,
    local: Arc<dyn LocalEdge>,
    stop: CancellationToken,
) {
    let subject = edge_admin_subject(local.node());
    let mut requests = match client.subscribe(subject).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "admin requests: cannot subscribe");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = requests.next() => match m {
                Some(m) => m,
                None => return,
            },
        };
        let Some(reply_to) = msg.reply else { continue };
        let reply = match serde_json::from_slice::<EdgeRequest>(&msg.payload) {
            Ok(r) => EdgeReply {
                status: Some(r.op.run(local.as_ref())),
                error: None,
            },
            Err(e) => EdgeReply {
                status: None,
                error: Some(format!("bad request: {e}")),
            },
        };
        let body = serde_json::to_vec(&reply).unwrap_or_default();
        if let Err(e) = client.publish(reply_to, body.into()).await {
            tracing::debug!(error = %e, "admin reply not sent");
        }
    }
}

/// Whether `path` is an admin route (answered by [`route`]).
pub fn is_admin_route(path: &str) -> bool {
    path.starts_with("/admin/")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KickBody {
    user: String,
    session: Option<String>,
}

/// The admin calls, as the `call` label of
/// `switchboard_admin_requests_total` (`other`: no such route).
pub(crate) const CALLS: [&str; 7] = ["edges", "drain", "user", "stream", "chat", "kick", "other"];

/// The call a request names (a bounded label).
fn call_of(method: &Method, parts: &[&str]) -> &'static str {
    match (method, parts) {
        (&Method::GET, ["edges"]) => "edges",
        (&Method::POST, ["edges", _, "drain"]) => "drain",
        (&Method::GET, ["users", _]) => "user",
        (&Method::GET, ["streams", _, _]) => "stream",
        (&Method::GET, ["chats", _]) => "chat",
        (&Method::POST, ["kick"]) => "kick",
        _ => "other",
    }
}

/// Answers an admin route: the key check, then the call; counted in
/// `switchboard_admin_requests_total{call, result}`.
pub async fn route(req: Request<Incoming>, admin: &Admin) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let parts: Vec<&str> = path
        .trim_start_matches("/admin/")
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let call = call_of(&method, &parts);
    let count = |result: &'static str| {
        metrics::counter!("switchboard_admin_requests_total", "call" => call, "result" => result)
            .increment(1);
    };
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = admin.authorize(authorization) {
        count(e.code.label());
        return http::refused(&e);
    }
    let result = match (&method, parts.as_slice()) {
        (&Method::GET, ["edges"]) => admin.edges().await.map(|e| json!({ "edges": e })),
        (&Method::POST, ["edges", edge, "drain"]) => admin.drain(edge).await.map(|s| json!(s)),
        (&Method::GET, ["users", user]) => admin.user(user).await,
        (&Method::GET, ["streams", kind, id]) => match stream_key(kind, id) {
            Ok(key) => match last_of(&query) {
                Ok(last) => admin.stream(key, last).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        (&Method::GET, ["chats", chat]) => admin.chat(chat).await,
        (&Method::POST, ["kick"]) => match http::read_body(req.into_body(), 4096).await {
            Some(body) => match serde_json::from_slice::<KickBody>(&body) {
                Ok(k) => admin.kick(&k.user, k.session.as_deref()).await,
                Err(e) => Err(ApiError::bad_request(e)),
            },
            None => Err(ApiError::new(ApiCode::TooLarge, "body over 4096 bytes")),
        },
        _ => {
            count("not_found");
            return http::api_error(StatusCode::NOT_FOUND, "no such admin route");
        }
    };
    match result {
        Ok(v) => {
            count("ok");
            http::json(StatusCode::OK, v)
        }
        Err(e) => {
            count(e.code.label());
            http::refused(&e)
        }
    }
}

/// `chat`/`user` and an id as a stream.
fn stream_key(kind: &str, id: &str) -> Result<StreamKey, ApiError> {
    match kind {
        "chat" => Ok(StreamKey::Chat(ChatId::parse(id)?)),
        "user" => Ok(StreamKey::User(UserId::parse(id)?)),
        _ => Err(ApiError::bad_request("a stream is chat/<id> or user/<id>")),
    }
}

/// The `last` query parameter; [`DEFAULT_LAST_MESSAGES`] without one.
fn last_of(query: &str) -> Result<u64, ApiError> {
    match query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "last")
    {
        Some((_, v)) => v
            .parse()
            .map_err(|_| ApiError::bad_request(format_args!("last is {v:?}, not a number"))),
        None => Ok(DEFAULT_LAST_MESSAGES),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use bytes::Bytes;
    use switchboard_presence::{MemoryMembers, MemoryPresence, Session};
    use switchboard_router::{Bus, MemoryBus, MemoryHistory, Router, RouterLimits};

    use super::*;
    use crate::api::{ApiBackends, PublishFields};

    struct Solo(AtomicBool);

    impl LocalEdge for Solo {
        fn node(&self) -> &str {
            "solo"
        }
        fn status(&self) -> EdgeStatus {
            EdgeStatus {
                node: "solo".into(),
                version: "v".into(),
                sockets: 3,
                draining: self.0.load(Ordering::SeqCst),
                deliveries_total: 0,
                sent_frames_total: 0,
            }
        }
        fn drain(&self) -> EdgeStatus {
            self.0.store(true, Ordering::SeqCst);
            self.status()
        }
    }

    /// A standalone node's admin API on memory backends, and its API.
    fn admin(key: Option<&str>) -> (Admin, Arc<Api>, Arc<dyn PresenceStore>) {
        let bus: Arc<dyn Bus> = Arc::new(MemoryBus::new());
        let history: Arc<dyn History> = Arc::new(MemoryHistory::new(Default::default()));
        let presence: Arc<dyn PresenceStore> = Arc::new(MemoryPresence::new(30_000, 100));
        let members: Arc<dyn MemberStore> = Arc::new(MemoryMembers::new());
        let router = Arc::new(Router::new(
            history.clone(),
            bus.clone(),
            presence.clone(),
            RouterLimits {
                max_payload_bytes: 100,
            },
        ));
        let api = Arc::new(Api::new(
            Some("publish-key".into()),
            100,
            ApiBackends {
                publisher: router,
                bus,
                presence: presence.clone(),
                history: history.clone(),
                members: members.clone(),
            },
        ));
        let admin = Admin::new(
            key.map(str::to_owned),
            AdminBackends {
                api: api.clone(),
                presence: presence.clone(),
                history,
                chats: Arc::new(StoreCounts(members)),
                nats: None,
                local: Some(Arc::new(Solo(AtomicBool::new(false)))),
            },
        );
        (admin, api, presence)
    }

    #[test]
    fn only_the_admin_key_opens_the_admin_api() {
        let (on, _, _) = admin(Some("admin-key"));
        assert_eq!(on.authorize(Some("Bearer admin-key")), Ok(()));
        for wrong in [None, Some("Bearer publish-key"), Some("admin-key")] {
            let e = on.authorize(wrong).unwrap_err();
            assert_eq!(e.code, ApiCode::Unauthorized, "{wrong:?}");
        }
        let (off, _, _) = admin(None);
        let e = off.authorize(Some("Bearer admin-key")).unwrap_err();
        assert_eq!(e.code, ApiCode::Disabled);
        assert_eq!(e.message, "admin API disabled: set --admin-key");
    }

    #[tokio::test]
    async fn a_standalone_node_answers_for_itself() {
        let (admin, api, presence) = admin(Some("k"));
        presence
            .node_heartbeat("solo", "addr", now_ms())
            .await
            .unwrap();
        let session = Session {
            user: UserId::parse("ann").unwrap(),
            session_id: "solo-1".into(),
            node: "solo".into(),
        };
        presence.register(&session, now_ms()).await.unwrap();
        let edges = admin.edges().await.unwrap();
        assert_eq!(edges.len(), 1);
        assert_eq!(edges[0]["node"], "solo");
        assert_eq!(edges[0]["addr"], "addr");
        assert_eq!(edges[0]["sockets"], 3);
        assert_eq!(edges[0]["reachable"], true);
        let ann = admin.user("ann").await.unwrap();
        assert_eq!(ann["devices"], 1);
        assert_eq!(ann["edges"], json!(["solo"]));

        for i in 0..5 {
            api.publish(PublishFields {
                chat: Some("c".into()),
                client_msg_id: format!("m{i}"),
                payload: Bytes::from_static(b"secret"),
                ..Default::default()
            })
            .await
            .unwrap();
        }
        let stream = StreamKey::Chat(ChatId::parse("c").unwrap());
        let page = admin.stream(stream.clone(), 2).await.unwrap();
        assert_eq!(page["seq"], 5);
        let msgs = page["messages"].as_array().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0]["seq"], 4);
        assert_eq!(msgs[1]["client_msg_id"], "m4");
        assert_eq!(msgs[1]["payload_bytes"], 6);
        assert!(!page.to_string().contains("secret"), "{page}");
        let e = admin.stream(stream, 1001).await.unwrap_err();
        assert_eq!(e.code, ApiCode::BadRequest);

        let chat = admin.chat("c").await.unwrap();
        assert_eq!(chat, json!({"chat": "c", "members": 0, "online": null}));

        let drained = admin.drain("solo").await.unwrap();
        assert!(drained.draining);
        let e = admin.drain("other").await.unwrap_err();
        assert_eq!(e.code, ApiCode::Unavailable);
        assert_eq!(
            admin.drain("a.b").await.unwrap_err().code,
            ApiCode::InvalidId
        );
    }

    #[test]
    fn last_is_read_from_the_query() {
        assert_eq!(last_of(""), Ok(DEFAULT_LAST_MESSAGES));
        assert_eq!(last_of("x=1&last=5"), Ok(5));
        assert_eq!(last_of("last=x").unwrap_err().code, ApiCode::BadRequest);
    }

    #[test]
    fn streams_are_chats_or_users() {
        assert!(matches!(stream_key("chat", "c"), Ok(StreamKey::Chat(_))));
        assert!(matches!(stream_key("user", "u"), Ok(StreamKey::User(_))));
        assert_eq!(
            stream_key("chat", "a b").unwrap_err().code,
            ApiCode::InvalidId
        );
        assert_eq!(
            stream_key("edge", "e").unwrap_err().code,
            ApiCode::BadRequest
        );
    }

    #[test]
    fn edge_requests_and_replies_are_stable_json() {
        let r = serde_json::to_string(&EdgeRequest { op: EdgeOp::Drain }).unwrap();
        assert_eq!(r, r#"{"op":"drain"}"#);
        let reply = EdgeReply {
            error: Some("x".into()),
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&reply).unwrap(), r#"{"error":"x"}"#);
    }
}
