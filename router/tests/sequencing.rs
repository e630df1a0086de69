//! Batched sequencing through one Router on a real redis-server: many
//! concurrent publishes share round trips yet keep one gapless order per
//! chat, in arrival order, with exactly-once acks.
use std::{collections::HashMap, sync::Arc};

use bytes::Bytes;
use switchboard_presence::MemoryPresence;
use switchboard_protocol::{ChatId, StreamKey, UserId};
use switchboard_router::{
    HistoryLimits, MemoryBus, PublishRequest, RedisHistory, Router, RouterLimits, connect_redis,
};
use switchboard_testkit::Server;

const CHATS: usize = 10;
const PUBLISHES: usize = 1000;

fn request(i: usize) -> PublishRequest {
    PublishRequest {
        sender: UserId::parse(&format!("u{}", i % 7)).unwrap(),
        target: StreamKey::Chat(ChatId::parse(&format!("c{}", i % CHATS)).unwrap()),
        client_msg_id: format!("m{i}"),
        payload: Bytes::from(format!("body {i}")),
    }
}

/// `(count, sum)` of a summary or histogram in a Prometheus rendering.
fn count_and_sum(rendered: &str, name: &str) -> (f64, f64) {
    let value = |suffix: &str| {
        rendered
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{suffix} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (value("_count"), value("_sum"))
}

// One thread: publishes are spawned, and so queued, in index order, which
// makes arrival order something the test can check.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_publishes_are_batched_in_order_and_acked_once() {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder of this test process");
    let redis = Server::redis();
    let conn = connect_redis(&redis.url()).await.unwrap();
    let history = RedisHistory::new(
        conn,
        HistoryLimits {
            max_messages: PUBLISHES,
            ..HistoryLimits::default()
        },
    );
    let router = Arc::new(Router::new(
        Arc::new(history),
        Arc::new(MemoryBus::new()),
        Arc::new(MemoryPresence::new(60_000, 100)),
        RouterLimits::default(),
    ));

    let burst: Vec<_> = (0..PUBLISHES)
        .map(|i| {
            let router = router.clone();
            tokio::spawn(async move { router.publish(request(i)).await })
        })
        .collect();
    let mut seqs: HashMap<usize, Vec<u64>> = HashMap::new();
    let mut first_seq = Vec::with_capacity(PUBLISHES);
    for (i, task) in burst.into_iter().enumerate() {
        let ack = task.await.unwrap().expect("every publish is acked");
        assert!(!ack.duplicate, "m{i} acked as new exactly once");
        seqs.entry(i % CHATS).or_default().push(ack.seq);
        first_seq.push(ack.seq);
    }
    for (chat, got) in &seqs {
        let n = got.len() as u64;
        // In arrival order, and so also no gap and no duplicate.
        assert_eq!(got, &(1..=n).collect::<Vec<_>>(), "chat c{chat}");
    }

    // Retries, batched together, get the first seq and store nothing.
    let retries: Vec<_> = (0..PUBLISHES)
        .step_by(7)
        .map(|i| {
            let router = router.clone();
            tokio::spawn(async move { (i, router.publish(request(i)).await) })
        })
        .collect();
    for task in retries {
        let (i, ack) = task.await.unwrap();
        let ack = ack.expect("a retry is acked");
        assert!(ack.duplicate, "m{i} is a retry");
        assert_eq!(ack.seq, first_seq[i], "m{i} keeps its seq");
    }
    let next = router.publish(request(PUBLISHES)).await.unwrap();
    assert_eq!(
        next.seq,
        (PUBLISHES / CHATS) as u64 + 1,
        "no seq spent on retries"
    );

    let (batches, appends) =
        count_and_sum(&metrics.render(), "switchboard_router_sequence_batch_size");
    assert_eq!(appends as usize, PUBLISHES + PUBLISHES.div_ceil(7) + 1);
    assert!(
        batches < appends / 2.0,
        "appends shared round trips: {appends} in {batches} batches"
    );
}
