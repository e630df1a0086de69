//! Chat authorization (ADR 0031): the modes, subscription tokens, the
//! direct-message policy and the membership API, on a standalone edge and
//! on edges of a real cluster (NATS and Redis spawned for the test).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use switchboard_edge::{ChatAuthMode, DmPolicy, SubscriptionClaims};

use crate::common::{
    cluster::{API_KEY, Cluster, edge_config, get, post},
    *,
};

fn code(reply: &Value) -> u64 {
    reply["error"]["code"].as_u64().unwrap_or(0)
}

fn members_config() -> switchboard_edge::Config {
    let mut c = config();
    c.authz.mode = ChatAuthMode::Members;
    c.api_key = Some(API_KEY.into());
    c
}

async fn publish(raw: &mut Raw, chat: &str, id: &str) -> Value {
    raw.request(json!({"publish": {"chat": chat, "clientMsgId": id, "payload": b64(id)}}))
        .await
}

/// Every chat request a non-member makes is refused with 403.
async fn assert_all_refused(raw: &mut Raw, chat: &str) {
    let sub = raw.request(json!({"subscribe": {"chat": chat}})).await;
    assert_eq!(code(&sub), 403, "subscribe: {sub}");
    assert_eq!(code(&publish(raw, chat, "x").await), 403, "publish");
    let receipt = raw
        .request(json!({"receipt": {"chat": chat, "seq": "1", "kind": "RECEIPT_KIND_READ"}}))
        .await;
    assert_eq!(code(&receipt), 403, "receipt: {receipt}");
    let typing = raw.request(json!({"typing": {"chat": chat}})).await;
    assert_eq!(code(&typing), 403, "typing: {typing}");
}

#[tokio::test]
async fn the_default_mode_refuses_chats_no_token_grants() {
    // The defect: a token without a `chats` claim could read any chat.
    let edge = start(switchboard_edge::Config::for_secret(SECRET)).await;
    let mut raw = Raw::connected(&edge, "mallory").await;
    assert_all_refused(&mut raw, "someone-elses-chat").await;
    // A claim grants its chats.
    let mut claims = claims("alice");
    claims.chats = Some(vec!["mine".into()]);
    let mut alice = Raw::open(&edge, "switchboard.v1.json").await;
    let hello = alice
        .request(json!({"connect": {"token": token_for(&claims)}}))
        .await;
    assert!(hello.get("connectResult").is_some(), "{hello}");
    let sub = alice.request(json!({"subscribe": {"chat": "mine"}})).await;
    assert!(sub.get("subscribeResult").is_some(), "{sub}");
    assert!(
        publish(&mut alice, "mine", "1")
            .await
            .get("publishAck")
            .is_some()
    );
    edge.shutdown().await;
}

#[tokio::test]
async fn members_mode_checks_every_chat_request_against_the_api() {
    let edge = start(members_config()).await;
    let mut bob = Raw::connected(&edge, "bob").await;
    assert_all_refused(&mut bob, "team").await;

    let (status, body) = post(
        edge.addr(),
        "/api/chats/team/members",
        &json!({"add": ["bob"]}),
    )
    .await;
    assert_eq!((status, &body["added"]), (200, &json!(1)), "{body}");
    let sub = bob.request(json!({"subscribe": {"chat": "team"}})).await;
    assert!(sub.get("subscribeResult").is_some(), "{sub}");
    assert!(
        publish(&mut bob, "team", "1")
            .await
            .get("publishAck")
            .is_some()
    );
    let typing = bob.request(json!({"typing": {"chat": "team"}})).await;
    assert!(typing.get("ok").is_some(), "{typing}");

    // The user's chats, paged.
    post(
        edge.addr(),
        "/api/chats/other/members",
        &json!({"add": ["bob"]}),
    )
    .await;
    let (status, page) = get(edge.addr(), "/api/users/bob/chats?limit=1").await;
    assert_eq!(status, 200);
    assert_eq!(page["chats"], json!(["other"]));
    assert_eq!(page["next"], json!("other"));
    let (_, page) = get(edge.addr(), "/api/users/bob/chats?after=other&limit=1").await;
    assert_eq!(page["chats"], json!(["team"]));
    let (_, count) = get(edge.addr(), "/api/chats/team/members").await;
    assert_eq!(count["members"], json!(1));

    // Removed: the live subscription ends with a push, nothing more
    // arrives, and the next subscribe is refused.
    let mut alice = Raw::connected(&edge, "alice").await;
    post(
        edge.addr(),
        "/api/chats/team/members",
        &json!({"add": ["alice"]}),
    )
    .await;
    alice.request(json!({"subscribe": {"chat": "team"}})).await;
    let (status, _) = post(
        edge.addr(),
        "/api/chats/team/members",
        &json!({"remove": ["bob"]}),
    )
    .await;
    assert_eq!(status, 200);
    let push = next_with(&mut bob, "unsubscribed").await;
    assert_eq!(push["unsubscribed"]["chat"], json!("team"));
    assert_eq!(push["unsubscribed"]["reason"], json!("removed"));
    assert!(push["unsubscribed"].get("users").is_none(), "{push}");
    publish(&mut alice, "team", "after").await;
    alice.deliveries(1).await;
    bob.assert_no_delivery(Duration::from_millis(300)).await;
    assert_all_refused(&mut bob, "team").await;
    // Unsubscribing what the server ended: not subscribed.
    let unsub = bob.request(json!({"unsubscribe": {"chat": "team"}})).await;
    assert_eq!(code(&unsub), 404, "{unsub}");
    edge.shutdown().await;
}

