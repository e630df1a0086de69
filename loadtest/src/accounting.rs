//! Per-stream delivery accounting: what arrived once, twice, late, or not
//! at all. Memory stays small: only the seqs still missing are kept.
use std::collections::BTreeSet;

/// Tracks one stream's seqs as a receiver sees them.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    /// The baseline is set: [`Tracker::after`], or a first delivery.
    based: bool,
    highest: u64,
    missing: BTreeSet<u64>,
    /// Distinct seqs received.
    pub(crate) received: u64,
    /// Seqs received again.
    pub(crate) duplicated: u64,
    /// Seqs that arrived after a higher one.
    pub(crate) out_of_order: u64,
}

/// What one delivery was.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// New, in order.
    New,
    /// New, but a higher seq came first.
    Late,
    /// Already seen.
    Duplicate,
}

impl Tracker {
    /// A receiver that has seen everything up to `seq` (a resume with
    /// `since`): anything at or below it again is a duplicate.
    pub(crate) fn after(seq: u64) -> Tracker {
        Tracker {
            based: true,
            highest: seq,
            ..Tracker::default()
        }
    }

    /// Records a delivery with `seq`. Without [`Tracker::after`], the
    /// first one sets the baseline (a subscription without `since` starts
    /// wherever the stream is).
    pub(crate) fn observe(&mut self, seq: u64) -> Seen {
        if !self.based {
            self.based = true;
            self.highest = seq;
            self.received = 1;
            return Seen::New;
        }
        if seq > self.highest {
            // Everything skipped over is missing until it shows up.
            if seq - self.highest > 1 {
                self.missing.extend(self.highest + 1..seq);
            }
            self.highest = seq;
            self.received += 1;
            Seen::New
        } else if self.missing.remove(&seq) {
            self.received += 1;
            self.out_of_order += 1;
            Seen::Late
        } else {
            self.duplicated += 1;
            Seen::Duplicate
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_duplicates_reordering_and_loss() {
        let mut t = Tracker::default();
        let seen: Vec<Seen> = [1, 2, 2, 5, 3, 3, 6]
            .into_iter()
            .map(|s| t.observe(s))
            .collect();
        assert_eq!(
            seen,
            [
                Seen::New,
                Seen::New,
                Seen::Duplicate,
                Seen::New,
                Seen::Late,
                Seen::Duplicate,
                Seen::New
            ]
        );
        assert_eq!((t.received, t.duplicated, t.out_of_order), (5, 2, 1));
        assert_eq!(
            t.missing.iter().copied().collect::<Vec<_>>(),
            [4],
            "4 never came"
        );
    }

    #[test]
    fn after_a_resume_a_duplicate_is_never_recovered() {
        // Resumed after seq 10; 11..=13 were missed.
        let mut t = Tracker::after(10);
        let seen: Vec<Seen> = [12, 10, 12, 11, 13]
            .into_iter()
            .map(|s| t.observe(s))
            .collect();
        assert_eq!(
            seen,
            [
                Seen::New,
                Seen::Duplicate,
                Seen::Duplicate,
                Seen::Late,
                Seen::New
            ]
        );
        // Three distinct recovered, not five deliveries.
        assert_eq!((t.received, t.duplicated, t.out_of_order), (3, 2, 1));
        assert!(t.missing.is_empty());
        // From an empty stream, seq 2 before 1 is reordering, not a baseline.
        let mut t = Tracker::after(0);
        assert_eq!(t.observe(2), Seen::New);
        assert_eq!(t.observe(1), Seen::Late);
        assert_eq!((t.received, t.out_of_order), (2, 1));
    }

    #[test]
    fn a_clean_stream_joined_mid_way_has_nothing_to_report() {
        let mut t = Tracker::default();
        // The first seq is the baseline, not a loss.
        for s in 501..=1500 {
            assert_eq!(t.observe(s), Seen::New);
        }
        assert_eq!(
            (t.received, t.duplicated, t.out_of_order, t.missing.len()),
            (1000, 0, 0, 0)
        );
    }
}
