//! The history export format: one instance's history as a versioned JSON document.
//!
//! `retrace export ID` writes it, `retrace import FILE` reads it back into a store, and a plain
//! `#[test]` replays it against current coordinator code with [`HistoryExport::replay`], with no
//! database and no worker. The format is documented in `docs/history-format.md`:
//!
//! ```json
//! {
//!   "format": "retrace-history",
//!   "version": 2,
//!   "instance": { "id": "trip-1", "coordinator": "book_trip", "status": "completed", ... },
//!   "events": [ { "position": 0, "activation": 0, "recorded_at_ms": 1764195845123,
//!                 "event": { "type": "instance_started", ... } }, ... ]
//! }
//! ```
//!
//! # Compatibility
//! `version` changes only when a reader of the previous version would misread a document.
//! Adding an optional field does not change it: readers ignore fields they do not know. A reader
//! refuses a document of a newer version with a message saying so, rather than guessing.

use crate::coordinator::CoordinatorFn;
use crate::error::{Error, ReplayError};
use crate::history::{check_shape, Event, HistoryEvent, ParentRef};
use crate::replay::replay_history;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The value of the `format` field of every export.
pub const HISTORY_FORMAT: &str = "retrace-history";
/// The version of the export format this build writes, and the newest it reads.
pub const HISTORY_FORMAT_VERSION: u32 = 2;

/// One instance's history, as exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HistoryExport {
    /// Always [`HISTORY_FORMAT`].
    pub format: String,
    /// The format version, [`HISTORY_FORMAT_VERSION`] when written by this build.
    pub version: u32,
    /// The instance's row: id, coordinator, status, input, outcome.
    pub instance: ExportedInstance,
    /// The history of the instance's current run, from position 0, in order.
    pub events: Vec<HistoryEvent>,
}

/// The instance part of an export: what the store knows besides the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExportedInstance {
    /// The instance id.
    pub id: String,
    /// The coordinator's registered name.
    pub coordinator: String,
    /// The lifecycle state, as the store names it (`running`, `completed`, `failed`,
    /// `cancelled`, `terminated`, `stopped`).
    pub status: String,
    /// The input of the current run.
    pub input: Value,
    /// The output, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// The error, once failed or cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
    /// Why the instance is stopped or terminated, or why no worker runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The last custom status the coordinator published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_status: Option<Value>,
    /// The parent, for a child instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// How many times the instance continued as new before this run.
    #[serde(default)]
    pub generation: u64,
    /// When the instance was created, in ms since the Unix epoch.
    #[serde(default)]
    pub created_at_ms: u64,
    /// When it last changed, in ms since the Unix epoch.
    #[serde(default)]
    pub updated_at_ms: u64,
    /// When it ended, in ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<u64>,
}

impl ExportedInstance {
    /// An instance part with the given identity and no outcome; set the other fields as needed.
    pub fn new(
        id: impl Into<String>,
        coordinator: impl Into<String>,
        status: impl Into<String>,
        input: Value,
    ) -> Self {
        ExportedInstance {
            id: id.into(),
            coordinator: coordinator.into(),
            status: status.into(),
            input,
            output: None,
            error: None,
            reason: None,
            custom_status: None,
            parent: None,
            generation: 0,
            created_at_ms: 0,
            updated_at_ms: 0,
            ended_at_ms: None,
        }
    }
}

/// Why a document is not a history export this build can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The text is not JSON.
    #[error("not JSON: {detail}")]
    NotJson {
        /// The parser's message, with line and column.
        detail: String,
    },
    /// The JSON is not a Retrace history export.
    #[error("not a Retrace history export: {detail}")]
    WrongFormat {
        /// What was found instead.
        detail: String,
    },
    /// The export was written by a newer Retrace.
    #[error(
        "history export version {found} is newer than the {supported} this build reads; \
         upgrade Retrace"
    )]
    NewerVersion {
        /// The version in the document.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// A field is missing or has the wrong shape.
    #[error("malformed history export: {detail}")]
    Malformed {
        /// The decoder's message, naming the field.
        detail: String,
    },
    /// The events do not form a history (gaps in positions, no start event, …).
    #[error("history export of instance {instance_id}: {detail}")]
    BadHistory {
        /// The instance.
        instance_id: String,
        /// What is wrong, with the position.
        detail: String,
    },
}

impl HistoryExport {
    /// An export of `instance` with `events` (the history of its current run, from position 0).
    pub fn new(instance: ExportedInstance, events: Vec<HistoryEvent>) -> Self {
        HistoryExport {
            format: HISTORY_FORMAT.to_string(),
            version: HISTORY_FORMAT_VERSION,
            instance,
            events,
        }
    }

