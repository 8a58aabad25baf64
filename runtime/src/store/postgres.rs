//! The PostgreSQL store: the same [`Store`] semantics as the SQLite store, for workers on many
//! hosts sharing one trusted PostgreSQL server.
//!
//! # Driver
//! [`tokio_postgres`] (the rust-postgres project) with the [`deadpool_postgres`] pool: a native,
//! asynchronous driver (no blocking thread per query), with per-connection statement caches and
//! `LISTEN/NOTIFY` support on a plain connection. No TLS: the server is expected on a trusted
//! network or through a local socket.
//!
//! # Commit protocol
//! Every operation is one transaction on a pooled connection (or one statement, atomic on its
//! own), and a call returns only after its `COMMIT` was acknowledged (with the server's
//! durability setting: `synchronous_commit=on` by default, so after the WAL flush). There is no
//! group commit here: the server batches WAL flushes of concurrent transactions itself.
//! Independent statements of one transaction are pipelined (sent together, run in order) to
//! save round trips; a load is one round trip (`BEGIN`, three reads, `COMMIT`).
//!
//! # Concurrency
//! Where SQLite has one writer, PostgreSQL runs transactions side by side, so the store takes row
//! locks in one order, **instance row first, then its tasks, timers and inbox**:
//! - every change to an instance's history, inbox or lease starts with `SELECT … FOR UPDATE` on
//!   its row, so appends guarded by the expected next position, inbox inserts and the
//!   "more inbox arrived meanwhile" check are serialized per instance, as on SQLite; inbox ids are
//!   then increasing in commit order per instance;
//! - claims of instances and activity tasks, lease renewals and timer firing lock rows with
//!   `FOR UPDATE SKIP LOCKED`, so that workers never wait on rows others hold;
//! - a transaction aborted by a deadlock or a serialization failure rolled back entirely, and is
//!   run again (a few times) before the error reaches the caller.
//!
//! Lease and due times are milliseconds of the workers' clocks, as on SQLite: hosts sharing a
//! store need synchronized clocks (NTP), with lease durations well above their skew.
//!
//! # Wake-ups
//! After committing a change that makes an instance ready or ends one (the changes on which the
//! SQLite store bumps [`Store::changes`]), the store bumps its own channel at once and sends a
//! `NOTIFY` on a channel named after the schema, from a dedicated connection that also `LISTEN`s
//! on it and bumps [`Store::changes`] for every notification; so an idle worker on any host
//! picks up new work within milliseconds. Bursts of changes are coalesced into one `NOTIFY`.
//! The `NOTIFY` is sent after the commit rather than inside the transaction, because PostgreSQL
//! serializes the commits of notifying transactions. A notification lost (the listening
//! connection down, a crash between commit and `NOTIFY`) only delays the work until the
//! workers' next poll; the listener reconnects with backoff.
//!
//! # Dead workers
//! [`Store::register_worker`] takes a session advisory lock on a connection of the worker's
//! own and records the worker in `workers`. The server releases that lock when the connection
//! ends, however the process died; [`Store::reap_dead_workers`] finds registered workers whose
//! lock is free and expires their leases at once, as the SQLite store does with lock files.
//!
//! # Schema
//! Tables live in one PostgreSQL schema (the `schema` option, or the connection's current schema,
//! usually `public`). `retrace_schema` holds the application name and the schema version;
//! migrations run under an advisory lock. A schema of a newer version is refused with
//! [`StoreError::NewerSchema`]; a schema holding tables but no `retrace_schema` is refused with
//! [`StoreError::NotARetraceStore`], and nothing is changed in either case.

use super::codec::{
    child_id_refusal, decode_event_json, decode_json, end_columns, event_json, existing_child,
    final_result, lock_map, to_json, ExistingChild,
};
use super::migrate::{CopyOutcome, RawInstance as RawCopy};
use super::{
    ActivationCommit, ActivityTask, AttemptEnd, AttemptOutcome, AttemptRecord, CommitReceipt,
    CreateOutcome, Delivery, DirectFinish, FinishReceipt, ImportedInstance, InboxMessage,
    InstanceInfo, InstanceStatus, ListFilter, LoadedInstance, NewInstance, RunEnd, Store,
};
use crate::clock::now_ms;
use crate::error::StoreError;
use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod};
use futures::StreamExt;
use retrace_sdk::{Error, Event, HistoryEvent, ParentRef, RetrySpec};
use serde_json::Value;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Config, IsolationLevel, NoTls, Row};

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 5;

/// The application name in `retrace_schema`, telling our tables from another program's.
const APPLICATION: &str = "retrace";

/// The advisory lock key that serializes adoptions of running children (see `commit_in_tx`).
const ADOPTION_LOCK: i64 = 0x5254_5243_0000_0002;

/// The advisory lock key that serializes schema creation and migrations ("RTRC" migrations).
const MIGRATION_LOCK: i64 = 0x5254_5243_0000_0001;

/// How many times a transaction aborted by a deadlock or a serialization failure is run.
const TX_ATTEMPTS_MAX: u32 = 5;

/// Default number of pooled connections per store.
pub const POOL_SIZE_DEFAULT: usize = 16;

/// How long an operation waits for a free pooled connection, or for a new one to connect.
const POOL_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait between two attempts to reconnect the listening connection.
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Migrations, index `i` moves a schema from version `i` to `i + 1`. The same tables as the
/// SQLite store, with PostgreSQL types; JSON payloads are kept as text, byte for byte as encoded.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE instances (
    id              TEXT PRIMARY KEY,
    coordinator     TEXT NOT NULL,
    status          TEXT NOT NULL,
    input           TEXT NOT NULL,
    output          TEXT,
    error           TEXT,
    reason          TEXT,
    custom_status   TEXT,
    parent_id       TEXT,
    parent_seq      BIGINT,
    generation      BIGINT NOT NULL DEFAULT 0,
    next_pos        BIGINT NOT NULL DEFAULT 0,
    next_activation BIGINT NOT NULL DEFAULT 0,
    ready           BOOLEAN NOT NULL DEFAULT FALSE,
    lease_owner     TEXT,
    lease_until     BIGINT NOT NULL DEFAULT 0,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    ended_at        BIGINT
);
CREATE INDEX instances_ready ON instances (lease_until) WHERE ready AND status = 'running';
CREATE INDEX instances_status ON instances (status, created_at);
CREATE INDEX instances_lease_owner ON instances (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE TABLE events (
    instance_id TEXT NOT NULL,
    pos         BIGINT NOT NULL,
    activation  BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    recorded_at BIGINT NOT NULL,
    body        TEXT NOT NULL,
    PRIMARY KEY (instance_id, pos)
);
CREATE TABLE inbox (
    id          BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    instance_id TEXT NOT NULL,
    dedupe      TEXT,
    body        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    UNIQUE (instance_id, dedupe)
);
CREATE INDEX inbox_instance ON inbox (instance_id, id);
CREATE TABLE tasks (
    instance_id TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    generation  BIGINT NOT NULL,
    name        TEXT NOT NULL,
    input       TEXT NOT NULL,
    retry       TEXT NOT NULL,
    attempt     BIGINT NOT NULL,
    due_at      BIGINT NOT NULL,
    lease_owner TEXT,
    last_error  TEXT,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (instance_id, seq)
);
CREATE INDEX tasks_due ON tasks (due_at);
CREATE INDEX tasks_lease_owner ON tasks (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE TABLE timers (
    instance_id TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    generation  BIGINT NOT NULL,
    fire_at     BIGINT NOT NULL,
    PRIMARY KEY (instance_id, seq)
);
CREATE INDEX timers_due ON timers (fire_at);
CREATE TABLE workers (
    owner         TEXT PRIMARY KEY,
    lock_key      BIGINT NOT NULL,
    registered_at BIGINT NOT NULL
);
"#,
    r#"
ALTER TABLE tasks ADD COLUMN claimed_at BIGINT;
CREATE TABLE attempts (
    instance_id TEXT NOT NULL,
    generation  BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    attempt     BIGINT NOT NULL,
    started_at  BIGINT NOT NULL,
    ended_at    BIGINT NOT NULL,
    outcome     TEXT NOT NULL,
    error       TEXT,
    PRIMARY KEY (instance_id, generation, seq, attempt)
);
"#,
    r#"
-- Ids of messages delivered with a dedupe key (signal ids, cancel): kept after the message left
-- the inbox, so that a resend is refused however late it comes.
CREATE TABLE delivered (
    instance_id TEXT NOT NULL,
    dedupe      TEXT NOT NULL,
    PRIMARY KEY (instance_id, dedupe)
);
"#,
    r#"
-- Version 4 changes no table: from it on, an `activity_scheduled` body may leave out its retry
-- policy when it is the standard one (see docs/history-format.md, version 2). Marking the store
-- makes a build that would misread such bodies refuse the file instead of stopping instances.
SELECT 1;
"#,
    r#"
-- Version 5: the children of an instance, found by their parent. A run that continues as new
-- detaches the children it left running (they run on; their end no longer goes to the new
-- run, which would take it for its own child at the same position).
CREATE INDEX IF NOT EXISTS instances_parent ON instances (parent_id) WHERE parent_id IS NOT NULL;
"#,
];

/// Options of [`PostgresStore::connect_with`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PostgresOptions {
    /// The PostgreSQL schema holding the tables, created if missing (lowercase letters, digits
    /// and `_`, not starting with a digit). `None`: the connection's current schema.
    pub schema: Option<String>,
    /// The most pooled connections this store opens.
    pub pool_size: usize,
    /// Whether to tell other processes of changes, and hear theirs, with `LISTEN/NOTIFY` (off:
    /// other processes' workers find the work by polling alone).
    pub listen: bool,
    /// Whether to create the schema and the tables when they are missing (off: a missing store
    /// is [`StoreError::NotARetraceStore`], for tools that only inspect existing stores). An
    /// older schema version is migrated either way.
    pub create: bool,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            schema: None,
            pool_size: POOL_SIZE_DEFAULT,
            listen: true,
            create: true,
        }
    }
}

impl PostgresOptions {
    /// These options with the tables in `schema`.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// These options, refusing to create a missing store (see [`PostgresOptions::create`]).
    pub fn existing_only(mut self) -> Self {
        self.create = false;
        self
    }

    /// These options with at most `size` pooled connections.
    pub fn with_pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }
}

/// The PostgreSQL store. Cheap to share behind an `Arc`.
pub struct PostgresStore {
    pool: Pool,
    /// Where the store is, for messages (no password).
    display: String,
    schema: String,
    changes: Arc<watch::Sender<u64>>,
    /// Tells the listening connection to `NOTIFY` other processes of a change.
    wake: Arc<Notify>,
    listener: Option<JoinHandle<()>>,
    /// The connection settings, for the listening and the worker-lock connections.
    config: Config,
    /// The workers of this process, each holding a session advisory lock on its own connection
    /// for as long as it lives (see [`Store::register_worker`]).
    worker_locks: Mutex<HashMap<String, WorkerLock>>,
}

/// A connection that holds a worker's advisory lock; dropping it closes the connection, and the
/// server releases the lock.
struct WorkerLock {
    _client: tokio_postgres::Client,
    connection: JoinHandle<()>,
}

impl Drop for WorkerLock {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("location", &self.display)
            .field("schema", &self.schema)
            .finish()
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
        lock_map(&self.worker_locks).clear();
        self.pool.close();
    }
}

/// An error inside a transaction: the driver's (named after the operation at the end), or one
/// of the store's own.
enum TxError {
    Pg(tokio_postgres::Error),
    Store(StoreError),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Pg(e)
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

impl TxError {
    /// Whether the server rolled the whole transaction back for a reason that running it again
    /// may avoid (a deadlock, a serialization failure).
    fn is_retryable(&self) -> bool {
        match self {
            TxError::Pg(e) => matches!(
                e.code(),
                Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::T_R_SERIALIZATION_FAILURE
            ),
            TxError::Store(_) => false,
        }
    }

    fn into_store(self, operation: &str) -> StoreError {
        match self {
            TxError::Pg(e) => map_pg(operation, &e),
            TxError::Store(e) => e,
        }
    }
}

type TxResult<T> = Result<T, TxError>;

/// Maps a driver error to a typed store error naming the operation.
fn map_pg(operation: &str, e: &tokio_postgres::Error) -> StoreError {
    let Some(db) = e.as_db_error() else {
        let detail = match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        };
        return StoreError::Database {
            operation: operation.to_string(),
            detail,
        };
    };
    let mut detail = format!("{}: {} ({})", db.severity(), db.message(), db.code().code());
    if let Some(d) = db.detail() {
        detail.push_str(": ");
        detail.push_str(d);
    }
    let code = db.code();
    if *code == SqlState::DISK_FULL {
        StoreError::Full {
            operation: operation.to_string(),
            detail,
        }
    } else if *code == SqlState::T_R_DEADLOCK_DETECTED
        || *code == SqlState::T_R_SERIALIZATION_FAILURE
        || *code == SqlState::LOCK_NOT_AVAILABLE
        || *code == SqlState::TOO_MANY_CONNECTIONS
        || *code == SqlState::CANNOT_CONNECT_NOW
    {
        StoreError::Busy {
            operation: operation.to_string(),
            detail,
        }
    } else {
        StoreError::Database {
            operation: operation.to_string(),
            detail,
        }
    }
}

