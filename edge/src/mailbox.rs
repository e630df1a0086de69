//! A connection's mailbox: the only way other tasks reach a socket.
//!
//! Fan-out never waits: it pushes without blocking, and a mailbox full by
//! frames or by bytes closes the socket with `slow_consumer` (the client
//! resumes from its last seq and loses nothing).
//!
//! The mailbox is a `VecDeque` behind a mutex, woken through one
//! `AtomicWaker`, rather than a tokio `mpsc` channel: `mpsc` allocates a
//! block of 32 slots per channel up front (1.3 KiB, plus 0.5 KiB of channel
//! state), which at a million mostly idle sockets is over a gigabyte of
//! empty slots. This one allocates on the first frame and gives its buffer
//! back once drained. A close request wakes the same waker.
use std::{
    collections::VecDeque,
    future::poll_fn,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use switchboard_protocol::{CloseReason, Encoding, SharedFrame, StreamKey};

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

pub(crate) struct ConnShared {
    pub(crate) id: u64,
    pub(crate) encoding: Encoding,
    queue: Mutex<VecDeque<Outbound>>,
    max_frames: usize,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// Why the socket is being closed (its reconnect advice is drawn from
    /// the reason when the Disconnect is written).
    closing: OnceLock<CloseReason>,
    /// The writer's waker: a queued message or a close request wakes it.
    waker: AtomicWaker,
}

/// What the writer takes from its mailbox next.
pub(crate) enum Next {
    /// Close the socket for this reason (checked before queued messages).
    Close(CloseReason),
    Message(Outbound),
}

/// The writer's end of the mailbox.
pub(crate) struct Inbox(Arc<ConnShared>);

impl Inbox {
    /// The next message, or the close request once one is made. With
    /// `messages` false only a close request is taken (the writer is
    /// still handing its last batch to the socket; messages wait here,
    /// in the bounded queue).
    pub(crate) async fn recv(&mut self, messages: bool) -> Next {
        poll_fn(|cx| self.poll_recv(cx, messages)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>, messages: bool) -> Poll<Next> {
        if let Some(next) = self.ready(messages) {
            return Poll::Ready(next);
        }
        self.0.waker.register(cx.waker());
        // A push or close between the check and the registration.
        match self.ready(messages) {
            Some(next) => Poll::Ready(next),
            None => Poll::Pending,
        }
    }

    fn ready(&mut self, messages: bool) -> Option<Next> {
        if let Some(reason) = self.0.closing.get() {
            return Some(Next::Close(*reason));
        }
        if !messages {
            return None;
        }
        self.try_recv().map(Next::Message)
    }

    /// A queued message, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Outbound> {
        let mut q = self.0.queue.lock().expect("mailbox lock is never poisoned");
        let msg = q.pop_front();
        // A drained mailbox owns no memory: most sockets are idle most of
        // the time, and a busy one pays one allocation per batch.
        if q.is_empty() && q.capacity() > 0 {
            *q = VecDeque::new();
        }
        msg
    }
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
    ) -> (ConnHandle, Inbox) {
        let shared = Arc::new(ConnShared {
            id,
            encoding,
            queue: Mutex::new(VecDeque::new()),
            max_frames,
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            closing: OnceLock::new(),
            waker: AtomicWaker::new(),
        });
        (ConnHandle(shared.clone()), Inbox(shared))
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
        let pushed = queued <= self.0.max_bytes && {
            let mut q = self.0.queue.lock().expect("mailbox lock is never poisoned");
            let room = q.len() < self.0.max_frames;
            if room {
                q.push_back(msg);
            }
            room
        };
        if !pushed {
            self.0.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.close(CloseReason::SlowConsumer);
            return false;
        }
        self.0.waker.wake();
        true
    }

    /// Called by the writer once `len` bytes left the queue.
    pub(crate) fn dequeued(&self, len: usize) {
        self.0.queued_bytes.fetch_sub(len, Ordering::AcqRel);
    }

    /// Asks the writer to send a Disconnect and close. The first reason
    /// wins; the reconnect advice follows from it (`reconnect_delay_ms`).
    pub(crate) fn close(&self, reason: CloseReason) {
        if self.0.closing.set(reason).is_ok() {
            self.0.waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn reply(n: usize) -> Outbound {
        Outbound::Reply(Bytes::from(vec![0u8; n]))
    }

    #[tokio::test]
    async fn full_by_frames_closes_as_slow_consumer() {
        let (conn, mut inbox) = ConnHandle::new(1, Encoding::Protobuf, 3, 1 << 20);
        assert!((0..3).all(|_| conn.send(reply(1))));
        assert!(!conn.send(reply(1)), "a fourth frame does not fit");
        // Close comes before the queued frames, and nothing is taken after it.
        assert!(matches!(
            inbox.recv(true).await,
            Next::Close(CloseReason::SlowConsumer)
        ));
        assert!(!conn.send(reply(1)));
    }

    #[tokio::test]
    async fn full_by_bytes_closes_and_dequeue_frees_room() {
        let (conn, mut inbox) = ConnHandle::new(1, Encoding::Protobuf, 100, 10);
        assert!(conn.send(reply(6)));
        let Some(Outbound::Reply(b)) = inbox.try_recv() else {
            panic!("expected the reply")
        };
        conn.dequeued(b.len());
        assert!(conn.send(reply(6)), "room again once dequeued");
        assert!(!conn.send(reply(6)), "12 bytes exceed the 10-byte limit");
        assert!(matches!(inbox.recv(true).await, Next::Close(_)));
    }

    #[tokio::test]
    async fn a_push_wakes_a_waiting_writer_in_order() {
        let (conn, mut inbox) = ConnHandle::new(1, Encoding::Protobuf, 100, 1 << 20);
        let writer = tokio::spawn(async move {
            let mut lens = Vec::new();
            while lens.len() < 3 {
                if let Next::Message(Outbound::Reply(b)) = inbox.recv(true).await {
                    lens.push(b.len());
                }
            }
            (lens, inbox)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        for n in [1, 2, 3] {
            assert!(conn.send(reply(n)));
        }
        let (lens, mut inbox) = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer was woken")
            .unwrap();
        assert_eq!(lens, vec![1, 2, 3]);
        conn.close(CloseReason::Shutdown);
        assert!(matches!(
            inbox.recv(true).await,
            Next::Close(CloseReason::Shutdown)
        ));
    }

    #[tokio::test]
    async fn a_close_is_taken_while_messages_wait() {
        let (conn, mut inbox) = ConnHandle::new(1, Encoding::Protobuf, 100, 1 << 20);
        assert!(conn.send(reply(1)));
        let closed = tokio::spawn(async move {
            let next = inbox.recv(false).await;
            (next, inbox)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!closed.is_finished(), "a queued message is not taken");
        conn.close(CloseReason::SlowConsumer);
        let (next, mut inbox) = tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the close woke the writer")
            .unwrap();
        assert!(matches!(next, Next::Close(CloseReason::SlowConsumer)));
        assert!(matches!(inbox.try_recv(), Some(Outbound::Reply(_))));
    }

    #[tokio::test]
    async fn a_drained_mailbox_gives_large_buffers_back() {
        let (conn, mut inbox) = ConnHandle::new(1, Encoding::Protobuf, 1000, 1 << 20);
        assert_eq!(
            conn.0.queue.lock().unwrap().capacity(),
            0,
            "nothing up front"
        );
        for _ in 0..500 {
            assert!(conn.send(reply(1)));
        }
        while inbox.try_recv().is_some() {}
        assert_eq!(conn.0.queue.lock().unwrap().capacity(), 0);
    }
}
