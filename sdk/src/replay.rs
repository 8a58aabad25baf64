//! The replay machinery: a pure state machine from (history, new inbound events) to commands.
//!
//! An [`Execution`] owns one coordinator future. [`Execution::replay`] feeds it recorded history,
//! activation by activation, and checks that the code issues the recorded commands in the
//! recorded order. [`Execution::activate`] delivers a batch of new inbound events and returns the
//! events to append: that batch, the commands the code issued in response, and a terminal event
//! when the coordinator returned.
//!
//! # Architecture invariant
//! No clocks, no randomness, no I/O, no threads: everything an execution needs comes in as
//! arguments (the activation's time and random seed included), and everything it decides comes
//! out as events. The runtime does the I/O; tests drive this module directly.
//!
//! # Determinism
//! The coordinator future is polled with a waker that only raises a flag. After a batch is
//! delivered, the future is polled until no waker fired, so that every combinator (`join!`,
//! `select!`, `FuturesUnordered`) sees exactly the wake-ups it saw in the first run.

use crate::context::{lock, Context, Record, Shared};
use crate::coordinator::CoordinatorFn;
use crate::error::{Error, Nondeterminism, ReplayError};
use crate::history::{check_shape, Event, EventFamily, HistoryEvent};
use futures::future::BoxFuture;
use serde_json::Value;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Wake, Waker};

/// Upper bound of polls within one activation; a coordinator that keeps waking itself without
/// waiting on anything is a programming error, reported instead of spinning forever.
const POLLS_PER_ACTIVATION_MAX: u32 = 1_000_000;

struct WakeFlag(AtomicBool);

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

/// The result of one live activation.
#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    /// The activation number these events belong to.
    pub activation: u32,
    /// Events to append, in order: the inbound batch, the commands issued, then a terminal event
    /// if the coordinator returned.
    pub events: Vec<Event>,
    /// The custom status, when the code changed it in this activation.
    pub custom_status: Option<Value>,
}

impl Activation {
    /// The terminal event of this activation, if the coordinator returned.
    pub fn terminal(&self) -> Option<&Event> {
        self.events
            .last()
            .filter(|e| e.family() == EventFamily::Terminal)
    }
}

/// One coordinator run in memory: the future, its shared state, and how much history it has
/// consumed.
pub struct Execution {
    instance_id: String,
    coordinator: CoordinatorFn,
    shared: Arc<Mutex<Shared>>,
    future: Option<BoxFuture<'static, Result<Value, Error>>>,
    flag: Arc<WakeFlag>,
    waker: Waker,
    /// The coordinator's return value, once it returned.
    returned: Option<Result<Value, Error>>,
    /// The patches this code declares, pinned by runs that start live here.
    patches: Vec<String>,
    /// Whether a terminal event is in history (recorded or emitted).
    terminal_recorded: bool,
    next_position: u64,
    next_activation: u32,
    /// The wakers an activation's deliveries collect, kept for the next one (no allocation
    /// per activation).
    wakers: Vec<Waker>,
}

impl std::fmt::Debug for Execution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Execution")
            .field("instance_id", &self.instance_id)
            .field("next_position", &self.next_position)
            .field("next_activation", &self.next_activation)
            .field("returned", &self.returned.is_some())
            .finish()
    }
}

impl Execution {
    /// A fresh execution of `coordinator` for `instance_id`. Nothing runs until the
    /// `InstanceStarted` event is delivered (by [`Execution::replay`] or
    /// [`Execution::activate`]).
    pub fn new(instance_id: &str, coordinator: CoordinatorFn) -> Self {
        let flag = Arc::new(WakeFlag(AtomicBool::new(false)));
        Execution {
            instance_id: instance_id.to_string(),
            coordinator,
            shared: Arc::new(Mutex::new(Shared::new(instance_id))),
            future: None,
            waker: Waker::from(Arc::clone(&flag)),
            flag,
            returned: None,
            patches: Vec::new(),
            terminal_recorded: false,
            next_position: 0,
            next_activation: 0,
            wakers: Vec::new(),
        }
    }

    /// Declares the patches of this code (see `Coordinator::with_patches`): a run that starts
    /// live in this execution pins them.
    pub fn with_patches(mut self, patches: &[&str]) -> Self {
        self.patches = patches.iter().map(|p| p.to_string()).collect();
        self
    }

    /// The instance id.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The position of the next history event this execution expects.
    pub fn next_position(&self) -> u64 {
        self.next_position
    }

    /// The number of the next activation.
    pub fn next_activation(&self) -> u32 {
        self.next_activation
    }

    /// Whether a terminal event is in this execution's history.
    pub fn is_finished(&self) -> bool {
        self.terminal_recorded
    }

