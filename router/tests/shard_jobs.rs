//! Member work is safe to repeat, because repeating is what JetStream does
//! with a shard job whose router died before acknowledging it: a job run
//! again (or late, after newer posts) bumps no unread counter twice and
//! queues no second push job, and a post's shard jobs published twice are
//! stored once. Real nats-server (JetStream) and redis-server, and a real
//! Redis Cluster for the per-user scripts.
use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message;
use switchboard_presence::RedisPresence;
use switchboard_protocol::{
    ChatId, StreamKey, UserId,
    internal::v1::{PushJob, ShardJob},
    v1::Delivery,
};
use switchboard_router::{
    Draft, History, HistoryLimits, Members, MembersSettings, PUSH_STREAM, RedisHistory,
    SHARD_STREAM, connect_redis,
};
use switchboard_testkit::{RedisCluster, Server};

const BUCKETS: u32 = 4;

async fn members(nats: &Server, redis_url: &str) -> Members {
    let conn = connect_redis(redis_url).await.unwrap();
    let presence = Arc::new(RedisPresence::new(conn.clone(), 30_000));
    Members::new(
        conn,
        presence,
        async_nats::connect(nats.url()).await.unwrap(),
        MembersSettings {
            buckets: BUCKETS,
            stream_replicas: 1,
            shard_ack_wait: Duration::from_secs(2),
        },
    )
    .await
    .unwrap()
}

fn job(channel: &str, bucket: u32, seq: u64) -> ShardJob {
    ShardJob {
        channel: channel.into(),
        bucket,
        delivery: Some(Delivery {
            chat: channel.into(),
            seq,
            sender: "boss".into(),
            payload: Bytes::from(format!("post {seq}")),
            client_msg_id: format!("p{seq}"),
            ..Default::default()
        }),
        whole_chat: false,
    }
}

/// Runs every bucket's job of post `seq`.
async fn post(m: &Members, channel: &str, seq: u64) {
    for b in 0..BUCKETS {
        m.process_shard(job(channel, b, seq)).await.unwrap();
    }
}

async fn unread(redis_url: &str, users: &[UserId], channel: &str) -> Vec<i64> {
    let mut conn = connect_redis(redis_url).await.unwrap();
    let mut out = Vec::new();
    for u in users {
        let n: Option<i64> = redis::cmd("HGET")
            .arg(format!("sb:{{user:{u}}}:unread"))
            .arg(channel)
            .query_async(&mut conn)
            .await
            .unwrap();
        out.push(n.unwrap_or(0));
    }
    out
}

