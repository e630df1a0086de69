//! Every process stops within its grace, whatever its backends do (ADR
//! 0022): the real router and edge binaries get SIGTERM, with work in hand
//! (publishes and shard jobs in flight, sockets open), at the moment NATS
//! is SIGKILLed, frozen with SIGSTOP, or flapping, or Redis is killed. Each
//! exits within its grace plus a small margin: 0 when it finished
//! everything, 75 when it gave up on something, and then its log has one
//! line per thing given up on, naming it. Each case runs several rounds,
//! the fault before and after the signal in turn, to catch the race.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use switchboard_protocol::{ChatId, StreamKey, UserId, subject::ROUTER_PUBLISH};
use switchboard_router::{PublishRequest, encode_request};
use switchboard_testkit::Server;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    task::JoinHandle,
};
use tokio_tungstenite::tungstenite::Message;

use crate::common::{cluster::*, *};

/// The processes' `--shutdown-grace-ms`, small so that rounds are quick.
const GRACE: Duration = Duration::from_millis(2000);
/// What the exit may take beyond the grace: the runtime's teardown, the
/// process's exit and this test's polling on a busy box. (The watchdog
/// would end a stop at the grace plus 1 s; the log shows it did not.)
const MARGIN: Duration = Duration::from_millis(1500);
/// Rounds per case.
const ROUNDS: usize = 3;
/// The line `switchboard_node::Stop` logs per thing given up on.
const GAVE_UP: &str = "shutdown gave up";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// NATS SIGKILLed at the moment of the SIGTERM.
    NatsKilled,
    /// NATS frozen (SIGSTOP) at that moment, resumed after the exit.
    NatsPaused,
    /// Redis SIGKILLed at that moment.
    RedisKilled,
    /// NATS killed at that moment, then restarted and killed again every
    /// 250 ms through the stop.
    NatsFlapping,
}

