//! A router SIGKILLed in the middle of a 10,000-member channel post: the
//! shard jobs it held are delivered again to the other router, and every
//! offline member ends with exactly one push job and an unread counter of
//! exactly one. Real nats-server (JetStream), redis-server and two router
//! processes.
use std::{
    collections::HashMap,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use prost::Message;
use serde_json::{Value, json};
use switchboard_protocol::internal::v1::PushJob;
use switchboard_router::{PUSH_STREAM, SHARD_CONSUMER, SHARD_STREAM, connect_redis};
use switchboard_testkit::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const API_KEY: &str = "crash-key";
const MEMBERS: usize = 10_000;
/// Many small jobs, so a router is busy with some when it is killed.
const BUCKETS: &str = "1000";

fn router(nats: &Server, redis: &Server, name: &str) -> (Child, SocketAddr) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_switchboard-router"))
        .env("SWITCHBOARD_NATS_URL", nats.url())
        .env("SWITCHBOARD_REDIS_URL", redis.url())
        .env("SWITCHBOARD_ROUTER_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_NODE_ID", name)
        .env("SWITCHBOARD_API_KEY", API_KEY)
        .env("SWITCHBOARD_CHANNEL_BUCKETS", BUCKETS)
        .env("SWITCHBOARD_SHARD_ACK_WAIT_MS", "2000")
        .env("SWITCHBOARD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// One HTTP/1.1 request; (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, body: &Value) -> (u16, String) {
    let body = body.to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (status, body.unwrap_or_default())
}

async fn wait_ready(addr: SocketAddr) {
    for _ in 0..500 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .await;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            if out.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("router {addr} not ready");
}

/// Value of an unlabelled series in a router's /metrics.
async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, text) = http(addr, "GET", "/metrics", &json!({})).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_sigkilled_mid_post_leaves_one_push_job_and_one_unread_per_member() {
    let (nats, redis) = (Server::nats(), Server::redis());
    let (mut doomed, doomed_addr) = router(&nats, &redis, "doomed");
    wait_ready(doomed_addr).await;
    let (mut survivor, survivor_addr) = router(&nats, &redis, "survivor");
    wait_ready(survivor_addr).await;

    let members: Vec<String> = (0..MEMBERS).map(|i| format!("m{i}")).collect();
    let (status, body) = http(
        survivor_addr,
        "POST",
        "/api/channels/news/members",
        &json!({ "add": members }),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut push = js.get_stream(PUSH_STREAM).await.unwrap();
    // The publish is answered once its shard jobs are queued; both routers
    // are then working through them.
    let (status, body) = http(
        survivor_addr,
        "POST",
        "/api/publish",
        &json!({"chat": "news", "client_msg_id": "post-1", "text": "big news"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // SIGKILL as soon as the first push jobs appear: mid-post.
    let started = Instant::now();
    let mut at_kill = 0;
    while started.elapsed() < Duration::from_secs(10) {
        at_kill = push.info().await.unwrap().state.messages;
        if at_kill > 0 {
            break;
        }
    }
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    assert!(
        at_kill > 0 && at_kill < MEMBERS as u64,
        "killed mid-post: {at_kill} push jobs"
    );

    // The survivor finishes, the killed router's jobs after their ack wait.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let messages = push.info().await.unwrap().state.messages;
        let mut shard = js.get_stream(SHARD_STREAM).await;
        let jobs_left = match shard.as_mut() {
            Ok(s) => s.info().await.unwrap().state.messages,
            Err(_) => 0,
        };
        if (messages >= MEMBERS as u64 && jobs_left == 0) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every member: exactly one push job for the post.
    let consumer = push
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("test-push".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut per_user: HashMap<String, usize> = HashMap::new();
    loop {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .messages()
            .await
            .unwrap();
        let mut got = 0;
        while let Some(m) = batch.next().await {
            let m = m.unwrap();
            let job = PushJob::decode(m.payload.clone()).unwrap();
            let d = job.delivery.unwrap();
            assert_eq!((d.chat.as_str(), d.seq), ("news", 1));
            *per_user.entry(job.user).or_default() += 1;
            m.ack().await.unwrap();
            got += 1;
        }
        if got == 0 {
            break;
        }
    }
    let missing = members
        .iter()
        .filter(|u| !per_user.contains_key(*u))
        .count();
    assert_eq!(missing, 0, "members without a push job");
    let twice = per_user.values().filter(|n| **n > 1).count();
    assert_eq!(twice, 0, "members with more than one push job");
    assert_eq!(per_user.len(), MEMBERS);

    // Every member: unread exactly 1.
    let mut conn = connect_redis(&redis.url()).await.unwrap();
    let mut pipe = redis::pipe();
    for u in &members {
        pipe.cmd("HGET")
            .arg(format!("sb:{{user:{u}}}:unread"))
            .arg("news");
    }
    let unread: Vec<Option<i64>> = pipe.query_async(&mut conn).await.unwrap();
    let wrong = unread.iter().filter(|n| **n != Some(1)).count();
    assert_eq!(wrong, 0, "members whose unread counter is not 1");

    // The kill landed mid-job: the survivor ran jobs delivered before.
    let redelivered = metric(
        survivor_addr,
        "switchboard_router_shard_jobs_redelivered_total",
    )
    .await;
    assert!(redelivered > 0.0, "no job was redelivered");
    let consumer_info = js
        .get_stream(SHARD_STREAM)
        .await
        .unwrap()
        .consumer_info(SHARD_CONSUMER)
        .await
        .unwrap();
    assert_eq!(
        (consumer_info.num_pending, consumer_info.num_ack_pending),
        (0, 0)
    );
    survivor.kill().unwrap();
    survivor.wait().unwrap();
}
