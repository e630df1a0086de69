//! The chaos checker: pure logic over what the clients recorded, run
//! after the traffic stops (ADR 0041). No sockets, no clocks.
//!
//! Input: every publisher's acks, every socket's deliveries in arrival
//! order and the streams it was told to re-sync, and the presence each
//! user should have at the end next to the one the cluster reports.
//!
//! The verdict, per stream: every acked message reached every socket that
//! follows the stream exactly once, in seq order, or that socket was told
//! `resyncRequired` for the stream (counted, not a failure); no (stream,
//! epoch, seq) names two different messages; no delivery reached a socket
//! that does not follow its stream (another user's personal stream, a
//! chat it never joined); presence ends as it should.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

/// How many findings of each kind the verdict lists as examples.
const EXAMPLES: usize = 5;

/// A stream: `chat:<id>` or `user:<id>` (a personal stream).
pub(crate) type Stream = String;

/// What identifies a message apart from its seq: who sent it, the
/// client's message id, and a hash of its payload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub(crate) struct Msg {
    pub(crate) sender: String,
    pub(crate) client_msg_id: String,
    pub(crate) payload_hash: u64,
}

/// A publish that was acked.
#[derive(Debug, Clone)]
pub(crate) struct Ack {
    pub(crate) stream: Stream,
    /// The epoch, when the ack carried one (a `PublishAck` does not: the
    /// seq is then checked against what sockets received).
    pub(crate) epoch: Option<String>,
    pub(crate) seq: u64,
    pub(crate) msg: Msg,
}

/// A message as one socket received it.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub(crate) stream: Stream,
    pub(crate) epoch: String,
    pub(crate) seq: u64,
    pub(crate) msg: Msg,
}

/// One socket's whole life (across reconnects: the client's session).
#[derive(Debug, Clone, Default)]
pub(crate) struct SocketHistory {
    pub(crate) socket: String,
    pub(crate) user: String,
    /// Streams it followed from before the traffic started (its own
    /// personal stream included).
    pub(crate) follows: BTreeSet<Stream>,
    /// In arrival order.
    pub(crate) deliveries: Vec<Delivery>,
    /// Streams it was told to re-sync.
    pub(crate) resync: BTreeSet<Stream>,
}

/// A user's presence at the end.
#[derive(Debug, Clone)]
pub(crate) struct PresenceEnd {
    pub(crate) user: String,
    /// Whether a socket of the user is still open.
    pub(crate) expected_online: bool,
    /// What the cluster says.
    pub(crate) online: bool,
}

/// Everything the run recorded.
#[derive(Debug, Clone, Default)]
pub(crate) struct Histories {
    pub(crate) acks: Vec<Ack>,
    pub(crate) sockets: Vec<SocketHistory>,
    pub(crate) presence: Vec<PresenceEnd>,
}

/// The checker's counts, and a few examples of each finding.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) acked: u64,
    /// (acked message, socket that follows its stream) pairs.
    pub(crate) expected: u64,
    /// Of those, received.
    pub(crate) delivered: u64,
    /// Of those, not received and not excused by a re-sync.
    pub(crate) lost: u64,
    /// Of those, not received by a socket told to re-sync the stream.
    pub(crate) excused_by_resync: u64,
    /// (socket, stream) pairs told to re-sync.
    pub(crate) resync_streams: u64,
    /// Deliveries of a message the socket already had (same sender and
    /// client message id in the same stream), whatever their seq.
    pub(crate) duplicated: u64,
    /// Of those, the ones in a later epoch of a stream the socket was told
    /// to re-sync (history lost its de-duplication record with the rest):
    /// counted, not failures.
    pub(crate) duplicated_across_resync: u64,
    /// Deliveries whose seq is below one the socket already had in that
    /// stream and epoch.
    pub(crate) reordered: u64,
    /// Deliveries to a socket that does not follow their stream.
    pub(crate) foreign: u64,
    /// (stream, epoch, seq) that name two different messages, and acked
    /// messages delivered under another seq than their ack's.
    pub(crate) conflicting_seqs: u64,
    /// Users whose presence at the end is not what it should be.
    pub(crate) presence_mismatches: u64,
    /// The first few findings, for a human.
    pub(crate) examples: Vec<String>,
}

impl Verdict {
    /// Nothing lost, duplicated, reordered, foreign or conflicting, and
    /// presence consistent. Re-syncs are counted, not failures.
    pub(crate) fn passed(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.reordered == 0
            && self.foreign == 0
            && self.conflicting_seqs == 0
            && self.presence_mismatches == 0
    }

    fn note(&mut self, kind: &str, seen: u64, text: impl FnOnce() -> String) {
        if seen <= EXAMPLES as u64 {
            self.examples.push(format!("{kind}: {}", text()));
        }
    }
}

