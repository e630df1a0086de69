//! Ids go into NATS subjects: whatever parses must be safe there.
//! The body is in `../targets.rs`, shared with the test suite's smoke run.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../targets.rs"]
#[allow(dead_code)]
mod targets;

fuzz_target!(|data: &[u8]| targets::ids(data));