    /// Whether the code waits on work already under way whose outcome should come back soon:
    /// an activity call, a child instance, or a timer due within `soon_ms` of the last
    /// activation's time. An execution that waits only on signals or distant timers may wait
    /// forever; a runtime uses this to keep only hot executions in memory.
    pub fn awaits_work(&self, soon_ms: u64) -> bool {
        let shared = lock(&self.shared);
        let horizon = shared.now_ms.saturating_add(soon_ms);
        let hot = shared
            .pending
            .positions()
            .any(|seq| match shared.recorded.get(seq as usize) {
                Some(record) if record.is_activity_call() => true,
                Some(Record::Command(Event::ChildStarted { .. })) => true,
                Some(Record::Command(Event::TimerStarted { fire_at_ms, .. })) => {
                    *fire_at_ms <= horizon
                }
                _ => false,
            });
        hot
    }

    /// The custom status last set by the code.
    pub fn custom_status(&self) -> Option<Value> {
        lock(&self.shared).custom_status.clone()
    }

    /// Replays recorded events that continue this execution's history (`events[0].position`
    /// must equal [`Execution::next_position`]). Re-delivers each activation's inbound events as
    /// one batch and checks that the code issues exactly the recorded commands.
    ///
    /// # Errors
    /// [`ReplayError::Nondeterminism`] when the code diverges; [`ReplayError::CorruptHistory`]
    /// when the events are malformed. Either way the execution must be discarded.
    pub fn replay(&mut self, events: &[HistoryEvent]) -> Result<(), ReplayError> {
        if events.is_empty() {
            return Ok(());
        }
        check_shape(&self.instance_id, self.next_position, events)?;
        if let Some(first) = events.first() {
            if first.activation < self.next_activation {
                return Err(self.corrupt(
                    first.position,
                    format!(
                        "activation {} was already applied (next is {})",
                        first.activation, self.next_activation
                    ),
                ));
            }
        }
        self.register_recorded_commands(events)?;
        lock(&self.shared).replaying = true;
        let mut start = 0;
        while start < events.len() {
            let activation = events[start].activation;
            let end = events[start..]
                .iter()
                .position(|e| e.activation != activation)
                .map_or(events.len(), |offset| start + offset);
            self.replay_activation(&events[start..end])?;
            self.next_activation = activation.checked_add(1).ok_or_else(|| {
                self.corrupt(
                    events[start].position,
                    format!("activation number {activation} is out of range"),
                )
            })?;
            start = end;
        }
        self.next_position += events.len() as u64;
        lock(&self.shared).replaying = false;
        Ok(())
    }

    /// Delivers a batch of new inbound events, lets the code run, and returns the events to
    /// append to history. `now_ms` and `seed` are what `ctx.now()` and `ctx.random()` see in this
    /// activation.
    ///
    /// # Errors
    /// [`ReplayError::Nondeterminism`] when the code diverges from history it already replayed.
    pub fn activate(
        &mut self,
        inbound: Vec<Event>,
        now_ms: u64,
        seed: u64,
    ) -> Result<Activation, ReplayError> {
        {
            let mut shared = lock(&self.shared);
            shared.replaying = false;
            shared.now_ms = now_ms;
            shared.seed = seed;
        }
        let mut inbound: Vec<Event> = inbound
            .into_iter()
            .filter(|e| e.family() == EventFamily::Inbound)
            .filter(|e| !matches!(e, Event::PatchesPinned { .. }))
            .collect();
        // A run starting live pins the patches of the code that starts it.
        if let Some(i) = inbound
            .iter()
            .position(|e| matches!(e, Event::InstanceStarted { .. }))
        {
            let pinned = Event::PatchesPinned {
                patches: self.patches.clone(),
            };
            inbound.insert(i + 1, pinned);
        }
        if !self.terminal_recorded {
            // (Errors name the activation's first position.)
            let first = self.next_position;
            self.run(inbound.iter(), first)?;
        }
        let mut events = inbound;
        let custom_status = {
            let mut shared = lock(&self.shared);
            // Room for the commands and a terminal event at once: one reallocation at most.
            events.reserve(shared.issued.len() + usize::from(self.returned.is_some()));
            events.append(&mut shared.issued);
            if shared.custom_status_changed {
                shared.custom_status_changed = false;
                shared.custom_status.clone()
            } else {
                None
            }
        };
        if !self.terminal_recorded {
            if let Some(returned) = &self.returned {
                events.push(self.terminal_event(returned));
                self.terminal_recorded = true;
            }
        }
        let activation = self.next_activation;
        self.next_activation = self.next_activation.saturating_add(1);
        self.next_position += events.len() as u64;
        Ok(Activation {
            activation,
            events,
            custom_status,
        })
    }

