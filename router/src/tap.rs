//! The event tap (ADR 0032): every sequenced message, and every socket's
//! connect and close and every user's online/offline transition, appended
//! to one JetStream stream (`SB_EVENTS` by default, subjects
//! `sb.events.>`, bounded by age and bytes) that backends consume at least
//! once. Each record is a protobuf `switchboard.events.v1.Event`; message
//! payloads are copied as the publisher sent them, never read.
//!
//! Nothing on the publish or socket path waits for it: an event is queued
//! (bounded by [`TapSettings::queue_max_events`] and
//! [`TapSettings::queue_max_bytes`]) and appended by one of a
//! few lane tasks. What does not fit is dropped and counted
//! (`switchboard_event_tap_dropped_total{kind,reason}`), and so is what
//! JetStream refuses after a few tries; a message event lost that way is
//! filled in from history by the next message of its stream, while history
//! still holds it.
//!
//! Order: the events of one stream go to one lane of a process, which
//! appends them one at a time in seq order, each on the condition that the
//! stream's subject still ends where this process last saw it
//! (`Nats-Expected-Last-Subject-Sequence`). Another router that appended
//! in between makes the condition fail; the lane then reads the subject's
//! last event and goes on from there, appending from history any seq the
//! tap lacks before its own. So per stream and epoch the tap holds each
//! seq once, in order, whichever routers sequenced them; a retried append
//! carries the same message id (`<stream>:<epoch>:<seq>`) and is stored
//! once within the de-duplication window.
mod chain;
mod lane;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use switchboard_protocol::{
    SharedFrame, StreamKey, UserId,
    events::v1::{Connection, Event, event},
    now_ms,
    subject::{
        EVENTS_ALL, event_connection_subject, event_message_subject, event_presence_subject,
    },
    v1::{PresenceEvent, server_frame},
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::History;
use lane::{Job, Lane};

/// Default name of the tap's JetStream stream (`--event-tap-stream`).
pub const EVENT_STREAM: &str = "SB_EVENTS";

/// Lanes per process: a stream's events go to one, in order; lanes append
/// in parallel.
const LANES: usize = 16;
/// De-duplication window of the stream (or its age limit, if shorter): a
/// retried append is stored once within it.
const DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// Every `kind` label of the tap's metrics.
pub const TAP_KINDS: &[&str] = &["message", "connection", "presence"];
/// Every `result` label of `switchboard_event_tap_total`.
pub const TAP_RESULTS: &[&str] = &["stored", "filled", "duplicate"];
/// Every `reason` label of `switchboard_event_tap_dropped_total`.
pub const TAP_DROP_REASONS: &[&str] = &["queue_full", "jetstream", "stopped"];

/// Where the tap appends and how much it may hold back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapSettings {
    /// JetStream stream name (`--event-tap-stream`).
    pub stream: String,
    /// Events older than this are dropped by JetStream.
    pub max_age: Duration,
    /// Beyond this many bytes JetStream drops the oldest events.
    pub max_bytes: i64,
    /// Stream replicas (1-5; 3 on a NATS cluster).
    pub replicas: usize,
    /// Events queued in this process, not yet appended; beyond, new ones
    /// are dropped and counted.
    pub queue_max_events: usize,
    /// Bytes of those events (payloads mostly) at most; beyond, the same.
    pub queue_max_bytes: usize,
}

impl Default for TapSettings {
    fn default() -> Self {
        TapSettings {
            stream: EVENT_STREAM.into(),
            max_age: Duration::from_secs(86_400),
            max_bytes: 1 << 30,
            replicas: 1,
            queue_max_events: 65_536,
            queue_max_bytes: 64 << 20,
        }
    }
}

/// Who sets the stream's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamRole {
    /// A router: creates the stream, or updates it to these settings.
    Owner,
    /// An edge: creates the stream with these settings only when no
    /// router has yet; never changes an existing one.
    Guest,
}

