//! The product's real scenarios, end to end on real servers: nats-server
//! and redis-server, router replicas and edges (docs/protocol.md for the
//! frames and APIs). Each test is named after what it proves; each step
//! is what the messenger's apps and backend services do.

use std::{collections::HashMap, time::Duration};

use futures_util::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use switchboard_edge::{AuthConfig, ChatAuthMode, Claims};

use crate::common::{cluster::*, *};

/// A client publish; panics unless acked.
async fn publish(raw: &mut Raw, target: Value, id: &str, text: &str) -> Value {
    let mut body = target;
    body["clientMsgId"] = json!(id);
    body["payload"] = json!(b64(text));
    let ack = raw.request(json!({ "publish": body })).await;
    assert!(ack.get("publishAck").is_some(), "publish failed: {ack}");
    ack["publishAck"].clone()
}

/// A backend publish through `POST /api/publish` on a router or edge.
async fn backend_publish(addr: std::net::SocketAddr, body: Value) -> Value {
    let (status, ack) = post(addr, "/api/publish", &body).await;
    assert_eq!(status, 200, "{body} -> {ack}");
    ack
}

/// Reads frames until one of kind `kind` arrives (others are dropped).
async fn next_of(raw: &mut Raw, kind: &str) -> Value {
    loop {
        let v = raw
            .next()
            .await
            .unwrap_or_else(|| panic!("no {kind} frame"));
        if let Some(k) = v.get(kind) {
            return k.clone();
        }
    }
}

/// Payload texts of deliveries.
fn texts(deliveries: &[Value]) -> Vec<String> {
    deliveries.iter().map(payload_text).collect()
}

/// The messenger's auth service: signs ES256 tokens with its private key;
/// edges hold only the public key and check issuer and audience.
struct AuthService {
    key: EncodingKey,
}

const ISSUER: &str = "https://auth.chat.example";
const AUDIENCE: &str = "chat-gateway";

impl AuthService {
    fn new() -> AuthService {
        let dir = env!("CARGO_MANIFEST_DIR");
        let pem = std::fs::read(format!("{dir}/tests/fixtures/ec_private.pem")).unwrap();
        AuthService {
            key: EncodingKey::from_ec_pem(&pem).unwrap(),
        }
    }

    /// What the edge must be configured with to trust this service.
    fn edge_auth() -> AuthConfig {
        let dir = env!("CARGO_MANIFEST_DIR");
        let pem = std::fs::read(format!("{dir}/tests/fixtures/ec_public.pem")).unwrap();
        AuthConfig::new(
            None,
            Some(pem),
            Some(AUDIENCE.into()),
            Some(ISSUER.into()),
            5,
        )
        .unwrap()
    }

    fn claims(user: &str) -> Claims {
        let mut c = claims(user);
        c.iss = Some(ISSUER.into());
        c.aud = Some(AUDIENCE.into());
        c.iat = Some(now_secs());
        c
    }

    fn issue(&self, user: &str) -> String {
        self.sign(&AuthService::claims(user))
    }

    fn sign(&self, claims: &Claims) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &self.key).unwrap()
    }
}

/// Opens a JSON socket to `edge` and connects with `token`; the reply.
async fn login(edge: &switchboard_edge::Edge, token: &str) -> (Raw, Value) {
    let mut raw = Raw::open(edge, "switchboard.v1.json").await;
    let reply = raw.request(json!({"connect": {"token": token}})).await;
    (raw, reply)
}

/// Logs in and panics unless the connect was accepted.
async fn logged_in(edge: &switchboard_edge::Edge, token: &str) -> Raw {
    let (raw, reply) = login(edge, token).await;
    assert!(reply.get("connectResult").is_some(), "login: {reply}");
    raw
}

