//! The SQLite store: one file, WAL, `synchronous=FULL` by default, group commit.
//!
//! # Commit protocol
//! One dedicated thread owns the only writing connection. Store operations are closures sent to
//! it over a channel; the thread takes every operation waiting (up to
//! [`crate::limits::GROUP_COMMIT_MAX`]), runs them in one `BEGIN IMMEDIATE` transaction, commits
//! once (one fsync for the whole batch), and only then answers each caller. If an operation
//! fails, the batch is rolled back and run again with a savepoint per operation, so that the
//! failure undoes only its own writes and the others commit. Reads use separate connections
//! (WAL lets them run beside the writer).
//!
//! # Schema
//! Versioned with `PRAGMA user_version`, marked as ours with `PRAGMA application_id`; the
//! tables and the reason for each change are in `MIGRATIONS` below. Opening a file of a newer schema or a file that is not a Retrace
//! store is an error that changes nothing in the file.

use super::checkpoint::{
    checkpoint, take_wal_frames, watch_wal, Checkpointer, CHECKPOINT_FRAMES,
    CHECKPOINT_INLINE_FRAMES,
};
use super::codec::{
    child_id_refusal, decode_event_json, decode_json, encode_error, end_columns, event_json,
    existing_child, final_result, lock_map, to_json, ExistingChild,
};
use super::deferred_rows::{self, DeferredRow};
use super::held_chain::{catch_up, lag, settle_info, Chain, HeldChains};
use super::transaction::Tx;
use super::{
    ActivationCommit, ActivityTask, AttemptEnd, AttemptOutcome, AttemptRecord, CommitReceipt,
    CreateOutcome, Delivery, DirectFinish, ExecutionFactory, FinishReceipt, ImportedInstance,
    InboxMessage, InstanceInfo, InstanceStatus, ListFilter, LoadedInstance, NewInstance, NewTask,
    ReplayedInstance, RunEnd, Store,
};
use crate::clock::now_ms;
use crate::error::StoreError;
use crate::limits::{
    BUSY_TIMEOUT, ENDED_REMEMBERED_MAX, GROUP_COMMIT_MAX, HELD_EXPIRY_SCAN_INTERVAL, READERS_MAX,
};
use async_trait::async_trait;
use retrace_sdk::{Error, Event, Execution, HistoryEvent, ParentRef, ReplayError, RetrySpec};
use rusqlite::config::DbConfig;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// `PRAGMA application_id` of a Retrace store ("RTRC").
const APPLICATION_ID: i64 = 0x5254_5243;
/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = 11;
/// Prepared statements kept per connection (the store uses a few dozen distinct ones).
const STATEMENT_CACHE_CAPACITY: usize = 128;

/// Migrations, index `i` moves a store from version `i` to `i + 1`.
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
    parent_seq      INTEGER,
    generation      INTEGER NOT NULL DEFAULT 0,
    next_pos        INTEGER NOT NULL DEFAULT 0,
    next_activation INTEGER NOT NULL DEFAULT 0,
    ready           INTEGER NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until     INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    ended_at        INTEGER
);
CREATE INDEX instances_ready ON instances(lease_until) WHERE ready = 1 AND status = 'running';
CREATE INDEX instances_status ON instances(status, created_at);
CREATE TABLE events (
    instance_id TEXT NOT NULL,
    pos         INTEGER NOT NULL,
    activation  INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    body        TEXT NOT NULL,
    PRIMARY KEY (instance_id, pos)
) WITHOUT ROWID;
CREATE TABLE inbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL,
    dedupe      TEXT,
    body        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    UNIQUE (instance_id, dedupe)
);
CREATE TABLE tasks (
    instance_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    generation  INTEGER NOT NULL,
    name        TEXT NOT NULL,
    input       TEXT NOT NULL,
    retry       TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    due_at      INTEGER NOT NULL,
    lease_owner TEXT,
    last_error  TEXT,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (instance_id, seq)
);
CREATE INDEX tasks_due ON tasks(due_at);
CREATE TABLE timers (
    instance_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    generation  INTEGER NOT NULL,
    fire_at     INTEGER NOT NULL,
    PRIMARY KEY (instance_id, seq)
);
CREATE INDEX timers_due ON timers(fire_at);
"#,
    r#"
ALTER TABLE tasks ADD COLUMN claimed_at INTEGER;
CREATE TABLE attempts (
    instance_id TEXT NOT NULL,
    generation  INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    ended_at    INTEGER NOT NULL,
    outcome     TEXT NOT NULL,
    error       TEXT,
    PRIMARY KEY (instance_id, generation, seq, attempt)
) WITHOUT ROWID;
"#,
    r#"
-- Ids of messages delivered with a dedupe key (signal ids, cancel): kept after the message left
-- the inbox, so that a resend is refused however late it comes.
CREATE TABLE delivered (
    instance_id TEXT NOT NULL,
    dedupe      TEXT NOT NULL,
    PRIMARY KEY (instance_id, dedupe)
) WITHOUT ROWID;
"#,
    r#"
-- Version 4 changes no table: from it on, an `activity_scheduled` body may leave out its retry
-- policy when it is the standard one (see docs/history-format.md, version 2). Marking the store
-- makes a build that would misread such bodies refuse the file instead of stopping instances.
SELECT 1;
"#,
    r#"
-- Version 5: an instance's held slot. The one activity call an activation claims for itself
-- (the sequential step) is kept on the instance row, which every step writes anyway, instead
-- of as a `tasks` row: seq, lease owner and expiry, start of its first attempt, and the history
-- position of its `activity_scheduled` event (where its name, input and retry policy are). It
-- stands for exactly the `tasks` row it replaces, and becomes that row whenever anything but
-- the sequential step needs it (lease expired, released or reaped, a retry). A sequential step
-- writes two B-trees fewer (three pages: instance, held index, history).
ALTER TABLE instances ADD COLUMN held_seq INTEGER;
ALTER TABLE instances ADD COLUMN held_pos INTEGER;
ALTER TABLE instances ADD COLUMN held_owner TEXT;
ALTER TABLE instances ADD COLUMN held_until INTEGER NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN held_at INTEGER;
CREATE INDEX instances_held ON instances(held_owner) WHERE held_owner IS NOT NULL;
"#,
    r#"
-- Version 6: the history table in the order it is written. Keyed by (instance_id, pos), as
-- it was, every step of every running instance wrote into its own instance's leaf page, so a
-- group commit of N steps wrote about N pages to the WAL (and checkpointed them again). As a
-- rowid table its rows are appended at its end, and only the narrow index entries go to each
-- instance's place: a commit writes a few table pages and a few index pages (W1: +20 %). One
-- instance's rows still sit together (its steps come in order), so reading a history costs
-- the same. Same columns and constraint; older builds refuse the file (newer schema).
CREATE TABLE events_v6 (
    instance_id TEXT NOT NULL,
    pos         INTEGER NOT NULL,
    activation  INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    recorded_at INTEGER NOT NULL,
    body        TEXT NOT NULL
);
INSERT INTO events_v6 (instance_id, pos, activation, kind, recorded_at, body)
    SELECT instance_id, pos, activation, kind, recorded_at, body FROM events
    ORDER BY instance_id, pos;
DROP TABLE events;
ALTER TABLE events_v6 RENAME TO events;
CREATE UNIQUE INDEX events_at ON events(instance_id, pos);
"#,
    r#"
-- Version 7: one history row per activation. A row holds `len` consecutive events from `pos`
-- on, all of one activation and time, their bodies joined by a newline (compact JSON has no
-- raw newline) and their kinds by a comma. A sequential step (an outcome and the next call)
-- is one row and one index entry instead of two (W1: 12 % fewer writer instructions). Rows
-- written before hold one event each (`len` 1). Older builds refuse the file (newer schema):
-- they would read a row of several events as one.
ALTER TABLE events ADD COLUMN len INTEGER NOT NULL DEFAULT 1;
"#,
    r#"
-- Version 8: the children of an instance, found by their parent. A run that continues as new
-- detaches the children it left running (they run on; their end no longer goes to the new
-- run, which would take it for its own child at the same position). Only an index: older
-- builds could use the file as it is, but refuse it as newer, as for every version.
CREATE INDEX IF NOT EXISTS instances_parent ON instances(parent_id) WHERE parent_id IS NOT NULL;
"#,
    r#"
-- Version 9 changes no table: from it on, an instance row may lag behind its history while
-- the worker holding its call takes sequential steps (a held chain, see
-- runtime/src/store/held_chain.rs). The history rows past `next_pos` then say where the
-- instance is: its position, activation and last change, and the call in its held slot (the
-- one `activity_scheduled` of the last row). Older builds would read such a row as it stands
-- and hand on a call that already completed; marking the store makes them refuse the file.
SELECT 1;
"#,
    r#"
-- Version 10: instances get an integer key (`key INTEGER PRIMARY KEY`, the rowid they had),
-- and history rows name their instance by it. The history index's entries were led by the
-- text id: they were compared as text at every step, and their width set how many of the
-- index's pages every group commit rewrote (about half of W1's commit frames). A declared
-- key also keeps rowids through VACUUM. Same columns otherwise; older builds refuse the file.
CREATE TABLE instances_v10 (
    key             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    coordinator     TEXT NOT NULL,
    status          TEXT NOT NULL,
    input           TEXT NOT NULL,
    output          TEXT,
    error           TEXT,
    reason          TEXT,
    custom_status   TEXT,
    parent_id       TEXT,
    parent_seq      INTEGER,
    generation      INTEGER NOT NULL DEFAULT 0,
    next_pos        INTEGER NOT NULL DEFAULT 0,
    next_activation INTEGER NOT NULL DEFAULT 0,
    ready           INTEGER NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until     INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    ended_at        INTEGER,
    held_seq        INTEGER,
    held_pos        INTEGER,
    held_owner      TEXT,
    held_until      INTEGER NOT NULL DEFAULT 0,
    held_at         INTEGER
);
INSERT INTO instances_v10 (key, id, coordinator, status, input, output, error, reason,
        custom_status, parent_id, parent_seq, generation, next_pos, next_activation, ready,
        lease_owner, lease_until, created_at, updated_at, ended_at, held_seq, held_pos,
        held_owner, held_until, held_at)
    SELECT rowid, id, coordinator, status, input, output, error, reason, custom_status,
        parent_id, parent_seq, generation, next_pos, next_activation, ready, lease_owner,
        lease_until, created_at, updated_at, ended_at, held_seq, held_pos, held_owner,
        held_until, held_at
    FROM instances;
CREATE TABLE events_v10 (
    instance_key INTEGER NOT NULL,
    pos          INTEGER NOT NULL,
    activation   INTEGER NOT NULL,
    kind         TEXT NOT NULL,
    recorded_at  INTEGER NOT NULL,
    body         TEXT NOT NULL,
    len          INTEGER NOT NULL DEFAULT 1
);
INSERT INTO events_v10 (instance_key, pos, activation, kind, recorded_at, body, len)
    SELECT i.key, e.pos, e.activation, e.kind, e.recorded_at, e.body, e.len
    FROM events e JOIN instances_v10 i ON i.id = e.instance_id
    ORDER BY e.rowid;
DROP TABLE events;
DROP TABLE instances;
ALTER TABLE instances_v10 RENAME TO instances;
ALTER TABLE events_v10 RENAME TO events;
CREATE UNIQUE INDEX events_at ON events(instance_key, pos);
CREATE INDEX instances_ready ON instances(lease_until) WHERE ready = 1 AND status = 'running';
CREATE INDEX instances_status ON instances(status, created_at);
CREATE INDEX instances_held ON instances(held_owner) WHERE held_owner IS NOT NULL;
CREATE INDEX instances_parent ON instances(parent_id) WHERE parent_id IS NOT NULL;
"#,
    r#"
-- Version 11: no index on (status, created_at). No query used it (listing scans the table
-- and sorts, and finds the filter's rows as it goes), but every creation and every end kept
-- it up to date (W1: 6 % of the writer's instructions); left to itself, the planner also
-- walked it over every running instance to find the ready ones. Processes of version 10
-- that already run go on with the file: nothing they read or write depends on the index (one
-- started after the upgrade refuses the file as newer, as for every version).
DROP INDEX IF EXISTS instances_status;
"#,
];

/// How hard each commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: a commit survives power loss once acknowledged. The default.
    #[default]
    Full,
    /// `synchronous=NORMAL`: in WAL mode, the last commits before a power loss (not a process
    /// crash) may be lost; a process crash loses nothing. Faster on slow disks.
    Normal,
}

impl Durability {
    fn pragma(self) -> &'static str {
        match self {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        }
    }
}

/// Options of [`SqliteStore::open_with`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// How hard each commit waits for the disk.
    pub durability: Durability,
    /// How long an operation waits for a lock held by another process.
    pub busy_timeout: Duration,
    /// A cap on the file size in pages (`PRAGMA max_page_count`), to bound disk use.
    pub max_page_count: Option<u64>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            durability: Durability::Full,
            busy_timeout: BUSY_TIMEOUT,
            max_page_count: None,
        }
    }
}

