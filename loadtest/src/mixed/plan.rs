//! Who talks to whom in one worker, and the bookkeeping of events that
//! carry no send time.
use std::{
    collections::HashMap,
    str::FromStr,
    sync::{Mutex, atomic::AtomicU64},
};

use super::KINDS;

/// Shares of the rate, by kind.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Mix([f64; 6]);

impl FromStr for Mix {
    type Err = String;

    fn from_str(s: &str) -> Result<Mix, String> {
        let mut w = [0.0; 6];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: expected KIND=WEIGHT"))?;
            let i = KINDS
                .iter()
                .position(|n| *n == k.trim())
                .ok_or_else(|| format!("unknown kind {k:?} (kinds: {})", KINDS.join(", ")))?;
            let v: f64 = v.trim().parse().map_err(|e| format!("{part:?}: {e}"))?;
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{part:?}: weights are numbers >= 0"));
            }
            w[i] = v;
        }
        if w.iter().sum::<f64>() <= 0.0 {
            return Err("at least one weight must be above 0".into());
        }
        Ok(Mix(w))
    }
}

impl Mix {
    pub(super) fn share(&self, kind: usize) -> f64 {
        self.0[kind] / self.0.iter().sum::<f64>()
    }
}

/// Send times of events that carry none (receipts, typing, presence),
/// and how many receivers have yet to see each.
#[derive(Default)]
pub(super) struct Pending(Mutex<HashMap<String, (u64, u64)>>);

impl Pending {
    pub(super) fn expect(&self, key: String, sent_us: u64, receivers: u64) {
        if receivers > 0 {
            self.0
                .lock()
                .expect("pending lock")
                .insert(key, (sent_us, receivers));
        }
    }

    /// The send time of `key`, if a receiver was still due.
    pub(super) fn arrive(&self, key: &str) -> Option<u64> {
        let mut m = self.0.lock().expect("pending lock");
        let (sent, left) = m.get_mut(key)?;
        let sent = *sent;
        *left -= 1;
        if *left == 0 {
            m.remove(key);
        }
        Some(sent)
    }
}

/// Who is who in one worker: users `users` (global numbers) in groups of
/// `group` consecutive users, each with DM contacts nearby on a ring and
/// watching a few away users.
pub(super) struct Plan {
    pub(super) prefix: String,
    pub(super) users: std::ops::Range<u64>,
    pub(super) group: u64,
    pub(super) contacts: u64,
    pub(super) away: std::ops::Range<u64>,
    pub(super) watches: u64,
}

impl Plan {
    pub(super) fn local(&self) -> u64 {
        self.users.end - self.users.start
    }

    pub(super) fn away_local(&self) -> u64 {
        self.away.end - self.away.start
    }

    pub(super) fn name(&self, u: u64) -> String {
        format!("{}-{}", self.prefix, self.users.start + u)
    }

    pub(super) fn away_name(&self, p: u64) -> String {
        format!("{}-p{}", self.prefix, self.away.start + p)
    }

    pub(super) fn group_of(&self, u: u64) -> u64 {
        u / self.group
    }

    pub(super) fn group_name(&self, g: u64) -> String {
        // Named by its first member, so names are unique over workers.
        format!("{}-g{}", self.prefix, self.users.start + g * self.group)
    }

    pub(super) fn groups(&self) -> u64 {
        self.local().div_ceil(self.group)
    }

    /// Local numbers of `u`'s contacts: u±1, u±2, ... on the ring.
    pub(super) fn contacts_of(&self, u: u64) -> Vec<u64> {
        let n = self.local();
        let mut out = Vec::new();
        let mut d = 1;
        while (out.len() as u64) < self.contacts && d < n {
            for c in [(u + d) % n, (u + n - d) % n] {
                if c != u && !out.contains(&c) && (out.len() as u64) < self.contacts {
                    out.push(c);
                }
            }
            d += 1;
        }
        out
    }

    /// Local numbers of the away users `u` watches.
    pub(super) fn watched_by(&self, u: u64) -> Vec<u64> {
        let p = self.away_local();
        (0..self.watches.min(p)).map(|j| (u + j) % p).collect()
    }
}

/// Who is actually up, so that expectations count only live receivers.
pub(super) struct Live {
    /// Members of each group subscribed to it.
    pub(super) group_members: Vec<AtomicU64>,
    /// Users watching each away user.
    pub(super) watchers: Vec<AtomicU64>,
    /// Users subscribed to the channel.
    pub(super) channel: AtomicU64,
    /// Per user of this worker: got in (a DM to one who did not is not
    /// owed, so not lost).
    pub(super) connected: Vec<std::sync::atomic::AtomicBool>,
    /// Publishes not yet acked or refused for good (what they owe is
    /// not counted until then).
    pub(super) unanswered: AtomicU64,
    pub(super) pending: Pending,
}

#[cfg(test)]
mod tests {
    use super::super::{DM, GROUP, PRESENCE};
    use super::*;

    #[test]
    fn a_mix_parses_with_missing_kinds_as_zero() {
        let m: Mix = "dm=3, group=1".parse().unwrap();
        assert_eq!(m.share(DM), 0.75);
        assert_eq!(m.share(GROUP), 0.25);
        assert_eq!(m.share(PRESENCE), 0.0);
        assert!("dm=1,sms=2".parse::<Mix>().is_err());
        assert!("dm=0".parse::<Mix>().is_err());
        assert!("dm=-1,group=2".parse::<Mix>().is_err());
        assert!("dm".parse::<Mix>().is_err());
    }

    fn plan(users: std::ops::Range<u64>, away: std::ops::Range<u64>) -> Plan {
        Plan {
            prefix: "m".into(),
            users,
            group: 4,
            contacts: 4,
            away,
            watches: 2,
        }
    }

    #[test]
    fn contacts_are_distinct_neighbours_and_mutual() {
        let p = plan(100..110, 0..3);
        for u in 0..10 {
            let c = p.contacts_of(u);
            assert_eq!(c.len(), 4, "{u}: {c:?}");
            assert!(!c.contains(&u));
            for v in &c {
                assert!(p.contacts_of(*v).contains(&u), "{u} and {v}");
            }
        }
        // Fewer users than contacts: everyone else.
        let small = plan(0..3, 0..1);
        assert_eq!(small.contacts_of(0), [1, 2]);
        assert!(plan(0..1, 0..1).contacts_of(0).is_empty());
    }

    #[test]
    fn names_are_global_so_workers_do_not_collide() {
        let a = plan(0..10, 0..2);
        let b = plan(10..20, 2..4);
        assert_eq!(a.name(9), "m-9");
        assert_eq!(b.name(0), "m-10");
        assert_eq!(b.away_name(0), "m-p2");
        assert_eq!(a.group_name(a.group_of(9)), "m-g8");
        assert_eq!(b.group_name(b.group_of(0)), "m-g10");
        assert_eq!(a.groups(), 3, "10 users in groups of 4");
        assert_eq!(b.watched_by(1), [1, 0]);
    }

    #[test]
    fn pending_events_match_each_due_receiver_once() {
        let p = Pending::default();
        p.expect("k".into(), 5, 2);
        p.expect("none".into(), 5, 0);
        assert_eq!(p.arrive("k"), Some(5));
        assert_eq!(p.arrive("k"), Some(5));
        assert_eq!(p.arrive("k"), None);
        assert_eq!(p.arrive("none"), None);
    }
}
