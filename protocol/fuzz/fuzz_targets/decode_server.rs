//! What clients (the bundled client, the load generator) parse from an edge:
//! no panic on any input, and decoded frames round-trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard_protocol::Encoding;

fuzz_target!(|data: &[u8]| {
    for (encoding, text) in [(Encoding::Protobuf, false), (Encoding::Json, true)] {
        if let Ok(frame) = encoding.decode_server(data, text) {
            let again = encoding.encode_server(&frame);
            let back = encoding
                .decode_server(&again, text)
                .expect("an encoded frame decodes");
            assert_eq!(frame, back, "round trip through {encoding:?}");
        }
    }
});
