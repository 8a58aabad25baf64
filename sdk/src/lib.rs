//! # retrace-sdk
//!
//! The author API of Retrace, and the pure replay machinery behind it.
//!
//! - [`Context`]: what coordinator code uses to call activities, sleep, wait for signals, start
//!   children and obtain time and randomness deterministically ([`context`]).
//! - [`Activity`] and [`Coordinator`]: typed, `const` definitions shared by callers and workers.
//! - [`RetryPolicy`]: how activity calls are retried ([`retry`]).
//! - [`Saga`]: compensations in reverse order ([`saga`]).
//! - [`Event`] and [`HistoryEvent`]: the journaled history ([`history`]).
//! - [`Execution`]: the I/O-free state machine that replays a history and runs new activations
//!   ([`replay`]); [`replay_history`] checks a recorded history against current code.
//! - [`HistoryExport`]: the versioned JSON export of one instance's history ([`export`]);
//!   [`HistoryExport::replay`] replays an exported history in a plain `#[test]`.
//!
//! This crate does no I/O: no database, no clock, no random source, no threads. The durable side
//! lives in `retrace-runtime`.
//!
//! ```
//! use retrace_sdk::{coordinator_fn, Activity, Context, Coordinator, Error, Event, Execution};
//!
//! const DOUBLE: Activity<u64, u64> = Activity::new("double");
//! const TWICE: Coordinator<u64, u64> = Coordinator::new("twice");
//!
//! async fn twice(ctx: Context, n: u64) -> Result<u64, Error> {
//!     let a = ctx.call(&DOUBLE, &n).await?;
//!     ctx.call(&DOUBLE, &a).await
//! }
//!
//! // Drive the coordinator by hand, as a worker would, without any database.
//! let mut run = Execution::new("demo", coordinator_fn(&TWICE, twice));
//! let start = Event::InstanceStarted { coordinator: "twice".into(), input: 3.into(), parent: None };
//! let first = run.activate(vec![start], 0, 0).unwrap();
//! // The start, the patches it pins (none here), then the first command.
//! assert!(matches!(first.events[2], Event::ActivityScheduled { seq: 0, .. }));
//! let done = Event::ActivityCompleted { seq: 0, output: 6.into(), attempt: 1 };
//! let second = run.activate(vec![done], 0, 0).unwrap();
//! assert!(matches!(second.events[1], Event::ActivityScheduled { seq: 1, .. }));
//! let done = Event::ActivityCompleted { seq: 1, output: 12.into(), attempt: 1 };
//! let third = run.activate(vec![done], 0, 0).unwrap();
//! assert_eq!(third.terminal(), Some(&Event::InstanceCompleted { output: 12.into() }));
//! ```

pub mod activity;
pub mod context;
pub mod coordinator;
pub mod error;
pub mod export;
pub mod history;
mod positions;
pub mod replay;
pub mod retry;
pub mod saga;

pub use activity::{activity_handler, Activity, ActivityContext, ActivityHandler};
pub use context::{ActivityCall, ChildCall, Context, SignalWait, Timer};
pub use coordinator::{coordinator_fn, Coordinator, CoordinatorFn};
pub use error::{ActivityError, ActivityFailure, Error, Nondeterminism, ReplayError};
pub use export::{
    check_replay, Divergence, ExportError, ExportedInstance, HistoryExport, HISTORY_FORMAT,
    HISTORY_FORMAT_VERSION,
};
pub use history::{Event, EventFamily, HistoryEvent, ParentRef, EVENT_SCHEMA_VERSION};
pub use replay::{replay_history, Activation, Execution};
pub use retry::{RetryPolicy, RetrySpec};
pub use saga::Saga;

/// One import for coordinator and activity authors.
pub mod prelude {
    pub use crate::{
        Activity, ActivityContext, ActivityError, Context, Coordinator, Error, RetryPolicy, Saga,
    };
}
