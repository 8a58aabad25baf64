//! Test harness for the replay machinery: no database, no clock, no threads.
//!
//! - [`Driver`] runs a coordinator live, activation by activation, the way a worker would, and
//!   records the resulting history exactly as a store would (positions from 0, each activation's
//!   events tagged with the activation number).
//! - [`HistoryBuilder`] writes canned histories by hand.
//! - Free functions build events (`completed(0, json!(1))`, `fired(2)`, …).
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use retrace_sdk::{
    Activation, ActivityFailure, CoordinatorFn, Error, Event, EventFamily, Execution, HistoryEvent,
    ReplayError, RetrySpec,
};
use serde_json::Value;

/// The time of the first activation of every driver, in ms since the Unix epoch.
pub const T0: u64 = 1_700_000_000_000;

/// The random seed a [`Driver`] passes with activation number `activation`.
pub fn seed_of(activation: u32) -> u64 {
    0x5EED_0000_0000_0000 ^ u64::from(activation).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Runs one coordinator live and records its history.
pub struct Driver {
    /// The instance id.
    pub instance_id: String,
    coordinator: CoordinatorFn,
    /// The live execution (replaced by [`Driver::restart`]).
    pub execution: Execution,
    /// Everything appended so far.
    pub history: Vec<HistoryEvent>,
    /// What `ctx.now()` sees in the next activation (recorded as the events' `recorded_at_ms`).
    pub now_ms: u64,
    /// Every live activation's result, in order.
    pub activations: Vec<Activation>,
    /// The patches the code declares (pinned by a run that starts live).
    pub patches: &'static [&'static str],
}

impl Driver {
    /// A driver of `coordinator` for instance `instance_id`; nothing runs until [`Driver::start`].
    pub fn new(instance_id: &str, coordinator: CoordinatorFn) -> Self {
        Driver {
            instance_id: instance_id.to_string(),
            execution: Execution::new(instance_id, coordinator.clone()),
            coordinator,
            history: Vec::new(),
            now_ms: T0,
            activations: Vec::new(),
            patches: &[],
        }
    }

