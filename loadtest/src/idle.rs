//! Hold N idle sockets; measure the edge's memory per socket.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::Semaphore;

use crate::{conn, sys};

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: conn::Target,
    /// Sockets to open.
    #[arg(long, default_value_t = 10_000)]
    sockets: u32,
    /// Seconds to hold the sockets after the last connect.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
    /// Edge process id, to read its RSS and CPU.
    #[arg(long)]
    edge_pid: Option<u32>,
}

#[derive(Serialize)]
pub(crate) struct Report {
    scenario: &'static str,
    attempted: u32,
    established: u64,
    failed: u64,
    connect_seconds: f64,
    connects_per_second: f64,
    edge_rss_before_bytes: Option<u64>,
    edge_rss_after_bytes: Option<u64>,
    edge_rss_per_connection_bytes: Option<f64>,
    kernel_slab_per_connection_bytes: Option<f64>,
    kernel_tcp_buffer_per_connection_bytes: Option<f64>,
    note: &'static str,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<serde_json::Value> {
    let rss_before = a.edge_pid.and_then(sys::rss_bytes);
    let slab_before = sys::slab_bytes();
    let tcp_before = sys::tcp_kernel();
    let sources = Arc::new(conn::Sources::new(a.target.sources));
    let gate = Arc::new(Semaphore::new(a.target.concurrency));
    let established = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(a.sockets as usize);
    for i in 0..a.sockets {
        let permit = gate.clone().acquire_owned().await?;
        let (sources, established, failed, release) = (
            sources.clone(),
            established.clone(),
            failed.clone(),
            release.clone(),
        );
        let token = conn::token(&a.target.secret, &format!("idle-{i}"));
        let addr = a.target.addr_for(i as usize);
        tasks.push(tokio::spawn(async move {
            let ws = conn::open(addr, &sources, token).await;
            drop(permit);
            let mut ws = match ws {
                Ok(ws) => ws,
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            established.fetch_add(1, Ordering::Relaxed);
            // Keep reading so pings are answered, until released.
            let hold = release.notified();
            tokio::pin!(hold);
            loop {
                tokio::select! {
                    _ = &mut hold => break,
                    r = conn::recv(&mut ws) => if r.is_err() { break },
                }
            }
        }));
    }
    while established.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < a.sockets as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(a.hold_secs)).await;
    let n = established.load(Ordering::Relaxed);
    let rss_after = a.edge_pid.and_then(sys::rss_bytes);
    let slab_after = sys::slab_bytes();
    let tcp_after = sys::tcp_kernel();
    release.notify_waiters();
    for t in tasks {
        let _ = t.await;
    }
    let per = |before: Option<u64>, after: Option<u64>| match (before, after) {
        (Some(b), Some(a)) if n > 0 => Some((a as f64 - b as f64) / n as f64),
        _ => None,
    };
    Ok(serde_json::to_value(Report {
        scenario: "idle",
        attempted: a.sockets,
        established: n,
        failed: failed.load(Ordering::Relaxed),
        connect_seconds,
        connects_per_second: n as f64 / connect_seconds,
        edge_rss_before_bytes: rss_before,
        edge_rss_after_bytes: rss_after,
        edge_rss_per_connection_bytes: per(rss_before, rss_after),
        kernel_slab_per_connection_bytes: per(slab_before, slab_after),
        kernel_tcp_buffer_per_connection_bytes: per(
            tcp_before.map(|t| t.0),
            tcp_after.map(|t| t.0),
        ),
        note: "kernel figures are system-wide deltas and include both ends of each loopback connection",
    })?)
}
