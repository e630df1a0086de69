//! Rolling restart: N clients follow one chat while a publisher posts at
//! R/s and the edges are restarted one at a time from outside
//! (`scripts/cluster roll`). Clients behave like apps: on a drain
//! `Disconnect` they close the socket and wait the advised delay, on a
//! dropped socket a jittered moment, then reconnect to another edge picked
//! at random, as a load balancer would (honouring 503 + Retry-After), and
//! resume with `since`. Reports reconnects per second,
//! time away, and whether every client saw every post once, in order.
//!
//! `--ready-file` is written once every client has joined (start the roll
//! then); posting stops when `--until-file` exists (write it when the roll
//! is over), and the run ends when every client holds every post.
use std::{
    path::PathBuf,
    sync::{Arc, atomic::AtomicU64, atomic::Ordering::Relaxed},
    time::Duration,
};

use anyhow::Context;
use serde_json::{Map, Value, json};
use switchboard_protocol::v1::{ClientFrame, Publish, client_frame, publish, server_frame};
use tokio::sync::{Semaphore, watch};

use crate::{
    conn,
    coord::Worker,
    recorder::{Counters, Recorder},
    report::{Report, now_us},
    storm::{open_honouring_503, subscribe},
    sys::{Pids, Probe},
};

const CHAT: &str = "roll";
/// Kinds: post-to-receive latency, and time away (socket lost → resubscribed).
const DELIVERY: usize = 0;
const AWAY: usize = 1;
/// Counter name prefix: reconnects in one unix second.
const RECONNECTS_AT: &str = "reconnects_at_";
/// Tries at other edges before a client counts as lost.
const RECONNECT_ATTEMPTS: u32 = 20;

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: conn::Target,
    #[command(flatten)]
    pids: Pids,
    /// Clients (over all workers).
    #[arg(long, default_value_t = 10_000)]
    clients: u32,
    /// Posts per second during the roll.
    #[arg(long, default_value_t = 5)]
    rate: u32,
    /// Written once every client has joined.
    #[arg(long)]
    ready_file: PathBuf,
    /// Posting stops once this file exists.
    #[arg(long)]
    until_file: PathBuf,
    /// Give up after this many seconds (per phase).
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

/// One client's place in the chat.
struct Follower {
    i: u64,
    ws: conn::Ws,
    seq: u64,
    epoch: String,
}

