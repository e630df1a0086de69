//! One stream's order at the edge: the reorder and gap-repair state
//! machine, and the seq rule every part of the edge uses.
//!
//! [`StreamOrder`] does no I/O (the quinn-proto way): it takes a stream's
//! arrivals (seq, epoch, frame), the answers of history reads and the
//! current instant, and says what to do: fan these frames out in this
//! order, drop a duplicate, read history since a seq at some instant, skip
//! a hole. The hub owns one per stream and drives it: it fans out, spawns
//! the repair task, sleeps until the instant given and makes the read.
//! [`classify`] is the one seq rule: the hub's reorder and each socket's
//! recovery merge (the writer) both use it.
//!
//! # The ordering contract, end to end
//!
//! Every socket gets each stream's messages once and in seq order, and
//! nothing that the stream's history window still holds is lost; what the
//! window no longer holds is reported to the client, never skipped
//! silently. Seven parts keep that promise:
//!
//! 1. **The router sequences, stores, then publishes** (`Router::publish`
//!    in `switchboard-router`, `router/src/router.rs`). `History::append`
//!    (`router/src/history.rs`, memory and Redis backends) gives a stream
//!    seq 1, 2, 3… atomically across all routers and stores the delivery,
//!    with the stream's epoch, before the router publishes it. The publish
//!    is at-most-once and routers race each other, so a frame can arrive
//!    late, twice or never, but history has it.
//! 2. **The bus is live on return** (`Bus::subscribe`): once subscribe
//!    returns, every frame published on the subject afterwards reaches the
//!    node, unless the bus reports a possible loss
//!    (`BusHandler::on_possible_loss`). So a history read made after
//!    joining a stream misses nothing: a message was stored before the
//!    read, or published to a live subscription. For a personal stream,
//!    presence plays the subscription's part: the edge registers before it
//!    reads, and routers look presence up after they store
//!    (`publish_to_user`).
//! 3. **The edge reorders and repairs per stream** (this module, driven by
//!    the hub). Duplicates are dropped; an early frame is held (at most
//!    [`MAX_PENDING_PER_STREAM`]) for [`GAP_TIMEOUT`], then the hole is
//!    read from history. While history is down the held frames wait and
//!    the read is retried with back-off (doubling, capped at
//!    [`MAX_OUTAGE_BACKOFF`], [`MAX_OUTAGE_RETRIES`] times); when history
//!    no longer has the hole (or stays down) the held frames go out and
//!    clients see the skip. A new epoch restarts the stream at seq 1, or,
//!    when its first frame to arrive is past 1 (a failover fenced the
//!    stream and its seqs go on, ADR 0019), where history says it starts.
//!    After a bus reconnect or a slow consumer every stream's position is
//!    checked against history (at once and again a little later, while
//!    the interest travels between NATS servers) and the streams behind
//!    are read since their last seq, a stream not yet given an epoch too.
//! 4. **A socket's resume merges history with live frames** (the writer,
//!    `Outbound::BeginRecovery` and `Outbound::Recovered`). Subscribe and
//!    Connect queue `BeginRecovery` before they join the stream, so every
//!    live frame after the join is held by the writer; it writes the
//!    reply, the recovered frames, then the held live ones, dropping seqs
//!    already written ([`classify`]).
//! 5. **The client de-duplicates and resumes** (`protocol/src/client/`,
//!    `cursor.rs`). It keeps the last seq it handed to the app per stream,
//!    drops a delivery at or below it (the wire is at-least-once, the app
//!    sees each (stream, seq) once), and on reconnect resumes each stream
//!    with `since` and `epoch` (`userSince`/`userEpoch` on Connect).
//! 6. **Outside the window the client gets `resyncRequired`**
//!    (`History::recover`): when `since` is older than the window, ahead
//!    of the stream, or of another epoch, the position says so and the
//!    client reports `ResyncRequired`, as it does for a seq that skips or
//!    a new epoch on a live delivery; the app re-syncs that stream from
//!    its own backend.
//! 7. **The edge checks positions** (`Hub::check_positions`, ADR 0044).
//!    A repair needs a trigger: a later frame, or the bus reporting a
//!    loss. A stream's last message lost with neither (a publish into a
//!    NATS server that died, seen by no one; a presence write lost in a
//!    Redis failover) is found by the periodic check of every stream's
//!    (epoch, seq) against history ([`StreamOrder::behind`]), in cluster
//!    mode once per `--position-check-interval-ms`: delivered within
//!    about that long, while the window holds it.
use std::{collections::BTreeMap, time::Duration};

