//! The event tap through two router processes on real nats-server and
//! redis-server: 1,000 messages published through both (the routers'
//! queue group spreads them, several writers per chat at once) all appear
//! in `SB_EVENTS` once each, in seq order per chat, and a durable consumer
//! that stops midway, with a batch it never acknowledged, comes back and
//! loses nothing. A bad tap setting stops a router before it connects,
//! naming the flag.
use std::{
    collections::{HashMap, HashSet},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use switchboard_protocol::{
    ChatId, StreamKey, UserId,
    events::v1::{Event, event},
    subject::{EVENT_MESSAGES, ROUTER_PUBLISH},
};
use switchboard_router::{EVENT_STREAM, MemoryBus, PublishRequest, Publisher, RemoteRouter};
use switchboard_testkit::Server;

const CHATS: usize = 5;
const WRITERS_PER_CHAT: usize = 4;
const EACH: usize = 50;
const TOTAL: usize = CHATS * WRITERS_PER_CHAT * EACH;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn router(nats: &Server, redis: &Server, name: &str, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_switchboard-router"))
        .env("SWITCHBOARD_NATS_URL", nats.url())
        .env("SWITCHBOARD_REDIS_URL", redis.url())
        .env("SWITCHBOARD_ROUTER_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_NODE_ID", name)
        .env("SWITCHBOARD_EVENT_TAP", "true")
        .env("SWITCHBOARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until both replicas answer on the publish subject (a malformed
/// request gets an error reply from whichever takes it) and each has its
/// tap stream.
async fn wait_for_routers(client: &async_nats::Client, ports: [u16; 2]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for port in ports {
        while metric(port, "switchboard_event_tap_queue_max_events")
            .await
            .is_none()
        {
            assert!(Instant::now() < deadline, "router on {port} not up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    while tokio::time::timeout(
        Duration::from_millis(200),
        client.request(ROUTER_PUBLISH, "x".into()),
    )
    .await
    .map_or(true, |r| r.is_err())
    {
        assert!(Instant::now() < deadline, "no router answered");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A series' value from a router's `/metrics` (summed over its labels
/// when `name` stops before them); `None` while it does not answer.
async fn metric(port: u16, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    let values: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// What a consumer saw of one message event.
#[derive(Debug, Clone)]
struct Seen {
    stream_seq: u64,
    chat: String,
    seq: u64,
    client_msg_id: String,
    payload: Bytes,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_messages_through_two_routers_reach_the_tap_once_in_order() {
    let (nats, redis) = (Server::nats(), Server::redis());
    let ports = [free_port(), free_port()];
    let mut routers = [
        router(&nats, &redis, "router-a", ports[0]),
        router(&nats, &redis, "router-b", ports[1]),
    ];
    let client = async_nats::connect(nats.url()).await.unwrap();
    wait_for_routers(&client, ports).await;
    let publisher = Arc::new(RemoteRouter::new(
        client.clone(),
        Arc::new(MemoryBus::new()),
        Duration::from_secs(2),
    ));

    // The indexer's durable consumer exists before the first message.
    let js = jetstream::new(client.clone());
    let stream = js.get_stream(EVENT_STREAM).await.unwrap();
    stream
        .create_consumer(pull::Config {
            durable_name: Some("indexer".into()),
            filter_subject: EVENT_MESSAGES.into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut writers = Vec::new();
    for c in 0..CHATS {
        for w in 0..WRITERS_PER_CHAT {
            let publisher = publisher.clone();
            writers.push(tokio::spawn(async move {
                let mut acked = Vec::new();
                for i in 0..EACH {
                    let id = format!("c{c}-w{w}-{i}");
                    let req = PublishRequest {
                        sender: UserId::parse(&format!("w{w}")).unwrap(),
                        target: StreamKey::Chat(ChatId::parse(&format!("c{c}")).unwrap()),
                        client_msg_id: id.clone(),
                        payload: Bytes::from(format!("payload of {id}")),
                    };
                    let published = publisher.publish(req).await.unwrap();
                    acked.push((format!("c{c}"), published.seq, id));
                }
                acked
            }));
        }
    }

    // The consumer reads while the writers publish, then stops: it
    // acknowledges what it read except its last batch, and goes away.
    let mut seen: Vec<Seen> = Vec::new();
    let unacked: Vec<Seen>;
    {
        let consumer: jetstream::consumer::PullConsumer =
            stream.get_consumer("indexer").await.unwrap();
        while seen.len() < TOTAL * 2 / 5 {
            seen.extend(pull(&consumer, 100, true).await);
        }
        unacked = loop {
            let batch = pull(&consumer, 50, false).await;
            if !batch.is_empty() {
                break batch;
            }
        };
    }
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert_eq!(acked.len(), TOTAL);

    // Back, on a new connection: the same durable consumer goes on.
    let client2 = async_nats::connect(nats.url()).await.unwrap();
    let consumer: jetstream::consumer::PullConsumer = jetstream::new(client2)
        .get_stream(EVENT_STREAM)
        .await
        .unwrap()
        .get_consumer("indexer")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut after = Vec::new();
    loop {
        let have: HashSet<u64> = seen
            .iter()
            .chain(&after)
            .map(|s: &Seen| s.stream_seq)
            .collect();
        if have.len() >= TOTAL {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {TOTAL} events after 30 s",
            have.len()
        );
        after.extend(pull(&consumer, 200, true).await);
    }
    // Nothing more comes, and the batch never acknowledged came again.
    assert!(pull(&consumer, 10, true).await.is_empty());
    let again: HashSet<u64> = after.iter().map(|s| s.stream_seq).collect();
    assert!(
        unacked.iter().all(|s| again.contains(&s.stream_seq)),
        "the unacknowledged batch is delivered again"
    );

    // Once each, in seq order per chat, each the message it was acked as.
    seen.extend(after);
    seen.sort_by_key(|s| s.stream_seq);
    seen.dedup_by_key(|s| s.stream_seq);
    assert_eq!(seen.len(), TOTAL);
    let mut chains: HashMap<String, Vec<u64>> = HashMap::new();
    let by_seq: HashMap<(String, u64), String> = acked
        .into_iter()
        .map(|(chat, seq, id)| ((chat, seq), id))
        .collect();
    for s in &seen {
        chains.entry(s.chat.clone()).or_default().push(s.seq);
        let id = &by_seq[&(s.chat.clone(), s.seq)];
        assert_eq!(&s.client_msg_id, id, "{} seq {}", s.chat, s.seq);
        assert_eq!(s.payload, format!("payload of {id}"));
    }
    assert_eq!(chains.len(), CHATS);
    for (chat, seqs) in &chains {
        let want: Vec<u64> = (1..=(WRITERS_PER_CHAT * EACH) as u64).collect();
        assert_eq!(seqs, &want, "{chat}: every seq once, in order");
    }
    let mut stream = js.get_stream(EVENT_STREAM).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(
        info.state.messages, TOTAL as u64,
        "the stream holds each once"
    );

    // Both routers sequenced and tapped.
    for port in ports {
        let stored = metric(
            port,
            "switchboard_event_tap_total{kind=\"message\",result=\"stored\"}",
        )
        .await
        .unwrap_or(0.0);
        assert!(stored > 0.0, "router on {port} appended nothing");
        let dropped = metric(port, "switchboard_event_tap_dropped_total")
            .await
            .unwrap_or(0.0);
        assert_eq!(dropped, 0.0, "router on {port} dropped events");
    }
    for r in &mut routers {
        r.kill().unwrap();
        r.wait().unwrap();
    }
}

#[test]
fn a_bad_tap_setting_stops_the_router_before_it_connects() {
    for (var, value, flag) in [
        (
            "SWITCHBOARD_EVENT_TAP_MAX_BYTES",
            "0",
            "--event-tap-max-bytes",
        ),
        (
            "SWITCHBOARD_EVENT_TAP_REPLICAS",
            "9",
            "--event-tap-replicas",
        ),
        (
            "SWITCHBOARD_EVENT_TAP_STREAM",
            "SB.EVENTS",
            "--event-tap-stream",
        ),
    ] {
        // Nothing listens at these URLs: validation comes first.
        let out = Command::new(env!("CARGO_BIN_EXE_switchboard-router"))
            .env("SWITCHBOARD_NATS_URL", "nats://127.0.0.1:1")
            .env("SWITCHBOARD_REDIS_URL", "redis://127.0.0.1:1")
            .env("SWITCHBOARD_ROUTER_LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD_EVENT_TAP", "true")
            .env(var, value)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{flag}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(flag), "{flag}: {err}");
    }
}

/// Pulls up to `n` message events (waiting at most 500 ms); acknowledges
/// each when `ack`.
async fn pull(consumer: &jetstream::consumer::PullConsumer, n: usize, ack: bool) -> Vec<Seen> {
    let mut batch = consumer
        .fetch()
        .max_messages(n)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(m) = batch.next().await {
        let m = m.unwrap();
        let stream_seq = m.info().unwrap().stream_sequence;
        let Some(event::Kind::Message(d)) = Event::decode(m.payload.clone()).unwrap().kind else {
            panic!("not a message event on {}", m.subject);
        };
        assert_eq!(m.subject.as_str(), format!("sb.events.msg.chat.{}", d.chat));
        out.push(Seen {
            stream_seq,
            chat: d.chat,
            seq: d.seq,
            client_msg_id: d.client_msg_id,
            payload: d.payload,
        });
        if ack {
            m.ack().await.unwrap();
        }
    }
    out
}
