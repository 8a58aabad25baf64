//! The `Store` trait: where histories, inboxes, activity tasks and timers live.
//!
//! A store keeps, per instance:
//! - the **history**: events at contiguous positions, grouped into activations;
//! - the **inbox**: inbound events (activity outcomes, fired timers, signals, cancel requests)
//!   that have been durably accepted but not yet delivered to the coordinator. An activation
//!   moves a batch from the inbox into the history in one transaction;
//! - **activity tasks** with their attempt count and next-attempt time (a backoff is a durable
//!   timer: the task is invisible until then);
//! - **timers** by due time;
//! - a **lease** (owner, expiry) that says which worker may extend the history.
//!
//! # Invariants every implementation keeps
//! - An append happens only at the expected next position, in the same transaction that checks
//!   it; otherwise [`StoreError::Conflict`] and nothing is written.
//! - An activity call position gets at most one outcome in the inbox (deduplicated per position),
//!   and the outcome is accepted only while the task still exists.
//! - A call returns only after its transaction committed with the store's durability setting.
//!
//! The replay machinery knows nothing of this trait: a new store (PostgreSQL) implements it
//! without touching `retrace-sdk`.

mod checkpoint;
mod codec;
mod deferred_rows;
mod held_chain;
pub mod migrate;
pub mod postgres;
pub mod sqlite;
mod transaction;
pub mod transfer;
pub mod url;
mod wal_writes;

pub use transfer::{ForkOutcome, ImportedInstance};

use crate::error::StoreError;
use async_trait::async_trait;
use retrace_sdk::{
    ActivityError, Error, Event, Execution, HistoryEvent, ParentRef, ReplayError, RetrySpec,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use tokio::sync::watch;

/// Lifecycle state of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Running or waiting.
    Running,
    /// The coordinator returned `Ok`.
    Completed,
    /// The coordinator returned an error.
    Failed,
    /// The coordinator ended after a cancellation.
    Cancelled,
    /// Terminated by a client.
    Terminated,
    /// Stopped by a nondeterminism error or an unreadable history; resumable after a fix.
    Stopped,
}

impl InstanceStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Running => "running",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Cancelled => "cancelled",
            InstanceStatus::Terminated => "terminated",
            InstanceStatus::Stopped => "stopped",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "running" => InstanceStatus::Running,
            "completed" => InstanceStatus::Completed,
            "failed" => InstanceStatus::Failed,
            "cancelled" => InstanceStatus::Cancelled,
            "terminated" => InstanceStatus::Terminated,
            "stopped" => InstanceStatus::Stopped,
            _ => return None,
        })
    }

    /// Whether the instance has ended for good.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            InstanceStatus::Completed
                | InstanceStatus::Failed
                | InstanceStatus::Cancelled
                | InstanceStatus::Terminated
        )
    }
}

impl std::fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a store knows about an instance, without its history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InstanceInfo {
    /// The instance id.
    pub id: String,
    /// The coordinator's registered name.
    pub coordinator: String,
    /// Lifecycle state.
    pub status: InstanceStatus,
    /// The input of the current run.
    pub input: Value,
    /// The output, once completed.
    pub output: Option<Value>,
    /// The error, once failed or cancelled.
    pub error: Option<Error>,
    /// Why the instance is stopped, terminated, or waiting for a worker that knows its code.
    pub reason: Option<String>,
    /// The last custom status published by the coordinator.
    pub custom_status: Option<Value>,
    /// The parent, for a child instance.
    pub parent: Option<ParentRef>,
    /// How many times the instance continued as new.
    pub generation: u64,
    /// The next history position (the history length of the current run).
    pub next_position: u64,
    /// The next activation number.
    pub next_activation: u32,
    /// When it was created, ms since the Unix epoch.
    pub created_at_ms: u64,
    /// When it last changed, ms since the Unix epoch.
    pub updated_at_ms: u64,
    /// When it ended, ms since the Unix epoch.
    pub ended_at_ms: Option<u64>,
}

