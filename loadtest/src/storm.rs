//! Reconnect storm: N clients subscribe to one chat, all drop at once,
//! M messages are posted while they are away, then all reconnect at once
//! and resume with `since`. Reports the time until every client is back
//! and until every client has recovered all M messages.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use serde::Serialize;
use switchboard_protocol::v1::{
    ClientFrame, Publish, Subscribe, client_frame, publish, server_frame,
};
use tokio::sync::Semaphore;

use crate::conn;

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: conn::Target,
    /// Clients.
    #[arg(long, default_value_t = 10_000)]
    clients: u32,
    /// Messages posted while the clients are away.
    #[arg(long, default_value_t = 10)]
    missed: u32,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Edge process id, to report its RSS after the storm.
    #[arg(long)]
    edge_pid: Option<u32>,
}

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    clients: u32,
    missed_messages: u32,
    back: u64,
    resumed: u64,
    failed: u64,
    refused_with_503: u64,
    seconds_until_all_back: f64,
    seconds_until_all_resumed: f64,
    reconnects_per_second: f64,
    edge_rss_after_bytes: Option<u64>,
}

/// Subscribes and returns the stream position (seq, epoch).
async fn subscribe(
    ws: &mut conn::Ws,
    since: Option<u64>,
    epoch: &str,
) -> anyhow::Result<(u64, String)> {
    let sub = Subscribe {
        chat: "storm".into(),
        since,
        epoch: epoch.into(),
    };
    conn::send(
        ws,
        ClientFrame {
            id: 2,
            kind: Some(client_frame::Kind::Subscribe(sub)),
        },
    )
    .await?;
    loop {
        if let Some(server_frame::Kind::SubscribeResult(r)) = conn::recv(ws).await?.kind {
            let p = r.position.unwrap_or_default();
            anyhow::ensure!(
                !p.resync_required,
                "history no longer holds the missed messages"
            );
            return Ok((p.seq, p.epoch));
        }
    }
}

pub(crate) async fn run(a: Args) -> anyhow::Result<serde_json::Value> {
    let sources = Arc::new(conn::Sources::new(a.target.sources));
    let gate = Arc::new(Semaphore::new(a.target.concurrency));
    // Phase 1: everyone joins and notes where the chat stands.
    let mut joins = Vec::new();
    for i in 0..a.clients {
        let (gate, sources) = (gate.clone(), sources.clone());
        let addr = a.target.addr_for(i as usize);
        let token = conn::token(&a.target.secret, &format!("storm-{i}"));
        joins.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let mut ws = conn::open(addr, &sources, token).await?;
            let pos = subscribe(&mut ws, None, "").await?;
            anyhow::Ok((ws, pos))
        }));
    }
    let mut positions = Vec::with_capacity(a.clients as usize);
    for j in joins {
        let (ws, pos) = j.await??;
        positions.push(pos);
        // Phase 2: everyone drops (the socket goes away with `ws`).
        drop(ws);
    }
    eprintln!("{} clients joined and dropped", a.clients);
    // Phase 3: messages the clients miss.
    let mut publisher = conn::open(
        a.target.addr[0],
        &sources,
        conn::token(&a.target.secret, "storm-publisher"),
    )
    .await?;
    for m in 0..a.missed {
        let p = Publish {
            target: Some(publish::Target::Chat("storm".into())),
            client_msg_id: format!("storm-{m}"),
            payload: Bytes::from_static(b"missed"),
        };
        conn::send(
            &mut publisher,
            ClientFrame {
                id: 10 + m,
                kind: Some(client_frame::Kind::Publish(p)),
            },
        )
        .await?;
        while !matches!(
            conn::recv(&mut publisher).await?.kind,
            Some(server_frame::Kind::PublishAck(_))
        ) {}
    }
    // Phase 4: everyone comes back at once and resumes.
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.timeout_secs);
    let back = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let last_back = Arc::new(AtomicU64::new(0));
    let last_resumed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (i, (seq, epoch)) in positions.into_iter().enumerate() {
        let (gate, sources) = (gate.clone(), sources.clone());
        let (back, resumed, refused, last_back, last_resumed) = (
            back.clone(),
            resumed.clone(),
            refused.clone(),
            last_back.clone(),
            last_resumed.clone(),
        );
        let addr = a.target.addr_for(i);
        let token = conn::token(&a.target.secret, &format!("storm-{i}"));
        let missed = a.missed as u64;
        tasks.push(tokio::spawn(async move {
            let work = async {
                let mut ws = loop {
                    let permit = gate.clone().acquire_owned().await?;
                    match conn::open(addr, &sources, token.clone()).await {
                        Ok(ws) => break ws,
                        Err(e) if e.to_string().contains("503") => {
                            // Over the edge's admission limit: honour it with jitter.
                            refused.fetch_add(1, Ordering::Relaxed);
                            drop(permit);
                            tokio::time::sleep(Duration::from_millis(200 + (i as u64 * 37) % 800))
                                .await;
                        }
                        Err(e) => return Err(e),
                    }
                };
                subscribe(&mut ws, Some(seq), &epoch).await?;
                back.fetch_add(1, Ordering::Relaxed);
                last_back.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                let mut got = 0;
                while got < missed {
                    if let Some(server_frame::Kind::Delivery(d)) = conn::recv(&mut ws).await?.kind
                        && d.seq > seq
                    {
                        got += 1;
                    }
                }
                resumed.fetch_add(1, Ordering::Relaxed);
                last_resumed.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                // Stay connected until everyone is done, like real clients.
                anyhow::Ok(ws)
            };
            tokio::time::timeout_at(deadline, work)
                .await
                .map_err(|_| anyhow::anyhow!("timed out"))?
        }));
    }
    let mut failed = 0;
    let mut alive = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(ws)) => alive.push(ws),
            _ => failed += 1,
        }
    }
    let rss = a.edge_pid.and_then(crate::sys::rss_bytes);
    drop(alive);
    let secs = |us: &AtomicU64| us.load(Ordering::Relaxed) as f64 / 1e6;
    let n = back.load(Ordering::Relaxed);
    Ok(serde_json::to_value(Report {
        scenario: "storm",
        clients: a.clients,
        missed_messages: a.missed,
        back: n,
        resumed: resumed.load(Ordering::Relaxed),
        failed,
        refused_with_503: refused.load(Ordering::Relaxed),
        seconds_until_all_back: secs(&last_back),
        seconds_until_all_resumed: secs(&last_resumed),
        reconnects_per_second: n as f64 / secs(&last_back).max(1e-9),
        edge_rss_after_bytes: rss,
    })?)
}
