//! Raw bytes from a client socket into the edge's frame-at-a-time reader:
//! never a panic, and never a payload over the message limit.
//! The body is in `../targets.rs`, shared with the test suite's smoke run.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../targets.rs"]
mod targets;

fuzz_target!(|data: &[u8]| targets::frames(data));
