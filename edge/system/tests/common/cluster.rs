//! A cluster on real servers: nats-server and redis-server spawned on free
//! ports, router replicas and edges in-process (or an edge as a child
//! process, to be SIGKILLed).
use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use switchboard_edge::{ClusterConfig, Config, Edge};
use switchboard_protocol::subject::ROUTER_PUBLISH;
use switchboard_router_server::{Settings as RouterSettings, run as run_router};
use switchboard_testkit::{NatsCluster, RedisCluster, RedisSentinel, Server};
use tokio_util::sync::CancellationToken;

use super::{SECRET, config};

pub const API_KEY: &str = "cluster-key";

/// Anything edges and routers can take a Redis URL from: one server, a
/// Redis Cluster or a Sentinel setup (ADR 0018).
pub trait RedisUrl {
    fn redis_url(&self) -> String;
}

impl RedisUrl for Server {
    fn redis_url(&self) -> String {
        self.url()
    }
}

impl RedisUrl for RedisCluster {
    fn redis_url(&self) -> String {
        self.url()
    }
}

impl RedisUrl for RedisSentinel {
    fn redis_url(&self) -> String {
        self.url()
    }
}

/// Anything edges and routers can take NATS URLs from: one server, or
/// every server of a NATS cluster (comma-separated).
pub trait NatsUrl {
    fn nats_url(&self) -> String;
}

impl NatsUrl for Server {
    fn nats_url(&self) -> String {
        self.url()
    }
}

impl NatsUrl for NatsCluster {
    fn nats_url(&self) -> String {
        self.url()
    }
}

/// A NATS client of these servers (comma-separated URLs).
pub async fn nats_client(nats: &impl NatsUrl) -> async_nats::Client {
    let url = nats.nats_url();
    let servers: Vec<&str> = url.split(',').collect();
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(servers)
        .await
        .unwrap()
}

pub struct RouterNode {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<switchboard_router_server::Stopped, String>>,
}

impl RouterNode {
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// Dies mid-flight, as a crash would.
    pub fn kill(self) {
        self.task.abort();
    }
}

pub struct Cluster {
    pub nats: Server,
    pub redis: Server,
    pub routers: Vec<RouterNode>,
    pub edges: Vec<Edge>,
}

pub fn edge_config(nats: &impl NatsUrl, redis: &impl RedisUrl, node: &str) -> Config {
    let mut c = config();
    c.node_id = node.into();
    c.api_key = Some(API_KEY.into());
    c.presence_ttl = Duration::from_millis(1500);
    c.cluster = Some(ClusterConfig {
        nats_url: nats.nats_url(),
        redis_url: redis.redis_url(),
        subscription_capacity: 8192,
    });
    c
}

pub async fn start_router(nats: &impl NatsUrl, redis: &impl RedisUrl, node: &str) -> RouterNode {
    start_router_with(nats, redis, node, &[]).await
}

/// A router with these flags besides the usual ones.
pub async fn start_router_with(
    nats: &impl NatsUrl,
    redis: &impl RedisUrl,
    node: &str,
    extra: &[&str],
) -> RouterNode {
    let (nats_url, redis_url) = (nats.nats_url(), redis.redis_url());
    let mut args = vec![
        "switchboard-router",
        "--nats",
        &nats_url,
        "--redis",
        &redis_url,
        "--api-key",
        API_KEY,
        "--node-id",
        node,
        "--presence-ttl-ms",
        "1500",
        "--channel-buckets",
        "16",
    ];
    args.extend(extra);
    let config = RouterSettings::parse_from(args).resolve().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .build_recorder()
        .handle();
    let task = tokio::spawn(run_router(
        config,
        listener,
        handle,
        stop.clone().cancelled_owned(),
    ));
    RouterNode { addr, stop, task }
}

/// Waits until some router answers on the publish subject.
pub async fn wait_for_routers(nats: &impl NatsUrl) {
    let client = nats_client(nats).await;
    // Routers of a NATS cluster take a while: their R3 streams are
    // created by the cluster's metadata leader.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::time::Instant::now() < deadline {
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_millis(200),
            client.request(ROUTER_PUBLISH, "x".into()),
        )
        .await
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no router answered");
}

pub async fn start_edge(nats: &impl NatsUrl, redis: &impl RedisUrl, node: &str) -> Edge {
    super::start(edge_config(nats, redis, node)).await
}

impl Cluster {
    pub async fn new(routers: usize, edges: usize) -> Cluster {
        let nats = Server::nats();
        let redis = Server::redis();
        let mut r = Vec::new();
        for i in 0..routers {
            r.push(start_router(&nats, &redis, &format!("router-{i}")).await);
        }
        wait_for_routers(&nats).await;
        let mut e = Vec::new();
        for i in 0..edges {
            e.push(start_edge(&nats, &redis, &format!("edge-{i}")).await);
        }
        Cluster {
            nats,
            redis,
            routers: r,
            edges: e,
        }
    }

    pub async fn shutdown(self) {
        for e in self.edges {
            e.shutdown().await;
        }
        for r in self.routers {
            r.stop().await;
        }
    }
}

/// POSTs JSON to a router or edge HTTP API with the key; returns
/// (status, JSON body).
pub async fn post(
    addr: SocketAddr,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}",
        body.len()
    );
    keyed(addr, &head, &body).await
}

/// GETs a router or edge HTTP API with the key; returns (status, JSON body).
pub async fn get(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    keyed(addr, &format!("GET {path} HTTP/1.1"), "").await
}

/// One request with the API key on a connection of its own.
async fn keyed(addr: SocketAddr, head: &str, body: &str) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{head}\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer {API_KEY}\r\n\r\n{body}"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let status = out[9..12].parse().unwrap();
    let json = out
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or_default();
    (status, json)
}

/// A cluster edge as a child process of the real binary (so it can really
/// be SIGKILLed), once it listens.
pub async fn spawn_edge_process(
    nats: &impl NatsUrl,
    redis: &impl RedisUrl,
    node: &str,
) -> (std::process::Child, SocketAddr) {
    let port = super::free_port();
    let child = std::process::Command::new(super::EDGE_BIN)
        .envs(edge_process_env(nats, redis, node, port))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    super::wait_listening(addr, node).await;
    (child, addr)
}

/// Environment for an edge run as a child process in this cluster.
pub fn edge_process_env(
    nats: &impl NatsUrl,
    redis: &impl RedisUrl,
    node: &str,
    port: u16,
) -> Vec<(String, String)> {
    vec![
        ("SWITCHBOARD_LISTEN".into(), format!("127.0.0.1:{port}")),
        ("SWITCHBOARD_JWT_SECRET".into(), SECRET.into()),
        ("SWITCHBOARD_CHAT_AUTH".into(), "open".into()),
        ("SWITCHBOARD_NATS_URL".into(), nats.nats_url()),
        ("SWITCHBOARD_REDIS_URL".into(), redis.redis_url()),
        ("SWITCHBOARD_NODE_ID".into(), node.into()),
        ("SWITCHBOARD_PRESENCE_TTL_MS".into(), "1500".into()),
        ("SWITCHBOARD_MAX_CONNECTIONS".into(), "1000".into()),
    ]
}
