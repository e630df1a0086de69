//! Raw bytes from a client socket into the edge's frame-at-a-time reader:
//! never a panic, and never a payload over the message limit.
#![no_main]
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

fuzz_target!(|data: &[u8]| {
    for len in switchboard_edge::fuzzing::read_frames(data, MAX) {
        assert!(len <= MAX, "a {len}-byte payload passed a {MAX}-byte limit");
    }
});