/// A cluster of `routers` routers and `edges` edges whose edges trust the
/// auth service's tokens and authorize chats by membership.
async fn chat_platform(routers: usize, edges: usize) -> Cluster {
    let nats = switchboard_testkit::Server::nats();
    let redis = switchboard_testkit::Server::redis();
    let mut r = Vec::new();
    for i in 0..routers {
        r.push(start_router(&nats, &redis, &format!("router-{i}")).await);
    }
    wait_for_routers(&nats).await;
    let mut e = Vec::new();
    for i in 0..edges {
        let mut cfg = edge_config(&nats, &redis, &format!("edge-{i}"));
        cfg.auth = AuthService::edge_auth();
        cfg.authz.mode = ChatAuthMode::Members;
        e.push(start(cfg).await);
    }
    Cluster {
        nats,
        redis,
        routers: r,
        edges: e,
    }
}

/// A chat platform whose auth service issues the JWT: the edges accept its
/// tokens and nobody else's, chat messages reach the members' devices on
/// every edge, and friend-request events that the backend publishes to a
/// user's personal stream reach that user's devices only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chat_platform_auth_service_tokens_deliver_chat_and_friend_requests_to_the_right_devices() {
    let c = chat_platform(2, 2).await;
    let (e0, e1) = (&c.edges[0], &c.edges[1]);
    let router = c.routers[0].addr;
    let auth = AuthService::new();

    // The chat service owns membership.
    let (status, body) = post(
        router,
        "/api/chats/room-1/members",
        &json!({"add": ["alice", "bob"]}),
    )
    .await;
    assert_eq!((status, body["added"].as_u64()), (200, Some(2)), "{body}");

    // Tokens from anyone but the auth service are refused: another key, the
    // wrong audience, the wrong issuer.
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &AuthService::claims("alice"),
        &EncodingKey::from_secret(b"guessed"),
    )
    .unwrap();
    let mut wrong_aud = AuthService::claims("alice");
    wrong_aud.aud = Some("billing".into());
    let mut wrong_iss = AuthService::claims("alice");
    wrong_iss.iss = Some("https://evil.example".into());
    for bad in [forged, auth.sign(&wrong_aud), auth.sign(&wrong_iss)] {
        let (mut raw, reply) = login(e0, &bad).await;
        assert_eq!(reply["error"]["code"], 401, "{reply}");
        assert_eq!(raw.until_close().await.0, Some(4501));
    }

    let mut alice_phone = logged_in(e0, &auth.issue("alice")).await;
    let mut alice_laptop = logged_in(e1, &auth.issue("alice")).await;
    let mut bob = logged_in(e1, &auth.issue("bob")).await;
    let mut carol = logged_in(e0, &auth.issue("carol")).await;
    for raw in [&mut alice_phone, &mut alice_laptop, &mut bob] {
        let r = raw.request(json!({"subscribe": {"chat": "room-1"}})).await;
        assert!(r.get("subscribeResult").is_some(), "{r}");
    }
    // Not a member: refused.
    let r = carol
        .request(json!({"subscribe": {"chat": "room-1"}}))
        .await;
    assert_eq!(r["error"]["code"], 403, "{r}");

    // A chat message reaches every member's device, on both edges.
    let ack = publish(&mut alice_phone, json!({"chat": "room-1"}), "m1", "hi bob").await;
    for raw in [&mut bob, &mut alice_laptop, &mut alice_phone] {
        let d = raw.deliveries(1).await;
        assert_eq!(texts(&d), ["hi bob"]);
        assert_eq!(
            (d[0]["sender"].as_str(), seq(&d[0])),
            (Some("alice"), seq(&ack))
        );
    }

    // The friends service publishes a friend request to bob's personal
    // stream: bob's device gets it, no one else's.
    let request = json!({"type": "friend_request", "from": "carol"}).to_string();
    backend_publish(
        router,
        json!({"user": "bob", "client_msg_id": "fr-carol-bob", "text": request, "sender": "friends"}),
    )
    .await;
    let d = bob.deliveries(1).await;
    assert_eq!(texts(&d), [request]);
    assert_eq!(
        (d[0]["user"].as_str(), d[0]["sender"].as_str()),
        (Some("bob"), Some("friends"))
    );
    // Bob accepts; carol's device hears of it.
    let accepted = json!({"type": "friend_request_accepted", "by": "bob"}).to_string();
    backend_publish(
        e1.addr(),
        json!({"user": "carol", "client_msg_id": "fra-bob-carol", "text": accepted, "sender": "friends"}),
    )
    .await;
    assert_eq!(texts(&carol.deliveries(1).await), [accepted]);
    for raw in [&mut alice_phone, &mut alice_laptop, &mut bob, &mut carol] {
        raw.assert_no_delivery(Duration::from_millis(300)).await;
    }
    c.shutdown().await;
}

