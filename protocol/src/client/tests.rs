//! The connection actor against a scripted server on 127.0.0.1:0: each
//! test plays the server's side frame by frame.
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        handshake::server::{ErrorResponse, Request, Response},
        http::{HeaderValue, StatusCode},
        protocol::{CloseFrame, frame::coding::CloseCode},
    },
};

use super::*;
use crate::{
    CloseReason, Encoding,
    v1::{ClientFrame, Delivery, ServerFrame, StreamPosition},
};

const WAIT: Duration = Duration::from_secs(5);

struct Server {
    listener: TcpListener,
}

impl Server {
    async fn bind() -> Server {
        Server {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    fn config(&self) -> ClientConfig {
        let addr = self.listener.local_addr().unwrap();
        ClientConfig {
            backoff_base: Duration::from_millis(1),
            backoff_max: Duration::from_millis(20),
            request_timeout: Duration::from_secs(3),
            ..ClientConfig::new(format!("ws://{addr}/ws"), "t1")
        }
    }

    /// Accepts the next socket, agreeing to the subprotocol it offers.
    // The callback's error type is tungstenite's, not ours.
    #[allow(clippy::result_large_err)]
    async fn accept(&self) -> Peer {
        let (tcp, _) = tokio::time::timeout(WAIT, self.listener.accept())
            .await
            .expect("client did not dial")
            .unwrap();
        let mut encoding = Encoding::Protobuf;
        let ws = tokio_tungstenite::accept_hdr_async(tcp, |req: &Request, mut resp: Response| {
            let offered = req
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            encoding = Encoding::negotiate(offered).expect("a switchboard subprotocol");
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(encoding.subprotocol()),
            );
            Ok(resp)
        })
        .await
        .unwrap();
        Peer { ws, encoding }
    }

    /// Answers the next upgrade with an HTTP error.
    #[allow(clippy::result_large_err)]
    async fn refuse_upgrade(&self, status: StatusCode, retry_after: Option<&'static str>) {
        let (tcp, _) = self.listener.accept().await.unwrap();
        let _ = tokio_tungstenite::accept_hdr_async(tcp, |_: &Request, _: Response| {
            let mut resp = ErrorResponse::new(None);
            *resp.status_mut() = status;
            if let Some(ra) = retry_after {
                resp.headers_mut()
                    .insert("retry-after", HeaderValue::from_static(ra));
            }
            Err(resp)
        })
        .await;
    }

    /// Accepts a socket and completes Connect with this personal stream
    /// position; returns the Connect it got.
    async fn session(&self, user_stream: StreamPosition) -> (Peer, v1::Connect) {
        let mut peer = self.accept().await;
        let (id, connect) = peer.connect().await;
        peer.send(id, connect_result(user_stream)).await;
        (peer, connect)
    }
}

struct Peer {
    ws: WebSocketStream<TcpStream>,
    encoding: Encoding,
}

impl Peer {
    async fn recv(&mut self) -> ClientFrame {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("client sent nothing")
                .expect("socket ended")
                .unwrap();
            match msg {
                Message::Binary(b) => return self.encoding.decode_client(&b, false).unwrap(),
                Message::Text(t) => {
                    return self.encoding.decode_client(t.as_bytes(), true).unwrap();
                }
                Message::Close(c) => panic!("client closed: {c:?}"),
                _ => {}
            }
        }
    }

    async fn connect(&mut self) -> (u32, v1::Connect) {
        let frame = self.recv().await;
        match frame.kind {
            Some(client_frame::Kind::Connect(c)) => (frame.id, c),
            other => panic!("expected Connect, got {other:?}"),
        }
    }

    async fn send(&mut self, id: u32, kind: server_frame::Kind) {
        let bytes = self.encoding.encode_server(&ServerFrame {
            id,
            kind: Some(kind),
        });
        let msg = if self.encoding.is_text() {
            Message::text(String::from_utf8(bytes.to_vec()).unwrap())
        } else {
            Message::binary(bytes)
        };
        self.ws.send(msg).await.unwrap();
    }

    async fn push(&mut self, kind: server_frame::Kind) {
        self.send(0, kind).await;
    }

    async fn close(&mut self, code: u16) {
        let frame = CloseFrame {
            code: CloseCode::from(code),
            reason: "bye".into(),
        };
        let _ = self.ws.close(Some(frame)).await;
    }

