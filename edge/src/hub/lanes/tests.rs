//! A publish is acked before its fan-out: the standalone edge's own
//! state (router, memory bus, history and presence, the hub, the HTTP
//! routes on a real listener), with the fan-out held back, and mailboxes
//! standing in for the sockets (ten thousand real sockets would not fit
//! under a test's file limit beside everything else).
use std::{net::SocketAddr, sync::Arc, time::Duration};

use switchboard_protocol::{
    ChatId, CloseReason, Encoding, SharedFrame, StreamKey, UserId,
    v1::{ServerFrame, TypingEvent, server_frame},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    mailbox::{ConnHandle, Inbox, Next, Outbound},
    metrics::EdgeMetrics,
    state::EdgeState,
};

const API_KEY: &str = "k3y";

/// A standalone edge's state on its backends, serving HTTP on a real
/// listener, with `fanout_queue_max_frames` as given.
async fn edge(fanout_queue_max_frames: usize) -> (Arc<EdgeState>, SocketAddr, CancellationToken) {
    let mut config = Config::for_secret("s");
    config.api_key = Some(API_KEY.into());
    config.fanout_queue_max_frames = fanout_queue_max_frames;
    let backends = crate::app::backends(&config).await.unwrap();
    let state = EdgeState::new(
        config,
        backends,
        crate::metrics::prometheus(),
        Arc::new(EdgeMetrics::new()),
        None,
    )
    .await
    .unwrap();
    state.sessions.lease().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(crate::server::accept_loop(
        state.clone(),
        listener,
        stop.clone(),
    ));
    (state, addr, stop)
}

/// One keep-alive connection to the backend API, as a backend holds one.
struct Api(TcpStream);

impl Api {
    async fn connect(addr: SocketAddr) -> Api {
        Api(TcpStream::connect(addr).await.unwrap())
    }

