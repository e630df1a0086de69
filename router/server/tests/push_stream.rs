//! The push-job stream's replica count comes from `--push-stream-replicas`:
//! bad values are refused before anything connects, and a count the NATS
//! deployment cannot hold stops the router at startup with a message that
//! names the setting and the stream (rather than a router that runs
//! without push or shard jobs).
use std::process::{Command, Stdio};

use switchboard_testkit::Server;

fn router(nats: &Server, redis: &Server, replicas: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchboard-router"))
        .env("SWITCHBOARD_NATS_URL", nats.url())
        .env("SWITCHBOARD_REDIS_URL", redis.url())
        .env("SWITCHBOARD_ROUTER_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD_PUSH_STREAM_REPLICAS", replicas)
        .env("SWITCHBOARD_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn replicas_out_of_range_are_refused_by_name() {
    let (nats, redis) = (Server::nats(), Server::redis());
    for bad in ["0", "6", "three"] {
        let out = router(&nats, &redis, bad);
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--push-stream-replicas"), "{bad}: {err}");
    }
}

#[test]
fn more_replicas_than_a_single_nats_server_can_hold_stop_the_router_at_startup() {
    let (nats, redis) = (Server::nats(), Server::redis());
    let out = router(&nats, &redis, "3");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SB_PUSH") && err.contains("--push-stream-replicas"),
        "{err}"
    );
}

#[tokio::test]
async fn a_shard_stream_nats_cannot_hold_stops_the_router_at_startup_by_name() {
    let (nats, redis) = (Server::nats(), Server::redis());
    // SB_PUSH already exists (it keeps its own replicas); SB_SHARD is
    // created or updated to the setting at every startup.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: switchboard_router::PUSH_STREAM.into(),
        subjects: vec![switchboard_protocol::subject::PUSH_ALL.into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let out = router(&nats, &redis, "3");
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(switchboard_router::SHARD_STREAM) && err.contains("--push-stream-replicas"),
        "{err}"
    );
}