    /// Parses and checks an export: format and version first (so that a file of another kind
    /// gets a message saying so), then the fields, then the shape of the history.
    ///
    /// # Errors
    /// An [`ExportError`] saying what is wrong and where.
    pub fn from_json(text: &str) -> Result<Self, ExportError> {
        let value: Value = serde_json::from_str(text).map_err(|e| ExportError::NotJson {
            detail: e.to_string(),
        })?;
        let format = value.get("format").and_then(Value::as_str);
        if format != Some(HISTORY_FORMAT) {
            return Err(ExportError::WrongFormat {
                detail: match format {
                    Some(other) => format!("\"format\" is {other:?}, expected {HISTORY_FORMAT:?}"),
                    None => format!("no \"format\": {HISTORY_FORMAT:?} field"),
                },
            });
        }
        let version = value
            .get("version")
            .and_then(Value::as_u64)
            .ok_or_else(|| ExportError::Malformed {
                detail: "\"version\" is missing or not a number".to_string(),
            })?;
        let version = u32::try_from(version).unwrap_or(u32::MAX);
        if version > HISTORY_FORMAT_VERSION {
            return Err(ExportError::NewerVersion {
                found: version,
                supported: HISTORY_FORMAT_VERSION,
            });
        }
        let export: HistoryExport =
            serde_json::from_value(value).map_err(|e| ExportError::Malformed {
                detail: e.to_string(),
            })?;
        export.check()?;
        Ok(export)
    }

    /// The export as pretty-printed JSON, the way `retrace export` writes it.
    ///
    /// # Errors
    /// Only if a payload cannot be encoded, which a decoded history never causes.
    pub fn to_json(&self) -> Result<String, ExportError> {
        serde_json::to_string_pretty(self).map_err(|e| ExportError::Malformed {
            detail: e.to_string(),
        })
    }

    /// Checks that the events form the history of the instance: positions from 0 without gaps,
    /// activations in order, event 0 starts the instance's coordinator, nothing after the end.
    ///
    /// # Errors
    /// [`ExportError::BadHistory`].
    pub fn check(&self) -> Result<(), ExportError> {
        let id = &self.instance.id;
        let bad = |detail: String| ExportError::BadHistory {
            instance_id: id.clone(),
            detail,
        };
        check_shape(id, 0, &self.events).map_err(|e| bad(e.to_string()))?;
        if let Some(first) = self.events.first() {
            match &first.event {
                Event::InstanceStarted { input, .. } if *input != self.instance.input => {
                    return Err(bad(format!(
                        "event 0 starts the run with input {input}, the instance says {}",
                        self.instance.input
                    )))
                }
                Event::InstanceStarted { coordinator, .. }
                    if *coordinator == self.instance.coordinator => {}
                Event::InstanceStarted { coordinator, .. } => {
                    return Err(bad(format!(
                        "event 0 starts coordinator {coordinator}, the instance runs {}",
                        self.instance.coordinator
                    )))
                }
                other => {
                    return Err(bad(format!(
                        "event 0 is {}, not instance_started",
                        other.kind()
                    )))
                }
            }
        }
        check_causality(&self.events).map_err(bad)?;
        let terminal = self
            .events
            .iter()
            .position(|e| e.event.family() == crate::history::EventFamily::Terminal);
        if let Some(at) = terminal {
            if at + 1 != self.events.len() {
                return Err(bad(format!(
                    "the run ends at position {at} but {} more event(s) follow",
                    self.events.len() - at - 1
                )));
            }
        }
        Ok(())
    }

    /// Replays the exported history against `coordinator` (current code), with no database and
    /// no worker. `Ok` means the code still issues every recorded command in order, so that an
    /// instance with this history would go on under the new code.
    ///
    /// # Errors
    /// The first [`Divergence`], in a message that names the position, what the history holds
    /// and what the code asked for.
    pub fn replay(&self, coordinator: CoordinatorFn) -> Result<(), Divergence> {
        check_replay(&self.instance.id, coordinator, &self.events)
    }
}

/// Replays `history` against `coordinator` and explains the first divergence, if any, in terms
/// a person can act on. [`replay_history`] with a better error.
///
/// # Errors
/// The first [`Divergence`].
pub fn check_replay(
    instance_id: &str,
    coordinator: CoordinatorFn,
    history: &[HistoryEvent],
) -> Result<(), Divergence> {
    replay_history(instance_id, coordinator, history)
        .map_err(|cause| Divergence::explain(instance_id, history, cause))
}

