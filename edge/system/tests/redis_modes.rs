//! Edges and routers on a real Redis Cluster (three masters, three
//! replicas) and a real Sentinel setup: per-chat order across masters, a
//! slot migrated during a publish burst, and a SIGKILLed primary replaced
//! without restarting anything (ADR 0018).
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::common::{cluster::*, *};
use serde_json::{Value, json};
use switchboard_edge::Edge;
use switchboard_testkit::{RedisCluster, RedisSentinel, Server};

/// Publishes with one client message id until it is acked, as a client
/// does after a 503 (de-duplication makes the retry safe). Returns the
/// ack and how many answers were errors.
async fn publish_until_acked(
    raw: &mut Raw,
    chat: &str,
    id: &str,
    within: Duration,
) -> (Value, u32) {
    let deadline = Instant::now() + within;
    let mut errors = 0;
    loop {
        let r = raw
            .request(json!({"publish": {"chat": chat, "clientMsgId": id, "payload": b64(id)}}))
            .await;
        if let Some(ack) = r.get("publishAck") {
            return (ack.clone(), errors);
        }
        let code = r["error"]["code"].as_u64().unwrap_or(0);
        assert!(code >= 500, "publish {id} refused for good: {r}");
        assert!(
            Instant::now() < deadline,
            "publish {id} not acked within {within:?}: {r}"
        );
        errors += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_tier(
    nats: &Server,
    redis: &impl RedisUrl,
    routers: usize,
    edges: usize,
) -> (Vec<RouterNode>, Vec<Edge>) {
    let mut r = Vec::new();
    for i in 0..routers {
        r.push(start_router(nats, redis, &format!("router-{i}")).await);
    }
    wait_for_routers(nats).await;
    let mut e = Vec::new();
    for i in 0..edges {
        e.push(start_edge(nats, redis, &format!("edge-{i}")).await);
    }
    (r, e)
}

async fn stop_tier(routers: Vec<RouterNode>, edges: Vec<Edge>) {
    for e in edges {
        e.shutdown().await;
    }
    for r in routers {
        r.stop().await;
    }
}

/// One reader per edge, subscribed to every chat.
async fn readers(edges: &[Edge], chats: &[String]) -> Vec<Raw> {
    let mut out = Vec::new();
    for (i, e) in edges.iter().enumerate() {
        let mut r = Raw::connected(e, &format!("reader{i}")).await;
        for c in chats {
            let s = r.request(json!({"subscribe": {"chat": c}})).await;
            assert!(s.get("subscribeResult").is_some(), "{s}");
        }
        out.push(r);
    }
    out
}

/// `writers` concurrent writers, alternating edges, each publishing
/// `per_chat` messages to every chat in turn; `acked` counts acks.
fn spawn_writers(
    edges: &[Edge],
    chats: &[String],
    writers: usize,
    per_chat: usize,
    acked: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<u32>> {
    (0..writers)
        .map(|w| {
            let addr = edges[w % edges.len()].addr();
            let chats = chats.to_vec();
            let acked = acked.clone();
            tokio::spawn(async move {
                let mut raw = Raw::connected_addr(addr, &format!("writer{w}")).await;
                let mut errors = 0;
                for i in 0..per_chat {
                    for c in &chats {
                        let id = format!("{c}-w{w}-{i}");
                        let (_, e) =
                            publish_until_acked(&mut raw, c, &id, Duration::from_secs(30)).await;
                        errors += e;
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                }
                errors
            })
        })
        .collect()
}

/// Each chat's payloads in seq order, checked gapless from 1 and
/// duplicate-free.
fn orders(deliveries: &[Value]) -> HashMap<String, Vec<String>> {
    let mut by_chat: HashMap<String, Vec<(u64, String)>> = HashMap::new();
    for d in deliveries {
        let chat = d["chat"].as_str().expect("a chat delivery").to_owned();
        by_chat
            .entry(chat)
            .or_default()
            .push((seq(d), payload_text(d)));
    }
    by_chat
        .into_iter()
        .map(|(chat, got)| {
            let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
            assert_eq!(
                seqs,
                (1..=got.len() as u64).collect::<Vec<_>>(),
                "{chat}: gapless, duplicate-free, in order"
            );
            (chat, got.into_iter().map(|g| g.1).collect())
        })
        .collect()
}

/// A chat's whole history as a new subscriber recovers it.
async fn history(edge: &Edge, chat: &str, expect: usize) -> Vec<String> {
    let mut r = Raw::connected(edge, "historian").await;
    let s = r
        .request(json!({"subscribe": {"chat": chat, "since": "0", "epoch": ""}}))
        .await;
    let pos = &s["subscribeResult"]["position"];
    assert_eq!(pos["recovered"], expect as u64, "{s}");
    let got = r.deliveries(expect).await;
    orders(&got).remove(chat).unwrap_or_default()
}

/// Checks every reader and the history hold each chat once, gapless, in
/// one order, with exactly the payloads the writers had acked.
async fn check_one_order(
    readers: &mut [Raw],
    edges: &[Edge],
    chats: &[String],
    writers: usize,
    per_chat: usize,
) {
    let per = writers * per_chat;
    let mut first: Option<HashMap<String, Vec<String>>> = None;
    for r in readers.iter_mut() {
        let got = r.deliveries(per * chats.len()).await;
        let o = orders(&got);
        for c in chats {
            let order = o.get(c).map(Vec::as_slice).unwrap_or_default();
            let want: HashSet<String> = (0..writers)
                .flat_map(|w| (0..per_chat).map(move |i| format!("{c}-w{w}-{i}")))
                .collect();
            assert_eq!(order.len(), per, "{c}: every acked message, once");
            assert_eq!(order.iter().cloned().collect::<HashSet<_>>(), want, "{c}");
        }
        match &first {
            None => first = Some(o),
            Some(f) => assert_eq!(f, &o, "every edge sees the same order"),
        }
        r.assert_no_delivery(Duration::from_millis(200)).await;
    }
    let first = first.unwrap();
    for c in chats {
        assert_eq!(&history(&edges[1], c, per).await, &first[c], "{c}: history");
    }
}

/// The first chat names `chat-<i>` whose stream lives on each master.
fn chats_on_each_master(redis: &RedisCluster) -> Vec<String> {
    let masters = redis.masters();
    let mut chosen: Vec<Option<String>> = vec![None; masters.len()];
    for i in 0.. {
        let chat = format!("chat-{i}");
        // History keys carry the stream as their hash tag.
        let m = redis.master_of(redis.keyslot(&format!("chat:{chat}")));
        let at = masters.iter().position(|p| *p == m).unwrap();
        chosen[at].get_or_insert(chat);
        if chosen.iter().all(Option::is_some) {
            break;
        }
    }
    chosen.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chats_on_different_cluster_masters_keep_one_order_each() {
    let redis = RedisCluster::start();
    let nats = Server::nats();
    let chats = chats_on_each_master(&redis);
    assert_eq!(chats.len(), 3);
    let (routers, edges) = start_tier(&nats, &redis, 2, 2).await;
    let mut readers = readers(&edges, &chats).await;
    let (writers, per_chat) = (4, 20);
    let acked = Arc::new(AtomicUsize::new(0));
    for w in spawn_writers(&edges, &chats, writers, per_chat, acked) {
        assert_eq!(w.await.unwrap(), 0, "no publish needed a retry");
    }
    check_one_order(&mut readers, &edges, &chats, writers, per_chat).await;
    // Every master took part.
    for port in redis.masters() {
        let keys = switchboard_testkit::cli(port, &["--scan", "--pattern", "sb:{chat:*"]).unwrap();
        assert!(keys.lines().count() > 0, "master {port} holds no chat");
    }
    stop_tier(routers, edges).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slot_migrated_during_a_publish_burst_loses_and_duplicates_nothing() {
    let redis = Arc::new(RedisCluster::start());
    let nats = Server::nats();
    let chats = vec!["moving".to_owned(), "staying".to_owned()];
    let slot = redis.keyslot("chat:moving");
    let from = redis.master_of(slot);
    let to = *redis.masters().iter().find(|p| **p != from).unwrap();
    let (routers, edges) = start_tier(&nats, &*redis, 2, 2).await;
    let mut readers = readers(&edges, &chats).await;
    let (writers, per_chat) = (4, 40);
    let acked = Arc::new(AtomicUsize::new(0));
    let tasks = spawn_writers(&edges, &chats, writers, per_chat, acked.clone());

    // Move the slot in small batches (clients meet ASK and TRYAGAIN in
    // between) once the burst is under way.
    let moved = {
        let (redis, acked) = (redis.clone(), acked.clone());
        tokio::task::spawn_blocking(move || {
            while acked.load(Ordering::SeqCst) < 40 {
                std::thread::sleep(Duration::from_millis(5));
            }
            let before = acked.load(Ordering::SeqCst);
            redis.migrate_slot(slot, to, 4, || {
                std::thread::sleep(Duration::from_millis(30))
            });
            (before, acked.load(Ordering::SeqCst))
        })
    };
    let mut errors = 0;
    for w in tasks {
        errors += w.await.unwrap();
    }
    let (before, after) = moved.await.unwrap();
    let total = writers * per_chat * chats.len();
    assert!(
        before < total && after < total,
        "the migration ran inside the burst ({before}, {after} of {total} acked)"
    );
    assert_eq!(redis.master_of(slot), to, "the slot moved");
    eprintln!("slot {slot} moved {from} -> {to}; {errors} publishes were retried");
    check_one_order(&mut readers, &edges, &chats, writers, per_chat).await;
    stop_tier(routers, edges).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sentinel_failover_resumes_publishing_without_restarts() {
    let mut redis = RedisSentinel::start();
    let nats = Server::nats();
    let (routers, edges) = start_tier(&nats, &redis, 2, 2).await;
    let chat = "failover";
    let mut reader = Raw::connected(&edges[1], "reader").await;
    reader.request(json!({"subscribe": {"chat": chat}})).await;
    let mut watcher = Raw::connected(&edges[1], "watcher").await;
    watcher
        .request(json!({"watchPresence": {"users": ["late"]}}))
        .await;
    let first = watcher.next().await.unwrap();
    assert!(first["presence"].get("online").is_none(), "{first}");

    let mut writer = Raw::connected(&edges[0], "writer").await;
    for i in 0..20 {
        let (_, errors) =
            publish_until_acked(&mut writer, chat, &format!("m{i}"), Duration::from_secs(5)).await;
        assert_eq!(errors, 0);
    }
    // Let the replica catch up (asynchronous replication: a write acked
    // just before the kill could be lost; fencing that is separate work).
    let primary = redis.primary().port();
    let replica = redis.replica().port();
    let offsets_equal = || {
        let off = |p: u16, field: &str| {
            switchboard_testkit::cli(p, &["info", "replication"])
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
        };
        off(primary, "master_repl_offset:").is_some()
            && off(primary, "master_repl_offset:") == off(replica, "slave_repl_offset:")
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !offsets_equal() {
        assert!(Instant::now() < deadline, "the replica never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    redis.primary().kill(); // SIGKILL
    let killed = Instant::now();
    let mut errors = 0;
    let mut resumed = None;
    for i in 20..40 {
        let (_, e) =
            publish_until_acked(&mut writer, chat, &format!("m{i}"), Duration::from_secs(30)).await;
        errors += e;
        resumed.get_or_insert(killed.elapsed());
    }
    let resumed = resumed.unwrap();
    assert_eq!(redis.current_primary_port(), Some(replica), "failed over");
    assert!(errors > 0, "the outage was seen");
    assert!(
        resumed < Duration::from_secs(15),
        "publishing resumed {resumed:?} after the kill"
    );
    eprintln!("publishing resumed {resumed:?} after the kill, {errors} retries");

    let got = reader.deliveries(40).await;
    let o = orders(&got);
    assert_eq!(
        o[chat],
        (0..40).map(|i| format!("m{i}")).collect::<Vec<_>>(),
        "one order across the failover"
    );

    // Presence keeps working on the new primary, on both edges.
    let _late = Raw::connected(&edges[0], "late").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ev = watcher
            .next_within(Duration::from_secs(10))
            .await
            .expect("presence event after the failover");
        if ev["presence"]["user"] == "late" && ev["presence"]["online"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "no online event: {ev}");
    }
    stop_tier(routers, edges).await;
}
