//! WSS with rustls on the real binary: a TLS client connects, the
//! certificate is replaced on disk and SIGHUP makes new handshakes use it,
//! while the socket opened before keeps working.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A TLS client that trusts only `ca`.
fn connector(ca: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(fixture(ca)).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Wss =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn wss(port: u16, ca: &str) -> Result<Wss, String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").unwrap();
    let tls = connector(ca)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let url = format!("wss://localhost:{port}/ws");
    let (ws, _) = tokio_tungstenite::client_async(url, tls)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

async fn request(ws: &mut Wss, v: Value) -> Value {
    ws.send(Message::text(v.to_string())).await.unwrap();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a reply")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = m {
            let reply: Value = serde_json::from_str(&t).unwrap();
            if reply["id"] == v["id"] {
                return reply;
            }
        }
    }
}

/// `GET path` over TLS: the response, headers and body.
async fn https_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = connector("tls_ca_a.pem").connect(name, tcp).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    // The server closes without close_notify at times: keep what was read.
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn edge_with_tls(dir: &Path, port: u16) -> Child {
    Command::new(EDGE_BIN)
        .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .env("SWITCHBOARD_TLS_CERT_FILE", dir.join("cert.pem"))
        .env("SWITCHBOARD_TLS_KEY_FILE", dir.join("key.pem"))
        .env("SWITCHBOARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn install(dir: &Path, which: &str) {
    // Written aside and renamed, as deployment tools replace files.
    for (from, to) in [
        (format!("tls_cert_{which}.pem"), "cert.pem"),
        (format!("tls_key_{which}.pem"), "key.pem"),
    ] {
        let tmp = dir.join(format!("{to}.new"));
        std::fs::copy(fixture(&from), &tmp).unwrap();
        std::fs::rename(&tmp, dir.join(to)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_serves_and_a_sighup_swaps_the_certificate_without_dropping_sockets() {
    let dir = std::env::temp_dir().join(format!("sb-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    install(&dir, "a");
    let port = free_port();
    let mut child = edge_with_tls(&dir, port);
    let mut first = loop {
        match wss(port, "tls_ca_a.pem").await {
            Ok(ws) => break ws,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let hello = request(
        &mut first,
        json!({"id": 1, "connect": {"token": token("tess")}}),
    )
    .await;
    assert_eq!(hello["connectResult"]["user"], "tess", "{hello}");
    // Plain WebSocket on a WSS port does not get through.
    assert!(
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
            .await
            .is_err()
    );

    // A broken certificate file is refused at reload; the old one stays.
    std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
    let pid = child.id().to_string();
    let hup = || {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    hup();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        wss(port, "tls_ca_a.pem").await.is_ok(),
        "kept the working certificate"
    );

    install(&dir, "b");
    hup();
    let mut switched = false;
    for _ in 0..50 {
        if wss(port, "tls_ca_b.pem").await.is_ok() {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(switched, "new handshakes use the new certificate");
    assert!(
        wss(port, "tls_ca_a.pem").await.is_err(),
        "the old certificate is no longer served"
    );
    // The socket from before the reload still works.
    let pong = request(&mut first, json!({"id": 2, "ping": {}})).await;
    assert!(pong.get("pong").is_some(), "{pong}");

    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The edge binary over WSS gives up on a reader that stopped: its TLS
/// socket is reset like a plain one (the stream under TLS is found again
/// after the upgrade), within two heartbeat intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wss_reader_that_stops_is_reset() {
    let dir = std::env::temp_dir().join(format!("sb-tls-stall-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    install(&dir, "a");
    let port = free_port();
    let mut child = Command::new(EDGE_BIN)
        .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .env("SWITCHBOARD_TLS_CERT_FILE", dir.join("cert.pem"))
        .env("SWITCHBOARD_TLS_KEY_FILE", dir.join("key.pem"))
        .env("SWITCHBOARD_HEARTBEAT_INTERVAL_MS", "1000")
        .env("SWITCHBOARD_CHAT_AUTH", "open")
        // Only the stall check may close it, not its mailbox.
        .env("SWITCHBOARD_SEND_QUEUE_MAX_BYTES", "67108864")
        .env("SWITCHBOARD_SEND_QUEUE_MAX_FRAMES", "100000")
        .env("SWITCHBOARD_RATE_PUBLISH_PER_SEC", "100000")
        .env("SWITCHBOARD_RATE_PUBLISH_BURST", "100000")
        .env("SWITCHBOARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut publisher = loop {
        match wss(port, "tls_ca_a.pem").await {
            Ok(ws) => break ws,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    request(
        &mut publisher,
        json!({"id": 1, "connect": {"token": token("pub")}}),
    )
    .await;

    // A small receive buffer, so its window fills after a few frames.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(([127, 0, 0, 1], port).into()).await.unwrap();
    let client_port = tcp.local_addr().unwrap().port();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = connector("tls_ca_a.pem").connect(name, tcp).await.unwrap();
    let url = format!("wss://localhost:{port}/ws");
    let (mut stalled, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    let r = request(
        &mut stalled,
        json!({"id": 1, "connect": {"token": token("stalled")}}),
    )
    .await;
    assert!(r.get("connectResult").is_some(), "{r}");
    request(
        &mut stalled,
        json!({"id": 2, "subscribe": {"chat": "room"}}),
    )
    .await;
    // From here it reads nothing, but keeps talking (no heartbeat timeout).
    let talking = tokio::spawn(async move {
        while stalled.send(Message::Pong(Vec::new().into())).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        stalled
    });
    let watched = watch(port, client_port, Duration::from_secs(30));
    // 9 MB: more than the kernel buffers for it, so the edge's write waits.
    let body = b64(&"s".repeat(30_000));
    for i in 0..300 {
        let ack = request(
            &mut publisher,
            json!({"id": 10 + i, "publish": {"chat": "room", "clientMsgId": format!("m{i}"), "payload": body}}),
        )
        .await;
        assert!(ack.get("publishAck").is_some(), "{ack}");
    }
    let w = watched.await.unwrap();
    assert!(w.most > 0, "the edge held unsent bytes for it");
    let stalled_for = w.gone - w.last_change;
    assert!(
        stalled_for <= Duration::from_millis(2500),
        "reset {stalled_for:?} after its last progress (heartbeat 1 s)"
    );
    reset_by_the_edge(port, client_port, Duration::from_secs(2)).await;
    drop(talking.await.unwrap());
    let metrics = https_get(port, "/metrics").await;
    for series in [
        r#"switchboard_edge_disconnects_total{reason="slow_consumer"} 1"#,
        r#"switchboard_edge_socket_resets_total{reason="write_stalled"} 1"#,
    ] {
        assert!(metrics.contains(series), "{series} not in /metrics");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An edge on WSS with certificate `a`, chats open to anyone.
fn open_edge_with_tls(dir: &Path, port: u16) -> Child {
    Command::new(EDGE_BIN)
        .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .env("SWITCHBOARD_CHAT_AUTH", "open")
        .env("SWITCHBOARD_TLS_CERT_FILE", dir.join("cert.pem"))
        .env("SWITCHBOARD_TLS_KEY_FILE", dir.join("key.pem"))
        .env("SWITCHBOARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_dials_wss_trusting_a_custom_ca() {
    use switchboard_protocol::client::{Client, ClientConfig, ClientError, Event, tls};
    let dir = std::env::temp_dir().join(format!("sb-tls-client-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    install(&dir, "a");
    let port = free_port();
    let mut child = open_edge_with_tls(&dir, port);
    wait_listening(([127, 0, 0, 1], port).into(), "wss edge").await;
    let url = format!("wss://localhost:{port}/ws");
    let ca = |name: &str| tls::custom_ca(&std::fs::read(fixture(name)).unwrap()).unwrap();
    let config = |tls| ClientConfig {
        tls,
        reconnect: false,
        ..ClientConfig::new(url.clone(), token("wanda"))
    };

    let (client, mut events) = Client::connect(config(Some(ca("tls_ca_a.pem"))))
        .await
        .expect("wss with the edge's CA");
    client.subscribe("wss-room").await.unwrap();
    let ack = client
        .publish_chat("wss-room", "w-1", "over tls")
        .await
        .unwrap();
    let delivered = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(Event::Delivery(d)) = events.recv().await {
                return d;
            }
        }
    })
    .await
    .expect("a delivery over wss");
    assert_eq!(
        (delivered.seq, &delivered.payload[..]),
        (ack.seq, &b"over tls"[..])
    );
    client.close().await;

    // Another CA's certificate, and a test CA under the default webpki
    // roots, are refused in the handshake.
    for tls in [Some(ca("tls_ca_b.pem")), None] {
        let refused = Client::connect(config(tls)).await.unwrap_err();
        assert!(matches!(refused, ClientError::Io(_)), "{refused:?}");
    }
    // A CA file without certificates is a TLS setup error.
    assert!(matches!(tls::custom_ca(b""), Err(ClientError::Tls(_))));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
