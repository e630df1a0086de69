//! The writer task of a connection: takes the mailbox into the socket's
//! write side (`Wire`), finishes what a direct write from the fan-out left
//! (ADR 0028), sends heartbeats, enforces token expiry, writes a
//! subscription's recovered history before its held live deliveries so
//! each stream reaches the socket in seq order, and gives up on a socket
//! whose writes stop making progress.
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use fastwebsockets::OpCode;
use switchboard_protocol::{
    CloseReason, epoch_hash, now_ms,
    v1::{ServerFrame, TokenExpiring, server_frame},
};
use tokio::{io::AsyncWrite, time::Instant};

use crate::{
    mailbox::{ConnHandle, Inbox, Next, Outbound, Recovered, State},
    state::{SessionContext, SessionSettings},
    wire::{BatchWriter, FLUSH_AT_BYTES, Live, Wire},
};

/// Messages taken from the mailbox in one turn before writing.
const TAKE_PER_TURN: usize = 64;
/// Time allowed for the last frames: what is left of the batch, the
/// Disconnect and the close frame (or the echo of the peer's close).
pub(super) const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// The `reconnectDelayMs` advised with a close: drawn uniformly from the
/// reason's range (`CloseReason::reconnect_delay_range_ms`), 0 for the
/// reasons that must not reconnect.
pub(super) fn reconnect_delay_ms(reason: CloseReason, settings: &SessionSettings) -> u32 {
    let spread = u32::try_from(settings.reconnect_jitter_max.as_millis()).unwrap_or(u32::MAX);
    let range = reason.reconnect_delay_range_ms(spread);
    if range.is_empty() {
        0
    } else {
        rand::random_range(range)
    }
}

/// Why a socket was reset (SO_LINGER 0) instead of closed in order: its
/// peer stopped taking bytes, and an orderly close would leave the kernel
/// holding the unsent bytes in an orphan socket, probing a zero window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reset {
    /// No byte went out for a heartbeat interval while a batch waited.
    WriteStalled,
    /// The last frames did not go out within `CLOSE_WRITE_TIMEOUT`.
    CloseUnwritten,
}

impl Reset {
    /// The `reason` label of `switchboard_edge_socket_resets_total`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Reset::WriteStalled => "write_stalled",
            Reset::CloseUnwritten => "close_unwritten",
        }
    }
}

/// Why the writer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriterExit {
    /// We closed the socket for this reason, and its last frames went out.
    Closed(CloseReason),
    /// The socket failed or the peer went away.
    Gone,
    /// The socket stopped taking bytes: reset it. The reason is the close
    /// counted (`slow_consumer` for a stall while open; `None`: the peer
    /// had closed first).
    Stalled(Option<CloseReason>, Reset),
}

/// Why a write on a rare path (recovery, the last frames) stopped.
enum Stop {
    Gone,
    /// No byte went out for the limit.
    Stalled,
    /// A close was requested meanwhile.
    Close(CloseReason),
}

/// A message that takes the writer more than one step.
enum Slow {
    Recovered(Box<Recovered>),
    Stop,
}

pub(crate) struct Writer<W> {
    conn: ConnHandle<W>,
    rx: Inbox<W>,
    token_expires_at_ms: i64,
    /// Settings and metrics, shared by every socket.
    ctx: Arc<SessionContext>,
    warned: bool,
    deadline_dirty: bool,
    /// A batch was waiting at the last heartbeat tick.
    waited_at_tick: bool,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    /// A writer for `conn`, whose mailbox takes `out` as the socket's
    /// write side.
    pub(crate) fn new(
        out: BatchWriter<W>,
        conn: ConnHandle<W>,
        rx: Inbox<W>,
        token_expires_at_ms: i64,
        deflate_min_bytes: Option<usize>,
        ctx: Arc<SessionContext>,
    ) -> Self {
        conn.attach(Wire::new(out, conn.encoding(), deflate_min_bytes));
        Writer {
            conn,
            rx,
            token_expires_at_ms,
            ctx,
            warned: false,
            deadline_dirty: false,
            waited_at_tick: false,
        }
    }

