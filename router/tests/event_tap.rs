//! The event tap's order and repair on a real nats-server (JetStream): two
//! taps (two routers' worth) over one history append each stream's seqs
//! once and in order however their appends race; what a tap lost (a full
//! queue, a stalled JetStream) is filled in from history by the stream's
//! next message, and what was sequenced before the stream existed is not.
//! The history is the memory backend here (the order logic is the
//! subject); router/server/tests/event_tap.rs runs router processes on
//! Redis.
use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use prost::Message;
use switchboard_presence::MemoryPresence;
use switchboard_protocol::{
    ChatId, StreamKey, UserId,
    events::v1::{Event, event},
    subject::event_message_subject,
};
use switchboard_router::{
    Draft, EVENT_STREAM, EventTap, History, HistoryLimits, MemoryBus, MemoryHistory,
    PublishRequest, Router, RouterLimits, StreamRole, TapSettings,
};
use switchboard_testkit::Server;

fn history() -> Arc<dyn History> {
    Arc::new(MemoryHistory::new(HistoryLimits {
        max_messages: 10_000,
        ..HistoryLimits::default()
    }))
}

async fn tap(nats: &Server, history: &Arc<dyn History>, node: &str, queue: usize) -> Arc<EventTap> {
    let settings = TapSettings {
        queue_max_events: queue,
        ..TapSettings::default()
    };
    let client = async_nats::connect(nats.url()).await.unwrap();
    Arc::new(
        EventTap::start(
            client,
            &settings,
            StreamRole::Owner,
            Some(history.clone()),
            node,
        )
        .await
        .unwrap(),
    )
}

fn router(history: &Arc<dyn History>, tap: Option<&Arc<EventTap>>) -> Arc<Router> {
    let r = Router::new(
        history.clone(),
        Arc::new(MemoryBus::new()),
        Arc::new(MemoryPresence::new(60_000, 100)),
        RouterLimits::default(),
    );
    Arc::new(match tap {
        Some(t) => r.with_tap(t.clone()),
        None => r,
    })
}

fn chat(c: &str) -> StreamKey {
    StreamKey::Chat(ChatId::parse(c).unwrap())
}

fn request(target: &StreamKey, id: &str) -> PublishRequest {
    PublishRequest {
        sender: UserId::parse("alice").unwrap(),
        target: target.clone(),
        client_msg_id: id.into(),
        payload: Bytes::from(format!("body of {id}")),
    }
}

/// Every event in the stream, in stream order: (subject, event).
async fn stream_events(nats: &Server) -> Vec<(String, Event)> {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut stream = js.get_stream(EVENT_STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let m = stream.get_raw_message(seq).await.unwrap();
        out.push((m.subject.to_string(), Event::decode(m.payload).unwrap()));
    }
    out
}

/// Per message subject: the (seq, client message id, node) of its events,
/// in stream order.
fn chains(events: &[(String, Event)]) -> HashMap<String, Vec<(u64, String, String)>> {
    let mut out: HashMap<String, Vec<(u64, String, String)>> = HashMap::new();
    for (subject, e) in events {
        if let Some(event::Kind::Message(d)) = &e.kind {
            out.entry(subject.clone()).or_default().push((
                d.seq,
                d.client_msg_id.clone(),
                e.node.clone(),
            ));
        }
    }
    out
}

fn seqs(chain: &[(u64, String, String)]) -> Vec<u64> {
    chain.iter().map(|c| c.0).collect()
}