    /// Reads until the client's close frame, answers it and drops the
    /// connection (a server closes TCP first); returns the code.
    async fn closed_with(mut self) -> Option<u16> {
        while let Ok(Some(Ok(msg))) = tokio::time::timeout(WAIT, self.ws.next()).await {
            if let Message::Close(c) = msg {
                // Sends our half of the close handshake.
                let _ = self.ws.flush().await;
                return c.map(|c| u16::from(c.code));
            }
        }
        None
    }
}

fn position(seq: u64, epoch: &str) -> StreamPosition {
    StreamPosition {
        seq,
        epoch: epoch.into(),
        ..Default::default()
    }
}

fn connect_result(user_stream: StreamPosition) -> server_frame::Kind {
    server_frame::Kind::ConnectResult(ConnectResult {
        session_id: "s1".into(),
        user: "alice".into(),
        user_stream: Some(user_stream),
        ..Default::default()
    })
}

fn subscribe_result(chat: &str, position: StreamPosition) -> server_frame::Kind {
    server_frame::Kind::SubscribeResult(SubscribeResult {
        chat: chat.into(),
        position: Some(position),
    })
}

fn error(code: u32) -> server_frame::Kind {
    server_frame::Kind::Error(v1::Error {
        code,
        message: format!("error {code}"),
    })
}

fn chat_delivery(chat: &str, seq: u64, epoch: &str) -> server_frame::Kind {
    server_frame::Kind::Delivery(Delivery {
        chat: chat.into(),
        seq,
        epoch: epoch.into(),
        ..Default::default()
    })
}

fn personal_delivery(seq: u64, epoch: &str) -> server_frame::Kind {
    server_frame::Kind::Delivery(Delivery {
        user: "alice".into(),
        seq,
        epoch: epoch.into(),
        ..Default::default()
    })
}

async fn next(events: &mut Events) -> Event {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("no event")
        .expect("event stream ended")
}

/// The next event that is not a delivery, with the delivered seqs before it.
async fn seqs_until_other(events: &mut Events) -> (Vec<u64>, Event) {
    let mut seqs = Vec::new();
    loop {
        match next(events).await {
            Event::Delivery(d) => seqs.push(d.seq),
            other => return (seqs, other),
        }
    }
}

/// Starts `Client::connect` and plays the server's side of it.
async fn connected(server: &Server, config: ClientConfig) -> (Client, Events, Peer) {
    let (connecting, session) =
        tokio::join!(Client::connect(config), server.session(position(0, "u")));
    let (client, events) = connecting.unwrap();
    (client, events, session.0)
}

#[tokio::test]
async fn requests_get_their_replies_in_both_encodings() {
    for encoding in [Encoding::Protobuf, Encoding::Json] {
        let server = Server::bind().await;
        let config = ClientConfig {
            encoding,
            ..server.config()
        };
        let (client, _events, mut peer) = connected(&server, config).await;
        assert_eq!(client.session().await.user, "alice");

        let ping = tokio::spawn({
            let client = client.clone();
            async move { client.ping().await }
        });
        let subscribe = tokio::spawn({
            let client = client.clone();
            async move { client.subscribe("secret").await }
        });
        // Replies come back in any order; each finds its request by id.
        let (a, b) = (peer.recv().await, peer.recv().await);
        let (ping_id, sub_id) = match a.kind {
            Some(client_frame::Kind::Ping(_)) => (a.id, b.id),
            _ => (b.id, a.id),
        };
        assert_ne!(ping_id, sub_id);
        peer.send(sub_id, error(403)).await;
        peer.send(
            ping_id,
            server_frame::Kind::Pong(v1::Pong { server_time_ms: 7 }),
        )
        .await;
        assert_eq!(ping.await.unwrap().unwrap().server_time_ms, 7);
        let err = subscribe.await.unwrap().unwrap_err();
        assert_eq!(err.server_code(), Some(403), "{err}");
        assert!(client.positions().await.unwrap().chats.is_empty());
    }
}