/// The next frame carrying `kind` (others skipped), within 5 s.
async fn next_with(raw: &mut Raw, kind: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(v) = raw.next_within(Duration::from_millis(200)).await
            && v.get(kind).is_some()
        {
            return v;
        }
    }
    panic!("no {kind} frame");
}

#[tokio::test]
async fn bad_membership_requests_are_refused_and_change_nothing() {
    let edge = start(members_config()).await;
    let addr = edge.addr();
    let cases = [
        ("/api/chats/team/members", json!("not an object"), 400),
        (
            "/api/chats/team/members",
            json!({"add": ["ok"], "extra": 1}),
            400,
        ),
        (
            "/api/chats/team/members",
            json!({"add": ["ok", "bad id!"]}),
            422,
        ),
        ("/api/chats/bad.chat/members", json!({"add": ["ok"]}), 422),
        ("/api/users/ok/contacts", json!({"add": [""]}), 422),
        ("/api/users/ok/nothing", json!({}), 404),
    ];
    for (path, body, want) in cases {
        let (status, reply) = post(addr, path, &body).await;
        assert_eq!(status, want, "{path} {body}: {reply}");
        assert!(reply["error"]["message"].is_string(), "{reply}");
    }
    let too_many: Vec<String> = (0..100_001).map(|i| format!("u{i}")).collect();
    let (status, _) = post(addr, "/api/chats/team/members", &json!({"add": too_many})).await;
    assert_eq!(status, 413);
    // Nothing was added by any of them.
    let (_, count) = get(addr, "/api/chats/team/members").await;
    assert_eq!(count["members"], json!(0));
    let (status, _) = get(addr, "/api/users/ok/chats?limit=0").await;
    assert_eq!(status, 400);
    let (status, _) = get(addr, "/api/users/ok/chats?limit=x").await;
    assert_eq!(status, 400);
    // Wrong key.
    let (status, _) = http_get(addr, "/api/chats/team/members").await;
    assert_eq!(status, 401);
    edge.shutdown().await;
}

fn sub_token(user: &str, chat: &str, exp: u64, publish: bool) -> String {
    token_for(&SubscriptionClaims {
        sub: user.into(),
        chat: chat.into(),
        exp,
        nbf: None,
        aud: None,
        iss: None,
        publish,
    })
}

