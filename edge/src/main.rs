//! `switchboard-edge`: parse config, set up logging, bind, serve until
//! SIGTERM/SIGINT, drain.
use std::process::ExitCode;

use clap::Parser;
use switchboard_edge::{Settings, run};
use switchboard_router::shutdown_signal;

fn main() -> ExitCode {
    let settings = match Settings::parse().with_file() {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    let config = match settings.resolve() {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if config.dev {
        tracing::warn!(
            "DEV MODE: demo page at / and unauthenticated tokens at /dev/token; never use in production"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(l) => l,
            Err(e) => return fail(&format!("cannot listen on {}: {e}", config.listen)),
        };
        match run(config, listener, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        }
    })
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("switchboard-edge: {e}");
    ExitCode::from(64)
}
