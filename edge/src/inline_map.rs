//! A map that keeps its one entry inline and makes a table for a second.
//!
//! Most of what an edge indexes per socket or per stream has exactly one
//! entry for its whole life (a socket's personal stream, the one socket
//! of a personal stream): a `HashMap` would allocate a table for it
//! (ADR 0030).
use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash},
};

#[derive(Default)]
pub(crate) enum InlineMap<K, V, S> {
    #[default]
    Empty,
    One(K, V),
    Many(HashMap<K, V, S>),
}

impl<K: Eq + Hash, V, S: BuildHasher + Default> InlineMap<K, V, S> {
    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        match self {
            InlineMap::Empty => None,
            InlineMap::One(k, v) => (k == key).then_some(v),
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
                let mut map = HashMap::with_capacity_and_hasher(2, S::default());
                map.insert(k, old);
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
            InlineMap::Many(map) => map.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        let (one, many) = match self {
            InlineMap::Empty => (None, None),
            InlineMap::One(_, v) => (Some(v), None),
            InlineMap::Many(map) => (None, Some(map.values())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

#[cfg(test)]
mod tests {
    use std::hash::RandomState;

    use super::*;

    #[test]
    fn one_entry_inline_a_table_from_the_second() {
        let mut m = InlineMap::<u64, &str, RandomState>::default();
        assert!(m.is_empty());
        assert_eq!(m.insert(1, "a"), None);
        assert!(matches!(m, InlineMap::One(1, "a")));
        assert_eq!(m.insert(1, "b"), Some("a"));
        assert_eq!(m.insert(2, "c"), None);
        assert!(matches!(m, InlineMap::Many(_)));
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
}
