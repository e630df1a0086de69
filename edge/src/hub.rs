//! The local index (stream → sockets, user → presence watchers) and
//! fan-out. Interest on the bus is reference-counted: a subject is
//! subscribed on the first local socket that needs it and unsubscribed
//! after the last one leaves.
//!
//! Deliveries reach sockets in seq order per stream: each stream has a
//! `StreamOrder` (`order.rs`, the reorder and gap-repair state machine)
//! that the hub feeds with arrivals and history answers, fanning out what
//! it releases and running the repair reads it asks for.
//!
//! Fan-out runs off the bus's receive path, which standalone is the
//! publisher's own task (the memory bus hands frames over inline): a frame
//! is queued in its stream's lane (`lanes.rs`) and a task per busy stream
//! fans the lane out in order, so a publish is acked once stored whatever
//! its audience (ADR 0027).
use std::{
    sync::{
        Arc, Weak,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use dashmap::DashMap;
use switchboard_protocol::{
    ChatId, CloseReason, SharedFrame, StreamKey, UserId, now_ms,
    subject::{MEMBERS, Subject, edge_users_wildcard, presence_subject},
    v1::{Disconnect, ServerFrame, StreamPosition, Unsubscribed, server_frame},
};
use switchboard_router::{Bus, BusError, BusHandler, History};
use tokio::{sync::Mutex, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    authz::ChatAuth,
    inline_map::InlineMap,
    mailbox::{ConnHandle, Offer, Outbound},
    metrics::EdgeMetrics,
    order::{Arrival, Gap, StreamOrder},
};

mod audience;
mod lanes;

use audience::{Audience, Snapshot};
pub(crate) use lanes::FanoutLimits;
use lanes::{HistoryAnswer, Lane, Work};

/// Sockets a fan-out writes before it lets other tasks run: about a
/// millisecond of writes, so a channel's post delays nothing else by more.
const FANOUT_TURN: usize = 128;
/// Audiences from this size have a lone frame's fan-out shared out over
/// the runtime's worker threads but one: a post reaches its last socket
/// sooner.
const SPREAD_FROM_SOCKETS: usize = 2048;

/// Streams whose positions one history read asks for (ADR 0044): one
/// pipeline per batch.
const POSITION_BATCH: usize = 256;
/// How long a stream a position check found behind may take to catch up
/// by itself before it is repaired: its frame may be on the bus or in its
/// lane still.
const POSITION_GRACE: Duration = Duration::from_secs(1);
/// After a possible loss every stream is checked at once and again this
/// much later: a subscription made again on reconnect reaches the other
/// NATS servers of a cluster over their routes a little after the edge's
/// own server took it, and a frame published there meanwhile found no
/// interest (ADR 0044).
const INTEREST_SETTLE: Duration = Duration::from_secs(2);

/// Interest changes are serialized per subject through one of these locks,
/// so subscribe/unsubscribe on the bus never run out of order.
const INTEREST_STRIPES: usize = 64;

/// One user's presence watchers (a stream's sockets are an `Audience`).
type Subs = InlineMap<u64, ConnHandle, std::hash::RandomState>;

struct StreamEntry {
    subs: Audience,
    order: StreamOrder,
}

impl StreamEntry {
    fn new() -> Self {
        StreamEntry {
            subs: Audience::default(),
            order: StreamOrder::new(),
        }
    }
}

pub(crate) struct Hub {
    me: Weak<Hub>,
    node: String,
    /// `sb.edge.<node>.user.`: the prefix of this edge's personal streams.
    user_prefix: String,
    streams: DashMap<StreamKey, StreamEntry>,
    watchers: DashMap<UserId, Subs>,
    conns: DashMap<u64, ConnHandle>,
    stripes: Vec<Mutex<()>>,
    bus: Arc<dyn Bus>,
    history: Arc<dyn History>,
    metrics: Arc<EdgeMetrics>,
    /// Frames waiting for their stream's fan-out, per stream with any.
    lanes: DashMap<StreamKey, Lane>,
    /// Frames in all lanes (bounded by `fanout.max_frames`).
    queued: AtomicUsize,
    fanout: FanoutLimits,
    /// Told of members removed from chats (`sb.members`).
    authz: Arc<ChatAuth>,
    /// The runtime the fan-out and repairs run on: the sockets' own, also
    /// when a frame is queued from the control runtime (an API publish).
    runtime: tokio::runtime::Handle,
    /// Its worker threads.
    workers: usize,
    /// Tests hold the fan-out back to see what a publish waits for.
    #[cfg(test)]
    held: std::sync::atomic::AtomicBool,
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
        fanout: FanoutLimits,
        authz: Arc<ChatAuth>,
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
            lanes: DashMap::new(),
            runtime: tokio::runtime::Handle::current(),
            workers: tokio::runtime::Handle::current().metrics().num_workers(),
            queued: AtomicUsize::new(0),
            fanout,
            authz,
            #[cfg(test)]
            held: std::sync::atomic::AtomicBool::new(false),
        });
        bus.set_handler(hub.clone());
        hub
    }

    /// Subscribes this edge's personal streams: one subscription for all
    /// its users, whatever their number.
    /// And the members removed from chats, on every edge.
    pub(crate) async fn start(&self) -> Result<(), BusError> {
        self.bus
            .subscribe(&format!("{}*", self.user_prefix))
            .await?;
        self.bus.subscribe(MEMBERS).await
    }

    /// Whether the socket is (still) in the stream: the hub ends a
    /// subscription by itself when its user is removed from the chat.
    pub(crate) fn holds(&self, key: &StreamKey, conn_id: u64) -> bool {
        self.streams
            .get(key)
            .is_some_and(|e| e.subs.contains_key(&conn_id))
    }

    /// Members removed from a chat (`sb.members`): their cached allows go,
    /// and each of their sockets here leaves the chat, is told so with an
    /// `unsubscribed` push, and gets nothing more of it (the socket's
    /// write side forgets the stream right before the push).
    fn on_members_removed(&self, frame: &SharedFrame) {
        let Some(server_frame::Kind::Unsubscribed(u)) = frame.frame().kind.as_ref() else {
            return;
        };
        let Ok(chat) = ChatId::parse(&u.chat) else {
            return;
        };
        let users: Vec<UserId> = u
            .users
            .iter()
            .filter_map(|x| UserId::parse(x).ok())
            .collect();
        self.authz.on_removed(&chat, &users);
        let key = StreamKey::Chat(chat.clone());
        let mut ended = Vec::new();
        for user in &users {
            let ids: Vec<u64> = match self.streams.get(&StreamKey::User(user.clone())) {
                Some(mine) => mine.subs.values().map(|c| c.id()).collect(),
                None => continue,
            };
            if let Some(mut e) = self.streams.get_mut(&key) {
                ended.extend(ids.iter().filter_map(|id| e.subs.remove(id)));
            }
        }
        let Some(last) = ended.last().map(|c| c.id()) else {
            return;
        };
        let push = ServerFrame {
            id: 0,
            kind: Some(server_frame::Kind::Unsubscribed(Unsubscribed {
                chat: chat.to_string(),
                reason: "removed".into(),
                users: Vec::new(),
            })),
        };
        for conn in &ended {
            conn.send(Outbound::Forget(key.clone()));
            conn.send(Outbound::Reply(conn.encoding().encode_server(&push)));
        }
        tracing::debug!(%chat, sockets = ended.len(), "removed members' subscriptions ended");
        // The stream may have no socket left: `leave` unsubscribes the bus
        // under the stream's interest lock.
        if let Some(hub) = self.me.upgrade() {
            self.runtime
                .spawn(async move { hub.leave(&key, last).await });
        }
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
    /// Returns once the subscription is active, with the hub's own copy of
    /// the key: sockets that keep it share one allocation with the
    /// fan-out, whose lookups then compare keys by address.
    pub(crate) async fn join(
        &self,
        key: &StreamKey,
        conn: &ConnHandle,
    ) -> Result<StreamKey, BusError> {
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
            return Ok(e.key().clone());
        };
        let _guard = self.stripes[stripe_of(&subject)].lock().await;
        let (first, canonical) = {
            let mut e = self
                .streams
                .entry(key.clone())
                .or_insert_with(StreamEntry::new);
            e.subs.insert(conn.id(), conn.clone());
            (e.subs.len() == 1, e.key().clone())
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
        Ok(canonical)
    }

    /// Removes a socket from a stream; unsubscribes after the last one.
    pub(crate) async fn leave(&self, key: &StreamKey, conn_id: u64) {
        let Some(subject) = key.subject() else {
            if let Some(mut e) = self.streams.get_mut(key) {
                e.subs.remove(&conn_id);
            }
            if let Some((_, gone)) = self.streams.remove_if(key, |_, e| e.subs.is_empty()) {
                self.forget(&gone);
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
        if last && let Some((_, gone)) = self.streams.remove_if(key, |_, e| e.subs.is_empty()) {
            self.forget(&gone);
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
        if let Some(mut e) = self.streams.get_mut(key) {
            e.order.on_position(pos.seq, &pos.epoch);
        }
    }

    /// Offers frames (in order) to a stream's sockets, from a snapshot taken
    /// with them: written at once, in one write per socket, to the idle ones
    /// by this task, queued for the others' writer tasks (ADR 0028). Yields
    /// after every `FANOUT_TURN` sockets, so a large audience neither holds
    /// a worker thread nor any lock for the whole of it. With `spread`, a
    /// large audience is shared out by turns with a helper task per worker
    /// thread beyond two (ADR 0042). Returns the sockets offered to.
    async fn fan_out(
        &self,
        stream: &StreamKey,
        conns: &Snapshot,
        frames: &[SharedFrame],
        spread: bool,
    ) -> usize {
        if frames.is_empty() {
            return 0;
        }
        // One worker is left to everything else (small chats' fan-outs,
        // reads): a post that took every thread made them all wait.
        let helpers = if spread && conns.len() >= SPREAD_FROM_SOCKETS {
            self.workers.saturating_sub(2)
        } else {
            0
        };
        let delivered = if helpers == 0 {
            self.metrics.fanouts_alone.increment(1);
            let mut delivered = 0;
            for (turn, chunk) in conns.chunks(FANOUT_TURN).enumerate() {
                if turn > 0 {
                    tokio::task::yield_now().await;
                }
                delivered += self.offer_all(stream, chunk, frames);
            }
            delivered
        } else {
            self.metrics.fanouts_spread.increment(1);
            self.fan_out_spread(stream, conns, frames, helpers).await
        };
        self.metrics.deliveries.increment(delivered);
        conns.len()
    }

    /// A fan-out shared by turns between this task and `helpers` more,
    /// which take the next turn from a common cursor until none is left;
    /// it ends when all of them have, so the stream's next batch still
    /// reaches each socket after this one.
    async fn fan_out_spread(
        &self,
        stream: &StreamKey,
        conns: &Snapshot,
        frames: &[SharedFrame],
        helpers: usize,
    ) -> u64 {
        let cursor = Arc::new(AtomicUsize::new(0));
        let mut joins = Vec::with_capacity(helpers);
        if let Some(hub) = self.me.upgrade() {
            for _ in 0..helpers {
                let (hub, cursor) = (hub.clone(), cursor.clone());
                let (stream, conns, frames) = (stream.clone(), conns.clone(), frames.to_vec());
                // Unconstrained, like the lane's drain: its writes are sockets.
                joins.push(self.runtime.spawn(tokio::task::unconstrained(async move {
                    hub.take_turns(&stream, &conns, &frames, &cursor).await
                })));
            }
        }
        let mut delivered = self.take_turns(stream, conns, frames, &cursor).await;
        for join in joins {
            delivered += join.await.unwrap_or(0);
        }
        delivered
    }

    async fn take_turns(
        &self,
        stream: &StreamKey,
        conns: &[ConnHandle],
        frames: &[SharedFrame],
        cursor: &AtomicUsize,
    ) -> u64 {
        let mut delivered = 0;
        let mut first = true;
        loop {
            let at = cursor.fetch_add(1, Relaxed) * FANOUT_TURN;
            let Some(chunk) = conns.get(at..) else { break };
            if chunk.is_empty() {
                break;
            }
            if !first {
                tokio::task::yield_now().await;
            }
            first = false;
            delivered += self.offer_all(stream, &chunk[..chunk.len().min(FANOUT_TURN)], frames);
        }
        delivered
    }

    /// Offers frames to each of `conns`; returns the frames they took.
    /// Counted once per call: a shared counter touched per socket costs a
    /// contended atomic per delivery.
    fn offer_all<'a>(
        &self,
        stream: &StreamKey,
        conns: impl IntoIterator<Item = &'a ConnHandle>,
        frames: &[SharedFrame],
    ) -> u64 {
        let (mut taken, mut refused, mut written, mut bytes) = (0u64, 0u64, 0u64, 0u64);
        let (mut direct, mut queued) = (0u64, 0u64);
        for conn in conns {
            match conn.offer(stream, frames, &self.metrics) {
                Offer::Direct(d) => {
                    taken += u64::from(d.taken);
                    direct += u64::from(d.taken);
                    written += u64::from(d.frames);
                    bytes += d.bytes as u64;
                }
                Offer::Queued => {
                    taken += frames.len() as u64;
                    queued += frames.len() as u64;
                }
                Offer::Refused => refused += 1,
            }
        }
        self.metrics.offers_direct.increment(direct);
        self.metrics.offers_queued.increment(queued);
        if refused > 0 {
            self.metrics.slow_consumer_drops.increment(refused);
        }
        if written > 0 {
            self.metrics.frames_out.increment(written);
            self.metrics.bytes_out.increment(bytes);
        }
        taken
    }

    /// A delivery the stream's order released: its latency, before the fan-out.
    fn released(&self, frame: &SharedFrame) {
        if let Some(server_frame::Kind::Delivery(d)) = frame.frame().kind.as_ref() {
            let lag_ms = (now_ms() - d.timestamp_ms).max(0);
            self.metrics.delivery_latency.record(lag_ms as f64 / 1000.0);
        }
    }

    /// A stream without sockets left: its frames held for a repair go
    /// with it (later subscribers read history on subscribe).
    fn forget(&self, gone: &StreamEntry) {
        self.metrics.subscriptions.decrement(1.0);
        self.count_held(gone.order.held(), 0);
    }

    /// Moves the held-frames gauge by what one step of a stream's order
    /// changed.
    fn count_held(&self, before: usize, after: usize) {
        if after > before {
            self.metrics
                .pending_frames
                .increment((after - before) as f64);
        } else if before > after {
            self.metrics
                .pending_frames
                .decrement((before - after) as f64);
        }
    }

    /// Feeds a lane's batch (arrivals, loss markers, history answers) to
    /// its stream's order, under the stream's entry lock; returns what the
    /// order released, in order, and a snapshot of the stream's sockets to
    /// fan it out to after the lock is let go. Every fan-out of a stream
    /// runs on its lane's task, one batch after the other, so a repair's
    /// frames cannot overtake the ones released before them.
    fn order_batch(
        &self,
        key: &StreamKey,
        batch: &mut Vec<Work>,
        taken: Instant,
        spans: &mut Vec<tracing::Span>,
    ) -> (StreamKey, Vec<SharedFrame>, Snapshot) {
        let mut repairs = Vec::new();
        let mut out = Vec::with_capacity(batch.len());
        let mut conns = Snapshot::None;
        let mut stream = key.clone();
        let mut entry = self.streams.get_mut(key);
        let held = entry.as_ref().map_or(0, |e| e.order.held());
        for work in batch.drain(..) {
            if matches!(work, Work::Delivery { .. } | Work::Event(_)) {
                self.queued.fetch_sub(1, Relaxed);
            }
            // A stream without sockets: its history answers end their
            // repairs (the sender is dropped), the rest goes nowhere.
            let Some(e) = entry.as_mut() else { continue };
            let order = &mut e.order;
            match work {
                Work::Delivery {
                    seq,
                    frame,
                    queued_at,
                    trace,
                } => {
                    if let Some(span) = trace {
                        spans.push(*span);
                    }
                    self.metrics
                        .hops
                        .queue
                        .record(taken.duration_since(queued_at).as_secs_f64());
                    let epoch = frame.delivery_epoch().unwrap_or("");
                    match order.on_frame(seq, epoch, &frame, Instant::now()) {
                        Arrival::Next { released } => {
                            self.released(&frame);
                            out.push(frame);
                            for f in released {
                                self.released(&f);
                                out.push(f);
                            }
                        }
                        Arrival::Duplicate => self.metrics.duplicates_dropped.increment(1),
                        Arrival::Dropped => self.metrics.pending_dropped.increment(1),
                        Arrival::Held { repair_at } => repairs.extend(repair_at),
                    }
                }
                Work::Event(frame) => out.push(frame),
                Work::Lost => repairs.extend(order.on_possible_loss(Instant::now())),
                Work::History(h) => {
                    let HistoryAnswer { answer, next } = *h;
                    let answered = order.on_history(answer, Instant::now());
                    match answered.gap {
                        Some(Gap::Repaired) => self.metrics.gaps_repaired.increment(1),
                        Some(Gap::Retried) => self.metrics.gaps_retried.increment(1),
                        Some(Gap::Unrecoverable) => self.metrics.gaps_unrecoverable.increment(1),
                        None => {}
                    }
                    for f in answered.deliver {
                        self.released(&f);
                        out.push(f);
                    }
                    // The repair task may be gone (its stream left and came back).
                    let _ = next.send(answered.next_read);
                }
            }
        }
        if let Some(e) = entry.as_mut() {
            self.count_held(held, e.order.held());
            if !out.is_empty() {
                conns = e.subs.snapshot();
                stream = e.key().clone();
            }
        }
        drop(entry);
        for at in repairs {
            self.spawn_repair(key.clone(), at);
        }
        (stream, out, conns)
    }

    fn spawn_repair(&self, key: StreamKey, at: Instant) {
        if let Some(hub) = self.me.upgrade() {
            // Unconstrained, like a lane's drain: its fan-outs write sockets.
            self.runtime.spawn(tokio::task::unconstrained(async move {
                hub.repair(key, at).await
            }));
        }
    }

    /// Runs one repair of a stream: sleeps until each read is due, reads
    /// history and hands the answer to the stream's lane, whose task feeds
    /// it to the stream's order and fans out what it releases in turn with
    /// the stream's other frames; until the order says the repair is over
    /// (filled, or the hole skipped).
    async fn repair(self: Arc<Self>, key: StreamKey, at: Instant) {
        let mut at = at;
        loop {
            tokio::time::sleep_until(at).await;
            // Read what to repair without holding the shard lock afterwards.
            let read = match self.streams.get_mut(&key) {
                Some(mut e) => e.order.due_read(),
                None => None,
            };
            let Some(read) = read else { return };
            let answer = self
                .history
                .recover(&key, Some(read.since), &read.epoch)
                .await;
            let (next, answered) = tokio::sync::oneshot::channel();
            self.enqueue(
                key.clone(),
                Work::History(Box::new(HistoryAnswer { answer, next })),
            );
            match answered.await {
                Ok(Some(next)) => at = next,
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// The streams with local sockets now.
    fn stream_keys(&self) -> Vec<StreamKey> {
        self.streams.iter().map(|e| e.key().clone()).collect()
    }

    /// Checks every stream with local sockets against history's positions,
    /// once per `interval`, a batch at a time spread over most of it (ADR
    /// 0044, "positioning"): a stream whose last frames the bus lost, with
    /// nothing after them to reveal the hole and no event saying so, is
    /// repaired within about one interval. Cluster only: the memory bus
    /// loses nothing.
    pub(crate) async fn check_positions(
        self: Arc<Self>,
        interval: Duration,
        stop: CancellationToken,
    ) {
        let mut round = tokio::time::interval_at(Instant::now() + interval, interval);
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = round.tick() => {}
            }
            let keys = self.stream_keys();
            let batches = keys.len().div_ceil(POSITION_BATCH).max(1) as u32;
            // A round ends before the next one is due.
            let pace = interval * 3 / 4 / batches;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.clone().check_streams(keys, pace, POSITION_GRACE) => {}
            }
        }
    }

    /// Reads the positions of `keys`, `POSITION_BATCH` per read and `pace`
    /// apart, and repairs the streams history is ahead of: at once with no
    /// `grace`, else those still behind after it. Returns the streams whose
    /// positions could not be read.
    async fn check_streams(
        self: Arc<Self>,
        keys: Vec<StreamKey>,
        pace: Duration,
        grace: Duration,
    ) -> Vec<StreamKey> {
        let mut failed = Vec::new();
        for (i, batch) in keys.chunks(POSITION_BATCH).enumerate() {
            if i > 0 && !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
            let positions = match self.history.positions(batch).await {
                Ok(p) => p,
                Err(e) => {
                    self.metrics.position_errors.increment(1);
                    tracing::debug!(error = %e, streams = batch.len(), "position check failed");
                    failed.extend_from_slice(batch);
                    continue;
                }
            };
            self.metrics.position_checks.increment(batch.len() as u64);
            let behind: Vec<Behind> = batch
                .iter()
                .zip(positions)
                .filter_map(|(key, at)| {
                    let e = self.streams.get(key)?;
                    e.order.behind(at.seq, &at.epoch).then(|| Behind {
                        key: key.clone(),
                        was: e.order.epoch().to_owned(),
                        at,
                    })
                })
                .collect();
            if behind.is_empty() {
                continue;
            }
            if grace.is_zero() {
                self.repair_behind(behind);
            } else {
                let hub = self.clone();
                self.runtime.spawn(async move {
                    tokio::time::sleep(grace).await;
                    hub.repair_behind(behind);
                });
            }
        }
        failed
    }

    /// Starts a repair of each stream still behind its checked position.
    fn repair_behind(&self, behind: Vec<Behind>) {
        let now = Instant::now();
        for Behind { key, was, at } in behind {
            let due = self.streams.get_mut(&key).and_then(|mut e| {
                // A stream gone on to another epoch since: the position may
                // be older than that.
                if e.order.epoch() != was {
                    return None;
                }
                let held = e.order.held();
                let due = e.order.on_behind(at.seq, &at.epoch, now);
                self.count_held(held, e.order.held());
                due
            });
            if let Some(due) = due {
                self.metrics.position_repairs.increment(1);
                tracing::debug!(stream = %key, seq = at.seq, "position check: stream behind history");
                self.spawn_repair(key, due);
            }
        }
    }

    /// Reads each stream itself, one after the other, with the repair's
    /// back-off while history is down: the sweep for streams whose
    /// positions could not be read.
    async fn sweep(self: &Arc<Self>, keys: Vec<StreamKey>) {
        for key in keys {
            let at = self
                .streams
                .get_mut(&key)
                .and_then(|mut e| e.order.on_possible_loss(Instant::now()));
            if let Some(at) = at {
                self.clone().repair(key, at).await;
            }
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
                conn.close(reason);
            }
        }
    }

    /// An unsequenced frame (receipt, typing, presence, kick). Presence
    /// events and kicks are handled here; a chat's or user's events join
    /// that stream's lane, behind its deliveries.
    fn on_event(&self, subject: &str, frame: SharedFrame) {
        let key = match Subject::parse(subject) {
            Some(Subject::Presence(user)) => {
                if let Some(w) = self.watchers.get(&user) {
                    // Presence events are no deliveries: the key is unused.
                    let key = StreamKey::User(user.clone());
                    self.offer_all(&key, w.values(), std::slice::from_ref(&frame));
                }
                return;
            }
            Some(Subject::Members) => {
                self.on_members_removed(&frame);
                return;
            }
            Some(Subject::Chat(chat)) => StreamKey::Chat(chat),
            Some(Subject::EdgeUser { edge, user }) if edge == self.node => StreamKey::User(user),
            _ => return,
        };
        // A kick closes sockets (the close goes before anything queued),
        // so it does not wait behind the stream's deliveries.
        if let Some(server_frame::Kind::Disconnect(d)) = frame.frame().kind.as_ref() {
            self.kick(&key, d);
            return;
        }
        self.enqueue(key, Work::Event(frame));
    }
}

impl Hub {
    /// A frame from the bus: a delivery joins its stream's lane, with its
    /// fan-out span when traces are on and it is traced: in a cluster
    /// when it came with a `traceparent`, standalone when it was published
    /// inside a traced span of this process (the in-process bus calls in
    /// on the publisher's task). One span per delivery on this edge,
    /// never per socket.
    fn arrive(&self, subject: &str, frame: SharedFrame, traceparent: Option<&str>) {
        match frame.delivery_position() {
            Some((key, seq)) => {
                let trace = if switchboard_router::trace::enabled() {
                    fanout_span(&key, seq, traceparent)
                } else {
                    None
                };
                self.enqueue(
                    key,
                    Work::Delivery {
                        seq,
                        frame,
                        queued_at: Instant::now(),
                        trace,
                    },
                )
            }
            None => self.on_event(subject, frame),
        }
    }
}

/// The `edge.fanout` span of one delivery (traces on): the child of a
/// remote `traceparent`, else of the current span if there is one.
fn fanout_span(key: &StreamKey, seq: u64, traceparent: Option<&str>) -> Option<Box<tracing::Span>> {
    if traceparent.is_none() && tracing::Span::current().is_none() {
        // Not traced: a root here would start traces nobody asked for.
        return None;
    }
    let span = tracing::info_span!(
        target: switchboard_router::trace::TARGET,
        "edge.fanout",
        otel.kind = "consumer",
        stream = %key,
        seq,
        sockets = tracing::field::Empty,
    );
    if let Some(tp) = traceparent {
        switchboard_router::trace::set_parent(&span, tp);
    }
    Some(Box::new(span))
}

impl BusHandler for Hub {
    /// Queues the frame for its stream's fan-out and returns: this runs on
    /// the publisher's task standalone, and on a NATS subscription's task
    /// in a cluster.
    fn on_frame(&self, subject: &str, frame: SharedFrame) {
        self.arrive(subject, frame, None);
    }

    /// A delivery with a trace context gets its `edge.fanout` span, a
    /// child of the router's delivery (ADR 0038).
    fn on_traced_frame(&self, subject: &str, frame: SharedFrame, traceparent: &str) {
        self.arrive(subject, frame, Some(traceparent));
    }

    /// After a bus reconnect or a slow-consumer drop, every stream with
    /// local sockets is checked against history's positions, and the ones
    /// behind are read; once more `INTEREST_SETTLE` later. A stream whose
    /// position could not be read is read itself.
    fn on_possible_loss(&self) {
        // A removal may be among what was lost.
        self.authz.on_possible_loss();
        let Some(hub) = self.me.upgrade() else { return };
        let keys = self.stream_keys();
        tracing::info!(
            streams = keys.len(),
            "bus may have dropped frames; checking streams against history"
        );
        self.runtime.spawn(tokio::task::unconstrained(async move {
            let failed = hub
                .clone()
                .check_streams(keys, Duration::ZERO, Duration::ZERO)
                .await;
            hub.sweep(failed).await;
            tokio::time::sleep(INTEREST_SETTLE).await;
            let keys = hub.stream_keys();
            let failed = hub
                .clone()
                .check_streams(keys, Duration::ZERO, Duration::ZERO)
                .await;
            hub.sweep(failed).await;
        }));
    }
}

/// A stream a position check found behind history.
struct Behind {
    key: StreamKey,
    /// The stream's epoch when it was found so.
    was: String,
    at: StreamPosition,
}

#[cfg(test)]
mod tests;
