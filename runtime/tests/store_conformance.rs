//! Store conformance suite: one set of tests that every [`Store`] implementation runs.
//!
//! Each case below runs against an SQLite file, an in-memory SQLite store and, when the
//! `RETRACE_PG_URL` environment variable names a server (for example
//! `postgres://postgres@127.0.0.1:5432/test`), PostgreSQL. Each PostgreSQL test works in a schema
//! of its own (`retrace_test_<random>`), dropped at the end whatever the outcome, so that the
//! tests run in parallel and leave nothing behind. Without `RETRACE_PG_URL`, the PostgreSQL tests
//! say on stderr that they were not run and why, and pass.
//!
//! A few cases need a second handle on the same storage (standing for another process): they
//! are not applicable to the in-memory store, and say so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/schema9.rs"]
mod schema9;

use futures::FutureExt;
use retrace_runtime::store::{
    ActivationCommit, ActivityTask, AttemptEnd, AttemptOutcome, CommitReceipt, CreateOutcome,
    DirectFinish, FinishReceipt, NewInstance,
};
use retrace_runtime::{
    Client, Delivery, InstanceStatus, ListFilter, PostgresOptions, PostgresStore, SharedStore,
    SqliteStore, StoreError, StoreUrl, Worker,
};
use retrace_sdk::{
    Activity, ActivityContext, ActivityError, Context, Coordinator, Error, Event, ParentRef,
    RetryPolicy, RetrySpec,
};
use serde_json::{json, Value};
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The environment variable naming the PostgreSQL server the PostgreSQL tests use.
const PG_URL_ENV: &str = "RETRACE_PG_URL";
/// A lease long enough never to expire during a test.
const LEASE_MS: u64 = 60_000;
/// How long to wait for something another handle (process) does.
const PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    SqliteFile,
    SqliteMemory,
    Postgres,
}

/// One store under test, and what is needed to open it again or to remove it.
struct Harness {
    backend: Backend,
    store: SharedStore,
    /// The SQLite file (its folder is removed with the harness).
    path: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
    /// The PostgreSQL server URL and the test's schema.
    pg: Option<(String, String)>,
    /// Extra PostgreSQL schemas made by the test, dropped at the end.
    extra_schemas: Mutex<Vec<String>>,
}

/// Says, once per run and past the test harness's output capture (so that it shows even when
/// the tests pass), that the PostgreSQL tests were not run and why.
fn say_not_run(test: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "store_conformance: the PostgreSQL tests were NOT RUN ({test} and every other \
             postgres::* case pass without running): {PG_URL_ENV} is not set; set it to a \
             server, e.g. {PG_URL_ENV}=postgres://postgres@127.0.0.1:5432/test"
        );
    });
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn random_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_string()
}

/// A plain connection for setting up and removing test schemas.
async fn pg_admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("{PG_URL_ENV}={url}: cannot connect: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

impl Harness {
    /// The harness for `backend`, or `None` (after saying why on stderr) when it is not
    /// available here.
    async fn new(backend: Backend, test: &str) -> Option<Harness> {
        match backend {
            Backend::SqliteFile => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("store.db");
                let store: SharedStore = Arc::new(SqliteStore::open(&path).unwrap());
                Some(Harness {
                    backend,
                    store,
                    path: Some(path),
                    _dir: Some(dir),
                    pg: None,
                    extra_schemas: Mutex::default(),
                })
            }
            Backend::SqliteMemory => Some(Harness {
                backend,
                store: Arc::new(SqliteStore::open_in_memory().unwrap()),
                path: None,
                _dir: None,
                pg: None,
                extra_schemas: Mutex::default(),
            }),
            Backend::Postgres => {
                let Ok(url) = std::env::var(PG_URL_ENV) else {
                    say_not_run(test);
                    return None;
                };
                let schema = format!("retrace_test_{}", random_suffix());
                pg_admin(&url)
                    .await
                    .batch_execute(&format!("CREATE SCHEMA {schema}"))
                    .await
                    .unwrap();
                let store = PostgresStore::connect_with(
                    &url,
                    PostgresOptions::default().with_schema(&schema),
                )
                .await
                .unwrap();
                Some(Harness {
                    backend,
                    store: Arc::new(store),
                    path: None,
                    _dir: None,
                    pg: Some((url, schema)),
                    extra_schemas: Mutex::default(),
                })
            }
        }
    }

    /// Another handle on the same storage, as another process would open it; `None` for the
    /// in-memory store.
    async fn reopen(&self) -> Option<Result<SharedStore, StoreError>> {
        match self.backend {
            Backend::SqliteFile => {
                let path = self.path.as_ref().unwrap();
                Some(SqliteStore::open(path).map(|s| Arc::new(s) as SharedStore))
            }
            Backend::SqliteMemory => None,
            Backend::Postgres => {
                let (url, schema) = self.pg.as_ref().unwrap();
                let sep = if url.contains('?') { '&' } else { '?' };
                // Through the URL form, as workers and tools open it.
                let url = format!("{url}{sep}schema={schema}");
                Some(
                    PostgresStore::connect(&url)
                        .await
                        .map(|s| Arc::new(s) as SharedStore),
                )
            }
        }
    }

    /// Marks the storage as written by a newer Retrace (schema version + 1).
    async fn bump_schema_version(&self) -> i64 {
        match self.backend {
            Backend::SqliteFile => {
                let conn = rusqlite::Connection::open(self.path.as_ref().unwrap()).unwrap();
                let newer = retrace_runtime::store::sqlite::SCHEMA_VERSION + 1;
                conn.pragma_update(None, "user_version", newer).unwrap();
                newer
            }
            Backend::SqliteMemory => unreachable!("no second handle on an in-memory store"),
            Backend::Postgres => {
                let (url, schema) = self.pg.as_ref().unwrap();
                let newer = retrace_runtime::store::postgres::SCHEMA_VERSION + 1;
                pg_admin(url)
                    .await
                    .execute(
                        &format!("UPDATE {schema}.retrace_schema SET version = $1"),
                        &[&newer],
                    )
                    .await
                    .unwrap();
                newer
            }
        }
    }

    /// Opens a store on storage that another program already uses (a table of its own, no
    /// Retrace marks); returns the result and a check that the storage is unchanged.
    async fn open_foreign(&self) -> Option<(Result<SharedStore, StoreError>, bool)> {
        match self.backend {
            Backend::SqliteFile => {
                let path = self.path.as_ref().unwrap().with_file_name("foreign.db");
                {
                    let conn = rusqlite::Connection::open(&path).unwrap();
                    conn.execute_batch("CREATE TABLE accounts (id INTEGER PRIMARY KEY)")
                        .unwrap();
                }
                let opened = SqliteStore::open(&path).map(|s| Arc::new(s) as SharedStore);
                let conn = rusqlite::Connection::open(&path).unwrap();
                let tables: i64 = conn
                    .query_row(
                        "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
                        [],
                        |r| r.get(0),
                    )
                    .unwrap();
                let version: i64 = conn
                    .pragma_query_value(None, "user_version", |r| r.get(0))
                    .unwrap();
                Some((opened, tables == 1 && version == 0))
            }
            Backend::SqliteMemory => None,
            Backend::Postgres => {
                let (url, _) = self.pg.as_ref().unwrap();
                let schema = format!("retrace_test_{}", random_suffix());
                self.extra_schemas.lock().unwrap().push(schema.clone());
                let admin = pg_admin(url).await;
                admin
                    .batch_execute(&format!(
                        "CREATE SCHEMA {schema}; CREATE TABLE {schema}.accounts (id INT PRIMARY KEY)"
                    ))
                    .await
                    .unwrap();
                let opened = PostgresStore::connect_with(
                    url,
                    PostgresOptions::default().with_schema(&schema),
                )
                .await
                .map(|s| Arc::new(s) as SharedStore);
                let tables: i64 = admin
                    .query_one(
                        "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = $1",
                        &[&schema],
                    )
                    .await
                    .unwrap()
                    .get(0);
                Some((opened, tables == 1))
            }
        }
    }

    /// The URL of this store, and of a store that does not exist (a file or schema never made).
    fn urls(&self) -> Option<(String, String)> {
        match self.backend {
            Backend::SqliteFile => {
                let path = self.path.as_ref().unwrap();
                let missing = path.with_file_name("missing.db");
                Some((
                    format!("sqlite://{}", path.display()),
                    format!("sqlite://{}", missing.display()),
                ))
            }
            Backend::SqliteMemory => None,
            Backend::Postgres => {
                let (url, schema) = self.pg.as_ref().unwrap();
                let sep = if url.contains('?') { '&' } else { '?' };
                let missing = format!("retrace_test_{}", random_suffix());
                self.extra_schemas.lock().unwrap().push(missing.clone());
                Some((
                    format!("{url}{sep}schema={schema}"),
                    format!("{url}{sep}schema={missing}"),
                ))
            }
        }
    }

    /// Whether the storage a missing-store URL names was left absent.
    async fn still_missing(&self, missing_url: &str) -> bool {
        match self.backend {
            Backend::Postgres => {
                let (url, _) = self.pg.as_ref().unwrap();
                let schema = missing_url.rsplit("schema=").next().unwrap().to_string();
                let n: i64 = pg_admin(url)
                    .await
                    .query_one(
                        "SELECT count(*) FROM pg_namespace WHERE nspname = $1",
                        &[&schema],
                    )
                    .await
                    .unwrap()
                    .get(0);
                n == 0
            }
            _ => !self
                .path
                .as_ref()
                .unwrap()
                .with_file_name("missing.db")
                .exists(),
        }
    }

    /// A stamp of instance `id`'s stored row that changes whenever the row is written:
    /// PostgreSQL's row version (`xmin`), the SQLite file's lease columns; `None` for the
    /// in-memory store.
    async fn instance_row_stamp(&self, id: &str) -> Option<String> {
        match self.backend {
            Backend::SqliteFile => {
                let conn = rusqlite::Connection::open(self.path.as_ref().unwrap()).unwrap();
                let stamp: String = conn
                    .query_row(
                        "SELECT ready || '/' || lease_owner || '/' || lease_until
                         FROM instances WHERE id = ?1",
                        [id],
                        |r| r.get(0),
                    )
                    .unwrap();
                Some(stamp)
            }
            Backend::SqliteMemory => None,
            Backend::Postgres => {
                let (url, schema) = self.pg.as_ref().unwrap();
                let row = pg_admin(url)
                    .await
                    .query_one(
                        &format!("SELECT xmin::text FROM {schema}.instances WHERE id = $1"),
                        &[&id],
                    )
                    .await
                    .unwrap();
                Some(row.get(0))
            }
        }
    }

    /// Whether another handle on the same storage hears of changes without polling.
    fn notifies_other_handles(&self) -> bool {
        self.backend == Backend::Postgres
    }

    /// Removes what the test made (PostgreSQL schemas; the SQLite folder goes with the harness).
    async fn cleanup(self) {
        let Harness {
            store,
            pg,
            extra_schemas,
            ..
        } = self;
        drop(store);
        if let Some((url, schema)) = pg {
            let admin = pg_admin(&url).await;
            let mut schemas = extra_schemas.into_inner().unwrap();
            schemas.push(schema);
            for s in schemas {
                if let Err(e) = admin
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {s} CASCADE"))
                    .await
                {
                    eprintln!("could not drop test schema {s}: {e}");
                }
            }
        }
    }
}

/// Runs each case against every backend: `mod sqlite_file`, `mod sqlite_memory`, `mod postgres`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite_file {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::run(super::Backend::SqliteFile, stringify!($case), |h| {
                        Box::pin(super::cases::$case(h))
                    })
                    .await;
                }
            )*
        }
        mod sqlite_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::run(super::Backend::SqliteMemory, stringify!($case), |h| {
                        Box::pin(super::cases::$case(h))
                    })
                    .await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::run(super::Backend::Postgres, stringify!($case), |h| {
                        Box::pin(super::cases::$case(h))
                    })
                    .await;
                }
            )*
        }
    };
}

type CaseFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>>;

/// Runs one case; cleans up whether it passed or panicked, then reports the panic.
async fn run(backend: Backend, name: &str, case: for<'a> fn(&'a Harness) -> CaseFuture<'a>) {
    let Some(harness) = Harness::new(backend, name).await else {
        return;
    };
    let result = AssertUnwindSafe(case(&harness)).catch_unwind().await;
    harness.cleanup().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

conformance!(
    append_at_expected_position,
    stale_position_conflicts,
    a_failing_operation_leaves_the_rest_of_its_batch,
    lease_is_owned,
    lease_expires_and_is_taken_over,
    leases_renew_and_release,
    claim_ready_skips_rows_others_hold,
    timers_fire_once_when_due,
    signals_buffered_in_order_and_deduped,
    delivery_says_what_became_of_a_message,
    create_is_idempotent,
    create_and_activate_is_one_commit,
    activity_tasks_count_attempts,
    activity_outcome_recorded_once,
    a_fan_outs_outcomes_keep_its_lease_alive,
    activity_task_lease_expires,
    continue_as_new_bumps_generation,
    continue_as_new_drops_the_old_runs_late_outcomes,
    continue_as_new_detaches_the_old_runs_children,
    a_detached_child_started_again_by_id_reports_to_its_new_caller,
    a_child_id_that_cannot_be_this_calls_child_fails_the_call,
    a_child_id_that_cannot_name_an_instance_fails_the_call,
    terminate_ends_instance,
    children_report_to_parents,
    a_stopped_parent_keeps_its_childs_result,
    stop_and_resume,
    release_idle_hands_back_the_lease,
    finish_and_activate_commits_both,
    attempts_are_journaled,
    a_task_claimed_with_its_activation_starts_its_attempt_then,
    a_call_claimed_with_its_activation_is_a_task_like_any_other,
    a_run_that_ends_claims_no_call,
    calls_claimed_with_their_activations_hand_over_race_and_end,
    mark_unclaimed_notes_unknown_coordinators,
    list_and_describe,
    changes_wake_waiters,
    reopen_keeps_everything,
    newer_schema_refused,
    foreign_database_refused,
    dead_workers_reaped,
    open_existing_creates_nothing,
    workers_run_coordinators,
);

/// Takes the history table back before schema 7: one row per event, no `len` column (and
/// the tables back before schema 10).
fn history_to_single_event_rows(conn: &rusqlite::Connection) {
    conn.execute_batch(schema9::TO_SCHEMA_9).unwrap();
    let rows: Vec<(String, i64, i64, String, i64, String, i64)> = conn
        .prepare("SELECT instance_id, pos, activation, kind, recorded_at, body, len FROM events")
        .unwrap()
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    conn.execute_batch("DELETE FROM events; ALTER TABLE events DROP COLUMN len;")
        .unwrap();
    for (id, pos, activation, kinds, at, body, len) in rows {
        let bodies: Vec<&str> = body.split('\n').collect();
        let kinds: Vec<&str> = kinds.split(',').collect();
        assert_eq!(bodies.len() as i64, len);
        for (i, (body, kind)) in bodies.iter().zip(&kinds).enumerate() {
            conn.execute(
                "INSERT INTO events (instance_id, pos, activation, kind, recorded_at, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                rusqlite::params![id, pos + i as i64, activation, kind, at, body],
            )
            .unwrap();
        }
    }
}