    /// The socket's write side, once the writer is done with it (taken
    /// from the mailbox: no frame is written to it from here on).
    pub(crate) fn into_out(self) -> Option<BatchWriter<W>> {
        self.rx.lock().wire.take().map(|w| w.out)
    }

    /// Runs `f` on the mailbox and the write side, under their lock.
    fn with<R>(&self, f: impl FnOnce(&mut State<W>, &mut Wire<W>) -> R) -> Option<R> {
        let mut st = self.rx.lock();
        let mut wire = st.wire.take()?;
        let r = f(&mut st, &mut wire);
        st.wire = Some(wire);
        Some(r)
    }

    /// Runs until the socket closes. Takes `&mut self` so that the writer
    /// is stored once in the connection's task, not copied into this future.
    ///
    /// A batch goes out in steps, as fast as the socket takes it; while it
    /// waits on a full socket, close requests and the heartbeat are still
    /// served (new messages wait in the bounded mailbox), so a peer that
    /// stops reading is closed as a slow consumer by its mailbox or by the
    /// stall check, whichever comes first.
    pub(crate) async fn run(&mut self) -> WriterExit {
        let interval = self.ctx.settings.heartbeat_interval;
        let silence_limit_ms = 2 * interval.as_millis() as i64;
        // One timer for the heartbeat and the token's deadline, whichever
        // comes first: every idle socket carries it (ADR 0030).
        let mut beat_at = Instant::now() + interval;
        let mut token_at = self.token_deadline();
        let timer = tokio::time::sleep_until(beat_at.min(token_at));
        tokio::pin!(timer);
        loop {
            if self.deadline_dirty {
                self.deadline_dirty = false;
                token_at = self.token_deadline();
                timer.as_mut().reset(beat_at.min(token_at));
            }
            tokio::select! {
                biased;
                next = self.rx.next(true, true) => match next {
                    Next::Close(reason) => return Box::pin(self.finish(reason)).await,
                    Next::Wrote(Ok(n)) => self.sent(n),
                    Next::Wrote(Err(_)) => return WriterExit::Gone,
                    Next::Messages => {
                        let slow = match self.take_messages() {
                            Ok(slow) => slow,
                            Err(exit) => return exit,
                        };
                        let done = match slow {
                            None => Ok(()),
                            // Boxed: rare, and their await state would
                            // otherwise be part of every socket's task.
                            Some(Slow::Recovered(r)) => Box::pin(self.recovered(*r)).await,
                            Some(Slow::Stop) => Err(Box::pin(self.stop()).await),
                        };
                        if let Err(exit) = done {
                            return exit;
                        }
                    }
                },
                _ = &mut timer => {
                    let now = Instant::now();
                    if now >= beat_at {
                        // Missed beats are not made up: the next is an interval on.
                        beat_at = now + interval;
                        if let Some(exit) = self.beat(silence_limit_ms) {
                            return exit;
                        }
                    }
                    if self.token_expires_at_ms > 0 && now >= token_at {
                        self.token_due();
                    }
                    timer.as_mut().reset(beat_at.min(token_at));
                }
            }
            self.count_frames();
        }
    }

    /// A heartbeat: the stall check, the silence check, then a ping.
    fn beat(&mut self, silence_limit_ms: i64) -> Option<WriterExit> {
        let Some((stalled, waiting)) = self.with(|_, wire| self.at_tick(wire)) else {
            return Some(WriterExit::Gone);
        };
        self.waited_at_tick = waiting;
        if stalled {
            return Some(WriterExit::Stalled(
                Some(CloseReason::SlowConsumer),
                Reset::WriteStalled,
            ));
        }
        let silent_ms = now_ms() - self.conn.last_seen().load(Ordering::Relaxed);
        if silent_ms > silence_limit_ms {
            self.conn.close(CloseReason::HeartbeatTimeout);
            return None;
        }
        // Behind a waiting batch a ping cannot go out, and TLS would take
        // it into its own buffer: false progress.
        if !waiting {
            self.with(|_, wire| wire.out.push(OpCode::Ping, &[]));
        }
        None
    }

