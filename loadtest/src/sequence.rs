//! Sequencing throughput: N publishers, each into a chat of its own,
//! publish back to back for D seconds, either as edges do (NATS requests
//! on `sb.router.publish` that any router replica answers, `--nats`) or
//! as backends do (`--addr`): a keep-alive HTTP connection to a router's
//! `POST /api/publish`, or with `--transport grpc` an HTTP/2 connection to
//! its gRPC listener (`Publish`, or `PublishBatch` with `--batch`).
//! Reports acked publishes per second and per router (and Redis)
//! CPU-second over the publish window, and refusals by code or HTTP
//! status, duplicates and unanswered requests apart. No sockets and no
//! edges: what is measured is the routers' publish path and Redis.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::{Map, Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

mod grpc;

use crate::{
    coord::Worker,
    recorder::{Counters, Recorder},
    report::{Report, now_us},
    sys::{Pids, Probe, cpu_seconds},
};

/// Longest one publish request may take before its connection is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response read (the API answers a few hundred bytes).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Publish as edges do: NATS request-reply to whichever router replica
    /// NATS picks, on this server (nats://host:port).
    #[arg(long, conflicts_with = "addr", required_unless_present = "addr")]
    nats: Option<String>,
    /// Publish as backends do: router API addresses (host:port, the HTTP
    /// listener or with `--transport grpc` the gRPC one), comma-separated;
    /// publishers are spread over them in turn.
    #[arg(long, value_delimiter = ',')]
    addr: Vec<SocketAddr>,
    /// How `--addr` is spoken to: `POST /api/publish` over HTTP/1.1, or
    /// the gRPC API (`switchboard.api.v1.Switchboard`).
    #[arg(long, value_enum, default_value_t = Transport::Http)]
    transport: Transport,
    /// gRPC only: publishers are grouped this many to a connection, which
    /// sends one `PublishBatch` call per round carrying the next message
    /// of each of the group's chats (as many messages in flight as
    /// without batches, in fewer calls). 1: unary `Publish` calls.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    batch: u32,
    /// Routers behind `--nats` (for the report only).
    #[arg(long, default_value_t = 0)]
    routers: usize,
    /// The routers' API key (`SWITCHBOARD_API_KEY`).
    #[arg(long, default_value = "dev-key")]
    api_key: String,
    /// Concurrent publishers (over all workers), each with its own chat
    /// and connection.
    #[arg(long, default_value_t = 256)]
    publishers: u32,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Seconds into the publish window at which `--fault-cmd` runs (a
    /// failover measurement: e.g. SIGKILL a Redis master).
    #[arg(long, requires = "fault_cmd")]
    fault_at_secs: Option<f64>,
    /// Shell command run once at `--fault-at-secs` by the first worker
    /// (run this with one worker: the others would not know when).
    #[arg(long, requires = "fault_at_secs")]
    fault_cmd: Option<String>,
    /// Router HTTP addresses (host:port) whose `/metrics` are read after
    /// the window: the failover counters (lost acked messages, fenced
    /// streams) summed over them.
    #[arg(long, value_delimiter = ',')]
    metrics_from: Vec<SocketAddr>,
    #[command(flatten)]
    pids: Pids,
    /// Redis process ids (every data node of a cluster), comma-separated:
    /// their CPU time over the publish window.
    #[arg(long = "redis-pids", value_delimiter = ',')]
    redis_pids: Vec<u32>,
}

/// How backend publishers reach the routers' API.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Transport {
    Http,
    Grpc,
}

/// What one request came to.
enum Outcome {
    Acked,
    /// Answered 200 with `"duplicate": true`: sequenced before.
    Duplicate,
    /// An HTTP status other than 200.
    Refused(u16),
}

