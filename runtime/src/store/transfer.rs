//! Instances made from recorded histories: export, import and fork.
//!
//! [`ImportedInstance`] is everything [`Store::import_instance`](super::Store::import_instance)
//! writes, derived here once, purely, so that every store (SQLite, PostgreSQL) creates exactly
//! the same instance from the same history.
//!
//! # Pending work is re-created, never copied
//! A store keeps, besides the history, the work in flight: activity tasks, timers, inbox
//! messages. Those are not part of an export and are never copied by a fork. Instead, for an
//! instance that is not finished, every command of the history **without an outcome in the
//! history** gets its work re-created:
//! - an `activity_scheduled` without `activity_completed`/`activity_failed` becomes a new task,
//!   at attempt 0 (its attempts start over), visible at once;
//! - a `timer_started` without `timer_fired` becomes a timer due at the recorded `fire_at_ms`
//!   (at once, if that is past);
//! - a `signal_awaited` needs nothing: signals come from outside (send them again);
//! - a `child_started` without `child_completed` is refused: the child is another instance of the
//!   source store, and re-creating or sharing it would be a guess.
//!
//! # Forks cut at activation boundaries
//! A history is a sequence of activations, each holding the inbound events delivered in one
//! batch followed by the commands the code issued in response. Replay re-delivers whole
//! activations, so a history cut inside one would ask the code to replay half a batch. A fork
//! therefore keeps the longest prefix of **whole activations** with at most `position` events
//! that does **not** contain the end of the run, and reports the length it kept. Cutting at the
//! start of the activation that delivered a result re-runs the step that produced it.

use super::{InstanceInfo, InstanceStatus, NewTask};
use crate::error::StoreError;
use retrace_sdk::{Error, Event, EventFamily, ExportedInstance, HistoryEvent, HistoryExport};
use serde_json::Value;
use std::collections::BTreeMap;

/// An instance to create from a recorded history, with the pending work derived from it. Build
/// it with [`ImportedInstance::from_export`] or [`ImportedInstance::fork`]; see the module docs
/// for how pending work is derived.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ImportedInstance {
    /// The new instance's id.
    pub id: String,
    /// The coordinator's registered name.
    pub coordinator: String,
    /// The input of the run.
    pub input: Value,
    /// The status to create it in: final (the history ends the run), `running` or `stopped`.
    pub status: InstanceStatus,
    /// The output, for a completed instance.
    pub output: Option<Value>,
    /// The error, for a failed or cancelled instance.
    pub error: Option<Error>,
    /// Why it is stopped or terminated.
    pub reason: Option<String>,
    /// The custom status to show until the coordinator publishes another.
    pub custom_status: Option<Value>,
    /// The history, written verbatim: positions from 0, activations and `recorded_at_ms` kept.
    pub events: Vec<HistoryEvent>,
    /// Activity tasks to create (unclaimed, attempt 0, visible at once, generation 0).
    pub tasks: Vec<NewTask>,
    /// Timers to create: (command position, due time in ms), generation 0.
    pub timers: Vec<(u32, u64)>,
    /// Whether to put `InstanceStarted` (with `coordinator`, `input`, no parent) in the inbox,
    /// with dedupe key `start:0`: true exactly when the history is empty and the status is
    /// `running` or `stopped`.
    pub start_in_inbox: bool,
    /// Whether the instance is ready to be claimed by a worker at once. True for `running`: the
    /// first worker that knows the coordinator replays the history right away (so that a code
    /// change that breaks it is reported at once, and the instance is stopped) and goes on.
    pub ready: bool,
    /// When it was created, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// When it ended, for a final status.
    pub ended_at_ms: Option<u64>,
}

/// What [`Store::fork_instance`](super::Store::fork_instance) reports.
#[derive(Debug, Clone, PartialEq)]
pub enum ForkOutcome {
    /// The fork was created.
    Forked {
        /// How many events of the source it kept (the cut, rounded down to an activation
        /// boundary that precedes the end of the run).
        kept_events: u64,
        /// How many activity tasks were re-created.
        tasks: usize,
        /// How many timers were re-created.
        timers: usize,
    },
    /// An instance with the new id already exists; nothing was changed.
    Existing(Box<InstanceInfo>),
}

