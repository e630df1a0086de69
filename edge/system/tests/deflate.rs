//! permessage-deflate against a real edge: compressing and plain sockets
//! side by side, each broadcast compressed once, small frames left plain,
//! compressed client input inflated within the limit or refused.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard_protocol::{
    Encoding,
    client::{Client, ClientConfig, DeflateStream, Event},
    deflate,
};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        client::IntoClientRequest,
        http::HeaderValue,
        protocol::frame::{
            Frame,
            coding::{Data, OpCode},
        },
    },
};

use crate::common::*;

type Ws = WebSocketStream<DeflateStream<TcpStream>>;

const SHARED: &str = r#"switchboard_edge_deflate_compressed_frames_total{kind="shared"}"#;
const INFLATED: &str = "switchboard_edge_deflate_inflated_frames_total";
const NEGOTIATED: &str = "switchboard_edge_deflate_negotiated_total";

/// A JSON socket that offers permessage-deflate (or not), reading through
/// the deflate stream; returns it and whether the edge agreed.
async fn open(edge: &switchboard_edge::Edge, offer: bool) -> (Ws, bool) {
    let mut req = ws_url(edge).into_client_request().unwrap();
    let h = req.headers_mut();
    h.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("switchboard.v1.json"),
    );
    if offer {
        h.insert(
            "Sec-WebSocket-Extensions",
            HeaderValue::from_static("permessage-deflate; client_max_window_bits"),
        );
    }
    let tcp = TcpStream::connect(edge.addr()).await.unwrap();
    let io = DeflateStream::before_upgrade(tcp, 1 << 20);
    let (ws, resp) = tokio_tungstenite::client_async(req, io).await.unwrap();
    let answer = resp
        .headers()
        .get("Sec-WebSocket-Extensions")
        .map(|v| v.to_str().unwrap().to_owned());
    let agreed = deflate::agreed(answer.as_deref()).unwrap().is_some();
    assert_eq!(agreed, ws.get_ref().is_agreed());
    (ws, agreed)
}

/// Sends a JSON request, compressed (RSV1) when `compress`.
async fn send(ws: &mut Ws, v: &Value, compress: bool) {
    let text = v.to_string();
    let msg = if compress {
        let mut f = Frame::message(
            deflate::compress(text.as_bytes()),
            OpCode::Data(Data::Text),
            true,
        );
        f.header_mut().rsv1 = true;
        Message::Frame(f)
    } else {
        Message::text(text)
    };
    ws.send(msg).await.unwrap();
}

/// Sends raw bytes as one compressed text frame.
async fn send_packed(ws: &mut Ws, packed: Vec<u8>) {
    let mut f = Frame::message(packed, OpCode::Data(Data::Text), true);
    f.header_mut().rsv1 = true;
    ws.send(Message::Frame(f)).await.unwrap();
}

/// The next JSON frame; `None` at the close.
async fn next(ws: &mut Ws) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => return None,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Sends a request and returns the reply with its id.
async fn request(ws: &mut Ws, id: u32, mut v: Value, compress: bool) -> Value {
    v["id"] = json!(id);
    send(ws, &v, compress).await;
    loop {
        let f = next(ws).await.expect("a reply");
        if f["id"] == json!(id) {
            return f;
        }
    }
}

/// The error code before the close, and the close code.
async fn refusal(ws: &mut Ws) -> (Option<u64>, Option<u16>) {
    let mut error = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if let Some(code) = v["error"]["code"].as_u64() {
                    error.get_or_insert(code);
                }
            }
            Ok(Some(Ok(Message::Close(c)))) => return (error, c.map(|c| u16::from(c.code))),
            Ok(Some(Ok(_))) => {}
            _ => return (error, None),
        }
    }
}

fn delivery_payloads(frames: &[Value]) -> Vec<Vec<u8>> {
    frames
        .iter()
        .map(|d| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(d["payload"].as_str().unwrap_or_default())
                .unwrap()
        })
        .collect()
}

