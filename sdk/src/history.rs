//! The history data model: the events journaled for one instance.
//!
//! A history is the only truth about an instance. It is a list of [`HistoryEvent`]s, numbered
//! from 0 without gaps, grouped into **activations**: each activation holds the inbound events
//! delivered to the coordinator in one batch (an activity result, a fired timer, a signal…)
//! followed by the commands the coordinator issued in response. Replay re-delivers the inbound
//! events in the same batches, in the same order.
//!
//! Events fall into three families (see [`EventFamily`]):
//! - **commands** carry a `seq`, the position of the command in the order the coordinator issued
//!   it; replay matches command *n* of the code against command *n* of the history;
//! - **inbound** events resolve commands (`seq`) or arrive from outside (signals, cancellation);
//! - **terminal** events end a run.
//!
//! `Serialize` is a compatibility promise: events written by older versions must keep decoding.
//! New fields get `#[serde(default)]`; variants are never renamed.

use crate::error::{ActivityFailure, Error};
use crate::retry::RetrySpec;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What an `activity_scheduled` event without a `retry` field means: 10 attempts, 100 ms
/// doubling up to 10 s, no non-retryable kinds, no timeouts. Fixed for good, whatever
/// `RetryPolicy::new()` becomes: a stored history must mean what it meant when written.
pub(crate) fn standard_retry() -> RetrySpec {
    RetrySpec {
        max_attempts: 10,
        initial_interval_ms: 100,
        backoff_coefficient: 2.0,
        max_interval_ms: 10_000,
        non_retryable: Vec::new(),
        start_to_close_timeout_ms: None,
        heartbeat_timeout_ms: None,
    }
}

fn is_standard_retry(retry: &RetrySpec) -> bool {
    *retry == standard_retry()
}

/// Version of the event schema, written into exported histories.
pub const EVENT_SCHEMA_VERSION: u32 = 1;

/// One journaled event.
///
/// Serialized as a JSON object tagged by `type`. Decoding is hand-written (module `wire`)
/// because it is the hot path of every cold replay: serde's derived decoder for internally tagged
/// enums buffers each object before decoding it a second time.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    // ----- inbound -----
    /// The instance was started (or continued as new) with this input. Always event 0.
    InstanceStarted {
        /// The coordinator's registered name.
        coordinator: String,
        /// The input, as JSON.
        input: Value,
        /// The parent instance and the parent's call position, when started as a child.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<ParentRef>,
    },
    /// An activity call produced its result.
    ActivityCompleted {
        /// The call position.
        seq: u32,
        /// The result, as JSON.
        output: Value,
        /// The attempt that succeeded, counting from 1.
        attempt: u32,
    },
    /// An activity call failed for good.
    ActivityFailed {
        /// The call position.
        seq: u32,
        /// Why, and on which attempt.
        failure: ActivityFailure,
    },
    /// A durable timer fired.
    TimerFired {
        /// The timer's command position.
        seq: u32,
    },
    /// A signal arrived. Signals are buffered per name, in arrival order, until awaited.
    SignalReceived {
        /// The signal's name.
        name: String,
        /// The payload, as JSON.
        payload: Value,
    },
    /// A child instance ended.
    ChildCompleted {
        /// The parent's call position that started the child.
        seq: u32,
        /// The child's output, or its error.
        result: Result<Value, Error>,
    },
    /// A client asked to cancel the instance.
    CancelRequested {
        /// Why.
        reason: String,
    },
    /// The patches the code declared when this run started (see
    /// [`crate::Coordinator::with_patches`]). Written by the engine right after
    /// `InstanceStarted`; the run follows these patches to its end, whatever code replays it.
    PatchesPinned {
        /// The declared patch ids.
        patches: Vec<String>,
    },

    // ----- commands -----
    /// The coordinator called an activity.
    ActivityScheduled {
        /// The call position.
        seq: u32,
        /// The activity's registered name.
        name: String,
        /// The input, as JSON.
        input: Value,
        /// The retry policy of this call. Left out of the JSON form when it is the standard
        /// policy (10 attempts, 100 ms doubling up to 10 s, no non-retryable kinds, no
        /// timeouts: `RetryPolicy::new()`), which decoding then restores: most calls use it, and
        /// it was two thirds of every stored `activity_scheduled` body. (History format
        /// version 2.)
        #[serde(default = "standard_retry", skip_serializing_if = "is_standard_retry")]
        retry: RetrySpec,
    },
    /// The coordinator started a durable timer.
    TimerStarted {
        /// The command position.
        seq: u32,
        /// When it fires, in milliseconds since the Unix epoch.
        fire_at_ms: u64,
    },
    /// The coordinator began waiting for the next signal of a name.
    SignalAwaited {
        /// The command position.
        seq: u32,
        /// The signal's name.
        name: String,
    },
    /// The coordinator started a child instance.
    ChildStarted {
        /// The command position.
        seq: u32,
        /// The child's instance id.
        instance_id: String,
        /// The child's coordinator name.
        coordinator: String,
        /// The child's input.
        input: Value,
        /// Started without waiting for its result: the child has no parent link and its end is
        /// not reported back.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        detached: bool,
    },
    /// A value the code obtained once (time, randomness, an id, any recorded side effect), so that
    /// replay returns the same value.
    SideEffect {
        /// The command position.
        seq: u32,
        /// What kind of value (`now`, `uuid`, `random`, or a caller-chosen name).
        name: String,
        /// The value.
        value: Value,
    },
    /// A versioning marker: the code took the patched path at this point.
    PatchMarker {
        /// The command position.
        seq: u32,
        /// The patch id.
        patch: String,
    },

    // ----- terminal -----
    /// The coordinator returned `Ok`.
    InstanceCompleted {
        /// The output, as JSON.
        output: Value,
    },
    /// The coordinator returned an error.
    InstanceFailed {
        /// The error.
        error: Error,
    },
    /// The coordinator ended after observing a cancellation.
    InstanceCancelled {
        /// Why it was cancelled.
        reason: String,
    },
    /// A client terminated the instance; no code ran to end it.
    InstanceTerminated {
        /// Why.
        reason: String,
    },
    /// The coordinator restarted itself with new input; this history ends here.
    ContinuedAsNew {
        /// The input of the next run.
        input: Value,
    },
}