    /// The token's warning or expiry is due.
    fn token_due(&mut self) {
        self.deadline_dirty = true;
        if now_ms() >= self.token_expires_at_ms {
            self.conn.close(CloseReason::TokenExpired);
        } else if !self.warned {
            self.warned = true;
            let frame = ServerFrame {
                id: 0,
                kind: Some(server_frame::Kind::TokenExpiring(TokenExpiring {
                    token_expires_at_ms: self.token_expires_at_ms,
                })),
            };
            let bytes = self.conn.encoding().encode_server(&frame);
            let metrics = &self.ctx.metrics;
            self.with(|_, wire| wire.write(&bytes, metrics));
        }
    }

    /// Takes what the mailbox holds into the batch, under one lock, so no
    /// direct write from the fan-out lands between a message taken and its
    /// bytes buffered. Stops at a message of several steps (returned, the
    /// write side marked busy meanwhile) or a full batch.
    fn take_messages(&mut self) -> Result<Option<Slow>, WriterExit> {
        let conn = &self.conn;
        let metrics = &self.ctx.metrics;
        let mut overflow = false;
        let mut token = None;
        let slow = self.with(|st, wire| {
            for _ in 0..TAKE_PER_TURN {
                if wire.out.buffered() >= FLUSH_AT_BYTES {
                    break;
                }
                let Some(msg) = st.pop() else { break };
                conn.dequeued(&msg);
                match msg {
                    Outbound::Reply(bytes) => wire.write(&bytes, metrics),
                    Outbound::Shared(frame) => {
                        overflow |= wire.live(&frame, metrics) == Live::Overflow
                    }
                    Outbound::BeginRecovery(key) => wire.begin_recovery(key),
                    Outbound::Forget(key) => wire.forget(&key),
                    Outbound::Control(control) => {
                        let (opcode, payload) = *control;
                        wire.out.push(opcode, &payload);
                    }
                    Outbound::TokenExpiry(ms) => token = Some(ms),
                    Outbound::Recovered(r) => {
                        wire.busy = true;
                        return Some(Slow::Recovered(r));
                    }
                    Outbound::Stop => {
                        wire.busy = true;
                        return Some(Slow::Stop);
                    }
                }
            }
            None
        });
        if overflow {
            self.conn.close(CloseReason::SlowConsumer);
        }
        if let Some(ms) = token {
            self.token_expires_at_ms = ms;
            self.warned = false;
            self.deadline_dirty = true;
        }
        slow.ok_or(WriterExit::Gone)
    }

    /// At a heartbeat tick: whether a batch has waited since the previous
    /// tick without a byte going out, i.e. no progress for at least one
    /// interval (found at most two intervals after the last progress). A
    /// slow reader's socket takes bytes now and then, which restarts this.
    /// Also whether a batch is waiting now.
    fn at_tick(&self, wire: &mut Wire<W>) -> (bool, bool) {
        let waiting = wire.out.pending();
        let stalled = waiting && self.waited_at_tick && !wire.progressed;
        wire.progressed = false;
        (stalled, waiting)
    }

    /// Counts bytes the socket took (per write, not per frame: the
    /// counters are atomics shared by every writer).
    fn sent(&mut self, bytes: usize) {
        if bytes > 0 {
            self.ctx.metrics.bytes_out.increment(bytes as u64);
        }
    }

