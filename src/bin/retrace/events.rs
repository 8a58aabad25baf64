//! Reading a history for people: one row per event (for `show`), and one call per command with
//! its outcome, duration and attempts (for `show` and `timeline`).
//!
//! Outcomes are paired with their commands by command position (`seq`); signals are paired
//! with waits by name, in order. A call is marked as a **compensation** when it was scheduled
//! after the run's first failed activity call or cancellation request: that is when a saga
//! unwinds. The history does not record the intent, so this is a reading, not a fact.
//!
//! Times come from `recorded_at_ms`: when the store recorded the event. An outcome is recorded
//! when the activation that delivers it commits, so a duration is "from scheduled to delivered",
//! retries and queueing included.

use crate::table::{payload, utc};
use retrace::sdk::{Event, EventFamily, HistoryEvent};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// How long a payload summary may be in a row.
const SUMMARY_MAX: usize = 60;

/// One history event, described.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    /// Position in the history.
    pub(crate) position: u64,
    /// Activation (delivery batch).
    pub(crate) activation: u32,
    /// When it was recorded, ms since the Unix epoch.
    pub(crate) recorded_at_ms: u64,
    /// Milliseconds since the first event.
    pub(crate) offset_ms: u64,
    /// The event kind (`activity_completed`…).
    pub(crate) kind: &'static str,
    /// The activity, timer, signal, child or coordinator name.
    pub(crate) name: String,
    /// The command position it carries or resolves.
    pub(crate) seq: Option<u32>,
    /// The attempt, for activity outcomes.
    pub(crate) attempt: Option<u32>,
    /// For an outcome: time since its command was recorded.
    pub(crate) duration_ms: Option<u64>,
    /// A short payload summary, or an error in full.
    pub(crate) detail: String,
    /// Whether the detail is an error (shown in full).
    pub(crate) is_error: bool,
    /// Whether this call looks like a compensation (see the module docs).
    pub(crate) compensation: bool,
}

/// What a command is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CallKind {
    Activity,
    Timer,
    Signal,
    Child,
}

/// How a command ended, so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Outcome {
    /// Completed (an activity or child), fired (a timer), received (a signal).
    Done,
    /// Failed for good, with the error.
    Failed(String),
    /// No outcome in the history yet.
    Pending,
}

/// A command and its outcome.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Call {
    pub(crate) kind: CallKind,
    /// The command position; `None` for a signal that arrived but was never awaited.
    pub(crate) seq: Option<u32>,
    /// Activity name, signal name, child coordinator, or `timer`.
    pub(crate) name: String,
    /// History position of the command.
    pub(crate) position: u64,
    pub(crate) started_at_ms: u64,
    /// When the outcome was recorded.
    pub(crate) ended_at_ms: Option<u64>,
    pub(crate) outcome: Outcome,
    /// The attempt that produced the outcome (activities).
    pub(crate) attempts: Option<u32>,
    pub(crate) compensation: bool,
    /// A short summary: input and output, or the error.
    pub(crate) detail: String,
}

/// Where the run started unwinding, if it did: the position of its first failed activity
/// outcome or cancellation request; or, in a run that ended failed or cancelled, of its first
/// activity call whose input is the output of an earlier call (a saga undoing a step passes it
/// what the step returned), so that a saga unwound by the code's own decision (a timeout) is
/// recognised too.
fn unwinding_from(history: &[HistoryEvent]) -> Option<u64> {
    let failure = history
        .iter()
        .find(|e| {
            matches!(
                e.event,
                Event::ActivityFailed { .. } | Event::CancelRequested { .. }
            )
        })
        .map(|e| e.position);
    let ended_badly = history.last().is_some_and(|e| {
        matches!(
            e.event,
            Event::InstanceFailed { .. } | Event::InstanceCancelled { .. }
        )
    });
    if !ended_badly {
        return failure;
    }
    let mut outputs: Vec<&serde_json::Value> = Vec::new();
    let undo = history.iter().find_map(|e| match &e.event {
        Event::ActivityCompleted { output, .. } => {
            if !output.is_null() {
                outputs.push(output);
            }
            None
        }
        Event::ActivityScheduled { input, .. } if outputs.contains(&input) => Some(e.position),
        _ => None,
    });
    match (failure, undo) {
        (Some(a), Some(b)) => Some(a.min(b.saturating_sub(1))),
        (a, b) => a.or(b.map(|p| p.saturating_sub(1))),
    }
}

