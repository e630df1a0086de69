//! Hold N idle sockets; measure the edge's memory per socket.
use std::{sync::Arc, time::Duration};

use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, watch};

use crate::{
    conn,
    coord::Worker,
    recorder::Recorder,
    report::Report,
    sys::{Pids, Probe},
};

/// Longest a socket retries refused upgrades (unless `--no-retry`).
const IDLE_RETRY_FOR: Duration = Duration::from_secs(120);

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: conn::Target,
    #[command(flatten)]
    pids: Pids,
    /// Sockets to open (over all workers).
    #[arg(long, default_value_t = 10_000)]
    sockets: u32,
    /// Seconds to hold the sockets after the last connect.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
}

pub(crate) async fn run(a: Args, w: &Worker) -> anyhow::Result<Report> {
    let rec = Recorder::new(&[], 0);
    let before = Probe::take_if(w.is_first(), &a.pids);
    w.barrier("start", 0).await?;
    let sources = Arc::new(a.target.sources(w.index, IDLE_RETRY_FOR));
    let gate = Arc::new(Semaphore::new(a.target.concurrency));
    let (release_tx, release) = watch::channel(false);
    let mine = w.slice(a.sockets as u64);
    let local = mine.end - mine.start;
    let mut tasks = Vec::with_capacity(local as usize);
    for i in mine {
        let permit = gate.clone().acquire_owned().await?;
        let (sources, rec, mut release) = (sources.clone(), rec.clone(), release.clone());
        let token = conn::token(&a.target.secret, &format!("idle-{i}"));
        let addr = a.target.addr_for(i as usize);
        tasks.push(tokio::spawn(async move {
            let ws = conn::open_counted(&rec, addr, &sources, token).await;
            drop(permit);
            let Ok(mut ws) = ws else { return };
            // Keep reading so pings are answered, until released.
            tokio::select! {
                _ = crate::coord::stopped(&mut release) => {}
                _ = async { while conn::recv(&mut ws).await.is_ok() {} } => {}
            }
        }));
    }
    // Every open is bounded by its own timeout, so this ends.
    while rec.established_count() + rec.failed_count() < local {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("{} of {local} sockets open", rec.established_count());
    w.barrier("connected", 0).await?;
    tokio::time::sleep(Duration::from_secs(a.hold_secs)).await;
    let after = Probe::take_if(w.is_first(), &a.pids);
    // Nobody lets go before worker 0 has measured.
    w.barrier("measured", 0).await?;
    let _ = release_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let params = json!({
        "addr": a.target.addr.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "sockets": a.sockets,
        "hold_secs": a.hold_secs,
        "no_retry": a.target.no_retry,
    });
    Ok(rec.report(
        "idle",
        params,
        Probe::server((before, after), (before, after)),
    ))
}

/// Idle-specific figures of a (merged) report.
pub(crate) fn figures(_: &Report) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "note".into(),
        json!("kernel figures are system-wide deltas and include both ends of each loopback connection"),
    );
    m
}