/// The export of an instance: its row and the history of its current run.
pub fn export_instance(info: &InstanceInfo, events: Vec<HistoryEvent>) -> HistoryExport {
    let mut instance = ExportedInstance::new(
        info.id.clone(),
        info.coordinator.clone(),
        info.status.as_str(),
        info.input.clone(),
    );
    instance.output = info.output.clone();
    instance.error = info.error.clone();
    instance.reason = info.reason.clone();
    instance.custom_status = info.custom_status.clone();
    instance.parent = info.parent.clone();
    instance.generation = info.generation;
    instance.created_at_ms = info.created_at_ms;
    instance.updated_at_ms = info.updated_at_ms;
    instance.ended_at_ms = info.ended_at_ms;
    HistoryExport::new(instance, events)
}

/// The status a terminal event ends a run in, or `None` for an event that ends nothing.
fn status_of_end(event: &Event) -> Option<InstanceStatus> {
    Some(match event {
        Event::InstanceCompleted { .. } => InstanceStatus::Completed,
        Event::InstanceFailed { .. } => InstanceStatus::Failed,
        Event::InstanceCancelled { .. } => InstanceStatus::Cancelled,
        Event::InstanceTerminated { .. } => InstanceStatus::Terminated,
        _ => return None,
    })
}

impl ImportedInstance {
    /// The instance an export describes, under `id` (default: the exported id), created at
    /// `now_ms`. The status is the exported one; the history must agree with it (a final status
    /// needs the matching end event, `running` and `stopped` need none).
    ///
    /// # Errors
    /// [`StoreError::InvalidHistory`] naming what is inconsistent.
    pub fn from_export(
        export: &HistoryExport,
        id: Option<&str>,
        now_ms: u64,
    ) -> Result<Self, StoreError> {
        let id = id.unwrap_or(&export.instance.id).to_string();
        let invalid = |detail: String| StoreError::InvalidHistory {
            instance_id: id.clone(),
            detail,
        };
        export.check().map_err(|e| invalid(e.to_string()))?;
        let status = InstanceStatus::parse(&export.instance.status)
            .ok_or_else(|| invalid(format!("unknown status {:?}", export.instance.status)))?;
        let mut imported = Self::from_history(
            &id,
            &export.instance.coordinator,
            export.instance.input.clone(),
            export.events.clone(),
            status,
            now_ms,
        )?;
        imported.custom_status = export.instance.custom_status.clone();
        if export.instance.created_at_ms > 0 {
            imported.created_at_ms = export.instance.created_at_ms;
        }
        if imported.reason.is_none() {
            imported.reason = export.instance.reason.clone();
        }
        if status.is_final() && export.instance.ended_at_ms.is_some() {
            imported.ended_at_ms = export.instance.ended_at_ms;
        }
        Ok(imported)
    }

    /// A fork of `source` (whose current run has `history`) named `new_id`: the longest prefix
    /// of whole activations with at most `position` events that does not end the run, status
    /// `running`, pending work re-created, ready for a worker. No parent, whatever the source's.
    ///
    /// # Errors
    /// [`StoreError::InvalidHistory`] when `position` is past the end of the history or the
    /// prefix waits on a child instance.
    pub fn fork(
        source: &InstanceInfo,
        history: &[HistoryEvent],
        position: u64,
        new_id: &str,
        now_ms: u64,
    ) -> Result<Self, StoreError> {
        let len = history.len() as u64;
        if position > len {
            return Err(StoreError::InvalidHistory {
                instance_id: new_id.to_string(),
                detail: format!(
                    "fork position {position} is past the end of the history of {} ({len} events)",
                    source.id
                ),
            });
        }
        let kept = fork_cut(history, position);
        let (coordinator, input) = match history.first().map(|e| &e.event) {
            Some(Event::InstanceStarted {
                coordinator, input, ..
            }) => (coordinator.clone(), input.clone()),
            _ => (source.coordinator.clone(), source.input.clone()),
        };
        let prefix = history[..kept as usize].to_vec();
        Self::from_history(
            new_id,
            &coordinator,
            input,
            prefix,
            InstanceStatus::Running,
            now_ms,
        )
    }

