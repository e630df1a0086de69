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
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::Context;
use serde_json::{Map, Value, json};
use switchboard_protocol::v1::{ClientFrame, Publish, client_frame, publish, server_frame};
use tokio::{
    sync::{Semaphore, mpsc, watch},
    time::Instant,
};

use crate::{
    conn,
    coord::Worker,
    recorder::{Counters, KERNEL_PREFIX, Recorder, SEQUENCED_PREFIX},
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

/// The report's `hists` name of how late socket tasks took their
/// operations (due → taken): the load generator's own backlog.
const GENERATOR_LAG: &str = "generator_lag";

/// Channel posts whose fan-out time is tracked one by one.
const MAX_TRACKED_POSTS: usize = 100_000;

mod plan;
mod socket;

use plan::{Live, Mix, Pending, Plan};
use socket::{Away, Cmd, User};

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
        connected: (0..plan.local()).map(|_| Default::default()).collect(),
        unanswered: AtomicU64::new(0),
        pending: Pending::default(),
    });
    let mut sources = a
        .target
        .sources(w.index, Duration::from_secs(a.timeout_secs));
    sources.kernel_stamps = true;
    let sources = Arc::new(sources);
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
        let (tx, rx) = mpsc::channel::<Instant>(4);
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
    // Connected, not just started: a user that watched an away user
    // before its Connect would see it offline, then get its online, a
    // change nobody sent (counted as duplicated).
    crate::coord::wait_settled(
        &mut ready_rx,
        plan.away_local(),
        a.timeout_secs,
        "away users",
    )
    .await?;
    let mut users = Vec::new();
    for u in 0..plan.local() {
        let permit = gate.clone().acquire_owned().await?;
        let (tx, rx) = mpsc::channel::<(Cmd, Instant)>(16);
        users.push(tx);
        let me = plan.name(u);
        let g = plan.group_of(u);
        let task = User {
            rec: rec.clone(),
            sources: sources.clone(),
            addr: a.target.addr_for((plan.users.start + u) as usize),
            token: conn::token(&a.target.secret, &me),
            me,
            index: u as usize,
            group: plan.group_name(g),
            group_index: g as usize,
            channel: a.channel.clone(),
            contacts: plan
                .contacts_of(u)
                .into_iter()
                .map(|c| (plan.name(c), c as usize))
                .collect(),
            watched: plan.watched_by(u),
            away_names: plan
                .watched_by(u)
                .into_iter()
                .map(|p| plan.away_name(p))
                .collect(),
            payload_bytes: a.payload_bytes,
            window_us: a.drain_secs * 1_000_000,
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
    crate::coord::wait_settled(&mut ready_rx, plan.local(), a.timeout_secs, "users").await?;
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
            // When the operation is due: a socket task that takes it
            // later says how far behind the load generator runs.
            let due = tick.tick().await;
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
                    .is_some_and(|tx| tx.try_send(due).is_ok())
            } else {
                let cmd = match kind {
                    DM => Cmd::Dm(next()),
                    GROUP => Cmd::Group,
                    RECEIPT => Cmd::Receipt(next()),
                    _ => Cmd::Typing,
                };
                users[(next() % plan.local()) as usize]
                    .try_send((cmd, due))
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
    while (!rec.all_complete() || live.unanswered.load(Relaxed) > 0) && Instant::now() < deadline {
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
        "window_ms": a.drain_secs * 1000,
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
        "publish_retries",
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
    // Two views of the same deliveries: `latency_ms` ends when a socket
    // task reads the frame, `kernel_latency_ms` when the kernel received
    // it; the difference is the frame's wait in the load generator.
    let kernel: Map<String, Value> = r
        .hists
        .iter()
        .filter_map(|(k, h)| Some((k.strip_prefix(KERNEL_PREFIX)?.to_owned(), h.summary())))
        .collect();
    let mut all = crate::report::Hist::fine();
    for (k, h) in &r.hists {
        if k.starts_with(KERNEL_PREFIX) {
            all.merge(h);
        }
    }
    if all.len() > 0 {
        m.insert("kernel_latency_ms".into(), all.summary());
        m.insert("kernel_latency_ms_by_kind".into(), Value::Object(kernel));
    }
    let sequenced: Map<String, Value> = r
        .hists
        .iter()
        .filter_map(|(k, h)| Some((k.strip_prefix(SEQUENCED_PREFIX)?.to_owned(), h.summary())))
        .collect();
    if !sequenced.is_empty() {
        m.insert(
            "sequenced_latency_ms_by_kind".into(),
            Value::Object(sequenced),
        );
    }
    if let Some(h) = r.hists.get(GENERATOR_LAG) {
        m.insert("generator_lag_ms".into(), h.summary());
    }
    let total = r.total();
    m.insert(
        "offered_operations_per_second".into(),
        r.params.get("rate").cloned().unwrap_or_default(),
    );
    m.insert(
        "achieved_deliveries_per_second".into(),
        json!(crate::accounting::delivery_rate(
            r,
            "ops_start",
            total.received
        )),
    );
    m.extend(crate::accounting::apart(r, &total));
    m
}
