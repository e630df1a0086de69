//! Streams (a chat, or one user's personal stream) and frames encoded once
//! for every receiver.
use std::{fmt, sync::Arc, sync::OnceLock};

use bytes::Bytes;

use crate::{
    ChatId, Encoding, UserId,
    v1::{ServerFrame, server_frame},
};

/// A sequenced stream: each has its own seq counter and history.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StreamKey {
    /// Messages of a chat or channel.
    Chat(ChatId),
    /// Everything addressed to one user, on all their devices.
    User(UserId),
}

impl StreamKey {
    /// The NATS subject a chat's deliveries travel on; `None` for a
    /// personal stream, which goes to each edge holding one of the user's
    /// sockets instead ([`crate::subject::edge_user_subject`]).
    pub fn subject(&self) -> Option<String> {
        match self {
            StreamKey::Chat(c) => Some(crate::subject::chat_subject(c)),
            StreamKey::User(_) => None,
        }
    }
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamKey::Chat(c) => write!(f, "chat:{c}"),
            StreamKey::User(u) => write!(f, "user:{u}"),
        }
    }
}

/// A server frame shared by every socket it goes to: each encoding is
/// produced at most once, on first use, and then shared as `Bytes`.
#[derive(Clone)]
pub struct SharedFrame(Arc<Inner>);

struct Inner {
    frame: ServerFrame,
    protobuf: OnceLock<Bytes>,
    json: OnceLock<Bytes>,
    /// A delivery's stream and seq, parsed once: every socket's writer asks.
    position: OnceLock<Option<(StreamKey, u64)>>,
}

impl SharedFrame {
    /// Wraps a frame; nothing is encoded yet.
    pub fn new(frame: ServerFrame) -> Self {
        SharedFrame(Arc::new(Inner {
            frame,
            protobuf: OnceLock::new(),
            json: OnceLock::new(),
            position: OnceLock::new(),
        }))
    }

    /// Wraps a frame whose protobuf encoding is already at hand (from the
    /// bus), so binary sockets reuse those very bytes.
    pub fn with_protobuf(frame: ServerFrame, protobuf: Bytes) -> Self {
        SharedFrame(Arc::new(Inner {
            frame,
            protobuf: OnceLock::from(protobuf),
            json: OnceLock::new(),
            position: OnceLock::new(),
        }))
    }

    /// The frame.
    pub fn frame(&self) -> &ServerFrame {
        &self.0.frame
    }

    /// The frame's bytes in `encoding`, encoded on first use.
    pub fn encoded(&self, encoding: Encoding) -> &Bytes {
        let cell = match encoding {
            Encoding::Protobuf => &self.0.protobuf,
            Encoding::Json => &self.0.json,
        };
        cell.get_or_init(|| encoding.encode_server(&self.0.frame))
    }

    /// The epoch of a delivery frame (`None` for any other frame).
    pub fn delivery_epoch(&self) -> Option<&str> {
        match &self.0.frame.kind {
            Some(server_frame::Kind::Delivery(d)) => Some(&d.epoch),
            _ => None,
        }
    }

    /// For a delivery: its stream key and seq.
    pub fn delivery_position(&self) -> Option<(StreamKey, u64)> {
        // Parsed on first use and shared: a clone is a reference count.
        self.0
            .position
            .get_or_init(|| {
                let Some(server_frame::Kind::Delivery(d)) = &self.0.frame.kind else {
                    return None;
                };
                let key = if !d.chat.is_empty() {
                    StreamKey::Chat(ChatId::parse(&d.chat).ok()?)
                } else {
                    StreamKey::User(UserId::parse(&d.user).ok()?)
                };
                Some((key, d.seq))
            })
            .clone()
    }
}

impl fmt::Debug for SharedFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedFrame").field(&self.0.frame).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::Delivery;

    #[test]
    fn encodes_once_and_shares_bytes() {
        let frame = SharedFrame::new(ServerFrame {
            id: 0,
            kind: Some(server_frame::Kind::Delivery(Delivery {
                chat: "c1".into(),
                seq: 3,
                ..Default::default()
            })),
        });
        let a = frame.encoded(Encoding::Json).clone();
        let b = frame.clone().encoded(Encoding::Json).clone();
        assert_eq!(
            a.as_ptr(),
            b.as_ptr(),
            "second use must share the first encoding"
        );
        assert_eq!(
            frame.delivery_position(),
            Some((StreamKey::Chat(ChatId::parse("c1").unwrap()), 3))
        );
        assert_eq!(
            StreamKey::Chat(ChatId::parse("c1").unwrap()).subject(),
            Some("sb.chat.c1".into())
        );
    }
}