    fn from_history(
        id: &str,
        coordinator: &str,
        input: Value,
        events: Vec<HistoryEvent>,
        status: InstanceStatus,
        now_ms: u64,
    ) -> Result<Self, StoreError> {
        let invalid = |detail: String| StoreError::InvalidHistory {
            instance_id: id.to_string(),
            detail,
        };
        retrace_sdk::history::check_shape(id, 0, &events).map_err(|e| invalid(e.to_string()))?;
        let end = events
            .iter()
            .find(|e| e.event.family() == EventFamily::Terminal);
        let mut imported = ImportedInstance {
            id: id.to_string(),
            coordinator: coordinator.to_string(),
            input,
            status,
            output: None,
            error: None,
            reason: None,
            custom_status: None,
            tasks: Vec::new(),
            timers: Vec::new(),
            start_in_inbox: false,
            ready: false,
            created_at_ms: now_ms,
            ended_at_ms: None,
            events: Vec::new(),
        };
        match end {
            Some(end) => {
                let ended = status_of_end(&end.event).ok_or_else(|| {
                    invalid(format!(
                        "the history ends with {} at position {}, which a store never keeps",
                        end.event.kind(),
                        end.position
                    ))
                })?;
                if ended != status {
                    return Err(invalid(format!(
                        "status is {status} but the history ends with {} at position {}",
                        end.event.kind(),
                        end.position
                    )));
                }
                match &end.event {
                    Event::InstanceCompleted { output } => imported.output = Some(output.clone()),
                    Event::InstanceFailed { error } => imported.error = Some(error.clone()),
                    Event::InstanceCancelled { reason } => {
                        imported.error = Some(Error::Cancelled {
                            reason: reason.clone(),
                        })
                    }
                    Event::InstanceTerminated { reason } => imported.reason = Some(reason.clone()),
                    _ => {}
                }
                imported.ended_at_ms = Some(end.recorded_at_ms);
            }
            None if status.is_final() => {
                return Err(invalid(format!(
                    "status is {status} but the history has no end event"
                )));
            }
            None => {
                let (tasks, timers) = pending_work(id, &events)?;
                imported.tasks = tasks;
                imported.timers = timers;
                imported.start_in_inbox = events.is_empty();
                imported.ready = status == InstanceStatus::Running;
            }
        }
        imported.events = events;
        Ok(imported)
    }
}

/// The length of the prefix a fork at `position` keeps: the largest activation boundary
/// `<= position` whose prefix does not contain the end of the run.
pub fn fork_cut(history: &[HistoryEvent], position: u64) -> u64 {
    let position = position.min(history.len() as u64);
    let mut cut = 0;
    for (i, e) in history.iter().enumerate() {
        let i = i as u64;
        if i > position {
            break;
        }
        let starts_activation = i == 0 || history[i as usize - 1].activation != e.activation;
        if starts_activation {
            cut = i;
        }
        if e.event.family() == EventFamily::Terminal {
            // The end is in the last activation: never keep it.
            return cut;
        }
    }
    if position == history.len() as u64 {
        // The whole history, which does not end the run (checked above).
        return position;
    }
    cut
}

/// Activity tasks and timers (command position, due time in ms) to re-create.
type PendingWork = (Vec<NewTask>, Vec<(u32, u64)>);

