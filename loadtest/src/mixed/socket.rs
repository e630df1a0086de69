//! The sockets of `mixed`: users, who act on commands and account for
//! what reaches them, and away users, who go offline and come back.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use anyhow::Context;
use switchboard_protocol::v1::{
    ClientFrame, Publish, Receipt, ReceiptKind, Subscribe, Typing, WatchPresence, client_frame,
    publish, receipt, server_frame,
};
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};

use super::{CHANNEL, DM, GENERATOR_LAG, GROUP, Live, PRESENCE, RECEIPT, TYPING, note_reply};
use crate::{
    accounting::{Seen, Tracker},
    conn,
    recorder::{Counters, Recorder},
    report::now_us,
};

/// A user types in its group at most this often (apps throttle too).
const TYPING_EVERY: Duration = Duration::from_secs(1);

/// What a publish owes once acked: (kind, deliveries to connected
/// receivers, to unconnected ones).
type Owes = (usize, u64, u64);

/// A publish not yet answered for good: owed deliveries count once acked.
struct Owed {
    frame: ClientFrame,
    kind: usize,
    /// Deliveries owed to connected receivers, and to unconnected ones.
    owed: u64,
    away: u64,
    retries: u32,
}

/// What the scheduler tells a user to do.
pub(super) enum Cmd {
    Dm(u64),
    Group,
    Receipt(u64),
    Typing,
}

/// One user's socket.
pub(super) struct User {
    pub(super) rec: Arc<Recorder>,
    pub(super) sources: Arc<conn::Sources>,
    pub(super) addr: SocketAddr,
    pub(super) token: String,
    pub(super) me: String,
    /// This user's index among the worker's users.
    pub(super) index: usize,
    pub(super) group: String,
    pub(super) group_index: usize,
    pub(super) channel: String,
    /// (name, index among the worker's users).
    pub(super) contacts: Vec<(String, usize)>,
    pub(super) watched: Vec<u64>,
    pub(super) away_names: Vec<String>,
    pub(super) payload_bytes: usize,
    /// Deliveries later than this after their send are late.
    pub(super) window_us: u64,
    pub(super) live: Arc<Live>,
    pub(super) ready: mpsc::Sender<bool>,
    pub(super) executed: Arc<AtomicU64>,
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

    pub(super) async fn run(
        self,
        mut rx: mpsc::Receiver<(Cmd, Instant)>,
        mut stop: watch::Receiver<bool>,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> anyhow::Result<()> {
        let ws = self.setup().await;
        drop(permit);
        if ws.is_ok() {
            self.live.connected[self.index].store(true, Relaxed);
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
        let mut publishes: HashMap<u32, Owed> = HashMap::new();
        // (when, frame id) of publishes to send again.
        let mut retry: Vec<(Instant, u32)> = Vec::new();
        let mut last_delivery_us = 0;
        loop {
            let next_retry = retry.iter().map(|r| r.0).min();
            tokio::select! {
                _ = crate::coord::stopped(&mut stop) => break,
                _ = tokio::time::sleep_until(next_retry.unwrap_or_else(Instant::now)), if next_retry.is_some() => {
                    let now = Instant::now();
                    let due: Vec<u32> = retry.iter().filter(|r| r.0 <= now).map(|r| r.1).collect();
                    retry.retain(|r| r.0 > now);
                    for id in due {
                        let Some(p) = publishes.get(&id) else { continue };
                        self.rec.add_counter("publish_retries", 1);
                        conn::send(&mut ws, p.frame.clone()).await?;
                    }
                }
                cmd = rx.recv() => {
                    let Some((cmd, due)) = cmd else { break };
                    self.rec.sample(GENERATOR_LAG, due.elapsed().as_micros() as u64);
                    next_id = next_id.wrapping_add(1).max(10);
                    n += 1;
                    let frame = self.command(cmd, next_id, n, &mut dm_unread, &mut group_unread, &mut last_typing);
                    if let Some((frame, owed)) = frame {
                        if let Some((kind, owed, away)) = owed {
                            let o = Owed { frame: frame.clone(), kind, owed, away, retries: 0 };
                            publishes.insert(frame.id, o);
                            self.live.unanswered.fetch_add(1, Relaxed);
                        }
                        conn::send(&mut ws, frame).await?;
                    }
                    self.executed.fetch_add(1, Relaxed);
                }
                f = conn::recv(&mut ws) => {
                    let Ok(f) = f else { break };
                    let now = now_us();
                    let kernel = conn::received_us(&ws);
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
                            last_delivery_us = now;
                            let Some((sent, post)) = conn::stamp(&d.payload) else { continue };
                            if now.saturating_sub(sent) > self.window_us {
                                Counters::add(&c.late, 1);
                            }
                            samples.latency_stamped(k, sent, now, kernel);
                            samples.sequenced_at(d.timestamp_ms);
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
                            self.ephemeral(RECEIPT, &key, (now, kernel), &mut samples);
                        }
                        Some(server_frame::Kind::Typing(t)) => {
                            if t.user == self.me {
                                continue;
                            }
                            self.ephemeral(TYPING, &format!("{}|{}", t.chat, t.user), (now, kernel), &mut samples);
                        }
                        Some(server_frame::Kind::Presence(p)) => {
                            let key = format!("{}|{}", p.user, p.online);
                            self.ephemeral(PRESENCE, &key, (now, kernel), &mut samples);
                        }
                        Some(server_frame::Kind::PublishAck(_)) => {
                            // Owed from the ack on: a refused one owes nothing.
                            if let Some(o) = publishes.remove(&f.id) {
                                self.live.unanswered.fetch_sub(1, Relaxed);
                                Counters::add(&self.rec.kind(o.kind).expected, o.owed);
                                if o.away > 0 {
                                    self.rec.add_counter("to_unconnected", o.away);
                                }
                            }
                            note_reply(&self.rec, &f);
                        }
                        Some(server_frame::Kind::Error(e)) => {
                            note_reply(&self.rec, &f);
                            let Some(o) = publishes.get_mut(&f.id) else { continue };
                            if conn::retryable_code(e.code) && o.retries < conn::PUBLISH_RETRIES {
                                let wait = conn::publish_retry_wait(o.retries);
                                o.retries += 1;
                                retry.push((Instant::now() + wait, f.id));
                            } else {
                                publishes.remove(&f.id);
                                self.live.unanswered.fetch_sub(1, Relaxed);
                                self.rec.add_counter(&format!("refused_{}", e.code), 1);
                            }
                        }
                        _ => note_reply(&self.rec, &f),
                    }
                }
            }
        }
        if last_delivery_us > 0 {
            self.rec.latest("last_delivery", last_delivery_us);
        }
        Ok(())
    }

