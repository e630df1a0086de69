//! A realistic mix of traffic on one set of sockets, at R operations/s
//! for D seconds:
//! - `dm`: a user publishes into a contact's personal stream;
//! - `group`: a user posts in its small group chat;
//! - `channel`: the owner of one big channel, which every user
//!   subscribes to, posts in it;
//! - `receipt`: a user marks what it received as read (to the group, or
//!   to the DM's sender);
//! - `typing`: a user is typing in its group;
//! - `presence`: one of a set of "away" users goes offline or comes back;
//!   users watch a few of them.
//!
//! Messages carry their send time; receipts, typing and presence carry
//! none, so their send times wait in a table (`Pending`) where the
//! receiver finds them. That table is per process, which is why, with
//! workers, everything but the channel stays inside one worker: a worker
//! has its own users, groups, contacts and away users. Worker 0 owns the
//! channel, which spans all workers.
use std::{
    collections::HashMap,
    net::SocketAddr,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::Context;
use serde_json::{Map, Value, json};
use switchboard_protocol::v1::{
    ClientFrame, Publish, Receipt, ReceiptKind, Subscribe, Typing, WatchPresence, client_frame,
    publish, receipt, server_frame,
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

const DM: usize = 0;
const GROUP: usize = 1;
const CHANNEL: usize = 2;
const RECEIPT: usize = 3;
const TYPING: usize = 4;
const PRESENCE: usize = 5;
const KINDS: [&str; 6] = ["dm", "group", "channel", "receipt", "typing", "presence"];

/// Channel posts whose fan-out time is tracked one by one.
const MAX_TRACKED_POSTS: usize = 100_000;

/// A user types in its group at most this often (apps throttle too).
const TYPING_EVERY: Duration = Duration::from_secs(1);

/// Shares of the rate, by kind.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Mix([f64; 6]);

impl FromStr for Mix {
    type Err = String;

    fn from_str(s: &str) -> Result<Mix, String> {
        let mut w = [0.0; 6];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected KIND=WEIGHT"))?;
            let i = KINDS
                .iter()
                .position(|n| *n == k.trim())
                .ok_or_else(|| format!("unknown kind {k:?} (kinds: {})", KINDS.join(", ")))?;
            let v: f64 = v.trim().parse().map_err(|e| format!("{part:?}: {e}"))?;
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{part:?}: weights are numbers >= 0"));
            }
            w[i] = v;
        }
        if w.iter().sum::<f64>() <= 0.0 {
            return Err("at least one weight must be above 0".into());
        }
        Ok(Mix(w))
    }
}

impl Mix {
    fn share(&self, kind: usize) -> f64 {
        self.0[kind] / self.0.iter().sum::<f64>()
    }
}

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: conn::Target,
    #[command(flatten)]
    pids: Pids,
    /// Users, one socket each (over all workers).
    #[arg(long, default_value_t = 10_000)]
    users: u32,
    /// Operations per second, all kinds and workers together.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Seconds of traffic.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Share of each kind in the rate (kinds: dm, group, channel, receipt,
    /// typing, presence; missing ones get 0).
    #[arg(
        long,
        default_value = "dm=40,group=30,receipt=15,typing=10,presence=4,channel=0.1"
    )]
    mix: Mix,
    /// Members of each group chat.
    #[arg(long, default_value_t = 8)]
    group_size: u32,
    /// DM contacts of each user.
    #[arg(long, default_value_t = 4)]
    dm_contacts: u32,
    /// Away users, who go offline and come back (over all workers).
    #[arg(long, default_value_t = 100)]
    presence_users: u32,
    /// Away users each user watches.
    #[arg(long, default_value_t = 2)]
    watches: u32,
    /// The big channel.
    #[arg(long, default_value = "mixed-all")]
    channel: String,
    /// Prefix of user names (`PREFIX-N`, `PREFIX-pN`, `PREFIX-owner`).
    #[arg(long, default_value = "mix")]
    user_prefix: String,
    /// Message payload size, bytes (at least 16).
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Longest wait for deliveries after the last operation.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
    /// Longest wait for every socket to connect and subscribe.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

