//! Admission control: the edge knows its file limit and caps sockets below
//! it, so an upgrade over the cap gets HTTP 503 + Retry-After instead of an
//! obscure accept failure.
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// File descriptors kept for everything that is not a client socket
/// (listener, NATS/Redis, logs, files).
const RESERVED_FDS: u64 = 64;

/// Raises the soft file limit to the hard one and returns the soft limit.
pub fn raise_file_limit() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or_else(|_| {
        rlimit::getrlimit(rlimit::Resource::NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024)
    })
}

/// Descriptors left for client sockets under `limit`.
pub(crate) fn usable_fds(limit: u64) -> u64 {
    limit.saturating_sub(RESERVED_FDS)
}

/// 90% of the file limit left after a reserve.
pub(crate) fn default_max_connections() -> usize {
    (usable_fds(raise_file_limit()) * 9 / 10).max(1) as usize
}

/// Counts sockets against the cap. A permit is held for a socket's life.
pub(crate) struct Admission {
    open: AtomicUsize,
    max: usize,
}

/// One admitted socket; releases its slot on drop.
pub(crate) struct Permit(Arc<Admission>);

impl Admission {
    pub(crate) fn new(max: usize) -> Self {
        Admission {
            open: AtomicUsize::new(0),
            max,
        }
    }

    pub(crate) fn try_admit(self: &Arc<Self>) -> Option<Permit> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(self.clone()))
    }

    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_and_releases() {
        let a = Arc::new(Admission::new(2));
        let p1 = a.try_admit().unwrap();
        let _p2 = a.try_admit().unwrap();
        assert!(a.try_admit().is_none());
        drop(p1);
        assert!(a.try_admit().is_some());
    }
}
