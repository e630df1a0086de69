//! A connection's mailbox: the only way other tasks reach a socket.
//!
//! Fan-out never waits. A delivery for a socket whose mailbox is empty and
//! whose last batch went out is written straight to the socket by the
//! fan-out task (`ConnHandle::offer`, ADR 0028): the socket's write side
//! (`Wire`) lives here, under the mailbox's lock, so the socket's own task
//! is not woken per delivery. Everything else waits in the mailbox for the
//! socket's writer task, in order. A mailbox full by frames or by bytes
//! closes the socket with `slow_consumer` (the client resumes from its last
//! seq and loses nothing).
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
    io,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicI64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use switchboard_protocol::{CloseReason, Encoding, SharedFrame, StreamKey};
use tokio::io::AsyncWrite;

use crate::{
    metrics::EdgeMetrics,
    wire::{Direct, Wire},
};

/// A served socket's write half.
pub(crate) type Sink = crate::conn::socket::SocketWrite;

/// What a connection's writer can be asked to do.
pub(crate) enum Outbound {
    /// A frame shared with other sockets (delivery, event).
    Shared(SharedFrame),
    /// A reply encoded for this socket only.
    Reply(Bytes),
    /// Hold live deliveries of this stream until `Recovered` arrives.
    BeginRecovery(StreamKey),
    /// The reply, then the missed deliveries, then the held live ones.
    /// Boxed, like `Control`: the enum is kept small.
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

impl Outbound {
    /// Bytes this message holds against the mailbox's byte limit.
    fn charged(&self, encoding: Encoding) -> usize {
        match self {
            Outbound::Reply(b) => b.len(),
            // Recovered frames are shared with the history window (reference
            // counts, already encoded), so only the reply is new memory; a
            // large recovery must not count as a slow consumer.
            Outbound::Recovered(r) => r.reply.len(),
            Outbound::Shared(f) => f.encoded(encoding).len(),
            _ => 0,
        }
    }
}

/// A subscription's reply and what the client missed.
pub(crate) struct Recovered {
    pub(crate) stream: StreamKey,
    pub(crate) reply: Bytes,
    pub(crate) frames: Vec<SharedFrame>,
}

pub(crate) struct ConnShared<W> {
    pub(crate) id: u64,
    pub(crate) encoding: Encoding,
    state: Mutex<State<W>>,
    max_frames: usize,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    /// Why the socket is being closed (its reconnect advice is drawn from
    /// the reason when the Disconnect is written).
    closing: OnceLock<CloseReason>,
    /// The writer's waker: a queued message, a close request or a direct
    /// write the socket did not take whole wakes it.
    waker: AtomicWaker,
    /// Unix ms of the last frame from the client: the reader writes it, the
    /// writer's heartbeat reads it.
    last_seen_ms: AtomicI64,
}

/// What the mailbox's lock guards.
pub(crate) struct State<W> {
    queue: VecDeque<Outbound>,
    /// The socket's write side, once the handshake is done (`attach`);
    /// taken back when the socket is released.
    pub(crate) wire: Option<Wire<W>>,
}

impl<W> State<W> {
    /// The next queued message, and the bytes it held against the limit.
    pub(crate) fn pop(&mut self) -> Option<Outbound> {
        let msg = self.queue.pop_front();
        // A drained mailbox owns no memory: most sockets are idle most of
        // the time, and a busy one pays one allocation per batch.
        if self.queue.is_empty() && self.queue.capacity() > 0 {
            self.queue = VecDeque::new();
        }
        msg
    }
}

/// What the writer task does next.
pub(crate) enum Next {
    /// Close the socket for this reason (checked before anything else).
    Close(CloseReason),
    /// Messages wait in the mailbox (the batch went out).
    Messages,
    /// A step of the waiting batch: the bytes the socket took.
    Wrote(io::Result<usize>),
}

/// The writer's end of the mailbox.
pub(crate) struct Inbox<W = Sink>(Arc<ConnShared<W>>);

impl<W: AsyncWrite + Unpin> Inbox<W> {
    /// Waits for the writer's next step: a close request (with `close`),
    /// a step of the batch the socket still owes, else queued messages
    /// (with `messages`).
    pub(crate) async fn next(&self, close: bool, messages: bool) -> Next {
        poll_fn(|cx| self.poll_next(cx, close, messages)).await
    }

