//! Switchboard load generator (see issue #4).
fn main() {}
