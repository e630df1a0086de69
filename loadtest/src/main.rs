//! `switchboard-loadtest`: drives Switchboard edges over real sockets and
//! prints one JSON report (see loadtest/README.md for every field).
//!
//! Scenarios:
//! - `idle`: hold N connected sockets; report connect rate and the edge's
//!   process and kernel memory per socket.
//! - `channel` (alias `fanout`): N sockets subscribe to one channel; one
//!   publisher posts M messages at rate R; report latency, deliveries/s and
//!   each post's time to its last delivery.
//! - `http-publish`: the same, the posts sent by a backend through the
//!   edge's `POST /api/publish`; acked publishes/s apart from the fan-out.
//! - `chat`: N users in chats of K members across several edges, R
//!   messages/s; publish-to-receive latency, loss, order, router CPU.
//! - `mixed`: one set of sockets carrying DMs, small groups, one big
//!   channel, read receipts, typing and presence at R operations/s;
//!   latency and loss per kind.
//! - `storm`: N clients drop at once, miss M messages, reconnect at once
//!   and resume with `since`; time until all are back and resumed.
//! - `floor`: no Switchboard at all: what one small `write()` to a
//!   loopback TCP socket costs the writing thread, the floor under the
//!   edge's CPU per delivery.
//! - `roll`: N clients follow a chat while the edges restart one at a time
//!   (`scripts/cluster roll`); reconnect rate, time away, loss and order.
//! - `chaos`: users chat in groups, DMs and a channel while a seeded
//!   schedule kills, pauses and restarts edges, routers, NATS servers and
//!   Redis nodes; then a checker judges every client's history: nothing
//!   acked lost, duplicated, reordered or misdelivered. Exits non-zero
//!   when the verdict fails.
//! - `subscribe`: N users, each a member of K chats (imported through the
//!   membership API), connect and subscribe to all of them, in rounds
//!   (cold, then warm authorization caches); latency and edge CPU per
//!   subscribe.
//!
//! One process may hold only so many sockets (20,000 open files on our
//! machines), so `--workers N` runs the scenario in N copies of this
//! program, each with a disjoint slice of the users, meeting at barriers
//! between phases (`coord.rs`, `fleet.rs`); the parent merges their
//! reports (`report.rs`) and may plot them (`--plot-dir`, `plot.rs`).
//!
//! Sockets spread over many source addresses (127.0.0.x) to pass the
//! 64k-ports-per-address limit. Every run is bounded in count and time.
//!
//! Run with: cargo run --release -p switchboard-loadtest -- channel --help
mod accounting;
mod channel;
mod chaos;
mod chat;
mod conn;
mod coord;
mod fleet;
mod floor;
mod http_publish;
mod idle;
mod mixed;
mod plot;
mod recorder;
mod report;
mod roll;
mod sequence;
mod storm;
mod subscribe;
mod sys;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use serde_json::{Map, Value};

use crate::{coord::Worker, fleet::Fleet, report::Report};

/// Where `--help` lists the options every scenario takes from the top.
const HEADING: &str = "Workers and output";

