//! The state machine alone: frames, answers and instants in, decisions
//! out. No runtime, no bus, no history.
use std::time::Duration;

use switchboard_protocol::{
    SharedFrame,
    v1::{Delivery, ServerFrame, StreamPosition, server_frame},
};
use switchboard_router::Recovery;
use tokio::time::Instant;

use super::*;

fn frame(seq: u64, epoch: &str) -> SharedFrame {
    SharedFrame::new(ServerFrame {
        id: 0,
        kind: Some(server_frame::Kind::Delivery(Delivery {
            chat: "room".into(),
            seq,
            epoch: epoch.into(),
            ..Default::default()
        })),
    })
}

fn seqs(frames: &[SharedFrame]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| f.delivery_position().expect("a delivery").1)
        .collect()
}

fn answer(seqs: impl IntoIterator<Item = u64>, resync_required: bool) -> Result<Recovery, ()> {
    let frames: Vec<SharedFrame> = seqs.into_iter().map(|s| frame(s, "e")).collect();
    Ok(Recovery {
        position: StreamPosition {
            seq: frames
                .last()
                .map_or(0, |f| f.delivery_position().unwrap().1),
            epoch: "e".into(),
            recovered: frames.len() as u32,
            resync_required,
        },
        frames,
    })
}

const DOWN: Result<Recovery, ()> = Err(());

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A stream whose history read said it stands at `seq` in epoch "e".
fn at(seq: u64) -> StreamOrder {
    let mut o = StreamOrder::new();
    o.on_position(seq, "e");
    o
}

/// Feeds a frame of epoch "e"; the seqs it released (itself first), or
/// panics on any other outcome.
fn next(o: &mut StreamOrder, seq: u64, now: Instant) -> Vec<u64> {
    match o.on_frame(seq, "e", &frame(seq, "e"), now) {
        Arrival::Next { released } => [vec![seq], seqs(&released)].concat(),
        other => panic!("seq {seq}: expected Next, got {other:?}"),
    }
}

/// Feeds a frame of epoch "e" that must be held; when the repair starts.
fn held(o: &mut StreamOrder, seq: u64, now: Instant) -> Option<Instant> {
    match o.on_frame(seq, "e", &frame(seq, "e"), now) {
        Arrival::Held { repair_at } => repair_at,
        other => panic!("seq {seq}: expected Held, got {other:?}"),
    }
}

#[test]
fn classify_is_the_one_seq_rule() {
    assert_eq!(classify(5, 4), Seq::Duplicate);
    assert_eq!(classify(5, 5), Seq::Duplicate);
    assert_eq!(classify(5, 6), Seq::Next);
    assert_eq!(classify(5, 7), Seq::Ahead);
    assert_eq!(classify(0, 1), Seq::Next);
    assert_eq!(classify(u64::MAX, u64::MAX), Seq::Duplicate);
}

#[test]
fn in_order_frames_pass_and_duplicates_drop() {
    let t0 = Instant::now();
    let mut o = at(5);
    assert!(matches!(
        o.on_frame(5, "e", &frame(5, "e"), t0),
        Arrival::Duplicate
    ));
    assert_eq!(next(&mut o, 6, t0), [6]);
    assert_eq!(next(&mut o, 7, t0), [7]);
    for dup in [7, 6, 1] {
        assert!(matches!(
            o.on_frame(dup, "e", &frame(dup, "e"), t0),
            Arrival::Duplicate
        ));
    }
    assert_eq!(o.held(), 0);
    assert_eq!(o.due_read(), None, "nothing held, nothing to repair");
}

#[test]
fn an_early_frame_waits_and_the_late_one_releases_it() {
    let t0 = Instant::now();
    let mut o = at(5);
    assert_eq!(held(&mut o, 7, t0), Some(t0 + GAP_TIMEOUT));
    // One repair per hole: later early frames join it.
    assert_eq!(held(&mut o, 9, t0 + ms(10)), None);
    assert_eq!(held(&mut o, 8, t0 + ms(20)), None);
    assert_eq!(o.held(), 3);
    assert_eq!(next(&mut o, 6, t0 + ms(30)), [6, 7, 8, 9]);
    assert_eq!(o.held(), 0);
    // The repair wakes to nothing and ends; the next hole starts another.
    assert_eq!(o.due_read(), None);
    assert_eq!(
        held(&mut o, 11, t0 + ms(40)),
        Some(t0 + ms(40) + GAP_TIMEOUT)
    );
}

