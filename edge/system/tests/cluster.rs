//! Cluster mode on real nats-server and redis-server processes: edges and
//! routers in-process (one edge as a child process, to be SIGKILLed).

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use crate::common::{cluster::*, *};
use futures_util::StreamExt;
use serde_json::{Value, json};

async fn publish(raw: &mut Raw, target: Value, id: &str, text: &str) -> Value {
    let mut body = target;
    body["clientMsgId"] = json!(id);
    body["payload"] = json!(b64(text));
    let ack = raw.request(json!({ "publish": body })).await;
    assert!(ack.get("publishAck").is_some(), "publish failed: {ack}");
    ack["publishAck"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn users_on_different_edges_chat_and_personal_streams_reach_both_edges() {
    let c = Cluster::new(2, 2).await;
    let (e0, e1) = (&c.edges[0], &c.edges[1]);
    let mut alice = Raw::connected(e0, "alice").await;
    let mut bob = Raw::connected(e1, "bob").await;
    let mut bob_phone = Raw::connected(e0, "bob").await;
    let mut eve = Raw::connected(e1, "eve").await;
    for raw in [&mut alice, &mut bob] {
        let r = raw.request(json!({"subscribe": {"chat": "ab"}})).await;
        assert!(r.get("subscribeResult").is_some(), "{r}");
    }
    eve.request(json!({"subscribe": {"chat": "elsewhere"}}))
        .await;

    publish(&mut alice, json!({"chat": "ab"}), "a1", "hi bob").await;
    let got = bob.deliveries(1).await;
    assert_eq!(payload_text(&got[0]), "hi bob");
    assert_eq!(payload_text(&alice.deliveries(1).await[0]), "hi bob");

    // The personal stream reaches bob's sockets on both edges.
    publish(&mut alice, json!({"user": "bob"}), "a2", "dm").await;
    for raw in [&mut bob, &mut bob_phone] {
        let d = raw.deliveries(1).await;
        assert_eq!(
            (payload_text(&d[0]).as_str(), d[0]["user"].as_str()),
            ("dm", Some("bob"))
        );
    }
    eve.assert_no_delivery(Duration::from_millis(300)).await;

    // Subject-unsafe ids are refused on the cluster path too.
    let r = alice
        .request(json!({"publish": {"chat": "a.b", "clientMsgId": "x", "payload": ""}}))
        .await;
    assert_eq!(r["error"]["code"], 422, "{r}");
    let client = async_nats::connect(c.nats.url()).await.unwrap();
    for bad in ["a.b", "*", ">", "a b"] {
        let req = switchboard_router::encode_request(&switchboard_router::PublishRequest {
            sender: switchboard_protocol::UserId::parse("svc").unwrap(),
            target: switchboard_protocol::StreamKey::Chat(
                switchboard_protocol::ChatId::parse("ok").unwrap(),
            ),
            client_msg_id: "m".into(),
            payload: Default::default(),
        });
        // Re-encode with a bad chat id, as a buggy backend might send it.
        let mut msg =
            <switchboard_protocol::internal::v1::RouterPublish as prost::Message>::decode(req)
                .unwrap();
        msg.target =
            Some(switchboard_protocol::internal::v1::router_publish::Target::Chat(bad.into()));
        let reply = client
            .request(
                switchboard_protocol::subject::ROUTER_PUBLISH,
                prost::Message::encode_to_vec(&msg).into(),
            )
            .await
            .unwrap();
        let reply = <switchboard_protocol::internal::v1::RouterReply as prost::Message>::decode(
            reply.payload,
        )
        .unwrap();
        match reply.result {
            Some(switchboard_protocol::internal::v1::router_reply::Result::Error(e)) => {
                assert_eq!(e.code, 422, "{bad:?}")
            }
            other => panic!("{bad:?} accepted: {other:?}"),
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_through_both_routers_give_one_order() {
    let c = Cluster::new(2, 2).await;
    let mut readers = Vec::new();
    for (i, e) in c.edges.iter().enumerate() {
        let mut r = Raw::connected(e, &format!("reader{i}")).await;
        r.request(json!({"subscribe": {"chat": "busy"}})).await;
        readers.push(r);
    }
    let per_writer = 60;
    let mut writers = Vec::new();
    for w in 0..4 {
        let addr = c.edges[w % 2].addr();
        writers.push(tokio::spawn(async move {
            let mut raw = Raw::connected_addr(addr, &format!("writer{w}")).await;
            for i in 0..per_writer {
                let id = format!("w{w}-{i}");
                let ack = raw.request(json!({"publish": {"chat": "busy", "clientMsgId": id, "payload": b64(&id)}})).await;
                assert!(ack.get("publishAck").is_some(), "{ack}");
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let total = 4 * per_writer;
    let mut orders = Vec::new();
    for r in &mut readers {
        let got = r.deliveries(total).await;
        let seqs: Vec<u64> = got.iter().map(seq).collect();
        assert_eq!(
            seqs,
            (1..=total as u64).collect::<Vec<_>>(),
            "gapless, duplicate-free, in order"
        );
        orders.push(got.iter().map(payload_text).collect::<Vec<_>>());
        r.assert_no_delivery(Duration::from_millis(200)).await;
    }
    assert_eq!(orders[0], orders[1], "both edges see the same order");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_across_edges_and_a_killed_edge_goes_offline_once() {
    let c = Cluster::new(1, 1).await;
    let mut watcher = Raw::connected(&c.edges[0], "watcher").await;
    watcher
        .request(json!({"watchPresence": {"users": ["mobile"]}}))
        .await;
    let first = watcher.next().await.unwrap();
    assert!(
        first["presence"].get("online").is_none(),
        "starts offline: {first}"
    );

    // An edge as a separate process, so it can really be SIGKILLed.
    let (mut child, addr) = spawn_edge_process(&c.nats, &c.redis, "doomed").await;
    let mut mobile = Raw::connected_addr(addr, "mobile").await;
    let online = watcher.next().await.expect("online event");
    assert_eq!(online["presence"]["online"], true, "{online}");
    let _ = mobile.request(json!({"ping": {}})).await;

    child.kill().unwrap(); // SIGKILL: no drain, no unregister
    child.wait().unwrap();
    let started = std::time::Instant::now();
    let offline = watcher
        .next_within(Duration::from_secs(5))
        .await
        .expect("offline event within the TTL");
    assert_eq!(offline["presence"]["user"], "mobile");
    assert!(offline["presence"].get("online").is_none(), "{offline}");
    assert!(
        started.elapsed() < Duration::from_millis(1500 + 500 + 2000), // TTL + sweep + CI slack
        "offline within TTL + sweep interval"
    );
    assert!(
        watcher.next_within(Duration::from_secs(2)).await.is_none(),
        "offline fires once"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn channel_post_reaches_online_members_once_and_queues_one_push_per_offline_member() {
    let c = Cluster::new(2, 2).await;
    let router = c.routers[0].addr;
    let members: Vec<String> = (0..10_000).map(|i| format!("m{i}")).collect();
    let (status, body) = post(
        router,
        "/api/channels/news/members",
        &json!({ "add": members }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["added"], 10_000);

    // 100 members online, half on each edge, watching the channel.
    let mut online = Vec::new();
    for i in 0..100 {
        let mut r = Raw::connected(&c.edges[i % 2], &format!("m{i}")).await;
        r.request(json!({"subscribe": {"chat": "news"}})).await;
        online.push(r);
    }
    let (status, ack) = post(
        c.edges[0].addr(),
        "/api/publish",
        &json!({"chat": "news", "client_msg_id": "post-1", "text": "big news"}),
    )
    .await;
    assert_eq!(status, 200, "{ack}");
    for r in &mut online {
        let d = r.deliveries(1).await;
        assert_eq!(payload_text(&d[0]), "big news");
        r.assert_no_delivery(Duration::from_millis(20)).await;
    }

    // Every offline member has exactly one push job; online members none.
    let js = async_nats::jetstream::new(async_nats::connect(c.nats.url()).await.unwrap());
    let stream = js
        .get_stream(switchboard_router::PUSH_STREAM)
        .await
        .unwrap();
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for _ in 0..100 {
        per_user.clear();
        let mut subjects = stream.info_with_subjects("sb.push.>").await.unwrap();
        while let Some(item) = subjects.next().await {
            let (subject, n) = item.unwrap();
            per_user.insert(subject.trim_start_matches("sb.push.").to_owned(), n);
        }
        if per_user.len() >= 9_900 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(per_user.len(), 9_900, "one subject per offline member");
    assert!(per_user.values().all(|n| *n == 1), "exactly one job each");
    let online_users: HashSet<String> = (0..100).map(|i| format!("m{i}")).collect();
    assert!(per_user.keys().all(|u| !online_users.contains(u)));
    let (status, counts) = get(router, "/api/channels/news/members").await;
    assert_eq!(status, 200);
    assert_eq!(
        (counts["members"].as_u64(), counts["online"].as_u64()),
        (Some(10_000), Some(100))
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dm_to_an_offline_user_becomes_one_push_job() {
    let c = Cluster::new(1, 1).await;
    let mut alice = Raw::connected(&c.edges[0], "alice").await;
    publish(&mut alice, json!({"user": "sleepy"}), "dm-1", "wake up").await;
    publish(&mut alice, json!({"user": "sleepy"}), "dm-1", "wake up").await; // retry: deduplicated
    let js = async_nats::jetstream::new(async_nats::connect(c.nats.url()).await.unwrap());
    let mut stream = js
        .get_stream(switchboard_router::PUSH_STREAM)
        .await
        .unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 1, "one push job");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnecting_to_the_other_edge_with_since_recovers_everything() {
    let c = Cluster::new(2, 2).await;
    let mut reader = Raw::connected(&c.edges[0], "reader").await;
    let sub = reader.request(json!({"subscribe": {"chat": "move"}})).await;
    assert!(sub.get("subscribeResult").is_some());
    let mut writer = Raw::connected(&c.edges[1], "writer").await;
    for i in 1..=3 {
        publish(
            &mut writer,
            json!({"chat": "move"}),
            &format!("m{i}"),
            &format!("{i}"),
        )
        .await;
    }
    let seen = reader.deliveries(3).await;
    let (last, epoch) = (seq(&seen[2]), seen[2]["epoch"].as_str().unwrap().to_owned());
    drop(reader);
    for i in 4..=9 {
        publish(
            &mut writer,
            json!({"chat": "move"}),
            &format!("m{i}"),
            &format!("{i}"),
        )
        .await;
    }
    let mut back = Raw::connected(&c.edges[1], "reader").await;
    let r = back
        .request(json!({"subscribe": {"chat": "move", "since": last, "epoch": epoch}}))
        .await;
    assert_eq!(r["subscribeResult"]["position"]["recovered"], 6, "{r}");
    let seqs: Vec<u64> = back.deliveries(6).await.iter().map(seq).collect();
    assert_eq!(seqs, [4, 5, 6, 7, 8, 9]);
    c.shutdown().await;
}

/// A cluster whose edge has a NATS subscription that buffers one message,
/// so a burst overflows it and NATS drops frames for this edge.
struct Lagging {
    nats: switchboard_testkit::Server,
    redis: switchboard_testkit::Server,
    router: RouterNode,
    edge: switchboard_edge::Edge,
    reader: Raw,
}

impl Lagging {
    async fn start(chat: &str) -> Lagging {
        let nats = switchboard_testkit::Server::nats();
        let redis = switchboard_testkit::Server::redis();
        let router = start_router(&nats, &redis, "r").await;
        wait_for_routers(&nats).await;
        let mut cfg = edge_config(&nats, &redis, "laggy");
        cfg.cluster.as_mut().unwrap().subscription_capacity = 1;
        let edge = start(cfg).await;
        let mut reader = Raw::connected(&edge, "reader").await;
        reader.request(json!({"subscribe": {"chat": chat}})).await;
        Lagging {
            nats,
            redis,
            router,
            edge,
            reader,
        }
    }

    /// `total` posts to `chat` from 6 concurrent publishers, all acked.
    async fn burst(&self, chat: &str, total: u64) {
        let mut posts = Vec::new();
        for w in 0..6 {
            let (addr, chat) = (self.router.addr, chat.to_owned());
            posts.push(tokio::spawn(async move {
                for i in 0..total / 6 {
                    let body =
                        json!({"chat": chat, "client_msg_id": format!("{w}-{i}"), "text": "x"});
                    let (s, b) = post(addr, "/api/publish", &body).await;
                    assert_eq!(s, 200, "{b}");
                }
            }));
        }
        for p in posts {
            p.await.unwrap();
        }
    }

    /// The reader gets 1..=total, in order, with no gap.
    async fn assert_all_delivered(mut self, total: u64) {
        let seqs: Vec<u64> = self
            .reader
            .deliveries(total as usize)
            .await
            .iter()
            .map(seq)
            .collect();
        assert_eq!(
            seqs,
            (1..=total).collect::<Vec<_>>(),
            "no gap seen by the client"
        );
        self.edge.shutdown().await;
        self.router.stop().await;
        drop((self.nats, self.redis));
    }
}

/// A gap whose repair meets a hung history (Redis frozen past its 2 s
/// response timeout) is repaired once history answers again, instead of
/// being skipped: the frames are still there. Found in the 400k-socket
/// fleet benchmark, where an overloaded Redis turned gaps into losses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_waits_out_a_history_outage() {
    let lagging = Lagging::start("outage").await;
    lagging.burst("outage", 120).await;
    // Freeze Redis before the hub's repair read (200 ms after the gap).
    lagging.redis.pause();
    tokio::time::sleep(Duration::from_secs(3)).await;
    lagging.redis.resume();
    lagging.assert_all_delivered(120).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frames_dropped_by_a_lagging_nats_subscription_are_repaired_from_history() {
    let lagging = Lagging::start("burst").await;
    lagging.burst("burst", 300).await;
    lagging.assert_all_delivered(300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_restart_loses_nothing() {
    let mut c = Cluster::new(1, 1).await;
    let mut reader = Raw::connected(&c.edges[0], "reader").await;
    reader
        .request(json!({"subscribe": {"chat": "outage"}}))
        .await;
    let router = c.routers[0].addr;
    let mut sent = 0u64;
    for _ in 0..5 {
        sent += 1;
        let (s, _) = post(
            router,
            "/api/publish",
            &json!({"chat": "outage", "client_msg_id": format!("m{sent}"), "text": "x"}),
        )
        .await;
        assert_eq!(s, 200);
    }
    c.nats.restart();
    // Published into Redis while the edge's NATS link is being restored.
    for _ in 0..5 {
        sent += 1;
        let (s, b) = post(
            router,
            "/api/publish",
            &json!({"chat": "outage", "client_msg_id": format!("m{sent}"), "text": "x"}),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..5 {
        sent += 1;
        let (s, _) = post(
            router,
            "/api/publish",
            &json!({"chat": "outage", "client_msg_id": format!("m{sent}"), "text": "x"}),
        )
        .await;
        assert_eq!(s, 200);
    }
    let seqs: Vec<u64> = reader
        .deliveries(sent as usize)
        .await
        .iter()
        .map(seq)
        .collect();
    assert_eq!(seqs, (1..=sent).collect::<Vec<_>>());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_interest_follows_local_sockets_without_leaks() {
    let c = Cluster::new(1, 1).await;
    let edge = &c.edges[0];
    let bus_subscriptions = || metric(edge.addr(), "switchboard_edge_bus_subscriptions");
    // One subscription carries every local user's personal stream, one
    // the members removed from chats (sb.members).
    assert_eq!(bus_subscriptions().await, 2.0);
    for round in 0..3 {
        let mut sockets = Vec::new();
        for i in 0..20 {
            let mut r = Raw::connected(edge, &format!("churn{i}")).await;
            for chat in [format!("own{i}"), "shared".to_owned()] {
                let s = r.request(json!({"subscribe": {"chat": chat}})).await;
                assert!(s.get("subscribeResult").is_some(), "{s}");
            }
            sockets.push(r);
        }
        // The edge's own two + 20 own chats + 1 shared chat.
        assert_eq!(bus_subscriptions().await, 23.0, "round {round}");
        drop(sockets);
        let mut left = -1.0;
        for _ in 0..100 {
            left = bus_subscriptions().await;
            if left == 2.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(left, 2.0, "interest released after round {round}");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn personal_streams_find_their_edge_again_after_redis_restarts_empty() {
    let mut c = Cluster::new(1, 2).await;
    let mut bob = Raw::connected(&c.edges[1], "bob").await;
    let router = c.routers[0].addr;
    let dm = |id: String| async move {
        post(
            router,
            "/api/publish",
            &json!({"user": "bob", "client_msg_id": id, "text": "dm"}),
        )
        .await
    };
    assert_eq!(dm("before".into()).await.0, 200);
    assert_eq!(payload_text(&bob.deliveries(1).await[0]), "dm");
    // A socket that closed before the restart must not come back with it.
    let mut ghost = Raw::connected(&c.edges[1], "ghost").await;
    ghost.ws.close(None).await.unwrap();
    drop(ghost);
    let kick_ghost = || async move { post(router, "/api/kick", &json!({"user": "ghost"})).await };
    for _ in 0..100 {
        if kick_ghost().await.1["edges"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // No persistence: presence (where bob is), leases and history are gone.
    c.redis.restart();
    // Routers find bob's edge only once it has restored its sessions.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    loop {
        n += 1;
        let (status, _) = dm(format!("after{n}")).await;
        if status == 200
            && let Some(f) = bob.next_within(Duration::from_millis(300)).await
            && f.get("delivery").is_some()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bob's edge was never found again"
        );
    }
    let (status, body) = kick_ghost().await;
    assert_eq!(
        (status, body["edges"].as_u64()),
        (200, Some(0)),
        "restored a closed session: {body}"
    );
    // From then on every DM arrives, in order.
    let first = n + 1;
    for i in first..first + 5 {
        assert_eq!(dm(format!("after{i}")).await.0, 200);
    }
    let got = bob.deliveries(5).await;
    let seqs: Vec<u64> = got.iter().map(seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "in order, none lost: {seqs:?}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kick_through_any_router_reaches_the_users_edge() {
    let c = Cluster::new(1, 2).await;
    let mut bob = Raw::connected(&c.edges[1], "bob").await;
    let mut alice = Raw::connected(&c.edges[0], "alice").await;
    let (status, body) = post(c.routers[0].addr, "/api/kick", &json!({"user": "bob"})).await;
    assert_eq!((status, body["edges"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(bob.until_close().await.0, Some(4503));
    let r = alice.request(json!({"ping": {}})).await;
    assert!(r.get("pong").is_some(), "{r}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_dms_never_reach_another_users_sockets() {
    // Personal streams share one subscription per edge: the hub must hand
    // each delivery only to the sockets of the user it names.
    let c = Cluster::new(1, 2).await;
    let users: Vec<String> = (0..24).map(|i| format!("u{i}")).collect();
    let mut sockets = Vec::new();
    for (i, u) in users.iter().enumerate() {
        // Two devices per user, on both edges, so every edge holds everyone.
        sockets.push((u.clone(), Raw::connected(&c.edges[i % 2], u).await));
        sockets.push((u.clone(), Raw::connected(&c.edges[(i + 1) % 2], u).await));
    }
    let per_user = 10;
    let router = c.routers[0].addr;
    let mut sends = Vec::new();
    for u in users.clone() {
        sends.push(tokio::spawn(async move {
            for i in 0..per_user {
                let (s, b) = post(
                    router,
                    "/api/publish",
                    &json!({"user": u, "client_msg_id": format!("{u}-{i}"), "text": format!("for {u}")}),
                )
                .await;
                assert_eq!(s, 200, "{b}");
            }
        }));
    }
    for s in sends {
        s.await.unwrap();
    }
    for (user, raw) in &mut sockets {
        let got = raw.deliveries(per_user).await;
        for d in &got {
            assert_eq!(d["user"].as_str(), Some(user.as_str()), "{d}");
            assert_eq!(payload_text(d), format!("for {user}"));
        }
        let seqs: Vec<u64> = got.iter().map(seq).collect();
        assert_eq!(seqs, (1..=per_user as u64).collect::<Vec<_>>());
        raw.assert_no_delivery(Duration::from_millis(50)).await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_nats_and_redis_while_open_sockets_stay() {
    let mut c = Cluster::new(1, 1).await;
    let edge = c.edges[0].addr();
    let readyz = || async move {
        let (status, body) = http_get(edge, "/readyz").await;
        (status, body.trim().to_owned())
    };
    let until = |want: u16| async move {
        for _ in 0..200 {
            let (status, body) = readyz().await;
            if status == want {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("/readyz never answered {want}");
    };
    assert_eq!(until(200).await, "ready");
    let mut open = Raw::connected(&c.edges[0], "stays").await;

    c.redis.kill();
    assert_eq!(until(503).await, "presence (Redis) unavailable");
    let r = open.request(json!({"ping": {}})).await;
    assert!(
        r.get("pong").is_some(),
        "open sockets are still served: {r}"
    );
    c.redis.restart();
    until(200).await;

    c.nats.kill();
    assert_eq!(until(503).await, "bus (NATS) disconnected");
    c.nats.restart();
    until(200).await;
    let r = open.request(json!({"ping": {}})).await;
    assert!(r.get("pong").is_some(), "{r}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_a_sigkilled_edge_resume_on_another_without_loss_or_duplicates() {
    use switchboard_protocol::client::{Client, ClientConfig, Event};
    let c = Cluster::new(1, 1).await;
    let (mut doomed, addr) = spawn_edge_process(&c.nats, &c.redis, "doomed").await;
    let doomed_url = format!("ws://{addr}/ws");
    let (clients, total) = (20, 60u64);
    let mut readers = Vec::new();
    for i in 0..clients {
        let mut cfg = ClientConfig::new(doomed_url.clone(), token(&format!("r{i}")));
        cfg.fallback_urls = vec![ws_url(&c.edges[0])];
        cfg.backoff_base = Duration::from_millis(50);
        cfg.backoff_max = Duration::from_millis(500);
        let (client, events) = Client::connect(cfg).await.unwrap();
        client.subscribe("live").await.unwrap();
        readers.push((client, events));
    }
    let router = c.routers[0].addr;
    let post = |i: u64| async move {
        let (s, b) = post(
            router,
            "/api/publish",
            &json!({"chat": "live", "client_msg_id": format!("p{i}"), "text": format!("post {i}")}),
        )
        .await;
        assert_eq!(s, 200, "{b}");
    };
    for i in 1..=total / 3 {
        post(i).await;
    }
    doomed.kill().unwrap(); // SIGKILL under load: no drain, no goodbye
    doomed.wait().unwrap();
    for i in total / 3 + 1..=total {
        post(i).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (i, (_client, events)) in readers.iter_mut().enumerate() {
        let mut next = 1;
        let mut reconnected = false;
        while next <= total {
            let event = tokio::time::timeout(Duration::from_secs(20), events.recv())
                .await
                .unwrap_or_else(|_| panic!("reader {i} stalled at seq {next}"))
                .expect("client stopped");
            match event {
                Event::Delivery(d) => {
                    assert_eq!(d.seq, next, "reader {i}: once each, in order");
                    next += 1;
                }
                Event::Reconnected { .. } => reconnected = true,
                Event::ResyncRequired { .. } => panic!("history still holds everything"),
                _ => {}
            }
        }
        assert!(reconnected, "reader {i} moved to the surviving edge");
    }
    c.shutdown().await;
}

/// A router stopping gracefully (a rolling deploy) unsubscribes first and
/// finishes the requests NATS already gave it, even when they are slow
/// (Redis stalls during the stop): no request is left unanswered to wait
/// out the edge's timeout and retry, and every publish is acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_stopping_under_load_while_redis_stalls_strands_no_request() {
    let mut c = Cluster::new(2, 1).await;
    let edge_addr = c.edges[0].addr();
    let retries = || metric(edge_addr, "switchboard_edge_router_retries_total");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut publishers = Vec::new();
    for i in 0..6 {
        let mut raw = Raw::connected(&c.edges[0], &format!("p{i}")).await;
        let r = raw.request(json!({"subscribe": {"chat": "roll"}})).await;
        assert!(r.get("subscribeResult").is_some(), "{r}");
        let done = done.clone();
        publishers.push(tokio::spawn(async move {
            let mut sent = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                sent += 1;
                publish(
                    &mut raw,
                    json!({"chat": "roll"}),
                    &format!("p{i}-{sent}"),
                    "x",
                )
                .await;
                // Under the per-socket publish rate (20/s).
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
            sent
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(retries().await, 0.0);

    // Redis stalls, so requests pile up in both routers; router-0 stops.
    c.redis.pause();
    let leaving = c.routers.remove(0);
    let stopped = tokio::spawn(async move { leaving.stop().await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.redis.resume();
    stopped.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for p in publishers {
        sent += p.await.unwrap();
    }
    assert!(sent > 30, "only {sent} publishes");
    assert_eq!(
        retries().await,
        0.0,
        "requests stranded at the stopping router"
    );
    c.shutdown().await;
}

/// With NATS up but no router running, a publish is refused as "no router
/// answered", not as a history outage; with a router running and Redis
/// down it is "history unavailable". Both are 503 `Unavailable` (retry
/// later), told apart by the message and by
/// `switchboard_publish_errors_total{reason}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_with_no_router_running_is_refused_as_no_router_not_as_history() {
    let nats = switchboard_testkit::Server::nats();
    let mut redis = switchboard_testkit::Server::redis();
    let edge = start_edge(&nats, &redis, "edge-0").await;
    let addr = edge.addr();
    let no_router = r#"switchboard_publish_errors_total{reason="no_router"}"#;
    let history = r#"switchboard_publish_errors_total{reason="history"}"#;
    let message = |r: &Value| {
        r["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let mut alice = Raw::connected(&edge, "alice").await;
    let refused_before = metric(addr, no_router).await;
    let publish_raw =
        |id: &str| json!({"publish": {"chat": "c", "clientMsgId": id, "payload": b64("x")}});

    let r = alice.request(publish_raw("m1")).await;
    assert_eq!(r["error"]["code"], 503, "{r}");
    assert!(message(&r).starts_with("no router answered"), "{r}");
    let (status, body) = post(
        addr,
        "/api/publish",
        &json!({"chat": "c", "client_msg_id": "api-1", "text": "x"}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert!(message(&body).starts_with("no router answered"), "{body}");
    assert_eq!(metric(addr, no_router).await - refused_before, 2.0);

    let router = start_router(&nats, &redis, "router-0").await;
    wait_for_routers(&nats).await;
    publish(&mut alice, json!({"chat": "c"}), "m2", "x").await;
    let history_before = metric(addr, history).await;
    redis.kill();
    let r = alice.request(publish_raw("m3")).await;
    assert_eq!(r["error"]["code"], 503, "{r}");
    assert!(message(&r).starts_with("history unavailable"), "{r}");
    assert_eq!(
        metric(addr, no_router).await - refused_before,
        2.0,
        "a Redis outage is not 'no router'"
    );
    assert!(metric(addr, history).await > history_before);

    redis.restart();
    edge.shutdown().await;
    router.stop().await;
}
