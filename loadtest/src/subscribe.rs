//! Subscribe storm with chat authorization (ADR 0031): N users in groups,
//! the users of a group members of the same K chats; the memberships are
//! imported through the membership API (`POST /api/chats/<chat>/members`)
//! unless `--no-import`. Then R rounds, each: every user connects (a phase
//! apart), then subscribes to its K chats one request at a time, all users
//! at once, then every socket closes (reconnecting users). The first round
//! finds no allow cached on the edges ("cold"), the next ones find the
//! first round's ("warm", while the edges' cache TTL lasts). Per round:
//! subscribe latency at the client (request → reply), subscribes/s, edge
//! (router, Redis) CPU per subscribe over the subscribe phase, refusals
//! by error code and failures apart, and, where the edges' `/metrics`
//! are read (`--metrics-from`), how their chat authorization answered
//! (cache, store, mode), which says whether a round was cold or warm.
//!
//! The same scenario against edges in `--chat-auth open` mode (with
//! `--no-import`) is the baseline: the difference is the check's cost.
//!
//! With workers, whole groups are split among them; each worker imports
//! its groups' chats.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};
use switchboard_protocol::v1::{ClientFrame, Subscribe, client_frame, server_frame};
use tokio::sync::Semaphore;

use crate::{
    conn,
    coord::Worker,
    recorder::Recorder,
    report::{Hist, Report, now_us},
    sequence::{Api, metrics_text},
    sys::{Pids, Probe, cpu_seconds},
};

/// Kernel receive time of a reply, where [`conn::received_us`] has one.
const KERNEL: &str = "kernel";
/// Longest wait for the reply to one subscribe.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Retries of an import request answered 503 (the store was busy).
const IMPORT_RETRIES: u32 = 3;
/// The chat authorization counter every edge exports.
const AUTH_TOTAL: &str = "switchboard_edge_chat_auth_total";
/// The edges' lookup time of answers not in their cache (store or hook).
const AUTH_LOOKUP: &str = "switchboard_edge_chat_auth_lookup_seconds";
/// Sockets an edge holds now.
const CONNECTIONS: &str = "switchboard_edge_connections";

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    target: conn::Target,
    #[command(flatten)]
    pids: Pids,
    /// Redis process ids (every data node), comma-separated: their CPU
    /// time over each round's subscribes.
    #[arg(long = "redis-pids", value_delimiter = ',')]
    redis_pids: Vec<u32>,
    /// Users (over all workers), one socket each.
    #[arg(long, default_value_t = 10_000)]
    users: u32,
    /// Chats each user is a member of (and subscribes to).
    #[arg(long, default_value_t = 50)]
    chats_per_user: u32,
    /// Users per group; a group's users share the group's chats, so each
    /// chat has this many members.
    #[arg(long, default_value_t = 100)]
    group_size: u32,
    /// Rounds of connect, subscribe, disconnect: the first cold, the
    /// others warm.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=10))]
    rounds: u32,
    /// Where to import the memberships (a router's or edge's HTTP
    /// address, host:port); default the first `--addr`.
    #[arg(long)]
    api_addr: Option<SocketAddr>,
    /// The API key of the membership API (`SWITCHBOARD_API_KEY`).
    #[arg(long, default_value = "dev-key")]
    api_key: String,
    /// Import nothing (the chats' members are already there, or the edges
    /// do not check them: the `open` baseline).
    #[arg(long)]
    no_import: bool,
    /// Keep-alive HTTP connections the import is spread over (per worker).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    import_connections: u32,
    /// Edge HTTP addresses (host:port) whose `/metrics` are read around
    /// each round: how their chat authorization answered, and, after a
    /// round's sockets close, until they hold none.
    #[arg(long, value_delimiter = ',')]
    metrics_from: Vec<SocketAddr>,
    /// Users subscribing at once, each one request at a time (per
    /// worker); 0: all of them.
    #[arg(long, default_value_t = 0)]
    subscribing_users: u32,
    /// Pause after a round's sockets closed (and the edges let them go),
    /// before the next round connects.
    #[arg(long, default_value_t = 2)]
    settle_secs: u64,
    /// Longest each phase (import, connect, subscribe, close) may take.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