/// Send times of events that carry none (receipts, typing, presence),
/// and how many receivers have yet to see each.
#[derive(Default)]
struct Pending(Mutex<HashMap<String, (u64, u64)>>);

impl Pending {
    fn expect(&self, key: String, sent_us: u64, receivers: u64) {
        if receivers > 0 {
            self.0
                .lock()
                .expect("pending lock")
                .insert(key, (sent_us, receivers));
        }
    }

    /// The send time of `key`, if a receiver was still due.
    fn arrive(&self, key: &str) -> Option<u64> {
        let mut m = self.0.lock().expect("pending lock");
        let (sent, left) = m.get_mut(key)?;
        let sent = *sent;
        *left -= 1;
        if *left == 0 {
            m.remove(key);
        }
        Some(sent)
    }
}

/// Who is who in one worker: users `users` (global numbers) in groups of
/// `group` consecutive users, each with DM contacts nearby on a ring and
/// watching a few away users.
struct Plan {
    prefix: String,
    users: std::ops::Range<u64>,
    group: u64,
    contacts: u64,
    away: std::ops::Range<u64>,
    watches: u64,
}

impl Plan {
    fn local(&self) -> u64 {
        self.users.end - self.users.start
    }

    fn away_local(&self) -> u64 {
        self.away.end - self.away.start
    }

    fn name(&self, u: u64) -> String {
        format!("{}-{}", self.prefix, self.users.start + u)
    }

    fn away_name(&self, p: u64) -> String {
        format!("{}-p{}", self.prefix, self.away.start + p)
    }

    fn group_of(&self, u: u64) -> u64 {
        u / self.group
    }

    fn group_name(&self, g: u64) -> String {
        // Named by its first member, so names are unique over workers.
        format!("{}-g{}", self.prefix, self.users.start + g * self.group)
    }

    fn groups(&self) -> u64 {
        self.local().div_ceil(self.group)
    }

    /// Local numbers of `u`'s contacts: u±1, u±2, ... on the ring.
    fn contacts_of(&self, u: u64) -> Vec<u64> {
        let n = self.local();
        let mut out = Vec::new();
        let mut d = 1;
        while (out.len() as u64) < self.contacts && d < n {
            for c in [(u + d) % n, (u + n - d) % n] {
                if c != u && !out.contains(&c) && (out.len() as u64) < self.contacts {
                    out.push(c);
                }
            }
            d += 1;
        }
        out
    }

    /// Local numbers of the away users `u` watches.
    fn watched_by(&self, u: u64) -> Vec<u64> {
        let p = self.away_local();
        (0..self.watches.min(p)).map(|j| (u + j) % p).collect()
    }
}

/// Who is actually up, so that expectations count only live receivers.
struct Live {
    /// Members of each group subscribed to it.
    group_members: Vec<AtomicU64>,
    /// Users watching each away user.
    watchers: Vec<AtomicU64>,
    /// Users subscribed to the channel.
    channel: AtomicU64,
    pending: Pending,
}

enum Cmd {
    Dm(u64),
    Group,
    Receipt(u64),
    Typing,
}

