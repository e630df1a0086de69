//! Hostile and broken input, limits and backpressure.

use std::time::Duration;

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::{
    Message,
    protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    },
};

/// Reads to the close and returns (first error code, close code).
async fn error_and_close(raw: &mut Raw) -> (Option<u64>, Option<u16>) {
    let (close, frames) = raw.until_close().await;
    let code = frames
        .iter()
        .find_map(|f| f.get("error"))
        .and_then(|e| e["code"].as_u64());
    (code, close)
}

#[tokio::test]
async fn malformed_frames_get_an_error_and_a_close() {
    let edge = start(config()).await;

    let mut raw = Raw::connected(&edge, "m").await;
    raw.ws.send(Message::text("{not json")).await.unwrap();
    assert_eq!(error_and_close(&mut raw).await, (Some(400), Some(4500)));

    let mut raw = Raw::connected(&edge, "m").await;
    raw.ws
        .send(Message::binary(vec![0xff, 0x00, 0x13]))
        .await
        .unwrap();
    assert_eq!(error_and_close(&mut raw).await, (Some(400), Some(4500)));

    let mut raw = Raw::connected(&edge, "m").await;
    let bad_utf8 = Frame::message(vec![b'{', 0xc3, 0x28, b'}'], OpCode::Data(Data::Text), true);
    raw.ws.send(Message::Frame(bad_utf8)).await.unwrap();
    assert_eq!(error_and_close(&mut raw).await.1, Some(4500));

    // Anything but Connect first.
    let mut raw = Raw::open(&edge, "switchboard.v1.json").await;
    raw.send(json!({"id": 1, "subscribe": {"chat": "x"}})).await;
    assert_eq!(error_and_close(&mut raw).await, (Some(400), Some(4500)));

    // A frame with no request is refused but not fatal.
    let mut raw = Raw::connected(&edge, "m").await;
    let r = raw.request(json!({})).await;
    assert_eq!(r["error"]["code"], 400, "{r}");
    let r = raw.request(json!({"ping": {}})).await;
    assert!(r.get("pong").is_some(), "{r}");
    edge.shutdown().await;
}

#[tokio::test]
async fn oversized_frames_are_refused() {
    let mut cfg = config();
    cfg.max_frame_bytes = 1024;
    cfg.max_payload_bytes = 512;
    let edge = start(cfg).await;

    let mut raw = Raw::connected(&edge, "big").await;
    // Under the frame limit but over the payload limit: an error, not a close.
    let r = raw
        .request(
            json!({"publish": {"chat": "c", "clientMsgId": "m", "payload": b64(&"x".repeat(600))}}),
        )
        .await;
    assert_eq!(r["error"]["code"], 413, "{r}");
    raw.send(json!({"id": 9, "publish": {"chat": "c", "clientMsgId": "m", "payload": b64(&"x".repeat(4000))}}))
        .await;
    assert_eq!(error_and_close(&mut raw).await, (Some(413), Some(4502)));
    edge.shutdown().await;
}

#[tokio::test]
async fn ids_unsafe_for_subjects_are_refused() {
    let edge = start(config()).await;
    let mut raw = Raw::connected(&edge, "ids").await;
    for chat in ["a.b", "*", ">", "with space", "", &"x".repeat(65)] {
        let r = raw.request(json!({"subscribe": {"chat": chat}})).await;
        assert_eq!(r["error"]["code"], 422, "{chat:?}: {r}");
    }
    let r = raw
        .request(json!({"publish": {"user": "a>b", "clientMsgId": "m", "payload": ""}}))
        .await;
    assert_eq!(r["error"]["code"], 422, "{r}");
    let r = raw
        .request(json!({"publish": {"chat": "ok", "clientMsgId": "bad id", "payload": ""}}))
        .await;
    assert_eq!(r["error"]["code"], 422, "{r}");
    let r = raw
        .request(json!({"watchPresence": {"users": ["ok", "x.*"]}}))
        .await;
    assert_eq!(r["error"]["code"], 422, "{r}");
    // Double subscribe and unknown unsubscribe have their own codes.
    raw.request(json!({"subscribe": {"chat": "ok"}})).await;
    let r = raw.request(json!({"subscribe": {"chat": "ok"}})).await;
    assert_eq!(r["error"]["code"], 409, "{r}");
    let r = raw.request(json!({"unsubscribe": {"chat": "never"}})).await;
    assert_eq!(r["error"]["code"], 404, "{r}");
    edge.shutdown().await;
}