/// A gateway that checks tokens periodically (in-band refresh) and a
/// backend that revokes a user: the kick closes the user's sockets on
/// every edge, the user cannot come back with any token issued before the
/// revocation (so cannot resubscribe either), a refresh with such a token
/// is refused on a live socket, and a token the auth service issues later
/// lets the user in again (ADR 0039).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_user_is_kicked_everywhere_and_cannot_reconnect_or_resubscribe() {
    let c = chat_platform(1, 2).await;
    let (e0, e1) = (&c.edges[0], &c.edges[1]);
    let router = c.routers[0].addr;
    let auth = AuthService::new();
    let (status, _) = post(
        router,
        "/api/chats/lobby/members",
        &json!({"add": ["mallory", "bob"]}),
    )
    .await;
    assert_eq!(status, 200);

    let old_token = auth.issue("mallory");
    let mut phone = logged_in(e0, &old_token).await;
    let mut laptop = logged_in(e1, &old_token).await;
    let mut bob = logged_in(e1, &auth.issue("bob")).await;
    for raw in [&mut phone, &mut laptop, &mut bob] {
        let r = raw.request(json!({"subscribe": {"chat": "lobby"}})).await;
        assert!(r.get("subscribeResult").is_some(), "{r}");
    }
    // The periodic check: the app refreshes its token in band.
    let refreshed = auth.issue("mallory");
    let r = phone
        .request(json!({"refresh": {"token": refreshed}}))
        .await;
    assert!(r.get("refreshResult").is_some(), "{r}");

    // The backend revokes mallory for as long as its tokens live.
    let (status, kick) = post(
        router,
        "/api/kick",
        &json!({"user": "mallory", "revoke_secs": 3600}),
    )
    .await;
    assert_eq!(status, 200, "{kick}");
    assert_eq!(kick["edges"], 2, "{kick}");
    assert!(kick["revoked_until_ms"].as_i64().unwrap() > now_secs() as i64 * 1000);
    for raw in [&mut phone, &mut laptop] {
        let (code, frames) = raw.until_close().await;
        assert_eq!(code, Some(4503), "kicked: {frames:?}");
        let d = frames.iter().find_map(|f| f.get("disconnect")).unwrap();
        assert_eq!(d["reason"], "kicked", "{d}");
        assert_ne!(d["reconnect"], true, "told not to reconnect: {d}");
    }

    // Coming back with either token issued before the revocation fails at
    // connect, on any edge: no socket, so no subscribe.
    for (edge, token) in [(e0, &old_token), (e1, &refreshed)] {
        let (mut raw, reply) = login(edge, token).await;
        assert_eq!(reply["error"]["code"], 401, "{reply}");
        assert_eq!(reply["error"]["message"], "token revoked", "{reply}");
        assert_eq!(raw.until_close().await.0, Some(4501));
    }
    // The lobby goes on without mallory.
    publish(&mut bob, json!({"chat": "lobby"}), "b1", "she's gone").await;
    assert_eq!(texts(&bob.deliveries(1).await), ["she's gone"]);

    // Once the auth service lets her back in, a token it issues after the
    // revocation works (iat is in whole seconds: the next one)...
    let revoked_at_secs = now_secs();
    while now_secs() <= revoked_at_secs {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut back = logged_in(e0, &auth.issue("mallory")).await;
    let r = back.request(json!({"subscribe": {"chat": "lobby"}})).await;
    assert!(r.get("subscribeResult").is_some(), "{r}");
    // ...but a live socket cannot extend itself with a revoked token.
    let r = back.request(json!({"refresh": {"token": old_token}})).await;
    assert_eq!(
        (r["error"]["code"].as_u64(), r["error"]["message"].as_str()),
        (Some(401), Some("token revoked")),
        "{r}"
    );
    // The refused logins leave nothing behind in presence.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, presence) =
            post(router, "/api/presence", &json!({"users": ["mallory"]})).await;
        assert_eq!(status, 200);
        if presence["users"][0]["devices"] == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{presence}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.shutdown().await;
}