    /// `POST path` with a JSON body: (status, body).
    async fn post(&mut self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let body = body.to_string();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.0.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let (head, len) = loop {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.0.read(&mut chunk))
                .await
                .expect("an answer within 10 s")
                .unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .expect("a content-length");
                break (end + 4, len);
            }
        };
        while buf.len() < head + len {
            let mut chunk = [0u8; 4096];
            let n = self.0.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed");
            buf.extend_from_slice(&chunk[..n]);
        }
        let status = String::from_utf8_lossy(&buf[9..12]).parse().unwrap();
        let json = serde_json::from_slice(&buf[head..head + len]).unwrap();
        (status, json)
    }

    /// Publishes into `chat` and returns the acked seq.
    async fn publish(&mut self, target: (&str, &str), id: &str) -> u64 {
        let (status, body) = self
            .post(
                "/api/publish",
                serde_json::json!({ target.0: target.1, "client_msg_id": id, "text": id }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["seq"].as_u64().expect("an acked seq")
    }
}

/// `n` sockets' mailboxes in `key`, joined as Subscribe joins them.
async fn sockets(state: &EdgeState, key: &StreamKey, first_id: u64, n: u64) -> Vec<Inbox> {
    let mut inboxes = Vec::new();
    for id in first_id..first_id + n {
        let (conn, inbox) = ConnHandle::new(id, Encoding::Protobuf, 1024, 1 << 20);
        state.hub.join(key, &conn).await.unwrap();
        inboxes.push(inbox);
    }
    inboxes
}

/// What a socket's mailbox holds now: the seqs of its deliveries (and
/// `None` for anything else), in order.
fn taken(inbox: &mut Inbox) -> Vec<Option<u64>> {
    let mut out = Vec::new();
    while let Some(msg) = inbox.try_recv() {
        if let Outbound::Shared(f) = msg {
            out.push(f.delivery_position().map(|(_, seq)| seq));
        }
    }
    out
}

fn chat(c: &str) -> StreamKey {
    StreamKey::Chat(ChatId::parse(c).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publisher_to_ten_thousand_sockets_is_acked_before_any_fan_out() {
    const SOCKETS: u64 = 10_000;
    const POSTS: u64 = 100;
    let (state, addr, stop) = edge(65_536).await;
    let news = chat("news");
    let mut inboxes = sockets(&state, &news, 1, SOCKETS).await;
    // Nothing is fanned out until released: an ack that waited for its
    // fan-out would never come.
    state.hub.hold();
    let mut api = Api::connect(addr).await;
    for n in 1..=POSTS {
        assert_eq!(api.publish(("chat", "news"), &format!("m{n}")).await, n);
    }
    // Every publish acked, not one of its 1,000,000 deliveries made: all
    // of them wait in the channel's lane.
    let delivered: usize = inboxes.iter_mut().map(|i| taken(i).len()).sum();
    assert_eq!(delivered, 0, "deliveries made before the acks came back");
    assert_eq!(state.hub.fanout_queued(), POSTS as usize);
    state.hub.release();
    tokio::time::timeout(Duration::from_secs(120), state.hub.settled())
        .await
        .expect("the fan-out finishes");
    assert_eq!(state.hub.fanout_queued(), 0);
    let all: Vec<Option<u64>> = (1..=POSTS).map(Some).collect();
    for (i, inbox) in inboxes.iter_mut().enumerate() {
        assert_eq!(
            taken(inbox),
            all,
            "socket {i} got a post twice, late or never"
        );
    }
    stop.cancel();
}

/// A lone post to a large audience is shared out over the worker threads
/// but one (ADR 0042): every socket still gets every post once, in order,
/// also when the posts follow each other while one is still going out.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_lone_post_to_a_crowd_is_spread_over_the_workers_and_stays_in_order() {
    const SOCKETS: u64 = 5_000;
    const POSTS: u64 = 30;
    let (state, addr, stop) = edge(65_536).await;
    let crowd = chat("crowd");
    let mut inboxes = sockets(&state, &crowd, 1, SOCKETS).await;
    let mut api = Api::connect(addr).await;
    for n in 1..=POSTS {
        assert_eq!(api.publish(("chat", "crowd"), &format!("m{n}")).await, n);
        // Every other post waits for the last one to go out, so some find
        // the lane idle (spread) and some find it busy.
        if n % 2 == 0 {
            tokio::time::timeout(Duration::from_secs(60), state.hub.settled())
                .await
                .expect("the fan-out finishes");
        }
    }
    tokio::time::timeout(Duration::from_secs(60), state.hub.settled())
        .await
        .expect("the fan-out finishes");
    let all: Vec<Option<u64>> = (1..=POSTS).map(Some).collect();
    for (i, inbox) in inboxes.iter_mut().enumerate() {
        assert_eq!(
            taken(inbox),
            all,
            "socket {i} got a post twice, late or never"
        );
    }
    let text = state.prometheus.render();
    let spread = text
        .lines()
        .find_map(|l| l.strip_prefix(r#"switchboard_edge_fanouts_total{mode="spread"} "#))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(spread >= (POSTS / 2) as f64, "spread fan-outs: {spread}");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_streams_are_acked_first_and_kicks_do_not_wait() {
    let (state, addr, stop) = edge(65_536).await;
    let bob = UserId::parse("bob").unwrap();
    let key = StreamKey::User(bob.clone());
    // Bob's phone and laptop, registered as Connect registers them, so
    // the router finds this edge for his personal stream.
    let mut devices = sockets(&state, &key, 1, 2).await;
    for id in 1..=2 {
        let session = state.sessions.session_of(&bob, id);
        state.sessions.register(id, &session).await.unwrap();
    }
    state.hub.hold();
    let mut api = Api::connect(addr).await;
    for n in 1..=5 {
        assert_eq!(api.publish(("user", "bob"), &format!("dm{n}")).await, n);
    }
    assert_eq!(state.hub.fanout_queued(), 5);
    // A kick behind held deliveries still closes the session at once.
    let (status, body) = api
        .post(
            "/api/kick",
            serde_json::json!({ "user": "bob", "session": format!("{}-2", state.config.node_id) }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut laptop = devices.pop().unwrap();
    match tokio::time::timeout(Duration::from_secs(5), laptop.recv(false)).await {
        Ok(Next::Close(reason)) => assert_eq!(reason, CloseReason::Kicked),
        _ => panic!("the kicked session was not closed at once"),
    }
    state.hub.release();
    state.hub.settled().await;
    let phone = &mut devices[0];
    assert_eq!(taken(phone), (1..=5).map(Some).collect::<Vec<_>>());
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_behind_the_deliveries_of_their_stream() {
    let (state, _addr, stop) = edge(65_536).await;
    let room = chat("room");
    let mut inbox = sockets(&state, &room, 1, 1).await.remove(0);
    state.hub.hold();
    state
        .context
        .router
        .publish(request(&room, 1))
        .await
        .unwrap();
    let typing = SharedFrame::new(ServerFrame {
        id: 0,
        kind: Some(server_frame::Kind::Typing(TypingEvent {
            chat: "room".into(),
            user: "alice".into(),
        })),
    });
    state.context.router.broadcast("sb.chat.room", typing).await;
    state
        .context
        .router
        .publish(request(&room, 2))
        .await
        .unwrap();
    assert_eq!(taken(&mut inbox), Vec::<Option<u64>>::new());
    state.hub.release();
    state.hub.settled().await;
    assert_eq!(taken(&mut inbox), [Some(1), None, Some(2)]);
    stop.cancel();
}

/// A publish request from alice into `key`.
fn request(key: &StreamKey, n: u64) -> switchboard_router::PublishRequest {
    switchboard_router::PublishRequest {
        sender: UserId::parse("alice").unwrap(),
        target: key.clone(),
        client_msg_id: format!("m{n}"),
        payload: bytes::Bytes::from_static(b"x"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_lane_drops_deliveries_and_history_fills_them_in() {
    // 8 frames in all, 2 per stream.
    let (state, _addr, stop) = edge(8).await;
    let room = chat("room");
    let mut inboxes = sockets(&state, &room, 1, 3).await;
    state.hub.hold();
    for n in 1..=20 {
        let acked = state
            .context
            .router
            .publish(request(&room, n))
            .await
            .unwrap();
        assert_eq!(acked.seq, n, "acked whatever the queue");
    }
    assert_eq!(state.hub.fanout_queued(), 2, "the stream's share, no more");
    state.hub.release();
    // The lane's first two, then its loss marker: a read since seq 2 (the
    // repair runs at once, no gap timeout).
    let all: Vec<Option<u64>> = (1..=20).map(Some).collect();
    for inbox in &mut inboxes {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while got.len() < all.len() && tokio::time::Instant::now() < deadline {
            got.extend(taken(inbox));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(got, all, "each delivery once, in order");
    }
    stop.cancel();
}
