//! A router replica SIGKILLed while publishes are in flight: the edge's
//! publish path (`RemoteRouter`) retries on the other replica and every
//! client message id gets exactly one seq. Real nats-server, redis-server
//! and router processes.
use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use bytes::Bytes;
use switchboard_protocol::{ChatId, StreamKey, UserId, subject::ROUTER_PUBLISH};
use switchboard_router::{
    History, HistoryLimits, MemoryBus, PublishRequest, Publisher, RedisHistory, RemoteRouter,
    connect_redis,
};
use switchboard_testkit::Server;

fn router(nats: &Server, redis: &Server, name: &str) -> Child {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Command::new(env!("CARGO_BIN_EXE_switchboard-router"))
        .env("SWITCHBOARD_NATS_URL", nats.url())
        .env("SWITCHBOARD_REDIS_URL", redis.url())
        .env("SWITCHBOARD_ROUTER_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_NODE_ID", name)
        .env("SWITCHBOARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until `n` replicas answer on the publish subject (a malformed
/// request gets an error reply from whichever replica takes it).
async fn wait_for_replicas(client: &async_nats::Client, n: usize) {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..400 {
        if let Ok(Ok(m)) = tokio::time::timeout(
            Duration::from_millis(200),
            client.request(ROUTER_PUBLISH, "x".into()),
        )
        .await
        {
            seen.insert(m.payload);
        }
        // Replies don't name the replica; give both time to subscribe.
        if !seen.is_empty() {
            tokio::time::sleep(Duration::from_millis(500 * n as u64)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no router answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_sigkilled_mid_publish_leaves_one_seq_per_message() {
    let nats = Server::nats();
    let redis = Server::redis();
    let mut doomed = router(&nats, &redis, "doomed");
    let mut survivor = router(&nats, &redis, "survivor");
    let client = async_nats::connect(nats.url()).await.unwrap();
    wait_for_replicas(&client, 2).await;
    let publisher = Arc::new(RemoteRouter::new(
        client.clone(),
        Arc::new(MemoryBus::new()),
        Duration::from_millis(500),
    ));
    let chat = ChatId::parse("crash").unwrap();
    let (writers, each) = (8, 40);
    let total = writers * each;
    let acks = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (publisher, acks, chat) = (publisher.clone(), acks.clone(), chat.clone());
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..each {
                let req = PublishRequest {
                    sender: UserId::parse(&format!("w{w}")).unwrap(),
                    target: StreamKey::Chat(chat.clone()),
                    client_msg_id: format!("w{w}-{i}"),
                    payload: Bytes::from(format!("w{w}-{i}")),
                };
                // Like an app: a refused publish is sent again, same id.
                let published = loop {
                    match publisher.publish(req.clone()).await {
                        Ok(p) => break p,
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                };
                acks.fetch_add(1, Ordering::Relaxed);
                seqs.push(published.seq);
            }
            seqs
        }));
    }
    // SIGKILL while eight writers have requests in flight.
    while acks.load(Ordering::Relaxed) < total / 4 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    let killed_at = acks.load(Ordering::Relaxed);
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert!(killed_at < total, "killed mid-run");
    acked.sort();
    assert_eq!(
        acked,
        (1..=total as u64).collect::<Vec<_>>(),
        "one seq per client message id, none skipped"
    );
    // History holds each message once, in that order.
    let history = RedisHistory::new(
        connect_redis(&redis.url()).await.unwrap(),
        HistoryLimits::default(),
    );
    let got = history
        .recover(&StreamKey::Chat(chat), Some(0), "")
        .await
        .unwrap();
    let mut payloads: Vec<Bytes> = got
        .frames
        .iter()
        .filter_map(|f| match f.frame().kind.as_ref() {
            Some(switchboard_protocol::v1::server_frame::Kind::Delivery(d)) => {
                Some(d.payload.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(payloads.len(), total);
    payloads.sort();
    payloads.dedup();
    assert_eq!(payloads.len(), total, "no message stored twice");
    survivor.kill().unwrap();
    survivor.wait().unwrap();
}
