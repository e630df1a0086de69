//! A socket's write side and what decides what goes on it: the batch of
//! outgoing frames, the per-stream order filter (live deliveries after a
//! recovery, duplicates) and permessage-deflate.
//!
//! It lives in the connection's mailbox, under the mailbox's lock, so
//! that either end may write: the socket's writer task, and the fan-out
//! task, which writes a delivery straight to a socket whose mailbox is
//! empty and whose last batch went out (ADR 0028). A delivery then costs
//! one `write()` on the fan-out's thread, without waking the socket's
//! task; the mailbox and the writer task stay the path for everything
//! else (replies, recoveries, a socket the kernel is not taking bytes
//! from).
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use fastwebsockets::OpCode;
use switchboard_protocol::{Encoding, SharedFrame, StreamKey, deflate};
use tokio::io::AsyncWrite;

use crate::{inline_map::InlineMap, metrics::EdgeMetrics, order};

pub(crate) mod batch_writer;

pub(crate) use batch_writer::{BatchWriter, FLUSH_AT_BYTES};

/// Live deliveries held per stream while its recovery is read; beyond
/// this the socket is closed as a slow consumer and resumes later.
const MAX_HELD_PER_STREAM: usize = 4096;

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

/// What became of a live frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Live {
    /// Buffered for the socket.
    Buffered,
    /// Held until its stream's recovery is written.
    Held,
    /// Not for this socket: a duplicate, or a stream it left.
    Skipped,
    /// Its stream's recovery holds too many: close as a slow consumer.
    Overflow,
}

/// What a write straight from the fan-out did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Direct {
    /// Frames the socket is owed: buffered, or held behind its recovery
    /// (duplicates and streams it left are not).
    pub(crate) taken: u32,
    /// Bytes the socket took.
    pub(crate) bytes: usize,
    /// Frames handed to the socket (counted by the caller, once per fan-out).
    pub(crate) frames: u32,
    /// Some of it is left in the batch: the writer task must finish it.
    pub(crate) rest: bool,
    /// A stream's recovery holds too many: close as a slow consumer.
    pub(crate) overflow: bool,
}

/// A socket's streams, looked up per delivery: most sockets hold one (the
/// user's personal stream), kept inline. The table hashes with foldhash,
/// seeded per process: several times cheaper than SipHash on short keys.
type Streams = InlineMap<StreamKey, StreamState, foldhash::fast::RandomState>;

pub(crate) struct Wire<W> {
    pub(crate) out: BatchWriter<W>,
    streams: Streams,
    encoding: Encoding,
    /// permessage-deflate: frames from this many bytes go compressed; 0
    /// when the socket did not negotiate it.
    deflate_min_bytes: u32,
    /// Bytes went out since the writer's last heartbeat tick.
    pub(crate) progressed: bool,
    /// The writer is in a step of several writes (a recovery, the close):
    /// nothing may be written around it.
    pub(crate) busy: bool,
}

impl<W: AsyncWrite + Unpin> Wire<W> {
    pub(crate) fn new(out: BatchWriter<W>, encoding: Encoding, deflate_min: Option<usize>) -> Self {
        Wire {
            out,
            streams: Streams::default(),
            encoding,
            deflate_min_bytes: deflate_min.map_or(0, |n| n.clamp(1, u32::MAX as usize) as u32),
            progressed: false,
            busy: false,
        }
    }

    /// Whether a frame may be written now, from outside the writer task:
    /// nothing of an earlier batch or step is still owed.
    pub(crate) fn idle(&self) -> bool {
        !self.busy && !self.out.pending()
    }

    /// Buffers live frames and hands them to the socket at once, in one
    /// write, without waiting: a socket that does not take all of it keeps
    /// the rest in its batch (the caller wakes the writer task to finish it).
    /// `stream` is the hub's copy of the frames' stream key.
    pub(crate) fn write_now(
        &mut self,
        stream: &StreamKey,
        frames: &[SharedFrame],
        metrics: &EdgeMetrics,
    ) -> Direct {
        let mut direct = Direct {
            taken: 0,
            bytes: 0,
            frames: 0,
            rest: false,
            overflow: false,
        };
        // At moderate rates a fan-out offers one frame: it goes out
        // without being copied into a batch first.
        if let [frame] = frames
            && !self.out.pending()
        {
            match self.admit(Some(stream), frame, metrics) {
                Live::Buffered => {
                    direct.taken = 1;
                    let (opcode, compressed, bytes) = self.shared_bytes(frame, metrics);
                    direct.bytes = self.out.write_frame_now(opcode, compressed, bytes);
                }
                Live::Held => direct.taken = 1,
                Live::Skipped => {}
                Live::Overflow => direct.overflow = true,
            }
        } else {
            for frame in frames {
                match self.live_in(Some(stream), frame, metrics) {
                    Live::Buffered | Live::Held => direct.taken += 1,
                    Live::Skipped => {}
                    Live::Overflow => direct.overflow = true,
                }
            }
            // No task waits on this write: a socket that is not writable
            // keeps the rest for the writer task, whose own poll registers
            // its waker.
            let mut cx = Context::from_waker(Waker::noop());
            while self.out.pending() {
                match self.out.poll_write_some(&mut cx) {
                    Poll::Ready(Ok(n)) => direct.bytes += n,
                    // The writer task meets the same error on its next write.
                    Poll::Ready(Err(_)) | Poll::Pending => break,
                }
            }
        }
        direct.frames = self.out.take_frames();
        self.progressed |= direct.bytes > 0;
        direct.rest = self.out.pending();
        direct
    }

