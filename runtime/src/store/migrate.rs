//! Moving up: copying an SQLite store's instances into a PostgreSQL store
//! (`retrace migrate --from sqlite://… --to postgres://…`).
//!
//! # What is copied
//! Every instance row with everything in flight: its history (event bodies byte for byte, with
//! positions, activations and recording times), its undelivered inbox (in arrival order, with
//! the dedupe keys), the dedupe keys of the messages already delivered (so that a signal sent
//! again with the same id is still ignored, delivered or not), its activity tasks (attempt
//! counts and retry due times kept), its timers, and its attempt journal (with the attempts the
//! SQLite store derives from the history written out as rows). Generations, parent
//! links and custom statuses are kept, so that children still report to their parents and
//! continue-as-new goes on.
//!
//! # Leases
//! The copy is meant for a stopped store: it refuses to start while a worker of the source
//! runs (its lock file beside the store is held, even by an idle worker) or any lease is live
//! (a worker died less than a lease ago), and it does not copy leases: a
//! copied instance or task is free for the first worker of the target, as after a graceful
//! shutdown (a task whose attempt was interrupted counts that attempt, as
//! [`Store::release_leases`](super::Store::release_leases) does).
//!
//! # Exactly once
//! Each instance is copied in one target transaction, with all of its rows, so that a
//! migration interrupted anywhere leaves whole instances only. Running it again copies what is
//! missing and skips instances already there when they are identical (same coordinator and creation
//! time, same run, same history length, same status); an instance of the same id that differs is reported, never
//! overwritten. The source is only read, from one snapshot.

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::url::StoreUrl;
use super::AttemptRecord;
use crate::clock::now_ms;
use crate::error::StoreError;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;

/// One instance of the source, as stored (JSON payloads as their stored text).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawInstance {
    pub(crate) id: String,
    pub(crate) coordinator: String,
    pub(crate) status: String,
    pub(crate) input: String,
    pub(crate) output: Option<String>,
    pub(crate) error: Option<String>,
    pub(crate) reason: Option<String>,
    pub(crate) custom_status: Option<String>,
    pub(crate) parent_id: Option<String>,
    pub(crate) parent_seq: Option<i64>,
    pub(crate) generation: i64,
    pub(crate) next_pos: i64,
    pub(crate) next_activation: i64,
    pub(crate) ready: bool,
    pub(crate) created_at: i64,
    pub(crate) updated_at: i64,
    pub(crate) ended_at: Option<i64>,
    /// (position, activation, kind, recorded_at, body), by position.
    pub(crate) events: Vec<(i64, i64, String, i64, String)>,
    /// (dedupe key, body, created_at), in arrival order.
    pub(crate) inbox: Vec<(Option<String>, String, i64)>,
    pub(crate) tasks: Vec<RawTask>,
    /// (position, generation, fire_at).
    pub(crate) timers: Vec<(i64, i64, i64)>,
    /// Dedupe keys of the messages delivered so far (signal ids, cancel), so that a resend is
    /// still refused after the move.
    pub(crate) delivered: Vec<String>,
    /// The attempt journal, every attempt (those the SQLite store only derives from the
    /// history included): `retrace show` and `timeline` read it.
    pub(crate) attempts: Vec<AttemptRecord>,
}

/// An activity task of the source, without its lease.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawTask {
    pub(crate) seq: i64,
    pub(crate) generation: i64,
    pub(crate) name: String,
    pub(crate) input: String,
    pub(crate) retry: String,
    pub(crate) attempt: i64,
    pub(crate) due_at: i64,
    pub(crate) last_error: Option<String>,
    pub(crate) created_at: i64,
}

/// What copying one instance did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyOutcome {
    /// Copied with all its rows.
    Copied,
    /// An identical instance was already there (an earlier run of the migration).
    AlreadyThere,
    /// An instance of that id exists and differs: nothing was written.
    Different,
}