fn map_pool(operation: &str, e: PoolError) -> StoreError {
    match e {
        PoolError::Backend(e) => map_pg(operation, &e),
        PoolError::Timeout(kind) => StoreError::Busy {
            operation: operation.to_string(),
            detail: format!("no pooled connection within {POOL_TIMEOUT:?} ({kind:?})"),
        },
        PoolError::Closed => StoreError::Closed,
        other => StoreError::Database {
            operation: operation.to_string(),
            detail: other.to_string(),
        },
    }
}

/// FNV-1a, a stable hash for naming the notification channel (the same in every process).
fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Whether `name` is a schema name this store accepts: it needs no quoting anywhere.
fn valid_schema_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63
}

/// Splits the Retrace parameters (`schema`, `pool_size`) off a connection URL, leaving the
/// driver's own.
fn split_url(url: &str) -> Result<(String, PostgresOptions), StoreError> {
    let mut options = PostgresOptions::default();
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), options));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "schema" => options.schema = Some(value.to_string()),
            "pool_size" => {
                let size = value.parse::<usize>().map_err(|e| StoreError::Database {
                    operation: "parse store url".into(),
                    detail: format!("pool_size={value:?}: {e}"),
                })?;
                options = options.with_pool_size(size);
            }
            _ => kept.push(pair),
        }
    }
    let url = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, options))
}

/// Where a configuration points, without its password.
fn describe_config(config: &Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("");
    let db = config.get_dbname().unwrap_or(user);
    format!("postgres://{user}@{host}:{port}/{db}")
}

impl PostgresStore {
    /// Connects to the server at `url` (`postgres://user@host:port/db`, or any form
    /// `tokio_postgres` accepts), creating or migrating the schema as needed. Two extra query
    /// parameters are understood: `schema=name` (the PostgreSQL schema holding the tables) and
    /// `pool_size=n`. Must run inside a tokio runtime (the pool and the listener live on it).
    ///
    /// # Errors
    /// [`StoreError::NotARetraceStore`], [`StoreError::NewerSchema`], or a database error
    /// (unreachable server, bad URL).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let (url, options) = split_url(url)?;
        Self::connect_with(&url, options).await
    }

    /// Connects to an existing store only: like [`PostgresStore::connect`], but a schema
    /// without Retrace tables is [`StoreError::NotARetraceStore`] and nothing is created.
    ///
    /// # Errors
    /// As [`PostgresStore::connect`].
    pub async fn connect_existing(url: &str) -> Result<Self, StoreError> {
        let (url, options) = split_url(url)?;
        Self::connect_with(&url, options.existing_only()).await
    }

    /// Connects with explicit options (`url` must not carry `schema` or `pool_size`).
    ///
    /// # Errors
    /// As [`PostgresStore::connect`].
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self, StoreError> {
        let mut config = Config::from_str(url).map_err(|e| StoreError::Database {
            operation: "parse store url".into(),
            detail: e.to_string(),
        })?;
        let base_display = describe_config(&config);
        if let Some(schema) = &options.schema {
            if !valid_schema_name(schema) {
                return Err(StoreError::Database {
                    operation: "open store".into(),
                    detail: format!(
                        "schema name {schema:?}: use lowercase letters, digits and _ (at most 63)"
                    ),
                });
            }
            // Every connection, pooled or listening, sees only this schema.
            let mut opts = config.get_options().unwrap_or("").to_string();
            if !opts.is_empty() {
                opts.push(' ');
            }
            opts.push_str(&format!("-c search_path={schema}"));
            config.options(opts);
        }
        if config.get_application_name().is_none() {
            config.application_name("retrace");
        }
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_TIMEOUT))
            .create_timeout(Some(POOL_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Database {
                operation: "open store".into(),
                detail: e.to_string(),
            })?;
        let schema = prepare_schema(
            &pool,
            options.schema.as_deref(),
            options.create,
            &base_display,
        )
        .await?;
        let display = format!("{base_display} schema {schema}");
        let channel = format!("retrace_changes_{:016x}", fnv1a(&schema));
        let (changes, _) = watch::channel(0);
        let changes = Arc::new(changes);
        let wake = Arc::new(Notify::new());
        let listener = options.listen.then(|| {
            tokio::spawn(listen_loop(
                config.clone(),
                channel,
                Arc::clone(&changes),
                Arc::clone(&wake),
                display.clone(),
            ))
        });
        Ok(PostgresStore {
            pool,
            display,
            schema,
            changes,
            wake,
            listener,
            config,
            worker_locks: Mutex::new(HashMap::new()),
        })
    }

    /// The PostgreSQL schema holding this store's tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Where the store is (`postgres://user@host:port/db schema name`), without a password.
    pub fn location(&self) -> &str {
        &self.display
    }

    /// Wakes this process's waiters at once, and other processes through `NOTIFY`.
    fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
        self.wake.notify_one();
    }

    /// The advisory lock a worker holds while it lives: advisory locks are per database, so the
    /// key names the schema too.
    fn worker_lock_key(&self, owner: &str) -> i64 {
        fnv1a(&format!("retrace-worker/{}/{owner}", self.schema)) as i64
    }

    async fn client(&self, operation: &str) -> Result<deadpool_postgres::Client, StoreError> {
        self.pool.get().await.map_err(|e| map_pool(operation, e))
    }
}

/// Runs `$body` (an expression using the transaction `$tx`, of type `TxResult<T>`) in a
/// transaction of `$isolation`, commits, and runs it again when the server aborted it for a
/// deadlock or a serialization failure. Evaluates to `Result<T, StoreError>`.
macro_rules! transact {
    ($store:expr, $operation:expr, $isolation:expr, $read_only:expr, |$tx:ident| $body:expr) => {{
        let operation: &str = $operation;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let mut client = $store.client(operation).await?;
            let result: TxResult<_> = async {
                let $tx = client
                    .build_transaction()
                    .isolation_level($isolation)
                    .read_only($read_only)
                    .start()
                    .await?;
                let value = $body?;
                $tx.commit().await?;
                Ok(value)
            }
            .await;
            match result {
                Ok(value) => break Ok(value),
                Err(e) if e.is_retryable() && attempt < TX_ATTEMPTS_MAX => {
                    tracing::debug!(
                        operation,
                        attempt,
                        "transaction aborted by the server; running it again"
                    );
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 5)).await;
                }
                Err(e) => break Err(e.into_store(operation)),
            }
        }
    }};
}

/// A read-write transaction.
macro_rules! write_tx {
    ($store:expr, $operation:expr, |$tx:ident| $body:expr) => {
        transact!(
            $store,
            $operation,
            IsolationLevel::ReadCommitted,
            false,
            |$tx| $body
        )
    };
}

/// A read-only transaction that sees one snapshot.
macro_rules! read_tx {
    ($store:expr, $operation:expr, |$tx:ident| $body:expr) => {
        transact!(
            $store,
            $operation,
            IsolationLevel::RepeatableRead,
            true,
            |$tx| $body
        )
    };
}

/// Runs `$body` (an expression using the pooled connection `$client`, of type `TxResult<T>`)
/// outside an explicit transaction: for single statements, which are atomic on their own and
/// save the `BEGIN`/`COMMIT` round trips. Retried like [`transact!`].
macro_rules! autocommit {
    ($store:expr, $operation:expr, |$client:ident| $body:expr) => {{
        let operation: &str = $operation;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let $client = $store.client(operation).await?;
            let result: TxResult<_> = $body;
            match result {
                Ok(value) => break Ok(value),
                Err(e) if e.is_retryable() && attempt < TX_ATTEMPTS_MAX => {
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 5)).await;
                }
                Err(e) => break Err(e.into_store(operation)),
            }
        }
    }};
}

