//! SIGTERM drains the real binary: sockets get a Disconnect with jittered
//! reconnect advice, /readyz fails, and the process exits within the grace.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::*;
use serde_json::json;

#[tokio::test]
async fn sigterm_drains_and_exits_in_time() {
    let port = free_port();
    let mut child = Command::new(EDGE_BIN)
        .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .env("SWITCHBOARD_SHUTDOWN_GRACE_MS", "4000")
        .env("SWITCHBOARD_DRAIN_BATCH_SIZE", "2")
        .env("SWITCHBOARD_RECONNECT_JITTER_MAX_MS", "3000")
        .env("SWITCHBOARD_MAX_CONNECTIONS", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let mut clients = Vec::new();
    for i in 0..5 {
        let ws = loop {
            match tokio_tungstenite::connect_async(url.as_str()).await {
                Ok((ws, _)) => break ws,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let mut raw = Raw {
            ws,
            next_id: 1,
            skipped: Default::default(),
        };
        let r = raw
            .request(json!({"connect": {"token": token(&format!("u{i}"))}}))
            .await;
        assert!(r.get("connectResult").is_some());
        clients.push(raw);
    }

    let started = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut delays = Vec::new();
    for c in &mut clients {
        let (close, frames) = c.until_close().await;
        assert_eq!(close, Some(4000));
        let d = frames
            .iter()
            .find_map(|f| f.get("disconnect"))
            .expect("disconnect frame")
            .clone();
        assert_eq!(d["reason"], "shutdown");
        assert_eq!(d["reconnect"], true);
        let delay = d["reconnectDelayMs"].as_u64().unwrap_or(0);
        assert!(delay < 3000);
        delays.push(delay);
    }
    delays.sort_unstable();
    delays.dedup();
    assert!(delays.len() > 1, "reconnect advice is jittered: {delays:?}");
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(6),
            "edge did not exit within the grace period"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "clean exit: {status}");
}

/// A socket whose handshake is still open when the drain starts (upgraded,
/// Connect not yet sent) missed the drain's list of sockets: when it
/// connects it is told to go at once with the same advice, rather than
/// holding the edge open until the grace runs out.
#[tokio::test]
async fn a_handshake_finishing_during_the_drain_is_drained_too() {
    let port = free_port();
    let mut child = Command::new(EDGE_BIN)
        .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .env("SWITCHBOARD_SHUTDOWN_GRACE_MS", "20000")
        .env("SWITCHBOARD_RECONNECT_JITTER_MAX_MS", "1000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, "edge").await;
    // Upgraded, but Connect comes only after the drain has begun.
    let mut late = Raw::open_addr(addr, "switchboard.v1.json").await;
    let started = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    late.send(json!({"id": 1, "connect": {"token": token("late")}}))
        .await;
    let (close, frames) = late.until_close().await;
    assert_eq!(close, Some(4000), "{frames:?}");
    let d = frames
        .iter()
        .find_map(|f| f.get("disconnect"))
        .expect("disconnect frame");
    assert_eq!(d["reason"], "shutdown");
    // Its only socket gone, the edge exits long before the 20 s grace.
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "edge waited for the late socket"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "clean exit: {status}");
}