/// The tap could not start. Both keep their cause as the source.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The stream could not be created, updated or found.
    #[error(
        "creating event tap stream {stream} with {replicas} replicas (--event-tap-stream, --event-tap-replicas): {source}"
    )]
    Stream {
        /// The stream's name.
        stream: String,
        /// The replica count asked for.
        replicas: usize,
        /// Why.
        source: async_nats::jetstream::context::CreateStreamError,
    },
    /// The stream exists but could not be read.
    #[error("reading event tap stream {stream}: {source}")]
    Info {
        /// The stream's name.
        stream: String,
        /// Why.
        source: async_nats::jetstream::context::GetStreamError,
    },
}

/// The event tap of one process: hands events to its lanes, never waiting.
pub struct EventTap {
    lanes: Box<[mpsc::Sender<Job>]>,
    node: String,
    closing: CancellationToken,
    closed: AtomicBool,
    tasks: TaskTracker,
    backlog: Arc<Backlog>,
}

/// What waits in the lanes, against the queue's byte bound (the count
/// bound is the lanes' capacity).
pub(crate) struct Backlog {
    bytes: AtomicUsize,
    max_bytes: usize,
    events_gauge: metrics::Gauge,
    bytes_gauge: metrics::Gauge,
}

impl Backlog {
    /// Counts an event of `size` bytes in, if it fits.
    fn take(&self, size: usize) -> bool {
        let before = self.bytes.fetch_add(size, Ordering::Relaxed);
        if before + size > self.max_bytes {
            self.bytes.fetch_sub(size, Ordering::Relaxed);
            return false;
        }
        self.events_gauge.increment(1.0);
        self.bytes_gauge.increment(size as f64);
        true
    }

    /// Counts `events` of `size` bytes together out.
    pub(crate) fn release(&self, events: usize, size: usize) {
        self.bytes.fetch_sub(size, Ordering::Relaxed);
        self.events_gauge.decrement(events as f64);
        self.bytes_gauge.decrement(size as f64);
    }
}

impl EventTap {
    /// Creates (router) or finds (edge) the stream and starts the lanes.
    /// `history` fills in the messages the tap lacks (routers); an edge,
    /// which appends no message events, passes `None`.
    pub async fn start(
        nats: async_nats::Client,
        settings: &TapSettings,
        role: StreamRole,
        history: Option<Arc<dyn History>>,
        node: &str,
    ) -> Result<EventTap, TapError> {
        register_series();
        let (js, stream) = open_stream(nats, settings, role).await?;
        let created_ms = stream
            .cached_info()
            .created
            .unix_timestamp_nanos()
            .div_euclid(1_000_000) as i64;
        let writer = Arc::new(chain::Writer::new(
            js,
            stream,
            history,
            node.to_owned(),
            created_ms,
            settings.max_age,
        ));
        let closing = CancellationToken::new();
        let tasks = TaskTracker::new();
        let per_lane = (settings.queue_max_events / LANES).max(1);
        let backlog = Arc::new(Backlog {
            bytes: AtomicUsize::new(0),
            max_bytes: settings.queue_max_bytes,
            events_gauge: metrics::gauge!("switchboard_event_tap_queue_events"),
            bytes_gauge: metrics::gauge!("switchboard_event_tap_queue_bytes"),
        });
        let lanes = (0..LANES)
            .map(|_| {
                let (tx, rx) = mpsc::channel(per_lane);
                let lane = Lane::new(writer.clone(), rx, closing.clone(), backlog.clone());
                tasks.spawn(lane.run());
                tx
            })
            .collect();
        tasks.close();
        metrics::gauge!("switchboard_event_tap_queue_max_events").set((per_lane * LANES) as f64);
        metrics::gauge!("switchboard_event_tap_queue_max_bytes")
            .set(settings.queue_max_bytes as f64);
        tracing::info!(
            stream = %settings.stream,
            max_age_secs = settings.max_age.as_secs(),
            max_bytes = settings.max_bytes,
            "event tap on"
        );
        Ok(EventTap {
            lanes,
            node: node.to_owned(),
            closing,
            closed: AtomicBool::new(false),
            tasks,
            backlog,
        })
    }