/// One keep-alive connection to a node's backend API (a router's, or an
/// edge's for `http-publish`).
pub(crate) struct Api {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Api {
    pub(crate) async fn connect(addr: SocketAddr) -> anyhow::Result<Api> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Api {
            stream,
            buf: Vec::with_capacity(1024),
        })
    }

    /// One request and its whole response on this connection.
    async fn publish(&mut self, head: &str, body: &str) -> anyhow::Result<Outcome> {
        let (status, body) = self.post(head, body).await?;
        Ok(match status {
            200 if is_duplicate(body) => Outcome::Duplicate,
            200 => Outcome::Acked,
            _ => Outcome::Refused(status),
        })
    }

    /// Sends `head` (request line and headers, each ending in CRLF) with
    /// `body`; the response's status and body.
    pub(crate) async fn post(&mut self, head: &str, body: &str) -> anyhow::Result<(u16, &[u8])> {
        let request = format!("{head}Content-Length: {}\r\n\r\n{body}", body.len());
        self.stream.write_all(request.as_bytes()).await?;
        self.buf.clear();
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(at) = resp.parse(&self.buf)? {
                let status = resp.code.context("response without status")?;
                let len: usize = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok())
                    .and_then(|v| v.trim().parse().ok())
                    .context("response without content-length")?;
                while self.buf.len() < at + len {
                    self.read_more().await?;
                }
                return Ok((status, &self.buf[at..at + len]));
            }
            self.read_more().await?;
        }
    }

    async fn read_more(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.buf.len() < MAX_RESPONSE_BYTES, "response too large");
        let mut chunk = [0u8; 4096];
        let n = self.stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed by the router");
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// Whether a publish's answer (`{"stream", "seq", "timestamp_ms",
/// "duplicate"}`) says it was sequenced before.
fn is_duplicate(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Ack {
        #[serde(default)]
        duplicate: bool,
    }
    serde_json::from_slice::<Ack>(body).is_ok_and(|a| a.duplicate)
}

/// Counters read off the routers after a run: what a failover cost.
const FAILOVER_SERIES: [&str; 2] = [
    "switchboard_history_failover_lost_total",
    "switchboard_history_epoch_fenced_total",
];

/// One plain HTTP GET of `/metrics`; the value of each of `series` (no
/// labels) summed into `rec`'s counters. A router that does not answer is
/// counted apart, never read as zero.
async fn scrape(rec: &Recorder, addr: SocketAddr) {
    match metrics_text(addr).await {
        Ok(text) => {
            for name in FAILOVER_SERIES {
                let v: f64 = text
                    .lines()
                    .filter_map(|l| {
                        l.strip_prefix(name)?
                            .strip_prefix(' ')?
                            .trim()
                            .parse::<f64>()
                            .ok()
                    })
                    .sum();
                rec.add_counter(name, v as u64);
            }
        }
        _ => rec.add_counter("metrics_unread", 1),
    }
}

/// The text of one plain HTTP GET of a node's `/metrics` (headers and
/// all: callers read the lines they know), within [`REQUEST_TIMEOUT`].
pub(crate) async fn metrics_text(addr: SocketAddr) -> anyhow::Result<String> {
    let got = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await?;
        anyhow::Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, got)
        .await
        .map_err(|_| anyhow::anyhow!("no /metrics from {addr} within {REQUEST_TIMEOUT:?}"))?
}

/// A publish slower than this, finishing after the fault, counts its chat
/// as affected by the fault.
const STALLED: Duration = Duration::from_millis(500);

/// When the fault ran (unix µs; 0: not yet) and what each chat saw of it.
#[derive(Default)]
struct Fault {
    at_us: std::sync::atomic::AtomicU64,
}

/// One chat's view of the fault: affected from its first failed or
/// stalled publish after the fault until its next ack, which is recorded
/// (kind 1, from the fault) as the chat's time to recover.
#[derive(Default)]
struct ChatFault {
    failing: bool,
    recovered: bool,
}

impl ChatFault {
    fn fault_us(fault: &Fault) -> Option<u64> {
        Some(fault.at_us.load(std::sync::atomic::Ordering::Relaxed)).filter(|t| *t > 0)
    }

    /// A publish failed (refused, unanswered) at `now`.
    fn failed(&mut self, fault: &Fault) {
        if Self::fault_us(fault).is_some() && !self.recovered {
            self.failing = true;
        }
    }

