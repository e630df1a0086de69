//! The body of the edge's fuzz target, shared by the cargo-fuzz binary
//! (`fuzz_targets/frames.rs`) and the stable smoke run of the test suite
//! (`edge/system/tests/fuzz.rs`). Depends on `switchboard_edge` only.

/// The message limit the reader is run with.
pub(crate) const MAX: usize = 4096;

/// Raw bytes from a client socket into the edge's frame-at-a-time reader:
/// never a panic, and never a payload over the message limit.
pub(crate) fn frames(data: &[u8]) {
    for len in switchboard_edge::fuzzing::read_frames(data, MAX) {
        assert!(len <= MAX, "a {len}-byte payload passed a {MAX}-byte limit");
    }
}
