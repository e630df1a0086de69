//! The local index (stream → sockets, user → presence watchers) and
//! fan-out. Interest on the bus is reference-counted: a subject is
//! subscribed on the first local socket that needs it and unsubscribed
//! after the last one leaves.
//!
//! Deliveries reach sockets in seq order per stream: the hub keeps each
//! stream's last seq, holds early frames briefly, and repairs a gap from
//! history (the bus is at-most-once and routers race each other).
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Weak},
    time::Duration,
};

use dashmap::DashMap;
use switchboard_protocol::{
    CloseReason, SharedFrame, StreamKey, UserId, edge_users_wildcard, now_ms,
    v1::{Disconnect, StreamPosition, server_frame},
};
use switchboard_router::{Bus, BusError, BusHandler, History, presence_subject};
use tokio::sync::Mutex;

use crate::{mailbox::ConnHandle, metrics::EdgeMetrics};

/// Interest changes are serialized per subject through one of these locks,
/// so subscribe/unsubscribe on the bus never run out of order.
const INTEREST_STRIPES: usize = 64;
/// Early frames held per stream before a repair is forced.
const MAX_PENDING_PER_STREAM: usize = 1024;
/// How long an early frame waits for the missing ones before repair.
const GAP_TIMEOUT: Duration = Duration::from_millis(200);
/// History reads retried while history is unavailable, with backoff up to
/// `MAX_OUTAGE_BACKOFF` (about 11 s in all), before the hole is skipped.
const MAX_OUTAGE_RETRIES: u32 = 8;
const MAX_OUTAGE_BACKOFF: Duration = Duration::from_secs(2);

/// What one repair read left.
enum Repair {
    /// Nothing more to repair.
    Done,
    /// A hole remains (frames newer than the read were lost): read again.
    Hole,
    /// History could not be read; the held frames wait for another try.
    HistoryDown,
}

struct StreamEntry {
    subs: HashMap<u64, ConnHandle>,
    /// Last seq fanned out (0: none yet).
    last_seq: u64,
    /// Whether `last_seq`/`epoch` come from a history read (so seq 1 of a
    /// new stream is expected, not whatever arrives first).
    known: bool,
    epoch: String,
    pending: BTreeMap<u64, SharedFrame>,
    repairing: bool,
    /// Early frames were dropped (pending full during a repair): read
    /// history once more before calling the repair done.
    overflowed: bool,
}

impl StreamEntry {
    fn new() -> Self {
        StreamEntry {
            subs: HashMap::new(),
            last_seq: 0,
            known: false,
            epoch: String::new(),
            pending: BTreeMap::new(),
            repairing: false,
            overflowed: false,
        }
    }
}

pub(crate) struct Hub {
    me: Weak<Hub>,
    node: String,
    /// `sb.edge.<node>.user.`: the prefix of this edge's personal streams.
    user_prefix: String,
    streams: DashMap<StreamKey, StreamEntry>,
    watchers: DashMap<UserId, HashMap<u64, ConnHandle>>,
    conns: DashMap<u64, ConnHandle>,
    stripes: Vec<Mutex<()>>,
    bus: Arc<dyn Bus>,
    history: Arc<dyn History>,
    metrics: Arc<EdgeMetrics>,
}

/// Which of `stripes` locks guards `key` (interest here, presence order in `app`).
pub(crate) fn stripe(key: &str, stripes: usize) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    (BuildHasherDefault::<DefaultHasher>::default().hash_one(key) as usize) % stripes
}

fn stripe_of(subject: &str) -> usize {
    stripe(subject, INTEREST_STRIPES)
}

impl Hub {
    pub(crate) fn new(
        node: &str,
        bus: Arc<dyn Bus>,
        history: Arc<dyn History>,
        metrics: Arc<EdgeMetrics>,
    ) -> Arc<Hub> {
        let wildcard = edge_users_wildcard(node);
        let hub = Arc::new_cyclic(|me| Hub {
            me: me.clone(),
            node: node.to_owned(),
            user_prefix: wildcard.trim_end_matches('*').to_owned(),
            streams: DashMap::new(),
            watchers: DashMap::new(),
            conns: DashMap::new(),
            stripes: (0..INTEREST_STRIPES).map(|_| Mutex::new(())).collect(),
            bus: bus.clone(),
            history,
            metrics,
        });
        bus.set_handler(hub.clone());
        hub
    }

    /// Subscribes this edge's personal streams: one subscription for all
    /// its users, whatever their number.
    pub(crate) async fn start(&self) -> Result<(), BusError> {
        self.bus.subscribe(&format!("{}*", self.user_prefix)).await
    }