#[tokio::test]
async fn subscription_count_is_limited() {
    let mut cfg = config();
    cfg.max_subscriptions_per_connection = 3;
    let edge = start(cfg).await;
    let mut raw = Raw::connected(&edge, "many").await;
    for i in 0..3 {
        let r = raw
            .request(json!({"subscribe": {"chat": format!("c{i}")}}))
            .await;
        assert!(r.get("subscribeResult").is_some(), "{r}");
    }
    let r = raw.request(json!({"subscribe": {"chat": "c3"}})).await;
    assert_eq!(r["error"]["code"], 429, "{r}");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_reader_is_disconnected_while_others_keep_receiving() {
    let mut cfg = config();
    cfg.send_queue_max_bytes = 512 * 1024;
    let edge = start(cfg).await;
    // A small, fixed receive buffer: the kernel cannot absorb the burst.
    let (mut slow, _) = Raw::with_rcvbuf(edge.addr(), "slow", 64 * 1024).await;
    slow.request(json!({"subscribe": {"chat": "flood"}})).await;
    let mut fast = Raw::connected(&edge, "fast").await;
    fast.request(json!({"subscribe": {"chat": "flood"}})).await;
    let mut publisher = Raw::connected(&edge, "pub").await;

    // ~18 MB of deliveries: more than the kernel buffers for the slow
    // reader, which reads nothing until its queue overflowed. It reads
    // again at once, so it is told why (4001) although its socket was full
    // when the edge gave up on it.
    let body = b64(&"y".repeat(30_000));
    let total = 600u64;
    let fast_reader = tokio::spawn(async move {
        let mut last = 0;
        while last < total {
            match fast.next_within(Duration::from_secs(10)).await {
                Some(v) => {
                    if let Some(d) = v.get("delivery") {
                        assert_eq!(seq(d), last + 1, "fast reader saw a gap");
                        last = seq(d);
                    }
                }
                None => break,
            }
        }
        last
    });
    let addr = edge.addr();
    let slow_reader = tokio::spawn(async move {
        let drops = r#"switchboard_edge_queue_drops_total{reason="slow_consumer"}"#;
        while metric(addr, drops).await < 1.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut frames = Vec::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), slow.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    frames.push(serde_json::from_str::<serde_json::Value>(&t).unwrap())
                }
                Ok(Some(Ok(Message::Close(c)))) => {
                    return (c.map(|c| close_code(c.code)), frames);
                }
                Ok(Some(Ok(_))) => {}
                other => panic!("no close frame: {other:?}"),
            }
        }
    });
    for i in 0..total {
        let ack = publisher
            .request(json!({"publish": {"chat": "flood", "clientMsgId": format!("m{i}"), "payload": body}}))
            .await;
        assert!(ack.get("publishAck").is_some(), "{ack}");
    }
    assert_eq!(
        fast_reader.await.unwrap(),
        total,
        "the fast reader got everything"
    );
    let (close, frames) = slow_reader.await.unwrap();
    assert_eq!(close, Some(4001), "slow reader closed as slow_consumer");
    let delivered = frames
        .iter()
        .filter(|f| f.get("delivery").is_some())
        .count();
    assert!((delivered as u64) < total, "it fell behind: {delivered}");
    let disconnect = frames
        .iter()
        .find_map(|f| f.get("disconnect"))
        .expect("disconnect frame");
    assert_eq!(disconnect["reason"], "slow_consumer");
    assert_eq!(disconnect["reconnect"], true);
    assert!(
        disconnect["reconnectDelayMs"].as_u64().unwrap_or(0) > 0,
        "told to wait: {disconnect}"
    );
    edge.shutdown().await;
}

#[tokio::test]
async fn over_capacity_upgrades_get_503_with_retry_after() {
    let mut cfg = config();
    cfg.max_connections = 2;
    let edge = start(cfg).await;
    let _a = Raw::connected(&edge, "a").await;
    let _b = Raw::connected(&edge, "b").await;
    match tokio_tungstenite::connect_async(ws_url(&edge)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            let retry: u32 = resp.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=5).contains(&retry));
        }
        other => panic!("expected 503, got {other:?}"),
    }
    drop(_a);
    // The slot frees once the socket is gone.
    let mut ok = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if tokio_tungstenite::connect_async(ws_url(&edge))
            .await
            .is_ok()
        {
            ok = true;
            break;
        }
    }
    assert!(ok, "capacity was not released");
    edge.shutdown().await;
}

