//! Presence over Redis.
//!
//! - `sb:{user:<u>}:sessions` hash: session id → `<expiry ms>|<node>`; one
//!   Lua script per change counts the live sessions before and after, so
//!   the first-online and last-offline transitions are reported exactly
//!   once however many edges race.
//! - `sb:{user:<u>}:seen` last disconnect (unix ms).
//! - `sb:presence:expiry` sorted set of `<user> <session>` by expiry: any
//!   node's sweeper finds sessions of crashed edges and expires them.
//! - `sb:online` set of online users (for channel online counts).
use std::collections::HashMap;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use switchboard_protocol::UserId;

use crate::store::{PresenceError, PresenceStore, Session, Transition, UserStatus};

/// Removes expired sessions; returns the number still live.
const LIVE: &str = r#"
local function live(key, now)
  local n = 0
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    local exp = tonumber(string.match(all[i + 1], '^(%d+)'))
    if exp and exp > now then n = n + 1 else redis.call('HDEL', key, all[i]) end
  end
  return n
end
"#;

const REGISTER: &str = r#"
local now = tonumber(ARGV[1])
local before = live(KEYS[1], now)
local mine = redis.call('HGET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3] .. '|' .. ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if before == 0 or (before == 1 and mine and tonumber(string.match(mine, '^(%d+)')) <= now) then
  return 1
end
return 0
"#;

const UNREGISTER: &str = r#"
local now = tonumber(ARGV[1])
local had = redis.call('HEXISTS', KEYS[1], ARGV[2])
if had == 0 then return 0 end
local before = live(KEYS[1], now)
redis.call('HDEL', KEYS[1], ARGV[2])
local after = live(KEYS[1], now)
if after == 0 and before > 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
  return 1
end
return 0
"#;

const EXPIRE: &str = r#"
local now = tonumber(ARGV[1])
local total = redis.call('HLEN', KEYS[1])
if total == 0 then return 0 end
local after = live(KEYS[1], now)
if after == 0 then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"#;

const HEARTBEAT: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"#;

const DROP_DUE: &str = r#"
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) <= tonumber(ARGV[1]) then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
"#;

const EXPIRY_INDEX: &str = "sb:presence:expiry";
const ONLINE: &str = "sb:online";
/// Live nodes: node id → `<expiry ms>|<address>`.
const NODES: &str = "sb:nodes";
/// Last-seen times are kept this long (ms).
const SEEN_TTL_MS: i64 = 30 * 86_400_000;

fn sessions_key(u: &UserId) -> String {
    format!("sb:{{user:{u}}}:sessions")
}
fn seen_key(u: &UserId) -> String {
    format!("sb:{{user:{u}}}:seen")
}

/// The Redis implementation of [`PresenceStore`].
pub struct RedisPresence {
    conn: ConnectionManager,
    ttl_ms: i64,
    register: redis::Script,
    unregister: redis::Script,
    expire: redis::Script,
}

fn unavailable(e: redis::RedisError) -> PresenceError {
    PresenceError::Unavailable(e.to_string())
}

impl RedisPresence {
    /// Sessions expire `ttl_ms` after their last heartbeat.
    pub fn new(conn: ConnectionManager, ttl_ms: i64) -> Self {
        let with_live = |body: &str| redis::Script::new(&format!("{LIVE}\n{body}"));
        RedisPresence {
            conn,
            ttl_ms,
            register: with_live(REGISTER),
            unregister: with_live(UNREGISTER),
            expire: with_live(EXPIRE),
        }
    }

    /// Online members among `users` (one round trip): used for channel
    /// online counts without listing members to the caller.
    pub async fn count_online(&self, users: &[UserId]) -> Result<usize, PresenceError> {
        let mut pipe = redis::pipe();
        for u in users {
            pipe.cmd("SISMEMBER").arg(ONLINE).arg(u.as_str());
        }
        let flags: Vec<bool> = pipe
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(flags.into_iter().filter(|f| *f).count())
    }
}

fn index_member(s: &Session) -> String {
    format!("{} {}", s.user, s.session_id)
}

