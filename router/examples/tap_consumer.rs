//! A backend reading the event tap (docs/operations.md, "Event tap"): a
//! durable pull consumer on `SB_EVENTS` that prints each event and then
//! acknowledges it, so a restart goes on where it stopped, losing nothing.
//!
//! ```sh
//! cargo run -p switchboard-router --example tap_consumer -- nats://127.0.0.1:4222
//! ```
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt;
use prost::Message;
use switchboard_protocol::events::v1::{Event, event};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), async_nats::Error> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let js = jetstream::new(async_nats::connect(url).await?);
    let stream = js.get_stream(switchboard_router::EVENT_STREAM).await?;
    // Durable: its position lives in NATS. Another filter (say
    // "sb.events.msg.>" for a search indexer) reads only those events.
    let consumer = stream
        .get_or_create_consumer(
            "tap-example",
            pull::Config {
                durable_name: Some("tap-example".into()),
                filter_subject: "sb.events.>".into(),
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    while let Some(m) = messages.next().await {
        let m = m?;
        // Handle first, acknowledge after: a crash in between gets the
        // event again (at least once), so handling must be idempotent,
        // e.g. keyed by (stream, epoch, seq) for messages.
        match Event::decode(m.payload.clone())?.kind {
            Some(event::Kind::Message(d)) => println!(
                "{} message {}{} #{} from {}: {} bytes (epoch {})",
                m.subject,
                d.chat,
                d.user,
                d.seq,
                d.sender,
                d.payload.len(),
                d.epoch
            ),
            Some(event::Kind::Connection(c)) => println!(
                "{} {} session {} {}",
                m.subject,
                c.user,
                c.session_id,
                if c.connected { "connected" } else { "closed" }
            ),
            Some(event::Kind::Presence(p)) => println!(
                "{} {} {}",
                m.subject,
                p.user,
                if p.online { "online" } else { "offline" }
            ),
            None => println!("{}: an event kind this example does not know", m.subject),
        }
        m.ack().await?;
    }
    Ok(())
}
