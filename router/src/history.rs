mod batch;
pub(crate) mod memory;
pub(crate) mod redis;
mod rpo;

use async_trait::async_trait;
use bytes::Bytes;
use switchboard_protocol::{
    SharedFrame, StreamKey, UserId,
    v1::{Delivery, ServerFrame, StreamPosition, server_frame},
};

/// A message to sequence.
#[derive(Debug, Clone)]
pub struct Draft {
    /// Who sent it (a user, or a backend's service name).
    pub sender: UserId,
    /// The sender's id for this message; the de-duplication key.
    pub client_msg_id: String,
    /// Opaque payload.
    pub payload: Bytes,
    /// Unix ms the router accepted it.
    pub timestamp_ms: i64,
}

/// Outcome of an append.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The sequenced delivery frame (the stored one, for a duplicate).
    pub frame: SharedFrame,
    /// Its seq.
    pub seq: u64,
    /// Unix ms it was first accepted.
    pub timestamp_ms: i64,
    /// True when (sender, client_msg_id) was already sequenced: nothing
    /// new was stored and nothing should be delivered.
    pub duplicate: bool,
}

/// What a client missed.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Where the stream stands; `resync_required` when the window does not
    /// reach back to `since` or the epoch differs.
    pub position: StreamPosition,
    /// Deliveries after `since` still in the window, in seq order.
    pub frames: Vec<SharedFrame>,
}

/// Limits of a history backend.
#[derive(Debug, Clone, Copy)]
pub struct HistoryLimits {
    /// Messages kept per stream.
    pub max_messages: usize,
    /// Messages older than this are dropped (ms).
    pub max_age_ms: i64,
    /// Streams kept at once; the least recently written is dropped beyond.
    pub max_streams: usize,
    /// De-duplication entries kept per stream.
    pub dedup_entries: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            max_messages: 1000,
            max_age_ms: 600_000,
            max_streams: 100_000,
            dedup_entries: 1000,
        }
    }
}

/// The history backend failed; nothing was stored, retry later.
///
/// The message carries the cause's text (callers print one line: a
/// client's error, a log field); [`std::error::Error::source`] keeps the
/// typed cause.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// Redis could not be reached, timed out or answered with an error.
    #[error("history unavailable: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// This process's append queue is at its limit (Redis is slower than
    /// the publishes arriving); nothing was stored.
    #[error("history unavailable: {capacity} appends already waiting")]
    QueueFull {
        /// The queue's limit.
        capacity: usize,
    },
    /// The append task stopped; the message may or may not be stored, a
    /// retry with the same id is de-duplicated.
    #[error("history unavailable: append task stopped")]
    Stopped,
}

/// Sequencer and short history of every stream.
///
/// Contract: `append` assigns seqs 1, 2, 3… per stream, atomically across
/// all callers, stores the delivery and remembers (sender, client_msg_id)
/// so a retry returns the first seq with `duplicate = true`. A stream's
/// `epoch` changes whenever its history is lost (eviction, restart of a
/// memory backend), so clients holding old seqs are told to re-sync rather
/// than silently skipping messages.
#[async_trait]
pub trait History: Send + Sync + 'static {
    /// Sequences and stores one message.
    async fn append(&self, stream: &StreamKey, draft: Draft) -> Result<Appended, HistoryError>;
    /// The stream's position and, with `since`, the deliveries after it.
    async fn recover(
        &self,
        stream: &StreamKey,
        since: Option<u64>,
        epoch: &str,
    ) -> Result<Recovery, HistoryError>;
    /// Where each of `streams` stands (seq and epoch; 0 and "" without
    /// history), in the order asked: the edge's position checks (ADR
    /// 0044). A backend that can reads them all in one round trip.
    async fn positions(&self, streams: &[StreamKey]) -> Result<Vec<StreamPosition>, HistoryError> {
        let mut out = Vec::with_capacity(streams.len());
        for s in streams {
            out.push(self.recover(s, None, "").await?.position);
        }
        Ok(out)
    }
    /// Streams currently held (a gauge).
    fn streams(&self) -> usize;
}

/// The delivery frame of a stored message, as every receiver gets it.
pub(crate) fn delivery_frame(
    stream: &StreamKey,
    seq: u64,
    ts: i64,
    sender: &str,
    client_msg_id: &str,
    payload: Bytes,
    epoch: &str,
) -> SharedFrame {
    let (chat, user) = match stream {
        StreamKey::Chat(c) => (c.to_string(), String::new()),
        StreamKey::User(u) => (String::new(), u.to_string()),
    };
    SharedFrame::new(ServerFrame {
        id: 0,
        kind: Some(server_frame::Kind::Delivery(Delivery {
            chat,
            user,
            seq,
            sender: sender.to_owned(),
            timestamp_ms: ts,
            payload,
            client_msg_id: client_msg_id.to_owned(),
            epoch: epoch.to_owned(),
        })),
    })
}
