//! The `switchboard-edge` binary's `main`, a library function so that the
//! shipped binary and the system tests' copy run the very same code.
use std::process::ExitCode;

use clap::Parser;

use crate::{Settings, run};

/// Configuration, logging, listener, then [`run`] until SIGTERM or
/// SIGINT, then the drain. Exit code 64 when it cannot start; after a
/// stop, 0, or 75 when the stop gave up on something.
pub fn main() -> ExitCode {
    const NAME: &str = "switchboard-edge";
    let config = match Settings::parse().with_file().and_then(Settings::resolve) {
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
        if config.dev {
            tracing::warn!(
                "DEV MODE: demo page at / and unauthenticated tokens at /dev/token; never use in production"
            );
        }
        let shutdown = switchboard_node::shutdown_signal_with_watchdog(grace);
        run(config, listener, shutdown)
    })
}
