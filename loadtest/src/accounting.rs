//! Per-stream delivery accounting: what arrived once, twice, late, or not
//! at all. Memory stays small: only the seqs still missing are kept.
use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::report::{Deliveries, Report};

/// Counters holding publishes refused for good, by error code.
const REFUSED: &str = "refused_";

/// What became of one kind's messages, each outcome apart: `refused` (by
/// error code: publishes refused after retries, owing nothing), `late`
/// (received, but after the window), `lost_after_ack` (acked, owed to a
/// connected member, never received), `to_unconnected` (owed to members
/// who never got in: not lost), `duplicated`, `out_of_order`.
pub(crate) fn apart(r: &Report, d: &Deliveries) -> Map<String, Value> {
    let refused: Map<String, Value> = r
        .counters
        .iter()
        .filter_map(|(k, v)| {
            let code = k.strip_prefix(REFUSED)?;
            // refused_retried_* counts refused upgrades, not publishes.
            code.parse::<u32>().ok()?;
            Some((code.to_owned(), json!(v)))
        })
        .collect();
    let mut m = Map::new();
    m.insert("refused".into(), Value::Object(refused));
    m.insert(
        "window_ms".into(),
        r.params.get("window_ms").cloned().unwrap_or_default(),
    );
    m.insert("late".into(), json!(d.late));
    m.insert(
        "lost_after_ack".into(),
        json!(d.expected.saturating_sub(d.received)),
    );
    m.insert("to_unconnected".into(), json!(r.counter("to_unconnected")));
    m.insert("duplicated".into(), json!(d.duplicated));
    m.insert("out_of_order".into(), json!(d.out_of_order));
    m
}

/// Deliveries per second actually received: from the first publish
/// (the timestamp `start`) to the last delivery.
pub(crate) fn delivery_rate(r: &Report, start: &str, received: u64) -> Option<f64> {
    let from = r.earliest_us.get(start).copied().unwrap_or(0);
    let to = r.latest_us.get("last_delivery").copied().unwrap_or(0);
    Report::span_secs(from, to)
        .filter(|s| *s > 0.0)
        .map(|s| received as f64 / s)
}

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
    fn refused_late_lost_and_unconnected_are_told_apart() {
        let mut r = Report::default();
        r.params.insert("window_ms".into(), json!(10_000));
        // 10 publishes to chats of 3: one refused for good with 503 and
        // one with 403 (owing nothing), 8 acked; a member of one chat never
        // connected (2 messages owed to it), so 14 deliveries are owed.
        for (k, v) in [
            ("refused_503", 1),
            ("refused_403", 1),
            ("refused_retried_503", 7),
        ] {
            r.counters.insert(k.into(), v);
        }
        r.counters.insert("to_unconnected".into(), 2);
        let d = Deliveries {
            sent: 10,
            expected: 14,
            // One came twice, one after a later seq, two past the window.
            received: 13,
            duplicated: 1,
            out_of_order: 1,
            late: 2,
            ..Deliveries::default()
        };
        let m = apart(&r, &d);
        assert_eq!(m["refused"], json!({ "403": 1, "503": 1 }));
        assert_eq!(m["window_ms"], json!(10_000));
        // Late ones arrived: they are not lost.
        assert_eq!(m["late"], json!(2));
        assert_eq!(m["lost_after_ack"], json!(1));
        assert_eq!(m["to_unconnected"], json!(2));
        assert_eq!(m["duplicated"], json!(1));
        assert_eq!(m["out_of_order"], json!(1));
    }

    #[test]
    fn the_achieved_rate_is_of_deliveries_received() {
        let mut r = Report::default();
        r.earliest_us.insert("publish_start".into(), 1_000_000);
        r.latest_us.insert("last_delivery".into(), 3_000_000);
        assert_eq!(delivery_rate(&r, "publish_start", 500), Some(250.0));
        r.latest_us.clear();
        assert_eq!(delivery_rate(&r, "publish_start", 500), None);
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
