//! A small in-process stand-in for an edge: chats with seqs and a short
//! history, personal streams, receipts, typing and presence, all in one
//! process and without any limits, and a membership API
//! (`POST /api/chats/<chat>/members`) on a port of its own. It can also
//! misbehave on purpose.
use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use futures_util::{SinkExt, StreamExt};
use switchboard_protocol::{
    Encoding,
    v1::{
        ConnectResult, Delivery, Error as ErrorFrame, Ok as OkReply, PresenceEvent, PublishAck,
        ReceiptEvent, ServerFrame, StreamPosition, SubscribeResult, TypingEvent, client_frame,
        publish, receipt, server_frame,
    },
};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{
    Message,
    handshake::server::{Request, Response},
    http::HeaderValue,
};

/// The HS256 secret the fake verifies tokens with.
pub(crate) const SECRET: &str = "test-secret";
/// The key of the fake's membership API.
pub(crate) const API_KEY: &str = "test-key";

/// Ways to misbehave.
#[derive(Default, Clone)]
pub(crate) struct Faults {
    /// Never deliver this (user, chat seq) pair.
    pub(crate) drop_delivery: Option<(String, u64)>,
    /// Close the socket of this user instead of answering Connect.
    pub(crate) refuse_user: Option<String>,
    /// Hold the first Connect of users whose name starts with this for
    /// this long before taking it (a slow edge or network).
    pub(crate) slow_first_connect: Option<(String, std::time::Duration)>,
    /// Refuse a subscribe to a chat the user is no member of (through the
    /// membership API) with 403, as an edge in `--chat-auth members` does.
    pub(crate) members_only: bool,
    /// Answer every subscribe to this chat with an Error of this code.
    pub(crate) refuse_chat: Option<(String, u32)>,
    /// Close the socket instead of answering a subscribe to this chat.
    pub(crate) close_on_chat: Option<String>,
}

type Tx = mpsc::UnboundedSender<ServerFrame>;

#[derive(Default)]
struct Chat {
    seq: u64,
    subscribers: Vec<(u64, String, Tx)>,
    history: Vec<Delivery>,
}

#[derive(Default)]
struct State {
    chats: HashMap<String, Chat>,
    /// User → (personal stream seq, sockets).
    users: HashMap<String, (u64, Vec<(u64, Tx)>)>,
    /// Watched user → watchers.
    watchers: HashMap<String, Vec<(u64, Tx)>>,
    /// Chat → members, as the membership API set them.
    members: HashMap<String, BTreeSet<String>>,
}

/// The fake edge; every user that ever connected is in `seen_users`.
pub(crate) struct Fake {
    pub(crate) addr: SocketAddr,
    pub(crate) seen_users: Arc<Mutex<BTreeSet<String>>>,
    /// Sockets past Connect and not yet closed.
    pub(crate) open: Arc<AtomicU64>,
    /// The membership API (HTTP/1.1, keep-alive, key [`API_KEY`]).
    pub(crate) api: SocketAddr,
}

/// Starts a fake edge on 127.0.0.1 and a free port.
pub(crate) async fn start(faults: Faults) -> Fake {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(Mutex::new(State::default()));
    let seen_users: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let open = Arc::new(AtomicU64::new(0));
    let ids = Arc::new(AtomicU64::new(1));
    let (seen, count) = (seen_users.clone(), open.clone());
    let api = start_api(state.clone()).await;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (state, seen, faults) = (state.clone(), seen.clone(), faults.clone());
            let count = count.clone();
            let id = ids.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let _ = serve(tcp, id, state, seen, faults, count).await;
            });
        }
    });
    Fake {
        addr,
        seen_users,
        open,
        api,
    }
}

