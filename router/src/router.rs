//! Validating, sequencing and delivering one publish.
use std::sync::Arc;

use bytes::Bytes;
use switchboard_presence::PresenceStore;
use switchboard_protocol::{
    IdError, SharedFrame, StreamKey, UserId, chat_subject, validate_client_msg_id,
};

use crate::{Bus, Draft, History, HistoryError};

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

/// Why a publish was refused. Maps to protocol error codes at the edge.
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
    Unavailable(#[from] HistoryError),
    /// A remote router refused the publish with this protocol code.
    #[error("{message}")]
    Refused {
        /// Protocol error code.
        code: switchboard_protocol::v1::ErrorCode,
        /// Why.
        message: String,
    },
}

impl PublishError {
    /// The protocol error code for this refusal.
    pub fn code(&self) -> switchboard_protocol::v1::ErrorCode {
        use switchboard_protocol::v1::ErrorCode;
        match self {
            PublishError::InvalidId(_) => ErrorCode::InvalidId,
            PublishError::TooLarge { .. } => ErrorCode::TooLarge,
            PublishError::Unavailable(_) => ErrorCode::Unavailable,
            PublishError::Refused { code, .. } => *code,
        }
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
        }
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
        validate_client_msg_id(&req.client_msg_id)?;
        if req.payload.len() > self.limits.max_payload_bytes {
            return Err(PublishError::TooLarge {
                len: req.payload.len(),
                max: self.limits.max_payload_bytes,
            });
        }
        let timestamp_ms = switchboard_protocol::now_ms();
        let draft = Draft {
            sender: req.sender,
            client_msg_id: req.client_msg_id,
            payload: req.payload,
            timestamp_ms,
        };
        let appended = self.history.append(&req.target, draft).await?;
        if appended.duplicate {
            metrics::counter!("switchboard_router_publishes_total", "result" => "duplicate")
                .increment(1);
        } else {
            metrics::counter!("switchboard_router_publishes_total", "result" => "ok").increment(1);
            self.deliver(&req.target, appended.frame.clone()).await;
            if let Some(m) = &self.members
                && let Err(e) = m.after_publish(&req.target, &appended.frame).await
            {
                metrics::counter!("switchboard_router_member_work_errors_total").increment(1);
                tracing::warn!(error = %e, stream = %req.target, "member work (push hand-off) failed");
            }
        }
        Ok(Published {
            seq: appended.seq,
            timestamp_ms: appended.timestamp_ms,
            duplicate: appended.duplicate,
        })
    }

    async fn deliver(&self, target: &StreamKey, frame: SharedFrame) {
        let sent = match target {
            StreamKey::Chat(c) => self.bus.publish(&chat_subject(c), frame).await,
            StreamKey::User(u) => {
                crate::publish_to_user(self.bus.as_ref(), self.presence.as_ref(), u, frame)
                    .await
                    .map(|_| ())
            }
        };
        if let Err(e) = sent {
            // Stored but not delivered live: receivers repair from history.
            metrics::counter!("switchboard_router_bus_errors_total").increment(1);
            tracing::warn!(error = %e, stream = %target, "delivery publish failed; receivers will recover from history");
        }
    }

    /// Sends an ephemeral frame (receipt, typing) to a subject: not
    /// sequenced, not stored, at-most-once.
    pub async fn broadcast(&self, subject: &str, frame: SharedFrame) {
        if let Err(e) = self.bus.publish(subject, frame).await {
            metrics::counter!("switchboard_router_bus_errors_total").increment(1);
            tracing::debug!(error = %e, subject, "ephemeral publish failed");
        }
    }
}
