//! `switchboard-ctl` against a real cluster: two edges and a router on
//! real nats-server and redis-server. Every subcommand runs twice, for
//! people and with `--json`, through the same library code as the binary
//! (`switchboard_node::ctl`), over the admin API; the publish key and a
//! wrong key are refused, and a node without an admin key has none. The
//! binary itself (this package's `system-ctl`, the shipped `main`) runs
//! too, for its exit status, stdout and stderr.
use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use serde_json::{Value, json};
use switchboard_edge::Edge;
use switchboard_node::ctl::{Cli, CtlError, run};
use switchboard_testkit::Server;

use crate::common::{cluster::*, *};

const ADMIN_KEY: &str = "operator-admin-key";
/// `switchboard_node::ctl::main`, as `switchboard-ctl` runs it.
const CTL_BIN: &str = env!("CARGO_BIN_EXE_system-ctl");

/// Runs the binary with the key in its environment: (exit code, stdout,
/// stderr).
async fn ctl_process(addr: SocketAddr, key: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(CTL_BIN);
    cmd.arg("--url")
        .arg(format!("http://{addr}"))
        .args(args)
        .env("SWITCHBOARD_ADMIN_KEY", key)
        .env_remove("SWITCHBOARD_CTL_URL");
    let out = cmd.output().await.unwrap();
    (
        out.status.code(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

struct Fleet {
    _nats: Server,
    _redis: Server,
    router: RouterNode,
    edges: Vec<Edge>,
}

async fn fleet() -> Fleet {
    let (nats, redis) = (Server::nats(), Server::redis());
    let router = start_router_with(&nats, &redis, "router-0", &["--admin-key", ADMIN_KEY]).await;
    wait_for_routers(&nats).await;
    let mut edges = Vec::new();
    for node in ["edge-0", "edge-1"] {
        let mut c = edge_config(&nats, &redis, node);
        c.admin_key = Some(ADMIN_KEY.into());
        edges.push(start(c).await);
    }
    Fleet {
        _nats: nats,
        _redis: redis,
        router,
        edges,
    }
}

/// Runs `switchboard-ctl --url <addr> --admin-key <key> <args>`; its output.
async fn ctl_with(addr: SocketAddr, key: &str, args: &[&str]) -> Result<String, CtlError> {
    let url = format!("http://{addr}");
    let mut argv = vec!["switchboard-ctl", "--url", &url, "--admin-key", key];
    argv.extend(args);
    let cli = Cli::try_parse_from(argv).expect("valid arguments");
    let mut out = Vec::new();
    run(cli, &mut out, false).await?;
    Ok(String::from_utf8(out).expect("UTF-8 output"))
}

async fn ctl(addr: SocketAddr, args: &[&str]) -> String {
    match ctl_with(addr, ADMIN_KEY, args).await {
        Ok(out) => out,
        Err(e) => panic!("switchboard-ctl {args:?}: {e}"),
    }
}

/// `--json` output: one object.
async fn ctl_json(addr: SocketAddr, args: &[&str]) -> Value {
    let mut argv = vec!["--json"];
    argv.extend(args);
    let out = ctl(addr, &argv).await;
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn edge<'a>(list: &'a Value, node: &str) -> &'a Value {
    list["edges"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["node"] == node)
        .unwrap_or_else(|| panic!("{node} not in {list}"))
}

/// Waits until `edges --json` shows what `ok` wants.
async fn wait_edges(addr: SocketAddr, ok: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        last = ctl_json(addr, &["edges"]).await;
        if ok(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("edges never as wanted: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchboard_ctl_reads_and_operates_a_two_edge_cluster() {
    let f = fleet().await;
    let router = f.router.addr;
    let (e0, e1) = (&f.edges[0], &f.edges[1]);
    let _alice0 = Raw::connected(e0, "alice").await;
    let mut alice1 = Raw::connected(e1, "alice").await;
    let mut bob = Raw::connected(e1, "bob").await;

    // The registry: both edges, their sockets, version, not draining.
    let edges = wait_edges(router, |v| {
        v["edges"].as_array().is_some_and(|e| e.len() == 2)
            && edge(v, "edge-0")["sockets"] == 1
            && edge(v, "edge-1")["sockets"] == 2
    })
    .await;
    for node in ["edge-0", "edge-1"] {
        let e = edge(&edges, node);
        assert_eq!(e["reachable"], true, "{e}");
        assert_eq!(e["draining"], false, "{e}");
        assert_eq!(e["version"], env!("CARGO_PKG_VERSION"), "{e}");
        assert!(e["deliveries_total"].is_u64(), "{e}");
    }
    let table = ctl(router, &["edges"]).await;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("EDGE"), "{table}");
    assert!(lines[0].contains("SOCKETS") && lines[0].contains("DRAINING"));
    assert!(lines[1].starts_with("edge-0") && lines[1].ends_with("serving"));
    assert!(lines[2].starts_with("edge-1") && lines[2].contains(" 2 "));
    // An edge's admin API reaches the other edge over NATS too.
    let from_edge = ctl_json(e0.addr(), &["edges"]).await;
    assert_eq!(edge(&from_edge, "edge-1")["sockets"], 2, "{from_edge}");

    // A user's presence: two devices on two edges.
    let alice = ctl_json(router, &["user", "alice"]).await;
    assert_eq!(alice["online"], true, "{alice}");
    assert_eq!(alice["devices"], 2, "{alice}");
    assert_eq!(alice["edges"], json!(["edge-0", "edge-1"]), "{alice}");
    let text = ctl(router, &["user", "alice"]).await;
    assert!(text.contains("devices    2"), "{text}");
    assert!(text.contains("edges      edge-0, edge-1"), "{text}");
    let nobody = ctl_json(router, &["user", "nobody"]).await;
    assert_eq!(nobody["online"], false, "{nobody}");

    // A stream's position and its last messages' metadata, never a payload.
    for i in 1..=3 {
        let (status, body) = post(
            router,
            "/api/publish",
            &json!({"chat": "room", "client_msg_id": format!("m{i}"), "text": format!("secret-text-{i}")}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let stream = ctl_json(router, &["stream", "--chat", "room", "--last", "2"]).await;
    assert_eq!(stream["stream"], "chat:room", "{stream}");
    assert_eq!(stream["seq"], 3, "{stream}");
    let msgs = stream["messages"].as_array().unwrap();
    let seqs: Vec<u64> = msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2, 3], "{stream}");
    assert_eq!(msgs[1]["client_msg_id"], "m3");
    assert_eq!(msgs[1]["sender"], "backend");
    assert_eq!(msgs[1]["payload_bytes"], "secret-text-3".len());
    assert!(msgs[1].get("payload").is_none(), "{stream}");
    let text = ctl(router, &["stream", "--chat", "room", "--last", "2"]).await;
    assert!(text.starts_with("stream chat:room  seq 3"), "{text}");
    assert!(text.contains("CLIENT_MSG_ID") && text.contains("m2") && text.contains("m3"));
    assert!(!text.contains("secret-text"), "{text}");
    let empty = ctl_json(router, &["stream", "--user", "alice"]).await;
    assert_eq!(empty["seq"], 0, "{empty}");
    assert_eq!(empty["messages"], json!([]), "{empty}");

    // A chat's members and who of them is online (a router counts them).
    let (status, body) = post(
        router,
        "/api/chats/room/members",
        &json!({"add": ["alice", "bob", "carol"]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let chat = ctl_json(router, &["chat", "room"]).await;
    assert_eq!(chat, json!({"chat": "room", "members": 3, "online": 2}));
    let text = ctl(router, &["chat", "room"]).await;
    assert!(
        text.contains("members  3") && text.contains("online   2"),
        "{text}"
    );
    let on_edge = ctl_json(e0.addr(), &["chat", "room"]).await;
    assert_eq!(on_edge["members"], 3, "{on_edge}");
    assert_eq!(on_edge["online"], Value::Null, "{on_edge}");

    // top: counters once, then rates between refreshes.
    let once = ctl_json(router, &["top", "--once"]).await;
    assert_eq!(once["edges"].as_array().unwrap().len(), 2, "{once}");
    assert_eq!(edge(&once, "edge-1")["deliveries_per_sec"], Value::Null);
    let lines = ctl(
        router,
        &["--json", "top", "--iterations", "2", "--interval-ms", "200"],
    )
    .await;
    let samples: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(samples.len(), 2, "{lines}");
    assert!(
        edge(&samples[1], "edge-1")["deliveries_per_sec"].is_f64(),
        "{lines}"
    );
    let view = ctl(
        router,
        &["top", "--iterations", "2", "--interval-ms", "200"],
    )
    .await;
    assert_eq!(
        view.matches("switchboard top: 2 edges, 3 sockets").count(),
        2
    );
    assert!(view.contains("DELIVERIES/S"), "{view}");

    // Kick: bob's socket closes with 4503.
    let kicked = ctl_json(router, &["kick", "bob"]).await;
    assert_eq!(kicked["edges"], 1, "{kicked}");
    assert_eq!(bob.until_close().await.0, Some(4503));
    let text = ctl(router, &["kick", "nobody"]).await;
    assert_eq!(text, "kicked user nobody: 0 edges told\n");

    // Drain edge-1 without stopping it: its socket is told to reconnect,
    // it is unready and refuses sockets, and it still answers.
    let text = ctl(router, &["drain", "edge-1"]).await;
    // (bob's closed socket may not have left the edge's index yet)
    assert!(text.starts_with("edge edge-1 draining: "), "{text}");
    assert!(
        text.ends_with("sockets being closed in batches\n"),
        "{text}"
    );
    assert_eq!(alice1.until_close().await.0, Some(4000));
    let edges = wait_edges(router, |v| edge(v, "edge-1")["sockets"] == 0).await;
    assert_eq!(edge(&edges, "edge-1")["draining"], true);
    assert_eq!(edge(&edges, "edge-0")["draining"], false);
    assert_eq!(http_get(e1.addr(), "/readyz").await.0, 503);
    assert_eq!(http_get(e1.addr(), "/healthz").await.0, 200);
    let table = ctl(router, &["edges"]).await;
    assert!(
        table.lines().nth(2).unwrap().ends_with("draining"),
        "{table}"
    );
    let drained = ctl_json(e0.addr(), &["drain", "edge-0"]).await;
    assert_eq!(drained["node"], "edge-0", "{drained}");
    assert_eq!(drained["draining"], true, "{drained}");
    match ctl_with(router, ADMIN_KEY, &["drain", "edge-9"]).await {
        Err(CtlError::Refused {
            status: 503,
            message,
        }) => {
            assert!(message.contains("edge-9"), "{message}")
        }
        other => panic!("{other:?}"),
    }

    for e in f.edges {
        e.shutdown().await;
    }
    f.router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_a_wrong_key_and_the_publish_key() {
    let f = fleet().await;
    let router = f.router.addr;
    for addr in [router, f.edges[0].addr()] {
        for key in ["wrong", API_KEY, ""] {
            for args in [
                &["edges"][..],
                &["--json", "user", "alice"],
                &["drain", "edge-0"],
            ] {
                match ctl_with(addr, key, args).await {
                    Err(CtlError::Refused { status, message }) => {
                        assert_eq!(status, 401, "{key:?} {args:?}");
                        assert_eq!(message, "missing or wrong API key");
                    }
                    other => panic!("{key:?} {args:?}: {other:?}"),
                }
            }
        }
        // The publish key's own helper: refused on the admin routes.
        assert_eq!(get(addr, "/admin/edges").await.0, 401);
    }
    // The binary: the key from the environment, a table on stdout, exit 0;
    // a wrong key: the reason on stderr, nothing on stdout, exit 1.
    let (code, out, err) = ctl_process(router, ADMIN_KEY, &["edges"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("EDGE") && out.contains("edge-1"), "{out}");
    let (code, out, err) = ctl_process(router, ADMIN_KEY, &["--json", "user", "alice"]).await;
    assert_eq!(code, Some(0), "{err}");
    let alice: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(alice["online"], false, "{out}");
    let (code, out, err) = ctl_process(router, API_KEY, &["drain", "edge-0"]).await;
    assert_eq!(code, Some(1));
    assert_eq!(out, "");
    assert_eq!(err, "switchboard-ctl: 401: missing or wrong API key\n");
    // Nothing was drained by the refused requests.
    let edges = ctl_json(router, &["edges"]).await;
    assert_eq!(edge(&edges, "edge-0")["draining"], false, "{edges}");

    // A node without an admin key has no admin API.
    let mut c = config();
    c.api_key = Some(API_KEY.into());
    let standalone = start(c).await;
    match ctl_with(standalone.addr(), ADMIN_KEY, &["edges"]).await {
        Err(CtlError::Refused { status, message }) => {
            assert_eq!(status, 404);
            assert_eq!(message, "admin API disabled: set --admin-key");
        }
        other => panic!("{other:?}"),
    }
    standalone.shutdown().await;
    for e in f.edges {
        e.shutdown().await;
    }
    f.router.stop().await;
}

/// Standalone, the edge is the whole fleet: its admin API lists itself.
#[tokio::test]
async fn a_standalone_edge_lists_itself() {
    let mut c = config();
    c.node_id = "solo".into();
    c.admin_key = Some(ADMIN_KEY.into());
    let solo = start(c).await;
    let _a = Raw::connected(&solo, "alice").await;
    let edges = wait_edges(solo.addr(), |v| edge(v, "solo")["sockets"] == 1).await;
    assert_eq!(edges["edges"].as_array().unwrap().len(), 1, "{edges}");
    let alice = ctl_json(solo.addr(), &["user", "alice"]).await;
    assert_eq!(alice["edges"], json!(["solo"]), "{alice}");
    solo.shutdown().await;
}
