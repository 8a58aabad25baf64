//! # Retrace
//!
//! Durable execution for Rust, embedded: coordinators are plain `async fn`s whose every
//! activity call and outcome is journaled to an SQLite event log. A coordinator that crashes,
//! or waits for something not there yet, is a row in the database; when its event arrives or a
//! worker restarts, its code is replayed deterministically against its history and resumes.
//!
//! This crate re-exports [`retrace_sdk`] (what coordinator and activity authors use, and the
//! pure replay machinery) and [`retrace_runtime`] (store, workers, client).
//!
//! ```
//! use retrace::prelude::*;
//! use std::sync::Arc;
//!
//! const ADD_ONE: Activity<u64, u64> = Activity::new("add_one");
//! const COUNT: Coordinator<u64, u64> = Coordinator::new("count");
//!
//! async fn count(ctx: Context, n: u64) -> Result<u64, Error> {
//!     let a = ctx.call(&ADD_ONE, &n).await?;
//!     ctx.call(&ADD_ONE, &a).await
//! }
//!
//! async fn add_one(_ctx: ActivityContext, n: u64) -> Result<u64, ActivityError> {
//!     Ok(n + 1)
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store: SharedStore = Arc::new(SqliteStore::open_in_memory()?);
//! let worker = Worker::builder(store.clone())
//!     .coordinator(&COUNT, count)
//!     .activity(&ADD_ONE, add_one)
//!     .start();
//! // A client in the worker's process starts instances with their first activation;
//! // `Client::new(store)` is the client for any other process.
//! let client = worker.client();
//! let handle = client.start(&COUNT, "count-1", &40).await?;
//! assert_eq!(handle.result().await?, 42);
//! worker.shutdown().await?;
//! # Ok(())
//! # }
//! ```

pub use retrace_runtime as runtime;
pub use retrace_sdk as sdk;

pub use retrace_runtime::{
    migrate_store, migrate_urls, open_store, MigrationReport, PostgresOptions, PostgresStore,
    StoreUrl,
};
pub use retrace_runtime::{
    Client, ClientError, CommitNotice, Durability, InstanceHandle, InstanceInfo, InstanceStatus,
    ListFilter, SharedStore, SqliteOptions, SqliteStore, Store, StoreError, Worker, WorkerBuilder,
};
pub use retrace_runtime::{InstanceCheck, ReplayReport, Replayer};
pub use retrace_sdk::{
    check_replay, replay_history, Activity, ActivityContext, ActivityError, ActivityFailure,
    Context, Coordinator, Divergence, Error, Event, HistoryEvent, HistoryExport, Nondeterminism,
    ReplayError, RetryPolicy, Saga,
};

/// One import for applications: authoring types, the store, the worker and the client.
pub mod prelude {
    pub use crate::{
        Activity, ActivityContext, ActivityError, Client, Context, Coordinator, Error, RetryPolicy,
        Saga, SharedStore, SqliteStore, Worker,
    };
}
