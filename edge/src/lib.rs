//! The Switchboard edge: holds client WebSockets, authenticates them, keeps
//! the local index of who listens to what, and fans each message out with
//! one pre-encoded frame shared by all local receivers.
//!
//! Layout, from the top down (a module uses only those below it):
//! - `process`: the binary's `main` (a library function, so the system
//!   tests run the same code).
//! - `app`: wiring: backends chosen once, run, the [`Edge`] handle.
//! - `server`: listener and HTTP routes (`/ws` entry, dev page; health,
//!   metrics and the backend API from `switchboard-node`, shared with the
//!   router).
//! - `control`: a thread of its own on which `server` serves the backend
//!   API and the probes, so a fan-out backlog on the sockets' runtime
//!   does not delay an ack or a scrape.
//! - `conn`: one socket by phase: `upgrade` (the `/ws` checks),
//!   `handshake` (Connect under a deadline), `reader` (fragments, control
//!   frames, rate admission, the read-error map), `requests` (the
//!   session's handlers), `writer` (the socket's task's writes),
//!   `inbound` (frames read one at a time, no read buffer while idle).
//! - `wire`: a socket's write side (the batch, the per-stream order filter,
//!   deflate), kept in its `mailbox` so the fan-out writes to an idle
//!   socket directly, without waking its task.
//! - `drain`: batched close with jittered advice on shutdown (or when an
//!   operator asks, through the admin API).
//! - `admin`: this edge's status and drain for the admin API (ADR 0037).
//! - `state`: `EdgeState`, and the narrow `SessionContext` sessions see.
//! - `presence`: the node lease, heartbeats and restore, each socket's
//!   presence session and the per-user ordering of its announcements.
//! - `hub`: local index, reference-counted bus interest, ordered fan-out
//!   in per-stream lanes, off the publisher's task (`hub/lanes.rs`).
//! - `order`: one stream's reorder and gap repair (a state machine without
//!   I/O, driven by the hub) and the seq rule the writer shares; its doc
//!   states the ordering contract end to end.
//! - `mailbox`: a socket's bounded mailbox, the only way others reach it.
//! - `config`: flags, environment, TOML file → [`Config`].
//! - `authz`: chat authorization by mode (token grants, members, the
//!   backend's hook, open) and its bounded cache.
//! - `auth`: JWT verification; `admission`: the connection cap under the
//!   file limit; `ratelimit`: token buckets; `metrics`; `tls`.
//!
//! Standalone the router, bus, presence and history run in this process
//! from the `switchboard-router` and `switchboard-presence` crates; what
//! edge and router processes share (settings, HTTP answers, telemetry,
//! presence sweep, shutdown) is `switchboard-node`.
#![warn(missing_docs)]

mod admin;
mod admission;
mod app;
mod auth;
mod authz;
mod config;
mod conn;
mod control;
mod drain;
mod hooks;
mod hub;
mod inline_map;
mod mailbox;
mod metrics;
mod order;
mod presence;
mod process;
mod ratelimit;
mod server;
mod state;
mod tls;
mod wire;

pub use admission::raise_file_limit;
pub use app::{Edge, run};
pub use auth::{AuthConfig, AuthError, ChatGrant, Claims, Identity, SubscriptionClaims};
pub use authz::{
    Action, AuthorizeHook, AuthzSettings, ChatAuthMode, DmPolicy, HookDecision, HookError,
};
pub use config::{ClusterConfig, Config, ConfigError, Settings};
pub use hooks::{HookSettings, HookUrl, ModerationSettings};
pub use process::main;
pub use ratelimit::Rate;
pub use switchboard_node::{ClusterSettings, Stopped};
pub use tls::TlsFiles;

/// Entry points for fuzz targets (`edge/fuzz`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    /// Reads WebSocket frames from `bytes` as the reader of a socket that
    /// negotiated permessage-deflate does, until the input ends or a frame
    /// is refused; returns each payload's length (a compressed frame's
    /// once inflated within the limit, as a whole message would be).
    pub fn read_frames(bytes: &[u8], max_message_bytes: usize) -> Vec<usize> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
        runtime.block_on(async {
            let mut inbound = crate::conn::inbound::Inbound::new(bytes, max_message_bytes, true);
            let mut lens = Vec::new();
            let mut obligated = |_f: fastwebsockets::Frame<'static>| {
                std::future::ready(Ok::<(), std::io::Error>(()))
            };
            while lens.len() < 10_000 {
                match inbound.read_frame(&mut obligated).await {
                    Ok((f, false)) => lens.push(f.payload.len()),
                    Ok((f, true)) => {
                        match switchboard_protocol::deflate::inflate(&f.payload, max_message_bytes)
                        {
                            Ok(plain) => lens.push(plain.len()),
                            Err(_) => break,
                        }
                    }
                    Err(_) => break,
                }
            }
            lens
        })
    }
}