/// A request to create an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct NewInstance {
    /// The caller-chosen id.
    pub id: String,
    /// The coordinator's registered name.
    pub coordinator: String,
    /// The input.
    pub input: Value,
    /// The parent, for a child instance.
    pub parent: Option<ParentRef>,
}

/// The answer to [`Store::create_instance`].
// Returned once per start, never stored in bulk: boxing would cost more than the size.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum CreateOutcome {
    /// A new instance was created.
    Created,
    /// An instance with that id already existed; nothing was changed.
    Existing(InstanceInfo),
}

/// An inbox message: an inbound event accepted but not yet delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxMessage {
    /// Store-assigned id, increasing in arrival order.
    pub id: i64,
    /// The event.
    pub event: Event,
}

/// An instance loaded for an activation.
#[derive(Debug, Clone)]
pub struct LoadedInstance {
    /// The instance row.
    pub info: InstanceInfo,
    /// History events from the requested position on.
    pub events: Vec<HistoryEvent>,
    /// Undelivered inbox messages, in arrival order.
    pub inbox: Vec<InboxMessage>,
}

/// Makes the execution a cold load replays into, once the instance row and inbox are read
/// (see [`Store::load_and_replay`]); `None` to load without replaying (the instance is not
/// running, its coordinator is unknown here, or there is nothing to deliver).
pub type ExecutionFactory =
    Box<dyn FnOnce(&InstanceInfo, &[InboxMessage]) -> Option<Execution> + Send>;

/// What became of a message handed to [`Store::deliver_message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// It is in the instance's inbox.
    Accepted,
    /// One with the same dedupe key was delivered before: this one was ignored.
    Duplicate,
    /// The instance has ended (with this status): nothing was delivered.
    Ended(InstanceStatus),
}

/// What [`Store::load_and_replay`] returns.
#[derive(Debug)]
pub struct ReplayedInstance {
    /// The instance row and its inbox; `events` is empty (the history went into `execution`).
    pub loaded: LoadedInstance,
    /// The execution the factory made, replayed as far as `replay` says; `None` if it made none.
    pub execution: Option<Execution>,
    /// `Ok` once the whole history was replayed; otherwise the divergence that stopped replay.
    pub replay: Result<(), ReplayError>,
    /// History events read.
    pub events: u64,
}

/// Replays a loaded history into the execution `start` makes: [`Store::load_and_replay`] for a
/// store that cannot overlap the two.
pub(crate) fn replay_loaded(
    mut loaded: LoadedInstance,
    start: ExecutionFactory,
) -> ReplayedInstance {
    let events = std::mem::take(&mut loaded.events);
    let mut execution = start(&loaded.info, &loaded.inbox);
    let replay = match &mut execution {
        Some(execution) => execution.replay(&events),
        None => Ok(()),
    };
    ReplayedInstance {
        loaded,
        execution,
        replay,
        events: events.len() as u64,
    }
}

/// An activity task to create with an activation.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// The call position.
    pub seq: u32,
    /// The activity's registered name.
    pub name: String,
    /// The input.
    pub input: Value,
    /// The retry policy.
    pub retry: RetrySpec,
    /// Whether the committing worker claims it at once (it runs that activity itself).
    pub claim: bool,
}

/// How an instance's run ended, as committed with its last activation.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    /// The coordinator returned `Ok`.
    Completed(Value),
    /// The coordinator returned an error.
    Failed(Error),
    /// The coordinator ended after a cancellation.
    Cancelled(String),
    /// The coordinator restarts with new input and an empty history.
    ContinueAsNew(Value),
}