#[tokio::test]
async fn silent_sockets_time_out() {
    // Never sends Connect.
    let mut cfg = config();
    cfg.handshake_timeout = Duration::from_millis(300);
    let edge = start(cfg).await;
    let mut raw = Raw::open(&edge, "switchboard.v1.json").await;
    assert_eq!(error_and_close(&mut raw).await.1, Some(4006));
    edge.shutdown().await;

    // Connects, then stops reading (so pings go unanswered).
    let mut cfg = config();
    cfg.heartbeat_interval = Duration::from_millis(200);
    let edge = start(cfg).await;
    let mut raw = Raw::connected(&edge, "sleepy").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (close, frames) = raw.until_close().await;
    assert_eq!(close, Some(4002), "{frames:?}");
    edge.shutdown().await;
}

#[tokio::test]
async fn unknown_subprotocol_is_refused_and_none_means_json() {
    let edge = start(config()).await;
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue};
    let mut req = ws_url(&edge).into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 400),
        other => panic!("expected 400, got {other:?}"),
    }
    let (ws, _) = tokio_tungstenite::connect_async(ws_url(&edge))
        .await
        .unwrap();
    Raw::new(ws).connect_as("plain").await;
    edge.shutdown().await;
}

#[tokio::test]
async fn a_publish_flood_is_refused_then_closed_while_others_publish() {
    let mut cfg = config();
    cfg.rate_publish = switchboard_edge::Rate {
        per_sec: 1.0,
        burst: 3.0,
    };
    let edge = start(cfg).await;
    let mut flooder = Raw::connected(&edge, "flooder").await;
    let mut calm = Raw::connected(&edge, "calm").await;
    // The burst goes through; the rest is refused with 429 and not stored.
    let mut acked = 0;
    let mut limited = 0;
    for i in 0..10 {
        let r = flooder
            .request(json!({"publish": {"chat": "room", "clientMsgId": format!("f{i}"), "payload": b64("x")}}))
            .await;
        if r.get("publishAck").is_some() {
            acked += 1;
        } else {
            assert_eq!(r["error"]["code"], 429, "{r}");
            limited += 1;
        }
    }
    assert_eq!((acked, limited), (3, 7));
    // Other requests still work, and another socket is not affected.
    let r = flooder.request(json!({"ping": {}})).await;
    assert!(r.get("pong").is_some(), "{r}");
    let r = calm
        .request(json!({"publish": {"chat": "room", "clientMsgId": "c1", "payload": b64("x")}}))
        .await;
    assert_eq!(
        r["publishAck"]["seq"], "4",
        "only the burst was stored: {r}"
    );
    // Publishing on into the limit is a flood: the socket is closed (4003).
    for i in 0..200 {
        flooder
            .send(json!({"id": 100 + i, "publish": {"chat": "room", "clientMsgId": format!("g{i}"), "payload": b64("x")}}))
            .await;
    }
    let (code, close) = error_and_close(&mut flooder).await;
    assert_eq!((code, close), (Some(429), Some(4003)));
    edge.shutdown().await;
}

#[tokio::test]
async fn every_refused_request_gets_its_id_back_and_a_flood_is_told_to_wait() {
    let mut cfg = config();
    cfg.rate_requests = switchboard_edge::Rate {
        per_sec: 0.01,
        burst: 3.0,
    };
    let edge = start(cfg).await;
    let mut raw = Raw::connected(&edge, "flooder").await;
    // 3 within the burst, then 100 refusals in a row (the last one closes
    // the socket), then more that are never read.
    let sent = 3 + 100 + 20;
    for id in 1..=sent {
        raw.send(json!({"id": id, "ping": {}})).await;
    }
    let (close, frames) = raw.until_close().await;
    assert_eq!(close, Some(4003), "{frames:?}");
    let ids = |kind: &str| -> Vec<u64> {
        frames
            .iter()
            .filter(|f| f.get(kind).is_some())
            .map(|f| f["id"].as_u64().unwrap_or(0))
            .collect()
    };
    assert_eq!(ids("pong"), (1..=3).collect::<Vec<_>>());
    // Every refusal answers its own request, the 100th (the flood) too.
    assert_eq!(ids("error"), (4..=103).collect::<Vec<_>>());
    assert!(
        frames
            .iter()
            .filter_map(|f| f.get("error"))
            .all(|e| e["code"] == 429),
        "{frames:?}"
    );
    let d = frames
        .iter()
        .find_map(|f| f.get("disconnect"))
        .expect("disconnect frame");
    assert_eq!(d["reason"], "rate_limited");
    assert_eq!(d["reconnect"], true);
    // A flooding client is not told to come back at once.
    let delay = d["reconnectDelayMs"].as_u64().unwrap_or(0);
    assert!(delay >= 1000, "reconnectDelayMs {delay}");
    edge.shutdown().await;
}