#[test]
fn the_gap_timeout_reads_the_hole_from_history() {
    let t0 = Instant::now();
    let mut o = at(5);
    let read_at = held(&mut o, 7, t0).expect("a repair starts");
    assert_eq!(read_at - t0, GAP_TIMEOUT);
    assert_eq!(
        o.due_read(),
        Some(HistoryRead {
            since: 5,
            epoch: "e".into()
        })
    );
    let a = o.on_history(answer([6, 7], false), read_at);
    assert_eq!(seqs(&a.deliver), [6, 7]);
    assert_eq!(a.gap, Some(Gap::Repaired));
    assert_eq!(a.next_read, None, "the repair is over");
    assert_eq!(o.held(), 0);
    assert_eq!(next(&mut o, 8, read_at), [8]);
}

#[test]
fn a_hole_newer_than_the_read_is_read_again() {
    let t0 = Instant::now();
    let mut o = at(5);
    let read_at = held(&mut o, 7, t0).unwrap();
    held(&mut o, 9, t0);
    assert_eq!(o.due_read().unwrap().since, 5);
    // History had 6 only when read: 8 is still missing.
    let a = o.on_history(answer([6], false), read_at);
    assert_eq!(seqs(&a.deliver), [6, 7]);
    assert_eq!(a.gap, Some(Gap::Repaired));
    assert_eq!(a.next_read, Some(read_at + GAP_TIMEOUT));
    assert_eq!(o.due_read().unwrap().since, 7);
    let a = o.on_history(answer([8, 9], false), read_at + GAP_TIMEOUT);
    assert_eq!(seqs(&a.deliver), [8, 9]);
    assert_eq!(a.next_read, None);
}

#[test]
fn a_read_with_nothing_new_is_no_repair_and_reads_again() {
    let t0 = Instant::now();
    let mut o = at(5);
    let read_at = held(&mut o, 7, t0).unwrap();
    o.due_read().unwrap();
    let a = o.on_history(answer([], false), read_at);
    assert!(a.deliver.is_empty());
    assert_eq!(a.gap, None, "nothing filled");
    assert_eq!(a.next_read, Some(read_at + GAP_TIMEOUT));
    assert_eq!(o.held(), 1);
}

#[test]
fn history_without_the_hole_skips_it_and_delivers_what_is_held() {
    let t0 = Instant::now();
    let mut o = at(5);
    let read_at = held(&mut o, 8, t0).unwrap();
    held(&mut o, 10, t0);
    o.due_read().unwrap();
    // The window no longer reaches back to 6.
    let a = o.on_history(answer([8, 9, 10], true), read_at);
    assert_eq!(seqs(&a.deliver), [8, 10], "the held frames, in order");
    assert_eq!(a.gap, Some(Gap::Unrecoverable));
    assert_eq!(a.next_read, None);
    assert_eq!(o.held(), 0);
    assert_eq!(next(&mut o, 11, read_at), [11]);
}

#[test]
fn the_held_frame_limit_drops_while_a_repair_runs() {
    let t0 = Instant::now();
    let mut o = at(1);
    let read_at = held(&mut o, 3, t0).unwrap();
    for seq in 4..(3 + MAX_PENDING_PER_STREAM as u64) {
        assert_eq!(held(&mut o, seq, t0), None);
    }
    assert_eq!(o.held(), MAX_PENDING_PER_STREAM);
    let over = 3 + MAX_PENDING_PER_STREAM as u64;
    for seq in over..over + 5 {
        assert!(matches!(
            o.on_frame(seq, "e", &frame(seq, "e"), t0),
            Arrival::Dropped
        ));
    }
    assert_eq!(o.held(), MAX_PENDING_PER_STREAM, "nothing beyond the limit");
    // History has everything, the dropped frames included.
    o.due_read().unwrap();
    let a = o.on_history(answer(2..over + 5, false), read_at);
    assert_eq!(seqs(&a.deliver), (2..over + 5).collect::<Vec<_>>());
    assert_eq!(o.held(), 0);
}

