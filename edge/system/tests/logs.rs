//! Structured logs: a real edge process with `--log-format json` writes
//! one JSON object per line with the stable fields, and no token, key or
//! secret it handled, at the most verbose level, whatever its clients
//! did: connects with a good and a forged token, API calls with the key
//! and a wrong one, admin calls, a drain on SIGTERM.
use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};

use crate::common::*;

const API_KEY: &str = "known-api-key-7f3a";
const ADMIN_KEY: &str = "known-admin-key-91c2";
const WRONG_KEY: &str = "wrong-key-d00d";

/// One request on a connection of its own with `Authorization: Bearer
/// <key>`; the status.
async fn call(addr: SocketAddr, method: &str, path: &str, key: &str, body: &Value) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out[9..12].parse().unwrap()
}

#[tokio::test]
async fn json_logs_parse_line_by_line_and_hold_no_secret() {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(EDGE_BIN)
        .args(["--log-format", "json", "--log", "trace"])
        .env("SWITCHBOARD_LISTEN", addr.to_string())
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .env("SWITCHBOARD_API_KEY", API_KEY)
        .env("SWITCHBOARD_ADMIN_KEY", ADMIN_KEY)
        .env("SWITCHBOARD_NODE_ID", "logged")
        .env("SWITCHBOARD_SHUTDOWN_GRACE_MS", "2000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(addr, "edge").await;

    // A good token, and one signed with another secret.
    let good = token("alice");
    let mut alice = Raw::open_addr(addr, "switchboard.v1.json").await;
    let reply = alice.request(json!({"connect": {"token": good}})).await;
    assert!(reply.get("connectResult").is_some(), "{reply}");
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims("mallory"),
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret"),
    )
    .unwrap();
    let mut mallory = Raw::open_addr(addr, "switchboard.v1.json").await;
    mallory
        .send(json!({"id": 1, "connect": {"token": forged}}))
        .await;
    let _ = mallory.until_close().await;
    // A token in the query string, as some clients send it.
    let _ = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={good}")).await;

    // The API with its key and with a wrong one; the admin API likewise.
    let publish = json!({"chat": "room", "client_msg_id": "1", "text": "hello"});
    assert_eq!(
        call(addr, "POST", "/api/publish", API_KEY, &publish).await,
        200
    );
    assert_eq!(
        call(addr, "POST", "/api/publish", WRONG_KEY, &publish).await,
        401
    );
    let kick = json!({"user": "alice"});
    assert_eq!(
        call(addr, "POST", "/admin/kick", ADMIN_KEY, &kick).await,
        200
    );
    assert_eq!(
        call(addr, "GET", "/admin/edges", ADMIN_KEY, &json!({})).await,
        200
    );
    assert_eq!(
        call(addr, "GET", "/admin/edges", API_KEY, &json!({})).await,
        401
    );
    let _ = alice.until_close().await;
    // Counted, by call and result (the metrics hold no key either).
    let (_, metrics) = http_get(addr, "/metrics").await;
    for series in [
        r#"switchboard_admin_requests_total{call="kick",result="ok"} 1"#,
        r#"switchboard_admin_requests_total{call="edges",result="ok"} 1"#,
        r#"switchboard_admin_requests_total{call="edges",result="unauthorized"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == series),
            "{series} not on /metrics"
        );
    }

    // A drain on SIGTERM, logged to the end.
    let _bob = Raw::connected_addr(addr, "bob").await;
    let out = stop(child).await;
    let text = json_lines(
        out,
        &[
            "switchboard edge listening",
            "shutdown signal received",
            "draining",
            "edge stopped",
        ],
    );
    // A token's claims and signature; its header is the same for every
    // HS256 token, not a secret.
    let mut parts = good.split('.').skip(1);
    let (payload, signature) = (parts.next().unwrap(), parts.next().unwrap());
    for secret in [
        good.as_str(),
        forged.as_str(),
        payload,
        signature,
        API_KEY,
        ADMIN_KEY,
        WRONG_KEY,
        SECRET,
    ] {
        assert!(!text.contains(secret), "{secret:?} logged: {text}");
    }
}

/// The stderr of a stopped process, whose every line must be a JSON
/// object with the stable fields (stdout stays empty); the `wanted`
/// messages must be among them.
fn json_lines(out: std::process::Output, wanted: &[&str]) -> String {
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "stdout is empty");
    let text = String::from_utf8(out.stderr).unwrap();
    let mut messages = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        for field in ["timestamp", "level", "target"] {
            assert!(v[field].is_string(), "no {field}: {line}");
        }
        if let Some(m) = v["message"].as_str() {
            messages.push(m.to_owned());
        }
    }
    for wanted in wanted {
        assert!(
            messages.iter().any(|m| m == wanted),
            "{wanted:?} not logged: {text}"
        );
    }
    text
}

/// Stops a child with SIGTERM and collects its output (at most 20 s).
async fn stop(child: std::process::Child) -> std::process::Output {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    .expect("the process stops")
    .unwrap()
    .unwrap();
    assert_eq!(out.status.code(), Some(0));
    out
}

#[tokio::test]
async fn a_routers_json_logs_parse_line_by_line_and_hold_no_key() {
    let (nats, redis) = (
        switchboard_testkit::Server::nats(),
        switchboard_testkit::Server::redis(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(ROUTER_BIN)
        .args(["--log-format", "json", "--log", "trace"])
        .env("SWITCHBOARD_ROUTER_LISTEN", addr.to_string())
        .env("SWITCHBOARD_NATS_URL", nats.url())
        .env("SWITCHBOARD_REDIS_URL", redis.url())
        .env("SWITCHBOARD_API_KEY", API_KEY)
        .env("SWITCHBOARD_ADMIN_KEY", ADMIN_KEY)
        .env("SWITCHBOARD_NODE_ID", "router-logged")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(addr, "router").await;
    let publish = json!({"chat": "room", "client_msg_id": "1", "text": "hello"});
    assert_eq!(
        call(addr, "POST", "/api/publish", API_KEY, &publish).await,
        200
    );
    assert_eq!(
        call(addr, "POST", "/api/publish", WRONG_KEY, &publish).await,
        401
    );
    let kick = json!({"user": "alice"});
    assert_eq!(
        call(addr, "POST", "/admin/kick", ADMIN_KEY, &kick).await,
        200
    );
    assert_eq!(
        call(addr, "POST", "/admin/kick", WRONG_KEY, &kick).await,
        401
    );
    let out = stop(child).await;
    let text = json_lines(
        out,
        &["switchboard router serving", "shutdown signal received"],
    );
    for secret in [API_KEY, ADMIN_KEY, WRONG_KEY] {
        assert!(!text.contains(secret), "{secret:?} logged: {text}");
    }
}

/// A failure after logging began is a JSON line too (the port is taken).
#[tokio::test]
async fn a_failure_to_start_is_a_json_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = Command::new(EDGE_BIN)
        .args(["--log-format", "json"])
        .env("SWITCHBOARD_LISTEN", addr.to_string())
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let text = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let last = lines.last().expect("a line");
    assert_eq!(last["level"], "ERROR", "{text}");
    assert_eq!(last["process"], "switchboard-edge", "{text}");
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .starts_with(&format!("cannot listen on {addr}")),
        "{text}"
    );
    assert!(!text.contains(SECRET));
}
