//! N users in chats of K members, R messages/s in total from random
//! members; every other member measures publish-to-receive latency. Users
//! alternate between the given edges, so most deliveries cross edges.
//!
//! With workers, whole chats are split among them (a chat's members live
//! in one worker), so each worker knows what its members should receive.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use serde_json::{Map, Value, json};
use switchboard_protocol::v1::{
    ClientFrame, Publish, Subscribe, client_frame, publish, server_frame,
};
use tokio::{
    sync::{Semaphore, mpsc, watch},
    time::Instant,
};

use crate::{
    accounting::{Seen, Tracker},
    conn,
    coord::Worker,
    recorder::{Counters, Recorder},
    report::{Report, now_us},
    sys::{Pids, Probe},
};

const CHAT: usize = 0;

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: conn::Target,
    #[command(flatten)]
    pids: Pids,
    /// Connected users (one socket each, over all workers).
    #[arg(long, default_value_t = 10_000)]
    users: u32,
    /// Members per chat.
    #[arg(long, default_value_t = 2)]
    group_size: u32,
    /// Messages per second, all chats (and workers) together.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Longest wait for every user to connect and subscribe.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// The delivery window: a delivery later than this after its send
    /// counts as late; the wait after the last publish lasts this long,
    /// and as long again for late ones while something is missing.
    #[arg(long, default_value_t = 10_000)]
    window_ms: u64,
}

/// Members of chat `g` among `users` users in chats of `k`.
fn members(g: u64, k: u64, users: u64) -> std::ops::Range<u64> {
    g * k..((g + 1) * k).min(users)
}

pub(crate) async fn run(a: Args, w: &Worker) -> anyhow::Result<Report> {
    let rec = Recorder::new(&["chat"], 0);
    let mem_before = Probe::take_if(w.is_first(), &a.pids);
    w.barrier("start", 0).await?;
    let users = a.users as u64;
    let k = a.group_size.max(2) as u64;
    let chats = w.slice(users.div_ceil(k));
    let mine = chats.start * k..(chats.end * k).min(users);
    let sources = Arc::new(
        a.target
            .sources(w.index, Duration::from_secs(a.timeout_secs)),
    );
    let gate = Arc::new(Semaphore::new(a.target.concurrency));
    let (stop_tx, stop) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::channel::<bool>(1024);
    let replies = Arc::new(Replies::default());
    let local = mine.end - mine.start;
    // Who got in: a message to a member who never did is not lost.
    let connected: Arc<[AtomicBool]> = (0..local).map(|_| AtomicBool::new(false)).collect();
    let window = Duration::from_millis(a.window_ms);
    let mut senders = Vec::with_capacity((mine.end - mine.start) as usize);
    let mut tasks = Vec::new();
    for i in mine.clone() {
        let permit = gate.clone().acquire_owned().await?;
        let (tx, rx) = mpsc::channel::<u64>(64);
        senders.push(tx);
        let g = i / k;
        let peers = members(g, k, users)
            .filter(|&p| p != i)
            .map(|p| (p - mine.start) as usize)
            .collect();
        let member = Member {
            rec: rec.clone(),
            sources: sources.clone(),
            addr: a.target.addr_for(i as usize),
            me: format!("chat-{i}"),
            chat: format!("g{g}"),
            index: (i - mine.start) as usize,
            peers,
            connected: connected.clone(),
            window_us: window.as_micros() as u64,
            rx,
            stop: stop.clone(),
            ready: ready_tx.clone(),
            replies: replies.clone(),
        };
        let secret = a.target.secret.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = member.run(&secret, permit).await {
                eprintln!("user gave up: {e:#}");
            }
        }));
    }
    drop(ready_tx);
    crate::coord::wait_settled(&mut ready_rx, local, a.timeout_secs, "users").await?;
    w.barrier("subscribed", 0).await?;
    let mem_after = Probe::take_if(w.is_first(), &a.pids);
    let cpu_before = mem_after;
    // This worker's share of the rate, by its share of the users.
    let rate = a.rate as f64 * local as f64 / users.max(1) as f64;
    rec.earliest("publish_start", now_us());
    let mut queued = 0u64;
    if rate > 0.0 && local > 0 {
        let total = (rate * a.duration_secs as f64).round() as u64;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        // xorshift: a cheap, deterministic choice of the sending user.
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (w.index as u64 + 1);
        for m in 0..total {
            tick.tick().await;
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let who = (rng % local) as usize;
            if senders[who].try_send(m).is_ok() {
                queued += 1;
            } else {
                rec.add_counter("dropped_by_generator", 1);
            }
        }
    }
    rec.latest("publish_end", now_us());
    // Deliveries are all local: wait until what was queued went out, was
    // answered for good, and everything it should cause arrived; within
    // the window, then as long again for late deliveries.
    let start = Instant::now();
    let chat = rec.kind(CHAT);
    let answered = || replies.acked.load(Relaxed) + replies.refused.load(Relaxed);
    while (Counters::get(&chat.sent) < queued || answered() < queued || !chat.complete())
        && start.elapsed() < window * 2
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Neither acked nor refused by the end of the wait: no answer came
    // (the router was too slow or the socket went away), so nothing is
    // owed for them and they are not lost, but they are not delivered
    // messages either.
    rec.add_counter("unanswered", queued.saturating_sub(answered()));
    rec.add_counter("acked", replies.acked.load(Relaxed));
    rec.add_counter("publish_errors", replies.errors.load(Relaxed));
    rec.add_counter("publish_duplicates", replies.duplicates.load(Relaxed));
    // The delivery window ends when every worker is done, before the
    // sockets close.
    w.barrier("delivered", 0).await?;
    let cpu_after = Probe::take_if(w.is_first(), &a.pids);
    let _ = stop_tx.send(true);
    drop(senders);
    for t in tasks {
        let _ = t.await;
    }
    w.barrier("drained", 0).await?;
    let params = json!({
        "addr": a.target.addr.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "users": a.users,
        "group_size": k,
        "rate": a.rate,
        "duration_secs": a.duration_secs,
        "window_ms": a.window_ms,
    });
    let server = Probe::server_apart(
        (mem_before, mem_after),
        (mem_before, mem_after),
        (cpu_before, cpu_after),
    );
    Ok(rec.report("chat", params, server))
}

