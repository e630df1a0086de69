//! What the two Switchboard processes, `switchboard-edge` and
//! `switchboard-router`, share, so that both are configured, answer HTTP
//! and report the same way:
//!
//! - `config`: the settings both take ([`ClusterSettings`], declared once),
//!   the TOML-file layering under flags and environment, and
//!   [`ConfigError`], which names the flag at fault.
//! - `http`: health, readiness, metrics, and the backend API
//!   (`POST /api/publish`, `POST /api/kick`) with its key check.
//! - `api`: the backend API's bodies and the kick itself.
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

mod api;
pub mod config;
pub mod http;
pub mod members;
mod presence;
mod process;
mod stop;
mod tap;
pub mod telemetry;

pub use api::{has_api_key, kick, parse_api_kick, parse_api_publish, publish_error_status};
pub use config::{BackendUrls, ClusterSettings, ConfigError, NodeConfig};
pub use presence::{announce, sweep_presence};
pub use process::{fail, serve_main, shutdown_signal, shutdown_signal_with_watchdog};
pub use stop::{EXIT_GAVE_UP, Stop, Stopped, WATCHDOG_MARGIN, arm_watchdog};