/// A binary under test with its log in a file; killed on drop.
struct Node {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    fn spawn(bin: &str, env: Vec<(String, String)>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("node.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .envs(env)
            .env(
                "SWITCHBOARD_SHUTDOWN_GRACE_MS",
                GRACE.as_millis().to_string(),
            )
            .env("SWITCHBOARD_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Node {
            child,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn term(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM failed");
    }

    /// The exit status and when it came (from `since`), or `None` (the
    /// process is killed) when it has not come within `limit`.
    async fn exit_within(
        &mut self,
        since: Instant,
        limit: Duration,
    ) -> Option<(ExitStatus, Duration)> {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some((status, since.elapsed()));
            }
            if since.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one round saw.
struct Outcome {
    /// The fault came before the SIGTERM (even rounds), so the stop
    /// certainly met it; after it, the stop may finish first.
    fault_first: bool,
    code: i32,
    /// The `what` of each line given up on.
    gave_up: Vec<String>,
}

/// Fault-first rounds: stops that certainly met their fault.
fn met(outcomes: &[Outcome]) -> impl Iterator<Item = &Outcome> {
    outcomes.iter().filter(|o| o.fault_first)
}

/// Checks what every round must show; returns the round's outcome.
fn check(
    name: &str,
    fault: Fault,
    round: usize,
    exit: Option<(ExitStatus, Duration)>,
    log: &str,
) -> Outcome {
    let Some((status, took)) = exit else {
        panic!(
            "{name} ({fault:?}, round {round}) did not exit within {} ms of SIGTERM:\n{log}",
            (GRACE + MARGIN).as_millis()
        );
    };
    assert!(
        log.contains("shutdown signal received"),
        "{name} ({fault:?}, round {round}) never began its stop:\n{log}"
    );
    assert!(
        !log.contains("overran its grace"),
        "{name} ({fault:?}, round {round}): a step was not bounded, the watchdog ended it:\n{log}"
    );
    let code = status
        .code()
        .unwrap_or_else(|| panic!("{name} ({fault:?}) ended by a signal: {status}\n{log}"));
    let gave_up: Vec<String> = log
        .lines()
        .filter(|l| l.contains(GAVE_UP))
        .map(|l| {
            assert!(l.contains("after_ms="), "no time in {l}");
            l.split_once("what=\"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(what, _)| what.to_owned())
                .unwrap_or_else(|| panic!("nothing named in {l}"))
        })
        .collect();
    match code {
        0 => assert!(
            gave_up.is_empty(),
            "{name} ({fault:?}) exited 0 but gave up on {gave_up:?}:\n{log}"
        ),
        75 => assert!(
            !gave_up.is_empty(),
            "{name} ({fault:?}) exited 75 without naming what it gave up on:\n{log}"
        ),
        other => panic!("{name} ({fault:?}, round {round}) exited {other}:\n{log}"),
    }
    eprintln!(
        "{name} {fault:?} round {round}: exit {code} after {} ms, gave up on {gave_up:?}",
        took.as_millis()
    );
    Outcome {
        fault_first: fault_first(round),
        code,
        gave_up,
    }
}

fn fault_first(round: usize) -> bool {
    round.is_multiple_of(2)
}

/// Applies `fault` and sends SIGTERM at the same moment, the fault first
/// in even rounds; returns when the SIGTERM went, and the flapping NATS
/// (handed back when it stops flapping) if any.
fn fault_and_term(
    fault: Fault,
    round: usize,
    node: &Node,
    nats: &mut Option<Server>,
    redis: &mut Server,
) -> (Instant, Option<std::thread::JoinHandle<Server>>) {
    let mut flapping = None;
    let mut inject = |nats: &mut Option<Server>| match fault {
        Fault::NatsKilled => nats.as_mut().unwrap().kill(),
        Fault::NatsPaused => nats.as_ref().unwrap().pause(),
        Fault::RedisKilled => redis.kill(),
        Fault::NatsFlapping => {
            let mut server = nats.take().unwrap();
            server.kill();
            flapping = Some(std::thread::spawn(move || {
                let until = Instant::now() + GRACE + MARGIN;
                while Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(250));
                    server.restart();
                    std::thread::sleep(Duration::from_millis(250));
                    server.kill();
                }
                server
            }));
        }
    };
    let sent = if fault_first(round) {
        inject(nats);
        node.term();
        Instant::now()
    } else {
        node.term();
        let sent = Instant::now();
        inject(nats);
        sent
    };
    (sent, flapping)
}

/// Puts NATS back as it was for the next step (resumed, or the flapping
/// one handed back).
fn settle(nats: &mut Option<Server>, flapping: Option<std::thread::JoinHandle<Server>>) {
    if let Some(f) = flapping {
        *nats = Some(f.join().unwrap());
    }
    if let Some(n) = nats.as_ref() {
        n.resume();
    }
}

// ---------------------------------------------------------------- router

fn router_env(nats: &Server, redis: &Server, port: u16) -> Vec<(String, String)> {
    vec![
        (
            "SWITCHBOARD_ROUTER_LISTEN".into(),
            format!("127.0.0.1:{port}"),
        ),
        ("SWITCHBOARD_NATS_URL".into(), nats.url()),
        ("SWITCHBOARD_REDIS_URL".into(), redis.url()),
        ("SWITCHBOARD_API_KEY".into(), API_KEY.into()),
        ("SWITCHBOARD_NODE_ID".into(), "router-stop".into()),
        ("SWITCHBOARD_PRESENCE_TTL_MS".into(), "1500".into()),
        ("SWITCHBOARD_CHANNEL_BUCKETS".into(), "8".into()),
    ]
}

/// A POST that never panics: the load goes on while the node stops.
async fn post_quietly(addr: SocketAddr, path: &str, body: &Value) -> bool {
    let attempt = async {
        let body = body.to_string();
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.ok()?;
        Some(out.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Keeps publish requests in flight on the routers: over NATS (as edges
/// send them) and over the HTTP API, into a channel with members (so
/// shard jobs are in flight too). Returns the tasks and the count of
/// acknowledged publishes.
async fn router_load(nats: &Server, router: SocketAddr) -> (Vec<JoinHandle<()>>, Arc<AtomicU64>) {
    let members: Vec<String> = (0..64).map(|i| format!("m{i}")).collect();
    assert!(
        post_quietly(
            router,
            "/api/channels/stopping/members",
            &json!({ "add": members })
        )
        .await,
        "members not added"
    );
    let acked = Arc::new(AtomicU64::new(0));
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut tasks = Vec::new();
    for lane in 0..8 {
        let (client, acked) = (client.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0u64.. {
                let req = PublishRequest {
                    sender: UserId::parse(&format!("sender{lane}")).unwrap(),
                    target: StreamKey::Chat(ChatId::parse("stopping").unwrap()),
                    client_msg_id: format!("nats-{lane}-{n}"),
                    payload: bytes::Bytes::from_static(b"x"),
                };
                let sent = tokio::time::timeout(
                    Duration::from_secs(1),
                    client.request(ROUTER_PUBLISH, encode_request(&req)),
                )
                .await;
                match sent {
                    Ok(Ok(_)) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }));
    }
    for lane in 0..2 {
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0u64.. {
                let body = json!({"chat": "stopping", "client_msg_id": format!("api-{lane}-{n}"), "text": "x"});
                if post_quietly(router, "/api/publish", &body).await {
                    acked.fetch_add(1, Ordering::Relaxed);
                } else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    (tasks, acked)
}

/// Rounds of: a router with publishes in flight, then `fault` and
/// SIGTERM at once. Returns each round's outcome.
async fn router_rounds(fault: Fault) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for round in 0..ROUNDS {
        let mut nats = Some(Server::nats());
        let mut redis = Server::redis();
        let port = free_port();
        let mut node = Node::spawn(ROUTER_BIN, router_env(nats.as_ref().unwrap(), &redis, port));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr, "router").await;
        wait_for_routers(nats.as_ref().unwrap()).await;
        let (load, acked) = router_load(nats.as_ref().unwrap(), addr).await;
        // Work in hand: publishes flowing (and their shard jobs).
        let deadline = Instant::now() + Duration::from_secs(10);
        while acked.load(Ordering::Relaxed) < 50 {
            assert!(Instant::now() < deadline, "no publishes acknowledged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (sent, flapping) = fault_and_term(fault, round, &node, &mut nats, &mut redis);
        let exit = node.exit_within(sent, GRACE + MARGIN).await;
        settle(&mut nats, flapping);
        for t in &load {
            t.abort();
        }
        outcomes.push(check("router", fault, round, exit, &node.log()));
    }
    outcomes
}

/// Names the router gives to what waits for NATS on its stop path.
fn waits_for_nats(what: &str) -> bool {
    what.contains("NATS") || what.contains("publish requests") || what.contains("shard jobs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_stops_in_time_when_nats_is_killed_at_the_sigterm() {
    let outcomes = router_rounds(Fault::NatsKilled).await;
    for o in met(&outcomes) {
        // Nothing it holds can be confirmed without NATS.
        assert_eq!(o.code, 75);
        assert!(
            o.gave_up.iter().any(|w| waits_for_nats(w)),
            "{:?}",
            o.gave_up
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_stops_in_time_when_nats_freezes_at_the_sigterm() {
    let outcomes = router_rounds(Fault::NatsPaused).await;
    for o in met(&outcomes) {
        // The unsubscribe is never confirmed by a frozen server.
        assert_eq!(o.code, 75);
        assert!(
            o.gave_up.iter().any(|w| waits_for_nats(w)),
            "{:?}",
            o.gave_up
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_stops_in_time_when_redis_is_killed_at_the_sigterm() {
    // Redis refuses at once, so the stop may well finish everything; what
    // check() asserts (in time, exit status and log agree) is the point.
    router_rounds(Fault::RedisKilled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_stops_in_time_while_nats_flaps() {
    router_rounds(Fault::NatsFlapping).await;
}

// ------------------------------------------------------------------ edge

/// A socket that publishes every 50 ms and reads everything until the
/// edge closes it (answering the close, so the edge's drain can finish).
async fn busy_socket(addr: SocketAddr, user: String) -> JoinHandle<()> {
    let mut raw = Raw::connected_addr(addr, &user).await;
    let r = raw.request(json!({"subscribe": {"chat": "room"}})).await;
    assert!(r.get("subscribeResult").is_some(), "{r}");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut next_id = 100u32;
        loop {
            tokio::select! {
                frame = raw.ws.next() => match frame {
                    Some(Ok(_)) => {}
                    _ => return,
                },
                _ = tick.tick() => {
                    next_id += 1;
                    let publish = json!({"id": next_id, "publish": {"chat": "room", "clientMsgId": format!("{user}-{next_id}"), "payload": b64("x")}});
                    let _ = raw.ws.send(Message::text(publish.to_string())).await;
                }
            }
        }
    })
}

/// An HTTP/1.1 keep-alive connection left idle after one answer (as a
/// scraper's): it must not hold the drain.
async fn idle_keep_alive(addr: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    s
}

/// Rounds of: an edge with busy sockets (a router in this process), then
/// `fault` and SIGTERM at once. Returns each round's outcome.
async fn edge_rounds(fault: Fault) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    for round in 0..ROUNDS {
        let mut nats = Some(Server::nats());
        let mut redis = Server::redis();
        let router = start_router(nats.as_ref().unwrap(), &redis, "router-0").await;
        wait_for_routers(nats.as_ref().unwrap()).await;
        let port = free_port();
        let mut node = Node::spawn(
            EDGE_BIN,
            edge_process_env(nats.as_ref().unwrap(), &redis, "edge-stop", port),
        );
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr, "edge").await;
        let mut sockets = Vec::new();
        for i in 0..6 {
            sockets.push(busy_socket(addr, format!("u{i}")).await);
        }
        let _idle = idle_keep_alive(addr).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (sent, flapping) = fault_and_term(fault, round, &node, &mut nats, &mut redis);
        let exit = node.exit_within(sent, GRACE + MARGIN).await;
        settle(&mut nats, flapping);
        for s in &sockets {
            s.abort();
        }
        router.kill();
        outcomes.push(check("edge", fault, round, exit, &node.log()));
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edge_stops_in_time_when_nats_is_killed_at_the_sigterm() {
    let outcomes = edge_rounds(Fault::NatsKilled).await;
    for o in met(&outcomes) {
        // The drained sockets' last presence events cannot leave.
        assert_eq!(o.code, 75);
        assert!(
            o.gave_up.iter().any(|w| w == "NATS flush"),
            "{:?}",
            o.gave_up
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edge_stops_in_time_when_nats_freezes_at_the_sigterm() {
    edge_rounds(Fault::NatsPaused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edge_stops_in_time_when_redis_is_killed_at_the_sigterm() {
    let outcomes = edge_rounds(Fault::RedisKilled).await;
    for o in met(&outcomes) {
        // Its sockets' presence sessions cannot be removed.
        assert_eq!(o.code, 75);
        assert!(
            o.gave_up.iter().any(|w| w.contains("presence")),
            "{:?}",
            o.gave_up
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edge_stops_in_time_while_nats_flaps() {
    edge_rounds(Fault::NatsFlapping).await;
}
