//! A terminal chat: prints a chat's messages and sends each stdin line.
//!
//! Run with:
//! cargo run -p switchboard-protocol --features client --example chat -- ws://127.0.0.1:8080/ws TOKEN CHAT
use std::time::{SystemTime, UNIX_EPOCH};

use switchboard_protocol::client::{Client, ClientConfig, Event};
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
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let id = format!("{me}-{}", SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos());
                client.publish_chat(&chat, &id, line.into()).await?;
            }
            event = events.recv() => match event {
                Some(Event::Delivery(d)) => println!("[{}] {}: {}", d.seq, d.sender, String::from_utf8_lossy(&d.payload)),
                Some(Event::Disconnected { reason, reconnect, .. }) => eprintln!("disconnected ({reason}); reconnecting: {reconnect}"),
                Some(Event::Reconnected { .. }) => eprintln!("reconnected"),
                Some(_) => {}
                None => break,
            },
        }
    }
    client.close().await;
    Ok(())
}
