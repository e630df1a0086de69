//! The backend API over gRPC (ADR 0033), from a real tonic client: on a
//! standalone edge, and on a router process in a cluster on real NATS and
//! Redis. The HTTP API answers the same inputs alike (one implementation).
use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use serde_json::{Value, json};
use switchboard_protocol::api::v1::{
    self as pb, history_request, publish_request, publish_result,
    switchboard_client::SwitchboardClient,
};
use tonic::{
    Code, Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::common::{
    cluster::{API_KEY, get, post},
    *,
};

/// Adds `authorization: Bearer <key>` to every call (or nothing).
#[derive(Clone)]
struct Key(Option<&'static str>);

impl Interceptor for Key {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(key) = self.0 {
            let value = MetadataValue::try_from(format!("Bearer {key}")).unwrap();
            req.metadata_mut().insert("authorization", value);
        }
        Ok(req)
    }
}

type Client = SwitchboardClient<InterceptedService<Channel, Key>>;

async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap()
}

async fn client(addr: SocketAddr, key: Option<&'static str>) -> Client {
    // Large enough to send what the server must refuse.
    SwitchboardClient::with_interceptor(channel(addr).await, Key(key))
        .max_encoding_message_size(16 << 20)
}

fn to_chat(chat: &str, id: &str, text: &str) -> pb::PublishRequest {
    pb::PublishRequest {
        target: Some(publish_request::Target::Chat(chat.into())),
        client_msg_id: id.into(),
        payload: Bytes::from(text.to_owned()),
        sender: String::new(),
    }
}

fn read(chat: &str, after_seq: u64, limit: u32) -> pb::HistoryRequest {
    pb::HistoryRequest {
        stream: Some(history_request::Stream::Chat(chat.into())),
        after_seq,
        limit,
        epoch: String::new(),
    }
}

/// The refusal's code, message and `switchboard-code` (the HTTP status).
fn refusal(s: &Status) -> (Code, &str, u16) {
    let http = s
        .metadata()
        .get("switchboard-code")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (s.code(), s.message(), http)
}

async fn health(addr: SocketAddr, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(channel(addr).await);
    let reply = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    reply.status()
}

fn grpc_config(key: Option<&str>) -> switchboard_edge::Config {
    let mut cfg = config();
    cfg.api_key = key.map(str::to_owned);
    cfg.grpc_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg
}