    fn register_recorded_commands(&mut self, events: &[HistoryEvent]) -> Result<(), ReplayError> {
        let mut shared = lock(&self.shared);
        for e in events
            .iter()
            .filter(|e| e.event.family() == EventFamily::Command)
        {
            let Some(seq) = e.event.seq() else { continue };
            let known = shared.recorded.len();
            match (seq as usize).cmp(&known) {
                std::cmp::Ordering::Equal => shared.recorded.push(Record::Command(e.event.clone())),
                std::cmp::Ordering::Less => {
                    // Issued live by this very execution; it must be the same command (an
                    // activity call: the same activity at the same position, see `Record`).
                    if !shared.recorded[seq as usize].matches(&e.event) {
                        return Err(ReplayError::CorruptHistory {
                            instance_id: self.instance_id.clone(),
                            position: e.position,
                            message: format!("command at seq {seq} differs from the one issued"),
                        });
                    }
                }
                std::cmp::Ordering::Greater => {
                    return Err(ReplayError::CorruptHistory {
                        instance_id: self.instance_id.clone(),
                        position: e.position,
                        message: format!("command seq {seq} skips seq {known}"),
                    });
                }
            }
        }
        Ok(())
    }

    fn replay_activation(&mut self, batch: &[HistoryEvent]) -> Result<(), ReplayError> {
        if self.terminal_recorded {
            // The run ended in an earlier activation: late inbound events are recorded and
            // ignored, as `activate` does; nothing else can follow the end of a run.
            if let Some(e) = batch
                .iter()
                .find(|e| e.event.family() != EventFamily::Inbound)
            {
                let message = format!("{} after the end of the run", e.event.kind());
                return Err(self.corrupt(e.position, message));
            }
            return Ok(());
        }
        // Borrowed, not cloned: a long replay delivers one outcome per activation.
        let inbound: Vec<&Event> = batch
            .iter()
            .filter(|e| e.event.family() == EventFamily::Inbound)
            .map(|e| &e.event)
            .collect();
        let max_seq = batch
            .iter()
            .filter(|e| e.event.family() == EventFamily::Command)
            .filter_map(|e| e.event.seq())
            .max();
        let terminal = batch
            .iter()
            .find(|e| e.event.family() == EventFamily::Terminal);
        let terminal_position = terminal.map(|t| t.position);
        let first_seq = lock(&self.shared).next_seq;
        if !self.terminal_recorded {
            // Errors name the end of the run if the batch holds it, else its first position.
            let position = terminal_position
                .or_else(|| batch.first().map(|e| e.position))
                .unwrap_or(self.next_position);
            self.run(inbound.iter().copied(), position)?;
        }
        // The code must not request more commands in this activation than the recorded run did:
        // neither new ones nor ones the recorded run only issued in a later activation.
        let allowed = max_seq.map_or(first_seq, |m| first_seq.max(m.saturating_add(1)));
        let extra = {
            let shared = lock(&self.shared);
            (shared.next_seq > allowed).then(|| {
                shared
                    .recorded
                    .get(allowed as usize)
                    .and_then(Record::command_identity)
                    .unwrap_or_default()
            })
        };
        if let Some(requested) = extra {
            let recorded = terminal.map_or_else(
                || "nothing".to_string(),
                |t| format!("the end of the run ({})", t.event.kind()),
            );
            return Err(self.nondeterminism(allowed, recorded, requested));
        }
        // Every command recorded in this activation must have been requested again.
        if let Some(max_seq) = max_seq {
            let next_seq = lock(&self.shared).next_seq;
            if next_seq <= max_seq {
                let recorded = lock(&self.shared)
                    .recorded
                    .get(next_seq as usize)
                    .and_then(Record::command_identity)
                    .unwrap_or_default();
                return Err(self.nondeterminism(next_seq, recorded, "nothing".to_string()));
            }
        }
        if let Some(terminal) = terminal {
            if matches!(terminal.event, Event::InstanceTerminated { .. }) {
                self.terminal_recorded = true;
                return Ok(());
            }
            match &self.returned {
                Some(_) => self.terminal_recorded = true,
                None => {
                    let next_seq = lock(&self.shared).next_seq;
                    return Err(self.nondeterminism(
                        next_seq,
                        format!("the end of the run ({})", terminal.event.kind()),
                        "more work (the coordinator did not return)".to_string(),
                    ));
                }
            }
        } else if self.returned.is_some() {
            // The code returned where the recorded run did not.
            let next_seq = lock(&self.shared).next_seq;
            let recorded = lock(&self.shared)
                .recorded
                .get(next_seq as usize)
                .and_then(Record::command_identity)
                .unwrap_or_else(|| "more activations".to_string());
            return Err(self.nondeterminism(next_seq, recorded, "the end of the run".to_string()));
        }
        Ok(())
    }

