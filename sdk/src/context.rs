//! The coordinator's context: the only door from coordinator code to the outside world.
//!
//! Every method that asks for something (an activity call, a timer, a signal, a child, a value
//! from the clock or the random generator) issues a **command** with the next command position.
//! Commands are issued when the method is *called*, not when its future is first polled, so their
//! order is the program order, whatever order a `join!` or `select!` polls them in.
//!
//! # Determinism
//! Coordinator code must reach the outside world only through the context: no `std::time`, no
//! `rand`, no I/O, no `tokio::spawn`. Combine the context's futures with the `futures` crate's
//! `join!`, `select_biased!`, `join_all`, which are deterministic given the same wake-ups. The
//! context makes wake-ups identical on replay. Prefer `select_biased!` to `futures::select!`: when
//! several branches are ready in the same poll (two events delivered in one activation),
//! `select!` picks one at random, so a replay could take another branch than the first run.
//!
//! # Invariant
//! The context holds no clock and no random source of its own: time and the random seed come in
//! with each activation from the runtime, and are journaled as side effects.

use crate::activity::Activity;
use crate::coordinator::Coordinator;
use crate::error::{Error, Nondeterminism};
use crate::history::{Event, ParentRef};
use crate::positions::{PositionMap, PositionSet};
use crate::retry::RetryPolicy;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The outcome delivered for one command position.
pub(crate) type Resolution = Result<Value, Error>;

/// The marker journaled where a run's saga starts compensating with calls shielded from
/// cancellation (see [`Context::shield_compensations`]).
pub(crate) const SHIELDED_COMPENSATIONS: &str = "retrace.shielded-compensations";

/// The marker journaled right after an activity call its code shielded from cancellation (see
/// [`ActivityCall::shielded`]).
pub(crate) const SHIELDED_CALL: &str = "retrace.shielded-call";

/// A command known at a position of [`Shared::recorded`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Record {
    /// The command as the history holds it: replayed, or issued live (other than an activity
    /// call).
    Command(Event),
    /// An activity call issued live, by position and the activity definition's name. What is
    /// read back at its position is its kind and name (does an outcome fit it, does the
    /// execution wait on work, is the history read back the one issued); its input went to the
    /// runtime with the command. A whole copy of the command was an allocation per call (the
    /// name) and its free, ~4 % of the workers' instructions in W1.
    Call { seq: u32, name: &'static str },
}

impl Record {
    /// The command, when kept whole.
    pub(crate) fn event(&self) -> Option<&Event> {
        match self {
            Record::Command(event) => Some(event),
            Record::Call { .. } => None,
        }
    }

    /// Whether it is an activity call.
    pub(crate) fn is_activity_call(&self) -> bool {
        matches!(
            self,
            Record::Call { .. } | Record::Command(Event::ActivityScheduled { .. })
        )
    }

    /// As [`Event::command_identity`].
    pub(crate) fn command_identity(&self) -> Option<String> {
        match self {
            Record::Command(event) => event.command_identity(),
            Record::Call { name, .. } => Some(format!("activity {name}")),
        }
    }

    /// Whether it stands for `event`, read back from history: the same command (an activity
    /// call issued live: the same position and activity).
    pub(crate) fn matches(&self, event: &Event) -> bool {
        match (self, event) {
            (Record::Command(recorded), _) => recorded == event,
            (
                Record::Call { seq, name },
                Event::ActivityScheduled {
                    seq: s, name: n, ..
                },
            ) => seq == s && name == n,
            (Record::Call { .. }, _) => false,
        }
    }
}