/// Checks the schema's identity and version, creating or migrating it as needed; returns the
/// schema's name.
async fn prepare_schema(
    pool: &Pool,
    schema: Option<&str>,
    create: bool,
    display: &str,
) -> Result<String, StoreError> {
    let operation = "open store";
    let mut client = pool.get().await.map_err(|e| map_pool(operation, e))?;
    let result: TxResult<String> = async {
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        if let (Some(schema), true) = (schema, create) {
            tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
                .await?;
        }
        let row = tx.query_one("SELECT current_schema()", &[]).await?;
        let current: Option<String> = row.try_get(0)?;
        let Some(current) = current else {
            if !create {
                return Err(StoreError::NotARetraceStore {
                    path: display.to_string(),
                    detail: format!(
                        "schema {} does not exist (nothing was created)",
                        schema.unwrap_or("of the search_path")
                    ),
                }
                .into());
            }
            return Err(StoreError::Database {
                operation: operation.into(),
                detail: format!(
                    "{display}: no schema of the search_path exists; name one with ?schema="
                ),
            }
            .into());
        };
        let where_ = format!("{display} schema {current}");
        let row = tx
            .query_one(
                "SELECT count(*),
                        count(*) FILTER (WHERE c.relname = 'retrace_schema')
                 FROM pg_catalog.pg_class c
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')",
                &[&current],
            )
            .await?;
        let tables: i64 = row.try_get(0)?;
        let ours: i64 = row.try_get(1)?;
        let version = if ours > 0 {
            let row = tx
                .query_opt("SELECT application, version FROM retrace_schema", &[])
                .await?;
            let (application, version): (String, i64) = match &row {
                Some(r) => (r.try_get(0)?, r.try_get(1)?),
                None => (String::new(), 0),
            };
            if application != APPLICATION {
                return Err(StoreError::NotARetraceStore {
                    path: where_,
                    detail: format!("retrace_schema names application {application:?}"),
                }
                .into());
            }
            if version > SCHEMA_VERSION {
                return Err(StoreError::NewerSchema {
                    path: where_,
                    found: version,
                    supported: SCHEMA_VERSION,
                }
                .into());
            }
            version
        } else if tables > 0 {
            return Err(StoreError::NotARetraceStore {
                path: where_,
                detail: format!("{tables} table(s) of another program and no retrace_schema"),
            }
            .into());
        } else if !create {
            return Err(StoreError::NotARetraceStore {
                path: where_,
                detail: "no Retrace tables (nothing was created)".into(),
            }
            .into());
        } else {
            tx.batch_execute(
                "CREATE TABLE retrace_schema (
                     singleton   BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
                     application TEXT NOT NULL,
                     version     BIGINT NOT NULL
                 )",
            )
            .await?;
            tx.execute(
                "INSERT INTO retrace_schema (application, version) VALUES ($1, 0)",
                &[&APPLICATION],
            )
            .await?;
            0
        };
        for (from, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
            tx.batch_execute(sql).await?;
            tx.execute(
                "UPDATE retrace_schema SET version = $1",
                &[&(from as i64 + 1)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(current)
    }
    .await;
    result.map_err(|e| e.into_store(operation))
}

/// Aborts a task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keeps a connection listening on `channel`: bumps `changes` on each notification, and sends
/// one `NOTIFY` for each burst of local changes signalled on `wake`. Reconnects with backoff
/// when the connection drops; each (re)connection bumps once, since notifications sent while it
/// was down are lost.
///
/// Notifications go out after the changes committed, on this connection, rather than inside
/// the changing transactions: PostgreSQL serializes the commits of notifying transactions
/// (a global lock held across the WAL flush), which would undo the server's group commit.
async fn listen_loop(
    config: Config,
    channel: String,
    changes: Arc<watch::Sender<u64>>,
    wake: Arc<Notify>,
    location: String,
) {
    let bump = || changes.send_modify(|v| *v = v.wrapping_add(1));
    let mut delay = Duration::from_millis(100);
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                // The connection is driven by a task of its own, so that this loop can send
                // queries while notifications keep arriving.
                let (messages_tx, mut messages) = tokio::sync::mpsc::unbounded_channel();
                let _driver = AbortOnDrop(tokio::spawn(async move {
                    let mut stream =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(message) = stream.next().await {
                        if messages_tx.send(message).is_err() {
                            break;
                        }
                    }
                }));
                match client.batch_execute(&format!("LISTEN {channel}")).await {
                    Ok(()) => {
                        delay = Duration::from_millis(100);
                        bump();
                        loop {
                            tokio::select! {
                                m = messages.recv() => match m {
                                    Some(Ok(AsyncMessage::Notification(_))) => bump(),
                                    Some(Ok(_)) => {}
                                    Some(Err(e)) => {
                                        tracing::warn!(store = %location, error = %e, "listening connection failed; reconnecting");
                                        break;
                                    }
                                    None => break,
                                },
                                () = wake.notified() => {
                                    if let Err(e) = client
                                        .execute("SELECT pg_notify($1, '')", &[&channel])
                                        .await
                                    {
                                        tracing::warn!(store = %location, error = %e, "NOTIFY failed; reconnecting");
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(store = %location, error = %e, "LISTEN failed");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(store = %location, error = %e, "could not connect the listening connection; polling meanwhile");
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(LISTEN_BACKOFF_MAX);
    }
}

const INSTANCE_COLUMNS: &str = "id, coordinator, status, input, output, error, reason, custom_status, \
     parent_id, parent_seq, generation, next_pos, next_activation, created_at, updated_at, ended_at";

fn instance_from_row(row: &Row) -> TxResult<InstanceInfo> {
    let id: String = row.try_get(0)?;
    let status_text: String = row.try_get(2)?;
    let status = InstanceStatus::parse(&status_text).ok_or_else(|| StoreError::Corrupt {
        instance_id: id.clone(),
        what: "status".into(),
        detail: format!("unknown status {status_text:?}"),
    })?;
    let input_text: String = row.try_get(3)?;
    let input: Value = decode_json(&id, || "input".into(), &input_text)?;
    let output = match row.try_get::<_, Option<String>>(4)? {
        Some(t) => Some(decode_json(&id, || "output".into(), &t)?),
        None => None,
    };
    let error: Option<Error> = match row.try_get::<_, Option<String>>(5)? {
        Some(t) => Some(decode_json(&id, || "error".into(), &t)?),
        None => None,
    };
    let custom_status = match row.try_get::<_, Option<String>>(7)? {
        Some(t) => Some(decode_json(&id, || "custom status".into(), &t)?),
        None => None,
    };
    let parent = match (
        row.try_get::<_, Option<String>>(8)?,
        row.try_get::<_, Option<i64>>(9)?,
    ) {
        (Some(instance_id), Some(seq)) => Some(ParentRef {
            instance_id,
            seq: seq as u32,
        }),
        _ => None,
    };
    Ok(InstanceInfo {
        coordinator: row.try_get(1)?,
        status,
        input,
        output,
        error,
        reason: row.try_get(6)?,
        custom_status,
        parent,
        generation: row.try_get::<_, i64>(10)? as u64,
        next_position: row.try_get::<_, i64>(11)? as u64,
        next_activation: row.try_get::<_, i64>(12)? as u32,
        created_at_ms: row.try_get::<_, i64>(13)? as u64,
        updated_at_ms: row.try_get::<_, i64>(14)? as u64,
        ended_at_ms: row.try_get::<_, Option<i64>>(15)?.map(|v| v as u64),
        id,
    })
}

/// Reads an instance row; with `lock`, locks it for the rest of the transaction.
async fn get_instance(
    tx: &impl GenericClient,
    id: &str,
    lock: bool,
) -> TxResult<Option<InstanceInfo>> {
    let sql = if lock {
        format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = $1 FOR UPDATE")
    } else {
        format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = $1")
    };
    let stmt = tx.prepare_cached(&sql).await?;
    match tx.query_opt(&stmt, &[&id]).await? {
        Some(row) => Ok(Some(instance_from_row(&row)?)),
        None => Ok(None),
    }
}

/// Puts an event in an instance's inbox. The caller holds the instance's row lock, so that inbox
/// ids increase in commit order per instance.
async fn insert_inbox(
    tx: &impl GenericClient,
    instance_id: &str,
    dedupe: Option<&str>,
    event: &Event,
    now: u64,
) -> TxResult<bool> {
    let body = event_json(event)?;
    let stmt = tx
        .prepare_cached(
            "INSERT INTO inbox (instance_id, dedupe, body, created_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (instance_id, dedupe) DO NOTHING",
        )
        .await?;
    let n = tx
        .execute(&stmt, &[&instance_id, &dedupe, &body, &(now as i64)])
        .await?;
    Ok(n > 0)
}

async fn mark_ready(tx: &impl GenericClient, instance_id: &str) -> TxResult<()> {
    let stmt = tx
        .prepare_cached("UPDATE instances SET ready = TRUE WHERE id = $1 AND status = 'running'")
        .await?;
    tx.execute(&stmt, &[&instance_id]).await?;
    Ok(())
}

/// Creates an instance with its start in its inbox, in one statement (atomic on its own, or
/// part of the caller's transaction).
async fn create_in_tx(
    tx: &impl GenericClient,
    new: &NewInstance,
    now: u64,
) -> TxResult<CreateOutcome> {
    insert_instance(tx, new, now, None).await
}

/// Creates an instance inside the current transaction. With `activated_by` (the owner of the
/// first activation, and its lease), the instance is created leased to that owner and without
/// `InstanceStarted` in its inbox: the caller appends that activation in the same transaction.
/// `Existing` if the id is taken.
async fn insert_instance(
    tx: &impl GenericClient,
    new: &NewInstance,
    now: u64,
    activated_by: Option<(&str, u64)>,
) -> TxResult<CreateOutcome> {
    let input = to_json(&new.input)?;
    let parent_id = new.parent.as_ref().map(|p| p.instance_id.clone());
    let parent_seq = new.parent.as_ref().map(|p| i64::from(p.seq));
    let n = match activated_by {
        None => {
            let start = event_json(&Event::InstanceStarted {
                coordinator: new.coordinator.clone(),
                input: new.input.clone(),
                parent: new.parent.clone(),
            })?;
            let stmt = tx
                .prepare_cached(
                    "WITH created AS (
                         INSERT INTO instances (id, coordinator, status, input, parent_id,
                                                parent_seq, ready, created_at, updated_at)
                         VALUES ($1, $2, 'running', $3, $4, $5, TRUE, $6, $6)
                         ON CONFLICT (id) DO NOTHING
                         RETURNING id)
                     INSERT INTO inbox (instance_id, dedupe, body, created_at)
                     SELECT id, 'start:0', $7, $6 FROM created",
                )
                .await?;
            tx.execute(
                &stmt,
                &[
                    &new.id,
                    &new.coordinator,
                    &input,
                    &parent_id,
                    &parent_seq,
                    &(now as i64),
                    &start,
                ],
            )
            .await?
        }
        Some((owner, lease_ms)) => {
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO instances (id, coordinator, status, input, parent_id, parent_seq,
                                            ready, lease_owner, lease_until, created_at,
                                            updated_at)
                     VALUES ($1, $2, 'running', $3, $4, $5, FALSE, $6, $7, $8, $8)
                     ON CONFLICT (id) DO NOTHING",
                )
                .await?;
            tx.execute(
                &stmt,
                &[
                    &new.id,
                    &new.coordinator,
                    &input,
                    &parent_id,
                    &parent_seq,
                    &owner,
                    &((now + lease_ms) as i64),
                    &(now as i64),
                ],
            )
            .await?
        }
    };
    if n > 0 {
        return Ok(CreateOutcome::Created);
    }
    let existing = get_instance(tx, &new.id, false)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            instance_id: new.id.clone(),
        })?;
    Ok(CreateOutcome::Existing(existing))
}

/// Locks `instance_id`'s row (if there is one) for the rest of the transaction: the next
/// statements see every change committed before the lock was granted.
async fn lock_instance(tx: &impl GenericClient, instance_id: &str) -> TxResult<()> {
    let lock = tx
        .prepare_cached("SELECT 1 FROM instances WHERE id = $1 FOR UPDATE")
        .await?;
    tx.query_opt(&lock, &[&instance_id]).await?;
    Ok(())
}

/// Tells a parent that its child ended, inside the current transaction.
async fn notify_parent(
    tx: &impl GenericClient,
    parent: &ParentRef,
    result: Result<Value, Error>,
    now: u64,
) -> TxResult<()> {
    // A parent that has ended no longer waits for anything. A stopped one still does: the
    // result waits in its inbox until it is resumed (`mark_ready` leaves it stopped).
    let stmt = tx
        .prepare_cached("SELECT status FROM instances WHERE id = $1 FOR UPDATE")
        .await?;
    let waiting = match tx.query_opt(&stmt, &[&parent.instance_id]).await? {
        Some(row) => matches!(row.try_get::<_, String>(0)?.as_str(), "running" | "stopped"),
        None => false,
    };
    if !waiting {
        return Ok(());
    }
    let event = Event::ChildCompleted {
        seq: parent.seq,
        result,
    };
    let dedupe = format!("child:{}", parent.seq);
    insert_inbox(tx, &parent.instance_id, Some(&dedupe), &event, now).await?;
    mark_ready(tx, &parent.instance_id).await
}

async fn delete_pending_work(tx: &impl GenericClient, instance_id: &str) -> TxResult<()> {
    for sql in [
        "DELETE FROM inbox WHERE instance_id = $1",
        "DELETE FROM tasks WHERE instance_id = $1",
        "DELETE FROM timers WHERE instance_id = $1",
    ] {
        let stmt = tx.prepare_cached(sql).await?;
        tx.execute(&stmt, &[&instance_id]).await?;
    }
    Ok(())
}

/// Appends events at contiguous positions from `first_position`, in one statement.
async fn append_events(
    tx: &impl GenericClient,
    instance_id: &str,
    first_position: u64,
    activation: u32,
    events: &[Event],
    now: u64,
) -> TxResult<()> {
    if events.is_empty() {
        return Ok(());
    }
    let mut positions = Vec::with_capacity(events.len());
    let mut kinds = Vec::with_capacity(events.len());
    let mut bodies = Vec::with_capacity(events.len());
    for (i, event) in events.iter().enumerate() {
        positions.push((first_position + i as u64) as i64);
        kinds.push(event.kind());
        bodies.push(event_json(event)?);
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO events (instance_id, pos, activation, kind, recorded_at, body)
             SELECT $1, e.pos, $3, e.kind, $5, e.body
             FROM unnest($2::BIGINT[], $4::TEXT[], $6::TEXT[]) AS e(pos, kind, body)",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &instance_id,
            &positions,
            &i64::from(activation),
            &kinds,
            &(now as i64),
            &bodies,
        ],
    )
    .await?;
    Ok(())
}

async fn delete_consumed(tx: &impl GenericClient, c: &ActivationCommit) -> TxResult<()> {
    if c.consumed_inbox.is_empty() {
        return Ok(());
    }
    let stmt = tx
        .prepare_cached("DELETE FROM inbox WHERE id = ANY($1)")
        .await?;
    tx.execute(&stmt, &[&c.consumed_inbox]).await?;
    Ok(())
}

/// Creates an activation's activity tasks; those it claims are leased to the committing worker
/// at attempt 1.
async fn insert_tasks(
    tx: &impl GenericClient,
    c: &ActivationCommit,
    now: u64,
    lease_until: u64,
) -> TxResult<()> {
    if c.tasks.is_empty() {
        return Ok(());
    }
    let mut seqs = Vec::with_capacity(c.tasks.len());
    let mut names = Vec::with_capacity(c.tasks.len());
    let mut inputs = Vec::with_capacity(c.tasks.len());
    let mut retries = Vec::with_capacity(c.tasks.len());
    let mut attempts = Vec::with_capacity(c.tasks.len());
    let mut dues = Vec::with_capacity(c.tasks.len());
    let mut owners: Vec<Option<&str>> = Vec::with_capacity(c.tasks.len());
    for t in &c.tasks {
        let (attempt, due, owner) = if t.claim {
            (1i64, lease_until, Some(&*c.owner))
        } else {
            (0i64, now, None)
        };
        seqs.push(i64::from(t.seq));
        names.push(t.name.as_str());
        inputs.push(to_json(&t.input)?);
        retries.push(to_json(&t.retry)?);
        attempts.push(attempt);
        dues.push(due as i64);
        owners.push(owner);
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO tasks (instance_id, seq, generation, name, input, retry, attempt,
                                due_at, lease_owner, created_at, claimed_at)
             SELECT $1, t.seq, $2, t.name, t.input, t.retry, t.attempt, t.due, t.owner, $10,
                    CASE WHEN t.owner IS NULL THEN NULL ELSE $10::BIGINT END
             FROM unnest($3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::BIGINT[],
                         $8::BIGINT[], $9::TEXT[])
                  AS t(seq, name, input, retry, attempt, due, owner)
             ON CONFLICT (instance_id, seq) DO NOTHING",
        )
        .await?;
    tx.execute(
        &stmt,
        &[
            &c.instance_id,
            &(c.generation as i64),
            &seqs,
            &names,
            &inputs,
            &retries,
            &attempts,
            &dues,
            &owners,
            &(now as i64),
        ],
    )
    .await?;
    Ok(())
}

async fn insert_timers(tx: &impl GenericClient, c: &ActivationCommit) -> TxResult<()> {
    if c.timers.is_empty() {
        return Ok(());
    }
    let seqs: Vec<i64> = c.timers.iter().map(|(s, _)| i64::from(*s)).collect();
    let fires: Vec<i64> = c
        .timers
        .iter()
        .map(|(_, f)| super::codec::stored_ms(*f))
        .collect();
    let stmt = tx
        .prepare_cached(
            "INSERT INTO timers (instance_id, seq, generation, fire_at)
             SELECT $1, t.seq, $2, t.fire_at
             FROM unnest($3::BIGINT[], $4::BIGINT[]) AS t(seq, fire_at)
             ON CONFLICT (instance_id, seq) DO NOTHING",
        )
        .await?;
    tx.execute(
        &stmt,
        &[&c.instance_id, &(c.generation as i64), &seqs, &fires],
    )
    .await?;
    Ok(())
}

async fn set_custom_status(tx: &impl GenericClient, c: &ActivationCommit) -> TxResult<()> {
    let Some(status) = &c.custom_status else {
        return Ok(());
    };
    let status = to_json(status)?;
    let stmt = tx
        .prepare_cached("UPDATE instances SET custom_status = $2 WHERE id = $1")
        .await?;
    tx.execute(&stmt, &[&c.instance_id, &status]).await?;
    Ok(())
}

async fn commit_in_tx(
    tx: &impl GenericClient,
    c: &ActivationCommit,
    now: u64,
) -> TxResult<CommitReceipt> {
    let stmt = tx
        .prepare_cached(
            "SELECT next_pos, lease_owner, status, generation FROM instances WHERE id = $1
             FOR UPDATE",
        )
        .await?;
    let Some(row) = tx.query_opt(&stmt, &[&c.instance_id]).await? else {
        return Err(StoreError::NotFound {
            instance_id: c.instance_id.clone(),
        }
        .into());
    };
    let next_pos: i64 = row.try_get(0)?;
    let lease_owner: Option<String> = row.try_get(1)?;
    let status: String = row.try_get(2)?;
    let generation: i64 = row.try_get(3)?;
    if status != "running"
        || generation as u64 != c.generation
        || next_pos as u64 != c.expected_position
    {
        return Err(StoreError::Conflict {
            instance_id: c.instance_id.clone(),
            expected: c.expected_position,
            found: next_pos as u64,
        }
        .into());
    }
    if lease_owner.as_deref() != Some(&*c.owner) {
        return Err(StoreError::LeaseLost {
            what: format!("instance {}", c.instance_id),
            owner: c.owner.to_string(),
        }
        .into());
    }
    let lease_until = now + c.lease_ms;
    let mut receipt = CommitReceipt::default();
    for t in c.tasks.iter().filter(|t| t.claim) {
        receipt.claimed_tasks.push(ActivityTask {
            instance_id: c.instance_id.clone(),
            seq: t.seq,
            name: t.name.clone(),
            input: t.input.clone(),
            retry: t.retry.clone(),
            attempt: 1,
            generation: c.generation,
        });
    }
    // Independent writes, sent together (one round trip).
    futures::try_join!(
        append_events(
            tx,
            &c.instance_id,
            c.expected_position,
            c.activation,
            &c.events,
            now,
        ),
        delete_consumed(tx, c),
        insert_tasks(tx, c, now, lease_until),
        insert_timers(tx, c),
        set_custom_status(tx, c),
    )?;
    for child in &c.children {
        if let Some(refusal) = child_id_refusal(child) {
            if get_instance(tx, &child.id, false).await?.is_none() {
                match &child.parent {
                    // The call fails at once; no instance is created.
                    Some(parent) => {
                        notify_parent(tx, parent, Err(refusal), now).await?;
                        continue;
                    }
                    // Nobody waits for a detached start: it is made, as before, and logged.
                    None => {
                        tracing::warn!(instance_id = %c.instance_id, child = %child.id, "{refusal}")
                    }
                }
            }
        }
        match create_in_tx(tx, child, now).await? {
            CreateOutcome::Created => {
                receipt.woken.push(child.id.clone());
            }
            CreateOutcome::Existing(_) => {
                // Starting an existing id returns that instance (see `existing_child`), read
                // again under its lock: its own commit may be ending it right now.
                let Some(parent) = &child.parent else {
                    continue;
                };
                let Some(existing) = get_instance(tx, &child.id, true).await? else {
                    continue;
                };
                // One adoption at a time across transactions: two concurrent ones, each
                // checking the other's chain before it committed, could close a loop.
                let stmt = tx
                    .prepare_cached("SELECT pg_advisory_xact_lock($1)")
                    .await?;
                tx.execute(&stmt, &[&ADOPTION_LOCK]).await?;
                let stmt = tx
                    .prepare_cached(
                        "WITH RECURSIVE chain(id, depth) AS (
                             SELECT $1::TEXT, 0
                             UNION ALL
                             SELECT i.parent_id, chain.depth + 1
                             FROM instances i JOIN chain ON i.id = chain.id
                             WHERE i.parent_id IS NOT NULL AND chain.depth < 10000)
                         SELECT EXISTS (SELECT 1 FROM chain WHERE id = $2)",
                    )
                    .await?;
                let in_chain: bool = tx
                    .query_one(&stmt, &[&c.instance_id, &child.id])
                    .await?
                    .try_get(0)?;
                let owner_waits = match &existing.parent {
                    Some(owner) => {
                        let stmt = tx
                            .prepare_cached(
                                "SELECT EXISTS (SELECT 1 FROM instances
                                                WHERE id = $1
                                                  AND status IN ('running', 'stopped'))",
                            )
                            .await?;
                        tx.query_one(&stmt, &[&owner.instance_id])
                            .await?
                            .try_get::<_, bool>(0)?
                    }
                    None => false,
                };
                match existing_child(&existing, child, in_chain, owner_waits) {
                    ExistingChild::Report(result) => {
                        notify_parent(tx, parent, result, now).await?;
                    }
                    ExistingChild::Adopt => {
                        let stmt = tx
                            .prepare_cached(
                                "UPDATE instances SET parent_id = $2, parent_seq = $3
                                 WHERE id = $1 AND status IN ('running', 'stopped')",
                            )
                            .await?;
                        tx.execute(
                            &stmt,
                            &[&child.id, &parent.instance_id, &i64::from(parent.seq)],
                        )
                        .await?;
                    }
                    ExistingChild::Nothing => {}
                }
            }
        }
    }
    let next_pos = c.expected_position + c.events.len() as u64;
    let next_activation = i64::from(c.activation) + 1;
    match &c.end {
        None => {
            // More inbox arrived meanwhile (the inserters wait for our row lock): keep the lease
            // and activate again; otherwise hand the lease back.
            let stmt = tx
                .prepare_cached(
                    "UPDATE instances SET next_pos = $2, next_activation = $3,
                            ready = q.ready,
                            lease_owner = CASE WHEN q.ready THEN $4::TEXT END,
                            lease_until = CASE WHEN q.ready THEN $5::BIGINT ELSE 0 END,
                            updated_at = $6, reason = NULL
                     FROM (SELECT EXISTS (SELECT 1 FROM inbox WHERE instance_id = $1) AS ready) q
                     WHERE id = $1
                     RETURNING q.ready",
                )
                .await?;
            let row = tx
                .query_one(
                    &stmt,
                    &[
                        &c.instance_id,
                        &(next_pos as i64),
                        &next_activation,
                        &&*c.owner,
                        &(lease_until as i64),
                        &(now as i64),
                    ],
                )
                .await?;
            receipt.ready_again = row.try_get(0)?;
        }
        Some(RunEnd::ContinueAsNew(input)) => {
            for sql in [
                "DELETE FROM events WHERE instance_id = $1",
                "DELETE FROM tasks WHERE instance_id = $1",
                "DELETE FROM timers WHERE instance_id = $1",
            ] {
                let stmt = tx.prepare_cached(sql).await?;
                tx.execute(&stmt, &[&c.instance_id]).await?;
            }
            let info = get_instance(tx, &c.instance_id, false)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    instance_id: c.instance_id.clone(),
                })?;
            let generation = c.generation + 1;
            let input_json = to_json(input)?;
            let stmt = tx
                .prepare_cached(
                    "UPDATE instances SET generation = $2, input = $3, next_pos = 0,
                            next_activation = 0, ready = TRUE, lease_owner = $4, lease_until = $5,
                            updated_at = $6
                     WHERE id = $1",
                )
                .await?;
            tx.execute(
                &stmt,
                &[
                    &c.instance_id,
                    &(generation as i64),
                    &input_json,
                    &&*c.owner,
                    &(lease_until as i64),
                    &(now as i64),
                ],
            )
            .await?;
            // The old run's children still running are detached: the new run did not start
            // them, and would take the end of one for that of its own child at the same
            // position (Temporal's "abandon" parent-close policy).
            let stmt = tx
                .prepare_cached(
                    "UPDATE instances SET parent_id = NULL, parent_seq = NULL
                     WHERE parent_id = $1 AND status IN ('running', 'stopped')",
                )
                .await?;
            tx.execute(&stmt, &[&c.instance_id]).await?;
            // Outcomes of the old run that came after its last activation read the inbox (an
            // activity, a timer, a child): the new run must not take them for its own calls at
            // the same positions. Signals and cancellation stay: they are for the instance.
            let stmt = tx
                .prepare_cached(
                    "DELETE FROM inbox WHERE instance_id = $1
                       AND (dedupe LIKE 'seq:%' OR dedupe LIKE 'timer:%' OR dedupe LIKE 'child:%')",
                )
                .await?;
            tx.execute(&stmt, &[&c.instance_id]).await?;
            let start = Event::InstanceStarted {
                coordinator: info.coordinator.clone(),
                input: input.clone(),
                parent: info.parent.clone(),
            };
            insert_inbox(
                tx,
                &c.instance_id,
                Some(&format!("start:{generation}")),
                &start,
                now,
            )
            .await?;
            receipt.ready_again = true;
        }
        Some(end) => {
            let (status, output, error) = end_columns(end)?;
            let stmt = tx
                .prepare_cached(
                    "UPDATE instances SET status = $2, output = $3, error = $4, next_pos = $5,
                            next_activation = $6, ready = FALSE, lease_owner = NULL,
                            lease_until = 0, updated_at = $7, ended_at = $7, reason = NULL
                     WHERE id = $1",
                )
                .await?;
            tx.execute(
                &stmt,
                &[
                    &c.instance_id,
                    &status,
                    &output,
                    &error,
                    &(next_pos as i64),
                    &next_activation,
                    &(now as i64),
                ],
            )
            .await?;
            delete_pending_work(tx, &c.instance_id).await?;
            let info = get_instance(tx, &c.instance_id, false)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    instance_id: c.instance_id.clone(),
                })?;
            if let (Some(parent), Some(result)) = (&info.parent, final_result(&info)) {
                notify_parent(tx, parent, result, now).await?;
                receipt.woken.push(parent.instance_id.clone());
            }
        }
    }
    Ok(receipt)
}

