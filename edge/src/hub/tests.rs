//! The hub driving each stream's order, on paused time, with the memory
//! bus and history the standalone edge runs on. A test stands in for the
//! router: it appends to history, then publishes (or loses, or delays)
//! the stored frame on the bus.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use switchboard_protocol::{
    ChatId, Encoding, SharedFrame, StreamKey, UserId,
    v1::{Delivery, ServerFrame, StreamPosition, server_frame},
};
use switchboard_router::{
    Appended, Bus, Draft, History, HistoryError, HistoryLimits, MemoryBus, MemoryHistory, Recovery,
};
use tokio::time::Instant;

use super::*;
use crate::{
    mailbox::{Inbox, Outbound},
    order::{GAP_TIMEOUT, MAX_OUTAGE_RETRIES},
};

/// Memory history that can be taken down, and notes when it is read.
struct FlakyHistory {
    inner: MemoryHistory,
    down: AtomicBool,
    reads: Mutex<Vec<Instant>>,
}

impl FlakyHistory {
    fn new() -> Arc<Self> {
        Arc::new(FlakyHistory {
            // A window wider than the held-frame limit.
            inner: MemoryHistory::new(HistoryLimits {
                max_messages: 10_000,
                ..HistoryLimits::default()
            }),
            down: AtomicBool::new(false),
            reads: Mutex::new(Vec::new()),
        })
    }

    fn read_count(&self) -> usize {
        self.reads.lock().unwrap().len()
    }

    /// When each recovery read happened, since `t0`.
    fn reads_since(&self, t0: Instant) -> Vec<Duration> {
        self.reads.lock().unwrap().iter().map(|t| *t - t0).collect()
    }
}

#[async_trait]
impl History for FlakyHistory {
    async fn append(&self, stream: &StreamKey, draft: Draft) -> Result<Appended, HistoryError> {
        self.inner.append(stream, draft).await
    }

    async fn recover(
        &self,
        stream: &StreamKey,
        since: Option<u64>,
        epoch: &str,
    ) -> Result<Recovery, HistoryError> {
        self.reads.lock().unwrap().push(Instant::now());
        if self.down.load(Ordering::SeqCst) {
            // As the Redis backend reports an unreachable server.
            let down = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "down");
            return Err(HistoryError::Redis(down.into()));
        }
        self.inner.recover(stream, since, epoch).await
    }

    /// Not a recovery read (`reads` counts those); down with the rest.
    async fn positions(&self, streams: &[StreamKey]) -> Result<Vec<StreamPosition>, HistoryError> {
        if self.down.load(Ordering::SeqCst) {
            let down = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "down");
            return Err(HistoryError::Redis(down.into()));
        }
        self.inner.positions(streams).await
    }

    fn streams(&self) -> usize {
        self.inner.streams()
    }
}

fn chat(c: &str) -> StreamKey {
    StreamKey::Chat(ChatId::parse(c).unwrap())
}

struct Edge {
    hub: Arc<Hub>,
    bus: Arc<MemoryBus>,
    history: Arc<FlakyHistory>,
    inbox: Inbox,
}

impl Edge {
    /// A hub with one socket subscribed to `streams`, as Subscribe does it:
    /// join, read history, seed the order from the read.
    async fn new(streams: &[&StreamKey]) -> Edge {
        let bus = Arc::new(MemoryBus::new());
        let history = FlakyHistory::new();
        let hub = Hub::new(
            "e1",
            bus.clone(),
            history.clone(),
            Arc::new(EdgeMetrics::new()),
            FanoutLimits { max_frames: 65_536 },
            test_authz(),
        );
        let (conn, inbox) = ConnHandle::new(1, Encoding::Protobuf, 100_000, 1 << 30);
        for key in streams {
            hub.join(key, &conn).await.unwrap();
            let r = history.recover(key, None, "").await.unwrap();
            hub.note_position(key, &r.position);
        }
        history.reads.lock().unwrap().clear();
        Edge {
            hub,
            bus,
            history,
            inbox,
        }
    }

