//! One contract, every PresenceStore: memory, and Redis on a real
//! redis-server, a real Redis Cluster and a real Sentinel setup spawned
//! for the test.
use std::sync::Arc;

use switchboard_presence::{
    MemoryPresence, PresenceStore, RedisPresence, Session, Transition, connect_redis,
};
use switchboard_protocol::UserId;
use switchboard_testkit::{RedisCluster, RedisSentinel, Server};

fn s(user: &str, id: &str, node: &str) -> Session {
    Session {
        user: UserId::parse(user).unwrap(),
        session_id: id.into(),
        node: node.into(),
    }
}

fn u(user: &str) -> UserId {
    UserId::parse(user).unwrap()
}

const TTL: i64 = 1_000;

async fn contract(p: Arc<dyn PresenceStore>) {
    // Nodes lease themselves before they register sessions.
    for node in ["e1", "e2"] {
        assert!(p.node_heartbeat(node, "", 0).await.unwrap(), "a new lease");
        assert!(!p.node_heartbeat(node, "", 5).await.unwrap(), "a renewal");
    }
    // First device online, second unchanged; last device offline once.
    assert_eq!(
        p.register(&s("a", "s1", "e1"), 0).await.unwrap(),
        Transition::BecameOnline
    );
    assert_eq!(
        p.register(&s("a", "s2", "e2"), 10).await.unwrap(),
        Transition::Unchanged
    );
    let st = p.status(&[u("a"), u("nobody")], 20).await.unwrap();
    assert_eq!((st[0].online, st[0].devices), (true, 2));
    assert_eq!(
        (st[1].online, st[1].devices, st[1].last_seen_ms),
        (false, 0, 0)
    );
    assert_eq!(p.nodes_of(&u("a")).await.unwrap(), vec!["e1", "e2"]);
    assert!(p.nodes_of(&u("nobody")).await.unwrap().is_empty());
    assert_eq!(
        p.unregister(&s("a", "s1", "e1"), 30).await.unwrap(),
        Transition::Unchanged
    );
    assert_eq!(p.nodes_of(&u("a")).await.unwrap(), vec!["e2"]);
    assert_eq!(
        p.unregister(&s("a", "s2", "e2"), 40).await.unwrap(),
        Transition::BecameOffline { last_seen_ms: 40 }
    );
    assert_eq!(
        p.unregister(&s("a", "s2", "e2"), 50).await.unwrap(),
        Transition::Unchanged
    );
    let st = p.status(&[u("a")], 60).await.unwrap();
    assert_eq!((st[0].online, st[0].last_seen_ms), (false, 40));

    // Which sessions the store holds, for their node, in the order asked.
    p.register(&s("r1", "s1", "e1"), 60).await.unwrap();
    p.register(&s("r2", "s2", "e2"), 60).await.unwrap();
    p.register(&s("r2", "s3", "e2"), 60).await.unwrap();
    let asked = [
        s("r1", "s1", "e1"),
        s("r1", "s1", "e2"),
        s("r2", "s3", "e2"),
        s("nobody", "s9", "e1"),
        s("a", "s1", "e1"),
    ];
    assert_eq!(
        p.registered(&asked).await.unwrap(),
        [true, false, true, false, false]
    );
    assert!(p.registered(&[]).await.unwrap().is_empty());
    for (user, id, node) in [("r1", "s1", "e1"), ("r2", "s2", "e2"), ("r2", "s3", "e2")] {
        p.unregister(&s(user, id, node), 60).await.unwrap();
    }

    // A crashed node: its lease runs out and its sessions expire once.
    p.node_heartbeat("dead", "", 100).await.unwrap();
    p.node_heartbeat("alive", "", 100).await.unwrap();
    p.register(&s("b", "s3", "dead"), 100).await.unwrap();
    p.register(&s("c", "s4", "alive"), 100).await.unwrap();
    // b's second device is on a live node: b stays online.
    p.register(&s("d", "s5", "dead"), 100).await.unwrap();
    p.register(&s("d", "s6", "alive"), 100).await.unwrap();
    p.node_heartbeat("alive", "", 100 + TTL - 10).await.unwrap();
    let st = p.status(&[u("b")], 100 + TTL + 1).await.unwrap();
    assert!(!st[0].online, "a dead node's session no longer counts");
    let gone = p.expire(100 + TTL + 5).await.unwrap();
    assert_eq!(gone, vec![(u("b"), 100 + TTL + 5)]);
    assert!(
        p.expire(100 + TTL + 6).await.unwrap().is_empty(),
        "offline fires once"
    );
    let st = p
        .status(&[u("b"), u("c"), u("d")], 100 + TTL + 7)
        .await
        .unwrap();
    assert!(!st[0].online && st[1].online);
    assert_eq!((st[2].online, st[2].devices), (true, 1));
    assert_eq!(p.nodes_of(&u("d")).await.unwrap(), vec!["alive"]);
    // The dead node's lease is gone; if it comes back it is told so.
    assert!(p.node_heartbeat("dead", "", 100 + TTL + 8).await.unwrap());

    // A node that starts again under its id drops its previous sessions.
    let mut gone = p.drop_node("alive", 1_500).await.unwrap();
    gone.sort();
    assert_eq!(gone, vec![(u("c"), 1_500), (u("d"), 1_500)]);
    assert!(p.drop_node("alive", 1_501).await.unwrap().is_empty());

    // Restoring sessions the store lost brings their users back once.
    let restored = vec![
        s("c", "s7", "alive"),
        s("c", "s8", "alive"),
        s("e", "s9", "alive"),
    ];
    let mut back = p.restore(&restored, 1_600).await.unwrap();
    back.sort();
    assert_eq!(back, vec![u("c"), u("e")]);
    assert!(
        p.restore(&restored, 1_601).await.unwrap().is_empty(),
        "idempotent"
    );
    let st = p.status(&[u("c")], 1_602).await.unwrap();
    assert_eq!(st[0].devices, 2);

    // Nodes are listed while their lease lasts.
    p.node_heartbeat("edge-a", "10.0.0.1:8080", 0)
        .await
        .unwrap();
    p.node_heartbeat("edge-b", "10.0.0.2:8080", 500)
        .await
        .unwrap();
    let mut nodes: Vec<(String, String)> = p
        .nodes(TTL + 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n.starts_with("edge-"))
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        vec![("edge-b".to_owned(), "10.0.0.2:8080".to_owned())]
    );
}