    /// A live frame: deliveries pass the per-stream order filter.
    pub(crate) fn live(&mut self, frame: &SharedFrame, metrics: &EdgeMetrics) -> Live {
        self.live_in(None, frame, metrics)
    }

    /// `live`, looking the stream up by `stream` when given: the hub's copy
    /// of the frame's key, which the socket's own entry shares, so the
    /// lookup compares addresses instead of reading another copy's bytes.
    fn live_in(
        &mut self,
        stream: Option<&StreamKey>,
        frame: &SharedFrame,
        metrics: &EdgeMetrics,
    ) -> Live {
        let live = self.admit(stream, frame, metrics);
        if live == Live::Buffered {
            self.write_shared(frame, metrics);
        }
        live
    }

    /// The order filter's verdict on a live frame: `Buffered` means it is
    /// to be written now (the caller writes it), `Held` that it was kept
    /// behind its stream's recovery.
    fn admit(
        &mut self,
        stream: Option<&StreamKey>,
        frame: &SharedFrame,
        metrics: &EdgeMetrics,
    ) -> Live {
        if let Some((key, seq, this)) = frame.delivery_stream() {
            match self.streams.get_mut(stream.unwrap_or(key)) {
                Some(StreamState::Recovering(held)) => {
                    if held.len() >= MAX_HELD_PER_STREAM {
                        return Live::Overflow;
                    }
                    held.push(frame.clone());
                    return Live::Held;
                }
                Some(StreamState::Live { seq: last, epoch }) => {
                    // The hub's rule: this merge and the reorder agree,
                    // within an epoch.
                    if this == *epoch && order::classify(*last, seq) == order::Seq::Duplicate {
                        metrics.duplicates_dropped.increment(1);
                        return Live::Skipped;
                    }
                    (*last, *epoch) = (seq, this);
                }
                // Not (or no longer) subscribed on this socket.
                None => return Live::Skipped,
            }
        }
        Live::Buffered
    }

    /// Holds this stream's live deliveries until `recovered`.
    pub(crate) fn begin_recovery(&mut self, key: StreamKey) {
        self.streams
            .insert(key, StreamState::Recovering(Vec::new()));
    }

    /// The stream's recovery is written up to `seq` of `epoch`: live from
    /// here; returns what was held meanwhile.
    pub(crate) fn recovered(&mut self, key: StreamKey, seq: u64, epoch: u64) -> Vec<SharedFrame> {
        // The key given is the hub's copy (see `Hub::join`): kept in place
        // of the one recovery began with.
        match self.streams.insert(key, StreamState::Live { seq, epoch }) {
            Some(StreamState::Recovering(held)) => held,
            _ => Vec::new(),
        }
    }

    /// Unsubscribed: forget the stream.
    pub(crate) fn forget(&mut self, key: &StreamKey) {
        self.streams.remove(key);
    }

    fn data_opcode(&self) -> OpCode {
        if self.encoding == Encoding::Json {
            OpCode::Text
        } else {
            OpCode::Binary
        }
    }

    /// Buffers one data frame of this socket's own (a reply). On a
    /// compressing socket a long one is compressed here (per-thread state,
    /// nothing kept).
    pub(crate) fn write(&mut self, bytes: &Bytes, metrics: &EdgeMetrics) {
        let opcode = self.data_opcode();
        let min = self.deflate_min_bytes as usize;
        if min > 0 && bytes.len() >= min {
            let packed = deflate::compress(bytes);
            let smaller = packed.len() < bytes.len();
            let sent = if smaller { packed.len() } else { bytes.len() };
            let m = &metrics.deflate;
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
    pub(crate) fn write_shared(&mut self, frame: &SharedFrame, metrics: &EdgeMetrics) {
        let (opcode, compressed, bytes) = self.shared_bytes(frame, metrics);
        self.out.push_frame(opcode, compressed, bytes);
    }

    /// How a shared frame goes out on this socket: its opcode, whether
    /// compressed, and its bytes.
    fn shared_bytes<'f>(
        &self,
        frame: &'f SharedFrame,
        metrics: &EdgeMetrics,
    ) -> (OpCode, bool, &'f [u8]) {
        let opcode = self.data_opcode();
        let enc = self.encoding;
        if self.deflate_min_bytes == 0 {
            return (opcode, false, frame.encoded(enc));
        }
        let d = frame.deflated(enc, self.deflate_min_bytes as usize);
        if d.compressed_now {
            let m = &metrics.deflate;
            m.compressed(&m.shared, frame.encoded(enc).len(), d.bytes.len());
        }
        (opcode, d.compressed, d.bytes)
    }
}