/// Login after being offline: what was sent to the user meanwhile (direct
/// messages and the backend's friend requests on the personal stream, and
/// the group's messages) arrives on connect and resubscribe, in the order
/// it was sent, exactly once, on whichever edge the user lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_after_being_offline_delivers_pending_messages_and_friend_requests_in_order_once() {
    let c = Cluster::new(1, 2).await;
    let router = c.routers[0].addr;
    let mut alice = Raw::connected(&c.edges[0], "alice").await;
    let r = alice
        .request(json!({"subscribe": {"chat": "family"}}))
        .await;
    let family = r["subscribeResult"]["position"].clone();
    // What the app stores of its personal stream: the connect result's position.
    let mut probe = Raw::open(&c.edges[0], "switchboard.v1.json").await;
    let hello = probe
        .request(json!({"connect": {"token": token("alice")}}))
        .await;
    let user_stream = hello["connectResult"]["userStream"].clone();
    drop(probe);
    drop(alice);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // While alice is offline: bob's DMs, friend requests, family posts.
    let mut bob = Raw::connected(&c.edges[1], "bob").await;
    let friend_request = |from: &str| json!({"type": "friend_request", "from": from}).to_string();
    let mut personal = Vec::new();
    publish(&mut bob, json!({"user": "alice"}), "dm-1", "are you there?").await;
    personal.push("are you there?".to_owned());
    backend_publish(
        router,
        json!({"user": "alice", "client_msg_id": "fr-dave", "text": friend_request("dave"), "sender": "friends"}),
    )
    .await;
    personal.push(friend_request("dave"));
    publish(&mut bob, json!({"user": "alice"}), "dm-2", "call me").await;
    personal.push("call me".to_owned());
    publish(&mut bob, json!({"chat": "family"}), "f-1", "dinner at 8").await;
    publish(&mut bob, json!({"user": "alice"}), "dm-3", "never mind").await;
    personal.push("never mind".to_owned());
    backend_publish(
        router,
        json!({"user": "alice", "client_msg_id": "fr-erin", "text": friend_request("erin"), "sender": "friends"}),
    )
    .await;
    personal.push(friend_request("erin"));
    publish(&mut bob, json!({"chat": "family"}), "f-2", "bring dessert").await;
    // A retry of a DM the network lost the ack of: not a second message.
    let dup = publish(&mut bob, json!({"user": "alice"}), "dm-3", "never mind").await;
    assert_eq!(dup["duplicate"], true, "{dup}");

    // Alice logs in on the other edge with what she saw last.
    let mut alice = Raw::open(&c.edges[1], "switchboard.v1.json").await;
    let reply = alice
        .request(json!({"connect": {
            "token": token("alice"),
            // Zero values are left out of JSON frames.
            "userSince": user_stream["seq"].as_str().unwrap_or("0"),
            "userEpoch": user_stream["epoch"].as_str().unwrap_or(""),
        }}))
        .await;
    let position = &reply["connectResult"]["userStream"];
    assert_eq!(position["recovered"], 5, "{reply}");
    let got = alice.deliveries(5).await;
    assert_eq!(texts(&got), personal, "in the order sent");
    let first = seq(&user_stream) + 1;
    assert_eq!(
        got.iter().map(seq).collect::<Vec<_>>(),
        (first..first + 5).collect::<Vec<_>>()
    );
    assert!(got.iter().all(|d| d["user"] == "alice"));
    // Then the group, from where she left it.
    let r = alice
        .request(json!({"subscribe": {
            "chat": "family",
            "since": family["seq"].as_str().unwrap_or("0"),
            "epoch": family["epoch"].as_str().unwrap_or(""),
        }}))
        .await;
    assert_eq!(r["subscribeResult"]["position"]["recovered"], 2, "{r}");
    assert_eq!(
        texts(&alice.deliveries(2).await),
        ["dinner at 8", "bring dessert"]
    );
    // Once: nothing more, and logging in again from here recovers nothing.
    alice.assert_no_delivery(Duration::from_millis(500)).await;
    let last = got.last().unwrap();
    let mut again = Raw::open(&c.edges[0], "switchboard.v1.json").await;
    let reply = again
        .request(json!({"connect": {"token": token("alice"), "userSince": last["seq"], "userEpoch": last["epoch"]}}))
        .await;
    // (zero, so left out of the frame)
    assert_eq!(
        reply["connectResult"]["userStream"]["recovered"].as_u64(),
        None,
        "{reply}"
    );
    assert_eq!(reply["connectResult"]["userStream"]["seq"], last["seq"]);
    again.assert_no_delivery(Duration::from_millis(300)).await;
    c.shutdown().await;
}

