//! How long to wait before the next reconnect attempt.
use std::time::Duration;

use rand::Rng;

/// The backoff step for an attempt: `base * 2^attempt`, capped at `max`.
pub(crate) fn step(base: Duration, max: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << attempt.min(31)).min(max)
}

/// Full-jitter exponential backoff: uniform in `0..=step(attempt)`, so a
/// crowd of clients dropped together does not come back together.
pub fn delay(rng: &mut impl Rng, base: Duration, max: Duration, attempt: u32) -> Duration {
    uniform(rng, step(base, max, attempt))
}

/// The wait after an HTTP `Retry-After`: at least what the server asked,
/// spread over as much again (at most `max`) so refused clients do not
/// return in one burst.
pub(super) fn after(rng: &mut impl Rng, retry_after: Duration, max: Duration) -> Duration {
    retry_after + uniform(rng, retry_after.min(max))
}

fn uniform(rng: &mut impl Rng, up_to: Duration) -> Duration {
    let nanos = u64::try_from(up_to.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    #[test]
    fn step_doubles_up_to_the_cap() {
        assert_eq!(step(BASE, MAX, 0), BASE);
        assert_eq!(step(BASE, MAX, 1), Duration::from_millis(200));
        assert_eq!(step(BASE, MAX, 6), Duration::from_millis(6400));
        assert_eq!(step(BASE, MAX, 7), MAX);
        // No overflow however many attempts failed.
        assert_eq!(step(BASE, MAX, u32::MAX), MAX);
        assert_eq!(step(Duration::MAX, Duration::MAX, 40), Duration::MAX);
        assert_eq!(step(Duration::ZERO, MAX, 3), Duration::ZERO);
    }

    #[test]
    fn delay_is_full_jitter_within_the_step() {
        let mut rng = rand::rng();
        for attempt in 0..40 {
            let cap = step(BASE, MAX, attempt);
            let draws: Vec<Duration> = (0..200)
                .map(|_| delay(&mut rng, BASE, MAX, attempt))
                .collect();
            assert!(draws.iter().all(|d| *d <= cap), "attempt {attempt}");
            // Spread over the whole range, not bunched at the cap.
            assert!(draws.iter().any(|d| *d < cap / 2), "attempt {attempt}");
            assert!(draws.iter().any(|d| *d > cap / 2), "attempt {attempt}");
        }
        assert_eq!(delay(&mut rng, Duration::ZERO, MAX, 5), Duration::ZERO);
    }

    #[test]
    fn retry_after_is_honoured_and_spread() {
        let mut rng = rand::rng();
        let ra = Duration::from_secs(2);
        let draws: Vec<Duration> = (0..200).map(|_| after(&mut rng, ra, MAX)).collect();
        assert!(draws.iter().all(|d| *d >= ra && *d <= ra * 2));
        assert!(draws.iter().any(|d| *d > ra + Duration::from_millis(100)));
        // The spread is capped by backoff_max.
        let long = Duration::from_secs(60);
        assert!(after(&mut rng, long, MAX) <= long + MAX);
        assert_eq!(after(&mut rng, Duration::ZERO, MAX), Duration::ZERO);
    }
}