#[tokio::test]
async fn memory_presence_meets_the_contract() {
    contract(Arc::new(MemoryPresence::new(TTL, 1000))).await;
}

#[tokio::test]
async fn redis_presence_meets_the_contract() {
    let redis = Server::redis();
    let client = redis::Client::open(redis.url()).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    contract(Arc::new(RedisPresence::new(conn, TTL))).await;
}

#[tokio::test]
async fn redis_cluster_presence_meets_the_contract() {
    let cluster = RedisCluster::start();
    let conn = connect_redis(&cluster.url()).await.unwrap();
    let p = Arc::new(RedisPresence::new(conn, TTL));
    contract(p.clone()).await;

    // The online set is spread over every master, not one hot key.
    p.node_heartbeat("spread", "", 0).await.unwrap();
    let users: Vec<UserId> = (0..300).map(|i| u(&format!("fan-{i}"))).collect();
    let sessions: Vec<Session> = users
        .iter()
        .enumerate()
        .map(|(i, user)| s(user.as_str(), &format!("x{i}"), "spread"))
        .collect();
    assert_eq!(p.restore(&sessions, 0).await.unwrap().len(), 300);
    assert_eq!(p.count_online(&users).await.unwrap(), 300);
    for m in cluster.masters() {
        let keys = switchboard_testkit::cli(m, &["--scan", "--pattern", "sb:{online:*"]).unwrap();
        assert!(
            keys.lines().count() >= 5,
            "master {m} holds few online buckets:\n{keys}"
        );
    }
    assert_eq!(p.drop_node("spread", 10).await.unwrap().len(), 300);
    assert_eq!(p.count_online(&users).await.unwrap(), 0);

    // No node ever answered a cross-slot error: every script and
    // transaction stayed in one slot.
    for m in cluster.masters() {
        let stats = switchboard_testkit::cli(m, &["info", "errorstats"]).unwrap();
        assert!(!stats.contains("CROSSSLOT"), "master {m}: {stats}");
    }
}

#[tokio::test]
async fn redis_sentinel_presence_meets_the_contract() {
    let sentinel = RedisSentinel::start();
    let conn = connect_redis(&sentinel.url()).await.unwrap();
    contract(Arc::new(RedisPresence::new(conn, TTL))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_connects_on_many_edges_announce_online_once() {
    let redis = Server::redis();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut tasks = Vec::new();
    for edge in 0..8 {
        let conn = redis::aio::ConnectionManager::new(client.clone())
            .await
            .unwrap();
        let p = RedisPresence::new(conn, 60_000);
        tasks.push(tokio::spawn(async move {
            let mut online = 0;
            for i in 0..20 {
                if p.register(&s("hot", &format!("e{edge}-{i}"), &format!("e{edge}")), 1)
                    .await
                    .unwrap()
                    == Transition::BecameOnline
                {
                    online += 1;
                }
            }
            let mut offline = 0;
            for i in 0..20 {
                if let Transition::BecameOffline { .. } = p
                    .unregister(&s("hot", &format!("e{edge}-{i}"), &format!("e{edge}")), 2)
                    .await
                    .unwrap()
                {
                    offline += 1;
                }
            }
            (online, offline)
        }));
    }
    let (mut on, mut off) = (0, 0);
    for t in tasks {
        let (a, b) = t.await.unwrap();
        on += a;
        off += b;
    }
    // Sessions overlap in time, so the user may go on and off more than
    // once, but every online is matched by exactly one offline.
    assert!(on >= 1);
    assert_eq!(on, off);
}