/// Every command of `history` with its outcome, in command order.
pub(crate) fn calls(history: &[HistoryEvent]) -> Vec<Call> {
    let unwinding = unwinding_from(history);
    let mut calls: BTreeMap<u32, Call> = BTreeMap::new();
    let mut awaited: HashMap<String, VecDeque<u32>> = HashMap::new();
    let mut received_early: HashMap<String, VecDeque<(u64, String)>> = HashMap::new();
    for e in history {
        let compensation = unwinding.is_some_and(|p| e.position > p);
        let open = |kind, seq: u32, name: String, detail: String| Call {
            kind,
            seq: Some(seq),
            name,
            position: e.position,
            started_at_ms: e.recorded_at_ms,
            ended_at_ms: None,
            outcome: Outcome::Pending,
            attempts: None,
            compensation: compensation && kind == CallKind::Activity,
            detail,
        };
        match &e.event {
            Event::ActivityScheduled {
                seq, name, input, ..
            } => {
                let call = open(
                    CallKind::Activity,
                    *seq,
                    name.clone(),
                    format!("input {}", payload(input, SUMMARY_MAX)),
                );
                calls.insert(*seq, call);
            }
            Event::TimerStarted { seq, fire_at_ms } => {
                let call = open(
                    CallKind::Timer,
                    *seq,
                    "timer".to_string(),
                    format!("due {}", utc(*fire_at_ms)),
                );
                calls.insert(*seq, call);
            }
            Event::SignalAwaited { seq, name } => {
                let mut call = open(CallKind::Signal, *seq, name.clone(), String::new());
                if let Some((_, summary)) =
                    received_early.get_mut(name).and_then(VecDeque::pop_front)
                {
                    // Buffered before the wait: the wait ended at once.
                    call.ended_at_ms = Some(e.recorded_at_ms);
                    call.outcome = Outcome::Done;
                    call.detail = summary;
                } else {
                    awaited.entry(name.clone()).or_default().push_back(*seq);
                }
                calls.insert(*seq, call);
            }
            Event::ChildStarted {
                seq,
                instance_id,
                coordinator,
                ..
            } => {
                let call = open(
                    CallKind::Child,
                    *seq,
                    coordinator.clone(),
                    format!("child {instance_id}"),
                );
                calls.insert(*seq, call);
            }
            Event::ActivityCompleted {
                seq,
                output,
                attempt,
            } => {
                if let Some(c) = calls.get_mut(seq) {
                    c.ended_at_ms = Some(e.recorded_at_ms);
                    c.outcome = Outcome::Done;
                    c.attempts = Some(*attempt);
                    c.detail = format!("{} -> {}", c.detail, payload(output, SUMMARY_MAX));
                }
            }
            Event::ActivityFailed { seq, failure } => {
                if let Some(c) = calls.get_mut(seq) {
                    c.ended_at_ms = Some(e.recorded_at_ms);
                    c.outcome = Outcome::Failed(format!("{}: {}", failure.kind, failure.message));
                    c.attempts = Some(failure.attempt);
                }
            }
            Event::TimerFired { seq } => {
                if let Some(c) = calls.get_mut(seq) {
                    c.ended_at_ms = Some(e.recorded_at_ms);
                    c.outcome = Outcome::Done;
                }
            }
            Event::SignalReceived { name, payload: p } => {
                let summary = format!("payload {}", payload(p, SUMMARY_MAX));
                match awaited.get_mut(name).and_then(VecDeque::pop_front) {
                    Some(seq) => {
                        if let Some(c) = calls.get_mut(&seq) {
                            c.ended_at_ms = Some(e.recorded_at_ms);
                            c.outcome = Outcome::Done;
                            c.detail = summary;
                        }
                    }
                    None => received_early
                        .entry(name.clone())
                        .or_default()
                        .push_back((e.recorded_at_ms, summary)),
                }
            }
            Event::ChildCompleted { seq, result } => {
                if let Some(c) = calls.get_mut(seq) {
                    c.ended_at_ms = Some(e.recorded_at_ms);
                    match result {
                        Ok(v) => {
                            c.outcome = Outcome::Done;
                            c.detail = format!("{} -> {}", c.detail, payload(v, SUMMARY_MAX));
                        }
                        Err(err) => c.outcome = Outcome::Failed(err.to_string()),
                    }
                }
            }
            _ => {}
        }
    }
    let mut all: Vec<Call> = calls.into_values().collect();
    // Signals that arrived but that the code never waited for.
    for (name, received) in received_early {
        for (at_ms, summary) in received {
            all.push(Call {
                kind: CallKind::Signal,
                seq: None,
                name: name.clone(),
                position: 0,
                started_at_ms: at_ms,
                ended_at_ms: Some(at_ms),
                outcome: Outcome::Done,
                attempts: None,
                compensation: false,
                detail: format!("received, never awaited; {summary}"),
            });
        }
    }
    all
}