/// Polls until the stream holds `n` events.
async fn wait_for_events(nats: &Server, n: usize) -> Vec<(String, Event)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = stream_events(nats).await;
        if events.len() >= n || Instant::now() > deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_taps_racing_on_the_same_chats_keep_each_seq_once_and_in_order() {
    let nats = Server::nats();
    let history = history();
    let (tap_a, tap_b) = (
        tap(&nats, &history, "r1", 65_536).await,
        tap(&nats, &history, "r2", 65_536).await,
    );
    let routers = [
        router(&history, Some(&tap_a)),
        router(&history, Some(&tap_b)),
    ];
    let streams: Vec<StreamKey> = (0..4)
        .map(|i| chat(&format!("c{i}")))
        .chain([StreamKey::User(UserId::parse("bob").unwrap())])
        .collect();
    // Eight writers per stream, each alternating routers: appends of one
    // chat from both taps interleave all the time.
    let mut tasks = Vec::new();
    for (s, stream) in streams.iter().enumerate() {
        for w in 0..8 {
            let (routers, stream) = (routers.clone(), stream.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..25 {
                    let r = &routers[(w + i) % 2];
                    r.publish(request(&stream, &format!("s{s}-w{w}-{i}")))
                        .await
                        .unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A retried publish (same id) appends nothing more.
    routers[1]
        .publish(request(&streams[0], "s0-w0-0"))
        .await
        .unwrap();
    tap_a.close().await;
    tap_b.close().await;
    let events = stream_events(&nats).await;
    assert_eq!(events.len(), streams.len() * 200, "once each");
    let chains = chains(&events);
    for stream in &streams {
        let chain = &chains[&event_message_subject(stream)];
        assert_eq!(
            seqs(chain),
            (1..=200).collect::<Vec<u64>>(),
            "{stream}: every seq once, in order"
        );
        let nodes: std::collections::HashSet<&str> = chain.iter().map(|c| c.2.as_str()).collect();
        assert_eq!(nodes.len(), 2, "{stream}: both taps appended");
    }
}

static METRICS: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();

fn counter(name_and_labels: &str) -> f64 {
    let handle = METRICS.get_or_init(|| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .expect("the only recorder of this test process")
    });
    handle
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name_and_labels} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_jetstream_never_holds_a_publish_and_the_next_message_fills_the_gap() {
    counter("");
    let nats = Server::nats();
    let history = history();
    // A queue of 16 in all (one per lane): most events of the burst below
    // cannot wait for a frozen JetStream and are dropped.
    let tap = tap(&nats, &history, "r1", 16).await;
    let router = router(&history, Some(&tap));
    let dropped_before =
        counter(r#"switchboard_event_tap_dropped_total{kind="message",reason="queue_full"}"#);
    nats.pause();
    let started = Instant::now();
    for i in 0..200 {
        let target = chat(&format!("c{}", i % 4));
        router
            .publish(request(&target, &format!("m{i}")))
            .await
            .unwrap();
    }
    let took = started.elapsed();
    nats.resume();
    assert!(took < Duration::from_secs(2), "publishes waited: {took:?}");
    let dropped =
        counter(r#"switchboard_event_tap_dropped_total{kind="message",reason="queue_full"}"#)
            - dropped_before;
    assert!(dropped > 100.0, "dropped {dropped}");
    // Once the tap has room again, each chat's next message brings it up
    // to date from history.
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter("switchboard_event_tap_queue_events") > 0.0 {
        assert!(Instant::now() < deadline, "the tap's queue never emptied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for c in 0..4 {
        router
            .publish(request(&chat(&format!("c{c}")), &format!("last{c}")))
            .await
            .unwrap();
    }
    let events = wait_for_events(&nats, 204).await;
    let chains = chains(&events);
    for c in 0..4 {
        let chain = &chains[&event_message_subject(&chat(&format!("c{c}")))];
        assert_eq!(seqs(chain), (1..=51).collect::<Vec<u64>>(), "c{c}");
    }
    assert_eq!(events.len(), 204, "once each");
    assert!(counter(r#"switchboard_event_tap_total{kind="message",result="filled"}"#) >= dropped);
    tap.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_what_was_sequenced_since_the_stream_exists_is_filled_in() {
    let nats = Server::nats();
    let history = history();
    let old = chat("old");
    // Sequenced five minutes ago (history still holds it): before the tap.
    let draft = Draft {
        sender: UserId::parse("alice").unwrap(),
        client_msg_id: "before".into(),
        payload: Bytes::from_static(b"x"),
        timestamp_ms: switchboard_protocol::now_ms() - 300_000,
    };
    history.append(&old, draft).await.unwrap();
    let tap = tap(&nats, &history, "r1", 1024).await;
    // Sequenced with the tap on but not tapped (as by a router that died).
    let fresh = chat("fresh");
    let untapped = router(&history, None);
    for i in 0..3 {
        untapped
            .publish(request(&fresh, &format!("lost{i}")))
            .await
            .unwrap();
    }
    let tapped = router(&history, Some(&tap));
    tapped.publish(request(&old, "after")).await.unwrap();
    tapped.publish(request(&fresh, "found")).await.unwrap();
    tap.close().await;
    let chains = chains(&stream_events(&nats).await);
    let old_chain = &chains[&event_message_subject(&old)];
    assert_eq!(seqs(old_chain), vec![2], "nothing from before the stream");
    let fresh_chain = &chains[&event_message_subject(&fresh)];
    assert_eq!(
        seqs(fresh_chain),
        vec![1, 2, 3, 4],
        "the lost ones filled in"
    );
    assert_eq!(fresh_chain[0].1, "lost0");
    assert_eq!(fresh_chain[3].1, "found");
}