/// State shared by the context, its futures and the replay engine of one execution.
pub(crate) struct Shared {
    pub(crate) instance_id: String,
    /// Whether the current activation replays recorded history (no new commands expected).
    pub(crate) replaying: bool,
    /// Commands known for this instance, indexed by command position: the recorded ones, then
    /// the ones issued live (an activity call issued live by its name only, see [`Record`]).
    pub(crate) recorded: Vec<Record>,
    /// The next command position.
    pub(crate) next_seq: u32,
    /// Commands issued live in the current activation, not yet handed to the runtime.
    pub(crate) issued: Vec<Event>,
    /// Outcomes delivered but not yet taken by their future. (Ordered maps: a few entries at a
    /// time, keyed by small integers; hashing them was 8% of a long replay. One entry is kept
    /// inline: see `positions`.)
    pub(crate) results: PositionMap<Resolution>,
    /// Wakers of futures waiting on a command position.
    pub(crate) wakers: PositionMap<Waker>,
    /// Positions issued and not yet resolved.
    pub(crate) pending: PositionSet,
    /// Signals that arrived before anybody waited for them, per name, in arrival order.
    pub(crate) signal_buffer: HashMap<String, VecDeque<Value>>,
    /// Signal waits not yet satisfied: position → name. Served lowest position first.
    pub(crate) signal_waiters: BTreeMap<u32, String>,
    pub(crate) cancel_reason: Option<String>,
    /// Pending positions a cancellation leaves waiting: a saga's compensations and shielded
    /// calls (see [`Context::shield_compensations`], [`ActivityCall::shielded`]). Usually empty.
    pub(crate) shielded: Vec<u32>,
    pub(crate) now_ms: u64,
    pub(crate) seed: u64,
    pub(crate) nondeterminism: Option<Nondeterminism>,
    pub(crate) custom_status: Option<Value>,
    pub(crate) custom_status_changed: bool,
    pub(crate) parent: Option<ParentRef>,
    /// The patches pinned when this run started; `None` for runs started before pinning existed.
    pub(crate) pinned_patches: Option<Vec<String>>,
}

impl Shared {
    pub(crate) fn new(instance_id: &str) -> Self {
        Shared {
            instance_id: instance_id.to_string(),
            replaying: false,
            recorded: Vec::new(),
            next_seq: 0,
            issued: Vec::new(),
            results: PositionMap::default(),
            wakers: PositionMap::default(),
            pending: PositionSet::default(),
            signal_buffer: HashMap::new(),
            signal_waiters: BTreeMap::new(),
            cancel_reason: None,
            shielded: Vec::new(),
            now_ms: 0,
            seed: 0,
            nondeterminism: None,
            custom_status: None,
            custom_status_changed: false,
            parent: None,
            pinned_patches: None,
        }
    }

    /// Issues a command built for the next position. Returns its position and, when the command
    /// replays a recorded one, the recorded event (so that side effects return recorded values).
    fn issue(&mut self, build: impl FnOnce(u32) -> Event) -> (u32, Option<Event>) {
        self.issue_unless(|_| false, build, None)
    }

    /// As [`Shared::issue`], but when the recorded command at the next position passes `same`
    /// (the cheap check of a replayed activity call), the command is not even built.
    /// `call` names the activity when the command is an activity call (kept as a
    /// [`Record::Call`] when issued live).
    fn issue_unless(
        &mut self,
        same: impl FnOnce(&Event) -> bool,
        build: impl FnOnce(u32) -> Event,
        call: Option<&'static str>,
    ) -> (u32, Option<Event>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self
            .recorded
            .get(seq as usize)
            .and_then(Record::event)
            .is_some_and(same)
        {
            return (seq, None);
        }
        let command = build(seq);
        match self.recorded.get(seq as usize) {
            Some(recorded) => {
                // The common case, an activity call, is compared without formatting the two
                // identities (replay of a long history issues one per recorded call).
                let same = match (recorded, &command) {
                    (
                        Record::Command(Event::ActivityScheduled { name: a, .. }),
                        Event::ActivityScheduled { name: b, .. },
                    ) => a == b,
                    (Record::Call { name: a, .. }, Event::ActivityScheduled { name: b, .. }) => {
                        a == b
                    }
                    _ => recorded.command_identity() == command.command_identity(),
                };
                if !same && self.nondeterminism.is_none() {
                    self.nondeterminism = Some(Nondeterminism {
                        instance_id: self.instance_id.clone(),
                        position: seq,
                        recorded: recorded.command_identity().unwrap_or_default(),
                        requested: command.command_identity().unwrap_or_default(),
                    });
                }
                // Only side effects and patch markers read the recorded command back.
                let echo = match recorded {
                    Record::Command(
                        event @ (Event::SideEffect { .. } | Event::PatchMarker { .. }),
                    ) => Some(event.clone()),
                    _ => None,
                };
                (seq, echo)
            }
            None => {
                let record = match (call, &command) {
                    (Some(name), Event::ActivityScheduled { .. }) => Record::Call { seq, name },
                    _ => Record::Command(command.clone()),
                };
                self.recorded.push(record);
                self.issued.push(command);
                (seq, None)
            }
        }
    }