/// The personal stream of `user`.
pub(crate) fn user_stream(user: &str) -> Stream {
    format!("user:{user}")
}

/// The stream of chat `chat`.
pub(crate) fn chat_stream(chat: &str) -> Stream {
    format!("chat:{chat}")
}

/// Judges the histories.
pub(crate) fn check(h: &Histories) -> Verdict {
    let mut v = Verdict {
        acked: h.acks.len() as u64,
        ..Verdict::default()
    };
    // Conflicts: every (stream, epoch, seq) must name one message.
    let mut named: HashMap<(&str, &str, u64), &Msg> = HashMap::new();
    let mut conflicted: HashSet<(&str, &str, u64)> = HashSet::new();
    let mut seen_conflicts = 0u64;
    let all_named = h
        .acks
        .iter()
        .filter_map(|a| Some((a.stream.as_str(), a.epoch.as_deref()?, a.seq, &a.msg)))
        .chain(h.sockets.iter().flat_map(|s| {
            s.deliveries
                .iter()
                .map(|d| (d.stream.as_str(), d.epoch.as_str(), d.seq, &d.msg))
        }));
    for (stream, epoch, seq, msg) in all_named {
        match named.get(&(stream, epoch, seq)) {
            None => {
                named.insert((stream, epoch, seq), msg);
            }
            Some(first) if *first != msg && conflicted.insert((stream, epoch, seq)) => {
                seen_conflicts += 1;
                v.conflicting_seqs += 1;
                let first = (*first).clone();
                v.note("conflicting seq", seen_conflicts, || {
                    format!("{stream} epoch {epoch} seq {seq} names {first:?} and {msg:?}")
                });
            }
            Some(_) => {}
        }
    }

    // Per socket: foreign deliveries, duplicates and order.
    let mut seen = [0u64; 3];
    for s in &h.sockets {
        // Each message's epoch where the socket first got it.
        let mut had: HashMap<(&str, &Msg), &str> = HashMap::new();
        let mut last: HashMap<&str, (&str, u64)> = HashMap::new();
        for d in &s.deliveries {
            if !s.follows.contains(&d.stream) {
                v.foreign += 1;
                seen[0] += 1;
                v.note("foreign", seen[0], || {
                    format!(
                        "{} of {} got {} seq {} ({:?})",
                        s.socket, s.user, d.stream, d.seq, d.msg
                    )
                });
                continue;
            }
            if let Some(first) = had.get(&(d.stream.as_str(), &d.msg)) {
                if *first != d.epoch && s.resync.contains(&d.stream) {
                    v.duplicated_across_resync += 1;
                    continue;
                }
                v.duplicated += 1;
                seen[1] += 1;
                v.note("duplicated", seen[1], || {
                    format!(
                        "{} got {} {:?} again (seq {})",
                        s.socket, d.stream, d.msg, d.seq
                    )
                });
                continue;
            }
            had.insert((d.stream.as_str(), &d.msg), d.epoch.as_str());
            match last.get(d.stream.as_str()) {
                Some((epoch, seq)) if *epoch == d.epoch && d.seq <= *seq => {
                    v.reordered += 1;
                    seen[2] += 1;
                    let prev = *seq;
                    v.note("reordered", seen[2], || {
                        format!(
                            "{} got {} seq {} after seq {prev}",
                            s.socket, d.stream, d.seq
                        )
                    });
                }
                _ => {
                    last.insert(d.stream.as_str(), (d.epoch.as_str(), d.seq));
                }
            }
        }
        v.resync_streams += s.resync.len() as u64;
    }

    // Every acked message at every socket that follows its stream.
    let mut followers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, s) in h.sockets.iter().enumerate() {
        for stream in &s.follows {
            followers.entry(stream.as_str()).or_default().push(i);
        }
    }
    // What each socket got per stream: message → seqs it came under.
    let got: Vec<HashMap<(&str, &Msg), BTreeSet<u64>>> = h
        .sockets
        .iter()
        .map(|s| {
            let mut m: HashMap<(&str, &Msg), BTreeSet<u64>> = HashMap::new();
            for d in &s.deliveries {
                m.entry((d.stream.as_str(), &d.msg))
                    .or_default()
                    .insert(d.seq);
            }
            m
        })
        .collect();
    let (mut seen_lost, mut seen_mismatch) = (0u64, 0u64);
    let mut mismatched: HashSet<(&str, &Msg)> = HashSet::new();
    for a in &h.acks {
        for &i in followers
            .get(a.stream.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let s = &h.sockets[i];
            v.expected += 1;
            match got[i].get(&(a.stream.as_str(), &a.msg)) {
                Some(seqs) => {
                    v.delivered += 1;
                    // Delivered under another seq than acked: two names
                    // for one message (unless the stream was re-synced:
                    // a new epoch may number it anew).
                    if !seqs.contains(&a.seq)
                        && !s.resync.contains(&a.stream)
                        && mismatched.insert((a.stream.as_str(), &a.msg))
                    {
                        v.conflicting_seqs += 1;
                        seen_mismatch += 1;
                        v.note("acked under another seq", seen_mismatch, || {
                            format!(
                                "{} {:?} acked as seq {}, delivered to {} as {seqs:?}",
                                a.stream, a.msg, a.seq, s.socket
                            )
                        });
                    }
                }
                None if s.resync.contains(&a.stream) => v.excused_by_resync += 1,
                None => {
                    v.lost += 1;
                    seen_lost += 1;
                    v.note("lost", seen_lost, || {
                        format!(
                            "{} never got {} seq {} {:?}",
                            s.socket, a.stream, a.seq, a.msg
                        )
                    });
                }
            }
        }
    }

    let mut seen_presence = 0u64;
    for p in &h.presence {
        if p.expected_online != p.online {
            v.presence_mismatches += 1;
            seen_presence += 1;
            v.note("presence", seen_presence, || {
                format!(
                    "{} is {} but should be {}",
                    p.user,
                    if p.online { "online" } else { "offline" },
                    if p.expected_online {
                        "online"
                    } else {
                        "offline"
                    }
                )
            });
        }
    }
    v
}

