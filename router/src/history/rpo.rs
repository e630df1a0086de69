//! What a Redis failover lost: the seqs this router acked recently per
//! stream, compared with what survived when the stream is fenced (a new
//! epoch started because its primary changed, ADR 0019).
//!
//! Each acked message is acked by exactly one router, so the losses that
//! the routers count add up to each lost acked message once. Bounded: the
//! last [`ACKS_PER_STREAM`] seqs of at most [`MAX_STREAMS`] streams, the
//! least recently written forgotten first; what is forgotten is not
//! counted (the count is a lower bound under that much load).
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

/// Acked seqs remembered per stream.
pub(crate) const ACKS_PER_STREAM: usize = 64;
/// Streams remembered at once.
pub(crate) const MAX_STREAMS: usize = 10_000;

const TRACKED_GAUGE: &str = "switchboard_history_rpo_tracked_streams";
const LOST_COUNTER: &str = "switchboard_history_failover_lost_total";
const FENCED_COUNTER: &str = "switchboard_history_epoch_fenced_total";

/// A stream's history was cut at a failover: `epoch` survives up to
/// `last_seq`, later writes of that epoch are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fence {
    pub(crate) epoch: String,
    pub(crate) last_seq: u64,
}

impl Fence {
    /// Parses the script's `<epoch>:<last seq>` record.
    pub(crate) fn parse(record: &str) -> Option<Fence> {
        let (epoch, seq) = record.rsplit_once(':')?;
        Some(Fence {
            epoch: epoch.to_owned(),
            last_seq: seq.parse().ok()?,
        })
    }
}

#[derive(Debug)]
struct Acks {
    epoch: String,
    seqs: VecDeque<u64>,
    touched: u64,
}

#[derive(Debug, Default)]
struct Inner {
    streams: HashMap<String, Acks>,
    /// Last write tick → stream, for least-recently-written eviction.
    by_age: BTreeMap<u64, String>,
    tick: u64,
}

/// The recently acked seqs of this router, per stream.
#[derive(Debug)]
pub(crate) struct AckLog {
    inner: Mutex<Inner>,
    max_streams: usize,
    per_stream: usize,
    tracked: metrics::Gauge,
    lost: metrics::Counter,
    fenced: metrics::Counter,
    /// Totals of this log, for tests (the counters are process-wide).
    totals: Mutex<(u64, u64)>,
}

impl AckLog {
    pub(crate) fn new(max_streams: usize, per_stream: usize) -> Self {
        AckLog {
            inner: Mutex::default(),
            max_streams: max_streams.max(1),
            per_stream: per_stream.max(1),
            tracked: metrics::gauge!(TRACKED_GAUGE),
            lost: metrics::counter!(LOST_COUNTER),
            fenced: metrics::counter!(FENCED_COUNTER),
            totals: Mutex::default(),
        }
    }

    /// The epoch this router last acked on `stream` ("" when none).
    pub(crate) fn epoch_of(&self, stream: &str) -> String {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .streams
            .get(stream)
            .map(|a| a.epoch.clone())
            .unwrap_or_default()
    }