/// One row per event of `history`.
pub(crate) fn rows(history: &[HistoryEvent]) -> Vec<Row> {
    let start_ms = history.first().map_or(0, |e| e.recorded_at_ms);
    let unwinding = unwinding_from(history);
    let mut commands: HashMap<u32, (String, u64)> = HashMap::new();
    let mut signal_waits: HashMap<String, VecDeque<u64>> = HashMap::new();
    let mut out = Vec::with_capacity(history.len());
    for e in history {
        let mut row = Row {
            position: e.position,
            activation: e.activation,
            recorded_at_ms: e.recorded_at_ms,
            offset_ms: e.recorded_at_ms.saturating_sub(start_ms),
            kind: e.event.kind(),
            name: String::new(),
            seq: e.event.seq(),
            attempt: None,
            duration_ms: None,
            detail: String::new(),
            is_error: false,
            compensation: false,
        };
        let since = |seq: &u32, commands: &HashMap<u32, (String, u64)>| {
            commands
                .get(seq)
                .map(|(name, at)| (name.clone(), e.recorded_at_ms.saturating_sub(*at)))
        };
        match &e.event {
            Event::InstanceStarted {
                coordinator, input, ..
            } => {
                row.name = coordinator.clone();
                row.detail = format!("input {}", payload(input, SUMMARY_MAX));
            }
            Event::ActivityScheduled {
                seq, name, input, ..
            } => {
                commands.insert(*seq, (name.clone(), e.recorded_at_ms));
                row.name = name.clone();
                row.compensation = unwinding.is_some_and(|p| e.position > p);
                row.detail = format!("input {}", payload(input, SUMMARY_MAX));
                if row.compensation {
                    row.detail = format!("compensation; {}", row.detail);
                }
            }
            Event::ActivityCompleted {
                seq,
                output,
                attempt,
            } => {
                if let Some((name, d)) = since(seq, &commands) {
                    row.name = name;
                    row.duration_ms = Some(d);
                }
                row.attempt = Some(*attempt);
                row.detail = format!("output {}", payload(output, SUMMARY_MAX));
            }
            Event::ActivityFailed { seq, failure } => {
                if let Some((_, d)) = since(seq, &commands) {
                    row.duration_ms = Some(d);
                }
                row.name = failure.activity.clone();
                row.attempt = Some(failure.attempt);
                row.detail = failure.to_string();
                row.is_error = true;
            }
            Event::TimerStarted { seq, fire_at_ms } => {
                commands.insert(*seq, ("timer".to_string(), e.recorded_at_ms));
                row.name = "timer".to_string();
                row.detail = format!(
                    "due {} (in {})",
                    utc(*fire_at_ms),
                    crate::table::duration(fire_at_ms.saturating_sub(e.recorded_at_ms))
                );
            }
            Event::TimerFired { seq } => {
                if let Some((name, d)) = since(seq, &commands) {
                    row.name = name;
                    row.duration_ms = Some(d);
                }
            }
            Event::SignalAwaited { seq, name } => {
                commands.insert(*seq, (name.clone(), e.recorded_at_ms));
                signal_waits
                    .entry(name.clone())
                    .or_default()
                    .push_back(e.recorded_at_ms);
                row.name = name.clone();
            }
            Event::SignalReceived { name, payload: p } => {
                row.name = name.clone();
                row.detail = format!("payload {}", payload(p, SUMMARY_MAX));
                if let Some(at) = signal_waits.get_mut(name).and_then(VecDeque::pop_front) {
                    row.duration_ms = Some(e.recorded_at_ms.saturating_sub(at));
                }
            }
            Event::ChildStarted {
                seq,
                instance_id,
                coordinator,
                ..
            } => {
                commands.insert(*seq, (coordinator.clone(), e.recorded_at_ms));
                row.name = coordinator.clone();
                row.detail = format!("child {instance_id}");
            }
            Event::ChildCompleted { seq, result } => {
                if let Some((name, d)) = since(seq, &commands) {
                    row.name = name;
                    row.duration_ms = Some(d);
                }
                match result {
                    Ok(v) => row.detail = format!("output {}", payload(v, SUMMARY_MAX)),
                    Err(err) => {
                        row.detail = err.to_string();
                        row.is_error = true;
                    }
                }
            }
            Event::SideEffect { name, value, .. } => {
                row.name = name.clone();
                row.detail = format!("value {}", payload(value, SUMMARY_MAX));
            }
            Event::PatchMarker { patch, .. } => row.name = patch.clone(),
            Event::CancelRequested { reason } => {
                row.detail = reason.clone();
                row.is_error = true;
            }
            Event::InstanceCompleted { output } => {
                row.detail = format!("output {}", payload(output, SUMMARY_MAX));
            }
            Event::InstanceFailed { error } => {
                row.detail = error.to_string();
                row.is_error = true;
            }
            Event::InstanceCancelled { reason } | Event::InstanceTerminated { reason } => {
                row.detail = reason.clone();
                row.is_error = true;
            }
            Event::ContinuedAsNew { input } => {
                row.detail = format!("next input {}", payload(input, SUMMARY_MAX));
            }
            _ => {}
        }
        debug_assert!(row.seq.is_some() || e.event.family() != EventFamily::Command);
        out.push(row);
    }
    out
}