#[test]
fn frames_dropped_during_a_read_are_read_once_more() {
    let t0 = Instant::now();
    let mut o = at(1);
    let read_at = held(&mut o, 3, t0).unwrap();
    for seq in 4..(3 + MAX_PENDING_PER_STREAM as u64) {
        assert_eq!(held(&mut o, seq, t0), None);
    }
    let over = 3 + MAX_PENDING_PER_STREAM as u64;
    for seq in over..over + 5 {
        assert!(matches!(
            o.on_frame(seq, "e", &frame(seq, "e"), t0),
            Arrival::Dropped
        ));
    }
    // The read was answered before the dropped frames were stored: it
    // fills every hole and leaves nothing held, yet they are still missing.
    o.due_read().unwrap();
    let a = o.on_history(answer(2..over, false), read_at);
    assert_eq!(seqs(&a.deliver), (2..over).collect::<Vec<_>>());
    assert_eq!(o.held(), 0);
    let again = a.next_read.expect("the dropped frames are read once more");
    let read = o.due_read().expect("a read with nothing held");
    assert_eq!(read.since, over - 1);
    let b = o.on_history(answer(2..over + 5, false), again);
    assert_eq!(seqs(&b.deliver), (over..over + 5).collect::<Vec<_>>());
    assert_eq!(b.next_read, None, "then the repair is over");
}

#[test]
fn a_history_outage_backs_off_up_to_the_cap_then_skips() {
    let t0 = Instant::now();
    let mut o = at(5);
    let mut now = held(&mut o, 7, t0).unwrap();
    let mut reads = vec![now - t0];
    for _ in 0..MAX_OUTAGE_RETRIES {
        assert!(o.due_read().is_some());
        let a = o.on_history(DOWN, now);
        assert_eq!(a.gap, Some(Gap::Retried));
        assert!(a.deliver.is_empty());
        assert_eq!(o.held(), 1, "the early frame waits out the outage");
        now = a.next_read.expect("read again");
        reads.push(now - t0);
    }
    // 200 ms, then doubling from 400 ms, capped at 2 s.
    let expected: Vec<Duration> = [200, 600, 1400, 3000, 5000, 7000, 9000, 11000, 13000]
        .into_iter()
        .map(ms)
        .collect();
    assert_eq!(reads, expected);
    assert!(o.due_read().is_some());
    let a = o.on_history(DOWN, now);
    assert_eq!(a.gap, Some(Gap::Unrecoverable), "retries spent: skip");
    assert_eq!(seqs(&a.deliver), [7]);
    assert_eq!(a.next_read, None);
}

#[test]
fn history_back_during_the_backoff_repairs_the_hole() {
    let t0 = Instant::now();
    let mut o = at(5);
    let mut now = held(&mut o, 7, t0).unwrap();
    for _ in 0..3 {
        o.due_read().unwrap();
        now = o.on_history(DOWN, now).next_read.unwrap();
    }
    o.due_read().unwrap();
    let a = o.on_history(answer([6, 7], false), now);
    assert_eq!(seqs(&a.deliver), [6, 7]);
    assert_eq!(a.gap, Some(Gap::Repaired));
    // A later repair starts its back-off afresh.
    let mut now = held(&mut o, 9, now).unwrap();
    o.due_read().unwrap();
    let before = now;
    now = o.on_history(DOWN, now).next_read.unwrap();
    assert_eq!(now - before, ms(400));
}

#[test]
fn an_outage_with_the_held_limit_reached_skips_at_once() {
    let t0 = Instant::now();
    let mut o = at(1);
    let read_at = held(&mut o, 3, t0).unwrap();
    for seq in 4..(3 + MAX_PENDING_PER_STREAM as u64) {
        held(&mut o, seq, t0);
    }
    o.due_read().unwrap();
    let a = o.on_history(DOWN, read_at);
    assert_eq!(a.gap, Some(Gap::Unrecoverable));
    assert_eq!(a.deliver.len(), MAX_PENDING_PER_STREAM);
    assert_eq!(a.next_read, None);
}

