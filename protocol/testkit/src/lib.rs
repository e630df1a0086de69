//! Dev-only test harness.