/// A store operation for the writer thread. It runs inside the batch's transaction, possibly
/// more than once (see `writer_loop`: a batch in which an operation fails is rolled back and run
/// again with a savepoint per operation), so it must read and write only the database. Its
/// caller is answered once the batch is decided.
trait Operation: Send {
    /// Runs the operation; returns whether it succeeded. Keeps the outcome of the last run.
    fn run(&mut self, conn: &Tx<'_>) -> bool;
    /// Answers the caller: the outcome of the last run if the transaction committed (or of a
    /// failed run, which was undone), otherwise `commit`'s error.
    fn answer(self: Box<Self>, commit: Result<(), StoreError>);
    /// Whether it may run more than once (a batch with one that may not is run with savepoints
    /// from the start).
    fn reruns(&self) -> bool {
        true
    }
}

/// An [`Operation`] from a closure and the channel its caller waits on.
struct Op<R, F> {
    f: F,
    /// False for a closure that can run only once (see [`SqliteStore::read`]).
    reruns: bool,
    outcome: Option<Result<R, StoreError>>,
    /// Where the answered operation goes back, box and all: the caller frees it and what its
    /// closure owns (a whole activation), not the writer thread. Memory freed by another thread
    /// than the one that allocated it goes through the allocator's lock on that thread's arena,
    /// which the allocating thread contends for (W1: +15 % steps/s for the closure's contents).
    reply: Option<oneshot::Sender<Box<Op<R, F>>>>,
}

impl<R, F> Operation for Op<R, F>
where
    R: Send,
    F: FnMut(&Tx<'_>) -> Result<R, StoreError> + Send,
{
    fn run(&mut self, conn: &Tx<'_>) -> bool {
        let outcome = (self.f)(conn);
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn answer(mut self: Box<Self>, commit: Result<(), StoreError>) {
        let answer = match (commit, self.outcome.take()) {
            (Ok(()), Some(outcome)) => outcome,
            (Ok(()), None) => Err(StoreError::Closed),
            (Err(e), _) => Err(e),
        };
        self.outcome = Some(answer);
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(self);
        }
    }

    fn reruns(&self) -> bool {
        self.reruns
    }
}

type Job = Box<dyn Operation>;

/// The last [`ENDED_REMEMBERED_MAX`] instances that ended through one store handle.
#[derive(Default)]
struct EndedInstances {
    infos: HashMap<String, InstanceInfo>,
    order: std::collections::VecDeque<String>,
}

impl EndedInstances {
    fn remember(&mut self, info: InstanceInfo) {
        if self.order.len() >= ENDED_REMEMBERED_MAX {
            if let Some(oldest) = self.order.pop_front() {
                self.infos.remove(&oldest);
            }
        }
        self.order.push_back(info.id.clone());
        self.infos.insert(info.id.clone(), info);
    }
}

/// The final row of an instance that ended, boxed: the writer's answers carry it through
/// several moves, nearly always as `None` (an inline row made every answer 400 bytes, copied
/// three times on the writer thread per operation).
type EndedRow = Option<Box<InstanceInfo>>;

/// The instance row of `c`'s instance, read in `c`'s transaction, if `c` ended it for good (not
/// by continuing as new).
fn ended_info(conn: &Tx<'_>, c: &ActivationCommit) -> Result<EndedRow, StoreError> {
    match &c.end {
        None | Some(RunEnd::ContinueAsNew(_)) => Ok(None),
        Some(_) => Ok(get_instance(conn, &c.instance_id)?
            .filter(|i| i.status.is_final())
            .map(Box::new)),
    }
}

/// The one write connection, and how many operations wait in the writer's queue. Whoever holds
/// the lock runs a batch: the writer thread for what is queued, or a caller committing its own
/// operation directly when nothing is queued and nobody writes (see [`SqliteStore::submit`]).
struct WriteConnection {
    conn: Mutex<Connection>,
    queued: std::sync::atomic::AtomicUsize,
    /// What the connection knows of the instances whose steps write their history row only.
    chains: Arc<HeldChains>,
    /// Checkpoints the WAL off the writer's path (`store/checkpoint.rs`); `None`: SQLite's
    /// automatic checkpoint does it in the commit (in memory, or a tool's look at a file).
    checkpointer: Option<Checkpointer>,
}

impl WriteConnection {
    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection, if nothing is queued and nobody holds it.
    fn try_idle(&self) -> Option<std::sync::MutexGuard<'_, Connection>> {
        if self.queued.load(std::sync::atomic::Ordering::Acquire) != 0 {
            return None;
        }
        match self.conn.try_lock() {
            Ok(guard) => Some(guard),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    path: String,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    /// The write connection, shared by the writer thread and callers that commit directly.
    writer_conn: Arc<WriteConnection>,
    readers: Option<Arc<Mutex<Vec<Connection>>>>,
    reader_path: PathBuf,
    options: SqliteOptions,
    changes: watch::Sender<u64>,
    /// Bumped by the changes that may have made an instance ready (not by ends alone).
    ready: watch::Sender<u64>,
    /// Instances that ended through this store handle, as committed: a waiting client reads
    /// the end of an instance from here instead of from the file (it never changes again).
    ended: Mutex<EndedInstances>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Lock files of the workers of this process, held (flock) for as long as they live.
    worker_locks: Mutex<HashMap<String, std::fs::File>>,
    /// Reads running at once. Without a bound, a burst of activations (10,000 instances
    /// started together) makes the blocking pool start hundreds of threads, each with its own
    /// reader connection and page cache: tens of MiB for nothing, since 2 cores serve them.
    read_slots: Arc<tokio::sync::Semaphore>,
    /// When to look for expired held calls next.
    held_scan: Arc<HeldScan>,
    /// Instances someone asked about before they ended (see [`Watched`]).
    watched: Watched,
}

/// Instances `describe`d while running: when one ends on the held-chain path, its final row is
/// read in the ending transaction and kept in [`EndedInstances`], so that the waiting client
/// finds it in memory; an end nobody asked about skips that read (a point read, about a fifth
/// of the end's cost). An id leaves the set when its end is remembered or it is terminated;
/// one a `describe` adds just after its end stays until the set, past [`WATCHED_MAX`], starts
/// over. A waiter the set forgot reads the row from the file instead, as it does for an
/// instance that ended before it asked: the set only saves reads.
#[derive(Default)]
struct Watched {
    ids: Mutex<foldhash::HashSet<String>>,
}

/// See [`Watched`].
const WATCHED_MAX: usize = 65_536;

impl Watched {
    fn lock(&self) -> std::sync::MutexGuard<'_, foldhash::HashSet<String>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn watch(&self, id: &str) {
        let mut ids = self.lock();
        if ids.len() >= WATCHED_MAX {
            ids.clear();
        }
        if !ids.contains(id) {
            ids.insert(id.to_string());
        }
    }

    fn is(&self, id: &str) -> bool {
        self.lock().contains(id)
    }

    fn forget(&self, id: &str) {
        self.lock().remove(id);
    }
}

/// How often `claim_tasks` looks for held calls whose lease ran out: at most every
/// [`HELD_EXPIRY_SCAN_INTERVAL`], or every half of the shortest lease a commit of this handle
/// asked for, if shorter (the scan reads every held call, and workers claim at every poll).
#[derive(Debug)]
struct HeldScan {
    last_ms: std::sync::atomic::AtomicU64,
    shortest_lease_ms: std::sync::atomic::AtomicU64,
}

impl Default for HeldScan {
    fn default() -> Self {
        HeldScan {
            last_ms: std::sync::atomic::AtomicU64::new(0),
            shortest_lease_ms: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }
}

impl HeldScan {
    /// Notes the lease a commit gave the call it may have put in a held slot.
    fn note_lease(&self, lease_ms: u64) {
        self.shortest_lease_ms
            .fetch_min(lease_ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a scan is due at `now_ms`; if so, it counts as done from then on.
    fn due(&self, now_ms: u64) -> bool {
        let interval = (HELD_EXPIRY_SCAN_INTERVAL.as_millis() as u64).min(
            self.shortest_lease_ms
                .load(std::sync::atomic::Ordering::Relaxed)
                / 2,
        );
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        now_ms.saturating_sub(last) >= interval
            && self
                .last_ms
                .compare_exchange(
                    last,
                    now_ms,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn map_err(operation: &str, path_or_instance: &str, e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(code, msg) = &e {
        let detail = msg.clone().unwrap_or_else(|| code.to_string());
        return match code.code {
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => StoreError::Busy {
                operation: operation.to_string(),
                detail,
            },
            ErrorCode::DiskFull => StoreError::Full {
                operation: operation.to_string(),
                detail,
            },
            ErrorCode::NotADatabase => StoreError::NotARetraceStore {
                path: path_or_instance.to_string(),
                detail: "not an SQLite database".to_string(),
            },
            _ => StoreError::Database {
                operation: operation.to_string(),
                detail,
            },
        };
    }
    StoreError::Database {
        operation: operation.to_string(),
        detail: e.to_string(),
    }
}

pub(crate) fn db(operation: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| map_err(operation, "", e)
}

fn configure(conn: &Connection, options: &SqliteOptions, path: &str) -> Result<(), StoreError> {
    let err = |e| map_err("configure connection", path, e);
    conn.busy_timeout(options.busy_timeout).map_err(err)?;
    conn.pragma_update(None, "synchronous", options.durability.pragma())
        .map_err(err)?;
    // Savepoint (per-operation) journals in memory rather than in a temporary file: each group
    // commit wraps every operation in a savepoint, and writing those journals through the file
    // system cost about 15% of the writer's time (W1 profile). Durability is unchanged: they
    // only serve to roll one operation back inside the open transaction.
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(err)?;
    // The query planner's stability guarantee: plans never depend on bound values. Without
    // it, SQLite reads a value bound to a parameter the plan could use (a `LIMIT`, a term
    // matching a partial index's condition), and binding it again (at every run) makes it
    // prepare the statement anew: the polled claims and timers were re-prepared at every poll,
    // ~160,000 instructions each.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(err)?;
    // The store uses a few dozen distinct statements; rusqlite caches 16 by default, so they
    // kept evicting each other and being parsed again (5% of the writer's time in W1).
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    if let Some(pages) = options.max_page_count {
        conn.pragma_update(None, "max_page_count", pages as i64)
            .map_err(err)?;
    }
    Ok(())
}

/// The store's write connection to `path`. With [`Durability::Full`], its WAL writes are
/// gathered into one write per commit (`store/wal_writes.rs`: W1, ~5 % more steps a second);
/// with `Normal`, on SQLite's default VFS, as every other connection of the store.
fn open_writer(path: &Path, options: &SqliteOptions) -> rusqlite::Result<Connection> {
    match super::wal_writes::vfs() {
        Some(vfs) if options.durability == Durability::Full => {
            Connection::open_with_flags_and_vfs(path, rusqlite::OpenFlags::default(), vfs)
        }
        _ => Connection::open(path),
    }
}

/// A further connection to the store's file (a reader, the checkpointer's), configured as
/// every connection of the store is.
fn open_configured(
    path: &Path,
    options: &SqliteOptions,
    operation: &str,
) -> Result<Connection, StoreError> {
    let display = path.display().to_string();
    let conn = Connection::open(path).map_err(|e| map_err(operation, &display, e))?;
    configure(&conn, options, &display)?;
    Ok(conn)
}

/// Checks the file's identity and schema (reading only: a refused file is left as it was), then
/// creates or migrates it as needed.
fn prepare_schema(conn: &Connection, path: &str) -> Result<(), StoreError> {
    let version = check_schema(conn, path)?;
    migrate_schema(conn, path, version)
}

/// Reads the file's identity and schema version; refuses another program's file or a newer
/// schema. Writes nothing.
pub(crate) fn check_schema(conn: &Connection, path: &str) -> Result<i64, StoreError> {
    let err = |e| map_err("open store", path, e);
    let app_id: i64 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .map_err(err)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .map_err(err)?;
    if app_id != APPLICATION_ID {
        if app_id != 0 || tables != 0 {
            return Err(StoreError::NotARetraceStore {
                path: path.to_string(),
                detail: format!(
                    "application_id {app_id:#x} and {tables} table(s) of another program"
                ),
            });
        }
    } else if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_string(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(version)
}

/// Brings a checked file from `version` to [`SCHEMA_VERSION`], in one transaction.
fn migrate_schema(conn: &Connection, path: &str, version: i64) -> Result<(), StoreError> {
    let err = |e| map_err("open store", path, e);
    if version < SCHEMA_VERSION {
        conn.execute_batch("BEGIN IMMEDIATE").map_err(err)?;
        // Another process may have migrated the file since it was checked: check again under
        // the write lock.
        let version = match check_schema(conn, path) {
            Ok(v) if v >= SCHEMA_VERSION => {
                conn.execute_batch("COMMIT").map_err(err)?;
                return Ok(());
            }
            Ok(v) => v,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e);
            }
        };
        let migrate = || -> Result<(), rusqlite::Error> {
            for (from, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                conn.execute_batch(sql)?;
                conn.pragma_update(None, "user_version", from as i64 + 1)?;
            }
            conn.pragma_update(None, "application_id", APPLICATION_ID)?;
            Ok(())
        };
        match migrate() {
            Ok(()) => conn.execute_batch("COMMIT").map_err(err)?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(map_err("migrate schema", path, e));
            }
        }
    }
    Ok(())
}

/// Upgrading a store from below this schema version is refused while a worker of another
/// process (an older build) uses it: such a build must not go on with the upgraded store.
/// Version 5 keeps a claimed call in its instance's held slot, which an older build knows
/// nothing of; version 7 writes history rows of several events, which an older build would
/// read as one undecodable event and stop the instance for; version 9 lets an instance row lag
/// behind its history (held chains), which an older build would read as it stands and hand on
/// a call that already completed; version 10 names history rows' instances by a key an older
/// build does not know. (Version 11 only drops an index: processes of version 10 that already
/// run go on as before; one started after the upgrade refuses the file, as for every version.)
const UPGRADE_WITHOUT_OLDER_WORKERS: i64 = 10;

/// How many workers of other processes use the store at `path` now: lock files beside it
/// (`PATH.workers/*.lock`) that someone holds. A worker holds its file for as long as it runs,
/// idle or not, whatever its leases.
pub(crate) fn live_workers(path: &Path) -> usize {
    let mut dir = path.as_os_str().to_owned();
    dir.push(".workers");
    let Ok(entries) = std::fs::read_dir(PathBuf::from(dir)) else {
        return 0;
    };
    let mut live = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("lock") {
            continue;
        }
        if let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            if file.try_lock().is_err() {
                live += 1;
            }
        }
    }
    live
}

/// Refuses (without changing anything) while a worker of another process holds its lock file
/// beside the store: upgrading the store under a running older build would let that build end
/// instances without dropping their held calls, or miss them when its workers die.
fn refuse_while_workers_live(path: &Path, display: &str) -> Result<(), StoreError> {
    let live = live_workers(path);
    if live > 0 {
        return Err(StoreError::Busy {
            operation: "upgrade store schema".into(),
            detail: format!(
                "{display} is used by {live} running worker(s) of an older Retrace: stop every \
                 process using the store before this version upgrades it (schema {SCHEMA_VERSION})"
            ),
        });
    }
    Ok(())
}

/// WAL frames a store's WAL file is made room for at open: the WAL restarts once a checkpoint
/// has copied all of it, which the checkpointer starts at 1,000 frames and the writer makes
/// sure of at [`CHECKPOINT_INLINE_FRAMES`] (`store/checkpoint.rs`), so that is about how long
/// the file gets under a steady load; a margin covers the batch that crosses it.
const WAL_PRESIZE_FRAMES: u64 = CHECKPOINT_INLINE_FRAMES as u64 + 100;

/// Extends the WAL file, with zeros, to the length it reaches in steady state, so that the
/// first commits after opening overwrite blocks the file already has, as all later ones do:
/// a commit that extends the file makes its fsync write file-system metadata too (on this
/// project's machine, commits were ~30% slower until the WAL first wrapped, 1,000 frames after
/// each open: W2 measured it). Done under the write lock (`BEGIN IMMEDIATE`) and beyond the
/// current end only, so no frame of any connection is there. SQLite reads a WAL only up to its
/// last valid frame (a frame carries the WAL's salt and a running checksum), so the zeros
/// are ignored as the stale frames left past the end after each restart of the WAL are.
/// Best effort: when it cannot be done (busy, disk full), the store works as without it.
fn presize_wal(conn: &Connection, path: &Path) {
    let result = (|| -> Result<(), String> {
        let page_size: i64 = conn
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .map_err(|e| e.to_string())?;
        let want = 32 + WAL_PRESIZE_FRAMES * (24 + page_size.max(512) as u64);
        conn.execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| e.to_string())?;
        let extended = (|| -> std::io::Result<()> {
            let mut wal = path.as_os_str().to_owned();
            wal.push("-wal");
            // Only a WAL SQLite made: never create one.
            let file = std::fs::OpenOptions::new().write(true).open(&wal)?;
            let len = file.metadata()?.len();
            if len >= want {
                return Ok(());
            }
            let zeros = vec![0u8; 256 * 1024];
            let mut at = len;
            while at < want {
                let n = (want - at).min(zeros.len() as u64) as usize;
                std::os::unix::fs::FileExt::write_all_at(&file, &zeros[..n], at)?;
                at += n as u64;
            }
            file.sync_data()
        })();
        let _ = conn.execute_batch("COMMIT");
        extended.map_err(|e| e.to_string())
    })();
    if let Err(e) = result {
        tracing::debug!(path = %path.display(), error = %e, "WAL file not extended ahead");
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` with default options.
    ///
    /// # Errors
    /// [`StoreError::NotARetraceStore`], [`StoreError::NewerSchema`], or a database error.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, SqliteOptions::default())
    }

    /// Opens (creating if needed) the store at `path`.
    ///
    /// # Errors
    /// [`StoreError::NotARetraceStore`], [`StoreError::NewerSchema`], or a database error.
    pub fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        Self::open_prepared(path.as_ref(), options, true)
    }

    /// [`SqliteStore::open_with`]; `presize`: make room for the WAL (for stores that will take
    /// commits, not for a tool's look at one).
    fn open_prepared(
        path_ref: &Path,
        options: SqliteOptions,
        presize: bool,
    ) -> Result<Self, StoreError> {
        let display = path_ref.display().to_string();
        let conn =
            open_writer(path_ref, &options).map_err(|e| map_err("open store", &display, e))?;
        conn.busy_timeout(options.busy_timeout)
            .map_err(|e| map_err("open store", &display, e))?;
        // Identify the file before changing anything in it (WAL mode rewrites the header).
        let version = check_schema(&conn, &display)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(|e| map_err("open store", &display, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Database {
                operation: "open store".into(),
                detail: format!("{display}: could not enable WAL (journal_mode is {mode})"),
            });
        }
        configure(&conn, &options, &display)?;
        if (1..UPGRADE_WITHOUT_OLDER_WORKERS).contains(&version) {
            refuse_while_workers_live(path_ref, &display)?;
        }
        migrate_schema(&conn, &display, version)?;
        let checkpointer = if presize {
            presize_wal(&conn, path_ref);
            start_checkpointer(&conn, path_ref, &options)
        } else {
            None
        };
        Ok(Self::start(
            display,
            path_ref.to_path_buf(),
            conn,
            Some(Arc::default()),
            options,
            checkpointer,
        ))
    }

    /// An in-memory store (nothing is durable), for examples and tests. Reads and writes share
    /// one connection.
    ///
    /// # Errors
    /// A database error.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let conn = Connection::open_in_memory().map_err(db("open in-memory store"))?;
        let options = SqliteOptions::default();
        configure(&conn, &options, ":memory:")?;
        prepare_schema(&conn, ":memory:")?;
        Ok(Self::start(
            ":memory:".into(),
            PathBuf::new(),
            conn,
            None,
            options,
            None,
        ))
    }

    fn start(
        path: String,
        reader_path: PathBuf,
        conn: Connection,
        readers: Option<Arc<Mutex<Vec<Connection>>>>,
        options: SqliteOptions,
        checkpointer: Option<Checkpointer>,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let chains = Arc::new(HeldChains::default());
        HeldChains::watch(&chains, &conn);
        let writer_conn = Arc::new(WriteConnection {
            conn: Mutex::new(conn),
            queued: std::sync::atomic::AtomicUsize::new(0),
            chains,
            checkpointer,
        });
        let shared = Arc::clone(&writer_conn);
        let writer = std::thread::Builder::new()
            .name("retrace-sqlite-writer".into())
            .spawn(move || writer_loop(&shared, rx))
            .ok();
        let (changes, _) = watch::channel(0);
        let (ready, _) = watch::channel(0);
        SqliteStore {
            path,
            jobs: Mutex::new(Some(tx)),
            writer_conn,
            readers,
            reader_path,
            options,
            changes,
            ready,
            ended: Mutex::default(),
            writer: Mutex::new(writer),
            worker_locks: Mutex::new(HashMap::new()),
            read_slots: Arc::new(tokio::sync::Semaphore::new(READERS_MAX)),
            held_scan: Arc::default(),
            watched: Watched::default(),
        }
    }

    /// The file this store uses.
    pub fn path(&self) -> &str {
        &self.path
    }

    fn bump(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
        self.ready.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Keeps the committed row of an instance that just ended (before waiters are woken).
    fn remember_ended(&self, info: EndedRow) {
        if let Some(info) = info {
            self.watched.forget(&info.id);
            self.ended
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remember(*info);
        }
    }

    /// For a commit that ended an instance (waiters see it) and made none ready (workers need
    /// not look for work; a parent notified of the end is in `woken`).
    fn bump_ended(&self, woken: &[String]) {
        if woken.is_empty() {
            self.changes.send_modify(|v| *v = v.wrapping_add(1));
        } else {
            self.bump();
        }
    }

    /// Runs `f` in the writer's next group-commit transaction; answers after the commit. `f`
    /// may run more than once (only the last run counts), so it must touch only the database.
    fn write<R, F>(&self, f: F) -> impl Future<Output = Result<R, StoreError>> + Send + '_
    where
        R: Send + 'static,
        F: FnMut(&Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    {
        self.submit(f, true)
    }

    /// Runs `f` in a group-commit transaction and waits for its answer. Usually `f` goes to the
    /// writer thread's queue. When nothing is queued and the writer is idle (a lone sequential
    /// instance), the caller commits `f` itself, on its own thread (see `commit_directly`): the
    /// answer then needs no hand-off between threads, two thread wake-ups less per step. Only
    /// on tokio's multi-threaded runtime, whose other workers go on with other tasks meanwhile.
    ///
    /// Not an `async fn`: `f` is boxed before the future is made, so that the future holds a
    /// pointer to it instead of `f` itself, once per nested `async fn` (the caller's future is
    /// boxed by `async_trait`, and its size decides which of the allocator's paths serves it).
    fn submit<R, F>(
        &self,
        f: F,
        reruns: bool,
    ) -> impl Future<Output = Result<R, StoreError>> + Send + '_
    where
        R: Send + 'static,
        F: FnMut(&Tx<'_>) -> Result<R, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel::<Box<Op<R, F>>>();
        let job: Job = Box::new(Op {
            f,
            reruns,
            outcome: None,
            reply: Some(reply),
        });
        async move {
            let answered = |op: Result<Box<Op<R, F>>, _>| {
                op.map_err(|_| StoreError::Closed)?
                    .outcome
                    .take()
                    .unwrap_or(Err(StoreError::Closed))
            };
            let job = match self.commit_directly(job) {
                Ok(()) => return answered(answer.await),
                Err(job) => job,
            };
            {
                let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
                let sender = jobs.as_ref().ok_or(StoreError::Closed)?;
                self.writer_conn
                    .queued
                    .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                if sender.send(job).is_err() {
                    self.writer_conn
                        .queued
                        .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
                    return Err(StoreError::Closed);
                }
            }
            answered(answer.await)
        }
    }

    /// Runs `job` as a batch of its own on the caller's thread, if the writer is idle with
    /// nothing queued, the store is open, and the caller is on a multi-threaded tokio runtime;
    /// otherwise hands `job` back.
    ///
    /// With two workers or more, the caller's worker thread simply waits for the commit: the
    /// write connection's lock lets one caller at a time commit directly, so at most one worker
    /// waits, for one commit (a checkpoint included, when one is due), while the others go on
    /// and can take over its queued tasks. `block_in_place`, which hands the worker's place to
    /// another thread first and takes it back after, made a sequential step ~12 % slower on
    /// this project's machine (W2); it stays for a runtime of one worker, which must not stop.
    fn commit_directly(&self, job: Job) -> Result<(), Job> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(job);
        };
        if runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return Err(job);
        }
        // Closed: the queue answers that.
        if self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
        {
            return Err(job);
        }
        let Some(conn) = self.writer_conn.try_idle() else {
            return Err(job);
        };
        // The write lock without waiting for it: when another connection (another process,
        // the CLI) holds it, the writer thread waits for it, not this worker.
        let begun = conn
            .busy_timeout(Duration::ZERO)
            .and_then(|()| run_cached(&conn, "BEGIN IMMEDIATE"));
        if let Err(e) = conn.busy_timeout(self.options.busy_timeout) {
            tracing::warn!(error = %e, "could not restore the busy timeout");
        }
        if begun.is_err() {
            // Nothing begun: the writer thread tries (and reports a lasting error).
            return Err(job);
        }
        let mut batch = vec![job];
        let chains = &self.writer_conn.chains;
        if runtime.metrics().num_workers() >= 2 {
            run_begun_batch(&conn, chains, &mut batch);
        } else {
            tokio::task::block_in_place(|| run_begun_batch(&conn, chains, &mut batch));
        }
        checkpoint_if_due(&self.writer_conn, &conn);
        Ok(())
    }

    /// Runs `f` on a reader connection (or on the writer, for an in-memory store).
    async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let Some(pool) = &self.readers else {
            // In memory, reads go through the writer; this closure can run only once.
            let mut f = Some(f);
            let once = move |conn: &Tx<'_>| match f.take() {
                Some(f) => f(conn),
                None => Err(StoreError::Closed),
            };
            return self.submit(once, false).await;
        };
        let pool = Arc::clone(pool);
        let path = self.reader_path.clone();
        let options = self.options.clone();
        let slot = Arc::clone(&self.read_slots)
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let conn = pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match conn {
                Some(c) => c,
                None => open_configured(&path, &options, "open reader")?,
            };
            let result = f(&conn);
            // A reader left inside a transaction by an error would pin an old snapshot.
            if conn.is_autocommit() {
                pool.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Database {
            operation: "read".into(),
            detail: e.to_string(),
        })?
    }

    /// The folder of worker lock files, beside the database (`PATH.workers`); `None` in memory.
    fn workers_dir(&self) -> Option<PathBuf> {
        self.readers.as_ref()?;
        let mut dir = self.reader_path.clone().into_os_string();
        dir.push(".workers");
        Some(PathBuf::from(dir))
    }

    /// Stops the writer thread after the operations already queued.
    pub fn close(&self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = handle.join();
        }
        if let Some(checkpointer) = &self.writer_conn.checkpointer {
            checkpointer.close();
        }
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

fn writer_loop(shared: &WriteConnection, rx: mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(GROUP_COMMIT_MAX);
    while let Some(first) = next_job(&rx) {
        batch.push(first);
        while batch.len() < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // Counted as queued until the writer holds the connection: a batch waiting for the lock
        // keeps callers from committing directly ahead of it, again and again.
        let conn = shared.lock();
        shared
            .queued
            .fetch_sub(batch.len(), std::sync::atomic::Ordering::AcqRel);
        run_batch(&conn, &shared.chains, &mut batch);
        checkpoint_if_due(shared, &conn);
    }
}

/// After a batch committed on `conn`: once the WAL is [`CHECKPOINT_FRAMES`] long, asks the
/// checkpointer to copy it into the database; checkpoints here, as SQLite's automatic
/// checkpoint would have, when the checkpointer is gone or the WAL has grown to
/// [`CHECKPOINT_INLINE_FRAMES`] regardless (interrupting the checkpointer's checkpoint, whose
/// lock this one needs).
fn checkpoint_if_due(shared: &WriteConnection, conn: &Connection) {
    let Some(checkpointer) = &shared.checkpointer else {
        return;
    };
    let frames = take_wal_frames();
    if frames < CHECKPOINT_FRAMES {
        return;
    }
    let inline = if frames >= CHECKPOINT_INLINE_FRAMES {
        // The checkpointer is behind: its checkpoint, if it runs one, holds the lock.
        checkpointer.interrupt();
        true
    } else {
        !checkpointer.request()
    };
    if inline {
        match checkpoint(conn) {
            Ok((log, copied)) if log != copied => {
                tracing::debug!(
                    frames,
                    copied,
                    "WAL checkpoint incomplete; tried again later"
                );
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(error = %e, frames, "WAL checkpoint not done; tried again later");
            }
        }
    }
}

/// Starts the checkpointer of a store's file and lets the write connection leave checkpoints
/// to it (`store/checkpoint.rs`); `None` (SQLite checkpoints in the commit, as configured) if
/// its thread cannot be started.
fn start_checkpointer(
    conn: &Connection,
    path: &Path,
    options: &SqliteOptions,
) -> Option<Checkpointer> {
    let path = path.to_path_buf();
    let options = options.clone();
    let open =
        move || open_configured(&path, &options, "open checkpointer").map_err(|e| e.to_string());
    match Checkpointer::start(open) {
        Ok(checkpointer) => {
            watch_wal(conn);
            Some(checkpointer)
        }
        Err(e) => {
            tracing::debug!(error = %e, "no checkpointer thread; SQLite checkpoints in the commit");
            None
        }
    }
}

/// Runs `batch` in one transaction and answers every operation of it (all of them, whatever
/// happens: `batch` is empty on return).
fn run_batch(conn: &Connection, chains: &Arc<HeldChains>, batch: &mut Vec<Job>) {
    if let Err(e) = run_cached(conn, "BEGIN IMMEDIATE") {
        let err = map_err("begin transaction", "", e);
        for job in batch.drain(..) {
            job.answer(Err(clone_error(&err)));
        }
        return;
    }
    run_begun_batch(conn, chains, batch);
}

/// Runs `batch` in the write transaction just begun on `conn`, commits, and answers every
/// operation of it (`batch` is empty on return).
fn run_begun_batch(conn: &Connection, chains: &Arc<HeldChains>, batch: &mut Vec<Job>) {
    let _span = tracing::trace_span!("store_commit", operations = batch.len()).entered();
    chains.begin(conn);
    // The batch's statements stay prepared at hand until it is answered (see `Tx`).
    let conn = &Tx::with_chains(conn, chains);
    // First, every operation runs as it comes, without a savepoint: when all succeed (the
    // common case), the batch commits as it is. Savepoints cost a copy of every page an
    // operation touches (13% of the writer's time in W1).
    let optimistic = batch.iter().all(|job| job.reruns());
    if optimistic {
        // The history rows the batch keeps aside go in together, last (see `deferred_rows`).
        let keeping = deferred_rows::keep(conn);
        let done = run_all(conn, batch)
            && {
                // The update hook has nothing to do for history rows, but SQLite calls it for
                // each (with rusqlite's conversions of both names: ~2 % of W1's writer).
                HeldChains::unwatch(conn);
                let flushed = deferred_rows::flush_at_commit(conn);
                HeldChains::watch(chains, conn);
                flushed.is_ok()
            }
            && !deferred_rows::failed()
            && !conn.is_autocommit();
        drop(keeping);
        if done {
            finish_batch(conn, chains, batch.drain(..));
            return;
        }
    }
    chains.undone();
    // One failed (or panicked, or SQLite gave the transaction up): undo everything and run
    // the batch again, each operation in its own savepoint, so that a failure undoes only
    // its own writes. Operations read and write only the database, so running them again
    // from the same state is safe. (A batch with an operation that may run only once goes
    // straight here.)
    if optimistic {
        if !conn.is_autocommit() {
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                let err = map_err("roll back", "", e);
                for job in batch.drain(..) {
                    job.answer(Err(clone_error(&err)));
                }
                return;
            }
        }
        if let Err(e) = run_cached(conn, "BEGIN IMMEDIATE") {
            let err = map_err("begin transaction", "", e);
            for job in batch.drain(..) {
                job.answer(Err(clone_error(&err)));
            }
            return;
        }
    }
    run_with_savepoints(conn, chains, batch);
}

/// Runs every operation of `batch` in the open transaction, without savepoints. Returns whether
/// all succeeded and the transaction is still open.
fn run_all(conn: &Tx<'_>, batch: &mut [Job]) -> bool {
    for job in batch.iter_mut() {
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(conn)));
        if !matches!(ran, Ok(true)) || conn.is_autocommit() {
            return false;
        }
    }
    true
}

/// Commits the open transaction and answers every operation with the result.
fn finish_batch(conn: &Connection, chains: &HeldChains, jobs: impl Iterator<Item = Job>) {
    match run_cached(conn, "COMMIT") {
        Ok(()) => {
            chains.committed();
            for job in jobs {
                job.answer(Ok(()));
            }
        }
        Err(e) => {
            let err = map_err("commit", "", e);
            tracing::error!(error = %err, "group commit failed; nothing of the batch was kept");
            let _ = conn.execute_batch("ROLLBACK");
            chains.undone();
            for job in jobs {
                job.answer(Err(clone_error(&err)));
            }
        }
    }
}

/// Runs every operation of `batch` in its own savepoint of the open transaction, then commits
/// what succeeded and answers every operation.
fn run_with_savepoints(conn: &Tx<'_>, chains: &HeldChains, batch: &mut Vec<Job>) {
    let mut done: Vec<Job> = Vec::with_capacity(batch.len());
    // Set when no transaction could be restarted: the rest of the batch is refused unrun.
    let mut lost: Option<StoreError> = None;
    for mut job in batch.drain(..) {
        if let Some(err) = &lost {
            job.answer(Err(clone_error(err)));
            continue;
        }
        // Cached statements: parsing these twice per operation showed in the profile.
        if let Err(e) = conn
            .prepare_cached("SAVEPOINT op")
            .and_then(|mut s| s.execute([]))
        {
            // Without its savepoint a failing operation could not be undone alone.
            job.answer(Err(map_err("savepoint", "", e)));
            continue;
        }
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run(conn)));
        if ran.is_err() && !conn.is_autocommit() {
            // A bug in an operation: undo it alone; its caller sees the store as closed for
            // that call, and the writer goes on serving the others.
            tracing::error!("a store operation panicked; its writes were undone");
            let _ = conn.execute_batch("ROLLBACK TO op; RELEASE op");
            chains.undone();
            job.answer(Err(StoreError::Closed));
            continue;
        }
        let ok = matches!(ran, Ok(true));
        if conn.is_autocommit() {
            chains.undone();
            // SQLite rolled the whole transaction back itself (a full disk, an I/O error):
            // every operation of the batch so far is undone. None of them may be acknowledged;
            // each gets the failing operation's kind of error.
            let cause = StoreError::Full {
                operation: "group commit".into(),
                detail: "the transaction was rolled back by the database (disk full or I/O \
                         error); nothing of it was kept"
                    .into(),
            };
            job.answer(Err(clone_error(&cause)));
            for earlier in done.drain(..) {
                earlier.answer(Err(clone_error(&cause)));
            }
            if let Err(e) = run_cached(conn, "BEGIN IMMEDIATE") {
                tracing::error!(error = %e, "could not restart the group-commit transaction");
                lost = Some(map_err("begin transaction", "", e));
            }
            continue;
        }
        if ok {
            let _ = conn
                .prepare_cached("RELEASE op")
                .and_then(|mut s| s.execute([]));
        } else {
            let _ = conn.execute_batch("ROLLBACK TO op; RELEASE op");
            chains.undone();
        }
        done.push(job);
    }
    if lost.is_some() {
        // No transaction is open and every operation has been answered.
        return;
    }
    finish_batch(conn, chains, done.into_iter());
}

/// The next operation, or `None` once the store is closed. An operation that follows a
/// commit within [`WRITER_SPIN`] is taken without the writer going to sleep: waking a sleeping
/// thread took as long as a tenth of a commit on this kind of virtual machine, once per
/// sequential step (W2).
fn next_job(rx: &mpsc::Receiver<Job>) -> Option<Job> {
    let until = std::time::Instant::now() + WRITER_SPIN;
    loop {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if std::time::Instant::now() < until => {
                std::thread::yield_now();
            }
            Err(mpsc::TryRecvError::Empty) => return rx.recv().ok(),
        }
    }
}

/// How long the writer looks for the next operation before it sleeps.
const WRITER_SPIN: Duration = Duration::from_micros(250);

/// Runs `sql`, a statement without parameters or rows (`BEGIN IMMEDIATE`, `COMMIT`), through
/// the connection's statement cache: `execute_batch` parses it again at every call, two parses
/// per commit, ~2,900 instructions of the ~55,000 a sequential step took (W2, callgrind).
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn clone_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Busy { operation, detail } => StoreError::Busy {
            operation: operation.clone(),
            detail: detail.clone(),
        },
        StoreError::Full { operation, detail } => StoreError::Full {
            operation: operation.clone(),
            detail: detail.clone(),
        },
        other => StoreError::Database {
            operation: "commit".into(),
            detail: other.to_string(),
        },
    }
}

/// The columns [`instance_from_row`] reads, in its order (a macro, for `concat!`).
macro_rules! instance_columns {
    () => {
        "id, coordinator, status, input, output, error, reason, custom_status, \
         parent_id, parent_seq, generation, next_pos, next_activation, created_at, updated_at, \
         ended_at"
    };
}
const INSTANCE_COLUMNS: &str = instance_columns!();

fn instance_from_row(row: &Row<'_>) -> rusqlite::Result<RawInstance> {
    Ok(RawInstance {
        id: row.get(0)?,
        coordinator: row.get(1)?,
        status: row.get(2)?,
        input: row.get(3)?,
        output: row.get(4)?,
        error: row.get(5)?,
        reason: row.get(6)?,
        custom_status: row.get(7)?,
        parent_id: row.get(8)?,
        parent_seq: row.get(9)?,
        generation: row.get(10)?,
        next_pos: row.get(11)?,
        next_activation: row.get(12)?,
        created_at: row.get(13)?,
        updated_at: row.get(14)?,
        ended_at: row.get(15)?,
    })
}

struct RawInstance {
    id: String,
    coordinator: String,
    status: String,
    input: String,
    output: Option<String>,
    error: Option<String>,
    reason: Option<String>,
    custom_status: Option<String>,
    parent_id: Option<String>,
    parent_seq: Option<i64>,
    generation: i64,
    next_pos: i64,
    next_activation: i64,
    created_at: i64,
    updated_at: i64,
    ended_at: Option<i64>,
}

impl RawInstance {
    fn decode(self) -> Result<InstanceInfo, StoreError> {
        let id = self.id;
        let status = InstanceStatus::parse(&self.status).ok_or_else(|| StoreError::Corrupt {
            instance_id: id.clone(),
            what: "status".into(),
            detail: format!("unknown status {:?}", self.status),
        })?;
        let input: Value = decode_json(&id, || "input".into(), &self.input)?;
        let output = match self.output {
            Some(t) => Some(decode_json(&id, || "output".into(), &t)?),
            None => None,
        };
        let error: Option<Error> = match self.error {
            Some(t) => Some(decode_json(&id, || "error".into(), &t)?),
            None => None,
        };
        let custom_status = match self.custom_status {
            Some(t) => Some(decode_json(&id, || "custom status".into(), &t)?),
            None => None,
        };
        let parent = match (self.parent_id, self.parent_seq) {
            (Some(instance_id), Some(seq)) => Some(ParentRef {
                instance_id,
                seq: seq as u32,
            }),
            _ => None,
        };
        Ok(InstanceInfo {
            id,
            coordinator: self.coordinator,
            status,
            input,
            output,
            error,
            reason: self.reason,
            custom_status,
            parent,
            generation: self.generation as u64,
            next_position: self.next_pos as u64,
            next_activation: self.next_activation as u32,
            created_at_ms: self.created_at as u64,
            updated_at_ms: self.updated_at as u64,
            ended_at_ms: self.ended_at.map(|v| v as u64),
        })
    }
}

fn get_instance(conn: &Connection, id: &str) -> Result<Option<InstanceInfo>, StoreError> {
    let raw = conn
        .prepare_cached(concat!(
            "SELECT ",
            instance_columns!(),
            " FROM instances WHERE id = ?1"
        ))
        .and_then(|mut s| s.query_row([id], instance_from_row).optional())
        .map_err(db("read instance"))?;
    let Some(raw) = raw else {
        return Ok(None);
    };
    let mut info = raw.decode()?;
    settle_info(conn, &mut info)?;
    Ok(Some(info))
}

fn insert_inbox(
    conn: &Tx<'_>,
    instance_id: &str,
    dedupe: Option<&str>,
    event: &Event,
    now: u64,
) -> Result<bool, StoreError> {
    let body = event_json(event)?;
    let n = conn
        .prepare_cached(
            "INSERT INTO inbox (instance_id, dedupe, body, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (instance_id, dedupe) DO NOTHING",
        )
        .and_then(|mut s| s.execute(params![instance_id, dedupe, body, now as i64]))
        .map_err(db("insert inbox message"))?;
    Ok(n > 0)
}

/// A task row taken by [`take_held_task`].
struct HeldTask {
    /// When the attempt started (`None` for a task claimed before that column existed).
    claimed_at: Option<i64>,
    /// Claimed in the commit that scheduled the call: the attempt started when the
    /// `activity_scheduled` event was recorded.
    claimed_when_scheduled: bool,
}

/// Which attempt of which call a write path finishes: all it needs of an [`ActivityTask`]
/// (not its name, input or retry policy, which would be copied for the writer thread).
#[derive(Debug, Clone, Copy)]
struct AttemptKey<'a> {
    instance_id: &'a str,
    seq: u32,
    attempt: u32,
    generation: u64,
}

/// An [`AttemptKey`] that owns its instance id, for a closure sent to the writer thread.
struct OwnedAttempt {
    instance_id: String,
    seq: u32,
    attempt: u32,
    generation: u64,
}

impl OwnedAttempt {
    fn of(task: &ActivityTask) -> Self {
        OwnedAttempt {
            instance_id: task.instance_id.clone(),
            seq: task.seq,
            attempt: task.attempt,
            generation: task.generation,
        }
    }

    fn key(&self) -> AttemptKey<'_> {
        AttemptKey {
            instance_id: &self.instance_id,
            seq: self.seq,
            attempt: self.attempt,
            generation: self.generation,
        }
    }
}

/// Deletes the task of `task`'s call if this attempt of `owner` still holds it and returns
/// what the attempt journal needs of it, or `None` when the task is gone or held by another
/// attempt.
fn take_held_task(
    conn: &Tx<'_>,
    task: AttemptKey<'_>,
    owner: &str,
) -> Result<Option<HeldTask>, StoreError> {
    // Each is read, then deleted by its key, in the same transaction: `RETURNING` would make
    // SQLite build an ephemeral table per statement, which cost more than the write itself
    // (W3, 1,000 calls finishing). The `tasks` row first: a call is in its instance's held
    // slot or in a row, never both (`expand_held` empties the slot it turns into a row), and
    // a fan-out's calls (W3) are rows, whose look into the slot would find nothing.
    let held = conn
        .prepare_cached(
            "SELECT claimed_at, claimed_at IS created_at FROM tasks
             WHERE instance_id = ?1 AND seq = ?2 AND attempt = ?3 AND lease_owner = ?4
               AND generation = ?5",
        )
        .and_then(|mut s| {
            s.query_row(
                params![
                    task.instance_id,
                    task.seq,
                    task.attempt,
                    owner,
                    task.generation as i64
                ],
                |r| {
                    Ok(HeldTask {
                        claimed_at: r.get(0)?,
                        claimed_when_scheduled: r.get(1)?,
                    })
                },
            )
            .optional()
        })
        .map_err(db("finish activity task"))?;
    if held.is_some() {
        conn.prepare_cached("DELETE FROM tasks WHERE instance_id = ?1 AND seq = ?2")
            .and_then(|mut s| s.execute(params![task.instance_id, task.seq]))
            .map_err(db("finish activity task"))?;
        return Ok(held);
    }
    if task.attempt != 1 {
        return Ok(None);
    }
    // In the instance's held slot (`held_at` is left as it was).
    let held_at: Option<Option<i64>> = conn
        .prepare_cached(
            "SELECT held_at FROM instances
             WHERE id = ?1 AND held_seq = ?2 AND held_owner = ?3 AND generation = ?4",
        )
        .and_then(|mut s| {
            s.query_row(
                params![task.instance_id, task.seq, owner, task.generation as i64],
                |r| r.get(0),
            )
            .optional()
        })
        .map_err(db("finish activity task"))?;
    let Some(held_at) = held_at else {
        return Ok(None);
    };
    conn.prepare_cached(
        "UPDATE instances SET held_seq = NULL, held_pos = NULL, held_owner = NULL,
                held_until = 0
         WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![task.instance_id]))
    .map_err(db("finish activity task"))?;
    Ok(Some(HeldTask {
        claimed_at: held_at,
        claimed_when_scheduled: true,
    }))
}

/// The one call `c` claims, as it would sit in its instance's held slot: its seq and the
/// history position of its `activity_scheduled` event. `None` unless `c` creates exactly one
/// task and claims it.
fn held_candidate(c: &ActivationCommit) -> Option<(u32, u64)> {
    let [t] = c.tasks.as_slice() else {
        return None;
    };
    if !t.claim {
        return None;
    }
    let i = c
        .events
        .iter()
        .position(|e| matches!(e, Event::ActivityScheduled { seq, .. } if *seq == t.seq))?;
    Some((t.seq, c.expected_position + i as u64))
}

/// The call in `id`'s held slot, as the `tasks` row it stands for.
pub(crate) struct HeldCall {
    pub(crate) seq: u32,
    pub(crate) generation: i64,
    pub(crate) name: String,
    /// JSON, as in `tasks.input`.
    pub(crate) input: String,
    /// JSON, as in `tasks.retry`.
    pub(crate) retry: String,
    pub(crate) owner: String,
    pub(crate) until: i64,
    pub(crate) started_at: i64,
}

/// Reads `id`'s held slot, if it holds a call.
pub(crate) fn read_held(conn: &Connection, id: &str) -> Result<Option<HeldCall>, StoreError> {
    let row: Option<(u32, i64, i64, String, i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT held_seq, held_pos, generation, held_owner, held_until, held_at, next_pos
             FROM instances WHERE id = ?1 AND held_owner IS NOT NULL AND held_seq IS NOT NULL",
        )
        .and_then(|mut s| {
            s.query_row([id], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get::<_, Option<i64>>(5)?.unwrap_or(0),
                    r.get(6)?,
                ))
            })
            .optional()
        })
        .map_err(db("read held call"))?;
    let Some((mut seq, mut pos, generation, owner, until, mut started_at, next_pos)) = row else {
        return Ok(None);
    };
    // A row that lags behind its held chain: the slot holds the chain's last call.
    if let Some(lag) = lag(conn, id, next_pos)? {
        (seq, pos, started_at) = (lag.held_seq, lag.held_pos, lag.end.recorded_at);
    }
    deferred_rows::flush_for(conn, id).map_err(db("read held call"))?;
    let row: Option<(i64, i64, String)> = conn
        .prepare_cached(
            "SELECT pos, len, body FROM events
             WHERE instance_key = (SELECT key FROM instances WHERE id = ?1) AND pos <= ?2
             ORDER BY pos DESC LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row(params![id, pos], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()
        })
        .map_err(db("read held call"))?;
    let mut event: Option<Event> = None;
    if let Some((first, len, body)) = row {
        for_each_event_in_row(id, first, len, &body, |at, part| {
            if at == pos {
                event = Some(decode_event_json(id, pos, part)?);
            }
            Ok(())
        })?;
    }
    match event {
        Some(Event::ActivityScheduled {
            seq: s,
            name,
            input,
            retry,
        }) if s == seq => Ok(Some(HeldCall {
            seq,
            generation,
            name,
            input: to_json(&input)?,
            retry: to_json(&retry)?,
            owner,
            until,
            started_at,
        })),
        _ => Err(StoreError::Corrupt {
            instance_id: id.to_string(),
            what: format!("held activity call {seq}"),
            detail: format!("history position {pos} does not schedule it"),
        }),
    }
}

/// Turns `id`'s held slot into the `tasks` row it stands for (same attempt, lease and start),
/// for the paths that read and write tasks as rows. Returns whether there was one.
fn expand_held(conn: &Connection, id: &str) -> Result<bool, StoreError> {
    catch_up(conn, id)?;
    let Some(call) = read_held(conn, id)? else {
        return Ok(false);
    };
    conn.prepare_cached(
        "INSERT INTO tasks (instance_id, seq, generation, name, input, retry, attempt, due_at,
                            lease_owner, created_at, claimed_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1, ?7, ?8, ?9, ?9)",
    )
    .and_then(|mut s| {
        s.execute(params![
            id,
            call.seq,
            call.generation,
            call.name,
            call.input,
            call.retry,
            call.until,
            call.owner,
            call.started_at
        ])
    })
    .map_err(db("expand held call"))?;
    clear_held(conn, id)?;
    Ok(true)
}

/// What a writer operation answers when it found nothing to do: an error for its caller
/// (not found, already ended) that is not a failed operation. A failed one would undo and rerun
/// the whole group commit it shares, and drop the held chains of the others.
type Answer<T> = Result<T, StoreError>;

/// Empties `id`'s held slot.
fn clear_held(conn: &Connection, id: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE instances SET held_seq = NULL, held_pos = NULL, held_owner = NULL, held_until = 0
         WHERE id = ?1 AND held_owner IS NOT NULL",
    )
    .and_then(|mut s| s.execute([id]))
    .map_err(db("clear held call"))?;
    Ok(())
}

/// Expands the held slots `filter` selects (an SQL condition on `instances`, with `?1`).
fn expand_held_where(
    conn: &Connection,
    filter: &str,
    arg: &dyn rusqlite::ToSql,
) -> Result<u64, StoreError> {
    let ids: Vec<String> = conn
        .prepare_cached(&format!(
            "SELECT id FROM instances WHERE held_owner IS NOT NULL AND {filter}"
        ))
        .and_then(|mut s| {
            s.query_map([arg], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()
        })
        .map_err(db("expand held calls"))?;
    let mut n = 0;
    for id in &ids {
        // Savepoint: a slot that cannot be expanded (an unreadable history) is left as it was,
        // and does not hold up everyone else's claims, releases and reaps.
        conn.execute_batch("SAVEPOINT expand_held")
            .map_err(db("expand held calls"))?;
        match expand_held(conn, id) {
            Ok(expanded) => {
                conn.execute_batch("RELEASE expand_held")
                    .map_err(db("expand held calls"))?;
                n += u64::from(expanded);
            }
            Err(e) => {
                conn.execute_batch("ROLLBACK TO expand_held; RELEASE expand_held")
                    .map_err(db("expand held calls"))?;
                if matches!(e, StoreError::Corrupt { .. }) {
                    tracing::error!(instance_id = %id, error = %e, "cannot turn a held activity call into a task; stopping the instance");
                    stop_unexpandable(conn, id, &e)?;
                } else {
                    tracing::error!(instance_id = %id, error = %e, "cannot turn a held activity call into a task; left as it is");
                }
            }
        }
    }
    Ok(n)
}

/// Stops `id`, whose held call cannot become a task because its history cannot be read
/// (`error`): as for any unreadable history, the instance is marked with the reason and
/// everyone else goes on (guarantee 8); otherwise the call would be neither held by a live
/// worker nor a task, and the instance would wait forever with no reason given. The slot's
/// owner goes, so that expiry scans pass it by; its history is left as it is.
fn stop_unexpandable(conn: &Connection, id: &str, error: &StoreError) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE instances SET status = 'stopped', reason = ?2, ready = 0, lease_owner = NULL,
                lease_until = 0, held_owner = NULL, held_until = 0, updated_at = ?3
         WHERE id = ?1 AND status = 'running'",
    )
    .and_then(|mut s| s.execute(params![id, error.to_string(), now_ms() as i64]))
    .map_err(db("stop instance"))?;
    Ok(())
}

/// Journals an attempt of `task`: started when claimed (`claimed_at`; `now` for a task claimed
/// before that column existed), ended `now`.
fn journal_attempt(
    conn: &Tx<'_>,
    task: AttemptKey<'_>,
    claimed_at: Option<i64>,
    (end, error): (AttemptEnd, Option<String>),
    now: u64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO attempts
             (instance_id, generation, seq, attempt, started_at, ended_at, outcome, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut s| {
        s.execute(params![
            task.instance_id,
            task.generation as i64,
            task.seq,
            task.attempt,
            claimed_at.unwrap_or(now as i64),
            now as i64,
            end.as_str(),
            error
        ])
    })
    .map_err(db("journal activity attempt"))?;
    Ok(())
}

fn mark_ready(conn: &Tx<'_>, instance_id: &str) -> Result<(), StoreError> {
    conn.prepare_cached("UPDATE instances SET ready = 1 WHERE id = ?1 AND status = 'running'")
        .and_then(|mut s| s.execute([instance_id]))
        .map_err(db("mark instance ready"))?;
    Ok(())
}

/// Creates an instance inside the current transaction.
fn create_in_tx(conn: &Tx<'_>, new: &NewInstance, now: u64) -> Result<CreateOutcome, StoreError> {
    insert_instance(conn, new, now, None)
}

/// Creates an instance inside the current transaction. With `activated_by` (the owner of the
/// first activation, and its lease), the instance is created leased to that owner and without
/// `InstanceStarted` in its inbox: the caller appends that activation in the same transaction.
fn insert_instance(
    conn: &Tx<'_>,
    new: &NewInstance,
    now: u64,
    activated_by: Option<(&str, u64)>,
) -> Result<CreateOutcome, StoreError> {
    let input = to_json(&new.input)?;
    let n = conn
        .prepare_cached(
            "INSERT INTO instances (id, coordinator, status, input, parent_id, parent_seq, ready,
                                    lease_owner, lease_until, created_at, updated_at)
             VALUES (?1, ?2, 'running', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)
             ON CONFLICT (id) DO NOTHING",
        )
        .and_then(|mut s| {
            s.execute(params![
                new.id,
                new.coordinator,
                input,
                new.parent.as_ref().map(|p| p.instance_id.clone()),
                new.parent.as_ref().map(|p| p.seq),
                activated_by.is_none(),
                activated_by.map(|(owner, _)| owner),
                activated_by.map_or(0, |(_, lease_ms)| (now + lease_ms) as i64),
                now as i64
            ])
        })
        .map_err(db("create instance"))?;
    if n == 0 {
        return existing_instance(conn, &new.id);
    }
    if activated_by.is_some() {
        return Ok(CreateOutcome::Created);
    }
    let start = Event::InstanceStarted {
        coordinator: new.coordinator.clone(),
        input: new.input.clone(),
        parent: new.parent.clone(),
    };
    insert_inbox(conn, &new.id, Some("start:0"), &start, now)?;
    Ok(CreateOutcome::Created)
}

/// What creating an instance whose id is taken returns: the instance there.
fn existing_instance(conn: &Tx<'_>, id: &str) -> Result<CreateOutcome, StoreError> {
    let existing = get_instance(conn, id)?.ok_or_else(|| StoreError::NotFound {
        instance_id: id.to_string(),
    })?;
    Ok(CreateOutcome::Existing(existing))
}

/// [`insert_instance`] and the [`commit_in_tx`] of its first activation `c` in one, when that
/// activation is a plain step (see [`is_plain_step`]): the row goes in as the activation
/// leaves it (moved on, not leased, its claimed call in the held slot), then its history and
/// tasks. A new instance has no inbox, so nothing can make it ready again. `None`, having
/// written nothing, when the activation is not such a step.
fn insert_stepped_instance(
    conn: &Tx<'_>,
    new: &NewInstance,
    c: &Arc<PreparedCommit>,
    now: u64,
) -> Result<Option<CreateOutcome>, StoreError> {
    if !is_plain_step(c) || c.generation != 0 || c.expected_position != 0 {
        return Ok(None);
    }
    let input = to_json(&new.input)?;
    let held = held_candidate(c);
    let n = conn
        .prepare_cached(
            "INSERT INTO instances (id, coordinator, status, input, parent_id, parent_seq, ready,
                                    lease_owner, lease_until, created_at, updated_at, next_pos,
                                    next_activation, held_seq, held_pos, held_owner, held_until,
                                    held_at)
             VALUES (?1, ?2, 'running', ?3, ?4, ?5, 0, NULL, 0, ?6, ?6, ?7, ?8, ?9, ?10,
                     CASE WHEN ?9 IS NULL THEN NULL ELSE ?11 END,
                     CASE WHEN ?9 IS NULL THEN 0 ELSE ?12 END,
                     CASE WHEN ?9 IS NULL THEN NULL ELSE ?6 END)
             ON CONFLICT (id) DO NOTHING",
        )
        .and_then(|mut s| {
            s.execute(params![
                new.id,
                new.coordinator,
                input,
                new.parent.as_ref().map(|p| p.instance_id.as_str()),
                new.parent.as_ref().map(|p| p.seq),
                now as i64,
                c.events.len() as i64,
                c.activation + 1,
                held.map(|h| h.0),
                held.map(|h| h.1 as i64),
                c.owner,
                (now + c.lease_ms) as i64
            ])
        })
        .map_err(db("create instance"))?;
    if n == 0 {
        return existing_instance(conn, &new.id).map(Some);
    }
    let key = conn.last_insert_rowid();
    if let Some(h) = held {
        let fresh = new.parent.is_none() && c.tasks.len() == 1 && c.timers.is_empty();
        stage_chain(conn, c, now, h.0, key, fresh);
    }
    append_kept(conn, Some(key), c, now)?;
    insert_tasks_and_timers(conn, c, now, held.map(|h| h.0))?;
    Ok(Some(CreateOutcome::Created))
}

/// Whether `id` still waits for its children's ends: it runs or is stopped (see
/// `notify_parent`).
fn waits_for_children(conn: &Tx<'_>, id: &str) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM instances
                        WHERE id = ?1 AND status IN ('running', 'stopped'))",
    )
    .and_then(|mut s| s.query_row([id], |r| r.get(0)))
    .map_err(db("check parent"))
}

/// Whether `id` is the instance `c` commits for, or one of its ancestors.
fn in_parent_chain(conn: &Tx<'_>, c: &ActivationCommit, id: &str) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "WITH RECURSIVE chain(id, depth) AS (
             SELECT ?1, 0
             UNION ALL
             SELECT i.parent_id, chain.depth + 1 FROM instances i JOIN chain ON i.id = chain.id
             WHERE i.parent_id IS NOT NULL AND chain.depth < 10000)
         SELECT EXISTS (SELECT 1 FROM chain WHERE id = ?2)",
    )
    .and_then(|mut s| s.query_row(params![c.instance_id, id], |r| r.get(0)))
    .map_err(db("check parent chain"))
}

/// Tells a parent that its child ended, inside the current transaction.
fn notify_parent(
    conn: &Tx<'_>,
    parent: &ParentRef,
    result: Result<Value, Error>,
    now: u64,
) -> Result<(), StoreError> {
    // A parent that has ended no longer waits for anything. A stopped one still does: the
    // result waits in its inbox until it is resumed (`mark_ready` leaves it stopped).
    if !waits_for_children(conn, &parent.instance_id)? {
        return Ok(());
    }
    let event = Event::ChildCompleted {
        seq: parent.seq,
        result,
    };
    let dedupe = format!("child:{}", parent.seq);
    insert_inbox(conn, &parent.instance_id, Some(&dedupe), &event, now)?;
    mark_ready(conn, &parent.instance_id)
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

fn delete_pending_work(conn: &Tx<'_>, instance_id: &str) -> Result<(), StoreError> {
    clear_held(conn, instance_id)?;
    conn.prepare_cached("DELETE FROM inbox WHERE instance_id = ?1")
        .and_then(|mut s| s.execute([instance_id]))
        .map_err(db("delete pending work"))?;
    delete_calls_and_timers(conn, instance_id)
}

/// Deletes the activity calls (task rows) and timers of `instance_id`.
fn delete_calls_and_timers(conn: &Tx<'_>, instance_id: &str) -> Result<(), StoreError> {
    for sql in [
        "DELETE FROM tasks WHERE instance_id = ?1",
        "DELETE FROM timers WHERE instance_id = ?1",
    ] {
        conn.prepare_cached(sql)
            .and_then(|mut s| s.execute([instance_id]))
            .map_err(db("delete pending work"))?;
    }
    Ok(())
}

/// The final row of `instance_id`, whose run just ended in this transaction; its parent, if it
/// waits, is told of the end (and listed in `receipt` as woken).
fn settle_end(
    conn: &Tx<'_>,
    instance_id: &str,
    now: u64,
    receipt: &mut CommitReceipt,
) -> Result<InstanceInfo, StoreError> {
    let info = get_instance(conn, instance_id)?.ok_or_else(|| StoreError::NotFound {
        instance_id: instance_id.to_string(),
    })?;
    if let (Some(parent), Some(result)) = (&info.parent, final_result(&info)) {
        notify_parent(conn, parent, result, now)?;
        receipt.woken.push(parent.instance_id.clone());
    }
    Ok(info)
}

fn append_events(
    conn: &Tx<'_>,
    instance_id: &str,
    first_position: u64,
    activation: u32,
    events: &[Event],
    now: u64,
) -> Result<(), StoreError> {
    let row = HistoryRow::encode(events)?;
    append_row(
        conn,
        InstanceRef::Id(instance_id),
        first_position,
        activation,
        &row,
        now,
    )
}

/// An activation's events as their `events` row holds them (schema 7): bodies joined by
/// [`EVENT_SEPARATOR`], kinds by commas. Encoded by the caller, before the operation goes
/// to the writer, so that the writer thread, which every commit waits for, spends its time
/// on the database only (the JSON was 7 % of its instructions in W1).
#[derive(Debug)]
pub(super) struct HistoryRow {
    kind: Cow<'static, str>,
    pub(super) body: String,
    len: usize,
}

impl HistoryRow {
    /// The row's `kind` column.
    pub(super) fn kind(&self) -> &str {
        &self.kind
    }

    /// How many events the row holds.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// A sequential step's row (an outcome and the next call), whose kind and length the
    /// `INSERT` can have as literals.
    pub(super) fn is_step(&self) -> bool {
        self.len == 2 && self.kind == STEP_KINDS
    }
}

/// The `kind` column of a sequential step's row: an outcome and the next call. Its `INSERT`
/// has it as a literal (`insert_row`).
pub(super) const STEP_KINDS: &str = "activity_completed,activity_scheduled";

/// The `kind` column of the commonest rows, without building it: a sequential step's, the
/// last step's of a run that completes, and a lone event's.
fn common_kinds(events: &[Event]) -> Option<&'static str> {
    match events {
        [one] => Some(one.kind()),
        [Event::ActivityCompleted { .. }, Event::ActivityScheduled { .. }] => Some(STEP_KINDS),
        [Event::ActivityCompleted { .. }, Event::InstanceCompleted { .. }] => {
            Some("activity_completed,instance_completed")
        }
        _ => None,
    }
}

impl HistoryRow {
    fn encode(events: &[Event]) -> Result<Self, StoreError> {
        // One allocation for the body, none for the commonest kinds: the events are written
        // straight into one buffer (a sequential step's two events take about 150 bytes), by
        // `Event::write_json`, which writes the commonest events without serde's map encoder.
        let mut body = Vec::with_capacity(256);
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                body.push(EVENT_SEPARATOR_BYTE);
            }
            event.write_json(&mut body).map_err(encode_error)?;
        }
        let kind = match common_kinds(events) {
            Some(kind) => Cow::Borrowed(kind),
            None => Cow::Owned(events.iter().map(Event::kind).collect::<Vec<_>>().join(",")),
        };
        let body = String::from_utf8(body).map_err(encode_error)?;
        Ok(HistoryRow {
            kind,
            body,
            len: events.len(),
        })
    }
}

/// An activation ready for the writer: the commit and its history row, encoded.
#[derive(Debug)]
pub(super) struct PreparedCommit {
    commit: ActivationCommit,
    pub(super) row: HistoryRow,
}

impl PreparedCommit {
    fn new(commit: ActivationCommit) -> Result<Self, StoreError> {
        let row = HistoryRow::encode(&commit.events)?;
        Ok(PreparedCommit { commit, row })
    }
}

impl std::ops::Deref for PreparedCommit {
    type Target = ActivationCommit;
    fn deref(&self) -> &ActivationCommit {
        &self.commit
    }
}

/// Inserts one `events` row, the events of one activation from `first_position` on (none:
/// nothing is written).
fn append_row(
    conn: &Tx<'_>,
    instance: InstanceRef<'_>,
    first_position: u64,
    activation: u32,
    row: &HistoryRow,
    now: u64,
) -> Result<(), StoreError> {
    if row.len == 0 {
        return Ok(());
    }
    insert_row(conn, instance, first_position, activation, row, now)
        .map_err(db("append events"))?;
    Ok(())
}

/// [`append_row`] for `c`'s row, kept aside for the end of the batch when the instance's key
/// is known and the batch keeps rows (see `deferred_rows`).
fn append_kept(
    conn: &Tx<'_>,
    key: Option<i64>,
    c: &Arc<PreparedCommit>,
    now: u64,
) -> Result<(), StoreError> {
    if let Some(key) = key.filter(|_| c.row.len > 0) {
        if keep_row(conn, key, c, now) {
            return Ok(());
        }
    }
    append_commit_row(conn, key, c, now)
}

/// Keeps `c`'s row (instance `key`) aside for the end of the batch, if the batch keeps rows;
/// returns whether it did.
fn keep_row(conn: &Tx<'_>, key: i64, c: &Arc<PreparedCommit>, now: u64) -> bool {
    let row = DeferredRow {
        key,
        recorded_at: now as i64,
        commit: Arc::clone(c),
    };
    deferred_rows::defer(conn, row).is_ok()
}

/// [`append_row`] for `c`'s row, at once (`key`: the instance's, if known).
fn append_commit_row(
    conn: &Tx<'_>,
    key: Option<i64>,
    c: &PreparedCommit,
    now: u64,
) -> Result<(), StoreError> {
    append_row(
        conn,
        InstanceRef::of(key, &c.instance_id),
        c.expected_position,
        c.activation,
        &c.row,
        now,
    )
}

/// The `INSERT` of one history row, its error left for the caller to read (a held chain takes
/// a row already at its position as its cue to step aside). The commonest row, a sequential
/// step's (an outcome and the next call), has its kind and length in the statement when the
/// instance's key is known: SQLite copies every bound text, and a bound parameter costs about
/// what a column of the row does (W1's writer: −3 %).
fn insert_row(
    conn: &Tx<'_>,
    instance: InstanceRef<'_>,
    first_position: u64,
    activation: u32,
    row: &HistoryRow,
    now: u64,
) -> rusqlite::Result<usize> {
    if let InstanceRef::Key(key) = instance {
        if row.is_step() {
            return conn
                .prepare_cached(
                    "INSERT INTO events (instance_key, pos, activation, kind, recorded_at, body, len)
                     VALUES (?1, ?2, ?3, 'activity_completed,activity_scheduled', ?4, ?5, 2)",
                )
                .and_then(|mut stmt| {
                    stmt.execute(params![
                        key,
                        first_position as i64,
                        activation,
                        now as i64,
                        row.body
                    ])
                });
        }
    }
    let (sql, instance): (&'static str, &dyn rusqlite::ToSql) = match &instance {
        InstanceRef::Key(key) => (
            "INSERT INTO events (instance_key, pos, activation, kind, recorded_at, body, len)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            key,
        ),
        InstanceRef::Id(id) => (
            "INSERT INTO events (instance_key, pos, activation, kind, recorded_at, body, len)
             VALUES ((SELECT key FROM instances WHERE id = ?1), ?2, ?3, ?4, ?5, ?6, ?7)",
            id,
        ),
    };
    conn.prepare_cached(sql).and_then(|mut stmt| {
        stmt.execute(params![
            instance,
            first_position as i64,
            activation,
            row.kind.as_ref(),
            now as i64,
            row.body,
            row.len as i64
        ])
    })
}

/// The instance a history row goes to: by its key, when the caller has it at hand, or by
/// its id.
#[derive(Debug, Clone, Copy)]
enum InstanceRef<'a> {
    Key(i64),
    Id(&'a str),
}

impl<'a> InstanceRef<'a> {
    /// `key` if known, else `id`.
    fn of(key: Option<i64>, id: &'a str) -> Self {
        key.map_or(InstanceRef::Id(id), InstanceRef::Key)
    }
}

/// The rowid (key) of the `instances` row the last statement changed, as the write
/// connection's update hook saw it (none without held chains).
fn changed_row(conn: &Tx<'_>) -> Option<i64> {
    conn.chains().and_then(|chains| chains.take_last_row())
}

/// Between the bodies of the events one `events` row holds (schema 7). Compact JSON, as
/// serde_json writes it (and `Event::write_json`, byte for byte), never has a raw newline.
const EVENT_SEPARATOR: char = '\n';
/// [`EVENT_SEPARATOR`] as the byte [`HistoryRow::encode`] writes.
const EVENT_SEPARATOR_BYTE: u8 = b'\n';
const _: () = assert!(EVENT_SEPARATOR as u32 == EVENT_SEPARATOR_BYTE as u32);

/// Calls `f` with the position and body of each event of one `events` row: `len` events from
/// `pos` on. A row whose bodies do not number `len` is reported as corrupt, once `f` has seen at
/// most `len` of them: callers discard what they collected from a row in error.
pub(crate) fn for_each_event_in_row(
    instance_id: &str,
    pos: i64,
    len: i64,
    body: &str,
    mut f: impl FnMut(i64, &str) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    if len == 1 {
        return f(pos, body);
    }
    // One pass: the parts are handed out as they are found, and a count that does not match
    // is reported once the row ends (the caller discards what it got from a row in error).
    let mut found = 0i64;
    for part in body.split(EVENT_SEPARATOR) {
        if found < len {
            f(pos + found, part)?;
        }
        found += 1;
    }
    if found != len {
        return Err(StoreError::Corrupt {
            instance_id: instance_id.to_string(),
            what: format!("history row at position {pos}"),
            detail: format!("it holds {found} events where its length says {len}"),
        });
    }
    Ok(())
}

/// Lists in `receipt` the tasks its commit claimed: every task of the commit with `claim`
/// (the writer, having committed the activation, created them all claimed, one perhaps in the
/// held slot). Done on the caller's thread, by moving name, input and retry policy out of the
/// commit, which the caller holds alone again once the writer answered: the writer thread
/// allocates nothing a worker frees. Memory freed by another thread than the one that
/// allocated it goes through the lock of the allocating thread's arena, which that thread
/// holds for its own allocations (W1: +20 % steps/s).
fn with_claimed_tasks(receipt: &mut CommitReceipt, commit: Arc<PreparedCommit>) {
    if !commit.tasks.iter().any(|t| t.claim) {
        return;
    }
    // The operation that shared it has come back and been dropped: the commit is ours alone.
    let commit = Arc::try_unwrap(commit)
        .map(|prepared| prepared.commit)
        .unwrap_or_else(|shared| shared.commit.clone());
    let ActivationCommit {
        instance_id,
        generation,
        tasks,
        ..
    } = commit;
    let claim = |t: NewTask, instance_id: String| ActivityTask {
        instance_id,
        seq: t.seq,
        name: t.name,
        input: t.input,
        retry: t.retry,
        attempt: 1,
        generation,
    };
    // The last claimed task takes the commit's id itself (a sequential step claims one).
    let mut out = Vec::new();
    let mut last = None;
    for t in tasks.into_iter().filter(|t| t.claim) {
        if let Some(previous) = last.replace(t) {
            out.push(claim(previous, instance_id.clone()));
        }
    }
    if let Some(t) = last {
        out.push(claim(t, instance_id));
    }
    receipt.claimed_tasks = out;
}

/// Creates the activity tasks and timers of an activation, those with `claim` claimed by
/// its owner (`held`: the one that goes to the instance's held slot instead of a row). The
/// caller lists the claimed ones in its receipt ([`with_claimed_tasks`]).
fn insert_tasks_and_timers(
    conn: &Tx<'_>,
    c: &ActivationCommit,
    now: u64,
    held: Option<u32>,
) -> Result<(), StoreError> {
    let lease_until = now + c.lease_ms;
    // Prepared when a task needs a row (the held call needs none).
    let mut ins = None;
    for t in &c.tasks {
        if held != Some(t.seq) {
            let (attempt, due, owner) = if t.claim {
                (1u32, lease_until, Some(&*c.owner))
            } else {
                (0u32, now, None)
            };
            let stmt = match &mut ins {
                Some(stmt) => stmt,
                None => ins.insert(
                    conn.prepare_cached(
                        "INSERT INTO tasks (instance_id, seq, generation, name, input, retry,
                                            attempt, due_at, lease_owner, created_at, claimed_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10,
                                 CASE WHEN ?9 IS NULL THEN NULL ELSE ?10 END)
                         ON CONFLICT (instance_id, seq) DO NOTHING",
                    )
                    .map_err(db("create activity task"))?,
                ),
            };
            stmt.execute(params![
                c.instance_id,
                t.seq,
                c.generation as i64,
                t.name,
                to_json(&t.input)?,
                to_json(&t.retry)?,
                attempt,
                due as i64,
                owner,
                now as i64
            ])
            .map_err(db("create activity task"))?;
        }
        // (The held call is in the instance's slot, written with the instance row.)
    }
    if !c.timers.is_empty() {
        let mut ins = conn
            .prepare_cached(
                "INSERT INTO timers (instance_id, seq, generation, fire_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (instance_id, seq) DO NOTHING",
            )
            .map_err(db("create timer"))?;
        for (seq, fire_at) in &c.timers {
            ins.execute(params![
                c.instance_id,
                seq,
                c.generation as i64,
                super::codec::stored_ms(*fire_at)
            ])
            .map_err(db("create timer"))?;
        }
    }
    Ok(())
}

fn commit_in_tx(conn: &Tx<'_>, c: &PreparedCommit, now: u64) -> Result<CommitReceipt, StoreError> {
    let row: Option<(i64, Option<String>, String, i64, bool, i64)> = conn
        .prepare_cached(
            "SELECT next_pos, lease_owner, status, generation, held_owner IS NULL, key
             FROM instances WHERE id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([&c.instance_id], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .optional()
        })
        .map_err(db("commit activation"))?;
    let Some((next_pos, lease_owner, status, generation, slot_free, key)) = row else {
        return Err(StoreError::NotFound {
            instance_id: c.instance_id.clone(),
        });
    };
    if status != "running"
        || generation as u64 != c.generation
        || next_pos as u64 != c.expected_position
    {
        return Err(StoreError::Conflict {
            instance_id: c.instance_id.clone(),
            expected: c.expected_position,
            found: next_pos as u64,
        });
    }
    if lease_owner.as_deref() != Some(&*c.owner) {
        return Err(StoreError::LeaseLost {
            what: format!("instance {}", c.instance_id),
            owner: c.owner.to_string(),
        });
    }
    append_row(
        conn,
        InstanceRef::Key(key),
        c.expected_position,
        c.activation,
        &c.row,
        now,
    )?;
    {
        let mut del = conn
            .prepare_cached("DELETE FROM inbox WHERE id = ?1")
            .map_err(db("consume inbox"))?;
        for id in &c.consumed_inbox {
            del.execute([id]).map_err(db("consume inbox"))?;
        }
    }
    let lease_until = now + c.lease_ms;
    let mut receipt = CommitReceipt::default();
    // The call this activation claims goes to the held slot if the run goes on and the slot
    // is free (a call claimed earlier may still run, e.g. raced with a timer).
    let held = match &c.end {
        None if slot_free => held_candidate(c),
        _ => None,
    };
    insert_tasks_and_timers(conn, c, now, held.map(|h| h.0))?;
    for child in &c.children {
        if let Some(refusal) = child_id_refusal(child) {
            if get_instance(conn, &child.id)?.is_none() {
                match &child.parent {
                    // The call fails at once; no instance is created.
                    Some(parent) => {
                        notify_parent(conn, parent, Err(refusal), now)?;
                        continue;
                    }
                    // Nobody waits for a detached start: it is made, as before, and logged.
                    None => {
                        tracing::warn!(instance_id = %c.instance_id, child = %child.id, "{refusal}")
                    }
                }
            }
        }
        match create_in_tx(conn, child, now)? {
            CreateOutcome::Created => receipt.woken.push(child.id.clone()),
            CreateOutcome::Existing(existing) => {
                // Starting an existing id returns that instance (see `existing_child`).
                let in_chain = child.parent.is_some() && in_parent_chain(conn, c, &child.id)?;
                let owner_waits = match &existing.parent {
                    Some(owner) => waits_for_children(conn, &owner.instance_id)?,
                    None => false,
                };
                match (
                    existing_child(&existing, child, in_chain, owner_waits),
                    &child.parent,
                ) {
                    (ExistingChild::Report(result), Some(parent)) => {
                        notify_parent(conn, parent, result, now)?;
                    }
                    (ExistingChild::Adopt, Some(parent)) => {
                        conn.prepare_cached(
                            "UPDATE instances SET parent_id = ?2, parent_seq = ?3
                             WHERE id = ?1 AND status IN ('running', 'stopped')",
                        )
                        .and_then(|mut s| {
                            s.execute(params![child.id, parent.instance_id, parent.seq])
                        })
                        .map_err(db("adopt child"))?;
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(status) = &c.custom_status {
        let status = to_json(status)?;
        conn.prepare_cached("UPDATE instances SET custom_status = ?2 WHERE id = ?1")
            .and_then(|mut s| s.execute(params![c.instance_id, status]))
            .map_err(db("set custom status"))?;
    }
    let next_pos = c.expected_position + c.events.len() as u64;
    let next_activation = c.activation + 1;
    match &c.end {
        None => {
            let ready: bool = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?1)")
                .and_then(|mut s| s.query_row([&c.instance_id], |r| r.get(0)))
                .map_err(db("commit activation"))?;
            let (owner, until) = if ready {
                (Some(&*c.owner), lease_until)
            } else {
                (None, 0)
            };
            conn.prepare_cached(
                "UPDATE instances SET next_pos = ?2, next_activation = ?3, ready = ?4,
                        lease_owner = ?5, lease_until = ?6, updated_at = ?7, reason = NULL,
                        held_seq = CASE WHEN ?8 IS NULL THEN held_seq ELSE ?8 END,
                        held_pos = CASE WHEN ?8 IS NULL THEN held_pos ELSE ?9 END,
                        held_owner = CASE WHEN ?8 IS NULL THEN held_owner ELSE ?10 END,
                        held_until = CASE WHEN ?8 IS NULL THEN held_until ELSE ?11 END,
                        held_at = CASE WHEN ?8 IS NULL THEN held_at ELSE ?7 END
                 WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    c.instance_id,
                    next_pos as i64,
                    next_activation,
                    ready,
                    owner,
                    until as i64,
                    now as i64,
                    held.map(|h| h.0),
                    held.map(|h| h.1 as i64),
                    c.owner,
                    lease_until as i64
                ])
            })
            .map_err(db("commit activation"))?;
            receipt.ready_again = ready;
        }
        Some(RunEnd::ContinueAsNew(input)) => {
            journal_derived_attempts(conn, &c.instance_id, c.generation)?;
            deferred_rows::flush_for(conn, &c.instance_id).map_err(db("continue as new"))?;
            conn.prepare_cached(
                "DELETE FROM events
                 WHERE instance_key = (SELECT key FROM instances WHERE id = ?1)",
            )
            .and_then(|mut s| s.execute([&c.instance_id]))
            .map_err(db("continue as new"))?;
            delete_calls_and_timers(conn, &c.instance_id)?;
            let info = get_instance(conn, &c.instance_id)?.ok_or_else(|| StoreError::NotFound {
                instance_id: c.instance_id.clone(),
            })?;
            let generation = c.generation + 1;
            let input_json = to_json(input)?;
            conn.prepare_cached(
                "UPDATE instances SET generation = ?2, input = ?3, next_pos = 0, next_activation = 0,
                        ready = 1, lease_owner = ?4, lease_until = ?5, updated_at = ?6,
                        custom_status = custom_status, held_seq = NULL, held_pos = NULL,
                        held_owner = NULL, held_until = 0
                 WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    c.instance_id,
                    generation as i64,
                    input_json,
                    c.owner,
                    lease_until as i64,
                    now as i64
                ])
            })
            .map_err(db("continue as new"))?;
            // The old run's children still running are detached: the new run did not start
            // them, and would take the end of one for that of its own child at the same
            // position (Temporal's "abandon" parent-close policy).
            conn.prepare_cached(
                "UPDATE instances SET parent_id = NULL, parent_seq = NULL
                 WHERE parent_id = ?1 AND status IN ('running', 'stopped')",
            )
            .and_then(|mut s| s.execute([&c.instance_id]))
            .map_err(db("continue as new"))?;
            // Outcomes of the old run that came after its last activation read the inbox (an
            // activity, a timer, a child): the new run must not take them for its own calls at
            // the same positions. Signals and cancellation stay: they are for the instance.
            conn.prepare_cached(
                "DELETE FROM inbox WHERE instance_id = ?1
                   AND (dedupe LIKE 'seq:%' OR dedupe LIKE 'timer:%' OR dedupe LIKE 'child:%')",
            )
            .and_then(|mut s| s.execute([&c.instance_id]))
            .map_err(db("continue as new"))?;
            let start = Event::InstanceStarted {
                coordinator: info.coordinator.clone(),
                input: input.clone(),
                parent: info.parent.clone(),
            };
            insert_inbox(
                conn,
                &c.instance_id,
                Some(&format!("start:{generation}")),
                &start,
                now,
            )?;
            receipt.ready_again = true;
        }
        Some(end) => {
            let (status, output, error) = end_columns(end)?;
            conn.prepare_cached(
                "UPDATE instances SET status = ?2, output = ?3, error = ?4, next_pos = ?5,
                        next_activation = ?6, ready = 0, lease_owner = NULL, lease_until = 0,
                        updated_at = ?7, ended_at = ?7, reason = NULL
                 WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    c.instance_id,
                    status,
                    output,
                    error,
                    next_pos as i64,
                    next_activation,
                    now as i64
                ])
            })
            .map_err(db("end instance"))?;
            delete_pending_work(conn, &c.instance_id)?;
            settle_end(conn, &c.instance_id, now, &mut receipt)?;
        }
    }
    Ok(receipt)
}

/// [`Store::finish_and_activate`] inside the current transaction. Exactly one outcome per call
/// position: the outcome is written (to history or to the inbox) only while the task row is held
/// by this attempt, and the task row is deleted in the same transaction.
fn finish_and_activate_in_tx(
    conn: &Tx<'_>,
    task: AttemptKey<'_>,
    c: &Arc<PreparedCommit>,
    now: u64,
    watched: bool,
) -> Result<(DirectFinish, Option<EndedRow>), StoreError> {
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
                })
            }
        };
    // The task must still be held by this attempt; it goes in the same transaction as the
    // outcome is written, whichever way that is.
    let end = attempt_end(outcome);
    // The commonest step of all: the first attempt of the call in the held slot completed. One
    // `UPDATE` takes the call out of the slot, moves the instance on and puts the next call in.
    let sequential = c.instance_id == task.instance_id
        && task.attempt == 1
        && end.0 == AttemptEnd::Completed
        && task.generation == c.generation;
    // Commoner still: the same, in a held chain, where the step writes its history row only.
    let chain = match conn.chains() {
        Some(chains) if sequential => chains
            .get(&c.instance_id)
            .filter(|chain| chain_continues(chain, c, task.seq)),
        _ => None,
    };
    if let Some(chain) = &chain {
        if let Some(receipt) = step_in_chain(conn, c, now, chain)? {
            return Ok((DirectFinish::Activated(receipt), None));
        }
    }
    if sequential {
        if let Some((receipt, info)) =
            step_ending_held(conn, c, now, task.seq, chain.as_ref(), watched)?
        {
            return Ok((DirectFinish::Activated(receipt), Some(info)));
        }
    }
    // Everything below reads the instance row as its history says.
    catch_up(conn, &c.instance_id)?;
    if task.instance_id != c.instance_id {
        catch_up(conn, task.instance_id)?;
    }
    if sequential {
        if let Some(receipt) = step_in_tx(conn, c, now, Some(task.seq))? {
            return Ok((DirectFinish::Activated(receipt), None));
        }
        if let Some((receipt, info)) = step_ending_held(conn, c, now, task.seq, None, watched)? {
            return Ok((DirectFinish::Activated(receipt), Some(info)));
        }
    }
    let Some(held) = take_held_task(conn, task, &c.owner)? else {
        return Ok((
            DirectFinish::Finished(FinishReceipt {
                accepted: false,
                instance_claimed: false,
            }),
            None,
        ));
    };
    // A first attempt that succeeded, started by the commit that scheduled the call and ended
    // by this one, which writes its outcome to the run's history: the two events' times are
    // the attempt's, and `attempts` derives it from them. Not writing its row saves a B-tree
    // page per sequential step (the common case). A run that continues as new leaves its
    // history behind, so its last attempt is journaled.
    let derivable = task.attempt == 1
        && end.0 == AttemptEnd::Completed
        && held.claimed_when_scheduled
        && !matches!(c.end, Some(RunEnd::ContinueAsNew(_)));
    if c.instance_id == task.instance_id {
        if let Some(receipt) = step_in_tx(conn, c, now, None)? {
            if !derivable {
                journal_attempt(conn, task, held.claimed_at, end, now)?;
            }
            return Ok((DirectFinish::Activated(receipt), None));
        }
    }
    let claimed = conn
        .prepare_cached(
            "UPDATE instances SET lease_owner = ?2, lease_until = ?3
             WHERE id = ?1 AND status = 'running'
               AND (lease_owner IS NULL OR lease_owner = ?2 OR lease_until < ?4)",
        )
        .and_then(|mut s| {
            s.execute(params![
                task.instance_id,
                c.owner,
                (now + c.lease_ms) as i64,
                now as i64
            ])
        })
        .map_err(db("finish activity task"))?
        > 0;
    if claimed && c.instance_id == task.instance_id {
        let inbox_empty: bool = conn
            .prepare_cached("SELECT NOT EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?1)")
            .and_then(|mut s| s.query_row([&task.instance_id], |r| r.get(0)))
            .map_err(db("finish activity task"))?;
        if inbox_empty {
            // commit_in_tx checks position, run and lease before it writes anything, so a
            // conflict leaves the transaction as it was.
            match commit_in_tx(conn, c, now) {
                Ok(receipt) => {
                    if !derivable {
                        journal_attempt(conn, task, held.claimed_at, end, now)?;
                    }
                    return Ok((DirectFinish::Activated(receipt), None));
                }
                Err(StoreError::Conflict { .. } | StoreError::LeaseLost { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    journal_attempt(conn, task, held.claimed_at, end, now)?;
    // As finish_task: the outcome goes to the inbox, for the next activation.
    let dedupe = format!("seq:{}:{}", task.generation, task.seq);
    insert_inbox(conn, task.instance_id, Some(&dedupe), outcome, now)?;
    mark_ready(conn, task.instance_id)?;
    Ok((
        DirectFinish::Finished(FinishReceipt {
            accepted: true,
            instance_claimed: claimed,
        }),
        None,
    ))
}

/// The step that completes the call in the instance's held slot (claimed by `c.owner`, first
/// attempt) and ends the run (completed, failed or cancelled), with nothing else to write:
/// one `UPDATE` ends the instance, checks what `commit_in_tx` checks and empties the slot.
/// Returns the instance's final row too, which the caller remembers.
/// `None`, having written nothing, when the step does not apply.
fn step_ending_held(
    conn: &Tx<'_>,
    c: &Arc<PreparedCommit>,
    now: u64,
    seq: u32,
    chain: Option<&Chain>,
    watched: bool,
) -> Result<Option<(CommitReceipt, EndedRow)>, StoreError> {
    let Some(end) = &c.end else {
        return Ok(None);
    };
    if matches!(end, RunEnd::ContinueAsNew(_))
        || !c.children.is_empty()
        || c.custom_status.is_some()
        || !c.consumed_inbox.is_empty()
        || !c.tasks.is_empty()
        || !c.timers.is_empty()
    {
        return Ok(None);
    }
    let (status, output, error) = end_columns(end)?;
    let next_pos = c.expected_position + c.events.len() as u64;
    // In a held chain, the row says where the chain began; the chain vouches for the rest.
    let (row_pos, row_seq) = match chain {
        Some(chain) => (chain.row_next_pos, chain.row_held_seq),
        None => (c.expected_position, seq),
    };
    // (Not `RETURNING` the row: SQLite builds an ephemeral table for it, which cost more
    // than reading the row again.) A chain knows the row's key (`?12`), which spares the
    // seek by text id; the id is still compared on the row.
    let ended = conn
        .prepare_cached(
            "UPDATE instances SET status = ?2, output = ?3, error = ?4, next_pos = ?5,
                    next_activation = ?6, ready = 0, lease_owner = NULL, lease_until = 0,
                    updated_at = ?7, ended_at = ?7, reason = NULL,
                    held_seq = NULL, held_pos = NULL, held_owner = NULL, held_until = 0
             WHERE key = COALESCE(?12, (SELECT key FROM instances WHERE id = ?1))
               AND id = ?1 AND status = 'running' AND generation = ?8 AND next_pos = ?9
               AND held_seq = ?10 AND held_owner = ?11
               AND (lease_owner IS NULL OR lease_owner = ?11 OR lease_until < ?7)
               AND NOT EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?1)",
        )
        .and_then(|mut s| {
            s.execute(params![
                c.instance_id,
                status,
                output,
                error,
                next_pos as i64,
                c.activation + 1,
                now as i64,
                c.generation as i64,
                row_pos as i64,
                row_seq,
                c.owner,
                chain.map(|chain| chain.rowid)
            ])
        })
        .map_err(db("end instance"))?;
    if ended == 0 {
        return Ok(None);
    }
    append_kept(conn, chain.map(|chain| chain.rowid), c, now)?;
    let mut receipt = CommitReceipt::default();
    // A chain that began with the instance's creation has left no call but the held one, no
    // timer and no parent (anything else would have written the row and ended the chain):
    // nothing to delete, nobody to notify, and the final row is read only for a waiter.
    if chain.is_some_and(|chain| chain.fresh) {
        if !watched {
            return Ok(Some((receipt, None)));
        }
    } else {
        // Calls and timers the run left pending (its inbox is empty, as checked).
        delete_calls_and_timers(conn, &c.instance_id)?;
    }
    let info = settle_end(conn, &c.instance_id, now, &mut receipt)?;
    Ok(Some((receipt, Some(Box::new(info)))))
}

/// [`step_in_tx`] for the step that finishes the call in the instance's held slot (claimed by
/// `c.owner`, first attempt, completed): the slot passes to the call this step claims, if
/// any, in the same `UPDATE` that moves the instance on. `None`, having written nothing, when
/// the call is not the held one or the step does not apply.
fn step_finishing_held(
    conn: &Tx<'_>,
    c: &PreparedCommit,
    now: u64,
    seq: u32,
) -> Result<Option<CommitReceipt>, StoreError> {
    if !is_plain_step(c) {
        return Ok(None);
    }
    let next_pos = c.expected_position + c.events.len() as u64;
    let held = held_candidate(c);
    // The slot stays with `c.owner` when the step claims a next call: `held_owner` is then
    // left out of the `SET`, so its index is not rewritten.
    let sql = if held.is_some() {
        "UPDATE instances SET next_pos = ?2, next_activation = ?3, ready = 0,
                lease_owner = NULL, lease_until = 0, updated_at = ?4, reason = NULL,
                held_seq = ?8, held_pos = ?9, held_until = ?10, held_at = ?4
         WHERE id = ?1 AND status = 'running' AND generation = ?5 AND next_pos = ?6
           AND held_seq = ?11 AND held_owner = ?7
           AND (lease_owner IS NULL OR lease_owner = ?7 OR lease_until < ?4)
           AND NOT EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?1)"
    } else {
        "UPDATE instances SET next_pos = ?2, next_activation = ?3, ready = 0,
                lease_owner = NULL, lease_until = 0, updated_at = ?4, reason = NULL,
                held_seq = ?8, held_pos = ?9, held_until = 0, held_at = ?4, held_owner = NULL
         WHERE id = ?1 AND status = 'running' AND generation = ?5 AND next_pos = ?6
           AND held_seq = ?11 AND held_owner = ?7
           AND (lease_owner IS NULL OR lease_owner = ?7 OR lease_until < ?4)
           AND NOT EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?1)"
    };
    let moved = conn
        .prepare_cached(sql)
        .and_then(|mut s| {
            s.execute(params![
                c.instance_id,
                next_pos as i64,
                c.activation + 1,
                now as i64,
                c.generation as i64,
                c.expected_position as i64,
                c.owner,
                held.map(|h| h.0),
                held.map(|h| h.1 as i64),
                (now + c.lease_ms) as i64,
                seq
            ])
        })
        .map_err(db("commit activation"))?;
    if moved == 0 {
        return Ok(None);
    }
    let key = changed_row(conn);
    if let (Some(h), Some(key)) = (held, key) {
        stage_chain(conn, c, now, h.0, key, false);
    }
    write_step(conn, c, now, held.map(|h| h.0), key).map(Some)
}

/// The common sequential step in one statement per table: when the activation neither ends
/// the run, nor starts children, nor publishes a status, and the instance is where the
/// activation expects it (running, same run, same position, not leased to another worker,
/// nothing in its inbox), moves the instance on and writes the events and tasks. Returns `None`,
/// having written nothing, when any of that does not hold; `commit_in_tx` then decides.
fn step_in_tx(
    conn: &Tx<'_>,
    c: &PreparedCommit,
    now: u64,
    finishing: Option<u32>,
) -> Result<Option<CommitReceipt>, StoreError> {
    if let Some(seq) = finishing {
        return step_finishing_held(conn, c, now, seq);
    }
    if !is_plain_step(c) {
        return Ok(None);
    }
    let next_pos = c.expected_position + c.events.len() as u64;
    // The call this step claims takes the held slot if it is free (SET sees the row as it was).
    let candidate = held_candidate(c);
    let took: Option<bool> = conn
        .prepare_cached(
            "UPDATE instances SET next_pos = ?2, next_activation = ?3, ready = 0,
                    lease_owner = NULL, lease_until = 0, updated_at = ?4, reason = NULL,
                    held_seq = CASE WHEN held_owner IS NULL AND ?8 IS NOT NULL
                                    THEN ?8 ELSE held_seq END,
                    held_pos = CASE WHEN held_owner IS NULL AND ?8 IS NOT NULL
                                    THEN ?9 ELSE held_pos END,
                    held_until = CASE WHEN held_owner IS NULL AND ?8 IS NOT NULL
                                      THEN ?10 ELSE held_until END,
                    held_at = CASE WHEN held_owner IS NULL AND ?8 IS NOT NULL
                                   THEN ?4 ELSE held_at END,
                    held_owner = CASE WHEN held_owner IS NULL AND ?8 IS NOT NULL
                                      THEN ?7 ELSE held_owner END
             WHERE id = ?1 AND status = 'running' AND generation = ?5 AND next_pos = ?6
               AND (lease_owner IS NULL OR lease_owner = ?7 OR lease_until < ?4)
               AND NOT EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?1)
             RETURNING ?8 IS NOT NULL AND held_seq IS ?8 AND held_owner IS ?7",
        )
        .and_then(|mut s| {
            s.query_row(
                params![
                    c.instance_id,
                    next_pos as i64,
                    c.activation + 1,
                    now as i64,
                    c.generation as i64,
                    c.expected_position as i64,
                    c.owner,
                    candidate.map(|h| h.0),
                    candidate.map(|h| h.1 as i64),
                    (now + c.lease_ms) as i64
                ],
                |r| r.get(0),
            )
            .optional()
        })
        .map_err(db("commit activation"))?;
    let Some(took) = took else {
        return Ok(None);
    };
    let held = candidate.filter(|_| took).map(|h| h.0);
    let key = changed_row(conn);
    if let (Some(seq), Some(key)) = (held, key) {
        stage_chain(conn, c, now, seq, key, false);
    }
    write_step(conn, c, now, held, key).map(Some)
}

/// Whether `c` is a plain step, which [`step_in_tx`] can write: it neither ends the run, nor
/// starts children, nor publishes a status, nor consumes inbox messages.
fn is_plain_step(c: &ActivationCommit) -> bool {
    c.end.is_none()
        && c.children.is_empty()
        && c.custom_status.is_none()
        && c.consumed_inbox.is_empty()
}

/// Whether `chain` (of `c`'s instance) is where `c`, the step that finishes held call `seq`,
/// expects its instance: same run and position, the call in the slot held by `c`'s owner.
fn chain_continues(chain: &Chain, c: &ActivationCommit, seq: u32) -> bool {
    chain.generation == c.generation
        && chain.next_pos == c.expected_position
        && chain.held_seq == seq
        && *chain.owner == *c.owner
}

/// Notes that `c`'s instance, whose row (key `rowid`) the open transaction just wrote, has
/// call `seq` in its held slot, held by `c`'s owner: its next step may be a chain step.
/// `fresh`: see [`Chain::fresh`].
fn stage_chain(conn: &Tx<'_>, c: &PreparedCommit, now: u64, seq: u32, rowid: i64, fresh: bool) {
    let Some(chains) = conn.chains() else {
        return;
    };
    let next_pos = c.expected_position + c.events.len() as u64;
    chains.stage(
        &c.instance_id,
        Chain {
            rowid,
            generation: c.generation,
            next_pos,
            held_seq: seq,
            // The commit's own: a worker shares one id with every commit it plans.
            owner: Arc::clone(&c.owner),
            held_until: now.saturating_add(c.lease_ms),
            row_next_pos: next_pos,
            row_held_seq: seq,
            fresh,
        },
    );
}

/// The sequential step of an instance in a held chain (see `held_chain`): its history row is
/// all it writes. Applies when `c` is a plain step that claims exactly one next call, which
/// takes the held slot, and the slot's lease has at least half a lease left (a step that
/// writes the row renews it). `None`, having written nothing, otherwise.
fn step_in_chain(
    conn: &Tx<'_>,
    c: &Arc<PreparedCommit>,
    now: u64,
    chain: &Chain,
) -> Result<Option<CommitReceipt>, StoreError> {
    let Some(chains) = conn.chains() else {
        return Ok(None);
    };
    if !is_plain_step(c) || !c.timers.is_empty() {
        return Ok(None);
    }
    let Some((seq, _)) = held_candidate(c) else {
        return Ok(None);
    };
    let scheduled = c
        .events
        .iter()
        .filter(|e| matches!(e, Event::ActivityScheduled { .. }))
        .count();
    if scheduled != 1 || chain.held_until < now.saturating_add(c.lease_ms / 2) {
        return Ok(None);
    }
    // The position is the last safeguard: a history row there already means the chain was
    // wrong; the ordinary path then decides. Kept aside for the batch's end, the row meets
    // such a collision there, and the batch runs again without keeping any (`deferred_rows`).
    let inserted = if keep_row(conn, chain.rowid, c, now) {
        Ok(1)
    } else {
        insert_row(
            conn,
            InstanceRef::Key(chain.rowid),
            c.expected_position,
            c.activation,
            &c.row,
            now,
        )
    };
    match inserted {
        Ok(_) => {}
        Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == ErrorCode::ConstraintViolation => {
            tracing::warn!(instance_id = %c.instance_id, position = c.expected_position, "a held chain met a history row at its position; taking the ordinary path");
            chains.forget(&c.instance_id);
            return Ok(None);
        }
        Err(e) => return Err(map_err("append events", &c.instance_id, e)),
    }
    insert_tasks_and_timers(conn, c, now, Some(seq))?;
    chains.stage(
        &c.instance_id,
        Chain {
            next_pos: c.expected_position + c.events.len() as u64,
            held_seq: seq,
            ..chain.clone()
        },
    );
    Ok(Some(CommitReceipt::default()))
}

/// The rest of a step once its instance has moved on: its events, and its tasks and timers
/// (`held`: the call that went to the held slot; `key`: the instance's, if known).
fn write_step(
    conn: &Tx<'_>,
    c: &PreparedCommit,
    now: u64,
    held: Option<u32>,
    key: Option<i64>,
) -> Result<CommitReceipt, StoreError> {
    append_commit_row(conn, key, c, now)?;
    insert_tasks_and_timers(conn, c, now, held)?;
    Ok(CommitReceipt::default())
}

fn load_in_tx(conn: &Connection, id: &str, from: u64) -> Result<LoadedInstance, StoreError> {
    let info = get_instance(conn, id)?.ok_or_else(|| StoreError::NotFound {
        instance_id: id.into(),
    })?;
    let events = read_events(conn, id, from)?;
    let inbox = read_inbox(conn, id)?;
    Ok(LoadedInstance {
        info,
        events,
        inbox,
    })
}

/// [`Store::load_and_replay`] inside one read snapshot: row, inbox, then the history, replayed
/// by the decoding thread as it decodes.
fn load_and_replay_in_tx(
    conn: &Connection,
    id: &str,
    start: ExecutionFactory,
    span: tracing::Span,
) -> Result<ReplayedInstance, StoreError> {
    let info = get_instance(conn, id)?.ok_or_else(|| StoreError::NotFound {
        instance_id: id.into(),
    })?;
    let inbox = read_inbox(conn, id)?;
    let execution = start(&info, &inbox);
    let loaded = LoadedInstance {
        info,
        events: Vec::new(),
        inbox,
    };
    let Some(execution) = execution else {
        return Ok(ReplayedInstance {
            loaded,
            execution: None,
            replay: Ok(()),
            events: 0,
        });
    };
    let replayed = read_events_into(
        conn,
        id,
        0,
        Replaying {
            execution,
            pending: Vec::with_capacity(REPLAY_BATCH),
            outcome: Ok(()),
            events: 0,
            span,
        },
    )?;
    let Replaying {
        mut execution,
        pending,
        mut outcome,
        events,
        span,
    } = replayed;
    if outcome.is_ok() {
        outcome = span.in_scope(|| execution.replay(&pending));
    }
    Ok(ReplayedInstance {
        loaded,
        execution: Some(execution),
        replay: outcome,
        events,
    })
}

fn read_inbox(conn: &Connection, id: &str) -> Result<Vec<InboxMessage>, StoreError> {
    let mut inbox = Vec::new();
    let mut stmt = conn
        .prepare_cached("SELECT id, body FROM inbox WHERE instance_id = ?1 ORDER BY id")
        .map_err(db("read inbox"))?;
    let rows = stmt
        .query_map([id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .map_err(db("read inbox"))?;
    for row in rows {
        let (msg_id, body) = row.map_err(db("read inbox"))?;
        let event = decode_json(id, || format!("inbox message {msg_id}"), &body)?;
        inbox.push(InboxMessage { id: msg_id, event });
    }
    Ok(inbox)
}

/// Where decoded history events go, in position order.
trait HistorySink: Send {
    fn push(&mut self, event: HistoryEvent);
}

impl HistorySink for Vec<HistoryEvent> {
    fn push(&mut self, event: HistoryEvent) {
        Vec::push(self, event);
    }
}

/// A sink that replays events as they come, whole activations at a time.
struct Replaying {
    execution: Execution,
    /// Decoded, not yet replayed: always whole activations, except the last one.
    pending: Vec<HistoryEvent>,
    /// The first divergence; replay stops there, reading goes on.
    outcome: Result<(), ReplayError>,
    events: u64,
    /// The caller's span, entered while coordinator code replays.
    span: tracing::Span,
}

/// Events replayed at a time by [`Replaying`] (rounded up to whole activations).
const REPLAY_BATCH: usize = 256;

impl HistorySink for Replaying {
    fn push(&mut self, event: HistoryEvent) {
        self.events += 1;
        if self.outcome.is_err() {
            return;
        }
        if self.pending.len() >= REPLAY_BATCH
            && self
                .pending
                .last()
                .is_some_and(|last| last.activation != event.activation)
        {
            self.outcome = self.span.in_scope(|| self.execution.replay(&self.pending));
            self.pending.clear();
        }
        self.pending.push(event);
    }
}

fn read_events(conn: &Connection, id: &str, from: u64) -> Result<Vec<HistoryEvent>, StoreError> {
    // Sized up front from the instance row: growing vectors of thousands of events by doubling
    // showed as page faults and copies in the profile of a cold load (W6).
    let expected: usize = conn
        .prepare_cached("SELECT next_pos FROM instances WHERE id = ?1")
        .and_then(|mut s| s.query_row([id], |r| r.get::<_, i64>(0)).optional())
        .map_err(db("read history"))?
        .map_or(0, |next| {
            usize::try_from(next.saturating_sub(from as i64)).unwrap_or(0)
        });
    read_events_into(conn, id, from, Vec::with_capacity(expected))
}

/// Reads the history of `id` from position `from` on into `sink`, in position order.
fn read_events_into<S: HistorySink>(
    conn: &Connection,
    id: &str,
    from: u64,
    mut sink: S,
) -> Result<S, StoreError> {
    deferred_rows::flush_for(conn, id).map_err(db("read events"))?;
    // From the row that holds position `from` (a row holds one activation's events).
    let mut stmt = conn
        .prepare_cached(
            "SELECT pos, len, activation, recorded_at, body FROM events
             WHERE instance_key = (SELECT key FROM instances WHERE id = ?1)
               AND pos >= COALESCE((SELECT pos FROM events
                                    WHERE instance_key = (SELECT key FROM instances WHERE id = ?1)
                                      AND pos <= ?2
                                    ORDER BY pos DESC LIMIT 1), ?2)
             ORDER BY pos",
        )
        .map_err(db("read history"))?;
    let mut rows = stmt
        .query(params![id, from as i64])
        .map_err(db("read history"))?;
    let from = from as i64;
    let read = |r: &Row<'_>| -> rusqlite::Result<RowHead> {
        Ok(RowHead {
            pos: r.get(0)?,
            len: r.get(1)?,
            activation: r.get(2)?,
            recorded_at: r.get(3)?,
        })
    };
    // A short history is decoded as it is read, straight from SQLite's buffer.
    for _ in 0..PARALLEL_DECODE_MIN {
        let Some(r) = rows.next().map_err(db("read history"))? else {
            return Ok(sink);
        };
        let head = read(r).map_err(db("read history"))?;
        let body = r
            .get_ref(4)
            .and_then(|v| v.as_str().map_err(rusqlite::Error::from))
            .map_err(db("read history"))?;
        decode_row(&mut sink, id, from, head, body)?;
    }
    // A long one is a pipeline: this thread steps through SQLite's rows, and two decoding
    // threads take turns at the chunks read so far. The first decodes the even chunks and hands
    // every event to the sink (which may replay them), in order: after each chunk of its own it
    // takes the next odd one, which the second decoded meanwhile. Decoding costs more than
    // reading here (W6, 20,000 events: ~14 ms against ~8 ms on this project's machine), so it
    // is split in two; the load then takes about as long as reading alone.
    std::thread::scope(|s| {
        let (to_first, first_inbox) = mpsc::sync_channel::<RawChunk>(8);
        let (to_second, second_inbox) = mpsc::sync_channel::<RawChunk>(8);
        let (decoded, decoded_inbox) =
            mpsc::sync_channel::<Result<Vec<HistoryEvent>, StoreError>>(8);
        // The sink goes to the first decoding thread once the second has been started or not,
        // with which of the two it is; if no thread can be started, this one decodes
        // everything itself.
        let (hand_over, handed) = mpsc::sync_channel::<(S, bool)>(1);
        let first = std::thread::Builder::new()
            .name("retrace-decode".into())
            .spawn_scoped(s, move || -> Result<S, StoreError> {
                let Ok((mut sink, paired)) = handed.recv() else {
                    return Err(StoreError::Closed);
                };
                let mut second_done = !paired;
                for chunk in first_inbox {
                    if second_done && paired {
                        // The second stopped without its next chunk (it panicked): the events
                        // would have a gap.
                        return Err(decoder_panicked());
                    }
                    decode_chunk(&mut sink, id, from, &chunk)?;
                    // The odd chunk after this one, if there is one (the second thread's
                    // channel closes when it has no more).
                    if !second_done {
                        match decoded_inbox.recv() {
                            Ok(events) => {
                                for event in events? {
                                    sink.push(event);
                                }
                            }
                            Err(_) => second_done = true,
                        }
                    }
                }
                Ok(sink)
            });
        let first = match first {
            Ok(first) => first,
            Err(e) => {
                tracing::debug!(error = %e, "no thread for decoding; decoding as the rows are read");
                while let Some(r) = rows.next().map_err(db("read history"))? {
                    let head = read(r).map_err(db("read history"))?;
                    let body = r
                        .get_ref(4)
                        .and_then(|v| v.as_str().map_err(rusqlite::Error::from))
                        .map_err(db("read history"))?;
                    decode_row(&mut sink, id, from, head, body)?;
                }
                return Ok(sink);
            }
        };
        let second = std::thread::Builder::new()
            .name("retrace-decode".into())
            .spawn_scoped(s, move || {
                for chunk in second_inbox {
                    let mut events = Vec::with_capacity(chunk.rows.len() * 2);
                    let result = decode_chunk(&mut events, id, from, &chunk).map(|()| events);
                    let failed = result.is_err();
                    // A send fails only when the first thread stopped (at an error of its own).
                    if decoded.send(result).is_err() || failed {
                        break;
                    }
                }
            });
        // Without a second thread (none could be started), the first decodes every chunk.
        let second = match second {
            Ok(second) => Some(second),
            Err(e) => {
                tracing::debug!(error = %e, "one thread decodes the whole history");
                None
            }
        };
        // The first thread waits for nothing else: the send cannot fail while it runs.
        let _ = hand_over.send((sink, second.is_some()));
        let mut to_second = second.as_ref().map(|_| to_second);
        let mut chunk = RawChunk::new();
        let mut sent = 0usize;
        let mut failed = None;
        loop {
            let row = match rows.next() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    failed = Some(map_err("read history", id, e));
                    break;
                }
            };
            let raw = read(row).and_then(|head| {
                let body = row.get_ref(4)?.as_str().map_err(rusqlite::Error::from)?;
                chunk.push(head, body);
                Ok(())
            });
            if let Err(e) = raw {
                failed = Some(map_err("read history", id, e));
                break;
            }
            if chunk.rows.len() == DECODE_CHUNK {
                let full = std::mem::replace(&mut chunk, RawChunk::new());
                // A send fails only when a decoding thread stopped at an undecodable event:
                // its error is what the caller sees.
                if send_chunk(&to_first, to_second.as_ref(), sent, full).is_err() {
                    break;
                }
                sent += 1;
            }
        }
        if !chunk.rows.is_empty() {
            let _ = send_chunk(&to_first, to_second.as_ref(), sent, chunk);
        }
        drop(to_first);
        to_second.take();
        let decoded = first.join().unwrap_or_else(|_| Err(decoder_panicked()));
        let second_ok = second.is_none_or(|second| second.join().is_ok());
        match (decoded, failed) {
            (Err(e), _) | (Ok(_), Some(e)) => Err(e),
            (Ok(_), None) if !second_ok => Err(decoder_panicked()),
            (Ok(sink), None) => Ok(sink),
        }
    })
}

/// The error of a load whose decoding thread panicked (a bug).
fn decoder_panicked() -> StoreError {
    StoreError::Database {
        operation: "read history".into(),
        detail: "a history decoding thread panicked".into(),
    }
}

/// Sends the `index`th chunk of a history to the decoding thread whose turn it is: the first
/// takes the even ones, the second (if there is one) the odd ones.
fn send_chunk(
    to_first: &mpsc::SyncSender<RawChunk>,
    to_second: Option<&mpsc::SyncSender<RawChunk>>,
    index: usize,
    chunk: RawChunk,
) -> Result<(), mpsc::SendError<RawChunk>> {
    match to_second {
        Some(second) if index % 2 == 1 => second.send(chunk),
        _ => to_first.send(chunk),
    }
}

/// Decodes every row of `chunk` into `sink`.
fn decode_chunk<S: HistorySink>(
    sink: &mut S,
    id: &str,
    from: i64,
    chunk: &RawChunk,
) -> Result<(), StoreError> {
    for &(head, start, end) in &chunk.rows {
        let body = chunk.text.get(start..end).unwrap_or_default();
        decode_row(sink, id, from, head, body)?;
    }
    Ok(())
}

/// The columns of an `events` row besides its body.
#[derive(Clone, Copy)]
struct RowHead {
    pos: i64,
    len: i64,
    activation: i64,
    recorded_at: i64,
}

/// Decodes the events of one `events` row into `sink`, leaving out those before `from`.
fn decode_row<S: HistorySink>(
    sink: &mut S,
    id: &str,
    from: i64,
    head: RowHead,
    body: &str,
) -> Result<(), StoreError> {
    for_each_event_in_row(id, head.pos, head.len, body, |pos, part| {
        if pos >= from {
            sink.push(decode_event(
                id,
                pos,
                head.activation,
                head.recorded_at,
                part,
            )?);
        }
        Ok(())
    })
}

/// Rows read from `events` past [`PARALLEL_DECODE_MIN`], on their way to the decoding thread:
/// the row's columns and its body's range in `text`, which holds the chunk's bodies one after
/// another (one allocation per chunk rather than one per row).
struct RawChunk {
    rows: Vec<(RowHead, usize, usize)>,
    text: String,
}

impl RawChunk {
    fn new() -> Self {
        RawChunk {
            rows: Vec::with_capacity(DECODE_CHUNK),
            text: String::with_capacity(DECODE_CHUNK * 128),
        }
    }

    fn push(&mut self, head: RowHead, body: &str) {
        let start = self.text.len();
        self.text.push_str(body);
        self.rows.push((head, start, self.text.len()));
    }
}

/// Rows read from one history beyond which the rest is decoded on two other threads, so that
/// a short history (most activations) costs no thread.
const PARALLEL_DECODE_MIN: usize = 512;

/// Rows handed to a decoding thread at a time.
const DECODE_CHUNK: usize = 256;

fn decode_event(
    id: &str,
    pos: i64,
    activation: i64,
    recorded_at: i64,
    body: &str,
) -> Result<HistoryEvent, StoreError> {
    let event = decode_event_json(id, pos, body)?;
    Ok(HistoryEvent {
        position: pos as u64,
        activation: activation as u32,
        recorded_at_ms: recorded_at as u64,
        event,
    })
}

/// Runs `f` inside a read transaction, so that its queries see one snapshot.
fn snapshot<R>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<R, StoreError>,
) -> Result<R, StoreError> {
    if !conn.is_autocommit() {
        // Already inside the writer's transaction (in-memory store).
        return f(conn);
    }
    conn.execute_batch("BEGIN").map_err(db("begin read"))?;
    let result = f(conn);
    let _ = conn.execute_batch("COMMIT");
    result
}

/// Worker ids become file names: keep them to a safe alphabet.
fn lock_file_name(owner: &str) -> String {
    owner
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn json_list(names: &[String]) -> Result<String, StoreError> {
    to_json(&names)
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_instance(&self, new: NewInstance) -> Result<CreateOutcome, StoreError> {
        let outcome = self
            .write(move |conn| create_in_tx(conn, &new, now_ms()))
            .await?;
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
        let owner = owner.to_string();
        let names = json_list(coordinators)?;
        self.write(move |conn| {
            let now = now_ms();
            // `INDEXED BY`: left to itself, the planner walked an index over every running
            // instance (the `OR` hides the partial index), waiting ones included, or scans the
            // table; the ready index holds only the ready rows, usually few.
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE instances SET lease_owner = ?1, lease_until = ?2
                     WHERE key IN (SELECT key FROM instances INDEXED BY instances_ready
                                  WHERE ready = 1 AND status = 'running'
                                    AND (lease_until < ?3 OR lease_owner = ?1)
                                    AND coordinator IN (SELECT value FROM json_each(?4))
                                  LIMIT ?5)
                     RETURNING id",
                )
                .map_err(db("claim instances"))?;
            let ids = stmt
                .query_map(
                    params![
                        owner,
                        (now + lease_ms) as i64,
                        now as i64,
                        names,
                        limit as i64
                    ],
                    |r| r.get::<_, String>(0),
                )
                .map_err(db("claim instances"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db("claim instances"))?;
            Ok(ids)
        })
        .await
    }

    async fn load(
        &self,
        instance_id: &str,
        from_position: u64,
    ) -> Result<LoadedInstance, StoreError> {
        let id = instance_id.to_string();
        self.read(move |conn| snapshot(conn, |conn| load_in_tx(conn, &id, from_position)))
            .await
    }

    async fn load_and_replay(
        &self,
        instance_id: &str,
        start: ExecutionFactory,
    ) -> Result<ReplayedInstance, StoreError> {
        if self.readers.is_none() {
            // In memory, reads run on the writer's thread: a long replay there would hold up
            // every write. Replay on the caller's side instead.
            let loaded = self.load(instance_id, 0).await?;
            return Ok(super::replay_loaded(loaded, start));
        }
        let id = instance_id.to_string();
        // Coordinator code replays on the store's threads: under the caller's span (the
        // activation's, with the instance id), so that its tracing output keeps its context.
        let span = tracing::Span::current();
        self.read(move |conn| snapshot(conn, |conn| load_and_replay_in_tx(conn, &id, start, span)))
            .await
    }

    async fn create_and_activate(
        &self,
        new: NewInstance,
        first: ActivationCommit,
    ) -> Result<(CreateOutcome, Option<CommitReceipt>), StoreError> {
        let ended = first.end.is_some();
        self.held_scan.note_lease(first.lease_ms);
        let first = Arc::new(PreparedCommit::new(first)?);
        let shared = Arc::clone(&first);
        let (outcome, mut receipt, info) = self
            .write(move |conn| {
                let now = now_ms();
                if let Some(created) = insert_stepped_instance(conn, &new, &shared, now)? {
                    return Ok(match created {
                        CreateOutcome::Created => {
                            (CreateOutcome::Created, Some(CommitReceipt::default()), None)
                        }
                        existing => (existing, None, None),
                    });
                }
                let claim = Some((&*shared.owner, shared.lease_ms));
                match insert_instance(conn, &new, now, claim)? {
                    CreateOutcome::Created => {
                        let receipt = commit_in_tx(conn, &shared, now)?;
                        let info = ended_info(conn, &shared)?;
                        Ok((CreateOutcome::Created, Some(receipt), info))
                    }
                    existing => Ok((existing, None, None)),
                }
            })
            .await?;
        if let Some(receipt) = &mut receipt {
            with_claimed_tasks(receipt, first);
        }
        self.remember_ended(info);
        match &receipt {
            Some(r) if ended => self.bump_ended(&r.woken),
            Some(r) if r.ready_again || !r.woken.is_empty() => self.bump(),
            _ => {}
        }
        Ok((outcome, receipt))
    }

    async fn commit_activation(
        &self,
        commit: ActivationCommit,
    ) -> Result<CommitReceipt, StoreError> {
        let ended = commit.end.is_some();
        self.held_scan.note_lease(commit.lease_ms);
        let commit = Arc::new(PreparedCommit::new(commit)?);
        let shared = Arc::clone(&commit);
        let (mut receipt, info) = self
            .write(move |conn| {
                catch_up(conn, &shared.instance_id)?;
                let receipt = commit_in_tx(conn, &shared, now_ms())?;
                Ok((receipt, ended_info(conn, &shared)?))
            })
            .await?;
        with_claimed_tasks(&mut receipt, commit);
        self.remember_ended(info);
        if ended {
            self.bump_ended(&receipt.woken);
        } else if !receipt.woken.is_empty() {
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
        let (id, owner, reason) = (
            instance_id.to_string(),
            owner.to_string(),
            reason.to_string(),
        );
        self.write(move |conn| {
            catch_up(conn, &id)?;
            conn.prepare_cached(
                "UPDATE instances SET status = 'stopped', reason = ?3, ready = 0, lease_owner = NULL,
                        lease_until = 0, updated_at = ?4
                 WHERE id = ?1 AND status = 'running' AND (lease_owner = ?2 OR lease_owner IS NULL)",
            )
            .and_then(|mut s| s.execute(params![id, owner, reason, now_ms() as i64]))
            .map_err(db("stop instance"))?;
            Ok(())
        })
        .await?;
        self.bump();
        Ok(())
    }

    async fn release_idle(&self, instance_id: &str, owner: &str) -> Result<(), StoreError> {
        let (id, owner) = (instance_id.to_string(), owner.to_string());
        let ready_again = self
            .write(move |conn| {
                catch_up(conn, &id)?;
                conn.prepare_cached(
                    "UPDATE instances
                     SET ready = EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?1),
                         lease_owner = NULL, lease_until = 0
                     WHERE id = ?1 AND lease_owner = ?2
                     RETURNING ready",
                )
                .and_then(|mut s| s.query_row(params![id, owner], |r| r.get(0)).optional())
                .map_err(db("release idle instance"))
            })
            .await?;
        // Ready again (a message came meanwhile): workers must look.
        if ready_again == Some(true) {
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
        let (id, owner, reason) = (
            instance_id.to_string(),
            owner.to_string(),
            reason.to_string(),
        );
        self.write(move |conn| {
            catch_up(conn, &id)?;
            conn.prepare_cached(
                "UPDATE instances SET reason = ?3, lease_owner = NULL, lease_until = 0
                 WHERE id = ?1 AND status = 'running'
                   AND (lease_owner = ?2 OR lease_owner IS NULL)",
            )
            .and_then(|mut s| s.execute(params![id, owner, reason]))
            .map_err(db("note waiting instance"))?;
            Ok(())
        })
        .await
    }

    async fn claim_tasks(
        &self,
        owner: &str,
        activities: &[String],
        limit: usize,
        lease_ms: u64,
    ) -> Result<Vec<ActivityTask>, StoreError> {
        let owner = owner.to_string();
        let names = json_list(activities)?;
        // Decided once, outside the operation: a batch that is run again (see `writer_loop`)
        // must scan again, not find the scan already counted as done.
        let scan = self.held_scan.due(now_ms());
        self.write(move |conn| {
            let now = now_ms();
            // Held calls whose lease ran out become claimable rows, like any expired task.
            if scan {
                expand_held_where(conn, "held_until <= ?1", &(now as i64))?;
            }
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE tasks SET lease_owner = ?1, due_at = ?2, attempt = attempt + 1,
                                     claimed_at = ?3
                     WHERE rowid IN (SELECT rowid FROM tasks
                                     WHERE due_at <= ?3
                                       AND name IN (SELECT value FROM json_each(?4))
                                     ORDER BY due_at LIMIT ?5)
                     RETURNING instance_id, seq, name, input, retry, attempt, generation",
                )
                .map_err(db("claim activity tasks"))?;
            let rows = stmt
                .query_map(
                    params![
                        owner,
                        (now + lease_ms) as i64,
                        now as i64,
                        names,
                        limit as i64
                    ],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, u32>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, u32>(5)?,
                            r.get::<_, i64>(6)?,
                        ))
                    },
                )
                .map_err(db("claim activity tasks"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db("claim activity tasks"))?;
            let mut tasks = Vec::with_capacity(rows.len());
            for (instance_id, seq, name, input, retry, attempt, generation) in rows {
                let input: Value =
                    decode_json(&instance_id, || format!("input of task {seq}"), &input)?;
                let retry: RetrySpec = decode_json(
                    &instance_id,
                    || format!("retry policy of task {seq}"),
                    &retry,
                )?;
                tasks.push(ActivityTask {
                    instance_id,
                    seq,
                    name,
                    input,
                    retry,
                    attempt,
                    generation: generation as u64,
                });
            }
            Ok(tasks)
        })
        .await
    }

    async fn finish_task(
        &self,
        owner: &str,
        task: &ActivityTask,
        outcome: AttemptOutcome,
        lease_ms: u64,
    ) -> Result<FinishReceipt, StoreError> {
        let owner = owner.to_string();
        let task = OwnedAttempt::of(task);
        let receipt = self
            .write(move |conn| {
                let now = now_ms();
                catch_up(conn, &task.instance_id)?;
                match &outcome {
                    AttemptOutcome::Final(event) => {
                        // Four statements: the common end of a fan-out call (W3: 1,000 of them).
                        let Some(held) = take_held_task(conn, task.key(), &owner)? else {
                            return Ok(FinishReceipt {
                                accepted: false,
                                instance_claimed: false,
                            });
                        };
                        journal_attempt(
                            conn,
                            task.key(),
                            held.claimed_at,
                            attempt_end(event),
                            now,
                        )?;
                        let dedupe = format!("seq:{}:{}", task.generation, task.seq);
                        let inserted =
                            insert_inbox(conn, &task.instance_id, Some(&dedupe), event, now)?;
                        // Ready, and leased to this worker unless another holds it. (Read,
                        // then written: see `take_held_task` on `RETURNING`.) A row that is
                        // ready already, and leased to this worker for half a lease or more
                        // (the renewer renews every third of one), is left as it is: in a
                        // fan-out, every call but the first to end finds it so, and the write
                        // would move its `instances_ready` entry each time (W3). Only when
                        // the outcome went into the inbox: that insert has then dropped every
                        // held chain (see `HeldChains::watch`), as writing the row would
                        // have dropped this instance's.
                        // (Claimable by this worker, ready, leased to it for half a lease.)
                        let row: Option<(bool, bool, bool)> = conn
                            .prepare_cached(
                                "SELECT lease_owner IS NULL OR lease_owner = ?2 OR lease_until < ?3,
                                        ready = 1, lease_owner IS ?2 AND lease_until >= ?4
                                 FROM instances WHERE id = ?1 AND status = 'running'",
                            )
                            .and_then(|mut s| {
                                s.query_row(
                                    params![
                                        task.instance_id,
                                        owner,
                                        now as i64,
                                        (now + lease_ms / 2) as i64
                                    ],
                                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                                )
                                .optional()
                            })
                            .map_err(db("finish activity task"))?;
                        let claimed = matches!(row, Some((true, _, _)));
                        match row {
                            None => Ok(0),
                            Some((true, true, true)) | Some((false, true, _)) if inserted => Ok(0),
                            Some((true, _, _)) => conn
                                .prepare_cached(
                                    "UPDATE instances SET ready = 1, lease_owner = ?2,
                                            lease_until = ?3
                                     WHERE id = ?1",
                                )
                                .and_then(|mut s| {
                                    s.execute(params![
                                        task.instance_id,
                                        owner,
                                        (now + lease_ms) as i64
                                    ])
                                }),
                            Some((false, _, _)) => conn
                                .prepare_cached("UPDATE instances SET ready = 1 WHERE id = ?1")
                                .and_then(|mut s| s.execute(params![task.instance_id])),
                        }
                        .map_err(db("finish activity task"))?;
                        Ok(FinishReceipt {
                            accepted: true,
                            instance_claimed: claimed,
                        })
                    }
                    AttemptOutcome::Retry {
                        next_attempt_at_ms,
                        error,
                    } => {
                        // A retry of the held call reschedules it as a row.
                        let held_here: bool = task.attempt == 1
                            && conn
                                .prepare_cached(
                                    "SELECT EXISTS (SELECT 1 FROM instances WHERE id = ?1
                                        AND held_seq = ?2 AND held_owner = ?3 AND generation = ?4)",
                                )
                                .and_then(|mut s| {
                                    s.query_row(
                                        params![
                                            task.instance_id,
                                            task.seq,
                                            owner,
                                            task.generation as i64
                                        ],
                                        |r| r.get(0),
                                    )
                                })
                                .map_err(db("finish activity task"))?;
                        if held_here {
                            match expand_held(conn, &task.instance_id) {
                                Err(e @ StoreError::Corrupt { .. }) => {
                                    // No row to reschedule: the instance stops, the retry is
                                    // refused (retrying it would fail the same way forever).
                                    stop_unexpandable(conn, &task.instance_id, &e)?;
                                    return Ok(FinishReceipt {
                                        accepted: false,
                                        instance_claimed: false,
                                    });
                                }
                                other => {
                                    other?;
                                }
                            }
                        }
                        let row: Option<(u32, Option<String>, i64, Option<i64>)> = conn
                            .prepare_cached(
                                "SELECT attempt, lease_owner, generation, claimed_at FROM tasks
                                 WHERE instance_id = ?1 AND seq = ?2",
                            )
                            .and_then(|mut s| {
                                s.query_row(params![task.instance_id, task.seq], |r| {
                                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                                })
                                .optional()
                            })
                            .map_err(db("finish activity task"))?;
                        let claimed_at = match row {
                            Some((attempt, Some(o), generation, claimed_at))
                                if attempt == task.attempt
                                    && o == owner
                                    && generation as u64 == task.generation =>
                            {
                                claimed_at
                            }
                            _ => {
                                return Ok(FinishReceipt {
                                    accepted: false,
                                    instance_claimed: false,
                                })
                            }
                        };
                        let next_attempt_at_ms = *next_attempt_at_ms;
                        let end = (AttemptEnd::Retry, Some(error.to_string()));
                        journal_attempt(conn, task.key(), claimed_at, end, now)?;
                        conn.prepare_cached(
                            "UPDATE tasks SET lease_owner = NULL, due_at = ?3, last_error = ?4
                             WHERE instance_id = ?1 AND seq = ?2",
                        )
                        .and_then(|mut s| {
                            s.execute(params![
                                task.instance_id,
                                task.seq,
                                next_attempt_at_ms as i64,
                                to_json(&error).unwrap_or_default()
                            ])
                        })
                        .map_err(db("schedule activity retry"))?;
                        Ok(FinishReceipt {
                            accepted: true,
                            instance_claimed: false,
                        })
                    }
                }
            })
            .await?;
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
        // The task's instance is the commit's, whose id the writer thread shares: no copy of it
        // to free there, but when a caller pairs a task with another instance's commit.
        let (seq, attempt, generation) = (task.seq, task.attempt, task.generation);
        let other_instance =
            (task.instance_id != commit.instance_id).then(|| task.instance_id.clone());
        let ended = commit.end.is_some();
        self.held_scan.note_lease(commit.lease_ms);
        let commit = Arc::new(PreparedCommit::new(commit)?);
        let shared = Arc::clone(&commit);
        let watched = ended && self.watched.is(&commit.instance_id);
        let (mut done, info) = self
            .write(move |conn| {
                let task = AttemptKey {
                    instance_id: other_instance.as_deref().unwrap_or(&shared.instance_id),
                    seq,
                    attempt,
                    generation,
                };
                let (done, ended) =
                    finish_and_activate_in_tx(conn, task, &shared, now_ms(), watched)?;
                // `Some(None)`: ended, and nobody waits to read the final row from memory.
                let info = match (&done, ended) {
                    (DirectFinish::Activated(_), Some(info)) => info,
                    (DirectFinish::Activated(_), None) => ended_info(conn, &shared)?,
                    (DirectFinish::Finished(_), _) => None,
                };
                Ok((done, info))
            })
            .await?;
        if ended {
            self.watched.forget(&commit.instance_id);
        }
        if let DirectFinish::Activated(receipt) = &mut done {
            with_claimed_tasks(receipt, commit);
        }
        self.remember_ended(info);
        match &done {
            DirectFinish::Activated(receipt) if ended => self.bump_ended(&receipt.woken),
            DirectFinish::Activated(receipt) if !receipt.woken.is_empty() => self.bump(),
            DirectFinish::Finished(receipt) if receipt.accepted && !receipt.instance_claimed => {
                self.bump()
            }
            _ => {}
        }
        Ok(done)
    }

    async fn renew_leases(&self, owner: &str, lease_ms: u64) -> Result<u64, StoreError> {
        let owner = owner.to_string();
        self.write(move |conn| {
            let until = (now_ms() + lease_ms) as i64;
            let a = conn
                .prepare_cached("UPDATE tasks SET due_at = ?2 WHERE lease_owner = ?1")
                .and_then(|mut s| s.execute(params![owner, until]))
                .map_err(db("renew leases"))?;
            let b = conn
                .prepare_cached("UPDATE instances SET lease_until = ?2 WHERE lease_owner = ?1")
                .and_then(|mut s| s.execute(params![owner, until]))
                .map_err(db("renew leases"))?;
            let c = conn
                .prepare_cached("UPDATE instances SET held_until = ?2 WHERE held_owner = ?1")
                .and_then(|mut s| s.execute(params![owner, until]))
                .map_err(db("renew leases"))?;
            Ok((a + b + c) as u64)
        })
        .await
    }

    async fn release_leases(&self, owner: &str) -> Result<(), StoreError> {
        let owner = owner.to_string();
        self.write(move |conn| {
            let now = now_ms() as i64;
            expand_held_where(conn, "held_owner = ?1", &owner)?;
            conn.prepare_cached(
                "UPDATE tasks SET lease_owner = NULL, due_at = ?2 WHERE lease_owner = ?1",
            )
            .and_then(|mut s| s.execute(params![owner, now]))
            .map_err(db("release leases"))?;
            conn.prepare_cached(
                "UPDATE instances SET lease_owner = NULL, lease_until = 0 WHERE lease_owner = ?1",
            )
            .and_then(|mut s| s.execute(params![owner]))
            .map_err(db("release leases"))?;
            Ok(())
        })
        .await?;
        self.bump();
        Ok(())
    }

    async fn fire_due_timers(&self, now: u64, limit: usize) -> Result<Vec<String>, StoreError> {
        let woken = self
            .write(move |conn| {
                let due: Vec<(String, u32, i64)> = conn
                    .prepare_cached(
                        "SELECT instance_id, seq, generation FROM timers WHERE fire_at <= ?1
                         ORDER BY fire_at LIMIT ?2",
                    )
                    .and_then(|mut s| {
                        s.query_map(params![now as i64, limit as i64], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        })?
                        .collect()
                    })
                    .map_err(db("fire timers"))?;
                let mut woken = Vec::with_capacity(due.len());
                for (instance_id, seq, generation) in due {
                    let dedupe = format!("timer:{generation}:{seq}");
                    insert_inbox(
                        conn,
                        &instance_id,
                        Some(&dedupe),
                        &Event::TimerFired { seq },
                        now,
                    )?;
                    conn.prepare_cached("DELETE FROM timers WHERE instance_id = ?1 AND seq = ?2")
                        .and_then(|mut s| s.execute(params![instance_id, seq]))
                        .map_err(db("fire timers"))?;
                    mark_ready(conn, &instance_id)?;
                    woken.push(instance_id);
                }
                Ok(woken)
            })
            .await?;
        if !woken.is_empty() {
            self.bump();
        }
        Ok(woken)
    }

    async fn next_due(&self) -> Result<Option<u64>, StoreError> {
        self.read(|conn| {
            let t: Option<i64> = conn
                .prepare_cached("SELECT MIN(fire_at) FROM timers")
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(db("next due"))?;
            let r: Option<i64> = conn
                .prepare_cached("SELECT MIN(due_at) FROM tasks WHERE lease_owner IS NULL")
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(db("next due"))?;
            Ok(match (t, r) {
                (Some(a), Some(b)) => Some(a.min(b) as u64),
                (a, b) => a.or(b).map(|v| v as u64),
            })
        })
        .await
    }

    async fn deliver_message(
        &self,
        instance_id: &str,
        event: Event,
        dedupe_key: Option<&str>,
    ) -> Result<Delivery, StoreError> {
        let id = instance_id.to_string();
        let dedupe = dedupe_key.map(str::to_string);
        // (The inner result: see `Answer`.)
        let delivery = self
            .write(move |conn| {
                let Some(info) = get_instance(conn, &id)? else {
                    return Ok(Err(StoreError::NotFound {
                        instance_id: id.clone(),
                    }));
                };
                if let Some(key) = dedupe.as_deref() {
                    // A key delivered before answers so even after the end: the message was
                    // delivered (the caller must not take it for lost).
                    let seen: bool = conn
                        .prepare_cached(
                            "SELECT EXISTS (SELECT 1 FROM delivered
                                            WHERE instance_id = ?1 AND dedupe = ?2)",
                        )
                        .and_then(|mut s| s.query_row(params![id, key], |r| r.get(0)))
                        .map_err(db("remember delivered message"))?;
                    if seen {
                        return Ok(Ok(Delivery::Duplicate));
                    }
                }
                if info.status.is_final() {
                    return Ok(Ok(Delivery::Ended(info.status)));
                }
                if let Some(key) = dedupe.as_deref() {
                    // Remembered for good: a resend after delivery is refused too.
                    conn.prepare_cached(
                        "INSERT INTO delivered (instance_id, dedupe) VALUES (?1, ?2)
                         ON CONFLICT (instance_id, dedupe) DO NOTHING",
                    )
                    .and_then(|mut s| s.execute(params![id, key]))
                    .map_err(db("remember delivered message"))?;
                }
                let accepted = insert_inbox(conn, &id, dedupe.as_deref(), &event, now_ms())?;
                // A duplicate must not mark ready an instance whose inbox is empty: it would be
                // claimed and found idle at every poll.
                if !accepted {
                    return Ok(Ok(Delivery::Duplicate));
                }
                mark_ready(conn, &id)?;
                Ok(Ok(Delivery::Accepted))
            })
            .await?;
        let delivery: Delivery = delivery?;
        if delivery == Delivery::Accepted {
            self.bump();
        }
        Ok(delivery)
    }

    async fn terminate(&self, instance_id: &str, reason: &str) -> Result<(), StoreError> {
        self.watched.forget(instance_id);
        let (id, reason) = (instance_id.to_string(), reason.to_string());
        // (The inner result: see `Answer`.)
        let answer: Answer<()> = self
            .write(move |conn| {
                let now = now_ms();
                catch_up(conn, &id)?;
                let Some(info) = get_instance(conn, &id)? else {
                    return Ok(Err(StoreError::NotFound {
                        instance_id: id.clone(),
                    }));
                };
                if info.status.is_final() {
                    return Ok(Err(StoreError::Ended {
                        instance_id: id.clone(),
                        status: info.status,
                    }));
                }
                let event = Event::InstanceTerminated {
                    reason: reason.clone(),
                };
                append_events(
                    conn,
                    &id,
                    info.next_position,
                    info.next_activation,
                    &[event],
                    now,
                )?;
                conn.prepare_cached(
                "UPDATE instances SET status = 'terminated', reason = ?2, next_pos = next_pos + 1,
                        next_activation = next_activation + 1, ready = 0, lease_owner = NULL,
                        lease_until = 0, updated_at = ?3, ended_at = ?3
                 WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![id, reason, now as i64]))
            .map_err(db("terminate instance"))?;
                delete_pending_work(conn, &id)?;
                if let Some(parent) = &info.parent {
                    let result = Err(Error::application("terminated", reason.clone()));
                    notify_parent(conn, parent, result, now)?;
                }
                Ok(Ok(()))
            })
            .await?;
        answer?;
        self.bump();
        Ok(())
    }

    async fn resume(&self, instance_id: &str) -> Result<(), StoreError> {
        let id = instance_id.to_string();
        let answer: Answer<()> = self.write(move |conn| {
            catch_up(conn, &id)?;
            let n = conn
                .prepare_cached(
                    "UPDATE instances SET status = 'running', reason = NULL,
                            ready = EXISTS (SELECT 1 FROM inbox WHERE instance_id = ?1),
                            -- A running instance keeps its lease: a worker may be activating it.
                            lease_owner = CASE WHEN status = 'stopped' THEN NULL ELSE lease_owner END,
                            lease_until = CASE WHEN status = 'stopped' THEN 0 ELSE lease_until END,
                            updated_at = ?2
                     WHERE id = ?1 AND status IN ('stopped', 'running')",
                )
                .and_then(|mut s| s.execute(params![id, now_ms() as i64]))
                .map_err(db("resume instance"))?;
            if n == 0 {
                return Ok(Err(match get_instance(conn, &id)? {
                    None => StoreError::NotFound {
                        instance_id: id.clone(),
                    },
                    Some(info) => StoreError::Ended {
                        instance_id: id.clone(),
                        status: info.status,
                    },
                }));
            }
            Ok(Ok(()))
        })
        .await?;
        answer?;
        self.bump();
        Ok(())
    }

    async fn describe(&self, instance_id: &str) -> Result<Option<InstanceInfo>, StoreError> {
        if let Some(info) = self
            .ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .infos
            .get(instance_id)
        {
            return Ok(Some(info.clone()));
        }
        let id = instance_id.to_string();
        // One read transaction: the row and how far its history goes (see `held_chain`).
        let info = self
            .read(move |conn| snapshot(conn, |conn| get_instance(conn, &id)))
            .await?;
        // Asked about before its end: its final row is kept in memory when it ends.
        if info.as_ref().is_some_and(|i| !i.status.is_final()) {
            self.watched.watch(instance_id);
        }
        Ok(info)
    }

    async fn history(&self, instance_id: &str) -> Result<Vec<HistoryEvent>, StoreError> {
        let id = instance_id.to_string();
        self.read(move |conn| {
            snapshot(conn, |conn| {
                if get_instance(conn, &id)?.is_none() {
                    return Err(StoreError::NotFound {
                        instance_id: id.clone(),
                    });
                }
                read_events(conn, &id, 0)
            })
        })
        .await
    }

    async fn list_instances(&self, filter: &ListFilter) -> Result<Vec<InstanceInfo>, StoreError> {
        let filter = filter.clone();
        // One read transaction: the rows and how far their histories go (see `held_chain`).
        self.read(move |conn| {
            snapshot(conn, |conn| {
                let sql = format!(
                    "SELECT {INSTANCE_COLUMNS} FROM instances
                 WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR coordinator = ?2)
                 ORDER BY created_at DESC, id LIMIT ?3"
                );
                // -1: no limit (also for a limit beyond what SQLite's integers hold).
                let limit = filter
                    .limit
                    .and_then(|l| i64::try_from(l).ok())
                    .unwrap_or(-1);
                let raws = conn
                    .prepare_cached(&sql)
                    .and_then(|mut s| {
                        s.query_map(
                            params![
                                filter.status.map(InstanceStatus::as_str),
                                filter.coordinator,
                                limit
                            ],
                            instance_from_row,
                        )?
                        .collect::<Result<Vec<_>, _>>()
                    })
                    .map_err(db("list instances"))?;
                raws.into_iter()
                    .map(|raw| {
                        let mut info = raw.decode()?;
                        settle_info(conn, &mut info)?;
                        Ok(info)
                    })
                    .collect()
            })
        })
        .await
    }

    fn ready_changes(&self) -> watch::Receiver<u64> {
        self.ready.subscribe()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    async fn mark_unclaimed(&self, known: &[String], min_wait_ms: u64) -> Result<u64, StoreError> {
        let names = json_list(known)?;
        self.write(move |conn| {
            let before = now_ms().saturating_sub(min_wait_ms) as i64;
            // The rows that look unclaimed for long enough may lag behind a held chain, whose
            // last step is their last change: caught up first.
            let candidates: Vec<String> = conn
                .prepare_cached(
                    "SELECT id FROM instances INDEXED BY instances_ready
                     WHERE ready = 1 AND status = 'running' AND reason IS NULL
                       AND lease_owner IS NULL AND updated_at < ?2
                       AND coordinator NOT IN (SELECT value FROM json_each(?1))",
                )
                .and_then(|mut s| {
                    s.query_map(params![names, before], |r| r.get(0))?
                        .collect::<Result<_, _>>()
                })
                .map_err(db("mark unclaimed instances"))?;
            for id in &candidates {
                catch_up(conn, id)?;
            }
            let n = conn
                .prepare_cached(
                    "UPDATE instances INDEXED BY instances_ready
                     SET reason = 'waiting for a worker that knows coordinator ' || coordinator
                     WHERE ready = 1 AND status = 'running' AND reason IS NULL
                       AND lease_owner IS NULL AND updated_at < ?2
                       AND coordinator NOT IN (SELECT value FROM json_each(?1))",
                )
                .and_then(|mut s| s.execute(params![names, before]))
                .map_err(db("mark unclaimed instances"))?;
            Ok(n as u64)
        })
        .await
    }

    async fn register_worker(&self, owner: &str) -> Result<(), StoreError> {
        let Some(dir) = self.workers_dir() else {
            return Ok(());
        };
        let io = |e: std::io::Error| StoreError::Database {
            operation: "register worker".into(),
            detail: format!("{}: {e}", dir.display()),
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        // Lock under a temporary name, then rename: a reaper never sees the final name unlocked.
        let name = lock_file_name(owner);
        let tmp = dir.join(format!("{name}.new"));
        let mut file = std::fs::File::create(&tmp).map_err(io)?;
        file.try_lock().map_err(|e| StoreError::Database {
            operation: "register worker".into(),
            detail: format!("{}: {e}", tmp.display()),
        })?;
        // The reaper reads the exact owner id from the file (the name is sanitized).
        std::io::Write::write_all(&mut file, owner.as_bytes()).map_err(io)?;
        std::fs::rename(&tmp, dir.join(format!("{name}.lock"))).map_err(io)?;
        lock_map(&self.worker_locks).insert(owner.to_string(), file);
        Ok(())
    }

    async fn unregister_worker(&self, owner: &str) -> Result<(), StoreError> {
        let Some(dir) = self.workers_dir() else {
            return Ok(());
        };
        if lock_map(&self.worker_locks).remove(owner).is_some() {
            let _ = std::fs::remove_file(dir.join(format!("{}.lock", lock_file_name(owner))));
        }
        Ok(())
    }

    async fn reap_dead_workers(&self) -> Result<u64, StoreError> {
        let Some(dir) = self.workers_dir() else {
            return Ok(0);
        };
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(0);
        };
        let own: Vec<String> = lock_map(&self.worker_locks)
            .keys()
            .map(|o| lock_file_name(o))
            .collect();
        let mut dead = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some(stem) = name.strip_suffix(".lock") else {
                continue;
            };
            if own.iter().any(|o| o == stem) {
                continue;
            }
            let Ok(file) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
            else {
                continue;
            };
            // The kernel releases a dead process's lock, whatever killed it.
            if file.try_lock().is_ok() {
                let owner = std::fs::read_to_string(&path).unwrap_or_else(|_| stem.to_string());
                dead.push((path, file, owner));
            }
        }
        if dead.is_empty() {
            return Ok(0);
        }
        let owners: Vec<String> = dead.iter().map(|(_, _, o)| o.clone()).collect();
        self.write(move |conn| {
            let now = now_ms() as i64;
            for owner in &owners {
                expand_held_where(conn, "held_owner = ?1", owner)?;
                conn.prepare_cached("UPDATE instances SET lease_until = 0 WHERE lease_owner = ?1")
                    .and_then(|mut s| s.execute([owner]))
                    .map_err(db("reap dead worker"))?;
                conn.prepare_cached(
                    "UPDATE tasks SET lease_owner = NULL, due_at = ?2 WHERE lease_owner = ?1",
                )
                .and_then(|mut s| s.execute(params![owner, now]))
                .map_err(db("reap dead worker"))?;
            }
            Ok(())
        })
        .await?;
        for (path, _file, owner) in &dead {
            tracing::info!(worker = %owner, "worker is dead; its work was handed over");
            let _ = std::fs::remove_file(path);
        }
        self.bump();
        Ok(dead.len() as u64)
    }

    async fn import_instance(
        &self,
        instance: ImportedInstance,
    ) -> Result<CreateOutcome, StoreError> {
        let outcome = self
            .write(move |conn| import_in_tx(conn, &instance, now_ms()))
            .await?;
        if outcome == CreateOutcome::Created {
            self.bump();
        }
        Ok(outcome)
    }

    async fn attempts(&self, instance_id: &str) -> Result<Vec<AttemptRecord>, StoreError> {
        let id = instance_id.to_string();
        self.read(move |conn| snapshot(conn, |conn| attempts_in_tx(conn, &id)))
            .await
    }
}

/// The attempt journal of `id`: its rows, and the attempts no row was written for (see
/// `finish_and_activate_in_tx`): a first attempt of the current run that completed, started
/// when its call was scheduled and ended when its outcome was recorded in history.
/// Every attempt of `id`: its journal rows and the attempts derived from its history.
pub(crate) fn attempts_in_tx(
    conn: &Connection,
    id: &str,
) -> Result<Vec<AttemptRecord>, StoreError> {
    let mut records = journaled_attempts(conn, id)?;
    let Some(info) = get_instance(conn, id)? else {
        return Ok(records);
    };
    let derived = derived_attempts(conn, id, info.generation, &records)?;
    records.extend(derived);
    records.sort_by_key(|r| (r.generation, r.seq, r.attempt));
    Ok(records)
}

/// The attempts of `id`'s run `generation` (its current one) that have no journal row among
/// `journaled`: first attempts that succeeded, claimed in the commit that scheduled their
/// call, which start and end when its two events were recorded (see `finish_and_activate_in_tx`).
fn derived_attempts(
    conn: &Connection,
    id: &str,
    generation: u64,
    journaled: &[AttemptRecord],
) -> Result<Vec<AttemptRecord>, StoreError> {
    let journaled: std::collections::BTreeSet<(u64, u32, u32)> = journaled
        .iter()
        .map(|r| (r.generation, r.seq, r.attempt))
        .collect();
    let mut derived = Vec::new();
    let mut scheduled_at = std::collections::BTreeMap::new();
    for e in read_events(conn, id, 0)? {
        match e.event {
            Event::ActivityScheduled { seq, .. } => {
                scheduled_at.insert(seq, e.recorded_at_ms);
            }
            Event::ActivityCompleted {
                seq, attempt: 1, ..
            } if !journaled.contains(&(generation, seq, 1)) => {
                if let Some(started) = scheduled_at.get(&seq) {
                    derived.push(AttemptRecord {
                        instance_id: id.to_string(),
                        generation,
                        seq,
                        attempt: 1,
                        started_at_ms: *started,
                        ended_at_ms: e.recorded_at_ms,
                        outcome: AttemptEnd::Completed,
                        error: None,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(derived)
}

/// Journals the attempts of `id`'s run `generation` that only its history tells (see
/// [`derived_attempts`]), before that history goes (continue-as-new): the journal keeps the
/// attempts of earlier runs.
fn journal_derived_attempts(conn: &Tx<'_>, id: &str, generation: u64) -> Result<(), StoreError> {
    let journaled = journaled_attempts(conn, id)?;
    let derived = derived_attempts(conn, id, generation, &journaled)?;
    if derived.is_empty() {
        return Ok(());
    }
    let mut insert = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO attempts
                 (instance_id, generation, seq, attempt, started_at, ended_at, outcome, error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL)",
        )
        .map_err(db("journal activity attempt"))?;
    for r in derived {
        insert
            .execute(params![
                r.instance_id,
                r.generation as i64,
                r.seq,
                r.attempt,
                r.started_at_ms as i64,
                r.ended_at_ms as i64,
                r.outcome.as_str()
            ])
            .map_err(db("journal activity attempt"))?;
    }
    Ok(())
}

/// The rows of `id`'s attempt journal.
fn journaled_attempts(conn: &Connection, id: &str) -> Result<Vec<AttemptRecord>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT generation, seq, attempt, started_at, ended_at, outcome, error
             FROM attempts WHERE instance_id = ?1 ORDER BY generation, seq, attempt",
        )
        .map_err(db("read attempts"))?;
    let rows = stmt
        .query_map([id], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, u32>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, Option<String>>(6)?,
            ))
        })
        .map_err(db("read attempts"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db("read attempts"))?;
    rows.into_iter()
        .map(
            |(generation, seq, attempt, started, ended, outcome, error)| {
                let outcome = AttemptEnd::parse(&outcome).ok_or_else(|| StoreError::Database {
                    operation: "read attempts".into(),
                    detail: format!(
                    "attempt {attempt} of call {seq} of {id} has an unknown outcome {outcome:?}"
                ),
                })?;
                Ok(AttemptRecord {
                    instance_id: id.to_string(),
                    generation: generation as u64,
                    seq,
                    attempt,
                    started_at_ms: started as u64,
                    ended_at_ms: ended as u64,
                    outcome,
                    error,
                })
            },
        )
        .collect()
}

/// Writes an imported or forked instance inside the current transaction; see
/// [`Store::import_instance`] for exactly what is written.
fn import_in_tx(
    conn: &Tx<'_>,
    i: &ImportedInstance,
    now: u64,
) -> Result<CreateOutcome, StoreError> {
    if let Some(existing) = get_instance(conn, &i.id)? {
        return Ok(CreateOutcome::Existing(existing));
    }
    retrace_sdk::history::check_shape(&i.id, 0, &i.events).map_err(|e| {
        StoreError::InvalidHistory {
            instance_id: i.id.clone(),
            detail: e.to_string(),
        }
    })?;
    let next_activation = match i.events.last() {
        Some(last) => last
            .activation
            .checked_add(1)
            .ok_or_else(|| StoreError::InvalidHistory {
                instance_id: i.id.clone(),
                detail: format!("activation number {} is out of range", last.activation),
            })?,
        None => 0,
    };
    let output = i.output.as_ref().map(to_json).transpose()?;
    let error = i.error.as_ref().map(to_json).transpose()?;
    let custom_status = i.custom_status.as_ref().map(to_json).transpose()?;
    let input = to_json(&i.input)?;
    conn.prepare_cached(
        "INSERT INTO instances (id, coordinator, status, input, output, error, reason,
                                custom_status, generation, next_pos, next_activation, ready,
                                created_at, updated_at, ended_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 0, ?9, ?10, ?11, ?12, ?13, ?14)",
    )
    .and_then(|mut s| {
        s.execute(params![
            i.id,
            i.coordinator,
            i.status.as_str(),
            input,
            output,
            error,
            i.reason,
            custom_status,
            i.events.len() as i64,
            next_activation,
            i.ready,
            i.created_at_ms as i64,
            now as i64,
            i.ended_at_ms.map(|t| t as i64)
        ])
    })
    .map_err(db("import instance"))?;
    {
        let mut ins = conn
            .prepare_cached(
                "INSERT INTO events (instance_key, pos, activation, kind, recorded_at, body)
                 VALUES ((SELECT key FROM instances WHERE id = ?1), ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(db("import history"))?;
        for e in &i.events {
            ins.execute(params![
                i.id,
                e.position as i64,
                e.activation,
                e.event.kind(),
                e.recorded_at_ms as i64,
                event_json(&e.event)?
            ])
            .map_err(db("import history"))?;
        }
    }
    for t in &i.tasks {
        let (input, retry) = (to_json(&t.input)?, to_json(&t.retry)?);
        conn.prepare_cached(
            "INSERT INTO tasks (instance_id, seq, generation, name, input, retry, attempt, due_at,
                                lease_owner, created_at)
             VALUES (?1, ?2, 0, ?3, ?4, ?5, 0, ?6, NULL, ?6)",
        )
        .and_then(|mut s| s.execute(params![i.id, t.seq, t.name, input, retry, now as i64]))
        .map_err(db("re-create activity task"))?;
    }
    for (seq, fire_at) in &i.timers {
        conn.prepare_cached(
            "INSERT INTO timers (instance_id, seq, generation, fire_at) VALUES (?1, ?2, 0, ?3)",
        )
        .and_then(|mut s| s.execute(params![i.id, seq, super::codec::stored_ms(*fire_at)]))
        .map_err(db("re-create timer"))?;
    }
    if i.start_in_inbox {
        let start = Event::InstanceStarted {
            coordinator: i.coordinator.clone(),
            input: i.input.clone(),
            parent: None,
        };
        insert_inbox(conn, &i.id, Some("start:0"), &start, now)?;
    }
    // Pair the shape check above with one on what was written.
    let written: i64 = conn
        .prepare_cached(
            "SELECT COALESCE(SUM(len), 0) FROM events
             WHERE instance_key = (SELECT key FROM instances WHERE id = ?1)",
        )
        .and_then(|mut s| s.query_row([&i.id], |r| r.get(0)))
        .map_err(db("import history"))?;
    assert_eq!(written as usize, i.events.len(), "imported history length");
    Ok(CreateOutcome::Created)
}

impl SqliteStore {
    /// Opens an existing store, for tools that inspect one (the `retrace` command-line tool).
    /// Unlike [`SqliteStore::open`], it never creates a file, and never turns a file of another
    /// program (an empty file, an SQLite database without Retrace's application id) into a
    /// store. An older schema is migrated as by [`SqliteStore::open`]. It does not make room
    /// for the WAL ahead as `open` does (a tool's handful of commits do not need it).
    ///
    /// # Errors
    /// [`StoreError::NotARetraceStore`] when the file does not exist, is empty or is not a
    /// Retrace store; [`StoreError::NewerSchema`]; database errors.
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path_ref = path.as_ref();
        let display = path_ref.display().to_string();
        let not_a_store = |detail: String| StoreError::NotARetraceStore {
            path: display.clone(),
            detail,
        };
        let meta = std::fs::metadata(path_ref).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => not_a_store("no such file".to_string()),
            _ => not_a_store(e.to_string()),
        })?;
        if !meta.is_file() {
            return Err(not_a_store("not a regular file".to_string()));
        }
        if meta.len() == 0 {
            return Err(not_a_store("the file is empty".to_string()));
        }
        {
            let conn = Connection::open_with_flags(
                path_ref,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(|e| map_err("open store", &display, e))?;
            let app_id: i64 = conn
                .pragma_query_value(None, "application_id", |r| r.get(0))
                .map_err(|e| map_err("open store", &display, e))?;
            if app_id != APPLICATION_ID {
                return Err(not_a_store(format!(
                    "application_id {app_id:#x}, not Retrace's {APPLICATION_ID:#x}"
                )));
            }
        }
        Self::open_prepared(path_ref, SqliteOptions::default(), false)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// Without the planner's stability guarantee, SQLite prepares a statement whose plan could
    /// use a bound value (here a `LIMIT`) anew at every run; every connection of the store is
    /// configured with it, and then nothing is prepared again.
    #[test]
    fn configured_connections_do_not_prepare_statements_again() {
        let reprepares = |conn: &Connection| {
            conn.execute_batch("CREATE TABLE t (a INTEGER); CREATE INDEX t_a ON t(a);")
                .unwrap();
            let mut stmt = conn
                .prepare("SELECT a FROM t WHERE a >= ?1 ORDER BY a LIMIT ?2")
                .unwrap();
            for limit in [5i64, 5, 7] {
                let mut rows = stmt.query(params![1, limit]).unwrap();
                while rows.next().unwrap().is_some() {}
            }
            stmt.get_status(rusqlite::StatementStatus::RePrepare)
        };
        let plain = Connection::open_in_memory().unwrap();
        assert!(reprepares(&plain) > 0, "SQLite's default behaviour");
        let configured = Connection::open_in_memory().unwrap();
        configure(&configured, &SqliteOptions::default(), ":memory:").unwrap();
        assert_eq!(reprepares(&configured), 0);
    }

    fn split(len: i64, body: &str) -> Result<Vec<(i64, String)>, StoreError> {
        let mut seen = Vec::new();
        for_each_event_in_row("i", 7, len, body, |pos, part| {
            seen.push((pos, part.to_string()));
            Ok(())
        })?;
        Ok(seen)
    }

    #[test]
    fn held_calls_are_scanned_for_expiry_once_per_interval() {
        let scan = HeldScan::default();
        assert!(scan.due(10_000), "the first claim scans");
        assert!(!scan.due(10_500));
        assert!(scan.due(11_000));
        // A commit with a short lease: scanned twice per lease from then on.
        scan.note_lease(100);
        assert!(!scan.due(11_049));
        assert!(scan.due(11_050));
        scan.note_lease(60_000);
        assert!(!scan.due(11_060), "the shortest lease seen counts");
        assert!(scan.due(11_100));
    }

    const LEASE: u64 = 60_000;

    /// `x` created, activated by `w1` with call 0 in its held slot, and taken one step on (a
    /// held chain from then on). Returns the held call and the history's length.
    async fn chained_instance(store: &SqliteStore) -> (ActivityTask, u64) {
        let new = NewInstance {
            id: "x".into(),
            coordinator: "c".into(),
            input: serde_json::json!(0),
            parent: None,
        };
        store.create_instance(new).await.unwrap();
        let claimed = store
            .claim_ready("w1", &["c".into()], 1, LEASE)
            .await
            .unwrap();
        assert_eq!(claimed, vec!["x".to_string()]);
        let loaded = store.load("x", 0).await.unwrap();
        let mut events: Vec<Event> = loaded.inbox.iter().map(|m| m.event.clone()).collect();
        events.push(scheduled(0));
        let consumed = loaded.inbox.iter().map(|m| m.id).collect();
        let commit =
            ActivationCommit::plan("x", "w1", 0, 0, 0, events, consumed, None, &|_| true, LEASE);
        let mut receipt = store.commit_activation(commit).await.unwrap();
        let task = receipt.claimed_tasks.remove(0);
        let task = step(store, &task, 1).await;
        let at = store.describe("x").await.unwrap().unwrap().next_position;
        assert_eq!(at, 4);
        (task, at)
    }

    fn scheduled(seq: u32) -> Event {
        Event::ActivityScheduled {
            seq,
            name: "act".into(),
            input: serde_json::json!(seq),
            retry: RetrySpec::default(),
        }
    }

    /// The sequential step that completes `task` and claims the next call, at `activation`.
    fn step_commit(task: &ActivityTask, position: u64, activation: u32) -> ActivationCommit {
        let events = vec![
            Event::ActivityCompleted {
                seq: task.seq,
                output: serde_json::json!(task.seq),
                attempt: task.attempt,
            },
            scheduled(task.seq + 1),
        ];
        ActivationCommit::plan(
            "x",
            "w1",
            0,
            position,
            activation,
            events,
            vec![],
            None,
            &|_| true,
            LEASE,
        )
    }

    async fn step(store: &SqliteStore, task: &ActivityTask, activation: u32) -> ActivityTask {
        let info = store.describe("x").await.unwrap().unwrap();
        let commit = step_commit(task, info.next_position, activation);
        match store.finish_and_activate(task, commit).await.unwrap() {
            DirectFinish::Activated(mut r) => r.claimed_tasks.remove(0),
            other => panic!("step not applied: {other:?}"),
        }
    }

    /// Holds the writer thread for a while, so that what is submitted meanwhile goes in one
    /// batch. (Submitted from outside tokio, the operation goes to the writer's queue: it
    /// cannot be committed on the caller's thread.)
    fn hold_writer(store: &Arc<SqliteStore>) -> std::thread::JoinHandle<()> {
        let store = Arc::clone(store);
        let held = std::thread::spawn(move || {
            futures::executor::block_on(store.write(|_: &Tx<'_>| {
                std::thread::sleep(Duration::from_millis(300));
                Ok(())
            }))
            .unwrap();
        });
        std::thread::sleep(Duration::from_millis(50));
        held
    }

    /// A store with `x` in a held chain, its writer held, and `x`'s next step submitted (the
    /// first operation of the next batch). Returns the scratch directory, the store, the
    /// step's position, the writer's holder, and the step's answer.
    async fn step_waiting_for_the_writer(
        name: &str,
    ) -> (
        PathBuf,
        Arc<SqliteStore>,
        u64,
        std::thread::JoinHandle<()>,
        tokio::task::JoinHandle<Result<DirectFinish, StoreError>>,
    ) {
        let (dir, store) = scratch_store(name);
        let store = Arc::new(store);
        let (task, at) = chained_instance(&store).await;
        let held = hold_writer(&store);
        let stepping = {
            let (store, commit) = (Arc::clone(&store), step_commit(&task, at, 2));
            tokio::spawn(async move { store.finish_and_activate(&task, commit).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        (dir, store, at, held, stepping)
    }

    /// Submits, behind what is queued, an operation that reads `x`'s history; answers its
    /// length.
    fn read_history_length(
        store: &Arc<SqliteStore>,
    ) -> tokio::task::JoinHandle<Result<usize, StoreError>> {
        let store = Arc::clone(store);
        tokio::spawn(async move {
            store
                .write(|conn: &Tx<'_>| read_events(conn, "x", 0).map(|e| e.len()))
                .await
        })
    }

    /// A held-chain step's row, kept aside for the end of its batch, is there for a later
    /// operation of the same batch that reads the instance's history.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_row_is_read_by_the_batch_that_keeps_it() {
        let (dir, store, at, held, stepping) = step_waiting_for_the_writer("kept-read").await;
        let read = read_history_length(&store);
        held.join().unwrap();
        assert!(matches!(
            stepping.await.unwrap().unwrap(),
            DirectFinish::Activated(_)
        ));
        assert_eq!(read.await.unwrap().unwrap() as u64, at + 2);
        assert_eq!(store.history("x").await.unwrap().len() as u64, at + 2);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A kept row that meets a row written at its position after it, in the same batch, runs
    /// the batch again without keeping rows: the step, first, keeps its position, and the
    /// later write fails alone, as when every row went in at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_row_that_collides_runs_the_batch_again_first_come_first_served() {
        collide("kept-collide", false).await;
    }

    /// The same, the collision met when a third operation of the batch reads the history
    /// (the kept row goes in then, in the middle of the batch): that read, run again, sees
    /// the step's row.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_kept_row_that_collides_on_a_read_runs_the_batch_again() {
        collide("kept-collide-read", true).await;
    }

    async fn collide(name: &str, read_after: bool) {
        let (dir, store, at, held, stepping) = step_waiting_for_the_writer(name).await;
        let forged = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .write(move |conn: &Tx<'_>| {
                        conn.execute(
                            "INSERT INTO events (instance_key, pos, activation, kind, recorded_at, body, len)
                             VALUES ((SELECT key FROM instances WHERE id = 'x'), ?1, 9,
                                     'signal_received', 0, '{}', 1)",
                            [at as i64],
                        )
                        .map_err(db("forge"))
                    })
                    .await
            })
        };
        let read = if read_after {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some(read_history_length(&store))
        } else {
            None
        };
        held.join().unwrap();
        if let Some(read) = read {
            assert_eq!(read.await.unwrap().unwrap() as u64, at + 2);
        }
        let mut receipt = match stepping.await.unwrap().unwrap() {
            DirectFinish::Activated(r) => r,
            other => panic!("step not applied: {other:?}"),
        };
        assert!(forged.await.unwrap().is_err(), "the forged row went in");
        let history = store.history("x").await.unwrap();
        assert_eq!(history.len() as u64, at + 2);
        assert!(matches!(
            history[at as usize].event,
            Event::ActivityCompleted { .. }
        ));
        // The instance goes on from there.
        let task = receipt.claimed_tasks.remove(0);
        assert_eq!(step(&store, &task, 3).await.seq, 3);
        assert_eq!(store.history("x").await.unwrap().len() as u64, at + 4);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_write_connection_gathers_its_wal_writes_only_with_full_durability() {
        let (dir, store) = scratch_store("writer-vfs");
        drop(store);
        let path = dir.join("store.db");
        let commit_on = |durability| {
            let options = SqliteOptions {
                durability,
                ..SqliteOptions::default()
            };
            let conn = open_writer(&path, &options).unwrap();
            configure(&conn, &options, "test").unwrap();
            let before = crate::store::wal_writes::tests::writes();
            conn.execute_batch("CREATE TABLE IF NOT EXISTS t (x); INSERT INTO t VALUES (1)")
                .unwrap();
            crate::store::wal_writes::tests::writes() - before
        };
        // Each commit's frames in one write (and the WAL's header, when it starts again).
        assert!(commit_on(Durability::Full) > 0);
        assert_eq!(commit_on(Durability::Normal), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store on a fresh file in a directory of its own (removed by the caller).
    fn scratch_store(name: &str) -> (PathBuf, SqliteStore) {
        let dir = std::env::temp_dir().join(format!(
            "retrace-{name}-{}-{}",
            std::process::id(),
            now_ms()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = SqliteStore::open(dir.join("store.db")).unwrap();
        (dir, store)
    }

    /// 3,000 commits of one 3 KB row each (~2 WAL frames a commit: ~6,000 frames in all);
    /// returns the WAL file's length in frames after them.
    async fn commit_rows(dir: &Path, store: &SqliteStore) -> u64 {
        for i in 0..3_000u32 {
            store
                .submit(
                    move |conn: &Tx<'_>| {
                        conn.execute(
                            "INSERT INTO delivered (instance_id, dedupe) VALUES (?1, ?2)",
                            params![format!("i{i}"), "x".repeat(3_000)],
                        )
                        .map_err(db("insert"))
                    },
                    true,
                )
                .await
                .unwrap();
        }
        let wal = std::fs::metadata(dir.join("store.db-wal")).unwrap().len();
        wal / (4096 + 24)
    }

    /// Under a steady stream of commits the WAL is checkpointed on the checkpointer's thread and
    /// restarted, and stays bounded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_is_checkpointed_off_the_writer_and_stays_bounded() {
        let (dir, store) = scratch_store("wal-bound");
        let frames = commit_rows(&dir, &store).await;
        let checkpointer = store
            .writer_conn
            .checkpointer
            .as_ref()
            .expect("a file store");
        crate::store::checkpoint::tests::wait_for_a_run(checkpointer);
        // Never restarted, it would hold all ~6,000 frames. On a loaded machine (other tests)
        // the checkpointer, at the lowest priority, may lag and the WAL pass the length made
        // room for, until the writer's own checkpoint (see `store/checkpoint.rs`).
        assert!(
            frames <= 2 * CHECKPOINT_INLINE_FRAMES as u64,
            "the WAL grew to {frames} frames"
        );
        let rows: i64 = Connection::open(dir.join("store.db"))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM delivered", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 3_000);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// With its checkpointer gone, the writer checkpoints the WAL itself at the checkpointer's
    /// threshold, as SQLite's automatic checkpoint did: the WAL stays within the length made
    /// room for at open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_its_checkpointer_the_writer_checkpoints_the_wal_itself() {
        let (dir, store) = scratch_store("wal-inline");
        let checkpointer = store
            .writer_conn
            .checkpointer
            .as_ref()
            .expect("a file store");
        checkpointer.close();
        let frames = commit_rows(&dir, &store).await;
        assert_eq!(checkpointer.runs(), 0);
        assert!(
            frames <= WAL_PRESIZE_FRAMES + 64,
            "the WAL grew to {frames} frames"
        );
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A store with one history of `rows` rows (alternately one and two `timer_fired` events,
    /// each event's seq being its position), the row at `damaged` (if any) not JSON.
    fn long_history(rows: usize, damaged: Option<usize>) -> (Connection, i64) {
        let conn = Connection::open_in_memory().expect("open");
        prepare_schema(&conn, ":memory:").expect("schema");
        conn.execute(
            "INSERT INTO instances (key, id, coordinator, status, input, created_at, updated_at)
             VALUES (1, 'i', 'c', 'running', 'null', 5, 5)",
            [],
        )
        .expect("instance");
        let mut pos = 0i64;
        for row in 0..rows {
            let len = 1 + (row % 2) as i64;
            let body = (pos..pos + len)
                .map(|seq| format!(r#"{{"type":"timer_fired","seq":{seq}}}"#))
                .collect::<Vec<_>>()
                .join(&EVENT_SEPARATOR.to_string());
            let body = if damaged == Some(row) {
                "{not json".to_string()
            } else {
                body
            };
            conn.execute(
                "INSERT INTO events (instance_key, pos, activation, kind, recorded_at, body, len)
                 VALUES (1, ?1, ?2, 'timer_fired', 5, ?3, ?4)",
                params![pos, row as i64, body, len],
            )
            .expect("insert");
            pos += len;
        }
        (conn, pos)
    }

    #[test]
    fn a_long_history_is_decoded_in_order_by_both_decoding_threads() {
        // Past the inline part, chunks 0..=5 and a part chunk: both threads take turns.
        let rows = PARALLEL_DECODE_MIN + 6 * DECODE_CHUNK + 17;
        let (conn, total) = long_history(rows, None);
        for from in [0, 1, 900, total - 1] {
            let events = read_events_into(&conn, "i", from as u64, Vec::new()).expect("read");
            assert_eq!(events.len() as i64, total - from, "from {from}");
            for (e, expected) in events.iter().zip(from..) {
                assert_eq!(e.position as i64, expected);
                assert_eq!(
                    e.event,
                    Event::TimerFired {
                        seq: expected as u32
                    }
                );
            }
        }
    }

    #[test]
    fn an_undecodable_row_stops_a_long_load_whichever_thread_decodes_it() {
        // Inline, then in the first decoding thread's chunk (0), the second's (1), the first's
        // again (2), and the last, short chunk.
        let rows = PARALLEL_DECODE_MIN + 3 * DECODE_CHUNK + 5;
        for damaged in [
            3,
            PARALLEL_DECODE_MIN + 10,
            PARALLEL_DECODE_MIN + DECODE_CHUNK + 10,
            PARALLEL_DECODE_MIN + 2 * DECODE_CHUNK,
            rows - 1,
        ] {
            let (conn, _) = long_history(rows, Some(damaged));
            let at = (damaged / 2 * 3 + damaged % 2) as i64;
            match read_events_into(&conn, "i", 0, Vec::new()) {
                Err(StoreError::Corrupt {
                    instance_id, what, ..
                }) => {
                    assert_eq!(instance_id, "i");
                    assert!(
                        what.contains(&format!("position {at}")),
                        "row {damaged}: {what}"
                    );
                }
                other => panic!("row {damaged}: {:?}", other.map(|e| e.len())),
            }
        }
    }

    #[test]
    fn a_history_row_holds_its_events_one_per_line() {
        assert_eq!(split(1, "{}").ok(), Some(vec![(7, "{}".to_string())]));
        assert_eq!(
            split(3, "{\"a\":1}\n{}\n[2]").ok(),
            Some(vec![
                (7, "{\"a\":1}".to_string()),
                (8, "{}".to_string()),
                (9, "[2]".to_string())
            ])
        );
        // A length that does not match is reported, and nothing past `len` is handed out.
        for (len, body) in [(2, "{}"), (2, "{}\n{}\n{}"), (0, "{}\n{}")] {
            match split(len, body) {
                Err(StoreError::Corrupt {
                    instance_id, what, ..
                }) => {
                    assert_eq!(instance_id, "i");
                    assert!(what.contains("position 7"), "{what}");
                }
                other => panic!("{len} {body:?}: {other:?}"),
            }
        }
    }

    /// The kinds written without being built are the ones built for any other row.
    #[test]
    fn a_rows_kinds_are_its_events_kinds_joined() {
        use serde_json::json;
        let completed = Event::ActivityCompleted {
            seq: 0,
            output: json!(1),
            attempt: 1,
        };
        let scheduled = Event::ActivityScheduled {
            seq: 1,
            name: "a".into(),
            input: json!(1),
            retry: retrace_sdk::RetryPolicy::default().spec(),
        };
        let ended = Event::InstanceCompleted { output: json!(2) };
        let fired = Event::TimerFired { seq: 2 };
        let rows: [&[Event]; 6] = [
            &[],
            std::slice::from_ref(&fired),
            &[completed.clone(), scheduled.clone()],
            &[completed.clone(), ended.clone()],
            &[fired.clone(), scheduled.clone()],
            &[completed, scheduled, ended],
        ];
        for events in rows {
            let row = HistoryRow::encode(events).unwrap();
            let joined = events.iter().map(Event::kind).collect::<Vec<_>>().join(",");
            assert_eq!(row.kind, joined);
            assert_eq!(row.len, events.len());
        }
    }
}