#[derive(Parser)]
#[command(name = "switchboard-loadtest", version, about)]
struct Cli {
    /// Run the scenario in this many load-generator processes, each with
    /// its own slice of the sockets, and merge their reports.
    #[arg(long, global = true, default_value_t = 1, help_heading = HEADING,
          value_parser = clap::value_parser!(u32).range(1..=256))]
    workers: u32,
    /// Write SVG plots of the report into this directory.
    #[arg(long, global = true, help_heading = HEADING)]
    plot_dir: Option<PathBuf>,
    /// With --workers: longest wait for the last worker at a barrier,
    /// counted from the first one's arrival.
    #[arg(long, global = true, default_value_t = 300, help_heading = HEADING)]
    barrier_timeout_secs: u64,
    /// With --workers: longest the whole run may take.
    #[arg(long, global = true, default_value_t = 3600, help_heading = HEADING)]
    run_timeout_secs: u64,
    /// Set by the parent on each worker it starts.
    #[arg(long, global = true, hide = true)]
    worker_index: Option<u32>,
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
    /// One channel, N subscribers, M posts through the edge's HTTP API:
    /// acked publishes per second while each fans out.
    #[command(name = "http-publish")]
    HttpPublish(http_publish::Args),
    /// DMs, groups, a channel, receipts, typing, presence on one set of sockets.
    Mixed(mixed::Args),
    /// N clients drop at once, miss M messages, reconnect and resume.
    Storm(storm::Args),
    /// N clients follow a chat through a rolling restart of the edges.
    Roll(roll::Args),
    /// N publishers into N chats through the routers' HTTP API, back to
    /// back: acked publishes per second and per router (and Redis) CPU-second.
    Sequence(sequence::Args),
    /// No Switchboard: CPU of one small write() to a loopback socket, the
    /// floor under a delivery's cost.
    Floor(floor::Args),
    /// N users, K chats each (members through the API), connect and
    /// subscribe to all, in rounds: latency and edge CPU per subscribe
    /// with cold and warm authorization caches.
    Subscribe(subscribe::Args),
    /// Groups, DMs and a channel under a seeded schedule of process kills,
    /// pauses and restarts; then the exactly-once-in-order checker.
    Chaos(chaos::Args),
}

async fn run_scenario(scenario: Scenario, w: &Worker) -> anyhow::Result<Report> {
    match scenario {
        Scenario::Idle(a) => idle::run(a, w).await,
        Scenario::Channel(a) => channel::run(a, w).await,
        Scenario::HttpPublish(a) => http_publish::run(a, w).await,
        Scenario::Chat(a) => chat::run(a, w).await,
        Scenario::Mixed(a) => mixed::run(a, w).await,
        Scenario::Storm(a) => storm::run(a, w).await,
        Scenario::Roll(a) => roll::run(a, w).await,
        Scenario::Sequence(a) => sequence::run(a, w).await,
        Scenario::Floor(a) => floor::run(a, w).await,
        Scenario::Subscribe(a) => subscribe::run(a, w).await,
        Scenario::Chaos(a) => chaos::run(a, w).await,
    }
}

/// The figures only one scenario has, computed from a (merged) report.
pub(crate) fn scenario_figures(r: &Report) -> Map<String, Value> {
    match r.scenario.as_str() {
        "idle" => idle::figures(r),
        "channel" => channel::figures(r),
        "http-publish" => http_publish::figures(r),
        "chat" => chat::figures(r),
        "mixed" => mixed::figures(r),
        "storm" => storm::figures(r),
        "roll" => roll::figures(r),
        "sequence" => sequence::figures(r),
        "floor" => floor::figures(r),
        "subscribe" => subscribe::figures(r),
        "chaos" => chaos::figures(r),
        _ => Map::new(),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let barrier_timeout = Duration::from_secs(cli.barrier_timeout_secs);
    if let Some(index) = cli.worker_index {
        // A worker: its raw report goes to the parent as one line.
        anyhow::ensure!(index < cli.workers, "worker index {index} out of range");
        let w = Worker::child(index, cli.workers, barrier_timeout);
        let report = runtime.block_on(run_scenario(cli.scenario, &w))?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let report = if cli.workers > 1 {
        let fleet = Fleet {
            workers: cli.workers,
            args: std::env::args_os().skip(1).collect(),
            barrier_timeout,
            run_timeout: Duration::from_secs(cli.run_timeout_secs),
        };
        runtime.block_on(fleet.run())?
    } else {
        runtime.block_on(run_scenario(cli.scenario, &Worker::alone()))?
    };
    if let Some(dir) = &cli.plot_dir {
        for path in plot::write(&report, dir)? {
            eprintln!("wrote {}", path.display());
        }
    }
    println!("{}", serde_json::to_string_pretty(&report.render())?);
    // A chaos run is a test: its verdict is the exit status.
    anyhow::ensure!(
        report.scenario != "chaos" || chaos::passed(&report),
        "the chaos checker failed (see the report's figures and examples)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_scenario_parses() {
        // What clap checks in debug builds when a subcommand is first used.
        super::Cli::command().debug_assert();
    }
}