    /// Counts the frames buffered since the last count, once per turn.
    fn count_frames(&mut self) {
        let frames = self.with(|_, wire| wire.out.take_frames()).unwrap_or(0);
        if frames > 0 {
            self.ctx.metrics.frames_out.increment(u64::from(frames));
        }
    }

    fn token_deadline(&self) -> Instant {
        if self.token_expires_at_ms <= 0 {
            return Instant::now() + Duration::from_secs(86_400);
        }
        let target = if self.warned {
            self.token_expires_at_ms
        } else {
            self.token_expires_at_ms - self.ctx.settings.token_expiry_warning.as_millis() as i64
        };
        let wait_ms = (target - now_ms()).max(0) as u64;
        Instant::now() + Duration::from_millis(wait_ms)
    }

    /// The peer closed: its close echo may still be in the batch.
    async fn stop(&mut self) -> WriterExit {
        match self.flush_within(CLOSE_WRITE_TIMEOUT, false).await {
            Err(Stop::Stalled) => WriterExit::Stalled(None, Reset::CloseUnwritten),
            _ => WriterExit::Gone,
        }
    }

    /// The subscription's reply, the missed frames, then the held live
    /// ones. The write side is busy meanwhile: the fan-out queues.
    async fn recovered(&mut self, r: Recovered) -> Result<(), WriterExit> {
        let Recovered {
            stream,
            reply,
            frames,
        } = r;
        let metrics = self.ctx.metrics.clone();
        self.with(|_, wire| wire.write(&reply, &metrics));
        let (mut last, mut epoch) = (0, epoch_hash(""));
        for f in &frames {
            let seq = f.delivery_position().map(|(_, s)| s).unwrap_or(0);
            last = last.max(seq);
            epoch = epoch_hash(f.delivery_epoch().unwrap_or(""));
            let full = self.with(|_, wire| {
                wire.write_shared(f, &metrics);
                wire.out.buffered() >= FLUSH_AT_BYTES
            });
            if full.ok_or(WriterExit::Gone)? {
                self.flush_recovery().await?;
            }
        }
        let held = self
            .with(|_, wire| wire.recovered(stream, last, epoch))
            .ok_or(WriterExit::Gone)?;
        for f in held {
            let (live, full) = self
                .with(|_, wire| {
                    let live = wire.live(&f, &metrics);
                    (live, wire.out.buffered() >= FLUSH_AT_BYTES)
                })
                .ok_or(WriterExit::Gone)?;
            if live == Live::Overflow {
                self.conn.close(CloseReason::SlowConsumer);
            }
            if full {
                self.flush_recovery().await?;
            }
        }
        self.with(|_, wire| wire.busy = false);
        Ok(())
    }

    /// Writes a full batch in the middle of a recovery (the buffer stays
    /// bounded), under the same stall limit and close requests as the loop.
    async fn flush_recovery(&mut self) -> Result<(), WriterExit> {
        let limit = self.ctx.settings.heartbeat_interval;
        match self.flush_within(limit, true).await {
            Ok(()) => Ok(()),
            Err(Stop::Gone) => Err(WriterExit::Gone),
            Err(Stop::Stalled) => Err(WriterExit::Stalled(
                Some(CloseReason::SlowConsumer),
                Reset::WriteStalled,
            )),
            Err(Stop::Close(reason)) => Err(self.finish(reason).await),
        }
    }

    /// Writes everything owed on a rare path (its timer is not part of
    /// every socket's task), giving up once no byte went out for `limit`:
    /// each write that makes progress restarts the clock.
    async fn flush_within(&mut self, limit: Duration, on_close: bool) -> Result<(), Stop> {
        loop {
            self.count_frames();
            let pending = self.with(|_, wire| wire.out.pending()).ok_or(Stop::Gone)?;
            if !pending {
                return Ok(());
            }
            match tokio::time::timeout(limit, self.rx.next(on_close, false)).await {
                Ok(Next::Close(reason)) => return Err(Stop::Close(reason)),
                Ok(Next::Wrote(Ok(n))) => self.sent(n),
                Ok(Next::Wrote(Err(_))) => return Err(Stop::Gone),
                Ok(Next::Messages) => unreachable!("next(_, false) takes no message"),
                Err(_) => return Err(Stop::Stalled),
            }
        }
    }

