//! The sockets of one stream, laid out for the fan-out.
//!
//! A fan-out takes a snapshot of a stream's sockets under the stream's
//! lock and writes them after releasing it (ADR 0029). Copying the
//! sockets out of a hash map cost three passes over every socket's cold
//! memory per post: an `Arc` increment per socket for the copy, the write,
//! and a decrement per socket when the copy was dropped. Here the sockets
//! of a stream with several live in one shared array, copied on write:
//! the snapshot is one reference-count increment, the fan-out reads the
//! array in order, and only a subscribe or unsubscribe that meets a
//! fan-out in progress copies it (ADR 0042).
//!
//! A socket joins at a random place in the array, so the order of a
//! post's writes does not follow the order sockets were opened in.
//!
//! Most streams (personal ones) hold one socket for their whole life:
//! that one is kept inline, and the whole type is three words.
use std::{collections::HashMap, ops::Deref, sync::Arc};

use crate::mailbox::ConnHandle;

type Index = HashMap<u64, u32, foldhash::fast::RandomState>;

#[derive(Default)]
pub(crate) enum Audience {
    #[default]
    Empty,
    One(u64, ConnHandle),
    Many(Box<Many>),
}

pub(crate) struct Many {
    /// Connection id → its place in `conns`.
    at: Index,
    conns: Arc<Vec<ConnHandle>>,
}

/// A stream's sockets as they were when taken.
#[derive(Clone)]
pub(crate) enum Snapshot {
    None,
    One(ConnHandle),
    Many(Arc<Vec<ConnHandle>>),
}

impl Deref for Snapshot {
    type Target = [ConnHandle];

    fn deref(&self) -> &[ConnHandle] {
        match self {
            Snapshot::None => &[],
            Snapshot::One(c) => std::slice::from_ref(c),
            Snapshot::Many(v) => v,
        }
    }
}

