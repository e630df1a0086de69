//! The HTTP surface next to /ws: health, metrics, publish API, dev pages.

use std::time::Duration;

use crate::common::*;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A minimal HTTP/1.1 request (no client crate needed): (status, body).
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let edge = start(config()).await;
    assert_eq!(http(edge.addr(), "GET", "/healthz", &[], "").await.0, 200);
    assert_eq!(http(edge.addr(), "GET", "/readyz", &[], "").await.0, 200);
    let mut raw = Raw::connected(&edge, "metered").await;
    raw.request(json!({"subscribe": {"chat": "m"}})).await;
    raw.request(json!({"publish": {"chat": "m", "clientMsgId": "1", "payload": b64("x")}}))
        .await;
    raw.deliveries(1).await;
    let (status, body) = http(edge.addr(), "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    for name in [
        "switchboard_edge_connections ",
        "switchboard_edge_connections_max ",
        "switchboard_edge_connections_opened_total",
        "switchboard_edge_disconnects_total{reason=\"slow_consumer\"}",
        "switchboard_edge_received_frames_total",
        "switchboard_edge_received_bytes_total",
        "switchboard_edge_sent_frames_total",
        "switchboard_edge_sent_bytes_total",
        "switchboard_edge_deliveries_total",
        "switchboard_edge_queue_drops_total",
        "switchboard_edge_delivery_latency_seconds_bucket",
        "switchboard_router_publishes_total",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}");
    }
    assert_eq!(http(edge.addr(), "GET", "/nope", &[], "").await.0, 404);
    edge.shutdown().await;
}

/// Every hop of a message's path (`switchboard_hop_seconds{hop}`) is
/// counted once per message on a standalone edge, which runs them all.
#[tokio::test]
async fn every_hop_of_a_publish_is_timed_once_per_message() {
    const MESSAGES: usize = 5;
    let edge = start(config()).await;
    let (_, before) = http(edge.addr(), "GET", "/metrics", &[], "").await;
    for hop in HOPS {
        // Registered at zero: the dashboard shows 0, not "no data".
        assert!(
            hop_count(&before, hop).is_some(),
            "no {hop} hop before traffic"
        );
    }
    let mut raw = Raw::connected(&edge, "hopper").await;
    raw.request(json!({"subscribe": {"chat": "hops"}})).await;
    for i in 0..MESSAGES {
        let ack = raw
            .request(json!({"publish": {"chat": "hops", "clientMsgId": i.to_string(), "payload": b64("x")}}))
            .await;
        assert!(ack.get("publishAck").is_some(), "{ack}");
    }
    assert_eq!(raw.deliveries(MESSAGES).await.len(), MESSAGES);
    wait_for_hops(edge.addr(), &HOPS, MESSAGES).await;
    edge.shutdown().await;
}

#[tokio::test]
async fn backend_publish_api() {
    let mut cfg = config();
    cfg.api_key = Some("k3y".into());
    let edge = start(cfg).await;
    let mut user = Raw::connected(&edge, "ivan").await;
    user.request(json!({"subscribe": {"chat": "news"}})).await;

    let body = json!({"chat": "news", "client_msg_id": "n1", "text": "breaking"}).to_string();
    assert_eq!(
        http(edge.addr(), "POST", "/api/publish", &[], &body)
            .await
            .0,
        401
    );
    assert_eq!(
        http(
            edge.addr(),
            "POST",
            "/api/publish",
            &[("Authorization", "Bearer wrong")],
            &body
        )
        .await
        .0,
        401
    );
    let auth = [("Authorization", "Bearer k3y")];
    let (status, reply) = http(edge.addr(), "POST", "/api/publish", &auth, &body).await;
    assert_eq!(status, 200, "{reply}");
    let reply: Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["seq"], 1);
    let d = user.deliveries(1).await;
    assert_eq!(payload_text(&d[0]), "breaking");
    assert_eq!(d[0]["sender"], "backend");

    // A personal message by base64 payload, then the error cases.
    let dm = json!({"user": "ivan", "client_msg_id": "n2", "payload": b64("for you"), "sender": "billing"}).to_string();
    assert_eq!(
        http(edge.addr(), "POST", "/api/publish", &auth, &dm)
            .await
            .0,
        200
    );
    let d = user.deliveries(1).await;
    assert_eq!(
        (payload_text(&d[0]).as_str(), d[0]["sender"].as_str()),
        ("for you", Some("billing"))
    );
    let bad_id = json!({"chat": "a.b", "client_msg_id": "n3", "text": "x"}).to_string();
    assert_eq!(
        http(edge.addr(), "POST", "/api/publish", &auth, &bad_id)
            .await
            .0,
        422
    );
    assert_eq!(
        http(edge.addr(), "POST", "/api/publish", &auth, "{")
            .await
            .0,
        400
    );
    let both = json!({"chat": "a", "user": "b", "client_msg_id": "n4", "text": "x"}).to_string();
    assert_eq!(
        http(edge.addr(), "POST", "/api/publish", &auth, &both)
            .await
            .0,
        400
    );
    let huge = json!({"chat": "a", "client_msg_id": "n5", "text": "x".repeat(100_000)}).to_string();
    assert_eq!(
        http(edge.addr(), "POST", "/api/publish", &auth, &huge)
            .await
            .0,
        413
    );
    edge.shutdown().await;
}

