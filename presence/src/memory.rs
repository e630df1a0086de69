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
    /// node → (lease expiry unix ms, address)
    nodes: DashMap<String, (i64, String)>,
    ttl_ms: i64,
    max_offline_users: usize,
}

#[derive(Default)]
struct Entry {
    sessions: Devices,
    last_seen_ms: i64,
}

/// A user's sessions, session id -> node. Most users have one socket, and
/// a map allocates room for several (224 bytes for one session), so one
/// session is kept inline and a map made for the second (boxed: the entry
/// stays the size of one session).
#[derive(Default)]
enum Devices {
    #[default]
    None,
    One(String, String),
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<String, String>>),
}

impl Devices {
    fn is_empty(&self) -> bool {
        match self {
            Devices::None => true,
            Devices::One(..) => false,
            Devices::Many(m) => m.is_empty(),
        }
    }

    fn insert(&mut self, id: String, node: String) {
        match self {
            Devices::None => *self = Devices::One(id, node),
            Devices::One(one, at) if *one == id => *at = node,
            Devices::One(..) => {
                let Devices::One(one, at) = std::mem::take(self) else {
                    unreachable!("matched One above")
                };
                *self = Devices::Many(Box::new(HashMap::from([(one, at), (id, node)])));
            }
            Devices::Many(m) => {
                m.insert(id, node);
            }
        }
    }

    /// Whether the session was there.
    fn remove(&mut self, id: &str) -> bool {
        let removed = match self {
            Devices::One(one, _) => *one == id,
            Devices::Many(m) => m.remove(id).is_some(),
            Devices::None => false,
        };
        if removed && (matches!(self, Devices::One(..)) || self.is_empty()) {
            *self = Devices::None;
        }
        removed
    }

    /// The node of one session.
    fn get(&self, id: &str) -> Option<&String> {
        match self {
            Devices::One(one, node) if one == id => Some(node),
            Devices::Many(m) => m.get(id),
            _ => None,
        }
    }