    /// The same driver, for code that declares `patches` (see `Coordinator::with_patches`).
    pub fn with_patches(mut self, patches: &'static [&'static str]) -> Self {
        self.patches = patches;
        self.execution = self.fresh();
        self
    }

    /// Delivers `InstanceStarted` with `input` as the first activation.
    pub fn start(&mut self, coordinator_name: &str, input: Value) -> Activation {
        self.activate(vec![started(coordinator_name, input)])
    }

    /// Delivers a batch of inbound events, records the activation's events in the history.
    pub fn try_activate(&mut self, inbound: Vec<Event>) -> Result<Activation, ReplayError> {
        let seed = seed_of(self.execution.next_activation());
        let activation = self.execution.activate(inbound, self.now_ms, seed)?;
        append_activation(
            &mut self.history,
            activation.activation,
            self.now_ms,
            &activation.events,
        );
        self.activations.push(activation.clone());
        Ok(activation)
    }

    /// [`Driver::try_activate`], panicking on an error.
    pub fn activate(&mut self, inbound: Vec<Event>) -> Activation {
        match self.try_activate(inbound) {
            Ok(a) => a,
            Err(e) => panic!("activation of {} failed: {e}", self.instance_id),
        }
    }

    /// Completes activity call `seq` with `output`.
    pub fn complete(&mut self, seq: u32, output: Value) -> Activation {
        self.activate(vec![completed(seq, output)])
    }

    /// Fails activity call `seq` for good (non-retryable), as the runtime would report it.
    pub fn fail(&mut self, seq: u32, kind: &str, message: &str) -> Activation {
        let name = self
            .activity_name(seq)
            .unwrap_or_else(|| panic!("no activity at seq {seq}"));
        self.activate(vec![failed(seq, &name, kind, message)])
    }

    /// Fires timer `seq`.
    pub fn fire(&mut self, seq: u32) -> Activation {
        self.activate(vec![fired(seq)])
    }

    /// Delivers a signal.
    pub fn signal(&mut self, name: &str, payload: Value) -> Activation {
        self.activate(vec![signal(name, payload)])
    }

    /// Delivers a cancellation request.
    pub fn cancel(&mut self, reason: &str) -> Activation {
        self.activate(vec![cancel(reason)])
    }

    /// Advances the clock of the next activations.
    pub fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
    }

    /// Drops the execution and rebuilds it by replaying the whole recorded history (a crash, or
    /// a cache eviction).
    pub fn restart(&mut self) -> Result<(), ReplayError> {
        let mut execution = self.fresh();
        execution.replay(&self.history)?;
        self.execution = execution;
        Ok(())
    }

    /// A fresh execution of the same coordinator, with nothing replayed.
    pub fn fresh(&self) -> Execution {
        Execution::new(&self.instance_id, self.coordinator.clone()).with_patches(self.patches)
    }

    /// Checks that every recorded activation is reproduced live (see
    /// [`check_every_activation_reproduces`]), with this driver's patches.
    pub fn check_reproduces(&self) -> Result<(), String> {
        check_activations_reproduce(
            &self.instance_id,
            &self.coordinator,
            self.patches,
            &self.history,
        )
    }

    /// The coordinator.
    pub fn coordinator(&self) -> CoordinatorFn {
        self.coordinator.clone()
    }

    /// The commands in history, in order.
    pub fn commands(&self) -> Vec<Event> {
        self.history
            .iter()
            .filter(|e| e.event.family() == EventFamily::Command)
            .map(|e| e.event.clone())
            .collect()
    }

    /// The command identities in history, in order (`activity reserve_car`, `timer`, …).
    pub fn identities(&self) -> Vec<String> {
        self.commands()
            .iter()
            .filter_map(Event::command_identity)
            .collect()
    }

    /// The command at `seq`.
    pub fn command(&self, seq: u32) -> Option<Event> {
        self.commands().into_iter().find(|e| e.seq() == Some(seq))
    }

    /// The name of the activity scheduled at `seq`.
    pub fn activity_name(&self, seq: u32) -> Option<String> {
        match self.command(seq) {
            Some(Event::ActivityScheduled { name, .. }) => Some(name),
            _ => None,
        }
    }

    /// The seq of the first activity call named `name`, if any.
    pub fn seq_of(&self, name: &str) -> Option<u32> {
        self.commands().iter().find_map(|e| match e {
            Event::ActivityScheduled { seq, name: n, .. } if n == name => Some(*seq),
            _ => None,
        })
    }

    /// Activity calls scheduled and without an outcome in history, by seq.
    pub fn open_activities(&self) -> Vec<u32> {
        open_activities(&self.history)
    }

    /// Timers started and not fired in history, by seq.
    pub fn open_timers(&self) -> Vec<u32> {
        open_timers(&self.history)
    }

    /// The terminal event, if the run ended.
    pub fn terminal(&self) -> Option<&Event> {
        self.history
            .iter()
            .map(|e| &e.event)
            .find(|e| e.family() == EventFamily::Terminal)
    }

    /// The output of a completed run.
    pub fn output(&self) -> Value {
        match self.terminal() {
            Some(Event::InstanceCompleted { output }) => output.clone(),
            other => panic!("instance {} did not complete: {other:?}", self.instance_id),
        }
    }
}

/// Appends one activation's events to a history, numbering positions.
pub fn append_activation(
    history: &mut Vec<HistoryEvent>,
    activation: u32,
    recorded_at_ms: u64,
    events: &[Event],
) {
    for event in events {
        history.push(HistoryEvent {
            position: history.len() as u64,
            activation,
            recorded_at_ms,
            event: event.clone(),
        });
    }
}

/// Writes a history by hand, one activation at a time.
#[derive(Debug, Default, Clone)]
pub struct HistoryBuilder {
    events: Vec<HistoryEvent>,
    next_activation: u32,
}

impl HistoryBuilder {
    /// An empty history.
    pub fn new() -> Self {
        HistoryBuilder::default()
    }