    /// Delivers the outcome of `seq`. Outcomes for positions nobody waits for (already resolved,
    /// cancelled, or duplicated deliveries) are ignored.
    pub(crate) fn resolve(&mut self, seq: u32, outcome: Resolution) -> Option<Waker> {
        self.pending.remove(seq)?;
        if !self.shielded.is_empty() {
            self.shielded.retain(|s| *s != seq);
        }
        self.results.insert(seq, outcome);
        self.wakers.remove(seq)
    }

    /// Delivers an inbound event (other than `InstanceStarted`), adding to `wake` the wakers to
    /// wake once the lock is released.
    pub(crate) fn deliver(&mut self, event: &Event, wake: &mut Vec<Waker>) {
        // An outcome resolves a position only if the command there is of its kind: an outcome
        // meant for an earlier run (a child of the run before a continue-as-new) cannot resolve
        // another command that happens to hold the same position now.
        let recorded = event.seq().and_then(|seq| self.recorded.get(seq as usize));
        let fits = match (event, recorded) {
            (Event::ActivityCompleted { .. } | Event::ActivityFailed { .. }, Some(command)) => {
                command.is_activity_call()
            }
            (Event::TimerFired { .. }, Some(command)) => {
                matches!(command, Record::Command(Event::TimerStarted { .. }))
            }
            (Event::ChildCompleted { .. }, Some(command)) => {
                matches!(command, Record::Command(Event::ChildStarted { .. }))
            }
            _ => true,
        };
        if !fits {
            return;
        }
        match event {
            Event::ActivityCompleted { seq, output, .. } => {
                wake.extend(self.resolve(*seq, Ok(output.clone())));
            }
            Event::ActivityFailed { seq, failure } => {
                wake.extend(self.resolve(*seq, Err(Error::Activity(failure.clone()))));
            }
            Event::TimerFired { seq } => wake.extend(self.resolve(*seq, Ok(Value::Null))),
            Event::ChildCompleted { seq, result } => {
                let outcome = result.clone().map_err(|e| self.child_error(*seq, &e));
                wake.extend(self.resolve(*seq, outcome));
            }
            Event::SignalReceived { name, payload } => {
                let waiter = self
                    .signal_waiters
                    .iter()
                    .find(|(_, n)| *n == name)
                    .map(|(seq, _)| *seq);
                match waiter {
                    Some(seq) => {
                        self.signal_waiters.remove(&seq);
                        wake.extend(self.resolve(seq, Ok(payload.clone())));
                    }
                    None => self
                        .signal_buffer
                        .entry(name.clone())
                        .or_default()
                        .push_back(payload.clone()),
                }
            }
            Event::PatchesPinned { patches } => self.pinned_patches = Some(patches.clone()),
            Event::CancelRequested { reason } if self.cancel_reason.is_none() => {
                self.cancel_reason = Some(reason.clone());
                // A shielded call (a saga's compensation under way, a call made `.shielded()`)
                // stays pending: failing it would let the code move on while it still runs.
                let pending: Vec<u32> = self
                    .pending
                    .positions()
                    .filter(|seq| !self.shielded.contains(seq))
                    .collect();
                for seq in pending {
                    self.signal_waiters.remove(&seq);
                    let cancelled = Err(Error::Cancelled {
                        reason: reason.clone(),
                    });
                    wake.extend(self.resolve(seq, cancelled));
                }
            }
            _ => {}
        }
    }

    /// Whether the code takes the path the marker `marker` stands for, at the next position: a
    /// recorded marker there says it does (and is consumed); any other recorded event, or
    /// nothing recorded in an activation being replayed, that the recorded run went past this
    /// point on the other path. Live, `live` decides, and taking the path journals the marker so
    /// that replays decide the same. Shared by `Context::patched` (live: the patch is pinned)
    /// and Retrace's own behaviour markers (live: always, see [`Shared::behaviour_marker`]).
    fn marker_at_next(&mut self, marker: &str, live: impl FnOnce(&Shared) -> bool) -> bool {
        let seq = self.next_seq;
        match self.recorded.get(seq as usize) {
            Some(Record::Command(Event::PatchMarker { patch, .. })) if patch == marker => {
                self.next_seq += 1;
                true
            }
            Some(_) => false,
            None if self.replaying => false,
            None => {
                let take = live(self);
                if take {
                    self.issue(|seq| Event::PatchMarker {
                        seq,
                        patch: marker.to_string(),
                    });
                }
                take
            }
        }
    }

