//! A scenario's view of the fleet it runs in: which slice of the
//! population is its own, and barriers shared with the other workers.
//!
//! The protocol with the parent (see `fleet.rs`) is lines of text: the
//! worker prints `ready NAME VALUE` on stdout when it reaches barrier
//! NAME; the parent, once every worker is there, writes `go NAME SUM` to
//! each worker's stdin, SUM being the workers' VALUEs added up. The
//! worker's last stdout line is its report (one JSON object). Its stdin
//! closing means the parent is gone, and the worker exits at once.
use std::{
    io::{BufRead, Write},
    ops::Range,
    time::Duration,
};

use anyhow::{Context, bail};
use tokio::sync::{Mutex, mpsc};

/// Which of the workers this process is, and how to meet the others.
pub(crate) struct Worker {
    pub(crate) index: u32,
    pub(crate) count: u32,
    /// `go` lines from the parent; none when running alone.
    go: Option<Mutex<mpsc::Receiver<(String, u64)>>>,
    barrier_timeout: Duration,
}

impl Worker {
    /// The only process: every barrier opens at once.
    pub(crate) fn alone() -> Worker {
        Worker {
            index: 0,
            count: 1,
            go: None,
            barrier_timeout: Duration::ZERO,
        }
    }

    /// Worker `index` of `count`, driven by a parent over stdin/stdout.
    pub(crate) fn child(index: u32, count: u32, barrier_timeout: Duration) -> Worker {
        let (tx, rx) = mpsc::channel(8);
        // A plain thread: tokio's stdin is a blocking thread anyway, and
        // this one must be able to end the process when the parent dies.
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let mut f = line.split_whitespace();
                match (f.next(), f.next(), f.next().and_then(|v| v.parse().ok())) {
                    (Some("go"), Some(name), Some(sum)) => {
                        if tx.blocking_send((name.to_string(), sum)).is_err() {
                            return;
                        }
                    }
                    _ => eprintln!("worker {index}: ignoring unexpected input {line:?}"),
                }
            }
            // Not eprintln!: with the parent gone, stderr is a broken pipe
            // and eprintln! would panic this thread instead of exiting.
            let _ = writeln!(
                std::io::stderr(),
                "worker {index}: parent went away; exiting"
            );
            std::process::exit(3);
        });
        Worker {
            index,
            count,
            go: Some(Mutex::new(rx)),
            barrier_timeout,
        }
    }

    /// Worker 0 publishes where one publisher is wanted and takes the
    /// readings of the server processes.
    pub(crate) fn is_first(&self) -> bool {
        self.index == 0
    }

    /// This worker's share of `n` things numbered 0..n (contiguous,
    /// disjoint, together all of them).
    pub(crate) fn slice(&self, n: u64) -> Range<u64> {
        split(n, self.index, self.count)
    }

    /// Waits until every worker has reached barrier `name`; returns the
    /// sum of the `value`s they brought.
    pub(crate) async fn barrier(&self, name: &str, value: u64) -> anyhow::Result<u64> {
        let Some(go) = &self.go else {
            return Ok(value);
        };
        {
            let mut out = std::io::stdout().lock();
            writeln!(out, "ready {name} {value}")?;
            out.flush()?;
        }
        // The parent enforces the real timeout and kills us; this one only
        // keeps a lost parent from leaving us waiting forever.
        let wait = self.barrier_timeout + Duration::from_secs(30);
        let got = tokio::time::timeout(wait, async { go.lock().await.recv().await })
            .await
            .with_context(|| format!("no go for barrier {name} within {wait:?}"))?;
        match got {
            Some((n, sum)) if n == name => Ok(sum),
            Some((n, _)) => bail!("waiting at barrier {name}, told to pass {n}"),
            None => bail!("parent went away at barrier {name}"),
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone). Returns
/// nothing, so no lock guard is held across an await in a `select!`.
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Waits until `expected` sockets have settled, each sending `true` (ready)
/// or `false` (gave up) on `settled`; returns how many are ready. Fails
/// after `timeout_secs`; `what` names the sockets in messages.
pub(crate) async fn wait_settled(
    settled: &mut mpsc::Receiver<bool>,
    expected: u64,
    timeout_secs: u64,
    what: &str,
) -> anyhow::Result<u64> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout_secs);
    let (mut ready, mut done) = (0u64, 0u64);
    while done < expected {
        match tokio::time::timeout_at(deadline, settled.recv()).await {
            Ok(Some(ok)) => {
                done += 1;
                ready += ok as u64;
            }
            Ok(None) => break,
            Err(_) => bail!("only {ready} of {expected} {what} ready after {timeout_secs} s"),
        }
    }
    eprintln!("{ready} of {expected} {what} ready");
    Ok(ready)
}

/// Part `index` of `count` of 0..n.
pub(crate) fn split(n: u64, index: u32, count: u32) -> Range<u64> {
    let count = count.max(1) as u64;
    let index = (index as u64).min(count);
    // u128: n * index may not fit in u64 for absurd n.
    let at = |i: u64| ((n as u128 * i as u128) / count as u128) as u64;
    at(index)..at(index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_are_disjoint_and_cover_everything() {
        for (n, workers) in [(0, 3), (1, 4), (10, 3), (100_002, 6), (7, 7), (5, 1)] {
            let parts: Vec<Range<u64>> = (0..workers).map(|i| split(n, i, workers)).collect();
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts.last().unwrap().end, n);
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start, "{n} over {workers}");
            }
            let sizes: Vec<u64> = parts.iter().map(|r| r.end - r.start).collect();
            let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(hi - lo <= 1, "balanced: {sizes:?}");
        }
    }

    #[tokio::test]
    async fn alone_every_barrier_passes_with_its_own_value() {
        let w = Worker::alone();
        assert_eq!(w.barrier("x", 42).await.unwrap(), 42);
        assert!(w.is_first());
        assert_eq!(w.slice(10), 0..10);
    }
}
