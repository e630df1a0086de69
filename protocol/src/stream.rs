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

/// A server frame shared by every socket it goes to: each encoding, and
/// each encoding compressed for permessage-deflate, is produced at most
/// once, on first use, and then shared as `Bytes`.
#[derive(Clone)]
pub struct SharedFrame(Arc<Inner>);

struct Inner {
    frame: ServerFrame,
    protobuf: OnceLock<Bytes>,
    json: OnceLock<Bytes>,
    /// Each encoding compressed ([`crate::deflate`]); `None` inside when
    /// compressing did not make it smaller.
    deflated_protobuf: OnceLock<Option<Bytes>>,
    deflated_json: OnceLock<Option<Bytes>>,
    /// A delivery's stream, seq and epoch hash, parsed once: every
    /// socket's order filter asks.
    position: OnceLock<Option<(StreamKey, u64, u64)>>,
}

/// A frame's bytes for a socket that negotiated permessage-deflate.
#[derive(Debug, Clone, Copy)]
pub struct Deflated<'a> {
    /// The frame's payload as written.
    pub bytes: &'a Bytes,
    /// Whether `bytes` is compressed (the frame goes with RSV1 set).
    pub compressed: bool,
    /// Whether this call ran the compressor: true once per frame and
    /// encoding, for the first socket that needed it.
    pub compressed_now: bool,
}

impl SharedFrame {
    /// Wraps a frame; nothing is encoded yet.
    pub fn new(frame: ServerFrame) -> Self {
        SharedFrame(Arc::new(Inner {
            frame,
            protobuf: OnceLock::new(),
            json: OnceLock::new(),
            deflated_protobuf: OnceLock::new(),
            deflated_json: OnceLock::new(),
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
            deflated_protobuf: OnceLock::new(),
            deflated_json: OnceLock::new(),
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

    /// The frame's bytes in `encoding` for a compressing socket: below
    /// `min_bytes` (or when compressing does not make them smaller) the
    /// plain encoding, else the compressed form, produced once on first
    /// use and then shared by every compressing socket. Without context
    /// takeover a message's compressed bytes do not depend on the socket.
    pub fn deflated(&self, encoding: Encoding, min_bytes: usize) -> Deflated<'_> {
        let plain = self.encoded(encoding);
        let mut compressed_now = false;
        if plain.len() >= min_bytes {
            let cell = match encoding {
                Encoding::Protobuf => &self.0.deflated_protobuf,
                Encoding::Json => &self.0.deflated_json,
            };
            let packed = cell.get_or_init(|| {
                compressed_now = true;
                let packed = crate::deflate::compress(plain);
                (packed.len() < plain.len()).then(|| Bytes::from(packed))
            });
            if let Some(bytes) = packed {
                return Deflated {
                    bytes,
                    compressed: true,
                    compressed_now,
                };
            }
        }
        Deflated {
            bytes: plain,
            compressed: false,
            compressed_now,
        }
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
        self.delivery_stream()
            .map(|(key, seq, _)| (key.clone(), seq))
    }

    /// For a delivery: its stream key, seq and [`epoch_hash`], borrowed
    /// (asked once per socket it goes to: no reference count touched).
    pub fn delivery_stream(&self) -> Option<(&StreamKey, u64, u64)> {
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
                Some((key, d.seq, epoch_hash(&d.epoch)))
            })
            .as_ref()
            .map(|(key, seq, epoch)| (key, *seq, *epoch))
    }
}

/// A stable hash of an epoch (FNV-1a): a socket keeps 8 bytes per
/// stream, not the string.
pub fn epoch_hash(epoch: &str) -> u64 {
    epoch.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
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

    #[test]
    fn compresses_once_above_the_threshold() {
        let frame = SharedFrame::new(ServerFrame {
            id: 0,
            kind: Some(server_frame::Kind::Delivery(Delivery {
                chat: "c1".into(),
                seq: 3,
                payload: "a chat message that says the same thing again and again and again"
                    .repeat(8)
                    .into(),
                ..Default::default()
            })),
        });
        let plain_len = frame.encoded(Encoding::Json).len();
        // Below the threshold: the plain bytes, nothing compressed.
        let small = frame.deflated(Encoding::Json, plain_len + 1);
        assert!(!small.compressed && !small.compressed_now);
        assert_eq!(small.bytes, frame.encoded(Encoding::Json));
        let first = frame.deflated(Encoding::Json, 16);
        assert!(first.compressed && first.compressed_now);
        assert!(first.bytes.len() < plain_len);
        let other = frame.clone();
        let again = other.deflated(Encoding::Json, 16);
        assert!(again.compressed && !again.compressed_now);
        assert_eq!(
            first.bytes.as_ptr(),
            again.bytes.as_ptr(),
            "shared, not redone"
        );
        assert_eq!(
            crate::deflate::inflate(again.bytes, 1 << 20).unwrap(),
            frame.encoded(Encoding::Json)[..]
        );
        // Each encoding has its own compressed form.
        assert!(frame.deflated(Encoding::Protobuf, 16).compressed_now);
    }

    #[test]
    fn incompressible_frames_stay_plain() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..600)
            .map(|_| {
                // xorshift64: bytes DEFLATE cannot shrink.
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let frame = SharedFrame::new(ServerFrame {
            id: 0,
            kind: Some(server_frame::Kind::Delivery(Delivery {
                payload: noise.into(),
                ..Default::default()
            })),
        });
        let d = frame.deflated(Encoding::Protobuf, 16);
        assert!(!d.compressed && d.compressed_now, "tried once");
        assert!(!frame.deflated(Encoding::Protobuf, 16).compressed_now);
        assert_eq!(d.bytes, frame.encoded(Encoding::Protobuf));
    }
}
