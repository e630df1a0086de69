//! Issue #19, ADR 0044: a message stored in history whose bus publish was
//! lost, with nothing after it in its stream, still reaches the socket.
//! Real NATS and Redis: a router's publish lost in a NATS server that
//! dies (the receiving edge, on another server of the cluster, sees no
//! disconnect: only the periodic position check finds it), and a stream
//! joined before its first message whose seq 1 was lost around an edge's
//! NATS reconnect (the sweep after the reconnect must read it), and a
//! presence registration lost in a Redis Cluster failover.
use std::time::Duration;

use crate::common::{cluster::*, *};
use serde_json::json;
use switchboard_protocol::{
    StreamKey, UserId,
    client::{Client, ClientConfig, Event, Events},
};
use switchboard_router::{Draft, History, HistoryLimits, RedisHistory, connect_redis};
use switchboard_testkit::{NatsCluster, RedisCluster, Server};

/// The next delivery within `within`: (seq, client message id).
async fn next_delivery(events: &mut Events, within: Duration) -> Option<(u64, String)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(Event::Delivery(d))) => return Some((d.seq, d.client_msg_id)),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return None,
        }
    }
}

async fn history(redis: &impl RedisUrl) -> RedisHistory {
    RedisHistory::new(
        connect_redis(&redis.redis_url()).await.unwrap(),
        HistoryLimits::default(),
    )
}

fn user_stream(user: &str) -> StreamKey {
    StreamKey::User(UserId::parse(user).unwrap())
}

/// The router publishes into a NATS server that is paused, then killed:
/// the delivery dies in its socket. The router stored the message and
/// acked it; the edge is on another server of the cluster and sees no
/// reconnect, and nothing follows in the stream. The position check
/// repairs it within about one interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_lost_in_a_dying_nats_server_is_found_by_the_position_check() {
    let mut nats = tokio::task::block_in_place(NatsCluster::start);
    let redis = Server::redis();
    // The router on server 0 only, the edge on server 1 only.
    let router = start_router(&nats.nodes()[0], &redis, "router-0").await;
    let mut config = edge_config(&nats.nodes()[1], &redis, "edge-0");
    config.position_check_interval = Duration::from_secs(1);
    let edge = start(config).await;
    wait_for_routers(&nats.nodes()[1]).await;
    let (_client, mut events) = Client::connect(ClientConfig::new(ws_url(&edge), token("rcpt")))
        .await
        .unwrap();
    let dm = |id: &str| json!({"user": "rcpt", "client_msg_id": id, "text": id});
    // The path works, and the edge's interest reached server 0.
    let (status, body) = post(router.addr, "/api/publish", &dm("m1")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        next_delivery(&mut events, Duration::from_secs(10)).await,
        Some((1, "m1".to_owned()))
    );
    // Server 0 hangs: the router's publish sits in its socket.
    nats.nodes()[0].pause();
    let router_addr = router.addr;
    let publish = tokio::spawn(async move { post(router_addr, "/api/publish", &dm("m2")).await });
    let stored = history(&redis).await;
    let key = user_stream("rcpt");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stored.positions(std::slice::from_ref(&key)).await.unwrap()[0].seq < 2 {
        assert!(tokio::time::Instant::now() < deadline, "m2 never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Stored, then handed to the connection: give the publish a moment to
    // reach the socket, then the server dies with it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tokio::task::block_in_place(|| nats.nodes()[0].kill());
    // Within an interval, the grace and a read (and some slack).
    assert_eq!(
        next_delivery(&mut events, Duration::from_secs(6)).await,
        Some((2, "m2".to_owned())),
        "the lost last message never arrived"
    );
    publish.abort();
    edge.shutdown().await;
    router.kill();
}

/// A stream joined before its first message has no epoch at the edge; a
/// first message lost around the edge's NATS reconnect is read by the
/// sweep the reconnect starts (the position check is far off here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconnect_reads_a_stream_joined_before_its_first_message() {
    let mut nats = Server::nats();
    let redis = Server::redis();
    let mut config = edge_config(&nats, &redis, "edge-0");
    config.position_check_interval = Duration::from_secs(600);
    let edge = start(config).await;
    let (_client, mut events) = Client::connect(ClientConfig::new(ws_url(&edge), token("fresh")))
        .await
        .unwrap();
    // Stored by a router whose publish the outage lost.
    let stored = history(&redis).await;
    let draft = Draft {
        sender: UserId::parse("sender").unwrap(),
        client_msg_id: "first".into(),
        payload: "first".into(),
        timestamp_ms: switchboard_protocol::now_ms(),
    };
    let appended = stored.append(&user_stream("fresh"), draft).await.unwrap();
    assert_eq!(appended.seq, 1);
    tokio::task::block_in_place(|| nats.restart());
    assert_eq!(
        next_delivery(&mut events, Duration::from_secs(15)).await,
        Some((1, "first".to_owned())),
        "the sweep after the reconnect skipped the stream"
    );
    edge.shutdown().await;
}

/// Cause 4 of ADR 0044: a presence registration a Redis Cluster master
/// acknowledged and died with before its replica had it. Routers then
/// find no edge for the user, and the edge's lease (another slot) is
/// intact, so nothing else notices: the edge's session check registers it
/// again, the user is online again and a DM finds the edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registration_lost_in_a_redis_failover_is_made_again() {
    let mut redis = RedisCluster::start();
    let nats = Server::nats();
    // A user whose slot is on another master than the node leases.
    let (lease_master, _) = redis.master_and_replica_of("sb:nodes").unwrap();
    let user = (0..100)
        .map(|i| format!("lost{i}"))
        .find(|u| {
            let key = format!("sb:{{user:{u}}}:sessions");
            redis.master_and_replica_of(&key).unwrap().0 != lease_master
        })
        .expect("a user on another master");
    let key = format!("sb:{{user:{user}}}:sessions");
    let (master, replica) = redis.master_and_replica_of(&key).unwrap();
    let router = start_router(&nats, &redis, "router-0").await;
    wait_for_routers(&nats).await;
    let mut config = edge_config(&nats, &redis, "edge-0");
    config.position_check_interval = Duration::from_secs(1);
    let edge = start(config).await;
    tokio::task::block_in_place(|| redis.wait_replicated(master, replica)).unwrap();
    // The registration is acked by the master and never replicated.
    tokio::task::block_in_place(|| {
        redis.stall_replication(master, replica, &format!("filler{{user:{user}}}"))
    });
    let (_client, mut events) = Client::connect(ClientConfig::new(ws_url(&edge), token(&user)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.nodes()[master].kill();
    redis.nodes()[replica].resume();
    tokio::task::block_in_place(|| redis.wait_promoted(replica))
        .unwrap_or_else(|e| panic!("{e}\n{}", redis.logs()));
    // Online again within the check's interval (and the failover's slack).
    let online = || async {
        let (status, body) = post(edge.addr(), "/api/presence", &json!({"users": [user]})).await;
        status == 200 && body["users"][0]["online"] == true
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !online().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lost registration was never made again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The routers find the edge again: a DM arrives at once.
    let (status, body) = post(
        router.addr,
        "/api/publish",
        &json!({"user": user, "client_msg_id": "after", "text": "after"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let got = next_delivery(&mut events, Duration::from_millis(900)).await;
    assert_eq!(got.map(|(_, id)| id), Some("after".to_owned()));
    edge.shutdown().await;
    router.stop().await;
}