/// Commands of `events` without an outcome in `events`: tasks and timers to re-create.
fn pending_work(id: &str, events: &[HistoryEvent]) -> Result<PendingWork, StoreError> {
    let mut activities: BTreeMap<u32, NewTask> = BTreeMap::new();
    let mut timers: BTreeMap<u32, u64> = BTreeMap::new();
    let mut children: BTreeMap<u32, (u64, String)> = BTreeMap::new();
    for e in events {
        match &e.event {
            Event::ActivityScheduled {
                seq,
                name,
                input,
                retry,
            } => {
                activities.insert(
                    *seq,
                    NewTask {
                        seq: *seq,
                        name: name.clone(),
                        input: input.clone(),
                        retry: retry.clone(),
                        claim: false,
                    },
                );
            }
            Event::ActivityCompleted { seq, .. } | Event::ActivityFailed { seq, .. } => {
                activities.remove(seq);
            }
            Event::TimerStarted { seq, fire_at_ms } => {
                timers.insert(*seq, *fire_at_ms);
            }
            Event::TimerFired { seq } => {
                timers.remove(seq);
            }
            // A detached child reports nothing: nobody waits on it.
            Event::ChildStarted {
                seq,
                instance_id,
                detached: false,
                ..
            } => {
                children.insert(*seq, (e.position, instance_id.clone()));
            }
            Event::ChildCompleted { seq, .. } => {
                children.remove(seq);
            }
            _ => {}
        }
    }
    if let Some((position, child)) = children.values().next() {
        return Err(StoreError::InvalidHistory {
            instance_id: id.to_string(),
            detail: format!(
                "child instance {child} started at position {position} has no outcome in this \
                 history; a copy cannot wait on another instance's child (cut before position \
                 {position}, or after the child's outcome)"
            ),
        });
    }
    Ok((
        activities.into_values().collect(),
        timers.into_iter().collect(),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use retrace_sdk::RetrySpec;

    fn ev(position: u64, activation: u32, event: Event) -> HistoryEvent {
        HistoryEvent {
            position,
            activation,
            recorded_at_ms: 100 + position,
            event,
        }
    }

    fn sched(seq: u32, name: &str) -> Event {
        Event::ActivityScheduled {
            seq,
            name: name.into(),
            input: Value::Null,
            retry: RetrySpec::default(),
        }
    }

    fn done(seq: u32) -> Event {
        Event::ActivityCompleted {
            seq,
            output: Value::Null,
            attempt: 1,
        }
    }

    /// The row of instance `t` (coordinator `trip`) with `status` and its next position and
    /// activation.
    fn trip_info(status: InstanceStatus, next_position: u64, next_activation: u32) -> InstanceInfo {
        InstanceInfo {
            id: "t".into(),
            coordinator: "trip".into(),
            status,
            input: Value::Null,
            output: None,
            error: None,
            reason: None,
            custom_status: None,
            parent: None,
            generation: 0,
            next_position,
            next_activation,
            created_at_ms: 0,
            updated_at_ms: 0,
            ended_at_ms: None,
        }
    }

    /// car, hotel, then the end: activations [0,1] [2,3] [4,5].
    fn trip() -> Vec<HistoryEvent> {
        vec![
            ev(
                0,
                0,
                Event::InstanceStarted {
                    coordinator: "trip".into(),
                    input: Value::Null,
                    parent: None,
                },
            ),
            ev(1, 0, sched(0, "car")),
            ev(2, 1, done(0)),
            ev(3, 1, sched(1, "hotel")),
            ev(4, 2, done(1)),
            ev(
                5,
                2,
                Event::InstanceCompleted {
                    output: Value::Null,
                },
            ),
        ]
    }

    #[test]
    fn cuts_round_down_to_activation_boundaries_before_the_end() {
        let h = trip();
        assert_eq!(fork_cut(&h, 0), 0);
        assert_eq!(fork_cut(&h, 1), 0);
        assert_eq!(fork_cut(&h, 2), 2);
        assert_eq!(fork_cut(&h, 3), 2);
        assert_eq!(fork_cut(&h, 4), 4);
        assert_eq!(fork_cut(&h, 5), 4);
        assert_eq!(fork_cut(&h, 6), 4);
        let running = &h[..4];
        assert_eq!(fork_cut(running, 4), 4);
    }

    #[test]
    fn fork_recreates_the_unanswered_call() {
        let h = trip();
        let info = trip_info(InstanceStatus::Completed, 6, 3);
        let f = ImportedInstance::fork(&info, &h, 5, "t2", 7).unwrap();
        assert_eq!(f.events.len(), 4);
        assert_eq!(f.status, InstanceStatus::Running);
        assert_eq!(f.tasks.len(), 1);
        assert_eq!(f.tasks[0].name, "hotel");
        assert!(f.ready);
        assert!(!f.start_in_inbox);
        let f0 = ImportedInstance::fork(&info, &h, 0, "t3", 7).unwrap();
        assert!(f0.events.is_empty() && f0.start_in_inbox && f0.tasks.is_empty());
        assert!(ImportedInstance::fork(&info, &h, 7, "t4", 7).is_err());
    }

    #[test]
    fn a_detached_child_without_an_outcome_does_not_stop_a_fork() {
        let child = |detached: bool| Event::ChildStarted {
            seq: 1,
            instance_id: "kid".into(),
            coordinator: "c".into(),
            input: Value::Null,
            detached,
        };
        let info = trip_info(InstanceStatus::Running, 4, 2);
        for detached in [true, false] {
            let mut h = trip()[..3].to_vec();
            h.push(ev(3, 1, child(detached)));
            let forked = ImportedInstance::fork(&info, &h, 4, "t2", 7);
            // Nothing waits on a detached child; an attached one's end is in the source store.
            assert_eq!(forked.is_ok(), detached, "detached: {detached}");
        }
    }

    #[test]
    fn import_checks_status_against_the_history() {
        let h = trip();
        let export = export_instance(
            &InstanceInfo {
                created_at_ms: 1,
                updated_at_ms: 1,
                ..trip_info(InstanceStatus::Running, 6, 3)
            },
            h.clone(),
        );
        let err = ImportedInstance::from_export(&export, None, 9).unwrap_err();
        assert!(err.to_string().contains("status is running"), "{err}");
        let mut partial = export.clone();
        partial.events.truncate(4);
        let ok = ImportedInstance::from_export(&partial, Some("copy"), 9).unwrap();
        assert_eq!(ok.id, "copy");
        assert_eq!(ok.tasks.len(), 1);
    }
}