use switchboard_protocol::SharedFrame;
use switchboard_router::Recovery;
use tokio::time::Instant;

/// Early frames held per stream before a repair is forced.
pub(crate) const MAX_PENDING_PER_STREAM: usize = 1024;
/// How long an early frame waits for the missing ones before repair.
pub(crate) const GAP_TIMEOUT: Duration = Duration::from_millis(200);
/// History reads retried while history is unavailable, with backoff up to
/// `MAX_OUTAGE_BACKOFF` (about 11 s in all), before the hole is skipped.
pub(crate) const MAX_OUTAGE_RETRIES: u32 = 8;
pub(crate) const MAX_OUTAGE_BACKOFF: Duration = Duration::from_secs(2);

/// Where a seq stands against the last one delivered on its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seq {
    /// At or below the last one: delivered already.
    Duplicate,
    /// The last one + 1.
    Next,
    /// Further ahead: the seqs between are missing (so far).
    Ahead,
}

/// The edge's one seq rule (the hub's reorder, the writer's merge).
pub(crate) fn classify(last: u64, seq: u64) -> Seq {
    if seq <= last {
        Seq::Duplicate
    } else if seq == last + 1 {
        Seq::Next
    } else {
        Seq::Ahead
    }
}

/// What to do with an arriving frame.
#[derive(Debug)]
pub(crate) enum Arrival {
    /// In order: fan the frame out, then `released` (held frames that it
    /// made contiguous), in that order.
    Next { released: Vec<SharedFrame> },
    /// Delivered already: drop it.
    Duplicate,
    /// Held until the hole before it is filled. `Some`: no repair was
    /// running; read history (`StreamOrder::due_read`) at that instant.
    Held { repair_at: Option<Instant> },
    /// The held-frame limit was reached during a repair: dropped, since
    /// history has it (routers store before they publish); the repair
    /// reads once more.
    Dropped,
}

/// A history read to make: the deliveries after `since` in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HistoryRead {
    pub(crate) since: u64,
    pub(crate) epoch: String,
}

/// How a history answer went, for the gap metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gap {
    /// History had missing frames.
    Repaired,
    /// History was unavailable; the read is retried after a back-off.
    Retried,
    /// History no longer has the hole (or stayed down): it was skipped.
    Unrecoverable,
}

/// What a history answer leads to.
#[derive(Debug)]
pub(crate) struct Answered {
    /// Frames to fan out, in this order.
    pub(crate) deliver: Vec<SharedFrame>,
    pub(crate) gap: Option<Gap>,
    /// Read again at this instant; `None`: the repair is over.
    pub(crate) next_read: Option<Instant>,
}

/// One stream's reorder and repair state.
#[derive(Debug, Default)]
pub(crate) struct StreamOrder {
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
    /// Failed reads in the current repair (the back-off's exponent).
    outages: u32,
    /// A read was handed out (`due_read`) and its answer has not come
    /// back: a loss reported now may be newer than that read.
    reading: bool,
    /// The current repair reads even with nothing held (the sweep after a
    /// possible loss).
    force: bool,
    /// The epoch changed at a frame past seq 1: where the new epoch starts
    /// is read from history (a fenced stream goes on from the seq its
    /// promoted replica held, ADR 0019, and frames from different routers
    /// may arrive out of order).
    epoch_start: bool,
}

impl StreamOrder {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Frames held now (the pending gauge follows this).
    pub(crate) fn held(&self) -> usize {
        self.pending.len()
    }

    /// The epoch of the last seq ("" before any delivery or history).
    pub(crate) fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Seeds the position from a history read, so a frame lost right after
    /// the first subscribe is noticed as a gap.
    pub(crate) fn on_position(&mut self, seq: u64, epoch: &str) {
        if self.known {
            return;
        }
        self.known = true;
        // Frames that already arrived are newer than this read.
        if self.last_seq == 0 {
            self.last_seq = seq;
            self.epoch = epoch.to_owned();
        }
    }

