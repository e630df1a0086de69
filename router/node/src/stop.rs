//! The clock of a process's stop. Every await on the stop path is bounded
//! by a deadline derived from the shutdown grace, whatever NATS and Redis
//! do, and each thing the stop gave up on is logged once, with how long
//! into the stop. The exit status says whether anything was given up on
//! ([`Stopped`]); a watchdog ends a binary that overruns anyway.
//!
//! The grace counts from the signal and has two parts: the work in hand
//! (an edge's sockets, a router's requests and jobs) must finish by
//! [`Stop::work_deadline`]; the rest, the release reserve, is for letting
//! go of the backends (the last NATS flush, background tasks), which must
//! finish by [`Stop::deadline`].
use std::{
    fmt::Display,
    future::Future,
    process::ExitCode,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

/// Exit status of a process that stopped within its grace but gave up on
/// something on the way (`EX_TEMPFAIL`): the log says what. What it left
/// undone is repaired by others (presence leases expire, JetStream
/// redelivers, edges retry publishes on another router).
pub const EXIT_GAVE_UP: u8 = 75;

/// How long past its grace a stopping binary may run before the watchdog
/// ends it with [`EXIT_GAVE_UP`]. Every step is bounded by the grace
/// itself; this only covers what no step bounds (the runtime's teardown).
pub const WATCHDOG_MARGIN: Duration = Duration::from_secs(1);

/// The longest the release reserve gets: a flush or a task's last round
/// trip to a healthy backend takes milliseconds.
const MAX_RELEASE_RESERVE: Duration = Duration::from_secs(2);

/// The part of `grace` kept for releasing the backends: a fifth, at most
/// [`MAX_RELEASE_RESERVE`].
fn release_reserve(grace: Duration) -> Duration {
    (grace / 5).min(MAX_RELEASE_RESERVE)
}

/// How a stop went, and the process's exit status for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Everything finished within the grace: exit 0.
    Clean,
    /// Something was given up on (and logged): exit [`EXIT_GAVE_UP`].
    GaveUp,
}

impl Stopped {
    /// The process's exit status.
    pub fn exit_code(self) -> ExitCode {
        match self {
            Stopped::Clean => ExitCode::SUCCESS,
            Stopped::GaveUp => ExitCode::from(EXIT_GAVE_UP),
        }
    }
}

/// The stop of one process: begun once, then its deadlines hold for every
/// task that shares it (clones share one clock).
#[derive(Clone)]
pub struct Stop {
    inner: Arc<Inner>,
}

struct Inner {
    grace: Duration,
    token: CancellationToken,
    started: OnceLock<Instant>,
    gave_up: AtomicUsize,
}

impl Stop {
    /// A stop not begun yet, with `grace` from its beginning to the exit.
    pub fn new(grace: Duration) -> Stop {
        Stop {
            inner: Arc::new(Inner {
                grace,
                token: CancellationToken::new(),
                started: OnceLock::new(),
                gave_up: AtomicUsize::new(0),
            }),
        }
    }

    /// Begins the stop: starts the clock (the first call does) and wakes
    /// every task waiting on [`Stop::begun`].
    pub fn begin(&self) {
        self.inner.started.get_or_init(Instant::now);
        self.inner.token.cancel();
    }

    /// Resolves once the stop has begun.
    pub async fn begun(&self) {
        self.inner.token.cancelled().await
    }

    /// Whether the stop has begun.
    pub fn is_begun(&self) -> bool {
        self.inner.token.is_cancelled()
    }

    /// A token cancelled when the stop begins (for APIs that take one).
    pub fn token(&self) -> CancellationToken {
        self.inner.token.clone()
    }

    /// The whole grace.
    pub fn grace(&self) -> Duration {
        self.inner.grace
    }

    /// When the stop began; now if it has not (a deadline asked for
    /// before then is as if the stop began now).
    fn started(&self) -> Instant {
        self.inner
            .started
            .get()
            .copied()
            .unwrap_or_else(Instant::now)
    }

    /// When the work in hand must be done: the grace less the release
    /// reserve, from the beginning of the stop.
    pub fn work_deadline(&self) -> Instant {
        self.deadline() - release_reserve(self.inner.grace)
    }

    /// When everything must be done: the grace after the stop began.
    pub fn deadline(&self) -> Instant {
        self.started() + self.inner.grace
    }

    /// Halfway from now to `until`: a step that may wait on a backend
    /// for all its time leaves the rest to the steps after it.
    pub fn halfway_to(&self, until: Instant) -> Instant {
        let now = Instant::now();
        now + until.saturating_duration_since(now) / 2
    }

