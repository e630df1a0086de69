//! `switchboard-router`: parse config, log, bind, serve until SIGTERM/SIGINT.
use std::process::ExitCode;

use clap::Parser;
use switchboard_router::{RouterConfig, run_router, shutdown_signal};

fn main() -> ExitCode {
    let config = RouterConfig::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new().set_buckets_for_metric(
        metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
        switchboard_router::telemetry::SECONDS_BUCKETS,
    );
    let prometheus = match builder.and_then(|b| b.install_recorder()) {
        Ok(h) => h,
        Err(e) => return fail(&e),
    };
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
        match run_router(config, listener, prometheus, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        }
    })
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("switchboard-router: {e}");
    ExitCode::from(64)
}