    fn poll_next(&self, cx: &mut Context<'_>, close: bool, messages: bool) -> Poll<Next> {
        // Registered first: a push, close or direct write after this wakes us.
        self.0.waker.register(cx.waker());
        if close && let Some(reason) = self.0.closing.get() {
            return Poll::Ready(Next::Close(*reason));
        }
        let mut st = self.lock();
        if let Some(wire) = st.wire.as_mut()
            && wire.out.pending()
        {
            let wrote = std::task::ready!(wire.out.poll_write_some(cx));
            if matches!(wrote, Ok(n) if n > 0) {
                wire.progressed = true;
            }
            return Poll::Ready(Next::Wrote(wrote));
        }
        if messages && !st.queue.is_empty() {
            return Poll::Ready(Next::Messages);
        }
        Poll::Pending
    }

    /// The mailbox and the socket's write side, for one step of the writer.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State<W>> {
        self.0.state.lock().expect("mailbox lock is never poisoned")
    }
}

/// What became of a frame offered to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Written (or filtered) straight away by the offering task.
    Direct(Direct),
    /// Queued for the socket's writer task.
    Queued,
    /// Not taken: the socket is closing, or was closed as a slow consumer.
    Refused,
}

/// A cloneable handle to one connection.
pub(crate) struct ConnHandle<W = Sink>(Arc<ConnShared<W>>);

impl<W> Clone for ConnHandle<W> {
    fn clone(&self) -> Self {
        ConnHandle(self.0.clone())
    }
}

impl<W: AsyncWrite + Unpin> ConnHandle<W> {
    pub(crate) fn new(
        id: u64,
        encoding: Encoding,
        max_frames: usize,
        max_bytes: usize,
    ) -> (ConnHandle<W>, Inbox<W>) {
        let shared = Arc::new(ConnShared {
            id,
            encoding,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                wire: None,
            }),
            max_frames,
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            closing: OnceLock::new(),
            waker: AtomicWaker::new(),
            last_seen_ms: AtomicI64::new(switchboard_protocol::now_ms()),
        });
        (ConnHandle(shared.clone()), Inbox(shared))
    }

    /// Hands the socket's write side to the mailbox: from here on a frame
    /// may be written by whichever task offers it.
    pub(crate) fn attach(&self, wire: Wire<W>) {
        self.lock().wire = Some(wire);
    }

    fn lock(&self) -> MutexGuard<'_, State<W>> {
        self.0.state.lock().expect("mailbox lock is never poisoned")
    }

    pub(crate) fn id(&self) -> u64 {
        self.0.id
    }

    /// Unix ms of the last frame from the client.
    pub(crate) fn last_seen(&self) -> &AtomicI64 {
        &self.0.last_seen_ms
    }

    pub(crate) fn encoding(&self) -> Encoding {
        self.0.encoding
    }

    /// Offers shared frames (deliveries, events of one stream, in order)
    /// without waiting: written to the socket at once, in one write, when
    /// nothing is ahead of them (empty mailbox, last batch gone out), else
    /// queued for the writer task. What the socket did not take at once
    /// stays in its batch and the writer finishes it.
    /// `stream` is the hub's copy of the frames' stream key.
    pub(crate) fn offer(
        &self,
        stream: &StreamKey,
        frames: &[SharedFrame],
        metrics: &EdgeMetrics,
    ) -> Offer {
        if self.0.closing.get().is_some() {
            return Offer::Refused;
        }
        let mut st = self.lock();
        if st.queue.is_empty()
            && let Some(wire) = st.wire.as_mut()
            && wire.idle()
        {
            let direct = wire.write_now(stream, frames, metrics);
            drop(st);
            if direct.overflow {
                self.close(CloseReason::SlowConsumer);
                return Offer::Refused;
            }
            if direct.rest {
                self.0.waker.wake();
            }
            return Offer::Direct(direct);
        }
        for frame in frames {
            if !self.enqueue_locked(&mut st, Outbound::Shared(frame.clone())) {
                return Offer::Refused;
            }
        }
        Offer::Queued
    }

    /// Queues a message for the writer task, without waiting.
    pub(crate) fn send(&self, msg: Outbound) -> bool {
        if self.0.closing.get().is_some() {
            return false;
        }
        let mut st = self.lock();
        self.enqueue_locked(&mut st, msg)
    }

    fn enqueue_locked(&self, st: &mut State<W>, msg: Outbound) -> bool {
        if self.0.closing.get().is_some() {
            return false;
        }
        let len = msg.charged(self.0.encoding);
        let queued = self.0.queued_bytes.fetch_add(len, Ordering::AcqRel) + len;
        let pushed = queued <= self.0.max_bytes && st.queue.len() < self.0.max_frames;
        if !pushed {
            self.0.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.close(CloseReason::SlowConsumer);
            return false;
        }
        st.queue.push_back(msg);
        self.0.waker.wake();
        true
    }

    /// Called by the writer for each message it took from the queue.
    pub(crate) fn dequeued(&self, msg: &Outbound) {
        let len = msg.charged(self.0.encoding);
        if len > 0 {
            self.0.queued_bytes.fetch_sub(len, Ordering::AcqRel);
        }
    }

    /// Asks the writer to send a Disconnect and close. The first reason
    /// wins; the reconnect advice follows from it (`reconnect_delay_ms`).
    pub(crate) fn close(&self, reason: CloseReason) {
        if self.0.closing.set(reason).is_ok() {
            self.0.waker.wake();
        }
    }
}

