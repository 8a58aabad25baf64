//! # retrace-runtime
//!
//! The durable side of Retrace: the [`Store`] trait and its SQLite implementation
//! ([`SqliteStore`]: WAL, `synchronous=FULL`, group commit), [`Worker`]s that run coordinators
//! and activities with leases, durable timers and stateful retries, and the [`Client`].
//!
//! Coordinator and activity code is written against `retrace-sdk` and knows nothing of this
//! crate.

pub mod client;
mod clock;
pub mod error;
mod instance_slots;
pub mod limits;
pub mod replayer;
pub mod store;
pub mod worker;

pub use client::{Client, InstanceHandle};
pub use error::{ClientError, StoreError};
pub use replayer::{InstanceCheck, ReplayReport, Replayer};
pub use store::migrate::{migrate_store, migrate_urls, MigrationReport};
pub use store::postgres::{PostgresOptions, PostgresStore};
pub use store::sqlite::{Durability, SqliteOptions, SqliteStore};
pub use store::url::{open_store, StoreUrl};
pub use store::{
    Delivery, ExecutionFactory, InstanceInfo, InstanceStatus, ListFilter, ReplayedInstance,
    SharedStore, Store,
};
pub use worker::{CommitNotice, Worker, WorkerBuilder, CACHE_ENV};