pub(crate) async fn run(a: Args, w: &Worker) -> anyhow::Result<Report> {
    let channel_rate = a.rate as f64 * a.mix.share(CHANNEL);
    let planned_posts = (channel_rate * a.duration_secs as f64).ceil() as usize;
    let rec = Recorder::new(&KINDS, (planned_posts + 16).min(MAX_TRACKED_POSTS));
    let mem_before = Probe::take_if(w.is_first(), &a.pids);
    w.barrier("start", 0).await?;
    let plan = Arc::new(Plan {
        prefix: a.user_prefix.clone(),
        users: w.slice(a.users as u64),
        group: a.group_size.max(2) as u64,
        contacts: a.dm_contacts as u64,
        away: w.slice(a.presence_users as u64),
        watches: a.watches as u64,
    });
    let live = Arc::new(Live {
        group_members: (0..plan.groups()).map(|_| AtomicU64::new(0)).collect(),
        watchers: (0..plan.away_local()).map(|_| AtomicU64::new(0)).collect(),
        channel: AtomicU64::new(0),
        pending: Pending::default(),
    });
    let sources = Arc::new(conn::Sources::new(a.target.sources, w.index));
    let gate = Arc::new(Semaphore::new(a.target.concurrency));
    let (stop_tx, stop) = watch::channel(false);
    // Away users stop after the users, so that their going offline at
    // the end is not mistaken for traffic.
    let (away_stop_tx, away_stop) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::channel::<bool>(1024);
    let executed = Arc::new(AtomicU64::new(0));
    let (mut away_tasks, mut user_tasks) = (Vec::new(), Vec::new());

    // Away users first, so that watchers start by seeing them online.
    let mut away = Vec::new();
    for p in 0..plan.away_local() {
        let permit = gate.clone().acquire_owned().await?;
        let (tx, rx) = mpsc::channel::<()>(4);
        away.push(tx);
        let name = plan.away_name(p);
        let task = Away {
            rec: rec.clone(),
            sources: sources.clone(),
            addr: a.target.addr_for((plan.away.start + p) as usize),
            token: conn::token(&a.target.secret, &name),
            name,
            index: p as usize,
            live: live.clone(),
            rx,
            stop: away_stop.clone(),
            ready: ready_tx.clone(),
            executed: executed.clone(),
        };
        away_tasks.push(tokio::spawn(async move {
            if let Err(e) = task.run(permit).await {
                eprintln!("away user gave up: {e:#}");
            }
        }));
    }
    let mut users = Vec::new();
    for u in 0..plan.local() {
        let permit = gate.clone().acquire_owned().await?;
        let (tx, rx) = mpsc::channel::<Cmd>(16);
        users.push(tx);
        let me = plan.name(u);
        let g = plan.group_of(u);
        let task = User {
            rec: rec.clone(),
            sources: sources.clone(),
            addr: a.target.addr_for((plan.users.start + u) as usize),
            token: conn::token(&a.target.secret, &me),
            me,
            group: plan.group_name(g),
            group_index: g as usize,
            channel: a.channel.clone(),
            contacts: plan
                .contacts_of(u)
                .into_iter()
                .map(|c| plan.name(c))
                .collect(),
            watched: plan.watched_by(u),
            away_names: plan
                .watched_by(u)
                .into_iter()
                .map(|p| plan.away_name(p))
                .collect(),
            payload_bytes: a.payload_bytes,
            live: live.clone(),
            ready: ready_tx.clone(),
            executed: executed.clone(),
        };
        let stop = stop.clone();
        user_tasks.push(tokio::spawn(async move {
            if let Err(e) = task.run(rx, stop, permit).await {
                eprintln!("user gave up: {e:#}");
            }
        }));
    }
    drop(ready_tx);
    let sockets = plan.local() + plan.away_local();
    let deadline = Instant::now() + Duration::from_secs(a.timeout_secs);
    let (mut ready, mut settled) = (0u64, 0u64);
    while settled < sockets {
        match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
            Ok(Some(ok)) => {
                settled += 1;
                ready += ok as u64;
            }
            Ok(None) => break,
            Err(_) => anyhow::bail!(
                "only {ready} of {sockets} sockets ready after {} s",
                a.timeout_secs
            ),
        }
    }
    eprintln!("{ready} of {sockets} sockets ready");
    rec.add_counter("users_ready", live.channel.load(Relaxed));
    w.barrier("ready", 0).await?;
    let mem_after = Probe::take_if(w.is_first(), &a.pids);
    let owner = w.is_first().then(|| {
        let (rec, sources, stop) = (rec.clone(), sources.clone(), stop.clone());
        let addr = a.target.addr[0];
        let token = conn::token(&a.target.secret, &format!("{}-owner", a.user_prefix));
        let (chat, payload, secs) = (a.channel.clone(), a.payload_bytes, a.duration_secs);
        tokio::spawn(async move {
            post_in_channel(
                &rec,
                &sources,
                addr,
                token,
                chat,
                payload,
                channel_rate,
                secs,
                stop,
            )
            .await
        })
    });

    // This worker's rate of each kind: its users' (or away users') share.
    let user_share = plan.local() as f64 / a.users.max(1) as f64;
    let away_share = plan.away_local() as f64 / a.presence_users.max(1) as f64;
    let mut rates = [0.0; 6];
    for k in [DM, GROUP, RECEIPT, TYPING] {
        rates[k] = a.rate as f64 * a.mix.share(k) * user_share;
    }
    rates[PRESENCE] = a.rate as f64 * a.mix.share(PRESENCE) * away_share;
    let total_rate: f64 = rates.iter().sum();
    rec.earliest("ops_start", now_us());
    let mut queued = 0u64;
    if total_rate > 0.0 && plan.local() > 0 {
        let ops = (total_rate * a.duration_secs as f64).round() as u64;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / total_rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (w.index as u64 + 1);
        let mut next = move || {
            // xorshift: cheap and deterministic.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        // Smooth weighted round robin: kinds interleave at their rates.
        let mut credit = [0.0; 6];
        let mut next_away = 0usize;
        for _ in 0..ops {
            tick.tick().await;
            for (c, r) in credit.iter_mut().zip(rates) {
                *c += r;
            }
            let kind = (0..6)
                .max_by(|x, y| credit[*x].total_cmp(&credit[*y]))
                .expect("six kinds");
            credit[kind] -= total_rate;
            let sent = if kind == PRESENCE {
                next_away = (next_away + 1) % away.len().max(1);
                away.get(next_away)
                    .is_some_and(|tx| tx.try_send(()).is_ok())
            } else {
                let cmd = match kind {
                    DM => Cmd::Dm(next()),
                    GROUP => Cmd::Group,
                    RECEIPT => Cmd::Receipt(next()),
                    _ => Cmd::Typing,
                };
                users[(next() % plan.local()) as usize]
                    .try_send(cmd)
                    .is_ok()
            };
            if sent {
                queued += 1;
            } else {
                rec.add_counter("dropped_by_generator", 1);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(a.drain_secs);
    while executed.load(Relaxed) < queued && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rec.latest("ops_end", now_us());
    let mut kept_owner = None;
    let mut posts = 0;
    if let Some(owner) = owner {
        let (ws, sent) = owner.await.context("channel owner task")??;
        kept_owner = Some(ws);
        posts = sent;
    }
    let posts = w.barrier("sent", posts).await?;
    Counters::add(
        &rec.kind(CHANNEL).expected,
        posts * live.channel.load(Relaxed),
    );
    let deadline = Instant::now() + Duration::from_secs(a.drain_secs);
    while !rec.all_complete() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop_tx.send(true);
    drop(users);
    for t in user_tasks {
        let _ = t.await;
    }
    let _ = away_stop_tx.send(true);
    drop(away);
    for t in away_tasks {
        let _ = t.await;
    }
    w.barrier("drained", 0).await?;
    let cpu_after = Probe::take_if(w.is_first(), &a.pids);
    drop(kept_owner);
    let params = json!({
        "addr": a.target.addr.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "users": a.users,
        "rate": a.rate,
        "duration_secs": a.duration_secs,
        "mix": KINDS.iter().enumerate().map(|(i, k)| (k.to_string(), json!(a.mix.share(i)))).collect::<Map<_, _>>(),
        "group_size": plan.group,
        "dm_contacts": a.dm_contacts,
        "presence_users": a.presence_users,
        "watches": a.watches,
        "channel": a.channel,
        "payload_bytes": a.payload_bytes.max(16),
    });
    let server = Probe::server((mem_before, mem_after), (mem_after, cpu_after));
    Ok(rec.report("mixed", params, server))
}

/// The channel owner: posts at `rate` for `secs`; returns its socket
/// (kept open until the end) and the number of posts.
#[allow(clippy::too_many_arguments)]
async fn post_in_channel(
    rec: &Recorder,
    sources: &conn::Sources,
    addr: SocketAddr,
    token: String,
    chat: String,
    payload: usize,
    rate: f64,
    secs: u64,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(conn::Ws, u64)> {
    let mut ws = conn::open_counted(rec, addr, sources, token)
        .await
        .context("connecting the channel owner")?;
    let total = (rate * secs as f64).ceil() as u64;
    if total == 0 {
        return Ok((ws, 0));
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let counters = rec.kind(CHANNEL);
    let mut sent = 0u64;
    while sent < total {
        tokio::select! {
            _ = tick.tick() => {
                let p = Publish {
                    target: Some(publish::Target::Chat(chat.clone())),
                    client_msg_id: format!("{}-{sent}", conn::run_tag()),
                    payload: conn::stamped(payload, now_us(), sent),
                };
                let frame = ClientFrame { id: 10 + sent as u32, kind: Some(client_frame::Kind::Publish(p)) };
                conn::send(&mut ws, frame).await?;
                sent += 1;
                Counters::add(&counters.sent, 1);
            }
            f = conn::recv(&mut ws) => note_reply(rec, &f.context("channel owner socket")?),
            _ = crate::coord::stopped(&mut stop) => break,
        }
    }
    Ok((ws, sent))
}

/// Counts acks and refusals of requests.
fn note_reply(rec: &Recorder, f: &switchboard_protocol::v1::ServerFrame) {
    match &f.kind {
        Some(server_frame::Kind::PublishAck(a)) => {
            rec.add_counter("acked", 1);
            if a.duplicate {
                rec.add_counter("publish_duplicates", 1);
            }
        }
        Some(server_frame::Kind::Error(e)) => {
            rec.add_counter("request_errors", 1);
            eprintln!("request {} refused: {} {}", f.id, e.code, e.message);
        }
        _ => {}
    }
}

/// One user's socket.
struct User {
    rec: Arc<Recorder>,
    sources: Arc<conn::Sources>,
    addr: SocketAddr,
    token: String,
    me: String,
    group: String,
    group_index: usize,
    channel: String,
    contacts: Vec<String>,
    watched: Vec<u64>,
    away_names: Vec<String>,
    payload_bytes: usize,
    live: Arc<Live>,
    ready: mpsc::Sender<bool>,
    executed: Arc<AtomicU64>,
}

/// Highest seq received in a stream and the last one marked read.
#[derive(Default, Clone, Copy)]
struct Unread {
    highest: u64,
    read: u64,
}

impl User {
    async fn setup(&self) -> anyhow::Result<conn::Ws> {
        let mut ws =
            conn::open_counted(&self.rec, self.addr, &self.sources, self.token.clone()).await?;
        for (id, chat) in [(1, &self.group), (2, &self.channel)] {
            let sub = Subscribe {
                chat: chat.clone(),
                ..Default::default()
            };
            let frame = ClientFrame {
                id,
                kind: Some(client_frame::Kind::Subscribe(sub)),
            };
            conn::request(&mut ws, frame)
                .await
                .with_context(|| format!("subscribing to {chat}"))?;
        }
        if !self.away_names.is_empty() {
            let frame = ClientFrame {
                id: 3,
                kind: Some(client_frame::Kind::WatchPresence(WatchPresence {
                    users: self.away_names.clone(),
                })),
            };
            conn::request(&mut ws, frame)
                .await
                .context("watching presence")?;
            // The current state of each follows the reply; it is no change.
            let mut left = self.away_names.len();
            let initial = async {
                while left > 0 {
                    if let Some(server_frame::Kind::Presence(_)) = conn::recv(&mut ws).await?.kind {
                        left -= 1;
                    }
                }
                anyhow::Ok(())
            };
            tokio::time::timeout(Duration::from_secs(30), initial)
                .await
                .context("no initial presence")??;
        }
        Ok(ws)
    }

    async fn run(
        self,
        mut rx: mpsc::Receiver<Cmd>,
        mut stop: watch::Receiver<bool>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> anyhow::Result<()> {
        let ws = self.setup().await;
        drop(permit);
        if ws.is_ok() {
            self.live.group_members[self.group_index].fetch_add(1, Relaxed);
            self.live.channel.fetch_add(1, Relaxed);
            for p in &self.watched {
                self.live.watchers[*p as usize].fetch_add(1, Relaxed);
            }
        }
        let _ = self.ready.send(ws.is_ok()).await;
        let mut ws = ws?;
        let mut samples = self.rec.samples();
        let (mut personal, mut group, mut channel) =
            (Tracker::default(), Tracker::default(), Tracker::default());
        let mut dm_unread: HashMap<String, Unread> = HashMap::new();
        let mut group_unread = Unread::default();
        let mut last_typing: Option<Instant> = None;
        let mut next_id = 10u32;
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = crate::coord::stopped(&mut stop) => break,
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    next_id = next_id.wrapping_add(1).max(10);
                    n += 1;
                    let frame = self.command(cmd, next_id, n, &mut dm_unread, &mut group_unread, &mut last_typing);
                    if let Some(frame) = frame {
                        conn::send(&mut ws, frame).await?;
                    }
                    self.executed.fetch_add(1, Relaxed);
                }
                f = conn::recv(&mut ws) => {
                    let Ok(f) = f else { break };
                    let now = now_us();
                    let kind = f.kind.as_ref();
                    match kind {
                        Some(server_frame::Kind::Delivery(d)) => {
                            let (k, tracker) = if !d.user.is_empty() {
                                (DM, &mut personal)
                            } else if d.chat == self.group {
                                (GROUP, &mut group)
                            } else if d.chat == self.channel {
                                (CHANNEL, &mut channel)
                            } else {
                                continue;
                            };
                            // Own group posts too: they keep the seqs contiguous.
                            let seen = tracker.observe(d.seq);
                            if d.sender == self.me {
                                continue;
                            }
                            let c = self.rec.kind(k);
                            match seen {
                                Seen::Duplicate => {
                                    Counters::add(&c.duplicated, 1);
                                    continue;
                                }
                                Seen::Late => Counters::add(&c.out_of_order, 1),
                                Seen::New => {}
                            }
                            Counters::add(&c.received, 1);
                            let Some((sent, post)) = conn::stamp(&d.payload) else { continue };
                            samples.latency(k, sent, now);
                            match k {
                                DM => {
                                    let u = dm_unread.entry(d.sender.clone()).or_default();
                                    u.highest = u.highest.max(d.seq);
                                }
                                GROUP => group_unread.highest = group_unread.highest.max(d.seq),
                                _ => self.rec.post_delivered(post, sent, now),
                            }
                        }
                        Some(server_frame::Kind::Receipt(r)) => {
                            if r.from == self.me {
                                continue;
                            }
                            let key = if r.chat.is_empty() {
                                format!("@{}|{}|{}", self.me, r.from, r.seq)
                            } else {
                                format!("{}|{}|{}", r.chat, r.from, r.seq)
                            };
                            self.ephemeral(RECEIPT, &key, now, &mut samples);
                        }
                        Some(server_frame::Kind::Typing(t)) => {
                            if t.user == self.me {
                                continue;
                            }
                            self.ephemeral(TYPING, &format!("{}|{}", t.chat, t.user), now, &mut samples);
                        }
                        Some(server_frame::Kind::Presence(p)) => {
                            let key = format!("{}|{}", p.user, p.online);
                            self.ephemeral(PRESENCE, &key, now, &mut samples);
                        }
                        _ => note_reply(&self.rec, &f),
                    }
                }
            }
        }
        Ok(())
    }

    /// An unsequenced event arrived: find when it was sent.
    fn ephemeral(&self, kind: usize, key: &str, now: u64, samples: &mut crate::recorder::Batch) {
        let c = self.rec.kind(kind);
        match self.live.pending.arrive(key) {
            Some(sent) => {
                Counters::add(&c.received, 1);
                samples.latency(kind, sent, now);
            }
            // Seen already by everyone due, or never sent.
            None => Counters::add(&c.duplicated, 1),
        }
    }

    /// The frame a command turns into, counting what it should cause.
    fn command(
        &self,
        cmd: Cmd,
        id: u32,
        n: u64,
        dm_unread: &mut HashMap<String, Unread>,
        group_unread: &mut Unread,
        last_typing: &mut Option<Instant>,
    ) -> Option<ClientFrame> {
        let now = now_us();
        let others = self.live.group_members[self.group_index]
            .load(Relaxed)
            .saturating_sub(1);
        let client_msg_id = format!("{}-{n}", conn::run_tag());
        let kind = match cmd {
            Cmd::Dm(pick) => {
                if self.contacts.is_empty() {
                    self.rec.add_counter("dm_skipped", 1);
                    return None;
                }
                let to = &self.contacts[(pick % self.contacts.len() as u64) as usize];
                let c = self.rec.kind(DM);
                Counters::add(&c.sent, 1);
                Counters::add(&c.expected, 1);
                client_frame::Kind::Publish(Publish {
                    target: Some(publish::Target::User(to.clone())),
                    client_msg_id,
                    payload: conn::stamped(self.payload_bytes, now, 0),
                })
            }
            Cmd::Group => {
                let c = self.rec.kind(GROUP);
                Counters::add(&c.sent, 1);
                Counters::add(&c.expected, others);
                client_frame::Kind::Publish(Publish {
                    target: Some(publish::Target::Chat(self.group.clone())),
                    client_msg_id,
                    payload: conn::stamped(self.payload_bytes, now, 0),
                })
            }
            Cmd::Receipt(pick) => {
                // Only where something is unread, as an app would.
                let mut due: Vec<Option<&String>> = dm_unread
                    .iter()
                    .filter(|(_, u)| u.highest > u.read)
                    .map(|(s, _)| Some(s))
                    .collect();
                if group_unread.highest > group_unread.read {
                    due.push(None);
                }
                if due.is_empty() {
                    self.rec.add_counter("receipt_skipped", 1);
                    return None;
                }
                due.sort();
                let c = self.rec.kind(RECEIPT);
                let (target, seq, key, receivers) = match due[(pick % due.len() as u64) as usize] {
                    Some(sender) => {
                        let sender = sender.clone();
                        let u = dm_unread.get_mut(&sender).expect("listed above");
                        u.read = u.highest;
                        let key = format!("@{sender}|{}|{}", self.me, u.highest);
                        (receipt::Target::User(sender), u.highest, key, 1)
                    }
                    None => {
                        group_unread.read = group_unread.highest;
                        let seq = group_unread.highest;
                        let key = format!("{}|{}|{seq}", self.group, self.me);
                        (receipt::Target::Chat(self.group.clone()), seq, key, others)
                    }
                };
                self.live.pending.expect(key, now, receivers);
                Counters::add(&c.sent, 1);
                Counters::add(&c.expected, receivers);
                client_frame::Kind::Receipt(Receipt {
                    target: Some(target),
                    seq,
                    kind: ReceiptKind::Read as i32,
                })
            }
            Cmd::Typing => {
                if last_typing.is_some_and(|t| t.elapsed() < TYPING_EVERY) {
                    self.rec.add_counter("typing_skipped", 1);
                    return None;
                }
                *last_typing = Some(Instant::now());
                let key = format!("{}|{}", self.group, self.me);
                self.live.pending.expect(key, now, others);
                let c = self.rec.kind(TYPING);
                Counters::add(&c.sent, 1);
                Counters::add(&c.expected, others);
                // Id 0: no reply wanted.
                return Some(ClientFrame {
                    id: 0,
                    kind: Some(client_frame::Kind::Typing(Typing {
                        chat: self.group.clone(),
                    })),
                });
            }
        };
        Some(ClientFrame {
            id,
            kind: Some(kind),
        })
    }
}

/// An away user: online until told to go, then back when told again.
struct Away {
    rec: Arc<Recorder>,
    sources: Arc<conn::Sources>,
    addr: SocketAddr,
    token: String,
    name: String,
    index: usize,
    live: Arc<Live>,
    rx: mpsc::Receiver<()>,
    stop: watch::Receiver<bool>,
    ready: mpsc::Sender<bool>,
    executed: Arc<AtomicU64>,
}

impl Away {
    async fn run(mut self, permit: tokio::sync::OwnedSemaphorePermit) -> anyhow::Result<()> {
        let ws = conn::open_counted(&self.rec, self.addr, &self.sources, self.token.clone()).await;
        drop(permit);
        let _ = self.ready.send(ws.is_ok()).await;
        let mut ws = Some(ws?);
        let c = self.rec.kind(PRESENCE);
        loop {
            let read = async {
                match ws.as_mut() {
                    Some(ws) => conn::recv(ws).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = crate::coord::stopped(&mut self.stop) => break,
                cmd = self.rx.recv() => {
                    if cmd.is_none() {
                        break;
                    }
                    let watchers = self.live.watchers[self.index].load(Relaxed);
                    let online = ws.is_none();
                    self.live.pending.expect(format!("{}|{online}", self.name), now_us(), watchers);
                    Counters::add(&c.sent, 1);
                    Counters::add(&c.expected, watchers);
                    match ws.take() {
                        Some(old) => conn::close(old).await,
                        // Not in `connections`, which is about the initial population.
                        None => match conn::open(self.addr, &self.sources, self.token.clone()).await {
                            Ok(new) => {
                                self.rec.add_counter("away_reconnects", 1);
                                ws = Some(new);
                            }
                            Err(e) => {
                                self.rec.add_counter("away_reconnects_failed", 1);
                                eprintln!("away user {} could not come back: {e:#}", self.name);
                            }
                        },
                    }
                    self.executed.fetch_add(1, Relaxed);
                }
                f = read => {
                    if f.is_err() {
                        eprintln!("away user {} lost its socket", self.name);
                        ws = None;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Mixed-specific figures of a (merged) report.
pub(crate) fn figures(r: &Report) -> Map<String, Value> {
    let ops: u64 = r.kinds.values().map(|d| d.sent).sum();
    let secs = Report::span_secs(
        r.earliest_us.get("ops_start").copied().unwrap_or(0),
        r.latest_us.get("ops_end").copied().unwrap_or(0),
    );
    let mut m = Map::new();
    m.insert("users_ready".into(), json!(r.counter("users_ready")));
    m.insert("operations".into(), json!(ops));
    m.insert(
        "operations_per_second".into(),
        json!(secs.filter(|s| *s > 0.0).map(|s| ops as f64 / s)),
    );
    for k in [
        "acked",
        "publish_duplicates",
        "request_errors",
        "dropped_by_generator",
        "away_reconnects",
        "away_reconnects_failed",
        "dm_skipped",
        "receipt_skipped",
        "typing_skipped",
    ] {
        m.insert(k.into(), json!(r.counter(k)));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_parses_with_missing_kinds_as_zero() {
        let m: Mix = "dm=3, group=1".parse().unwrap();
        assert_eq!(m.share(DM), 0.75);
        assert_eq!(m.share(GROUP), 0.25);
        assert_eq!(m.share(PRESENCE), 0.0);
        assert!("dm=1,sms=2".parse::<Mix>().is_err());
        assert!("dm=0".parse::<Mix>().is_err());
        assert!("dm=-1,group=2".parse::<Mix>().is_err());
        assert!("dm".parse::<Mix>().is_err());
    }

    fn plan(users: std::ops::Range<u64>, away: std::ops::Range<u64>) -> Plan {
        Plan {
            prefix: "m".into(),
            users,
            group: 4,
            contacts: 4,
            away,
            watches: 2,
        }
    }

    #[test]
    fn contacts_are_distinct_neighbours_and_mutual() {
        let p = plan(100..110, 0..3);
        for u in 0..10 {
            let c = p.contacts_of(u);
            assert_eq!(c.len(), 4, "{u}: {c:?}");
            assert!(!c.contains(&u));
            for v in &c {
                assert!(p.contacts_of(*v).contains(&u), "{u} and {v}");
            }
        }
        // Fewer users than contacts: everyone else.
        let small = plan(0..3, 0..1);
        assert_eq!(small.contacts_of(0), [1, 2]);
        assert!(plan(0..1, 0..1).contacts_of(0).is_empty());
    }

    #[test]
    fn names_are_global_so_workers_do_not_collide() {
        let a = plan(0..10, 0..2);
        let b = plan(10..20, 2..4);
        assert_eq!(a.name(9), "m-9");
        assert_eq!(b.name(0), "m-10");
        assert_eq!(b.away_name(0), "m-p2");
        assert_eq!(a.group_name(a.group_of(9)), "m-g8");
        assert_eq!(b.group_name(b.group_of(0)), "m-g10");
        assert_eq!(a.groups(), 3, "10 users in groups of 4");
        assert_eq!(b.watched_by(1), [1, 0]);
    }

    #[test]
    fn pending_events_match_each_due_receiver_once() {
        let p = Pending::default();
        p.expect("k".into(), 5, 2);
        p.expect("none".into(), 5, 0);
        assert_eq!(p.arrive("k"), Some(5));
        assert_eq!(p.arrive("k"), Some(5));
        assert_eq!(p.arrive("k"), None);
        assert_eq!(p.arrive("none"), None);
    }
}