/// Where and how replaying a recorded history against current code went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Divergence {
    /// The instance.
    pub instance_id: String,
    /// The history position of the recorded event where replay diverged, when known.
    pub position: Option<u64>,
    /// The command position (sequence number) the code was at, for a nondeterminism.
    pub command: Option<u32>,
    /// The recorded event at that point, described (`activity_scheduled reserve_car input
    /// {"trip":1}`).
    pub recorded: String,
    /// What the code requested instead (`activity book_hotel`, `nothing`, `the end of the run`).
    pub requested: String,
    /// The replay error as the machinery reported it.
    pub cause: Box<ReplayError>,
}

impl Divergence {
    /// Explains `cause`, met while replaying `history`.
    pub fn explain(instance_id: &str, history: &[HistoryEvent], cause: ReplayError) -> Self {
        match &cause {
            ReplayError::Nondeterminism(nd) => {
                // The machinery counts commands; people read history positions.
                let recorded_event = history
                    .iter()
                    .find(|e| {
                        e.event.family() == crate::history::EventFamily::Command
                            && e.event.seq() == Some(nd.position)
                    })
                    .or_else(|| {
                        history.iter().rev().find(|e| {
                            e.event.family() == crate::history::EventFamily::Terminal
                                && nd.recorded.starts_with("the end of the run")
                        })
                    });
                Divergence {
                    instance_id: instance_id.to_string(),
                    position: recorded_event.map(|e| e.position),
                    command: Some(nd.position),
                    recorded: recorded_event
                        .map(describe_event)
                        .unwrap_or_else(|| nd.recorded.clone()),
                    requested: nd.requested.clone(),
                    cause: Box::new(cause.clone()),
                }
            }
            ReplayError::CorruptHistory {
                position, message, ..
            }
            | ReplayError::Panicked {
                position, message, ..
            } => {
                let recorded = history
                    .iter()
                    .find(|e| e.position == *position)
                    .map(describe_event)
                    .unwrap_or_else(|| "no event".to_string());
                Divergence {
                    instance_id: instance_id.to_string(),
                    position: Some(*position),
                    command: None,
                    recorded,
                    requested: message.clone(),
                    cause: Box::new(cause.clone()),
                }
            }
        }
    }

    /// Whether the code diverged (rather than the history being malformed).
    pub fn is_nondeterminism(&self) -> bool {
        matches!(*self.cause, ReplayError::Nondeterminism(_))
    }
}

/// What a run can have recorded, in the order it can have recorded it: commands numbered 0,
/// 1, 2… as they appear; within an activation, the events delivered before the commands
/// issued; each outcome resolving, once, a command of its kind issued in an earlier
/// activation; the instance started only at position 0. A history out of this order would
/// be imported, then wait forever or run activities before replay stopped it.
fn check_causality(events: &[HistoryEvent]) -> Result<(), String> {
    use crate::history::EventFamily;
    let mut next_seq = 0u32;
    // Command position -> (its kind, its activation, whether an outcome resolved it).
    let mut issued: std::collections::HashMap<u32, (&'static str, u32, bool)> =
        std::collections::HashMap::new();
    let mut commands_in: Option<u32> = None;
    for e in events {
        let at = e.position;
        match e.event.family() {
            EventFamily::Command => {
                let Some(seq) = e.event.seq() else { continue };
                if seq != next_seq {
                    return Err(format!(
                        "the command at position {at} has command position {seq}, expected \
                         {next_seq}"
                    ));
                }
                next_seq += 1;
                issued.insert(seq, (e.event.kind(), e.activation, false));
                commands_in = Some(e.activation);
            }
            EventFamily::Inbound => {
                if commands_in == Some(e.activation) {
                    return Err(format!(
                        "{} at position {at} is delivered after a command of its own \
                         activation {}",
                        e.event.kind(),
                        e.activation
                    ));
                }
                if matches!(e.event, Event::InstanceStarted { .. }) && at != 0 {
                    return Err(format!("instance_started at position {at}, not 0"));
                }
                let Some(seq) = e.event.seq() else { continue };
                let wanted = match e.event {
                    Event::ActivityCompleted { .. } | Event::ActivityFailed { .. } => {
                        "activity_scheduled"
                    }
                    Event::TimerFired { .. } => "timer_started",
                    _ => "child_started",
                };
                match issued.get_mut(&seq) {
                    Some((kind, activation, resolved))
                        if *kind == wanted && *activation < e.activation && !*resolved =>
                    {
                        *resolved = true;
                    }
                    _ => {
                        return Err(format!(
                            "{} at position {at} resolves no {wanted} of command position \
                             {seq} issued in an earlier activation and still waiting",
                            e.event.kind()
                        ))
                    }
                }
            }
            EventFamily::Terminal => {}
        }
    }
    Ok(())
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = match (self.position, self.command) {
            (Some(p), Some(c)) => format!("at history position {p} (command #{c})"),
            (Some(p), None) => format!("at history position {p}"),
            (None, Some(c)) => format!("at command #{c}"),
            (None, None) => "at an unknown position".to_string(),
        };
        match &*self.cause {
            ReplayError::Nondeterminism(_) => write!(
                f,
                "instance {} no longer replays {at}:\n  history holds:  {}\n  code requested: \
                 {}\nThe coordinator code changed in a way that in-flight instances cannot follow. \
                 Keep the old path for them (branch on ctx.patched(\"...\")), or let them finish \
                 on the old version before deploying this code.",
                self.instance_id, self.recorded, self.requested
            ),
            ReplayError::CorruptHistory { .. } => write!(
                f,
                "history of instance {} is malformed {at}: {}\n  event there: {}",
                self.instance_id, self.requested, self.recorded
            ),
            ReplayError::Panicked { .. } => write!(
                f,
                "the coordinator of instance {} panicked {at}: {}\n  event there: {}\nFix the \
                 coordinator code; the history is intact, and the instance can be resumed.",
                self.instance_id, self.requested, self.recorded
            ),
        }
    }
}

