//! What an SRE deploys and watches: the Helm chart passes its offline
//! checks, every metric its alerts and dashboard use is on a live node's
//! `/metrics`, and a real Prometheus scrapes an edge and a router. The edge
//! and the router run as child processes of the real binaries, on real
//! nats-server and redis-server processes.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{cluster::*, *};
use serde_json::{Value, json};
use switchboard_testkit::Server;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An edge and a router as separate processes in one cluster.
struct Nodes {
    nats: Server,
    _redis: Server,
    edge: SocketAddr,
    router: SocketAddr,
    edge_proc: Proc,
    _router_proc: Proc,
}

async fn start_nodes() -> Nodes {
    let nats = Server::nats();
    let redis = Server::redis();
    let router_port = free_port();
    let router = Command::new(ROUTER_BIN)
        .envs([
            (
                "SWITCHBOARD_ROUTER_LISTEN",
                format!("127.0.0.1:{router_port}"),
            ),
            ("SWITCHBOARD_NATS_URL", nats.url()),
            ("SWITCHBOARD_REDIS_URL", redis.url()),
            ("SWITCHBOARD_API_KEY", API_KEY.into()),
            ("SWITCHBOARD_NODE_ID", "router-0".into()),
            ("SWITCHBOARD_PRESENCE_TTL_MS", "1500".into()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let router_addr: SocketAddr = format!("127.0.0.1:{router_port}").parse().unwrap();
    wait_listening(router_addr, "router").await;
    wait_for_routers(&nats).await;
    let (edge, edge_addr) = spawn_edge_process(&nats, &redis, "edge-0").await;
    Nodes {
        nats,
        _redis: redis,
        edge: edge_addr,
        router: router_addr,
        edge_proc: Proc(edge),
        _router_proc: Proc(router),
    }
}

/// Series names in a Prometheus text exposition (`foo_bucket`, not `foo`).
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every `switchboard_*` and `process_*` word in a file.
fn referenced_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let is_word = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        if is_word(bytes[i]) && (i == 0 || !is_word(bytes[i - 1]) && bytes[i - 1] != b'.') {
            let start = i;
            while i < bytes.len() && is_word(bytes[i]) {
                i += 1;
            }
            let word = &text[start..i];
            if word.starts_with("switchboard_") || word.starts_with("process_") {
                out.insert(word.to_owned());
            }
        } else {
            i += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_alerts_and_the_dashboard_is_on_a_live_node() {
    let nodes = start_nodes().await;
    let (status, edge_text) = http_get(nodes.edge, "/metrics").await;
    assert_eq!(status, 200);
    let (status, router_text) = http_get(nodes.router, "/metrics").await;
    assert_eq!(status, 200);
    let edge = exported_names(&edge_text);
    let router = exported_names(&router_text);

    let root = repo_root();
    for (file, at_least) in [
        ("helm/switchboard/templates/prometheusrule.yaml", 10),
        ("helm/switchboard/files/dashboards/switchboard.json", 25),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let used = referenced_names(&text);
        // So the check cannot pass by finding nothing to check.
        assert!(used.len() >= at_least, "{file}: only {used:?}");
        let missing: Vec<_> = used
            .iter()
            .filter(|name| {
                // Router series must come from the router, edge series from the
                // edge; process and backend series from either.
                if name.starts_with("switchboard_router_")
                    || name.starts_with("switchboard_presence_expired")
                {
                    !router.contains(*name)
                } else if name.starts_with("switchboard_edge_")
                    || name.starts_with("switchboard_api_")
                {
                    !edge.contains(*name)
                } else {
                    !edge.contains(*name) && !router.contains(*name)
                }
            })
            .collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics no node exports: {missing:?}"
        );
    }
    // The histograms alerts compute quantiles from have buckets before any traffic.
    assert!(edge.contains("switchboard_edge_delivery_latency_seconds_bucket"));
    assert!(router.contains("switchboard_router_publish_duration_seconds_bucket"));
}

/// In a cluster each hop of a message's path is counted once per message
/// on the process where it happens: the ack and the edge's hops on the
/// edge, sequencing on the router (and the ack of a backend publish there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hop_is_timed_on_the_node_where_it_happens() {
    const MESSAGES: usize = 5;
    let nodes = start_nodes().await;
    let mut raw = Raw::connected_addr(nodes.edge, "hopper").await;
    let r = raw.request(json!({"subscribe": {"chat": "hops"}})).await;
    assert!(r.get("subscribeResult").is_some(), "{r}");
    for i in 0..MESSAGES {
        let ack = raw
            .request(json!({"publish": {"chat": "hops", "clientMsgId": i.to_string(), "payload": b64("x")}}))
            .await;
        assert!(ack.get("publishAck").is_some(), "{ack}");
    }
    assert_eq!(raw.deliveries(MESSAGES).await.len(), MESSAGES);
    wait_for_hops(nodes.edge, &["ack", "bus", "queue", "fanout"], MESSAGES).await;
    wait_for_hops(nodes.router, &["sequence"], MESSAGES).await;
    let (_, edge) = http_get(nodes.edge, "/metrics").await;
    assert_eq!(
        hop_count(&edge, "sequence"),
        None,
        "a cluster edge does not sequence"
    );

    let (status, body) = post(
        nodes.router,
        "/api/publish",
        &json!({"chat": "hops", "sender": "backend", "client_msg_id": "api", "text": "hi"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(raw.deliveries(1).await.len(), 1);
    wait_for_hops(nodes.router, &["ack"], 1).await;
    wait_for_hops(nodes.router, &["sequence"], MESSAGES + 1).await;
    wait_for_hops(nodes.edge, &["bus", "queue", "fanout"], MESSAGES + 1).await;
}

#[test]
fn referenced_names_finds_metric_words_only() {
    let text = r#"expr: sum(rate(switchboard_edge_deliveries_total{job="x"}[5m])) / process_resident_memory_bytes
        "title": "a.switchboard_not_a_metric and myswitchboard_no""#;
    let got: Vec<_> = referenced_names(text).into_iter().collect();
    assert_eq!(
        got,
        [
            "process_resident_memory_bytes",
            "switchboard_edge_deliveries_total"
        ]
    );
}

/// A scrape target, labelled the way prometheus-operator labels a pod.
struct Target {
    job: &'static str,
    pod: &'static str,
    addr: SocketAddr,
}

/// The namespace the chart's alerts are rendered for (check_chart.py).
const NAMESPACE: &str = "switchboard";

/// A Prometheus server (Debian's `prometheus` package) on a free port,
/// scraping `targets` every 2 s (a slow debug-build scrape under a loaded
/// CI must not read as a dead node) and evaluating `rules` every second.
struct Prometheus {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    _proc: Proc,
}

impl Prometheus {
    async fn start(targets: &[Target], rules: Option<&Path>) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let mut config = String::from(
            "global:\n  scrape_interval: 2s\n  scrape_timeout: 2s\n  evaluation_interval: 1s\n",
        );
        if let Some(rules) = rules {
            config.push_str(&format!("rule_files: ['{}']\n", rules.display()));
        }
        config.push_str("scrape_configs:\n");
        for t in targets {
            config.push_str(&format!(
                "  - job_name: {}\n    static_configs:\n      - targets: ['{}']\n        labels: {{namespace: {NAMESPACE}, pod: {}}}\n",
                t.job, t.addr, t.pod
            ));
        }
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package `prometheus`; scripts/test installs it)");
        let p = Prometheus {
            addr,
            dir,
            _proc: Proc(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && http_get(addr, "/-/ready").await.0 == 200
            {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready: {}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GETs an API path and returns its `data`.
    async fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(self.addr, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{path}: {body}");
        v["data"].clone()
    }

    /// An instant query's result vector.
    async fn query(&self, promql: &str) -> Vec<Value> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let data = self.api(&format!("/api/v1/query?query={encoded}")).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// An instant query's first sample value, if the result is not empty.
    async fn value(&self, promql: &str) -> Option<f64> {
        self.query(promql).await.first()?["value"][1]
            .as_str()?
            .parse()
            .ok()
    }

    /// Waits until `promql` answers `want`.
    async fn wait_for(&self, promql: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            last = self.value(promql).await;
            if last == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "{promql}: wanted {want}, last answer {last:?}\n{}",
            self.log()
        );
    }

    /// Alerts pending or firing now: (alertname, pod).
    async fn alerts(&self) -> BTreeSet<(String, String)> {
        self.query("ALERTS")
            .await
            .iter()
            .map(|s| {
                let m = &s["metric"];
                let name = m["alertname"].as_str().unwrap_or_default().to_owned();
                (name, m["pod"].as_str().unwrap_or_default().to_owned())
            })
            .collect()
    }

    async fn wait_for_alert(&self, name: &str, pod: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let want = (name.to_owned(), pod.to_owned());
        loop {
            let now = self.alerts().await;
            if now.contains(&want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} on {pod} never became pending; alerts now: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn targets(nodes: &Nodes) -> [Target; 2] {
    [
        Target {
            job: "switchboard-edge",
            pod: "edge-0",
            addr: nodes.edge,
        },
        Target {
            job: "switchboard-router",
            pod: "router-0",
            addr: nodes.router,
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_an_edge_and_a_router() {
    let nodes = start_nodes().await;
    let prom = Prometheus::start(&targets(&nodes), None).await;
    prom.wait_for(r#"up{job="switchboard-edge"}"#, 1.0).await;
    prom.wait_for(r#"up{job="switchboard-router"}"#, 1.0).await;

    // Three sockets open: the gauge Prometheus stores follows them.
    let mut sockets = Vec::new();
    for user in ["ann", "ben", "cat"] {
        sockets.push(Raw::connected_addr(nodes.edge, user).await);
    }
    prom.wait_for(
        r#"sum(switchboard_edge_connections{job="switchboard-edge"})"#,
        3.0,
    )
    .await;

    // A publish through the router: its counter and histogram move.
    let r = sockets[0]
        .request(json!({"subscribe": {"chat": "ops"}}))
        .await;
    assert!(r.get("subscribeResult").is_some(), "{r}");
    let (status, body) = post(
        nodes.router,
        "/api/publish",
        &json!({"chat": "ops", "sender": "backend", "client_msg_id": "m1", "text": "hi"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sockets[0].deliveries(1).await.len(), 1);
    prom.wait_for(
        r#"sum(switchboard_router_publishes_total{job="switchboard-router",result="ok"})"#,
        1.0,
    )
    .await;
    prom.wait_for(
        r#"sum(switchboard_router_publish_duration_seconds_count{job="switchboard-router"}) > bool 0"#,
        1.0,
    )
    .await;
    prom.wait_for(
        r#"sum(switchboard_edge_deliveries_total{job="switchboard-edge"})"#,
        1.0,
    )
    .await;
    // The dashboard's memory-per-connection query has an answer.
    let per_socket = prom
        .value(r#"process_resident_memory_bytes{job="switchboard-edge"} / on(namespace, pod) switchboard_edge_connections"#)
        .await
        .expect("memory per connection");
    assert!(per_socket > 0.0, "{per_socket}");

    drop(sockets);
    prom.wait_for(
        r#"sum(switchboard_edge_connections{job="switchboard-edge"})"#,
        0.0,
    )
    .await;
}

/// The chart's alerts, rendered by helm/tests/check_chart.py, loaded into a
/// real Prometheus that scrapes live nodes: every rule evaluates without
/// error, none is pending while all is well, and a dead edge and a lost
/// NATS make their alerts pending on the right pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_alerts_evaluate_on_live_nodes_and_catch_a_dead_edge_and_a_lost_nats() {
    let root = repo_root();
    let rules_dir = tempfile::tempdir().unwrap();
    let rules = rules_dir.path().join("rules.yaml");
    let out = Command::new("python3")
        .arg(root.join("helm/tests/check_chart.py"))
        .arg("--rules-out")
        .arg(&rules)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "rendering the alerts failed (scripts/test installs the Python packages):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut nodes = start_nodes().await;
    let prom = Prometheus::start(&targets(&nodes), Some(&rules)).await;
    prom.wait_for(r#"sum(up{namespace="switchboard"})"#, 2.0)
        .await;

    // Every rule has been evaluated, without an error.
    let deadline = Instant::now() + Duration::from_secs(30);
    let evaluated = loop {
        let groups = prom.api("/api/v1/rules").await["groups"].clone();
        let rules: Vec<Value> = groups
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if !rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown") {
            break rules;
        }
        assert!(Instant::now() < deadline, "rules never evaluated: {groups}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(evaluated.len() >= 10, "{} rules", evaluated.len());
    for r in &evaluated {
        assert_eq!(r["health"], "ok", "{}: {}", r["name"], r["lastError"]);
    }
    // A healthy edge and router with a client: nothing pending.
    let _client = Raw::connected_addr(nodes.edge, "ann").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(prom.alerts().await, BTreeSet::new(), "alerts while healthy");

    // NATS goes away: both nodes report it, the alert names each pod.
    nodes.nats.kill();
    prom.wait_for_alert("SwitchboardNatsDisconnected", "router-0")
        .await;
    prom.wait_for_alert("SwitchboardNatsDisconnected", "edge-0")
        .await;

    // The edge dies: its scrape fails and SwitchboardEdgeDown names it.
    drop(nodes.edge_proc);
    prom.wait_for_alert("SwitchboardEdgeDown", "edge-0").await;
}

#[test]
fn the_helm_chart_renders_lints_and_validates_offline() {
    let root = repo_root();
    let out = Command::new("python3")
        .arg(root.join("helm/tests/check_chart.py"))
        .current_dir(&root)
        .output()
        .expect("python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "helm/tests/check_chart.py failed (scripts/test installs its Python packages and promtool):\n{text}"
    );
}

/// Containers start with a soft file limit (often 1024) far below the hard
/// one, and the chart always sets the socket cap: the edge must raise the
/// soft limit anyway.
#[tokio::test]
async fn an_explicit_socket_cap_still_raises_the_soft_file_limit() {
    let hard = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap().1;
    assert!(hard > 1024, "hard file limit {hard}: nothing to raise here");
    let port = free_port();
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -Sn 1024 && exec {}", EDGE_BIN))
        .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{port}"))
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .env("SWITCHBOARD_MAX_CONNECTIONS", "500")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _edge = Proc(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, "edge").await;
    let max_fds = metric(addr, "process_max_fds").await;
    assert_eq!(max_fds, hard as f64, "soft limit raised to the hard one");
}

/// Runs a cluster edge with these backend URLs until it exits (at most 40 s).
fn edge_exit(nats: &str, redis: &str) -> (Option<i32>, String) {
    let out = Command::new(EDGE_BIN)
        .env("SWITCHBOARD_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("SWITCHBOARD_JWT_SECRET", SECRET)
        .env("SWITCHBOARD_NATS_URL", nats)
        .env("SWITCHBOARD_REDIS_URL", redis)
        .env("SWITCHBOARD_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The chart puts the Redis password into the URL: a startup error names
/// the backend without it.
#[test]
fn a_redis_refusal_at_startup_is_named_without_the_password() {
    let (nats, redis) = (Server::nats(), Server::redis());
    // The test Redis has no password, so AUTH with one is refused.
    let url = format!("redis://:hunter2@127.0.0.1:{}", redis.port());
    let (code, err) = edge_exit(&nats.url(), &url);
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains(&format!("redis://***@127.0.0.1:{}", redis.port())),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "password in the error: {err}");
}

/// NATS is dialled with retries; an edge that cannot reach it gives up
/// after its startup timeout with a named error instead of hanging.
#[test]
fn an_unreachable_nats_stops_the_edge_with_a_named_error() {
    let redis = Server::redis();
    let dead = format!("nats://user:hunter2@127.0.0.1:{}", free_port());
    let started = Instant::now();
    let (code, err) = edge_exit(&dead, &redis.url());
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("cluster backends not ready"), "{err}");
    assert!(err.contains("nats://***@127.0.0.1"), "{err}");
    assert!(!err.contains("hunter2"), "password in the error: {err}");
    assert!(started.elapsed() < Duration::from_secs(40));
}

/// A container as the chart renders it (check_chart.py --pod-config).
#[derive(serde::Deserialize)]
struct PodSpec {
    args: Vec<String>,
    env: std::collections::BTreeMap<String, String>,
    files: std::collections::BTreeMap<String, String>,
}

/// Starts `binary` with the chart's args, env and files, its listen
/// address and backends moved to this test's.
fn start_as_rendered(
    binary: &Path,
    spec: &PodSpec,
    dir: &Path,
    listen: (&str, SocketAddr),
    nats: &Server,
    redis: &Server,
) -> Proc {
    let mut args = spec.args.clone();
    for (path, text) in &spec.files {
        let local = dir.join(path.trim_start_matches('/').replace('/', "_"));
        std::fs::write(&local, text).unwrap();
        for a in &mut args {
            if a == path {
                *a = local.display().to_string();
            }
        }
    }
    let child = Command::new(binary)
        .args(&args)
        .envs(&spec.env)
        .env(listen.0, listen.1.to_string())
        .env("SWITCHBOARD_NATS_URL", nats.url())
        .env("SWITCHBOARD_REDIS_URL", redis.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc(child)
}

/// What the chart renders is what the binaries accept: the edge's TOML
/// file (lists, numbers, strings from `edge.settings`) and every env var of
/// both Deployments start real processes that become ready, and the
/// settings take effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_start_with_the_configuration_the_chart_renders() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("python3")
        .arg(repo_root().join("helm/tests/check_chart.py"))
        .arg("--pod-config")
        .arg(dir.path())
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "rendering failed (scripts/test installs the Python packages):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spec = |name: &str| -> PodSpec {
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(name)).unwrap()).unwrap()
    };
    let (edge_spec, router_spec) = (spec("edge.json"), spec("router.json"));
    assert!(!edge_spec.files.is_empty(), "the edge's config file");

    let (nats, redis) = (Server::nats(), Server::redis());
    let router: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let edge: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _router = start_as_rendered(
        Path::new(ROUTER_BIN),
        &router_spec,
        dir.path(),
        ("SWITCHBOARD_ROUTER_LISTEN", router),
        &nats,
        &redis,
    );
    wait_listening(router, "router").await;
    let _edge = start_as_rendered(
        Path::new(EDGE_BIN),
        &edge_spec,
        dir.path(),
        ("SWITCHBOARD_LISTEN", edge),
        &nats,
        &redis,
    );
    wait_listening(edge, "edge").await;
    for (what, addr) in [("router", router), ("edge", edge)] {
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(addr, "/readyz").await.0 != 200 {
            assert!(Instant::now() < deadline, "{what} never ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The socket cap from the env, the origin list from the TOML file.
    let (_, metrics) = http_get(edge, "/metrics").await;
    let cap = format!(
        "switchboard_edge_connections_max {}",
        edge_spec.env["SWITCHBOARD_MAX_CONNECTIONS"]
    );
    assert!(metrics.lines().any(|l| l == cap), "{cap} not in /metrics");
    let upgrade = |origin: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(edge).await.unwrap();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: switchboard.v1.json\r\nOrigin: {origin}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[9..12]).into_owned()
    };
    assert_eq!(upgrade("https://evil.example.org").await, "403");
    assert_eq!(upgrade("https://chat.example.com").await, "101");
}
