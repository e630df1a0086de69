//! Chat membership and contacts, owned by the messenger's backend through
//! the API and read by the edges' `members` authorization mode (ADR 0031).
//!
//! [`MemberStore`] is the contract; [`MemoryMembers`] serves standalone
//! mode, [`RedisMembers`] clusters. In Redis a chat's members are the
//! router's channel member buckets (one source of truth for authorization
//! and member work, ADR 0020), with a per-user index of chats and a
//! per-user contact set:
//! `sb:{channel:<c>}:m:<bucket>` sets, `sb:{channel:<c>}:n` count,
//! `sb:{user:<u>}:chats` sorted set (score 0, paged by chat id),
//! `sb:{user:<u>}:contacts` set (who may message `<u>` directly),
//! `sb:members:buckets` the bucket count, fixed for the life of the data.
use std::collections::{BTreeSet, HashMap, HashSet};

use async_trait::async_trait;
use dashmap::DashMap;
use switchboard_protocol::{ChatId, UserId};

use crate::{PresenceError, RedisConn};

/// Member buckets per chat when nothing chose a count yet.
pub const DEFAULT_BUCKETS: u32 = 64;
/// Where the bucket count is recorded.
const BUCKETS_KEY: &str = "sb:members:buckets";
/// Users per Redis pipeline in a bulk change.
const CHUNK: usize = 10_000;
/// Users per pipeline of the per-user index (one slot each).
const INDEX_CHUNK: usize = 500;

/// Membership and contacts.
#[async_trait]
pub trait MemberStore: Send + Sync + 'static {
    /// Whether `user` is a member of `chat`.
    async fn is_member(&self, chat: &ChatId, user: &UserId) -> Result<bool, PresenceError>;
    /// Adds members; returns how many were not members before.
    async fn add(&self, chat: &ChatId, users: &[UserId]) -> Result<u64, PresenceError>;
    /// Removes members; returns how many were members.
    async fn remove(&self, chat: &ChatId, users: &[UserId]) -> Result<u64, PresenceError>;
    /// Number of members.
    async fn count(&self, chat: &ChatId) -> Result<u64, PresenceError>;
    /// A page of the user's chats in id order, after `after` (exclusive).
    async fn chats_of(
        &self,
        user: &UserId,
        after: Option<&ChatId>,
        limit: usize,
    ) -> Result<Vec<ChatId>, PresenceError>;
    /// Lets `contacts` message `user` directly; returns how many were new.
    async fn add_contacts(&self, user: &UserId, contacts: &[UserId]) -> Result<u64, PresenceError>;
    /// Takes that back; returns how many were contacts.
    async fn remove_contacts(
        &self,
        user: &UserId,
        contacts: &[UserId],
    ) -> Result<u64, PresenceError>;
    /// Whether `from` may message `user` directly (is one of its contacts).
    async fn is_contact(&self, user: &UserId, from: &UserId) -> Result<bool, PresenceError>;
    /// Revokes `user`'s tokens issued before `before_ms` (unix ms) for
    /// `ttl_ms`, which should cover the longest token lifetime (ADR 0039).
    /// A later revocation replaces an earlier one.
    async fn revoke(&self, user: &UserId, before_ms: i64, ttl_ms: u64)
    -> Result<(), PresenceError>;
    /// The live revocation of `user`: tokens issued before this unix ms
    /// (or without `iat`) are refused.
    async fn revoked_before(&self, user: &UserId) -> Result<Option<i64>, PresenceError>;
}

/// Membership in this process's memory (standalone). Bounded by what the
/// backend adds through the API (its request size limits the rate).
#[derive(Default)]
pub struct MemoryMembers {
    chats: DashMap<ChatId, HashSet<UserId>>,
    by_user: DashMap<UserId, BTreeSet<ChatId>>,
    contacts: DashMap<UserId, HashSet<UserId>>,
    /// user → (revoked before, unix ms; until, unix ms).
    revoked: DashMap<UserId, (i64, i64)>,
}

impl MemoryMembers {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl MemberStore for MemoryMembers {
    async fn is_member(&self, chat: &ChatId, user: &UserId) -> Result<bool, PresenceError> {
        Ok(self.chats.get(chat).is_some_and(|m| m.contains(user)))
    }

    async fn add(&self, chat: &ChatId, users: &[UserId]) -> Result<u64, PresenceError> {
        let mut added = 0;
        let mut members = self.chats.entry(chat.clone()).or_default();
        for u in users {
            if members.insert(u.clone()) {
                added += 1;
                self.by_user
                    .entry(u.clone())
                    .or_default()
                    .insert(chat.clone());
            }
        }
        Ok(added)
    }