impl std::error::Error for Divergence {}

/// A one-line description of a recorded event, with its name and a short payload.
pub fn describe_event(e: &HistoryEvent) -> String {
    let short = |v: &Value| {
        let text = v.to_string();
        if text.chars().count() > 80 {
            let cut: String = text.chars().take(77).collect();
            format!("{cut}...")
        } else {
            text
        }
    };
    let detail = match &e.event {
        Event::InstanceStarted {
            coordinator, input, ..
        } => {
            format!("{coordinator} input {}", short(input))
        }
        Event::ActivityScheduled {
            seq, name, input, ..
        } => format!("{name} (command #{seq}) input {}", short(input)),
        Event::ActivityCompleted {
            seq,
            output,
            attempt,
        } => format!("command #{seq} on attempt {attempt}: {}", short(output)),
        Event::ActivityFailed { failure, .. } => failure.to_string(),
        Event::TimerStarted { seq, fire_at_ms } => {
            format!("(command #{seq}) fires at {fire_at_ms}")
        }
        Event::TimerFired { seq } => format!("command #{seq}"),
        Event::SignalAwaited { seq, name } => format!("{name} (command #{seq})"),
        Event::SignalReceived { name, payload } => format!("{name}: {}", short(payload)),
        Event::ChildStarted {
            seq,
            instance_id,
            coordinator,
            ..
        } => format!("{coordinator} {instance_id} (command #{seq})"),
        Event::ChildCompleted { seq, result } => match result {
            Ok(v) => format!("command #{seq}: {}", short(v)),
            Err(err) => format!("command #{seq}: {err}"),
        },
        Event::SideEffect { seq, name, value } => {
            format!("{name} (command #{seq}) = {}", short(value))
        }
        Event::PatchMarker { seq, patch } => format!("{patch} (command #{seq})"),
        Event::PatchesPinned { patches } => patches.join(", "),
        Event::CancelRequested { reason } | Event::InstanceTerminated { reason } => reason.clone(),
        Event::InstanceCancelled { reason } => reason.clone(),
        Event::InstanceCompleted { output } => short(output),
        Event::InstanceFailed { error } => error.to_string(),
        Event::ContinuedAsNew { input } => format!("input {}", short(input)),
    };
    format!("{} {detail}", e.event.kind())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::{coordinator_fn, Activity, Context, Coordinator, RetrySpec};

    const STEP: Activity<u32, u32> = Activity::new("step");
    const OTHER: Activity<u32, u32> = Activity::new("other");
    const FLOW: Coordinator<u32, u32> = Coordinator::new("flow");

    async fn flow(ctx: Context, n: u32) -> Result<u32, Error> {
        ctx.call(&STEP, &n).await
    }

    async fn changed(ctx: Context, n: u32) -> Result<u32, Error> {
        ctx.call(&OTHER, &n).await
    }

    fn history() -> Vec<HistoryEvent> {
        let events = [
            (
                0,
                Event::InstanceStarted {
                    coordinator: "flow".into(),
                    input: 1.into(),
                    parent: None,
                },
            ),
            (
                0,
                Event::ActivityScheduled {
                    seq: 0,
                    name: "step".into(),
                    input: 1.into(),
                    retry: RetrySpec::default(),
                },
            ),
            (
                1,
                Event::ActivityCompleted {
                    seq: 0,
                    output: 2.into(),
                    attempt: 1,
                },
            ),
            (1, Event::InstanceCompleted { output: 2.into() }),
        ];
        events
            .into_iter()
            .enumerate()
            .map(|(i, (activation, event))| HistoryEvent {
                position: i as u64,
                activation,
                recorded_at_ms: 1_000 + i as u64,
                event,
            })
            .collect()
    }

    fn export() -> HistoryExport {
        HistoryExport::new(
            ExportedInstance::new("f-1", "flow", "completed", 1.into()),
            history(),
        )
    }

    #[test]
    fn round_trips_and_replays() {
        let text = export().to_json().unwrap();
        let back = HistoryExport::from_json(&text).unwrap();
        assert_eq!(back, export());
        back.replay(coordinator_fn(&FLOW, flow)).unwrap();
    }

    #[test]
    fn divergence_names_position_recorded_and_requested() {
        let d = export().replay(coordinator_fn(&FLOW, changed)).unwrap_err();
        assert!(d.is_nondeterminism());
        assert_eq!(d.position, Some(1));
        assert_eq!(d.command, Some(0));
        let text = d.to_string();
        assert!(text.contains("history position 1"), "{text}");
        assert!(text.contains("activity_scheduled step"), "{text}");
        assert!(text.contains("activity other"), "{text}");
    }

    #[test]
    fn refuses_other_documents_clearly() {
        assert!(matches!(
            HistoryExport::from_json("{"),
            Err(ExportError::NotJson { .. })
        ));
        assert!(matches!(
            HistoryExport::from_json(r#"{"format": "other"}"#),
            Err(ExportError::WrongFormat { .. })
        ));
        let newer = export().to_json().unwrap().replace(
            &format!("\"version\": {HISTORY_FORMAT_VERSION}"),
            &format!("\"version\": {}", HISTORY_FORMAT_VERSION + 1),
        );
        assert!(matches!(
            HistoryExport::from_json(&newer),
            Err(ExportError::NewerVersion { .. })
        ));
        let mut gap = export();
        gap.events.remove(1);
        let err = HistoryExport::from_json(&gap.to_json().unwrap()).unwrap_err();
        assert!(matches!(err, ExportError::BadHistory { .. }), "{err}");
    }

    /// The export with its events edited by `edit`, positions renumbered.
    fn edited(edit: impl FnOnce(&mut Vec<HistoryEvent>)) -> HistoryExport {
        let mut e = export();
        edit(&mut e.events);
        for (i, event) in e.events.iter_mut().enumerate() {
            event.position = i as u64;
        }
        e
    }

    fn refused(e: &HistoryExport, needle: &str) {
        match e.check() {
            Err(ExportError::BadHistory { detail, .. }) => {
                assert!(detail.contains(needle), "{detail:?} lacks {needle:?}")
            }
            other => panic!("expected BadHistory ({needle}), got {other:?}"),
        }
    }

    #[test]
    fn refuses_histories_out_of_causal_order() {
        export().check().unwrap();
        // The outcome in the activation that issued its command.
        refused(
            &edited(|ev| ev[2].activation = 0),
            "delivered after a command",
        );
        // An outcome before its command.
        refused(
            &edited(|ev| {
                let outcome = ev.remove(2);
                ev.insert(1, outcome);
                ev[1].activation = 0;
            }),
            "resolves no activity_scheduled",
        );
        // The same outcome twice.
        refused(
            &edited(|ev| {
                let again = ev[2].clone();
                ev.insert(3, again);
            }),
            "still waiting",
        );
        // A command position skipped.
        refused(
            &edited(|ev| {
                if let Event::ActivityScheduled { seq, .. } = &mut ev[1].event {
                    *seq = 1;
                }
                if let Event::ActivityCompleted { seq, .. } = &mut ev[2].event {
                    *seq = 1;
                }
            }),
            "expected 0",
        );
        // A delivery after a command of its own activation.
        refused(
            &edited(|ev| {
                let signal = HistoryEvent {
                    event: Event::SignalReceived {
                        name: "go".into(),
                        payload: 1.into(),
                    },
                    ..ev[1].clone()
                };
                ev.insert(2, signal);
            }),
            "delivered after a command",
        );
        // The run started again.
        refused(
            &edited(|ev| {
                let start = HistoryEvent {
                    activation: 1,
                    ..ev[0].clone()
                };
                ev.insert(2, start);
            }),
            "instance_started at position 2",
        );
        // An input that is not the one the run started with.
        let mut other_input = export();
        other_input.instance.input = 7.into();
        refused(&other_input, "starts the run with input 1");
    }
}