/// Presence in bulk and a stream's history, for backends (the same calls
/// as gRPC's Presence and History).
#[tokio::test]
async fn presence_and_history_api() {
    let mut cfg = config();
    cfg.api_key = Some("k3y".into());
    let edge = start(cfg).await;
    let auth = [("Authorization", "Bearer k3y")];
    let mut olga = Raw::connected(&edge, "olga").await;
    for i in 1..=3 {
        let body =
            json!({"chat": "log", "client_msg_id": format!("l{i}"), "text": format!("m{i}")});
        let (s, b) = http(
            edge.addr(),
            "POST",
            "/api/publish",
            &auth,
            &body.to_string(),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    let ask = json!({"users": ["olga", "nobody"]}).to_string();
    let (s, b) = http(edge.addr(), "POST", "/api/presence", &auth, &ask).await;
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["users"][0]["user"], "olga");
    assert_eq!(v["users"][0]["online"], true);
    assert_eq!(v["users"][0]["devices"], 1);
    assert_eq!(v["users"][1]["online"], false);

    let read = json!({"chat": "log", "after_seq": 1, "limit": 1}).to_string();
    let (s, b) = http(edge.addr(), "POST", "/api/history", &auth, &read).await;
    assert_eq!(s, 200, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["stream"], "chat:log");
    assert_eq!(v["seq"], 3);
    assert_eq!(v["more"], true);
    assert_eq!(v["resync_required"], false);
    assert_eq!(v["messages"][0]["seq"], 2);
    assert_eq!(v["messages"][0]["client_msg_id"], "l2");
    assert_eq!(payload_text(&v["messages"][0]), "m2");

    for (body, status) in [
        (json!({"chat": "log", "limit": 0}), 400),
        (json!({"chat": "log", "since": 1}), 400),
        (json!({"chat": "log", "user": "olga"}), 400),
        (json!({"users": "olga"}), 400),
    ] {
        let path = if body.get("users").is_some() {
            "/api/presence"
        } else {
            "/api/history"
        };
        let (s, b) = http(edge.addr(), "POST", path, &auth, &body.to_string()).await;
        assert_eq!(s, status, "{body}: {b}");
    }
    let r = olga.request(json!({"ping": {}})).await;
    assert!(r.get("pong").is_some(), "{r}");
    edge.shutdown().await;
}

#[tokio::test]
async fn dev_endpoints_only_in_dev_mode() {
    let edge = start(config()).await;
    assert_eq!(http(edge.addr(), "GET", "/", &[], "").await.0, 404);
    assert_eq!(
        http(edge.addr(), "GET", "/dev/token?user=x", &[], "")
            .await
            .0,
        404
    );
    edge.shutdown().await;

    let mut cfg = config();
    cfg.dev = true;
    let edge = start(cfg).await;
    let (status, page) = http(edge.addr(), "GET", "/", &[], "").await;
    assert_eq!(status, 200);
    assert!(page.contains("DEV"), "demo page is marked as dev-only");
    let (status, body) = http(edge.addr(), "GET", "/dev/token?user=zoe", &[], "").await;
    assert_eq!(status, 200);
    let tok: Value = serde_json::from_str(&body).unwrap();
    let mut raw = Raw::open(&edge, "switchboard.v1.json").await;
    let r = raw
        .request(json!({"connect": {"token": tok["token"]}}))
        .await;
    assert_eq!(r["connectResult"]["user"], "zoe");
    assert_eq!(
        http(edge.addr(), "GET", "/dev/token?user=a.b", &[], "")
            .await
            .0,
        422
    );
    edge.shutdown().await;
}

#[tokio::test]
async fn kick_closes_a_users_sockets_or_one_session_with_4503() {
    let mut cfg = config();
    cfg.api_key = Some("k3y".into());
    let edge = start(cfg).await;
    let auth = [("Authorization", "Bearer k3y")];
    let mut phone = Raw::connected(&edge, "mallory").await;
    let mut laptop = Raw::open(&edge, "switchboard.v1.json").await;
    let hello = laptop
        .request(json!({"connect": {"token": token("mallory")}}))
        .await;
    let laptop_session = hello["connectResult"]["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut bystander = Raw::connected(&edge, "trent").await;

    // Bad requests are refused with typed statuses and kick nobody.
    for (headers, body, status) in [
        (&[][..], json!({"user": "mallory"}).to_string(), 401),
        (&auth[..], json!({"user": "a.b"}).to_string(), 422),
        (
            &auth[..],
            json!({"user": "mallory", "session": "*"}).to_string(),
            422,
        ),
        (&auth[..], json!({"who": "mallory"}).to_string(), 400),
    ] {
        let (s, b) = http(edge.addr(), "POST", "/api/kick", headers, &body).await;
        assert_eq!(s, status, "{body}: {b}");
    }

    // One session: only the laptop goes.
    let body = json!({"user": "mallory", "session": laptop_session}).to_string();
    let (s, b) = http(edge.addr(), "POST", "/api/kick", &auth, &body).await;
    assert_eq!(s, 200, "{b}");
    let (close, frames) = laptop.until_close().await;
    assert_eq!(close, Some(4503));
    assert!(
        frames.iter().any(|f| f["disconnect"]["reason"] == "kicked"),
        "told why: {frames:?}"
    );
    let r = phone.request(json!({"ping": {}})).await;
    assert!(r.get("pong").is_some(), "the other session stays: {r}");

    // The whole user: every remaining socket of theirs, nobody else's.
    let body = json!({"user": "mallory"}).to_string();
    let (s, b) = http(edge.addr(), "POST", "/api/kick", &auth, &body).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(phone.until_close().await.0, Some(4503));
    let r = bystander.request(json!({"ping": {}})).await;
    assert!(r.get("pong").is_some(), "{r}");
    edge.shutdown().await;
}

/// Edges and routers answer the endpoints they share with one
/// implementation (`switchboard_node::http`): the same status and body.
#[tokio::test]
async fn edge_and_router_answer_the_shared_endpoints_alike() {
    use crate::common::cluster::{API_KEY, Cluster};
    let c = Cluster::new(1, 1).await;
    let (edge, router) = (c.edges[0].addr(), c.routers[0].addr);
    let auth = format!("Bearer {API_KEY}");
    let key = [("Authorization", auth.as_str())];
    let wrong = [("Authorization", "Bearer wrong")];
    // (method, path, headers, body)
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 14] = [
        ("GET", "/healthz", &[], ""),
        ("GET", "/readyz", &[], ""),
        ("GET", "/no-such-path", &[], ""),
        ("POST", "/api/publish", &[], "{}"),
        ("POST", "/api/publish", &wrong, "{}"),
        ("POST", "/api/publish", &key, "not json"),
        (
            "POST",
            "/api/publish",
            &key,
            r#"{"chat":"a.b","client_msg_id":"m1","text":"hi"}"#,
        ),
        ("POST", "/api/kick", &[], "{}"),
        ("POST", "/api/kick", &key, r#"{"user":"a b"}"#),
        ("POST", "/api/kick", &key, r#"{"user":"nobody"}"#),
        ("POST", "/api/presence", &key, r#"{"users":["a b"]}"#),
        ("POST", "/api/presence", &key, r#"{"users":["nobody"]}"#),
        ("POST", "/api/history", &key, r#"{"chat":"a.b"}"#),
        ("POST", "/api/history", &[], r#"{"chat":"c"}"#),
    ];
    for (method, path, headers, body) in cases {
        let from_edge = http(edge, method, path, headers, body).await;
        let from_router = http(router, method, path, headers, body).await;
        assert_eq!(from_edge, from_router, "{method} {path} {body}");
    }
    // A stored publish: the same answer but for its seq and time.
    let publish =
        |id: &'static str| format!(r#"{{"chat":"alike","client_msg_id":"{id}","text":"hi"}}"#);
    let (s1, b1) = http(edge, "POST", "/api/publish", &key, &publish("e")).await;
    let (s2, b2) = http(router, "POST", "/api/publish", &key, &publish("r")).await;
    assert_eq!((s1, s2), (200, 200), "{b1} {b2}");
    let (v1, v2): (Value, Value) = (
        serde_json::from_str(&b1).unwrap(),
        serde_json::from_str(&b2).unwrap(),
    );
    assert_eq!(v1["stream"], v2["stream"]);
    assert_eq!((v1["seq"].as_u64(), v2["seq"].as_u64()), (Some(1), Some(2)));
    assert_eq!(
        (&v1["duplicate"], &v2["duplicate"]),
        (&json!(false), &json!(false))
    );
}

#[tokio::test]
async fn a_socket_is_refused_on_a_connection_the_probes_went_to() {
    // The probes and the API are served on the control runtime's thread;
    // a keep-alive connection that started there cannot become a socket.
    let edge = start(config()).await;
    let mut s = TcpStream::connect(edge.addr()).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Protocol: switchboard.v1.json\r\n\r\n",
    )
    .await
    .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    drop(s);
    // A fresh connection upgrades as ever.
    Raw::connected(&edge, "fresh").await;
    edge.shutdown().await;
}