    pub(crate) fn add_conn(&self, conn: &ConnHandle) {
        self.conns.insert(conn.id(), conn.clone());
    }

    pub(crate) fn remove_conn(&self, id: u64) {
        self.conns.remove(&id);
    }

    /// All open connections (for drain).
    pub(crate) fn conns(&self) -> Vec<ConnHandle> {
        self.conns.iter().map(|e| e.value().clone()).collect()
    }

    pub(crate) fn conn_count(&self) -> usize {
        self.conns.len()
    }

    /// Adds a socket to a stream; subscribes the bus on first interest.
    /// Returns once the subscription is active.
    pub(crate) async fn join(&self, key: &StreamKey, conn: &ConnHandle) -> Result<(), BusError> {
        let Some(subject) = key.subject() else {
            // A personal stream arrives on this edge's one subscription.
            let mut e = self
                .streams
                .entry(key.clone())
                .or_insert_with(StreamEntry::new);
            e.subs.insert(conn.id(), conn.clone());
            if e.subs.len() == 1 {
                self.metrics.subscriptions.increment(1.0);
            }
            return Ok(());
        };
        let _guard = self.stripes[stripe_of(&subject)].lock().await;
        let first = {
            let mut e = self
                .streams
                .entry(key.clone())
                .or_insert_with(StreamEntry::new);
            e.subs.insert(conn.id(), conn.clone());
            e.subs.len() == 1
        };
        if first {
            if let Err(e) = self.bus.subscribe(&subject).await {
                self.streams.remove_if(key, |_, e| {
                    e.subs.len() == 1 && e.subs.contains_key(&conn.id())
                });
                return Err(e);
            }
            self.metrics.subscriptions.increment(1.0);
        }
        Ok(())
    }

    /// Removes a socket from a stream; unsubscribes after the last one.
    pub(crate) async fn leave(&self, key: &StreamKey, conn_id: u64) {
        let Some(subject) = key.subject() else {
            if let Some(mut e) = self.streams.get_mut(key) {
                e.subs.remove(&conn_id);
            }
            if self
                .streams
                .remove_if(key, |_, e| e.subs.is_empty())
                .is_some()
            {
                self.metrics.subscriptions.decrement(1.0);
            }
            return;
        };
        let _guard = self.stripes[stripe_of(&subject)].lock().await;
        let last = {
            let Some(mut e) = self.streams.get_mut(key) else {
                return;
            };
            e.subs.remove(&conn_id);
            e.subs.is_empty()
        };
        if last
            && self
                .streams
                .remove_if(key, |_, e| e.subs.is_empty())
                .is_some()
        {
            self.metrics.subscriptions.decrement(1.0);
            if let Err(e) = self.bus.unsubscribe(&subject).await {
                tracing::warn!(error = %e, subject, "bus unsubscribe failed");
            }
        }
    }

    /// Watches a user's presence events.
    pub(crate) async fn watch(&self, user: &UserId, conn: &ConnHandle) -> Result<(), BusError> {
        let subject = presence_subject(user);
        let _guard = self.stripes[stripe_of(&subject)].lock().await;
        let first = {
            let mut w = self.watchers.entry(user.clone()).or_default();
            w.insert(conn.id(), conn.clone());
            w.len() == 1
        };
        if first && let Err(e) = self.bus.subscribe(&subject).await {
            self.watchers.remove_if(user, |_, w| w.len() == 1);
            return Err(e);
        }
        Ok(())
    }

    pub(crate) async fn unwatch(&self, user: &UserId, conn_id: u64) {
        let subject = presence_subject(user);
        let _guard = self.stripes[stripe_of(&subject)].lock().await;
        if let Some(mut w) = self.watchers.get_mut(user) {
            w.remove(&conn_id);
        }
        if self.watchers.remove_if(user, |_, w| w.is_empty()).is_some()
            && let Err(e) = self.bus.unsubscribe(&subject).await
        {
            tracing::warn!(error = %e, subject, "bus unsubscribe failed");
        }
    }

    /// Seeds a stream's order tracking from a history read, so a frame lost
    /// right after the first subscribe is noticed as a gap.
    pub(crate) fn note_position(&self, key: &StreamKey, pos: &StreamPosition) {
        if let Some(mut e) = self.streams.get_mut(key)
            && !e.known
        {
            e.known = true;
            // Frames that already arrived are newer than this read.
            if e.last_seq == 0 {
                e.last_seq = pos.seq;
                e.epoch = pos.epoch.clone();
            }
        }
    }

