//! Presence over Redis.
//!
//! - `sb:{user:<u>}:sessions` hash: session id → node; one Lua script per
//!   change counts the sessions before and after, so the first-online and
//!   last-offline transitions are reported exactly once however many edges
//!   race.
//! - `sb:{user:<u>}:seen` last disconnect (unix ms).
//! - `sb:nodes` hash: node → `<lease expiry ms>|<address>`, renewed by one
//!   heartbeat per node; a session lives as long as its node's lease.
//! - `sb:node:<node>:sessions` set of `<user> <session>`: what to remove
//!   when the node's lease runs out (any node's sweeper pops it).
//! - `sb:{online:<b>}` sets of online users, 64 buckets by a stable hash
//!   of the user (for channel online counts). Every connect and disconnect
//!   touches it, so one key would pin all of that traffic to one cluster
//!   master; 64 hash tags spread it over every master (ADR 0018).
//!
//! Every script touches one user's keys only (one Redis Cluster slot); the
//! node-wide keys are changed by single commands, so batches that span
//! users run on a cluster too (see `RedisConn`). `sb:nodes` and
//! `sb:node:<node>:sessions` stay single keys: the first changes once per
//! lease renewal of a node, the second only with that node's sessions.
use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use switchboard_protocol::UserId;

use crate::{
    RedisConn,
    store::{PresenceError, PresenceStore, Session, Transition, UserStatus},
};

