//! One contract, every History backend: memory, and Redis on a real
//! redis-server, a real Redis Cluster and a real Sentinel setup spawned
//! for the test.
use std::sync::Arc;

use bytes::Bytes;
use switchboard_protocol::{ChatId, StreamKey, UserId};
use switchboard_router::{
    Draft, History, HistoryError, HistoryLimits, MemoryHistory, RedisHistory, connect_redis,
};
use switchboard_testkit::{RedisCluster, RedisSentinel, Server};

fn chat(c: &str) -> StreamKey {
    StreamKey::Chat(ChatId::parse(c).unwrap())
}

fn draft(sender: &str, id: &str) -> Draft {
    Draft {
        sender: UserId::parse(sender).unwrap(),
        client_msg_id: id.into(),
        payload: Bytes::from(format!("body of {id}")),
        timestamp_ms: switchboard_protocol::now_ms(),
    }
}

fn limits() -> HistoryLimits {
    HistoryLimits {
        max_messages: 5,
        max_age_ms: 60_000,
        max_streams: 1000,
        dedup_entries: 100,
    }
}

async fn contract(h: Arc<dyn History>) {
    // Sequencing and de-duplication.
    let a = h.append(&chat("c1"), draft("alice", "m1")).await.unwrap();
    let b = h.append(&chat("c1"), draft("bob", "m1")).await.unwrap();
    let again = h.append(&chat("c1"), draft("alice", "m1")).await.unwrap();
    assert_eq!((a.seq, b.seq), (1, 2), "per-sender dedup keys");
    assert!(again.duplicate && again.seq == 1 && again.timestamp_ms == a.timestamp_ms);
    assert_eq!(
        h.append(&chat("other"), draft("alice", "m1"))
            .await
            .unwrap()
            .seq,
        1,
        "per-stream seqs"
    );

    // Recovery inside the window, with payloads intact.
    let epoch = h
        .recover(&chat("c1"), None, "")
        .await
        .unwrap()
        .position
        .epoch;
    assert!(!epoch.is_empty());
    let r = h.recover(&chat("c1"), Some(1), &epoch).await.unwrap();
    assert!(!r.position.resync_required);
    assert_eq!(r.position.seq, 2);
    let d = match r.frames[0].frame().kind.as_ref().unwrap() {
        switchboard_protocol::v1::server_frame::Kind::Delivery(d) => d.clone(),
        _ => panic!("not a delivery"),
    };
    assert_eq!(
        (d.seq, d.sender.as_str(), &d.payload[..], d.epoch.as_str()),
        (2, "bob", &b"body of m1"[..], epoch.as_str())
    );

    // Window overflow: since=1 after 7 messages with a window of 5.
    for i in 3..=7 {
        h.append(&chat("c1"), draft("alice", &format!("m{i}")))
            .await
            .unwrap();
    }
    let r = h.recover(&chat("c1"), Some(1), &epoch).await.unwrap();
    assert!(r.position.resync_required);
    let seqs: Vec<u64> = r
        .frames
        .iter()
        .map(|f| f.delivery_position().unwrap().1)
        .collect();
    assert_eq!(seqs, [3, 4, 5, 6, 7]);
    let r = h.recover(&chat("c1"), Some(4), &epoch).await.unwrap();
    assert!(!r.position.resync_required);
    assert_eq!(r.position.recovered, 3);

    // Wrong epoch, future seq, unknown stream.
    assert!(
        h.recover(&chat("c1"), Some(7), "nope")
            .await
            .unwrap()
            .position
            .resync_required
    );
    assert!(
        h.recover(&chat("c1"), Some(8), &epoch)
            .await
            .unwrap()
            .position
            .resync_required
    );
    let unknown = h.recover(&chat("never"), Some(0), "").await.unwrap();
    assert!(!unknown.position.resync_required && unknown.frames.is_empty());
    assert!(
        h.recover(&chat("never"), Some(3), "")
            .await
            .unwrap()
            .position
            .resync_required
    );

    // Personal streams behave the same.
    let u = StreamKey::User(UserId::parse("carol").unwrap());
    assert_eq!(h.append(&u, draft("dave", "x")).await.unwrap().seq, 1);

    // Positions, many streams at once (on a cluster, several slots), in
    // the order asked; a stream without history stands at (0, "").
    let asked = [chat("c1"), chat("never"), u.clone(), chat("other")];
    let at: Vec<(u64, String)> = h
        .positions(&asked)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.seq, p.epoch))
        .collect();
    assert_eq!((at[0].0, at[0].1.as_str()), (7, epoch.as_str()));
    assert_eq!(at[1], (0, String::new()));
    assert_eq!(at[2].0, 1);
    assert_eq!(at[3].0, 1);
    for (p, key) in at.iter().zip(&asked) {
        let one = h.recover(key, None, "").await.unwrap().position;
        assert_eq!(*p, (one.seq, one.epoch), "{key}");
    }
    assert!(h.positions(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn memory_history_meets_the_contract() {
    contract(Arc::new(MemoryHistory::new(limits()))).await;
}

#[tokio::test]
async fn redis_history_meets_the_contract() {
    let redis = Server::redis();
    let conn = connect_redis(&redis.url()).await.unwrap();
    contract(Arc::new(RedisHistory::new(conn, limits()))).await;
}

#[tokio::test]
async fn redis_cluster_history_meets_the_contract() {
    let cluster = RedisCluster::start();
    let conn = connect_redis(&cluster.url()).await.unwrap();
    contract(Arc::new(RedisHistory::new(conn, limits()))).await;
}

#[tokio::test]
async fn redis_sentinel_history_meets_the_contract() {
    let sentinel = RedisSentinel::start();
    let conn = connect_redis(&sentinel.url()).await.unwrap();
    contract(Arc::new(RedisHistory::new(conn, limits()))).await;
}

#[tokio::test]
async fn history_resumes_after_a_sentinel_failover() {
    let mut sentinel = RedisSentinel::start();
    let conn = connect_redis(&sentinel.url()).await.unwrap();
    let h = RedisHistory::new(conn, limits());
    let first = h.append(&chat("f"), draft("a", "1")).await.unwrap();
    assert_eq!(first.seq, 1);
    let replica = sentinel.replica().port();
    sentinel.primary().kill();
    // The same connection finds the promoted replica by itself.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let appended = loop {
        match h.append(&chat("f"), draft("a", "2")).await {
            Ok(a) => break a,
            Err(e) if std::time::Instant::now() > deadline => {
                panic!("no append after failover: {e}\n{}", sentinel.logs())
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    };
    assert_eq!(sentinel.current_primary_port(), Some(replica));
    let r = h.recover(&chat("f"), None, "").await.unwrap();
    assert_eq!(r.position.seq, appended.seq);
    let again = h.append(&chat("f"), draft("a", "3")).await.unwrap();
    assert_eq!(again.seq, appended.seq + 1, "one order on the new primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appenders_get_one_gapless_order() {
    let redis = Server::redis();
    let mut tasks = Vec::new();
    for w in 0..4 {
        // Separate connections stand for separate router replicas.
        let conn = connect_redis(&redis.url()).await.unwrap();
        let h = RedisHistory::new(
            conn,
            HistoryLimits {
                max_messages: 1000,
                ..limits()
            },
        );
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..100 {
                seqs.push(
                    h.append(&chat("hot"), draft(&format!("w{w}"), &format!("m{i}")))
                        .await
                        .unwrap()
                        .seq,
                );
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|p| p[0] < p[1]),
            "each replica sees increasing seqs"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=400).collect::<Vec<u64>>());
}

#[tokio::test]
async fn redis_outage_is_a_typed_error() {
    let mut redis = Server::redis();
    let conn = connect_redis(&redis.url()).await.unwrap();
    let h = RedisHistory::new(conn, limits());
    h.append(&chat("c"), draft("a", "1")).await.unwrap();
    redis.kill();
    let err = h.append(&chat("c"), draft("a", "2")).await.unwrap_err();
    assert!(matches!(err, HistoryError::Redis(_)), "{err:?}");
    assert!(std::error::Error::source(&err).is_some(), "{err:?}");
    assert!(err.to_string().starts_with("history unavailable"), "{err}");
    redis.restart();
    // The connection manager reconnects by itself; history was lost with
    // the process, so the stream starts a new epoch.
    let mut ok = None;
    for _ in 0..50 {
        if let Ok(a) = h.append(&chat("c"), draft("a", "3")).await {
            ok = Some(a);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(ok.expect("reconnected").seq, 1);
}
