//! Peers that stop reading: a socket whose writes make no progress is
//! reset (its kernel buffers come back at once), counted, and its slot,
//! presence and gauge are given back; the others keep receiving.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::common::*;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// A receive buffer small enough that the window fills after a few frames.
const SMALL_RCVBUF: u32 = 4096;

/// A JSON socket with a small receive window, connected as `user` and
/// subscribed to `chat`; it reads nothing unless told to. Returns it with
/// its local port (the edge's end of it is `(edge port, this)`).
async fn small_window(addr: SocketAddr, user: &str, chat: &str) -> (Raw, u16) {
    let (mut raw, port) = Raw::with_rcvbuf(addr, user, SMALL_RCVBUF).await;
    let r = raw.request(json!({"subscribe": {"chat": chat}})).await;
    assert!(r.get("subscribeResult").is_some(), "{r}");
    (raw, port)
}

/// Sends a pong every 200 ms and reads nothing, so the edge hears from
/// the socket (no heartbeat timeout) while its window stays full. Ends when
/// cancelled or once the edge is gone.
fn keep_talking(mut raw: Raw, stop: CancellationToken) -> JoinHandle<Raw> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return raw,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            if raw.ws.send(Message::Pong(Vec::new().into())).await.is_err() {
                return raw;
            }
        }
    })
}

/// Reads every frame, answering pings, and sends a ping request every
/// 300 ms so the edge never finds it silent; collects deliveries until
/// cancelled.
fn busy(raw: Raw, stop: CancellationToken) -> JoinHandle<Vec<Value>> {
    busy_until(raw, stop, 0)
}

/// `busy`, stopping only once it also has `until` deliveries.
fn busy_until(mut raw: Raw, stop: CancellationToken, until: usize) -> JoinHandle<Vec<Value>> {
    tokio::spawn(async move {
        let mut deliveries = Vec::new();
        let mut next_ping = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_ping {
                let id = raw.next_id;
                raw.next_id += 1;
                raw.send(json!({"id": id, "ping": {}})).await;
                next_ping += Duration::from_millis(300);
            }
            tokio::select! {
                _ = stop.cancelled(), if deliveries.len() >= until => return deliveries,
                v = raw.next_within(Duration::from_millis(100)) => {
                    if let Some(d) = v.as_ref().and_then(|v| v.get("delivery")) {
                        deliveries.push(d.clone());
                    }
                }
            }
        }
    })
}

