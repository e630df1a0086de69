//! A NATS cluster of three servers (ADR 0040): edges and routers get every
//! server's URL, and the member-work streams and the event tap are R3.
//! A server SIGKILLed under traffic: its clients fail over to the others,
//! every acked message reaches every reader once and in order, and the R3
//! push stream keeps every job. A server restarted rejoins and catches up
//! (its own copy of the push stream holds every job), so another server
//! can be lost after it.
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use crate::common::{cluster::*, *};
use futures_util::StreamExt;
use serde_json::Value;
use switchboard_edge::Edge;
use switchboard_protocol::client::{Client, ClientConfig, Event};
use switchboard_router::{EVENT_STREAM, PUSH_STREAM, SHARD_STREAM, TapSettings};
use switchboard_testkit::{NatsCluster, Server};

const CHATS: usize = 4;
const WRITERS: usize = 4;
const R3: &[&str] = &[
    "--push-stream-replicas",
    "3",
    "--event-tap",
    "--event-tap-replicas",
    "3",
];

fn chat(i: usize) -> String {
    format!("nc{i}")
}

struct Setup {
    nats: NatsCluster,
    _redis: Server,
    routers: Vec<RouterNode>,
    edges: Vec<Edge>,
}

async fn setup() -> Setup {
    let nats = tokio::task::block_in_place(NatsCluster::start);
    let redis = Server::redis();
    let mut routers = Vec::new();
    for i in 0..2 {
        routers.push(start_router_with(&nats, &redis, &format!("router-{i}"), R3).await);
    }
    wait_for_routers(&nats).await;
    let mut edges = Vec::new();
    for i in 0..2 {
        let mut c = edge_config(&nats, &redis, &format!("edge-{i}"));
        c.event_tap = Some(TapSettings {
            replicas: 3,
            ..TapSettings::default()
        });
        edges.push(start(c).await);
    }
    Setup {
        nats,
        _redis: redis,
        routers,
        edges,
    }
}

/// What one writer got acked: chat messages (chat, client msg id, seq)
/// and DMs to offline users (user).
#[derive(Default)]
struct Acked {
    chat: Vec<(String, String, u64)>,
    push: Vec<String>,
}