mod wire {
    //! One-pass decoding of [`Event`]: every field of every variant into one flat struct, then
    //! the variant named by `type` is built from it. A missing required field, a field of the
    //! wrong type, or an unknown `type` is an error, as with a derived decoder; unknown fields
    //! are ignored, as before.

    use super::{Event, ParentRef};
    use crate::error::{ActivityFailure, Error};
    use crate::retry::RetrySpec;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;
    use std::borrow::Cow;

    const VARIANTS: &[&str] = &[
        "instance_started",
        "activity_completed",
        "activity_failed",
        "timer_fired",
        "signal_received",
        "child_completed",
        "cancel_requested",
        "patches_pinned",
        "activity_scheduled",
        "timer_started",
        "signal_awaited",
        "child_started",
        "side_effect",
        "patch_marker",
        "instance_completed",
        "instance_failed",
        "instance_cancelled",
        "instance_terminated",
        "continued_as_new",
    ];

    /// A JSON value that is present, `null` included (an absent one stays `None`).
    fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
        Value::deserialize(d).map(Some)
    }

    /// Rare, large fields are boxed: the struct is built and moved for every event decoded,
    /// and at its unboxed size those moves were a tenth of a cold load (W6).
    #[derive(Deserialize)]
    struct Wire<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
        seq: Option<u32>,
        coordinator: Option<String>,
        #[serde(default, deserialize_with = "present")]
        input: Option<Value>,
        parent: Option<Box<ParentRef>>,
        #[serde(default, deserialize_with = "present")]
        output: Option<Value>,
        attempt: Option<u32>,
        failure: Option<Box<ActivityFailure>>,
        name: Option<String>,
        #[serde(default, deserialize_with = "present")]
        payload: Option<Value>,
        result: Option<Box<Result<Value, Error>>>,
        reason: Option<String>,
        patches: Option<Vec<String>>,
        retry: Option<Box<RetrySpec>>,
        fire_at_ms: Option<u64>,
        instance_id: Option<String>,
        detached: Option<bool>,
        #[serde(default, deserialize_with = "present")]
        value: Option<Value>,
        patch: Option<String>,
        error: Option<Box<Error>>,
    }

    fn req<T, E: serde::de::Error>(v: Option<T>, field: &'static str) -> Result<T, E> {
        v.ok_or_else(|| E::missing_field(field))
    }

    impl<'de> Deserialize<'de> for Event {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let w = Wire::deserialize(d)?;
            Ok(match w.kind.as_ref() {
                "instance_started" => Event::InstanceStarted {
                    coordinator: req(w.coordinator, "coordinator")?,
                    input: req(w.input, "input")?,
                    parent: w.parent.map(|p| *p),
                },
                "activity_completed" => Event::ActivityCompleted {
                    seq: req(w.seq, "seq")?,
                    output: req(w.output, "output")?,
                    attempt: req(w.attempt, "attempt")?,
                },
                "activity_failed" => Event::ActivityFailed {
                    seq: req(w.seq, "seq")?,
                    failure: *req(w.failure, "failure")?,
                },
                "timer_fired" => Event::TimerFired {
                    seq: req(w.seq, "seq")?,
                },
                "signal_received" => Event::SignalReceived {
                    name: req(w.name, "name")?,
                    payload: req(w.payload, "payload")?,
                },
                "child_completed" => Event::ChildCompleted {
                    seq: req(w.seq, "seq")?,
                    result: *req(w.result, "result")?,
                },
                "cancel_requested" => Event::CancelRequested {
                    reason: req(w.reason, "reason")?,
                },
                "patches_pinned" => Event::PatchesPinned {
                    patches: req(w.patches, "patches")?,
                },
                "activity_scheduled" => Event::ActivityScheduled {
                    seq: req(w.seq, "seq")?,
                    name: req(w.name, "name")?,
                    input: req(w.input, "input")?,
                    retry: w.retry.map_or_else(super::standard_retry, |r| *r),
                },
                "timer_started" => Event::TimerStarted {
                    seq: req(w.seq, "seq")?,
                    fire_at_ms: req(w.fire_at_ms, "fire_at_ms")?,
                },
                "signal_awaited" => Event::SignalAwaited {
                    seq: req(w.seq, "seq")?,
                    name: req(w.name, "name")?,
                },
                "child_started" => Event::ChildStarted {
                    seq: req(w.seq, "seq")?,
                    instance_id: req(w.instance_id, "instance_id")?,
                    coordinator: req(w.coordinator, "coordinator")?,
                    input: req(w.input, "input")?,
                    detached: w.detached.unwrap_or(false),
                },
                "side_effect" => Event::SideEffect {
                    seq: req(w.seq, "seq")?,
                    name: req(w.name, "name")?,
                    value: req(w.value, "value")?,
                },
                "patch_marker" => Event::PatchMarker {
                    seq: req(w.seq, "seq")?,
                    patch: req(w.patch, "patch")?,
                },
                "instance_completed" => Event::InstanceCompleted {
                    output: req(w.output, "output")?,
                },
                "instance_failed" => Event::InstanceFailed {
                    error: *req(w.error, "error")?,
                },
                "instance_cancelled" => Event::InstanceCancelled {
                    reason: req(w.reason, "reason")?,
                },
                "instance_terminated" => Event::InstanceTerminated {
                    reason: req(w.reason, "reason")?,
                },
                "continued_as_new" => Event::ContinuedAsNew {
                    input: req(w.input, "input")?,
                },
                other => return Err(D::Error::unknown_variant(other, VARIANTS)),
            })
        }
    }
}

