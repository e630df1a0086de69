//! The Switchboard wire contract.
//!
//! - [`v1`]: the frames, generated from `proto/switchboard/v1/switchboard.proto`
//!   (prost) with the canonical proto3 JSON mapping (pbjson).
//! - [`Encoding`]: the two encodings and their WebSocket subprotocols.
//! - [`CloseReason`]: the one table of close codes and reconnect advice.
//! - [`ChatId`] / [`UserId`]: ids that are safe to put into NATS subjects.
//! - [`subject`]: the cluster's NATS subjects, built and parsed.
//! - [`events`]: the records of the event tap (ADR 0032), generated from
//!   `proto/switchboard/events/v1/events.proto`.
//! - [`deflate`]: permessage-deflate (RFC 7692) without context takeover:
//!   the extension's negotiation and the codec.
//! - `client` (feature `client`, off by default): an async Rust client with
//!   reconnect and resume, used by tests, examples and the load generator.
//! - [`api`]: the backend API over gRPC (`proto/switchboard/api/v1`), and
//!   [`hooks`]: the service a backend implements for Switchboard to call
//!   (`proto/switchboard/hooks/v1`). Their tonic clients and servers come
//!   with the `grpc` feature (off by default); the messages always exist.
//!
//! `docs/protocol.md` is the reference for app developers.
#![warn(missing_docs)]

mod close;
mod codec;
pub mod deflate;
mod ids;
mod stream;
pub mod subject;

#[cfg(feature = "client")]
pub mod client;

pub use close::CloseReason;
pub use codec::{DecodeError, Encoding};
pub use ids::{ChatId, IdError, MAX_CLIENT_MSG_ID_LEN, MAX_ID_LEN, UserId, validate_client_msg_id};
pub use stream::{Deflated, SharedFrame, StreamKey, epoch_hash};

/// Generated protocol types (version 1). See the `.proto` file for field docs.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/switchboard.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/switchboard.v1.serde.rs"));
}

/// Messages between nodes (router requests, shard and push jobs).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod internal {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/switchboard.internal.v1.rs"));
    }
}

/// Records of the event tap (JetStream stream `SB_EVENTS`), for the
/// backends that consume it.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod events {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/switchboard.events.v1.rs"));
    }
}

/// The backend API over gRPC (ADR 0033).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod api {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/switchboard.api.v1.rs"));
    }
}

/// Backend hooks: implemented by a backend, called by Switchboard.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod hooks {
    /// Version 1.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/switchboard.hooks.v1.rs"));
    }
}

/// Current unix time in milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