/// Answers to publishes, over all users.
#[derive(Default)]
struct Replies {
    acked: AtomicU64,
    /// Acks saying the message was taken for a retry of an earlier one.
    duplicates: AtomicU64,
    /// Error replies, retried ones included.
    errors: AtomicU64,
    /// Publishes refused for good (not retryable, or out of retries).
    refused: AtomicU64,
}

/// A publish not yet answered for good.
struct Pending {
    m: u64,
    sent_us: u64,
    retries: u32,
}

/// One user: publishes when told to, counts what its chat delivers.
struct Member {
    rec: Arc<Recorder>,
    sources: Arc<conn::Sources>,
    addr: SocketAddr,
    me: String,
    chat: String,
    /// This user's index among the worker's users.
    index: usize,
    /// The other members of the chat, as indices into `connected`.
    peers: Vec<usize>,
    /// Per user of this worker: connected (and subscribed) now.
    connected: Arc<[AtomicBool]>,
    /// Deliveries later than this after their send are late.
    window_us: u64,
    rx: mpsc::Receiver<u64>,
    stop: watch::Receiver<bool>,
    ready: mpsc::Sender<bool>,
    replies: Arc<Replies>,
}

impl Member {
    async fn run(
        mut self,
        secret: &str,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> anyhow::Result<()> {
        let setup = async {
            let token = conn::token(secret, &self.me);
            let mut ws = conn::open_counted(&self.rec, self.addr, &self.sources, token).await?;
            let sub = Subscribe {
                chat: self.chat.clone(),
                ..Default::default()
            };
            let frame = ClientFrame {
                id: 1,
                kind: Some(client_frame::Kind::Subscribe(sub)),
            };
            conn::request(&mut ws, frame).await?;
            anyhow::Ok(ws)
        };
        let ws = setup.await;
        drop(permit);
        if ws.is_ok() {
            self.connected[self.index].store(true, Relaxed);
        }
        let _ = self.ready.send(ws.is_ok()).await;
        let mut ws = ws?;
        let counters = self.rec.kind(CHAT);
        let mut samples = self.rec.samples();
        let mut tracker = Tracker::default();
        let mut pending: HashMap<u32, Pending> = HashMap::new();
        // (when, frame id) of publishes to send again.
        let mut retry: Vec<(Instant, u32)> = Vec::new();
        let mut last_delivery_us = 0;
        let stopped = loop {
            let next_retry = retry.iter().map(|r| r.0).min();
            tokio::select! {
                _ = crate::coord::stopped(&mut self.stop) => break true,
                _ = tokio::time::sleep_until(next_retry.unwrap_or_else(Instant::now)), if next_retry.is_some() => {
                    let now = Instant::now();
                    let due: Vec<u32> = retry.iter().filter(|r| r.0 <= now).map(|r| r.1).collect();
                    retry.retain(|r| r.0 > now);
                    for id in due {
                        let Some(p) = pending.get(&id) else { continue };
                        self.rec.add_counter("publish_retries", 1);
                        if self.publish(&mut ws, id, p).await.is_err() {
                            break;
                        }
                    }
                }
                m = self.rx.recv() => {
                    let Some(m) = m else { break true };
                    let id = 2 + m as u32;
                    let p = Pending { m, sent_us: now_us(), retries: 0 };
                    if self.publish(&mut ws, id, &p).await.is_err() {
                        break false;
                    }
                    pending.insert(id, p);
                    Counters::add(&counters.sent, 1);
                }
                f = conn::recv(&mut ws) => {
                    let Ok(f) = f else { break false };
                    match f.kind {
                        Some(server_frame::Kind::PublishAck(a)) => {
                            if pending.remove(&f.id).is_none() {
                                continue;
                            }
                            self.replies.acked.fetch_add(1, Relaxed);
                            if a.duplicate {
                                self.replies.duplicates.fetch_add(1, Relaxed);
                            }
                            // Only members who got in are owed the message.
                            let (to, away) = self.owed();
                            Counters::add(&counters.expected, to);
                            if away > 0 {
                                self.rec.add_counter("to_unconnected", away);
                            }
                        }
                        Some(server_frame::Kind::Error(e)) => {
                            self.replies.errors.fetch_add(1, Relaxed);
                            let Some(p) = pending.get_mut(&f.id) else { continue };
                            if conn::retryable_code(e.code) && p.retries < conn::PUBLISH_RETRIES {
                                let wait = conn::publish_retry_wait(p.retries);
                                p.retries += 1;
                                retry.push((Instant::now() + wait, f.id));
                            } else {
                                pending.remove(&f.id);
                                self.replies.refused.fetch_add(1, Relaxed);
                                self.rec.add_counter(&format!("refused_{}", e.code), 1);
                                eprintln!("publish refused: {} {}", e.code, e.message);
                            }
                        }
                        Some(server_frame::Kind::Delivery(d)) => {
                            let now = now_us();
                            // Own messages too: they keep the seqs contiguous.
                            let seen = tracker.observe(d.seq);
                            if d.sender == self.me {
                                continue;
                            }
                            match seen {
                                Seen::Duplicate => {
                                    Counters::add(&counters.duplicated, 1);
                                    continue;
                                }
                                Seen::Late => Counters::add(&counters.out_of_order, 1),
                                Seen::New => {}
                            }
                            Counters::add(&counters.received, 1);
                            last_delivery_us = now;
                            if let Some((sent, _)) = conn::stamp(&d.payload) {
                                if now.saturating_sub(sent) > self.window_us {
                                    Counters::add(&counters.late, 1);
                                }
                                samples.latency(CHAT, sent, now);
                            }
                        }
                        _ => {}
                    }
                }
            }
        };
        if !stopped {
            // Lost its socket: no longer owed what is acked from now on.
            self.connected[self.index].store(false, Relaxed);
            self.rec.add_counter("sockets_lost", 1);
        }
        if last_delivery_us > 0 {
            self.rec.latest("last_delivery", last_delivery_us);
        }
        Ok(())
    }

    /// Sends publish `id` (again: same client message id and stamp).
    async fn publish(&self, ws: &mut conn::Ws, id: u32, p: &Pending) -> anyhow::Result<()> {
        let publish = Publish {
            target: Some(publish::Target::Chat(self.chat.clone())),
            client_msg_id: format!("{}-{}", conn::run_tag(), p.m),
            payload: conn::stamped(32, p.sent_us, p.m),
        };
        let frame = ClientFrame {
            id,
            kind: Some(client_frame::Kind::Publish(publish)),
        };
        conn::send(ws, frame).await
    }

    /// (connected, not connected) other members now.
    fn owed(&self) -> (u64, u64) {
        let on = self
            .peers
            .iter()
            .filter(|&&p| self.connected[p].load(Relaxed))
            .count() as u64;
        (on, self.peers.len() as u64 - on)
    }
}

/// Chat-specific figures of a (merged) report.
pub(crate) fn figures(r: &Report) -> Map<String, Value> {
    let d = r.kinds.get("chat").cloned().unwrap_or_default();
    // From the first worker's start to the last one's end.
    let publish_secs = Report::span_secs(
        r.earliest_us.get("publish_start").copied().unwrap_or(0),
        r.latest_us.get("publish_end").copied().unwrap_or(0),
    )
    .unwrap_or(0.0);
    let router = r.server.router_cpu_seconds.filter(|c| *c > 0.0);
    let mut m = Map::new();
    m.insert(
        "users".into(),
        r.params.get("users").cloned().unwrap_or_default(),
    );
    m.insert(
        "group_size".into(),
        r.params.get("group_size").cloned().unwrap_or_default(),
    );
    m.insert(
        "edges".into(),
        json!(r.params.get("addr").and_then(Value::as_array).map(Vec::len)),
    );
    m.insert(
        "offered_messages_per_second".into(),
        r.params.get("rate").cloned().unwrap_or_default(),
    );
    m.insert("published".into(), json!(d.sent));
    m.insert("acked".into(), json!(r.counter("acked")));
    m.insert("unanswered".into(), json!(r.counter("unanswered")));
    m.insert("publish_errors".into(), json!(r.counter("publish_errors")));
    m.insert(
        "publish_duplicates".into(),
        json!(r.counter("publish_duplicates")),
    );
    m.insert(
        "dropped_by_generator".into(),
        json!(r.counter("dropped_by_generator")),
    );
    m.insert(
        "published_messages_per_second".into(),
        json!((publish_secs > 0.0).then(|| d.sent as f64 / publish_secs)),
    );
    let k = r
        .params
        .get("group_size")
        .and_then(Value::as_u64)
        .unwrap_or(2);
    let rate = r.params.get("rate").and_then(Value::as_u64).unwrap_or(0);
    m.insert(
        "offered_deliveries_per_second".into(),
        json!(rate * k.saturating_sub(1)),
    );
    m.insert(
        "achieved_deliveries_per_second".into(),
        json!(crate::accounting::delivery_rate(
            r,
            "publish_start",
            d.received
        )),
    );
    m.insert(
        "publish_retries".into(),
        json!(r.counter("publish_retries")),
    );
    m.insert("sockets_lost".into(), json!(r.counter("sockets_lost")));
    m.extend(crate::accounting::apart(r, &d));
    m.insert(
        "publishes_per_router_cpu_second".into(),
        // Acked publishes only: a publish that got no answer may or may not
        // have been sequenced, so this is a lower bound when routers fall
        // behind (unanswered > 0).
        json!(router.map(|c| r.counter("acked") as f64 / c)),
    );
    m
}