    async fn remove(&self, chat: &ChatId, users: &[UserId]) -> Result<u64, PresenceError> {
        let mut removed = 0;
        if let Some(mut members) = self.chats.get_mut(chat) {
            for u in users {
                if members.remove(u) {
                    removed += 1;
                    if let Some(mut chats) = self.by_user.get_mut(u) {
                        chats.remove(chat);
                    }
                    self.by_user.remove_if(u, |_, c| c.is_empty());
                }
            }
        }
        self.chats.remove_if(chat, |_, m| m.is_empty());
        Ok(removed)
    }

    async fn count(&self, chat: &ChatId) -> Result<u64, PresenceError> {
        Ok(self.chats.get(chat).map_or(0, |m| m.len() as u64))
    }

    async fn chats_of(
        &self,
        user: &UserId,
        after: Option<&ChatId>,
        limit: usize,
    ) -> Result<Vec<ChatId>, PresenceError> {
        let Some(chats) = self.by_user.get(user) else {
            return Ok(Vec::new());
        };
        let page = match after {
            Some(a) => chats
                .range::<ChatId, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))
                .take(limit)
                .cloned()
                .collect(),
            None => chats.iter().take(limit).cloned().collect(),
        };
        Ok(page)
    }

    async fn add_contacts(&self, user: &UserId, contacts: &[UserId]) -> Result<u64, PresenceError> {
        let mut set = self.contacts.entry(user.clone()).or_default();
        Ok(contacts.iter().filter(|c| set.insert((*c).clone())).count() as u64)
    }

    async fn remove_contacts(
        &self,
        user: &UserId,
        contacts: &[UserId],
    ) -> Result<u64, PresenceError> {
        let removed = match self.contacts.get_mut(user) {
            Some(mut set) => contacts.iter().filter(|c| set.remove(*c)).count() as u64,
            None => 0,
        };
        self.contacts.remove_if(user, |_, s| s.is_empty());
        Ok(removed)
    }

    async fn is_contact(&self, user: &UserId, from: &UserId) -> Result<bool, PresenceError> {
        Ok(self.contacts.get(user).is_some_and(|s| s.contains(from)))
    }

    async fn revoke(
        &self,
        user: &UserId,
        before_ms: i64,
        ttl_ms: u64,
    ) -> Result<(), PresenceError> {
        let now = switchboard_protocol::now_ms();
        // Expired marks go with each new one: the map holds live ones only,
        // bounded by the revocations of one token lifetime.
        self.revoked.retain(|_, (_, until)| *until > now);
        let until = now.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX));
        self.revoked.insert(user.clone(), (before_ms, until));
        Ok(())
    }

    async fn revoked_before(&self, user: &UserId) -> Result<Option<i64>, PresenceError> {
        let now = switchboard_protocol::now_ms();
        Ok(self.revoked.get(user).filter(|e| e.1 > now).map(|e| e.0))
    }
}

/// Membership in Redis (single, Cluster or Sentinel): every key of a chat
/// in the chat's slot, every key of a user in the user's.
#[derive(Clone)]
pub struct RedisMembers {
    conn: RedisConn,
    /// Recorded in Redis; read (or recorded) on first use when this
    /// process was not given a count.
    buckets: std::sync::Arc<tokio::sync::OnceCell<u32>>,
}

/// FNV-1a: a stable hash, so every process puts a member in the same bucket.
pub fn bucket_of(user: &str, buckets: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in user.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h % buckets
}

/// The set holding one bucket of a chat's members.
pub fn bucket_key(chat: &ChatId, bucket: u32) -> String {
    format!("sb:{{channel:{chat}}}:m:{bucket}")
}

fn count_key(chat: &ChatId) -> String {
    format!("sb:{{channel:{chat}}}:n")
}

fn chats_key(user: &UserId) -> String {
    format!("sb:{{user:{user}}}:chats")
}

fn contacts_key(user: &UserId) -> String {
    format!("sb:{{user:{user}}}:contacts")
}

/// `user`'s revocation mark: the unix ms before which its tokens were
/// issued, expiring with the mark (ADR 0039).
fn revoked_key(user: &UserId) -> String {
    format!("sb:{{user:{user}}}:revoked")
}

