//! The two encodings of the protocol, negotiated by WebSocket subprotocol.
use bytes::Bytes;
use prost::Message;

use crate::v1::{ClientFrame, ServerFrame};

/// How frames travel on one socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Binary WebSocket frames, each one protobuf-encoded frame.
    Protobuf,
    /// Text WebSocket frames, each one frame in the canonical proto3 JSON mapping.
    Json,
}

/// A frame that could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not a valid protobuf frame.
    #[error("invalid protobuf frame: {0}")]
    Protobuf(#[from] prost::DecodeError),
    /// Not a valid JSON frame.
    #[error("invalid JSON frame: {0}")]
    Json(#[from] serde_json::Error),
    /// A text frame on a protobuf socket or a binary frame on a JSON socket.
    #[error("{0} frames are not accepted with this subprotocol")]
    WrongFrameType(&'static str),
}

impl Encoding {
    /// Subprotocol name of the binary encoding.
    pub const PROTOBUF_SUBPROTOCOL: &'static str = "switchboard.v1.proto";
    /// Subprotocol name of the JSON encoding.
    pub const JSON_SUBPROTOCOL: &'static str = "switchboard.v1.json";

    /// Picks the encoding from a `Sec-WebSocket-Protocol` request header
    /// (a comma-separated list in client preference order). `None` when the
    /// header names no Switchboard subprotocol.
    pub fn negotiate(header: &str) -> Option<Encoding> {
        header
            .split(',')
            .map(str::trim)
            .find_map(Encoding::from_subprotocol)
    }

    /// The encoding a subprotocol name stands for.
    pub fn from_subprotocol(name: &str) -> Option<Encoding> {
        match name {
            Self::PROTOBUF_SUBPROTOCOL => Some(Encoding::Protobuf),
            Self::JSON_SUBPROTOCOL => Some(Encoding::Json),
            _ => None,
        }
    }

    /// The subprotocol name to send back in the handshake.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Protobuf => Self::PROTOBUF_SUBPROTOCOL,
            Encoding::Json => Self::JSON_SUBPROTOCOL,
        }
    }

    /// Whether frames of this encoding go in text (not binary) WebSocket frames.
    pub fn is_text(self) -> bool {
        matches!(self, Encoding::Json)
    }

    /// Encodes a server frame.
    pub fn encode_server(self, frame: &ServerFrame) -> Bytes {
        encode(self, frame)
    }

    /// Encodes a client frame.
    pub fn encode_client(self, frame: &ClientFrame) -> Bytes {
        encode(self, frame)
    }

    /// Decodes a client frame. `text` says whether it came in a text frame.
    pub fn decode_client(self, data: &[u8], text: bool) -> Result<ClientFrame, DecodeError> {
        decode(self, data, text)
    }

    /// Decodes a server frame. `text` says whether it came in a text frame.
    pub fn decode_server(self, data: &[u8], text: bool) -> Result<ServerFrame, DecodeError> {
        decode(self, data, text)
    }
}

fn encode<M: Message + serde::Serialize>(encoding: Encoding, frame: &M) -> Bytes {
    match encoding {
        Encoding::Protobuf => Bytes::from(frame.encode_to_vec()),
        // Serializing generated types into a Vec cannot fail: no maps with
        // non-string keys, no I/O.
        Encoding::Json => {
            Bytes::from(serde_json::to_vec(frame).expect("generated frames always serialize"))
        }
    }
}