/// Reads `n` deliveries (their `delivery` objects).
async fn deliveries(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = next(ws).await.expect("a delivery");
        if let Some(d) = f.get("delivery") {
            out.push(d.clone());
        }
    }
    out
}

#[tokio::test]
async fn compressing_and_plain_sockets_get_the_same_payloads_compressed_once() {
    let mut cfg = config();
    cfg.deflate_min_bytes = 300;
    let edge = start(cfg).await;
    let addr = edge.addr();
    // Messages of both sizes: a small one's frame stays under 300 bytes in
    // both encodings, a large one's is over it.
    let payloads: Vec<Bytes> = (0..12)
        .map(|i| {
            if i % 3 == 0 {
                Bytes::from(format!("short {i}"))
            } else {
                Bytes::from(format!(
                    "{{\"text\":\"message {i}: {}\"}}",
                    "words and more words ".repeat(40)
                ))
            }
        })
        .collect();
    let large = payloads.iter().filter(|p| p.len() > 100).count() as f64;

    // JSON sockets through the deflate stream: two compressing, one plain.
    let mut json = Vec::new();
    for (i, offer) in [true, true, false].into_iter().enumerate() {
        let (mut ws, agreed) = open(&edge, offer).await;
        assert_eq!(agreed, offer);
        let r = request(
            &mut ws,
            1,
            json!({"connect": {"token": token(&format!("j{i}"))}}),
            false,
        )
        .await;
        assert!(r.get("connectResult").is_some(), "{r}");
        let r = request(&mut ws, 2, json!({"subscribe": {"chat": "mix"}}), false).await;
        assert!(r.get("subscribeResult").is_some(), "{r}");
        json.push(ws);
    }
    // Protobuf sockets of the Rust client: three compressing, one plain.
    let mut clients = Vec::new();
    for (i, offer) in [true, true, true, false].into_iter().enumerate() {
        let mut c = ClientConfig::new(ws_url(&edge), token(&format!("p{i}")));
        c.deflate = offer;
        let (client, events) = Client::connect(c).await.unwrap();
        client.subscribe("mix").await.unwrap();
        clients.push((client, events));
    }
    let inflated_before: Vec<u64> = json
        .iter()
        .map(|ws| ws.get_ref().inflated_messages())
        .collect();
    let (shared, inflated) = (metric(addr, SHARED).await, metric(addr, INFLATED).await);
    assert!(metric(addr, NEGOTIATED).await >= 5.0);

    // The first compressing client publishes: its long publishes go
    // compressed, and the edge inflates them.
    for (i, p) in payloads.iter().enumerate() {
        clients[0]
            .0
            .publish_chat("mix", &format!("m{i}"), p.clone())
            .await
            .unwrap();
    }
    let n = payloads.len();
    let want: Vec<Vec<u8>> = payloads.iter().map(|p| p.to_vec()).collect();
    for ws in &mut json {
        let got = deliveries(ws, n).await;
        assert_eq!(delivery_payloads(&got), want);
    }
    for (_, events) in &mut clients {
        let mut got = Vec::new();
        while got.len() < n {
            match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
                Ok(Some(Event::Delivery(d))) => got.push(d.payload.to_vec()),
                Ok(Some(_)) => {}
                other => panic!("deliveries stopped: {other:?}"),
            }
        }
        assert_eq!(got, want);
    }
    // Large frames went compressed to the compressing sockets, small ones
    // plain, and nothing compressed to the plain socket.
    let inflated_now: Vec<u64> = json
        .iter()
        .map(|ws| ws.get_ref().inflated_messages())
        .collect();
    let per_socket: Vec<u64> = inflated_now
        .iter()
        .zip(&inflated_before)
        .map(|(a, b)| a - b)
        .collect();
    assert_eq!(per_socket, vec![large as u64, large as u64, 0]);
    // Once per message and encoding (JSON, protobuf), not per socket (5
    // compressing sockets).
    assert_eq!(metric(addr, SHARED).await - shared, 2.0 * large);
    assert_eq!(
        metric(addr, INFLATED).await - inflated,
        large,
        "the long publishes"
    );
    for (client, _) in clients {
        client.close().await;
    }
    edge.shutdown().await;
}

