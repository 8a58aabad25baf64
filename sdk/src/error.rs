//! Errors seen by coordinator and activity authors.
//!
//! Two layers, classified by what the caller should do:
//! - [`ActivityError`] is what an activity body returns. It says whether a retry may help.
//! - [`Error`] is what coordinator code sees and returns. Its variants say where a failure came
//!   from (an activity that failed for good, a cancellation, a nondeterministic replay, a payload
//!   that does not decode, or the coordinator's own business logic).
//!
//! Every variant is `Serialize`: a coordinator's final error is journaled in its history.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The error type of coordinators: `async fn(Context, I) -> Result<O, Error>`.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Error {
    /// An activity failed for good: its error was non-retryable or its attempts ran out.
    #[error("{0}")]
    Activity(ActivityFailure),
    /// The instance was cancelled while the coordinator was waiting.
    #[error("instance cancelled: {reason}")]
    Cancelled {
        /// Why the caller cancelled it.
        reason: String,
    },
    /// Replay diverged from the recorded history.
    #[error("{0}")]
    Nondeterminism(Nondeterminism),
    /// A payload (input, output, activity result, signal) could not be encoded or decoded.
    #[error("could not {action} {what}: {message}")]
    Payload {
        /// `encode` or `decode`.
        action: String,
        /// What was being converted, for example `output of activity reserve_car at position 0`.
        what: String,
        /// The serde error.
        message: String,
    },
    /// A child coordinator ended without success.
    #[error("child instance {instance_id} ended without success: {message}")]
    Child {
        /// The child's instance id.
        instance_id: String,
        /// The child's error, rendered.
        message: String,
    },
    /// A failure raised by the coordinator's own logic.
    #[error("{kind}: {message}")]
    Application {
        /// A short, stable classification chosen by the author (for example `payment_refused`).
        kind: String,
        /// A message for people.
        message: String,
    },
    /// Not a failure: the coordinator asks to restart itself with new input and an empty history.
    /// Build it with [`crate::Context::continue_as_new`].
    #[error("continue as new")]
    ContinueAsNew {
        /// The input of the next run.
        input: Value,
    },
}

impl Error {
    /// A business failure raised by coordinator code.
    pub fn application(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Application {
            kind: kind.into(),
            message: message.into(),
        }
    }

    /// Whether this error is a cancellation.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Error::Cancelled { .. })
    }

    pub(crate) fn decode(what: impl Into<String>, err: &serde_json::Error) -> Self {
        Error::Payload {
            action: "decode".into(),
            what: what.into(),
            message: err.to_string(),
        }
    }

    pub(crate) fn encode(what: impl Into<String>, err: &serde_json::Error) -> Self {
        Error::Payload {
            action: "encode".into(),
            what: what.into(),
            message: err.to_string(),
        }
    }
}

/// The final failure of an activity call, as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error(
    "activity {activity} at position {position} failed on attempt {attempt}{}: {kind}: {message}",
    if *non_retryable { " (non-retryable)" } else { " (attempts exhausted)" }
)]
pub struct ActivityFailure {
    /// The activity's registered name.
    pub activity: String,
    /// The call position (command sequence number) of the call.
    pub position: u32,
    /// The attempt that failed last, counting from 1.
    pub attempt: u32,
    /// The error kind reported by the activity.
    pub kind: String,
    /// The error message reported by the activity.
    pub message: String,
    /// Whether the failure was final because the error was non-retryable (rather than because the
    /// attempts ran out).
    pub non_retryable: bool,
}

/// The error an activity body returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ActivityError {
    /// A short, stable classification (`timeout`, `unavailable`, `refused`, …). A retry policy can
    /// list kinds that are never retried.
    pub kind: String,
    /// A message for people.
    pub message: String,
    /// `false` when retrying can never help (a business refusal).
    pub retryable: bool,
}

impl ActivityError {
    /// An error that a later attempt may not repeat (a timeout, an unavailable service).
    pub fn retryable(kind: impl Into<String>, message: impl Into<String>) -> Self {
        ActivityError {
            kind: kind.into(),
            message: message.into(),
            retryable: true,
        }
    }

    /// An error that no retry can fix (a business refusal).
    pub fn non_retryable(kind: impl Into<String>, message: impl Into<String>) -> Self {
        ActivityError {
            kind: kind.into(),
            message: message.into(),
            retryable: false,
        }
    }
}

/// Replay diverged from the recorded history: the code asked for something other than what the
/// history holds at a position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error(
    "[RETRACE-ND] nondeterminism in instance {instance_id} at command position {position}: \
     history holds {recorded}, code requested {requested}"
)]
pub struct Nondeterminism {
    /// The instance whose replay diverged.
    pub instance_id: String,
    /// The command position (sequence number) where it diverged.
    pub position: u32,
    /// What the history holds at that position (`activity reserve_car`, `nothing`, …).
    pub recorded: String,
    /// What the code asked for (`activity book_hotel`, `nothing`, …).
    pub requested: String,
}

/// A history that cannot be replayed because it is malformed (not because the code changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The code diverged from the history.
    #[error("{0}")]
    Nondeterminism(Nondeterminism),
    /// The history itself is inconsistent.
    #[error("corrupt history of instance {instance_id} at event {position}: {message}")]
    CorruptHistory {
        /// The instance.
        instance_id: String,
        /// The index of the offending event in the history.
        position: u64,
        /// What is wrong.
        message: String,
    },
    /// The coordinator code panicked. The execution cannot go on (its future is gone); a
    /// worker stops the instance with this reason and leaves its history as it is, so that
    /// it can be resumed once the code is fixed.
    #[error(
        "coordinator of instance {instance_id} panicked at history position {position}: {message}"
    )]
    Panicked {
        /// The instance.
        instance_id: String,
        /// The history position of the activation during which it panicked.
        position: u64,
        /// The panic's message (`"a panic without a message"` when it had none).
        message: String,
    },
}
