//! The bodies of the protocol's fuzz targets, shared by the cargo-fuzz
//! binaries (`fuzz_targets/*.rs`, nightly libFuzzer) and the stable smoke
//! run of the test suite (`edge/system/tests/fuzz.rs`), so both exercise
//! the same assertions. Depends on `switchboard_protocol` only.
use switchboard_protocol::{ChatId, Encoding, UserId};

/// Anything a client can send: both encodings must refuse garbage with a
/// typed error (never panic), and a frame that decodes must survive a
/// round trip through its encoding unchanged.
pub(crate) fn decode_client(data: &[u8]) {
    for (encoding, text) in [(Encoding::Protobuf, false), (Encoding::Json, true)] {
        if let Ok(frame) = encoding.decode_client(data, text) {
            let again = encoding.encode_client(&frame);
            let back = encoding
                .decode_client(&again, text)
                .expect("an encoded frame decodes");
            assert_eq!(frame, back, "round trip through {encoding:?}");
        }
    }
}

/// What clients (the bundled client, the load generator) parse from an
/// edge: no panic on any input, and decoded frames round-trip.
pub(crate) fn decode_server(data: &[u8]) {
    for (encoding, text) in [(Encoding::Protobuf, false), (Encoding::Json, true)] {
        if let Ok(frame) = encoding.decode_server(data, text) {
            let again = encoding.encode_server(&frame);
            let back = encoding
                .decode_server(&again, text)
                .expect("an encoded frame decodes");
            assert_eq!(frame, back, "round trip through {encoding:?}");
        }
    }
}

/// Ids go into NATS subjects: whatever parses must be safe there.
pub(crate) fn ids(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = [
        UserId::parse(s).map(|u| u.to_string()),
        ChatId::parse(s).map(|c| c.to_string()),
    ];
    for id in parsed.into_iter().flatten() {
        assert!(!id.is_empty() && id.len() <= switchboard_protocol::MAX_ID_LEN);
        assert!(
            !id.chars()
                .any(|c| matches!(c, '.' | '*' | '>') || c.is_whitespace() || c.is_control()),
            "subject-unsafe id accepted: {id:?}"
        );
    }
}