#[tokio::test]
async fn compressed_input_is_inflated_within_the_limit_or_refused() {
    let mut cfg = config();
    cfg.max_frame_bytes = 4096;
    cfg.max_payload_bytes = 2048;
    let edge = start(cfg).await;

    // A compressed Connect (browsers compress everything) and publish.
    let (mut ws, agreed) = open(&edge, true).await;
    assert!(agreed);
    let r = request(&mut ws, 1, json!({"connect": {"token": token("z")}}), true).await;
    assert!(r.get("connectResult").is_some(), "{r}");
    let r = request(
        &mut ws,
        2,
        json!({"publish": {"chat": "z", "clientMsgId": "a", "payload": b64(&"hello ".repeat(200))}}),
        true,
    )
    .await;
    assert!(r.get("publishAck").is_some(), "{r}");

    // A bomb: under the 4 KiB limit as sent, 512 KiB once inflated.
    let bomb = deflate::compress(&vec![b' '; 512 << 10]);
    assert!(bomb.len() < 4096, "{} bytes", bomb.len());
    send_packed(&mut ws, bomb).await;
    assert_eq!(refusal(&mut ws).await, (Some(413), Some(4502)));

    // Not DEFLATE.
    let (mut ws, _) = open(&edge, true).await;
    request(&mut ws, 1, json!({"connect": {"token": token("z")}}), false).await;
    send_packed(&mut ws, vec![0xff, 0xff, 0xff, 0xff]).await;
    assert_eq!(refusal(&mut ws).await, (Some(400), Some(4500)));

    // Inflated but not UTF-8, in a text frame.
    let (mut ws, _) = open(&edge, true).await;
    request(&mut ws, 1, json!({"connect": {"token": token("z")}}), false).await;
    send_packed(&mut ws, deflate::compress(b"{\"id\":2,\xff}")).await;
    assert_eq!(refusal(&mut ws).await, (Some(400), Some(4500)));

    // A compressed Connect that is a bomb never gets a session.
    let (mut ws, _) = open(&edge, true).await;
    send_packed(&mut ws, deflate::compress(&vec![b'{'; 100_000])).await;
    assert_eq!(refusal(&mut ws).await, (Some(413), Some(4502)));

    // RSV1 without having agreed to deflate is a protocol violation.
    let (mut ws, agreed) = open(&edge, false).await;
    assert!(!agreed);
    request(&mut ws, 1, json!({"connect": {"token": token("z")}}), false).await;
    send(&mut ws, &json!({"id": 2, "ping": {}}), true).await;
    assert_eq!(refusal(&mut ws).await, (Some(400), Some(4500)));
    edge.shutdown().await;
}

#[tokio::test]
async fn with_deflate_off_every_offer_is_declined() {
    let mut cfg = config();
    cfg.deflate = false;
    let edge = start(cfg).await;
    let negotiated = metric(edge.addr(), NEGOTIATED).await;
    let (mut ws, agreed) = open(&edge, true).await;
    assert!(!agreed);
    request(&mut ws, 1, json!({"connect": {"token": token("o")}}), false).await;
    send(&mut ws, &json!({"id": 2, "ping": {}}), true).await;
    assert_eq!(refusal(&mut ws).await, (Some(400), Some(4500)));
    // The Rust client offering it works on, uncompressed.
    let mut c = ClientConfig::new(ws_url(&edge), token("o"));
    c.deflate = true;
    c.encoding = Encoding::Json;
    let (client, _events) = Client::connect(c).await.unwrap();
    client
        .publish_chat("o", "m", Bytes::from("x".repeat(2000)))
        .await
        .unwrap();
    assert_eq!(metric(edge.addr(), NEGOTIATED).await, negotiated);
    client.close().await;
    edge.shutdown().await;
}