/// The shape of the population: who is in which chats.
#[derive(Clone, Copy)]
struct Shape {
    users: u64,
    per_user: u64,
    group: u64,
}

impl Shape {
    fn of(a: &Args) -> Shape {
        Shape {
            users: a.users as u64,
            per_user: a.chats_per_user.max(1) as u64,
            group: a.group_size.max(1) as u64,
        }
    }

    fn groups(&self) -> u64 {
        self.users.div_ceil(self.group)
    }

    /// Users of groups `groups`.
    fn users_of(&self, groups: &std::ops::Range<u64>) -> std::ops::Range<u64> {
        (groups.start * self.group).min(self.users)..(groups.end * self.group).min(self.users)
    }

    fn user(u: u64) -> String {
        format!("sub-u{u}")
    }

    /// Chat `j` of group `g`.
    fn chat(g: u64, j: u64) -> String {
        format!("sub-g{g}-c{j}")
    }

    /// The chats user `u` is a member of.
    fn chats_of(&self, u: u64) -> impl Iterator<Item = String> {
        let g = u / self.group;
        (0..self.per_user).map(move |j| Shape::chat(g, j))
    }
}

/// Counter names of round `r` (1-based).
fn key(r: u32, what: &str) -> String {
    format!("round{r}_{what}")
}