    /// Queues a sequenced message (a delivery frame from history) for the
    /// tap. Call it once the message is stored; calling it again for the
    /// same seq appends nothing.
    pub fn message(&self, stream: &StreamKey, frame: &SharedFrame) {
        let Some(server_frame::Kind::Delivery(d)) = &frame.frame().kind else {
            return;
        };
        let subject = event_message_subject(stream);
        self.push(Job::Message {
            stream: stream.clone(),
            subject,
            delivery: d.clone(),
        });
    }

    /// Queues a socket's connect (`connected`) or close.
    pub fn connection(&self, user: &UserId, session_id: &str, connected: bool) {
        let at = now_ms();
        let event = Event {
            timestamp_ms: at,
            node: self.node.clone(),
            kind: Some(event::Kind::Connection(Connection {
                user: user.to_string(),
                session_id: session_id.to_owned(),
                connected,
            })),
        };
        self.push(Job::Plain {
            key: format!("u:{user}"),
            subject: event_connection_subject(user),
            msg_id: format!("conn:{session_id}:{}:{at}", u8::from(connected)),
            event,
            kind: "connection",
        });
    }

    /// Queues a user's online/offline transition, as watchers get it.
    pub fn presence(&self, user: &UserId, online: bool, at_ms: i64, devices: u32) {
        let event = Event {
            timestamp_ms: at_ms,
            node: self.node.clone(),
            kind: Some(event::Kind::Presence(PresenceEvent {
                user: user.to_string(),
                online,
                last_seen_ms: at_ms,
                devices,
            })),
        };
        self.push(Job::Plain {
            key: format!("u:{user}"),
            subject: event_presence_subject(user),
            msg_id: format!("presence:{user}:{}:{at_ms}", u8::from(online)),
            event,
            kind: "presence",
        });
    }

    fn push(&self, job: Job) {
        let kind = job.kind();
        if self.closed.load(Ordering::Relaxed) {
            dropped(kind, "stopped");
            return;
        }
        let lane = &self.lanes[lane_of(job.key()) % self.lanes.len()];
        // Counted before the send: the lane may take it at once.
        let size = job.size();
        if !self.backlog.take(size) {
            dropped(kind, "queue_full");
            return;
        }
        if let Err(e) = lane.try_send(job) {
            self.backlog.release(1, size);
            let reason = match e {
                mpsc::error::TrySendError::Full(_) => "queue_full",
                mpsc::error::TrySendError::Closed(_) => "stopped",
            };
            dropped(kind, reason);
        }
    }

    /// Takes no more events and waits until the queued ones are appended
    /// (or given up on). The caller bounds the wait.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.closing.cancel();
        self.tasks.wait().await;
    }
}

/// Creates or finds the stream, per `role`.
async fn open_stream(
    nats: async_nats::Client,
    settings: &TapSettings,
    role: StreamRole,
) -> Result<
    (
        async_nats::jetstream::Context,
        async_nats::jetstream::stream::Stream,
    ),
    TapError,