/// The writer's take, for tests of what reaches a mailbox.
#[cfg(test)]
impl<W: AsyncWrite + Unpin> Inbox<W> {
    /// A queued message, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Outbound> {
        let msg = self.lock().pop();
        if let Some(m) = &msg {
            ConnHandle(self.0.clone()).dequeued(m);
        }
        msg
    }

    /// The writer's next step, as the writer loop waits for it.
    pub(crate) async fn recv(&mut self, messages: bool) -> Next {
        self.next(true, messages).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use fastwebsockets::{Role, WebSocket};
    use switchboard_protocol::v1::{Delivery, ServerFrame, server_frame};
    use tokio::io::DuplexStream;

    use super::*;
    use crate::wire::{BatchWriter, Live};

    type Conn = ConnHandle<DuplexStream>;

    fn room() -> StreamKey {
        StreamKey::Chat("room".parse().unwrap())
    }

    fn reply(n: usize) -> Outbound {
        Outbound::Reply(Bytes::from(vec![0u8; n]))
    }

    fn delivery(seq: u64, body: usize) -> SharedFrame {
        SharedFrame::new(ServerFrame {
            id: 0,
            kind: Some(server_frame::Kind::Delivery(Delivery {
                chat: "room".into(),
                seq,
                epoch: "e".into(),
                payload: vec![7; body].into(),
                ..Default::default()
            })),
        })
    }

    fn seq_of(payload: &[u8]) -> u64 {
        let f = Encoding::Protobuf.decode_server(payload, false).unwrap();
        match f.kind {
            Some(server_frame::Kind::Delivery(d)) => d.seq,
            other => panic!("not a delivery: {other:?}"),
        }
    }

    /// A socket whose write side went to its mailbox, live on `room`
    /// from seq 0, and the client end of it; the pipe holds `pipe` bytes.
    fn attached(pipe: usize) -> (Conn, Inbox<DuplexStream>, WebSocket<DuplexStream>) {
        let (server, client) = tokio::io::duplex(pipe);
        let (conn, inbox) = Conn::new(1, Encoding::Protobuf, 1000, 1 << 20);
        let mut wire = Wire::new(BatchWriter::new(server), Encoding::Protobuf, None);
        wire.begin_recovery(StreamKey::Chat("room".parse().unwrap()));
        wire.recovered(
            StreamKey::Chat("room".parse().unwrap()),
            0,
            switchboard_protocol::epoch_hash("e"),
        );
        conn.attach(wire);
        let mut ws = WebSocket::after_handshake(client, Role::Client);
        ws.set_auto_pong(false);
        (conn, inbox, ws)
    }

    #[tokio::test]
    async fn full_by_frames_closes_as_slow_consumer() {
        let (conn, mut inbox) = Conn::new(1, Encoding::Protobuf, 3, 1 << 20);
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
        let (conn, mut inbox) = Conn::new(1, Encoding::Protobuf, 100, 10);
        assert!(conn.send(reply(6)));
        assert!(matches!(inbox.try_recv(), Some(Outbound::Reply(_))));
        assert!(conn.send(reply(6)), "room again once dequeued");
        assert!(!conn.send(reply(6)), "12 bytes exceed the 10-byte limit");
        assert!(matches!(inbox.recv(true).await, Next::Close(_)));
    }

    #[tokio::test]
    async fn a_push_wakes_a_waiting_writer_in_order() {
        let (conn, mut inbox) = Conn::new(1, Encoding::Protobuf, 100, 1 << 20);
        let writer = tokio::spawn(async move {
            let mut lens = Vec::new();
            while lens.len() < 3 {
                if let Next::Messages = inbox.recv(true).await {
                    while let Some(Outbound::Reply(b)) = inbox.try_recv() {
                        lens.push(b.len());
                    }
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
        let (conn, mut inbox) = Conn::new(1, Encoding::Protobuf, 100, 1 << 20);
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
        let (conn, mut inbox) = Conn::new(1, Encoding::Protobuf, 1000, 1 << 20);
        assert_eq!(conn.lock().queue.capacity(), 0, "nothing up front");
        for _ in 0..500 {
            assert!(conn.send(reply(1)));
        }
        while inbox.try_recv().is_some() {}
        assert_eq!(conn.lock().queue.capacity(), 0);
    }

    #[tokio::test]
    async fn an_idle_socket_is_written_by_the_offering_task() {
        let (conn, inbox, mut client) = attached(1 << 16);
        let metrics = EdgeMetrics::new();
        for seq in 1..=3 {
            match conn.offer(&room(), &[delivery(seq, 10)], &metrics) {
                Offer::Direct(d) => {
                    assert_eq!((d.taken, d.frames, d.rest), (1, 1, false));
                    assert!(d.bytes > 10);
                }
                other => panic!("not written directly: {other:?}"),
            }
        }
        // A duplicate is filtered there too, and nothing was queued.
        let dup = conn.offer(&room(), &[delivery(2, 10)], &metrics);
        assert!(matches!(dup, Offer::Direct(d) if d.taken == 0 && d.frames == 0));
        assert!(inbox.lock().queue.is_empty());
        for seq in 1..=3 {
            let f = client.read_frame().await.unwrap();
            assert_eq!(seq_of(&f.payload), seq);
        }
    }

    #[tokio::test]
    async fn a_batch_goes_to_an_idle_socket_in_one_write() {
        let (conn, _inbox, mut client) = attached(1 << 16);
        let metrics = EdgeMetrics::new();
        let batch: Vec<_> = (1..=3).map(|seq| delivery(seq, 10)).collect();
        let Offer::Direct(d) = conn.offer(&room(), &batch, &metrics) else {
            panic!("an idle socket is written directly");
        };
        assert_eq!((d.taken, d.frames, d.rest), (3, 3, false));
        for seq in 1..=3 {
            assert_eq!(seq_of(&client.read_frame().await.unwrap().payload), seq);
        }
    }

    #[tokio::test]
    async fn behind_a_queued_message_a_delivery_queues_too() {
        let (conn, mut inbox, _client) = attached(1 << 16);
        let metrics = EdgeMetrics::new();
        assert!(conn.send(reply(5)));
        assert_eq!(
            conn.offer(&room(), &[delivery(1, 10)], &metrics),
            Offer::Queued
        );
        assert!(matches!(inbox.try_recv(), Some(Outbound::Reply(_))));
        assert!(matches!(inbox.try_recv(), Some(Outbound::Shared(_))));
        assert!(inbox.try_recv().is_none());
    }

    #[tokio::test]
    async fn what_the_socket_did_not_take_the_writer_finishes_in_order() {
        // The pipe takes 64 bytes: the first delivery goes out in part.
        let (conn, inbox, mut client) = attached(64);
        let metrics = EdgeMetrics::new();
        let Offer::Direct(first) = conn.offer(&room(), &[delivery(1, 200)], &metrics) else {
            panic!("an idle socket is written directly");
        };
        assert!(first.rest && first.bytes == 64, "{first:?}");
        // The rest waits in the batch: the next one queues behind it.
        assert_eq!(
            conn.offer(&room(), &[delivery(2, 200)], &metrics),
            Offer::Queued
        );
        let reader = tokio::spawn(async move {
            let mut seqs = Vec::new();
            for _ in 0..2 {
                seqs.push(seq_of(&client.read_frame().await.unwrap().payload));
            }
            seqs
        });
        // The writer's steps: finish the batch, then take the queue.
        let mut wrote = 0;
        tokio::pin!(reader);
        let seqs = loop {
            let next = tokio::select! {
                seqs = &mut reader => break seqs.unwrap(),
                next = inbox.next(true, true) => next,
                _ = tokio::time::sleep(Duration::from_secs(5)) => panic!("stuck"),
            };
            match next {
                Next::Wrote(r) => wrote += r.unwrap(),
                Next::Messages => {
                    let mut st = inbox.lock();
                    let Some(Outbound::Shared(f)) = st.pop() else {
                        panic!("the queued delivery")
                    };
                    let wire = st.wire.as_mut().unwrap();
                    assert_eq!(wire.live(&f, &metrics), Live::Buffered);
                }
                Next::Close(r) => panic!("closed: {r:?}"),
            }
        };
        assert_eq!(seqs, vec![1, 2]);
        assert!(
            wrote > 200,
            "the writer wrote the rest and the second: {wrote}"
        );
    }

    #[tokio::test]
    async fn a_closing_socket_takes_no_direct_write() {
        let (conn, _inbox, _client) = attached(1 << 16);
        conn.close(CloseReason::Shutdown);
        assert_eq!(
            conn.offer(&room(), &[delivery(1, 10)], &EdgeMetrics::new()),
            Offer::Refused
        );
    }
}
