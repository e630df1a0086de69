//! A terminal chat: prints a chat's messages and sends each stdin line.
//!
//! Run with:
//! cargo run -p switchboard-protocol --features client --example chat -- ws://127.0.0.1:8080/ws TOKEN CHAT
//!
//! The client reconnects by itself and resumes from the last message it
//! printed, so stopping and restarting the edge loses nothing that is still
//! in its history.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use switchboard_protocol::client::{Client, ClientConfig, ClientError, Event};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(token), Some(chat)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: chat <ws-url> <token> <chat>");
        std::process::exit(2);
    };
    let (client, mut events) = Client::connect(ClientConfig::new(url, token)).await?;
    let me = client.session().await.user;
    client.subscribe(&chat).await?;
    eprintln!("connected as {me}; type a line to send it to {chat}");

    // Sending waits for the ack, so it runs beside the event loop.
    let sender = client.clone();
    let target = chat.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let id = format!("{me}-{nanos}");
            if let Err(e) = publish(&sender, &target, &id, line).await {
                eprintln!("not sent: {e}");
            }
        }
        // End of input: close, which also ends the event stream.
        sender.close().await;
    });

    while let Some(event) = events.recv().await {
        match event {
            Event::Delivery(d) => println!(
                "[{}] {}: {}",
                d.seq,
                d.sender,
                String::from_utf8_lossy(&d.payload)
            ),
            Event::Disconnected {
                reason, reconnect, ..
            } => eprintln!("disconnected ({reason}); reconnecting: {reconnect}"),
            Event::Reconnected { .. } => eprintln!("reconnected"),
            Event::ResyncRequired { stream, last_seen } => {
                eprintln!("messages after {last_seen} in {stream:?} were lost")
            }
            Event::TokenRejected { message, .. } => {
                eprintln!("token refused ({message}); restart with a new one");
                break;
            }
            _ => {}
        }
    }
    client.close().await;
    Ok(())
}

/// Publishes, retrying with the same message id while the connection is
/// down: the server de-duplicates the retries.
async fn publish(client: &Client, chat: &str, id: &str, line: String) -> Result<(), ClientError> {
    let mut attempts = 0;
    loop {
        match client.publish_chat(chat, id, line.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_retryable() && attempts < 5 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(200 * attempts)).await;
            }
            Err(e) => return Err(e),
        }
    }
}