/// A history answer of epoch `epoch` holding `seqs`, flagged for re-sync
/// as a read from before the epoch's first seq is.
fn answer_in(epoch: &str, seqs: impl IntoIterator<Item = u64>) -> Result<Recovery, ()> {
    let frames: Vec<SharedFrame> = seqs.into_iter().map(|s| frame(s, epoch)).collect();
    Ok(Recovery {
        position: StreamPosition {
            seq: frames
                .last()
                .map_or(0, |f| f.delivery_position().unwrap().1),
            epoch: epoch.into(),
            recovered: frames.len() as u32,
            resync_required: true,
        },
        frames,
    })
}

#[test]
fn a_new_epoch_at_seq_one_restarts_the_stream_and_forgets_held_frames() {
    let t0 = Instant::now();
    let mut o = at(5);
    assert_eq!(next(&mut o, 6, t0), [6]);
    held(&mut o, 9, t0);
    assert_eq!(o.held(), 1);
    // History was reset: the new epoch starts at seq 1.
    match o.on_frame(1, "new", &frame(1, "new"), t0) {
        Arrival::Next { released } => assert!(released.is_empty()),
        other => panic!("expected Next, got {other:?}"),
    }
    assert_eq!(o.held(), 0, "frames of the old epoch are dropped");
    assert!(matches!(
        o.on_frame(1, "new", &frame(1, "new"), t0),
        Arrival::Duplicate
    ));
    assert!(matches!(
        o.on_frame(2, "new", &frame(2, "new"), t0),
        Arrival::Next { .. }
    ));
    // The running repair finds nothing left and ends.
    assert_eq!(o.due_read(), None);
}

#[test]
fn a_fenced_epoch_starts_where_history_says_whatever_arrives_first() {
    // A failover fenced the stream at seq 32: its new epoch goes on at 33.
    // Two routers published 33 and 34; 34 arrives first.
    let t0 = Instant::now();
    let mut o = at(30);
    assert_eq!(next(&mut o, 31, t0), [31]);
    match o.on_frame(34, "new", &frame(34, "new"), t0) {
        Arrival::Held { repair_at } => assert_eq!(repair_at, Some(t0), "read at once"),
        other => panic!("expected Held, got {other:?}"),
    }
    assert!(matches!(
        o.on_frame(33, "new", &frame(33, "new"), t0),
        Arrival::Held { repair_at: None }
    ));
    assert_eq!(
        o.due_read(),
        Some(HistoryRead {
            since: 0,
            epoch: "new".into()
        })
    );
    // History has the new epoch from 33: both go out, in order, once.
    let a = o.on_history(answer_in("new", [33, 34]), t0);
    assert_eq!(seqs(&a.deliver), [33, 34]);
    assert_eq!(a.next_read, None);
    assert!(matches!(
        o.on_frame(35, "new", &frame(35, "new"), t0),
        Arrival::Next { .. }
    ));
    // History down first: the start is read again, not given up.
    let mut o = at(30);
    o.on_frame(34, "new", &frame(34, "new"), t0);
    o.due_read().unwrap();
    let a = o.on_history(DOWN, t0);
    assert_eq!(a.gap, Some(Gap::Retried));
    o.due_read().unwrap();
    let a = o.on_history(answer_in("new", [33, 34]), t0 + ms(400));
    assert_eq!(seqs(&a.deliver), [33, 34]);
}

#[test]
fn a_stream_known_empty_expects_seq_one() {
    let t0 = Instant::now();
    // History had nothing: the first seq is 1, whatever arrives first.
    let mut o = StreamOrder::new();
    o.on_position(0, "");
    match o.on_frame(2, "e1", &frame(2, "e1"), t0) {
        Arrival::Held { repair_at } => assert!(repair_at.is_some()),
        other => panic!("seq 1 is missing, expected Held, got {other:?}"),
    }
    assert_eq!(
        o.due_read(),
        Some(HistoryRead {
            since: 0,
            epoch: "e1".into()
        })
    );
    // Never read from history: the first frame sets the position.
    let mut o = StreamOrder::new();
    assert!(matches!(
        o.on_frame(40, "e1", &frame(40, "e1"), t0),
        Arrival::Next { .. }
    ));
    assert!(matches!(
        o.on_frame(42, "e1", &frame(42, "e1"), t0),
        Arrival::Held { .. }
    ));
}

