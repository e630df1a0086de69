//! Presence: who is online, on which edge, with which devices.
//!
//! [`PresenceStore`] is the contract; [`MemoryPresence`] serves standalone
//! mode (one process); [`RedisPresence`] serves clusters. [`connect_redis`]
//! opens the one Redis connection type every backend uses, for a single
//! Redis, a Redis Cluster or Sentinel, chosen by URL.
//! Callers publish `sb.presence.<user>` events only on the transitions the
//! store reports: first device online, last device offline.
#![warn(missing_docs)]

mod conn;
mod members;
mod memory;
mod redis;
mod store;

pub use conn::{RedisConn, connect_redis};
pub use members::{
    BucketsError, DEFAULT_BUCKETS, MemberStore, MemoryMembers, RedisMembers, bucket_key, bucket_of,
};
pub use memory::MemoryPresence;
pub use redis::RedisPresence;
pub use store::{PresenceError, PresenceStore, Session, Transition, UserStatus};
