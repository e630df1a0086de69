//! A map that keeps up to two entries inline and makes a table for a third.
//!
//! Most of what an edge indexes per socket or per stream has exactly one
//! entry for its whole life (a socket's personal stream, the one socket
//! of a personal stream): a `HashMap` would allocate a table for it
//! (ADR 0030). A socket in one chat besides its personal stream has two:
//! the fan-out looks its stream up per delivery, and a table there cost a
//! hash and a cache miss per socket (ADR 0042). The inline pair takes no
//! more room than the table's header did.
use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash},
};

#[derive(Default)]
pub(crate) enum InlineMap<K, V, S> {
    #[default]
    Empty,
    One(K, V),
    Two([(K, V); 2]),
    Many(HashMap<K, V, S>),
}

impl<K: Eq + Hash, V, S: BuildHasher + Default> InlineMap<K, V, S> {
    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        match self {
            InlineMap::Empty => None,
            InlineMap::One(k, v) => (k == key).then_some(v),
            InlineMap::Two([(k0, v0), (k1, v1)]) => {
                if k0 == key {
                    Some(v0)
                } else {
                    (k1 == key).then_some(v1)
                }
            }
            InlineMap::Many(map) => map.get_mut(key),
        }
    }

    /// Inserts, keeping `key` itself rather than an equal key already
    /// there (the hub hands out its own copy of a key, see `Hub::join`).
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        match std::mem::take(self) {
            InlineMap::Empty => {
                *self = InlineMap::One(key, value);
                None
            }
            InlineMap::One(k, old) if k == key => {
                *self = InlineMap::One(key, value);
                Some(old)
            }
            InlineMap::One(k, old) => {
                *self = InlineMap::Two([(k, old), (key, value)]);
                None
            }
            InlineMap::Two([(k0, v0), (k1, v1)]) => {
                if k0 == key {
                    *self = InlineMap::Two([(key, value), (k1, v1)]);
                    return Some(v0);
                }
                if k1 == key {
                    *self = InlineMap::Two([(k0, v0), (key, value)]);
                    return Some(v1);
                }
                let mut map = HashMap::with_capacity_and_hasher(3, S::default());
                map.insert(k0, v0);
                map.insert(k1, v1);
                map.insert(key, value);
                *self = InlineMap::Many(map);
                None
            }
            InlineMap::Many(mut map) => {
                let old = map.remove(&key);
                map.insert(key, value);
                *self = InlineMap::Many(map);
                old
            }
        }
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        match std::mem::take(self) {
            InlineMap::One(k, v) if k == *key => Some(v),
            InlineMap::Two([(k0, v0), (k1, v1)]) => {
                if k0 == *key {
                    *self = InlineMap::One(k1, v1);
                    Some(v0)
                } else if k1 == *key {
                    *self = InlineMap::One(k0, v0);
                    Some(v1)
                } else {
                    *self = InlineMap::Two([(k0, v0), (k1, v1)]);
                    None
                }
            }
            InlineMap::Many(mut map) => {
                let old = map.remove(key);
                *self = InlineMap::Many(map);
                old
            }
            other => {
                *self = other;
                None
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            InlineMap::Empty => 0,
            InlineMap::One(..) => 1,
            InlineMap::Two(..) => 2,
            InlineMap::Many(map) => map.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        let (few, many) = match self {
            InlineMap::Empty => (&[][..], None),
            InlineMap::One(_, v) => (std::slice::from_ref(v), None),
            InlineMap::Two(pair) => (&[][..], Some(Values::Pair(pair.iter()))),
            InlineMap::Many(map) => (&[][..], Some(Values::Map(map.values()))),
        };
        few.iter().chain(many.into_iter().flatten())
    }
}

enum Values<'a, K, V> {
    Pair(std::slice::Iter<'a, (K, V)>),
    Map(std::collections::hash_map::Values<'a, K, V>),
}

impl<'a, K, V> Iterator for Values<'a, K, V> {
    type Item = &'a V;

    fn next(&mut self) -> Option<&'a V> {
        match self {
            Values::Pair(it) => it.next().map(|(_, v)| v),
            Values::Map(it) => it.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::hash::RandomState;

    use super::*;

    #[test]
    fn two_entries_inline_a_table_from_the_third() {
        let mut m = InlineMap::<u64, &str, RandomState>::default();
        assert!(m.is_empty());
        assert_eq!(m.insert(1, "a"), None);
        assert!(matches!(m, InlineMap::One(1, "a")));
        assert_eq!(m.insert(1, "b"), Some("a"));
        assert_eq!(m.insert(2, "c"), None);
        assert!(matches!(m, InlineMap::Two(_)), "two inline");
        assert_eq!(m.insert(2, "c"), Some("c"));
        assert_eq!(m.insert(3, "d"), None);
        assert!(matches!(m, InlineMap::Many(_)));
        assert_eq!(m.remove(&3), Some("d"));
        assert_eq!((m.len(), m.get_mut(&2).is_some()), (2, true));
        assert_eq!(m.get_mut(&1).map(|v| *v), Some("b"));
        let mut values: Vec<_> = m.values().copied().collect();
        values.sort();
        assert_eq!(values, ["b", "c"]);
        assert_eq!(m.remove(&1), Some("b"));
        assert_eq!(m.remove(&9), None);
        assert_eq!(m.remove(&2), Some("c"));
        assert!(m.is_empty());
        let mut one = InlineMap::<u64, &str, RandomState>::default();
        one.insert(5, "x");
        assert_eq!(one.remove(&6), None);
        assert_eq!(one.remove(&5), Some("x"));
        assert!(matches!(one, InlineMap::Empty));
    }

    #[test]
    fn either_of_two_is_found_replaced_and_removed() {
        for gone in [1u64, 2] {
            let mut m = InlineMap::<u64, u64, RandomState>::default();
            m.insert(1, 10);
            m.insert(2, 20);
            assert_eq!(m.insert(gone, gone * 100), Some(gone * 10));
            assert_eq!(m.get_mut(&gone).map(|v| *v), Some(gone * 100));
            assert_eq!(m.remove(&gone), Some(gone * 100));
            let kept = 3 - gone;
            assert!(matches!(m, InlineMap::One(k, v) if k == kept && v == kept * 10));
        }
    }
}