/// A storage platform's notification service: `file_uploaded` and
/// `profile_updated` events, published over HTTP (router and edge) and
/// straight onto NATS, reach every device of the owner, on every edge, in
/// one order, and no one else's: not another user, not a user whose id
/// starts the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_notifications_reach_all_of_the_owners_devices_and_nobody_else() {
    let c = Cluster::new(2, 2).await;
    let (e0, e1) = (&c.edges[0], &c.edges[1]);
    let mut devices = vec![
        Raw::connected(e0, "olga").await,
        Raw::connected(e1, "olga").await,
        Raw::connected(e1, "olga").await,
    ];
    let mut others = vec![
        Raw::connected(e0, "oscar").await,
        Raw::connected(e1, "oscar").await,
        Raw::connected(e0, "olga2").await,
        Raw::connected(e1, "olg").await,
    ];
    let events = [
        json!({"event": "file_uploaded", "file": "f-1", "name": "report.pdf", "bytes": 81234}),
        json!({"event": "profile_updated", "field": "avatar"}),
        json!({"event": "file_uploaded", "file": "f-2", "name": "photo.jpg", "bytes": 2048}),
    ];
    // Over HTTP to a router, over HTTP to an edge.
    backend_publish(
        c.routers[1].addr,
        json!({"user": "olga", "client_msg_id": "n-1", "text": events[0].to_string(), "sender": "storage"}),
    )
    .await;
    backend_publish(
        e1.addr(),
        json!({"user": "olga", "client_msg_id": "n-2", "text": events[1].to_string(), "sender": "storage"}),
    )
    .await;
    // Straight onto NATS, as a backend on the bus would.
    let nats = async_nats::connect(c.nats.url()).await.unwrap();
    let req = switchboard_router::encode_request(&switchboard_router::PublishRequest {
        sender: switchboard_protocol::UserId::parse("storage").unwrap(),
        target: switchboard_protocol::StreamKey::User(
            switchboard_protocol::UserId::parse("olga").unwrap(),
        ),
        client_msg_id: "n-3".into(),
        payload: events[2].to_string().into_bytes().into(),
    });
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        nats.request(switchboard_protocol::subject::ROUTER_PUBLISH, req),
    )
    .await
    .unwrap()
    .unwrap();
    let reply =
        <switchboard_protocol::internal::v1::RouterReply as prost::Message>::decode(reply.payload)
            .unwrap();
    assert!(
        matches!(
            reply.result,
            Some(switchboard_protocol::internal::v1::router_reply::Result::Ack(_))
        ),
        "{reply:?}"
    );

    let want: Vec<String> = events.iter().map(Value::to_string).collect();
    let mut orders = Vec::new();
    for raw in &mut devices {
        let got = raw.deliveries(3).await;
        assert_eq!(texts(&got), want, "every event, in order");
        assert!(
            got.iter()
                .all(|d| d["user"] == "olga" && d["sender"] == "storage")
        );
        orders.push(got.iter().map(seq).collect::<Vec<_>>());
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "one order: {orders:?}"
    );
    for raw in &mut others {
        raw.assert_no_delivery(Duration::from_millis(300)).await;
    }
    c.shutdown().await;
}

