//! What clients (the bundled client, the load generator) parse from an edge:
//! no panic on any input, and decoded frames round-trip.
//! The body is in `../targets.rs`, shared with the test suite's smoke run.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../targets.rs"]
#[allow(dead_code)]
mod targets;

fuzz_target!(|data: &[u8]| targets::decode_server(data));