/// A held call whose `activity_scheduled` event can no longer be read (damaged behind the
/// store's back) cannot become a task: its instance is stopped with the reason (guarantee 8)
/// instead of waiting forever with no call held by anyone and none to claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_unreadable_held_call_stops_its_instance() {
    let dir = std::env::temp_dir().join(format!("retrace-held-{}", random_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("held.db");
    let s: SharedStore = Arc::new(SqliteStore::open(&path).unwrap());
    for id in ["damaged", "sound"] {
        create_and_claim(&s, id, "w1").await;
        let receipt = activate(&s, "w1", id, vec![scheduled(0, "act")], true)
            .await
            .unwrap();
        assert_eq!(receipt.claimed_tasks.len(), 1);
    }
    let damaged = rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE events SET body = replace(body, '\"name\":\"act\"', '\"name\":7')
             WHERE instance_key = (SELECT key FROM instances WHERE id = 'damaged')",
            [],
        )
        .unwrap();
    assert_eq!(damaged, 1);
    // The worker goes: its held calls become tasks, but for the unreadable one.
    s.release_leases("w1").await.unwrap();
    let info = s.describe("damaged").await.unwrap().unwrap();
    assert_eq!(info.status, InstanceStatus::Stopped, "{info:?}");
    assert!(
        info.reason
            .as_deref()
            .unwrap_or("")
            .contains("undecodable event at position 1"),
        "{info:?}"
    );
    let tasks = s
        .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
        .await
        .unwrap();
    let ids: Vec<&str> = tasks.iter().map(|t| t.instance_id.as_str()).collect();
    assert_eq!(ids, vec!["sound"], "the other instance goes on");
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The step `owner` commits for `id` (run 0) at `position` and `activation`: `events`, every
/// call they schedule claimed.
fn chain_step(
    id: &str,
    owner: &str,
    position: u64,
    activation: u32,
    events: Vec<Event>,
) -> ActivationCommit {
    ActivationCommit::plan(
        id,
        owner,
        0,
        position,
        activation,
        events,
        vec![],
        None,
        &|_| true,
        LEASE_MS,
    )
}

/// `id` created and activated by `owner` with call 0 claimed (in its held slot), then taken
/// `steps` sequential steps further as a worker takes them: each completes the held call and
/// claims the next, in one `finish_and_activate`. Returns the call held at the end.
async fn held_chain(s: &SharedStore, owner: &str, id: &str, steps: u32) -> ActivityTask {
    create_and_claim(s, id, owner).await;
    let mut receipt = activate(s, owner, id, vec![scheduled(0, "act")], true)
        .await
        .unwrap();
    let mut task = receipt.claimed_tasks.remove(0);
    for _ in 0..steps {
        let info = s.describe(id).await.unwrap().unwrap();
        let commit = chain_step(
            id,
            owner,
            info.next_position,
            info.next_activation,
            vec![
                completed_event(&task, json!(task.seq)),
                scheduled(task.seq + 1, "act"),
            ],
        );
        match s.finish_and_activate(&task, commit).await.unwrap() {
            DirectFinish::Activated(mut r) => task = r.claimed_tasks.remove(0),
            other => panic!("step after call {} not applied: {other:?}", task.seq),
        }
    }
    task
}

/// `next_pos` as `id`'s instance row says, read behind the store's back.
fn row_position(path: &std::path::Path, id: &str) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row("SELECT next_pos FROM instances WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .unwrap()
}

/// Checks, behind the store's back, what lets the store read a history's tail only for rows
/// with a held slot: every instance row that lags behind its history has its slot set.
/// Returns how many rows lag.
fn assert_only_held_rows_lag(path: &std::path::Path) -> usize {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut rows = conn
        .prepare(
            "SELECT i.id, i.next_pos, i.held_seq IS NOT NULL,
                    (SELECT COALESCE(MAX(pos + len), 0) FROM events WHERE instance_key = i.key)
             FROM instances i",
        )
        .unwrap();
    let rows: Vec<(String, i64, bool, i64)> = rows
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut lagging = 0;
    for (id, next_pos, held, end) in rows {
        if next_pos != end {
            assert!(
                held && next_pos < end,
                "{id}: row at {next_pos}, history ends at {end}, slot set: {held}"
            );
            lagging += 1;
        }
    }
    lagging
}

/// Positions of `id`'s history, which must be 0, 1, 2… without gaps.
async fn assert_contiguous(s: &SharedStore, id: &str) -> u64 {
    let history = s.history(id).await.unwrap();
    for (i, e) in history.iter().enumerate() {
        assert_eq!(e.position, i as u64, "{id}: {history:?}");
    }
    history.len() as u64
}

/// A scratch directory with a store file in it, removed when dropped (declare it before the
/// stores on its file, so that they go first).
struct Scratch {
    dir: PathBuf,
    path: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("retrace-{name}-{}", random_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("store.db");
        Scratch { dir, path }
    }

    /// A store handle on the file (a process of its own, as far as the store can tell).
    fn store(&self) -> SharedStore {
        Arc::new(SqliteStore::open(&self.path).unwrap())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sequential steps in a held chain write their history row only (the instance row lags),
/// yet every reader sees the instance as its history says, and the held slot hands on the
/// chain's last call, not the one the row last named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_held_chain_rows_lag_but_read_as_their_history() {
    let scratch = Scratch::new("chain");
    let path = scratch.path.clone();
    let s = scratch.store();
    let held = held_chain(&s, "w1", "chain", 6).await;
    assert_eq!(held.seq, 6);
    // Started, call 0, then six (outcome, next call) pairs.
    assert_eq!(assert_contiguous(&s, "chain").await, 14);
    assert!(
        row_position(&path, "chain") < 14,
        "the chain's steps wrote the instance row"
    );
    assert_eq!(assert_only_held_rows_lag(&path), 1);
    let info = s.describe("chain").await.unwrap().unwrap();
    assert_eq!((info.next_position, info.next_activation), (14, 7));
    let listed = s.list_instances(&ListFilter::default()).await.unwrap();
    assert_eq!(listed[0].next_position, 14);
    assert_eq!(s.load("chain", 0).await.unwrap().info.next_position, 14);
    // The worker goes: its held call becomes a task, the chain's last one.
    s.release_leases("w1").await.unwrap();
    assert_eq!(row_position(&path, "chain"), 14, "caught up when handed on");
    assert_eq!(assert_only_held_rows_lag(&path), 0);
    let mut tasks = s
        .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
        .await
        .unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:?}");
    let task = tasks.remove(0);
    assert_eq!(task.seq, 6);
    // Another worker finishes it and ends the run, at the position the history says.
    let commit = chain_step(
        "chain",
        "w2",
        14,
        7,
        vec![
            completed_event(&task, json!(6)),
            Event::InstanceCompleted { output: json!(6) },
        ],
    );
    assert!(matches!(
        s.finish_and_activate(&task, commit).await.unwrap(),
        DirectFinish::Activated(_)
    ));
    assert_eq!(assert_contiguous(&s, "chain").await, 16);
    assert_eq!(assert_only_held_rows_lag(&path), 0);
    let info = s.describe("chain").await.unwrap().unwrap();
    assert_eq!(info.status, InstanceStatus::Completed);
}

/// A worker that stops in the middle of a held chain (nothing written after its last step)
/// leaves rows behind their histories; a new process reads them as their histories say, and
/// the call that was running is the one handed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_held_chain_cut_short_resumes_from_its_history() {
    let scratch = Scratch::new("chain-crash");
    let path = scratch.path.clone();
    let s = scratch.store();
    held_chain(&s, "w1", "cut", 4).await;
    drop(s);
    assert!(row_position(&path, "cut") < 10);
    assert_eq!(assert_only_held_rows_lag(&path), 1);
    let s = scratch.store();
    let info = s.describe("cut").await.unwrap().unwrap();
    assert_eq!(info.next_position, 10);
    // The dead worker's held call becomes a task (as reaping it does).
    s.release_leases("w1").await.unwrap();
    let tasks = s
        .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
        .await
        .unwrap();
    let seqs: Vec<u32> = tasks.iter().map(|t| t.seq).collect();
    assert_eq!(seqs, vec![4]);
}

/// The step a chain's worker commits after call 3 of `id` (held chain of 3 steps).
fn step_after_third(id: &str, task: &ActivityTask) -> ActivationCommit {
    chain_step(
        id,
        "w1",
        8,
        4,
        vec![completed_event(task, json!(3)), scheduled(4, "act")],
    )
}

/// A held call handed on (its worker deemed gone) in the middle of a held chain ends the
/// chain, whether another process or this one hands it on: the chain's next step is refused,
/// and the call runs once more, as a task, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_held_call_handed_on_ends_its_chain() {
    let scratch = Scratch::new("chain-handed-on");
    let s = scratch.store();
    let other = scratch.store();
    for (id, by) in [("there", &other), ("here", &s)] {
        let task = held_chain(&s, "w1", id, 3).await;
        by.release_leases("w1").await.unwrap();
        let done = s
            .finish_and_activate(&task, step_after_third(id, &task))
            .await;
        assert!(
            matches!(
                done,
                Ok(DirectFinish::Finished(FinishReceipt {
                    accepted: false,
                    ..
                }))
            ),
            "{id}: {done:?}"
        );
        assert_eq!(assert_contiguous(&s, id).await, 8, "{id}");
        let tasks = s
            .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap();
        let claimed: Vec<(&str, u32)> = tasks
            .iter()
            .map(|t| (t.instance_id.as_str(), t.seq))
            .collect();
        assert_eq!(claimed, vec![(id, 3)], "{id}");
        assert_eq!(assert_only_held_rows_lag(&scratch.path), 0, "{id}");
    }
}

/// An instance terminated by another process in the middle of a held chain: the chain's
/// next step is not written after the termination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_termination_from_another_process_ends_a_held_chain() {
    let scratch = Scratch::new("chain-foreign");
    let s = scratch.store();
    let task = held_chain(&s, "w1", "other", 3).await;
    let other = scratch.store();
    other.terminate("other", "from the CLI").await.unwrap();
    drop(other);
    assert_eq!(
        assert_contiguous(&s, "other").await,
        9,
        "terminated after the chain's last step"
    );
    let history = history_events(&s, "other").await;
    assert!(matches!(
        history.last(),
        Some(Event::InstanceTerminated { .. })
    ));
    let done = s
        .finish_and_activate(&task, step_after_third("other", &task))
        .await;
    assert!(!matches!(done, Ok(DirectFinish::Activated(_))), "{done:?}");
    assert_eq!(assert_contiguous(&s, "other").await, 9);
    let info = s.describe("other").await.unwrap().unwrap();
    assert_eq!(info.status, InstanceStatus::Terminated);
    assert_eq!(assert_only_held_rows_lag(&scratch.path), 0);
}

/// A held chain whose last step can no longer be read (damaged behind the store's back):
/// the instance is stopped with the reason when its row is caught up, and can still be
/// terminated, at the position its history ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_damaged_held_chain_stops_its_instance_and_can_be_terminated() {
    let scratch = Scratch::new("chain-damaged");
    let path = scratch.path.clone();
    let s = scratch.store();
    held_chain(&s, "w1", "damaged", 3).await;
    held_chain(&s, "w1", "sound", 3).await;
    let damaged = rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE events SET body = replace(body, '\"name\":\"act\"', '\"name\":7')
             WHERE instance_key = (SELECT key FROM instances WHERE id = 'damaged') AND pos = 6",
            [],
        )
        .unwrap();
    assert_eq!(damaged, 1);
    // The worker goes: its held calls are handed on, but for the unreadable one.
    s.release_leases("w1").await.unwrap();
    let info = s.describe("damaged").await.unwrap().unwrap();
    assert_eq!(info.status, InstanceStatus::Stopped, "{info:?}");
    assert_eq!(info.next_position, 8);
    let tasks = s
        .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
        .await
        .unwrap();
    let claimed: Vec<(&str, u32)> = tasks
        .iter()
        .map(|t| (t.instance_id.as_str(), t.seq))
        .collect();
    assert_eq!(claimed, vec![("sound", 3)]);
    s.terminate("damaged", "by hand").await.unwrap();
    let info = s.describe("damaged").await.unwrap().unwrap();
    assert_eq!(info.status, InstanceStatus::Terminated);
    assert_eq!(info.next_position, 9);
    assert_eq!(assert_only_held_rows_lag(&path), 0);
}

/// Every other path that stops, hands on or finishes the held call in the middle of a held
/// chain leaves no row behind its history without its slot: `catch_up` reads a history's tail
/// only for rows with a held slot. Each instance is checked after its path, the whole store
/// after each (`assert_only_held_rows_lag`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_no_path_leaves_a_row_behind_its_history_without_its_slot() {
    let scratch = Scratch::new("chain-paths");
    let path = scratch.path.clone();
    let s = scratch.store();
    let lags = |id: &str| row_position(&path, id) < 8;

    // Stopped by its worker (nondeterminism), then resumed.
    held_chain(&s, "w1", "stopped", 3).await;
    assert!(lags("stopped"));
    assert_eq!(assert_only_held_rows_lag(&path), 1);
    s.stop_instance("stopped", "w1", "nondeterminism at 8")
        .await
        .unwrap();
    assert_only_held_rows_lag(&path);
    s.resume("stopped").await.unwrap();
    assert_only_held_rows_lag(&path);
    let info = s.describe("stopped").await.unwrap().unwrap();
    assert_eq!(
        (info.status, info.next_position),
        (InstanceStatus::Running, 8)
    );

    // The held call's outcome recorded on its own (as when the worker's cache lost the
    // instance), then the instance activated at its history's end.
    let task = held_chain(&s, "w1", "finished", 3).await;
    assert!(lags("finished"));
    let receipt = s
        .finish_task("w1", &task, completed(&task, json!(3)), LEASE_MS)
        .await
        .unwrap();
    assert!(receipt.accepted, "{receipt:?}");
    assert!(!lags("finished"));
    assert_only_held_rows_lag(&path);
    activate(&s, "w1", "finished", vec![], false).await.unwrap();
    assert_eq!(assert_contiguous(&s, "finished").await, 9);
    assert_only_held_rows_lag(&path);

    // A failed attempt of the held call, to be retried: the call becomes a task row.
    let task = held_chain(&s, "w1", "retried", 3).await;
    let retry = AttemptOutcome::Retry {
        next_attempt_at_ms: now_ms(),
        error: ActivityError::retryable("flaky", "again"),
    };
    assert!(
        s.finish_task("w1", &task, retry, LEASE_MS)
            .await
            .unwrap()
            .accepted
    );
    assert!(!lags("retried"));
    assert_only_held_rows_lag(&path);

    // Noted as waiting for another worker, its lease handed back.
    held_chain(&s, "w1", "waiting", 3).await;
    s.note_waiting("waiting", "w1", "no worker knows c")
        .await
        .unwrap();
    assert_only_held_rows_lag(&path);

    // Its worker gone: the held calls become tasks another worker claims, the retried one
    // among them.
    s.release_leases("w1").await.unwrap();
    assert_eq!(assert_only_held_rows_lag(&path), 0);
    let tasks = s
        .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
        .await
        .unwrap();
    let mut claimed: Vec<(&str, u32)> = tasks
        .iter()
        .map(|t| (t.instance_id.as_str(), t.seq))
        .collect();
    claimed.sort();
    assert_eq!(
        claimed,
        vec![("retried", 3), ("stopped", 3), ("waiting", 3)]
    );
    assert_only_held_rows_lag(&path);
}

/// A message delivered in the middle of a held chain ends it too: the next outcome goes to
/// the inbox beside the message, for an activation that sees both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_message_ends_a_held_chain() {
    let scratch = Scratch::new("chain-message");
    let s = scratch.store();
    let task = held_chain(&s, "w1", "msg", 3).await;
    s.deliver_message("msg", signal("go", json!(1)), Some("signal:go-1"))
        .await
        .unwrap();
    let done = s
        .finish_and_activate(&task, step_after_third("msg", &task))
        .await
        .unwrap();
    assert!(
        matches!(
            done,
            DirectFinish::Finished(FinishReceipt { accepted: true, .. })
        ),
        "{done:?}"
    );
    assert_eq!(assert_contiguous(&s, "msg").await, 8);
    assert_eq!(assert_only_held_rows_lag(&scratch.path), 0);
    let inbox = inbox_events(&s, "msg").await;
    assert_eq!(inbox.len(), 2, "{inbox:?}");
    assert!(inbox.contains(&signal("go", json!(1))), "{inbox:?}");
    assert!(
        inbox.contains(&completed_event(&task, json!(3))),
        "{inbox:?}"
    );
    // The next activation takes both at the history's position.
    let receipt = activate(&s, "w1", "msg", vec![], false).await.unwrap();
    assert!(!receipt.ready_again);
    assert_eq!(assert_contiguous(&s, "msg").await, 10);
    assert_eq!(assert_only_held_rows_lag(&scratch.path), 0);
}

