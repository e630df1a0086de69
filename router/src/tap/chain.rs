//! Appending to the stream. A stream's messages form a chain on their
//! subject: each is appended on the condition that the subject still ends
//! where this process saw it (`Nats-Expected-Last-Subject-Sequence`), so
//! no two processes can interleave one stream's events out of order. When
//! the subject ends before the seq to append, the seqs in between are
//! appended first, from history. Connection and presence events are
//! appended as they come. Each event gets a few tries.
use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    context::{PublishError, PublishErrorKind},
    message::PublishMessage,
    publish::PublishAck,
    stream::{LastRawMessageError, LastRawMessageErrorKind},
};
use prost::Message;
use switchboard_protocol::{
    StreamKey,
    events::v1::{Event, event},
    now_ms,
    v1::{Delivery, server_frame},
};

use super::{appended, dropped, lane::Job};
use crate::{History, HistoryError};

/// Tries per event before it is dropped and counted.
const ATTEMPTS: u32 = 3;
/// Wait before the second try; four times as long before the third.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Appends and lookups one message may take besides the seqs it fills in
/// before giving up (other routers kept appending to its stream).
const MAX_STEPS: usize = 32;
/// A message sequenced this long before the stream was created (by the
/// clocks of the routers and of NATS, which may disagree) is still filled
/// in when the tap has nothing of its stream.
const CLOCK_MARGIN_MS: i64 = 60_000;

/// Where a stream's subject ended: the last event's epoch and seq, and its
/// stream sequence (what the next append expects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Head {
    epoch: String,
    seq: u64,
    stream_seq: u64,
}