    /// The router's half: sequence and store; the frame is returned to
    /// publish (or not).
    async fn store(&self, key: &StreamKey, n: usize) -> Vec<SharedFrame> {
        let mut frames = Vec::new();
        for _ in 0..n {
            let a = self
                .history
                .append(
                    key,
                    Draft {
                        sender: UserId::parse("alice").unwrap(),
                        client_msg_id: format!("m{}", rand::random::<u64>()),
                        payload: Bytes::from_static(b"x"),
                        timestamp_ms: switchboard_protocol::now_ms(),
                    },
                )
                .await
                .unwrap();
            frames.push(a.frame);
        }
        frames
    }

    /// Publishes on the bus and lets the stream's lane fan it out.
    async fn publish(&self, frame: &SharedFrame) {
        let (key, _) = frame.delivery_position().unwrap();
        self.bus
            .publish(&key.subject().unwrap(), frame.clone())
            .await
            .unwrap();
        self.hub.settled().await;
    }

    /// (stream, seq) of every delivery the socket got since the last call.
    fn received(&mut self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        while let Some(msg) = self.inbox.try_recv() {
            if let Outbound::Shared(f) = msg
                && let Some((key, seq)) = f.delivery_position()
            {
                out.push((key.to_string(), seq));
            }
        }
        out
    }