/// Everything one activation writes, in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationCommit {
    /// The instance.
    pub instance_id: String,
    /// The committing worker (must hold the instance's lease). Shared: a worker commits
    /// every step under the same id.
    pub owner: Arc<str>,
    /// The run the activation belongs to.
    pub generation: u64,
    /// The history position the first event goes to; the append fails with a conflict otherwise.
    pub expected_position: u64,
    /// The activation number of the events.
    pub activation: u32,
    /// The events to append.
    pub events: Vec<Event>,
    /// Inbox messages delivered by this activation, to delete.
    pub consumed_inbox: Vec<i64>,
    /// Activity tasks to create.
    pub tasks: Vec<NewTask>,
    /// Timers to create: (position, due time in ms).
    pub timers: Vec<(u32, u64)>,
    /// Child instances to create.
    pub children: Vec<NewInstance>,
    /// A new custom status.
    pub custom_status: Option<Value>,
    /// The end of the run, if the coordinator returned.
    pub end: Option<RunEnd>,
    /// The lease duration for claimed tasks and a kept instance lease, in ms.
    pub lease_ms: u64,
}

impl ActivationCommit {
    /// Derives the store effects of an activation's events: tasks for scheduled activities,
    /// timers, children, and the end of the run. `claims` says which activity names the
    /// committing worker runs itself. A worker passes its `owner` as an `Arc<str>` it shares
    /// with every commit it plans (no copy of it per step).
    #[allow(clippy::too_many_arguments)]
    pub fn plan(
        instance_id: &str,
        owner: impl Into<Arc<str>>,
        generation: u64,
        expected_position: u64,
        activation: u32,
        events: Vec<Event>,
        consumed_inbox: Vec<i64>,
        custom_status: Option<Value>,
        claims: &dyn Fn(&str) -> bool,
        lease_ms: u64,
    ) -> Self {
        let mut tasks = Vec::new();
        let mut timers = Vec::new();
        let mut children = Vec::new();
        let mut end = None;
        for event in &events {
            match event {
                Event::ActivityScheduled {
                    seq,
                    name,
                    input,
                    retry,
                } => tasks.push(NewTask {
                    seq: *seq,
                    name: name.clone(),
                    input: input.clone(),
                    retry: retry.clone(),
                    claim: claims(name),
                }),
                Event::TimerStarted { seq, fire_at_ms } => timers.push((*seq, *fire_at_ms)),
                Event::ChildStarted {
                    seq,
                    instance_id: child,
                    coordinator,
                    input,
                    detached,
                } => children.push(NewInstance {
                    id: child.clone(),
                    coordinator: coordinator.clone(),
                    input: input.clone(),
                    parent: (!detached).then(|| ParentRef {
                        instance_id: instance_id.to_string(),
                        seq: *seq,
                    }),
                }),
                Event::InstanceCompleted { output } => {
                    end = Some(RunEnd::Completed(output.clone()))
                }
                Event::InstanceFailed { error } => end = Some(RunEnd::Failed(error.clone())),
                Event::InstanceCancelled { reason } => {
                    end = Some(RunEnd::Cancelled(reason.clone()))
                }
                Event::ContinuedAsNew { input } => end = Some(RunEnd::ContinueAsNew(input.clone())),
                _ => {}
            }
        }
        if end.is_some() {
            // A run that ends here leaves no call behind (the store drops its pending calls
            // with the end): none is claimed, so no worker runs a call nobody will record.
            for task in &mut tasks {
                task.claim = false;
            }
        }
        ActivationCommit {
            instance_id: instance_id.to_string(),
            owner: owner.into(),
            generation,
            expected_position,
            activation,
            events,
            consumed_inbox,
            tasks,
            timers,
            children,
            custom_status,
            end,
            lease_ms,
        }
    }
}

/// What an activation commit reports back.
#[derive(Debug, Clone, Default)]
pub struct CommitReceipt {
    /// Inbox messages arrived meanwhile: the committing worker keeps the lease and should
    /// activate again.
    pub ready_again: bool,
    /// Tasks the committing worker claimed (those with `claim: true`).
    pub claimed_tasks: Vec<ActivityTask>,
    /// Instances made ready by this commit (a parent notified of a child's end, new children),
    /// so that a worker can pick them up without polling.
    pub woken: Vec<String>,
}