async fn read_events(tx: &impl GenericClient, id: &str, from: u64) -> TxResult<Vec<HistoryEvent>> {
    let stmt = tx.prepare_cached(EVENTS_SQL).await?;
    let rows = tx.query(&stmt, &[&id, &(from as i64)]).await?;
    events_from_rows(id, rows)
}

fn events_from_rows(id: &str, rows: Vec<Row>) -> TxResult<Vec<HistoryEvent>> {
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let pos: i64 = row.try_get(0)?;
        let activation: i64 = row.try_get(1)?;
        let recorded_at: i64 = row.try_get(2)?;
        let body: String = row.try_get(3)?;
        let event = decode_event_json(id, pos, &body)?;
        events.push(HistoryEvent {
            position: pos as u64,
            activation: activation as u32,
            recorded_at_ms: recorded_at as u64,
            event,
        });
    }
    Ok(events)
}

const EVENTS_SQL: &str = "SELECT pos, activation, recorded_at, body FROM events
     WHERE instance_id = $1 AND pos >= $2 ORDER BY pos";

const INBOX_SQL: &str = "SELECT id, body FROM inbox WHERE instance_id = $1 ORDER BY id";

/// Loads an instance in one round trip: `BEGIN` (one snapshot), the three reads and `COMMIT`
/// are sent together. All of them are queued on the connection before the first reply is
/// awaited, so the connection never goes back to the pool inside the transaction.
async fn load_pipelined(
    client: &deadpool_postgres::Client,
    id: &str,
    from: u64,
) -> TxResult<LoadedInstance> {
    let instance_sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = $1");
    let instance_stmt = client.prepare_cached(&instance_sql).await?;
    let events_stmt = client.prepare_cached(EVENTS_SQL).await?;
    let inbox_stmt = client.prepare_cached(INBOX_SQL).await?;
    let from = from as i64;
    let by_id: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
    let by_id_from: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&id, &from];
    let (begin, instance, events, inbox, commit) = futures::join!(
        client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        client.query_opt(&instance_stmt, &by_id),
        client.query(&events_stmt, &by_id_from),
        client.query(&inbox_stmt, &by_id),
        client.batch_execute("COMMIT"),
    );
    begin?;
    let (instance, events, rows) = (instance?, events?, inbox?);
    commit?;
    let info = match instance {
        Some(row) => instance_from_row(&row)?,
        None => {
            return Err(StoreError::NotFound {
                instance_id: id.into(),
            }
            .into())
        }
    };
    let events = events_from_rows(id, events)?;
    let mut inbox = Vec::with_capacity(rows.len());
    for row in rows {
        let msg_id: i64 = row.try_get(0)?;
        let body: String = row.try_get(1)?;
        let event = decode_json(id, || format!("inbox message {msg_id}"), &body)?;
        inbox.push(InboxMessage { id: msg_id, event });
    }
    Ok(LoadedInstance {
        info,
        events,
        inbox,
    })
}

