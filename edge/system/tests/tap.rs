//! The event tap in a cluster: an edge appends each socket's connect and
//! close and its user's online/offline, a router the messages, all to one
//! JetStream stream; a killed edge's users go offline in the tap through a
//! router's sweep.
use std::time::{Duration, Instant};

use prost::Message;
use serde_json::json;
use switchboard_protocol::events::v1::{Event, event};
use switchboard_router::{EVENT_STREAM, TapSettings};
use switchboard_testkit::Server;

use crate::common::{
    Raw, b64,
    cluster::{edge_config, edge_process_env, start_router_with, wait_for_routers},
    free_port, start, token, wait_listening,
};

/// The stream's events on subjects starting with `prefix`, in stream
/// order, once there are `n` (or after 10 s).
async fn events(nats: &Server, prefix: &str, n: usize) -> Vec<(String, Event)> {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = js.get_stream(EVENT_STREAM).await.unwrap();
        let state = stream.info().await.unwrap().state.clone();
        let mut out = Vec::new();
        for seq in state.first_sequence..=state.last_sequence {
            let Ok(m) = stream.get_raw_message(seq).await else {
                continue;
            };
            if m.subject.starts_with(prefix) {
                out.push((m.subject.to_string(), Event::decode(m.payload).unwrap()));
            }
        }
        if out.len() >= n || Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `conn+` / `conn-` / `online` / `offline`, with the node that appended it.
fn describe(e: &Event) -> (String, String) {
    let what = match &e.kind {
        Some(event::Kind::Connection(c)) if c.connected => "conn+",
        Some(event::Kind::Connection(_)) => "conn-",
        Some(event::Kind::Presence(p)) if p.online => "online",
        Some(event::Kind::Presence(_)) => "offline",
        Some(event::Kind::Message(_)) => "message",
        None => "none",
    };
    (what.to_owned(), e.node.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sockets_connect_message_and_close_reach_the_tap_in_order() {
    let (nats, redis) = (Server::nats(), Server::redis());
    let router = start_router_with(&nats, &redis, "router-0", &["--event-tap"]).await;
    wait_for_routers(&nats).await;
    let mut config = edge_config(&nats, &redis, "edge-0");
    config.event_tap = Some(TapSettings::default());
    let edge = start(config).await;

    let mut alice = Raw::open(&edge, "switchboard.v1.json").await;
    let hello = alice
        .request(json!({"connect": {"token": token("alice")}}))
        .await;
    let session = hello["connectResult"]["sessionId"]
        .as_str()
        .expect("connected")
        .to_owned();
    let ack = alice
        .request(json!({"publish": {"chat": "room", "clientMsgId": "m1", "payload": b64("hello")}}))
        .await;
    assert_eq!(ack["publishAck"]["seq"], "1", "{ack}");
    alice.ws.close(None).await.unwrap();

    let mine = events(&nats, "sb.events.", 5).await;
    let seen: Vec<(String, String)> = mine.iter().map(|(_, e)| describe(e)).collect();
    let of = |what: &str| seen.iter().position(|(w, _)| w == what).unwrap();
    assert_eq!(seen.len(), 5, "{seen:?}");
    // The edge's own events in the order they happened; the message
    // somewhere between connect and close, from the router.
    assert!(
        of("conn+") < of("online") && of("online") < of("conn-"),
        "{seen:?}"
    );
    assert!(of("conn-") < of("offline"), "{seen:?}");
    assert!(
        of("conn+") < of("message") && of("message") < of("conn-"),
        "{seen:?}"
    );
    for (what, node) in &seen {
        let want = if what == "message" {
            "router-0"
        } else {
            "edge-0"
        };
        assert_eq!(node, want, "{what}");
    }
    for (subject, e) in &mine {
        match &e.kind {
            Some(event::Kind::Connection(c)) => {
                assert_eq!(subject, "sb.events.conn.alice");
                assert_eq!(
                    (c.user.as_str(), c.session_id.as_str()),
                    ("alice", &*session)
                );
            }
            Some(event::Kind::Presence(p)) => {
                assert_eq!(subject, "sb.events.presence.alice");
                assert_eq!(p.user, "alice");
            }
            Some(event::Kind::Message(d)) => {
                assert_eq!(subject, "sb.events.msg.chat.room");
                assert_eq!((d.seq, d.sender.as_str()), (1, "alice"));
                assert_eq!(&d.payload[..], b"hello", "the payload as sent");
            }
            None => panic!("an event of no kind"),
        }
    }
    edge.shutdown().await;
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_edges_users_go_offline_in_the_tap_by_a_routers_sweep() {
    let (nats, redis) = (Server::nats(), Server::redis());
    let router = start_router_with(&nats, &redis, "router-0", &["--event-tap"]).await;
    wait_for_routers(&nats).await;
    let port = free_port();
    let mut env = edge_process_env(&nats, &redis, "doomed", port);
    env.push(("SWITCHBOARD_EVENT_TAP".into(), "true".into()));
    let mut child = std::process::Command::new(crate::common::EDGE_BIN)
        .envs(env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "doomed").await;
    let _mobile = Raw::connected_addr(addr, "mobile").await;
    assert_eq!(events(&nats, "sb.events.presence.mobile", 1).await.len(), 1);
    child.kill().unwrap(); // SIGKILL: no close, no unregister
    child.wait().unwrap();
    let seen: Vec<(String, String)> = events(&nats, "sb.events.", 3)
        .await
        .iter()
        .map(|(_, e)| describe(e))
        .collect();
    assert_eq!(
        seen,
        [
            ("conn+", "doomed"),
            ("online", "doomed"),
            ("offline", "router-0")
        ]
        .map(|(w, n)| (w.to_owned(), n.to_owned())),
        "a killed socket has no close event; the sweep's offline is there"
    );
    router.stop().await;
}