    /// A publish sent at `sent` was acked at `now`.
    fn acked(
        &mut self,
        fault: &Fault,
        rec: &Recorder,
        samples: &mut crate::recorder::Batch,
        sent: u64,
        now: u64,
    ) {
        let Some(at) = Self::fault_us(fault) else {
            return;
        };
        let stalled = now > at && now - sent > STALLED.as_micros() as u64;
        if !self.recovered && (self.failing || stalled) {
            self.recovered = true;
            rec.add_counter("fault_affected_chats", 1);
            samples.latency(1, at, now);
        }
    }
}

/// Publishes into `chat` over NATS requests until `until`.
async fn nats_publisher(
    rec: std::sync::Arc<Recorder>,
    fault: std::sync::Arc<Fault>,
    client: async_nats::Client,
    chat: String,
    payload: bytes::Bytes,
    until: Instant,
) {
    use prost::Message;
    use switchboard_protocol::internal::v1::{
        RouterPublish, RouterReply, router_publish, router_reply,
    };
    let mut samples = rec.samples();
    let mut seen = ChatFault::default();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let body = RouterPublish {
            sender: "sequence".into(),
            target: Some(router_publish::Target::Chat(chat.clone())),
            client_msg_id: format!("{chat}-{n}"),
            payload: payload.clone(),
        }
        .encode_to_vec();
        let sent = now_us();
        Counters::add(&rec.kind(0).sent, 1);
        let asked = client.request(switchboard_protocol::subject::ROUTER_PUBLISH, body.into());
        match tokio::time::timeout(REQUEST_TIMEOUT, asked).await {
            Ok(Ok(msg)) => match RouterReply::decode(msg.payload).map(|r| r.result) {
                Ok(Some(router_reply::Result::Ack(ack))) if ack.duplicate => {
                    rec.add_counter("duplicated", 1)
                }
                Ok(Some(router_reply::Result::Ack(_))) => {
                    let now = now_us();
                    Counters::add(&rec.kind(0).received, 1);
                    samples.latency(0, sent, now);
                    seen.acked(&fault, &rec, &mut samples, sent, now);
                }
                Ok(Some(router_reply::Result::Error(e))) => {
                    seen.failed(&fault);
                    rec.add_counter(&format!("refused_code_{}", e.code), 1);
                    // A refusal is answered at once: do not spin on it.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(None) | Err(_) => {
                    seen.failed(&fault);
                    rec.add_counter("bad_replies", 1)
                }
            },
            Ok(Err(_)) | Err(_) => {
                seen.failed(&fault);
                rec.add_counter("unanswered", 1)
            }
        }
    }
    if seen.failing && !seen.recovered {
        rec.add_counter("fault_unrecovered_chats", 1);
    }
}

