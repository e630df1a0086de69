//! The parent of `--workers N`: runs this binary N times with the same
//! arguments plus a worker index, opens each barrier once every worker
//! has reached it, and merges the workers' reports.
//!
//! Any worker failing, a barrier not reached in time, or the whole run
//! outlasting its limit ends the run: the other workers are killed and
//! the parent fails with the reason and the worker's last lines of
//! stderr. Workers also die with the parent: their stdin closes.
use std::{
    collections::{BTreeMap, VecDeque},
    ffi::OsString,
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, anyhow, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    process::{ChildStdin, Command},
    sync::{mpsc, watch},
    time::Instant,
};

use crate::report::Report;

/// Lines of a worker's stderr kept for the error message.
const TAIL_LINES: usize = 20;

/// How to run the fleet.
pub(crate) struct Fleet {
    pub(crate) workers: u32,
    /// The command line to repeat (without the program name).
    pub(crate) args: Vec<OsString>,
    /// Longest wait, from the first worker's arrival, for the others.
    pub(crate) barrier_timeout: Duration,
    /// Longest the whole run may take.
    pub(crate) run_timeout: Duration,
}

enum Event {
    Ready {
        worker: usize,
        name: String,
        value: u64,
    },
    Report {
        worker: usize,
        report: Box<Report>,
    },
    Garbage {
        worker: usize,
        line: String,
    },
    StdoutClosed {
        worker: usize,
    },
    Exited {
        worker: usize,
        status: std::io::Result<ExitStatus>,
    },
}

struct Barrier {
    arrived: Vec<bool>,
    sum: u64,
    since: Instant,
}

type Tail = Arc<Mutex<VecDeque<String>>>;