pub(crate) async fn run(a: Args, w: &Worker) -> anyhow::Result<Report> {
    let rec = Recorder::new(&["delivery", "away"], 0);
    let a = Arc::new(a);
    w.barrier("start", 0).await?;
    let sources = Arc::new(
        a.target
            .sources(w.index, Duration::from_secs(a.timeout_secs)),
    );
    let gate = Arc::new(Semaphore::new(a.target.concurrency));
    let timeout = Duration::from_secs(a.timeout_secs);
    let mut joins = Vec::new();
    for i in w.slice(a.clients as u64) {
        let (gate, sources, rec, a) = (gate.clone(), sources.clone(), rec.clone(), a.clone());
        joins.push(tokio::spawn(async move {
            let addr = a.target.addr_for(i as usize);
            let token = conn::token(&a.target.secret, &format!("roll-{i}"));
            let mut ws = open_honouring_503(&gate, &rec, addr, &sources, &token, i).await?;
            let (seq, epoch) = subscribe(&mut ws, CHAT, None, "").await?;
            anyhow::Ok(Follower { i, ws, seq, epoch })
        }));
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut followers = Vec::new();
    for j in joins {
        match tokio::time::timeout_at(deadline, j).await {
            Ok(Ok(Ok(f))) => followers.push(f),
            Ok(Ok(Err(e))) => anyhow::bail!("a client could not join: {e:#}"),
            Ok(Err(e)) => anyhow::bail!("client task failed: {e}"),
            Err(_) => anyhow::bail!("clients still joining after {timeout:?}"),
        }
    }
    rec.add_counter("joined", followers.len() as u64);
    w.barrier("joined", 0).await?;
    let cpu_before = Probe::take_if(w.is_first(), &a.pids);
    // The last seq every client must reach, once the publisher is done.
    let (last_tx, last_rx) = watch::channel(None::<u64>);
    let mut tasks = Vec::new();
    for f in followers {
        let (gate, sources, rec, a, last) = (
            gate.clone(),
            sources.clone(),
            rec.clone(),
            a.clone(),
            last_rx.clone(),
        );
        tasks.push(tokio::spawn(follow(f, a, gate, sources, rec, last)));
    }
    let started = now_us();
    rec.earliest("roll_start", started);
    let mut sent = 0;
    let mut last_seq = 0;
    if w.is_first() {
        std::fs::write(&a.ready_file, b"joined\n").context("writing --ready-file")?;
        eprintln!(
            "all clients joined; posting until {} exists",
            a.until_file.display()
        );
        (sent, last_seq) = post_until(&a, &sources, &rec).await?;
        rec.latest("roll_end", now_us());
    }
    Counters::add(&rec.kind(DELIVERY).sent, sent);
    let last_seq = w.barrier("posted", last_seq).await?;
    let _ = last_tx.send(Some(last_seq));
    let mut caught_up = 0;
    for t in tasks {
        match tokio::time::timeout_at(tokio::time::Instant::now() + timeout, t).await {
            Ok(Ok(Ok(()))) => caught_up += 1,
            Ok(Ok(Err(e))) => eprintln!("client failed: {e:#}"),
            Ok(Err(e)) => eprintln!("client task failed: {e}"),
            Err(_) => eprintln!("client still behind after {timeout:?}"),
        }
    }
    rec.add_counter("caught_up", caught_up);
    w.barrier("done", 0).await?;
    let after = Probe::take_if(w.is_first(), &a.pids);
    let params = json!({
        "addr": a.target.addr.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "clients": a.clients,
        "rate": a.rate,
    });
    let server = Probe::server((cpu_before, after), (cpu_before, after));
    Ok(rec.report("roll", params, server))
}

/// Follows the chat until it holds seq `last` (once known), reconnecting
/// as an app does whenever the socket goes away.
async fn follow(
    mut f: Follower,
    a: Arc<Args>,
    gate: Arc<Semaphore>,
    sources: Arc<conn::Sources>,
    rec: Arc<Recorder>,
    mut last: watch::Receiver<Option<u64>>,
) -> anyhow::Result<()> {
    let counters = rec.kind(DELIVERY);
    let mut samples = rec.samples();
    let mut edge = f.i as usize;
    let token = conn::token(&a.target.secret, &format!("roll-{}", f.i));
    loop {
        if last.borrow().is_some_and(|l| f.seq >= l) {
            return Ok(());
        }
        let frame = tokio::select! {
            frame = conn::recv(&mut f.ws) => frame,
            _ = last.changed() => continue,
        };
        let wait_ms = match frame {
            Ok(frame) => match frame.kind {
                Some(server_frame::Kind::Delivery(d)) => {
                    if d.seq <= f.seq {
                        Counters::add(&counters.duplicated, 1);
                    } else {
                        if d.seq > f.seq + 1 {
                            Counters::add(&counters.out_of_order, d.seq - f.seq - 1);
                        }
                        f.seq = d.seq;
                        if f.epoch.is_empty() {
                            f.epoch = d.epoch;
                        }
                        Counters::add(&counters.received, 1);
                        if let Some((sent_us, _)) = conn::stamp(&d.payload) {
                            samples.latency(DELIVERY, sent_us, now_us());
                        }
                    }
                    continue;
                }
                Some(server_frame::Kind::Disconnect(d)) => {
                    rec.add_counter("drained", 1);
                    u64::from(d.reconnect_delay_ms)
                }
                _ => continue,
            },
            // A socket lost without advice: a short jittered pause.
            Err(_) => {
                rec.add_counter("dropped", 1);
                rand::random_range(0..1000)
            }
        };
        let away_since = now_us();
        // Answer the close at once, as an app does, so the draining edge
        // is not kept waiting for this socket.
        let _ = futures_util::SinkExt::close(&mut f.ws).await;
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        // Another edge, picked at random as a load balancer does; one that
        // is down (restarting) is skipped after a full-jitter pause.
        let mut attempt = 0;
        let epoch = loop {
            let n = a.target.addr.len();
            if n > 1 {
                edge = (edge + rand::random_range(1..n)) % n;
            }
            let addr = a.target.addr_for(edge);
            let resumed = async {
                let mut ws = open_honouring_503(&gate, &rec, addr, &sources, &token, f.i).await?;
                let (_, epoch) = subscribe(&mut ws, CHAT, Some(f.seq), &f.epoch).await?;
                anyhow::Ok((ws, epoch))
            };
            match resumed.await {
                Ok((ws, epoch)) => {
                    f.ws = ws;
                    break epoch;
                }
                Err(_) if attempt < RECONNECT_ATTEMPTS => {
                    attempt += 1;
                    rec.add_counter("reconnect_retries", 1);
                    let cap = 100u64 << attempt.min(5);
                    tokio::time::sleep(Duration::from_millis(rand::random_range(0..cap))).await;
                }
                Err(e) => return Err(e.context("no edge took the client back")),
            }
        };
        // A chat with no message yet has no epoch; after that it must not change.
        anyhow::ensure!(
            f.epoch.is_empty() || epoch == f.epoch,
            "the chat's epoch changed during the roll"
        );
        f.epoch = epoch;
        rec.add_counter("reconnects", 1);
        let now = now_us();
        rec.add_counter(&format!("{RECONNECTS_AT}{}", now / 1_000_000), 1);
        samples.latency(AWAY, away_since, now);
    }
}

/// Posts stamped messages at `rate` until `until_file` exists, moving to
/// the next edge (and retrying the same client message id, which keeps one
/// seq) whenever its socket goes away; returns (posts, last seq).
async fn post_until(
    a: &Args,
    sources: &conn::Sources,
    rec: &Recorder,
) -> anyhow::Result<(u64, u64)> {
    let token = conn::token(&a.target.secret, "roll-publisher");
    let mut edge = 0;
    let mut ws = conn::open_counted(rec, a.target.addr_for(edge), sources, token.clone()).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / a.rate.max(1));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.timeout_secs);
    let retries = AtomicU64::new(0);
    let (mut n, mut last_seq) = (0u64, 0u64);
    while !a.until_file.exists() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "--until-file never appeared"
        );
        tick.tick().await;
        let p = Publish {
            target: Some(publish::Target::Chat(CHAT.into())),
            client_msg_id: format!("{}-{n}", conn::run_tag()),
            payload: conn::stamped(64, now_us(), n),
        };
        loop {
            let frame = ClientFrame {
                id: n as u32 + 10,
                kind: Some(client_frame::Kind::Publish(p.clone())),
            };
            match conn::request(&mut ws, frame).await {
                Ok(reply) => {
                    if let Some(server_frame::Kind::PublishAck(ack)) = reply.kind {
                        last_seq = ack.seq;
                        break;
                    }
                    // Refused (a draining or overloaded edge): the same id again.
                    retries.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_) => {
                    retries.fetch_add(1, Relaxed);
                    edge += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if let Ok(next) =
                        conn::open_counted(rec, a.target.addr_for(edge), sources, token.clone())
                            .await
                    {
                        ws = next;
                    }
                }
            }
        }
        n += 1;
    }
    rec.add_counter("publisher_retries", retries.load(Relaxed));
    conn::close(ws).await;
    Ok((n, last_seq))
}