async fn claim_tasks_in_tx(
    tx: &impl GenericClient,
    owner: &str,
    activities: &[String],
    limit: usize,
    lease_ms: u64,
) -> TxResult<Vec<ActivityTask>> {
    let now = now_ms();
    let stmt = tx
        .prepare_cached(
            "WITH due AS (
                 SELECT instance_id, seq FROM tasks
                 WHERE due_at <= $3 AND name = ANY($4)
                 ORDER BY due_at LIMIT $5
                 FOR UPDATE SKIP LOCKED)
             UPDATE tasks t SET lease_owner = $1, due_at = $2, attempt = t.attempt + 1,
                                claimed_at = $3
             FROM due WHERE t.instance_id = due.instance_id AND t.seq = due.seq
             RETURNING t.instance_id, t.seq, t.name, t.input, t.retry, t.attempt, t.generation",
        )
        .await?;
    let rows = tx
        .query(
            &stmt,
            &[
                &owner,
                &((now + lease_ms) as i64),
                &(now as i64),
                &activities,
                &(limit as i64),
            ],
        )
        .await?;
    let mut tasks = Vec::with_capacity(rows.len());
    for row in rows {
        let instance_id: String = row.try_get(0)?;
        let seq = row.try_get::<_, i64>(1)? as u32;
        let input: String = row.try_get(3)?;
        let retry: String = row.try_get(4)?;
        let input: Value = decode_json(&instance_id, || format!("input of task {seq}"), &input)?;
        let retry: RetrySpec = decode_json(
            &instance_id,
            || format!("retry policy of task {seq}"),
            &retry,
        )?;
        tasks.push(ActivityTask {
            seq,
            name: row.try_get(2)?,
            input,
            retry,
            attempt: row.try_get::<_, i64>(5)? as u32,
            generation: row.try_get::<_, i64>(6)? as u64,
            instance_id,
        });
    }
    Ok(tasks)
}

/// Records the final outcome of a held attempt and, when the instance is free for the caller
/// and has nothing else to deliver, commits the activation that delivered it, in one
/// transaction; see [`Store::finish_and_activate`].
async fn finish_and_activate_in_tx(
    tx: &impl GenericClient,
    task: &ActivityTask,
    c: &ActivationCommit,
    now: u64,
) -> TxResult<DirectFinish> {
    let outcome =
        match c.events.first() {
            Some(
                e @ (Event::ActivityCompleted { seq, .. } | Event::ActivityFailed { seq, .. }),
            ) if *seq == task.seq => e,
            _ => {
                return Err(StoreError::Database {
                    operation: "finish and activate".into(),
                    detail: format!(
                        "the activation does not start with the outcome of call {}",
                        task.seq
                    ),
                }
                .into())
            }
        };
    let seq = i64::from(task.seq);
    // Instance row first, then the task row: the lock order every transaction follows.
    let lock_stmt = tx
        .prepare_cached("SELECT 1 FROM instances WHERE id = $1 FOR UPDATE")
        .await?;
    let task_stmt = tx
        .prepare_cached(
            "SELECT attempt, lease_owner, generation, claimed_at FROM tasks
             WHERE instance_id = $1 AND seq = $2 FOR UPDATE",
        )
        .await?;
    let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&task.instance_id];
    let task_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&task.instance_id, &seq];
    let (_, row) = futures::try_join!(
        tx.query_opt(&lock_stmt, &lock_params),
        tx.query_opt(&task_stmt, &task_params),
    )?;
    let held = match &row {
        Some(row) => {
            row.try_get::<_, i64>(0)? == i64::from(task.attempt)
                && row.try_get::<_, Option<String>>(1)?.as_deref() == Some(&*c.owner)
                && row.try_get::<_, i64>(2)? as u64 == task.generation
        }
        None => false,
    };
    let Some(row) = row.filter(|_| held) else {
        return Ok(DirectFinish::Finished(FinishReceipt {
            accepted: false,
            instance_claimed: false,
        }));
    };
    let (end, error) = attempt_end(outcome);
    record_attempt(tx, task, row.try_get(3)?, end, error, now).await?;
    let claim = tx
        .prepare_cached(
            "UPDATE instances SET lease_owner = $2, lease_until = $3
             WHERE id = $1 AND status = 'running'
               AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < $4)",
        )
        .await?;
    let claimed = tx
        .execute(
            &claim,
            &[
                &task.instance_id,
                &&*c.owner,
                &((now + c.lease_ms) as i64),
                &(now as i64),
            ],
        )
        .await?
        > 0;
    let delete = tx
        .prepare_cached("DELETE FROM tasks WHERE instance_id = $1 AND seq = $2")
        .await?;
    if claimed && c.instance_id == task.instance_id {
        let stmt = tx
            .prepare_cached("SELECT NOT EXISTS (SELECT 1 FROM inbox WHERE instance_id = $1)")
            .await?;
        let inbox_empty: bool = tx
            .query_one(&stmt, &[&task.instance_id])
            .await?
            .try_get(0)?;
        if inbox_empty {
            // commit_in_tx checks position, run and lease before it writes anything, so a
            // refusal leaves the transaction clean for the plain finish below.
            match commit_in_tx(tx, c, now).await {
                Ok(receipt) => {
                    tx.execute(&delete, &[&task.instance_id, &seq]).await?;
                    return Ok(DirectFinish::Activated(receipt));
                }
                Err(TxError::Store(StoreError::Conflict { .. } | StoreError::LeaseLost { .. })) => {
                }
                Err(e) => return Err(e),
            }
        }
    }
    let dedupe = format!("seq:{}:{}", task.generation, task.seq);
    insert_inbox(tx, &task.instance_id, Some(&dedupe), outcome, now).await?;
    tx.execute(&delete, &[&task.instance_id, &seq]).await?;
    mark_ready(tx, &task.instance_id).await?;
    Ok(DirectFinish::Finished(FinishReceipt {
        accepted: true,
        instance_claimed: claimed,
    }))
}

async fn finish_in_tx(
    tx: &impl GenericClient,
    owner: &str,
    task: &ActivityTask,
    outcome: &AttemptOutcome,
    lease_ms: u64,
) -> TxResult<FinishReceipt> {
    let now = now_ms();
    let rejected = FinishReceipt {
        accepted: false,
        instance_claimed: false,
    };
    let seq = i64::from(task.seq);
    let task_stmt = tx
        .prepare_cached(
            "SELECT attempt, lease_owner, generation, claimed_at FROM tasks
             WHERE instance_id = $1 AND seq = $2 FOR UPDATE",
        )
        .await?;
    // For a final outcome, how the instance row stands (its lock taken): claimable by `owner`
    // (running, and free, ours, or with its lease run out), ready, and leased to `owner` for
    // half a lease or more.
    let mut lease = None;
    let row = if matches!(outcome, AttemptOutcome::Final(_)) {
        // Instance row first, the lock order every transaction follows; both statements are
        // prepared, so they are sent (and run) in this order, together.
        let lock_stmt = tx
            .prepare_cached(
                "SELECT status = 'running'
                            AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < $3),
                        ready, lease_owner IS NOT DISTINCT FROM $2 AND lease_until >= $4
                 FROM instances WHERE id = $1 FOR UPDATE",
            )
            .await?;
        let now_i = now as i64;
        let half = (now + lease_ms / 2) as i64;
        let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&task.instance_id, &owner, &now_i, &half];
        let task_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
            [&task.instance_id, &seq];
        let (instance, row) = futures::try_join!(
            tx.query_opt(&lock_stmt, &lock_params),
            tx.query_opt(&task_stmt, &task_params),
        )?;
        let Some(instance) = instance else {
            return Ok(rejected);
        };
        lease = Some((
            instance.try_get::<_, bool>(0)?,
            instance.try_get::<_, bool>(1)?,
            instance.try_get::<_, bool>(2)?,
        ));
        row
    } else {
        tx.query_opt(&task_stmt, &[&task.instance_id, &seq]).await?
    };
    let Some(row) = row else {
        return Ok(rejected);
    };
    let attempt: i64 = row.try_get(0)?;
    let lease_owner: Option<String> = row.try_get(1)?;
    let generation: i64 = row.try_get(2)?;
    let held = attempt == i64::from(task.attempt)
        && lease_owner.as_deref() == Some(owner)
        && generation as u64 == task.generation;
    if !held {
        return Ok(rejected);
    }
    let (end, error) = match outcome {
        AttemptOutcome::Final(event) => attempt_end(event),
        AttemptOutcome::Retry { error, .. } => (AttemptEnd::Retry, Some(error.to_string())),
    };
    record_attempt(tx, task, row.try_get(3)?, end, error, now).await?;
    match outcome {
        AttemptOutcome::Final(event) => {
            let dedupe = format!("seq:{}:{}", task.generation, task.seq);
            let delete = tx
                .prepare_cached("DELETE FROM tasks WHERE instance_id = $1 AND seq = $2")
                .await?;
            // Marks the instance ready, and claims it when it is free (or its lease expired).
            // A row that is ready already, and leased to this worker for half a lease or more
            // (the renewer renews every third of one) or held by another, is left as it is: in
            // a fan-out every call but the first to end finds it so, and each rewrite would
            // leave a dead row version and new index entries behind (as `finish_task` does in
            // the SQLite store).
            let (claimable, ready, leased) = lease.unwrap_or((false, false, false));
            let rewrite = !(ready && (leased || !claimable));
            let claim = tx
                .prepare_cached(
                    "UPDATE instances SET ready = TRUE,
                            lease_owner = CASE WHEN $4 THEN $2::TEXT ELSE lease_owner END,
                            lease_until = CASE WHEN $4 THEN $3::BIGINT ELSE lease_until END
                     WHERE id = $1 AND status = 'running'",
                )
                .await?;
            let lease_until = (now + lease_ms) as i64;
            futures::try_join!(
                insert_inbox(tx, &task.instance_id, Some(&dedupe), event, now),
                async { TxResult::Ok(tx.execute(&delete, &[&task.instance_id, &seq]).await?) },
                async {
                    if rewrite {
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                            [&task.instance_id, &owner, &lease_until, &claimable];
                        tx.execute(&claim, &params).await?;
                    }
                    TxResult::Ok(())
                },
            )?;
            Ok(FinishReceipt {
                accepted: true,
                instance_claimed: claimable,
            })
        }
        AttemptOutcome::Retry {
            next_attempt_at_ms,
            error,
        } => {
            let stmt = tx
                .prepare_cached(
                    "UPDATE tasks SET lease_owner = NULL, due_at = $3, last_error = $4
                     WHERE instance_id = $1 AND seq = $2",
                )
                .await?;
            tx.execute(
                &stmt,
                &[
                    &task.instance_id,
                    &seq,
                    &(*next_attempt_at_ms as i64),
                    &to_json(error).unwrap_or_default(),
                ],
            )
            .await?;
            Ok(FinishReceipt {
                accepted: true,
                instance_claimed: false,
            })
        }
    }
}

/// Journals the attempt `task` held: started when claimed (`claimed_at`; `now` for a task
/// claimed before the journal existed), ended `now`. Part of the transaction that records the
/// attempt's outcome.
async fn record_attempt(
    tx: &impl GenericClient,
    task: &ActivityTask,
    claimed_at: Option<i64>,
    end: AttemptEnd,
    error: Option<String>,
    now: u64,
) -> TxResult<()> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO attempts
                 (instance_id, generation, seq, attempt, started_at, ended_at, outcome, error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (instance_id, generation, seq, attempt) DO UPDATE
             SET started_at = EXCLUDED.started_at, ended_at = EXCLUDED.ended_at,
                 outcome = EXCLUDED.outcome, error = EXCLUDED.error",
        )
        .await?;
    let now = now as i64;
    tx.execute(
        &stmt,
        &[
            &task.instance_id,
            &(task.generation as i64),
            &i64::from(task.seq),
            &i64::from(task.attempt),
            &claimed_at.unwrap_or(now),
            &now,
            &end.as_str(),
            &error,
        ],
    )
    .await?;
    Ok(())
}

/// How a final outcome event ends its attempt, and its error.
fn attempt_end(event: &Event) -> (AttemptEnd, Option<String>) {
    match event {
        Event::ActivityFailed { failure, .. } => (
            AttemptEnd::Failed,
            Some(format!("{}: {}", failure.kind, failure.message)),
        ),
        _ => (AttemptEnd::Completed, None),
    }
}

/// Due timers, in due order: (instance, position). Read without locks.
async fn due_timers(
    client: &impl GenericClient,
    now: u64,
    limit: usize,
) -> TxResult<Vec<(String, i64)>> {
    let stmt = client
        .prepare_cached(
            "SELECT instance_id, seq FROM timers WHERE fire_at <= $1 ORDER BY fire_at LIMIT $2",
        )
        .await?;
    let due = client
        .query(&stmt, &[&(now as i64), &(limit as i64)])
        .await?;
    let mut candidates = Vec::with_capacity(due.len());
    for row in &due {
        candidates.push((row.try_get(0)?, row.try_get(1)?));
    }
    Ok(candidates)
}

