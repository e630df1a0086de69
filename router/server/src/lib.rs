//! The `switchboard-router` process: a replica of the cluster's publish
//! path. Any number share the work through NATS queue groups.
//!
//! Layout, like the edge's:
//! - `config`: flags, environment, TOML file → [`Config`].
//! - `app`: backends (NATS, Redis) chosen once, the tasks, the shutdown.
//! - `consumer`: publish requests and shard jobs from the routers' queue
//!   group.
//! - `state`: what the routes serve from.
//! - `routes`: the HTTP API: probes, metrics and the backend API shared
//!   with the edge (`switchboard-node`), and channel members.
//!
//! The publish path itself is the `switchboard-router` library; this crate
//! only runs it.
#![warn(missing_docs)]

mod app;
mod config;
mod consumer;
mod routes;
mod state;

use std::process::ExitCode;

pub use app::run;
pub use config::{Config, Settings};
pub use switchboard_node::{ConfigError, Stopped};

/// The binary: configuration, logging, listener, then [`run`] until
/// SIGTERM or SIGINT. Exit code 64 when it cannot start; after a stop, 0,
/// or 75 when the stop gave up on something.
pub fn main() -> ExitCode {
    const NAME: &str = "switchboard-router";
    let config = match <Settings as clap::Parser>::parse()
        .with_file()
        .and_then(Settings::resolve)
    {
        Ok(c) => c,
        Err(e) => return switchboard_node::fail(NAME, &e),
    };
    let (log, listen, grace) = (config.log.clone(), config.listen, config.shutdown_grace);
    let traces = config.traces.clone();
    let logging = switchboard_node::Logging {
        filter: &log,
        format: config.log_format,
        traces: traces.as_ref(),
    };
    switchboard_node::serve_main(NAME, logging, listen, |listener| {
        run(
            config,
            listener,
            switchboard_node::telemetry::prometheus(),
            switchboard_node::shutdown_signal_with_watchdog(grace),
        )
    })
}
