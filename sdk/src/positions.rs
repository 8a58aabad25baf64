//! Maps keyed by command position, for the few positions an execution waits on at a time.
//!
//! An execution tracks, per command position, whether it is pending, the outcome delivered for
//! it and the waker of the future waiting on it. A sequential coordinator waits on one position
//! at a time, so every step inserts and removes the only entry of each map: in a B-tree that
//! is a search and a shift per operation, six per step (about 700 instructions of a step's
//! ~15,000 on a worker, W1). [`PositionMap`] keeps a lone entry inline and spills into a
//! B-tree only while several positions are open at once (a fan-out), so large fan-outs stay
//! logarithmic.

use std::collections::BTreeMap;

/// A map from command positions to values, iterated in position order.
#[derive(Debug, Default)]
pub(crate) enum PositionMap<V> {
    /// No entry.
    #[default]
    Empty,
    /// Exactly one entry, inline.
    One(u32, V),
    /// Any number of entries (never left empty: an emptied map goes back to `Empty`).
    Many(BTreeMap<u32, V>),
}

impl<V> PositionMap<V> {
    /// Inserts `value` at `position`; returns the value it replaces.
    pub(crate) fn insert(&mut self, position: u32, value: V) -> Option<V> {
        let (next, replaced) = match std::mem::take(self) {
            PositionMap::Empty => (PositionMap::One(position, value), None),
            PositionMap::One(at, old) if at == position => {
                (PositionMap::One(position, value), Some(old))
            }
            PositionMap::One(at, old) => {
                let mut map = BTreeMap::new();
                map.insert(at, old);
                map.insert(position, value);
                (PositionMap::Many(map), None)
            }
            PositionMap::Many(mut map) => {
                let replaced = map.insert(position, value);
                (PositionMap::Many(map), replaced)
            }
        };
        *self = next;
        replaced
    }

    /// Removes and returns the value at `position`.
    pub(crate) fn remove(&mut self, position: u32) -> Option<V> {
        match std::mem::take(self) {
            PositionMap::One(at, value) if at == position => Some(value),
            PositionMap::Many(mut map) => {
                let removed = map.remove(&position);
                if !map.is_empty() {
                    *self = PositionMap::Many(map);
                }
                removed
            }
            other => {
                *self = other;
                None
            }
        }
    }

    /// The positions, in increasing order.
    pub(crate) fn positions(&self) -> impl Iterator<Item = u32> + '_ {
        let (one, many) = match self {
            PositionMap::Empty => (None, None),
            PositionMap::One(at, _) => (Some(*at), None),
            PositionMap::Many(map) => (None, Some(map.keys().copied())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    /// How many entries there are.
    #[cfg(test)]
    fn len(&self) -> usize {
        match self {
            PositionMap::Empty => 0,
            PositionMap::One(..) => 1,
            PositionMap::Many(map) => map.len(),
        }
    }
}

/// A set of command positions: a [`PositionMap`] without values.
pub(crate) type PositionSet = PositionMap<()>;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32, u8),
        Remove(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few distinct positions, so that inserts replace and removes hit.
        prop_oneof![
            (0u32..12, any::<u8>()).prop_map(|(p, v)| Op::Insert(p, v)),
            (0u32..12).prop_map(Op::Remove),
        ]
    }

    proptest! {
        /// Any sequence of inserts and removes leaves the map as a B-tree would, answers each
        /// operation as it would, and never holds an empty B-tree.
        #[test]
        fn behaves_as_an_ordered_map(ops in prop::collection::vec(op(), 0..200)) {
            let mut ours = PositionMap::default();
            let mut model = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(p, v) => prop_assert_eq!(ours.insert(p, v), model.insert(p, v)),
                    Op::Remove(p) => prop_assert_eq!(ours.remove(p), model.remove(&p)),
                }
                prop_assert_eq!(ours.len(), model.len());
                let positions: Vec<u32> = ours.positions().collect();
                let expected: Vec<u32> = model.keys().copied().collect();
                prop_assert_eq!(positions, expected);
                let spilled_empty = matches!(&ours, PositionMap::Many(map) if map.is_empty());
                prop_assert!(!spilled_empty);
            }
        }
    }

    #[test]
    fn a_lone_entry_stays_inline_and_a_fan_out_spills_and_comes_back() {
        let mut map = PositionSet::default();
        assert!(map.insert(3, ()).is_none());
        assert!(matches!(map, PositionMap::One(3, ())));
        assert!(map.insert(5, ()).is_none());
        assert!(matches!(map, PositionMap::Many(_)));
        assert_eq!(map.positions().collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(map.remove(3), Some(()));
        assert_eq!(map.remove(4), None);
        assert_eq!(map.remove(5), Some(()));
        assert!(matches!(map, PositionMap::Empty));
        assert_eq!(map.remove(5), None);
    }
}