/// Fires the due timers among `candidates` (from [`due_timers`]): locks their instances first
/// (skipping those another transaction holds: their timers fire on a later call), then takes
/// the timers that are still there.
async fn fire_in_tx(
    tx: &impl GenericClient,
    now: u64,
    candidates: &[(String, i64)],
) -> TxResult<Vec<String>> {
    let mut ids: Vec<&str> = candidates.iter().map(|(i, _)| i.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let stmt = tx
        .prepare_cached(
            "SELECT id FROM instances WHERE id = ANY($1) ORDER BY id FOR UPDATE SKIP LOCKED",
        )
        .await?;
    let locked: Vec<String> = tx
        .query(&stmt, &[&ids])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    let (iids, seqs): (Vec<&str>, Vec<i64>) = candidates
        .iter()
        .filter(|(i, _)| locked.iter().any(|l| l == i))
        .map(|(i, s)| (i.as_str(), *s))
        .unzip();
    if iids.is_empty() {
        return Ok(Vec::new());
    }
    let stmt = tx
        .prepare_cached(
            "DELETE FROM timers t USING unnest($1::TEXT[], $2::BIGINT[]) AS c(instance_id, seq)
             WHERE t.instance_id = c.instance_id AND t.seq = c.seq AND t.fire_at <= $3
             RETURNING t.instance_id, t.seq, t.generation",
        )
        .await?;
    // Due again under the lock: the candidates were read before it, and the timer at that
    // position may since have been replaced (by a new run's) with a later due time.
    let fired = tx
        .query(&stmt, &[&iids, &seqs, &super::codec::stored_ms(now)])
        .await?;
    let mut fired_rows: Vec<(String, i64, i64)> = Vec::with_capacity(fired.len());
    for row in &fired {
        fired_rows.push((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?));
    }
    // Deliver in due order, as the SQLite store does.
    let order = |id: &str, seq: i64| {
        candidates
            .iter()
            .position(|(i, s)| i == id && *s == seq)
            .unwrap_or(usize::MAX)
    };
    fired_rows.sort_by_key(|(i, s, _)| order(i, *s));
    let mut woken = Vec::with_capacity(fired_rows.len());
    for (instance_id, seq, generation) in fired_rows {
        let dedupe = format!("timer:{generation}:{seq}");
        let event = Event::TimerFired { seq: seq as u32 };
        insert_inbox(tx, &instance_id, Some(&dedupe), &event, now).await?;
        mark_ready(tx, &instance_id).await?;
        woken.push(instance_id);
    }
    Ok(woken)
}

async fn terminate_in_tx(tx: &impl GenericClient, id: &str, reason: &str) -> TxResult<()> {
    let now = now_ms();
    let info = get_instance(tx, id, true)
        .await?
        .ok_or_else(|| StoreError::NotFound {
            instance_id: id.to_string(),
        })?;
    if info.status.is_final() {
        return Err(StoreError::Ended {
            instance_id: id.to_string(),
            status: info.status,
        }
        .into());
    }
    let event = Event::InstanceTerminated {
        reason: reason.to_string(),
    };
    append_events(
        tx,
        id,
        info.next_position,
        info.next_activation,
        &[event],
        now,
    )
    .await?;
    let stmt = tx
        .prepare_cached(
            "UPDATE instances SET status = 'terminated', reason = $2, next_pos = next_pos + 1,
                    next_activation = next_activation + 1, ready = FALSE, lease_owner = NULL,
                    lease_until = 0, updated_at = $3, ended_at = $3
             WHERE id = $1",
        )
        .await?;
    tx.execute(&stmt, &[&id, &reason, &(now as i64)]).await?;
    delete_pending_work(tx, id).await?;
    if let Some(parent) = &info.parent {
        let result = Err(Error::application("terminated", reason.to_string()));
        notify_parent(tx, parent, result, now).await?;
    }
    Ok(())
}

/// Writes an imported or forked instance inside the current transaction; see
/// [`Store::import_instance`] for exactly what is written.
async fn import_in_tx(
    tx: &impl GenericClient,
    i: &ImportedInstance,
    now: u64,
) -> TxResult<CreateOutcome> {
    if let Some(existing) = get_instance(tx, &i.id, false).await? {
        return Ok(CreateOutcome::Existing(existing));
    }
    let invalid = |detail: String| StoreError::InvalidHistory {
        instance_id: i.id.clone(),
        detail,
    };
    retrace_sdk::history::check_shape(&i.id, 0, &i.events).map_err(|e| invalid(e.to_string()))?;
    let next_activation = match i.events.last() {
        Some(last) => last.activation.checked_add(1).ok_or_else(|| {
            invalid(format!(
                "activation number {} is out of range",
                last.activation
            ))
        })?,
        None => 0,
    };
    let output = i.output.as_ref().map(to_json).transpose()?;
    let error = i.error.as_ref().map(to_json).transpose()?;
    let custom_status = i.custom_status.as_ref().map(to_json).transpose()?;
    let input = to_json(&i.input)?;
    let stmt = tx
        .prepare_cached(
            "INSERT INTO instances (id, coordinator, status, input, output, error, reason,
                                    custom_status, generation, next_pos, next_activation, ready,
                                    created_at, updated_at, ended_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, $10, $11, $12, $13, $14)
             ON CONFLICT (id) DO NOTHING",
        )
        .await?;
    let inserted = tx
        .execute(
            &stmt,
            &[
                &i.id,
                &i.coordinator,
                &i.status.as_str(),
                &input,
                &output,
                &error,
                &i.reason,
                &custom_status,
                &(i.events.len() as i64),
                &i64::from(next_activation),
                &i.ready,
                &(i.created_at_ms as i64),
                &(now as i64),
                &i.ended_at_ms.map(|t| t as i64),
            ],
        )
        .await?;
    if inserted == 0 {
        // Created meanwhile by another transaction.
        let existing =
            get_instance(tx, &i.id, false)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    instance_id: i.id.clone(),
                })?;
        return Ok(CreateOutcome::Existing(existing));
    }
    if !i.events.is_empty() {
        let mut positions = Vec::with_capacity(i.events.len());
        let mut activations = Vec::with_capacity(i.events.len());
        let mut kinds = Vec::with_capacity(i.events.len());
        let mut recorded = Vec::with_capacity(i.events.len());
        let mut bodies = Vec::with_capacity(i.events.len());
        for e in &i.events {
            positions.push(e.position as i64);
            activations.push(i64::from(e.activation));
            kinds.push(e.event.kind());
            recorded.push(e.recorded_at_ms as i64);
            bodies.push(event_json(&e.event)?);
        }
        let stmt = tx
            .prepare_cached(
                "INSERT INTO events (instance_id, pos, activation, kind, recorded_at, body)
                 SELECT $1, e.pos, e.activation, e.kind, e.recorded_at, e.body
                 FROM unnest($2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::BIGINT[], $6::TEXT[])
                      AS e(pos, activation, kind, recorded_at, body)",
            )
            .await?;
        tx.execute(
            &stmt,
            &[&i.id, &positions, &activations, &kinds, &recorded, &bodies],
        )
        .await?;
    }
    if !i.tasks.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO tasks (instance_id, seq, generation, name, input, retry, attempt,
                                    due_at, lease_owner, created_at)
                 VALUES ($1, $2, 0, $3, $4, $5, 0, $6, NULL, $6)",
            )
            .await?;
        for t in &i.tasks {
            let (input, retry) = (to_json(&t.input)?, to_json(&t.retry)?);
            tx.execute(
                &stmt,
                &[
                    &i.id,
                    &i64::from(t.seq),
                    &t.name,
                    &input,
                    &retry,
                    &(now as i64),
                ],
            )
            .await?;
        }
    }
    if !i.timers.is_empty() {
        let stmt = tx
            .prepare_cached(
                "INSERT INTO timers (instance_id, seq, generation, fire_at) VALUES ($1, $2, 0, $3)",
            )
            .await?;
        for (seq, fire_at) in &i.timers {
            tx.execute(
                &stmt,
                &[&i.id, &i64::from(*seq), &super::codec::stored_ms(*fire_at)],
            )
            .await?;
        }
    }
    if i.start_in_inbox {
        let start = Event::InstanceStarted {
            coordinator: i.coordinator.clone(),
            input: i.input.clone(),
            parent: None,
        };
        insert_inbox(tx, &i.id, Some("start:0"), &start, now).await?;
    }
    // Pair the shape check above with one on what was written.
    let stmt = tx
        .prepare_cached("SELECT count(*) FROM events WHERE instance_id = $1")
        .await?;
    let written: i64 = tx.query_one(&stmt, &[&i.id]).await?.try_get(0)?;
    if written as usize != i.events.len() {
        return Err(invalid(format!(
            "wrote {written} events of {}; nothing was kept",
            i.events.len()
        ))
        .into());
    }
    Ok(CreateOutcome::Created)
}

/// Writes a copied instance (see [`super::migrate`]): row, history, inbox, tasks, timers,
/// delivered ids and attempt journal, without leases.
async fn copy_in_tx(tx: &impl GenericClient, i: &RawCopy) -> TxResult<CopyOutcome> {
    let stmt = tx
        .prepare_cached(
            "INSERT INTO instances (id, coordinator, status, input, output, error, reason,
                                    custom_status, parent_id, parent_seq, generation, next_pos,
                                    next_activation, ready, lease_owner, lease_until, created_at,
                                    updated_at, ended_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, NULL, 0, $15,
                     $16, $17)
             ON CONFLICT (id) DO NOTHING",
        )
        .await?;
    let inserted = tx
        .execute(
            &stmt,
            &[
                &i.id,
                &i.coordinator,
                &i.status,
                &i.input,
                &i.output,
                &i.error,
                &i.reason,
                &i.custom_status,
                &i.parent_id,
                &i.parent_seq,
                &i.generation,
                &i.next_pos,
                &i.next_activation,
                &i.ready,
                &i.created_at,
                &i.updated_at,
                &i.ended_at,
            ],
        )
        .await?;
    if inserted == 0 {
        let stmt = tx
            .prepare_cached(
                "SELECT generation, next_pos, status,
                        (SELECT count(*) FROM events WHERE instance_id = $1),
                        coordinator, created_at
                 FROM instances WHERE id = $1",
            )
            .await?;
        let row = tx.query_one(&stmt, &[&i.id]).await?;
        let same = row.try_get::<_, i64>(0)? == i.generation
            && row.try_get::<_, i64>(1)? == i.next_pos
            && row.try_get::<_, String>(2)? == i.status
            && row.try_get::<_, i64>(3)? == i.events.len() as i64
            && row.try_get::<_, String>(4)? == i.coordinator
            && row.try_get::<_, i64>(5)? == i.created_at;
        return Ok(if same {
            CopyOutcome::AlreadyThere
        } else {
            CopyOutcome::Different
        });
    }
    if !i.events.is_empty() {
        let positions: Vec<i64> = i.events.iter().map(|e| e.0).collect();
        let activations: Vec<i64> = i.events.iter().map(|e| e.1).collect();
        let kinds: Vec<&str> = i.events.iter().map(|e| e.2.as_str()).collect();
        let recorded: Vec<i64> = i.events.iter().map(|e| e.3).collect();
        let bodies: Vec<&str> = i.events.iter().map(|e| e.4.as_str()).collect();
        let stmt = tx
            .prepare_cached(
                "INSERT INTO events (instance_id, pos, activation, kind, recorded_at, body)
                 SELECT $1, e.pos, e.activation, e.kind, e.recorded_at, e.body
                 FROM unnest($2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::BIGINT[], $6::TEXT[])
                      AS e(pos, activation, kind, recorded_at, body)",
            )
            .await?;
        tx.execute(
            &stmt,
            &[&i.id, &positions, &activations, &kinds, &recorded, &bodies],
        )
        .await?;
    }
    // One by one, so that the new inbox ids keep the arrival order.
    let stmt = tx
        .prepare_cached(
            "INSERT INTO inbox (instance_id, dedupe, body, created_at) VALUES ($1, $2, $3, $4)",
        )
        .await?;
    for (dedupe, body, created_at) in &i.inbox {
        tx.execute(&stmt, &[&i.id, dedupe, body, created_at])
            .await?;
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO tasks (instance_id, seq, generation, name, input, retry, attempt,
                                due_at, lease_owner, last_error, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, $9, $10)",
        )
        .await?;
    for t in &i.tasks {
        tx.execute(
            &stmt,
            &[
                &i.id,
                &t.seq,
                &t.generation,
                &t.name,
                &t.input,
                &t.retry,
                &t.attempt,
                &t.due_at,
                &t.last_error,
                &t.created_at,
            ],
        )
        .await?;
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO timers (instance_id, seq, generation, fire_at) VALUES ($1, $2, $3, $4)",
        )
        .await?;
    for (seq, generation, fire_at) in &i.timers {
        tx.execute(&stmt, &[&i.id, seq, generation, fire_at])
            .await?;
    }
    let stmt = tx
        .prepare_cached("INSERT INTO delivered (instance_id, dedupe) VALUES ($1, $2)")
        .await?;
    for dedupe in &i.delivered {
        tx.execute(&stmt, &[&i.id, dedupe]).await?;
    }
    let stmt = tx
        .prepare_cached(
            "INSERT INTO attempts (instance_id, generation, seq, attempt, started_at, ended_at,
                                   outcome, error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .await?;
    for a in &i.attempts {
        tx.execute(
            &stmt,
            &[
                &i.id,
                &(a.generation as i64),
                &i64::from(a.seq),
                &i64::from(a.attempt),
                &(a.started_at_ms as i64),
                &(a.ended_at_ms as i64),
                &a.outcome.as_str(),
                &a.error,
            ],
        )
        .await?;
    }
    // Pair the source's contiguity check with one on what was written.
    let stmt = tx
        .prepare_cached(
            "SELECT count(*), COALESCE(max(pos) + 1, 0) FROM events WHERE instance_id = $1",
        )
        .await?;
    let row = tx.query_one(&stmt, &[&i.id]).await?;
    let (count, end): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    if count != i.next_pos || end != i.next_pos {
        return Err(StoreError::Corrupt {
            instance_id: i.id.clone(),
            what: "copied history".into(),
            detail: format!(
                "{count} events written, ending at {end}, expected {}",
                i.next_pos
            ),
        }
        .into());
    }
    Ok(CopyOutcome::Copied)
}