/// Adds a session; 1 if it is the user's first.
const REGISTER: &str = r#"
local before = redis.call('HLEN', KEYS[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if before == 0 then return 1 end
return 0
"#;

/// Removes a session (only if it is still the node's); 1 if it was the
/// user's last, and then records last seen.
const UNREGISTER: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
  return 1
end
return 0
"#;

/// Renews a lease; 1 if there was no live one.
const LEASE: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. ARGV[3])
if not cur then return 1 end
local exp = tonumber(string.match(cur, '^(%d+)'))
if not exp or exp <= tonumber(ARGV[4]) then return 1 end
return 0
"#;

/// Forgets a lease that is still the expired one that was read.
const FORGET: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('HDEL', KEYS[1], ARGV[1]) end
"#;

/// Buckets of the online set; fixed for the life of the data.
const ONLINE_BUCKETS: u32 = 64;
/// Live nodes: node id → `<expiry ms>|<address>`.
const NODES: &str = "sb:nodes";
/// Last-seen times are kept this long (ms).
const SEEN_TTL_MS: i64 = 30 * 86_400_000;
/// Sessions removed per round trip when a node is swept.
const SWEEP_BATCH: usize = 1000;

fn sessions_key(u: &UserId) -> String {
    format!("sb:{{user:{u}}}:sessions")
}
fn seen_key(u: &UserId) -> String {
    format!("sb:{{user:{u}}}:seen")
}
/// FNV-1a: a stable hash, so every process picks the same bucket.
fn online_bucket(u: &UserId) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in u.as_str().bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h % ONLINE_BUCKETS
}
fn online_key(bucket: u32) -> String {
    format!("sb:{{online:{bucket}}}")
}
/// Users grouped by online bucket, each group in the callers' order.
fn by_online_bucket<'a>(
    users: impl IntoIterator<Item = &'a UserId>,
) -> Vec<(u32, Vec<&'a UserId>)> {
    let mut groups: HashMap<u32, Vec<&UserId>> = HashMap::new();
    for u in users {
        groups.entry(online_bucket(u)).or_default().push(u);
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by_key(|g| g.0);
    groups
}
fn node_key(node: &str) -> String {
    format!("sb:node:{node}:sessions")
}

/// The Redis implementation of [`PresenceStore`].
pub struct RedisPresence {
    conn: RedisConn,
    ttl_ms: i64,
    unregister: redis::Script,
    lease: redis::Script,
    forget: redis::Script,
}

impl RedisPresence {
    /// Node leases last `ttl_ms` after their last heartbeat.
    pub fn new(conn: impl Into<RedisConn>, ttl_ms: i64) -> Self {
        RedisPresence {
            conn: conn.into(),
            ttl_ms,
            unregister: redis::Script::new(UNREGISTER),
            lease: redis::Script::new(LEASE),
            forget: redis::Script::new(FORGET),
        }
    }

    /// Online members among `users` (one round trip): used for channel
    /// online counts without listing members to the caller.
    pub async fn count_online(&self, users: &[UserId]) -> Result<usize, PresenceError> {
        if users.is_empty() {
            return Ok(0);
        }
        // One SMISMEMBER per bucket; on a cluster each goes to its master.
        let mut pipe = redis::pipe();
        for (b, group) in by_online_bucket(users) {
            pipe.cmd("SMISMEMBER")
                .arg(online_key(b))
                .arg(group.iter().map(|u| u.as_str()).collect::<Vec<_>>());
        }
        let flags: Vec<Vec<bool>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(flags.into_iter().flatten().filter(|f| *f).count())
    }

    /// Registers many sessions, one round trip per batch.
    async fn register_all(&self, sessions: &[Session]) -> Result<Vec<UserId>, PresenceError> {
        let mut conn = self.conn.clone();
        let mut back = Vec::new();
        for chunk in sessions.chunks(SWEEP_BATCH) {
            // EVAL, not EVALSHA: a pipeline cannot fall back when a
            // restarted Redis lost its script cache.
            let mut pipe = redis::pipe();
            for s in chunk {
                pipe.cmd("EVAL")
                    .arg(REGISTER)
                    .arg(1)
                    .arg(sessions_key(&s.user))
                    .arg(&s.session_id)
                    .arg(&s.node);
                pipe.cmd("SADD")
                    .arg(node_key(&s.node))
                    .arg(index_member(s))
                    .ignore();
                // Outside the script: the online bucket lives in another
                // cluster slot. Idempotent, so every register may add.
                pipe.cmd("SADD")
                    .arg(online_key(online_bucket(&s.user)))
                    .arg(s.user.as_str())
                    .ignore();
            }
            let became: Vec<i64> = pipe.query_async(&mut conn).await?;
            back.extend(
                chunk
                    .iter()
                    .zip(became)
                    .filter(|(_, b)| *b == 1)
                    .map(|(s, _)| s.user.clone()),
            );
        }
        Ok(back)
    }

    /// Removes up to `max` sessions of `node`; returns the users that went
    /// offline and whether sessions remain.
    async fn sweep_node(
        &self,
        node: &str,
        now_ms: i64,
        max: usize,
    ) -> Result<(Vec<(UserId, i64)>, bool), PresenceError> {
        let mut conn = self.conn.clone();
        let mut gone = Vec::new();
        let mut swept = 0;
        while swept < max {
            // Read, not popped: a member leaves the node's set only once
            // its user's removal is confirmed. Popped first, a failure in
            // between (a Redis Cluster master failing over refuses every
            // command for a moment, even putting them back) left the
            // sessions in their users' hashes with nothing to sweep them:
            // online for good. Two sweepers may read the same members;
            // UNREGISTER removes a session once, so each user still goes
            // offline exactly once.
            let members: Vec<String> = redis::cmd("SRANDMEMBER")
                .arg(node_key(node))
                .arg(SWEEP_BATCH)
                .query_async(&mut conn)
                .await?;
            if members.is_empty() {
                return Ok((gone, false));
            }
            swept += members.len();
            let parsed: Vec<(UserId, &str)> = members
                .iter()
                .filter_map(|m| {
                    let (u, s) = m.split_once(' ')?;
                    Some((UserId::parse(u).ok()?, s))
                })
                .collect();
            let mut pipe = redis::pipe();
            for (u, session) in &parsed {
                pipe.cmd("EVAL")
                    .arg(UNREGISTER)
                    .arg(2)
                    .arg(sessions_key(u))
                    .arg(seen_key(u))
                    .arg(*session)
                    .arg(node)
                    .arg(now_ms)
                    .arg(SEEN_TTL_MS);
            }
            let became: Vec<i64> = if parsed.is_empty() {
                Vec::new()
            } else {
                pipe.query_async(&mut conn).await?
            };
            let offline: Vec<UserId> = parsed
                .into_iter()
                .zip(became)
                .filter(|(_, b)| *b == 1)
                .map(|((u, _), _)| u)
                .collect();
            if !offline.is_empty() {
                let mut pipe = redis::pipe();
                for (b, group) in by_online_bucket(&offline) {
                    pipe.cmd("SREM")
                        .arg(online_key(b))
                        .arg(group.iter().map(|u| u.as_str()).collect::<Vec<_>>())
                        .ignore();
                }
                let _: () = pipe.query_async(&mut conn).await?;
                gone.extend(offline.into_iter().map(|u| (u, now_ms)));
            }
            let _: () = redis::cmd("SREM")
                .arg(node_key(node))
                .arg(&members)
                .query_async(&mut conn)
                .await?;
        }
        Ok((gone, true))
    }

    async fn leases(&self) -> Result<HashMap<String, String>, PresenceError> {
        redis::cmd("HGETALL")
            .arg(NODES)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(PresenceError::Redis)
    }
}

fn index_member(s: &Session) -> String {
    format!("{} {}", s.user, s.session_id)
}

fn lease_expiry(value: &str) -> i64 {
    value
        .split('|')
        .next()
        .and_then(|e| e.parse().ok())
        .unwrap_or(0)
}

#[async_trait]
impl PresenceStore for RedisPresence {
    async fn register(&self, s: &Session, _now_ms: i64) -> Result<Transition, PresenceError> {
        let became = self.register_all(std::slice::from_ref(s)).await?;
        Ok(if became.is_empty() {
            Transition::Unchanged
        } else {
            Transition::BecameOnline
        })
    }

    /// One pipeline of `HGET`s (on a Redis Cluster sent to their slots'
    /// nodes concurrently).
    async fn registered(&self, sessions: &[Session]) -> Result<Vec<bool>, PresenceError> {
        if sessions.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for s in sessions {
            pipe.hget(sessions_key(&s.user), &s.session_id);
        }
        let nodes: Vec<Option<String>> = pipe.query_async(&mut self.conn.clone()).await?;
        Ok(sessions
            .iter()
            .zip(nodes)
            .map(|(s, n)| n.as_deref() == Some(s.node.as_str()))
            .collect())
    }

    async fn unregister(&self, s: &Session, now_ms: i64) -> Result<Transition, PresenceError> {
        let mut conn = self.conn.clone();
        let became: i64 = self
            .unregister
            .key(sessions_key(&s.user))
            .key(seen_key(&s.user))
            .arg(&s.session_id)
            .arg(&s.node)
            .arg(now_ms)
            .arg(SEEN_TTL_MS)
            .invoke_async(&mut conn)
            .await?;
        let mut pipe = redis::pipe();
        pipe.cmd("SREM")
            .arg(node_key(&s.node))
            .arg(index_member(s))
            .ignore();
        if became == 1 {
            pipe.cmd("SREM")
                .arg(online_key(online_bucket(&s.user)))
                .arg(s.user.as_str())
                .ignore();
        }
        let _: () = pipe.query_async(&mut conn).await?;
        Ok(if became == 1 {
            Transition::BecameOffline {
                last_seen_ms: now_ms,
            }
        } else {
            Transition::Unchanged
        })
    }

    async fn restore(
        &self,
        sessions: &[Session],
        _now_ms: i64,
    ) -> Result<Vec<UserId>, PresenceError> {
        self.register_all(sessions).await
    }

    async fn status(
        &self,
        users: &[UserId],
        now_ms: i64,
    ) -> Result<Vec<UserStatus>, PresenceError> {
        let mut pipe = redis::pipe();
        pipe.hgetall(NODES);
        for u in users {
            pipe.hgetall(sessions_key(u)).get(seen_key(u));
        }
        let raw: Vec<redis::Value> = pipe.query_async(&mut self.conn.clone()).await?;
        let mut raw = raw.into_iter();
        let leases: HashMap<String, String> = raw
            .next()
            .and_then(|v| redis::from_redis_value(v).ok())
            .unwrap_or_default();
        let live: HashSet<&str> = leases
            .iter()
            .filter(|(_, v)| lease_expiry(v) > now_ms)
            .map(|(n, _)| n.as_str())
            .collect();
        let rest: Vec<redis::Value> = raw.collect();
        Ok(users
            .iter()
            .zip(rest.chunks(2))
            .map(|(u, pair)| {
                let sessions: HashMap<String, String> =
                    redis::from_redis_value(pair[0].clone()).unwrap_or_default();
                let seen: Option<i64> = redis::from_redis_value(pair[1].clone()).unwrap_or(None);
                let devices = sessions
                    .values()
                    .filter(|n| live.contains(n.as_str()))
                    .count() as u32;
                UserStatus {
                    user: u.clone(),
                    online: devices > 0,
                    devices,
                    last_seen_ms: seen.unwrap_or(0),
                }
            })
            .collect())
    }

    async fn nodes_of(&self, user: &UserId) -> Result<Vec<String>, PresenceError> {
        let mut nodes: Vec<String> = redis::cmd("HVALS")
            .arg(sessions_key(user))
            .query_async(&mut self.conn.clone())
            .await?;
        nodes.sort();
        nodes.dedup();
        Ok(nodes)
    }

    async fn expire(&self, now_ms: i64) -> Result<Vec<(UserId, i64)>, PresenceError> {
        let mut gone = Vec::new();
        for (node, value) in self.leases().await? {
            if lease_expiry(&value) > now_ms {
                continue;
            }
            // Bounded per call, so one sweep of a huge node doesn't stall
            // the sweeper; the next tick continues.
            let (offline, more) = self.sweep_node(&node, now_ms, 20 * SWEEP_BATCH).await?;
            gone.extend(offline);
            if !more {
                let _: () = self
                    .forget
                    .key(NODES)
                    .arg(&node)
                    .arg(&value)
                    .invoke_async(&mut self.conn.clone())
                    .await?;
            }
        }
        Ok(gone)
    }

    async fn drop_node(
        &self,
        node: &str,
        now_ms: i64,
    ) -> Result<Vec<(UserId, i64)>, PresenceError> {
        let mut gone = Vec::new();
        loop {
            let (offline, more) = self.sweep_node(node, now_ms, 20 * SWEEP_BATCH).await?;
            gone.extend(offline);
            if !more {
                return Ok(gone);
            }
        }
    }

    async fn node_heartbeat(
        &self,
        node: &str,
        addr: &str,
        now_ms: i64,
    ) -> Result<bool, PresenceError> {
        let fresh: i64 = self
            .lease
            .key(NODES)
            .arg(node)
            .arg(now_ms + self.ttl_ms)
            .arg(addr)
            .arg(now_ms)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(fresh == 1)
    }

    async fn nodes(&self, now_ms: i64) -> Result<Vec<(String, String)>, PresenceError> {
        let mut live = Vec::new();
        for (node, v) in self.leases().await? {
            if lease_expiry(&v) > now_ms {
                let addr = v.split_once('|').map(|(_, a)| a).unwrap_or("");
                live.push((node, addr.to_owned()));
            }
        }
        Ok(live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_buckets_are_stable_and_spread() {
        let a = UserId::parse("alice").unwrap();
        assert_eq!(online_bucket(&a), online_bucket(&a));
        let users: Vec<UserId> = (0..5_000)
            .map(|i| UserId::parse(&format!("user-{i}")).unwrap())
            .collect();
        let groups = by_online_bucket(&users);
        assert_eq!(groups.len(), ONLINE_BUCKETS as usize);
        assert_eq!(groups.iter().map(|g| g.1.len()).sum::<usize>(), 5_000);
    }
}