/// An activity task claimed by a worker, for one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivityTask {
    /// The calling instance.
    pub instance_id: String,
    /// The call position.
    pub seq: u32,
    /// The activity's registered name.
    pub name: String,
    /// The input.
    pub input: Value,
    /// The retry policy.
    pub retry: RetrySpec,
    /// The attempt this claim runs, from 1.
    pub attempt: u32,
    /// The caller's run.
    pub generation: u64,
}

/// The result of one activity attempt, to record.
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    /// The call has its final outcome (success, or failure for good): an inbox event.
    Final(Event),
    /// The attempt failed and will be retried at `next_attempt_at_ms` (a durable timer).
    Retry {
        /// When the next attempt becomes visible.
        next_attempt_at_ms: u64,
        /// Why this attempt failed.
        error: ActivityError,
    },
}

/// What [`Store::finish_task`] reports back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FinishReceipt {
    /// The outcome was recorded (false: the task was gone or no longer leased by this worker,
    /// and the outcome was dropped — another attempt owns the position).
    pub accepted: bool,
    /// The finishing worker now holds the instance's lease and should activate it.
    pub instance_claimed: bool,
}

/// What [`Store::finish_and_activate`] did.
#[derive(Debug, Clone)]
pub enum DirectFinish {
    /// The outcome and the activation that delivered it were committed together.
    Activated(CommitReceipt),
    /// Only the outcome was handled, exactly as [`Store::finish_task`] would have: the
    /// activation was not applied (the instance moved on, is leased by another worker, has
    /// undelivered inbox messages, or the store does not support the combined commit).
    Finished(FinishReceipt),
}

/// How one activity attempt ended, as journaled by [`Store::attempts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptEnd {
    /// The attempt succeeded: the call's final outcome.
    Completed,
    /// The attempt failed for good: the call's final outcome.
    Failed,
    /// The attempt failed and another attempt was scheduled.
    Retry,
}

impl AttemptEnd {
    /// The stored spelling: `completed`, `failed` or `retry`.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptEnd::Completed => "completed",
            AttemptEnd::Failed => "failed",
            AttemptEnd::Retry => "retry",
        }
    }

    /// The value of a stored spelling.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "completed" => Some(AttemptEnd::Completed),
            "failed" => Some(AttemptEnd::Failed),
            "retry" => Some(AttemptEnd::Retry),
            _ => None,
        }
    }
}

/// One activity attempt from the store's attempt journal ([`Store::attempts`]).
///
/// The journal is kept beside the history, never in it: the history records only the attempt
/// that produced each call's outcome (and must stay exactly what replay needs), while the
/// journal records every attempt whose outcome was accepted, for tools (`retrace timeline`,
/// `retrace show`). It is written in the transaction that records the attempt's outcome, so an
/// attempt whose outcome was dropped (its lease was lost) is not in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The calling instance.
    pub instance_id: String,
    /// The run (continue-as-new generation) the call belongs to.
    pub generation: u64,
    /// The call position.
    pub seq: u32,
    /// The attempt number, from 1.
    pub attempt: u32,
    /// When a worker claimed the task for this attempt (the body starts right after), in ms
    /// since the Unix epoch.
    pub started_at_ms: u64,
    /// When the attempt's outcome was recorded, in ms since the Unix epoch.
    pub ended_at_ms: u64,
    /// How the attempt ended.
    pub outcome: AttemptEnd,
    /// The error of a failed attempt (`kind: message`).
    pub error: Option<String>,
}

/// A filter for [`Store::list_instances`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only instances in this state.
    pub status: Option<InstanceStatus>,
    /// Only instances of this coordinator.
    pub coordinator: Option<String>,
    /// At most this many (newest first).
    pub limit: Option<usize>,
}