#[test]
fn a_possible_loss_reads_history_with_nothing_held() {
    let t0 = Instant::now();
    let mut o = at(5);
    assert_eq!(next(&mut o, 6, t0), [6]);
    assert_eq!(o.on_possible_loss(t0), Some(t0), "read at once");
    assert_eq!(o.on_possible_loss(t0), None, "one repair at a time");
    assert_eq!(o.due_read().unwrap().since, 6);
    // The bus lost 7 and 8 and nothing arrived after them.
    let a = o.on_history(answer([7, 8], false), t0);
    assert_eq!(seqs(&a.deliver), [7, 8]);
    assert_eq!(a.gap, Some(Gap::Repaired));
    assert_eq!(a.next_read, None);
    // Nothing was lost: one read, no repair counted.
    assert_eq!(o.on_possible_loss(t0), Some(t0));
    o.due_read().unwrap();
    let a = o.on_history(answer([], false), t0);
    assert_eq!((a.gap, a.next_read), (None, None));
}

/// Issue #19: a stream joined before its first message (no history, no
/// epoch) whose seq 1 the bus lost. The sweep after the loss must read it.
#[test]
fn a_possible_loss_reads_a_stream_without_an_epoch() {
    let t0 = Instant::now();
    let mut o = StreamOrder::new();
    o.on_position(0, "");
    assert_eq!(o.on_possible_loss(t0), Some(t0));
    let read = o.due_read().expect("a stream without history is read too");
    assert_eq!(read.since, 0);
    assert_eq!(read.epoch, "");
    let a = o.on_history(answer([1], false), t0);
    assert_eq!(seqs(&a.deliver), [1]);
    assert_eq!((a.gap, a.next_read), (Some(Gap::Repaired), None));
    // It took the epoch of its history: the next live frame follows on.
    assert_eq!(next(&mut o, 2, t0), [2]);
    // With still nothing in history, the read finds nothing and ends.
    let mut o = StreamOrder::new();
    o.on_position(0, "");
    assert_eq!(o.on_possible_loss(t0), Some(t0));
    o.due_read().unwrap();
    let nothing = Ok::<_, ()>(Recovery {
        position: StreamPosition::default(),
        frames: Vec::new(),
    });
    let a = o.on_history(nothing, t0);
    assert_eq!((a.deliver.len(), a.gap, a.next_read), (0, None, None));
    assert_eq!(o.on_possible_loss(t0), Some(t0), "the repair is over");
}

#[test]
fn a_position_check_finds_a_lost_last_message() {
    let t0 = Instant::now();
    let mut o = at(5);
    assert_eq!(next(&mut o, 6, t0), [6]);
    assert!(!o.behind(6, "e"), "history stands where the stream does");
    assert!(!o.behind(0, ""), "no history");
    assert_eq!(o.on_behind(6, "e", t0), None);
    // Seq 7 was stored and its frame lost; nothing followed it.
    assert!(o.behind(7, "e"));
    assert_eq!(o.on_behind(7, "e", t0), Some(t0));
    assert_eq!(o.on_behind(7, "e", t0), None, "one repair at a time");
    assert_eq!(o.due_read().unwrap().since, 6);
    let a = o.on_history(answer([7], false), t0);
    assert_eq!((seqs(&a.deliver), a.next_read), (vec![7], None));
    assert!(!o.behind(7, "e"));
    // A stream without history when it was joined: any seq is ahead.
    let mut o = StreamOrder::new();
    o.on_position(0, "");
    assert!(o.behind(1, "e"));
    assert_eq!(o.on_behind(1, "e", t0), Some(t0));
    o.due_read().unwrap();
    let a = o.on_history(answer([1], false), t0);
    assert_eq!(seqs(&a.deliver), [1]);
    assert!(!o.behind(1, "e"));
}

