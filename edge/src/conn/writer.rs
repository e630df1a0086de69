//! The writer half of a connection: drains the mailbox into the socket,
//! sends heartbeats, enforces token expiry, merges recovered history with
//! live deliveries so each stream reaches the socket in seq order, and
//! gives up on a socket whose writes stop making progress.
use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use fastwebsockets::OpCode;
use switchboard_protocol::{
    CloseReason, Encoding, SharedFrame, StreamKey, deflate, now_ms,
    v1::{ServerFrame, TokenExpiring, server_frame},
};
use tokio::{io::AsyncWrite, time::Instant};

use crate::{
    conn::batch_writer::{BatchWriter, FLUSH_AT_BYTES},
    mailbox::{ConnHandle, Inbox, Next, Outbound, Recovered},
    order,
    state::{SessionContext, SessionSettings},
};

/// Live deliveries held per stream while its recovery is read; beyond
/// this the socket is closed as a slow consumer and resumes later.
const MAX_HELD_PER_STREAM: usize = 4096;
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

enum StreamState {
    Recovering(Vec<SharedFrame>),
    /// The last seq written, and a hash of its epoch: a new epoch restarts
    /// the stream (after a state-tier failover or reset its seqs may be at
    /// or below the old epoch's), so it is never a duplicate.
    Live {
        seq: u64,
        epoch: u64,
    },
}

