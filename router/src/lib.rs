//! The publish path.
//!
//! - [`Bus`]: moves frames between routers and edges by subject
//!   (`sb.chat.<chat>`, `sb.edge.<edge>.user.<user>`, `sb.presence.<user>`);
//!   [`MemoryBus`] in standalone mode, NATS in a cluster.
//! - [`History`]: sequences each stream, de-duplicates by client message id
//!   and keeps a bounded window for recovery; [`MemoryHistory`] in
//!   standalone mode, Redis in a cluster.
//! - [`Router`]: validates a publish, appends it and delivers it.
//!
//! Standalone, the edge links this crate and runs the router in-process.
#![warn(missing_docs)]

mod api;
mod bus;
mod history;
mod members;
mod node;
mod publisher;
mod router;
mod service;
pub mod telemetry;
mod urls;

pub use api::{has_api_key, kick, parse_api_kick, parse_api_publish, publish_error_status};
pub use bus::{
    Bus, BusError, BusHandler,
    memory::MemoryBus,
    nats::{NatsBus, NatsSettings, connect_nats, frame_from_bus},
    presence_subject, publish_to_user,
};
pub use history::{
    Appended, Draft, History, HistoryError, HistoryLimits, Recovery,
    memory::MemoryHistory,
    redis::{RedisHistory, connect_redis, forget_stream},
};
pub use members::{Members, MembersError, PUSH_STREAM, SHARD_SUBJECT};
pub use node::{RouterConfig, run_router, shutdown_signal};
pub use publisher::{PUBLISH_SUBJECT, Publisher, ROUTER_QUEUE, RemoteRouter, encode_request};
pub use router::{
    PUBLISH_ERROR_REASONS, PublishError, PublishRequest, Published, Router, RouterLimits,
};
pub use service::{announce, handle_publish, serve, sweep_presence};
pub use urls::redact_url;