    fn fan_out(&self, entry: &StreamEntry, frame: &SharedFrame) {
        // Counted once per fan-out: a shared counter touched per socket
        // costs a contended atomic per delivery.
        let mut delivered = 0;
        for conn in entry.subs.values() {
            if conn.push(frame.clone()) {
                delivered += 1;
            } else {
                self.metrics.slow_consumer_drops.increment(1);
            }
        }
        self.metrics.deliveries.increment(delivered);
    }

    fn on_delivery(&self, key: StreamKey, seq: u64, frame: SharedFrame) {
        let Some(mut e) = self.streams.get_mut(&key) else {
            return;
        };
        let epoch = match frame.frame().kind.as_ref() {
            Some(server_frame::Kind::Delivery(d)) => d.epoch.as_str(),
            _ => "",
        };
        if e.epoch != epoch {
            if e.known && e.epoch.is_empty() && e.last_seq == 0 {
                // The stream's first history: its seqs start at 1.
                e.epoch = epoch.to_owned();
            } else {
                // History was reset (or nothing was known): start afresh here.
                e.epoch = epoch.to_owned();
                e.last_seq = seq.saturating_sub(1);
                let n = e.pending.len();
                e.pending.clear();
                self.metrics.pending_frames.decrement(n as f64);
            }
        }
        if seq == e.last_seq + 1 {
            self.accept(&mut e, seq, &frame);
            self.drain_contiguous(&mut e);
        } else if seq <= e.last_seq {
            self.metrics.duplicates_dropped.increment(1);
        } else {
            if e.repairing && e.pending.len() >= MAX_PENDING_PER_STREAM {
                // Full while history is read (or down): the frame is in
                // history already (routers store before they publish), so
                // drop it here and have the repair read once more.
                e.overflowed = true;
                self.metrics.pending_dropped.increment(1);
                return;
            }
            if e.pending.insert(seq, frame).is_none() {
                self.metrics.pending_frames.increment(1.0);
            }
            if !e.repairing {
                e.repairing = true;
                let wait = if e.pending.len() >= MAX_PENDING_PER_STREAM {
                    Duration::ZERO
                } else {
                    GAP_TIMEOUT
                };
                if let Some(hub) = self.me.upgrade() {
                    tokio::spawn(async move { hub.repair(key, wait, false).await });
                }
            }
        }
    }

    fn accept(&self, e: &mut StreamEntry, seq: u64, frame: &SharedFrame) {
        e.last_seq = seq;
        if let Some(server_frame::Kind::Delivery(d)) = frame.frame().kind.as_ref() {
            let lag_ms = (now_ms() - d.timestamp_ms).max(0);
            self.metrics.delivery_latency.record(lag_ms as f64 / 1000.0);
        }
        self.fan_out(e, frame);
    }

    /// Fills a gap from history; if history no longer has it, skips ahead
    /// (clients see the gap and re-sync).
    async fn repair(self: Arc<Self>, key: StreamKey, wait: Duration, force: bool) {
        let mut wait = wait;
        let mut force = force;
        let mut outages = 0;
        loop {
            tokio::time::sleep(wait).await;
            match self
                .repair_once(&key, force, outages < MAX_OUTAGE_RETRIES)
                .await
            {
                Repair::Done => return,
                // Still a hole: frames newer than our read were lost too.
                Repair::Hole => wait = GAP_TIMEOUT,
                Repair::HistoryDown => {
                    outages += 1;
                    wait = (GAP_TIMEOUT * 2u32.pow(outages)).min(MAX_OUTAGE_BACKOFF);
                }
            }
            force = false;
        }
    }