/// Roll-specific figures of a (merged) report.
pub(crate) fn figures(r: &Report) -> Map<String, Value> {
    let d = r.kinds.get("delivery").cloned().unwrap_or_default();
    let away = r.kinds.get("away").cloned().unwrap_or_default();
    let joined = r.counter("joined");
    let peak = r
        .counters
        .iter()
        .filter(|(k, _)| k.starts_with(RECONNECTS_AT))
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0);
    let expected = joined * d.sent;
    let mut m = Map::new();
    m.insert("clients".into(), json!(joined));
    m.insert("posts".into(), json!(d.sent));
    m.insert(
        "roll_seconds".into(),
        json!(Report::span_secs(
            r.earliest_us.get("roll_start").copied().unwrap_or(0),
            r.latest_us.get("roll_end").copied().unwrap_or(0)
        )),
    );
    m.insert("reconnects".into(), json!(r.counter("reconnects")));
    m.insert("drain_disconnects".into(), json!(r.counter("drained")));
    m.insert(
        "sockets_dropped_without_advice".into(),
        json!(r.counter("dropped")),
    );
    m.insert("peak_reconnects_per_second".into(), json!(peak));
    m.insert(
        "refused_with_503".into(),
        json!(r.connections.refused_with_503),
    );
    m.insert(
        "reconnect_retries".into(),
        json!(r.counter("reconnect_retries")),
    );
    m.insert("away_ms".into(), away.latency.summary());
    m.insert("delivery_latency_ms".into(), d.latency.summary());
    m.insert("expected_deliveries".into(), json!(expected));
    m.insert("received".into(), json!(d.received));
    m.insert("lost".into(), json!(d.out_of_order));
    m.insert("duplicated".into(), json!(d.duplicated));
    m.insert("clients_caught_up".into(), json!(r.counter("caught_up")));
    m.insert(
        "publisher_retries".into(),
        json!(r.counter("publisher_retries")),
    );
    m
}
