//! The loopback floor: what one small `write()` to a loopback TCP socket
//! costs the writing thread on this machine, with nothing of Switchboard
//! in the way. An edge's fan-out cannot cost less per delivery than this
//! when every message wakes every socket, so its per-delivery CPU is
//! reported beside it (docs/benchmarks.md).
//!
//! N connected pairs on 127.0.0.1; one thread writes a frame-sized
//! payload to each accepting end, M rounds at R rounds/s (the pacing of
//! the fan-out benchmark); the connecting ends are drained by tasks on
//! the runtime. The writer's own CPU time (user + system, which on
//! loopback includes the receive path run in its context) is read from
//! /proc/thread-self/stat before and after.
use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use serde_json::{Map, Value, json};
use tokio::io::AsyncReadExt;

use crate::{coord::Worker, recorder::Recorder, report::Report, sys::Probe};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Connected pairs (each holds two files: 9,000 pairs fit under a
    /// 20,000-file limit).
    #[arg(long, default_value_t = 9_000)]
    sockets: u32,
    /// Rounds: each writes once to every socket.
    #[arg(long, default_value_t = 100)]
    messages: u32,
    /// Rounds per second.
    #[arg(long, default_value_t = 10)]
    rate: u32,
    /// Bytes per write (a WebSocket frame of a small chat message).
    #[arg(long, default_value_t = 200)]
    payload_bytes: usize,
}

/// User + system CPU seconds of the calling thread.
fn thread_cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")?;
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th fields of the whole line.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow::anyhow!("unreadable /proc/thread-self/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(f.get(i)
            .ok_or_else(|| anyhow::anyhow!("short stat"))?
            .parse::<f64>()?)
    };
    // rest[0] is field 3 (state), so field k is rest[k - 3].
    Ok((ticks(11)? + ticks(12)?) / clock_ticks_per_second())
}

/// USER_HZ: 100 on every Linux this runs on (it is an ABI constant for
/// /proc, independent of the kernel's tick rate).
fn clock_ticks_per_second() -> f64 {
    100.0
}

pub(crate) async fn run(a: Args, w: &Worker) -> anyhow::Result<Report> {
    anyhow::ensure!(w.count == 1, "floor runs in one process (--workers 1)");
    anyhow::ensure!(
        a.sockets > 0 && a.rate > 0 && a.payload_bytes > 0,
        "sockets, rate and payload must be > 0"
    );
    let rec = Recorder::new(&[], 0);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut writers = Vec::with_capacity(a.sockets as usize);
    let mut readers = Vec::with_capacity(a.sockets as usize);
    for _ in 0..a.sockets {
        rec.attempt();
        let client = TcpStream::connect(addr)?;
        let (server, _) = listener.accept()?;
        server.set_nodelay(true)?;
        rec.established();
        writers.push(server);
        client.set_nonblocking(true)?;
        readers.push(tokio::net::TcpStream::from_std(client)?);
    }
    eprintln!("{} loopback pairs open", writers.len());
    let drained: Vec<_> = readers
        .into_iter()
        .map(|s| {
            tokio::spawn(async move {
                let (mut s, mut buf, mut total) = (s, [0u8; 4096], 0u64);
                loop {
                    match s.read(&mut buf).await? {
                        0 => return Ok::<u64, std::io::Error>(total),
                        n => total += n as u64,
                    }
                }
            })
        })
        .collect();
    let (messages, rate, payload) = (a.messages, a.rate, vec![b'x'; a.payload_bytes]);
    let writer = std::thread::spawn(move || -> anyhow::Result<(f64, f64, u64)> {
        let period = Duration::from_secs_f64(1.0 / f64::from(rate));
        let started = Instant::now();
        let cpu_before = thread_cpu_seconds()?;
        let mut writes = 0u64;
        for round in 0..messages {
            let due = started + period * round;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            for s in writers.iter_mut() {
                s.write_all(&payload)?;
                writes += 1;
            }
        }
        let cpu = thread_cpu_seconds()? - cpu_before;
        let wall = started.elapsed().as_secs_f64();
        // Closing the writing ends ends the readers.
        drop(writers);
        Ok((cpu, wall, writes))
    });
    let (cpu, wall, writes) = tokio::task::spawn_blocking(move || writer.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))??;
    let mut read = 0u64;
    for d in drained {
        read += d.await??;
    }
    anyhow::ensure!(
        read == writes * a.payload_bytes as u64,
        "readers got {read} bytes of {} written",
        writes * a.payload_bytes as u64
    );
    rec.add_counter("writes", writes);
    rec.add_counter("bytes_read", read);
    let params = json!({
        "sockets": a.sockets,
        "messages": a.messages,
        "rate": a.rate,
        "payload_bytes": a.payload_bytes,
    });
    let mut r = rec.report("floor", params, Probe::server((None, None), (None, None)));
    // The writer thread stands where the edge stands in the fan-out rows.
    r.server.edge_cpu_seconds = Some(cpu);
    r.server.cpu_window_seconds = Some(wall);
    Ok(r)
}

/// Floor figures of a report.
pub(crate) fn figures(r: &Report) -> Map<String, Value> {
    let writes = r.counter("writes");
    let cpu = r.server.edge_cpu_seconds.filter(|c| *c > 0.0);
    let mut m = Map::new();
    m.insert("writes".into(), json!(writes));
    m.insert("writer_cpu_seconds".into(), json!(cpu));
    m.insert(
        "writes_per_cpu_second".into(),
        json!(cpu.map(|c| writes as f64 / c)),
    );
    m.insert(
        "us_per_write".into(),
        json!(cpu.filter(|_| writes > 0).map(|c| c * 1e6 / writes as f64)),
    );
    m.insert(
        "note".into(),
        json!("the writing thread's user + system CPU; loopback runs the receive path in the writer's context"),
    );
    m
}