/// Where histories, inboxes, tasks and timers live. See the module docs for the invariants.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates an instance and puts `InstanceStarted` in its inbox; if the id exists, changes
    /// nothing and returns the existing instance.
    async fn create_instance(&self, new: NewInstance) -> Result<CreateOutcome, StoreError>;

    /// Claims up to `limit` instances that have undelivered inbox messages, run one of
    /// `coordinators`, and are not leased by another worker.
    async fn claim_ready(
        &self,
        owner: &str,
        coordinators: &[String],
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<String>, StoreError>;

    /// Loads an instance row, its history from `from_position` on, and its inbox.
    async fn load(
        &self,
        instance_id: &str,
        from_position: u64,
    ) -> Result<LoadedInstance, StoreError>;

    /// Loads an instance from position 0, like [`Store::load`], and replays its history into
    /// the execution `start` makes for it. The default loads, then replays; a store may replay
    /// while it is still reading (the SQLite store does), which is what a cold activation costs.
    async fn load_and_replay(
        &self,
        instance_id: &str,
        start: ExecutionFactory,
    ) -> Result<ReplayedInstance, StoreError> {
        let loaded = self.load(instance_id, 0).await?;
        Ok(replay_loaded(loaded, start))
    }

    /// Creates an instance together with its first activation `first` (computed by the caller
    /// from `InstanceStarted` alone, at position 0 of generation 0, under `first.owner`'s lease),
    /// in one transaction: the start of an instance costs one commit instead of three (create,
    /// claim, first activation). If the id exists, changes nothing and returns the existing
    /// instance with no receipt. A store may also decline the activation, by creating the
    /// instance as [`Store::create_instance`] does and returning no receipt; the caller then
    /// drops its execution and the instance is activated the usual way. The default declines.
    async fn create_and_activate(
        &self,
        new: NewInstance,
        first: ActivationCommit,
    ) -> Result<(CreateOutcome, Option<CommitReceipt>), StoreError> {
        drop(first);
        Ok((self.create_instance(new).await?, None))
    }

    /// Appends an activation and applies its effects atomically, if `expected_position` is still
    /// the next position and `owner` holds the lease.
    async fn commit_activation(
        &self,
        commit: ActivationCommit,
    ) -> Result<CommitReceipt, StoreError>;

    /// Stops an instance (nondeterminism, unreadable history) without touching its history.
    async fn stop_instance(
        &self,
        instance_id: &str,
        owner: &str,
        reason: &str,
    ) -> Result<(), StoreError>;

    /// Hands back the lease `owner` took on an instance in which it found nothing to deliver
    /// (an imported or forked instance, created ready so that its history is replayed at
    /// once): the lease is released, and the instance stays ready only if its inbox holds
    /// something by now. Applies only while `owner` holds the lease.
    async fn release_idle(&self, instance_id: &str, owner: &str) -> Result<(), StoreError>;

    /// Notes why a running instance cannot progress here (for example an unknown coordinator
    /// or activity), and hands back its lease. Applies only to a running instance, while
    /// `owner` or nobody holds the lease. The instance stays running; its next activation clears the note.
    async fn note_waiting(
        &self,
        instance_id: &str,
        owner: &str,
        reason: &str,
    ) -> Result<(), StoreError>;

    /// Claims up to `limit` visible activity tasks among `activities`, counting a new attempt
    /// for each.
    async fn claim_tasks(
        &self,
        owner: &str,
        activities: &[String],
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<ActivityTask>, StoreError>;

    /// Records the outcome of an attempt of a task this worker holds.
    async fn finish_task(
        &self,
        owner: &str,
        task: &ActivityTask,
        outcome: AttemptOutcome,
        lease_ms: u64,
    ) -> Result<FinishReceipt, StoreError>;

    /// Records the final outcome of an attempt of a task `commit.owner` holds and, in the same
    /// transaction, appends `commit`: the activation that delivered that outcome (its first
    /// event) to the caller's in-memory execution of the instance. This halves the commits per
    /// sequential step. The activation is applied only if the task is still held with this
    /// attempt, the instance is running at `commit.expected_position`, is not leased by another
    /// worker, and has no undelivered inbox message; otherwise the outcome is handled exactly as
    /// by [`Store::finish_task`] and nothing else is written, and the caller must discard its
    /// execution. Default: always the latter.
    async fn finish_and_activate(
        &self,
        task: &ActivityTask,
        commit: ActivationCommit,
    ) -> Result<DirectFinish, StoreError> {
        let outcome = commit
            .events
            .first()
            .cloned()
            .ok_or_else(|| StoreError::Database {
                operation: "finish and activate".into(),
                detail: "the activation holds no outcome event".into(),
            })?;
        self.finish_task(
            &commit.owner,
            task,
            AttemptOutcome::Final(outcome),
            commit.lease_ms,
        )
        .await
        .map(DirectFinish::Finished)
    }

    /// Renews every lease `owner` holds; returns how many rows were renewed.
    async fn renew_leases(&self, owner: &str, lease_ms: u64) -> Result<u64, StoreError>;

    /// Hands back every lease `owner` holds (graceful shutdown).
    async fn release_leases(&self, owner: &str) -> Result<(), StoreError>;

    /// Moves due timers into their instances' inboxes; returns the instances made ready.
    async fn fire_due_timers(&self, now_ms: u64, limit: usize) -> Result<Vec<String>, StoreError>;

    /// The due time of the earliest pending timer or retry, if any.
    async fn next_due(&self) -> Result<Option<u64>, StoreError>;

    /// Puts an inbound event (a signal, a cancel request) in an instance's inbox. With a
    /// `dedupe_key`, a second delivery with the same key is ignored. Says what became of it:
    /// a message whose key was delivered before is a [`Delivery::Duplicate`] even once the
    /// instance has ended; [`Delivery::Ended`] means nothing was, or ever will be, delivered.
    async fn deliver_message(
        &self,
        instance_id: &str,
        event: Event,
        dedupe_key: Option<&str>,
    ) -> Result<Delivery, StoreError>;

    /// [`Store::deliver_message`], answering only whether the message was accepted.
    async fn deliver(
        &self,
        instance_id: &str,
        event: Event,
        dedupe_key: Option<&str>,
    ) -> Result<bool, StoreError> {
        Ok(self.deliver_message(instance_id, event, dedupe_key).await? == Delivery::Accepted)
    }

    /// Ends an instance at once, recording why in its history. [`StoreError::Ended`], with
    /// nothing changed, when it had already ended (a second terminate among them):
    /// the status read and the change are one transaction, so a caller that looked before
    /// learns here that the instance ended in between.
    async fn terminate(&self, instance_id: &str, reason: &str) -> Result<(), StoreError>;

    /// Puts a stopped instance back to running. A running one stays running (its reason, a
    /// waiting note, is cleared, and it is made ready if its inbox holds anything).
    /// [`StoreError::Ended`], with nothing changed, when it has ended.
    async fn resume(&self, instance_id: &str) -> Result<(), StoreError>;

    /// The instance row.
    async fn describe(&self, instance_id: &str) -> Result<Option<InstanceInfo>, StoreError>;

    /// The whole history of the current run.
    async fn history(&self, instance_id: &str) -> Result<Vec<HistoryEvent>, StoreError>;

    /// Instances matching `filter`.
    async fn list_instances(&self, filter: &ListFilter) -> Result<Vec<InstanceInfo>, StoreError>;

    /// A channel that changes whenever an instance may have become ready or ended, for waiting
    /// without polling inside one process.
    fn changes(&self) -> watch::Receiver<u64>;

    /// A channel that changes whenever an instance may have become ready to claim, for workers
    /// looking for work: unlike [`Store::changes`], a store may leave out the ends of instances
    /// that made no other instance ready. Default: [`Store::changes`].
    fn ready_changes(&self) -> watch::Receiver<u64> {
        self.changes()
    }

    /// Announces a live worker, so that the store can tell when it dies. A store that can
    /// detect dead workers (the SQLite store, through a lock held by the worker's process)
    /// hands their work over at once instead of after lease expiry. Default: nothing.
    async fn register_worker(&self, _owner: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Withdraws a worker announced with [`Store::register_worker`] (graceful shutdown).
    async fn unregister_worker(&self, _owner: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Expires at once every lease held by a worker known to be dead; returns how many dead
    /// workers were found. Default: none can be detected, leases expire on their own.
    async fn reap_dead_workers(&self) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Marks running instances that have waited at least `min_wait_ms` for a worker and whose
    /// coordinator is not among `known`, with a reason naming the coordinator (they stay
    /// running, and the reason is cleared by their next activation). Returns how many were
    /// marked. Default: marks nothing.
    async fn mark_unclaimed(
        &self,
        _known: &[String],
        _min_wait_ms: u64,
    ) -> Result<u64, StoreError> {
        Ok(0)
    }

    /// Creates an instance from a recorded history (`retrace import`, and
    /// [`Store::fork_instance`]), in one transaction. Build `instance` with
    /// [`ImportedInstance::from_export`] or [`ImportedInstance::fork`], which validate the
    /// history and derive the pending work; the store writes exactly what it is given:
    /// - if an instance `instance.id` exists, nothing changes and the existing instance is
    ///   returned as [`CreateOutcome::Existing`];
    /// - the row: `status`, `coordinator`, `input`, `output`, `error`, `reason`,
    ///   `custom_status` as given, no parent, generation 0, next position `events.len()`, next
    ///   activation one past the last event's (0 without events), `created_at_ms`,
    ///   `ended_at_ms`, no lease, ready flag `ready`;
    /// - the events verbatim: their positions, activations and `recorded_at_ms` are kept;
    /// - `tasks` as unclaimed activity tasks at attempt 0, visible at once, generation 0;
    /// - `timers` due at their times, generation 0;
    /// - when `start_in_inbox`, an `InstanceStarted { coordinator, input, parent: None }` inbox
    ///   message with dedupe key `start:0`; no other inbox message.
    ///
    /// # Errors
    /// [`StoreError::InvalidHistory`] when the events are not contiguous from position 0 (a
    /// store re-checks this), and store errors.
    async fn import_instance(
        &self,
        instance: ImportedInstance,
    ) -> Result<CreateOutcome, StoreError>;

    /// Creates `new_id` from the first events of `source_id`'s current run, so that a run can be
    /// re-run from a step after a fix. The fork keeps the longest prefix of **whole
    /// activations** with at most `position` events that does not contain the end of the run
    /// (see [`transfer`]), is `running` and ready, has no parent, and gets tasks and timers
    /// re-created for every command of the prefix without an outcome in the prefix. The source
    /// is only read. Provided on top of [`Store::history`] and [`Store::import_instance`]: a
    /// history prefix never changes, so the two need not share a transaction.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] for a missing source, [`StoreError::InvalidHistory`] for a
    /// position past the end or a prefix that waits on a child instance, and store errors.
    async fn fork_instance(
        &self,
        source_id: &str,
        position: u64,
        new_id: &str,
    ) -> Result<ForkOutcome, StoreError> {
        let source = self
            .describe(source_id)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                instance_id: source_id.to_string(),
            })?;
        let history = self.history(source_id).await?;
        let fork =
            ImportedInstance::fork(&source, &history, position, new_id, crate::clock::now_ms())?;
        let (kept_events, tasks, timers) = (
            fork.events.len() as u64,
            fork.tasks.len(),
            fork.timers.len(),
        );
        Ok(match self.import_instance(fork).await? {
            CreateOutcome::Created => ForkOutcome::Forked {
                kept_events,
                tasks,
                timers,
            },
            CreateOutcome::Existing(info) => ForkOutcome::Existing(Box::new(info)),
        })
    }

    /// The attempt journal of `instance_id`: every activity attempt whose outcome was recorded,
    /// of every run kept, ordered by generation, call position and attempt. Deleting an
    /// instance's pending work (its end, a termination) keeps its attempts; continue-as-new
    /// keeps the attempts of earlier runs (filter on [`AttemptRecord::generation`]). Default:
    /// a store without a journal returns nothing, and tools fall back to the history.
    async fn attempts(&self, _instance_id: &str) -> Result<Vec<AttemptRecord>, StoreError> {
        Ok(vec![])
    }
}

/// A shared, type-erased store.
pub type SharedStore = Arc<dyn Store>;
