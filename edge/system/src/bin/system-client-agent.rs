//! The Rust client behind the client conformance suite
//! (protocol/js/conformance): one `switchboard_protocol::client::Client`
//! driven over stdin/stdout, one JSON object a line.
//!
//! In: `{"id":N,"op":"connect"|"subscribe"|...,"args":{...}}`, the same ops
//! and arguments as the TypeScript side (`conformance/agent.mjs`). Out: a
//! reply per request, `{"id":N,"ok":...}` or `{"id":N,"err":{"kind",
//! "code","retryAfterMs","message"}}`, and each client event as
//! `{"event":{"type":...}}`, normalised as `agent.mjs` normalises the
//! TypeScript SDK's.
use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};
use switchboard_protocol::{
    Encoding,
    client::{Client, ClientConfig, ClientError, Event, StreamId, full_jitter_delay, tls},
    v1::ReceiptKind,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    sync::{Mutex, mpsc},
};

/// How often a publish is retried (same client message id) on a
/// retryable error: what an app does with the Rust client, and what the
/// TypeScript SDK does by itself.
const PUBLISH_RETRIES: u32 = 5;

type Out = mpsc::UnboundedSender<Value>;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (out, mut lines) = mpsc::unbounded_channel::<Value>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(v) = lines.recv().await {
            let mut line = v.to_string();
            line.push('\n');
            if stdout.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            let _ = stdout.flush().await;
        }
    });
    let client: Arc<Mutex<Option<Client>>> = Arc::default();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = stdin.next_line().await {
        let Ok(request) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let id = request["id"].clone();
        let op = request["op"].as_str().unwrap_or_default().to_owned();
        let args = request["args"].clone();
        let (out, client) = (out.clone(), client.clone());
        // Each request on its own task: a publish waiting out a retry must
        // not hold up the next request.
        tokio::spawn(async move {
            let reply = if op == "connect" {
                connect(&args, &client, &out).await
            } else {
                let handle = client.lock().await.clone();
                match handle {
                    Some(c) => call(&c, &op, &args).await,
                    None => Err(json!({"kind": "clientClosed", "message": "not connected"})),
                }
            };
            let _ = out.send(match reply {
                Ok(v) => json!({"id": id, "ok": v}),
                Err(e) => json!({"id": id, "err": e}),
            });
        });
    }
    drop(out);
    let _ = writer.await;
}

fn millis(v: &Value, default: u64) -> Duration {
    Duration::from_millis(v.as_u64().unwrap_or(default))
}

async fn connect(args: &Value, slot: &Mutex<Option<Client>>, out: &Out) -> Result<Value, Value> {
    let urls: Vec<String> = args["urls"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|u| u.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let Some((url, fallbacks)) = urls.split_first() else {
        return Err(json!({"kind": "protocol", "message": "no url"}));
    };
    // wss:// to a test CA's certificate: trust that CA only.
    let tls = match args["caFile"].as_str() {
        Some(file) => {
            let pem = std::fs::read(file)
                .map_err(|e| json!({"kind": "protocol", "message": format!("{file}: {e}")}))?;
            Some(tls::custom_ca(&pem).map_err(error)?)
        }
        None => None,
    };
    let config = ClientConfig {
        tls,
        fallback_urls: fallbacks.to_vec(),
        encoding: if args["encoding"] == "json" {
            Encoding::Json
        } else {
            Encoding::Protobuf
        },
        backoff_base: millis(&args["backoffBaseMs"], 100),
        backoff_max: millis(&args["backoffMaxMs"], 2000),
        request_timeout: millis(&args["requestTimeoutMs"], 5000),
        user_since: args["userSince"].as_u64(),
        user_epoch: args["userEpoch"].as_str().unwrap_or_default().into(),
        ..ClientConfig::new(url.as_str(), args["token"].as_str().unwrap_or_default())
    };
    let (client, mut events) = Client::connect(config).await.map_err(error)?;
    let session = client.session().await;
    *slot.lock().await = Some(client);
    let out = out.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let _ = out.send(json!({ "event": event_json(event) }));
        }
    });
    Ok(json!({"user": session.user, "node": session.node}))
}

fn target_chat(args: &Value) -> Option<&str> {
    args["chat"].as_str()
}

