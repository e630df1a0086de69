//! The bundled Rust client against a real edge: requests, events,
//! de-duplication, and reconnect-with-resume after a slow-consumer close.

use std::time::Duration;

use crate::common::*;
use bytes::Bytes;
use switchboard_protocol::{
    Encoding,
    client::{Client, ClientConfig, ClientError, Event},
};

fn cfg(edge: &switchboard_edge::Edge, user: &str) -> ClientConfig {
    ClientConfig::new(ws_url(edge), token(user))
}

#[tokio::test]
async fn requests_events_and_errors() {
    let edge = start(config()).await;
    for encoding in [Encoding::Protobuf, Encoding::Json] {
        let mut a_cfg = cfg(&edge, "alice");
        a_cfg.encoding = encoding;
        let (alice, mut alice_events) = Client::connect(a_cfg).await.unwrap();
        let (bob, _bob_events) = Client::connect(cfg(&edge, "bob")).await.unwrap();
        assert_eq!(alice.session().await.user, "alice");
        alice.subscribe("room").await.unwrap();
        let ack = bob
            .publish_chat(
                "room",
                &format!("m-{encoding:?}"),
                Bytes::from_static(b"hi"),
            )
            .await
            .unwrap();
        let again = bob
            .publish_chat(
                "room",
                &format!("m-{encoding:?}"),
                Bytes::from_static(b"hi"),
            )
            .await
            .unwrap();
        assert!(again.duplicate);
        assert_eq!(ack.seq, again.seq);
        match tokio::time::timeout(Duration::from_secs(5), alice_events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Delivery(d) => {
                assert_eq!(
                    (d.seq, d.sender.as_str(), &d.payload[..]),
                    (ack.seq, "bob", &b"hi"[..])
                );
            }
            other => panic!("expected a delivery, got {other:?}"),
        }
        match alice.subscribe("bad.id").await {
            Err(ClientError::Server { code: 422, .. }) => {}
            other => panic!("expected 422, got {other:?}"),
        }
        assert!(alice.ping().await.unwrap().server_time_ms > 0);
        alice.close().await;
        bob.close().await;
    }
    edge.shutdown().await;
}

#[tokio::test]
async fn refused_token_is_a_typed_error() {
    let edge = start(config()).await;
    let mut c = claims("x");
    c.exp = now_secs() - 100;
    match Client::connect(ClientConfig::new(ws_url(&edge), token_for(&c))).await {
        Err(ClientError::Server { code: 440, .. }) => {}
        Err(other) => panic!("expected 440, got {other}"),
        Ok(_) => panic!("expired token accepted"),
    }
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_consumer_reconnects_and_resumes_without_loss_or_duplicates() {
    let mut config = config();
    config.send_queue_max_bytes = 256 * 1024;
    let edge = start(config).await;
    let mut reader_cfg = cfg(&edge, "reader");
    // The app does not read events for a while: the client stops reading
    // the socket, the edge's queue overflows and it closes the socket.
    reader_cfg.event_capacity = 4;
    reader_cfg.backoff_base = Duration::from_millis(20);
    let (reader, mut events) = Client::connect(reader_cfg).await.unwrap();
    reader.subscribe("burst").await.unwrap();
    let (writer, _w) = Client::connect(cfg(&edge, "writer")).await.unwrap();
    let total = 600u64;
    let body = Bytes::from(vec![b'z'; 30_000]);
    for i in 0..total {
        let ack = writer
            .publish_chat("burst", &format!("b{i}"), body.clone())
            .await
            .unwrap();
        assert_eq!(ack.seq, i + 1);
    }
    let mut next = 1;
    let mut disconnected: Option<Option<u16>> = None;
    let mut reconnected = false;
    while next <= total {
        let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
            .await
            .unwrap_or_else(|_| panic!("events stalled at seq {next}, disconnected={disconnected:?} reconnected={reconnected}"))
            .expect("client stopped");
        match event {
            Event::Delivery(d) => {
                assert_eq!(d.seq, next, "deliveries arrive once, in order");
                next += 1;
            }
            Event::Disconnected {
                code, reconnect, ..
            } => {
                assert!(reconnect);
                disconnected = Some(code);
            }
            Event::Reconnected { .. } => reconnected = true,
            Event::ResyncRequired { .. } => panic!("history still holds everything"),
            _ => {}
        }
    }
    // The edge gave up on it as a slow consumer. The app had stopped reading
    // for longer than the edge waits to write its close (2 s), so the
    // client found its socket reset rather than reading the 4001.
    let code = disconnected.expect("disconnected");
    assert!(matches!(code, Some(4001) | None), "{code:?}");
    let closes = r#"switchboard_edge_disconnects_total{reason="slow_consumer"}"#;
    assert_eq!(metric(edge.addr(), closes).await, 1.0);
    assert!(reconnected);
    edge.shutdown().await;
}