/// Waits (at most `within`) until `series` on the edge's /metrics reaches
/// `at_least`; returns when it did.
async fn metric_reaches(
    edge: SocketAddr,
    series: &str,
    at_least: f64,
    within: Duration,
) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        if metric(edge, series).await >= at_least {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed below {at_least} for {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn publish_all(publisher: &mut Raw, chat: &str, ids: std::ops::Range<u64>, bytes: usize) {
    let body = b64(&"s".repeat(bytes));
    for i in ids {
        let ack = publisher
            .request(
                json!({"publish": {"chat": chat, "clientMsgId": format!("m{i}"), "payload": body}}),
            )
            .await;
        assert!(ack.get("publishAck").is_some(), "{ack}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_that_stops_is_reset_within_two_heartbeats_and_its_slot_reused() {
    let heartbeat = Duration::from_secs(1);
    let mut cfg = config();
    cfg.heartbeat_interval = heartbeat;
    cfg.max_connections = 3;
    // Room in the mailbox: only the stall check can close the socket.
    cfg.send_queue_max_bytes = 64 << 20;
    cfg.send_queue_max_frames = 100_000;
    let edge = start(cfg).await;
    let (stalled, port) = small_window(edge.addr(), "stalled", "room").await;
    let mut fast = Raw::connected(&edge, "fast").await;
    fast.request(json!({"subscribe": {"chat": "room"}})).await;
    let mut publisher = Raw::connected(&edge, "pub").await;
    assert!(
        tokio_tungstenite::connect_async(ws_url(&edge))
            .await
            .is_err(),
        "the cap is reached"
    );
    let stop = CancellationToken::new();
    let stalled = keep_talking(stalled, stop.clone());
    let total: u64 = 300;
    // Stops only once it has every message: on a loaded box the 9 MB
    // may still be on their way to it when the checks below are done.
    let fast = busy_until(fast, stop.clone(), total as usize);
    let watched = watch(edge.addr().port(), port, Duration::from_secs(30));

    // 9 MB: beyond what the kernel buffers for the stalled socket (the
    // edge's send buffer grows to 4 MiB), so the edge's own write waits.
    publish_all(&mut publisher, "room", 0..total, 30_000).await;
    let publisher = busy(publisher, stop.clone());

    metric_reaches(
        edge.addr(),
        r#"switchboard_edge_disconnects_total{reason="slow_consumer"}"#,
        1.0,
        Duration::from_secs(20),
    )
    .await;
    let resets = r#"switchboard_edge_socket_resets_total{reason="write_stalled"}"#;
    assert_eq!(metric(edge.addr(), resets).await, 1.0);
    // Given up on within two heartbeat intervals of the last byte it took
    // (and not before one), then reset: the kernel keeps nothing for it.
    let w = watched.await.unwrap();
    assert!(w.most > 0, "the edge held unsent bytes for it");
    let stalled_for = w.gone - w.last_change;
    assert!(
        heartbeat / 2 <= stalled_for && stalled_for <= 2 * heartbeat + Duration::from_millis(500),
        "reset {stalled_for:?} after its last progress"
    );
    reset_by_the_edge(edge.addr().port(), port, Duration::from_secs(2)).await;

    // The gauge, the slot and the presence session come back.
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(edge.addr(), "switchboard_edge_connections").await != 2.0 {
        assert!(Instant::now() < deadline, "the gauge did not come down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut late = Raw::connected(&edge, "late").await;
    let r = late
        .request(json!({"watchPresence": {"users": ["stalled"]}}))
        .await;
    assert!(r.get("ok").is_some(), "{r}");
    let presence = late.next().await.unwrap();
    assert_eq!(presence["presence"]["user"], "stalled", "{presence}");
    assert!(
        presence["presence"].get("online").is_none(),
        "offline once released: {presence}"
    );

    stop.cancel();
    let deliveries = tokio::time::timeout(Duration::from_secs(30), fast)
        .await
        .expect("the fast reader gets all 300 within 30 s")
        .unwrap();
    let seqs: Vec<u64> = deliveries.iter().map(seq).collect();
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "the fast reader got everything, in order"
    );
    publisher.await.unwrap();
    drop(stalled.await.unwrap());
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_mailbox_closes_a_stopped_reader_while_its_write_waits() {
    let mut cfg = config();
    // The stall check is far away: the mailbox closes it.
    cfg.heartbeat_interval = Duration::from_secs(60);
    cfg.send_queue_max_bytes = 256 * 1024;
    let edge = start(cfg).await;
    let (stalled, port) = small_window(edge.addr(), "stopped", "burst").await;
    let mut publisher = Raw::connected(&edge, "pub").await;
    // 9 MB: the kernel's buffers fill, then the 256 KiB mailbox.
    publish_all(&mut publisher, "burst", 0..300, 30_000).await;
    let published = Instant::now();
    // The overflow is acted on while the write waits; its Disconnect and
    // close frame cannot go out, so the socket is reset after
    // CLOSE_WRITE_TIMEOUT (2 s).
    let closed = metric_reaches(
        edge.addr(),
        r#"switchboard_edge_disconnects_total{reason="slow_consumer"}"#,
        1.0,
        Duration::from_secs(10),
    )
    .await;
    assert!(
        closed - published <= Duration::from_secs(3),
        "{:?}",
        closed - published
    );
    let resets = r#"switchboard_edge_socket_resets_total{reason="close_unwritten"}"#;
    assert_eq!(metric(edge.addr(), resets).await, 1.0);
    reset_by_the_edge(edge.addr().port(), port, Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(edge.addr(), "switchboard_edge_connections").await != 1.0 {
        assert!(Instant::now() < deadline, "the gauge did not come down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stalled);
    edge.shutdown().await;
}

/// `POST /api/kick` for `user`.
async fn kick(edge: SocketAddr, key: &str, user: &str) {
    let body = json!({ "user": user }).to_string();
    let mut s = TcpStream::connect(edge).await.unwrap();
    let req = format!(
        "POST /api/kick HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_stops_reading_during_the_close_handshake_is_released() {
    let heartbeat = Duration::from_secs(1);
    let mut cfg = config();
    cfg.heartbeat_interval = heartbeat;
    cfg.api_key = Some("k3y".into());
    let edge = start(cfg).await;
    let (quiet, port) = small_window(edge.addr(), "quiet", "c").await;
    let stop = CancellationToken::new();
    let quiet = keep_talking(quiet, stop.clone());
    // Deliveries fill its window, then wait in the edge's send buffer
    // (far more than its kernel could squeeze in).
    let mut publisher = Raw::connected(&edge, "pub").await;
    let edge_port = edge.addr().port();
    let mut i = 0;
    while tcp_end(edge_port, port).is_none_or(|(_, queued)| queued < 256 * 1024) {
        publish_all(&mut publisher, "c", i..i + 1, 16_000).await;
        i += 1;
        assert!(i < 200, "the window never filled");
    }
    // From here it answers nothing: its close frame never comes back.
    stop.cancel();
    let quiet = quiet.await.unwrap();
    kick(edge.addr(), "k3y", "quiet").await;
    let kicked = Instant::now();
    // The Disconnect and close frame fit in the send buffer; the linger
    // (1 s) waits for an answer that does not come.
    let closed = metric_reaches(
        edge.addr(),
        r#"switchboard_edge_disconnects_total{reason="kicked"}"#,
        1.0,
        Duration::from_secs(5),
    )
    .await;
    assert!(
        closed - kicked <= Duration::from_secs(2),
        "{:?}",
        closed - kicked
    );
    // Closed in order, its bytes are still queued, and the kernel drops
    // them once none is taken for the stall limit (one heartbeat
    // interval, probed with backoff), not after minutes of retries.
    let deadline = kicked + Duration::from_secs(8);
    while let Some(end) = tcp_end(edge_port, port) {
        assert!(Instant::now() < deadline, "still held: {end:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(quiet);
    edge.shutdown().await;
}