/// What [`migrate_store`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationReport {
    /// Instances copied by this run.
    pub copied: u64,
    /// Instances already in the target, identical (copied by an earlier run).
    pub already_there: u64,
    /// Ids present in both stores with different contents: left alone in the target.
    pub different: Vec<String>,
    /// History events copied.
    pub events: u64,
    /// Undelivered inbox messages copied.
    pub inbox: u64,
    /// Activity tasks copied.
    pub tasks: u64,
    /// Timers copied.
    pub timers: u64,
}

fn db(operation: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |e| StoreError::Database {
        operation: operation.to_string(),
        detail: e.to_string(),
    }
}

/// Copies every instance of the SQLite store at `source` into `target`; see the module docs.
///
/// # Errors
/// [`StoreError::NotARetraceStore`] when `source` is not an existing Retrace store;
/// [`StoreError::NewerSchema`]; [`StoreError::Busy`] when the source still has live leases
/// (stop its workers, wait a lease, run again); database errors. Instances copied before an
/// error stay copied; running again finishes the job.
pub async fn migrate_store(
    source: impl AsRef<Path>,
    target: &PostgresStore,
) -> Result<MigrationReport, StoreError> {
    let source = source.as_ref().to_path_buf();
    let instances = tokio::task::spawn_blocking(move || read_source(&source))
        .await
        .map_err(|e| StoreError::Database {
            operation: "read source store".into(),
            detail: e.to_string(),
        })??;
    let mut report = MigrationReport::default();
    for instance in &instances {
        match target.copy_instance(instance).await? {
            CopyOutcome::Copied => {
                report.copied += 1;
                report.events += instance.events.len() as u64;
                report.inbox += instance.inbox.len() as u64;
                report.tasks += instance.tasks.len() as u64;
                report.timers += instance.timers.len() as u64;
            }
            CopyOutcome::AlreadyThere => report.already_there += 1,
            CopyOutcome::Different => report.different.push(instance.id.clone()),
        }
    }
    target.wake_workers();
    Ok(report)
}

/// [`migrate_store`] between two store URLs, as `retrace migrate --from sqlite://… --to
/// postgres://…` takes them: `from` names an SQLite file (`sqlite://path` or a plain path),
/// `to` a PostgreSQL store (`postgres://…`, with `?schema=` if wanted).
///
/// # Errors
/// [`StoreError::Database`] when the URLs name other kinds of stores, and those of
/// [`migrate_store`] and [`PostgresStore::connect`].
pub async fn migrate_urls(from: &str, to: &str) -> Result<MigrationReport, StoreError> {
    let unsupported = |detail: String| StoreError::Database {
        operation: "migrate store".into(),
        detail,
    };
    let source = match StoreUrl::parse(from)? {
        StoreUrl::Sqlite(path) => path,
        other => {
            return Err(unsupported(format!(
                "the source must be an SQLite file (sqlite://path), not {other}"
            )))
        }
    };
    // Before the target is contacted (and maybe created): a source that is missing, foreign,
    // too new or in use is refused, and left as it is.
    refuse_running_source(&source)?;
    check_source(&source)?;
    let target = match StoreUrl::parse(to)? {
        StoreUrl::Postgres(url) => PostgresStore::connect(&url).await?,
        other => {
            return Err(unsupported(format!(
                "the target must be a PostgreSQL store (postgres://…), not {other}"
            )))
        }
    };
    migrate_store(source, &target).await
}

/// Refuses a source a worker runs on. A running worker may be idle (no lease), yet it would go
/// on firing timers and taking signals in the source after the copy: its lock file beside the
/// store says it runs.
fn refuse_running_source(path: &Path) -> Result<(), StoreError> {
    let workers = super::sqlite::live_workers(path);
    if workers > 0 {
        return Err(StoreError::Busy {
            operation: "migrate store".into(),
            detail: format!(
                "{} is used by {workers} running worker(s): stop every process using it first",
                path.display()
            ),
        });
    }
    Ok(())
}

