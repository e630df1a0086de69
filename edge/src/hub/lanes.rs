//! Fan-out lanes: what the bus hands the hub waits here, per stream, for
//! a task that fans it out in arrival order.
//!
//! A publish must not wait for its fan-out (ADR 0027): standalone the
//! memory bus hands each frame to the hub on the publisher's own task, and
//! fanning a message out to 10,000 sockets there made every publish wait
//! for 10,000 mailbox pushes. So `on_frame` only queues the frame in its
//! stream's lane, and the first frame of an idle lane starts a task that
//! drains it: one task per busy stream, so a large channel's backlog
//! delays no other stream, and one at a time per stream, so each stream's
//! frames reach its order machine in the order the bus gave them. A lane
//! exists only while it holds frames; an idle stream costs nothing here.
//!
//! The lanes are bounded together (`--fanout-queue-max-frames`, a quarter
//! of it per stream). A delivery that does not fit is dropped and counted,
//! and its stream is re-read from history once the lane reaches that
//! point, as for a frame the bus lost: acked messages are stored before
//! they are published, so nothing acked is lost while the history window
//! still holds it. An unsequenced frame (receipt, typing) that does not
//! fit is dropped and counted, as the bus may drop one.
use std::{collections::VecDeque, sync::Arc, sync::atomic::Ordering::Relaxed};

use switchboard_protocol::{Encoding, SharedFrame, StreamKey, now_ms, v1::server_frame};
use switchboard_router::{HistoryError, Recovery};
use tokio::{sync::oneshot, time::Instant};

use super::Hub;

/// Batches a drain task takes in a row, when they reach no socket
/// (duplicates, streams gone), before it lets other tasks run.
const YIELD_AFTER_IDLE_ITEMS: usize = 64;
/// Frames of a lane fanned out together, each socket's share in one
/// write: at moderate rates a batch is one frame; a backlog (a saturated
/// edge) goes out in as few syscalls as this allows.
const BATCH_FRAMES: usize = 64;
/// Bytes of a batch (protobuf encoding), so a socket's share stays small.
const BATCH_BYTES: usize = 64 * 1024;

/// Bounds of the fan-out lanes (`--fanout-queue-max-frames`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FanoutLimits {
    /// Frames queued in all lanes together.
    pub(crate) max_frames: usize,
}

impl FanoutLimits {
    /// One stream may take a quarter of the whole, so a runaway channel
    /// leaves room for the others.
    fn per_stream(&self) -> usize {
        (self.max_frames / 4).max(1)
    }
}

/// One queued step of a stream's fan-out.
pub(super) enum Work {
    /// A sequenced delivery: through the stream's order, then to its sockets.
    Delivery {
        seq: u64,
        frame: SharedFrame,
        queued_at: Instant,
        /// Its `edge.fanout` span, when traces are on and it is traced
        /// (ADR 0038): ends once the fan-out that carried it is done.
        trace: Option<Box<tracing::Span>>,
    },
    /// An unsequenced frame (receipt, typing) for the stream's sockets.
    Event(SharedFrame),
    /// Deliveries were dropped here at the limit: read the stream's
    /// history since its last seq (not counted against the limit; at most
    /// one waits per lane).
    Lost,
    /// A repair's history read, for the stream's order (not counted
    /// against the limit; at most one per running repair).
    History(Box<HistoryAnswer>),
}

/// A repair's read and where to tell the repair when to read again.
pub(crate) struct HistoryAnswer {
    pub(super) answer: Result<Recovery, HistoryError>,
    pub(super) next: oneshot::Sender<Option<Instant>>,
}

/// One stream's queued frames.
#[derive(Default)]
pub(super) struct Lane {
    queue: VecDeque<Work>,
    /// A task is draining this lane (or will: it was spawned).
    draining: bool,
    /// A `Work::Lost` is queued.
    lost: bool,
}

impl Hub {
    /// Queues `work` on its stream's lane, starting the lane's task if it
    /// has none. Never waits for a fan-out: the locks taken here guard the
    /// lane map and the lane, never a stream's sockets.
    pub(super) fn enqueue(&self, key: StreamKey, work: Work) {
        if let Work::Delivery { frame, .. } = &work {
            self.arrived(frame);
        }
        let mut lane = self.lanes.entry(key.clone()).or_default();
        let full = self.queued.load(Relaxed) >= self.fanout.max_frames
            || lane.queue.len() >= self.fanout.per_stream();
        if let Work::History(_) = work {
            lane.queue.push_back(work);
        } else if full {
            match work {
                Work::Delivery { .. } => {
                    self.metrics.fanout_dropped_deliveries.increment(1);
                    if lane.lost {
                        return;
                    }
                    lane.lost = true;
                    lane.queue.push_back(Work::Lost);
                }
                Work::Event(_) => {
                    self.metrics.fanout_dropped_events.increment(1);
                    return;
                }
                Work::Lost | Work::History(_) => {}
            }
        } else {
            self.queued.fetch_add(1, Relaxed);
            lane.queue.push_back(work);
        }
        if lane.draining {
            return;
        }
        #[cfg(test)]
        if self.held.load(Relaxed) {
            return;
        }
        lane.draining = true;
        drop(lane);
        if let Some(hub) = self.me.upgrade() {
            // Outside tokio's cooperative budget: each socket write counts
            // against it, and a fan-out past the budget (128 writes) would
            // find every further socket "not ready" and hand it to its
            // writer task. The drain yields after each frame instead.
            self.runtime
                .spawn(tokio::task::unconstrained(hub.drain(key)));
        }
    }