#[test]
fn a_sweep_read_that_finds_history_down_is_tried_again() {
    let t0 = Instant::now();
    let mut o = at(5);
    assert_eq!(o.on_possible_loss(t0), Some(t0));
    assert_eq!(o.due_read().unwrap().since, 5);
    let a = o.on_history(DOWN, t0);
    assert_eq!(a.gap, Some(Gap::Retried));
    let again = a.next_read.expect("read again after the back-off");
    // Nothing is held: the read is still owed to the sweep.
    assert_eq!(o.due_read().expect("read with nothing held").since, 5);
    let a = o.on_history(answer([6], false), again);
    assert_eq!((seqs(&a.deliver), a.next_read), (vec![6], None));
}

#[test]
fn a_stream_still_joining_is_left_to_its_own_read() {
    let t0 = Instant::now();
    // Joined, its history read not back yet: the read will seed it, and a
    // read since 0 now would hand the whole window to its sockets.
    let mut o = StreamOrder::new();
    assert!(!o.behind(7, "e"));
    assert_eq!(o.on_behind(7, "e", t0), None);
    assert_eq!(o.on_possible_loss(t0), Some(t0));
    assert_eq!(o.due_read(), None);
}

#[test]
fn a_position_check_in_another_epoch_reads_where_it_starts() {
    let t0 = Instant::now();
    let mut o = at(5);
    // A failover fenced the stream at 32 and its new epoch's first frame,
    // 33, was lost: history is in epoch "new", nothing arrived of it.
    assert!(o.behind(33, "new"));
    assert_eq!(o.on_behind(33, "new", t0), Some(t0));
    let read = o.due_read().unwrap();
    assert_eq!((read.since, read.epoch.as_str()), (0, "new"));
    let a = o.on_history(answer_in("new", [33]), t0);
    assert_eq!(seqs(&a.deliver), [33]);
    assert_eq!(a.next_read, None);
    assert!(!o.behind(33, "new"));
}

#[test]
fn a_check_past_the_window_delivers_what_it_holds_and_catches_up() {
    let t0 = Instant::now();
    let mut o = at(5);
    // 6..=9 were lost and the window now starts at 8.
    assert_eq!(o.on_behind(9, "e", t0), Some(t0));
    o.due_read().unwrap();
    let a = o.on_history(answer([8, 9], true), t0);
    assert_eq!(seqs(&a.deliver), [8, 9], "the client sees the skip now");
    assert_eq!(a.gap, Some(Gap::Unrecoverable));
    assert!(!o.behind(9, "e"), "the next check finds nothing to do");
    assert_eq!(next(&mut o, 10, t0), [10]);
}

#[test]
fn a_loss_during_a_repair_is_read_by_it_or_by_one_more_read() {
    let t0 = Instant::now();
    // Reported while the repair waits for its read: that read covers it,
    // even once the hole filled itself and nothing is held.
    let mut o = at(5);
    assert_eq!(held(&mut o, 7, t0), Some(t0 + GAP_TIMEOUT));
    assert_eq!(next(&mut o, 6, t0), [6, 7]);
    assert_eq!(o.on_possible_loss(t0), None);
    assert_eq!(o.due_read().unwrap().since, 7, "read with nothing held");
    let a = o.on_history(answer([8], false), t0);
    assert_eq!((seqs(&a.deliver), a.next_read), (vec![8], None));
    // Reported while a read is on its way: the read may predate the loss,
    // so one more follows.
    let mut o = at(5);
    assert_eq!(held(&mut o, 7, t0), Some(t0 + GAP_TIMEOUT));
    assert_eq!(o.due_read().unwrap().since, 5);
    assert_eq!(o.on_possible_loss(t0), None);
    let a = o.on_history(answer([6, 7], false), t0);
    assert_eq!(seqs(&a.deliver), [6, 7]);
    assert_eq!(a.next_read, Some(t0 + GAP_TIMEOUT));
    assert_eq!(o.due_read().unwrap().since, 7);
    let a = o.on_history(answer([8, 9], false), t0);
    assert_eq!((seqs(&a.deliver), a.next_read), (vec![8, 9], None));
}
