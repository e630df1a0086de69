//! N users in chats of K members, R messages/s in total from random
//! members; every other member measures publish-to-receive latency. Users
//! alternate between the given edges, so most deliveries cross edges.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use switchboard_protocol::v1::{
    ClientFrame, Publish, Subscribe, client_frame, publish, server_frame,
};
use tokio::sync::{Semaphore, mpsc};

use crate::{
    accounting::{Seen, Tracker},
    conn, sys,
};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: conn::Target,
    /// Connected users (one socket each).
    #[arg(long, default_value_t = 10_000)]
    users: u32,
    /// Members per chat.
    #[arg(long, default_value_t = 2)]
    group_size: u32,
    /// Messages per second, all chats together.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Processes whose CPU time to report (e.g. routers), comma-separated pids.
    #[arg(long, value_delimiter = ',')]
    router_pids: Vec<u32>,
    /// Edge pids, comma-separated, for CPU time.
    #[arg(long, value_delimiter = ',')]
    edge_pids: Vec<u32>,
}

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    users: u32,
    group_size: u32,
    edges: usize,
    offered_messages_per_second: u32,
    published: u64,
    acked: u64,
    publish_errors: u64,
    deliveries_expected: u64,
    deliveries_received: u64,
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
    achieved_messages_per_second: f64,
    router_cpu_seconds: Option<f64>,
    publishes_per_router_cpu_second: Option<f64>,
    edge_cpu_seconds: Option<f64>,
    latency_ms: Percentiles,
}

#[derive(Serialize)]
struct Percentiles {
    p50: f64,
    p95: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

fn micros_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn cpu(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| sys::cpu_seconds(*p)).sum()
}

pub(crate) async fn run(a: Args) -> anyhow::Result<serde_json::Value> {
    let sources = Arc::new(conn::Sources::new(a.target.sources));
    let gate = Arc::new(Semaphore::new(a.target.concurrency));
    let ready = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let duplicated = Arc::new(AtomicU64::new(0));
    let out_of_order = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let group = a.group_size.max(2);
    let mut senders = Vec::with_capacity(a.users as usize);
    let mut tasks = Vec::new();
    let stop = Arc::new(tokio::sync::Notify::new());
    for i in 0..a.users {
        let permit = gate.clone().acquire_owned().await?;
        let (tx, mut rx) = mpsc::channel::<u64>(64);
        senders.push(tx);
        let addr = a.target.addr_for(i as usize);
        let chat = format!("g{}", i / group);
        let token = conn::token(&a.target.secret, &format!("chat-{i}"));
        let (sources, ready, received, duplicated, out_of_order, acked, errors, hist, stop) = (
            sources.clone(),
            ready.clone(),
            received.clone(),
            duplicated.clone(),
            out_of_order.clone(),
            acked.clone(),
            errors.clone(),
            hist.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut ws = conn::open(addr, &sources, token).await?;
            let sub = Subscribe { chat: chat.clone(), ..Default::default() };
            conn::send(&mut ws, ClientFrame { id: 1, kind: Some(client_frame::Kind::Subscribe(sub)) }).await?;
            drop(permit);
            let me = format!("chat-{i}");
            // Samples, not a histogram per socket: an HDR histogram is ~150 KiB.
            let mut local: Vec<u64> = Vec::new();
            let mut tracker = Tracker::default();
            let done = stop.notified();
            tokio::pin!(done);
            loop {
                tokio::select! {
                    _ = &mut done => break,
                    m = rx.recv() => {
                        let Some(m) = m else { break };
                        let mut payload = vec![0u8; 32];
                        payload[..8].copy_from_slice(&micros_now().to_le_bytes());
                        let p = Publish {
                            target: Some(publish::Target::Chat(chat.clone())),
                            client_msg_id: format!("{me}-{m}"),
                            payload: Bytes::from(payload),
                        };
                        conn::send(&mut ws, ClientFrame { id: 2 + m as u32, kind: Some(client_frame::Kind::Publish(p)) }).await?;
                    }
                    f = conn::recv(&mut ws) => {
                        let Ok(f) = f else { break };
                        match f.kind {
                            Some(server_frame::Kind::SubscribeResult(_)) => { ready.fetch_add(1, Ordering::Relaxed); }
                            Some(server_frame::Kind::PublishAck(_)) => { acked.fetch_add(1, Ordering::Relaxed); }
                            Some(server_frame::Kind::Error(_)) => { errors.fetch_add(1, Ordering::Relaxed); }
                            Some(server_frame::Kind::Delivery(d)) => {
                                let now = micros_now();
                                match tracker.observe(d.seq) {
                                    Seen::Duplicate => { duplicated.fetch_add(1, Ordering::Relaxed); continue; }
                                    Seen::Late => { out_of_order.fetch_add(1, Ordering::Relaxed); }
                                    Seen::New => {}
                                }
                                if d.sender == me { continue; }
                                received.fetch_add(1, Ordering::Relaxed);
                                if d.payload.len() >= 8 {
                                    let sent = u64::from_le_bytes(d.payload[..8].try_into().expect("8 bytes"));
                                    local.push(now.saturating_sub(sent).max(1));
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            {
                let mut h = hist.lock().expect("histogram lock");
                for v in local {
                    let _ = h.record(v);
                }
            }
            anyhow::Ok(())
        }));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while ready.load(Ordering::Relaxed) < a.users as u64 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} users ready",
            ready.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("{} users ready", a.users);
    let (r0, e0) = (cpu(&a.router_pids), cpu(&a.edge_pids));
    let started = std::time::Instant::now();
    let total = a.rate as u64 * a.duration_secs;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / a.rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut published = 0u64;
    let mut rng_state = 0x9e37_79b9_7f4a_7c15u64;
    for m in 0..total {
        tick.tick().await;
        // xorshift: a cheap, deterministic choice of the sending user.
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        let who = (rng_state % a.users as u64) as usize;
        if senders[who].try_send(m).is_ok() {
            published += 1;
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();
    // Let deliveries drain.
    let expected_per_msg = (group - 1) as u64;
    let expected = published * expected_per_msg;
    let drain_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < expected
        && tokio::time::Instant::now() < drain_deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (r1, e1) = (cpu(&a.router_pids), cpu(&a.edge_pids));
    stop.notify_waiters();
    drop(senders);
    for t in tasks {
        let _ = t.await;
    }
    let router_cpu = r0.zip(r1).map(|(a, b)| b - a);
    let h = hist.lock().expect("histogram lock");
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let n = received.load(Ordering::Relaxed);
    Ok(serde_json::to_value(Report {
        scenario: "chat",
        users: a.users,
        group_size: group,
        edges: a.target.addr.len(),
        offered_messages_per_second: a.rate,
        published,
        acked: acked.load(Ordering::Relaxed),
        publish_errors: errors.load(Ordering::Relaxed),
        deliveries_expected: expected,
        deliveries_received: n,
        lost: expected.saturating_sub(n),
        duplicated: duplicated.load(Ordering::Relaxed),
        out_of_order: out_of_order.load(Ordering::Relaxed),
        achieved_messages_per_second: published as f64 / publish_secs,
        router_cpu_seconds: router_cpu,
        publishes_per_router_cpu_second: router_cpu
            .filter(|c| *c > 0.0)
            .map(|c| published as f64 / c),
        edge_cpu_seconds: e0.zip(e1).map(|(a, b)| b - a),
        latency_ms: Percentiles {
            p50: ms(0.5),
            p95: ms(0.95),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        },
    })?)
}