pub(crate) async fn run(a: Args, w: &Worker) -> anyhow::Result<Report> {
    let rec = Recorder::new(&[], 0);
    let shape = Shape::of(&a);
    let groups = w.slice(shape.groups());
    let mine = shape.users_of(&groups);
    let timeout = Duration::from_secs(a.timeout_secs);
    w.barrier("start", 0).await?;
    if !a.no_import {
        let api = a.api_addr.unwrap_or(a.target.addr[0]);
        let started = now_us();
        let added = import(&a, shape, &groups, api).await?;
        rec.earliest("import_start", started);
        rec.latest("import_end", now_us());
        rec.add_counter("memberships_added", added);
        rec.add_counter(
            "chats_imported",
            (groups.end - groups.start) * shape.per_user,
        );
    }
    w.barrier("imported", 0).await?;
    let mut sources = a.target.sources(w.index, timeout);
    // Reply latency to the kernel's receipt too: with thousands of sockets
    // on a few threads, a reply may wait for its socket task.
    sources.kernel_stamps = true;
    let sources = Arc::new(sources);
    let gate = Arc::new(Semaphore::new(a.target.concurrency));
    let mut server = Default::default();
    for r in 1..=a.rounds {
        let connect_before = Probe::take_if(w.is_first(), &a.pids);
        w.barrier(&format!("round-{r}"), 0).await?;
        // Connect: apart from the subscribes, and not measured as theirs.
        rec.earliest(&key(r, "connect_start"), now_us());
        let mut opens = Vec::with_capacity((mine.end - mine.start) as usize);
        for u in mine.clone() {
            let permit = gate.clone().acquire_owned().await?;
            let (rec, sources) = (rec.clone(), sources.clone());
            let addr = a.target.addr_for(u as usize);
            let token = conn::token(&a.target.secret, &Shape::user(u));
            opens.push(tokio::spawn(async move {
                let ws = conn::open_counted(&rec, addr, &sources, token).await;
                drop(permit);
                ws.map(|ws| (u, ws))
            }));
        }
        let mut sockets = Vec::with_capacity(opens.len());
        let deadline = tokio::time::Instant::now() + timeout;
        for t in opens {
            match tokio::time::timeout_at(deadline, t).await {
                Ok(Ok(Ok(s))) => sockets.push(s),
                Ok(Ok(Err(e))) => eprintln!("round {r}: user could not connect: {e:#}"),
                Ok(Err(e)) => eprintln!("round {r}: connect task failed: {e}"),
                Err(_) => bail!("round {r}: users still connecting after {timeout:?}"),
            }
        }
        rec.latest(&key(r, "connect_end"), now_us());
        let connected = sockets.len() as u64;
        rec.add_counter(&key(r, "connected"), connected);
        // What never connected is never sent: skipped, with its reason.
        let unconnected = (mine.end - mine.start) - connected;
        rec.add_counter(&key(r, "skipped"), unconnected * shape.per_user);
        eprintln!("round {r}: {connected} users connected");
        w.barrier(&format!("connected-{r}"), 0).await?;
        let before = Probe::take_if(w.is_first(), &a.pids);
        let redis_before = redis_cpu(w, &a.redis_pids);
        let auth_before = auth_readings(w, &a.metrics_from).await;
        w.barrier(&format!("probed-{r}"), 0).await?;
        rec.earliest(&key(r, "start"), now_us());
        let users_at_once = match a.subscribing_users {
            0 => sockets.len().max(1),
            n => n as usize,
        };
        let at_once = Arc::new(Semaphore::new(users_at_once));
        let tasks: Vec<_> = sockets
            .into_iter()
            .map(|(u, ws)| {
                let at_once = at_once.clone();
                let chats: Vec<String> = shape.chats_of(u).collect();
                tokio::spawn(async move {
                    let _turn = at_once.acquire_owned().await;
                    subscribe_all(ws, chats).await
                })
            })
            .collect();
        let mut tally = Tally::default();
        let mut kept = Vec::with_capacity(tasks.len());
        let deadline = tokio::time::Instant::now() + timeout;
        for t in tasks {
            match tokio::time::timeout_at(deadline, t).await {
                Ok(Ok((ws, t))) => {
                    kept.extend(ws);
                    tally.add(t);
                }
                Ok(Err(e)) => bail!("round {r}: subscribe task failed: {e}"),
                Err(_) => bail!("round {r}: users still subscribing after {timeout:?}"),
            }
        }
        tally.record(&rec, r);
        w.barrier(&format!("subscribed-{r}"), 0).await?;
        let after = Probe::take_if(w.is_first(), &a.pids);
        let redis_after = redis_cpu(w, &a.redis_pids);
        let auth_after = auth_readings(w, &a.metrics_from).await;
        if w.is_first() {
            let cpu_us = |c: Option<f64>| c.map(|c| (c.max(0.0) * 1e6) as u64);
            let window = [
                ("edge_cpu_us", Probe::edge_cpu_between(before, after)),
                ("router_cpu_us", Probe::router_cpu_between(before, after)),
                (
                    "edge_cpu_connect_us",
                    Probe::edge_cpu_between(connect_before, before),
                ),
                (
                    "redis_cpu_us",
                    redis_before.zip(redis_after).map(|(b, a)| a - b),
                ),
            ];
            for (what, cpu) in window {
                if let Some(us) = cpu_us(cpu) {
                    rec.add_counter(&key(r, what), us);
                }
            }
            match auth_before.zip(auth_after) {
                Some((b, a)) => {
                    for (k, v) in &a {
                        let d = (v - b.get(k).copied().unwrap_or(0.0)).max(0.0);
                        // Counters are whole numbers: the lookup time in µs.
                        let (k, d) = match k.as_str() {
                            "lookup_sum" => ("lookup_us".to_string(), d * 1e6),
                            _ => (k.clone(), d),
                        };
                        rec.add_counter(&key(r, &format!("auth_{k}")), d.round() as u64);
                    }
                }
                None if !a.metrics_from.is_empty() => rec.add_counter(&key(r, "metrics_unread"), 1),
                None => {}
            }
            if r == 1 {
                // The first round's readings stand for the run in `server`.
                rec.add_counter("sockets_at_probe", connected);
                server = Probe::server_apart(
                    (connect_before, after),
                    (connect_before, before),
                    (before, after),
                );
            }
        }
        // Reconnecting users: every socket goes, then the next round.
        drop(kept);
        if w.is_first() {
            drained(&a.metrics_from, timeout).await;
        }
        w.barrier(&format!("closed-{r}"), 0).await?;
        tokio::time::sleep(Duration::from_secs(a.settle_secs)).await;
    }
    if w.is_first()
        && let Some(mode) = auth_mode(&a.metrics_from).await
    {
        rec.add_counter(&format!("auth_mode_{mode}"), 1);
    }
    let params = json!({
        "addr": a.target.addr.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "users": a.users,
        "chats_per_user": shape.per_user,
        "group_size": shape.group,
        "rounds": a.rounds,
        "import": !a.no_import,
        "subscribing_users": a.subscribing_users,
        "metrics_read": a.metrics_from.len(),
        "redis_processes": a.redis_pids.len(),
    });
    Ok(rec.report("subscribe", params, server))
}

