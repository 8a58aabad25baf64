//! What a worker keeps per instance it holds, in one map: whether an activation (a task, or a
//! direct finish of an activity's outcome) has the instance now, and its cached execution.
//!
//! A sequential step moves an instance through both (the cached execution is taken, the
//! instance marked as activating, the execution cached again, the mark lifted). One map keyed
//! by the instance id does that with one lookup per move and keeps the id's key while the
//! instance stays cached; two maps took five lookups and a copy of the id per step.
//!
//! Pure bookkeeping: the worker holds it behind one mutex and decides what to run.

use retrace_sdk::Execution;

/// Looked up at every step, as the worker's other maps: foldhash.
type HashMap<K, V> = foldhash::HashMap<K, V>;

/// One instance's entry. Never kept empty: an entry with neither part is removed.
struct Slot {
    /// `Some(again)` while an activation has the instance; `again` asks it to run once more.
    running: Option<bool>,
    /// The cached execution, with the run (generation) it belongs to. Boxed: a sequential
    /// step moves it out of the map, through its activation and commit, and back, and an
    /// `Execution` is ~230 bytes (W1: ten copies of it per step before).
    cached: Option<(u64, Box<Execution>)>,
}

impl Slot {
    fn is_empty(&self) -> bool {
        self.running.is_none() && self.cached.is_none()
    }
}

/// The entries by instance id, and how many of them hold a cached execution.
#[derive(Default)]
pub(crate) struct InstanceSlots {
    by_id: HashMap<String, Slot>,
    cached: usize,
}

impl InstanceSlots {
    /// How many executions are cached.
    pub(crate) fn cached_len(&self) -> usize {
        self.cached
    }

    /// Marks `id` as activating. Returns `false` when an activation already has it, which is
    /// then asked to run once more instead.
    pub(crate) fn mark_running(&mut self, id: &str) -> bool {
        match self.by_id.get_mut(id) {
            Some(slot) => match &mut slot.running {
                Some(again) => {
                    *again = true;
                    false
                }
                None => {
                    slot.running = Some(false);
                    true
                }
            },
            None => {
                self.insert_running(id);
                true
            }
        }
    }

    /// A new entry for `id`, marked as activating.
    fn insert_running(&mut self, id: &str) {
        let slot = Slot {
            running: Some(false),
            cached: None,
        };
        self.by_id.insert(id.to_string(), slot);
    }

    /// Ends an activation of `id`: it stays marked (and returns `true`) when it runs once
    /// more, because it has work (`again`) or was asked to meanwhile, unless `stopping`.
    pub(crate) fn finish_activation(&mut self, id: &str, again: bool, stopping: bool) -> bool {
        let slot = self.by_id.get_mut(id);
        let requested = slot.as_ref().and_then(|slot| slot.running).unwrap_or(false);
        if (again || requested) && !stopping {
            match slot {
                Some(slot) => slot.running = Some(false),
                None => self.insert_running(id),
            }
            true
        } else {
            self.release(id);
            false
        }
    }

    /// Lifts the activating mark of `id`. Returns whether another activation was asked for
    /// meanwhile.
    pub(crate) fn release(&mut self, id: &str) -> bool {
        let Some(slot) = self.by_id.get_mut(id) else {
            return false;
        };
        let requested = slot.running.take().unwrap_or(false);
        if slot.is_empty() {
            self.by_id.remove(id);
        }
        requested
    }

    /// Takes the cached execution of `id`, if any.
    pub(crate) fn take_cached(&mut self, id: &str) -> Option<(u64, Box<Execution>)> {
        let slot = self.by_id.get_mut(id)?;
        let cached = slot.cached.take();
        if cached.is_some() {
            self.cached -= 1;
        }
        if slot.is_empty() {
            self.by_id.remove(id);
        }
        cached
    }

    /// For a direct finish: when no activation has `id` and its cached execution belongs to
    /// run `generation`, takes the execution and marks the instance as activating. A cached
    /// execution of another run is stale and dropped.
    pub(crate) fn take_idle(&mut self, id: &str, generation: u64) -> Option<(u64, Box<Execution>)> {
        let slot = self.by_id.get_mut(id)?;
        if slot.running.is_some() {
            return None;
        }
        let cached = slot.cached.take()?;
        self.cached -= 1;
        if cached.0 == generation {
            slot.running = Some(false);
            Some(cached)
        } else {
            // Neither running nor cached any more.
            self.by_id.remove(id);
            None
        }
    }