/// Publishes, as the bundled client's user would: on an error, again with
/// the same client message id, until acked.
async fn writer(client: Client, w: usize, stop: Arc<AtomicBool>) -> Acked {
    let mut acked = Acked::default();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let c = chat((i + w) % CHATS);
        let id = format!("w{w}-{i}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match client.publish_chat(&c, &id, id.clone()).await {
                Ok(ack) => {
                    acked.chat.push((c.clone(), id.clone(), ack.seq));
                    break;
                }
                Err(e) if tokio::time::Instant::now() > deadline => {
                    panic!("{id} not acked in 30 s: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        if i % 4 == 0 {
            // A DM to a user who is never online: one push job each.
            let user = format!("off-{w}-{i}");
            let id = format!("dm-{w}-{i}");
            loop {
                match client.publish_user(&user, &id, id.clone()).await {
                    Ok(_) => {
                        acked.push.push(user);
                        break;
                    }
                    Err(e) if tokio::time::Instant::now() > deadline => {
                        panic!("{id} not acked in 30 s: {e}")
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    acked
}

/// A reader's deliveries per chat (client msg id, seq) in arrival order,
/// and how many times it was told to re-sync.
type Seen = (HashMap<String, Vec<(String, u64)>>, usize);

async fn reader(mut events: switchboard_protocol::client::Events, done: Arc<AtomicBool>) -> Seen {
    let mut got: HashMap<String, Vec<(String, u64)>> = HashMap::new();
    let mut resyncs = 0;
    loop {
        match tokio::time::timeout(Duration::from_millis(1500), events.recv()).await {
            Ok(Some(Event::Delivery(d))) => got
                .entry(d.chat.clone())
                .or_default()
                .push((d.client_msg_id, d.seq)),
            Ok(Some(Event::ResyncRequired { .. })) => resyncs += 1,
            Ok(Some(_)) => {}
            Ok(None) => return (got, resyncs),
            Err(_) if done.load(Ordering::SeqCst) => return (got, resyncs),
            Err(_) => {}
        }
    }
}

struct Traffic {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<Acked>>,
    readers: Vec<tokio::task::JoinHandle<Seen>>,
    clients: Vec<Client>,
}

async fn start_traffic(s: &Setup) -> Traffic {
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut t = Traffic {
        stop: stop.clone(),
        done: done.clone(),
        writers: Vec::new(),
        readers: Vec::new(),
        clients: Vec::new(),
    };
    for (i, e) in s.edges.iter().enumerate() {
        let (client, events) =
            Client::connect(ClientConfig::new(ws_url(e), token(&format!("reader{i}"))))
                .await
                .unwrap();
        for c in 0..CHATS {
            client.subscribe(&chat(c)).await.unwrap();
        }
        t.readers.push(tokio::spawn(reader(events, done.clone())));
        t.clients.push(client);
    }
    for w in 0..WRITERS {
        let e = &s.edges[w % s.edges.len()];
        let (client, _events) =
            Client::connect(ClientConfig::new(ws_url(e), token(&format!("writer{w}"))))
                .await
                .unwrap();
        t.clients.push(client.clone());
        t.writers
            .push(tokio::spawn(writer(client, w, stop.clone())));
    }
    t
}

/// Stops the writers, waits for the readers to go quiet, and checks that
/// every acked chat message reached every reader exactly once, in seq
/// order, with no re-sync; returns the users with an acked DM.
async fn finish_and_check(t: Traffic) -> Vec<String> {
    t.stop.store(true, Ordering::SeqCst);
    let mut acked = Acked::default();
    for w in t.writers {
        let a = w.await.unwrap();
        acked.chat.extend(a.chat);
        acked.push.extend(a.push);
    }
    t.done.store(true, Ordering::SeqCst);
    assert!(
        acked.chat.len() > 50,
        "too little traffic: {}",
        acked.chat.len()
    );
    for (r, handle) in t.readers.into_iter().enumerate() {
        let (got, resyncs) = handle.await.unwrap();
        assert_eq!(resyncs, 0, "reader{r} was told to re-sync");
        for c in 0..CHATS {
            let list = got.get(&chat(c)).cloned().unwrap_or_default();
            let seqs: Vec<u64> = list.iter().map(|(_, s)| *s).collect();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "reader{r} {}: out of order or twice: {seqs:?}",
                chat(c)
            );
            let ids: HashSet<&str> = list.iter().map(|(id, _)| id.as_str()).collect();
            assert_eq!(ids.len(), list.len(), "reader{r}: a message twice");
            let want: Vec<&(String, String, u64)> = acked
                .chat
                .iter()
                .filter(|(ch, _, _)| *ch == chat(c))
                .collect();
            let by_id: HashMap<&str, u64> = list.iter().map(|(id, s)| (id.as_str(), *s)).collect();
            for (ch, id, seq) in want {
                assert_eq!(
                    by_id.get(id.as_str()),
                    Some(seq),
                    "reader{r}: acked {ch} {id} (seq {seq}) lost or under another seq"
                );
            }
        }
    }
    for c in t.clients {
        c.close().await;
    }
    acked.push
}

/// Every acked DM to an offline user is exactly one job in `SB_PUSH`.
async fn check_push_jobs(nats: &NatsCluster, users: &[String]) {
    let js = async_nats::jetstream::new(nats_client(nats).await);
    let want: HashSet<&str> = users.iter().map(String::as_str).collect();
    let mut per_user: HashMap<String, u64> = HashMap::new();
    // A stream whose leader was on the lost server answers once the others
    // elected a new one; until then requests time out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        per_user.clear();
        let Ok(stream) = js.get_stream(PUSH_STREAM).await else {
            continue;
        };
        let Ok(mut subjects) = stream.info_with_subjects("sb.push.>").await else {
            continue;
        };
        let mut complete = true;
        while let Some(item) = subjects.next().await {
            let Ok((subject, n)) = item else {
                complete = false;
                break;
            };
            per_user.insert(subject.trim_start_matches("sb.push.").to_owned(), n as u64);
        }
        if complete && per_user.len() >= want.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let missing: Vec<&&str> = want
        .iter()
        .filter(|u| !per_user.contains_key(**u))
        .collect();
    assert!(missing.is_empty(), "push jobs lost: {missing:?}");
    assert!(per_user.values().all(|n| *n == 1), "a push job twice");
    assert_eq!(per_user.len(), want.len());
}

/// Every product stream is R3.
async fn check_replicas(nats: &NatsCluster) {
    let js = async_nats::jetstream::new(nats_client(nats).await);
    // Every router and edge has created or updated them by now.
    for name in [PUSH_STREAM, SHARD_STREAM, EVENT_STREAM] {
        let mut stream = js.get_stream(name).await.unwrap();
        assert_eq!(
            stream.info().await.unwrap().config.num_replicas,
            3,
            "{name}"
        );
    }
}

fn total_connections(nats: &NatsCluster, skip: usize) -> usize {
    (0..3)
        .filter(|i| *i != skip)
        .map(|i| nats.client_connections(i))
        .sum()
}

/// The messages of `stream` in the copy the server at `index` holds.
fn local_messages(nats: &NatsCluster, index: usize, stream: &str) -> Option<u64> {
    let body = nats.monitor(index, "/jsz?streams=true")?;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["account_details"].as_array()?.iter().find_map(|a| {
        a["stream_detail"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == stream)?["state"]["messages"]
            .as_u64()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_server_killed_under_traffic_loses_nothing_acked() {
    let mut s = setup().await;
    check_replicas(&s.nats).await;
    let t = start_traffic(&s).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The victim: the server holding the most of our clients' connections.
    let victim = (0..3)
        .max_by_key(|i| s.nats.client_connections(*i))
        .unwrap();
    let before = total_connections(&s.nats, usize::MAX);
    assert!(s.nats.client_connections(victim) > 0);
    s.nats.nodes()[victim].kill();
    // Its clients (edges and routers) reconnect to the other two.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while total_connections(&s.nats, victim) < before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "clients did not fail over: {} of {before}",
            total_connections(&s.nats, victim)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let users = finish_and_check(t).await;
    check_push_jobs(&s.nats, &users).await;
    for e in s.edges {
        e.shutdown().await;
    }
    for r in s.routers {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_nats_server_rejoins_and_catches_up() {
    let mut s = setup().await;
    let t = start_traffic(&s).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    s.nats.nodes()[0].kill();
    // Jobs and messages go on while it is away.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.nats.nodes()[0].restart();
    tokio::task::block_in_place(|| s.nats.wait_ready())
        .unwrap_or_else(|e| panic!("{e}\n{}", s.nats.logs()));
    // Then another server goes: the cluster runs on the rejoined one.
    s.nats.nodes()[1].kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let users = finish_and_check(t).await;
    check_push_jobs(&s.nats, &users).await;
    // The rejoined server's own copy holds every job.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = local_messages(&s.nats, 0, PUSH_STREAM);
        if n == Some(users.len() as u64) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "n0 holds {n:?} of {} push jobs",
            users.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for e in s.edges {
        e.shutdown().await;
    }
    for r in s.routers {
        r.stop().await;
    }
}
