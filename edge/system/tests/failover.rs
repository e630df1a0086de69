//! A Redis Cluster master SIGKILLed mid-burst, its replica promoted (ADR
//! 0019): two router processes, two edges, real servers. No (stream,
//! epoch, seq) names two messages; every acked message arrives or is
//! counted in the routers' RPO metric; the streams that lost acked
//! messages change epoch, which clients see as `resyncRequired`.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::common::{cluster::*, *};
use serde_json::{Value, json};
use switchboard_protocol::{ChatId, StreamKey};
use switchboard_router::{History, HistoryLimits, RedisHistory, connect_redis};
use switchboard_testkit::{RedisCluster, Server};

const CHATS: usize = 12;
const LOST_METRIC: &str = "switchboard_history_failover_lost_total";

fn chat(i: usize) -> String {
    format!("fo{i}")
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn spawn_router(nats: &Server, redis_url: &str, node: &str) -> (Proc, SocketAddr) {
    let port = free_port();
    let child = Command::new(ROUTER_BIN)
        .envs([
            ("SWITCHBOARD_ROUTER_LISTEN", format!("127.0.0.1:{port}")),
            ("SWITCHBOARD_NATS_URL", nats.url()),
            ("SWITCHBOARD_REDIS_URL", redis_url.into()),
            ("SWITCHBOARD_API_KEY", API_KEY.into()),
            ("SWITCHBOARD_NODE_ID", node.into()),
            ("SWITCHBOARD_PRESENCE_TTL_MS", "1500".into()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, node).await;
    (Proc(child), addr)
}

/// Publishes; `Some(seq)` when acked (errors during the failover are
/// expected: the client would retry).
async fn publish(raw: &mut Raw, chat: &str, id: &str) -> Option<u64> {
    let rid = raw.next_id;
    raw.next_id += 1;
    raw.send(json!({"id": rid, "publish": {"chat": chat, "clientMsgId": id, "payload": b64(id)}}))
        .await;
    loop {
        let msg = raw
            .next_within(Duration::from_secs(20))
            .await
            .expect("no publish reply");
        if msg.get("id").and_then(Value::as_u64) == Some(u64::from(rid)) {
            // uint64 is a string in proto3 JSON.
            return msg.get("publishAck").map(seq);
        }
    }
}

/// Collects deliveries until `done` is set and nothing came for a while.
async fn collect(mut raw: Raw, done: Arc<AtomicBool>) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        match raw.next_within(Duration::from_millis(1500)).await {
            Some(v) => {
                if let Some(d) = v.get("delivery") {
                    out.push(d.clone());
                }
            }
            None if done.load(Ordering::SeqCst) => return out,
            None => {}
        }
    }
}

fn cmid(d: &Value) -> String {
    d["clientMsgId"].as_str().unwrap().to_owned()
}

fn epoch(d: &Value) -> String {
    d["epoch"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_sigkilled_mid_burst_hands_out_no_seq_twice_and_counts_its_losses() {
    let mut redis = RedisCluster::start();
    let nats = Server::nats();
    let url = redis.url();
    let (_r0, router0) = spawn_router(&nats, &url, "router-0").await;
    let (_r1, router1) = spawn_router(&nats, &url, "router-1").await;
    wait_for_routers(&nats).await;
    let mut edges = Vec::new();
    for i in 0..2 {
        edges.push(start(edge_config(&nats, &redis, &format!("edge-{i}"))).await);
    }
    let done = Arc::new(AtomicBool::new(false));
    let mut receivers = Vec::new();
    for (i, e) in edges.iter().enumerate() {
        let mut r = Raw::connected(e, &format!("reader{i}")).await;
        for c in 0..CHATS {
            let rep = r.request(json!({"subscribe": {"chat": chat(c)}})).await;
            assert!(rep.get("subscribeResult").is_some(), "{rep}");
        }
        receivers.push(tokio::spawn(collect(r, done.clone())));
    }

    // The burst: four writers over every chat, through both edges.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let addr = edges[w % 2].addr();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut raw = Raw::connected_addr(addr, &format!("writer{w}")).await;
            let mut acked = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let c = chat((i + w) % CHATS);
                let id = format!("w{w}-{i}");
                if let Some(seq) = publish(&mut raw, &c, &id).await {
                    acked.push((c, id, seq));
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The victim: fo0's master. Its later writes wait in its memory, acked
    // and published, until it is SIGKILLed.
    let (master, replica) = redis.master_and_replica_of("{chat:fo0}").unwrap();
    tokio::task::block_in_place(|| redis.stall_replication(master, replica, "filler{chat:fo0}"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.nodes()[master].kill();
    redis.nodes()[replica].resume();
    tokio::task::block_in_place(|| redis.wait_promoted(replica))
        .unwrap_or_else(|e| panic!("{e}\n{}", redis.logs()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::SeqCst);
    let mut acked: Vec<(String, String, u64)> = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    // Each router writes every chat once more, so each learns of the cuts
    // of the streams it acked in.
    for (r, addr) in [router0, router1].into_iter().enumerate() {
        for c in 0..CHATS {
            let id = format!("sweep{r}-{c}");
            let (status, body) = post(
                addr,
                "/api/publish",
                &json!({"chat": chat(c), "client_msg_id": id, "text": id}),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            acked.push((chat(c), id, seq(&body)));
        }
    }
    done.store(true, Ordering::SeqCst);
    let mut got = Vec::new();
    for r in receivers {
        got.push(r.await.unwrap());
    }

    // What history holds now, per chat: the current epoch's log.
    let history = RedisHistory::new(
        connect_redis(&url).await.unwrap(),
        HistoryLimits {
            max_messages: 10_000,
            ..HistoryLimits::default()
        },
    );
    let mut stored = Vec::new();
    let mut current = HashMap::new();
    for c in 0..CHATS {
        let key = StreamKey::Chat(ChatId::parse(&chat(c)).unwrap());
        let pos = history.recover(&key, None, "").await.unwrap().position;
        let r = history.recover(&key, Some(0), &pos.epoch).await.unwrap();
        current.insert(chat(c), pos.epoch.clone());
        for f in r.frames {
            let d = match f.frame().kind.clone().unwrap() {
                switchboard_protocol::v1::server_frame::Kind::Delivery(d) => d,
                _ => panic!("not a delivery"),
            };
            stored.push((chat(c), d.epoch, d.seq, d.client_msg_id));
        }
    }

    // 1. No (stream, epoch, seq) names two messages.
    let mut names: HashMap<(String, String, u64), String> = HashMap::new();
    let seen = got.iter().flatten().map(|d| {
        (
            d["chat"].as_str().unwrap().to_owned(),
            epoch(d),
            seq(d),
            cmid(d),
        )
    });
    for (c, e, s, m) in seen.chain(stored.iter().cloned()) {
        let first = names.entry((c.clone(), e.clone(), s)).or_insert(m.clone());
        assert_eq!(*first, m, "({c}, {e}, {s}) names two messages");
    }

    // 2. What the failover lost: acked in a cut epoch above the seq that
    //    survived it. The streams that changed epoch, with their old one
    //    and the seq it survived to (the new epoch goes on from there).
    let changed: HashSet<String> = got
        .iter()
        .flatten()
        .filter(|d| epoch(d) != current[d["chat"].as_str().unwrap()])
        .map(|d| d["chat"].as_str().unwrap().to_owned())
        .collect();
    let mut cut: HashMap<String, u64> = HashMap::new();
    for d in got.iter().flatten() {
        let c = d["chat"].as_str().unwrap().to_owned();
        if changed.contains(&c) && epoch(d) == current[&c] {
            let survived = seq(d) - 1;
            let e = cut.entry(c).or_insert(survived);
            *e = (*e).min(survived);
        }
    }
    let epoch_of: HashMap<String, String> =
        got.iter().flatten().map(|d| (cmid(d), epoch(d))).collect();
    let mut lost = HashSet::new();
    for (c, id, s) in &acked {
        let in_current = epoch_of.get(id).is_some_and(|e| *e == current[c]);
        if !in_current && cut.get(c).is_some_and(|survived| s > survived) {
            lost.insert(id.clone());
        }
    }
    let counted = metric(router0, LOST_METRIC).await + metric(router1, LOST_METRIC).await;
    let ids0: HashSet<String> = got[0].iter().map(cmid).collect();
    let missing: Vec<_> = acked
        .iter()
        .filter(|a| !ids0.contains(&a.1))
        .take(8)
        .collect();
    let mut ep: HashMap<String, HashSet<String>> = HashMap::new();
    for d in &got[0] {
        ep.entry(d["chat"].as_str().unwrap().into())
            .or_default()
            .insert(epoch(d));
    }
    eprintln!(
        "missing {missing:?} epochs {ep:?} current {current:?} stored {}",
        stored.len()
    );
    eprintln!(
        "acked {}, lost {}, counted {counted}, cut {cut:?}, receivers got {:?}",
        acked.len(),
        lost.len(),
        got.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert!(!lost.is_empty(), "the stalled replica lost acked writes");
    assert_eq!(
        counted,
        lost.len() as f64,
        "the routers count each lost acked message once"
    );

    // 3. Every acked message reached every receiver, or is counted lost.
    for (i, deliveries) in got.iter().enumerate() {
        let ids: HashSet<String> = deliveries.iter().map(cmid).collect();
        for (c, id, _) in &acked {
            assert!(
                ids.contains(id) || lost.contains(id),
                "reader{i} missed acked {id} on {c}, not counted lost"
            );
        }
    }

    // 4. A stream that lost acked messages changed epoch on a live frame
    //    for its receivers (the client reports resyncRequired), and a
    //    resume from the old epoch is told to re-sync.
    let lost_chats: HashSet<&String> = acked
        .iter()
        .filter(|(_, id, _)| lost.contains(id))
        .map(|(c, _, _)| c)
        .collect();
    for c in &lost_chats {
        for (i, deliveries) in got.iter().enumerate() {
            let epochs: Vec<String> = deliveries
                .iter()
                .filter(|d| d["chat"] == c.as_str())
                .map(epoch)
                .collect();
            assert!(
                epochs.first() != epochs.last(),
                "reader{i} saw no epoch change on {c}"
            );
            let old = epochs.first().unwrap().clone();
            let last_old = deliveries
                .iter()
                .filter(|d| d["chat"] == c.as_str() && epoch(d) == old)
                .map(seq)
                .max()
                .unwrap();
            let mut back = Raw::connected(&edges[i], &format!("back{i}")).await;
            let r = back
                .request(json!({"subscribe": {"chat": c, "since": last_old, "epoch": old}}))
                .await;
            assert_eq!(
                r["subscribeResult"]["position"]["resyncRequired"], true,
                "{c}: {r}"
            );
        }
    }
    for e in edges {
        e.shutdown().await;
    }
}