/// A stable hash of an epoch (FNV-1a): a socket keeps 8 bytes per
/// stream, not the string.
fn epoch_hash(epoch: &str) -> u64 {
    epoch.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
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

pub(crate) struct Writer<W> {
    out: BatchWriter<W>,
    conn: ConnHandle,
    rx: Inbox,
    streams: HashMap<StreamKey, StreamState>,
    /// Unix ms of the last frame from the client (written by the reader).
    last_seen_ms: Arc<AtomicI64>,
    token_expires_at_ms: i64,
    /// Settings and metrics, shared by every socket.
    ctx: Arc<SessionContext>,
    warned: bool,
    deadline_dirty: bool,
    /// permessage-deflate: frames from this many bytes go compressed; 0
    /// when the socket did not negotiate it. (4 bytes, in the padding
    /// after the flags: every idle socket holds a writer.)
    deflate_min_bytes: u32,
    /// Bytes went out since the last heartbeat tick.
    progressed: bool,
    /// A batch was waiting at the last heartbeat tick.
    waited_at_tick: bool,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub(crate) fn new(
        out: BatchWriter<W>,
        conn: ConnHandle,
        rx: Inbox,
        last_seen_ms: Arc<AtomicI64>,
        token_expires_at_ms: i64,
        deflate_min_bytes: Option<usize>,
        ctx: Arc<SessionContext>,
    ) -> Self {
        Writer {
            out,
            conn,
            rx,
            streams: HashMap::new(),
            last_seen_ms,
            token_expires_at_ms,
            ctx,
            warned: false,
            deadline_dirty: false,
            // Compress frames from this many bytes on; `None`: this socket
            // did not negotiate permessage-deflate.
            deflate_min_bytes: deflate_min_bytes
                .map_or(0, |n| n.clamp(1, u32::MAX as usize) as u32),
            progressed: false,
            waited_at_tick: false,
        }
    }

    /// The socket's write side, once the writer is done with it.
    pub(crate) fn into_out(self) -> BatchWriter<W> {
        self.out
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
        let mut heartbeat = tokio::time::interval_at(Instant::now() + interval, interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let silence_limit_ms = 2 * interval.as_millis() as i64;
        let token_timer = tokio::time::sleep_until(self.token_deadline());
        tokio::pin!(token_timer);
        loop {
            if self.deadline_dirty {
                self.deadline_dirty = false;
                token_timer.as_mut().reset(self.token_deadline());
            }
            let waiting = self.out.pending();
            if waiting {
                self.count_frames();
            }
            tokio::select! {
                biased;
                sent = self.out.write_some(), if waiting => match sent {
                    Ok(n) => self.sent(n),
                    Err(_) => return WriterExit::Gone,
                },
                next = self.rx.recv(!waiting) => {
                    let msg = match next {
                        Next::Close(reason) => return Box::pin(self.finish(reason)).await,
                        Next::Message(msg) => msg,
                    };
                    if let Err(exit) = self.handle(msg).await {
                        return exit;
                    }
                    // Drain what is already queued before writing.
                    for _ in 0..64 {
                        if self.out.buffered() >= FLUSH_AT_BYTES {
                            break;
                        }
                        let Some(msg) = self.rx.try_recv() else { break };
                        if let Err(exit) = self.handle(msg).await {
                            return exit;
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    if self.stalled_at_tick() {
                        return WriterExit::Stalled(Some(CloseReason::SlowConsumer), Reset::WriteStalled);
                    }
                    let silent_ms = now_ms() - self.last_seen_ms.load(Ordering::Relaxed);
                    if silent_ms > silence_limit_ms {
                        self.conn.close(CloseReason::HeartbeatTimeout);
                        continue;
                    }
                    // Behind a waiting batch a ping cannot go out, and TLS
                    // would take it into its own buffer: false progress.
                    if !waiting {
                        self.out.push(OpCode::Ping, &[]);
                    }
                }
                _ = &mut token_timer, if self.token_expires_at_ms > 0 => {
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
                        self.write(&bytes);
                    }
                }
            }
        }
    }

    /// At a heartbeat tick: whether a batch has waited since the previous
    /// tick without a byte going out, i.e. no progress for at least one
    /// interval (found at most two intervals after the last progress). A
    /// slow reader's socket takes bytes now and then, which restarts this.
    fn stalled_at_tick(&mut self) -> bool {
        let waiting = self.out.pending();
        let stalled = waiting && self.waited_at_tick && !self.progressed;
        (self.waited_at_tick, self.progressed) = (waiting, false);
        stalled
    }

    /// Counts bytes the socket took (per write, not per frame: the
    /// counters are atomics shared by every writer).
    fn sent(&mut self, bytes: usize) {
        self.progressed = true;
        if bytes > 0 {
            self.ctx.metrics.bytes_out.increment(bytes as u64);
        }
    }

    /// Counts the frames of a batch about to be written, once per batch.
    fn count_frames(&mut self) {
        let frames = self.out.take_frames();
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

    async fn handle(&mut self, msg: Outbound) -> Result<(), WriterExit> {
        let enc = self.conn.encoding();
        match msg {
            Outbound::Reply(bytes) => {
                self.conn.dequeued(bytes.len());
                self.write(&bytes);
                Ok(())
            }
            Outbound::Shared(frame) => {
                let len = frame.encoded(enc).len();
                self.conn.dequeued(len);
                self.live(frame);
                Ok(())
            }
            Outbound::BeginRecovery(key) => {
                self.streams
                    .insert(key, StreamState::Recovering(Vec::new()));
                Ok(())
            }
            // Boxed, like `finish`: rare, and its await state would
            // otherwise be part of every socket's task.
            Outbound::Recovered(r) => Box::pin(self.recovered(*r)).await,
            Outbound::Forget(key) => {
                self.streams.remove(&key);
                Ok(())
            }
            Outbound::Control(control) => {
                let (opcode, payload) = *control;
                self.out.push(opcode, &payload);
                Ok(())
            }
            // Boxed, like `finish`.
            Outbound::Stop => Err(Box::pin(self.stop()).await),
            Outbound::TokenExpiry(ms) => {
                self.token_expires_at_ms = ms;
                self.warned = false;
                self.deadline_dirty = true;
                Ok(())
            }
        }
    }

    /// The peer closed: its close echo may still be in the batch.
    async fn stop(&mut self) -> WriterExit {
        match self.flush_within(CLOSE_WRITE_TIMEOUT, false).await {
            Err(Stop::Stalled) => WriterExit::Stalled(None, Reset::CloseUnwritten),
            _ => WriterExit::Gone,
        }
    }

    /// The subscription's reply, the missed frames, then the held live ones.
    async fn recovered(&mut self, r: Recovered) -> Result<(), WriterExit> {
        let Recovered {
            stream,
            reply,
            frames,
        } = r;
        self.conn.dequeued(reply.len());
        self.write(&reply);
        let (mut last, mut epoch) = (0, epoch_hash(""));
        for f in &frames {
            let seq = f.delivery_position().map(|(_, s)| s).unwrap_or(0);
            self.write_shared(f);
            last = last.max(seq);
            epoch = epoch_hash(f.delivery_epoch().unwrap_or(""));
            if self.out.buffered() >= FLUSH_AT_BYTES {
                self.flush_recovery().await?;
            }
        }
        let held = match self
            .streams
            .insert(stream, StreamState::Live { seq: last, epoch })
        {
            Some(StreamState::Recovering(held)) => held,
            _ => Vec::new(),
        };
        for f in held {
            self.live(f);
            if self.out.buffered() >= FLUSH_AT_BYTES {
                self.flush_recovery().await?;
            }
        }
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
        while self.out.pending() {
            self.count_frames();
            let sent = tokio::select! {
                biased;
                next = self.rx.recv(false), if on_close => match next {
                    Next::Close(reason) => return Err(Stop::Close(reason)),
                    Next::Message(_) => unreachable!("recv(false) takes no message"),
                },
                sent = tokio::time::timeout(limit, self.out.write_some()) => sent,
            };
            match sent {
                Ok(Ok(n)) => self.sent(n),
                Ok(Err(_)) => return Err(Stop::Gone),
                Err(_) => return Err(Stop::Stalled),
            }
        }
        Ok(())
    }

    /// A live frame: deliveries pass the per-stream order filter.
    fn live(&mut self, frame: SharedFrame) {
        if let Some((key, seq)) = frame.delivery_position() {
            match self.streams.get_mut(&key) {
                Some(StreamState::Recovering(held)) => {
                    if held.len() >= MAX_HELD_PER_STREAM {
                        self.conn.close(CloseReason::SlowConsumer);
                    } else {
                        held.push(frame);
                    }
                    return;
                }
                Some(StreamState::Live { seq: last, epoch }) => {
                    let this = epoch_hash(frame.delivery_epoch().unwrap_or(""));
                    // The hub's rule: this merge and the reorder agree,
                    // within an epoch.
                    if this == *epoch && order::classify(*last, seq) == order::Seq::Duplicate {
                        self.ctx.metrics.duplicates_dropped.increment(1);
                        return;
                    }
                    (*last, *epoch) = (seq, this);
                }
                // Not (or no longer) subscribed on this socket.
                None => return,
            }
        }
        self.write_shared(&frame);
    }

    fn data_opcode(&self) -> OpCode {
        if self.conn.encoding() == Encoding::Json {
            OpCode::Text
        } else {
            OpCode::Binary
        }
    }

    /// Buffers one data frame of this socket's own (a reply); the loop
    /// flushes it with the rest of the batch. On a compressing socket a
    /// long one is compressed here (per-thread state, nothing kept).
    fn write(&mut self, bytes: &Bytes) {
        let opcode = self.data_opcode();
        let min = self.deflate_min_bytes as usize;
        if min > 0 && bytes.len() >= min {
            let packed = deflate::compress(bytes);
            let smaller = packed.len() < bytes.len();
            let sent = if smaller { packed.len() } else { bytes.len() };
            let m = &self.ctx.metrics.deflate;
            m.compressed(&m.replies, bytes.len(), sent);
            if smaller {
                self.out.push_frame(opcode, true, &packed);
                return;
            }
        }
        self.out.push(opcode, bytes);
    }

    /// Buffers a frame shared with other sockets: on a compressing socket
    /// its compressed form, made once by the first socket that needs it.
    fn write_shared(&mut self, frame: &SharedFrame) {
        let opcode = self.data_opcode();
        let enc = self.conn.encoding();
        if self.deflate_min_bytes == 0 {
            self.out.push(opcode, frame.encoded(enc));
            return;
        }
        let d = frame.deflated(enc, self.deflate_min_bytes as usize);
        if d.compressed_now {
            let m = &self.ctx.metrics.deflate;
            m.compressed(&m.shared, frame.encoded(enc).len(), d.bytes.len());
        }
        self.out.push_frame(opcode, d.compressed, d.bytes);
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
        // Replies already queued (say, the error that caused this close)
        // go first; queued deliveries are dropped, the client resumes.
        while let Some(msg) = self.rx.try_recv() {
            if let Outbound::Reply(b) = msg {
                self.write(&b);
            }
        }
        self.write(&bytes);
        self.out
            .push_close(reason.code(), reason.as_str().as_bytes());
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