/// The bucket count disagrees with the one the data was written with.
#[derive(Debug, thiserror::Error)]
pub enum BucketsError {
    /// Redis failed.
    #[error(transparent)]
    Presence(#[from] PresenceError),
    /// Another count is recorded in Redis.
    #[error(
        "member buckets: {asked} asked, but the data in Redis was written with {recorded} \
         (sb:members:buckets); the count is fixed for the life of the data"
    )]
    Mismatch {
        /// The count this process was given.
        asked: u32,
        /// The count in Redis.
        recorded: u32,
    },
}

/// Records `buckets` unless a count is recorded; returns the recorded one.
async fn record(conn: &RedisConn, buckets: u32) -> Result<u32, PresenceError> {
    let mut c = conn.clone();
    let _: () = redis::cmd("SET")
        .arg(BUCKETS_KEY)
        .arg(buckets)
        .arg("NX")
        .query_async(&mut c)
        .await?;
    let recorded: u32 = redis::cmd("GET")
        .arg(BUCKETS_KEY)
        .query_async(&mut c)
        .await?;
    Ok(recorded.max(1))
}

impl RedisMembers {
    /// Opens the store. Given a count (a router's `--channel-buckets`),
    /// records it if none is and refuses one that disagrees with the
    /// recorded count: members would be looked up in the wrong sets. Given
    /// none (an edge), uses the recorded count, recording
    /// [`DEFAULT_BUCKETS`] only if it is first to write.
    pub async fn open(conn: RedisConn, buckets: Option<u32>) -> Result<Self, BucketsError> {
        let cell = tokio::sync::OnceCell::new();
        match buckets {
            Some(asked) => {
                let asked = asked.max(1);
                let recorded = record(&conn, asked).await?;
                if recorded != asked {
                    return Err(BucketsError::Mismatch { asked, recorded });
                }
                let _ = cell.set(recorded);
            }
            None => {
                let recorded: Option<u32> = redis::cmd("GET")
                    .arg(BUCKETS_KEY)
                    .query_async(&mut conn.clone())
                    .await
                    .map_err(PresenceError::from)?;
                if let Some(n) = recorded {
                    let _ = cell.set(n.max(1));
                }
            }
        }
        Ok(RedisMembers {
            conn,
            buckets: std::sync::Arc::new(cell),
        })
    }

    /// Member buckets per chat, as far as known ([`DEFAULT_BUCKETS`]
    /// before the first use of a store opened without a count).
    pub fn buckets(&self) -> u32 {
        self.buckets.get().copied().unwrap_or(DEFAULT_BUCKETS)
    }

    async fn bucket_count(&self) -> Result<u32, PresenceError> {
        self.buckets
            .get_or_try_init(|| async { record(&self.conn, DEFAULT_BUCKETS).await })
            .await
            .copied()
    }

    /// `SADD` or `SREM` on the user's contact set, in chunks.
    async fn change_contacts(
        &self,
        user: &UserId,
        contacts: &[UserId],
        op: &str,
    ) -> Result<u64, PresenceError> {
        let mut n = 0;
        for chunk in contacts.chunks(CHUNK) {
            let names: Vec<&str> = chunk.iter().map(|c| c.as_str()).collect();
            let changed: u64 = redis::cmd(op)
                .arg(contacts_key(user))
                .arg(names)
                .query_async(&mut self.conn.clone())
                .await?;
            n += changed;
        }
        Ok(n)
    }

    async fn change(
        &self,
        chat: &ChatId,
        users: &[UserId],
        add: bool,
    ) -> Result<u64, PresenceError> {
        let buckets = self.bucket_count().await?;
        let mut conn = self.conn.clone();
        let (op, index) = if add {
            ("SADD", "ZADD")
        } else {
            ("SREM", "ZREM")
        };
        let mut changed = 0u64;
        for chunk in users.chunks(CHUNK) {
            let mut by_bucket: HashMap<u32, Vec<&str>> = HashMap::new();
            for u in chunk {
                by_bucket
                    .entry(bucket_of(u.as_str(), buckets))
                    .or_default()
                    .push(u.as_str());
            }
            let mut pipe = redis::pipe();
            for (b, members) in &by_bucket {
                pipe.cmd(op).arg(bucket_key(chat, *b)).arg(members);
            }
            let counts: Vec<u64> = pipe.query_async(&mut conn).await?;
            let n: u64 = counts.iter().sum();
            changed += n;
            let delta = if add { n as i64 } else { -(n as i64) };
            // The user index after the chat's sets: authorization reads the
            // sets, so a crash between the two leaves the index behind, and
            // the next change of the same members repairs it.
            let _: () = redis::cmd("INCRBY")
                .arg(count_key(chat))
                .arg(delta)
                .query_async(&mut conn)
                .await?;
            // One user's key per command: in a cluster a pipeline of them
            // goes out command by command, so it is kept short.
            for users in chunk.chunks(INDEX_CHUNK) {
                let mut pipe = redis::pipe();
                for u in users {
                    let cmd = pipe.cmd(index).arg(chats_key(u));
                    if add {
                        cmd.arg(0);
                    }
                    cmd.arg(chat.as_str()).ignore();
                }
                let _: () = pipe.query_async(&mut conn).await?;
            }
        }
        Ok(changed)
    }
}

