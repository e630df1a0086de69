//! Per-stream positions: de-duplication of deliveries and the `since` the
//! client resumes from.
//!
//! Seqs of a stream start at 1 and are contiguous within an epoch. The
//! client keeps the last seq it handed to the app per stream; a delivery at
//! or below it is a duplicate (at-least-once on the wire becomes
//! exactly-once for the app), one further ahead than the next seq is a hole
//! the app must re-sync, and a new epoch means the server lost history.
use std::collections::HashMap;

use super::event::{Cursor, Event, Positions, StreamId};
use crate::v1::{Delivery, StreamPosition};

/// What to do with a delivery.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Hand it to the app. `hole` is the last seq seen before a gap (or
    /// before an epoch change), which the app must re-sync.
    New { hole: Option<u64> },
    /// Seen before: drop it.
    Duplicate,
}

#[derive(Debug, Default)]
struct Entry {
    cursor: Cursor,
    /// A resync was already reported for the hole before the next
    /// delivery; do not report it twice.
    hole_reported: bool,
}

/// Positions of the personal stream and of every subscribed chat.
#[derive(Debug, Default)]
pub(super) struct Cursors {
    personal: Entry,
    chats: HashMap<String, Entry>,
}

impl Cursors {
    /// Starts with the personal stream at `personal` and no chats.
    pub(super) fn new(personal: Cursor) -> Self {
        Cursors {
            personal: Entry {
                cursor: personal,
                hole_reported: false,
            },
            chats: HashMap::new(),
        }
    }

    pub(super) fn personal(&self) -> &Cursor {
        &self.personal.cursor
    }

    /// The followed chats and their cursors, to re-subscribe.
    pub(super) fn chats(&self) -> impl Iterator<Item = (&String, &Cursor)> {
        self.chats.iter().map(|(c, e)| (c, &e.cursor))
    }

    /// Stops following a chat (unsubscribed, or refused on resubscribe).
    pub(super) fn forget(&mut self, chat: &str) {
        self.chats.remove(chat);
    }

    pub(super) fn snapshot(&self) -> Positions {
        Positions {
            personal: self.personal.cursor.clone(),
            chats: self
                .chats
                .iter()
                .map(|(c, e)| (c.clone(), e.cursor.clone()))
                .collect(),
        }
    }

    /// Takes the position from a ConnectResult (personal stream) or a
    /// SubscribeResult (a chat, which from now on is followed). `since` is
    /// what the request asked for. Returns a `ResyncRequired` event when
    /// the server could not recover everything after `since`.
    pub(super) fn on_position(
        &mut self,
        stream: &StreamId,
        since: Option<u64>,
        pos: &StreamPosition,
    ) -> Option<Event> {
        let seq = match since {
            // Live only: the next delivery is the one after the stream's seq.
            None => pos.seq,
            // Nothing is recovered: live deliveries follow the stream's seq.
            Some(_) if pos.resync_required && pos.recovered == 0 => pos.seq,
            // The recovered deliveries (seq > since) follow this result; with
            // a hole, the first of them is further ahead than since + 1.
            Some(s) => s,
        };
        let hole = pos.resync_required && since.is_some();
        let entry = Entry {
            cursor: Cursor {
                seq,
                epoch: pos.epoch.clone(),
            },
            hole_reported: hole && pos.recovered > 0,
        };
        match stream {
            StreamId::Personal => self.personal = entry,
            StreamId::Chat(c) => {
                self.chats.insert(c.clone(), entry);
            }
        }
        hole.then(|| Event::ResyncRequired {
            stream: stream.clone(),
            last_seen: since.unwrap_or(0),
        })
    }