    /// Notes that the stop gave up on `what` because `why`, in one log
    /// line with how long after the beginning of the stop.
    pub fn gave_up(&self, what: &str, why: &dyn Display) {
        self.inner.gave_up.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            what,
            after_ms = self.started().elapsed().as_millis() as u64,
            why = %why,
            "shutdown gave up"
        );
    }

    /// `fut`'s output, or `None` (given up on `what`) once `until` passes.
    pub async fn bounded<F: Future>(
        &self,
        what: &str,
        until: Instant,
        fut: F,
    ) -> Option<F::Output> {
        match tokio::time::timeout_at(until, fut).await {
            Ok(out) => Some(out),
            Err(_) => {
                self.gave_up(what, &"the deadline passed");
                None
            }
        }
    }

    /// `fut`'s value, or `None` (given up on `what`) when it fails or
    /// `until` passes.
    pub async fn step<T, E: Display>(
        &self,
        what: &str,
        until: Instant,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Option<T> {
        match self.bounded(what, until, fut).await? {
            Ok(v) => Some(v),
            Err(e) => {
                self.gave_up(what, &e);
                None
            }
        }
    }

    /// Waits for `task` until `until`; past it, aborts the task and gives
    /// up on `what`. `None` also when the task panicked.
    pub async fn join<T>(&self, what: &str, until: Instant, mut task: JoinHandle<T>) -> Option<T> {
        match self.bounded(what, until, &mut task).await {
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                self.gave_up(what, &e);
                None
            }
            None => {
                task.abort();
                None
            }
        }
    }

    /// How the stop went so far.
    pub fn stopped(&self) -> Stopped {
        match self.inner.gave_up.load(Ordering::Relaxed) {
            0 => Stopped::Clean,
            _ => Stopped::GaveUp,
        }
    }
}

/// Arms the watchdog of a binary whose stop has begun: if the process
/// still runs `grace` + [`WATCHDOG_MARGIN`] from now, it logs so and exits
/// with [`EXIT_GAVE_UP`]. Never in a test's process: it ends the process.
pub fn arm_watchdog(grace: Duration) {
    let limit = grace + WATCHDOG_MARGIN;
    let armed = std::thread::Builder::new()
        .name("stop-watchdog".into())
        .spawn(move || {
            std::thread::sleep(limit);
            tracing::error!(
                limit_ms = limit.as_millis() as u64,
                "shutdown overran its grace; exiting now"
            );
            std::process::exit(i32::from(EXIT_GAVE_UP));
        });
    if let Err(e) = armed {
        tracing::warn!(error = %e, "no shutdown watchdog: cannot start its thread");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_a_fifth_of_the_grace_and_at_most_two_seconds() {
        assert_eq!(
            release_reserve(Duration::from_secs(2)),
            Duration::from_millis(400)
        );
        assert_eq!(
            release_reserve(Duration::from_secs(30)),
            MAX_RELEASE_RESERVE
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_past_its_deadline_is_given_up_and_the_exit_says_so() {
        let stop = Stop::new(Duration::from_secs(10));
        assert!(!stop.is_begun());
        stop.begin();
        assert_eq!(stop.deadline() - stop.work_deadline(), MAX_RELEASE_RESERVE);
        let quick = stop
            .step("quick", stop.deadline(), async { Ok::<_, String>(1) })
            .await;
        assert_eq!(quick, Some(1));
        assert_eq!(stop.stopped(), Stopped::Clean);
        // A future that never resolves (a flush waiting for a connection).
        let hung = stop
            .bounded("hung", stop.work_deadline(), std::future::pending::<()>())
            .await;
        assert_eq!(hung, None);
        assert!(Instant::now() >= stop.work_deadline());
        assert!(Instant::now() < stop.deadline());
        assert_eq!(stop.stopped(), Stopped::GaveUp);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_step_and_a_task_past_its_deadline_are_given_up() {
        let stop = Stop::new(Duration::from_secs(1));
        stop.begin();
        let failed = stop
            .step("failing", stop.deadline(), async {
                Err::<(), _>("refused")
            })
            .await;
        assert_eq!(failed, None);
        assert_eq!(stop.stopped(), Stopped::GaveUp);

        let stop = Stop::new(Duration::from_secs(1));
        stop.begin();
        let task = tokio::spawn(std::future::pending::<()>());
        let abort = task.abort_handle();
        assert_eq!(stop.join("task", stop.deadline(), task).await, None);
        tokio::task::yield_now().await;
        assert!(abort.is_finished(), "the task given up on is aborted");
        assert_eq!(stop.stopped(), Stopped::GaveUp);
    }
}
