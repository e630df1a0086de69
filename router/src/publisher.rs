//! The publish path as the edge sees it: in-process ([`crate::Router`],
//! standalone) or any router replica over NATS ([`RemoteRouter`], cluster).
use std::time::Duration;

use async_nats::{RequestError, RequestErrorKind};
use async_trait::async_trait;
use prost::Message;
use switchboard_protocol::{
    SharedFrame, StreamKey,
    internal::v1::{RouterPublish, RouterReply, router_publish, router_reply},
    subject::ROUTER_PUBLISH,
    v1::ErrorCode,
};

use crate::{Bus, PublishError, PublishRequest, Published, Router};

/// Sequences and delivers messages; sends ephemeral frames.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// Publishes one message; the ack carries its seq.
    async fn publish(&self, req: PublishRequest) -> Result<Published, PublishError>;
    /// Sends an ephemeral frame (receipt, typing, presence) to a subject.
    async fn broadcast(&self, subject: &str, frame: SharedFrame);
}

#[async_trait]
impl Publisher for Router {
    async fn publish(&self, req: PublishRequest) -> Result<Published, PublishError> {
        Router::publish(self, req).await
    }

    async fn broadcast(&self, subject: &str, frame: SharedFrame) {
        Router::broadcast(self, subject, frame).await
    }
}

/// Publishes through whichever router replica NATS picks; a timeout or a
/// vanished replica is retried (the client message id makes it safe: each
/// id gets exactly one seq); after the last attempt the publish is
/// refused with [`PublishError::NoRouter`].
pub struct RemoteRouter {
    client: async_nats::Client,
    bus: std::sync::Arc<dyn Bus>,
    timeout: Duration,
    attempts: u32,
}

impl RemoteRouter {
    /// Requests go over `client`; ephemeral frames over `bus`.
    pub fn new(
        client: async_nats::Client,
        bus: std::sync::Arc<dyn Bus>,
        timeout: Duration,
    ) -> Self {
        RemoteRouter {
            client,
            bus,
            timeout,
            attempts: 3,
        }
    }
}

/// Encodes a publish request for the wire.
pub fn encode_request(req: &PublishRequest) -> bytes::Bytes {
    let target = match &req.target {
        StreamKey::Chat(c) => router_publish::Target::Chat(c.to_string()),
        StreamKey::User(u) => router_publish::Target::User(u.to_string()),
    };
    RouterPublish {
        sender: req.sender.to_string(),
        target: Some(target),
        client_msg_id: req.client_msg_id.clone(),
        payload: req.payload.clone(),
    }
    .encode_to_vec()
    .into()
}

impl RemoteRouter {
    async fn request(&self, req: PublishRequest) -> Result<Published, PublishError> {
        let body = encode_request(&req);
        let mut last = RequestError::new(RequestErrorKind::TimedOut);
        // The publish's trace context, for the router's span (ADR 0038).
        let headers = crate::trace::nats_headers(false);
        for attempt in 0..self.attempts {
            let sent = match &headers {
                None => {
                    let asked = self.client.request(ROUTER_PUBLISH, body.clone());
                    tokio::time::timeout(self.timeout, asked).await
                }
                Some(h) => {
                    let asked =
                        self.client
                            .request_with_headers(ROUTER_PUBLISH, h.clone(), body.clone());
                    tokio::time::timeout(self.timeout, asked).await
                }
            };
            let msg = match sent {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    last = e;
                    metrics::counter!("switchboard_edge_router_retries_total").increment(1);
                    tokio::time::sleep(Duration::from_millis(50 * (attempt as u64 + 1))).await;
                    continue;
                }
                Err(_) => {
                    last = RequestError::new(RequestErrorKind::TimedOut);
                    metrics::counter!("switchboard_edge_router_retries_total").increment(1);
                    continue;
                }
            };
            let reply = RouterReply::decode(msg.payload).map_err(PublishError::BadReply)?;
            return match reply.result {
                Some(router_reply::Result::Ack(a)) => Ok(Published {
                    seq: a.seq,
                    timestamp_ms: a.timestamp_ms,
                    duplicate: a.duplicate,
                }),
                Some(router_reply::Result::Error(e)) => Err(PublishError::Remote {
                    code: ErrorCode::try_from(e.code as i32).unwrap_or(ErrorCode::Unspecified),
                    message: e.message,
                }),
                None => Err(PublishError::EmptyReply),
            };
        }
        Err(PublishError::NoRouter {
            attempts: self.attempts,
            source: last,
        })
    }
}

#[async_trait]
impl Publisher for RemoteRouter {
    async fn publish(&self, req: PublishRequest) -> Result<Published, PublishError> {
        self.request(req).await.inspect_err(PublishError::count)
    }

    async fn broadcast(&self, subject: &str, frame: SharedFrame) {
        if let Err(e) = self.bus.publish(subject, frame).await {
            tracing::debug!(error = %e, subject, "ephemeral publish failed");
        }
    }
}