/// Why one try of an append failed (it is tried again, then dropped).
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("append: {0}")]
    Publish(#[from] PublishError),
    #[error("reading the subject's last event: {0}")]
    Last(#[from] LastRawMessageError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("other routers kept appending to the stream's subject")]
    Contended,
}

/// Appends to one stream on behalf of every lane of a process.
pub(super) struct Writer {
    js: async_nats::jetstream::Context,
    stream: async_nats::jetstream::stream::Stream,
    history: Option<Arc<dyn History>>,
    node: String,
    created_ms: i64,
    max_age: Duration,
}

impl Writer {
    pub(super) fn new(
        js: async_nats::jetstream::Context,
        stream: async_nats::jetstream::stream::Stream,
        history: Option<Arc<dyn History>>,
        node: String,
        created_ms: i64,
        max_age: Duration,
    ) -> Self {
        Writer {
            js,
            stream,
            history,
            node,
            created_ms,
            max_age,
        }
    }

    /// Appends one event, trying a few times; `head` is where its
    /// stream's subject ended (`None`: not known, looked up).
    pub(super) async fn append(&self, job: Job, head: &mut Option<Head>) {
        let mut wait = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let done = match &job {
                Job::Message {
                    stream,
                    subject,
                    delivery,
                } => self.message(stream, subject, delivery, head).await,
                Job::Plain {
                    subject,
                    msg_id,
                    event,
                    kind,
                    ..
                } => self.plain(subject, msg_id, event, kind).await,
            };
            let Err(e) = done else { return };
            // Whatever happened, the subject's end is not known any more.
            *head = None;
            if attempt == ATTEMPTS {
                dropped(job.kind(), "jetstream");
                tracing::debug!(error = %e, key = job.key(), "event tap: event dropped");
                return;
            }
            tracing::debug!(error = %e, key = job.key(), attempt, "event tap: trying again");
            tokio::time::sleep(wait).await;
            wait *= 4;
        }
    }

    /// Appends `d` to its stream's chain, after any earlier seq of its
    /// epoch the chain lacks (from history).
    async fn message(
        &self,
        stream: &StreamKey,
        subject: &str,
        d: &Delivery,
        head: &mut Option<Head>,
    ) -> Result<(), Failure> {
        // A head from a lookup is what the stream held a moment ago; one
        // remembered from this lane's last append may be older.
        let mut fresh = false;
        if head.is_none() {
            *head = self.last(subject).await?;
            fresh = true;
        }
        let mut fills: Option<Vec<Delivery>> = None;
        let mut steps = 0;
        loop {
            steps += 1;
            if steps > MAX_STEPS + fills.as_ref().map_or(0, Vec::len) {
                return Err(Failure::Contended);
            }
            // The next seq the chain takes in d's epoch (`None`: the chain
            // holds nothing of this epoch), and the condition to append on.
            let (expected, next) = match head.as_ref() {
                Some(h) if h.epoch == d.epoch => {
                    if h.seq >= d.seq {
                        appended("message", "duplicate");
                        return Ok(());
                    }
                    (h.stream_seq, Some(h.seq + 1))
                }
                Some(h) => (h.stream_seq, None),
                None => (0, None),
            };
            let behind = next.map_or(d.seq > 1, |n| n < d.seq);
            if behind && !fresh {
                // Another router may have appended meanwhile: ask first.
                *head = self.last(subject).await?;
                fresh = true;
                continue;
            }
            if behind && fills.is_none() {
                fills = Some(self.missing(stream, d, next).await?);
            }
            let fill = fills
                .as_deref()
                .unwrap_or_default()
                .iter()
                .find(|f| behind && next.is_none_or(|n| f.seq >= n));
            let to = fill.unwrap_or(d);
            // Seqs history no longer holds (the gap stays in the tap).
            let skipped = next.map_or(0, |n| to.seq.saturating_sub(n));
            match self.publish(subject, stream, to, expected).await {
                Ok(ack) => {
                    *head = Some(Head {
                        epoch: to.epoch.clone(),
                        seq: to.seq,
                        stream_seq: ack.sequence,
                    });
                    if skipped > 0 {
                        metrics::counter!("switchboard_event_tap_gaps_total").increment(skipped);
                    }
                    let result = match (ack.duplicate, fill.is_some()) {
                        (true, _) => "duplicate",
                        (false, true) => "filled",
                        (false, false) => "stored",
                    };
                    appended("message", result);
                    if fill.is_none() {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    *head = self.last(subject).await?;
                    fresh = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The deliveries of `d`'s epoch before it that the chain should hold
    /// and may lack, from history, oldest first: from `next` on when the
    /// chain holds some of this epoch; otherwise those sequenced since the
    /// stream was created (and not older than its age limit), which may
    /// be another router's appends still in flight.
    async fn missing(
        &self,
        stream: &StreamKey,
        d: &Delivery,
        next: Option<u64>,
    ) -> Result<Vec<Delivery>, Failure> {
        let Some(history) = &self.history else {
            return Ok(Vec::new());
        };
        let since = match next {
            Some(n) => n - 1,
            None => d.seq.saturating_sub(2),
        };
        let mut frames = before(history.as_ref(), stream, d, since).await?;
        if next.is_none() {
            let floor =
                (self.created_ms - CLOCK_MARGIN_MS).max(now_ms() - self.max_age.as_millis() as i64);
            // One small read first: when even the seq before d is older
            // than the floor, none before it belongs in the tap.
            if since > 0 && frames.first().is_some_and(|f| f.timestamp_ms >= floor) {
                frames = before(history.as_ref(), stream, d, 0).await?;
            }
            frames.retain(|f| f.timestamp_ms >= floor);
        }
        Ok(frames)
    }

    /// Where `subject` ends now; `None` when the stream holds nothing on it.
    async fn last(&self, subject: &str) -> Result<Option<Head>, Failure> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => {
                // Something else published there: it counts as another
                // epoch's, so the chain starts again after it.
                let (epoch, seq) = match Event::decode(m.payload) {
                    Ok(Event {
                        kind: Some(event::Kind::Message(d)),
                        ..
                    }) => (d.epoch, d.seq),
                    _ => (String::new(), 0),
                };
                Ok(Some(Head {
                    epoch,
                    seq,
                    stream_seq: m.sequence,
                }))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Appends one message event if `subject` still ends at `expected`
    /// (0: holds nothing).
    async fn publish(
        &self,
        subject: &str,
        stream: &StreamKey,
        d: &Delivery,
        expected: u64,
    ) -> Result<PublishAck, PublishError> {
        let event = Event {
            timestamp_ms: d.timestamp_ms,
            node: self.node.clone(),
            kind: Some(event::Kind::Message(d.clone())),
        };
        let publish = PublishMessage::build()
            .payload(event.encode_to_vec().into())
            .message_id(format!("{stream}:{}:{}", d.epoch, d.seq))
            .expected_last_subject_sequence(expected);
        self.js
            .send_publish(subject.to_owned(), publish)
            .await?
            .await
    }

    /// Appends a connection or presence event.
    async fn plain(
        &self,
        subject: &str,
        msg_id: &str,
        event: &Event,
        kind: &'static str,
    ) -> Result<(), Failure> {
        let publish = PublishMessage::build()
            .payload(event.encode_to_vec().into())
            .message_id(msg_id);
        let ack = self
            .js
            .send_publish(subject.to_owned(), publish)
            .await?
            .await?;
        appended(kind, if ack.duplicate { "duplicate" } else { "stored" });
        Ok(())
    }
}

/// The deliveries of `d`'s epoch after `since` and before `d`, from
/// history.
async fn before(
    history: &dyn History,
    stream: &StreamKey,
    d: &Delivery,
    since: u64,
) -> Result<Vec<Delivery>, HistoryError> {
    let recovery = history.recover(stream, Some(since), &d.epoch).await?;
    Ok(recovery
        .frames
        .iter()
        .filter_map(|f| match &f.frame().kind {
            Some(server_frame::Kind::Delivery(x)) if x.seq < d.seq && x.epoch == d.epoch => {
                Some(x.clone())
            }
            _ => None,
        })
        .collect())
}
