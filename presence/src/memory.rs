//! In-process presence for standalone mode.
use std::collections::HashMap;

use async_trait::async_trait;
use dashmap::DashMap;
use switchboard_protocol::UserId;

use crate::store::{PresenceError, PresenceStore, Session, Transition, UserStatus};

/// Presence kept in this process's memory.
///
/// Bounded: online entries by the number of live sessions (each socket has
/// one); offline users keep only their last-seen time, for at most
/// `max_offline_users` users (the oldest are forgotten first).
pub struct MemoryPresence {
    users: DashMap<UserId, Entry>,
    nodes: DashMap<String, (i64, String)>,
    ttl_ms: i64,
    max_offline_users: usize,
}

#[derive(Default)]
struct Entry {
    /// session id -> expiry (unix ms)
    sessions: HashMap<String, i64>,
    last_seen_ms: i64,
}

impl MemoryPresence {
    /// Sessions expire `ttl_ms` after their last heartbeat.
    pub fn new(ttl_ms: i64, max_offline_users: usize) -> Self {
        MemoryPresence {
            users: DashMap::new(),
            nodes: DashMap::new(),
            ttl_ms,
            max_offline_users,
        }
    }

    /// Users currently tracked (online or remembered offline).
    pub fn tracked_users(&self) -> usize {
        self.users.len()
    }

    fn trim_offline(&self) {
        let offline: Vec<(UserId, i64)> = self
            .users
            .iter()
            .filter(|e| e.sessions.is_empty())
            .map(|e| (e.key().clone(), e.last_seen_ms))
            .collect();
        if offline.len() <= self.max_offline_users {
            return;
        }
        let mut offline = offline;
        offline.sort_by_key(|(_, seen)| *seen);
        let excess = offline.len() - self.max_offline_users;
        for (user, _) in offline.into_iter().take(excess) {
            self.users.remove_if(&user, |_, e| e.sessions.is_empty());
        }
    }
}

#[async_trait]
impl PresenceStore for MemoryPresence {
    async fn register(&self, s: &Session, now_ms: i64) -> Result<Transition, PresenceError> {
        let mut e = self.users.entry(s.user.clone()).or_default();
        e.sessions.retain(|_, exp| *exp > now_ms);
        let was_online = !e.sessions.is_empty();
        e.sessions
            .insert(s.session_id.clone(), now_ms + self.ttl_ms);
        Ok(if was_online {
            Transition::Unchanged
        } else {
            Transition::BecameOnline
        })
    }

    async fn unregister(&self, s: &Session, now_ms: i64) -> Result<Transition, PresenceError> {
        let transition = {
            let Some(mut e) = self.users.get_mut(&s.user) else {
                return Ok(Transition::Unchanged);
            };
            let removed = e.sessions.remove(&s.session_id).is_some();
            e.sessions.retain(|_, exp| *exp > now_ms);
            if removed && e.sessions.is_empty() {
                e.last_seen_ms = now_ms;
                Transition::BecameOffline {
                    last_seen_ms: now_ms,
                }
            } else {
                Transition::Unchanged
            }
        };
        if matches!(transition, Transition::BecameOffline { .. })
            && self.users.len() > self.max_offline_users
        {
            self.trim_offline();
        }
        Ok(transition)
    }

    async fn heartbeat(&self, sessions: &[Session], now_ms: i64) -> Result<(), PresenceError> {
        for s in sessions {
            if let Some(mut e) = self.users.get_mut(&s.user)
                && let Some(exp) = e.sessions.get_mut(&s.session_id)
            {
                *exp = now_ms + self.ttl_ms;
            }
        }
        Ok(())
    }

    async fn status(
        &self,
        users: &[UserId],
        now_ms: i64,
    ) -> Result<Vec<UserStatus>, PresenceError> {
        Ok(users
            .iter()
            .map(|u| {
                let (devices, last_seen_ms) = self
                    .users
                    .get(u)
                    .map(|e| {
                        (
                            e.sessions.values().filter(|exp| **exp > now_ms).count(),
                            e.last_seen_ms,
                        )
                    })
                    .unwrap_or((0, 0));
                UserStatus {
                    user: u.clone(),
                    online: devices > 0,
                    devices: devices as u32,
                    last_seen_ms,
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
        self.nodes
            .insert(node.to_owned(), (now_ms + self.ttl_ms, addr.to_owned()));
        Ok(())
    }

    async fn nodes(&self, now_ms: i64) -> Result<Vec<(String, String)>, PresenceError> {
        self.nodes.retain(|_, (exp, _)| *exp > now_ms);
        Ok(self
            .nodes
            .iter()
            .map(|e| (e.key().clone(), e.value().1.clone()))
            .collect())
    }

    async fn expire(&self, now_ms: i64) -> Result<Vec<(UserId, i64)>, PresenceError> {
        let mut gone = Vec::new();
        for mut e in self.users.iter_mut() {
            let had = !e.sessions.is_empty();
            e.sessions.retain(|_, exp| *exp > now_ms);
            if had && e.sessions.is_empty() {
                e.last_seen_ms = now_ms;
                gone.push((e.key().clone(), now_ms));
            }
        }
        Ok(gone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(user: &str, id: &str) -> Session {
        Session {
            user: UserId::parse(user).unwrap(),
            session_id: id.into(),
            node: "n1".into(),
        }
    }

    #[tokio::test]
    async fn transitions_only_on_first_and_last_device() {
        let p = MemoryPresence::new(30_000, 10);
        assert_eq!(
            p.register(&session("a", "s1"), 0).await.unwrap(),
            Transition::BecameOnline
        );
        assert_eq!(
            p.register(&session("a", "s2"), 1).await.unwrap(),
            Transition::Unchanged
        );
        assert_eq!(
            p.unregister(&session("a", "s1"), 2).await.unwrap(),
            Transition::Unchanged
        );
        assert_eq!(
            p.unregister(&session("a", "s2"), 3).await.unwrap(),
            Transition::BecameOffline { last_seen_ms: 3 }
        );
        // Unregistering twice reports nothing new.
        assert_eq!(
            p.unregister(&session("a", "s2"), 4).await.unwrap(),
            Transition::Unchanged
        );
        let st = p.status(&[UserId::parse("a").unwrap()], 5).await.unwrap();
        assert_eq!(
            (st[0].online, st[0].devices, st[0].last_seen_ms),
            (false, 0, 3)
        );
    }

    #[tokio::test]
    async fn sessions_expire_without_heartbeat() {
        let p = MemoryPresence::new(1_000, 10);
        p.register(&session("a", "s1"), 0).await.unwrap();
        p.register(&session("b", "s2"), 0).await.unwrap();
        p.heartbeat(&[session("b", "s2")], 900).await.unwrap();
        let gone = p.expire(1_500).await.unwrap();
        assert_eq!(gone, vec![(UserId::parse("a").unwrap(), 1_500)]);
        assert!(
            p.expire(1_600).await.unwrap().is_empty(),
            "offline fires once"
        );
    }

    #[tokio::test]
    async fn offline_users_are_bounded() {
        let p = MemoryPresence::new(1_000, 2);
        for i in 0..5 {
            let s = session(&format!("u{i}"), "s");
            p.register(&s, i).await.unwrap();
            p.unregister(&s, i).await.unwrap();
        }
        assert!(p.tracked_users() <= 3, "tracked {}", p.tracked_users());
    }
}