async fn call(client: &Client, op: &str, args: &Value) -> Result<Value, Value> {
    let s = |k: &str| args[k].as_str().unwrap_or_default().to_owned();
    match op {
        "subscribe" => {
            let chat = s("chat");
            let result = match args["since"].as_u64() {
                Some(since) => client.subscribe_since(&chat, since, &s("epoch")).await,
                None => client.subscribe(&chat).await,
            }
            .map_err(error)?;
            let p = result.position.unwrap_or_default();
            Ok(
                json!({"seq": p.seq, "epoch": p.epoch, "recovered": p.recovered, "resyncRequired": p.resync_required}),
            )
        }
        "unsubscribe" => client
            .unsubscribe(&s("chat"))
            .await
            .map(|()| Value::Null)
            .map_err(error),
        "publish" => {
            let (text, id) = (s("text"), s("clientMsgId"));
            let mut attempt = 0;
            loop {
                let sent = match target_chat(args) {
                    Some(chat) => client.publish_chat(chat, &id, text.clone()).await,
                    None => client.publish_user(&s("user"), &id, text.clone()).await,
                };
                match sent {
                    Ok(ack) => return Ok(json!({"seq": ack.seq, "duplicate": ack.duplicate})),
                    Err(e) if e.is_retryable() && attempt < PUBLISH_RETRIES => {
                        attempt += 1;
                        let wait = full_jitter_delay(
                            &mut rand_source(),
                            Duration::from_millis(100),
                            Duration::from_secs(2),
                            attempt,
                        );
                        tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
                    }
                    Err(e) => return Err(error(e)),
                }
            }
        }
        "receipt" => {
            let kind = ReceiptKind::from_str_name(&s("kind")).unwrap_or(ReceiptKind::Read);
            let seq = args["seq"].as_u64().unwrap_or_default();
            match target_chat(args) {
                Some(chat) => client.receipt_chat(chat, seq, kind).await,
                None => client.receipt_user(&s("user"), seq, kind).await,
            }
            .map(|()| Value::Null)
            .map_err(error)
        }
        "typing" => client
            .typing(&s("chat"))
            .await
            .map(|()| Value::Null)
            .map_err(error),
        "watchPresence" => {
            let users: Vec<String> = args["users"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|u| u.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            client
                .watch_presence(users)
                .await
                .map(|()| Value::Null)
                .map_err(error)
        }
        "ping" => {
            let start = std::time::Instant::now();
            client.ping().await.map_err(error)?;
            Ok(json!({"rttMs": start.elapsed().as_millis() as u64}))
        }
        "refreshToken" => client
            .refresh_token(&s("token"))
            .await
            .map(|_| json!({}))
            .map_err(error),
        "positions" => {
            let p = client.positions().await.map_err(error)?;
            let chats: serde_json::Map<String, Value> = p
                .chats
                .iter()
                .map(|(c, cur)| (c.clone(), json!({"seq": cur.seq, "epoch": cur.epoch})))
                .collect();
            Ok(
                json!({"personal": {"seq": p.personal.seq, "epoch": p.personal.epoch}, "chats": chats}),
            )
        }
        "state" => Ok(json!(if client.is_closed() { "closed" } else { "live" })),
        "close" => {
            client.close().await;
            Ok(Value::Null)
        }
        other => Err(json!({"kind": "protocol", "message": format!("unknown op {other}")})),
    }
}

fn rand_source() -> impl rand::Rng {
    rand::rng()
}

fn error(e: ClientError) -> Value {
    let (kind, code, retry_after) = match &e {
        ClientError::Server { code, .. } => ("server", Some(u64::from(*code)), None),
        ClientError::Http {
            status,
            retry_after,
        } => (
            "http",
            Some(u64::from(*status)),
            retry_after.map(|d| d.as_millis() as u64),
        ),
        ClientError::Closed { code, .. } => ("closed", Some(u64::from(*code)), None),
        ClientError::Disconnected => ("disconnected", None, None),
        ClientError::Timeout => ("timeout", None, None),
        ClientError::ClientClosed => ("clientClosed", None, None),
        ClientError::Io(_) => ("dial", None, None),
        _ => ("protocol", None, None),
    };
    json!({"kind": kind, "code": code, "retryAfterMs": retry_after, "message": e.to_string()})
}

fn stream_name(s: &StreamId) -> String {
    match s {
        StreamId::Personal => "personal".into(),
        StreamId::Chat(c) => format!("chat:{c}"),
    }
}

fn event_json(event: Event) -> Value {
    match event {
        Event::Delivery(d) => json!({
            "type": "delivery", "chat": d.chat, "user": d.user, "seq": d.seq, "sender": d.sender,
            "text": String::from_utf8_lossy(&d.payload), "clientMsgId": d.client_msg_id, "epoch": d.epoch,
        }),
        Event::Receipt(r) => json!({
            "type": "receipt", "chat": r.chat, "from": r.from, "seq": r.seq,
            "kind": ReceiptKind::try_from(r.kind).unwrap_or(ReceiptKind::Unspecified).as_str_name(),
        }),
        Event::Presence(p) => {
            json!({"type": "presence", "user": p.user, "online": p.online, "devices": p.devices})
        }
        Event::Typing(t) => json!({"type": "typing", "chat": t.chat, "user": t.user}),
        Event::Unsubscribed { chat, reason } => {
            json!({"type": "unsubscribed", "chat": chat, "reason": reason})
        }
        Event::TokenExpiring { .. } => json!({"type": "tokenExpiring"}),
        Event::ResyncRequired { stream, last_seen } => {
            json!({"type": "resyncRequired", "stream": stream_name(&stream), "lastSeen": last_seen})
        }
        Event::Disconnected {
            code, reconnect, ..
        } => json!({"type": "disconnected", "code": code, "reconnect": reconnect}),
        Event::Reconnected {
            resubscribed,
            failed,
            ..
        } => {
            let mut chats: Vec<String> = resubscribed.into_iter().map(|(c, _)| c).collect();
            chats.sort();
            let failed: Vec<String> = failed.into_iter().map(|f| f.chat).collect();
            json!({"type": "reconnected", "resubscribed": chats, "failed": failed})
        }
        Event::TokenRejected { code, .. } => json!({"type": "tokenRejected", "code": code}),
        Event::Malformed { .. } => json!({"type": "malformed"}),
    }
}