    /// Delivers `inbound` and polls the coordinator until it stops making progress.
    fn run<'e>(
        &mut self,
        inbound: impl Iterator<Item = &'e Event>,
        position_hint: u64,
    ) -> Result<(), ReplayError> {
        let mut wakers = std::mem::take(&mut self.wakers);
        for event in inbound {
            match event {
                Event::InstanceStarted { input, parent, .. } => {
                    if self.future.is_some() || self.returned.is_some() {
                        return Err(self.corrupt(position_hint, "instance started twice".into()));
                    }
                    lock(&self.shared).parent = parent.clone();
                    let ctx = Context::new(Arc::clone(&self.shared));
                    let coordinator = &self.coordinator;
                    let started = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        coordinator(ctx, input.clone())
                    }));
                    match started {
                        Ok(future) => self.future = Some(future),
                        Err(payload) => return Err(self.panicked(position_hint, &*payload)),
                    }
                }
                other => lock(&self.shared).deliver(other, &mut wakers),
            }
        }
        for w in wakers.drain(..) {
            w.wake();
        }
        self.wakers = wakers;
        let Some(future) = self.future.as_mut() else {
            if self.returned.is_none() {
                return Err(
                    self.corrupt(position_hint, "history does not start the instance".into())
                );
            }
            return Ok(());
        };
        self.flag.0.store(true, Ordering::Release);
        let mut cx = std::task::Context::from_waker(&self.waker);
        let mut polls = 0u32;
        while self.flag.0.swap(false, Ordering::AcqRel) {
            polls += 1;
            if polls > POLLS_PER_ACTIVATION_MAX {
                return Err(self.corrupt(
                    position_hint,
                    "coordinator keeps waking itself without waiting on anything".into(),
                ));
            }
            // A panic in coordinator code is a bug in it, not in the history: the instance
            // stops with the panic as its reason (the future, half run, is dropped unpolled).
            match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx))) {
                Ok(Poll::Ready(result)) => {
                    self.returned = Some(result);
                    self.future = None;
                    break;
                }
                Ok(Poll::Pending) => {}
                Err(payload) => {
                    let error = self.panicked(position_hint, &*payload);
                    // Dropped here, and a second panic (in a local's `Drop`) caught too.
                    let future = self.future.take();
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop(future)));
                    return Err(error);
                }
            }
        }
        if let Some(nd) = lock(&self.shared).nondeterminism.take() {
            return Err(ReplayError::Nondeterminism(nd));
        }
        Ok(())
    }

    fn terminal_event(&self, returned: &Result<Value, Error>) -> Event {
        match returned {
            Ok(output) => Event::InstanceCompleted {
                output: output.clone(),
            },
            Err(Error::ContinueAsNew { input }) => Event::ContinuedAsNew {
                input: input.clone(),
            },
            Err(Error::Cancelled { reason }) => Event::InstanceCancelled {
                reason: reason.clone(),
            },
            Err(error) => Event::InstanceFailed {
                error: error.clone(),
            },
        }
    }

    fn nondeterminism(&self, position: u32, recorded: String, requested: String) -> ReplayError {
        ReplayError::Nondeterminism(Nondeterminism {
            instance_id: self.instance_id.clone(),
            position,
            recorded,
            requested,
        })
    }

    fn panicked(&self, position: u64, payload: &(dyn std::any::Any + Send)) -> ReplayError {
        let message = if let Some(text) = payload.downcast_ref::<&str>() {
            (*text).to_string()
        } else if let Some(text) = payload.downcast_ref::<String>() {
            text.clone()
        } else {
            "a panic without a message".to_string()
        };
        ReplayError::Panicked {
            instance_id: self.instance_id.clone(),
            position,
            message,
        }
    }

    fn corrupt(&self, position: u64, message: String) -> ReplayError {
        ReplayError::CorruptHistory {
            instance_id: self.instance_id.clone(),
            position,
            message,
        }
    }
}

/// Replays a whole recorded history against `coordinator`, with no database and no worker.
/// Returns `Ok` when the code reproduces every recorded command, or the first divergence.
///
/// # Errors
/// The first [`ReplayError`] met.
pub fn replay_history(
    instance_id: &str,
    coordinator: CoordinatorFn,
    history: &[HistoryEvent],
) -> Result<(), ReplayError> {
    let mut execution = Execution::new(instance_id, coordinator);
    execution.replay(history)
}
