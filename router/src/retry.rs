//! An idempotent step tried again with backoff for a bounded time, while
//! a backend fails over (a NATS server lost, a Redis master replaced).
use std::{future::Future, time::Duration};

/// Backoff from `first`, doubling up to `max`, for at most `limit`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first wait.
    pub first: Duration,
    /// The longest wait.
    pub max: Duration,
    /// How long the step is tried in all.
    pub limit: Duration,
}

impl Backoff {
    /// Runs `op` until it succeeds or the next wait would pass `limit`;
    /// `on_retry` sees each error that is tried again. Returns the last
    /// error otherwise.
    pub async fn retry<T, E, F, Fut>(self, mut op: F, mut on_retry: impl FnMut(&E)) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let deadline = tokio::time::Instant::now() + self.limit;
        let mut wait = self.first;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if tokio::time::Instant::now() + wait < deadline => {
                    on_retry(&e);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(self.max);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    const B: Backoff = Backoff {
        first: Duration::from_millis(50),
        max: Duration::from_millis(800),
        limit: Duration::from_secs(10),
    };

    #[tokio::test(start_paused = true)]
    async fn tries_again_until_it_works() {
        let calls = AtomicU32::new(0);
        let mut retried = 0;
        let got = B
            .retry(
                || async {
                    let n = calls.fetch_add(1, Ordering::Relaxed);
                    if n < 3 { Err(n) } else { Ok(n) }
                },
                |_| retried += 1,
            )
            .await;
        assert_eq!((got, retried), (Ok(3), 3));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_with_the_last_error_within_its_limit() {
        let start = tokio::time::Instant::now();
        let calls = AtomicU32::new(0);
        let got: Result<(), u32> = B
            .retry(
                || async { Err(calls.fetch_add(1, Ordering::Relaxed)) },
                |_| {},
            )
            .await;
        let n = calls.load(Ordering::Relaxed);
        assert_eq!(got, Err(n - 1));
        assert!(start.elapsed() < B.limit, "{:?}", start.elapsed());
        // 50, 100, 200, 400, then 800 ms waits until 10 s would pass.
        assert_eq!(n, 16);
    }
}