    /// Appends the next activation, holding `events` (inbound events, commands, terminal).
    pub fn activation(mut self, events: impl IntoIterator<Item = Event>) -> Self {
        let events: Vec<Event> = events.into_iter().collect();
        let activation = self.next_activation;
        append_activation(
            &mut self.events,
            activation,
            T0 + u64::from(activation),
            &events,
        );
        self.next_activation += 1;
        self
    }

    /// The history.
    pub fn build(self) -> Vec<HistoryEvent> {
        self.events
    }
}

/// The events of the first `n` activations of `history`.
pub fn through(history: &[HistoryEvent], n: usize) -> &[HistoryEvent] {
    let end: usize = activations(history).iter().take(n).map(|g| g.len()).sum();
    &history[..end]
}

/// `PatchesPinned` with `patches`, as a run started live records it after `InstanceStarted`.
pub fn pinned(patches: &[&str]) -> Event {
    Event::PatchesPinned {
        patches: patches.iter().map(|p| p.to_string()).collect(),
    }
}

/// Splits a history into its activations.
pub fn activations(history: &[HistoryEvent]) -> Vec<&[HistoryEvent]> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < history.len() {
        let a = history[start].activation;
        let end = history[start..]
            .iter()
            .position(|e| e.activation != a)
            .map_or(history.len(), |offset| start + offset);
        out.push(&history[start..end]);
        start = end;
    }
    out
}

/// The inbound events of some history events, in order.
pub fn inbound_of(events: &[HistoryEvent]) -> Vec<Event> {
    events
        .iter()
        .filter(|e| e.event.family() == EventFamily::Inbound)
        .map(|e| e.event.clone())
        .collect()
}

/// The events of some history events, in order.
pub fn events_of(events: &[HistoryEvent]) -> Vec<Event> {
    events.iter().map(|e| e.event.clone()).collect()
}

/// Replays `history` into a fresh execution.
pub fn replay_fresh(
    instance_id: &str,
    coordinator: &CoordinatorFn,
    history: &[HistoryEvent],
) -> Result<Execution, ReplayError> {
    let mut execution = Execution::new(instance_id, coordinator.clone());
    execution.replay(history)?;
    Ok(execution)
}

/// Replays `history` into a fresh execution in several `replay` calls, split before the
/// activations listed in `cuts` (indices into [`activations`]).
pub fn replay_in_chunks(
    instance_id: &str,
    coordinator: &CoordinatorFn,
    history: &[HistoryEvent],
    cuts: &[usize],
) -> Result<Execution, ReplayError> {
    let groups = activations(history);
    let mut execution = Execution::new(instance_id, coordinator.clone());
    let mut chunk: Vec<HistoryEvent> = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        if cuts.contains(&i) && !chunk.is_empty() {
            execution.replay(&chunk)?;
            chunk.clear();
        }
        chunk.extend(group.iter().cloned());
    }
    execution.replay(&chunk)?;
    Ok(execution)
}

/// Checks that every activation of `history` is reproduced by replaying the activations before
/// it and activating its inbound events live (with the activation's recorded time and the
/// [`seed_of`] its number): the same commands and terminal, in the same order. Returns a
/// description of the first difference. For code that declares no patch.
pub fn check_every_activation_reproduces(
    instance_id: &str,
    coordinator: &CoordinatorFn,
    history: &[HistoryEvent],
) -> Result<(), String> {
    check_activations_reproduce(instance_id, coordinator, &[], history)
}