#[async_trait]
impl PresenceStore for RedisPresence {
    async fn register(&self, s: &Session, now_ms: i64) -> Result<Transition, PresenceError> {
        let mut conn = self.conn.clone();
        let expiry = now_ms + self.ttl_ms;
        let became: i64 = self
            .register
            .key(sessions_key(&s.user))
            .key(seen_key(&s.user))
            .arg(now_ms)
            .arg(&s.session_id)
            .arg(expiry)
            .arg(&s.node)
            .arg(self.ttl_ms * 2)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if became == 1 {
            // Outside the script: `sb:online` lives in another cluster slot.
            let _: () = redis::cmd("SADD")
                .arg(ONLINE)
                .arg(s.user.as_str())
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        let _: () = redis::cmd("ZADD")
            .arg(EXPIRY_INDEX)
            .arg(expiry)
            .arg(index_member(s))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(if became == 1 {
            Transition::BecameOnline
        } else {
            Transition::Unchanged
        })
    }

    async fn unregister(&self, s: &Session, now_ms: i64) -> Result<Transition, PresenceError> {
        let mut conn = self.conn.clone();
        let became: i64 = self
            .unregister
            .key(sessions_key(&s.user))
            .key(seen_key(&s.user))
            .arg(now_ms)
            .arg(&s.session_id)
            .arg(SEEN_TTL_MS)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if became == 1 {
            let _: () = redis::cmd("SREM")
                .arg(ONLINE)
                .arg(s.user.as_str())
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        let _: () = redis::cmd("ZREM")
            .arg(EXPIRY_INDEX)
            .arg(index_member(s))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(if became == 1 {
            Transition::BecameOffline {
                last_seen_ms: now_ms,
            }
        } else {
            Transition::Unchanged
        })
    }

    async fn heartbeat(&self, sessions: &[Session], now_ms: i64) -> Result<(), PresenceError> {
        let mut conn = self.conn.clone();
        let expiry = now_ms + self.ttl_ms;
        // Loaded per call, so a restarted Redis (empty script cache) is fine.
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(HEARTBEAT)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        for chunk in sessions.chunks(500) {
            let mut pipe = redis::pipe();
            for s in chunk {
                pipe.cmd("EVALSHA")
                    .arg(&sha)
                    .arg(1)
                    .arg(sessions_key(&s.user))
                    .arg(&s.session_id)
                    .arg(expiry)
                    .arg(&s.node)
                    .arg(self.ttl_ms * 2)
                    .ignore();
                pipe.cmd("ZADD")
                    .arg(EXPIRY_INDEX)
                    .arg(expiry)
                    .arg(index_member(s))
                    .ignore();
            }
            let _: () = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        }
        Ok(())
    }

    async fn status(
        &self,
        users: &[UserId],
        now_ms: i64,
    ) -> Result<Vec<UserStatus>, PresenceError> {
        let mut pipe = redis::pipe();
        for u in users {
            pipe.hgetall(sessions_key(u)).get(seen_key(u));
        }
        let replies: Vec<(HashMap<String, String>, Option<i64>)> = {
            let raw: Vec<redis::Value> = pipe
                .query_async(&mut self.conn.clone())
                .await
                .map_err(unavailable)?;
            raw.chunks(2)
                .map(|pair| {
                    let sessions: HashMap<String, String> =
                        redis::from_redis_value(pair[0].clone()).unwrap_or_default();
                    let seen: Option<i64> =
                        redis::from_redis_value(pair[1].clone()).unwrap_or(None);
                    (sessions, seen)
                })
                .collect()
        };
        Ok(users
            .iter()
            .zip(replies)
            .map(|(u, (sessions, seen))| {
                let devices = sessions
                    .values()
                    .filter(|v| {
                        v.split('|')
                            .next()
                            .and_then(|e| e.parse::<i64>().ok())
                            .is_some_and(|e| e > now_ms)
                    })
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

    async fn node_heartbeat(
        &self,
        node: &str,
        addr: &str,
        now_ms: i64,
    ) -> Result<(), PresenceError> {
        let value = format!("{}|{addr}", now_ms + self.ttl_ms);
        redis::cmd("HSET")
            .arg(NODES)
            .arg(node)
            .arg(value)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn nodes(&self, now_ms: i64) -> Result<Vec<(String, String)>, PresenceError> {
        let all: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(NODES)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let mut live = Vec::new();
        for (node, v) in all {
            let (exp, addr) = v.split_once('|').unwrap_or(("0", ""));
            if exp.parse::<i64>().unwrap_or(0) > now_ms {
                live.push((node, addr.to_owned()));
            } else {
                let _: () = redis::cmd("HDEL")
                    .arg(NODES)
                    .arg(&node)
                    .query_async(&mut self.conn.clone())
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(live)
    }

    async fn expire(&self, now_ms: i64) -> Result<Vec<(UserId, i64)>, PresenceError> {
        let mut conn = self.conn.clone();
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(EXPIRY_INDEX)
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(1000)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let mut gone = Vec::new();
        let mut users: Vec<UserId> = due
            .iter()
            .filter_map(|m| m.split(' ').next())
            .filter_map(|u| UserId::parse(u).ok())
            .collect();
        users.sort();
        users.dedup();
        for u in users {
            let became: i64 = self
                .expire
                .key(sessions_key(&u))
                .key(seen_key(&u))
                .arg(now_ms)
                .arg(SEEN_TTL_MS)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if became == 1 {
                let _: () = redis::cmd("SREM")
                    .arg(ONLINE)
                    .arg(u.as_str())
                    .query_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                gone.push((u, now_ms));
            }
        }
        if !due.is_empty() {
            // Remove the processed entries that are still due (a heartbeat
            // may have moved one since we read it).
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(DROP_DUE).arg(1).arg(EXPIRY_INDEX).arg(now_ms);
            for m in &due {
                cmd.arg(m);
            }
            let _: () = cmd.query_async(&mut conn).await.map_err(unavailable)?;
        }
        Ok(gone)
    }
}