/// Counts by name, for the report's counters.
pub(crate) fn counters(v: &Verdict) -> BTreeMap<&'static str, u64> {
    BTreeMap::from([
        ("acked", v.acked),
        ("expected", v.expected),
        ("delivered", v.delivered),
        ("lost", v.lost),
        ("excused_by_resync", v.excused_by_resync),
        ("resync_streams", v.resync_streams),
        ("duplicated", v.duplicated),
        ("duplicated_across_resync", v.duplicated_across_resync),
        ("reordered", v.reordered),
        ("foreign", v.foreign),
        ("conflicting_seqs", v.conflicting_seqs),
        ("presence_mismatches", v.presence_mismatches),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(sender: &str, id: &str) -> Msg {
        Msg {
            sender: sender.into(),
            client_msg_id: id.into(),
            payload_hash: id.len() as u64 * 31 + 7,
        }
    }

    fn ack(stream: &str, seq: u64, m: &Msg) -> Ack {
        Ack {
            stream: stream.into(),
            epoch: None,
            seq,
            msg: m.clone(),
        }
    }

    fn d(stream: &str, seq: u64, m: &Msg) -> Delivery {
        Delivery {
            stream: stream.into(),
            epoch: "e1".into(),
            seq,
            msg: m.clone(),
        }
    }

    /// Alice and Bob in chat g: Alice sends three messages, Bob one DM to
    /// Alice; both sockets get everything in order. Carol is online.
    fn clean() -> Histories {
        let g = chat_stream("g");
        let (m1, m2, m3) = (msg("alice", "a1"), msg("alice", "a2"), msg("alice", "a3"));
        let dm = msg("bob", "b1");
        let to_alice = user_stream("alice");
        let mut h = Histories {
            acks: vec![
                ack(&g, 1, &m1),
                ack(&g, 2, &m2),
                ack(&g, 3, &m3),
                ack(&to_alice, 1, &dm),
            ],
            ..Histories::default()
        };
        for (user, extra) in [("alice", vec![d(&to_alice, 1, &dm)]), ("bob", vec![])] {
            let mut deliveries = vec![d(&g, 1, &m1), d(&g, 2, &m2), d(&g, 3, &m3)];
            deliveries.extend(extra);
            h.sockets.push(SocketHistory {
                socket: format!("{user}-0"),
                user: user.into(),
                follows: [g.clone(), user_stream(user)].into(),
                deliveries,
                resync: BTreeSet::new(),
            });
        }
        h.sockets.push(SocketHistory {
            socket: "carol-0".into(),
            user: "carol".into(),
            follows: [user_stream("carol")].into(),
            ..SocketHistory::default()
        });
        h.presence = vec![
            PresenceEnd {
                user: "carol".into(),
                expected_online: true,
                online: true,
            },
            PresenceEnd {
                user: "gone".into(),
                expected_online: false,
                online: false,
            },
        ];
        h
    }

    fn bob(h: &mut Histories) -> &mut SocketHistory {
        &mut h.sockets[1]
    }

    #[test]
    fn a_clean_history_passes() {
        let v = check(&clean());
        assert!(v.passed(), "{v:?}");
        assert_eq!((v.acked, v.expected, v.delivered), (4, 7, 7));
        assert!(v.examples.is_empty());
    }

    #[test]
    fn a_lost_message_is_caught() {
        let mut h = clean();
        bob(&mut h).deliveries.remove(1);
        let v = check(&h);
        assert!(!v.passed());
        assert_eq!((v.lost, v.delivered), (1, 6), "{v:?}");
        assert!(v.examples[0].starts_with("lost: bob-0"), "{:?}", v.examples);
    }

    #[test]
    fn a_loss_the_socket_was_told_to_resync_is_counted_not_failed() {
        let mut h = clean();
        let b = bob(&mut h);
        b.deliveries.remove(1);
        b.resync.insert(chat_stream("g"));
        let v = check(&h);
        assert!(v.passed(), "{v:?}");
        assert_eq!((v.lost, v.excused_by_resync, v.resync_streams), (0, 1, 1));
    }

    #[test]
    fn a_duplicated_message_is_caught_whatever_its_seq() {
        let mut h = clean();
        let again = bob(&mut h).deliveries[1].clone();
        bob(&mut h).deliveries.push(again.clone());
        assert_eq!(check(&h).duplicated, 1);
        // The same message again under a new seq (a retry sequenced twice).
        let mut h = clean();
        bob(&mut h).deliveries.push(Delivery {
            seq: 4,
            ..again.clone()
        });
        let v = check(&h);
        assert!(!v.passed());
        assert_eq!(v.duplicated, 1, "{v:?}");
        // Again in a new epoch, but the socket was never told to re-sync.
        let mut h = clean();
        let e2 = Delivery {
            seq: 1,
            epoch: "e2".into(),
            ..again.clone()
        };
        bob(&mut h).deliveries.push(e2.clone());
        assert_eq!(check(&h).duplicated, 1);
        // Told to re-sync: history lost the first epoch (and the record
        // that de-duplicates the retry); counted apart.
        bob(&mut h).resync.insert(chat_stream("g"));
        let v = check(&h);
        assert!(v.passed(), "{v:?}");
        assert_eq!((v.duplicated, v.duplicated_across_resync), (0, 1));
    }

    #[test]
    fn a_reordered_message_is_caught() {
        let mut h = clean();
        bob(&mut h).deliveries.swap(1, 2);
        let v = check(&h);
        assert!(!v.passed());
        assert_eq!((v.reordered, v.lost, v.duplicated), (1, 0, 0), "{v:?}");
    }

    #[test]
    fn a_foreign_delivery_is_caught() {
        let mut h = clean();
        // Alice's personal message on Bob's socket.
        let dm = h.sockets[0].deliveries[3].clone();
        bob(&mut h).deliveries.push(dm);
        // And a chat Carol never joined on Carol's socket.
        let post = h.sockets[0].deliveries[0].clone();
        h.sockets[2].deliveries.push(post);
        let v = check(&h);
        assert!(!v.passed());
        assert_eq!(v.foreign, 2, "{v:?}");
    }

    #[test]
    fn a_seq_used_twice_is_caught() {
        let mut h = clean();
        // Bob's seq 2 names another message than Alice's seq 2.
        let other = msg("mallory", "x");
        bob(&mut h).deliveries[1].msg = other;
        let v = check(&h);
        assert!(!v.passed());
        assert_eq!(v.conflicting_seqs, 1, "{v:?}");
        // The same seq in another epoch is another name: no conflict.
        let mut h = clean();
        let b = bob(&mut h);
        b.deliveries[1].msg = msg("mallory", "x");
        b.deliveries[1].epoch = "e2".into();
        b.resync.insert(chat_stream("g"));
        assert_eq!(check(&h).conflicting_seqs, 0);
    }

    #[test]
    fn an_acked_message_delivered_under_another_seq_is_caught() {
        let mut h = clean();
        h.acks[1].seq = 7;
        let v = check(&h);
        assert!(!v.passed());
        assert_eq!(v.conflicting_seqs, 1, "{v:?}");
    }

    #[test]
    fn an_acked_epoch_naming_another_message_is_caught() {
        let mut h = clean();
        h.acks.push(Ack {
            stream: chat_stream("g"),
            epoch: Some("e1".into()),
            seq: 3,
            msg: msg("mallory", "y"),
        });
        assert_eq!(check(&h).conflicting_seqs, 1);
    }

    #[test]
    fn someone_online_who_is_gone_is_caught() {
        let mut h = clean();
        h.presence[1].online = true;
        let v = check(&h);
        assert!(!v.passed());
        assert_eq!(v.presence_mismatches, 1);
        assert!(v.examples[0].contains("gone is online"), "{:?}", v.examples);
    }
}