    /// A delivery arrived from the bus. `frame` is kept (cloned) only when
    /// it is held.
    pub(crate) fn on_frame(
        &mut self,
        seq: u64,
        epoch: &str,
        frame: &SharedFrame,
        now: Instant,
    ) -> Arrival {
        if self.epoch != epoch {
            if self.known && self.epoch.is_empty() && self.last_seq == 0 {
                // The stream's first history: its seqs start at 1.
                self.epoch = epoch.to_owned();
            } else if !self.known && self.last_seq == 0 {
                // Never read from history: the first frame sets the position.
                self.epoch = epoch.to_owned();
                self.last_seq = seq.saturating_sub(1);
            } else {
                // A new epoch (history reset, or a failover fenced the
                // stream): it starts at seq 1 or where history says.
                self.epoch = epoch.to_owned();
                self.last_seq = 0;
                self.pending.clear();
                self.overflowed = false;
                if seq > 1 {
                    self.epoch_start = true;
                    self.pending.insert(seq, frame.clone());
                    return Arrival::Held {
                        repair_at: Some(self.start_repair(false, now)),
                    };
                }
            }
        }
        match classify(self.last_seq, seq) {
            Seq::Next => {
                self.last_seq = seq;
                Arrival::Next {
                    released: self.release_contiguous(),
                }
            }
            Seq::Duplicate => Arrival::Duplicate,
            Seq::Ahead => {
                if self.repairing && self.pending.len() >= MAX_PENDING_PER_STREAM {
                    self.overflowed = true;
                    return Arrival::Dropped;
                }
                self.pending.insert(seq, frame.clone());
                if self.repairing {
                    return Arrival::Held { repair_at: None };
                }
                let wait = if self.pending.len() >= MAX_PENDING_PER_STREAM {
                    Duration::ZERO
                } else {
                    GAP_TIMEOUT
                };
                Arrival::Held {
                    repair_at: Some(self.start_repair(false, now + wait)),
                }
            }
        }
    }

    /// The bus (or the hub's fan-out queue) may have lost frames: read
    /// history since the last seq even with nothing held. `Some`: read at
    /// that instant. `None`: a repair is running already and will do: its
    /// next read is made even with nothing held, and a read already on its
    /// way (which may predate the loss) is followed by one more.
    pub(crate) fn on_possible_loss(&mut self, now: Instant) -> Option<Instant> {
        if self.repairing {
            self.force = true;
            if self.reading {
                self.overflowed = true;
            }
            return None;
        }
        Some(self.start_repair(true, now))
    }

    /// Whether history standing at (`seq`, `epoch`) (a position check,
    /// `History::positions`) holds a delivery this stream has not fanned
    /// out: a later seq of its epoch, or any seq of another epoch. A
    /// stream without history yet (empty `epoch`) holds nothing, and a
    /// stream still joining (neither read nor delivered to) is not checked.
    pub(crate) fn behind(&self, seq: u64, epoch: &str) -> bool {
        // A stream still joining is seeded by its join's own read.
        let joining = !self.known && self.epoch.is_empty();
        if epoch.is_empty() || seq == 0 || joining {
            return false;
        }
        if self.epoch.is_empty() || self.epoch == epoch {
            seq > self.last_seq
        } else {
            true
        }
    }

    /// A position check found history ahead of this stream (`behind`) with
    /// nothing on the way to say so: the bus lost the stream's last
    /// frames. `Some`: read at that instant (as `on_possible_loss`). When
    /// history is in another epoch that no delivery brought here, the
    /// stream restarts where history says that epoch starts, as it does
    /// for a new epoch's frame past seq 1.
    pub(crate) fn on_behind(&mut self, seq: u64, epoch: &str, now: Instant) -> Option<Instant> {
        if !self.behind(seq, epoch) {
            return None;
        }
        if !self.repairing && !self.epoch.is_empty() && self.epoch != epoch {
            self.epoch = epoch.to_owned();
            self.last_seq = 0;
            self.known = true;
            self.overflowed = false;
            self.epoch_start = true;
            // Held frames of the old epoch are dropped, as a new epoch's
            // frame drops them (its frames are read from history).
            self.pending.clear();
        }
        self.on_possible_loss(now)
    }

    fn start_repair(&mut self, force: bool, at: Instant) -> Instant {
        self.repairing = true;
        self.outages = 0;
        self.force = force;
        at
    }

    /// A repair's read is due: what to read, or `None` when nothing is left
    /// to repair (the repair is over).
    pub(crate) fn due_read(&mut self) -> Option<HistoryRead> {
        // A forced read covers a stream without an epoch too (no delivery
        // seen, no history at the last read): its first message, lost on
        // the bus, is what such a read finds (issue #19). Not one still
        // joining (no read, no delivery yet): its join's read seeds it.
        let forced = self.force && (self.known || !self.epoch.is_empty());
        if self.pending.is_empty() && !forced {
            self.repairing = false;
            self.force = false;
            return None;
        }
        self.reading = true;
        Some(HistoryRead {
            since: self.last_seq,
            epoch: self.epoch.clone(),
        })
    }

