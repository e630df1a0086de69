//! Async Rust client (filled in next).