#[tokio::test]
async fn subscription_tokens_grant_one_chat_to_one_user() {
    let edge = start(switchboard_edge::Config::for_secret(SECRET)).await;
    let mut ann = Raw::connected(&edge, "ann").await;
    let exp = now_secs() + 60;
    let ok = ann
        .request(
            json!({"subscribe": {"chat": "news", "token": sub_token("ann", "news", exp, false)}}),
        )
        .await;
    assert!(ok.get("subscribeResult").is_some(), "{ok}");
    // Read-only: receipts yes, publishing and typing no.
    let receipt = ann
        .request(json!({"receipt": {"chat": "news", "seq": "1", "kind": "RECEIPT_KIND_READ"}}))
        .await;
    assert!(receipt.get("ok").is_some(), "{receipt}");
    assert_eq!(code(&publish(&mut ann, "news", "1").await), 403);
    // A token that also grants publishing.
    let w = ann
        .request(
            json!({"subscribe": {"chat": "talk", "token": sub_token("ann", "talk", exp, true)}}),
        )
        .await;
    assert!(w.get("subscribeResult").is_some(), "{w}");
    assert!(
        publish(&mut ann, "talk", "1")
            .await
            .get("publishAck")
            .is_some()
    );

    let cases = [
        (sub_token("ann", "other", exp, false), "news2", 403),
        (sub_token("bob", "news2", exp, false), "news2", 403),
        (
            sub_token("ann", "news2", now_secs() - 60, false),
            "news2",
            440,
        ),
        ("not-a-jwt".to_string(), "news2", 401),
        (token("ann"), "news2", 401),
    ];
    for (t, chat, want) in cases {
        let r = ann
            .request(json!({"subscribe": {"chat": chat, "token": t}}))
            .await;
        assert_eq!(code(&r), want, "{r}");
    }
    edge.shutdown().await;
}

#[tokio::test]
async fn contacts_policy_limits_direct_messages() {
    let mut c = members_config();
    c.authz.dm = DmPolicy::Contacts;
    let edge = start(c).await;
    let mut eve = Raw::connected(&edge, "eve").await;
    let mut dan = Raw::connected(&edge, "dan").await;
    let dm = |id: &str| json!({"publish": {"user": "dan", "clientMsgId": id, "payload": b64(id)}});
    assert_eq!(code(&eve.request(dm("1")).await), 403);
    let (status, _) = post(
        edge.addr(),
        "/api/users/dan/contacts",
        &json!({"add": ["eve"]}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(eve.request(dm("2")).await.get("publishAck").is_some());
    assert_eq!(dan.deliveries(1).await.len(), 1);
    // Messaging one's own devices is always allowed.
    let own = json!({"publish": {"user": "eve", "clientMsgId": "3", "payload": b64("3")}});
    assert!(eve.request(own).await.get("publishAck").is_some());
    edge.shutdown().await;
}

#[tokio::test]
async fn a_removed_member_is_cut_off_on_another_edge_within_a_second() {
    let mut cluster = Cluster::new(1, 0).await;
    for node in ["edge-a", "edge-b"] {
        let mut c = edge_config(&cluster.nats, &cluster.redis, node);
        c.authz.mode = ChatAuthMode::Members;
        cluster.edges.push(start(c).await);
    }
    let (a, b) = (cluster.edges[0].addr(), cluster.edges[1].addr());
    // Membership through the router's API, checked by the edges.
    let router = cluster.routers[0].addr;
    let (status, body) = post(
        router,
        "/api/chats/ops/members",
        &json!({"add": ["kim", "lee"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut kim = Raw::connected_addr(b, "kim").await;
    let mut lee = Raw::connected_addr(a, "lee").await;
    let mut out = Raw::connected_addr(a, "out").await;
    assert_all_refused(&mut out, "ops").await;
    for raw in [&mut kim, &mut lee] {
        let sub = raw.request(json!({"subscribe": {"chat": "ops"}})).await;
        assert!(sub.get("subscribeResult").is_some(), "{sub}");
    }
    publish(&mut lee, "ops", "before").await;
    assert_eq!(kim.deliveries(1).await.len(), 1);

    // Removed through edge a's API; kim is on edge b.
    let removed_at = Instant::now();
    let (status, _) = post(a, "/api/chats/ops/members", &json!({"remove": ["kim"]})).await;
    assert_eq!(status, 200);
    let push = next_with(&mut kim, "unsubscribed").await;
    assert!(
        removed_at.elapsed() < Duration::from_secs(1),
        "ended after {:?}",
        removed_at.elapsed()
    );
    assert_eq!(push["unsubscribed"]["chat"], json!("ops"));
    for i in 0..5 {
        publish(&mut lee, "ops", &format!("after-{i}")).await;
    }
    kim.assert_no_delivery(Duration::from_millis(500)).await;
    assert_all_refused(&mut kim, "ops").await;
    cluster.shutdown().await;
}