/// A store written by schema version 1 (no attempt journal) is upgraded on open, and a task
/// claimed before the upgrade is journaled when it finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_v1_store_gets_an_attempt_journal() {
    let dir = std::env::temp_dir().join(format!("retrace-v1-{}", random_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v1.db");
    let t1 = {
        let s: SharedStore = Arc::new(SqliteStore::open(&path).unwrap());
        instance_with_task(&s, "a").await;
        s.claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .remove(0)
    };
    {
        // Back to the version 1 schema.
        let conn = rusqlite::Connection::open(&path).unwrap();
        history_to_single_event_rows(&conn);
        conn.execute_batch(
            "DROP TABLE attempts; DROP TABLE delivered; ALTER TABLE tasks DROP COLUMN claimed_at;
             DROP INDEX instances_held; ALTER TABLE instances DROP COLUMN held_seq;
             ALTER TABLE instances DROP COLUMN held_pos; ALTER TABLE instances DROP COLUMN held_owner;
             ALTER TABLE instances DROP COLUMN held_until; ALTER TABLE instances DROP COLUMN held_at;
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let s: SharedStore = Arc::new(SqliteStore::open(&path).unwrap());
    let version: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, retrace_runtime::store::sqlite::SCHEMA_VERSION);
    assert!(s.attempts("a").await.unwrap().is_empty());
    let retry = AttemptOutcome::Retry {
        next_attempt_at_ms: now_ms(),
        error: ActivityError::retryable("flaky", "first"),
    };
    assert!(
        s.finish_task("w1", &t1, retry, LEASE_MS)
            .await
            .unwrap()
            .accepted
    );
    let attempts = s.attempts("a").await.unwrap();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert_eq!(attempts[0].outcome, AttemptEnd::Retry);
    // Claimed before the journal existed: its start is unknown, and taken as its end.
    assert_eq!(attempts[0].started_at_ms, attempts[0].ended_at_ms);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A store of schema 5, whose history table was keyed by (instance, position), is upgraded to
/// the append-ordered table of schema 6 with every event where it was, and goes on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_v5_history_moves_to_the_append_ordered_table() {
    let dir = std::env::temp_dir().join(format!("retrace-v5-{}", random_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v5.db");
    let before = {
        let s: SharedStore = Arc::new(SqliteStore::open(&path).unwrap());
        instance_with_task(&s, "a").await;
        instance_with_task(&s, "b").await;
        let a = s.load("a", 0).await.unwrap().events;
        let b = s.load("b", 0).await.unwrap().events;
        (a, b)
    };
    assert!(!before.0.is_empty());
    let table_sql = |conn: &rusqlite::Connection| -> String {
        conn.query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'events'",
            [],
            |r| r.get(0),
        )
        .unwrap()
    };
    {
        // Back to the version 5 table.
        let conn = rusqlite::Connection::open(&path).unwrap();
        history_to_single_event_rows(&conn);
        conn.execute_batch(
            "CREATE TABLE events_v5 (
                 instance_id TEXT NOT NULL, pos INTEGER NOT NULL, activation INTEGER NOT NULL,
                 kind TEXT NOT NULL, recorded_at INTEGER NOT NULL, body TEXT NOT NULL,
                 PRIMARY KEY (instance_id, pos)
             ) WITHOUT ROWID;
             INSERT INTO events_v5 SELECT instance_id, pos, activation, kind, recorded_at, body
                 FROM events;
             DROP TABLE events;
             ALTER TABLE events_v5 RENAME TO events;
             PRAGMA user_version = 5;",
        )
        .unwrap();
        assert!(table_sql(&conn).contains("WITHOUT ROWID"));
    }
    let s: SharedStore = Arc::new(SqliteStore::open(&path).unwrap());
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, retrace_runtime::store::sqlite::SCHEMA_VERSION);
        assert!(!table_sql(&conn).contains("WITHOUT ROWID"), "rebuilt");
    }
    assert_eq!(s.load("a", 0).await.unwrap().events, before.0);
    assert_eq!(s.load("b", 0).await.unwrap().events, before.1);
    // The unique (instance, position) constraint came along.
    let twice = rusqlite::Connection::open(&path).unwrap().execute(
        "INSERT INTO events SELECT * FROM events
         WHERE instance_key = (SELECT key FROM instances WHERE id = 'a') AND pos = 0",
        [],
    );
    assert!(
        matches!(&twice, Err(e) if e.to_string().contains("UNIQUE")),
        "{twice:?}"
    );
    // And the history goes on.
    let task = s
        .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.instance_id == "a")
        .unwrap();
    assert!(
        s.finish_task("w1", &task, completed(&task, json!(1)), LEASE_MS)
            .await
            .unwrap()
            .accepted
    );
    // (The finisher holds the instance now.)
    activate(&s, "w1", "a", vec![scheduled(1, "act")], false)
        .await
        .unwrap();
    let after = s.load("a", 0).await.unwrap().events;
    assert_eq!(after.len(), before.0.len() + 2, "{after:?}");
    assert_eq!(after[..before.0.len()], before.0[..]);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

// ----- helpers -----

