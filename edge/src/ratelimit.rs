//! Per-connection token buckets. A request over its rate is refused with
//! error 429 and not processed; a client that keeps sending into a full
//! refusal (a flood) is closed with 4003 `rate_limited` and reconnects
//! after the advised delay (ADR 0014).
use std::{sync::OnceLock, time::Instant};

/// Refused requests in a row that make a flood.
pub(crate) const FLOOD_REFUSALS: u16 = 100;

/// A sustained rate and the burst allowed above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_sec: f32,
    /// Bucket size: requests allowed at once after a quiet spell.
    pub burst: f32,
}

/// 8 bytes per bucket: a million sockets hold two each.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    tokens: f32,
    /// Milliseconds on [`clock_ms`] at the last refill.
    at_ms: u32,
}

/// Milliseconds since the process first asked (wraps after 49 days;
/// refills use wrapping differences, so only a gap that long is misread).
pub(crate) fn clock_ms() -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u32
}

impl Bucket {
    pub(crate) fn full(rate: Rate) -> Self {
        Bucket {
            tokens: rate.burst,
            at_ms: clock_ms(),
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self, rate: Rate, now_ms: u32) -> bool {
        let elapsed = now_ms.wrapping_sub(self.at_ms) as f32 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(rate.burst);
        self.at_ms = now_ms;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RATE: Rate = Rate {
        per_sec: 10.0,
        burst: 5.0,
    };

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let mut b = Bucket {
            tokens: RATE.burst,
            at_ms: 1_000,
        };
        let taken = (0..20).filter(|_| b.take(RATE, 1_000)).count();
        assert_eq!(taken, 5, "the burst, then nothing");
        // 10/s: one more token every 100 ms, never above the burst.
        assert!(!b.take(RATE, 1_050));
        assert!(b.take(RATE, 1_110));
        assert!(!b.take(RATE, 1_120));
        let later = (0..20).filter(|_| b.take(RATE, 60_000)).count();
        assert_eq!(later, 5, "a long pause refills only up to the burst");
    }

    #[test]
    fn the_clock_may_wrap() {
        let mut b = Bucket {
            tokens: 0.0,
            at_ms: u32::MAX - 50,
        };
        assert!(
            b.take(RATE, 100),
            "150 ms across the wrap refill 1.5 tokens"
        );
    }
}
