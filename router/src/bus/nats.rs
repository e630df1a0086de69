//! The bus over NATS core pub/sub: at-most-once, one subscription per
//! subject with local interest. Frames travel as protobuf `ServerFrame`s, so
//! an edge hands the received bytes straight to its binary sockets.
use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use async_nats::RequestErrorKind;
use async_trait::async_trait;
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use prost::Message;
use switchboard_protocol::{Encoding, SharedFrame, v1::ServerFrame};
use tokio::task::JoinHandle;

use super::{Bus, BusError, BusHandler};

/// NATS connection settings shared by edges and routers.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// `nats://host:port` (comma-separated for several servers).
    pub url: String,
    /// Connection name shown by the server (`node_id`).
    pub name: String,
    /// Messages buffered per subscription before NATS drops (slow consumer).
    pub subscription_capacity: usize,
}

/// Connects to NATS with reconnects forever; `on_event` sees connection
/// events (the bus uses them to trigger gap repair).
pub(crate) async fn connect_nats(
    settings: &NatsSettings,
    on_event: impl Fn(async_nats::Event) + Send + Sync + 'static,
) -> Result<async_nats::Client, BusError> {
    let on_event = Arc::new(on_event);
    let servers: Vec<&str> = settings.url.split(',').map(str::trim).collect();
    async_nats::ConnectOptions::new()
        .name(&settings.name)
        .subscription_capacity(settings.subscription_capacity)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let on_event = on_event.clone();
            async move { on_event(event) }
        })
        .connect(servers)
        .await
        .map_err(|source| BusError::Connect {
            url: crate::redact_url(&settings.url),
            source,
        })
}

/// The NATS implementation of [`Bus`].
pub struct NatsBus {
    client: async_nats::Client,
    handler: Arc<OnceLock<Arc<dyn BusHandler>>>,
    subs: DashMap<String, JoinHandle<()>>,
}

impl NatsBus {
    /// Connects. Reconnects and slow-consumer events make the handler
    /// re-check every stream against history (`on_possible_loss`).
    pub async fn connect(settings: &NatsSettings) -> Result<NatsBus, BusError> {
        let handler: Arc<OnceLock<Arc<dyn BusHandler>>> = Arc::new(OnceLock::new());
        let h = handler.clone();
        metrics::gauge!("switchboard_nats_connected").set(0.0);
        let client = connect_nats(settings, move |event| {
            let lossy = match &event {
                async_nats::Event::Connected => {
                    metrics::counter!("switchboard_nats_events_total", "event" => "connected")
                        .increment(1);
                    metrics::gauge!("switchboard_nats_connected").set(1.0);
                    true
                }
                async_nats::Event::Disconnected => {
                    metrics::counter!("switchboard_nats_events_total", "event" => "disconnected")
                        .increment(1);
                    metrics::gauge!("switchboard_nats_connected").set(0.0);
                    tracing::warn!("NATS disconnected; reconnecting");
                    false
                }
                async_nats::Event::SlowConsumer(_) => {
                    metrics::counter!("switchboard_nats_slow_consumer_total").increment(1);
                    true
                }
                other => {
                    tracing::info!(event = %other, "NATS event");
                    false
                }
            };
            if lossy && let Some(handler) = h.get() {
                handler.on_possible_loss();
            }
        })
        .await?;
        // Connects are retried in the background: 0 until connected (set
        // before dialling), then the event callback keeps it current.
        if matches!(
            client.connection_state(),
            async_nats::connection::State::Connected
        ) {
            metrics::gauge!("switchboard_nats_connected").set(1.0);
        }
        Ok(NatsBus {
            client,
            handler,
            subs: DashMap::new(),
        })
    }

    /// The underlying client (for request/reply and JetStream).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }
}

/// Decodes a bus message into a shared frame that keeps the received
/// protobuf bytes.
pub(crate) fn frame_from_bus(payload: bytes::Bytes) -> Option<SharedFrame> {
    let frame = ServerFrame::decode(payload.clone()).ok()?;
    Some(SharedFrame::with_protobuf(frame, payload))
}

#[async_trait]
impl Bus for NatsBus {
    fn set_handler(&self, handler: Arc<dyn BusHandler>) {
        let _ = self.handler.set(handler);
    }

    async fn publish(&self, subject: &str, frame: SharedFrame) -> Result<(), BusError> {
        let bytes = frame.encoded(Encoding::Protobuf).clone();
        // The delivery's trace context rides along only when there is
        // one: traces on and this publish sampled (ADR 0038).
        let sent = match crate::trace::nats_headers(true) {
            None => self.client.publish(subject.to_owned(), bytes).await,
            Some(headers) => {
                self.client
                    .publish_with_headers(subject.to_owned(), headers, bytes)
                    .await
            }
        };
        sent.map_err(|source| BusError::Publish {
            subject: subject.to_owned(),
            source,
        })
    }

    async fn subscribe(&self, subject: &str) -> Result<(), BusError> {
        if self.subs.contains_key(subject) {
            return Ok(());
        }
        let mut sub = self
            .client
            .subscribe(subject.to_owned())
            .await
            .map_err(|source| BusError::Subscribe {
                subject: subject.to_owned(),
                source,
            })?;
        // Live on return: the server has the interest before we report it,
        // so a history read after this cannot miss a later publish. A flush
        // only writes the socket (it waits for a connection, at startup
        // too); then a request makes the round trip, as the server handles
        // one connection's operations in order. Nobody serves a fresh
        // inbox, so the answer is an immediate "no responders".
        self.client
            .flush()
            .await
            .map_err(|source| BusError::Flush {
                subject: subject.to_owned(),
                source,
            })?;
        match self
            .client
            .request(self.client.new_inbox(), Bytes::new())
            .await
        {
            Err(source) if source.kind() != RequestErrorKind::NoResponders => {
                return Err(BusError::Confirm {
                    subject: subject.to_owned(),
                    source,
                });
            }
            _ => {}
        }
        let handler = self.handler.clone();
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(frame) = frame_from_bus(msg.payload) else {
                    metrics::counter!("switchboard_nats_undecodable_total").increment(1);
                    continue;
                };
                // The message's own subject: a wildcard subscription
                // carries the user in its last token.
                // A header is looked at only when the message has headers:
                // untraced deliveries cost nothing more.
                if let Some(h) = handler.get() {
                    match crate::trace::nats_traceparent(msg.headers.as_ref()) {
                        None => h.on_frame(msg.subject.as_str(), frame),
                        Some(tp) => h.on_traced_frame(msg.subject.as_str(), frame, tp),
                    }
                }
            }
        });
        if let Some(old) = self.subs.insert(subject.to_owned(), task) {
            old.abort();
        }
        Ok(())
    }

    async fn unsubscribe(&self, subject: &str) -> Result<(), BusError> {
        // Dropping the subscriber (inside the aborted task) unsubscribes.
        if let Some((_, task)) = self.subs.remove(subject) {
            task.abort();
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), BusError> {
        self.client.flush().await.map_err(|source| BusError::Flush {
            subject: String::new(),
            source,
        })
    }

    fn subscriptions(&self) -> usize {
        self.subs.len()
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}