/// Publishes into `chat` until `until`, reconnecting after an error.
async fn publisher(
    rec: std::sync::Arc<Recorder>,
    addr: SocketAddr,
    api_key: String,
    chat: String,
    payload: String,
    until: Instant,
) {
    let head = format!(
        "POST /api/publish HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {api_key}\r\n\
         Content-Type: application/json\r\n"
    );
    let mut samples = rec.samples();
    let mut api = None;
    let mut n = 0u64;
    while Instant::now() < until {
        if api.is_none() {
            match Api::connect(addr).await {
                Ok(a) => api = Some(a),
                Err(_) => {
                    rec.add_counter("connect_errors", 1);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
        }
        let Some(conn) = api.as_mut() else { continue };
        n += 1;
        let body = json!({
            "chat": chat,
            "client_msg_id": format!("{chat}-{n}"),
            "text": payload,
        })
        .to_string();
        let sent = now_us();
        Counters::add(&rec.kind(0).sent, 1);
        match tokio::time::timeout(REQUEST_TIMEOUT, conn.publish(&head, &body)).await {
            Ok(Ok(Outcome::Acked)) => {
                Counters::add(&rec.kind(0).received, 1);
                samples.latency(0, sent, now_us());
            }
            // Every client message id is new: a duplicate means a retry
            // the scenario never made was sequenced before.
            Ok(Ok(Outcome::Duplicate)) => rec.add_counter("duplicated", 1),
            Ok(Ok(Outcome::Refused(status))) => rec.add_counter(&format!("refused_{status}"), 1),
            Ok(Err(_)) | Err(_) => {
                rec.add_counter("unanswered", 1);
                api = None;
            }
        }
    }
}

/// What the flags allow together, checked before anything runs.
fn check(a: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.nats.is_none() || a.transport == Transport::Http,
        "--transport grpc publishes to --addr, not --nats"
    );
    anyhow::ensure!(
        a.batch == 1 || a.transport == Transport::Grpc,
        "--batch needs --transport grpc (the HTTP API publishes one message a request)"
    );
    Ok(())
}

/// The chats of this worker's publishers (`seq-<i>`), in groups of
/// `batch`: one connection each.
fn groups(mine: std::ops::Range<u64>, batch: u32) -> Vec<Vec<u64>> {
    let ids: Vec<u64> = mine.collect();
    ids.chunks(batch.max(1) as usize)
        .map(<[u64]>::to_vec)
        .collect()
}

pub(crate) async fn run(a: Args, w: &Worker) -> anyhow::Result<Report> {
    check(&a)?;
    let key = grpc::bearer(&a.api_key)?;
    let rec = Recorder::new(&["publish", "recovery"], 0);
    let fault = std::sync::Arc::new(Fault::default());
    let mine = w.slice(a.publishers as u64);
    w.barrier("start", 0).await?;
    let before = Probe::take_if(w.is_first(), &a.pids);
    let redis_cpu = |pids: &[u32]| -> Option<f64> {
        (w.is_first() && !pids.is_empty())
            .then(|| pids.iter().map(|p| cpu_seconds(*p)).sum::<Option<f64>>())
            .flatten()
    };
    let redis_before = redis_cpu(&a.redis_pids);
    let started = now_us();
    let until = Instant::now() + Duration::from_secs(a.duration_secs);
    let payload = "x".repeat(a.payload_bytes);
    let nats = match &a.nats {
        // One connection per worker, as one edge holds one.
        Some(url) => Some(
            async_nats::ConnectOptions::new()
                .request_timeout(Some(REQUEST_TIMEOUT))
                .connect(url.as_str())
                .await
                .with_context(|| format!("connecting to {url}"))?,
        ),
        None => None,
    };
    let tasks: Vec<_> = match (&nats, a.transport) {
        (_, Transport::Grpc) => groups(mine, a.batch)
            .into_iter()
            .map(|ids| {
                // Groups spread over the routers as publishers do.
                let addr = a.addr[(ids[0] / u64::from(a.batch)) as usize % a.addr.len()];
                tokio::spawn(grpc::publisher(
                    rec.clone(),
                    addr,
                    key.clone(),
                    ids.iter().map(|i| format!("seq-{i}")).collect(),
                    a.batch > 1,
                    bytes::Bytes::from(payload.clone()),
                    until,
                ))
            })
            .collect(),
        (Some(client), Transport::Http) => mine
            .map(|i| {
                tokio::spawn(nats_publisher(
                    rec.clone(),
                    fault.clone(),
                    client.clone(),
                    format!("seq-{i}"),
                    bytes::Bytes::from(payload.clone()),
                    until,
                ))
            })
            .collect(),
        (None, Transport::Http) => mine
            .map(|i| {
                let addr = a.addr[i as usize % a.addr.len()];
                tokio::spawn(publisher(
                    rec.clone(),
                    addr,
                    a.api_key.clone(),
                    format!("seq-{i}"),
                    payload.clone(),
                    until,
                ))
            })
            .collect(),
    };
    if let (Some(secs), Some(cmd), true) = (a.fault_at_secs, a.fault_cmd.clone(), w.is_first()) {
        let (fault, rec) = (fault.clone(), rec.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            let at = now_us();
            fault.at_us.store(at, std::sync::atomic::Ordering::Relaxed);
            rec.earliest("fault", at);
            match tokio::process::Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .status()
                .await
            {
                Ok(st) if st.success() => {}
                _ => rec.add_counter("fault_cmd_failed", 1),
            }
        });
    }
    for t in tasks {
        let _ = t.await;
    }
    let ended = now_us();
    if w.is_first() {
        for addr in &a.metrics_from {
            scrape(&rec, *addr).await;
        }
    }
    let after = Probe::take_if(w.is_first(), &a.pids);
    let redis_after = redis_cpu(&a.redis_pids);
    rec.earliest("publish_start", started);
    rec.latest("publish_end", ended);
    if let Some(cpu) = redis_before.zip(redis_after).map(|(b, a)| a - b) {
        rec.add_counter("redis_cpu_us", (cpu * 1e6) as u64);
    }
    w.barrier("done", 0).await?;
    let params = json!({
        "via": match (&a.nats, a.transport) {
            (Some(_), _) => "nats",
            (None, Transport::Http) => "http",
            (None, Transport::Grpc) => "grpc",
        },
        "batch": a.batch,
        "routers": if a.nats.is_some() { a.routers } else { a.addr.len() },
        "addr": a.addr.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "publishers": a.publishers,
        "duration_secs": a.duration_secs,
        "payload_bytes": a.payload_bytes,
        "fault_at_secs": a.fault_at_secs,
        "fault_cmd": a.fault_cmd,
        "metrics_read": a.metrics_from.len(),
        "redis_processes": a.redis_pids.len(),
    });
    Ok(rec.report(
        "sequence",
        params,
        Probe::server((None, None), (before, after)),
    ))
}