fn decode<M>(encoding: Encoding, data: &[u8], text: bool) -> Result<M, DecodeError>
where
    M: Message + Default + serde::de::DeserializeOwned,
{
    match (encoding, text) {
        (Encoding::Protobuf, false) => Ok(M::decode(data)?),
        (Encoding::Json, true) => Ok(serde_json::from_slice(data)?),
        (Encoding::Protobuf, true) => Err(DecodeError::WrongFrameType("text")),
        (Encoding::Json, false) => Err(DecodeError::WrongFrameType("binary")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Delivery, Publish, client_frame, publish, server_frame};

    fn publish_frame() -> ClientFrame {
        ClientFrame {
            id: 7,
            kind: Some(client_frame::Kind::Publish(Publish {
                target: Some(publish::Target::Chat("general".into())),
                client_msg_id: "m-1".into(),
                payload: Bytes::from_static(b"hello \xff"),
            })),
        }
    }

    #[test]
    fn round_trips_in_both_encodings() {
        for enc in [Encoding::Protobuf, Encoding::Json] {
            let frame = publish_frame();
            let bytes = enc.encode_client(&frame);
            assert_eq!(enc.decode_client(&bytes, enc.is_text()).unwrap(), frame);

            let delivery = ServerFrame {
                id: 0,
                kind: Some(server_frame::Kind::Delivery(Delivery {
                    chat: "general".into(),
                    seq: u64::MAX,
                    sender: "alice".into(),
                    timestamp_ms: 1_700_000_000_000,
                    payload: Bytes::from_static(b"\x00\x01"),
                    ..Default::default()
                })),
            };
            let bytes = enc.encode_server(&delivery);
            assert_eq!(enc.decode_server(&bytes, enc.is_text()).unwrap(), delivery);
        }
    }

    #[test]
    fn json_mapping_is_the_documented_one() {
        let json =
            String::from_utf8(Encoding::Json.encode_client(&publish_frame()).to_vec()).unwrap();
        assert_eq!(
            json,
            r#"{"id":7,"publish":{"clientMsgId":"m-1","payload":"aGVsbG8g/w==","chat":"general"}}"#
        );
        // 64-bit integers are strings on output and accepted as numbers too.
        let parsed: ClientFrame =
            serde_json::from_str(r#"{"id":1,"subscribe":{"chat":"c","since":5}}"#).unwrap();
        let Some(client_frame::Kind::Subscribe(sub)) = parsed.kind else {
            panic!("not a subscribe")
        };
        assert_eq!(sub.since, Some(5));
    }

    #[test]
    fn json_skips_unknown_fields_like_protobuf_does() {
        let f = Encoding::Json
            .decode_client(br#"{"id":1,"ping":{},"addedLater":true}"#, true)
            .unwrap();
        assert!(matches!(f.kind, Some(client_frame::Kind::Ping(_))));
        let bad = Encoding::Json.decode_client(br#"{"id":"x"}"#, true);
        assert!(bad.is_err(), "known fields are still type-checked");
    }

    #[test]
    fn frame_type_must_match_encoding() {
        let bytes = Encoding::Json.encode_client(&publish_frame());
        assert!(matches!(
            Encoding::Json.decode_client(&bytes, false),
            Err(DecodeError::WrongFrameType("binary"))
        ));
        assert!(matches!(
            Encoding::Protobuf.decode_client(&bytes, true),
            Err(DecodeError::WrongFrameType("text"))
        ));
    }

    #[test]
    fn negotiates_first_known_subprotocol() {
        assert_eq!(
            Encoding::negotiate("foo, switchboard.v1.json"),
            Some(Encoding::Json)
        );
        assert_eq!(
            Encoding::negotiate("switchboard.v1.proto,switchboard.v1.json"),
            Some(Encoding::Protobuf)
        );
        assert_eq!(Encoding::negotiate("chat, superchat"), None);
    }

    proptest::proptest! {
        #[test]
        fn garbage_never_panics(data: Vec<u8>) {
            let _ = Encoding::Protobuf.decode_client(&data, false);
            let _ = Encoding::Json.decode_client(&data, true);
            let _ = Encoding::Protobuf.decode_server(&data, false);
            let _ = Encoding::Json.decode_server(&data, true);
        }

        #[test]
        fn json_shaped_garbage_never_panics(s in r#"\{("[a-zA-Z]{1,12}":(-?[0-9]{1,25}|"[^"]{0,8}"|\{[^}]{0,30}\}|null|true|\[\]),?){0,6}\}"#) {
            let _ = Encoding::Json.decode_client(s.as_bytes(), true);
        }

        #[test]
        fn truncated_frames_never_panic(cut in 0usize..64) {
            let bytes = Encoding::Protobuf.encode_client(&publish_frame());
            let cut = cut.min(bytes.len());
            let _ = Encoding::Protobuf.decode_client(&bytes[..cut], false);
            let json = Encoding::Json.encode_client(&publish_frame());
            let cut = cut.min(json.len());
            let _ = Encoding::Json.decode_client(&json[..cut], true);
        }
    }
}
