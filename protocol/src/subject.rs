//! The NATS subjects of a Switchboard cluster, built and parsed in one
//! place: routers publish on them, edges subscribe to them, and the edge's
//! bus handler maps each incoming subject back to what it carries.
//!
//! - `sb.chat.<chat>`: a chat's deliveries and ephemeral events.
//! - `sb.edge.<edge>.user.<user>`: a user's personal stream on one edge.
//! - `sb.edge.<edge>.admin`: admin requests to one edge (ADR 0037).
//! - `sb.presence.<user>`: a user's online/offline events.
//! - `sb.router.publish`: publish requests to the routers (queue group
//!   [`ROUTER_QUEUE`]).
//! - `sb.shard.jobs`: shard jobs (JetStream stream `SB_SHARD`, pulled by
//!   the routers).
//! - `sb.push.<user>`: push jobs (JetStream stream `SB_PUSH`).
//! - `sb.events.msg.chat.<chat>`, `sb.events.msg.user.<user>`,
//!   `sb.events.conn.<user>`, `sb.events.presence.<user>`: the event tap
//!   (JetStream stream `SB_EVENTS`, ADR 0032).
//! - `sb.members`: members removed from chats, to every edge (ADR 0031).
//!
//! Every id on a subject is a [`ChatId`] or [`UserId`], which cannot hold
//! `.`, `*` or `>`: one id is always exactly one subject token.
use crate::{ChatId, StreamKey, UserId};

/// Publish requests to the routers.
pub const ROUTER_PUBLISH: &str = "sb.router.publish";
/// Shard jobs (member work of one channel post): the subject of the
/// JetStream stream `SB_SHARD`, which the routers pull from.
pub const SHARD_JOBS: &str = "sb.shard.jobs";
/// The routers' queue group: each request goes to one replica.
pub const ROUTER_QUEUE: &str = "sb-routers";
/// Every push job (the subjects of the JetStream stream `SB_PUSH`).
pub const PUSH_ALL: &str = "sb.push.>";

/// Every event of the tap: the subjects of its JetStream stream.
pub const EVENTS_ALL: &str = "sb.events.>";
/// Every message event of the tap (a consumer's filter).
pub const EVENT_MESSAGES: &str = "sb.events.msg.>";
/// Every connection event of the tap.
pub const EVENT_CONNECTIONS: &str = "sb.events.conn.*";
/// Every presence event of the tap.
pub const EVENT_PRESENCE: &str = "sb.events.presence.*";

/// Tap subject of a stream's sequenced messages: one subject per stream,
/// so the stream's last event is one lookup and its order one chain.
pub fn event_message_subject(stream: &StreamKey) -> String {
    match stream {
        StreamKey::Chat(c) => format!("sb.events.msg.chat.{c}"),
        StreamKey::User(u) => format!("sb.events.msg.user.{u}"),
    }
}

/// Tap subject of a user's sockets connecting and closing.
pub fn event_connection_subject(user: &UserId) -> String {
    format!("sb.events.conn.{user}")
}

/// Tap subject of a user's online/offline transitions.
pub fn event_presence_subject(user: &UserId) -> String {
    format!("sb.events.presence.{user}")
}
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

/// Admin requests to one edge (its status, a drain), from the admin API
/// of any node (ADR 0037): request-reply, JSON both ways. Not matched by
/// [`edge_users_wildcard`].
pub fn edge_admin_subject(node: &str) -> String {
    format!("sb.edge.{node}.admin")
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
            event_message_subject(&StreamKey::Chat(chat.clone())),
            "sb.events.msg.chat.c1"
        );
        assert_eq!(
            event_message_subject(&StreamKey::User(bob.clone())),
            "sb.events.msg.user.bob"
        );
        assert_eq!(event_connection_subject(&bob), "sb.events.conn.bob");
        assert_eq!(event_presence_subject(&bob), "sb.events.presence.bob");
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
            "sb.events.msg.chat.c1",
            "other",
        ] {
            assert_eq!(Subject::parse(s), None, "{s}");
        }
    }
}