/// Redis CPU-seconds (all its data nodes) now, read by worker 0.
fn redis_cpu(w: &Worker, pids: &[u32]) -> Option<f64> {
    (w.is_first() && !pids.is_empty())
        .then(|| pids.iter().map(|p| cpu_seconds(*p)).sum::<Option<f64>>())
        .flatten()
}

/// Imports the members of `groups`' chats over keep-alive connections;
/// returns how many memberships were new. Any refusal but a busy store
/// (503, retried) fails the run: the rounds would measure something else.
async fn import(
    a: &Args,
    shape: Shape,
    groups: &std::ops::Range<u64>,
    api: SocketAddr,
) -> anyhow::Result<u64> {
    let chats: Arc<Vec<(String, std::ops::Range<u64>)>> = Arc::new(
        groups
            .clone()
            .flat_map(|g| {
                let members = shape.users_of(&(g..g + 1));
                (0..shape.per_user).map(move |j| (Shape::chat(g, j), members.clone()))
            })
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..a.import_connections.min(chats.len().max(1) as u32))
        .map(|_| {
            let (chats, next, key) = (chats.clone(), next.clone(), a.api_key.clone());
            tokio::spawn(async move {
                let mut api_conn = Api::connect(api)
                    .await
                    .with_context(|| format!("connecting to the membership API at {api}"))?;
                let mut added = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((chat, members)) = chats.get(i) else {
                        return anyhow::Ok(added);
                    };
                    let head = format!(
                        "POST /api/chats/{chat}/members HTTP/1.1\r\nHost: {api}\r\n\
                         Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                    );
                    let body = json!({
                        "add": members.clone().map(Shape::user).collect::<Vec<_>>(),
                    })
                    .to_string();
                    added += add_members(&mut api_conn, &head, &body, chat).await?;
                }
            })
        })
        .collect();
    let mut added = 0;
    for t in tasks {
        added += t.await.context("an import task failed")??;
    }
    eprintln!("imported {} chats, {added} memberships new", chats.len());
    Ok(added)
}

/// One import request, retried while the store answers 503.
async fn add_members(api: &mut Api, head: &str, body: &str, chat: &str) -> anyhow::Result<u64> {
    for attempt in 0.. {
        let (status, answer) = tokio::time::timeout(REPLY_TIMEOUT, api.post(head, body))
            .await
            .with_context(|| format!("importing {chat}: no answer within {REPLY_TIMEOUT:?}"))??;
        let answer: Value = serde_json::from_slice(answer).unwrap_or_default();
        match status {
            200 => return Ok(answer["added"].as_u64().unwrap_or(0)),
            503 if attempt < IMPORT_RETRIES => {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            _ => bail!("importing {chat}: HTTP {status}: {answer}"),
        }
    }
    unreachable!("the loop returns or fails")
}

/// What one user's subscribes came to.
#[derive(Default)]
struct Tally {
    ok: u64,
    /// Error replies by code (403 not a member, 503 the store did not
    /// answer, ...).
    refused: BTreeMap<u32, u64>,
    /// No reply: the socket failed or the reply timed out.
    failed: u64,
    /// Not sent: the user's socket had failed before.
    skipped: u64,
    /// Request → reply, µs.
    latency: Vec<u64>,
    /// Request → the reply in the kernel, µs.
    kernel: Vec<u64>,
    /// Unix µs of the last reply.
    last_us: u64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.ok += o.ok;
        for (code, n) in o.refused {
            *self.refused.entry(code).or_default() += n;
        }
        self.failed += o.failed;
        self.skipped += o.skipped;
        self.latency.extend(o.latency);
        self.kernel.extend(o.kernel);
        self.last_us = self.last_us.max(o.last_us);
    }

    fn record(&self, rec: &Recorder, r: u32) {
        rec.add_counter(&key(r, "ok"), self.ok);
        for (code, n) in &self.refused {
            rec.add_counter(&key(r, &format!("refused_{code}")), *n);
        }
        rec.add_counter(&key(r, "failed"), self.failed);
        rec.add_counter(&key(r, "skipped"), self.skipped);
        rec.sample_all(&key(r, "latency"), &self.latency);
        rec.sample_all(&key(r, KERNEL), &self.kernel);
        if self.last_us > 0 {
            rec.latest(&key(r, "end"), self.last_us);
        }
    }
}

