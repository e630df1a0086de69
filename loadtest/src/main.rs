//! `switchboard-loadtest`: drives a Switchboard edge over real sockets.
//!
//! Scenarios (more arrive with the load-testing issue):
//! - `idle`: hold N connected sockets; report connect rate and the edge's
//!   process and kernel memory per socket.
//! - `channel` (alias `fanout`): N sockets subscribe to one chat; one publisher posts M
//!   messages; report deliveries/s, time to the last delivery, latency.
//! - `chat`: N users in chats of K members across several edges, R
//!   messages/s; publish-to-receive latency, loss, order, router CPU.
//! - `storm`: N clients drop at once, miss M messages, reconnect at once
//!   and resume with `since`; time until all are back and resumed.
//!
//! Sockets spread over many source addresses (127.0.0.x) to pass the
//! 64k-ports-per-address limit. Every run is bounded in count and time.
//! Run with: cargo run --release -p switchboard-loadtest -- idle --help
mod accounting;
mod channel;
mod chat;
mod conn;
mod idle;
mod storm;
mod sys;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "switchboard-loadtest", version, about)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Hold N idle sockets and measure memory per socket.
    Idle(idle::Args),
    /// One channel, N subscribers, M posts: fan-out throughput and latency.
    #[command(alias = "fanout")]
    Channel(channel::Args),
    /// N users in chats of K members, R messages/s: cross-edge latency.
    Chat(chat::Args),
    /// N clients drop at once, miss M messages, reconnect and resume.
    Storm(storm::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let report = runtime.block_on(async move {
        match cli.scenario {
            Scenario::Idle(a) => idle::run(a).await,
            Scenario::Channel(a) => channel::run(a).await,
            Scenario::Chat(a) => chat::run(a).await,
            Scenario::Storm(a) => storm::run(a).await,
        }
    })?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