impl PostgresStore {
    /// Wakes the workers of every process (after changes made behind the store's back, such as
    /// a migration).
    pub(crate) fn wake_workers(&self) {
        self.bump();
    }

    /// Copies one instance of another store, with all its rows, in one transaction; see
    /// [`super::migrate`].
    pub(crate) async fn copy_instance(&self, i: &RawCopy) -> Result<CopyOutcome, StoreError> {
        write_tx!(self, "copy instance", |tx| copy_in_tx(&tx, i).await)
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn create_instance(&self, new: NewInstance) -> Result<CreateOutcome, StoreError> {
        let outcome = autocommit!(self, "create instance", |client| create_in_tx(
            &client,
            &new,
            now_ms()
        )
        .await)?;
        if outcome == CreateOutcome::Created {
            self.bump();
        }
        Ok(outcome)
    }

    async fn claim_ready(
        &self,
        owner: &str,
        coordinators: &[String],
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<String>, StoreError> {
        autocommit!(self, "claim instances", |tx| async {
            let now = now_ms();
            let stmt = tx
                .prepare_cached(
                    "WITH ready AS (
                         SELECT id FROM instances
                         WHERE ready AND status = 'running'
                           AND (lease_until < $3 OR lease_owner = $1)
                           AND coordinator = ANY($4)
                         LIMIT $5
                         FOR UPDATE SKIP LOCKED)
                     UPDATE instances i SET lease_owner = $1, lease_until = $2
                     FROM ready WHERE i.id = ready.id
                     RETURNING i.id",
                )
                .await?;
            let rows = tx
                .query(
                    &stmt,
                    &[
                        &owner,
                        &((now + lease_ms) as i64),
                        &(now as i64),
                        &coordinators,
                        &(limit as i64),
                    ],
                )
                .await?;
            rows.iter()
                .map(|r| r.try_get::<_, String>(0).map_err(TxError::from))
                .collect::<TxResult<Vec<_>>>()
        }
        .await)
    }

    async fn load(
        &self,
        instance_id: &str,
        from_position: u64,
    ) -> Result<LoadedInstance, StoreError> {
        autocommit!(self, "load instance", |client| load_pipelined(
            &client,
            instance_id,
            from_position
        )
        .await)
    }

    async fn create_and_activate(
        &self,
        new: NewInstance,
        first: ActivationCommit,
    ) -> Result<(CreateOutcome, Option<CommitReceipt>), StoreError> {
        let ended = first.end.is_some();
        let (outcome, receipt) =
            write_tx!(self, "create and activate", |tx| async {
                let now = now_ms();
                let created: TxResult<(CreateOutcome, Option<CommitReceipt>)> =
                    match insert_instance(&tx, &new, now, Some((&first.owner, first.lease_ms)))
                        .await?
                    {
                        CreateOutcome::Created => {
                            let receipt = commit_in_tx(&tx, &first, now).await?;
                            Ok((CreateOutcome::Created, Some(receipt)))
                        }
                        existing => Ok((existing, None)),
                    };
                created
            }
            .await)?;
        if let Some(receipt) = &receipt {
            if ended || receipt.ready_again || !receipt.woken.is_empty() {
                self.bump();
            }
        }
        Ok((outcome, receipt))
    }

    async fn commit_activation(
        &self,
        commit: ActivationCommit,
    ) -> Result<CommitReceipt, StoreError> {
        let ended = commit.end.is_some();
        let receipt = write_tx!(self, "commit activation", |tx| commit_in_tx(
            &tx,
            &commit,
            now_ms()
        )
        .await)?;
        if ended || !receipt.woken.is_empty() {
            self.bump();
        }
        Ok(receipt)
    }

    async fn stop_instance(
        &self,
        instance_id: &str,
        owner: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        autocommit!(self, "stop instance", |tx| async {
            let stmt = tx
                .prepare_cached(
                    "UPDATE instances SET status = 'stopped', reason = $3, ready = FALSE,
                            lease_owner = NULL, lease_until = 0, updated_at = $4
                     WHERE id = $1 AND status = 'running'
                       AND (lease_owner = $2 OR lease_owner IS NULL)",
                )
                .await?;
            tx.execute(&stmt, &[&instance_id, &owner, &reason, &(now_ms() as i64)])
                .await?;
            TxResult::Ok(())
        }
        .await)?;
        self.bump();
        Ok(())
    }

    async fn release_idle(&self, instance_id: &str, owner: &str) -> Result<(), StoreError> {
        let ready_again: Result<bool, StoreError> = write_tx!(
            self,
            "release idle instance",
            |tx| {
                async {
            // Lock first, so that the inbox check below sees every delivery committed before
            // (in one statement, READ COMMITTED would check the inbox as of before the wait).
            lock_instance(&tx, instance_id).await?;
            let stmt = tx
                .prepare_cached(
                    "UPDATE instances SET ready = EXISTS (SELECT 1 FROM inbox WHERE instance_id = $1),
                            lease_owner = NULL, lease_until = 0
                     WHERE id = $1 AND lease_owner = $2
                     RETURNING ready",
                )
                .await?;
            let row = tx.query_opt(&stmt, &[&instance_id, &owner]).await?;
            TxResult::Ok(match row {
                Some(row) => row.try_get::<_, bool>(0)?,
                None => false,
            })
        }
        .await
            }
        );
        // Ready again (a message came meanwhile): workers must look.
        if ready_again? {
            self.bump();
        }
        Ok(())
    }

    async fn note_waiting(
        &self,
        instance_id: &str,
        owner: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        autocommit!(self, "note waiting instance", |tx| async {
            let stmt = tx
                .prepare_cached(
                    "UPDATE instances SET reason = $3, lease_owner = NULL, lease_until = 0
                     WHERE id = $1 AND status = 'running'
                       AND (lease_owner = $2 OR lease_owner IS NULL)",
                )
                .await?;
            tx.execute(&stmt, &[&instance_id, &owner, &reason]).await?;
            TxResult::Ok(())
        }
        .await)
    }

    async fn claim_tasks(
        &self,
        owner: &str,
        activities: &[String],
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<ActivityTask>, StoreError> {
        autocommit!(self, "claim activity tasks", |tx| claim_tasks_in_tx(
            &tx, owner, activities, limit, lease_ms
        )
        .await)
    }

    async fn finish_task(
        &self,
        owner: &str,
        task: &ActivityTask,
        outcome: AttemptOutcome,
        lease_ms: u64,
    ) -> Result<FinishReceipt, StoreError> {
        let receipt = write_tx!(self, "finish activity task", |tx| finish_in_tx(
            &tx, owner, task, &outcome, lease_ms
        )
        .await)?;
        if receipt.accepted && !receipt.instance_claimed {
            self.bump();
        }
        Ok(receipt)
    }

    async fn finish_and_activate(
        &self,
        task: &ActivityTask,
        commit: ActivationCommit,
    ) -> Result<DirectFinish, StoreError> {
        let ended = commit.end.is_some();
        let done = write_tx!(self, "finish and activate", |tx| finish_and_activate_in_tx(
            &tx,
            task,
            &commit,
            now_ms()
        )
        .await)?;
        let bump = match &done {
            DirectFinish::Activated(receipt) => ended || !receipt.woken.is_empty(),
            DirectFinish::Finished(receipt) => receipt.accepted && !receipt.instance_claimed,
        };
        if bump {
            self.bump();
        }
        Ok(done)
    }

    async fn mark_unclaimed(&self, known: &[String], min_wait_ms: u64) -> Result<u64, StoreError> {
        autocommit!(self, "mark unclaimed instances", |client| async {
            let before = now_ms().saturating_sub(min_wait_ms) as i64;
            let stmt = client
                .prepare_cached(
                    "UPDATE instances
                     SET reason = 'waiting for a worker that knows coordinator ' || coordinator
                     WHERE ready AND status = 'running' AND reason IS NULL
                       AND lease_owner IS NULL AND updated_at < $2
                       AND NOT (coordinator = ANY($1))",
                )
                .await?;
            TxResult::Ok(client.execute(&stmt, &[&known, &before]).await?)
        }
        .await)
    }

    async fn renew_leases(&self, owner: &str, lease_ms: u64) -> Result<u64, StoreError> {
        write_tx!(self, "renew leases", |tx| async {
            let until = (now_ms() + lease_ms) as i64;
            // Rows locked by another transaction are skipped rather than waited for: that
            // transaction sets the lease itself, or, as an activity's outcome that finds the
            // row leased to this worker for half a lease or more, leaves it with that much; the
            // next renewal, a third of a lease later, catches up (a lease lapses only if
            // renewals are skipped twice in a row by holders that do not set it).
            let stmt = tx
                .prepare_cached(
                    "UPDATE instances SET lease_until = $2
                     WHERE id IN (SELECT id FROM instances WHERE lease_owner = $1
                                  FOR UPDATE SKIP LOCKED)",
                )
                .await?;
            let a = tx.execute(&stmt, &[&owner, &until]).await?;
            let stmt = tx
                .prepare_cached(
                    "UPDATE tasks SET due_at = $2
                     WHERE (instance_id, seq) IN (SELECT instance_id, seq FROM tasks
                                                  WHERE lease_owner = $1
                                                  FOR UPDATE SKIP LOCKED)",
                )
                .await?;
            let b = tx.execute(&stmt, &[&owner, &until]).await?;
            TxResult::Ok(a + b)
        }
        .await)
    }

    async fn release_leases(&self, owner: &str) -> Result<(), StoreError> {
        write_tx!(self, "release leases", |tx| async {
            let now = now_ms() as i64;
            let stmt = tx
                .prepare_cached(
                    "UPDATE instances SET lease_owner = NULL, lease_until = 0
                     WHERE lease_owner = $1",
                )
                .await?;
            tx.execute(&stmt, &[&owner]).await?;
            let stmt = tx
                .prepare_cached(
                    "UPDATE tasks SET lease_owner = NULL, due_at = $2 WHERE lease_owner = $1",
                )
                .await?;
            tx.execute(&stmt, &[&owner, &now]).await?;
            TxResult::Ok(())
        }
        .await)?;
        self.bump();
        Ok(())
    }

    async fn fire_due_timers(&self, now: u64, limit: usize) -> Result<Vec<String>, StoreError> {
        // Most calls find nothing due: look first, without a transaction.
        let candidates = autocommit!(self, "fire timers", |client| due_timers(
            &client, now, limit
        )
        .await)?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let woken = write_tx!(self, "fire timers", |tx| fire_in_tx(&tx, now, &candidates)
            .await)?;
        if !woken.is_empty() {
            self.bump();
        }
        Ok(woken)
    }

    async fn next_due(&self) -> Result<Option<u64>, StoreError> {
        let client = self.client("next due").await?;
        let stmt = client
            .prepare_cached(
                "SELECT LEAST((SELECT MIN(fire_at) FROM timers),
                              (SELECT MIN(due_at) FROM tasks WHERE lease_owner IS NULL))",
            )
            .await
            .map_err(|e| map_pg("next due", &e))?;
        let row = client
            .query_one(&stmt, &[])
            .await
            .map_err(|e| map_pg("next due", &e))?;
        let due: Option<i64> = row.try_get(0).map_err(|e| map_pg("next due", &e))?;
        Ok(due.map(|v| v as u64))
    }

    async fn deliver_message(
        &self,
        instance_id: &str,
        event: Event,
        dedupe_key: Option<&str>,
    ) -> Result<Delivery, StoreError> {
        // One statement: lock the instance, put the event in its inbox unless it has ended,
        // and mark it ready if it runs and the event was not a duplicate (a duplicate must not
        // mark ready an instance whose inbox is empty).
        let (status, accepted, seen) = autocommit!(self, "deliver event", |client| async {
            let stmt = client
                .prepare_cached(
                    "WITH target AS (
                         SELECT id, status FROM instances WHERE id = $1 FOR UPDATE),
                     remembered AS (
                         INSERT INTO delivered (instance_id, dedupe)
                         SELECT id, $2 FROM target
                         WHERE $2::TEXT IS NOT NULL AND status IN ('running', 'stopped')
                         ON CONFLICT (instance_id, dedupe) DO NOTHING
                         RETURNING 1),
                     accepted AS (
                         INSERT INTO inbox (instance_id, dedupe, body, created_at)
                         SELECT id, $2, $3, $4 FROM target
                         WHERE status IN ('running', 'stopped')
                           AND ($2::TEXT IS NULL OR EXISTS (SELECT 1 FROM remembered))
                         ON CONFLICT (instance_id, dedupe) DO NOTHING
                         RETURNING 1),
                     marked AS (
                         UPDATE instances SET ready = TRUE
                         WHERE id = (SELECT id FROM target WHERE status = 'running')
                           AND EXISTS (SELECT 1 FROM accepted)
                         RETURNING 1)
                     SELECT (SELECT status FROM target),
                            (SELECT count(*) FROM accepted) > 0,
                            (SELECT count(*) FROM marked),
                            -- Delivered before this statement (its own insert is not seen).
                            EXISTS (SELECT 1 FROM delivered
                                    WHERE instance_id = $1 AND dedupe = $2)",
                )
                .await?;
            let body = event_json(&event)?;
            let row = client
                .query_one(
                    &stmt,
                    &[&instance_id, &dedupe_key, &body, &(now_ms() as i64)],
                )
                .await?;
            TxResult::Ok((
                row.try_get::<_, Option<String>>(0)?,
                row.try_get::<_, bool>(1)?,
                row.try_get::<_, bool>(3)?,
            ))
        }
        .await)?;
        let Some(status) = status else {
            return Err(StoreError::NotFound {
                instance_id: instance_id.to_string(),
            });
        };
        if accepted {
            self.bump();
            return Ok(Delivery::Accepted);
        }
        match InstanceStatus::parse(&status) {
            Some(status) if status.is_final() && !seen => {
                // `seen` came from the statement's snapshot, taken before it waited for the
                // instance's lock: a delivery of this key committed meanwhile (before the end)
                // must still count as delivered. Look again, in a new snapshot.
                if let Some(key) = dedupe_key {
                    let client = self.client("deliver event").await?;
                    let delivered: bool = client
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM delivered
                                            WHERE instance_id = $1 AND dedupe = $2)",
                            &[&instance_id, &key],
                        )
                        .await
                        .map_err(|e| map_pg("deliver event", &e))?
                        .try_get(0)
                        .map_err(|e| map_pg("deliver event", &e))?;
                    if delivered {
                        return Ok(Delivery::Duplicate);
                    }
                }
                Ok(Delivery::Ended(status))
            }
            _ => Ok(Delivery::Duplicate),
        }
    }

    async fn terminate(&self, instance_id: &str, reason: &str) -> Result<(), StoreError> {
        write_tx!(self, "terminate instance", |tx| terminate_in_tx(
            &tx,
            instance_id,
            reason
        )
        .await)?;
        self.bump();
        Ok(())
    }

    async fn resume(&self, instance_id: &str) -> Result<(), StoreError> {
        write_tx!(self, "resume instance", |tx| {
            async {
            // Lock first, so that the inbox check below sees every delivery committed before.
            lock_instance(&tx, instance_id).await?;
            let stmt = tx
                .prepare_cached(
                    "UPDATE instances SET status = 'running', reason = NULL,
                            ready = EXISTS (SELECT 1 FROM inbox WHERE instance_id = $1),
                            -- A running instance keeps its lease: a worker may be activating it.
                            lease_owner = CASE WHEN status = 'stopped' THEN NULL ELSE lease_owner END,
                            lease_until = CASE WHEN status = 'stopped' THEN 0 ELSE lease_until END,
                            updated_at = $2
                     WHERE id = $1 AND status IN ('stopped', 'running')",
                )
                .await?;
            let n = tx
                .execute(&stmt, &[&instance_id, &(now_ms() as i64)])
                .await?;
            if n == 0 {
                return Err(match get_instance(&tx, instance_id, false).await? {
                    None => StoreError::NotFound {
                        instance_id: instance_id.to_string(),
                    },
                    Some(info) => StoreError::Ended {
                        instance_id: instance_id.to_string(),
                        status: info.status,
                    },
                }
                .into());
            }
            TxResult::Ok(())
        }
        .await
        })?;
        self.bump();
        Ok(())
    }

    async fn describe(&self, instance_id: &str) -> Result<Option<InstanceInfo>, StoreError> {
        // One statement sees one snapshot: no transaction needed.
        let operation = "read instance";
        let client = self.client(operation).await?;
        let result: TxResult<Option<InstanceInfo>> = async {
            let sql = format!("SELECT {INSTANCE_COLUMNS} FROM instances WHERE id = $1");
            let stmt = client.prepare_cached(&sql).await?;
            match client.query_opt(&stmt, &[&instance_id]).await? {
                Some(row) => Ok(Some(instance_from_row(&row)?)),
                None => Ok(None),
            }
        }
        .await;
        result.map_err(|e| e.into_store(operation))
    }

    async fn history(&self, instance_id: &str) -> Result<Vec<HistoryEvent>, StoreError> {
        read_tx!(self, "read history", |tx| async {
            if get_instance(&tx, instance_id, false).await?.is_none() {
                return Err(StoreError::NotFound {
                    instance_id: instance_id.to_string(),
                }
                .into());
            }
            read_events(&tx, instance_id, 0).await
        }
        .await)
    }

    async fn list_instances(&self, filter: &ListFilter) -> Result<Vec<InstanceInfo>, StoreError> {
        autocommit!(self, "list instances", |tx| async {
            let sql = format!(
                "SELECT {INSTANCE_COLUMNS} FROM instances
                 WHERE ($1::TEXT IS NULL OR status = $1) AND ($2::TEXT IS NULL OR coordinator = $2)
                 ORDER BY created_at DESC, id LIMIT $3"
            );
            let stmt = tx.prepare_cached(&sql).await?;
            let status = filter.status.map(InstanceStatus::as_str);
            // Beyond what a BIGINT holds means no limit (NULL), as SQLite takes it.
            let limit = filter.limit.and_then(|l| i64::try_from(l).ok());
            let rows = tx
                .query(&stmt, &[&status, &filter.coordinator, &limit])
                .await?;
            rows.iter()
                .map(instance_from_row)
                .collect::<TxResult<Vec<_>>>()
        }
        .await)
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    async fn register_worker(&self, owner: &str) -> Result<(), StoreError> {
        let operation = "register worker";
        if lock_map(&self.worker_locks).contains_key(owner) {
            return Ok(());
        }
        // The lock lives on a connection of its own: the server releases it when that
        // connection ends, however the worker's process died (or when its host vanished, once
        // TCP keepalive notices).
        let (client, connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(|e| map_pg(operation, &e))?;
        let who = owner.to_string();
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(worker = %who, error = %e, "worker lock connection lost; other workers may take this worker's work over");
            }
        });
        let lock = WorkerLock {
            _client: client,
            connection,
        };
        let key = self.worker_lock_key(owner);
        let row = lock
            ._client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .map_err(|e| map_pg(operation, &e))?;
        let locked: bool = row.try_get(0).map_err(|e| map_pg(operation, &e))?;
        if !locked {
            return Err(StoreError::Database {
                operation: operation.into(),
                detail: format!("worker id {owner} is in use by a live worker"),
            });
        }
        // The row is written only once the lock is held: a reaper never sees it unlocked.
        write_tx!(self, operation, |tx| async {
            let stmt = tx
                .prepare_cached(
                    "INSERT INTO workers (owner, lock_key, registered_at) VALUES ($1, $2, $3)
                     ON CONFLICT (owner) DO UPDATE
                     SET lock_key = EXCLUDED.lock_key, registered_at = EXCLUDED.registered_at",
                )
                .await?;
            tx.execute(&stmt, &[&owner, &key, &(now_ms() as i64)])
                .await?;
            TxResult::Ok(())
        }
        .await)?;
        lock_map(&self.worker_locks).insert(owner.to_string(), lock);
        Ok(())
    }

    async fn unregister_worker(&self, owner: &str) -> Result<(), StoreError> {
        let Some(lock) = lock_map(&self.worker_locks).remove(owner) else {
            return Ok(());
        };
        let result = write_tx!(self, "unregister worker", |tx| async {
            let stmt = tx
                .prepare_cached("DELETE FROM workers WHERE owner = $1")
                .await?;
            tx.execute(&stmt, &[&owner]).await?;
            TxResult::Ok(())
        }
        .await);
        drop(lock);
        result
    }

    async fn reap_dead_workers(&self) -> Result<u64, StoreError> {
        let own: Vec<String> = lock_map(&self.worker_locks).keys().cloned().collect();
        let dead = write_tx!(self, "reap dead workers", |tx| async {
            let stmt = tx
                .prepare_cached(
                    "SELECT owner FROM workers
                     WHERE NOT (owner = ANY($1)) AND pg_try_advisory_xact_lock(lock_key)
                     ORDER BY owner
                     FOR UPDATE SKIP LOCKED",
                )
                .await?;
            let dead: Vec<String> = tx
                .query(&stmt, &[&own])
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            if dead.is_empty() {
                return TxResult::Ok(dead);
            }
            let now = now_ms() as i64;
            for sql in [
                "UPDATE instances SET lease_until = 0 WHERE lease_owner = ANY($1)",
                "DELETE FROM workers WHERE owner = ANY($1)",
            ] {
                let stmt = tx.prepare_cached(sql).await?;
                tx.execute(&stmt, &[&dead]).await?;
            }
            let stmt = tx
                .prepare_cached(
                    "UPDATE tasks SET lease_owner = NULL, due_at = $2 WHERE lease_owner = ANY($1)",
                )
                .await?;
            tx.execute(&stmt, &[&dead, &now]).await?;
            Ok(dead)
        }
        .await)?;
        if dead.is_empty() {
            return Ok(0);
        }
        for owner in &dead {
            tracing::info!(worker = %owner, "worker is dead; its work was handed over");
        }
        self.bump();
        Ok(dead.len() as u64)
    }

    async fn import_instance(
        &self,
        instance: ImportedInstance,
    ) -> Result<CreateOutcome, StoreError> {
        let outcome = write_tx!(self, "import instance", |tx| import_in_tx(
            &tx,
            &instance,
            now_ms()
        )
        .await)?;
        if outcome == CreateOutcome::Created {
            self.bump();
        }
        Ok(outcome)
    }

    async fn attempts(&self, instance_id: &str) -> Result<Vec<AttemptRecord>, StoreError> {
        autocommit!(self, "read attempts", |tx| async {
            let stmt = tx
                .prepare_cached(
                    "SELECT generation, seq, attempt, started_at, ended_at, outcome, error
                     FROM attempts WHERE instance_id = $1 ORDER BY generation, seq, attempt",
                )
                .await?;
            let rows = tx.query(&stmt, &[&instance_id]).await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let seq = row.try_get::<_, i64>(1)? as u32;
                let attempt = row.try_get::<_, i64>(2)? as u32;
                let outcome: String = row.try_get(5)?;
                let outcome = AttemptEnd::parse(&outcome).ok_or_else(|| StoreError::Database {
                    operation: "read attempts".into(),
                    detail: format!(
                        "attempt {attempt} of call {seq} of {instance_id} has an unknown \
                         outcome {outcome:?}"
                    ),
                })?;
                out.push(AttemptRecord {
                    instance_id: instance_id.to_string(),
                    generation: row.try_get::<_, i64>(0)? as u64,
                    seq,
                    attempt,
                    started_at_ms: row.try_get::<_, i64>(3)? as u64,
                    ended_at_ms: row.try_get::<_, i64>(4)? as u64,
                    outcome,
                    error: row.try_get(6)?,
                });
            }
            Ok(out)
        }
        .await)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn url_parameters_are_split_off() {
        let (url, o) =
            split_url("postgres://u@h/db?schema=abc&sslmode=disable&pool_size=3").unwrap();
        assert_eq!(url, "postgres://u@h/db?sslmode=disable");
        assert_eq!(o.schema.as_deref(), Some("abc"));
        assert_eq!(o.pool_size, 3);
        let (url, o) = split_url("postgres://u@h/db").unwrap();
        assert_eq!(url, "postgres://u@h/db");
        assert!(o.schema.is_none());
        assert!(split_url("postgres://u@h/db?pool_size=x").is_err());
    }

    #[test]
    fn schema_names_need_no_quoting() {
        assert!(valid_schema_name("retrace_test_1a"));
        assert!(valid_schema_name("_x"));
        assert!(!valid_schema_name("1x"));
        assert!(!valid_schema_name("Upper"));
        assert!(!valid_schema_name("a;drop"));
        assert!(!valid_schema_name(""));
        assert!(!valid_schema_name(&"a".repeat(64)));
    }

    #[test]
    fn channel_names_are_stable() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("public"), fnv1a("public"));
        assert_ne!(fnv1a("a"), fnv1a("b"));
    }
}