    fn seqs(&mut self) -> Vec<u64> {
        self.received().into_iter().map(|(_, s)| s).collect()
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(start_paused = true)]
async fn an_early_frame_is_held_until_the_late_one_arrives() {
    let room = chat("room");
    let mut edge = Edge::new(&[&room]).await;
    let f = edge.store(&room, 3).await;
    edge.publish(&f[0]).await;
    edge.publish(&f[2]).await;
    assert_eq!(edge.seqs(), [1], "3 waits for 2");
    tokio::time::sleep(ms(50)).await;
    edge.publish(&f[1]).await;
    assert_eq!(edge.seqs(), [2, 3]);
    edge.publish(&f[2]).await;
    tokio::time::sleep(GAP_TIMEOUT * 2).await;
    assert_eq!(edge.seqs(), Vec::<u64>::new(), "no duplicate");
    assert_eq!(edge.history.read_count(), 0, "the hole filled itself");
}

#[tokio::test(start_paused = true)]
async fn a_lost_frame_is_read_from_history_after_the_gap_timeout() {
    let room = chat("room");
    let mut edge = Edge::new(&[&room]).await;
    let t0 = Instant::now();
    let f = edge.store(&room, 3).await;
    edge.publish(&f[0]).await;
    edge.publish(&f[2]).await; // 2 is lost on the bus
    tokio::time::sleep(GAP_TIMEOUT - ms(1)).await;
    assert_eq!(edge.seqs(), [1]);
    tokio::time::sleep(ms(2)).await;
    assert_eq!(edge.seqs(), [2, 3]);
    assert_eq!(edge.history.reads_since(t0), [GAP_TIMEOUT]);
    // The stream goes on from 3.
    let f = edge.store(&room, 1).await;
    edge.publish(&f[0]).await;
    assert_eq!(edge.seqs(), [4]);
}

#[tokio::test(start_paused = true)]
async fn over_the_held_limit_frames_are_dropped_and_read_from_history() {
    let room = chat("room");
    let mut edge = Edge::new(&[&room]).await;
    let total = crate::order::MAX_PENDING_PER_STREAM + 10;
    let f = edge.store(&room, total).await;
    // Seq 1 is lost; 2.. arrive, more than can be held.
    for frame in &f[1..] {
        edge.publish(frame).await;
    }
    assert_eq!(edge.seqs(), Vec::<u64>::new());
    assert_eq!(
        edge.hub.streams.get(&room).unwrap().order.held(),
        crate::order::MAX_PENDING_PER_STREAM
    );
    tokio::time::sleep(GAP_TIMEOUT + ms(1)).await;
    assert_eq!(edge.seqs(), (1..=total as u64).collect::<Vec<_>>());
    assert_eq!(edge.hub.streams.get(&room).unwrap().order.held(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_history_outage_backs_off_then_the_hole_is_skipped() {
    let room = chat("room");
    let mut edge = Edge::new(&[&room]).await;
    let t0 = Instant::now();
    let f = edge.store(&room, 3).await;
    edge.history.down.store(true, Ordering::SeqCst);
    edge.publish(&f[0]).await;
    edge.publish(&f[2]).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(edge.seqs(), [1], "3 waits out the outage");
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Retries spent: 3 goes out, the socket sees the hole.
    assert_eq!(edge.seqs(), [3]);
    let expected: Vec<Duration> = [200, 600, 1400, 3000, 5000, 7000, 9000, 11000, 13000]
        .into_iter()
        .map(ms)
        .collect();
    assert_eq!(edge.history.reads_since(t0), expected);
    assert_eq!(expected.len() as u32, MAX_OUTAGE_RETRIES + 1);
}

#[tokio::test(start_paused = true)]
async fn history_back_within_the_backoff_fills_the_hole() {
    let room = chat("room");
    let mut edge = Edge::new(&[&room]).await;
    let t0 = Instant::now();
    let f = edge.store(&room, 3).await;
    edge.history.down.store(true, Ordering::SeqCst);
    edge.publish(&f[0]).await;
    edge.publish(&f[2]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    edge.history.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(edge.seqs(), [1, 2, 3]);
    assert_eq!(edge.history.reads_since(t0), [ms(200), ms(600), ms(1400)]);
}

#[tokio::test(start_paused = true)]
async fn a_new_epoch_restarts_the_stream() {
    let room = chat("room");
    let mut edge = Edge::new(&[&room]).await;
    let f = edge.store(&room, 2).await;
    edge.publish(&f[0]).await;
    edge.publish(&f[1]).await;
    assert_eq!(edge.seqs(), [1, 2]);
    // History was lost (say, Redis restarted empty): seqs start again.
    let reborn = |seq| {
        SharedFrame::new(ServerFrame {
            id: 0,
            kind: Some(server_frame::Kind::Delivery(Delivery {
                chat: "room".into(),
                seq,
                epoch: "reborn".into(),
                ..Default::default()
            })),
        })
    };
    edge.publish(&reborn(1)).await;
    edge.publish(&reborn(2)).await;
    edge.publish(&reborn(2)).await;
    assert_eq!(edge.seqs(), [1, 2], "the new epoch's 1 and 2, once");
    tokio::time::sleep(GAP_TIMEOUT * 2).await;
    assert_eq!(edge.history.read_count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_possible_loss_rereads_every_stream() {
    let (a, b, idle) = (chat("a"), chat("b"), chat("idle"));
    let mut edge = Edge::new(&[&a, &b, &idle]).await;
    let t0 = Instant::now();
    let fa = edge.store(&a, 3).await;
    let fb = edge.store(&b, 2).await;
    edge.publish(&fa[0]).await;
    edge.publish(&fb[0]).await;
    assert_eq!(edge.received().len(), 2);
    // The bus dropped the rest (a reconnect, a slow consumer) and nothing
    // more arrives to reveal the hole; the bus reports the possible loss.
    edge.hub.on_possible_loss();
    tokio::time::sleep(ms(1)).await;
    let mut got = edge.received();
    got.sort();
    assert_eq!(
        got,
        [
            ("chat:a".to_owned(), 2),
            ("chat:a".to_owned(), 3),
            ("chat:b".to_owned(), 2)
        ]
    );
    // The two streams behind history were read, at once; the idle one
    // stands where history does.
    assert_eq!(edge.history.reads_since(t0), [ms(0), ms(0)]);
}

/// Issue #19: a stream joined before its first message (no history, no
/// epoch) whose seq 1 the bus lost in a reconnect.
#[tokio::test(start_paused = true)]
async fn a_possible_loss_repairs_a_stream_joined_before_its_first_message() {
    let (fresh, quiet) = (chat("fresh"), chat("quiet"));
    let mut edge = Edge::new(&[&fresh, &quiet]).await;
    edge.store(&fresh, 1).await;
    edge.hub.on_possible_loss();
    tokio::time::sleep(ms(1)).await;
    assert_eq!(edge.received(), [("chat:fresh".to_owned(), 1)]);
    // Stored while the subscription travelled to the other servers:
    // the second check, `INTEREST_SETTLE` later, finds it.
    edge.store(&quiet, 1).await;
    tokio::time::sleep(INTEREST_SETTLE).await;
    assert_eq!(edge.received(), [("chat:quiet".to_owned(), 1)]);
}

/// With history down the streams are read one by one, with back-off, as
/// before the position checks.
#[tokio::test(start_paused = true)]
async fn a_possible_loss_with_history_down_reads_each_stream() {
    let a = chat("a");
    let mut edge = Edge::new(&[&a]).await;
    let fa = edge.store(&a, 2).await;
    edge.publish(&fa[0]).await;
    assert_eq!(edge.seqs(), [1]);
    let t0 = Instant::now();
    edge.history.down.store(true, Ordering::SeqCst);
    edge.hub.on_possible_loss();
    tokio::time::sleep(ms(1)).await;
    edge.history.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(GAP_TIMEOUT * 4).await;
    assert_eq!(edge.history.reads_since(t0), [ms(0), GAP_TIMEOUT * 2]);
    assert_eq!(edge.seqs(), [2]);
}

/// The safety net (ADR 0044): no event says anything was lost, yet the
/// last message of a quiet stream arrives within an interval or so.
#[tokio::test(start_paused = true)]
async fn a_position_check_repairs_a_lost_last_message() {
    let (a, b) = (chat("a"), chat("b"));
    let mut edge = Edge::new(&[&a, &b]).await;
    let fa = edge.store(&a, 2).await;
    edge.publish(&fa[0]).await;
    assert_eq!(edge.seqs(), [1]);
    let b1 = edge.store(&b, 1).await;
    let stop = CancellationToken::new();
    let interval = Duration::from_secs(10);
    tokio::spawn(edge.hub.clone().check_positions(interval, stop.clone()));
    // Nothing before the first round.
    tokio::time::sleep(interval - ms(1)).await;
    assert_eq!(edge.seqs(), Vec::<u64>::new());
    // One round (both streams in one batch), then the grace.
    tokio::time::sleep(POSITION_GRACE + ms(10)).await;
    let mut got = edge.received();
    got.sort();
    assert_eq!(got, [("chat:a".to_owned(), 2), ("chat:b".to_owned(), 1)]);
    // A frame on its way when the check read the position is not repaired:
    // it arrives within the grace.
    let fa3 = edge.store(&a, 1).await;
    let reads = edge.history.read_count();
    tokio::time::sleep(interval - POSITION_GRACE).await;
    edge.publish(&fa3[0]).await;
    tokio::time::sleep(POSITION_GRACE * 2).await;
    assert_eq!(edge.seqs(), [3]);
    assert_eq!(edge.history.read_count(), reads, "no repair read");
    // The late publish of b's frame is a duplicate now.
    edge.publish(&b1[0]).await;
    assert_eq!(edge.seqs(), Vec::<u64>::new());
    stop.cancel();
}

/// Chat authorization as tests of the hub need it: open.
fn test_authz() -> Arc<crate::authz::ChatAuth> {
    Arc::new(crate::authz::ChatAuth::new(
        crate::authz::AuthzSettings {
            mode: crate::authz::ChatAuthMode::Open,
            dm: crate::authz::DmPolicy::Anyone,
            cache_ttl: std::time::Duration::from_secs(60),
            cache_entries: 1000,
        },
        Arc::new(switchboard_presence::MemoryMembers::new()),
        None,
    ))
}