    /// Caches `execution` for `id`, evicting another instance's when `capacity` executions
    /// are cached already.
    pub(crate) fn put_cached(
        &mut self,
        id: &str,
        generation: u64,
        execution: Box<Execution>,
        capacity: usize,
    ) {
        let entry = (generation, execution);
        // At capacity, another instance's execution makes room, unless this one replaces its
        // own. Below it, one lookup: a sequential step puts back the execution it took a moment
        // before, into the entry that is still there.
        if self.cached >= capacity && self.by_id.get(id).is_none_or(|slot| slot.cached.is_none()) {
            self.evict_one();
        }
        let previous = match self.by_id.get_mut(id) {
            Some(slot) => slot.cached.replace(entry),
            None => {
                self.by_id.insert(
                    id.to_string(),
                    Slot {
                        running: None,
                        cached: Some(entry),
                    },
                );
                None
            }
        };
        if previous.is_none() {
            self.cached += 1;
        }
    }

    /// Drops one cached execution (any: the cache keeps no order).
    fn evict_one(&mut self) {
        let Some(victim) = self
            .by_id
            .iter()
            .find(|(_, slot)| slot.cached.is_some())
            .map(|(id, _)| id.clone())
        else {
            return;
        };
        self.take_cached(&victim);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;
    use retrace_sdk::{coordinator_fn, Context, Coordinator};

    const ECHO: Coordinator<u32, u32> = Coordinator::new("echo");

    fn execution() -> Box<Execution> {
        let coordinator = coordinator_fn(&ECHO, |_ctx: Context, n: u32| async move { Ok(n) });
        Box::new(Execution::new("a", coordinator))
    }

    #[derive(Debug, Clone)]
    enum Op {
        Mark(u8),
        Finish(u8, bool, bool),
        Release(u8),
        Take(u8),
        TakeIdle(u8, u64),
        Put(u8, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few ids and runs, so that operations meet.
        prop_oneof![
            (0u8..3).prop_map(Op::Mark),
            (0u8..3, any::<bool>(), any::<bool>()).prop_map(|(i, a, s)| Op::Finish(i, a, s)),
            (0u8..3).prop_map(Op::Release),
            (0u8..3).prop_map(Op::Take),
            (0u8..3, 0u64..2).prop_map(|(i, g)| Op::TakeIdle(i, g)),
            (0u8..3, 0u64..2).prop_map(|(i, g)| Op::Put(i, g)),
        ]
    }

    /// The two maps the slots replace, as the worker used them: the activating marks, and the
    /// cached executions (their generations here).
    #[derive(Default)]
    struct TwoMaps {
        running: std::collections::HashMap<String, bool>,
        cache: std::collections::HashMap<String, u64>,
    }

    proptest! {
        /// Any sequence of moves answers as the two maps did, keeps the count of cached
        /// executions exact, and leaves no empty entry behind.
        #[test]
        fn behaves_as_the_two_maps_it_replaces(ops in prop::collection::vec(op(), 0..100)) {
            let mut ours = InstanceSlots::default();
            let mut model = TwoMaps::default();
            for op in ops {
                match op {
                    Op::Mark(i) => {
                        let id = i.to_string();
                        let expected = match model.running.get_mut(&id) {
                            Some(again) => {
                                *again = true;
                                false
                            }
                            None => {
                                model.running.insert(id.clone(), false);
                                true
                            }
                        };
                        prop_assert_eq!(ours.mark_running(&id), expected);
                    }
                    Op::Finish(i, again, stopping) => {
                        let id = i.to_string();
                        let requested = model.running.get(&id).copied().unwrap_or(false);
                        let expected = if (again || requested) && !stopping {
                            model.running.insert(id.clone(), false);
                            true
                        } else {
                            model.running.remove(&id);
                            false
                        };
                        prop_assert_eq!(ours.finish_activation(&id, again, stopping), expected);
                    }
                    Op::Release(i) => {
                        let id = i.to_string();
                        let expected = model.running.remove(&id).unwrap_or(false);
                        prop_assert_eq!(ours.release(&id), expected);
                    }
                    Op::Take(i) => {
                        let id = i.to_string();
                        let expected = model.cache.remove(&id);
                        prop_assert_eq!(ours.take_cached(&id).map(|(g, _)| g), expected);
                    }
                    Op::TakeIdle(i, generation) => {
                        let id = i.to_string();
                        let expected = if model.running.contains_key(&id) {
                            None
                        } else {
                            match model.cache.remove(&id) {
                                Some(g) if g == generation => {
                                    model.running.insert(id.clone(), false);
                                    Some(g)
                                }
                                _ => None,
                            }
                        };
                        prop_assert_eq!(ours.take_idle(&id, generation).map(|(g, _)| g), expected);
                    }
                    Op::Put(i, generation) => {
                        let id = i.to_string();
                        // Room for every id: which execution an eviction drops is arbitrary.
                        ours.put_cached(&id, generation, execution(), 8);
                        model.cache.insert(id, generation);
                    }
                }
                prop_assert_eq!(ours.cached_len(), model.cache.len());
                let with_cache = ours.by_id.values().filter(|s| s.cached.is_some()).count();
                prop_assert_eq!(with_cache, ours.cached_len());
                prop_assert!(ours.by_id.values().all(|s| !s.is_empty()));
            }
        }
    }

    #[test]
    fn an_activation_marks_its_instance_and_a_second_one_asks_for_a_rerun() {
        let mut slots = InstanceSlots::default();
        assert!(slots.mark_running("a"));
        assert!(!slots.mark_running("a"), "already activating");
        // Asked for meanwhile: runs once more, then ends.
        assert!(slots.finish_activation("a", false, false));
        assert!(!slots.finish_activation("a", false, false));
        assert!(slots.mark_running("a"), "no mark left");
        assert!(!slots.finish_activation("a", false, true), "stopping");
        assert!(slots.by_id.is_empty());
    }

    #[test]
    fn a_cached_execution_outlives_the_activation_that_put_it() {
        let mut slots = InstanceSlots::default();
        assert!(slots.mark_running("a"));
        slots.put_cached("a", 3, execution(), 10);
        assert!(slots.take_idle("a", 3).is_none(), "an activation has it");
        assert!(!slots.release("a"));
        assert_eq!(slots.cached_len(), 1);
        // A direct finish takes it and marks the instance; the next caches it again.
        let (generation, execution) = slots.take_idle("a", 3).expect("idle and cached");
        assert_eq!(generation, 3);
        assert_eq!(slots.cached_len(), 0);
        assert!(!slots.mark_running("a"), "the direct finish has it");
        slots.put_cached("a", 3, execution, 10);
        assert!(slots.release("a"), "a rerun was asked for");
        assert_eq!(slots.take_cached("a").map(|(g, _)| g), Some(3));
        assert!(slots.by_id.is_empty());
    }

    #[test]
    fn a_stale_execution_is_dropped_by_a_direct_finish() {
        let mut slots = InstanceSlots::default();
        slots.put_cached("a", 1, execution(), 10);
        assert!(slots.take_idle("a", 2).is_none());
        assert_eq!(slots.cached_len(), 0);
        assert!(slots.by_id.is_empty());
        assert!(slots.take_idle("missing", 0).is_none());
    }

    #[test]
    fn the_cache_holds_at_most_its_capacity() {
        let mut slots = InstanceSlots::default();
        assert!(slots.mark_running("running"));
        for id in ["a", "b", "c", "d"] {
            slots.put_cached(id, 0, execution(), 2);
            assert!(slots.cached_len() <= 2);
        }
        // Replacing an execution evicts nothing.
        let before: Vec<String> = slots
            .by_id
            .iter()
            .filter(|(_, s)| s.cached.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        slots.put_cached(&before[0], 1, execution(), 2);
        assert_eq!(slots.cached_len(), 2);
        assert_eq!(slots.take_cached(&before[1]).map(|(g, _)| g), Some(0));
        assert_eq!(slots.take_cached(&before[0]).map(|(g, _)| g), Some(1));
        // The activating mark was never evicted.
        assert!(!slots.mark_running("running"));
        assert_eq!(slots.cached_len(), 0);
    }
}