/// Push jobs queued per user on the JetStream push stream
/// (`sb.push.<user>`), once each of `want` has at least its count (or
/// after 5 s, as they are then).
async fn push_jobs(
    nats: &switchboard_testkit::Server,
    want: &[(&str, usize)],
) -> HashMap<String, usize> {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js
        .get_stream(switchboard_router::PUSH_STREAM)
        .await
        .unwrap();
    let mut jobs = HashMap::new();
    for _ in 0..50 {
        jobs.clear();
        let mut subjects = stream.info_with_subjects("sb.push.>").await.unwrap();
        while let Some(item) = subjects.next().await {
            let (subject, n) = item.unwrap();
            jobs.insert(subject.trim_start_matches("sb.push.").to_owned(), n);
        }
        if want
            .iter()
            .all(|(u, n)| jobs.get(*u).is_some_and(|got| got >= n))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    jobs
}

/// A high-load messenger on two edges and two routers: direct messages
/// reach all of the recipient's devices and none of the sender's others;
/// a group and a channel post with its comment thread keep one order for
/// everyone under concurrent writers; read receipts reach the reader's
/// other devices and the DM's sender; offline users get push jobs (one
/// per message, none for who was online); and two accounts on one device
/// (two sockets, two users) stay apart: deliveries, presence, kicks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn high_load_messenger_dms_groups_channels_receipts_push_and_two_accounts_stay_apart() {
    let c = Cluster::new(2, 2).await;
    let (e0, e1) = (&c.edges[0], &c.edges[1]);
    let router = c.routers[0].addr;

    let mut alice = Raw::connected(e0, "alice").await;
    let mut alice_tablet = Raw::connected(e1, "alice").await;
    let mut bob_phone = Raw::connected(e0, "bob").await;
    let mut bob_desktop = Raw::connected(e1, "bob").await;
    let carol = Raw::connected(e1, "carol").await;

    // DMs: every device of the recipient, none of the sender's others.
    let dm = publish(&mut alice, json!({"user": "bob"}), "dm-1", "lunch?").await;
    for raw in [&mut bob_phone, &mut bob_desktop] {
        let d = raw.deliveries(1).await;
        assert_eq!(
            (payload_text(&d[0]).as_str(), d[0]["user"].as_str()),
            ("lunch?", Some("bob"))
        );
    }
    alice_tablet
        .assert_no_delivery(Duration::from_millis(200))
        .await;
    // Bob's phone marks it read: alice's devices learn it, bob's do not.
    let r = bob_phone
        .request(
            json!({"receipt": {"user": "alice", "seq": dm["seq"], "kind": "RECEIPT_KIND_READ"}}),
        )
        .await;
    assert!(r.get("ok").is_some(), "{r}");
    for raw in [&mut alice, &mut alice_tablet] {
        let receipt = next_of(raw, "receipt").await;
        assert_eq!(
            (receipt["from"].as_str(), seq(&receipt)),
            (Some("bob"), seq(&dm))
        );
    }

    // A group under four concurrent writers on both edges: one order.
    let mut group = vec![alice, alice_tablet, bob_phone, bob_desktop, carol];
    for raw in &mut group {
        let r = raw.request(json!({"subscribe": {"chat": "g-team"}})).await;
        assert!(r.get("subscribeResult").is_some(), "{r}");
    }
    let per_writer = 50;
    let mut writers = Vec::new();
    for w in 0..4 {
        let addr = c.edges[w % 2].addr();
        writers.push(tokio::spawn(async move {
            let mut raw = Raw::connected_addr(addr, &format!("writer{w}")).await;
            for i in 0..per_writer {
                publish(
                    &mut raw,
                    json!({"chat": "g-team"}),
                    &format!("w{w}-{i}"),
                    &format!("{w}:{i}"),
                )
                .await;
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let total = 4 * per_writer;
    let mut orders = Vec::new();
    for raw in &mut group {
        let got = raw.deliveries(total).await;
        assert_eq!(
            got.iter().map(seq).collect::<Vec<_>>(),
            (1..=total as u64).collect::<Vec<_>>(),
            "gapless and in order"
        );
        orders.push(texts(&got));
    }
    assert!(orders.windows(2).all(|w| w[0] == w[1]), "one order for all");
    // Read receipts across devices: bob's phone reads the group; his
    // desktop (and everyone in the group) is told.
    let r = group[2]
        .request(json!({"receipt": {"chat": "g-team", "seq": total.to_string(), "kind": "RECEIPT_KIND_READ"}}))
        .await;
    assert!(r.get("ok").is_some(), "{r}");
    for raw in &mut group {
        let receipt = next_of(raw, "receipt").await;
        assert_eq!(
            (
                receipt["chat"].as_str(),
                receipt["from"].as_str(),
                seq(&receipt)
            ),
            (Some("g-team"), Some("bob"), total as u64)
        );
    }

    // A channel with members, some offline; the owner posts through the
    // backend API, readers comment in the post's thread (a chat of its own).
    let members = ["alice", "bob", "carol", "dave", "erin"];
    let (status, body) = post(
        router,
        "/api/channels/news/members",
        &json!({"add": members}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for raw in &mut group {
        raw.request(json!({"subscribe": {"chat": "news"}})).await;
        raw.request(json!({"subscribe": {"chat": "news-post-1"}}))
            .await;
    }
    backend_publish(
        e1.addr(),
        json!({"chat": "news", "client_msg_id": "post-1", "text": "v2 is out", "sender": "news-owner"}),
    )
    .await;
    for raw in &mut group {
        let d = raw.deliveries(1).await;
        assert_eq!(
            (payload_text(&d[0]).as_str(), d[0]["chat"].as_str()),
            ("v2 is out", Some("news"))
        );
    }
    publish(
        &mut group[4],
        json!({"chat": "news-post-1"}),
        "c-1",
        "finally!",
    )
    .await;
    publish(&mut group[0], json!({"chat": "news-post-1"}), "c-2", "+1").await;
    for raw in &mut group {
        let got = raw.deliveries(2).await;
        assert_eq!(texts(&got), ["finally!", "+1"]);
        assert!(got.iter().all(|d| d["chat"] == "news-post-1"));
    }
    // Offline users get push jobs: dave and erin for the post (members,
    // offline), erin once more for a DM; nobody who was online.
    publish(&mut group[2], json!({"user": "erin"}), "dm-erin", "ping me").await;
    let jobs = push_jobs(&c.nats, &[("dave", 1), ("erin", 2)]).await;
    assert_eq!(
        (jobs.get("dave"), jobs.get("erin")),
        (Some(&1), Some(&2)),
        "{jobs:?}"
    );
    for online in ["alice", "bob", "carol"] {
        assert!(!jobs.contains_key(online), "{online} was online: {jobs:?}");
    }

    // Two accounts on one device: two sockets, two users, kept apart.
    let mut work = Raw::connected(e0, "anna-work").await;
    let mut home = Raw::connected(e0, "anna-home").await;
    publish(
        &mut group[0],
        json!({"user": "anna-work"}),
        "w-1",
        "standup in 5",
    )
    .await;
    publish(
        &mut group[0],
        json!({"user": "anna-home"}),
        "h-1",
        "movie tonight?",
    )
    .await;
    let w = work.deliveries(1).await;
    let h = home.deliveries(1).await;
    assert_eq!(
        (payload_text(&w[0]).as_str(), w[0]["user"].as_str()),
        ("standup in 5", Some("anna-work"))
    );
    assert_eq!(
        (payload_text(&h[0]).as_str(), h[0]["user"].as_str()),
        ("movie tonight?", Some("anna-home"))
    );
    work.assert_no_delivery(Duration::from_millis(200)).await;
    home.assert_no_delivery(Duration::from_millis(200)).await;
    let (_, presence) = post(
        router,
        "/api/presence",
        &json!({"users": ["anna-work", "anna-home"]}),
    )
    .await;
    for u in presence["users"].as_array().unwrap() {
        assert_eq!(
            (u["online"].as_bool(), u["devices"].as_u64()),
            (Some(true), Some(1)),
            "{presence}"
        );
    }
    // Signing one account out (a kick) leaves the other one working.
    let (status, _) = post(router, "/api/kick", &json!({"user": "anna-home"})).await;
    assert_eq!(status, 200);
    assert_eq!(home.until_close().await.0, Some(4503));
    publish(
        &mut group[0],
        json!({"user": "anna-work"}),
        "w-2",
        "still here",
    )
    .await;
    assert_eq!(texts(&work.deliveries(1).await), ["still here"]);
    let r = work.request(json!({"ping": {}})).await;
    assert!(r.get("pong").is_some(), "{r}");
    c.shutdown().await;
}

/// Revocation on a standalone edge (the in-memory store) and over the
/// gRPC API: the same kick with `revoke_secs` keeps the user out, `0` is a
/// plain kick, and a duration out of range is refused before anything
/// is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_edge_revokes_over_grpc_and_refuses_a_bad_revocation() {
    use switchboard_protocol::api::v1::{self as pb, switchboard_client::SwitchboardClient};
    let mut cfg = config();
    cfg.api_key = Some(API_KEY.into());
    cfg.grpc_listen = Some("127.0.0.1:0".parse().unwrap());
    let edge = start(cfg).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", edge.grpc_addr().unwrap()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut api = SwitchboardClient::with_interceptor(channel, |mut req: tonic::Request<()>| {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {API_KEY}").parse().unwrap(),
        );
        Ok(req)
    });

    for bad in [json!(0), json!(30 * 24 * 3600 + 1), json!(-1)] {
        let (status, body) = post(
            edge.addr(),
            "/api/kick",
            &json!({"user": "mallory", "revoke_secs": bad}),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let mut mallory = Raw::connected(&edge, "mallory").await;
    let mut sam = Raw::connected(&edge, "sam").await;
    // revoke_secs 0 over gRPC: a plain kick; sam comes straight back.
    let kicked = api
        .kick(pb::KickRequest {
            user: "sam".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((kicked.edges, kicked.revoked_until_ms), (1, 0));
    assert_eq!(sam.until_close().await.0, Some(4503));
    Raw::connected(&edge, "sam").await;
    // With revoke_secs: kicked, and kept out.
    let kicked = api
        .kick(pb::KickRequest {
            user: "mallory".into(),
            revoke_secs: 60,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        kicked.revoked_until_ms > now_secs() as i64 * 1000,
        "{kicked:?}"
    );
    assert_eq!(mallory.until_close().await.0, Some(4503));
    let (mut raw, reply) = login(&edge, &token("mallory")).await;
    assert_eq!(reply["error"]["message"], "token revoked", "{reply}");
    assert_eq!(raw.until_close().await.0, Some(4501));
    let metrics = http_get(edge.addr(), "/metrics").await.1;
    assert!(
        metrics.contains("switchboard_edge_auth_failures_total{reason=\"revoked\"} 1"),
        "counted"
    );
    edge.shutdown().await;
}
