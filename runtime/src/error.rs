//! Errors of the durable side: the store, and the client.

use crate::store::InstanceStatus;
use retrace_sdk::Error;

/// What went wrong in a store operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another worker extended the history first: the caller's view is stale and must be
    /// dropped.
    #[error(
        "conflict on instance {instance_id}: expected next position {expected}, store has {found}"
    )]
    Conflict {
        /// The instance.
        instance_id: String,
        /// The next position the caller expected.
        expected: u64,
        /// The next position the store holds.
        found: u64,
    },
    /// The caller no longer holds the lease it relied on.
    #[error("lease on {what} is no longer held by {owner}")]
    LeaseLost {
        /// What the lease was on (`instance trip-1`, `activity trip-1/3`).
        what: String,
        /// The caller's worker id.
        owner: String,
    },
    /// No instance with this id.
    #[error("no instance {instance_id}")]
    NotFound {
        /// The id asked for.
        instance_id: String,
    },
    /// The file exists but is not a Retrace store.
    #[error("{path} is not a Retrace store: {detail}")]
    NotARetraceStore {
        /// The file.
        path: String,
        /// What was found instead.
        detail: String,
    },
    /// The file was written by a newer Retrace with a schema this version does not know.
    #[error("{path} has schema version {found}, newer than the {supported} this build supports; upgrade Retrace")]
    NewerSchema {
        /// The file.
        path: String,
        /// The schema version in the file.
        found: i64,
        /// The newest schema version this build knows.
        supported: i64,
    },
    /// The database stayed locked beyond the busy timeout.
    #[error("database busy beyond the busy timeout during {operation}: {detail}")]
    Busy {
        /// What was being done.
        operation: String,
        /// The driver's message.
        detail: String,
    },
    /// The disk (or the configured size limit) is full; nothing of the failed write was kept.
    #[error("database full during {operation}: {detail}")]
    Full {
        /// What was being done.
        operation: String,
        /// The driver's message.
        detail: String,
    },
    /// A stored payload cannot be decoded.
    #[error("undecodable {what} of instance {instance_id}: {detail}")]
    Corrupt {
        /// The instance.
        instance_id: String,
        /// What could not be decoded (`event at position 4`, `inbox message 17`).
        what: String,
        /// The decoder's message.
        detail: String,
    },
    /// Any other database error, with what was being done.
    #[error("store error during {operation}: {detail}")]
    Database {
        /// What was being done.
        operation: String,
        /// The driver's message.
        detail: String,
    },
    /// The store was shut down.
    #[error("store is closed")]
    Closed,
    /// The instance had already ended (with this status), so the operation (terminate,
    /// resume) changed nothing.
    #[error("instance {instance_id} has already ended ({status}); nothing was changed")]
    Ended {
        /// The instance.
        instance_id: String,
        /// How it ended.
        status: InstanceStatus,
    },
    /// A history handed to the store (import, fork) cannot become an instance: positions with
    /// gaps, no start event, a status that contradicts the events, a fork position out of range.
    #[error("cannot create instance {instance_id} from this history: {detail}")]
    InvalidHistory {
        /// The instance that was to be created.
        instance_id: String,
        /// What is wrong, with the position.
        detail: String,
    },
}

impl StoreError {
    /// Whether retrying the same operation later may succeed (busy, full, transient).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Busy { .. } | StoreError::Full { .. } | StoreError::Database { .. }
        )
    }
}

/// What went wrong in a client call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No instance with this id.
    #[error("no instance {instance_id}")]
    NotFound {
        /// The id asked for.
        instance_id: String,
    },
    /// The instance exists but runs another coordinator than the one asked for.
    #[error("instance {instance_id} runs coordinator {found}, not {expected}")]
    CoordinatorMismatch {
        /// The instance.
        instance_id: String,
        /// The coordinator asked for.
        expected: String,
        /// The coordinator it runs.
        found: String,
    },
    /// The instance ended with an error (failed or cancelled).
    #[error("instance {instance_id} failed: {error}")]
    Failed {
        /// The instance.
        instance_id: String,
        /// Its error.
        error: Error,
    },
    /// The instance was terminated.
    #[error("instance {instance_id} was terminated: {reason}")]
    Terminated {
        /// The instance.
        instance_id: String,
        /// Why.
        reason: String,
    },
    /// The instance is stopped (nondeterminism or corrupt history) until resumed.
    #[error("instance {instance_id} is stopped: {reason}")]
    Stopped {
        /// The instance.
        instance_id: String,
        /// Why.
        reason: String,
    },
    /// The instance has ended: it takes no more signals, cancellation, termination or
    /// resumption, and the call changed nothing.
    #[error("instance {instance_id} has ended ({status}); nothing more can be done to it")]
    Ended {
        /// The instance.
        instance_id: String,
        /// How it ended.
        status: InstanceStatus,
    },
    /// A payload did not encode or decode.
    #[error("payload of instance {instance_id}: {message}")]
    Payload {
        /// The instance.
        instance_id: String,
        /// What failed.
        message: String,
    },
    /// The wait timed out.
    #[error("timed out waiting for instance {instance_id}")]
    Timeout {
        /// The instance.
        instance_id: String,
    },
    /// The id cannot name a new instance (see [`crate::client::instance_id_problem`]); nothing
    /// was started.
    #[error("{instance_id:?} cannot be an instance id: {problem}")]
    InvalidId {
        /// The id asked for.
        instance_id: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}
