//! Validating, sequencing and delivering one publish.
use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use switchboard_presence::PresenceStore;
use switchboard_protocol::{
    IdError, SharedFrame, StreamKey, UserId, subject::chat_subject, v1::ErrorCode,
    validate_client_msg_id,
};
use tracing::Instrument;

use crate::{Bus, Draft, History, HistoryError, retry::Backoff};

/// Limits the router enforces on every publish.
#[derive(Debug, Clone, Copy)]
pub struct RouterLimits {
    /// Largest payload accepted, in bytes.
    pub max_payload_bytes: usize,
}

impl Default for RouterLimits {
    fn default() -> Self {
        RouterLimits {
            max_payload_bytes: 64 * 1024,
        }
    }
}

/// One message to publish, from a client (through its edge) or a backend.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    /// Authenticated sender.
    pub sender: UserId,
    /// Chat or personal stream.
    pub target: StreamKey,
    /// De-duplication key chosen by the sender.
    pub client_msg_id: String,
    /// Opaque payload.
    pub payload: Bytes,
}

/// A publish that was sequenced (or recognised as a retry).
#[derive(Debug, Clone)]
pub struct Published {
    /// The message's seq in its stream.
    pub seq: u64,
    /// Unix ms it was accepted.
    pub timestamp_ms: i64,
    /// True when this was a retry of an already sequenced message.
    pub duplicate: bool,
}