    /// (lost messages, fenced streams) counted by this log so far.
    pub(crate) fn totals(&self) -> (u64, u64) {
        *self.totals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh append of `seq` in `epoch` was acked. `fence`: the stream's
    /// last cut, when the script reported one; `fenced_now`: this append
    /// made it. Returns the acked seqs of the cut epoch counted as lost.
    pub(crate) fn on_acked(
        &self,
        stream: &str,
        epoch: &str,
        seq: u64,
        fence: Option<&Fence>,
        fenced_now: bool,
    ) -> u64 {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.tick += 1;
        let tick = inner.tick;
        let mut lost = 0;
        let mut lost_seqs = Vec::new();
        let known = if let Some(acks) = inner.streams.get_mut(stream) {
            if acks.epoch != epoch {
                // Count only on the change away from the cut epoch, so a
                // loss is counted once.
                if let Some(f) = fence.filter(|f| f.epoch == acks.epoch) {
                    lost_seqs = acks
                        .seqs
                        .iter()
                        .copied()
                        .filter(|s| *s > f.last_seq)
                        .collect();
                    lost = lost_seqs.len() as u64;
                }
                acks.epoch = epoch.to_owned();
                acks.seqs.clear();
            }
            if acks.seqs.len() >= self.per_stream {
                acks.seqs.pop_front();
            }
            acks.seqs.push_back(seq);
            let old = std::mem::replace(&mut acks.touched, tick);
            Some(old)
        } else {
            None
        };
        match known {
            Some(old) => {
                inner.by_age.remove(&old);
                inner.by_age.insert(tick, stream.to_owned());
            }
            None => {
                while inner.streams.len() >= self.max_streams {
                    let Some((_, oldest)) = inner.by_age.pop_first() else {
                        break;
                    };
                    inner.streams.remove(&oldest);
                }
                inner.streams.insert(
                    stream.to_owned(),
                    Acks {
                        epoch: epoch.to_owned(),
                        seqs: VecDeque::from([seq]),
                        touched: tick,
                    },
                );
                inner.by_age.insert(tick, stream.to_owned());
            }
        }
        self.tracked.set(inner.streams.len() as f64);
        drop(inner);
        if fenced_now {
            self.fenced.increment(1);
        }
        if lost > 0 {
            self.lost.increment(lost);
        }
        if let (Some(f), true) = (fence, fenced_now || lost > 0) {
            tracing::warn!(
                stream,
                old_epoch = %f.epoch,
                surviving_seq = f.last_seq,
                new_epoch = epoch,
                lost,
                lost_seqs = ?lost_seqs,
                "redis failover: stream fenced into a new epoch"
            );
        }
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        totals.0 += lost;
        totals.1 += u64::from(fenced_now);
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence(epoch: &str, last_seq: u64) -> Fence {
        Fence {
            epoch: epoch.into(),
            last_seq,
        }
    }

    #[test]
    fn acked_seqs_above_the_surviving_one_are_lost_once() {
        let log = AckLog::new(10, 64);
        for seq in 1..=5 {
            log.on_acked("s", "e1", seq, None, false);
        }
        assert_eq!(log.epoch_of("s"), "e1");
        assert_eq!(log.on_acked("s", "e2", 4, Some(&fence("e1", 3)), true), 2);
        // Another report of the same cut counts nothing more.
        assert_eq!(log.on_acked("s", "e2", 5, Some(&fence("e1", 3)), false), 0);
        assert_eq!(log.totals(), (2, 1));
    }

    #[test]
    fn a_cut_of_another_epoch_counts_nothing() {
        let log = AckLog::new(10, 64);
        log.on_acked("s", "e0", 9, None, false);
        assert_eq!(log.on_acked("s", "e2", 4, Some(&fence("e1", 3)), false), 0);
    }

    #[test]
    fn memory_is_bounded_per_stream_and_in_streams() {
        let log = AckLog::new(2, 3);
        for seq in 1..=10 {
            log.on_acked("a", "e", seq, None, false);
        }
        // Only 8, 9, 10 are remembered.
        assert_eq!(log.on_acked("a", "f", 1, Some(&fence("e", 0)), true), 3);
        log.on_acked("b", "e", 1, None, false);
        log.on_acked("a", "f", 2, None, false);
        log.on_acked("c", "e", 1, None, false);
        // "b" was the least recently written.
        assert_eq!(log.epoch_of("b"), "");
        assert_eq!(log.epoch_of("a"), "f");
        assert_eq!(log.epoch_of("c"), "e");
    }

    #[test]
    fn a_fence_record_parses() {
        assert_eq!(Fence::parse("ab12:7"), Some(fence("ab12", 7)));
        assert_eq!(Fence::parse("nope"), None);
    }
}