    /// Whether this run follows the behaviour Retrace's marker `marker` stands for (live it
    /// does): `Context::patched` without pinning, since the behaviour is Retrace's, not a
    /// version of the coordinator.
    pub(crate) fn behaviour_marker(&mut self, marker: &str) -> bool {
        self.marker_at_next(marker, |_| true)
    }

    fn child_error(&self, seq: u32, error: &Error) -> Error {
        let instance_id = match self.recorded.get(seq as usize) {
            Some(Record::Command(Event::ChildStarted { instance_id, .. })) => instance_id.clone(),
            _ => format!("{}/child-{seq}", self.instance_id),
        };
        Error::Child {
            instance_id,
            message: error.to_string(),
        }
    }

    /// splitmix64 over the activation seed and the position: deterministic, no global state.
    fn random_bits(&self, seq: u32, lane: u64) -> u64 {
        let mut z = self
            .seed
            .wrapping_add(u64::from(seq).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .wrapping_add(lane.wrapping_mul(0xD1B5_4A32_D192_ED03));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Locks the shared state. A poisoned lock means a panic inside a coordinator poll; the state is
/// still structurally valid (every mutation is a single assignment), so it is used as is.
pub(crate) fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The coordinator's handle on its instance. Cheap to clone; every clone is the same context.
#[derive(Clone)]
pub struct Context {
    pub(crate) shared: Arc<Mutex<Shared>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("instance_id", &self.instance_id())
            .finish()
    }
}

impl Context {
    pub(crate) fn new(shared: Arc<Mutex<Shared>>) -> Self {
        Context { shared }
    }

    /// The instance id.
    pub fn instance_id(&self) -> String {
        lock(&self.shared).instance_id.clone()
    }

    /// Whether the code is re-running against recorded history (useful to mute logs).
    pub fn is_replaying(&self) -> bool {
        lock(&self.shared).replaying
    }

    /// Whether a cancellation has been delivered to this instance.
    pub fn is_cancelled(&self) -> bool {
        lock(&self.shared).cancel_reason.is_some()
    }

    /// Calls an activity with the retry policy of its definition. The call is journaled; on
    /// replay its recorded outcome is returned and the activity does not run.
    pub fn call<I: Serialize, O: DeserializeOwned>(
        &self,
        activity: &Activity<I, O>,
        input: &I,
    ) -> ActivityCall<O> {
        self.call_with(activity, input, activity.retry())
    }

    /// Calls an activity with an explicit retry policy.
    pub fn call_with<I: Serialize, O: DeserializeOwned>(
        &self,
        activity: &Activity<I, O>,
        input: &I,
        retry: RetryPolicy,
    ) -> ActivityCall<O> {
        let name = activity.name();
        let input = match serde_json::to_value(input) {
            Ok(v) => v,
            Err(e) => {
                let err = Error::encode(format!("input of activity {name}"), &e);
                return ActivityCall {
                    op: Operation::failed(&self.shared, err),
                    name,
                    _type: PhantomData,
                };
            }
        };
        // On replay, a recorded call of the same name is all there is to check (commands match
        // by kind and name): building the command only to compare and drop it was a tenth of a
        // long replay.
        let op = self.wait_on_unless(
            |recorded| matches!(recorded, Event::ActivityScheduled { name: n, .. } if n == name),
            |seq| Event::ActivityScheduled {
                seq,
                name: name.to_string(),
                input,
                retry: retry.spec(),
            },
            Some(name),
        );
        ActivityCall {
            op,
            name,
            _type: PhantomData,
        }
    }

    /// Sleeps on a durable timer. The instance holds no task while it sleeps.
    pub fn sleep(&self, duration: Duration) -> Timer {
        let now = lock(&self.shared).now_ms;
        let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        self.sleep_until_ms(now.saturating_add(ms))
    }

    /// Sleeps until a point in time on a durable timer.
    pub fn sleep_until(&self, time: SystemTime) -> Timer {
        let ms = time
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        self.sleep_until_ms(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    fn sleep_until_ms(&self, fire_at_ms: u64) -> Timer {
        Timer {
            op: self.wait_on(|seq| Event::TimerStarted { seq, fire_at_ms }),
        }
    }

    /// Waits for the next signal named `name` (signals that arrived earlier are buffered and
    /// served in arrival order).
    pub fn signal<T: DeserializeOwned>(&self, name: &str) -> SignalWait<T> {
        let op = {
            let mut shared = lock(&self.shared);
            let (seq, _) = shared.issue(|seq| Event::SignalAwaited {
                seq,
                name: name.to_string(),
            });
            let buffered = shared
                .signal_buffer
                .get_mut(name)
                .and_then(|q| q.pop_front());
            match (buffered, shared.cancel_reason.clone()) {
                (Some(payload), _) => {
                    shared.results.insert(seq, Ok(payload));
                }
                (None, Some(reason)) => {
                    shared.results.insert(seq, Err(Error::Cancelled { reason }));
                }
                (None, None) => {
                    shared.pending.insert(seq, ());
                    shared.signal_waiters.insert(seq, name.to_string());
                }
            }
            Operation {
                shared: Arc::clone(&self.shared),
                seq: Some(seq),
                early: None,
            }
        };
        SignalWait {
            op,
            name: name.to_string(),
            _type: PhantomData,
        }
    }

    /// Starts a child instance and returns a future of its result. The child has its own id
    /// and history; the parent's history records the start and the outcome.
    pub fn child<I: Serialize, O: DeserializeOwned>(
        &self,
        coordinator: &Coordinator<I, O>,
        instance_id: &str,
        input: &I,
    ) -> ChildCall<O> {
        let input = match serde_json::to_value(input) {
            Ok(v) => v,
            Err(e) => {
                let err = Error::encode(format!("input of child {instance_id}"), &e);
                return ChildCall {
                    op: Operation::failed(&self.shared, err),
                    _type: PhantomData,
                };
            }
        };
        let op = self.wait_on(|seq| Event::ChildStarted {
            seq,
            instance_id: instance_id.to_string(),
            coordinator: coordinator.name().to_string(),
            input,
            detached: false,
        });
        ChildCall {
            op,
            _type: PhantomData,
        }
    }

    /// Starts a child instance without waiting for it: the child runs on its own (it outlives
    /// this instance if need be), and its end is not reported back. The start is journaled and
    /// takes effect when the current activation commits.
    ///
    /// # Errors
    /// [`Error::Payload`] when the input does not encode.
    pub fn start_child<I: Serialize, O>(
        &self,
        coordinator: &Coordinator<I, O>,
        instance_id: &str,
        input: &I,
    ) -> Result<(), Error> {
        let input = serde_json::to_value(input)
            .map_err(|e| Error::encode(format!("input of child {instance_id}"), &e))?;
        lock(&self.shared).issue(|seq| Event::ChildStarted {
            seq,
            instance_id: instance_id.to_string(),
            coordinator: coordinator.name().to_string(),
            input,
            detached: true,
        });
        Ok(())
    }

    /// The current time, recorded once and identical on replay.
    pub fn now(&self) -> SystemTime {
        let ms = self.now_ms();
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    /// The current time in milliseconds since the Unix epoch, recorded once.
    pub fn now_ms(&self) -> u64 {
        let value = self.side_effect_value("now", |s, _| Value::from(s.now_ms));
        value.as_u64().unwrap_or(0)
    }

    /// A random UUID (version 4 layout), recorded once.
    pub fn uuid(&self) -> String {
        let value = self.side_effect_value("uuid", |s, seq| {
            let hi = s.random_bits(seq, 1);
            let lo = s.random_bits(seq, 2);
            let hi = (hi & 0xFFFF_FFFF_FFFF_0FFF) | 0x0000_0000_0000_4000;
            let lo = (lo & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000;
            Value::from(format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                hi >> 32,
                (hi >> 16) & 0xFFFF,
                hi & 0xFFFF,
                lo >> 48,
                lo & 0xFFFF_FFFF_FFFF
            ))
        });
        value.as_str().unwrap_or_default().to_string()
    }

    /// A random number in `[0, 1)`, recorded once.
    pub fn random(&self) -> f64 {
        let bits = self.random_u64();
        (bits >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A random `u64`, recorded once.
    pub fn random_u64(&self) -> u64 {
        let value = self.side_effect_value("random", |s, seq| Value::from(s.random_bits(seq, 0)));
        value.as_u64().unwrap_or(0)
    }

    /// Runs `f` once, the first time this point is reached, and records its value; on replay the
    /// recorded value is returned and `f` does not run. For any other non-deterministic input.
    ///
    /// # Errors
    /// [`Error::Payload`] when the value does not encode or the recorded value does not decode.
    pub fn side_effect<T, F>(&self, name: &str, f: F) -> Result<T, Error>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> T,
    {
        let replaying = {
            let shared = lock(&self.shared);
            (shared.next_seq as usize) < shared.recorded.len()
        };
        let value = if replaying {
            self.side_effect_value(name, |_, _| Value::Null)
        } else {
            let produced = serde_json::to_value(f())
                .map_err(|e| Error::encode(format!("side effect {name}"), &e))?;
            self.side_effect_value(name, move |_, _| produced)
        };
        serde_json::from_value(value)
            .map_err(|e| Error::decode(format!("recorded side effect {name}"), &e))
    }

    fn side_effect_value(&self, name: &str, produce: impl FnOnce(&Shared, u32) -> Value) -> Value {
        let mut shared = lock(&self.shared);
        let seq = shared.next_seq;
        let live_value = if (seq as usize) < shared.recorded.len() {
            Value::Null
        } else {
            produce(&shared, seq)
        };
        let (_, recorded) = shared.issue(|seq| Event::SideEffect {
            seq,
            name: name.to_string(),
            value: live_value.clone(),
        });
        match recorded {
            Some(Event::SideEffect { value, .. }) => value,
            _ => live_value,
        }
    }

    /// Versioning: whether this run takes the code path introduced by the patch `patch`.
    ///
    /// Declare the patch on the coordinator's definition
    /// ([`Coordinator::with_patches`]); each run pins the patches its code declared when it
    /// started. So a run started before the change finishes on the old path, even if it reaches
    /// this point only after the deploy, and every run started after it takes the new path.
    /// The first time a run takes the new path, a marker is journaled at this position, so that
    /// replays see the same decision.
    ///
    /// ```no_run
    /// # use retrace_sdk::{Context, Coordinator};
    /// const BOOK_TRIP: Coordinator<u32, ()> =
    ///     Coordinator::new("book_trip").with_patches(&["cancel-car-first"]);
    /// # fn f(ctx: Context) {
    /// if ctx.patched("cancel-car-first") { /* new order */ } else { /* old order */ }
    /// # }
    /// ```
    ///
    /// Once no run started before the patch is in flight, delete the old path and the check
    /// (keep the id declared as long as histories with its markers must replay).
    pub fn patched(&self, patch: &str) -> bool {
        lock(&self.shared).marker_at_next(patch, |shared| {
            let pinned = shared
                .pinned_patches
                .as_ref()
                .is_some_and(|p| p.iter().any(|id| id == patch));
            if !pinned {
                tracing::debug!(patch, "patch not pinned by this run: old path");
            }
            pinned
        })
    }

    /// Whether the saga compensations about to run are shielded from a cancellation (a
    /// cancel that arrives while one runs waits for it, instead of failing it and moving on).
    /// Live, they are, and a [`SHIELDED_COMPENSATIONS`] marker at this position records it.
    /// A history that began compensating without the marker was recorded before shielding
    /// existed: replaying it, they are not, as in the recorded run.
    pub(crate) fn shield_compensations(&self) -> bool {
        lock(&self.shared).behaviour_marker(SHIELDED_COMPENSATIONS)
    }

    /// Publishes a small custom status (for example "waiting for payment") that the client's
    /// `describe` returns without replaying.
    ///
    /// # Errors
    /// [`Error::Payload`] when the status does not encode.
    pub fn set_status<T: Serialize>(&self, status: &T) -> Result<(), Error> {
        let value = serde_json::to_value(status)
            .map_err(|e| Error::encode("custom status".to_string(), &e))?;
        let mut shared = lock(&self.shared);
        if shared.custom_status.as_ref() != Some(&value) {
            shared.custom_status = Some(value);
            shared.custom_status_changed = true;
        }
        Ok(())
    }

    /// Builds the value a coordinator returns to restart itself with `input` and an empty
    /// history, keeping its id: `return Err(ctx.continue_as_new(&next)?)`.
    ///
    /// # Errors
    /// [`Error::Payload`] when the input does not encode.
    pub fn continue_as_new<I: Serialize>(&self, input: &I) -> Result<Error, Error> {
        let input = serde_json::to_value(input)
            .map_err(|e| Error::encode("continue-as-new input".to_string(), &e))?;
        Ok(Error::ContinueAsNew { input })
    }

    /// Issues a command that waits for an inbound event at its position.
    fn wait_on(&self, build: impl FnOnce(u32) -> Event) -> Operation {
        self.wait_on_unless(|_| false, build, None)
    }

    /// As [`Context::wait_on`], with the shortcut and the activity name of
    /// [`Shared::issue_unless`].
    fn wait_on_unless(
        &self,
        same: impl FnOnce(&Event) -> bool,
        build: impl FnOnce(u32) -> Event,
        call: Option<&'static str>,
    ) -> Operation {
        let mut shared = lock(&self.shared);
        let (seq, _) = shared.issue_unless(same, build, call);
        // After a cancellation has been delivered, new commands still wait normally: that is how
        // compensations run after a cancel.
        shared.pending.insert(seq, ());
        Operation {
            shared: Arc::clone(&self.shared),
            seq: Some(seq),
            early: None,
        }
    }
}

/// The untyped future of one command position.
struct Operation {
    shared: Arc<Mutex<Shared>>,
    seq: Option<u32>,
    /// An error known before any command was issued (an input that does not encode).
    early: Option<Error>,
}

impl Operation {
    fn failed(shared: &Arc<Mutex<Shared>>, error: Error) -> Self {
        Operation {
            shared: Arc::clone(shared),
            seq: None,
            early: Some(error),
        }
    }

    fn poll_resolution(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Resolution> {
        if let Some(err) = self.early.take() {
            return Poll::Ready(Err(err));
        }
        let Some(seq) = self.seq else {
            return Poll::Pending;
        };
        let mut shared = lock(&self.shared);
        if let Some(outcome) = shared.results.remove(seq) {
            self.seq = None;
            return Poll::Ready(outcome);
        }
        if shared.nondeterminism.is_none() {
            shared.wakers.insert(seq, cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Operation {
    /// A future dropped before taking its outcome (the loser of a `select!`) stops waiting: a
    /// later outcome for its position is ignored, and a signal it was handed but never returned
    /// goes back to the front of its buffer, for the next wait of that name.
    fn drop(&mut self) {
        let Some(seq) = self.seq.take() else { return };
        let mut shared = lock(&self.shared);
        shared.pending.remove(seq);
        shared.wakers.remove(seq);
        shared.signal_waiters.remove(&seq);
        if !shared.shielded.is_empty() {
            shared.shielded.retain(|s| *s != seq);
        }
        if let Some(Ok(payload)) = shared.results.remove(seq) {
            if let Some(Record::Command(Event::SignalAwaited { name, .. })) =
                shared.recorded.get(seq as usize)
            {
                let name = name.clone();
                shared
                    .signal_buffer
                    .entry(name)
                    .or_default()
                    .push_front(payload);
            }
        }
    }
}

fn decode<O: DeserializeOwned>(value: Value, what: impl FnOnce() -> String) -> Result<O, Error> {
    serde_json::from_value(value).map_err(|e| Error::decode(what(), &e))
}

/// The future of an activity call. Resolves to the activity's output or its final failure.
#[must_use = "an activity call does nothing useful unless awaited"]
pub struct ActivityCall<O> {
    op: Operation,
    name: &'static str,
    _type: PhantomData<fn() -> O>,
}

impl<O> ActivityCall<O> {
    /// Keeps this call waiting for its outcome when the instance is cancelled, instead of
    /// failing it with [`Error::Cancelled`] while its activity runs on: for clean-up that must
    /// finish, such as a compensation written by hand ([`Saga`](crate::Saga) shields its own).
    /// Use it on the call just made, before making another (on any other call, or a second
    /// time, it does nothing but log a warning):
    ///
    /// ```no_run
    /// # use retrace_sdk::{Activity, Context, Error};
    /// const REFUND: Activity<String, ()> = Activity::new("refund");
    /// # async fn f(ctx: Context, order: String) -> Result<(), Error> {
    /// ctx.call(&REFUND, &order).shielded().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// A `retrace.shielded-call` marker is journaled right after the call, so that a history
    /// recorded before the code shielded it replays as it ran.
    pub fn shielded(self) -> Self {
        // Nothing was issued (the input did not encode): nothing to shield.
        let Some(seq) = self.op.seq else {
            return self;
        };
        let shield = {
            let mut shared = lock(&self.op.shared);
            // Only the call just made: its marker must follow it, or a replay could hand one
            // call's marker to another. (`next_seq` is the same live and on replay.)
            if shared.next_seq == seq.saturating_add(1) {
                shared.behaviour_marker(SHIELDED_CALL)
            } else {
                tracing::warn!(
                    position = seq,
                    "shielded() on a call that is not the last one made (or twice): not shielded"
                );
                false
            }
        };
        if shield {
            self.mark_shielded()
        } else {
            self
        }
    }

    /// Leaves this call waiting when a cancellation arrives (see [`ActivityCall::shielded`]
    /// and [`Context::shield_compensations`]).
    pub(crate) fn mark_shielded(self) -> Self {
        if let Some(seq) = self.op.seq {
            let mut shared = lock(&self.op.shared);
            if shared.pending.positions().any(|p| p == seq) && !shared.shielded.contains(&seq) {
                shared.shielded.push(seq);
            }
        }
        self
    }
}

impl<O: DeserializeOwned> Future for ActivityCall<O> {
    type Output = Result<O, Error>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let seq = self.op.seq;
        let name = self.name;
        self.op.poll_resolution(cx).map(|r| {
            r.and_then(|v| {
                decode(v, || {
                    format!("output of activity {name} at position {seq:?}")
                })
            })
        })
    }
}

/// The future of a durable timer.
#[must_use = "a timer does nothing useful unless awaited"]
pub struct Timer {
    op: Operation,
}

impl Future for Timer {
    type Output = Result<(), Error>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        self.op.poll_resolution(cx).map(|r| r.map(|_| ()))
    }
}

/// The future of a signal wait. Resolves to the signal's payload.
#[must_use = "a signal wait does nothing useful unless awaited"]
pub struct SignalWait<T> {
    op: Operation,
    name: String,
    _type: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Future for SignalWait<T> {
    type Output = Result<T, Error>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let name = self.name.clone();
        self.op
            .poll_resolution(cx)
            .map(|r| r.and_then(|v| decode(v, || format!("payload of signal {name}"))))
    }
}

/// The future of a child instance's result.
#[must_use = "a child call does nothing useful unless awaited"]
pub struct ChildCall<O> {
    op: Operation,
    _type: PhantomData<fn() -> O>,
}

impl<O: DeserializeOwned> Future for ChildCall<O> {
    type Output = Result<O, Error>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let seq = self.op.seq;
        self.op
            .poll_resolution(cx)
            .map(|r| r.and_then(|v| decode(v, || format!("output of child at position {seq:?}"))))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn call(seq: u32, name: &str) -> Event {
        Event::ActivityScheduled {
            seq,
            name: name.to_string(),
            input: json!(41),
            retry: crate::history::standard_retry(),
        }
    }

    #[test]
    fn an_activity_call_issued_live_stands_for_its_history_event() {
        let record = Record::Call {
            seq: 4,
            name: "add_one",
        };
        assert!(record.is_activity_call());
        assert!(record.event().is_none());
        assert_eq!(
            record.command_identity(),
            call(4, "add_one").command_identity()
        );
        assert!(record.matches(&call(4, "add_one")));
        // Another position, another activity or another kind of command is not the one issued.
        assert!(!record.matches(&call(5, "add_one")));
        assert!(!record.matches(&call(4, "add_two")));
        assert!(!record.matches(&Event::TimerStarted {
            seq: 4,
            fire_at_ms: 9
        }));
    }

    #[test]
    fn a_whole_command_is_compared_whole() {
        let record = Record::Command(call(4, "add_one"));
        assert!(record.is_activity_call());
        assert!(record.matches(&call(4, "add_one")));
        let mut other_input = call(4, "add_one");
        if let Event::ActivityScheduled { input, .. } = &mut other_input {
            *input = json!(42);
        }
        assert!(!record.matches(&other_input));
        let timer = Record::Command(Event::TimerStarted {
            seq: 2,
            fire_at_ms: 1_000,
        });
        assert!(!timer.is_activity_call());
        assert_eq!(timer.command_identity().as_deref(), Some("timer"));
    }

    #[test]
    fn only_activity_calls_are_recorded_by_name() {
        let mut shared = Shared::new("i");
        let (seq, _) = shared.issue_unless(|_| false, |seq| call(seq, "add_one"), Some("add_one"));
        assert_eq!(
            shared.recorded[seq as usize],
            Record::Call {
                seq,
                name: "add_one"
            }
        );
        let timer = |seq| Event::TimerStarted { seq, fire_at_ms: 5 };
        let (seq, _) = shared.issue(timer);
        assert_eq!(shared.recorded[seq as usize], Record::Command(timer(seq)));
        // Both went to the runtime whole.
        assert_eq!(shared.issued, vec![call(0, "add_one"), timer(1)]);
    }
}