#[tokio::test]
async fn grpc_publish_batch_kick_presence_and_history_on_an_edge() {
    let edge = start(grpc_config(Some(API_KEY))).await;
    let addr = edge.grpc_addr().unwrap();
    let mut api = client(addr, Some(API_KEY)).await;
    let mut ivan = Raw::connected(&edge, "ivan").await;
    ivan.request(json!({"subscribe": {"chat": "news"}})).await;

    // A publish, then its retry: the same seq, delivered once.
    let first = api
        .publish(to_chat("news", "n1", "breaking"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.stream.as_str(), first.seq), ("chat:news", 1));
    assert!(!first.duplicate);
    let again = api
        .publish(to_chat("news", "n1", "breaking"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((again.seq, again.duplicate), (1, true));
    assert_eq!(again.timestamp_ms, first.timestamp_ms);
    let d = ivan.deliveries(1).await;
    assert_eq!(payload_text(&d[0]), "breaking");
    assert_eq!(d[0]["sender"], "backend");
    ivan.assert_no_delivery(Duration::from_millis(300)).await;

    // A batch over two streams: each stream in order, results in request
    // order, a duplicate inside it recognised.
    let dm = pb::PublishRequest {
        target: Some(publish_request::Target::User("ivan".into())),
        client_msg_id: "d1".into(),
        payload: Bytes::from_static(b"for you"),
        sender: "billing".into(),
    };
    let batch = vec![
        to_chat("news", "n2", "two"),
        dm,
        to_chat("news", "n3", "three"),
        to_chat("news", "n1", "breaking"),
    ];
    let results = api
        .publish_batch(futures_util::stream::iter(batch))
        .await
        .unwrap()
        .into_inner()
        .results;
    let acks: Vec<(String, u64, bool)> = results
        .into_iter()
        .map(|r| match r.result {
            Some(publish_result::Result::Published(p)) => (p.stream, p.seq, p.duplicate),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        acks,
        [
            ("chat:news".into(), 2, false),
            ("user:ivan".into(), 1, false),
            ("chat:news".into(), 3, false),
            ("chat:news".into(), 1, true),
        ]
    );
    let d = ivan.deliveries(3).await;
    let mut texts: Vec<String> = d.iter().map(payload_text).collect();
    texts.sort();
    assert_eq!(texts, ["for you", "three", "two"]);

    // History for a backend: a range, page by page.
    let page = api.history(read("news", 0, 2)).await.unwrap().into_inner();
    let ids: Vec<&str> = page
        .messages
        .iter()
        .map(|m| m.client_msg_id.as_str())
        .collect();
    assert_eq!(ids, ["n1", "n2"]);
    assert!(page.more);
    let position = page.position.unwrap();
    assert_eq!((position.seq, position.recovered), (3, 2));
    assert!(!position.resync_required);
    let rest = api.history(read("news", 2, 0)).await.unwrap().into_inner();
    assert_eq!(rest.messages.len(), 1);
    assert_eq!(rest.messages[0].payload, Bytes::from_static(b"three"));
    assert!(!rest.more);

    // Presence in bulk, in the order asked.
    let users = api
        .presence(pb::PresenceRequest {
            users: vec!["nobody".into(), "ivan".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .users;
    let seen: Vec<(&str, bool, u32)> = users
        .iter()
        .map(|u| (u.user.as_str(), u.online, u.devices))
        .collect();
    assert_eq!(seen, [("nobody", false, 0), ("ivan", true, 1)]);

    // Health, for the server and the API.
    assert_eq!(health(addr, "").await, ServingStatus::Serving);
    let name = "switchboard.api.v1.Switchboard";
    assert_eq!(health(addr, name).await, ServingStatus::Serving);

    // Kick: the user's socket closes with 4503.
    let kicked = api
        .kick(pb::KickRequest {
            user: "ivan".into(),
            session: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kicked.edges, 1);
    assert_eq!(ivan.until_close().await.0, Some(4503));
    edge.shutdown().await;
}

#[tokio::test]
async fn grpc_refuses_wrong_keys_and_an_edge_without_one() {
    let edge = start(grpc_config(Some(API_KEY))).await;
    let addr = edge.grpc_addr().unwrap();
    for key in [None, Some("wrong")] {
        let mut api = client(addr, key).await;
        let e = api.publish(to_chat("c", "1", "x")).await.unwrap_err();
        assert_eq!(
            refusal(&e),
            (Code::Unauthenticated, "missing or wrong API key", 401)
        );
        let e = api
            .publish_batch(futures_util::stream::iter(vec![to_chat("c", "1", "x")]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let e = api
            .presence(pb::PresenceRequest { users: vec![] })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    // The key is checked before the message is read: a caller without it
    // is refused as such, however large or broken its message.
    let mut keyless = client(addr, None).await;
    let e = keyless
        .publish(to_chat("c", "big", &"x".repeat(9 << 20)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Health needs no key.
    assert_eq!(health(addr, "").await, ServingStatus::Serving);
    let mut api = client(addr, Some(API_KEY)).await;
    let page = api.history(read("c", 0, 0)).await.unwrap().into_inner();
    assert!(page.messages.is_empty(), "nothing was published");
    edge.shutdown().await;

    // No key configured: off, as HTTP answers 404.
    let edge = start(grpc_config(None)).await;
    let mut api = client(edge.grpc_addr().unwrap(), Some(API_KEY)).await;
    let e = api.history(read("c", 0, 0)).await.unwrap_err();
    assert_eq!(
        refusal(&e),
        (
            Code::Unimplemented,
            "history API disabled: set --api-key",
            404
        )
    );
    edge.shutdown().await;
}

/// Every bad input is refused with a typed status, the HTTP API's message
/// where HTTP has the same call, and changes nothing.
#[tokio::test]
async fn grpc_refuses_bad_input_like_http_and_changes_nothing() {
    let mut cfg = grpc_config(Some(API_KEY));
    cfg.max_payload_bytes = 1000;
    let edge = start(cfg).await;
    let addr = edge.grpc_addr().unwrap();
    let mut api = client(addr, Some(API_KEY)).await;
    let mut watcher = Raw::connected(&edge, "watcher").await;
    watcher.request(json!({"subscribe": {"chat": "c"}})).await;

    // Publish: gRPC and HTTP refuse the same input alike.
    let big = "x".repeat(1001);
    let cases: [(pb::PublishRequest, Value, Code, u16); 5] = [
        (
            to_chat("a.b", "m1", "x"),
            json!({"chat": "a.b", "client_msg_id": "m1", "text": "x"}),
            Code::InvalidArgument,
            422,
        ),
        (
            pb::PublishRequest {
                target: None,
                ..to_chat("", "m1", "x")
            },
            json!({"client_msg_id": "m1", "text": "x"}),
            Code::InvalidArgument,
            400,
        ),
        (
            to_chat("c", "", "x"),
            json!({"chat": "c", "client_msg_id": "", "text": "x"}),
            Code::InvalidArgument,
            422,
        ),
        (
            pb::PublishRequest {
                sender: "bad sender".into(),
                ..to_chat("c", "m1", "x")
            },
            json!({"chat": "c", "client_msg_id": "m1", "text": "x", "sender": "bad sender"}),
            Code::InvalidArgument,
            422,
        ),
        (
            to_chat("c", "m1", &big),
            json!({"chat": "c", "client_msg_id": "m1", "text": big}),
            Code::ResourceExhausted,
            413,
        ),
    ];
    for (request, body, code, status) in cases {
        let e = api.publish(request).await.unwrap_err();
        let (http_status, http_body) = post(edge.addr(), "/api/publish", &body).await;
        assert_eq!(http_status, status, "{body}: {http_body}");
        let message = http_body["error"]["message"].as_str().unwrap();
        assert_eq!(refusal(&e), (code, message, status), "{body}");
    }

    // A message over the gRPC limit is refused before it is read, with the
    // same code as every other size limit.
    let huge = to_chat("c", "m2", &"x".repeat(9 << 20));
    let e = api.publish(huge).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert_eq!(refusal(&e).2, 413);

    // A body that is not the request message: typed, not INTERNAL.
    let e = malformed_publish(addr).await;
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(refusal(&e).2, 400);

    // A batch with one bad message, or one too many, publishes nothing.
    let bad_batch = vec![
        to_chat("c", "b1", "x"),
        to_chat("c", "b2", "x"),
        to_chat("c d", "b3", "x"),
    ];
    let e = api
        .publish_batch(futures_util::stream::iter(bad_batch))
        .await
        .unwrap_err();
    let (code, message, status) = refusal(&e);
    assert_eq!((code, status), (Code::InvalidArgument, 422));
    assert!(message.starts_with("messages[2]: "), "{message}");
    let too_many: Vec<_> = (0..1001)
        .map(|i| to_chat("c", &format!("t{i}"), "x"))
        .collect();
    let e = api
        .publish_batch(futures_util::stream::iter(too_many))
        .await
        .unwrap_err();
    assert_eq!(
        refusal(&e),
        (
            Code::ResourceExhausted,
            "more than 1000 messages in one batch",
            413
        )
    );

    // Presence and history.
    let presence = |users: Vec<String>| pb::PresenceRequest { users };
    let e = api
        .presence(presence(vec!["ok".into(), "not ok".into()]))
        .await
        .unwrap_err();
    let (code, message, status) = refusal(&e);
    assert_eq!((code, status), (Code::InvalidArgument, 422));
    assert!(message.starts_with("users[1]: "), "{message}");
    let (s, b) = post(
        edge.addr(),
        "/api/presence",
        &json!({"users": ["ok", "not ok"]}),
    )
    .await;
    assert_eq!((s, b["error"]["message"].as_str()), (422, Some(message)));
    let many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    let e = api.presence(presence(many)).await.unwrap_err();
    assert_eq!(refusal(&e).0, Code::ResourceExhausted);
    for bad in [read("c", 0, 1001), read("a.b", 0, 0)] {
        let e = api.history(bad.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
    }
    let e = api
        .history(pb::HistoryRequest {
            stream: None,
            ..read("c", 0, 0)
        })
        .await
        .unwrap_err();
    let (s, b) = post(edge.addr(), "/api/history", &json!({})).await;
    assert_eq!(
        refusal(&e),
        (
            Code::InvalidArgument,
            b["error"]["message"].as_str().unwrap(),
            s
        )
    );

    // Kick: bad user, bad session; the watcher stays.
    for (user, session) in [("a b", ""), ("watcher", "*")] {
        let request = pb::KickRequest {
            user: user.into(),
            session: session.into(),
            ..Default::default()
        };
        let e = api.kick(request).await.unwrap_err();
        let mut body = json!({"user": user});
        if !session.is_empty() {
            body["session"] = json!(session);
        }
        let (s, b) = post(edge.addr(), "/api/kick", &body).await;
        let message = b["error"]["message"].as_str().unwrap();
        assert_eq!(refusal(&e), (Code::InvalidArgument, message, s), "{body}");
    }

    // Nothing of it changed anything.
    let page = api.history(read("c", 0, 0)).await.unwrap().into_inner();
    assert!(page.messages.is_empty(), "{:?}", page.messages);
    assert_eq!(page.position.unwrap().seq, 0);
    watcher.assert_no_delivery(Duration::from_millis(300)).await;
    let r = watcher.request(json!({"ping": {}})).await;
    assert!(r.get("pong").is_some(), "{r}");
    edge.shutdown().await;
}

/// A Publish whose body is not a `PublishRequest` (field 1 as a number).
async fn malformed_publish(addr: SocketAddr) -> Status {
    #[derive(Clone, PartialEq, prost::Message)]
    struct NotAPublish {
        #[prost(uint64, tag = "1")]
        chat: u64,
    }
    let mut grpc = tonic::client::Grpc::new(channel(addr).await);
    grpc.ready().await.unwrap();
    let mut request = Request::new(NotAPublish { chat: 7 });
    let key = MetadataValue::try_from(format!("Bearer {API_KEY}")).unwrap();
    request.metadata_mut().insert("authorization", key);
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/switchboard.api.v1.Switchboard/Publish",
    );
    let codec = tonic_prost::ProstCodec::<NotAPublish, pb::PublishResponse>::default();
    grpc.unary(request, path, codec).await.unwrap_err()
}

/// A router process (the shipped binary's `main`) serves the same gRPC
/// API; an edge of the cluster delivers what it publishes.
#[tokio::test]
async fn grpc_on_a_router_process() {
    use switchboard_testkit::Server;
    let nats = Server::nats();
    let redis = Server::redis();
    let (http_port, grpc_port) = (free_port(), free_port());
    let mut router = std::process::Command::new(ROUTER_BIN)
        .envs([
            (
                "SWITCHBOARD_ROUTER_LISTEN",
                format!("127.0.0.1:{http_port}"),
            ),
            (
                "SWITCHBOARD_ROUTER_GRPC_LISTEN",
                format!("127.0.0.1:{grpc_port}"),
            ),
            ("SWITCHBOARD_NATS_URL", nats.url()),
            ("SWITCHBOARD_REDIS_URL", redis.url()),
            ("SWITCHBOARD_API_KEY", API_KEY.into()),
            ("SWITCHBOARD_NODE_ID", "router-grpc".into()),
            ("SWITCHBOARD_PRESENCE_TTL_MS", "1500".into()),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let grpc_addr = SocketAddr::from(([127, 0, 0, 1], grpc_port));
    wait_listening(grpc_addr, "router gRPC").await;
    cluster::wait_for_routers(&nats).await;
    let edge = cluster::start_edge(&nats, &redis, "edge-grpc").await;
    let mut rita = Raw::connected(&edge, "rita").await;
    rita.request(json!({"subscribe": {"chat": "ops"}})).await;

    let mut api = client(grpc_addr, Some(API_KEY)).await;
    let first = api
        .publish(to_chat("ops", "o1", "deploy"))
        .await
        .unwrap()
        .into_inner();
    let again = api
        .publish(to_chat("ops", "o1", "deploy"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((first.seq, first.duplicate), (1, false));
    assert_eq!((again.seq, again.duplicate), (1, true));
    let d = rita.deliveries(1).await;
    assert_eq!(payload_text(&d[0]), "deploy");
    rita.assert_no_delivery(Duration::from_millis(300)).await;

    let page = api.history(read("ops", 0, 0)).await.unwrap().into_inner();
    assert_eq!(page.messages.len(), 1);
    let users = api
        .presence(pb::PresenceRequest {
            users: vec!["rita".into()],
        })
        .await
        .unwrap()
        .into_inner()
        .users;
    assert!(users[0].online, "{users:?}");
    assert_eq!(health(grpc_addr, "").await, ServingStatus::Serving);

    // Membership, in the routers' member sets in Redis.
    let changed = api
        .update_members(members("ops", &["rita", "sam"], &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(changed.added, 2);
    let count = api
        .count_members(pb::CountMembersRequest { chat: "ops".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(count.members, 2);
    let chats = api
        .list_chats(chats_of("sam", "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(chats.chats, ["ops"]);

    let e = client(grpc_addr, Some("wrong"))
        .await
        .kick(pb::KickRequest {
            user: "rita".into(),
            session: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let kicked = api
        .kick(pb::KickRequest {
            user: "rita".into(),
            session: String::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(kicked.edges, 1);
    assert_eq!(rita.until_close().await.0, Some(4503));

    edge.shutdown().await;
    let _ = router.kill();
    let _ = router.wait();
}

/// A stop is not held by a client watching health: the watch sees
/// NOT_SERVING and ends, and the edge stops clean.
#[tokio::test]
async fn a_health_watch_ends_with_the_stop() {
    use futures_util::StreamExt;
    let edge = start(grpc_config(Some(API_KEY))).await;
    let addr = edge.grpc_addr().unwrap();
    let mut health = HealthClient::new(channel(addr).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopping = tokio::spawn(edge.shutdown());
    let mut last = first.status();
    while let Ok(Some(Ok(update))) =
        tokio::time::timeout(Duration::from_secs(5), watch.next()).await
    {
        last = update.status();
    }
    assert_eq!(last, ServingStatus::NotServing);
    let stopped = tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stopped, switchboard_edge::Stopped::Clean);
}

fn members(chat: &str, add: &[&str], remove: &[&str]) -> pb::UpdateMembersRequest {
    pb::UpdateMembersRequest {
        chat: chat.into(),
        add: add.iter().map(|u| u.to_string()).collect(),
        remove: remove.iter().map(|u| u.to_string()).collect(),
    }
}

fn chats_of(user: &str, cursor: &str, limit: u32) -> pb::ListChatsRequest {
    pb::ListChatsRequest {
        user: user.into(),
        cursor: cursor.into(),
        limit,
    }
}

/// Membership over gRPC in `members` mode: the same store and the same
/// removal notice as the HTTP membership API.
#[tokio::test]
async fn grpc_members_admit_list_count_and_remove() {
    let mut cfg = grpc_config(Some(API_KEY));
    cfg.authz.mode = switchboard_edge::ChatAuthMode::Members;
    let edge = start(cfg).await;
    let mut api = client(edge.grpc_addr().unwrap(), Some(API_KEY)).await;
    let mut bob = Raw::connected(&edge, "bob").await;
    let refused = bob.request(json!({"subscribe": {"chat": "team"}})).await;
    assert_eq!(refused["error"]["code"], 403, "{refused}");

    let changed = api
        .update_members(members("team", &["bob", "amy"], &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((changed.added, changed.removed), (2, 0));
    let again = api
        .update_members(members("team", &["bob"], &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.added, 0, "already a member");
    api.update_members(members("alpha", &["bob"], &[]))
        .await
        .unwrap();
    let count = api
        .count_members(pb::CountMembersRequest {
            chat: "team".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(count.members, 2);
    // The same count over HTTP: one store.
    let (_, http_count) = get(edge.addr(), "/api/chats/team/members").await;
    assert_eq!(http_count["members"], 2);

    // A user's chats, a page at a time.
    let first = api
        .list_chats(chats_of("bob", "", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (first.chats, first.next_cursor.as_str()),
        (vec!["alpha".to_string()], "alpha")
    );
    let second = api
        .list_chats(chats_of("bob", "alpha", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.chats, ["team"]);
    assert_eq!(second.next_cursor, "", "the last page");

    let contacts = api
        .update_contacts(pb::UpdateContactsRequest {
            user: "bob".into(),
            add: vec!["amy".into()],
            remove: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(contacts.added, 1);

    // Admitted; removed: the live subscription ends with a push.
    let sub = bob.request(json!({"subscribe": {"chat": "team"}})).await;
    assert!(sub.get("subscribeResult").is_some(), "{sub}");
    let removed = api
        .update_members(members("team", &[], &["bob"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.removed, 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let push = loop {
        assert!(std::time::Instant::now() < deadline, "no unsubscribed push");
        if let Some(v) = bob.next_within(Duration::from_millis(200)).await
            && v.get("unsubscribed").is_some()
        {
            break v;
        }
    };
    assert_eq!(push["unsubscribed"]["chat"], "team");
    let refused = bob.request(json!({"subscribe": {"chat": "team"}})).await;
    assert_eq!(refused["error"]["code"], 403, "{refused}");
    edge.shutdown().await;
}

/// Bad membership requests: refused like their HTTP twins, nothing applied.
#[tokio::test]
async fn grpc_members_refuse_bad_input_like_http() {
    let edge = start(grpc_config(Some(API_KEY))).await;
    let mut api = client(edge.grpc_addr().unwrap(), Some(API_KEY)).await;
    // A bad id anywhere in the lists applies nothing of the change.
    let e = api
        .update_members(members("team", &["ok", "not ok"], &[]))
        .await
        .unwrap_err();
    let (s, b) = post(
        edge.addr(),
        "/api/chats/team/members",
        &json!({"add": ["ok", "not ok"]}),
    )
    .await;
    let message = b["error"]["message"].as_str().unwrap();
    assert_eq!(refusal(&e), (Code::InvalidArgument, message, s));
    assert_eq!(s, 422);
    let e = api
        .update_members(members("a.b", &["ok"], &[]))
        .await
        .unwrap_err();
    assert_eq!(refusal(&e).0, Code::InvalidArgument);
    let many: Vec<String> = (0..100_001).map(|i| format!("u{i}")).collect();
    let too_many = pb::UpdateMembersRequest {
        chat: "team".into(),
        add: many,
        remove: vec![],
    };
    let e = api.update_members(too_many).await.unwrap_err();
    assert_eq!(
        refusal(&e),
        (
            Code::ResourceExhausted,
            "100001 users in one request; at most 100000",
            413
        )
    );
    let count = api
        .count_members(pb::CountMembersRequest {
            chat: "team".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(count.members, 0, "nothing was applied");

    // Pages: a limit out of range, a bad cursor.
    let e = api.list_chats(chats_of("ok", "", 5000)).await.unwrap_err();
    let (s, b) = get(edge.addr(), "/api/users/ok/chats?limit=5000").await;
    let message = b["error"]["message"].as_str().unwrap();
    assert_eq!(refusal(&e), (Code::InvalidArgument, message, s));
    assert_eq!(s, 400);
    let e = api.list_chats(chats_of("ok", "a.b", 0)).await.unwrap_err();
    let (s, b) = get(edge.addr(), "/api/users/ok/chats?after=a.b").await;
    let message = b["error"]["message"].as_str().unwrap();
    assert_eq!(refusal(&e), (Code::InvalidArgument, message, s));
    let e = api
        .update_contacts(pb::UpdateContactsRequest {
            user: "a b".into(),
            add: vec![],
            remove: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(refusal(&e).2, 422);
    edge.shutdown().await;
}