/// Serves `POST /api/chats/<chat>/members {"add": [...]}` into `state`.
async fn start_api(state: Arc<Mutex<State>>) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let state = state.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One request: its head, then Content-Length bytes.
                    let (path, key, head, len) = loop {
                        let mut headers = [httparse::EMPTY_HEADER; 16];
                        let mut req = httparse::Request::new(&mut headers);
                        if let Ok(httparse::Status::Complete(at)) = req.parse(&buf) {
                            let header = |name: &str| {
                                req.headers
                                    .iter()
                                    .find(|h| h.name.eq_ignore_ascii_case(name))
                                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
                            };
                            let len = header("content-length").and_then(|v| v.parse().ok());
                            let key = header("authorization").unwrap_or_default();
                            break (req.path.unwrap_or("").to_owned(), key, at, len.unwrap_or(0));
                        }
                        let mut chunk = [0u8; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    while buf.len() < head + len {
                        let mut chunk = [0u8; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: serde_json::Value =
                        serde_json::from_slice(&buf[head..head + len]).unwrap_or_default();
                    buf.drain(..head + len);
                    let chat = path
                        .strip_prefix("/api/chats/")
                        .and_then(|p| p.strip_suffix("/members"));
                    let (status, answer) = match chat {
                        _ if key != format!("Bearer {API_KEY}") => {
                            (401, serde_json::json!({"error": {"code": 401}}))
                        }
                        Some(chat) => {
                            let mut s = state.lock().unwrap();
                            let members = s.members.entry(chat.to_owned()).or_default();
                            let added = body["add"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|u| u.as_str())
                                .filter(|u| members.insert(u.to_string()))
                                .count();
                            (200, serde_json::json!({"added": added, "removed": 0}))
                        }
                        None => (404, serde_json::json!({"error": {"code": 404}})),
                    };
                    let answer = answer.to_string();
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if tcp.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn push(tx: &Tx, kind: server_frame::Kind) {
    let _ = tx.send(ServerFrame {
        id: 0,
        kind: Some(kind),
    });
}

fn user_of(token: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Claims {
        sub: String,
    }
    let key = jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes());
    let v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::decode::<Claims>(token, &key, &v)
        .ok()
        .map(|t| t.claims.sub)
}

// tungstenite's header callback returns its large error type by value.
#[allow(clippy::result_large_err)]
async fn serve(
    tcp: tokio::net::TcpStream,
    conn: u64,
    state: Arc<Mutex<State>>,
    seen: Arc<Mutex<BTreeSet<String>>>,
    faults: Faults,
    open: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let pick = |_: &Request, mut resp: Response| {
        resp.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(Encoding::PROTOBUF_SUBPROTOCOL),
        );
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async(tcp, pick).await?;
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<ServerFrame>();
    let writer = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            let bytes = Encoding::Protobuf.encode_server(&f);
            if sink.send(Message::binary(bytes)).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let next = |m: Message| match m {
        Message::Binary(b) => Encoding::Protobuf.decode_client(&b, false).ok(),
        _ => None,
    };
    // Connect first.
    let first = loop {
        match stream.next().await {
            Some(Ok(m)) => {
                if let Some(f) = next(m) {
                    break f;
                }
            }
            _ => return Ok(()),
        }
    };
    let Some(client_frame::Kind::Connect(c)) = first.kind else {
        return Ok(());
    };
    let Some(me) = user_of(&c.token) else {
        return Ok(());
    };
    if faults.refuse_user.as_deref() == Some(me.as_str()) {
        writer.abort();
        return Ok(());
    }
    if let Some((prefix, wait)) = &faults.slow_first_connect
        && me.starts_with(prefix.as_str())
        && !seen.lock().unwrap().contains(&me)
    {
        tokio::time::sleep(*wait).await;
    }
    seen.lock().unwrap().insert(me.clone());
    open.fetch_add(1, Ordering::Relaxed);
    {
        let mut s = state.lock().unwrap();
        let entry = s.users.entry(me.clone()).or_default();
        entry.1.push((conn, tx.clone()));
        if entry.1.len() == 1 {
            announce(&s, &me, true);
        }
    }
    let reply = |id, kind| {
        let _ = tx.send(ServerFrame {
            id,
            kind: Some(kind),
        });
    };
    reply(
        first.id,
        server_frame::Kind::ConnectResult(ConnectResult {
            user: me.clone(),
            ..Default::default()
        }),
    );
    while let Some(Ok(m)) = stream.next().await {
        if m.is_close() {
            break;
        }
        let Some(f) = next(m) else { continue };
        let Some(kind) = f.kind else { continue };
        let mut s = state.lock().unwrap();
        match kind {
            client_frame::Kind::Subscribe(sub) => {
                if faults.close_on_chat.as_deref() == Some(sub.chat.as_str()) {
                    break;
                }
                let refused = match &faults.refuse_chat {
                    Some((chat, code)) if *chat == sub.chat => Some(*code),
                    _ if faults.members_only
                        && !s.members.get(&sub.chat).is_some_and(|m| m.contains(&me)) =>
                    {
                        Some(403)
                    }
                    _ => None,
                };
                if let Some(code) = refused {
                    reply(
                        f.id,
                        server_frame::Kind::Error(ErrorFrame {
                            code,
                            message: format!("refused {}", sub.chat),
                        }),
                    );
                    continue;
                }
                let chat = s.chats.entry(sub.chat.clone()).or_default();
                chat.subscribers.push((conn, me.clone(), tx.clone()));
                reply(
                    f.id,
                    server_frame::Kind::SubscribeResult(SubscribeResult {
                        chat: sub.chat.clone(),
                        position: Some(StreamPosition {
                            seq: chat.seq,
                            epoch: "e".into(),
                            ..Default::default()
                        }),
                    }),
                );
                if let Some(since) = sub.since {
                    for d in chat.history.iter().filter(|d| d.seq > since) {
                        push(&tx, server_frame::Kind::Delivery(d.clone()));
                    }
                }
            }
            client_frame::Kind::Publish(p) => {
                let mut d = Delivery {
                    sender: me.clone(),
                    payload: p.payload.clone(),
                    client_msg_id: p.client_msg_id.clone(),
                    epoch: "e".into(),
                    ..Default::default()
                };
                let mut ack = PublishAck::default();
                match p.target {
                    Some(publish::Target::Chat(name)) => {
                        let chat = s.chats.entry(name.clone()).or_default();
                        chat.seq += 1;
                        d.chat = name.clone();
                        d.seq = chat.seq;
                        chat.history.push(d.clone());
                        for (_, user, sub) in &chat.subscribers {
                            if faults.drop_delivery.as_ref() == Some(&(user.clone(), d.seq)) {
                                continue;
                            }
                            push(sub, server_frame::Kind::Delivery(d.clone()));
                        }
                        ack.chat = name;
                        ack.seq = d.seq;
                    }
                    Some(publish::Target::User(to)) => {
                        let entry = s.users.entry(to.clone()).or_default();
                        entry.0 += 1;
                        d.user = to.clone();
                        d.seq = entry.0;
                        for (_, sock) in &entry.1 {
                            push(sock, server_frame::Kind::Delivery(d.clone()));
                        }
                        ack.user = to;
                        ack.seq = d.seq;
                    }
                    None => continue,
                }
                reply(f.id, server_frame::Kind::PublishAck(ack));
            }
            client_frame::Kind::Receipt(r) => {
                let mut ev = ReceiptEvent {
                    from: me.clone(),
                    seq: r.seq,
                    kind: r.kind,
                    ..Default::default()
                };
                let to: Vec<Tx> = match r.target {
                    Some(receipt::Target::Chat(c)) => {
                        ev.chat = c.clone();
                        s.chats
                            .get(&c)
                            .map(|c| c.subscribers.iter().map(|s| s.2.clone()).collect())
                            .unwrap_or_default()
                    }
                    Some(receipt::Target::User(u)) => s
                        .users
                        .get(&u)
                        .map(|u| u.1.iter().map(|s| s.1.clone()).collect())
                        .unwrap_or_default(),
                    None => continue,
                };
                for t in to {
                    push(&t, server_frame::Kind::Receipt(ev.clone()));
                }
                reply(f.id, server_frame::Kind::Ok(OkReply {}));
            }
            client_frame::Kind::Typing(t) => {
                let ev = TypingEvent {
                    chat: t.chat.clone(),
                    user: me.clone(),
                };
                if let Some(c) = s.chats.get(&t.chat) {
                    for (_, _, sub) in &c.subscribers {
                        push(sub, server_frame::Kind::Typing(ev.clone()));
                    }
                }
                if f.id != 0 {
                    reply(f.id, server_frame::Kind::Ok(OkReply {}));
                }
            }
            client_frame::Kind::WatchPresence(w) => {
                reply(f.id, server_frame::Kind::Ok(OkReply {}));
                for u in w.users {
                    s.watchers
                        .entry(u.clone())
                        .or_default()
                        .push((conn, tx.clone()));
                    let online = s.users.get(&u).is_some_and(|e| !e.1.is_empty());
                    push(
                        &tx,
                        server_frame::Kind::Presence(PresenceEvent {
                            user: u,
                            online,
                            ..Default::default()
                        }),
                    );
                }
            }
            _ => {}
        }
    }
    {
        let mut s = state.lock().unwrap();
        for chat in s.chats.values_mut() {
            chat.subscribers.retain(|(c, _, _)| *c != conn);
        }
        for w in s.watchers.values_mut() {
            w.retain(|(c, _)| *c != conn);
        }
        let entry = s.users.entry(me.clone()).or_default();
        entry.1.retain(|(c, _)| *c != conn);
        if entry.1.is_empty() {
            announce(&s, &me, false);
        }
    }
    open.fetch_sub(1, Ordering::Relaxed);
    drop(tx);
    let _ = writer.await;
    Ok(())
}

fn announce(s: &State, user: &str, online: bool) {
    for (_, w) in s.watchers.get(user).into_iter().flatten() {
        push(
            w,
            server_frame::Kind::Presence(PresenceEvent {
                user: user.into(),
                online,
                ..Default::default()
            }),
        );
    }
}
