//! The publish path: what a publish goes through, from request to
//! delivery, whichever process runs it (the edge standalone, a router
//! replica in a cluster).
//!
//! - [`Bus`]: moves frames between routers and edges by subject (built and
//!   parsed in `switchboard_protocol::subject`); [`MemoryBus`] in
//!   standalone mode, [`NatsBus`] in a cluster.
//! - [`History`]: sequences each stream, de-duplicates by client message id
//!   and keeps a bounded window for recovery; [`MemoryHistory`] in
//!   standalone mode, [`RedisHistory`] in a cluster.
//! - [`Router`]: validates a publish, appends it and delivers it.
//! - [`Publisher`]: the publish path as an edge sees it, in-process
//!   ([`Router`]) or over NATS ([`RemoteRouter`]).
//! - [`Members`]: channel members and their work (unread counters, push
//!   jobs), run by the router replicas.
//! - [`EventTap`]: every sequenced message, connection and presence
//!   change appended to a JetStream stream for backends (ADR 0032).
//! - [`Hop`]: the per-hop latency breakdown (`switchboard_hop_seconds`).
//! - [`trace`]: trace context carried from publish to delivery (ADR 0038).
//! - [`redact_url`]: backend URLs as logs and errors may show them.
//!
//! The processes around it (HTTP, configuration, telemetry) live in
//! `switchboard-node` (shared by both binaries), `switchboard-router-server`
//! (the router process) and `switchboard-edge`.
#![warn(missing_docs)]

mod bus;
mod history;
mod hops;
mod members;
mod publisher;
pub mod retry;
mod router;
mod tap;
pub mod trace;
mod urls;

pub use bus::{
    Bus, BusError, BusHandler,
    memory::MemoryBus,
    nats::{NatsBus, NatsSettings},
    publish_to_user,
};
pub use history::{
    Appended, Draft, History, HistoryError, HistoryLimits, Recovery,
    memory::MemoryHistory,
    redis::{RedisHistory, connect_redis},
};
pub use hops::{HOP_SECONDS, Hop};
pub use members::{
    MEMBER_RETRY_WINDOW, Members, MembersError, MembersSettings, PUSH_STREAM, SHARD_ACK_WAIT_MAX,
    SHARD_CONSUMER, SHARD_MAX_ACK_PENDING, SHARD_MAX_DELIVER, SHARD_STREAM, ShardConsumer,
    WHOLE_CHAT_MAX_MEMBERS,
};
pub use publisher::{Publisher, RemoteRouter, encode_request};
pub use router::{
    PUBLISH_ERROR_REASONS, PublishError, PublishRequest, Published, Router, RouterLimits,
};
pub use tap::{
    EVENT_STREAM, EventTap, StreamRole, TAP_DROP_REASONS, TAP_KINDS, TAP_RESULTS, TapError,
    TapSettings,
};
pub use urls::redact_url;