    /// The answer to the read `due_read` asked for. Any error is an outage:
    /// the frames are still in history.
    pub(crate) fn on_history<E>(&mut self, answer: Result<Recovery, E>, now: Instant) -> Answered {
        let forced = std::mem::take(&mut self.force);
        self.reading = false;
        // A stream that had no history when it was joined takes the epoch
        // of its first history, as it would from its first delivery.
        if self.epoch.is_empty()
            && self.last_seq == 0
            && let Ok(r) = &answer
            && !r.position.resync_required
        {
            self.epoch.clone_from(&r.position.epoch);
        }
        let may_wait = self.outages < MAX_OUTAGE_RETRIES;
        // An outage is not a lost message: hold what arrived (bounded) and
        // read again later.
        if answer.is_err() && may_wait && self.pending.len() < MAX_PENDING_PER_STREAM {
            self.outages += 1;
            // A sweep's read with nothing held is still owed: keep it forced.
            self.force = forced;
            let wait = (GAP_TIMEOUT * 2u32.pow(self.outages)).min(MAX_OUTAGE_BACKOFF);
            return Answered {
                deliver: Vec::new(),
                gap: Some(Gap::Retried),
                next_read: Some(now + wait),
            };
        }
        // A new epoch's start: the oldest seq history (or a held frame)
        // has of it. Its frames fill in as any repair's do.
        let started = std::mem::take(&mut self.epoch_start)
            && matches!(&answer, Ok(r) if r.position.epoch == self.epoch);
        if started && let Ok(r) = &answer {
            let oldest = r
                .frames
                .iter()
                .filter_map(|f| f.delivery_position().map(|(_, s)| s));
            if let Some(first) = oldest.chain(self.pending.keys().copied()).min() {
                self.last_seq = first - 1;
            }
        }
        match answer {
            Ok(r) if started || !r.position.resync_required => {
                let mut filled = 0;
                for f in r.frames {
                    if let Some((_, seq)) = f.delivery_position()
                        && seq > self.last_seq
                        && self.pending.insert(seq, f).is_none()
                    {
                        filled += 1;
                    }
                }
                let deliver = self.release_contiguous();
                let overflowed = std::mem::take(&mut self.overflowed);
                let done = self.pending.is_empty() && !overflowed;
                if done {
                    self.repairing = false;
                } else if self.pending.is_empty() {
                    // Frames dropped at the limit may be newer than this
                    // read: read once more even with nothing held.
                    self.force = true;
                }
                Answered {
                    deliver,
                    gap: (filled > 0).then_some(Gap::Repaired),
                    // Still a hole: frames newer than the read were lost too.
                    next_read: (!done).then(|| now + GAP_TIMEOUT),
                }
            }
            other => {
                // History no longer has the missing seqs (or stayed down):
                // deliver what is held, in order; clients see the gap and
                // re-sync from their own last seq.
                self.overflowed = false;
                self.repairing = false;
                // With nothing held (a sweep or a position check), what the
                // window still has goes out instead, and the stream stands
                // where history does: clients see the skip now, and the
                // next check does not find the stream behind again.
                let mut stands_at = 0;
                if self.pending.is_empty()
                    && let Ok(r) = other
                    && !r.position.epoch.is_empty()
                    && (self.epoch.is_empty() || self.epoch == r.position.epoch)
                {
                    self.epoch = r.position.epoch;
                    stands_at = r.position.seq;
                    for f in r.frames {
                        if let Some((_, seq)) = f.delivery_position() {
                            self.pending.insert(seq, f);
                        }
                    }
                }
                let mut deliver = Vec::with_capacity(self.pending.len());
                for (seq, f) in std::mem::take(&mut self.pending) {
                    if seq > self.last_seq {
                        self.last_seq = seq;
                        deliver.push(f);
                    }
                }
                self.last_seq = self.last_seq.max(stands_at);
                Answered {
                    deliver,
                    gap: Some(Gap::Unrecoverable),
                    next_read: None,
                }
            }
        }
    }

    /// Takes the held frames that continue the stream without a hole, and
    /// forgets held ones at or below the last seq (duplicates).
    fn release_contiguous(&mut self) -> Vec<SharedFrame> {
        let mut out = Vec::new();
        if self.pending.is_empty() {
            return out;
        }
        while let Some(next) = self.pending.remove(&(self.last_seq + 1)) {
            self.last_seq += 1;
            out.push(next);
        }
        while let Some(e) = self.pending.first_entry()
            && classify(self.last_seq, *e.key()) == Seq::Duplicate
        {
            e.remove();
        }
        out
    }
}

#[cfg(test)]
mod tests;
