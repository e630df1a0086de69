//! Anything a client can send: both encodings must refuse garbage with a
//! typed error (never panic), and a frame that decodes must survive a
//! round trip through its encoding unchanged.
//! The body is in `../targets.rs`, shared with the test suite's smoke run.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../targets.rs"]
#[allow(dead_code)]
mod targets;

fuzz_target!(|data: &[u8]| targets::decode_client(data));