/// The parent of a child instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent's instance id.
    pub instance_id: String,
    /// The parent's call position that started the child.
    pub seq: u32,
}

/// Which family an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventFamily {
    /// Delivered to the coordinator.
    Inbound,
    /// Issued by the coordinator; carries a command position.
    Command,
    /// Ends a run.
    Terminal,
}

/// A faster way to the two commonest events (a cold load decodes one per history position),
/// exactly as this crate's serialization writes them: `activity_completed`, and
/// `activity_scheduled` with the standard retry policy and a name without escapes. Anything
/// else (another event, another order of fields, spaces, escapes, an extra or repeated field, a
/// number SQLite or a person wrote differently) is left to the serde decoder, so the result
/// is always what `serde_json::from_str::<Event>` gives.
mod canonical {
    use super::{standard_retry, Event};
    use serde::Serialize;
    use serde_json::Value;

    pub(super) const COMPLETED: &str = r#"{"type":"activity_completed","seq":"#;
    pub(super) const SCHEDULED: &str = r#"{"type":"activity_scheduled","seq":"#;
    pub(super) const STARTED: &str = r#"{"type":"instance_started""#;
    pub(super) const INSTANCE_COMPLETED: &str = r#"{"type":"instance_completed""#;

    /// Writes an event of one of the first two types above (any name: serde_json escapes it):
    /// `prefix` (type and the `seq` key), `seq`, then two fields (see [`field`]).
    #[inline(always)]
    pub(super) fn encode<A: Serialize + ?Sized, B: Serialize + ?Sized>(
        out: &mut Vec<u8>,
        prefix: &str,
        seq: u32,
        a: (&[u8], &A),
        b: (&[u8], &B),
    ) -> Result<(), serde_json::Error> {
        out.extend_from_slice(prefix.as_bytes());
        serde_json::to_writer(&mut *out, &seq)?;
        field(out, a)?;
        field(out, b)?;
        out.push(b'}');
        Ok(())
    }

