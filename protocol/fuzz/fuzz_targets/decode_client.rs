//! Anything a client can send: both encodings must refuse garbage with a
//! typed error (never panic), and a frame that decodes must survive a
//! round trip through its encoding unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard_protocol::Encoding;

fuzz_target!(|data: &[u8]| {
    for (encoding, text) in [(Encoding::Protobuf, false), (Encoding::Json, true)] {
        if let Ok(frame) = encoding.decode_client(data, text) {
            let again = encoding.encode_client(&frame);
            let back = encoding
                .decode_client(&again, text)
                .expect("an encoded frame decodes");
            assert_eq!(frame, back, "round trip through {encoding:?}");
        }
    }
});
