//! A Redis Cluster primary SIGKILLed, its replica promoted (real servers):
//! a stream written on both gets a new epoch, so no (epoch, seq) names two
//! messages, and the acked writes the failover lost are counted (ADR 0019).
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard_protocol::{ChatId, StreamKey, UserId};
use switchboard_router::{
    Appended, Draft, History, HistoryLimits, Recovery, RedisHistory, connect_redis,
};
use switchboard_testkit::RedisCluster;

fn chat(c: &str) -> StreamKey {
    StreamKey::Chat(ChatId::parse(c).unwrap())
}

fn draft(id: &str) -> Draft {
    Draft {
        sender: UserId::parse("alice").unwrap(),
        client_msg_id: id.into(),
        payload: Bytes::from(format!("body of {id}")),
        timestamp_ms: switchboard_protocol::now_ms(),
    }
}

fn limits() -> HistoryLimits {
    HistoryLimits {
        max_messages: 100,
        max_age_ms: 60_000,
        max_streams: 1000,
        dedup_entries: 100,
    }
}

fn epoch_of(a: &Appended) -> String {
    match a.frame.frame().kind.as_ref().unwrap() {
        switchboard_protocol::v1::server_frame::Kind::Delivery(d) => d.epoch.clone(),
        _ => panic!("not a delivery"),
    }
}

/// Appends until the cluster answers (the client finds the new master).
async fn append_after_failover(
    h: &RedisHistory,
    c: &RedisCluster,
    stream: &StreamKey,
    id: &str,
) -> Appended {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match h.append(stream, draft(id)).await {
            Ok(a) => return a,
            Err(e) if Instant::now() > deadline => {
                panic!("no append after failover: {e}\n{}", c.logs())
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Recovers until the cluster answers (a transaction fails on a slot that
/// moved, once, while the client learns the new master).
async fn recover_after_failover(
    h: &RedisHistory,
    stream: &StreamKey,
    since: Option<u64>,
    epoch: &str,
) -> Recovery {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match h.recover(stream, since, epoch).await {
            Ok(r) => return r,
            Err(e) if Instant::now() > deadline => panic!("no recovery after failover: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test]
async fn a_stream_written_across_a_failover_gets_a_new_epoch() {
    let mut cluster = RedisCluster::start();
    let h = RedisHistory::new(connect_redis(&cluster.url()).await.unwrap(), limits());
    let s = chat("fo");
    let mut first = Vec::new();
    for i in 1..=3 {
        first.push(h.append(&s, draft(&format!("m{i}"))).await.unwrap());
    }
    let old = epoch_of(&first[0]);
    let (master, replica) = cluster.master_and_replica_of("sb:{chat:fo}:seq").unwrap();
    cluster.wait_replicated(master, replica).unwrap();
    cluster.nodes()[master].kill();
    cluster
        .wait_promoted(replica)
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));

    // Nothing was lost: recovery still serves the old epoch...
    let r = recover_after_failover(&h, &s, Some(1), &old).await;
    assert!(!r.position.resync_required);
    assert_eq!((r.position.seq, r.frames.len()), (3, 2));
    // ...but the first write on the promoted replica cannot know that.
    let next = append_after_failover(&h, &cluster, &s, "m4").await;
    let new = epoch_of(&next);
    assert_ne!(new, old, "a write on a new primary starts a new epoch");
    assert_eq!(next.seq, 4, "seqs go on from what survived");
    assert_eq!(h.failover_counts(), (0, 1), "fenced once, nothing lost");
    let r = h.recover(&s, Some(3), &old).await.unwrap();
    assert!(r.position.resync_required, "the old epoch is over");
    let r = h.recover(&s, Some(3), &new).await.unwrap();
    assert!(!r.position.resync_required);
    assert_eq!((r.position.seq, r.frames.len()), (4, 1));
    // A retry of a message of the old epoch is a duplicate in that epoch.
    let again = h.append(&s, draft("m2")).await.unwrap();
    assert!(again.duplicate);
    assert_eq!((again.seq, epoch_of(&again)), (2, old));
    // One fence per failover: the stream goes on in its new epoch.
    let after = h.append(&s, draft("m5")).await.unwrap();
    assert_eq!((after.seq, epoch_of(&after)), (5, new));
    assert_eq!(h.failover_counts(), (0, 1));
}

#[tokio::test]
async fn acked_writes_lost_in_the_replication_window_are_counted() {
    let mut cluster = RedisCluster::start();
    // Two histories on their own connections stand for two routers.
    let a = RedisHistory::new(connect_redis(&cluster.url()).await.unwrap(), limits());
    let b = RedisHistory::new(connect_redis(&cluster.url()).await.unwrap(), limits());
    let s = chat("lost");
    a.append(&s, draft("m1")).await.unwrap();
    b.append(&s, draft("m2")).await.unwrap();
    let (master, replica) = cluster.master_and_replica_of("sb:{chat:lost}:seq").unwrap();
    cluster.wait_replicated(master, replica).unwrap();

    // Acked by the master, never replicated: 3 by a, 2 by b.
    cluster.stall_replication(master, replica, "filler{chat:lost}");
    let mut acked = Vec::new();
    for (h, id) in [(&a, "m3"), (&b, "m4"), (&a, "m5"), (&b, "m6"), (&a, "m7")] {
        acked.push(h.append(&s, draft(id)).await.unwrap());
    }
    let old = epoch_of(&acked[0]);
    let lost: Vec<u64> = acked.iter().map(|x| x.seq).collect();
    assert_eq!(lost, [3, 4, 5, 6, 7]);
    cluster.nodes()[master].kill();
    cluster.nodes()[replica].resume();
    cluster
        .wait_promoted(replica)
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));

    let r = recover_after_failover(&a, &s, None, "").await;
    assert_eq!(
        (r.position.seq, r.position.epoch.as_str()),
        (2, old.as_str())
    );
    let next = append_after_failover(&a, &cluster, &s, "m8").await;
    let new = epoch_of(&next);
    assert_ne!(new, old, "seq 3 again, but in a new epoch");
    assert_eq!(next.seq, 3);
    assert_eq!(a.failover_counts(), (3, 1), "a lost 3, fenced the stream");
    // b learns of the cut on its next write to the stream.
    let later = b.append(&s, draft("m9")).await.unwrap();
    assert_eq!((later.seq, epoch_of(&later)), (4, new.clone()));
    assert_eq!(b.failover_counts(), (2, 0), "b lost 2, the fence was a's");
    // A lost message retried is sequenced anew, in the new epoch.
    let retried = b.append(&s, draft("m4")).await.unwrap();
    assert!(!retried.duplicate);
    assert_eq!((retried.seq, epoch_of(&retried)), (5, new.clone()));
    assert!(
        a.recover(&s, Some(2), &old)
            .await
            .unwrap()
            .position
            .resync_required
    );
}
