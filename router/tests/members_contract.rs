//! One membership contract (member buckets, counts, online counts) on a
//! real redis-server, a real Redis Cluster and a real Sentinel setup, with
//! a real nats-server for the push stream.
use std::{collections::HashSet, sync::Arc};

use switchboard_presence::{PresenceStore, RedisConn, RedisPresence, Session};
use switchboard_protocol::{ChatId, UserId};
use switchboard_router::{Members, MembersSettings, connect_redis};
use switchboard_testkit::{RedisCluster, RedisSentinel, Server};

const BUCKETS: u32 = 16;

fn chat(c: &str) -> ChatId {
    ChatId::parse(c).unwrap()
}

fn users(prefix: &str, n: usize) -> Vec<UserId> {
    (0..n)
        .map(|i| UserId::parse(&format!("{prefix}{i}")).unwrap())
        .collect()
}

async fn all_members(m: &Members, c: &ChatId) -> Vec<UserId> {
    let mut all = Vec::new();
    for b in 0..BUCKETS {
        all.extend(m.bucket(c, b).await.unwrap());
    }
    all
}

async fn contract(conn: RedisConn) {
    let nats = Server::nats();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let presence = Arc::new(RedisPresence::new(conn.clone(), 60_000));
    let settings = MembersSettings {
        buckets: BUCKETS,
        stream_replicas: 1,
        shard_ack_wait: std::time::Duration::from_secs(30),
    };
    let m = Members::new(conn, presence.clone(), client, settings)
        .await
        .unwrap();
    let team = chat("team");

    // Add, add again, remove: counts follow what really changed.
    assert_eq!(m.count(&team).await.unwrap(), 0);
    assert_eq!(m.add(&team, &users("u", 3)).await.unwrap(), 3);
    assert_eq!(m.add(&team, &users("u", 4)).await.unwrap(), 1, "one new");
    assert_eq!(m.count(&team).await.unwrap(), 4);
    let gone = [
        UserId::parse("u0").unwrap(),
        UserId::parse("never").unwrap(),
    ];
    assert_eq!(m.remove(&team, &gone).await.unwrap(), 1);
    assert_eq!(m.count(&team).await.unwrap(), 3);
    let mut listed: Vec<String> = all_members(&m, &team)
        .await
        .iter()
        .map(|u| u.to_string())
        .collect();
    listed.sort();
    assert_eq!(listed, ["u1", "u2", "u3"]);

    // Bulk, over more than one round trip: every member in exactly one
    // bucket, the buckets spread, other channels untouched.
    let crowd = users("m", 25_000);
    let news = chat("news");
    assert_eq!(m.add(&news, &crowd).await.unwrap(), 25_000);
    assert_eq!(m.count(&news).await.unwrap(), 25_000);
    let mut used = 0;
    let mut seen = HashSet::new();
    for b in 0..BUCKETS {
        let bucket = m.bucket(&news, b).await.unwrap();
        used += usize::from(!bucket.is_empty());
        for u in bucket {
            assert!(seen.insert(u), "a member in two buckets");
        }
    }
    assert_eq!(seen.len(), 25_000);
    assert_eq!(used, BUCKETS as usize);
    assert_eq!(m.count(&team).await.unwrap(), 3);

    // Online members are counted, not listed.
    let now = switchboard_protocol::now_ms();
    presence.node_heartbeat("e1", "", now).await.unwrap();
    for (i, u) in ["m7", "m20000", "outsider"].iter().enumerate() {
        let s = Session {
            user: UserId::parse(u).unwrap(),
            session_id: format!("s{i}"),
            node: "e1".into(),
        };
        presence.register(&s, now).await.unwrap();
    }
    assert_eq!(m.online_count(&news).await.unwrap(), 2);
    assert_eq!(m.online_count(&team).await.unwrap(), 0);

    assert_eq!(m.remove(&news, &crowd[..12_345]).await.unwrap(), 12_345);
    assert_eq!(m.count(&news).await.unwrap(), 25_000 - 12_345);
    assert_eq!(all_members(&m, &news).await.len(), 25_000 - 12_345);
}

#[tokio::test]
async fn redis_members_meet_the_contract() {
    let redis = Server::redis();
    contract(connect_redis(&redis.url()).await.unwrap()).await;
}

#[tokio::test]
async fn redis_cluster_members_meet_the_contract() {
    let cluster = RedisCluster::start();
    contract(connect_redis(&cluster.url()).await.unwrap()).await;
    // Member sets of a channel share its slot; batches that span users
    // were split by the client, never sent across slots.
    for port in cluster.masters() {
        let stats = switchboard_testkit::cli(port, &["info", "errorstats"]).unwrap();
        assert!(!stats.contains("CROSSSLOT"), "master {port}: {stats}");
    }
}

#[tokio::test]
async fn redis_sentinel_members_meet_the_contract() {
    let sentinel = RedisSentinel::start();
    contract(connect_redis(&sentinel.url()).await.unwrap()).await;
}