/// Subscribes `ws` to `chats`, one request at a time; returns the socket
/// (held until the round ends, unless it failed) and what happened.
async fn subscribe_all(mut ws: conn::Ws, chats: Vec<String>) -> (Option<conn::Ws>, Tally) {
    let mut t = Tally::default();
    for (n, chat) in chats.iter().enumerate() {
        // Id 1 was the Connect.
        let id = n as u32 + 2;
        let frame = ClientFrame {
            id,
            kind: Some(client_frame::Kind::Subscribe(Subscribe {
                chat: chat.clone(),
                ..Default::default()
            })),
        };
        let sent = now_us();
        let reply = async {
            conn::send(&mut ws, frame).await?;
            loop {
                let f = conn::recv(&mut ws).await?;
                if f.id == id {
                    return anyhow::Ok(f);
                }
            }
        };
        let reply = match tokio::time::timeout(REPLY_TIMEOUT, reply).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                eprintln!("subscribe to {chat} failed: {e:#}");
                t.failed += 1;
                t.skipped += (chats.len() - n - 1) as u64;
                return (None, t);
            }
            Err(_) => {
                eprintln!("subscribe to {chat}: no reply within {REPLY_TIMEOUT:?}");
                t.failed += 1;
                t.skipped += (chats.len() - n - 1) as u64;
                return (None, t);
            }
        };
        let now = now_us();
        t.last_us = now;
        t.latency.push(now.saturating_sub(sent));
        if let Some(k) = conn::received_us(&ws) {
            t.kernel.push(k.min(now).saturating_sub(sent));
        }
        match reply.kind {
            Some(server_frame::Kind::SubscribeResult(_)) => t.ok += 1,
            Some(server_frame::Kind::Error(e)) => *t.refused.entry(e.code).or_default() += 1,
            other => {
                eprintln!("subscribe to {chat} answered with {other:?}");
                t.failed += 1;
            }
        }
    }
    (Some(ws), t)
}

/// Reads every edge's chat authorization counters (and lookup time),
/// summed over the edges: `{source}_{result}` → count, and the lookup
/// histogram's `lookup_sum` (seconds), `lookup_count`. None if an edge
/// did not answer.
async fn auth_readings(w: &Worker, from: &[SocketAddr]) -> Option<BTreeMap<String, f64>> {
    if !w.is_first() || from.is_empty() {
        return None;
    }
    let mut sum = BTreeMap::new();
    for addr in from {
        let text = metrics_text(*addr).await.ok()?;
        for (k, v) in auth_counts(&text) {
            *sum.entry(k).or_default() += v;
        }
    }
    Some(sum)
}

/// `source_result` → count of [`AUTH_TOTAL`], and the lookup histogram's
/// sum and count, from one node's metrics text.
fn auth_counts(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if let Some((labels, value)) = series(line, AUTH_TOTAL) {
            let (Some(source), Some(result)) = (label(labels, "source"), label(labels, "result"))
            else {
                continue;
            };
            *out.entry(format!("{source}_{result}")).or_default() += value;
        }
        for (suffix, name) in [("_sum", "lookup_sum"), ("_count", "lookup_count")] {
            if let Some((_, value)) = series(line, &format!("{AUTH_LOOKUP}{suffix}")) {
                *out.entry(name.to_string()).or_default() += value;
            }
        }
    }
    out
}