#[tokio::test]
async fn deliveries_are_deduplicated_and_holes_reported() {
    let server = Server::bind().await;
    let (client, mut events, mut peer) = connected(&server, server.config()).await;
    let sub = tokio::spawn({
        let client = client.clone();
        async move { client.subscribe("room").await }
    });
    let frame = peer.recv().await;
    peer.send(frame.id, subscribe_result("room", position(2, "r")))
        .await;
    assert_eq!(sub.await.unwrap().unwrap().chat, "room");
    for seq in [3, 3, 2, 4, 6, 5, 7] {
        peer.push(chat_delivery("room", seq, "r")).await;
    }
    let (seqs, other) = seqs_until_other(&mut events).await;
    assert_eq!(seqs, [3, 4]);
    assert_eq!(
        other,
        Event::ResyncRequired {
            stream: StreamId::Chat("room".into()),
            last_seen: 4
        }
    );
    peer.push(personal_delivery(1, "u")).await;
    peer.push(personal_delivery(1, "u")).await;
    peer.push(server_frame::Kind::Disconnect(v1::Disconnect {
        code: 4500,
        reason: "bad_request".into(),
        reconnect: false,
        reconnect_delay_ms: 0,
        ..Default::default()
    }))
    .await;
    let (seqs, other) = seqs_until_other(&mut events).await;
    // 5 is older than 6; 7 follows; the personal stream counts on its own.
    assert_eq!(seqs, [6, 7, 1]);
    assert_eq!(
        other,
        Event::Disconnected {
            code: Some(4500),
            reason: "bad_request".into(),
            reconnect: false
        }
    );
    assert!(
        events.recv().await.is_none(),
        "a terminal close ends events"
    );
    assert!(matches!(
        client.ping().await,
        Err(ClientError::ClientClosed)
    ));
    assert!(client.is_closed());
}

#[tokio::test]
async fn reconnect_resumes_the_personal_stream_and_every_chat() {
    let server = Server::bind().await;
    let (connecting, (mut peer, first)) = tokio::join!(
        Client::connect(server.config()),
        server.session(position(5, "u"))
    );
    assert_eq!((first.user_since, first.token.as_str()), (None, "t1"));
    let (client, mut events) = connecting.unwrap();

    let sub = tokio::spawn({
        let client = client.clone();
        async move { client.subscribe("room").await }
    });
    let frame = peer.recv().await;
    peer.send(frame.id, subscribe_result("room", position(10, "r")))
        .await;
    sub.await.unwrap().unwrap();
    peer.push(personal_delivery(6, "u")).await;
    peer.push(chat_delivery("room", 11, "r")).await;
    assert_eq!(seqs_until_other_n(&mut events, 2).await, [6, 11]);

    // A request in flight when the socket drops fails with Disconnected.
    let ping = tokio::spawn({
        let client = client.clone();
        async move { client.ping().await }
    });
    assert!(matches!(
        peer.recv().await.kind,
        Some(client_frame::Kind::Ping(_))
    ));
    peer.close(CloseReason::SlowConsumer.code()).await;
    assert!(matches!(
        ping.await.unwrap(),
        Err(ClientError::Disconnected)
    ));
    assert_eq!(
        next(&mut events).await,
        Event::Disconnected {
            code: Some(4001),
            reason: "bye".into(),
            reconnect: true
        }
    );
    // A request made while reconnecting waits for the new session.
    let publish = tokio::spawn({
        let client = client.clone();
        async move { client.publish_chat("room", "m1", "hi").await }
    });

    let mut peer = server.accept().await;
    let (id, connect) = peer.connect().await;
    assert_eq!(connect.user_since, Some(6));
    assert_eq!(connect.user_epoch, "u");
    peer.send(
        id,
        connect_result(StreamPosition {
            seq: 7,
            epoch: "u".into(),
            recovered: 1,
            resync_required: false,
        }),
    )
    .await;
    peer.push(personal_delivery(7, "u")).await;
    let resub = peer.recv().await;
    match &resub.kind {
        Some(client_frame::Kind::Subscribe(s)) => {
            assert_eq!(
                (s.chat.as_str(), s.since, s.epoch.as_str()),
                ("room", Some(11), "r")
            );
        }
        other => panic!("expected the re-subscribe, got {other:?}"),
    }
    let publish_frame = peer.recv().await;
    assert!(matches!(
        publish_frame.kind,
        Some(client_frame::Kind::Publish(_))
    ));
    peer.send(resub.id, subscribe_result("room", position(12, "r")))
        .await;
    // Recovered: 11 again (a duplicate) and 12.
    peer.push(chat_delivery("room", 11, "r")).await;
    peer.push(chat_delivery("room", 12, "r")).await;
    peer.send(
        publish_frame.id,
        server_frame::Kind::PublishAck(v1::PublishAck {
            chat: "room".into(),
            seq: 13,
            ..Default::default()
        }),
    )
    .await;
    let (seqs, other) = seqs_until_other(&mut events).await;
    assert_eq!(seqs, [7]);
    match other {
        Event::Reconnected {
            user_stream,
            resubscribed,
            failed,
        } => {
            assert_eq!(user_stream.seq, 7);
            assert_eq!(resubscribed, [("room".to_string(), position(12, "r"))]);
            assert!(failed.is_empty());
        }
        other => panic!("expected Reconnected, got {other:?}"),
    }
    assert_eq!(seqs_until_other_n(&mut events, 1).await, [12]);
    assert_eq!(publish.await.unwrap().unwrap().seq, 13);
    let positions = client.positions().await.unwrap();
    assert_eq!(positions.personal.seq, 7);
    assert_eq!(positions.chats["room"].seq, 12);

    let ((), code) = tokio::join!(client.close(), peer.closed_with());
    assert_eq!(code, Some(1000));
    assert_eq!(
        next(&mut events).await,
        Event::Disconnected {
            code: Some(1000),
            reason: "closed by client".into(),
            reconnect: false
        }
    );
    assert!(events.recv().await.is_none());
}