    /// One history read. `may_wait`: a failed read keeps the held frames
    /// for another try instead of skipping the hole.
    async fn repair_once(&self, key: &StreamKey, force: bool, may_wait: bool) -> Repair {
        // Read what to repair without holding the shard lock afterwards.
        let target = self.streams.get(key).map(|e| {
            (
                !e.pending.is_empty() || (force && !e.epoch.is_empty()),
                e.last_seq,
                e.epoch.clone(),
            )
        });
        let (since, epoch) = match target {
            Some((true, since, epoch)) => (since, epoch),
            Some((false, _, _)) => {
                if let Some(mut e) = self.streams.get_mut(key) {
                    e.repairing = false;
                }
                return Repair::Done;
            }
            None => return Repair::Done,
        };
        let recovered = self.history.recover(key, Some(since), &epoch).await;
        let Some(mut e) = self.streams.get_mut(key) else {
            return Repair::Done;
        };
        // A history outage is not a lost message: the frames are still in
        // history, so hold what arrived (bounded) and read again later.
        if recovered.is_err() && may_wait && e.pending.len() < MAX_PENDING_PER_STREAM {
            self.metrics.gaps_retried.increment(1);
            return Repair::HistoryDown;
        }
        match recovered {
            Ok(r) if !r.position.resync_required => {
                let mut filled = 0;
                for f in r.frames {
                    if let Some((_, seq)) = f.delivery_position()
                        && seq > e.last_seq
                        && e.pending.insert(seq, f).is_none()
                    {
                        self.metrics.pending_frames.increment(1.0);
                        filled += 1;
                    }
                }
                if filled > 0 {
                    self.metrics.gaps_repaired.increment(1);
                }
                self.drain_contiguous(&mut e);
                if e.pending.is_empty() && !std::mem::take(&mut e.overflowed) {
                    e.repairing = false;
                    Repair::Done
                } else {
                    Repair::Hole
                }
            }
            _ => {
                // History no longer has the missing seqs (or stayed down):
                // deliver what we hold, in order; clients see the gap and
                // re-sync from their own last seq.
                self.metrics.gaps_unrecoverable.increment(1);
                e.overflowed = false;
                let held = std::mem::take(&mut e.pending);
                self.metrics.pending_frames.decrement(held.len() as f64);
                for (seq, f) in held {
                    if seq > e.last_seq {
                        self.accept(&mut e, seq, &f);
                    }
                }
                e.repairing = false;
                Repair::Done
            }
        }
    }

    /// Fans out held frames that continue the stream without a hole.
    fn drain_contiguous(&self, e: &mut StreamEntry) {
        loop {
            let want = e.last_seq + 1;
            let Some(next) = e.pending.remove(&want) else {
                break;
            };
            self.metrics.pending_frames.decrement(1.0);
            self.accept(e, want, &next);
        }
        // Anything at or below last_seq is a duplicate.
        let stale: Vec<u64> = e.pending.range(..=e.last_seq).map(|(s, _)| *s).collect();
        for s in stale {
            e.pending.remove(&s);
            self.metrics.pending_frames.decrement(1.0);
        }
    }

    /// A kick sent to one of this edge's users: closes their sockets, or
    /// the one session named (session ids are `<node>-<conn id>`).
    fn kick(&self, key: &StreamKey, d: &Disconnect) {
        let Some(reason) = u16::try_from(d.code).ok().and_then(CloseReason::from_code) else {
            return;
        };
        let Some(e) = self.streams.get(key) else {
            return;
        };
        for conn in e.subs.values() {
            if d.session.is_empty() || d.session == format!("{}-{}", self.node, conn.id()) {
                conn.close(reason, 0);
            }
        }
    }

    fn on_event(&self, subject: &str, frame: SharedFrame) {
        if let Some(user) = subject.strip_prefix("sb.presence.") {
            if let Some(w) = self.watchers.get(user) {
                for conn in w.values() {
                    conn.push(frame.clone());
                }
            }
            return;
        }
        let key = if let Some(chat) = subject.strip_prefix("sb.chat.") {
            switchboard_protocol::ChatId::parse(chat)
                .ok()
                .map(StreamKey::Chat)
        } else if let Some(user) = subject.strip_prefix(self.user_prefix.as_str()) {
            UserId::parse(user).ok().map(StreamKey::User)
        } else {
            None
        };
        if let (Some(key), Some(server_frame::Kind::Disconnect(d))) =
            (&key, frame.frame().kind.as_ref())
        {
            self.kick(key, d);
            return;
        }
        if let Some(key) = key
            && let Some(e) = self.streams.get(&key)
        {
            self.fan_out(&e, &frame);
        }
    }
}

impl BusHandler for Hub {
    fn on_frame(&self, subject: &str, frame: SharedFrame) {
        match frame.delivery_position() {
            Some((key, seq)) => self.on_delivery(key, seq, frame),
            None => self.on_event(subject, frame),
        }
    }

    /// After a bus reconnect or a slow-consumer drop, every stream with
    /// local sockets is checked against history for what went missing.
    fn on_possible_loss(&self) {
        let Some(hub) = self.me.upgrade() else { return };
        let keys: Vec<StreamKey> = self.streams.iter().map(|e| e.key().clone()).collect();
        tracing::info!(
            streams = keys.len(),
            "bus may have dropped frames; checking streams against history"
        );
        tokio::spawn(async move {
            for key in keys {
                let claimed = match hub.streams.get_mut(&key) {
                    Some(mut e) if !e.repairing => {
                        e.repairing = true;
                        true
                    }
                    _ => false,
                };
                if claimed {
                    hub.clone().repair(key, Duration::ZERO, true).await;
                }
            }
        });
    }
}
