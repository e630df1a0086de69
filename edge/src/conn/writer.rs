//! The writer half of a connection: drains the mailbox into the socket,
//! sends heartbeats, enforces token expiry, and merges recovered history
//! with live deliveries so each stream reaches the socket in seq order.
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
    metrics::EdgeMetrics,
    order,
};

/// Live deliveries held per stream while its recovery is read; beyond
/// this the socket is closed as a slow consumer and resumes later.
const MAX_HELD_PER_STREAM: usize = 4096;
/// Time allowed for the final Disconnect + close frames.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

pub(crate) struct WriterSettings {
    pub(crate) heartbeat_interval: Duration,
    pub(crate) token_expiry_warning: Duration,
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
pub(crate) enum WriterExit {
    /// We closed the socket for this reason.
    Closed(CloseReason),
    /// The socket failed or the peer went away.
    Gone,
}

pub(crate) struct Writer<W> {
    out: BatchWriter<W>,
    conn: ConnHandle,
    rx: Inbox,
    streams: HashMap<StreamKey, StreamState>,
    /// Unix ms of the last frame from the client (written by the reader).
    last_seen_ms: Arc<AtomicI64>,
    token_expires_at_ms: i64,
    warned: bool,
    deadline_dirty: bool,
    /// permessage-deflate: frames from this many bytes go compressed; 0
    /// when the socket did not negotiate it. (4 bytes, in the padding
    /// after the flags: every idle socket holds a writer.)
    deflate_min_bytes: u32,
    settings: WriterSettings,
    metrics: Arc<EdgeMetrics>,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        out: BatchWriter<W>,
        conn: ConnHandle,
        rx: Inbox,
        last_seen_ms: Arc<AtomicI64>,
        token_expires_at_ms: i64,
        settings: WriterSettings,
        deflate_min_bytes: Option<usize>,
        metrics: Arc<EdgeMetrics>,
    ) -> Self {
        Writer {
            out,
            conn,
            rx,
            streams: HashMap::new(),
            last_seen_ms,
            token_expires_at_ms,
            warned: false,
            deadline_dirty: false,
            // Compress frames from this many bytes on; `None`: this socket
            // did not negotiate permessage-deflate.
            deflate_min_bytes: deflate_min_bytes
                .map_or(0, |n| n.clamp(1, u32::MAX as usize) as u32),
            settings,
            metrics,
        }
    }

    /// Runs until the socket closes. Takes `&mut self` so that the writer
    /// is stored once in the connection's task, not copied into this future.
    pub(crate) async fn run(&mut self) -> WriterExit {
        let mut heartbeat = tokio::time::interval_at(
            Instant::now() + self.settings.heartbeat_interval,
            self.settings.heartbeat_interval,
        );
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let silence_limit_ms = 2 * self.settings.heartbeat_interval.as_millis() as i64;
        let token_timer = tokio::time::sleep_until(self.token_deadline());
        tokio::pin!(token_timer);
        loop {
            // One flush (one syscall) per loop turn, i.e. per drained batch.
            if self.out.buffered() > 0 && self.flush().await.is_err() {
                return WriterExit::Gone;
            }
            if self.deadline_dirty {
                self.deadline_dirty = false;
                token_timer.as_mut().reset(self.token_deadline());
            }
            tokio::select! {
                biased;
                next = self.rx.recv() => {
                    let msg = match next {
                        Next::Close(closing) => {
                            Box::pin(self.finish(closing.reason, closing.reconnect_delay_ms)).await;
                            return WriterExit::Closed(closing.reason);
                        }
                        Next::Message(msg) => msg,
                    };
                    if self.handle(msg).await.is_err() {
                        return WriterExit::Gone;
                    }
                    // Drain what is already queued before yielding.
                    for _ in 0..64 {
                        if self.out.buffered() >= FLUSH_AT_BYTES {
                            break;
                        }
                        let Some(msg) = self.rx.try_recv() else { break };
                        if self.handle(msg).await.is_err() {
                            return WriterExit::Gone;
                        }
                    }
                }
                _ = heartbeat.tick() => {
                    let silent_ms = now_ms() - self.last_seen_ms.load(Ordering::Relaxed);
                    if silent_ms > silence_limit_ms {
                        self.conn.close(CloseReason::HeartbeatTimeout, 0);
                        continue;
                    }
                    self.out.push(OpCode::Ping, &[]);
                }
                _ = &mut token_timer, if self.token_expires_at_ms > 0 => {
                    self.deadline_dirty = true;
                    if now_ms() >= self.token_expires_at_ms {
                        self.conn.close(CloseReason::TokenExpired, 0);
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

    fn token_deadline(&self) -> Instant {
        if self.token_expires_at_ms <= 0 {
            return Instant::now() + Duration::from_secs(86_400);
        }
        let target = if self.warned {
            self.token_expires_at_ms
        } else {
            self.token_expires_at_ms - self.settings.token_expiry_warning.as_millis() as i64
        };
        let wait_ms = (target - now_ms()).max(0) as u64;
        Instant::now() + Duration::from_millis(wait_ms)
    }

    async fn handle(&mut self, msg: Outbound) -> Result<(), ()> {
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
            Outbound::Stop => {
                // The close echo may still be in the batch buffer.
                let _ = self.flush().await;
                Err(())
            }
            Outbound::TokenExpiry(ms) => {
                self.token_expires_at_ms = ms;
                self.warned = false;
                self.deadline_dirty = true;
                Ok(())
            }
        }
    }

    /// The subscription's reply, the missed frames, then the held live ones.
    async fn recovered(&mut self, r: Recovered) -> Result<(), ()> {
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
                self.flush().await.map_err(|_| ())?;
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
                self.flush().await.map_err(|_| ())?;
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
                        self.conn.close(CloseReason::SlowConsumer, 0);
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
                        self.metrics.duplicates_dropped.increment(1);
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

    /// Writes the batch, counting its frames and bytes once per batch (the
    /// counters are atomics shared by every writer).
    async fn flush(&mut self) -> std::io::Result<()> {
        let (frames, bytes) = self.out.take_counts();
        self.metrics.frames_out.increment(frames);
        self.metrics.bytes_out.increment(bytes);
        self.out.flush().await
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
            let m = &self.metrics.deflate;
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
            let m = &self.metrics.deflate;
            m.compressed(&m.shared, frame.encoded(enc).len(), d.bytes.len());
        }
        self.out.push_frame(opcode, d.compressed, d.bytes);
    }

    /// Sends Disconnect + close with the reason's code, within a deadline
    /// (a slow consumer may never read them).
    async fn finish(&mut self, reason: CloseReason, reconnect_delay_ms: u32) {
        let bytes = self
            .conn
            .encoding()
            .encode_server(&reason.disconnect_frame(reconnect_delay_ms));
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
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
            self.flush().await
        })
        .await;
    }
}