/// Why a publish was refused. [`PublishError::code`] maps it to a protocol
/// error code (and [`crate::publish_error_status`] to an HTTP status);
/// [`PublishError::reason`] to a metric label.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The client message id is not acceptable.
    #[error("invalid client message id: {0}")]
    InvalidId(#[from] IdError),
    /// The payload is over the limit.
    #[error("payload is {len} bytes, the limit is {max}")]
    TooLarge {
        /// Payload size.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// History is unavailable; nothing was sequenced, retry later.
    #[error(transparent)]
    History(#[from] HistoryError),
    /// No router replica answered (none running, or all timed out);
    /// nothing is known to be sequenced, retry later with the same id.
    #[error("no router answered: {source}")]
    NoRouter {
        /// Requests sent before giving up.
        attempts: u32,
        /// The last request's failure (timed out, no responders).
        source: async_nats::RequestError,
    },
    /// A router's reply could not be decoded.
    #[error("undecodable router reply: {0}")]
    BadReply(#[source] prost::DecodeError),
    /// A router replied with neither an ack nor an error.
    #[error("empty router reply")]
    EmptyReply,
    /// A router refused the publish with this protocol code; its message
    /// is passed on.
    #[error("{message}")]
    Remote {
        /// Protocol error code the router answered.
        code: ErrorCode,
        /// Why.
        message: String,
    },
}

/// Every value [`PublishError::reason`] returns (series registered at zero).
pub const PUBLISH_ERROR_REASONS: &[&str] = &[
    "invalid_id",
    "too_large",
    "bad_request",
    "history",
    "no_router",
    "bad_reply",
    "router_error",
];

impl PublishError {
    /// The protocol error code for this refusal. "No router answered" and
    /// "history unavailable" are both `Unavailable` (retry later); their
    /// messages and [`PublishError::reason`] tell them apart.
    pub fn code(&self) -> ErrorCode {
        match self {
            PublishError::InvalidId(_) => ErrorCode::InvalidId,
            PublishError::TooLarge { .. } => ErrorCode::TooLarge,
            // A router's answer is passed on as it came (a bad request stays
            // one: retrying it would fail again); only a missing code is
            // made retryable.
            PublishError::Remote {
                code: ErrorCode::Unspecified,
                ..
            } => ErrorCode::Unavailable,
            PublishError::Remote { code, .. } => *code,
            PublishError::History(_)
            | PublishError::NoRouter { .. }
            | PublishError::BadReply(_)
            | PublishError::EmptyReply => ErrorCode::Unavailable,
        }
    }

    /// A bounded metric label (one of [`PUBLISH_ERROR_REASONS`]), from the
    /// variant only, never the message.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::InvalidId(_) => "invalid_id",
            PublishError::TooLarge { .. } => "too_large",
            PublishError::History(_) => "history",
            PublishError::NoRouter { .. } => "no_router",
            PublishError::BadReply(_) | PublishError::EmptyReply => "bad_reply",
            PublishError::Remote { code, .. } => match code {
                ErrorCode::InvalidId => "invalid_id",
                ErrorCode::TooLarge => "too_large",
                ErrorCode::BadRequest => "bad_request",
                // A router answers Unavailable only when its history is.
                ErrorCode::Unavailable => "history",
                _ => "router_error",
            },
        }
    }

    /// Counts this refusal in `switchboard_publish_errors_total{reason}`.
    pub(crate) fn count(&self) {
        metrics::counter!("switchboard_publish_errors_total", "reason" => self.reason())
            .increment(1);
    }
}

/// The publish path: validate, sequence and store, then deliver.
pub struct Router {
    history: Arc<dyn History>,
    bus: Arc<dyn Bus>,
    /// Where each user's sockets are: personal streams go per edge.
    presence: Arc<dyn PresenceStore>,
    limits: RouterLimits,
    members: Option<Arc<crate::Members>>,
    /// Where every sequenced message is also appended (ADR 0032).
    tap: Option<Arc<crate::EventTap>>,
    /// `switchboard_hop_seconds{hop="sequence"}`.
    sequenced: metrics::Histogram,
}

impl Router {
    /// A router over these backends.
    pub fn new(
        history: Arc<dyn History>,
        bus: Arc<dyn Bus>,
        presence: Arc<dyn PresenceStore>,
        limits: RouterLimits,
    ) -> Self {
        Router {
            history,
            bus,
            presence,
            limits,
            members: None,
            tap: None,
            sequenced: crate::Hop::Sequence.histogram(),
        }
    }

    /// Appends every sequenced message to the event tap: cluster mode.
    pub fn with_tap(mut self, tap: Arc<crate::EventTap>) -> Self {
        self.tap = Some(tap);
        self
    }

    /// Adds member-wide work (channel shards, push hand-off): cluster mode.
    pub fn with_members(mut self, members: Arc<crate::Members>) -> Self {
        self.members = Some(members);
        self
    }

    /// The history this router appends to (for recovery reads).
    pub fn history(&self) -> &Arc<dyn History> {
        &self.history
    }

    /// Publishes one message. The ack (seq) is returned once the message is
    /// sequenced and stored; delivery over the bus is at-most-once and gaps
    /// are repaired by receivers from history.
    pub async fn publish(&self, req: PublishRequest) -> Result<Published, PublishError> {
        self.publish_from(req, None).await
    }

    /// [`Router::publish`] for a request that came with a W3C
    /// `traceparent` (a NATS header): with traces on, its `router.publish`
    /// span continues that trace (ADR 0038).
    pub async fn publish_from(
        &self,
        req: PublishRequest,
        traceparent: Option<&str>,
    ) -> Result<Published, PublishError> {
        if !crate::trace::enabled() {
            return self.try_publish(req).await.inspect_err(PublishError::count);
        }
        let span = tracing::info_span!(
            target: crate::trace::TARGET,
            "router.publish",
            otel.kind = "server",
            stream = %req.target,
            payload_bytes = req.payload.len(),
            seq = tracing::field::Empty,
            duplicate = tracing::field::Empty,
            error = tracing::field::Empty,
        );
        if let Some(tp) = traceparent {
            crate::trace::set_parent(&span, tp);
        }
        let done = self.try_publish(req).instrument(span.clone()).await;
        match &done {
            Ok(p) => {
                span.record("seq", p.seq);
                span.record("duplicate", p.duplicate);
            }
            Err(e) => {
                span.record("error", e.reason());
            }
        }
        done.inspect_err(PublishError::count)
    }

    async fn try_publish(&self, req: PublishRequest) -> Result<Published, PublishError> {
        validate_client_msg_id(&req.client_msg_id)?;
        if req.payload.len() > self.limits.max_payload_bytes {
            return Err(PublishError::TooLarge {
                len: req.payload.len(),
                max: self.limits.max_payload_bytes,
            });
        }
        let timestamp_ms = switchboard_protocol::now_ms();
        let started = std::time::Instant::now();
        let draft = Draft {
            sender: req.sender,
            client_msg_id: req.client_msg_id,
            payload: req.payload,
            timestamp_ms,
        };
        let appended = self.history.append(&req.target, draft).await?;
        self.sequenced.record(started.elapsed().as_secs_f64());
        // A retry soon after the original may follow a router that died
        // between append and member work: schedule it again (JetStream
        // de-duplicates the jobs when the first attempt got through).
        let recent_retry = appended.duplicate
            && timestamp_ms.saturating_sub(appended.timestamp_ms)
                < crate::MEMBER_RETRY_WINDOW.as_millis() as i64;
        if appended.duplicate {
            metrics::counter!("switchboard_router_publishes_total", "result" => "duplicate")
                .increment(1);
        } else {
            metrics::counter!("switchboard_router_publishes_total", "result" => "ok").increment(1);
            if crate::trace::enabled() {
                let span = tracing::info_span!(
                    target: crate::trace::TARGET,
                    "router.deliver",
                    otel.kind = "producer",
                    stream = %req.target,
                    seq = appended.seq,
                );
                self.deliver(&req.target, appended.frame.clone())
                    .instrument(span)
                    .await;
            } else {
                self.deliver(&req.target, appended.frame.clone()).await;
            }
        }
        // Queued, never awaited; a retry's second queueing appends nothing
        // when the first got through.
        if (!appended.duplicate || recent_retry)
            && let Some(tap) = &self.tap
        {
            tap.message(&req.target, &appended.frame);
        }
        if (!appended.duplicate || recent_retry)
            && let Some(m) = &self.members
        {
            member_work(m, &req.target, &appended.frame).await;
        }
        Ok(Published {
            seq: appended.seq,
            timestamp_ms: appended.timestamp_ms,
            duplicate: appended.duplicate,
        })
    }

    async fn deliver(&self, target: &StreamKey, frame: SharedFrame) {
        // A receiver repairs a lost delivery from history only when a later
        // message of the stream shows it the gap: the last message of a
        // conversation would wait for the next one. So a failed publish
        // (the bus reconnecting, presence unreadable while Redis fails
        // over) is tried again for a while; receivers de-duplicate by seq.
        let sent = DELIVER_RETRY
            .retry(
                || async {
                    match target {
                        StreamKey::Chat(c) => {
                            self.bus.publish(&chat_subject(c), frame.clone()).await
                        }
                        StreamKey::User(u) => crate::publish_to_user(
                            self.bus.as_ref(),
                            self.presence.as_ref(),
                            u,
                            frame.clone(),
                        )
                        .await
                        .map(|_| ()),
                    }
                },
                |e: &crate::BusError| {
                    metrics::counter!("switchboard_router_bus_errors_total", "reason" => e.reason())
                        .increment(1);
                },
            )
            .await;
        if let Err(e) = sent {
            metrics::counter!("switchboard_router_bus_errors_total", "reason" => e.reason())
                .increment(1);
            // Stored but not delivered live: receivers repair from history.
            tracing::warn!(error = %e, stream = %target, "delivery publish failed; receivers will recover from history");
        }
    }

    /// Sends an ephemeral frame (receipt, typing) to a subject: not
    /// sequenced, not stored, at-most-once.
    pub async fn broadcast(&self, subject: &str, frame: SharedFrame) {
        if let Err(e) = self.bus.publish(subject, frame).await {
            metrics::counter!("switchboard_router_bus_errors_total", "reason" => e.reason())
                .increment(1);
            tracing::debug!(error = %e, subject, "ephemeral publish failed");
        }
    }
}

/// How long a failed live delivery is tried again before it is left to
/// the receivers' gap repair (the publish is acked only after): longer
/// than a Redis master's failover (presence unreadable meanwhile).
const DELIVER_RETRY: Backoff = Backoff {
    first: Duration::from_millis(50),
    max: Duration::from_millis(800),
    limit: Duration::from_secs(10),
};

/// How long a publish's member work is tried again before the publish is
/// acked without it: long enough for a NATS cluster to elect new stream
/// leaders after losing a server, or a Redis master's replica to take over
/// (presence unreadable meanwhile). An edge that times out meanwhile
/// retries the publish elsewhere; that duplicate schedules the work again.
const MEMBER_WORK_RETRY: Backoff = DELIVER_RETRY;

/// A publish's member work (shard jobs, the push hand-off), tried again
/// with backoff while it fails: JetStream refuses or times out while a
/// server of its cluster is lost, and every step is idempotent (jobs are
/// de-duplicated by message id), so a retry stores each job once. What
/// still fails is counted and logged, as before.
async fn member_work(m: &crate::Members, target: &StreamKey, frame: &SharedFrame) {
    let done = MEMBER_WORK_RETRY
        .retry(
            || m.after_publish(target, frame),
            |e| {
                metrics::counter!("switchboard_router_member_work_retries_total").increment(1);
                tracing::debug!(error = %e, stream = %target, "member work failed; trying again");
            },
        )
        .await;
    if let Err(e) = done {
        metrics::counter!("switchboard_router_member_work_errors_total").increment(1);
        tracing::warn!(error = %e, stream = %target, "member work (shard jobs, push hand-off) failed");
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use async_nats::{RequestError, RequestErrorKind};

    use super::*;

    fn redis_down() -> HistoryError {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        HistoryError::Redis(redis::RedisError::from(cause))
    }

    fn undecodable() -> prost::DecodeError {
        use prost::Message;
        let garbage: &[u8] = &[0xff];
        switchboard_protocol::internal::v1::RouterReply::decode(garbage)
            .expect_err("a lone continuation byte is no message")
    }

    fn no_router(kind: RequestErrorKind) -> PublishError {
        PublishError::NoRouter {
            attempts: 3,
            source: RequestError::new(kind),
        }
    }

    fn remote(code: ErrorCode) -> PublishError {
        PublishError::Remote {
            code,
            message: "said the router".into(),
        }
    }

    #[test]
    fn each_variant_maps_to_its_code_and_reason() {
        let bad_id = PublishError::from(validate_client_msg_id("").unwrap_err());
        let cases = [
            (bad_id, ErrorCode::InvalidId, "invalid_id"),
            (
                PublishError::TooLarge { len: 2, max: 1 },
                ErrorCode::TooLarge,
                "too_large",
            ),
            (redis_down().into(), ErrorCode::Unavailable, "history"),
            (
                no_router(RequestErrorKind::NoResponders),
                ErrorCode::Unavailable,
                "no_router",
            ),
            (
                no_router(RequestErrorKind::TimedOut),
                ErrorCode::Unavailable,
                "no_router",
            ),
            (
                PublishError::BadReply(undecodable()),
                ErrorCode::Unavailable,
                "bad_reply",
            ),
            (
                PublishError::EmptyReply,
                ErrorCode::Unavailable,
                "bad_reply",
            ),
            (
                remote(ErrorCode::InvalidId),
                ErrorCode::InvalidId,
                "invalid_id",
            ),
            (
                remote(ErrorCode::TooLarge),
                ErrorCode::TooLarge,
                "too_large",
            ),
            (
                remote(ErrorCode::BadRequest),
                ErrorCode::BadRequest,
                "bad_request",
            ),
            (
                remote(ErrorCode::Unavailable),
                ErrorCode::Unavailable,
                "history",
            ),
            (
                remote(ErrorCode::Unspecified),
                ErrorCode::Unavailable,
                "router_error",
            ),
        ];
        for (e, code, reason) in cases {
            assert_eq!((e.code(), e.reason()), (code, reason), "{e:?}");
            assert!(PUBLISH_ERROR_REASONS.contains(&reason), "{reason}");
        }
    }

    #[test]
    fn wrapped_causes_are_kept_as_sources() {
        let history = PublishError::from(redis_down());
        let source = history.source().expect("history keeps the Redis error");
        assert!(source.downcast_ref::<redis::RedisError>().is_some());

        let none = no_router(RequestErrorKind::NoResponders);
        let source = none.source().expect("no router keeps the request error");
        let request = source
            .downcast_ref::<RequestError>()
            .expect("a request error");
        assert_eq!(request.kind(), RequestErrorKind::NoResponders);

        let bad = PublishError::BadReply(undecodable());
        assert!(bad.source().is_some());
        assert!(
            PublishError::from(validate_client_msg_id("").unwrap_err())
                .source()
                .is_some()
        );
    }

    #[test]
    fn no_router_and_history_outage_read_differently() {
        let none = no_router(RequestErrorKind::NoResponders).to_string();
        let history = PublishError::from(redis_down()).to_string();
        assert!(none.starts_with("no router answered"), "{none}");
        assert!(history.starts_with("history unavailable"), "{history}");
    }
}