    /// Keeps the sessions whose node passes `keep`.
    fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        match self {
            Devices::One(_, node) if !keep(node) => *self = Devices::None,
            Devices::Many(m) => {
                m.retain(|_, node| keep(node));
                if m.is_empty() {
                    *self = Devices::None;
                }
            }
            _ => {}
        }
    }

    /// The node of each session.
    fn nodes(&self) -> impl Iterator<Item = &String> {
        let (one, many) = match self {
            Devices::None => (None, None),
            Devices::One(_, node) => (Some(node), None),
            Devices::Many(m) => (None, Some(m.values())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

impl MemoryPresence {
    /// Node leases last `ttl_ms` after their last heartbeat.
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

    fn live(&self, node: &str, now_ms: i64) -> bool {
        self.nodes.get(node).is_some_and(|n| n.0 > now_ms)
    }

    /// Removes the sessions of nodes matching `dead`.
    fn sweep(&self, dead: impl Fn(&str) -> bool, now_ms: i64) -> Vec<(UserId, i64)> {
        let mut gone = Vec::new();
        for mut e in self.users.iter_mut() {
            let had = !e.sessions.is_empty();
            e.sessions.retain(|node| !dead(node));
            if had && e.sessions.is_empty() {
                e.last_seen_ms = now_ms;
                gone.push((e.key().clone(), now_ms));
            }
        }
        gone
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
    async fn register(&self, s: &Session, _now_ms: i64) -> Result<Transition, PresenceError> {
        let mut e = self.users.entry(s.user.clone()).or_default();
        let was_online = !e.sessions.is_empty();
        e.sessions.insert(s.session_id.clone(), s.node.clone());
        Ok(if was_online {
            Transition::Unchanged
        } else {
            Transition::BecameOnline
        })
    }

    async fn registered(&self, sessions: &[Session]) -> Result<Vec<bool>, PresenceError> {
        Ok(sessions
            .iter()
            .map(|s| {
                self.users
                    .get(&s.user)
                    .and_then(|e| e.sessions.get(&s.session_id).map(|n| *n == s.node))
                    .unwrap_or(false)
            })
            .collect())
    }

    async fn unregister(&self, s: &Session, now_ms: i64) -> Result<Transition, PresenceError> {
        let transition = {
            let Some(mut e) = self.users.get_mut(&s.user) else {
                return Ok(Transition::Unchanged);
            };
            let removed = e.sessions.remove(&s.session_id);
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

    async fn restore(
        &self,
        sessions: &[Session],
        now_ms: i64,
    ) -> Result<Vec<UserId>, PresenceError> {
        let mut back = Vec::new();
        for s in sessions {
            if self.register(s, now_ms).await? == Transition::BecameOnline {
                back.push(s.user.clone());
            }
        }
        Ok(back)
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
                            e.sessions.nodes().filter(|n| self.live(n, now_ms)).count(),
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

    async fn nodes_of(&self, user: &UserId) -> Result<Vec<String>, PresenceError> {
        let mut nodes: Vec<String> = self
            .users
            .get(user)
            .map(|e| e.sessions.nodes().cloned().collect())
            .unwrap_or_default();
        nodes.sort();
        nodes.dedup();
        Ok(nodes)
    }

    async fn expire(&self, now_ms: i64) -> Result<Vec<(UserId, i64)>, PresenceError> {
        let dead: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.0 <= now_ms)
            .map(|n| n.key().clone())
            .collect();
        if dead.is_empty() {
            return Ok(Vec::new());
        }
        let gone = self.sweep(|n| dead.iter().any(|d| d == n), now_ms);
        for d in dead {
            self.nodes.remove_if(&d, |_, n| n.0 <= now_ms);
        }
        Ok(gone)
    }

    async fn drop_node(
        &self,
        node: &str,
        now_ms: i64,
    ) -> Result<Vec<(UserId, i64)>, PresenceError> {
        Ok(self.sweep(|n| n == node, now_ms))
    }

    async fn node_heartbeat(
        &self,
        node: &str,
        addr: &str,
        now_ms: i64,
    ) -> Result<bool, PresenceError> {
        let old = self
            .nodes
            .insert(node.to_owned(), (now_ms + self.ttl_ms, addr.to_owned()));
        Ok(old.is_none_or(|(exp, _)| exp <= now_ms))
    }

    async fn nodes(&self, now_ms: i64) -> Result<Vec<(String, String)>, PresenceError> {
        Ok(self
            .nodes
            .iter()
            .filter(|e| e.value().0 > now_ms)
            .map(|e| (e.key().clone(), e.value().1.clone()))
            .collect())
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

    #[test]
    fn devices_keep_one_session_inline_and_more_in_a_map() {
        let mut d = Devices::default();
        assert!(d.is_empty());
        d.insert("s1".into(), "n1".into());
        d.insert("s1".into(), "n2".into());
        assert!(matches!(&d, Devices::One(id, node) if id == "s1" && node == "n2"));
        assert!(!d.remove("s2"));
        d.insert("s2".into(), "n1".into());
        let mut nodes: Vec<&String> = d.nodes().collect();
        nodes.sort();
        assert_eq!(nodes, ["n1", "n2"]);
        d.retain(|node| node != "n1");
        assert_eq!(d.nodes().collect::<Vec<_>>(), ["n2"]);
        assert!(d.remove("s1"));
        assert!(
            matches!(d, Devices::None),
            "the map goes with its last session"
        );
        d.insert("s3".into(), "n1".into());
        d.retain(|node| node != "n1");
        assert!(d.is_empty());
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
    async fn sessions_expire_with_their_node() {
        let p = MemoryPresence::new(1_000, 10);
        p.node_heartbeat("n1", "", 0).await.unwrap();
        p.node_heartbeat("n2", "", 0).await.unwrap();
        p.register(&session("a", "s1"), 0).await.unwrap();
        p.register(
            &Session {
                node: "n2".into(),
                ..session("b", "s2")
            },
            0,
        )
        .await
        .unwrap();
        assert!(!p.node_heartbeat("n2", "", 900).await.unwrap());
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
