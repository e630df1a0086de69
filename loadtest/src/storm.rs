//! Reconnect storm: N clients subscribe to one chat, all drop at once,
//! M messages are posted while they are away, then all reconnect at once
//! and resume with `since`. Reports the time until every client is back
//! and until every client has recovered all M messages.
//!
//! With workers, each phase starts in all of them together (barriers),
//! and worker 0 posts the missed messages.
use std::{sync::Arc, time::Duration};

use anyhow::Context;
use bytes::Bytes;
use serde_json::{Map, Value, json};
use switchboard_protocol::v1::{
    ClientFrame, Publish, Subscribe, client_frame, publish, server_frame,
};
use tokio::sync::Semaphore;

use crate::{
    accounting::{Seen, Tracker},
    conn,
    coord::Worker,
    recorder::{Counters, Recorder},
    report::{Report, now_us},
    sys::{Pids, Probe},
};

/// The missed messages, as the clients recover them.
const RECOVERED: usize = 0;

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: conn::Target,
    #[command(flatten)]
    pids: Pids,
    /// Clients (over all workers).
    #[arg(long, default_value_t = 10_000)]
    clients: u32,
    /// Messages posted while the clients are away.
    #[arg(long, default_value_t = 10)]
    missed: u32,
    /// Give up after this many seconds (per phase).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

/// Subscribes to `chat` and returns the stream position (seq, epoch).
pub(crate) async fn subscribe(
    ws: &mut conn::Ws,
    chat: &str,
    since: Option<u64>,
    epoch: &str,
) -> anyhow::Result<(u64, String)> {
    let sub = Subscribe {
        chat: chat.into(),
        since,
        epoch: epoch.into(),
        token: String::new(),
    };
    let frame = ClientFrame {
        id: 2,
        kind: Some(client_frame::Kind::Subscribe(sub)),
    };
    let Some(server_frame::Kind::SubscribeResult(r)) = conn::request(ws, frame).await?.kind else {
        anyhow::bail!("subscribe answered with something else");
    };
    let p = r.position.unwrap_or_default();
    anyhow::ensure!(
        !p.resync_required,
        "history no longer holds the missed messages"
    );
    Ok((p.seq, p.epoch))
}

pub(crate) async fn run(a: Args, w: &Worker) -> anyhow::Result<Report> {
    let rec = Recorder::new(&["recovered"], 0);
    let mem_before = Probe::take_if(w.is_first(), &a.pids);
    w.barrier("start", 0).await?;
    let sources = Arc::new(
        a.target
            .sources(w.index, Duration::from_secs(a.timeout_secs)),
    );
    let gate = Arc::new(Semaphore::new(a.target.concurrency));
    let timeout = Duration::from_secs(a.timeout_secs);
    // Phase 1: everyone joins and notes where the chat stands.
    let mut joins = Vec::new();
    for i in w.slice(a.clients as u64) {
        let (gate, sources, rec) = (gate.clone(), sources.clone(), rec.clone());
        let addr = a.target.addr_for(i as usize);
        let token = conn::token(&a.target.secret, &format!("storm-{i}"));
        joins.push(tokio::spawn(async move {
            let mut ws = open_honouring_503(&gate, &rec, addr, &sources, &token, i).await?;
            let pos = subscribe(&mut ws, "storm", None, "").await?;
            anyhow::Ok((i, ws, pos))
        }));
    }
    let mut positions = Vec::with_capacity(joins.len());
    let deadline = tokio::time::Instant::now() + timeout;
    for j in joins {
        match tokio::time::timeout_at(deadline, j).await {
            Ok(Ok(Ok((i, ws, pos)))) => {
                positions.push((i, pos));
                // Phase 2: everyone drops (the socket goes away with `ws`).
                drop(ws);
            }
            Ok(Ok(Err(e))) => eprintln!("client could not join: {e:#}"),
            Ok(Err(e)) => eprintln!("client task failed: {e}"),
            Err(_) => anyhow::bail!("clients still joining after {timeout:?}"),
        }
    }
    rec.add_counter("clients_joined", positions.len() as u64);
    eprintln!("{} clients joined and dropped", positions.len());
    w.barrier("dropped", 0).await?;
    // Phase 3: messages the clients miss.
    let mut sent = 0;
    if w.is_first() {
        sent = post_missed(&a, &sources, &rec).await?;
    }
    let missed = w.barrier("published", sent).await?;
    Counters::add(
        &rec.kind(RECOVERED).expected,
        missed * positions.len() as u64,
    );
    let cpu_before = Probe::take_if(w.is_first(), &a.pids);
    // Phase 4: everyone comes back at once and resumes.
    let started = now_us();
    rec.earliest("storm_start", started);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut tasks = Vec::new();
    for (i, (seq, epoch)) in positions {
        let (gate, sources, rec) = (gate.clone(), sources.clone(), rec.clone());
        let addr = a.target.addr_for(i as usize);
        let token = conn::token(&a.target.secret, &format!("storm-{i}"));
        tasks.push(tokio::spawn(async move {
            let work = async {
                let mut ws = open_honouring_503(&gate, &rec, addr, &sources, &token, i).await?;
                subscribe(&mut ws, "storm", Some(seq), &epoch).await?;
                rec.add_counter("back", 1);
                rec.latest("last_back", now_us());
                let counters = rec.kind(RECOVERED);
                let mut samples = rec.samples();
                // A duplicate never counts as recovered: it could hide a loss.
                let mut tracker = Tracker::after(seq);
                while tracker.received < missed {
                    let Some(server_frame::Kind::Delivery(d)) = conn::recv(&mut ws).await?.kind
                    else {
                        continue;
                    };
                    match tracker.observe(d.seq) {
                        Seen::Duplicate => {
                            Counters::add(&counters.duplicated, 1);
                            continue;
                        }
                        Seen::Late => Counters::add(&counters.out_of_order, 1),
                        Seen::New => {}
                    }
                    Counters::add(&counters.received, 1);
                    // Time from the storm's start to this recovery.
                    samples.latency(RECOVERED, started, now_us());
                }
                rec.add_counter("resumed", 1);
                rec.latest("last_resumed", now_us());
                // Stay connected until everyone is done, like real clients.
                anyhow::Ok(ws)
            };
            tokio::time::timeout_at(deadline, work)
                .await
                .map_err(|_| anyhow::anyhow!("timed out"))?
        }));
    }
    let mut alive = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(ws)) => alive.push(ws),
            Ok(Err(e)) => {
                rec.add_counter("reconnect_failed", 1);
                eprintln!("client did not resume: {e:#}");
            }
            Err(e) => {
                rec.add_counter("reconnect_failed", 1);
                eprintln!("client task failed: {e}");
            }
        }
    }
    // Memory per connection is per socket held when it is read.
    rec.add_counter("sockets_at_probe", alive.len() as u64);
    w.barrier("resumed", 0).await?;
    let after = Probe::take_if(w.is_first(), &a.pids);
    drop(alive);
    let params = json!({
        "addr": a.target.addr.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "clients": a.clients,
        "missed": a.missed,
        "concurrency": a.target.concurrency,
    });
    let server = Probe::server((mem_before, after), (cpu_before, after));
    Ok(rec.report("storm", params, server))
}