    /// Writes an event without a position, as serde_json does: `prefix` (the type), then one
    /// or two fields. Encoding only: these events are decoded by the general decoder.
    #[inline(always)]
    pub(super) fn encode_fields<A: Serialize + ?Sized, B: Serialize + ?Sized>(
        out: &mut Vec<u8>,
        prefix: &str,
        a: (&[u8], &A),
        b: Option<(&[u8], &B)>,
    ) -> Result<(), serde_json::Error> {
        out.extend_from_slice(prefix.as_bytes());
        field(out, a)?;
        if let Some(b) = b {
            field(out, b)?;
        }
        out.push(b'}');
        Ok(())
    }

    /// One field: a literal `,"key":` and the value, encoded by serde_json.
    #[inline(always)]
    fn field<A: Serialize + ?Sized>(
        out: &mut Vec<u8>,
        (key, value): (&[u8], &A),
    ) -> Result<(), serde_json::Error> {
        out.extend_from_slice(key);
        serde_json::to_writer(&mut *out, value)
    }

    /// The event `text` holds, if it is in one of the first two shapes above.
    pub(super) fn decode(text: &str) -> Option<Event> {
        if let Some(rest) = text.strip_prefix(COMPLETED) {
            let (seq, rest) = leading_u32(rest)?;
            let rest = rest.strip_prefix(r#","output":"#)?.strip_suffix('}')?;
            // `rest` is the output, then `,"attempt":N`: the attempt is the trailing digits.
            let digits = rest.len() - rest.bytes().rev().take_while(u8::is_ascii_digit).count();
            let (rest, attempt) = rest.split_at(digits);
            let attempt = whole_u32(attempt)?;
            let output = payload(rest.strip_suffix(r#","attempt":"#)?)?;
            // One whole JSON value, or the text is not in this shape (a field inside).
            let output: Value = serde_json::from_str(output).ok()?;
            return Some(Event::ActivityCompleted {
                seq,
                output,
                attempt,
            });
        }
        let rest = text.strip_prefix(SCHEDULED)?;
        let (seq, rest) = leading_u32(rest)?;
        let rest = rest.strip_prefix(r#","name":""#)?;
        let end = rest.find(['"', '\\'])?;
        let (name, rest) = rest.split_at(end);
        if name.bytes().any(|b| b < 0x20) {
            return None;
        }
        // A custom retry policy would follow the input: then it is not one JSON value.
        let input = payload(rest.strip_prefix(r#"","input":"#)?.strip_suffix('}')?)?;
        let input: Value = serde_json::from_str(input).ok()?;
        Some(Event::ActivityScheduled {
            seq,
            name: name.to_string(),
            input,
            retry: standard_retry(),
        })
    }

    /// `text`, unless it may nest deeper than serde_json allows inside the event (its depth
    /// limit counts the event's own object, which parsing the payload alone would not): a
    /// payload with that many brackets goes the serde way, and fails as it does there.
    fn payload(text: &str) -> Option<&str> {
        let brackets = text.bytes().filter(|b| matches!(b, b'[' | b'{')).count();
        (brackets < 64).then_some(text)
    }

    /// The number `text` starts with, as JSON writes a `u32`, and what follows it.
    fn leading_u32(text: &str) -> Option<(u32, &str)> {
        let digits = text.bytes().take_while(u8::is_ascii_digit).count();
        let (number, rest) = text.split_at(digits);
        Some((whole_u32(number)?, rest))
    }

    /// `text` as a `u32` written the JSON way: digits, no leading zero, in range.
    fn whole_u32(text: &str) -> Option<u32> {
        if text.is_empty() || (text.len() > 1 && text.starts_with('0')) {
            return None;
        }
        text.bytes().try_fold(0u32, |n, b| {
            if !b.is_ascii_digit() {
                return None;
            }
            n.checked_mul(10)?.checked_add(u32::from(b - b'0'))
        })
    }
}

impl Event {
    /// Appends the event's JSON form to `out`: the same bytes as `serde_json::to_writer`, written
    /// nearly twice as fast for the commonest events (a completed activity, a scheduled one with
    /// the standard retry policy), whose field names are written as they are instead of through
    /// serde's generic map encoder.
    ///
    /// # Errors
    /// What `serde_json::to_writer` reports for the same event (a payload that cannot be
    /// encoded); `out` may then hold part of the event.
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        match self {
            Event::ActivityCompleted {
                seq,
                output,
                attempt,
            } => canonical::encode(
                out,
                canonical::COMPLETED,
                *seq,
                (br#","output":"#, output),
                (br#","attempt":"#, attempt),
            ),
            Event::ActivityScheduled {
                seq,
                name,
                input,
                retry,
            } if is_standard_retry(retry) => canonical::encode(
                out,
                canonical::SCHEDULED,
                *seq,
                (br#","name":"#, name),
                (br#","input":"#, input),
            ),
            // Once per instance each, but through serde's map encoder they cost as much as the
            // rest of a step's row (W1: a start's row, and an end's).
            Event::InstanceStarted {
                coordinator,
                input,
                parent: None,
            } => canonical::encode_fields(
                out,
                canonical::STARTED,
                (br#","coordinator":"#, coordinator),
                Some((br#","input":"#, input)),
            ),
            Event::InstanceCompleted { output } => canonical::encode_fields(
                out,
                canonical::INSTANCE_COMPLETED,
                (br#","output":"#, output),
                None::<(&[u8], &Value)>,
            ),
            other => serde_json::to_writer(out, other),
        }
    }

    /// Decodes an event's JSON form: the same result as `serde_json::from_str::<Event>`, found
    /// several times faster for the commonest events as this crate writes them (a completed
    /// activity, a scheduled one with the standard retry policy).
    ///
    /// # Errors
    /// What `serde_json::from_str::<Event>` reports for the same text.
    pub fn from_json(text: &str) -> Result<Event, serde_json::Error> {
        match canonical::decode(text) {
            Some(event) => Ok(event),
            None => serde_json::from_str(text),
        }
    }

    /// The event's family.
    pub fn family(&self) -> EventFamily {
        match self {
            Event::InstanceStarted { .. }
            | Event::ActivityCompleted { .. }
            | Event::ActivityFailed { .. }
            | Event::TimerFired { .. }
            | Event::SignalReceived { .. }
            | Event::ChildCompleted { .. }
            | Event::CancelRequested { .. }
            | Event::PatchesPinned { .. } => EventFamily::Inbound,
            Event::ActivityScheduled { .. }
            | Event::TimerStarted { .. }
            | Event::SignalAwaited { .. }
            | Event::ChildStarted { .. }
            | Event::SideEffect { .. }
            | Event::PatchMarker { .. } => EventFamily::Command,
            Event::InstanceCompleted { .. }
            | Event::InstanceFailed { .. }
            | Event::InstanceCancelled { .. }
            | Event::InstanceTerminated { .. }
            | Event::ContinuedAsNew { .. } => EventFamily::Terminal,
        }
    }

    /// The command position of a command, or of the command an inbound event resolves.
    pub fn seq(&self) -> Option<u32> {
        match self {
            Event::ActivityCompleted { seq, .. }
            | Event::ActivityFailed { seq, .. }
            | Event::TimerFired { seq }
            | Event::ChildCompleted { seq, .. }
            | Event::ActivityScheduled { seq, .. }
            | Event::TimerStarted { seq, .. }
            | Event::SignalAwaited { seq, .. }
            | Event::ChildStarted { seq, .. }
            | Event::SideEffect { seq, .. }
            | Event::PatchMarker { seq, .. } => Some(*seq),
            _ => None,
        }
    }

    /// The stable snake_case name of the event's kind, as stored in the `kind` column.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::InstanceStarted { .. } => "instance_started",
            Event::ActivityCompleted { .. } => "activity_completed",
            Event::ActivityFailed { .. } => "activity_failed",
            Event::TimerFired { .. } => "timer_fired",
            Event::SignalReceived { .. } => "signal_received",
            Event::ChildCompleted { .. } => "child_completed",
            Event::CancelRequested { .. } => "cancel_requested",
            Event::PatchesPinned { .. } => "patches_pinned",
            Event::ActivityScheduled { .. } => "activity_scheduled",
            Event::TimerStarted { .. } => "timer_started",
            Event::SignalAwaited { .. } => "signal_awaited",
            Event::ChildStarted { .. } => "child_started",
            Event::SideEffect { .. } => "side_effect",
            Event::PatchMarker { .. } => "patch_marker",
            Event::InstanceCompleted { .. } => "instance_completed",
            Event::InstanceFailed { .. } => "instance_failed",
            Event::InstanceCancelled { .. } => "instance_cancelled",
            Event::InstanceTerminated { .. } => "instance_terminated",
            Event::ContinuedAsNew { .. } => "continued_as_new",
        }
    }

    /// For a command: a short description of what it asks for, used to match commands on replay
    /// and in nondeterminism messages (`activity reserve_car`, `timer`, `signal payment`…).
    pub fn command_identity(&self) -> Option<String> {
        Some(match self {
            Event::ActivityScheduled { name, .. } => format!("activity {name}"),
            Event::TimerStarted { .. } => "timer".to_string(),
            Event::SignalAwaited { name, .. } => format!("signal {name}"),
            Event::ChildStarted {
                coordinator,
                instance_id,
                ..
            } => {
                format!("child {coordinator} ({instance_id})")
            }
            Event::SideEffect { name, .. } => format!("side effect {name}"),
            Event::PatchMarker { patch, .. } => format!("patch marker {patch}"),
            _ => return None,
        })
    }
}

/// An event as stored: its position in the history, its activation, and when it was recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEvent {
    /// Index in the history, from 0, without gaps.
    pub position: u64,
    /// The activation (delivery batch) the event belongs to, from 0, non-decreasing.
    pub activation: u32,
    /// When the store recorded it, in milliseconds since the Unix epoch. Informational: replay
    /// never reads it.
    pub recorded_at_ms: u64,
    /// The event.
    pub event: Event,
}

/// Checks that `events` form a well-shaped history segment starting at `first_position`:
/// positions contiguous, activations non-decreasing. (A segment does not say which command
/// positions came before it; a whole history's commands and outcomes are checked on import,
/// by `HistoryExport::check`.)
pub fn check_shape(
    instance_id: &str,
    first_position: u64,
    events: &[HistoryEvent],
) -> Result<(), crate::error::ReplayError> {
    let mut last_activation = None;
    for (i, e) in events.iter().enumerate() {
        let expected = first_position + i as u64;
        let corrupt = |message: String| crate::error::ReplayError::CorruptHistory {
            instance_id: instance_id.to_string(),
            position: e.position,
            message,
        };
        if e.position != expected {
            return Err(corrupt(format!(
                "expected position {expected}, found {}",
                e.position
            )));
        }
        if let Some(prev) = last_activation {
            if e.activation < prev {
                return Err(corrupt(format!(
                    "activation {} follows activation {prev}",
                    e.activation
                )));
            }
        }
        last_activation = Some(e.activation);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_through_json() {
        let events = vec![
            Event::InstanceStarted {
                coordinator: "trip".into(),
                input: serde_json::json!({"n": 1}),
                parent: None,
            },
            Event::ActivityScheduled {
                seq: 0,
                name: "reserve_car".into(),
                input: serde_json::json!(1),
                retry: RetrySpec::default(),
            },
            Event::ChildCompleted {
                seq: 3,
                result: Err(Error::application("refused", "no seats")),
            },
        ];
        for e in events {
            let text = serde_json::to_string(&e).unwrap();
            let back: Event = serde_json::from_str(&text).unwrap();
            assert_eq!(back, e);
        }
    }

    #[test]
    fn the_hand_written_decoder_is_as_strict_as_a_derived_one() {
        let decode = |text: &str| serde_json::from_str::<Event>(text);
        let done = decode(r#"{"type":"instance_completed","output":null}"#).unwrap();
        assert_eq!(
            done,
            Event::InstanceCompleted {
                output: serde_json::Value::Null
            }
        );
        let err = decode(r#"{"type":"instance_completed"}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `output`"), "{err}");
        let err = decode(r#"{"type":"activity_completed","seq":"x","output":1,"attempt":1}"#)
            .unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
        let err = decode(r#"{"type":"telepathy","seq":1}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `telepathy`"),
            "{err}"
        );
        assert!(decode(r#"{"seq":1}"#).is_err(), "the type is required");
        let child = decode(
            r#"{"type":"child_started","seq":2,"instance_id":"c","coordinator":"k","input":[]}"#,
        )
        .unwrap();
        assert!(matches!(
            child,
            Event::ChildStarted {
                detached: false,
                ..
            }
        ));
    }

    /// `Event::from_json` and serde agree on `text`: the same event, or both an error.
    fn agree(text: &str) -> Option<Event> {
        let fast = Event::from_json(text);
        let serde = serde_json::from_str::<Event>(text);
        match (&fast, &serde) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{text}"),
            (Err(_), Err(_)) => {}
            _ => panic!("{text}: from_json {fast:?}, serde {serde:?}"),
        }
        fast.ok()
    }

    #[test]
    fn the_commonest_events_take_the_fast_way_and_decode_as_serde_does() {
        let canonical = [
            r#"{"type":"activity_completed","seq":7,"output":8,"attempt":1}"#,
            r#"{"type":"activity_completed","seq":0,"output":null,"attempt":4294967295}"#,
            r#"{"type":"activity_completed","seq":1,"output":"x,\"attempt\":9","attempt":2}"#,
            r#"{"type":"activity_completed","seq":1,"output":{"attempt":3,"seq":[1]},"attempt":2}"#,
            r#"{"type":"activity_scheduled","seq":8,"name":"step","input":8}"#,
            r#"{"type":"activity_scheduled","seq":8,"name":"","input":{"input":"}"}}"#,
            r#"{"type":"activity_scheduled","seq":8,"name":"héllo wörld","input":[1,2]}"#,
        ];
        for text in canonical {
            assert!(canonical::decode(text).is_some(), "fast: {text}");
            assert!(agree(text).is_some(), "{text}");
        }
        let elsewhere = [
            // Escapes, spaces, another order, extra or repeated fields, a custom retry policy.
            r#"{"type":"activity_scheduled","seq":8,"name":"st\"ep","input":8}"#,
            r#"{"type":"activity_scheduled","seq":8,"name":"st\u0065p","input":8}"#,
            r#"{"type":"activity_completed","seq":7, "output":8,"attempt":1}"#,
            r#"{"type":"activity_completed","output":8,"seq":7,"attempt":1}"#,
            r#"{"type":"activity_completed","seq":7,"output":8,"extra":1,"attempt":1}"#,
            r#"{"type":"activity_completed","seq":7,"output":8,"seq":9,"attempt":1}"#,
            r#"{"type":"activity_completed","seq":7,"output":8,"attempt":1,"attempt":2}"#,
            r#"{"type":"activity_scheduled","seq":3,"name":"c","input":1,"retry":{"max_attempts":3,"initial_interval_ms":100,"backoff_coefficient":2.0,"max_interval_ms":10000,"non_retryable":[]}}"#,
            // Numbers JSON (or a u32) does not allow.
            r#"{"type":"activity_completed","seq":07,"output":8,"attempt":1}"#,
            r#"{"type":"activity_completed","seq":4294967296,"output":8,"attempt":1}"#,
            r#"{"type":"activity_completed","seq":-1,"output":8,"attempt":1}"#,
            r#"{"type":"activity_completed","seq":7,"output":8,"attempt":01}"#,
            r#"{"type":"activity_completed","seq":7,"output":8,"attempt":1.0}"#,
            // Truncated or broken.
            r#"{"type":"activity_completed","seq":7,"output":,"attempt":1}"#,
            r#"{"type":"activity_completed","seq":7,"output":8,"attempt":}"#,
            r#"{"type":"activity_completed","seq":7,"output":8"#,
            r#"{"type":"activity_scheduled","seq":8,"name":"step","input":}"#,
            r#"{"type":"activity_scheduled","seq":8,"name":"st"#,
            "{\"type\":\"activity_scheduled\",\"seq\":8,\"name\":\"a\tb\",\"input\":1}",
        ];
        for text in elsewhere {
            assert!(canonical::decode(text).is_none(), "not fast: {text}");
            agree(text);
        }
        // Nested as deep as serde_json refuses inside an event (its limit counts the event's
        // own object), or nearly: the same answer either way.
        for depth in [10, 62, 63, 64, 126, 127, 128] {
            let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let completed =
                format!(r#"{{"type":"activity_completed","seq":1,"output":{nested},"attempt":1}}"#);
            let scheduled =
                format!(r#"{{"type":"activity_scheduled","seq":1,"name":"n","input":{nested}}}"#);
            for text in [completed, scheduled] {
                let decoded = agree(&text);
                assert_eq!(decoded.is_some(), depth < 127, "depth {depth}");
            }
        }
    }

    #[test]
    fn families_and_seqs() {
        let e = Event::TimerFired { seq: 4 };
        assert_eq!(e.family(), EventFamily::Inbound);
        assert_eq!(e.seq(), Some(4));
        assert_eq!(e.kind(), "timer_fired");
        let c = Event::PatchMarker {
            seq: 2,
            patch: "p".into(),
        };
        assert_eq!(c.family(), EventFamily::Command);
        assert_eq!(c.command_identity().as_deref(), Some("patch marker p"));
    }

    #[test]
    fn the_standard_retry_policy_is_left_out_and_restored() {
        use crate::retry::RetryPolicy;
        // Omitting it is only worth anything while the default policy is the standard one.
        assert_eq!(RetryPolicy::new().spec(), super::standard_retry());
        let standard = Event::ActivityScheduled {
            seq: 3,
            name: "charge".into(),
            input: serde_json::json!(1),
            retry: RetryPolicy::new().spec(),
        };
        let json = serde_json::to_string(&standard).unwrap();
        assert!(!json.contains("retry"), "{json}");
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), standard);
        let custom = Event::ActivityScheduled {
            seq: 3,
            name: "charge".into(),
            input: serde_json::json!(1),
            retry: RetryPolicy::new().max_attempts(3).spec(),
        };
        let json = serde_json::to_string(&custom).unwrap();
        assert!(json.contains("\"max_attempts\":3"), "{json}");
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), custom);
        // Version 1 documents spell the standard policy out; they decode to the same event.
        let spelled = r#"{"type":"activity_scheduled","seq":3,"name":"charge","input":1,
            "retry":{"max_attempts":10,"initial_interval_ms":100,"backoff_coefficient":2.0,
                     "max_interval_ms":10000,"non_retryable":[]}}"#;
        assert_eq!(serde_json::from_str::<Event>(spelled).unwrap(), standard);
    }
}