impl Audience {
    pub(crate) fn len(&self) -> usize {
        match self {
            Audience::Empty => 0,
            Audience::One(..) => 1,
            Audience::Many(m) => m.conns.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn contains_key(&self, id: &u64) -> bool {
        match self {
            Audience::Empty => false,
            Audience::One(k, _) => k == id,
            Audience::Many(m) => m.at.contains_key(id),
        }
    }

    pub(crate) fn values(&self) -> std::slice::Iter<'_, ConnHandle> {
        match self {
            Audience::Empty => [].iter(),
            Audience::One(_, c) => std::slice::from_ref(c).iter(),
            Audience::Many(m) => m.conns.iter(),
        }
    }

    /// The sockets now, for a fan-out that runs without the stream's lock.
    pub(crate) fn snapshot(&self) -> Snapshot {
        match self {
            Audience::Empty => Snapshot::None,
            Audience::One(_, c) => Snapshot::One(c.clone()),
            Audience::Many(m) => Snapshot::Many(m.conns.clone()),
        }
    }

    /// Adds (or replaces) the socket with this id.
    pub(crate) fn insert(&mut self, id: u64, conn: ConnHandle) {
        match std::mem::take(self) {
            Audience::Empty => *self = Audience::One(id, conn),
            Audience::One(k, _) if k == id => *self = Audience::One(id, conn),
            Audience::One(k, old) => {
                let mut at = Index::with_capacity_and_hasher(2, Default::default());
                at.insert(k, 0);
                at.insert(id, 1);
                let conns = Arc::new(vec![old, conn]);
                *self = Audience::Many(Box::new(Many { at, conns }));
            }
            Audience::Many(mut m) => {
                let conns = Arc::make_mut(&mut m.conns);
                match m.at.get(&id) {
                    Some(&i) => conns[i as usize] = conn,
                    None => {
                        // At a random place: sockets opened together (one
                        // client process's, one host's) are not written in
                        // one burst by every post, as a hash map's order
                        // never did either.
                        let last = conns.len();
                        conns.push(conn);
                        let at = rand::random_range(0..=last);
                        conns.swap(at, last);
                        if at != last {
                            m.at.insert(conns[last].id(), last as u32);
                        }
                        m.at.insert(id, at as u32);
                    }
                }
                *self = Audience::Many(m);
            }
        }
    }

    /// Removes the socket with this id; the last one takes its place.
    pub(crate) fn remove(&mut self, id: &u64) -> Option<ConnHandle> {
        match std::mem::take(self) {
            Audience::One(k, c) if k == *id => Some(c),
            Audience::Many(mut m) => {
                let Some(i) = m.at.remove(id) else {
                    *self = Audience::Many(m);
                    return None;
                };
                let conns = Arc::make_mut(&mut m.conns);
                let gone = conns.swap_remove(i as usize);
                if let Some(moved) = conns.get(i as usize) {
                    m.at.insert(moved.id(), i);
                }
                match conns.len() {
                    0 => {}
                    1 => {
                        let last = conns.pop().expect("one left");
                        *self = Audience::One(last.id(), last);
                    }
                    // Gives back room after a crowd left.
                    n if conns.capacity() > 4 * n.max(8) => {
                        conns.shrink_to(2 * n);
                        m.at.shrink_to(2 * n);
                        *self = Audience::Many(m);
                    }
                    _ => *self = Audience::Many(m),
                }
                Some(gone)
            }
            other => {
                *self = other;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use switchboard_protocol::Encoding;

    use super::*;

    fn conn(id: u64) -> ConnHandle {
        ConnHandle::new(id, Encoding::Protobuf, 10, 1000).0
    }

    fn ids(s: &[ConnHandle]) -> Vec<u64> {
        let mut v: Vec<u64> = s.iter().map(|c| c.id()).collect();
        v.sort();
        v
    }

    #[test]
    fn one_inline_then_an_array_and_back() {
        let mut a = Audience::default();
        assert!(a.is_empty() && a.snapshot().is_empty());
        a.insert(1, conn(1));
        assert!(matches!(a, Audience::One(1, _)));
        a.insert(2, conn(2));
        a.insert(3, conn(3));
        assert_eq!((a.len(), ids(&a.snapshot())), (3, vec![1, 2, 3]));
        assert!(a.contains_key(&2) && !a.contains_key(&4));
        assert_eq!(a.remove(&1).map(|c| c.id()), Some(1));
        assert_eq!(a.remove(&1).map(|c| c.id()), None);
        // The last socket moved into the hole is still found by its id.
        assert_eq!(a.remove(&3).map(|c| c.id()), Some(3));
        assert!(matches!(a, Audience::One(2, _)));
        assert_eq!(a.remove(&2).map(|c| c.id()), Some(2));
        assert!(matches!(a, Audience::Empty));
    }

    #[test]
    fn a_snapshot_keeps_its_sockets_while_the_stream_changes() {
        let mut a = Audience::default();
        for id in 0..100 {
            a.insert(id, conn(id));
        }
        let before = a.snapshot();
        for id in 0..50 {
            a.remove(&id);
        }
        a.insert(500, conn(500));
        assert_eq!(
            ids(&before),
            (0..100).collect::<Vec<_>>(),
            "copied on write"
        );
        let mut want: Vec<u64> = (50..100).collect();
        want.push(500);
        assert_eq!(ids(&a.snapshot()), want);
        for id in want {
            assert!(a.contains_key(&id), "{id} indexed");
        }
        // Without a snapshot outstanding, changes are made in place.
        drop(before);
        let Audience::Many(m) = &a else { panic!() };
        let ptr = Arc::as_ptr(&m.conns);
        a.remove(&60);
        let Audience::Many(m) = &a else { panic!() };
        assert_eq!(Arc::as_ptr(&m.conns), ptr);
    }

    #[test]
    fn every_socket_is_found_by_its_id_after_random_joins_and_leaves() {
        let mut a = Audience::default();
        for id in 0..1000 {
            a.insert(id, conn(id));
            if id % 3 == 0 {
                a.remove(&(id / 2));
            }
        }
        let Audience::Many(m) = &a else { panic!() };
        assert_eq!(m.at.len(), m.conns.len());
        for (i, c) in m.conns.iter().enumerate() {
            assert_eq!(m.at[&c.id()], i as u32, "{} indexed at its place", c.id());
        }
        let first: Vec<u64> = m.conns.iter().take(50).map(|c| c.id()).collect();
        assert!(first.windows(2).any(|w| w[0] > w[1]), "not in join order");
    }

    #[test]
    fn a_replaced_socket_keeps_its_place() {
        let mut a = Audience::default();
        a.insert(1, conn(1));
        a.insert(2, conn(2));
        a.insert(2, conn(2));
        assert_eq!(ids(&a.snapshot()), vec![1, 2]);
    }

    #[test]
    fn three_words() {
        assert!(std::mem::size_of::<Audience>() <= 24);
    }
}
