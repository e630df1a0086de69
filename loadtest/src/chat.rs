//! N users in chats of K members, R messages/s in total from random
//! members; every other member measures publish-to-receive latency. Users
//! alternate between the given edges, so most deliveries cross edges.
//!
//! With workers, whole chats are split among them (a chat's members live
//! in one worker), so each worker knows what its members should receive.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
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

/// Longest wait for deliveries after the last publish.
const DRAIN: Duration = Duration::from_secs(10);

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
    let mut senders = Vec::with_capacity((mine.end - mine.start) as usize);
    let mut tasks = Vec::new();
    for i in mine.clone() {
        let permit = gate.clone().acquire_owned().await?;
        let (tx, rx) = mpsc::channel::<u64>(64);
        senders.push(tx);
        let g = i / k;
        let member = Member {
            rec: rec.clone(),
            sources: sources.clone(),
            addr: a.target.addr_for(i as usize),
            me: format!("chat-{i}"),
            chat: format!("g{g}"),
            others: members(g, k, users).count() as u64 - 1,
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
    let local = mine.end - mine.start;
    crate::coord::wait_settled(&mut ready_rx, local, a.timeout_secs, "users").await?;
    w.barrier("subscribed", 0).await?;
    let mem_after = Probe::take_if(w.is_first(), &a.pids);
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
    // answered, and everything it should cause arrived.
    let deadline = Instant::now() + DRAIN;
    let chat = rec.kind(CHAT);
    let answered = || replies.acked.load(Relaxed) + replies.errors.load(Relaxed);
    while (Counters::get(&chat.sent) < queued || answered() < queued || !chat.complete())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rec.add_counter("acked", replies.acked.load(Relaxed));
    rec.add_counter("publish_errors", replies.errors.load(Relaxed));
    rec.add_counter("publish_duplicates", replies.duplicates.load(Relaxed));
    let _ = stop_tx.send(true);
    drop(senders);
    for t in tasks {
        let _ = t.await;
    }
    w.barrier("drained", 0).await?;
    let cpu_after = Probe::take_if(w.is_first(), &a.pids);
    let params = json!({
        "addr": a.target.addr.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "users": a.users,
        "group_size": k,
        "rate": a.rate,
        "duration_secs": a.duration_secs,
    });
    let server = Probe::server((mem_before, mem_after), (mem_after, cpu_after));
    Ok(rec.report("chat", params, server))
}

/// Answers to publishes, over all users.
#[derive(Default)]
struct Replies {
    acked: AtomicU64,
    /// Acks saying the message was taken for a retry of an earlier one.
    duplicates: AtomicU64,
    errors: AtomicU64,
}

/// One user: publishes when told to, counts what its chat delivers.
struct Member {
    rec: Arc<Recorder>,
    sources: Arc<conn::Sources>,
    addr: SocketAddr,
    me: String,
    chat: String,
    /// Members who receive each of this user's messages.
    others: u64,
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
        let _ = self.ready.send(ws.is_ok()).await;
        let mut ws = ws?;
        let counters = self.rec.kind(CHAT);
        let mut samples = self.rec.samples();
        let mut tracker = Tracker::default();
        loop {
            tokio::select! {
                _ = crate::coord::stopped(&mut self.stop) => break,
                m = self.rx.recv() => {
                    let Some(m) = m else { break };
                    let p = Publish {
                        target: Some(publish::Target::Chat(self.chat.clone())),
                        client_msg_id: format!("{}-{m}", conn::run_tag()),
                        payload: conn::stamped(32, now_us(), m),
                    };
                    let frame = ClientFrame { id: 2 + m as u32, kind: Some(client_frame::Kind::Publish(p)) };
                    conn::send(&mut ws, frame).await?;
                    Counters::add(&counters.sent, 1);
                    Counters::add(&counters.expected, self.others);
                }
                f = conn::recv(&mut ws) => {
                    let Ok(f) = f else { break };
                    match f.kind {
                        Some(server_frame::Kind::PublishAck(a)) => {
                            self.replies.acked.fetch_add(1, Relaxed);
                            if a.duplicate {
                                self.replies.duplicates.fetch_add(1, Relaxed);
                            }
                        }
                        Some(server_frame::Kind::Error(e)) => {
                            self.replies.errors.fetch_add(1, Relaxed);
                            eprintln!("publish refused: {} {}", e.code, e.message);
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
                            if let Some((sent, _)) = conn::stamp(&d.payload) {
                                samples.latency(CHAT, sent, now);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
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
        "achieved_messages_per_second".into(),
        json!((publish_secs > 0.0).then(|| d.sent as f64 / publish_secs)),
    );
    m.insert(
        "publishes_per_router_cpu_second".into(),
        json!(router.map(|c| d.sent as f64 / c)),
    );
    m
}