/// Push jobs in SB_PUSH per (user, chat, seq), consumed.
async fn push_jobs(nats: &Server) -> HashMap<(String, String, u64), usize> {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream(PUSH_STREAM).await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("test-push".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seen = HashMap::new();
    loop {
        let mut batch = consumer.fetch().max_messages(500).messages().await.unwrap();
        let mut got = 0;
        while let Some(m) = batch.next().await {
            let m = m.unwrap();
            let job = PushJob::decode(m.payload.clone()).unwrap();
            let d = job.delivery.unwrap();
            *seen.entry((job.user, d.chat, d.seq)).or_default() += 1;
            m.ack().await.unwrap();
            got += 1;
        }
        if got == 0 {
            return seen;
        }
    }
}

async fn a_repeated_or_late_job_counts_once(nats: &Server, redis_url: &str) {
    let m = members(nats, redis_url).await;
    let news = ChatId::parse("news").unwrap();
    let users: Vec<UserId> = (0..40)
        .map(|i| UserId::parse(&format!("u{i}")).unwrap())
        .collect();
    assert_eq!(m.add(&news, &users).await.unwrap(), 40);

    post(&m, "news", 1).await;
    assert!(
        unread(redis_url, &users, "news")
            .await
            .iter()
            .all(|n| *n == 1)
    );
    // Redelivered: nothing changes.
    post(&m, "news", 1).await;
    assert!(
        unread(redis_url, &users, "news")
            .await
            .iter()
            .all(|n| *n == 1),
        "a redelivered job counted again"
    );
    // Post 3 first, then post 2's job arrives late (its router died), then
    // both again: each counts exactly once.
    post(&m, "news", 3).await;
    post(&m, "news", 2).await;
    post(&m, "news", 3).await;
    post(&m, "news", 2).await;
    post(&m, "news", 1).await;
    assert!(
        unread(redis_url, &users, "news")
            .await
            .iter()
            .all(|n| *n == 3)
    );
    // A new post far ahead still counts; one 52 posts behind the newest
    // counted is taken as already counted, never as new.
    post(&m, "news", 100).await;
    post(&m, "news", 47).await;
    post(&m, "news", 100).await;
    assert!(
        unread(redis_url, &users, "news")
            .await
            .iter()
            .all(|n| *n == 4)
    );
    post(&m, "news", 48).await;
    assert!(
        unread(redis_url, &users, "news")
            .await
            .iter()
            .all(|n| *n == 5)
    );
    // Channels are counted apart.
    let other = ChatId::parse("other").unwrap();
    m.add(&other, &users[..1]).await.unwrap();
    post(&m, "other", 1).await;
    assert_eq!(unread(redis_url, &users[..1], "other").await, [1]);

    // One push job per offline member and post, however often it ran.
    let pushes = push_jobs(nats).await;
    let twice: Vec<_> = pushes.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "a second push job: {twice:?}");
    assert_eq!(pushes.len(), 40 * 6 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_or_late_shard_job_changes_nothing_on_redis() {
    let (nats, redis) = (Server::nats(), Server::redis());
    a_repeated_or_late_job_counts_once(&nats, &redis.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_or_late_shard_job_changes_nothing_on_a_redis_cluster() {
    let (nats, cluster) = (Server::nats(), RedisCluster::start());
    a_repeated_or_late_job_counts_once(&nats, &cluster.url()).await;
}

/// Jobs stored in SB_SHARD so far.
async fn shard_jobs_stored(nats: &Server) -> u64 {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.get_stream(SHARD_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

fn draft(id: &str) -> Draft {
    Draft {
        sender: UserId::parse("boss").unwrap(),
        client_msg_id: id.into(),
        payload: Bytes::from_static(b"hello"),
        timestamp_ms: switchboard_protocol::now_ms(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_scheduled_twice_stores_its_shard_jobs_once() {
    let (nats, redis) = (Server::nats(), Server::redis());
    let m = members(&nats, &redis.url()).await;
    let news = ChatId::parse("news").unwrap();
    m.add(&news, &[UserId::parse("u1").unwrap()]).await.unwrap();
    let history = RedisHistory::new(
        connect_redis(&redis.url()).await.unwrap(),
        HistoryLimits::default(),
    );
    let target = StreamKey::Chat(news);
    let first = history.append(&target, draft("p1")).await.unwrap();
    m.after_publish(&target, &first.frame).await.unwrap();
    // The retry of a publish whose router died after scheduling.
    let again = history.append(&target, draft("p1")).await.unwrap();
    assert!(again.duplicate);
    m.after_publish(&target, &again.frame).await.unwrap();
    assert_eq!(shard_jobs_stored(&nats).await, 1, "a small chat: one job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_chat_is_one_job_and_a_large_one_a_job_per_bucket() {
    let (nats, redis) = (Server::nats(), Server::redis());
    let m = members(&nats, &redis.url()).await;
    let history = RedisHistory::new(
        connect_redis(&redis.url()).await.unwrap(),
        HistoryLimits::default(),
    );
    // A group: one job covers every bucket, and does all the members' work.
    let group = ChatId::parse("group").unwrap();
    let users: Vec<UserId> = (0..20)
        .map(|i| UserId::parse(&format!("g{i}")).unwrap())
        .collect();
    m.add(&group, &users).await.unwrap();
    let target = StreamKey::Chat(group);
    let sent = history.append(&target, draft("g1")).await.unwrap();
    m.after_publish(&target, &sent.frame).await.unwrap();
    assert_eq!(shard_jobs_stored(&nats).await, 1);
    let mut whole = job("group", 0, sent.seq);
    whole.whole_chat = true;
    m.process_shard(whole).await.unwrap();
    assert_eq!(unread(&redis.url(), &users, "group").await, vec![1; 20]);
    let pushed = push_jobs(&nats).await;
    assert_eq!(pushed.len(), 20, "every offline member gets a push job");

    // Past the threshold: one job per bucket.
    let big = ChatId::parse("big").unwrap();
    let many: Vec<UserId> = (0..=switchboard_router::WHOLE_CHAT_MAX_MEMBERS)
        .map(|i| UserId::parse(&format!("b{i}")).unwrap())
        .collect();
    m.add(&big, &many).await.unwrap();
    let target = StreamKey::Chat(big);
    let sent = history.append(&target, draft("b1")).await.unwrap();
    m.after_publish(&target, &sent.frame).await.unwrap();
    assert_eq!(shard_jobs_stored(&nats).await, 1 + u64::from(BUCKETS));
}