> {
    use async_nats::jetstream::stream;
    // A JetStream that does not answer within this makes an append fail
    // (and be tried again, then dropped) rather than hold its lane.
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(nats);
    let config = stream::Config {
        name: settings.stream.clone(),
        subjects: vec![EVENTS_ALL.into()],
        retention: stream::RetentionPolicy::Limits,
        // Consumers never hold producers back: a full stream forgets its
        // oldest events.
        discard: stream::DiscardPolicy::Old,
        max_age: settings.max_age,
        max_bytes: settings.max_bytes,
        duplicate_window: DEDUP_WINDOW.min(settings.max_age),
        num_replicas: settings.replicas,
        ..Default::default()
    };
    let failed = |source| TapError::Stream {
        stream: settings.stream.clone(),
        replicas: settings.replicas,
        source,
    };
    // Nodes starting together race to create it: the second try finds it.
    let mut tries = 0;
    loop {
        tries += 1;
        let done = match role {
            StreamRole::Owner => js.create_or_update_stream(config.clone()).await.map(|_| ()),
            StreamRole::Guest => js.get_or_create_stream(config.clone()).await.map(|_| ()),
        };
        match done {
            Ok(()) => break,
            Err(e) if tries < 2 => {
                tracing::debug!(error = %e, "creating the event tap stream; trying again");
            }
            Err(source) => return Err(failed(source)),
        }
    }
    let stream = js
        .get_stream(&settings.stream)
        .await
        .map_err(|source| TapError::Info {
            stream: settings.stream.clone(),
            source,
        })?;
    let info = stream.cached_info();
    if role == StreamRole::Guest
        && (info.config.max_age != settings.max_age
            || info.config.max_bytes != settings.max_bytes
            || info.config.num_replicas != settings.replicas)
    {
        tracing::warn!(
            stream = %settings.stream,
            max_age_secs = info.config.max_age.as_secs(),
            max_bytes = info.config.max_bytes,
            replicas = info.config.num_replicas,
            "the event tap stream has other limits than this edge's settings; the routers' apply"
        );
    }
    Ok((js, stream))
}

/// A stable hash of a stream or user (the FNV-1a the epochs use): every
/// event of it goes to one lane.
fn lane_of(key: &str) -> usize {
    switchboard_protocol::epoch_hash(key) as usize
}

/// Counts an event that will not reach the stream.
fn dropped(kind: &'static str, reason: &'static str) {
    metrics::counter!("switchboard_event_tap_dropped_total", "kind" => kind, "reason" => reason)
        .increment(1);
}

/// Counts an event that reached the stream (or was already there).
fn appended(kind: &'static str, result: &'static str) {
    metrics::counter!("switchboard_event_tap_total", "kind" => kind, "result" => result)
        .increment(1);
}

/// The tap's series, at zero.
fn register_series() {
    for kind in TAP_KINDS {
        // Only messages are filled in (from history).
        for result in TAP_RESULTS
            .iter()
            .filter(|r| *kind == "message" || **r != "filled")
        {
            metrics::counter!("switchboard_event_tap_total", "kind" => *kind, "result" => *result)
                .increment(0);
        }
        for reason in TAP_DROP_REASONS {
            metrics::counter!("switchboard_event_tap_dropped_total", "kind" => *kind, "reason" => *reason)
                .increment(0);
        }
    }
    metrics::counter!("switchboard_event_tap_gaps_total").increment(0);
    metrics::gauge!("switchboard_event_tap_queue_events").set(0.0);
    metrics::gauge!("switchboard_event_tap_queue_bytes").set(0.0);
    metrics::gauge!("switchboard_event_tap_heads").set(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_refuses_what_would_pass_its_byte_bound() {
        let backlog = Backlog {
            bytes: AtomicUsize::new(0),
            max_bytes: 100,
            events_gauge: metrics::gauge!("test_events"),
            bytes_gauge: metrics::gauge!("test_bytes"),
        };
        assert!(backlog.take(60));
        assert!(!backlog.take(41), "161 bytes would pass 100");
        assert!(backlog.take(40));
        assert!(!backlog.take(1));
        backlog.release(2, 100);
        assert!(backlog.take(100));
    }

    #[test]
    fn one_stream_or_user_always_gets_the_same_lane() {
        let a = lane_of("sb.events.msg.chat.team-42");
        assert_eq!(a, lane_of("sb.events.msg.chat.team-42"));
        let spread: std::collections::HashSet<usize> = (0..200)
            .map(|i| lane_of(&format!("sb.events.msg.chat.c{i}")) % LANES)
            .collect();
        assert_eq!(spread.len(), LANES, "200 chats reach every lane");
    }
}