    /// Sends Disconnect + close with the reason's code and advice, after
    /// what is left of the batch, within `CLOSE_WRITE_TIMEOUT` (a peer that
    /// stopped reading may never take them).
    async fn finish(&mut self, reason: CloseReason) -> WriterExit {
        let delay = reconnect_delay_ms(reason, &self.ctx.settings);
        let bytes = self
            .conn
            .encoding()
            .encode_server(&reason.disconnect_frame(delay));
        let conn = &self.conn;
        let metrics = &self.ctx.metrics;
        // Replies already queued (say, the error that caused this close)
        // go first; queued deliveries are dropped, the client resumes.
        // Nothing is written after the close frame: the write side stays busy.
        let closed = self.with(|st, wire| {
            wire.busy = true;
            while let Some(msg) = st.pop() {
                conn.dequeued(&msg);
                if let Outbound::Reply(b) = msg {
                    wire.write(&b, metrics);
                }
            }
            wire.write(&bytes, metrics);
            wire.out
                .push_close(reason.code(), reason.as_str().as_bytes());
        });
        if closed.is_none() {
            return WriterExit::Gone;
        }
        let written = tokio::time::timeout(
            CLOSE_WRITE_TIMEOUT,
            self.flush_within(CLOSE_WRITE_TIMEOUT, false),
        )
        .await;
        match written {
            Ok(Ok(())) | Ok(Err(Stop::Gone)) => WriterExit::Closed(reason),
            Ok(Err(_)) | Err(_) => WriterExit::Stalled(Some(reason), Reset::CloseUnwritten),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ratelimit::Rate;

    use super::*;

    fn settings(reconnect_jitter_max: Duration) -> SessionSettings {
        let rate = Rate {
            per_sec: 1.0,
            burst: 1.0,
        };
        SessionSettings {
            node_id: "edge-1".into(),
            heartbeat_interval: Duration::from_secs(25),
            max_frame_bytes: 1024,
            max_subscriptions: 10,
            max_presence_watches: 10,
            rate_requests: rate,
            rate_publish: rate,
            token_expiry_warning: Duration::from_secs(60),
            reconnect_jitter_max,
        }
    }

    #[test]
    fn every_reconnectable_close_advises_a_nonzero_jittered_delay() {
        let s = settings(Duration::from_millis(1000));
        for r in CloseReason::ALL {
            let delays: Vec<u32> = (0..2000).map(|_| reconnect_delay_ms(r, &s)).collect();
            if !r.reconnect() {
                assert!(delays.iter().all(|&d| d == 0), "{r:?}: {delays:?}");
                continue;
            }
            let range = r.reconnect_delay_range_ms(1000);
            assert!(delays.iter().all(|&d| d > 0), "{r:?} advises 0");
            assert!(delays.iter().all(|d| range.contains(d)), "{r:?}");
            // Spread out, not one value: both halves of the range are used.
            let mid = range.start + (range.end - range.start) / 2;
            assert!(delays.iter().any(|&d| d < mid), "{r:?}");
            assert!(delays.iter().any(|&d| d >= mid), "{r:?}");
        }
        // A drain stays below its configured maximum.
        let drained: Vec<u32> = (0..2000)
            .map(|_| reconnect_delay_ms(CloseReason::Shutdown, &s))
            .collect();
        assert!(drained.iter().all(|&d| (1..1000).contains(&d)));
        // Even a drain spread of 1 ms advises more than "at once".
        let tiny = settings(Duration::from_millis(1));
        assert_eq!(reconnect_delay_ms(CloseReason::Shutdown, &tiny), 1);
    }
}
