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