/// [`check_every_activation_reproduces`] for code that declares `patches`.
pub fn check_activations_reproduce(
    instance_id: &str,
    coordinator: &CoordinatorFn,
    patches: &[&str],
    history: &[HistoryEvent],
) -> Result<(), String> {
    let groups = activations(history);
    let mut offset = 0;
    for group in groups {
        let mut execution = Execution::new(instance_id, coordinator.clone()).with_patches(patches);
        execution
            .replay(&history[..offset])
            .map_err(|e| format!("replay of the first {offset} events failed: {e}"))?;
        let first = &group[0];
        let live = execution
            .activate(
                inbound_of(group),
                first.recorded_at_ms,
                seed_of(first.activation),
            )
            .map_err(|e| format!("activation at position {offset} failed: {e}"))?;
        let recorded = events_of(group);
        if live.events != recorded {
            return Err(format!(
                "activation at position {offset} differs:\n recorded: {recorded:?}\n live:     {:?}",
                live.events
            ));
        }
        offset += group.len();
    }
    Ok(())
}

/// Activity calls scheduled and without an outcome in `history`, by seq.
pub fn open_activities(history: &[HistoryEvent]) -> Vec<u32> {
    let mut open = Vec::new();
    for e in history {
        match &e.event {
            Event::ActivityScheduled { seq, .. } => open.push(*seq),
            Event::ActivityCompleted { seq, .. } | Event::ActivityFailed { seq, .. } => {
                open.retain(|s| s != seq)
            }
            _ => {}
        }
    }
    open
}

/// Timers started and not fired in `history`, by seq.
pub fn open_timers(history: &[HistoryEvent]) -> Vec<u32> {
    let mut open = Vec::new();
    for e in history {
        match &e.event {
            Event::TimerStarted { seq, .. } => open.push(*seq),
            Event::TimerFired { seq } => open.retain(|s| s != seq),
            _ => {}
        }
    }
    open
}

// ----- event constructors -----

/// `InstanceStarted`.
pub fn started(coordinator: &str, input: Value) -> Event {
    Event::InstanceStarted {
        coordinator: coordinator.to_string(),
        input,
        parent: None,
    }
}

/// `ActivityCompleted` on the first attempt.
pub fn completed(seq: u32, output: Value) -> Event {
    Event::ActivityCompleted {
        seq,
        output,
        attempt: 1,
    }
}

/// `ActivityFailed`, non-retryable, on the first attempt.
pub fn failed(seq: u32, activity: &str, kind: &str, message: &str) -> Event {
    Event::ActivityFailed {
        seq,
        failure: ActivityFailure {
            activity: activity.to_string(),
            position: seq,
            attempt: 1,
            kind: kind.to_string(),
            message: message.to_string(),
            non_retryable: true,
        },
    }
}

/// `TimerFired`.
pub fn fired(seq: u32) -> Event {
    Event::TimerFired { seq }
}

/// `SignalReceived`.
pub fn signal(name: &str, payload: Value) -> Event {
    Event::SignalReceived {
        name: name.to_string(),
        payload,
    }
}

/// `CancelRequested`.
pub fn cancel(reason: &str) -> Event {
    Event::CancelRequested {
        reason: reason.to_string(),
    }
}

/// `ChildCompleted`.
pub fn child_completed(seq: u32, result: Result<Value, Error>) -> Event {
    Event::ChildCompleted { seq, result }
}

/// `ActivityScheduled` with the default retry policy.
pub fn scheduled(seq: u32, name: &str, input: Value) -> Event {
    Event::ActivityScheduled {
        seq,
        name: name.to_string(),
        input,
        retry: RetrySpec::default(),
    }
}

/// `TimerStarted`.
pub fn timer(seq: u32, fire_at_ms: u64) -> Event {
    Event::TimerStarted { seq, fire_at_ms }
}

/// `SignalAwaited`.
pub fn awaited(seq: u32, name: &str) -> Event {
    Event::SignalAwaited {
        seq,
        name: name.to_string(),
    }
}

/// `SideEffect`.
pub fn side_effect(seq: u32, name: &str, value: Value) -> Event {
    Event::SideEffect {
        seq,
        name: name.to_string(),
        value,
    }
}

/// `PatchMarker`.
pub fn marker(seq: u32, patch: &str) -> Event {
    Event::PatchMarker {
        seq,
        patch: patch.to_string(),
    }
}

/// `InstanceCompleted`.
pub fn instance_completed(output: Value) -> Event {
    Event::InstanceCompleted { output }
}