async fn seqs_until_other_n(events: &mut Events, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.len() < n {
        match next(events).await {
            Event::Delivery(d) => seqs.push(d.seq),
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
    seqs
}

#[tokio::test]
async fn a_refused_first_connect_is_a_typed_error() {
    let server = Server::bind().await;
    let refuse = async {
        let mut peer = server.accept().await;
        let (id, _) = peer.connect().await;
        peer.send(id, error(440)).await;
        peer.close(CloseReason::TokenExpired.code()).await;
    };
    let (result, ()) = tokio::join!(Client::connect(server.config()), refuse);
    match result {
        Err(ClientError::Server { code: 440, .. }) => {}
        other => panic!("expected 440, got {other:?}"),
    }

    let overloaded = server.refuse_upgrade(StatusCode::SERVICE_UNAVAILABLE, Some("3"));
    let (result, ()) = tokio::join!(Client::connect(server.config()), overloaded);
    match result {
        Err(ClientError::Http {
            status: 503,
            retry_after,
        }) => assert_eq!(retry_after, Some(Duration::from_secs(3))),
        other => panic!("expected 503, got {other:?}"),
    }
}

#[tokio::test]
async fn a_rejected_token_waits_for_a_new_one() {
    let server = Server::bind().await;
    let (client, mut events, mut peer) = connected(&server, server.config()).await;
    // The reconnect after a drain is refused: wait for a new token.
    peer.close(CloseReason::Shutdown.code()).await;
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected {
            code: Some(4000),
            reconnect: true,
            ..
        }
    ));
    let mut peer = server.accept().await;
    let (id, connect) = peer.connect().await;
    assert_eq!(connect.token, "t1");
    peer.send(id, error(401)).await;
    peer.close(CloseReason::Unauthorized.code()).await;
    assert!(matches!(
        next(&mut events).await,
        Event::TokenRejected { code: 401, .. }
    ));
    let refresh = tokio::spawn({
        let client = client.clone();
        async move { client.refresh_token("t2").await }
    });
    let (mut peer, connect) = server.session(position(0, "u")).await;
    assert_eq!(connect.token, "t2");
    let frame = peer.recv().await;
    assert!(matches!(frame.kind, Some(client_frame::Kind::Refresh(_))));
    peer.send(
        frame.id,
        server_frame::Kind::RefreshResult(v1::RefreshResult {
            token_expires_at_ms: 99,
        }),
    )
    .await;
    assert_eq!(refresh.await.unwrap().unwrap().token_expires_at_ms, 99);
    assert!(matches!(next(&mut events).await, Event::Reconnected { .. }));

    // Closed for an expired token: the same token would be refused, so the
    // client does not dial until it has a new one.
    peer.push(server_frame::Kind::Disconnect(v1::Disconnect {
        code: 4005,
        reason: "token_expired".into(),
        reconnect: true,
        reconnect_delay_ms: 5,
        ..Default::default()
    }))
    .await;
    peer.close(4005).await;
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected {
            code: Some(4005),
            reconnect: true,
            ..
        }
    ));
    assert!(matches!(
        next(&mut events).await,
        Event::TokenRejected { code: 440, .. }
    ));
    let early = tokio::time::timeout(Duration::from_millis(100), server.listener.accept()).await;
    assert!(early.is_err(), "dialed again with the expired token");
    let refresh = tokio::spawn(async move { client.refresh_token("t3").await });
    let (mut peer, connect) = server.session(position(0, "u")).await;
    assert_eq!(connect.token, "t3");
    let frame = peer.recv().await;
    peer.send(
        frame.id,
        server_frame::Kind::RefreshResult(v1::RefreshResult {
            token_expires_at_ms: 100,
        }),
    )
    .await;
    assert!(refresh.await.unwrap().is_ok());
}