    /// An unsequenced event arrived (read at `now`, received by the
    /// kernel at `kernel`): find when it was sent.
    fn ephemeral(
        &self,
        kind: usize,
        key: &str,
        (now, kernel): (u64, Option<u64>),
        samples: &mut crate::recorder::Batch,
    ) {
        let c = self.rec.kind(kind);
        match self.live.pending.arrive(key) {
            Some(sent) => {
                Counters::add(&c.received, 1);
                samples.latency_stamped(kind, sent, now, kernel);
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
    ) -> Option<(ClientFrame, Option<Owes>)> {
        let now = now_us();
        let others = self.live.group_members[self.group_index]
            .load(Relaxed)
            .saturating_sub(1);
        let client_msg_id = format!("{}-{n}", conn::run_tag());
        let mut owed = None;
        let kind = match cmd {
            Cmd::Dm(pick) => {
                if self.contacts.is_empty() {
                    self.rec.add_counter("dm_skipped", 1);
                    return None;
                }
                let (to, to_index) = &self.contacts[(pick % self.contacts.len() as u64) as usize];
                let c = self.rec.kind(DM);
                Counters::add(&c.sent, 1);
                let on = u64::from(self.live.connected[*to_index].load(Relaxed));
                owed = Some((DM, on, 1 - on));
                client_frame::Kind::Publish(Publish {
                    target: Some(publish::Target::User(to.clone())),
                    client_msg_id,
                    payload: conn::stamped(self.payload_bytes, now, 0),
                })
            }
            Cmd::Group => {
                let c = self.rec.kind(GROUP);
                Counters::add(&c.sent, 1);
                owed = Some((GROUP, others, 0));
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
                let frame = ClientFrame {
                    id: 0,
                    kind: Some(client_frame::Kind::Typing(Typing {
                        chat: self.group.clone(),
                    })),
                };
                return Some((frame, None));
            }
        };
        let frame = ClientFrame {
            id,
            kind: Some(kind),
        };
        Some((frame, owed))
    }
}

/// An away user: online until told to go, then back when told again.
pub(super) struct Away {
    pub(super) rec: Arc<Recorder>,
    pub(super) sources: Arc<conn::Sources>,
    pub(super) addr: SocketAddr,
    pub(super) token: String,
    pub(super) name: String,
    pub(super) index: usize,
    pub(super) live: Arc<Live>,
    /// When each change is due.
    pub(super) rx: mpsc::Receiver<Instant>,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) ready: mpsc::Sender<bool>,
    pub(super) executed: Arc<AtomicU64>,
}

impl Away {
    pub(super) async fn run(
        mut self,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> anyhow::Result<()> {
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
                due = self.rx.recv() => {
                    let Some(due) = due else { break };
                    self.rec.sample(GENERATOR_LAG, due.elapsed().as_micros() as u64);
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