fn new_instance(id: &str, coordinator: &str, input: Value) -> NewInstance {
    NewInstance {
        id: id.to_string(),
        coordinator: coordinator.to_string(),
        input,
        parent: None,
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn scheduled(seq: u32, name: &str) -> Event {
    Event::ActivityScheduled {
        seq,
        name: name.to_string(),
        input: json!({ "seq": seq }),
        retry: RetrySpec::default(),
    }
}

fn signal(name: &str, payload: Value) -> Event {
    Event::SignalReceived {
        name: name.to_string(),
        payload,
    }
}

/// Creates `id` (coordinator `c`) and claims it for `owner`.
async fn create_and_claim(store: &SharedStore, id: &str, owner: &str) {
    let created = store
        .create_instance(new_instance(id, "c", json!(id)))
        .await
        .unwrap();
    assert_eq!(created, CreateOutcome::Created);
    let claimed = store
        .claim_ready(owner, &names(&["c"]), 1, LEASE_MS)
        .await
        .unwrap();
    assert_eq!(claimed, vec![id.to_string()]);
}

/// Builds the commit a worker would make: the undelivered inbox (start first), then `commands`,
/// at the stored next position, claiming new tasks when `claim`.
async fn plan(
    store: &SharedStore,
    owner: &str,
    id: &str,
    commands: Vec<Event>,
    claim: bool,
) -> ActivationCommit {
    let loaded = store.load(id, 0).await.unwrap();
    let mut inbox = loaded.inbox;
    inbox.sort_by_key(|m| !matches!(m.event, Event::InstanceStarted { .. }));
    let consumed = inbox.iter().map(|m| m.id).collect();
    let mut events: Vec<Event> = inbox.into_iter().map(|m| m.event).collect();
    events.extend(commands);
    ActivationCommit::plan(
        id,
        owner,
        loaded.info.generation,
        loaded.info.next_position,
        loaded.info.next_activation,
        events,
        consumed,
        None,
        &|_| claim,
        LEASE_MS,
    )
}

/// Delivers the inbox and `commands` as `owner` would, and commits.
async fn activate(
    store: &SharedStore,
    owner: &str,
    id: &str,
    commands: Vec<Event>,
    claim: bool,
) -> Result<CommitReceipt, StoreError> {
    let commit = plan(store, owner, id, commands, claim).await;
    store.commit_activation(commit).await
}

async fn inbox_events(store: &SharedStore, id: &str) -> Vec<Event> {
    store
        .load(id, 0)
        .await
        .unwrap()
        .inbox
        .into_iter()
        .map(|m| m.event)
        .collect()
}

async fn history_events(store: &SharedStore, id: &str) -> Vec<Event> {
    store
        .history(id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event)
        .collect()
}

/// `id`, created and activated by `w1` with an activity call `act` at position 0 (claimed
/// by `w1` and returned) and a timer due at `due` at position 1.
async fn call_and_timer(store: &SharedStore, id: &str, due: u64) -> ActivityTask {
    create_and_claim(store, id, "w1").await;
    let timer = Event::TimerStarted {
        seq: 1,
        fire_at_ms: due,
    };
    activate(store, "w1", id, vec![scheduled(0, "act"), timer], false)
        .await
        .unwrap();
    store
        .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
        .await
        .unwrap()
        .remove(0)
}

/// An instance waiting on one unclaimed activity task at position 0.
async fn instance_with_task(store: &SharedStore, id: &str) {
    create_and_claim(store, id, "w0").await;
    let receipt = activate(store, "w0", id, vec![scheduled(0, "act")], false)
        .await
        .unwrap();
    assert!(receipt.claimed_tasks.is_empty());
    assert!(!receipt.ready_again);
}

fn completed(task: &ActivityTask, output: Value) -> AttemptOutcome {
    AttemptOutcome::Final(completed_event(task, output))
}

fn completed_event(task: &ActivityTask, output: Value) -> Event {
    Event::ActivityCompleted {
        seq: task.seq,
        output,
        attempt: task.attempt,
    }
}

// ----- cases -----

mod cases {
    use super::*;

    pub(super) async fn append_at_expected_position(h: &Harness) {
        let s = &h.store;
        create_and_claim(s, "a", "w1").await;
        let loaded = s.load("a", 0).await.unwrap();
        assert_eq!(loaded.info.next_position, 0);
        assert_eq!(loaded.info.next_activation, 0);
        assert!(loaded.events.is_empty());
        assert!(matches!(
            loaded.inbox.as_slice(),
            [m] if matches!(&m.event, Event::InstanceStarted { input, .. } if *input == json!("a"))
        ));

        let receipt = activate(
            s,
            "w1",
            "a",
            vec![scheduled(0, "act"), scheduled(1, "act")],
            false,
        )
        .await
        .unwrap();
        assert!(!receipt.ready_again);
        let history = s.history("a").await.unwrap();
        assert_eq!(history.len(), 3);
        for (i, e) in history.iter().enumerate() {
            assert_eq!(e.position, i as u64);
            assert_eq!(e.activation, 0);
        }
        assert!(matches!(history[0].event, Event::InstanceStarted { .. }));
        assert_eq!(history[2].event, scheduled(1, "act"));
        // Loading from a position inside one activation's events returns the rest of them.
        let tail = s.load("a", 1).await.unwrap().events;
        assert_eq!(
            tail.iter().map(|e| e.position).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(tail[1].event, scheduled(1, "act"));
        let info = s.describe("a").await.unwrap().unwrap();
        assert_eq!(info.next_position, 3);
        assert_eq!(info.next_activation, 1);
        assert!(
            s.load("a", 0).await.unwrap().inbox.is_empty(),
            "consumed inbox is deleted"
        );

        // The next activation goes on at position 3; loading from a position returns the rest.
        let task = s
            .claim_tasks("w1", &names(&["act"]), 1, LEASE_MS)
            .await
            .unwrap()
            .remove(0);
        let receipt = s
            .finish_task("w1", &task, completed(&task, json!(10)), LEASE_MS)
            .await
            .unwrap();
        assert!(receipt.accepted);
        assert!(receipt.instance_claimed);
        activate(s, "w1", "a", vec![], false).await.unwrap();
        let tail = s.load("a", 3).await.unwrap().events;
        assert_eq!(tail.len(), 1);
        assert_eq!(tail[0].position, 3);
        assert_eq!(tail[0].activation, 1);
        assert!(matches!(
            tail[0].event,
            Event::ActivityCompleted { seq, attempt: 1, .. } if seq == task.seq
        ));
    }

    pub(super) async fn a_failing_operation_leaves_the_rest_of_its_batch(h: &Harness) {
        let s = &h.store;
        create_and_claim(s, "a", "w1").await;
        let first = plan(s, "w1", "a", vec![scheduled(0, "act")], false).await;
        let stale = first.clone();
        s.commit_activation(first).await.unwrap();
        let before = s.history("a").await.unwrap();
        // Sent together, so that the SQLite writer takes them in one batch: the stale commits
        // fail, the creations around them must all land, once, and be answered as created.
        let creates = futures::future::join_all(
            (0..50).map(|i| s.create_instance(new_instance(&format!("b{i}"), "c", json!(i)))),
        );
        let stales = futures::future::join_all((0..10).map(|_| s.commit_activation(stale.clone())));
        let (created, refused) = tokio::join!(creates, stales);
        for c in created {
            assert!(matches!(c, Ok(CreateOutcome::Created)), "{c:?}");
        }
        for r in refused {
            assert!(matches!(r, Err(StoreError::Conflict { .. })), "{r:?}");
        }
        assert_eq!(s.history("a").await.unwrap(), before);
        for i in 0..50 {
            let info = s.describe(&format!("b{i}")).await.unwrap().unwrap();
            assert_eq!(info.input, json!(i));
            assert!(matches!(
                s.create_instance(new_instance(&format!("b{i}"), "c", json!(i)))
                    .await
                    .unwrap(),
                CreateOutcome::Existing(_)
            ));
        }
    }

    pub(super) async fn stale_position_conflicts(h: &Harness) {
        let s = &h.store;
        create_and_claim(s, "a", "w1").await;
        let first = plan(s, "w1", "a", vec![scheduled(0, "act")], false).await;
        let mut stale = first.clone();
        s.commit_activation(first).await.unwrap();
        // Keep the lease so that only the position is stale.
        s.deliver("a", signal("go", json!(1)), None).await.unwrap();
        assert_eq!(
            s.claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["a".to_string()]
        );
        let before = s.history("a").await.unwrap();

        stale.consumed_inbox.clear();
        match s.commit_activation(stale.clone()).await {
            Err(StoreError::Conflict {
                instance_id,
                expected,
                found,
            }) => {
                assert_eq!(instance_id, "a");
                assert_eq!(expected, 0);
                assert_eq!(found, 2);
            }
            other => panic!("expected a conflict, got {other:?}"),
        }
        let mut ahead = stale.clone();
        ahead.expected_position = 5;
        assert!(matches!(
            s.commit_activation(ahead).await,
            Err(StoreError::Conflict {
                expected: 5,
                found: 2,
                ..
            })
        ));
        let mut other_run = stale;
        other_run.expected_position = 2;
        other_run.generation = 1;
        assert!(matches!(
            s.commit_activation(other_run).await,
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(
            s.history("a").await.unwrap(),
            before,
            "nothing written on conflict"
        );
        assert_eq!(inbox_events(s, "a").await, vec![signal("go", json!(1))]);
        // The right position still works.
        activate(s, "w1", "a", vec![], false).await.unwrap();
        assert_eq!(s.describe("a").await.unwrap().unwrap().next_position, 3);
    }

    pub(super) async fn lease_is_owned(h: &Harness) {
        let s = &h.store;
        create_and_claim(s, "a", "w1").await;
        assert!(
            s.claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap()
                .is_empty(),
            "held by w1"
        );
        // The holder may claim again (renewing its own claim).
        assert_eq!(
            s.claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["a".to_string()]
        );
        let commit = plan(s, "w2", "a", vec![scheduled(0, "act")], false).await;
        match s.commit_activation(commit).await {
            Err(StoreError::LeaseLost { what, owner }) => {
                assert!(what.contains('a'), "{what}");
                assert_eq!(owner, "w2");
            }
            other => panic!("expected LeaseLost, got {other:?}"),
        }
        assert!(s.history("a").await.unwrap().is_empty());
        activate(s, "w1", "a", vec![scheduled(0, "act")], false)
            .await
            .unwrap();
        // With nothing more in the inbox, the commit hands the lease back...
        assert!(s
            .claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        // ...and the next event makes it claimable by anyone.
        s.deliver("a", signal("go", json!(null)), None)
            .await
            .unwrap();
        assert_eq!(
            s.claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["a".to_string()]
        );
    }

    pub(super) async fn lease_expires_and_is_taken_over(h: &Harness) {
        let s = &h.store;
        s.create_instance(new_instance("a", "c", json!(1)))
            .await
            .unwrap();
        assert_eq!(
            s.claim_ready("w1", &names(&["c"]), 1, 1).await.unwrap(),
            vec!["a".to_string()]
        );
        let w1_commit = plan(s, "w1", "a", vec![scheduled(0, "act")], false).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(
            s.claim_ready("w2", &names(&["c"]), 1, LEASE_MS)
                .await
                .unwrap(),
            vec!["a".to_string()],
            "an expired lease is taken over"
        );
        assert!(matches!(
            s.commit_activation(w1_commit).await,
            Err(StoreError::LeaseLost { .. })
        ));
        activate(s, "w2", "a", vec![scheduled(0, "act")], false)
            .await
            .unwrap();
        assert_eq!(s.history("a").await.unwrap().len(), 2);
    }

    pub(super) async fn leases_renew_and_release(h: &Harness) {
        let s = &h.store;
        instance_with_task(s, "t").await;
        s.create_instance(new_instance("a", "c", json!(1)))
            .await
            .unwrap();
        assert_eq!(
            s.claim_ready("w1", &names(&["c"]), 10, 40).await.unwrap(),
            vec!["a".to_string()]
        );
        assert_eq!(
            s.claim_tasks("w1", &names(&["act"]), 10, 40)
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(s.renew_leases("w1", LEASE_MS).await.unwrap(), 2);
        assert_eq!(s.renew_leases("nobody", LEASE_MS).await.unwrap(), 0);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(
            s.claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap()
                .is_empty(),
            "renewed past its first expiry"
        );
        assert!(s
            .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        s.release_leases("w1").await.unwrap();
        assert_eq!(
            s.claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["a".to_string()]
        );
        let tasks = s
            .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].attempt, 2, "a released attempt still counts");
        assert_eq!(s.renew_leases("w1", LEASE_MS).await.unwrap(), 0);
    }

    pub(super) async fn claim_ready_skips_rows_others_hold(h: &Harness) {
        let s = &h.store;
        for i in 0..12 {
            s.create_instance(new_instance(&format!("i{i:02}"), "c", json!(i)))
                .await
                .unwrap();
        }
        s.create_instance(new_instance("other", "d", json!(0)))
            .await
            .unwrap();
        let a = s
            .claim_ready("wa", &names(&["c"]), 4, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(a.len(), 4);
        let b = s
            .claim_ready("wb", &names(&["c"]), 100, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(b.len(), 8);
        assert!(a.iter().all(|id| !b.contains(id)));
        assert!(s
            .claim_ready("wc", &names(&["c"]), 100, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            s.claim_ready("wc", &names(&["c", "d"]), 100, LEASE_MS)
                .await
                .unwrap(),
            vec!["other".to_string()],
            "only coordinators the worker runs"
        );

        // Claimers racing: every ready instance goes to exactly one of them.
        for i in 0..24 {
            s.create_instance(new_instance(&format!("r{i:02}"), "r", json!(i)))
                .await
                .unwrap();
        }
        let claims = futures::future::join_all((0..6).map(|w| {
            let s = Arc::clone(s);
            async move {
                s.claim_ready(&format!("racer{w}"), &names(&["r"]), 5, LEASE_MS)
                    .await
                    .unwrap()
            }
        }))
        .await;
        let mut all: Vec<String> = claims.into_iter().flatten().collect();
        all.sort();
        let before = all.len();
        all.dedup();
        assert_eq!(before, all.len(), "an instance claimed twice");
        assert_eq!(all.len(), 24);
    }

    pub(super) async fn timers_fire_once_when_due(h: &Harness) {
        let s = &h.store;
        create_and_claim(s, "a", "w1").await;
        let due = now_ms() + 3_600_000;
        activate(
            s,
            "w1",
            "a",
            vec![Event::TimerStarted {
                seq: 0,
                fire_at_ms: due,
            }],
            false,
        )
        .await
        .unwrap();
        assert_eq!(s.next_due().await.unwrap(), Some(due));
        assert!(s.fire_due_timers(due - 1, 100).await.unwrap().is_empty());
        assert!(inbox_events(s, "a").await.is_empty());
        assert!(s
            .claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());

        // Several workers fire at once: the timer fires exactly once.
        let fired = futures::future::join_all((0..4).map(|_| {
            let s = Arc::clone(s);
            async move { s.fire_due_timers(due, 100).await.unwrap() }
        }))
        .await;
        assert_eq!(fired.concat(), vec!["a".to_string()]);
        assert_eq!(
            inbox_events(s, "a").await,
            vec![Event::TimerFired { seq: 0 }]
        );
        assert!(s.fire_due_timers(due + 10, 100).await.unwrap().is_empty());
        assert_eq!(s.next_due().await.unwrap(), None);
        assert_eq!(
            s.claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["a".to_string()],
            "a fired timer makes its instance ready"
        );

        // Due order, and the limit.
        for (i, at) in [(1u32, due + 30), (2, due + 10), (3, due + 20)] {
            let id = format!("t{i}");
            create_and_claim(s, &id, "w1").await;
            activate(
                s,
                "w1",
                &id,
                vec![Event::TimerStarted {
                    seq: 0,
                    fire_at_ms: at,
                }],
                false,
            )
            .await
            .unwrap();
        }
        assert_eq!(s.next_due().await.unwrap(), Some(due + 10));
        assert_eq!(
            s.fire_due_timers(due + 100, 2).await.unwrap(),
            vec!["t2".to_string(), "t3".to_string()]
        );
        assert_eq!(
            s.fire_due_timers(due + 100, 2).await.unwrap(),
            vec!["t1".to_string()]
        );
    }

    pub(super) async fn signals_buffered_in_order_and_deduped(h: &Harness) {
        let s = &h.store;
        s.create_instance(new_instance("a", "c", json!(1)))
            .await
            .unwrap();
        let mut accepted = Vec::new();
        for (name, n, key) in [
            ("x", 1, None),
            ("y", 2, Some("k1")),
            ("x", 3, None),
            ("y", 4, Some("k1")),
            ("y", 5, Some("k2")),
            ("x", 6, None),
        ] {
            accepted.push(s.deliver("a", signal(name, json!(n)), key).await.unwrap());
        }
        assert_eq!(accepted, vec![true, true, true, false, true, true]);
        let inbox = s.load("a", 0).await.unwrap().inbox;
        let ids: Vec<i64> = inbox.iter().map(|m| m.id).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "inbox ids increase in arrival order");
        let events: Vec<Event> = inbox.into_iter().map(|m| m.event).collect();
        assert!(matches!(events[0], Event::InstanceStarted { .. }));
        assert_eq!(
            events[1..].to_vec(),
            vec![
                signal("x", json!(1)),
                signal("y", json!(2)),
                signal("x", json!(3)),
                signal("y", json!(5)),
                signal("x", json!(6)),
            ]
        );
        // Delivered in one activation, in the same order, into the history.
        assert_eq!(
            s.claim_ready("w1", &names(&["c"]), 1, LEASE_MS)
                .await
                .unwrap()
                .len(),
            1
        );
        activate(s, "w1", "a", vec![], false).await.unwrap();
        assert_eq!(history_events(s, "a").await, events);
        // The inbox is empty now; a resend with a delivered key is still refused, and does not
        // make the instance ready.
        assert!(!s
            .deliver("a", signal("y", json!(8)), Some("k1"))
            .await
            .unwrap());
        assert!(s.load("a", 0).await.unwrap().inbox.is_empty());
        assert!(s
            .claim_ready("w1", &names(&["c"]), 1, LEASE_MS)
            .await
            .unwrap()
            .is_empty());

        // A signal for an unknown instance is an error; for an ended one it is dropped.
        assert!(matches!(
            s.deliver("nobody", signal("x", json!(0)), None).await,
            Err(StoreError::NotFound { .. })
        ));
        s.terminate("a", "done").await.unwrap();
        assert!(!s.deliver("a", signal("x", json!(7)), None).await.unwrap());
    }

    /// An instance created with its first activation: history, claimed task and lease as after
    /// create + claim + commit, in one call; an existing id changes nothing. Both stores
    /// implement it (a store may decline, by creating the instance alone: checked too).
    pub(super) async fn create_and_activate_is_one_commit(h: &Harness) {
        let s = &h.store;
        let started = Event::InstanceStarted {
            coordinator: "c".into(),
            input: json!("in"),
            parent: None,
        };
        let first = |id: &str| {
            ActivationCommit::plan(
                id,
                "w1",
                0,
                0,
                0,
                vec![started.clone(), scheduled(0, "act")],
                Vec::new(),
                None,
                &|_| true,
                LEASE_MS,
            )
        };
        let (outcome, receipt) = s
            .create_and_activate(new_instance("e", "c", json!("in")), first("e"))
            .await
            .unwrap();
        assert_eq!(outcome, CreateOutcome::Created);
        let receipt = receipt.expect("both stores commit the first activation");
        assert!(!receipt.ready_again);
        assert_eq!(receipt.claimed_tasks.len(), 1);
        let task = &receipt.claimed_tasks[0];
        assert_eq!((task.seq, task.attempt), (0, 1));
        assert_eq!(
            history_events(s, "e").await,
            vec![started.clone(), scheduled(0, "act")]
        );
        assert!(
            inbox_events(s, "e").await.is_empty(),
            "the start was delivered"
        );
        let info = s.describe("e").await.unwrap().unwrap();
        assert_eq!(info.status, InstanceStatus::Running);
        assert_eq!(info.next_position, 2);
        // Not ready: no worker claims it; the task is held by w1.
        assert!(s
            .claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        assert!(s
            .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        // The task's outcome moves it on as after any activation.
        let finished = s
            .finish_task("w1", task, completed(task, json!(1)), LEASE_MS)
            .await
            .unwrap();
        assert!(finished.accepted);
        assert_eq!(
            inbox_events(s, "e").await.len(),
            1,
            "the outcome waits in the inbox"
        );

        // An existing id: nothing written, the existing instance returned, no receipt.
        let (again, none) = s
            .create_and_activate(new_instance("e", "c", json!("other")), first("e"))
            .await
            .unwrap();
        assert!(none.is_none());
        match again {
            CreateOutcome::Existing(info) => assert_eq!(info.input, json!("in")),
            other => panic!("expected Existing, got {other:?}"),
        }
        assert_eq!(history_events(s, "e").await.len(), 2);

        // Racing: exactly one of several creates (with or without activation) wins.
        let outcomes = futures::future::join_all((0..6).map(|i| {
            let s = Arc::clone(s);
            let commit = first("race");
            async move {
                if i % 2 == 0 {
                    s.create_and_activate(new_instance("race", "c", json!("in")), commit)
                        .await
                        .unwrap()
                        .0
                } else {
                    s.create_instance(new_instance("race", "c", json!("in")))
                        .await
                        .unwrap()
                }
            }
        }))
        .await;
        let created = outcomes
            .iter()
            .filter(|o| **o == CreateOutcome::Created)
            .count();
        assert_eq!(created, 1);
        let history = history_events(s, "race").await;
        let inbox = inbox_events(s, "race").await;
        // Either the activation won (start delivered), or a plain create did (start waiting).
        assert_eq!(
            history.len() + inbox.len(),
            if history.is_empty() { 1 } else { 2 }
        );
    }

    pub(super) async fn create_is_idempotent(h: &Harness) {
        let s = &h.store;
        assert_eq!(
            s.create_instance(new_instance("a", "c", json!("first")))
                .await
                .unwrap(),
            CreateOutcome::Created
        );
        match s
            .create_instance(new_instance("a", "c", json!("second")))
            .await
            .unwrap()
        {
            CreateOutcome::Existing(info) => {
                assert_eq!(info.id, "a");
                assert_eq!(info.input, json!("first"));
                assert_eq!(info.status, InstanceStatus::Running);
            }
            other => panic!("expected Existing, got {other:?}"),
        }
        assert!(matches!(
            s.create_instance(new_instance("a", "other", json!(0)))
                .await
                .unwrap(),
            CreateOutcome::Existing(info) if info.coordinator == "c"
        ));
        assert_eq!(inbox_events(s, "a").await.len(), 1, "one start only");

        // Racing starts of one id: exactly one creates it.
        let outcomes = futures::future::join_all((0..8).map(|i| {
            let s = Arc::clone(s);
            async move {
                s.create_instance(new_instance("race", "c", json!(i)))
                    .await
                    .unwrap()
            }
        }))
        .await;
        assert_eq!(
            outcomes
                .iter()
                .filter(|o| **o == CreateOutcome::Created)
                .count(),
            1
        );
        assert_eq!(inbox_events(s, "race").await.len(), 1);
        // An ended instance is returned as it is, not restarted.
        s.terminate("a", "stop").await.unwrap();
        assert!(matches!(
            s.create_instance(new_instance("a", "c", json!(0))).await.unwrap(),
            CreateOutcome::Existing(info) if info.status == InstanceStatus::Terminated
        ));
    }

    pub(super) async fn activity_tasks_count_attempts(h: &Harness) {
        let s = &h.store;
        instance_with_task(s, "a").await;
        assert!(s
            .claim_tasks("w1", &names(&["other"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        let t1 = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(t1.len(), 1);
        let t1 = t1.into_iter().next().unwrap();
        assert_eq!(
            (t1.instance_id.as_str(), t1.seq, t1.attempt, t1.generation),
            ("a", 0, 1, 0)
        );
        assert_eq!(t1.name, "act");
        assert_eq!(t1.input, json!({ "seq": 0 }));
        assert_eq!(t1.retry, RetrySpec::default());
        assert!(
            s.claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
                .await
                .unwrap()
                .is_empty(),
            "held by w1"
        );

        // A retry later: invisible until due, then the attempt count goes on.
        let later = now_ms() + 3_600_000;
        let receipt = s
            .finish_task(
                "w1",
                &t1,
                AttemptOutcome::Retry {
                    next_attempt_at_ms: later,
                    error: ActivityError::retryable("flaky", "try again"),
                },
                LEASE_MS,
            )
            .await
            .unwrap();
        assert!(receipt.accepted);
        assert!(!receipt.instance_claimed);
        assert_eq!(s.next_due().await.unwrap(), Some(later));
        assert!(s
            .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        assert!(
            inbox_events(s, "a").await.is_empty(),
            "a retry is no outcome"
        );
        let soon = now_ms();
        s.finish_task(
            "w1",
            &t1,
            AttemptOutcome::Retry {
                next_attempt_at_ms: soon,
                error: ActivityError::retryable("flaky", "again"),
            },
            LEASE_MS,
        )
        .await
        .map(|r| assert!(!r.accepted, "w1 no longer holds the task"))
        .unwrap();
        // A second instance whose retry is due at once.
        instance_with_task(s, "b").await;
        let b1 = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .remove(0);
        assert_eq!((b1.instance_id.as_str(), b1.attempt), ("b", 1));
        s.finish_task(
            "w1",
            &b1,
            AttemptOutcome::Retry {
                next_attempt_at_ms: now_ms(),
                error: ActivityError::retryable("flaky", "x"),
            },
            LEASE_MS,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let b2 = s
            .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(b2.len(), 1);
        assert_eq!((b2[0].instance_id.as_str(), b2[0].attempt), ("b", 2));

        // The fast path: the committing worker claims its tasks at once, attempt 1.
        create_and_claim(s, "f", "w3").await;
        let receipt = activate(s, "w3", "f", vec![scheduled(0, "act")], true)
            .await
            .unwrap();
        assert_eq!(receipt.claimed_tasks.len(), 1);
        assert_eq!(receipt.claimed_tasks[0].attempt, 1);
        assert_eq!(receipt.claimed_tasks[0].instance_id, "f");
        assert!(s
            .claim_tasks("w4", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .iter()
            .all(|t| t.instance_id != "f"));
    }

    /// The outcomes of a fan-out's calls each leave the instance ready and leased to the
    /// worker that recorded them, and one that comes when the lease is running out renews
    /// it (a store may skip the write while the lease has half or more to run).
    pub(super) async fn a_fan_outs_outcomes_keep_its_lease_alive(h: &Harness) {
        const SHORT_MS: u64 = 1_500;
        let s = &h.store;
        create_and_claim(s, "fan", "w1").await;
        let calls = (0..3).map(|seq| scheduled(seq, "act")).collect();
        let receipt = activate(s, "w1", "fan", calls, false).await.unwrap();
        assert!(!receipt.ready_again);
        let tasks = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(tasks.len(), 3, "{tasks:?}");
        let finish = |i: usize| {
            let t = &tasks[i];
            s.finish_task("w1", t, completed(t, json!(i)), SHORT_MS)
        };
        let unclaimable = || async {
            s.claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap()
                .is_empty()
        };
        let mut stamps = Vec::new();
        for i in 0..2 {
            // Apart by more than the clock's millisecond: a rewrite of the SQLite row would
            // then change its lease.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let receipt = finish(i).await.unwrap();
            assert!(
                receipt.accepted && receipt.instance_claimed,
                "{i}: {receipt:?}"
            );
            assert!(unclaimable().await, "{i}: another worker took the instance");
            stamps.push(h.instance_row_stamp("fan").await);
        }
        // The first outcome made the instance ready and leased it; the second, with most of
        // that lease left, had nothing to write to the instance row.
        assert_eq!(
            stamps[0], stamps[1],
            "the second outcome rewrote the instance row"
        );
        // Two thirds of the lease later, the last outcome renews it: another third later the
        // first lease has run out, the renewed one has not.
        tokio::time::sleep(Duration::from_millis(SHORT_MS * 2 / 3)).await;
        let receipt = finish(2).await.unwrap();
        assert!(receipt.accepted && receipt.instance_claimed, "{receipt:?}");
        tokio::time::sleep(Duration::from_millis(SHORT_MS * 2 / 3)).await;
        assert!(
            unclaimable().await,
            "the last outcome did not renew the lease"
        );
        assert_eq!(inbox_events(s, "fan").await.len(), 3);
        // Once that lease runs out too, the instance is anyone's.
        tokio::time::sleep(Duration::from_millis(SHORT_MS / 2)).await;
        assert_eq!(
            s.claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["fan".to_string()]
        );
    }

    pub(super) async fn activity_outcome_recorded_once(h: &Harness) {
        let s = &h.store;
        instance_with_task(s, "a").await;
        let t = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .remove(0);
        // Two workers racing to finish the same attempt: one outcome.
        let receipts = futures::future::join_all((0..4).map(|i| {
            let s = Arc::clone(s);
            let t = t.clone();
            async move {
                s.finish_task("w1", &t, completed(&t, json!(i)), LEASE_MS)
                    .await
                    .unwrap()
            }
        }))
        .await;
        assert_eq!(receipts.iter().filter(|r| r.accepted).count(), 1);
        assert_eq!(receipts.iter().filter(|r| r.instance_claimed).count(), 1);
        let inbox = inbox_events(s, "a").await;
        assert_eq!(inbox.len(), 1);
        assert!(matches!(
            inbox[0],
            Event::ActivityCompleted {
                seq: 0,
                attempt: 1,
                ..
            }
        ));
        assert!(s
            .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(s.next_due().await.unwrap(), None);
        // The finishing worker got the instance's lease: others cannot claim it.
        assert!(s
            .claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        activate(s, "w1", "a", vec![], false).await.unwrap();

        // A worker that does not hold the attempt cannot record an outcome.
        instance_with_task(s, "b").await;
        let t = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .remove(0);
        let receipt = s
            .finish_task("w2", &t, completed(&t, json!(0)), LEASE_MS)
            .await
            .unwrap();
        assert!(!receipt.accepted);
        let mut wrong_attempt = t.clone();
        wrong_attempt.attempt = 7;
        assert!(
            !s.finish_task("w1", &wrong_attempt, completed(&t, json!(0)), LEASE_MS)
                .await
                .unwrap()
                .accepted
        );
        assert!(inbox_events(s, "b").await.is_empty());

        // When the instance is leased by another worker, the outcome is recorded and the
        // instance is left to that worker (it is marked ready).
        s.deliver("b", signal("s", json!(0)), None).await.unwrap();
        assert_eq!(
            s.claim_ready("w9", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["b".to_string()]
        );
        let receipt = s
            .finish_task(
                "w1",
                &t,
                AttemptOutcome::Final(Event::ActivityFailed {
                    seq: 0,
                    failure: retrace_sdk::ActivityFailure {
                        activity: "act".into(),
                        position: 0,
                        attempt: 1,
                        kind: "refused".into(),
                        message: "no".into(),
                        non_retryable: true,
                    },
                }),
                LEASE_MS,
            )
            .await
            .unwrap();
        assert!(receipt.accepted);
        assert!(!receipt.instance_claimed);
        let inbox = inbox_events(s, "b").await;
        assert_eq!(inbox.len(), 2);
        assert!(matches!(inbox[1], Event::ActivityFailed { seq: 0, .. }));
    }

    pub(super) async fn activity_task_lease_expires(h: &Harness) {
        let s = &h.store;
        instance_with_task(s, "a").await;
        let t1 = s
            .claim_tasks("w1", &names(&["act"]), 10, 1)
            .await
            .unwrap()
            .remove(0);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let t2 = s
            .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(t2.len(), 1, "an expired task lease is taken over");
        assert_eq!(t2[0].attempt, 2);
        assert!(
            !s.finish_task("w1", &t1, completed(&t1, json!(1)), LEASE_MS)
                .await
                .unwrap()
                .accepted,
            "the first attempt lost its lease"
        );
        assert!(
            s.finish_task("w2", &t2[0], completed(&t2[0], json!(2)), LEASE_MS)
                .await
                .unwrap()
                .accepted
        );
        assert_eq!(
            inbox_events(s, "a").await,
            vec![Event::ActivityCompleted {
                seq: 0,
                output: json!(2),
                attempt: 2
            }]
        );
    }

    /// A child the old run left running runs on, detached: its end does not go to the new run,
    /// which could have a child of its own at the same position.
    pub(super) async fn continue_as_new_detaches_the_old_runs_children(h: &Harness) {
        let s = &h.store;
        create_and_claim(s, "p", "w1").await;
        let child = |id: &str| Event::ChildStarted {
            seq: 0,
            instance_id: id.to_string(),
            coordinator: "c".to_string(),
            input: json!(id),
            detached: false,
        };
        activate(s, "w1", "p", vec![child("old-kid")], false)
            .await
            .unwrap();
        // The child starts and ends its own first activation: it now waits.
        let claimed = s
            .claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(claimed, vec!["old-kid".to_string()]);
        activate(s, "w2", "old-kid", vec![], false).await.unwrap();
        assert!(s
            .describe("old-kid")
            .await
            .unwrap()
            .unwrap()
            .parent
            .is_some());

        // The parent is woken (a signal) and continues as new.
        s.deliver("p", signal("again", json!(1)), None)
            .await
            .unwrap();
        let claimed = s
            .claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(claimed, vec!["p".to_string()]);
        activate(
            s,
            "w1",
            "p",
            vec![Event::ContinuedAsNew { input: json!(2) }],
            false,
        )
        .await
        .unwrap();
        let old_kid = s.describe("old-kid").await.unwrap().unwrap();
        assert_eq!(old_kid.status, InstanceStatus::Running);
        assert_eq!(old_kid.parent, None, "detached");
        // The new run starts a child at the same position; the old one ends first.
        s.claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        activate(s, "w1", "p", vec![child("new-kid")], false)
            .await
            .unwrap();
        s.deliver("old-kid", signal("end", json!(0)), None)
            .await
            .unwrap();
        s.claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        activate(
            s,
            "w2",
            "old-kid",
            vec![Event::InstanceCompleted {
                output: json!("old"),
            }],
            false,
        )
        .await
        .unwrap();
        assert!(
            inbox_events(s, "p").await.is_empty(),
            "the old run's child reported to the new run"
        );
        assert_eq!(
            s.describe("new-kid").await.unwrap().unwrap().parent,
            Some(ParentRef {
                instance_id: "p".into(),
                seq: 0
            })
        );
    }

    /// A run that starts, as its child, an instance that runs with no parent (here: left by
    /// the previous run, detached when it continued as new) gets that instance's end.
    pub(super) async fn a_detached_child_started_again_by_id_reports_to_its_new_caller(
        h: &Harness,
    ) {
        let s = &h.store;
        create_and_claim(s, "p", "w1").await;
        let child = |seq: u32| Event::ChildStarted {
            seq,
            instance_id: "kid".to_string(),
            coordinator: "c".to_string(),
            input: json!("kid"),
            detached: false,
        };
        activate(s, "w1", "p", vec![child(0)], false).await.unwrap();
        s.deliver("p", signal("again", json!(1)), None)
            .await
            .unwrap();
        s.claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        activate(
            s,
            "w1",
            "p",
            vec![Event::ContinuedAsNew { input: json!(2) }],
            false,
        )
        .await
        .unwrap();
        assert_eq!(s.describe("kid").await.unwrap().unwrap().parent, None);
        // The new run starts the same child id, at another position.
        let claimed = s
            .claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert!(claimed.contains(&"p".to_string()), "{claimed:?}");
        activate(
            s,
            "w1",
            "p",
            vec![
                Event::SideEffect {
                    seq: 0,
                    name: "now".into(),
                    value: json!(1),
                },
                child(1),
            ],
            false,
        )
        .await
        .unwrap();
        assert_eq!(
            s.describe("kid").await.unwrap().unwrap().parent,
            Some(ParentRef {
                instance_id: "p".into(),
                seq: 1
            })
        );
        // (The kid was claimed by w1 with its parent's claims above.)
        let claimed = s
            .claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert!(claimed.contains(&"kid".to_string()), "{claimed:?}");
        activate(
            s,
            "w1",
            "kid",
            vec![Event::InstanceCompleted { output: json!(5) }],
            false,
        )
        .await
        .unwrap();
        assert_eq!(
            inbox_events(s, "p").await,
            vec![Event::ChildCompleted {
                seq: 1,
                result: Ok(json!(5))
            }]
        );
    }

    /// Starting, as a new attached child, an id that could share idempotency keys with
    /// another instance's run (`kid@1`) fails the call at once and creates nothing.
    pub(super) async fn a_child_id_that_cannot_name_an_instance_fails_the_call(h: &Harness) {
        let s = &h.store;
        let child = |seq: u32, id: &str, detached: bool| Event::ChildStarted {
            seq,
            instance_id: id.to_string(),
            coordinator: "c".to_string(),
            input: json!(id),
            detached,
        };
        create_and_claim(s, "p", "w1").await;
        // An instance that got such an id before ids were checked.
        s.create_instance(new_instance("old@3", "c", json!(null)))
            .await
            .unwrap();
        activate(
            s,
            "w1",
            "p",
            vec![
                child(0, "kid@1", false),
                child(1, "free@2", true),
                child(2, "kid@x", false),
                child(3, "old@3", false),
            ],
            false,
        )
        .await
        .unwrap();
        // The attached start of a new `kid@1` fails at once, and creates nothing.
        let inbox = inbox_events(s, "p").await;
        assert!(
            matches!(
                inbox.as_slice(),
                [Event::ChildCompleted { seq: 0, result: Err(Error::Application { kind, message }) }]
                    if kind == "child_id_invalid" && message.contains("kid@1")
            ),
            "{inbox:?}"
        );
        assert!(s.describe("kid@1").await.unwrap().is_none());
        // A detached start, which nobody waits for, is made as before; other ids are fine;
        // an existing instance is adopted as any existing id is.
        assert!(s.describe("free@2").await.unwrap().is_some());
        assert!(s.describe("kid@x").await.unwrap().is_some());
        assert_eq!(
            s.describe("old@3").await.unwrap().unwrap().parent,
            Some(ParentRef {
                instance_id: "p".into(),
                seq: 3
            })
        );
    }

    /// Starting, as a child, an id that cannot report to this call fails the call at once
    /// instead of leaving it waiting forever: an instance of another coordinator, the caller
    /// itself, or a child that reports to another call already.
    pub(super) async fn a_child_id_that_cannot_be_this_calls_child_fails_the_call(h: &Harness) {
        let s = &h.store;
        let child = |seq: u32, id: &str, coordinator: &str| Event::ChildStarted {
            seq,
            instance_id: id.to_string(),
            coordinator: coordinator.to_string(),
            input: json!(id),
            detached: false,
        };
        create_and_claim(s, "other", "w1").await;
        activate(s, "w1", "other", vec![], false).await.unwrap();
        create_and_claim(s, "p2", "w2").await;
        create_and_claim(s, "p1", "w1").await;
        activate(s, "w1", "p1", vec![child(0, "kid", "c")], false)
            .await
            .unwrap();
        activate(
            s,
            "w2",
            "p2",
            vec![
                child(0, "other", "d"),
                child(1, "p2", "c"),
                child(2, "kid", "c"),
            ],
            false,
        )
        .await
        .unwrap();
        let kinds: Vec<(u32, String)> = inbox_events(s, "p2")
            .await
            .into_iter()
            .map(|e| match e {
                Event::ChildCompleted {
                    seq,
                    result: Err(Error::Application { kind, .. }),
                } => (seq, kind),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            vec![
                (0, "child_mismatch".to_string()),
                (1, "child_cycle".to_string()),
                (2, "child_taken".to_string())
            ]
        );
        // Nothing changed hands.
        assert_eq!(
            s.describe("kid").await.unwrap().unwrap().parent,
            Some(ParentRef {
                instance_id: "p1".into(),
                seq: 0
            })
        );
        assert_eq!(s.describe("p2").await.unwrap().unwrap().parent, None);
        assert_eq!(s.describe("other").await.unwrap().unwrap().parent, None);

        // Once its parent has ended, nobody waits for the child: a new caller adopts it.
        s.terminate("p1", "gone").await.unwrap();
        // (The kid, ready since it was created, goes to another worker first.)
        s.claim_ready("w9", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        create_and_claim(s, "p3", "w3").await;
        activate(s, "w3", "p3", vec![child(0, "kid", "c")], false)
            .await
            .unwrap();
        assert!(inbox_events(s, "p3").await.is_empty());
        assert_eq!(
            s.describe("kid").await.unwrap().unwrap().parent,
            Some(ParentRef {
                instance_id: "p3".into(),
                seq: 0
            })
        );
    }

    /// Outcomes of the old run that reach the inbox while its last activation (the one that
    /// continues as new) is computed are dropped with the run; signals stay.
    pub(super) async fn continue_as_new_drops_the_old_runs_late_outcomes(h: &Harness) {
        let s = &h.store;
        let task = call_and_timer(s, "a", now_ms().saturating_sub(1)).await;
        // The run's last activation is computed from an empty inbox...
        let last = plan(
            s,
            "w1",
            "a",
            vec![Event::ContinuedAsNew { input: json!(2) }],
            false,
        )
        .await;
        // ...while the call's outcome, the timer and a signal arrive.
        assert!(
            s.finish_task("w1", &task, completed(&task, json!(1)), LEASE_MS)
                .await
                .unwrap()
                .accepted
        );
        assert_eq!(s.fire_due_timers(now_ms(), 10).await.unwrap(), vec!["a"]);
        s.deliver("a", signal("s", json!(1)), None).await.unwrap();
        assert_eq!(inbox_events(s, "a").await.len(), 3);
        s.commit_activation(last).await.unwrap();
        let inbox = inbox_events(s, "a").await;
        assert_eq!(inbox.len(), 2, "{inbox:?}");
        assert!(inbox.contains(&signal("s", json!(1))), "{inbox:?}");
        assert!(
            inbox
                .iter()
                .any(|e| matches!(e, Event::InstanceStarted { input, .. } if *input == json!(2))),
            "{inbox:?}"
        );
    }

    pub(super) async fn continue_as_new_bumps_generation(h: &Harness) {
        let s = &h.store;
        let due = now_ms() + 3_600_000;
        let old_task = call_and_timer(s, "a", due).await;
        s.finish_task("w1", &old_task, completed(&old_task, json!(1)), LEASE_MS)
            .await
            .unwrap();
        let receipt = activate(
            s,
            "w1",
            "a",
            vec![Event::ContinuedAsNew { input: json!(2) }],
            false,
        )
        .await
        .unwrap();
        assert!(receipt.ready_again, "the new run starts at once");
        // A signal sent meanwhile is kept for the new run.
        s.deliver("a", signal("s", json!(1)), Some("once"))
            .await
            .unwrap();
        let loaded = s.load("a", 0).await.unwrap();
        assert_eq!(loaded.info.generation, 1);
        assert_eq!(loaded.info.next_position, 0);
        assert_eq!(loaded.info.next_activation, 0);
        assert_eq!(loaded.info.input, json!(2));
        assert_eq!(loaded.info.status, InstanceStatus::Running);
        assert!(loaded.events.is_empty());
        let inbox: Vec<Event> = loaded.inbox.into_iter().map(|m| m.event).collect();
        assert_eq!(inbox.len(), 2);
        assert!(matches!(&inbox[0], Event::InstanceStarted { input, .. } if *input == json!(2)));
        assert_eq!(inbox[1], signal("s", json!(1)));
        assert!(s.history("a").await.unwrap().is_empty());
        assert_eq!(
            s.next_due().await.unwrap(),
            None,
            "old timers and tasks are gone"
        );
        assert!(s.fire_due_timers(due, 10).await.unwrap().is_empty());
        assert!(
            !s.finish_task("w1", &old_task, completed(&old_task, json!(1)), LEASE_MS)
                .await
                .unwrap()
                .accepted
        );

        // The old run's position is stale; the new run appends from 0 with generation 1.
        let mut stale = plan(s, "w1", "a", vec![], false).await;
        stale.generation = 0;
        assert!(matches!(
            s.commit_activation(stale).await,
            Err(StoreError::Conflict { .. })
        ));
        activate(s, "w1", "a", vec![scheduled(0, "act")], false)
            .await
            .unwrap();
        let t = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .remove(0);
        assert_eq!((t.generation, t.attempt), (1, 1));
        let history = s.history("a").await.unwrap();
        assert_eq!(history.len(), 3);
        assert!(
            matches!(&history[0].event, Event::InstanceStarted { input, .. } if *input == json!(2))
        );
    }

    pub(super) async fn terminate_ends_instance(h: &Harness) {
        let s = &h.store;
        create_and_claim(s, "a", "w1").await;
        activate(
            s,
            "w1",
            "a",
            vec![
                scheduled(0, "act"),
                Event::TimerStarted {
                    seq: 1,
                    fire_at_ms: now_ms(),
                },
            ],
            false,
        )
        .await
        .unwrap();
        s.deliver("a", signal("s", json!(1)), None).await.unwrap();
        s.terminate("a", "operator said so").await.unwrap();
        let info = s.describe("a").await.unwrap().unwrap();
        assert_eq!(info.status, InstanceStatus::Terminated);
        assert_eq!(info.reason.as_deref(), Some("operator said so"));
        assert!(info.ended_at_ms.is_some());
        assert_eq!(info.next_position, 4);
        let history = s.history("a").await.unwrap();
        assert_eq!(
            history.last().unwrap().event,
            Event::InstanceTerminated {
                reason: "operator said so".into()
            }
        );
        assert_eq!(history.last().unwrap().position, 3);
        assert_eq!(history.last().unwrap().activation, 1);
        assert!(s.load("a", 0).await.unwrap().inbox.is_empty());
        assert!(s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        assert!(s.fire_due_timers(now_ms(), 10).await.unwrap().is_empty());
        assert!(s
            .claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        assert!(matches!(
            s.commit_activation(plan(s, "w1", "a", vec![], false).await)
                .await,
            Err(StoreError::Conflict { .. })
        ));
        // Terminating again changes nothing and says why; an unknown instance is an error.
        assert!(matches!(
            s.terminate("a", "again").await,
            Err(StoreError::Ended {
                status: InstanceStatus::Terminated,
                ..
            })
        ));
        // Nor is an ended instance resumed.
        assert!(matches!(
            s.resume("a").await,
            Err(StoreError::Ended {
                status: InstanceStatus::Terminated,
                ..
            })
        ));
        assert_eq!(
            s.describe("a").await.unwrap().unwrap().status,
            InstanceStatus::Terminated
        );
        assert_eq!(s.history("a").await.unwrap().len(), 4);
        assert_eq!(
            s.describe("a").await.unwrap().unwrap().reason.as_deref(),
            Some("operator said so")
        );
        assert!(matches!(
            s.terminate("nobody", "x").await,
            Err(StoreError::NotFound { .. })
        ));
    }

    pub(super) async fn children_report_to_parents(h: &Harness) {
        let s = &h.store;
        create_and_claim(s, "p", "w1").await;
        let child = |seq: u32, id: &str| Event::ChildStarted {
            seq,
            instance_id: id.to_string(),
            coordinator: "c".to_string(),
            input: json!(id),
            detached: false,
        };
        let receipt = activate(s, "w1", "p", vec![child(0, "k1"), child(1, "k2")], false)
            .await
            .unwrap();
        assert_eq!(receipt.woken, vec!["k1".to_string(), "k2".to_string()]);
        let k1 = s.describe("k1").await.unwrap().unwrap();
        assert_eq!(
            k1.parent,
            Some(ParentRef {
                instance_id: "p".into(),
                seq: 0
            })
        );
        assert!(matches!(
            inbox_events(s, "k1").await.as_slice(),
            [Event::InstanceStarted { parent: Some(p), .. }] if p.instance_id == "p"
        ));

        // A child's end goes to its parent's inbox, and wakes it.
        let claimed = s
            .claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 2);
        let receipt = activate(
            s,
            "w2",
            "k1",
            vec![Event::InstanceCompleted { output: json!(42) }],
            false,
        )
        .await
        .unwrap();
        assert_eq!(receipt.woken, vec!["p".to_string()]);
        let k1 = s.describe("k1").await.unwrap().unwrap();
        assert_eq!(k1.status, InstanceStatus::Completed);
        assert_eq!(k1.output, Some(json!(42)));
        assert_eq!(
            inbox_events(s, "p").await,
            vec![Event::ChildCompleted {
                seq: 0,
                result: Ok(json!(42))
            }]
        );
        // A terminated child reports an error.
        s.terminate("k2", "cut").await.unwrap();
        let inbox = inbox_events(s, "p").await;
        assert_eq!(inbox.len(), 2);
        assert!(matches!(
            &inbox[1],
            Event::ChildCompleted { seq: 1, result: Err(Error::Application { kind, .. }) }
                if kind == "terminated"
        ));
        assert_eq!(
            s.claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["p".to_string()]
        );

        // Starting an existing, ended child reports its end at once.
        activate(s, "w1", "p", vec![child(2, "k1")], false)
            .await
            .unwrap();
        assert_eq!(
            inbox_events(s, "p").await,
            vec![Event::ChildCompleted {
                seq: 2,
                result: Ok(json!(42))
            }]
        );
        // A parent that has ended hears nothing more.
        assert_eq!(
            s.claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["p".to_string()]
        );
        activate(s, "w1", "p", vec![child(3, "k3")], false)
            .await
            .unwrap();
        s.terminate("p", "over").await.unwrap();
        s.terminate("k3", "also over").await.unwrap();
        assert!(inbox_events(s, "p").await.is_empty());
    }

    /// An activation that schedules a call and ends the run (a call not awaited, then a
    /// return or a continue-as-new) hands no call to run: the end drops it.
    pub(super) async fn a_run_that_ends_claims_no_call(h: &Harness) {
        let s = &h.store;
        for (id, end) in [
            ("ends", Event::InstanceCompleted { output: json!(1) }),
            ("goes-on", Event::ContinuedAsNew { input: json!(2) }),
        ] {
            create_and_claim(s, id, "w1").await;
            let receipt = activate(s, "w1", id, vec![scheduled(0, "act"), end], true)
                .await
                .unwrap();
            assert!(
                receipt.claimed_tasks.is_empty(),
                "{id}: {:?}",
                receipt.claimed_tasks
            );
        }
        let tasks = s
            .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert!(tasks.is_empty(), "{tasks:?}");
    }

    /// `deliver_message`: accepted; a key delivered before is a duplicate, even once the
    /// instance has ended; anything else sent after the end is refused as ended.
    pub(super) async fn delivery_says_what_became_of_a_message(h: &Harness) {
        let s = &h.store;
        create_and_claim(s, "d", "w1").await;
        activate(s, "w1", "d", vec![], false).await.unwrap();
        let pay = || signal("pay", json!(7));
        assert_eq!(
            s.deliver_message("d", pay(), Some("signal:p-1"))
                .await
                .unwrap(),
            Delivery::Accepted
        );
        assert_eq!(
            s.deliver_message("d", pay(), Some("signal:p-1"))
                .await
                .unwrap(),
            Delivery::Duplicate
        );
        s.claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        activate(
            s,
            "w1",
            "d",
            vec![Event::InstanceCompleted { output: json!(7) }],
            false,
        )
        .await
        .unwrap();
        assert_eq!(
            s.deliver_message("d", pay(), Some("signal:p-1"))
                .await
                .unwrap(),
            Delivery::Duplicate,
            "delivered before the end: not lost"
        );
        for key in [Some("signal:p-2"), None] {
            assert_eq!(
                s.deliver_message("d", pay(), key).await.unwrap(),
                Delivery::Ended(InstanceStatus::Completed)
            );
        }
        assert!(!s.deliver("d", pay(), None).await.unwrap());
        assert!(matches!(
            s.deliver_message("nobody", pay(), None).await,
            Err(StoreError::NotFound { .. })
        ));
    }

    /// A parent stopped (a bug in its code) while its child runs still gets the child's end:
    /// it waits in the parent's inbox, which stays stopped, and is delivered once resumed.
    pub(super) async fn a_stopped_parent_keeps_its_childs_result(h: &Harness) {
        let s = &h.store;
        create_and_claim(s, "p", "w1").await;
        let child = Event::ChildStarted {
            seq: 0,
            instance_id: "k1".to_string(),
            coordinator: "c".to_string(),
            input: json!("k1"),
            detached: false,
        };
        activate(s, "w1", "p", vec![child], false).await.unwrap();
        s.stop_instance("p", "w1", "a bug").await.unwrap();
        assert_eq!(
            s.describe("p").await.unwrap().unwrap().status,
            InstanceStatus::Stopped
        );

        let claimed = s
            .claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(claimed, vec!["k1".to_string()]);
        activate(
            s,
            "w2",
            "k1",
            vec![Event::InstanceCompleted { output: json!(7) }],
            false,
        )
        .await
        .unwrap();
        assert_eq!(
            inbox_events(s, "p").await,
            vec![Event::ChildCompleted {
                seq: 0,
                result: Ok(json!(7))
            }]
        );
        let info = s.describe("p").await.unwrap().unwrap();
        assert_eq!(info.status, InstanceStatus::Stopped, "still stopped");
        assert!(s
            .claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());

        s.resume("p").await.unwrap();
        assert_eq!(
            s.claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["p".to_string()]
        );
    }

    /// `release_idle`: the lease goes back, and the instance stays ready only while its inbox
    /// holds something; nobody but the holder can release it.
    pub(super) async fn release_idle_hands_back_the_lease(h: &Harness) {
        let s = &h.store;
        create_and_claim(s, "idle", "w1").await;
        activate(s, "w1", "idle", vec![], false).await.unwrap();
        // Made ready again (as an imported instance is) and claimed, with an empty inbox.
        s.deliver("idle", signal("go", json!(1)), None)
            .await
            .unwrap();
        let claimed = s
            .claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(claimed, vec!["idle".to_string()]);
        activate(s, "w1", "idle", vec![], false).await.unwrap();
        s.deliver("idle", signal("go", json!(2)), None)
            .await
            .unwrap();
        let claimed = s
            .claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(claimed, vec!["idle".to_string()]);

        // Not the holder: nothing changes.
        s.release_idle("idle", "w2").await.unwrap();
        assert!(s
            .claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        // The holder, with a message waiting: released, and still ready.
        s.release_idle("idle", "w1").await.unwrap();
        let claimed = s
            .claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(claimed, vec!["idle".to_string()]);
        // Ready with an empty inbox (a fork, like an import, is created so), claimed, then
        // released: no longer ready, and free.
        activate(s, "w2", "idle", vec![], false).await.unwrap();
        let end = s.history("idle").await.unwrap().len() as u64;
        s.fork_instance("idle", end, "idle-fork").await.unwrap();
        let claimed = s
            .claim_ready("w3", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(claimed, vec!["idle-fork".to_string()]);
        s.release_idle("idle-fork", "w3").await.unwrap();
        assert!(s
            .claim_ready("w4", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            s.describe("idle-fork").await.unwrap().unwrap().status,
            InstanceStatus::Running
        );
    }

    pub(super) async fn stop_and_resume(h: &Harness) {
        let s = &h.store;
        create_and_claim(s, "a", "w1").await;
        s.stop_instance("a", "w2", "not the holder").await.unwrap();
        assert_eq!(
            s.describe("a").await.unwrap().unwrap().status,
            InstanceStatus::Running
        );
        s.stop_instance("a", "w1", "nondeterminism at 3")
            .await
            .unwrap();
        let info = s.describe("a").await.unwrap().unwrap();
        assert_eq!(info.status, InstanceStatus::Stopped);
        assert_eq!(info.reason.as_deref(), Some("nondeterminism at 3"));
        assert!(s
            .claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(inbox_events(s, "a").await.len(), 1, "inbox kept");
        s.resume("a").await.unwrap();
        let info = s.describe("a").await.unwrap().unwrap();
        assert_eq!(info.status, InstanceStatus::Running);
        assert_eq!(info.reason, None);
        assert_eq!(
            s.claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["a".to_string()]
        );
        assert!(matches!(
            s.resume("nobody").await,
            Err(StoreError::NotFound { .. })
        ));

        // Waiting for a worker that knows the coordinator: reason noted, lease handed back.
        s.note_waiting("a", "w2", "no worker knows c")
            .await
            .unwrap();
        let info = s.describe("a").await.unwrap().unwrap();
        assert_eq!(info.status, InstanceStatus::Running);
        assert_eq!(info.reason.as_deref(), Some("no worker knows c"));
        assert_eq!(
            s.claim_ready("w3", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["a".to_string()]
        );

        // Resuming an instance with nothing to deliver does not make it claimable.
        create_and_claim(s, "e", "w1").await;
        activate(s, "w1", "e", vec![scheduled(0, "act")], false)
            .await
            .unwrap();
        s.stop_instance("e", "w1", "stopped by hand").await.unwrap();
        s.resume("e").await.unwrap();
        assert_eq!(
            s.describe("e").await.unwrap().unwrap().status,
            InstanceStatus::Running
        );
        assert!(s
            .claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap()
            .iter()
            .all(|id| id != "e"));
        // A note applies while nobody holds the lease, too.
        s.note_waiting("e", "w7", "no worker knows act")
            .await
            .unwrap();
        assert_eq!(
            s.describe("e").await.unwrap().unwrap().reason.as_deref(),
            Some("no worker knows act")
        );
    }

    pub(super) async fn a_task_claimed_with_its_activation_starts_its_attempt_then(h: &Harness) {
        let s = &h.store;
        create_and_claim(s, "c", "w1").await;
        let scheduled_at = now_ms();
        let mut receipt = activate(s, "w1", "c", vec![scheduled(0, "act")], true)
            .await
            .unwrap();
        assert_eq!(receipt.claimed_tasks.len(), 1);
        let task = receipt.claimed_tasks.remove(0);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let finished = s
            .finish_task("w1", &task, completed(&task, json!(1)), LEASE_MS)
            .await
            .unwrap();
        assert!(finished.accepted);
        let attempts = s.attempts("c").await.unwrap();
        assert_eq!(attempts.len(), 1, "{attempts:?}");
        // The attempt ran from the commit that claimed it, not from its end (a zero-length bar
        // in `retrace timeline`).
        let a = &attempts[0];
        assert!(a.started_at_ms >= scheduled_at, "{a:?}");
        assert!(a.ended_at_ms >= a.started_at_ms + 25, "{a:?}");

        // The same through the direct path, the common sequential step: the attempt runs from
        // the `activity_scheduled` event to the outcome event (the SQLite store derives such an
        // attempt from them instead of writing a row; the journal reads the same).
        create_and_claim(s, "d", "w2").await;
        let mut receipt = activate(s, "w2", "d", vec![scheduled(0, "act")], true)
            .await
            .unwrap();
        let task = receipt.claimed_tasks.remove(0);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let info = s.describe("d").await.unwrap().unwrap();
        let commit = ActivationCommit::plan(
            "d",
            "w2",
            info.generation,
            info.next_position,
            info.next_activation,
            vec![
                Event::ActivityCompleted {
                    seq: 0,
                    output: json!(1),
                    attempt: 1,
                },
                scheduled(1, "act"),
            ],
            vec![],
            None,
            &|_| false,
            LEASE_MS,
        );
        let done = s.finish_and_activate(&task, commit).await.unwrap();
        assert!(matches!(done, DirectFinish::Activated(_)), "{done:?}");
        let history = s.history("d").await.unwrap();
        let at = |kind: &str, seq: u32| {
            history
                .iter()
                .find(|e| match &e.event {
                    Event::ActivityScheduled { seq: s, .. } => kind == "s" && *s == seq,
                    Event::ActivityCompleted { seq: s, .. } => kind == "c" && *s == seq,
                    _ => false,
                })
                .map(|e| e.recorded_at_ms)
                .unwrap()
        };
        let attempts = s.attempts("d").await.unwrap();
        assert_eq!(attempts.len(), 1, "{attempts:?}");
        let a = &attempts[0];
        assert_eq!(
            (
                a.generation,
                a.seq,
                a.attempt,
                a.outcome,
                a.error.as_deref()
            ),
            (0, 0, 1, AttemptEnd::Completed, None)
        );
        assert_eq!((a.started_at_ms, a.ended_at_ms), (at("s", 0), at("c", 0)));
        assert!(a.ended_at_ms >= a.started_at_ms + 25, "{a:?}");
    }

    /// A call claimed in the commit that schedules it (the SQLite store keeps it on the instance
    /// row) has the lifecycle of any task: its lease expires and another worker takes it over
    /// as attempt 2 (the late attempt 1 is then refused), a release or a retry makes it
    /// claimable, a renewal keeps it, an end drops it. Each checked on every store.
    pub(super) async fn a_call_claimed_with_its_activation_is_a_task_like_any_other(h: &Harness) {
        let s = &h.store;
        // Claims `id`'s first call for w1 with a lease of `lease_ms`.
        let held = |id: &'static str, lease_ms: u64| async move {
            create_and_claim(s, id, "w1").await;
            let loaded = s.load(id, 0).await.unwrap();
            let mut events: Vec<Event> = loaded.inbox.iter().map(|m| m.event.clone()).collect();
            events.push(scheduled(0, "act"));
            let commit = ActivationCommit::plan(
                id,
                "w1",
                loaded.info.generation,
                loaded.info.next_position,
                loaded.info.next_activation,
                events,
                loaded.inbox.iter().map(|m| m.id).collect(),
                None,
                &|_| true,
                lease_ms,
            );
            let mut receipt = s.commit_activation(commit).await.unwrap();
            assert_eq!(receipt.claimed_tasks.len(), 1);
            receipt.claimed_tasks.remove(0)
        };
        let claim = |owner: &'static str| async move {
            s.claim_tasks(owner, &names(&["act"]), 10, LEASE_MS)
                .await
                .unwrap()
        };

        // Expiry: taken over as attempt 2; the late attempt 1 is refused, attempt 2 accepted.
        let first = held("expires", 1).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let taken = claim("w2").await;
        assert_eq!(taken.len(), 1, "{taken:?}");
        assert_eq!(
            (
                taken[0].instance_id.as_str(),
                taken[0].seq,
                taken[0].attempt
            ),
            ("expires", 0, 2)
        );
        assert!(
            !s.finish_task("w1", &first, completed(&first, json!(1)), LEASE_MS)
                .await
                .unwrap()
                .accepted
        );
        assert!(
            s.finish_task("w2", &taken[0], completed(&taken[0], json!(2)), LEASE_MS)
                .await
                .unwrap()
                .accepted
        );
        assert_eq!(
            inbox_events(s, "expires").await,
            vec![Event::ActivityCompleted {
                seq: 0,
                output: json!(2),
                attempt: 2
            }]
        );

        // Renewal keeps it; release makes it claimable at once.
        let _renewed = held("renewed", 300).await;
        assert!(s.renew_leases("w1", LEASE_MS).await.unwrap() >= 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            claim("w2").await.is_empty(),
            "a renewed lease is not taken over"
        );
        s.release_leases("w1").await.unwrap();
        let taken = claim("w2").await;
        assert_eq!(
            taken
                .iter()
                .map(|t| (t.instance_id.as_str(), t.attempt))
                .collect::<Vec<_>>(),
            vec![("renewed", 2)]
        );

        // A retry: attempt 1 journaled as retried, the call claimable again as attempt 2.
        let first = held("retried", LEASE_MS).await;
        let retry = AttemptOutcome::Retry {
            next_attempt_at_ms: now_ms(),
            error: ActivityError::retryable("flaky", "first"),
        };
        assert!(
            s.finish_task("w1", &first, retry, LEASE_MS)
                .await
                .unwrap()
                .accepted
        );
        let taken = claim("w2").await;
        assert_eq!(
            taken
                .iter()
                .map(|t| (t.instance_id.as_str(), t.attempt))
                .collect::<Vec<_>>(),
            vec![("retried", 2)]
        );
        let attempts = s.attempts("retried").await.unwrap();
        assert_eq!(
            attempts
                .iter()
                .map(|a| (a.attempt, a.outcome))
                .collect::<Vec<_>>(),
            vec![(1, AttemptEnd::Retry)]
        );

        // An end drops it: nothing to claim, the late outcome refused.
        let first = held("ended", 1).await;
        s.terminate("ended", "no longer needed").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(claim("w2").await.is_empty());
        assert!(
            !s.finish_task("w1", &first, completed(&first, json!(1)), LEASE_MS)
                .await
                .unwrap()
                .accepted
        );
    }

    /// The sequential step hands the claimed call on (finish one, claim the next, one commit);
    /// a call claimed while another claimed call still runs (a signal raced it) is a task as
    /// well; continuing as new drops a running call, whose late outcome is refused.
    pub(super) async fn calls_claimed_with_their_activations_hand_over_race_and_end(h: &Harness) {
        let s = &h.store;
        let claim = |owner: &'static str| async move {
            let mut t = s
                .claim_tasks(owner, &names(&["act"]), 10, LEASE_MS)
                .await
                .unwrap();
            t.sort_by_key(|t| (t.instance_id.clone(), t.seq));
            t.into_iter()
                .map(|t| (t.instance_id, t.seq, t.attempt))
                .collect::<Vec<_>>()
        };
        let plan_at = |id: &str,
                       events: Vec<Event>,
                       consumed: Vec<i64>,
                       info: &retrace_runtime::InstanceInfo| {
            ActivationCommit::plan(
                id,
                "w1",
                info.generation,
                info.next_position,
                info.next_activation,
                events,
                consumed,
                None,
                &|_| true,
                LEASE_MS,
            )
        };

        // Hand-over: finishing call 0 claims call 1 in the same commit.
        create_and_claim(s, "seq", "w1").await;
        let mut r = activate(s, "w1", "seq", vec![scheduled(0, "act")], true)
            .await
            .unwrap();
        let t0 = r.claimed_tasks.remove(0);
        let info = s.describe("seq").await.unwrap().unwrap();
        let done = s
            .finish_and_activate(
                &t0,
                plan_at(
                    "seq",
                    vec![
                        Event::ActivityCompleted {
                            seq: 0,
                            output: json!(0),
                            attempt: 1,
                        },
                        scheduled(1, "act"),
                    ],
                    vec![],
                    &info,
                ),
            )
            .await
            .unwrap();
        let DirectFinish::Activated(mut r) = done else {
            panic!("expected the direct path, got {done:?}");
        };
        let t1 = r.claimed_tasks.remove(0);
        assert_eq!((t1.seq, t1.attempt), (1, 1));
        assert!(claim("w2").await.is_empty(), "call 1 is w1's");
        assert!(
            !s.finish_task("w1", &t0, completed(&t0, json!(9)), LEASE_MS)
                .await
                .unwrap()
                .accepted,
            "call 0 has its outcome"
        );
        s.release_leases("w1").await.unwrap();
        assert_eq!(claim("w2").await, vec![("seq".to_string(), 1, 2)]);
        let late = plan_at(
            "seq",
            vec![Event::ActivityCompleted {
                seq: 1,
                output: json!(1),
                attempt: 1,
            }],
            vec![],
            &s.describe("seq").await.unwrap().unwrap(),
        );
        let done = s.finish_and_activate(&t1, late).await.unwrap();
        assert!(
            matches!(
                done,
                DirectFinish::Finished(FinishReceipt {
                    accepted: false,
                    ..
                })
            ),
            "{done:?}"
        );

        // A race: call 0 runs; a signal's activation claims call 1 meanwhile.
        create_and_claim(s, "race", "w1").await;
        let mut r = activate(s, "w1", "race", vec![scheduled(0, "act")], true)
            .await
            .unwrap();
        let r0 = r.claimed_tasks.remove(0);
        assert!(s
            .deliver("race", signal("go", json!(1)), None)
            .await
            .unwrap());
        assert_eq!(
            s.claim_ready("w1", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["race".to_string()]
        );
        let mut r = activate(s, "w1", "race", vec![scheduled(1, "act")], true)
            .await
            .unwrap();
        let r1 = r.claimed_tasks.remove(0);
        assert_eq!((r1.seq, r1.attempt), (1, 1));
        assert!(claim("w2").await.is_empty(), "both calls are w1's");
        for t in [&r0, &r1] {
            assert!(
                s.finish_task("w1", t, completed(t, json!(t.seq)), LEASE_MS)
                    .await
                    .unwrap()
                    .accepted
            );
        }
        assert_eq!(inbox_events(s, "race").await.len(), 2);

        // Continue-as-new drops the running call; its late outcome is refused.
        create_and_claim(s, "cont", "w3").await;
        let mut r = activate(s, "w3", "cont", vec![scheduled(0, "act")], true)
            .await
            .unwrap();
        let c0 = r.claimed_tasks.remove(0);
        assert!(s
            .deliver("cont", signal("again", json!(1)), None)
            .await
            .unwrap());
        s.claim_ready("w3", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        activate(
            s,
            "w3",
            "cont",
            vec![Event::ContinuedAsNew { input: json!(2) }],
            true,
        )
        .await
        .unwrap();
        s.release_leases("w3").await.unwrap();
        assert!(
            claim("w2").await.is_empty(),
            "no call of the earlier run is left"
        );
        assert!(
            !s.finish_task("w3", &c0, completed(&c0, json!(0)), LEASE_MS)
                .await
                .unwrap()
                .accepted
        );
    }

    pub(super) async fn attempts_are_journaled(h: &Harness) {
        let s = &h.store;
        assert!(s.attempts("nobody").await.unwrap().is_empty());
        instance_with_task(s, "a").await;
        let before = now_ms();
        let t1 = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .remove(0);
        let retry = AttemptOutcome::Retry {
            next_attempt_at_ms: now_ms(),
            error: ActivityError::retryable("flaky", "first"),
        };
        assert!(
            s.finish_task("w1", &t1, retry, LEASE_MS)
                .await
                .unwrap()
                .accepted
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        let t2 = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .remove(0);
        assert_eq!(t2.attempt, 2);
        let receipt = s
            .finish_task("w1", &t2, completed(&t2, json!(7)), LEASE_MS)
            .await
            .unwrap();
        assert!(receipt.accepted);
        // A stale finish of attempt 1 is dropped, and journals nothing.
        assert!(
            !s.finish_task("w1", &t1, completed(&t1, json!(0)), LEASE_MS)
                .await
                .unwrap()
                .accepted
        );
        let after = now_ms();
        let attempts = s.attempts("a").await.unwrap();
        assert_eq!(attempts.len(), 2, "{attempts:?}");
        for (a, n) in attempts.iter().zip(1..) {
            assert_eq!(
                (a.instance_id.as_str(), a.generation, a.seq, a.attempt),
                ("a", 0, 0, n)
            );
            assert!(before <= a.started_at_ms && a.started_at_ms <= a.ended_at_ms);
            assert!(a.ended_at_ms <= after);
        }
        assert_eq!(attempts[0].outcome, AttemptEnd::Retry);
        assert_eq!(attempts[0].error.as_deref(), Some("flaky: first"));
        assert!(attempts[0].ended_at_ms <= attempts[1].started_at_ms);
        assert_eq!(attempts[1].outcome, AttemptEnd::Completed);
        assert_eq!(attempts[1].error, None);
        // The history stays replay-only: the outcome alone, of the last attempt.
        activate(s, "w1", "a", vec![], false).await.unwrap();
        let history = history_events(s, "a").await;
        assert_eq!(
            history
                .iter()
                .filter(|e| matches!(
                    e,
                    Event::ActivityCompleted { .. } | Event::ActivityFailed { .. }
                ))
                .collect::<Vec<_>>(),
            vec![&Event::ActivityCompleted {
                seq: 0,
                output: json!(7),
                attempt: 2
            }]
        );

        // The direct path journals too; ending the instance keeps its attempts.
        instance_with_task(s, "b").await;
        let t = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .remove(0);
        let info = s.describe("b").await.unwrap().unwrap();
        let commit = ActivationCommit::plan(
            "b",
            "w1",
            info.generation,
            info.next_position,
            info.next_activation,
            vec![Event::ActivityCompleted {
                seq: t.seq,
                output: json!(1),
                attempt: t.attempt,
            }],
            vec![],
            None,
            &|_| true,
            LEASE_MS,
        );
        s.finish_and_activate(&t, commit).await.unwrap();
        s.terminate("b", "done").await.unwrap();
        let attempts = s.attempts("b").await.unwrap();
        assert_eq!(attempts.len(), 1, "{attempts:?}");
        assert_eq!(
            (attempts[0].seq, attempts[0].attempt, attempts[0].outcome),
            (0, 1, AttemptEnd::Completed)
        );

        // A first attempt claimed with its scheduling and completed by the run's last commit
        // is there too, whether the run ends or continues as new (its history then goes).
        for (id, end) in [
            ("e", Event::InstanceCompleted { output: json!(1) }),
            ("f", Event::ContinuedAsNew { input: json!(2) }),
        ] {
            create_and_claim(s, id, "w1").await;
            let receipt = activate(s, "w1", id, vec![scheduled(0, "act")], true)
                .await
                .unwrap();
            let t = receipt.claimed_tasks[0].clone();
            let info = s.describe(id).await.unwrap().unwrap();
            let commit = ActivationCommit::plan(
                id,
                "w1",
                info.generation,
                info.next_position,
                info.next_activation,
                vec![completed_event(&t, json!(1)), end],
                vec![],
                None,
                &|_| true,
                LEASE_MS,
            );
            s.finish_and_activate(&t, commit).await.unwrap();
            let info = s.describe(id).await.unwrap().unwrap();
            let history = history_events(s, id).await;
            if id == "e" {
                assert_eq!(info.status, InstanceStatus::Completed);
                assert_eq!(info.output, Some(json!(1)));
                assert_eq!(history.len(), 4, "{history:?}");
            } else {
                assert_eq!(info.status, InstanceStatus::Running);
                assert_eq!(info.generation, 1);
            }
            let attempts = s.attempts(id).await.unwrap();
            assert_eq!(attempts.len(), 1, "{id}: {attempts:?}");
            assert_eq!(
                (attempts[0].seq, attempts[0].attempt, attempts[0].outcome),
                (0, 1, AttemptEnd::Completed),
                "{id}"
            );
            assert!(attempts[0].started_at_ms <= attempts[0].ended_at_ms);
        }

        // Two sequential calls on the direct path, the second continuing the run as new: the
        // first call's attempt, which only the run's history told, is kept with the second's.
        // (Another worker: "f", ready again for its new run, stays leased to "w1".)
        create_and_claim(s, "g", "w2").await;
        let receipt = activate(s, "w2", "g", vec![scheduled(0, "act")], true)
            .await
            .unwrap();
        let mut task = receipt.claimed_tasks[0].clone();
        for (seq, then) in [
            (0u32, scheduled(1, "act")),
            (1, Event::ContinuedAsNew { input: json!(3) }),
        ] {
            assert_eq!(task.seq, seq);
            let info = s.describe("g").await.unwrap().unwrap();
            let commit = ActivationCommit::plan(
                "g",
                "w2",
                info.generation,
                info.next_position,
                info.next_activation,
                vec![completed_event(&task, json!(seq)), then],
                vec![],
                None,
                &|_| true,
                LEASE_MS,
            );
            match s.finish_and_activate(&task, commit).await.unwrap() {
                DirectFinish::Activated(receipt) if seq == 0 => {
                    task = receipt.claimed_tasks[0].clone();
                }
                DirectFinish::Activated(_) => {}
                other => panic!("call {seq}: {other:?}"),
            }
        }
        assert_eq!(s.describe("g").await.unwrap().unwrap().generation, 1);
        let attempts = s.attempts("g").await.unwrap();
        assert_eq!(
            attempts
                .iter()
                .map(|a| (a.generation, a.seq, a.attempt, a.outcome))
                .collect::<Vec<_>>(),
            vec![
                (0, 0, 1, AttemptEnd::Completed),
                (0, 1, 1, AttemptEnd::Completed)
            ]
        );
    }

    pub(super) async fn finish_and_activate_commits_both(h: &Harness) {
        let s = &h.store;
        let outcome = |t: &ActivityTask, v: Value| Event::ActivityCompleted {
            seq: t.seq,
            output: v,
            attempt: t.attempt,
        };
        // The fast path: the outcome and the activation it feeds, in one commit.
        instance_with_task(s, "a").await;
        let t = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .remove(0);
        let info = s.describe("a").await.unwrap().unwrap();
        let direct = |id: &str, info: &retrace_runtime::InstanceInfo, events: Vec<Event>| {
            ActivationCommit::plan(
                id,
                "w1",
                info.generation,
                info.next_position,
                info.next_activation,
                events,
                vec![],
                None,
                &|_| true,
                LEASE_MS,
            )
        };
        let commit = direct("a", &info, vec![outcome(&t, json!(1)), scheduled(1, "act")]);
        match s.finish_and_activate(&t, commit.clone()).await.unwrap() {
            DirectFinish::Activated(receipt) => {
                assert_eq!(receipt.claimed_tasks.len(), 1);
                assert_eq!(receipt.claimed_tasks[0].seq, 1);
                assert!(!receipt.ready_again);
            }
            other => panic!("expected the direct path, got {other:?}"),
        }
        let history = s.history("a").await.unwrap();
        assert_eq!(history.len(), 4);
        assert_eq!((history[2].position, history[2].activation), (2, 1));
        assert_eq!(history[2].event, outcome(&t, json!(1)));
        assert!(inbox_events(s, "a").await.is_empty());
        // The task is gone: the same attempt cannot finish twice.
        assert!(matches!(
            s.finish_and_activate(&t, commit).await.unwrap(),
            DirectFinish::Finished(FinishReceipt {
                accepted: false,
                ..
            })
        ));
        assert!(
            !s.finish_task("w1", &t, completed(&t, json!(1)), LEASE_MS)
                .await
                .unwrap()
                .accepted
        );

        // The instance is leased by another worker: only the outcome is recorded.
        instance_with_task(s, "b").await;
        let t = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.instance_id == "b")
            .unwrap();
        s.deliver("b", signal("s", json!(0)), None).await.unwrap();
        assert_eq!(
            s.claim_ready("w9", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["b".to_string()]
        );
        let info = s.describe("b").await.unwrap().unwrap();
        let done = s
            .finish_and_activate(&t, direct("b", &info, vec![outcome(&t, json!(2))]))
            .await
            .unwrap();
        assert!(matches!(
            done,
            DirectFinish::Finished(FinishReceipt {
                accepted: true,
                instance_claimed: false
            })
        ));
        assert_eq!(s.history("b").await.unwrap().len(), 2);
        assert_eq!(
            inbox_events(s, "b").await,
            vec![signal("s", json!(0)), outcome(&t, json!(2))]
        );

        // Free, but with something else to deliver first: recorded, and the instance claimed.
        instance_with_task(s, "c").await;
        let t = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.instance_id == "c")
            .unwrap();
        s.deliver("c", signal("s", json!(0)), None).await.unwrap();
        let info = s.describe("c").await.unwrap().unwrap();
        let done = s
            .finish_and_activate(&t, direct("c", &info, vec![outcome(&t, json!(3))]))
            .await
            .unwrap();
        assert!(matches!(
            done,
            DirectFinish::Finished(FinishReceipt {
                accepted: true,
                instance_claimed: true
            })
        ));
        assert_eq!(s.history("c").await.unwrap().len(), 2);
        assert_eq!(inbox_events(s, "c").await.len(), 2);

        // A stale position: recorded as a plain outcome, the history untouched.
        instance_with_task(s, "d").await;
        let t = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.instance_id == "d")
            .unwrap();
        let mut info = s.describe("d").await.unwrap().unwrap();
        info.next_position -= 1;
        let done = s
            .finish_and_activate(&t, direct("d", &info, vec![outcome(&t, json!(4))]))
            .await
            .unwrap();
        assert!(matches!(
            done,
            DirectFinish::Finished(FinishReceipt {
                accepted: true,
                instance_claimed: true
            })
        ));
        assert_eq!(s.history("d").await.unwrap().len(), 2);
        assert_eq!(inbox_events(s, "d").await, vec![outcome(&t, json!(4))]);

        // An activation that does not start with this call's outcome is a caller's bug.
        instance_with_task(s, "e").await;
        let t = s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .into_iter()
            .find(|t| t.instance_id == "e")
            .unwrap();
        let info = s.describe("e").await.unwrap().unwrap();
        assert!(s
            .finish_and_activate(&t, direct("e", &info, vec![signal("x", json!(0))]))
            .await
            .is_err());
        assert!(
            s.finish_task("w1", &t, completed(&t, json!(5)), LEASE_MS)
                .await
                .unwrap()
                .accepted,
            "nothing was written by the refused call"
        );
    }

    pub(super) async fn mark_unclaimed_notes_unknown_coordinators(h: &Harness) {
        let s = &h.store;
        s.create_instance(new_instance("a", "c", json!(1)))
            .await
            .unwrap();
        s.create_instance(new_instance("b", "d", json!(2)))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            s.mark_unclaimed(&names(&["c"]), 3_600_000).await.unwrap(),
            0,
            "not waiting long enough"
        );
        assert_eq!(s.mark_unclaimed(&names(&["c"]), 0).await.unwrap(), 1);
        assert_eq!(
            s.describe("b").await.unwrap().unwrap().reason.as_deref(),
            Some("waiting for a worker that knows coordinator d")
        );
        assert_eq!(s.describe("a").await.unwrap().unwrap().reason, None);
        assert_eq!(s.mark_unclaimed(&names(&["c"]), 0).await.unwrap(), 0);
        // Its next activation clears the note.
        assert_eq!(
            s.claim_ready("w", &names(&["d"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["b".to_string()]
        );
        activate(s, "w", "b", vec![scheduled(0, "act")], false)
            .await
            .unwrap();
        assert_eq!(s.describe("b").await.unwrap().unwrap().reason, None);
    }

    pub(super) async fn list_and_describe(h: &Harness) {
        let s = &h.store;
        assert!(s.describe("nobody").await.unwrap().is_none());
        assert!(matches!(
            s.history("nobody").await,
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(
            s.load("nobody", 0).await,
            Err(StoreError::NotFound { .. })
        ));
        for (i, c) in ["c", "d", "c"].iter().enumerate() {
            s.create_instance(new_instance(&format!("l{i}"), c, json!(i)))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        s.terminate("l0", "x").await.unwrap();
        let all = s.list_instances(&ListFilter::default()).await.unwrap();
        let ids: Vec<&str> = all.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, vec!["l2", "l1", "l0"], "newest first");
        let filter = ListFilter {
            coordinator: Some("c".into()),
            ..ListFilter::default()
        };
        let cs: Vec<String> = s
            .list_instances(&filter)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(cs, vec!["l2", "l0"]);
        let filter = ListFilter {
            status: Some(InstanceStatus::Running),
            limit: Some(1),
            ..ListFilter::default()
        };
        let running = s.list_instances(&filter).await.unwrap();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].id, "l2");
        let info = s.describe("l1").await.unwrap().unwrap();
        assert_eq!(info.coordinator, "d");
        assert_eq!(info.input, json!(1));
        assert_eq!(info.generation, 0);
        assert!(info.created_at_ms > 0);
        assert!(info.parent.is_none());
    }

    pub(super) async fn changes_wake_waiters(h: &Harness) {
        let s = &h.store;
        let mut rx = s.changes();
        rx.borrow_and_update();
        s.create_instance(new_instance("a", "c", json!(1)))
            .await
            .unwrap();
        assert!(
            rx.has_changed().unwrap(),
            "a new instance wakes this process's waiters"
        );
        rx.borrow_and_update();
        s.deliver("a", signal("s", json!(1)), None).await.unwrap();
        assert!(rx.has_changed().unwrap());

        if !h.notifies_other_handles() {
            eprintln!(
                "changes_wake_waiters: {:?} has no cross-process notification (workers poll)",
                h.backend
            );
            return;
        }
        let other = h.reopen().await.unwrap().unwrap();
        let mut other_rx = other.changes();
        // The listening connection announces itself once; let it settle.
        let _ = tokio::time::timeout(Duration::from_secs(2), other_rx.changed()).await;
        other_rx.borrow_and_update();
        let started = std::time::Instant::now();
        s.create_instance(new_instance("b", "c", json!(2)))
            .await
            .unwrap();
        tokio::time::timeout(PATIENCE, other_rx.changed())
            .await
            .expect("another process hears of the new instance")
            .unwrap();
        eprintln!("cross-process wake-up after {:?}", started.elapsed());
        // And the other way round.
        let mut rx = s.changes();
        let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
        rx.borrow_and_update();
        other
            .deliver("b", signal("s", json!(1)), None)
            .await
            .unwrap();
        tokio::time::timeout(PATIENCE, rx.changed())
            .await
            .expect("this process hears of the other's signal")
            .unwrap();
    }

    pub(super) async fn reopen_keeps_everything(h: &Harness) {
        let Some(other) = h.reopen().await else {
            eprintln!("reopen_keeps_everything: not applicable to an in-memory store");
            return;
        };
        let other = other.unwrap();
        let s = &h.store;
        create_and_claim(s, "a", "w1").await;
        activate(s, "w1", "a", vec![scheduled(0, "act")], false)
            .await
            .unwrap();
        s.deliver("a", signal("s", json!(1)), Some("k"))
            .await
            .unwrap();
        // The other handle sees every committed change, and the same dedupe keys.
        assert_eq!(
            other.history("a").await.unwrap(),
            s.history("a").await.unwrap()
        );
        assert!(!other
            .deliver("a", signal("s", json!(1)), Some("k"))
            .await
            .unwrap());
        let t = other
            .claim_tasks("w2", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap();
        assert_eq!(t.len(), 1);
        assert!(s
            .claim_tasks("w1", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(
            other
                .claim_ready("w2", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["a".to_string()]
        );
        assert!(matches!(
            activate(s, "w1", "a", vec![], false).await,
            Err(StoreError::LeaseLost { .. })
        ));
        activate(&other, "w2", "a", vec![], false).await.unwrap();
        assert_eq!(s.describe("a").await.unwrap().unwrap().next_position, 3);
    }

    pub(super) async fn newer_schema_refused(h: &Harness) {
        if h.backend == Backend::SqliteMemory {
            eprintln!("newer_schema_refused: not applicable to an in-memory store");
            return;
        }
        let s = &h.store;
        s.create_instance(new_instance("a", "c", json!(1)))
            .await
            .unwrap();
        let newer = h.bump_schema_version().await;
        match h.reopen().await.unwrap() {
            Err(StoreError::NewerSchema {
                path,
                found,
                supported,
            }) => {
                assert_eq!(found, newer);
                assert_eq!(supported, newer - 1);
                assert!(!path.is_empty());
            }
            Err(other) => panic!("expected NewerSchema, got {other}"),
            Ok(_) => panic!("expected NewerSchema, the store opened"),
        }
        // Refusing changed nothing: still refused, and the data is there for a newer build.
        assert!(matches!(
            h.reopen().await.unwrap(),
            Err(StoreError::NewerSchema { found, .. }) if found == newer
        ));
        assert!(s.describe("a").await.unwrap().is_some());
    }

    pub(super) async fn foreign_database_refused(h: &Harness) {
        let Some((opened, unchanged)) = h.open_foreign().await else {
            eprintln!("foreign_database_refused: not applicable to an in-memory store");
            return;
        };
        match opened {
            Err(StoreError::NotARetraceStore { path, detail }) => {
                assert!(!path.is_empty());
                assert!(!detail.is_empty());
            }
            Err(other) => panic!("expected NotARetraceStore, got {other}"),
            Ok(_) => panic!("expected NotARetraceStore, the store opened"),
        }
        assert!(unchanged, "the other program's database was changed");
    }

    pub(super) async fn open_existing_creates_nothing(h: &Harness) {
        let Some((url, missing)) = h.urls() else {
            eprintln!("open_existing_creates_nothing: not applicable to an in-memory store");
            return;
        };
        h.store
            .create_instance(new_instance("a", "c", json!(1)))
            .await
            .unwrap();
        let existing = StoreUrl::parse(&url)
            .unwrap()
            .open_existing()
            .await
            .unwrap();
        assert!(existing.describe("a").await.unwrap().is_some());
        match StoreUrl::parse(&missing).unwrap().open_existing().await {
            Err(StoreError::NotARetraceStore { .. }) => {}
            Err(other) => panic!("expected NotARetraceStore, got {other}"),
            Ok(_) => panic!("expected NotARetraceStore, a store was opened"),
        }
        assert!(h.still_missing(&missing).await, "nothing is created");
        // The creating form creates it.
        let created = retrace_runtime::open_store(&missing).await.unwrap();
        assert!(created.describe("a").await.unwrap().is_none());
        assert!(!h.still_missing(&missing).await);
    }

    pub(super) async fn dead_workers_reaped(h: &Harness) {
        let Some(other) = h.reopen().await else {
            eprintln!("dead_workers_reaped: not applicable to an in-memory store");
            return;
        };
        let other = other.unwrap();
        let s = &h.store;
        instance_with_task(s, "t").await;
        s.create_instance(new_instance("a", "c", json!(1)))
            .await
            .unwrap();
        s.create_instance(new_instance("h", "c", json!(2)))
            .await
            .unwrap();
        // A worker of the other process holds instances and a task...
        other.register_worker("w-other").await.unwrap();
        s.register_worker("w-here").await.unwrap();
        let mut claimed = other
            .claim_ready("w-other", &names(&["c"]), 10, LEASE_MS)
            .await
            .unwrap();
        claimed.sort();
        assert_eq!(claimed, vec!["a".to_string(), "h".to_string()]);
        assert_eq!(
            other
                .claim_tasks("w-other", &names(&["act"]), 10, LEASE_MS)
                .await
                .unwrap()
                .len(),
            1
        );
        // ...and a call it claimed with the activation that scheduled it.
        let receipt = activate(&other, "w-other", "h", vec![scheduled(0, "act")], true)
            .await
            .unwrap();
        assert_eq!(receipt.claimed_tasks.len(), 1);
        // ...and is alive: nothing to reap.
        assert_eq!(s.reap_dead_workers().await.unwrap(), 0);
        assert_eq!(other.reap_dead_workers().await.unwrap(), 0);
        // The process dies (its store handle goes away without unregistering).
        drop(other);
        let deadline = std::time::Instant::now() + PATIENCE;
        let reaped = loop {
            let n = s.reap_dead_workers().await.unwrap();
            if n > 0 || std::time::Instant::now() > deadline {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(reaped, 1);
        assert_eq!(s.reap_dead_workers().await.unwrap(), 0, "reaped once");
        // Its work is taken over at once, long before its leases would expire.
        assert_eq!(
            s.claim_ready("w-here", &names(&["c"]), 10, LEASE_MS)
                .await
                .unwrap(),
            vec!["a".to_string()]
        );
        let mut tasks = s
            .claim_tasks("w-here", &names(&["act"]), 10, LEASE_MS)
            .await
            .unwrap();
        tasks.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        assert_eq!(tasks.len(), 2, "{tasks:?}");
        assert_eq!(
            tasks
                .iter()
                .map(|t| (t.instance_id.as_str(), t.attempt))
                .collect::<Vec<_>>(),
            vec![("h", 2), ("t", 2)]
        );
        s.unregister_worker("w-here").await.unwrap();
    }

    const ADD_ONE: Activity<u64, u64> = Activity::new("add_one").with_retry(
        RetryPolicy::new()
            .max_attempts(5)
            .initial_interval(Duration::from_millis(10)),
    );
    const FLOW: Coordinator<u64, u64> = Coordinator::new("flow");

    /// An activity, a durable timer, a buffered signal, another activity.
    async fn flow(ctx: Context, n: u64) -> Result<u64, Error> {
        let a = ctx.call(&ADD_ONE, &n).await?;
        ctx.sleep(Duration::from_millis(20)).await?;
        let bump: u64 = ctx.signal("bump").await?;
        ctx.call(&ADD_ONE, &(a + bump)).await
    }

    /// Successful executions per idempotency key.
    type Executions = Arc<Mutex<std::collections::HashMap<String, u32>>>;

    fn flow_worker(store: SharedStore, id: &str, executions: &Executions) -> Worker {
        let executions = Arc::clone(executions);
        Worker::builder(store)
            .worker_id(id)
            .lease(Duration::from_secs(10))
            .poll_interval(Duration::from_millis(20))
            .coordinator(&FLOW, flow)
            .activity(&ADD_ONE, move |ctx: ActivityContext, n: u64| {
                let executions = Arc::clone(&executions);
                async move {
                    // Every third instance's calls fail once, retryably.
                    if n.is_multiple_of(3) && ctx.attempt() == 1 {
                        return Err(ActivityError::retryable("flaky", "first attempt fails"));
                    }
                    *executions
                        .lock()
                        .unwrap()
                        .entry(ctx.idempotency_key())
                        .or_default() += 1;
                    Ok(n + 1)
                }
            })
            .start()
    }

    pub(super) async fn workers_run_coordinators(h: &Harness) {
        let executions = Executions::default();
        let other = match h.reopen().await {
            Some(other) => other.unwrap(),
            None => Arc::clone(&h.store),
        };
        // Two workers per handle, as two processes with two workers each.
        let workers = vec![
            flow_worker(Arc::clone(&h.store), "worker-1a", &executions),
            flow_worker(Arc::clone(&h.store), "worker-1b", &executions),
            flow_worker(Arc::clone(&other), "worker-2a", &executions),
            flow_worker(Arc::clone(&other), "worker-2b", &executions),
        ];
        let client = Client::new(Arc::clone(&h.store));
        let count: usize = std::env::var("RETRACE_CONFORMANCE_INSTANCES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        let ids: Vec<String> = (0..count).map(|i| format!("flow-{i}")).collect();
        for (n, id) in ids.iter().enumerate() {
            client.start(&FLOW, id, &(n as u64)).await.unwrap();
            client.signal(id, "bump", &5u64).await.unwrap();
        }
        for (n, id) in ids.iter().enumerate() {
            let result =
                tokio::time::timeout(Duration::from_secs(60), client.handle(&FLOW, id).result())
                    .await
                    .expect("instance finished in time")
                    .unwrap();
            assert_eq!(result, n as u64 + 7, "{id}");
        }
        for w in workers {
            w.shutdown().await.unwrap();
        }
        for id in &ids {
            let history = history_events(&h.store, id).await;
            let outcomes: Vec<u32> = history
                .iter()
                .filter_map(|e| match e {
                    Event::ActivityCompleted { seq, .. } | Event::ActivityFailed { seq, .. } => {
                        Some(*seq)
                    }
                    _ => None,
                })
                .collect();
            let mut unique = outcomes.clone();
            unique.dedup();
            assert_eq!(outcomes.len(), 2, "{id}: {history:?}");
            assert_eq!(unique.len(), 2, "{id}: one outcome per call position");
            assert_eq!(
                history
                    .iter()
                    .filter(|e| matches!(e, Event::TimerFired { .. }))
                    .count(),
                1
            );
            assert!(matches!(
                history.last(),
                Some(Event::InstanceCompleted { .. })
            ));
        }
        let executions = executions.lock().unwrap();
        assert_eq!(executions.len(), 2 * count, "every call ran");
        assert!(
            executions.values().all(|n| *n == 1),
            "a call succeeded twice without any crash: {executions:?}"
        );
    }
}