    /// Checks a delivery against its stream's cursor and advances it.
    /// Deliveries of chats the client does not follow (a race with
    /// unsubscribe) pass through untracked.
    pub(super) fn on_delivery(&mut self, d: &Delivery) -> Verdict {
        let entry = if d.chat.is_empty() {
            &mut self.personal
        } else {
            match self.chats.get_mut(&d.chat) {
                Some(e) => e,
                None => return Verdict::New { hole: None },
            }
        };
        let cur = &mut entry.cursor;
        let epoch_changed = !cur.epoch.is_empty() && !d.epoch.is_empty() && cur.epoch != d.epoch;
        let hole = if epoch_changed {
            // The server lost the history this cursor belongs to.
            Some(cur.seq)
        } else if d.seq <= cur.seq {
            return Verdict::Duplicate;
        } else if d.seq > cur.seq + 1 && !entry.hole_reported {
            Some(cur.seq)
        } else {
            None
        };
        cur.seq = d.seq;
        if !d.epoch.is_empty() {
            cur.epoch.clone_from(&d.epoch);
        }
        entry.hole_reported = false;
        Verdict::New { hole }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(c: &str, seq: u64, epoch: &str) -> Delivery {
        Delivery {
            chat: c.into(),
            seq,
            epoch: epoch.into(),
            ..Default::default()
        }
    }

    fn personal(seq: u64, epoch: &str) -> Delivery {
        Delivery {
            user: "me".into(),
            seq,
            epoch: epoch.into(),
            ..Default::default()
        }
    }

    fn pos(seq: u64, epoch: &str, recovered: u32, resync_required: bool) -> StreamPosition {
        StreamPosition {
            seq,
            epoch: epoch.into(),
            recovered,
            resync_required,
        }
    }

    const NEW: Verdict = Verdict::New { hole: None };

    #[test]
    fn drops_seqs_already_seen() {
        let mut c = Cursors::default();
        let room = StreamId::Chat("room".into());
        assert_eq!(c.on_position(&room, None, &pos(4, "e", 0, false)), None);
        assert_eq!(c.on_delivery(&chat("room", 4, "e")), Verdict::Duplicate);
        assert_eq!(c.on_delivery(&chat("room", 5, "e")), NEW);
        assert_eq!(c.on_delivery(&chat("room", 5, "e")), Verdict::Duplicate);
        assert_eq!(c.on_delivery(&chat("room", 3, "e")), Verdict::Duplicate);
        assert_eq!(c.on_delivery(&chat("room", 6, "e")), NEW);
        assert_eq!(c.snapshot().chats["room"].seq, 6);
    }

    #[test]
    fn streams_are_independent() {
        let mut c = Cursors::new(Cursor {
            seq: 2,
            epoch: "p".into(),
        });
        c.on_position(&StreamId::Chat("a".into()), None, &pos(0, "", 0, false));
        c.on_position(&StreamId::Chat("b".into()), None, &pos(0, "", 0, false));
        assert_eq!(c.on_delivery(&chat("a", 1, "x")), NEW);
        assert_eq!(c.on_delivery(&chat("b", 1, "y")), NEW);
        assert_eq!(c.on_delivery(&personal(3, "p")), NEW);
        assert_eq!(c.on_delivery(&personal(2, "p")), Verdict::Duplicate);
        assert_eq!(c.on_delivery(&chat("a", 1, "x")), Verdict::Duplicate);
        let snap = c.snapshot();
        assert_eq!(snap.personal.seq, 3);
        assert_eq!(snap.chats["a"].epoch, "x");
        assert_eq!(snap.chats["b"].epoch, "y");
    }

    #[test]
    fn recovery_from_since_accepts_everything_after_it() {
        let mut c = Cursors::default();
        let room = StreamId::Chat("room".into());
        // Resubscribe since 3; the server holds up to 6 and recovers 4..=6.
        assert_eq!(c.on_position(&room, Some(3), &pos(6, "e", 3, false)), None);
        for seq in 4..=6 {
            assert_eq!(c.on_delivery(&chat("room", seq, "e")), NEW);
        }
        assert_eq!(c.on_delivery(&chat("room", 7, "e")), NEW);
    }

    #[test]
    fn a_gap_is_reported_once_and_delivery_goes_on() {
        let mut c = Cursors::default();
        c.on_position(&StreamId::Chat("room".into()), None, &pos(1, "e", 0, false));
        assert_eq!(
            c.on_delivery(&chat("room", 4, "e")),
            Verdict::New { hole: Some(1) }
        );
        assert_eq!(c.on_delivery(&chat("room", 5, "e")), NEW);
        assert_eq!(c.on_delivery(&chat("room", 3, "e")), Verdict::Duplicate);
    }

    #[test]
    fn history_window_too_short_reports_the_hole_from_the_position() {
        let mut c = Cursors::default();
        let room = StreamId::Chat("room".into());
        // since 2, but the window starts at 8: 8..=10 are recovered.
        let ev = c.on_position(&room, Some(2), &pos(10, "e", 3, true));
        assert!(matches!(
            ev,
            Some(Event::ResyncRequired { stream: StreamId::Chat(ref s), last_seen: 2 }) if s == "room"
        ));
        // The first recovered delivery jumps ahead without a second report.
        assert_eq!(c.on_delivery(&chat("room", 8, "e")), NEW);
        assert_eq!(c.on_delivery(&chat("room", 9, "e")), NEW);
    }

    #[test]
    fn epoch_change_without_recovery_starts_from_the_new_position() {
        let mut c = Cursors::new(Cursor {
            seq: 50,
            epoch: "old".into(),
        });
        let ev = c.on_position(&StreamId::Personal, Some(50), &pos(2, "new", 0, true));
        assert!(matches!(
            ev,
            Some(Event::ResyncRequired {
                stream: StreamId::Personal,
                last_seen: 50
            })
        ));
        assert_eq!(c.personal().seq, 2);
        assert_eq!(c.personal().epoch, "new");
        assert_eq!(c.on_delivery(&personal(2, "new")), Verdict::Duplicate);
        assert_eq!(c.on_delivery(&personal(3, "new")), NEW);
    }

    #[test]
    fn a_new_epoch_on_a_delivery_is_a_hole() {
        let mut c = Cursors::default();
        c.on_position(
            &StreamId::Chat("room".into()),
            None,
            &pos(7, "old", 0, false),
        );
        assert_eq!(
            c.on_delivery(&chat("room", 1, "new")),
            Verdict::New { hole: Some(7) }
        );
        assert_eq!(c.on_delivery(&chat("room", 1, "new")), Verdict::Duplicate);
        assert_eq!(c.on_delivery(&chat("room", 2, "new")), NEW);
    }

    #[test]
    fn a_stream_without_history_gets_its_epoch_from_the_first_delivery() {
        let mut c = Cursors::default();
        c.on_position(&StreamId::Chat("idle".into()), None, &pos(0, "", 0, false));
        assert_eq!(c.on_delivery(&chat("idle", 1, "e1")), NEW);
        assert_eq!(c.snapshot().chats["idle"].epoch, "e1");
    }

    #[test]
    fn unfollowed_chats_pass_through_untracked() {
        let mut c = Cursors::default();
        c.on_position(&StreamId::Chat("room".into()), None, &pos(0, "e", 0, false));
        c.forget("room");
        assert_eq!(c.on_delivery(&chat("room", 1, "e")), NEW);
        assert_eq!(c.on_delivery(&chat("room", 1, "e")), NEW);
        assert!(c.snapshot().chats.is_empty());
    }
}
