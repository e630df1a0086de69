//! What the two Switchboard processes, `switchboard-edge` and
//! `switchboard-router`, share, so that both are configured, answer HTTP
//! and report the same way:
//!
//! - `config`: the settings both take ([`ClusterSettings`], declared once),
//!   the TOML-file layering under flags and environment, and
//!   [`ConfigError`], which names the flag at fault.
//! - `api`: the backend API as one transport-neutral service ([`Api`]):
//!   typed requests, typed refusals ([`ApiError`], whose [`ApiCode`]
//!   maps to an HTTP status and a gRPC code), publish, batch, kick,
//!   presence and history reads.
//! - `http`: health, readiness, metrics, and the backend API's JSON
//!   routes (`POST /api/publish`, `/api/kick`, `/api/presence`,
//!   `/api/history`) over [`Api`].
//! - `grpc`: the same API as the gRPC service `switchboard.api.v1`, with
//!   the standard health service, on a listener of its own.
//! - `telemetry`: the Prometheus recorder (histogram buckets), process
//!   metrics, series registered at zero.
//! - `presence`: presence events and the sweep of crashed nodes' sessions.
//! - `process`: logging, runtime, listener, the shutdown signal and the
//!   exit code of a process's `main`.
//! - `tap`: the validation of the event tap's settings.
//! - `stop`: the deadlines of a stop, derived from the shutdown grace,
//!   what it gave up on, and the watchdog behind them.
//!
//! The publish path itself is `switchboard-router`'s library.
#![warn(missing_docs)]

pub mod admin;
mod api;
pub mod config;
pub mod ctl;
pub mod grpc;
pub mod http;
pub mod members;
mod presence;
mod process;
mod stop;
mod tap;
pub mod telemetry;
#[cfg(feature = "otel")]
mod traces;

pub use api::{
    Api, ApiBackends, ApiCode, ApiError, DEFAULT_HISTORY_LIMIT, HistoryFields, HistoryPage,
    MAX_BATCH_MESSAGES, MAX_HISTORY_LIMIT, MAX_PRESENCE_USERS, Op, PublishFields,
};
pub use config::{BackendUrls, ClusterSettings, ConfigError, LogFormat, NodeConfig, TraceSettings};
pub use presence::{announce, sweep_presence};
pub use process::{
    Logging, fail, init_logging, serve_main, shutdown_signal, shutdown_signal_with_watchdog,
};
pub use stop::{EXIT_GAVE_UP, Stop, Stopped, WATCHDOG_MARGIN, arm_watchdog};
