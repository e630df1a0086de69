pub(crate) mod memory;
pub(crate) mod nats;

use async_trait::async_trait;
use switchboard_presence::{PresenceError, PresenceStore};
use switchboard_protocol::{SharedFrame, UserId, subject::edge_user_subject};

/// Publishes `frame` on `user`'s personal stream: one copy to each edge
/// that holds a socket of the user (presence knows which). Returns how many
/// edges it went to. Edges register presence before they read history, so a
/// message stored before this lookup is in that read and one stored after
/// it finds the edge.
pub async fn publish_to_user(
    bus: &dyn Bus,
    presence: &dyn PresenceStore,
    user: &UserId,
    frame: SharedFrame,
) -> Result<usize, BusError> {
    let nodes = presence.nodes_of(user).await?;
    for node in &nodes {
        bus.publish(&edge_user_subject(node, user), frame.clone())
            .await?;
    }
    Ok(nodes.len())
}

/// Receives the frames of subjects this node subscribed to.
pub trait BusHandler: Send + Sync + 'static {
    /// One frame arrived on `subject`, the subject it was published on
    /// (under a `*` subscription, the full subject). Must not block: it
    /// runs on the bus's receive path, which for the memory bus is the
    /// publisher's task, before its ack.
    fn on_frame(&self, subject: &str, frame: SharedFrame);

    /// [`BusHandler::on_frame`] for a frame that came with a W3C
    /// `traceparent` (ADR 0038); by default the context is ignored.
    fn on_traced_frame(&self, subject: &str, frame: SharedFrame, traceparent: &str) {
        let _ = traceparent;
        self.on_frame(subject, frame);
    }

    /// Frames may have been lost (bus reconnect, slow consumer): re-check
    /// every stream against history. Must not block.
    fn on_possible_loss(&self) {}
}

/// The bus failed. Every variant keeps the client's error as its source;
/// the message carries the cause's text too (callers print one line).
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The NATS options were refused (a bad URL); connects themselves are
    /// retried in the background.
    #[error("bus unavailable: NATS {url}: {source}")]
    Connect {
        /// The server list, credentials redacted.
        url: String,
        /// Why.
        source: async_nats::ConnectError,
    },
    /// A publish was not handed to the connection.
    #[error("bus unavailable: {source}")]
    Publish {
        /// Where it was going.
        subject: String,
        /// Why.
        source: async_nats::PublishError,
    },
    /// A subscription was not made.
    #[error("bus unavailable: {source}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// Why.
        source: async_nats::SubscribeError,
    },
    /// A subscription, or what was published before a flush, was not
    /// written to the server.
    #[error("bus unavailable: {source}")]
    Flush {
        /// The subject (empty for [`Bus::flush`]).
        subject: String,
        /// Why.
        source: async_nats::client::FlushError,
    },
    /// A subscription was written but the round trip that confirms the
    /// server has it failed, so the interest may not be active yet.
    #[error("bus unavailable: {source}")]
    Confirm {
        /// The subject.
        subject: String,
        /// Why.
        source: async_nats::RequestError,
    },
    /// Presence could not say which edges hold the user's sockets.
    #[error(transparent)]
    Presence(#[from] PresenceError),
}

impl BusError {
    /// A bounded metric label for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            BusError::Connect { .. } => "connect",
            BusError::Publish { .. } => "publish",
            BusError::Subscribe { .. } | BusError::Flush { .. } | BusError::Confirm { .. } => {
                "subscribe"
            }
            BusError::Presence(_) => "presence",
        }
    }
}

/// Subject-addressed delivery between nodes.
///
/// Contract (`tests/bus_contract.rs` checks it against every backend):
/// - At-most-once. Frames from one publisher on one subject arrive in
///   publish order; anything else (drops while disconnected or lagging)
///   is detected by the receiver from the stream seq and repaired from
///   [`crate::History`]. Drops the bus notices (reconnect, slow consumer)
///   are reported to the handler ([`BusHandler::on_possible_loss`]).
/// - Live on return: see [`Bus::subscribe`].
/// - A node receives a subject from its `subscribe` until its
///   `unsubscribe`, across reconnects; callers reference-count interest
///   and call each once per transition. A `*` token of a subscribed
///   subject matches any one token.
/// - Publishing on a subject nobody receives succeeds.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Sets the one handler of this node's subscriptions.
    fn set_handler(&self, handler: std::sync::Arc<dyn BusHandler>);
    /// Publishes `frame` on `subject`.
    async fn publish(&self, subject: &str, frame: SharedFrame) -> Result<(), BusError>;
    /// Starts receiving `subject`.
    ///
    /// Live on return: once this returns `Ok`, every frame published on
    /// `subject` afterwards, by any node, reaches the handler (barring the
    /// drops above). So a history read made after it misses nothing:
    /// routers store a message before they publish it. On a NATS cluster
    /// the interest reaches the other servers shortly after (routes carry
    /// it asynchronously); a frame published through one of them in that
    /// moment is a drop, repaired when a later frame shows the gap.
    async fn subscribe(&self, subject: &str) -> Result<(), BusError>;
    /// Stops receiving `subject`: frames published after this returns no
    /// longer reach the handler (over NATS, one being handed over at that
    /// moment still may).
    async fn unsubscribe(&self, subject: &str) -> Result<(), BusError>;
    /// Writes out everything published so far: a stopping node's last
    /// step, so its last frames (presence offline events, replies) leave
    /// the process. Over NATS it waits for a connection, so bound it.
    async fn flush(&self) -> Result<(), BusError> {
        Ok(())
    }
    /// Subjects this node currently receives (a gauge for leak checks).
    fn subscriptions(&self) -> usize;
    /// Whether the bus is connected now (readiness); a memory bus always is.
    fn connected(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn each_bus_error_keeps_its_cause_and_has_a_bounded_reason() {
        use async_nats::{ConnectErrorKind, PublishErrorKind, SubscribeErrorKind};
        let subject = || "sb.chat.c".to_owned();
        let redis = redis::RedisError::from(std::io::Error::other("down"));
        let cases = [
            (
                BusError::Connect {
                    url: "nats://***@n:4222".into(),
                    source: ConnectErrorKind::ServerParse.into(),
                },
                "connect",
            ),
            (
                BusError::Publish {
                    subject: subject(),
                    source: PublishErrorKind::Send.into(),
                },
                "publish",
            ),
            (
                BusError::Subscribe {
                    subject: subject(),
                    source: SubscribeErrorKind::Other.into(),
                },
                "subscribe",
            ),
            (
                BusError::Flush {
                    subject: subject(),
                    source: async_nats::client::FlushErrorKind::FlushError.into(),
                },
                "subscribe",
            ),
            (PresenceError::from(redis).into(), "presence"),
        ];
        for (e, reason) in cases {
            assert_eq!(e.reason(), reason, "{e:?}");
            assert!(e.source().is_some(), "{e:?} lost its source");
            assert!(e.to_string().contains("unavailable"), "{e}");
        }
    }
}