    /// Fans out one lane until it is empty, then removes it. Takes what the
    /// lane holds in batches (`BATCH_FRAMES`, `BATCH_BYTES`), so a backlog
    /// reaches each socket in one write per batch, not one per frame.
    async fn drain(self: Arc<Self>, key: StreamKey) {
        let mut idle = 0;
        let mut batch = Vec::new();
        let mut spans = Vec::new();
        loop {
            // A lane that keeps up (nothing queued behind this batch) has
            // its fan-out spread over the worker threads, for latency; one
            // with a backlog is saturated and fans out from this task
            // alone, so frames batch and each socket gets fewer writes.
            let backlog;
            {
                let Some(mut lane) = self.lanes.get_mut(&key) else {
                    return;
                };
                let mut bytes = 0;
                while batch.len() < BATCH_FRAMES && bytes < BATCH_BYTES {
                    let Some(work) = lane.queue.pop_front() else {
                        break;
                    };
                    match &work {
                        Work::Lost => lane.lost = false,
                        Work::History(_) => {}
                        Work::Delivery { frame, .. } | Work::Event(frame) => {
                            bytes += frame.encoded(Encoding::Protobuf).len();
                        }
                    }
                    batch.push(work);
                }
                backlog = !lane.queue.is_empty();
            }
            if batch.is_empty() {
                // Removed only while still empty: a frame queued since
                // found `draining` set and is taken on the next turn; one
                // queued after the removal makes a new lane and task.
                if self
                    .lanes
                    .remove_if(&key, |_, lane| lane.queue.is_empty())
                    .is_some()
                {
                    return;
                }
                continue;
            }
            let taken = Instant::now();
            let (stream, frames, conns) = self.order_batch(&key, &mut batch, taken, &mut spans);
            let pushed = self.fan_out(&stream, &conns, &frames, !backlog).await;
            // Traced deliveries (ADR 0038): their spans end here.
            for span in spans.drain(..) {
                span.record("sockets", pushed);
            }
            // Once per fan-out; a batch held for a gap reached no socket.
            if pushed > 0 {
                self.metrics
                    .hops
                    .fanout
                    .record(taken.elapsed().as_secs_f64());
            }
            // After each batch that reached sockets their writers get their
            // turn before the next: what a socket did not take goes out
            // before more is offered to it, so the mailbox limit still means
            // a socket too slow for its traffic, not a burst from the lane.
            idle += 1;
            if pushed > 0 || idle >= YIELD_AFTER_IDLE_ITEMS {
                idle = 0;
                tokio::task::yield_now().await;
            }
        }
    }

    /// Records the `bus` hop of a delivery that reached the hub: from its
    /// timestamp (taken by the router as it sequenced it) to now, on wall
    /// clocks at millisecond resolution (two hosts' clocks in a cluster).
    fn arrived(&self, frame: &SharedFrame) {
        if let Some(server_frame::Kind::Delivery(d)) = frame.frame().kind.as_ref() {
            let ms = (now_ms() - d.timestamp_ms).max(0);
            self.metrics.hops.bus.record(ms as f64 / 1000.0);
        }
    }

    /// Frames waiting in the lanes (the `switchboard_edge_fanout_queue_frames` gauge).
    pub(crate) fn fanout_queued(&self) -> usize {
        self.queued.load(Relaxed)
    }

    /// Holds the fan-out back: frames queue up, no lane is drained.
    #[cfg(test)]
    pub(crate) fn hold(&self) {
        self.held.store(true, Relaxed);
    }

    /// Starts draining what was held.
    #[cfg(test)]
    pub(crate) fn release(self: &Arc<Self>) {
        self.held.store(false, Relaxed);
        let keys: Vec<StreamKey> = self.lanes.iter().map(|l| l.key().clone()).collect();
        for key in keys {
            let start = self.lanes.get_mut(&key).is_some_and(|mut lane| {
                let idle = !lane.draining && !lane.queue.is_empty();
                lane.draining |= idle;
                idle
            });
            if start {
                self.runtime
                    .spawn(tokio::task::unconstrained(self.clone().drain(key)));
            }
        }
    }

    /// Waits until every lane has been fanned out.
    #[cfg(test)]
    pub(crate) async fn settled(&self) {
        while !self.lanes.is_empty() {
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests;
