//! The frame of a process's `main`, the same for edge and router: logging
//! from the log filter, a multi-threaded runtime, the listener, the
//! shutdown signal and its watchdog, and the exit status: 0 after a clean
//! stop, 75 after a stop that gave up on something ([`Stopped`]), 64 with
//! the reason on stderr when the process cannot start or stops on an
//! error.
use std::{fmt::Display, future::Future, net::SocketAddr, process::ExitCode, time::Duration};

use tokio::net::TcpListener;

use crate::{
    config::LogFormat,
    stop::{Stopped, arm_watchdog},
};

/// How long the runtime's teardown waits for blocking tasks (a DNS
/// lookup, say) once `serve` has returned.
const TEARDOWN: Duration = Duration::from_millis(500);

/// How a process logs and traces.
#[derive(Debug, Clone, Copy)]
pub struct Logging<'a> {
    /// Log filter (tracing `EnvFilter` syntax; "info" when it does not parse).
    pub filter: &'a str,
    /// Log line format.
    pub format: LogFormat,
    /// Trace export (ADR 0038); `None`: off.
    pub traces: Option<&'a crate::TraceSettings>,
}

/// Sets up logging (and trace export) as `logging` says, starts a
/// runtime, binds `listen` and runs `serve` on the listener until it
/// returns; its [`Stopped`] is the exit status. Spans not yet exported
/// are sent before the process exits (bounded by the exporter's timeout).
pub fn serve_main<F, Fut, E>(
    name: &str,
    logging: Logging<'_>,
    listen: SocketAddr,
    serve: F,
) -> ExitCode
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: Future<Output = Result<Stopped, E>>,
    E: Display,
{
    let format = logging.format;
    let fail = |name: &str, e: &dyn Display| match format {
        LogFormat::Text => fail(name, e),
        // One JSON object per line to the end: the reason as an error event.
        LogFormat::Json => {
            tracing::error!(process = name, error = %e, "cannot start or stopped on an error");
            ExitCode::from(64)
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            init_logging(logging.filter, format);
            return fail(name, &e);
        }
    };
    // The OTLP exporter's gRPC channel lives on this runtime.
    let exporting = {
        let _in_runtime = runtime.enter();
        match init_tracing(name, logging) {
            Ok(t) => t,
            Err(e) => return fail(name, &e),
        }
    };
    let code = runtime.block_on(async move {
        let listener = match TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => return fail(name, &format!("cannot listen on {listen}: {e}")),
        };
        match serve(listener).await {
            Ok(stopped) => stopped.exit_code(),
            Err(e) => fail(name, &e),
        }
    });
    // The last spans, while the runtime still drives the exporter.
    if let Some(flush) = exporting {
        flush();
    }
    // Dropping a runtime waits for its blocking tasks without a limit.
    runtime.shutdown_timeout(TEARDOWN);
    code
}

/// What flushes the trace exporter at the end.
type Flush = Box<dyn FnOnce()>;

/// Logging, plus trace export when `logging.traces` asks for it; then
/// what to call at the end to send the spans not yet exported.
fn init_tracing(name: &str, logging: Logging<'_>) -> Result<Option<Flush>, String> {
    let Some(traces) = logging.traces else {
        init_logging(logging.filter, logging.format);
        return Ok(None);
    };
    #[cfg(feature = "otel")]
    {
        crate::traces::init(name, logging.filter, logging.format, traces).map(Some)
    }
    #[cfg(not(feature = "otel"))]
    {
        // Refused by the configuration already.
        let _ = (name, traces);
        init_logging(logging.filter, logging.format);
        Err("this binary was built without trace export (cargo feature `otel`)".into())
    }
}

/// Logging to stderr (as docs/operations.md always said; stdout stays
/// empty) with the filter `log` in `format`. JSON lines carry
/// the stable fields `timestamp` (RFC 3339, UTC), `level`, `target`,
/// `message`, the event's own fields beside them, and `span` / `spans`
/// (the current span and its parents, each with its fields) where the
/// event happened inside one.
pub fn init_logging(log: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_new(log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Prints `name: e` to stderr; exit code 64 (bad configuration or a
/// backend that cannot be reached at startup).
pub fn fail(name: &str, e: &dyn Display) -> ExitCode {
    eprintln!("{name}: {e}");
    ExitCode::from(64)
}

/// Resolves on SIGTERM or SIGINT: both start a graceful shutdown.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}

/// [`shutdown_signal`], then the watchdog ([`arm_watchdog`]) for a stop
/// of `grace`: a binary's shutdown future (a test's would end the test).
pub async fn shutdown_signal_with_watchdog(grace: Duration) {
    shutdown_signal().await;
    arm_watchdog(grace);
}