fn tail_text(tail: &Tail) -> String {
    let lines = tail.lock().expect("tail lock");
    if lines.is_empty() {
        return "  (no output on stderr)".into();
    }
    lines
        .iter()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Fleet {
    /// Runs the workers to the end and returns their merged report.
    pub(crate) async fn run(self) -> anyhow::Result<Report> {
        let n = self.workers as usize;
        let exe = std::env::current_exe().context("finding this program to run workers")?;
        let (events, mut rx) = mpsc::channel::<Event>(64);
        let (kill, _) = watch::channel(false);
        let mut stdins: Vec<Option<ChildStdin>> = Vec::with_capacity(n);
        let mut tails: Vec<Tail> = Vec::with_capacity(n);
        for i in 0..n {
            let mut child = Command::new(&exe)
                .args(&self.args)
                .arg("--worker-index")
                .arg(i.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting worker {i}"))?;
            stdins.push(child.stdin.take());
            let stdout = child.stdout.take().expect("piped stdout");
            let stderr = child.stderr.take().expect("piped stderr");
            let tail: Tail = Arc::default();
            tails.push(tail.clone());
            let ev = events.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = ev.send(parse_line(i, line)).await;
                }
                let _ = ev.send(Event::StdoutClosed { worker: i }).await;
            });
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("[w{i}] {line}");
                    let mut t = tail.lock().expect("tail lock");
                    if t.len() == TAIL_LINES {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
            let ev = events.clone();
            let mut killed = kill.subscribe();
            tokio::spawn(async move {
                let status = tokio::select! {
                    s = child.wait() => s,
                    _ = crate::coord::stopped(&mut killed) => {
                        let _ = child.start_kill();
                        child.wait().await
                    }
                };
                let _ = ev.send(Event::Exited { worker: i, status }).await;
            });
        }
        drop(events);
        let outcome = self.drive(&mut rx, &mut stdins, &tails).await;
        if outcome.is_err() {
            let _ = kill.send(true);
            // Reap them (each waiter reports once), bounded.
            drop(stdins);
            let reap = async { while rx.recv().await.is_some() {} };
            let _ = tokio::time::timeout(Duration::from_secs(10), reap).await;
        }
        outcome
    }

    async fn drive(
        &self,
        rx: &mut mpsc::Receiver<Event>,
        stdins: &mut [Option<ChildStdin>],
        tails: &[Tail],
    ) -> anyhow::Result<Report> {
        let n = self.workers as usize;
        let run_deadline = Instant::now() + self.run_timeout;
        let mut barriers: BTreeMap<String, Barrier> = BTreeMap::new();
        let mut reports: Vec<Option<Report>> = (0..n).map(|_| None).collect();
        let mut exited = vec![false; n];
        let mut closed = vec![false; n];
        while !(exited.iter().all(|e| *e) && closed.iter().all(|c| *c)) {
            let barrier_deadline = barriers
                .values()
                .map(|b| b.since + self.barrier_timeout)
                .min();
            let deadline = barrier_deadline.map_or(run_deadline, |b| b.min(run_deadline));
            let event = tokio::select! {
                e = rx.recv() => e.ok_or_else(|| anyhow!("lost track of the workers"))?,
                _ = tokio::time::sleep_until(deadline) => {
                    if let Some((name, b)) = barriers.iter().find(|(_, b)| b.since + self.barrier_timeout <= Instant::now()) {
                        let late: Vec<String> = b.arrived.iter().enumerate().filter(|(_, a)| !**a).map(|(i, _)| i.to_string()).collect();
                        bail!(
                            "worker(s) {} did not reach barrier {name} within {:?} of the first",
                            late.join(", "),
                            self.barrier_timeout
                        );
                    }
                    bail!("the run took longer than {:?}", self.run_timeout);
                }
            };
            match event {
                Event::Ready {
                    worker,
                    name,
                    value,
                } => {
                    let b = barriers.entry(name.clone()).or_insert_with(|| Barrier {
                        arrived: vec![false; n],
                        sum: 0,
                        since: Instant::now(),
                    });
                    if std::mem::replace(&mut b.arrived[worker], true) {
                        bail!("worker {worker} reached barrier {name} twice");
                    }
                    b.sum += value;
                    if b.arrived.iter().all(|a| *a) {
                        let sum = b.sum;
                        barriers.remove(&name);
                        eprintln!("all {n} workers at {name}: go");
                        let line = format!("go {name} {sum}\n");
                        for (i, stdin) in stdins.iter_mut().enumerate() {
                            let stdin = stdin
                                .as_mut()
                                .ok_or_else(|| anyhow!("worker {i} has no stdin"))?;
                            // A worker that already died shows up as its exit.
                            let _ = stdin.write_all(line.as_bytes()).await;
                            let _ = stdin.flush().await;
                        }
                    }
                }
                Event::Report { worker, report } => reports[worker] = Some(*report),
                Event::Garbage { worker, line } => {
                    bail!("worker {worker} printed something that is not a report: {line:?}")
                }
                Event::StdoutClosed { worker } => closed[worker] = true,
                Event::Exited { worker, status } => {
                    exited[worker] = true;
                    let status = status.with_context(|| format!("waiting for worker {worker}"))?;
                    if !status.success() {
                        // Give its stderr a moment to arrive for the message.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        bail!(
                            "worker {worker} failed ({status}); its last lines:\n{}",
                            tail_text(&tails[worker])
                        );
                    }
                }
            }
        }
        let mut merged = Report::default();
        for (i, r) in reports.into_iter().enumerate() {
            let r = r.ok_or_else(|| {
                anyhow!(
                    "worker {i} exited without a report; its last lines:\n{}",
                    tail_text(&tails[i])
                )
            })?;
            merged.merge(&r)?;
        }
        Ok(merged)
    }
}

fn parse_line(worker: usize, line: String) -> Event {
    if let Some(rest) = line.strip_prefix("ready ") {
        let mut f = rest.split_whitespace();
        if let (Some(name), Some(Ok(value)), None) = (f.next(), f.next().map(str::parse), f.next())
        {
            return Event::Ready {
                worker,
                name: name.into(),
                value,
            };
        }
    } else if line.starts_with('{') {
        match serde_json::from_str::<Report>(&line) {
            Ok(report) => {
                return Event::Report {
                    worker,
                    report: Box::new(report),
                };
            }
            Err(e) => {
                return Event::Garbage {
                    worker,
                    line: format!("unreadable report ({e})"),
                };
            }
        }
    }
    Event::Garbage { worker, line }
}