/// Posts the messages the clients miss, one at a time; returns how many.
async fn post_missed(a: &Args, sources: &conn::Sources, rec: &Recorder) -> anyhow::Result<u64> {
    let token = conn::token(&a.target.secret, "storm-publisher");
    let mut publisher = conn::open_counted(rec, a.target.addr[0], sources, token)
        .await
        .context("connecting the publisher")?;
    for m in 0..a.missed {
        let p = Publish {
            target: Some(publish::Target::Chat("storm".into())),
            client_msg_id: format!("{}-{m}", conn::run_tag()),
            payload: Bytes::from_static(b"missed"),
        };
        let frame = ClientFrame {
            id: 10 + m,
            kind: Some(client_frame::Kind::Publish(p)),
        };
        conn::request(&mut publisher, frame)
            .await
            .context("posting a missed message")?;
        Counters::add(&rec.kind(RECOVERED).sent, 1);
    }
    conn::close(publisher).await;
    Ok(a.missed as u64)
}

/// Storm-specific figures of a (merged) report.
pub(crate) fn figures(r: &Report) -> Map<String, Value> {
    let start = r.earliest_us.get("storm_start").copied().unwrap_or(0);
    let at = |k: &str| Report::span_secs(start, r.latest_us.get(k).copied().unwrap_or(0));
    let back = r.counter("back");
    let mut m = Map::new();
    m.insert(
        "clients".into(),
        r.params.get("clients").cloned().unwrap_or_default(),
    );
    m.insert(
        "missed_messages".into(),
        r.params.get("missed").cloned().unwrap_or_default(),
    );
    m.insert("joined".into(), json!(r.counter("clients_joined")));
    m.insert("back".into(), json!(back));
    m.insert("resumed".into(), json!(r.counter("resumed")));
    m.insert("failed".into(), json!(r.counter("reconnect_failed")));
    m.insert(
        "refused_with_503".into(),
        json!(r.connections.refused_with_503),
    );
    m.insert("seconds_until_all_back".into(), json!(at("last_back")));
    m.insert(
        "seconds_until_all_resumed".into(),
        json!(at("last_resumed")),
    );
    m.insert(
        "reconnects_per_second".into(),
        json!(
            at("last_back")
                .filter(|s| *s > 0.0)
                .map(|s| back as f64 / s)
        ),
    );
    m
}

/// Opens a socket as an app does: a 503 (admission, accept-rate or
/// handshake limits) is honoured with a jittered pause, without holding a
/// slot of `gate` meanwhile, and retried.
pub(crate) async fn open_honouring_503(
    gate: &Arc<Semaphore>,
    rec: &Recorder,
    addr: std::net::SocketAddr,
    sources: &conn::Sources,
    token: &str,
    i: u64,
) -> anyhow::Result<conn::Ws> {
    loop {
        let permit = gate.clone().acquire_owned().await?;
        rec.attempt();
        match conn::open(addr, sources, token.to_owned()).await {
            Ok(ws) => {
                rec.established();
                return Ok(ws);
            }
            Err(e)
                if e.downcast_ref::<conn::UpgradeRefused>()
                    .is_some_and(|r| r.retryable()) =>
            {
                let r = e.downcast_ref::<conn::UpgradeRefused>();
                let status = r.map_or(0, |r| r.status);
                if status == 503 {
                    rec.refused();
                }
                rec.add_counter(&format!("refused_retried_{status}"), 1);
                drop(permit);
                // Retry-After plus full jitter, spread by client number.
                let jitter = ((i * 37) % 1000) as f64 / 1000.0;
                let wait = r.map_or(Duration::from_secs(1), |r| r.retry_wait(jitter));
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                rec.failed();
                return Err(e);
            }
        }
    }
}