#[tokio::test]
async fn retry_after_is_honoured_on_reconnect() {
    let server = Server::bind().await;
    let config = ClientConfig {
        backoff_max: Duration::from_millis(200),
        ..server.config()
    };
    let (_client, mut events, mut peer) = connected(&server, config).await;
    peer.close(CloseReason::Shutdown.code()).await;
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected {
            reconnect: true,
            ..
        }
    ));
    server
        .refuse_upgrade(StatusCode::SERVICE_UNAVAILABLE, Some("1"))
        .await;
    let refused_at = tokio::time::Instant::now();
    let (_peer, _) = server.session(position(0, "u")).await;
    let waited = refused_at.elapsed();
    // At least Retry-After (the spread is unit-tested in backoff).
    assert!(waited >= Duration::from_millis(950), "{waited:?}");
    assert!(matches!(next(&mut events).await, Event::Reconnected { .. }));
}

#[tokio::test]
async fn bad_frames_are_reported_not_fatal() {
    let server = Server::bind().await;
    let (client, mut events, mut peer) = connected(&server, server.config()).await;
    peer.ws
        .send(Message::binary(&b"\xff\xff\xff"[..]))
        .await
        .unwrap();
    assert!(matches!(next(&mut events).await, Event::Malformed { .. }));
    let ping = tokio::spawn(async move { client.ping().await });
    let frame = peer.recv().await;
    peer.send(
        frame.id,
        server_frame::Kind::Pong(v1::Pong { server_time_ms: 1 }),
    )
    .await;
    assert!(ping.await.unwrap().is_ok());
}

#[tokio::test]
async fn no_reconnect_when_configured_off() {
    let server = Server::bind().await;
    let config = ClientConfig {
        reconnect: false,
        ..server.config()
    };
    let (client, mut events, mut peer) = connected(&server, config).await;
    peer.close(CloseReason::Shutdown.code()).await;
    assert!(matches!(
        next(&mut events).await,
        Event::Disconnected {
            code: Some(4000),
            reconnect: false,
            ..
        }
    ));
    assert!(events.recv().await.is_none());
    assert!(client.is_closed());
}

#[tokio::test]
async fn pings_keep_the_link_and_silence_ends_it() {
    let server = Server::bind().await;
    let accept = async {
        let mut peer = server.accept().await;
        let (id, _) = peer.connect().await;
        let result = ConnectResult {
            heartbeat_interval_ms: 100,
            user_stream: Some(position(0, "u")),
            ..Default::default()
        };
        peer.send(id, server_frame::Kind::ConnectResult(result))
            .await;
        peer
    };
    let (connecting, mut peer) = tokio::join!(Client::connect(server.config()), accept);
    let (_client, mut events) = connecting.unwrap();
    // Pings every interval for several silence limits: the link holds.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peer.ws
            .send(Message::Ping(Default::default()))
            .await
            .unwrap();
    }
    assert!(events.try_recv().is_err(), "no event while pinged");
    // Then nothing: after 2.5 intervals the client leaves and redials.
    match next(&mut events).await {
        Event::Disconnected {
            code: None,
            reason,
            reconnect: true,
        } => assert!(reason.contains("silent"), "{reason}"),
        other => panic!("expected a disconnect, got {other:?}"),
    }
    let _next_session = server.session(position(0, "u")).await;
    assert!(matches!(next(&mut events).await, Event::Reconnected { .. }));
}