/// Acked publishes per second and per CPU-second of the routers, and of
/// routers and Redis together.
pub(crate) fn figures(r: &Report) -> Map<String, Value> {
    let d = r.kinds.get("publish").cloned().unwrap_or_default();
    let secs = Report::span_secs(
        r.earliest_us.get("publish_start").copied().unwrap_or(0),
        r.latest_us.get("publish_end").copied().unwrap_or(0),
    )
    .unwrap_or(0.0);
    let acked = d.received;
    let router = r.server.router_cpu_seconds.filter(|c| *c > 0.0);
    let redis = r
        .counters
        .get("redis_cpu_us")
        .map(|us| *us as f64 / 1e6)
        .filter(|c| *c > 0.0);
    let per = |cpu: Option<f64>| cpu.map(|c| acked as f64 / c);
    let refused: Map<String, Value> = r
        .counters
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("refused_")?.to_string(), json!(v))))
        .chain(
            r.counters
                .get("bad_replies")
                .map(|v| ("bad_reply".to_string(), json!(v))),
        )
        .collect();
    let mut m = Map::new();
    m.insert(
        "routers".into(),
        r.params.get("routers").cloned().unwrap_or_default(),
    );
    m.insert(
        "via".into(),
        r.params.get("via").cloned().unwrap_or_default(),
    );
    m.insert(
        "publishers".into(),
        r.params.get("publishers").cloned().unwrap_or_default(),
    );
    m.insert(
        "batch".into(),
        r.params.get("batch").cloned().unwrap_or(json!(1)),
    );
    m.insert("published".into(), json!(d.sent));
    // Requests or calls that carried them (a batch is one call).
    let grpc = r.params.get("via").and_then(Value::as_str) == Some("grpc");
    m.insert(
        "calls".into(),
        json!(if grpc { r.counter("calls") } else { d.sent }),
    );
    m.insert("acked".into(), json!(acked));
    m.insert("refused_by_status".into(), Value::Object(refused));
    // Answered as sequenced before although every id was new.
    m.insert("duplicated".into(), json!(r.counter("duplicated")));
    m.insert("unanswered".into(), json!(r.counter("unanswered")));
    m.insert("connect_errors".into(), json!(r.counter("connect_errors")));
    m.insert("publish_window_seconds".into(), json!(secs));
    m.insert(
        "acked_publishes_per_second".into(),
        json!((secs > 0.0).then(|| acked as f64 / secs)),
    );
    m.insert("redis_cpu_seconds".into(), json!(redis));
    m.insert("publishes_per_router_cpu_second".into(), json!(per(router)));
    m.insert(
        "publishes_per_router_and_redis_cpu_second".into(),
        json!(per(router.zip(redis).map(|(a, b)| a + b))),
    );
    m.insert("publish_latency_ms".into(), d.latency.summary());
    if let Some(at) = r.earliest_us.get("fault") {
        let rcv = r.kinds.get("recovery").cloned().unwrap_or_default();
        let start = r.earliest_us.get("publish_start").copied().unwrap_or(0);
        m.insert(
            "fault_at_seconds".into(),
            json!(Report::span_secs(start, *at)),
        );
        m.insert(
            "fault_cmd_failed".into(),
            json!(r.counter("fault_cmd_failed") > 0),
        );
        m.insert(
            "chats_affected_by_fault".into(),
            json!(r.counter("fault_affected_chats")),
        );
        // Failing still when the window closed: no recovery time for them.
        m.insert(
            "chats_unrecovered".into(),
            json!(r.counter("fault_unrecovered_chats")),
        );
        // From the fault to each affected chat's first ack after it.
        m.insert("recovery_ms".into(), rcv.latency.summary());
    }
    if r.params
        .get("metrics_read")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        > 0
    {
        m.insert(
            "acked_lost_in_failover".into(),
            json!(r.counter(FAILOVER_SERIES[0])),
        );
        m.insert(
            "streams_fenced".into(),
            json!(r.counter(FAILOVER_SERIES[1])),
        );
        m.insert(
            "routers_metrics_unread".into(),
            json!(r.counter("metrics_unread")),
        );
    }
    m
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(flags: &[&str]) -> Result<Args, String> {
        let cli = Cli::try_parse_from(std::iter::once("sequence").chain(flags.iter().copied()))
            .map_err(|e| e.to_string())?;
        check(&cli.args).map_err(|e| e.to_string())?;
        Ok(cli.args)
    }

    fn refused(flags: &[&str]) -> String {
        args(flags).err().expect("these flags are refused")
    }

    #[test]
    fn batches_are_grpc_calls_to_addresses_only() {
        let a = args(&[
            "--addr",
            "127.0.0.1:1",
            "--transport",
            "grpc",
            "--batch",
            "16",
        ])
        .unwrap();
        assert!(a.transport == Transport::Grpc && a.batch == 16);
        assert!(args(&["--addr", "127.0.0.1:1"]).is_ok_and(|a| a.transport == Transport::Http));
        let http = refused(&["--addr", "127.0.0.1:1", "--batch", "4"]);
        assert!(http.contains("--batch needs --transport grpc"), "{http}");
        let nats = refused(&["--nats", "nats://x:1", "--transport", "grpc"]);
        assert!(nats.contains("not --nats"), "{nats}");
        assert!(
            args(&[
                "--addr",
                "127.0.0.1:1",
                "--transport",
                "grpc",
                "--batch",
                "0"
            ])
            .is_err()
        );
        assert!(
            args(&[
                "--addr",
                "127.0.0.1:1",
                "--transport",
                "grpc",
                "--batch",
                "1001"
            ])
            .is_err()
        );
    }

    #[test]
    fn publishers_are_grouped_batch_to_a_connection() {
        assert_eq!(
            groups(4..14, 4),
            [vec![4, 5, 6, 7], vec![8, 9, 10, 11], vec![12, 13]]
        );
        assert_eq!(groups(0..2, 1), [vec![0], vec![1]]);
        assert!(groups(3..3, 4).is_empty());
    }

    #[test]
    fn an_http_answer_says_whether_it_was_a_duplicate() {
        let ack = |d: bool| {
            json!({"stream": "chat:a", "seq": 3, "timestamp_ms": 1, "duplicate": d}).to_string()
        };
        assert!(is_duplicate(ack(true).as_bytes()));
        assert!(!is_duplicate(ack(false).as_bytes()));
        assert!(!is_duplicate(b"not json"));
    }
}