#[tokio::test]
async fn a_websocket_ping_flood_gets_no_more_pongs_and_is_closed() {
    let mut cfg = config();
    cfg.rate_requests = switchboard_edge::Rate {
        per_sec: 1.0,
        burst: 5.0,
    };
    let edge = start(cfg).await;
    let mut raw = Raw::connected(&edge, "pinger").await;
    for _ in 0..300 {
        raw.ws.send(Message::Ping(vec![1].into())).await.unwrap();
    }
    let mut pongs = 0;
    let close = loop {
        match tokio::time::timeout(
            Duration::from_secs(5),
            futures_util::StreamExt::next(&mut raw.ws),
        )
        .await
        {
            Ok(Some(Ok(Message::Pong(_)))) => pongs += 1,
            Ok(Some(Ok(Message::Close(c)))) => break c.map(|c| close_code(c.code)),
            Ok(Some(Ok(_))) => {}
            other => panic!("no close: {other:?}"),
        }
    };
    assert_eq!(close, Some(4003));
    assert!(pongs <= 6, "pongs only within the limit, got {pongs}");
    edge.shutdown().await;
}

#[tokio::test]
async fn handshakes_over_the_limit_get_503_until_one_finishes() {
    let mut cfg = config();
    cfg.max_handshakes = 2;
    cfg.handshake_timeout = Duration::from_secs(2);
    let edge = start(cfg).await;
    // Two upgrades that have not sent Connect hold both handshake slots.
    let mut first = Raw::open(&edge, "switchboard.v1.json").await;
    let _second = Raw::open(&edge, "switchboard.v1.json").await;
    use tokio_tungstenite::tungstenite::Error;
    match tokio_tungstenite::connect_async(ws_url(&edge)).await {
        Err(Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            assert!(resp.headers().contains_key("retry-after"), "{resp:?}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    // Once a handshake completes, its slot is free again.
    let r = first
        .request(json!({"connect": {"token": token("first")}}))
        .await;
    assert!(r.get("connectResult").is_some(), "{r}");
    let mut third = Raw::connected(&edge, "third").await;
    let r = third.request(json!({"ping": {}})).await;
    assert!(r.get("pong").is_some(), "{r}");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_new_sockets_over_the_accept_rate_gets_503_with_retry_after() {
    let mut cfg = config();
    cfg.accept_rate = switchboard_edge::Rate {
        per_sec: 5.0,
        burst: 20.0,
    };
    cfg.handshake_timeout = Duration::from_secs(2);
    let edge = start(cfg).await;
    let url = ws_url(&edge);
    let attempts: Vec<_> = (0..60)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { tokio_tungstenite::connect_async(url).await })
        })
        .collect();
    let (mut opened, mut refused) = (0, 0);
    let mut sockets = Vec::new();
    for a in attempts {
        match a.await.unwrap() {
            Ok((ws, _)) => {
                opened += 1;
                sockets.push(ws);
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 503);
                let after: u64 = resp.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=5).contains(&after), "Retry-After {after}");
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // The burst, plus what refilled while the attempts ran.
    assert!((20..=30).contains(&opened), "opened {opened}");
    assert_eq!(opened + refused, 60);
    // The refused come back after Retry-After and get in.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut late = Raw::connected(&edge, "late").await;
    let r = late.request(json!({"ping": {}})).await;
    assert!(r.get("pong").is_some(), "{r}");
    edge.shutdown().await;
}
