//! The NATS subjects of a Switchboard cluster, built and parsed in one
//! place: routers publish on them, edges subscribe to them, and the edge's
//! bus handler maps each incoming subject back to what it carries.
//!
//! - `sb.chat.<chat>`: a chat's deliveries and ephemeral events.
//! - `sb.edge.<edge>.user.<user>`: a user's personal stream on one edge.
//! - `sb.presence.<user>`: a user's online/offline events.
//! - `sb.router.publish`: publish requests to the routers (queue group
//!   [`ROUTER_QUEUE`]).
//! - `sb.shard.jobs`: shard jobs (JetStream stream `SB_SHARD`, pulled by
//!   the routers).
//! - `sb.push.<user>`: push jobs (JetStream stream `SB_PUSH`).
//! - `sb.members`: members removed from chats, to every edge (ADR 0031).
//!
//! Every id on a subject is a [`ChatId`] or [`UserId`], which cannot hold
//! `.`, `*` or `>`: one id is always exactly one subject token.
use crate::{ChatId, UserId};

/// Publish requests to the routers.
pub const ROUTER_PUBLISH: &str = "sb.router.publish";
/// Shard jobs (member work of one channel post): the subject of the
/// JetStream stream `SB_SHARD`, which the routers pull from.
pub const SHARD_JOBS: &str = "sb.shard.jobs";
/// The routers' queue group: each request goes to one replica.
pub const ROUTER_QUEUE: &str = "sb-routers";
/// Every push job (the subjects of the JetStream stream `SB_PUSH`).
pub const PUSH_ALL: &str = "sb.push.>";

/// Members removed from chats ([`crate::v1::Unsubscribed`] frames naming
/// them): every edge subscribes, drops its cached allows and ends their
/// live subscriptions.
pub const MEMBERS: &str = "sb.members";

/// Subject of a chat's deliveries and ephemeral events.
pub fn chat_subject(chat: &ChatId) -> String {
    format!("sb.chat.{chat}")
}

/// Subject of `user`'s personal stream on one edge: routers look up the
/// user's edges in presence and publish one copy per edge, so an edge needs
/// one subscription ([`edge_users_wildcard`]) for all its users.
pub fn edge_user_subject(node: &str, user: &UserId) -> String {
    format!("sb.edge.{node}.user.{user}")
}

/// What an edge subscribes to for the personal streams of its users.
pub fn edge_users_wildcard(node: &str) -> String {
    format!("sb.edge.{node}.user.*")
}

/// Subject of a user's online/offline events.
pub fn presence_subject(user: &UserId) -> String {
    format!("sb.presence.{user}")
}

/// Subject of one user's push jobs.
pub fn push_subject(user: &UserId) -> String {
    format!("sb.push.{user}")
}

/// What a subject an edge receives on carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject<'a> {
    /// `sb.chat.<chat>`.
    Chat(ChatId),
    /// `sb.edge.<edge>.user.<user>`.
    EdgeUser {
        /// The edge the copy is for.
        edge: &'a str,
        /// Whose personal stream.
        user: UserId,
    },
    /// `sb.presence.<user>`.
    Presence(UserId),
    /// `sb.members`.
    Members,
}

impl<'a> Subject<'a> {
    /// Parses a delivery subject; `None` for anything else, or an id that
    /// is not valid.
    pub fn parse(subject: &'a str) -> Option<Subject<'a>> {
        if subject == MEMBERS {
            return Some(Subject::Members);
        }
        if let Some(chat) = subject.strip_prefix("sb.chat.") {
            return ChatId::parse(chat).ok().map(Subject::Chat);
        }
        if let Some(user) = subject.strip_prefix("sb.presence.") {
            return UserId::parse(user).ok().map(Subject::Presence);
        }
        let (edge, user) = subject.strip_prefix("sb.edge.")?.split_once(".user.")?;
        if edge.is_empty() || edge.contains('.') {
            return None;
        }
        let user = UserId::parse(user).ok()?;
        Some(Subject::EdgeUser { edge, user })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_subjects_parse_back() {
        let (chat, bob) = (ChatId::parse("c1").unwrap(), UserId::parse("bob").unwrap());
        assert_eq!(chat_subject(&chat), "sb.chat.c1");
        assert_eq!(edge_user_subject("e1", &bob), "sb.edge.e1.user.bob");
        assert_eq!(edge_users_wildcard("e1"), "sb.edge.e1.user.*");
        assert_eq!(presence_subject(&bob), "sb.presence.bob");
        assert_eq!(push_subject(&bob), "sb.push.bob");
        assert_eq!(
            Subject::parse(&chat_subject(&chat)),
            Some(Subject::Chat(chat))
        );
        assert_eq!(
            Subject::parse(&edge_user_subject("e1", &bob)),
            Some(Subject::EdgeUser {
                edge: "e1",
                user: bob.clone()
            })
        );
        assert_eq!(
            Subject::parse(&presence_subject(&bob)),
            Some(Subject::Presence(bob))
        );
        assert_eq!(Subject::parse(MEMBERS), Some(Subject::Members));
    }

    #[test]
    fn other_subjects_are_not_parsed() {
        for s in [
            "sb.chat.",
            "sb.chat.a.b",
            "sb.presence.",
            "sb.edge.e1.user.",
            "sb.edge..user.bob",
            "sb.edge.e1.x.user.bob",
            "sb.edge.e1.user.bob.x",
            "sb.router.publish",
            "sb.push.bob",
            "other",
        ] {
            assert_eq!(Subject::parse(s), None, "{s}");
        }
    }
}
