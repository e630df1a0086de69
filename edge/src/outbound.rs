//! A connection's mailbox: the only way other tasks reach a socket.
//!
//! Fan-out never waits: it `try_send`s, and a mailbox full by frames or by
//! bytes closes the socket with `slow_consumer` (the client resumes from
//! its last seq and loses nothing).
use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicUsize, Ordering},
};

use bytes::Bytes;
use switchboard_protocol::{CloseReason, Encoding, SharedFrame, StreamKey};
use tokio::sync::{Notify, mpsc};

/// What a connection's writer can be asked to do.
pub(crate) enum Outbound {
    /// A frame shared with other sockets (delivery, event).
    Shared(SharedFrame),
    /// A reply encoded for this socket only.
    Reply(Bytes),
    /// Hold live deliveries of this stream until `Recovered` arrives.
    BeginRecovery(StreamKey),
    /// The reply, then the missed deliveries, then the held live ones.
    /// Boxed, like `Control`: the mailbox allocates its first block of
    /// slots per socket up front, so the enum is kept small.
    Recovered(Box<Recovered>),
    /// Forget per-stream state (unsubscribed).
    Forget(StreamKey),
    /// A control frame the protocol obliges us to send (pong, close echo).
    Control(Box<(fastwebsockets::OpCode, Vec<u8>)>),
    /// The token's expiry moved (refresh), unix ms.
    TokenExpiry(i64),
    /// The peer closed: write what is queued for it and stop.
    Stop,
}

/// A subscription's reply and what the client missed.
pub(crate) struct Recovered {
    pub(crate) stream: StreamKey,
    pub(crate) reply: Bytes,
    pub(crate) frames: Vec<SharedFrame>,
}

/// How and why a connection is being closed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Closing {
    pub(crate) reason: CloseReason,
    pub(crate) reconnect_delay_ms: u32,
}

pub(crate) struct ConnShared {
    pub(crate) id: u64,
    pub(crate) encoding: Encoding,
    tx: mpsc::Sender<Outbound>,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    closing: OnceLock<Closing>,
    close_notify: Notify,
}

/// A cloneable handle to one connection.
#[derive(Clone)]
pub(crate) struct ConnHandle(Arc<ConnShared>);

impl ConnHandle {
    pub(crate) fn new(
        id: u64,
        encoding: Encoding,
        max_frames: usize,
        max_bytes: usize,
    ) -> (ConnHandle, mpsc::Receiver<Outbound>) {
        let (tx, rx) = mpsc::channel(max_frames);
        let shared = ConnShared {
            id,
            encoding,
            tx,
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            closing: OnceLock::new(),
            close_notify: Notify::new(),
        };
        (ConnHandle(Arc::new(shared)), rx)
    }

    pub(crate) fn id(&self) -> u64 {
        self.0.id
    }

    pub(crate) fn encoding(&self) -> Encoding {
        self.0.encoding
    }

    /// Queues a shared frame without waiting. Returns false (and closes the
    /// socket as a slow consumer) when the mailbox is full.
    pub(crate) fn push(&self, frame: SharedFrame) -> bool {
        let len = frame.encoded(self.0.encoding).len();
        self.try_enqueue(Outbound::Shared(frame), len)
    }

    /// Queues a frame for this socket only, without waiting.
    pub(crate) fn send(&self, msg: Outbound) -> bool {
        let len = match &msg {
            Outbound::Reply(b) => b.len(),
            // Recovered frames are shared with the history window (reference
            // counts, already encoded), so only the reply is new memory; a
            // large recovery must not count as a slow consumer.
            Outbound::Recovered(r) => r.reply.len(),
            Outbound::Shared(f) => f.encoded(self.0.encoding).len(),
            _ => 0,
        };
        self.try_enqueue(msg, len)
    }

    fn try_enqueue(&self, msg: Outbound, len: usize) -> bool {
        if self.0.closing.get().is_some() {
            return false;
        }
        let queued = self.0.queued_bytes.fetch_add(len, Ordering::AcqRel) + len;
        if queued > self.0.max_bytes || self.0.tx.try_send(msg).is_err() {
            self.0.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.close(CloseReason::SlowConsumer, 0);
            return false;
        }
        true
    }

    /// Called by the writer once `len` bytes left the queue.
    pub(crate) fn dequeued(&self, len: usize) {
        self.0.queued_bytes.fetch_sub(len, Ordering::AcqRel);
    }

    /// Asks the writer to send a Disconnect and close. The first reason wins.
    pub(crate) fn close(&self, reason: CloseReason, reconnect_delay_ms: u32) {
        if self
            .0
            .closing
            .set(Closing {
                reason,
                reconnect_delay_ms,
            })
            .is_ok()
        {
            self.0.close_notify.notify_one();
        }
    }

    pub(crate) fn closing(&self) -> Option<Closing> {
        self.0.closing.get().copied()
    }

    pub(crate) async fn close_requested(&self) {
        if self.closing().is_none() {
            self.0.close_notify.notified().await;
        }
    }
}