#[async_trait]
impl MemberStore for RedisMembers {
    async fn is_member(&self, chat: &ChatId, user: &UserId) -> Result<bool, PresenceError> {
        let key = bucket_key(chat, bucket_of(user.as_str(), self.bucket_count().await?));
        Ok(redis::cmd("SISMEMBER")
            .arg(key)
            .arg(user.as_str())
            .query_async(&mut self.conn.clone())
            .await?)
    }

    async fn add(&self, chat: &ChatId, users: &[UserId]) -> Result<u64, PresenceError> {
        self.change(chat, users, true).await
    }

    async fn remove(&self, chat: &ChatId, users: &[UserId]) -> Result<u64, PresenceError> {
        self.change(chat, users, false).await
    }

    async fn count(&self, chat: &ChatId) -> Result<u64, PresenceError> {
        let n: Option<i64> = redis::cmd("GET")
            .arg(count_key(chat))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    async fn chats_of(
        &self,
        user: &UserId,
        after: Option<&ChatId>,
        limit: usize,
    ) -> Result<Vec<ChatId>, PresenceError> {
        let min = match after {
            Some(a) => format!("({a}"),
            None => "-".to_string(),
        };
        let raw: Vec<String> = redis::cmd("ZRANGE")
            .arg(chats_key(user))
            .arg(min)
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(raw.iter().filter_map(|c| ChatId::parse(c).ok()).collect())
    }

    async fn add_contacts(&self, user: &UserId, contacts: &[UserId]) -> Result<u64, PresenceError> {
        self.change_contacts(user, contacts, "SADD").await
    }

    async fn remove_contacts(
        &self,
        user: &UserId,
        contacts: &[UserId],
    ) -> Result<u64, PresenceError> {
        self.change_contacts(user, contacts, "SREM").await
    }

    async fn is_contact(&self, user: &UserId, from: &UserId) -> Result<bool, PresenceError> {
        Ok(redis::cmd("SISMEMBER")
            .arg(contacts_key(user))
            .arg(from.as_str())
            .query_async(&mut self.conn.clone())
            .await?)
    }

    async fn revoke(
        &self,
        user: &UserId,
        before_ms: i64,
        ttl_ms: u64,
    ) -> Result<(), PresenceError> {
        let () = redis::cmd("SET")
            .arg(revoked_key(user))
            .arg(before_ms)
            .arg("PX")
            .arg(ttl_ms.max(1))
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }

    async fn revoked_before(&self, user: &UserId) -> Result<Option<i64>, PresenceError> {
        Ok(redis::cmd("GET")
            .arg(revoked_key(user))
            .query_async(&mut self.conn.clone())
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket_of("alice", 64), bucket_of("alice", 64));
        let seen: HashSet<u32> = (0..10_000)
            .map(|i| bucket_of(&format!("user-{i}"), 64))
            .collect();
        assert_eq!(seen.len(), 64);
    }

    #[tokio::test]
    async fn a_memory_revocation_lasts_its_ttl_and_the_latest_wins() {
        let store = MemoryMembers::new();
        let (mallory, bob) = (
            UserId::parse("mallory").unwrap(),
            UserId::parse("bob").unwrap(),
        );
        assert_eq!(store.revoked_before(&mallory).await.unwrap(), None);
        store.revoke(&mallory, 1_000, 60_000).await.unwrap();
        store.revoke(&mallory, 2_000, 60_000).await.unwrap();
        assert_eq!(store.revoked_before(&mallory).await.unwrap(), Some(2_000));
        assert_eq!(store.revoked_before(&bob).await.unwrap(), None);
        // Expired: gone for the reader, and swept by the next revocation.
        store.revoke(&bob, 3_000, 1).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        assert_eq!(store.revoked_before(&bob).await.unwrap(), None);
        store.revoke(&mallory, 4_000, 60_000).await.unwrap();
        assert_eq!(store.revoked.len(), 1);
    }
}