/// (labels, value) of a sample line of series `name`, labels without braces.
fn series<'a>(line: &'a str, name: &str) -> Option<(&'a str, f64)> {
    let rest = line.strip_prefix(name)?;
    let (labels, value) = match rest.strip_prefix('{') {
        Some(r) => r.split_once("} ")?,
        None => ("", rest.strip_prefix(' ')?),
    };
    Some((labels, value.split_whitespace().next()?.parse().ok()?))
}

/// The value of label `name` in `a="x",b="y"`.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"'))
    })
}

/// The edges' `--chat-auth` mode, from their mode gauge (the first that
/// says, if they agree; "mixed" if they do not).
async fn auth_mode(from: &[SocketAddr]) -> Option<String> {
    let mut modes = std::collections::BTreeSet::new();
    for addr in from {
        let text = metrics_text(*addr).await.ok()?;
        for line in text.lines() {
            if let Some((labels, v)) = series(line, "switchboard_edge_chat_auth_mode")
                && v > 0.0
                && let Some(m) = label(labels, "mode")
            {
                modes.insert(m.to_string());
            }
        }
    }
    match modes.len() {
        0 => None,
        1 => modes.pop_first(),
        _ => Some("mixed".into()),
    }
}

/// Waits until the edges hold no socket (they let the round's users go:
/// left their chats, dropped their sessions), at most `timeout`. Without
/// edges to read, returns at once.
async fn drained(from: &[SocketAddr], timeout: Duration) {
    if from.is_empty() {
        return;
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        let mut open = 0.0;
        for addr in from {
            let Ok(text) = metrics_text(*addr).await else {
                return;
            };
            open += text
                .lines()
                .filter_map(|l| series(l, CONNECTIONS))
                .map(|(_, v)| v)
                .sum::<f64>();
        }
        if open == 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the edges still held sockets {timeout:?} after the round closed its own");
}

/// Subscribe-specific figures of a (merged) report: one entry per round.
pub(crate) fn figures(r: &Report) -> Map<String, Value> {
    let p = |k: &str| r.params.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (users, per_user, group) = (p("users"), p("chats_per_user"), p("group_size").max(1));
    let rounds: Vec<Value> = (1..=p("rounds") as u32).map(|n| round(r, n)).collect();
    let mut m = Map::new();
    m.insert("users".into(), json!(users));
    m.insert("chats_per_user".into(), json!(per_user));
    m.insert("group_size".into(), json!(group));
    m.insert("chats".into(), json!(users.div_ceil(group) * per_user));
    m.insert("subscribes_per_round".into(), json!(users * per_user));
    let mode = r
        .counters
        .keys()
        .find_map(|k| k.strip_prefix("auth_mode_"))
        .map(str::to_owned);
    m.insert("edge_chat_auth".into(), json!(mode));
    if r.params.get("import").and_then(Value::as_bool) == Some(true) {
        let secs = Report::span_secs(
            r.earliest_us.get("import_start").copied().unwrap_or(0),
            r.latest_us.get("import_end").copied().unwrap_or(0),
        );
        let chats = r.counter("chats_imported");
        m.insert(
            "import".into(),
            json!({
                "chats": chats,
                "memberships": chats * group.min(users),
                "memberships_added": r.counter("memberships_added"),
                "seconds": secs,
                "chats_per_second": secs.filter(|s| *s > 0.0).map(|s| chats as f64 / s),
            }),
        );
    } else {
        m.insert("import".into(), Value::Null);
    }
    m.insert("rounds".into(), Value::Array(rounds));
    // The rounds' connect phases, not the whole run between them.
    let connecting: Option<f64> = (1..=p("rounds") as u32)
        .map(|n| {
            Report::span_secs(
                r.earliest_us
                    .get(&key(n, "connect_start"))
                    .copied()
                    .unwrap_or(0),
                r.latest_us
                    .get(&key(n, "connect_end"))
                    .copied()
                    .unwrap_or(0),
            )
        })
        .sum();
    if let Some(secs) = connecting {
        let c = &r.connections;
        m.insert(
            "connections".into(),
            json!({
                "attempted": c.attempted,
                "established": c.established,
                "failed": c.failed,
                "refused_with_503": c.refused_with_503,
                "refused_retried": r.refused_retried(),
                "not_connected": c.failed,
                "connect_seconds": secs,
                "connects_per_second": (secs > 0.0).then(|| c.established as f64 / secs),
            }),
        );
    }
    m
}

/// Figures of round `n`.
fn round(r: &Report, n: u32) -> Value {
    let c = |what: &str| r.counter(&key(n, what));
    let refused: Map<String, Value> = r
        .counters
        .iter()
        .filter_map(|(k, v)| {
            let code = k.strip_prefix(&key(n, "refused_"))?;
            Some((code.to_owned(), json!(v)))
        })
        .collect();
    let refused_total: u64 = refused.values().filter_map(Value::as_u64).sum();
    let answered = c("ok") + refused_total;
    let window = Report::span_secs(
        r.earliest_us.get(&key(n, "start")).copied().unwrap_or(0),
        r.latest_us.get(&key(n, "end")).copied().unwrap_or(0),
    );
    // CPU counters exist only where worker 0 read the processes.
    let cpu = |what: &str| r.counters.get(&key(n, what)).map(|us| *us as f64 / 1e6);
    // CPU-seconds per 1,000 answered subscribes (refusals cost too).
    let per_1000 = |cpu: Option<f64>| {
        cpu.filter(|_| answered > 0)
            .map(|c| c * 1000.0 / answered as f64)
    };
    let edge = cpu("edge_cpu_us");
    let redis = cpu("redis_cpu_us");
    let connected = c("connected");
    let connect_cpu = cpu("edge_cpu_connect_us");
    let auth: Map<String, Value> = r
        .counters
        .iter()
        .filter_map(|(k, v)| {
            let what = k.strip_prefix(&key(n, "auth_"))?;
            (!what.starts_with("lookup_")).then(|| (what.to_owned(), json!(v)))
        })
        .filter(|(_, v)| v.as_u64() != Some(0))
        .collect();
    let lookups = c("auth_lookup_count");
    let hist = |what: &str| {
        r.hists
            .get(&key(n, what))
            .cloned()
            .unwrap_or_else(Hist::fine)
            .summary()
    };
    let connect_secs = Report::span_secs(
        r.earliest_us
            .get(&key(n, "connect_start"))
            .copied()
            .unwrap_or(0),
        r.latest_us
            .get(&key(n, "connect_end"))
            .copied()
            .unwrap_or(0),
    );
    json!({
        "round": n,
        "cache": if n == 1 { "cold" } else { "warm" },
        "users_connected": connected,
        "connect_seconds": connect_secs,
        "subscribes_ok": c("ok"),
        "refused": refused,
        "failed": c("failed"),
        "skipped": c("skipped"),
        "window_seconds": window,
        "subscribes_per_second": window.filter(|s| *s > 0.0).map(|s| answered as f64 / s),
        "latency_ms": hist("latency"),
        "kernel_latency_ms": hist(KERNEL),
        "edge_cpu_seconds": edge,
        "edge_cpu_seconds_per_1000_subscribes": per_1000(edge),
        "edge_cpu_us_per_subscribe": per_1000(edge).map(|s| s * 1000.0),
        "router_cpu_seconds": cpu("router_cpu_us"),
        "redis_cpu_seconds": redis,
        "redis_cpu_seconds_per_1000_subscribes": per_1000(redis),
        "edge_cpu_connect_seconds": connect_cpu,
        "edge_cpu_us_per_connect": connect_cpu
            .filter(|_| connected > 0)
            .map(|c| c * 1e6 / connected as f64),
        "chat_auth": if r.params.get("metrics_read").and_then(Value::as_u64).unwrap_or(0) > 0
            && c("metrics_unread") == 0 {
            Value::Object(auth)
        } else {
            Value::Null
        },
        "chat_auth_lookup_ms_mean": (lookups > 0)
            .then(|| c("auth_lookup_us") as f64 / lookups as f64 / 1000.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_share_their_chats_and_split_whole() {
        let s = Shape {
            users: 250,
            per_user: 3,
            group: 100,
        };
        assert_eq!(s.groups(), 3);
        assert_eq!(s.users_of(&(1..3)), 100..250, "the last group is short");
        let of = |u| s.chats_of(u).collect::<Vec<_>>();
        assert_eq!(of(0), ["sub-g0-c0", "sub-g0-c1", "sub-g0-c2"]);
        assert_eq!(of(99), of(0));
        assert_eq!(of(100)[0], "sub-g1-c0");
        assert_eq!(of(249)[2], "sub-g2-c2");
    }

    #[test]
    fn the_edges_authorization_counters_are_read_by_label() {
        let text = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n\
            # TYPE switchboard_edge_chat_auth_total counter\n\
            switchboard_edge_chat_auth_total{source=\"cache\",result=\"allow\"} 7\n\
            switchboard_edge_chat_auth_total{result=\"allow\",source=\"store\"} 3\n\
            switchboard_edge_chat_auth_total{source=\"store\",result=\"deny\"} 0\n\
            switchboard_edge_chat_auth_lookup_seconds_sum 0.25\n\
            switchboard_edge_chat_auth_lookup_seconds_count 3\n\
            switchboard_edge_chat_auth_lookup_seconds{quantile=\"0.5\"} 0.001\n\
            switchboard_edge_connections 12\n\
            switchboard_edge_connections_max 19000\n";
        let c = auth_counts(text);
        assert_eq!(c["cache_allow"], 7.0);
        assert_eq!(c["store_allow"], 3.0, "labels in either order");
        assert_eq!(c["store_deny"], 0.0);
        assert_eq!((c["lookup_sum"], c["lookup_count"]), (0.25, 3.0));
        assert_eq!(c.len(), 5);
        let open: f64 = text
            .lines()
            .filter_map(|l| series(l, CONNECTIONS))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(open, 12.0, "not the _max gauge");
    }

    #[test]
    fn cpu_per_subscribe_counts_every_answer() {
        let mut r = Report {
            scenario: "subscribe".into(),
            params: json!({"users": 100, "chats_per_user": 10, "group_size": 50, "rounds": 2,
                           "import": false, "metrics_read": 1})
            .as_object()
            .cloned()
            .unwrap(),
            ..Default::default()
        };
        for (k, v) in [
            ("round1_ok", 900),
            ("round1_refused_403", 100),
            ("round1_edge_cpu_us", 500_000),
            ("round1_auth_store_allow", 900),
            ("round1_auth_store_deny", 100),
            ("round1_auth_cache_allow", 0),
            ("round1_auth_lookup_us", 2_000),
            ("round1_auth_lookup_count", 1000),
            ("round2_ok", 1000),
            ("round2_metrics_unread", 1),
            ("auth_mode_members", 1),
        ] {
            r.counters.insert(k.into(), v);
        }
        r.earliest_us.insert("round1_start".into(), 1_000_000);
        r.latest_us.insert("round1_end".into(), 3_000_000);
        let f = figures(&r);
        assert_eq!(f["chats"], 20);
        assert_eq!(f["edge_chat_auth"], "members");
        let cold = &f["rounds"][0];
        assert_eq!(cold["cache"], "cold");
        assert_eq!(cold["subscribes_per_second"], 500.0);
        assert_eq!(cold["edge_cpu_seconds_per_1000_subscribes"], 0.5);
        assert_eq!(cold["edge_cpu_us_per_subscribe"], 500.0);
        assert_eq!(
            cold["chat_auth"],
            json!({"store_allow": 900, "store_deny": 100})
        );
        assert_eq!(cold["chat_auth_lookup_ms_mean"], 0.002);
        let warm = &f["rounds"][1];
        assert_eq!(warm["cache"], "warm");
        assert_eq!(warm["edge_cpu_seconds"], Value::Null, "not read");
        assert_eq!(warm["chat_auth"], Value::Null, "an edge did not answer");
    }
}