/// Refuses a source that is missing, not a Retrace store, or of a schema newer than this
/// build's, reading it only (a read-only connection: nothing is created or upgraded).
fn check_source(path: &Path) -> Result<(), StoreError> {
    let display = path.display().to_string();
    if !path.is_file() {
        return Err(StoreError::NotARetraceStore {
            path: display,
            detail: "no such file".into(),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db("open source store"))?;
    super::sqlite::check_schema(&conn, &display).map(|_| ())
}

/// Reads every instance of the store at `path` from one snapshot, refusing while leases are live.
fn read_source(path: &Path) -> Result<Vec<RawInstance>, StoreError> {
    let display = path.display().to_string();
    if !path.is_file() {
        return Err(StoreError::NotARetraceStore {
            path: display,
            detail: "no such file".into(),
        });
    }
    refuse_running_source(path)?;
    // Opening it checks that it is a Retrace store of a schema this build knows (and migrates an
    // older one), exactly as a worker would.
    SqliteStore::open(path)?.close();
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db("open source store"))?;
    conn.busy_timeout(crate::limits::BUSY_TIMEOUT)
        .map_err(db("open source store"))?;
    conn.execute_batch("BEGIN")
        .map_err(db("read source store"))?;
    let result = read_snapshot(&conn, &display);
    let _ = conn.execute_batch("COMMIT");
    result
}

fn read_snapshot(conn: &Connection, display: &str) -> Result<Vec<RawInstance>, StoreError> {
    let now = now_ms() as i64;
    let live: i64 = conn
        .query_row(
            "SELECT (SELECT count(*) FROM instances WHERE lease_owner IS NOT NULL AND lease_until >= ?1)
                  + (SELECT count(*) FROM tasks WHERE lease_owner IS NOT NULL AND due_at >= ?1)
                  + (SELECT count(*) FROM instances
                     WHERE held_owner IS NOT NULL AND held_until >= ?1)",
            [now],
            |r| r.get(0),
        )
        .map_err(db("read source store"))?;
    if live > 0 {
        return Err(StoreError::Busy {
            operation: "migrate store".into(),
            detail: format!(
                "{display} has {live} live lease(s): stop its workers (and wait one lease) first"
            ),
        });
    }
    let mut stmt = conn
        .prepare(
            "SELECT id, coordinator, status, input, output, error, reason, custom_status,
                    parent_id, parent_seq, generation, next_pos, next_activation, ready,
                    created_at, updated_at, ended_at
             FROM instances ORDER BY created_at, id",
        )
        .map_err(db("read source instances"))?;
    let mut instances = stmt
        .query_map([], |r| {
            Ok(RawInstance {
                id: r.get(0)?,
                coordinator: r.get(1)?,
                status: r.get(2)?,
                input: r.get(3)?,
                output: r.get(4)?,
                error: r.get(5)?,
                reason: r.get(6)?,
                custom_status: r.get(7)?,
                parent_id: r.get(8)?,
                parent_seq: r.get(9)?,
                generation: r.get(10)?,
                next_pos: r.get(11)?,
                next_activation: r.get(12)?,
                ready: r.get::<_, i64>(13)? != 0,
                created_at: r.get(14)?,
                updated_at: r.get(15)?,
                ended_at: r.get(16)?,
                events: Vec::new(),
                inbox: Vec::new(),
                tasks: Vec::new(),
                timers: Vec::new(),
                delivered: Vec::new(),
                attempts: Vec::new(),
            })
        })
        .map_err(db("read source instances"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db("read source instances"))?;
    // A row left behind its held chain (a worker stopped mid-chain) is read as its history
    // says (see `held_chain`).
    for i in &mut instances {
        if let Some(end) = super::held_chain::tail_end(conn, &i.id, i.next_pos)? {
            i.next_pos = end.next_pos;
            i.next_activation = end.next_activation;
            i.updated_at = i.updated_at.max(end.recorded_at);
        }
    }
    let mut events = conn
        .prepare(
            "SELECT pos, activation, kind, recorded_at, body, len FROM events
             WHERE instance_key = (SELECT key FROM instances WHERE id = ?1) ORDER BY pos",
        )
        .map_err(db("read source history"))?;
    let mut inbox = conn
        .prepare("SELECT dedupe, body, created_at FROM inbox WHERE instance_id = ?1 ORDER BY id")
        .map_err(db("read source inbox"))?;
    let mut tasks = conn
        .prepare(
            "SELECT seq, generation, name, input, retry, attempt, due_at, lease_owner, last_error,
                    created_at
             FROM tasks WHERE instance_id = ?1 ORDER BY seq",
        )
        .map_err(db("read source tasks"))?;
    let mut timers = conn
        .prepare("SELECT seq, generation, fire_at FROM timers WHERE instance_id = ?1 ORDER BY seq")
        .map_err(db("read source timers"))?;
    let mut delivered = conn
        .prepare("SELECT dedupe FROM delivered WHERE instance_id = ?1 ORDER BY dedupe")
        .map_err(db("read source delivered ids"))?;
    for i in &mut instances {
        let rows: Vec<(i64, i64, String, i64, String, i64)> = events
            .query_map([&i.id], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .and_then(|rows| rows.collect())
            .map_err(db("read source history"))?;
        // A row holds one activation's events (their kinds joined by commas): one per event.
        for (pos, activation, kinds, recorded_at, body, len) in rows {
            let mut kinds = kinds.split(',');
            super::sqlite::for_each_event_in_row(&i.id, pos, len, &body, |at, part| {
                let kind = kinds.next().unwrap_or_default().to_string();
                i.events
                    .push((at, activation, kind, recorded_at, part.to_string()));
                Ok(())
            })?;
        }
        i.inbox = inbox
            .query_map([&i.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .and_then(|rows| rows.collect())
            .map_err(db("read source inbox"))?;
        i.tasks = tasks
            .query_map([&i.id], |r| {
                let leased = r.get::<_, Option<String>>(7)?.is_some();
                let due_at: i64 = r.get(6)?;
                Ok(RawTask {
                    seq: r.get(0)?,
                    generation: r.get(1)?,
                    name: r.get(2)?,
                    input: r.get(3)?,
                    retry: r.get(4)?,
                    attempt: r.get(5)?,
                    // A leased task's due time is its (expired) lease: visible at once.
                    due_at: if leased { due_at.min(now) } else { due_at },
                    last_error: r.get(8)?,
                    created_at: r.get(9)?,
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(db("read source tasks"))?;
        // The call in the instance's held slot is a task like the others (its lease expired).
        if let Some(call) = super::sqlite::read_held(conn, &i.id)? {
            i.tasks.push(RawTask {
                seq: i64::from(call.seq),
                generation: call.generation,
                name: call.name,
                input: call.input,
                retry: call.retry,
                attempt: 1,
                due_at: call.until.min(now),
                last_error: None,
                created_at: call.started_at,
            });
            i.tasks.sort_by_key(|t| t.seq);
        }
        i.timers = timers
            .query_map([&i.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .and_then(|rows| rows.collect())
            .map_err(db("read source timers"))?;
        i.delivered = delivered
            .query_map([&i.id], |r| r.get(0))
            .and_then(|rows| rows.collect())
            .map_err(db("read source delivered ids"))?;
        i.attempts = super::sqlite::attempts_in_tx(conn, &i.id)?;
        // The history is contiguous from 0 up to the next position; a store that says otherwise
        // is not copied half-way.
        let contiguous = i.events.iter().enumerate().all(|(k, e)| e.0 == k as i64);
        if !contiguous || i.events.len() as i64 != i.next_pos {
            return Err(StoreError::Corrupt {
                instance_id: i.id.clone(),
                what: "history".into(),
                detail: format!(
                    "{} events, next position {}, positions contiguous: {contiguous}",
                    i.events.len(),
                    i.next_pos
                ),
            });
        }
    }
    Ok(instances)
}
